"""The fuzz property of tests/test_fuzz.py over 10,000 cases (issue #12).

The router (uvicorn on 127.0.0.1) in front of the fuzz fleet of
tests/test_fuzz.py (vLLM, TGI and Triton simulators behind one model, others
each behind their own, one failing, one hanging, one cutting its streams)
gets ``--cases`` requests: hypothesis probes from tests/strategies.py (valid
and mutated OpenAI bodies, wrong content types, oversized and abandoned
requests, wrong paths and methods) and ``--schemathesis`` of them
schemathesis cases over ``GET /openapi.json``, from ``--workers`` client
threads at once. Every answer is held to the property: no 500 (no 5xx but
an upstream 502 / 503 / 504), OpenAI's error shape, well-formed JSON and SSE.
Afterwards the router must still answer /health and a normal request on
every kind, with nothing left in flight.

Each kind of violation is kept once with its count, and its first example is
minimised (JSON values dropped, nesting hoisted, strings cut; bytes cut for
bodies that do not parse) while it still breaks the property the same way.

    .venv/bin/python benchmarks/fuzz.py [--cases 10000] [--seed 0] [--time-limit 1200]

Writes benchmarks/results/fuzz.json. Only 127.0.0.1 is ever targeted; the
sending stops at ``--time-limit`` seconds, each minimisation after
``--shrink-budget`` requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
import requests  # noqa: E402
import schemathesis  # noqa: E402
import uvloop  # noqa: E402
from hypothesis import Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402

from tests.strategies import INFERENCE, Probe, probes  # noqa: E402
from tests.test_fuzz import (  # noqa: E402
    ANSWER_TIMEOUT,
    FUZZ,
    MODELS,
    SCHEMA_CHECKS,
    Answer,
    fleet,
    send,
    still_serving,
    violations,
)

RESULTS = ROOT / "benchmarks" / "results"
Signature = tuple[str, int, str]


def drawn(strategy: st.SearchStrategy[Any], count: int, seed_: int) -> list[Any]:
    """``count`` values of ``strategy``, the same for the same seed."""
    out: list[Any] = []

    @seed(seed_)
    @settings(FUZZ, derandomize=False, max_examples=count, phases=[Phase.generate])
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out


def signature(probe: Probe, answer: Answer, problems: list[str]) -> Signature:
    """What kind of violation this is: path, status, the first problem's gist."""
    return probe.path.split("?")[0], answer.status, problems[0].split(":")[0]


# -- minimising an example ----------------------------------------------------------------


def walk(value: Any) -> Iterator[tuple[Any, ...]]:
    """The paths to every container and string in a JSON value, breadth first
    (iterative: bodies may nest a thousand levels)."""
    todo: collections.deque[tuple[tuple[Any, ...], Any]] = collections.deque([((), value)])
    while todo:
        path, node = todo.popleft()
        yield path
        if isinstance(node, dict):
            todo.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend(((*path, i), v) for i, v in enumerate(node))


def at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def with_(value: Any, path: tuple[Any, ...], new: Any, delete: bool = False) -> Any:
    """A copy of ``value`` with ``path`` replaced (or deleted); only the spine is copied."""
    if not path:
        return new
    root = node = value.copy()
    for step in path[:-1]:
        node[step] = node[step].copy()
        node = node[step]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = new
    return root


def chain(node: Any) -> list[Any]:
    """The nodes under ``node`` along a single-child chain (how deep nesting looks)."""
    out = []
    while isinstance(node, dict | list) and len(node) == 1:
        node = next(iter(node.values())) if isinstance(node, dict) else node[0]
        out.append(node)
    return out


def candidates(value: Any) -> Iterator[Any]:
    """Simpler versions of a JSON value, the likeliest shrinks first: a part
    dropped, a deep chain hoisted by halves (from its head), a string halved."""
    # A part inside a chain (its parent's only child) is left to the chain's head.
    paths = [p for p in list(walk(value))[:200] if not p or len(at(value, p[:-1])) > 1]
    for path in paths[1:]:
        yield with_(value, path, None, delete=True)
    for path in paths:
        below = chain(at(value, path))
        step = len(below) // 2
        while step >= 1:
            yield with_(value, path, below[step - 1])
            step //= 2
    for path in paths:
        node = at(value, path)
        if isinstance(node, str) and len(node) > 1:
            yield with_(value, path, node[: len(node) // 2])


def ddmin(data: bytes, fails: Callable[[bytes], bool]) -> bytes:
    """Delta debugging over bytes: drop chunks while the failure stays."""
    n = 2
    while len(data) >= 2 and n <= len(data):
        size = len(data) // n
        for i in range(n):
            smaller = data[: i * size] + data[(i + 1) * size :]
            if fails(smaller):
                data, n = smaller, max(n - 1, 2)
                break
        else:
            n *= 2
    return data


class Budget(Exception):
    pass


def minimise(client: httpx.Client, probe: Probe, sig: Signature, budget: int) -> Probe:
    """``probe`` made smaller while it still breaks the property the same way,
    within ``budget`` requests and a minute."""
    left = [budget]
    deadline = time.monotonic() + 60

    def fails(p: Probe) -> bool:
        if left[0] <= 0 or time.monotonic() > deadline:
            raise Budget
        left[0] -= 1
        answer = send(client, p)
        problems = violations(p, answer)
        return bool(problems) and signature(p, answer, problems) == sig

    best = probe
    try:
        for header in probe.headers:
            trial = replace(best, headers=tuple(h for h in best.headers if h != header))
            if fails(trial):
                best = trial
        try:
            value, structured = orjson.loads(best.content), True
        except orjson.JSONDecodeError:
            value, structured = None, False
        if structured:
            improved = True
            while improved:
                improved = False
                for smaller in candidates(value):
                    try:
                        content = json.dumps(smaller).encode()
                    except (RecursionError, ValueError):
                        continue
                    if fails(replace(best, content=content)):
                        value, best, improved = smaller, replace(best, content=content), True
                        break
        else:
            best = replace(
                best, content=ddmin(best.content, lambda b: fails(replace(best, content=b)))
            )
    except Budget:
        pass
    return best


# -- the run --------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.kinds: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter
        )
        self.violations: dict[Signature, dict[str, Any]] = {}

    def add(self, probe: Probe, answer: Answer, problems: list[str], source: str) -> None:
        with self.lock:
            self.statuses[answer.status] += 1
            self.kinds[f"{source}:{probe.kind}"][answer.status] += 1
            if not problems:
                return
            sig = signature(probe, answer, problems)
            entry = self.violations.setdefault(
                sig,
                {
                    "signature": {"path": sig[0], "status": sig[1], "problem": sig[2]},
                    "count": 0,
                    "problems": problems,
                    "example": probe,
                    "answer": shown(answer),
                },
            )
            entry["count"] += 1


def shown(answer: Answer) -> dict[str, Any]:
    return {
        "status": answer.status,
        "content_type": answer.headers.get("content-type"),
        "body": answer.body[:600].decode("utf-8", "backslashreplace"),
        **({"failure": answer.failure} if answer.failure else {}),
    }


def run_probes(url: str, cases: list[Probe], tally: Tally, workers: int, until: float) -> int:
    local = threading.local()

    def one(probe: Probe) -> bool:
        if time.monotonic() > until:
            return False
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=ANSWER_TIMEOUT)
        answer = send(local.client, probe)
        tally.add(probe, answer, violations(probe, answer), "hypothesis")
        return True

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, cases))


def run_schemathesis(
    url: str, count: int, seed_: int, tally: Tally, workers: int, until: float
) -> tuple[int, list[dict[str, Any]]]:
    config = schemathesis.Config.from_dict({"max-stream-events": 10_000})
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    operations = [result.ok() for result in schema.get_all_operations()]
    strategy = st.one_of(
        *(
            op.as_strategy(generation_mode=mode)
            for op in operations
            for mode in modes
            for _ in range(8 if op.path in INFERENCE else 1)
        )
    )
    cases = drawn(st.tuples(strategy, st.sampled_from((*MODELS, None))), count, seed_)
    failures: list[dict[str, Any]] = []
    local = threading.local()
    validating = threading.Lock()

    def one(drawn_case: tuple[schemathesis.Case, str | None]) -> bool:
        case, model = drawn_case
        if time.monotonic() > until:
            return False
        if not hasattr(local, "session"):
            local.session = requests.Session()
        if model and case.path in INFERENCE and isinstance(case.body, dict):
            case.body["model"] = model
        try:
            response = case.call(base_url=url, session=local.session, timeout=ANSWER_TIMEOUT)
        except requests.RequestException as exc:
            probe = Probe(case.method.upper(), case.formatted_path, kind="schemathesis")
            tally.add(probe, Answer(0, {}, b"", str(exc)), [f"no answer: {exc}"], "schemathesis")
            return True
        body = response.request.body or b""
        probe = Probe(
            case.method.upper(),
            case.formatted_path,
            body.encode() if isinstance(body, str) else body,
            kind=case.operation.label,
        )
        headers = {k.lower(): ", ".join(v) for k, v in response.headers.items()}
        answer = Answer(response.status_code, headers, response.content)
        tally.add(probe, answer, violations(probe, answer), "schemathesis")
        try:
            # One at a time: schemathesis's SSE validator is shared by the schema
            # and swaps its payload decoder in and out around each validation.
            with validating:
                case.validate_response(response, checks=SCHEMA_CHECKS)
        except (Exception, FailureGroup) as exc:
            with tally.lock:
                if len(failures) < 20:
                    failures.append({"case": probe.shown(), "failure": str(exc)[:1500]})
        return True

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, cases)), failures


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    versions = {
        name: importlib.metadata.version(name)
        for name in ("hypothesis", "schemathesis", "httpx", "uvicorn", "orjson")
    }
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    hypothesis_count = args.cases - args.schemathesis
    print(f"drawing {hypothesis_count} hypothesis probes (seed {args.seed})...", flush=True)
    cases = await asyncio.to_thread(drawn, probes(MODELS), hypothesis_count, args.seed)
    drawn_s = time.monotonic() - started
    tally = Tally()
    async with fleet() as f:
        tasks = len(asyncio.all_tasks())
        until = time.monotonic() + args.time_limit
        print(f"sending {len(cases)} probes from {args.workers} threads...", flush=True)
        t0 = time.monotonic()
        sent = await asyncio.to_thread(run_probes, f.url, cases, tally, args.workers, until)
        probes_s = time.monotonic() - t0
        print(
            f"sent {sent} in {probes_s:.0f} s; {args.schemathesis} schemathesis cases...",
            flush=True,
        )
        t0 = time.monotonic()
        st_sent, st_failures = await asyncio.to_thread(
            run_schemathesis, f.url, args.schemathesis, args.seed, tally, args.workers, until
        )
        schemathesis_s = time.monotonic() - t0
        try:
            await still_serving(f, tasks)
            serving: dict[str, Any] = {"ok": True}
        except AssertionError as exc:
            serving = {"ok": False, "error": str(exc)[:1000]}
        print(f"{len(tally.violations)} kinds of violation; minimising...", flush=True)
        violations_out = []
        with httpx.Client(base_url=f.url, timeout=ANSWER_TIMEOUT) as client:
            for entry in tally.violations.values():
                example: Probe = entry["example"]
                sig = (
                    entry["signature"]["path"],
                    entry["signature"]["status"],
                    entry["signature"]["problem"],
                )
                small = await asyncio.to_thread(minimise, client, example, sig, args.shrink_budget)
                answer = await asyncio.to_thread(send, client, small)
                violations_out.append(
                    {
                        **entry,
                        "example": example.shown(),
                        "minimised": {"request": small.shown(2000), "answer": shown(answer)},
                    }
                )
    return {
        "property": (
            "no 500 (no 5xx but an upstream 502/503/504); every error OpenAI's shape "
            "{error: {message, type, param, code}}; 2xx JSON with choices/data naming the "
            "routed model, or SSE chunks ending in [DONE] or an error event; afterwards "
            "/health, a normal request on every sound model, nothing in flight"
        ),
        "cases": sent + st_sent,
        "hypothesis_cases": sent,
        "schemathesis_cases": st_sent,
        "seconds": {
            "draw": round(drawn_s, 1),
            "hypothesis": round(probes_s, 1),
            "schemathesis": round(schemathesis_s, 1),
            "total": round(time.monotonic() - started, 1),
        },
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "by_kind": {
            kind: {str(k): v for k, v in sorted(c.items())}
            for kind, c in sorted(tally.kinds.items())
        },
        "violations": sorted(violations_out, key=lambda v: -v["count"]),
        "schemathesis_check_failures": st_failures,
        "still_serving": serving,
        "machine": machine(),
    }


def cli() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", type=int, default=10_000, help="requests in all")
    p.add_argument("--schemathesis", type=int, default=1_000, help="of them, schemathesis cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="client threads sending at once")
    p.add_argument("--time-limit", type=float, default=1200.0, help="seconds of sending at most")
    p.add_argument("--shrink-budget", type=int, default=400, help="requests per minimisation")
    p.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    args = p.parse_args()
    result = {"settings": {**vars(args), "out": os.path.relpath(args.out, ROOT)}}
    result |= uvloop.run(main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    count = sum(v["count"] for v in result["violations"])
    print(
        f"{result['cases']} cases in {result['seconds']['total']} s; "
        f"statuses {result['statuses']}; {count} violations of "
        f"{len(result['violations'])} kinds; still serving: {result['still_serving']['ok']}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli()
