"""A soak: kvroute under steady mixed traffic with a fault injected every minute.

A simulated fleet (vLLM, TGI and Triton replicas, each a ``kvroute simulate``
process), some registered in the file and some through a fake Consul agent
(``tests/fake_consul.py``, run inside this process so it can be taken down),
serves ``soak-chat`` on every kind and ``soak-vllm`` on the vLLM replicas.
``kvroute serve`` runs as its own process. Clients send chat and completions,
streamed and not; every outcome is recorded. Once a minute, in rotation: a
replica is killed with SIGKILL (and restarted), answers 5xx, hangs, dies
mid-stream; the config is reloaded; Consul goes down. Every second the
script reads ``/admin/endpoints`` (what kvroute considers available); every
10 s kvroute's RSS, fds, sockets and threads from ``/proc``.

    .venv/bin/python benchmarks/soak.py             # 30 minutes
    .venv/bin/python benchmarks/soak.py --quick     # 3 minutes, to check the harness
    .venv/bin/python benchmarks/soak.py report      # redraw the plot from the JSON

Only 127.0.0.1 is used; every loop is bounded by the run's end; every child
process group is killed on the way out (error, Ctrl-C and SIGTERM included).
It writes ``results/soak.json`` and ``results/soak.png``; the logs (kvroute's
access log among them) stay in a temporary directory, named at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import uvicorn  # noqa: E402

from benchmarks.overhead import (  # noqa: E402
    HOST,
    BenchError,
    Children,
    free_port,
    terminate_on_sigterm,
    wait_port,
)
from tests.fake_consul import FakeConsul  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CHAT_MODEL = "soak-chat"
VLLM_MODEL = "soak-vllm"
SERVICE = "soak-llm"
FAULTS = ("kill", "5xx", "hang", "reload", "consul", "midstream")
#: How long a fault lasts before it is undone (a reload is instant).
FAULT_SECONDS = {"kill": 20.0, "5xx": 20.0, "hang": 20.0, "consul": 30.0, "midstream": 20.0}
#: A stream cut within this many seconds after a mid-stream fault ends is still its doing.
CUT_SLACK = 3.0
CLIENT_TIMEOUT = 60.0
#: Seconds per bucket of the request-rate panel.
BUCKET = 10.0
#: Simulated latency: 15 ms a step, so a 64-token stream lasts about a second.
SIM_LATENCY = ("--step-base", "0.015", "--prefill-per-token", "0.0001", "--decode-per-seq", "0.001")
PREFIXES = [
    f"You are assistant number {i}. Answer briefly and politely, in plain English. " * 3
    for i in range(12)
]


@dataclass
class Replica:
    name: str
    kind: str
    port: int
    models: tuple[str, ...]
    consul: bool

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def argv(self, seed: int) -> list[str]:
        models = [a for m in self.models for a in ("--model", m)]
        return [
            sys.executable,
            "-m",
            "router.cli",
            "simulate",
            "--kind",
            self.kind,
            "--port",
            str(self.port),
            *models,
            *SIM_LATENCY,
            "--num-blocks",
            "1025",
            "--seed",
            str(seed),
        ]

    def meta(self) -> dict[str, str]:
        meta = {"kvroute-models": ",".join(self.models), "kvroute-kind": self.kind}
        meta["kvroute-kv-capacity-tokens"] = "16384"
        return meta


def fleet() -> list[Replica]:
    both = (CHAT_MODEL, VLLM_MODEL)
    chat = (CHAT_MODEL,)
    layout = [
        ("vllm-0", "vllm", both, False),
        ("vllm-1", "vllm", both, False),
        ("vllm-2", "vllm", both, True),
        ("tgi-0", "tgi", chat, False),
        ("tgi-1", "tgi", chat, True),
        ("triton-0", "triton", chat, False),
        ("triton-1", "triton", chat, True),
    ]
    return [Replica(n, k, free_port(), m, c) for n, k, m, c in layout]


def consul_id(replica: Replica) -> str:
    return f"consul:{SERVICE}:{replica.name}"


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Variant:
    """What a reload changes: the file is otherwise the same."""

    policy: str = "least_load"
    alias: bool = False
    drop: str | None = None  # a static endpoint left out of the file
    health_interval: float = 2.0


RELOAD_VARIANTS = (
    Variant(policy="power_of_two", alias=True),
    Variant(drop="vllm-1"),
    Variant(health_interval=3.0),
    Variant(),
)


def render_config(port: int, consul_port: int, replicas: list[Replica], v: Variant) -> str:
    lines = [
        f"server: {{host: {HOST}, port: {port}, access_log: true, log_level: info}}",
        "admin: {open: true}",
        "timeouts: {connect: 2, first_byte: 10, idle: 5, total: 120}",
        f"health: {{interval: {v.health_interval}, timeout: 1, fall: 2, rise: 2}}",
        "scrape: {interval: 2, timeout: 1, stale_after: 10}",
        "seed: 7",
        "discovery:",
        "  consul:",
        f"    url: http://{HOST}:{consul_port}",
        f"    services: [{{name: {SERVICE}}}]",
        "    wait: 10s",
        "endpoints:",
    ]
    for r in replicas:
        if r.consul or r.name == v.drop:
            continue
        metrics = f", metrics_url: {r.url}/metrics" if r.kind == "triton" else ""
        models = ", ".join(r.models)
        lines.append(
            f"  - {{id: {r.name}, url: {r.url}, kind: {r.kind}, models: [{models}],"
            f" kv_capacity_tokens: 16384{metrics}}}"
        )
    alias = ", aliases: [soak-alias]" if v.alias else ""
    lines += [
        "models:",
        f"  {CHAT_MODEL}: {{policy: {v.policy}{alias}}}",
        f"  {VLLM_MODEL}: {{policy: round_robin}}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- traffic


@dataclass
class Outcome:
    id: str
    client: int
    t0: float
    t1: float
    op: str  # chat | completions
    model: str
    stream: bool
    usage: bool
    status: int | None = None
    #: ok | http_error | timeout | conn_error | done | error_event | cut | bad_body
    result: str = ""
    chunks: int = 0
    error: str | None = None


def request_body(rng: random.Random, op: str, model: str, stream: bool, usage: bool) -> dict:
    text = rng.choice(PREFIXES) + f"Question {rng.randrange(10_000)}: what is {rng.random()}?"
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(8, 64), "stream": stream}
    if op == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(
    session: aiohttp.ClientSession, base: str, rng: random.Random, client: int, n: int, t: Clock
) -> Outcome:
    op = "chat" if rng.random() < 0.7 else "completions"
    model = CHAT_MODEL if rng.random() < 0.8 else VLLM_MODEL
    stream = rng.random() < 0.5
    usage = stream and rng.random() < 0.5
    body = request_body(rng, op, model, stream, usage)
    rid = f"soak-{client}-{n}"
    out = Outcome(rid, client, t.now(), 0.0, op, model, stream, usage)
    path = "/v1/chat/completions" if op == "chat" else "/v1/completions"
    try:
        async with session.post(base + path, json=body, headers={"x-request-id": rid}) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.result = "http_error"
                out.error = (await resp.text())[:300]
            elif not stream:
                data = await resp.json()
                out.result = "ok" if data.get("choices") else "bad_body"
            else:
                out.result = "cut"
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        out.result = "done"
                        break
                    if payload.startswith(b'{"error"'):
                        out.result = "error_event"
                        out.error = payload.decode(errors="replace")[:300]
                        break
                    out.chunks += 1
    except TimeoutError:
        out.result = "timeout"
    except (aiohttp.ClientError, ValueError) as exc:
        out.result = "conn_error" if out.result in ("", "cut") else out.result
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    out.t1 = t.now()
    return out


async def client_loop(
    idx: int, base: str, seed: int, t: Clock, until: float, outcomes: list[Outcome]
) -> None:
    rng = random.Random(seed * 1000 + idx)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        n = 0
        while t.now() < until:
            outcomes.append(await one_request(session, base, rng, idx, n, t))
            n += 1
            await asyncio.sleep(rng.uniform(0.05, 0.25))


# ---------------------------------------------------------------------------- clock, probes


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.wall = time.time()

    def now(self) -> float:
        return round(time.monotonic() - self.start, 3)


def proc_sample(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields_ = dict(line.split(":", 1) for line in status if ":" in line)
    fds = sockets = 0
    inodes = set()
    for fd in os.scandir(f"/proc/{pid}/fd"):
        fds += 1
        with contextlib.suppress(OSError):
            target = os.readlink(fd.path)
            if target.startswith("socket:["):
                sockets += 1
                inodes.add(target[8:-1])
    states: Counter[str] = Counter()
    names = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    states[names.get(cols[3], cols[3])] += 1
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "rss_kb": int(fields_["VmRSS"].split()[0]),
        "hwm_kb": int(fields_["VmHWM"].split()[0]),
        "threads": int(fields_["Threads"]),
        "fds": fds,
        "sockets": sockets,
        "tcp": dict(states),
        "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
    }


async def sample_process(pid: int, t: Clock, until: float, out: list[dict[str, Any]]) -> None:
    while t.now() < until:
        with contextlib.suppress(OSError):
            out.append({"t": t.now(), **proc_sample(pid)})
        await asyncio.sleep(10.0)


async def sample_endpoints(base: str, t: Clock, until: float, out: list[dict[str, Any]]) -> None:
    """Each second: which endpoints kvroute holds available, per model."""
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while t.now() < until:
            t0 = t.now()
            try:
                async with session.get(base + "/admin/endpoints") as resp:
                    eps = (await resp.json())["endpoints"]
                avail = {CHAT_MODEL: [], VLLM_MODEL: []}
                for ep in eps:
                    for model in ep["models"]:
                        if ep["available"] and model in avail:
                            avail[model].append(ep["id"])
                out.append({"t": t0, "available": avail, "n": len(eps)})
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                out.append({"t": t0, "error": f"{type(exc).__name__}: {exc}"[:200]})
            await asyncio.sleep(max(0.0, 1.0 - (t.now() - t0)))


# ---------------------------------------------------------------------------- faults


@dataclass
class Soak:
    args: argparse.Namespace
    children: Children
    logdir: Path
    replicas: list[Replica]
    consul: FakeConsul
    consul_port: int
    port: int
    config_path: Path
    t: Clock = field(default_factory=Clock)
    faults: list[dict[str, Any]] = field(default_factory=list)
    consul_server: uvicorn.Server | None = None
    consul_task: asyncio.Task[None] | None = None
    reloads: int = 0

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start_replica(self, r: Replica, seed: int) -> None:
        self.children.start(r.name, r.argv(seed), "sim")

    async def start_consul(self) -> None:
        config = uvicorn.Config(
            self.consul.app,
            host=HOST,
            port=self.consul_port,
            # A stop cancels the held blocking queries; uvicorn logs each as an error.
            log_level="critical",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.consul_server = uvicorn.Server(config)
        self.consul_task = asyncio.create_task(self.consul_server.serve())
        for _ in range(200):  # up to 10 s
            if self.consul_server.started:
                return
            await asyncio.sleep(0.05)
        raise BenchError("the fake Consul did not start in 10 s")

    async def stop_consul(self) -> None:
        if self.consul_server is not None and self.consul_task is not None:
            self.consul_server.should_exit = True
            await asyncio.wait_for(self.consul_task, 10)
            self.consul_server = self.consul_task = None

    def register(self, r: Replica) -> None:
        self.consul.register(SERVICE, r.name, r.port, r.meta(), address=HOST)

    async def sim_faults(self, r: Replica, knobs: dict[str, Any]) -> int:
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.post(f"{r.url}/sim/faults", json=knobs) as resp,
        ):
            return resp.status

    async def discovery_status(self) -> Any:
        timeout = aiohttp.ClientTimeout(total=5.0)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.get(self.base + "/admin/config") as resp,
            ):
                return (await resp.json()).get("discovery")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def inject(self, n: int) -> dict[str, Any]:
        kind = FAULTS[n % len(FAULTS)]
        rnd = n // len(FAULTS)
        # Each round of the rotation hits the next replica, and the kinds in turn.
        target = self.replicas[(rnd * 3 + n) % len(self.replicas)]
        rec: dict[str, Any] = {"n": n, "kind": kind, "start": self.t.now()}
        if kind in ("kill", "5xx", "hang", "midstream"):
            rec["target"] = target.name
        try:
            if kind == "kill":
                proc = self.children.procs.pop(target.name)
                os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 5)
                if target.consul:
                    # Consul's own health check would fail: the instance leaves the catalogue.
                    self.consul.deregister(SERVICE, target.name)
                await asyncio.sleep(FAULT_SECONDS[kind])
                self.start_replica(target, n)
                await asyncio.to_thread(wait_port, self.children, target.name, target.port)
                if target.consul:
                    self.register(target)
            elif kind in ("5xx", "hang", "midstream"):
                on, off = {
                    "5xx": ({"fail_rate": 1.0, "fail_status": 500}, {"fail_rate": 0.0}),
                    "hang": ({"stall": -1}, {"stall": 0.0}),
                    "midstream": ({"die_after_chunks": 4}, {"die_after_chunks": -1}),
                }[kind]
                rec["knobs"] = on
                rec["status_on"] = await self.sim_faults(target, on)
                await asyncio.sleep(FAULT_SECONDS[kind])
                rec["status_off"] = await self.sim_faults(target, off)
            elif kind == "reload":
                self.reloads += 1
                variant = RELOAD_VARIANTS[(self.reloads - 1) % len(RELOAD_VARIANTS)]
                rec["variant"] = asdict(variant)
                text = render_config(self.port, self.consul_port, self.replicas, variant)
                tmp = self.config_path.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(self.config_path)
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
                    s.post(self.base + "/admin/reload") as resp,
                ):
                    rec["status"] = resp.status
                    rec["answer"] = (await resp.text())[:300]
            elif kind == "consul":
                # Alternate a Consul that answers 500 with one that is gone.
                rec["mode"] = "stopped" if rnd % 2 == 0 else "http_500"
                if rec["mode"] == "http_500":
                    self.consul.down = True
                    # Wake the held blocking queries so that they see the outage now.
                    self.consul.go_backwards(self.consul.index + 1)
                else:
                    await self.stop_consul()
                await asyncio.sleep(FAULT_SECONDS[kind] / 2)
                rec["discovery_during"] = await self.discovery_status()
                await asyncio.sleep(FAULT_SECONDS[kind] / 2)
                if rec["mode"] == "http_500":
                    self.consul.down = False
                    self.consul.go_backwards(self.consul.index + 1)
                else:
                    await self.start_consul()
                await asyncio.sleep(3.0)
                rec["discovery_after"] = await self.discovery_status()
        except Exception as exc:  # recorded: a harness failure must show in the results
            rec["harness_error"] = f"{type(exc).__name__}: {exc}"
        rec["end"] = self.t.now()
        return rec

    async def fault_loop(self, until: float) -> None:
        n = 0
        next_at = self.args.fault_every
        while next_at + 5 < until:
            await asyncio.sleep(max(0.0, next_at - self.t.now()))
            rec = await self.inject(n)
            self.faults.append(rec)
            print(f"[{self.t.now():7.1f}s] fault {n}: {json.dumps(rec)[:200]}", flush=True)
            n += 1
            next_at += self.args.fault_every


# ---------------------------------------------------------------------------- verdicts


def access_log(path: Path) -> dict[str, dict[str, Any]]:
    lines: dict[str, dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            rid = rec.get("request_id")
            if isinstance(rid, str) and rid.startswith("soak-"):
                lines[rid] = rec
    return lines


def zero_available(samples: list[dict[str, Any]], model: str, t0: float, t1: float) -> bool:
    """Did any sample within the request's life (1 s before it included) see none available?"""
    return any(
        "available" in s and not s["available"][model]
        for s in samples
        if t0 - 1.0 <= s["t"] <= t1 + 1.0
    )


def cut_windows(faults: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    out = []
    for f in faults:
        if f["kind"] == "kill":
            out.append((f["start"] - 1.0, f["start"] + CUT_SLACK, f"kill {f['target']}"))
        elif f["kind"] == "midstream":
            out.append((f["start"] - 1.0, f["end"] + CUT_SLACK, f"midstream {f['target']}"))
    return out


def fault_at(faults: list[dict[str, Any]], t: float) -> str | None:
    for f in faults:
        if f["start"] - 1.0 <= t <= f["end"] + CUT_SLACK:
            return f"{f['kind']} #{f['n']}" + (f" {f['target']}" if "target" in f else "")
    return None


def quarters(samples: list[dict[str, Any]], warmup: float) -> tuple[list[Any], list[Any]]:
    after = [s for s in samples if s["t"] >= warmup]
    q = max(1, len(after) // 4)
    return after[:q], after[-q:]


def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    outcomes = data["outcomes"]
    faults = data["faults"]
    avail = data["availability"]
    log = data.get("access", {})
    warmup = data["settings"]["warmup_s"]

    lost, excused = [], []
    for o in outcomes:
        if o["stream"] or o["result"] == "ok":
            continue
        row = {
            **{k: o[k] for k in ("id", "t0", "t1", "op", "model", "status", "result", "error")},
            "fault": fault_at(faults, o["t0"]) or fault_at(faults, o["t1"]),
            "endpoint": log.get(o["id"], {}).get("endpoint"),
        }
        (excused if zero_available(avail, o["model"], o["t0"], o["t1"]) else lost).append(row)

    windows = cut_windows(faults)
    bad_cuts, allowed_cuts, stream_failures = [], 0, []
    for o in outcomes:
        if not o["stream"] or o["result"] == "done":
            continue
        row = {
            **{k: o[k] for k in ("id", "t0", "t1", "op", "model", "status", "result", "chunks")},
            "error": o["error"],
            "fault": fault_at(faults, o["t1"]) or fault_at(faults, o["t0"]),
            "endpoint": log.get(o["id"], {}).get("endpoint"),
        }
        if o["result"] == "error_event" and any(a <= o["t1"] <= b for a, b, _ in windows):
            allowed_cuts += 1
        elif o["result"] in ("error_event", "cut"):
            bad_cuts.append(row)
        else:  # failed before its first byte, or the client gave up
            stream_failures.append(row)

    res: dict[str, Any] = {
        "lost_non_streamed": {"count": len(lost), "pass": not lost, "requests": lost},
        "non_streamed_failed_with_none_available": {"count": len(excused), "requests": excused},
        "streams_cut_outside_mid_stream_faults_or_silently": {
            "count": len(bad_cuts),
            "pass": not bad_cuts,
            "requests": bad_cuts,
        },
        "streams_ended_with_error_event_during_mid_stream_faults": allowed_cuts,
        "streams_failed_before_first_byte": {
            "count": len(stream_failures),
            "requests": stream_failures,
        },
    }
    procs = data["process"]
    first, last = quarters(procs, warmup)
    if first and last:
        base = statistics.median(s["rss_kb"] for s in first)
        end = statistics.median(s["rss_kb"] for s in last)
        growth = 100.0 * (end - base) / base
        res["rss"] = {
            "warmup_end_kb": base,
            "end_kb": end,
            "start_kb": procs[0]["rss_kb"],
            "max_kb": max(s["rss_kb"] for s in procs),
            "growth_pct": round(growth, 2),
            "pass": growth < 5.0,
            "rule": "median RSS of the last quarter after warm-up vs the first quarter: < 5%",
        }
        for key in ("fds", "sockets", "threads"):
            lo = [s[key] for s in first]
            hi = [s[key] for s in last]
            res[key] = {
                "first_quarter": {"median": statistics.median(lo), "max": max(lo)},
                "last_quarter": {"median": statistics.median(hi), "max": max(hi)},
                "pass": statistics.median(hi) <= max(lo),
                "rule": "median of the last quarter after warm-up <= max of the first quarter",
                "slope_per_hour": slope(procs, key, warmup),
            }
        res["rss"]["slope_kb_per_hour"] = slope(procs, "rss_kb", warmup)
    res["tasks"] = {
        "pass": None,
        "note": "not measured: kvroute exposes no count of its asyncio tasks",
    }
    checks = [v["pass"] for v in res.values() if isinstance(v, dict) and "pass" in v]
    res["all_pass"] = all(c for c in checks if c is not None)
    return res


def slope(samples: list[dict[str, Any]], key: str, warmup: float) -> float | None:
    """Least-squares trend of ``key`` after warm-up, per hour."""
    pts = [(s["t"], s[key]) for s in samples if s["t"] >= warmup]
    if len(pts) < 3:
        return None
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    cov = sum((t - mt) * (v - mv) for t, v in pts)
    return round(3600.0 * cov / var, 2) if var else None


def counts(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    c: Counter[str] = Counter()
    for o in outcomes:
        c[f"{'stream' if o['stream'] else 'plain'}:{o['result']}"] += 1
    by_op = Counter(f"{o['op']}/{o['model']}" for o in outcomes)
    return {"total": len(outcomes), "by_outcome": dict(sorted(c.items())), "by_op": dict(by_op)}


# ---------------------------------------------------------------------------- plot


FAULT_COLOURS = {
    "kill": "tab:red",
    "5xx": "tab:orange",
    "hang": "tab:purple",
    "reload": "tab:green",
    "consul": "tab:blue",
    "midstream": "tab:brown",
}


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs = data["process"]
    warmup = data["settings"]["warmup_s"] / 60
    fig, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    tm = [s["t"] / 60 for s in procs]
    ax = axes[0]
    ax.plot(tm, [s["rss_kb"] / 1024 for s in procs], label="RSS", color="black")
    rss = data["verdicts"].get("rss")
    if rss:
        base = rss["warmup_end_kb"] / 1024
        ax.axhline(base, color="grey", lw=0.8, ls="--")
        ax.axhline(base * 1.05, color="red", lw=0.8, ls="--", label="+5% of the baseline")
        ax.set_ylim(base * 0.9, base * 1.08)
    ax.set_ylabel("kvroute RSS (MiB)")
    ax = axes[1]
    for key, style in (("fds", "-"), ("sockets", "--"), ("threads", ":")):
        ax.plot(tm, [s[key] for s in procs], style, label=key)
    ax.set_ylabel("count")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left")
    ax = axes[2]
    rates = data["rates"]
    series = {k: [n / BUCKET for n in rates[k]] for k in ("ok", "stream error event", "failed")}
    x = [i * BUCKET / 60 for i in range(len(rates["ok"]))]
    bottom = [0.0] * len(x)
    for (label, ys), colour in zip(
        series.items(), ("tab:green", "tab:orange", "tab:red"), strict=True
    ):
        ax.bar(x, ys, width=BUCKET / 60, bottom=bottom, align="edge", color=colour, label=label)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_ylabel("requests/s (10 s buckets)")
    ax.set_xlabel("minutes")
    ax.legend(loc="lower left")
    for ax in axes:
        ax.axvspan(0, warmup, color="grey", alpha=0.1)
        for f in data["faults"]:
            ax.axvspan(
                f["start"] / 60,
                max(f["end"], f["start"] + 2) / 60,
                color=FAULT_COLOURS[f["kind"]],
                alpha=0.15,
            )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.3) for c in FAULT_COLOURS.values()]
    axes[0].legend(handles, list(FAULT_COLOURS), loc="lower right", ncol=6, title="faults")
    v = data["verdicts"]
    title = f"kvroute soak, {data['settings']['duration_s'] / 60:.0f} min"
    if "rss" in v:
        title += f": RSS {v['rss']['growth_pct']:+.1f}% after warm-up (grey)"
    title += f", non-streamed lost {v['lost_non_streamed']['count']}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- run


async def soak(args: argparse.Namespace, children: Children, logdir: Path) -> dict[str, Any]:
    commit = git_commit()  # the code that runs, before anyone commits during the run
    replicas = fleet()
    port, consul_port = free_port(), free_port()
    config_path = logdir / "kvroute.yaml"
    config_path.write_text(render_config(port, consul_port, replicas, Variant()))
    s = Soak(args, children, logdir, replicas, FakeConsul(), consul_port, port, config_path)
    await s.start_consul()
    try:
        for i, r in enumerate(replicas):
            s.start_replica(r, i)
        for r in replicas:
            await asyncio.to_thread(wait_port, children, r.name, r.port)
            if r.consul:
                s.register(r)
        argv = [sys.executable, "-m", "router.cli", "serve", "--config", str(config_path)]
        proc = children.start("kvroute", argv, "proxy")
        await asyncio.to_thread(wait_port, children, "kvroute", port)
        await wait_all_available(s.base, len(replicas))
        s.t = Clock()
        duration = args.minutes * 60.0
        outcomes: list[Outcome] = []
        process: list[dict[str, Any]] = []
        availability: list[dict[str, Any]] = []
        print(f"soak: {args.minutes} min, {args.clients} clients, logs in {logdir}", flush=True)
        tasks = [
            asyncio.create_task(client_loop(i, s.base, args.seed, s.t, duration, outcomes))
            for i in range(args.clients)
        ]
        tasks += [
            asyncio.create_task(sample_process(proc.pid, s.t, duration, process)),
            asyncio.create_task(sample_endpoints(s.base, s.t, duration, availability)),
            asyncio.create_task(s.fault_loop(duration)),
            asyncio.create_task(progress(s.t, duration, outcomes, process)),
        ]
        await asyncio.gather(*tasks)
        final = proc_sample(proc.pid)
    finally:
        await s.stop_consul()
    children.stop("kvroute")
    return {
        "settings": {
            "minutes": args.minutes,
            "duration_s": duration,
            "warmup_s": args.warmup * 60.0,
            "clients": args.clients,
            "fault_every_s": args.fault_every,
            "seed": args.seed,
            "fault_seconds": FAULT_SECONDS,
            "client_timeout_s": CLIENT_TIMEOUT,
            "sim_latency": SIM_LATENCY,
            "fleet": [asdict(r) for r in replicas],
            "config": render_config(port, consul_port, replicas, Variant()),
            "started": dt.datetime.fromtimestamp(s.t.wall, dt.UTC).isoformat(),
            "commit": commit,
            "nproc": os.cpu_count(),
            "logdir": str(logdir),
        },
        "faults": s.faults,
        "process": process,
        "process_final": final,
        "availability": availability,
        "outcomes": [asdict(o) for o in outcomes],
        "access": access_log(logdir / "kvroute.log"),
    }


async def wait_all_available(base: str, n: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
                async with session.get(base + "/admin/endpoints") as resp:
                    eps = (await resp.json())["endpoints"]
                if sum(e["available"] for e in eps) >= n:
                    return
            await asyncio.sleep(0.5)
    raise BenchError(f"kvroute did not see {n} available endpoints in {limit:.0f}s")


async def progress(t: Clock, until: float, outcomes: list[Outcome], procs: list[Any]) -> None:
    while t.now() < until:
        await asyncio.sleep(min(60.0, max(0.1, until - t.now())))
        c = Counter(o.result for o in outcomes)
        rss = procs[-1]["rss_kb"] / 1024 if procs else 0
        print(f"[{t.now():7.1f}s] {len(outcomes)} requests {dict(c)} rss {rss:.1f} MiB", flush=True)


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    return "unknown"


def rates(outcomes: list[dict[str, Any]], end: float) -> dict[str, list[int]]:
    """Requests finished per 10 s bucket, by outcome (the plot's third panel)."""
    n = int(end // BUCKET) + 1
    out = {k: [0] * n for k in ("ok", "stream error event", "failed")}
    for o in outcomes:
        i = min(int(o["t1"] // BUCKET), n - 1)
        if o["result"] in ("ok", "done"):
            out["ok"][i] += 1
        elif o["result"] == "error_event":
            out["stream error event"][i] += 1
        else:
            out["failed"][i] += 1
    return out


def latencies(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, stream in (("plain", False), ("stream", True)):
        xs = sorted(o["t1"] - o["t0"] for o in outcomes if o["stream"] == stream)
        if xs:
            pick = {p: round(xs[min(len(xs) - 1, int(len(xs) * p / 100))], 3) for p in (50, 99)}
            out[name] = {"p50_s": pick[50], "p99_s": pick[99], "max_s": round(xs[-1], 3)}
    return out


def by_fault(data: dict[str, Any]) -> list[dict[str, Any]]:
    """What each fault cost: requests that ended while it lasted (+3 s), by outcome."""
    rows = []
    for f in data["faults"]:
        a, b = f["start"], f["end"] + CUT_SLACK
        c: Counter[str] = Counter()
        slow = 0
        for o in data["outcomes"]:
            if a <= o["t1"] <= b:
                c[f"{'stream' if o['stream'] else 'plain'}:{o['result']}"] += 1
                slow += o["t1"] - o["t0"] > 5.0
        row = {k: f[k] for k in ("n", "kind", "start", "end") if k in f}
        row.update({"target": f.get("target") or f.get("mode") or f.get("variant")})
        rows.append({**row, "outcomes": dict(sorted(c.items())), "over_5s": slow})
    return rows


def finish(data: dict[str, Any], out_json: Path, out_png: Path) -> None:
    data["verdicts"] = verdicts(data)
    if "outcomes" in data:
        # The JSON keeps every failed request whole and the others as counts: the
        # full record of each request is the access log in logdir.
        outcomes = data.pop("outcomes")
        data["counts"] = counts(outcomes)
        data["latency"] = latencies(outcomes)
        data["rates"] = rates(outcomes, data["settings"]["duration_s"])
        failed = [o for o in outcomes if o["result"] not in ("ok", "done")]
        data["outcomes_failed"] = failed
        data["faults_cost"] = by_fault({"faults": data["faults"], "outcomes": outcomes})
        ids = {o["id"] for o in failed}
        data["access_failed"] = {k: v for k, v in data.pop("access", {}).items() if k in ids}
    data.pop("access", None)
    out_json.write_text(json.dumps(data, indent=1))
    out_json.with_suffix(".md").write_text(markdown(data))
    plot(data, out_png)
    summary(data)


def markdown(data: dict[str, Any]) -> str:
    """The figures and the cost of each fault, as tables for the README."""
    v, c = data["verdicts"], data["counts"]
    lines = ["| figure | value | verdict |", "|---|---|---|"]

    def row(name: str, value: str, ok: bool | None = None) -> None:
        mark = "" if ok is None else ("pass" if ok else "**FAIL**")
        lines.append(f"| {name} | {value} | {mark} |")

    row("requests", f"{c['total']} ({c['total'] / data['settings']['duration_s']:.1f}/s)")
    row("outcomes", ", ".join(f"{k} {n}" for k, n in c["by_outcome"].items()))
    lost = v["lost_non_streamed"]
    row("non-streamed lost while a replica was available", str(lost["count"]), lost["pass"])
    cuts = v["streams_cut_outside_mid_stream_faults_or_silently"]
    row("streams cut outside mid-stream faults, or silently", str(cuts["count"]), cuts["pass"])
    row(
        "streams ended by an error event during kill / mid-stream faults",
        str(v["streams_ended_with_error_event_during_mid_stream_faults"]),
    )
    row(
        "streams failed before their first byte",
        str(v["streams_failed_before_first_byte"]["count"]),
    )
    if "rss" in v:
        r = v["rss"]
        row(
            "RSS: start / after warm-up / end / max (MiB)",
            " / ".join(
                f"{r[k] / 1024:.1f}" for k in ("start_kb", "warmup_end_kb", "end_kb", "max_kb")
            ),
        )
        row("RSS growth after warm-up (< 5%)", f"{r['growth_pct']:+.2f}%", r["pass"])
        for key in ("fds", "sockets", "threads"):
            k = v[key]
            row(
                f"{key}: median first / last quarter after warm-up (max first)",
                f"{k['first_quarter']['median']} / {k['last_quarter']['median']}"
                f" ({k['first_quarter']['max']}); trend {k['slope_per_hour']}/h",
                k["pass"],
            )
    row("asyncio tasks", "not measured (no count is exposed)", None)
    for name, lat in data["latency"].items():
        row(
            f"latency {name}: p50 / p99 / max (s)",
            f"{lat['p50_s']} / {lat['p99_s']} / {lat['max_s']}",
        )
    lines += ["", "| # | at (s) | fault | target | requests ending in it (+3 s) | over 5 s |"]
    lines.append("|---|---|---|---|---|---|")
    for f in data["faults_cost"]:
        target = f["target"]
        if isinstance(target, dict):
            changed = {k: x for k, x in target.items() if x != getattr(Variant(), k)}
            target = ", ".join(f"{k}={x}" for k, x in changed.items()) or "same config"
        outs = ", ".join(f"{k} {n}" for k, n in f["outcomes"].items())
        lines.append(
            f"| {f['n']} | {f['start']:.0f} | {f['kind']} | {target} | {outs} | {f['over_5s']} |"
        )
    return "\n".join(lines) + "\n"


def summary(data: dict[str, Any]) -> None:
    v = data["verdicts"]
    print(json.dumps(data["counts"], indent=1))
    for key, value in v.items():
        if isinstance(value, dict):
            value = {k: x for k, x in value.items() if k != "requests"}
        print(f"{key}: {json.dumps(value)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", nargs="?", choices=("run", "report"), default="run")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--quick", action="store_true", help="3 minutes, 1 of warm-up")
    p.add_argument("--warmup", type=float, default=5.0, help="minutes of warm-up")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="soak", help="name of the results files")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.warmup, args.fault_every = 3.0, 1.0, 25.0
        args.out = args.out if args.out != "soak" else "soak_quick"
    out_json, out_png = RESULTS / f"{args.out}.json", RESULTS / f"{args.out}.png"
    if args.command == "report":
        data = json.loads(out_json.read_text())
        if "outcomes_failed" in data:
            data["outcomes"] = data.pop("outcomes_failed")
            data["access"] = data["access_failed"]
            data["verdicts"] = verdicts(data)
            data["outcomes_failed"] = data.pop("outcomes")
            data.pop("access")
            out_json.write_text(json.dumps(data, indent=1))
            out_json.with_suffix(".md").write_text(markdown(data))
            plot(data, out_png)
            summary(data)
        else:  # a run's whole record, written before the JSON was made compact
            data["access"] = data.pop("access_failed", {})
            finish(data, out_json, out_png)
        return 0
    logdir = Path(tempfile.mkdtemp(prefix="kvroute-soak-"))
    children = Children(logdir, {})
    try:
        with terminate_on_sigterm():
            data = asyncio.run(soak(args, children, logdir))
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    finish(data, out_json, out_png)
    print(f"wrote {out_json} and {out_png}; logs in {logdir}")
    return 0 if data["verdicts"]["all_pass"] else 2


if __name__ == "__main__":
    sys.exit(main())
