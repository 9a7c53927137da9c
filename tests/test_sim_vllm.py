"""The vLLM simulator against what a real vLLM server sent (shared/fixtures/vllm)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from tests.helpers import FIXTURES, simulator

VLLM = FIXTURES / "vllm"
SYSTEM = " ".join(
    f"Rule {i}: answer politely and cite the handbook section {i}." for i in range(14)
)


def fixture_json(name: str) -> Any:
    return orjson.loads((VLLM / f"{name}.body").read_bytes())


def fixture_events(name: str) -> list[Any]:
    return parse_sse((VLLM / f"{name}.body").read_bytes())


def parse_sse(raw: bytes) -> list[Any]:
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    out: list[Any] = []
    for event in events:
        assert event.startswith(b"data: "), event
        payload = event[len(b"data: ") :]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def shape(value: Any) -> Any:
    """Keys all the way down; values only by their JSON type."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__ if value is not None else None


def same_keys(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_keys(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return all(same_keys(x, y) for x, y in zip(a[:1], b[:1], strict=False))
    return True


def chat_body(question: str, **kw: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        **kw,
    }


PARAMS = EngineParams.zero_latency(block_size=32, num_blocks=81, max_model_len=2048)


async def test_chat_has_vllm_keys_and_caches_whole_blocks() -> None:
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        first = (await c.post("/v1/chat/completions", json=chat_body("What is a cache?"))).json()
        again = (await c.post("/v1/chat/completions", json=chat_body("Why route?"))).json()
    real = fixture_json("chat")
    assert same_keys(first, real), (shape(first), shape(real))
    assert same_keys(again, fixture_json("chat_again_cached"))
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 32 == 0
    assert cached < again["usage"]["prompt_tokens"]
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 8


async def test_output_is_deterministic() -> None:
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        a = (await c.post("/v1/chat/completions", json=chat_body("x"))).json()
        b = (await c.post("/v1/chat/completions", json=chat_body("x"))).json()
        d = (await c.post("/v1/chat/completions", json=chat_body("y"))).json()
    text = [r["choices"][0]["message"]["content"] for r in (a, b, d)]
    assert text[0] == text[1] != text[2]


async def test_chat_stream_framing_matches_vllm() -> None:
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        plain = await c.post("/v1/chat/completions", json=chat_body("q", stream=True))
        with_usage = await c.post(
            "/v1/chat/completions",
            json=chat_body("q", stream=True, stream_options={"include_usage": True}),
        )
    assert plain.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = parse_sse(plain.content)
    real = fixture_events("chat_stream")
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert same_keys(events[0], real[0]) and same_keys(events[1], real[1])
    assert same_keys(events[-2], real[-2])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) == 1 + 8 + 1  # role, 8 tokens, [DONE]

    usage_events = parse_sse(with_usage.content)
    real_usage = fixture_events("chat_stream_usage")
    assert usage_events[-2]["choices"] == []
    assert same_keys(usage_events[-2], real_usage[-2])
    assert usage_events[-2]["usage"]["completion_tokens"] == 8


async def test_completions_match_vllm() -> None:
    body = {"model": "tiny", "prompt": "def main():", "max_tokens": 4}
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        plain = (await c.post("/v1/completions", json=body)).json()
        streamed = await c.post("/v1/completions", json={**body, "stream": True})
    assert same_keys(plain, fixture_json("completion"))
    events = parse_sse(streamed.content)
    real = fixture_events("completion_stream")
    assert same_keys(events[0], real[0]) and same_keys(events[-2], real[-2])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "fixture", "status"),
    [
        (b'{"model": "nope", "messages": []}', "err_unknown_model", 404),
        (b"{bad", "err_bad_json", 400),
        (b'{"model": "tiny"}', "err_missing_messages", 400),
        (b'{"model":"tiny","messages":[],"max_tokens":-1}', "err_bad_max_tokens", 400),
    ],
)
async def test_errors_match_vllm(body: bytes, fixture: str, status: int) -> None:
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", content=body)
    real = fixture_json(fixture)
    assert r.status_code == status
    got = r.json()
    assert same_keys(got, real)
    assert (got["error"]["type"], got["error"]["param"], got["error"]["code"]) == (
        real["error"]["type"],
        real["error"]["param"],
        real["error"]["code"],
    )


async def test_prompt_too_long_matches_vllm() -> None:
    prompt = "word " * 2100
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": prompt})
    real = fixture_json("err_too_long")
    assert r.status_code == 400
    assert (r.json()["error"]["type"], r.json()["error"]["param"]) == (
        "BadRequestError",
        "input_tokens",
    )
    assert r.json()["error"]["message"].startswith(real["error"]["message"][:45])


async def test_models_health_and_metrics() -> None:
    async with simulator(params=PARAMS) as (url, _), httpx.AsyncClient(base_url=url) as c:
        models = (await c.get("/v1/models")).json()
        health = await c.get("/health")
        await c.post("/v1/chat/completions", json=chat_body("a"))
        r2 = (await c.post("/v1/chat/completions", json=chat_body("b"))).json()
        metrics = await c.get("/metrics")
    assert same_keys(models, fixture_json("models"))
    assert (health.status_code, health.content) == (200, b"")
    assert metrics.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    samples = {
        s.name: s
        for fam in text_string_to_metric_families(metrics.text)
        for s in fam.samples
        if not s.name.startswith("vllm:request_success")
    }
    real_names = {
        s.name
        for fam in text_string_to_metric_families((VLLM / "metrics.body").read_text())
        for s in fam.samples
    }
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:cache_config_info",
    ):
        assert name in samples and name in real_names
        assert samples[name].labels["engine"] == "0"
    hits = samples["vllm:prefix_cache_hits_total"].value
    assert hits == r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert samples["vllm:cache_config_info"].labels["block_size"] == "32"
    assert samples["vllm:cache_config_info"].labels["num_gpu_blocks"] == "81"


async def test_fault_knobs() -> None:
    faults = Faults(fail_rate=1.0, fail_status=503)
    async with (
        simulator(params=PARAMS, faults=faults) as (url, sim),
        httpx.AsyncClient(base_url=url) as c,
    ):
        r = await c.post("/v1/chat/completions", json=chat_body("a"))
        assert r.status_code == 503 and "error" in r.json()
        await c.post("/sim/faults", json={"fail_rate": 0.0, "die_after_chunks": 3})
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/v1/chat/completions", json=chat_body("a", stream=True))
        bad = await c.post("/sim/faults", json={"nope": 1})
        assert bad.status_code == 400 and "unknown fault knob" in bad.json()["error"]
        assert sim.faults.die_after_chunks == 3
