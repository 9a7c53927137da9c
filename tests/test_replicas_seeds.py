"""benchmarks/replicas.py over several workload seeds: the means and the paired
differences a comparison in virtual time reads (one seed's difference between
two arms swings by several points either way)."""

from __future__ import annotations

import pytest

from benchmarks.replicas import seed_means


def row(arm: str, routers: int, seed: int, hit: float) -> dict[str, object]:
    return {"arm": arm, "routers": routers, "seed": seed, "hit_rate": hit}


def test_seed_means_pairs_each_arm_with_the_baseline_at_the_same_seed_and_routers() -> None:
    rows = [
        row("approximate", 1, 1, 0.90),
        row("approximate", 1, 2, 0.80),
        row("approximate", 2, 1, 0.70),
        row("approximate", 2, 2, 0.60),
        row("variant", 2, 1, 0.75),  # +0.05 at seed 1
        row("variant", 2, 2, 0.57),  # -0.03 at seed 2
        row("oracle", 0, 1, 0.95),
    ]
    means = seed_means(rows, "approximate")
    assert means["approximate@1"]["mean"] == pytest.approx(0.85)
    assert (means["approximate@1"]["min"], means["approximate@1"]["max"]) == (0.80, 0.90)
    assert means["approximate@2"]["seeds"] == 2
    assert "diff_mean" not in means["approximate@2"]  # the baseline has none
    variant = means["variant@2"]
    assert variant["mean"] == pytest.approx(0.66)
    # Paired by seed, not mean against mean: +0.05 and -0.03.
    assert variant["diff_mean"] == pytest.approx(0.01)
    assert variant["diff_min"] == pytest.approx(-0.03)
    assert variant["diff_max"] == pytest.approx(0.05)
    # No baseline at the oracle's router count: its mean only.
    assert set(means["oracle@0"]) == {"seeds", "mean", "min", "max"}
