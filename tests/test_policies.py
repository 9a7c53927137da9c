from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from policies import EndpointView, RequestView, build_policy, known_policies

REQ = RequestView(model="m", endpoint="chat", body={"model": "m"})


def views(*loads: int, waiting: tuple[float | None, ...] = ()) -> list[EndpointView]:
    return [
        EndpointView(
            id=f"e{i}",
            url=f"http://e{i}",
            kind="vllm",
            in_flight=load,
            waiting=waiting[i] if i < len(waiting) else None,
        )
        for i, load in enumerate(loads)
    ]


def ids(decision_ranked: Sequence[EndpointView]) -> list[str]:
    return [e.id for e in decision_ranked]


def test_known_policies() -> None:
    assert known_policies() == [
        "composite",
        "consistent_hash",
        "least_latency",
        "least_load",
        "power_of_two",
        "prefix_affinity",
        "random",
        "round_robin",
        "session_affinity",
        "weighted",
        "weighted_round_robin",
    ]


def test_round_robin_rotates_and_ranks_the_rest_as_failover() -> None:
    policy = build_policy("round_robin", {}, random.Random(1))
    cands = views(0, 0, 0)
    order = [ids(policy.rank(REQ, cands).ranked) for _ in range(4)]
    assert order == [
        ["e0", "e1", "e2"],
        ["e1", "e2", "e0"],
        ["e2", "e0", "e1"],
        ["e0", "e1", "e2"],
    ]
    assert policy.rank(REQ, cands).reason == "round_robin"


def test_round_robin_survives_a_shrinking_candidate_list() -> None:
    policy = build_policy("round_robin", {}, random.Random(1))
    policy.rank(REQ, views(0, 0, 0))
    policy.rank(REQ, views(0, 0, 0))
    assert ids(policy.rank(REQ, views(0, 0)).ranked) == ["e0", "e1"]


def test_least_load_orders_by_in_flight() -> None:
    policy = build_policy("least_load", {}, random.Random(1))
    decision = policy.rank(REQ, views(5, 1, 3))
    assert ids(decision.ranked) == ["e1", "e2", "e0"]
    assert decision.reason == "least_load"


def test_least_load_counts_the_scraped_queue_and_weight() -> None:
    policy = build_policy("least_load", {}, random.Random(1))
    # e0: 1 in flight + 6 queued elsewhere; e1: 3 in flight.
    assert ids(policy.rank(REQ, views(1, 3, waiting=(6.0, None))).ranked) == ["e1", "e0"]
    heavy = EndpointView(id="big", url="u", kind="vllm", weight=4.0, in_flight=4)
    light = EndpointView(id="small", url="u", kind="vllm", weight=1.0, in_flight=2)
    assert ids(policy.rank(REQ, [light, heavy]).ranked) == ["big", "small"]


def test_least_load_breaks_ties_with_the_seeded_rng_exactly() -> None:
    firsts = []
    policy = build_policy("least_load", {}, random.Random(42))
    for _ in range(6):
        firsts.append(policy.rank(REQ, views(0, 0, 0, 0)).ranked[0].id)
    again = build_policy("least_load", {}, random.Random(42))
    assert firsts == [again.rank(REQ, views(0, 0, 0, 0)).ranked[0].id for _ in range(6)]
    assert firsts == ["e2", "e3", "e1", "e1", "e1", "e1"]


def test_unknown_parameters_fail() -> None:
    with pytest.raises(ValueError):
        build_policy("least_load", {"nope": 1}, random.Random(0))


def test_power_of_two_picks_the_less_loaded_of_two_random() -> None:
    policy = build_policy("power_of_two", {}, random.Random(3))
    cands = views(9, 0, 5, 7)
    firsts = [policy.rank(REQ, cands).ranked[0].id for _ in range(8)]
    again = build_policy("power_of_two", {}, random.Random(3))
    assert firsts == [again.rank(REQ, cands).ranked[0].id for _ in range(8)]
    # e0 (load 9) is never first: whatever it is paired with is less loaded.
    assert "e0" not in firsts
    assert ids(policy.rank(REQ, views(4)).ranked) == ["e0"]


def test_random_and_weighted_presets_are_seeded() -> None:
    heavy = [
        EndpointView(id="a", url="u", kind="vllm", weight=9.0),
        EndpointView(id="b", url="u", kind="vllm", weight=1.0),
    ]
    policy = build_policy("weighted", {}, random.Random(5))
    firsts = [policy.rank(REQ, heavy).ranked[0].id for _ in range(200)]
    assert firsts.count("a") == 179  # ~90%, exactly reproducible
    rnd = build_policy("random", {}, random.Random(5))
    picks = [rnd.rank(REQ, views(0, 0, 0)).ranked[0].id for _ in range(300)]
    assert (picks.count("e0"), picks.count("e1"), picks.count("e2")) == (98, 92, 110)


def test_load_counts_own_requests_now_and_others_from_the_last_scrape() -> None:
    from policies.base import EndpointView, load_of

    def view(in_flight: int, running: float | None, at_scrape: int | None) -> EndpointView:
        return EndpointView(
            "e",
            "http://e",
            "vllm",
            in_flight=in_flight,
            running=running,
            waiting=0.0 if running is not None else None,
            in_flight_at_scrape=at_scrape,
        )

    # all of the scraped load was ours: not counted twice, and our sends since count
    assert load_of(view(12, 8.0, 8)) == 12.0
    # we finished 6 since the scrape; 2 of the 10 seen were another router's
    assert load_of(view(2, 10.0, 8)) == 4.0
    # no scrape yet, or one without a record of our own share
    assert load_of(view(3, None, None)) == 3.0
    assert load_of(view(3, 10.0, None)) == 10.0


def test_a_ranking_orders_the_rest_only_when_asked() -> None:
    from policies.base import Ranking

    a, b, c = views(0, 1, 2)
    calls = []

    def rest() -> list[EndpointView]:
        calls.append(1)
        return [c, b]

    ranking = Ranking(a, rest)
    assert ranking[0] is a and next(iter(ranking)) is a
    assert calls == []  # the first attempt needs no failover order
    assert list(ranking) == [a, c, b] and ranking[1:] == (c, b) and len(ranking) == 3
    assert ranking == (a, c, b) and ranking[-1] is b
    assert calls == [1]  # computed once


def test_prefix_affinity_failover_order_is_holders_then_load() -> None:
    policy = build_policy("prefix_affinity", {"min_overload": 100}, random.Random(0))
    cands = views(3, 0, 2, 1)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    req = RequestView("m", "chat", body)
    home = policy.rank(req, cands).ranked[0].id
    decision = policy.rank(req, cands)
    assert decision.ranked[0].id == home and decision.reason == "prefix_hit"
    rest = [e for e in cands if e.id != home]
    assert ids(decision.ranked[1:]) == [e.id for e in sorted(rest, key=lambda e: e.in_flight)]


def test_the_ring_cache_follows_the_candidates_set_and_weights() -> None:
    from policies.ring import HashRing, RingCache

    cache = RingCache(vnodes=20)
    a, b, c = views(0, 0, 0)
    heavy = EndpointView(id="e2", url="http://e2", kind="vllm", weight=3.0)

    def owners(ring: HashRing) -> list[str]:
        return [next(ring.walk(k)) for k in range(0, 1 << 64, 1 << 58)]

    abc = cache.ring([a, b, c])
    assert cache.ring([a, b, c]) is abc  # the same fleet: the same ring
    assert owners(cache.ring([c, b, a])) == owners(abc)  # in another order, the same ring
    ab = cache.ring([a, b])
    assert set(owners(ab)) == {"e0", "e1"}
    assert owners(cache.ring([a, b, c])) == owners(abc)
    weighted = cache.ring([a, b, heavy])  # same ids, another weight: another ring
    assert weighted is not abc
    assert owners(weighted).count("e2") > owners(abc).count("e2")
