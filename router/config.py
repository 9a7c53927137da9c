"""The YAML configuration, validated into frozen pydantic models.

Every error names its place in the file (``models.tiny.policy: unknown
policy 'foo' (known: ...)``). Strings may reference the environment as
``${VAR}`` or ``${VAR:-default}``, so secrets stay out of the file.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from backends import ADAPTERS
from backends.templates import ChatTemplate
from backends.tokens import TokenizerFile
from policies.registry import POLICIES, known_policies
from router.prompts import PromptTokenizer, PromptTokenizerError, load_prompt_tokenizer


def redact_url(url: str) -> str:
    """``url`` without what may be a secret: user info and query values."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{kv.partition('=')[0]}=***" for kv in parts.query.split("&") if kv)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def shown_url(url: str) -> str:
    """``url`` as a config error may echo it: redacted (``redact_url``), also
    when it is not a URL at all (``user:secret@host`` without a scheme), and cut."""
    redacted = redact_url(url)
    head, at, tail = redacted.rpartition("@")
    if at and not head.endswith("***"):
        redacted = "***@" + tail
    return redacted[:200]


def redis_url(url: str | None) -> str | None:
    """A Redis URL as the config allows it ("" is none)."""
    if url in (None, ""):
        return None
    if not re.match(r"^(rediss?|unix)://", url):
        raise PydanticCustomError("url", "must be a redis://, rediss:// or unix:// URL", {})
    return url


#: Headers kvroute sets itself, hop-by-hop ones and client credentials:
#: ``forward_headers`` may not name them.
NEVER_FORWARDED = frozenset(
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
        "content-type",
        "content-encoding",
        "accept-encoding",
        "authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "x-request-id",
        "expect",
    }
)


#: The W3C trace context: parsed and sent anew, never passed through.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClientLimits(Frozen):
    """What one kvroute process accepts from its clients (README "Limits").

    Defaults follow nginx's where an API has no reason to differ, and are
    tighter where it has: API clients are programs that send a request in one
    go, so a client that dribbles is stuck or hostile. Read at start only.
    """

    #: The request line and headers together; beyond, 431 and the connection
    #: closes. nginx allows 4 buffers of 8 KiB (large_client_header_buffers).
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    #: Seconds for a request's headers to arrive, from the connection's start
    #: or the request's first byte; beyond, 408 (or a plain close if nothing
    #: came) and the connection closes. nginx's client_header_timeout is 60 s.
    header_timeout: float = Field(10.0, gt=0)
    #: Longest gap, in seconds, between two pieces of a request body; beyond,
    #: 408 and the connection closes. nginx's client_body_timeout is 60 s.
    body_timeout: float = Field(30.0, gt=0)
    #: Seconds for a whole request body to arrive, from the end of its
    #: headers, plus one for every ``body_min_rate`` bytes received (Apache's
    #: mod_reqtimeout ``body=...,MinRate=``); beyond, 408 and the connection
    #: closes. A client sending a byte every ``body_timeout`` would otherwise
    #: hold its connection for as long as its declared length lasts, while a
    #: slow link sending steadily at ``body_min_rate`` or more is never cut.
    body_total_timeout: float = Field(60.0, gt=0)
    #: Bytes per second that earn a body more time (above).
    body_min_rate: int = Field(16 * 1024, ge=1)
    #: Seconds a client may take none of its answer (its socket full, kvroute's
    #: buffer past its high-water mark) before the connection is dropped; each
    #: time it takes some, another period. The request ends as if the client
    #: had left. nginx's send_timeout (between two writes) is 60 s.
    send_timeout: float = Field(60.0, gt=0)
    #: Seconds an idle keep-alive connection stays open. nginx's 75 s, above
    #: the 60 s idle timeout of common load balancers, so the router is never
    #: the side that closes a connection a load balancer is about to reuse.
    keep_alive_timeout: int = Field(75, ge=1)
    #: Open client connections; a request on a connection beyond gets 503
    #: ``server_busy`` with Retry-After, and the connection closes.
    max_connections: int = Field(10_000, ge=1)
    #: Inference requests (streams included) handled at once; beyond, 503
    #: ``server_busy`` with Retry-After. /health, /ready, /metrics and /admin
    #: are never refused for it.
    max_in_flight: int = Field(2_000, ge=1)
    #: Bytes of request bodies held at once by the requests being read or
    #: answered (each at most ``server.max_body_bytes``); a request that would
    #: pass it gets 503 ``server_busy`` with Retry-After. Without it, many
    #: connections sending large bodies could hold ``max_connections`` times
    #: 32 MiB. Parsed, a body takes a few times its size again.
    max_body_bytes_in_flight: int = Field(512 * 1024 * 1024, ge=1024)
    #: Seconds a refused client is told to wait (Retry-After).
    retry_after: int = Field(1, ge=0)


class ServerConfig(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Requests with a larger body get 413.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    #: One JSON line per request on stderr.
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Reload when the config file changes on disk (SIGHUP and POST /admin/reload
    #: work either way).
    watch_config: bool = True
    #: Bounds on what clients may hold: header size and time, body pace,
    #: connections and in-flight requests.
    limits: ClientLimits = ClientLimits()

    @model_validator(mode="after")
    def _one_body_fits_the_budget(self) -> ServerConfig:
        if self.limits.max_body_bytes_in_flight < self.max_body_bytes:
            # A body between the two would be told to retry (503) for ever.
            raise PydanticCustomError(
                "limits",
                "limits.max_body_bytes_in_flight ({budget}) is below max_body_bytes ({body})",
                {"budget": self.limits.max_body_bytes_in_flight, "body": self.max_body_bytes},
            )
        return self


class Timeouts(Frozen):
    """Seconds. ``first_byte`` bounds the wait for a non-streamed answer's headers
    (the whole generation) and for a stream's first chunk (queueing and prefill
    included); ``idle`` bounds the gap between two chunks of a stream after it."""

    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(300.0, gt=0)
    idle: float = Field(60.0, gt=0)
    total: float = Field(1800.0, gt=0)


class HealthConfig(Frozen):
    """Active health probes (each backend kind's health route)."""

    enabled: bool = True
    interval: float = Field(5.0, gt=0)
    timeout: float = Field(2.0, gt=0)
    #: Each round waits interval x (1 +- jitter), so probes of many routers spread out.
    jitter: float = Field(0.1, ge=0, lt=1)
    #: Consecutive failed probes that mark an endpoint down, and successes that mark it up.
    fall: int = Field(2, ge=1)
    rise: int = Field(2, ge=1)


class ScrapeConfig(Frozen):
    """Load read from each backend's Prometheus metrics."""

    enabled: bool = True
    interval: float = Field(2.0, gt=0)
    timeout: float = Field(2.0, gt=0)
    #: Scraped numbers older than this are forgotten (policies then use in-flight only).
    stale_after: float = Field(10.0, gt=0)


class CircuitConfig(Frozen):
    """Passive outlier detection: consecutive failures open an endpoint's circuit."""

    failures: int = Field(5, ge=1)
    base_backoff: float = Field(1.0, gt=0)
    max_backoff: float = Field(60.0, gt=0)


class LatencyConfig(Frozen):
    """How each endpoint's measured latency is estimated (router/latency.py)."""

    #: Seconds after which a sample's weight has halved.
    half_life: float = Field(30.0, gt=0)
    #: Once an estimate is established, a sample counts as at most this many
    #: times it (one timeout cannot swamp it; a real slowdown still gets through).
    clip: float = Field(4.0, ge=1)


class RetryConfig(Frozen):
    """Failover before the first byte reaches the client."""

    #: Attempts per request, across endpoints (and fallback models).
    max_attempts: int = Field(3, ge=1)
    #: No new attempt starts this many seconds after the request arrived.
    deadline: float = Field(30.0, gt=0)
    #: Retries may be at most this share of requests (over ``budget_window``
    #: seconds), beyond ``budget_min`` retries, so retries cannot amplify an outage.
    budget_ratio: float = Field(0.2, ge=0)
    budget_window: float = Field(10.0, gt=0)
    budget_min: int = Field(10, ge=0)


class ShutdownConfig(Frozen):
    """On SIGTERM: /ready answers 503 at once; new requests are still taken for
    ``grace`` seconds (while load balancers notice), then in-flight requests get
    up to ``timeout`` seconds to finish."""

    grace: float = Field(2.0, ge=0)
    timeout: float = Field(30.0, gt=0)


class ConsulService(Frozen):
    name: str = Field(min_length=1)
    tag: str | None = None
    dc: str | None = None
    #: A Consul filter expression, passed through.
    filter: str | None = None


class ConsulConfig(Frozen):
    """Endpoints found through Consul's health API (blocking queries)."""

    url: str = "http://127.0.0.1:8500"
    token: SecretStr | None = None
    services: tuple[ConsulService, ...] = Field(min_length=1)
    #: How long Consul may hold a blocking query ("5m", "30s", "500ms").
    wait: str = Field("30s", pattern=r"^[0-9]+(ms|s|m)$")
    #: Token bucket for each service's query loop: queries per second, and burst.
    rate: float = Field(2.0, gt=0)
    burst: int = Field(5, ge=1)
    #: Backoff after errors: base x 2^n (with jitter), at most max seconds.
    backoff_base: float = Field(0.5, gt=0)
    backoff_max: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise PydanticCustomError("url", "must be an http:// or https:// URL", {})
        return url.rstrip("/")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_serializer("url", when_used="json")
    def _redacted(self, url: str) -> str:
        return redact_url(url)


class DiscoveryConfig(Frozen):
    consul: ConsulConfig | None = None


class ModelRef(Frozen):
    name: str = Field(min_length=1)
    #: The name the backend knows the model by, when it differs.
    served_name: str | None = None
    #: For text-prompt backends (TGI generate, Triton): a preset (chatml,
    #: llama-3, mistral, plain) or Jinja2 source; default: the endpoint's.
    chat_template: ChatTemplate | None = None
    #: A Hugging Face ``tokenizer.json`` of the model, for the token counts a
    #: backend does not report (TGI, Triton); loaded here, once per file.
    tokenizer: TokenizerFile | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


_ZMQ_URL = re.compile(r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}|ipc://[^\s]+)$")


class KVEventsConfig(Frozen):
    """Where an engine publishes its KV-cache events (vLLM: ``--kv-events-config
    '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
    "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'``), as kvroute reaches them."""

    #: The engine's PUB socket: ``tcp://host:port`` or ``ipc://path``.
    endpoint: str
    #: Its ROUTER replay socket. Without one, missed events cannot be recovered:
    #: a gap clears the endpoint's blocks.
    replay_endpoint: str | None = None
    #: vLLM's ``topic`` (empty: all messages).
    topic: str = ""
    #: Seconds a replay may take before the publisher counts as unresponsive.
    replay_timeout: float = Field(5.0, gt=0)
    #: Seconds between checks, through the replay socket, that the publisher is
    #: the one whose events were applied (an idle engine publishes nothing, so
    #: silence says nothing; a restarted one must be noticed anyway).
    probe_interval: float = Field(5.0, gt=0)
    #: Seconds the blocks stay stale after history was lost (a gap the replay
    #: buffer could not fill): what the engine stored meanwhile is unknown.
    resync_grace: float = Field(30.0, ge=0)

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if "*" in url:
            raise PydanticCustomError(
                "zmq_url",
                "'{url}' is a bind address: give the engine's host (tcp://host:port)",
                {"url": shown_url(url)},
            )
        if not _ZMQ_URL.match(url):
            raise PydanticCustomError(
                "zmq_url",
                "must be tcp://host:port or ipc://path, got '{url}'",
                {"url": shown_url(url)},
            )
        return url


class EndpointConfig(Frozen):
    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str
    #: The wire protocol: one of the adapters in ``backends.ADAPTERS``.
    kind: str = "openai"
    models: tuple[ModelRef, ...] = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    #: Tokens of KV cache the server holds, for prefix-affinity's index (until
    #: it can be read from the server's metrics).
    kv_capacity_tokens: int | None = Field(None, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    #: Requests the endpoint serves at once (its engine's batch, e.g. vLLM's
    #: ``max_num_seqs``). When every endpoint of a model is at its limit,
    #: requests wait in kvroute's admission queue. None: no limit.
    max_concurrency: int | None = Field(None, ge=1)
    #: Sent upstream as ``Authorization: Bearer``; the client's key never is.
    api_key: SecretStr | None = None
    #: Where the backend's Prometheus metrics are, when not at ``url`` + the
    #: kind's metrics path (Triton serves them on a port of its own).
    metrics_url: str | None = None
    #: Settings of the kind's adapter (tgi: api, chat_template; triton: fields,
    #: output_mode, chat_template, default_max_tokens).
    options: dict[str, Any] = Field(default_factory=dict)
    #: The engine's KV-cache events (vLLM's ZMQ publisher), for the precise
    #: prefix index; None: it publishes none (or kvroute does not listen).
    kv_events: KVEventsConfig | None = None
    #: ``options`` validated by the kind's options model, once, at load.
    _adapter_options: BaseModel = PrivateAttr()

    @property
    def adapter_options(self) -> BaseModel:
        return self._adapter_options

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise PydanticCustomError(
                "url", "must be an http:// or https:// URL, got '{url}'", {"url": shown_url(url)}
            )
        return url.rstrip("/")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_serializer("url", "metrics_url", when_used="json")
    def _redacted(self, url: str | None) -> str | None:
        # JSON is what leaves the process (/admin/config), like SecretStr's "****".
        return None if url is None else redact_url(url)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in ADAPTERS:
            raise PydanticCustomError(
                "unknown_kind",
                "unknown endpoint kind '{kind}' (known: {known})",
                {"kind": kind, "known": ", ".join(sorted(ADAPTERS))},
            )
        return kind

    @model_validator(mode="after")
    def _options_fit_kind(self) -> EndpointConfig:
        factory = ADAPTERS.get(self.kind)
        if factory is None:
            return self
        try:
            self._adapter_options = factory.options_model.model_validate(self.options)
        except ValidationError as exc:
            details = "; ".join(f"{_format_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
            raise PydanticCustomError(
                "options",
                "bad options for kind '{kind}': {details}",
                {"kind": self.kind, "details": details},
            ) from None
        return self


class PolicySpec(Frozen):
    """A policy by name, with parameters: ``least_load`` or ``{name: ..., ...}``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    #: The parameters validated by the policy's parameter model, once, at load.
    _typed_params: BaseModel = PrivateAttr()

    @property
    def typed_params(self) -> BaseModel:
        return self._typed_params

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> PolicySpec:
        factory = POLICIES.get(self.name)
        if factory is None:
            raise PydanticCustomError(
                "unknown_policy",
                "unknown policy '{name}' (known: {known})",
                {"name": self.name, "known": ", ".join(known_policies())},
            )
        try:
            self._typed_params = factory.params_model.model_validate(self.params)
        except ValidationError as exc:
            details = "; ".join(f"{_format_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
            raise PydanticCustomError(
                "policy_params",
                "bad parameters for policy '{name}': {details}",
                {"name": self.name, "details": details},
            ) from None
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RequestLimits(Frozen):
    """What one request may ask (its size is ``server.max_body_bytes``). The
    JSON bounds keep a body within the size cap from growing into gigabytes of
    Python objects: ``{}`` repeated 10 million times is 31 MiB of text."""

    #: JSON objects and arrays in one body.
    max_json_containers: int = Field(100_000, ge=16)
    #: How deep they may nest (OpenAI bodies need about 10; JSON schemas of
    #: tools a few more). kvroute re-encodes parts of bodies, and orjson encodes
    #: at most 254 levels.
    max_json_depth: int = Field(64, ge=8, le=200)
    #: Chat messages in one request.
    max_messages: int = Field(4096, ge=1)
    #: Stop sequences in one request.
    max_stop: int = Field(16, ge=1)
    #: Choices one request may ask for (``n``), for every model unless it caps lower.
    max_n: int = Field(16, ge=1)
    #: ``max_tokens`` (or ``max_completion_tokens``) at most, when set.
    max_tokens: int | None = Field(None, ge=1)


class ModelLimits(Frozen):
    """Per-model caps, tighter or looser than ``requests``."""

    max_n: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)


class AdminConfig(Frozen):
    """The /admin API. Closed unless a token is set (then every call needs
    ``Authorization: Bearer <token>``) or ``open`` is true (no token needed: for
    a demo on loopback only; kvroute warns at start)."""

    token: SecretStr | None = None
    open: bool = False

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


#: Header names (RFC 9110 tokens).
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
#: What ``tracing`` needs installed: the ``otel`` extra's modules.
OTEL_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


def missing_module(names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that cannot be imported (found, not imported)."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


class TracingConfig(Frozen):
    """OpenTelemetry spans, exported over OTLP/HTTP (``pip install kvroute[otel]``).
    Off unless ``otlp_endpoint`` is set; the trace context is propagated to the
    backends either way. A reload that changes it replaces the exporter."""

    #: The collector's OTLP/HTTP traces URL; a URL with no path gets
    #: ``/v1/traces`` (``http://collector:4318`` is enough). Redacted when shown.
    otlp_endpoint: str | None = None
    service_name: str = Field("kvroute", min_length=1, max_length=128)
    #: Share of traces recorded, decided on the trace id hashed with
    #: ``sampling_key`` (so every span of one trace agrees, and a client cannot
    #: pick trace ids that are always recorded).
    sample_ratio: float = Field(1.0, ge=0, le=1)
    #: The secret the sampling hash is keyed with: give every router replica the
    #: same one so that a trace's requests through different replicas are
    #: recorded alike. Unset: a random key per process. Never shown.
    sampling_key: SecretStr | None = None
    #: Follow a client's sampled flag instead. Off by default: a client must not
    #: be able to make the router record (and export) every one of its requests.
    trust_client_sampling: bool = False
    #: Sent with every export (e.g. a collector's API key): never shown.
    headers: dict[str, SecretStr] = Field(default_factory=dict, max_length=32)
    #: Seconds one export may take (exports run in a thread of their own).
    timeout: float = Field(10.0, gt=0, le=60)

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None

    @field_validator("otlp_endpoint", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        # The URL is not echoed: it may carry credentials.
        if not re.match(r"^https?://[^/\s?#]+(/[^\s]*)?$", url):
            raise PydanticCustomError(
                "url",
                "must be the http:// or https:// URL of an OTLP/HTTP collector "
                "(e.g. http://collector:4318); gRPC is not supported",
                {},
            )
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise PydanticCustomError("url", "has an invalid port", {}) from None
        if parts.path in ("", "/"):
            url = urlunsplit(parts._replace(path="/v1/traces"))
        return url

    @field_validator("headers")
    @classmethod
    def _header_lines(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in headers.items():
            if not HEADER_NAME.match(name):
                raise PydanticCustomError(
                    "header", "'{name}' is not a header name", {"name": name[:64]}
                )
            if any(c in value.get_secret_value() for c in "\r\n\0"):
                raise PydanticCustomError(
                    "header", "the value of '{name}' has a line break", {"name": name}
                )
        return headers

    @field_serializer("otlp_endpoint", when_used="json")
    def _redacted(self, url: str | None) -> str | None:
        return None if url is None else redact_url(url)

    @model_validator(mode="after")
    def _installed(self) -> TracingConfig:
        if self.enabled:
            missing = missing_module(OTEL_MODULES)
            if missing is not None:
                raise PydanticCustomError(
                    "otel",
                    "tracing needs the otel extra (pip install 'kvroute[otel]'): "
                    "cannot import {module}",
                    {"module": missing},
                )
        return self


#: ``sha256:`` and the hex digest of an API key (``kvroute keys hash``).
KEY_HASH = r"^sha256:[0-9a-f]{64}$"
#: Tenant names: metric labels and Redis keys, so a bounded alphabet.
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: The tenant of every request when ``auth.enabled`` is false.
ANONYMOUS = "anonymous"


class ModelQuota(Frozen):
    """Limits of one tenant on one model, on top of the tenant's own."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


class TenantConfig(Frozen):
    """Who may call, what, and how much (README "Tenants")."""

    #: Hashes of the tenant's API keys (several during a rotation).
    keys: tuple[str, ...] = ()
    #: Models the tenant may use: glob patterns over model names and aliases.
    models: tuple[str, ...] = ("*",)
    #: Requests and tokens (prompt + completion) per minute, across every router.
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    #: Requests in flight at once, across every router.
    max_concurrent: int | None = Field(None, ge=1)
    #: Tokens per UTC day.
    daily_tokens: int | None = Field(None, ge=1)
    #: One of ``admission.priorities``.
    priority: str = "normal"
    #: Share within its priority when requests queue for a saturated model.
    weight: int = Field(1, ge=1, le=1000)
    #: Per-model limits, by model name (not alias).
    model_limits: dict[str, ModelQuota] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("keys")
    @classmethod
    def _hashes(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for i, key in enumerate(keys):
            if not re.match(KEY_HASH, key):
                # Never echo it: it may be a key pasted where its hash belongs.
                raise PydanticCustomError(
                    "key_hash",
                    "keys[{i}] is not a key hash ('sha256:' and 64 hex digits; "
                    "`kvroute keys hash` prints one)",
                    {"i": i},
                )
        return keys

    @field_serializer("keys", when_used="json")
    def _shown(self, keys: tuple[str, ...]) -> list[str]:
        # What leaves the process (/admin/config) names a key, nothing more.
        return [key[:15] + "..." for key in keys]

    @field_validator("models")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not pattern or len(pattern) > 256:
                raise PydanticCustomError("pattern", "model patterns are 1 to 256 characters", {})
        return patterns


class AuthConfig(Frozen):
    """API keys. Off by default (a demo): every request is the ``anonymous``
    tenant, whose limits are ``anonymous``'s."""

    enabled: bool = False
    anonymous: TenantConfig = TenantConfig()
    #: A YAML file with a ``tenants:`` mapping (relative to the config file),
    #: merged into ``tenants`` and reloaded with the config.
    tenants_file: str | None = None


class RedisBacked(Frozen):
    """Where in Redis, when ``redis`` is set (shared by every router replica),
    and how long to wait for it; what counts as Redis being down."""

    #: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``);
    #: the URL is redacted wherever it is shown.
    redis: str | None = None
    #: Seconds one call to Redis may take before it counts as a failure. It
    #: includes the router's own event-loop delay: 50 ms refused 13 of 100
    #: requests of a burst on 2 cores with Redis healthy (tests/test_quotas.py).
    timeout: float = Field(0.25, gt=0, le=5)
    #: Consecutive failed calls that mark Redis down; then it is not called for
    #: ``retry_interval`` seconds (no request waits for a timeout meanwhile).
    trip_after: int = Field(3, ge=1)
    #: Seconds before Redis is tried again after it was marked down.
    retry_interval: float = Field(1.0, gt=0)
    key_prefix: str = Field("kvroute:", pattern=r"^[A-Za-z0-9_.:{}-]{0,64}$")

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        return redis_url(url)

    @field_serializer("redis", when_used="json")
    def _redacted(self, url: str | None) -> str | None:
        return None if url is None else redact_url(url)


class PlacementsConfig(RedisBacked):
    """Router replicas telling each other where they placed prompts (README
    "Several routers telling each other their placements"): with ``redis`` set, each router
    publishes the placements of its ``prefix_affinity`` models on the channel
    ``{key_prefix}placements`` and indexes the others', so routers without KV
    events route as one. Off without ``redis``. ``timeout`` bounds a publish
    (nobody waits for one: longer than a store's by default, so a router whose
    event loop is busy does not count its own delay as Redis failing);
    ``trip_after`` publishes failing in a row mark the link down;
    ``retry_interval`` is the wait before subscribing again."""

    timeout: float = Field(1.0, gt=0, le=5)

    #: Seconds a placement may wait to be published with the next ones.
    flush_interval: float = Field(0.005, gt=0, le=1)
    #: Placements one message carries at most (a model's; more go in the next).
    max_batch: int = Field(256, ge=1, le=4096)
    #: Placements a model may have waiting (Redis slow or down); past it the
    #: oldest are dropped (kvroute_placements_dropped_total).
    max_pending: int = Field(10_000, ge=1)


class QuotaConfig(RedisBacked):
    """Where the tenants' counters live. Without ``redis`` they are per process."""

    #: With Redis down or slow: admit without limits (``fail_open``) or refuse
    #: with 503 (``fail_closed``).
    on_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    #: A concurrency slot of a router that died is freed after this many seconds
    #: (live routers renew theirs).
    lease_ttl: float = Field(60.0, ge=5)
    #: The completion tokens a request is assumed to take, for admission, when
    #: it sets no ``max_tokens`` and its model caps none; settled to the real
    #: count after.
    default_completion_tokens: int = Field(256, ge=1)


class AdmissionConfig(Frozen):
    """The queue in front of a saturated model (README "Admission")."""

    enabled: bool = True
    #: Requests waiting per model; beyond, 503 with Retry-After.
    max_queue: int = Field(1000, ge=0)
    #: Seconds a request may wait; beyond, 503 with Retry-After.
    max_wait: float = Field(30.0, gt=0)
    #: Priority classes and their weights: when several classes wait, each is
    #: served in proportion to its weight (so none starves).
    priorities: dict[str, int] = Field(
        default_factory=lambda: {"high": 16, "normal": 4, "batch": 1}, min_length=1
    )
    #: Slots of each model's capacity that only the heaviest class may take:
    #: the other classes are admitted while fewer than capacity - reserve
    #: requests are in progress. Under overload a high request then finds a
    #: free slot instead of waiting for one, at the cost of that much of the
    #: lower classes' throughput. 0: none held back.
    reserve: int = Field(0, ge=0)
    #: Seconds a refused client is told to wait (Retry-After).
    retry_after: int = Field(1, ge=0)

    @field_validator("priorities")
    @classmethod
    def _weights(cls, priorities: dict[str, int]) -> dict[str, int]:
        for name, weight in priorities.items():
            if not TENANT_NAME.match(name):
                raise PydanticCustomError("name", "'{name}' is not a priority name", {"name": name})
            if not 1 <= weight <= 1000:
                raise PydanticCustomError(
                    "weight", "the weight of '{name}' must be 1 to 1000", {"name": name}
                )
        return priorities


class ModelCache(Frozen):
    """The response cache of one model (README "Response cache"). Off by default."""

    enabled: bool = False
    #: Seconds an answer is served from the cache.
    ttl: float = Field(300.0, gt=0)
    #: One entry for every tenant (an eval suite shared by teams); by default
    #: each tenant has its own, and never sees another's.
    shared: bool = False


class CacheConfig(RedisBacked):
    """Where cached answers live. Without ``redis``: this process's memory.
    With Redis down or slow, the cache steps aside (never an error)."""

    #: The in-process LRU's bound (entries and keys), when no Redis is set.
    memory_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    #: Larger answers are not cached.
    max_entry_bytes: int = Field(1024 * 1024, ge=256)
    #: Seconds one replica's upstream call holds the lock that makes the
    #: others wait for its answer instead of asking too (cross-replica single
    #: flight); they poll for the entry every ``poll_interval`` seconds.
    lock_ttl: float = Field(30.0, gt=0)
    poll_interval: float = Field(0.05, gt=0)


class ModelConfig(Frozen):
    policy: PolicySpec = PolicySpec(name="round_robin")
    #: Other names clients may use for this model.
    aliases: tuple[str, ...] = ()
    #: Models to try, in order, when every endpoint of this one failed.
    fallbacks: tuple[str, ...] = ()
    #: Caps on ``n`` and ``max_tokens`` for this model (default: ``requests``'s).
    limits: ModelLimits = ModelLimits()
    cache: ModelCache = ModelCache()
    #: The model's tokenizer, for precise prefix routing: a Hugging Face model
    #: directory (its ``tokenizer.json``, chat template and special tokens, as
    #: vLLM finds them) or a ``tokenizer.json``. Loaded here, once per file.
    tokenizer: str | None = None
    #: Overrides the directory's chat template: a preset (chatml, llama-3,
    #: mistral, plain) or Jinja2 source. Needs ``tokenizer``.
    chat_template: ChatTemplate | None = None
    _prompts: PromptTokenizer | None = PrivateAttr(None)

    @property
    def prompts(self) -> PromptTokenizer | None:
        """The prompt tokenizer built from ``tokenizer`` and ``chat_template``."""
        return self._prompts

    @model_validator(mode="after")
    def _load_tokenizer(self) -> ModelConfig:
        if self.tokenizer is None:
            if self.chat_template is not None:
                raise PydanticCustomError(
                    "chat_template", "chat_template needs a tokenizer to tokenize with", {}
                )
            return self
        try:
            self._prompts = load_prompt_tokenizer(self.tokenizer, self.chat_template)
        except PromptTokenizerError as exc:
            raise PydanticCustomError("tokenizer", "{error}", {"error": str(exc)}) from None
        return self


class Config(Frozen):
    server: ServerConfig = ServerConfig()
    timeouts: Timeouts = Timeouts()
    health: HealthConfig = HealthConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    circuit: CircuitConfig = CircuitConfig()
    latency: LatencyConfig = LatencyConfig()
    retries: RetryConfig = RetryConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    endpoints: tuple[EndpointConfig, ...] = ()
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    #: For models that endpoints serve but ``models`` does not list.
    default_policy: PolicySpec = PolicySpec(name="round_robin")
    #: Seeds the policies' random choices; unset means a fresh seed per start.
    seed: int | None = None
    admin: AdminConfig = AdminConfig()
    requests: RequestLimits = RequestLimits()
    #: Client headers sent on to the backends as they came. The trace context
    #: (traceparent, tracestate) is not one of them: kvroute validates it and
    #: sends its own (router/trace_context.py). No other client header goes upstream.
    forward_headers: tuple[str, ...] = ()
    auth: AuthConfig = AuthConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    quotas: QuotaConfig = QuotaConfig()
    admission: AdmissionConfig = AdmissionConfig()
    cache: CacheConfig = CacheConfig()
    tracing: TracingConfig = TracingConfig()
    placements: PlacementsConfig = PlacementsConfig()

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for name in names:
            lower = name.lower()
            if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", lower):
                raise PydanticCustomError("header", "'{name}' is not a header name", {"name": name})
            if lower in NEVER_FORWARDED:
                raise PydanticCustomError(
                    "header", "'{name}' is never sent upstream", {"name": name}
                )
            if lower in TRACE_HEADERS:
                raise PydanticCustomError(
                    "header",
                    "'{name}' is the trace context, which kvroute checks and sends itself",
                    {"name": name},
                )
            out.append(lower)
        return tuple(out)

    @model_validator(mode="before")
    @classmethod
    def _admin_token_spelling(cls, value: Any) -> Any:
        # ``admin_token: x`` (the older spelling) is ``admin: {token: x}``.
        if isinstance(value, dict) and "admin_token" in value:
            value = dict(value)
            token = value.pop("admin_token")
            admin = value.get("admin")
            if admin is not None and not isinstance(admin, dict):
                return value  # the admin section's own error will say why
            if admin and "token" in admin:
                raise PydanticCustomError(
                    "duplicate", "admin_token and admin.token are both set; keep admin.token", {}
                )
            value["admin"] = {**(admin or {}), "token": token}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        seen: set[str] = set()
        for ep in self.endpoints:
            if ep.id in seen:
                raise PydanticCustomError(
                    "duplicate", "endpoint id '{id}' is used twice", {"id": ep.id}
                )
            seen.add(ep.id)
        names: dict[str, str] = {name: name for name in self.models}
        for name, model in self.models.items():
            for alias in model.aliases:
                if alias in names:
                    raise PydanticCustomError(
                        "duplicate",
                        "alias '{alias}' of model '{model}' is already the name of '{other}'",
                        {"alias": alias, "model": name, "other": names[alias]},
                    )
                names[alias] = name
        self._check_tenants()
        return self

    def _check_tenants(self) -> None:
        owners: dict[str, str] = {}
        everyone = {ANONYMOUS: self.auth.anonymous, **self.tenants}
        for name, tenant in everyone.items():
            if name in self.tenants and (name == ANONYMOUS or not TENANT_NAME.match(name)):
                raise PydanticCustomError(
                    "tenant",
                    "tenant name '{name}' is reserved or not 1-64 of A-Z a-z 0-9 _ . -",
                    {"name": name[:64]},
                )
            if tenant.priority not in self.admission.priorities:
                raise PydanticCustomError(
                    "priority",
                    "tenant '{name}' has priority '{priority}', not one of admission.priorities "
                    "({known})",
                    {
                        "name": name,
                        "priority": tenant.priority,
                        "known": ", ".join(self.admission.priorities),
                    },
                )
            for model in tenant.model_limits:
                if model not in self.models:
                    raise PydanticCustomError(
                        "model",
                        "tenant '{name}' has model_limits for '{model}', which is not in models",
                        {"name": name, "model": model},
                    )
            for key in tenant.keys:
                if key in owners:
                    raise PydanticCustomError(
                        "duplicate",
                        "tenants '{a}' and '{b}' share a key",
                        {"a": owners[key], "b": name},
                    )
                owners[key] = name


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` are ``path: message`` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def expand_env(
    node: Any, env: Mapping[str, str], errors: list[str], loc: tuple[int | str, ...] = ()
) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a YAML tree."""
    if isinstance(node, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{_format_loc(loc)}: environment variable '{name}' is not set")
            return ""

        return _ENV_REF.sub(sub, node)
    if isinstance(node, list):
        return [expand_env(item, env, errors, (*loc, i)) for i, item in enumerate(node)]
    if isinstance(node, dict):
        return {key: expand_env(value, env, errors, (*loc, key)) for key, value in node.items()}
    return node


def parse_config(
    text: str, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML: {problem}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping"])
    errors: list[str] = []
    raw = expand_env(raw, os.environ if env is None else env, errors)
    if errors:
        raise ConfigError(errors)
    path = tenants_file(raw, base_dir)
    if path is not None:
        raw = _merge_tenants(raw, path, env)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            [f"{_format_loc(err['loc'])}: {err['msg']}" for err in exc.errors()]
        ) from exc


def tenants_file(raw: Any, base_dir: Path | None) -> Path | None:
    """Where ``auth.tenants_file`` points (relative to the config's directory)."""
    auth = raw.get("auth") if isinstance(raw, dict) else None
    name = auth.get("tenants_file") if isinstance(auth, dict) else None
    if not isinstance(name, str) or not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else (base_dir or Path.cwd()) / path


def _merge_tenants(
    raw: dict[str, Any], path: Path, env: Mapping[str, str] | None
) -> dict[str, Any]:
    where = "auth.tenants_file"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc.strerror or exc}"]) from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{where}: {path} is not valid YAML"]) from exc
    if not isinstance(loaded, dict) or not isinstance(loaded.get("tenants", {}), dict):
        raise ConfigError([f"{where}: {path} must be a mapping with a 'tenants' mapping"])
    errors: list[str] = []
    extra = expand_env(loaded.get("tenants") or {}, os.environ if env is None else env, errors)
    if errors:
        raise ConfigError([f"{where}: {e}" for e in errors])
    own = raw.get("tenants") or {}
    if not isinstance(own, dict):
        return raw  # the tenants section's own error will say why
    both = sorted(set(own) & set(extra))
    if both:
        raise ConfigError([f"{where}: tenant '{both[0]}' is also defined in the config file"])
    return {**raw, "tenants": {**own, **extra}}


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        byte = exc.object[exc.start]
        raise ConfigError(
            [f"{path}: line {line}: not UTF-8 text (byte 0x{byte:02x}: {exc.reason})"]
        ) from exc
    return parse_config(text, env, Path(path).resolve().parent)
