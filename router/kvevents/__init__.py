"""KV-cache events from engines (vLLM's ZMQ publisher) into the precise index.

The wire format (bytes <-> batches, the sequence tracker; sans I/O) is
``backends/kv_events.py``: the simulator publishes it too.

subscriber.py  one endpoint's sockets: live stream, replays, staleness
hub.py         the lifespan service: a subscriber per endpoint with ``kv_events``
"""
