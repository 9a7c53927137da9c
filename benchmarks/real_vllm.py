"""Prefix affinity on real vLLM: hit rates from vLLM's own counters.

Two vLLM CPU servers (tests/real/engines.py: a tiny random Llama, prefix
caching on, 81 blocks of 32 tokens each) behind kvroute; a multi-tenant
workload whose system prompts, together, are more than one server's KV cache
holds. The same requests go through round_robin and through prefix_affinity,
each on fresh servers; the hit rate is
delta(vllm:prefix_cache_hits_total) / delta(vllm:prefix_cache_queries_total).

Then the same measurement on a simulated fleet configured like the real one
(same block size and usable blocks, two replicas, the real model's tokenizer
and chat template): the simulator is calibrated when its hit rates land within
0.05 of the real ones.

    .venv/bin/python benchmarks/real_vllm.py      # writes benchmarks/results/real_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.sim.engine import EngineParams  # noqa: E402
from benchmarks.measure import WORDS, measure, through_router  # noqa: E402
from tests.helpers import simulator  # noqa: E402
from tests.real.engines import (  # noqa: E402
    BLOCK_SIZE,
    NUM_BLOCKS,
    VLLMServer,
    _free_port,
    _start_vllm,
    ensure_tiny_model,
    ensure_vllm,
    kv_events_config,
    stop_vllm,
    vllm_servers,
    wait_ready,
)

TENANTS = 12
REQUESTS = 240
CONCURRENCY = 4


def tenant_workload(
    seed: int = 1,
    requests: int = REQUESTS,
    tenants: int = TENANTS,
    system_words: int = 420,
) -> list[tuple[int, dict[str, Any]]]:
    """``requests`` chat requests as (tenant, body): each tenant has its own
    system prompt of ``system_words`` words (about 3 tokens each with the tiny
    model's tokenizer), then a short question; tenants drawn uniformly."""
    rng = random.Random(seed)
    systems = [
        f"You are the assistant of tenant {t}. "
        + " ".join(rng.choice(WORDS) for _ in range(system_words))
        for t in range(tenants)
    ]
    out = []
    for i in range(requests):
        t = rng.randrange(tenants)
        out.append(
            (
                t,
                {
                    "model": "tiny",
                    "max_tokens": 8,
                    "temperature": 0,
                    "messages": [
                        {"role": "system", "content": systems[t]},
                        {"role": "user", "content": f"Question {i}: {rng.choice(WORDS)}?"},
                    ],
                },
            )
        )
    return out


def workload(seed: int = 1, requests: int = REQUESTS) -> list[dict[str, Any]]:
    return [body for _, body in tenant_workload(seed, requests)]


@dataclass
class FleetServer:
    url: str
    #: Its KV-cache events as kvroute's ``endpoints[].kv_events`` names them, if on.
    kv_events: dict[str, str] | None
    server: VLLMServer


@contextmanager
def vllm_fleet(workdir: Path, count: int, kv_events: bool = False) -> Iterator[list[FleetServer]]:
    """``count`` vLLM servers as tests/real/engines.py starts them (same model,
    cache size and flags; server i pinned to core i mod the cores), plus:
    ``VLLM_SERVER_DEV_MODE=1`` so ``POST /reset_prefix_cache`` empties a cache
    between runs without a restart, and optionally KV-cache events over ZMQ
    (REAL_ENGINES.md) for a precise index."""
    python = ensure_vllm()
    model = ensure_tiny_model()
    workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    servers: list[FleetServer] = []
    try:
        for i in range(count):
            events = config = None
            if kv_events:
                pub, replay = _free_port(), _free_port()
                events = {
                    "endpoint": f"tcp://127.0.0.1:{pub}",
                    "replay_endpoint": f"tcp://127.0.0.1:{replay}",
                }
                config = kv_events_config(f"tcp://*:{pub}", f"tcp://*:{replay}")
            server = _start_vllm(python, model, i % cores, workdir, kv_events=config, dev_mode=True)
            servers.append(FleetServer(server.url, events, server))
        deadline = time.monotonic() + 600
        for fleet_server in servers:
            wait_ready(fleet_server.server, deadline)
        yield servers
    finally:
        for fleet_server in servers:
            stop_vllm(fleet_server.server)


async def reset_prefix_caches(client: httpx.AsyncClient, urls: list[str]) -> None:
    """Empty every server's prefix cache (vLLM dev mode), so runs start cold."""
    for url in urls:
        for _ in range(50):
            r = await client.post(url + "/reset_prefix_cache")
            r.raise_for_status()
            if r.json().get("success", True):
                break
            await asyncio.sleep(0.2)  # requests still running: try again
        else:
            raise RuntimeError(f"{url}: prefix cache not reset")


async def run_policy(
    urls: list[str], policy: str, bodies: list[dict[str, Any]], concurrency: int = CONCURRENCY
) -> dict[str, Any]:
    """Send ``bodies`` through kvroute over ``urls``, ``concurrency`` at a time;
    hit rates from the backends."""
    async with through_router(urls, policy) as router, httpx.AsyncClient(timeout=120) as c:
        gate = asyncio.Semaphore(concurrency)
        client_cached = 0

        async def one(body: dict[str, Any]) -> None:
            nonlocal client_cached
            async with gate:
                r = await c.post(router + "/v1/chat/completions", json=body)
                r.raise_for_status()
                details = r.json()["usage"].get("prompt_tokens_details") or {}
                client_cached += details.get("cached_tokens") or 0

        async def send() -> None:
            await asyncio.gather(*(one(b) for b in bodies))

        counted = await measure(c, urls, len(bodies), send)
    return {
        "policy": policy,
        "requests": len(bodies),
        "hit_rate": counted.hit_rate,
        "hit_tokens": counted.hit_tokens,
        "query_tokens": counted.query_tokens,
        "client_cached_tokens": client_cached,
        "seconds": counted.seconds,
    }


async def measure_real(
    workdir: Path, bodies: list[dict[str, Any]], concurrency: int = CONCURRENCY
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy in ("round_robin", "prefix_affinity"):
        with vllm_servers(workdir / policy) as servers:
            urls = [s.url for s in servers]
            out[policy] = await run_policy(urls, policy, bodies, concurrency)
    return out


async def measure_simulated(
    bodies: list[dict[str, Any]], concurrency: int = CONCURRENCY
) -> dict[str, Any]:
    tokenizer = str(ensure_tiny_model() / "tokenizer.json")
    params = EngineParams.zero_latency(
        block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_model_len=2048
    )
    params = EngineParams(**{**params.__dict__, "tokenizer": tokenizer})
    out: dict[str, Any] = {}
    for policy in ("round_robin", "prefix_affinity"):
        async with AsyncExitStack() as stack:
            sims = [await stack.enter_async_context(simulator(params=params)) for _ in range(2)]
            out[policy] = await run_policy([u for u, _ in sims], policy, bodies, concurrency)
    return out


async def main() -> int:
    bodies = workload()
    with tempfile.TemporaryDirectory() as tmp:
        real = await measure_real(Path(tmp), bodies)
    sim = await measure_simulated(bodies)
    ratio = real["prefix_affinity"]["hit_rate"] / max(real["round_robin"]["hit_rate"], 1e-9)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "tenants": TENANTS,
            "requests": REQUESTS,
            "concurrency": CONCURRENCY,
            "servers": 2,
            "block_size": BLOCK_SIZE,
            "num_blocks": NUM_BLOCKS,
        },
        "real": real,
        "simulated": sim,
        "real_ratio": ratio,
        "calibration_gap": {p: abs(real[p]["hit_rate"] - sim[p]["hit_rate"]) for p in real},
    }
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "real_vllm.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    # No options; parsed so that --help prints this instead of starting vLLM.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    sys.exit(asyncio.run(main()))
