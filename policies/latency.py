"""Latency-aware choice: the ``least_latency`` policy and the ``low_latency`` scorer.

Both read what the router measured of each endpoint (``EndpointView.latency``,
kept by ``router/latency.py``): for a stream, the expected time to its first
token; for a whole answer, its expected duration (of a reference size, so
that endpoints compare). The rules:

- Shrink thin estimates toward the fleet's. An estimate backed by ``w``
  decayed samples counts as ``(w * own + prior_samples * typical) / (w +
  prior_samples)``, where typical is the median of the candidates' own
  estimates. An endpoint never measured is typical (a neutral score); one
  measured once, long ago, is nearly typical again, since a sample's weight
  halves every half-life: an old bad sample fades instead of condemning it.
- Probe what has faded (``least_latency``). A candidate with fewer than
  ``probe_below`` samples behind its estimate and nothing of ours in flight
  goes first: one request measures it again, and while that one is in
  flight the next request does not follow it. Shrinking alone would not do:
  an endpoint once slower than typical stays above the fastest, and at low
  load would never be tried again.
- Weigh in the load, so as not to herd (``least_latency``). The expected
  latency is multiplied by ``1 + load / (slots * weight)``: by latency alone
  every request would go to the fastest endpoint until its measured latency
  caught up with its queue, a half-life later. The load term spreads requests
  as soon as the fastest fills. (In ``composite``, add ``low_load`` for that.)
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policies.base import Decision, EndpointView, RequestView, StatelessPolicy
from policies.prefix_index import IndexStats

Quantity = Literal["ttft", "duration"]
#: Seconds: estimates are taken as at least this (instant simulators measure 0).
FLOOR = 1e-6


def quantity(request: RequestView) -> Quantity:
    """What the client waits for: a stream's first token, or the whole answer."""
    return "ttft" if request.body.get("stream") is True else "duration"


def expected(
    candidates: Sequence[EndpointView], q: Quantity, prior_samples: float
) -> list[float] | None:
    """Each candidate's estimate of ``q``, shrunk toward the candidates' median
    (None when no candidate has one)."""
    own = [_own(e, q) for e in candidates]
    known = [v for v, w in filter(None, own) if w > 0]
    if not known:
        return None
    typical = statistics.median(known)
    out = []
    for entry in own:
        if entry is None or entry[1] + prior_samples <= 0:
            out.append(typical)
        else:
            value, w = entry
            out.append(max(FLOOR, (w * value + prior_samples * typical) / (w + prior_samples)))
    return out


def _own(endpoint: EndpointView, q: Quantity) -> tuple[float, float] | None:
    """The endpoint's own estimate of ``q`` and the samples behind it."""
    latency = endpoint.latency
    if latency is None:
        return None
    value = latency.ttft if q == "ttft" else latency.duration
    return None if value is None else (value, latency.samples(q))


def samples(endpoint: EndpointView, q: Quantity) -> float:
    return 0.0 if endpoint.latency is None else endpoint.latency.samples(q)


class LeastLatencyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    #: Requests an endpoint of weight 1 holds when its expected latency has
    #: doubled: the load term is ``1 + load / (slots * weight)``.
    slots: float = Field(4.0, gt=0)
    #: How many samples' worth the fleet's typical value weighs in each estimate.
    prior_samples: float = Field(1.0, ge=0)
    #: An idle candidate with fewer decayed samples than this is probed (0: never).
    probe_below: float = Field(0.1, ge=0)


class LeastLatency(StatelessPolicy):
    """The least expected latency under the current load first; the faded and
    idle probed first; ties broken by the injected RNG."""

    name = "least_latency"

    def __init__(self, params: LeastLatencyParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        p = self.params
        q = quantity(request)
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        estimates = expected(shuffled, q, p.prior_samples) or [1.0] * len(shuffled)
        keys = {}
        for e, estimate in zip(shuffled, estimates, strict=True):
            probe = e.in_flight == 0 and samples(e, q) < p.probe_below
            keys[e.id] = (not probe, estimate * (1.0 + e.load / (p.slots * e.weight)))
        shuffled.sort(key=lambda e: keys[e.id])
        first = shuffled[0]
        return Decision(tuple(shuffled), "latency" if keys[first.id][0] else "probe")


class LowLatencyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    prior_samples: float = Field(1.0, ge=0)


class LowLatency:
    """A ``composite`` scorer: the fastest expected (as ``least_latency`` sees
    it, without load or probing) scores 1, another ``fastest / its own``; an
    endpoint without data is typical; 0.5 for all when none has data."""

    uses_tokens = False

    def __init__(self, params: LowLatencyParams) -> None:
        self.prior_samples = params.prior_samples

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        estimates = expected(candidates, quantity(request), self.prior_samples)
        if estimates is None:
            return ([0.5] * len(candidates), None)
        fastest = min(estimates)
        return ([fastest / x for x in estimates], None)

    def picked(self, memo: Any, endpoint: EndpointView) -> None:
        return None

    def forget(self, endpoint_id: str) -> None:
        return None

    def index_stats(self) -> IndexStats | None:
        return None
