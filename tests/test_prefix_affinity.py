"""prefix_affinity, the ring and the index: exact, seeded, property-checked."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import EndpointView, RequestView, build_policy
from policies.base import Decision, Outcome
from policies.prefix import PrefixAffinity
from policies.prefix_index import PrefixIndex
from policies.prompt import block_hashes, canonical_prompt, model_seed
from policies.ring import Capacity, HashRing, SheddingCapacity, bounded_capacity, ring_order

SYSTEM = "You are a support agent for ACME. " * 40  # ~1.3k characters


def chat(system: str, question: str, model: str = "m", **extra: Any) -> RequestView:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        **extra,
    }
    return RequestView(model=model, endpoint="chat", body=body)


def fleet(
    n: int,
    loads: dict[str, int] | None = None,
    awaiting: dict[str, int] | None = None,
    **kw: Any,
) -> list[EndpointView]:
    """``loads``: requests in flight; ``awaiting``: of those (added to them), the
    ones still waiting for their first byte."""
    loads, awaiting = loads or {}, awaiting or {}
    return [
        EndpointView(
            id=f"e{i}",
            url=f"http://e{i}",
            kind="vllm",
            in_flight=loads.get(f"e{i}", 0) + awaiting.get(f"e{i}", 0),
            awaiting_first=awaiting.get(f"e{i}", 0),
            **kw,
        )
        for i in range(n)
    ]


def policy(**params: Any) -> PrefixAffinity:
    p = build_policy("prefix_affinity", params, random.Random(0))
    assert isinstance(p, PrefixAffinity)
    return p


# -- prompts -------------------------------------------------------------------


def test_canonical_prompt_ignores_sampling_params_and_keeps_order() -> None:
    a = canonical_prompt(chat("sys", "q", temperature=0.1).body)
    b = canonical_prompt(chat("sys", "q", temperature=0.9, max_tokens=3).body)
    assert a == b
    swapped = {"messages": [{"role": "user", "content": "sys"}, {"role": "system", "content": "q"}]}
    assert canonical_prompt(swapped) != a
    assert canonical_prompt({"prompt": "hello"}) == "hello"


def test_multimodal_parts_count_by_text_and_a_hash() -> None:
    def body(url: str) -> dict[str, Any]:
        return {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ]
        }

    one, same, other = (canonical_prompt(body(u)) for u in ("data:a", "data:a", "data:b"))
    assert one == same != other
    assert "what is this?" in one


def test_block_hashes_chain_and_are_seeded_by_model() -> None:
    seed = model_seed("m")
    a = block_hashes("x" * 100 + "A" * 50, 50, seed)
    b = block_hashes("x" * 100 + "B" * 50, 50, seed)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes("x" * 100, 50, model_seed("other"))[0] != a[0]
    # A block's hash covers what came before it.
    assert block_hashes("y" * 50 + "x" * 50, 50, seed)[1] != a[1]
    assert block_hashes("é" * 60, 50, seed) == block_hashes("é" * 60, 50, seed)
    assert len(block_hashes("é" * 60, 50, seed)) == 2  # blocks count characters


# -- ring ----------------------------------------------------------------------


def owners(ring: HashRing, keys: list[int]) -> list[str]:
    return [next(ring.walk(k)) for k in keys]


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**32))
def test_adding_an_endpoint_moves_only_keys_to_it_about_one_nth(n: int, salt: int) -> None:
    keys = [random.Random(salt + i).getrandbits(64) for i in range(2000)]
    before = owners(HashRing([(f"e{i}", 1.0) for i in range(n)]), keys)
    after = owners(HashRing([(f"e{i}", 1.0) for i in range(n + 1)]), keys)
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert all(y == f"e{n}" for _, y in moved)
    share = len(moved) / len(keys)
    assert 0.5 / (n + 1) <= share <= 1.6 / (n + 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 12), st.integers(0, 2**32))
def test_removing_an_endpoint_moves_only_its_keys(n: int, salt: int) -> None:
    keys = [random.Random(salt + i).getrandbits(64) for i in range(2000)]
    full = owners(HashRing([(f"e{i}", 1.0) for i in range(n)]), keys)
    gone = f"e{salt % n}"
    less = owners(HashRing([(f"e{i}", 1.0) for i in range(n) if f"e{i}" != gone]), keys)
    for x, y in zip(full, less, strict=True):
        assert x in (y, gone)


def test_bounded_load_passes_keys_on() -> None:
    cands = fleet(4)
    ring = HashRing([(e.id, 1.0) for e in cands])
    key = 12345
    owner = next(ring.walk(key))
    order, is_owner = ring_order(ring, key, cands, 0.25)
    assert order[0].id == owner and is_owner
    busy = fleet(4, loads={owner: 10})
    # total 10 + 1 -> fair share 2.75, cap ceil(1.25 * 2.75) = 4 < 11
    assert bounded_capacity(busy, 0.25)[owner] == 4
    order, is_owner = ring_order(ring, key, busy, 0.25)
    assert order[0].id != owner and not is_owner
    assert order[1].id == owner  # still next in the failover order


# -- prefix_affinity --------------------------------------------------------------


def test_new_prefix_goes_to_ring_owner_then_hits() -> None:
    p = policy()
    cands = fleet(4)
    first = p.rank(chat(SYSTEM, "one"), cands)
    assert first.reason == "ring_owner"
    second = p.rank(chat(SYSTEM, "two"), cands)
    assert second.reason == "prefix_hit"
    assert second.ranked[0].id == first.ranked[0].id
    assert second.match_len >= len(SYSTEM) - 256
    assert second.prompt_len == len(canonical_prompt(chat(SYSTEM, "two").body))


def ring_walk(p: PrefixAffinity, req: RequestView, cands: list[EndpointView]) -> list[str]:
    """The endpoints in ring order from the request's first block."""
    ring = HashRing(sorted((e.id, e.weight) for e in cands), p.params.vnodes)
    return list(ring.walk(p.hashes(req)[0][0]))


def test_new_prefix_goes_to_the_ring_owner_with_least_awaiting_first_byte() -> None:
    p = policy(ring_choices=2)
    req = chat(SYSTEM, "q")
    owner, second, third, fourth = ring_walk(p, req, fleet(4))
    # The two endpoints further along are idle, but only the first two are choices.
    d = p.rank(req, fleet(4, awaiting={owner: 2, second: 1}))
    assert (d.ranked[0].id, d.reason) == (second, "ring_less_loaded")
    assert d.ranked[-1].id == owner  # failover: the rest by load
    assert {third, fourth} == {e.id for e in d.ranked[1:3]}


def test_decoding_requests_do_not_move_a_new_prefix_off_its_owner() -> None:
    # The owner has more in flight, but all of it past its first token: it has
    # no prefill ahead of a new prompt, the second has one. Before
    # awaiting_first, placement compared in-flight counts and took the second.
    p = policy(ring_choices=2)
    req = chat(SYSTEM, "q")
    owner, second, *_ = ring_walk(p, req, fleet(4))
    d = p.rank(req, fleet(4, loads={owner: 3}, awaiting={second: 1}))
    assert (d.ranked[0].id, d.reason) == (owner, "ring_owner")
    # And the other way round: fewer in flight, but one of them still prefilling.
    p = policy(ring_choices=2)
    d = p.rank(req, fleet(4, loads={second: 3}, awaiting={owner: 1}))
    assert (d.ranked[0].id, d.reason) == (second, "ring_less_loaded")


def test_equal_awaiting_sends_a_new_prefix_to_the_ring_owner() -> None:
    p = policy()
    req = chat(SYSTEM, "q")
    owner, second, third, fourth = ring_walk(p, req, fleet(4))
    d = p.rank(
        req, fleet(4, loads={second: 2}, awaiting={e: 1 for e in (owner, second, third, fourth)})
    )
    assert (d.ranked[0].id, d.reason) == (owner, "ring_owner")


def test_one_ring_choice_sends_a_new_prefix_to_its_owner_however_busy() -> None:
    p = policy(ring_choices=1)
    req = chat(SYSTEM, "q")
    owner, *_ = ring_walk(p, req, fleet(4))
    d = p.rank(req, fleet(4, loads={owner: 1}, awaiting={owner: 2}))
    assert (d.ranked[0].id, d.reason) == (owner, "ring_owner")


def test_by_default_four_ring_choices() -> None:
    p = policy()
    req = chat(SYSTEM, "q")
    *_, fourth = ring_walk(p, req, fleet(8))[:4]
    awaiting = {e.id: 1 for e in fleet(8)} | {fourth: 0}
    d = p.rank(req, fleet(8, awaiting=awaiting))
    assert (d.ranked[0].id, d.reason) == (fourth, "ring_less_loaded")


def test_more_ring_choices_look_further_along_the_ring() -> None:
    p = policy(ring_choices=3)
    req = chat(SYSTEM, "q")
    owner, second, third, _ = ring_walk(p, req, fleet(4))
    d = p.rank(req, fleet(4, awaiting={owner: 2, second: 2, third: 1}))
    assert (d.ranked[0].id, d.reason) == (third, "ring_less_loaded")


def test_ring_choices_compare_load_per_unit_of_weight() -> None:
    p = policy(ring_choices=2)
    weights = {"e0": 2.0, "e1": 1.0, "e2": 1.0, "e3": 1.0}

    def cands(loads: dict[str, int]) -> list[EndpointView]:
        return [
            EndpointView(
                id=e,
                url=f"http://{e}",
                kind="vllm",
                weight=w,
                in_flight=loads.get(e, 0),
                awaiting_first=loads.get(e, 0),
            )
            for e, w in weights.items()
        ]

    # A new prefix whose ring owner is the endpoint of weight 2.
    req = next(
        r
        for r in (chat(f"tenant {i}: " + SYSTEM, "q") for i in range(100))
        if ring_walk(p, r, cands({}))[0] == "e0"
    )
    _, second, *_ = ring_walk(p, req, cands({}))
    # 3 requests on weight 2 are less load than 2 on weight 1.
    d = p.rank(req, cands({"e0": 3, second: 2}))
    assert (d.ranked[0].id, d.reason) == ("e0", "ring_owner")


@pytest.mark.parametrize("choices", [1, 2, 4])
def test_two_routers_with_no_shared_state_agree_on_new_prefixes(choices: int) -> None:
    a, b = policy(ring_choices=choices), policy(ring_choices=choices)
    cands = fleet(8)
    # Router a has history of its own (other prefixes in its index); b has none.
    for i in range(20):
        a.rank(chat(f"other {i}: " + SYSTEM, "hi"), cands)
    rng = random.Random(5)
    moved = 0
    for i in range(50):
        # Equal loads: both send the new prefix to its ring owner.
        req = chat(f"tenant {i}: " + SYSTEM, "hi")
        owner, *_ = ring_walk(a, req, cands)
        even = fleet(
            8, loads={f"e{j}": j % 2 for j in range(8)}, awaiting={f"e{j}": 2 for j in range(8)}
        )
        assert a.rank(req, even).ranked[0].id == owner
        assert b.rank(req, list(reversed(even))).ranked[0].id == owner
        # Unequal loads (the same seen by both): both take the one of the first
        # `choices` along the ring with the least awaiting a first byte, the
        # earliest on a tie.
        req = chat(f"tenant {i} again: " + SYSTEM, "hi")
        walk = ring_walk(a, req, cands)[:choices]
        awaiting = {f"e{j}": rng.randint(0, 3) for j in range(8)}
        expected = min(walk, key=lambda e: (awaiting[e], walk.index(e)))
        moved += expected != walk[0]
        seen = fleet(8, awaiting=awaiting)
        assert a.rank(req, seen).ranked[0].id == expected
        assert b.rank(req, list(reversed(seen))).ranked[0].id == expected
    assert moved == {1: 0, 2: 20, 4: 27}[choices]  # of 50


def test_load_guard_wins_over_affinity() -> None:
    p = policy(balance_abs_threshold=4, balance_rel_threshold=1.5)
    cands = fleet(2)
    home = p.rank(chat(SYSTEM, "q"), cands).ranked[0].id
    other = "e1" if home == "e0" else "e0"
    busy = fleet(2, loads={home: 10, other: 2})
    d = p.rank(chat(SYSTEM, "q2"), busy)
    assert (d.reason, d.ranked[0].id) == ("load_guard", other)
    # The guarded request taught the index that `other` holds the prompt too, so
    # the next one goes to the less loaded of the two holders.
    d = p.rank(chat(SYSTEM, "q3"), fleet(2, loads={home: 3, other: 2}))
    assert (d.reason, d.ranked[0].id) == ("prefix_hit", other)
    # Without the guard, affinity holds up to the bounded-load cap.
    fresh = policy(balance_abs_threshold=100, min_overload=4)
    assert fresh.rank(chat(SYSTEM, "q"), cands).ranked[0].id == home
    d = fresh.rank(chat(SYSTEM, "q4"), fleet(2, loads={home: 3, other: 0}))
    assert (d.reason, d.ranked[0].id) == ("prefix_hit", home)
    # Past min_overload, the bounded-load cap applies: 5 + 0 + 1 -> cap ceil(3.75) = 4.
    d = fresh.rank(chat(SYSTEM, "q5"), fleet(2, loads={home: 5, other: 0}))
    assert (d.reason, d.ranked[0].id) == ("ring_spill", other)


def test_overloaded_holder_is_skipped() -> None:
    p = policy(balance_abs_threshold=1000, min_overload=4)
    cands = fleet(4)
    home = p.rank(chat(SYSTEM, "q"), cands).ranked[0].id
    d = p.rank(chat(SYSTEM, "q2"), fleet(4, loads={home: 6}))
    assert d.ranked[0].id != home
    assert d.reason in ("ring_owner", "ring_spill")
    assert d.ranked[1].id == home  # the best match is still first in failover order


def test_below_the_floor_the_holder_keeps_its_prefix() -> None:
    """Under ``min_overload`` (8 by default) requests, the endpoint holding a
    prompt is not overloaded however idle the others are: a spill would
    prefill the whole prompt again elsewhere."""
    p = policy(balance_abs_threshold=1000)
    home = p.rank(chat(SYSTEM, "q"), fleet(4)).ranked[0].id
    d = p.rank(chat(SYSTEM, "q2"), fleet(4, loads={home: 6}))
    assert (d.reason, d.ranked[0].id) == ("prefix_hit", home)
    d = p.rank(chat(SYSTEM, "q3"), fleet(4, loads={home: 8}))  # 9 > cap ceil(2.8125) and floor
    assert d.ranked[0].id != home


def test_shared_system_prompt_does_not_pin_one_replica() -> None:
    p = policy()
    n = 4
    loads = {f"e{i}": 0 for i in range(n)}
    for i in range(400):
        d = p.rank(chat(SYSTEM, f"question {i}"), fleet(n, loads=loads))
        loads[d.ranked[0].id] += 1
    assert max(loads.values()) / (sum(loads.values()) / n) <= 1.3


def test_min_match_blocks() -> None:
    p = policy(min_match_blocks=3, block_chars=64)
    cands = fleet(4)
    p.rank(chat("s" * 100, "a"), cands)
    d = p.rank(chat("s" * 100, "b"), cands)  # shares about one block only
    assert d.reason in ("ring_owner", "ring_spill")


def test_index_capacity_follows_kv_capacity() -> None:
    p = policy(block_chars=64, chars_per_token=4.0)
    cands = fleet(1, kv_capacity_tokens=160)  # 160 tokens * 4 / 64 = 10 blocks
    assert p.capacity_blocks(cands[0]) == 10
    for i in range(5):
        p.rank(chat(f"{i}" * 300, "q"), cands)
    stats = p.index.stats()
    assert stats.endpoints == {"e0": 10} and stats.evictions > 0


def test_forget_drops_an_endpoint_and_failover_records_the_server() -> None:
    p = policy()
    cands = fleet(3)
    d = p.rank(chat(SYSTEM, "q"), cands)
    home, backup = d.ranked[0].id, d.ranked[1].id
    p.observe(d, backup, Outcome(ok=True))  # the request failed over and succeeded there
    matches = p.index.match(p.hashes(chat(SYSTEM, "q"))[0], [e.id for e in cands])
    assert set(matches) == {home, backup}
    p.forget(home)
    matches = p.index.match(p.hashes(chat(SYSTEM, "q"))[0], [e.id for e in cands])
    assert set(matches) == {backup}


def test_decision_ranks_every_candidate_once() -> None:
    p = policy()
    d: Decision = p.rank(chat(SYSTEM, "q"), fleet(5))
    assert sorted(e.id for e in d.ranked) == [f"e{i}" for i in range(5)]


# -- the index -------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 30), min_size=1, max_size=20)),
        min_size=1,
        max_size=60,
    ),
    st.integers(1, 40),
)
def test_index_never_exceeds_its_cap(
    inserts: list[tuple[int, list[int]]], max_entries: int
) -> None:
    index = PrefixIndex(max_entries)
    for endpoint, hashes in inserts:
        index.insert(hashes, f"e{endpoint}", capacity_blocks=8)
        stats = index.stats()
        assert stats.entries <= max_entries
        assert stats.entries == sum(stats.endpoints.values())
        assert all(n <= 8 for n in stats.endpoints.values())
    for e in range(4):
        index.forget(f"e{e}")
    assert index.stats().entries == 0 and index.stats().distinct_blocks == 0


def test_index_match_counts_leading_blocks_per_endpoint() -> None:
    index = PrefixIndex(100)
    index.insert([1, 2, 3], "a", 10)
    index.insert([1, 2, 9], "b", 10)
    assert index.match([1, 2, 3, 4], ["a", "b", "c"]) == {"a": 3, "b": 2}
    assert index.match([7, 1], ["a", "b"]) == {}
    assert index.match([1, 2, 3], ["b"]) == {"b": 2}


def test_new_prefixes_spill_past_a_full_cache() -> None:
    p = policy(block_chars=64)
    cands = fleet(2, kv_capacity_tokens=64)  # 64 * 4 / 64 = 4 blocks each
    homes = [p.rank(chat(f"tenant {i} " * 10, "q"), cands) for i in range(6)]
    reasons = [d.reason for d in homes]
    assert "cache_spill" in reasons
    # Both caches got used although the ring alone may favour one.
    assert {d.ranked[0].id for d in homes} == {"e0", "e1"}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(1, 12)),
        min_size=1,
        max_size=40,
    ),
    st.integers(2, 30),
)
def test_bisection_match_equals_a_linear_walk(
    inserts: list[tuple[int, int, int]], capacity: int
) -> None:
    """Prompts share heads (tenant) and differ in tails; eviction must keep the
    holders of block i+1 a subset of those of block i, which bisection relies on."""
    index = PrefixIndex(10_000)

    def prompt(tenant: int, length: int) -> list[int]:
        return block_hashes("".join(f"{tenant}:{k};" for k in range(length)), 8, 1)

    for endpoint, tenant, length in inserts:
        index.insert(prompt(tenant, length), f"e{endpoint}", capacity)
    for tenant in range(4):
        query = prompt(tenant, 12)
        expected: dict[str, int] = {}
        for e in (f"e{i}" for i in range(6)):
            depth = 0
            for h in query:
                if not _holds(index, h, e):
                    break
                depth += 1
            if depth:
                expected[e] = depth
        assert index.match(query, [f"e{i}" for i in range(6)]) == expected


def _holds(index: PrefixIndex, h: int, endpoint: str) -> bool:
    return index.match([h], [endpoint]) == {endpoint: 1}


@settings(max_examples=200, deadline=None)
@given(
    conversations=st.lists(
        st.lists(st.text(alphabet="ab é\u2603\U0001f600", max_size=40), min_size=0, max_size=5),
        min_size=1,
        max_size=6,
    ),
    block_chars=st.sampled_from([1, 3, 16]),
    max_hashes=st.sampled_from([0, 5, 10_000]),
)
def test_char_chains_hash_as_block_hashes(
    conversations: list[list[str]], block_chars: int, max_hashes: int
) -> None:
    """Cached by prefix of messages or not, evicted or not: block_hashes of
    the joined parts, exactly (non-ASCII text included)."""
    from policies.prompt import CharChains

    chains = CharChains(block_chars, max_hashes)
    seed = model_seed("m")
    for parts in conversations:
        for k in range(len(parts) + 1):  # each conversation's growing prefixes, twice
            for _ in range(2):
                assert chains.hashes(parts[:k], seed) == block_hashes(
                    "".join(parts[:k]), block_chars, seed
                )
    assert chains.held <= max_hashes


def test_char_chains_count_states_shorter_than_a_block() -> None:
    """Prefixes shorter than a block hold no hash, only a tail: each still costs
    its entry, so a flood of short, unique chats stays within the bound."""
    from policies.chain_states import ENTRY_COST
    from policies.prompt import CharChains

    chains = CharChains(256, max_hashes=1_000)
    seed = model_seed("m")
    for i in range(2_000):
        chains.hashes([f"user\x1fhi {i}", "assistant\x1fhello", "user\x1fbye"], seed)
    assert 0 < len(chains) <= 1_000 // ENTRY_COST and chains.held <= 1_000


def test_char_chains_reuse_a_seen_prefix_of_messages() -> None:
    from policies.prompt import CharChains, message_parts

    chains = CharChains(16)
    messages = [{"role": "system", "content": "x" * 100}, {"role": "user", "content": "q"}]
    body = {"messages": messages}
    parts = message_parts(body)
    assert parts is not None and "".join(parts) == canonical_prompt(body)
    chains.hashes(parts, 1)
    assert len(chains) == 2  # the state after each message
    other = [parts[0], "user\x1fanother question\x1e"]
    assert chains.hashes(other, 1) == block_hashes("".join(other), 16, 1)
    assert len(chains) == 3  # the system message's state was reused, one new state


class _ReferenceLRU:
    """The index's LRU rule, block by block, as the plain loop states it."""

    def __init__(self) -> None:
        from collections import OrderedDict

        self.lru: dict[str, OrderedDict[int, None]] = {}

    def insert(self, hashes: list[int], endpoint: str, capacity: int) -> None:
        from collections import OrderedDict

        if not hashes:
            return
        lru = self.lru.setdefault(endpoint, OrderedDict())
        for h in reversed(hashes[:capacity]):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity:
            lru.popitem(last=False)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.lists(st.integers(0, 12), max_size=8),  # repeats allowed
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 6),
        ),
        max_size=30,
    )
)
def test_index_insert_keeps_the_lru_order_of_the_plain_loop(
    ops: list[tuple[list[int], str, int]],
) -> None:
    index, reference = PrefixIndex(1_000), _ReferenceLRU()
    for hashes, endpoint, capacity in ops:
        index.insert(hashes, endpoint, capacity)
        reference.insert(hashes, endpoint, capacity)
        stats = index.stats()
        assert stats.endpoints == {e: len(lru) for e, lru in reference.lru.items()}
        assert stats.entries == sum(stats.endpoints.values())
        held = {h for lru in reference.lru.values() for h in lru}
        assert stats.distinct_blocks == len(held)
        for h in range(13):
            holders = {e for e, lru in reference.lru.items() if h in lru}
            assert set(index.match([h], ["a", "b", "c"])) == holders
    # Same order: evicting one at a time drops the same blocks.
    for endpoint, lru in reference.lru.items():
        while lru:
            oldest = next(iter(lru))
            index._evict_oldest(endpoint, index._lru[endpoint])
            del lru[oldest]
            assert list(index._lru[endpoint]) == list(lru)


def scraped_fleet(n: int, ours: int, total: int, awaiting: dict[str, int]) -> list[EndpointView]:
    """Every endpoint scraped with ``total`` requests, ``ours`` of them this router's."""
    return [
        EndpointView(
            id=f"e{i}",
            url=f"http://e{i}",
            kind="vllm",
            in_flight=ours + awaiting.get(f"e{i}", 0),
            awaiting_first=awaiting.get(f"e{i}", 0),
            running=float(total),
            waiting=0.0,
            in_flight_at_scrape=ours,
        )
        for i in range(n)
    ]


def test_routers_sharing_the_traffic_converge_on_one_replica_per_new_prefix() -> None:
    a, b = policy(), policy()
    rng = random.Random(7)
    # Different private histories: a has routed other prefixes, b has not.
    for i in range(30):
        a.rank(chat(f"other {i}: " + SYSTEM, "hi"), scraped_fleet(8, 1, 2, {}))
    b.rank(chat("warm-up: " + SYSTEM, "hi"), scraped_fleet(8, 1, 2, {}))
    assert a.share == pytest.approx(0.5) and b.share == pytest.approx(0.5)
    agreed = 0
    for i in range(40):
        req = chat(f"tenant {i}: " + SYSTEM, "hi")
        owner, *_ = ring_walk(a, req, fleet(8))
        # Each router counts only its own requests awaiting a first byte: the
        # counts differ, so ranking ring choices by them would split the tenant.
        da = a.rank(req, scraped_fleet(8, 1, 2, {f"e{j}": rng.randint(0, 1) for j in range(8)}))
        db = b.rank(req, scraped_fleet(8, 1, 2, {f"e{j}": rng.randint(0, 1) for j in range(8)}))
        assert da.ranked[0].id == db.ranked[0].id == owner
        assert da.reason == db.reason == "ring_owner"
        agreed += 1
    assert agreed == 40
    # One router alone (it holds everything the scrape saw) keeps its choices.
    solo = policy()
    req = chat("solo: " + SYSTEM, "hi")
    owner, *_ = ring_walk(solo, req, fleet(8))
    d = solo.rank(req, scraped_fleet(8, 1, 1, {owner: 1}))
    assert solo.share == 1.0
    assert d.ranked[0].id != owner and d.reason == "ring_less_loaded"


def test_index_share_follows_the_routers_traffic_share() -> None:
    alone, half = policy(), policy()
    for p, ours in ((alone, 4), (half, 2)):
        for i in range(10):
            p.rank(chat(f"t {i}: " + SYSTEM, "hi"), scraped_fleet(4, ours, 4, {}))
    e = fleet(1)[0]
    assert half.capacity_blocks(e) == alone.capacity_blocks(e) // 2
    fixed = policy(share_index=False)
    fixed.rank(chat(SYSTEM, "hi"), scraped_fleet(4, 1, 4, {}))
    assert fixed.share == pytest.approx(0.25)
    assert fixed.capacity_blocks(e) == alone.capacity_blocks(e)


def test_a_router_alone_keeps_its_share_through_racing_scrapes() -> None:
    """A scrape races the requests it counts: some of a lone router's requests
    finish between the engine writing its gauges and the router reading its
    own count, so now and then the engine shows more than the router holds
    (on real vLLM a fifth of the samples, none above 1). The share is the
    samples' median: a router alone stays at 1, its index at full size, and
    the shared rules stay off."""
    alone, reference = policy(), policy(share_index=False)
    rng = random.Random(5)
    e = fleet(1)[0]
    for i in range(300):
        # 8 in flight at the scrape; the engine counted 9-16 a fifth of the time.
        total = 8 + rng.randint(1, 8) if rng.random() < 0.2 else 8
        alone.rank(chat(f"t {i}: " + SYSTEM, "hi"), scraped_fleet(4, 2, total // 4, {}))
        if i >= 20:
            assert alone.share > 0.75  # the shared rules never turn on
    assert alone.share == pytest.approx(1.0, abs=0.05)
    assert alone.capacity_blocks(e) >= 0.95 * reference.capacity_blocks(e)
    # Two routers, each holding half of what the engines count, with the same
    # races: the estimate still settles near a half.
    half = policy()
    for i in range(300):
        total = 16 + rng.randint(1, 8) if rng.random() < 0.2 else 16
        half.rank(chat(f"t {i}: " + SYSTEM, "hi"), scraped_fleet(4, 2, total // 4, {}))
    assert half.share == pytest.approx(0.5, abs=0.06)


def half_share_fleet(n: int, in_flight: dict[str, int]) -> list[EndpointView]:
    """Every endpoint scraped with 2 requests, 1 of them this router's (its
    share: a half); ``in_flight``: this router's requests now (default 1)."""
    return [
        EndpointView(
            id=f"e{i}",
            url=f"http://e{i}",
            kind="vllm",
            in_flight=in_flight.get(f"e{i}", 1),
            running=2.0,
            waiting=0.0,
            in_flight_at_scrape=1,
        )
        for i in range(n)
    ]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30))
def test_shedding_sheds_the_same_keys_first_whatever_the_load(low: int, extra: int) -> None:
    cands = fleet(4)
    e = cands[0]
    keys = range(400)
    lighter = SheddingCapacity(cands, 0.25, 4.0, 20.0, 0)
    kept_at = {load: {k for k in keys if _fits(cands, k, load)} for load in (low, low + extra)}
    # Every key kept at the higher load is kept at the lower one.
    assert kept_at[low + extra] <= kept_at[low]
    cap = lighter.cap(e)
    for load, kept in kept_at.items():
        if load + 1 <= cap:
            assert len(kept) == len(keys)
        else:
            # About the share the bound leaves, not all or nothing.
            share = cap / (load + 1)
            assert abs(len(kept) / len(keys) - share) < 0.1
            # The plain rule keeps none.
            assert not Capacity(cands, 0.25, 4.0, 20.0).fits(e, load)


def _fits(cands: list[EndpointView], key: int, load: int) -> bool:
    return SheddingCapacity(cands, 0.25, 4.0, 20.0, key).fits(cands[0], load)


def test_routers_sharing_the_traffic_spill_the_same_tenants_first() -> None:
    """Two routers count a tenant's ring owner past its bound, by different
    amounts: each sends some tenants on and keeps the rest, and the tenants
    the less loaded view sends on are among those the other sends on."""
    tenants = [chat(f"tenant {i}: " + SYSTEM, "hi") for i in range(60)]
    runs: dict[tuple[bool, int], set[int]] = {}
    for shedding in (True, False):
        for busy in (6, 9):
            p = policy(shared_shedding=shedding, min_overload=4)
            for i in range(5):
                p.rank(chat(f"warm-up {i}: " + SYSTEM, "hi"), half_share_fleet(8, {}))
            assert p.share == pytest.approx(0.5)
            spilled = set()
            for t, req in enumerate(tenants):
                owner, second, *_ = ring_walk(p, req, fleet(8))
                d = p.rank(req, half_share_fleet(8, {owner: busy}))
                if d.ranked[0].id == owner:
                    assert d.reason == "ring_owner"
                else:
                    assert (d.ranked[0].id, d.reason) == (second, "ring_spill")
                    spilled.add(t)
            runs[shedding, busy] = spilled
    assert runs[True, 6] <= runs[True, 9]
    assert 10 <= len(runs[True, 6]) < len(runs[True, 9]) <= 50
    # Without shedding both routers spill every tenant while they count the
    # owner past its bound.
    assert runs[False, 6] == runs[False, 9] == set(range(60))


def test_load_guard_stands_aside_while_routers_shed() -> None:
    req = chat(SYSTEM, "q")
    for shedding, expected in ((True, "ring_owner"), (False, "load_guard")):
        p = policy(shared_shedding=shedding)
        for i in range(5):
            p.rank(chat(f"warm-up {i}: " + SYSTEM, "hi"), half_share_fleet(8, {}))
        owner, *_ = ring_walk(p, req, fleet(8))
        other = next(e.id for e in fleet(8) if e.id != owner)
        # Loads 1 + 1 and 12 + 1 (a scrape's worth of others' requests each):
        # imbalanced enough for the guard, the owner still within its bound.
        d = p.rank(req, half_share_fleet(8, {other: 12}))
        assert d.reason == expected
        if shedding:
            assert d.ranked[0].id == owner
    # One router alone keeps the guard whatever the setting.
    solo = policy()
    solo.rank(req, fleet(2))
    d = solo.rank(chat(SYSTEM, "q2"), fleet(2, loads={"e0": 12, "e1": 1}))
    d2 = solo.rank(chat(SYSTEM, "q3"), fleet(2, loads={"e0": 1, "e1": 12}))
    assert {d.reason, d2.reason} == {"load_guard"} and solo.share == 1.0


def test_routers_sharing_the_traffic_keep_the_lower_floor() -> None:
    """One router never counts an endpoint under ``min_overload`` (8) requests
    as overloaded; while routers share the traffic the floor is
    ``shared_min_overload`` (4): each one's view of the others' load lags."""
    req = chat(SYSTEM, "q")
    shared = policy(shared_shedding=False)
    for i in range(5):
        shared.rank(chat(f"warm-up {i}: " + SYSTEM, "hi"), half_share_fleet(8, {}))
    owner, second, *_ = ring_walk(shared, req, fleet(8))
    d = shared.rank(req, half_share_fleet(8, {owner: 6}))  # 6 + 1 scraped: 7 >= 4
    assert (d.ranked[0].id, d.reason) == (second, "ring_spill")
    solo = policy()
    d = solo.rank(req, fleet(8, loads={owner: 7}))  # 7 + 1 <= 8
    assert (d.ranked[0].id, d.reason) == (owner, "ring_owner")


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user", 3, None]),
                    "content": st.one_of(
                        st.none(),
                        st.text(alphabet="ab é\u2603", max_size=60),
                        st.lists(
                            st.one_of(
                                st.fixed_dictionaries(
                                    {"type": st.just("text"), "text": st.text(max_size=9)}
                                ),
                                st.fixed_dictionaries(
                                    {"type": st.just("image_url"), "image_url": st.text(max_size=5)}
                                ),
                            ),
                            max_size=3,
                        ),
                    ),
                }
            ),
            st.integers(),
        ),
        max_size=6,
    ),
    chars=st.integers(1, 120),
)
def test_the_prompt_head_is_the_canonical_prompt_cut(messages: list[object], chars: int) -> None:
    from policies.prompt import canonical_prompt, message_parts, prompt_chars, prompt_head

    body = {"messages": messages}
    parts = message_parts(body)
    assert parts is not None
    whole = "".join(parts)
    assert prompt_head(body, chars) == (whole[:chars], len(whole))
    assert prompt_head({"prompt": "x"}, chars) is None
    # The length alone, as precise decisions read it (no block to hash).
    assert prompt_chars(body) == len(canonical_prompt(body)) == len(whole)
    for other in ({"prompt": "abc"}, {"prompt": ["a", "bc"]}, {"input": "xy"}, {}):
        assert prompt_chars(other) == len(canonical_prompt(other))


def test_the_candidates_bits_kept_between_matches_follow_slots_changing_hands() -> None:
    """``match`` keeps the OR of the same candidates' bits between calls; an
    endpoint forgotten and another taking its slot (or a first insert for a
    candidate) must show up in the next match of the same candidate list."""
    from policies.prefix_index import PrefixIndex

    index = PrefixIndex(1000)
    ids = ["a", "b", "c"]
    index.insert([1, 2, 3], "a", 10)
    index.insert([1, 2], "b", 10)
    assert index.match([1, 2, 3], ids) == {"a": 3, "b": 2}
    index.forget("b")
    assert index.match([1, 2, 3], ids) == {"a": 3}
    index.insert([1, 2, 3, 4], "c", 10)  # takes b's slot
    assert index.match([1, 2, 3, 4], ids) == {"a": 3, "c": 4}
    index.insert([1], "d", 10)  # a new slot: not a candidate
    assert index.match([1, 2, 3, 4], ids) == {"a": 3, "c": 4}
