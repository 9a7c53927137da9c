"""nginx's smooth weighted round robin (policies/simple.py WeightedRoundRobin)."""

from __future__ import annotations

import random

from policies import EndpointView, RequestView, build_policy
from policies.simple import WeightedRoundRobin

REQ = RequestView(model="m", endpoint="chat", body={"model": "m"})


def fleet(**weights: float) -> list[EndpointView]:
    return [
        EndpointView(id=k, url=f"http://{k}", kind="vllm", weight=w) for k, w in weights.items()
    ]


def picks(policy_fleet: list[EndpointView], n: int, seed: int = 1) -> str:
    policy = build_policy("weighted_round_robin", {}, random.Random(seed))
    return "".join(policy.rank(REQ, policy_fleet).ranked[0].id for _ in range(n))


def test_nginx_sequence_for_5_1_1() -> None:
    assert picks(fleet(a=5, b=1, c=1), 7) == "aabacaa"
    assert picks(fleet(a=5, b=1, c=1), 21) == "aabacaa" * 3


def test_weights_are_respected_exactly_over_a_cycle_and_the_rng_plays_no_part() -> None:
    seq = picks(fleet(a=3, b=2, c=1.5, d=0.5), 14, seed=1)
    assert (seq.count("a"), seq.count("b"), seq.count("c"), seq.count("d")) == (6, 4, 3, 1)
    assert picks(fleet(a=3, b=2, c=1.5, d=0.5), 14, seed=99) == seq


def test_failover_order_is_the_rest_by_current_value() -> None:
    policy = build_policy("weighted_round_robin", {}, random.Random(1))
    ranked = policy.rank(REQ, fleet(a=5, b=1, c=1)).ranked
    # a: 5 -> picked; b and c at 1 each, listed order on a tie.
    assert [e.id for e in ranked] == ["a", "b", "c"]
    ranked = policy.rank(REQ, fleet(a=5, b=1, c=1)).ranked
    # a: -2 + 5 = 3, b: 2, c: 2
    assert [e.id for e in ranked] == ["a", "b", "c"]
    ranked = policy.rank(REQ, fleet(a=5, b=1, c=1)).ranked
    # a: -4 + 5 = 1, b: 3, c: 3
    assert [e.id for e in ranked] == ["b", "c", "a"]
    assert policy.rank(REQ, fleet(a=1)).reason == "weighted_round_robin"


def test_candidates_that_leave_and_come_back() -> None:
    policy = build_policy("weighted_round_robin", {}, random.Random(1))
    full, without_b = fleet(a=2, b=1), fleet(a=2)
    first = [policy.rank(REQ, full).ranked[0].id for _ in range(3)]
    assert first == ["a", "b", "a"]
    # b is down: a alone, b's standing is kept, not grown.
    assert [policy.rank(REQ, without_b).ranked[0].id for _ in range(4)] == ["a"] * 4
    # b is back: the 2:1 interleave resumes with no burst of catching up.
    seq = "".join(policy.rank(REQ, full).ranked[0].id for _ in range(6))
    assert (seq.count("a"), seq.count("b")) == (4, 2)
    assert "bb" not in seq
    # A newcomer starts from zero; a removed endpoint is forgotten.
    seq = "".join(policy.rank(REQ, fleet(a=2, b=1, c=1)).ranked[0].id for _ in range(8))
    assert (seq.count("a"), seq.count("b"), seq.count("c")) == (4, 2, 2)
    policy.forget("c")
    assert isinstance(policy, WeightedRoundRobin)
    assert "c" not in policy._current
