"""One OpenAI API over every backend kind: the client never knows which answered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from backends.sim.tokenizer import render_chatml, tokenize, tokenizer_json
from backends.sim.triton import TritonSimulator
from tests.helpers import admin_endpoints, eventually, router, router_config, serve_app, simulator

KINDS = ["vllm", "tgi", "triton"]
MSG = [{"role": "user", "content": "Say something about caches."}]
#: The prompt tokens every kind's engine counts for MSG (the simulators render ChatML).
PROMPT_TOKENS = len(tokenize(render_chatml(MSG)))


def endpoint(kind: str, url: str, i: int = 0) -> dict[str, Any]:
    ep: dict[str, Any] = {"id": f"{kind}-{i}", "url": url, "kind": kind, "models": ["tiny"]}
    if kind == "triton":
        ep["metrics_url"] = url + "/metrics"  # a real Triton uses a port of its own
    return ep


@contextlib.asynccontextmanager
async def backend(kind: str, counts: str) -> AsyncIterator[str]:
    if counts == "engine" and kind == "triton":  # a TensorRT-LLM ensemble with counts
        sim = TritonSimulator(["tiny"], EngineParams.zero_latency(), token_counts=True)
        async with serve_app(sim.app) as url:
            yield url
    else:
        async with simulator(kind=kind) as (url, _):
            yield url


def counted_endpoint(kind: str, url: str, counts: str, tokenizer: Path) -> dict[str, Any]:
    """An endpoint whose usage is exact: the engine's counts, or the model's tokenizer."""
    ep = endpoint(kind, url)
    if counts == "tokenizer":
        ep["models"] = [{"name": "tiny", "tokenizer": str(tokenizer)}]
    elif kind == "tgi":
        ep["options"] = {"decoder_input_details": True}
    elif kind == "triton":
        ep["options"] = {"token_counts": True}
    return ep


@pytest.mark.parametrize(
    ("kind", "counts"),
    [
        ("vllm", "engine"),
        ("tgi", "engine"),
        ("tgi", "tokenizer"),
        ("triton", "engine"),
        ("triton", "tokenizer"),
    ],
)
async def test_openai_sdk_over_each_kind(kind: str, counts: str, tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer.json"  # counts as the simulated model does
    tokenizer.write_text(tokenizer_json())
    async with backend(kind, counts) as sim_url:
        config = router_config([counted_endpoint(kind, sim_url, counts, tokenizer)])
        async with router(config) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            assert [m.id for m in (await client.models.list()).data] == ["tiny"]

            chat = await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)
            assert chat.model == "tiny"
            assert chat.choices[0].message.role == "assistant"
            assert len(chat.choices[0].message.content or "") > 0
            assert chat.usage is not None
            assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (PROMPT_TOKENS, 5)

            stream = await client.chat.completions.create(
                model="tiny",
                messages=MSG,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, finish, usage = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                else:
                    usage = chunk.usage
            assert finish == "length"
            assert usage is not None
            assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 5)
            assert "".join(pieces).split() == (chat.choices[0].message.content or "").split()

            comp = await client.completions.create(model="tiny", prompt="Once upon a", max_tokens=3)
            assert len(comp.choices[0].text) > 0
            assert comp.usage is not None
            assert (comp.usage.prompt_tokens, comp.usage.completion_tokens) == (
                len(tokenize("Once upon a")),
                3,
            )
            await client.close()


@pytest.mark.parametrize("kind", ["tgi", "triton"])
async def test_usage_is_estimated_never_0_when_nothing_counts(kind: str) -> None:
    async with simulator(kind=kind) as (sim_url, _):
        async with router(router_config([endpoint(kind, sim_url)])) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            chat = await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5)
            stream = await client.chat.completions.create(
                model="tiny",
                messages=MSG,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            streamed = [chunk.usage async for chunk in stream if chunk.usage is not None]
            comp = await client.completions.create(model="tiny", prompt="Once upon a", max_tokens=3)
            await client.close()
    for usage in (chat.usage, streamed[0], comp.usage):
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("kind", ["tgi", "triton"])
async def test_mid_stream_death_on_each_kind(kind: str) -> None:
    async with simulator(kind=kind, faults=Faults(die_after_chunks=2)) as (sim_url, _):
        async with router(router_config([endpoint(kind, sim_url)])) as url:
            async with httpx.AsyncClient(base_url=url) as c:
                r = await c.post(
                    "/v1/chat/completions",
                    json={"model": "tiny", "messages": MSG, "max_tokens": 10, "stream": True},
                )
    events = [e for e in r.content.split(b"\n\n") if e]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert r.status_code == 200 and "error" in last
    assert b"[DONE]" not in r.content


@pytest.mark.parametrize("kind", ["tgi", "triton"])
async def test_backend_errors_become_openai_errors(kind: str) -> None:
    async with simulator(
        kind=kind, faults=Faults(fail_rate=1.0, fail_status=429, retry_after=2)
    ) as (sim_url, _):
        async with router(router_config([endpoint(kind, sim_url)])) as url:
            async with httpx.AsyncClient(base_url=url) as c:
                r = await c.post(
                    "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 3}
                )
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "simulated failure" in error["message"]
    if kind == "tgi":  # TGI's overloaded 429 with Retry-After
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
    else:  # Triton: a model error on the first response is a 400 with one SSE event
        assert r.status_code == 400


async def test_mixed_fleet_health_and_load() -> None:
    async with AsyncExitStack() as stack:
        eps = []
        for i, kind in enumerate(KINDS):
            sim_url, _ = await stack.enter_async_context(simulator(kind=kind))
            eps.append(endpoint(kind, sim_url, i))
        fast = {"health": {"interval": 0.05, "jitter": 0}, "scrape": {"interval": 0.05}}
        url = await stack.enter_async_context(router(router_config(eps, **fast)))
        async with httpx.AsyncClient(base_url=url) as c:
            for _ in range(6):
                r = await c.post(
                    "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2}
                )
                assert r.status_code == 200

            async def scraped() -> bool:
                state = await admin_endpoints(url)
                return all(e["load"]["running"] is not None for e in state.values())

            await eventually(scraped)
            state = await admin_endpoints(url)
    assert {e["healthy"] for e in state.values()} == {True}
    assert state["triton-2"]["load"]["kv_capacity_tokens"] == 2048 * 16


@pytest.mark.parametrize("kind", ["tgi", "triton"])
async def test_an_engine_failure_in_a_4xx_fails_over_and_counts_against_it(kind: str) -> None:
    """TGI says a failed generation with 424, Triton a model's failure with 400:
    the backend's fault, so another replica serves the request (found by the
    soak: these reached clients as their own errors)."""
    async with AsyncExitStack() as stack:
        bad_url, _ = await stack.enter_async_context(
            simulator(kind=kind, faults=Faults(fail_rate=1.0, fail_status=500))
        )
        good_url, _ = await stack.enter_async_context(simulator(kind="vllm"))
        endpoints = [endpoint(kind, bad_url, 0), endpoint("vllm", good_url, 1)]
        cfg = router_config(endpoints, circuit={"failures": 2}, health={"enabled": False})
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient(base_url=url) as client:
            for stream in (False, True, False, True):  # round robin: both ranked first
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": "tiny", "messages": MSG, "max_tokens": 2, "stream": stream},
                )
                assert r.status_code == 200, r.text
            admin = {e["id"]: e for e in (await client.get("/admin/endpoints")).json()["endpoints"]}
    assert admin[f"{kind}-0"]["circuit"]["state"] == "open"
    assert "simulated failure" in admin[f"{kind}-0"]["last_error"]
