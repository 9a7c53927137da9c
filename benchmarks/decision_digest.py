"""A digest of many randomized prefix_affinity decisions, to show that a change
meant to make decisions faster makes the same decisions.

Run it in two checkouts (``git worktree add /tmp/old <commit>``) and compare
the digests: equal digests mean every ranking (the whole failover order),
reason, match length and prompt length of 3,600 decisions were equal. Fleets
of 1 to 24 endpoints; events live, stale and absent; prompts tokenized or
not; weights; in-flight counts; KV capacities; blocks stored and cleared by
the engine; failover to another endpoint; failed attempts. With
``--evictions`` the engines also free chains tail first (a digest of its own:
compare it with the same option in the other checkout, the harness copied
there if it predates the option).

    .venv/bin/python benchmarks/decision_digest.py [--seed N] [--evictions]

No scraped loads: the traffic-share estimate (``_learn_share``) is not
exercised, so a change to it does not change the digest.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies import EndpointView, RequestView, build_policy  # noqa: E402
from policies.base import Outcome  # noqa: E402
from policies.blocks import EndpointBlocks  # noqa: E402
from router.prompts import load_prompt_tokenizer  # noqa: E402

WORDS = ("alpha", "beta", "gamma", "delta", "eps")
PARAMS = ({}, {"min_overload": 4}, {"ring_choices": 1}, {"balance_abs_threshold": 2})


def digest(
    seed: int, trials: int = 60, steps: int = 60, evictions: bool = False
) -> tuple[int, str]:
    prompts = load_prompt_tokenizer(str(ROOT / "tests" / "fixtures" / "tiny-llama"))
    prompts.render_seconds = 30.0
    rng = random.Random(seed)
    systems = [
        f"S{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))
        for i in range(12)
    ]
    out = hashlib.sha256()
    count = 0
    for trial in range(trials):
        n = rng.randint(1, 24)
        policy = build_policy("prefix_affinity", rng.choice(PARAMS), random.Random(trial))
        blocks: dict[str, EndpointBlocks] = {}
        for i in range(n):
            if rng.random() < 0.5:
                b = blocks[f"e{i}"] = EndpointBlocks(f"e{i}", 100_000)
                if rng.random() < 0.8:
                    b.mark_live()
        use_tokens = rng.random() < 0.7
        in_flight = {f"e{i}": 0 for i in range(n)}
        chains: dict[str, list[list[int]]] = {}  # engine hashes stored, per endpoint
        for _ in range(steps):
            body = {
                "model": "m",
                "messages": [
                    {"role": "system", "content": rng.choice(systems)},
                    {"role": "user", "content": f"q{rng.randint(0, 5)}"},
                ],
            }
            tokens = prompts.tokens("chat", body) if use_tokens else None
            views = [
                EndpointView(
                    id=f"e{i}",
                    url=f"http://e{i}",
                    kind="vllm",
                    weight=rng.choice([1.0, 1.0, 2.0]),
                    in_flight=in_flight[f"e{i}"],
                    awaiting_first=rng.randint(0, in_flight[f"e{i}"]),
                    blocks=blocks.get(f"e{i}"),
                    kv_capacity_tokens=rng.choice([None, 4000, 20000]),
                )
                for i in range(n)
            ]
            rng.shuffle(views)
            d = policy.rank(RequestView("m", "chat", body, tokens=tokens), views)
            ranked = [e.id for e in d.ranked]
            out.update(repr((ranked, d.reason, d.match_len, d.prompt_len)).encode())
            count += 1
            chosen = ranked[0]
            if rng.random() < 0.5:
                in_flight[chosen] += 1
            elif in_flight[chosen]:
                in_flight[chosen] -= 1
            served = chosen if rng.random() < 0.9 else rng.choice(ranked)
            if tokens is not None and served in blocks and rng.random() < 0.7:
                ids = tokens.token_ids()
                full = len(ids) // 16 * 16
                base = rng.getrandbits(40) << 12
                engine = list(range(base, base + full // 16))
                blocks[served].stored(engine, None, ids[:full], 16)
                chains.setdefault(served, []).append(engine)
            if evictions and chains.get(served) and rng.random() < 0.3:
                # The engine frees a request's blocks tail first: some chain
                # loses its last few blocks (all of them, at times).
                chain = rng.choice(chains[served])
                cut = rng.randint(1, len(chain)) if chain else 0
                blocks[served].removed(chain[len(chain) - cut :])
                del chain[len(chain) - cut :]
            if rng.random() < 0.05 and served in blocks:
                blocks[served].cleared()
                chains.pop(served, None)
            ok = rng.random() < 0.9
            policy.observe(d, served, Outcome(ok, prompt_tokens=rng.choice([None, 500, 900])))
    return count, out.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--evictions",
        action="store_true",
        help="the engines also evict chains tail first (another digest than without)",
    )
    args = parser.parse_args()
    count, hexdigest = digest(args.seed, evictions=args.evictions)
    kind = ", evictions" if args.evictions else ""
    print(f"{count} decisions, seed {args.seed}{kind}: {hexdigest}")


if __name__ == "__main__":
    main()
