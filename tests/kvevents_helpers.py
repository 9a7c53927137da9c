"""A simulated engine publishing KV events on loopback, for the KV-event tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backends.sim.engine import Engine, EngineParams
from backends.sim.kvevents import KVEventPublisher, PublisherConfig
from policies.blocks import chain_hashes
from tests.helpers import eventually, free_socket


def free_tcp() -> str:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return f"tcp://127.0.0.1:{port}"


@dataclass
class Publishing:
    engine: Engine
    publisher: KVEventPublisher
    endpoint: str
    replay_endpoint: str | None


@contextlib.asynccontextmanager
async def publishing_engine(
    endpoint: str | None = None,
    replay_endpoint: str | None = "auto",
    *,
    num_blocks: int = 33,
    block_size: int = 4,
    buffer_steps: int = 10_000,
) -> AsyncIterator[Publishing]:
    """A zero-latency simulated engine whose cache publishes on ``endpoint``."""
    endpoint = endpoint or free_tcp()
    replay = free_tcp() if replay_endpoint == "auto" else replay_endpoint
    engine = Engine(EngineParams.zero_latency(num_blocks=num_blocks, block_size=block_size))
    publisher = KVEventPublisher(
        PublisherConfig(endpoint=endpoint, replay_endpoint=replay, buffer_steps=buffer_steps)
    )
    await publisher.start()
    engine.cache.events = publisher
    try:
        yield Publishing(engine, publisher, endpoint, replay)
    finally:
        await engine.stop()
        await publisher.close()


async def subscribed(publisher: KVEventPublisher, count: int = 1) -> None:
    """Until ``count`` subscriptions are in effect at the publisher: a batch
    published before a SUB socket's subscription arrives is dropped, with no
    gap to show it (ZMQ's slow joiner)."""

    async def check() -> bool:
        return publisher.subscriptions() >= count

    await eventually(check, within=10)


async def generate(engine: Engine, prompt: str, max_tokens: int = 2) -> list[int]:
    """Run one request to the end; its prompt's token ids."""
    seq = engine.submit(prompt, max_tokens)
    while await seq.queue.get() is not None:
        pass
    return seq.prompt_ids


def cached_prefix_blocks(engine: Engine, ids: list[int]) -> int:
    """Leading full blocks of ``ids`` the engine's cache holds."""
    from backends.sim.kvcache import block_hashes

    n = 0
    for h in block_hashes(ids, engine.params.block_size):
        if not engine.cache.holds(h):
            break
        n += 1
    return n


def our_hashes(engine: Engine, ids: list[int]) -> list[int]:
    return chain_hashes(ids, engine.params.block_size)
