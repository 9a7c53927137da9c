"""The response cache's answers, pure: recorded vLLM bytes in, CachedAnswer out, and
back to OpenAI JSON and SSE that the real ``openai`` SDK reads."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from backends.openai_shapes import error_event
from router.cache.answer import (
    FORMAT,
    CorruptEntry,
    decode,
    encode,
    from_json,
    from_stream,
    to_json,
    to_stream,
)
from router.cache.answer_types import CachedAnswer, CachedChoice, Kind
from tests.helpers import FIXTURES

VLLM = FIXTURES / "vllm"
NOW = 1795434900.75
FINGERPRINT = "vllm-0.32.0-beeb85df"


def body(name: str) -> bytes:
    return (VLLM / f"{name}.body").read_bytes()


def events(raw: bytes) -> list[Any]:
    """The stream's events: JSON objects, and "[DONE]"."""
    out: list[Any] = []
    for event in re.split(rb"\r?\n\r?\n", raw):
        if event:
            payload = event.removeprefix(b"data: ")
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def sse(*chunks: Any) -> bytes:
    return b"".join(
        b"data: " + (b"[DONE]" if c == "[DONE]" else orjson.dumps(c)) + b"\n\n" for c in chunks
    )


def joined(answer: CachedAnswer) -> CachedAnswer:
    """``answer`` as a whole answer keeps it: one piece per choice (none if empty)."""
    choices = []
    for choice in answer.choices:
        text = "".join(choice.pieces)
        choices.append(dataclasses.replace(choice, pieces=(text,) if text else ()))
    return dataclasses.replace(answer, choices=tuple(choices))


def parsed(kind: Kind, raw: bytes, *, stream: bool) -> CachedAnswer:
    answer = from_stream(kind, raw) if stream else from_json(kind, raw)
    assert answer is not None
    return answer


CHAT_USAGE = {
    "prompt_tokens": 171,
    "total_tokens": 179,
    "completion_tokens": 8,
    "prompt_tokens_details": {
        "cached_tokens": 0,
        "created_cache_tokens": 160,
        "multimodal_tokens": None,
    },
    "completion_tokens_details": None,
}
STREAM_USAGE = {
    "prompt_tokens": 15,
    "total_tokens": 21,
    "completion_tokens": 6,
    "prompt_tokens_details": {"cached_tokens": 0, "created_cache_tokens": 0},
}
COMPLETION_USAGE = {
    "prompt_tokens": 7,
    "total_tokens": 15,
    "completion_tokens": 8,
    "prompt_tokens_details": {
        "cached_tokens": 0,
        "created_cache_tokens": None,
        "multimodal_tokens": None,
    },
    "completion_tokens_details": None,
}
STREAM_PIECES = ("ive", "ive", "cal", "fi")

#: Two choices (n=2) of unequal length, one of them empty: how replays interleave.
TWO = CachedAnswer(
    "chat",
    "tiny",
    (
        CachedChoice(0, ("a", "b", "c"), "stop", "assistant"),
        CachedChoice(1, (), "length", "assistant"),
    ),
    {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    None,
)
TWO_COMPLETION = CachedAnswer(
    "completion",
    "tiny",
    (CachedChoice(0, ("x",), "length"), CachedChoice(1, ("p", "q"), "stop")),
    None,
    FINGERPRINT,
)
#: An embedding answer in vLLM's shape (as the vLLM simulator writes it); floats
#: written as a server might, not as orjson would.
EMBEDDING = (
    b'{"id":"embd-0a1b2c3d4e5f6a7b","object":"list","created":1795434796,"model":"tiny",'
    b'"data":[{"index":0,"object":"embedding","embedding":[0.10,-2.5e-05,1E+2]}],'
    b'"usage":{"prompt_tokens":2,"total_tokens":2,"completion_tokens":0,'
    b'"prompt_tokens_details":null}}'
)


# -- from_json / from_stream on the recordings ----------------------------------------


def test_whole_answers_recorded_from_vllm() -> None:
    assert from_json("chat", body("chat")) == CachedAnswer(
        "chat",
        "tiny",
        (CachedChoice(0, ("out *, *, *, *, *, *, *,",), "length", "assistant"),),
        CHAT_USAGE,
        FINGERPRINT,
    )
    again = parsed("chat", body("chat_again_cached"), stream=False)
    assert again.usage is not None
    assert again.usage["prompt_tokens_details"]["cached_tokens"] == 128
    assert from_json("completion", body("completion")) == CachedAnswer(
        "completion",
        "tiny",
        (CachedChoice(0, ("addrioiostringsyearproperty allFile",), "length"),),
        COMPLETION_USAGE,
        FINGERPRINT,
    )


def test_streams_recorded_from_vllm() -> None:
    plain = CachedAnswer(
        "chat", "tiny", (CachedChoice(0, STREAM_PIECES, "length", "assistant"),), None, FINGERPRINT
    )
    # The role chunk's and the last chunks' empty contents are no pieces.
    assert from_stream("chat", body("chat_stream")) == plain
    # With include_usage the usage chunk's usage is kept (its fingerprint too).
    assert from_stream("chat", body("chat_stream_usage")) == dataclasses.replace(
        plain, usage=STREAM_USAGE
    )
    # The completion stream's finish comes with its last piece.
    assert from_stream("completion", body("completion_stream")) == CachedAnswer(
        "completion",
        "tiny",
        (CachedChoice(0, ("addr", "io", "io", "strings"), "length"),),
        None,
        FINGERPRINT,
    )


def test_line_ends_and_data_forms_do_not_matter() -> None:
    raw = body("chat_stream_usage")
    want = from_stream("chat", raw)
    assert from_stream("chat", raw.replace(b"\n", b"\r\n")) == want
    assert from_stream("chat", raw.replace(b"data: ", b"data:")) == want
    comment = b": keep-alive\n\n" + raw.replace(b"\n\ndata: [DONE]", b"\n\n: ping\n\ndata: [DONE]")
    assert from_stream("chat", comment) == want


def vllm_chat_stream(pieces: list[str], usage: dict[str, Any]) -> bytes:
    """A stream in the recorded chat_stream_usage shape carrying other content."""
    role, piece, *_, finish, usage_chunk, done = events(body("chat_stream_usage"))
    chunks = [role]
    for text in pieces:
        chunk = orjson.loads(orjson.dumps(piece))
        chunk["choices"][0]["delta"]["content"] = text
        chunks.append(chunk)
    return sse(*chunks, finish, {**usage_chunk, "usage": usage}, done)


def vllm_completion_stream(pieces: list[str]) -> bytes:
    """A stream in the recorded completion_stream shape carrying other content."""
    *_, last, done = events(body("completion_stream"))
    chunks = []
    for i, text in enumerate(pieces):
        chunk = orjson.loads(orjson.dumps(last))
        chunk["choices"][0]["text"] = text
        if i < len(pieces) - 1:
            chunk["choices"][0]["finish_reason"] = None
            del chunk["system_fingerprint"]
        chunks.append(chunk)
    return sse(*chunks, done)


def test_one_generation_whole_or_streamed_is_one_answer() -> None:
    # The completion recordings are one greedy generation (same prompt) cut at
    # 4 and 8 tokens: the stream's text starts the whole answer's.
    whole = parsed("completion", body("completion"), stream=False)
    short = parsed("completion", body("completion_stream"), stream=True)
    assert "".join(whole.choices[0].pieces).startswith("".join(short.choices[0].pieces))
    # The same 8 tokens streamed (the recorded stream's chunks, extended) are
    # the whole answer once joined; usage aside (this stream has none).
    streamed = parsed(
        "completion",
        vllm_completion_stream(["addr", "io", "io", "strings", "year", "property", " all", "File"]),
        stream=True,
    )
    assert joined(streamed) == dataclasses.replace(whole, usage=None)
    # The chat recordings answer different prompts: the whole answer's content
    # streamed in the recorded stream's shape is the same answer, usage included.
    chat = parsed("chat", body("chat"), stream=False)
    tokens = ["out", " *,", " *,", " *,", " *,", " *,", " *,", " *,"]
    chat_streamed = parsed("chat", vllm_chat_stream(tokens, CHAT_USAGE), stream=True)
    assert chat_streamed.choices[0].pieces == tuple(tokens)
    assert joined(chat_streamed) == chat


def test_several_choices_in_any_order() -> None:
    chat = orjson.loads(body("chat"))
    second = {**chat["choices"][0], "index": 1, "message": {"role": "assistant", "content": "B"}}
    chat["choices"] = [second, chat["choices"][0]]
    answer = parsed("chat", orjson.dumps(chat), stream=False)
    assert [(c.index, c.pieces) for c in answer.choices] == [
        (0, ("out *, *, *, *, *, *, *,",)),
        (1, ("B",)),
    ]
    # A stream whose choices arrive interleaved, choice 1 first.
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(index: int, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice]}

    raw = sse(
        chunk(1, {"role": "assistant", "content": ""}),
        chunk(0, {"role": "assistant", "content": ""}),
        chunk(1, {"content": "x"}),
        chunk(0, {"content": "a"}),
        chunk(0, {"content": "b"}, "stop"),
        chunk(1, {}, "length"),
        "[DONE]",
    )
    assert from_stream("chat", raw) == CachedAnswer(
        "chat",
        "m",
        (
            CachedChoice(0, ("a", "b"), "stop", "assistant"),
            CachedChoice(1, ("x",), "length", "assistant"),
        ),
        None,
    )


def test_openai_shapes_are_accepted() -> None:
    """What OpenAI itself sends: empty ``annotations``/``tool_calls``, ``usage``
    null on every chunk, a fingerprint on every chunk, ``obfuscation``, an empty
    finish delta, no role chunk content."""
    whole = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-x",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hi.",
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "service_tier": "default",
        "system_fingerprint": "fp_1",
    }
    want = CachedAnswer(
        "chat",
        "gpt-x",
        (CachedChoice(0, ("Hi.",), "stop", "assistant"),),
        {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "fp_1",
    )
    assert from_json("chat", orjson.dumps(whole)) == want
    head = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-x",
        "service_tier": "default",
        "system_fingerprint": "fp_1",
        "usage": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], "obfuscation": "a1B2"}

    raw = sse(
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"content": "Hi"}),
        chunk({"content": "."}),
        chunk({}, "stop"),
        {**head, "choices": [], "usage": want.usage},
        "[DONE]",
    )
    assert joined(parsed("chat", raw, stream=True)) == want


# -- refused --------------------------------------------------------------------------


def test_every_cut_of_a_stream_is_refused() -> None:
    """A stream cut anywhere (no [DONE], or [DONE] without its blank line) is not
    what a complete answer looks like."""
    for raw in (body("chat_stream_usage"), body("completion_stream")):
        kind: Kind = "completion" if raw.startswith(b'data: {"id":"cmpl-') else "chat"
        assert from_stream(kind, raw) is not None
        for end in range(len(raw)):
            assert from_stream(kind, raw[:end]) is None, raw[:end][-40:]


def _events_with(raw: bytes, at: int, extra: bytes) -> bytes:
    parts = raw.split(b"\n\n")
    return b"\n\n".join([*parts[:at], extra.removesuffix(b"\n\n"), *parts[at:]])


TOOL_DELTA = (
    b'{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    b'"function":{"name":"f","arguments":""}}]}'
)

STREAM_REFUSALS: dict[str, Callable[[bytes], bytes]] = {
    "error event mid-stream": lambda raw: _events_with(raw, 3, error_event("engine died")),
    "error event at the end": lambda raw: _events_with(raw, 7, error_event("engine died")),
    "no finish_reason": lambda raw: raw.replace(
        b'"finish_reason":"length"', b'"finish_reason":null'
    ),
    "aborted": lambda raw: raw.replace(b'"finish_reason":"length"', b'"finish_reason":"abort"'),
    "tool_calls delta": lambda raw: raw.replace(b'{"content":"ive"}', TOOL_DELTA, 1),
    "function_call delta": lambda raw: raw.replace(
        b'{"content":"cal"}', b'{"function_call":{"name":"f","arguments":"{}"}}'
    ),
    "logprobs": lambda raw: raw.replace(
        b'"logprobs":null', b'"logprobs":{"content":[{"token":"ive","logprob":-0.5}]}', 2
    ),
    "token_ids": lambda raw: raw.replace(b'"token_ids":null', b'"token_ids":[17]', 1),
    "reasoning delta": lambda raw: raw.replace(b'{"content":"ive"}', b'{"reasoning":"hmm"}', 1),
    "prompt echo": lambda raw: raw.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":[1]'),
    "invalid JSON event": lambda raw: raw.replace(b"data: {", b"data: {{", 2),
    "not an object": lambda raw: _events_with(raw, 2, b"data: [1, 2]\n\n"),
    "[DONE] early": lambda raw: _events_with(raw, 2, b"data: [DONE]\n\n"),
    "event after [DONE]": lambda raw: raw + raw.split(b"\n\n")[1] + b"\n\n",
    "content after finish": lambda raw: _events_with(raw, 7, raw.split(b"\n\n")[1]),
    "index missing": lambda raw: raw.replace(b'"index":0,', b"", 1),
    "index 1 without 0": lambda raw: raw.replace(b'"index":0,', b'"index":1,'),
    "choices not a list": lambda raw: raw.replace(b'"choices":[]', b'"choices":{}'),
    "usage not an object": lambda raw: raw.replace(b'"usage":{', b'"usage":[{', 1),
    "another kind's object": lambda raw: raw.replace(b"chat.completion.chunk", b"text_completion"),
    "no model": lambda raw: raw.replace(b'"model":"tiny",', b"", 1),
}


@pytest.mark.parametrize("mutate", STREAM_REFUSALS.values(), ids=STREAM_REFUSALS.keys())
def test_stream_refusals(mutate: Callable[[bytes], bytes]) -> None:
    raw = mutate(body("chat_stream_usage"))
    assert raw != body("chat_stream_usage")
    assert from_stream("chat", raw) is None


def test_streams_refused_whatever_their_kind() -> None:
    assert from_stream("chat", b"") is None
    assert from_stream("chat", b"data: [DONE]\n\n") is None  # no choice at all
    assert from_stream("completion", body("chat_stream")) is None
    assert from_stream("chat", body("completion_stream")) is None
    completion_logprobs = body("completion_stream").replace(
        b'"logprobs":null', b'"logprobs":{"tokens":["addr"],"token_logprobs":[-1.0]}', 1
    )
    assert from_stream("completion", completion_logprobs) is None
    with pytest.raises(ValueError, match="never streamed"):
        from_stream("embedding", body("chat_stream"))


def _chat_with(**message: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(answer: dict[str, Any]) -> None:
        answer["choices"][0]["message"].update(message)

    return mutate


def _choice_with(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(answer: dict[str, Any]) -> None:
        answer["choices"][0].update(fields)

    return mutate


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

WHOLE_REFUSALS: dict[str, Callable[[dict[str, Any]], None]] = {
    "error key": lambda a: a.update(error={"message": "x", "type": "x", "code": 500}),
    "no finish_reason": _choice_with(finish_reason=None),
    "empty finish_reason": _choice_with(finish_reason=""),
    "tool_calls": _chat_with(content=None, tool_calls=[TOOL_CALL]),
    "tool_calls with content": _chat_with(tool_calls=[TOOL_CALL]),
    "finish tool_calls": _choice_with(finish_reason="tool_calls"),
    "function_call": _chat_with(function_call={"name": "f", "arguments": "{}"}),
    "logprobs": _choice_with(logprobs={"content": [{"token": "out", "logprob": -0.1}]}),
    "token_ids": _choice_with(token_ids=[1, 2]),
    "refusal": _chat_with(content=None, refusal="I cannot."),
    "reasoning": _chat_with(reasoning="Let me think."),
    "audio": _chat_with(audio={"id": "a", "data": "", "expires_at": 0, "transcript": ""}),
    "prompt_logprobs": lambda a: a.update(prompt_logprobs=[None, {"1": -0.1}]),
    "content null": _chat_with(content=None),
    "content not text": _chat_with(content=[{"type": "text", "text": "x"}]),
    "no role": lambda a: a["choices"][0]["message"].pop("role"),
    "index missing": lambda a: a["choices"][0].pop("index"),
    "index not 0": _choice_with(index=1),
    "index a bool": _choice_with(index=False),
    "indices 0 and 2": lambda a: a["choices"].append({**a["choices"][0], "index": 2}),
    "index 0 twice": lambda a: a["choices"].append(a["choices"][0]),
    "no choices": lambda a: a.update(choices=[]),
    "choices not a list": lambda a: a.update(choices={"0": a["choices"][0]}),
    "another object": lambda a: a.update(object="text_completion"),
    "no model": lambda a: a.pop("model"),
    "usage not an object": lambda a: a.update(usage=[1]),
}


@pytest.mark.parametrize("mutate", WHOLE_REFUSALS.values(), ids=WHOLE_REFUSALS.keys())
def test_whole_refusals(mutate: Callable[[dict[str, Any]], None]) -> None:
    answer = orjson.loads(body("chat"))
    mutate(answer)
    assert from_json("chat", orjson.dumps(answer)) is None


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b'"chat"', b"\xff", body("chat")[:-1]])
def test_invalid_json_is_refused(raw: bytes) -> None:
    assert from_json("chat", raw) is None
    assert from_json("embedding", raw) is None


def test_errors_and_other_kinds_are_refused() -> None:
    for name in ("err_unknown_model", "err_bad_json", "err_too_long", "models"):
        assert from_json("chat", body(name)) is None
        assert from_json("embedding", body(name)) is None
    assert from_json("completion", body("chat")) is None
    assert from_json("chat", body("completion")) is None
    assert from_json("embedding", body("chat")) is None
    logprobs = orjson.loads(body("completion"))
    logprobs["choices"][0]["logprobs"] = {"tokens": ["addr"], "token_logprobs": [-1.0]}
    assert from_json("completion", orjson.dumps(logprobs)) is None
    empty = orjson.loads(EMBEDDING)
    empty["data"] = []
    assert from_json("embedding", orjson.dumps(empty)) is None


# -- answers out ----------------------------------------------------------------------


def test_to_stream_exact_bytes() -> None:
    answer = CachedAnswer(
        "chat", "tiny", (CachedChoice(0, ("Hi", "!"), "stop", "assistant"),), {"t": 1}, "fp"
    )
    head = (
        b'data: {"id":"chatcmpl-a44e5aa4b7c218582218ab82","object":"chat.completion.chunk",'
        b'"created":1795434900,"model":"alias","system_fingerprint":"fp","choices":['
    )
    raw = to_stream(answer, model="alias", now=NOW, include_usage=True, id_seed=b"seed")
    assert raw == (
        head + b'{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b'{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b'{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}]}\n\n'
        + head
        + b'{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        + head
        + b'],"usage":{"t":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    no_usage = to_stream(answer, model="alias", now=NOW, include_usage=False, id_seed=b"seed")
    assert no_usage == raw.replace(head + b'],"usage":{"t":1}}\n\n', b"")


def test_to_json_exact_bytes() -> None:
    chat = parsed("chat", body("chat"), stream=False)
    assert to_json(chat, model="alias", now=NOW, id_seed=b"seed") == (
        b'{"id":"chatcmpl-a44e5aa4b7c218582218ab82","object":"chat.completion",'
        b'"created":1795434900,"model":"alias","choices":[{"index":0,"message":'
        b'{"role":"assistant","content":"out *, *, *, *, *, *, *,","refusal":null,'
        b'"annotations":null,"audio":null,"function_call":null},"logprobs":null,'
        b'"finish_reason":"length"}],"service_tier":null,'
        b'"system_fingerprint":"vllm-0.32.0-beeb85df","usage":' + orjson.dumps(CHAT_USAGE) + b"}"
    )
    completion = CachedAnswer("completion", "tiny", (CachedChoice(0, ("a", "b"), "stop"),), None)
    assert to_json(completion, model="tiny", now=1.0, id_seed=b"seed") == (
        b'{"id":"cmpl-a44e5aa4b7c218582218ab82","object":"text_completion","created":1,'
        b'"model":"tiny","choices":[{"index":0,"text":"ab","logprobs":null,'
        b'"finish_reason":"stop"}],"service_tier":null}'
    )


def test_every_serving_is_a_fresh_answer() -> None:
    answer = parsed("chat", body("chat_stream_usage"), stream=True)
    first = events(to_stream(answer, model="tiny", now=NOW, include_usage=True))[:-1]
    second = events(to_stream(answer, model="tiny", now=NOW + 5, include_usage=True))[:-1]
    assert len({c["id"] for c in first}) == 1
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", first[0]["id"])
    assert {c["created"] for c in first} == {1795434900}
    assert {c["created"] for c in second} == {1795434905}
    assert first[0]["id"] != second[0]["id"]
    whole = [orjson.loads(to_json(answer, model="tiny", now=NOW)) for _ in range(2)]
    assert whole[0]["id"] != whole[1]["id"]
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", whole[0]["id"])
    completion = parsed("completion", body("completion"), stream=False)
    assert re.fullmatch(rb'\{"id":"cmpl-[0-9a-f]{24}",.*', to_json(completion, model="m", now=1))
    for chunk in events(to_stream(completion, model="m", now=1, include_usage=False))[:-1]:
        assert re.fullmatch(r"cmpl-[0-9a-f]{24}", chunk["id"])
    seeded = to_json(answer, model="tiny", now=NOW, id_seed=b"k")
    assert seeded == to_json(answer, model="tiny", now=NOW, id_seed=b"k")


def test_several_choices_interleave_step_by_step() -> None:
    def order(raw: bytes) -> list[tuple[int, str, str | None]]:
        out = []
        for chunk in events(raw)[:-1]:
            for c in chunk["choices"]:
                text = c["delta"].get("content", "") if "delta" in c else c["text"]
                out.append(
                    (
                        c["index"],
                        ("role:" if "role" in c.get("delta", {}) else "") + text,
                        c["finish_reason"],
                    )
                )
        return out

    chat = to_stream(TWO, model="tiny", now=NOW, include_usage=False)
    assert order(chat) == [
        (0, "role:", None),
        (1, "role:", None),
        (0, "a", None),
        (1, "", "length"),
        (0, "b", None),
        (0, "c", None),
        (0, "", "stop"),
    ]
    completion = to_stream(TWO_COMPLETION, model="tiny", now=NOW, include_usage=False)
    assert order(completion) == [(0, "x", "length"), (1, "p", None), (1, "q", "stop")]
    empty = CachedAnswer("completion", "m", (CachedChoice(0, (), "length"),), None)
    assert order(to_stream(empty, model="m", now=NOW, include_usage=True)) == [(0, "", "length")]


def test_embeddings_are_served_whole() -> None:
    answer = from_json("embedding", EMBEDDING)
    assert answer == CachedAnswer(
        "embedding",
        "tiny",
        (),
        {
            "prompt_tokens": 2,
            "total_tokens": 2,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
        embedding_json=EMBEDDING,
    )
    # Under its own name: the very bytes (floats as the engine wrote them).
    assert to_json(answer, model="tiny", now=NOW) == EMBEDDING
    renamed = orjson.loads(to_json(answer, model="alias", now=NOW))
    assert renamed == {**orjson.loads(EMBEDDING), "model": "alias"}
    assert renamed["data"][0]["embedding"] == [0.1, -2.5e-05, 100.0]
    base64 = EMBEDDING.replace(b"[0.10,-2.5e-05,1E+2]", b'"AAAAAA=="')
    assert from_json("embedding", base64) is not None
    with pytest.raises(ValueError, match="never streamed"):
        to_stream(answer, model="tiny", now=NOW, include_usage=False)


# -- round trips ----------------------------------------------------------------------

RECORDED: list[tuple[Kind, str, bool]] = [
    ("chat", "chat", False),
    ("chat", "chat_again_cached", False),
    ("chat", "chat_stream", True),
    ("chat", "chat_stream_usage", True),
    ("completion", "completion", False),
    ("completion", "completion_stream", True),
]


def all_answers() -> list[CachedAnswer]:
    recorded = [parsed(kind, body(name), stream=s) for kind, name, s in RECORDED]
    return [*recorded, TWO, TWO_COMPLETION]


@pytest.mark.parametrize("answer", all_answers(), ids=lambda a: f"{a.kind}-{a.choices[0].pieces}")
def test_round_trips(answer: CachedAnswer) -> None:
    kind = answer.kind
    with_usage = to_stream(answer, model="tiny", now=NOW, include_usage=True)
    assert from_stream(kind, with_usage) == answer
    without = to_stream(answer, model="tiny", now=NOW, include_usage=False)
    assert from_stream(kind, without) == dataclasses.replace(answer, usage=None)
    assert b'"usage"' not in without
    renamed = to_stream(answer, model="alias", now=NOW, include_usage=True)
    assert from_stream(kind, renamed) == dataclasses.replace(answer, model="alias")
    assert from_json(kind, to_json(answer, model="tiny", now=NOW)) == joined(answer)
    assert decode(encode(answer, NOW)) == (answer, NOW)
    # Whole and streamed again: still the same answer.
    whole = parsed(kind, to_json(answer, model="tiny", now=NOW), stream=False)
    assert from_stream(kind, to_stream(whole, model="tiny", now=NOW, include_usage=True)) == whole


# -- the openai SDK reads the replays -------------------------------------------------


def sdk(answer: bytes, content_type: str) -> openai.OpenAI:
    """The real client over a transport that answers ``answer`` to any request."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": content_type}, content=answer)

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return openai.OpenAI(
        api_key="k", base_url="http://cache.invalid/v1", max_retries=0, http_client=http
    )


MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("answer", [parsed("chat", body("chat_stream_usage"), stream=True), TWO])
def test_openai_sdk_reads_replayed_chat(answer: CachedAnswer) -> None:
    raw = to_stream(answer, model="tiny", now=NOW, include_usage=True)
    content: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    with sdk(raw, "text/event-stream") as client:
        stream = client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert content == {c.index: "".join(c.pieces) for c in answer.choices}
    assert finish == {c.index: c.finish_reason for c in answer.choices}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and answer.usage is not None
    assert chunks[-1].usage.total_tokens == answer.usage["total_tokens"]
    assert {c.id for c in chunks} == {chunks[0].id}

    whole = to_json(answer, model="tiny", now=NOW)
    with sdk(whole, "application/json") as client:
        completion = client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert completion == ChatCompletion.model_validate(orjson.loads(whole))
    assert [(c.index, c.message.role, c.message.content) for c in completion.choices] == [
        (c.index, "assistant", "".join(c.pieces)) for c in answer.choices
    ]
    assert completion.created == 1795434900
    assert (
        completion.usage is not None
        and completion.usage.total_tokens == answer.usage["total_tokens"]
    )


@pytest.mark.parametrize(
    "answer",
    [
        parsed("completion", body("completion_stream"), stream=True),
        parsed("completion", body("completion"), stream=False),
        TWO_COMPLETION,
    ],
)
def test_openai_sdk_reads_replayed_completion(answer: CachedAnswer) -> None:
    raw = to_stream(answer, model="tiny", now=NOW, include_usage=False)
    text: dict[int, str] = {}
    with sdk(raw, "text/event-stream") as client:
        for chunk in client.completions.create(model="tiny", prompt="hi", stream=True):
            assert chunk.system_fingerprint == answer.system_fingerprint
            for choice in chunk.choices:
                text[choice.index] = text.get(choice.index, "") + choice.text
    assert text == {c.index: "".join(c.pieces) for c in answer.choices}

    whole = to_json(answer, model="tiny", now=NOW)
    with sdk(whole, "application/json") as client:
        completion = client.completions.create(model="tiny", prompt="hi")
    assert completion == Completion.model_validate(orjson.loads(whole))
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (c.index, "".join(c.pieces), c.finish_reason) for c in answer.choices
    ]


def test_openai_sdk_reads_a_replayed_embedding() -> None:
    answer = from_json("embedding", EMBEDDING)
    assert answer is not None
    with sdk(to_json(answer, model="alias", now=NOW), "application/json") as client:
        result = client.embeddings.create(model="alias", input="hi", encoding_format="float")
    assert result.model == "alias"
    assert result.data[0].embedding == [0.1, -2.5e-05, 100.0]


# -- the store's bytes ----------------------------------------------------------------


def test_encode_is_compact_and_versioned() -> None:
    answer = CachedAnswer(
        "chat", "tiny", (CachedChoice(0, ("Hi", "!"), "stop", "assistant"),), {"t": 1}, "fp"
    )
    assert encode(answer, 12.5) == (
        b'{"v":1,"at":12.5,"kind":"chat","model":"tiny",'
        b'"choices":[[0,["Hi","!"],"stop","assistant"]],"usage":{"t":1},"fp":"fp","emb":null}'
    )
    embedding = from_json("embedding", EMBEDDING)
    assert embedding is not None
    stored, at = decode(encode(embedding, 7))
    assert (stored, at) == (embedding, 7.0)
    assert stored.embedding_json == EMBEDDING
    assert FORMAT == 1


def _good() -> dict[str, Any]:
    entry: dict[str, Any] = orjson.loads(encode(TWO, 1.0))
    return entry


def _with(**fields: Any) -> bytes:
    return orjson.dumps({**_good(), **fields})


def _without(name: str) -> bytes:
    entry = _good()
    del entry[name]
    return orjson.dumps(entry)


CORRUPT: dict[str, bytes] = {
    "empty": b"",
    "garbage": b"\x00\x01garbage",
    "truncated": encode(TWO, 1.0)[:-3],
    "a list": b"[1, 2]",
    "no version": _without("v"),
    "an older version": _with(v=0),
    "a newer version": _with(v=2),
    "version as text": _with(v="1"),
    "version true": _with(v=True),
    "no time": _without("at"),
    "time as text": _with(at="1.0"),
    "time a bool": _with(at=True),
    "an unknown kind": _with(kind="image"),
    "model not text": _with(model=3),
    "no choices": _with(choices=[]),
    "choices not a list": _with(choices={"0": 1}),
    "choice not a list": _with(choices=[{"index": 0}]),
    "choice too short": _with(choices=[[0, ["a"], "stop"]]),
    "index out of place": _with(choices=[[1, ["a"], "stop", "assistant"]]),
    "piece not text": _with(choices=[[0, ["a", 1], "stop", "assistant"]]),
    "pieces not a list": _with(choices=[[0, "ab", "stop", "assistant"]]),
    "finish missing": _with(choices=[[0, ["a"], None, "assistant"]]),
    "role not text": _with(choices=[[0, ["a"], "stop", 1]]),
    "usage not an object": _with(usage=[1]),
    "fingerprint not text": _with(fp=1),
    "chat with embedding": _with(emb="{}"),
    "embedding without JSON": _with(kind="embedding", choices=[]),
    "embedding with choices": _with(kind="embedding", emb="{}"),
    "embedding JSON not text": _with(kind="embedding", choices=[], emb={"object": "list"}),
}


@pytest.mark.parametrize("data", CORRUPT.values(), ids=CORRUPT.keys())
def test_decode_refuses_what_it_cannot_read(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode(data)


def test_corrupt_entry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="format 2, this version reads 1"):
        decode(_with(v=2))
