"""Router replicas telling each other their placements: the log, the wire
format, the policy's side, and two routers over a real Redis."""

from __future__ import annotations

import logging
import time
from array import array
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from policies import EndpointView, RequestView
from policies.base import Outcome
from policies.placements import MAX_HASHES, MAX_PENDING_HASHES, Placement, PlacementLog
from policies.prefix import PrefixAffinity
from router.app import build_app
from router.placements.wire import MAX_ENTRIES, Message, PlacementsError, decode, encode
from tests.helpers import eventually, router_config, serve_app, simulator
from tests.redis_server import RedisServer
from tests.test_prefix_affinity import SYSTEM, chat, fleet, policy, ring_walk, scraped_fleet

# -- the log -----------------------------------------------------------------


def test_the_log_keeps_the_newest_and_counts_what_it_dropped() -> None:
    woken: list[int] = []
    log = PlacementLog(3, notify=lambda: woken.append(1))
    for i in range(5):
        log.record([i, i + 1], f"e{i}", 10)
    log.record([], "e9", 10)  # nothing to place: not recorded
    assert len(log) == 3 and log.dropped == 2 and len(woken) == 5
    first = log.drain(2)
    assert [p.endpoint_id for p in first] == ["e2", "e3"]
    assert list(first[0].hashes) == [2, 3]
    assert [p.endpoint_id for p in log.drain(10)] == ["e4"]
    assert log.drain(10) == [] and len(log) == 0


def test_the_log_bounds_what_it_holds_and_what_one_message_takes() -> None:
    log = PlacementLog(100)
    log.record(list(range(50)), "e0", 20)  # the index keeps no more than its room
    assert list(log.drain(1)[0].hashes) == list(range(20))
    log.record(list(range(MAX_HASHES + 10)), "e0", 10**9)
    assert len(log.drain(1)[0].hashes) == MAX_HASHES
    # Hashes waiting are bounded too, not only placements: the oldest go first.
    big = list(range(MAX_HASHES))
    for i in range(MAX_PENDING_HASHES // MAX_HASHES + 3):
        log.record(big, f"e{i}", 10**9)
    assert log.dropped == 3 and len(log) == MAX_PENDING_HASHES // MAX_HASHES
    # A batch is cut by hashes as well as by count (one always goes).
    batch = log.drain(100, max_hashes=2 * MAX_HASHES + 1)
    assert [p.endpoint_id for p in batch] == ["e3", "e4"]
    assert len(log.drain(100, max_hashes=1)) == 1


# -- the wire format ---------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=20),
            st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50),
        ),
        max_size=20,
    )
)
def test_messages_decode_to_what_was_encoded(entries: list[tuple[str, list[int]]]) -> None:
    placements = [Placement(e, array("Q", h)) for e, h in entries]
    message = decode(encode("router-1", 1_700_000_000.25, "tiny", placements))
    assert message == Message("router-1", 1_700_000_000.25, "tiny", placements)


def _raw(*message: Any) -> bytes:
    return msgspec.msgpack.encode(list(message))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1garbage",
        _raw(2, "r", 0.0, "m", []),  # a version kvroute does not read
        _raw(1, "r", 0.0, "m", [["e", b"\x00" * 7]]),  # not whole 8-byte hashes
        _raw(1, "r", 0.0, "m", [["e", 5, b"\x00" * 8]]),  # a field too many
        _raw(1, "r", 0.0, "m", [["e", b""]]),  # no hashes
        _raw(1, "r", -1.0, "m", []),  # a time before 1970
        _raw(1, "r", float("inf"), "m", []),  # no time at all
        _raw(1, "r", float("nan"), "m", []),
        _raw(1, "", 0.0, "m", []),  # no router
        _raw(1, "r", 0.0, "m" * 300, []),  # a name past its bound
        _raw(1, "r", 0.0, "m", [["e", b"\x00" * 8]] * (MAX_ENTRIES + 1)),
        _raw(1, "r", 0.0, "m", [{"endpoint": "e"}]),  # a map, not an array
        _raw(1, "r", "m", []),  # no time
        b"\x00" * (5 * 1024 * 1024),
    ],
)
def test_a_bad_message_is_refused_whole(data: bytes) -> None:
    with pytest.raises(PlacementsError):
        decode(data)


# -- the policy's side ---------------------------------------------------------


def _shared(p: PrefixAffinity, live: bool = True) -> PlacementLog:
    log = PlacementLog(100)
    log.live = live
    p.share_placements(log)
    return log


def test_a_router_follows_where_another_placed_a_prompt() -> None:
    a, b, unshared = policy(), policy(), policy()
    log = _shared(a)
    _shared(b)
    req = chat(SYSTEM, "q")
    owner, second, *_ = ring_walk(a, req, fleet(4))
    # a sees its owner busy and places the new prompt on the second ring choice.
    da = a.rank(req, fleet(4, awaiting={owner: 3}))
    assert (da.ranked[0].id, da.reason) == (second, "ring_less_loaded")
    published = log.drain(10)
    assert [(p.endpoint_id, list(p.hashes)) for p in published] == [(second, a.hashes(req)[0])]
    for p in published:
        b.learn_placement(p.hashes, next(e for e in fleet(4) if e.id == p.endpoint_id))
    # b, which never routed it, follows; a router that was not told places it anew.
    db = b.rank(chat(SYSTEM, "another question"), fleet(4))
    assert (db.ranked[0].id, db.reason) == (second, "prefix_hit")
    du = unshared.rank(chat(SYSTEM, "another question"), fleet(4))
    assert (du.ranked[0].id, du.reason) == (owner, "ring_owner")


def test_failover_publishes_the_endpoint_that_served() -> None:
    a = policy()
    log = _shared(a)
    d = a.rank(chat(SYSTEM, "q"), fleet(4))
    served = next(e.id for e in fleet(4) if e.id != d.ranked[0].id)
    a.observe(d, served, Outcome(True))
    assert [p.endpoint_id for p in log.drain(10)] == [d.ranked[0].id, served]


def test_while_shared_live_the_router_sizes_and_places_as_one_alone() -> None:
    """At half the traffic, a router that shares nothing halves each endpoint's
    index and places new prefixes on the ring owner whatever its own counts;
    told every placement, it does neither; when the link drops, it does again."""
    alone, half = policy(), policy()
    log = _shared(half, live=True)
    for p, ours in ((alone, 4), (half, 2)):
        for i in range(10):
            p.rank(chat(f"t {i}: " + SYSTEM, "hi"), scraped_fleet(4, ours, 4, {}))
    assert half.share == pytest.approx(0.5)
    e = fleet(1)[0]
    assert half.capacity_blocks(e) == alone.capacity_blocks(e)
    req = chat("new tenant: " + SYSTEM, "hi")
    owner, *_ = ring_walk(half, req, fleet(4))
    d = half.rank(req, scraped_fleet(4, 2, 4, {owner: 1}))
    assert d.ranked[0].id != owner and d.reason == "ring_less_loaded"
    log.live = False
    assert half.capacity_blocks(e) == alone.capacity_blocks(e) // 2
    req = chat("another tenant: " + SYSTEM, "hi")
    owner, *_ = ring_walk(half, req, fleet(4))
    d = half.rank(req, scraped_fleet(4, 2, 4, {owner: 1}))
    assert (d.ranked[0].id, d.reason) == (owner, "ring_owner")


def test_placements_heard_late_place_new_prefixes_where_every_router_would() -> None:
    """Until another router's placement arrives, the others do not know of it:
    past ``placements_max_lag`` a new prefix goes to the first ring endpoint
    within the bounded load (every router's pick), not to the one this
    router's own counts favour; the index stays full-sized."""
    half = policy()
    log = _shared(half)
    for i in range(10):
        half.rank(chat(f"t {i}: " + SYSTEM, "hi"), scraped_fleet(4, 2, 4, {}))
    full = half.capacity_blocks(fleet(1)[0])
    for lag, expected in ((0.005, "ring_less_loaded"), (0.05, "ring_owner")):
        log.lag = lag
        req = chat(f"lag {lag}: " + SYSTEM, "hi")
        owner, *_ = ring_walk(half, req, fleet(4))
        d = half.rank(req, scraped_fleet(4, 2, 4, {owner: 1}))
        assert d.reason == expected and (d.ranked[0].id == owner) == (expected == "ring_owner")
        assert half.capacity_blocks(fleet(1)[0]) == full
    # A router alone never meets the rule, however late its (own) messages.
    alone = policy()
    _shared(alone).lag = 1.0
    req = chat("alone: " + SYSTEM, "hi")
    owner, *_ = ring_walk(alone, req, fleet(4))
    d = alone.rank(req, fleet(4, awaiting={owner: 1}))
    assert d.reason == "ring_less_loaded"


def test_a_placement_takes_the_room_this_router_gives_the_endpoint() -> None:
    """Whatever room the sender had (a router whose link is down sizes by its
    share), the receiver indexes in its own: 200 blocks into an endpoint whose
    cache holds 1,000 tokens (15 blocks of 256 characters at 4 per token)."""
    p = policy()
    small = EndpointView(id="e0", url="http://e0", kind="vllm", kv_capacity_tokens=1000)
    p.learn_placement(array("Q", range(1, 201)), small)
    assert p.capacity_blocks(small) == 15 and p.index_stats().entries == 15


# -- two routers over Redis ----------------------------------------------------


def _config(sims: list[str], redis_url: str, **placements: Any) -> Any:
    endpoints = [
        {"id": f"e{i}", "url": url, "kind": "vllm", "models": ["tiny"]}
        for i, url in enumerate(sims)
    ]
    return router_config(
        endpoints,
        models={"tiny": {"policy": "prefix_affinity"}},
        placements={"redis": redis_url, "retry_interval": 0.2, **placements},
    )


def _held(app: Any, body: dict[str, Any]) -> set[str]:
    """The endpoints app's index believes hold ``body``'s whole prompt."""
    route = app.state.routes.resolve("tiny")
    policy = route.policy
    assert isinstance(policy, PrefixAffinity)
    hashes, _ = policy.hashes(chat_view(body))
    return {e for e, n in policy.index.match(hashes, ["e0", "e1", "e2", "e3"]).items() if n}


def chat_view(body: dict[str, Any]) -> RequestView:
    return RequestView(model="tiny", endpoint="chat", body=body)


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_two_routers_index_each_others_placements(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        simulator() as (s0, _),
        simulator() as (s1, _),
        simulator() as (s2, _),
        simulator() as (s3, _),
    ):
        sims = [s0, s1, s2, s3]
        a, b = (
            build_app(_config(sims, redis_server.url)),
            build_app(_config(sims, redis_server.url)),
        )
        async with (
            serve_app(a) as url_a,
            serve_app(b) as url_b,
            httpx.AsyncClient(base_url=url_a, timeout=30) as ca,
            httpx.AsyncClient(base_url=url_b, timeout=30) as cb,
        ):
            for c in (ca, cb):
                await eventually(lambda c=c: _up(c))
            bodies = [
                {
                    "model": "tiny",
                    "max_tokens": 2,
                    "messages": [
                        {"role": "system", "content": f"tenant {t}: " + SYSTEM},
                        {"role": "user", "content": "hi"},
                    ],
                }
                for t in range(6)
            ]
            for body in bodies:
                assert (await ca.post("/v1/chat/completions", json=body)).status_code == 200
            # b never saw these requests; a's placements reach its index.
            for body in bodies:
                await eventually(lambda body=body: _agree(a, b, body))
            assert await _metric(ca, "kvroute_placements_published_total") >= 6
            assert await _metric(cb, 'kvroute_placements_received_total{result="applied"}') >= 6
            assert await _metric(cb, "kvroute_placements_lag_seconds_count") >= 1
            heard = b.state.routes.resolve("tiny").policy
            assert isinstance(heard, PrefixAffinity) and heard.placements is not None
            assert 0 < heard.placements.lag < 5  # the recent mean the policy reads
            # a's own messages come back to a and are skipped (b published none).
            assert await _metric(ca, 'kvroute_placements_received_total{result="applied"}') == 0
            index = (await cb.get("/admin/prefix-index")).json()["tiny"]
            assert index["placements"] == {"live": True, "pending": 0, "dropped": 0}
    logs = caplog.text
    assert redis_server.password is not None and redis_server.password not in logs


async def _up(client: httpx.AsyncClient) -> bool:
    return await _metric(client, "kvroute_placements_up") == 1


async def _agree(a: Any, b: Any, body: dict[str, Any]) -> bool:
    held = _held(a, body)
    return bool(held) and _held(b, body) == held


async def test_a_message_for_an_endpoint_not_served_here_is_not_indexed(
    redis_server: RedisServer,
) -> None:
    async with simulator() as (s0, _), simulator() as (s1, _):
        app = build_app(_config([s0, s1], redis_server.url))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            await eventually(lambda: _up(c))
            await c.get("/v1/models")  # the route exists from the config
            hashes = array("Q", [11, 12, 13])
            redis = Redis.from_url(redis_server.url)
            try:
                await redis.publish(
                    "kvroute:placements",
                    encode(
                        "other",
                        time.time(),
                        "tiny",
                        [Placement("e9", hashes), Placement("e1", hashes)],
                    ),
                )
                await redis.publish("kvroute:placements", b"\xc1 not a message")
                await redis.publish(
                    "kvroute:placements",
                    encode("other", time.time(), "unknown", [Placement("e1", hashes)]),
                )
            finally:
                await redis.aclose()

            async def counted() -> bool:
                text = (await c.get("/metrics")).text
                return 'kvroute_placements_received_total{result="unknown_model"} 1.0' in text

            await eventually(counted)
            text = (await c.get("/metrics")).text
            assert 'kvroute_placements_received_total{result="applied"} 1.0' in text
            assert 'kvroute_placements_received_total{result="unknown_endpoint"} 1.0' in text
            assert 'kvroute_placements_received_total{result="invalid"} 1.0' in text
            policy = app.state.routes.resolve("tiny").policy
            assert isinstance(policy, PrefixAffinity)
            assert policy.index.match(list(hashes), ["e0", "e1", "e9"]) == {"e1": 3}


async def test_with_redis_gone_the_router_routes_as_one_that_shares_nothing(
    redis_server: RedisServer,
) -> None:
    async with simulator() as (s0, _), simulator() as (s1, _):
        app = build_app(_config([s0, s1], redis_server.url, timeout=0.2))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            await eventually(lambda: _up(c))
            policy = app.state.routes.resolve("tiny").policy
            assert isinstance(policy, PrefixAffinity) and policy.placements is not None
            assert policy.placements.live
            await redis_server.stop()

            async def down() -> bool:
                return await _metric(c, "kvroute_placements_up") == 0

            await eventually(down)
            assert not policy.placements.live
            # Requests still route (placements fail to publish, are counted, dropped).
            body = {
                "model": "tiny",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "x"}],
            }
            assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
            await redis_server.start()
            await eventually(lambda: _up(c))
            assert policy.placements.live
            assert (await c.post("/v1/chat/completions", json=body)).status_code == 200


async def test_a_reload_that_turns_sharing_off_detaches_the_policies(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    import yaml

    async with simulator() as (s0, _):
        raw: dict[str, Any] = {
            "endpoints": [{"id": "e0", "url": s0, "kind": "vllm", "models": ["tiny"]}],
            "models": {"tiny": {"policy": "prefix_affinity"}},
            "placements": {"redis": redis_server.url},
            "admin": {"open": True},
            "server": {"access_log": False},
        }
        path = tmp_path / "kvroute.yaml"
        path.write_text(yaml.safe_dump(raw))
        from router.config import load_config

        app = build_app(load_config(str(path)), config_path=str(path))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            await eventually(lambda: _up(c))
            policy = app.state.routes.resolve("tiny").policy
            assert isinstance(policy, PrefixAffinity) and policy.placements is not None
            # A reload that replaces the policy: the new one shares at once.
            raw["models"] = {"tiny": {"policy": {"name": "prefix_affinity", "ring_choices": 2}}}
            path.write_text(yaml.safe_dump(raw))
            assert (await c.post("/admin/reload")).json()["result"] == "success"
            replaced = app.state.routes.resolve("tiny").policy
            assert isinstance(replaced, PrefixAffinity) and replaced is not policy
            assert replaced.placements is not None and replaced.placements.live
            policy = replaced
            del raw["placements"]
            path.write_text(yaml.safe_dump(raw))
            assert (await c.post("/admin/reload")).json()["result"] == "success"
            assert policy.placements is None
            assert "placements" not in (await c.get("/admin/prefix-index")).json()["tiny"]


async def test_one_slow_publish_is_not_an_outage_but_trip_after_in_a_row_are(
    redis_server: RedisServer,
) -> None:
    """A publish that times out (Redis hung, or this router's loop busy) is
    counted and its placements dropped; the link stays live until
    ``trip_after`` fail in a row, and comes back with the next that succeeds."""
    async with simulator() as (s0, _), simulator() as (s1, _):
        app = build_app(_config([s0, s1], redis_server.url, timeout=0.2, trip_after=2))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            await eventually(lambda: _up(c))
            policy = app.state.routes.resolve("tiny").policy
            assert isinstance(policy, PrefixAffinity) and policy.placements is not None

            async def ask(n: int) -> None:
                body = {
                    "model": "tiny",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": f"q{n}"}],
                }
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200

            async def failed(n: int) -> bool:
                text = (await c.get("/metrics")).text
                line = f'kvroute_placements_dropped_total{{reason="publish_failed"}} {n}.0'
                return line in text

            redis_server.pause()
            try:
                await ask(0)
                await eventually(lambda: failed(1))
                assert policy.placements.live  # one failure: still live
                await ask(1)
                await eventually(lambda: failed(2))
                assert not policy.placements.live
                assert await _metric(c, "kvroute_placements_up") == 0
            finally:
                redis_server.resume()
            await ask(2)
            await eventually(lambda: _up(c))
            assert policy.placements.live
