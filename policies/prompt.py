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
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from policies.chain_states import ChainStates

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


def _roles_and_contents(body: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """A chat request's messages as (role, content text) (None: not a chat)."""
    messages = body.get("messages")
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        return [
            (str(m.get("role", "")), _content(m.get("content")))
            for m in messages
            if isinstance(m, Mapping)
        ]
    return None


def message_parts(body: Mapping[str, Any]) -> list[str] | None:
    """A chat request's canonical prompt, one string per message (None: not a chat)."""
    messages = _roles_and_contents(body)
    if messages is None:
        return None
    return [f"{role}{ROLE_SEP}{content}{MESSAGE_SEP}" for role, content in messages]


def prompt_head(body: Mapping[str, Any], chars: int) -> tuple[str, int] | None:
    """A chat request's canonical prompt cut to its first ``chars`` characters,
    and the whole prompt's length (None: not a chat): ``message_parts`` joined
    and cut, without copying a long system prompt's text to read its head."""
    messages = _roles_and_contents(body)
    if messages is None:
        return None
    head: list[str] = []
    taken = total = 0
    for role, content in messages:
        total += len(role) + len(content) + 2
        if taken < chars:
            part = f"{role}{ROLE_SEP}{content[: chars - taken]}{MESSAGE_SEP}"
            head.append(part)
            taken += len(part)
    return "".join(head)[:chars], total


def prompt_chars(body: Mapping[str, Any]) -> int:
    """The length of ``canonical_prompt(body)``, without joining a chat's messages."""
    messages = _roles_and_contents(body)
    if messages is None:
        return len(canonical_prompt(body))
    return sum(len(role) + len(content) + 2 for role, content in messages)


def canonical_prompt(body: Mapping[str, Any]) -> str:
    """The request's prompt as one string; "" when it has none we understand."""
    parts = message_parts(body)
    if parts is not None:
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


#: Hashes kept across all of a ``CharChains``' states (8 bytes each and the
#: ints they share): 200,000 is 1,600 prompts of 32k characters.
MAX_CHAIN_HASHES = 200_000


@dataclass(frozen=True, slots=True)
class _Chain:
    """The chain after a prefix of messages: its full blocks' hashes (never
    mutated) and the characters of the unfinished block."""

    hashes: list[int]
    tail: str

    def extend(self, text: str, block_chars: int, seed: int) -> _Chain:
        data = self.tail + text if self.tail else text
        full = len(data) - len(data) % block_chars
        if not full:
            return _Chain(self.hashes, data)
        h = self.hashes[-1] if self.hashes else seed
        new = block_hashes(data[:full], block_chars, h)
        return _Chain(self.hashes + new, data[full:])


class CharChains:
    """``block_hashes`` of chat prompts, cached by prefix of messages.

    A chat's canonical prompt is its messages one after another, so the hash
    chain after the first ``k`` messages depends on them alone: a prompt
    whose leading messages were seen (a shared system prompt, a
    conversation's earlier turns) hashes only the messages after them. A
    message prefix is named by chaining each message's 128-bit xxh3 (2 us
    for 32k characters, against 20 us to hash its blocks one by one).
    Hashes are ``block_hashes``' exactly (tested). Bounded by the hashes the
    states hold; least recently used out first."""

    def __init__(self, block_chars: int, max_hashes: int = MAX_CHAIN_HASHES) -> None:
        self.block_chars = block_chars
        self._states: ChainStates[int, _Chain] = ChainStates(max_hashes)

    def __len__(self) -> int:
        return len(self._states)

    @property
    def held(self) -> int:
        """Hashes held across the cached states."""
        return self._states.held

    def hashes(self, parts: Sequence[str], seed: int) -> list[int]:
        """``block_hashes("".join(parts), block_chars, seed)``."""
        digest128, digest64 = xxhash.xxh3_128_digest, xxhash.xxh3_64_intdigest
        keys: list[int] = []
        key = seed
        for part in parts:
            key = digest64(digest128(part.encode("utf-8", "surrogatepass")), key)
            keys.append(key)
        start, found = self._states.longest(keys)
        state = found or _EMPTY
        for i in range(start, len(parts)):
            state = state.extend(parts[i], self.block_chars, seed)
            self._states.put(keys[i], state)
        if not state.tail:
            return list(state.hashes)
        last = state.hashes[-1] if state.hashes else seed
        return [*state.hashes, *block_hashes(state.tail, self.block_chars, last)]


_EMPTY = _Chain([], "")
