"""One endpoint's KV events, from its publisher's sockets into its ``EndpointBlocks``.

An asyncio task (``Subscriber.run``) holds a SUB socket to the publisher and,
for each resync, a short-lived DEALER to its replay socket::

    SUB connected ─> resync ─> live: in order -> apply
                       ^             gap, or a stream going backwards -> resync
                       │             seq 0 after n > 0 (a new process) -> clear, apply
                       └── every probe_interval, when the endpoint turns healthy again

A resync asks the replay socket for the batches from the last one applied
(``wire.plan_resync``): if the publisher still has that very batch it is the same
process, and the batches after it fill the gap. If not, it is another process
(vLLM restarted: its new cache is empty and its sequence restarted at 0) or
one whose buffer moved past ours: the blocks are cleared and replayed from 0.
A replay from 0 that does not start at 0 leaves blocks stored before it
unknown; the index then holds less than the engine does (a missed prefix,
never a false one) and stays marked stale for ``resync_grace`` seconds, while
the engine's own turnover evicts what we never saw.

A SUB socket's subscription takes effect at the publisher a moment after the
connection (ZMQ's "slow joiner"): batches published in between are lost
without a gap to show it until the next batch. The probe covers that too: it
runs whenever the stream's position is known, also at 0 after a resync that
found the publisher empty, so what an idle engine stored in that moment is
replayed within ``probe_interval``.

vLLM publishes nothing while idle, so silence is no sign of staleness. The
blocks are stale while: the SUB socket is not connected (ZMQ's monitor says
so within a reconnect interval of a publisher's death), the endpoint fails its
health probes, a resync has not succeeded (the replay socket does not answer
in ``replay_timeout``), history was lost (the grace above), or the publisher
claimed more blocks than the index holds (until it clears or restarts).

The SUB socket queues what is published during a replay (up to its high-water
mark; beyond, a gap, and another resync); batches already replayed are dropped
as duplicates when they come.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from backends.kv_events import (
    DEFAULT_LIMITS,
    AllBlocksCleared,
    Batch,
    BlockRemoved,
    BlockStored,
    KVEventsError,
    Limits,
    Resync,
    SeqTracker,
    Verdict,
    decode,
    decode_replay,
    plan_resync,
    replay_request,
    resync_start,
)
from policies.blocks import EndpointBlocks
from router.config import KVEventsConfig
from router.metrics import FeedSnapshot

LOG = logging.getLogger("kvroute.kvevents")

#: Live messages handled per wake-up before the loop looks at its other duties.
DRAIN = 256
#: Messages the SUB socket queues (beyond: dropped by ZMQ, seen as a gap and
#: replayed). A vLLM step's batch is a few KB to a few hundred.
RCVHWM = 1_000
#: Batches one replay may return (vLLM buffers 10 000 steps by default).
MAX_REPLAY = 20_000
#: Bytes one replay may return; beyond, the history is given up (not retried).
MAX_REPLAY_BYTES = 256 * 1024 * 1024
TICK = 0.25


class FeedState(enum.StrEnum):
    """Where a feed stands (``kvroute_kv_events_state``); every state but LIVE
    means its blocks are stale and policies use the approximate index."""

    LIVE = "live"
    #: The SUB socket is not connected (or the subscriber is not running).
    DISCONNECTED = "disconnected"
    #: The endpoint fails its health probes.
    UNHEALTHY = "unhealthy"
    #: A resync is due (a gap, a connect, a recovery) or the replay socket is not answering.
    RESYNCING = "resyncing"
    #: History was lost: the blocks are rebuilt from what comes next, for resync_grace.
    GRACE = "grace"
    #: The publisher claims more blocks than the index holds.
    OVERFLOW = "overflow"


class ErrorKind(enum.StrEnum):
    """What went wrong (``kvroute_kv_events_errors_total{kind}``)."""

    #: A batch kvroute could not read, live or replayed.
    DECODE = "decode"
    REPLAY_TIMEOUT = "replay_timeout"
    REPLAY_TOO_LARGE = "replay_too_large"
    #: The subscriber's task failed (a bug, or ZMQ refusing a URL) and was restarted.
    CRASH = "crash"


#: A resync's outcomes (``kvroute_kv_events_resyncs_total{result}``): a plan's
#: verdict, or failed (the replay socket did not answer).
RESYNC_RESULTS = (*(r.value for r in Resync), "failed")


class ReplayFailed(KVEventsError):
    """The replay socket did not answer in time (retried)."""


class ReplayTooLarge(KVEventsError):
    """The replay is beyond ``MAX_REPLAY`` batches or ``MAX_REPLAY_BYTES`` (given up)."""


def apply_batch(blocks: EndpointBlocks, batch: Batch) -> None:
    """Feed one batch's events to the index, in order. Events of other KV-cache
    groups than the first (hybrid models) are not indexed."""
    for event in batch.events:
        if isinstance(event, BlockStored):
            if event.group_idx not in (None, 0):
                blocks.skipped_total += len(event.block_hashes)
                continue
            parent = event.parent_block_hash
            blocks.stored(
                event.block_hashes,  # type: ignore[arg-type]  # ints once decoded
                parent,  # type: ignore[arg-type]
                event.token_ids,
                event.block_size,
                medium=event.medium,
                extra=event.extra,
            )
        elif isinstance(event, BlockRemoved):
            if event.group_idx not in (None, 0):
                continue
            blocks.removed(event.block_hashes, medium=event.medium)  # type: ignore[arg-type]
        elif isinstance(event, AllBlocksCleared):
            blocks.cleared()


class Subscriber:
    def __init__(
        self,
        endpoint_id: str,
        config: KVEventsConfig,
        blocks: EndpointBlocks,
        context: zmq.asyncio.Context,
        *,
        healthy: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.config = config
        self.blocks = blocks
        self._ctx = context
        self._healthy = healthy
        self._clock = clock
        self._limits = limits
        self._topic = config.topic.encode()
        self.tracker = SeqTracker()
        self.connected = False
        #: A resync is due (at ``_sync_at``); False once one succeeded.
        self._need_sync = True
        #: Why, when the blocks are not to be trusted meanwhile (None: a routine probe).
        self._sync_reason: str | None = "replaying"
        self._sync_at = 0.0
        self._synced_once = False
        #: Just after a resync, batches the replay already gave are expected again.
        self._just_synced = False
        self._was_healthy = True
        self._replay_down = False
        self._overflow = False
        self._grace_until = 0.0
        self._grace_reason = ""
        self._next_probe = 0.0
        # Status counters.
        self.batches = 0
        self.events = 0
        self.gaps = 0
        self.replays = 0
        self.restarts = 0
        self.error_counts = dict.fromkeys(ErrorKind, 0)
        self.resyncs = dict.fromkeys(RESYNC_RESULTS, 0)
        self.last_error: str | None = None
        self.last_event_at: float | None = None
        blocks.mark_stale("publisher not connected")

    @property
    def errors(self) -> int:
        return sum(self.error_counts.values())

    # -- the task ----------------------------------------------------------------

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, RCVHWM)
        sub.setsockopt(zmq.MAXMSGSIZE, self._limits.max_frame_bytes)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            sub.connect(self.config.endpoint)
            while True:
                ready = dict(await poller.poll(timeout=int(TICK * 1000)))
                if monitor in ready:
                    await self._on_monitor(monitor)
                if sub in ready:
                    for _ in range(DRAIN):
                        if not cast(int, sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                            break
                        self._on_live(await sub.recv_multipart())
                await self._tick()
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            self.connected = False
            self.blocks.mark_stale("subscriber stopped")

    async def _on_monitor(self, monitor: zmq.asyncio.Socket) -> None:
        event = parse_monitor_message(await monitor.recv_multipart())["event"]
        if event == zmq.EVENT_CONNECTED:
            self.connected = True
            self._request_sync("replaying")
        elif event == zmq.EVENT_DISCONNECTED:
            self.connected = False
        self._refresh()

    async def _tick(self) -> None:
        now = self._clock()
        healthy = self._healthy()
        if healthy and not self._was_healthy:
            self._request_sync("checking the publisher after the endpoint recovered")
        self._was_healthy = healthy
        if (
            not self._need_sync
            and self.config.replay_endpoint is not None
            and self.tracker.expected is not None
            and now >= self._next_probe
        ):
            self._request_sync(None)
        if self._need_sync and self.connected and healthy and now >= self._sync_at:
            await self._resync()
        self._refresh()

    def _request_sync(self, reason: str | None) -> None:
        """A resync now; ``reason``: why the blocks are stale until it succeeds
        (None: a routine probe, the blocks stay trusted)."""
        if not self._need_sync or self._sync_reason is None:
            self._sync_reason = reason
        self._need_sync = True
        self._sync_at = 0.0

    # -- live messages ---------------------------------------------------------------

    def _on_live(self, frames: list[bytes]) -> None:
        try:
            batch = decode(frames, self._limits)
        except KVEventsError as exc:
            self.record_error(ErrorKind.DECODE, str(exc))
            self._lose_history("a malformed event batch was dropped")
            return
        if not batch.topic.startswith(self._topic):
            return
        if self._need_sync and not self._synced_once:
            return  # the first resync will replay it
        verdict = self.tracker.check(batch.seq)
        if verdict is Verdict.APPLY:
            if self.tracker.expected is None and batch.seq == 0:
                self._grace_until = 0.0  # the publisher's whole history follows
            self._apply(batch)
            self._just_synced = False
        elif verdict is Verdict.GAP:
            if not self._need_sync:
                self.gaps += 1
                self._request_sync("replaying a gap")
        elif self._just_synced:
            pass  # already replayed
        elif verdict is Verdict.RESTART:
            self._restarted()
            self._apply(batch)
        else:
            # A stream going backwards that is not a restart at 0: ask the
            # replay socket who this publisher is.
            self._request_sync("sequence went backwards")

    def _apply(self, batch: Batch) -> None:
        apply_batch(self.blocks, batch)
        self.tracker.applied(batch)
        self.batches += 1
        self.events += len(batch.events)
        self.last_event_at = self._clock()
        if any(isinstance(e, AllBlocksCleared) for e in batch.events):
            self._overflow = False
            self._grace_until = 0.0
        if self.blocks.stale and self.blocks.stale_reason.startswith("publisher claims"):
            self._overflow = True

    def _restarted(self) -> None:
        self.restarts += 1
        self.blocks.cleared()
        self.tracker.reset()
        self._overflow = False
        self._grace_until = 0.0
        LOG.info({"event": "kv_publisher_restarted", "endpoint": self.endpoint_id})

    def _lose_history(self, reason: str) -> None:
        """What the engine holds is no longer known: start afresh from the next
        batch, stale for the grace period."""
        self.blocks.cleared()
        self.tracker.reset()
        self._grace_until = self._clock() + self.config.resync_grace
        self._grace_reason = reason
        self._overflow = False

    def record_error(self, kind: ErrorKind, message: str) -> None:
        self.error_counts[kind] += 1
        self.last_error = message[:200]
        LOG.warning(
            {"event": "kv_events_error", "endpoint": self.endpoint_id, "error": self.last_error}
        )

    # -- resync ---------------------------------------------------------------------

    async def _resync(self) -> None:
        now = self._clock()
        self._next_probe = now + self.config.probe_interval
        if self.config.replay_endpoint is None:
            # Nothing can say what was missed (on connect: before we came,
            # unless the first batch is the publisher's first).
            self._need_sync = False
            self._synced_once = True
            self._lose_history("no replay endpoint to fill a gap")
            return
        try:
            start = resync_start(self.tracker)
            plan = plan_resync(self.tracker, start, await self._replay(start))
            result = plan.verdict  # a restart's replay from 0 is still a restart
            if plan.verdict is Resync.RESTARTED:
                self._restarted()
                start = 0
                plan = plan_resync(self.tracker, 0, await self._replay(0))
        except ReplayFailed as exc:
            self.record_error(ErrorKind.REPLAY_TIMEOUT, str(exc))
            self.resyncs["failed"] += 1
            self._replay_down = True
            self._sync_at = now + min(self.config.probe_interval, self.config.replay_timeout)
            return
        except KVEventsError as exc:
            too_large = isinstance(exc, ReplayTooLarge)
            self.record_error(
                ErrorKind.REPLAY_TOO_LARGE if too_large else ErrorKind.DECODE, str(exc)
            )
            self.resyncs[Resync.PARTIAL.value] += 1
            self._replay_down = False
            self._need_sync = False
            self._synced_once = True
            self._lose_history(f"the replay was unusable ({type(exc).__name__})")
            return
        self._replay_down = False
        self.resyncs[result.value] += 1
        if plan.verdict is not Resync.RESUMED:
            # The publisher's whole buffer, from its first batch: start over.
            if len(self.blocks):
                self.blocks.cleared()
            self.tracker.reset(0)
            self._overflow = False
        for batch in plan.apply:
            self._apply(batch)
        if plan.verdict is Resync.PARTIAL:
            self._grace_until = now + self.config.resync_grace
            self._grace_reason = "the replay buffer did not reach back to the first batch"
        self._need_sync = False
        self._synced_once = True
        self._just_synced = True

    async def _replay(self, start: int) -> list[Batch]:
        assert self.config.replay_endpoint is not None
        self.replays += 1
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, self._limits.max_frame_bytes)
        out: list[Batch] = []
        size = 0
        try:
            dealer.connect(self.config.replay_endpoint)
            async with asyncio.timeout(self.config.replay_timeout):
                await dealer.send_multipart(replay_request(start))
                while True:
                    frames = await dealer.recv_multipart()
                    size += sum(len(f) for f in frames)
                    batch = decode_replay(frames, self._limits)
                    if batch is None:
                        return out
                    if batch.topic.startswith(self._topic):
                        out.append(batch)
                    if len(out) > MAX_REPLAY or size > MAX_REPLAY_BYTES:
                        raise ReplayTooLarge(f"replay beyond {len(out)} batches, {size} bytes")
        except TimeoutError as exc:
            raise ReplayFailed(f"no replay within {self.config.replay_timeout} s") from exc
        finally:
            dealer.close(linger=0)

    # -- staleness and status ---------------------------------------------------------

    def condition(self) -> tuple[FeedState, str | None]:
        """The feed's state, and why its blocks are stale (None when live)."""
        if not self.connected:
            return FeedState.DISCONNECTED, "publisher not connected"
        if not self._healthy():
            return FeedState.UNHEALTHY, "endpoint unhealthy"
        if self._replay_down:
            return FeedState.RESYNCING, "replay socket not answering"
        if self._need_sync and self._sync_reason is not None:
            return FeedState.RESYNCING, self._sync_reason
        if self._overflow:
            return (
                FeedState.OVERFLOW,
                self.blocks.stale_reason or "publisher claims too many blocks",
            )
        if self._clock() < self._grace_until:
            return FeedState.GRACE, self._grace_reason
        return FeedState.LIVE, None

    def stale_reason(self) -> str | None:
        return self.condition()[1]

    def _refresh(self) -> None:
        reason = self.stale_reason()
        if reason is None:
            if self.blocks.stale:
                self.blocks.mark_live()
        elif not self.blocks.stale or self.blocks.stale_reason != reason:
            self.blocks.mark_stale(reason)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "endpoint": self.config.endpoint,
            "replay_endpoint": self.config.replay_endpoint,
            "connected": self.connected,
            "last_seq": self.tracker.last,
            "last_event_age": None if self.last_event_at is None else now - self.last_event_at,
            "batches": self.batches,
            "events": self.events,
            "gaps": self.gaps,
            "replays": self.replays,
            "restarts": self.restarts,
            "errors": self.errors,
            "last_error": self.last_error,
            "state": self.condition()[0].value,
            "stale": self.blocks.stale,
            "stale_reason": self.blocks.stale_reason if self.blocks.stale else None,
            "blocks": len(self.blocks),
            "block_size": self.blocks.block_size,
            "stored": self.blocks.stored_total,
            "removed": self.blocks.removed_total,
            "skipped": self.blocks.skipped_total,
            "cleared": self.blocks.cleared_total,
        }

    def snapshot(self) -> FeedSnapshot:
        """The feed's numbers for /metrics."""
        state = self.condition()[0]
        blocks = self.blocks
        return FeedSnapshot(
            endpoint=self.endpoint_id,
            states=tuple((s.value, 1.0 if s is state else 0.0) for s in FeedState),
            batches=self.batches,
            events=self.events,
            gaps=self.gaps,
            replays=self.replays,
            resyncs=tuple(self.resyncs.items()),
            restarts=self.restarts,
            errors=tuple((kind.value, n) for kind, n in self.error_counts.items()),
            blocks=len(blocks),
            block_events=(
                ("stored", blocks.stored_total),
                ("removed", blocks.removed_total),
                ("skipped", blocks.skipped_total),
            ),
            clears=blocks.cleared_total,
        )
