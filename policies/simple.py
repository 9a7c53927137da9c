"""Load-spreading policies that need no request content: round robin (plain
and smooth weighted), least load, power of two choices."""

from __future__ import annotations

import random
from collections.abc import Sequence

from policies.base import Decision, EndpointView, RequestView, StatelessPolicy


class RoundRobin(StatelessPolicy):
    """Each request starts one further along the candidate list."""

    name = "round_robin"

    def __init__(self, rng: random.Random) -> None:
        self._next = 0

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        start = self._next % len(candidates)
        self._next += 1
        ranked = tuple(candidates[start:]) + tuple(candidates[:start])
        return Decision(ranked, "round_robin")


class WeightedRoundRobin(StatelessPolicy):
    """nginx's smooth weighted round robin: each request adds every candidate's
    weight to its current value, picks the highest (the first listed on a tie)
    and takes the candidates' total weight off it. Over a cycle each endpoint
    is picked exactly in proportion to its weight, interleaved (5, 1, 1 gives
    a a b a c a a, not a a a a a b c). An endpoint that is not a candidate (down,
    draining) neither gains nor loses; one that arrives starts at 0. The rest,
    by current value, are the failover order."""

    name = "weighted_round_robin"

    def __init__(self, rng: random.Random) -> None:
        self._current: dict[str, float] = {}

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        current = self._current
        total = 0.0
        for e in candidates:
            current[e.id] = current.get(e.id, 0.0) + e.weight
            total += e.weight
        ranked = sorted(candidates, key=lambda e: -current[e.id])
        current[ranked[0].id] -= total
        return Decision(tuple(ranked), "weighted_round_robin")

    def forget(self, endpoint_id: str) -> None:
        self._current.pop(endpoint_id, None)


class LeastLoad(StatelessPolicy):
    """The least loaded first; ties broken by the injected RNG."""

    name = "least_load"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda e: (e.load / e.weight, e.kv_usage or 0.0))
        return Decision(tuple(shuffled), "least_load")


class PowerOfTwo(StatelessPolicy):
    """Two random candidates; the less loaded goes first, then the rest by load."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        if len(candidates) == 1:
            return Decision(tuple(candidates), "power_of_two")
        a, b = self._rng.sample(range(len(candidates)), 2)
        first, second = sorted((a, b), key=lambda i: candidates[i].load / candidates[i].weight)
        rest = sorted(
            (e for i, e in enumerate(candidates) if i not in (a, b)),
            key=lambda e: e.load / e.weight,
        )
        return Decision((candidates[first], candidates[second], *rest), "power_of_two")
