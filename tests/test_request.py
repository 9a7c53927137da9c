"""What a request may ask, checked once, and answered the same on every backend kind:
sampling fields (400 with ``param``), operations a backend cannot serve (embeddings
on TGI/Triton), chat templates that refuse a conversation or break."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from backends import Operation
from router.errors import InvalidRequest
from router.request import parse_sampling
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
