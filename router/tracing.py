"""OpenTelemetry spans (the ``otel`` extra): imported only when tracing is on.

    server span  "POST /v1/chat/completions"   one per inference request
      │            routing decision (kvroute.policy, .reason, .prefix.*),
      │            the resolved model, status, tokens; event "first_token"
      ├─ client span "POST <endpoint>"           one per upstream attempt
      └─ client span "POST <endpoint>"           (a failover: the first in error)

The backend's ``traceparent`` names the attempt's client span as its parent.
Attributes follow OpenTelemetry's semantic conventions where they exist
(``http.*``, ``server.*``, ``gen_ai.*``), ``kvroute.*`` otherwise. Nothing a
client chose goes into a span unbounded: the model is the resolved one, the
request id is cut to 128 characters, and no prompt or backend message is
recorded (an error is its bounded label).

Spans are exported by the SDK's ``BatchSpanProcessor``, in a thread of its
own: the event loop only queues them. ``Tracing.close`` flushes and stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.util.types import AttributeValue

from backends.base import Operation
from policies.base import Decision
from router.trace_context import SAMPLED, TraceContext

if TYPE_CHECKING:
    from router.config import TracingConfig
    from router.registry import EndpointState
    from router.request import RequestContext

#: ``gen_ai.operation.name`` of each operation.
GEN_AI_OPERATIONS = {
    Operation.CHAT: "chat",
    Operation.COMPLETION: "text_completion",
    Operation.EMBEDDING: "embeddings",
}
SCOPE = "kvroute"


class KeyedRatio(TraceIdRatioBased):
    """``TraceIdRatioBased`` on a keyed hash of the trace id. The plain one
    compares the id's low 64 bits with the ratio's bound, so a client that
    sends ids whose low bits are 0 has every request recorded and exported
    whatever the ratio; with a secret key it cannot tell which ids pass."""

    def __init__(self, rate: float, key: bytes) -> None:
        super().__init__(rate)
        self._key = key

    def should_sample(
        self, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any
    ) -> SamplingResult:
        digest = hashlib.blake2b(trace_id.to_bytes(16, "big"), key=self._key, digest_size=8)
        keyed = int.from_bytes(digest.digest(), "big")
        return super().should_sample(parent_context, keyed, *args, **kwargs)

    def get_description(self) -> str:
        return f"KeyedRatio{{{self.rate}}}"


def sampler(config: TracingConfig) -> Sampler:
    """By the keyed hash of the trace id at ``sample_ratio`` (a client's flag is
    ignored, unless ``trust_client_sampling``: then a client's sampled flag decides)."""
    secret = config.sampling_key
    key = secret.get_secret_value().encode() if secret is not None else os.urandom(32)
    by_id = KeyedRatio(config.sample_ratio, hashlib.sha256(key).digest())
    return ParentBased(by_id) if config.trust_client_sampling else by_id


def build_provider(config: TracingConfig) -> TracerProvider:
    """A provider exporting over OTLP/HTTP to the configured collector."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert config.otlp_endpoint is not None
    provider = TracerProvider(
        sampler=sampler(config),
        resource=Resource.create({"service.name": config.service_name}),
        shutdown_on_exit=False,  # the app's lifespan shuts it down
    )
    exporter = OTLPSpanExporter(
        endpoint=config.otlp_endpoint,
        headers={k: v.get_secret_value() for k, v in config.headers.items()},
        timeout=config.timeout,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """kvroute's spans over one ``TracerProvider``. The provider is either built
    from the config (``owned``: closed with the app) or handed in (tests)."""

    def __init__(self, provider: otel.TracerProvider, owned: bool) -> None:
        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer(SCOPE)

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing:
        return cls(build_provider(config), owned=True)

    def server_span(
        self, remote: TraceContext | None, op: Operation, path: str, request_id: str
    ) -> ServerSpan:
        """The span of one inference request, a child of the client's (``remote``)
        if it sent a valid trace context, else the root of a new trace."""
        parent = None
        if remote is not None:
            parent = otel.set_span_in_context(
                otel.NonRecordingSpan(
                    otel.SpanContext(
                        int(remote.trace_id, 16),
                        int(remote.span_id, 16),
                        is_remote=True,
                        trace_flags=otel.TraceFlags(remote.flags),
                    )
                )
            )
        start = time.time_ns()
        span = self.tracer.start_span(
            f"POST {path}",
            context=parent,
            kind=otel.SpanKind.SERVER,
            start_time=start,
            attributes={
                "http.request.method": "POST",
                "http.route": path,
                "url.path": path,
                "gen_ai.operation.name": GEN_AI_OPERATIONS[op],
                "kvroute.request_id": request_id,
            },
        )
        return ServerSpan(self.tracer, span, start, remote.state if remote else None)

    async def close(self) -> None:
        """Export what is queued; stop the exporter's thread if it is ours."""
        provider = self.provider
        if not isinstance(provider, TracerProvider):
            return
        # Both block (a last export): off the event loop.
        if self.owned:
            await asyncio.to_thread(provider.shutdown)
        else:
            await asyncio.to_thread(provider.force_flush)


class ServerSpan:
    """One request's server span; ``trace`` is what the access log shows."""

    __slots__ = ("_tracer", "span", "start_ns", "trace")

    def __init__(
        self, tracer: otel.Tracer, span: otel.Span, start_ns: int, state: str | None
    ) -> None:
        self._tracer = tracer
        self.span = span
        self.start_ns = start_ns
        self.trace = _trace_of(span, state)

    def decision(self, policy: str, decision: Decision) -> None:
        """The routing decision (the last one, after fallbacks)."""
        attrs: dict[str, AttributeValue] = {
            "kvroute.policy": policy,
            "kvroute.reason": decision.reason,
        }
        if decision.prompt_len:
            attrs["kvroute.prefix.match_chars"] = decision.match_len
            attrs["kvroute.prefix.prompt_chars"] = decision.prompt_len
            attrs["kvroute.prefix.match_ratio"] = decision.match_len / decision.prompt_len
        self.span.set_attributes(attrs)

    def attempt(self, endpoint: EndpointState, model: str, number: int) -> ClientSpan:
        """A client span for attempt ``number`` (from 1) at ``endpoint``."""
        address, port = _address(endpoint.url)
        attrs: dict[str, AttributeValue] = {
            "http.request.method": "POST",
            "server.address": address,
            "kvroute.endpoint": endpoint.id,
            "kvroute.attempt": number,
            "gen_ai.request.model": model,
        }
        if port is not None:
            attrs["server.port"] = port
        span = self._tracer.start_span(
            f"POST {endpoint.id}",
            context=otel.set_span_in_context(self.span),
            kind=otel.SpanKind.CLIENT,
            attributes=attrs,
        )
        return ClientSpan(span, _trace_of(span, self.trace.state))

    def finish(self, ctx: RequestContext) -> None:
        """What the request came to, from the access log's own record; end."""
        span = self.span
        attrs: dict[str, AttributeValue] = {"http.response.status_code": ctx.status}
        if ctx.model is not None:
            attrs["gen_ai.request.model"] = ctx.model
        if ctx.endpoint is not None:
            attrs["kvroute.endpoint"] = ctx.endpoint
        if ctx.attempts:
            attrs["kvroute.attempts"] = ctx.attempts
        if ctx.tenant is not None:
            attrs["kvroute.tenant"] = ctx.tenant.name
        if ctx.cache is not None:
            attrs["kvroute.cache"] = ctx.cache
        if ctx.queued_ms is not None:
            attrs["kvroute.queued_ms"] = ctx.queued_ms
        if ctx.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = ctx.prompt_tokens
            if ctx.cached_tokens is not None:
                attrs["kvroute.cached_tokens"] = ctx.cached_tokens
        if ctx.completion_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = ctx.completion_tokens
        if ctx.cancelled:
            attrs["kvroute.cancelled"] = True
        if ctx.status >= 500:
            attrs["error.type"] = str(ctx.status)
            span.set_status(otel.Status(otel.StatusCode.ERROR))
        span.set_attributes(attrs)
        if ctx.ttft is not None:
            span.add_event(
                "first_token",
                {"kvroute.ttft_ms": round(ctx.ttft * 1000, 3)},
                timestamp=self.start_ns + int(ctx.ttft * 1e9),
            )
        span.end()


class ClientSpan:
    """One upstream attempt's span; ``trace`` is the backend's traceparent."""

    __slots__ = ("_failed", "span", "trace")

    def __init__(self, span: otel.Span, trace: TraceContext) -> None:
        self.span = span
        self.trace = trace
        self._failed = False

    def responded(self, status: int) -> None:
        """The backend's status line (an error status fails the attempt)."""
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.failed(str(status))

    def failed(self, error_type: str) -> None:
        """The attempt failed, for a reason from a bounded set (an error label);
        the first reason given stands (the status, before the error it makes)."""
        if self._failed:
            return
        self._failed = True
        self.span.set_attribute("error.type", error_type)
        self.span.set_status(otel.Status(otel.StatusCode.ERROR))

    def end(self, ok: bool, cancelled: bool = False) -> None:
        if cancelled:
            self.span.set_attribute("kvroute.cancelled", True)
        elif not ok and not self._failed:
            self.failed("_OTHER")
        self.span.end()


def _trace_of(span: otel.Span, state: str | None) -> TraceContext:
    sc = span.get_span_context()
    return TraceContext(
        otel.format_trace_id(sc.trace_id),
        otel.format_span_id(sc.span_id),
        int(sc.trace_flags) & SAMPLED,
        state,
    )


@lru_cache(maxsize=1024)
def _address(url: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of an endpoint's URL (no user info)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port
