"""Simulator fidelity: the same held-out workloads on real vLLM and on the simulator.

    .venv/bin/python benchmarks/sim_fidelity.py [--quick] [--without-jitter]

writes benchmarks/results/sim_fidelity.json and sim_fidelity.png.

Nothing here was used to fit the profile (benchmarks/calibrate_sim.py fitted it
on single requests and synthetic concurrent decodes of the ChatML tiny Llama):

- two models: the ChatML tiny Llama, and a held-out twin with a Llama-3-like
  chat template and special tokens (tests/real/build_tiny_model.py --template
  llama3), whose prompts the simulator must render and count as vLLM does;
- two workloads, each through kvroute with round_robin and prefix_affinity
  over two servers (81 blocks of 32 tokens each, so the caches evict):
  ``tenants`` - many tenants' system prompts of varied length, skewed
  popularity, questions and answers of varied length; ``multiturn`` -
  conversations that grow turn by turn (fixed assistant replies, so real and
  simulated engines get identical prompts).

Every case runs ``--repeats`` times (default 2); hit rates are pooled (hits
and queries summed), TTFTs pooled, per-repeat values kept. Real: two vLLM CPU
servers per model (one core each), their prefix caches
reset between runs (``/reset_prefix_cache``, VLLM_SERVER_DEV_MODE=1).
Simulated: two ``kvroute simulate --profile vllm-cpu-tiny --tokenizer MODEL_DIR``
processes, fresh for every run. Hit rates come from the engines' counters
(delta of vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total
summed over both servers); TTFT is the client's, streamed, through kvroute:
from sending the request to the first SSE event. Targets: hit rates within 0.02
of real vLLM's, TTFT p50 and p90 within 25%. ``--without-jitter`` also runs
the simulator with the profile's step jitter off, against the same real runs
(the jitter's effect at the same moment's load).

``--contention-probe``: the profile's load factor (``calibrate_sim.py``'s last
step: a real CPU engine's steps stretch when the machine is busy, the
simulator's sleeps do not) was fitted at the load of the calibration run, and
this machine's load from other work varies several-fold from hour to hour.
With the probe, each model's real servers run the calibration's loaded
phase before and after the held-out cases (unique prompts, round robin: not
the held-out workloads; the mean of the two is the target), the
simulator runs it at the profile's latencies x1 and x2, and the held-out
simulated runs use the factor that matches the real TTFT p50 then
(interpolated, as the calibration does). The factor is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.sim.engine import EngineParams  # noqa: E402
from benchmarks.calibrate_sim import (  # noqa: E402
    PARAMS,
    loaded_phase,
    sim_servers,
    simulate_args,
)
from benchmarks.measure import loadavg, measure, through_router  # noqa: E402
from benchmarks.real_vllm import reset_prefix_caches  # noqa: E402
from tests.real.engines import (  # noqa: E402
    NUM_BLOCKS,
    ensure_held_out_model,
    ensure_tiny_model,
)

PROFILE = "vllm-cpu-tiny"
POLICIES = ("round_robin", "prefix_affinity")
CONCURRENCY = 4
HIT_TARGET = 0.02
TTFT_TARGET = 0.25
#: Runs of the calibration's loaded phase (40 requests each) in a contention probe.
PROBE_REPEATS = 2
VOCAB = [
    *["order", "shipment", "warehouse", "invoice", "customer", "ledger", "audit", "policy"],
    *["contract", "renewal", "discount", "region", "quota", "forecast", "pipeline", "metric"],
    *["the", "a", "of", "for", "with", "when", "must", "never", "always", "and", "or", "if"],
]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def tenants_workload(seed: int, requests: int) -> list[list[dict[str, Any]]]:
    """Rounds of requests (here one round): tenants' system prompts of 150-550
    words (about 1.3 tokens each), Zipf-like popularity, varied questions and
    output lengths."""
    rng = random.Random(seed)
    count = 14
    systems = [f"Tenant {t} handbook. " + words(rng, rng.randint(150, 550)) for t in range(count)]
    weights = [1 / (t + 1) ** 0.8 for t in range(count)]
    bodies = []
    for i in range(requests):
        t = rng.choices(range(count), weights)[0]
        bodies.append(
            {
                "model": "tiny",
                "max_tokens": rng.randint(4, 24),
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": systems[t]},
                    {"role": "user", "content": f"Q{i}: " + words(rng, rng.randint(3, 60))},
                ],
            }
        )
    return [bodies]


def multiturn_workload(seed: int, conversations: int, turns: int) -> list[list[dict[str, Any]]]:
    """Round k holds turn k of every conversation (in random order): the history
    so far with fixed assistant replies, then a new user message."""
    rng = random.Random(seed)
    convs = []
    for c in range(conversations):
        history: list[dict[str, str]] = [
            {"role": "system", "content": f"Conversation {c}. " + words(rng, rng.randint(60, 200))}
        ]
        steps = []
        for k in range(turns):
            history = [
                *history,
                {"role": "user", "content": f"Turn {k}: " + words(rng, rng.randint(5, 50))},
            ]
            steps.append(
                {
                    "model": "tiny",
                    "max_tokens": rng.randint(6, 16),
                    "temperature": 0,
                    "messages": list(history),
                }
            )
            reply = words(rng, rng.randint(10, 40))
            history = [*history, {"role": "assistant", "content": reply}]
        convs.append(steps)
    rounds = []
    for k in range(turns):
        batch = [conv[k] for conv in convs]
        rng.shuffle(batch)
        rounds.append(batch)
    return rounds


def workloads(quick: bool) -> dict[str, list[list[dict[str, Any]]]]:
    if quick:
        return {"tenants": tenants_workload(11, 60), "multiturn": multiturn_workload(12, 6, 3)}
    return {"tenants": tenants_workload(11, 160), "multiturn": multiturn_workload(12, 10, 5)}


# -- one run --------------------------------------------------------------------


async def first_event(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed chat to its first SSE event; reads to the end."""
    started = time.perf_counter()
    ttft: float | None = None
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: "):
                ttft = time.perf_counter() - started
    assert ttft is not None
    return ttft


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    i = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[i]


async def run(
    urls: list[str],
    policy: str,
    rounds: list[list[dict[str, Any]]],
    concurrency: int = CONCURRENCY,
) -> dict[str, Any]:
    total = sum(len(r) for r in rounds)
    load_before = loadavg()
    async with through_router(urls, policy) as router, httpx.AsyncClient(timeout=300) as c:
        gate = asyncio.Semaphore(concurrency)
        ttfts: list[float] = []

        async def one(body: dict[str, Any]) -> None:
            async with gate:
                ttfts.append(await first_event(c, router + "/v1/chat/completions", body))

        async def send() -> None:
            for batch in rounds:
                await asyncio.gather(*(one(b) for b in batch))

        counted = await measure(c, urls, total, send)
    return {
        "requests": total,
        "hit_rate": counted.hit_rate,
        "hit_tokens": counted.hit_tokens,
        "query_tokens": counted.query_tokens,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": percentile(ttfts, 0.9),
        "ttft_mean": statistics.fmean(ttfts),
        "seconds": counted.seconds,
        "loadavg": [load_before, loadavg()],
        "ttfts": ttfts,
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one case: hits and queries summed, TTFTs pooled."""
    hits = sum(r["hit_tokens"] for r in runs)
    queries = sum(r["query_tokens"] for r in runs)
    ttfts = [t for r in runs for t in r["ttfts"]]
    return {
        "repeats": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "hit_rate": hits / queries if queries else 0.0,
        "hit_rate_by_repeat": [r["hit_rate"] for r in runs],
        "hit_tokens": hits,
        "query_tokens": queries,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": percentile(ttfts, 0.9),
        "ttft_mean": statistics.fmean(ttfts),
        "ttft_p50_by_repeat": [r["ttft_p50"] for r in runs],
        "seconds": sum(r["seconds"] for r in runs),
        "loadavg": [la for r in runs for la in r["loadavg"]],
        "ttfts": ttfts,
    }


async def reset_caches(urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        await reset_prefix_caches(c, urls)


async def measure_real_model(
    model: Path,
    loads: dict[str, list[list[dict[str, Any]]]],
    workdir: Path,
    repeats: int,
    probe: bool = False,
) -> dict[str, Any]:
    """The held-out cases on two real servers; with ``probe``, the calibration's
    loaded phase on them before and after (``out["probe"]``: the mean of their
    TTFT p50s and p90s, and each)."""
    from tests.real.engines import vllm_servers

    # /reset_prefix_cache is a dev-mode route; engines.py passes the environment on.
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    out: dict[str, Any] = {}
    with vllm_servers(workdir, model=model) as servers:
        urls = [s.url for s in servers]

        async def probed(when: str) -> dict[str, Any]:
            measured = await loaded_phase(urls, model, PROBE_REPEATS)
            taken = {k: measured[k] for k in ("p50", "p90", "loadavg")}
            print("real probe", when, model.name, taken, flush=True)
            return taken

        before = await probed("before") if probe else None
        for name, rounds in loads.items():
            for policy in POLICIES:
                runs = []
                for _ in range(repeats):
                    await reset_caches(urls)
                    runs.append(await run(urls, policy, rounds))
                    print("real", model.name, name, policy, summary(runs[-1]), flush=True)
                out[f"{name}/{policy}"] = pooled(runs)
        if before is not None:
            # Before and after the held-out runs: the machine's load drifts
            # over their few minutes; the factor is fitted to the mean.
            after = await probed("after")
            out["probe"] = {
                "p50": (before["p50"] + after["p50"]) / 2,
                "p90": (before["p90"] + after["p90"]) / 2,
                "before": before,
                "after": after,
            }
    return out


def sim_params(model: Path, factor: float = 1.0, **overrides: float) -> EngineParams:
    """The profile for ``model``, its latency parameters times ``factor``."""
    base = EngineParams.profile(
        PROFILE, num_blocks=NUM_BLOCKS, max_model_len=2048, tokenizer=str(model), **overrides
    )
    return dataclasses.replace(base, **{k: getattr(base, k) * factor for k in PARAMS})


async def contention_factor(model: Path, real_probe: dict[str, Any]) -> dict[str, Any]:
    """The factor on the profile's latencies at which the simulator's loaded
    phase matches the real one's TTFT p50 (x1 and x2 measured, interpolated,
    bounded to 0.5-4, then measured at the factor as a check)."""

    async def at(factor: float) -> dict[str, Any]:
        with sim_servers(simulate_args(sim_params(model, factor))) as urls:
            measured = await loaded_phase(urls, model, PROBE_REPEATS)
        print(f"sim probe x{factor:.2f}", {k: measured[k] for k in ("p50", "p90")}, flush=True)
        return {"factor": factor, **{k: measured[k] for k in ("p50", "p90", "loadavg")}}

    points = [await at(1.0), await at(2.0)]
    slope = points[1]["p50"] - points[0]["p50"]
    factor = 1.0 + (real_probe["p50"] - points[0]["p50"]) / slope if slope > 0 else 1.0
    factor = min(max(factor, 0.5), 4.0)
    points.append(await at(factor))
    return {"factor": factor, "real": real_probe, "sim": points}


async def measure_sim_model(
    model: Path,
    loads: dict[str, list[list[dict[str, Any]]]],
    repeats: int,
    params: EngineParams,
    tag: str = "sim",
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rounds in loads.items():
        for policy in POLICIES:
            runs = []
            for _ in range(repeats):
                with sim_servers(simulate_args(params)) as urls:
                    runs.append(await run(urls, policy, rounds))
                print(tag, model.name, name, policy, summary(runs[-1]), flush=True)
            out[f"{name}/{policy}"] = pooled(runs)
    return out


def summary(r: dict[str, Any]) -> str:
    return (
        f"hit {r['hit_rate']:.3f} ttft p50 {r['ttft_p50'] * 1000:.1f} ms "
        f"p90 {r['ttft_p90'] * 1000:.1f} ms ({r['seconds']} s, load {r['loadavg'][-1]})"
    )


def compare(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    hit_gap = sim["hit_rate"] - real["hit_rate"]
    p50 = sim["ttft_p50"] / real["ttft_p50"] - 1
    p90 = sim["ttft_p90"] / real["ttft_p90"] - 1
    return {
        "hit_rate_gap": hit_gap,
        "ttft_p50_error": p50,
        "ttft_p90_error": p90,
        "hit_ok": abs(hit_gap) <= HIT_TARGET,
        "ttft_ok": abs(p50) <= TTFT_TARGET and abs(p90) <= TTFT_TARGET,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(m, k) for m in result["models"] for k in result["models"][m]["real"]]
    short = {"round_robin": "RR", "prefix_affinity": "PA"}
    labels = [
        f"{m.split()[0].removeprefix('tiny-')}\n{k.split('/')[0]}\n{short[k.split('/')[1]]}"
        for m, k in cases
    ]
    x = range(len(cases))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, key, title in (
        (axes[0], "hit_rate", "prefix-cache hit rate (engine counters)"),
        (axes[1], "ttft_p50", "client TTFT p50 (ms)"),
        (axes[2], "ttft_p90", "client TTFT p90 (ms)"),
    ):
        scale = 1 if key == "hit_rate" else 1000
        sides = [("real", "real vLLM"), ("sim", f"simulator ({PROFILE})")]
        if all("sim_no_jitter" in v for v in result["models"].values()):
            sides.append(("sim_no_jitter", "simulator, no step jitter"))
        width = 0.8 / len(sides)
        for j, (side, label) in enumerate(sides):
            values = [result["models"][m][side][k][key] * scale for m, k in cases]
            ax.bar([i - 0.4 + width * (j + 0.5) for i in x], values, width, label=label)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Simulator fidelity on held-out workloads (2 servers, 81 blocks of 32 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--output", default="sim_fidelity")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case, pooled")
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the JSON")
    parser.add_argument(
        "--without-jitter",
        action="store_true",
        help="also run the simulator with step_jitter 0 (the profile before the jitter) "
        "against the same real runs",
    )
    parser.add_argument(
        "--contention-probe",
        action="store_true",
        help="refit the profile's load factor on the calibration's loaded phase, "
        "on the same real servers just before the held-out runs",
    )
    opts = parser.parse_args()
    out = ROOT / "benchmarks" / "results"
    if opts.replot:
        plot(json.loads((out / f"{opts.output}.json").read_text()), out / f"{opts.output}.png")
        return 0
    loads = workloads(opts.quick)
    models = {"tiny-llama (chatml)": ensure_tiny_model(), "tiny-llama3 (held out)": None}
    models["tiny-llama3 (held out)"] = ensure_held_out_model()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "profile": {"name": PROFILE, **sim_params(ensure_tiny_model()).__dict__},
        "setup": {
            "servers": 2,
            "num_blocks": NUM_BLOCKS,
            "concurrency": CONCURRENCY,
            "requests": {k: sum(len(r) for r in v) for k, v in loads.items()},
            "repeats": opts.repeats,
            "targets": {"hit_rate_gap": HIT_TARGET, "ttft_relative_error": TTFT_TARGET},
        },
        "models": {},
    }
    for label, model in models.items():
        assert model is not None
        with tempfile.TemporaryDirectory() as tmp:
            real = await measure_real_model(
                model, loads, Path(tmp), opts.repeats, opts.contention_probe
            )
        probe = real.pop("probe", None)
        contention = await contention_factor(model, probe) if probe is not None else None
        factor = contention["factor"] if contention is not None else 1.0
        sim = await measure_sim_model(model, loads, opts.repeats, sim_params(model, factor))
        result["models"][label] = {
            "dir": model.name,
            "real": real,
            "sim": sim,
            "comparison": {k: compare(real[k], sim[k]) for k in real},
        }
        if contention is not None:
            result["models"][label]["contention"] = contention
        if opts.without_jitter:
            flat = sim_params(model, factor, step_jitter=0.0)
            base = await measure_sim_model(model, loads, opts.repeats, flat, "sim, no jitter")
            result["models"][label]["sim_no_jitter"] = base
            result["models"][label]["comparison_no_jitter"] = {
                k: compare(real[k], base[k]) for k in real
            }
    cmp = [c for m in result["models"].values() for c in m["comparison"].values()]
    result["summary"] = {
        "max_abs_hit_rate_gap": max(abs(c["hit_rate_gap"]) for c in cmp),
        "max_abs_ttft_p50_error": max(abs(c["ttft_p50_error"]) for c in cmp),
        "max_abs_ttft_p90_error": max(abs(c["ttft_p90_error"]) for c in cmp),
        "hit_ok": all(c["hit_ok"] for c in cmp),
        "ttft_ok": all(c["ttft_ok"] for c in cmp),
        "cases_hit_ok": sum(c["hit_ok"] for c in cmp),
        "cases_ttft_p50_ok": sum(abs(c["ttft_p50_error"]) <= TTFT_TARGET for c in cmp),
        "cases_ttft_p90_ok": sum(abs(c["ttft_p90_error"]) <= TTFT_TARGET for c in cmp),
    }
    (out / f"{opts.output}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{opts.output}.png")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
