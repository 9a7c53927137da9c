"""A fake Consul agent with real blocking-query semantics (no Consul runs here).

``GET /v1/health/service/<name>`` answers the passing instances with
``X-Consul-Index``; with ``?index=N`` at or past the current index it holds
the request until the index moves or ``wait`` expires, as Consul does. Knobs
make it go down, go backwards, or forget the index header; every request is
recorded for the tests to count.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def parse_wait(value: str | None) -> float:
    if not value:
        return 300.0
    if value.endswith("ms"):
        return int(value[:-2]) / 1000
    if value.endswith("m"):
        return int(value[:-1]) * 60.0
    if value.endswith("s"):
        return float(value[:-1])
    return float(value)


def _id(entry: Any) -> Any:
    try:
        return entry["Service"]["ID"]
    except (KeyError, TypeError):
        return None


class FakeConsul:
    def __init__(self) -> None:
        self.index = 10
        self.services: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[dict[str, str]] = []
        self.down = False
        self.omit_index = False
        self._changed = asyncio.Event()
        self.app = Starlette(routes=[Route("/v1/health/service/{name}", self.health)])

    def _bump(self, index: int | None = None) -> None:
        self.index = self.index + 1 if index is None else index
        self._changed.set()
        self._changed = asyncio.Event()

    def register(
        self,
        service: str,
        instance_id: str,
        port: int,
        meta: dict[str, str],
        address: str = "127.0.0.1",
        tags: list[str] | None = None,
    ) -> None:
        entries = [e for e in self.services.get(service, []) if _id(e) != instance_id]
        entries.append(
            {
                "Node": {"ID": "n1", "Node": "node-1", "Address": "127.0.0.1", "Datacenter": "dc1"},
                "Service": {
                    "ID": instance_id,
                    "Service": service,
                    "Tags": tags or [],
                    "Address": address,
                    "Meta": meta,
                    "Port": port,
                    "Weights": {"Passing": 1, "Warning": 1},
                },
                "Checks": [{"Node": "node-1", "CheckID": "serfHealth", "Status": "passing"}],
            }
        )
        self.services[service] = entries
        self._bump()

    def register_raw(self, service: str, entry: Any) -> None:
        """Add an entry as is, whatever its shape (to test what kvroute makes of it)."""
        self.services.setdefault(service, []).append(entry)
        self._bump()

    def deregister(self, service: str, instance_id: str) -> None:
        self.services[service] = [
            e for e in self.services.get(service, []) if _id(e) != instance_id
        ]
        self._bump()

    def go_backwards(self, index: int) -> None:
        self._bump(index)

    async def health(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.requests.append(params)
        if self.down:
            return Response("No cluster leader", status_code=500)
        wanted = int(params.get("index", "0") or 0)
        if wanted and wanted >= self.index:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), parse_wait(params.get("wait")))
            if self.down:
                return Response("No cluster leader", status_code=500)
        body = orjson.dumps(self.services.get(request.path_params["name"], []))
        headers = {} if self.omit_index else {"X-Consul-Index": str(self.index)}
        return Response(body, media_type="application/json", headers=headers)
