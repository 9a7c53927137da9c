"""The simulator's KV-cache events, published as vLLM publishes them.

Same sockets and bytes as vLLM's ``ZmqEventPublisher``: a PUB socket sends
``[topic, seq (8 bytes big-endian), msgpack [ts, [events], 0]]``, a ROUTER
socket answers ``[b"", start_seq]`` with every buffered batch from
``start_seq`` on, then the end marker (backends/kv_events.py). Events come
from the engine's ``PrefixCache`` (``CacheEvents``): consecutive stored blocks
of one chain become one ``BlockStored``, as vLLM's per request; what one
synchronous run of the engine's loop reports (a step's scheduling, or its
completion) is one batch, sent once that run yields.

The events carry the token ids the engine hashed: real ones with
``--tokenizer`` (a Hugging Face tokenizer.json, as the real engine's model
would tokenize), else the simulator's built-in ids, which no router can
reproduce from a prompt. Output tokens are always built-in ids.

Everything runs on the event loop: the PUB send never blocks (ZMQ drops at the
high-water mark, as in vLLM), the replay buffer keeps ``buffer_steps`` batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from backends.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    encode,
)


@dataclass(frozen=True, slots=True)
class PublisherConfig:
    """vLLM's ``--kv-events-config`` fields the simulator honours."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    topic: str = ""
    buffer_steps: int = 10_000
    hwm: int = 100_000

    @classmethod
    def from_json(cls, text: str) -> PublisherConfig | None:
        """vLLM's JSON; None when it does not enable events."""
        raw: dict[str, Any] = json.loads(text)
        if not raw.get("enable_kv_cache_events", False) or raw.get("publisher") == "null":
            return None
        known = {"endpoint", "replay_endpoint", "topic", "buffer_steps", "hwm"}
        return cls(**{k: v for k, v in raw.items() if k in known})


class KVEventPublisher:
    def __init__(self, config: PublisherConfig) -> None:
        self.config = config
        self._topic = config.topic.encode()
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.seq = 0
        #: Test hook: this many next batches are buffered but not sent (lost on the wire).
        self.lose = 0
        self._subscriptions = 0

    async def start(self) -> None:
        # A plain socket: a non-blocking send needs no awaiting. XPUB, which a
        # SUB peer cannot tell from vLLM's PUB, so that tests can see when a
        # subscription is in effect (``subscriptions``).
        self._pub = zmq.Socket(self._ctx, zmq.XPUB)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, self.config.hwm)
        self._pub.bind(self.config.endpoint)
        if self.config.replay_endpoint is not None:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(self.config.replay_endpoint)
            self._task = asyncio.create_task(self._serve_replay(), name="sim-kv-replay")

    def subscriptions(self) -> int:
        """Subscriptions in effect at the publishing socket: what a SUB peer sent
        before this reaches it is dropped (ZMQ's slow joiner). For tests."""
        while self._pub is not None:
            try:
                frame = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frame[:1] == b"\x01":
                self._subscriptions += 1
            elif frame[:1] == b"\x00":
                self._subscriptions -= 1
        return self._subscriptions

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        self._ctx.destroy(linger=0)

    # -- CacheEvents ------------------------------------------------------------------

    def stored(
        self, block_hash: int, parent: int | None, token_ids: Sequence[int], block_size: int
    ) -> None:
        last = self._pending[-1] if self._pending else None
        if (
            isinstance(last, BlockStored)
            and parent is not None
            and last.block_hashes[-1] == parent
            and last.block_size == block_size
        ):
            last.block_hashes.append(block_hash)
            last.token_ids.extend(token_ids)
            last.extra_keys.append(None)  # type: ignore[union-attr]
        else:
            self._add(
                BlockStored(
                    block_hashes=[block_hash],
                    parent_block_hash=parent,
                    token_ids=list(token_ids),
                    block_size=block_size,
                    medium="GPU",
                    extra_keys=[None],
                    group_idx=0,
                )
            )
        self._schedule_flush()

    def removed(self, block_hash: int) -> None:
        self._add(BlockRemoved(block_hashes=[block_hash], medium="GPU", group_idx=0))
        self._schedule_flush()

    def cleared(self) -> None:
        self._add(AllBlocksCleared())
        self._schedule_flush()

    def _add(self, event: Event) -> None:
        self._pending.append(event)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what is pending as one batch."""
        self._flush_scheduled = False
        if not self._pending:
            return
        events, self._pending = self._pending, []
        frames = encode(self.seq, events, time.time(), self._topic)
        self._buffer.append((self.seq, frames[2]))
        self.seq += 1
        if self.lose > 0:
            self.lose -= 1
            return
        if self._pub is not None:
            with contextlib.suppress(zmq.Again):
                self._pub.send_multipart(frames, flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._router is not None
        router = self._router
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                continue  # vLLM logs and ignores a malformed request
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await router.send_multipart(
                        [client, b"", self._topic, seq.to_bytes(8, "big"), payload]
                    )
            await router.send_multipart([client, b"", b"", END_SEQ, b""])
