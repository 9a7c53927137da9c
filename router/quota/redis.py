"""Counters shared by every router through Redis: one Lua script per call.

Each ``admit`` and each ``settle`` is one script run (EVALSHA), so a plan is
checked and charged atomically however many routers share the Redis, in one
round trip. The scripts mirror MemoryStore (memory.py) step by step; its
docstring lists the choices they share.

Time is the Redis server's (``TIME`` inside the scripts), never the router's:
replicas whose clocks disagree still agree on every TAT and lease expiry. It is
counted from ``EPOCH`` rather than 1970 so a double keeps sub-microsecond steps
(TATs are sums of many ``cost*T``).

Keys (all under the store's prefix):

* a rate: a string, its TAT, expiring once the TAT has passed (plus a margin),
  so an idle tenant costs no memory;
* a lease: a sorted set of holders scored by their expiry. A router that dies
  stops renewing its holders, and the next admit drops them once expired;
* a budget: an integer, added to at settle and expiring at ``expire_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from router.config import QuotaConfig
from router.quota.base import Plan, QuotaUnavailable, RateStatus, Refusal, Settlement, Verdict
from router.quota.memory import SLACK, check_plan, check_settlement
from router.redis_conn import RedisConn

LOG = logging.getLogger("kvroute.quota")
#: One script call waiting to be sent: script, keys, args, and where its reply goes.
_Call = tuple[AsyncScript, list[str], list[Any], "asyncio.Future[Any]"]
T = TypeVar("T")

#: Unix time the scripts count from (see the module docstring).
EPOCH = 1_700_000_000
#: Milliseconds a key outlives what it counts, so it never vanishes early.
MARGIN_MS = 1000
#: Seconds a settle waits to share a pipeline with the next admit.
SETTLE_DELAY = 0.005
#: Leases renewed per script run (one pipeline carries them all).
RENEW_CHUNK = 256

_PRELUDE = f"""
local EPOCH, SLACK, MARGIN_MS = {EPOCH}, {SLACK!r}, {MARGIN_MS}
local t = redis.call('TIME')
local sec, usec = tonumber(t[1]), tonumber(t[2])
local now = (sec - EPOCH) + usec / 1e6
local function num(x) return string.format('%.17g', x) end
-- Never shortens a key's life: a replica configured with a shorter lease_ttl
-- must not expire the leases of one with a longer one.
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

#: KEYS: n rate keys, then the lease key and the budget key when the plan has them.
#: ARGV: charge (1: admit, 0: peek), n, has_lease, has_budget, then per rate
#: limit period cost, then lease limit holder ttl, then budget limit expire_at.
#: Returns: refusal (0 none, 1 rate, 2 concurrency, 3 budget), refused rate
#: (1-based, 0 if none), retry_after, in_flight (-1: no lease), budget_used
#: (-1: no budget), then per rate remaining and reset. Floats go back as
#: strings: Redis would truncate a Lua number to an integer.
ADMIT = (
    _PRELUDE
    + """
local charge = ARGV[1] == '1'
local n = tonumber(ARGV[2])
local has_lease, has_budget = ARGV[3] == '1', ARGV[4] == '1'
local stored, tentative = {}, {}
local refused, refused_rate, wait = 0, 0, 0
for i = 1, n do
  local key, a = KEYS[i], 4 + 3 * (i - 1)
  local limit, period = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local cost = charge and tonumber(ARGV[a + 3]) or 0
  local step = period / limit
  if stored[key] == nil then
    stored[key] = tonumber(redis.call('GET', key)) or now
  end
  local base = tentative[key] or stored[key]
  if base < now then base = now end
  local new = base + cost * step
  if new - now > period + step * SLACK then
    local this_wait = new - now - period
    if cost * step > period + step * SLACK then this_wait = period end
    if refused == 0 or this_wait > wait then
      refused, refused_rate, wait = 1, i, this_wait
    end
  else
    tentative[key] = new
  end
end

local k, a = n + 1, 4 + 3 * n
local in_flight, budget_used = -1, -1
local lease_key, holder, ttl, adding
if has_lease then
  lease_key, holder = KEYS[k], ARGV[a + 2]
  local limit = tonumber(ARGV[a + 1])
  ttl = tonumber(ARGV[a + 3])
  k, a = k + 1, a + 3
  if charge then redis.call('ZREMRANGEBYSCORE', lease_key, '-inf', num(now)) end
  in_flight = redis.call('ZCOUNT', lease_key, '(' .. num(now), '+inf')
  local score = tonumber(redis.call('ZSCORE', lease_key, holder))
  adding = score == nil or score <= now
  if refused == 0 and adding and in_flight >= limit then
    refused, wait = 2, 1
  end
end
if has_budget then
  local limit, expire_at = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  budget_used = tonumber(redis.call('GET', KEYS[k])) or 0
  if refused == 0 and budget_used >= limit then
    local wall = sec + usec / 1e6
    wait = 86400 - (sec % 86400) - usec / 1e6
    if expire_at - wall < wait then wait = expire_at - wall end
    if wait < 1 then wait = 1 end
    refused = 3
  end
end

if refused == 0 and charge then
  for key, tat in pairs(tentative) do
    if tat > now then
      redis.call('SET', key, num(tat), 'PX', math.ceil((tat - now) * 1000) + MARGIN_MS)
    end
  end
  if has_lease then
    redis.call('ZADD', lease_key, num(now + ttl), holder)
    extend(lease_key, math.ceil(ttl * 1000) + MARGIN_MS)
    if adding then in_flight = in_flight + 1 end
  end
end

local out = {refused, refused_rate, num(wait), in_flight, budget_used}
for i = 1, n do
  local key, a = KEYS[i], 4 + 3 * (i - 1)
  local limit, period = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tat = stored[key]
  if refused == 0 then tat = tentative[key] end
  local used = tat - now
  if used < 0 then used = 0 end
  local remaining = math.floor((period - used) / (period / limit) + SLACK)
  if remaining < 0 then remaining = 0 elseif remaining > limit then remaining = limit end
  out[#out + 1] = remaining
  out[#out + 1] = num(used)
end
return out
"""
)

#: KEYS as for ADMIT. ARGV: n, has_lease, has_budget, then per rate limit period
#: delta, then the lease's holder, then the budget's tokens and expire_at.
SETTLE = (
    _PRELUDE
    + """
local n = tonumber(ARGV[1])
local has_lease, has_budget = ARGV[2] == '1', ARGV[3] == '1'
local moved = {}
for i = 1, n do
  local key, a = KEYS[i], 3 + 3 * (i - 1)
  local limit, period, delta = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if delta ~= 0 then
    local tat = moved[key] or tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    tat = tat + delta * period / limit
    if tat < now then tat = now end
    moved[key] = tat
  end
end
for key, tat in pairs(moved) do
  if tat > now then
    redis.call('SET', key, num(tat), 'PX', math.ceil((tat - now) * 1000) + MARGIN_MS)
  else
    redis.call('DEL', key)
  end
end
local k, a = n + 1, 3 + 3 * n
if has_lease then
  redis.call('ZREM', KEYS[k], ARGV[a + 1])
  k, a = k + 1, a + 1
end
if has_budget then
  local tokens = tonumber(ARGV[a + 1])
  if tokens > 0 then
    redis.call('INCRBY', KEYS[k], tokens)
    redis.call('EXPIREAT', KEYS[k], ARGV[a + 2])
  end
end
return 0
"""
)

#: KEYS: lease keys; ARGV: ttl, then the holder for each key. XX: a holder that
#: has already expired and been dropped (its slot maybe taken) is not revived.
RENEW = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', num(now + ttl), ARGV[i + 1]) == 1 then
    extend(key, math.ceil(ttl * 1000) + MARGIN_MS)
  end
end
return 0
"""
)


def _flag(value: bool) -> int:
    return 1 if value else 0


_REFUSALS: dict[int, Refusal | None] = {0: None, 1: "rate", 2: "concurrency", 3: "budget"}


class RedisStore:
    """The QuotaStore on Redis (``redis://``, ``rediss://`` or ``unix://``).

    Leases this store holds are renewed every ``lease_ttl / 3`` seconds by a
    background task (started on first use, stopped by ``close``), so only the
    slots of a router that stopped running expire. ``lease_ttl`` is not checked
    against the config's minimum: tests use a fraction of a second.
    """

    @classmethod
    def from_config(cls, cfg: QuotaConfig) -> RedisStore:
        if cfg.redis is None:
            raise ValueError("quotas.redis is not set")
        return cls(cfg.redis, cfg.key_prefix, cfg.lease_ttl)

    def __init__(
        self,
        url: str,
        prefix: str,
        lease_ttl: float,
        *,
        socket_timeout: float = 1.0,
        health_check_interval: int = 5,
        max_connections: int = 64,
    ) -> None:
        if not lease_ttl > 0:
            raise ValueError("lease_ttl must be positive")
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.conn = RedisConn(
            url,
            QuotaUnavailable,
            socket_timeout=socket_timeout,
            health_check_interval=health_check_interval,
            max_connections=max_connections,
        )
        self.where = self.conn.where
        self._client: Redis = self.conn.client
        self._admit = self._client.register_script(ADMIT)
        self._settle = self._client.register_script(SETTLE)
        self._renew = self._client.register_script(RENEW)
        #: (prefixed lease key, holder) of every lease admitted here and not settled.
        self._held: set[tuple[str, str]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        #: Script calls of this turn of the event loop, sent together (``_call``).
        self._batch: list[_Call] = []
        self._flush_handle: asyncio.Handle | None = None
        #: When the scheduled flush runs (loop time), None when none is.
        self._flush_at: float | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def admit(self, plan: Plan) -> Verdict:
        verdict = await self._evaluate(plan, charge=True)
        if verdict.admitted and plan.lease is not None:
            self._held.add((self.prefix + plan.lease.key, plan.lease.holder))
            self._start_renewer()
        return verdict

    async def peek(self, plan: Plan) -> Verdict:
        return await self._evaluate(plan, charge=False)

    async def _evaluate(self, plan: Plan, charge: bool) -> Verdict:
        check_plan(plan)
        keys = self._keys(plan)
        args: list[Any] = [
            _flag(charge),
            len(plan.rates),
            _flag(plan.lease is not None),
            _flag(plan.budget is not None),
        ]
        for rc in plan.rates:
            args += [rc.rate.limit, repr(float(rc.rate.period)), rc.cost]
        if plan.lease is not None:
            args += [plan.lease.limit, plan.lease.holder, repr(float(self.lease_ttl))]
        if plan.budget is not None:
            args += [plan.budget.limit, plan.budget.expire_at]
        reply = await self._call(self._admit, keys, args)
        refused = _REFUSALS[int(reply[0])]
        statuses = tuple(
            RateStatus(rc.rate.limit, int(reply[5 + 2 * i]), float(reply[6 + 2 * i]))
            for i, rc in enumerate(plan.rates)
        )
        return Verdict(
            admitted=refused is None,
            rates=statuses,
            refused=refused,
            refused_rate=int(reply[1]) - 1 if refused == "rate" else None,
            retry_after=float(reply[2]),
            in_flight=None if plan.lease is None else int(reply[3]),
            budget_used=None if plan.budget is None else int(reply[4]),
        )

    async def settle(self, plan: Plan, settlement: Settlement) -> None:
        # Before anything that may fail or be cancelled: a lease whose settle
        # is lost must expire, not be renewed for ever.
        self.forget(plan)
        check_settlement(plan, settlement)
        keys = self._keys(plan)
        args: list[Any] = [
            len(plan.rates),
            _flag(plan.lease is not None),
            _flag(plan.budget is not None),
        ]
        for rc, delta in zip(plan.rates, settlement.deltas, strict=True):
            args += [rc.rate.limit, repr(float(rc.rate.period)), delta]
        if plan.lease is not None:
            args.append(plan.lease.holder)
        if plan.budget is not None:
            args += [settlement.budget_tokens, plan.budget.expire_at]
        await self._call(self._settle, keys, args, urgent=False)

    def forget(self, plan: Plan) -> None:
        """Stop renewing ``plan``'s lease (it then expires after ``lease_ttl``).

        For a settle that cannot reach Redis (GuardedStore calls it when it
        refuses without trying)."""
        if plan.lease is not None:
            self._held.discard((self.prefix + plan.lease.key, plan.lease.holder))

    async def reset(self, keys: tuple[str, ...]) -> None:
        if keys:
            await self._guarded(self._client.delete(*(self.prefix + key for key in keys)))

    @property
    def held(self) -> int:
        """Leases held by this store (renewed in the background)."""
        return len(self._held)

    def _keys(self, plan: Plan) -> list[str]:
        keys = [self.prefix + rc.key for rc in plan.rates]
        if plan.lease is not None:
            keys.append(self.prefix + plan.lease.key)
        if plan.budget is not None:
            keys.append(self.prefix + plan.budget.key)
        return keys

    async def _call(
        self, script: AsyncScript, keys: list[str], args: list[Any], *, urgent: bool = True
    ) -> Any:
        """Run ``script``; calls made in the same turn of the event loop go to
        Redis together, as one pipeline: one write and one round trip for all
        of them. redis-py spends ~250 us of CPU per command sent alone on this
        machine, most of it writing to the socket; a batch of 16 costs a few
        times one (benchmarks/README.md, "overhead").

        A call that is not ``urgent`` (a settle: no client waits for it) waits
        up to ``SETTLE_DELAY`` for company: the next admit carries it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._batch.append((script, keys, args, future))
        if urgent:
            if self._flush_at is None or self._flush_at > loop.time():
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush_handle = loop.call_soon(self._flush)
                self._flush_at = loop.time()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(SETTLE_DELAY, self._flush)
            self._flush_at = loop.time() + SETTLE_DELAY
        return await future

    def _flush(self) -> None:
        self._flush_handle = self._flush_at = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        """EVALSHA for each call in one pipeline (not through redis-py's Script
        objects, which ask SCRIPT EXISTS before every pipeline); the calls that
        found their script missing (a restarted Redis) run again alone, which
        loads it."""
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                script, keys, args, _ = batch[i]
                replies[i] = await script(keys=keys, args=args)
        return replies

    async def _send(self, batch: list[_Call]) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                replies: list[Any] = [await self._guarded(script(keys=keys, args=args))]
            else:
                replies = await self._guarded(self._pipeline(batch))
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller gave up (the guard's timeout)
            if isinstance(reply, Exception):
                future.set_exception(QuotaUnavailable(self.describe(reply)))
            else:
                future.set_result(reply)

    async def _guarded(self, call: Awaitable[T]) -> T:
        return await self.conn.guarded(call)

    def describe(self, exc: BaseException) -> str:
        return self.conn.describe(exc)

    def _start_renewer(self) -> None:
        if self._closed or (self._renewer is not None and not self._renewer.done()):
            return
        self._renewer = asyncio.create_task(self._renew_forever(), name="quota-lease-renewer")

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if not self._held:
                continue
            try:
                await self.renew()
            except Exception as exc:  # the next round tries again; the task must live
                text = str(exc) if isinstance(exc, QuotaUnavailable) else self.describe(exc)
                LOG.warning(
                    "quota: renewing %d leases on %s failed (%s)", len(self._held), self.where, text
                )

    async def renew(self) -> None:
        """Push the expiry of every lease held here to ``lease_ttl`` from now
        (one pipeline: a script run per ``RENEW_CHUNK`` leases)."""
        held = sorted(self._held)
        if not held:
            return
        ttl = repr(float(self.lease_ttl))
        async with self._client.pipeline(transaction=False) as pipe:
            for i in range(0, len(held), RENEW_CHUNK):
                chunk = held[i : i + RENEW_CHUNK]
                await self._renew(
                    keys=[key for key, _ in chunk],
                    args=[ttl, *(holder for _, holder in chunk)],
                    client=pipe,
                )
            await self._guarded(pipe.execute())

    async def close(self) -> None:
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        self._held.clear()
        if self._sending:  # calls already sent: their answers, briefly
            await asyncio.wait(list(self._sending), timeout=1.0)
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
