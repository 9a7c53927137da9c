from __future__ import annotations

import random

from backends.base import Usage
from backends.usage import scan_usage
from policies import EndpointView, Outcome, RequestView, build_policy
from policies.prefix import PrefixAffinity
from tests.helpers import FIXTURES

VLLM = FIXTURES / "vllm"


def test_usage_is_found_in_recorded_vllm_answers() -> None:
    cached = scan_usage((VLLM / "chat_again_cached.body").read_bytes())
    assert cached is not None and (cached.prompt_tokens, cached.cached_tokens) == (170, 128)
    completion = scan_usage((VLLM / "completion.body").read_bytes())
    assert completion is not None and (completion.prompt_tokens, completion.cached_tokens) == (7, 0)
    stream = (VLLM / "chat_stream_usage.body").read_bytes()
    last_event = stream.split(b"\n\n")[-3]
    streamed = scan_usage(last_event)
    assert streamed is not None and (streamed.prompt_tokens, streamed.cached_tokens) == (15, 0)
    assert scan_usage((VLLM / "chat_stream.body").read_bytes()) is None
    assert scan_usage(b'{"usage": {"prompt_tokens": 3}}') == Usage(3, None, None)


def test_prefix_affinity_learns_characters_per_token() -> None:
    policy = build_policy("prefix_affinity", {"block_chars": 64}, random.Random(0))
    assert isinstance(policy, PrefixAffinity)
    endpoint = EndpointView(id="e", url="u", kind="vllm", kv_capacity_tokens=1600)
    assert policy.capacity_blocks(endpoint) == 100  # 1600 * 4.0 / 64
    body = {"messages": [{"role": "user", "content": "x" * 594}]}
    for _ in range(3):
        d = policy.rank(RequestView(model="m", endpoint="chat", body=body), [endpoint])
        # 600 canonical characters came back as 300 prompt tokens: 2 per token.
        policy.observe(d, "e", Outcome(ok=True, prompt_tokens=300))
    assert policy.chars_per_token == 2.0
    assert policy.capacity_blocks(endpoint) == 50
    frozen = build_policy("prefix_affinity", {"learn_chars_per_token": False}, random.Random(0))
    assert isinstance(frozen, PrefixAffinity)
    d = frozen.rank(RequestView(model="m", endpoint="chat", body=body), [endpoint])
    frozen.observe(d, "e", Outcome(ok=True, prompt_tokens=300))
    assert frozen.chars_per_token == 4.0
