"""KV-cache events from engines (vLLM's ZMQ publisher) into the precise index.

wire.py        bytes <-> batches, the sequence tracker, resync decisions (sans I/O)
subscriber.py  one endpoint's sockets: live stream, replays, staleness
hub.py         the lifespan service: a subscriber per endpoint with ``kv_events``
"""
