"""The quota store behind a CallGuard (router/outage.py): Redis down or slow.

Every request asks the quota store before it is routed, so a dead or hung Redis
must not cost each request a timeout: after ``trip_after`` consecutive failures
the guard answers QuotaUnavailable at once, without touching the store, until
``retry_interval`` has passed, then probes with one call (outage.py has the
rules). What a failure means for the request (admit anyway or refuse with 503)
is the caller's ``on_failure``, not the guard's; a failed settle is the
caller's to swallow too.

Time comes from ``clock`` so tests drive the interval exactly.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, runtime_checkable

from router.config import QuotaConfig
from router.outage import CallGuard
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
        self.guard = CallGuard(
            "quota store",
            QuotaUnavailable,
            timeout,
            retry_interval,
            trip_after=trip_after,
            clock=clock,
        )

    # The guard's settings and state, under the names /admin and the tests use.

    @property
    def timeout(self) -> float:
        return self.guard.timeout

    @property
    def retry_interval(self) -> float:
        return self.guard.retry_interval

    @property
    def trip_after(self) -> int:
        return self.guard.trip_after

    @property
    def up(self) -> bool:
        """False from a failure until a call succeeds again."""
        return self.guard.up

    @property
    def failures(self) -> int:
        """Failed calls since start (for metrics)."""
        return self.guard.failures

    @property
    def last_error(self) -> str | None:
        """The latest failure: a class name and a short text (no URL)."""
        return self.guard.last_error

    @property
    def down_since(self) -> float | None:
        """``clock()`` at the first failure of the current outage; None while up."""
        return self.guard.down_since

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
        return await self.guard.call(call)
