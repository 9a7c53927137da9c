"""``kvroute demo``: the router in front of a simulated fleet, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from importlib import resources

from backends.sim.engine import EngineParams
from backends.sim.server import build_simulator
from router.app import build_app
from router.config import Config, parse_config
from router.logs import setup_logging
from router.serve import Server, bind, uvicorn_config

DEMO_BASE_PORT = 9101


def demo_config(host: str, port: int, sim_base_port: int) -> Config:
    text = resources.files("router").joinpath("demo.yaml").read_text(encoding="utf-8")
    config = parse_config(text)
    shift = sim_base_port - DEMO_BASE_PORT
    endpoints = tuple(
        ep.model_copy(
            update={
                "url": _shift_port(ep.url, shift),
                "metrics_url": ep.metrics_url and _shift_port(ep.metrics_url, shift),
            }
        )
        for ep in config.endpoints
    )
    server = config.server.model_copy(update={"host": host, "port": port})
    return config.model_copy(update={"endpoints": endpoints, "server": server})


def _shift_port(url: str, shift: int) -> str:
    scheme, _, rest = url.partition("://")
    hostport, slash, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return f"{scheme}://{host}:{int(port) + shift}{slash}{path}"


async def run_demo(host: str, port: int, sim_base_port: int) -> int:
    config = demo_config(host, port, sim_base_port)
    setup_logging(config.server.log_level)
    # A modest KV cache per replica (16k tokens) so that routing shows in hit rates.
    params = EngineParams(num_blocks=1025)
    sims: list[Server] = []
    try:
        sockets = [bind(host, port)]
        for ep in config.endpoints:
            sim_port = int(ep.url.rpartition(":")[2].split("/")[0])
            sim = build_simulator(ep.kind, [m.name for m in ep.models], params)
            sims.append(
                Server(
                    uvicorn_config(sim.app, "127.0.0.1", sim_port, quiet=True), owns_signals=False
                )
            )
            sockets.append(bind("127.0.0.1", sim_port))
    except OSError as exc:
        print(f"kvroute demo: cannot bind a port: {exc}", file=sys.stderr)
        return 1
    pairs = zip(sims, sockets[1:], strict=True)
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in pairs]
    print(
        f"kvroute demo: {len(sims)} simulated replicas (vLLM, TGI, Triton) on ports "
        f"{sim_base_port}-{sim_base_port + len(sims) - 1}; router on http://{host}:{port}/v1 "
        "(Ctrl-C stops everything)",
        file=sys.stderr,
    )
    router = Server(
        uvicorn_config(build_app(config), host, port, config.server.log_level, server=config.server)
    )
    try:
        await router.serve(sockets=[sockets[0]])
    finally:
        for s in sims:
            s.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
    return 0
