"""Precise prefix routing through a real router: the model's tokenizer from the
tiny Llama's directory, KV events stood in for by EndpointBlocks fed by hand
(the views carry them as the event subscriber will)."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.templates import render
from policies.base import EndpointView
from policies.blocks import EndpointBlocks
from router.prompts import load_prompt_tokenizer
from router.registry import EndpointState
from tests.helpers import router, router_config, sim_stats, simulator

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-llama"
BS = 16


def chat(tenant: int, question: str) -> dict[str, Any]:
    system = " ".join(f"Tenant {tenant} clause {j} applies to every reply." for j in range(12))
    return {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


def engine_ids(body: dict[str, Any]) -> list[int]:
    """The prompt's token ids as vLLM would compute them from the same files."""
    prompts = load_prompt_tokenizer(str(TINY))
    text = render(prompts.chat_template or "", body["messages"])
    ids: list[int] = prompts.tokenizer.encode(text, add_special_tokens=False).ids
    return ids


async def test_requests_go_where_the_events_say_the_prefix_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = {e: EndpointBlocks(e, 100_000) for e in ("s0", "s1")}
    for blocks in held.values():
        blocks.mark_live()
    original = EndpointState.view

    def with_blocks(self: EndpointState, model: str | None = None) -> EndpointView:
        return dataclasses.replace(original(self, model), blocks=held.get(self.id))

    monkeypatch.setattr(EndpointState, "view", with_blocks)
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(simulator()) for _ in range(2)]
        endpoints = [
            {"id": f"s{i}", "url": url, "kind": "vllm", "models": ["tiny"]}
            for i, (url, _) in enumerate(sims)
        ]
        cfg = router_config(
            endpoints,
            models={"tiny": {"policy": "prefix_affinity", "tokenizer": str(TINY)}},
        )
        url = await stack.enter_async_context(router(cfg))
        # Each endpoint's engine reports a different tenant's prompt.
        for endpoint, tenant in (("s0", 0), ("s1", 1)):
            ids = engine_ids(chat(tenant, "earlier question"))
            full = len(ids) // BS
            held[endpoint].stored(list(range(full)), None, ids[: full * BS], BS)
        async with httpx.AsyncClient(base_url=url) as c:
            for tenant in (1, 0, 1, 0):
                r = await c.post("/v1/chat/completions", json=chat(tenant, "a new question"))
                assert r.status_code == 200
            metrics = (await c.get("/metrics")).text
        requests = [(await sim_stats(u))["requests"] for u, _ in sims]
    assert requests == [2, 2]
    assert 'reason="precise_hit"} 4.0' in metrics


async def prompts_tokenized(policy: str, publishes_events: bool, mp: pytest.MonkeyPatch) -> int:
    """How many prompt pieces the router tokenized for four chats."""
    held = EndpointBlocks("s0", 1000)
    held.mark_live()
    original = EndpointState.view

    def with_blocks(self: EndpointState, model: str | None = None) -> EndpointView:
        blocks = held if publishes_events else None
        return dataclasses.replace(original(self, model), blocks=blocks)

    mp.setattr(EndpointState, "view", with_blocks)
    async with AsyncExitStack() as stack:
        url0, _ = await stack.enter_async_context(simulator())
        cfg = router_config(
            [{"id": "s0", "url": url0, "kind": "vllm", "models": ["tiny"]}],
            models={"tiny": {"policy": policy, "tokenizer": str(TINY)}},
        )
        prompts = cfg.models["tiny"].prompts
        assert prompts is not None
        before = prompts.hits + prompts.misses
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url) as c:
            for k in range(4):
                r = await c.post("/v1/chat/completions", json=chat(7, f"question {k}"))
                assert r.status_code == 200
        return prompts.hits + prompts.misses - before


async def test_prompts_are_tokenized_only_for_token_policies_and_event_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await prompts_tokenized("prefix_affinity", True, monkeypatch) > 0
    assert await prompts_tokenized("prefix_affinity", False, monkeypatch) == 0
    assert await prompts_tokenized("least_load", True, monkeypatch) == 0
