"""The router's Prometheus metrics, on a registry of its own (no globals).

Every family is declared once, as a ``Family`` (name, type, help, labels):
``Metrics`` records one for each metric it creates, and each collector here
lists its own in ``FAMILIES`` (its ``describe()``, so the registry learns its
names without collecting). ``Metrics.families()`` is therefore the whole list
of what ``/metrics`` can expose, and docs/metrics.md is generated from it
(router/metrics_doc.py), so the reference cannot drift from the code.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
#: kvroute's own time per request is usually well under a millisecond.
OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "AdmissionCollector",
    "CacheStoreCollector",
    "EndpointCollector",
    "EndpointSnapshot",
    "Family",
    "FeedSnapshot",
    "IndexCollector",
    "KVEventsCollector",
    "Kind",
    "Metrics",
    "ModelTotals",
    "QuotaStoreCollector",
]


#: What a collector here fills: counters and gauges.
Samples = CounterMetricFamily | GaugeMetricFamily


class Kind(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: what docs/metrics.md lists for it."""

    #: prometheus-client's family name (a counter's without ``_total``).
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def exposed(self) -> str:
        """The name a query uses (a histogram's series add _bucket, _sum, _count)."""
        return f"{self.name}_total" if self.kind is Kind.COUNTER else self.name

    def empty(self) -> Samples:
        """A family of this shape with no samples yet (collectors fill it)."""
        if self.kind is Kind.COUNTER:
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        if self.kind is Kind.GAUGE:
            return GaugeMetricFamily(self.name, self.help, labels=self.labels)
        raise TypeError(f"collectors here build counters and gauges, not {self.kind}")


class DescribedCollector(Collector):
    """A collector that states its families up front (``describe``), so they
    can be registered and documented without data."""

    FAMILIES: ClassVar[tuple[Family, ...]] = ()

    def describe(self) -> list[Samples]:
        return [family.empty() for family in self.FAMILIES]


@dataclass(slots=True)
class _EndpointSeries:
    duration: Histogram
    ttft: Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[str, Family] = {}
        self.requests = self._counter(
            "kvroute_requests_total",
            "Requests answered, by model, endpoint (none if never forwarded) and HTTP status.",
            ["model", "endpoint", "status"],
        )
        self.duration = self._histogram(
            "kvroute_request_duration_seconds",
            "Time from request to the end of the response, per model and endpoint.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = self._histogram(
            "kvroute_time_to_first_token_seconds",
            "Time from request to the first streamed chunk, per model and endpoint.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_errors = self._counter(
            "kvroute_upstream_errors_total",
            "Failed attempts to an endpoint, by kind of failure.",
            ["endpoint", "error"],
        )
        self.decisions = self._counter(
            "kvroute_routing_decisions_total",
            "Routing decisions by model, policy and reason.",
            ["model", "policy", "reason"],
        )
        self.stream_errors = self._counter(
            "kvroute_stream_errors_total",
            "Streams cut short by the upstream after the first byte reached the client.",
            ["endpoint"],
        )
        self.retries = self._counter(
            "kvroute_retries_total",
            "Attempts beyond the first (failover to another endpoint or model).",
            ["model"],
        )
        self.retries_denied = self._counter(
            "kvroute_retries_denied_total",
            "Retries not made because the fleet-wide retry budget was spent.",
        )
        self.prompt_tokens = self._counter(
            "kvroute_prompt_tokens_total",
            "Prompt tokens, as the backends reported them in usage.",
            ["model", "endpoint"],
        )
        self.cached_tokens = self._counter(
            "kvroute_cached_prompt_tokens_total",
            "Prompt tokens the backends reported served from their prefix cache.",
            ["model", "endpoint"],
        )
        self.discovery_errors = self._counter(
            "kvroute_discovery_errors_total",
            "Failed discovery queries (the last known endpoints keep serving).",
            ["source"],
        )
        self.discovery_invalid = self._counter(
            "kvroute_discovery_invalid_instances_total",
            "Discovered instances skipped for unusable metadata.",
            ["source"],
        )
        self.discovery_up = self._gauge(
            "kvroute_discovery_up",
            "1 while the discovery source answers, 0 during an outage.",
            ["source"],
        )
        self.reloads = self._counter(
            "kvroute_config_reload",
            "Config reloads, by result (success: swapped in; error: invalid, nothing changed).",
            ["result"],
        )
        self.last_reload = self._gauge(
            "kvroute_config_last_success_timestamp_seconds",
            "When the running config was last loaded successfully.",
        )
        self.last_reload.set_to_current_time()
        self.requests_in_flight = self._gauge(
            "kvroute_requests_in_flight",
            "Inference requests this router process is handling (received, not yet "
            "answered: reading, queued for admission, forwarded, streaming, answered from "
            "cache); per pod, what the HorizontalPodAutoscaler scales on.",
        )
        #: The gauge's value: a plain int the request path counts (RequestMiddleware),
        #: read at scrape time. Gauge.inc()/dec() take a lock and check the mode on
        #: every call; two per request were a measurable part of its CPU at c=1.
        self.in_flight = 0
        self.requests_in_flight.set_function(lambda: self.in_flight)
        self.tasks = self._gauge(
            "kvroute_event_loop_tasks",
            "asyncio tasks alive in the router's event loop (at scrape time): one per "
            "request in flight and a few background ones; growth at a steady load is a leak.",
        )
        self.tasks.set_function(_task_count)
        self.prefix_match = self._histogram(
            "kvroute_prefix_match_ratio",
            "Share of the prompt the chosen endpoint was believed to hold in KV cache.",
            ["model"],
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
        )
        # Tenants: labels are configured tenant names (and "anonymous"), never
        # anything a client wrote.
        self.tenant_requests = self._counter(
            "kvroute_tenant_requests_total",
            "Inference requests by tenant and HTTP status.",
            ["tenant", "status"],
        )
        self.tenant_tokens = self._counter(
            "kvroute_tenant_tokens_total",
            "Tokens by tenant and kind (prompt, completion), from the answers' usage.",
            ["tenant", "kind"],
        )
        self.quota_refusals = self._counter(
            "kvroute_quota_refusals_total",
            "Requests refused by a tenant's limits, by reason (requests, tokens, "
            "concurrency, budget, too_large, unavailable).",
            ["tenant", "reason"],
        )
        self.quota_unenforced = self._counter(
            "kvroute_quota_unenforced_total",
            "Requests admitted without limits because the quota store was unavailable "
            "(quotas.on_failure: fail_open).",
        )
        self.quota_settle_failures = self._counter(
            "kvroute_quota_settle_failures_total",
            "Finished requests whose real token count could not be recorded in the store.",
        )
        self.admission_wait = self._histogram(
            "kvroute_admission_wait_seconds",
            "Time requests waited in the admission queue of a saturated model.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
        )
        self.admission_rejections = self._counter(
            "kvroute_admission_rejections_total",
            "Requests refused by the admission queue, by reason (queue_full, queue_timeout).",
            ["model", "reason"],
        )
        self.cache_requests = self._counter(
            "kvroute_cache_requests_total",
            "Requests for models with a response cache, by result (hit, miss, bypass).",
            ["model", "result"],
        )
        self.cache_stores = self._counter(
            "kvroute_cache_stores_total",
            "Answers stored in the response cache.",
            ["model"],
        )
        self.cache_stored_bytes = self._counter(
            "kvroute_cache_stored_bytes_total",
            "Bytes of answers stored in the response cache.",
            ["model"],
        )
        self.cache_tokens = self._counter(
            "kvroute_cache_tokens_total",
            "Tokens served from the response cache instead of a backend, by kind "
            "(prompt, completion): the GPU work saved.",
            ["model", "kind"],
        )
        self.cache_lookup = self._histogram(
            "kvroute_cache_lookup_seconds",
            "Time to look an answer up in the response cache (hit or miss).",
            ["model"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        self.overhead = self._histogram(
            "kvroute_overhead_seconds",
            "kvroute's own time per inference answer: from receiving the request to "
            "sending the response's start, minus the time spent waiting on backends "
            "(each attempt, failed ones too, from sending it to its answer or first "
            "output) and queued for admission. Also the x-kvroute-overhead-ms header.",
            ["model"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.placements_published = self._counter(
            "kvroute_placements_published_total",
            "Placements of prompts this router told the other router replicas "
            "(placements.redis; router/placements).",
        )
        self.placements_received = self._counter(
            "kvroute_placements_received_total",
            "The other routers' placements by result: applied (indexed), unknown_model "
            "(no prefix_affinity route for it here yet), unknown_endpoint (not serving "
            "the model here); invalid counts messages that could not be read.",
            ["result"],
        )
        self.placements_dropped = self._counter(
            "kvroute_placements_dropped_total",
            "Placements never published, by reason: backlog (more waiting than "
            "placements.max_pending), publish_failed (Redis refused or timed out).",
            ["reason"],
        )
        self.placements_lag = self._histogram(
            "kvroute_placements_lag_seconds",
            "From another router publishing placements to this one indexing them (the "
            "two wall clocks'; flush_interval, both event loops and Redis): while it "
            "lasts, routers place a new prompt without knowing of each other.",
            [],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.placements_up = self._gauge(
            "kvroute_placements_up",
            "1 while the other routers' placements arrive and this router's are "
            "published (the policy routes as one router), else 0.",
        )
        self._series: dict[tuple[str, str], _EndpointSeries] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _declare(self, family: Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric family {family.name} declared twice")
        self._families[family.name] = family

    def _counter(self, name: str, help_: str, labels: Sequence[str] = ()) -> Counter:
        self._declare(Family(name.removesuffix("_total"), Kind.COUNTER, help_, tuple(labels)))
        return Counter(name, help_, labels, registry=self.registry)

    def _gauge(self, name: str, help_: str, labels: Sequence[str] = ()) -> Gauge:
        self._declare(Family(name, Kind.GAUGE, help_, tuple(labels)))
        return Gauge(name, help_, labels, registry=self.registry)

    def _histogram(
        self, name: str, help_: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Histogram:
        self._declare(Family(name, Kind.HISTOGRAM, help_, tuple(labels)))
        return Histogram(name, help_, labels, buckets=buckets, registry=self.registry)

    def register(self, collector: DescribedCollector) -> None:
        """Add a scrape-time collector (its families join ``families()``)."""
        for family in collector.FAMILIES:
            self._declare(family)
        self.registry.register(collector)

    def families(self) -> list[Family]:
        """Every family /metrics may expose, by name."""
        return sorted(self._families.values(), key=lambda f: f.name)

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


def _model(name: str, kind: Kind, help_: str) -> Family:
    return Family(name, kind, help_, ("model",))


class IndexCollector(DescribedCollector):
    """Prefix-index size and evictions per model, read at scrape time."""

    FAMILIES = (
        _model(
            "kvroute_prefix_index_entries",
            Kind.GAUGE,
            "Entries (block x endpoint) in the prefix index.",
        ),
        _model("kvroute_prefix_index_blocks", Kind.GAUGE, "Distinct prompt blocks indexed."),
        _model(
            "kvroute_prefix_index_evictions", Kind.COUNTER, "Index entries dropped for capacity."
        ),
    )

    def __init__(self, source: Callable[[], Iterable[tuple[str, IndexStats]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        entries, blocks, evictions = out = self.describe()
        for model, stats in self._source():
            entries.add_metric([model], stats.entries)
            blocks.add_metric([model], stats.distinct_blocks)
            evictions.add_metric([model], stats.evictions)
        return out


class PromptCollector(DescribedCollector):
    """Prompts the router had to tokenize and could not, read at scrape time
    from every distinct prompt tokenizer of the config (models that share
    one count once). Such requests route on the approximate index."""

    FAMILIES = (
        Family(
            "kvroute_prompt_tokenize_failures",
            Kind.COUNTER,
            "Prompts the router could not tokenize for precise routing (they routed on "
            "characters), by reason: rejected (the chat template refused the "
            "conversation), failed (rendering failed or ran over its time budget), "
            "encode (the tokenizer refused the text).",
            ("reason",),
        ),
    )

    def __init__(self, source: Callable[[], Iterable[Mapping[str, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        (failures,) = out = self.describe()
        totals: dict[str, int] = {}
        for counts in self._source():
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in totals.items():
            failures.add_metric([reason], n)
        return out


def _endpoint(name: str, kind: Kind, help_: str, *more: str) -> Family:
    return Family(name, kind, help_, ("endpoint", *more))


class EndpointCollector(DescribedCollector):
    """Each endpoint's live state, read at scrape time: up, circuit, scraped load."""

    FAMILIES = (
        _endpoint(
            "kvroute_endpoint_up",
            Kind.GAUGE,
            "1 when the endpoint takes requests (healthy, not draining, circuit not open).",
        ),
        _endpoint(
            "kvroute_endpoint_circuit_open", Kind.GAUGE, "1 while the endpoint's circuit is open."
        ),
        _endpoint(
            "kvroute_in_flight_requests",
            Kind.GAUGE,
            "Requests this router has in flight to each endpoint.",
        ),
        _endpoint(
            "kvroute_endpoint_load",
            Kind.GAUGE,
            "Load scraped from the endpoint's metrics (running, waiting, kv_usage).",
            "kind",
        ),
        _endpoint(
            "kvroute_endpoint_latency_seconds",
            Kind.GAUGE,
            "This router's decayed latency estimates per endpoint (ttft; tpot: per "
            "output token after the first; duration: a whole answer of "
            f"{REFERENCE_TOKENS} tokens).",
            "quantity",
        ),
    )

    def __init__(self, source: Callable[[], Iterable[EndpointSnapshot]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        up, circuit, in_flight, load, latency = out = self.describe()
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
        return out


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


class QuotaStoreCollector(DescribedCollector):
    """The quota store (Redis) as the last calls found it: up, and failures so far."""

    FAMILIES = (
        Family(
            "kvroute_quota_store_up",
            Kind.GAUGE,
            "1 while the quota store (Redis) answers in time, 0 while it is down or slow.",
        ),
        Family(
            "kvroute_quota_store_failures",
            Kind.COUNTER,
            "Calls to the quota store that failed or timed out.",
        ),
    )

    def __init__(self, source: Callable[[], tuple[bool, int]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        is_up, failures = self._source()
        up, failed = out = self.describe()
        up.add_metric([], 1.0 if is_up else 0.0)
        failed.add_metric([], failures)
        return out


class AdmissionCollector(DescribedCollector):
    """Requests waiting in each model's admission queue, by priority, at scrape time."""

    FAMILIES = (
        Family(
            "kvroute_admission_queue_depth",
            Kind.GAUGE,
            "Requests waiting for a slot of a saturated model, by priority.",
            ("model", "priority"),
        ),
    )

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        (depth,) = out = self.describe()
        for model, priority, waiting in self._source():
            depth.add_metric([model, priority], waiting)
        return out


class CacheStoreCollector(DescribedCollector):
    """The response cache's store at scrape time: entries, bytes, evictions, up
    (each only where the store keeps it)."""

    FAMILIES = (
        Family("kvroute_cache_entries", Kind.GAUGE, "Answers in the in-process response cache."),
        Family("kvroute_cache_bytes", Kind.GAUGE, "Bytes held by the in-process response cache."),
        Family(
            "kvroute_cache_evictions",
            Kind.COUNTER,
            "Answers the in-process cache dropped for room.",
        ),
        Family(
            "kvroute_cache_up",
            Kind.GAUGE,
            "1 while the response cache's store answers (Redis), else 0.",
        ),
    )

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        stats = self._source()
        out: list[Metric] = []
        for family in self.FAMILIES:
            key = family.name.removeprefix("kvroute_cache_")
            if key in stats:
                metric = family.empty()
                metric.add_metric([], stats[key])
                out.append(metric)
        return out


@dataclass(frozen=True, slots=True)
class FeedSnapshot:
    """One endpoint's KV-event feed at scrape time (router/kvevents/subscriber.py).
    Each pair is (label value, number) over a fixed set of values (an enum's),
    zeros included, so every series exists from the start."""

    endpoint: str
    #: (state, 1 for the current one else 0).
    states: tuple[tuple[str, float], ...]
    batches: int
    events: int
    gaps: int
    replays: int
    #: (result of a resync, count).
    resyncs: tuple[tuple[str, int], ...]
    restarts: int
    #: (kind of error, count).
    errors: tuple[tuple[str, int], ...]
    blocks: int
    #: (what happened to blocks: stored, removed, skipped; count of blocks).
    block_events: tuple[tuple[str, int], ...]
    clears: int


def _feed(name: str, kind: Kind, help_: str, *more: str) -> Family:
    return Family(f"kvroute_kv_events_{name}", kind, help_, ("endpoint", *more))


class KVEventsCollector(DescribedCollector):
    """The KV-event feeds, per endpoint with ``kv_events``, read at scrape time.
    Labels are endpoint ids (the config's or discovery's) and fixed enums:
    nothing a publisher sends becomes a label."""

    FAMILIES = (
        _feed(
            "state",
            Kind.GAUGE,
            "1 for the feed's current state, 0 for the others: live (its blocks are "
            "trusted), disconnected, unhealthy (endpoint fails its health probes), "
            "resyncing (a replay is due or its socket does not answer), grace (history "
            "was lost: rebuilding for resync_grace), overflow (the publisher claims more "
            "blocks than the index holds). Every state but live routes on the "
            "approximate index.",
            "state",
        ),
        _feed("batches", Kind.COUNTER, "Event batches applied to the precise index."),
        _feed("events", Kind.COUNTER, "Events in the batches applied."),
        _feed(
            "gaps",
            Kind.COUNTER,
            "Gaps in the publisher's sequence numbers (batches missed; a resync follows).",
        ),
        _feed("replays", Kind.COUNTER, "Replays asked of the publisher's replay socket."),
        _feed(
            "resyncs",
            Kind.COUNTER,
            "Resyncs by result: resumed (same publisher, gap filled or probe passed), "
            "empty (no history yet), restarted (another publisher process: blocks "
            "cleared), partial (history lost), complete (replayed from the start), "
            "failed (the replay socket did not answer).",
            "result",
        ),
        _feed(
            "restarts",
            Kind.COUNTER,
            "Publisher restarts detected (its sequence started again; blocks cleared).",
        ),
        _feed(
            "errors",
            Kind.COUNTER,
            "Errors by kind: decode (a batch kvroute could not read, live or replayed), "
            "replay_timeout, replay_too_large, crash (the subscriber task failed and "
            "was restarted).",
            "kind",
        ),
        _feed("blocks", Kind.GAUGE, "KV blocks the precise index holds for the endpoint."),
        _feed(
            "block_events",
            Kind.COUNTER,
            "Blocks by what the events did to them: stored (indexed), removed, skipped "
            "(not indexable: another medium or KV-cache group, an unknown parent).",
            "action",
        ),
        _feed(
            "clears",
            Kind.COUNTER,
            "Times the endpoint's blocks were emptied at once (the engine cleared its "
            "cache or restarted, history was lost, or the publisher overflowed the index).",
        ),
    )

    def __init__(self, source: Callable[[], Iterable[FeedSnapshot]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        out = self.describe()
        (
            state,
            batches,
            events,
            gaps,
            replays,
            resyncs,
            restarts,
            errors,
            blocks,
            actions,
            clears,
        ) = out
        for feed in self._source():
            at = [feed.endpoint]
            for name, value in feed.states:
                state.add_metric([*at, name], value)
            batches.add_metric(at, feed.batches)
            events.add_metric(at, feed.events)
            gaps.add_metric(at, feed.gaps)
            replays.add_metric(at, feed.replays)
            for result, n in feed.resyncs:
                resyncs.add_metric([*at, result], n)
            restarts.add_metric(at, feed.restarts)
            for kind, n in feed.errors:
                errors.add_metric([*at, kind], n)
            blocks.add_metric(at, feed.blocks)
            for action, n in feed.block_events:
                actions.add_metric([*at, action], n)
            clears.add_metric(at, feed.clears)
        return out
