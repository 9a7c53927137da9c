"""least_latency and the low_latency scorer (policies/latency.py): seeded, exact."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from policies import EndpointView, RequestView, build_policy
from policies.latency import expected
from router.latency import LatencySnapshot

STREAM = RequestView(model="m", endpoint="chat", body={"model": "m", "stream": True})
WHOLE = RequestView(model="m", endpoint="chat", body={"model": "m"})


def ep(
    name: str,
    ttft: float | None = None,
    samples: float = 10.0,
    duration: float | None = None,
    in_flight: int = 0,
    weight: float = 1.0,
) -> EndpointView:
    latency = None
    if ttft is not None or duration is not None:
        latency = LatencySnapshot(
            ttft=ttft,
            duration=duration,
            ttft_samples=samples if ttft is not None else 0.0,
            duration_samples=samples if duration is not None else 0.0,
        )
    return EndpointView(
        id=name,
        url=f"http://{name}",
        kind="vllm",
        in_flight=in_flight,
        weight=weight,
        latency=latency,
    )


def ids(ranked: Sequence[EndpointView]) -> list[str]:
    return [e.id for e in ranked]


def fill(params: dict[str, float], fleet: list[EndpointView], requests: int) -> Counter[str]:
    """``requests`` arrive together (none finishes): where each goes, as the
    in-flight counts the router keeps grow with its own choices."""
    policy = build_policy("least_latency", params, random.Random(3))
    by_id = {e.id: e for e in fleet}
    sent: Counter[str] = Counter()
    for _ in range(requests):
        first = policy.rank(STREAM, list(by_id.values())).ranked[0]
        sent[first.id] += 1
        by_id[first.id] = dataclasses.replace(first, in_flight=first.in_flight + 1)
    return sent


def test_the_fastest_idle_endpoint_goes_first_the_rest_by_expected_latency() -> None:
    policy = build_policy("least_latency", {}, random.Random(1))
    fleet = [ep("slow", 0.9), ep("fast", 0.1), ep("mid", 0.4)]
    decision = policy.rank(STREAM, fleet)
    assert ids(decision.ranked) == ["fast", "mid", "slow"]
    assert decision.reason == "latency"


def test_streams_rank_by_ttft_whole_answers_by_duration() -> None:
    policy = build_policy("least_latency", {}, random.Random(1))
    # a: quick to start, slow to finish (a loaded prefill-light, decode-heavy box).
    fleet = [ep("a", ttft=0.1, duration=9.0), ep("b", ttft=0.5, duration=3.0)]
    assert ids(policy.rank(STREAM, fleet).ranked) == ["a", "b"]
    assert ids(policy.rank(WHOLE, fleet).ranked) == ["b", "a"]


def test_load_spreads_requests_instead_of_herding_onto_the_fastest() -> None:
    fleet = [ep("fast", 0.2, samples=1e9), ep("slow", 0.5, samples=1e9)]
    # Expected latency doubles at 4 in flight (slots): fast costs 0.2 x (1 + n/4),
    # slow 0.5 x (1 + m/4): fast takes the first 6, then about 2.5 for each of slow.
    assert fill({}, fleet, 6) == {"fast": 6}
    assert fill({}, fleet, 20) == {"fast": 16, "slow": 4}
    # By latency alone (a vast slot count), every request herds onto the fastest.
    assert fill({"slots": 1e9}, fleet, 12) == {"fast": 12}


def test_a_heavier_endpoint_takes_more_of_the_load() -> None:
    fleet = [ep("big", 0.2, weight=2.0), ep("small", 0.2)]
    assert fill({}, fleet, 12) == {"big": 8, "small": 4}


def test_a_thin_estimate_is_shrunk_toward_the_fleets_median() -> None:
    fleet = [ep("a", 0.1), ep("b", 0.2), ep("c", 5.0, samples=0.25), ep("new")]
    estimates = expected(fleet, "ttft", prior_samples=1.0)
    assert estimates is not None
    median = 0.2
    assert estimates[:2] == pytest.approx([(10 * 0.1 + median) / 11, (10 * 0.2 + median) / 11])
    assert estimates[2] == pytest.approx((0.25 * 5.0 + median) / 1.25)
    assert estimates[3] == median  # never measured: typical
    assert expected([ep("x"), ep("y")], "ttft", 1.0) is None


def test_one_bad_sample_long_ago_does_not_starve_an_endpoint() -> None:
    policy = build_policy("least_latency", {}, random.Random(1))
    # b was slow once; a has carried the traffic since.
    fresh = [ep("a", 0.1, samples=50), ep("b", 5.0, samples=1.0)]
    assert ids(policy.rank(STREAM, fresh).ranked) == ["a", "b"]
    # Three and a half half-lives later b's lone sample weighs < 0.1: probe it.
    faded = [ep("a", 0.1, samples=50), ep("b", 5.0, samples=0.09)]
    decision = policy.rank(STREAM, faded)
    assert (ids(decision.ranked), decision.reason) == (["b", "a"], "probe")
    # The probe is in flight: the next request does not follow it there.
    probing = [ep("a", 0.1, samples=50), ep("b", 5.0, samples=0.09, in_flight=1)]
    assert ids(policy.rank(STREAM, probing).ranked) == ["a", "b"]
    # Probing off: b stays last.
    never = build_policy("least_latency", {"probe_below": 0}, random.Random(1))
    assert ids(never.rank(STREAM, faded).ranked) == ["a", "b"]


def test_a_new_endpoint_is_measured_once_first() -> None:
    policy = build_policy("least_latency", {}, random.Random(1))
    decision = policy.rank(STREAM, [ep("a", 0.1), ep("new")])
    assert (ids(decision.ranked), decision.reason) == (["new", "a"], "probe")
    busy = policy.rank(STREAM, [ep("a", 0.1), ep("new", in_flight=1)])
    assert ids(busy.ranked) == ["a", "new"]


def test_without_any_data_it_is_least_load_with_seeded_ties() -> None:
    fleet = [ep(f"e{i}", in_flight=1) for i in range(4)]
    fleet[2] = ep("e2", in_flight=0)
    orders = [
        ids(build_policy("least_latency", {}, random.Random(seed)).rank(WHOLE, fleet).ranked)
        for seed in (5, 5, 6)
    ]
    assert orders[0] == orders[1]
    assert all(order[0] == "e2" for order in orders)
    assert orders[0] != orders[2]


def test_low_latency_scores_the_fastest_1_and_the_rest_by_ratio() -> None:
    policy = build_policy("composite", {"scorers": ["low_latency"]}, random.Random(1))
    fleet = [ep("slow", 0.4, samples=1e9), ep("fast", 0.1, samples=1e9), ep("new")]
    assert ids(policy.rank(STREAM, fleet).ranked) == ["fast", "new", "slow"]
    from policies.latency import LowLatency, LowLatencyParams

    scorer = LowLatency(LowLatencyParams(prior_samples=0))
    scores, _ = scorer.score(STREAM, fleet)
    # The new endpoint is typical (the median of 0.4 and 0.1): a neutral score.
    assert scores == pytest.approx([0.25, 1.0, 0.1 / 0.25])
    assert scorer.score(STREAM, [ep("x"), ep("y")])[0] == [0.5, 0.5]


def test_low_latency_is_a_known_scorer_with_params() -> None:
    from policies.composite import SCORERS, CompositeParams

    assert "low_latency" in SCORERS
    CompositeParams.model_validate({"scorers": [{"name": "low_latency", "prior_samples": 2}]})
    with pytest.raises(ValueError, match="prior_samples"):
        CompositeParams.model_validate({"scorers": [{"name": "low_latency", "prior_samples": -1}]})
