"""The quota stage: a tenant's rates, concurrency and daily budget.

    plan (rpm, tpm, per-model rpm/tpm, a concurrency lease, the day's budget)
      -> store.admit  refused: 429 with Retry-After and x-ratelimit-*
      -> the rest of the pipeline, every answer with x-ratelimit-* headers
      -> settle (in the background): tokens charged on the estimate are
         corrected to the answer's usage, the lease is freed

Tokens are admitted on an estimate: the body's bytes / 4 for the prompt
(JSON included: an overestimate, corrected at settle) plus ``max_tokens``
(else the model's cap, else ``quotas.default_completion_tokens``) for each
of ``n`` choices. A stream's usage comes from the engine: the request is
marked ``router_usage`` so the adapter asks for it and strips it again when
the client did not ask.

With the store down (Redis), ``quotas.on_failure`` decides: ``fail_open``
admits without limits (counted in ``kvroute_quota_unenforced_total``),
``fail_closed`` answers 503.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import TYPE_CHECKING

from router.errors import RouterError
from router.pipeline_types import Handler
from router.quota.base import (
    Plan,
    QuotaUnavailable,
    RateStatus,
    Settlement,
    Verdict,
)
from router.quota.service import Kinds
from router.request import InferenceRequest, RequestContext
from router.tenants import Tenant
from router.types import Message, Send

if TYPE_CHECKING:
    from router.state import AppState

LOG = logging.getLogger("kvroute.quota")


class RateLimited(RouterError):
    status = 429
    type = "rate_limit_error"
    code: str | None = "rate_limit_exceeded"

    def __init__(
        self, message: str, retry_after: float | None, headers: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self._headers = headers

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [*super().headers(), *self._headers]
        if self.retry_after is not None:
            out.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return out


class BudgetSpent(RateLimited):
    code = "insufficient_quota"


class QuotaStoreDown(RouterError):
    status = 503
    type = "service_unavailable"
    code = "quota_unavailable"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"retry-after", b"1")]


def go_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's time.Duration): ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds) if seconds - int(seconds) > 0.001 else int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(
    requests: RateStatus | None, tokens: RateStatus | None
) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for kind, status in ((b"requests", requests), (b"tokens", tokens)):
        if status is None:
            continue
        out += [
            (b"x-ratelimit-limit-" + kind, str(status.limit).encode()),
            (b"x-ratelimit-remaining-" + kind, str(max(0, status.remaining)).encode()),
            (b"x-ratelimit-reset-" + kind, go_duration(status.reset).encode()),
        ]
    return out


def _most_constraining(verdict: Verdict, indices: tuple[int, ...]) -> RateStatus | None:
    statuses = [verdict.rates[i] for i in indices]
    return min(statuses, key=lambda s: (s.remaining, -s.reset)) if statuses else None


class QuotaStage:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.metrics = state.metrics

    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        ctx = request.ctx
        tenant = ctx.tenant
        model = request.routed.model
        quotas = self.state.quotas
        if tenant is None or not quotas.limited(tenant, model):
            await call_next(request, send)
            return
        prompt = math.ceil(len(request.raw) / 4)
        estimate = self._estimate(request, prompt)
        plan, kinds = quotas.plan(tenant, model, estimate, os.urandom(8).hex())
        for i in kinds.tokens:
            if plan.rates[i].rate.limit < prompt:
                self.metrics.child(self.metrics.quota_refusals, tenant.name, "too_large").inc()
                raise RateLimited(
                    f"Request too large for tenant '{tenant.name}': its prompt alone exceeds "
                    f"the limit of {plan.rates[i].rate.limit} tokens per minute.",
                    None,
                    [],
                )
        try:
            verdict = await quotas.store.admit(plan)
        except QuotaUnavailable as exc:
            if quotas.config.on_failure == "fail_closed":
                self.metrics.child(self.metrics.quota_refusals, tenant.name, "unavailable").inc()
                raise QuotaStoreDown(
                    "the rate-limit store is unavailable; try again shortly"
                ) from exc
            self.metrics.quota_unenforced.inc()
            await call_next(request, send)
            return
        headers = ratelimit_headers(
            _most_constraining(verdict, kinds.requests), _most_constraining(verdict, kinds.tokens)
        )
        if not verdict.admitted:
            raise self._refusal(tenant, model, verdict, plan, kinds, headers)
        if request.stream and request.op.generates and quotas.counts_tokens(tenant, model):
            request = dataclasses.replace(request, router_usage=True)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        try:
            await call_next(request, send_with_headers)
        finally:
            quotas.settle_later(plan, self._settlement(ctx, plan, kinds, estimate), self.metrics)

    def _estimate(self, request: InferenceRequest, prompt: int) -> int:
        """``prompt`` (the body's bytes / 4) plus the completion tokens it may take."""
        if not request.op.generates:
            return prompt
        config = self.state.config
        sampling = request.sampling
        completion = sampling.max_tokens or config.quotas.default_completion_tokens
        return prompt + completion * max(1, sampling.n)

    def _refusal(
        self,
        tenant: Tenant,
        model: str,
        verdict: Verdict,
        plan: Plan,
        kinds: Kinds,
        headers: list[tuple[bytes, bytes]],
    ) -> RateLimited:
        name = tenant.name
        wait = verdict.retry_after
        if verdict.refused == "budget":
            self.metrics.child(self.metrics.quota_refusals, name, "budget").inc()
            assert plan.budget is not None
            return BudgetSpent(
                f"Tenant '{name}' has used its {plan.budget.limit} tokens for today (UTC).",
                wait,
                headers,
            )
        if verdict.refused == "concurrency":
            self.metrics.child(self.metrics.quota_refusals, name, "concurrency").inc()
            assert plan.lease is not None
            return RateLimited(
                f"Tenant '{name}' has {plan.lease.limit} requests in flight, its limit.",
                wait,
                headers,
            )
        index = verdict.refused_rate or 0
        what = "tokens" if index in kinds.tokens else "requests"
        self.metrics.child(self.metrics.quota_refusals, name, what).inc()
        charge = plan.rates[index]
        scope = f" on model '{model}'" if index in kinds.per_model else ""
        return RateLimited(
            f"Rate limit reached for tenant '{name}'{scope} on {what} per minute: "
            f"limit {charge.rate.limit}, requested {charge.cost}. "
            f"Please try again in {go_duration(wait)}.",
            wait,
            headers,
        )

    @staticmethod
    def _settlement(ctx: RequestContext, plan: Plan, kinds: Kinds, estimate: int) -> Settlement:
        """What the request cost: the engine's (or kvroute's counted) usage; with
        none, nothing if it was never answered, else the estimate stands."""
        if ctx.cache == "hit":
            actual = 0  # a request, but no tokens: no backend worked on it
        elif ctx.prompt_tokens is not None:
            actual = ctx.prompt_tokens + (ctx.completion_tokens or 0)
        elif ctx.status == 200:
            actual = estimate
        else:
            actual = 0
        deltas = tuple(
            actual - charge.cost if i in kinds.tokens else 0 for i, charge in enumerate(plan.rates)
        )
        return Settlement(deltas, actual)
