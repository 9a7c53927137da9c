"""The precise index: which KV-cache blocks each endpoint holds, from its events.

An engine that publishes KV events (vLLM's ``--kv-events-config``) says what
it stores and evicts, block by block, under hashes of its own (vLLM 0.32:
sha256 with a fixed seed by default, the same in every process; with xxhash,
a random seed per process): kvroute never computes them. Each stored block also carries its
token ids and the engine hash of the block before it. From those kvroute
computes its own chained hash of the block's tokens, ``chain_hashes``, the
same function it applies to a tokenized prompt: a prompt's leading blocks
whose hashes an endpoint holds are, exactly, the prefix that endpoint has in
its KV cache.

    BlockIndex                    one per router process (AppState.blocks)
     └── EndpointBlocks           one per endpoint that publishes events
           engine hash -> our hash     (to apply BlockRemoved, to chain parents)
           our hash -> count           (what policies ask: ``h in blocks``)

Blocks whose engine hash depends on more than their tokens (a LoRA adapter,
multimodal inputs, a cache salt: ``extra_keys``) cannot be matched from a
prompt's tokens and are not indexed; nor are blocks of other media than the
GPU (an offloading tier). An endpoint holds at most ``max_blocks``: a
publisher that claims more is not trusted (the index is cleared and marked
stale until the publisher clears or restarts).

Nothing here does I/O; the subscriber (``router/kvevents``) feeds it.
"""

from __future__ import annotations

from array import array
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import xxhash

#: The seed of a prompt's first block (kvroute's, not any engine's).
ROOT_HASH = 0x6B76_726F_7574_6531  # "kvroute1"
#: Media whose blocks a prompt can hit on the next request (None: unspecified).
INDEXED_MEDIA = frozenset({None, "GPU", "gpu"})


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``: each block's hash is
    seeded with the one before, so a hash stands for every token up to it."""
    data = array("I", token_ids).tobytes()
    step = block_size * 4
    digest = xxhash.xxh3_64_intdigest
    out: list[int] = []
    h = parent
    for start in range(0, len(data) - step + 1, step):
        h = digest(data[start : start + step], seed=h)
        out.append(h)
    return out


def leading(held: Container[int], hashes: Sequence[int], hint: int = 0) -> int:
    """How many leading ``hashes`` are in ``held``, assuming what is held of a
    chain is a prefix of it: a gallop, then bisection (O(log n) lookups).

    ``hint``, an earlier answer for a prompt that starts the same way (a
    tenant's system prompt: the same length again and again), is tried
    first: two lookups when it is right. Each lookup of a large cold ``held``
    misses the CPU's cache; the twenty of a gallop and bisection over a 32k
    character prompt cost 12 us. Under the prefix assumption the answer is
    the same with any hint."""
    n = len(hashes)
    if not n or hashes[0] not in held:
        return 0
    lo = 0  # hashes[lo] is held
    if 1 < hint <= n:
        if hashes[hint - 1] in held:
            if hint == n or hashes[hint] not in held:
                return hint
            lo = hint
        else:
            return _bisect(held, hashes, 0, hint - 1)
    step = 1
    while lo + step < n and hashes[lo + step] in held:
        lo += step
        step *= 2
    return _bisect(held, hashes, lo, min(n, lo + step))


def _bisect(held: Container[int], hashes: Sequence[int], lo: int, hi: int) -> int:
    """The leading held count, given ``hashes[lo]`` held and ``hashes[hi]``
    not (or ``hi == len(hashes)``)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if hashes[mid] in held:
            lo = mid
        else:
            hi = mid
    return lo + 1


@dataclass(eq=False, slots=True)
class EndpointBlocks:
    """One endpoint's blocks (implements ``policies.base.HeldBlocks``)."""

    endpoint_id: str
    max_blocks: int
    block_size: int = 0
    #: Not to be trusted: no events yet, the publisher went silent, or a gap
    #: in its sequence numbers is not repaired.
    stale: bool = True
    stale_reason: str = "no events yet"
    _ours: dict[int, int] = field(default_factory=dict)
    #: Our hash -> how many engine blocks have it (``HeldBlocks.hashes``):
    #: read by policies, written only here.
    hashes: dict[int, int] = field(default_factory=dict)
    #: The held hashes that start a chain (a prompt's first block;
    #: ``HeldBlocks.roots``): a few per endpoint, so asking every candidate
    #: whether it holds a prompt's first block probes small sets that stay in
    #: the CPU's cache, not dicts of a million blocks.
    roots: set[int] = field(default_factory=set)
    #: Counters for /admin/prefix-index and metrics.
    stored_total: int = 0
    removed_total: int = 0
    skipped_total: int = 0
    cleared_total: int = 0

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)

    def stored(
        self,
        engine_hashes: Sequence[int],
        parent: int | None,
        token_ids: Sequence[int],
        block_size: int,
        *,
        medium: str | None = None,
        extra: bool = False,
    ) -> int:
        """Blocks stored, in order; returns how many were indexed. A block
        whose parent the index does not know (its event was missed) cannot be
        chained, nor can those after it."""
        if medium not in INDEXED_MEDIA or extra or block_size <= 0:
            self.skipped_total += len(engine_hashes)
            return 0
        if block_size != self.block_size:
            if self.hashes:
                # A different block size means a different engine: start over.
                self.cleared()
            self.block_size = block_size
        if parent is None:
            start = ROOT_HASH
        else:
            known = self._ours.get(parent)
            if known is None:
                self.skipped_total += len(engine_hashes)
                return 0
            start = known
        ours = chain_hashes(token_ids, block_size, start)
        n = min(len(ours), len(engine_hashes))
        if len(self._ours) + n > self.max_blocks:
            self.cleared()
            self.mark_stale(f"publisher claims more than {self.max_blocks} blocks")
            return 0
        for engine_hash, h in zip(engine_hashes[:n], ours[:n], strict=True):
            if engine_hash in self._ours:
                continue  # at-least-once delivery: a repeat changes nothing
            self._ours[engine_hash] = h
            self.hashes[h] = self.hashes.get(h, 0) + 1
        if parent is None and n:
            self.roots.add(ours[0])
        self.stored_total += n
        self.skipped_total += len(engine_hashes) - n
        return n

    def removed(self, engine_hashes: Sequence[int], *, medium: str | None = None) -> None:
        if medium not in INDEXED_MEDIA:
            return
        for engine_hash in engine_hashes:
            h = self._ours.pop(engine_hash, None)
            if h is None:
                continue
            count = self.hashes[h] - 1
            if count:
                self.hashes[h] = count
            else:
                del self.hashes[h]
                self.roots.discard(h)
            self.removed_total += 1

    def cleared(self) -> None:
        self._ours.clear()
        self.hashes.clear()
        self.roots.clear()
        self.cleared_total += 1

    def mark_stale(self, reason: str) -> None:
        self.stale = True
        self.stale_reason = reason

    def mark_live(self) -> None:
        self.stale = False
        self.stale_reason = ""

    def match(self, hashes: Sequence[int]) -> int:
        """Leading ``hashes`` held: the prefix this endpoint has, in blocks.

        Engines free a request's blocks tail first, so what an endpoint holds
        of one chain is (almost always) a prefix of it: a galloping then binary
        search costs O(log n) lookups instead of one per block."""
        return leading(self.hashes, hashes)


class BlockIndex:
    """Every event-publishing endpoint's blocks, by endpoint id."""

    def __init__(self, max_blocks: int = 1_000_000) -> None:
        self.max_blocks = max_blocks
        self._endpoints: dict[str, EndpointBlocks] = {}

    def endpoint(self, endpoint_id: str) -> EndpointBlocks:
        blocks = self._endpoints.get(endpoint_id)
        if blocks is None:
            blocks = self._endpoints[endpoint_id] = EndpointBlocks(endpoint_id, self.max_blocks)
        return blocks

    def get(self, endpoint_id: str) -> EndpointBlocks | None:
        return self._endpoints.get(endpoint_id)

    def forget(self, endpoint_id: str) -> None:
        self._endpoints.pop(endpoint_id, None)

    def all(self) -> list[EndpointBlocks]:
        return list(self._endpoints.values())
