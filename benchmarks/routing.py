"""Routing quality: policies over simulated fleets, in virtual time.

Each replica is the simulator's own engine (backends/sim/engine.py: vLLM-like
block cache, continuous batching, the latency model) driven step by step by
a discrete-event loop instead of asyncio sleeps, so a run is deterministic,
takes seconds, and measures the policies rather than this machine's two
cores. Routing goes through the real policy objects (policies/), fed the
views the router would build (its own in-flight counts, the replicas'
queue lengths). Hit rates come from the engines' own counters.

    .venv/bin/python benchmarks/routing.py [--quick]

Writes benchmarks/results/routing.json and routing.png; prints progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.sim.engine import Engine, EngineParams, Sequence_, Step  # noqa: E402
from backends.sim.kvcache import block_hashes as kv_block_hashes  # noqa: E402
from backends.sim.tokenizer import render_chatml, token_ids, tokenize  # noqa: E402
from policies import EndpointView, RequestView, build_policy  # noqa: E402
from policies.base import Decision, load_of  # noqa: E402
from policies.ring import bounded_capacity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ("round_robin", "least_load", "consistent_hash", "prefix_affinity", "oracle")

# A mid-size model on one GPU, scaled down: 12k tokens of KV cache per replica.
ENGINE = EngineParams(
    block_size=16,
    num_blocks=769,
    max_num_seqs=32,
    max_batched_tokens=2048,
    max_model_len=16384,
    step_base=0.010,
    prefill_per_token=0.0001,
    decode_per_seq=0.0004,
)
KV_TOKENS = (ENGINE.num_blocks - 1) * ENGINE.block_size


def words(rng: random.Random, n: int) -> str:
    vocab = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "eta")
    return " ".join(rng.choice(vocab) + str(rng.randint(0, 99)) for _ in range(n // 2))


@dataclass
class Request:
    messages: list[dict[str, str]]
    max_tokens: int
    arrival: float
    conversation: int | None = None
    turn: int = 0


@dataclass
class Workload:
    name: str
    description: str
    #: arrivals known up front, and a hook for follow-ups (multi-turn)
    initial: list[Request]
    follow_up: Callable[[Request, str, float, random.Random], Request | None] | None = None


def poisson_ramp(rng: random.Random, duration: float, peak: float) -> list[float]:
    """Arrival times whose rate ramps linearly from peak/10 to peak."""
    out, t = [], 0.0
    while t < duration:
        rate = peak * (0.1 + 0.9 * t / duration)
        t += rng.expovariate(rate)
        if t < duration:
            out.append(t)
    return out


def shared_contexts(n: int, rng: random.Random, duration: float, peak: float) -> Workload:
    customers = [words(rng, 2000) for _ in range(4 * n)]
    reqs = []
    for t in poisson_ramp(rng, duration, peak):
        c = rng.randrange(len(customers))
        user = rng.randrange(4)
        reqs.append(
            Request(
                [
                    {"role": "system", "content": f"Customer {c} context:\n{customers[c]}"},
                    {"role": "user", "content": f"user {user}: {words(rng, 30)}"},
                ],
                32,
                t,
            )
        )
    return Workload(
        "shared_contexts",
        f"{4 * n} customers, each with a ~2000-token shared context (total {4 * n * 2000} tokens"
        f" = {4 * n * 2000 / KV_TOKENS:.1f}x one replica's KV), 4 users each asking ~30-token"
        " questions; Poisson arrivals ramping to past saturation",
        reqs,
    )


def multi_turn(n: int, rng: random.Random, duration: float, peak: float) -> Workload:
    convs = 8 * n
    systems = [words(rng, 300) for _ in range(convs)]
    starts = sorted(rng.uniform(0, duration / 3) for _ in range(convs))
    reqs = [
        Request(
            [
                {"role": "system", "content": systems[i]},
                {"role": "user", "content": words(rng, 60)},
            ],
            48,
            t,
            conversation=i,
        )
        for i, t in enumerate(starts)
    ]

    def follow(req: Request, reply: str, now: float, rng: random.Random) -> Request | None:
        if req.turn >= 7:
            return None
        messages = [
            *req.messages,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": words(rng, 60)},
        ]
        return Request(messages, 48, now + rng.expovariate(1.0), req.conversation, req.turn + 1)

    return Workload(
        "multi_turn",
        f"{convs} conversations (~300-token system prompt each), 8 turns of ~60 user tokens"
        " and 48 generated, the next turn ~1 s after the reply",
        reqs,
        follow,
    )


def shared_system_prompt(n: int, rng: random.Random, duration: float, peak: float) -> Workload:
    system = words(rng, 6000)
    reqs = [
        Request(
            [{"role": "system", "content": system}, {"role": "user", "content": words(rng, 30)}],
            32,
            t,
        )
        for t in poisson_ramp(rng, duration, peak)
    ]
    return Workload(
        "shared_system_prompt",
        "one ~6000-token system prompt for every request, a unique ~30-token question",
        reqs,
    )


def no_sharing(n: int, rng: random.Random, duration: float, peak: float) -> Workload:
    reqs = [
        Request([{"role": "user", "content": words(rng, 1000)}], 32, t)
        for t in poisson_ramp(rng, duration, peak)
    ]
    return Workload("no_sharing", "unique ~1000-token prompts", reqs)


WORKLOADS = {
    "shared_contexts": (shared_contexts, 12.0),  # peak arrivals per second per replica
    "multi_turn": (multi_turn, 0.0),
    "shared_system_prompt": (shared_system_prompt, 12.0),
    "no_sharing": (no_sharing, 12.0),
}


class Oracle:
    """Knows every engine's cache: the longest real hit among replicas not
    overloaded (the same bounded-load rule as prefix_affinity), else least load."""

    name = "oracle"

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = engines
        self.hashes: list[int] = []
        self.num_tokens = 0

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        cap = bounded_capacity(candidates, 0.25, 4.0)
        hits = {
            e.id: len(self.engines[int(e.id)].cache.longest_hit(self.hashes, self.num_tokens))
            for e in candidates
        }
        ranked = sorted(
            candidates,
            key=lambda e: (load_of(e) + 1 > cap[e.id], -hits[e.id], load_of(e)),
        )
        return Decision(tuple(ranked), "oracle")

    def observe(self, decision: Decision, endpoint_id: str, ok: bool) -> None:
        return None

    def forget(self, endpoint_id: str) -> None:
        return None


@dataclass
class RunResult:
    hit_rate: float
    ttft_p50: float
    ttft_p90: float
    throughput: float
    imbalance: float
    completed: int
    per_replica_hit: list[float] = field(default_factory=list)


def simulate(n: int, workload: Workload, policy_name: str, duration: float) -> RunResult:
    engines = [Engine(ENGINE) for _ in range(n)]
    rng = random.Random(7)
    if policy_name == "oracle":
        policy: Any = Oracle(engines)
    else:
        policy = build_policy(policy_name, {}, random.Random(1))
    in_flight = [0] * n
    busy = [False] * n
    active: list[dict[Sequence_, Request]] = [{} for _ in range(n)]
    load_area = [0.0] * n
    last_t = 0.0
    events: list[tuple[float, int, str, Any]] = []
    counter = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, payload))

    for req in workload.initial:
        push(req.arrival, "arrive", req)
    ttfts: list[float] = []
    done_times: list[float] = []

    def start_step(i: int, now: float) -> None:
        step = engines[i].plan_step()
        if step is None:
            busy[i] = False
            return
        busy[i] = True
        push(now + step.seconds, "step", (i, step))

    while events:
        t, _, kind, payload = heapq.heappop(events)
        for i in range(n):
            load_area[i] += in_flight[i] * (t - last_t)
        last_t = t
        if kind == "arrive":
            req: Request = payload
            prompt = render_chatml(req.messages)
            views = [
                EndpointView(
                    id=str(i),
                    url="",
                    kind="vllm",
                    in_flight=in_flight[i],
                    waiting=float(len(engines[i].waiting)),
                    kv_capacity_tokens=KV_TOKENS,
                )
                for i in range(n)
            ]
            if isinstance(policy, Oracle):
                ids = token_ids(tokenize(prompt))
                policy.hashes = kv_block_hashes(ids, ENGINE.block_size)
                policy.num_tokens = len(ids)
            body = {"model": "m", "messages": req.messages}
            view = RequestView(model="m", endpoint="chat", body=body)
            decision = policy.rank(view, views)
            i = int(decision.ranked[0].id)
            seq = engines[i].submit(prompt, req.max_tokens, now=t, run=False)
            active[i][seq] = req
            in_flight[i] += 1
            if not busy[i]:
                start_step(i, t)
        else:
            i, step = payload
            step_: Step = step
            engines[i].finish_step(step_, t)
            for seq in [s for s in active[i] if s.done]:
                req = active[i].pop(seq)
                in_flight[i] -= 1
                if seq.first_token_at is not None:
                    ttfts.append(seq.first_token_at - seq.arrival)
                done_times.append(t)
                if workload.follow_up is not None:
                    nxt = workload.follow_up(req, "".join(seq.output), t, rng)
                    if nxt is not None:
                        push(nxt.arrival, "arrive", nxt)
            start_step(i, t)
    queries = sum(e.stats.queries for e in engines)
    hits = sum(e.stats.hits for e in engines)
    horizon = max(done_times) if done_times else 1.0
    window = (duration / 2, duration)
    in_window = sum(1 for d in done_times if window[0] <= d < window[1])
    mean_load = [a / horizon for a in load_area]
    return RunResult(
        hit_rate=hits / queries if queries else 0.0,
        ttft_p50=statistics.median(ttfts),
        ttft_p90=statistics.quantiles(ttfts, n=10)[-1],
        throughput=in_window / (window[1] - window[0]),
        imbalance=max(mean_load) / (sum(mean_load) / n) if sum(mean_load) else 1.0,
        completed=len(done_times),
        per_replica_hit=[
            e.stats.hits / e.stats.queries if e.stats.queries else 0.0 for e in engines
        ],
    )


def decision_latency(
    endpoints: int = 64, prompt_chars: int = 32_000, n: int = 2000
) -> dict[str, float]:
    rng = random.Random(3)
    policy = build_policy("prefix_affinity", {}, random.Random(0))
    views = [
        EndpointView(
            id=f"e{i}", url="", kind="vllm", in_flight=rng.randint(0, 8), kv_capacity_tokens=500_000
        )
        for i in range(endpoints)
    ]
    tenants = [words(rng, prompt_chars // 4)[: prompt_chars - 100] for _ in range(200)]
    samples = []
    for k in range(n):
        body = {
            "model": "m",
            "messages": [
                {"role": "system", "content": tenants[k % 200]},
                {"role": "user", "content": f"q{k}"},
            ],
        }
        req = RequestView(model="m", endpoint="chat", body=body)
        t0 = time.perf_counter()
        policy.rank(req, views)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "endpoints": endpoints,
        "prompt_chars": prompt_chars,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def index_memory(prefixes: int = 1_000_000, cap: int = 200_000) -> dict[str, float]:
    from policies.prefix_index import PrefixIndex

    tracemalloc.start()
    index = PrefixIndex(cap)
    rng = random.Random(5)
    peak_entries = 0
    for k in range(prefixes):
        index.insert([rng.getrandbits(64)], f"e{k % 16}", capacity_blocks=1_000_000)
        peak_entries = max(peak_entries, index.entries)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "distinct_prefixes": prefixes,
        "max_index_entries": cap,
        "peak_entries": peak_entries,
        "memory_mib": current / 2**20,
        "peak_memory_mib": peak / 2**20,
        "bytes_per_entry": current / max(1, index.entries),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(WORKLOADS)
    fleets = sorted({int(k) for k in results["runs"]})
    fig, axes = plt.subplots(len(fleets), 3, figsize=(16, 4 * len(fleets)), squeeze=False)
    for row, n in enumerate(fleets):
        runs = results["runs"][str(n)]
        for col, (metric, label) in enumerate(
            (
                ("hit_rate", "prefix-cache hit rate"),
                ("throughput", "req/s at saturation"),
                ("ttft_p90", "TTFT p90 (s, log)"),
            )
        ):
            ax = axes[row][col]
            width = 0.16
            for k, pol in enumerate(POLICIES):
                vals = [runs[w][pol][metric] for w in names]
                ax.bar([x + k * width for x in range(len(names))], vals, width, label=pol)
            ax.set_xticks([x + 2 * width for x in range(len(names))])
            ax.set_xticklabels([w.replace("_", "\n") for w in names], fontsize=8)
            ax.set_title(f"{n} replicas: {label}")
            if metric == "ttft_p90":
                ax.set_yscale("log")
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4 replicas only, shorter runs")
    args = parser.parse_args()
    fleets = (4,) if args.quick else (4, 8, 16)
    duration = 10.0 if args.quick else 20.0
    results: dict[str, Any] = {
        "engine": dataclasses.asdict(ENGINE),
        "kv_tokens_per_replica": KV_TOKENS,
        "duration_s": duration,
        "machine": {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        "workloads": {},
        "runs": {},
    }
    for n in fleets:
        results["runs"][str(n)] = {}
        for wname, (make, peak) in WORKLOADS.items():
            wl = make(n, random.Random(11), duration, peak * n)
            results["workloads"][wname] = wl.description
            row = {}
            for pol in POLICIES:
                t0 = time.perf_counter()
                r = simulate(n, wl, pol, duration)
                row[pol] = r.__dict__
                print(
                    f"[{n:2d} replicas] {wname:21s} {pol:16s} hit {r.hit_rate:5.1%}  "
                    f"ttft p50 {r.ttft_p50 * 1000:8.1f} ms p90 {r.ttft_p90 * 1000:8.1f} ms  "
                    f"tput {r.throughput:6.1f}/s  imbalance {r.imbalance:4.2f}  "
                    f"({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
            results["runs"][str(n)][wname] = row
    print("decision latency ...", flush=True)
    results["decision_latency"] = decision_latency()
    print(results["decision_latency"], flush=True)
    print("index memory ...", flush=True)
    results["index_memory"] = index_memory()
    print(results["index_memory"], flush=True)
    results["targets"] = targets(results)
    for k, v in results["targets"].items():
        print(f"target {k}: {v}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"routing{suffix}.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, RESULTS / f"routing{suffix}.png")
    return 0


def targets(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, runs in results["runs"].items():
        sc = runs["shared_contexts"]
        out[f"{n}: shared_contexts throughput pa/rr >= 1.9"] = round(
            sc["prefix_affinity"]["throughput"] / sc["round_robin"]["throughput"], 2
        )
        out[f"{n}: shared_contexts ttft p90 rr/pa >= 20"] = round(
            sc["round_robin"]["ttft_p90"] / sc["prefix_affinity"]["ttft_p90"], 1
        )
        out[f"{n}: shared_contexts hit rate pa/oracle >= 0.9"] = round(
            sc["prefix_affinity"]["hit_rate"] / max(sc["oracle"]["hit_rate"], 1e-9), 3
        )
        for w in ("shared_system_prompt", "no_sharing"):
            pa, ll = runs[w]["prefix_affinity"], runs[w]["least_load"]
            out[f"{n}: {w} imbalance <= 1.3"] = round(pa["imbalance"], 2)
            out[f"{n}: {w} throughput pa/least_load >= 0.95"] = round(
                pa["throughput"] / ll["throughput"], 3
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
