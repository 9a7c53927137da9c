"""The simulated inference engine shared by every simulator face.

It runs vLLM's loop in miniature: continuous batching in discrete steps.
Each step decodes one token for every running sequence and spends what is
left of a token budget on prefill (chunked prefill), then takes as long as
the latency model says:

    step_seconds = step_base + prefill_tokens * prefill_per_token
                              + decode_seqs * decode_per_seq

times a step-time jitter when ``step_jitter`` (sigma) is above 0: a lognormal
factor of mean 1, drawn per step from a generator seeded by ``seed`` (the same
seed, the same sequence). A real CPU engine's step is computation on a core it
shares, and it stretches step to step with contention; a sleep of a fixed
length does not, which left the simulator's TTFT tail too short. Measured on
real vLLM CPU (benchmarks/calibrate_sim.py --jitter,
results/calibration_jitter.json): per-token gaps of streamed answers through
kvroute under load, each over the median gap (12.3 ms), had p90/p50 2.16
(lognormal sigma 0.60, CV 1.27, p99/p50 10.5) against 1.78 (sigma 0.45) for
the simulator without jitter; the difference, sigma 0.40, is the
``vllm-cpu-tiny`` profile's value (simulated with it: p90/p50 2.14). vLLM's
own ``vllm:inter_token_latency_seconds`` histogram (buckets at 10, 25, 50 ms)
puts its p90/p50 in that phase near 1.6: part of the client-side spread is the
real server's front end, which the simulator folds into the step. The
factor is independent step to step, so bursts of contention that stretch many
steps in a row, and the real p99, are not modelled by it; ``step_stall`` (off
in every profile: a chance per step fitted to a real probe by
``sim_fidelity.py --fit-stall``) adds steps ten times as long, the flat tail
real vLLM CPU's TTFTs show past their 75th percentile. That tail is the test
bed's (two vLLM servers of three processes each, the client and kvroute on
two cores: the operating system's scheduling switches it between behaviours
minute to minute; benchmarks/README.md, "Where the real TTFT tail comes
from"), which is why no profile turns the stall on. Every other use of the
simulator (default parameters, ``--zero-latency``) has no jitter and no stall.

So TTFT grows with uncached prompt tokens and with queueing (past
``max_num_seqs`` or when the KV cache is full, requests wait), cached
prefix tokens skip prefill entirely, and throughput saturates the way a real
engine's does. With every latency parameter at zero the engine only yields
to the event loop between steps (the overhead benchmark's backend).

The engine keeps its own truth - prefix-cache queries and hits in tokens,
requests by finish reason - which the faces publish under the backend's
metric names. Benchmarks read hit rates from there, never from the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from backends.sim.kvcache import Block, PrefixCache, block_hashes
from backends.sim.model import SimModel
from backends.sim.tokenizer import render_chatml, token_ids, tokenize

# Each is one token of the simulators' tokenizer (a word of at most 6 letters).
_WORD_LIST = (
    "the of and to in is that it for on with as was at by this be from or have an are"
    " not but what all were when we there can more if will one about so up out into"
    " model cache token route prefix server batch stream"
)
WORDS = tuple(" " + word for word in _WORD_LIST.split())


@dataclass(frozen=True)
class EngineParams:
    block_size: int = 16
    num_blocks: int = 2049
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int = 8192
    step_base: float = 0.005
    prefill_per_token: float = 0.0001
    decode_per_seq: float = 0.0002
    seed: int = 0
    #: A Hugging Face model directory (or its tokenizer.json) whose tokenizer and
    #: chat template to use instead of the built-in ones (backends/sim/model.py).
    tokenizer: str | None = None
    #: Seconds a request spends before the scheduler sees it (a real server's
    #: front end: parsing, tokenizing, handing it to the engine process).
    request_overhead: float = 0.0
    #: Sigma of the lognormal factor (mean 1) each step's time is multiplied
    #: by; 0 for none. Drawn from a generator seeded by ``seed``.
    step_jitter: float = 0.0
    #: The chance that a step stalls: its time (jitter included) times
    #: ``STALL_FACTOR``; 0 for none. Drawn from the jitter's generator.
    step_stall: float = 0.0

    def __post_init__(self) -> None:
        if self.step_jitter < 0:
            raise ValueError(f"step_jitter must be >= 0, got {self.step_jitter}")
        if not 0 <= self.step_stall < 1:
            raise ValueError(f"step_stall must be in [0, 1), got {self.step_stall}")

    @classmethod
    def zero_latency(cls, **kw: int | float) -> EngineParams:
        return cls(step_base=0.0, prefill_per_token=0.0, decode_per_seq=0.0, **kw)  # type: ignore[arg-type]

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> EngineParams:
        """A named profile fitted to a real engine (backends/sim/profiles.py),
        with ``overrides`` (e.g. ``num_blocks``, ``tokenizer``) on top."""
        from backends.sim.profiles import PROFILES

        if name not in PROFILES:
            raise ValueError(f"unknown engine profile '{name}' (known: {', '.join(PROFILES)})")
        return cls(**{**PROFILES[name], **overrides})


@dataclass(eq=False)
class Sequence_:
    prompt_ids: list[int]
    #: Prompt then output token ids, as far as emitted; full blocks get hashed.
    all_ids: list[int]
    max_tokens: int
    finish_reason: str
    output: list[str]
    arrival: float
    hashes: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    computed: int = 0
    hit_tokens: int = 0
    preemptions: int = 0
    created_cache_tokens: int = 0
    emitted: int = 0
    first_token_at: float | None = None
    done: bool = False
    aborted: bool = False
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_tokens(self) -> int:
        return self.num_prompt + self.emitted


@dataclass(frozen=True, slots=True)
class Step:
    prefill: list[tuple[Sequence_, int]]
    decodes: list[Sequence_]
    seconds: float


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queries: int = 0
    hits: int = 0
    finished: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}
    )
    requests: int = 0
    preemptions: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0


class PromptTooLong(ValueError):
    def __init__(self, n: int, limit: int) -> None:
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains at least {n} input tokens, which exceeds this limit even without any "
            f"output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={n})"
        )


def generate_text(prompt: str, n: int, seed: int) -> list[str]:
    """Deterministic output tokens: the same prompt and seed give the same text."""
    rng = random.Random(xxhash.xxh64_intdigest(prompt.encode(), seed=seed))
    return [rng.choice(WORDS) for _ in range(n)]


#: A stalled step's time over an ordinary one's (``step_stall``).
STALL_FACTOR = 10.0


class StepJitter:
    """The multiplicative noise on step time: a lognormal factor with mean 1
    (``mu = -sigma**2 / 2``), so the mean step keeps the fitted length and the
    median is ``exp(-sigma**2 / 2)`` of it. Its own generator, seeded by the
    engine's seed: the same seed draws the same sequence, and the draws touch
    nothing else (output text, EOS lengths). With sigma 0 every factor is 1.0
    and nothing is drawn.

    With ``stall`` above 0, each step also stalls with that chance: its time
    is ``STALL_FACTOR`` times longer, and every request in it or queued
    behind it waits that long. Real vLLM CPU's TTFTs have that shape: up to
    their 75th percentile the jittered simulator follows them, past it they
    spread into a flat tail to 8-10 times the median (benchmarks/README.md,
    "The same interleaved run on a quiet machine"), which a lognormal per
    step does not give at any sigma. One more draw a step; none at 0."""

    def __init__(self, sigma: float, seed: int, stall: float = 0.0) -> None:
        self.sigma = sigma
        self.stall = stall
        self._mu = -sigma * sigma / 2
        # A stream of its own, apart from the other users of ``seed``.
        self._rng = random.Random(xxhash.xxh64_intdigest(b"step-jitter", seed=seed))

    def factor(self) -> float:
        factor = 1.0 if self.sigma == 0 else self._rng.lognormvariate(self._mu, self.sigma)
        if self.stall and self._rng.random() < self.stall:
            factor *= STALL_FACTOR
        return factor


class Engine:
    def __init__(self, params: EngineParams) -> None:
        self.params = params
        self.cache = PrefixCache(params.num_blocks, params.block_size)
        self.stats = EngineStats()
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.model: SimModel | None = SimModel(params.tokenizer) if params.tokenizer else None
        self.jitter = StepJitter(params.step_jitter, params.seed, params.step_stall)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(
        self,
        prompt: str,
        max_tokens: int | None,
        seed: int | None = None,
        now: float | None = None,
        run: bool = True,
        add_special_tokens: bool = False,
    ) -> Sequence_:
        """Queue a generation. ``now`` and ``run=False`` are for virtual time: the
        caller then drives ``plan_step``/``finish_step`` itself.
        ``add_special_tokens``: let the model's tokenizer add its special tokens
        (vLLM does for completions, not for rendered chats)."""
        ids = self.encode(prompt, add_special_tokens)
        n = len(ids)
        if n + 1 > self.params.max_model_len:
            raise PromptTooLong(n, self.params.max_model_len)
        if max_tokens is None:
            # An EOS from a model we do not run: a length drawn from the prompt.
            rng = random.Random(xxhash.xxh64_intdigest(prompt.encode(), seed=self.params.seed))
            length, reason = rng.randint(8, 64), "stop"
        else:
            length, reason = max_tokens, "length"
        length = max(0, min(length, self.params.max_model_len - n))
        seq_seed = self.params.seed if seed is None else seed
        seq = Sequence_(
            prompt_ids=ids,
            all_ids=list(ids),
            max_tokens=length,
            finish_reason=reason,
            output=generate_text(prompt, length, seq_seed),
            arrival=time.monotonic() if now is None else now,
        )
        seq.hashes = block_hashes(seq.prompt_ids, self.params.block_size)
        self.stats.requests += 1
        self.waiting.append(seq)
        if run:
            self._wake.set()
            self.start()
        return seq

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids: the built-in tokenizer, or the model's (to match a real
        engine's model exactly)."""
        if self.model is not None:
            return self.model.encode(text, add_special_tokens)
        return token_ids(tokenize(text))

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """A chat's prompt: the model's chat template, or ChatML without a model."""
        if self.model is not None:
            return self.model.render_chat(messages)
        return render_chatml(messages)

    def abort(self, seq: Sequence_) -> None:
        """The client went away: stop the sequence and give back its blocks."""
        if seq.done:
            return
        seq.done = seq.aborted = True
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free(seq.blocks)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.blocks = []
        self.stats.finished["abort"] += 1
        self._wake.set()

    # -- the loop -----------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            step = self.plan_step()
            if step is None:
                # Nothing fits (the cache is full of running sequences): wait for a change.
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(step.seconds)
            self.finish_step(step, time.monotonic())

    # -- one step, for the loop above or a discrete-event harness (virtual time) --

    def plan_step(self) -> Step | None:
        """Schedule the next step; None when nothing can run."""
        p = self.params
        prefill, decodes = self._schedule()
        if not prefill and not decodes:
            return None
        prefill_tokens = sum(n for _, n in prefill)
        seconds = (
            p.step_base + prefill_tokens * p.prefill_per_token + len(decodes) * p.decode_per_seq
        )
        return Step(prefill, decodes, seconds * self.jitter.factor())

    def finish_step(self, step: Step, now: float) -> None:
        self._advance(step.prefill, step.decodes, now)

    def _schedule(self) -> tuple[list[tuple[Sequence_, int]], list[Sequence_]]:
        p = self.params
        budget = p.max_batched_tokens
        decodes: list[Sequence_] = []
        prefill: list[tuple[Sequence_, int]] = []
        for seq in list(self.running):
            if seq.done:
                continue
            if seq.computed < seq.num_prompt:
                n = min(seq.num_prompt - seq.computed, budget)
                if n > 0:
                    prefill.append((seq, n))
                    budget -= n
                continue
            if not self._reserve(seq, seq.total_tokens + 1):
                self._preempt(seq)
                continue
            decodes.append(seq)
            budget -= 1
        while self.waiting and len(self.running) < p.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_prompt - seq.computed, budget)
            prefill.append((seq, n))
            budget -= n
        return prefill, decodes

    def _admit(self, seq: Sequence_) -> bool:
        hit = self.cache.longest_hit(seq.hashes, seq.num_prompt)
        need = -(-seq.num_prompt // self.params.block_size) - len(hit)
        evictable_hits = sum(1 for b in hit if b.ref == 0)
        if need > self.cache.free_blocks - evictable_hits:
            return False
        self.cache.touch(hit)
        fresh = self.cache.allocate(need)
        assert fresh is not None
        seq.blocks = hit + fresh
        seq.computed = len(hit) * self.params.block_size
        if seq.preemptions:
            # vLLM keeps a preempted request's recompute out of its prefix-cache
            # counters (PrefixCacheStats.preempted_*) and out of its usage.
            self.stats.preempted_queries += seq.num_prompt
            self.stats.preempted_hits += seq.computed
            return True
        seq.hit_tokens = seq.computed
        seq.created_cache_tokens = (len(seq.hashes) - len(hit)) * self.params.block_size
        self.stats.queries += seq.num_prompt
        self.stats.hits += seq.hit_tokens
        self.stats.prompt_tokens += seq.num_prompt
        return True

    def _reserve(self, seq: Sequence_, tokens: int) -> bool:
        need = -(-tokens // self.params.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        fresh = self.cache.allocate(need)
        if fresh is None:
            return False
        seq.blocks.extend(fresh)
        return True

    def _preempt(self, seq: Sequence_) -> None:
        # vLLM recomputes a preempted sequence from scratch later.
        self.stats.preemptions += 1
        seq.preemptions += 1
        self.running.remove(seq)
        self.cache.free(seq.blocks)
        seq.blocks = []
        seq.computed = 0
        self.waiting.appendleft(seq)

    def _advance(
        self, prefill: Sequence[tuple[Sequence_, int]], decodes: Sequence[Sequence_], now: float
    ) -> None:
        bs = self.params.block_size
        for seq, n in prefill:
            if seq.done:
                continue
            seq.computed += n
            full = min(seq.computed // bs, len(seq.hashes), len(seq.blocks))
            for i in range(full):
                parent = seq.hashes[i - 1] if i else None
                self.cache.commit(seq.blocks[i], seq.hashes[i], seq.all_ids, i, parent)
            if seq.computed >= seq.num_prompt:
                self._emit(seq, now)
        for seq in decodes:
            if not seq.done:
                self._emit(seq, now)
        if any(s.done for s in self.running):
            self.running = [s for s in self.running if not s.done]

    def _cache_output(self, seq: Sequence_, token: str) -> None:
        # vLLM caches full blocks of generated tokens too (a later turn of a
        # conversation can hit them).
        bs = self.params.block_size
        seq.all_ids.extend(token_ids((token,)))
        while len(seq.hashes) < len(seq.all_ids) // bs:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else 0
            h = block_hashes(seq.all_ids[i * bs : (i + 1) * bs], bs, parent)[0]
            seq.hashes.append(h)
            if i < len(seq.blocks):
                self.cache.commit(seq.blocks[i], h, seq.all_ids, i, parent if i else None)

    def _emit(self, seq: Sequence_, now: float) -> None:
        if seq.emitted < seq.max_tokens:
            token = seq.output[seq.emitted]
            seq.queue.put_nowait(token)
            seq.emitted += 1
            self._cache_output(seq, token)
            self.stats.generation_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
        if seq.emitted >= seq.max_tokens:
            seq.done = True
            self.cache.free(seq.blocks)
            seq.blocks = []
            self.stats.finished[seq.finish_reason] += 1
            seq.queue.put_nowait(None)
            self._wake.set()
