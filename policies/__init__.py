"""Routing policies: pure decision code, no I/O."""

from policies.base import Decision, EndpointView, Policy, RequestView
from policies.registry import build_policy, known_policies

__all__ = ["Decision", "EndpointView", "Policy", "RequestView", "build_policy", "known_policies"]
