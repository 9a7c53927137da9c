"""Wire translation, pure: recorded bytes in, OpenAI bytes out, no sockets."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from backends import Operation, Sampling, Target, UpstreamProtocolError, Usage, build_adapter
from backends.openai import OpenAIAdapter
from backends.sim.tokenizer import tokenize, tokenizer_json
from backends.sse import SSEParser
from backends.templates import ChatTemplateError, render
from backends.tokens import estimate
from router.config import ConfigError, parse_config
from router.request import parse_sampling
from tests.helpers import FIXTURES

TRITON = FIXTURES / "triton"
CHAT = Operation.CHAT
COMPLETION = Operation.COMPLETION
TARGET = Target("tiny", "ensemble", None)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
#: Counts as the simulators' tokenizer does (one token per word of up to 6 letters).
SIM_TOKENIZER = Tokenizer.from_str(tokenizer_json())


@dataclass(frozen=True)
class Req:
    """An OpenAI request as adapters see it (the router's InferenceRequest)."""

    op: Operation
    raw: bytes
    body: dict[str, Any]
    stream: bool
    sampling: Sampling
    router_usage: bool = False


def req(op: Operation, body: dict[str, Any]) -> Req:
    stream = body.get("stream") is True
    return Req(op, orjson.dumps(body), body, stream, parse_sampling(body, op, stream))


def translator(adapter: Any, op: Operation, body: dict[str, Any], target: Target = TARGET) -> Any:
    return adapter.prepare(req(op, body), target).translator


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


def test_sse_parser_bounds_an_event_that_never_ends() -> None:
    endless = SSEParser(max_event_bytes=1000)
    endless.feed(b"data: ")
    with pytest.raises(UpstreamProtocolError, match="longer than 1000 bytes"):
        for _ in range(100):
            endless.feed(b"x" * 100)  # a line that never ends
    many = SSEParser(max_event_bytes=1000)
    with pytest.raises(UpstreamProtocolError):
        for _ in range(100):
            many.feed(b"data: " + b"y" * 50 + b"\n")  # data lines, never a blank one
    # Up to the bound, events of any length and count pass, and the count restarts.
    fine = SSEParser(max_event_bytes=1000)
    for _ in range(100):
        assert fine.feed(b"data: " + b"z" * 900 + b"\n\n") == [b"z" * 900]


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
    up = triton().prepare(req(CHAT, body), TARGET)
    assert up.path == "/v2/models/ensemble/generate_stream"
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
    sent = orjson.loads(renamed.prepare(req(COMPLETION, {"prompt": "hi", "seed": 1}), TARGET).body)
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
    out = openai_events(feed_bytewise(translator(triton(), CHAT, body), raw))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"]["content"] for e in out[1:-2])
    assert text == "w0 w1 w2 w3 w4 "
    assert out[-3]["choices"][0]["finish_reason"] == "length"  # 5 responses for max_tokens 5
    assert out[-2]["choices"] == [] and out[-2]["usage"]["completion_tokens"] == 5
    assert out[-1] == "[DONE]" and all(e == "[DONE]" or e["model"] == "tiny" for e in out)


def test_triton_error_midway_becomes_an_openai_error_event() -> None:
    raw = (TRITON / "31_model_err_stream_midway.body.txt").read_bytes()
    out = feed_bytewise(
        translator(triton(), CHAT, {"messages": MESSAGES, "max_tokens": 5, "stream": True}), raw
    )
    events = openai_events(out)
    assert [e["choices"][0]["delta"].get("content") for e in events[:3]] == ["", "w0 ", "w1 "]
    assert events[-1]["error"]["message"] == "Triton: simulated failure after 2 tokens"
    assert b"[DONE]" not in out


def test_triton_empty_stream_and_accumulated_output() -> None:
    empty = translator(triton(), CHAT, {"messages": MESSAGES, "max_tokens": 1, "stream": True})
    events = openai_events(empty.feed(b"") + empty.close())
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    acc = b"".join(
        b'data: {"model_name":"e","model_version":"1","text_output":"' + t + b'"}\n\n'
        for t in (b"Hello", b"Hello wor", b"Hello world")
    )
    events = openai_events(
        feed_bytewise(
            translator(triton(), COMPLETION, {"prompt": "x", "max_tokens": 9, "stream": True}), acc
        )
    )
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello world"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # Repeated equal deltas are deltas, not accumulation.
    same = b"".join(b'data: {"text_output":"ab"}\n\n' for _ in range(3))
    events = openai_events(
        translator(triton(), COMPLETION, {"prompt": "x", "stream": True}).feed(same)
    )
    assert "".join(e["choices"][0]["text"] for e in events) == "ababab"


def test_triton_generate_json_and_the_error_hidden_in_a_200() -> None:
    ok = (TRITON / "12_sync_generate.body.txt").read_bytes()
    answer = orjson.loads(translator(triton(), CHAT, {"messages": MESSAGES}).answer(ok))
    assert answer["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert answer["model"] == "tiny" and answer["object"] == "chat.completion"
    hidden = (TRITON / "11_generate_on_decoupled.body.txt").read_bytes()
    with pytest.raises(UpstreamProtocolError, match="exactly 1 response"):
        translator(triton(), CHAT, {"messages": MESSAGES}).answer(hidden)


def test_triton_asks_for_token_counts_when_told_to() -> None:
    body = {"prompt": "hi", "max_tokens": 3}
    assert "return_num_input_tokens" not in orjson.loads(
        triton().prepare(req(COMPLETION, body), TARGET).body
    )
    sent = orjson.loads(triton(token_counts=True).prepare(req(COMPLETION, body), TARGET).body)
    assert sent["return_num_input_tokens"] is sent["return_num_output_tokens"] is True
    renamed = triton(token_counts=True, fields={"return_num_input_tokens": "want_prompt_len"})
    sent = orjson.loads(renamed.prepare(req(COMPLETION, body), TARGET).body)
    assert sent["want_prompt_len"] is sent["return_num_output_tokens"] is True


def triton_event(text: str, **counts: int) -> bytes:
    event = {"model_name": "ensemble", "model_version": "1", "text_output": text, **counts}
    return b"data: " + orjson.dumps(event) + b"\n\n"


@pytest.mark.parametrize(
    ("op", "body", "prompt"),
    [
        (CHAT, {"messages": MESSAGES, "max_tokens": 3}, render("chatml", MESSAGES)),
        (COMPLETION, {"prompt": "Once upon a time", "max_tokens": 3}, "Once upon a time"),
    ],
)
def test_triton_whole_answer_usage_from_the_engine_the_tokenizer_or_an_estimate(
    op: Operation, body: dict[str, Any], prompt: str
) -> None:
    recorded = (TRITON / "12_sync_generate.body.txt").read_bytes()  # "w0 w1 w2 ", no counts
    counted = Target("tiny", "ensemble", None, SIM_TOKENIZER)
    by_tokenizer = translator(triton(), op, body, counted)
    out = orjson.loads(by_tokenizer.answer(recorded))
    assert out["usage"] == {
        "prompt_tokens": len(tokenize(prompt)),
        "completion_tokens": len(tokenize("w0 w1 w2 ")),
        "total_tokens": len(tokenize(prompt)) + len(tokenize("w0 w1 w2 ")),
    }
    assert by_tokenizer.usage.estimated
    by_estimate = translator(triton(), op, body)
    by_estimate.answer(recorded)
    assert (by_estimate.usage.prompt_tokens, by_estimate.usage.completion_tokens) == (
        estimate(prompt),
        3,  # ceil(9 / 4)
    )
    # TensorRT-LLM's counts, as the simulator and the ensemble send them.
    answer = {
        "model_name": "ensemble",
        "model_version": "1",
        "text_output": "w0 w1 w2 ",
        "num_input_tokens": 11,
        "num_output_tokens": 3,
    }
    engine = translator(triton(token_counts=True), op, body, counted)
    out = orjson.loads(engine.answer(orjson.dumps(answer)))
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert not engine.usage.estimated
    assert out["choices"][0]["finish_reason"] == "length"  # 3 tokens of max_tokens 3
    renamed = triton(fields={"num_input_tokens": "prompt_len", "num_output_tokens": "n_out"})
    listed = {"text_output": "w0 ", "prompt_len": [4], "n_out": [1]}
    engine = translator(renamed, op, body)
    assert (
        orjson.loads(engine.answer(orjson.dumps(listed)))["choices"][0]["finish_reason"] == "stop"
    )
    assert engine.usage == Usage(4, 1, None, False)


def test_triton_stream_usage_from_the_engine_the_tokenizer_or_responses() -> None:
    recorded = (TRITON / "10_stream_ok.body.txt").read_bytes()  # 5 responses "w0 " .. "w4 "
    body = {
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    prompt = render("chatml", MESSAGES)
    by_responses = translator(triton(), CHAT, body)
    out = openai_events(feed_bytewise(by_responses, recorded))
    assert out[-2]["usage"]["prompt_tokens"] == estimate(prompt)
    assert out[-2]["usage"]["completion_tokens"] == 5  # a response per token, as TensorRT-LLM
    assert by_responses.usage.estimated
    counted = Target("tiny", "ensemble", None, SIM_TOKENIZER)
    by_tokenizer = translator(triton(), CHAT, body, counted)
    feed_bytewise(by_tokenizer, recorded)
    assert by_tokenizer.usage == Usage(
        len(tokenize(prompt)), len(tokenize("w0 w1 w2 w3 w4 ")), None, True
    )
    # With counts, every response carries the prompt's and its own tokens: summed.
    raw = b"".join(
        triton_event(f"w{i} ", num_input_tokens=12, num_output_tokens=1) for i in range(4)
    )
    engine = translator(triton(token_counts=True), CHAT, body, counted)
    out = openai_events(feed_bytewise(engine, raw))
    assert out[-2]["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    assert out[-3]["choices"][0]["finish_reason"] == "stop" and not engine.usage.estimated
    # Several tokens in one response (speculative decoding) are still counted.
    raw = triton_event("a b ", num_input_tokens=12, num_output_tokens=2) * 3
    engine = translator(triton(token_counts=True), COMPLETION, {"prompt": "x", **body})
    openai_events(feed_bytewise(engine, raw))
    assert engine.usage == Usage(12, 6, None, False)
    # A single response (a model that does not stream): the text is counted.
    whole = translator(triton(), COMPLETION, {"prompt": "x", "stream": True})
    feed_bytewise(whole, triton_event("one two three four five six"))
    assert whole.usage == Usage(1, estimate("one two three four five six"), None, True)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1), st.booleans())
def test_a_non_empty_answer_never_reports_0_tokens(text: str, stream: bool) -> None:
    body = {"prompt": text, "max_tokens": 4, "stream": stream}
    answers = {
        "triton": orjson.dumps({"text_output": text}),
        "tgi": orjson.dumps({"generated_text": text}),  # without details
    }
    events = {
        "triton": triton_event(text),
        "tgi": b"data:"
        + orjson.dumps(
            {
                "token": {"id": 1, "text": text, "special": False},
                "generated_text": text,
                "details": {"finish_reason": "length"},
            }
        )
        + b"\n\n",
    }
    for kind in ("triton", "tgi"):
        for target in (TARGET, Target("tiny", "ensemble", None, SIM_TOKENIZER)):
            tr = translator(build_adapter(kind, {}), COMPLETION, body, target)
            if stream:
                feed_bytewise(tr, events[kind])
            else:
                tr.answer(answers[kind])
            assert tr.usage.prompt_tokens >= 1 and tr.usage.completion_tokens >= 1


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
    up = tgi().prepare(req(CHAT, body), Target("m", "m", "llama-3"))
    assert up.path == "/generate"
    sent = orjson.loads(up.body)
    assert sent["inputs"] == render("llama-3", MESSAGES)
    assert sent["parameters"] == {
        "max_new_tokens": 3,
        "details": True,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "stop": ["a", "b", "c", "d"],
    }
    streamed = tgi().prepare(req(CHAT, {**body, "stream": True}), TARGET)
    assert streamed.path == "/generate_stream"
    # Prompt details only where asked for, and never on a stream (TGI refuses them).
    details = tgi(decoder_input_details=True)
    assert orjson.loads(details.prepare(req(CHAT, body), TARGET).body)["parameters"] == {
        **sent["parameters"],
        "decoder_input_details": True,
    }
    streamed = details.prepare(req(CHAT, {**body, "stream": True}), TARGET)
    assert "decoder_input_details" not in orjson.loads(streamed.body)["parameters"]
    passthrough = tgi(api="messages").prepare(
        req(CHAT, {"model": "ensemble", "messages": MESSAGES}), TARGET
    )
    assert passthrough.path == "/v1/chat/completions"
    assert orjson.loads(passthrough.body) == {"model": "ensemble", "messages": MESSAGES}


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
    out = orjson.loads(translator(tgi(), CHAT, {"messages": MESSAGES}).answer(orjson.dumps(answer)))
    assert out["choices"][0]["message"]["content"] == " the end"
    assert out["choices"][0]["finish_reason"] == "stop"
    prompt = estimate(render("chatml", MESSAGES))  # TGI listed no prompt tokens
    assert out["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 2,
        "total_tokens": prompt + 2,
    }
    listed = orjson.loads(
        translator(tgi(), COMPLETION, {"prompt": "x"}).answer(orjson.dumps([answer]))
    )
    assert listed["choices"][0]["text"] == " the end"
    with pytest.raises(UpstreamProtocolError):
        translator(tgi(), CHAT, {"messages": MESSAGES}).answer(b'{"error":"x"}')

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
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    events = openai_events(feed_bytewise(translator(tgi(), CHAT, body), raw))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-2]) == "ab"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    broken = translator(tgi(), CHAT, {"messages": MESSAGES, "stream": True})
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
    # A backend's words are cut, and a code that is not a string is dropped.
    for error_type, code in (("g" * 500, "g" * 64), ({"nested": 1}, None)):
        wordy = translator(tgi(), CHAT, {"messages": MESSAGES, "stream": True})
        error = {"error": "o" * 10_000, "error_type": error_type}
        out = openai_events(wordy.feed(b"data:" + orjson.dumps(error) + b"\n\n"))
        assert out[-1]["error"]["message"] == "o" * 2000 and out[-1]["error"]["code"] == code


def tgi_answer(text: str, generated: int, prefill: list[dict[str, Any]]) -> bytes:
    details = {
        "finish_reason": "length",
        "generated_tokens": generated,
        "seed": None,
        "prefill": prefill,
        "tokens": [],
    }
    return orjson.dumps({"generated_text": text, "details": details})


@pytest.mark.parametrize(
    ("op", "body", "prompt"),
    [
        (CHAT, {"messages": MESSAGES}, render("chatml", MESSAGES)),
        (COMPLETION, {"prompt": "Once upon a time"}, "Once upon a time"),
    ],
)
def test_tgi_usage_from_the_engine_the_tokenizer_or_an_estimate(
    op: Operation, body: dict[str, Any], prompt: str
) -> None:
    counted = Target("tiny", "tiny", None, SIM_TOKENIZER)
    # The engine's count: one prefill entry per prompt token (decoder_input_details).
    prefill = [{"id": i, "text": "x", "logprob": None if i == 0 else -1.0} for i in range(9)]
    engine = translator(tgi(decoder_input_details=True), op, body, counted)
    engine.answer(tgi_answer(" the end", 2, prefill))
    assert (engine.usage.prompt_tokens, engine.usage.completion_tokens) == (9, 2)
    assert not engine.usage.estimated
    # TGI 3 without --enable-prefill-logprobs lists none: the model's tokenizer...
    by_tokenizer = translator(tgi(), op, body, counted)
    out = orjson.loads(by_tokenizer.answer(tgi_answer(" the end", 2, [])))
    assert (
        out["usage"]["prompt_tokens"] == len(tokenize(prompt)) == by_tokenizer.usage.prompt_tokens
    )
    assert by_tokenizer.usage.estimated and by_tokenizer.usage.completion_tokens == 2
    # ... or, with none configured, a quarter of the characters.
    by_estimate = translator(tgi(), op, body)
    by_estimate.answer(tgi_answer(" the end", 2, []))
    assert by_estimate.usage.prompt_tokens == estimate(prompt)

    def final(details: dict[str, Any] | None) -> bytes:
        event = {
            "index": 1,
            "token": {"id": 1, "text": "ok", "logprob": -1.0, "special": False},
            "generated_text": "ok",
            "details": details,
        }
        return b"data:" + orjson.dumps(event) + b"\n\n"

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    details = {"finish_reason": "length", "generated_tokens": 1, "seed": None, "input_length": 7}
    streamed = translator(tgi(), op, stream, counted)
    events = openai_events(feed_bytewise(streamed, final(details)))
    assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    assert streamed.usage is not None and not streamed.usage.estimated
    no_length = translator(tgi(), op, stream, counted)
    feed_bytewise(no_length, final({k: v for k, v in details.items() if k != "input_length"}))
    assert no_length.usage.prompt_tokens == len(tokenize(prompt)) and no_length.usage.estimated


# -- the response's model name (OpenAI kinds) ----------------------------------------


def test_model_rename_per_event_whatever_the_chunking_and_spacing() -> None:
    served = Target("tiny", "org/Tiny-Model", None)
    body = {"model": "tiny", "messages": MESSAGES, "stream": True}
    raw = (
        b'data: {"id":"a","model":"org/Tiny-Model","choices":[]}\n\n'
        b'data: {"id": "b", "model" : "org/Tiny-Model", "choices": []}\r\n\r\n'
        b'data: {"id":"c","model":"org/Tiny-Model","text":"\\"model\\":\\"org/Tiny-Model\\""}\n\n'
        b"data: [DONE]\n\n"
    )
    for adapter in (build_adapter("vllm", {}), tgi(api="messages")):
        out = feed_bytewise(translator(adapter, CHAT, body, served), raw)
        assert out.count(b"org/Tiny-Model") == 1  # only inside the content string
        assert out.count(b'"tiny"') == 3 and out.endswith(b"data: [DONE]\n\n")
        assert b'"model" : "tiny"' in out  # spacing kept, only the name changed
    whole = translator(build_adapter("openai", {}), CHAT, {"model": "tiny", "messages": []}, served)
    answer = whole.answer(b'{"id":"x", "model": "org/Tiny-Model", "usage":{"prompt_tokens":2}}')
    assert answer == b'{"id":"x", "model": "tiny", "usage":{"prompt_tokens":2}}'
    assert whole.usage is not None and whole.usage.prompt_tokens == 2
    # Same name: the bytes pass through untouched, not even copied into events.
    same = translator(build_adapter("vllm", {}), CHAT, body, Target("tiny", "tiny"))
    assert same.feed(b'data: {"model":"x"') == b'data: {"model":"x"'


def test_backends_say_what_they_cannot_serve() -> None:
    embed = req(Operation.EMBEDDING, {"model": "m", "input": "x"})
    chat_n2 = req(CHAT, {"model": "m", "messages": MESSAGES, "n": 2})
    assert build_adapter("vllm", {}).unsupported(embed) is None
    for adapter in (tgi(), tgi(api="messages"), triton()):
        assert "/v1/embeddings" in (adapter.unsupported(embed) or "")
    assert "n must be 1" in (triton().unsupported(chat_n2) or "")
    assert tgi(api="messages").unsupported(chat_n2) is None  # TGI's own OpenAI API


def test_engines_say_when_an_error_is_their_own_fault() -> None:
    chat = {"model": "m", "messages": MESSAGES}
    tgi_tr, triton_tr = translator(tgi(), CHAT, chat), translator(triton(), CHAT, chat)
    openai_tr = translator(build_adapter("vllm", {}), CHAT, chat)
    assert tgi_tr.server_fault(424, b'{"error":"x","error_type":"generation"}')
    assert not tgi_tr.server_fault(422, b'{"error":"x","error_type":"validation"}')
    assert triton_tr.server_fault(400, b'data: {"error":"model failed"}\n\n')
    assert triton_tr.server_fault(500, b"{}") and openai_tr.server_fault(503, b"{}")
    assert not openai_tr.server_fault(400, b"{}") and not openai_tr.server_fault(404, b"{}")


VLLM = FIXTURES / "vllm"


@pytest.mark.parametrize("served", ["tiny", "org/Tiny-Model"])
def test_usage_kvroute_asked_for_is_read_and_kept_from_the_client(served: str) -> None:
    """A stream whose client asked no usage, recorded from real vLLM with
    include_usage: the usage chunk is read, then dropped, whatever the chunking."""
    recorded = (VLLM / "chat_stream_usage.body").read_bytes()
    if served != "tiny":
        recorded = recorded.replace(b'"model":"tiny"', b'"model":"org/Tiny-Model"')
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    request = dataclasses.replace(req(Operation.CHAT, body), router_usage=True)
    exchange = OpenAIAdapter().prepare(request, Target("tiny", served))
    sent = orjson.loads(exchange.body)
    assert sent["stream_options"] == {"include_usage": True} and sent["model"] == served
    events = recorded.split(b"\n\n")
    usage_event = next(e for e in events if b'"usage"' in e)
    expected = b"\n\n".join(e for e in events if e != usage_event)
    expected = expected.replace(b'"model":"org/Tiny-Model"', b'"model":"tiny"')
    rng = random.Random(5)
    for _ in range(50):
        tr = OpenAIAdapter().prepare(request, Target("tiny", served)).translator
        out, at = b"", 0
        while at < len(recorded):
            step = rng.randint(1, 200)
            out += tr.feed(recorded[at : at + step])
            at += step
        out += tr.close()
        assert out == expected
        assert tr.usage == Usage(prompt_tokens=15, completion_tokens=6, cached_tokens=0)


def test_usage_the_client_asked_for_passes_through() -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = dataclasses.replace(req(Operation.CHAT, body), router_usage=True)
    exchange = OpenAIAdapter().prepare(request, Target("tiny", "tiny"))
    assert exchange.body == request.raw
    recorded = (VLLM / "chat_stream_usage.body").read_bytes()
    assert exchange.translator.feed(recorded) + exchange.translator.close() == recorded
