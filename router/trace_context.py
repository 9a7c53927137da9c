"""W3C Trace Context (level 1), sans-I/O: ``traceparent`` and ``tracestate``
in, a validated ``TraceContext`` out, and the headers kvroute sends upstream.

    client headers ──parse──> TraceContext | None   (None: absent or invalid)
                                  │ or new_trace()    (every request has one)
                                  └──> traceparent / tracestate upstream

A client's trace headers never go upstream as they came: they are parsed,
checked and written anew (always version 00). An invalid ``traceparent``
starts a new trace and drops the ``tracestate`` with it, as the
specification asks; an invalid ``tracestate`` alone is dropped. Neither ever
fails the request.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
#: A higher version may append fields; past this, a header is not read at all.
MAX_TRACEPARENT = 512
#: The specification's bounds on ``tracestate``.
MAX_TRACESTATE = 512
MAX_MEMBERS = 32
#: Level 1 defines only the sampled flag; the other bits are sent as zero.
SAMPLED = 0x01

_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\x00-\x1f\x7f]*)?"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: One list member: a key (simple, or tenant@system), "=", a value.
_MEMBER = re.compile(
    r"(?P<key>[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A request's place in a trace: what the access log shows and what the
    backend is sent. ``span_id`` is the parent-id the backend sees: the
    client's own (kvroute passive, tracing off), or kvroute's span's."""

    trace_id: str
    span_id: str
    flags: int = 0
    #: The client's ``tracestate``, validated and normalised (None: none).
    state: str | None = None
    #: Sent to the backend. False only for a trace kvroute made up while not
    #: recording spans: an unsampled parent would switch the backend's own
    #: tracing off (OpenTelemetry samplers follow their parent), so the id
    #: stays in kvroute's access log and the backend starts its own trace.
    propagate: bool = True

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags & SAMPLED:02x}"

    def headers(self) -> dict[str, str]:
        out = {"traceparent": self.traceparent()}
        if self.state is not None:
            out["tracestate"] = self.state
        return out


def new_trace(rng: random.Random | None = None) -> TraceContext:
    """A fresh trace (not sampled: nothing records it unless tracing is on),
    its ids from one read of 24 random bytes."""
    ids = (os.urandom(24) if rng is None else rng.randbytes(24)).hex()
    trace_id, span_id = ids[:32], ids[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # 2^-64: still not valid
        return new_trace(rng)
    return TraceContext(trace_id, span_id, propagate=False)


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent id, flags) of a valid ``traceparent``, else None."""
    if len(value) > MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version 00 is exactly 55 characters; a later one may add "-..." fields.
    if version == "ff" or (rest and version == "00"):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, int(flags, 16)


def parse_tracestate(values: Sequence[str]) -> str | None:
    """The ``tracestate`` headers (several are one list) as one normalised
    value, or None if empty or invalid (too long, too many members, a
    malformed or repeated key)."""
    if sum(len(v) for v in values) + len(values) - 1 > MAX_TRACESTATE:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        for member in value.split(","):
            member = member.strip(" \t")
            if not member:
                continue
            match = _MEMBER.fullmatch(member)
            if match is None or (key := match["key"]) in keys:
                return None
            keys.add(key)
            members.append(member)
    if not members or len(members) > MAX_MEMBERS:
        return None
    return ",".join(members)


def parse(headers: Sequence[tuple[bytes, bytes]]) -> TraceContext | None:
    """The client's trace context from its ``traceparent`` and ``tracestate``
    headers (as ASGI lists them), or None: absent, invalid, or repeated."""
    parents = [v for n, v in headers if n == TRACEPARENT]
    if len(parents) != 1:
        return None
    parsed = parse_traceparent(parents[0].decode("latin-1"))
    if parsed is None:
        return None
    states = [v.decode("latin-1") for n, v in headers if n == TRACESTATE]
    state = parse_tracestate(states) if states else None
    trace_id, span_id, flags = parsed
    return TraceContext(trace_id, span_id, flags & SAMPLED, state)
