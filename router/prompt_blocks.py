"""A tokenized prompt's chained block hashes, cached by prefix of pieces.

``router/prompts.py`` tokenizes a prompt as a sequence of pieces (the text
between a tokenizer's added tokens, and the added tokens themselves), each
with its token ids. A block of ``block_size`` tokens may straddle pieces, so
hashes cannot be cached per piece; but the state of the hash chain after a
prefix of pieces (the full blocks' hashes, and the tokens of the unfinished
block) depends on that prefix only. ``ChainCache`` keeps those states, keyed
by a running hash of the pieces, so a prompt that begins with pieces already
seen (a shared system prompt, the earlier turns of a conversation) hashes
only what follows them: an 8k-token prefix costs a dict lookup and a list
copy instead of 500 xxhash calls.

Hashes are ``policies.blocks.chain_hashes``'s, byte for byte (tested).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from policies.blocks import ROOT_HASH
from policies.chain_states import ChainStates

#: Hashes kept across all cached chain states (about 8 bytes each, plus the
#: states' token tails): bounds the cache's memory, not its entry count.
MAX_CACHED_HASHES = 2_000_000
#: A state is kept only this many tokens or more after the state it grew
#: from: what follows a known prefix by less (a new question, a template's
#: closing tags) costs a few xxhash calls to hash again, and keeping a state
#: at each of its pieces cost more than that, for prefixes that never recur.
MIN_STORE_TOKENS = 64


@dataclass(frozen=True, slots=True)
class _State:
    #: Handed out as is by ``ChainCache.hashes`` (no copy). An array of
    #: unsigned 64-bit ints: extending a state copies 8 bytes a hash, where a
    #: tuple's copy touched (incref, then decref when freed) each hash's int
    #: object, 650 cache misses for a 32k-character prompt; and no garbage
    #: collector walks it (a list of 2 M cached hashes was walked by every
    #: full collection).
    hashes: array[int]
    #: Token ids (little-endian uint32 bytes) not yet making a full block.
    tail: bytes

    def extend(self, ids: bytes, block_size: int) -> _State:
        data = self.tail + ids if self.tail else ids
        step = block_size * 4
        full = len(data) - len(data) % step
        if not full:
            return _State(self.hashes, data)
        digest = xxhash.xxh3_64_intdigest
        h = self.hashes[-1] if self.hashes else ROOT_HASH
        view = memoryview(data)
        new = array("Q")
        for start in range(0, full, step):
            h = digest(view[start : start + step], h)
            new.append(h)
        return _State(self.hashes + new, data[full:])  # one allocation, one copy


_ROOT = _State(array("Q"), b"")


class ChainCache:
    """Chain states by (block size, prefix key), least recently used out first,
    bounded by the hashes they hold."""

    def __init__(
        self, max_hashes: int = MAX_CACHED_HASHES, min_store_tokens: int = MIN_STORE_TOKENS
    ) -> None:
        self._states: ChainStates[tuple[int, int], _State] = ChainStates(max_hashes)
        self.min_store_tokens = min_store_tokens
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    @property
    def held(self) -> int:
        return self._states.held

    def hashes(
        self, keys: Sequence[int], pieces: Sequence[bytes], block_size: int
    ) -> Sequence[int]:
        """The chained hashes of the concatenated ``pieces``' full blocks;
        ``keys[i]`` identifies ``pieces[: i + 1]``. The cached list itself,
        not a copy (a copy of a 32k-character prompt's 650 hashes was a tenth
        of tokenizing it): not to be mutated."""
        sized = [(block_size, key) for key in keys]
        start, found = self._states.longest(sized)
        state = found or _ROOT
        if start:
            self.hits += 1
        if start == len(keys):
            return state.hashes
        self.misses += 1
        # Pieces are hashed together up to where a state is worth keeping
        # (``min_store_tokens`` after the last), then the state is kept there.
        pending: list[bytes] = []
        size = 0
        least = self.min_store_tokens * 4
        for i in range(start, len(keys)):
            pending.append(pieces[i])
            size += len(pieces[i])
            if size >= least:
                state = state.extend(b"".join(pending), block_size)
                self._states.put(sized[i], state)
                pending.clear()
                size = 0
        if pending:
            state = state.extend(b"".join(pending), block_size)
        return state.hashes


class Tokens:
    """A prompt's tokens (implements ``policies.base.PromptTokens``): its
    pieces' token ids, and their block hashes computed once per block size."""

    __slots__ = ("_by_size", "_cache", "_keys", "_pieces", "num_tokens")

    def __init__(self, keys: list[int], pieces: list[bytes], cache: ChainCache) -> None:
        self._keys = keys
        self._pieces = pieces
        self._cache = cache
        self._by_size: dict[int, Sequence[int]] = {}
        self.num_tokens = sum(map(len, pieces)) // 4

    def block_hashes(self, block_size: int) -> Sequence[int]:
        hashes = self._by_size.get(block_size)
        if hashes is None:
            if block_size <= 0:
                return []
            hashes = self._cache.hashes(self._keys, self._pieces, block_size)
            self._by_size[block_size] = hashes
        return hashes

    def token_ids(self) -> list[int]:
        """All the ids, in order (for tests and debugging: not on the hot path)."""
        out = array("I")
        for piece in self._pieces:
            out.frombytes(piece)
        return out.tolist()
