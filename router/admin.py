"""The admin API, under /admin: closed unless ``admin.token`` is set (then
every call needs it as a bearer token) or ``admin.open`` is true (a demo).

GET  /admin/endpoints                 every endpoint and its live state
POST /admin/endpoints/{id}/drain      no new requests; in-flight ones finish
POST /admin/endpoints/{id}/undrain
GET  /admin/config                    the effective config, secrets redacted
POST /admin/reload                    reload the config file: 200, or 422 with the errors
GET  /admin/prefix-index              prefix-index size per model and endpoint, and each
                                     endpoint's source (precise, approximate, stale)
GET  /admin/kv-events                 each KV-event subscriber's connection, sequence, blocks
GET  /admin/tenants                   each tenant's limits and what it used; the store's state
POST /admin/tenants/{name}/reset      forget a tenant's counters (windows, slots, today's tokens)
GET  /admin/cache                     the response cache: store, stats, models with a cache
POST /admin/cache/purge[?model=m]     drop cached answers (of one model, or all)
GET  /admin/models                    per model: policy, endpoints, decisions by reason,
                                     prefix match ratio, cached-token share
The fleet page (/admin/ui, /admin/overview) is router/admin_ui.py.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from policies.precise import index_source
from router.cache.store import CacheUnavailable
from router.config import AdminConfig, redact_url
from router.errors import error_body
from router.kvevents.hub import KVEventsHub
from router.latency import REFERENCE_TOKENS, LatencySnapshot
from router.metrics import ModelTotals
from router.quota.base import QuotaUnavailable
from router.quota.service import store_status
from router.registry import EndpointState
from router.registry import Route as ModelRoute
from router.reload import Reloader
from router.state import AppState

LOG = logging.getLogger("kvroute.admin")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def describe(endpoint: EndpointState, now: float) -> dict[str, Any]:
    c = endpoint.circuit
    return {
        "id": endpoint.id,
        "url": redact_url(endpoint.url),
        "kind": endpoint.config.kind,
        "source": endpoint.source,
        "models": {m: served or m for m, served in endpoint.served.items()},
        "weight": endpoint.config.weight,
        "healthy": endpoint.healthy,
        "available": endpoint.admits(now),
        "draining": endpoint.draining,
        "circuit": {"state": c.state, "failures": c.failures, "backoff_s": c.backoff},
        "cooldown_s": max(0.0, round(endpoint.cooldown_until - now, 3)),
        "in_flight": endpoint.in_flight,
        "awaiting_first_byte": endpoint.awaiting_first,
        "load": {
            "running": endpoint.running,
            "waiting": endpoint.waiting,
            "kv_usage": endpoint.kv_usage,
            "kv_capacity_tokens": endpoint.kv_capacity_tokens,
            "age_s": None if endpoint.scraped_at is None else round(now - endpoint.scraped_at, 3),
        },
        "latency": describe_latency(endpoint.latency.view(now)),
        # Of an endpoint serving several models, each model's own (what a
        # choice for that model reads); {} for an endpoint serving one.
        "latency_by_model": {
            model: describe_latency(estimate.view(now))
            for model, estimate in endpoint.model_latency.items()
        },
        "last_error": endpoint.last_error,
    }


def describe_latency(snap: LatencySnapshot | None) -> dict[str, Any] | None:
    """The estimates in seconds (rounded to microseconds), with the decayed
    samples behind each."""
    if snap is None:
        return None

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 6)

    return {
        "ttft_s": r(snap.ttft),
        "tpot_s": r(snap.tpot),
        "duration_s": r(snap.duration),
        "duration_reference_tokens": REFERENCE_TOKENS,
        "duration_fixed_s": r(snap.duration_fixed),
        "duration_per_token_s": r(snap.duration_per_token),
        "samples": {q: round(snap.samples(q), 3) for q in ("ttft", "tpot", "duration")},
    }


def index_sources(state: AppState, route: ModelRoute) -> dict[str, str] | None:
    """Which index a prefix-aware policy consults for each endpoint of the
    route's model (None for a policy that keeps no prefix index)."""
    if route.policy.index_stats() is None:
        return None
    model = state.config.models.get(route.model)
    tokens_known = model is not None and model.prompts is not None and route.policy.uses_tokens
    return {e.id: index_source(e.view(), tokens_known) for e in state.registry.serving(route.model)}


def describe_models(state: AppState) -> list[dict[str, Any]]:
    """Each model the config names or an endpoint serves: its policy, endpoints,
    and what this process counted for it since it started (the counters behind
    /metrics). A model only endpoints name gets its route (and its policy
    object) at its first request: until then the default policy is shown."""
    totals = state.metrics.model_totals()
    routes = {route.model: route for route in state.routes.routes()}
    now = state.registry.clock()
    return [
        describe_model(state, name, routes.get(name), totals.get(name), now)
        for name in sorted(set(routes) | set(state.registry.models()))
    ]


def describe_model(
    state: AppState, name: str, route: ModelRoute | None, t: ModelTotals | None, now: float
) -> dict[str, Any]:
    serving = state.registry.serving(name)
    match = None
    if t is not None and t.match_count:
        match = {"mean": round(t.match_sum / t.match_count, 4), "decisions": t.match_count}
    prompt = t.prompt_tokens if t is not None else 0.0
    cached = t.cached_tokens if t is not None else 0.0
    return {
        "model": name,
        "policy": route.policy_name if route is not None else state.config.default_policy.name,
        "aliases": list(state.routes.aliases(name)),
        "endpoints": [e.id for e in serving],
        "available": sum(1 for e in serving if e.admits(now)),
        "requests": dict(t.requests) if t is not None else {},
        "decisions": dict(t.decisions) if t is not None else {},
        "prefix_match": match,
        "tokens": {
            "prompt": prompt,
            "cached": cached,
            "cached_share": round(cached / prompt, 4) if prompt else None,
        },
        "index_sources": index_sources(state, route) if route is not None else None,
    }


def cross_site(request: Request) -> bool:
    """A browser's request from another site (a form or a script on a page
    elsewhere), which must not change anything here."""
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    try:
        return urlsplit(origin).netloc != request.headers.get("host")
    except ValueError:  # not even a URL: nothing a same-site page sends
        return True


def loopback_host(host: str | None) -> bool:
    """The ``Host`` header names this machine's loopback (``localhost``,
    ``127.x.y.z``, ``[::1]``, with or without a port)."""
    if not host:
        return False
    host = host.lower()
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and not host.endswith("]"):
        host = name
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def admin_denied(config: AdminConfig, request: Request, mutating: bool) -> Response | None:
    """Why ``request`` may not use the admin API (a response), or None.

    With a token, every call needs ``Authorization: Bearer <token>``; a browser
    cannot add that header to a forged form, and kvroute never reads a cookie.
    Without one the API is off, unless ``open`` (a demo), which answers only
    requests addressed to a loopback host (a rebound name is refused) and
    where calls that change something still refuse cross-site browser requests."""
    if config.token is not None:
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, b"Bearer " + config.token.get_secret_value().encode()):
            return None
        body = error_body("admin token required", "authentication_error", None, "invalid_api_key")
        return json_response(body, 401)
    if not config.open:
        message = "the admin API is off: set admin.token in the config (or admin.open for a demo)"
        return json_response(error_body(message, "permission_error", None, "admin_disabled"), 403)
    if not loopback_host(request.headers.get("host")):
        # A page whose name was rebound to this machine's address (DNS
        # rebinding) is same-origin with it: only the Host header tells.
        message = "admin.open answers only requests addressed to a loopback host"
        return json_response(error_body(message, "permission_error", None, "admin_host"), 403)
    if mutating and cross_site(request):
        message = "admin calls that change state are not taken from other sites' pages"
        return json_response(error_body(message, "permission_error", None, "cross_site"), 403)
    return None


def admin_routes(state: AppState, reloader: Reloader, kvevents: KVEventsHub) -> list[BaseRoute]:
    if state.config.admin.open and state.config.admin.token is None:
        LOG.warning(
            {
                "event": "admin_open",
                "message": "admin.open: /admin needs no token; expose this port to no one",
            }
        )

    def denied(request: Request) -> Response | None:
        return admin_denied(state.config.admin, request, request.method != "GET")

    def endpoint_or_404(request: Request) -> EndpointState | Response:
        endpoint = state.registry.get(request.path_params["endpoint_id"])
        if endpoint is None:
            msg = f"no endpoint '{request.path_params['endpoint_id']}'"
            return json_response(error_body(msg, "invalid_request_error", None, "not_found"), 404)
        return endpoint

    async def endpoints(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        now = state.registry.clock()
        return json_response({"endpoints": [describe(e, now) for e in state.registry.all()]})

    async def drain(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        endpoint = endpoint_or_404(request)
        if isinstance(endpoint, Response):
            return endpoint
        endpoint.draining = request.url.path.endswith("/drain")
        return json_response(describe(endpoint, state.registry.clock()))

    async def config(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        # pydantic's JSON mode prints every SecretStr as "**********".
        return json_response(
            {
                "config": state.config.model_dump(mode="json"),
                "reload": state.reload_status,
                "discovery": state.discovery,
            }
        )

    async def reload(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        outcome = await reloader.reload("admin")
        return json_response(outcome, 200 if outcome["result"] == "success" else 422)

    async def prefix_index(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        out: dict[str, Any] = {}
        for route in state.routes.routes():
            stats = route.policy.index_stats()
            if stats is None:
                continue
            entry = out[route.model] = dataclasses.asdict(stats)
            entry["sources"] = index_sources(state, route)
            shared = state.placements_status().get(route.model)
            if shared is not None:
                entry["placements"] = shared
        return json_response(out)

    async def models(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        return json_response({"models": describe_models(state)})

    async def kv_events(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        return json_response({"endpoints": kvevents.status()})

    async def tenants(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        quotas = state.quotas
        out = []
        for tenant in state.tenants.by_name.values():
            tc = tenant.config
            entry: dict[str, Any] = {
                "name": tenant.name,
                "priority": tc.priority,
                "weight": tc.weight,
                "labels": tc.labels,
                "models": list(tc.models),
                "keys": len(tc.keys),
                "limits": {
                    "rpm": tc.rpm,
                    "tpm": tc.tpm,
                    "max_concurrent": tc.max_concurrent,
                    "daily_tokens": tc.daily_tokens,
                    "model_limits": {m: q.model_dump() for m, q in tc.model_limits.items()},
                },
            }
            try:
                entry["usage"] = await quotas.usage(tenant)
            except QuotaUnavailable:
                entry["usage"] = None
            out.append(entry)
        return json_response(
            {"auth": state.tenants.enabled, "store": store_status(quotas), "tenants": out}
        )

    async def reset_tenant(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        tenant = state.tenants.by_name.get(request.path_params["name"])
        if tenant is None:
            msg = f"no tenant '{request.path_params['name'][:64]}'"
            return json_response(error_body(msg, "invalid_request_error", None, "not_found"), 404)
        try:
            await state.quotas.reset(tenant)
        except QuotaUnavailable:
            body = error_body("the quota store is unavailable", "service_unavailable")
            return json_response(body, 503)
        LOG.info({"event": "tenant_reset", "tenant": tenant.name})
        return json_response({"tenant": tenant.name, "reset": True})

    async def cache(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        store = state.cache.store
        models = {
            name: model.cache.model_dump()
            for name, model in state.config.models.items()
            if model.cache.enabled
        }
        return json_response(
            {
                "store": {
                    "kind": "redis" if state.cache.config.redis else "memory",
                    **store.stats(),
                },
                "models": models,
            }
        )

    async def purge_cache(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        model = request.query_params.get("model")
        try:
            purged = await state.cache.store.purge(model)
        except CacheUnavailable:
            body = error_body("the cache store is unavailable", "service_unavailable")
            return json_response(body, 503)
        LOG.info({"event": "cache_purge", "model": model and model[:128], "purged": purged})
        return json_response({"model": model, "purged": purged})

    return [
        Route("/admin/endpoints", endpoints),
        Route("/admin/cache", cache),
        Route("/admin/cache/purge", purge_cache, methods=["POST"]),
        Route("/admin/tenants", tenants),
        Route("/admin/tenants/{name}/reset", reset_tenant, methods=["POST"]),
        Route("/admin/endpoints/{endpoint_id}/drain", drain, methods=["POST"]),
        Route("/admin/endpoints/{endpoint_id}/undrain", drain, methods=["POST"]),
        Route("/admin/config", config),
        Route("/admin/reload", reload, methods=["POST"]),
        Route("/admin/prefix-index", prefix_index),
        Route("/admin/kv-events", kv_events),
        Route("/admin/models", models),
    ]
