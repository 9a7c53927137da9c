"""A router's share of the fleet's traffic (policies/share.py): from the
finished-requests counters, which do not race, and over real loopback HTTP
from a simulator's ``vllm:request_success_total`` through two routers."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from policies import EndpointView, RequestView, build_policy
from policies.prefix import PrefixAffinity
from policies.ring import HashRing
from policies.share import MIN_FINISHED, CountedShare, GaugedShare
from router.app import build_app
from router.config import parse_config
from router.registry import EndpointRegistry
from tests.helpers import eventually, router_config, serve_app, simulator

SYSTEM = "You are a support agent for ACME. " * 40


def chat(system: str) -> RequestView:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    return RequestView(model="m", endpoint="chat", body={"model": "m", "messages": messages})


def policy(**params: Any) -> PrefixAffinity:
    p = build_policy("prefix_affinity", params, random.Random(0))
    assert isinstance(p, PrefixAffinity)
    return p


def counted(
    n: int, finished: list[float], completed: list[int], in_flight: int = 0, running: float = 0.0
) -> list[EndpointView]:
    """``n`` endpoints as of a scrape: the engines' finished counters and this
    router's answered requests; gauges that say whatever ``in_flight`` and
    ``running`` say (here: a share of 1, whatever the counters)."""
    return [
        EndpointView(
            id=f"e{i}",
            url=f"http://e{i}",
            kind="vllm",
            in_flight=in_flight,
            running=running,
            waiting=0.0,
            in_flight_at_scrape=in_flight,
            finished=finished[i],
            completed_at_scrape=completed[i],
        )
        for i in range(n)
    ]


def test_two_routers_read_their_true_share_through_racing_scrapes() -> None:
    """Each scrape reads the engine's counter a little before this router's
    own count (requests just finished are counted by one and not yet the
    other, or the other way): deltas move to the next interval, the sum over
    the window keeps no bias. Two routers each sending half settle at a half,
    and a third of the traffic at a third, where the gauges (a router holding
    its requests longer than the engine counts them) read more."""
    rng = random.Random(3)
    shares = {"half": (CountedShare(256), 2), "third": (CountedShare(256), 3)}
    for est, routers in shares.values():
        engine = [0.0] * 4
        ours = [0] * 4
        seen = [0] * 4
        for _ in range(400):
            for e in range(4):
                done = rng.randint(0, 6)
                mine = sum(rng.random() < 1 / routers for _ in range(done))
                engine[e] += done
                ours[e] += mine
                # The router's own count races: up to 2 of its requests the
                # engine finished are not yet answered when the scrape comes back.
                seen[e] = max(seen[e], ours[e] - rng.randint(0, 2))
            est.learn(counted(4, engine, seen, in_flight=3, running=3.0))
    assert shares["half"][0].share == pytest.approx(0.5, abs=0.06)
    assert shares["third"][0].share == pytest.approx(1 / 3, abs=0.06)


def test_a_router_alone_counts_a_share_of_one_and_follows_a_second_router() -> None:
    est = CountedShare(64)
    engine, ours = [0.0, 0.0], [0, 0]
    est.learn(counted(2, engine, ours))
    for _ in range(10):
        engine = [f + 3 for f in engine]
        ours = [c + 3 for c in ours]
        est.learn(counted(2, engine, ours))
    assert est.share == 1.0
    # A second router starts sending half the traffic: the window forgets
    # the router's time alone.
    for _ in range(60):
        engine = [f + 4 for f in engine]
        ours = [c + 2 for c in ours]
        est.learn(counted(2, engine, ours))
    assert est.share == pytest.approx(0.5, abs=0.02)


def test_the_counted_share_waits_for_enough_finished_requests() -> None:
    est = CountedShare(256)
    est.learn(counted(1, [0.0], [0]))
    est.learn(counted(1, [MIN_FINISHED - 1], [1]))
    assert est.share is None
    est.learn(counted(1, [MIN_FINISHED + 1], [2]))
    assert est.share == pytest.approx(2 / (MIN_FINISHED + 1))


def test_a_restarted_engine_and_a_forgotten_endpoint_add_no_false_delta() -> None:
    est = CountedShare(256)
    est.learn(counted(1, [100.0], [50]))
    est.learn(counted(1, [140.0], [70]))
    # The engine restarted: its counter went back to 3; no delta from that.
    est.learn(counted(1, [3.0], [71]))
    est.learn(counted(1, [43.0], [91]))
    assert est.share == pytest.approx(0.5)
    # Forgotten (removed from the fleet), then back: its counts start over.
    est.forget("e0")
    est.learn(counted(1, [1000.0], [92]))
    assert est.share == pytest.approx(0.5)


def test_prefix_affinity_routes_on_the_counted_share_over_the_gauges() -> None:
    """Gauges saying the router holds every request (share 1) and counters
    saying it sent half: the counters win, so the index is sized by a half
    and the shared rules apply; with no counters the gauges still decide."""
    p, gauged = policy(), policy()
    e = EndpointView(id="x", url="http://x", kind="vllm")
    full = p.capacity_blocks(e)
    engine, ours = [0.0] * 4, [0] * 4
    for i in range(20):
        views = counted(4, engine, ours, in_flight=2, running=2.0)
        p.rank(chat(f"t {i}: " + SYSTEM), views)
        gauged.rank(
            chat(f"t {i}: " + SYSTEM),
            [replace(v, finished=None, completed_at_scrape=None) for v in views],
        )
        engine = [f + 4 for f in engine]
        ours = [c + 2 for c in ours]
    assert p.share == pytest.approx(0.5)
    assert p.capacity_blocks(e) == full // 2
    assert gauged.share == 1.0
    d = p.rank(chat("new tenant: " + SYSTEM), counted(4, engine, ours, in_flight=2, running=2.0))
    assert d.reason == "ring_owner"  # shared placement: the ring's first within bound


async def test_two_routers_over_http_each_count_half_of_a_simulators_requests() -> None:
    """Two kvroute apps over one simulator (its vLLM face publishes
    ``vllm:request_success_total``), requests sent to each in turn: each
    router's scrape carries the engine's counter and its own answered count,
    and each policy reads a share of a half. A router alone reads 1."""
    fast = {"scrape": {"interval": 0.05}, "health": {"enabled": False}}

    async with AsyncExitStack() as stack:
        url, _ = await stack.enter_async_context(simulator())
        apps = []
        for k in range(3):
            cfg = router_config(
                [{"id": "s", "url": url, "kind": "vllm", "models": ["tiny"]}],
                models={"tiny": {"policy": "prefix_affinity"}},
                seed=3 + k,
                **fast,
            )
            app = build_app(cfg)
            apps.append((await stack.enter_async_context(serve_app(app)), app))
        pair, alone = apps[:2], apps[2]
        c = await stack.enter_async_context(httpx.AsyncClient(timeout=30))

        async def send(to: str, i: int) -> None:
            body: dict[str, Any] = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 2,
            }
            r = await c.post(to + "/v1/chat/completions", json=body)
            r.raise_for_status()

        def scraped(app: Any, finished: float) -> Any:
            async def check() -> bool:
                ep = app.state.registry.get("s")
                return bool(ep.finished == finished and ep.completed_at_scrape == ep.completed)

            return check

        sent = 0
        for _phase in range(2):
            for _request in range(2 * int(MIN_FINISHED)):
                await send(pair[sent % 2][0], sent)
                sent += 1
            for _, app in pair:
                await eventually(scraped(app, float(sent)))
            await send(pair[0][0], sent)  # each policy reads the scrape
            await send(pair[1][0], sent + 1)
            sent += 2
        for _, app in pair:
            ep = app.state.registry.get("s")
            assert ep.completed == sent // 2
            share = app.state.routes.routes()[0].policy.share
            assert share == pytest.approx(0.5, abs=0.03)
        # The pair's last requests are in the lone router's first reading.
        await eventually(scraped(alone[1], float(sent)))
        for i in range(2 * int(MIN_FINISHED)):
            await send(alone[0], sent + i)
        base = sent
        sent += 2 * int(MIN_FINISHED)
        await eventually(scraped(alone[1], float(sent)))
        ep = alone[1].state.registry.get("s")
        assert ep.view().finished == sent and ep.view().completed_at_scrape == sent - base
        await send(alone[0], sent)
        await eventually(scraped(alone[1], float(sent + 1)))
        await send(alone[0], sent + 1)
        # Its first reading (the pair's requests) is only a baseline.
        assert alone[1].state.routes.routes()[0].policy.share == 1.0


def test_a_router_places_as_the_others_do_until_it_has_measured_its_share() -> None:
    """With ``unmeasured_share`` below ``shared_below``: before a scrape has
    shown any of its requests, a router cannot tell it is alone, so it places
    a new prefix at the ring's first endpoint within the bound (as every
    router does), not by its own awaiting counts, and keeps its index at
    full size. Once a scrape shows it holds everything the engines hold, it
    ranks the ring choices by its counts again. With no scraped load at all
    (nothing to measure by) it counts as alone; so does the default."""
    p = policy(unmeasured_share=0.5)
    req = chat("new tenant: " + SYSTEM)
    ring = HashRing(sorted((f"e{i}", 1.0) for i in range(4)), p.params.vnodes)
    owner, *_ = ring.walk(p.hashes(req)[0][0])
    e = EndpointView(id="x", url="http://x", kind="vllm")
    full = p.capacity_blocks(e)

    def views(ours: int, total: float, busy_owner: int) -> list[EndpointView]:
        return [
            EndpointView(
                id=f"e{i}",
                url=f"http://e{i}",
                kind="vllm",
                in_flight=ours + (busy_owner if f"e{i}" == owner else 0),
                awaiting_first=busy_owner if f"e{i}" == owner else 0,
                running=total,
                waiting=0.0,
                in_flight_at_scrape=ours,
            )
            for i in range(4)
        ]

    d = p.rank(req, views(0, 0.0, busy_owner=1))
    assert (d.ranked[0].id, d.reason) == (owner, "ring_owner")
    assert not p.measured and p.capacity_blocks(e) == full
    alone = policy(unmeasured_share=0.5)
    alone.rank(chat("t: " + SYSTEM), views(1, 1.0, busy_owner=0))  # it holds all there is
    assert alone.measured and alone.share == 1.0
    d = alone.rank(req, views(1, 1.0, busy_owner=1))
    assert d.ranked[0].id != owner and d.reason == "ring_less_loaded"
    unscraped = policy(unmeasured_share=0.5)
    d = unscraped.rank(
        req,
        [
            replace(v, running=None, waiting=None, in_flight_at_scrape=None)
            for v in views(0, 0.0, busy_owner=1)
        ],
    )
    assert unscraped.share == 1.0 and d.reason == "ring_less_loaded"
    # The default assumes a router alone until it measures otherwise.
    d = policy().rank(req, views(0, 0.0, busy_owner=1))
    assert d.reason == "ring_less_loaded"


SHARE_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["decide", "decide", "decide", "scrape", "gauge_scrape", "quiet", "expire", "drop"]
        ),
        st.integers(0, 3),
        st.integers(0, 6),
    ),
    min_size=8,
    max_size=60,
)
#: Scrapes between decisions, with and without the counter: a policy that
#: missed one of them would hold another share (checked to fail so).
SCRAPES_BETWEEN_DECISIONS = [
    ("decide", 0, 1),
    ("quiet", 3, 2),
    ("decide", 1, 2),
    ("decide", 2, 3),
    ("gauge_scrape", 0, 3),
    ("gauge_scrape", 1, 3),
    ("decide", 0, 1),
    ("decide", 0, 1),
    ("scrape", 2, 3),
    ("decide", 0, 2),
    ("expire", 0, 0),
    ("decide", 0, 2),
]


@settings(max_examples=150, deadline=None)
@given(ops=SHARE_OPS, counters=st.booleans())
@example(ops=SCRAPES_BETWEEN_DECISIONS, counters=False)
@example(ops=SCRAPES_BETWEEN_DECISIONS, counters=True)
@example(
    ops=[("quiet", 3, 2), ("decide", 0, 1), ("expire", 3, 0), ("decide", 0, 1)], counters=False
)
def test_the_share_is_learned_again_only_when_a_scrape_lands(
    ops: list[tuple[str, int, int]], counters: bool
) -> None:
    """Router-built views carry ``scrape_version``, and a policy reads the
    scraped fields again only when it moved; hand-made views (version -1) are
    read at every decision. Over any sequence of scrapes (with and without
    the finished counter), expiries, endpoints leaving and decisions, both
    policies hold the same share and decide the same: nothing the skipped
    reads would have learned is lost."""
    config = "endpoints:\n" + "".join(
        f"  - {{id: e{i}, url: 'http://e{i}:8000', kind: vllm, models: [m]}}\n" for i in range(4)
    )
    registry = EndpointRegistry(parse_config(config, {}).endpoints)
    params = {"share_counters": counters, "unmeasured_share": 0.5}
    kept, read = policy(**params), policy(**params)
    # The estimators fed at every decision, as before the version was kept.
    oracle_counted, oracle_gauged = CountedShare(256), GaugedShare()
    finished = [0.0] * 4
    for k, (op, i, n) in enumerate(ops):
        state = registry.get(f"e{i}")
        if state is None:
            continue
        if op == "decide":
            views = registry.views("m")
            request = chat(f"tenant {n}: " + SYSTEM)
            a = kept.rank(request, views)
            b = read.rank(request, [replace(v, scrape_version=-1) for v in views])
            assert (a.ranked[0].id, a.reason) == (b.ranked[0].id, b.reason)
            assert (kept.share, kept.measured) == (read.share, read.measured)
            share = None
            if counters:
                oracle_counted.learn(views)
                share = oracle_counted.share
            if share is None:
                oracle_gauged.learn(views)
                share = oracle_gauged.share
            if share is None:
                scraped = any(v.in_flight_at_scrape is not None for v in views)
                share = 0.5 if scraped else 1.0
            assert kept.share == share
            state = registry.get(a.ranked[0].id)
            assert state is not None
            state.in_flight += 1
            if n % 2:
                state.in_flight -= 1
                state.completed += 1
        elif op in ("scrape", "gauge_scrape"):
            finished[i] += n
            # This router's requests at the scrape (one more than now: some
            # just ended), and other routers' too: the engine runs more.
            state.in_flight_at_scrape = state.in_flight + 1
            state.running, state.waiting = float(state.in_flight + 1 + n), 1.0
            if op == "scrape":
                state.finished, state.completed_at_scrape = finished[i], state.completed
            else:
                state.finished = state.completed_at_scrape = None
        elif op == "quiet":  # none of this router's requests at the scrape
            state.in_flight_at_scrape = 0
            state.running, state.waiting = float(n), 0.0
        elif op == "expire":
            state.running = state.waiting = state.kv_usage = None
            state.in_flight_at_scrape = None
        elif op == "drop" and k % 5 == 0:
            registry.remove(f"e{i}")
