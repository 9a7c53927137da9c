"""The simulator's step-time jitter: a seeded lognormal factor of mean 1.

Checked on the draws and on steps planned in virtual time (no sleeping, no
clock): the shape of the distribution, reproducibility by seed, and that the
jitter changes step lengths only, never what the engine counts.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

import pytest
import xxhash

from backends.sim.engine import STALL_FACTOR, Engine, EngineParams, StepJitter
from backends.sim.profiles import PROFILES
from backends.sim.server import add_simulate_arguments, params_from_args
from benchmarks.calibrate_sim import simulate_args

DRAWS = 20_000


def draws(sigma: float, seed: int, n: int = DRAWS) -> list[float]:
    jitter = StepJitter(sigma, seed)
    return [jitter.factor() for _ in range(n)]


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.6])
def test_factor_keeps_the_mean_and_has_the_configured_spread(sigma: float) -> None:
    xs = draws(sigma, seed=7)
    # The mean's standard error is sigma-ish / sqrt(20000) < 0.005.
    assert statistics.fmean(xs) == pytest.approx(1.0, abs=0.02)
    logs = [math.log(x) for x in xs]
    assert statistics.pstdev(logs) == pytest.approx(sigma, rel=0.03)
    # Lognormal: the median sits below the mean by exp(-sigma^2 / 2), p90/p50 = exp(1.28 sigma).
    ordered = sorted(xs)
    p50, p90 = ordered[DRAWS // 2], ordered[DRAWS * 9 // 10]
    assert p50 == pytest.approx(math.exp(-sigma * sigma / 2), rel=0.03)
    assert p90 / p50 == pytest.approx(math.exp(1.2816 * sigma), rel=0.04)


def test_same_seed_same_sequence_other_seed_another() -> None:
    assert draws(0.3, seed=1, n=50) == draws(0.3, seed=1, n=50)
    assert draws(0.3, seed=1, n=50) != draws(0.3, seed=2, n=50)


def test_zero_sigma_is_exactly_one() -> None:
    assert set(draws(0.0, seed=3, n=100)) == {1.0}
    with pytest.raises(ValueError, match="step_jitter"):
        EngineParams(step_jitter=-0.1)


def run_virtual(params: EngineParams) -> tuple[list[float], Engine]:
    """Drive the engine step by step in virtual time; every step's seconds."""
    engine = Engine(params)
    prompts = [f"tenant {i % 3} system prompt " * 40 + f"question {i}" for i in range(12)]
    for p in prompts:
        engine.submit(p, max_tokens=8, now=0.0, run=False)
    now, seconds = 0.0, []
    while (step := engine.plan_step()) is not None:
        now += step.seconds
        seconds.append(step.seconds)
        engine.finish_step(step, now)
    return seconds, engine


def test_engine_steps_are_the_model_times_the_seeded_factor() -> None:
    plain = EngineParams(block_size=16, num_blocks=200, max_num_seqs=4, seed=5)
    jittered = EngineParams(**{**plain.__dict__, "step_jitter": 0.4})
    base, engine_plain = run_virtual(plain)
    noisy, engine_noisy = run_virtual(jittered)
    # The same schedule: each step is the deterministic one times the next draw.
    factors = draws(0.4, seed=5, n=len(base))
    assert noisy == pytest.approx([b * f for b, f in zip(base, factors, strict=True)])
    assert noisy == run_virtual(jittered)[0]
    # Counters are the source of truth for hit rates; timing noise leaves them alone.
    assert engine_noisy.stats == engine_plain.stats
    assert engine_plain.stats.hits > 0


def test_on_in_the_fitted_profile_only_and_off_with_zero_latency() -> None:
    assert EngineParams().step_jitter == 0.0
    assert EngineParams.zero_latency().step_jitter == 0.0
    assert PROFILES["vllm-cpu-tiny"]["step_jitter"] > 0
    assert (
        EngineParams.profile("vllm-cpu-tiny").step_jitter
        == PROFILES["vllm-cpu-tiny"]["step_jitter"]
    )
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    base = ["--port", "1", "--model", "tiny"]
    assert params_from_args(parser.parse_args(base)).step_jitter == 0.0
    profiled = [*base, "--profile", "vllm-cpu-tiny"]
    assert params_from_args(parser.parse_args(profiled)).step_jitter > 0
    assert params_from_args(parser.parse_args([*profiled, "--zero-latency"])).step_jitter == 0.0
    assert params_from_args(parser.parse_args([*base, "--step-jitter", "0.2"])).step_jitter == 0.2
    # The benchmarks start simulators with every field explicit: the jitter survives.
    fitted = EngineParams.profile("vllm-cpu-tiny")
    assert params_from_args(parser.parse_args([*base, *simulate_args(fitted)])) == fitted


def test_a_stall_multiplies_a_step_by_the_stall_factor_with_its_chance() -> None:
    """``step_stall``: each step, with that chance, takes STALL_FACTOR times
    as long; the rest are the jitter's draws as without stalls."""
    stalled = StepJitter(0.0, 7, stall=0.05)
    xs = [stalled.factor() for _ in range(DRAWS)]
    assert set(xs) == {1.0, STALL_FACTOR}
    # Binomial: the share's standard error is about 0.0015.
    assert xs.count(STALL_FACTOR) / DRAWS == pytest.approx(0.05, abs=0.006)
    jittered = StepJitter(0.4, 7, stall=0.05)
    ys = [jittered.factor() for _ in range(DRAWS)]
    tall = sum(y > 4 for y in ys) / DRAWS  # a lognormal of sigma 0.4 almost never passes 4
    assert tall == pytest.approx(0.05, abs=0.008)
    # No stall, no extra draw: the jitter's sequence is the plain lognormal
    # stream it was before stalls existed (the simulators' seeds keep their runs).
    rng = random.Random(xxhash.xxh64_intdigest(b"step-jitter", seed=1))
    assert draws(0.3, seed=1, n=50) == [rng.lognormvariate(-0.045, 0.3) for _ in range(50)]


def test_stalls_lengthen_steps_and_change_no_count() -> None:
    plain = EngineParams(block_size=16, num_blocks=200, max_num_seqs=4, seed=5)
    stalling = EngineParams(**{**plain.__dict__, "step_stall": 0.3})
    base, engine_plain = run_virtual(plain)
    slow, engine_slow = run_virtual(stalling)
    ratios = {round(s / b, 6) for s, b in zip(slow, base, strict=True)}
    assert ratios == {1.0, STALL_FACTOR}
    assert engine_slow.stats == engine_plain.stats
    with pytest.raises(ValueError, match="step_stall"):
        EngineParams(step_stall=1.0)
    with pytest.raises(ValueError, match="step_stall"):
        EngineParams(step_stall=-0.01)


def test_the_stall_flag_reaches_the_engine_and_zero_latency_drops_it() -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    base = ["--port", "1", "--model", "tiny"]
    assert params_from_args(parser.parse_args([*base, "--step-stall", "0.02"])).step_stall == 0.02
    profiled = [*base, "--profile", "vllm-cpu-tiny", "--step-stall", "0.02"]
    assert params_from_args(parser.parse_args(profiled)).step_stall == 0.02
    assert params_from_args(parser.parse_args([*profiled, "--zero-latency"])).step_stall == 0.0
    stalled = EngineParams.profile("vllm-cpu-tiny", step_stall=0.05)
    assert params_from_args(parser.parse_args([*base, *simulate_args(stalled)])) == stalled
