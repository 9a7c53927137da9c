"""The Triton simulator against recordings of Triton 2.51, and tritonclient."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import tritonclient.http as triton_http

from backends.sim.engine import EngineParams
from backends.sim.tokenizer import tokenize
from backends.sim.triton import TritonSimulator
from tests.helpers import FIXTURES, serve_app, sim_process, simulator

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


async def test_a_tensorrt_llm_ensemble_returns_token_counts_when_asked() -> None:
    sim = TritonSimulator(["ensemble"], EngineParams.zero_latency(), token_counts=True)
    asked = {"return_num_input_tokens": True, "return_num_output_tokens": True}
    prompt = "hello token counts"
    async with serve_app(sim.app) as url, httpx.AsyncClient(base_url=url) as c:
        meta = (await c.get("/v2/models/ensemble")).json()
        config = (await c.get("/v2/models/ensemble/config")).json()
        r = await c.post(
            "/v2/models/ensemble/generate_stream",
            json={"text_input": prompt, "max_tokens": 3, "stream": True, **asked},
        )
        whole = await c.post(
            "/v2/models/ensemble/generate",
            json={"text_input": prompt, "max_tokens": 3, "stream": False, **asked},
        )
        plain = await c.post(
            "/v2/models/ensemble/generate_stream",
            json={"text_input": prompt, "max_tokens": 2, "return_num_output_tokens": False},
        )
        too_many = await c.post("/v2/models/ensemble/generate", json={"text_input": "x"})
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs["return_num_input_tokens"] == inputs["return_num_output_tokens"] == ("BOOL", [1])
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs["num_input_tokens"] == outputs["num_output_tokens"] == ("INT32", [1])
    declared = {i["name"]: i["optional"] for i in config["input"]}
    assert declared["return_num_input_tokens"] and not declared["max_tokens"]
    assert "num_output_tokens" in {o["name"] for o in config["output"]}
    # Every response: the prompt's tokens, and the tokens in that response.
    got = events(r.content)
    assert [list(e) for e in got] == [
        ["model_name", "model_version", "text_output", "num_input_tokens", "num_output_tokens"]
    ] * 3
    assert {(e["num_input_tokens"], e["num_output_tokens"]) for e in got} == {
        (len(tokenize(prompt)), 1)
    }
    assert whole.json()["num_input_tokens"] == len(tokenize(prompt))
    assert whole.json()["num_output_tokens"] == 3
    assert [list(e) for e in events(plain.content)] == [
        ["model_name", "model_version", "text_output"]
    ] * 2
    assert "between 2 and 11 but got 1" in too_many.json()["error"]


async def test_the_recorded_model_ignores_count_fields_as_triton_does() -> None:
    # Fields that match no input are request parameters (case 24): no counts, no error.
    async with (
        simulator(["ensemble"], kind="triton") as (url, _),
        httpx.AsyncClient(base_url=url) as c,
    ):
        r = await c.post(
            "/v2/models/ensemble/generate_stream",
            json={"text_input": "hi", "max_tokens": 2, "return_num_output_tokens": True},
        )
    assert r.status_code == 200
    assert [list(e) for e in events(r.content)] == [
        ["model_name", "model_version", "text_output"]
    ] * 2
