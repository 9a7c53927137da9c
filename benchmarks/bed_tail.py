"""Where real vLLM CPU's TTFT tail comes from on this test bed, and how far it repeats.

    flock /tmp/kvroute-real.lock .venv/bin/python benchmarks/bed_tail.py --probe [--rounds 2]
    flock /tmp/kvroute-real.lock .venv/bin/python benchmarks/bed_tail.py --repeats-needed \
        [--repeats 12]
    .venv/bin/python benchmarks/bed_tail.py --probe --sim [--rounds 2]
    .venv/bin/python benchmarks/bed_tail.py --resolution
    .venv/bin/python benchmarks/bed_tail.py --judge [RUN ...]
    flock /tmp/kvroute-real.lock .venv/bin/python benchmarks/bed_tail.py --idle-spin

writes benchmarks/results/bed_tail.json (``--probe``; ``--resolution``,
``--judge`` and ``--idle-spin`` add theirs to the same file) and bed_tail.png.

``sim_fidelity.py`` compares the simulator's TTFT p50 and p90 with real vLLM's
on two vLLM CPU servers (tests/real/engines.py: one core each for the
engine's threads) on a 2-core machine that also runs the client and kvroute.
Each vLLM server is three processes (API server, engine core, worker); only
the worker's threads are bound to a core. ``--probe`` measures what the
client's TTFT is made of there, on the ChatML tiny Llama:

- **first and last chunk**: one completion of 100 prompt tokens and
  ``max_tokens`` 2-80 (``ignore_eos``), sent to one server while the other is
  idle, then to both at once; the client's time to the first streamed chunk
  and to the last. A front end (API server) with a core to run on streams
  each token as it comes (first chunk early, whatever the length); one
  without sends what it holds when it next runs.
- **what a tenants request waited for**: ``sim_fidelity``'s tenants
  workload (160 requests, concurrency 4), sent straight to the two servers
  in turn (the client's round robin, no router), each request's TTFT and its
  uncached prompt tokens (``usage``); each request is then classed by what
  its server was doing when it arrived: nothing, another request already
  streaming, or another request not yet at its first chunk.

``--rounds`` repeats both, a few minutes apart on the same servers: the
machine's state moves between them. ``--sim``: the same on two simulators
with the ``vllm-cpu-tiny`` profile as shipped (``sim_probe``,
bed_tail_sim.png); a fresh pair per run, so no cache to reset.

``--repeats-needed`` (real engines): how many repeats the fidelity targets
need here. ``sim_fidelity``'s four ChatML cases (tenants and multiturn,
round_robin and prefix_affinity through kvroute, caches reset before each)
run ``--repeats`` times each on the same two real servers, in
``sim_fidelity.schedule``'s rotated order, every run's TTFTs and hit counts
kept. Then for k = 1, 2, 4, ... runs: many random pairs of disjoint groups
of k runs of a case, each group pooled as the fidelity statistic pools its
repeats, judged against each other with the targets: the share of pairs
within 0.02 (hit rate) and 25 % (TTFT p50, p90). A simulator as good as
real vLLM could expect no better against a real side of k repeats.

``--resolution`` (no engines): how far the real side of the fidelity runs
agrees with itself. The interleaved runs made on a quiet machine ran the
same workloads on the same real servers with the same code (only their
simulated sides differ), so for each case the real TTFT p50, p90 and hit
rate of one run (pooled over its repeats) can be judged against another's
with the fidelity targets (25 %, 0.02): what a simulator that behaved
exactly as real vLLM does on this bed could expect.

``--judge`` (no engines): each interleaved fidelity run's simulated side
against ``--repeats-needed``'s real runs. Per ChatML case, the simulator's
error (TTFT p50, p90, hit rate) is placed among the errors of real vLLM
against itself at the same number of repeats: outside their central 95 %,
the simulator differs from real vLLM by more than real vLLM differs from
itself here, which no amount of luck explains.

``--idle-spin`` (real engine): one server's processes' CPU use, read from
/proc every 100 ms, after one short completion on an idle server. vLLM's
worker polls its shared-memory queue for a second after every message
(``MessageQueue.wait``, ``busy_loop_s``): on this bed each worker is pinned
to one of the two cores, so while traffic flows both cores are held.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.calibrate_sim import Prompts, stream  # noqa: E402
from benchmarks.measure import loadavg  # noqa: E402
from benchmarks.sim_fidelity import (  # noqa: E402
    CONCURRENCY,
    HIT_TARGET,
    TTFT_TARGET,
    percentile,
    pooled,
    tenants_workload,
)

RESULTS = ROOT / "benchmarks" / "results"
MAX_TOKENS = (2, 8, 20, 40, 80)
#: The interleaved fidelity runs made on a quiet machine (load average < 1
#: before them), 2026-12-01 17:53-18:45 UTC, 4 repeats per case each.
QUIET_RUNS = (
    "sim_fidelity_interleaved_calm",
    "sim_fidelity_interleaved_stall",
    "sim_fidelity_interleaved_stall_low",
)


# -- the probe (real engines) ---------------------------------------------------------


def prompts_of(prompts: Prompts, count: int) -> list[str]:
    """``count`` new prompts of 100 tokens (each its own first block)."""
    return [prompts.make(100) for _ in range(count)]


async def first_and_last(
    client: httpx.AsyncClient, urls: list[str], prompts: Prompts, repeats: int
) -> list[dict[str, Any]]:
    """Per number of busy servers and ``max_tokens``: the medians of the
    first chunk's and the last chunk's time (ms) on the first server."""
    rows = []
    for busy in (1, len(urls)):
        for n in MAX_TOKENS:
            first, last = [], []
            for _ in range(repeats):
                body = {
                    "model": "tiny",
                    "max_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                got = await asyncio.gather(
                    *(
                        stream(client, url, "/v1/completions", {**body, "prompt": prompt})
                        for url, prompt in zip(urls[:busy], prompts_of(prompts, busy), strict=True)
                    )
                )
                first.append(got[0]["ttft"] * 1000)
                last.append(got[0]["last"] * 1000)
            rows.append(
                {
                    "busy_servers": busy,
                    "max_tokens": n,
                    "first_ms": statistics.median(first),
                    "last_ms": statistics.median(last),
                    "first_over_last": statistics.median(
                        f / la for f, la in zip(first, last, strict=True)
                    ),
                }
            )
            print(
                f"  busy {busy} max_tokens {n:3}: first {rows[-1]['first_ms']:6.1f} ms, "
                f"last {rows[-1]['last_ms']:6.1f} ms",
                flush=True,
            )
    return rows


async def tenants_requests(client: httpx.AsyncClient, urls: list[str]) -> list[dict[str, Any]]:
    """The tenants workload straight to the servers in turn; per request its
    server, times (s from the run's start) and usage."""
    gate = asyncio.Semaphore(CONCURRENCY)
    turn = itertools.count()
    out: list[dict[str, Any]] = []
    start = time.perf_counter()

    async def one(body: dict[str, Any]) -> None:
        async with gate:
            server = next(turn) % len(urls)
            sent = time.perf_counter() - start
            got = await stream(client, urls[server], "/v1/chat/completions", body)
            usage = got["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            out.append(
                {
                    "server": server,
                    "sent": sent,
                    "ttft": got["ttft"],
                    "end": sent + got["last"],
                    "uncached": usage.get("prompt_tokens", 0) - cached,
                }
            )

    await asyncio.gather(*(one(b) for b in tenants_workload(11, 160)[0]))
    return out


def by_server_state(requests: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """TTFT p50/p90 (ms) of the requests by what their server was doing
    when each arrived: ``alone`` (nothing), ``streaming`` (others, all past
    their first chunk), ``before_first`` (another not yet at its first chunk)."""
    groups: dict[str, list[dict[str, Any]]] = {"alone": [], "streaming": [], "before_first": []}
    for r in requests:
        others = [
            o
            for o in requests
            if o is not r and o["server"] == r["server"] and o["sent"] < r["sent"] < o["end"]
        ]
        if not others:
            groups["alone"].append(r)
        elif all(o["sent"] + o["ttft"] <= r["sent"] for o in others):
            groups["streaming"].append(r)
        else:
            groups["before_first"].append(r)
    return {
        name: {
            "requests": len(rs),
            "ttft_p50_ms": percentile([r["ttft"] for r in rs], 0.5) * 1000 if rs else 0.0,
            "ttft_p90_ms": percentile([r["ttft"] for r in rs], 0.9) * 1000 if rs else 0.0,
            "uncached_p50": percentile([r["uncached"] for r in rs], 0.5) if rs else 0.0,
        }
        for name, rs in groups.items()
    }


@contextlib.contextmanager
def servers(sim: bool) -> Iterator[list[str]]:
    """Two real vLLM servers of the ChatML tiny Llama, or (``sim``) two
    simulators with the ``vllm-cpu-tiny`` profile as it ships (x1, no fit)."""
    from benchmarks.calibrate_sim import sim_servers, simulate_args
    from benchmarks.sim_fidelity import sim_params
    from tests.real.engines import ensure_tiny_model, vllm_servers

    model = ensure_tiny_model()
    if sim:
        with sim_servers(simulate_args(sim_params(model))) as urls:
            yield urls
        return
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    with tempfile.TemporaryDirectory() as tmp, vllm_servers(Path(tmp), model=model) as real:
        yield [s.url for s in real]


#: /proc/<pid>/stat ticks per second.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> dict[int, str]:
    """``root`` and every process below it: pid -> its name (``comm``; vLLM
    names its engine core and worker ``VLLM::EngineCore``, ``VLLM::Worker``)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            names[int(entry.name)] = name
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in names:
            out[pid] = names[pid]
            todo.extend(children.get(pid, ()))
    return out


def labelled(tree: dict[int, str]) -> dict[int, str]:
    """Names made unique (the API server and multiprocessing's helpers are
    all ``python``): the second and later of a name get ``#2``, ``#3``, by pid."""
    seen: dict[str, int] = {}
    out = {}
    for pid in sorted(tree):
        name = tree[pid]
        seen[name] = seen.get(name, 0) + 1
        out[pid] = name if seen[name] == 1 else f"{name}#{seen[name]}"
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def idle_spin(window: float = 0.1, seconds: float = 3.0) -> dict[str, Any]:
    """One real vLLM server, idle, then one short completion: each of its
    processes' CPU use (share of a core) in ``window``-second windows, from
    just before the request to ``seconds`` after its answer. A process that
    waits by polling (sched_yield in a loop) shows a full core while it
    waits; one that blocks shows none."""
    from tests.real.engines import vllm_servers

    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 8, "temperature": 0}
    with tempfile.TemporaryDirectory() as tmp, vllm_servers(Path(tmp), count=1) as real:
        server = real[0]
        async with httpx.AsyncClient(timeout=60) as client:
            await client.post(server.url + "/v1/completions", json=body)  # warm
            await asyncio.sleep(3.0)  # past any busy loop the warm-up started
            tree = labelled(process_tree(server.process.pid))
            before = {pid: cpu_seconds(pid) for pid in tree}
            await asyncio.sleep(window)
            idle = {pid: (cpu_seconds(pid) - before[pid]) / window for pid in tree}
            started = time.perf_counter()
            await client.post(server.url + "/v1/completions", json=body)
            answered = time.perf_counter() - started
            samples = []
            last = {pid: cpu_seconds(pid) for pid in tree}
            for k in range(round(seconds / window)):
                await asyncio.sleep(window)
                now = {pid: cpu_seconds(pid) for pid in tree}
                samples.append(
                    {
                        "after_s": round((k + 1) * window, 3),
                        "cpu": {tree[pid]: (now[pid] - last[pid]) / window for pid in tree},
                    }
                )
                last = now
    return {
        "window_s": window,
        "request_s": answered,
        "processes": sorted(set(tree.values())),
        "idle_cpu": {tree[pid]: share for pid, share in idle.items()},
        "after_request": samples,
    }


async def probe(rounds: int, pause: float, repeats: int, sim: bool) -> list[dict[str, Any]]:
    """``rounds`` rounds on the same two real servers (their caches reset
    before each tenants run), or on a fresh pair of simulators each (``sim``:
    the simulator has no cache reset)."""
    from tests.real.engines import ensure_tiny_model

    prompts = Prompts(ensure_tiny_model(), seed=9)
    out = []
    async with httpx.AsyncClient(timeout=120) as client:
        if sim:
            for k in range(rounds):
                with servers(True) as urls:
                    await warm_up(client, urls, prompts)
                    out.append(await one_round(k, client, urls, prompts, repeats))
            return out
        with servers(False) as urls:
            await warm_up(client, urls, prompts)
            for k in range(rounds):
                if k:
                    await asyncio.sleep(pause)
                out.append(await one_round(k, client, urls, prompts, repeats, reset=True))
    return out


async def warm_up(client: httpx.AsyncClient, urls: list[str], prompts: Prompts) -> None:
    """Fresh servers answer their first requests several times slower."""
    body = {"model": "tiny", "max_tokens": 4}
    for _ in range(3):
        await asyncio.gather(
            *(
                stream(client, url, "/v1/completions", {**body, "prompt": prompts.make(300)})
                for url in urls
            )
        )


async def one_round(
    k: int,
    client: httpx.AsyncClient,
    urls: list[str],
    prompts: Prompts,
    repeats: int,
    reset: bool = False,
) -> dict[str, Any]:
    from benchmarks.sim_fidelity import reset_caches

    started = time.strftime("%H:%M:%S", time.gmtime())
    load = loadavg()
    print(f"round {k} ({started} UTC, load {load})", flush=True)
    chunks = await first_and_last(client, urls, prompts, repeats)
    if reset:
        await reset_caches(urls)
    requests = await tenants_requests(client, urls)
    ttfts = [r["ttft"] for r in requests]
    row = {
        "round": k,
        "started_utc": started,
        "loadavg": [load, loadavg()],
        "first_and_last": chunks,
        "tenants": {
            "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
            "ttft_p90_ms": percentile(ttfts, 0.9) * 1000,
            "by_server_state": by_server_state(requests),
        },
        "requests": requests,
    }
    print("  tenants", json.dumps(row["tenants"]), flush=True)
    return row


# -- repeats needed (real engines) ----------------------------------------------------


async def real_case_runs(repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Every ChatML fidelity case ``repeats`` times on two real servers,
    rotated order; per case its runs (``sim_fidelity.run``'s rows)."""
    from benchmarks.sim_fidelity import POLICIES, reset_caches, run, schedule, workloads
    from tests.real.engines import ensure_tiny_model

    loads = workloads(quick=False)
    cases = [f"{name}/{policy}" for name in loads for policy in POLICIES]
    out: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    with servers(False) as urls:
        async with httpx.AsyncClient(timeout=120) as client:
            await warm_up(client, urls, Prompts(ensure_tiny_model(), seed=9))
        for k, (repeat, case) in enumerate(schedule(cases, repeats)):
            name, policy = case.split("/")
            await reset_caches(urls)
            row = await run(urls, policy, loads[name])
            out[case].append(row)
            print(
                f"  {k + 1}/{len(cases) * repeats} repeat {repeat} {case}: hit "
                f"{row['hit_rate']:.3f}, TTFT p50 {row['ttft_p50'] * 1000:.0f} ms, "
                f"p90 {row['ttft_p90'] * 1000:.0f} ms",
                flush=True,
            )
    return out


def group_agreement(
    runs: dict[str, list[dict[str, Any]]], sizes: Sequence[int], draws: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """For each group size k (at most half the runs of a case): ``draws``
    random pairs of disjoint k-run groups per case, each pooled (hits and
    queries summed, TTFTs pooled), and the share of pairs whose hit rates,
    TTFT p50s and p90s agree within the fidelity targets."""
    rng = random.Random(seed)
    out = []
    for k in sizes:
        within = {"hit": 0, "p50": 0, "p90": 0}
        pairs = 0
        for case_runs in runs.values():
            if 2 * k > len(case_runs):
                continue
            for _ in range(draws):
                picked = rng.sample(case_runs, 2 * k)
                a, b = pooled(picked[:k]), pooled(picked[k:])
                pairs += 1
                within["hit"] += abs(a["hit_rate"] - b["hit_rate"]) <= HIT_TARGET
                for q in ("p50", "p90"):
                    within[q] += abs(b[f"ttft_{q}"] / a[f"ttft_{q}"] - 1) <= TTFT_TARGET
        if pairs:
            out.append({"runs": k, "pairs": pairs, **{q: n / pairs for q, n in within.items()}})
    return out


# -- resolution (no engines) --------------------------------------------------------


def resolution(names: tuple[str, ...] = QUIET_RUNS, results: Path = RESULTS) -> dict[str, Any]:
    """Every pair of runs, every model and case both have: the relative
    difference of the real TTFT p50 and p90, the difference of the hit rate,
    and how many of them the fidelity targets would pass."""
    runs = {n: json.loads((results / f"{n}.json").read_text())["models"] for n in names}
    rows = []
    for a, b in itertools.combinations(names, 2):
        for model, ra in runs[a].items():
            rb = runs[b].get(model, {})
            for case, x in ra["real"].items():
                y = rb.get("real", {}).get(case)
                if y is None:
                    continue
                rows.append(
                    {
                        "runs": [a, b],
                        "model": model,
                        "case": case,
                        "p50": y["ttft_p50"] / x["ttft_p50"] - 1,
                        "p90": y["ttft_p90"] / x["ttft_p90"] - 1,
                        "hit": y["hit_rate"] - x["hit_rate"],
                    }
                )
    return {
        "runs": list(names),
        "comparisons": len(rows),
        "within": {
            "p50": sum(abs(r["p50"]) <= TTFT_TARGET for r in rows),
            "p90": sum(abs(r["p90"]) <= TTFT_TARGET for r in rows),
            "hit": sum(abs(r["hit"]) <= HIT_TARGET for r in rows),
        },
        "rows": rows,
    }


#: The fidelity runs the judge reads (every interleaved run with ChatML cases).
JUDGED_RUNS = ("sim_fidelity_interleaved", *QUIET_RUNS)
#: The model whose cases ``--repeats-needed`` ran on real engines.
REFERENCE_MODEL = "tiny-llama (chatml)"


def spread_of(
    case_runs: list[dict[str, Any]], k: int, draws: int, rng: random.Random
) -> dict[str, list[float]]:
    """Real against real: ``draws`` random pairs of disjoint k-run groups of
    one case, pooled; each pair's TTFT p50 and p90 relative difference (b / a
    - 1) and hit rate difference (b - a), each list sorted. Either group is
    a or b alike, so the errors fall around 0 as far as the engines wander."""
    out: dict[str, list[float]] = {"p50": [], "p90": [], "hit": []}
    for _ in range(draws):
        picked = rng.sample(case_runs, 2 * k)
        a, b = pooled(picked[:k]), pooled(picked[k:])
        out["hit"].append(b["hit_rate"] - a["hit_rate"])
        for q in ("p50", "p90"):
            out[q].append(b[f"ttft_{q}"] / a[f"ttft_{q}"] - 1)
    return {q: sorted(v) for q, v in out.items()}


def judge(
    names: tuple[str, ...] = JUDGED_RUNS,
    results: Path = RESULTS,
    reference: dict[str, list[dict[str, Any]]] | None = None,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Each fidelity run's simulated side against real vLLM's own spread.

    For every ChatML case of every run in ``names``: the simulator's error
    (TTFT p50 and p90: sim / real - 1; hit rate: sim - real) and where it
    falls among the errors of real vLLM against itself at the same number of
    repeats (``spread_of`` over ``--repeats-needed``'s runs of that case):
    ``rank`` is the share of real-against-real errors below it, and the
    simulator is ``inside`` when it lies within their central 95 %. Outside
    means the simulator differs from real vLLM by more than real vLLM
    differs from itself on this bed: a gap in the simulator, not luck.
    Inside is not the fidelity target (25 %, 0.02): it says only that this bed
    could not tell the two apart."""
    if reference is None:
        reference = json.loads((results / "bed_tail.json").read_text())["repeats_needed"]["runs"]
    rng = random.Random(seed)
    spreads: dict[tuple[str, int], dict[str, list[float]]] = {}
    rows = []
    for name in names:
        model = json.loads((results / f"{name}.json").read_text())["models"].get(REFERENCE_MODEL)
        if model is None:
            continue
        for case, real in model["real"].items():
            runs, sim = reference.get(case), model["sim"].get(case)
            k = real["repeats"]
            if runs is None or sim is None or 2 * k > len(runs):
                continue
            spread = spreads.get((case, k))
            if spread is None:
                spread = spreads[case, k] = spread_of(runs, k, draws, rng)
            errors = {
                "p50": sim["ttft_p50"] / real["ttft_p50"] - 1,
                "p90": sim["ttft_p90"] / real["ttft_p90"] - 1,
                "hit": sim["hit_rate"] - real["hit_rate"],
            }
            row: dict[str, Any] = {"run": name, "case": case, "repeats": k}
            for q, error in errors.items():
                ref = spread[q]
                low, high = ref[int(0.025 * len(ref))], ref[int(0.975 * len(ref)) - 1]
                row[q] = {
                    "error": error,
                    "rank": bisect.bisect_left(ref, error) / len(ref),
                    "real_band": [low, high],
                    "inside": low <= error <= high,
                }
            rows.append(row)
    return judged(rows)


def judged(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``judge``'s rows and how many are inside real vLLM's spread, by measure."""
    return {
        "reference": "repeats_needed",
        "model": REFERENCE_MODEL,
        "judged": len(rows),
        "inside": {q: sum(r[q]["inside"] for r in rows) for q in ("hit", "p50", "p90")},
        "rows": rows,
    }


def plot(rounds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rounds), figsize=(5 * len(rounds), 4), squeeze=False)
    for ax, r in zip(axes[0], rounds, strict=True):
        for busy, style in ((1, "-"), (2, "--")):
            pts = [c for c in r["first_and_last"] if c["busy_servers"] == busy]
            xs = [c["max_tokens"] for c in pts]
            for key, mark in (("first", "o"), ("last", "s")):
                ys = [c[f"{key}_ms"] for c in pts]
                ax.plot(xs, ys, mark + style, label=f"{key} chunk, {busy} busy")
        ax.set_title(f"round {r['round']} ({r['started_utc']} UTC)")
        ax.set_xlabel("max_tokens (100-token prompt)")
        ax.set_ylabel("ms from sending")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="run the real engines' probe")
    parser.add_argument("--resolution", action="store_true", help="real against real, from JSON")
    parser.add_argument(
        "--judge",
        nargs="*",
        metavar="RUN",
        help="each fidelity run's simulator against real's spread (RUN: results/RUN.json;"
        " default: the interleaved runs of 2026-12-01)",
    )
    parser.add_argument(
        "--sim", action="store_true", help="the probe on two simulators (profile as shipped)"
    )
    parser.add_argument(
        "--repeats-needed",
        action="store_true",
        help="real engines: the fidelity cases --repeats times; agreement by group size",
    )
    parser.add_argument(
        "--idle-spin",
        action="store_true",
        help="real engine: its processes' CPU use after one request",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pause", type=float, default=120.0, help="seconds between rounds")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="requests per first/last point (default 6); runs per case (default 12)",
    )
    args = parser.parse_args()
    if not (
        args.probe
        or args.resolution
        or args.repeats_needed
        or args.idle_spin
        or args.judge is not None
    ):
        parser.error("--probe, --repeats-needed, --resolution, --idle-spin and/or --judge")
    path = RESULTS / "bed_tail.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.probe:
        key = "sim_probe" if args.sim else "probe"
        result[key] = asyncio.run(probe(args.rounds, args.pause, args.repeats or 6, args.sim))
        plot(result[key], RESULTS / f"bed_tail{'_sim' if args.sim else ''}.png")
    if args.repeats_needed:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        runs = asyncio.run(real_case_runs(args.repeats or 12))
        sizes = [1, 2, 3, 4, 6, 8]
        result["repeats_needed"] = {
            "started": started,
            "agreement": group_agreement(runs, sizes),
            "runs": runs,
        }
        for row in result["repeats_needed"]["agreement"]:
            print(
                f"groups of {row['runs']}: within target hit {row['hit']:.0%}, "
                f"p50 {row['p50']:.0%}, p90 {row['p90']:.0%} ({row['pairs']} pairs)"
            )
    if args.resolution:
        result["resolution"] = resolution()
        res = result["resolution"]
        print(f"real against real, {res['comparisons']} comparisons: within target", res["within"])
    if args.idle_spin:
        result["idle_spin"] = spin = asyncio.run(idle_spin())
        print(f"request {spin['request_s'] * 1000:.0f} ms; idle CPU", spin["idle_cpu"])
        for row in spin["after_request"]:
            shares = ", ".join(f"{n} {c:.0%}" for n, c in sorted(row["cpu"].items()) if c >= 0.05)
            print(f"  +{row['after_s']:.1f} s: {shares or 'idle'}")
    if args.judge is not None:
        names = tuple(args.judge) or JUDGED_RUNS
        fresh = judge(names)["rows"]
        # Runs judged before and not now keep their rows.
        kept = [r for r in result.get("judge", {}).get("rows", []) if r["run"] not in names]
        result["judge"] = judged(kept + fresh)
        for row in fresh:
            print(
                f"{row['run']:36s} {row['case']:26s}",
                "  ".join(
                    f"{q} {row[q]['error']:+.3f} (rank {row[q]['rank']:.2f},"
                    f" {'inside' if row[q]['inside'] else 'OUTSIDE'})"
                    for q in ("hit", "p50", "p90")
                ),
            )
        now = judged(fresh)
        print("inside real's own 95 % spread:", now["inside"], "of", now["judged"])
    path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
