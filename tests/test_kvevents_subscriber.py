"""kvroute's KV-event subscriber against the simulator's real publisher (loopback ZMQ)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq.asyncio

from policies.blocks import EndpointBlocks
from router.config import ConfigError, KVEventsConfig
from router.kvevents.hub import KVEventsHub
from router.kvevents.subscriber import Subscriber
from router.state import AppState
from tests.helpers import eventually, router_config
from tests.kvevents_helpers import (
    Publishing,
    cached_prefix_blocks,
    generate,
    our_hashes,
    publishing_engine,
    subscribed,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Health:
    def __init__(self) -> None:
        self.ok = True

    def __call__(self) -> bool:
        return self.ok


@contextlib.asynccontextmanager
async def subscribing(
    p: Publishing,
    clock: Clock | None = None,
    health: Health | None = None,
    **config: Any,
) -> AsyncIterator[Subscriber]:
    ctx = zmq.asyncio.Context()
    cfg = KVEventsConfig(endpoint=p.endpoint, replay_endpoint=p.replay_endpoint, **config)
    sub = Subscriber(
        "sim",
        cfg,
        EndpointBlocks("sim", max_blocks=10_000),
        ctx,
        healthy=health or Health(),
        clock=clock or Clock(),
    )
    task = asyncio.create_task(sub.run())
    try:
        # What is published before the subscription is in effect is lost with
        # no gap to show it (tests of that lose batches on purpose).
        await subscribed(p.publisher)
        yield sub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ctx.destroy(linger=0)


async def live(sub: Subscriber) -> None:
    async def check() -> bool:
        return not sub.blocks.stale

    await eventually(check, within=10)


async def mirrors(sub: Subscriber, p: Publishing, prompts_ids: list[list[int]]) -> None:
    """Until the subscriber's blocks are the engine's cache, prompt by prompt."""

    async def check() -> bool:
        return len(sub.blocks) == len(p.engine.cache._cached) and all(
            sub.blocks.match(our_hashes(p.engine, ids)) == cached_prefix_blocks(p.engine, ids)
            for ids in prompts_ids
        )

    await eventually(check, within=10)


PROMPTS = [
    "the quick brown fox jumps over the lazy dog again and again",
    "the quick brown fox jumps over a sleeping cat this time around",
    "a completely different prompt about something else entirely here",
]


async def test_follows_the_engine_from_an_empty_start() -> None:
    async with publishing_engine() as p, subscribing(p) as sub:
        await live(sub)
        assert sub.status()["last_seq"] is None and sub.replays >= 1
        ids = [await generate(p.engine, prompt) for prompt in PROMPTS]
        await mirrors(sub, p, ids)
        assert sub.blocks.match(our_hashes(p.engine, ids[0])) > 0
        status = sub.status()
        assert status["connected"] and not status["stale"]
        assert status["last_seq"] == p.publisher.seq - 1
        assert status["batches"] == p.publisher.seq and status["blocks"] == len(sub.blocks)
        assert status["last_event_age"] == 0.0  # the injected clock did not move


async def test_joining_late_replays_the_history() -> None:
    async with publishing_engine() as p:
        ids = [await generate(p.engine, prompt) for prompt in PROMPTS[:2]]
        async with subscribing(p) as sub:
            await mirrors(sub, p, ids)
            await live(sub)
            assert sub.batches == p.publisher.seq


async def test_a_lost_batch_is_replayed() -> None:
    async with publishing_engine() as p, subscribing(p) as sub:
        await live(sub)
        p.publisher.lose = 1
        ids = [await generate(p.engine, prompt) for prompt in PROMPTS]
        await mirrors(sub, p, ids)
        # (A batch lost before the subscription took effect would count too.)
        assert sub.gaps >= 1 and sub.replays >= 2 and not sub.blocks.stale


async def test_a_gap_the_buffer_cannot_fill_clears_and_is_stale_for_the_grace() -> None:
    clock = Clock()
    async with (
        publishing_engine(buffer_steps=1) as p,
        subscribing(p, clock, resync_grace=30) as sub,
    ):
        await live(sub)
        await generate(p.engine, PROMPTS[0])
        await mirrors(sub, p, [])
        p.publisher.lose = 100
        for prompt in PROMPTS[1:]:
            await generate(p.engine, prompt)
        p.publisher.lose = 0
        await generate(p.engine, "one more prompt so that a batch reaches the subscriber")

        async def cleared() -> bool:
            return sub.blocks.cleared_total >= 1 and sub.blocks.stale

        await eventually(cleared, within=10)
        assert sub.blocks.stale_reason == "the replay buffer did not reach back to the first batch"
        assert len(sub.blocks) < len(p.engine.cache._cached)
        clock.now += 31
        await live(sub)


async def test_a_replay_too_large_gives_the_history_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("router.kvevents.subscriber.MAX_REPLAY", 1)
    clock = Clock()
    async with publishing_engine() as p:
        for prompt in PROMPTS:
            await generate(p.engine, prompt)
        async with subscribing(p, clock, resync_grace=30) as sub:

            async def given_up() -> bool:
                return sub.blocks.stale_reason == "the replay was unusable (ReplayTooLarge)"

            await eventually(given_up, within=10)
            assert len(sub.blocks) == 0 and sub.tracker.expected is None
            # What comes next is applied (stale until the grace is over).
            ids = await generate(p.engine, "a new prompt after the history was given up")

            async def applied() -> bool:
                return sub.blocks.match(our_hashes(p.engine, ids)) > 0

            await eventually(applied, within=10)
            clock.now += 31
            await live(sub)


async def test_batches_lost_before_the_subscription_took_effect_are_found_by_the_probe() -> None:
    clock = Clock()
    async with publishing_engine() as p, subscribing(p, clock, probe_interval=5) as sub:
        await live(sub)  # resynced: the publisher had nothing
        assert sub.tracker.expected == 0 and sub.tracker.last_digest is None
        # As in ZMQ's slow-joiner moment: published, buffered for replay, not
        # delivered; and no later batch comes to show a gap.
        p.publisher.lose = 100
        ids = await generate(p.engine, PROMPTS[0])
        p.publisher.lose = 0
        await asyncio.sleep(0.3)
        assert len(sub.blocks) == 0 and len(p.engine.cache._cached) > 0
        replays = sub.replays
        clock.now += 5
        await mirrors(sub, p, [ids])
        assert sub.replays == replays + 1 and sub.gaps == 0 and not sub.blocks.stale


async def test_a_restarted_publisher_clears_the_blocks() -> None:
    async with publishing_engine() as p:
        endpoint, replay = p.endpoint, p.replay_endpoint
        async with subscribing(p) as sub:
            ids = [await generate(p.engine, prompt) for prompt in PROMPTS[:2]]
            await mirrors(sub, p, ids)
            assert len(sub.blocks) > 0
            await p.publisher.close()

            async def disconnected() -> bool:
                return sub.blocks.stale and not sub.connected

            await eventually(disconnected, within=10)
            assert sub.blocks.stale_reason == "publisher not connected"
            # A new process on the same ports: empty cache, seq from 0.
            async with publishing_engine(endpoint, replay) as fresh:

                async def cleared() -> bool:
                    return sub.restarts == 1 and len(sub.blocks) == 0 and not sub.blocks.stale

                await eventually(cleared, within=15)
                await subscribed(fresh.publisher)  # the SUB socket subscribes again
                new_ids = [await generate(fresh.engine, PROMPTS[2])]
                await mirrors(sub, fresh, new_ids)
                assert sub.blocks.match(our_hashes(fresh.engine, ids[0])) == 0


async def test_an_idle_restart_is_noticed_by_the_probe() -> None:
    clock = Clock()
    async with publishing_engine() as p, subscribing(p, clock, probe_interval=5) as sub:
        await generate(p.engine, PROMPTS[0])
        await mirrors(sub, p, [])
        assert len(sub.blocks) > 0
        # The same process forgets its history (as a restart that the SUB socket
        # never saw would): the probe's replay no longer has the last batch.
        p.publisher._buffer.clear()
        p.publisher.seq = 0
        await asyncio.sleep(0.5)
        assert sub.restarts == 0  # no probe before its interval
        clock.now += 5

        async def cleared() -> bool:
            return sub.restarts == 1 and len(sub.blocks) == 0

        await eventually(cleared, within=10)


async def test_a_probe_of_the_same_publisher_changes_nothing() -> None:
    clock = Clock()
    async with publishing_engine() as p, subscribing(p, clock, probe_interval=5) as sub:
        await live(sub)
        ids = [await generate(p.engine, PROMPTS[0])]
        await mirrors(sub, p, ids)
        for _ in range(2):  # only seq 0 applied, then more
            replays, held = sub.replays, len(sub.blocks)
            clock.now += 5

            async def probed(replays: int = replays) -> bool:
                return sub.replays == replays + 1 and not sub._need_sync

            await eventually(probed, within=5)
            assert len(sub.blocks) == held and sub.restarts == 0 and sub.blocks.cleared_total == 0
            ids.append(await generate(p.engine, PROMPTS[1]))
            await mirrors(sub, p, ids)


async def test_an_unhealthy_endpoint_is_stale_until_it_recovers() -> None:
    health = Health()
    async with publishing_engine() as p, subscribing(p, health=health) as sub:
        await live(sub)
        health.ok = False

        async def stale() -> bool:
            return sub.blocks.stale_reason == "endpoint unhealthy"

        await eventually(stale, within=5)
        replays = sub.replays
        health.ok = True
        await live(sub)
        assert sub.replays == replays + 1  # it may have restarted: checked


async def test_without_a_replay_endpoint_a_gap_clears_for_the_grace() -> None:
    clock = Clock()
    async with publishing_engine(replay_endpoint=None) as p:
        async with subscribing(p, clock, resync_grace=30) as sub:

            async def connected() -> bool:
                return sub.blocks.stale_reason == "no replay endpoint to fill a gap"

            await eventually(connected, within=10)
            # The publisher's first batch (seq 0): its whole history, trusted at once.
            ids = [await generate(p.engine, PROMPTS[0])]
            await mirrors(sub, p, ids)
            await live(sub)
            p.publisher.lose = 1
            await generate(p.engine, PROMPTS[1])
            await generate(p.engine, PROMPTS[2])

            async def lost() -> bool:
                return sub.gaps == 1 and sub.blocks.stale

            await eventually(lost, within=10)
            assert sub.replays == 0 and sub.blocks.cleared_total >= 1
            clock.now += 31
            await live(sub)


async def test_a_missing_replay_socket_is_stale_and_retried() -> None:
    clock = Clock()
    async with publishing_engine(replay_endpoint=None) as p:
        from tests.kvevents_helpers import free_tcp

        p.replay_endpoint = free_tcp()  # nobody answers there
        async with subscribing(p, clock, replay_timeout=0.3) as sub:

            async def stale() -> bool:
                return sub.blocks.stale_reason == "replay socket not answering"

            await eventually(stale, within=10)
            assert sub.errors >= 1 and "no replay within" in (sub.last_error or "")


# -- the hub ----------------------------------------------------------------------------


def config(endpoints: dict[str, Publishing | None]) -> Any:
    return router_config(
        [
            {
                "id": name,
                "url": "http://127.0.0.1:9",
                "kind": "vllm",
                "models": ["tiny"],
                **(
                    {}
                    if p is None
                    else {
                        "kv_events": {"endpoint": p.endpoint, "replay_endpoint": p.replay_endpoint}
                    }
                ),
            }
            for name, p in endpoints.items()
        ],
        health={"enabled": False},
        scrape={"enabled": False},
    )


async def test_hub_follows_the_config_across_reloads() -> None:
    async with publishing_engine() as a, publishing_engine() as b:
        state = AppState.from_config(config({"a": a, "plain": None}))
        hub = KVEventsHub(state, follow_interval=0.05)
        await hub.start()
        try:
            assert list(hub.status()) == ["a"]
            assert state.registry.get("plain").view().blocks is None  # type: ignore[union-attr]
            blocks_a = state.blocks.get("a")
            assert blocks_a is not None
            assert state.registry.get("a").view().blocks is blocks_a  # type: ignore[union-attr]
            ids = [await generate(a.engine, PROMPTS[0])]
            await mirrors(hub.subscriber("a"), a, ids)  # type: ignore[arg-type]

            # A reload that changes something else of the endpoint keeps its
            # subscriber and what it learned.
            subscriber = hub.subscriber("a")
            changed = config({"a": a, "plain": None})
            raw = changed.model_dump()
            raw["endpoints"][0]["weight"] = 2.0
            old = state.config
            state.apply(type(changed).model_validate(raw))
            await hub.reconfigure(old, state.config)
            assert hub.subscriber("a") is subscriber
            assert state.registry.get("a").view().blocks is blocks_a  # type: ignore[union-attr]
            assert blocks_a.match(our_hashes(a.engine, ids[0])) > 0

            old = state.config
            state.apply(config({"b": b, "plain": None}))
            await hub.reconfigure(old, state.config)
            assert list(hub.status()) == ["b"]
            assert state.blocks.get("a") is None

            # Discovery-style change (no reload): picked up by the follow loop.
            state.remove_endpoint("b")

            async def gone() -> bool:
                return hub.status() == {}

            await eventually(gone, within=5)
            assert state.blocks.all() == []
        finally:
            await hub.stop()
        assert hub.status() == {}


async def test_hub_status_fields() -> None:
    async with publishing_engine() as a:
        state = AppState.from_config(config({"a": a}))
        hub = KVEventsHub(state)
        await hub.start()
        try:
            sub = hub.subscriber("a")
            assert sub is not None
            await live(sub)
            status = hub.status()["a"]
            assert set(status) >= {
                "connected",
                "last_seq",
                "last_event_age",
                "batches",
                "gaps",
                "replays",
                "stale",
                "stale_reason",
                "blocks",
            }
            assert status["stale"] is False and status["stale_reason"] is None
        finally:
            await hub.stop()


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("tcp://*:5557", "bind address"),
        ("http://host:5557", "tcp://host:port or ipc://path"),
        ("tcp://host", "tcp://host:port or ipc://path"),
    ],
)
def test_kv_events_urls_are_checked_at_load(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        router_config(
            [
                {
                    "id": "a",
                    "url": "http://127.0.0.1:9",
                    "models": ["tiny"],
                    "kv_events": {"endpoint": url},
                }
            ]
        )


def test_kv_events_config_shape() -> None:
    cfg = router_config(
        [
            {
                "id": "a",
                "url": "http://127.0.0.1:9",
                "models": ["tiny"],
                "kv_events": {
                    "endpoint": "tcp://10.0.0.5:5557",
                    "replay_endpoint": "ipc:///run/vllm/replay",
                    "topic": "kv",
                },
            }
        ]
    )
    kv = cfg.endpoints[0].kv_events
    assert kv == KVEventsConfig(
        endpoint="tcp://10.0.0.5:5557", replay_endpoint="ipc:///run/vllm/replay", topic="kv"
    )
