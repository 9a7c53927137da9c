"""calibrate_sim's decode step: timed from the bursts' ends, whatever the chunking."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from benchmarks import calibrate_sim
from benchmarks.calibrate_sim import DECODE_TOKENS, SHORT_TOKENS, decode_phase


def test_decode_step_comes_from_ends_when_every_token_came_in_one_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A front end behind its engine merged each answer into one chunk (no gap
    to measure: the chunk-gap median raised on the quiet machine); the step is
    still the difference of the ends: 2 ms + 0.5 ms a sequence here."""

    async def burst(
        client: Any, url: str, prompts: Any, n: int, tokens: int = DECODE_TOKENS
    ) -> list[dict[str, Any]]:
        step = 0.002 + 0.0005 * n
        end = 0.05 + tokens * step
        return [{"ttft": end, "last": end, "gaps": [], "usage": {}} for _ in range(n)]

    monkeypatch.setattr(calibrate_sim, "decode_burst", burst)
    points = asyncio.run(decode_phase(None, "", None, 1))  # type: ignore[arg-type]
    assert [p["seqs"] for p in points] == list(calibrate_sim.CONCURRENCY)
    for p in points:
        assert p["itl"] == pytest.approx(0.002 + 0.0005 * p["seqs"])
        assert p["gap_itl"] is None
    fitted = calibrate_sim.fit(
        {"prefill": [{"tokens": n, "ttft": 0.1} for n in (16, 64)], "decode": points}
    )
    assert fitted["itl_intercept"] == pytest.approx(0.002)
    assert fitted["itl_per_seq"] == pytest.approx(0.0005)


def test_chunk_gaps_are_kept_beside(monkeypatch: pytest.MonkeyPatch) -> None:
    async def burst(
        client: Any, url: str, prompts: Any, n: int, tokens: int = DECODE_TOKENS
    ) -> list[dict[str, Any]]:
        gaps = [0.004] * (tokens - 1)
        return [{"ttft": 0.01, "last": 0.01 + sum(gaps), "gaps": gaps, "usage": {}}] * n

    monkeypatch.setattr(calibrate_sim, "decode_burst", burst)
    points = asyncio.run(decode_phase(None, "", None, 2))  # type: ignore[arg-type]
    assert len(points) == 2 * len(calibrate_sim.CONCURRENCY)
    assert all(p["itl"] == pytest.approx(0.004) and p["gap_itl"] == 0.004 for p in points)
    assert DECODE_TOKENS > SHORT_TOKENS


def test_jitter_groups_without_gaps_add_nothing() -> None:
    from benchmarks.calibrate_sim import normalised

    assert normalised([]) == []  # every answer of the burst in one chunk
    assert normalised([0.0, 0.0, 0.004]) == []  # most tokens merged: no median to scale by
    assert normalised([0.002, 0.004, 0.006]) == [0.5, 1.0, 1.5]


def test_no_gaps_at_all_is_a_clear_error_not_a_statistics_one() -> None:
    from benchmarks.calibrate_sim import spread

    with pytest.raises(ValueError, match="one chunk"):
        spread([])
    assert spread([1.0, 1.0, 1.0])["p90_p50"] == 1.0


async def test_a_streams_last_chunk_is_its_end_after_the_first() -> None:
    """``stream``'s ``last`` (what decode_phase and bed_tail time ends by): the
    last content chunk, ``ttft`` plus the gaps on a completion stream (no role
    chunk before the first token)."""
    import httpx

    from benchmarks.calibrate_sim import stream
    from tests.helpers import simulator

    body = {"model": "tiny", "prompt": "a b c", "max_tokens": 6, "ignore_eos": True}
    async with simulator() as (url, _), httpx.AsyncClient(timeout=30) as c:
        got = await stream(c, url, "/v1/completions", body)
    assert len(got["gaps"]) == 5
    assert got["last"] >= got["ttft"]
    assert got["last"] == pytest.approx(got["ttft"] + sum(got["gaps"]), abs=1e-9)
