"""Homes for recurring prefixes, balanced over the endpoints, that router
replicas sharing nothing compute alike.

Several routers without KV events place a new prefix at its ring owner, so
they agree; but a ring spreads a dozen prefixes unevenly (4 replicas, 12
tenants: 4-6 on the busiest one, whose cache holds about 4), and a cache
holding more prefixes than fit evicts them in turn (benchmarks/README.md,
"The index's size under several routers"). One router balances by its own
counts, which several routers do not share.

What every router does share is the set of prefixes that recur: clients
spread each tenant's requests over the routers, so each sees every recurring
prefix. From that set alone: every recurring prefix starts at its ring
owner; an endpoint holding more than its bound keeps the prefixes whose hash
keyed by the endpoint is highest (as ``SheddingCapacity`` sheds load) and
passes the rest one step along their own walks, until none is past it. The
bound is the fair share, or how many such prompts a cache holds when more
(then the ring's placement stands where it fits). Neither the order requests
came in nor anything else private to a router enters: two routers with the
same set compute the same homes, and a prefix moves only off an endpoint
past its bound. (Bounded loads in the order of the keys, tried first, moved
every later key that contended for an endpoint when one key joined.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from policies.ring import HashRing, key_point

#: Ring keys remembered at most (the oldest leave first).
MAX_KEYS = 4096


class BalancedHomes:
    def __init__(self, window: int, max_keys: int = MAX_KEYS) -> None:
        #: A prefix not seen for this many of this router's decisions leaves the set.
        self.window = window
        self.max_keys = max_keys
        #: Key -> (times seen, decision at the last sight), least recent first.
        self._seen: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._clock = 0
        self._recurring: set[int] = set()
        self._version = 0
        self._cached: tuple[int, tuple[str, ...], int, dict[int, str]] | None = None

    def touch(self, key: int) -> None:
        """This router decided for a prompt whose ring key is ``key``."""
        self._clock += 1
        count, _ = self._seen.pop(key, (0, 0))
        self._seen[key] = (count + 1, self._clock)
        if count + 1 == 2:
            self._recurring.add(key)
            self._version += 1
        oldest = self._clock - self.window
        while self._seen:
            k, (_, last) = next(iter(self._seen.items()))
            if last > oldest and len(self._seen) <= self.max_keys:
                break
            del self._seen[k]
            if k in self._recurring:
                self._recurring.discard(k)
                self._version += 1

    def home(
        self, key: int, ring: HashRing, endpoint_ids: Sequence[str], fit: int | None = None
    ) -> str | None:
        """The balanced home of a recurring ``key``; None for a prefix seen
        once. Each endpoint takes up to the fair share of the recurring
        prefixes, or up to ``fit`` (how many such prompts its cache holds)
        when more: the ring's own placement where it fits. None too when the
        recurring prefixes would not fit the caches even balanced (``fit``
        times the endpoints): balancing then only moves prompts that are
        evicted anyway, and on real vLLM cost hit rate (benchmarks/README.md,
        "balanced homes")."""
        if key not in self._recurring:
            return None
        ids = tuple(sorted(endpoint_ids))
        if fit is not None and fit * len(ids) < len(self._recurring):
            return None
        cap = max(fit or 0, math.ceil(len(self._recurring) / max(1, len(ids))))
        cached = self._cached
        if cached is None or cached[:3] != (self._version, ids, cap):
            cached = self._cached = (self._version, ids, cap, self._assign(ring, cap))
        return cached[3].get(key)

    def _assign(self, ring: HashRing, cap: int) -> dict[int, str]:
        """Each recurring key at its ring owner; an endpoint with more than
        ``cap`` keeps the ``cap`` whose hash keyed by the endpoint is highest
        and passes the rest one step along their walks, until none has more.
        Only the set and the hashes decide, never an order of arrival, and a
        key moves only off an endpoint past ``cap``."""
        walks = {key: list(ring.walk(key)) for key in self._recurring}
        step = dict.fromkeys(walks, 0)
        for _ in range(len(ring_ids := {e for w in walks.values() for e in w}) + 1):
            at: dict[str, list[int]] = {e: [] for e in ring_ids}
            for key, i in step.items():
                at[walks[key][i]].append(key)
            moved = False
            for endpoint_id, keys in at.items():
                if len(keys) <= cap:
                    continue
                points = {k: key_point(k, endpoint_id) for k in keys}
                keys.sort(key=points.__getitem__, reverse=True)
                for key in keys[cap:]:
                    if step[key] + 1 < len(walks[key]):
                        step[key] += 1
                        moved = True
            if not moved:
                break
        return {key: walks[key][i] for key, i in step.items()}
