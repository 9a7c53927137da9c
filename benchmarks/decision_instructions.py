"""Instructions per routing decision, by stage, counted by valgrind's callgrind.

A wall clock on a shared 2-core machine moves by 2x between runs; an
instruction count does not. This runs ``routing.py``'s precise decision
(64 vLLM endpoints with live KV events, 20 tenants' 32k-character system
prompts cached, a new question each time, the tiny Llama's tokenizer) under
callgrind and reports, per decision, the instructions of:

- ``tokenize``: render the chat template, split, encode the new pieces, hash blocks;
- ``candidates+views``: the registry's admitted endpoints and their views;
- ``rank``: prefix_affinity's decision.

Each stage runs inside a C function nothing else calls (itertools' starmap,
dropwhile, takewhile), which ``--toggle-collect`` turns collection on for.
Callgrind counts a ``rep movsb`` copy byte by byte, so copies of the
32k-character prompt weigh more here than in time.

    .venv/bin/python benchmarks/decision_instructions.py [-n 200]
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
from collections import deque
from itertools import dropwhile, starmap, takewhile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "starmap_next": "tokenize",
    "dropwhile_next": "candidates+views",
    "takewhile_next": "rank",
}


def workload(n: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from routing import attempt, candidate_views, hold_tenants, latency_fleet, tenant_chat, words

    from policies.base import Outcome, RequestView
    from policies.registry import build_policy
    from router.prompts import load_prompt_tokenizer

    rng = random.Random(3)
    prompts = load_prompt_tokenizer(str(ROOT / "tests" / "fixtures" / "tiny-llama"))
    prompts.render_seconds = 60.0  # valgrind runs 50x slower
    policy = build_policy("prefix_affinity", {}, random.Random(0))
    registry = latency_fleet(64, rng)
    tenants = [words(rng, 8000)[:31_900] for _ in range(20)]
    hold_tenants(registry, prompts, tenants, lambda t: (t * 7) % 64)
    body = tenant_chat

    def one(k: int, measured: bool) -> None:
        req = body(tenants[k % len(tenants)], k)
        out: list[Any] = []

        def tok() -> None:
            tokens = prompts.tokens("chat", req)
            assert tokens is not None
            tokens.block_hashes(16)
            out.append(tokens)

        def rank() -> None:
            out.append(policy.rank(RequestView("m", "chat", req, tokens=out[0]), out[1]))

        if measured:
            deque(starmap(tok, [()]), maxlen=0)
            deque(dropwhile(lambda _: out.append(candidate_views(registry, req)), [0]), maxlen=0)
            deque(takewhile(lambda _: rank(), [0]), maxlen=0)
        else:
            tok()
            out.append(candidate_views(registry, req))
            rank()
        decision = out[2]
        attempt(registry, decision)
        policy.observe(decision, decision.ranked[0].id, Outcome(True))

    for k in range(60):
        one(k, False)
    for k in range(60, 60 + n):
        one(k, True)


def measure(n: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        toggles = [f"--toggle-collect={name}" for name in STAGES]
        command = [sys.executable, __file__, "--workload", "-n", str(n)]
        subprocess.run(
            ["valgrind", "--tool=callgrind", *toggles, f"--callgrind-out-file={out}", *command],
            check=True,
            capture_output=True,
            env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"},
        )
        report = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", str(out)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    counts = {}
    for line in report.splitlines():
        match = re.match(r"\s*([\d,]+) .*:(\w+_next) ", line)
        if match and match.group(2) in STAGES:
            counts[STAGES[match.group(2)]] = int(match.group(1).replace(",", "")) // n
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="decisions measured")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        workload(args.n)
        return
    counts = measure(args.n)
    for stage in STAGES.values():
        print(f"{stage:18s} {counts.get(stage, 0):>10,d} instructions per decision")
    print(f"{'total':18s} {sum(counts.values()):>10,d}")


if __name__ == "__main__":
    main()
