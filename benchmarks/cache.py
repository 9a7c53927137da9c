"""What the response cache is worth: hit-path speed, and the GPU work an eval re-run saves.

**Part A, speed** (after overhead.py's method). One zero-latency vLLM simulator, a
``redis-server`` and, each as its own process, four ``kvroute serve`` targets:

* ``plain``     - the model's cache off: every request goes to the simulator;
* ``hit``       - cache on, in-process store, the same temperature-0 request every time:
                  every request after the first is a hit;
* ``hit-redis`` - the same with the Redis store (one GET per hit);
* ``miss``      - cache on, in-process store, every request unique (the wrk Lua script puts
                  a counter and a per-run nonce in the prompt): a lookup, the upstream call
                  and a store each time.

wrk (a separate C process, one thread, closed loop) sends a non-streamed chat request
(``max_tokens: 1``, overhead.py's request with ``temperature: 0``) at c=1 and c=16, and a
64-token stream at c=1 and c=16 (a hit replays the stream). Per load: a warm-up per
target, then rotated rounds; the report keeps each figure's median, the proxy's (and
Redis's) CPU time per request, and the requests that reached the simulator in each round
(its ``/sim/stats``), which with kvroute's ``kvroute_cache_requests_total`` proves that
hits were hits and misses misses. The target: a hit is served at least as fast as the
plain proxy path to a zero-latency backend (req/s no lower, p50 no higher).

**Part B, an eval re-run.** Two vLLM simulators with their default (realistic) step
latency behind kvroute with the model's cache on (Redis store). An "eval suite" of N
distinct temperature-0 chat prompts (``max_tokens`` 64) runs at concurrency 8 three times:
cold, again (served from the cache), and again with ``cache-control: no-cache``. Per run:
wall time, the requests and tokens that reached the simulators (their ``/sim/stats``: the
source of truth), and the GPU time spent, as the simulators' busy time (sampled from
``/sim/stats``: an engine is busy while it has a sequence running or waiting).

Before each measurement the script waits (up to 20 minutes) until no other benchmark
(``benchmarks/admission.py``, ``benchmarks/overhead.py``) runs, and records the load
average. Results: ``benchmarks/results/cache.json``, ``cache.png``, ``cache.md`` (and,
with ``--profile``, ``cache_profile.md``: py-spy on the hit, hit-redis, plain and miss
targets).

    .venv/bin/python benchmarks/cache.py            # about 3.5 minutes (+1 with --profile)
    .venv/bin/python benchmarks/cache.py --help
    .venv/bin/python benchmarks/cache.py report     # redraw png/md from the JSON

Only 127.0.0.1 is ever targeted, and every loop is bounded by a duration or a count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import random
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import (  # noqa: E402
    CLOCK_TICKS,
    HOST,
    PATH,
    WRK_LUA,
    BenchError,
    Children,
    Load,
    Wrk,
    combine,
    cpu_seconds,
    ensure_wrk,
    free_port,
    get,
    kvroute_counters,
    machine_info,
    scan_log,
    summarise,
    summarise_profile,
    terminate_on_sigterm,
    wait_port,
)

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "bench"
CONCURRENCIES = (1, 16)
STREAM_TOKENS = 64
TARGETS = ("plain", "hit", "hit-redis", "miss")
#: Other benchmarks that must not run while this one measures (``pgrep -f`` pattern).
OTHER_BENCHMARKS = "benchmarks/(admission|overhead)"
PROFILE_CONCURRENCY = 16

CHAT_BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 1,
    "temperature": 0,
}
STREAM_BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": STREAM_TOKENS,
    "temperature": 0,
    "stream": True,
}
#: Stands for the unique part of a ``miss`` request's prompt in its body.
MARK = "@@UNIQUE@@"

# The ``miss`` target's script: the same done() hook as overhead.py's, and a request()
# that puts "<nonce>-<counter>" in the prompt. The nonce (wrk's argument after --) is
# new for every wrk run, so no two requests of the whole benchmark share a prompt.
UNIQUE_LUA = (
    WRK_LUA.replace("wrk.body = [[%(body)s]]", "")
    + """
local prefix = [[%(prefix)s]]
local suffix = [[%(suffix)s]]
local nonce = "x"
local counter = 0
init = function(args)
  if args[1] then nonce = args[1] end
end
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, prefix .. nonce .. "-" .. counter .. suffix)
end
"""
)


# ---------------------------------------------------------------------- other benchmarks


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def others_running() -> list[str]:
    found = subprocess.run(
        ["pgrep", "-af", OTHER_BENCHMARKS], capture_output=True, text=True, check=False
    )
    return [line for line in found.stdout.splitlines() if line.strip()]


def wait_for_others(what: str, limit: float, every: float = 10.0) -> dict[str, Any]:
    """Wait until no other benchmark runs (at most ``limit`` seconds), then say how it went."""
    started = time.monotonic()
    seen: list[str] = []
    while True:
        running = others_running()
        if not running:
            break
        if not seen:
            print(f"  {what}: waiting for other benchmarks to finish: {running}", flush=True)
        seen = sorted(set(seen) | set(running))
        if time.monotonic() - started >= limit:
            print(f"  {what}: still running after {limit:.0f} s; measuring anyway", flush=True)
            break
        time.sleep(every)
    waited = round(time.monotonic() - started, 1)
    return {
        "what": what,
        "waited_s": waited,
        "others_seen": seen,
        "measured_with_others_running": bool(others_running()),
        "loadavg": loadavg(),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------- the machine's CPU

_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks() -> dict[str, int]:
    """The machine's CPU time so far by kind, in clock ticks summed over every CPU (the
    first line of /proc/stat)."""
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    return dict(zip(_STAT_FIELDS, (int(v) for v in values), strict=True))


def machine_split(t0: dict[str, int], t1: dict[str, int], ours_s: float) -> dict[str, float]:
    """Shares of the machine's capacity between two ``cpu_ticks``: other processes' (time
    in user and system mode not spent by ours), interrupts' (irq + softirq: mostly the
    loopback traffic of the benchmark itself) and the hypervisor's (steal). The capacity
    is the ticks of every kind added up: /proc/stat's first line already sums the CPUs."""
    d = {k: t1[k] - t0[k] for k in _STAT_FIELDS}
    capacity = max(sum(d.values()), 1)
    processes = (d["user"] + d["nice"] + d["system"]) / CLOCK_TICKS
    return {
        "foreign_cpu_pct": round(max(0.0, 100 * (processes - ours_s) * CLOCK_TICKS / capacity), 1),
        "irq_cpu_pct": round(100 * (d["irq"] + d["softirq"]) / capacity, 1),
        "steal_cpu_pct": round(100 * d["steal"] / capacity, 1),
    }


def wait_quiet(children: Children, max_pct: float, limit: float) -> float:
    """Wait (at most ``limit`` seconds) until processes other than ours use at most
    ``max_pct`` percent of the machine; the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        pids = [p.pid for p in children.procs.values()]
        ours0, t0 = sum(cpu_seconds(p) for p in pids), cpu_ticks()
        time.sleep(0.5)
        ours1, t1 = sum(cpu_seconds(p) for p in pids), cpu_ticks()
        if machine_split(t0, t1, ours1 - ours0)["foreign_cpu_pct"] <= max_pct:
            return time.monotonic() - started
    print(f"  the machine stayed busy for {limit:.0f} s; measuring anyway", flush=True)
    return time.monotonic() - started


# ------------------------------------------------------------------------------ children


def start_sim(children: Children, name: str, zero_latency: bool, seed: int = 0) -> int:
    port = free_port()
    argv = [sys.executable, "-m", "router.cli", "simulate", "--kind", "vllm"]
    argv += ["--host", HOST, "--port", str(port), "--model", MODEL, "--seed", str(seed)]
    children.start(name, [*argv, *(["--zero-latency"] if zero_latency else [])], "sim")
    wait_port(children, name, port)
    return port


def start_redis(children: Children, name: str) -> int:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise BenchError("redis-server is missing: apt-get install redis-server")
    port = free_port()
    workdir = children.logdir / name
    workdir.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru"]
    children.start(name, argv, "sim")
    wait_port(children, name, port)
    return port


def write_config(
    path: Path, port: int, sims: Sequence[int], cache: bool, redis_url: str | None
) -> None:
    lines = [
        f"server: {{host: {HOST}, port: {port}, access_log: false, log_level: info}}",
        "endpoints:",
        *(
            f'  - {{id: sim-{i}, url: "http://{HOST}:{p}", kind: vllm, models: [{MODEL}]}}'
            for i, p in enumerate(sims)
        ),
        "models:",
        f"  {MODEL}:",
        "    policy: round_robin",
    ]
    if cache:
        lines.append("    cache: {enabled: true, ttl: 3600}")
    if redis_url:
        lines.append(f'cache: {{redis: "{redis_url}"}}')
    path.write_text("\n".join(lines) + "\n")


def start_kvroute(
    children: Children, name: str, sims: Sequence[int], cache: bool, redis_url: str | None
) -> int:
    port = free_port()
    config = children.logdir / f"{name}.yaml"
    write_config(config, port, sims, cache, redis_url)
    argv = [sys.executable, "-m", "router.cli", "serve", "--config", str(config)]
    children.start(name, argv, "proxy")
    return port


def sim_stats(port: int) -> dict[str, Any]:
    status, data = get(port, "/sim/stats")
    if status != 200:
        raise BenchError(f"/sim/stats on :{port} answered {status}")
    stats: dict[str, Any] = json.loads(data)
    return stats


def post_h(
    port: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request(
            "POST", PATH, json.dumps(body), {"content-type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def unique_body(body: dict[str, Any], tag: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(body))
    out["messages"][0]["content"] += f" {tag}"
    return out


def answer_summary(status: int, headers: dict[str, str], data: bytes) -> dict[str, Any]:
    """Status, cache header and what the answer held (tokens of a stream, text of a reply)."""
    out: dict[str, Any] = {"status": status, "x-kvroute-cache": headers.get("x-kvroute-cache")}
    if status != 200:
        out["body"] = data[:300].decode(errors="replace")
        return out
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
        out["done"] = bool(events) and events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events if e != b"[DONE]"]
        out["chunks"] = len(chunks)
        out["text"] = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        )
        out["errors"] = sum(1 for c in chunks if "error" in c)
    else:
        answer = json.loads(data)
        out["text"] = answer["choices"][0]["message"]["content"]
    return out


def check_target(name: str, port: int) -> dict[str, Any]:
    """Each load's request twice (a ``miss`` target: two unique ones), answered right, and
    the cache header each got; BenchError when an answer or header is not what the
    target is for."""
    expect = {
        "plain": ("bypass", "bypass"),
        "hit": ("miss", "hit"),
        "hit-redis": ("miss", "hit"),
        "miss": ("miss", "miss"),
    }[name]
    out: dict[str, Any] = {}
    for kind, body in (("chat", CHAT_BODY), ("stream", STREAM_BODY)):
        got = []
        for i in range(2):
            sent = (
                unique_body(body, f"check-{i}-{secrets.token_hex(4)}") if name == "miss" else body
            )
            status, headers, data = post_h(port, sent)
            summary = answer_summary(status, headers, data)
            if status != 200:
                raise BenchError(f"{name}: {kind} request got {status}: {data[:300]!r}")
            if kind == "stream" and (not summary["done"] or summary["errors"]):
                raise BenchError(f"{name}: the stream did not end well: {summary}")
            got.append(summary)
        headers_seen = tuple(g["x-kvroute-cache"] for g in got)
        if headers_seen != expect:
            raise BenchError(f"{name}: {kind} got x-kvroute-cache {headers_seen}, not {expect}")
        if name != "miss" and got[0]["text"] != got[1]["text"]:
            raise BenchError(f"{name}: {kind} answers differ: {got}")
        out[kind] = got
    return out


def cache_results(counters: dict[str, dict[str, float]]) -> dict[str, int]:
    """kvroute_cache_requests_total by result."""
    out: Counter[str] = Counter()
    for labels, value in counters.get("kvroute_cache_requests_total", {}).items():
        for result in ("hit", "miss", "bypass"):
            if f'result="{result}"' in labels:
                out[result] += int(value)
    return dict(out)


# ----------------------------------------------------------------------------- wrk loads


@dataclass
class CacheWrk(Wrk):
    """overhead.py's wrk runner; for the ports in ``unique_ports`` (the ``miss`` target)
    every request's prompt is new (UNIQUE_LUA, with a fresh nonce per wrk run)."""

    unique_ports: frozenset[int] = frozenset()

    def unique_script(self, load: Load) -> Path:
        key = f"{'stream' if load.stream else 'chat'}-unique"
        if key not in self.scripts:
            body = unique_body(load.body, MARK)
            prefix, suffix = json.dumps(body, separators=(",", ":")).split(MARK)
            path = self.scriptdir / f"{key}.lua"
            path.write_text(UNIQUE_LUA % {"prefix": prefix, "suffix": suffix})
            self.scripts[key] = path
        return self.scripts[key]

    def start(self, children: Children, tag: str, port: int, load: Load, seconds: float) -> str:
        if port not in self.unique_ports:
            return super().start(children, tag, port, load, seconds)
        name = f"wrk-{tag}"
        argv = [self.binary, "-t1", f"-c{load.concurrency}", f"-d{max(1, round(seconds))}s"]
        argv += ["--timeout", "30s", "-s", str(self.unique_script(load))]
        argv += [f"http://{HOST}:{port}{PATH}", "--", secrets.token_hex(6)]
        children.start(name, argv, "wrk")
        return name


@dataclass
class Target:
    name: str
    port: int
    #: The Redis process whose CPU time counts with the proxy's (hit-redis).
    redis: str | None = None


def measure_once(
    children: Children, wrk: CacheWrk, target: Target, load: Load, seconds: int, sim_port: int
) -> dict[str, Any]:
    """One measured wrk run: its figures, the CPU time of the proxy (and Redis), the
    requests that reached the simulator meanwhile and others' share of the machine."""
    pids = {name: p.pid for name, p in children.procs.items()}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    mine0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks0 = cpu_ticks()
    stats0 = sim_stats(sim_port)
    load0 = loadavg()
    raw = wrk.run(children, "measure", target.port, load, seconds)
    stats1 = sim_stats(sim_port)
    ticks1 = cpu_ticks()
    mine1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    r = summarise(raw, load, 0)
    done = max(r["requests"], 1)
    r["proxy_cpu_us_per_req"] = round(1e6 * spent[target.name] / done, 1)
    r["proxy_cpu_pct"] = round(100 * spent[target.name] / max(r["seconds"], 1e-9), 1)
    r["sim_cpu_us_per_req"] = round(1e6 * spent["sim"] / done, 1)
    if target.redis:
        r["redis_cpu_us_per_req"] = round(1e6 * spent[target.redis] / done, 1)
    r["upstream_requests"] = stats1["requests"] - stats0["requests"]
    ours = sum(spent.values()) + sum(
        (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)
        for a, b in zip(mine0, mine1, strict=True)
    )
    r.update(machine_split(ticks0, ticks1, ours))
    r["loadavg"] = load0
    return r


def measure_load(
    children: Children,
    wrk: CacheWrk,
    targets: list[Target],
    load: Load,
    sim_port: int,
    args: argparse.Namespace,
    step: list[int],
    total: int,
    budget: list[float],
) -> dict[str, dict[str, Any]]:
    """One load: a warm-up per target, then ``rounds`` rounds over the targets in a
    rotated order; a round during which other processes used more than
    ``--max-foreign-cpu`` percent of the machine is measured again (``--retries``, while
    the run's ``--retry-budget`` seconds last: ``budget`` holds what is left)."""
    warm = {}
    for t in targets:
        stats0 = sim_stats(sim_port)
        warm[t.name] = summarise(wrk.run(children, "warmup", t.port, load, args.warmup), load, 0)
        warm[t.name]["upstream_requests"] = sim_stats(sim_port)["requests"] - stats0["requests"]
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    # Every wrk run, kept or not, for checking kvroute's and the simulator's counters.
    tally = {
        t.name: {
            "runs": 1,
            "completed": warm[t.name]["requests"],
            "upstream": warm[t.name]["upstream_requests"],
        }
        for t in targets
    }
    for n in range(args.rounds):
        for t in targets[n % len(targets) :] + targets[: n % len(targets)]:
            step[0] += 1
            for attempt in range(1 + args.retries):
                r = measure_once(children, wrk, t, load, args.duration, sim_port)
                r["attempt"] = attempt + 1
                tally[t.name]["runs"] += 1
                tally[t.name]["completed"] += r["requests"]
                tally[t.name]["upstream"] += r["upstream_requests"]
                busy = r["foreign_cpu_pct"] > args.max_foreign_cpu
                again = busy and attempt < args.retries and budget[0] > 0
                print_round(f"[{step[0]:>2}/{total}]", load, t.name, n, r, busy, again)
                if not again:
                    break
                budget[0] -= args.duration + wait_quiet(children, args.max_foreign_cpu, 20.0)
            time.sleep(0.2)
            rounds[t.name].append(r)
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        result = combine(rounds[t.name])
        result["upstream_requests"] = sum(r["upstream_requests"] for r in rounds[t.name])
        result["upstream_per_request"] = round(
            result["upstream_requests"] / max(result["requests"], 1), 4
        )
        cpus = [r["redis_cpu_us_per_req"] for r in rounds[t.name] if "redis_cpu_us_per_req" in r]
        if cpus:
            result["redis_cpu_us_per_req"] = round(statistics.median(cpus), 1)
        result["irq_cpu_pct"] = statistics.median(r["irq_cpu_pct"] for r in rounds[t.name])
        result["steal_cpu_pct"] = statistics.median(r["steal_cpu_pct"] for r in rounds[t.name])
        result["loadavg_rounds"] = [r["loadavg"] for r in rounds[t.name]]
        result["warmup"] = {
            k: warm[t.name][k] for k in ("rps", "requests", "non_2xx", "upstream_requests")
        }
        result["wrk_runs"] = tally[t.name]["runs"]
        result["wrk_completed"] = tally[t.name]["completed"]
        result["upstream_requests_all_runs"] = tally[t.name]["upstream"]
        out[t.name] = result
    return out


def print_round(
    prefix: str, load: Load, name: str, n: int, r: dict[str, Any], busy: bool, again: bool
) -> None:
    redis = r.get("redis_cpu_us_per_req")
    print(
        f"{prefix} {load.label:<11} {name:<9} round {n + 1}  {r['rps']:>7.1f} req/s"
        f"  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:8.3f} ms"
        f"  proxy CPU {r['proxy_cpu_us_per_req']:5.0f} us/req"
        f"{'' if redis is None else f' (+redis {redis:.0f})'}"
        f"  upstream {r['upstream_requests']:>6}  non-2xx {r['non_2xx']}"
        f"  others' CPU {r['foreign_cpu_pct']:.0f}%, irq {r['irq_cpu_pct']:.0f}%"
        f"{'  (busy machine: again)' if again else '  (busy machine)' if busy else ''}",
        flush=True,
    )


def compute_ratios(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """hit and hit-redis against plain and miss, per load; the target's verdict."""
    out: dict[str, Any] = {}
    for hit in ("hit", "hit-redis"):
        per: dict[str, Any] = {}
        for label, by in runs.items():
            h, plain, miss = by[hit], by["plain"], by["miss"]
            per[label] = {
                "rps_vs_plain": round(h["rps"] / plain["rps"], 3),
                "rps_vs_miss": round(h["rps"] / miss["rps"], 3),
                "p50_vs_plain": round(h["p50_ms"] / plain["p50_ms"], 3),
                "p50_vs_miss": round(h["p50_ms"] / miss["p50_ms"], 3),
                "p50_ms_minus_plain": round(h["p50_ms"] - plain["p50_ms"], 3),
                "cpu_vs_plain": round(h["proxy_cpu_us_per_req"] / plain["proxy_cpu_us_per_req"], 3),
                "target_met": h["rps"] >= plain["rps"] and h["p50_ms"] <= plain["p50_ms"],
            }
        per["target_met_everywhere"] = all(v["target_met"] for v in per.values())
        out[hit] = per
    return out


# ------------------------------------------------------------------------------- part A


def part_a(
    children: Children, wrk_binary: str, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    sim_port = start_sim(children, "sim", zero_latency=True)
    redis_port = start_redis(children, "redis-a")
    redis_url = f"redis://{HOST}:{redis_port}/0"
    targets = []
    for name in TARGETS:
        port = start_kvroute(
            children,
            name,
            [sim_port],
            cache=name != "plain",
            redis_url=redis_url if name == "hit-redis" else None,
        )
        targets.append(Target(name, port, "redis-a" if name == "hit-redis" else None))
    for t in targets:
        wait_port(children, t.name, t.port)
    checks = {t.name: check_target(t.name, t.port) for t in targets}
    for t in targets:
        heads = {k: [g["x-kvroute-cache"] for g in v] for k, v in checks[t.name].items()}
        print(f"  {t.name:<10} on :{t.port} answers; x-kvroute-cache: {heads}", flush=True)
    counters0 = {t.name: cache_results(kvroute_counters(t.port)) for t in targets}

    wrk = CacheWrk(
        wrk_binary,
        children.logdir,
        unique_ports=frozenset(t.port for t in targets if t.name == "miss"),
    )
    loads = [Load("chat", CHAT_BODY, c) for c in CONCURRENCIES]
    loads += [Load("stream", STREAM_BODY, c) for c in CONCURRENCIES]
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    waits = []
    step, total = [0], len(loads) * len(targets) * args.rounds
    budget = [args.retry_budget]
    ticks0 = cpu_ticks()
    for load in loads:
        waits.append(wait_for_others(f"part A, {load.label}", args.wait_limit))
        wait_quiet(children, args.max_foreign_cpu, 20.0)
        runs[load.label] = measure_load(
            children, wrk, targets, load, sim_port, args, step, total, budget
        )
    ticks1 = cpu_ticks()

    # Hits were hits and misses misses: kvroute's counters and the simulator's.
    verify: dict[str, Any] = {}
    for t in targets:
        counted = cache_results(kvroute_counters(t.port))
        delta = {
            k: counted.get(k, 0) - counters0[t.name].get(k, 0) for k in ("hit", "miss", "bypass")
        }
        completed = sum(runs[label][t.name]["wrk_completed"] for label in runs)
        upstream = sum(runs[label][t.name]["upstream_requests_all_runs"] for label in runs)
        log = scan_log(children.logdir / f"{t.name}.log")
        v: dict[str, Any] = {
            "cache_requests_during_load": delta,
            "cache_requests_total": counted,
            "wrk_completed": completed,
            "upstream_requests_during_load": upstream,
            "error_log_lines": log["error_lines"],
        }
        # wrk ends a run mid-request: kvroute counts up to c requests per run that wrk
        # never completed, so counts are checked against a bound, not equality.
        if t.name == "plain":
            v["ok"] = sum(delta.values()) == 0 and upstream >= completed
            v["expect"] = "no cache counts (cache off); every request upstream"
        elif t.name == "miss":
            v["ok"] = delta["hit"] == 0 and delta["miss"] >= completed and upstream >= completed
            v["expect"] = "no hit; a miss and an upstream call per request"
        else:
            v["ok"] = delta["miss"] == 0 and delta["hit"] >= completed and upstream == 0
            v["expect"] = "every request a hit (first misses were the checks); nothing upstream"
        verify[t.name] = v
        print(
            f"  {t.name:<10} cache counts during the load {delta}, wrk completed {completed}, "
            f"upstream requests {upstream}: {'as expected' if v['ok'] else 'UNEXPECTED'}",
            flush=True,
        )
    ratios = compute_ratios(runs)
    info = {
        "targets": {
            "plain": "kvroute serve, round_robin, the model's cache off",
            "hit": "cache on, in-process LRU; the same temperature-0 request every time",
            "hit-redis": "cache on, Redis store (redis-server on loopback); the same request",
            "miss": "cache on, in-process LRU; every prompt unique (wrk Lua counter + nonce)",
        },
        "loads": {
            "chat": CHAT_BODY,
            "stream": STREAM_BODY,
            "miss": "the same bodies with ' <nonce>-<counter>' appended to the prompt",
        },
        "checks": checks,
        "waits": waits,
        "machine_during_part_a": {
            # With ours counted as 0, "foreign" is every process's share, ours included.
            ("processes_cpu_pct" if k == "foreign_cpu_pct" else k): v
            for k, v in machine_split(ticks0, ticks1, 0.0).items()
        },
        "retry_budget_left_s": round(budget[0], 1),
        "rounds_kept_on_a_busy_machine": sum(
            r["foreign_cpu_pct"] > args.max_foreign_cpu
            for by in runs.values()
            for x in by.values()
            for r in x["rounds"]
        ),
        "rounds_kept": sum(len(x["rounds"]) for by in runs.values() for x in by.values()),
    }
    result = {"runs": runs, "ratios": ratios, "verify": verify, **info}
    profile: dict[str, Any] = {"skipped": "no --profile"}
    if args.profile:
        by_name = {t.name: t for t in targets}
        sections, profile = [], {}
        for name, load in PROFILES:
            wait_for_others(f"profile of {name}", args.wait_limit)
            print(f"profiling {name} under {load.label} with py-spy ...", flush=True)
            got = profile_target(children, wrk, by_name[name], load, args.profile_seconds)
            if "text" in got:
                sections.append(f"## {name}, {load.label}\n\n```text\n{got.pop('text')}```\n")
            profile[f"{name} {load.label}"] = got
        out = RESULTS / "cache_profile.md"
        out.write_text(
            "# Where kvroute's time goes on cache hits and misses (py-spy)\n\n"
            f"benchmarks/cache.py --profile, commit {machine_info()['git_commit']}. Each "
            "section: one kvroute process under wrk, sampled at 200 Hz with py-spy; every % "
            "is of the busy samples.\n\n" + "\n".join(sections)
        )
        profile["summary"] = str(out.relative_to(ROOT))
    return result, profile


#: What ``--profile`` samples: the two hit paths, and the stream miss (the costliest).
PROFILES = (
    ("hit", Load("chat", CHAT_BODY, PROFILE_CONCURRENCY)),
    ("hit-redis", Load("chat", CHAT_BODY, PROFILE_CONCURRENCY)),
    ("plain", Load("stream", STREAM_BODY, PROFILE_CONCURRENCY)),
    ("miss", Load("stream", STREAM_BODY, PROFILE_CONCURRENCY)),
)


def drop_idle_threads(raw: str) -> tuple[str, int]:
    """py-spy's raw stacks without those of pool threads waiting for work (their
    innermost frame is the pool's wait loop), and how many samples those were."""
    kept, idle = [], 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        waiting = leaf.startswith("WorkerThread.run (") and "/anyio/" in leaf
        waiting |= leaf.startswith("_worker (") and "concurrent/futures/thread.py" in leaf
        if waiting and count.isdigit():
            idle += int(count)
        else:
            kept.append(line)
    return "\n".join(kept) + "\n", idle


def profile_target(
    children: Children, wrk: CacheWrk, target: Target, load: Load, seconds: float
) -> dict[str, Any]:
    """py-spy on one target under one load: where its time goes."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        found = shutil.which("py-spy")
        if not found:
            return {"skipped": "py-spy not found"}
        py_spy = Path(found)
    raw_path = children.logdir / f"{target.name}.pyspy.txt"
    wrk_name = wrk.start(children, "profile", target.port, load, seconds + 4)
    time.sleep(2)
    argv = [str(py_spy), "record", "--pid", str(children.procs[target.name].pid)]
    argv += ["--duration", str(round(seconds)), "--rate", "200", "--format", "raw"]
    argv += ["--full-filenames", "--function", "--output", str(raw_path)]
    spy = subprocess.run(argv, capture_output=True, text=True, check=False)
    loaded = summarise(wrk.finish(children, wrk_name, seconds + 4), load, 0)
    if spy.returncode != 0 or not raw_path.exists():
        return {"skipped": f"py-spy failed: {spy.stderr.strip()[-300:]}"}
    raw, idle = drop_idle_threads(raw_path.read_text(errors="replace"))
    extra = [
        f"target: {target.name}; load: wrk, {load.label}, {seconds:.0f} s at 200 Hz; "
        f"{loaded['rps']:.0f} req/s while sampled (py-spy pauses the process to sample)",
        f"left out: {idle} samples of idle pool threads (anyio's and asyncio's worker threads "
        "blocked on their queues, which py-spy counts as busy; /proc/<pid>/task shows "
        "they use no CPU under this load)",
    ]
    text = summarise_profile(raw, extra)
    text = text.replace("(benchmarks/overhead.py)", "(benchmarks/cache.py)")
    return {"load_under_profiler": loaded, "text": text}


# ------------------------------------------------------------------------------- part B

_TOPICS = (
    "arithmetic",
    "geography",
    "chemistry",
    "history",
    "biology",
    "logic",
    "physics",
    "grammar",
    "economics",
    "astronomy",
)
_FILLER_TEXT = (
    "the model should answer with the letter of the correct option and a short reason "
    "for it based on what the question says about each case"
)
_FILLER = tuple(_FILLER_TEXT.split())


def eval_suite(n: int, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct temperature-0 chat requests: a shared instruction, a question of
    varying length, four options: an eval suite's shape."""
    rng = random.Random(seed)
    system = (
        "You are taking a multiple-choice exam. Answer with the letter of the correct "
        "option, then explain your reasoning briefly."
    )
    suite = []
    for i in range(n):
        words = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(10, 60)))
        options = " ".join(f"({c}) option {rng.randint(0, 999)}" for c in "ABCD")
        question = f"Question {i + 1} ({_TOPICS[i % len(_TOPICS)]}): {words}? {options}"
        suite.append(
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
    return suite


class BusySampler:
    """Samples each simulator's ``/sim/stats`` every ``interval`` seconds: an engine is busy
    (its GPU occupied) from a sample that shows a sequence running or waiting to the next."""

    def __init__(self, session: Any, ports: Sequence[int], interval: float) -> None:
        self.session = session
        self.ports = list(ports)
        self.interval = interval
        self.busy = {p: 0.0 for p in self.ports}
        self.samples = 0
        self._stop = asyncio.Event()

    async def sample(self, port: int) -> bool:
        async with self.session.get(f"http://{HOST}:{port}/sim/stats") as resp:
            s = await resp.json()
        return bool(s["running"] or s["waiting"])

    async def run(self) -> None:
        last = time.monotonic()
        states = [await self.sample(p) for p in self.ports]
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            now = time.monotonic()
            for port, was_busy in zip(self.ports, states, strict=True):
                if was_busy:
                    self.busy[port] += now - last
            last = now
            states = [await self.sample(p) for p in self.ports]
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()


async def run_suite(
    port: int,
    sims: Sequence[int],
    suite: list[dict[str, Any]],
    concurrency: int,
    headers: dict[str, str],
    sample_interval: float,
) -> dict[str, Any]:
    """Send the suite through kvroute with ``concurrency`` workers; the simulators' own
    counters before and after, their busy time meanwhile, each answer's cache header."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def stats() -> list[dict[str, Any]]:
            out = []
            for p in sims:
                async with session.get(f"http://{HOST}:{p}/sim/stats") as resp:
                    out.append(await resp.json())
            return out

        async def metrics() -> dict[str, dict[str, float]]:
            return await asyncio.to_thread(kvroute_counters, port)

        before, counters0 = await stats(), await metrics()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(suite)):
            queue.put_nowait(i)
        results: list[dict[str, Any]] = [{} for _ in suite]
        url = f"http://{HOST}:{port}{PATH}"

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(url, json=suite[i], headers=headers) as resp:
                    body = await resp.read()
                    results[i] = {
                        "status": resp.status,
                        "cache": resp.headers.get("x-kvroute-cache"),
                        "seconds": time.perf_counter() - started,
                        "completion_tokens": (
                            json.loads(body).get("usage", {}).get("completion_tokens")
                            if resp.status == 200
                            else None
                        ),
                        "text": (
                            json.loads(body)["choices"][0]["message"]["content"]
                            if resp.status == 200
                            else body[:200].decode(errors="replace")
                        ),
                    }

        sampler = BusySampler(session, sims, sample_interval)
        sampling = asyncio.create_task(sampler.run())
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        # The engines finish any sequence the router cancelled: wait for them to be idle.
        for _ in range(100):
            if not any(s["running"] or s["waiting"] for s in await stats()):
                break
            await asyncio.sleep(0.05)
        sampler.stop()
        await sampling
        after, counters1 = await stats(), await metrics()

    def delta(key: str) -> int:
        return sum(a[key] - b[key] for a, b in zip(after, before, strict=True))

    seconds = sorted(r["seconds"] for r in results)
    cache0, cache1 = cache_results(counters0), cache_results(counters1)
    tokens0 = counters0.get("kvroute_cache_tokens_total", {})
    tokens1 = counters1.get("kvroute_cache_tokens_total", {})
    return {
        "wall_s": round(wall, 3),
        "requests": len(suite),
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "x_kvroute_cache": dict(Counter(str(r["cache"]) for r in results)),
        "latency_p50_ms": round(1000 * statistics.median(seconds), 2),
        "latency_p99_ms": round(1000 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 2),
        "upstream_requests": delta("requests"),
        "upstream_requests_per_sim": [
            a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)
        ],
        "prompt_tokens": delta("prompt_tokens"),
        "prefix_cache_hit_tokens": delta("prefix_cache_hits"),
        "generation_tokens": delta("generation_tokens"),
        "gpu_busy_s": round(sum(sampler.busy.values()), 3),
        "gpu_busy_s_per_sim": [round(sampler.busy[p], 3) for p in sims],
        "busy_samples": sampler.samples,
        "kvroute_cache_requests": {
            k: cache1.get(k, 0) - cache0.get(k, 0) for k in ("hit", "miss", "bypass")
        },
        "kvroute_cache_tokens_saved": {
            k.split('kind="')[1].split('"')[0]: int(v - tokens0.get(k, 0))
            for k, v in tokens1.items()
        },
        "answers": [r["text"] for r in results],
    }


def token_work_s(run: dict[str, Any], params: Any) -> float:
    """The latency model's per-token work (uncached prefill + decode), without the
    per-step base cost that a batch shares: a lower bound of the engine time."""
    uncached = run["prompt_tokens"] - run["prefix_cache_hit_tokens"]
    decode = max(0, run["generation_tokens"] - run["upstream_requests"])
    return float(round(uncached * params.prefill_per_token + decode * params.decode_per_seq, 3))


def part_b(children: Children, args: argparse.Namespace) -> dict[str, Any]:
    from backends.sim.engine import EngineParams

    params = EngineParams()
    sims = [start_sim(children, f"sim-b{i}", zero_latency=False, seed=0) for i in range(2)]
    redis_port = start_redis(children, "redis-b")
    port = start_kvroute(
        children, "kvroute-b", sims, cache=True, redis_url=f"redis://{HOST}:{redis_port}/0"
    )
    wait_port(children, "kvroute-b", port)
    suite = eval_suite(args.suite, args.suite_tokens, seed=7)
    runs: dict[str, Any] = {}
    plan = [
        ("run 1 (cold)", {}),
        ("run 2 (same suite)", {}),
        ("run 3 (cache-control: no-cache)", {"cache-control": "no-cache"}),
    ]
    for label, headers in plan:
        wait = wait_for_others(f"part B, {label}", args.wait_limit)
        cpu0 = {n: cpu_seconds(p.pid) for n, p in children.procs.items()}
        run = asyncio.run(
            run_suite(port, sims, suite, args.suite_concurrency, headers, args.sample_interval)
        )
        run["cpu_s"] = {
            n: round(cpu_seconds(p.pid) - cpu0[n], 3)
            for n, p in children.procs.items()
            if n in cpu0
        }
        run["token_work_s"] = token_work_s(run, params)
        run["loadavg_at_start"] = wait["loadavg"]
        run["wait"] = wait
        runs[label] = run
        print(
            f"  {label:<32} wall {run['wall_s']:6.2f} s  p50 {run['latency_p50_ms']:7.1f} ms  "
            f"upstream requests {run['upstream_requests']:>4}  generated tokens "
            f"{run['generation_tokens']:>6}  GPU busy {run['gpu_busy_s']:6.2f} s  "
            f"x-kvroute-cache {run['x_kvroute_cache']}",
            flush=True,
        )
    labels = list(runs)
    cold, again, bypass = (runs[k] for k in labels)
    answers_same = cold["answers"] == again["answers"] == bypass["answers"]
    for run in runs.values():
        run.pop("answers")

    def saving(key: str, other: dict[str, Any]) -> float | None:
        return round(100 * (1 - other[key] / cold[key]), 1) if cold[key] else None

    keys = ("wall_s", "upstream_requests", "generation_tokens", "gpu_busy_s", "token_work_s")
    summary = {
        "run2_saving_pct": {k: saving(k, again) for k in keys},
        "run3_vs_run1_pct": {
            k: round(100 * bypass[k] / cold[k], 1) if cold[k] else None for k in keys
        },
        "answers_identical_across_runs": answers_same,
        "verified": (
            cold["x_kvroute_cache"] == {"miss": len(suite)}
            and again["x_kvroute_cache"] == {"hit": len(suite)}
            and again["upstream_requests"] == 0
            and cold["upstream_requests"] == len(suite)
            and bypass["upstream_requests"] == len(suite)
        ),
    }
    children.stop("kvroute-b")
    return {
        "settings": {
            "suite_requests": len(suite),
            "max_tokens": args.suite_tokens,
            "concurrency": args.suite_concurrency,
            "simulators": 2,
            "engine_params": {
                k: getattr(params, k)
                for k in ("step_base", "prefill_per_token", "decode_per_seq", "max_num_seqs")
            },
            "policy": "round_robin",
            "cache": "enabled, ttl 3600, Redis store",
            "busy_sample_interval_s": args.sample_interval,
            "example_request": suite[0],
        },
        "gpu_seconds_method": (
            "gpu_busy_s: the simulators' busy time, sampled from their own /sim/stats every "
            f"{args.sample_interval * 1000:.0f} ms (busy while a sequence is running or "
            "waiting); a GPU serving an engine is occupied (and paid for) whenever the engine "
            "has work, whatever the batch size, so busy time is what a run costs in GPU time. "
            "token_work_s: a lower bound from the simulators' token counters and their "
            "latency model (uncached prompt tokens x prefill_per_token + decode tokens x "
            "decode_per_seq), leaving out the per-step base cost a batch shares."
        ),
        "runs": runs,
        "summary": summary,
    }


# ------------------------------------------------------------------------------ report


def table_a(part: dict[str, Any]) -> str:
    runs, ratios = part["runs"], part["ratios"]
    lines = [
        "| load | target | req/s | p50 ms | p99 ms | proxy CPU us/req | upstream req/req | "
        "req/s vs plain | p50 vs plain | req/s vs miss | spread | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, by in runs.items():
        for target, r in by.items():
            cpu = f"{r['proxy_cpu_us_per_req']:.0f}"
            if "redis_cpu_us_per_req" in r:
                cpu += f" (+{r['redis_cpu_us_per_req']:.0f} Redis)"
            ratio = ratios.get(target, {}).get(label)
            vs_plain = f"**{ratio['rps_vs_plain']:.2f}x**" if ratio else ""
            p50_plain = f"{ratio['p50_vs_plain']:.2f}x" if ratio else ""
            vs_miss = f"{ratio['rps_vs_miss']:.2f}x" if ratio else ""
            lines.append(
                f"| {label} | {target} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.2f} | "
                f"{cpu} | {r['upstream_per_request']:.2f} | {vs_plain} | {p50_plain} | "
                f"{vs_miss} | {r['rps_spread_pct']:.0f}% | {r['non_2xx']} |"
            )
    return "\n".join(lines) + "\n"


def target_lines(part: dict[str, Any]) -> list[str]:
    lines = []
    for hit, per in part["ratios"].items():
        missed = [label for label, v in per.items() if isinstance(v, dict) and not v["target_met"]]
        verdict = "MET" if per["target_met_everywhere"] else f"NOT MET ({', '.join(missed)})"
        lines.append(
            f"Target (a hit at least as fast as the plain proxy path: req/s >= plain and "
            f"p50 <= plain, every load), {hit}: **{verdict}**"
        )
    return lines


def table_b(part: dict[str, Any]) -> str:
    runs, summary = part["runs"], part["summary"]
    lines = [
        "| run | wall s | p50 ms | p99 ms | x-kvroute-cache | upstream requests | "
        "generated tokens | engine prefix-cache hit tokens | GPU busy s | token work s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in runs.items():
        heads = ", ".join(f"{k} {v}" for k, v in sorted(r["x_kvroute_cache"].items()))
        lines.append(
            f"| {label} | {r['wall_s']:.2f} | {r['latency_p50_ms']:.1f} | "
            f"{r['latency_p99_ms']:.1f} | {heads} | {r['upstream_requests']} | "
            f"{r['generation_tokens']} | {r['prefix_cache_hit_tokens']} | {r['gpu_busy_s']:.2f} | "
            f"{r['token_work_s']:.2f} |"
        )
    s2, s3 = summary["run2_saving_pct"], summary["run3_vs_run1_pct"]
    lines.append(
        f"| run 2 saving vs run 1 | {s2['wall_s']}% | | | | {s2['upstream_requests']}% | "
        f"{s2['generation_tokens']}% | | {s2['gpu_busy_s']}% | {s2['token_work_s']}% |"
    )
    lines.append(
        f"| run 3 as % of run 1 | {s3['wall_s']}% | | | | {s3['upstream_requests']}% | "
        f"{s3['generation_tokens']}% | | {s3['gpu_busy_s']}% | {s3['token_work_s']}% |"
    )
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    a, b, meta = report["part_a"], report["part_b"], report["meta"]
    st = b["settings"]
    out = [
        "# Response cache benchmark (benchmarks/cache.py)",
        "",
        f"{meta['date']}, commit {meta['git_commit']}, {meta['nproc']} CPUs ({meta['cpu']}), "
        f"Python {meta['python']}, {meta['wrk']}. Load average at the start "
        f"{meta['loadavg_at_start']}, at the end {meta['loadavg_at_end']}; Part A rounds kept "
        f"while other processes used over {meta['max_foreign_cpu_pct']:.0f}% of the machine: "
        f"{a['rounds_kept_on_a_busy_machine']} of {a['rounds_kept']}; seconds waited for other "
        "benchmarks: "
        + ", ".join(
            f"{w['what']} {w['waited_s']:.0f}"
            for w in [*a["waits"], *(r["wait"] for r in b["runs"].values())]
            if w["waited_s"]
        )
        + ".",
        "",
        "## Part A: hit path vs the plain proxy path (zero-latency vLLM simulator)",
        "",
        f"Medians of {meta['rounds']} rounds of {meta['duration_s']} s per load and target "
        "(wrk, one thread, closed loop). Chat: `max_tokens: 1`, `temperature: 0`; stream: "
        f"`max_tokens: {STREAM_TOKENS}`. upstream req/req: requests that reached the "
        "simulator per request served (its /sim/stats).",
        "",
        table_a(a),
        *[line + "  " for line in target_lines(a)],
        "",
        "Hits and misses checked: "
        + "; ".join(
            f"{name}: {v['cache_requests_during_load']}, wrk completed {v['wrk_completed']}, "
            f"upstream {v['upstream_requests_during_load']} "
            f"({'ok' if v['ok'] else 'UNEXPECTED'})"
            for name, v in a["verify"].items()
        ),
        "",
        f"## Part B: an eval suite run twice ({st['suite_requests']} temperature-0 prompts, "
        f"max_tokens {st['max_tokens']}, concurrency {st['concurrency']}, 2 simulators with "
        "default latency, Redis store)",
        "",
        table_b(b),
        f"Verified (run 1 all misses and every request upstream, run 2 all hits and none "
        f"upstream, run 3 every request upstream): **{b['summary']['verified']}**; answers "
        f"identical across the runs: {b['summary']['answers_identical_across_runs']}.",
        "",
        f"GPU time: {b['gpu_seconds_method']}",
        "",
    ]
    return "\n".join(out)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b, meta = report["part_a"], report["part_b"], report["meta"]
    runs = a["runs"]
    labels = list(runs)
    colours = {"plain": "#7f7f7f", "hit": "#2ca02c", "hit-redis": "#1f77b4", "miss": "#d62728"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))

    def bars(ax: Any, value: str, fmt: str, log: bool = False) -> None:
        w = 0.8 / len(TARGETS)
        for i, target in enumerate(TARGETS):
            xs = [j + (i - (len(TARGETS) - 1) / 2) * w for j in range(len(labels))]
            ys = [runs[label][target][value] for label in labels]
            ax.bar(xs, ys, w, label=target, color=colours[target])
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(format(y, fmt), (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)), labels)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.legend(fontsize=8)

    bars(axes[0][0], "rps", ".0f")
    axes[0][0].set_title("Part A: requests/s (zero-latency backend; higher is better)")
    bars(axes[0][1], "p50_ms", ".2f", log=True)
    axes[0][1].set_title("Part A: p50 latency, ms (log scale; lower is better)")
    axes[0][1].set_ylabel("ms")

    bruns = b["runs"]
    names = [label.replace(" (", "\n(") for label in bruns]
    run_colours = ["#d62728", "#2ca02c", "#ff7f0e"]
    ax = axes[1][0]
    walls = [r["wall_s"] for r in bruns.values()]
    busy = [r["gpu_busy_s"] for r in bruns.values()]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], walls, 0.4, color=run_colours, label="wall time")
    ax.bar([x + 0.2 for x in xs], busy, 0.4, color=run_colours, alpha=0.45, hatch="//",
           label="GPU busy (sum of 2 engines)")  # fmt: skip
    for x, w_, g in zip(xs, walls, busy, strict=True):
        ax.annotate(f"{w_:.2f}", (x - 0.2, w_), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{g:.2f}", (x + 0.2, g), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("seconds")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    st = b["settings"]
    ax.set_title(
        f"Part B: eval suite ({st['suite_requests']} prompts, c={st['concurrency']}): "
        "wall time (solid), GPU busy (hatched)"
    )
    ax = axes[1][1]
    ups = [r["upstream_requests"] for r in bruns.values()]
    ax.bar(list(xs), ups, 0.5, color=run_colours)
    for x, u in zip(xs, ups, strict=True):
        ax.annotate(str(u), (x, u), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.margins(y=0.15)
    ax.set_title("Part B: requests that reached the simulators (their /sim/stats)")
    fig.suptitle(
        f"kvroute response cache - {meta['nproc']} CPUs, Python {meta['python']}, "
        f"{meta['date']}, commit {meta['git_commit']} (Part A: medians of {meta['rounds']} rounds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    print()
    print(table_a(report["part_a"]))
    for line in target_lines(report["part_a"]):
        print(line.replace("**", ""))
    print()
    print(table_b(report["part_b"]))
    print(f"part B verified: {report['part_b']['summary']['verified']}")


# --------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    wrk_binary = ensure_wrk(args.install_wrk)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="kvroute-cache-"))
    children = Children(logdir, {})
    started = time.monotonic()
    ok = False
    try:
        with terminate_on_sigterm():
            meta = machine_info()
            meta.update(
                warmup_s=args.warmup,
                duration_s=args.duration,
                rounds=args.rounds,
                max_foreign_cpu_pct=args.max_foreign_cpu,
                load_generator="wrk -t1 (one thread), closed loop, keep-alive",
                loadavg_at_start=loadavg(),
                redis=subprocess.run(
                    ["redis-server", "--version"], capture_output=True, text=True, check=False
                ).stdout.strip(),
            )
            print(
                f"kvroute cache benchmark: {meta['nproc']} CPUs, Python {meta['python']}, "
                f"{meta['wrk']}; logs in {logdir}",
                flush=True,
            )
            report: dict[str, Any] = {"meta": meta}
            if not args.skip_a:
                print("Part A: hit path vs plain proxy (zero-latency simulator)", flush=True)
                report["part_a"], report["profile"] = part_a(children, wrk_binary, args)
                children.stop_all()
            if not args.skip_b:
                print("Part B: eval suite on 2 simulators with realistic latency", flush=True)
                report["part_b"] = part_b(children, args)
                children.stop_all()
            meta["loadavg_at_end"] = loadavg()
            meta["elapsed_s"] = round(time.monotonic() - started, 1)
            if args.skip_a or args.skip_b:
                out = RESULTS / "cache_partial.json"
                out.write_text(json.dumps(report, indent=2) + "\n")
                print(f"wrote {out} (a partial run: cache.json, .png and .md left as they were)")
            else:
                (RESULTS / "cache.json").write_text(json.dumps(report, indent=2) + "\n")
                plot(report, RESULTS / "cache.png")
                (RESULTS / "cache.md").write_text(markdown(report))
                print_summary(report)
                print(f"\nwrote {RESULTS / 'cache.json'}, cache.png and cache.md")
            print(f"took {meta['elapsed_s']:.0f} s")
            ok = True
            return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        if ok and not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"logs kept in {logdir}", file=sys.stderr)


def rerender(path: Path) -> int:
    report = json.loads(path.read_text())
    print_summary(report)
    plot(report, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {path.with_suffix('.png')} and {path.with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per load/target")
    parser.add_argument("--duration", type=int, default=1, help="seconds per measured round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per load and target")
    parser.add_argument(
        "--max-foreign-cpu",
        type=float,
        default=10.0,
        help="percent of the machine other processes may use in a round before it is measured "
        "again",
    )
    parser.add_argument("--retries", type=int, default=1, help="re-measurements per round")
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=45.0,
        help="seconds the whole run may spend re-measuring rounds and waiting for quiet",
    )
    parser.add_argument(
        "--wait-limit",
        type=float,
        default=1200.0,
        help="seconds to wait for other benchmarks to finish before each measurement",
    )
    parser.add_argument("--suite", type=int, default=200, help="Part B: prompts in the suite")
    parser.add_argument("--suite-tokens", type=int, default=64, help="Part B: max_tokens")
    parser.add_argument("--suite-concurrency", type=int, default=8, help="Part B: concurrency")
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.02,
        help="Part B: seconds between /sim/stats samples of the engines' busy time",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then py-spy hit and hit-redis (chat c=16), plain and miss (stream c=16); "
        "writes results/cache_profile.md (about 1 minute more)",
    )
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--skip-a", action="store_true", help="skip Part A (partial run)")
    parser.add_argument("--skip-b", action="store_true", help="skip Part B (partial run)")
    parser.add_argument(
        "--no-install-wrk",
        dest="install_wrk",
        action="store_false",
        help="fail instead of apt-get installing wrk when it is missing",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the child processes' logs")
    sub = parser.add_subparsers(dest="command")
    report = sub.add_parser("report", help="print the tables, redraw cache.png and cache.md")
    report.add_argument("json", nargs="?", default=str(RESULTS / "cache.json"))
    args = parser.parse_args(argv)
    if args.command == "report":
        return rerender(Path(args.json))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
