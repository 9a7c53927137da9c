from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim.kvcache import PrefixCache, block_hashes


def test_chained_hashes_cover_all_before() -> None:
    a = block_hashes(list(range(8)), 4)
    b = block_hashes([*range(4), 9, 9, 9, 9], 4)
    c = block_hashes([7, *range(1, 8)], 4)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same second block, different history
    assert block_hashes(list(range(7)), 4) == a[:1]  # partial blocks are not hashed


def test_usable_blocks_exclude_the_null_block() -> None:
    cache = PrefixCache(num_blocks=81, block_size=32)
    assert cache.usable_blocks == 80 and cache.free_blocks == 80


def test_hit_is_whole_blocks_and_never_the_last_token() -> None:
    cache = PrefixCache(num_blocks=10, block_size=4)
    ids = list(range(12))
    hashes = block_hashes(ids, 4)
    blocks = cache.allocate(3)
    assert blocks is not None
    for block, h in zip(blocks, hashes, strict=True):
        cache.commit(block, h)
    cache.free(blocks)
    # The same 12 tokens again: the last block holds the last token, so 2 blocks hit.
    assert len(cache.longest_hit(hashes, 12)) == 2
    # 13 tokens sharing the first 12: all three blocks hit.
    assert len(cache.longest_hit(block_hashes([*ids, 99], 4), 13)) == 3


def test_lru_eviction_takes_least_recent_and_request_tails_first() -> None:
    cache = PrefixCache(num_blocks=5, block_size=2)  # 4 usable
    first = cache.allocate(2)
    assert first is not None
    h = block_hashes([1, 2, 3, 4], 2)
    cache.commit(first[0], h[0])
    cache.commit(first[1], h[1])
    cache.free(first)  # freed tail first: h[1] is now evicted before h[0]
    other = cache.allocate(2)  # takes the two never-used blocks
    assert other is not None
    assert len(cache.longest_hit(h, 5)) == 2
    cache.allocate(1)  # must evict: the tail block of the freed request goes
    assert len(cache.longest_hit(h, 5)) == 1
    assert cache.evictions == 1


def test_touch_protects_blocks_in_use() -> None:
    cache = PrefixCache(num_blocks=3, block_size=2)  # 2 usable
    blocks = cache.allocate(1)
    assert blocks is not None
    h = block_hashes([1, 2], 2)
    cache.commit(blocks[0], h[0])
    cache.free(blocks)
    hit = cache.longest_hit(h, 3)
    cache.touch(hit)
    assert cache.allocate(2) is None  # the touched block is not free any more
    assert cache.allocate(1) is not None
    assert cache.longest_hit(h, 3) == hit


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), min_size=1, max_size=40),
)
def test_block_accounting_never_leaks(requests: list[tuple[int, int]]) -> None:
    """Whatever runs through it, every block is either free or referenced."""
    cache = PrefixCache(num_blocks=17, block_size=4)
    live = []
    for prefix, length in requests:
        ids = [prefix] * 8 + list(range(length))
        hashes = block_hashes(ids, 4)
        hit = cache.longest_hit(hashes, len(ids))
        need = -(-len(ids) // 4) - len(hit)
        if need > cache.free_blocks - sum(1 for b in hit if b.ref == 0):
            for blocks in live:
                cache.free(blocks)
            live = []
            continue
        cache.touch(hit)
        fresh = cache.allocate(need)
        assert fresh is not None
        blocks = hit + fresh
        for block, h in zip(blocks, hashes, strict=False):
            cache.commit(block, h)
        live.append(blocks)
        in_use = {b.id for bl in live for b in bl}
        assert cache.used_blocks == len(in_use)
    for blocks in live:
        cache.free(blocks)
    assert cache.free_blocks == cache.usable_blocks


def test_preempted_recompute_stays_out_of_the_prefix_counters() -> None:
    from backends.sim.engine import Engine, EngineParams

    # 4 usable blocks of 4 tokens; two 7-token prompts decoding 6 tokens each must
    # collide: one is preempted and recomputed later, as vLLM does.
    engine = Engine(EngineParams.zero_latency(block_size=4, num_blocks=5, max_model_len=64))
    a = engine.submit("a b c d e f g", 6, run=False)
    b = engine.submit("h i j k l m n", 6, run=False)
    now = 0.0
    while not (a.done and b.done):
        step = engine.plan_step()
        assert step is not None
        now += 1
        engine.finish_step(step, now)
    stats = engine.stats
    assert stats.preemptions >= 1
    assert stats.queries == a.num_prompt + b.num_prompt  # each request counted once
    assert stats.preempted_queries >= a.num_prompt
    assert (a.emitted, b.emitted) == (6, 6)
