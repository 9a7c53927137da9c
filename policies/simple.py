"""Load-spreading policies that need no request content: round robin and least load."""

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


def load_of(endpoint: EndpointView) -> float:
    """Work an endpoint holds, per unit of weight.

    The router's own in-flight count is exact for this router; the scraped
    queue adds what other routers (or clients) put there.
    """
    queued = endpoint.waiting or 0.0
    return (endpoint.in_flight + queued) / endpoint.weight


class LeastLoad(StatelessPolicy):
    """The least loaded first; ties broken by the injected RNG."""

    name = "least_load"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda e: (load_of(e), e.kv_usage or 0.0))
        return Decision(tuple(shuffled), "least_load")
