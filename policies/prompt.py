"""Prompts as chains of block hashes, independent of any chat template.

The canonical text of a chat request is its messages in order, each as role
and content between separators; a completion's prompt is taken as is. Text
parts count by their text, other parts (images, audio) by a hash of their
JSON, so two requests share a canonical prefix exactly when they share a
prefix of messages (and of the last shared message's content).

The text is cut into blocks of ``block_chars`` characters; each block's hash
is seeded with the previous block's, so a hash stands for everything before
it too. The first seed is the model's name: the same prompt sent to two
models shares nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import xxhash

ROLE_SEP = "\x1f"
MESSAGE_SEP = "\x1e"


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            else:
                digest = xxhash.xxh3_64_hexdigest(orjson.dumps(part, option=orjson.OPT_SORT_KEYS))
                out.append(f"\x1d{digest}\x1d")
        return "".join(out)
    return str(content)


def canonical_prompt(body: Mapping[str, Any]) -> str:
    """The request's prompt as one string; "" when it has none we understand."""
    messages = body.get("messages")
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        parts: list[str] = []
        for m in messages:
            if isinstance(m, Mapping):
                parts.append(f"{m.get('role', '')}{ROLE_SEP}{_content(m.get('content'))}")
                parts.append(MESSAGE_SEP)
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return MESSAGE_SEP.join(prompt)
        return orjson.dumps(prompt).decode()
    inputs = body.get("input")
    if isinstance(inputs, str):
        return inputs
    return ""


def model_seed(model: str) -> int:
    return xxhash.xxh3_64_intdigest(model.encode())


def block_hashes(text: str, block_chars: int, seed: int) -> list[int]:
    """Chained hashes of the blocks of ``text``; a final partial block counts too.

    The partial block lets a short prompt still have an identity (for the
    ring); it is only ever matched by an identical prompt.
    """
    out: list[int] = []
    h = seed
    data = text.encode("utf-8", "surrogatepass")
    # Characters, not bytes, define the blocks (so non-ASCII text does not shift them).
    if len(data) == len(text):
        view = memoryview(data)
        digest = xxhash.xxh3_64_intdigest
        for start in range(0, len(data), block_chars):
            h = digest(view[start : start + block_chars], h)
            out.append(h)
    else:
        for start in range(0, len(text), block_chars):
            chunk = text[start : start + block_chars].encode("utf-8", "surrogatepass")
            h = xxhash.xxh3_64_intdigest(chunk, h)
            out.append(h)
    return out
