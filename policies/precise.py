"""Matching a prompt's token blocks against what endpoints hold, from their events.

An endpoint's source of truth about its KV cache is one of:

- ``precise``: it publishes KV events, the router's view of them is live
  (``EndpointView.blocks`` present and not stale), and the request's tokens
  are known (``RequestView.tokens``: the model has a tokenizer). A match is
  counted in tokens, exactly.
- ``stale``: it publishes events but the view is not to be trusted now
  (silent publisher, unrepaired gap): the approximate index stands in.
- ``approximate``: no events (or no tokens): the character-block index of
  what the router itself sent there (``policies/prefix_index.py``).

Matches from different sources are compared in tokens: an approximate match
of ``c`` characters counts ``c x num_tokens / prompt_chars`` tokens (the
prompt's own ratio, when its tokens are known).

Events come after the engine has prefilled. Until then, a burst of requests
sharing a new prefix must still follow the first: ``InFlight`` remembers, per
event-publishing endpoint, the token blocks of requests routed there and not
finished yet, and an endpoint's precise match is the larger of what its
events say and what is in flight there. A finished request's entry is
dropped (by then its blocks' events have come, or the blocks are gone, and
the events say which); entries never released (a decision whose endpoint was
never tried) fall out after ``max_decisions`` newer ones.
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Sequence
from operator import itemgetter
from typing import Any, Literal

from pydantic import Field

from policies.base import EndpointView, HeldBlocks, RequestView
from policies.blocks import leading
from policies.prefix_index import IndexParams, IndexStats, PrefixIndex, capacity_blocks
from policies.prompt import block_hashes, canonical_prompt, model_seed

Source = Literal["precise", "approximate", "stale"]


#: The block size assumed for an endpoint whose events have stored nothing
#: yet (vLLM's default): it holds nothing, but what is sent to it is in flight.
DEFAULT_BLOCK_SIZE = 16


def index_source(view: EndpointView, tokens_known: bool = True) -> Source:
    """Which index a prefix-aware policy consults for ``view`` (for a model
    whose prompts are tokenized, unless ``tokens_known`` is false)."""
    blocks = view.blocks
    if blocks is None or not tokens_known:
        return "approximate"
    return "stale" if blocks.stale else "precise"


def live_blocks(view: EndpointView) -> HeldBlocks | None:
    """The endpoint's event-fed blocks, when they can be trusted."""
    blocks = view.blocks
    if blocks is None or blocks.stale:
        return None
    return blocks


def block_size(blocks: HeldBlocks) -> int:
    return blocks.block_size if blocks.block_size > 0 else DEFAULT_BLOCK_SIZE


def _grid(limit: int = 1 << 24) -> list[int]:
    out, i = [], 0
    while i < limit:
        out.append(i)
        i += max(1, i // 8)
    return out


_NONE: dict[str, int] = {}

#: Positions of a chain's blocks that ``InFlight`` records: every one of the
#: first 16, then ever sparser (each 1/8 past the one before).
GRID = _grid()


def _pick(positions: list[int]) -> Callable[[Sequence[int]], tuple[int, ...]]:
    if len(positions) == 1:
        return lambda hashes: (hashes[positions[0]],)
    return itemgetter(*positions)


#: ``SAMPLERS[k]`` picks the first ``k`` ``GRID`` positions of a sequence, in C.
SAMPLERS = [_pick(GRID[:k]) for k in range(1, len(GRID) + 1)]


class InFlight:
    """Token blocks of the requests routed to each endpoint and not finished.

    A request's blocks are recorded at the ``GRID`` positions and its last one
    only (about 60 of a 32k-token prompt's 2000 blocks): recording and
    releasing every block cost more than the rest of a decision. A match is
    then exact for a prompt in flight whole, and otherwise at most 1/8 short
    of the longest prefix in flight."""

    def __init__(self, max_decisions: int = 4096) -> None:
        self.max_decisions = max_decisions
        self._held: dict[str, Counter[int]] = {}
        #: A prompt's first block -> the endpoints it is in flight to, and how
        #: many times: the candidates worth matching, without asking each one.
        self._first: dict[int, dict[str, int]] = {}
        self._decisions: OrderedDict[int, tuple[str, tuple[int, ...]]] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._decisions)

    def holding(self, first: int) -> Container[str]:
        """The endpoints a prompt whose first block is ``first`` is in flight
        to (only they can match in flight): in a busy fleet every endpoint
        has something in flight, and asking each cost a call per candidate."""
        return self._first.get(first, _NONE)

    def add(self, endpoint_id: str, hashes: Sequence[int]) -> int | None:
        """Record a decision; returns its handle for ``release``."""
        n = len(hashes)
        if not n:
            return None
        sampled = SAMPLERS[bisect.bisect_left(GRID, n) - 1](hashes)
        if sampled[-1] != hashes[-1]:
            sampled += (hashes[-1],)
        held = self._held.get(endpoint_id)
        if held is None:
            held = self._held[endpoint_id] = Counter()
        held.update(sampled)  # counted in C
        first = self._first.get(sampled[0])
        if first is None:
            first = self._first[sampled[0]] = {}
        first[endpoint_id] = first.get(endpoint_id, 0) + 1
        handle = self._next
        self._next += 1
        self._decisions[handle] = (endpoint_id, sampled)
        while len(self._decisions) > self.max_decisions:
            self.release(next(iter(self._decisions)))
        return handle

    def release(self, handle: int | None) -> None:
        entry = self._decisions.pop(handle, None) if handle is not None else None
        if entry is None:
            return
        endpoint_id, sampled = entry
        first = self._first.get(sampled[0])
        if first is not None and endpoint_id in first:
            if first[endpoint_id] > 1:
                first[endpoint_id] -= 1
            else:
                del first[endpoint_id]
                if not first:
                    del self._first[sampled[0]]
        held = self._held.get(endpoint_id)
        if held is None:
            return
        for h in sampled:
            count = held.get(h, 0) - 1
            if count > 0:
                held[h] = count
            else:
                held.pop(h, None)
        # An empty Counter is kept for the endpoint's next request (making
        # one cost a tenth of recording a decision); ``forget`` drops it.

    def match(self, endpoint_id: str, hashes: Sequence[int]) -> int:
        """Leading ``hashes`` in flight to the endpoint (see the class)."""
        held = self._held.get(endpoint_id)
        if not held:
            return 0
        n = len(hashes)
        if not n or hashes[0] not in held:
            return 0
        if hashes[-1] in held:
            return n
        # Bisect the grid positions below n: held ones form a prefix of them.
        lo, hi = 0, bisect.bisect_left(GRID, n)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if hashes[GRID[mid]] in held:
                lo = mid
            else:
                hi = mid
        return GRID[lo] + 1

    def forget(self, endpoint_id: str) -> None:
        self._held.pop(endpoint_id, None)
        for first in [f for f, held in self._first.items() if endpoint_id in held]:
            del self._first[first][endpoint_id]
            if not self._first[first]:
                del self._first[first]
        for handle in [h for h, (e, _) in self._decisions.items() if e == endpoint_id]:
            del self._decisions[handle]


class PrecisePrefixParams(IndexParams):
    #: Decisions whose blocks count as held before their events come.
    max_in_flight: int = Field(1024, ge=1)


class PrecisePrefix:
    """``composite`` scorer: the share of the prompt's tokens an endpoint holds.

    Precise for endpoints whose events are live (the larger of what their
    events say and what was recently sent there); for the others, the share
    of the prompt's character blocks the approximate index credits them
    with, as ``prefix_match`` scores. Shares of one prompt are comparable
    whatever their source, so a fleet may mix both. Composite does not report
    outcomes to scorers, so "recently sent" is the last ``max_in_flight``
    decisions on event endpoints rather than the unfinished ones."""

    uses_tokens = True

    def __init__(self, params: PrecisePrefixParams) -> None:
        self.params = params
        self.index = PrefixIndex(params.max_index_entries)
        self.in_flight = InFlight(params.max_in_flight)

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        tokens = request.tokens
        text = canonical_prompt(request.body)
        hashes = block_hashes(text, self.params.block_chars, model_seed(request.model))
        scores = [0.0] * len(candidates)
        approximate = []
        for i, e in enumerate(candidates):
            blocks = live_blocks(e) if tokens is not None and tokens.num_tokens else None
            if blocks is None or tokens is None:
                approximate.append(e.id)
                continue
            size = block_size(blocks)
            ours = tokens.block_hashes(size)
            held = max(leading(blocks, ours), self.in_flight.match(e.id, ours))
            # Every full block held is all an engine can reuse: the whole prompt.
            scores[i] = 1.0 if held and held == len(ours) else held * size / tokens.num_tokens
        if hashes and approximate:
            matches = self.index.match(hashes, approximate)
            for i, e in enumerate(candidates):
                n = matches.get(e.id)
                if n:
                    scores[i] = n / len(hashes)
        return scores, (hashes, tokens)

    def picked(self, memo: Any, endpoint: EndpointView) -> None:
        hashes, tokens = memo
        p = self.params
        self.index.insert(
            hashes,
            endpoint.id,
            capacity_blocks(endpoint, p.default_capacity_tokens, p.chars_per_token, p.block_chars),
        )
        blocks = live_blocks(endpoint)
        if blocks is not None and tokens is not None:
            self.in_flight.add(endpoint.id, tokens.block_hashes(block_size(blocks)))

    def forget(self, endpoint_id: str) -> None:
        self.index.forget(endpoint_id)
        self.in_flight.forget(endpoint_id)

    def index_stats(self) -> IndexStats:
        return self.index.stats()
