"""Where cached answers live: this process's memory, or a Redis the routers share.

An entry is opaque bytes (answer.py encodes and decodes them) under a key
``(model, digest)``: the configured model name (any characters) and the hex
sha256 of the canonical request (key.py). Every entry has a TTL; the store may
also drop entries for room, so a ``get`` after a ``put`` may miss.

* MemoryCache: an LRU bounded in bytes, per process. Nothing is shared, so
  ``acquire`` always succeeds: single flight within a process is the Cache
  stage's job.
* RedisCache: entries shared by every router on the Redis. Room is Redis's
  business: run it with ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (or
  ``volatile-lru`` when the Redis also holds keys that must not be evicted,
  such as quota counters: every cache entry carries a TTL, so ``volatile-*``
  policies evict them). With ``noeviction``, writes fail once it is full
  (CacheUnavailable, which the guard counts) until entries expire.
  ``acquire``/``release`` are a short lock so that, of several replicas
  missing the same entry at once, only one asks an engine.
* GuardedCache: a store behind a CallGuard (router/outage.py), so a dead or
  hung Redis costs a request at most one short timeout, then nothing.

Every failure to reach the store is CacheUnavailable; the caller serves the
request without the cache.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.outage import CallGuard
from router.redis_conn import RedisConn

T = TypeVar("T")

#: Bytes an entry costs MemoryCache beyond its data, digest and model name: the
#: OrderedDict slot and link, the key tuple, the entry record and the bytes and
#: str headers, the per-model index's slot (~270 measured on CPython 3.11).
ENTRY_OVERHEAD = 300


class CacheUnavailable(Exception):
    """The store could not answer (Redis down, slow or refusing)."""


class CacheStore(Protocol):
    async def get(self, model: str, digest: str) -> bytes | None:
        """The entry, or None if there is none (never stored, expired, evicted)."""
        ...

    async def put(self, model: str, digest: str, data: bytes, ttl: float) -> bool:
        """Store ``data`` for ``ttl`` seconds (replacing any entry); False,
        storing nothing, when it is larger than the store's ``max_entry_bytes``."""
        ...

    async def purge(self, model: str | None) -> int:
        """Remove ``model``'s entries (every entry if None); how many were removed."""
        ...

    async def acquire(self, model: str, digest: str, ttl: float) -> bool:
        """Take the lock on this entry for at most ``ttl`` seconds: False if
        another router holds it (it is fetching the answer)."""
        ...

    async def release(self, model: str, digest: str) -> None:
        """Give the lock back, if it is still ours."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters kept by this store object (no I/O): for /admin and metrics."""
        ...

    async def info(self) -> dict[str, Any]:
        """What only the store's server knows (Redis: its evictions and memory)."""
        ...

    async def close(self) -> None: ...


def _check_ttl(ttl: float) -> None:
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"a cache TTL must be a positive number of seconds, not {ttl!r}")


def _millis(ttl: float) -> int:
    """``ttl`` in whole milliseconds for PX, rounded up: never 0 (an error to Redis)."""
    return max(1, math.ceil(ttl * 1000))


# --- in this process ----------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    data: bytes
    expires_at: float
    #: What the entry counts against ``max_bytes`` (``MemoryCache.entry_size``).
    size: int


class MemoryCache:
    """An LRU of entries bounded in bytes, each with its own TTL.

    ``get`` and ``put`` are O(1) (an OrderedDict in use order, least recent
    first); ``purge(model)`` is O(that model's entries) through a per-model
    index of digests. An expired entry is a miss and is dropped when met
    (``get``, ``purge``, or at the LRU end when room is needed), not by a
    timer: until then it counts in ``entries`` and ``bytes``.
    """

    def __init__(
        self,
        max_bytes: int,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0 or max_entry_bytes < 0:
            raise ValueError("max_bytes must be positive and max_entry_bytes not negative")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        #: model -> digests of its entries.
        self._by_model: dict[str, set[str]] = {}
        self._bytes = 0
        self._evictions = 0
        self._expired = 0
        self._puts = 0
        self._rejected = 0

    @staticmethod
    def entry_size(model: str, digest: str, data: bytes) -> int:
        """Bytes an entry counts against ``max_bytes``: its data and key, plus
        ``ENTRY_OVERHEAD`` (an estimate of what Python spends on holding it)."""
        return len(data) + len(digest) + len(model.encode()) + ENTRY_OVERHEAD

    async def get(self, model: str, digest: str) -> bytes | None:
        key = (model, digest)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            self._remove(key)
            self._expired += 1
            return None
        self._entries.move_to_end(key)
        return entry.data

    async def put(self, model: str, digest: str, data: bytes, ttl: float) -> bool:
        _check_ttl(ttl)
        size = self.entry_size(model, digest, data)
        key = (model, digest)
        if len(data) > self.max_entry_bytes or size > self.max_bytes:
            # The old answer stays: this one is not worse, just not storable.
            self._rejected += 1
            return False
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(data, self._clock() + ttl, size)
        self._by_model.setdefault(model, set()).add(digest)
        self._bytes += size
        self._puts += 1
        self._make_room()
        return True

    def _make_room(self) -> None:
        """Drop least recently used entries until the bytes fit (the newest
        entry fits alone: ``put`` checked)."""
        now = self._clock()
        while self._bytes > self.max_bytes:
            key, entry = next(iter(self._entries.items()))
            self._remove(key)
            if now >= entry.expires_at:
                self._expired += 1  # dead already: no answer was lost for room
            else:
                self._evictions += 1

    def _remove(self, key: tuple[str, str]) -> _Entry:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        model, digest = key
        digests = self._by_model[model]
        digests.discard(digest)
        if not digests:
            del self._by_model[model]
        return entry

    async def purge(self, model: str | None) -> int:
        """Entries removed, not counting expired ones (already gone to a reader,
        as Redis would have dropped them)."""
        now = self._clock()
        if model is None:
            keys = list(self._entries)
        else:
            keys = [(model, digest) for digest in self._by_model.get(model, ())]
        removed = 0
        for key in keys:
            if now < self._remove(key).expires_at:
                removed += 1
            else:
                self._expired += 1
        return removed

    async def acquire(self, model: str, digest: str, ttl: float) -> bool:
        _check_ttl(ttl)
        return True  # nobody else to wait for: the stage's single flight covers this process

    async def release(self, model: str, digest: str) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            # Live entries dropped for room (expired ones count as ``expired``).
            "evictions": self._evictions,
            "expired": self._expired,
            "puts": self._puts,
            "rejected_too_large": self._rejected,
        }

    async def info(self) -> dict[str, Any]:
        return {}  # no server: stats() is everything

    async def close(self) -> None:
        self._entries.clear()
        self._by_model.clear()
        self._bytes = 0


# --- on Redis -------------------------------------------------------------------

#: KEYS: the lock; ARGV: our token. Deletes the lock only if we still hold it:
#: once it has expired and another router took it, ours is not theirs to drop.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Glob metacharacters of Redis's MATCH (stringmatchlen) and its escape.
_GLOB_SPECIAL = frozenset("*?[]\\")


def glob_escape(text: str) -> str:
    """``text`` as a MATCH pattern matching only itself."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def model_part(model: str) -> str:
    """The model's name in a key: its UTF-8 bytes in hex.

    Hex rather than escaping: the result has neither glob metacharacters nor
    the ``:`` separator, whatever the name holds, so ``<model>:*`` matches
    exactly that model's keys (with escaping, model ``a`` must not match
    ``a:b``'s keys, nor ``a\\`` those of ``a\\:``...) and no two names share a
    prefix that SCAN could confuse. It costs twice the name's length per key,
    and ``redis-cli`` shows ``6c6c616d61`` for ``llama`` (``xxd -r -p`` reads it)."""
    return model.encode().hex()


class RedisCache:
    """The CacheStore on Redis (``redis://``, ``rediss://`` or ``unix://``).

    Keys, under ``prefix``: ``cache:<model_part>:<digest>`` for an entry (a
    string with a TTL, ``SET ... PX``), ``cache-lock:<model_part>:<digest>``
    for its lock (kept apart so a purge never drops a lock someone holds).
    Purging SCANs for the model's keys and UNLINKs them in batches of
    ``scan_count``: never KEYS, which blocks Redis for the whole keyspace.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        max_entry_bytes: int,
        *,
        socket_timeout: float = 1.0,
        health_check_interval: int = 5,
        max_connections: int = 64,
        scan_count: int = 500,
    ) -> None:
        if max_entry_bytes < 0 or scan_count < 1:
            raise ValueError("max_entry_bytes must not be negative and scan_count positive")
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes
        self.scan_count = scan_count
        self.conn = RedisConn(
            url,
            CacheUnavailable,
            socket_timeout=socket_timeout,
            health_check_interval=health_check_interval,
            max_connections=max_connections,
        )
        self.where = self.conn.where
        self._client: Redis = self.conn.client
        self._release = self._client.register_script(RELEASE)
        #: (model, digest) -> the token of a lock this object took and has not released.
        self._tokens: dict[tuple[str, str], str] = {}
        self._puts = 0
        self._rejected = 0

    def entry_key(self, model: str, digest: str) -> str:
        return f"{self.prefix}cache:{model_part(model)}:{digest}"

    def lock_key(self, model: str, digest: str) -> str:
        return f"{self.prefix}cache-lock:{model_part(model)}:{digest}"

    async def get(self, model: str, digest: str) -> bytes | None:
        data = await self._guarded(self._client.get(self.entry_key(model, digest)))
        return data.encode() if isinstance(data, str) else data  # str: never (not decoded)

    async def put(self, model: str, digest: str, data: bytes, ttl: float) -> bool:
        _check_ttl(ttl)
        if len(data) > self.max_entry_bytes:
            self._rejected += 1
            return False
        await self._guarded(self._client.set(self.entry_key(model, digest), data, px=_millis(ttl)))
        self._puts += 1
        return True

    async def purge(self, model: str | None) -> int:
        pattern = glob_escape(self.prefix) + "cache:"
        pattern += "*" if model is None else model_part(model) + ":*"
        return await self._guarded(self._purge(pattern))

    async def _purge(self, pattern: str) -> int:
        # One UNLINK per SCAN reply (about ``scan_count`` keys): Redis serves
        # other clients between batches. Keys written or expiring during the
        # scan may or may not be seen (SCAN guarantees only keys present
        # throughout); a key seen twice counts once, as UNLINK counts only the
        # keys it removed.
        removed, cursor = 0, 0
        while True:
            cursor, keys = await self._client.scan(cursor, match=pattern, count=self.scan_count)
            if keys:
                removed += int(await self._client.unlink(*keys))
            if cursor == 0:
                return removed

    async def acquire(self, model: str, digest: str, ttl: float) -> bool:
        """``SET NX PX`` with a token of this call: only the holder's release
        drops the lock, and ``ttl`` frees it if the holder dies. A lock whose
        SET timed out may be held without our knowing: it expires."""
        _check_ttl(ttl)
        token = secrets.token_hex(16)
        taken = await self._guarded(
            self._client.set(self.lock_key(model, digest), token, nx=True, px=_millis(ttl))
        )
        if not taken:
            return False
        self._tokens[(model, digest)] = token
        return True

    async def release(self, model: str, digest: str) -> None:
        # Forgotten first: a release that fails is not retried, the lock expires.
        token = self._tokens.pop((model, digest), None)
        if token is not None:
            await self._guarded(self._release(keys=[self.lock_key(model, digest)], args=[token]))

    def forget(self, model: str, digest: str) -> None:
        """Drop our token for a lock whose release never reached Redis (the
        guard refused it): the lock expires on its own."""
        self._tokens.pop((model, digest), None)

    def stats(self) -> dict[str, Any]:
        """This router's writes; entries, bytes and evictions are the server's (``info``)."""
        return {"puts": self._puts, "rejected_too_large": self._rejected}

    async def info(self) -> dict[str, Any]:
        """The server's numbers, for every key in that Redis, not only the cache's."""
        stats = await self._guarded(self._client.info("stats"))
        memory = await self._guarded(self._client.info("memory"))
        return {
            "evicted_keys": int(stats.get("evicted_keys", 0)),
            "expired_keys": int(stats.get("expired_keys", 0)),
            "used_memory": int(memory.get("used_memory", 0)),
            "maxmemory": int(memory.get("maxmemory", 0)),
            "maxmemory_policy": str(memory.get("maxmemory_policy", "")),
        }

    async def _guarded(self, call: Awaitable[T]) -> T:
        return await self.conn.guarded(call)

    def describe(self, exc: BaseException) -> str:
        return self.conn.describe(exc)

    async def close(self) -> None:
        self._tokens.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


# --- behind a guard -------------------------------------------------------------


@runtime_checkable
class ForgetsLocks(Protocol):
    """A store that remembers the locks it took (RedisCache) and must be told
    when their release never reaches it."""

    def forget(self, model: str, digest: str) -> None: ...


class GuardedCache:
    """``inner`` behind a per-call timeout and a retry interval after failures
    (router/outage.py): CacheUnavailable at once while the store is down.

    ``purge`` gets ``purge_timeout`` rather than ``timeout``: it is many round
    trips by nature, and an admin's, not a request's."""

    def __init__(
        self,
        inner: CacheStore,
        timeout: float,
        retry_interval: float,
        trip_after: int = 1,
        clock: Callable[[], float] = time.monotonic,
        *,
        purge_timeout: float = 60.0,
    ) -> None:
        self.inner = inner
        self.purge_timeout = purge_timeout
        self.guard = CallGuard(
            "cache store",
            CacheUnavailable,
            timeout,
            retry_interval,
            trip_after=trip_after,
            clock=clock,
        )

    @property
    def up(self) -> bool:
        return self.guard.up

    async def get(self, model: str, digest: str) -> bytes | None:
        return await self.guard.call(lambda: self.inner.get(model, digest))

    async def put(self, model: str, digest: str, data: bytes, ttl: float) -> bool:
        return await self.guard.call(lambda: self.inner.put(model, digest, data, ttl))

    async def purge(self, model: str | None) -> int:
        return await self.guard.call(lambda: self.inner.purge(model), within=self.purge_timeout)

    async def acquire(self, model: str, digest: str, ttl: float) -> bool:
        return await self.guard.call(lambda: self.inner.acquire(model, digest, ttl))

    async def release(self, model: str, digest: str) -> None:
        try:
            await self.guard.call(lambda: self.inner.release(model, digest))
        except CacheUnavailable:
            if isinstance(self.inner, ForgetsLocks):
                self.inner.forget(model, digest)  # maybe never reached: let it expire
            raise

    def stats(self) -> dict[str, Any]:
        """The inner store's counters, with ``up``, ``failures`` and ``last_error``."""
        return {**self.inner.stats(), **self.guard.status()}

    async def info(self) -> dict[str, Any]:
        return await self.guard.call(self.inner.info)

    async def close(self) -> None:
        await self.inner.close()
