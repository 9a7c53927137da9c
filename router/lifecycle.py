"""The app's background services, peers owned by the lifespan.

    lifespan ── Lifecycle.start ──> TracingService, StoreKeeper, Monitor, Discovery,
             │                       KVEventsHub, PlacementSharing, Reloader   (in order)
             └─ Lifecycle.stop  ──> the reverse                   (each, even if one fails)

    Reloader.reload: read + validate (worker thread) -> AppState.apply
             └─ Lifecycle.reconfigure(old, new) ──> each service's reconfigure

A service decides for itself what a change means: the Monitor restarts a
loop whose interval changed, Discovery restarts when the ``discovery``
section changed, the Reloader starts or stops watching the file, the StoreKeeper closes a
quota store a reload replaced (and at stop drains settlements), the
TracingService swaps its span exporter when ``tracing`` changed. Nobody owns
anybody else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from router.config import Config
from router.consul import Discovery
from router.kvevents.hub import KVEventsHub
from router.monitor import Monitor
from router.placements.service import PlacementSharing
from router.quota.service import StoreKeeper
from router.reload import Reloader
from router.state import AppState

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

LOG = logging.getLogger("kvroute.lifecycle")


class Service(Protocol):
    """Background work with the app's lifetime."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop every task the service started; safe to call when not started."""

    async def reconfigure(self, old: Config, new: Config) -> None:
        """``new`` was just applied to the app's state (a reload); follow it."""


class TracingService:
    """OpenTelemetry spans while the app runs: from ``tracing`` in the config
    (the SDK is imported only then), or from a provider handed in (tests).
    Stopping flushes what is queued and ends the exporter's thread."""

    def __init__(self, state: AppState, provider: TracerProvider | None = None) -> None:
        self.state = state
        self.provider = provider

    async def start(self) -> None:
        if self.provider is not None:
            from router.tracing import Tracing

            self.state.tracing = Tracing(self.provider, owned=False)
        else:
            self._build(self.state.config)

    async def stop(self) -> None:
        tracing, self.state.tracing = self.state.tracing, None
        if tracing is not None:
            await tracing.close()

    async def reconfigure(self, old: Config, new: Config) -> None:
        if self.provider is not None or old.tracing == new.tracing:
            return
        previous = self.state.tracing
        self._build(new)
        if previous is not None:
            # Spans of requests in flight that end after this are dropped.
            await previous.close()

    def _build(self, config: Config) -> None:
        if not config.tracing.enabled:
            self.state.tracing = None
            return
        from router.tracing import Tracing

        self.state.tracing = Tracing.from_config(config.tracing)


class Lifecycle:
    def __init__(
        self,
        state: AppState,
        monitor: Monitor | None = None,
        discovery: Discovery | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.monitor = monitor or Monitor(state)
        self.discovery = discovery or Discovery(state)
        self.reloader = Reloader(state, on_change=self.reconfigure)
        #: KV-event subscribers (``status()`` for /admin/prefix-index).
        self.kvevents = KVEventsHub(state)
        #: Started in this order and stopped in the reverse one: the reloader
        #: last, so no reload starts before everything runs or after it stops.
        self.services: list[Service] = [
            TracingService(state, tracer_provider),
            StoreKeeper(state),
            self.monitor,
            self.discovery,
            self.kvevents,
            PlacementSharing(state),
            self.reloader,
        ]
        self._started: list[Service] = []

    async def start(self) -> None:
        """Start every service; if one fails, stop those already running and raise."""
        for service in self.services:
            try:
                await service.start()
            except BaseException:
                self._started.append(service)  # it may have started part of its work
                await self.stop()
                raise
            self._started.append(service)

    async def stop(self) -> None:
        """Stop every started service, last first; a failure is logged and the rest still stop."""
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception:
                LOG.exception({"event": "service_stop_failed", "service": type(service).__name__})

    async def reconfigure(self, old: Config, new: Config) -> None:
        """Tell every running service what a reload changed; one failing stops no other."""
        for service in list(self._started):
            try:
                await service.reconfigure(old, new)
            except Exception:
                LOG.exception(
                    {"event": "service_reconfigure_failed", "service": type(service).__name__}
                )
