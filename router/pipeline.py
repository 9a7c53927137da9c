"""The request pipeline of the OpenAI inference routes, as an ordered list of stages.

    intake     read the body (capped), parse it once, check the fields kvroute
               translates -> a frozen ``InferenceRequest``
    Resolve    the model name (or alias) -> its route, or 404
    Authorize  the tenant may use this model, or 403 (router/tenants.py)
    Caps       per-model caps on n and max_tokens (router/caps.py)
    Quota      the tenant's rates, concurrency, daily budget (router/quota/stage.py)
    Cache      a stored answer for a repeated deterministic request (router/cache/stage.py)
    Admission  a slot of a saturated model, by priority, fairly (router/admission.py)
    Failover   choose (policy) -> attempt loop -> relay (``router.failover``)

A stage is ``async (request, send, call_next) -> None`` (``pipeline_types.Stage``):
it may answer itself, call the rest of the pipeline with the request (or a
changed copy: requests are frozen), wrap ``send`` to see the answer, or act
after ``call_next`` returns. Errors are raised as ``RouterError``s; the
middleware turns them into OpenAI's shape.

Authentication comes first, before the body is read (``router/tenants.py``).
The pipeline runs in the request's own task; a watcher cancels it if the
client disconnects (cancelling the relay closes the upstream connection,
which is how an OpenAI server learns to abort the generation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from router.admission import Admission
from router.cache.stage import CacheStage
from router.caps import Caps
from router.errors import ModelNotFound
from router.failover import Failover
from router.pipeline_types import Handler, Stage
from router.quota.stage import QuotaStage
from router.request import (
    OPERATIONS,
    InferenceRequest,
    RequestContext,
    client_headers,
    parse_body,
    parse_sampling,
    read_body,
)
from router.state import AppState
from router.tenants import Authorize
from router.types import Receive, Scope, Send

#: Bodies larger than this are parsed in a worker thread.
PARSE_IN_THREAD_BYTES = 1 << 20
#: Characters of a client-chosen name the access log keeps.
MAX_LOGGED_NAME = 128


class Resolve:
    """The model the client named (or an alias of it) -> its route; 404 if unknown."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        route = self.state.routes.resolve(request.model)
        if route is None:
            raise ModelNotFound(request.model)
        request.ctx.model = route.model
        await call_next(request.with_route(route), send)


def stages(state: AppState) -> list[Stage]:
    """The pipeline between intake and failover, in order. A new stage is one
    module and one line here."""
    return [
        Resolve(state),
        Authorize(state),
        Caps(state),
        QuotaStage(state),
        CacheStage(state),
        Admission(state),
    ]


def chain(stages: Sequence[Stage], last: Handler) -> Handler:
    """``stages`` in order, then ``last``, as one handler (built once, at start)."""
    handler = last
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, call_next: Handler) -> Handler:
    async def handle(request: InferenceRequest, send: Send) -> None:
        await stage(request, send, call_next)

    return handle


class Pipeline:
    """The ASGI app of ``POST /v1/{chat/completions,completions,embeddings}``."""

    def __init__(self, state: AppState, handler: Handler | None = None) -> None:
        self.state = state
        self.handler = handler or chain(stages(state), Failover(state))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope["kvroute.ctx"]
        # Before the body is read: a client without a valid key costs no parsing.
        ctx.tenant = self.state.tenants.authenticate(scope["headers"])
        request = await self.intake(scope, receive, ctx)
        await _until_disconnect(receive, ctx, self.handler(request, send))

    async def intake(self, scope: Scope, receive: Receive, ctx: RequestContext) -> InferenceRequest:
        op = OPERATIONS[scope["path"]]
        config = self.state.config
        # The upload is the client's time, not kvroute's (a slow client's body
        # must not read as router overhead).
        ctx.waits.begin(ctx.clock())
        try:
            raw = await read_body(scope, receive, config.server.max_body_bytes)
        finally:
            ctx.waits.end(ctx.clock())
        if len(raw) > PARSE_IN_THREAD_BYTES:
            # Parsing megabytes holds the loop for tens of milliseconds: elsewhere.
            body = await asyncio.to_thread(parse_body, raw, op, config.requests)
        else:
            body = parse_body(raw, op, config.requests)
        model = body["model"]
        # Not a metric label until resolved: clients choose this string.
        ctx.requested_model = model[:MAX_LOGGED_NAME]
        ctx.stream = stream = body.get("stream") is True
        return InferenceRequest(
            op=op,
            request_id=ctx.request_id,
            headers=client_headers(scope),
            raw=raw,
            body=body,
            model=model,
            stream=stream,
            sampling=parse_sampling(body, op, stream, config.requests.max_stop),
            ctx=ctx,
        )


async def _until_disconnect(receive: Receive, ctx: RequestContext, work: Awaitable[None]) -> None:
    """Run ``work`` in this task; if the client leaves first, cancel it. One
    watcher task, not two, keeps the per-request cost down."""
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, task, ctx))
    try:
        await work
    except asyncio.CancelledError:
        if not ctx.cancelled:
            raise
        ctx.status = ctx.status or 499
        task.uncancel()
    finally:
        watcher.cancel()


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
