"""The KV-event feeds on /metrics (``kvroute_kv_events_*``), driven by the
simulator's real publisher over loopback ZMQ, read from the app's registry as
Prometheus would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from router.kvevents.hub import KVEventsHub
from router.kvevents.subscriber import FeedState
from router.state import AppState
from tests.helpers import eventually, router_config
from tests.kvevents_helpers import free_tcp, generate, publishing_engine, subscribed

PROMPTS = [
    "the quick brown fox jumps over the lazy dog again and again",
    "a completely different prompt about something else entirely here",
    "one more prompt so that a batch reaches the subscriber at last",
]
#: The only labels a feed's series may carry besides their fixed enums' names.
FEED_LABELS = {"endpoint", "state", "result", "kind", "action"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed_config(endpoint: str, replay_endpoint: str | None) -> Any:
    return router_config(
        [
            {
                "id": "a",
                "url": "http://127.0.0.1:9",
                "kind": "vllm",
                "models": ["tiny"],
                "kv_events": {"endpoint": endpoint, "replay_endpoint": replay_endpoint},
            }
        ],
        health={"enabled": False},
        scrape={"enabled": False},
    )


@contextlib.asynccontextmanager
async def feeding(
    endpoint: str, replay_endpoint: str | None, clock: Clock | None = None
) -> AsyncIterator[AppState]:
    state = AppState.from_config(feed_config(endpoint, replay_endpoint))
    hub = KVEventsHub(state, clock=clock or Clock())
    await hub.start()
    try:
        yield state
    finally:
        await hub.stop()


def samples(state: AppState) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every kvroute_kv_events_* sample: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(state.metrics.render().decode()):
        for s in family.samples:
            if s.name.startswith("kvroute_kv_events_") and not s.name.endswith("_created"):
                assert set(s.labels) <= FEED_LABELS and s.labels["endpoint"] == "a", s
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(app: AppState, name: str, /, **labels: str) -> float:
    """A gauge's sample, or a counter's (``<name>_total``)."""
    key = frozenset({"endpoint": "a", **labels}.items())
    found = samples(app)
    gauge = (f"kvroute_kv_events_{name}", key)
    return found[gauge] if gauge in found else found[(f"kvroute_kv_events_{name}_total", key)]


def current_state(state: AppState) -> str:
    on = [s.value for s in FeedState if value(state, "state", state=s.value) == 1.0]
    assert len(on) == 1, on
    return on[0]


async def until(check: Any, within: float = 10.0) -> None:
    async def holds() -> bool:
        return bool(check())

    await eventually(holds, within=within)


async def test_a_live_feed_counts_batches_events_and_blocks_and_a_gap_is_replayed() -> None:
    async with publishing_engine() as p, feeding(p.endpoint, p.replay_endpoint) as state:
        await until(lambda: current_state(state) == "live")
        await subscribed(p.publisher)
        assert value(state, "gaps") == 0
        for prompt in PROMPTS[:2]:
            await generate(p.engine, prompt)
        await until(lambda: value(state, "batches") == p.publisher.seq)
        assert value(state, "events") >= value(state, "batches") > 0
        blocks = state.blocks.get("a")
        assert blocks is not None and len(blocks) > 0
        assert value(state, "blocks") == len(blocks)
        assert value(state, "block_events", action="stored") > 0
        # A lost batch: a gap, a replay that resumes, live again.
        resumed = value(state, "resyncs", result="resumed")
        p.publisher.lose = 1
        await generate(p.engine, PROMPTS[2])
        await generate(p.engine, PROMPTS[0] + " and a new ending")
        await until(lambda: value(state, "gaps") >= 1)
        await until(lambda: value(state, "resyncs", result="resumed") > resumed)
        await until(lambda: current_state(state) == "live")
        assert value(state, "replays") >= 2


async def test_a_gap_without_replay_is_stale_for_the_grace() -> None:
    clock = Clock()
    async with (
        publishing_engine(replay_endpoint=None) as p,
        feeding(p.endpoint, None, clock) as state,
    ):
        # Connected, but nothing can say what came before: history lost.
        await until(lambda: current_state(state) == "grace")
        await subscribed(p.publisher)
        await generate(p.engine, PROMPTS[0])  # seq 0: the whole history, trusted
        await until(lambda: current_state(state) == "live")
        clears = value(state, "clears")
        p.publisher.lose = 1
        await generate(p.engine, PROMPTS[1])
        await generate(p.engine, PROMPTS[2])
        await until(lambda: value(state, "gaps") == 1)
        assert current_state(state) == "grace"
        assert value(state, "state", state="live") == 0
        assert value(state, "clears") > clears
        assert value(state, "replays") == 0
        clock.now += 31  # resync_grace (30 s by default) has passed
        await until(lambda: current_state(state) == "live")


async def test_a_restart_is_counted_with_its_resync_and_the_clear() -> None:
    clock = Clock()
    async with publishing_engine() as p, feeding(p.endpoint, p.replay_endpoint, clock) as state:
        await until(lambda: current_state(state) == "live")
        await subscribed(p.publisher)
        await generate(p.engine, PROMPTS[0])
        await until(lambda: value(state, "blocks") > 0)
        clears = value(state, "clears")
        # The publisher forgets its history, as a restart the SUB socket never
        # saw: the next probe (probe_interval, 30 s by default) finds out.
        p.publisher._buffer.clear()
        p.publisher.seq = 0
        clock.now += 31
        await until(lambda: value(state, "restarts") == 1)
        # The restart is counted when found; its resync once the replay from 0 is in.
        await until(lambda: value(state, "resyncs", result="restarted") == 1)
        assert value(state, "blocks") == 0 and value(state, "clears") > clears


async def test_a_malformed_batch_counts_as_a_decode_error_and_labels_nothing_of_it() -> None:
    endpoint = free_tcp()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    try:
        async with feeding(endpoint, None) as state:
            await until(lambda: current_state(state) == "grace")
            for _ in range(200):  # until the subscription has reached the PUB socket
                # topic, seq, a payload that is no event batch
                await pub.send_multipart([b"", (7).to_bytes(8, "big"), b"\xc1 evil-label"])
                if value(state, "errors", kind="decode") >= 1:
                    break
                await asyncio.sleep(0.05)
            assert value(state, "errors", kind="decode") >= 1
            assert value(state, "errors", kind="crash") == 0
            assert not any("evil" in str(key) for key in samples(state))
    finally:
        pub.close(linger=0)
        ctx.destroy(linger=0)


def test_feed_families_are_listed_without_any_feed() -> None:
    """No kv_events anywhere: the families are declared (docs/metrics.md lists
    them), no series are exposed."""
    state = AppState.from_config(router_config([]))
    names = {f.name for f in state.metrics.families()}
    assert {"kvroute_kv_events_state", "kvroute_kv_events_gaps"} <= names
    assert samples(state) == {}
