"""The response cache's stores: one contract for MemoryCache (a fake clock:
exact expiry) and RedisCache on a real redis-server (real time: a 0.2 s TTL
and a short sleep); then what only each has (the LRU's byte bound and order;
Redis's key layout, locks shared by routers, its own eviction), and
GuardedCache with Redis crashing, hanging and coming back."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.cache.store import (
    ENTRY_OVERHEAD,
    CacheStore,
    CacheUnavailable,
    GuardedCache,
    MemoryCache,
    RedisCache,
    model_part,
)
from tests.redis_server import RedisServer

MAX_ENTRY = 1000
#: Model names a glob, a key separator or an encoding could confuse.
MODELS = ["m", "m*", "m?", "m:x", "m[1]", "m\\", "a", "a:b", "llama-3.1:8b", "ünïcode-模型"]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Harness:
    store: CacheStore
    #: Let time pass: the fake clock moves, or (Redis) a real sleep.
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock(1000.0)

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield Harness(MemoryCache(1 << 20, MAX_ENTRY, clock), advance)
        return
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    async with server:
        store = RedisCache(server.url, "t:", MAX_ENTRY)
        try:
            yield Harness(store, asyncio.sleep)
        finally:
            await store.close()


# --- the contract, on both stores -------------------------------------------


async def test_put_then_get_per_model_and_replace(h: Harness) -> None:
    d = digest("hello")
    assert await h.store.get("m", d) is None
    assert await h.store.put("m", d, b"one", 60.0)
    assert await h.store.get("m", d) == b"one"
    assert await h.store.get("m2", d) is None  # the model is part of the key
    assert await h.store.put("m", d, b"two", 60.0)
    assert await h.store.get("m", d) == b"two"
    assert await h.store.put("m", d, b"", 60.0)  # an empty entry is an entry
    assert await h.store.get("m", d) == b""


async def test_entries_expire_after_their_ttl(h: Harness) -> None:
    # Seconds long enough that a loaded machine's calls between put and get
    # stay well inside the entry's life (on Redis, a real clock).
    d = digest("short")
    assert await h.store.put("m", d, b"short", 1.5)
    assert await h.store.put("m", digest("long"), b"long", 60.0)
    await h.advance(0.05)
    assert await h.store.get("m", d) == b"short"
    await h.advance(1.6)
    assert await h.store.get("m", d) is None
    assert await h.store.get("m", digest("long")) == b"long"
    with pytest.raises(ValueError):
        await h.store.put("m", d, b"x", 0.0)


async def test_entries_over_max_entry_bytes_are_refused(h: Harness) -> None:
    d = digest("big")
    assert await h.store.put("m", d, b"x" * MAX_ENTRY, 60.0)
    assert not await h.store.put("m", d, b"y" * (MAX_ENTRY + 1), 60.0)
    assert await h.store.get("m", d) == b"x" * MAX_ENTRY  # the stored one stays
    assert not await h.store.put("m", digest("other"), b"y" * (MAX_ENTRY + 1), 60.0)
    assert await h.store.get("m", digest("other")) is None
    stats = h.store.stats()
    assert (stats["puts"], stats["rejected_too_large"]) == (1, 2)


async def test_purge_by_model_touches_only_that_model(h: Harness) -> None:
    for model in MODELS:
        for i in range(3):
            assert await h.store.put(model, digest(f"{model}/{i}"), model.encode(), 60.0)

    async def left() -> dict[str, int]:
        return {
            model: sum(
                [await h.store.get(model, digest(f"{model}/{i}")) is not None for i in range(3)]
            )
            for model in MODELS
        }

    gone: set[str] = set()
    # "m" before its look-alikes: a glob or prefix match would take them along.
    for model in ("m", "a", "m*", "m[1]", "m\\", "ünïcode-模型"):
        assert await h.store.purge(model) == 3, model
        gone.add(model)
        assert await left() == {m: 0 if m in gone else 3 for m in MODELS}
    assert await h.store.purge("m") == 0
    assert await h.store.purge("not configured") == 0
    assert await h.store.get("m:x", digest("m:x/0")) == b"m:x"


async def test_purge_all(h: Harness) -> None:
    for model in MODELS:
        assert await h.store.put(model, digest(model), b"x", 60.0)
    assert await h.store.purge(None) == len(MODELS)
    for model in MODELS:
        assert await h.store.get(model, digest(model)) is None
    assert await h.store.purge(None) == 0
    assert await h.store.put("m", digest("m"), b"again", 60.0)  # still usable
    assert await h.store.get("m", digest("m")) == b"again"


async def test_purge_does_not_count_expired_entries(h: Harness) -> None:
    assert await h.store.put("m", digest("1"), b"x", 0.2)
    assert await h.store.put("m", digest("2"), b"x", 60.0)
    await h.advance(0.3)
    assert await h.store.purge("m") == 1


async def test_lock_acquire_and_release(h: Harness) -> None:
    d = digest("lock")
    assert await h.store.acquire("m", d, 5.0)
    await h.store.release("m", d)
    await h.store.release("m", d)  # twice, or never taken: nothing happens
    await h.store.release("m", digest("never"))
    assert await h.store.acquire("m", d, 5.0)
    await h.store.release("m", d)


# --- MemoryCache: the LRU, exactly -------------------------------------------


def test_entry_size_counts_data_key_and_overhead() -> None:
    assert MemoryCache.entry_size("m", "ab", b"xyz") == 3 + 2 + 1 + ENTRY_OVERHEAD
    assert MemoryCache.entry_size("é", "", b"") == 2 + ENTRY_OVERHEAD  # UTF-8 bytes


async def test_memory_lru_evicts_least_recently_used_within_the_byte_bound() -> None:
    unit = MemoryCache.entry_size("m", digest("a"), b"x" * 100)
    cache = MemoryCache(3 * unit, MAX_ENTRY, FakeClock(0.0))

    async def put(name: str, size: int = 100) -> None:
        assert await cache.put("m", digest(name), b"x" * size, 60.0)

    async def present() -> list[str]:
        # Through the stats and the index, not get(): a get would reorder.
        return sorted(name for name in "abcdef" if ("m", digest(name)) in cache._entries)

    for name in "abc":
        await put(name)
    assert cache.stats()["bytes"] == 3 * unit and cache.stats()["entries"] == 3
    assert await cache.get("m", digest("a")) is not None  # a is now the most recent
    await put("d")  # one over: b, the least recently used, goes
    assert await present() == ["a", "c", "d"]
    assert cache.stats()["bytes"] == 3 * unit
    await put("c")  # a replace counts once and refreshes c: order a, d, c
    assert cache.stats()["bytes"] == 3 * unit and cache.stats()["evictions"] == 1
    # An entry as big as two: a and d go (the two least recent), c stays.
    await put("e", 2 * unit - (unit - 100))
    assert await present() == ["c", "e"]
    assert cache.stats()["bytes"] == 3 * unit
    await put("f", 1)  # a small one does not fit beside them: c goes
    assert await present() == ["e", "f"]
    assert cache.stats()["bytes"] == 2 * unit + MemoryCache.entry_size("m", digest("f"), b"x")
    assert cache.stats()["evictions"] == 4
    assert cache.stats()["bytes"] <= cache.max_bytes


async def test_memory_refuses_an_entry_bigger_than_the_whole_cache() -> None:
    cache = MemoryCache(ENTRY_OVERHEAD + 200, MAX_ENTRY, FakeClock(0.0))
    assert await cache.put("m", "", b"x" * 199, 60.0)
    assert not await cache.put("m", "d", b"x" * 500, 60.0)  # under max_entry_bytes, too big
    assert await cache.get("m", "") is not None  # and nothing was evicted for it
    assert cache.stats()["rejected_too_large"] == 1 and cache.stats()["evictions"] == 0


async def test_memory_drops_expired_entries_lazily() -> None:
    clock = FakeClock(0.0)
    unit = MemoryCache.entry_size("m", digest("a"), b"x")
    cache = MemoryCache(2 * unit, MAX_ENTRY, clock)
    assert await cache.put("m", digest("a"), b"x", 10.0)
    assert await cache.put("m", digest("b"), b"x", 20.0)
    clock.now = 9.999
    assert await cache.get("m", digest("a")) == b"x"
    clock.now = 10.0  # expired at exactly its TTL
    assert cache.stats()["entries"] == 2  # still held until met
    assert await cache.get("m", digest("a")) is None
    assert (cache.stats()["entries"], cache.stats()["expired"]) == (1, 1)
    assert await cache.put("m", digest("c"), b"x", 15.0)
    clock.now = 20.0  # b expired, c not: making room for d drops b as expired
    assert await cache.put("m", digest("d"), b"x", 5.0)
    stats = cache.stats()
    assert (stats["entries"], stats["expired"], stats["evictions"]) == (2, 2, 0)
    assert await cache.get("m", digest("c")) == b"x"


async def test_memory_stats_and_purge_keep_the_books() -> None:
    cache = MemoryCache(1 << 20, MAX_ENTRY, FakeClock(0.0))
    for model in ("a", "b"):
        for i in range(3):
            assert await cache.put(model, digest(str(i)), b"x" * 10, 60.0)
    assert not await cache.put("a", digest("big"), b"x" * (MAX_ENTRY + 1), 60.0)
    unit = MemoryCache.entry_size("a", digest("0"), b"x" * 10)
    assert cache.stats() == {
        "entries": 6,
        "bytes": 6 * unit,
        "max_bytes": 1 << 20,
        "evictions": 0,
        "expired": 0,
        "puts": 6,
        "rejected_too_large": 1,
    }
    assert await cache.purge("a") == 3
    assert (cache.stats()["entries"], cache.stats()["bytes"]) == (3, 3 * unit)
    assert cache._by_model.keys() == {"b"}  # an emptied model leaves no index behind
    assert await cache.purge(None) == 3
    assert (cache.stats()["entries"], cache.stats()["bytes"]) == (0, 0)
    assert await cache.acquire("a", digest("0"), 1.0) and await cache.acquire("a", digest("0"), 1.0)


# --- RedisCache: keys, locks, eviction ----------------------------------------


async def test_redis_key_layout_and_ttl(redis_server: RedisServer) -> None:
    store = RedisCache(redis_server.url, "kv:", MAX_ENTRY)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        d = digest("x")
        assert await store.put("llama:8b*", d, b"data", 1.5)
        assert await store.acquire("llama:8b*", d, 2.5)
        assert model_part("llama:8b*") == b"llama:8b*".hex()
        entry = f"kv:cache:{model_part('llama:8b*')}:{d}"
        lock = f"kv:cache-lock:{model_part('llama:8b*')}:{d}"
        assert sorted(await raw.keys("*")) == sorted([entry.encode(), lock.encode()])
        assert 1000 < await raw.pttl(entry) <= 1500
        assert 2000 < await raw.pttl(lock) <= 2500
        assert await store.purge(None) == 1  # locks are not entries
        assert await raw.exists(lock) == 1
    finally:
        await store.close()
        await raw.aclose()


async def test_redis_purge_stays_under_its_prefix_whatever_it_holds(
    redis_server: RedisServer,
) -> None:
    # Unescaped, "p*:cache:*" would match "p1:cache:..." and "p*x:..." too.
    stores = [RedisCache(redis_server.url, p, MAX_ENTRY, scan_count=2) for p in ("p*:", "p1:")]
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for store in stores:
            for i in range(5):  # 5 keys in batches of 2
                assert await store.put("m", digest(str(i)), b"x", 60.0)
        await raw.set("p*:other", b"not an entry")
        assert await stores[0].purge("m") == 5
        assert await stores[0].purge(None) == 0
        assert all([await stores[1].get("m", digest(str(i))) == b"x" for i in range(5)])
        assert await raw.get("p*:other") == b"not an entry"
        assert await stores[1].purge(None) == 5
    finally:
        for store in stores:
            await store.close()
        await raw.aclose()


async def test_redis_lock_is_shared_and_only_its_holder_releases_it(
    redis_server: RedisServer,
) -> None:
    a = RedisCache(redis_server.url, "l:", MAX_ENTRY)  # two routers
    b = RedisCache(redis_server.url, "l:", MAX_ENTRY)
    d = digest("q")
    try:
        assert await a.acquire("m", d, 5.0)
        assert not await b.acquire("m", d, 5.0)
        assert not await a.acquire("m", d, 5.0)  # not reentrant either
        assert await b.acquire("m2", d, 5.0)  # another model's entry: another lock
        await b.release("m", d)  # not b's: nothing happens
        assert not await b.acquire("m", d, 5.0)
        await a.release("m", d)
        assert await b.acquire("m", d, 1.5)

        assert not await a.acquire("m", d, 5.0)
        await asyncio.sleep(1.7)  # b died holding it: the TTL frees it
        assert await a.acquire("m", d, 5.0)
        await b.release("m", d)  # b's token is stale: a's lock stays (compare-and-delete)
        assert not await b.acquire("m", d, 5.0)
        await a.release("m", d)
        assert await b.acquire("m", d, 5.0)
    finally:
        await a.close()
        await b.close()


async def test_redis_evicts_entries_itself_and_info_reports_it(
    redis_server: RedisServer,
) -> None:
    store = RedisCache(redis_server.url, "e:", 200_000)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        used = (await store.info())["used_memory"]
        await raw.config_set("maxmemory", used + 1_000_000)
        await raw.config_set("maxmemory-policy", "volatile-lru")  # entries carry a TTL
        for i in range(30):  # 3 MB into 1 MB of room
            assert await store.put("m", digest(str(i)), b"x" * 100_000, 60.0)
        info = await store.info()
        assert info["maxmemory_policy"] == "volatile-lru"
        assert info["evicted_keys"] >= 15
        assert info["used_memory"] <= used + 1_100_000
        assert await store.get("m", digest("29")) is not None  # the newest stays
        assert store.stats() == {"puts": 30, "rejected_too_large": 0}
    finally:
        await store.close()
        await raw.aclose()


async def test_redis_errors_are_cache_unavailable_without_secrets(
    redis_server: RedisServer,
) -> None:
    store = RedisCache(redis_server.url.replace("s3cret", "wrong-s3cret"), "x:", MAX_ENTRY)
    try:
        with pytest.raises(CacheUnavailable) as denied:
            await store.get("m", digest("x"))
        assert "s3cret" not in str(denied.value) and "redis://" not in str(denied.value)
        assert isinstance(denied.value.__cause__, Exception)
    finally:
        await store.close()
    store = RedisCache("redis://u:pw123@127.0.0.1:1/0?password=qpw456", "x:", MAX_ENTRY)
    try:
        assert store.describe(OSError("u:pw123 / qpw456")) == "OSError: u:*** / ***"
        assert store.where == "redis://***@127.0.0.1:1/0?password=***"
        for call in (store.get("m", "d"), store.purge(None), store.acquire("m", "d", 1.0)):
            with pytest.raises(CacheUnavailable) as refused:
                await call
            assert "pw123" not in str(refused.value)
    finally:
        await store.close()
    with pytest.raises(ValueError) as bad:
        RedisCache("http://u:pw123@127.0.0.1:1/0", "x:", MAX_ENTRY)
    assert "pw123" not in str(bad.value) and bad.value.__cause__ is None


# --- GuardedCache --------------------------------------------------------------


class CountingCache:
    """Counts the calls that reach the store (the guard must not make them while down)."""

    def __init__(self, inner: RedisCache) -> None:
        self.inner = inner
        self.calls = 0

    async def get(self, model: str, digest: str) -> bytes | None:
        self.calls += 1
        return await self.inner.get(model, digest)

    async def put(self, model: str, digest: str, data: bytes, ttl: float) -> bool:
        self.calls += 1
        return await self.inner.put(model, digest, data, ttl)

    async def purge(self, model: str | None) -> int:
        self.calls += 1
        return await self.inner.purge(model)

    async def acquire(self, model: str, digest: str, ttl: float) -> bool:
        self.calls += 1
        return await self.inner.acquire(model, digest, ttl)

    async def release(self, model: str, digest: str) -> None:
        self.calls += 1
        await self.inner.release(model, digest)

    def forget(self, model: str, digest: str) -> None:
        self.inner.forget(model, digest)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    async def info(self) -> dict[str, Any]:
        self.calls += 1
        return await self.inner.info()

    async def close(self) -> None:
        await self.inner.close()


async def test_guard_redis_killed_fails_fast_then_recovers(redis_server: RedisServer) -> None:
    redis_cache = RedisCache(redis_server.url, "g:", MAX_ENTRY)
    inner = CountingCache(redis_cache)
    clock = FakeClock(100.0)
    guard = GuardedCache(inner, timeout=5.0, retry_interval=1.0, clock=clock)
    d = digest("x")
    try:
        assert await guard.put("m", d, b"x", 60.0)
        assert await guard.acquire("m", d, 5.0)
        assert guard.up and inner.calls == 2

        await redis_server.stop()
        with pytest.raises(CacheUnavailable) as failed:
            await guard.get("m", d)
        # Refused (a ConnectionError below), not the 5 s timeout.
        assert not isinstance(failed.value.__cause__, TimeoutError)
        assert (guard.up, inner.calls) == (False, 3)
        stats = guard.stats()
        assert (stats["up"], stats["failures"], stats["puts"]) == (False, 1, 1)
        assert stats["last_error"].startswith("ConnectionError")
        for text in (stats["last_error"], str(failed.value)):
            assert "s3cret" not in text and "redis://" not in text
        assert isinstance(failed.value.__cause__, Exception)

        clock.now += 0.9  # within retry_interval: refused without asking Redis
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: guard.get("m", d),
            lambda: guard.put("m", d, b"y", 60.0),
            lambda: guard.purge("m"),
            lambda: guard.acquire("m", d, 5.0),
            lambda: guard.release("m", d),
            guard.info,
        ]
        for call in calls:
            with pytest.raises(CacheUnavailable, match=r"cache store down for 0\.9 s"):
                await call()
        assert inner.calls == 3 and guard.guard.failures == 1
        assert redis_cache._tokens == {}  # a release that never reached Redis: forgotten

        await redis_server.start()  # same port, memory wiped
        clock.now += 0.1
        assert await guard.get("m", d) is None
        assert guard.up and inner.calls == 4
        assert await guard.acquire("m", d, 5.0)  # the old lock died with the data
        assert await guard.put("m", d, b"z", 60.0)
        assert await guard.get("m", d) == b"z"
    finally:
        await guard.close()


async def test_guard_redis_hung_times_out(redis_server: RedisServer) -> None:
    clock = FakeClock(0.0)
    guard = GuardedCache(
        # 1 s: a healthy call (and the reconnect after the pause) on a loaded
        # machine stays under it; the paused server still times out.
        RedisCache(redis_server.url, "g:", MAX_ENTRY),
        1.0,
        1.0,
        trip_after=2,
        clock=clock,
    )
    try:
        assert await guard.put("m", "d", b"x", 60.0)
        redis_server.pause()
        try:
            for up in (True, False):  # trips on the second failure in a row
                with pytest.raises(CacheUnavailable) as failed:
                    await guard.get("m", "d")
                assert isinstance(failed.value.__cause__, TimeoutError)
                assert guard.up is up
        finally:
            redis_server.resume()
        assert guard.guard.last_error == "TimeoutError: no answer within 1.0 s"
        with pytest.raises(CacheUnavailable):
            await guard.get("m", "d")
        clock.now += 1.0
        assert await guard.get("m", "d") == b"x"
        assert guard.up
    finally:
        await guard.close()


class SlowPurge(MemoryCache):
    async def purge(self, model: str | None) -> int:
        await asyncio.sleep(0.1)
        return await super().purge(model)


async def test_guard_gives_purge_its_own_timeout() -> None:
    guard = GuardedCache(SlowPurge(1 << 20, MAX_ENTRY), 0.05, 1.0, purge_timeout=5.0)
    assert await guard.put("m", "d", b"x", 60.0)
    assert await guard.purge(None) == 1
    assert guard.stats() == {
        **MemoryCache(1 << 20, MAX_ENTRY).stats(),
        "puts": 1,
        "up": True,
        "failures": 0,
        "last_error": None,
    }
    assert await guard.info() == {}
