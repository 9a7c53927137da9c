"""A consistent-hash ring with virtual nodes and bounded load.

Each endpoint owns ``vnodes x weight`` points on a 64-bit ring, placed by
hashing its id, so every router process builds the same ring from the same
endpoint set, with no coordination. A key belongs to the first endpoint
clockwise from its hash. Adding or removing one of N endpoints moves about
1/N of the keys.

Bounded load (Mirrokni et al., "Consistent Hashing with Bounded Loads"): an
endpoint whose load would exceed ``(1 + epsilon)`` times its fair share of
the total passes the key on to the next endpoint along the ring.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from operator import attrgetter

import xxhash

from policies.base import EndpointView

_WEIGHT = attrgetter("weight")
_ID = attrgetter("id")


class HashRing:
    def __init__(self, members: Sequence[tuple[str, float]], vnodes: int = 100) -> None:
        points: list[tuple[int, str]] = []
        for endpoint_id, weight in members:
            for i in range(max(1, round(vnodes * weight))):
                points.append(
                    (xxhash.xxh3_64_intdigest(f"{endpoint_id}#{i}".encode()), endpoint_id)
                )
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [o for _, o in points]
        self.size = len({m for m, _ in members})

    def walk(self, key: int) -> Iterator[str]:
        """Distinct endpoints clockwise from ``key``: the owner first."""
        n = len(self._hashes)
        if n == 0:
            return
        start = bisect.bisect_left(self._hashes, key) % n
        seen: set[str] = set()
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self.size:
                    return


class RingCache:
    """Rings by endpoint set, so that health flapping does not rebuild them."""

    def __init__(self, vnodes: int = 100, keep: int = 8) -> None:
        self.vnodes = vnodes
        self._keep = keep
        self._rings: OrderedDict[tuple[tuple[str, float], ...], HashRing] = OrderedDict()
        #: The last candidates' ids and weights, and their ring: the same
        #: fleet asks again and again, and comparing two tuples of interned
        #: ids costs less than hashing the 64 pairs that key the cache.
        self._last: tuple[tuple[str, ...], tuple[float, ...], HashRing] | None = None

    def ring(self, candidates: Sequence[EndpointView]) -> HashRing:
        ids = tuple(map(_ID, candidates))
        weights = tuple(map(_WEIGHT, candidates))
        last = self._last
        if last is not None and last[0] == ids and last[1] == weights:
            return last[2]
        ring = self._ring(tuple(zip(ids, weights, strict=True)))
        self._last = (ids, weights, ring)
        return ring

    def _ring(self, members: tuple[tuple[str, float], ...]) -> HashRing:
        # Keyed in the order given (no sort on the hot path); the ring itself
        # depends only on the set, so every order builds the same one.
        ring = self._rings.get(members)
        if ring is None:
            ring = HashRing(sorted(members), self.vnodes)
            self._rings[members] = ring
            if len(self._rings) > self._keep:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(members)
        return ring


def bounded_capacity(
    candidates: Sequence[EndpointView], epsilon: float, floor: float = 0.0
) -> dict[str, float]:
    """Each endpoint's load ceiling once one more request is placed (never
    below ``floor``: a few requests in flight overload nobody): ``Capacity.cap``
    of every candidate."""
    capacity = Capacity(candidates, epsilon, floor)
    return {e.id: capacity.cap(e) for e in candidates}


class Capacity:
    """The bounded-load rule for one decision: may ``e`` take one more request?"""

    def __init__(
        self,
        candidates: Sequence[EndpointView],
        epsilon: float,
        floor: float = 0.0,
        total_load: float | None = None,
    ):
        if total_load is None:
            total_load = sum(e.load for e in candidates)
        self._total = total_load + 1
        self._weight: float = sum(map(_WEIGHT, candidates))
        self._epsilon = epsilon
        self._floor = floor

    def fits(self, e: EndpointView, load: float) -> bool:
        return load + 1 <= self.cap(e)

    def cap(self, e: EndpointView) -> float:
        cap = math.ceil((1 + self._epsilon) * self._total * e.weight / self._weight)
        return max(self._floor, cap)


class SheddingCapacity(Capacity):
    """The bounded-load rule for one key, shedding a share of keys by hash.

    Past its bound, an endpoint with load ``L`` and bound ``C`` passes on the
    keys whose hash (keyed by the endpoint) falls in the lowest ``1 - C / (L +
    1)`` of the hash space, and keeps the others. Routers that share nothing
    judge ``L`` each by its own counts, so they disagree a little on how many
    keys to shed; they never disagree on which keys go first: the keys one
    router sheds include those of every router that sheds fewer. The plain
    rule made each router spill every key at its own moments, so one tenant's
    prompt went to two replicas at once (benchmarks/README.md, "Third pass").
    """

    def __init__(
        self,
        candidates: Sequence[EndpointView],
        epsilon: float,
        floor: float,
        total_load: float,
        key: int,
    ):
        super().__init__(candidates, epsilon, floor, total_load)
        self._key = key

    def fits(self, e: EndpointView, load: float) -> bool:
        cap = self.cap(e)
        if load + 1 <= cap:
            return True
        shed = 1.0 - cap / (load + 1)
        return key_point(self._key, e.id) >= shed


def key_point(key: int, endpoint_id: str) -> float:
    """Where ``key`` falls in [0, 1) for ``endpoint_id``: the same in every router."""
    return xxhash.xxh3_64_intdigest(f"{key}#{endpoint_id}".encode()) / 2.0**64


def ring_order(
    ring: HashRing,
    key: int,
    candidates: Sequence[EndpointView],
    epsilon: float | None,
    floor: float = 0.0,
) -> tuple[list[EndpointView], bool]:
    """Candidates in ring order from ``key``, the first one able to take the
    request first; and whether that is the key's owner itself."""
    by_id = {e.id: e for e in candidates}
    order = [by_id[i] for i in ring.walk(key) if i in by_id]
    if epsilon is None:
        return order, True
    cap = bounded_capacity(candidates, epsilon, floor)
    for i, e in enumerate(order):
        if e.load + 1 <= cap[e.id]:
            return [e, *order[:i], *order[i + 1 :]], i == 0
    return order, True
