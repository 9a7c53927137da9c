"""``kvroute simulate``: one simulated backend as a real HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Generator, Sequence

import uvicorn

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from backends.sim.kvevents import KVEventPublisher, PublisherConfig
from backends.sim.profiles import PROFILES
from backends.sim.tgi import TGISimulator
from backends.sim.triton import TritonSimulator
from backends.sim.vllm import VLLMSimulator

Simulator = VLLMSimulator | TGISimulator | TritonSimulator
SIMULATORS: dict[str, type[Simulator]] = {
    "vllm": VLLMSimulator,
    "tgi": TGISimulator,
    "triton": TritonSimulator,
}
KINDS = tuple(SIMULATORS)


def seconds(text: str) -> float:
    """A latency flag's value: a finite number, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def chance(text: str) -> float:
    """A probability flag's value: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def build_simulator(
    kind: str, models: Sequence[str], params: EngineParams, faults: Faults | None = None
) -> Simulator:
    if kind not in SIMULATORS:
        raise ValueError(f"unknown simulator kind '{kind}' (known: {', '.join(KINDS)})")
    return SIMULATORS[kind](models, params, faults)


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    d = EngineParams()
    p.add_argument("--kind", choices=KINDS, default="vllm")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model name it serves (repeat for more names)",
    )
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    g.add_argument(
        "--num-blocks",
        type=int,
        default=d.num_blocks,
        help="KV blocks, one of them reserved (vLLM's null block)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="sequences decoded together; more wait",
    )
    g.add_argument(
        "--max-batched-tokens",
        type=int,
        default=d.max_batched_tokens,
        help="token budget of one step (decode + chunked prefill)",
    )
    g.add_argument("--max-model-len", type=int, default=d.max_model_len)
    g.add_argument("--step-base", type=seconds, default=d.step_base, help="seconds per step")
    g.add_argument(
        "--prefill-per-token",
        type=seconds,
        default=d.prefill_per_token,
        help="seconds per uncached prompt token",
    )
    g.add_argument(
        "--decode-per-seq",
        type=seconds,
        default=d.decode_per_seq,
        help="seconds per decoding sequence in a step",
    )
    g.add_argument(
        "--zero-latency",
        action="store_true",
        help="all latency parameters 0: steps only yield to the event loop",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--tokenizer",
        help="a Hugging Face model directory or its tokenizer.json: count tokens with its "
        "tokenizer and render chats with its chat template, as vLLM does",
    )
    g.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="a latency model and batch limits fitted to a real engine "
        "(backends/sim/profiles.py); engine flags given with other values than their "
        "defaults override it",
    )
    g.add_argument(
        "--request-overhead",
        type=seconds,
        default=d.request_overhead,
        help="seconds before the scheduler sees a request (a real server's front end)",
    )
    g.add_argument(
        "--step-jitter",
        type=seconds,
        default=d.step_jitter,
        help="sigma of a lognormal factor (mean 1, seeded by --seed) on every step's time; "
        "0 for none",
    )
    g.add_argument(
        "--step-stall",
        type=chance,
        default=d.step_stall,
        help="the chance that a step stalls (takes 10x as long; seeded by --seed); 0 for none",
    )
    g.add_argument(
        "--kv-events-config",
        help='publish KV-cache events as vLLM does, e.g. \'{"enable_kv_cache_events": true, '
        '"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' '
        "(vLLM kind only)",
    )
    f = p.add_argument_group("faults")
    f.add_argument("--fail-rate", type=float, default=0.0)
    f.add_argument("--fail-status", type=int, default=500)
    f.add_argument(
        "--stall", type=float, default=0.0, help="seconds before answering; negative hangs"
    )
    f.add_argument(
        "--die-after-chunks",
        type=int,
        default=-1,
        help="cut streams after N chunks (0: before the first; negative: never)",
    )
    f.add_argument("--log-level", default="warning")


def params_from_args(args: argparse.Namespace) -> EngineParams:
    profile = getattr(args, "profile", None)
    if profile:
        return profile_params_from_args(args, profile)
    latency = (
        (0.0, 0.0, 0.0)
        if args.zero_latency
        else (args.step_base, args.prefill_per_token, args.decode_per_seq)
    )
    return EngineParams(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        max_model_len=args.max_model_len,
        step_base=latency[0],
        prefill_per_token=latency[1],
        decode_per_seq=latency[2],
        seed=args.seed,
        tokenizer=args.tokenizer,
        request_overhead=0.0 if args.zero_latency else args.request_overhead,
        step_jitter=0.0 if args.zero_latency else args.step_jitter,
        step_stall=0.0 if args.zero_latency else args.step_stall,
    )


def profile_params_from_args(args: argparse.Namespace, profile: str) -> EngineParams:
    """A named profile; engine flags whose value differs from the built-in
    default override it (a flag set to its default leaves the profile's value)."""
    d = EngineParams()
    names = (
        "block_size",
        "num_blocks",
        "max_num_seqs",
        "max_batched_tokens",
        "max_model_len",
        "step_base",
        "prefill_per_token",
        "decode_per_seq",
        "request_overhead",
        "step_jitter",
        "step_stall",
        "seed",
    )
    overrides: dict[str, object] = {
        name: getattr(args, name)
        for name in names
        if getattr(args, name, getattr(d, name)) != getattr(d, name)
    }
    if args.tokenizer:
        overrides["tokenizer"] = args.tokenizer
    if args.zero_latency:
        overrides.update(step_base=0.0, prefill_per_token=0.0, decode_per_seq=0.0)
        overrides["request_overhead"] = 0.0
        overrides["step_jitter"] = 0.0
        overrides["step_stall"] = 0.0
    return EngineParams.profile(profile, **overrides)


async def run_simulator(args: argparse.Namespace) -> int:
    """Serve one simulator until SIGINT/SIGTERM (uvicorn's own handling)."""
    faults = Faults(
        fail_rate=args.fail_rate,
        fail_status=args.fail_status,
        stall=args.stall,
        die_after_chunks=args.die_after_chunks,
    )
    sim = build_simulator(args.kind, args.model, params_from_args(args), faults)
    publisher = None
    if args.kv_events_config:
        events = PublisherConfig.from_json(args.kv_events_config)
        if events is not None:
            publisher = KVEventPublisher(events)
            await publisher.start()
            sim.engine.cache.events = publisher
    config = uvicorn.Config(
        sim.app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http="httptools",
        lifespan="on",
        access_log=False,
    )
    try:
        await QuietExitServer(config).serve()
    finally:
        if publisher is not None:
            await publisher.close()
    return 0


class QuietExitServer(uvicorn.Server):
    """Stops gracefully on SIGINT/SIGTERM and exits 0 (uvicorn's own handling
    raises the signal again once stopped, so the process dies of it).

    Once started it freezes what exists (``gc.freeze``), as kvroute's own
    server does: a full collection walked it all again, 33-70 ms of a
    simulator's CPU on this machine, inside whatever step or chat render was
    running (0.9 ms after the freeze). That pause is the simulator's, not
    the engine's it stands for."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            gc.freeze()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
