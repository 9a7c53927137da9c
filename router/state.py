"""Everything one router process shares at run time, built from one config."""

from __future__ import annotations

from dataclasses import dataclass

from router.config import Config
from router.forward import Forwarder
from router.metrics import IndexCollector, Metrics
from router.registry import EndpointRegistry, RouteTable


@dataclass
class AppState:
    config: Config
    registry: EndpointRegistry
    routes: RouteTable
    forwarder: Forwarder
    metrics: Metrics
    ready: bool = False
    #: Set at SIGTERM: /ready says 503 while in-flight requests finish.
    shutting_down: bool = False

    def remove_endpoint(self, endpoint_id: str) -> None:
        """An endpoint left the fleet: forget it everywhere, policies included."""
        self.registry.remove(endpoint_id)
        for route in self.routes.routes():
            route.policy.forget(endpoint_id)

    @classmethod
    def from_config(cls, config: Config) -> AppState:
        registry = EndpointRegistry(config.endpoints, config.circuit)
        routes = RouteTable(config, registry)
        metrics = Metrics()
        metrics.registry.register(IndexCollector(routes.index_stats))
        return cls(
            config=config,
            registry=registry,
            routes=routes,
            forwarder=Forwarder(config.timeouts),
            metrics=metrics,
        )
