"""prefix_affinity: send a request where its prompt prefix is probably cached.

Three stages, first match wins:

1. ``load_guard``: when the candidates' loads are imbalanced beyond an
   absolute AND a relative threshold, cache affinity waits; least load first.
2. ``prefix_hit``: the endpoint with the longest indexed prefix match (at
   least ``min_match_blocks``) among those not overloaded; equal matches go
   to the less loaded, then to ring order. "Overloaded" is the bounded-load
   rule: past ``(1 + epsilon)`` times a fair share of the total load (and at
   least ``min_overload`` requests). That
   rule is also what stops one replica holding a prompt everyone shares (a
   huge system prompt) from taking every request: it fills up to its bound,
   the rest spill to others, which then hold the prompt too.
3. A prefix with no history goes to the first ``ring_choices`` endpoints
   along a bounded-load consistent-hash ring from its first block: the one
   with the fewest requests still waiting for their first byte (queued or
   prefilling, ``EndpointView.awaiting_first``), the earlier on the ring on
   a tie. So router replicas that share no state send a new prefix to its
   owner (``ring_owner``, ``ring_spill`` when the owner is overloaded) while
   the owner has as little prefill ahead of it as the others, and pick among
   the same few when not (``ring_less_loaded``). Prefill, not decoding, is
   what a new request's first token waits for: counted as load, running
   decodes made placement send new prompts where others were still being
   prefilled. ``cache_spill``: endpoints
   whose share of the index is full (their KV caches hold other prefixes)
   were passed over for one with room; a few prefixes hashed unevenly would
   otherwise thrash one cache while another sits empty.

The index records the chosen endpoint at decision time (so a burst of
requests for one new prefix follows the first), and the endpoint that
actually served the request when failover moved it.

Router replicas sharing nothing (benchmarks/README.md, "Converging router
replicas without events"). Each router estimates its share of the fleet's
traffic (``share``, policies/share.py: the requests it saw answered over
those the engines finished, from their counters; where a backend publishes
no such counter, its requests in flight at the last scrape over the scraped
running + waiting). A router that sees 1/N of the traffic sizes
each endpoint's share of its index by 1/N too, so its LRU forgets a prefix
about when the engine's cache does, not N times later. And while the share
says other routers place prefixes too (``shared_below``), a new prefix goes
to the first endpoint along the ring within the bounded load, not to the
ring choice this router's private counts favour: every router then re-places
an evicted prefix on the same replica instead of making one copy each.
Routers on KV events keep their choices (the engines' events already agree).
While shared, an endpoint past its bounded load sheds the prefixes whose
hash falls in a share of the hash space that grows with its excess load
(``SheddingCapacity``), not every prefix sent at that moment: routers count
the load a little differently but shed the same prefixes first, so a spill
no longer splits a tenant between two replicas. The load guard stands aside
then (its imbalance, partly the others' lagging scrape, was spurious).
With ``shared_homes`` (off by default) a recurring prefix with no history
goes first to its balanced home (policies/homes.py), which every router
computes alike from the recurring prefixes it sees, rather than to its ring
owner: a ring crowds a dozen tenants unevenly, and a crowded cache evicts
them in turn. The home's bound counts the first candidate's cache (a fleet
serving one model has alike caches, as a rule).

Router replicas telling each other their placements (``placements`` in the
config; policies/placements.py, router/placements): while the link is live
every decision of every router feeds this index (``learn_placement``), as
one router's own would, so none of the rules above for routers that share
nothing applies: the index is sized by the whole cache and new prefixes are
placed as a router alone places them. When the link drops they apply again.
While the others' placements arrive late (``placements_max_lag``), new
prefixes are placed as routers that share nothing place them: until a
placement arrives the others place the same prompt without knowing of it,
and only the shared rule makes them pick alike (measured: virtual time with
the delivery delayed 50-200 ms, and real vLLM where loaded event loops
delayed 10 % of messages by 250-500 ms).

Precise matches (``policies/precise.py``). When the request's tokens are
known (``RequestView.tokens``: the model has a tokenizer) an endpoint whose
KV events are live is matched in tokens against what its engine reports
(``precise_hit``), not against the character index; the others (no events,
or stale ones) keep the character index (``prefix_hit``), its match
converted to tokens by the prompt's own characters per token, so stage 2
compares one unit across a mixed fleet. Holding every full block of the
prompt counts as holding the whole prompt (an engine reuses no partial
block). A precise match under ``min_match_tokens`` counts as none.

Bursts: an engine reports blocks only once it has prefilled them, so
requests for a new prefix that arrive meanwhile would each look new. A
decision on an event endpoint is kept in flight (``InFlight``) until
``observe`` reports its attempt over; an endpoint's precise match is the
larger of its events' and its in-flight decisions' (``inflight_hit`` when
the latter). An in-flight entry never outlives its request: afterwards the
events alone say whether the blocks are still there (the character index,
by contrast, would go on crediting an endpoint with blocks its engine
evicted). The character index is fed for event endpoints too when the fleet
is mixed, so it is warm for one whose events go stale; when every candidate's
events are live it plays no part, and only the ring key is hashed (a third
of a decision's time on a 32k-character prompt). Load guard, bounded load and ring placement
(keyed by the first character block, so routers with and without a
tokenizer agree) are the same for every source.

``Decision.match_len`` stays in characters: a match in tokens is scaled by
the prompt's characters per token, so ``match_len / prompt_len`` is the share
of the prompt matched whatever the source.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from operator import attrgetter, itemgetter

from pydantic import Field

from policies.base import (
    Decision,
    EndpointView,
    HeldBlocks,
    Outcome,
    PromptTokens,
    Ranking,
    RequestView,
)
from policies.blocks import leading
from policies.homes import BalancedHomes
from policies.placements import PlacementLog
from policies.precise import DEFAULT_BLOCK_SIZE, InFlight, block_size, live_blocks
from policies.prefix_index import IndexParams, IndexStats, PrefixIndex, capacity_blocks
from policies.prompt import (
    CharChains,
    block_hashes,
    canonical_prompt,
    message_parts,
    model_seed,
    prompt_chars,
    prompt_head,
)
from policies.ring import Capacity, RingCache, SheddingCapacity
from policies.share import CountedShare, GaugedShare

#: Ring steps taken looking for a cache with room before settling for the owner.
MAX_SPILL_WALK = 8
#: Prompts' first blocks whose last match length is kept as a hint (16 bytes
#: and two ints each); all dropped at once past it.
MAX_MATCH_HINTS = 65_536

_ID = attrgetter("id")
_LOAD = attrgetter("load")
_SCRAPE_VERSION = attrgetter("scrape_version")
_BLOCK_SIZE = attrgetter("block_size")
_SECOND = itemgetter(1)


class PrefixAffinityParams(IndexParams):
    #: Shorter matches count as no match.
    min_match_blocks: int = Field(1, ge=1)
    #: Load guard: act when max - min load > abs AND max > rel * min.
    balance_abs_threshold: float = Field(8.0, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1)
    #: Bounded load: an endpoint past (1 + epsilon) x its fair share is overloaded.
    epsilon: float = Field(0.25, gt=0)
    #: ... but an endpoint with fewer requests than this is never overloaded:
    #: an engine batches many more, and a spill re-prefills the whole prompt
    #: elsewhere. 8, not 4: in virtual time 4 spilled half the placements of
    #: a workload that fits and cost 5-10 points of hit rate with no TTFT
    #: gained (benchmarks/README.md, "The bounded-load floor").
    min_overload: float = Field(8.0, ge=0)
    #: ``chars_per_token`` is the starting guess, then learned from responses'
    #: usage unless turned off.
    learn_chars_per_token: bool = True
    #: Virtual nodes per unit of weight on the hash ring.
    vnodes: int = Field(100, ge=1)
    #: A new prefix goes to the one of this many endpoints along the ring
    #: (those not overloaded) with the fewest requests awaiting their first
    #: byte, the earliest on a tie (1: the first not overloaded, however busy,
    #: as before). 4: on prompts that share nothing, 2 still left TTFT p90
    #: 40-50% above round robin's in virtual time, 4 came within 5%
    #: (benchmarks/README.md, "prefix_affinity on traffic that shares nothing").
    ring_choices: int = Field(4, ge=1)
    #: A precise match (from KV events) shorter than this many tokens counts
    #: as no match: the fixed head of a chat template (a Llama 3 system header
    #: is ~30 tokens) is in every prompt and says nothing of the rest.
    min_match_tokens: int = Field(64, ge=1)
    #: Decisions on event-publishing endpoints remembered until they finish
    #: (the oldest unfinished are dropped past this).
    max_in_flight: int = Field(4096, ge=1)
    #: Size each endpoint's share of the index by this router's estimated
    #: share of the fleet's traffic (policies/share.py): a router seeing 1/N of the
    #: traffic fills an endpoint's LRU N times slower than its cache churns,
    #: and went on believing in evicted prefixes (benchmarks/README.md,
    #: "Converging router replicas without events").
    share_index: bool = True
    #: Below this estimated traffic share other routers place prefixes too: a
    #: new prefix then goes to the first endpoint along the ring within the
    #: bounded load, as ``ring_choices: 1``, passing over neither by this
    #: router's private awaiting counts nor by its index occupancy, so every
    #: router re-places an evicted prefix on the same replica. 0: never.
    shared_below: float = Field(0.75, ge=0, le=1)
    #: While other routers place prefixes too (``shared_below``): an endpoint
    #: past its bounded load sheds a share of prefixes chosen by their hash
    #: (the same ones in every router) instead of every prefix this router
    #: sends at that moment, and the load guard stands aside (the routers'
    #: loads, partly a lagging scrape, made it fire where one router never
    #: did). Off: every router spilled a tenant at its own moments, and its
    #: prompt went to two replicas at once (benchmarks/README.md, "Third pass").
    shared_shedding: bool = True
    #: ``min_overload`` while other routers place prefixes too: each router's
    #: view of an endpoint's load lags (the others' part is scraped), and at 8
    #: the requests of several routers piled up: TTFT p90 up to 2x at 8 and 16
    #: replicas in virtual time ("The bounded-load floor").
    shared_min_overload: float = Field(4.0, ge=0)
    #: The traffic share is counted over about this many finished requests
    #: (summed over the endpoints): long enough that one scrape's edge
    #: moves it little, short enough to follow routers joining or leaving.
    share_window: float = Field(256.0, ge=1)
    #: Count the share from the backends' finished-requests counters where
    #: they publish them; off: from the in-flight gauges only (which race:
    #: benchmarks/README.md, "Two routers on real vLLM").
    share_counters: bool = True
    #: The share assumed before it is measured while the backends' load is
    #: scraped. 1 (alone): each of several routers places its first tenants
    #: by its own counts, and some stay split between two replicas all run.
    #: Below ``shared_below`` (a fleet that always runs several routers):
    #: every router starts out placing as the others do; in virtual time 2
    #: and 4 routers gained 1-5 points of hit rate, one router lost up to 1
    #: (benchmarks/README.md, "Two routers on real vLLM"), hence not the default.
    unmeasured_share: float = Field(1.0, ge=0, le=1)
    #: While other routers place prefixes too (``shared_below``): a recurring
    #: prefix with no history goes first to its balanced home
    #: (policies/homes.py: consistent hashing with bounded loads over the
    #: recurring prefixes every router sees), not to its ring owner.
    shared_homes: bool = False
    #: A prefix unseen for this many decisions leaves the homes' set.
    homes_window: int = Field(1024, ge=1)
    #: With placements shared between routers (``placements`` in the config):
    #: while the others' arrive later than this (seconds, their recent mean
    #: lag), a new prefix is placed as routers that share nothing place it
    #: (the first ring endpoint within the bounded load), which every router
    #: picks alike without hearing from the others.
    placements_max_lag: float = Field(0.02, ge=0)


class PrefixAffinity:
    name = "prefix_affinity"
    uses_tokens = True

    def __init__(self, params: PrefixAffinityParams, rng: random.Random) -> None:
        self.params = params
        self.index = PrefixIndex(params.max_index_entries)
        self._rings = RingCache(params.vnodes)
        self._seeds: dict[str, int] = {}
        self._chains = CharChains(params.block_chars)
        self.chars_per_token = params.chars_per_token
        self._ratio_samples = 0
        self.in_flight = InFlight(params.max_in_flight)
        #: The last precise match, in blocks, of a prompt by its first block:
        #: where ``leading`` looks first (``MAX_MATCH_HINTS`` at most).
        self._hints: dict[int, int] = {}
        #: This router's estimated share of the fleet's traffic (1: alone;
        #: stays 1 with no scraped load to compare with).
        self.share = 1.0
        #: ``share`` was measured (not assumed): the index is sized by it.
        self.measured = False
        self._counted = CountedShare(params.share_window)
        self._homes = BalancedHomes(params.homes_window) if params.shared_homes else None
        self._gauged = GaugedShare()
        #: What the share was last learned from (``_learn_share``).
        self._versions: list[int] = []
        self._version_ids: list[str] = []
        #: The gauges' sample and whether any candidate was scraped, as of then.
        self._sample: float | None = None
        self._scraped = False
        #: Placements told to and heard from the other router replicas
        #: (policies/placements.py; router/placements): None when not shared.
        self.placements: PlacementLog | None = None

    def share_placements(self, log: PlacementLog | None) -> None:
        """Record this policy's placements in ``log`` for the other routers
        (None: stop). While ``log.live``, the index is fed by every router's
        decisions (``learn_placement``): it is sized and placed from as a
        router alone's, whatever the traffic share."""
        self.placements = log

    def learn_placement(self, hashes: Sequence[int], endpoint: EndpointView) -> None:
        """Another router placed a prompt (these character blocks) on
        ``endpoint``: index it as this router's own decision would be, in
        the room this router's index gives the endpoint (never the sender's:
        a router whose link is down sizes by its share)."""
        self.index.insert(hashes, endpoint.id, self.capacity_blocks(endpoint))

    def _place(self, hashes: Sequence[int], endpoint: EndpointView) -> None:
        """This router placed the prompt on ``endpoint``: index it, and tell
        the other routers when placements are shared."""
        room = self.capacity_blocks(endpoint)
        self.index.insert(hashes, endpoint.id, room)
        if self.placements is not None:
            self.placements.record(hashes, endpoint.id, room)

    @property
    def _index_shared(self) -> bool:
        """Every router's placements reach this index now."""
        return self.placements is not None and self.placements.live

    def capacity_blocks(self, endpoint: EndpointView) -> int:
        """The endpoint's share of the index: its cache, sized by this
        router's share of the traffic once measured (``share_index``)."""
        full = self._full_blocks(endpoint)
        if not self.params.share_index or not self.measured or self._index_shared:
            return full
        return max(1, int(full * self.share))

    def _full_blocks(self, endpoint: EndpointView) -> int:
        """What the endpoint's whole cache holds, in character blocks."""
        p = self.params
        return capacity_blocks(
            endpoint, p.default_capacity_tokens, self.chars_per_token, p.block_chars
        )

    def _learn_share(self, candidates: Sequence[EndpointView], ids: list[str]) -> None:
        """This router's share of the fleet's traffic (policies/share.py):
        from the finished-requests counters where the backends publish them
        (they do not race), else from the in-flight gauges' tracked median.

        What it reads changes only when a scrape lands: while the same
        candidates show the same ``scrape_version``, the counters are not
        read again (their loops over every candidate were 7 % of a decision's
        instructions); the gauges' sample is kept, and stepped towards as
        at every decision."""
        versions = list(map(_SCRAPE_VERSION, candidates))
        if versions != self._versions or ids != self._version_ids or -1 in versions:
            self._versions, self._version_ids = versions, ids
            if self.params.share_counters:
                self._counted.learn(candidates)
            self._sample = GaugedShare.sample(candidates)
            self._scraped = any(e.in_flight_at_scrape is not None for e in candidates)
        share = self._counted.share if self.params.share_counters else None
        if share is None:
            self._gauged.step(self._sample)
            share = self._gauged.share
        self.measured = share is not None
        if share is None:
            # Not measured yet. Scraped backends may serve other routers too:
            # place as every router would until this one knows it is alone.
            share = self.params.unmeasured_share if self._scraped else 1.0
        self.share = share

    def hashes(self, request: RequestView, head_only: bool = False) -> tuple[list[int], int]:
        """The prompt's character blocks' hashes (only the first with
        ``head_only``: the ring key), and its length in characters."""
        seed = self._seeds.get(request.model)
        if seed is None:
            seed = self._seeds[request.model] = model_seed(request.model)
        chars = self.params.block_chars
        if head_only:
            cut = prompt_head(request.body, chars)
            if cut is not None:
                return block_hashes(cut[0], chars, seed), cut[1]
        parts = message_parts(request.body)
        if parts is None:
            text = canonical_prompt(request.body)
            return block_hashes(text[:chars] if head_only else text, chars, seed), len(text)
        return self._chains.hashes(parts, seed), sum(map(len, parts))

    def _key(self, request: RequestView, hashes: list[int] | None) -> int:
        """Where the prompt sits on the ring: its first character block's hash
        (the model's seed for an empty prompt)."""
        if hashes is None:
            hashes = self.hashes(request, head_only=True)[0]
        return hashes[0] if hashes else self._seeds[request.model]

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        p = self.params
        tokens = request.tokens
        if tokens is not None and not tokens.num_tokens:
            tokens = None
        # The candidates whose events are live (when the prompt's tokens are
        # known). With every candidate's live, the character index has no part
        # in the decision: hash only the ring key, and feed it nothing.
        live: list[tuple[EndpointView, HeldBlocks]] = []
        if tokens is not None:
            live = [(e, b) for e in candidates if (b := e.blocks) is not None and not b.stale]
        precise_only = tokens is not None and len(live) == len(candidates)
        # With every candidate's events live, the character blocks play no
        # part, and the ring key (the first block) only in placing a new prefix.
        hashes: list[int] | None = None
        if precise_only:
            prompt_len = prompt_chars(request.body)
        else:
            hashes, prompt_len = self.hashes(request)
        ids = list(map(_ID, candidates))
        self._learn_share(candidates, ids)
        if self._homes is not None and hashes:
            self._homes.touch(hashes[0])
        # Routers on KV events (precise_only) keep their choices: measured,
        # the shared rule cost them hit rate across routers.
        sharing = not precise_only and self.share < p.shared_below
        shared = sharing and not self._index_shared
        # Placements heard late: place new prefixes where every router would.
        place_shared = shared or (
            sharing and self.placements is not None and self.placements.lag > p.placements_max_lag
        )
        shedding = shared and p.shared_shedding
        # Per-candidate work is what a decision over many endpoints costs:
        # C-level maps and dicts, no Python call per candidate.
        load_list = list(map(_LOAD, candidates))
        total = sum(load_list)
        floor = p.shared_min_overload if shared else p.min_overload
        capacity = (
            SheddingCapacity(candidates, p.epsilon, floor, total, self._key(request, hashes))
            if shedding
            else Capacity(candidates, p.epsilon, floor, total)
        )
        matches: dict[str, float] = {}
        best = 0.0
        low, high = min(load_list), max(load_list)
        if (
            not shedding
            and high - low > p.balance_abs_threshold
            and high > p.balance_rel_threshold * low
        ):
            chosen = min(candidates, key=lambda e: (e.load, e.id))
            reason = "load_guard"
        else:
            if tokens is None:
                views = dict(zip(ids, candidates, strict=True))
                matches = self.index.match(hashes, ids) if hashes else {}  # type: ignore[assignment]
                hits = {e: "prefix_hit" for e, n in matches.items() if n >= p.min_match_blocks}
            else:
                matches, hits, views = self._matches(hashes, prompt_len, tokens, candidates, live)
            # Only the endpoints that hold the prompt's head are worth a look.
            eligible = [e for eid in hits if capacity.fits(e := views[eid], e.load)]
            if eligible:
                best = max(matches[e.id] for e in eligible)
                chosen = min(
                    (e for e in eligible if matches[e.id] == best),
                    key=lambda e: (e.load, hits[e.id] == "prefix_hit", e.id),
                )
                reason = hits[chosen.id]
            else:
                # The character path's map of every candidate serves here too.
                every = views if tokens is None else dict(zip(ids, candidates, strict=True))
                chosen, reason = self._place_new(
                    self._key(request, hashes),
                    candidates,
                    every,
                    capacity,
                    place_shared,
                    len(hashes) if hashes else 1,
                )

        def failover() -> list[EndpointView]:
            """Holders of the prefix by match length, then the rest by load."""
            by_id = dict(zip(ids, candidates, strict=True))
            held = sorted(
                (by_id[eid] for eid in matches if eid != chosen.id),
                key=lambda e: (-matches[e.id], e.load, e.id),
            )
            rest = [e for e in sorted(candidates, key=_LOAD) if e.id not in matches]
            return held + [e for e in rest if e is not chosen]

        if hashes is not None:
            self._place(hashes, chosen)
        handle = None
        if tokens is None:
            match_len = min(prompt_len, int(best) * p.block_chars)
        else:
            match_len = min(prompt_len, round(best * prompt_len / tokens.num_tokens))
            blocks = live_blocks(chosen)
            if blocks is not None:
                handle = self.in_flight.add(chosen.id, tokens.block_hashes(block_size(blocks)))
        return Decision(
            Ranking(chosen, failover),
            reason,
            match_len=match_len,
            prompt_len=prompt_len,
            memo=(hashes or [], chosen.id, candidates, handle),
        )

    def _matches(
        self,
        hashes: list[int] | None,
        prompt_len: int,
        tokens: PromptTokens,
        candidates: Sequence[EndpointView],
        live: list[tuple[EndpointView, HeldBlocks]],
    ) -> tuple[dict[str, float], dict[str, str], dict[str, EndpointView]]:
        """Each endpoint's match in tokens (those with any), the reason of
        those whose match is long enough to count, by source (``live``: the
        candidates whose events are live, and their blocks), and the views
        of the endpoints that match (by id)."""
        p = self.params
        matches: dict[str, float] = {}
        hits: dict[str, str] = {}
        views: dict[str, EndpointView] = {}
        approximate: dict[str, EndpointView] = {}
        in_flight = self.in_flight
        num_tokens = tokens.num_tokens
        # Comprehensions, not a loop body per candidate: over 64 endpoints the
        # per-candidate bytecode was the larger part of a decision.
        if len(live) < len(candidates):
            approximate = {e.id: e for e in candidates if (b := e.blocks) is None or b.stale}
        # An endpoint that stored nothing yet has no block size: the default's
        # (one group, not two, while some endpoints of a fleet are idle).
        sizes = set(map(_BLOCK_SIZE, map(_SECOND, live)))
        if 0 in sizes:
            sizes.discard(0)
            sizes.add(DEFAULT_BLOCK_SIZE)
        for size in sizes:  # one size in a fleet, as a rule
            ours = tokens.block_hashes(size)
            if not ours:
                continue
            group = (
                live
                if len(sizes) == 1
                else [(e, b) for e, b in live if (b.block_size or DEFAULT_BLOCK_SIZE) == size]
            )
            first = ours[0]
            pending_at = in_flight.holding(first)
            hint = self._hints.get(first, 0)
            # Most endpoints hold not even the first block: one lookup each, in C.
            for e, b in [(e, b) for e, b in group if first in b.roots or e.id in pending_at]:
                held = b.hashes
                precise = leading(held, ours, hint) if first in held else 0
                if precise and precise != hint:
                    if len(self._hints) >= MAX_MATCH_HINTS:
                        self._hints.clear()
                    self._hints[first] = hint = precise
                pending = in_flight.match(e.id, ours) if e.id in pending_at else 0
                n = precise if precise >= pending else pending
                if not n:
                    continue
                # Every full block held is all an engine can reuse: the whole prompt.
                whole = num_tokens if n == len(ours) else n * size
                matches[e.id] = whole
                views[e.id] = e
                if whole >= p.min_match_tokens:
                    hits[e.id] = "precise_hit" if precise >= pending else "inflight_hit"
        if approximate and hashes:
            per_char = tokens.num_tokens / prompt_len
            for eid, n in self.index.match(hashes, approximate).items():
                matches[eid] = min(prompt_len, n * p.block_chars) * per_char
                views[eid] = approximate[eid]
                if n >= p.min_match_blocks:
                    hits[eid] = "prefix_hit"
        return matches, hits, views

    def _place_new(
        self,
        key: int,
        candidates: Sequence[EndpointView],
        by_id: dict[str, EndpointView],
        capacity: Capacity,
        shared: bool,
        prompt_blocks: int = 1,
    ) -> tuple[EndpointView, str]:
        """A prefix with no history: of the first ``ring_choices`` endpoints
        along the ring from its key that are not overloaded, the one with the
        fewest requests awaiting a first byte (per unit of weight), the
        earlier on a tie. Endpoints whose share of the
        index is full are passed over while one further on has room. Only the
        first few ring steps are walked, not the whole ring. With ``shared``
        and other routers placing too (``shared_below``): the first endpoint
        within the bounded load, as every router would choose."""
        choices = self.params.ring_choices
        if shared:
            choices = 1
        walk = max(MAX_SPILL_WALK, choices)
        owner: EndpointView | None = None
        fitting: list[tuple[float, int, EndpointView]] = []
        roomy: list[tuple[float, int, EndpointView]] = []
        ring = self._rings.ring(candidates)
        order: Iterable[str] = ring.walk(key)
        home = None
        if shared and self._homes is not None:
            fit = self._full_blocks(candidates[0]) // max(1, prompt_blocks)
            home = self._homes.home(key, ring, list(by_id), fit)
            if home is not None:
                order = [home, *(x for x in ring.walk(key) if x != home)]
        for n, endpoint_id in enumerate(order):
            e = by_id[endpoint_id]
            owner = owner or e
            if not capacity.fits(e, e.load):
                continue
            choice = (e.awaiting_first / e.weight, n, e)
            if len(fitting) < choices:
                fitting.append(choice)
            if shared:
                break
            # An endpoint holds at least one block: none indexed (as on
            # KV events, where the character index is not fed) is room.
            occupancy = self.index.occupancy(endpoint_id)
            if not shared and (not occupancy or occupancy < self.capacity_blocks(e)):
                roomy.append(choice)
                if len(roomy) == choices:
                    break
            if n + 1 >= walk:
                break
        pool = roomy or fitting
        if not pool:
            assert owner is not None
            return owner, "fallback"
        _, n, chosen = min(pool, key=lambda c: c[:2])
        if chosen is not pool[0][2]:
            return chosen, "ring_less_loaded"
        if n == 0:
            if home is not None and home != next(ring.walk(key)):
                return chosen, "balanced_home"
            return chosen, "ring_owner"
        return chosen, "cache_spill" if chosen is not fitting[0][2] else "ring_spill"

    def observe(self, decision: Decision, endpoint_id: str, outcome: Outcome) -> None:
        memo = decision.memo
        if memo is None:
            return
        hashes, recorded, candidates, handle = memo
        # The attempt is over: its blocks are in the endpoint's events by now
        # (or were never cached, or are gone), which then say which.
        self.in_flight.release(handle)
        if not outcome.ok:
            return
        if outcome.prompt_tokens and decision.prompt_len and self.params.learn_chars_per_token:
            # The index counts characters, caches count tokens: learn the ratio
            # of this model's tokenizer from the usage the backend reports.
            # A running mean at first, then an exponential one that follows drift.
            self._ratio_samples += 1
            ratio = decision.prompt_len / outcome.prompt_tokens
            weight = max(0.02, 1.0 / self._ratio_samples)
            self.chars_per_token += (ratio - self.chars_per_token) * weight
        if endpoint_id == recorded:
            return
        for endpoint in candidates:
            if endpoint.id == endpoint_id:
                self._place(hashes, endpoint)

    def forget(self, endpoint_id: str) -> None:
        self.index.forget(endpoint_id)
        self.in_flight.forget(endpoint_id)
        self._counted.forget(endpoint_id)

    def index_stats(self) -> IndexStats:
        return self.index.stats()
