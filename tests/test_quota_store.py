"""The quota stores' contract, against MemoryStore (a fake clock: exact numbers)
and RedisStore on a real redis-server (Redis's clock: numbers that depend on
elapsed time within ``Harness.tol``); then what only Redis has: several routers
sharing it, leases of dead routers, Redis crashing, hanging and coming back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.quota.base import (
    Budget,
    Lease,
    Plan,
    QuotaStore,
    QuotaUnavailable,
    Rate,
    RateCharge,
    Settlement,
    Verdict,
)
from router.quota.guard import GuardedStore
from router.quota.memory import MemoryStore, seconds_to_midnight
from router.quota.redis import RedisStore
from tests.redis_server import RedisServer

#: The fake wall clock's start: 30 s before a UTC midnight.
WALL0 = 20_000 * 86400 - 30.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: QuotaStore
    #: Let time pass: the fake clocks move, or (Redis) a real sleep.
    advance: Callable[[float], Awaitable[None]]
    #: The Unix time the store's budgets see.
    wall: Callable[[], float]
    #: Seconds of slack on numbers that depend on time elapsed between calls.
    tol: float
    #: How much longer a test's periods are on a real clock (Redis), so that the
    #: few calls between two checks stay a small part of a unit's refill.
    scale: float = 1.0

    def approx(self, value: float) -> Any:
        return pytest.approx(value, abs=self.tol)


@pytest.fixture(params=["memory", "redis"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock, wall = FakeClock(1000.0), FakeClock(WALL0)

        async def advance(seconds: float) -> None:
            clock.now += seconds
            wall.now += seconds

        yield Harness(MemoryStore(clock, wall), advance, wall, 1e-9)
        return
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    async with server:
        store = RedisStore(server.url, "test:", lease_ttl=5.0)
        try:
            # 0.3 s: a loaded machine's calls (this process's loop included) take
            # that long; the tests' tokens cost 0.6 s or more, so one still shows.
            yield Harness(store, asyncio.sleep, time.time, 0.3, scale=10.0)
        finally:
            await store.close()


def rpm(limit: int = 60, cost: int = 1, key: str = "rpm:acme", period: float = 60.0) -> RateCharge:
    return RateCharge(key, Rate(limit, period), cost)


def remaining(v: Verdict) -> tuple[int, ...]:
    return tuple(s.remaining for s in v.rates)


# --- the contract, on both stores -------------------------------------------


async def test_burst_of_the_whole_limit_then_refusal(h: Harness) -> None:
    plan = Plan(rates=(rpm(60),))
    started = h.wall()
    for i in range(60):
        v = await h.store.admit(plan)
        assert v.admitted and v.refused is None and v.retry_after == 0
        assert remaining(v) == (59 - i,)
    v = await h.store.admit(plan)
    # Redis's clock runs during the burst (0.28 s of 60 calls at a load
    # average of 24 once): what refilled meanwhile shortens both waits.
    elapsed = h.wall() - started
    assert elapsed < 1.0  # else a unit refilled and the 61st was rightly admitted
    assert (v.admitted, v.refused, v.refused_rate) == (False, "rate", 0)
    assert 1.0 - elapsed - h.tol <= v.retry_after <= 1.0 + h.tol
    assert remaining(v) == (0,)
    assert v.rates[0].limit == 60
    assert 60.0 - elapsed - h.tol <= v.rates[0].reset <= 60.0 + h.tol
    assert v.in_flight is None and v.budget_used is None


async def test_refills_one_unit_per_period_over_limit(h: Harness) -> None:
    k = h.scale
    plan = Plan(rates=(rpm(5, period=1.0 * k),))  # one unit every 0.2 s (x k)
    assert [(await h.store.admit(plan)).admitted for _ in range(6)] == [True] * 5 + [False]
    await h.advance(0.25 * k)
    v = await h.store.admit(plan)
    assert v.admitted and remaining(v) == (0,)
    v = await h.store.admit(plan)
    assert not v.admitted and v.retry_after == h.approx(0.15 * k)


async def test_token_costs_and_settling_refunds_and_extra(h: Harness) -> None:
    tpm = RateCharge("tpm:acme", Rate(100, 60.0), 30)  # 0.6 s per token
    plan = Plan(rates=(tpm,))
    assert [remaining(await h.store.admit(plan)) for _ in range(3)] == [(70,), (40,), (10,)]
    v = await h.store.admit(plan)
    assert not v.admitted and v.retry_after == h.approx(12.0)  # 20 tokens short
    assert v.rates[0].reset == h.approx(54.0)

    await h.store.settle(plan, Settlement(deltas=(-20,)))  # used 10 of the 30
    v = await h.store.peek(plan)
    assert remaining(v) == (30,) and v.rates[0].reset == h.approx(42.0)
    await h.store.settle(plan, Settlement(deltas=(5,)))  # used 35
    assert remaining(await h.store.peek(plan)) == (25,)
    await h.store.settle(plan, Settlement(deltas=(-10_000,)))  # never below now
    v = await h.store.peek(plan)
    assert remaining(v) == (100,) and v.rates[0].reset == 0.0


async def test_all_or_nothing_when_a_later_rate_refuses(h: Harness) -> None:
    plan = Plan(rates=(rpm(2), RateCharge("tpm:acme", Rate(100, 60.0), 60)))
    assert remaining(await h.store.admit(plan)) == (1, 40)
    v = await h.store.admit(plan)
    assert (v.admitted, v.refused, v.refused_rate) == (False, "rate", 1)
    assert v.retry_after == h.approx(12.0)
    assert remaining(v) == (1, 40)
    assert remaining(await h.store.peek(plan)) == (1, 40)  # the rpm was not charged


async def test_the_rate_freeing_up_last_is_named(h: Harness) -> None:
    slow = RateCharge("per-minute", Rate(1, 60.0), 1)
    fast = RateCharge("per-10s", Rate(1, 10.0), 1)
    assert (await h.store.admit(Plan(rates=(fast, slow)))).admitted
    for plan, index in ((Plan(rates=(fast, slow)), 1), (Plan(rates=(slow, fast)), 0)):
        v = await h.store.admit(plan)
        assert (v.refused, v.refused_rate) == ("rate", index)
        assert v.retry_after == h.approx(60.0)


async def test_a_cost_above_the_whole_limit_is_refused_and_charges_nothing(h: Harness) -> None:
    plan = Plan(rates=(rpm(10, cost=11),))
    v = await h.store.admit(plan)
    assert (v.admitted, v.refused, v.retry_after) == (False, "rate", 60.0)
    assert remaining(v) == (10,) and v.rates[0].reset == 0.0
    same_key_twice = Plan(rates=(rpm(10, cost=6), rpm(10, cost=6)))
    assert (await h.store.admit(same_key_twice)).refused_rate == 1
    assert remaining(await h.store.peek(Plan(rates=(rpm(10),)))) == (10,)


async def test_lease_limit_release_and_no_charge_when_full(h: Harness) -> None:
    def plan(holder: str) -> Plan:
        return Plan(rates=(rpm(60),), lease=Lease("conc:acme", 2, holder))

    assert (await h.store.admit(plan("r1"))).in_flight == 1
    assert (await h.store.admit(plan("r2"))).in_flight == 2
    v = await h.store.admit(plan("r3"))
    assert (v.admitted, v.refused, v.retry_after, v.in_flight) == (False, "concurrency", 1.0, 2)
    assert remaining(v) == (58,)  # refused by the lease: the rate was not charged
    again = await h.store.admit(plan("r1"))  # a holder counts once
    assert again.admitted and again.in_flight == 2
    await h.store.settle(plan("r1"), Settlement(deltas=(0,)))
    assert (await h.store.peek(plan("r3"))).in_flight == 1
    v = await h.store.admit(plan("r3"))
    assert v.admitted and v.in_flight == 2 and remaining(v) == (56,)


async def test_budget_refuses_once_used_reaches_the_limit(h: Harness) -> None:
    expire_at = int(h.wall()) + 3600
    plan = Plan(rates=(rpm(60),), budget=Budget("day:acme:1", 1000, expire_at))
    v = await h.store.admit(plan)
    assert v.admitted and v.budget_used == 0
    await h.store.settle(plan, Settlement(deltas=(0,), budget_tokens=600))
    assert (await h.store.admit(plan)).budget_used == 600
    await h.store.settle(plan, Settlement(deltas=(0,), budget_tokens=400))
    v = await h.store.admit(plan)
    assert (v.admitted, v.refused, v.budget_used) == (False, "budget", 1000)
    # Until the next UTC midnight (30 s on the fake wall clock), the key expiring later.
    wall = h.wall()
    assert v.retry_after == h.approx(max(1.0, min(seconds_to_midnight(wall), expire_at - wall)))
    assert remaining(v) == (58,)
    # Tokens settled on a day whose key has expired are gone with it.
    past = Plan(budget=Budget("day:acme:0", 1000, int(h.wall()) - 1))
    await h.store.settle(past, Settlement(deltas=(), budget_tokens=5000))
    assert (await h.store.admit(past)).budget_used == 0


async def test_peek_charges_nothing_and_reports_counters(h: Harness) -> None:
    plan = Plan(
        rates=(rpm(60, cost=5),),
        lease=Lease("conc:acme", 1, "r1"),
        budget=Budget("day:acme:1", 100, int(h.wall()) + 3600),
    )
    assert (await h.store.admit(plan)).admitted
    await h.store.settle(plan, Settlement(deltas=(0,), budget_tokens=40))
    assert (await h.store.admit(plan)).admitted
    other = Plan(rates=plan.rates, lease=Lease("conc:acme", 1, "r2"), budget=plan.budget)
    for _ in range(2):
        v = await h.store.peek(other)
        assert (v.admitted, v.refused, v.in_flight, v.budget_used) == (False, "concurrency", 1, 40)
        assert remaining(v) == (50,) and v.rates[0].reset == h.approx(10.0)


async def test_reset_forgets_the_counters(h: Harness) -> None:
    budget = Budget("day:acme:1", 100, int(h.wall()) + 3600)
    plan = Plan(rates=(rpm(2),), lease=Lease("conc:acme", 1, "r1"), budget=budget)
    assert (await h.store.admit(plan)).admitted
    await h.store.settle(plan, Settlement(deltas=(1,), budget_tokens=100))
    assert (await h.store.admit(plan)).refused == "rate"
    await h.store.reset(("rpm:acme", "conc:acme", "day:acme:1"))
    v = await h.store.admit(Plan(rates=(rpm(2),), lease=Lease("conc:acme", 1, "r2"), budget=budget))
    assert (v.admitted, remaining(v), v.in_flight, v.budget_used) == (True, (1,), 1, 0)


async def test_plans_no_store_can_evaluate_are_errors(h: Harness) -> None:
    with pytest.raises(ValueError):
        await h.store.admit(Plan(rates=(rpm(0),)))
    with pytest.raises(ValueError):
        await h.store.admit(Plan(rates=(rpm(10, cost=-1),)))
    with pytest.raises(ValueError):
        await h.store.settle(Plan(rates=(rpm(10),)), Settlement(deltas=()))


# --- MemoryStore: what the fake clocks can show exactly ---------------------


async def test_memory_refill_and_budget_expiry_on_the_clocks() -> None:
    clock, wall = FakeClock(50.0), FakeClock(WALL0)
    store = MemoryStore(clock, wall)
    plan = Plan(rates=(rpm(60),), budget=Budget("day:acme:1", 10, int(WALL0) + 10))
    for _ in range(60):
        assert (await store.admit(plan)).admitted
    clock.now += 1.0
    v = await store.admit(plan)
    assert v.admitted and remaining(v) == (0,) and v.rates[0].reset == 60.0
    clock.now += 0.25
    v = await store.admit(plan)
    assert v.retry_after == 0.75
    await store.settle(plan, Settlement(deltas=(0,), budget_tokens=10))
    clock.now += 30.0
    v = await store.admit(plan)
    assert (v.refused, v.budget_used, v.retry_after) == ("budget", 10, 10.0)
    wall.now += 10.0
    v = await store.admit(plan)
    assert v.admitted and v.budget_used == 0


# --- RedisStore: what only a shared Redis has -------------------------------


async def test_redis_keys_are_prefixed_and_expire(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, "t1:", lease_ttl=2.0)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        budget = Budget("day:acme:1", 100, 0)
        plan = Plan(rates=(rpm(60),), lease=Lease("conc:acme", 1, "r1"), budget=budget)
        budget_plan = Plan(budget=Budget("day:acme:1", 100, int(await _server_time(raw)) + 600))
        assert (await store.admit(plan)).admitted
        await store.settle(budget_plan, Settlement(deltas=(), budget_tokens=7))
        assert sorted(await raw.keys("*")) == [b"t1:conc:acme", b"t1:day:acme:1", b"t1:rpm:acme"]
        assert 1000 < await raw.pttl("t1:rpm:acme") <= 2000  # TAT 1 s ahead, + 1 s margin
        assert 2000 < await raw.pttl("t1:conc:acme") <= 3000  # lease_ttl + 1 s margin
        short = RedisStore(redis_server.url, "t1:", lease_ttl=0.5)  # a replica's other config
        r2 = Plan(lease=Lease("conc:acme", 2, "r2"))
        assert (await short.admit(r2)).in_flight == 2
        await short.settle(r2, Settlement(deltas=()))
        await short.close()
        assert 2000 < await raw.pttl("t1:conc:acme") <= 3000  # not cut short
        assert 598 <= await raw.ttl("t1:day:acme:1") <= 600
        assert await raw.get("t1:day:acme:1") == b"7"
        await store.settle(plan, Settlement(deltas=(-1,)))  # whole again: the TAT goes
        assert sorted(await raw.keys("*")) == [b"t1:day:acme:1"]
    finally:
        await store.close()
        await raw.aclose()


async def _server_time(raw: aioredis.Redis) -> float:
    sec, usec = await raw.time()
    return float(sec + usec / 1e6)


async def test_two_routers_sharing_redis_never_exceed_a_limit(redis_server: RedisServer) -> None:
    routers = [RedisStore(redis_server.url, "shared:", lease_ttl=5.0) for _ in range(2)]
    try:
        plan = Plan(rates=(rpm(50),))
        verdicts = await asyncio.gather(*(routers[i % 2].admit(plan) for i in range(200)))
        assert sum(v.admitted for v in verdicts) == 50
        assert sorted(v.rates[0].remaining for v in verdicts if v.admitted) == list(range(50))

        leases = [
            routers[i % 2].admit(Plan(lease=Lease("conc:acme", 7, f"r{i}"))) for i in range(100)
        ]
        verdicts = await asyncio.gather(*leases)
        assert sum(v.admitted for v in verdicts) == 7
        assert max(v.in_flight or 0 for v in verdicts) == 7
    finally:
        for store in routers:
            await store.close()


async def test_a_dead_routers_leases_expire_a_live_ones_are_renewed(
    redis_server: RedisServer,
) -> None:
    # 1.5 s: a lease expires without renewals well inside the test, and the
    # renewals (every lease_ttl / 3) keep one on a loaded machine.
    dead = RedisStore(redis_server.url, "l:", lease_ttl=1.5)
    live = RedisStore(redis_server.url, "l:", lease_ttl=1.5)
    other = RedisStore(redis_server.url, "l:", lease_ttl=1.5)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert (await dead.admit(Plan(lease=Lease("conc:a", 1, "dead-1")))).admitted
        assert (await live.admit(Plan(lease=Lease("conc:b", 1, "live-1")))).admitted
        await dead.close()  # the router dies without settling
        assert (await other.peek(Plan(lease=Lease("conc:a", 1, "x")))).refused == "concurrency"
        await asyncio.sleep(2.0)  # past lease_ttl: only renewals keep a lease
        assert (await other.admit(Plan(lease=Lease("conc:a", 1, "x")))).admitted
        v = await other.admit(Plan(lease=Lease("conc:b", 1, "x")))
        assert (v.refused, v.in_flight) == ("concurrency", 1)
        assert live.held == 1
        assert await raw.zrange("l:conc:a", 0, -1) == [b"x"]  # the dead one was dropped
        await live.settle(Plan(lease=Lease("conc:b", 1, "live-1")), Settlement(deltas=()))
        assert live.held == 0
        assert (await other.admit(Plan(lease=Lease("conc:b", 1, "x")))).admitted
    finally:
        for store in (dead, live, other):
            await store.close()
        await raw.aclose()


async def test_renew_pushes_every_held_lease_in_one_pipeline(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("router.quota.redis.RENEW_CHUNK", 2)  # 5 leases: 3 script runs
    store = RedisStore(redis_server.url, "r:", lease_ttl=5.0)
    raw = aioredis.Redis.from_url(redis_server.url)
    plans = [Plan(lease=Lease(f"conc:{i}", 1, f"h{i}")) for i in range(5)]
    try:
        for plan in plans:
            assert (await store.admit(plan)).admitted
        before = [await raw.zscore(f"r:conc:{i}", f"h{i}") for i in range(5)]
        await asyncio.sleep(0.05)
        await store.renew()
        after = [await raw.zscore(f"r:conc:{i}", f"h{i}") for i in range(5)]
        moved = [a - b for a, b in zip(after, before, strict=True)]
        assert all(0.04 <= m < 1.0 for m in moved), moved
        await raw.delete("r:conc:0")  # reset by an admin: renewing does not revive it
        await store.renew()
        assert await raw.exists("r:conc:0") == 0
    finally:
        await store.close()
        await raw.aclose()


async def test_redis_secrets_stay_out_of_messages() -> None:
    store = RedisStore("redis://u:pw123@127.0.0.1:1/0?password=qpw456", "x:", 5.0)
    try:
        text = store.describe(ConnectionError("auth u:pw123 / qpw456 refused"))
        assert text == "ConnectionError: auth u:*** / *** refused"
        assert store.where == "redis://***@127.0.0.1:1/0?password=***"
    finally:
        await store.close()
    with pytest.raises(ValueError) as bad:
        RedisStore("http://u:pw123@127.0.0.1:1/0", "x:", 5.0)
    assert "pw123" not in str(bad.value) and bad.value.__cause__ is None


class CountingStore:
    """Counts the calls that reach the store (the guard must not make them while down)."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner
        self.calls = 0

    async def admit(self, plan: Plan) -> Verdict:
        self.calls += 1
        return await self.inner.admit(plan)

    async def peek(self, plan: Plan) -> Verdict:
        self.calls += 1
        return await self.inner.peek(plan)

    async def settle(self, plan: Plan, settlement: Settlement) -> None:
        self.calls += 1
        await self.inner.settle(plan, settlement)

    async def reset(self, keys: tuple[str, ...]) -> None:
        self.calls += 1
        await self.inner.reset(keys)

    async def close(self) -> None:
        await self.inner.close()

    def forget(self, plan: Plan) -> None:
        self.inner.forget(plan)


async def test_guard_redis_killed_fails_fast_then_reconnects(redis_server: RedisServer) -> None:
    redis_store = RedisStore(redis_server.url, "g:", lease_ttl=5.0)
    inner = CountingStore(redis_store)
    clock = FakeClock(100.0)
    guard = GuardedStore(inner, timeout=0.5, retry_interval=1.0, clock=clock)
    plan = Plan(rates=(rpm(60),), lease=Lease("conc:acme", 5, "r1"))
    try:
        assert (await guard.admit(plan)).admitted
        assert guard.up and redis_store.held == 1

        await redis_server.stop()
        async with asyncio.timeout(5):  # an error, not a hang
            with pytest.raises(QuotaUnavailable) as failed:
                await guard.admit(plan)
        assert (guard.up, guard.failures, guard.down_since, inner.calls) == (False, 1, 100.0, 2)
        assert guard.last_error is not None and guard.last_error.startswith("ConnectionError")
        for text in (guard.last_error, str(failed.value)):
            assert "s3cret" not in text and "redis://" not in text
        assert isinstance(failed.value.__cause__, Exception)

        clock.now += 0.9  # within retry_interval: refused without asking Redis
        for call in (guard.admit(plan), guard.peek(plan), guard.reset(("rpm:acme",))):
            with pytest.raises(QuotaUnavailable):
                await call
        with pytest.raises(QuotaUnavailable):
            await guard.settle(plan, Settlement(deltas=(0,)))
        assert inner.calls == 2 and guard.failures == 1
        assert redis_store.held == 0  # a settle that never reached Redis: not renewed

        await redis_server.start()  # same port, memory wiped
        clock.now += 0.1
        v = await guard.admit(plan)
        assert v.admitted and remaining(v) == (59,) and v.in_flight == 1
        assert (guard.up, guard.down_since, guard.failures, inner.calls) == (True, None, 1, 3)
    finally:
        await guard.close()


async def test_redis_restarted_while_idle_costs_no_failure(redis_server: RedisServer) -> None:
    guard = GuardedStore(RedisStore(redis_server.url, "g:", 5.0), timeout=0.5, retry_interval=1.0)
    plan = Plan(rates=(rpm(60),))
    try:
        assert (await guard.admit(plan)).admitted
        await redis_server.stop()
        await redis_server.start()
        # The pooled connection is dead: redis-py replaces it and retries once.
        v = await guard.admit(plan)
        assert v.admitted and remaining(v) == (59,)
        assert guard.failures == 0
    finally:
        await guard.close()


async def test_guard_redis_hung_times_out(redis_server: RedisServer) -> None:
    clock = FakeClock(0.0)
    guard = GuardedStore(
        # 1 s: a healthy admit (and the reconnect after the pause) on a loaded
        # machine stays under it; the paused server still times out.
        RedisStore(redis_server.url, "g:", 5.0),
        timeout=1.0,
        retry_interval=1.0,
        clock=clock,
    )
    plan = Plan(rates=(rpm(60),))
    try:
        assert (await guard.admit(plan)).admitted
        redis_server.pause()
        try:
            async with asyncio.timeout(5):
                with pytest.raises(QuotaUnavailable):
                    await guard.admit(plan)
        finally:
            redis_server.resume()
        assert not guard.up
        assert guard.last_error == "TimeoutError: no answer within 1.0 s"
        clock.now += 1.0
        v = await guard.admit(plan)
        # The timed-out admit reached Redis before it hung: it may have run.
        assert v.admitted and remaining(v) in ((58,), (57,))
        assert guard.up
    finally:
        await guard.close()


# --- GuardedStore on its own -------------------------------------------------


class ScriptedStore:
    """An inner store whose admits fail, hang or pass as the test says."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def admit(self, plan: Plan) -> Verdict:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise QuotaUnavailable("ConnectionError: refused")
        return Verdict(admitted=True, rates=())

    async def peek(self, plan: Plan) -> Verdict:
        return await self.admit(plan)

    async def settle(self, plan: Plan, settlement: Settlement) -> None:
        await self.admit(plan)

    async def reset(self, keys: tuple[str, ...]) -> None:
        await self.admit(Plan())

    async def close(self) -> None:
        pass


async def test_guard_probes_once_after_the_interval() -> None:
    inner, clock = ScriptedStore(), FakeClock(0.0)
    guard = GuardedStore(inner, timeout=1.0, retry_interval=2.0, clock=clock)
    inner.fail = True
    with pytest.raises(QuotaUnavailable):
        await guard.admit(Plan())
    assert (guard.up, guard.failures, guard.last_error) == (False, 1, "ConnectionError: refused")

    clock.now = 2.0
    inner.fail, inner.gate = False, asyncio.Event()
    probe = asyncio.create_task(guard.admit(Plan()))
    await asyncio.sleep(0)
    assert inner.calls == 2
    with pytest.raises(QuotaUnavailable):  # one probe at a time: the others fail fast
        await guard.admit(Plan())
    assert inner.calls == 2
    inner.gate.set()
    assert (await probe).admitted
    assert guard.up and guard.failures == 1
    assert (await guard.admit(Plan())).admitted and inner.calls == 3

    inner.fail = True  # a failed probe waits out another interval
    with pytest.raises(QuotaUnavailable):
        await guard.admit(Plan())
    clock.now = 3.9
    with pytest.raises(QuotaUnavailable):
        await guard.admit(Plan())
    assert inner.calls == 4 and guard.down_since == 2.0 and guard.failures == 2


async def test_guard_counts_a_timeout_as_a_failure() -> None:
    inner = ScriptedStore()
    inner.gate = asyncio.Event()  # never set: a hung store
    guard = GuardedStore(inner, timeout=0.05, retry_interval=1.0)
    with pytest.raises(QuotaUnavailable) as failed:
        await guard.settle(Plan(), Settlement(deltas=()))
    assert isinstance(failed.value.__cause__, TimeoutError)
    assert guard.last_error == "TimeoutError: no answer within 0.05 s"
