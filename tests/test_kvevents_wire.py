"""vLLM's KV events as a real vLLM sent them (tests/fixtures/vllm/kv_events), decoded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tokenizers import Tokenizer

from backends.hf_model import read_model_files
from backends.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    Batch,
    BlockRemoved,
    BlockStored,
    Limits,
    MalformedMessage,
    MessageTooLarge,
    Resync,
    SeqTracker,
    TooManyEvents,
    Verdict,
    decode,
    decode_replay,
    encode,
    plan_resync,
    resync_start,
)
from backends.templates import render
from policies.blocks import EndpointBlocks, chain_hashes
from router.kvevents.subscriber import apply_batch
from tests.helpers import FIXTURES

KV = FIXTURES / "vllm" / "kv_events"
TINY = FIXTURES / "tiny-llama"


def frames(name: str) -> list[list[bytes]]:
    return [[bytes.fromhex(f) for f in msg] for msg in json.loads((KV / name).read_text())]


def live() -> list[Batch]:
    return [decode(f) for f in frames("live.json")]


def replayed(name: str) -> list[Batch | None]:
    return [decode_replay(f) for f in frames(name)]


def exchanges() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((KV / "requests.json").read_text())["exchanges"]
    return data


def prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    files = read_model_files(TINY)
    assert files.chat_template is not None
    tokenizer = Tokenizer.from_file(str(Path(files.tokenizer_json)))
    ids: list[int] = tokenizer.encode(
        render(files.chat_template, messages), add_special_tokens=False
    ).ids
    return ids


# -- the recorded bytes --------------------------------------------------------------


def test_pub_messages_are_topic_seq_payload() -> None:
    raw = frames("live.json")
    assert all(len(m) == 3 and m[0] == b"" and len(m[1]) == 8 for m in raw)
    batches = live()
    assert [b.seq for b in batches] == list(range(7))
    assert all(b.topic == b"" and b.data_parallel_rank == 0 for b in batches)
    assert all(b.ts > 1.7e9 for b in batches)  # wall-clock seconds


def test_first_prompt_stores_its_full_blocks_with_the_tokens_vllm_hashed() -> None:
    first = live()[0]
    (event,) = first.events
    assert isinstance(event, BlockStored)
    ids = prompt_ids(exchanges()[0]["request"]["messages"])
    # 530 prompt tokens: 16 full blocks of 32; the partial 17th is not published.
    assert len(ids) == exchanges()[0]["usage"]["prompt_tokens"] == 530
    assert event.block_size == 32 and len(event.block_hashes) == 16
    assert event.parent_block_hash is None
    assert event.medium == "GPU" and event.group_idx == 0 and not event.extra
    # Exactly the tiny tokenizer's ids of the chat-templated prompt, no BOS added.
    assert event.token_ids == ids[:512]
    assert ids[0] == 3  # <|im_start|>, not <s> (id 0)
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in event.block_hashes)


def test_a_prompt_extending_a_cached_prefix_chains_on_its_last_block() -> None:
    batches = live()
    system = batches[0].events[0]
    extension = batches[1].events[0]
    assert isinstance(system, BlockStored) and isinstance(extension, BlockStored)
    assert extension.parent_block_hash == system.block_hashes[-1]
    ids = prompt_ids(exchanges()[3]["request"]["messages"])
    assert extension.token_ids == ids[512 : 512 + 32 * 7]
    # The index chains them: kvroute's hashes of the whole prompt match 16 + 7 blocks.
    blocks = EndpointBlocks("vllm", max_blocks=1000)
    for batch in batches[:2]:
        apply_batch(blocks, batch)
    assert blocks.match(chain_hashes(ids, 32)) == 23


def test_requests_that_hit_the_cache_publish_nothing() -> None:
    # The repeat and the second question hit 512 cached tokens: no batch came.
    counts = [e["live_messages_so_far"] for e in exchanges()]
    assert counts[:3] == [1, 1, 1]
    assert [e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in exchanges()[:3]] == [
        0,
        512,
        512,
    ]


def test_decode_fills_blocks_one_step_at_a_time() -> None:
    batches = live()
    a, b = batches[2].events[0], batches[3].events[0]
    assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
    system = batches[0].events[0]
    assert isinstance(system, BlockStored)
    assert a.parent_block_hash == system.block_hashes[-1]
    assert b.parent_block_hash == a.block_hashes[0]
    assert len(a.token_ids) == len(b.token_ids) == 32


def test_eviction_removes_one_hash_per_event_before_storing() -> None:
    batch = live()[5]
    removed = [e for e in batch.events if isinstance(e, BlockRemoved)]
    assert len(removed) == 36 and all(len(e.block_hashes) == 1 for e in removed)
    assert all(e.medium == "GPU" for e in removed)
    assert isinstance(batch.events[-1], BlockStored)


def test_the_index_predicts_every_recorded_requests_cached_tokens() -> None:
    """Before each request, the blocks the events so far say vLLM holds are the
    cached tokens vLLM then reported (whole blocks, never the prompt's last token)."""
    batches = live()
    blocks = EndpointBlocks("vllm", max_blocks=1000)
    applied = 0
    predicted, reported = [], []
    for exchange in exchanges():
        ids = prompt_ids(exchange["request"]["messages"])
        assert len(ids) == exchange["usage"]["prompt_tokens"]
        hit = min(blocks.match(chain_hashes(ids, 32)), (len(ids) - 1) // 32)
        predicted.append(hit * 32)
        reported.append(exchange["usage"]["prompt_tokens_details"]["cached_tokens"])
        for batch in batches[applied : exchange["live_messages_so_far"]]:
            apply_batch(blocks, batch)
        applied = exchange["live_messages_so_far"]
    assert predicted == reported == [0, 512, 512, 512, 512, 0, 0, 0]


def test_replay_answers_through_a_dealer() -> None:
    raw = frames("replay_from_2.json")
    assert all(len(m) == 4 and m[0] == b"" for m in raw)
    assert raw[-1] == [b"", b"", END_SEQ, b""]
    got = replayed("replay_from_2.json")
    assert got[-1] is None
    assert [b.seq for b in got[:-1] if b] == [2, 3, 4, 5, 6]
    # The replayed payloads are the very bytes published.
    assert [b.digest for b in got[:-1] if b] == [b.digest for b in live()[2:]]
    assert [b.seq for b in replayed("replay_from_0.json")[:-1] if b] == list(range(7))


def test_a_restarted_vllm_counts_from_zero_again() -> None:
    (batch,) = [decode(f) for f in frames("restarted_live.json")]
    assert batch.seq == 0
    tracker = SeqTracker()
    for b in live():
        tracker.applied(b)
    assert tracker.check(batch.seq) is Verdict.RESTART
    # Same tokens, same engine hashes in the new process (sha256 of the tokens).
    event, original = batch.events[0], live()[0].events[0]
    assert isinstance(event, BlockStored) and isinstance(original, BlockStored)
    assert event.block_hashes == original.block_hashes
    assert batch.digest != live()[0].digest  # another timestamp


# -- malformed input ------------------------------------------------------------------


def test_malformed_messages_raise_the_specific_error() -> None:
    good = frames("live.json")[0]
    with pytest.raises(MalformedMessage, match="frames"):
        decode(good[:2])
    with pytest.raises(MalformedMessage, match="sequence frame"):
        decode([good[0], b"\x00" * 4, good[2]])
    with pytest.raises(MalformedMessage, match="negative"):
        decode([good[0], END_SEQ, good[2]])
    with pytest.raises(MalformedMessage, match="not an event batch"):
        decode([good[0], good[1], b"\xc1garbage"])
    with pytest.raises(MessageTooLarge):
        decode(good, Limits(max_frame_bytes=100))
    with pytest.raises(TooManyEvents):
        decode(frames("live.json")[5], Limits(max_events=10))
    bad_event = msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": "x"}]])
    with pytest.raises(MalformedMessage, match="bad event"):
        decode([b"", (0).to_bytes(8, "big"), bad_event])


def test_unknown_event_types_are_counted_and_skipped() -> None:
    payload = msgspec.msgpack.encode(
        [1.0, [{"type": "BlockPinned", "x": 1}, {"type": "AllBlocksCleared"}], 0]
    )
    batch = decode([b"", (3).to_bytes(8, "big"), payload])
    assert batch.unknown == 1 and batch.events == (AllBlocksCleared(),)


def test_bytes_hashes_become_ints() -> None:
    event = {
        "type": "BlockStored",
        "block_hashes": [b"\x01" * 32],
        "parent_block_hash": b"\x02",
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
    }
    batch = decode([b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode([1.0, [event]])])
    stored = batch.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [int.from_bytes(b"\x01" * 32, "big")]
    assert stored.parent_block_hash == 2


def test_encode_round_trips_and_matches_vllms_shape() -> None:
    original = live()[1]
    again = decode(encode(original.seq, original.events, original.ts))
    assert again.events == original.events and again.seq == 1
    assert again.data_parallel_rank == 0


# -- order ----------------------------------------------------------------------------


def batch(seq: int, digest: int = 0) -> Batch:
    return Batch(b"", seq, 0.0, (), digest=digest)


def test_tracker_table() -> None:
    t = SeqTracker()
    assert t.check(5) is Verdict.APPLY  # no history
    t.applied(batch(5))
    assert t.last == 5
    assert t.check(6) is Verdict.APPLY
    assert t.check(8) is Verdict.GAP
    assert t.check(5) is Verdict.DUPLICATE
    assert t.check(0) is Verdict.RESTART


def test_resync_plans() -> None:
    t = SeqTracker()
    assert resync_start(t) == 0
    assert plan_resync(t, 0, []).verdict is Resync.EMPTY
    assert plan_resync(t, 0, [batch(0), batch(1)]).verdict is Resync.COMPLETE
    partial = plan_resync(t, 0, [batch(4), batch(5)])
    assert partial.verdict is Resync.PARTIAL and len(partial.apply) == 2
    t.applied(batch(3, digest=33))
    assert resync_start(t) == 3
    resumed = plan_resync(t, 3, [batch(3, 33), batch(4), batch(5)])
    assert resumed.verdict is Resync.RESUMED and [b.seq for b in resumed.apply] == [4, 5]
    # Seq 3 of another process, or a buffer that moved on, or nothing at all.
    assert plan_resync(t, 3, [batch(3, 99)]).verdict is Resync.RESTARTED
    assert plan_resync(t, 3, [batch(7)]).verdict is Resync.RESTARTED
    assert plan_resync(t, 3, []).verdict is Resync.RESTARTED
    # Seq 0 applied: the check is the same.
    t0 = SeqTracker()
    t0.applied(batch(0, digest=5))
    assert resync_start(t0) == 0
    assert plan_resync(t0, 0, [batch(0, 5), batch(1)]).apply == (batch(1),)
    assert plan_resync(t0, 0, [batch(0, 6), batch(1)]).verdict is Resync.RESTARTED


def test_recorded_replay_resumes_after_the_last_applied() -> None:
    tracker = SeqTracker()
    for b in live()[:3]:
        tracker.applied(b)
    start = resync_start(tracker)
    assert start == 2
    plan = plan_resync(tracker, start, [b for b in replayed("replay_from_2.json") if b])
    assert plan.verdict is Resync.RESUMED
    assert [b.seq for b in plan.apply] == [3, 4, 5, 6]
