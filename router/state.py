"""Everything one router process shares at run time, built from one config.

``apply`` swaps in a new config (a reload) without losing what was learned:
endpoints that stay keep their health, circuit and load; models whose policy
did not change keep their policy (and its prefix index). Requests in flight
hold their own references, so they finish on the config they started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from policies.blocks import BlockIndex
from router.admission import AdmissionGate
from router.cache import open_cache
from router.cache.stage import ResponseCache
from router.circuit import CircuitState
from router.config import Config, EndpointConfig
from router.forward import Forwarder
from router.latency import LatencySnapshot
from router.metrics import (
    AdmissionCollector,
    CacheStoreCollector,
    EndpointCollector,
    EndpointSnapshot,
    FeedSnapshot,
    IndexCollector,
    KVEventsCollector,
    Metrics,
    PromptCollector,
    QuotaStoreCollector,
)
from router.quota import open_store
from router.quota.service import Quotas, store_status
from router.registry import EndpointRegistry, RouteTable
from router.retry import RetryBudget
from router.sources import STATIC, Source
from router.tenants import Tenants

if TYPE_CHECKING:
    from router.tracing import Tracing


def _estimates(snap: LatencySnapshot | None) -> tuple[tuple[str, float], ...]:
    if snap is None:
        return ()
    pairs = (("ttft", snap.ttft), ("tpot", snap.tpot), ("duration", snap.duration))
    return tuple((q, s) for q, s in pairs if s is not None)


class Closable(Protocol):
    async def close(self) -> None: ...


@dataclass
class AppState:
    config: Config
    registry: EndpointRegistry
    routes: RouteTable
    forwarder: Forwarder
    metrics: Metrics
    budget: RetryBudget
    tenants: Tenants
    quotas: Quotas
    admission: AdmissionGate
    cache: ResponseCache
    ready: bool = False
    #: Set at SIGTERM: /ready says 503 while in-flight requests finish.
    shutting_down: bool = False
    #: Where the config came from (for reloads), and how the last reload went.
    config_path: str | None = None
    reload_status: dict[str, Any] = field(default_factory=dict)
    #: Discovery sources by name, for the admin API ("consul": {...}).
    discovery: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Quota and cache stores replaced by a reload, closed by the lifecycle.
    retired_stores: list[Closable] = field(default_factory=list)
    #: The KV-event feeds at scrape time; the KVEventsHub sets it (none without one).
    kv_feeds: Callable[[], Iterable[FeedSnapshot]] = lambda: ()
    #: Per model, whether its placements are shared with other routers; the
    #: lifecycle's PlacementSharing sets it (router/placements).
    placements_status: Callable[[], dict[str, Any]] = lambda: {}
    #: OpenTelemetry spans (None: tracing off); set by the lifecycle's TracingService.
    tracing: Tracing | None = None

    def endpoint_snapshots(self) -> list[EndpointSnapshot]:
        now = self.registry.clock()
        return [
            EndpointSnapshot(
                e.id,
                e.admits(now),
                e.circuit.state is CircuitState.OPEN,
                e.in_flight,
                e.running,
                e.waiting,
                e.kv_usage,
                _estimates(e.latency.view(now)),
            )
            for e in self.registry.all()
        ]

    def cache_store_stats(self) -> dict[str, float]:
        stats = self.cache.store.stats()
        return {
            k: float(v) for k, v in stats.items() if k in ("entries", "bytes", "evictions", "up")
        }

    def admission_depths(self) -> list[tuple[str, str, int]]:
        return [
            (model, priority, waiting)
            for model, stats in self.admission.stats().items()
            for priority, waiting in stats["waiting_by_priority"].items()
        ]

    def prompt_failures(self) -> list[dict[str, int]]:
        """Each distinct prompt tokenizer's failure counts (models sharing
        one tokenizer share its counts)."""
        distinct = {
            id(m.prompts): m.prompts for m in self.config.models.values() if m.prompts is not None
        }
        return [p.failures for p in distinct.values()]

    def quota_store_health(self) -> tuple[bool, int]:
        status = store_status(self.quotas)
        return bool(status["up"]), int(status.get("failures", 0))

    @property
    def blocks(self) -> BlockIndex:
        """The precise index: each event-publishing endpoint's KV blocks
        (fed by router/kvevents; kept across reloads)."""
        return self.registry.blocks

    def upsert_endpoint(self, cfg: EndpointConfig, source: Source) -> None:
        self.registry.upsert(cfg, source)

    def remove_endpoint(self, endpoint_id: str) -> None:
        """An endpoint left the fleet: no new requests (those in flight finish on
        the references they hold), and every policy forgets it."""
        self.registry.remove(endpoint_id)
        self.blocks.forget(endpoint_id)
        for route in self.routes.routes():
            route.policy.forget(endpoint_id)

    def apply(self, config: Config) -> None:
        """Swap in a validated config."""
        wanted = {ep.id: ep for ep in config.endpoints}
        for endpoint_id in self.registry.ids(STATIC) - set(wanted):
            self.remove_endpoint(endpoint_id)
        for ep in config.endpoints:
            current = self.registry.get(ep.id)
            if current is None or current.config != ep:
                self.registry.upsert(ep, STATIC)
        self.registry.set_circuit_config(config.circuit)
        self.registry.set_latency_config(config.latency)
        self.routes = RouteTable(config, self.registry, previous=self.routes)
        self.tenants = Tenants(config)
        if config.admission != self.config.admission:
            self.admission.reconfigure(config.admission)
        if config.quotas != self.config.quotas:
            # Counters in Redis survive the swap; a process's own start afresh.
            old = self.quotas
            self.quotas = Quotas(config, open_store(config.quotas), old.pending)
            self.retired_stores.append(old.store)
        else:
            self.quotas = Quotas(config, self.quotas.store)
        if config.cache != self.config.cache:
            self.retired_stores.append(self.cache)
            self.cache = open_cache(config.cache)
        if config.timeouts != self.config.timeouts:
            self.forwarder.set_timeouts(config.timeouts)
        if config.retries != self.config.retries:
            self.budget = RetryBudget.from_config(config.retries)
        self.config = config
        self.reload_status.update(last_success=time.time(), last_error=None)

    @classmethod
    def from_config(cls, config: Config, config_path: str | None = None) -> AppState:
        registry = EndpointRegistry(config.endpoints, config.circuit, config.latency)
        state = cls(
            config=config,
            registry=registry,
            routes=RouteTable(config, registry),
            forwarder=Forwarder(config.timeouts),
            metrics=Metrics(),
            budget=RetryBudget.from_config(config.retries),
            tenants=Tenants(config),
            quotas=Quotas(config, open_store(config.quotas)),
            admission=AdmissionGate(config.admission),
            cache=open_cache(config.cache),
            config_path=config_path,
        )
        metrics = state.metrics
        metrics.register(IndexCollector(lambda: state.routes.index_stats()))
        metrics.register(EndpointCollector(state.endpoint_snapshots))
        metrics.register(QuotaStoreCollector(state.quota_store_health))
        metrics.register(AdmissionCollector(state.admission_depths))
        metrics.register(CacheStoreCollector(state.cache_store_stats))
        metrics.register(KVEventsCollector(lambda: state.kv_feeds()))
        metrics.register(PromptCollector(state.prompt_failures))
        state.reload_status.update(path=config_path, last_success=time.time(), last_error=None)
        return state
