"""Router replicas telling each other where they placed prompts (Redis pub/sub).

A lifespan service (router/lifecycle.py), on while ``placements.redis`` is set::

    PrefixAffinity.rank/observe ── PlacementLog.record ──> publisher task
        (every model's prefix_affinity policy gets a log)      │ every flush_interval,
                                                               │ a message per model
                                                               v
                                          PUBLISH {key_prefix}placements
                                                               │
    PrefixAffinity.learn_placement <── apply <── subscriber task (SUBSCRIBE)
        (the endpoint must serve the model here; own messages skipped)

Pub/sub delivers at most once: a placement lost while Redis is down or a
router reconnects only makes that router's index less complete, as the
index is a guess anyway. What matters is that a router knows whether the
others' placements arrive: a log is ``live`` while the subscription is up
and the last publish succeeded, and the policy applies the rules for
routers that share nothing whenever it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from policies.placements import PlacementLog
from policies.prefix import PrefixAffinity
from router.config import Config, PlacementsConfig
from router.outage import CallGuard
from router.placements.wire import MAX_MESSAGE_HASHES, PlacementsError, decode, encode
from router.redis_conn import RedisConn
from router.state import AppState
from router.tasks import cancel_all

LOG = logging.getLogger("kvroute.placements")

#: Seconds between looks for models whose policy has no log yet (a reload
#: replaced it, or a model was first asked for) while nothing is published.
ATTACH_INTERVAL = 1.0
#: Seconds the subscriber waits for a message before looking again.
POLL_TIMEOUT = 1.0
#: Weight of a message's lag in the recent mean (``PlacementLog.lag``).
LAG_WEIGHT = 0.05
#: Seconds a lag sample counts for at most (a clock far off is not a lag).
MAX_LAG = 10.0


def _publish_call(conn: RedisConn, channel: str, data: bytes) -> Callable[[], Awaitable[Any]]:
    """A PUBLISH of ``data`` as a factory: the guard creates it only if it calls."""
    return lambda: conn.guarded(conn.client.publish(channel, data))


class PlacementsUnavailable(Exception):
    """Redis did not take or deliver placements."""


@dataclass
class _Attached:
    policy: PrefixAffinity
    log: PlacementLog
    #: ``log.dropped`` already added to the metric.
    counted_dropped: int = 0


class PlacementSharing:
    def __init__(self, state: AppState, router_id: str | None = None) -> None:
        self.state = state
        #: Names this process's messages (its own are skipped when they come back).
        self.router_id = router_id or secrets.token_hex(8)
        self._config: PlacementsConfig | None = None
        self._conn: RedisConn | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._attached: dict[str, _Attached] = {}
        self._subscribed = False
        #: The last publish round succeeded (the guard's view, or a bug's).
        self._publishing = True
        #: The others' placements' lag, a recent mean (seconds).
        self._lag = 0.0
        state.placements_status = self.status

    @property
    def live(self) -> bool:
        return self._subscribed and self._publishing

    async def start(self) -> None:
        self._open(self.state.config.placements)

    async def stop(self) -> None:
        await self._close()

    async def reconfigure(self, old: Config, new: Config) -> None:
        if old.placements != new.placements:
            await self._close()
            self._open(new.placements)
        elif self._config is not None:
            self._attach()  # a policy the reload replaced shares from now on

    def status(self) -> dict[str, Any]:
        """For /admin/prefix-index: per model, whether its placements are shared."""
        return {
            model: {"live": a.log.live, "pending": len(a.log), "dropped": a.log.dropped}
            for model, a in self._attached.items()
        }

    def _open(self, config: PlacementsConfig) -> None:
        if config.redis is None:
            return
        self._config = config
        # Publishes wait at most ``timeout``; the subscription's reads wait on
        # POLL_TIMEOUT, not on the socket's timeout.
        self._conn = RedisConn(
            config.redis, PlacementsUnavailable, socket_timeout=max(config.timeout, POLL_TIMEOUT)
        )
        self._publishing = True
        self._attach()
        self._tasks = [
            asyncio.create_task(self._publish_loop(config), name="placements-publish"),
            asyncio.create_task(self._subscribe_loop(config), name="placements-subscribe"),
        ]
        where = self._conn.where
        LOG.info({"event": "placements_sharing", "redis": where, "router": self.router_id})

    async def _close(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
        for attached in self._attached.values():
            attached.policy.share_placements(None)
        self._attached.clear()
        self._subscribed = False
        self.state.metrics.placements_up.set(0)
        if self._conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._conn.client.aclose()
            self._conn = None
        self._config = None

    def _set_live(self, *, subscribed: bool | None = None, publishing: bool | None = None) -> None:
        if subscribed is not None:
            self._subscribed = subscribed
        if publishing is not None:
            self._publishing = publishing
        live = self.live
        for attached in self._attached.values():
            attached.log.live = live
        self.state.metrics.placements_up.set(1 if live else 0)

    def _attach(self) -> None:
        """A log for every model routed by ``prefix_affinity`` (a reload may
        have replaced a policy; a default-policy model appears when first asked)."""
        assert self._config is not None
        current = {
            route.model: route.policy
            for route in self.state.routes.routes()
            if isinstance(route.policy, PrefixAffinity)
        }
        for model in list(self._attached):
            if current.get(model) is not self._attached[model].policy:
                self._count_dropped(self._attached.pop(model))
        for model, policy in current.items():
            if model in self._attached:
                continue
            log = PlacementLog(self._config.max_pending, notify=self._wake.set)
            log.live = self.live
            log.lag = self._lag
            policy.share_placements(log)
            self._attached[model] = _Attached(policy, log)

    def _count_dropped(self, attached: _Attached) -> None:
        new = attached.log.dropped - attached.counted_dropped
        if new:
            self.state.metrics.placements_dropped.labels("backlog").inc(new)
            attached.counted_dropped = attached.log.dropped

    async def _publish_loop(self, config: PlacementsConfig) -> None:
        """Publish what the logs hold, every ``flush_interval`` while there is
        any, through a CallGuard (router/outage.py): each publish within
        ``timeout``; after ``trip_after`` failures in a row the link is down
        and nothing is tried for ``retry_interval`` (the logs keep the newest
        placements meanwhile), then a PING probes Redis. A bug in a round is
        logged, the link marked down for ``retry_interval``, and the loop goes on."""
        guard = CallGuard(
            "placements channel",
            PlacementsUnavailable,
            config.timeout,
            config.retry_interval,
            trip_after=config.trip_after,
        )
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ATTACH_INTERVAL)
            # Let the placements of the next few decisions join this message.
            await asyncio.sleep(config.flush_interval)
            self._wake.clear()
            try:
                self._attach()
                await self._publish_round(config, guard)
            except PlacementsUnavailable as exc:
                if self._publishing and not guard.up:
                    LOG.warning({"event": "placements_publish_failed", "error": str(exc)})
                    self._set_live(publishing=False)
                continue
            except Exception:
                LOG.exception({"event": "placements_publish_crashed"})
                self._set_live(publishing=False)
                await asyncio.sleep(config.retry_interval)
                continue
            if not self._publishing:
                LOG.info({"event": "placements_publish_recovered"})
                self._set_live(publishing=True)

    async def _publish_round(self, config: PlacementsConfig, guard: CallGuard) -> None:
        """One message per model (more past ``max_batch`` or the hashes'
        bound) for everything pending; ``PlacementsUnavailable`` when Redis
        failed or the guard is down."""
        assert self._conn is not None
        conn, channel = self._conn, f"{config.key_prefix}placements"
        metrics = self.state.metrics
        if not guard.up:
            await guard.call(lambda: conn.guarded(conn.client.ping()))
        for model, attached in list(self._attached.items()):
            self._count_dropped(attached)
            while attached.log:
                batch = attached.log.drain(config.max_batch, MAX_MESSAGE_HASHES)
                data = encode(self.router_id, time.time(), model, batch)
                try:
                    await guard.call(_publish_call(conn, channel, data))
                except PlacementsUnavailable:
                    metrics.placements_dropped.labels("publish_failed").inc(len(batch))
                    raise
                metrics.placements_published.inc(len(batch))

    async def _subscribe_loop(self, config: PlacementsConfig) -> None:
        assert self._conn is not None
        channel = f"{config.key_prefix}placements"
        warned = False
        while True:
            pubsub = self._conn.client.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=POLL_TIMEOUT)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        LOG.info({"event": "placements_subscribed", "channel": channel})
                        self._set_live(subscribed=True)
                        warned = False
                    elif message["type"] == "message":
                        self.apply(message["data"])
                        # A burst of buffered messages must not hold the loop.
                        await asyncio.sleep(0)
            except (RedisError, OSError) as exc:
                if not warned:
                    error = self._conn.describe(exc)
                    LOG.warning({"event": "placements_subscription_down", "error": error})
                    warned = True
            except Exception:
                LOG.exception({"event": "placements_subscription_crashed"})
            finally:
                self._set_live(subscribed=False)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(config.retry_interval)

    def apply(self, data: bytes) -> None:
        """Index another router's message (its own are skipped)."""
        received = self.state.metrics.placements_received
        try:
            message = decode(data)
        except PlacementsError as exc:
            received.labels("invalid").inc()
            LOG.debug({"event": "placements_invalid", "error": str(exc)})
            return
        if message.router == self.router_id:
            return
        # Clocks of two hosts may disagree: a sample is taken within [0, MAX_LAG].
        lag = min(MAX_LAG, max(0.0, time.time() - message.sent_at))
        self.state.metrics.placements_lag.observe(lag)
        self._lag += (lag - self._lag) * LAG_WEIGHT
        for other in self._attached.values():
            other.log.lag = self._lag
        model, placements = message.model, message.placements
        attached = self._attached.get(model)
        if attached is None:
            received.labels("unknown_model").inc(len(placements))
            return
        serving = {s.id: s for s in self.state.registry.serving(model)}
        applied = 0
        for p in placements:
            endpoint = serving.get(p.endpoint_id)
            if endpoint is not None:
                attached.policy.learn_placement(p.hashes, endpoint.view(model))
                applied += 1
        received.labels("applied").inc(applied)
        if applied < len(placements):
            received.labels("unknown_endpoint").inc(len(placements) - applied)
