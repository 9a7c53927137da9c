"""Hypothesis strategies over the requests a client could send kvroute.

``probes(models)`` draws ``Probe``s: valid OpenAI bodies (chat with several
roles and content forms, completions with string or list prompts, embeddings,
sampling fields in and out of range and of the wrong type, streams with and
without ``stream_options``) and mutated ones (wrong types anywhere, deep
nesting, huge numbers, unicode, NaN / Infinity literals, duplicate keys,
truncated JSON, non-JSON bytes, an empty body, the wrong content type, bodies
over the size limit), streams the client abandons, plus the control routes,
unknown paths and wrong methods. tests/test_fuzz.py sends them to a router in front of a simulated
fleet and checks each answer; benchmarks/fuzz.py does the same at scale.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
INFERENCE = (CHAT, COMPLETIONS, EMBEDDINGS)
#: The router under fuzz answers 413 past this (its ``server.max_body_bytes``).
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Probe:
    """One client request, as drawn and sent."""

    method: str
    path: str
    content: bytes = b""
    headers: tuple[tuple[str, bytes], ...] = ()
    #: Send the body in pieces (chunked transfer encoding).
    chunked: bool = False
    #: The client leaves after the answer's first bytes (or half a second).
    hang_up: bool = False
    #: How the request was made (valid, or which mutation), for the histograms.
    kind: str = "valid"

    def shown(self, limit: int = 600) -> dict[str, Any]:
        """The request as a report shows it (a long body cut)."""
        body = self.content.decode("utf-8", "backslashreplace")
        if len(body) > limit:
            body = body[:limit] + f"... ({len(self.content)} bytes)"
        headers = {k: v.decode("latin-1") for k, v in self.headers}
        out: dict[str, Any] = {"method": self.method, "path": self.path, "body": body}
        if headers:
            out["headers"] = headers
        if self.chunked:
            out["chunked"] = True
        if self.hang_up:
            out["hang_up"] = True
        return out


# -- strategies: valid bodies ----------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
WORDS = ("hi", "Say something about caches.", "Bonjour, ça va ?", "数据", "🙂", " ", "")
SAMPLING_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "frequency_penalty",
    "stop",
)

texts = st.one_of(st.sampled_from(WORDS), st.text(max_size=40))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=10,
)

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
image_part = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries(
            {"url": st.sampled_from(["https://example.com/a.png", "data:image/png;base64,iVBO"])}
        ),
    }
)
contents = st.one_of(texts, st.lists(text_part | image_part, max_size=3), st.none())
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES), "content": contents}, optional={"name": texts}
    ),
    min_size=1,
    max_size=4,
)
prompts = st.one_of(
    texts,
    st.lists(texts, min_size=1, max_size=3),
    st.lists(st.integers(0, 50_000), min_size=1, max_size=8),
    st.lists(st.lists(st.integers(0, 50_000), max_size=4), min_size=1, max_size=2),
)
inputs = st.one_of(texts, st.lists(texts, min_size=1, max_size=3), st.lists(st.integers(0, 999)))

#: Each sampling field: values OpenAI accepts, and values out of OpenAI's range
#: or at a backend's edge (kvroute refuses the first kind, passes the second on).
VALID = {
    "max_tokens": st.integers(1, 24),
    "max_completion_tokens": st.integers(1, 24),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**32),
    "n": st.just(1),
    "frequency_penalty": st.floats(-2, 2),
    "stop": st.one_of(texts, st.lists(texts, max_size=4)),
}
EDGES = {
    "max_tokens": st.integers(max_value=0) | st.integers(min_value=2**31, max_value=2**64 - 1),
    "max_completion_tokens": st.integers(max_value=0) | st.integers(min_value=2**31),
    "temperature": st.floats(min_value=2, exclude_min=True)
    | st.floats(max_value=0, exclude_max=True),
    "top_p": st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True),
    "top_k": st.integers(min_value=2**31, max_value=2**63) | st.integers(max_value=-2),
    "seed": st.integers(min_value=-(2**63), max_value=-1) | st.integers(2**63, 2**64 - 1),
    "n": st.integers(max_value=0) | st.integers(2, 2**40),
    "frequency_penalty": st.floats(min_value=2, exclude_min=True) | st.floats(max_value=-2.5),
    "stop": st.lists(texts, min_size=5, max_size=20),
}


def model_names(models: Sequence[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(models)


@st.composite
def stream_fields(draw: st.DrawFn, generates: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stream = draw(st.sampled_from((None, False, True, True)))
    if stream is not None:
        out["stream"] = stream
    if generates and stream and draw(st.booleans()):
        out["stream_options"] = draw(
            st.sampled_from(({"include_usage": True}, {"include_usage": False}, {}, None))
        )
    return out


@st.composite
def valid_bodies(draw: st.DrawFn, models: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(path, body): an OpenAI request as a client would write it."""
    path = draw(st.sampled_from((CHAT, CHAT, COMPLETIONS, EMBEDDINGS)))
    body: dict[str, Any] = {"model": draw(model_names(models))}
    if path == CHAT:
        body["messages"] = draw(messages)
    elif path == COMPLETIONS:
        body["prompt"] = draw(prompts)
    else:
        body["input"] = draw(inputs)
    generates = path != EMBEDDINGS
    body |= draw(stream_fields(generates))
    if generates:
        for name in draw(st.lists(st.sampled_from(SAMPLING_FIELDS), max_size=4, unique=True)):
            body[name] = draw(VALID[name] | st.none())
    if draw(st.integers(0, 4)) == 0:  # fields kvroute passes through unread
        body |= draw(
            st.dictionaries(
                st.sampled_from(["user", "logprobs", "presence_penalty", "tools", "x-extra"]),
                json_values,
                max_size=2,
            )
        )
    return path, body


# -- strategies: mutations ------------------------------------------------------------

#: Stands for a raw JSON literal in a body until it is encoded.
RAW = "__kvroute_fuzz_raw__"
HUGE_NUMBERS = (
    "1e309",
    "-1e309",
    "1e-400",
    "-0",
    "0e0",
    "1.0",
    "1E+2",
    "2147483648",
    "4294967296",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "1" + "0" * 400,
)
NAN_LITERALS = ("NaN", "-NaN", "Infinity", "-Infinity", "nan", "inf", '"NaN"', '"Infinity"')
UNICODE_LITERALS = (
    b'"\\ud800"',
    b'"a\\udc00b"',
    b'"\\ud83d\\ude00"',
    b'"\\u0000"',
    b'"\\u202e\\u2066rtl"',
    b'"e\\u0301\\u0301\\u0301"',
    b'"\\uffff\\ufffe"',
    # Not UTF-8 at all:
    b'"\xff\xfe"',
    b'"\xc3\x28"',
    b'"\xed\xa0\x80"',
    b'"\xf4\x90\x80\x80"',
)
NOT_JSON = (
    b"model=v&prompt=hi",
    b"<xml/>",
    b"\xef\xbb\xbf{}",
    b"{'model': 'v', 'prompt': 'hi'}",
    b'{"model": "v", "prompt": "hi",}',
    b'{"model": "v", "prompt": "hi"} trailing',
    b"   \n\t ",
    b"null",
    b'"a string"',
    b"[]",
    b"[{}]",
    b"123",
    b"true",
)
CONTENT_TYPES = (
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=x",
    b"application/json; charset=latin-1",
    b"application/x-ndjson",
    b"",
)


def locations(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value, as a path of keys and indexes."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from locations(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from locations(item, (*path, i))


def replaced(body: dict[str, Any], path: tuple[Any, ...], new: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return out


def encode(body: Any, raw: bytes = b"", ascii_only: bool = True) -> bytes:
    data = json.dumps(body, ensure_ascii=ascii_only).encode()
    return data.replace(json.dumps(RAW).encode(), raw, 1) if raw else data


def literals(kind: str) -> st.SearchStrategy[bytes]:
    """Raw JSON text that json.dumps would never write, of one kind."""
    if kind == "huge_number":
        return st.sampled_from(HUGE_NUMBERS).map(str.encode)
    if kind == "nan":
        return st.sampled_from(NAN_LITERALS).map(str.encode)
    if kind == "unicode":
        return st.sampled_from(UNICODE_LITERALS)
    depths = st.sampled_from((8, 100, 500, 1023, 1025, 4000))
    arrays = depths.map(lambda d: b"[" * d + b"1" + b"]" * d)
    return arrays | depths.map(lambda d: b'{"a":' * d + b"1" + b"}" * d)


def mutate(draw: st.DrawFn, kind: str, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """(path, bytes): ``body`` broken the way ``kind`` says."""
    places = [p for p in locations(body) if p]
    if kind == "sampling_range":
        name = draw(st.sampled_from(SAMPLING_FIELDS))
        return path, encode({**body, name: draw(EDGES[name])})
    if kind == "sampling_type":
        name = draw(st.sampled_from(SAMPLING_FIELDS))
        return path, encode({**body, name: draw(json_values)})
    if kind == "unknown_model":
        return path, encode({**body, "model": draw(st.sampled_from(("gpt-4o", "")) | texts)})
    if kind == "wrong_type":
        return path, encode(replaced(body, draw(st.sampled_from(places)), draw(json_values)))
    if kind == "missing_field":
        del body[draw(st.sampled_from(sorted(body)))]
        return path, encode(body)
    if kind in ("huge_number", "nan", "unicode", "deep_nesting"):
        where = draw(st.sampled_from(places))
        return path, encode(replaced(body, where, RAW), draw(literals(kind)))
    if kind == "duplicate_key":
        key = draw(st.sampled_from(sorted({*body, "model", "stream", "messages"})))
        value = draw(json_values.map(lambda v: json.dumps(v).encode()) | literals("nan"))
        pair = json.dumps(key).encode() + b": " + value
        data = encode(body)
        if draw(st.booleans()):
            return path, data[:-1] + b", " + pair + b"}"
        return path, b"{" + pair + b", " + data[1:]
    if kind == "truncated":
        data = encode(body, ascii_only=draw(st.booleans()))
        return path, data[: draw(st.integers(0, len(data) - 1))]
    if kind == "not_json":
        return path, draw(st.sampled_from(NOT_JSON) | st.binary(max_size=200))
    if kind == "empty":
        return path, b""
    assert kind == "crossed", kind
    return draw(st.sampled_from([p for p in INFERENCE if p != path])), encode(body)


#: How often each kind of request is drawn, in percent.
KINDS = {
    "valid": 33,
    "sampling_range": 6,
    "sampling_type": 6,
    "unknown_model": 3,
    "wrong_type": 7,
    "missing_field": 3,
    "huge_number": 3,
    "nan": 3,
    "unicode": 3,
    "deep_nesting": 3,
    "duplicate_key": 4,
    "truncated": 4,
    "not_json": 3,
    "empty": 1,
    "crossed": 2,
    "control": 4,
    "elsewhere": 3,
    "wrong_method": 3,
    "too_large": 3,
    "hang_up": 3,
}
assert sum(KINDS.values()) == 100
WEIGHTED = tuple(kind for kind, weight in KINDS.items() for _ in range(weight))


# -- strategies: whole requests -------------------------------------------------------------

header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.binary(max_size=20).map(lambda b: bytes(c for c in b if c >= 0x80 or 0x20 <= c < 0x7F)),
    st.just(b"x" * 300),
).map(lambda v: (v.encode("latin-1") if isinstance(v, str) else v).strip())
HEADER_NAMES = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-session-id",
    "accept",
    "authorization",
)


@st.composite
def extra_headers(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    pairs = st.tuples(st.sampled_from(HEADER_NAMES), header_values)
    headers = draw(st.lists(pairs, max_size=2, unique_by=lambda h: h[0]))
    if draw(st.integers(0, 5)):
        return [("content-type", b"application/json"), *headers]
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    return [("content-type", ctype), *headers] if ctype else headers


CONTROL_PATHS = ("/v1/models", "/health", "/ready", "/metrics", "/openapi.json")
OTHER_PATHS = (
    "/",
    "/v1",
    "/v1/unknown",
    "/v1/chat/completions/",
    "//v1/completions",
    "/v1/models/mixed",
    "/admin/endpoints",
    "/admin/config",
    "/admin/prefix-index",
    "/admin/endpoints/vllm/drain",
    "/admin/reload",
    "/%ff",
    "/v1/chat%2Fcompletions",
)


def other(draw: st.DrawFn, kind: str) -> Probe:
    """The control routes, unknown paths, wrong methods, /admin without its token."""
    if kind == "control":
        path, method = draw(st.sampled_from(CONTROL_PATHS)), "GET"
    elif kind == "elsewhere":
        path = draw(st.sampled_from(OTHER_PATHS))
        method = draw(st.sampled_from(("GET", "POST")))
    else:
        path = draw(st.sampled_from(INFERENCE + CONTROL_PATHS))
        wrong = ("GET", "PUT", "DELETE", "PATCH") if path in INFERENCE else ("POST", "PUT")
        method = draw(st.sampled_from(wrong))
    query = draw(st.sampled_from(("", "", "?x=1", "?model=v&stream=true")))
    content = draw(st.sampled_from((b"", b"{}", b"garbage")))
    return Probe(method, path + query, content, tuple(draw(extra_headers())), kind=kind)


@st.composite
def probes(draw: st.DrawFn, models: Sequence[str]) -> Probe:
    """Any request a client could send, mostly to the inference routes, each
    kind as often as KINDS says."""
    kind = draw(st.sampled_from(WEIGHTED))
    if kind in ("control", "elsewhere", "wrong_method"):
        return other(draw, kind)
    if kind == "too_large":  # 413, whether the length is declared or the body chunked
        padding = "x" * (MAX_BODY + draw(st.integers(1, 9000)))
        body = encode({"model": draw(model_names(models)), "prompt": padding})
        return Probe("POST", COMPLETIONS, body, chunked=draw(st.booleans()), kind=kind)
    path, body = draw(valid_bodies(models))
    if kind == "hang_up":  # a stream the client abandons: nothing may stay in flight
        content = encode({**body, "stream": True})
        return Probe(
            "POST", path, content, (("content-type", b"application/json"),), kind=kind, hang_up=True
        )
    if kind == "valid":
        content = encode(body, ascii_only=draw(st.booleans()))
    else:
        path, content = mutate(draw, kind, path, body)
    return Probe("POST", path, content, tuple(draw(extra_headers())), kind=kind)
