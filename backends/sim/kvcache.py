"""A block-level prefix cache modelled on vLLM's (v1 KVCacheManager).

- The KV cache is ``num_blocks`` blocks of ``block_size`` tokens; one block
  is reserved (vLLM's null block), so ``num_blocks - 1`` are usable.
- A full block is identified by a chained hash: its tokens and the hash of
  the block before it. Only full blocks are ever shared.
- A request's hit is the longest run of leading full blocks whose hashes are
  cached, computed over all but its last token (the engine must compute at
  least one token to sample from), so a hit is a whole number of blocks.
- Blocks in use have a reference count. A block whose count drops to zero
  goes to the tail of a free queue but keeps its hash: it can still be hit
  until allocation takes it from the head of the queue (LRU eviction). A
  request frees its blocks in reverse order, so its tail goes first.

With ``events`` set (backends/sim/kvevents.py), the cache reports what vLLM's
KV events report: a block stored when its hash becomes cached, removed when
allocation evicts it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import xxhash


@dataclass(slots=True)
class Block:
    id: int
    ref: int = 0
    hash: int | None = None


def block_hashes(ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """Chained hashes of the full blocks of ``ids``."""
    out: list[int] = []
    h = parent
    for start in range(0, len(ids) - block_size + 1, block_size):
        chunk = ids[start : start + block_size]
        h = xxhash.xxh64_intdigest(repr((h, *chunk)).encode())
        out.append(h)
    return out


class CacheEvents(Protocol):
    """Who hears of blocks entering and leaving the cache."""

    def stored(
        self, block_hash: int, parent: int | None, token_ids: Sequence[int], block_size: int
    ) -> None: ...

    def removed(self, block_hash: int) -> None: ...


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("num_blocks must be at least 2 (one is the reserved null block)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        usable = [Block(i) for i in range(1, num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.id, b) for b in usable)
        self._cached: dict[int, Block] = {}
        self.evictions = 0
        self.events: CacheEvents | None = None

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - len(self._free)

    def usage(self) -> float:
        return self.used_blocks / self.usable_blocks

    def holds(self, block_hash: int) -> bool:
        """Whether a full block with this chained hash is cached (in use or free)."""
        return block_hash in self._cached

    def longest_hit(self, hashes: Sequence[int], num_tokens: int) -> list[Block]:
        """Cached blocks for the leading ``hashes``, never covering the last token."""
        max_blocks = max(0, num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for h in hashes[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def touch(self, blocks: Sequence[Block]) -> None:
        """Take a reference on cached blocks a request reuses."""
        for block in blocks:
            if block.ref == 0:
                del self._free[block.id]
            block.ref += 1

    def allocate(self, n: int) -> list[Block] | None:
        """``n`` fresh blocks from the head of the free queue, or None if too few."""
        if n > len(self._free):
            return None
        out: list[Block] = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.hash is not None:
                if self._cached.get(block.hash) is block:
                    del self._cached[block.hash]
                    if self.events is not None:
                        self.events.removed(block.hash)
                block.hash = None
                self.evictions += 1
            block.ref = 1
            out.append(block)
        return out

    def commit(
        self,
        block: Block,
        h: int,
        ids: Sequence[int] = (),
        index: int = 0,
        parent: int | None = None,
    ) -> None:
        """Mark a block full: its contents are now reusable under hash ``h``.
        ``ids[index * block_size:][:block_size]`` are its tokens and ``parent``
        the hash of the block before it (None for a first block): what a
        BlockStored event carries."""
        if block.hash is not None:
            return
        block.hash = h
        # If another request computed the same block meanwhile, keep the first.
        if self._cached.setdefault(h, block) is block and self.events is not None:
            bs = self.block_size
            self.events.stored(h, parent, ids[index * bs : (index + 1) * bs], bs)

    def free(self, blocks: Sequence[Block]) -> None:
        for block in reversed(blocks):
            block.ref -= 1
            if block.ref == 0:
                self._free[block.id] = block
