from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest

from policies import EndpointView, RequestView, build_policy
from router.config import ConfigError, parse_config


def req(headers: dict[str, str] | None = None, **body: Any) -> RequestView:
    return RequestView(
        model="m",
        endpoint="chat",
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
        headers=headers or {},
    )


def fleet(n: int, loads: dict[str, int] | None = None, **kw: Any) -> list[EndpointView]:
    loads = loads or {}
    return [
        EndpointView(id=f"e{i}", url="u", kind="vllm", in_flight=loads.get(f"e{i}", 0), **kw)
        for i in range(n)
    ]


def first(decision: Any) -> str:
    return str(decision.ranked[0].id)


def test_consistent_hash_key_sources() -> None:
    by_header = build_policy("consistent_hash", {"key": "header:X-Session-Id"}, random.Random(0))
    cands = fleet(5)
    a = first(by_header.rank(req({"x-session-id": "s1"}), cands))
    assert all(first(by_header.rank(req({"x-session-id": "s1"}), cands)) == a for _ in range(5))
    spread = {first(by_header.rank(req({"x-session-id": f"s{i}"}), cands)) for i in range(50)}
    assert len(spread) == 5
    d = by_header.rank(req(), fleet(3, loads={"e0": 2, "e1": 0, "e2": 1}))
    assert (d.reason, first(d)) == ("no_key", "e1")

    by_user = build_policy("consistent_hash", {"key": "user"}, random.Random(0))
    assert first(by_user.rank(req(user="ann"), cands)) == first(
        by_user.rank(req(user="ann"), cands)
    )
    by_prefix = build_policy("consistent_hash", {"prefix_chars": 4}, random.Random(0))
    x = by_prefix.rank(req(messages=[{"role": "user", "content": "abcdef"}]), cands)
    y = by_prefix.rank(req(messages=[{"role": "user", "content": "abcxyz"}]), cands)
    assert first(x) == first(y)  # "user\x1fab..." : the first 4 characters agree


def test_consistent_hash_bounded_load_can_be_turned_off() -> None:
    unbounded = build_policy("consistent_hash", {"key": "user", "epsilon": None}, random.Random(0))
    home = first(unbounded.rank(req(user="u"), fleet(3)))
    d = unbounded.rank(req(user="u"), fleet(3, loads={home: 100}))
    assert (first(d), d.reason) == (home, "ring_owner")
    bounded = build_policy("consistent_hash", {"key": "user"}, random.Random(0))
    d = bounded.rank(req(user="u"), fleet(3, loads={home: 100}))
    assert first(d) != home and d.reason == "ring_spill"


def test_bad_key_source_fails_at_config_check() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("models: {m: {policy: {name: consistent_hash, key: cookie}}}", {})
    assert "models.m.policy: bad parameters for policy 'consistent_hash': key:" in str(info.value)


def test_session_affinity_sticks_moves_and_forgets() -> None:
    p = build_policy("session_affinity", {}, random.Random(0))
    h = {"x-session-id": "abc"}
    d = p.rank(req(h), fleet(4))
    home = first(d)
    assert d.reason == "new_session"
    assert (first(p.rank(req(h), fleet(4))), p.rank(req(h), fleet(4)).reason) == (home, "sticky")
    # The sticky endpoint is overloaded: the session moves, and stays moved.
    d = p.rank(req(h), fleet(4, loads={home: 50}))
    moved = first(d)
    assert d.reason == "moved" and moved != home
    assert first(p.rank(req(h), fleet(4))) == moved
    # The sticky endpoint left the candidates (unhealthy): moved again.
    rest = [e for e in fleet(4) if e.id != moved]
    assert first(p.rank(req(h), rest)) != moved
    p.forget(first(p.rank(req(h), fleet(4))))
    assert p.rank(req(h), fleet(4)).reason == "new_session"


def test_session_affinity_keeps_a_hash_per_model_and_key_not_the_clients_key() -> None:
    p = build_policy("session_affinity", {}, random.Random(0))
    h = {"x-session-id": "abc"}
    assert p.rank(req(h), fleet(4)).reason == "new_session"
    other_model = RequestView(model="n", endpoint="chat", body={"model": "n"}, headers=h)
    assert p.rank(other_model, fleet(4)).reason == "new_session"  # not m's session
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):  # 32 KiB session ids, as a header may carry: 6.4 MiB kept before
            p.rank(req({"x-session-id": f"{i:05d}" + "s" * 32_000}), fleet(4))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 200 * 1_000


def test_composite_filters_scorers_and_picker() -> None:
    spec = {
        "filters": [{"name": "label", "key": "zone", "values": ["a"]}, "not_overloaded"],
        "scorers": [{"name": "low_load", "weight": 2}, {"name": "kv_free", "weight": 1}],
        "picker": "max",
    }
    p = build_policy("composite", spec, random.Random(0))
    cands = [
        EndpointView(
            id="a1", url="u", kind="vllm", in_flight=4, kv_usage=0.1, labels={"zone": "a"}
        ),
        EndpointView(
            id="a2", url="u", kind="vllm", in_flight=2, kv_usage=0.9, labels={"zone": "a"}
        ),
        EndpointView(
            id="a3", url="u", kind="vllm", in_flight=2, kv_usage=0.2, labels={"zone": "a"}
        ),
        EndpointView(
            id="b1", url="u", kind="vllm", in_flight=0, kv_usage=0.0, labels={"zone": "b"}
        ),
    ]
    d = p.rank(req(), cands)
    # a3 and a2 tie on load (score 0.5 each from low_load); kv_free separates them.
    assert [e.id for e in d.ranked] == ["a3", "a2", "a1", "b1"]
    assert d.reason == "score"


def test_composite_filter_that_empties_is_skipped() -> None:
    p = build_policy(
        "composite",
        {"filters": [{"name": "label", "key": "zone", "values": ["x"]}], "scorers": ["low_load"]},
        random.Random(0),
    )
    assert first(p.rank(req(), fleet(3, loads={"e0": 3, "e1": 1, "e2": 2}))) == "e1"


def test_composite_prefix_match_scorer_learns() -> None:
    p = build_policy(
        "composite",
        {"scorers": ["prefix_match", {"name": "low_load", "weight": 0.1}]},
        random.Random(0),
    )
    long = [{"role": "system", "content": "x" * 2000}, {"role": "user", "content": "a"}]
    home = first(p.rank(req(messages=long), fleet(4)))
    again = [{"role": "system", "content": "x" * 2000}, {"role": "user", "content": "b"}]
    assert first(p.rank(req(messages=again), fleet(4, loads={home: 1}))) == home


def test_composite_unknown_components_fail_with_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("models: {m: {policy: {name: composite, scorers: [magic]}}}", {})
    (error,) = info.value.errors
    assert error.startswith("models.m.policy: bad parameters for policy 'composite'")
    assert (
        "unknown scorer 'magic' (known: kv_free, low_latency, low_load, precise_prefix,"
        " prefix_match, ring_owner, weight)" in (error)
    )


@pytest.mark.parametrize(
    ("policy", "detail"),
    [
        ("{name: prefix_affinity, block_chars: 8}", "policy 'prefix_affinity': block_chars:"),
        (
            "{name: composite, scorers: [{name: prefix_match, block_chars: 8}]}",
            "scorer 'prefix_match': block_chars:",
        ),
        (
            "{name: composite, scorers: [{name: precise_prefix, block_chars: 8}]}",
            "scorer 'precise_prefix': block_chars:",
        ),
    ],
)
def test_character_index_params_are_validated_alike(policy: str, detail: str) -> None:
    """The three users of the character index share its parameters' model:
    one declaration, one message."""
    with pytest.raises(ConfigError) as info:
        parse_config(f"models: {{m: {{policy: {policy}}}}}", {})
    (error,) = info.value.errors
    assert f"bad parameters for {detail} Input should be greater than or equal to 16" in error
