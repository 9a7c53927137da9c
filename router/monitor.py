"""Background watch over the fleet: active health probes and load scrapes.

Both are asyncio tasks of the Monitor, a service the app's lifespan starts
and stops (router/lifecycle.py). Each round checks every endpoint
concurrently (one slow endpoint delays nobody), then waits its interval with
jitter; a reload that changes an interval restarts that loop. The control
plane speaks httpx; the data path does not share its connections.

Health has hysteresis: ``fall`` failed probes in a row mark an endpoint down,
``rise`` good ones mark it up again. Scraped load ages out after
``stale_after`` seconds, so a backend whose metrics stop answering falls back
to the router's own in-flight count instead of frozen numbers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from router.admission import kick_waiting
from router.config import Config
from router.registry import EndpointState
from router.state import AppState
from router.tasks import cancel_all

LOG = logging.getLogger("kvroute.monitor")


@dataclass(frozen=True)
class Loop:
    """One periodic loop of the monitor: its interval and its task."""

    interval: float
    task: asyncio.Task[None]


#: Bytes of a metrics scrape, at most: vLLM's is about 100 KB; it is parsed on
#: the event loop, so a backend must not hand it megabytes to chew.
MAX_SCRAPE_BYTES = 4 << 20


class ScrapeTooLarge(Exception):
    """The metrics answer passed ``MAX_SCRAPE_BYTES``."""


class Monitor:
    """A lifespan service: ``start``, ``stop``, and ``reconfigure`` on a reload.

    A reload that changes whether a loop runs or its interval restarts that
    loop; the other settings (timeouts, ``fall``/``rise``, ``stale_after``,
    jitter) are read from the live config on every round.
    """

    def __init__(
        self,
        state: AppState,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self._client = client
        self._own_client = client is None
        self._rng = rng or random.Random()
        #: The running loops, by name ("health", "scrape").
        self.loops: dict[str, Loop] = {}
        self._running = False

    @staticmethod
    def schedule(config: Config) -> dict[str, float]:
        """The loops ``config`` asks for, and their intervals."""
        wanted = {}
        if config.health.enabled:
            wanted["health"] = config.health.interval
        if config.scrape.enabled:
            wanted["scrape"] = config.scrape.interval
        return wanted

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        self._running = True
        await self._follow(self.schedule(self.state.config))

    async def stop(self) -> None:
        self._running = False
        try:
            await self._follow({})
        finally:
            if self._own_client and self._client is not None:
                await self._client.aclose()
                self._client = None

    async def reconfigure(self, old: Config, new: Config) -> None:
        if self._running:
            await self._follow(self.schedule(new))

    async def _follow(self, wanted: dict[str, float]) -> None:
        """Stop the loops that are not wanted at their interval; start the missing ones."""
        stale = [name for name, loop in self.loops.items() if wanted.get(name) != loop.interval]
        try:
            await cancel_all(self.loops[name].task for name in stale)
        finally:
            for name in stale:
                del self.loops[name]
        work = {"health": self.probe_all, "scrape": self.scrape_all}
        for name, interval in wanted.items():
            if name not in self.loops:
                task = asyncio.create_task(
                    self._every(interval, work[name]), name=f"monitor-{name}"
                )
                self.loops[name] = Loop(interval, task)

    async def _every(self, interval: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await work()
            except Exception:  # a bug here must not end the watch
                LOG.exception("monitor round failed")
            jitter = self.state.config.health.jitter
            await asyncio.sleep(interval * (1 + self._rng.uniform(-jitter, jitter)))

    # -- health ------------------------------------------------------------------

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(ep) for ep in self.state.registry.all()))
        kick_waiting(self.state)

    async def probe(self, endpoint: EndpointState) -> None:
        assert self._client is not None
        cfg = self.state.config.health
        served = [t.served for t in endpoint.targets.values()]
        ok, error = True, None
        try:
            for path in endpoint.adapter.health_paths(served):
                r = await self._client.get(endpoint.url + path, timeout=cfg.timeout)
                if r.status_code >= 300:
                    ok, error = False, f"health probe {path} answered HTTP {r.status_code}"
                    break
        except httpx.HTTPError as exc:
            ok, error = False, f"health probe failed: {exc.__class__.__name__}"
        self.record_probe(endpoint, ok, error)

    def record_probe(self, endpoint: EndpointState, ok: bool, error: str | None) -> None:
        cfg = self.state.config.health
        if ok:
            endpoint.probe_failures = 0
            endpoint.probe_successes += 1
            if not endpoint.healthy and endpoint.probe_successes >= cfg.rise:
                endpoint.healthy = True
                LOG.info({"event": "endpoint_up", "endpoint": endpoint.id})
        else:
            endpoint.probe_successes = 0
            endpoint.probe_failures += 1
            endpoint.last_error = error
            if endpoint.healthy and endpoint.probe_failures >= cfg.fall:
                endpoint.healthy = False
                LOG.warning({"event": "endpoint_down", "endpoint": endpoint.id, "error": error})

    # -- load --------------------------------------------------------------------

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(ep) for ep in self.state.registry.all()))
        self.expire_stale()

    async def _metrics_text(self, url: str) -> str:
        """The exposition at ``url``, at most ``MAX_SCRAPE_BYTES`` (it is parsed on
        the event loop)."""
        assert self._client is not None
        async with self._client.stream("GET", url, timeout=self.state.config.scrape.timeout) as r:
            r.raise_for_status()
            chunks: list[bytes] = []
            size = 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > MAX_SCRAPE_BYTES:
                    raise ScrapeTooLarge
                chunks.append(chunk)
        return b"".join(chunks).decode(r.encoding or "utf-8", "replace")

    async def scrape(self, endpoint: EndpointState) -> None:
        assert self._client is not None
        path = endpoint.adapter.metrics_path
        url = endpoint.config.metrics_url or (endpoint.url + path if path else None)
        if url is None:
            return
        try:
            text = await self._metrics_text(url)
            load = endpoint.adapter.parse_load(text)
        except httpx.HTTPStatusError as exc:
            error = f"metrics answered HTTP {exc.response.status_code}"
            LOG.debug({"event": "scrape_failed", "endpoint": endpoint.id, "error": error})
            return
        except ScrapeTooLarge:
            error = f"metrics over {MAX_SCRAPE_BYTES} bytes"
            LOG.debug({"event": "scrape_failed", "endpoint": endpoint.id, "error": error})
            return
        except (httpx.HTTPError, ValueError) as exc:
            # The class only: httpx's messages carry the URL, and URLs may carry secrets.
            error = exc.__class__.__name__
            LOG.debug({"event": "scrape_failed", "endpoint": endpoint.id, "error": error})
            return
        endpoint.running, endpoint.waiting = load.running, load.waiting
        endpoint.kv_usage = load.kv_usage
        if load.kv_capacity_tokens and endpoint.config.kv_capacity_tokens is None:
            endpoint.kv_capacity_tokens = load.kv_capacity_tokens
        endpoint.scraped_at = self.state.registry.clock()
        endpoint.in_flight_at_scrape = endpoint.in_flight
        endpoint.finished, endpoint.completed_at_scrape = load.finished, endpoint.completed

    def expire_stale(self) -> None:
        now = self.state.registry.clock()
        horizon = self.state.config.scrape.stale_after
        for endpoint in self.state.registry.all():
            if endpoint.scraped_at is not None and now - endpoint.scraped_at > horizon:
                endpoint.running = endpoint.waiting = endpoint.kv_usage = None
                endpoint.scraped_at = endpoint.in_flight_at_scrape = None
