"""replicas.py --processes: routers as ``kvroute serve`` processes sharing placements."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import httpx

from benchmarks.replicas import APPROXIMATE, VARIANTS, router_document, routers
from router.config import parse_config
from tests.helpers import simulator


def test_a_router_process_document_is_a_valid_config_on_its_port() -> None:
    doc = router_document(["http://127.0.0.1:1"], APPROXIMATE, 5, 4321, "redis://127.0.0.1:9")
    config = parse_config(json.dumps(doc))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 4321)
    assert config.placements is not None and config.seed == 5
    assert config.shutdown.grace == 0


async def test_router_processes_serve_and_share_placements() -> None:
    arm = VARIANTS["approximate_placements"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with AsyncExitStack() as stack:
        url, _ = await stack.enter_async_context(simulator())
        instances = await stack.enter_async_context(routers([url], arm, 2, processes=True))
        assert [app for _, app in instances] == [None, None]  # nothing to look into
        async with httpx.AsyncClient(timeout=30) as c:
            for router_url, _ in instances:
                r = await c.post(router_url + "/v1/chat/completions", json=body)
                assert r.status_code == 200
                # routers() returned only once every process's placements were up.
                assert "kvroute_placements_up 1.0" in (await c.get(router_url + "/metrics")).text
        served = [u for u, _ in instances]
    # Stopped on the way out.
    async with httpx.AsyncClient(timeout=2) as c:
        for router_url in served:
            try:
                await c.get(router_url + "/ready")
            except httpx.TransportError:
                continue
            raise AssertionError(f"{router_url} still serving")
