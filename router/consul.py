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
    kvroute-kv-events-port         vLLM's KV-event PUB port at the instance's
                                   address (enables the precise index)
    kvroute-kv-events-replay-port  its replay (ROUTER) port
    kvroute-kv-events-topic        its topic (default: all messages)

Other Meta entries become the endpoint's labels. An entry kvroute cannot use
(no models, a ``Port`` that is not a number, ``Meta`` that is not an object,
options that are not a JSON object...) is skipped and counted in
``kvroute_discovery_invalid_instances_total``; the rest of the answer applies.
The router's routing code never imports this module: it only sees endpoints
appear and go.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from router.config import Config, ConsulConfig, ConsulService, EndpointConfig
from router.sources import Source, SourceKind
from router.state import AppState
from router.tasks import cancel_all

LOG = logging.getLogger("kvroute.consul")
#: The ``source`` label of the discovery metrics, and the key on /admin/config.
SOURCE = SourceKind.CONSUL.value


class DiscoveryError(Exception):
    """Consul did not give a usable answer (the watch backs off and asks again)."""


class InvalidInstance(ValueError):
    """One entry of Consul's answer that kvroute cannot use (skipped and counted)."""


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


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInstance(f"{where} is {type(value).__name__}, not an object")
    return value


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInstance(f"{where} is {type(value).__name__}, not a string")
    return value


def instance_meta(svc: Mapping[str, Any]) -> dict[str, str]:
    """Service Meta, with ``kvroute-*=value`` tags under it."""
    tags = svc.get("Tags") or []
    if not isinstance(tags, list):
        raise InvalidInstance(f"Service.Tags is {type(tags).__name__}, not a list")
    meta: dict[str, str] = {}
    for tag in tags:
        if isinstance(tag, str) and tag.startswith("kvroute-") and "=" in tag:
            key, _, value = tag.partition("=")
            meta[key] = value
    for key, value in _object(svc.get("Meta"), "Service.Meta").items():
        meta[str(key)] = _text(value, f"Service.Meta.{key}")
    return meta


def _number(meta: Mapping[str, str], key: str, kind: type[float] | type[int]) -> float | int:
    try:
        value = kind(meta[key])
    except ValueError:
        raise InvalidInstance(f"{key} is not a number: {meta[key]!r}") from None
    if not math.isfinite(value):
        raise InvalidInstance(f"{key} is not a finite number: {meta[key]!r}")
    return value


def instance_endpoint(service: str, entry: Any) -> EndpointConfig:
    """One Consul health entry -> an endpoint config (InvalidInstance if unusable).

    Every field is checked for its shape before use, so whatever Consul (or
    whoever registered the instance) sent, the only error is InvalidInstance.
    """
    entry = _object(entry, "the entry")
    svc = _object(entry.get("Service"), "Service")
    node = _object(entry.get("Node"), "Node")
    meta = instance_meta(svc)
    address = _text(svc.get("Address"), "Service.Address") or _text(
        node.get("Address"), "Node.Address"
    )
    port = svc.get("Port")
    if not address:
        raise InvalidInstance("instance has no address")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidInstance(f"Service.Port is not a port number: {port!r}")
    models: list[dict[str, str]] = []
    for item in filter(None, (m.strip() for m in meta.get("kvroute-models", "").split(","))):
        name, _, served = item.partition("=")
        models.append({"name": name, **({"served_name": served} if served else {})})
    if not models:
        raise InvalidInstance("no kvroute-models in the service's Meta or tags")
    instance_id = _text(svc.get("ID"), "Service.ID") or f"{address}-{port}"
    host = f"[{address}]" if ":" in address else address  # an IPv6 literal
    raw: dict[str, Any] = {
        "id": f"consul:{service}:{instance_id}",
        "url": f"{meta.get('kvroute-scheme', 'http')}://{host}:{port}",
        "kind": meta.get("kvroute-kind", "openai"),
        "models": models,
        "labels": {
            **{k: v for k, v in meta.items() if not k.startswith("kvroute-")},
            "consul_node": _text(node.get("Node"), "Node.Node"),
        },
    }
    if "kvroute-weight" in meta:
        raw["weight"] = _number(meta, "kvroute-weight", float)
    if "kvroute-metrics-url" in meta:
        raw["metrics_url"] = meta["kvroute-metrics-url"]
    if "kvroute-kv-capacity-tokens" in meta:
        raw["kv_capacity_tokens"] = _number(meta, "kvroute-kv-capacity-tokens", int)
    if "kvroute-kv-events-port" in meta:
        raw["kv_events"] = kv_events(meta, host)
    if "kvroute-options" in meta:
        try:
            options = orjson.loads(meta["kvroute-options"])
        except orjson.JSONDecodeError as exc:
            raise InvalidInstance(f"kvroute-options is not JSON: {exc}") from None
        if not isinstance(options, dict):
            raise InvalidInstance("kvroute-options is not a JSON object")
        raw["options"] = options
    try:
        return EndpointConfig.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInstance(
            "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'endpoint'}: {e['msg']}" for e in exc.errors()
            )
        ) from None


def kv_events(meta: Mapping[str, str], host: str) -> dict[str, Any]:
    """The instance's KV-event feed: vLLM binds its sockets on every address
    (``tcp://*:5557``), so the ports are reached at the instance's address."""
    feed: dict[str, Any] = {"endpoint": f"tcp://{host}:{_port(meta, 'kvroute-kv-events-port')}"}
    if "kvroute-kv-events-replay-port" in meta:
        replay = _port(meta, "kvroute-kv-events-replay-port")
        feed["replay_endpoint"] = f"tcp://{host}:{replay}"
    if "kvroute-kv-events-topic" in meta:
        feed["topic"] = meta["kvroute-kv-events-topic"]
    return feed


def _port(meta: Mapping[str, str], key: str) -> int:
    port = _number(meta, key, int)
    if not 0 < port < 65536:
        raise InvalidInstance(f"{key} is not a port number: {meta[key]!r}")
    return int(port)


class Discovery:
    """The discovery the config asks for (Consul, or none): a lifespan service.

    A reload that changes the ``discovery`` section restarts it, and the
    endpoints of services no longer watched leave the registry.
    """

    def __init__(self, state: AppState, client: httpx.AsyncClient | None = None) -> None:
        self.state = state
        self._client = client
        self.consul: ConsulDiscovery | None = None
        self._running = False

    async def start(self) -> None:
        self._running = True
        await self._watch(self.state.config.discovery.consul)

    async def stop(self) -> None:
        self._running = False
        if self.consul is not None:
            await self.consul.stop()
            self.consul = None

    async def reconfigure(self, old: Config, new: Config) -> None:
        if old.discovery == new.discovery or not self._running:
            return
        if self.consul is not None:
            await self.consul.stop()
            self.consul = None
        self.state.discovery.pop(SOURCE, None)
        self.state.metrics.discovery_up.remove(SOURCE)
        before = old.discovery.consul.services if old.discovery.consul else ()
        after = new.discovery.consul.services if new.discovery.consul else ()
        for name in {s.name for s in before} - {s.name for s in after}:
            for endpoint_id in self.state.registry.ids(Source.consul(name)):
                self.state.remove_endpoint(endpoint_id)
        await self._watch(new.discovery.consul)

    async def _watch(self, config: ConsulConfig | None) -> None:
        if config is not None:
            self.consul = ConsulDiscovery(self.state, config, self._client)
            await self.consul.start()


class ConsulDiscovery:
    """One blocking-query loop per configured service, for one Consul config."""

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
            s.name: state.registry.ids(Source.consul(s.name)) for s in config.services
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
        try:
            await cancel_all(self._tasks)
        finally:
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
                entries, new_index = await self.query(service, index)
                registered = self.apply(service.name, entries)
            except httpx.HTTPError as exc:
                # The class only: httpx's messages carry the URL, which may carry secrets.
                error = f"cannot query Consul: {exc.__class__.__name__}"
                LOG.warning({"event": "consul_error", "service": service.name, "error": error})
            except DiscoveryError as exc:
                error = f"{exc.__class__.__name__}: {exc}"
                LOG.warning({"event": "consul_error", "service": service.name, "error": error})
            except Exception as exc:  # a bug: it must not end the watch
                error = f"internal error: {exc.__class__.__name__}: {exc}"
                LOG.exception({"event": "consul_error", "service": service.name, "error": error})
            else:
                # The index moves only once the answer is applied: a failed
                # apply is retried with the same answer, not skipped.
                index, failures = new_index, 0
                status.update(
                    index=index, last_error=None, endpoints=registered, last_success=time.time()
                )
                self._set_up(True)
                continue
            failures += 1
            status["last_error"] = error
            self._set_up(False)
            self.state.metrics.discovery_errors.labels(SOURCE).inc()
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
        try:
            entries = orjson.loads(r.content)
        except orjson.JSONDecodeError as exc:
            raise DiscoveryError(f"Consul's answer is not JSON: {exc}") from exc
        if not isinstance(entries, list):
            raise DiscoveryError("Consul's answer is not a list")
        return entries, new_index

    def apply(self, service: str, entries: list[Any]) -> int:
        """Make the registry's endpoints for ``service`` what Consul says; how many."""
        source = Source.consul(service)
        seen: set[str] = set()
        for entry in entries:
            try:
                endpoint = instance_endpoint(service, entry)
            except InvalidInstance as exc:
                self.state.metrics.discovery_invalid.labels(SOURCE).inc()
                LOG.warning(
                    {"event": "consul_instance_skipped", "service": service, "error": str(exc)}
                )
                continue
            seen.add(endpoint.id)
            current = self.state.registry.get(endpoint.id)
            if current is None or current.config != endpoint or current.source != source:
                self.state.upsert_endpoint(endpoint, source)
        for gone in self._known.get(service, set()) - seen:
            self.state.remove_endpoint(gone)
        self._known[service] = seen
        return len(seen)
