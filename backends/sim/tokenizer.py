"""The simulators' tokenizer and chat template: deterministic, dependency-free.

Text is split like a byte-level BPE would roughly split English: a word
with its leading space is one token (long words are cut every 6 characters),
every other character is a token of its own, and runs of whitespace are one
token. That gives about 4 characters per token on prose, like real
tokenizers, and - as with real BPE - the tokens of a text are a prefix of
the tokens of any longer text that extends it at a word boundary.

``tokenizer_json()`` is the same split as a Hugging Face ``tokenizer.json``,
for a router that should count tokens as the simulated model does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash

_TOKEN = re.compile(r" ?[A-Za-z]{1,6}| ?[0-9]|\s+|[^\sA-Za-z0-9]")
VOCAB_SIZE = 32000


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def tokenizer_json() -> str:
    """A ``tokenizer.json`` that counts every text as ``tokenize`` does (one
    word-level token per piece; its ids are not the simulators')."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN.pattern), behavior="isolated")
    return tokenizer.to_str()


def token_ids(tokens: Iterable[str]) -> list[int]:
    return [xxhash.xxh32_intdigest(tok.encode()) % VOCAB_SIZE for tok in tokens]


def content_text(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, Mapping):
                if part.get("type") == "text":
                    out.append(str(part.get("text", "")))
                else:
                    out.append(f"<{part.get('type', 'part')}>")
        return "".join(out)
    return str(content)


def render_chatml(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """ChatML, the template the simulated models use."""
    parts = [
        f"<|im_start|>{m.get('role', 'user')}\n{content_text(m.get('content'))}<|im_end|>\n"
        for m in messages
    ]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
