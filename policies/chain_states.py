"""Hash-chain states by prefix key, bounded by the hashes they hold.

A prompt's block hashes form a chain: the state after a prefix (its full
blocks' hashes and the unfinished tail) depends on that prefix alone. Both
the character chains (``policies/prompt.py``) and the token chains
(``router/prompt_blocks.py``) keep such states by a key naming the prefix, so
that a prompt whose leading part was seen hashes only what follows it. This
is their store: least recently used out first, bounded by the hashes held
plus ``ENTRY_COST`` a state (a state too large for the bound alone is not
kept). Without the entry's cost, states of prefixes shorter than a block
(no hashes, a tail) were free: a flood of short chats kept hundreds of
thousands of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, Protocol, TypeVar


class ChainState(Protocol):
    @property
    def hashes(self) -> Sequence[int]: ...


#: What one stored state costs besides its hashes, in hashes: its dict entry,
#: key, state object and unfinished tail (about 300 bytes against about 40 for
#: a held hash in a list; a state holds at most a block's tail).
ENTRY_COST = 4

K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=ChainState)


class ChainStates(Generic[K, S]):
    def __init__(self, max_hashes: int) -> None:
        self.max_hashes = max_hashes
        self._states: OrderedDict[K, S] = OrderedDict()
        self._held = 0

    def __len__(self) -> int:
        return len(self._states)

    @property
    def held(self) -> int:
        """Hashes held across the stored states, plus ``ENTRY_COST`` each."""
        return self._held

    def longest(self, keys: Sequence[K]) -> tuple[int, S | None]:
        """The longest prefix of ``keys`` whose last key has a state: (how many
        keys it covers, the state), or (0, None); the state is refreshed."""
        states = self._states
        start = len(keys)
        while start:
            found = states.get(keys[start - 1])
            if found is not None:
                states.move_to_end(keys[start - 1])
                return start, found
            start -= 1
        return 0, None

    def put(self, key: K, state: S) -> None:
        size = len(state.hashes) + ENTRY_COST
        if size > self.max_hashes:
            return
        old = self._states.pop(key, None)
        if old is not None:
            self._held -= len(old.hashes) + ENTRY_COST
        self._states[key] = state
        self._held += size
        while self._held > self.max_hashes:
            _, dropped = self._states.popitem(last=False)
            self._held -= len(dropped.hashes) + ENTRY_COST
