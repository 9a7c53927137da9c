"""The latency estimator (router/latency.py), driven by a fake clock."""

from __future__ import annotations

import pytest

from router.config import ConfigError, parse_config
from router.latency import CLIP, REFERENCE_TOKENS, LatencyEstimate, LatencySnapshot, LiveLatency
from router.registry import EndpointRegistry
from router.state import AppState
from tests.helpers import router_config


def view(est: LatencyEstimate, now: float) -> LatencySnapshot:
    snap = est.view(now)
    assert snap is not None
    return snap


def test_nothing_measured_is_none() -> None:
    assert LatencyEstimate().view(0.0) is None


def test_decay_is_in_time_so_a_burst_does_not_erase_history() -> None:
    est = LatencyEstimate(half_life=10.0)
    for t in range(100):  # 100 samples of 1 s over 10 s
        est.first_byte(1.0, t / 10)
    # A burst of 10 samples at 2 s (within the clip) in the same instant.
    for _ in range(10):
        est.first_byte(2.0, 10.0)
    snap = view(est, 10.0)
    assert snap.ttft is not None and 1.0 < snap.ttft < 1.25
    # A per-sample EWMA at 0.2 would be at 2 * (1 - 0.8**10) + 0.8**10 ~ 1.89.


def test_old_data_fades_with_time_whatever_the_traffic() -> None:
    est = LatencyEstimate(half_life=10.0)
    est.first_byte(1.0, 0.0)
    assert view(est, 0.0).ttft_samples == 1.0
    assert view(est, 10.0).ttft_samples == pytest.approx(0.5)
    assert view(est, 30.0).ttft_samples == pytest.approx(0.125)
    # After three half-lives the old sample weighs 1/8 against a new one.
    est.first_byte(3.0, 30.0)
    assert view(est, 30.0).ttft == pytest.approx((0.125 * 1.0 + 3.0) / 1.125)


def test_one_outlier_is_clipped_to_a_multiple_of_the_estimate() -> None:
    est = LatencyEstimate(half_life=60.0)
    for i in range(9):
        est.first_byte(0.5, float(i))
    est.first_byte(600.0, 9.0)  # one request stuck for ten minutes
    ttft = view(est, 9.0).ttft
    assert ttft is not None
    assert ttft < 0.5 * (1 + (CLIP - 1) / 9)
    assert ttft > 0.5  # it counted, as CLIP x the estimate


def test_a_real_slowdown_gets_through_the_clip() -> None:
    est = LatencyEstimate(half_life=60.0)
    for i in range(10):
        est.first_byte(0.1, float(i))
    for i in range(40):
        est.first_byte(2.0, 10.0 + i)  # the endpoint is now 20x slower
    ttft = view(est, 50.0).ttft
    assert ttft is not None and ttft > 1.5


def test_fast_samples_are_not_clipped() -> None:
    est = LatencyEstimate(half_life=60.0)
    for i in range(3):
        est.first_byte(8.0, float(i))
    est.first_byte(0.001, 3.0)
    assert view(est, 3.0).ttft == pytest.approx((3 * 8.0 * 0.5 ** (1 / 60) + 0.001) / 4, rel=0.01)


def test_streams_measure_ttft_and_time_per_token_after_the_first() -> None:
    est = LatencyEstimate()
    est.first_byte(0.2, 1.0)
    est.stream_end(1.0, 100, 2.0)  # 100 tokens after the first in 1 s
    snap = view(est, 2.0)
    assert snap.ttft == pytest.approx(0.2)
    assert snap.tpot == pytest.approx(0.01)
    assert snap.duration is None and snap.samples("duration") == 0.0
    est.stream_end(0.5, 0, 3.0)  # one token only: no per-token sample
    assert view(est, 3.0).samples("tpot") == pytest.approx(0.5 ** (1 / 30))


def test_durations_are_normalised_by_the_tokens_answered() -> None:
    est = LatencyEstimate()
    # An endpoint with 0.3 s fixed and 20 ms a token, asked for answers of varied size.
    for i, tokens in enumerate((10, 400, 50, 200, 25, 300)):
        est.answer(0.3 + 0.02 * tokens, tokens, float(i))
    snap = view(est, 6.0)
    assert snap.duration_fixed == pytest.approx(0.3)
    assert snap.duration_per_token == pytest.approx(0.02)
    assert snap.duration == pytest.approx(0.3 + 0.02 * REFERENCE_TOKENS)


def test_answers_of_one_size_scale_proportionally() -> None:
    short, long = LatencyEstimate(), LatencyEstimate()
    for i in range(4):
        short.answer(0.5, 10, float(i))  # 50 ms a token
        long.answer(4.0, 200, float(i))  # 20 ms a token: the faster one
    s, g = view(short, 4.0), view(long, 4.0)
    assert s.duration is not None and g.duration is not None
    assert g.duration < s.duration


def test_an_answer_without_usage_counts_as_a_typical_one() -> None:
    est = LatencyEstimate()
    for i in range(3):
        est.answer(2.0, 100, float(i))
    est.answer(2.0, None, 3.0)
    assert view(est, 3.0).duration_per_token == pytest.approx(0.02)


def test_failures_only_ever_slow_an_endpoint_down() -> None:
    est = LatencyEstimate()
    est.failed(30.0, stream=True, now=0.0)  # no estimate yet: nothing learned
    assert est.view(0.0) is None
    est.first_byte(1.0, 0.0)
    est.failed(0.001, stream=True, now=1.0)  # refused at once: not a fast sample
    assert view(est, 1.0).ttft == pytest.approx(1.0)
    assert view(est, 1.0).ttft_samples < 1.0
    est.failed(3.0, stream=True, now=1.0)  # a timeout: slower than thought
    ttft = view(est, 1.0).ttft
    assert ttft is not None and ttft > 1.0
    est.answer(2.0, 100, 2.0)
    est.failed(60.0, stream=False, now=3.0)
    duration = view(est, 3.0).duration_per_token
    assert duration is not None and duration > 0.02


def test_an_instant_endpoint_is_not_frozen_at_zero() -> None:
    est = LatencyEstimate()
    for i in range(3):
        est.first_byte(0.0, float(i))
    for i in range(20):
        est.first_byte(1.0, 3.0 + i)
    ttft = view(est, 23.0).ttft
    assert ttft is not None and ttft > 0.01


def test_attempts_feed_their_endpoint_and_a_config_change_keeps_what_was_learned() -> None:
    now = [0.0]
    config = parse_config(
        'endpoints: [{id: a, url: "http://a:1", kind: vllm, models: [m]}]\n'
        "models: {m: {policy: least_latency}}\n",
        {},
    )
    registry = EndpointRegistry(config.endpoints, clock=lambda: now[0])
    endpoint = registry.get("a")
    assert endpoint is not None
    fresh = endpoint.view().latency
    assert fresh is not None  # read live: nothing measured yet reads as no estimate
    assert (fresh.ttft, fresh.tpot, fresh.duration) == (None, None, None)
    assert fresh.samples("ttft") == fresh.samples("duration") == 0.0
    stream = endpoint.begin(0.0, stream=True)
    stream.first_byte(0.2)
    stream.answered(1.2, 101)  # 100 tokens after the first, in 1 s
    stream.end()
    whole = endpoint.begin(2.0)
    whole.end()  # the end of a whole answer is not a time to first token
    whole.answered(3.0, 50)
    now[0] = 3.0
    latency = endpoint.view().latency
    assert latency is not None
    assert latency.ttft == pytest.approx(0.2)
    assert latency.tpot == pytest.approx(0.01)
    assert latency.samples("duration") == 1.0
    assert latency.duration == pytest.approx(1.0 / 50 * REFERENCE_TOKENS)
    # A timeout before the first chunk makes it slower; a stream cut after it
    # gave its time to first token, and nothing more.
    late = endpoint.begin(3.0, stream=True)
    late.failed(4.0)
    cut = endpoint.begin(4.0, stream=True)
    cut.first_byte(4.2)
    cut.failed(9.0)
    now[0] = 4.2
    latency = endpoint.view().latency
    assert latency is not None
    w = (0.5 ** (4.0 / 30), 0.5 ** (0.2 / 30), 1.0)  # samples at 0.2, 4.0, 4.2
    assert latency.samples("ttft") == pytest.approx(sum(w))
    assert latency.ttft == pytest.approx((w[0] * 0.2 + w[1] * 1.0 + w[2] * 0.2) / sum(w))
    before = latency.ttft
    # A config change (reload) keeps the estimates; time still fades them.
    registry.upsert(config.endpoints[0].model_copy(update={"weight": 3.0}))
    changed = registry.get("a")
    assert changed is not None and changed is not endpoint
    now[0] = 33.0
    latency = changed.view().latency
    assert latency is not None and latency.ttft == before
    assert latency.samples("ttft") == pytest.approx(sum(w) * 0.5 ** (28.8 / 30))


def test_the_clip_is_the_configured_one() -> None:
    rises = {}
    for clip in (2.0, 4.0):
        est = LatencyEstimate(half_life=60.0, clip=clip)
        for i in range(9):
            est.first_byte(0.5, float(i))
        est.first_byte(600.0, 9.0)
        ttft = view(est, 9.0).ttft
        assert ttft is not None
        rises[clip] = ttft - 0.5
    # The outlier counts as clip x 0.5 s: it lifts the mean by (clip - 1) x 0.5 / weight.
    assert rises[4.0] == pytest.approx(3 * rises[2.0])


def test_latency_rules_come_from_config_and_a_reload_keeps_the_estimates() -> None:
    endpoints = [{"id": "a", "url": "http://127.0.0.1:9", "models": ["m"]}]
    state = AppState.from_config(router_config(endpoints, latency={"half_life": 5, "clip": 2}))
    a = state.registry.get("a")
    assert a is not None
    assert (a.latency.half_life, a.latency.clip) == (5.0, 2.0)
    a.latency.first_byte(0.3, 0.0)
    state.apply(router_config(endpoints, latency={"half_life": 90, "clip": 8}))
    kept = state.registry.get("a")
    assert kept is not None and (kept.latency.half_life, kept.latency.clip) == (90.0, 8.0)
    assert view(kept.latency, 0.0).ttft == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="clip"):
        router_config(endpoints, latency={"clip": 0.5})


def test_the_live_reader_reads_as_the_snapshot() -> None:
    """What policies read (LiveLatency, in a view) equals what the admin API
    and metrics show (LatencyEstimate.view) at the same moment."""
    now = [0.0]
    est = LatencyEstimate()
    live = LiveLatency(est, lambda: now[0])
    for i in range(6):
        est.first_byte(0.1 * (i + 1), float(i))
        est.stream_end(1.0 + i, 50 + 10 * i, float(i))
        est.answer(2.0 + i, 100 * (i + 1), float(i))
    for t in (6.0, 40.0, 400.0):
        now[0] = t
        snap = view(est, t)
        assert (live.ttft, live.tpot, live.duration) == (snap.ttft, snap.tpot, snap.duration)
        for q in ("ttft", "tpot", "duration"):
            assert live.samples(q) == snap.samples(q)
