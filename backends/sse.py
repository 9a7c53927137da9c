"""Server-sent events, incrementally: bytes in (split anywhere), data payloads out.

Handles ``data:`` with or without the space, LF or CRLF line ends, several
``data:`` lines in one event (joined with newlines), comments and other
fields (ignored). Pure code, no I/O (the h11 way).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from backends.base import UpstreamProtocolError

#: Bytes of one event (its unfinished line and the data lines before it), at
#: most: a backend that never ends a line or an event must not fill memory,
#: nor cost a copy of everything held at each chunk. A TGI or Triton stream's
#: events are a token each; the largest, TGI's last, holds the whole text.
MAX_EVENT_BYTES = 4 << 20


class SSEParser:
    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._held = 0  # bytes in ``_data``
        self.max_event_bytes = MAX_EVENT_BYTES if max_event_bytes is None else max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events' data in ``chunk`` (and what came before it).

        Raises ``UpstreamProtocolError`` for an event over ``max_event_bytes``."""
        if len(self._buffer) + len(chunk) + self._held > self.max_event_bytes and (
            b"\n" not in chunk
        ):
            raise self._too_long()
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        while True:
            nl = buffer.find(b"\n", start)
            if nl < 0:
                # One slice per feed, not one per line: a whole stream fed at
                # once (the response cache) stays linear in its length.
                self._buffer = buffer[start:]
                return events
            line = buffer[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
                    self._held = 0
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
                self._held += len(value)
                if self._held > self.max_event_bytes:
                    raise self._too_long()

    def _too_long(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"an SSE event longer than {self.max_event_bytes} bytes")

    def close(self) -> list[bytes]:
        """An event left open when the stream ended (no blank line after it)."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
            self._held = 0
        return events


def json_events(events: list[bytes]) -> Iterator[dict[str, Any]]:
    """The events that are JSON objects; anything else in a stream is skipped."""
    for data in events:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event
