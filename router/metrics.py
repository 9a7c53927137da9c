"""The router's Prometheus metrics, on a registry of its own (no globals)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from policies.base import Decision
from policies.prefix_index import IndexStats
from router.latency import REFERENCE_TOKENS

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "EndpointCollector",
    "EndpointSnapshot",
    "IndexCollector",
    "Metrics",
    "ModelTotals",
]


@dataclass(slots=True)
class _EndpointSeries:
    duration: Histogram
    ttft: Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvroute_requests_total",
            "Requests answered, by model, endpoint (none if never forwarded) and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "kvroute_request_duration_seconds",
            "Time from request to the end of the response, per model and endpoint.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kvroute_time_to_first_token_seconds",
            "Time from request to the first streamed chunk, per model and endpoint.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvroute_upstream_errors_total",
            "Failed attempts to an endpoint, by kind of failure.",
            ["endpoint", "error"],
            registry=r,
        )
        self.decisions = Counter(
            "kvroute_routing_decisions_total",
            "Routing decisions by model, policy and reason.",
            ["model", "policy", "reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "kvroute_stream_errors_total",
            "Streams cut short by the upstream after the first byte reached the client.",
            ["endpoint"],
            registry=r,
        )
        self.retries = Counter(
            "kvroute_retries_total",
            "Attempts beyond the first (failover to another endpoint or model).",
            ["model"],
            registry=r,
        )
        self.retries_denied = Counter(
            "kvroute_retries_denied_total",
            "Retries not made because the fleet-wide retry budget was spent.",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvroute_prompt_tokens_total",
            "Prompt tokens, as the backends reported them in usage.",
            ["model", "endpoint"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "kvroute_cached_prompt_tokens_total",
            "Prompt tokens the backends reported served from their prefix cache.",
            ["model", "endpoint"],
            registry=r,
        )
        self.discovery_errors = Counter(
            "kvroute_discovery_errors_total",
            "Failed discovery queries (the last known endpoints keep serving).",
            ["source"],
            registry=r,
        )
        self.discovery_invalid = Counter(
            "kvroute_discovery_invalid_instances_total",
            "Discovered instances skipped for unusable metadata.",
            ["source"],
            registry=r,
        )
        self.discovery_up = Gauge(
            "kvroute_discovery_up",
            "1 while the discovery source answers, 0 during an outage.",
            ["source"],
            registry=r,
        )
        self.reloads = Counter(
            "kvroute_config_reload",
            "Config reloads, by result (success: swapped in; error: invalid, nothing changed).",
            ["result"],
            registry=r,
        )
        self.last_reload = Gauge(
            "kvroute_config_last_success_timestamp_seconds",
            "When the running config was last loaded successfully.",
            registry=r,
        )
        self.last_reload.set_to_current_time()
        self.tasks = Gauge(
            "kvroute_event_loop_tasks",
            "asyncio tasks alive in the router's event loop (at scrape time): one per "
            "request in flight and a few background ones; growth at a steady load is a leak.",
            registry=r,
        )
        self.tasks.set_function(_task_count)
        self.prefix_match = Histogram(
            "kvroute_prefix_match_ratio",
            "Share of the prompt the chosen endpoint was believed to hold in KV cache.",
            ["model"],
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
            registry=r,
        )
        # Tenants: labels are configured tenant names (and "anonymous"), never
        # anything a client wrote.
        self.tenant_requests = Counter(
            "kvroute_tenant_requests_total",
            "Inference requests by tenant and HTTP status.",
            ["tenant", "status"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "kvroute_tenant_tokens_total",
            "Tokens by tenant and kind (prompt, completion), from the answers' usage.",
            ["tenant", "kind"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "kvroute_quota_refusals_total",
            "Requests refused by a tenant's limits, by reason (requests, tokens, "
            "concurrency, budget, too_large, unavailable).",
            ["tenant", "reason"],
            registry=r,
        )
        self.quota_unenforced = Counter(
            "kvroute_quota_unenforced_total",
            "Requests admitted without limits because the quota store was unavailable "
            "(quotas.on_failure: fail_open).",
            registry=r,
        )
        self.quota_settle_failures = Counter(
            "kvroute_quota_settle_failures_total",
            "Finished requests whose real token count could not be recorded in the store.",
            registry=r,
        )
        self.admission_wait = Histogram(
            "kvroute_admission_wait_seconds",
            "Time requests waited in the admission queue of a saturated model.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.admission_rejections = Counter(
            "kvroute_admission_rejections_total",
            "Requests refused by the admission queue, by reason (queue_full, queue_timeout).",
            ["model", "reason"],
            registry=r,
        )
        self.cache_requests = Counter(
            "kvroute_cache_requests_total",
            "Requests for models with a response cache, by result (hit, miss, bypass).",
            ["model", "result"],
            registry=r,
        )
        self.cache_stores = Counter(
            "kvroute_cache_stores_total",
            "Answers stored in the response cache.",
            ["model"],
            registry=r,
        )
        self.cache_stored_bytes = Counter(
            "kvroute_cache_stored_bytes_total",
            "Bytes of answers stored in the response cache.",
            ["model"],
            registry=r,
        )
        self.cache_tokens = Counter(
            "kvroute_cache_tokens_total",
            "Tokens served from the response cache instead of a backend, by kind "
            "(prompt, completion): the GPU work saved.",
            ["model", "kind"],
            registry=r,
        )
        self.cache_lookup = Histogram(
            "kvroute_cache_lookup_seconds",
            "Time to look an answer up in the response cache (hit or miss).",
            ["model"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self._series: dict[tuple[str, str], _EndpointSeries] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: prometheus-client's own lookup takes a
        lock and builds a tuple on every call, which shows on the hot path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def record_decision(self, model: str, policy: str, decision: Decision) -> None:
        self.child(self.decisions, model, policy, decision.reason).inc()
        if decision.prompt_len:
            self.prefix_match.labels(model).observe(decision.match_len / decision.prompt_len)

    def model_totals(self) -> dict[str, ModelTotals]:
        """What this process counted per model since it started, read from the
        counters /metrics serves (for the admin API: the same numbers, as JSON)."""
        acc: dict[str, _ModelAccumulator] = {}

        def of(model: str) -> _ModelAccumulator:
            return acc.setdefault(model, _ModelAccumulator())

        for labels, value in _samples(self.requests, "_total"):
            counts = of(labels["model"]).requests
            counts[labels["status"]] = counts.get(labels["status"], 0.0) + value
        for labels, value in _samples(self.decisions, "_total"):
            counts = of(labels["model"]).decisions
            counts[labels["reason"]] = counts.get(labels["reason"], 0.0) + value
        for labels, value in _samples(self.prefix_match, "_sum"):
            of(labels["model"]).match_sum += value
        for labels, value in _samples(self.prefix_match, "_count"):
            of(labels["model"]).match_count += value
        for labels, value in _samples(self.prompt_tokens, "_total"):
            of(labels["model"]).prompt_tokens += value
        for labels, value in _samples(self.cached_tokens, "_total"):
            of(labels["model"]).cached_tokens += value
        return {model: a.freeze() for model, a in acc.items()}

    def series(self, model: str, endpoint: str) -> _EndpointSeries:
        key = (model, endpoint)
        s = self._series.get(key)
        if s is None:
            s = _EndpointSeries(
                self.duration.labels(model, endpoint), self.ttft.labels(model, endpoint)
            )
            self._series[key] = s
        return s

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class ModelTotals:
    """One model's counters, summed over endpoints (and over the policies it had)."""

    #: Requests answered, by HTTP status.
    requests: dict[str, float]
    #: Routing decisions, by reason.
    decisions: dict[str, float]
    #: Sum and count of the prefix match ratios of its decisions.
    match_sum: float
    match_count: float
    #: Prompt tokens the backends reported, and those they served from cache.
    prompt_tokens: float
    cached_tokens: float


@dataclass(slots=True)
class _ModelAccumulator:
    requests: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, float] = field(default_factory=dict)
    match_sum: float = 0.0
    match_count: float = 0.0
    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0

    def freeze(self) -> ModelTotals:
        return ModelTotals(
            dict(self.requests),
            dict(self.decisions),
            self.match_sum,
            self.match_count,
            self.prompt_tokens,
            self.cached_tokens,
        )


def _samples(metric: Counter | Histogram, suffix: str) -> Iterable[tuple[dict[str, str], float]]:
    """The (labels, value) of ``metric``'s samples named ``<name><suffix>``."""
    for family in metric.collect():
        name = family.name + suffix
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the loop (a test): nothing to count
        return 0.0


class IndexCollector(Collector):
    """Prefix-index size and evictions per model, read at scrape time."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, IndexStats]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        entries = GaugeMetricFamily(
            "kvroute_prefix_index_entries",
            "Entries (block x endpoint) in the prefix index.",
            labels=["model"],
        )
        blocks = GaugeMetricFamily(
            "kvroute_prefix_index_blocks", "Distinct prompt blocks indexed.", labels=["model"]
        )
        evictions = CounterMetricFamily(
            "kvroute_prefix_index_evictions",
            "Index entries dropped for capacity.",
            labels=["model"],
        )
        for model, stats in self._source():
            entries.add_metric([model], stats.entries)
            blocks.add_metric([model], stats.distinct_blocks)
            evictions.add_metric([model], stats.evictions)
        return [entries, blocks, evictions]


class EndpointCollector(Collector):
    """Each endpoint's live state, read at scrape time: up, circuit, scraped load."""

    def __init__(self, source: Callable[[], Iterable[EndpointSnapshot]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "kvroute_endpoint_up",
            "1 when the endpoint takes requests (healthy, not draining, circuit not open).",
            labels=["endpoint"],
        )
        circuit = GaugeMetricFamily(
            "kvroute_endpoint_circuit_open",
            "1 while the endpoint's circuit is open.",
            labels=["endpoint"],
        )
        in_flight = GaugeMetricFamily(
            "kvroute_in_flight_requests",
            "Requests this router has in flight to each endpoint.",
            labels=["endpoint"],
        )
        load = GaugeMetricFamily(
            "kvroute_endpoint_load",
            "Load scraped from the endpoint's metrics (running, waiting, kv_usage).",
            labels=["endpoint", "kind"],
        )
        latency = GaugeMetricFamily(
            "kvroute_endpoint_latency_seconds",
            "This router's decayed latency estimates per endpoint (ttft; tpot: per "
            "output token after the first; duration: a whole answer of "
            f"{REFERENCE_TOKENS} tokens).",
            labels=["endpoint", "quantity"],
        )
        for snap in self._source():
            for quantity, seconds in snap.latency:
                latency.add_metric([snap.id, quantity], seconds)
            up.add_metric([snap.id], 1.0 if snap.available else 0.0)
            circuit.add_metric([snap.id], 1.0 if snap.circuit_open else 0.0)
            in_flight.add_metric([snap.id], snap.in_flight)
            for kind, value in (
                ("running", snap.running),
                ("waiting", snap.waiting),
                ("kv_usage", snap.kv_usage),
            ):
                if value is not None:
                    load.add_metric([snap.id, kind], value)
        return [up, circuit, in_flight, load, latency]


@dataclass(frozen=True, slots=True)
class EndpointSnapshot:
    id: str
    available: bool
    circuit_open: bool
    in_flight: int
    running: float | None
    waiting: float | None
    kv_usage: float | None
    #: (quantity, seconds) of the latency estimates this router has.
    latency: tuple[tuple[str, float], ...] = ()


class QuotaStoreCollector(Collector):
    """The quota store (Redis) as the last calls found it: up, and failures so far."""

    def __init__(self, source: Callable[[], tuple[bool, int]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        is_up, failures = self._source()
        up = GaugeMetricFamily(
            "kvroute_quota_store_up",
            "1 while the quota store (Redis) answers in time, 0 while it is down or slow.",
        )
        up.add_metric([], 1.0 if is_up else 0.0)
        failed = CounterMetricFamily(
            "kvroute_quota_store_failures",
            "Calls to the quota store that failed or timed out.",
        )
        failed.add_metric([], failures)
        return [up, failed]


class AdmissionCollector(Collector):
    """Requests waiting in each model's admission queue, by priority, at scrape time."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "kvroute_admission_queue_depth",
            "Requests waiting for a slot of a saturated model, by priority.",
            labels=["model", "priority"],
        )
        for model, priority, waiting in self._source():
            depth.add_metric([model, priority], waiting)
        return [depth]


class CacheStoreCollector(Collector):
    """The response cache's store at scrape time: entries, bytes, evictions, up."""

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        stats = self._source()
        out: list[Metric] = []
        for name, help_, kind in (
            ("entries", "Answers in the in-process response cache.", GaugeMetricFamily),
            ("bytes", "Bytes held by the in-process response cache.", GaugeMetricFamily),
            ("evictions", "Answers the in-process cache dropped for room.", CounterMetricFamily),
            (
                "up",
                "1 while the response cache's store answers (Redis), else 0.",
                GaugeMetricFamily,
            ),
        ):
            if name in stats:
                family = kind(f"kvroute_cache_{name}", help_)
                family.add_metric([], stats[name])
                out.append(family)
        return out
