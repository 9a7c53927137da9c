"""Floods against one kvroute process: idle connections, open streams, a burst past the limit.

Each phase starts a ``kvroute serve`` process (its default ``server.limits``) in
front of a ``kvroute simulate`` process, both on 127.0.0.1, and drives them
from this process (asyncio, uvloop, raw sockets):

* **idle**: ``--idle`` connections (10,000) each send one chat request, then
  stay open, idle, on keep-alive for ``--hold`` seconds; kvroute's RSS before
  and while they are open gives the memory per idle connection; every held
  connection must still be open at the end, and a sample must still serve.
* **burst**: while those are held (the connection limit is reached), ``--burst``
  new connections (2,000) each send a request at once: every one must get a
  prompt 503 ``server_busy`` with Retry-After (no hang, no reset), /health must
  still answer; then the held connections close and the process must serve
  plain and streamed requests normally.
* **streams**: against a simulator that streams slowly (a 0.25 s step per
  token), ``--streams`` streams (2,000) open at once; kvroute's RSS with all of
  them open gives the memory per open stream; ``--extra`` more requests while
  they are all open meet the in-flight limit (503); every stream must end with
  all its tokens and ``[DONE]``.

Results: ``benchmarks/results/flood.json`` and ``flood.png`` (RSS over time).

    .venv/bin/python benchmarks/flood.py            # about 2 minutes
    .venv/bin/python benchmarks/flood.py report     # redraw the plot from the JSON

Only 127.0.0.1 is ever targeted; every phase has a time bound and every loop a
count; child processes are killed on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.config import ClientLimits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
MODEL = "flood"
KVROUTE = [sys.executable, "-m", "router.cli"]
#: Requests in flight while connections are opened (below the in-flight limit).
OPEN_CONCURRENCY = 256
#: Bound on any single exchange the harness waits for.
EXCHANGE_TIMEOUT = 30.0


def chat(stream: bool, max_tokens: int) -> bytes:
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a story about a river."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: kvroute\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


HEALTH = b"GET /health HTTP/1.1\r\nhost: kvroute\r\n\r\n"


# -- processes ---------------------------------------------------------------------


class Children:
    """Child processes, each in its own process group, all killed on the way out."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with (self.logdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all bound at once, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def limits(args: argparse.Namespace) -> ClientLimits:
    """kvroute's defaults, unless the command line changes them (for smaller runs)."""
    changes = {"max_connections": args.max_connections, "max_in_flight": args.max_in_flight}
    return ClientLimits(**{k: v for k, v in changes.items() if v is not None})


async def start_pair(
    children: Children, tag: str, sim_args: Sequence[str], tmp: Path, limits: ClientLimits
) -> tuple[int, subprocess.Popen[bytes]]:
    """A simulator and kvroute (with ``limits``) in front of it; (kvroute's port, process)."""
    sim_port, port = free_ports(2)
    children.start(
        f"{tag}-sim",
        [*KVROUTE, "simulate", "--port", str(sim_port), "--model", MODEL, *sim_args],
    )
    await wait_ok(children, f"{tag}-sim", sim_port, b"/health")
    config = tmp / f"{tag}.yaml"
    config.write_text(
        f"server: {{port: {port}, access_log: false, watch_config: false,"
        f" limits: {json.dumps(limits.model_dump())}}}\n"
        f"endpoints: [{{id: sim, url: 'http://{HOST}:{sim_port}', kind: vllm,"
        f" models: [{MODEL}]}}]\n"
        f"models: {{{MODEL}: {{policy: round_robin}}}}\n"
    )
    proc = children.start(f"{tag}-kvroute", [*KVROUTE, "serve", "--config", str(config)])
    await wait_ok(children, f"{tag}-kvroute", port, b"/ready")
    return port, proc


async def wait_ok(children: Children, name: str, port: int, path: bytes) -> None:
    """Until ``GET path`` answers 200 (60 s at most)."""
    for _ in range(300):
        assert children.procs[name].poll() is None, children.log(name)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET %s HTTP/1.1\r\nhost: kvroute\r\n\r\n" % path)
            ok = (await read_response(reader)).status == 200
            writer.close()
            if ok:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} not ready\n{children.log(name)}")


# -- HTTP/1.1 over raw streams -----------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


async def chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def read_response(reader: asyncio.StreamReader) -> Response:
    status, headers = await read_head(reader)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b"".join([c async for c in chunks(reader)])
    else:
        body = await reader.read()
    return Response(status, headers, body)


def error_code(response: Response) -> str | None:
    try:
        code = orjson.loads(response.body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class Sampler:
    """kvroute's RSS and what the harness holds open, every ``interval`` seconds."""

    def __init__(self, pid: int, t0: float, interval: float = 0.5) -> None:
        self.pid, self.t0, self.interval = pid, t0, interval
        self.open = 0
        self.phase = ""
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> float:
        rss = rss_mib(self.pid)
        t = round(time.monotonic() - self.t0, 2)
        self.samples.append({"t": t, "phase": self.phase, "rss_mib": rss, "open": self.open})
        return rss

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.sample()
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def settled_rss(pid: int, seconds: float = 2.0) -> float:
    """RSS once it stops moving: the median of samples over ``seconds``."""
    samples = []
    for _ in range(int(seconds / 0.25)):
        samples.append(rss_mib(pid))
        await asyncio.sleep(0.25)
    return statistics.median(samples)


async def warm_up(port: int, requests: int = 200, connections: int = 10) -> None:
    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        for i in range(requests // connections):
            writer.write(chat(stream=i % 2 == 0, max_tokens=4))
            response = await read_response(reader)
            assert response.status == 200, (response.status, response.body[:500])
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


# -- idle connections, then a burst past the limit ---------------------------------


async def open_idle(
    port: int, n: int, concurrency: int, sampler: Sampler
) -> tuple[list[Conn], dict[str, int]]:
    gate = asyncio.Semaphore(concurrency)
    errors: dict[str, int] = {}
    conns: list[Conn] = []

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(EXCHANGE_TIMEOUT):
                    reader, writer = await asyncio.open_connection(HOST, port)
                    writer.write(chat(stream=False, max_tokens=1))
                    response = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            if response.status != 200:
                errors[f"HTTP {response.status}"] = errors.get(f"HTTP {response.status}", 0) + 1
            conns.append(Conn(reader, writer))
            sampler.open = len(conns)

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, errors


async def refused(port: int) -> dict[str, Any]:
    start = time.monotonic()
    try:
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(chat(stream=False, max_tokens=1))
            response = await read_response(reader)
            closed = await reader.read() == b""
            writer.close()
    except TimeoutError:
        return {"outcome": "hang", "s": time.monotonic() - start}
    except (OSError, asyncio.IncompleteReadError) as exc:
        return {"outcome": type(exc).__name__, "s": time.monotonic() - start}
    return {
        "outcome": f"{response.status} {error_code(response)}",
        "retry_after": response.headers.get("retry-after"),
        "closed": closed,
        "s": time.monotonic() - start,
    }


async def serves_normally(port: int, connections: int = 20, each: int = 50) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    streams_ok = 0

    async def one() -> None:
        nonlocal streams_ok
        reader, writer = await asyncio.open_connection(HOST, port)
        for _ in range(each):
            writer.write(chat(stream=False, max_tokens=4))
            status = str((await read_response(reader)).status)
            statuses[status] = statuses.get(status, 0) + 1
        writer.write(chat(stream=True, max_tokens=16))
        response = await read_response(reader)
        if response.status == 200 and response.body.rstrip().endswith(b"data: [DONE]"):
            streams_ok += 1
        writer.close()

    async with asyncio.timeout(120):
        await asyncio.gather(*(one() for _ in range(connections)))
    return {"statuses": statuses, "streams_ok": streams_ok, "streams": connections}


async def idle_and_burst(args: argparse.Namespace, children: Children, tmp: Path) -> dict[str, Any]:
    sim_args = ["--kind", "vllm", "--zero-latency"]
    port, proc = await start_pair(children, "idle", sim_args, tmp, limits(args))
    t0 = time.monotonic()
    await warm_up(port)
    before = await settled_rss(proc.pid)
    files_before = open_files(proc.pid)
    cpu_before = cpu_seconds(proc.pid)
    out: dict[str, Any] = {"rss_before_mib": before, "open_files_before": files_before}
    with Sampler(proc.pid, t0) as sampler:
        sampler.phase = "idle"
        async with asyncio.timeout(300):
            opened_at = time.monotonic()
            concurrency = min(OPEN_CONCURRENCY, limits(args).max_in_flight // 2 or 1)
            conns, errors = await open_idle(port, args.idle, concurrency, sampler)
            out["open_s"] = round(time.monotonic() - opened_at, 2)
            await asyncio.sleep(args.hold / 2)
            held = await settled_rss(proc.pid, args.hold / 2)
            files_held = open_files(proc.pid)
        closed_by_server = sum(1 for c in conns if c.reader.at_eof() or c.reader.exception())
        reuse_statuses: dict[str, int] = {}
        for conn in random.Random(7).sample(conns, min(100, len(conns))):
            conn.writer.write(chat(stream=False, max_tokens=1))
            status = str((await read_response(conn.reader)).status)
            reuse_statuses[status] = reuse_statuses.get(status, 0) + 1
        n = len(conns)
        out["idle"] = {
            "connections": n,
            "errors": errors,
            "closed_by_server": closed_by_server,
            "reuse_after_hold": reuse_statuses,
            "rss_held_mib": held,
            "rss_delta_mib": round(held - before, 1),
            "kib_per_connection": round((held - before) * 1024 / max(n, 1), 2),
            "open_files_held": files_held,
            "cpu_s_open_and_hold": round(cpu_seconds(proc.pid) - cpu_before, 2),
        }

        sampler.phase = "burst"
        async with asyncio.timeout(120):
            burst_started = time.monotonic()
            outcomes = await asyncio.gather(*(refused(port) for _ in range(args.burst)))
            burst_s = time.monotonic() - burst_started
            probe_reader, probe_writer = await asyncio.open_connection(HOST, port)
            probe_writer.write(HEALTH)
            probe = (await read_response(probe_reader)).status
            probe_writer.close()
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
        latencies = sorted(o["s"] for o in outcomes)
        out["burst"] = {
            "connections": args.burst,
            "outcomes": counts,
            "with_retry_after": sum(1 for o in outcomes if o.get("retry_after")),
            "closed_after": sum(1 for o in outcomes if o.get("closed")),
            "latency_s": {
                "p50": round(latencies[len(latencies) // 2], 3),
                "p99": round(latencies[int(len(latencies) * 0.99) - 1], 3),
                "max": round(latencies[-1], 3),
            },
            "burst_s": round(burst_s, 2),
            "health_during": probe,
        }

        sampler.phase = "after"
        for conn in conns:
            conn.writer.close()
        sampler.open = 0
        for _ in range(120):  # up to 30 s for kvroute to see them all closed
            if open_files(proc.pid) <= files_before + 20:
                break
            await asyncio.sleep(0.25)
        out["after"] = {
            "open_files": open_files(proc.pid),
            "rss_mib": await settled_rss(proc.pid),
            **await serves_normally(port),
            "alive": proc.poll() is None,
        }
    out["timeline"] = sampler.samples
    out["log_warnings"] = [
        line for line in children.log("idle-kvroute").splitlines() if "warn" in line
    ][:5]
    out["log_errors"] = [
        line
        for line in children.log("idle-kvroute").splitlines()
        if '"level":"error"' in line or "Traceback" in line
    ][:5]
    children.stop("idle-kvroute")
    children.stop("idle-sim")
    return out


# -- open streams ------------------------------------------------------------------


@dataclass
class Streams:
    """Streams as the harness sees them; ``started`` is set once every stream has
    had its first event or failed."""

    n: int
    #: Streams waiting for their first event at once: kvroute opens one upstream
    #: connection per stream, and a single simulator process cannot accept
    #: thousands in the same instant (its connects would time out).
    ramp: asyncio.Semaphore
    opened: int = 0
    done: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        self.failed += 1
        self._check()

    def first_event(self) -> None:
        self.opened += 1
        self._check()

    def _check(self) -> None:
        if self.opened + self.failed >= self.n:
            self.started.set()


async def one_stream(port: int, tokens: int, state: Streams, sampler: Sampler) -> None:
    opened = False
    try:
        await state.ramp.acquire()
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(chat(stream=True, max_tokens=tokens))
        status, _ = await read_head(reader)
        if status != 200:
            state.error(f"HTTP {status}")
            return
        buffer, events = b"", 0
        async with asyncio.timeout(300):
            async for data in chunks(reader):
                buffer += data
                *complete, buffer = buffer.split(b"\n\n")
                events += len(complete)
                if complete and not opened:
                    opened = True
                    state.ramp.release()
                    state.first_event()
                    sampler.open = state.opened - state.done
                if complete and complete[-1] == b"data: [DONE]":
                    break
        writer.close()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        state.error(type(exc).__name__)
        return
    finally:
        if not opened:
            state.ramp.release()
    state.done += 1
    sampler.open = state.opened - state.done
    # Events: the role chunk, one per token (the last with the finish reason), [DONE].
    state.tokens.append(events - 2)


async def streams(args: argparse.Namespace, children: Children, tmp: Path) -> dict[str, Any]:
    sim_args = [
        "--kind", "vllm", "--max-num-seqs", "4096", "--num-blocks", "20000",
        "--max-batched-tokens", "65536", "--step-base", str(args.step),
        "--prefill-per-token", "0", "--decode-per-seq", "0",
    ]  # fmt: skip
    port, proc = await start_pair(children, "streams", sim_args, tmp, limits(args))
    t0 = time.monotonic()
    await warm_up(port, requests=20, connections=4)
    before = await settled_rss(proc.pid)
    cpu_before = cpu_seconds(proc.pid)
    out: dict[str, Any] = {"rss_before_mib": before, "open_files_before": open_files(proc.pid)}
    n = args.streams
    state = Streams(n, asyncio.Semaphore(args.ramp))
    with Sampler(proc.pid, t0) as sampler:
        sampler.phase = "streams"
        async with asyncio.timeout(300):
            started = time.monotonic()
            tasks = [
                asyncio.create_task(one_stream(port, args.stream_tokens, state, sampler))
                for _ in range(n)
            ]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(120):
                    await state.started.wait()
            all_open_s = time.monotonic() - started
            open_now = state.opened - state.done
            rss = [rss_mib(proc.pid)]
            files = open_files(proc.pid)
            # Past the in-flight limit while they are all open.
            extra = await asyncio.gather(*(extra_request(port) for _ in range(args.extra)))
            rss.append(rss_mib(proc.pid))
            open_after_extra = state.opened - state.done
            await asyncio.gather(*tasks)
        held = statistics.median(rss)
        extra_counts: dict[str, int] = {}
        for e in extra:
            extra_counts[e] = extra_counts.get(e, 0) + 1
        out.update(
            streams=n,
            all_open_s=round(all_open_s, 2),
            open_at_sample=open_now,
            open_after_extra=open_after_extra,
            rss_open_mib=held,
            rss_delta_mib=round(held - before, 1),
            kib_per_stream=round((held - before) * 1024 / max(open_now, 1), 1),
            open_files_open=files,
            completed=state.done,
            errors=state.errors,
            tokens_per_stream=sorted(set(state.tokens)),
            extra_requests=extra_counts,
            cpu_s=round(cpu_seconds(proc.pid) - cpu_before, 2),
            rss_after_mib=await settled_rss(proc.pid),
            alive=proc.poll() is None,
        )
    out["timeline"] = sampler.samples
    out["log_errors"] = [
        line
        for line in children.log("streams-kvroute").splitlines()
        if '"level":"error"' in line or "Traceback" in line
    ][:5]
    children.stop("streams-kvroute")
    children.stop("streams-sim")
    return out


async def extra_request(port: int) -> str:
    try:
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(chat(stream=True, max_tokens=1))
            response = await read_response(reader)
            writer.close()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        return type(exc).__name__
    retry = " retry-after" if "retry-after" in response.headers else ""
    return f"{response.status} {error_code(response)}{retry}"


# -- the run -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git.stdout.strip(),
        "loadavg_before": os.getloadavg(),
    }


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def checks(result: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    idle, burst, after = result["idle"]["idle"], result["idle"]["burst"], result["idle"]["after"]
    s = result["streams"]
    return {
        "idle: every connection opened, served and held": idle["connections"] == args.idle
        and not idle["errors"]
        and idle["closed_by_server"] == 0
        and idle["reuse_after_hold"] == {"200": min(100, args.idle)},
        "burst: every request a 503 server_busy with Retry-After, connection closed": burst[
            "outcomes"
        ]
        == {"503 server_busy": args.burst}
        and burst["with_retry_after"] == args.burst
        and burst["closed_after"] == args.burst,
        "burst: /health answered during it": burst["health_during"] == 200,
        "after: serves normally": after["alive"]
        and set(after["statuses"]) == {"200"}
        and after["streams_ok"] == after["streams"],
        "streams: all open at once, all complete": s["open_at_sample"] == args.streams
        and s["completed"] == args.streams
        and not s["errors"]
        and s["tokens_per_stream"] == [args.stream_tokens],
        "streams: extra requests past the in-flight limit get 503": s["extra_requests"]
        == {"503 server_busy retry-after": args.extra},
        "no error in kvroute's logs": not result["idle"]["log_errors"] and not s["log_errors"],
    }


async def run(args: argparse.Namespace, children: Children, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "command"},
        "limits": limits(args).model_dump(),
        "harness_open_files_limit": raise_open_files(),
    }
    print(f"idle: {args.idle} connections, hold {args.hold} s; then a burst of {args.burst}")
    result["idle"] = await idle_and_burst(args, children, tmp)
    print(json.dumps({k: result["idle"][k] for k in ("idle", "burst", "after")}, indent=1))
    print(
        f"streams: {args.streams} open streams, {args.stream_tokens} tokens at {args.step} s each"
    )
    result["streams"] = await streams(args, children, tmp)
    print(json.dumps({k: v for k, v in result["streams"].items() if k != "timeline"}, indent=1))
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["checks"] = checks(result, args)
    return result


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = (
        ("idle", "idle connections, then a burst of refused ones", "connections held"),
        ("streams", "open streams", "streams open"),
    )
    for ax, (key, title, label) in zip(axes, panels, strict=True):
        timeline = result[key]["timeline"]
        t = [s["t"] for s in timeline]
        ax.plot(t, [s["rss_mib"] for s in timeline], color="tab:blue")
        ax.set_xlabel("seconds")
        ax.set_ylabel("kvroute RSS (MiB)", color="tab:blue")
        ax.set_title(title)
        twin = ax.twinx()
        twin.plot(t, [s["open"] for s in timeline], color="tab:orange")
        twin.set_ylabel(label, color="tab:orange")
        changes = [s1 for s0, s1 in itertools.pairwise(timeline) if s1["phase"] != s0["phase"]]
        top = ax.get_ylim()[1]
        for i, s1 in enumerate(changes):
            ax.axvline(s1["t"], color="grey", linestyle=":", linewidth=1)
            ax.text(
                s1["t"], top, f" {s1['phase']}", va="top", fontsize=8, ha="left" if i else "right"
            )
    fig.suptitle(f"kvroute under floods (default limits), {result['machine']['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "report"], default="run")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections to hold")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold them")
    parser.add_argument("--burst", type=int, default=2_000, help="connections past the limit")
    parser.add_argument("--streams", type=int, default=2_000, help="streams open at once")
    parser.add_argument("--stream-tokens", type=int, default=45, help="tokens per stream")
    parser.add_argument("--ramp", type=int, default=250, help="streams starting at once")
    parser.add_argument("--step", type=float, default=1.0, help="simulator seconds per token")
    parser.add_argument("--extra", type=int, default=200, help="requests past the in-flight limit")
    parser.add_argument("--max-connections", type=int, help="kvroute's (default: its default)")
    parser.add_argument("--max-in-flight", type=int, help="kvroute's (default: its default)")
    args = parser.parse_args(argv)
    path = RESULTS / "flood.json"
    if args.command == "report":
        plot(json.loads(path.read_text()), RESULTS / "flood.png")
        return 0
    with tempfile.TemporaryDirectory() as tmp, terminate_on_sigterm():
        children = Children(Path(tmp))
        try:
            result = uvloop.run(run(args, children, Path(tmp)))
        finally:
            children.stop_all()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "flood.png")
    failed = [name for name, ok in result["checks"].items() if not ok]
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"wrote {path} and flood.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
