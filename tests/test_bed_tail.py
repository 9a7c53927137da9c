"""benchmarks/bed_tail.py without engines: how a request is classed by what
its server was doing, and the real-against-real comparison of fidelity runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bed_tail import by_server_state, resolution


def req(server: int, sent: float, ttft: float, end: float, uncached: int = 100) -> dict[str, Any]:
    return {"server": server, "sent": sent, "ttft": ttft, "end": end, "uncached": uncached}


def test_requests_are_classed_by_their_servers_state_on_arrival() -> None:
    first = req(0, 0.0, 0.05, 0.30)  # alone: nothing on server 0 before it
    other_server = req(1, 0.01, 0.40, 0.50)  # server 1: alone too
    during_prefill = req(0, 0.02, 0.20, 0.35)  # first not at its first chunk yet (0.05)
    during_stream = req(0, 0.10, 0.08, 0.40)  # first streaming, during_prefill's first at 0.22
    after_all = req(0, 0.45, 0.03, 0.50)  # every earlier one ended
    classes = by_server_state([first, other_server, during_prefill, during_stream, after_all])
    assert classes["alone"]["requests"] == 3
    assert classes["before_first"]["requests"] == 2
    assert classes["streaming"]["requests"] == 0
    # during_stream arrived when both others on server 0 were past their first chunk.
    moved = req(0, 0.25, 0.08, 0.40)
    classes = by_server_state([first, during_prefill, moved])
    assert classes["streaming"]["requests"] == 1
    assert classes["streaming"]["ttft_p50_ms"] == pytest.approx(80.0)
    assert classes["before_first"]["ttft_p50_ms"] == pytest.approx(200.0)


def run_file(path: Path, cases: dict[str, tuple[float, float, float]]) -> None:
    """A fidelity result with one model's real side: case -> (p50, p90, hit)."""
    real = {
        case: {"ttft_p50": p50, "ttft_p90": p90, "hit_rate": hit}
        for case, (p50, p90, hit) in cases.items()
    }
    path.write_text(json.dumps({"models": {"m": {"real": real}}}))


def test_resolution_judges_real_runs_against_each_other(tmp_path: Path) -> None:
    run_file(tmp_path / "a.json", {"x": (0.10, 0.20, 0.40), "y": (0.10, 0.20, 0.40)})
    # x: p90 +24 % and hit +0.015 (within); y: p90 +30 %, p50 -30 %, hit -0.03 (outside).
    run_file(tmp_path / "b.json", {"x": (0.11, 0.248, 0.415), "y": (0.07, 0.26, 0.37)})
    run_file(tmp_path / "c.json", {"x": (0.10, 0.20, 0.40)})  # y missing: not compared
    out = resolution(("a", "b", "c"), tmp_path)
    assert out["comparisons"] == 4  # a-b x and y, a-c x, b-c x
    assert out["within"] == {"p50": 3, "p90": 3, "hit": 3}
    ab_y = next(r for r in out["rows"] if r["runs"] == ["a", "b"] and r["case"] == "y")
    assert ab_y["p90"] == pytest.approx(0.30)
    assert ab_y["hit"] == pytest.approx(-0.03)


def a_run(hit: float, ttfts: list[float]) -> dict[str, Any]:
    """A run as ``sim_fidelity.run`` records it (what ``pooled`` reads)."""
    return {
        "requests": len(ttfts),
        "hit_rate": hit,
        "hit_tokens": hit * 100,
        "query_tokens": 100.0,
        "ttft_p50": sorted(ttfts)[len(ttfts) // 2],
        "ttft_p90": sorted(ttfts)[int(len(ttfts) * 0.9)],
        "seconds": 1.0,
        "loadavg": ["0.1", "0.1"],
        "ttfts": ttfts,
    }


def test_groups_of_runs_are_judged_pooled_against_each_other() -> None:
    from benchmarks.bed_tail import group_agreement

    low, high = [0.1] * 8 + [0.2] * 2, [0.1] * 8 + [0.4] * 2  # p90 0.2 or 0.4
    steady = [a_run(0.5, low) for _ in range(4)]
    rows = group_agreement({"steady": steady}, [1, 2, 3])
    assert [r["runs"] for r in rows] == [1, 2]  # 3 needs 6 runs
    assert all(r["hit"] == r["p50"] == r["p90"] == 1.0 for r in rows)
    # Two runs of each kind. Single runs agree on p90 when both drawn are of a
    # kind (1/3); groups of two when each holds one of each (2/3: pooled, their
    # p90 is 0.2, as two lows'; two highs' is 0.4).
    mixed = [a_run(0.5, low), a_run(0.5, high)] * 2
    single, double = group_agreement({"mixed": mixed}, [1, 2], draws=3000)
    assert single["p50"] == double["p50"] == 1.0
    assert 0.28 < single["p90"] < 0.39
    assert 0.61 < double["p90"] < 0.72


def fidelity_file(path: Path, repeats: int, cases: dict[str, dict[str, tuple[float, ...]]]) -> None:
    """A fidelity result of the reference model: case -> side -> (p50, p90, hit)."""
    from benchmarks.bed_tail import REFERENCE_MODEL

    model: dict[str, Any] = {"real": {}, "sim": {}}
    for case, sides in cases.items():
        for side, (p50, p90, hit) in sides.items():
            model[side][case] = {
                "repeats": repeats,
                "ttft_p50": p50,
                "ttft_p90": p90,
                "hit_rate": hit,
            }
    path.write_text(json.dumps({"models": {REFERENCE_MODEL: model, "other": model}}))


def test_the_simulator_is_judged_against_real_engines_own_spread(tmp_path: Path) -> None:
    from benchmarks.bed_tail import judge

    # Real runs whose p90 is 0.2 or 0.3 (tail 2 of 10 requests at 0.2 or 0.3),
    # p50 0.1 always, hit rate 0.5 or 0.52: groups of two pooled agree on p50
    # exactly and on p90 within 0.2 to 0.3 (-33 % to +50 %).
    def runs(n: int) -> list[dict[str, Any]]:
        return [
            a_run(0.5 + 0.02 * (i % 2), [0.1] * 8 + [0.2 + 0.1 * (i % 2)] * 2) for i in range(n)
        ]

    reference = {"x": runs(8), "y": runs(3)}
    fidelity_file(
        tmp_path / "f.json",
        2,
        {
            # Within the band on all three.
            "x": {"real": (0.1, 0.25, 0.51), "sim": (0.1, 0.3, 0.52)},
            # y has too few reference runs for groups of two: not judged.
            "y": {"real": (0.1, 0.25, 0.51), "sim": (0.1, 0.3, 0.52)},
        },
    )
    fidelity_file(
        tmp_path / "g.json",
        2,
        # p90 half the real's, p50 +5 %, hit +0.05: outside on all three.
        {"x": {"real": (0.1, 0.3, 0.5), "sim": (0.105, 0.15, 0.55)}},
    )
    out = judge(("f", "g"), tmp_path, reference, draws=400)
    assert out["judged"] == 2  # one case each; "other" models and y are left out
    f, g = out["rows"]
    assert (f["run"], f["case"], f["repeats"]) == ("f", "x", 2)
    assert all(f[q]["inside"] for q in ("hit", "p50", "p90"))
    assert not any(g[q]["inside"] for q in ("hit", "p50", "p90"))
    assert g["p90"]["error"] == pytest.approx(-0.5)
    assert g["p90"]["rank"] == 0.0 and g["hit"]["rank"] == 1.0
    assert out["inside"] == {"hit": 1, "p50": 1, "p90": 1}
    low, high = f["p90"]["real_band"]
    assert low < 0 < high


def test_a_servers_processes_are_found_below_it_and_named_uniquely() -> None:
    import os
    import subprocess

    from benchmarks.bed_tail import cpu_seconds, labelled, process_tree

    children = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        tree = process_tree(os.getpid())
        assert {c.pid for c in children} <= set(tree)
        assert tree[children[0].pid] == "sleep"
        names = labelled({c.pid: "sleep" for c in children} | {1: "init"})
        assert sorted(names.values()) == ["init", "sleep", "sleep#2"]
        assert names[min(c.pid for c in children)] == "sleep"
        # This process has used CPU; one that is gone reads 0.
        assert cpu_seconds(os.getpid()) > 0
    finally:
        for c in children:
            c.kill()
            c.wait()
    assert cpu_seconds(children[0].pid) == 0.0
