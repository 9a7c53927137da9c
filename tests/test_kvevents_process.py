"""``kvroute simulate --kv-events-config`` as a separate process, killed for real,
with kvroute's subscriber and the tiny Llama's tokenizer (as against real vLLM in
tests/real/test_real_vllm_kv_events.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import zmq.asyncio
from tokenizers import Tokenizer

from backends.templates import render
from policies.blocks import EndpointBlocks, chain_hashes
from router.config import KVEventsConfig
from router.kvevents.subscriber import Subscriber
from tests import helpers
from tests.helpers import FIXTURES, eventually, router, router_config
from tests.kvevents_helpers import free_tcp

ROOT = Path(__file__).resolve().parents[1]
TINY = FIXTURES / "tiny-llama"
BLOCK = 16


@contextlib.asynccontextmanager
async def sim_process(pub: str, replay: str) -> AsyncIterator[tuple[str, Any]]:
    """A simulator process publishing its KV events on ``pub`` / ``replay``."""
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": pub.replace("127.0.0.1", "*"),
        "replay_endpoint": replay.replace("127.0.0.1", "*"),
    }
    async with helpers.sim_process(
        "--zero-latency",
        "--block-size",
        str(BLOCK),
        "--num-blocks",
        "41",
        "--tokenizer",
        str(TINY / "tokenizer.json"),
        "--kv-events-config",
        json.dumps(events),
    ) as (url, proc):
        yield url, proc


def ids_of(messages: list[dict[str, str]]) -> list[int]:
    template = (TINY / "chat_template.jinja").read_text()
    tokenizer = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    ids: list[int] = tokenizer.encode(render(template, messages), add_special_tokens=False).ids
    return ids


async def chat(url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": "tiny", "max_tokens": 3, "messages": messages}
    async with httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        usage: dict[str, Any] = r.json()["usage"]
        return usage


SYSTEM = "You answer questions about the standard library, briefly and exactly. " * 4


def conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_index_predicts_the_simulators_cached_tokens_and_survives_a_kill() -> None:
    pub, replay = free_tcp(), free_tcp()
    ctx = zmq.asyncio.Context()
    sub = Subscriber(
        "sim",
        KVEventsConfig(endpoint=pub, replay_endpoint=replay, replay_timeout=1.0),
        EndpointBlocks("sim", max_blocks=10_000),
        ctx,
    )
    task = asyncio.create_task(sub.run())
    try:
        async with sim_process(pub, replay) as (url, proc):

            async def live() -> bool:
                return not sub.blocks.stale

            await eventually(live, within=10)
            predicted, reported = [], []
            for question in ["What is os.path?", "What is os.path?", "And shutil?", "Why?"]:
                ids = ids_of(conversation(question))
                held = sub.blocks.match(chain_hashes(ids, BLOCK))
                predicted.append(min(held, (len(ids) - 1) // BLOCK) * BLOCK)
                usage = await chat(url, conversation(question))
                assert usage["prompt_tokens"] == len(ids)
                reported.append(usage["prompt_tokens_details"]["cached_tokens"])

                async def indexed(ids: list[int] = ids) -> bool:
                    # The step's batch, published at once, crossed two processes.
                    return sub.blocks.match(chain_hashes(ids, BLOCK)) >= (len(ids) - 1) // BLOCK

                await eventually(indexed, within=10)
            assert predicted == reported and reported[1] > 0
            assert len(sub.blocks) > 0
            proc.send_signal(signal.SIGKILL)
            proc.wait()

            async def disconnected() -> bool:
                return sub.blocks.stale_reason == "publisher not connected"

            await eventually(disconnected, within=10)
        # Started again on the same ports: a new, empty engine.
        async with sim_process(pub, replay):

            async def cleared() -> bool:
                return sub.restarts == 1 and len(sub.blocks) == 0 and not sub.blocks.stale

            await eventually(cleared, within=15)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ctx.destroy(linger=0)


async def test_router_routes_on_the_simulators_events_and_says_so() -> None:
    """The whole path: config (kv_events, tokenizer) -> hub -> subscriber -> the
    index -> prefix_affinity's precise match; /admin shows the source and the feed."""
    pub, replay = free_tcp(), free_tcp()
    async with sim_process(pub, replay) as (sim_url, _):
        config = router_config(
            [
                {
                    "id": "sim",
                    "url": sim_url,
                    "kind": "vllm",
                    "models": ["tiny"],
                    "kv_events": {"endpoint": pub, "replay_endpoint": replay},
                }
            ],
            models={"tiny": {"policy": "prefix_affinity", "tokenizer": str(TINY)}},
        )
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def live() -> bool:
                feed = (await c.get("/admin/kv-events")).json()["endpoints"]["sim"]
                return feed["connected"] and not feed["stale"]

            await eventually(live, within=15)
            body = {"model": "tiny", "max_tokens": 3, "messages": conversation("What is os?")}
            assert (await c.post("/v1/chat/completions", json=body)).status_code == 200

            async def stored() -> bool:
                feed = (await c.get("/admin/kv-events")).json()["endpoints"]["sim"]
                return bool(feed["blocks"] > 0)

            await eventually(stored, within=10)
            r = await c.post("/v1/chat/completions", json=body)
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            index = (await c.get("/admin/prefix-index")).json()
            assert index["tiny"]["sources"] == {"sim": "precise"}
            metrics = (await c.get("/metrics")).text
            assert 'reason="precise_hit"' in metrics
