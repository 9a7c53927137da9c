"""Tenants' counters: rates (GCRA), concurrency leases and daily token budgets.

base.py     the plan a request asks for, the verdict, the store protocol
memory.py   one process's counters (no Redis configured)
redis.py    counters shared by every router through Redis (Lua scripts)
guard.py    Redis down or slow: a short timeout, fail open or closed, retry later
"""

from __future__ import annotations

from router.config import QuotaConfig
from router.quota.base import QuotaStore


def open_store(config: QuotaConfig) -> QuotaStore:
    """The store ``config`` names: Redis behind a guard, or this process's memory."""
    from router.quota.memory import MemoryStore

    if config.redis is None:
        return MemoryStore()
    from router.quota.guard import GuardedStore
    from router.quota.redis import RedisStore

    return GuardedStore.from_config(RedisStore.from_config(config), config)
