"""vLLM's KV-cache events on the wire, sans I/O: frames in, batches out.

vLLM (``vllm/distributed/kv_events.py``, ``ZmqEventPublisher``) publishes each
engine step's events as one ZMQ multipart message on a PUB socket::

    [topic, seq (8 bytes, big-endian), payload (msgpack)]
    payload = [ts, [event, ...], data_parallel_rank?]          (an array, not a map)
    event   = {"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared", ...}

``seq`` counts batches from 0 in each publisher process. A ROUTER socket
replays its buffer (the last ``buffer_steps`` batches): a DEALER sends
``[b"", start_seq]`` and gets ``[b"", topic, seq, payload]`` for every buffered
batch with ``seq >= start_seq``, then ``[b"", b"", END_SEQ, b""]``.

Nothing from a publisher is trusted: frame sizes, event counts and types are
checked here, and anything else raises, as the most specific of::

    KVEventsError
    └── MalformedMessage        the frames are not a batch (count, seq, msgpack, schema)
        ├── MessageTooLarge     a frame beyond ``Limits.max_frame_bytes``
        └── TooManyEvents       a batch beyond ``Limits.max_events``

``SeqTracker`` is the order of batches as a small state machine (table in its
docstring); ``plan_resync`` decides what a replay says about the publisher.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Hashes vLLM publishes as bytes (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``)
#: become ints, so one engine's hashes are of one type.
Hash = int | bytes


class KVEventsError(Exception):
    """Base of the errors KV events can raise."""


class MalformedMessage(KVEventsError):
    pass


class MessageTooLarge(MalformedMessage):
    pass


class TooManyEvents(MalformedMessage):
    pass


# -- vLLM's structs (the fields kvroute reads; unknown fields are ignored) ----------


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None

    @property
    def extra(self) -> bool:
        """Whether the engine hashed more than the tokens (LoRA, multimodal, salt)."""
        return (
            self.lora_id is not None
            or self.lora_name is not None
            or any(k is not None for k in self.extra_keys or ())
        )


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared
EVENT_TYPES = {"BlockStored", "BlockRemoved", "AllBlocksCleared"}


class _Payload(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _Tagged(msgspec.Struct):
    type: str


_decode_payload = msgspec.msgpack.Decoder(_Payload).decode
_decode_event = msgspec.msgpack.Decoder(Event).decode
_decode_tag = msgspec.msgpack.Decoder(_Tagged).decode
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class Limits:
    """What one message may hold. vLLM's largest batch is one step's blocks:
    ``max_num_batched_tokens`` token ids and their hashes, far below these."""

    max_frame_bytes: int = 4 * 1024 * 1024
    max_events: int = 65_536


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Batch:
    topic: bytes
    seq: int
    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None
    #: Events of a type this version does not know (skipped).
    unknown: int = 0
    #: A digest of the payload: the same seq with another digest is another publisher.
    digest: int = 0


def _int_hash(h: Hash) -> int:
    return h if isinstance(h, int) else int.from_bytes(h, "big")


def _normalised(event: Event) -> Event:
    if isinstance(event, BlockStored):
        if all(isinstance(h, int) for h in event.block_hashes) and not isinstance(
            event.parent_block_hash, bytes
        ):
            return event
        parent = event.parent_block_hash
        return msgspec.structs.replace(
            event,
            block_hashes=[_int_hash(h) for h in event.block_hashes],
            parent_block_hash=None if parent is None else _int_hash(parent),
        )
    if isinstance(event, BlockRemoved) and not all(isinstance(h, int) for h in event.block_hashes):
        return msgspec.structs.replace(
            event, block_hashes=[_int_hash(h) for h in event.block_hashes]
        )
    return event


def decode_payload(
    topic: bytes, seq: int, payload: bytes, limits: Limits = DEFAULT_LIMITS
) -> Batch:
    if len(payload) > limits.max_frame_bytes:
        raise MessageTooLarge(f"payload of {len(payload)} bytes > {limits.max_frame_bytes}")
    try:
        raw = _decode_payload(payload)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(f"seq {seq}: payload is not an event batch: {exc}") from exc
    if len(raw.events) > limits.max_events:
        raise TooManyEvents(f"seq {seq}: {len(raw.events)} events > {limits.max_events}")
    events: list[Event] = []
    unknown = 0
    for item in raw.events:
        try:
            events.append(_normalised(_decode_event(item)))
        except msgspec.DecodeError as exc:
            try:
                tag = _decode_tag(item).type
            except msgspec.DecodeError:
                tag = None
            if tag is None or tag in EVENT_TYPES:
                raise MalformedMessage(f"seq {seq}: bad event: {exc}") from exc
            unknown += 1  # a newer vLLM's event type: ours still hold
    return Batch(topic, seq, raw.ts, tuple(events), raw.data_parallel_rank, unknown, hash(payload))


def _seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise MalformedMessage(f"sequence frame of {len(frame)} bytes, not 8")
    return int.from_bytes(frame, "big", signed=True)


def decode(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> Batch:
    """One PUB message: ``[topic, seq, payload]``."""
    if len(frames) != 3:
        raise MalformedMessage(f"{len(frames)} frames, not 3 (topic, seq, payload)")
    topic, seq_frame, payload = frames
    if len(topic) > 1024:
        raise MessageTooLarge(f"topic of {len(topic)} bytes")
    seq = _seq(seq_frame)
    if seq < 0:
        raise MalformedMessage(f"negative sequence number {seq}")
    return decode_payload(topic, seq, payload, limits)


def decode_replay(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> Batch | None:
    """One replay answer as a DEALER gets it (``[b"", topic, seq, payload]``; a
    REQ socket's come without the empty frame); None for the end marker."""
    if len(frames) == 4 and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3 and frames[1] == END_SEQ:
        return None
    return decode(frames, limits)


def encode(seq: int, events: Sequence[Event], ts: float, topic: bytes = b"") -> list[bytes]:
    """A PUB message as vLLM sends it (``data_parallel_rank`` 0, as vLLM sets it)."""
    payload = _encoder.encode([ts, list(events), 0])
    return [topic, seq.to_bytes(8, "big"), payload]


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to ask for batches from ``start_seq`` on."""
    return [b"", start_seq.to_bytes(8, "big")]


# -- order -------------------------------------------------------------------------


class Verdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    GAP = "gap"
    RESTART = "restart"


class SeqTracker:
    """The next sequence number expected, and what a received one means::

        expected   received          verdict
        None       any               APPLY      (no history: take it as it comes)
        n          n                 APPLY
        n          > n               GAP        (resync: ``resync_start``, ``plan_resync``)
        n > 0      0                 RESTART    (a new publisher process: clear)
        n          0 < s < n         DUPLICATE  (drop)

    ``applied(batch)`` moves ``expected`` past its seq and keeps its digest (to
    recognise the publisher in a later replay); ``reset(n)`` after a resync.
    """

    def __init__(self) -> None:
        self.expected: int | None = None
        self.last_digest: int | None = None

    @property
    def last(self) -> int | None:
        return None if self.expected is None or self.expected == 0 else self.expected - 1

    def check(self, seq: int) -> Verdict:
        n = self.expected
        if n is None or seq == n:
            return Verdict.APPLY
        if seq > n:
            return Verdict.GAP
        if seq == 0:
            return Verdict.RESTART
        return Verdict.DUPLICATE

    def applied(self, batch: Batch) -> None:
        self.expected = batch.seq + 1
        self.last_digest = batch.digest

    def reset(self, expected: int | None = None) -> None:
        self.expected = expected
        self.last_digest = None


class Resync(enum.Enum):
    #: The replay starts with the last batch applied: same publisher, apply the rest.
    RESUMED = "resumed"
    #: Nothing replayed (at ``expected`` or from 0): the publisher has no history.
    EMPTY = "empty"
    #: Another publisher process (the last batch applied is not its): clear, replay from 0.
    RESTARTED = "restarted"
    #: From 0, the replay starts later: what the engine stored before is unknown.
    PARTIAL = "partial"
    #: From 0, complete: apply it all.
    COMPLETE = "complete"


@dataclass(frozen=True, slots=True)
class ResyncPlan:
    verdict: Resync
    #: The replayed batches to apply, in order.
    apply: tuple[Batch, ...] = ()


def resync_start(tracker: SeqTracker) -> int:
    """Where to ask a replay to start: at the last batch applied (to check it is
    still the same publisher's), or 0 with no history."""
    last = tracker.last
    return 0 if last is None or tracker.last_digest is None else last


def plan_resync(tracker: SeqTracker, start: int, replayed: Sequence[Batch]) -> ResyncPlan:
    """What a replay from ``start`` (``resync_start``) says about the publisher."""
    if tracker.last_digest is not None and start == tracker.last:
        first = replayed[0] if replayed else None
        if first is not None and first.seq == start and first.digest == tracker.last_digest:
            return ResyncPlan(Resync.RESUMED, tuple(replayed[1:]))
        # The last batch applied is not in this publisher's buffer: either
        # another process (seq restarted), or the buffer moved past it.
        return ResyncPlan(Resync.RESTARTED)
    if not replayed:
        return ResyncPlan(Resync.EMPTY)
    verdict = Resync.COMPLETE if replayed[0].seq == 0 else Resync.PARTIAL
    return ResyncPlan(verdict, tuple(replayed))
