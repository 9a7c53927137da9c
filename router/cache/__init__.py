"""The response cache (README "Response cache").

    answer.py   sans-I/O: a complete answer (JSON or SSE bytes) -> a CachedAnswer,
                and a CachedAnswer -> JSON or a replayed SSE stream
    store.py    where entries live: an in-process LRU bounded in bytes, or Redis
    key.py      the canonical request -> the entry's key
    stage.py    the Cache stage: lookup, single flight, store, headers
"""
