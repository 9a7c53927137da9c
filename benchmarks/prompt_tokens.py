"""What tokenizing prompts costs the router (router/prompts.py), and whether its
piece-wise encoding equals whole-text encoding.

    .venv/bin/python benchmarks/prompt_tokens.py [--tokenizer DIR_OR_JSON ...]
        [--train-bpe OUT_DIR]   # first train a 32k byte-level BPE on the stdlib

Default tokenizer: the tiny Llama's (tests/fixtures/tiny-llama, vocabulary
2048). Prints a JSON line per tokenizer; timings are the median of repeats
(the machine is shared: medians, not minima, and noisy).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.templates import PRESETS, render  # noqa: E402
from router.prompts import PromptTokenizer, load_prompt_tokenizer  # noqa: E402

SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def stdlib_text() -> str:
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    return "".join(Path(f).read_text(errors="ignore") for f in files[:60])


def train_bpe(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train(files[:3000], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def median_us(fn: Callable[[int], Any], repeats: int) -> float:
    samples = []
    for k in range(repeats):
        t0 = time.perf_counter()
        fn(k)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def measure(path: str, chars: int = 32_000) -> dict[str, Any]:
    loaded = load_prompt_tokenizer(path)
    template = loaded.chat_template or PRESETS["chatml"]
    pt = PromptTokenizer(loaded.tokenizer, template, loaded.special_tokens)
    code = stdlib_text()
    rng = random.Random(1)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was"]
    prose = " ".join(rng.choice(words) for _ in range(chars // 3))[:chars]
    out: dict[str, Any] = {"tokenizer": path, "prompt_chars": chars}
    for name, text in (("code", code[:chars]), ("prose", prose)):
        encoding = pt.tokenizer.encode(text, add_special_tokens=False)
        out[f"{name}_tokens"] = len(encoding.ids)
        out[f"{name}_encode_whole_us"] = median_us(
            lambda k, text=text: pt.tokenizer.encode(text, add_special_tokens=False), 15
        )
    systems = [code[i * chars : (i + 1) * chars] for i in range(4)]

    def chat(k: int, system: str) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question {k}: what does this do?"},
            ]
        }

    # Cold: a system prompt never seen (all of it encoded).
    cold = [chat(k, f"{k} " + systems[k % 4]) for k in range(10)]
    out["chat_cold_us"] = median_us(lambda k: pt.tokens("chat", cold[k]), 10)
    # Warm: the system prompt seen before; the question is new.
    for k, system in enumerate(systems):
        warm_tokens = pt.tokens("chat", chat(-k, system))
        assert warm_tokens is not None
        warm_tokens.block_hashes(16)
    out["chat_warm_us"] = median_us(lambda k: pt.tokens("chat", chat(k, systems[k % 4])), 400)
    out["chat_warm_with_hashes_us"] = median_us(
        lambda k: pt.tokens("chat", chat(1000 + k, systems[k % 4])).block_hashes(16),  # type: ignore[union-attr]
        400,
    )
    # Equality with whole-text encoding on many prompts: fragments of code,
    # prose and whitespace around the added tokens, and rendered chats.
    mismatches = checked = 0
    for k in range(2000):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.3:
                parts.append(rng.choice(SPECIALS))
            else:
                start = rng.randrange(len(code) - 400)
                parts.append(code[start : start + rng.randint(0, 400)])
        text = "".join(parts)
        if k % 2:
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]
            text = render(template, messages)
        tokens = pt.tokens("completion", {"prompt": text})
        assert tokens is not None
        checked += 1
        mismatches += tokens.token_ids() != pt.tokenizer.encode(text).ids
    out["separable"] = pt.separable
    out["equality_checked"] = checked
    out["equality_mismatches"] = mismatches
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", action="append", default=[])
    parser.add_argument("--train-bpe", type=Path)
    args = parser.parse_args()
    paths = args.tokenizer or [str(ROOT / "tests" / "fixtures" / "tiny-llama")]
    if args.train_bpe:
        paths.append(str(train_bpe(args.train_bpe)))
    for path in paths:
        print(json.dumps(measure(path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
