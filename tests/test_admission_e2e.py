"""The admission stage end to end: requests for a saturated model wait in
kvroute, high priority first; queue bounds answer 503 with Retry-After."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from backends.sim.engine import EngineParams
from router.tenants import hash_key, new_key
from tests.helpers import eventually, router, router_config, simulator

HIGH, BATCH = new_key(), new_key()
SLOW = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)


def config(sim: str, **admission: Any) -> Any:
    return router_config(
        [{"id": "e", "url": sim, "kind": "vllm", "models": ["m"], "max_concurrency": 1}],
        auth={"enabled": True},
        tenants={
            "interactive": {"keys": [hash_key(HIGH)], "priority": "high"},
            "nightly": {"keys": [hash_key(BATCH)], "priority": "batch"},
        },
        admission=admission,
    )


def ask(client: httpx.AsyncClient, key: str, tokens: int = 10) -> Any:
    return client.post(
        "/v1/completions",
        json={"model": "m", "prompt": "hi", "max_tokens": tokens},
        headers={"authorization": f"Bearer {key}"},
    )


async def gauge(client: httpx.AsyncClient, line_start: str) -> float:
    """A sample of /metrics by the start of its line (0 when absent)."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def reaches(client: httpx.AsyncClient, line_start: str, value: float) -> None:
    async def check() -> bool:
        return await gauge(client, line_start) == value

    await eventually(check, within=10)


def queued(priority: str) -> str:
    return f'kvroute_admission_queue_depth{{model="m",priority="{priority}"}}'


RUNNING = "kvroute_requests_in_flight "


async def test_waiters_are_served_high_priority_first() -> None:
    async with simulator(["m"], SLOW) as (sim, _), router(config(sim)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            finished: list[str] = []

            async def run(name: str, key: str, tokens: int = 10) -> None:
                r = await ask(client, key, tokens)
                assert r.status_code == 200
                finished.append(name)

            # Each arrives once the one before holds the slot or waits for it.
            tasks = [asyncio.ensure_future(run("first", BATCH, tokens=150))]  # the slot, 3 s
            await reaches(client, RUNNING, 1)
            tasks.append(asyncio.ensure_future(run("batch-1", BATCH)))
            await reaches(client, queued("batch"), 1)
            tasks.append(asyncio.ensure_future(run("batch-2", BATCH)))
            await reaches(client, queued("batch"), 2)
            tasks.append(asyncio.ensure_future(run("high", HIGH)))  # arrives last, served next
            await asyncio.gather(*tasks)
            metrics = (await client.get("/metrics")).text
    assert finished == ["first", "high", "batch-1", "batch-2"]
    assert 'kvroute_admission_wait_seconds_count{model="m",priority="high"} 1.0' in metrics
    assert 'kvroute_admission_wait_seconds_count{model="m",priority="batch"} 2.0' in metrics


async def test_a_full_queue_and_a_passed_deadline_answer_503_with_retry_after() -> None:
    async with simulator(["m"], SLOW) as (sim, _):
        async with router(config(sim, max_queue=1, max_wait=1.0, retry_after=3)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                # Holds the slot for 3 s, past the waiter's 1 s.
                busy = asyncio.ensure_future(ask(client, BATCH, tokens=150))
                await reaches(client, RUNNING, 1)
                waiting = asyncio.ensure_future(ask(client, HIGH))
                await reaches(client, queued("high"), 1)
                full = await ask(client, HIGH)
                timed_out = await waiting
                ok = await busy
                metrics = (await client.get("/metrics")).text
    assert ok.status_code == 200
    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
    assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "queue_timeout"
    assert full.headers["retry-after"] == "3" and timed_out.headers["retry-after"] == "3"
    assert 'kvroute_admission_rejections_total{model="m",reason="queue_full"} 1.0' in metrics
    assert 'kvroute_admission_rejections_total{model="m",reason="queue_timeout"} 1.0' in metrics


async def test_a_model_with_no_endpoint_up_is_not_queued() -> None:
    async with simulator(["m"]) as (sim, _):
        pass  # gone
    async with router(config(sim)) as url, httpx.AsyncClient(base_url=url) as client:
        r = await ask(client, HIGH)
        again = await ask(client, HIGH)
    # a connection error at once, then no endpoint: never a wait for a slot
    assert r.status_code == 502 and again.status_code in (502, 503)
