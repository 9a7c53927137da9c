"""kvroute_requests_in_flight: the inference requests a router process is
handling, what the HorizontalPodAutoscaler scales on (deploy/kubernetes)."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.common import Faults
from tests.helpers import eventually, router, router_config, simulator

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def in_flight(c: httpx.AsyncClient) -> float:
    for family in text_string_to_metric_families((await c.get("/metrics")).text):
        if family.name == "kvroute_requests_in_flight":
            return float(family.samples[0].value)
    raise AssertionError("kvroute_requests_in_flight is not exported")


async def test_counts_inference_requests_while_they_are_handled() -> None:
    async with simulator(faults=Faults(stall=1.0)) as (sim, _):
        config = router_config([{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"]}])
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            assert await in_flight(c) == 0
            calls = [
                asyncio.create_task(c.post("/v1/chat/completions", json={**BODY, "stream": s}))
                for s in (False, True, False)
            ]

            async def all_in() -> bool:
                return await in_flight(c) == 3

            await eventually(all_in, within=10)
            answers = await asyncio.gather(*calls)
            assert [r.status_code for r in answers] == [200, 200, 200]
            # Control routes and answers kvroute refuses itself leave it at 0.
            await c.get("/v1/models")
            assert (await c.post("/v1/chat/completions", content=b"{")).status_code == 400
            assert await in_flight(c) == 0
