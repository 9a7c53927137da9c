"""What the benchmarks on a vLLM-faced fleet share: kvroute in front, the
engines' own counters behind.

A hit rate is always the backends' own: delta
``vllm:prefix_cache_hits_total`` / delta ``vllm:prefix_cache_queries_total``
summed over the fleet (real vLLM or the simulators' vLLM face), read once
``vllm:request_success_total`` covers every request sent, never a router's
belief. ``measure`` is that loop: counters before, the benchmark's own
requests, counters after. ``router_config`` / ``through_router`` put one
kvroute (in this process) over the fleet, configured the same way
everywhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.app import build_app
from router.config import Config, parse_config
from tests.helpers import serve_app

#: The words the tenant workloads' system prompts are drawn from (about 3
#: tokens each with the tiny Llama's tokenizer).
WORDS = [
    *["the", "service", "level", "agreement", "covers", "support", "tickets", "billing"],
    *["disputes", "refunds", "escalation", "paths", "data", "retention", "privacy"],
    *["requests", "account", "recovery", "invoices"],
]


def loadavg() -> str:
    """/proc/loadavg, recorded beside every run (the machine is shared)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def router_config(
    urls: Sequence[str],
    model: Mapping[str, Any],
    endpoint_extra: Sequence[Mapping[str, Any]] = (),
    seed: int = 3,
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """kvroute over ``urls`` (endpoints ``vllm-i``, model ``tiny`` configured
    as ``model``, e.g. ``{"policy": "round_robin"}``); ``endpoint_extra[i]``
    adds keys to endpoint i (e.g. ``kv_events``); ``extra``: top-level sections
    (e.g. ``placements``)."""
    return parse_config(json.dumps(router_config_raw(urls, model, endpoint_extra, seed, extra)))


def router_config_raw(
    urls: Sequence[str],
    model: Mapping[str, Any],
    endpoint_extra: Sequence[Mapping[str, Any]] = (),
    seed: int = 3,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``router_config``'s document, before validation (for a ``kvroute
    serve --config`` file)."""
    endpoints = []
    for i, url in enumerate(urls):
        more = endpoint_extra[i] if i < len(endpoint_extra) else {}
        endpoints.append(
            {"id": f"vllm-{i}", "url": url, "kind": "vllm", "models": ["tiny"], **more}
        )
    return {
        "endpoints": endpoints,
        "models": {"tiny": dict(model)},
        "server": {"access_log": False},
        "scrape": {"interval": 0.5},
        "seed": seed,
        **(extra or {}),
    }


@asynccontextmanager
async def through_router(urls: Sequence[str], policy: str) -> AsyncIterator[str]:
    """kvroute (in this process) over ``urls`` with ``policy``; yields its URL."""
    async with serve_app(build_app(router_config(urls, {"policy": policy}))) as url:
        yield url


def counters(text: str) -> dict[str, float]:
    out = {"hits": 0.0, "queries": 0.0, "done": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:prefix_cache_hits_total":
                out["hits"] += s.value
            elif s.name == "vllm:prefix_cache_queries_total":
                out["queries"] += s.value
            elif s.name == "vllm:request_success_total":
                out["done"] += s.value
    return out


async def read_counters(client: httpx.AsyncClient, urls: Sequence[str]) -> dict[str, float]:
    total = {"hits": 0.0, "queries": 0.0, "done": 0.0}
    for url in urls:
        for k, v in counters((await client.get(url + "/metrics")).text).items():
            total[k] += v
    return total


async def wait_counters(
    client: httpx.AsyncClient, urls: Sequence[str], before: dict[str, float], requests: int
) -> dict[str, float]:
    """vLLM's counters lag the last response a moment: wait until they cover it."""
    deadline = time.monotonic() + 30
    while True:
        after = await read_counters(client, urls)
        if after["done"] - before["done"] >= requests or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class Counted:
    """What the backends counted over one run."""

    hit_tokens: float
    query_tokens: float
    #: Wall-clock seconds ``send`` took.
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


async def measure(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    requests: int,
    send: Callable[[], Awaitable[None]],
) -> Counted:
    """Run ``send`` (which sends ``requests`` requests, through a router or
    not) and count what the backends at ``urls`` saw meanwhile."""
    before = await read_counters(client, urls)
    started = time.perf_counter()
    await send()
    elapsed = time.perf_counter() - started
    after = await wait_counters(client, urls, before, requests)
    return Counted(
        hit_tokens=after["hits"] - before["hits"],
        query_tokens=after["queries"] - before["queries"],
        seconds=round(elapsed, 2),
    )
