"""The router end to end: real uvicorn servers on loopback, the official openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from backends.sim.vllm import VLLMSimulator
from router.app import build_app
from router.config import ConfigError, parse_config
from tests.helpers import (
    eventually,
    router,
    router_config,
    serve_app,
    sim_stats,
    simulator,
)

MSG = [{"role": "user", "content": "Tell me about KV caches."}]


@asynccontextmanager
async def fleet(
    n: int = 2,
    params: EngineParams | None = None,
    faults: Faults | None = None,
    models: list[str] | None = None,
    **config: Any,
) -> AsyncIterator[tuple[str, list[tuple[str, VLLMSimulator]]]]:
    async with AsyncExitStack() as stack:
        sims = [
            await stack.enter_async_context(simulator(models or ["tiny"], params, faults))
            for _ in range(n)
        ]
        endpoints = config.pop(
            "endpoints",
            [
                {"id": f"sim-{i}", "url": url, "kind": "vllm", "models": models or ["tiny"]}
                for i, (url, _) in enumerate(sims)
            ],
        )
        cfg = router_config(endpoints, **config)
        url = await stack.enter_async_context(router(cfg))
        yield url, sims


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="client-key", max_retries=0)


async def test_openai_sdk_models_chat_stream_and_completions() -> None:
    async with fleet() as (url, sims):
        client = sdk(url)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        chat = await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6)
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 6

        stream = await client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 5
        assert len([p for p in pieces if p]) == 5

        comp = await client.completions.create(model="tiny", prompt="Once upon a", max_tokens=3)
        assert comp.usage is not None and comp.usage.completion_tokens == 3
        await client.close()
        # Round robin spread the three inference requests over both replicas.
        counts = [(await sim_stats(u))["requests"] for u, _ in sims]
        assert sorted(counts) == [1, 2]


async def test_embeddings_pass_through() -> None:
    async with fleet(n=1) as (url, _):
        client = sdk(url)
        emb = await client.embeddings.create(model="tiny", input=["a", "b"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
        await client.close()


async def test_alias_and_served_name_rewrite() -> None:
    async with simulator(["org/tiny-model"]) as (sim_url, _):
        cfg = router_config(
            [
                {
                    "id": "a",
                    "url": sim_url,
                    "kind": "vllm",
                    "models": [{"name": "tiny", "served_name": "org/tiny-model"}],
                }
            ],
            models={"tiny": {"aliases": ["gpt-4o-mini"]}},
        )
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as c:
            for name in ("tiny", "gpt-4o-mini"):
                r = await c.post(
                    "/v1/chat/completions", json={"model": name, "messages": MSG, "max_tokens": 2}
                )
                assert r.status_code == 200, r.text
                # The backend answered as org/tiny-model; the client sees the routed name.
                assert r.json()["model"] == "tiny"
            body = {"model": "tiny", "messages": MSG, "max_tokens": 2, "stream": True}
            streamed = await c.post("/v1/chat/completions", json=body)
            assert b'"model":"tiny"' in streamed.content
            assert b"org/tiny-model" not in streamed.content
            listed = (await c.get("/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == ["gpt-4o-mini", "tiny"]


async def test_stream_is_not_buffered() -> None:
    """The first chunk reaches the client while the simulator is still generating."""
    slow = EngineParams(step_base=0.05, prefill_per_token=0.0, decode_per_seq=0.0)
    async with fleet(n=1, params=slow) as (url, sims), httpx.AsyncClient(base_url=url) as c:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 40, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
            stats = await sim_stats(sims[0][0])
            # The upstream has produced only part of its 40 tokens so far.
            assert stats["generation_tokens"] < 40
            assert stats["running"] == 1
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]"


async def test_client_disconnect_cancels_upstream() -> None:
    slow = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)
    async with fleet(n=1, params=slow) as (url, sims):
        sim_url = sims[0][0]
        async with httpx.AsyncClient(base_url=url) as c:
            body = {"model": "tiny", "messages": MSG, "max_tokens": 500, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                await anext(r.aiter_lines())
            # Leaving the block closed the connection mid-stream.

        async def aborted() -> bool:
            return (await sim_stats(sim_url))["finished"]["abort"] == 1

        await eventually(aborted)
        stats = await sim_stats(sim_url)
        assert stats["generation_tokens"] < 500 and stats["running"] == 0


async def test_client_disconnect_cancels_a_non_streamed_request() -> None:
    slow = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)
    async with fleet(n=1, params=slow) as (url, sims):
        sim_url = sims[0][0]

        async def running() -> bool:
            return (await sim_stats(sim_url))["running"] == 1

        async with httpx.AsyncClient(base_url=url) as c:
            body = {"model": "tiny", "messages": MSG, "max_tokens": 500}
            task = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            await eventually(running)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        async def aborted() -> bool:
            return (await sim_stats(sim_url))["finished"]["abort"] == 1

        await eventually(aborted)


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    return err


async def test_bad_requests_get_openai_errors() -> None:
    async with fleet(n=1, server={"max_body_bytes": 4096, "access_log": False}) as (url, _):
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", content=b"{not json")
            assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"

            r = await c.post("/v1/chat/completions", content=b"[1, 2]")
            assert r.status_code == 400 and "JSON object" in error_of(r)["message"]

            r = await c.post("/v1/chat/completions", json={"messages": MSG})
            assert r.status_code == 400 and error_of(r)["param"] == "model"

            r = await c.post("/v1/chat/completions", json={"model": "tiny"})
            assert r.status_code == 400 and error_of(r)["param"] == "messages"

            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [1]})
            assert r.status_code == 400 and error_of(r)["param"] == "messages[0]"

            r = await c.post(
                "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "stream": "yes"}
            )
            assert r.status_code == 400 and error_of(r)["param"] == "stream"

            r = await c.post("/v1/completions", json={"model": "tiny"})
            assert r.status_code == 400 and error_of(r)["param"] == "prompt"

            r = await c.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSG})
            assert r.status_code == 404
            assert error_of(r)["code"] == "model_not_found" and error_of(r)["param"] == "model"

            big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
            r = await c.post("/v1/chat/completions", json=big)
            assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(10):
                    yield b"x" * 1000

            r = await c.post("/v1/chat/completions", content=chunked())
            assert r.status_code == 413

            r = await c.get("/v1/chat/completions")
            assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"

            r = await c.get("/v2/nothing")
            assert r.status_code == 404 and error_of(r)["code"] == "not_found"

            # An upstream 4xx is relayed with its status, in OpenAI's shape.
            r = await c.post(
                "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": -1}
            )
            assert r.status_code == 400
            assert error_of(r)["param"] == "max_tokens"
            assert error_of(r)["type"] == "invalid_request_error"


async def test_openai_sdk_raises_typed_errors() -> None:
    async with fleet(n=1) as (url, _):
        client = sdk(url)
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="nope", messages=MSG)
        assert info.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=-1)
        await client.close()


async def test_upstream_failures_map_to_502_503_504() -> None:
    dead = [{"id": "dead", "url": "http://127.0.0.1:9", "kind": "vllm", "models": ["tiny"]}]
    async with router(router_config(dead)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 502 and error_of(r)["code"] == "upstream_connect_error"
        ready = await c.get("/ready")
        assert ready.status_code == 200  # health checks arrive with the failover work

    hung = Faults(stall=-1)
    async with fleet(n=1, faults=hung, timeouts={"first_byte": 0.3}) as (url, _):
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert r.status_code == 504 and error_of(r)["code"] == "upstream_timeout"

    failing = Faults(fail_rate=1.0, fail_status=503)
    async with fleet(n=1, faults=failing) as (url, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 503 and error_of(r)["message"] == "simulated failure"


async def test_no_available_endpoint_is_503_and_not_ready() -> None:
    async with simulator() as (sim_url, _):
        app = build_app(router_config([{"id": "a", "url": sim_url, "models": ["tiny"]}]))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as c:
            endpoint = app.state.registry.get("a")
            assert endpoint is not None
            endpoint.draining = True
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert r.status_code == 503 and error_of(r)["code"] == "no_healthy_endpoint"
            assert (await c.get("/ready")).status_code == 503
            endpoint.draining = False
            assert (await c.get("/ready")).status_code == 200


async def test_mid_stream_death_ends_with_an_error_event() -> None:
    dies = Faults(die_after_chunks=3)
    async with fleet(n=1, faults=dies) as (url, _), httpx.AsyncClient(base_url=url) as c:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 20, "stream": True}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        events = [e for e in r.content.split(b"\n\n") if e]
        assert len(events) == 4  # three chunks, then the error event
        last = orjson.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "upstream_connect_error"
        assert b"[DONE]" not in r.content
        metrics = (await c.get("/metrics")).text
        assert 'kvroute_stream_errors_total{endpoint="sim-0"} 1.0' in metrics


async def test_request_id_metrics_health_and_ready() -> None:
    async with fleet(n=1) as (url, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": MSG, "max_tokens": 2},
            headers={"x-request-id": "abc-123"},
        )
        assert r.headers["x-request-id"] == "abc-123"
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
        assert len(r.headers["x-request-id"]) == 32
        r = await c.post("/v1/chat/completions", content=b"{")
        assert len(r.headers["x-request-id"]) == 32  # errors carry one too
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2, "stream": True}
        await c.post("/v1/chat/completions", json=body)

        assert (await c.get("/health")).json() == {"status": "ok"}
        ready = await c.get("/ready")
        assert ready.status_code == 200 and ready.json()["healthy_endpoints"] == 1

        text = (await c.get("/metrics")).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

        def value(name: str, **labels: str) -> float:
            return sum(
                s.value
                for s in samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        assert value("kvroute_requests_total", model="tiny", endpoint="sim-0", status="200") == 3
        assert value("kvroute_request_duration_seconds_count", model="tiny") == 3
        assert value("kvroute_time_to_first_token_seconds_count", model="tiny") == 1
        assert value("kvroute_in_flight_requests", endpoint="sim-0") == 0
        assert value("kvroute_event_loop_tasks") >= 1  # counted in the loop, at scrape time
        assert value("kvroute_routing_decisions_total", model="tiny", policy="round_robin") == 3


async def test_access_log_is_one_json_line_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with fleet(n=1, server={"access_log": True}) as (url, _):
        async with httpx.AsyncClient(base_url=url) as c:
            with caplog.at_level("INFO", logger="kvroute.access"):
                await c.post(
                    "/v1/chat/completions",
                    json={"model": "tiny", "messages": MSG, "max_tokens": 2},
                    headers={"x-request-id": "log-1"},
                )
    (record,) = [r for r in caplog.records if r.name == "kvroute.access"]
    assert isinstance(record.msg, dict)
    line = record.msg
    assert line["request_id"] == "log-1" and line["status"] == 200
    assert "cancelled" not in line  # the disconnect uvicorn reports after a response is no abort
    assert (line["model"], line["endpoint"], line["policy"]) == ("tiny", "sim-0", "round_robin")


async def test_headers_go_upstream_by_allowlist_only() -> None:
    seen: list[dict[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "POST":  # not the router's health probes
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        body = b'{"id":"x","object":"chat.completion","choices":[]}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async with serve_app(app) as upstream:
        cfg = router_config(
            [{"id": "u", "url": upstream, "api_key": "backend-secret", "models": ["m"]}],
            forward_headers=["X-Tenant-Hint"],
        )
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as c:
            r = await c.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": MSG},
                headers={
                    "authorization": "Bearer client-secret",
                    "connection": "keep-alive, x-hop",
                    "x-hop": "named in Connection",
                    "x-custom": "not allowed",
                    "x-forwarded-for": "6.6.6.6",
                    "x-forwarded-host": "evil",
                    "expect": "100-continue",
                    "cookie": "session=1",
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "tracestate": "vendor=1",
                    "x-tenant-hint": "blue",
                },
            )
            assert r.status_code == 200
    (headers,) = seen
    assert headers["authorization"] == "Bearer backend-secret"
    assert headers["traceparent"].startswith("00-0af7651916cd43dd")
    assert headers["tracestate"] == "vendor=1" and headers["x-tenant-hint"] == "blue"
    assert headers["x-request-id"] == r.headers["x-request-id"]
    assert headers["accept-encoding"] == "identity"
    for name in ("x-custom", "x-hop", "x-forwarded-for", "x-forwarded-host", "expect", "cookie"):
        assert name not in headers, name
    assert "x-hop" not in headers.get("connection", "")


def test_forward_headers_may_not_name_credentials_or_hop_by_hop() -> None:
    for name in ("Authorization", "cookie", "Connection", "x-request-id", "bad header"):
        with pytest.raises(ConfigError):
            parse_config(f"forward_headers: ['{name}']", {})


async def post_raw(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
) -> int:
    """One keep-alive POST written in one piece (httpx writes headers and body
    apart, and Nagle + delayed ACK then cost 40 ms a request on loopback)."""
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    writer.write(head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def test_made_up_model_names_neither_grow_metrics_nor_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with fleet(n=1, server={"access_log": True}) as (url, _):
        async with httpx.AsyncClient(base_url=url) as c:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            with caplog.at_level("INFO", logger="kvroute.access"):
                for i in range(2000):
                    body = orjson.dumps({"model": f"made-up-{i}", "prompt": "x"})
                    assert await post_raw(reader, writer, "/v1/completions", body) == 404
                    if i == 9:
                        after_ten = len((await c.get("/metrics")).content)
                huge = "m" * (1 << 20)
                r = await c.post("/v1/completions", json={"model": huge, "prompt": "x"})
                assert r.status_code == 404 and len(r.content) < 1000
            writer.close()
            metrics = (await c.get("/metrics")).text
    # One label for every unknown model, whatever the client wrote: 2,000 more
    # names add only the digits of the counters.
    assert len(metrics.encode()) < after_ten + 200
    assert 'model="(unknown)"' in metrics and "made-up-" not in metrics
    lines = [
        r.msg
        for r in caplog.records
        if r.name == "kvroute.access" and isinstance(r.msg, dict) and r.msg["status"] == 404
    ]
    assert len(lines) == 2001
    assert all(isinstance(m, dict) and len(str(m)) < 2000 for m in lines)
