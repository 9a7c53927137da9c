"""Redis down or slow: a short timeout per call, then no calls for a while.

Every request asks the quota store before it is routed, so a dead or hung Redis
must not cost each request a timeout. After ``trip_after`` consecutive failures
(a timeout or QuotaUnavailable; one slow call in a burst that saturated the
router's own event loop is no outage) the guard answers QuotaUnavailable at
once, without touching the store, until ``retry_interval`` has passed; then
one call probes the store again (others keep failing fast meanwhile), and a
success closes the gap. What a
failure means for the request (admit anyway or refuse with 503) is the caller's
``on_failure``, not the guard's; a failed settle is the caller's to swallow too.

Time comes from ``clock`` so tests drive the interval exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, runtime_checkable

from router.config import QuotaConfig
from router.quota.base import Plan, QuotaStore, QuotaUnavailable, Settlement, Verdict

T = TypeVar("T")


@runtime_checkable
class ForgetsLeases(Protocol):
    """A store that renews the leases it holds (RedisStore) and must be told to
    stop when their settle never reaches it, or they would never expire."""

    def forget(self, plan: Plan) -> None: ...


class GuardedStore:
    """``inner`` behind a per-call timeout and a retry interval after failures."""

    @classmethod
    def from_config(cls, inner: QuotaStore, cfg: QuotaConfig) -> GuardedStore:
        return cls(inner, cfg.timeout, cfg.retry_interval, trip_after=cfg.trip_after)

    def __init__(
        self,
        inner: QuotaStore,
        timeout: float,
        retry_interval: float,
        clock: Callable[[], float] = time.monotonic,
        trip_after: int = 1,
    ) -> None:
        self.inner = inner
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._clock = clock
        #: Failed calls since start (for metrics).
        self.failures = 0
        #: The latest failure: a class name and a short text (no URL).
        self.last_error: str | None = None
        #: ``clock()`` at the first failure of the current outage; None while up.
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._probing = False
        self.trip_after = trip_after
        #: Consecutive failures (reset by a success).
        self._streak = 0

    @property
    def up(self) -> bool:
        """False from a failure until a call succeeds again."""
        return self.down_since is None

    async def admit(self, plan: Plan) -> Verdict:
        return await self._call(lambda: self.inner.admit(plan))

    async def peek(self, plan: Plan) -> Verdict:
        return await self._call(lambda: self.inner.peek(plan))

    async def settle(self, plan: Plan, settlement: Settlement) -> None:
        try:
            await self._call(lambda: self.inner.settle(plan, settlement))
        except QuotaUnavailable:
            if isinstance(self.inner, ForgetsLeases):
                self.inner.forget(plan)  # maybe never reached: let the lease expire
            raise

    async def reset(self, keys: tuple[str, ...]) -> None:
        await self._call(lambda: self.inner.reset(keys))

    async def close(self) -> None:
        await self.inner.close()

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        probe = False
        if self.down_since is not None:
            now = self._clock()
            if now < self._retry_at or self._probing:
                raise QuotaUnavailable(
                    f"quota store down for {now - self.down_since:.1f} s ({self.last_error})"
                )
            probe = self._probing = True
        try:
            async with asyncio.timeout(self.timeout):
                result = await call()
        except TimeoutError as exc:
            self._failed(f"TimeoutError: no answer within {self.timeout} s")
            raise QuotaUnavailable(self.last_error) from exc
        except QuotaUnavailable as exc:
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
