"""The Triton simulator against recordings of Triton 2.51, and tritonclient."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import tritonclient.http as triton_http

from tests.helpers import FIXTURES, sim_process, simulator

TRITON = FIXTURES / "triton"


def fixture(name: str) -> tuple[str, str, bytes, bytes]:
    request = (TRITON / f"{name}.request.txt").read_bytes()
    head, _, body = request.partition(b"\n\n")
    method, path = head.split(b"\n")[0].decode().split(" ", 1)
    return method, path, body, (TRITON / f"{name}.body.txt").read_bytes()


def status_of(name: str) -> int:
    line = (TRITON / f"{name}.headers.txt").read_text().splitlines()[0]
    return int(line.split(" ")[1])


def content_type_of(name: str) -> str:
    for line in (TRITON / f"{name}.headers.txt").read_text().splitlines():
        if line.lower().startswith("content-type:"):
            return line.split(":", 1)[1].strip()
    return ""


def events(body: bytes) -> list[Any]:
    return [orjson.loads(e.removeprefix(b"data: ")) for e in body.split(b"\n\n") if e]


CASES = [
    "01_health_live",
    "02_health_ready",
    "03_model_ready",
    "09_model_unknown_ready",
    "09b_model_unknown_meta",
    "10_stream_ok",
    "10b_stream_ok_all_params",
    "10c_stream_zero_tokens",
    "10d_stream_no_stream_flag",
    "11_generate_on_decoupled",
    "11b_generate_on_decoupled_stream_false",
    "11c_generate_on_decoupled_one_token",
    "20_err_missing_max_tokens_stream",
    "20a_err_missing_max_tokens_stream_only_text",
    "21_err_unknown_model_stream",
    "21b_err_unknown_model_generate",
    "22_err_wrong_type_stream",
    "23_err_bad_json_stream",
    "23b_err_bad_json_generate",
    "24_err_unknown_field_stream",
    "25_err_get_on_generate",
    "30_model_err_stream_immediate",
]


@pytest.mark.parametrize("name", CASES)
async def test_same_status_content_type_and_shape_as_real_triton(name: str) -> None:
    method, path, body, real = fixture(name)
    async with (
        simulator(["ensemble", "ensemble_sync"], kind="triton") as (url, _),
        httpx.AsyncClient(base_url=url) as c,
    ):
        r = await c.request(
            method,
            path,
            content=body or None,
            headers={"content-type": "application/json"} if body else {},
        )
    assert r.status_code == status_of(name)
    assert r.headers.get("content-type", "") == content_type_of(name)
    if not real:
        assert r.content == b""
    elif real.startswith(b"data: "):
        got, want = events(r.content), events(real)
        assert len(got) == len(want)
        assert [list(e) for e in got] == [list(e) for e in want]
        if "error" in want[0]:
            assert got == want  # the model's own error text
    else:
        got, want = orjson.loads(r.content), orjson.loads(real)
        assert list(got) == list(want)
        if list(want) == ["error"] and "parse" not in want["error"]:
            assert got == want


async def test_stream_text_is_a_delta_per_response_with_no_done() -> None:
    async with (
        simulator(["ensemble"], kind="triton") as (url, _),
        httpx.AsyncClient(base_url=url) as c,
    ):
        r = await c.post(
            "/v2/models/ensemble/generate_stream",
            json={"text_input": "hello", "max_tokens": 4, "stream": True},
        )
    got = events(r.content)
    assert len(got) == 4 and b"[DONE]" not in r.content
    assert all(e["text_output"].count(" ") == 1 for e in got)  # one word each


async def test_mid_stream_model_error_is_an_event_in_a_200() -> None:
    async with (
        simulator(["ensemble"], kind="triton") as (url, sim),
        httpx.AsyncClient(base_url=url) as c,
    ):
        await c.post("/sim/faults", json={"die_after_chunks": 2})
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(
                "/v2/models/ensemble/generate_stream",
                json={"text_input": "x", "max_tokens": 5, "stream": True},
            )
        assert sim.faults.die_after_chunks == 2


async def test_tritonclient_health_and_metadata() -> None:
    # tritonclient.http is gevent-based and blocking: the simulator runs in a
    # process of its own, and the client is called directly.
    async with sim_process("--kind", "triton", model="ensemble") as (url, _):
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("ensemble")
        assert not client.is_model_ready("nope")
        meta = client.get_model_metadata("ensemble")
        assert meta["name"] == "ensemble"
        assert [i["name"] for i in meta["inputs"]][:2] == ["text_input", "max_tokens"]
        assert client.get_server_metadata()["version"] == "2.51.0"
        config = client.get_model_config("ensemble")
        assert config["model_transaction_policy"]["decoupled"] is True
        client.close()


async def test_metrics_names_match_triton() -> None:
    real = (TRITON / "90_metrics.body.txt").read_text()
    async with (
        simulator(["ensemble"], kind="triton") as (url, _),
        httpx.AsyncClient(base_url=url) as c,
    ):
        text = (await c.get("/metrics")).text
    for name in ("nv_inference_request_success", "nv_inference_pending_request_count"):
        assert f"# TYPE {name}" in real and f"# TYPE {name}" in text
    assert 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"' in text
