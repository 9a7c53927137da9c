"""How much kvroute costs as a proxy: direct vs. a bare Starlette + aiohttp floor vs. kvroute.

One run starts a zero-latency vLLM simulator, a redis-server on a free loopback port
(for the tenancy target's counters) and, each as its own process:

* ``floor``   - the least a Python proxy can do: one Starlette POST route that reads the
                body, forwards it with a pooled aiohttp session and relays the answer
                (chunks through a StreamingResponse), under uvicorn (httptools, uvloop,
                one worker, no access log); it lives in this file (``overhead.py floor``);
* ``kvroute`` - ``kvroute serve`` with a round-robin model over the simulator;
* ``kvroute+log`` - the same with its JSON access log on (written to a file);
* ``kvroute+tenancy`` - ``kvroute`` with API keys on (wrk sends the tenant's key) and one
                tenant whose rpm, tpm, max_concurrent and daily_tokens are all set, far
                above what the run uses, in that Redis: every request runs the whole
                admit script and, after its answer, the settle script, and none is refused.

wrk (a separate C process, one thread, closed loop) drives the targets - ``direct`` is
the simulator itself - with a small non-streamed chat request at concurrency 1, 16 and
64 and a 256-token stream at concurrency 1 and 16. Per load: a warm-up per target, then
rounds of a fixed duration over all targets, each round in another order; the report
keeps each figure's median over the rounds, the proxies' CPU time per request besides,
and measures a round again when other processes were busy on the machine meanwhile.
The ratios come from that one run: kvroute's against the floor's, and the tenancy
target's against plain kvroute's (the cost of keys and quotas). After the load, the
script checks that the tenant's requests were really counted (kvroute's tenant counters,
``/admin/tenants``, the Redis scripts' call counts, ``x-ratelimit-*`` on a probe) and
that nothing was refused. Results go to ``benchmarks/results/overhead.json``,
``overhead.png`` and ``overhead.md``; then (unless ``--no-profile``) py-spy samples
kvroute under the c=16 load and ``overhead_profile.txt`` lists its hot spots, and
``overhead_tenancy_profile.txt`` those of the tenancy target.

    .venv/bin/python benchmarks/overhead.py            # about 6 minutes
    .venv/bin/python benchmarks/overhead.py --targets kvroute kvroute+tenancy --out /tmp/t.json
    .venv/bin/python benchmarks/overhead.py --help

Only 127.0.0.1 is ever targeted, and every loop is bounded by a duration or a count.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
MODEL = "bench"
PATH = "/v1/chat/completions"
CONCURRENCIES = (1, 16, 64)
STREAM_CONCURRENCIES = (1, 16)
STREAM_TOKENS = 256
PROFILE_CONCURRENCY = 16
OWN_PACKAGES = ("router", "backends", "policies")

#: What the report holds kvroute to.
TARGET_RPS_PCT_OF_FLOOR = 60.0
TARGET_ADDED_P50_MS = 0.25
#: ... and the tenancy path, against plain kvroute's req/s at the same load.
TARGET_TENANCY_PCT_OF_KVROUTE = 80.0

#: Every target, in the order a round visits them first.
TARGETS = ("direct", "floor", "kvroute", "kvroute+log", "kvroute+tenancy")
TENANCY = "kvroute+tenancy"
TENANT = "bench-tenant"
#: The tenant's limits: all set (so every limit is checked and charged on every request),
#: each far above what a run can use (a run sends well under 1,000,000 requests and
#: 100,000,000 tokens in all), so that nothing is ever refused.
TENANT_LIMITS = {
    "rpm": 60_000_000,
    "tpm": 6_000_000_000,
    "max_concurrent": 100_000,
    "daily_tokens": 1_000_000_000_000,
}

CHAT_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 1,
}
STREAM_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": STREAM_TOKENS,
    "stream": True,
}

# wrk's done() hook prints one JSON line with exact percentiles and every error count.
WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(headers)swrk.body = [[%(body)s]]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "\\nWRK_JSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"bytes\\":%%d," ..
    "\\"connect\\":%%d,\\"read\\":%%d,\\"write\\":%%d,\\"status\\":%%d,\\"timeout\\":%%d," ..
    "\\"mean_us\\":%%.3f,\\"stdev_us\\":%%.3f,\\"max_us\\":%%d," ..
    "\\"p50_us\\":%%d,\\"p90_us\\":%%d,\\"p99_us\\":%%d,\\"p999_us\\":%%d}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


# --------------------------------------------------------------------------- the floor


def build_floor_app(upstream: str) -> Any:
    """The bare pass-through proxy kvroute is measured against."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    holder: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        holder["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        try:
            yield
        finally:
            await holder["session"].close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        resp = await holder["session"].post(
            upstream + request.url.path,
            data=body,
            headers={"content-type": "application/json"},
        )
        content_type = resp.headers.get("content-type", "application/json")
        if content_type.startswith("text/event-stream"):

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(
                chunks(), status_code=resp.status, headers={"content-type": content_type}
            )
        data = await resp.read()
        resp.release()
        return Response(data, status_code=resp.status, headers={"content-type": content_type})

    return Starlette(routes=[Route(PATH, forward, methods=["POST"])], lifespan=lifespan)


def serve_floor(port: int, upstream: str) -> int:
    import uvicorn

    uvicorn.run(
        build_floor_app(upstream),
        host=HOST,
        port=port,
        http="httptools",
        loop="uvloop",
        workers=1,
        access_log=False,
        log_level="warning",
    )
    return 0


# --------------------------------------------------------------------- child processes


class BenchError(RuntimeError):
    pass


def cpu_layout(pin: bool) -> dict[str, set[int]]:
    """CPUs per role with ``--pin``: the proxy under test gets a CPU of its own, the
    simulator and wrk the others, the same for every target. Off by default: on two
    CPUs the simulator and wrk then take turns on one, which slows every proxy."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return {}
    rest = set(cpus[1:])
    if len(cpus) == 2:
        return {"proxy": {cpus[0]}, "sim": rest, "wrk": rest}
    return {"proxy": {cpus[0]}, "sim": {cpus[1]}, "wrk": set(cpus[2:])}


class Children:
    """Child processes, each in its own process group, all killed on the way out."""

    def __init__(self, logdir: Path, layout: dict[str, set[int]]) -> None:
        self.logdir = logdir
        self.layout = layout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], role: str) -> subprocess.Popen[bytes]:
        """Start ``argv`` pinned to ``role``'s CPUs (a child inherits its parent's)."""
        cpus = self.layout.get(role)
        previous = os.sched_getaffinity(0)
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            with (self.logdir / f"{name}.log").open("wb") as log:
                proc = subprocess.Popen(
                    list(argv),
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        finally:
            if cpus:
                os.sched_setaffinity(0, previous)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            _kill_group(proc)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_jiffies() -> tuple[int, int, int]:
    """The machine's busy, total and stolen CPU jiffies (a VM's neighbours take the stolen),
    summed over all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return user + nice + system + irq + softirq, total, steal


def wait_port(children: Children, name: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    proc = children.procs[name]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{children.log_tail(name)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"{name} did not listen on {HOST}:{port} in {timeout:.0f}s")


# ------------------------------------------------------------------------------ checks


def post(
    port: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, str, bytes, dict[str, str]]:
    """Status, content type, body and (lower-cased) headers of one POST."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        sent = {"content-type": "application/json", **(headers or {})}
        conn.request("POST", PATH, json.dumps(body), sent)
        resp = conn.getresponse()
        got = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, resp.getheader("content-type", ""), resp.read(), got
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


#: Requests one ``check_target`` sends.
CHECK_REQUESTS = 2


def check_target(name: str, port: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One plain and one streamed request, answered right: or BenchError. The
    ``x-ratelimit-*`` headers of the plain one's answer are kept (a tenant's limits)."""
    status, _, data, answer_headers = post(port, CHAT_BODY, headers)
    chat_bytes = len(data)
    if status != 200:
        raise BenchError(f"{name}: chat request got {status}: {data[:300]!r}")
    answer = json.loads(data)
    if not answer.get("choices"):
        raise BenchError(f"{name}: chat answer has no choices: {data[:300]!r}")
    status, content_type, data, _ = post(port, STREAM_BODY, headers)
    if status != 200 or not content_type.startswith("text/event-stream"):
        raise BenchError(f"{name}: stream got {status} {content_type}: {data[:300]!r}")
    events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        raise BenchError(f"{name}: stream did not end with [DONE]")
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c for c in chunks if "error" in c]
    if errors:
        raise BenchError(f"{name}: stream carried an error event: {errors[0]}")
    tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    out: dict[str, Any] = {"chat_bytes": chat_bytes, "stream_chunks": len(chunks), "tokens": tokens}
    limits = {k: v for k, v in answer_headers.items() if k.startswith("x-ratelimit-")}
    if limits:
        out["ratelimit_headers"] = limits
    return out


def kvroute_counters(port: int) -> dict[str, dict[str, float]]:
    """kvroute's ``*_total`` counters from /metrics, keyed by their labels."""
    status, data = get(port, "/metrics")
    out: dict[str, dict[str, float]] = {}
    if status != 200:
        return {"error": {f"/metrics answered {status}": 1.0}}
    pattern = re.compile(r"^(kvroute_\w+_total)(\{[^}]*\})? (\S+)$")
    for line in data.decode().splitlines():
        m = pattern.match(line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2) or "{}"] = float(m.group(3))
    return out


def scan_log(path: Path) -> dict[str, Any]:
    """Error lines in a kvroute log, and the statuses its access log (if on) recorded."""
    lines, errors = 0, 0
    statuses: Counter[str] = Counter()
    status = re.compile(rb'"status":(\d+)')
    with path.open("rb") as f:
        for line in f:
            lines += 1
            if b'"level":"error"' in line or b"Traceback" in line or b"ERROR" in line:
                errors += 1
            if b'"event":"request"' in line:
                m = status.search(line)
                statuses[m.group(1).decode() if m else "?"] += 1
    return {"lines": lines, "error_lines": errors, "access_log_statuses": dict(statuses)}


def kvroute_health(
    counters: dict[str, dict[str, float]], log: dict[str, Any], runs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    for labels, value in counters.get("kvroute_requests_total", {}).items():
        m = re.search(r'status="(\d+)"', labels)
        statuses[m.group(1) if m else "?"] += int(value)
    completed = sum(r["wrk_completed"] for r in runs.values())
    # wrk drops its connections when a run's time is up, mid-request: those requests end
    # as 499 (cancelled) or as a 200 wrk never read. Each run leaves at most c of them.
    bound = sum(r["wrk_runs"] * int(label.split("c=")[1]) for label, r in runs.items())
    cut = statuses["200"] + statuses["499"] - completed - 2 * CHECK_REQUESTS
    return {
        "statuses": dict(sorted(statuses.items())),
        "wrk_completed": completed,
        "cut_at_run_ends": cut,
        "client_abort_bound": bound,
        "all_accounted_for": 0 <= cut <= bound and set(statuses) <= {"200", "499"},
        "upstream_errors": int(sum(counters.get("kvroute_upstream_errors_total", {}).values())),
        "stream_errors": int(sum(counters.get("kvroute_stream_errors_total", {}).values())),
        "counters": counters,
        "log": log,
    }


def _labelled(series: dict[str, float], label: str, value: str) -> dict[str, float]:
    """The samples of one counter whose ``label`` is ``value``."""
    return {k: v for k, v in series.items() if f'{label}="{value}"' in k}


def tenancy_health(
    port: int, tenancy: Tenancy, counters: dict[str, dict[str, float]], check: dict[str, Any]
) -> dict[str, Any]:
    """Whether the tenancy target really did the tenant's bookkeeping on every request:
    kvroute counted every request for the tenant and refused none, Redis ran the admit
    and settle scripts for each (its own call counts), the tenant's day budget holds its
    tokens (``/admin/tenants``), the probe's answer carried ``x-ratelimit-*``, and the
    store never failed (which would have let requests through unlimited: fail_open)."""
    requests = sum(counters.get("kvroute_requests_total", {}).values())
    tenant = _labelled(counters.get("kvroute_tenant_requests_total", {}), "tenant", TENANT)
    statuses: Counter[str] = Counter()
    for labels, value in tenant.items():
        m = re.search(r'status="(\d+)"', labels)
        statuses[m.group(1) if m else "?"] += int(value)
    tokens = _labelled(counters.get("kvroute_tenant_tokens_total", {}), "tenant", TENANT)
    refused = int(sum(counters.get("kvroute_quota_refusals_total", {}).values()))
    unenforced = int(sum(counters.get("kvroute_quota_unenforced_total", {}).values()))
    settle_failed = int(sum(counters.get("kvroute_quota_settle_failures_total", {}).values()))
    store_failed = int(sum(counters.get("kvroute_quota_store_failures_total", {}).values()))

    status, data = get(port, "/admin/tenants")
    admin: dict[str, Any] = {"status": status}
    if status == 200:
        answer = json.loads(data)
        mine = [t for t in answer.get("tenants", ()) if t.get("name") == TENANT]
        admin.update(store=answer.get("store"), usage=mine[0].get("usage") if mine else None)
    commandstats = redis_call(tenancy.redis_port, "INFO", "commandstats")
    evalsha = commandstats.get("cmdstat_evalsha", {}) if isinstance(commandstats, dict) else {}
    keys = redis_call(tenancy.redis_port, "KEYS", "*")
    counted = sum(statuses.values())
    usage = admin.get("usage") or {}
    checks = {
        "every request counted for the tenant": counted == requests and counted > 0,
        "no 429 or 503 (only 200 and wrk's 499s)": set(statuses) <= {"200", "499"},
        "no quota refusal": refused == 0,
        "no request let through unlimited (fail_open)": unenforced == 0,
        "no store failure, no lost settle": store_failed == 0 and settle_failed == 0,
        # A request wrk cut off (499) while its admit was under way is never settled.
        "Redis ran admit + settle for every answered request": (
            int(evalsha.get("calls", 0)) >= 2 * statuses["200"]
        ),
        "the day's budget holds the tenant's tokens": int(usage.get("tokens_today") or 0) > 0,
        "x-ratelimit-* on the probe's answer": bool(check.get("ratelimit_headers")),
    }
    return {
        "checks": checks,
        "all_ok": all(checks.values()),
        "kvroute_requests": int(requests),
        "tenant_statuses": dict(sorted(statuses.items())),
        "tenant_tokens": {k: int(v) for k, v in tokens.items()},
        "quota_refusals": refused,
        "quota_unenforced": unenforced,
        "quota_settle_failures": settle_failed,
        "quota_store_failures": store_failed,
        "admin_tenants": admin,
        "redis_commandstats": commandstats,
        "redis_keys": sorted(keys) if isinstance(keys, list) else keys,
        "probe_ratelimit_headers": check.get("ratelimit_headers"),
    }


# -------------------------------------------------------------------------------- wrk


def ensure_wrk(install: bool) -> str:
    path = shutil.which("wrk")
    if path:
        return path
    how = "apt-get update && apt-get install -y wrk   (Debian/Ubuntu; `brew install wrk` on macOS)"
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: installing it with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            if subprocess.run(argv, env=env, check=False).returncode != 0:
                break
        path = shutil.which("wrk")
        if path:
            return path
    raise BenchError(f"this benchmark needs wrk as its load generator; install it with:\n  {how}")


@dataclass
class Load:
    name: str
    body: dict[str, Any]
    concurrency: int

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def label(self) -> str:
        return f"{'stream' if self.stream else 'chat'} c={self.concurrency}"


@dataclass
class Wrk:
    binary: str
    scriptdir: Path
    scripts: dict[tuple[str, tuple[tuple[str, str], ...]], Path] = field(default_factory=dict)

    def script(self, load: Load, headers: dict[str, str] | None = None) -> Path:
        """The Lua script of ``load``, sending ``headers`` besides the content type (the
        tenancy target's key: only its requests carry one, as only a client of a router
        with keys sends one)."""
        kind = "stream" if load.stream else "chat"
        key = (kind, tuple(sorted((headers or {}).items())))
        if key not in self.scripts:
            path = self.scriptdir / f"{kind}-{len(self.scripts)}.lua"
            body = json.dumps(load.body, separators=(",", ":"))
            lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in key[1])
            path.write_text(WRK_LUA % {"body": body, "headers": lines})
            self.scripts[key] = path
        return self.scripts[key]

    def start(
        self,
        children: Children,
        tag: str,
        port: int,
        load: Load,
        seconds: float,
        headers: dict[str, str] | None = None,
    ) -> str:
        name = f"wrk-{tag}"
        argv = [
            self.binary,
            "-t1",
            f"-c{load.concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(self.script(load, headers)),
            f"http://{HOST}:{port}{PATH}",
        ]
        children.start(name, argv, "wrk")
        return name

    def finish(self, children: Children, name: str, seconds: float) -> dict[str, Any]:
        proc = children.procs[name]
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            children.stop(name)
            raise BenchError(f"{name} did not finish") from None
        children.procs.pop(name)
        out = (children.logdir / f"{name}.log").read_text(errors="replace")
        for line in reversed(out.splitlines()):
            if line.startswith("WRK_JSON "):
                result: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
                return result
        raise BenchError(f"{name} printed no result (exit {proc.returncode}):\n{out[-1500:]}")

    def run(
        self,
        children: Children,
        tag: str,
        port: int,
        load: Load,
        seconds: float,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        name = self.start(children, tag, port, load, seconds, headers)
        return self.finish(children, name, seconds)


def summarise(raw: dict[str, Any], load: Load, chunks_per_stream: int) -> dict[str, Any]:
    seconds = raw["duration_us"] / 1e6
    rps = raw["requests"] / seconds if seconds else 0.0
    out: dict[str, Any] = {
        "rps": round(rps, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 4),
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "non_2xx": raw["status"],
        "socket_errors": {k: raw[k] for k in ("connect", "read", "write", "timeout")},
        "bytes": raw["bytes"],
    }
    if load.stream:
        out["chunks_per_request"] = chunks_per_stream
        out["chunks_per_s"] = round(rps * chunks_per_stream, 1)
    return out


MEDIAN_KEYS = (
    "rps",
    "chunks_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "mean_ms",
    "proxy_cpu_us_per_req",
    "proxy_cpu_pct",
    "redis_cpu_us_per_req",
    "sim_cpu_us_per_req",
    "foreign_cpu_pct",
)


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One (load, target)'s rounds: the median of each rate and percentile, summed counts."""
    first = rounds[0]
    out: dict[str, Any] = {
        k: round(statistics.median(r[k] for r in rounds), 3)
        for k in MEDIAN_KEYS
        if first.get(k) is not None
    }
    rates = [r["rps"] for r in rounds]
    out["rps_spread_pct"] = round(100 * (max(rates) - min(rates)) / out["rps"], 1)
    out["requests"] = sum(r["requests"] for r in rounds)
    out["seconds"] = round(sum(r["seconds"] for r in rounds), 3)
    out["non_2xx"] = sum(r["non_2xx"] for r in rounds)
    out["socket_errors"] = {
        k: sum(r["socket_errors"][k] for r in rounds) for k in first["socket_errors"]
    }
    if "chunks_per_request" in first:
        out["chunks_per_request"] = first["chunks_per_request"]
    out["max_ms"] = max(r["max_ms"] for r in rounds)
    out["re_measured"] = sum(r.get("attempt", 1) - 1 for r in rounds)
    out["rounds"] = [
        {
            k: r[k]
            for k in (
                "rps",
                "p50_ms",
                "p99_ms",
                "proxy_cpu_us_per_req",
                "redis_cpu_us_per_req",
                "foreign_cpu_pct",
            )
            if k in r
        }
        for r in rounds
    ]
    return out


# --------------------------------------------------------------------------- profiling

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(text: str) -> tuple[str, str, str]:
    m = _FRAME.match(text)
    if not m:
        return text, "", ""
    return m.group("func"), m.group("file"), m.group("line") or ""


#: Frames every sample has: the process entry and the event loop's ``run``.
_ROOT_FILES = ("/bin/kvroute", "/router/cli.py", "/uvloop/__init__.py", "/asyncio/runners.py")
_LOOP = "event loop itself (uvloop/libuv C, socket I/O)"


def _is_python(file: str) -> bool:
    return file.endswith(".py") and not file.endswith(_ROOT_FILES)


def _owner(file: str) -> str:
    """Which component a frame's file belongs to."""
    for pkg in OWN_PACKAGES:
        if file.startswith(f"{ROOT}/{pkg}/"):
            return "kvroute"
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/uvloop/" in file or "libuv" in file:
        return "uvloop (C)"
    if file.endswith(".py"):
        parts = file.split("/lib/python3")[-1].split("/")
        return "stdlib " + (parts[1].removesuffix(".py") if len(parts) > 1 else file)
    if "Python-3" in file or "cpython" in file or "libpython" in file or "/python3." in file:
        return "CPython (C)"
    if "libc.so" in file or "libc-" in file:
        return "libc"
    return "native " + Path(file).name if file else "native ?"


def _short(func: str, file: str, line: str) -> str:
    short = file.replace(f"{ROOT}/", "").split("site-packages/")[-1]
    short = re.sub(r"^.*/lib/python3\.\d+/", "", short)
    short = re.sub(r"^.*/Python-3[^/]*/", "", short)
    return f"{func}  ({short}:{line})" if line else f"{func}  ({short})"


def summarise_profile(raw: str, extra: Sequence[str], title: str = "kvroute under load") -> str:
    """A text summary of py-spy's raw (collapsed) stacks: components and hot functions.

    Only the event loop's thread counts. kvroute's other threads (anyio's worker that
    watches the config file, the loop's default executor) sit blocked in
    ``clock_nanosleep`` or a futex wait, but with native frames py-spy takes them for
    busy: they made up about half of the "busy" samples, diluting every figure. Their
    share is printed, not counted."""
    stacks: list[tuple[list[tuple[str, str, str]], int]] = []
    threads = 0
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack and samples.isdigit():
            frames = [_frame(f) for f in stack.split(";")]
            if any(f[0] == "Thread._bootstrap" and f[1].endswith("/threading.py") for f in frames):
                threads += int(samples)
                continue
            stacks.append((frames, int(samples)))
    total = sum(c for _, c in stacks) or 1

    by_component: Counter[str] = Counter()
    by_leaf_component: Counter[str] = Counter()
    own_incl: Counter[str] = Counter()
    own_self: Counter[str] = Counter()
    lib_incl: Counter[str] = Counter()
    lib_self: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    libc_callers: Counter[str] = Counter()
    for frames, count in stacks:
        leaf_frame = frames[-1]
        by_leaf_component[_owner(leaf_frame[1])] += count
        leaf[_short(*leaf_frame)] += count
        python = [f for f in frames if _is_python(f[1])]
        inner = python[-1] if python else None
        if inner is None:
            by_component[_LOOP] += count
        else:
            by_component[_owner(inner[1])] += count
            (own_self if _owner(inner[1]) == "kvroute" else lib_self)[_short(*inner)] += count
        if _owner(leaf_frame[1]) == "libc":
            caller = _short(*inner) if inner else _LOOP
            libc_callers[f"{leaf_frame[0]:<12} <- {caller}"] += count
        own = {_short(*f) for f in python if _owner(f[1]) == "kvroute"}
        lib = {_short(*f) for f in python if _owner(f[1]) != "kvroute"}
        for k in own:
            own_incl[k] += count
        for k in lib:
            lib_incl[k] += count

    def table(title: str, counts: Counter[str], n: int = 15) -> list[str]:
        rows = [f"{100 * c / total:6.2f}%  {k}" for k, c in counts.most_common(n)]
        return ["", title, "-" * len(title), *rows]

    lines = [
        f"{title}: py-spy profile summary (benchmarks/overhead.py)",
        *extra,
        f"samples: {total} of the event loop's thread (idle samples excluded; every % is of "
        f"these busy samples); left out: {threads} samples of other threads (blocked "
        "worker threads py-spy takes for busy, see summarise_profile)",
        "'self' = the sample's innermost Python frame, with the C code it was calling;",
        "'inclusive' = samples with the function anywhere on the stack.",
    ]
    lines += table("CPU by component of the innermost Python frame", by_component)
    lines += table("CPU by component of the leaf frame (native frames included)", by_leaf_component)
    lines += table("kvroute's own code (router/, backends/, policies/): inclusive", own_incl, 30)
    lines += table("kvroute's own code: self", own_self)
    lines += table("libraries and stdlib (Python frames): self", lib_self)
    lines += table("libraries and stdlib (Python frames): inclusive", lib_incl)
    lines += table("libc calls (syscalls mostly), by the Python frame that made them", libc_callers)
    lines += table("leaf frames (native included): self", leaf, 20)
    return "\n".join(lines) + "\n"


def profile_kvroute(
    children: Children, wrk: Wrk, target: Target, seconds: float, out: Path, commit: str
) -> dict[str, Any]:
    """py-spy samples ``target``'s process under the chat c=16 load; a summary to ``out``."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists() and shutil.which("py-spy"):
        py_spy = Path(str(shutil.which("py-spy")))
    if not py_spy.exists():
        print("py-spy not found: skipping the profile", flush=True)
        return {"skipped": "py-spy not found"}
    assert target.proxy is not None
    pid = children.procs[target.proxy].pid
    load = Load("chat", CHAT_BODY, PROFILE_CONCURRENCY)
    raw_path = children.logdir / f"{target.name}.pyspy.txt"
    result: dict[str, Any] = {}
    for native in (True, False):
        wrk_name = wrk.start(children, "profile", target.port, load, seconds + 4, target.headers)
        time.sleep(2)
        argv = [str(py_spy), "record", "--pid", str(pid), "--duration", str(round(seconds))]
        argv += ["--rate", "200", "--format", "raw", "--full-filenames", "--function"]
        argv += ["--output", str(raw_path), *(["--native"] if native else [])]
        spy = subprocess.run(argv, capture_output=True, text=True, check=False)
        loaded = summarise(wrk.finish(children, wrk_name, seconds + 4), load, 0)
        if spy.returncode == 0 and raw_path.exists():
            result = {"native": native, "load_under_profiler": loaded, "py_spy": spy.stderr[-300:]}
            break
        print(f"py-spy failed (native={native}): {spy.stderr.strip()[-300:]}", flush=True)
    else:
        return {"skipped": "py-spy failed"}
    extra = [
        f"load: wrk, non-streamed chat, c={PROFILE_CONCURRENCY}, {seconds:.0f} s of samples "
        f"at 200 Hz{' with native frames' if result['native'] else ''}; {target.name} served "
        f"{loaded['rps']:.0f} req/s while sampled (py-spy pauses it to sample)",
        f"target: {target.name}: {TARGET_NOTES.get(target.name, '')}",
        f"date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}, "
        f"kvroute at commit {commit}",
    ]
    title = f"{target.name} under load"
    out.write_text(summarise_profile(raw_path.read_text(errors="replace"), extra, title))
    result["summary"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    return result


# ----------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("aiohttp", "starlette", "uvicorn", "uvloop", "httptools", "orjson", "kvroute"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *OWN_PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "",
        "versions": versions,
        "git_commit": git.stdout.strip(),
        "kvroute_code_uncommitted_changes": bool(dirty.stdout.strip()),
    }


def compute_ratios(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    for target in ("kvroute", "kvroute+log", TENANCY):
        if target not in runs:
            continue
        r: dict[str, Any] = {"targets": {}}
        ratios[target] = r
        if target == TENANCY and "kvroute" in runs:
            r["vs_kvroute"] = tenancy_ratios(runs[TENANCY], runs["kvroute"])
            lowest = min(v["pct_of_kvroute"] for v in r["vs_kvroute"].values())
            r["min_pct_of_kvroute"] = lowest
            name = f"req/s >= {TARGET_TENANCY_PCT_OF_KVROUTE:.0f}% of plain kvroute's at every load"
            r["targets"][name] = lowest >= TARGET_TENANCY_PCT_OF_KVROUTE
        if "floor" not in runs or "direct" not in runs:
            continue
        for label, floor in runs["floor"].items():
            mine, direct = runs[target][label], runs["direct"][label]
            key = "chunks_per_s" if "chunks_per_s" in floor else "rps"
            r[label] = {
                "pct_of_floor": round(100 * mine[key] / floor[key], 1),
                "pct_of_direct": round(100 * mine[key] / direct[key], 1),
                "floor_pct_of_direct": round(100 * floor[key] / direct[key], 1),
                "cpu_per_req_vs_floor": round(
                    mine["proxy_cpu_us_per_req"] / floor["proxy_cpu_us_per_req"], 3
                ),
                "added_cpu_us_per_req_over_floor": round(
                    mine["proxy_cpu_us_per_req"] - floor["proxy_cpu_us_per_req"], 1
                ),
            }
        c1 = "chat c=1"
        direct_p50 = runs["direct"][c1]["p50_ms"]
        r["added_p50_ms_c1"] = round(runs[target][c1]["p50_ms"] - direct_p50, 3)
        r["floor_added_p50_ms_c1"] = round(runs["floor"][c1]["p50_ms"] - direct_p50, 3)
        r["added_p50_ms_c1_over_floor"] = round(
            runs[target][c1]["p50_ms"] - runs["floor"][c1]["p50_ms"], 3
        )
        chat = [f"chat c={c}" for c in CONCURRENCIES]
        r["min_pct_of_floor_chat"] = min(r[label]["pct_of_floor"] for label in chat)
        if target == TENANCY:
            continue  # held to plain kvroute's figures (above), not to the floor's
        r["targets"] = {
            f"req/s >= {TARGET_RPS_PCT_OF_FLOOR:.0f}% of floor at every concurrency": (
                r["min_pct_of_floor_chat"] >= TARGET_RPS_PCT_OF_FLOOR
            ),
            f"added p50 at c=1 <= {TARGET_ADDED_P50_MS} ms over direct": (
                r["added_p50_ms_c1"] <= TARGET_ADDED_P50_MS
            ),
        }
    return ratios


def tenancy_ratios(
    tenancy: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per load, the tenancy target against plain kvroute: req/s (streams carry as many
    chunks each, so chunks/s gives the same ratio), the CPU time kvroute and Redis spend
    on a request besides, and the median latency added."""
    out: dict[str, dict[str, Any]] = {}
    for label, mine in tenancy.items():
        base = plain[label]
        out[label] = {
            "pct_of_kvroute": round(100 * mine["rps"] / base["rps"], 1),
            "added_proxy_cpu_us_per_req": round(
                mine["proxy_cpu_us_per_req"] - base["proxy_cpu_us_per_req"], 1
            ),
            "redis_cpu_us_per_req": mine.get("redis_cpu_us_per_req"),
            "added_p50_ms": round(mine["p50_ms"] - base["p50_ms"], 3),
            "added_p99_ms": round(mine["p99_ms"] - base["p99_ms"], 3),
        }
    return out


def format_table(runs: dict[str, dict[str, dict[str, Any]]], ratios: dict[str, Any]) -> str:
    head = (
        f"{'load':<11} {'target':<15} {'req/s':>8} {'spread':>7} {'chunks/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'% floor':>8} {'CPU us/req':>10} {'non-2xx':>7} "
        f"{'sock err':>8}"
    )
    lines = [head, "-" * len(head)]
    for label in next(iter(runs.values())):
        for target, by_label in runs.items():
            r = by_label[label]
            pct = ratios.get(target, {}).get(label, {}).get("pct_of_floor")
            chunks = f"{r['chunks_per_s']:>9.0f}" if "chunks_per_s" in r else f"{'':>9}"
            cpu = r.get("proxy_cpu_us_per_req")
            lines.append(
                f"{label:<11} {target:<15} {r['rps']:>8.1f} {r['rps_spread_pct']:>6.1f}% {chunks} "
                f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                f"{'' if pct is None else f'{pct:.1f}%':>8} "
                f"{'' if cpu is None else f'{cpu:.0f}':>10} "
                f"{r['non_2xx']:>7} {sum(r['socket_errors'].values()):>8}"
            )
        lines.append("")
    lines.append(
        "req/s, chunks/s, p50, p99 and CPU: medians of the rounds; spread: (max - min) / median "
        "of the rounds' req/s; CPU: the proxy process's user+system time per request"
    )
    for target, r in ratios.items():
        if "added_p50_ms_c1" in r:
            lines.append(
                f"{target}: added p50 at c=1 over direct {r['added_p50_ms_c1']:+.3f} ms "
                f"(floor {r['floor_added_p50_ms_c1']:+.3f} ms); lowest chat req/s "
                f"{r['min_pct_of_floor_chat']:.1f}% of floor"
            )
        else:
            lines.append(f"{target}:")
        for label, v in r.get("vs_kvroute", {}).items():
            lines.append(
                f"  {label:<11} {v['pct_of_kvroute']:5.1f}% of kvroute's req/s; "
                f"kvroute CPU {v['added_proxy_cpu_us_per_req']:+.0f} us/req, Redis CPU "
                f"{v['redis_cpu_us_per_req']:.0f} us/req; p50 {v['added_p50_ms']:+.3f} ms"
            )
        for name, met in r["targets"].items():
            lines.append(f"  target {name}: {'MET' if met else 'NOT MET'}")
    return "\n".join(lines)


def markdown_table(runs: dict[str, dict[str, dict[str, Any]]], ratios: dict[str, Any]) -> str:
    """The results as the Markdown table benchmarks/README.md shows."""
    lines = [
        "| load | target | req/s | chunks/s | p50 ms | p99 ms | % of floor | "
        "proxy CPU us/req | spread | non-2xx / socket errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in next(iter(runs.values())):
        for target, by_label in runs.items():
            r = by_label[label]
            pct = ratios.get(target, {}).get(label, {}).get("pct_of_floor")
            cpu = r.get("proxy_cpu_us_per_req")
            chunks = f"{r['chunks_per_s']:.0f}" if "chunks_per_s" in r else ""
            lines.append(
                f"| {label} | {target} | {r['rps']:.0f} | {chunks} | "
                f"{r['p50_ms']:.3f} | {r['p99_ms']:.2f} | "
                f"{'' if pct is None else f'**{pct:.0f}%**'} | "
                f"{'' if cpu is None else f'{cpu:.0f}'} | {r['rps_spread_pct']:.0f}% | "
                f"{r['non_2xx']} / {sum(r['socket_errors'].values())} |"
            )
    vs = ratios.get(TENANCY, {}).get("vs_kvroute")
    if vs:
        lines += [
            "",
            f"`{TENANCY}` against plain `kvroute` in the same run:",
            "",
            "| load | req/s, % of kvroute | added kvroute CPU us/req | Redis CPU us/req | "
            "added p50 ms | added p99 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, v in vs.items():
            lines.append(
                f"| {label} | **{v['pct_of_kvroute']:.0f}%** | "
                f"{v['added_proxy_cpu_us_per_req']:+.0f} | {v['redis_cpu_us_per_req']:.0f} | "
                f"{v['added_p50_ms']:+.3f} | {v['added_p99_ms']:+.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(runs)
    chat = [f"chat c={c}" for c in CONCURRENCIES]
    stream = [f"stream c={c}" for c in STREAM_CONCURRENCIES]
    colours = {
        "direct": "#7f7f7f",
        "floor": "#1f77b4",
        "kvroute": "#d62728",
        "kvroute+log": "#ff7f0e",
        TENANCY: "#2ca02c",
    }
    width = 0.8 / len(targets)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))

    def bars(ax: Any, labels: list[str], value: str, names: list[str]) -> None:
        w = 0.8 / len(names)
        for i, target in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * w for j in range(len(labels))]
            ys = [runs[target][label][value] for label in labels]
            ax.bar(xs, ys, w, label=target, color=colours.get(target, "#ff7f0e"))
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:.0f}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)), labels)
        ax.margins(y=0.12)
        ax.legend(fontsize=8)

    bars(axes[0][0], chat, "rps", targets)
    axes[0][0].set_title("non-streamed chat (max_tokens 1): requests/s")

    ax = axes[0][1]
    for i, target in enumerate(targets):
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(chat))]
        p99 = [runs[target][label]["p99_ms"] for label in chat]
        p50 = [runs[target][label]["p50_ms"] for label in chat]
        colour = colours.get(target, "#ff7f0e")
        ax.bar(xs, p99, width, color=colour, alpha=0.35, hatch="//", edgecolor=colour)
        ax.bar(xs, p50, width, color=colour, label=f"{target}")
    ax.set_xticks(range(len(chat)), chat)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title("non-streamed chat latency: p50 solid, p99 hatched")
    ax.legend(fontsize=8)

    bars(axes[1][0], stream, "chunks_per_s", targets)
    axes[1][0].set_title(f"streamed chat ({STREAM_TOKENS} tokens): SSE chunks/s")

    proxies = [t for t in targets if t != "direct"]
    bars(axes[1][1], chat, "proxy_cpu_us_per_req", proxies)
    axes[1][1].set_title("non-streamed chat: proxy process CPU per request (us)")

    fig.suptitle(
        f"kvroute proxy overhead vs direct and a bare Starlette+aiohttp floor - "
        f"{meta['nproc']} CPUs, Python {meta['python']}, {meta['date']} "
        f"(medians of {meta['rounds']} rounds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Tenancy:
    """The tenancy target's key, tenant and Redis."""

    key: str
    redis_port: int

    @property
    def key_hash(self) -> str:
        # What router/tenants.py's hash_key gives (this file does not import router/).
        return "sha256:" + hashlib.sha256(self.key.encode()).hexdigest()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_tenancy(redis_port: int) -> Tenancy:
    """A fresh key for this run, as ``kvroute keys new`` makes them."""
    key = "kvr-" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    return Tenancy(key, redis_port)


def write_config(
    path: Path, port: int, sim_port: int, access_log: bool, tenancy: Tenancy | None = None
) -> None:
    config: dict[str, Any] = {
        "server": {"host": HOST, "port": port, "access_log": access_log, "log_level": "info"},
        "endpoints": [
            {"id": "sim-0", "url": f"http://{HOST}:{sim_port}", "kind": "vllm", "models": [MODEL]}
        ],
        "models": {MODEL: {"policy": "round_robin"}},
    }
    if tenancy is not None:
        config["auth"] = {"enabled": True}
        config["tenants"] = {TENANT: {"keys": [tenancy.key_hash], **TENANT_LIMITS}}
        config["quotas"] = {"redis": f"redis://{HOST}:{tenancy.redis_port}/0"}
        # For the check after the run (GET /admin/tenants); loopback only, and /admin is
        # not on the inference path.
        config["admin"] = {"open": True}
    path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML


def start_redis(children: Children) -> int:
    """A redis-server without persistence on a free loopback port (as tests/redis_server.py
    starts one); it is a child like the others, so it is stopped on the way out."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError(
            "the kvroute+tenancy target needs redis-server: apt-get install redis-server "
            "(./dev test installs it), or leave the target out with --targets"
        )
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(children.logdir)]
    children.start("redis", argv, "sim")
    wait_port(children, "redis", port)
    deadline = time.monotonic() + 10
    while redis_call(port, "PING") is not True:  # redis-py answers PONG as True
        if time.monotonic() > deadline:
            raise BenchError("redis-server did not answer PING")
        time.sleep(0.05)
    return port


def redis_call(port: int, *args: str) -> Any:
    """One Redis command and its answer, with a short-lived connection."""
    import redis  # kvroute's own dependency (router/quota/redis.py)

    client = redis.Redis(host=HOST, port=port, socket_timeout=5, decode_responses=True)
    try:
        return client.execute_command(*args)
    except redis.RedisError as exc:
        return f"error: {exc}"
    finally:
        client.close()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Target:
    name: str
    port: int
    #: The process whose CPU time is the proxy's (None for the simulator itself).
    proxy: str | None
    #: Headers wrk and the checks send (the tenancy target's key).
    headers: dict[str, str] = field(default_factory=dict)
    #: Other processes that work for this target alone (its Redis), whose CPU time per
    #: request is reported beside the proxy's.
    helpers: tuple[str, ...] = ()


#: What each target is, for the report.
TARGET_NOTES = {
    "direct": "the zero-latency vLLM simulator itself (kvroute simulate)",
    "floor": "bare Starlette + pooled aiohttp pass-through (this file)",
    "kvroute": "kvroute serve, round_robin, access_log false",
    "kvroute+log": "kvroute serve, round_robin, access_log true (to a file)",
    TENANCY: "kvroute serve, round_robin, access_log false, auth enabled, one tenant "
    "with rpm, tpm, max_concurrent and daily_tokens all set (never reached), counters in "
    "a redis-server of its own on loopback; wrk sends the tenant's key",
}


def start_targets(children: Children, names: Sequence[str]) -> tuple[list[Target], Tenancy | None]:
    """The simulator and the ``names`` targets (``direct`` is the simulator itself);
    the Redis and key of the tenancy target when it is among them."""
    sim_port = free_port()
    children.start(
        "sim",
        [
            *(sys.executable, "-m", "router.cli", "simulate", "--kind", "vllm"),
            *("--host", HOST, "--port", str(sim_port), "--model", MODEL, "--zero-latency"),
        ],
        "sim",
    )
    wait_port(children, "sim", sim_port)
    targets: list[Target] = []
    tenancy = new_tenancy(start_redis(children)) if TENANCY in names else None
    for name in TARGETS:
        if name not in names:
            continue
        if name == "direct":
            targets.append(Target("direct", sim_port, None))
            continue
        target = Target(name, free_port(), name)
        targets.append(target)
        if name == "floor":
            argv = [sys.executable, str(Path(__file__).resolve()), "floor"]
            argv += ["--port", str(target.port), "--upstream", f"http://{HOST}:{sim_port}"]
            children.start("floor", argv, "proxy")
            continue
        mine = tenancy if name == TENANCY else None
        if mine is not None:
            target.headers = mine.headers
            target.helpers = ("redis",)
        config = children.logdir / f"{name}.yaml"
        write_config(config, target.port, sim_port, name == "kvroute+log", mine)
        argv = [sys.executable, "-m", "router.cli", "serve", "--config", str(config)]
        children.start(name, argv, "proxy")
    for target in targets:
        if target.proxy:
            wait_port(children, target.name, target.port)
    return targets, tenancy


def measure_once(
    children: Children, wrk: Wrk, target: Target, load: Load, seconds: int, chunks: int
) -> dict[str, Any]:
    """One measured wrk run, with the CPU time every process spent on it meanwhile."""
    long_lived = {name: p.pid for name, p in children.procs.items()}
    before = {name: cpu_seconds(p) for name, p in long_lived.items()}
    mine0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = machine_jiffies()
    raw = wrk.run(children, "measure", target.port, load, seconds, target.headers)
    busy1 = machine_jiffies()
    mine1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = {name: cpu_seconds(p) - before[name] for name, p in long_lived.items()}
    r = summarise(raw, load, chunks)
    done = max(r["requests"], 1)
    r["sim_cpu_us_per_req"] = round(1e6 * spent["sim"] / done, 1)
    if target.proxy:
        r["proxy_cpu_us_per_req"] = round(1e6 * spent[target.proxy] / done, 1)
        r["proxy_cpu_pct"] = round(100 * spent[target.proxy] / r["seconds"], 1)
    if target.helpers:
        r["redis_cpu_us_per_req"] = round(1e6 * sum(spent[h] for h in target.helpers) / done, 1)
    # The rest of the machine's busy time went to processes outside this benchmark.
    ours = sum(spent.values()) + sum(
        (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)
        for a, b in zip(mine0, mine1, strict=True)
    )
    capacity = (busy1[1] - busy0[1]) / CLOCK_TICKS  # /proc/stat sums all CPUs already
    machine = (busy1[0] - busy0[0]) / CLOCK_TICKS
    r["foreign_cpu_pct"] = round(max(0.0, 100 * (machine - ours) / max(capacity, 1e-9)), 1)
    return r


def measure(
    children: Children,
    wrk: Wrk,
    targets: list[Target],
    loads: list[Load],
    checks: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per load: warm every target up, then ``rounds`` rounds over the targets, each round
    in another order, so that a slow spell of the machine does not land on one target.
    A round during which other processes took more than ``--max-foreign-cpu`` percent of
    the machine is measured again, at most ``--retries`` times and while the time spent on
    that stays under ``--retry-budget`` seconds."""
    runs: dict[str, dict[str, dict[str, Any]]] = {t.name: {} for t in targets}
    retry_spent = 0.0
    total, step = len(loads) * len(targets) * args.rounds, 0
    for load in loads:
        warm: dict[str, dict[str, Any]] = {}
        for t in targets:
            raw = wrk.run(children, "warmup", t.port, load, args.warmup, t.headers)
            warm[t.name] = summarise(raw, load, 0)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        # Every wrk run, kept or not, for checking kvroute's request counters.
        tally = {t.name: {"runs": 1, "completed": warm[t.name]["requests"]} for t in targets}
        for n in range(args.rounds):
            for t in targets[n % len(targets) :] + targets[: n % len(targets)]:
                step += 1
                chunks = checks[t.name]["before"]["stream_chunks"]
                for attempt in range(1 + args.retries):
                    r = measure_once(children, wrk, t, load, args.duration, chunks)
                    r["attempt"] = attempt + 1
                    tally[t.name]["runs"] += 1
                    tally[t.name]["completed"] += r["requests"]
                    busy = r["foreign_cpu_pct"] > args.max_foreign_cpu
                    again = busy and attempt < args.retries and retry_spent < args.retry_budget
                    print_round(f"[{step:>2}/{total}]", load, t.name, n, r, busy, again)
                    if not again:
                        break
                    waited = time.monotonic()
                    wait_quiet(children, args.max_foreign_cpu, 20.0)
                    retry_spent += time.monotonic() - waited + args.duration
                time.sleep(0.2)
                rounds[t.name].append(r)
        for t in targets:
            result = combine(rounds[t.name])
            result["warmup"] = {
                k: warm[t.name][k] for k in ("rps", "requests", "non_2xx", "socket_errors")
            }
            result["wrk_runs"] = tally[t.name]["runs"]
            result["wrk_completed"] = tally[t.name]["completed"]
            runs[t.name][load.label] = result
    return runs


def wait_quiet(children: Children, max_pct: float, limit: float) -> None:
    """Wait (at most ``limit`` seconds) until other processes use under ``max_pct`` percent
    of the machine; ours are idle meanwhile."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pids = [p.pid for p in children.procs.values()]
        ours0, busy0 = sum(cpu_seconds(p) for p in pids), machine_jiffies()
        time.sleep(0.5)
        ours1, busy1 = sum(cpu_seconds(p) for p in pids), machine_jiffies()
        capacity = (busy1[1] - busy0[1]) / CLOCK_TICKS  # /proc/stat sums all CPUs already
        foreign = (busy1[0] - busy0[0]) / CLOCK_TICKS - (ours1 - ours0)
        if 100 * foreign / max(capacity, 1e-9) <= max_pct:
            return
    print(f"  the machine stayed busy for {limit:.0f} s; measuring anyway", flush=True)


def print_round(
    prefix: str, load: Load, name: str, n: int, r: dict[str, Any], busy: bool, again: bool
) -> None:
    chunks = f" {r['chunks_per_s']:>8.0f} chunks/s" if load.stream else ""
    cpu = r.get("proxy_cpu_us_per_req")
    print(
        f"{prefix} {load.label:<11} {name:<15} round {n + 1}  {r['rps']:>7.1f} req/s{chunks}"
        f"  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:8.3f} ms"
        f"{'' if cpu is None else f'  proxy CPU {cpu:5.0f} us/req'}"
        f"  non-2xx {r['non_2xx']}  socket errors {sum(r['socket_errors'].values())}"
        f"  others' CPU {r['foreign_cpu_pct']:.0f}%"
        f"{'  (busy machine: again)' if again else '  (busy machine)' if busy else ''}",
        flush=True,
    )


def print_health(health: dict[str, Any]) -> None:
    for name, h in health.items():
        print(
            f"{name}: statuses {h['statuses']}, wrk completed {h['wrk_completed']}, "
            f"{h['cut_at_run_ends']} cut by wrk as its runs ended (499 or unread 200; "
            f"at most {h['client_abort_bound']}): "
            f"{'all accounted for' if h['all_accounted_for'] else 'UNEXPECTED'}; "
            f"upstream errors {h['upstream_errors']}, stream errors {h['stream_errors']}, "
            f"error log lines {h['log']['error_lines']}"
        )
        t = h.get("tenancy")
        if t:
            evalsha = (t["redis_commandstats"] or {}).get("cmdstat_evalsha", {})
            usage = (t["admin_tenants"].get("usage") or {}) if t["admin_tenants"] else {}
            print(
                f"  tenant {TENANT}: statuses {t['tenant_statuses']}, tokens "
                f"{t['tenant_tokens']}, tokens_today (Redis) {usage.get('tokens_today')}; "
                f"Redis EVALSHA calls {evalsha.get('calls')} "
                f"({evalsha.get('usec_per_call')} us each in Redis); refusals "
                f"{t['quota_refusals']}, unenforced {t['quota_unenforced']}, store failures "
                f"{t['quota_store_failures']}, settle failures {t['quota_settle_failures']}"
            )
            for what, ok in t["checks"].items():
                print(f"    {'ok  ' if ok else 'FAIL'} {what}")


def run(args: argparse.Namespace) -> int:
    wrk_binary = ensure_wrk(args.install_wrk)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="kvroute-overhead-"))
    layout = cpu_layout(args.pin)
    children = Children(logdir, layout)
    started = time.monotonic()
    ok = False
    try:
        with terminate_on_sigterm():
            meta = machine_info()
            meta.update(
                warmup_s=args.warmup,
                duration_s=args.duration,
                rounds=args.rounds,
                cpu_pinning={role: sorted(cpus) for role, cpus in layout.items()} or "none",
                load_generator="wrk -t1 (one thread), closed loop, keep-alive",
                chat_body=CHAT_BODY,
                stream_body=STREAM_BODY,
                loadavg_at_start=Path("/proc/loadavg").read_text().split()[:3],
            )
            print(
                f"kvroute overhead benchmark: {meta['nproc']} CPUs, Python {meta['python']}, "
                f"{meta['wrk']}; logs in {logdir}",
                flush=True,
            )
            targets, tenancy = start_targets(children, args.targets)
            meta["targets_run"] = [t.name for t in targets]
            if tenancy is not None:
                meta["tenant"] = {"name": TENANT, **TENANT_LIMITS}
                meta["redis"] = str(
                    redis_call(tenancy.redis_port, "INFO", "server").get("redis_version", "?")
                )
            checks: dict[str, Any] = {}
            for t in targets:
                checks[t.name] = {"before": check_target(t.name, t.port, t.headers)}
                print(f"  {t.name:<15} on :{t.port} answers: {checks[t.name]['before']}")

            loads = [Load("chat", CHAT_BODY, c) for c in CONCURRENCIES]
            loads += [Load("stream", STREAM_BODY, c) for c in STREAM_CONCURRENCIES]
            wrk = Wrk(wrk_binary, logdir)
            wait_quiet(children, args.max_foreign_cpu, 60.0)
            jiffies0 = machine_jiffies()
            runs = measure(children, wrk, targets, loads, checks, args)
            jiffies1 = machine_jiffies()
            kept = [r for by in runs.values() for x in by.values() for r in x["rounds"]]
            meta["rounds_kept"] = len(kept)
            meta["rounds_kept_on_a_busy_machine"] = sum(
                r["foreign_cpu_pct"] > args.max_foreign_cpu for r in kept
            )
            meta["max_foreign_cpu_pct"] = args.max_foreign_cpu
            meta["cpu_steal_pct"] = round(
                100 * (jiffies1[2] - jiffies0[2]) / max(jiffies1[1] - jiffies0[1], 1), 2
            )

            health: dict[str, Any] = {}
            for t in targets:
                checks[t.name]["after"] = check_target(t.name, t.port, t.headers)
            time.sleep(0.5)  # the checks' settles run after their answers
            for t in targets:
                if not t.name.startswith("kvroute"):
                    continue
                counters = kvroute_counters(t.port)
                health[t.name] = kvroute_health(
                    counters, scan_log(logdir / f"{t.name}.log"), runs[t.name]
                )
                if t.name == TENANCY and tenancy is not None:
                    health[t.name]["tenancy"] = tenancy_health(
                        t.port, tenancy, counters, checks[t.name]["after"]
                    )
            ratios = compute_ratios(runs)
            profile: dict[str, Any] = {} if args.profile else {"skipped": "--no-profile"}
            profiles = {"kvroute": "_profile.txt", TENANCY: "_tenancy_profile.txt"}
            for t in targets:
                if not args.profile or t.name not in profiles:
                    continue
                print(f"profiling {t.name} with py-spy for {args.profile_seconds:.0f} s ...")
                out = args.out.with_name(args.out.stem + profiles[t.name])
                result = profile_kvroute(
                    children, wrk, t, args.profile_seconds, out, meta["git_commit"]
                )
                # kvroute's at the top level (as before), the tenancy target's under its name.
                profile = result if t.name == "kvroute" else {**profile, t.name: result}
            meta["elapsed_s"] = round(time.monotonic() - started, 1)
            report = {
                "meta": meta,
                "targets": {t.name: TARGET_NOTES[t.name] for t in targets},
                "runs": runs,
                "ratios": ratios,
                "checks": checks,
                "kvroute_health": health,
                "profile": profile,
            }
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            plot(runs, meta, args.out.with_suffix(".png"))
            args.out.with_suffix(".md").write_text(markdown_table(runs, ratios))
            print()
            print(format_table(runs, ratios))
            print()
            print_health(health)
            print_notes(meta)
            print(f"\nwrote {args.out} and its .png and .md")
            for result in (profile, profile.get(TENANCY, {})):
                if "summary" in result:
                    print(f"wrote {ROOT / result['summary']}")
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
        elif not ok:
            print(f"logs kept in {logdir}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of warm-up per load and target"
    )
    parser.add_argument("--duration", type=int, default=1, help="seconds per measured round")
    parser.add_argument(
        "--rounds", type=int, default=6, help="measured rounds per load and target (median)"
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        help="the targets to measure (default: all); the ratios need their baselines "
        "(kvroute's: floor and direct; kvroute+tenancy's: kvroute)",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="skip the kvroute variant with its access log on",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "overhead.json",
        help="the JSON report; the .png and .md beside it, and the profiles as "
        "<stem>_profile.txt and <stem>_tenancy_profile.txt",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the proxy a CPU to itself, the simulator and wrk the rest (on 2 CPUs this "
        "costs the proxies about 40%% of their req/s: the simulator and wrk then share one)",
    )
    parser.add_argument(
        "--max-foreign-cpu",
        type=float,
        default=10.0,
        help="percent of the machine other processes may use during a round before it is "
        "measured again",
    )
    parser.add_argument("--retries", type=int, default=2, help="re-measurements per round")
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=60.0,
        help="seconds the whole run may spend re-measuring rounds and waiting for quiet",
    )
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument(
        "--no-install-wrk",
        dest="install_wrk",
        action="store_false",
        help="fail instead of apt-get installing wrk when it is missing",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the child processes' logs")
    sub = parser.add_subparsers(dest="command")
    floor = sub.add_parser("floor", help="(internal) run the floor proxy")
    floor.add_argument("--port", type=int, required=True)
    floor.add_argument("--upstream", required=True)
    report = sub.add_parser(
        "report", help="print the table and redraw overhead.png and overhead.md from a JSON"
    )
    report.add_argument("json", nargs="?", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args(argv)
    if args.command == "floor":
        return serve_floor(args.port, args.upstream)
    if args.command == "report":
        return rerender(Path(args.json))
    if not args.access_log:
        args.targets = [t for t in args.targets if t != "kvroute+log"]
    return run(args)


def rerender(path: Path) -> int:
    data = json.loads(path.read_text())
    runs, ratios, meta = data["runs"], data["ratios"], data["meta"]
    print(format_table(runs, ratios))
    print_notes(meta)
    plot(runs, meta, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(markdown_table(runs, ratios))
    print(f"wrote {path.with_suffix('.png')} and {path.with_suffix('.md')}")
    return 0


def print_notes(meta: dict[str, Any]) -> None:
    busy, kept = meta["rounds_kept_on_a_busy_machine"], meta["rounds_kept"]
    print(f"CPU stolen by the hypervisor during the measurements: {meta['cpu_steal_pct']}%")
    print(
        f"rounds kept while other processes used over {meta['max_foreign_cpu_pct']:.0f}% of "
        f"the machine: {busy} of {kept}"
    )
    if busy > kept / 4:
        print(
            "WARNING: the machine was busy with other work for much of this run; its numbers "
            "are unreliable: run it again on a quiet machine"
        )


if __name__ == "__main__":
    sys.exit(main())
