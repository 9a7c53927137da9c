"""Endpoints from Consul: the health API, watched with blocking queries.

    GET /v1/health/service/<name>?passing=true&index=<X-Consul-Index>&wait=<dur>
        [&tag=][&dc=][&filter=]   (X-Consul-Token when a token is set)

Consul's rules for blocking queries, followed here: the index comes from the
``X-Consul-Index`` header (a response without it is an error, not a reason to
query again at once); an index that goes backwards resets to 0 (a full read);
an index below 1 is never sent; the loop is rate-limited by a token bucket,
not a sleep per round; errors back off exponentially with jitter. While
Consul is unreachable the last set of endpoints keeps serving, and the
outage shows in metrics and on /admin/config.

Each service instance becomes an endpoint ``consul:<service>:<ID>`` at its
service address (else the node's) and port, described by service Meta (or
tags of the form ``key=value``):

    kvroute-kind        openai | vllm | tgi | triton      (default: openai)
    kvroute-models      a,b  or  a=served-a,b            (required)
    kvroute-weight      relative capacity                 (default 1)
    kvroute-scheme      http | https                      (default http)
    kvroute-metrics-url where its Prometheus metrics are (Triton's own port)
    kvroute-kv-capacity-tokens
    kvroute-options     the kind's options, as JSON

Other Meta entries become the endpoint's labels. The router's routing code
never imports this module: it only sees endpoints appear and go.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from router.config import ConsulConfig, ConsulService, EndpointConfig
from router.state import AppState
from router.tasks import cancel_all

LOG = logging.getLogger("kvroute.consul")
SOURCE = "consul"


class DiscoveryError(Exception):
    pass


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; ``take`` waits for one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


def wait_seconds(wait: str) -> float:
    if wait.endswith("ms"):
        return int(wait[:-2]) / 1000
    if wait.endswith("m"):
        return int(wait[:-1]) * 60.0
    return float(int(wait[:-1]))


def next_index(previous: int, header: str | None) -> int:
    """The index for the next blocking query, by Consul's rules."""
    if header is None:
        raise DiscoveryError("Consul's answer has no X-Consul-Index header")
    try:
        new = int(header)
    except ValueError as exc:
        raise DiscoveryError(f"bad X-Consul-Index {header!r}") from exc
    if new < previous:
        return 0  # it went backwards (e.g. a snapshot restore): read everything again
    return max(new, 1)


def instance_endpoint(service: str, entry: Mapping[str, Any]) -> EndpointConfig:
    """One Consul health entry -> an endpoint config (ValueError if unusable)."""
    svc = entry.get("Service") or {}
    node = entry.get("Node") or {}
    meta: dict[str, str] = {}
    for tag in svc.get("Tags") or []:
        if isinstance(tag, str) and tag.startswith("kvroute-") and "=" in tag:
            key, _, value = tag.partition("=")
            meta[key] = value
    meta.update({str(k): str(v) for k, v in (svc.get("Meta") or {}).items()})
    address = svc.get("Address") or node.get("Address")
    port = svc.get("Port")
    if not address or not port:
        raise ValueError("instance has no address or port")
    models_spec = meta.get("kvroute-models", "")
    models: list[dict[str, str]] = []
    for item in filter(None, (m.strip() for m in models_spec.split(","))):
        name, _, served = item.partition("=")
        models.append({"name": name, **({"served_name": served} if served else {})})
    if not models:
        raise ValueError("no kvroute-models in the service's Meta or tags")
    raw: dict[str, Any] = {
        "id": f"consul:{service}:{svc.get('ID') or address + '-' + str(port)}",
        "url": f"{meta.get('kvroute-scheme', 'http')}://{address}:{port}",
        "kind": meta.get("kvroute-kind", "openai"),
        "models": models,
        "labels": {
            **{k: v for k, v in meta.items() if not k.startswith("kvroute-")},
            "consul_node": str(node.get("Node", "")),
        },
    }
    if "kvroute-weight" in meta:
        raw["weight"] = float(meta["kvroute-weight"])
    if "kvroute-metrics-url" in meta:
        raw["metrics_url"] = meta["kvroute-metrics-url"]
    if "kvroute-kv-capacity-tokens" in meta:
        raw["kv_capacity_tokens"] = int(meta["kvroute-kv-capacity-tokens"])
    if "kvroute-options" in meta:
        raw["options"] = orjson.loads(meta["kvroute-options"])
    try:
        return EndpointConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError("; ".join(e["msg"] for e in exc.errors())) from exc


class DiscoverySupervisor:
    """Runs the discovery the config asks for, and swaps it when a reload changes it."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.current: ConsulDiscovery | None = None
        self.config: ConsulConfig | None = None

    async def ensure(self) -> None:
        wanted = self.state.config.discovery.consul
        if wanted == self.config:
            return
        if self.current is not None:
            await self.current.stop()
            self.current = None
        watched = {s.name for s in wanted.services} if wanted else set()
        for endpoint_id in self.state.registry.ids(SOURCE):
            if endpoint_id.split(":")[1] not in watched:
                self.state.remove_endpoint(endpoint_id)
        self.state.discovery.pop(SOURCE, None)
        self.config = wanted
        if wanted is not None:
            self.current = ConsulDiscovery(self.state, wanted)
            await self.current.start()

    async def stop(self) -> None:
        if self.current is not None:
            await self.current.stop()
            self.current = None


class ConsulDiscovery:
    def __init__(
        self, state: AppState, config: ConsulConfig, client: httpx.AsyncClient | None = None
    ) -> None:
        self.state = state
        self.config = config
        self._client = client
        self._own_client = client is None
        self._tasks: list[asyncio.Task[None]] = []
        # What an earlier watcher (before a reload) registered is ours to update.
        self._known: dict[str, set[str]] = {
            s.name: {i for i in state.registry.ids(SOURCE) if i.startswith(f"consul:{s.name}:")}
            for s in config.services
        }
        self._rng = random.Random()
        self.status: dict[str, Any] = {"up": None, "services": {}}
        state.discovery[SOURCE] = self.status

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient()
        for service in self.config.services:
            self._tasks.append(asyncio.create_task(self._watch(service)))

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks.clear()
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _watch(self, service: ConsulService) -> None:
        cfg = self.config
        bucket = TokenBucket(cfg.rate, cfg.burst)
        index = 0
        failures = 0
        status: dict[str, Any] = {"index": 0, "last_error": None, "endpoints": 0}
        self.status["services"][service.name] = status
        while True:
            await bucket.take()
            try:
                entries, index = await self.query(service, index)
                self.apply(service.name, entries)
                failures = 0
                status.update(
                    index=index, last_error=None, endpoints=len(entries), last_success=time.time()
                )
                self._set_up(True)
            except (httpx.HTTPError, DiscoveryError, ValueError) as exc:
                failures += 1
                status["last_error"] = f"{exc.__class__.__name__}: {exc}"
                self._set_up(False)
                self.state.metrics.discovery_errors.labels(SOURCE).inc()
                LOG.warning(
                    {
                        "event": "consul_error",
                        "service": service.name,
                        "error": status["last_error"],
                    }
                )
                delay = min(cfg.backoff_max, cfg.backoff_base * 2 ** (failures - 1))
                await asyncio.sleep(delay * self._rng.uniform(0.5, 1.5))

    def _set_up(self, up: bool) -> None:
        self.status["up"] = up
        self.state.metrics.discovery_up.labels(SOURCE).set(1 if up else 0)

    async def query(self, service: ConsulService, index: int) -> tuple[list[Any], int]:
        assert self._client is not None
        cfg = self.config
        params: dict[str, str] = {"passing": "true", "wait": cfg.wait}
        if index >= 1:
            params["index"] = str(index)
        for name in ("tag", "dc", "filter"):
            value = getattr(service, name)
            if value:
                params[name] = value
        headers = {"X-Consul-Token": cfg.token.get_secret_value()} if cfg.token else {}
        r = await self._client.get(
            f"{cfg.url}/v1/health/service/{service.name}",
            params=params,
            headers=headers,
            # Consul adds up to wait/16 of jitter to a blocking query.
            timeout=wait_seconds(cfg.wait) * 1.1 + 5,
        )
        if r.status_code != 200:
            raise DiscoveryError(f"Consul answered HTTP {r.status_code}: {r.text[:200]}")
        new_index = next_index(index, r.headers.get("X-Consul-Index"))
        entries = r.json()
        if not isinstance(entries, list):
            raise DiscoveryError("Consul's answer is not a list")
        return entries, new_index

    def apply(self, service: str, entries: list[Any]) -> None:
        """Make the registry's endpoints for ``service`` what Consul says."""
        seen: set[str] = set()
        for entry in entries:
            try:
                endpoint = instance_endpoint(service, entry)
            except ValueError as exc:
                self.state.metrics.discovery_invalid.labels(SOURCE).inc()
                LOG.warning(
                    {"event": "consul_instance_skipped", "service": service, "error": str(exc)}
                )
                continue
            seen.add(endpoint.id)
            current = self.state.registry.get(endpoint.id)
            if current is None or current.config != endpoint:
                self.state.upsert_endpoint(endpoint, SOURCE)
        for gone in self._known.get(service, set()) - seen:
            self.state.remove_endpoint(gone)
        self._known[service] = seen
