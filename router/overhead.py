"""kvroute's own time on one request: ``x-kvroute-overhead-ms`` and
``kvroute_overhead_seconds``, measured without I/O on an injected clock.

    overhead = (response start sent - request received)
               - time receiving the body    the client's upload
               - time waiting on backends   every attempt, failed ones too: from
                                            sending the upstream request to its
                                            answer (a whole answer: its body; a
                                            stream: its first output; a failure:
                                            the error)
               - time queued for admission  capacity, not kvroute's cost (it has
                                            its own histogram)

What is left is kvroute's: parsing, authentication, quotas, the cache
lookup, routing and tokenizing the prompt, building the upstream request,
translating the answer, and the event loop's delays meanwhile. A cache hit
and an answer kvroute makes itself (an error) are all kvroute's. It is known
when the response starts, so a stream's header carries it too; what happens
after (relaying the rest of a stream) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER = b"x-kvroute-overhead-ms"


@dataclass(slots=True)
class Waits:
    """Seconds of a request that are not kvroute's (the upload, backends,
    the admission queue)."""

    total: float = 0.0
    #: When the backend wait under way began (None: none is).
    _since: float | None = None

    def begin(self, now: float) -> None:
        """An upstream request is being sent."""
        self._since = now

    def end(self, now: float) -> None:
        """Its answer (or failure) is in; a second call does nothing."""
        if self._since is not None:
            self.total += max(0.0, now - self._since)
            self._since = None

    def add(self, seconds: float) -> None:
        """Time spent elsewhere, measured by someone else (the admission queue)."""
        self.total += max(0.0, seconds)

    def own(self, start: float, now: float) -> float:
        """kvroute's own seconds from ``start`` to ``now``: never negative (a wait
        still open at ``now`` counts as ended then)."""
        open_wait = 0.0 if self._since is None else max(0.0, now - self._since)
        return max(0.0, now - start - self.total - open_wait)


def header_value(seconds: float) -> bytes:
    """Milliseconds, three decimals (a microsecond; finer is noise)."""
    return b"%.3f" % (seconds * 1000.0)
