"""Policies by name, as YAML names them. Add a policy by adding a factory here."""

from __future__ import annotations

import random
from typing import Any

from policies.base import NoParams, Policy, PolicyFactory
from policies.composite import RANDOM_PRESET, WEIGHTED_PRESET, Composite, CompositeParams
from policies.keyed import (
    ConsistentHash,
    ConsistentHashParams,
    SessionAffinity,
    SessionAffinityParams,
)
from policies.latency import LeastLatency, LeastLatencyParams
from policies.prefix import PrefixAffinity, PrefixAffinityParams
from policies.simple import LeastLoad, PowerOfTwo, RoundRobin, WeightedRoundRobin

POLICIES: dict[str, PolicyFactory] = {
    "round_robin": PolicyFactory(NoParams, lambda params, rng: RoundRobin(rng)),
    "least_load": PolicyFactory(NoParams, lambda params, rng: LeastLoad(rng)),
    "power_of_two": PolicyFactory(NoParams, lambda params, rng: PowerOfTwo(rng)),
    "random": PolicyFactory(NoParams, lambda params, rng: Composite(RANDOM_PRESET, rng)),
    "weighted": PolicyFactory(NoParams, lambda params, rng: Composite(WEIGHTED_PRESET, rng)),
    "consistent_hash": PolicyFactory(ConsistentHashParams, ConsistentHash),
    "session_affinity": PolicyFactory(SessionAffinityParams, SessionAffinity),
    "prefix_affinity": PolicyFactory(PrefixAffinityParams, PrefixAffinity),
    "composite": PolicyFactory(CompositeParams, Composite),
    "least_latency": PolicyFactory(LeastLatencyParams, LeastLatency),
    "weighted_round_robin": PolicyFactory(NoParams, lambda params, rng: WeightedRoundRobin(rng)),
}


def known_policies() -> list[str]:
    return sorted(POLICIES)


def build_policy(name: str, params: Any, rng: random.Random) -> Policy:
    """Build a policy from its YAML parameters, or from parameters the config
    already validated (an instance of ``PolicyFactory.params_model`` is used as is)."""
    factory = POLICIES[name]
    return factory.build(factory.params_model.model_validate(params), rng)
