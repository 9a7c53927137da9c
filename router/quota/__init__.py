"""Tenants' counters: rates (GCRA), concurrency leases and daily token budgets.

    base.py     the plan a request asks for, the verdict, the store protocol
    memory.py   one process's counters (no Redis configured)
    redis.py    counters shared by every router through Redis (Lua scripts)
    guard.py    Redis down or slow: a short timeout, fail open or closed, retry later
"""
