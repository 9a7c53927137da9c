"""Real servers on loopback for the tests: uvicorn on ephemeral ports, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from backends.sim.server import build_simulator
from router.app import build_app
from router.config import Config, parse_config
from router.serve import Server, uvicorn_config
from router.types import ASGIApp, Receive, Scope, Send

#: Copied byte for byte from shared/fixtures (responses recorded from real engines).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port>; yield its base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = Server(uvicorn_config(app, "127.0.0.1", port, quiet=True), owns_signals=False)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited before it started")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@contextlib.asynccontextmanager
async def simulator(
    models: list[str] | None = None,
    params: EngineParams | None = None,
    faults: Faults | None = None,
    kind: str = "vllm",
) -> AsyncIterator[tuple[str, Any]]:
    sim = build_simulator(kind, models or ["tiny"], params or EngineParams.zero_latency(), faults)
    async with serve_app(sim.app) as url:
        yield url, sim


def router_config(endpoints: list[dict[str, Any]], **extra: Any) -> Config:
    import yaml

    raw: dict[str, Any] = {"endpoints": endpoints, "seed": 7, **extra}
    raw.setdefault("server", {})
    raw["server"].setdefault("access_log", False)
    if "admin_token" not in raw:
        raw.setdefault("admin", {"open": True})  # tests read /admin freely
    return parse_config(yaml.safe_dump(raw))


@contextlib.asynccontextmanager
async def router(config: Config) -> AsyncIterator[str]:
    async with serve_app(build_app(config)) as url:
        yield url


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 20.0, interval: float = 0.02
) -> None:
    """Wait until ``check`` holds; the timeout is a generous bound, not a measurement."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


async def sim_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(url + "/sim/stats")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


KVROUTE = Path(sys.executable).with_name("kvroute")
#: kvroute's command line from this checkout's sources.
CHECKOUT_CLI = (sys.executable, "-c", "import sys; from router.cli import main; sys.exit(main())")


@contextlib.asynccontextmanager
async def sim_process(*args: str, model: str = "tiny") -> AsyncIterator[tuple[str, Any]]:
    """``kvroute simulate`` as a separate process (so it can be killed for real),
    running this checkout's code (the installed console script may be another's)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [*CHECKOUT_CLI, "simulate", "--port", str(port), "--model", model, *args],
        cwd=FIXTURES.parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    health = "/v2/health/ready" if "triton" in args else "/health"
    try:
        async with httpx.AsyncClient() as client:

            async def up() -> bool:
                assert proc.poll() is None, "simulator exited"
                try:
                    return (await client.get(url + health)).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(up)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def set_faults(url: str, **faults: Any) -> None:
    async with httpx.AsyncClient() as client:
        (await client.post(url + "/sim/faults", json=faults)).raise_for_status()


async def admin_endpoints(url: str) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        data = (await client.get(url + "/admin/endpoints")).json()
    return {e["id"]: e for e in data["endpoints"]}


Backend = Callable[[Scope, Receive, Send], Awaitable[None]]


def backend(
    status: int,
    headers: list[tuple[bytes, bytes]],
    parts: list[bytes],
    pauses: dict[int, float] | None = None,
) -> Backend:
    """An ASGI app that answers every POST with ``parts``, pausing before part i
    for ``pauses[i]`` seconds; GETs (health probes) get 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, part in enumerate(parts):
            if pauses and i in pauses:
                await asyncio.sleep(pauses[i])
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app
