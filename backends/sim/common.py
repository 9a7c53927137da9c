"""What every simulator face shares: fault knobs, disconnect handling, truth."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends.sim.engine import Engine, Sequence_

T = TypeVar("T")


class SimulatedCrash(Exception):
    """Raised inside a streaming body to cut the connection mid-stream."""


@dataclass
class Faults:
    """Fault knobs; all off by default, changeable at run time (POST /sim/faults)."""

    #: Share of requests answered with ``fail_status`` before any work.
    fail_rate: float = 0.0
    fail_status: int = 500
    #: Seconds to wait before handling a request; negative hangs until the client leaves.
    stall: float = 0.0
    #: Cut the connection after this many chunks of a stream (0: right after the
    #: headers, before any chunk; negative: never).
    die_after_chunks: int = -1
    #: Sent as Retry-After (seconds) with simulated failures, when set.
    retry_after: int | None = None
    #: Seconds the health route takes to answer, and whether it says healthy.
    health_delay: float = 0.0
    unhealthy: bool = False

    def failure_headers(self) -> dict[str, str]:
        """Headers a simulated failure carries (Retry-After, when set)."""
        return {} if self.retry_after is None else {"retry-after": str(self.retry_after)}

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name: f.type for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown fault knob '{key}' (known: {', '.join(names)})")
            setattr(self, key, value)


class FaultState:
    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self._rng = random.Random(seed)

    def should_fail(self) -> bool:
        rate = self.faults.fail_rate
        return rate > 0 and self._rng.random() < rate

    async def stall(self) -> bool:
        """Wait as the ``stall`` knob says; True once done (a hang never is)."""
        if self.faults.stall < 0:
            await asyncio.Event().wait()
        elif self.faults.stall > 0:
            await asyncio.sleep(self.faults.stall)
        return True


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def collect(engine: Engine, seq: Sequence_) -> list[str]:
    """Wait for a whole sequence; abort it if the waiter is cancelled."""
    out: list[str] = []
    try:
        while True:
            token = await seq.queue.get()
            if token is None:
                return out
            out.append(token)
    finally:
        engine.abort(seq)


async def tokens(engine: Engine, seq: Sequence_) -> AsyncIterator[str]:
    try:
        while True:
            token = await seq.queue.get()
            if token is None:
                return
            yield token
    finally:
        engine.abort(seq)


def engine_lifespan(engine: Engine) -> Any:
    """A Starlette lifespan that stops the engine's loop on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.stop()

    return lifespan


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def fault_routes_handlers(
    faults: Faults, engine: Engine
) -> tuple[Callable[[Request], Awaitable[Response]], Callable[[Request], Awaitable[Response]]]:
    async def faults_route(request: Request) -> Response:
        if request.method == "POST":
            try:
                faults.update(orjson.loads(await request.body()))
            except (ValueError, TypeError) as exc:
                return json_response({"error": str(exc)}, 400)
        return json_response(asdict(faults))

    async def stats_route(request: Request) -> Response:
        s = engine.stats
        return json_response(
            {
                "requests": s.requests,
                "prompt_tokens": s.prompt_tokens,
                "generation_tokens": s.generation_tokens,
                "prefix_cache_queries": s.queries,
                "prefix_cache_hits": s.hits,
                "finished": s.finished,
                "running": len(engine.running),
                "waiting": len(engine.waiting),
                "kv_cache_usage": engine.cache.usage(),
                "cache_evictions": engine.cache.evictions,
                "preemptions": s.preemptions,
            }
        )

    return faults_route, stats_route
