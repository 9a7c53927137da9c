"""Routing policies: pure decision code, no I/O."""

from policies.base import Decision, EndpointView, Outcome, Policy, RequestView
from policies.registry import build_policy, known_policies

__all__ = [
    "Decision",
    "EndpointView",
    "Outcome",
    "Policy",
    "RequestView",
    "build_policy",
    "known_policies",
]
