"""Policies by name, as YAML names them. Add a policy by adding a factory here."""

from __future__ import annotations

import random
from typing import Any

from policies.base import NoParams, Policy, PolicyFactory
from policies.simple import LeastLoad, RoundRobin

POLICIES: dict[str, PolicyFactory] = {
    "round_robin": PolicyFactory(NoParams, lambda params, rng: RoundRobin(rng)),
    "least_load": PolicyFactory(NoParams, lambda params, rng: LeastLoad(rng)),
}


def known_policies() -> list[str]:
    return sorted(POLICIES)


def build_policy(name: str, params: Any, rng: random.Random) -> Policy:
    """Build a policy from its YAML parameters (checked by ``PolicyFactory.params_model``)."""
    factory = POLICIES[name]
    return factory.build(factory.params_model.model_validate(params), rng)
