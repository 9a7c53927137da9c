"""The KV-event subscribers of the fleet: one per endpoint with ``kv_events``.

A lifespan service (router/lifecycle.py). It follows the registry, whatever
changed it (the config file, a reload, Consul discovery): ``reconcile`` starts
a subscriber for each endpoint whose ``kv_events`` is set, restarts one whose
``kv_events`` changed, and stops those of endpoints that left (their blocks
are forgotten). A reload calls it at once; discovery changes are picked up
within ``FOLLOW_INTERVAL`` seconds (comparing ids and configs, no I/O).

The blocks themselves live in ``AppState.blocks`` (a ``BlockIndex``), which
outlives reloads and this service; policies see them through
``EndpointView.blocks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from router.config import Config, KVEventsConfig
from router.kvevents.subscriber import ErrorKind, Subscriber
from router.metrics import FeedSnapshot
from router.state import AppState
from router.tasks import cancel_all

LOG = logging.getLogger("kvroute.kvevents")

FOLLOW_INTERVAL = 1.0


@dataclass
class _Running:
    config: KVEventsConfig
    subscriber: Subscriber
    task: asyncio.Task[None]


class KVEventsHub:
    def __init__(
        self,
        state: AppState,
        clock: Callable[[], float] = time.monotonic,
        follow_interval: float = FOLLOW_INTERVAL,
    ) -> None:
        self.state = state
        self._clock = clock
        self._follow_interval = follow_interval
        self._ctx: zmq.asyncio.Context | None = None
        self._subscribers: dict[str, _Running] = {}
        self._follow: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        state.kv_feeds = self.snapshots

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        await self.reconcile()
        self._follow = asyncio.create_task(self._follow_registry(), name="kvevents-follow")

    async def stop(self) -> None:
        if self._follow is not None:
            await cancel_all([self._follow])
            self._follow = None
        async with self._lock:
            running = list(self._subscribers.values())
            self._subscribers.clear()
            await cancel_all(r.task for r in running)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def reconfigure(self, old: Config, new: Config) -> None:
        if self._ctx is not None:
            await self.reconcile()

    async def _follow_registry(self) -> None:
        while True:
            await asyncio.sleep(self._follow_interval)
            try:
                await self.reconcile()
            except Exception:  # a bug here must not end the watch
                LOG.exception("kv events reconcile failed")

    def wanted(self) -> dict[str, KVEventsConfig]:
        return {
            e.id: e.config.kv_events
            for e in self.state.registry.all()
            if e.config.kv_events is not None
        }

    async def reconcile(self) -> None:
        """Start, restart and stop subscribers to match the registry."""
        if self._ctx is None:
            return
        async with self._lock:
            wanted = self.wanted()
            gone = [
                endpoint_id
                for endpoint_id, running in self._subscribers.items()
                if wanted.get(endpoint_id) != running.config
                # The endpoint left and came back: its blocks are a new object.
                or self.state.blocks.get(endpoint_id) is not running.subscriber.blocks
            ]
            stopping = [self._subscribers.pop(endpoint_id) for endpoint_id in gone]
            await cancel_all(r.task for r in stopping)
            for endpoint_id in gone:
                if endpoint_id not in wanted:
                    self.state.blocks.forget(endpoint_id)
                    LOG.info({"event": "kv_events_stopped", "endpoint": endpoint_id})
            for endpoint_id, config in wanted.items():
                if endpoint_id not in self._subscribers:
                    self._start(endpoint_id, config)
            for blocks in self.state.blocks.all():
                if blocks.endpoint_id not in wanted:
                    self.state.blocks.forget(blocks.endpoint_id)

    def _start(self, endpoint_id: str, config: KVEventsConfig) -> None:
        assert self._ctx is not None
        registry = self.state.registry

        def healthy() -> bool:
            endpoint = registry.get(endpoint_id)
            return endpoint is not None and endpoint.healthy

        subscriber = Subscriber(
            endpoint_id,
            config,
            self.state.blocks.endpoint(endpoint_id),
            self._ctx,
            healthy=healthy,
            clock=self._clock,
        )
        task = asyncio.create_task(self._run(subscriber), name=f"kvevents-{endpoint_id}")
        self._subscribers[endpoint_id] = _Running(config, subscriber, task)
        LOG.info({"event": "kv_events_started", "endpoint": endpoint_id})

    async def _run(self, subscriber: Subscriber) -> None:
        """A subscriber's task: restarted after a failure (a bug, or ZMQ refusing
        a URL), with backoff, rather than left dead."""
        delay = 1.0
        while True:
            began = self._clock()
            try:
                await subscriber.run()
            except (Exception, zmq.ZMQError) as exc:
                subscriber.record_error(ErrorKind.CRASH, f"{type(exc).__name__}: {str(exc)[:160]}")
                LOG.exception({"event": "kv_subscriber_failed", "endpoint": subscriber.endpoint_id})
            with contextlib.suppress(Exception):
                subscriber.blocks.mark_stale("subscriber restarting after an error")
            # Back off while it fails at once (a URL ZMQ refuses), not after a long run.
            delay = 1.0 if self._clock() - began > 60 else min(delay * 2, 30.0)
            await asyncio.sleep(delay)

    def subscriber(self, endpoint_id: str) -> Subscriber | None:
        running = self._subscribers.get(endpoint_id)
        return None if running is None else running.subscriber

    def snapshots(self) -> list[FeedSnapshot]:
        """Each feed's numbers, for /metrics (``AppState.kv_feeds``)."""
        return [running.subscriber.snapshot() for _, running in sorted(self._subscribers.items())]

    def status(self) -> dict[str, dict[str, Any]]:
        """Per endpoint with ``kv_events``: connected, state, last_seq, last_event_age
        (seconds), batches, events, gaps, replays, restarts, errors, last_error,
        stale and stale_reason, blocks held, block_size, stored/removed/skipped/
        cleared counts."""
        return {
            endpoint_id: running.subscriber.status()
            for endpoint_id, running in sorted(self._subscribers.items())
        }
