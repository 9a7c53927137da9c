from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import EndpointView
from router.config import parse_config
from router.registry import VIEWED, EndpointRegistry, RouteTable

CONFIG = """
seed: 1
default_policy: least_load
endpoints:
  - {id: a, url: "http://a:1", kind: vllm, models: [chat, {name: code, served_name: org/code}]}
  - {id: b, url: "http://b:1", kind: vllm, models: [chat], weight: 2, labels: {zone: z1}}
  - {id: c, url: "http://c:1", kind: openai, models: [extra], api_key: sk-1}
models:
  chat: {policy: round_robin, aliases: [gpt-4o-mini]}
  ghost: {policy: round_robin}
"""


def build() -> tuple[EndpointRegistry, RouteTable]:
    config = parse_config(CONFIG, {})
    registry = EndpointRegistry(config.endpoints)
    return registry, RouteTable(config, registry)


def test_models_index_and_served_names() -> None:
    registry, _ = build()
    assert registry.models() == ["chat", "code", "extra"]
    assert [e.id for e in registry.serving("chat")] == ["a", "b"]
    a = registry.get("a")
    assert a is not None and a.served == {"chat": None, "code": "org/code"}
    c = registry.get("c")
    assert c is not None and c.headers["authorization"] == "Bearer sk-1"
    assert "authorization" not in a.headers


def test_candidates_skip_unhealthy_and_draining() -> None:
    registry, _ = build()
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None
    a.healthy = False
    assert registry.candidates("chat") == [b]
    b.draining = True
    assert registry.candidates("chat") == []
    assert [e.id for e in registry.serving("chat")] == ["a", "b"]


def test_views_are_frozen_snapshots() -> None:
    registry, _ = build()
    b = registry.get("b")
    assert b is not None
    b.in_flight = 3
    view = b.view()
    b.in_flight = 4
    assert (view.in_flight, view.weight, dict(view.labels)) == (3, 2.0, {"zone": "z1"})


def test_a_kept_view_follows_every_change_it_copies() -> None:
    """The view is kept between decisions, and rebuilt after any change a
    policy could see: an attempt's counts, a scrape, new blocks."""
    from policies.blocks import EndpointBlocks

    registry, _ = build()
    b = registry.get("b")
    assert b is not None
    first = b.view()
    assert b.view() is first  # nothing changed: not rebuilt
    b.healthy = False  # not a view field (candidates() filters on it)
    assert b.view() is first
    attempt = b.begin(0.0, stream=True)
    assert (b.view().in_flight, b.view().awaiting_first) == (1, 1)
    attempt.first_byte(0.5)
    assert (b.view().in_flight, b.view().awaiting_first) == (1, 0)
    assert b.view().latency is not None and b.view().latency.ttft == 0.5
    attempt.end()
    assert b.view().in_flight == 0
    b.running, b.waiting, b.in_flight_at_scrape = 5.0, 2.0, 0
    b.kv_usage, b.kv_capacity_tokens = 0.5, 1000
    seen = b.view()
    assert (seen.running, seen.waiting, seen.in_flight_at_scrape) == (5.0, 2.0, 0)
    assert (seen.kv_usage, seen.kv_capacity_tokens) == (0.5, 1000)
    blocks = EndpointBlocks("b", 100)
    b.blocks = blocks
    assert b.view().blocks is blocks
    assert {"in_flight", "running", "blocks", "latency"} <= VIEWED


def test_upsert_keeps_live_state_and_remove_unindexes() -> None:
    config = parse_config(CONFIG, {})
    registry = EndpointRegistry(config.endpoints)
    a = registry.get("a")
    assert a is not None
    a.healthy, a.in_flight = False, 2
    moved = config.endpoints[0].model_copy(update={"url": "http://a2:1"})
    new = registry.upsert(moved)
    assert (new.url, new.healthy, new.in_flight) == ("http://a2:1", False, 2)
    assert [e.id for e in registry.serving("chat")] == ["b", "a"]
    registry.remove("a")
    assert registry.models() == ["chat", "extra"]
    assert registry.get("a") is None


def test_routes_resolve_names_aliases_and_defaults() -> None:
    _, routes = build()
    chat = routes.resolve("chat")
    assert chat is not None and routes.resolve("gpt-4o-mini") is chat
    assert chat.policy_name == "round_robin"
    code = routes.resolve("code")  # served by an endpoint, not listed: default policy
    assert code is not None and code.policy_name == "least_load"
    assert routes.resolve("code") is code  # built once
    assert routes.resolve("nope") is None
    # Listed in models, but nobody serves it: resolvable, and then 503 (no candidates).
    assert routes.resolve("ghost") is not None
    assert routes.public_models() == ["chat", "code", "extra", "gpt-4o-mini"]


def test_an_attempt_holds_in_flight_and_awaiting_first_until_released_once() -> None:
    registry, _ = build()
    (endpoint, *_) = registry.serving("chat")
    first = endpoint.begin(0.0)
    second = endpoint.begin(0.0)
    assert (endpoint.in_flight, endpoint.awaiting_first) == (2, 2)
    first.first_byte()
    first.first_byte()  # once only
    assert (endpoint.in_flight, endpoint.awaiting_first) == (2, 1)
    assert endpoint.view().awaiting_first == 1
    first.end()
    second.end()  # ended before its first byte (a failure, a cancel)
    second.end()
    assert (endpoint.in_flight, endpoint.awaiting_first) == (0, 0)


def _seen(view: EndpointView) -> tuple[object, ...]:
    """What a policy reads of a view, latency by its values."""
    lat = view.latency
    latency = (
        None
        if lat is None
        else (lat.ttft, lat.tpot, lat.duration, *(lat.samples(q) for q in QUANTITIES))
    )
    fields = [f.name for f in dataclasses.fields(EndpointView) if f.name != "latency"]
    return (*(getattr(view, name) for name in fields), latency)


QUANTITIES: tuple[Literal["ttft", "tpot", "duration"], ...] = ("ttft", "tpot", "duration")
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.booleans()),
        st.tuples(st.just("first_byte"), st.floats(0.0, 5.0)),
        st.tuples(st.just("answered"), st.integers(0, 300)),
        st.tuples(st.just("end"), st.none()),
        st.tuples(st.just("scrape"), st.floats(0.0, 50.0)),
        st.tuples(st.just("stale_scrape"), st.none()),
        st.tuples(st.just("blocks"), st.booleans()),
        st.tuples(st.just("tick"), st.floats(0.0, 60.0)),
        st.tuples(st.just("health"), st.booleans()),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_a_kept_view_is_what_a_fresh_one_would_be(ops: list[tuple[str, object]]) -> None:
    """After any sequence of attempts, scrapes, block changes and time passing,
    the kept view reads exactly as one built afresh (no field it copies is
    missing from ``VIEWED``)."""
    from policies.blocks import EndpointBlocks

    now = [0.0]
    registry = EndpointRegistry(parse_config(CONFIG, {}).endpoints, clock=lambda: now[0])
    state = registry.get("b")
    assert state is not None
    attempts = []
    for op, arg in ops:
        if op == "begin":
            attempts.append(state.begin(now[0], stream=bool(arg)))
        elif op == "first_byte" and attempts:
            attempts[-1].first_byte(now[0] + float(arg))  # type: ignore[arg-type]
        elif op == "answered" and attempts:
            attempts[-1].answered(now[0] + 1.0, int(arg))  # type: ignore[call-overload]
        elif op == "end" and attempts:
            attempts.pop(0).end()
        elif op == "scrape":
            state.running, state.waiting = float(arg), 1.0  # type: ignore[arg-type]
            state.kv_usage, state.in_flight_at_scrape = 0.5, state.in_flight
        elif op == "stale_scrape":
            state.running = state.waiting = state.kv_usage = None
            state.in_flight_at_scrape = None
        elif op == "blocks":
            state.blocks = EndpointBlocks("b", 100) if arg else None
        elif op == "tick":
            now[0] += float(arg)  # type: ignore[arg-type]
        elif op == "health":
            state.healthy = bool(arg)
        assert _seen(state.view()) == _seen(state._build_view())


ADMISSION_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "health",
                "drain",
                "fail_5xx",
                "fail_429",
                "retry_after",
                "succeed",
                "begin",
                "end",
                "scrape",
                "tick",
                "views",
            ]
        ),
        st.sampled_from(["a", "b"]),
        st.floats(0.0, 40.0),
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(ADMISSION_OPS)
def test_cached_candidates_are_those_admitting_now(ops: list[tuple[str, str, float]]) -> None:
    """After any sequence of health changes, drains, failures that open
    circuits or cool endpoints down, successes, attempts, scrapes and time
    passing, the registry's (kept) candidates are exactly the endpoints that
    admit now, and its (kept) views read as fresh views of them."""
    from router.config import CircuitConfig
    from router.errors import UpstreamConnectError, UpstreamHTTPError

    now = [0.0]
    registry = EndpointRegistry(
        parse_config(CONFIG, {}).endpoints,
        circuit=CircuitConfig(failures=2, base_backoff=5.0, max_backoff=20.0),
        clock=lambda: now[0],
    )
    attempts = []
    for op, endpoint_id, x in ops:
        state = registry.get(endpoint_id)
        assert state is not None
        if op == "health":
            state.healthy = x > 20
        elif op == "drain":
            state.draining = x > 20
        elif op == "fail_5xx":
            state.failed(UpstreamConnectError("down"), now[0])
        elif op == "fail_429":
            state.failed(UpstreamHTTPError(429, "slow down"), now[0])
        elif op == "retry_after":
            state.failed(UpstreamHTTPError(503, "busy", retry_after=str(int(x))), now[0])
        elif op == "succeed":
            state.succeeded()
        elif op == "begin":
            attempts.append(state.begin(now[0]))
        elif op == "end" and attempts:
            attempts.pop(0).end()
        elif op == "scrape":
            state.running, state.in_flight_at_scrape = x, state.in_flight
        elif op == "tick":
            now[0] += x
        elif op == "views":
            registry.views("chat")  # kept views drawn, then changed by the next ops
        expected = [s for s in registry.serving("chat") if s.admits(now[0])]
        assert registry.candidates("chat") == expected
        views = registry.views("chat")
        assert [_seen(v) for v in views] == [_seen(s._build_view()) for s in expected]


def test_a_half_open_circuit_is_never_kept_among_the_candidates() -> None:
    """A half-open circuit admits one trial; the trial's start changes that
    without a change of state: the model must not be kept then."""
    from router.config import CircuitConfig
    from router.errors import UpstreamConnectError, UpstreamHTTPError

    now = [0.0]
    registry = EndpointRegistry(
        parse_config(CONFIG, {}).endpoints,
        circuit=CircuitConfig(failures=2, base_backoff=5.0, max_backoff=20.0),
        clock=lambda: now[0],
    )
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None
    a.failed(UpstreamConnectError("down"), now[0])
    a.failed(UpstreamConnectError("down"), now[0])
    now[0] += 6  # past the backoff: a half-open trial is admitted
    a.begin(now[0])
    a.failed(UpstreamHTTPError(429, "slow down"), now[0])  # the trial abandoned
    now[0] += 2  # past the cooldown
    assert registry.candidates("chat") == [a, b]
    a.begin(now[0])  # the trial in flight: no other request may go
    assert registry.candidates("chat") == [b]
    assert [v.id for v in registry.views("chat")] == ["b"]


def test_removed_endpoints_are_not_kept_by_models_never_asked_for() -> None:
    registry, _ = build()
    a = registry.get("a")
    assert a is not None
    config = a.config
    for i in range(5):
        registry.upsert(config.model_copy(update={"weight": 1.0 + i}))
        state = registry.get("a")
        assert state is not None
        state.running = float(i)  # a scrape: the view dropped, marked for redrawing
    stale = registry._admission.stale
    assert len(stale.get("code", set())) <= 1 and len(stale.get("chat", set())) <= 1


TWO_MODELS = """
endpoints:
  - {id: both, url: "http://both:1", kind: openai, models: [small, big]}
  - {id: small-only, url: "http://small:1", kind: openai, models: [small]}
"""


def test_an_endpoint_serving_two_models_is_timed_per_model() -> None:
    """A big model's seconds on an endpoint that also serves a small one:
    choosing for the small model, least_latency compares the small model's
    own times (0.1 s here against the other endpoint's 0.3 s), not the
    endpoint's mix of both. The endpoint's own estimate (admin, metrics)
    still counts every request."""
    import random

    from policies import RequestView, build_policy

    now = [0.0]
    registry = EndpointRegistry(parse_config(TWO_MODELS, {}).endpoints, clock=lambda: now[0])
    both, small = registry.get("both"), registry.get("small-only")
    assert both is not None and small is not None
    assert set(both.model_latency) == {"small", "big"} and not small.model_latency
    for _ in range(20):
        for state, model, ttft in ((both, "small", 0.1), (both, "big", 2.0), (small, "small", 0.3)):
            attempt = state.begin(now[0], stream=True, model=model)
            attempt.first_byte(now[0] + ttft)
            attempt.end()
        now[0] += 1.0
    views = {v.id: v for v in registry.views("small")}
    assert views["both"].latency is not None and views["small-only"].latency is not None
    assert views["both"].latency.ttft == pytest.approx(0.1)
    assert views["small-only"].latency.ttft == pytest.approx(0.3)
    assert registry.views("big")[0].latency.ttft == pytest.approx(2.0)  # type: ignore[union-attr]
    assert both.latency.view(now[0]).ttft > 0.3  # every request of the endpoint
    policy = build_policy("least_latency", {}, random.Random(0))
    stream = RequestView(model="small", endpoint="chat", body={"model": "small", "stream": True})
    assert policy.rank(stream, registry.views("small")).ranked[0].id == "both"
    # A reload that keeps the models keeps each model's estimate.
    registry.upsert(parse_config(TWO_MODELS, {}).endpoints[0])
    moved = registry.get("both")
    assert moved is not None and moved.model_latency["big"].view(now[0]).ttft == pytest.approx(2.0)
