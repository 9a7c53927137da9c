"""The response cache (README "Response cache").

answer.py   sans-I/O: a complete answer (JSON or SSE bytes) -> a CachedAnswer,
            and a CachedAnswer -> JSON or a replayed SSE stream
store.py    where entries live: an in-process LRU bounded in bytes, or Redis
key.py      the canonical request -> the entry's key
stage.py    the Cache stage: lookup, single flight, store, headers
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.config import CacheConfig

if TYPE_CHECKING:
    from router.cache.stage import ResponseCache


def open_cache(config: CacheConfig) -> ResponseCache:
    """The cache ``config`` names: Redis behind a guard, or this process's memory."""
    from router.cache.stage import ResponseCache
    from router.cache.store import GuardedCache, MemoryCache, RedisCache

    if config.redis is None:
        return ResponseCache(config, MemoryCache(config.memory_bytes, config.max_entry_bytes))
    redis = RedisCache(config.redis, config.key_prefix, config.max_entry_bytes)
    guarded = GuardedCache(redis, config.timeout, config.retry_interval, config.trip_after)
    return ResponseCache(config, guarded)
