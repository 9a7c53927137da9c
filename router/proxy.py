"""The request pipeline for the OpenAI inference routes.

    read body (capped) -> parse once -> check fields -> model route ->
    candidates -> policy -> adapter -> forward -> relay (stream or not) -> record

A raw ASGI callable: the hot path owns its bytes and never re-serialises
what it does not change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from backends.base import StreamTranslator, Target, UpstreamProtocolError, UpstreamRequest
from policies.base import Decision, Outcome, RequestView
from router.errors import (
    BodyTooLarge,
    InvalidRequest,
    MalformedJSON,
    ModelNotFound,
    NoHealthyEndpoint,
    RouterError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
    normalise_upstream_error,
)
from router.registry import EndpointState, Route
from router.retry import retry_after_seconds
from router.state import AppState
from router.types import Receive, Scope, Send
from router.usage import scan_usage

#: path -> (short name, field a request must carry besides ``model``)
ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat", "messages"),
    "/v1/completions": ("completions", "prompt"),
    "/v1/embeddings": ("embeddings", "input"),
}

# Client headers that never go upstream: hop-by-hop ones, those the client
# library sets for its own connection, and the client's credentials.
DROP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "accept-encoding",
        "content-type",
        "x-request-id",
    }
)
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_CONTENT_TYPE = b"text/event-stream"


@dataclass(slots=True)
class RequestContext:
    """What one request's handling learns; the access log reads it at the end."""

    request_id: str
    start: float
    status: int = 0
    model: str | None = None
    endpoint: str | None = None
    policy: str | None = None
    reason: str | None = None
    stream: bool = False
    ttft: float | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    attempts: int = 0
    #: Set just before the last body message: a disconnect after it is no abort.
    finishing: bool = False
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header") from None
            if declared > limit:
                raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_request(raw: bytes, required: str) -> dict[str, Any]:
    if not raw:
        raise MalformedJSON("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    if required not in body:
        raise InvalidRequest(f"'{required}' is a required property", param=required)
    if required == "messages":
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(
                    f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]"
                )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    return body


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed client request, as every attempt at it sees it."""

    scope: Scope
    name: str
    raw: bytes
    body: dict[str, Any]
    headers: dict[str, str]


def retryable(exc: UpstreamError) -> bool:
    """Failures another endpoint may not have: connection, timeout, 5xx, 429."""
    if isinstance(exc, UpstreamHTTPError):
        return exc.status >= 500 or exc.status == 429
    return True


def client_headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def upstream_headers(
    client: Mapping[str, str], base: Mapping[str, str], request_id: str
) -> dict[str, str]:
    headers = dict(base)
    for key, value in client.items():
        if key not in DROP_HEADERS:
            headers[key] = value
    headers["x-request-id"] = request_id
    return headers


class Proxy:
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope["kvroute.ctx"]
        name, required = ROUTES[scope["path"]]
        raw = await read_body(scope, receive, self.state.config.server.max_body_bytes)
        body = parse_request(raw, required)
        ctx.model = model = body["model"]
        ctx.stream = body.get("stream") is True
        route = self.state.routes.resolve(model)
        if route is None:
            raise ModelNotFound(model)
        ctx.model = route.model
        request = Request(scope, name, raw, body, client_headers(scope))
        await self._until_disconnect(receive, ctx, self._serve(send, ctx, request, route))

    async def _serve(self, send: Send, ctx: RequestContext, req: Request, route: Route) -> None:
        """Try the ranked endpoints of the model, then of its fallbacks, until one
        answers; failures before the first byte reached the client move on."""
        state = self.state
        retries = state.config.retries
        clock = state.registry.clock
        deadline = clock() + retries.deadline
        state.budget.record_request(clock())
        attempts = 0
        last: RouterError | None = None
        for current in self._route_chain(route):
            candidates = state.registry.candidates(current.model)
            if not candidates:
                last = last or NoHealthyEndpoint(
                    f"no healthy endpoint serves model '{current.model}'"
                )
                continue
            view = RequestView(
                model=current.model, endpoint=req.name, body=req.body, headers=req.headers
            )
            decision = current.policy.rank(view, [c.view() for c in candidates])
            ctx.policy, ctx.reason = current.policy_name, decision.reason
            state.metrics.record_decision(current.model, current.policy_name, decision)
            for choice in decision.ranked:
                if attempts >= retries.max_attempts or clock() > deadline:
                    break
                endpoint = state.registry.get(choice.id)
                if endpoint is None or not endpoint.admits(clock()):
                    continue
                if attempts and not state.budget.allow_retry(clock()):
                    state.metrics.retries_denied.inc()
                    break
                if attempts:
                    state.metrics.child(state.metrics.retries, current.model).inc()
                attempts += 1
                ctx.attempts = attempts
                try:
                    await self._attempt(send, ctx, req, current, decision, endpoint)
                    return
                except UpstreamError as exc:
                    if ctx.status or not retryable(exc):
                        raise
                    last = exc
            if attempts >= retries.max_attempts or clock() > deadline:
                break
        assert last is not None or attempts == 0
        err = last or NoHealthyEndpoint(f"no healthy endpoint serves model '{route.model}'")
        if attempts > 1:
            err.should_retry = False
        raise err

    def _route_chain(self, route: Route) -> list[Route]:
        chain = [route]
        for name in self.state.routes.fallbacks(route.model):
            fallback = self.state.routes.resolve(name)
            if fallback is not None and fallback not in chain:
                chain.append(fallback)
        return chain

    async def _attempt(
        self,
        send: Send,
        ctx: RequestContext,
        req: Request,
        route: Route,
        decision: Decision,
        endpoint: EndpointState,
    ) -> None:
        state = self.state
        clock = state.registry.clock
        ctx.endpoint = endpoint.id
        ctx.model = route.model
        adapter = endpoint.adapter
        path = req.scope["path"]
        target = endpoint.targets[route.model]
        upstream = adapter.build(
            endpoint.url,
            path,
            req.raw,
            req.body,
            target,
            upstream_headers(req.headers, endpoint.headers, ctx.request_id),
        )
        translator = adapter.stream_translator(path, req.body, target) if ctx.stream else None
        endpoint.circuit.begin(clock())
        endpoint.in_flight += 1
        gauge = state.metrics.child(state.metrics.in_flight, endpoint.id)
        gauge.inc()
        started = clock()
        ok = False
        try:
            await self._relay(send, ctx, req, upstream, translator, endpoint, target)
            ok = True
        except UpstreamError as exc:
            endpoint.last_error = exc.message
            state.metrics.upstream_errors.labels(endpoint.id, exc.code or "error").inc()
            self._penalise(endpoint, exc, clock())
            raise
        except asyncio.CancelledError:
            # The client left: no verdict on the endpoint, but a trial slot is freed.
            endpoint.circuit.trial_in_flight = False
            raise
        finally:
            endpoint.in_flight -= 1
            gauge.dec()
            outcome = Outcome(ok, ctx.prompt_tokens, ctx.cached_tokens)
            route.policy.observe(decision, endpoint.id, outcome)
        endpoint.circuit.success()
        endpoint.record_latency(clock() - started)

    def _penalise(self, endpoint: EndpointState, exc: UpstreamError, now: float) -> None:
        if isinstance(exc, UpstreamHTTPError) and exc.status in (429, 503) and exc.retry_after:
            endpoint.cooldown_until = now + retry_after_seconds(exc.retry_after)
        if isinstance(exc, UpstreamHTTPError) and exc.status == 429:
            endpoint.cooldown_until = max(endpoint.cooldown_until, now + 1.0)
            endpoint.circuit.trial_in_flight = False
            return
        if isinstance(exc, UpstreamHTTPError) and exc.status < 500:
            endpoint.circuit.success()  # it answered, and correctly refused the request
            return
        endpoint.circuit.failure(now)

    async def _until_disconnect(
        self, receive: Receive, ctx: RequestContext, relay: Coroutine[Any, Any, None]
    ) -> None:
        """Run ``relay`` in this task; if the client leaves first, cancel it.

        Cancelling the relay closes the upstream connection, which is how an
        OpenAI server learns to abort the generation. One watcher task, not
        two, keeps the per-request cost down.
        """
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, task, ctx))
        try:
            await relay
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise
            ctx.status = ctx.status or 499
            task.uncancel()
        finally:
            watcher.cancel()

    async def _relay(
        self,
        send: Send,
        ctx: RequestContext,
        req: Request,
        upstream: UpstreamRequest,
        translator: StreamTranslator | None,
        endpoint: EndpointState,
        target: Target,
    ) -> None:
        resp = await self.state.forwarder.send(upstream, ctx.stream)
        try:
            if resp.status >= 400:
                data = await _read_all(resp)
                raise normalise_upstream_error(resp.status, data, resp.headers.get("retry-after"))
            content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
            if ctx.stream and content_type.startswith(SSE_CONTENT_TYPE):
                await self._relay_stream(send, ctx, resp, translator, content_type, endpoint.id)
                return
            raw = await _read_all(resp)
            path = req.scope["path"]
            try:
                data = endpoint.adapter.translate_json(path, req.body, target, raw)
            except UpstreamProtocolError as exc:
                raise UpstreamHTTPError(502, str(exc), type_="upstream_error") from exc
            if translator is not None:
                # A stream was asked for, but the backend answered plain JSON.
                content_type = b"application/json"
            ctx.prompt_tokens, ctx.cached_tokens = scan_usage(data)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", content_type),
                        (b"content-length", str(len(data)).encode()),
                    ],
                }
            )
            ctx.finishing = True
            await send({"type": "http.response.body", "body": data})
        finally:
            resp.release()

    @staticmethod
    async def _forward_chunk(send: Send, ctx: RequestContext, chunk: bytes) -> None:
        if b'"usage"' in chunk:
            ctx.prompt_tokens, ctx.cached_tokens = scan_usage(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _relay_stream(
        self,
        send: Send,
        ctx: RequestContext,
        resp: aiohttp.ClientResponse,
        translator: StreamTranslator | None,
        content_type: bytes,
        endpoint_id: str,
    ) -> None:
        chunks = resp.content.iter_any()
        # Nothing goes to the client before the first chunk: a backend that dies
        # before it still counts as a failure before the first byte (failover).
        first = b""
        try:
            while not first:
                first = await anext(chunks)
                if translator is not None:
                    first = translator.feed(first)
        except StopAsyncIteration:
            pass
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"no first chunk from {endpoint_id} in time") from exc
            raise UpstreamConnectError(
                f"stream from {endpoint_id} broke off before its first "
                f"chunk: {exc.__class__.__name__}"
            ) from exc
        ctx.ttft = time.perf_counter() - ctx.start
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache")],
            }
        )
        try:
            if first:
                await self._forward_chunk(send, ctx, first)
            async for chunk in chunks:
                if translator is not None:
                    chunk = translator.feed(chunk)
                    if not chunk:
                        continue
                await self._forward_chunk(send, ctx, chunk)
            tail = translator.close() if translator is not None else b""
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Headers are out: the only honest signal left is an error event.
            self.state.metrics.stream_errors.labels(endpoint_id).inc()
            timed_out = isinstance(exc, asyncio.TimeoutError)
            err = (UpstreamTimeout if timed_out else UpstreamConnectError)(
                f"upstream stream from {endpoint_id} broke off: {exc.__class__.__name__}"
            )
            ctx.error = err.message
            tail = b"data: " + err.to_bytes() + b"\n\n"
        ctx.finishing = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _read_all(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.read()
    except TimeoutError as exc:
        raise UpstreamTimeout("upstream stopped sending its answer") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamConnectError(f"upstream answer broke off: {exc}") from exc


async def _cancel_on_disconnect(
    receive: Receive, task: asyncio.Task[Any], ctx: RequestContext
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # uvicorn also reports a disconnect once the response is complete.
            if not ctx.finishing:
                ctx.cancelled = True
                task.cancel()
            return


def error_response_messages(err: RouterError) -> tuple[dict[str, Any], dict[str, Any]]:
    data = err.to_bytes()
    headers = [*JSON_HEADERS, (b"content-length", str(len(data)).encode()), *err.headers()]
    return (
        {"type": "http.response.start", "status": err.status, "headers": headers},
        {"type": "http.response.body", "body": data},
    )
