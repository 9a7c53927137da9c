"""A router's share of the fleet's traffic, from counters that do not race.

Router replicas share nothing, so each estimates the part of every
endpoint's traffic that is its own (``prefix_affinity``'s ``share``: 1 alone,
about 1/N among N routers splitting each tenant's requests).

Counted (``CountedShare``): the requests this router saw answered, over the
requests the engine finished (``EndpointView.completed_at_scrape`` and
``EndpointView.finished``, both read when a scrape came back), summed over
the endpoints and over the last ``window`` or so finished requests. Both are
counters: a request that ends between the engine writing its metrics and the
router reading its own count moves one delta to the next, so the ratio has
no bias. Gauges do race: comparing this router's requests in flight with
the engine's running + waiting at one scrape counted the router's own
requests longer than the engine did (HTTP, a loaded machine: 1.35-2.47 x
over a run on real vLLM), and two routers each read a share above their true
one (benchmarks/README.md, "Two routers on real vLLM").

Gauged (``GaugedShare``, where a backend publishes no finished-requests
counter): this router's in-flight requests at the last scrape over the
scraped running + waiting, their median tracked (a lone router's samples are
mostly exactly 1, and the races only pull below).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import EndpointView

#: Finished requests (summed over the endpoints) before the counted share is used.
MIN_FINISHED = 16.0


class GaugedShare:
    """This router's in-flight requests at the last scrape over the scraped
    running + waiting; each sample moves the estimate a step towards it,
    never past it (steps of 1/n at first, then 0.02): a tracked median."""

    def __init__(self) -> None:
        #: None until a scrape has shown some of this router's requests.
        self.share: float | None = None
        self._samples = 0

    def learn(self, candidates: Sequence[EndpointView]) -> None:
        self.step(self.sample(candidates))

    @staticmethod
    def sample(candidates: Sequence[EndpointView]) -> float | None:
        """The candidates' sample (None: no scrape shows this router's requests)."""
        ours = total = 0.0
        for e in candidates:
            if e.in_flight_at_scrape is None or (e.running is None and e.waiting is None):
                continue
            ours += e.in_flight_at_scrape
            total += (e.running or 0.0) + (e.waiting or 0.0)
        if total <= 0 or ours <= 0:
            return None
        return min(1.0, ours / total)

    def step(self, sample: float | None) -> None:
        """Move the estimate a step towards ``sample``."""
        if sample is None:
            return
        self._samples += 1
        share = self.share
        if share is None:
            self.share = sample
        elif sample < share:
            self.share = max(sample, share - max(0.02, 1.0 / self._samples))
        elif sample > share:
            self.share = min(sample, share + max(0.02, 1.0 / self._samples))


class CountedShare:
    """This router's answered requests over the engines' finished requests,
    both as of each endpoint's scrapes, summed over roughly the last
    ``window`` finished requests (older counts scaled down, so the estimate
    follows routers joining and leaving). ``share`` is None until
    ``MIN_FINISHED`` requests have finished under the counters."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._ours = 0.0
        self._finished = 0.0
        #: Each endpoint's (finished, completed_at_scrape) last read.
        self._last: dict[str, tuple[float, int]] = {}

    @property
    def share(self) -> float | None:
        if self._finished < MIN_FINISHED:
            return None
        return min(1.0, self._ours / self._finished)

    def learn(self, candidates: Sequence[EndpointView]) -> None:
        last = self._last
        for e in candidates:
            finished, completed = e.finished, e.completed_at_scrape
            if finished is None or completed is None:
                continue
            before = last.get(e.id)
            if before == (finished, completed):
                continue
            last[e.id] = (finished, completed)
            if before is None:
                continue
            engine, ours = finished - before[0], completed - before[1]
            # A restarted engine (its counter went back): no delta this time.
            if engine < 0 or ours < 0:
                continue
            self._ours += ours
            self._finished += engine
        if self._finished > self.window:
            scale = self.window / self._finished
            self._ours *= scale
            self._finished = self.window

    def forget(self, endpoint_id: str) -> None:
        self._last.pop(endpoint_id, None)
