"""The simulator's KV events, read off its real sockets, rebuild its cache exactly."""

from __future__ import annotations

import asyncio
import json

import zmq
import zmq.asyncio

from backends.kv_events import (
    AllBlocksCleared,
    Batch,
    BlockRemoved,
    BlockStored,
    decode,
    decode_replay,
    replay_request,
)
from backends.sim.kvevents import KVEventPublisher, PublisherConfig
from policies.blocks import EndpointBlocks
from router.kvevents.subscriber import apply_batch
from tests.kvevents_helpers import (
    cached_prefix_blocks,
    generate,
    our_hashes,
    publishing_engine,
)


class Listener:
    """A bare SUB socket collecting decoded batches."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.batches: list[Batch] = []

    async def drain(
        self, quiet: float = 0.2, publisher: KVEventPublisher | None = None
    ) -> list[Batch]:
        """What arrives until ``quiet`` seconds pass without a batch; with
        ``publisher``, until its last batch is in (a loaded machine may pause
        longer than ``quiet`` between two)."""
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            while await self.sock.poll(int(quiet * 1000)):
                self.batches.append(decode(await self.sock.recv_multipart()))
            last = self.batches[-1].seq if self.batches else -1
            if publisher is None or last >= publisher.seq - 1:
                return self.batches
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"batch {publisher.seq - 1} never arrived (last {last})")


async def subscribed(listener: Listener, publisher: KVEventPublisher) -> None:
    """Until the subscription reaches the PUB socket (which drops what comes
    before): publish AllBlocksCleared until one arrives."""
    for _ in range(100):
        publisher.cleared()
        if await listener.sock.poll(100):
            await listener.drain(quiet=0.1)
            return
    raise AssertionError("the SUB socket never received")


def held_engine_hashes(batches: list[Batch]) -> set[int]:
    held: set[int] = set()
    for batch in batches:
        for event in batch.events:
            if isinstance(event, BlockStored):
                held.update(event.block_hashes)  # type: ignore[arg-type]
            elif isinstance(event, BlockRemoved):
                held.difference_update(event.block_hashes)  # type: ignore[arg-type]
            elif isinstance(event, AllBlocksCleared):
                held.clear()
    return held


def test_config_from_vllm_json() -> None:
    cfg = PublisherConfig.from_json(
        json.dumps(
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": "tcp://*:5557",
                "replay_endpoint": "tcp://*:5558",
                "buffer_steps": 5,
            }
        )
    )
    assert cfg == PublisherConfig("tcp://*:5557", "tcp://*:5558", "", 5)
    assert PublisherConfig.from_json('{"enable_kv_cache_events": false}') is None


async def test_events_rebuild_the_cache_and_evictions_remove() -> None:
    ctx = zmq.asyncio.Context()
    try:
        # 8 usable blocks of 4 tokens: three 12-token prompts do not all fit.
        async with publishing_engine(num_blocks=9, block_size=4) as p:
            listener = Listener(ctx, p.endpoint)
            await subscribed(listener, p.publisher)
            blocks = EndpointBlocks("sim", max_blocks=1000)
            prompts = [
                "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu",
                "alpha beta gamma delta epsilon zeta eta theta other words here now yes",
                "completely different words to push the others out of the cache now ok",
            ]
            seen: list[list[int]] = []
            for prompt in prompts:
                seen.append(await generate(p.engine, prompt))
                await listener.drain(publisher=p.publisher)
                held = held_engine_hashes(listener.batches)
                assert held == set(p.engine.cache._cached)
            assert p.engine.cache.evictions > 0
            assert any(isinstance(e, BlockRemoved) for b in listener.batches for e in b.events)
            # Sequence numbers in order, one batch per engine step's report.
            first = listener.batches[0].seq
            assert [b.seq for b in listener.batches] == list(
                range(first, first + len(listener.batches))
            )
            for batch in listener.batches:
                apply_batch(blocks, batch)
            assert len(blocks) == len(p.engine.cache._cached)
            # kvroute's chained hashes of the prompt's tokens say exactly what is cached.
            for ids in seen:
                assert blocks.match(our_hashes(p.engine, ids)) == cached_prefix_blocks(
                    p.engine, ids
                )
            assert blocks.match(our_hashes(p.engine, seen[-1])) == 3
            assert blocks.match(our_hashes(p.engine, seen[0])) < 3
            listener.sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)


async def test_chained_blocks_carry_their_parent_and_tokens() -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with publishing_engine(num_blocks=64, block_size=4) as p:
            listener = Listener(ctx, p.endpoint)
            await subscribed(listener, p.publisher)
            ids = await generate(p.engine, "one two three four five six seven eight nine")
            longer = await generate(
                p.engine, "one two three four five six seven eight nine ten eleven twelve thirteen"
            )
            batches = await listener.drain(publisher=p.publisher)
            stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
            first, second = stored[0], stored[1]
            assert first.parent_block_hash is None
            assert first.token_ids == ids[: 4 * len(first.block_hashes)]
            assert first.medium == "GPU" and first.block_size == 4
            # The longer prompt extends the cached prefix: its new blocks chain on.
            assert second.parent_block_hash in first.block_hashes
            k = first.block_hashes.index(second.parent_block_hash) + 1  # type: ignore[arg-type]
            assert second.token_ids == longer[4 * k : 4 * (k + len(second.block_hashes))]
            listener.sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)


async def test_replay_resends_the_buffer_then_the_end_marker() -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with publishing_engine(buffer_steps=2) as p:
            for i in range(3):
                await generate(p.engine, f"prompt number {i} with a few words more")
            assert p.publisher.seq >= 3
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            assert p.replay_endpoint is not None
            dealer.connect(p.replay_endpoint)
            await dealer.send_multipart(replay_request(0))
            got = []
            while (batch := decode_replay(await dealer.recv_multipart())) is not None:
                got.append(batch.seq)
            # Only the last buffer_steps batches are kept.
            assert got == [p.publisher.seq - 2, p.publisher.seq - 1]
            dealer.close(linger=0)
    finally:
        ctx.destroy(linger=0)
