"""Wire translation, pure: recorded bytes in, OpenAI bytes out, no sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from backends import Target, UpstreamProtocolError, build_adapter
from backends.sse import SSEParser
from backends.templates import ChatTemplateError, render
from router.config import ConfigError, parse_config
from tests.helpers import FIXTURES

TRITON = FIXTURES / "triton"
CHAT = "/v1/chat/completions"
TARGET = Target("tiny", "ensemble", None)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def openai_events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for event in raw.split(b"\n\n"):
        if event:
            payload = event.removeprefix(b"data: ")
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def feed_bytewise(translator: Any, raw: bytes) -> bytes:
    """Split the upstream stream at every byte: chunk boundaries must not matter."""
    return b"".join(translator.feed(raw[i : i + 1]) for i in range(len(raw))) + translator.close()


def test_sse_parser_handles_any_split_and_both_data_forms() -> None:
    raw = b'data: {"a":1}\n\ndata:{"b":2}\r\n\r\n: comment\ndata: x\ndata: y\n\n'
    whole = SSEParser()
    assert whole.feed(raw) == [b'{"a":1}', b'{"b":2}', b"x\ny"]
    parser = SSEParser()
    got = [e for i in range(len(raw)) for e in parser.feed(raw[i : i + 1])]
    assert got == [b'{"a":1}', b'{"b":2}', b"x\ny"]
    tail = SSEParser()
    tail.feed(b"data: last")
    assert tail.close() == [b"last"]


def test_chat_templates() -> None:
    assert render("chatml", MESSAGES).endswith("<|im_start|>assistant\n")
    assert render("llama-3", MESSAGES).startswith("<|begin_of_text|><|start_header_id|>system")
    custom = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>"
    assert render(custom, MESSAGES) == "[system]Be brief.[user]Hi>"
    with pytest.raises(ChatTemplateError):
        render("{% for %}", MESSAGES)
    with pytest.raises(ConfigError) as info:
        parse_config(
            "endpoints: [{id: t, url: 'http://t:1', kind: tgi, "
            "models: [{name: m, chat_template: '{% if %}'}]}]",
            {},
        )
    assert info.value.errors[0].startswith("endpoints[0].models[0].chat_template: invalid chat")


def test_endpoint_options_are_checked_per_kind() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            "endpoints: [{id: t, url: 'http://t:1', kind: tgi, options: {api: soap}, models: [m]}]",
            {},
        )
    assert "endpoints[0]: bad options for kind 'tgi': api: Input should be" in str(info.value)


# -- Triton ---------------------------------------------------------------------------


def triton(**options: Any) -> Any:
    return build_adapter("triton", options)


def test_triton_request_has_ensemble_fields() -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0.2,
        "stop": "END",
        "stream": True,
        "seed": 9,
    }
    up = triton().build("http://t:8000", CHAT, b"", body, TARGET, {})
    assert up.url == "http://t:8000/v2/models/ensemble/generate_stream"
    sent = orjson.loads(up.body)
    assert sent == {
        "text_input": render("chatml", MESSAGES),
        "max_tokens": 5,
        "stream": True,
        "temperature": 0.2,
        "seed": 9,
        "stop_words": ["END"],
    }
    renamed = triton(fields={"seed": "random_seed", "text_input": "prompt"}, default_max_tokens=7)
    sent = orjson.loads(
        renamed.build(
            "http://t", "/v1/completions", b"", {"prompt": "hi", "seed": 1}, TARGET, {}
        ).body
    )
    assert (sent["prompt"], sent["random_seed"], sent["max_tokens"], sent["stream"]) == (
        "hi",
        1,
        7,
        False,
    )


def test_triton_recorded_stream_becomes_openai_chunks() -> None:
    raw = (TRITON / "10_stream_ok.body.txt").read_bytes()
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = openai_events(feed_bytewise(triton().stream_translator(CHAT, body, TARGET), raw))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"]["content"] for e in out[1:-2])
    assert text == "w0 w1 w2 w3 w4 "
    assert out[-3]["choices"][0]["finish_reason"] == "length"  # 5 responses for max_tokens 5
    assert out[-2]["choices"] == [] and out[-2]["usage"]["completion_tokens"] == 5
    assert out[-1] == "[DONE]" and all(e == "[DONE]" or e["model"] == "tiny" for e in out)


def test_triton_error_midway_becomes_an_openai_error_event() -> None:
    raw = (TRITON / "31_model_err_stream_midway.body.txt").read_bytes()
    out = feed_bytewise(triton().stream_translator(CHAT, {"max_tokens": 5}, TARGET), raw)
    events = openai_events(out)
    assert [e["choices"][0]["delta"].get("content") for e in events[:3]] == ["", "w0 ", "w1 "]
    assert events[-1]["error"]["message"] == "Triton: simulated failure after 2 tokens"
    assert b"[DONE]" not in out


def test_triton_empty_stream_and_accumulated_output() -> None:
    empty = triton().stream_translator(CHAT, {"max_tokens": 0}, TARGET)
    events = openai_events(empty.feed(b"") + empty.close())
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    acc = b"".join(
        b'data: {"model_name":"e","model_version":"1","text_output":"' + t + b'"}\n\n'
        for t in (b"Hello", b"Hello wor", b"Hello world")
    )
    events = openai_events(
        feed_bytewise(triton().stream_translator("/v1/completions", {"max_tokens": 9}, TARGET), acc)
    )
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello world"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # Repeated equal deltas are deltas, not accumulation.
    same = b"".join(b'data: {"text_output":"ab"}\n\n' for _ in range(3))
    events = openai_events(triton().stream_translator("/v1/completions", {}, TARGET).feed(same))
    assert "".join(e["choices"][0]["text"] for e in events) == "ababab"


def test_triton_generate_json_and_the_error_hidden_in_a_200() -> None:
    ok = (TRITON / "12_sync_generate.body.txt").read_bytes()
    answer = orjson.loads(triton().translate_json(CHAT, {}, TARGET, ok))
    assert answer["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert answer["model"] == "tiny" and answer["object"] == "chat.completion"
    hidden = (TRITON / "11_generate_on_decoupled.body.txt").read_bytes()
    with pytest.raises(UpstreamProtocolError, match="exactly 1 response"):
        triton().translate_json(CHAT, {}, TARGET, hidden)


def test_triton_load_from_metrics() -> None:
    load = build_adapter("triton", {}).parse_load(
        (TRITON / "90_metrics.body.txt").read_text()
        + 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="m"} 30\n'
        + 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="m"} 120\n'
        + 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="m"} 64\n'
    )
    assert (load.waiting, load.kv_usage, load.kv_capacity_tokens) == (0.0, 0.25, 7680)


# -- TGI --------------------------------------------------------------------------------


def tgi(**options: Any) -> Any:
    return build_adapter("tgi", options)


def test_tgi_request_parameters() -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 3,
        "temperature": 0,
        "top_p": 0.9,
        "stop": ["a", "b", "c", "d", "e"],
        "frequency_penalty": 0.5,
    }
    up = tgi().build("http://g", CHAT, b"", body, Target("m", "m", "llama-3"), {})
    assert up.url == "http://g/generate"
    sent = orjson.loads(up.body)
    assert sent["inputs"] == render("llama-3", MESSAGES)
    assert sent["parameters"] == {
        "max_new_tokens": 3,
        "details": True,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "stop": ["a", "b", "c", "d"],
    }
    streamed = tgi().build("http://g", CHAT, b"", {**body, "stream": True}, TARGET, {})
    assert streamed.url == "http://g/generate_stream"
    passthrough = tgi(api="messages").build(
        "http://g", CHAT, b'{"x":1}', {"model": "ensemble"}, TARGET, {}
    )
    assert (passthrough.url, passthrough.body) == ("http://g/v1/chat/completions", b'{"x":1}')


def test_tgi_answers_become_openai() -> None:
    answer = {
        "generated_text": " the end",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 2,
            "seed": None,
            "prefill": [],
            "tokens": [],
        },
    }
    out = orjson.loads(tgi().translate_json(CHAT, {}, TARGET, orjson.dumps(answer)))
    assert out["choices"][0]["message"]["content"] == " the end"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2}
    listed = orjson.loads(
        tgi().translate_json("/v1/completions", {}, TARGET, orjson.dumps([answer]))
    )
    assert listed["choices"][0]["text"] == " the end"
    with pytest.raises(UpstreamProtocolError):
        tgi().translate_json(CHAT, {}, TARGET, b'{"error":"x"}')

    def event(i: int, text: str, final: bool) -> bytes:
        e = {
            "index": i,
            "token": {"id": i, "text": text, "logprob": -1.0, "special": False},
            "generated_text": "ab" if final else None,
            "details": {
                "finish_reason": "length",
                "generated_tokens": 2,
                "seed": None,
                "input_length": 7,
            }
            if final
            else None,
        }
        return b"data:" + orjson.dumps(e) + b"\n\n"

    raw = event(1, "a", False) + event(2, "b", True)
    body = {"stream": True, "stream_options": {"include_usage": True}}
    events = openai_events(feed_bytewise(tgi().stream_translator(CHAT, body, TARGET), raw))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-2]) == "ab"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    broken = tgi().stream_translator(CHAT, {}, TARGET)
    out = openai_events(
        feed_bytewise(
            broken, event(1, "a", False) + b'data:{"error":"oom","error_type":"generation"}\n\n'
        )
    )
    assert out[-1]["error"] == {
        "message": "oom",
        "type": "upstream_error",
        "param": None,
        "code": "generation",
    }
