"""The router's ASGI application.

RequestMiddleware      request id, trace, OpenAI-shaped errors, access log, request metrics
  └── Dispatch         POST /v1/{chat/completions,completions,embeddings} -> Pipeline
                       everything else -> the control app (Starlette)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router import trace_context
from router.admin import admin_routes
from router.admin_ui import admin_ui_routes
from router.config import Config
from router.errors import InvalidRequest, RouterError, error_body, error_messages
from router.lifecycle import Lifecycle
from router.logs import ACCESS, LOG
from router.metrics import CONTENT_TYPE_LATEST
from router.openapi import openapi
from router.overhead import HEADER as OVERHEAD
from router.overhead import header_value
from router.pipeline import Pipeline
from router.request import DROP_CONNECTION, OPERATIONS, RequestContext
from router.state import AppState
from router.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

REQUEST_ID = b"x-request-id"
TRACE_HEADERS = (trace_context.TRACEPARENT, trace_context.TRACESTATE)
#: Characters of a request's path the access log keeps.
MAX_LOGGED_PATH = 256
#: The model label of requests for a model kvroute does not know.
UNKNOWN_MODEL = "(unknown)"


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class RequestMiddleware:
    """Gives every HTTP request an id (``x-request-id``, accepted or made and always
    echoed), turns any error into OpenAI's shape, and logs one JSON line. Every
    answer of an inference route, errors too, says kvroute's own time in
    ``x-kvroute-overhead-ms`` (router/overhead.py), on ``clock``."""

    def __init__(
        self, app: ASGIApp, state: AppState, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.app = app
        self.state = state
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        trace_headers: list[tuple[bytes, bytes]] | None = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                request_id = request_id or value.decode("latin-1")[:128]
            elif name in TRACE_HEADERS:
                if trace_headers is None:
                    trace_headers = []
                trace_headers.append((name, value))
        if not request_id:
            request_id = os.urandom(16).hex()
        clock = self.clock
        # Every request has a trace: the client's (valid), the server span's, or
        # (None here) a new one made when first needed (RequestContext.trace_id).
        trace = trace_context.parse(trace_headers) if trace_headers else None
        tracing = self.state.tracing
        span = None
        if tracing is not None and scope["method"] == "POST" and scope["path"] in OPERATIONS:
            span = tracing.server_span(trace, OPERATIONS[scope["path"]], scope["path"], request_id)
            trace = span.trace
        ctx = RequestContext(request_id, clock(), trace, span, clock=clock)
        ctx.drop = scope.get(DROP_CONNECTION)
        scope["kvroute.ctx"] = ctx
        rid_header = (REQUEST_ID, request_id.encode("latin-1"))
        inference = scope["path"] in OPERATIONS
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                ctx.status = message["status"]
                headers = [*message.get("headers", ()), rid_header]
                if inference:
                    ctx.overhead = own = ctx.waits.own(ctx.start, clock())
                    headers.append((OVERHEAD, header_value(own)))
                message["headers"] = headers
            await send(message)

        metrics = self.state.metrics
        if inference:
            metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except RouterError as err:
            ctx.error = err.message
            if not started:
                for message in error_messages(err):
                    await send_with_id(message)
        except asyncio.CancelledError:
            # The client went away while we were reading its request.
            ctx.cancelled = True
            ctx.status = ctx.status or 499
        except Exception as exc:
            LOG.exception("unhandled error", extra={"request_id": request_id})
            ctx.error = f"internal error: {exc.__class__.__name__}"
            if not started:
                internal = RouterError("internal error in the router; see its logs")
                for message in error_messages(internal):
                    await send_with_id(message)
        finally:
            if inference:
                metrics.in_flight -= 1
            self._record(scope, ctx)

    def _record(self, scope: Scope, ctx: RequestContext) -> None:
        duration = ctx.clock() - ctx.start
        # Labels come from resolved names only: a model no route knows counts
        # under one label, whatever the client wrote.
        model = ctx.model or (UNKNOWN_MODEL if ctx.requested_model is not None else None)
        if model is not None:
            endpoint = ctx.endpoint or "none"
            metrics = self.state.metrics
            metrics.child(metrics.requests, model, endpoint, str(ctx.status)).inc()
            series = metrics.series(model, endpoint)
            series.duration.observe(duration)
            if ctx.ttft is not None:
                series.ttft.observe(ctx.ttft)
            if ctx.overhead is not None:
                metrics.child(metrics.overhead, model).observe(ctx.overhead)
            if ctx.prompt_tokens is not None and not ctx.usage_estimated:
                metrics.child(metrics.prompt_tokens, model, endpoint).inc(ctx.prompt_tokens)
                cached = ctx.cached_tokens or 0
                metrics.child(metrics.cached_tokens, model, endpoint).inc(cached)
        tenant = ctx.tenant
        if tenant is not None:
            metrics = self.state.metrics
            metrics.child(metrics.tenant_requests, tenant.name, str(ctx.status)).inc()
            if ctx.prompt_tokens is not None:
                metrics.child(metrics.tenant_tokens, tenant.name, "prompt").inc(ctx.prompt_tokens)
                completion = ctx.completion_tokens or 0
                metrics.child(metrics.tenant_tokens, tenant.name, "completion").inc(completion)
        if self.state.config.server.access_log and ACCESS.isEnabledFor(logging.INFO):
            line: dict[str, Any] = {
                "event": "request",
                "request_id": ctx.request_id,
                "method": scope["method"][:16],
                "path": scope["path"][:MAX_LOGGED_PATH],
                "status": ctx.status,
                "duration_ms": round(duration * 1000, 3),
                "trace_id": ctx.trace_id(),
            }
            if tenant is not None:
                line["tenant"] = tenant.name
            if ctx.requested_model is not None:
                line.update(
                    requested_model=ctx.requested_model,
                    model=ctx.model,
                    endpoint=ctx.endpoint,
                    policy=ctx.policy,
                    reason=ctx.reason,
                    stream=ctx.stream,
                )
            if ctx.cache is not None:
                line["cache"] = ctx.cache
            if ctx.queued_ms is not None:
                line["queued_ms"] = ctx.queued_ms
            if ctx.ttft is not None:
                line["ttft_ms"] = round(ctx.ttft * 1000, 3)
            if ctx.overhead is not None:
                line["overhead_ms"] = round(ctx.overhead * 1000, 3)
            if ctx.prompt_tokens is not None:
                line.update(prompt_tokens=ctx.prompt_tokens, cached_tokens=ctx.cached_tokens)
                if ctx.usage_estimated:
                    line["usage_estimated"] = True
            if ctx.error:
                line["error"] = ctx.error
            if ctx.cancelled:
                line["cancelled"] = True
            ACCESS.info(line)
        if ctx.span is not None:
            ctx.span.finish(ctx)


class Dispatch:
    def __init__(self, pipeline: Pipeline, control: ASGIApp) -> None:
        self.pipeline = pipeline
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPERATIONS:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['path']} takes POST, not {scope['method']}")
            await self.pipeline(scope, receive, send)
            return
        await self.control(scope, receive, send)


class MethodNotAllowed(InvalidRequest):
    status = 405
    code: str | None = "method_not_allowed"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"allow", b"POST")]


def build_control_app(state: AppState, lifecycle: Lifecycle) -> Starlette:
    async def models(request: Request) -> Response:
        try:
            tenant = state.tenants.authenticate(request.scope["headers"])
        except RouterError as err:
            return json_response(err.body(), err.status)
        routes = state.routes
        data = []
        for name in routes.public_models():
            model = routes.canonical(name)
            if tenant.may_use(model, routes.aliases(model)):
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "kvroute"})
        return json_response({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(request: Request) -> Response:
        now = state.registry.clock()
        healthy = sum(1 for e in state.registry.all() if e.admits(now))
        if state.ready and not state.shutting_down and healthy:
            return json_response({"status": "ready", "healthy_endpoints": healthy})
        return json_response({"status": "not ready", "healthy_endpoints": healthy}, 503)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path[:MAX_LOGGED_PATH]}: {exc.detail}"
        response = json_response(
            error_body(message, "invalid_request_error", None, code), exc.status_code
        )
        if exc.headers:  # Allow, on a 405
            response.headers.update(exc.headers)
        return response

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette's own answer would be text/plain; the traceback goes to the log.
        LOG.error(
            {"event": "control_route_error", "path": request.url.path[:MAX_LOGGED_PATH]},
            exc_info=exc,
        )
        body = error_body("internal error in the router; see its logs", "internal_error")
        return json_response(body, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.forwarder.start()
        try:
            await lifecycle.start()
            state.ready = True
            try:
                yield
            finally:
                state.ready = False
                await lifecycle.stop()
        finally:
            await state.forwarder.close()

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
            *admin_routes(state, lifecycle.reloader, lifecycle.kvevents),
            *admin_ui_routes(state, lifecycle.kvevents),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


def build_app(
    config: Config,
    config_path: str | None = None,
    tracer_provider: TracerProvider | None = None,
) -> RequestMiddleware:
    """The router; ``tracer_provider`` (tests) stands in for ``tracing`` in the config."""
    state = AppState.from_config(config, config_path)
    control = build_control_app(state, Lifecycle(state, tracer_provider=tracer_provider))
    return RequestMiddleware(Dispatch(Pipeline(state), control), state)
