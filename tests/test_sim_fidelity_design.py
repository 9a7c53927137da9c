"""The interleaved fidelity benchmark's design, without engines: the order of
the pairs, the load factor's fit, and the fixed per-case statistic
(benchmarks/sim_fidelity.py --interleaved)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from backends.sim.engine import StepJitter
from backends.sim.profiles import PROFILES
from benchmarks.sim_fidelity import (
    FACTOR_BOUNDS,
    PROFILE,
    case_result,
    curve_at,
    fit_factor,
    fit_tail,
    multiturn_workload,
    overall,
    pair_params,
    schedule,
    spread,
    virtual_hit_rate,
)
from tests.helpers import FIXTURES

CASES = ["tenants/round_robin", "tenants/prefix_affinity", "multiturn/round_robin", "m/pa"]


def a_run(hits: int, queries: int, ttfts: list[float]) -> dict[str, Any]:
    """A run as ``sim_fidelity.run`` records it (p50/p90 given by hand below)."""
    ordered = sorted(ttfts)
    return {
        "requests": len(ttfts),
        "hit_rate": hits / queries,
        "hit_tokens": hits,
        "query_tokens": queries,
        "ttft_p50": statistics.median(ordered),
        "ttft_p90": ordered[round(0.9 * (len(ordered) - 1))],
        "ttft_mean": statistics.fmean(ordered),
        "seconds": 1.0,
        "loadavg": ["1.0", "1.0"],
        "ttfts": ttfts,
    }


def test_schedule_runs_every_case_once_per_repeat_in_rotated_order() -> None:
    pairs = schedule(CASES, 4)
    assert Counter(pairs) == Counter((r, c) for r in range(4) for c in CASES)
    # Repeats one after the other, each a full set of cases.
    assert [r for r, _ in pairs] == [r for r in range(4) for _ in CASES]
    # Each repeat starts one case later: no case is always first after a start.
    assert [pairs[4 * r][1] for r in range(4)] == CASES
    assert [c for r, c in pairs if r == 1] == [*CASES[1:], CASES[0]]
    # Every case takes every position once over as many repeats as cases.
    positions = {c: {i % 4 for i, (_, d) in enumerate(pairs) if d == c} for c in CASES}
    assert all(p == {0, 1, 2, 3} for p in positions.values())


def test_fit_factor_is_the_line_through_two_simulated_points() -> None:
    points = [(1.0, 0.070), (2.0, 0.130)]
    assert fit_factor(0.100, points) == pytest.approx(1.5)
    assert fit_factor(0.070, points) == pytest.approx(1.0)
    # Beyond the points: extrapolated (a quieter machine than at x1).
    assert fit_factor(0.064, points) == pytest.approx(0.9)
    assert fit_factor(0.250, points) == pytest.approx(4.0)


def test_fit_factor_is_bounded_and_ignores_a_flat_or_falling_line() -> None:
    points = [(1.0, 0.070), (2.0, 0.130)]
    assert fit_factor(0.010, points) == FACTOR_BOUNDS[0]
    assert fit_factor(5.0, points) == FACTOR_BOUNDS[1]
    assert fit_factor(0.100, [(1.0, 0.080), (2.0, 0.080)]) == 1.0
    assert fit_factor(0.100, [(1.0, 0.090), (2.0, 0.080)]) == 1.0


def test_case_result_pools_tokens_and_requests_over_repeats() -> None:
    # Hit rates 0.5 (small run) and 0.22 (large run): pooled by tokens, 0.25,
    # not the mean of the two rates (0.36).
    real = [a_run(50, 100, [0.1, 0.2, 0.3]), a_run(200, 900, [0.4, 0.5, 0.6])]
    sim = [a_run(60, 100, [0.1, 0.2, 0.3]), a_run(180, 900, [0.4, 0.8, 0.9])]
    out = case_result(real, sim)
    assert out["real"]["hit_rate"] == pytest.approx(0.25)
    assert out["sim"]["hit_rate"] == pytest.approx(0.24)
    # p50 and p90 of all six requests: median 0.35; p90 index round(4.5) = 4.
    assert out["real"]["ttft_p50"] == pytest.approx(0.35)
    assert out["real"]["ttft_p90"] == pytest.approx(0.5)
    assert out["sim"]["ttft_p90"] == pytest.approx(0.8)
    cmp = out["comparison"]
    assert cmp["hit_rate_gap"] == pytest.approx(-0.01)
    assert cmp["hit_ok"]
    assert cmp["ttft_p50_error"] == pytest.approx(0.0)
    assert cmp["ttft_p90_error"] == pytest.approx(0.6)
    assert not cmp["ttft_ok"]
    # Each pair compared as well (reported, not judged).
    assert [p["hit_rate_gap"] for p in out["paired"]] == pytest.approx([0.1, 0.2 - 2 / 9])


def test_spread_is_the_range_of_the_repeats() -> None:
    runs = [a_run(30, 100, [0.1, 0.1, 0.1]), a_run(25, 100, [0.2, 0.2, 0.2])]
    got = spread(runs)
    assert got["hit_rate_range"] == pytest.approx(0.05)
    # p50s 0.1 and 0.2; pooled p50 of (0.1 x3, 0.2 x3) = 0.15: range 0.1 / 0.15.
    assert got["ttft_p50_range"] == pytest.approx(0.1 / 0.15)
    same = spread([a_run(30, 100, [0.1, 0.2, 0.3])] * 3)
    assert same == {"hit_rate_range": 0.0, "ttft_p50_range": 0.0, "ttft_p90_range": 0.0}


def test_case_result_needs_one_simulated_run_per_real_one() -> None:
    run = a_run(30, 100, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        case_result([run, run], [run])
    with pytest.raises(ValueError):
        case_result([], [])


def test_overall_counts_cases_against_the_targets_and_the_real_spread() -> None:
    good = case_result([a_run(30, 100, [0.1, 0.2])] * 2, [a_run(31, 100, [0.1, 0.2])] * 2)
    bad = case_result(
        [a_run(30, 100, [0.1, 0.2]), a_run(40, 100, [0.2, 0.3])],
        [a_run(60, 100, [0.2, 0.4])] * 2,
    )
    model = {
        key: {"a": good[key], "b": bad[key]} for key in ("real", "sim", "comparison", "real_spread")
    }
    got = overall({"models": {"m": model}})
    assert got["cases"] == 2
    assert got["cases_hit_ok"] == 1
    assert not got["hit_ok"]
    assert got["cases_ttft_p50_ok"] == 1
    assert got["real_max_spread"]["hit_rate_range"] == pytest.approx(0.1)


def test_fit_tail_interpolates_the_probe_tail_within_the_grid() -> None:
    points = [(0.0, 1.8), (0.4, 2.2), (0.8, 3.0), (1.2, 4.0)]
    assert fit_tail(2.6, points) == pytest.approx(0.6)
    assert fit_tail(3.5, list(reversed(points))) == pytest.approx(1.0)
    # Outside what was measured: the ends, never beyond.
    assert fit_tail(1.5, points) == 0.0
    assert fit_tail(7.0, points) == 1.2


def test_fit_tail_does_not_fall_back_on_a_noisy_dip() -> None:
    # 0.8 measured a lower ratio than 0.4 (noise): treated as 2.4 (the running
    # maximum), so a ratio of 2.3 maps inside 0.0-0.4, not to 0.8.
    points = [(0.0, 1.8), (0.4, 2.4), (0.8, 2.3), (1.2, 3.4)]
    assert fit_tail(2.3, points) == pytest.approx(0.4 * 0.5 / 0.6)
    assert fit_tail(2.9, points) == pytest.approx(0.8 + 0.4 * 0.5 / 1.0)
    # A grid whose tail never rises past its second point: its first maximum.
    assert fit_tail(5.0, [(0.0, 1.8), (0.4, 2.4), (0.8, 2.0)]) == 0.4


def test_curve_at_interpolates_each_factor_between_grid_sigmas() -> None:
    grid = [
        {"sigma": 0.0, "factor": 1.0, "p50": 0.060},
        {"sigma": 0.8, "factor": 1.0, "p50": 0.050},
        {"sigma": 0.0, "factor": 2.0, "p50": 0.120},
        {"sigma": 0.8, "factor": 2.0, "p50": 0.100},
    ]
    assert curve_at(0.4, grid) == [
        (1.0, pytest.approx(0.055)),
        (2.0, pytest.approx(0.110)),
    ]
    assert curve_at(0.8, grid) == [(1.0, pytest.approx(0.05)), (2.0, pytest.approx(0.1))]
    # Beyond the grid: its last sigma's values.
    assert curve_at(2.0, grid) == [(1.0, pytest.approx(0.05)), (2.0, pytest.approx(0.1))]
    # Then the factor as without a jitter fit: p50 0.0825 at sigma 0.4 -> x1.5.
    assert fit_factor(0.0825, curve_at(0.4, grid)) == pytest.approx(1.5)
    # A stall grid (--fit-stall) is read by its own key.
    stalls = [{**g, "stall": g["sigma"] / 10, "sigma": 0.4} for g in grid]
    assert curve_at(0.04, stalls, "stall") == curve_at(0.4, grid)


def test_pair_params_scale_the_profile_and_seed_each_repeat_apart(tmp_path: Path) -> None:
    profile = PROFILES[PROFILE]
    params = [pair_params(tmp_path, 2.5, 0.8, repeat) for repeat in range(3)]
    for p in params:
        assert p.step_base == pytest.approx(2.5 * profile["step_base"])
        assert p.request_overhead == pytest.approx(2.5 * profile["request_overhead"])
        assert p.step_jitter == 0.8
        assert p.tokenizer == str(tmp_path)
    assert [p.seed for p in params] == [0, 1, 2]
    assert all(p.step_stall == 0.0 for p in params)
    assert pair_params(tmp_path, 1.0, 0.4, 0, 0.05).step_stall == 0.05
    # Distinct seeds, distinct jitter sequences: the repeats are separate draws.
    sequences = [[StepJitter(p.step_jitter, p.seed).factor() for _ in range(5)] for p in params]
    assert len({tuple(s) for s in sequences}) == 3


def test_virtual_hit_rate_is_one_draw_per_seed_and_seeds_differ() -> None:
    """The tiny tokenizer's fixture (the real tier's ChatML model): in virtual
    time the multi-turn workload's hit rate depends on the seed alone (the
    step jitter moves eviction order), and the same seed repeats it exactly."""
    rounds = multiturn_workload(12, 10, 5)
    model = FIXTURES / "tiny-llama"
    rates = [virtual_hit_rate(pair_params(model, 1.0, 0.4, seed), rounds) for seed in range(3)]
    assert all(0.0 < r < 1.0 for r in rates)
    assert len(set(rates)) > 1
    assert virtual_hit_rate(pair_params(model, 1.0, 0.4, 1), rounds) == rates[1]
    # Without jitter the seed moves nothing: the timing is the model's alone.
    flat = {virtual_hit_rate(pair_params(model, 1.0, 0.0, seed), rounds) for seed in range(3)}
    assert len(flat) == 1
