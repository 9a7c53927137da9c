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

#: Hashes of one placement, at most: a prompt's first blocks past it are
#: published (an index holds no more of one prompt than an endpoint's room,
#: and the message stays bounded).
MAX_HASHES = 16_384
#: Hashes waiting in one log, at most (8 bytes each): the oldest placements
#: go first past it, as past ``max_pending``.
MAX_PENDING_HASHES = 1_000_000


@dataclass(frozen=True, slots=True)
class Placement:
    """A prompt's character blocks placed on an endpoint. The receiving
    router gives them the room its own index gives that endpoint."""

    endpoint_id: str
    #: The prompt's leading character-block hashes (unsigned 64-bit), in
    #: order; not copied (the policy's lists are made per decision and never
    #: changed).
    hashes: Sequence[int]


class PlacementLog:
    """A policy's placements waiting to be published (at most ``max_pending``
    placements and ``MAX_PENDING_HASHES`` hashes: past either the oldest are
    dropped and counted), and whether the other routers' placements are
    arriving (``live``) and how late (``lag``)."""

    def __init__(self, max_pending: int, notify: Callable[[], None] | None = None) -> None:
        self._pending: deque[Placement] = deque()
        self._hashes = 0
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

    def record(self, hashes: Sequence[int], endpoint_id: str, room: int) -> None:
        """``hashes`` placed on ``endpoint_id``, whose index room is ``room``
        blocks (no more of them are published: the index keeps no more)."""
        if not hashes or room <= 0:
            return
        if len(hashes) > min(room, MAX_HASHES):
            hashes = hashes[: min(room, MAX_HASHES)]
        pending = self._pending
        while pending and (
            len(pending) >= self.max_pending or self._hashes + len(hashes) > MAX_PENDING_HASHES
        ):
            self._hashes -= len(pending.popleft().hashes)
            self.dropped += 1
        pending.append(Placement(endpoint_id, hashes))
        self._hashes += len(hashes)
        if self._notify is not None:
            self._notify()

    def drain(self, limit: int, max_hashes: int = MAX_PENDING_HASHES) -> list[Placement]:
        """The oldest pending placements, taken out: up to ``limit`` of them
        and ``max_hashes`` hashes together (always at least one)."""
        pending = self._pending
        out: list[Placement] = []
        total = 0
        while pending and len(out) < limit:
            n = len(pending[0].hashes)
            if out and total + n > max_hashes:
                break
            out.append(pending.popleft())
            total += n
        self._hashes -= total
        return out

    def __len__(self) -> int:
        return len(self._pending)
