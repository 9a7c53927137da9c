"""Tenants' limits end to end: rates, tokens settled from real usage (streams
included), concurrency, daily budgets, OpenAI's x-ratelimit headers, a real
Redis shared by two router processes, and Redis dying under fail_open and
fail_closed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from backends.sim.engine import EngineParams
from router.quota.stage import go_duration
from router.tenants import hash_key, new_key
from tests.helpers import KVROUTE, eventually, free_socket, router, router_config, simulator
from tests.redis_server import RedisServer

KEY = new_key()
OTHER = new_key()
AUTH = {"authorization": f"Bearer {KEY}"}


def quota_config(sim: str, redis: str | None = None, **tenant: Any) -> Any:
    quotas: dict[str, Any] = {"redis": redis} if redis else {}
    if redis:
        # A healthy Redis on a loaded 2-core machine can take longer than the
        # default 0.25 s, counting this process's own event-loop delay: a fail-
        # open admit then drops its limit headers, a fail-closed one a 503.
        quotas["timeout"] = 2.0
    quotas.update(tenant.pop("quotas", {}))
    return router_config(
        [{"id": "e", "url": sim, "kind": "vllm", "models": ["m", "n"]}],
        models={"m": {}, "n": {}},
        auth={"enabled": True},
        tenants={
            "acme": {"keys": [hash_key(KEY)], **tenant},
            "other": {"keys": [hash_key(OTHER)], **tenant},
        },
        quotas=quotas,
    )


def completion(model: str = "m", max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hello there", "max_tokens": max_tokens, **extra}


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


async def tenant_usage(url: str, name: str = "acme") -> dict[str, Any]:
    """The tenant's usage from /admin/tenants; asked again while it is null
    (the store did not answer within its timeout: seen on a loaded machine)."""
    usage: dict[str, Any] | None = None

    async def answered() -> bool:
        nonlocal usage
        async with httpx.AsyncClient() as client:
            data = (await client.get(url + "/admin/tenants")).json()
        usage = next(t for t in data["tenants"] if t["name"] == name)["usage"]
        return usage is not None

    await eventually(answered)
    assert usage is not None
    return usage


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_rpm_refuses_with_429_retry_after_and_ratelimit_headers(
    store: str, redis: RedisServer
) -> None:
    async with simulator(["m", "n"]) as (sim, _):
        cfg = quota_config(sim, redis.url if store == "redis" else None, rpm=3)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            answers = [await client.post("/v1/completions", json=completion()) for _ in range(4)]
            other = await client.post(
                "/v1/completions", json=completion(), headers={"authorization": f"Bearer {OTHER}"}
            )
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in answers)
    # a burst of the whole limit, refilled one request every 20 s
    assert answers[0].headers["x-ratelimit-reset-requests"] in ("20s", "19s")
    assert answers[2].headers["x-ratelimit-reset-requests"] in ("1m0s", "59s")
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "requests per minute: limit 3" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] in ("20", "19")
    # tenants do not share limits; a tenant with no tpm gets no token headers
    assert other.status_code == 200 and "x-ratelimit-limit-tokens" not in other.headers


def chat(content: str, max_tokens: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def sse_data(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


async def test_tokens_are_admitted_on_an_estimate_and_settled_from_usage(
    redis: RedisServer,
) -> None:
    async with simulator(["m", "n"]) as (sim, _):
        cfg = quota_config(sim, redis.url, tpm=10_000, daily_tokens=1_000_000)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            whole = await client.post("/v1/completions", json=completion(max_tokens=7))
            # A stream whose client asks no usage: kvroute asks the engine for it.
            unasked = await client.post("/v1/chat/completions", json=chat("a story", 9, True))
            # The same conversation whole: the engine's count for it, to compare.
            same = await client.post("/v1/chat/completions", json=chat("a story", 9))
            asked = await client.post(
                "/v1/chat/completions",
                json=chat("a poem", 5, True, stream_options={"include_usage": True}),
            )
            asked_usage = sse_data(asked.text)[-1]["usage"]
            expected = (
                whole.json()["usage"]["total_tokens"]
                + 2 * same.json()["usage"]["total_tokens"]
                + asked_usage["total_tokens"]
            )

            # The day's count is exact (a minute's window refills as time passes).
            async def settled() -> bool:
                return bool((await tenant_usage(url))["tokens_today"] == expected)

            await eventually(settled)
    # The client that did not ask for usage sees no usage chunk, and the stream
    # is otherwise whole; the one that asked sees it as the engine sent it.
    events = sse_data(unasked.text)
    assert all("usage" not in e for e in events) and events[-1]["choices"][0]["finish_reason"]
    assert unasked.text.rstrip().endswith("data: [DONE]")
    assert asked_usage["completion_tokens"] == 5
    assert whole.headers["x-ratelimit-limit-tokens"] == "10000"
    # admitted on the estimate: the body's bytes / 4 + max_tokens
    estimate = -(-len(orjson.dumps(completion(max_tokens=7))) // 4) + 7
    assert int(whole.headers["x-ratelimit-remaining-tokens"]) == 10_000 - estimate


async def test_a_stream_cut_by_the_client_is_settled_and_frees_its_slot() -> None:
    params = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)
    async with simulator(["m", "n"], params) as (sim, _):
        cfg = quota_config(sim, max_concurrent=1)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            async with client.stream(
                "POST", "/v1/completions", json=completion(max_tokens=200, stream=True)
            ) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    break  # the client leaves mid-stream
            busy = await client.post("/v1/completions", json=completion(max_tokens=200))

            async def freed() -> bool:
                return bool((await tenant_usage(url))["in_flight"] == 0)

            await eventually(freed)
            after = await client.post("/v1/completions", json=completion(max_tokens=2))
    assert busy.status_code in (200, 429)
    assert after.status_code == 200


async def test_concurrency_is_bounded_across_requests_in_flight(redis: RedisServer) -> None:
    params = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)
    async with simulator(["m", "n"], params) as (sim, _):
        cfg = quota_config(sim, redis.url, max_concurrent=2)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/completions", json=completion(max_tokens=15)) for _ in range(5))
            )
            await eventually(lambda: _in_flight_is(url, 0))
            again = await client.post("/v1/completions", json=completion(max_tokens=1))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 429, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert "2 requests in flight" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert again.status_code == 200


async def _in_flight_is(url: str, n: int) -> bool:
    return bool((await tenant_usage(url))["in_flight"] == n)


async def test_daily_budget_refuses_with_insufficient_quota_and_admin_resets_it(
    redis: RedisServer,
) -> None:
    async with simulator(["m", "n"]) as (sim, _):
        cfg = quota_config(sim, redis.url, daily_tokens=30)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            first = await client.post("/v1/completions", json=completion(max_tokens=40))
            spent = first.json()["usage"]["total_tokens"]

            async def counted() -> bool:
                return bool((await tenant_usage(url))["tokens_today"] == spent)

            await eventually(counted)
            refused = await client.post("/v1/completions", json=completion())
            usage = await tenant_usage(url)
            reset = await client.post("/admin/tenants/acme/reset")
            after = await client.post("/v1/completions", json=completion())
    assert spent > 30 and refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert int(refused.headers["retry-after"]) > 0
    assert usage["budget_left"] == 0 and usage["daily_tokens"] == 30
    assert reset.json() == {"tenant": "acme", "reset": True}
    assert after.status_code == 200


async def test_per_model_limits_add_to_the_tenants_own() -> None:
    async with simulator(["m", "n"]) as (sim, _):
        cfg = quota_config(sim, rpm=10, model_limits={"n": {"rpm": 1}})
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            n1 = await client.post("/v1/completions", json=completion("n"))
            n2 = await client.post("/v1/completions", json=completion("n"))
            m1 = await client.post("/v1/completions", json=completion("m"))
    assert [n1.status_code, n2.status_code, m1.status_code] == [200, 429, 200]
    assert "on model 'n'" in n2.json()["error"]["message"]
    # the headers show the tighter of the two limits
    assert n1.headers["x-ratelimit-limit-requests"] == "1"
    assert m1.headers["x-ratelimit-limit-requests"] == "10"
    # n2 was refused by its model limit, so charged nothing (all or nothing)
    assert m1.headers["x-ratelimit-remaining-requests"] == "8"


async def test_redis_down_fail_open_admits_and_limits_resume(redis: RedisServer) -> None:
    async with simulator(["m", "n"]) as (sim, _):
        cfg = quota_config(
            sim, redis.url, rpm=2, quotas={"on_failure": "fail_open", "retry_interval": 0.2}
        )
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            ok = [await client.post("/v1/completions", json=completion()) for _ in range(3)]
            await redis.stop()
            down = [await client.post("/v1/completions", json=completion()) for _ in range(5)]
            store = (await client.get("/admin/tenants")).json()["store"]
            metrics = (await client.get("/metrics")).text
            await redis.start()  # back, empty (no persistence)

            async def limited_again() -> bool:
                r = await client.post("/v1/completions", json=completion())
                return r.status_code == 429

            await eventually(limited_again)
    assert [r.status_code for r in ok] == [200, 200, 429]
    assert [r.status_code for r in down] == [200] * 5
    assert all("x-ratelimit-limit-requests" not in r.headers for r in down)
    assert store["up"] is False and store["failures"] >= 1 and store["kind"] == "redis"
    assert "kvroute_quota_store_up 0.0" in metrics
    assert "kvroute_quota_unenforced_total 5.0" in metrics


async def test_redis_down_fail_closed_refuses_with_503_then_recovers(redis: RedisServer) -> None:
    async with simulator(["m", "n"]) as (sim, _):
        cfg = quota_config(
            sim, redis.url, rpm=100, quotas={"on_failure": "fail_closed", "retry_interval": 0.2}
        )
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            before = await client.post("/v1/completions", json=completion())
            redis.pause()  # hung: connections open, nothing answers
            loop = asyncio.get_running_loop()
            started = loop.time()
            hung = await client.post("/v1/completions", json=completion())
            waited = loop.time() - started
            redis.resume()
            await redis.stop()
            dead = await client.post("/v1/completions", json=completion())
            await redis.start()

            async def admitted() -> bool:
                r = await client.post("/v1/completions", json=completion())
                return r.status_code == 200

            await eventually(admitted)
    assert before.status_code == 200
    for refused in (hung, dead):
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "quota_unavailable"
        assert refused.headers["retry-after"] == "1"
    # bounded by quotas.timeout (50 ms), not a hang: a generous bound, not a measurement
    assert waited < 5


def test_go_durations_read_like_openais() -> None:
    assert [go_duration(s) for s in (0.02, 0.5, 1, 1.2, 59.9, 60, 360, 3725)] == [
        "20ms",
        "500ms",
        "1s",
        "2s",
        "1m0s",
        "1m0s",
        "6m0s",
        "1h2m5s",
    ]


@contextlib.asynccontextmanager
async def router_process(config: Path) -> AsyncIterator[str]:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [str(KVROUTE), "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:

            async def ready() -> bool:
                assert proc.poll() is None, "router exited"
                try:
                    return (await client.get(url + "/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, within=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_two_router_processes_sharing_redis_enforce_one_limit(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with simulator(["m", "n"]) as (sim, _):
        config = tmp_path / "kvroute.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "endpoints": [{"id": "e", "url": sim, "kind": "vllm", "models": ["m"]}],
                    "auth": {"enabled": True},
                    "tenants": {"acme": {"keys": [hash_key(KEY)], "rpm": 40}},
                    # 100 requests at once on two processes: the default
                    # 0.25 s (event-loop delay included) refused some with 503.
                    "quotas": {"redis": redis.url, "on_failure": "fail_closed", "timeout": 5},
                    "server": {"access_log": False},
                    "admin": {"open": True},
                }
            )
        )
        async with router_process(config) as a, router_process(config) as b:
            async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
                loop = asyncio.get_running_loop()
                started = loop.time()
                answers = await asyncio.gather(
                    *(
                        client.post(url + "/v1/completions", json=completion())
                        for url in [a, b] * 50
                    )
                )
                elapsed = loop.time() - started
            usage_a, usage_b = await tenant_usage(a), await tenant_usage(b)
    codes = [r.status_code for r in answers]
    # A limit of 40 a minute: a burst of 40, then one more every 1.5 s, for one
    # limit across both routers (not 40 each).
    assert 40 <= codes.count(200) <= 40 + 1 + int(elapsed / 1.5), (codes, elapsed)
    # fail_closed: a store call that timed out would show as a 503
    assert codes.count(429) == 100 - codes.count(200), codes
    # and each router sees the one count
    seen_a, seen_b = usage_a["requests_per_minute"], usage_b["requests_per_minute"]
    assert abs(seen_a["remaining"] - seen_b["remaining"]) <= 1 and seen_a["remaining"] <= 1
