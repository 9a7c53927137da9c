"""prefix_affinity on traffic that shares nothing, in real time.

Four simulated vLLM replicas (``kvroute simulate``, the default latency model),
each its own process, behind one ``kvroute serve`` per policy, all on
127.0.0.1. Sixteen streaming clients in a closed loop send prompts that share
nothing (each a new random text of 500-1,500 tokens; 32 tokens out, or
``--max-tokens A-B`` drawn per request). Each round gives every policy
``--seconds`` of traffic (the first ``--warmup`` not counted), in an order
rotated every round, so that a slow spell of this shared machine spreads
over all policies. Per policy: TTFT p50/p90 over all its rounds, completed
requests per second, and the same as ratios to round robin from this run;
per run, the share of the machine other processes used.

``prefix_affinity_ring1`` is prefix_affinity with ``ring_choices: 1``, the
default before new prefixes were placed by requests awaiting their first
byte: a new prefix goes to its ring owner alone.

    .venv/bin/python benchmarks/no_sharing_live.py [--rounds 4] [--seconds 8]
        [--max-tokens 16-64] [--no-scrape]

Writes benchmarks/results/no_sharing_live.json; ``_varied`` in the name with
a range of output lengths, ``_no_scrape`` with ``--no-scrape`` (routers that
do not read the replicas' metrics, so their load is their own in-flight
count). Every loop is bounded by a duration or a count; every child process
is killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import (  # noqa: E402
    CLOCK_TICKS,
    HOST,
    BenchError,
    Children,
    cpu_seconds,
    free_port,
    machine_jiffies,
    terminate_on_sigterm,
    wait_port,
)
from benchmarks.routing import words  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "m"
REPLICAS = 4
CLIENTS = 16
#: Default EngineParams: 2,048 usable blocks of 16 tokens.
KV_TOKENS = 2048 * 16
POLICIES: dict[str, Any] = {
    "round_robin": "round_robin",
    "least_load": "least_load",
    "power_of_two": "power_of_two",
    "prefix_affinity": "prefix_affinity",
    "prefix_affinity_ring1": {"name": "prefix_affinity", "ring_choices": 1},
}


def start_fleet(
    children: Children, policies: list[str], scrape: bool
) -> tuple[list[int], dict[str, int]]:
    sims = [free_port() for _ in range(REPLICAS)]
    for i, port in enumerate(sims):
        argv = [sys.executable, "-m", "router.cli", "simulate", "--kind", "vllm"]
        argv += ["--host", HOST, "--port", str(port), "--model", MODEL]
        children.start(f"sim{i}", argv, "sim")
    routers = {}
    for name in policies:
        port = routers[name] = free_port()
        config = {
            "server": {"host": HOST, "port": port, "access_log": False},
            "endpoints": [
                {
                    "id": f"sim{i}",
                    "url": f"http://{HOST}:{p}",
                    "kind": "vllm",
                    "models": [MODEL],
                    "kv_capacity_tokens": KV_TOKENS,
                }
                for i, p in enumerate(sims)
            ],
            "models": {MODEL: {"policy": POLICIES[name]}},
            "scrape": {"enabled": scrape},
        }
        path = children.logdir / f"{name}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        argv = [sys.executable, "-m", "router.cli", "serve", "--config", str(path)]
        children.start(name, argv, "proxy")
    for i, port in enumerate(sims):
        wait_port(children, f"sim{i}", port)
    for name, port in routers.items():
        wait_port(children, name, port)
    return sims, routers


def prompt(rng: random.Random, tag: str) -> str:
    return f"{tag}: " + words(rng, rng.randint(500, 1500))


async def client(
    session: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    tag: str,
    stop_at: float,
    out_tokens: tuple[int, int],
    records: list[tuple[float, float, float]],
    errors: list[str],
) -> None:
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt(rng, f"{tag}-{n}")}],
            "max_tokens": rng.randint(*out_tokens),
            "stream": True,
        }
        sent = time.monotonic()
        first = None
        done = False
        try:
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    errors.append(f"{resp.status}: {(await resp.read())[:200]!r}")
                    await asyncio.sleep(0.1)
                    continue
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    # The simulator, like vLLM, sends its first chunk with the first token.
                    first = first or time.monotonic()
                    done = line.strip() == b"data: [DONE]"
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.append(repr(exc))
            await asyncio.sleep(0.1)
            continue
        if first is None or not done:
            errors.append("stream ended without a token or without [DONE]")
            continue
        records.append((sent, first - sent, time.monotonic()))


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


async def decisions(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """The router's routing decisions so far, by reason."""
    async with session.get(f"http://{HOST}:{port}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kvroute_routing_decisions_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def one_run(
    children: Children,
    sims: list[int],
    name: str,
    port: int,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        stats0 = [await get_json(session, f"http://{HOST}:{p}/sim/stats") for p in sims]
        reasons0 = await decisions(session, port)
        pids = [p.pid for p in children.procs.values()] + [os.getpid()]
        ours0, machine0 = sum(cpu_seconds(p) for p in pids), machine_jiffies()
        records: list[tuple[float, float, float]] = []
        errors: list[str] = []
        start = time.monotonic()
        stop_at = start + args.seconds
        url = f"http://{HOST}:{port}/v1/chat/completions"
        await asyncio.gather(
            *(
                client(
                    session,
                    url,
                    random.Random(seed * 100 + c),
                    f"{seed}.{c}",
                    stop_at,
                    args.out_tokens,
                    records,
                    errors,
                )
                for c in range(CLIENTS)
            )
        )
        ours1, machine1 = sum(cpu_seconds(p) for p in pids), machine_jiffies()
        stats1 = [await get_json(session, f"http://{HOST}:{p}/sim/stats") for p in sims]
        reasons1 = await decisions(session, port)
    window = (start + args.warmup, stop_at)
    capacity = len(os.sched_getaffinity(0)) * (machine1[1] - machine0[1]) / CLOCK_TICKS
    foreign = (machine1[0] - machine0[0]) / CLOCK_TICKS - (ours1 - ours0)
    served = [b["requests"] - a["requests"] for a, b in zip(stats0, stats1, strict=True)]
    return {
        "policy": name,
        "ttft": [ttft for sent, ttft, _ in records if window[0] <= sent < window[1]],
        "completed": sum(1 for _, _, end in records if window[0] <= end < window[1]),
        "window_s": window[1] - window[0],
        "errors": errors,
        "served_per_replica": served,
        "imbalance": max(served) / (sum(served) / len(served)) if sum(served) else 1.0,
        "reasons": {r: reasons1[r] - reasons0.get(r, 0.0) for r in reasons1},
        "foreign_cpu_pct": round(100 * foreign / max(capacity, 1e-9), 1),
    }


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarise(runs: list[dict[str, Any]], policies: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in policies:
        mine = [r for r in runs if r["policy"] == name]
        ttft = [t for r in mine for t in r["ttft"]]
        out[name] = {
            "requests": len(ttft),
            "ttft_p50_ms": 1000 * quantile(ttft, 0.5),
            "ttft_p90_ms": 1000 * quantile(ttft, 0.9),
            "req_per_s": sum(r["completed"] for r in mine) / sum(r["window_s"] for r in mine),
            "imbalance": statistics.mean(r["imbalance"] for r in mine),
            "errors": sum(len(r["errors"]) for r in mine),
            "foreign_cpu_pct_max": max(r["foreign_cpu_pct"] for r in mine),
        }
    base = out.get("round_robin")
    if base:
        for s in out.values():
            s["vs_round_robin"] = {
                k: round(s[k] / base[k], 3) for k in ("ttft_p50_ms", "ttft_p90_ms", "req_per_s")
            }
    return out


def per_round_ratios(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Each policy's TTFT p50/p90 over round robin's in the same round: the spread."""
    out: dict[str, Any] = {}
    for k in range(rounds):
        mine = {r["policy"]: r for r in runs if r["round"] == k}
        rr = mine.get("round_robin")
        if rr is None:
            continue
        for name, r in mine.items():
            row = out.setdefault(name, {"p50": [], "p90": []})
            row["p50"].append(round(quantile(r["ttft"], 0.5) / quantile(rr["ttft"], 0.5), 3))
            row["p90"].append(round(quantile(r["ttft"], 0.9) / quantile(rr["ttft"], 0.9), 3))
    return out


async def measure(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    policies = args.policies
    sims, routers = start_fleet(children, policies, not args.no_scrape)
    runs: list[dict[str, Any]] = []
    for k in range(args.rounds):
        order = policies[k % len(policies) :] + policies[: k % len(policies)]
        for name in order:
            run = await one_run(children, sims, name, routers[name], args, 1000 * k + 1)
            run["round"] = k
            runs.append(run)
            print(
                f"round {k} {name:22s} {len(run['ttft']):4d} requests  "
                f"ttft p50 {1000 * quantile(run['ttft'], 0.5):6.1f} ms  "
                f"p90 {1000 * quantile(run['ttft'], 0.9):6.1f} ms  "
                f"{run['completed'] / run['window_s']:5.1f} req/s  "
                f"served {run['served_per_replica']}  "
                f"other processes {run['foreign_cpu_pct']:4.1f}% of the machine",
                flush=True,
            )
    return {
        "summary": summarise(runs, policies),
        "per_round_ratios_to_round_robin": per_round_ratios(runs, args.rounds),
        "runs": runs,
    }


def meta(args: argparse.Namespace) -> dict[str, Any]:
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": git.stdout.strip(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "replicas": REPLICAS,
        "clients": CLIENTS,
        "prompt_tokens": "500-1500 (one word a token), every prompt new",
        "max_tokens": args.max_tokens,
        "latency_model": "kvroute simulate defaults (5 ms a step, 0.1 ms a prefill token, "
        "0.2 ms a decoding sequence)",
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "warmup_s": args.warmup,
        "routers_scrape_metrics": not args.no_scrape,
        "policies": {name: POLICIES[name] for name in args.policies},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="per policy and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument(
        "--max-tokens", default="32", help="tokens out: N, or A-B for a uniform draw per request"
    )
    parser.add_argument(
        "--no-scrape",
        action="store_true",
        help="routers do not scrape the replicas' metrics: load is their own in-flight count",
    )
    parser.add_argument(
        "--out", type=Path, help="default: results/no_sharing_live[_no_scrape].json"
    )
    args = parser.parse_args()
    low, _, high = args.max_tokens.partition("-")
    args.out_tokens = (int(low), int(high or low))
    if args.out is None:
        varied = "_varied" if args.out_tokens[0] != args.out_tokens[1] else ""
        scrape = "_no_scrape" if args.no_scrape else ""
        args.out = RESULTS / f"no_sharing_live{varied}{scrape}.json"
    if "round_robin" not in args.policies:
        parser.error("round_robin is the baseline: keep it in --policies")
    logdir = Path(tempfile.mkdtemp(prefix="kvroute-no-sharing-"))
    children = Children(logdir, {})
    try:
        with terminate_on_sigterm():
            info = meta(args)
            results = asyncio.run(measure(args, children))
    except BenchError as exc:
        print(f"error: {exc} (logs in {logdir})", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    report = {"meta": info, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(f"{'policy':22s} {'TTFT p50':>9s} {'p90':>9s} {'req/s':>7s}   vs round robin")
    for name, s in report["summary"].items():
        v = s.get("vs_round_robin", {})
        print(
            f"{name:22s} {s['ttft_p50_ms']:7.1f}ms {s['ttft_p90_ms']:7.1f}ms "
            f"{s['req_per_s']:7.2f}   p50 {v.get('ttft_p50_ms', 0):.2f}x  "
            f"p90 {v.get('ttft_p90_ms', 0):.2f}x  req/s {v.get('req_per_s', 0):.2f}x  "
            f"errors {s['errors']}"
        )
    busiest = max(r["foreign_cpu_pct"] for r in report["runs"])
    print(f"other processes used up to {busiest:.1f}% of the machine during a run")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
