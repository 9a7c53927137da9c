"""A real vLLM CPU server's KV events through kvroute's subscriber into the precise index.

One server (prefix caching, 80 usable blocks of 32 tokens) publishing on ZMQ;
kvroute's hub subscribes. Before each request, the index's match of the
prompt (the tiny tokenizer's ids of the chat-templated prompt, chained by
``policies.blocks.chain_hashes``) must be what vLLM then reports as cached.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from backends.hf_model import read_model_files
from backends.templates import render
from policies.blocks import chain_hashes
from router.kvevents.hub import KVEventsHub
from router.kvevents.subscriber import Subscriber
from router.state import AppState
from tests.helpers import FIXTURES, eventually, router_config
from tests.real.engines import (
    BLOCK_SIZE,
    VLLMServer,
    _free_port,
    _start_vllm,
    ensure_tiny_model,
    ensure_vllm,
    kv_events_config,
    stop_vllm,
    wait_ready,
)
from tests.real.record_kv_events import LONG, QUESTION, SYSTEM

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]


@dataclass
class Publishing:
    server: VLLMServer
    restart: Any
    pub: str
    replay: str


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Publishing]:
    python, model = ensure_vllm(), ensure_tiny_model()
    work = Path(tmp_path_factory.mktemp("vllm-kv"))
    http, pub, replay = _free_port(), _free_port(), _free_port()
    events = kv_events_config(f"tcp://*:{pub}", f"tcp://*:{replay}")

    def start() -> VLLMServer:
        server = _start_vllm(python, model, 0, work, port=http, kv_events=events)
        wait_ready(server, time.monotonic() + 300)
        return server

    holder = Publishing(start(), None, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}")

    def restart() -> None:
        stop_vllm(holder.server)
        holder.server = start()

    holder.restart = restart
    try:
        yield holder
    finally:
        stop_vllm(holder.server)


@pytest.fixture
async def hub(vllm: Publishing) -> AsyncIterator[tuple[AppState, KVEventsHub]]:
    config = router_config(
        [
            {
                "id": "vllm",
                "url": vllm.server.url,
                "kind": "vllm",
                "models": ["tiny"],
                "kv_events": {"endpoint": vllm.pub, "replay_endpoint": vllm.replay},
            }
        ],
        health={"enabled": False},
        scrape={"enabled": False},
    )
    state = AppState.from_config(config)
    hub = KVEventsHub(state)
    await hub.start()
    try:
        yield state, hub
    finally:
        await hub.stop()


def prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    files = read_model_files(FIXTURES / "tiny-llama")
    assert files.chat_template is not None
    tokenizer = Tokenizer.from_file(str(files.tokenizer_json))
    ids: list[int] = tokenizer.encode(
        render(files.chat_template, messages), add_special_tokens=False
    ).ids
    return ids


def system(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


REQUESTS: list[tuple[list[dict[str, str]], int]] = [
    (system("Hi?"), 4),
    (system("Hi?"), 4),
    (system(QUESTION), 4),
    (system("How?"), 48),
    ([{"role": "user", "content": LONG[0]}], 4),
    ([{"role": "user", "content": LONG[1]}], 4),
    (system("Hi?"), 4),
]


async def settled(sub: Subscriber, quiet: float = 1.0) -> None:
    """Until no batch came for ``quiet`` seconds (vLLM publishes at the step)."""
    last, since = sub.batches, time.monotonic()
    while time.monotonic() - since < quiet:
        await _sleep(0.1)
        if sub.batches != last:
            last, since = sub.batches, time.monotonic()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "messages": messages}
    async with httpx.AsyncClient(timeout=300) as client:
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        usage: dict[str, Any] = r.json()["usage"]
        return usage


async def test_the_index_predicts_cached_tokens_then_a_restart_clears_it(
    vllm: Publishing, hub: tuple[AppState, KVEventsHub]
) -> None:
    state, kv = hub
    sub = kv.subscriber("vllm")
    assert sub is not None

    async def live() -> bool:
        return not sub.blocks.stale

    await eventually(live, within=30)
    blocks = state.registry.get("vllm").view().blocks  # type: ignore[union-attr]
    assert blocks is sub.blocks
    predicted, reported = [], []
    for messages, max_tokens in REQUESTS:
        ids = prompt_ids(messages)
        held = sub.blocks.match(chain_hashes(ids, BLOCK_SIZE))
        predicted.append(min(held, (len(ids) - 1) // BLOCK_SIZE) * BLOCK_SIZE)
        usage = await chat(vllm.server.url, messages, max_tokens)
        assert usage["prompt_tokens"] == len(ids)
        reported.append(usage["prompt_tokens_details"]["cached_tokens"])
        await settled(sub)
    assert predicted == reported
    assert reported == [0, 512, 512, 512, 0, 0, 0]
    assert sub.gaps == 0 and sub.errors == 0 and not sub.blocks.stale
    status = kv.status()["vllm"]
    assert status["blocks"] == len(sub.blocks) > 0 and status["block_size"] == BLOCK_SIZE

    # Killed and started again on the same ports: its cache is empty, and so is ours.
    vllm.restart()

    async def cleared() -> bool:
        return sub.restarts >= 1 and len(sub.blocks) == 0 and not sub.blocks.stale

    await eventually(cleared, within=60)
    ids = prompt_ids(system("Hi?"))
    assert sub.blocks.match(chain_hashes(ids, BLOCK_SIZE)) == 0
    usage = await chat(vllm.server.url, system("Hi?"), 4)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    await settled(sub)
    assert sub.blocks.match(chain_hashes(ids, BLOCK_SIZE)) == len(ids) // BLOCK_SIZE
