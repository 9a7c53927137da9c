"""Priority admission on a saturated simulated fleet: does interactive traffic keep its TTFT?

Two simulated vLLM engines (``kvroute simulate --kind vllm``, the simulator's default
latency model: 5 ms a step, 0.1 ms a prefill token, 0.2 ms a decoding sequence) with a
small batch (``--max-num-seqs 8``), and two ``kvroute serve`` processes in front of them,
each its own process, all on 127.0.0.1:

* ``admission``: each endpoint's ``max_concurrency`` is its engine's ``max_num_seqs``,
  so a saturated model's requests wait in kvroute's queue, by priority; the model's
  policy is ``least_load`` and, as by default, kvroute scrapes the engines' metrics;
* ``admission_no_scrape``: the same with ``scrape: {enabled: false}``, so that
  ``least_load`` sees only kvroute's own exact in-flight counts (see "Routing under
  admission" in benchmarks/README.md: with the scraped counts, a freed slot on one
  engine is often filled by a request sent to the other, full one);
* ``no_admission``: the same as ``admission`` without ``max_concurrency`` (admission is
  then off: every request goes on to the engines and waits in their own
  first-come-first-served queues).

Three tenants, each with its own API key: ``interactive`` (priority high) and two batch
tenants ``batch-a`` and ``batch-b`` (priority batch, equal weight). Every request is a
streamed chat request with a new prompt (about 100 tokens, so nothing is shared in the
prefix cache) and ``max_tokens`` 32; the client measures its time to first token (TTFT).
Load is open loop: Poisson arrivals from a fixed seed, each request sent on time whatever
the answers before it (a refused request is not retried).

Phases, one after the other:

1. capacity: a closed loop of 2x the fleet's slots (the interactive tenant) on
   ``admission_no_scrape`` (the engines' capacity: every engine kept at exactly its
   batch), then on ``admission`` (what the default routing makes of it); completed
   requests per second, checked against the engines' own counters and against what the
   latency model predicts;
2. unloaded: ``interactive`` alone at 10% of capacity on ``admission`` -> its TTFT;
3. 2x overload on ``admission``: ``interactive`` at 40% of capacity and each batch
   tenant at 80%;
4. the same on ``admission_no_scrape``;
5. the same on ``no_admission``: what admission buys.

The engines' /sim/stats (polled every 0.1 s: running, waiting) are the truth about what
the engines ran; kvroute's /metrics (admission wait histogram, rejections, queue depth
polled every 0.5 s) about its queue. Results: ``benchmarks/results/admission.json`` (every
request's figures, settings, machine) and ``admission.png``.

    .venv/bin/python benchmarks/admission.py          # about 3 minutes
    .venv/bin/python benchmarks/admission.py --max-tokens 8-56 \
        --out benchmarks/results/admission_varied.json   # output lengths drawn per request
    .venv/bin/python benchmarks/admission.py --report benchmarks/results/admission.json
    .venv/bin/python benchmarks/admission.py --help

Only 127.0.0.1 is ever targeted; every loop is bounded by a duration or a count; every
child process is killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
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
MODEL = "adm"
PATH = "/v1/chat/completions"
ENGINES = 2
#: The simulator's default latency model (backends/sim/engine.py EngineParams).
STEP_BASE = 0.005
PREFILL_PER_TOKEN = 0.0001
DECODE_PER_SEQ = 0.0002
#: Small, so that saturation is reachable with little CPU on a 2-core machine.
MAX_NUM_SEQS = 8
MAX_TOKENS = 32
PROMPT_WORDS = 100
#: Tenant -> priority (README "Tenants, keys and quotas"; weights high 16, batch 1).
TENANTS = {"interactive": "high", "batch-a": "batch", "batch-b": "batch"}
BATCH = ("batch-a", "batch-b")
#: Who fills the fleet in the closed-loop capacity phase.
CAPACITY_TENANT = "interactive"
#: Router -> (endpoints have max_concurrency, kvroute scrapes the engines' metrics).
ROUTERS = {
    "admission": (True, True),
    "admission_no_scrape": (True, False),
    "no_admission": (False, True),
}
#: The 2x-overload phases and the router each runs on.
OVERLOADS = {
    "overload_admission": "admission",
    "overload_admission_no_scrape": "admission_no_scrape",
    "overload_no_admission": "no_admission",
}
SHORT = {
    "overload_admission": "admission",
    "overload_admission_no_scrape": "admission, no scrape",
    "overload_no_admission": "no admission",
}

#: What the report holds admission to.
TARGET_P90_RATIO = 1.5
#: Each of two equal batch tenants gets at least 80% of its fair half.
TARGET_FAIR_FRACTION = 0.8


# ------------------------------------------------------------------------- processes


def new_key() -> str:
    """A key as ``kvroute keys new`` makes them (``kvr-`` and 32 random bytes)."""
    return "kvr-" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def key_hash(key: str) -> str:
    """router/tenants.py's ``hash_key`` (this file does not import router/)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def router_config(
    port: int,
    sims: list[int],
    keys: dict[str, str],
    admission: bool,
    scrape: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    endpoints = []
    for i, sim in enumerate(sims):
        ep: dict[str, Any] = {
            "id": f"sim{i}",
            "url": f"http://{HOST}:{sim}",
            "kind": "vllm",
            "models": [MODEL],
        }
        if admission:
            ep["max_concurrency"] = MAX_NUM_SEQS
        endpoints.append(ep)
    return {
        "server": {"host": HOST, "port": port, "access_log": False},
        "endpoints": endpoints,
        # least_load on this router's own in-flight counts plus the engines' scraped
        # running + waiting: the default way to spread a model over its endpoints.
        "models": {MODEL: {"policy": "least_load"}},
        "scrape": {"enabled": scrape},
        "auth": {"enabled": True},
        "tenants": {
            name: {"keys": [key_hash(keys[name])], "priority": priority}
            for name, priority in TENANTS.items()
        },
        "admission": {
            "max_queue": args.max_queue,
            "max_wait": args.max_wait,
            "reserve": args.reserve,
        },
    }


def start_fleet(
    children: Children, keys: dict[str, str], args: argparse.Namespace
) -> tuple[list[int], dict[str, int]]:
    sims = [free_port() for _ in range(ENGINES)]
    for i, port in enumerate(sims):
        argv = [sys.executable, "-m", "router.cli", "simulate", "--kind", "vllm"]
        argv += ["--host", HOST, "--port", str(port), "--model", MODEL]
        argv += ["--max-num-seqs", str(MAX_NUM_SEQS), "--step-base", str(STEP_BASE)]
        argv += ["--prefill-per-token", str(PREFILL_PER_TOKEN)]
        argv += ["--decode-per-seq", str(DECODE_PER_SEQ), "--seed", str(i)]
        children.start(f"sim{i}", argv, "sim")
    routers = {name: free_port() for name in ROUTERS}
    for name, port in routers.items():
        config = router_config(port, sims, keys, *ROUTERS[name], args)
        path = children.logdir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        argv = [sys.executable, "-m", "router.cli", "serve", "--config", str(path)]
        children.start(name, argv, "proxy")
    for i, port in enumerate(sims):
        wait_port(children, f"sim{i}", port)
    for name, port in routers.items():
        wait_port(children, name, port)
    return sims, routers


# --------------------------------------------------------------------------- client


@dataclass
class Record:
    """One request as the client saw it. Times in seconds from the phase's start."""

    tenant: str
    planned: float
    sent: float = 0.0
    status: int | None = None
    code: str | None = None
    ttft: float | None = None
    end: float | None = None
    #: The stream ended with [DONE].
    done: bool = False
    error: str | None = None

    @property
    def outcome(self) -> str:
        if self.done:
            return "completed"
        if self.code:
            return self.code  # queue_full, queue_timeout, ...
        if self.status is not None and self.status != 200:
            return f"status {self.status}"
        if self.error:
            return f"client error {self.error}"
        if self.ttft is None:
            return CENSORED
        return "cut mid-stream at the cutoff"

    def row(self) -> list[Any]:
        """The compact form kept in the JSON (see ``RECORD_FIELDS``)."""
        return [
            self.tenant,
            round(self.planned, 4),
            round(self.sent, 4),
            self.status,
            self.code,
            None if self.ttft is None else round(1000 * self.ttft, 2),
            None if self.end is None else round(1000 * (self.end - self.sent), 2),
            self.done,
            self.error,
        ]


#: A request without its first token when the client hung up at the phase's end.
CENSORED = "no first token (censored)"

RECORD_FIELDS = [
    "tenant",
    "planned_s",
    "sent_s",
    "status",
    "error_code",
    "ttft_ms",
    "e2e_ms",
    "done",
    "client_error",
]


class Client:
    """Sends streamed chat requests as the tenants, recording each one's fate."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        keys: dict[str, str],
        seed: int,
        max_tokens: tuple[int, int],
    ) -> None:
        self.session = session
        self.max_tokens = max_tokens
        self.headers = {
            name: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            for name, key in keys.items()
        }
        self.rng = random.Random(seed)
        self.n = 0

    def body(self, tenant: str) -> bytes:
        """A new prompt each time: no request shares a prefix with another."""
        self.n += 1
        prompt = f"{tenant} {self.n}: " + words(self.rng, PROMPT_WORDS)
        return json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.rng.randint(*self.max_tokens),
                "stream": True,
            }
        ).encode()

    async def send(self, url: str, rec: Record, body: bytes, t0: float) -> None:
        rec.sent = time.monotonic() - t0
        try:
            async with self.session.post(url, data=body, headers=self.headers[rec.tenant]) as r:
                rec.status = r.status
                if r.status != 200:
                    data = await r.read()
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        rec.code = json.loads(data)["error"]["code"]
                    rec.end = time.monotonic() - t0
                    return
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    if rec.ttft is None:
                        # Like vLLM, the simulator's first chunk carries the first token.
                        rec.ttft = time.monotonic() - t0 - rec.sent
                    if line.strip() == b"data: [DONE]":
                        rec.done = True
                rec.end = time.monotonic() - t0
        except (aiohttp.ClientError, TimeoutError) as exc:
            rec.error = type(exc).__name__


def poisson_schedule(rates: dict[str, float], seconds: float, seed: int) -> list[tuple[float, str]]:
    """Arrival times of each tenant over ``seconds``: a Poisson process of its rate
    (requests/s) from its own seeded generator, merged in time order."""
    out: list[tuple[float, str]] = []
    for i, (tenant, rate) in enumerate(sorted(rates.items())):
        if rate <= 0:
            continue
        rng = random.Random(seed * 1000 + i)
        t = rng.expovariate(rate)
        while t < seconds:
            out.append((t, tenant))
            t += rng.expovariate(rate)
    out.sort()
    return out


# ------------------------------------------------------------------------- watchers


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        return await resp.text()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


_SAMPLE = re.compile(r"^(kvroute_\w+?)(\{[^}]*\})? (\S+)$")


def parse_metrics(text: str, prefixes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The samples of the ``prefixes`` metrics: name -> labels -> value."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2) or "{}"] = float(m.group(3))
    return out


METRICS = (
    "kvroute_admission_wait_seconds",
    "kvroute_admission_rejections_total",
    "kvroute_admission_queue_depth",
    "kvroute_tenant_requests_total",
)


def label(labels: str, name: str) -> str:
    m = re.search(rf'{name}="([^"]*)"', labels)
    return m.group(1) if m else ""


@dataclass
class Watch:
    """Peaks seen while polling the engines and kvroute during a phase."""

    engine_running_max: list[int]
    engine_waiting_max: list[int]
    queue_depth_max: dict[str, float] = field(default_factory=dict)
    engine_samples: int = 0
    queue_samples: int = 0
    #: (t, running per engine, waiting per engine), every 0.1 s.
    engine_series: list[list[Any]] = field(default_factory=list)
    #: (t, depth by priority), every 0.5 s.
    queue_series: list[list[Any]] = field(default_factory=list)


async def watch(
    session: aiohttp.ClientSession,
    sims: list[int],
    router: int,
    t0: float,
    stop: asyncio.Event,
    w: Watch,
) -> None:
    """Poll each engine's /sim/stats every 0.1 s and kvroute's queue depth every 0.5 s."""
    n = 0
    while not stop.is_set():
        stats = await asyncio.gather(
            *(get_json(session, f"http://{HOST}:{p}/sim/stats") for p in sims)
        )
        running = [s["running"] for s in stats]
        waiting = [s["waiting"] for s in stats]
        now = round(time.monotonic() - t0, 2)
        w.engine_series.append([now, running, waiting])
        w.engine_samples += 1
        w.engine_running_max = list(map(max, w.engine_running_max, running))
        w.engine_waiting_max = list(map(max, w.engine_waiting_max, waiting))
        if n % 5 == 0:
            text = await get_text(session, f"http://{HOST}:{router}/metrics")
            depth = parse_metrics(text, ("kvroute_admission_queue_depth",))
            by = {
                label(k, "priority"): v
                for k, v in depth.get("kvroute_admission_queue_depth", {}).items()
            }
            w.queue_series.append([now, by])
            w.queue_samples += 1
            for k, v in by.items():
                w.queue_depth_max[k] = max(w.queue_depth_max.get(k, 0.0), v)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    router: str
    #: Requests per second by tenant (open loop), or None for the closed-loop capacity run.
    rates: dict[str, float] | None
    seconds: float
    #: Requests sent before this many seconds are not counted (the queues fill meanwhile).
    warmup: float
    #: How long after the last arrival the client waits for answers before it hangs up.
    grace: float
    closed_loop_clients: int = 0


async def run_phase(
    phase: Phase,
    session: aiohttp.ClientSession,
    client: Client,
    sims: list[int],
    routers: dict[str, int],
    children: Children,
    seed: int,
) -> dict[str, Any]:
    router = routers[phase.router]
    url = f"http://{HOST}:{router}{PATH}"
    await wait_idle(session, sims)
    sim0 = await asyncio.gather(*(get_json(session, f"http://{HOST}:{p}/sim/stats") for p in sims))
    metrics0 = parse_metrics(await get_text(session, f"http://{HOST}:{router}/metrics"), METRICS)
    pids = [p.pid for p in children.procs.values()] + [os.getpid()]
    ours0, machine0 = sum(cpu_seconds(p) for p in pids), machine_jiffies()
    proxy_cpu0 = cpu_seconds(children.procs[phase.router].pid)

    records: list[Record] = []
    late: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    w = Watch([0] * len(sims), [0] * len(sims))
    t0 = time.monotonic()
    watcher = asyncio.create_task(watch(session, sims, router, t0, stop, w))

    def launch(rec: Record, body: bytes) -> asyncio.Task[None]:
        task = asyncio.create_task(client.send(url, rec, body, t0))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    if phase.rates is None:
        # The heaviest class: the whole capacity is its, whatever admission.reserve
        # holds back from the others.
        tenant = CAPACITY_TENANT

        async def loop() -> None:
            while time.monotonic() - t0 < phase.seconds:
                rec = Record(tenant, time.monotonic() - t0)
                records.append(rec)
                await launch(rec, client.body(tenant))

        await asyncio.gather(*(loop() for _ in range(phase.closed_loop_clients)))
    else:
        schedule = poisson_schedule(phase.rates, phase.seconds, seed)
        bodies = [client.body(tenant) for _, tenant in schedule]
        for (at, tenant), body in zip(schedule, bodies, strict=True):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            late.append(time.monotonic() - t0 - at)
            rec = Record(tenant, at)
            records.append(rec)
            launch(rec, body)
        deadline = t0 + phase.seconds + phase.grace
        while tasks and time.monotonic() < deadline:
            await asyncio.wait(set(tasks), timeout=deadline - time.monotonic())
    elapsed = time.monotonic() - t0
    censored = len(tasks)
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.wait(set(tasks), timeout=10)
    stop.set()
    await watcher

    ours1, machine1 = sum(cpu_seconds(p) for p in pids), machine_jiffies()
    proxy_cpu = cpu_seconds(children.procs[phase.router].pid) - proxy_cpu0
    # The engines abort what the hang-up cancelled; give them a moment, then read.
    await wait_idle(session, sims)
    sim1 = await asyncio.gather(*(get_json(session, f"http://{HOST}:{p}/sim/stats") for p in sims))
    metrics1 = parse_metrics(await get_text(session, f"http://{HOST}:{router}/metrics"), METRICS)
    capacity = len(os.sched_getaffinity(0)) * (machine1[1] - machine0[1]) / CLOCK_TICKS
    foreign = (machine1[0] - machine0[0]) / CLOCK_TICKS - (ours1 - ours0)
    return {
        "phase": phase.name,
        "router": phase.router,
        "rates_per_s": phase.rates,
        "closed_loop_clients": phase.closed_loop_clients or None,
        "seconds": phase.seconds,
        "warmup_s": phase.warmup,
        "grace_s": phase.grace,
        "elapsed_s": round(elapsed, 2),
        "censored_at_cutoff": censored,
        "send_lateness_ms": lateness(late),
        "foreign_cpu_pct": round(100 * foreign / max(capacity, 1e-9), 1),
        "router_cpu_s": round(proxy_cpu, 2),
        "engines": engine_delta(sim0, sim1, w),
        "kvroute": metrics_delta(metrics0, metrics1, w),
        "summary": summarise(records, phase),
        "records": [r.row() for r in records],
    }


async def wait_idle(session: aiohttp.ClientSession, sims: list[int], limit: float = 30.0) -> None:
    """Until no engine runs or queues anything (the previous phase's requests are gone)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        stats = await asyncio.gather(
            *(get_json(session, f"http://{HOST}:{p}/sim/stats") for p in sims)
        )
        if all(s["running"] == 0 and s["waiting"] == 0 for s in stats):
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"the engines were still busy {limit:.0f} s after a phase")


def lateness(late: list[float]) -> dict[str, float] | None:
    """How far behind its schedule the open-loop sender ran (it must keep up)."""
    if not late:
        return None
    return {
        "p50": round(1000 * quantile(late, 0.5), 2),
        "p99": round(1000 * quantile(late, 0.99), 2),
        "max": round(1000 * max(late), 2),
    }


def engine_delta(
    before: list[dict[str, Any]], after: list[dict[str, Any]], w: Watch
) -> dict[str, Any]:
    """What the engines themselves counted during the phase."""
    per = []
    series = w.engine_series
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        per.append(
            {
                "requests": b["requests"] - a["requests"],
                "finished": {k: b["finished"][k] - a["finished"].get(k, 0) for k in b["finished"]},
                "prompt_tokens": b["prompt_tokens"] - a["prompt_tokens"],
                "generation_tokens": b["generation_tokens"] - a["generation_tokens"],
                "preemptions": b["preemptions"] - a["preemptions"],
                "running_max": w.engine_running_max[i],
                "waiting_max": w.engine_waiting_max[i],
                # Running + waiting: more than MAX_NUM_SEQS means kvroute had more than
                # the engine's batch in flight there (waiting alone also holds requests
                # that arrived during a step and start with the next one).
                "load_max": max((x[1][i] + x[2][i] for x in series), default=0),
                "mean_running": round(statistics.mean(x[1][i] for x in series), 2)
                if series
                else None,
            }
        )
    return {
        "per_engine": per,
        "requests": sum(e["requests"] for e in per),
        "finished_length": sum(e["finished"]["length"] for e in per),
        "aborted": sum(e["finished"]["abort"] for e in per),
        "running_max": max(e["running_max"] for e in per),
        "waiting_max": max(e["waiting_max"] for e in per),
        "load_max": max(e["load_max"] for e in per),
        "oversubscribed_share": round(
            sum(any(r + q > MAX_NUM_SEQS for r, q in zip(*x[1:], strict=True)) for x in series)
            / max(1, len(series)),
            3,
        ),
        "mean_running_total": round(sum(e["mean_running"] or 0 for e in per), 2),
        "samples": w.engine_samples,
        "series": w.engine_series,
    }


def metrics_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], w: Watch
) -> dict[str, Any]:
    """kvroute's queue during the phase: waits by priority (its histogram), refusals by
    reason, requests by tenant and status, and the deepest queue the polls saw."""

    def diff(name: str) -> dict[str, float]:
        a, b = before.get(name, {}), after.get(name, {})
        return {k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0)}

    wait: dict[str, Any] = {}
    buckets = diff("kvroute_admission_wait_seconds_bucket")
    for k, v in diff("kvroute_admission_wait_seconds_count").items():
        prio = label(k, "priority")
        total = diff("kvroute_admission_wait_seconds_sum").get(k, 0.0)
        cumulative = sorted(
            (float(label(b, "le")), n) for b, n in buckets.items() if label(b, "priority") == prio
        )
        wait[prio] = {
            "queued": int(v),
            "mean_ms": round(1000 * total / v, 2) if v else None,
            "p50_ms_bucket": bucket_quantile(cumulative, v, 0.5),
            "p90_ms_bucket": bucket_quantile(cumulative, v, 0.9),
            "buckets": {str(le): int(n) for le, n in cumulative},
        }
    rejections = {
        label(k, "reason"): int(v) for k, v in diff("kvroute_admission_rejections_total").items()
    }
    tenants: dict[str, dict[str, int]] = {}
    for k, v in diff("kvroute_tenant_requests_total").items():
        tenants.setdefault(label(k, "tenant"), {})[label(k, "status")] = int(v)
    return {
        "admission_wait": wait,
        "rejections": rejections,
        "tenant_requests": tenants,
        "queue_depth_max": w.queue_depth_max,
        "queue_samples": w.queue_samples,
        "queue_series": w.queue_series,
    }


def bucket_quantile(cumulative: list[tuple[float, float]], count: float, q: float) -> str | None:
    """The histogram bucket holding the ``q`` quantile, as "<= N ms"."""
    for le, n in cumulative:
        if n >= q * count:
            return "+Inf" if math.isinf(le) else f"<= {1000 * le:g} ms"
    return None


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile, linear between order statistics (numpy's default)."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(records: list[Record], phase: Phase) -> dict[str, Any]:
    """Per tenant, over the requests sent after the warm-up: what became of them, and
    the TTFT of those answered. A request still without its first token when the client
    hung up is *censored*: its TTFT is at least the time it had waited, so a percentile
    that falls among the censored is reported as a lower bound."""
    out: dict[str, Any] = {}
    window = [r for r in records if r.planned >= phase.warmup]
    measured = phase.seconds - phase.warmup
    for tenant in sorted({r.tenant for r in window}):
        mine = [r for r in window if r.tenant == tenant]
        ttft = [r.ttft for r in mine if r.ttft is not None]
        censored = [r for r in mine if r.outcome == CENSORED]
        outcomes = Counter(r.outcome for r in mine)
        completed = outcomes.get("completed", 0)
        s: dict[str, Any] = {
            "sent": len(mine),
            "offered_per_s": round(len(mine) / measured, 2),
            "completed": completed,
            "completed_per_s": round(completed / measured, 2),
            "outcomes": dict(outcomes),
            "refused_share": round(
                sum(n for k, n in outcomes.items() if k != "completed") / len(mine), 4
            ),
        }
        if ttft:
            lower = sorted(ttft + [math.inf] * len(censored))
            for q in (0.5, 0.9, 0.99):
                v = quantile(lower, q) if len(censored) == 0 else censored_quantile(lower, q)
                s[f"ttft_p{round(q * 100)}_ms"] = None if math.isinf(v) else round(1000 * v, 2)
            s["ttft_mean_ms_answered"] = round(1000 * statistics.mean(ttft), 2)
            s["ttft_max_ms_answered"] = round(1000 * max(ttft), 2)
            if censored:
                waited = min(phase.seconds + phase.grace - r.sent for r in censored)
                s["censored"] = len(censored)
                s["censored_waited_at_least_ms"] = round(1000 * waited, 1)
        out[tenant] = s
    return out


def censored_quantile(values: list[float], q: float) -> float:
    """A quantile with censored values (inf) in the sample: the order statistic itself,
    inf when it is a censored one (then the true value is at least the cutoff)."""
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


# -------------------------------------------------------------------------- report


def predicted_capacity(max_tokens: float) -> dict[str, float]:
    """Requests/s of the fleet by the latency model, for ``MAX_NUM_SEQS`` sequences of
    ``max_tokens`` tokens (on average) and ``prompt`` prompt tokens each in steady state:
    every step decodes a token of each running sequence, and 1/max_tokens of them finish
    per step and are replaced by new ones whose prompts are prefilled (in that step or
    together in one: the total is the same). The simulator's own time per step (Python,
    the HTTP streams) comes on top: the measured capacity is lower."""
    prompt = PROMPT_WORDS + 14  # the chat template and the "tenant n:" tag (measured)
    per_step = MAX_NUM_SEQS / max_tokens
    step = STEP_BASE + MAX_NUM_SEQS * DECODE_PER_SEQ + per_step * prompt * PREFILL_PER_TOKEN
    return {
        "step_ms": round(1000 * step, 3),
        "per_engine_req_s": round(per_step / step, 2),
        "fleet_req_s": round(ENGINES * per_step / step, 2),
    }


def verdicts(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    unloaded = phases["unloaded"]["summary"]["interactive"]
    out: dict[str, Any] = {"targets": {}}
    for name in OVERLOADS:
        s = phases[name]["summary"]
        inter = s["interactive"]
        p90 = inter.get("ttft_p90_ms")
        ratio = None if p90 is None else round(p90 / unloaded["ttft_p90_ms"], 3)
        batch_done = sum(s[t]["completed"] for t in BATCH if t in s)
        shares = {
            t: round(s[t]["completed"] / batch_done, 4) if batch_done else None for t in BATCH
        }
        out[name] = {
            "interactive_p90_ratio_to_unloaded": ratio,
            "interactive_p50_ratio_to_unloaded": None
            if inter.get("ttft_p50_ms") is None
            else round(inter["ttft_p50_ms"] / unloaded["ttft_p50_ms"], 3),
            "interactive_p90_is_lower_bound": "censored" in inter and p90 is None,
            "batch_completed_shares": shares,
            "batch_both_offered_more_than_they_got": all(
                s[t]["completed"] < s[t]["sent"] for t in BATCH
            ),
        }
    floor = TARGET_FAIR_FRACTION / len(BATCH)
    for name, how in (
        ("overload_admission", "admission, default config"),
        ("overload_admission_no_scrape", "admission, no scrape"),
    ):
        adm = out[name]
        ratio = adm["interactive_p90_ratio_to_unloaded"]
        p90 = f"{how}: interactive TTFT p90 under 2x overload <= {TARGET_P90_RATIO}x unloaded"
        out["targets"][p90] = ratio is not None and ratio <= TARGET_P90_RATIO
        fair = f"{how}: each batch tenant >= {100 * floor:.0f}% of the batch completions"
        out["targets"][fair] = all(
            v is not None and v >= floor for v in adm["batch_completed_shares"].values()
        ) and bool(adm["batch_both_offered_more_than_they_got"])
    return out


def print_phase(p: dict[str, Any]) -> None:
    e, k = p["engines"], p["kvroute"]
    print(
        f"  engines ran {e['requests']} requests (max running {e['running_max']}, max waiting "
        f"{e['waiting_max']}, max running + waiting {e['load_max']}, oversubscribed "
        f"{100 * e['oversubscribed_share']:.0f}% of the polls, mean running "
        f"{e['mean_running_total']}); kvroute queue max {k['queue_depth_max']}, rejections "
        f"{k['rejections']}; other processes {p['foreign_cpu_pct']}% of the machine; "
        f"send lateness {p['send_lateness_ms']}",
        flush=True,
    )
    for tenant, s in p["summary"].items():
        print(
            f"  {tenant:<12} sent {s['sent']:5d} ({s['offered_per_s']:6.1f}/s)  completed "
            f"{s['completed']:5d} ({s['completed_per_s']:6.1f}/s)  TTFT p50 "
            f"{fmt_ms(s.get('ttft_p50_ms'))}  p90 {fmt_ms(s.get('ttft_p90_ms'))}  p99 "
            f"{fmt_ms(s.get('ttft_p99_ms'))}  outcomes {s['outcomes']}",
            flush=True,
        )


def fmt_ms(v: float | None) -> str:
    return "  censored" if v is None else f"{v:8.1f}ms"


def plot(report: dict[str, Any], out: Path) -> None:
    """Six panels: interactive's and the batch tenants' TTFT distributions per router,
    interactive's TTFT over the overload phases, what became of each tenant's requests,
    and the engines' running + waiting over time with each admission router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phases"]
    router_colours = {
        "unloaded": "black",
        "overload_admission": "#d62728",
        "overload_admission_no_scrape": "#1f77b4",
        "overload_no_admission": "#7f7f7f",
    }
    names = {"unloaded": "unloaded", **{k: f"2x, {v}" for k, v in SHORT.items()}}
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))

    def rows(name: str) -> list[dict[str, Any]]:
        return [dict(zip(RECORD_FIELDS, r, strict=True)) for r in phases[name]["records"]]

    def ttfts(name: str, tenants: tuple[str, ...]) -> list[float]:
        warm = phases[name]["warmup_s"]
        return sorted(
            r["ttft_ms"]
            for r in rows(name)
            if r["tenant"] in tenants and r["planned_s"] >= warm and r["ttft_ms"] is not None
        )

    def cdf(ax: Any, tenants: tuple[str, ...], phase_names: list[str], title: str) -> None:
        for name in phase_names:
            xs = ttfts(name, tenants)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                p90 = phases[name]["summary"].get(tenants[0], {}).get("ttft_p90_ms")
                extra = f", p90 {p90:.0f} ms" if p90 and len(tenants) == 1 else ""
                ax.plot(xs, ys, color=router_colours[name], lw=2, label=f"{names[name]}{extra}")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT ms (log scale), requests answered")
        ax.set_ylabel("fraction of requests")
        ax.axhline(0.9, color="grey", lw=0.5, ls=":")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")

    cdf(axes[0][0], ("interactive",), ["unloaded", *OVERLOADS], "interactive (high): TTFT")
    cdf(axes[0][1], BATCH, list(OVERLOADS), "batch-a + batch-b (batch): TTFT")

    ax = axes[0][2]
    for name in OVERLOADS:
        pts = [
            (r["sent_s"], r["ttft_ms"])
            for r in rows(name)
            if r["tenant"] == "interactive" and r["ttft_ms"] is not None
        ]
        ax.scatter(
            [x for x, _ in pts],
            [y for _, y in pts],
            s=5,
            color=router_colours[name],
            alpha=0.6,
            label=names[name],
        )
    unloaded = phases["unloaded"]["summary"]["interactive"]["ttft_p90_ms"]
    ax.axhline(unloaded, color="black", lw=1, label=f"unloaded p90 ({unloaded:.0f} ms)")
    ax.axhline(
        TARGET_P90_RATIO * unloaded, color="black", lw=1, ls="--", label=f"{TARGET_P90_RATIO}x that"
    )
    ax.set_yscale("log")
    ax.set_xlabel("sent at (s from the phase's start)")
    ax.set_ylabel("TTFT ms (log scale)")
    ax.set_title("interactive under 2x overload: TTFT over time")
    ax.legend(fontsize=8, markerscale=3)

    ax = axes[1][0]
    kinds = ["completed", "queue_timeout", "queue_full", CENSORED]
    kind_colours = ["#2ca02c", "#ff7f0e", "#d62728", "#7f7f7f"]
    labels = []
    stacks: dict[str, list[float]] = {k: [] for k in [*kinds, "other"]}
    for name in OVERLOADS:
        for tenant, s in phases[name]["summary"].items():
            labels.append(f"{tenant}\n{SHORT[name]}")
            for k in kinds:
                stacks[k].append(100 * s["outcomes"].get(k, 0) / s["sent"])
            others = sum(n for k, n in s["outcomes"].items() if k not in kinds)
            stacks["other"].append(100 * others / s["sent"])
    bottoms = [0.0] * len(labels)
    for k, colour in zip([*kinds, "other"], [*kind_colours, "black"], strict=True):
        ax.bar(range(len(labels)), stacks[k], bottom=bottoms, color=colour, label=k)
        bottoms = [b + v for b, v in zip(bottoms, stacks[k], strict=True)]
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("% of the tenant's requests (after the warm-up)")
    ax.set_title("2x overload: what became of each tenant's requests")
    ax.legend(fontsize=7, loc="lower left")

    admitted = ("overload_admission", "overload_admission_no_scrape")
    for ax, name in zip(axes[1][1:], admitted, strict=True):
        series = phases[name]["engines"]["series"]
        t = [x[0] for x in series]
        for i, colour in enumerate(("#9467bd", "#8c564b")):
            ax.plot(
                t,
                [x[1][i] + x[2][i] for x in series],
                color=colour,
                lw=0.8,
                label=f"engine {i}: running + waiting",
            )
        ax.axhline(MAX_NUM_SEQS, color="black", lw=1, ls="--", label="max_num_seqs")
        e = phases[name]["engines"]
        ax.set_title(
            f"{SHORT[name]}: the engines' load, polled every 0.1 s "
            f"(over {MAX_NUM_SEQS} in {100 * e['oversubscribed_share']:.0f}% of polls)",
            fontsize=10,
        )
        ax.set_xlabel("s from the phase's start")
        ax.set_ylim(0, 2 * MAX_NUM_SEQS + 1)
        ax.legend(fontsize=8, loc="upper right")

    meta = report["meta"]
    cap = report["capacity"]
    fig.suptitle(
        f"kvroute priority admission: {ENGINES} simulated vLLM engines x {MAX_NUM_SEQS} "
        f"sequences, max_tokens {meta['request']['max_tokens']}, capacity "
        f"{cap['measured_req_s']:.1f} req/s, 2x overload (interactive 0.4x, batch-a and "
        f"batch-b 0.8x each); {meta['nproc']} CPUs, {meta['date']}, commit {meta['git_commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": git.stdout.strip(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "engines": ENGINES,
        "engine_params": {
            "max_num_seqs": MAX_NUM_SEQS,
            "step_base_s": STEP_BASE,
            "prefill_per_token_s": PREFILL_PER_TOKEN,
            "decode_per_seq_s": DECODE_PER_SEQ,
        },
        "request": {
            "prompt_words": PROMPT_WORDS,
            "max_tokens": args.max_tokens,
            "stream": True,
            "prompts": "each new (no shared prefix)",
        },
        "tenants": TENANTS,
        "priorities": {"high": 16, "normal": 4, "batch": 1},
        "admission": {
            "max_queue": args.max_queue,
            "max_wait_s": args.max_wait,
            "reserve": args.reserve,
        },
        "policy": "least_load (max of kvroute's in-flight and the scraped running + waiting)",
        "routers": {
            name: {"max_concurrency": MAX_NUM_SEQS if adm else None, "scrape": scrape}
            for name, (adm, scrape) in ROUTERS.items()
        },
        "seed": args.seed,
        "overload": args.overload,
        "interactive_share_of_capacity": args.interactive,
        "unloaded_share_of_capacity": args.unloaded,
        "record_fields": RECORD_FIELDS,
        "client": "one Python process, aiohttp on uvloop, open loop (Poisson), no retries",
    }


async def measure(
    args: argparse.Namespace, children: Children, keys: dict[str, str]
) -> dict[str, Any]:
    sims, routers = start_fleet(children, keys, args)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        client = Client(session, keys, args.seed, args.out_tokens)

        async def phase(p: Phase, seed: int) -> dict[str, Any]:
            print(f"{p.name} on {p.router}: {p.rates or f'{p.closed_loop_clients} clients'}")
            result = await run_phase(p, session, client, sims, routers, children, seed)
            print_phase(result)
            return result

        slots = ENGINES * MAX_NUM_SEQS
        cap_phase = Phase(
            "capacity", "admission_no_scrape", None, args.capacity_seconds, 3.0, 0.0, 2 * slots
        )
        cap = await phase(cap_phase, args.seed)
        cap_default = await phase(
            Phase(
                "capacity_default_routing", "admission", None, args.capacity_seconds, 3.0, 0.0,
                2 * slots,
            ),
            args.seed,
        )  # fmt: skip
        done = cap["summary"][CAPACITY_TENANT]["completed_per_s"]
        window = cap["seconds"] - cap["warmup_s"]
        engines = cap["engines"]["finished_length"] / cap["elapsed_s"]
        capacity = {
            "measured_req_s": done,
            "measured_on": "admission_no_scrape",
            "engines_finished_per_s_whole_phase": round(engines, 2),
            "predicted": predicted_capacity(sum(args.out_tokens) / 2),
            "window_s": window,
            "prompt_tokens_per_request": round(
                sum(e["prompt_tokens"] for e in cap["engines"]["per_engine"])
                / max(1, cap["engines"]["requests"]),
                1,
            ),
            "default_routing_req_s": cap_default["summary"][CAPACITY_TENANT]["completed_per_s"],
        }
        print(
            f"capacity: {done:.1f} req/s measured ({capacity['default_routing_req_s']:.1f} with "
            f"the default routing); predicted {capacity['predicted']}"
        )
        c = done
        unloaded = Phase(
            "unloaded", "admission", {"interactive": args.unloaded * c}, args.unloaded_seconds,
            2.0, 5.0,
        )  # fmt: skip
        over_rates = {
            "interactive": args.interactive * c,
            **{t: (args.overload - args.interactive) * c / len(BATCH) for t in BATCH},
        }
        overloads = [
            Phase(name, router, over_rates, args.overload_seconds, 5.0, args.max_wait + 5.0)
            for name, router in OVERLOADS.items()
            if router != "no_admission"
        ]
        base = Phase(
            "overload_no_admission", "no_admission", over_rates, args.baseline_seconds, 3.0,
            args.baseline_grace,
        )  # fmt: skip
        phases = {"capacity": cap, "capacity_default_routing": cap_default}
        # The same seed for every overload phase: the same arrivals, tenant by tenant.
        phases["unloaded"] = await phase(unloaded, args.seed + 1)
        for p in (*overloads, base):
            phases[p.name] = await phase(p, args.seed + 2)
    return {"capacity": capacity, "phases": phases}


def print_report(report: dict[str, Any]) -> None:
    v = report["verdicts"]
    unloaded = report["phases"]["unloaded"]["summary"]["interactive"]
    print()
    print(
        f"capacity {report['capacity']['measured_req_s']:.1f} req/s "
        f"(predicted {report['capacity']['predicted']['fleet_req_s']:.1f}); interactive "
        f"unloaded TTFT p50 {unloaded['ttft_p50_ms']:.1f} ms, p90 {unloaded['ttft_p90_ms']:.1f} ms"
    )
    for name in OVERLOADS:
        r = v[name]
        ratio = r["interactive_p90_ratio_to_unloaded"]
        print(
            f"{name}: interactive p90 {'>= cutoff' if ratio is None else f'{ratio:.2f}x'} "
            f"unloaded; batch completion shares {r['batch_completed_shares']}"
        )
    for name, met in v["targets"].items():
        print(f"target {name}: {'MET' if met else 'NOT MET'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--overload", type=float, default=2.0, help="total offered load, x capacity"
    )
    parser.add_argument(
        "--interactive", type=float, default=0.4, help="interactive's load, x capacity"
    )
    parser.add_argument(
        "--unloaded", type=float, default=0.1, help="interactive's unloaded load, x capacity"
    )
    parser.add_argument("--capacity-seconds", type=float, default=12.0)
    parser.add_argument("--unloaded-seconds", type=float, default=30.0)
    parser.add_argument("--overload-seconds", type=float, default=35.0)
    parser.add_argument("--baseline-seconds", type=float, default=15.0)
    parser.add_argument(
        "--baseline-grace",
        type=float,
        default=20.0,
        help="seconds the client waits for first tokens after the baseline's last arrival",
    )
    parser.add_argument(
        "--max-wait", type=float, default=3.0, help="admission.max_wait of the router (s)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=1000, help="admission.max_queue of the router"
    )
    parser.add_argument(
        "--reserve",
        type=int,
        default=0,
        help="admission.reserve of the router: slots per model only high may take",
    )
    parser.add_argument(
        "--max-tokens",
        default=str(MAX_TOKENS),
        help="tokens out per request: N, or A-B for a uniform draw per request",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "admission.json")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: print the summary of a results file and redraw its .png",
    )
    args = parser.parse_args()
    if args.report is not None:
        report = json.loads(args.report.read_text())
        plot(report, args.report.with_suffix(".png"))
        print_report(report)
        return 0
    low, _, high = args.max_tokens.partition("-")
    args.out_tokens = (int(low), int(high or low))

    logdir = Path(tempfile.mkdtemp(prefix="kvroute-admission-"))
    children = Children(logdir, {})
    keys = {name: new_key() for name in TENANTS}
    started = time.monotonic()
    try:
        with terminate_on_sigterm():
            info = meta(args)
            print(f"kvroute admission benchmark; load average {info['loadavg_at_start']}")
            results = run_async(measure(args, children, keys))
    except BenchError as exc:
        print(f"error: {exc} (logs in {logdir})", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report = {"meta": info, **results}
    report["verdicts"] = verdicts(results["phases"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, separators=(",", ":")) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print_report(report)
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name}; took {info['elapsed_s']} s")
    return 0


def run_async(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """On uvloop, as kvroute runs: the client must keep up with its schedule."""
    import uvloop

    result: dict[str, Any] = uvloop.run(coro)
    return result


if __name__ == "__main__":
    sys.exit(main())
