"""The fleet page: /admin/ui, one static page that shows what /admin knows.

GET /admin/ui              the page (HTML; no data in it)
GET /admin/ui/fleet.js     its script, GET /admin/ui/fleet.css its style
GET /admin/overview        everything the page shows, in one JSON snapshot

How the page authenticates. A browser cannot add a bearer header to a
navigation, so the page itself (three static files, the same bytes for
everyone) is served without the token; it holds nothing about the fleet. Its
script asks for the token, keeps it in the tab's ``sessionStorage`` (gone
when the tab closes, never in a URL) and sends it as ``Authorization:
Bearer`` on every call to /admin, which checks it as for any client. No
cookie is involved, so another site's page cannot make the browser call
/admin with the operator's credentials (no CSRF), and a drain from the page
is an ordinary admin call. What could steal the token is script injected
into the page: the Content-Security-Policy allows only this page's own
script file (no inline script, no other origin), the script writes server
data with ``textContent`` only, and the page may not be framed.

When the admin API is off (no token, not ``open``) the page is off too,
with the same 403 as every /admin route.
"""

from __future__ import annotations

import os
import socket
import time
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from router.admin import admin_denied, describe, describe_models, json_response
from router.kvevents.hub import KVEventsHub
from router.state import AppState

#: No script but the page's own file, no inline anything, no other origin, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
#: The page's files (router/static, shipped as package data) and their types.
ASSETS = {
    "/admin/ui": ("fleet.html", "text/html; charset=utf-8"),
    "/admin/ui/fleet.js": ("fleet.js", "text/javascript; charset=utf-8"),
    "/admin/ui/fleet.css": ("fleet.css", "text/css; charset=utf-8"),
}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The page's bytes by path, read once when the app is built."""
    static = resources.files("router").joinpath("static")
    return {
        path: (static.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in ASSETS.items()
    }


#: This process, as the page names it (on Kubernetes the hostname is the pod's name).
INSTANCE = f"{socket.gethostname()[:64]} (pid {os.getpid()})"


def overview(state: AppState, kvevents: KVEventsHub) -> dict[str, Any]:
    """One snapshot of the fleet for the page: endpoints (with the index each
    model matches them by), models, the config's reload and discovery."""
    now = state.registry.clock()
    models = describe_models(state)
    by_endpoint: dict[str, dict[str, str]] = {}
    for model in models:
        for endpoint_id, source in (model["index_sources"] or {}).items():
            by_endpoint.setdefault(endpoint_id, {})[model["model"]] = source
    events = kvevents.status()
    endpoints = []
    for endpoint in state.registry.all():
        entry = describe(endpoint, now)
        entry["index_sources"] = by_endpoint.get(endpoint.id, {})
        sub = events.get(endpoint.id)
        entry["kv_events"] = None
        if sub is not None:
            entry["kv_events"] = {
                k: sub.get(k) for k in ("connected", "stale", "stale_reason", "blocks")
            }
        endpoints.append(entry)
    return {
        "time": time.time(),
        # Which router process answered: drains and counters are per process,
        # and behind a Service each refresh may reach another replica.
        "instance": INSTANCE,
        "endpoints": endpoints,
        "models": models,
        "reload": {**state.reload_status, "watch": state.config.server.watch_config},
        "discovery": state.discovery,
    }


def admin_ui_routes(state: AppState, kvevents: KVEventsHub) -> list[BaseRoute]:
    assets = load_assets()

    async def asset(request: Request) -> Response:
        admin = state.config.admin
        # The page holds no data, so a token is not asked for it (a browser cannot
        # send one on a navigation); but with the admin API off it is off too.
        if admin.token is None and (no := admin_denied(admin, request, False)) is not None:
            return no
        body, media_type = assets[request.url.path]
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    async def snapshot(request: Request) -> Response:
        if (no := admin_denied(state.config.admin, request, False)) is not None:
            return no
        response = json_response(overview(state, kvevents))
        response.headers["cache-control"] = "no-store"
        return response

    return [
        *(Route(path, asset) for path in ASSETS),
        Route("/admin/overview", snapshot),
    ]
