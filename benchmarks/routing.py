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
import collections
import dataclasses
import heapq
import itertools
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.base import Operation, Sampling  # noqa: E402
from backends.sim.engine import Engine, EngineParams, Sequence_  # noqa: E402
from backends.sim.kvcache import block_hashes as kv_block_hashes  # noqa: E402
from backends.sim.tokenizer import render_chatml, token_ids, tokenize  # noqa: E402
from policies import EndpointView, RequestView, build_policy  # noqa: E402
from policies.base import Decision, Outcome, load_of  # noqa: E402
from policies.ring import bounded_capacity  # noqa: E402
from router.config import EndpointConfig  # noqa: E402
from router.prompts import PromptTokenizer  # noqa: E402
from router.registry import EndpointRegistry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
POLICIES = (
    "round_robin",
    "least_load",
    "power_of_two",
    "consistent_hash",
    "prefix_affinity",
    "prefix_affinity_ring1",
    "oracle",
)
SIMPLE = ("round_robin", "least_load", "power_of_two")
#: Policies run with parameters other than their defaults.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "prefix_affinity_ring1": ("prefix_affinity", {"ring_choices": 1}),
}

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


VOCAB = tuple(
    [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "omega",
        "sigma",
        "kappa",
        "theta",
        "zeta",
        "eta",
        "iota",
        "lambda",
        "mu",
        "nu",
        "xi",
        "rho",
        "tau",
        "phi",
        "chi",
        "psi",
        "red",
        "green",
        "blue",
        "cyan",
        "amber",
        "ivory",
        "olive",
        "plum",
        "coral",
        "azure",
    ]
)


def words(rng: random.Random, n: int) -> str:
    """``n`` tokens of the simulators' tokenizer (each word is one token)."""
    return " ".join(rng.choice(VOCAB) for _ in range(n))


@dataclass
class Request:
    messages: list[dict[str, str]]
    max_tokens: int
    arrival: float = 0.0
    conversation: int | None = None
    turn: int = 0


@dataclass
class Workload:
    """A seeded source of requests. ``fresh`` makes a new request (a new
    conversation, for multi-turn); ``follow_up`` makes the next turn of one
    that just finished, or None when the conversation is over."""

    name: str
    description: str
    fresh: Callable[[random.Random], Request]
    follow_up: Callable[[Request, str, random.Random], Request | None] | None = None


def shared_contexts(n: int) -> Workload:
    ctx_rng = random.Random(100)
    customers = [words(ctx_rng, 2000) for _ in range(4 * n)]

    def fresh(rng: random.Random) -> Request:
        c = rng.randrange(len(customers))
        return Request(
            [
                {"role": "system", "content": f"Customer {c} context:\n{customers[c]}"},
                {"role": "user", "content": f"user {rng.randrange(4)}: {words(rng, 30)}"},
            ],
            32,
        )

    return Workload(
        "shared_contexts",
        f"{4 * n} customers, each with a ~2000-token shared context ({4 * n * 2000} tokens in"
        f" all = {4 * n * 2000 / KV_TOKENS:.1f}x one replica's KV cache), 4 users each asking"
        " ~30-token questions, 32 tokens out",
        fresh,
    )


def multi_turn(n: int) -> Workload:
    counter = iter(range(10**9))

    def fresh(rng: random.Random) -> Request:
        return Request(
            [
                {"role": "system", "content": words(rng, 300)},
                {"role": "user", "content": words(rng, 60)},
            ],
            48,
            conversation=next(counter),
        )

    def follow(req: Request, reply: str, rng: random.Random) -> Request | None:
        if req.turn >= 7:
            return None
        messages = [
            *req.messages,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": words(rng, 60)},
        ]
        return Request(messages, 48, 0.0, req.conversation, req.turn + 1)

    return Workload(
        "multi_turn",
        "conversations with a ~300-token system prompt of their own, 8 turns of ~60 user"
        " tokens and 48 generated; each turn's prompt is the whole conversation so far",
        fresh,
        follow,
    )


def shared_system_prompt(n: int) -> Workload:
    system = words(random.Random(200), 6000)

    def fresh(rng: random.Random) -> Request:
        return Request(
            [{"role": "system", "content": system}, {"role": "user", "content": words(rng, 30)}],
            32,
        )

    return Workload(
        "shared_system_prompt",
        "one ~6000-token system prompt for every request, then a unique ~30-token question",
        fresh,
    )


def no_sharing(n: int) -> Workload:
    def fresh(rng: random.Random) -> Request:
        return Request([{"role": "user", "content": words(rng, 1000)}], 32)

    return Workload("no_sharing", "unique ~1000-token prompts, 32 tokens out", fresh)


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "shared_contexts": shared_contexts,
    "multi_turn": multi_turn,
    "shared_system_prompt": shared_system_prompt,
    "no_sharing": no_sharing,
}


def poisson_ramp(rng: random.Random, duration: float, peak: float) -> list[float]:
    """Arrival times whose rate ramps linearly from peak/10 to peak."""
    out, t = [], 0.0
    while t < duration:
        t += rng.expovariate(peak * (0.1 + 0.9 * t / duration))
        if t < duration:
            out.append(t)
    return out


class Oracle:
    """Knows every engine's cache, and the prompts already queued or running
    there (which will be in its cache by the time a new request runs): the
    longest such match among replicas not overloaded (the same bounded-load
    rule as prefix_affinity), else the least loaded."""

    name = "oracle"
    uses_tokens = False

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = engines
        self.pending: list[collections.Counter[int]] = [collections.Counter() for _ in engines]
        self.hashes: list[int] = []
        self.num_tokens = 0

    def prepare(self, prompt: str) -> None:
        ids = token_ids(tokenize(prompt))
        self.hashes = kv_block_hashes(ids, ENGINE.block_size)
        self.num_tokens = len(ids)

    def _hit(self, i: int) -> int:
        engine, pending = self.engines[i], self.pending[i]
        limit = max(0, self.num_tokens - 1) // ENGINE.block_size
        n = 0
        for h in self.hashes[:limit]:
            if h not in pending and not engine.cache.holds(h):
                break
            n += 1
        return n

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        cap = bounded_capacity(candidates, 0.25, 4.0)
        hits = {e.id: self._hit(int(e.id)) for e in candidates}
        ranked = sorted(
            candidates,
            key=lambda e: (load_of(e) + 1 > cap[e.id], -hits[e.id], load_of(e)),
        )
        return Decision(tuple(ranked), "oracle")

    def assigned(self, i: int) -> list[int]:
        self.pending[i].update(self.hashes)
        return self.hashes

    def finished(self, i: int, hashes: list[int]) -> None:
        self.pending[i].subtract(hashes)
        self.pending[i] += collections.Counter()  # drop zero counts

    def observe(self, decision: Decision, endpoint_id: str, outcome: Outcome) -> None:
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


def simulate(
    n: int,
    workload: Workload,
    policy_name: str,
    duration: float,
    *,
    peak: float | None = None,
    clients: int = 0,
    params: dict[str, Any] | None = None,
    engine: EngineParams = ENGINE,
) -> RunResult:
    """One run in virtual time. Open loop (``peak``: Poisson arrivals ramping to
    ``peak`` per second) or closed loop (``clients`` each sending the next
    request, or turn, as soon as the last one finished)."""
    engines = [Engine(engine) for _ in range(n)]
    rng = random.Random(7)
    if policy_name == "oracle":
        policy: Any = Oracle(engines)
    else:
        name, variant = VARIANTS.get(policy_name, (policy_name, {}))
        policy = build_policy(name, {**variant, **(params or {})}, random.Random(1))
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

    if peak is not None:
        for t in poisson_ramp(random.Random(11), duration, peak):
            push(t, "arrive", workload.fresh(rng))
    for _ in range(clients):
        push(0.0, "arrive", workload.fresh(rng))
    ttfts: list[float] = []
    done_times: list[float] = []
    oracle_hashes: dict[Sequence_, list[int]] = {}
    decisions: dict[Sequence_, Decision] = {}

    def start_step(i: int, now: float) -> None:
        step = engines[i].plan_step()
        busy[i] = step is not None
        if step is not None:
            push(now + step.seconds, "step", (i, step))

    while events:
        t, _, kind, payload = heapq.heappop(events)
        if clients and t > duration:
            break
        for i in range(n):
            load_area[i] += in_flight[i] * (t - last_t)
        last_t = t
        if kind == "arrive":
            req: Request = payload
            req.arrival = t
            prompt = render_chatml(req.messages)
            views = [
                EndpointView(
                    id=str(i),
                    url="",
                    kind="vllm",
                    in_flight=in_flight[i],
                    # As the router counts them: no byte back yet (queued or
                    # prefilling; a stream's first chunk carries the first token).
                    awaiting_first=sum(1 for s in active[i] if s.first_token_at is None),
                    running=float(len(engines[i].running)),
                    waiting=float(len(engines[i].waiting)),
                    kv_capacity_tokens=(engine.num_blocks - 1) * engine.block_size,
                )
                for i in range(n)
            ]
            if isinstance(policy, Oracle):
                policy.prepare(prompt)
            body = {"model": "m", "messages": req.messages}
            decision = policy.rank(RequestView(model="m", endpoint="chat", body=body), views)
            i = int(decision.ranked[0].id)
            seq = engines[i].submit(prompt, req.max_tokens, now=t, run=False)
            active[i][seq] = req
            decisions[seq] = decision
            if isinstance(policy, Oracle):
                oracle_hashes[seq] = policy.assigned(i)
            in_flight[i] += 1
            if not busy[i]:
                start_step(i, t)
        else:
            i, step = payload
            engines[i].finish_step(step, t)
            for seq in [s for s in active[i] if s.done]:
                req = active[i].pop(seq)
                in_flight[i] -= 1
                # As the router would, from the usage in the response.
                outcome = Outcome(True, seq.num_prompt, seq.hit_tokens)
                policy.observe(decisions.pop(seq), str(i), outcome)
                if isinstance(policy, Oracle):
                    policy.finished(i, oracle_hashes.pop(seq))
                if seq.first_token_at is not None:
                    ttfts.append(seq.first_token_at - seq.arrival)
                done_times.append(t)
                nxt = None
                if workload.follow_up is not None:
                    nxt = workload.follow_up(req, "".join(seq.output), rng)
                    if nxt is not None and not clients:
                        # Open loop: the user reads the reply for about a second.
                        push(t + rng.expovariate(1.0), "arrive", nxt)
                        nxt = None
                if clients:
                    push(t, "arrive", nxt or workload.fresh(rng))
            start_step(i, t)
    queries = sum(e.stats.queries for e in engines)
    hits = sum(e.stats.hits for e in engines)
    window = (duration / 3, duration)
    in_window = sum(1 for d in done_times if window[0] <= d < window[1])
    mean_load = [a / max(last_t, 1e-9) for a in load_area]
    return RunResult(
        hit_rate=hits / queries if queries else 0.0,
        ttft_p50=statistics.median(ttfts),
        ttft_p90=statistics.quantiles(ttfts, n=10)[-1],
        throughput=in_window / (window[1] - window[0]),
        imbalance=max(mean_load) / (sum(mean_load) / n) if sum(mean_load) else 1.0,
        completed=len(done_times),
    )


@dataclass(frozen=True)
class AdapterRequest:
    """What an adapter may ask of a request (``backends.base.OpenAIRequest``)."""

    body: dict[str, Any]
    op: Operation = Operation.CHAT
    raw: bytes = b""
    stream: bool = False
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    router_usage: bool = False


def latency_fleet(endpoints: int, rng: random.Random) -> EndpointRegistry:
    """``endpoints`` vLLM endpoints of model "m" in a registry, as the router
    keeps them, with 0 to 8 requests in flight each."""
    registry = EndpointRegistry(
        EndpointConfig.model_validate(
            {
                "id": f"e{i}",
                "url": f"http://10.0.{i // 256}.{i % 256}:8000",
                "kind": "vllm",
                "models": ["m"],
                "kv_capacity_tokens": 500_000,
            }
        )
        for i in range(endpoints)
    )
    for state in registry.all():
        state.in_flight = rng.randint(0, 8)
    return registry


#: Question numbers: unique across every benchmark run in a process.
_QUESTIONS = itertools.count()


def tenant_chat(system: str, k: int, question: str = "") -> dict[str, Any]:
    """A tenant's chat: its system prompt and a new question (``question``
    followed by the number ``k``)."""
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"{question}q{k}"},
        ],
    }


def hold_tenants(
    registry: EndpointRegistry,
    prompts: PromptTokenizer,
    tenants: list[str],
    place: Callable[[int], int],
) -> None:
    """Every endpoint of ``registry`` publishes live KV events, and endpoint
    ``e<place(t)>`` holds tenant ``t``'s system prompt (its full blocks of 16
    tokens), as its engine would report after serving it."""
    from policies.blocks import EndpointBlocks

    held = []
    for state in registry.all():
        state.blocks = EndpointBlocks(state.id, 1_000_000)
        held.append(state.blocks)
    for t, system in enumerate(tenants):
        tokens = prompts.tokens("chat", tenant_chat(system, -1))
        assert tokens is not None
        ids = tokens.token_ids()
        full = len(ids) // 16 * 16
        held[place(t)].stored(list(range(t << 20, (t << 20) + full)), None, ids[:full], 16)
    for blocks in held:
        blocks.mark_live()


def candidate_views(registry: EndpointRegistry, body: dict[str, Any]) -> list[EndpointView]:
    """The router's step before ranking (``router/failover.py``): the
    endpoints of the model that admit requests now, and their views."""
    return registry.views("m", AdapterRequest(body))


def attempt(registry: EndpointRegistry, decision: Decision) -> None:
    """The chosen endpoint's in-flight count goes up and down, as a
    forwarded request's does: its kept view is rebuilt at the next decision."""
    state = registry.get(decision.ranked[0].id)
    assert state is not None
    state.begin(registry.clock()).end()


def decision_latency(
    endpoints: int = 64, prompt_chars: int = 32_000, n: int = 2000, **params: Any
) -> dict[str, float]:
    """prefix_affinity's decision time on a warm index: 200 tenants' prompts
    seen again (prefix hits), and prompts never seen (new prefixes). A
    decision is what the router does before forwarding: the candidates from
    the registry, their views, and the policy's ranking."""
    rng = random.Random(3)
    policy = build_policy("prefix_affinity", params, random.Random(0))
    registry = latency_fleet(endpoints, rng)
    tenants = [words(rng, prompt_chars // 4)[: prompt_chars - 100] for _ in range(200)]

    def timed(system: Callable[[int], str], count: int) -> list[float]:
        samples = []
        for k in range(count):
            body = {
                "model": "m",
                "messages": [
                    {"role": "system", "content": system(k)},
                    {"role": "user", "content": f"q{k}"},
                ],
            }
            req = RequestView(model="m", endpoint="chat", body=body)
            t0 = time.perf_counter()
            decision = policy.rank(req, candidate_views(registry, body))
            samples.append(time.perf_counter() - t0)
            attempt(registry, decision)
        return sorted(samples)

    timed(lambda k: tenants[k % 200], 500)  # every tenant seen at least twice: a warm index
    hits = timed(lambda k: tenants[k % 200], n)
    # A new first block each time, the rest as long as a tenant's prompt.
    new = timed(lambda k: f"new {k} " + tenants[k % 200], n)
    return {
        "endpoints": endpoints,
        "prompt_chars": prompt_chars,
        "p50_us": hits[len(hits) // 2] * 1e6,
        "p99_us": hits[int(len(hits) * 0.99)] * 1e6,
        "new_prefix_p50_us": new[len(new) // 2] * 1e6,
        "new_prefix_p99_us": new[int(len(new) * 0.99)] * 1e6,
    }


def null_work(n: int) -> int:
    """A fixed piece of pure Python work, the same instructions every call."""
    total = 0
    for i in range(n):
        total += i
    return total


def null_size(seconds: float) -> int:
    """``null_work``'s size that takes about ``seconds`` here (median of 200)."""
    n = 1000
    samples = []
    for _ in range(200):
        t0 = time.perf_counter()
        null_work(n)
        samples.append(time.perf_counter() - t0)
    return max(1, round(n * seconds / statistics.median(samples)))


def precise_decision_latency(
    endpoints: int = 64,
    prompt_chars: int = 32_000,
    n: int = 2000,
    tokenizer: str = str(ROOT / "tests" / "fixtures" / "tiny-llama"),
    question_chars: int = 0,
    **params: Any,
) -> dict[str, float]:
    """prefix_affinity on precise matches, the router's tokenizer in the loop:
    every endpoint publishes KV events (an EndpointBlocks fed by hand with
    the blocks of the tenants it served), each request is tokenized (chat
    template + tokenizer + block hashes: ``router/prompts.py``) and ranked
    over the registry's candidates and views. Hits: 200 tenants' system
    prompts seen before, a new question each time (the new piece is a miss,
    the system prompt a cache hit). New prefixes: a system prompt never seen,
    tokenized whole (in a thread on the router's request path: ``thread_s``;
    ``loop_us`` is what stays on the loop). Every question is new, in this
    run and in any later one in the process (the tokenizer's piece cache
    would otherwise skip the encoding): ``q`` and a number, after
    ``question_chars`` characters of words (0: none; a question's tokens
    cost ~0.15 us a character).

    ``floor_*``: the machine's own tail in the same run. After each timed
    decision a fixed piece of pure Python work (``null_work``) sized to the
    median of 200 decisions on the warm index is timed too: it runs the same
    instructions every time, so its spread is only what the machine (its
    scheduler, interrupts, the hypervisor, frequency changes) adds to any
    code of that length. A decision p99 near ``floor_p99_us`` is the
    machine's, not the decision's."""
    from router.prompts import load_prompt_tokenizer

    rng = random.Random(3)
    prompts = load_prompt_tokenizer(tokenizer)
    policy = build_policy("prefix_affinity", params, random.Random(0))
    registry = latency_fleet(endpoints, rng)
    tenants = [words(rng, prompt_chars // 4)[: prompt_chars - 100] for _ in range(200)]
    hold_tenants(registry, prompts, tenants, lambda t: t % endpoints)
    questions = [words(rng, question_chars // 3 + 1)[:question_chars] for _ in range(64)]

    def body(system: str) -> dict[str, Any]:
        serial = next(_QUESTIONS)
        return tenant_chat(system, serial, questions[serial % 64])

    floor_n = 0

    def timed(system: Callable[[int], str], count: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {
            "total": [],
            "tokenize": [],
            "rank": [],
            "loop": [],
            "floor": [],
        }
        for k in range(count):
            req = body(system(k))
            t0 = time.perf_counter()
            prompt = prompts.prompt("chat", req)
            assert isinstance(prompt, tuple)
            plan = prompts.plan(*prompt)
            t1 = time.perf_counter()
            encoded = prompts.encode_missing(plan)
            t2 = time.perf_counter()
            tokens = prompts.finish(plan, encoded)
            tokens.block_hashes(16)
            t3 = time.perf_counter()
            views = candidate_views(registry, req)
            decision = policy.rank(RequestView("m", "chat", req, tokens=tokens), views)
            t4 = time.perf_counter()
            # As the router's loop does once the request has gone on.
            prompts.check_format()
            attempt(registry, decision)
            policy.observe(decision, decision.ranked[0].id, Outcome(True))
            out["total"].append(t4 - t0)
            out["tokenize"].append(t3 - t0)
            out["rank"].append(t4 - t3)
            # With a miss past the threshold, encode_missing runs in a thread.
            big = plan.missing_chars > prompts.thread_chars
            out["loop"].append((t4 - t0) - (t2 - t1 if big else 0.0))
            if floor_n:
                t5 = time.perf_counter()
                null_work(floor_n)
                out["floor"].append(time.perf_counter() - t5)
        return {key: sorted(v) for key, v in out.items()}

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6

    timed(lambda k: tenants[k % 200], 400)  # warm: every tenant seen twice
    # The floor's size: the median of decisions on the warm index.
    floor_n = null_size(statistics.median(timed(lambda k: tenants[k % 200], 200)["total"]))
    hits = timed(lambda k: tenants[k % 200], n)
    new = timed(lambda k: f"new {k} " + tenants[k % 200], max(20, n // 50))
    reasons: collections.Counter[str] = collections.Counter()
    for k in range(200):
        req = body(tenants[k])
        tokens = prompts.tokens("chat", req)
        views = candidate_views(registry, req)
        reasons[policy.rank(RequestView("m", "chat", req, tokens=tokens), views).reason] += 1
    return {
        "endpoints": endpoints,
        "prompt_chars": prompt_chars,
        "p50_us": pct(hits["total"], 0.5),
        "p99_us": pct(hits["total"], 0.99),
        "tokenize_p50_us": pct(hits["tokenize"], 0.5),
        "tokenize_p99_us": pct(hits["tokenize"], 0.99),
        "rank_p50_us": pct(hits["rank"], 0.5),
        "rank_p99_us": pct(hits["rank"], 0.99),
        "floor_p50_us": pct(hits["floor"], 0.5),
        "floor_p99_us": pct(hits["floor"], 0.99),
        "new_prefix_loop_p50_us": pct(new["loop"], 0.5),
        "new_prefix_loop_p99_us": pct(new["loop"], 0.99),
        "new_prefix_total_p50_us": pct(new["total"], 0.5),
        "precise_hit_share": reasons["precise_hit"] / 200,
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
        for col, (phase, metric, label) in enumerate(
            (
                ("ramp", "hit_rate", "prefix-cache hit rate (ramp)"),
                ("saturated", "throughput", "req/s at saturation"),
                ("ramp", "ttft_p90", "TTFT p90 in the ramp (s, log)"),
            )
        ):
            ax = axes[row][col]
            width = 0.8 / len(POLICIES)
            for k, pol in enumerate(POLICIES):
                vals = [runs[w][pol][phase][metric] for w in names]
                ax.bar([x + k * width for x in range(len(names))], vals, width, label=pol)
            ax.set_xticks([x + (len(POLICIES) - 1) * width / 2 for x in range(len(names))])
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
    parser.add_argument(
        "--latency", action="store_true", help="decision latency only (printed, not saved)"
    )
    args = parser.parse_args()
    if args.latency:
        print("decision latency:", decision_latency(), flush=True)
        print("precise, tokenizer in the loop:", precise_decision_latency(), flush=True)
        print(
            "precise, 100-character questions:",
            precise_decision_latency(question_chars=100),
            flush=True,
        )
        return 0
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
    started = time.perf_counter()
    for n in fleets:
        results["runs"][str(n)] = {}
        for wname, make in WORKLOADS.items():
            wl = make(n)
            results["workloads"][wname] = wl.description
            row: dict[str, Any] = {pol: {} for pol in POLICIES}
            # Saturation: enough closed-loop clients to keep every replica's batch full.
            clients = 2 * ENGINE.max_num_seqs * n
            for pol in POLICIES:
                r = simulate(n, wl, pol, duration, clients=clients)
                row[pol]["saturated"] = dataclasses.asdict(r)
                report(n, wname, pol, "saturated", r, started)
            # Open loop: Poisson arrivals ramping to 1.5x round robin's saturation
            # throughput (for multi-turn: conversations, 8 requests each).
            peak = 1.5 * row["round_robin"]["saturated"]["throughput"]
            if wname == "multi_turn":
                peak /= 8
            for pol in POLICIES:
                r = simulate(n, wl, pol, duration, peak=peak)
                row[pol]["ramp"] = dataclasses.asdict(r)
                row[pol]["ramp"]["peak_rate"] = peak
                report(n, wname, pol, "ramp", r, started)
            results["runs"][str(n)][wname] = row
    print("decision latency ...", flush=True)
    results["decision_latency"] = decision_latency()
    print(results["decision_latency"], flush=True)
    results["decision_latency_ring1"] = decision_latency(ring_choices=1)
    print("ring_choices 1:", results["decision_latency_ring1"], flush=True)
    results["decision_latency_precise"] = precise_decision_latency()
    print("precise, tokenizer in the loop:", results["decision_latency_precise"], flush=True)
    results["decision_latency_precise_q100"] = precise_decision_latency(question_chars=100)
    print("precise, 100-character questions:", results["decision_latency_precise_q100"])
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


def report(n: int, workload: str, policy: str, phase: str, r: RunResult, started: float) -> None:
    print(
        f"[{time.perf_counter() - started:6.0f}s] {n:2d} replicas {workload:21s} {phase:9s} "
        f"{policy:16s} hit {r.hit_rate:5.1%}  ttft p50 {r.ttft_p50 * 1000:8.1f} ms "
        f"p90 {r.ttft_p90 * 1000:9.1f} ms  {r.throughput:6.1f} req/s  "
        f"imbalance {r.imbalance:4.2f}",
        flush=True,
    )


def targets(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, runs in results["runs"].items():
        sc = runs["shared_contexts"]
        pa, rr, orc = sc["prefix_affinity"], sc["round_robin"], sc["oracle"]
        out[f"{n}: shared_contexts saturated throughput pa/rr (>= 1.9)"] = round(
            pa["saturated"]["throughput"] / rr["saturated"]["throughput"], 2
        )
        out[f"{n}: shared_contexts ramp TTFT p90 rr/pa (>= 20)"] = round(
            rr["ramp"]["ttft_p90"] / pa["ramp"]["ttft_p90"], 1
        )
        out[f"{n}: shared_contexts ramp hit rate pa/oracle (>= 0.9)"] = round(
            pa["ramp"]["hit_rate"] / max(orc["ramp"]["hit_rate"], 1e-9), 3
        )
        ns = runs["no_sharing"]
        for q in ("ttft_p50", "ttft_p90"):
            best = min(SIMPLE, key=lambda pol: ns[pol]["ramp"][q])
            out[f"{n}: no_sharing ramp {q} pa/best simple policy (<= 1.05)"] = (
                f"{ns['prefix_affinity']['ramp'][q] / ns[best]['ramp'][q]:.2f} (best: {best})"
            )
        for w in ("shared_system_prompt", "no_sharing"):
            pa, ll = runs[w]["prefix_affinity"], runs[w]["least_load"]
            out[f"{n}: {w} ramp imbalance pa (<= 1.3)"] = round(pa["ramp"]["imbalance"], 2)
            out[f"{n}: {w} saturated throughput pa/least_load (>= 0.95)"] = round(
                pa["saturated"]["throughput"] / ll["saturated"]["throughput"], 3
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
