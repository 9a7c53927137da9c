"""The TGI simulator, driven by Hugging Face's own ``text-generation`` client."""

from __future__ import annotations

import httpx
import orjson
import pytest
from text_generation import AsyncClient
from text_generation.errors import ValidationError

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from backends.sim.tgi import PREFILL_DETAILS_STREAM, TGISimulator
from backends.sim.tokenizer import tokenize
from tests.helpers import serve_app, simulator


async def test_text_generation_client_generate_and_stream() -> None:
    async with simulator(kind="tgi") as (url, _):
        client = AsyncClient(url)
        answer = await client.generate("Once upon a time", max_new_tokens=6, seed=3)
        assert answer.details.generated_tokens == 6
        assert answer.details.finish_reason.value == "length"
        assert len(answer.details.tokens) == 6
        again = await client.generate("Once upon a time", max_new_tokens=6, seed=3)
        assert again.generated_text == answer.generated_text

        events = [
            r async for r in client.generate_stream("Once upon a time", max_new_tokens=6, seed=3)
        ]
        assert len(events) == 6
        assert all(e.details is None and e.generated_text is None for e in events[:-1])
        assert events[-1].generated_text == answer.generated_text
        assert "".join(e.token.text for e in events) == answer.generated_text
        assert events[-1].details is not None and events[-1].details.generated_tokens == 6


async def test_text_generation_client_reads_the_prompt_tokens_in_prefill() -> None:
    prompt = "Once upon a time, a router"
    async with simulator(kind="tgi") as (url, _):
        answer = await AsyncClient(url).generate(
            prompt, max_new_tokens=3, decoder_input_details=True
        )
        plain = await AsyncClient(url).generate(prompt, max_new_tokens=3)
    prefill = answer.details.prefill
    assert [t.text for t in prefill] == tokenize(prompt)  # one per prompt token
    assert prefill[0].logprob is None and all(t.logprob is not None for t in prefill[1:])
    assert plain.details.prefill == []  # not asked for


async def test_prefill_is_empty_like_tgi_3_without_prefill_logprobs() -> None:
    sim = TGISimulator(["tiny"], EngineParams.zero_latency(), prefill_logprobs=False)
    async with serve_app(sim.app) as url:
        answer = await AsyncClient(url).generate(
            "hi there", max_new_tokens=2, decoder_input_details=True
        )
    assert answer.details.prefill == [] and answer.details.generated_tokens == 2


async def test_prefill_details_on_a_stream_are_refused_inside_a_200_as_tgi_does() -> None:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    async with (
        simulator(kind="tgi") as (url, _),
        httpx.AsyncClient(base_url=url) as c,
    ):
        for path, extra in (("/generate_stream", {}), ("/", {"stream": True})):
            r = await c.post(path, json={**body, **extra})
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.content.endswith(b"\n\n")
            assert orjson.loads(r.content.removeprefix(b"data:")) == {
                "error": PREFILL_DETAILS_STREAM,
                "error_type": "validation",
            }
    assert PREFILL_DETAILS_STREAM.endswith(
        "`decoder_input_details` == true is not supported when streaming tokens"
    )


async def test_text_generation_client_sees_tgi_errors() -> None:
    async with simulator(kind="tgi") as (url, _):
        with pytest.raises(ValidationError):
            await AsyncClient(url).generate("hi", max_new_tokens=1, stop_sequences=list("abcde"))


async def test_native_routes_info_health_metrics_and_messages_api() -> None:
    async with (
        simulator(kind="tgi", faults=Faults()) as (url, _),
        httpx.AsyncClient(base_url=url) as c,
    ):
        r = await c.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert set(r.json()) == {"generated_text"}  # details only when asked for
        detailed = {"max_new_tokens": 2, "details": True}
        r = await c.post("/generate", json={"inputs": "hi", "parameters": detailed})
        assert set(r.json()) == {"generated_text", "details"}
        stream = await c.post(
            "/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        )
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [e for e in stream.content.split(b"\n\n") if e]
        assert all(e.startswith(b"data:{") for e in events) and len(events) == 2
        assert orjson.loads(events[-1].removeprefix(b"data:"))["details"] is None
        stream = await c.post("/generate_stream", json={"inputs": "hi", "parameters": detailed})
        last = orjson.loads(stream.content.split(b"\n\n")[-2].removeprefix(b"data:"))
        assert last["details"]["input_length"] == len(tokenize("hi"))
        bad = await c.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 0}})
        assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/info")).json()["max_stop_sequences"] == 4
        metrics = (await c.get("/metrics")).text
        assert "tgi_queue_size 0.0" in metrics and "tgi_batch_current_size" in metrics
        chat = await c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
        )
        assert chat.json()["usage"]["completion_tokens"] == 2
        await c.post("/sim/faults", json={"fail_rate": 1.0, "fail_status": 429})
        busy = await c.post("/generate", json={"inputs": "hi"})
        assert busy.status_code == 429 and busy.json()["error_type"] == "overloaded"
