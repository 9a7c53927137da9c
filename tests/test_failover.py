"""The fault matrix: real simulator processes, real sockets, faults injected.

Bounds on time are generous ceilings (``eventually``), never measurements.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import (
    KVROUTE,
    admin_endpoints,
    eventually,
    free_socket,
    router,
    router_config,
    set_faults,
    sim_process,
)

MSG = [{"role": "user", "content": "Tell me about failover."}]
FAST = {
    # A killed replica refuses connections at once, so fall 1 still marks it down
    # within an interval; a probe of a live one on a loaded machine may take
    # more than half a second, and must not take it out (it did, in CI).
    "health": {"interval": 0.1, "timeout": 5, "fall": 1, "rise": 1, "jitter": 0},
    "scrape": {"interval": 0.2},
    "circuit": {"failures": 2, "base_backoff": 0.3, "max_backoff": 2},
    "retries": {"max_attempts": 3, "budget_min": 1000},
    "timeouts": {"first_byte": 1.0, "idle": 1.0},
}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": MSG, "max_tokens": 4, **extra}


def endpoints(urls: list[str], model: str = "tiny") -> list[dict[str, Any]]:
    return [
        {"id": f"s{i}", "url": u, "kind": "vllm", "models": [model]} for i, u in enumerate(urls)
    ]


async def test_kill_9_under_load_loses_no_request() -> None:
    async with AsyncExitStack() as stack:
        (a, proc_a) = await stack.enter_async_context(sim_process("--step-base", "0.002"))
        (b, _) = await stack.enter_async_context(sim_process("--step-base", "0.002"))
        url = await stack.enter_async_context(router(router_config(endpoints([a, b]), **FAST)))
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def worker() -> None:
                for _ in range(40):
                    r = await c.post("/v1/chat/completions", json=chat())
                    statuses.append(r.status_code)

            workers = [asyncio.create_task(worker()) for _ in range(4)]
            while len(statuses) < 30:
                await asyncio.sleep(0.01)
            os.kill(proc_a.pid, signal.SIGKILL)
            await asyncio.gather(*workers)

        async def marked_down() -> bool:
            return (await admin_endpoints(url))["s0"]["healthy"] is False

        await eventually(marked_down)
    assert statuses == [200] * 160


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_failing_replica_loses_traffic_and_recovers(status: int) -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process())
        (b, _) = await stack.enter_async_context(sim_process())
        url = await stack.enter_async_context(router(router_config(endpoints([a, b]), **FAST)))
        retry_after = 1 if status == 429 else None
        await set_faults(a, fail_rate=1.0, fail_status=status, retry_after=retry_after)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            results = [await c.post("/v1/chat/completions", json=chat()) for _ in range(10)]
            assert [r.status_code for r in results] == [200] * 10
            state = (await admin_endpoints(url))["s0"]
            if status == 429:
                assert state["cooldown_s"] > 0  # Retry-After honoured, no circuit verdict
            else:
                assert state["circuit"]["state"] == "open"
            metrics = (await c.get("/metrics")).text
            assert 'kvroute_retries_total{model="tiny"}' in metrics

            await set_faults(a, fail_rate=0.0)

            async def back() -> bool:
                await c.post("/v1/chat/completions", json=chat())
                s0 = (await admin_endpoints(url))["s0"]
                return bool(s0["circuit"]["state"] == "closed" and s0["available"])

            await eventually(back)


async def test_hung_replica_is_bounded_by_timeouts_and_failed_over() -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process("--stall", "-1"))
        (b, _) = await stack.enter_async_context(sim_process())
        cfg = router_config(endpoints([a, b]), **{**FAST, "health": {"enabled": False}})
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for stream in (False, True, False, True):
                r = await c.post("/v1/chat/completions", json=chat(stream=stream))
                assert r.status_code == 200
            state = (await admin_endpoints(url))["s0"]
            assert state["circuit"]["failures"] >= 2
            assert "in time" in (state["last_error"] or "")


async def test_stream_that_dies_before_its_first_chunk_fails_over() -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process("--die-after-chunks", "0"))
        (b, _) = await stack.enter_async_context(sim_process())
        cfg = router_config(endpoints([a, b]), **{**FAST, "health": {"enabled": False}})
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for _ in range(4):
                r = await c.post("/v1/chat/completions", json=chat(stream=True))
                assert r.status_code == 200
                assert r.text.rstrip().endswith("data: [DONE]")


async def test_all_replicas_failing_tells_the_client_not_to_retry() -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process("--fail-rate", "1"))
        (b, _) = await stack.enter_async_context(sim_process("--fail-rate", "1"))
        url = await stack.enter_async_context(router(router_config(endpoints([a, b]), **FAST)))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 500
        assert r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["message"] == "simulated failure"


async def test_model_fallbacks_after_the_model_is_exhausted() -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process("--fail-rate", "1"))
        (b, _) = await stack.enter_async_context(sim_process(model="backup"))
        eps = [
            {"id": "main", "url": a, "kind": "vllm", "models": ["tiny"]},
            {"id": "spare", "url": b, "kind": "vllm", "models": ["backup"]},
        ]
        cfg = router_config(eps, models={"tiny": {"fallbacks": ["backup"]}}, **FAST)
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200
        assert r.json()["model"] == "backup"


async def test_retry_budget_caps_retries_fleet_wide() -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process("--fail-rate", "1"))
        (b, _) = await stack.enter_async_context(sim_process())
        tight = {
            **FAST,
            "health": {"enabled": False},
            "circuit": {"failures": 1000},
            "retries": {"budget_ratio": 0.0, "budget_min": 2, "budget_window": 60},
        }
        cfg = router_config(endpoints([a, b]), models={"tiny": {"policy": "round_robin"}}, **tight)
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            codes = [
                (await c.post("/v1/chat/completions", json=chat())).status_code for _ in range(8)
            ]
            metrics = (await c.get("/metrics")).text
    # Round robin starts half the requests on the failing replica; two retries are
    # allowed, after which those requests fail instead of being retried.
    assert codes.count(500) == 2 and codes.count(200) == 6
    assert "kvroute_retries_denied_total 2.0" in metrics


async def test_drain_and_undrain() -> None:
    async with AsyncExitStack() as stack:
        (a, _) = await stack.enter_async_context(sim_process())
        (b, _) = await stack.enter_async_context(sim_process())
        cfg = router_config(endpoints([a, b]), admin_token="tok", **FAST)
        url = await stack.enter_async_context(router(cfg))
        auth = {"authorization": "Bearer tok"}
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            assert (await c.post("/admin/endpoints/s0/drain")).status_code == 401
            r = await c.post("/admin/endpoints/s0/drain", headers=auth)
            assert r.json()["draining"] is True
            assert (await c.post("/admin/endpoints/nope/drain", headers=auth)).status_code == 404
            for _ in range(6):
                assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
            stats_a = (await c.get(a + "/sim/stats")).json()
            assert stats_a["requests"] == 0
            r = await c.post("/admin/endpoints/s0/undrain", headers=auth)
            assert r.json()["draining"] is False

            # s0 takes requests again. Not "within 6": FAST's health check
            # (fall 1, 0.5 s timeout) may take it out for a moment on a
            # loaded machine, and round robin then sends every one to s1.
            async def s0_serves() -> bool:
                assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
                return bool((await c.get(a + "/sim/stats")).json()["requests"])

            await eventually(s0_serves)
            listed = (await c.get("/admin/endpoints", headers=auth)).json()["endpoints"]
            assert {e["id"] for e in listed} == {"s0", "s1"}
            assert listed[0]["load"]["running"] is not None  # scraped from /metrics
            config = (await c.get("/admin/config", headers=auth)).json()["config"]
            assert config["admin"]["token"] == "**********"


async def test_sigterm_finishes_in_flight_requests(tmp_path: Path) -> None:
    slow = ("--step-base", "0.05", "--prefill-per-token", "0", "--decode-per-seq", "0")
    async with sim_process(*slow) as (sim, _):
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()
        path = tmp_path / "r.yaml"
        cfg = {
            "server": {"port": port, "access_log": False},
            "endpoints": endpoints([sim]),
            "shutdown": {"grace": 0.5, "timeout": 20},
        }
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen(
            [str(KVROUTE), "serve", "--config", str(path)], stderr=subprocess.PIPE
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:

                async def ready() -> bool:
                    try:
                        return (await c.get("/ready")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(ready)
                body = chat(max_tokens=30, stream=True)
                flights = [
                    asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(3)
                ]

                async def all_running() -> bool:
                    stats = (await c.get(sim + "/sim/stats")).json()
                    return bool(stats["running"] == 3)

                await eventually(all_running)
                proc.send_signal(signal.SIGTERM)

                async def not_ready() -> bool:
                    try:
                        return (await c.get("/ready")).status_code == 503
                    except httpx.TransportError:
                        return True  # past the grace on a loaded machine: the listener closed

                await eventually(not_ready)
                done = await asyncio.gather(*flights)
            assert [r.status_code for r in done] == [200, 200, 200]
            assert all(r.text.rstrip().endswith("data: [DONE]") for r in done)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            err = proc.communicate()[1]
        assert b"Traceback" not in err
