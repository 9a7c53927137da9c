"""The router's Prometheus metrics, on a registry of its own (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

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

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


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
        self.in_flight = Gauge(
            "kvroute_in_flight_requests",
            "Requests this router has in flight to each endpoint.",
            ["endpoint"],
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
        self._series: dict[tuple[str, str], _EndpointSeries] = {}

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
