"""A shared store down or slow: a short timeout per call, then no calls for a while.

The quota store and the response cache are both asked on the way of every
request, so a dead or hung Redis must not cost each request a timeout. A
CallGuard sits between a store and its callers: each call gets ``timeout``
seconds; after ``trip_after`` consecutive failures (one slow call in a burst
that saturated the router's own event loop is no outage) it answers
``unavailable`` at once, without touching the store, until ``retry_interval``
has passed; then one call probes the store again (others keep failing fast
meanwhile), and a success closes the outage.

A failure is a timeout or the store's own ``unavailable`` exception; any other
exception (a caller's mistake, a cancelled request) passes through and neither
trips nor closes anything. What a failure means for the request (serve without
the cache, admit anyway, refuse with 503) is the caller's, not the guard's.

Time comes from ``clock`` so tests drive the interval exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class CallGuard:
    """Calls to one store behind a per-call timeout and a retry interval after failures."""

    def __init__(
        self,
        what: str,
        unavailable: type[Exception],
        timeout: float,
        retry_interval: float,
        *,
        trip_after: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The store in a message, e.g. "quota store".
        self.what = what
        #: Raised when the guard refuses or a call times out; the store's own
        #: instances of it count as failures. Built from one message string.
        self.unavailable = unavailable
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.trip_after = trip_after
        self._clock = clock
        #: Failed calls since start (for metrics).
        self.failures = 0
        #: The latest failure: a class name and a short text (no URL).
        self.last_error: str | None = None
        #: ``clock()`` at the first failure of the current outage; None while up.
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._probing = False
        #: Consecutive failures (reset by a success).
        self._streak = 0

    @property
    def up(self) -> bool:
        """False from the failure that trips the guard until a call succeeds again."""
        return self.down_since is None

    async def call(self, fn: Callable[[], Awaitable[T]], *, within: float | None = None) -> T:
        """``fn()``'s result, or ``unavailable`` if the guard is down, the call
        takes longer than ``within`` seconds (default: ``timeout``) or the
        store raised ``unavailable``.

        ``fn`` is a factory, not an awaitable: while down, the call is never
        even created (no coroutine left un-awaited). ``within`` is for the
        rare call that is long by nature (purging a whole cache), which the
        per-request timeout would cut short."""
        limit = self.timeout if within is None else within
        probe = False
        if self.down_since is not None:
            now = self._clock()
            if now < self._retry_at or self._probing:
                raise self.unavailable(
                    f"{self.what} down for {now - self.down_since:.1f} s ({self.last_error})"
                )
            probe = self._probing = True
        try:
            async with asyncio.timeout(limit):
                result = await fn()
        except TimeoutError as exc:
            self._failed(f"TimeoutError: no answer within {limit} s")
            raise self.unavailable(self.last_error) from exc
        except self.unavailable as exc:
            self._failed(str(exc)[:200])
            raise
        finally:
            if probe:
                self._probing = False
        self.down_since = None
        self._streak = 0
        return result

    def _failed(self, error: str) -> None:
        now = self._clock()
        self.failures += 1
        self._streak += 1
        self.last_error = error
        if self.down_since is None and self._streak < self.trip_after:
            return  # not (yet) an outage: the next call tries the store again
        if self.down_since is None:
            self.down_since = now
        self._retry_at = now + self.retry_interval

    def status(self) -> dict[str, Any]:
        """For /admin and metrics: whether the store answers, and its latest failure."""
        return {"up": self.up, "failures": self.failures, "last_error": self.last_error}
