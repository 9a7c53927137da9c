"""The placements message, sans I/O: one model's placements from one router.

msgpack (msgspec), arrays rather than maps::

    [1, router, sent_at, model, [[endpoint, hashes], ...]]

``sent_at``: the sender's wall clock (Unix seconds, finite, >= 0) as it
published, for the receiver's lag (``kvroute_placements_lag_seconds``;
across hosts as good as their clocks' agreement).

``hashes`` is the prompt's character-block hashes as little-endian unsigned
64-bit integers, 8 bytes each. Every size is bounded on decode (msgspec
checks them in C): Redis is the operators', but a message is still input,
and a bad one is dropped whole (``PlacementsError``), never half applied.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from policies.placements import MAX_HASHES, Placement

VERSION = 1
#: Placements in one message, at most (PlacementsConfig.max_batch's bound).
MAX_ENTRIES = 4096
#: Hashes in one message, at most (the publisher cuts its batches by it).
MAX_MESSAGE_HASHES = 262_144
#: Bytes of one message, at most: the hashes, and room for the names.
MAX_MESSAGE_BYTES = 8 * MAX_MESSAGE_HASHES + MAX_ENTRIES * 2 * 300
#: Characters of a router id, a model name, an endpoint id.
MAX_NAME = 256

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    endpoint: Name
    hashes: Annotated[bytes, msgspec.Meta(min_length=8, max_length=8 * MAX_HASHES)]


class _Message(msgspec.Struct, array_like=True, frozen=True):
    version: int
    router: Name
    sent_at: Annotated[float, msgspec.Meta(ge=0)]
    model: Name
    entries: Annotated[list[_Entry], msgspec.Meta(max_length=MAX_ENTRIES)]


class PlacementsError(ValueError):
    """A message kvroute cannot read; the whole message is dropped."""


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Message)


def _bytes(hashes: Sequence[int]) -> bytes:
    packed = array("Q", hashes)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


@dataclass(frozen=True, slots=True)
class Message:
    router: str
    #: The sender's wall clock as it published (Unix seconds).
    sent_at: float
    model: str
    placements: list[Placement]


def encode(router: str, sent_at: float, model: str, placements: list[Placement]) -> bytes:
    entries = [_Entry(p.endpoint_id, _bytes(p.hashes)) for p in placements]
    return _ENCODER.encode(_Message(VERSION, router, sent_at, model, entries))


def decode(data: bytes) -> Message:
    """One message, whole, or ``PlacementsError``."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise PlacementsError(f"message of {len(data)} bytes (at most {MAX_MESSAGE_BYTES})")
    try:
        message = _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise PlacementsError(f"undecodable: {str(exc)[:200]}") from None
    if message.version != VERSION:
        raise PlacementsError(f"version {message.version} (kvroute reads {VERSION})")
    if not math.isfinite(message.sent_at):
        raise PlacementsError("sent_at is not a finite time")
    out = []
    for entry in message.entries:
        if len(entry.hashes) % 8:
            raise PlacementsError("hashes are not whole 8-byte values")
        hashes = array("Q")
        hashes.frombytes(entry.hashes)
        if sys.byteorder != "little":
            hashes.byteswap()
        out.append(Placement(entry.endpoint, hashes))
    return Message(message.router, message.sent_at, message.model, out)
