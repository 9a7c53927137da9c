"""The relay against misbehaving backends, over real loopback sockets.

Each backend here is a small raw ASGI app that does one bad thing: compress
without being asked, send a stream kvroute cannot read, pause before its
first chunk or in the middle, put credentials in its URL.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from router.types import Receive, Scope, Send
from tests.helpers import Backend, backend, router, router_config, serve_app, simulator

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
OPENAI_ANSWER = orjson.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


def sse(*events: dict[str, Any]) -> list[bytes]:
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]


def chunk(text: str) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


@asynccontextmanager
async def behind_router(app: Backend, kind: str = "openai", **config: Any) -> AsyncIterator[str]:
    async with serve_app(app) as url:
        endpoints = [{"id": "b", "url": url, "kind": kind, "models": ["m"]}]
        config.setdefault("health", {"enabled": False})
        config.setdefault("scrape", {"enabled": False})
        async with router(router_config(endpoints, **config)) as r:
            yield r


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# -- compression (defect 3) ----------------------------------------------------------


async def test_a_backend_that_compresses_anyway_is_decoded_for_the_client() -> None:
    seen: list[str] = []

    async def gzipping(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await backend(200, [], [])(scope, receive, send)
            return
        seen.append(dict(scope["headers"]).get(b"accept-encoding", b"").decode())
        stream = b'"stream":true' in (await receive())["body"]
        body = b"".join(sse(chunk("he"), chunk("llo"))) + b"data: [DONE]\n\n"
        data, ctype = (
            (body, b"text/event-stream") if stream else (OPENAI_ANSWER, b"application/json")
        )
        compressor = zlib.compressobj(wbits=31)  # gzip framing
        encoded = compressor.compress(data) + compressor.flush()
        headers = [(b"content-type", ctype), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Streamed in two pieces, as a compressing proxy flushes.
        await send({"type": "http.response.body", "body": encoded[:10], "more_body": True})
        await send({"type": "http.response.body", "body": encoded[10:]})

    async with behind_router(gzipping) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and "content-encoding" not in r.headers
        assert r.json()["choices"][0]["message"]["content"] == "hello"
        s = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert s.status_code == 200 and s.headers["content-type"] == "text/event-stream"
        assert b'"content":"he"' in s.content and s.content.endswith(b"data: [DONE]\n\n")
        metrics = (await client.get(url + "/metrics")).text
    assert seen == ["identity", "identity"]  # and kvroute asked for none
    # Usage was read off the decoded bytes.
    assert metric(metrics, "kvroute_prompt_tokens_total", model="m") == 3


# -- streams kvroute cannot read (defect 4) ------------------------------------------


async def test_a_malformed_tgi_event_mid_stream_ends_with_an_error_event_and_counts() -> None:
    good = {"index": 1, "token": {"id": 1, "text": "a", "special": False}, "details": None}
    bad = {"index": 2, "token": "not an object", "details": None}
    app = backend(200, [(b"content-type", b"text/event-stream")], sse(good, bad), {1: 0.2})
    async with behind_router(app, kind="tgi") as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200
        events = [e.removeprefix(b"data: ") for e in r.content.split(b"\n\n") if e]
        assert orjson.loads(events[1])["choices"][0]["delta"]["content"] == "a"
        error = orjson.loads(events[-1])["error"]
        assert "cannot read" in error["message"] and error["type"] == "upstream_error"
        assert b"[DONE]" not in r.content
        metrics = (await client.get(url + "/metrics")).text
    assert metric(metrics, "kvroute_stream_errors_total", endpoint="b") == 1


async def test_a_malformed_first_event_fails_over_before_the_client_sees_anything() -> None:
    bad = backend(200, [(b"content-type", b"text/event-stream")], sse({"token": 5}))
    async with serve_app(bad) as bad_url, simulator(["m"], kind="tgi") as (good_url, _):
        endpoints = [
            {"id": "bad", "url": bad_url, "kind": "tgi", "models": ["m"]},
            {"id": "good", "url": good_url, "kind": "tgi", "models": ["m"]},
        ]
        cfg = router_config(
            endpoints,
            models={"m": {"policy": "least_load"}},
            health={"enabled": False},
            scrape={"enabled": False},
        )
        async with router(cfg) as url, httpx.AsyncClient() as client:
            for _ in range(2):  # whichever is ranked first, the answer is whole
                r = await client.post(
                    url + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 3}
                )
                assert r.status_code == 200, r.text
                assert r.content.endswith(b"data: [DONE]\n\n")


# -- first chunk vs idle (defect 5) ----------------------------------------------------


async def test_the_first_chunk_waits_up_to_first_byte_and_later_ones_up_to_idle() -> None:
    parts = [*sse(chunk("slow"), chunk(" start")), b"data: [DONE]\n\n"]
    queued = backend(200, [(b"content-type", b"text/event-stream")], parts, pauses={0: 1.0})
    timeouts = {"first_byte": 30, "idle": 0.3}
    async with behind_router(queued, timeouts=timeouts) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
    stalls = backend(200, [(b"content-type", b"text/event-stream")], parts, pauses={1: 3.0})
    async with behind_router(stalls, timeouts=timeouts) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        events = [e for e in r.content.split(b"\n\n") if e]
        assert b'"content":"slow"' in events[0]
        error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
        assert error["code"] == "upstream_timeout" and "idle" in error["message"]


async def test_no_first_chunk_within_first_byte_is_a_timeout_before_the_first_byte() -> None:
    parts = sse(chunk("late"))
    late = backend(200, [(b"content-type", b"text/event-stream")], parts, pauses={0: 3.0})
    timeouts = {"first_byte": 0.5, "idle": 30}
    async with behind_router(late, timeouts=timeouts) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


# -- credentials in URLs (defect 10) ----------------------------------------------------


async def test_errors_and_admin_never_show_url_credentials() -> None:
    endpoints = [
        {
            "id": "secret-ep",
            "url": "http://alice:s3cret@127.0.0.1:9/v1?key=k3y",
            "metrics_url": "http://bob:hunter2@127.0.0.1:9/metrics",
            "kind": "vllm",
            "models": ["m"],
        }
    ]
    cfg = router_config(
        endpoints,
        health={"enabled": False},
        scrape={"enabled": False},
        retries={"max_attempts": 1},
    )
    async with router(cfg) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 502
        assert "secret-ep" in r.json()["error"]["message"]
        texts = [r.text]
        for path in ("/admin/endpoints", "/admin/config"):
            texts.append((await client.get(url + path)).text)
    for text in texts:
        for secret in ("s3cret", "hunter2", "k3y", "alice", "bob", "key=k3y"):
            assert secret not in text, (secret, text[:300])
    assert "http://***@127.0.0.1:9/v1" in texts[1]


async def test_a_stream_that_ends_before_its_first_chunk_fails_over() -> None:
    empty = backend(200, [(b"content-type", b"text/event-stream")], [])
    async with serve_app(empty) as empty_url, simulator(["m"]) as (good_url, _):
        endpoints = [
            {"id": "empty", "url": empty_url, "kind": "openai", "models": ["m"]},
            {"id": "good", "url": good_url, "kind": "vllm", "models": ["m"]},
        ]
        cfg = router_config(endpoints, health={"enabled": False}, scrape={"enabled": False})
        async with router(cfg) as url, httpx.AsyncClient() as client:
            for _ in range(2):  # round robin: each endpoint is ranked first once
                r = await client.post(
                    url + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2}
                )
                assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
            admin = (await client.get(url + "/admin/endpoints")).json()["endpoints"]
    assert "ended before its first chunk" in next(
        e["last_error"] for e in admin if e["id"] == "empty"
    )


async def test_a_pooled_connection_the_backend_closed_is_retried_once() -> None:
    """The race with a backend's keep-alive timer: a request written to a pooled
    connection the server closes without answering goes out once more."""
    import re as regex

    from router.config import Timeouts
    from router.forward import Forwarder, UpstreamRequest

    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        mine, answered = connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                found = regex.search(rb"content-length: (\d+)", head, regex.I)
                await reader.readexactly(int(found.group(1)) if found else 0)
                if mine == 1 and answered == 1:
                    return  # closes the connection without a byte of answer
                body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                answered += 1
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    forwarder = Forwarder(Timeouts())
    await forwarder.start()
    try:
        statuses = []
        for _ in range(2):
            request = UpstreamRequest("e", f"http://127.0.0.1:{port}/x", b"{}", {})
            resp = await forwarder.send(request, stream=False)
            statuses.append((resp.status, await resp.read()))
            resp.release()
    finally:
        await forwarder.close()
        server.close()
        await server.wait_closed()
    assert statuses == [(200, b'{"ok": true}')] * 2
    assert connections == 2


# -- what a backend may send, bounded ---------------------------------------------------


async def test_a_redirect_is_not_followed_and_is_the_backends_fault() -> None:
    """A backend (or whoever answers for it) sending 307 elsewhere must not make
    kvroute re-post the client's prompt there."""
    posted_to_target: list[bytes] = []

    async def target(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            posted_to_target.append((await receive())["body"])
        await backend(200, [(b"content-type", b"application/json")], [OPENAI_ANSWER])(
            scope, receive, send
        )

    async with serve_app(target) as target_url:
        moved = [(b"location", (target_url + "/v1/chat/completions").encode())]
        async with (
            behind_router(backend(307, moved, [b""])) as url,
            httpx.AsyncClient() as client,
        ):
            for body in (CHAT, {**CHAT, "stream": True}):
                r = await client.post(url + "/v1/chat/completions", json=body)
                assert r.status_code == 502
                error = r.json()["error"]
                assert error["type"] == "upstream_error" and "HTTP 307" in error["message"]
    assert posted_to_target == []


async def test_a_status_outside_http_classes_is_a_clean_502() -> None:
    """aiohttp reads any three digits; uvicorn has no status line past 599 (it
    dropped the client's connection with no answer)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length")
        )
        await reader.readexactly(length)
        body = b'{"error":"odd"}'
        writer.write(
            b"HTTP/1.1 999 Odd\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoints = [{"id": "b", "url": f"http://127.0.0.1:{port}", "kind": "openai", "models": ["m"]}]
    cfg = router_config(endpoints, health={"enabled": False}, scrape={"enabled": False})
    async with server, router(cfg) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 502 and "HTTP 999" in r.json()["error"]["message"]


async def test_an_answer_over_the_bound_is_a_502_and_error_fields_are_cut(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr("router.relay.MAX_ANSWER_BYTES", 10_000)
    big = orjson.dumps({**orjson.loads(OPENAI_ANSWER), "pad": "x" * 20_000})
    json_type = [(b"content-type", b"application/json")]
    # In pieces and without a length, so that only counting can tell.
    parts = [big[i : i + 4096] for i in range(0, len(big), 4096)]
    async with behind_router(backend(200, json_type, parts)) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 502 and "over 10000 bytes" in r.json()["error"]["message"]
    wordy = orjson.dumps(
        {"error": {"message": "m" * 5000, "type": "t" * 500, "param": "p" * 500, "code": "c" * 500}}
    )
    error_parts = [wordy, b" " * (200 << 10)]  # and a long tail nobody needs
    async with (
        behind_router(backend(400, json_type, error_parts)) as url,
        httpx.AsyncClient() as client,
    ):
        r = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 400
        error = r.json()["error"]
        assert len(error["message"]) == 2000
        assert error["param"] == "p" * 64 and error["code"] == "c" * 64


async def test_a_tgi_event_that_never_ends_is_cut_off(monkeypatch: Any) -> None:
    monkeypatch.setattr("backends.sse.MAX_EVENT_BYTES", 50_000)
    good = {"index": 1, "token": {"id": 1, "text": "a", "special": False}, "details": None}
    endless = [*sse(good), b"data: " + b"x" * 4096, *([b"x" * 4096] * 40)]
    app = backend(200, [(b"content-type", b"text/event-stream")], endless, {1: 0.2})
    async with behind_router(app, kind="tgi") as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200
        error = orjson.loads(r.content.split(b"\n\n")[-2].removeprefix(b"data: "))["error"]
        assert "longer than 50000 bytes" in error["message"]
