"""Traces end to end over loopback: the trace context the backends get, the
access log's trace id, and (with a TracerProvider handed in, or built from
the config) the spans: one server span per request, one client span per
attempt, the first token as an event."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from backends.sim.server import build_simulator
from router.app import build_app
from router.config import Config, ConfigError, parse_config
from router.lifecycle import TracingService
from router.state import AppState
from router.types import ASGIApp, Receive, Scope, Send
from tests.helpers import router, router_config, serve_app

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
CLIENT_TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
MSG = [{"role": "user", "content": "Tell me where my trace goes."}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": MSG, "max_tokens": 4, **extra}


def recording(app: ASGIApp, seen: list[dict[str, str]]) -> ASGIApp:
    """``app``, noting the headers of every POST it gets (not the health probes)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    return wrapped


@contextlib.asynccontextmanager
async def backends(
    stack: AsyncExitStack, *faults: Faults | None
) -> AsyncIterator[list[tuple[str, list[dict[str, str]]]]]:
    """Simulated vLLM servers (one per ``faults``), each with the headers it saw."""
    out = []
    for fault in faults:
        sim = build_simulator("vllm", ["tiny"], EngineParams.zero_latency(), fault)
        seen: list[dict[str, str]] = []
        url = await stack.enter_async_context(serve_app(recording(sim.app, seen)))
        out.append((url, seen))
    yield out


def endpoints(urls: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": f"s{i}", "url": u, "kind": "vllm", "models": ["tiny"]} for i, u in enumerate(urls)
    ]


def in_memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@contextlib.asynccontextmanager
async def traced_router(config: Config, provider: TracerProvider) -> AsyncIterator[str]:
    async with serve_app(build_app(config, tracer_provider=provider)) as url:
        yield url


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in caplog.records
        if r.name == "kvroute.access" and isinstance(r.msg, dict) and r.msg["path"] != "/health"
    ]


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.kind is kind), key=lambda s: s.start_time or 0)


# -- tracing off: the trace context alone ------------------------------------------------------


async def test_the_clients_trace_reaches_the_backend_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with AsyncExitStack() as stack, backends(stack, None) as [(sim, seen)]:
        cfg = router_config(endpoints([sim]), server={"access_log": True})
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url) as c:
            with caplog.at_level(logging.INFO, logger="kvroute.access"):
                r = await c.post(
                    "/v1/chat/completions",
                    json=chat(),
                    headers={
                        "traceparent": CLIENT_TRACEPARENT,
                        "tracestate": "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE",
                    },
                )
    assert r.status_code == 200
    (headers,) = seen
    # Tracing off, kvroute is no participant: the client's span stays the parent.
    assert headers["traceparent"] == CLIENT_TRACEPARENT
    assert headers["tracestate"] == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    (line,) = access_lines(caplog)
    assert line["trace_id"] == TRACE


@pytest.mark.parametrize(
    "bad",
    [
        {"traceparent": f"00-{'0' * 32}-{PARENT}-01", "tracestate": "a=1"},
        {"traceparent": CLIENT_TRACEPARENT.upper(), "tracestate": "a=1"},
        {"traceparent": "01" + CLIENT_TRACEPARENT[2:] + "-" + "a" * 2000, "tracestate": "a=1"},
        {"tracestate": "a=1"},
        {},
    ],
)
async def test_a_missing_or_invalid_traceparent_starts_a_new_trace(
    caplog: pytest.LogCaptureFixture, bad: dict[str, str]
) -> None:
    async with AsyncExitStack() as stack, backends(stack, None) as [(sim, seen)]:
        cfg = router_config(endpoints([sim]), server={"access_log": True})
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url) as c:
            with caplog.at_level(logging.INFO, logger="kvroute.access"):
                r = await c.post("/v1/chat/completions", json=chat(), headers=bad)
    assert r.status_code == 200
    (headers,) = seen
    # Tracing off: the new trace is kvroute's log's alone. An unsampled parent
    # sent on would switch the backend's own tracing off, so none is sent.
    assert "traceparent" not in headers
    assert "tracestate" not in headers  # it belonged to the trace that was refused
    (line,) = access_lines(caplog)
    assert len(line["trace_id"]) == 32 and line["trace_id"] not in (TRACE, "0" * 32)


async def test_every_log_line_has_a_trace_id_even_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = router_config(endpoints(["http://127.0.0.1:9"]), server={"access_log": True})
    async with router(cfg) as url, httpx.AsyncClient(base_url=url) as c:
        with caplog.at_level(logging.INFO, logger="kvroute.access"):
            r = await c.post(
                "/v1/chat/completions",
                json=chat(model="nope"),
                headers={"traceparent": CLIENT_TRACEPARENT},
            )
            await c.get("/v1/models")
    assert r.status_code == 404
    refused, models = access_lines(caplog)
    assert refused["status"] == 404 and refused["trace_id"] == TRACE
    assert models["path"] == "/v1/models" and len(models["trace_id"]) == 32


def test_forward_headers_may_not_pass_the_trace_context_through() -> None:
    for name in ("traceparent", "TraceState"):
        with pytest.raises(ConfigError, match="trace context"):
            parse_config(f"forward_headers: ['{name}']", {})


# -- tracing on: spans in memory ---------------------------------------------------------------


async def test_a_request_is_a_server_span_with_its_decision_and_a_client_span() -> None:
    provider, exporter = in_memory()
    async with AsyncExitStack() as stack, backends(stack, None) as [(sim, seen)]:
        cfg = router_config(endpoints([sim]), models={"tiny": {"policy": "prefix_affinity"}})
        url = await stack.enter_async_context(traced_router(cfg, provider))
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post(
                "/v1/chat/completions",
                json=chat(),
                headers={"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=1"},
            )
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    # The server span continues the client's trace, under the client's span.
    assert format_trace_id(server.context.trace_id) == TRACE
    assert server.parent is not None and format_span_id(server.parent.span_id) == PARENT
    assert server.name == "POST /v1/chat/completions"
    attrs = server.attributes or {}
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.request.model"] == "tiny"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["kvroute.policy"] == "prefix_affinity"
    assert isinstance(attrs["kvroute.reason"], str) and attrs["kvroute.reason"]
    assert attrs["kvroute.endpoint"] == "s0" and attrs["kvroute.attempts"] == 1
    assert attrs["kvroute.prefix.prompt_chars"] > 0  # type: ignore[operator]
    assert "kvroute.prefix.match_chars" in attrs and "kvroute.prefix.match_ratio" in attrs
    assert attrs["kvroute.request_id"] == r.headers["x-request-id"]
    # The attempt is the server span's child, and the backend's parent.
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    cattrs = client.attributes or {}
    assert cattrs["server.address"] == "127.0.0.1" and cattrs["kvroute.endpoint"] == "s0"
    assert cattrs["kvroute.attempt"] == 1 and cattrs["http.response.status_code"] == 200
    assert client.status.status_code is StatusCode.UNSET
    (headers,) = seen
    assert headers["traceparent"] == f"00-{TRACE}-{format_span_id(client.context.span_id)}-01"
    assert headers["tracestate"] == "vendor=1"
    # No prompt text anywhere in the spans.
    for span in spans:
        assert "Tell me" not in str(span.to_json())


async def test_failover_is_two_client_spans_the_first_in_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, exporter = in_memory()
    failing = Faults(fail_rate=1.0, fail_status=503)
    async with AsyncExitStack() as stack, backends(stack, failing, None) as sims:
        (bad, bad_seen), (good, good_seen) = sims
        cfg = router_config(endpoints([bad, good]), server={"access_log": True})
        url = await stack.enter_async_context(traced_router(cfg, provider))
        async with httpx.AsyncClient(base_url=url) as c:
            with caplog.at_level(logging.INFO, logger="kvroute.access"):
                r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    first, second = by_kind(spans, SpanKind.CLIENT)
    assert {first.parent.span_id, second.parent.span_id} == {server.context.span_id}  # type: ignore[union-attr]
    assert (first.attributes or {})["kvroute.endpoint"] == "s0"
    assert (first.attributes or {})["kvroute.attempt"] == 1
    assert (first.attributes or {})["http.response.status_code"] == 503
    assert (first.attributes or {})["error.type"] == "503"
    assert first.status.status_code is StatusCode.ERROR
    assert (second.attributes or {})["kvroute.endpoint"] == "s1"
    assert (second.attributes or {})["kvroute.attempt"] == 2
    assert second.status.status_code is StatusCode.UNSET
    assert (server.attributes or {})["kvroute.attempts"] == 2
    assert server.status.status_code is StatusCode.UNSET
    # Each backend saw its own attempt's span as its parent, in one trace.
    trace_id = format_trace_id(server.context.trace_id)
    (b,), (g,) = bad_seen, good_seen
    assert b["traceparent"] == f"00-{trace_id}-{format_span_id(first.context.span_id)}-01"
    assert g["traceparent"] == f"00-{trace_id}-{format_span_id(second.context.span_id)}-01"
    # A new trace (no traceparent from the client): the span's trace is the log's.
    assert server.parent is None
    (line,) = access_lines(caplog)
    assert line["trace_id"] == trace_id


async def test_a_streamed_answer_has_its_first_token_as_an_event() -> None:
    provider, exporter = in_memory()
    async with AsyncExitStack() as stack, backends(stack, None) as [(sim, _)]:
        url = await stack.enter_async_context(
            traced_router(router_config(endpoints([sim])), provider)
        )
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json=chat(stream=True))
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            plain = await c.post("/v1/chat/completions", json=chat())
            assert plain.status_code == 200
    streamed, whole = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    (event,) = streamed.events
    assert event.name == "first_token"
    assert streamed.start_time is not None and streamed.end_time is not None
    assert streamed.start_time <= event.timestamp <= streamed.end_time
    assert (event.attributes or {})["kvroute.ttft_ms"] >= 0  # type: ignore[operator]
    assert not whole.events


async def test_an_error_answer_is_a_span_too_and_5xx_is_an_error() -> None:
    provider, exporter = in_memory()
    cfg = router_config(endpoints(["http://127.0.0.1:9"]), retries={"max_attempts": 1})
    async with traced_router(cfg, provider) as url, httpx.AsyncClient(base_url=url) as c:
        missing = await c.post("/v1/chat/completions", json=chat(model="nope"))
        down = await c.post("/v1/chat/completions", json=chat())
        await c.get("/health")  # not an inference request: no span
    assert missing.status_code == 404 and down.status_code in (502, 503)
    spans = exporter.get_finished_spans()
    first, second = by_kind(spans, SpanKind.SERVER)
    assert (first.attributes or {})["http.response.status_code"] == 404
    assert "gen_ai.request.model" not in (first.attributes or {})  # "nope" is no model
    assert first.status.status_code is StatusCode.UNSET
    assert second.status.status_code is StatusCode.ERROR
    assert len([s for s in spans if s.kind is SpanKind.SERVER]) == 2


# -- tracing from the config: OTLP/HTTP to a collector -----------------------------------------


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """An OTLP/HTTP receiver on loopback: the headers and body of each export."""
    got: list[tuple[dict[str, str], bytes]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        got.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async with serve_app(app) as url:
        yield url, got


async def test_spans_go_to_the_configured_collector_and_its_headers_stay_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "otlp-secret-value-42"
    async with AsyncExitStack() as stack, backends(stack, None) as [(sim, _)]:
        otlp, got = await stack.enter_async_context(collector())
        endpoint = otlp.replace("http://", "http://user:url-password@")
        cfg = router_config(
            endpoints([sim]),
            tracing={
                "otlp_endpoint": endpoint,
                "service_name": "kvroute-test",
                "headers": {"x-collector-key": secret},
            },
            server={"access_log": True},
        )
        with caplog.at_level(logging.DEBUG):
            async with router(cfg) as url, httpx.AsyncClient(base_url=url) as c:
                r = await c.post("/v1/chat/completions", json=chat())
                assert r.status_code == 200
                shown = (await c.get("/admin/config")).text
            # The router has stopped: its exporter flushed what it held.
    assert secret not in shown and "url-password" not in shown
    assert '"x-collector-key":"**********"' in shown
    assert secret not in caplog.text and "url-password" not in caplog.text
    assert got, "nothing was exported"
    headers, body = got[0]
    assert headers["x-collector-key"] == secret
    export = ExportTraceServiceRequest.FromString(body)
    names = {
        span.name for rs in export.resource_spans for ss in rs.scope_spans for span in ss.spans
    }
    assert {"POST /v1/chat/completions", "POST s0"} <= names
    (service,) = [
        a.value.string_value
        for a in export.resource_spans[0].resource.attributes
        if a.key == "service.name"
    ]
    assert service == "kvroute-test"


@pytest.mark.parametrize(
    "endpoint",
    ["collector:4318", "grpc://collector:4317", "http://user:pw-secret@host:99999", "http:// x"],
)
def test_a_bad_otlp_endpoint_is_a_clear_config_error(endpoint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"tracing: {{otlp_endpoint: '{endpoint}'}}", {})
    (message,) = err.value.errors
    assert message.startswith("tracing.otlp_endpoint: ")
    assert "OTLP/HTTP" in message or "port" in message
    assert "pw-secret" not in message


def test_an_endpoint_without_a_path_gets_the_traces_path() -> None:
    cfg = parse_config("tracing: {otlp_endpoint: 'http://collector:4318'}", {})
    assert cfg.tracing.otlp_endpoint == "http://collector:4318/v1/traces"
    same = parse_config("tracing: {otlp_endpoint: 'https://c.example/otlp/v1/traces'}", {})
    assert same.tracing.otlp_endpoint == "https://c.example/otlp/v1/traces"
    # The path goes where a path goes, before a query (a collector's key, say).
    keyed = parse_config("tracing: {otlp_endpoint: 'https://c.example:4318/?key=abc'}", {})
    assert keyed.tracing.otlp_endpoint == "https://c.example:4318/v1/traces?key=abc"
    assert not parse_config("tracing: {sample_ratio: 0.5}", {}).tracing.enabled


def test_a_bad_otlp_header_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            "tracing: {otlp_endpoint: 'http://c:4318', headers: {key: \"s3cret\\r\\nx: y\"}}", {}
        )
    assert "line break" in str(err.value) and "s3cret" not in str(err.value)


def test_tracing_without_the_otel_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What an install without the extra looks like to the import system.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    with pytest.raises(ConfigError) as err:
        parse_config("tracing: {otlp_endpoint: 'http://collector:4318'}", {})
    (message,) = err.value.errors
    assert message.startswith("tracing: ") and "pip install 'kvroute[otel]'" in message
    # Without tracing asked for, the extra is not needed.
    assert not parse_config("endpoints: []", {}).tracing.enabled


async def test_a_reload_that_changes_tracing_swaps_the_exporter() -> None:
    off = router_config(endpoints(["http://127.0.0.1:9"]))
    on = router_config(
        endpoints(["http://127.0.0.1:9"]), tracing={"otlp_endpoint": "http://127.0.0.1:9"}
    )
    state = AppState.from_config(off)
    service = TracingService(state)
    await service.start()
    assert state.tracing is None
    await service.reconfigure(off, on)
    first = state.tracing
    assert first is not None and first.owned
    await service.reconfigure(on, on)  # unchanged: the same exporter
    assert state.tracing is first
    await service.reconfigure(on, off)
    assert state.tracing is None
    await service.stop()


def _decide(ratio: float, trust: bool, client_sampled: bool) -> bool:
    from opentelemetry.sdk.trace.sampling import Decision
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    from router.tracing import sampler

    config = parse_config(
        "tracing: {otlp_endpoint: 'http://127.0.0.1:4318', "
        f"sample_ratio: {ratio}, trust_client_sampling: {str(trust).lower()}}}",
        {},
    ).tracing
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    parent = SpanContext(trace_id, 0x00F067AA0BA902B7, True, TraceFlags(int(client_sampled)))
    result = sampler(config).should_sample(
        set_span_in_context(NonRecordingSpan(parent)), trace_id, "POST /v1/chat/completions"
    )
    return result.decision is Decision.RECORD_AND_SAMPLE


def test_a_client_cannot_choose_what_is_recorded_unless_trusted() -> None:
    # By default the ratio decides on the trace id, whatever the client's flag says.
    assert not _decide(0.0, trust=False, client_sampled=True)
    assert _decide(1.0, trust=False, client_sampled=False)
    # trust_client_sampling: the client's flag decides.
    assert _decide(0.0, trust=True, client_sampled=True)
    assert not _decide(1.0, trust=True, client_sampled=False)


def test_a_client_cannot_pick_trace_ids_that_are_always_recorded() -> None:
    """The SDK's ratio sampler compares the id's low 64 bits with the ratio's
    bound: ids whose low bits are 0 were always recorded, at any ratio."""
    from opentelemetry.sdk.trace.sampling import Decision

    from router.tracing import sampler

    def tracing(key: str | None = None) -> Any:
        extra = f", sampling_key: {key}" if key else ""
        text = f"tracing: {{otlp_endpoint: 'http://c:4318', sample_ratio: 0.5{extra}}}"
        return parse_config(text, {}).tracing

    def recorded(s: Any, ids: list[int]) -> list[bool]:
        return [
            s.should_sample(None, i, "POST").decision is Decision.RECORD_AND_SAMPLE for i in ids
        ]

    chosen = [(n + 1) << 64 for n in range(400)]  # low 64 bits all 0
    shared = recorded(sampler(tracing("s3cret")), chosen)
    assert 120 < sum(shared) < 280  # about half, as for any ids
    # One key on every replica: the same decisions; a key of its own each: not.
    assert recorded(sampler(tracing("s3cret")), chosen) == shared
    assert recorded(sampler(tracing()), chosen) != recorded(sampler(tracing()), chosen)
    assert "s3cret" not in str(tracing("s3cret"))
