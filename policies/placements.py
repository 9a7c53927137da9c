"""Where this router placed prompts, for the other router replicas.

Router replicas without KV events each keep their own character index of
what the engines probably hold, fed by their own decisions only. With N
routers each index sees 1/N of the traffic, and the routers place a tenant
on different replicas (benchmarks/README.md, "Many router replicas"). When
they tell each other where they placed prompts (``router/placements``:
Redis pub/sub), every router's index is fed by every decision, as one
router's would be, and the rules written for routers that share nothing
stand aside.

This module is the policy's side of it, without I/O: ``PlacementLog``
collects the index insertions a policy makes (bounded; the oldest go
first when nobody drains it) and says whether the link is live. The
service drains it, publishes, and hands the other routers' placements back
to the policy (``PrefixAffinity.learn_placement``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    """A prompt's character blocks placed on an endpoint, with the index
    room the placing router gave that endpoint (in blocks)."""

    endpoint_id: str
    capacity_blocks: int
    #: The prompt's character-block hashes (unsigned 64-bit), in order; not
    #: copied (the policy's lists are made per decision and never changed).
    hashes: Sequence[int]


class PlacementLog:
    """A policy's placements waiting to be published (at most ``max_pending``:
    past it the oldest are dropped and counted), and whether the other
    routers' placements are arriving (``live``)."""

    def __init__(self, max_pending: int, notify: Callable[[], None] | None = None) -> None:
        self._pending: deque[Placement] = deque()
        self.max_pending = max_pending
        #: Called after each record (the service wakes its publisher).
        self._notify = notify
        #: Placements dropped because the log was full.
        self.dropped = 0
        #: True while the other routers' placements arrive (the subscription
        #: is up): the policy then sizes and places as a router alone.
        self.live = False
        #: Seconds the others' placements take to arrive, a recent mean (the
        #: service keeps it): past ``placements_max_lag`` the policy places new
        #: prefixes as routers that share nothing do.
        self.lag = 0.0

    def record(self, hashes: Sequence[int], endpoint_id: str, capacity_blocks: int) -> None:
        if not hashes:
            return
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(Placement(endpoint_id, capacity_blocks, hashes))
        if self._notify is not None:
            self._notify()

    def drain(self, limit: int) -> list[Placement]:
        """Up to ``limit`` of the oldest pending placements, taken out."""
        pending = self._pending
        return [pending.popleft() for _ in range(min(limit, len(pending)))]

    def __len__(self) -> int:
        return len(self._pending)
