"""least_latency end to end: a router in front of a fast and a slow simulator."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.engine import EngineParams
from tests.helpers import router, router_config, sim_stats, simulator

FAST = EngineParams(step_base=0.002, prefill_per_token=0.0, decode_per_seq=0.0)
# 30x slower: at 15x, a machine at load average 20 once delayed the fast
# simulator's steps enough that the estimates crossed and the test failed.
SLOW = EngineParams(step_base=0.06, prefill_per_token=0.0, decode_per_seq=0.0)


def chat(i: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "tiny",
        "max_tokens": 4,
        "stream": stream,
        "messages": [{"role": "user", "content": f"question {i}"}],
    }


async def test_least_latency_prefers_the_fast_endpoint_and_still_measures_the_slow() -> None:
    async with AsyncExitStack() as stack:
        fast_url, _ = await stack.enter_async_context(simulator(params=FAST))
        slow_url, _ = await stack.enter_async_context(simulator(params=SLOW))
        endpoints = [
            {"id": "fast", "url": fast_url, "kind": "vllm", "models": ["tiny"]},
            {"id": "slow", "url": slow_url, "kind": "vllm", "models": ["tiny"]},
        ]
        cfg = router_config(endpoints, models={"tiny": {"policy": "least_latency"}})
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for i in range(12):
                r = await c.post("/v1/chat/completions", json=chat(i, stream=True))
                assert r.status_code == 200 and b"[DONE]" in r.content
            for i in range(12):
                r = await c.post("/v1/chat/completions", json=chat(i, stream=False))
                assert r.status_code == 200
            burst = await asyncio.gather(
                *(c.post("/v1/chat/completions", json=chat(i, stream=True)) for i in range(16))
            )
            assert all(r.status_code == 200 for r in burst)
            admin = (await c.get("/admin/endpoints")).json()["endpoints"]
            text = (await c.get("/metrics")).text
        fast, slow = [(await sim_stats(u))["requests"] for u in (fast_url, slow_url)]
    assert fast + slow == 40
    # Both were measured: each new endpoint is probed once, for streams and for
    # whole answers alike, and the slow one may take some of the burst.
    assert slow >= 2
    assert fast > 3 * slow, (fast, slow)
    latency = {e["id"]: e["latency"] for e in admin}
    assert latency["fast"]["ttft_s"] < latency["slow"]["ttft_s"]
    assert latency["fast"]["duration_s"] < latency["slow"]["duration_s"]
    assert latency["fast"]["tpot_s"] is not None
    assert latency["slow"]["samples"]["ttft"] > 0
    gauge = {
        (s.labels["endpoint"], s.labels["quantity"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kvroute_endpoint_latency_seconds"
    }
    assert set(gauge) == {(e, q) for e in ("fast", "slow") for q in ("ttft", "tpot", "duration")}
    # The same estimate as the admin API shows (which rounds to microseconds).
    assert gauge["fast", "ttft"] == pytest.approx(latency["fast"]["ttft_s"], abs=1e-6)
    assert gauge["fast", "duration"] < gauge["slow", "duration"]


async def test_a_request_is_timed_for_its_own_model_on_an_endpoint_serving_two() -> None:
    """Requests for one model of an endpoint serving two feed that model's
    estimate (what choosing for it reads) and the endpoint's; the other
    model's stays empty."""
    from router.app import build_app
    from tests.helpers import serve_app

    async with AsyncExitStack() as stack:
        url, _ = await stack.enter_async_context(simulator(models=["tiny", "big"], params=FAST))
        endpoints = [{"id": "both", "url": url, "kind": "vllm", "models": ["tiny", "big"]}]
        app = build_app(router_config(endpoints, models={"big": {"policy": "least_latency"}}))
        base = await stack.enter_async_context(serve_app(app))
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            for i in range(3):
                body = {**chat(i, stream=True), "model": "big"}
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and b"[DONE]" in r.content
            (shown,) = (await c.get("/admin/endpoints")).json()["endpoints"]
        assert shown["latency_by_model"]["tiny"] is None
        assert shown["latency_by_model"]["big"]["samples"]["ttft"] > 0
        assert (
            shown["latency"]["samples"]["ttft"]
            == shown["latency_by_model"]["big"]["samples"]["ttft"]
        )
        state = app.state.registry.get("both")
        assert state is not None
        now = state.clock()
        big, endpoint = state.model_latency["big"].view(now), state.latency.view(now)
        assert big is not None and big.ttft_samples > 0
        assert state.model_latency["tiny"].view(now) is None  # nothing measured
        assert endpoint is not None and endpoint.ttft_samples == big.ttft_samples
