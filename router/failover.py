"""The last stage: choose an endpoint, attempt it, fail over until one answers.

    for each route (the model, then its fallbacks):
        candidates (available, and able to serve this request)
        -> policy.rank -> for each ranked endpoint, within the retry limits:
               endpoint.begin -> relay -> a verdict (succeeded / failed /
               abandoned) -> endpoint.end -> policy.observe

A failure before the first byte reached the client moves on to the next
endpoint (then the next route); after it, or for a client's error, it is the
answer. Retries are bounded per request (``max_attempts``, ``deadline``) and
fleet-wide (the retry budget).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from backends.base import Operation, Usage
from policies.base import Decision, EndpointView, Outcome, PromptTokens, RequestView
from router.errors import (
    InvalidRequest,
    NoHealthyEndpoint,
    RouterError,
    UpstreamError,
    UpstreamHTTPError,
)
from router.registry import EndpointState, Route
from router.relay import Relay
from router.request import InferenceRequest
from router.state import AppState
from router.tenants import Tenant
from router.types import Send

#: The operation as policies see it (``RequestView.endpoint``).
OP_NAMES = {op: op.name.lower() for op in Operation}


class UnsupportedOperation(InvalidRequest):
    code = "unsupported_operation"


def retryable(exc: UpstreamError) -> bool:
    """Failures another endpoint may not have: connection, timeout, a backend's
    own fault (5xx, or what its adapter says is one), 429."""
    if isinstance(exc, UpstreamHTTPError):
        return exc.server_fault or exc.status == 429
    return True


class Failover:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.relay = Relay(state)

    async def __call__(self, request: InferenceRequest, send: Send) -> None:
        state = self.state
        route = request.routed
        retries = state.config.retries
        clock = state.registry.clock
        deadline = clock() + retries.deadline
        state.budget.record_request(clock())
        ctx = request.ctx
        attempts = 0
        last: RouterError | None = None
        for current in self._route_chain(route, ctx.tenant):
            views = state.registry.views(current.model, request)
            if not views:
                if current is route and attempts == 0:
                    self._check_supported(request, route)
                last = last or NoHealthyEndpoint(
                    f"no healthy endpoint serves model '{current.model}'"
                )
                continue
            tokens = await self._tokens(current, request, views)
            view = RequestView(
                current.model, OP_NAMES[request.op], request.body, request.headers, tokens
            )
            decision = current.policy.rank(view, views)
            ctx.policy, ctx.reason = current.policy_name, decision.reason
            state.metrics.record_decision(current.model, current.policy_name, decision)
            if ctx.span is not None:
                ctx.span.decision(current.policy_name, decision)
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
                    await self._attempt(request, send, current, decision, endpoint)
                    return
                except UpstreamError as exc:
                    if ctx.status or not retryable(exc):
                        raise
                    last = exc
            if attempts >= retries.max_attempts or clock() > deadline:
                break
        err = last or NoHealthyEndpoint(f"no healthy endpoint serves model '{route.model}'")
        if attempts > 1:
            err.should_retry = False
        raise err

    async def _tokens(
        self, route: Route, request: InferenceRequest, views: Sequence[EndpointView]
    ) -> PromptTokens | None:
        """The prompt's tokens, when the route's policy can use them and some
        candidate publishes KV events (else the policy works on characters)."""
        if not route.policy.uses_tokens or all(v.blocks is None for v in views):
            return None
        model = self.state.config.models.get(route.model)
        prompts = model.prompts if model is not None else None
        if prompts is None:
            return None
        return await prompts.tokens_async(OP_NAMES[request.op], request.body)

    def _check_supported(self, request: InferenceRequest, route: Route) -> None:
        """No candidate: a client's error (400) if no endpoint of the model could
        ever serve this request, healthy or not."""
        reason = self.state.registry.unsupported(route.model, request)
        if reason is not None:
            raise UnsupportedOperation(
                f"model '{route.model}' cannot serve {request.op.path}: {reason}", param="model"
            )

    def _route_chain(self, route: Route, tenant: Tenant | None) -> list[Route]:
        """The model, then its fallbacks the tenant may also use."""
        routes = self.state.routes
        chain = [route]
        for name in routes.fallbacks(route.model):
            fallback = routes.resolve(name)
            if fallback is None or fallback in chain:
                continue
            if tenant is None or tenant.may_use(fallback.model, routes.aliases(fallback.model)):
                chain.append(fallback)
        return chain

    async def _attempt(
        self,
        request: InferenceRequest,
        send: Send,
        route: Route,
        decision: Decision,
        endpoint: EndpointState,
    ) -> None:
        state = self.state
        clock = state.registry.clock
        ctx = request.ctx
        ctx.endpoint = endpoint.id
        ctx.model = route.model
        usage: Usage | None = None
        ok = False
        started = clock()
        attempt = endpoint.begin(started, request.stream, route.model)
        span = None if ctx.span is None else ctx.span.attempt(endpoint, route.model, ctx.attempts)
        try:
            translator = await self.relay(
                request, send, attempt, endpoint.targets[route.model], span
            )
            usage = translator.usage
            ok = True
        except UpstreamError as exc:
            state.metrics.child(state.metrics.upstream_errors, endpoint.id, exc.label).inc()
            now = clock()
            if endpoint.failed(exc, now):
                attempt.failed(now)
            if span is not None:
                span.failed(exc.label)
            raise
        except asyncio.CancelledError:
            endpoint.abandoned()
            if span is not None:
                span.end(ok, cancelled=True)
                span = None
            raise
        else:
            endpoint.succeeded()
            attempt.answered(clock(), usage.completion_tokens if usage else None)
        finally:
            attempt.end()
            if span is not None:
                span.end(ok)
            if usage is not None:
                ctx.prompt_tokens, ctx.cached_tokens = usage.prompt_tokens, usage.cached_tokens
                ctx.completion_tokens = usage.completion_tokens
                ctx.usage_estimated = usage.estimated
            # A policy learns from the engine's own counts, never from kvroute's estimates.
            prompt = None if ctx.usage_estimated else ctx.prompt_tokens
            outcome = Outcome(ok, prompt, ctx.cached_tokens)
            route.policy.observe(decision, endpoint.id, outcome)
