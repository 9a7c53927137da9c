from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from policies import build_policy
from policies.base import EndpointView, Outcome, RequestView
from policies.blocks import EndpointBlocks, chain_hashes
from policies.composite import ComponentSpec, Composite, CompositeParams
from policies.precise import InFlight, index_source, leading
from policies.prefix import PrefixAffinity, PrefixAffinityParams

BS = 16


class FakeTokens:
    """A prompt's tokens, as the router's tokenizer would give them."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        self.num_tokens = len(self.ids)

    def block_hashes(self, block_size: int) -> list[int]:
        return chain_hashes(self.ids, block_size)


def prompt(seed: int, n: int = 320) -> tuple[dict[str, Any], FakeTokens]:
    """A chat body of ~4 characters per token and its tokens (``n`` of them)."""
    rng = random.Random(seed)
    ids = [rng.randrange(10, 30000) for _ in range(n)]
    text = " ".join(f"w{i % 1000:03d}" for i in ids)[: 4 * n]
    return {"messages": [{"role": "user", "content": text}]}, FakeTokens(ids)


def holding(endpoint_id: str, *held: FakeTokens, blocks: int | None = None) -> EndpointBlocks:
    """An endpoint's event-fed blocks, holding the prompts given (the first
    ``blocks`` blocks of each, default all), and live."""
    eb = EndpointBlocks(endpoint_id, max_blocks=100_000)
    for n, tokens in enumerate(held):
        ids = tokens.ids[: BS * blocks] if blocks is not None else tokens.ids
        count = len(ids) // BS
        eb.stored([hash((endpoint_id, n, i)) for i in range(count)], None, ids, BS)
    eb.mark_live()
    return eb


def view(endpoint_id: str, blocks: EndpointBlocks | None = None, load: int = 0) -> EndpointView:
    return EndpointView(
        id=endpoint_id, url="", kind="vllm", in_flight=load, blocks=blocks,
        kv_capacity_tokens=100_000,
    )  # fmt: skip


def affinity(**params: Any) -> PrefixAffinity:
    return PrefixAffinity(PrefixAffinityParams(**params), random.Random(0))


def request(body: dict[str, Any], tokens: FakeTokens | None) -> RequestView:
    return RequestView("m", "chat", body, tokens=tokens)


def test_index_source_per_endpoint() -> None:
    live = holding("a")
    stale = EndpointBlocks("b", 10)
    assert index_source(view("b", stale)) == "stale"  # no events yet
    stale.mark_live()
    assert index_source(view("b", stale)) == "precise"  # live, holding nothing
    stale.mark_stale("publisher silent")
    assert index_source(view("a", live)) == "precise"
    assert index_source(view("a", live), tokens_known=False) == "approximate"
    assert index_source(view("b", stale)) == "stale"
    assert index_source(view("c")) == "approximate"


def test_leading_counts_the_held_prefix() -> None:
    hashes = list(range(100))
    for n in (0, 1, 2, 3, 7, 64, 99, 100):
        assert leading(set(hashes[:n]), hashes) == n


class CountingSet(set[int]):
    def __init__(self, items: Sequence[int]) -> None:
        super().__init__(items)
        self.lookups = 0

    def __contains__(self, item: object) -> bool:
        self.lookups += 1
        return super().__contains__(item)


@given(st.integers(1, 300), st.data())
@settings(max_examples=300, deadline=None)
def test_leading_with_any_hint_counts_the_held_prefix(length: int, data: st.DataObject) -> None:
    """A hint (an earlier answer) changes where the search looks, never what
    it finds; a right one costs two lookups past the first block."""
    hashes = list(range(1000, 1000 + length))
    n = data.draw(st.integers(0, length))
    hint = data.draw(st.integers(-1, length + 2))
    held = CountingSet(hashes[:n])
    assert leading(held, hashes, hint) == n
    held.lookups = 0
    if n > 1:
        assert leading(held, hashes, n) == n and held.lookups <= 3


def test_in_flight_decisions_are_counted_until_released_and_bounded() -> None:
    inflight = InFlight(max_decisions=2)
    one = inflight.add("a", [1, 2, 3])
    two = inflight.add("a", [1, 2])
    assert inflight.match("a", [1, 2, 3, 4]) == 3
    inflight.release(one)
    assert inflight.match("a", [1, 2, 3, 4]) == 2
    inflight.add("b", [7])
    inflight.add("b", [8])  # over the bound: the oldest, ``two``, goes
    assert inflight.match("a", [1, 2]) == 0
    inflight.release(two)  # already gone: nothing happens
    assert len(inflight) == 2


@given(
    st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    st.integers(1, 3000),
    st.integers(0, 3000),
)
@settings(max_examples=200, deadline=None)
def test_in_flight_matches_are_exact_or_at_most_an_eighth_short(
    lengths: list[int], query: int, shared: int
) -> None:
    inflight = InFlight()
    chains = [list(range(i * 10_000, i * 10_000 + n)) for i, n in enumerate(lengths)]
    for chain in chains:
        inflight.add("a", chain)
    # The query shares its first ``shared`` blocks with the first chain.
    ours = chains[0][:shared] + list(range(-1, -1 - query, -1))
    truth = max(leading(set(c), ours) for c in chains)
    got = inflight.match("a", ours)
    assert got <= truth
    assert got >= truth * 8 // 9
    # A chain in flight whole matches exactly.
    assert inflight.match("a", chains[-1]) == len(chains[-1])


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "release", "forget"]),
            st.sampled_from("abc"),
            st.integers(0, 2),
            st.integers(1, 40),
        ),
        max_size=40,
    ),
    st.integers(1, 3),
)
@settings(max_examples=200, deadline=None)
def test_in_flight_holders_of_a_first_block_are_exactly_those_that_match(
    ops: list[tuple[str, str, int, int]], bound: int
) -> None:
    """``holding(first)`` is what prefix_affinity asks instead of every
    candidate: after any adds (prompts of three first blocks), releases,
    forgets and drops past the bound, it holds exactly the endpoints where
    a prompt starting with that block matches in flight."""
    inflight = InFlight(max_decisions=bound * 3)
    handles: list[int | None] = []
    for op, endpoint, first, n in ops:
        if op == "add":
            handles.append(inflight.add(endpoint, [first, *range(100, 100 + n)]))
        elif op == "release" and handles:
            inflight.release(handles.pop(n % len(handles)))
        elif op == "forget":
            inflight.forget(endpoint)
        for f in range(3):
            matching = {e for e in "abc" if inflight.match(e, [f, 100]) > 0}
            assert {e for e in "abc" if e in inflight.holding(f)} == matching


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["store_root", "store_root", "extend", "remove", "clear"]),
            st.integers(0, 3),  # which of four prompts
            st.integers(1, 4),  # how many blocks
        ),
        max_size=40,
    )
)
@settings(max_examples=200, deadline=None)
def test_roots_are_exactly_the_held_first_blocks(ops: list[tuple[str, int, int]]) -> None:
    """``EndpointBlocks.roots`` is what prefix_affinity asks each candidate
    instead of its whole ``hashes``: after any stores (from a chain's start or
    extending a held block), repeats, evictions and clears, a prompt's first
    block is in ``roots`` exactly when it is in ``hashes``."""
    prompts = [[p * 1000 + i for i in range(BS * 4)] for p in range(4)]
    firsts = [chain_hashes(ids, BS)[0] for ids in prompts]
    eb = EndpointBlocks("e", max_blocks=1000)
    engine: list[list[int]] = [[] for _ in prompts]  # engine hashes stored, per prompt

    def engine_hash(p: int, i: int) -> int:
        return p * 100 + i

    for op, p, n in ops:
        ids, held = prompts[p], engine[p]
        if op == "store_root":  # the engine stores blocks 0..n-1 (repeats change nothing)
            eb.stored([engine_hash(p, i) for i in range(n)], None, ids[: BS * n], BS)
            held[:] = sorted(set(held) | {engine_hash(p, i) for i in range(n)})
        elif op == "extend" and held:  # one block more, chained on the last held
            last = max(held) - p * 100
            if last + 1 < 4:
                eb.stored(
                    [engine_hash(p, last + 1)],
                    engine_hash(p, last),
                    ids[BS * (last + 1) : BS * (last + 2)],
                    BS,
                )
                held.append(engine_hash(p, last + 1))
        elif op == "remove" and held:  # evicted tail first, or the root alone
            victim = held.pop() if n > 1 else held.pop(0)
            eb.removed([victim])
        elif op == "clear":
            eb.cleared()
            for h in engine:
                h.clear()
        for first in firsts:
            assert (first in eb.roots) == (first in eb.hashes)
        assert eb.roots <= set(eb.hashes)


def test_a_precise_hit_wins_over_the_approximate_belief() -> None:
    body, tokens = prompt(1)
    policy = affinity()
    # The router once sent this prompt to "a" (its character index says so);
    # the events say "b" holds it, and "a" does not.
    policy.index.insert(policy.hashes(request(body, None))[0], "a", 10_000)
    views = [view("a", holding("a")), view("b", holding("b", tokens)), view("c", holding("c"))]
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == ("b", "precise_hit")
    assert decision.match_len == decision.prompt_len
    # Without tokens (no tokenizer configured), only the character index counts.
    decision = affinity_with_a(body).rank(request(body, None), views)
    assert (decision.ranked[0].id, decision.reason) == ("a", "prefix_hit")


def test_match_hints_follow_each_prompt_and_stay_bounded(monkeypatch: Any) -> None:
    """Each endpoint's match is found as without hints, whatever the last
    answer for the same first block was (here: a longer one elsewhere), and
    the hints are dropped past their bound."""
    import policies.prefix

    body, tokens = prompt(3)
    half = holding("a", tokens, blocks=len(tokens.ids) // BS // 2)
    policy = affinity(min_match_tokens=1)
    views = [view("a", half), view("b", holding("b", tokens)), view("c", holding("c"))]
    for _ in range(3):
        decision = policy.rank(request(body, tokens), views)
        assert decision.ranked[0].id == "b" and decision.match_len == decision.prompt_len
        policy.observe(decision, "b", Outcome(True))
        # The longer match elsewhere is no answer for "a": alone, "a" matches half.
        alone = policy.rank(request(body, tokens), [views[0], views[2]])
        assert alone.ranked[0].id == "a" and alone.reason == "precise_hit"
        assert alone.match_len == decision.match_len // 2
        policy.observe(alone, "a", Outcome(True))
    monkeypatch.setattr(policies.prefix, "MAX_MATCH_HINTS", 2)
    for seed in range(10, 16):
        other, other_tokens = prompt(seed)
        policy.rank(request(other, other_tokens), [view("d", holding("d", other_tokens))])
        assert len(policy._hints) <= 2


def affinity_with_a(body: dict[str, Any]) -> PrefixAffinity:
    policy = affinity()
    policy.index.insert(policy.hashes(request(body, None))[0], "a", 10_000)
    return policy


def test_a_stale_endpoint_is_matched_by_the_approximate_index() -> None:
    body, tokens = prompt(2)
    policy = affinity()
    stale = holding("b", tokens)
    stale.mark_stale("publisher silent")
    # The router's own record says "a" got this prompt; "b"'s stale events
    # claim it too, but are not to be trusted.
    policy.index.insert(policy.hashes(request(body, None))[0], "a", 10_000)
    views = [view("a"), view("b", stale), view("c")]
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == ("a", "prefix_hit")
    stale.mark_live()
    decision = policy.rank(request(body, tokens), views)
    # Equal matches (the whole prompt): the less loaded, then precise first.
    assert (decision.ranked[0].id, decision.reason) == ("b", "precise_hit")


def test_mixed_fleets_compare_matches_in_tokens() -> None:
    body, tokens = prompt(3, n=640)
    policy = affinity()
    hashes = policy.hashes(request(body, None))[0]
    # "a" (no events) is believed to hold 3/4 of the prompt's characters;
    # "b"'s events say it holds half of the prompt's tokens.
    policy.index.insert(hashes[: len(hashes) * 3 // 4], "a", 10_000)
    views = [view("a"), view("b", holding("b", tokens, blocks=20)), view("c")]
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == ("a", "prefix_hit")
    assert [e.id for e in decision.ranked[:2]] == ["a", "b"]
    # Now "b" holds 7/8 of it (a fresh policy: the first decision went to "a").
    policy = affinity()
    policy.index.insert(hashes[: len(hashes) * 3 // 4], "a", 10_000)
    views[1] = view("b", holding("b", tokens, blocks=35))
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == ("b", "precise_hit")
    assert decision.match_len == round(35 * BS * decision.prompt_len / tokens.num_tokens)


def test_a_short_precise_match_is_no_match() -> None:
    body, tokens = prompt(4)
    policy = affinity(min_match_tokens=64)
    # The same first 3 blocks (48 tokens: a template's fixed head, say).
    views = [view("a", holding("a", tokens, blocks=3)), view("b", holding("b"))]
    decision = policy.rank(request(body, tokens), views)
    assert decision.reason.startswith("ring") or decision.reason == "cache_spill"
    views = [view("a", holding("a", tokens, blocks=4)), view("b", holding("b"))]
    policy = affinity(min_match_tokens=64)
    assert policy.rank(request(body, tokens), views).reason == "precise_hit"


def test_the_load_guard_still_applies() -> None:
    body, tokens = prompt(5)
    policy = affinity()
    views = [view("a", holding("a", tokens), load=20), view("b", holding("b"), load=2)]
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == ("b", "load_guard")


def test_bounded_load_spills_a_precise_holder() -> None:
    body, tokens = prompt(6)
    policy = affinity(min_overload=0, balance_abs_threshold=100)
    views = [
        view("a", holding("a", tokens), load=9),
        view("b", holding("b", tokens, blocks=10), load=1),
        view("c", holding("c"), load=1),
    ]
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == ("b", "precise_hit")
    assert decision.ranked[1].id == "a"  # failover: the next best holder


def test_a_burst_follows_the_first_request_before_any_event() -> None:
    body, tokens = prompt(7)
    policy = affinity()
    views = [view(e, holding(e)) for e in "abcd"]
    first = policy.rank(request(body, tokens), views)
    assert first.reason.startswith("ring")
    owner = first.ranked[0].id
    burst = [policy.rank(request(body, tokens), views) for _ in range(5)]
    assert {(d.ranked[0].id, d.reason) for d in burst} == {(owner, "inflight_hit")}
    # Every request finished; the events came and say the owner holds it.
    for d in (first, *burst):
        policy.observe(d, owner, Outcome(True))
    assert len(policy.in_flight) == 0
    views = [view(e, holding(e, tokens) if e == owner else holding(e)) for e in "abcd"]
    decision = policy.rank(request(body, tokens), views)
    assert (decision.ranked[0].id, decision.reason) == (owner, "precise_hit")


def test_finished_requests_no_longer_count_once_events_say_otherwise() -> None:
    body, tokens = prompt(8)
    policy = affinity()
    views = [view(e, holding(e)) for e in "abcd"]
    first = policy.rank(request(body, tokens), views)
    policy.observe(first, first.ranked[0].id, Outcome(False))
    # The engine evicted (or never cached) the blocks: no event says it holds them.
    decision = policy.rank(request(body, tokens), views)
    assert decision.reason != "inflight_hit"
    assert decision.reason != "prefix_hit"


def test_forget_drops_in_flight_decisions() -> None:
    body, tokens = prompt(9)
    policy = affinity()
    views = [view(e, holding(e)) for e in "ab"]
    owner = policy.rank(request(body, tokens), views).ranked[0].id
    policy.forget(owner)
    assert len(policy.in_flight) == 0


def precise_composite(**params: Any) -> Composite:
    spec = ComponentSpec.model_validate({"name": "precise_prefix", **params})
    return Composite(CompositeParams(scorers=(spec,)), random.Random(0))


def test_precise_prefix_scores_shares_of_the_prompt() -> None:
    body, tokens = prompt(10, n=640)
    policy = precise_composite()
    (_, scorer) = policy.scorers[0]
    hashes = policy.scorers[0][1].score(request(body, None), [view("x")])[1][0]
    scorer.index.insert(hashes[: len(hashes) // 4], "a", 10_000)  # type: ignore[attr-defined]
    views = [view("a"), view("b", holding("b", tokens, blocks=20)), view("c", holding("c", tokens))]
    scores, _ = scorer.score(request(body, tokens), views)
    assert scores == [(len(hashes) // 4) / len(hashes), 0.5, 1.0]
    assert policy.rank(request(body, tokens), views).ranked[0].id == "c"


def test_precise_prefix_follows_its_own_recent_picks() -> None:
    body, tokens = prompt(11)
    policy = precise_composite()
    views = [view(e, holding(e)) for e in "abcd"]
    first = policy.rank(request(body, tokens), views).ranked[0].id
    again = [policy.rank(request(body, tokens), views).ranked[0].id for _ in range(5)]
    assert again == [first] * 5


def test_only_token_aware_policies_ask_for_tokens() -> None:
    assert affinity().uses_tokens
    assert precise_composite().uses_tokens
    assert not build_policy("composite", {"scorers": ["prefix_match"]}, random.Random()).uses_tokens
    assert not build_policy("round_robin", {}, random.Random()).uses_tokens
