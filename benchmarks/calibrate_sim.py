"""Fit the simulator's latency model to real vLLM CPU servers (re-runnable).

    .venv/bin/python benchmarks/calibrate_sim.py [--repeats 5] [--rounds 2]

writes benchmarks/results/calibration.json and prints the fitted profile for
backends/sim/profiles.py.

Two real vLLM servers (tests/real/engines.py: the tiny ChatML Llama, one core
each, 81 blocks of 32 tokens) are driven at the same time, each by its own
client, so the fit sees the machine as the fidelity benchmark will (both cores
busy). Every request goes straight to a server, streamed, and is timed by the
client:

- prefill: single requests (one at a time per server) of prompt lengths from 16
  to 1900 tokens, each with a unique first block (no prefix-cache hit),
  ``max_tokens=2``: TTFT(L) = a + b * L;
- decode: N = 1..32 concurrent requests with short prompts and 32 output
  tokens (``ignore_eos``), then the same with 4: the difference of the
  bursts' median ends over 28 steps, ITL(N) = s + d * N (until 2026-12-02 the
  median gap between a request's chunks, which a front end merging tokens
  into fewer chunks empties; ``decode_phase``).

Each point is the median of ``--repeats`` runs (the machine is shared and
noisy; the median is robust to the odd stalled run, and /proc/loadavg is
recorded with every run). The simulator's model per step is
``step_base + prefill_per_token * tokens + decode_per_seq * seqs`` plus
``request_overhead`` before a request is scheduled, so the first guess is
step_base = s, decode_per_seq = d, prefill_per_token = b and
request_overhead = a - s. The simulator has serving costs of its own (HTTP,
JSON, asyncio), so the guess is then refined against the simulator itself:
``--rounds`` times, two ``kvroute simulate`` servers with the candidate profile
run the same protocol and every parameter moves by the real-minus-simulated
difference of the fitted coefficient it stands for.

vLLM's own histograms (vllm:time_to_first_token_seconds,
vllm:inter_token_latency_seconds) are read around each phase too: their means
against the client's show how much of TTFT is the server's front end.

``--jitter`` measures only the step-time jitter (results/calibration_jitter.json):
every per-token gap of streamed answers, alone (1, 4, 16 concurrent decodes per
server) and under the loaded phase's load through kvroute, over the median gap,
on the real servers, then on two simulators without jitter and with the fitted
one; vLLM's vllm:inter_token_latency_seconds buckets are kept beside. The
fitted ``step_jitter`` is sqrt(sigma_real^2 - sigma_sim^2) of the loaded
phase, sigma = ln(p90 / p50) / 1.2816 (a lognormal's): the simulator's own
serving noise and the batch mix it models are already in sigma_sim. The alone
phase is reported, not fitted: with 4-16 streams per server, chunks arrive in
bursts (near-zero gaps), so a group's median gap says little there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.sim.engine import EngineParams  # noqa: E402
from benchmarks.measure import WORDS as TENANT_WORDS  # noqa: E402
from benchmarks.measure import loadavg, through_router  # noqa: E402
from tests.real.engines import BLOCK_SIZE, NUM_BLOCKS, ensure_tiny_model  # noqa: E402

LENGTHS = (16, 64, 128, 256, 512, 768, 1024, 1400, 1900)
CONCURRENCY = (1, 2, 4, 8, 16, 32)
DECODE_TOKENS = 32
#: The decode step is timed as the difference between bursts of
#: ``DECODE_TOKENS`` and of this many tokens (``decode_phase``).
SHORT_TOKENS = 4
#: The tenant workloads' words and a few more.
WORDS = [
    *TENANT_WORDS,
    *["cache", "token", "route", "prefix", "server", "batch", "stream", "model", "queue"],
]
LOADED_REQUESTS = 40
LOADED_CONCURRENCY = 4
PARAMS = ("step_base", "prefill_per_token", "decode_per_seq", "request_overhead")


# -- prompts -------------------------------------------------------------------------


class Prompts:
    """Prompts of an exact token length for a model's tokenizer, each with a
    unique first block so no request hits another's cache."""

    def __init__(self, model_dir: Path, seed: int = 0) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.rng = random.Random(seed)

    def make(self, n: int) -> str:
        head = f"{secrets.token_hex(8)} "
        text = head + " ".join(self.rng.choice(WORDS) for _ in range(n))
        ids = self.tok.encode(text, add_special_tokens=False).ids[:n]
        out: str = self.tok.decode(ids)
        return out


# -- one streamed request ------------------------------------------------------------


async def stream(
    client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Send one streamed request; the client's TTFT, chunk gaps and usage."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    times: list[float] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            data = line[6:]
            if data == "[DONE]":
                break
            if first is None:
                first = now
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if choices and "role" not in (choices[0].get("delta") or {}):
                times.append(now)
    ttft = (first if first is not None else time.perf_counter()) - started
    gaps = [b - a for a, b in itertools.pairwise(times)]
    last = (times[-1] - started) if times else ttft
    return {"ttft": ttft, "last": last, "gaps": gaps, "usage": usage}


# -- the protocol -------------------------------------------------------------------


async def prefill_phase(
    client: httpx.AsyncClient, url: str, prompts: Prompts, repeats: int
) -> list[dict[str, Any]]:
    points = []
    for rep in range(repeats):
        for n in LENGTHS:
            body = {"model": "tiny", "prompt": prompts.make(n), "max_tokens": 2, "temperature": 0}
            out = await stream(client, url, "/v1/completions", body)
            points.append(
                {
                    "rep": rep,
                    "tokens": out["usage"].get("prompt_tokens", n),
                    "cached": (out["usage"].get("prompt_tokens_details") or {}).get(
                        "cached_tokens", 0
                    ),
                    "ttft": out["ttft"],
                }
            )
    return points


async def decode_burst(
    client: httpx.AsyncClient, url: str, prompts: Prompts, n: int, tokens: int = DECODE_TOKENS
) -> list[dict[str, Any]]:
    """``n`` short prompts decoding ``tokens`` tokens at once on one server."""
    body = {"model": "tiny", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    return list(
        await asyncio.gather(
            *(
                stream(client, url, "/v1/completions", {**body, "prompt": prompts.make(16)})
                for _ in range(n)
            )
        )
    )


async def decode_phase(
    client: httpx.AsyncClient, url: str, prompts: Prompts, repeats: int
) -> list[dict[str, Any]]:
    """Per point (``n`` sequences decoding at once): the time a decode step
    takes, from the requests' ends, not their chunks' gaps. A front end that
    falls behind its engine sends several tokens in one chunk (vLLM merges
    the outputs a slow consumer has not taken yet), so on a quiet machine
    every chunk of a burst came at once and no gap was left to measure. The
    end of a burst decoding ``DECODE_TOKENS`` tokens less that of the same
    burst decoding ``SHORT_TOKENS`` is that many steps more, whatever the
    chunking. The chunks' median gap is kept beside (``gap_itl``; None when
    there was none)."""
    points = []
    for rep in range(repeats):
        for n in CONCURRENCY:
            outs = await decode_burst(client, url, prompts, n)
            short = await decode_burst(client, url, prompts, n, SHORT_TOKENS)
            ends = statistics.median(o["last"] for o in outs)
            short_ends = statistics.median(o["last"] for o in short)
            per_request = [statistics.median(o["gaps"]) for o in outs if o["gaps"]]
            points.append(
                {
                    "rep": rep,
                    "seqs": n,
                    "itl": (ends - short_ends) / (DECODE_TOKENS - SHORT_TOKENS),
                    "gap_itl": statistics.median(per_request) if per_request else None,
                }
            )
    return points


def histogram_means(text: str) -> dict[str, float]:
    """Sum and count of vLLM's latency histograms (summed over engines)."""
    out: dict[str, float] = {}
    wanted = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for name in wanted:
                if s.name in (name + "_sum", name + "_count"):
                    out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def measure(urls: Sequence[str], model_dir: Path, repeats: int) -> dict[str, Any]:
    """The protocol on every server at once; points pooled over servers."""
    async with httpx.AsyncClient(timeout=120) as client:

        async def metrics() -> dict[str, float]:
            total: dict[str, float] = {}
            for url in urls:
                r = await client.get(url + "/metrics")
                for k, v in histogram_means(r.text).items():
                    total[k] = total.get(k, 0.0) + v
            return total

        result: dict[str, Any] = {"loadavg": [loadavg()]}
        for phase, fn in (("prefill", prefill_phase), ("decode", decode_phase)):
            before = await metrics()
            runs = await asyncio.gather(
                *(fn(client, u, Prompts(model_dir, seed=i), repeats) for i, u in enumerate(urls))
            )
            after = await metrics()
            result[phase] = [p for run in runs for p in run]
            result[f"{phase}_engine_histograms"] = {
                k: after.get(k, 0.0) - before.get(k, 0.0) for k in after
            }
            result["loadavg"].append(loadavg())
    return result


def loaded_bodies(model_dir: Path, seed: int) -> list[dict[str, Any]]:
    """The loaded phase's requests: unique prompts of 100-1500 tokens (no
    prefix sharing, so no cache effects), 4-24 output tokens."""
    rng = random.Random(seed)
    prompts = Prompts(model_dir, seed=seed)
    return [
        {
            "model": "tiny",
            "prompt": prompts.make(rng.randint(100, 1500)),
            "max_tokens": rng.randint(4, 24),
            "temperature": 0,
            "ignore_eos": True,
        }
        for _ in range(LOADED_REQUESTS)
    ]


async def closed_loop(
    client: httpx.AsyncClient, router: str, bodies: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``bodies`` streamed through the router, ``LOADED_CONCURRENCY`` at a
    time; what ``stream`` measured of each, in the order they finished."""
    gate = asyncio.Semaphore(LOADED_CONCURRENCY)
    outs: list[dict[str, Any]] = []

    async def one(body: dict[str, Any]) -> None:
        async with gate:
            outs.append(await stream(client, router, "/v1/completions", body))

    await asyncio.gather(*(one(b) for b in bodies))
    return outs


async def loaded_phase(urls: Sequence[str], model_dir: Path, repeats: int) -> dict[str, Any]:
    """Closed-loop load through kvroute (round_robin, concurrency 4 over the
    servers): unique prompts of 100-1500 tokens (no prefix sharing, so no cache
    effects), 4-24 output tokens; the client's TTFT of every request."""
    ttfts: list[float] = []
    loads = [loadavg()]
    async with (
        through_router(urls, "round_robin") as router,
        httpx.AsyncClient(timeout=120) as client,
    ):
        for rep in range(repeats):
            for out in await closed_loop(client, router, loaded_bodies(model_dir, 100 + rep)):
                ttfts.append(out["ttft"])
            loads.append(loadavg())
    return {"ttfts": ttfts, "loadavg": loads, **quantiles(ttfts)}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {"p50": q(0.5), "p90": q(0.9)}


# -- fitting ------------------------------------------------------------------------


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def fit(measured: dict[str, Any]) -> dict[str, Any]:
    """Coefficients from the medians of the repeats at each point."""
    by_len: dict[int, list[float]] = {}
    for p in measured["prefill"]:
        # Lengths are exact per model; pool by the length asked for (nearest).
        key = min(LENGTHS, key=lambda n: abs(n - p["tokens"]))
        by_len.setdefault(key, []).append(p["ttft"])
    tok_by_len: dict[int, list[int]] = {}
    for p in measured["prefill"]:
        key = min(LENGTHS, key=lambda n: abs(n - p["tokens"]))
        tok_by_len.setdefault(key, []).append(p["tokens"])
    xs = [statistics.median(tok_by_len[k]) for k in sorted(by_len)]
    ys = [statistics.median(by_len[k]) for k in sorted(by_len)]
    a, b = line_fit(xs, ys)
    by_seqs: dict[int, list[float]] = {}
    for p in measured["decode"]:
        by_seqs.setdefault(p["seqs"], []).append(p["itl"])
    ns = sorted(by_seqs)
    s, d = line_fit(ns, [statistics.median(by_seqs[n]) for n in ns])
    return {
        "ttft_intercept": a,
        "ttft_per_token": b,
        "itl_intercept": s,
        "itl_per_seq": d,
        "ttft_median_by_len": {str(k): statistics.median(v) for k, v in sorted(by_len.items())},
        "itl_median_by_seqs": {str(n): statistics.median(by_seqs[n]) for n in ns},
    }


def first_guess(real: dict[str, Any]) -> dict[str, float]:
    guess: dict[str, float] = {
        "step_base": max(real["itl_intercept"], 0.0),
        "prefill_per_token": max(real["ttft_per_token"], 0.0),
        "decode_per_seq": max(real["itl_per_seq"], 0.0),
        "request_overhead": max(real["ttft_intercept"] - real["itl_intercept"], 0.0),
    }
    return guess


def refine(params: dict[str, float], real: dict[str, Any], sim: dict[str, Any]) -> dict[str, float]:
    """Move each parameter by the real-minus-simulated gap of its coefficient."""
    step = params["step_base"] + real["itl_intercept"] - sim["itl_intercept"]
    step = max(step, 0.0)
    # The TTFT intercept is request_overhead + step_base + the simulator's own costs.
    intercept_gap = real["ttft_intercept"] - sim["ttft_intercept"]
    overhead = params["request_overhead"] + intercept_gap - (step - params["step_base"])
    return {
        "step_base": step,
        "prefill_per_token": max(
            params["prefill_per_token"] + real["ttft_per_token"] - sim["ttft_per_token"], 0.0
        ),
        "decode_per_seq": max(
            params["decode_per_seq"] + real["itl_per_seq"] - sim["itl_per_seq"], 0.0
        ),
        "request_overhead": max(overhead, 0.0),
    }


# -- simulated servers ----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def simulate_args(params: EngineParams) -> list[str]:
    """``kvroute simulate`` flags for ``params`` (every engine field explicit)."""
    args = [
        f"--block-size={params.block_size}",
        f"--num-blocks={params.num_blocks}",
        f"--max-num-seqs={params.max_num_seqs}",
        f"--max-batched-tokens={params.max_batched_tokens}",
        f"--max-model-len={params.max_model_len}",
        f"--step-base={params.step_base!r}",
        f"--prefill-per-token={params.prefill_per_token!r}",
        f"--decode-per-seq={params.decode_per_seq!r}",
        f"--request-overhead={params.request_overhead!r}",
        f"--step-jitter={params.step_jitter!r}",
        f"--step-stall={params.step_stall!r}",
        f"--seed={params.seed}",
    ]
    if params.tokenizer:
        args.append(f"--tokenizer={params.tokenizer}")
    return args


@contextmanager
def sim_servers(extra_args: Sequence[str], count: int = 2) -> Iterator[list[str]]:
    """``count`` ``kvroute simulate`` processes (vLLM face), each with ``extra_args``."""
    # This checkout's code (an installed ``kvroute`` script may point at another).
    kvroute = [sys.executable, "-c", "import sys; from router.cli import main; sys.exit(main())"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(count):
            port = _free_port()
            cmd = [*kvroute, "simulate", "--kind=vllm", f"--port={port}", "--model=tiny"]
            procs.append(subprocess.Popen([*cmd, *extra_args], cwd=ROOT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"kvroute simulate exited ({proc.returncode})")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("kvroute simulate not ready in 60 s")
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def base_params(model_dir: Path, **latency: float) -> EngineParams:
    return EngineParams.profile(
        "vllm-cpu-tiny",
        num_blocks=NUM_BLOCKS,
        max_model_len=2048,
        tokenizer=str(model_dir),
        **latency,
    )


async def measure_sim(model_dir: Path, latency: dict[str, float], repeats: int) -> dict[str, Any]:
    with sim_servers(simulate_args(base_params(model_dir, **latency))) as urls:
        return await measure(urls, model_dir, repeats)


# -- step-time jitter ------------------------------------------------------------------

JITTER_CONCURRENCY = (1, 4, 16)
#: z of the 90th percentile of a standard normal: ln(p90 / p50) / Z90 is a
#: lognormal's sigma, robust to the odd multi-second stall a mean would not be.
Z90 = 1.2815516


def spread(ratios: Sequence[float]) -> dict[str, float]:
    """Shape of gaps divided by their expected value (1 = no jitter)."""
    if not ratios:
        raise ValueError(
            "no gaps between chunks to measure jitter from: every answer came in one chunk"
            " (vLLM merges the outputs of a front end that lags its engine)"
        )
    ordered = sorted(ratios)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    mean = statistics.fmean(ordered)
    logs = [math.log(r) for r in ordered if r > 0]
    return {
        "n": len(ordered),
        "cv": statistics.pstdev(ordered) / mean,
        "p10_p50": q(0.1) / q(0.5),
        "p90_p50": q(0.9) / q(0.5),
        "p99_p50": q(0.99) / q(0.5),
        "sigma_p90": math.log(q(0.9) / q(0.5)) / Z90,
        "sigma_log_sd": statistics.pstdev(logs),
    }


def normalised(gaps: Sequence[float]) -> list[float]:
    """Each gap over the group's median; none for a group with no gap (every
    answer in one chunk: vLLM merges a lagging front end's outputs) or whose
    median is 0 (most tokens merged)."""
    median = statistics.median(gaps) if gaps else 0.0
    if median <= 0:
        return []
    return [g / median for g in gaps if g > 0]


def itl_buckets(text: str) -> dict[str, float]:
    """vllm:inter_token_latency_seconds buckets (cumulative), summed over engines."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:inter_token_latency_seconds_bucket":
                out[s.labels["le"]] = out.get(s.labels["le"], 0.0) + s.value
    return out


async def measure_jitter(urls: Sequence[str], model_dir: Path, repeats: int) -> dict[str, Any]:
    """Per-token gaps of streamed answers, alone (N concurrent decodes per server,
    both servers at once, straight to them) and under the loaded phase's load
    (through kvroute); each gap divided by the median of its group (alone: the
    same server, concurrency and repeat; loaded: the whole phase, so the
    variation the simulator models - prefill chunks in a step - stays in)."""
    result: dict[str, Any] = {"loadavg": [loadavg()]}
    async with httpx.AsyncClient(timeout=120) as client:

        async def buckets() -> dict[str, float]:
            total: dict[str, float] = {}
            for url in urls:
                r = await client.get(url + "/metrics")
                for k, v in itl_buckets(r.text).items():
                    total[k] = total.get(k, 0.0) + v
            return total

        async def alone(url: str, prompts: Prompts) -> list[float]:
            ratios: list[float] = []
            for _ in range(repeats):
                for n in JITTER_CONCURRENCY:
                    outs = await decode_burst(client, url, prompts, n)
                    ratios += normalised([g for o in outs for g in o["gaps"]])
            return ratios

        before = await buckets()
        runs = await asyncio.gather(
            *(alone(u, Prompts(model_dir, seed=200 + i)) for i, u in enumerate(urls))
        )
        after = await buckets()
        result["alone"] = spread([r for run in runs for r in run])
        result["alone_itl_buckets"] = {k: after[k] - before.get(k, 0.0) for k in after}
        result["loadavg"].append(loadavg())

        gaps: list[float] = []
        async with through_router(urls, "round_robin") as router:
            before = await buckets()
            for rep in range(repeats):
                for out in await closed_loop(client, router, loaded_bodies(model_dir, 300 + rep)):
                    gaps.extend(out["gaps"])
                result["loadavg"].append(loadavg())
            after = await buckets()
        result["loaded"] = spread(normalised(gaps))
        result["loaded_median_gap"] = statistics.median(gaps)
        result["loaded_itl_buckets"] = {k: after[k] - before.get(k, 0.0) for k in after}
    return result


def fit_jitter(real: dict[str, Any], sim: dict[str, Any]) -> float:
    """The lognormal sigma that, added to the simulator's own spread (HTTP,
    asyncio, the batch mix it already models), gives the real engine's spread
    under load: sigma_real^2 - sigma_sim^2 (log-space variances add)."""
    gap = real["loaded"]["sigma_p90"] ** 2 - sim["loaded"]["sigma_p90"] ** 2
    return math.sqrt(max(gap, 0.0))


async def jitter_main(model_dir: Path, repeats: int) -> int:
    from tests.real.engines import vllm_servers

    with tempfile.TemporaryDirectory() as tmp, vllm_servers(Path(tmp)) as servers:
        real = await measure_jitter([s.url for s in servers], model_dir, repeats)
    print("real:", json.dumps({k: real[k] for k in ("alone", "loaded")}), flush=True)
    params = base_params(model_dir, step_jitter=0.0)
    with sim_servers(simulate_args(params)) as urls:
        sim = await measure_jitter(urls, model_dir, repeats)
    print("sim, no jitter:", json.dumps({k: sim[k] for k in ("alone", "loaded")}), flush=True)
    sigma = fit_jitter(real, sim)
    check: dict[str, Any] = {}
    with sim_servers(simulate_args(base_params(model_dir, step_jitter=round(sigma, 3)))) as urls:
        check = await measure_jitter(urls, model_dir, repeats)
    print(f"sim, jitter {sigma:.3f}:", json.dumps({k: check[k] for k in ("alone", "loaded")}))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": loadavg()},
        "protocol": {
            "alone_concurrency": JITTER_CONCURRENCY,
            "decode_tokens": DECODE_TOKENS,
            "loaded_requests": LOADED_REQUESTS,
            "loaded_concurrency": LOADED_CONCURRENCY,
            "repeats": repeats,
            "statistic": "gap / median gap of its group; sigma = ln(p90/p50) / 1.2816",
        },
        "real": real,
        "sim_no_jitter": sim,
        "sim_with_jitter": check,
        "step_jitter": round(sigma, 3),
    }
    out = ROOT / "benchmarks" / "results" / "calibration_jitter.json"
    out.write_text(json.dumps(result, indent=1))
    print("step_jitter:", round(sigma, 3))
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loaded-repeats", type=int, default=3)
    parser.add_argument(
        "--real", type=Path, help="reuse the real measurements of an earlier calibration.json"
    )
    parser.add_argument(
        "--output",
        default="calibration",
        help="results file name (NAME.json, NAME_real.json), so earlier fits are kept",
    )
    parser.add_argument(
        "--jitter",
        action="store_true",
        help="only measure step-time jitter (writes results/calibration_jitter.json)",
    )
    opts = parser.parse_args()
    from tests.real.engines import vllm_servers

    model_dir = ensure_tiny_model()
    assert BLOCK_SIZE == 32
    if opts.jitter:
        return await jitter_main(model_dir, min(opts.repeats, 3))
    if opts.real:
        real_measured = json.loads(opts.real.read_text())["real"]["measured"]
    else:
        with tempfile.TemporaryDirectory() as tmp, vllm_servers(Path(tmp)) as servers:
            urls = [s.url for s in servers]
            real_measured = await measure(urls, model_dir, opts.repeats)
            real_measured["loaded"] = await loaded_phase(urls, model_dir, opts.loaded_repeats)
    partial = ROOT / "benchmarks" / "results" / f"{opts.output}_real.json"
    partial.write_text(json.dumps({"real": {"measured": real_measured}}))
    real = fit(real_measured)
    print("real:", json.dumps({k: v for k, v in real.items() if "median" not in k}), flush=True)
    params = first_guess(real)
    rounds = []
    for i in range(opts.rounds + 1):
        sim_measured = await measure_sim(model_dir, params, opts.repeats)
        sim = fit(sim_measured)
        rounds.append({"params": dict(params), "fit": sim, "loadavg": sim_measured["loadavg"]})
        print(
            f"round {i}:",
            json.dumps(params),
            json.dumps({k: v for k, v in sim.items() if "median" not in k}),
            flush=True,
        )
        if i < opts.rounds:
            params = refine(params, real, sim)

    # The last round measured ``params`` itself: keep the round closest to the real fit.
    def gap(r: dict[str, Any]) -> float:
        f = r["fit"]
        return sum(  # type: ignore[no-any-return]
            abs(f[k] - real[k]) / max(abs(real[k]), 1e-9)
            for k in ("ttft_intercept", "ttft_per_token", "itl_intercept", "itl_per_seq")
        )

    best = min(rounds, key=gap)
    # Under load (two engines, kvroute and the client on two cores) the real
    # engine's steps take longer than alone; the simulator's sleeps do not. One
    # factor on every latency parameter, fitted on the loaded phase's TTFT p50:
    # simulated at factors 1 and 2, interpolated, then checked.
    real_loaded = real_measured["loaded"]
    print("real loaded:", quantiles(real_loaded["ttfts"]), flush=True)

    async def sim_loaded(factor: float) -> dict[str, Any]:
        scaled = {k: best["params"][k] * factor for k in PARAMS}
        with sim_servers(simulate_args(base_params(model_dir, **scaled))) as urls:
            out = await loaded_phase(urls, model_dir, opts.loaded_repeats)
        print(f"sim loaded x{factor:.2f}:", {k: out[k] for k in ("p50", "p90")}, flush=True)
        return {"factor": factor, **out}

    contention = [await sim_loaded(1.0), await sim_loaded(2.0)]
    slope = contention[1]["p50"] - contention[0]["p50"]
    factor = 1.0 + (real_loaded["p50"] - contention[0]["p50"]) / slope if slope > 0 else 1.0
    factor = min(max(factor, 0.5), 4.0)
    contention.append(await sim_loaded(factor))
    profile = {k: round(best["params"][k] * factor, 7) for k in PARAMS}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": loadavg()},
        "protocol": {
            "lengths": LENGTHS,
            "concurrency": CONCURRENCY,
            "decode_tokens": DECODE_TOKENS,
            "repeats": opts.repeats,
            "servers": 2,
            "statistic": "median of repeats per point, then least squares",
        },
        "real": {"fit": real, "measured": real_measured},
        "rounds": rounds,
        "uncontended": {k: best["params"][k] for k in PARAMS},
        "contention": {
            "real": {k: real_loaded[k] for k in ("p50", "p90", "loadavg")},
            "sim": [{k: c[k] for k in ("factor", "p50", "p90", "loadavg")} for c in contention],
            "factor": factor,
        },
        "profile": profile,
    }
    out = ROOT / "benchmarks" / "results" / f"{opts.output}.json"
    out.write_text(json.dumps(result, indent=1))
    print("profile:", json.dumps(profile, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
