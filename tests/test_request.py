"""What a request may ask, checked once, and answered the same on every backend kind:
sampling fields (400 with ``param``), operations a backend cannot serve (embeddings
on TGI/Triton), chat templates that refuse a conversation or break."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import httpx
import orjson
import pytest

from backends import Operation
from router.config import RequestLimits
from router.errors import BodyTooLarge, InvalidRequest, MalformedJSON
from router.request import check_json_shape, parse_body, parse_sampling
from tests.helpers import router, router_config, sim_stats, simulator

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("max_tokens", "12", "max_tokens"),
        ("max_tokens", 1.5, "max_tokens"),
        ("max_tokens", True, "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("max_completion_tokens", -3, "max_completion_tokens"),
        ("temperature", "hot", "temperature"),
        ("temperature", 3, "temperature"),
        ("top_p", 0, "top_p"),
        ("top_p", [1], "top_p"),
        ("top_k", 2.5, "top_k"),
        ("seed", "1", "seed"),
        ("n", 0, "n"),
        ("n", "2", "n"),
        ("stop", 5, "stop"),
        ("stop", ["a", 1], "stop"),
        ("frequency_penalty", 9, "frequency_penalty"),
        ("stream_options", {"include_usage": True}, "stream_options"),  # without stream
    ],
)
def test_sampling_fields_are_checked_with_openai_rules(field: str, value: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_sampling({"messages": MSG, field: value}, Operation.CHAT, stream=False)
    assert info.value.param == param and info.value.status == 400


def test_sampling_fields_are_read_once_into_types() -> None:
    body = {
        "messages": MSG,
        "max_completion_tokens": 7,
        "temperature": 0,
        "top_p": 1,
        "stop": "END",
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    s = parse_sampling(body, Operation.CHAT, stream=True)
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed, s.n, s.include_usage) == (
        7,
        0,
        1,
        ("END",),
        3,
        1,
        True,
    )
    # Embeddings carry no sampling fields: nothing there is checked.
    assert parse_sampling({"input": "x", "n": "?"}, Operation.EMBEDDING, False).n == 1


def endpoint(kind: str, url: str, i: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": f"{kind}-{i}", "url": url, "kind": kind, "models": ["m"], **extra}


@pytest.mark.parametrize("kind", ["tgi", "triton"])
async def test_bad_fields_get_the_same_400_on_translated_kinds(kind: str) -> None:
    async with simulator(["m"], kind=kind) as (sim_url, _):
        async with router(router_config([endpoint(kind, sim_url)])) as url:
            async with httpx.AsyncClient() as client:
                r = await client.post(
                    url + "/v1/chat/completions",
                    json={"model": "m", "messages": MSG, "max_tokens": "lots"},
                )
                assert r.status_code == 400
                assert r.json()["error"]["param"] == "max_tokens"
                assert r.json()["error"]["type"] == "invalid_request_error"
                two = await client.post(
                    url + "/v1/chat/completions", json={"model": "m", "messages": MSG, "n": 2}
                )
                assert two.status_code == 400 and "n must be 1" in two.json()["error"]["message"]
            stats = await sim_stats(sim_url)
    assert stats["requests"] == 0  # nothing reached the backend


async def test_embeddings_go_only_where_they_are_served() -> None:
    async with AsyncExitStack() as stack:
        tgi_url, _ = await stack.enter_async_context(simulator(["m"], kind="tgi"))
        triton_url, _ = await stack.enter_async_context(simulator(["m"], kind="triton"))
        vllm_url, _ = await stack.enter_async_context(simulator(["mixed"], kind="vllm"))
        tgi2_url, _ = await stack.enter_async_context(simulator(["mixed"], kind="tgi"))
        cfg = router_config(
            [
                endpoint("tgi", tgi_url),
                endpoint("triton", triton_url),
                {"id": "vllm", "url": vllm_url, "kind": "vllm", "models": ["mixed"]},
                {"id": "tgi-mixed", "url": tgi2_url, "kind": "tgi", "models": ["mixed"]},
            ]
        )
        url = await stack.enter_async_context(router(cfg))
        async with httpx.AsyncClient() as client:
            r = await client.post(url + "/v1/embeddings", json={"model": "m", "input": "x"})
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["code"] == "unsupported_operation" and error["param"] == "model"
            assert "/v1/embeddings" in error["message"]
            for _ in range(4):  # round robin would alternate; only vLLM may take these
                e = await client.post(url + "/v1/embeddings", json={"model": "mixed", "input": "x"})
                assert e.status_code == 200 and e.json()["object"] == "list"
        assert (await sim_stats(tgi2_url))["requests"] == 0
        assert (await sim_stats(tgi_url))["requests"] == 0


ALTERNATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)
BROKEN = "{{ messages[0].content.no_such_method() }}"


async def test_a_template_that_refuses_the_chat_is_the_clients_400() -> None:
    async with simulator(["m"], kind="tgi") as (sim_url, _):
        ep = endpoint("tgi", sim_url, options={"chat_template": ALTERNATE})
        async with router(router_config([ep])) as url, httpx.AsyncClient() as client:
            twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
            r = await client.post(
                url + "/v1/chat/completions", json={"model": "m", "messages": twice}
            )
            assert r.status_code == 400
            assert r.json()["error"]["message"].startswith("Conversation roles must alternate")
            assert r.json()["error"]["type"] == "invalid_request_error"
            ok = await client.post(
                url + "/v1/chat/completions", json={"model": "m", "messages": MSG}
            )
            assert ok.status_code == 200


async def test_a_template_that_breaks_fails_over_to_an_endpoint_that_renders() -> None:
    async with AsyncExitStack() as stack:
        bad_url, _ = await stack.enter_async_context(simulator(["m"], kind="triton"))
        good_url, _ = await stack.enter_async_context(simulator(["m"], kind="triton"))
        endpoints = [
            endpoint("triton", bad_url, 0, models=[{"name": "m", "chat_template": BROKEN}]),
            endpoint("triton", good_url, 1),
        ]
        url = await stack.enter_async_context(router(router_config(endpoints)))
        async with httpx.AsyncClient() as client:
            for _ in range(4):
                r = await client.post(
                    url + "/v1/chat/completions", json={"model": "m", "messages": MSG}
                )
                assert r.status_code == 200
            admin = (await client.get(url + "/admin/endpoints")).json()["endpoints"]
        bad = next(e for e in admin if e["id"] == "triton-0")
        assert "chat template" in bad["last_error"]
        assert bad["circuit"]["state"] == "closed"  # ours to fix, not the backend's fault
        assert (await sim_stats(bad_url))["requests"] == 0


def test_json_containers_are_counted_before_parsing_brackets_in_strings_are_not() -> None:
    limits = RequestLimits(max_json_containers=1000)
    flood = b'{"model":"m","prompt":"x","junk":[' + b",".join([b"{}"] * 5000) + b"]}"
    with pytest.raises(BodyTooLarge, match="max_json_containers"):
        parse_body(flood, Operation.COMPLETION, limits)
    code = orjson.dumps({"model": "m", "prompt": "{[" * 50_000})
    assert parse_body(code, Operation.COMPLETION, limits)["prompt"].startswith("{[")
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 5}
    with pytest.raises(InvalidRequest) as info:
        parse_body(orjson.dumps(chat), Operation.CHAT, RequestLimits(max_messages=4))
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequest) as info:
        parse_sampling({"stop": ["a"] * 17}, Operation.COMPLETION, False, max_stop=16)
    assert info.value.param == "stop"


def test_the_shape_check_is_one_pass_on_strings_that_never_close_and_on_stray_closers() -> None:
    """Bodies built to make the bracket count rescan: a string that never closes
    (every escaped quote in it a new start for a backtracking pattern: minutes
    for this body) and a flood of closing brackets (a pass each for the depth).
    Both are not JSON: a clean 400 from the parser, at once (the suite's
    timeout is the bound)."""
    limits = RequestLimits()
    opening = b'{"model":"m","prompt":' + b"[" * 65
    for hostile in (opening + b'"' + b'\\"' * 500_000, opening + b"]" * 8_000_000):
        with pytest.raises(MalformedJSON):
            parse_body(hostile, Operation.COMPLETION, limits)
    # Escapes, and brackets inside strings, still do not count.
    nested = orjson.dumps({"model": "m", "prompt": 'a\\"[{', "x": [[[1]]] * 3})
    check_json_shape(nested, RequestLimits(max_json_containers=16, max_json_depth=8))
    with pytest.raises(InvalidRequest, match="deeper than 8"):
        deep = b'{"model":"m","prompt":"[","x":' + b"[" * 9 + b"]" * 9 + b"}"
        check_json_shape(deep, RequestLimits(max_json_containers=16, max_json_depth=8))


async def test_a_flood_of_tiny_objects_is_refused_without_parsing_it() -> None:
    async with simulator(["m"]) as (sim_url, _):
        async with router(router_config([endpoint("vllm", sim_url)])) as url:
            body = b'{"model":"m","prompt":"x","junk":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(
                    url + "/v1/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                assert r.status_code == 413
                assert r.json()["error"]["code"] == "request_too_large"
                ok = await client.post(
                    url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}
                )
                assert ok.status_code == 200


async def test_per_model_caps_on_n_and_max_tokens() -> None:
    async with simulator(["m", "free"]) as (sim_url, _):
        ep = {"id": "e", "url": sim_url, "kind": "vllm", "models": ["m", "free"]}
        cfg = router_config(
            [ep], models={"m": {"limits": {"max_tokens": 5, "max_n": 2}}}, requests={"max_n": 4}
        )
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:

            async def complete(model: str, **fields: Any) -> httpx.Response:
                body = {"model": model, "prompt": "Once upon a time", **fields}
                return await client.post("/v1/completions", json=body)

            over = await complete("m", max_tokens=6)
            assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
            assert (await complete("m", n=3)).json()["error"]["param"] == "n"
            assert (await complete("free", n=5)).json()["error"]["param"] == "n"
            assert (await complete("free", n=4, max_tokens=9)).status_code == 200
            capped = await complete("m")  # no max_tokens: the cap is written in
            assert capped.status_code == 200
            assert capped.json()["usage"]["completion_tokens"] == 5
            assert capped.json()["choices"][0]["finish_reason"] == "length"


async def test_the_cap_is_on_the_length_the_engine_reads() -> None:
    """A chat's engine reads ``max_completion_tokens`` before ``max_tokens`` (vLLM,
    OpenAI); the completions API has only ``max_tokens``. The cap is on that one."""
    async with simulator(["m"]) as (sim_url, _):
        ep = {"id": "e", "url": sim_url, "kind": "vllm", "models": ["m"]}
        cfg = router_config([ep], models={"m": {"limits": {"max_tokens": 5}}})
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            chat = {"model": "m", "messages": [{"role": "user", "content": "Once upon a time"}]}
            sneaky = {**chat, "max_tokens": 1, "max_completion_tokens": 50}
            r = await client.post("/v1/chat/completions", json=sneaky)
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
            both = {**chat, "max_tokens": 50, "max_completion_tokens": 3}
            r = await client.post("/v1/chat/completions", json=both)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            bad = {**chat, "max_tokens": 0, "max_completion_tokens": 3}
            r = await client.post("/v1/chat/completions", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
            # Not a completions field: the cap is written in, as for no bound at all.
            prompt = {"model": "m", "prompt": "Once upon a time", "max_completion_tokens": 50}
            r = await client.post("/v1/completions", json=prompt)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


async def test_deep_nesting_is_a_clean_400_or_served_never_a_500() -> None:
    async with simulator(["m"], kind="tgi") as (tgi_url, _), simulator(["m"]) as (vllm_url, _):
        endpoints = [endpoint("vllm", vllm_url), endpoint("tgi", tgi_url)]
        async with router(router_config(endpoints)) as url, httpx.AsyncClient() as client:
            too_deep = b'{"model":"m","prompt":' + b"[" * 5000 + b"]" * 5000 + b"}"
            r = await client.post(
                url + "/v1/completions",
                content=too_deep,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400 and "max_json_depth" in r.json()["error"]["message"]
            for depth in (60, 300, 900):
                nested: Any = "x"
                for _ in range(depth):
                    nested = [nested]
                messages = [{"role": "user", "content": nested}]
                for _ in range(2):  # round robin: both kinds
                    r = await client.post(
                        url + "/v1/chat/completions", json={"model": "m", "messages": messages}
                    )
                    assert r.status_code < 500, r.text
                    if depth > 64:
                        assert r.status_code == 400 and r.json()["error"]["param"] is None
                    else:  # within the bound: served, whatever kvroute re-encodes
                        assert r.status_code == 200, r.text
