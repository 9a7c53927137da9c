"""Fuzzing the public API (issue #12): whatever a client sends, kvroute answers
like OpenAI and keeps serving.

The property, for every answer: no 500 (no 5xx but the 502 / 503 / 504 a
failing fleet may cause); every error in OpenAI's shape, ``{"error":
{"message", "type", "param", "code"}}`` with string message and type; every
success well formed (JSON with ``choices`` or ``data`` naming the model as
routed, or an SSE stream of chunks ending in ``data: [DONE]`` or an error
event); and, after the run, a router that still answers /health and a normal
request on every kind, with nothing left in flight.

Requests come from tests/strategies.py (hypothesis) and from schemathesis
over ``GET /openapi.json``; both run in a worker thread with a blocking
client while the router (uvicorn, real sockets on loopback) and its
simulated fleet serve in the test's loop. Both are derandomized: every run
sends the same cases. benchmarks/fuzz.py runs the same property over 10,000.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from router.admin_ui import ASSETS
from router.app import build_app
from router.openapi import document
from tests.helpers import eventually, free_socket, router, router_config, simulator
from tests.strategies import EMBEDDINGS, INFERENCE, MAX_BODY, Probe, probes

#: 5xx statuses a failing fleet may cause (each in OpenAI's error shape).
UPSTREAM_5XX = frozenset({502, 503, 504})
ADMIN_TOKEN = "fuzz-admin-token"
#: Client-side bound on one answer: past it, the router is stuck.
ANSWER_TIMEOUT = 20.0
#: Seconds a hanging-up client waits for anything at all.
HANG_UP = 0.5

# -- the fleet ---------------------------------------------------------------------

#: Model -> the name answers must carry (an alias answers as its model).
CANONICAL = {
    "mixed": "mixed",
    "alias-mixed": "mixed",
    "v": "v",
    "renamed": "renamed",
    "t": "t",
    "t-chat": "t-chat",
    "tr": "tr",
    "flaky": "flaky",
    "slow": "slow",
    "cut": "cut",
}
MODELS = tuple(CANONICAL)
#: Models whose every endpoint is sound: a normal request gets 200.
SOUND = ("mixed", "alias-mixed", "v", "renamed", "t", "t-chat", "tr")


@dataclass
class Fleet:
    url: str
    sims: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def fleet() -> AsyncIterator[Fleet]:
    """The router (uvicorn on loopback) in front of its simulated fleet:

    mixed (alias alias-mixed)  vLLM + TGI + Triton, prefix_affinity
    v / renamed                vLLM (renamed: served as org/renamed)
    t / t-chat                 TGI native generate / TGI's Messages API
    tr                         Triton
    flaky                      a vLLM answering 503 half the time + a dead endpoint
    slow                       a vLLM that never answers (timeouts.first_byte: 1 s)
    cut                        a vLLM that cuts every stream after 2 chunks
    """
    params = EngineParams.zero_latency(max_model_len=256)
    sims = {
        "vllm": ("vllm", ["mixed", "v", "org/renamed"], None),
        "tgi": ("tgi", ["mixed", "t"], None),
        "tgi-chat": ("tgi", ["t-chat"], None),
        "triton": ("triton", ["mixed", "tr"], None),
        "flaky": ("vllm", ["flaky"], Faults(fail_rate=0.5, fail_status=503, retry_after=1)),
        "slow": ("vllm", ["slow"], Faults(stall=-1)),
        "cut": ("vllm", ["cut"], Faults(die_after_chunks=2)),
    }
    async with contextlib.AsyncExitStack() as stack:
        dead = free_socket()  # bound, never listening: connections are refused
        stack.callback(dead.close)
        urls = {"dead": f"http://127.0.0.1:{dead.getsockname()[1]}"}
        for sim_id, (kind, served, faults) in sims.items():
            urls[sim_id], _ = await stack.enter_async_context(
                simulator(served, params, faults, kind=kind)
            )
        vllm_models = ["mixed", "v", {"name": "renamed", "served_name": "org/renamed"}]
        endpoints: list[dict[str, Any]] = [
            {"id": "vllm", "url": urls["vllm"], "kind": "vllm", "models": vllm_models},
            {"id": "tgi", "url": urls["tgi"], "kind": "tgi", "models": ["mixed", "t"]},
            {
                "id": "tgi-chat",
                "url": urls["tgi-chat"],
                "kind": "tgi",
                "models": ["t-chat"],
                "options": {"api": "messages"},
            },
            {
                "id": "triton",
                "url": urls["triton"],
                "kind": "triton",
                "models": ["mixed", "tr"],
                "metrics_url": urls["triton"] + "/metrics",
            },
            *(
                {"id": name, "url": urls[name], "kind": "vllm", "models": [model]}
                for name, model in (
                    ("flaky", "flaky"),
                    ("dead", "flaky"),
                    ("slow", "slow"),
                    ("cut", "cut"),
                )
            ),
        ]
        config = router_config(
            endpoints,
            admin={"token": ADMIN_TOKEN},
            server={"access_log": False, "max_body_bytes": MAX_BODY},
            timeouts={"connect": 1.0, "first_byte": 1.0, "idle": 1.0},
            models={
                "mixed": {"policy": "prefix_affinity", "aliases": ["alias-mixed"]},
                "v": {"policy": "least_load"},
                "tr": {"policy": "consistent_hash"},
                "renamed": {"policy": "session_affinity"},
                "flaky": {"policy": "power_of_two"},
            },
        )
        url = await stack.enter_async_context(router(config))
        yield Fleet(url, urls)


# -- the property ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: A transport failure (connection cut, no answer in time), else None.
    failure: str | None = None
    #: The client hung up early: no body to judge.
    partial: bool = False


def send(client: httpx.Client, probe: Probe) -> Answer:
    content: bytes | Iterator[bytes] = probe.content
    if probe.chunked:
        data = probe.content
        content = iter([data[i : i + 8192] for i in range(0, len(data), 8192)])
    request = client.build_request(
        probe.method,
        probe.path,
        content=content,
        headers=list(probe.headers),
        timeout=HANG_UP if probe.hang_up else ANSWER_TIMEOUT,
    )
    try:
        r = client.send(request, stream=True)
        try:
            headers = {k.lower(): v for k, v in r.headers.items()}
            if probe.hang_up:  # the first bytes, then away
                next(r.iter_raw(), b"")
                return Answer(r.status_code, headers, b"", partial=True)
            return Answer(r.status_code, headers, r.read())
        finally:
            r.close()
    except httpx.TimeoutException as exc:
        if probe.hang_up:
            return Answer(0, {}, b"", partial=True)
        return Answer(0, {}, b"", failure=f"no answer in time: {exc.__class__.__name__}")
    except httpx.HTTPError as exc:
        return Answer(0, {}, b"", failure=f"{exc.__class__.__name__}: {exc}")


def error_shape(data: Any) -> str | None:
    """Why ``data`` is not OpenAI's ``{"error": {message, type, param, code}}``."""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return "is not {'error': {...}}"
    err = data["error"]
    if not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return "has no string error.message and error.type"
    for key in ("param", "code"):
        if key not in err or not (err[key] is None or isinstance(err[key], str)):
            return f"has no error.{key} (a string or null)"
    return None


def violations(probe: Probe, answer: Answer) -> list[str]:
    """Every way ``answer`` breaks the property (none: it holds)."""
    if answer.failure is not None:
        return [f"no answer: {answer.failure}"]
    status = answer.status
    problems = []
    if answer.partial and status == 0:
        return problems
    if status >= 500 and status not in UPSTREAM_5XX:
        problems.append(f"status {status}")
    if "x-request-id" not in answer.headers:
        problems.append("no x-request-id")
    if answer.partial:
        return problems
    if status >= 400:
        # Two documented answers are not errors: /ready's 503 and a failed reload's 422.
        if (probe.path, status) not in (("/ready", 503), ("/admin/reload", 422)):
            problems += _error_answer(answer)
    elif 200 <= status < 300:
        problems += _success(probe, answer)
    else:
        problems.append(f"status {status}")
    return problems


def _error_answer(answer: Answer) -> list[str]:
    ctype = answer.headers.get("content-type", "")
    if not ctype.startswith("application/json"):
        return [f"error answer of content-type {ctype!r}: {answer.body[:200]!r}"]
    try:
        why = error_shape(orjson.loads(answer.body))
    except orjson.JSONDecodeError:
        why = "is not JSON"
    return [f"error answer {why}: {answer.body[:200]!r}"] if why else []


def _success(probe: Probe, answer: Answer) -> list[str]:
    ctype = answer.headers.get("content-type", "")
    if probe.path.split("?")[0] not in INFERENCE:
        return _control_success(probe, answer, ctype)
    try:
        request = orjson.loads(probe.content)
    except orjson.JSONDecodeError:
        request = None
    request = request if isinstance(request, dict) else {}
    model = request.get("model")
    expected = CANONICAL.get(model) if isinstance(model, str) else None
    wants_stream = request.get("stream") is True and probe.path != EMBEDDINGS
    if ctype.startswith("text/event-stream"):
        if not wants_stream:
            return ["an SSE answer to a request that asked for none"]
        return _stream(answer.body, expected)
    if not ctype.startswith("application/json"):
        return [f"2xx answer of content-type {ctype!r}"]
    if wants_stream:
        return ["a JSON answer to a request for a stream"]
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return ["2xx answer is not JSON"]
    key = "data" if probe.path == EMBEDDINGS else "choices"
    if not isinstance(data, dict) or not isinstance(data.get(key), list) or "error" in data:
        return [f"2xx answer without a '{key}' list, or with an error"]
    if expected is not None and data.get("model") != expected:
        return [f"answer names model {data.get('model')!r}, not {expected!r}"]
    return []


def _stream(body: bytes, expected: str | None) -> list[str]:
    events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    payloads = []
    for event in events:
        data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if not data:
            return [f"SSE event without data: {event[:80]!r}"]
        payloads.append(b"\n".join(data))
    if not payloads:
        return ["empty SSE stream"]
    *chunks, last = payloads
    for chunk in chunks:
        try:
            data = orjson.loads(chunk)
        except orjson.JSONDecodeError:
            return [f"SSE chunk is not JSON: {chunk[:80]!r}"]
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            return [f"SSE chunk without choices: {chunk[:80]!r}"]
        if expected is not None and data.get("model") != expected:
            return [f"SSE chunk names model {data.get('model')!r}, not {expected!r}"]
    if last == b"[DONE]":
        return []
    try:
        why = error_shape(orjson.loads(last))
    except orjson.JSONDecodeError:
        why = "is not JSON"
    return [] if why is None else [f"SSE stream ends in neither [DONE] nor an error: it {why}"]


def _control_success(probe: Probe, answer: Answer, ctype: str) -> list[str]:
    if probe.path.startswith("/metrics"):
        return [] if ctype.startswith("text/plain") else [f"/metrics as {ctype!r}"]
    path = probe.path.split("?")[0]
    if path in ASSETS:  # the fleet page's files: HTML, script, style
        media_type = ASSETS[path][1]
        return [] if ctype == media_type else [f"{path} as {ctype!r}, not {media_type!r}"]
    if not ctype.startswith("application/json"):
        return [f"2xx answer of content-type {ctype!r}"]
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return ["2xx answer is not JSON"]
    return [] if isinstance(data, dict) else ["2xx answer is not a JSON object"]


#: orjson encodes at most 254 levels: the findings below nest one deeper.
ORJSON_DUMPS_DEPTH = 254


async def still_serving(fleet: Fleet, tasks_before: int) -> None:
    """No crashed or stuck worker: /health, a normal request (whole and streamed)
    to every sound model, nothing in flight, no task left behind."""
    async with httpx.AsyncClient(base_url=fleet.url, timeout=ANSWER_TIMEOUT) as client:
        assert (await client.get("/health")).status_code == 200
        for model in SOUND:
            for stream in (False, True):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                content = orjson.dumps({**body, "max_tokens": 4, "stream": stream})
                r = await client.post("/v1/chat/completions", content=content)
                probe = Probe("POST", "/v1/chat/completions", content)
                answer = Answer(r.status_code, dict(r.headers), r.content)
                assert r.status_code == 200, (model, r.text)
                assert violations(probe, answer) == []
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}

        async def idle() -> bool:
            data = (await client.get("/admin/endpoints", headers=admin)).json()
            return all(e["in_flight"] == 0 for e in data["endpoints"])

        await eventually(idle, within=10)

    async def no_task_left() -> bool:
        return len(asyncio.all_tasks()) <= tasks_before

    await eventually(no_task_left, within=10)


# -- hypothesis over tests/strategies.py -----------------------------------------------

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(url: str, examples: int) -> collections.Counter[int]:
    """Send ``examples`` drawn probes; fail (shrunk) on the first that breaks the
    property. The statuses seen."""
    statuses: collections.Counter[int] = collections.Counter()
    with httpx.Client(base_url=url, timeout=ANSWER_TIMEOUT) as client:

        @settings(FUZZ, max_examples=examples)
        @given(probes(MODELS))
        def check(probe: Probe) -> None:
            answer = send(client, probe)
            statuses[answer.status] += 1
            problems = violations(probe, answer)
            assert not problems, (problems, probe.shown(), answer.status, answer.body[:500])

        check()
    return statuses


def drawn(strategy: st.SearchStrategy[Any], examples: int) -> list[Any]:
    """``examples`` values of ``strategy``, the same every run."""
    out: list[Any] = []

    @settings(FUZZ, max_examples=examples, phases=[Phase.generate])
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out


async def test_fuzzed_requests_hold_the_property() -> None:
    async with fleet() as f:
        tasks = len(asyncio.all_tasks())
        statuses = await asyncio.to_thread(fuzz, f.url, 300)
        # The cases reach every kind of answer, not only the easy ones.
        assert {200, 400, 404, 405, 413} <= set(statuses), statuses
        assert UPSTREAM_5XX & set(statuses), statuses
        await still_serving(f, tasks)


async def test_concurrent_fuzzed_requests_hold_the_property() -> None:
    cases = drawn(probes(MODELS), 120)
    async with fleet() as f:
        tasks = len(asyncio.all_tasks())
        with httpx.Client(base_url=f.url, timeout=ANSWER_TIMEOUT) as client:
            answers = await asyncio.gather(*(asyncio.to_thread(send, client, p) for p in cases))
        broken = [
            (problems, probe.shown(), answer.status, answer.body[:300])
            for probe, answer in zip(cases, answers, strict=True)
            if (problems := violations(probe, answer))
        ]
        assert broken == []
        await still_serving(f, tasks)


# -- schemathesis over /openapi.json --------------------------------------------------------


@schemathesis.check
def openai_property(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """The fuzz property (OpenAI's error shape, no 500) on a schemathesis answer."""
    assert not response.stream_cut_short, "the SSE stream was not read to its end"
    body = response.request.body or b""
    probe = Probe(
        case.method.upper(), case.formatted_path, body.encode() if isinstance(body, str) else body
    )
    headers = {k.lower(): ", ".join(v) for k, v in response.headers.items()}
    answer = Answer(response.status_code, headers, response.content)
    problems = violations(probe, answer)
    assert not problems, problems


SCHEMA_CHECKS = [
    openai_property,
    response_schema_conformance,
    content_type_conformance,
    status_code_conformance,
]


def schemathesis_run(url: str, examples: int) -> collections.Counter[int]:
    config = schemathesis.Config.from_dict({"max-stream-events": 10_000})
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Mostly the inference routes: the rest are few, simple and mostly /admin (401s).
    cases = st.one_of(
        *(
            op.as_strategy(generation_mode=mode)
            for op in operations
            for mode in modes
            for _ in range(8 if op.path in INFERENCE else 1)
        )
    )
    # Random model names would all be 404s: mostly, name one the fleet serves.
    models = st.sampled_from((*MODELS, None))
    statuses: collections.Counter[int] = collections.Counter()
    with requests.Session() as session:

        @settings(FUZZ, max_examples=examples)
        @given(cases, models)
        def check(case: schemathesis.Case, model: str | None) -> None:
            if model and case.path in INFERENCE and isinstance(case.body, dict):
                case.body["model"] = model
            response = case.call(base_url=url, session=session, timeout=ANSWER_TIMEOUT)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=SCHEMA_CHECKS)

        check()
    return statuses


async def test_schemathesis_over_the_openapi_document() -> None:
    async with fleet() as f:
        tasks = len(asyncio.all_tasks())
        statuses = await asyncio.to_thread(schemathesis_run, f.url, 150)
        assert {200, 400} <= set(statuses), statuses
        await still_serving(f, tasks)


# -- the document itself ---------------------------------------------------------------------


async def test_openapi_document_is_served_and_lists_every_route() -> None:
    async with fleet() as f, httpx.AsyncClient(base_url=f.url) as client:
        r = await client.get("/openapi.json")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        served = r.json()
    assert served == orjson.loads(orjson.dumps(document()))
    assert served["openapi"].startswith("3.1")
    app = build_app(router_config([{"id": "a", "url": "http://127.0.0.1:1", "models": ["m"]}]))
    control = app.app.control  # type: ignore[attr-defined]
    routes = {route.path for route in control.routes} | set(INFERENCE)
    assert set(served["paths"]) == routes


# -- the property itself ----------------------------------------------------------------------

JSON_H = {"content-type": "application/json", "x-request-id": "r"}
SSE_H = {"content-type": "text/event-stream", "x-request-id": "r"}
OK_ERROR = b'{"error": {"message": "m", "type": "t", "param": null, "code": null}}'
CHAT_PROBE = Probe("POST", "/v1/chat/completions", b'{"model": "renamed", "messages": []}')
STREAM_PROBE = Probe(
    "POST", "/v1/chat/completions", b'{"model": "renamed", "messages": [], "stream": true}'
)
CHUNK = b'data: {"model": "renamed", "choices": []}\n\n'


@pytest.mark.parametrize(
    ("probe", "answer", "holds"),
    [
        (CHAT_PROBE, Answer(400, JSON_H, OK_ERROR), True),
        (CHAT_PROBE, Answer(502, JSON_H, OK_ERROR), True),
        (CHAT_PROBE, Answer(500, JSON_H, OK_ERROR), False),
        (CHAT_PROBE, Answer(400, {"x-request-id": "r"}, b"Bad Request"), False),
        (CHAT_PROBE, Answer(400, JSON_H, b'{"error": "m"}'), False),
        (CHAT_PROBE, Answer(400, JSON_H, b'{"error": {"message": "m", "type": "t"}}'), False),
        (CHAT_PROBE, Answer(400, {"content-type": "application/json"}, OK_ERROR), False),
        (CHAT_PROBE, Answer(200, JSON_H, b'{"model": "renamed", "choices": []}'), True),
        (CHAT_PROBE, Answer(200, JSON_H, b'{"model": "org/renamed", "choices": []}'), False),
        (CHAT_PROBE, Answer(200, JSON_H, b'{"model": "renamed", "data": []}'), False),
        (CHAT_PROBE, Answer(200, SSE_H, CHUNK + b"data: [DONE]\n\n"), False),
        (STREAM_PROBE, Answer(200, SSE_H, CHUNK + b"data: [DONE]\n\n"), True),
        (STREAM_PROBE, Answer(200, SSE_H, CHUNK + b"data: " + OK_ERROR + b"\n\n"), True),
        (STREAM_PROBE, Answer(200, SSE_H, CHUNK), False),
        (STREAM_PROBE, Answer(200, SSE_H, b"data: [DONE]\n\n" + CHUNK), False),
        (STREAM_PROBE, Answer(200, SSE_H, b"data: {oops\n\ndata: [DONE]\n\n"), False),
        (STREAM_PROBE, Answer(200, JSON_H, b'{"model": "renamed", "choices": []}'), False),
        (STREAM_PROBE, Answer(0, {}, b"", failure="ReadTimeout"), False),
        (Probe("GET", "/ready"), Answer(503, JSON_H, b'{"status": "not ready"}'), True),
        (Probe("GET", "/health"), Answer(503, JSON_H, b'{"status": "not ready"}'), False),
    ],
)
def test_the_property_tells_broken_answers(probe: Probe, answer: Answer, holds: bool) -> None:
    assert (violations(probe, answer) == []) is holds


# -- findings, fixed: deep bodies are refused before parsing (requests.max_json_depth),
# -- a malformed Origin is a cross-site request --------------------------------------------


def nested(depth: int, kind: str = "list") -> str:
    return (
        "[" * depth + "1" + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    )


PAST_DUMPS = ORJSON_DUMPS_DEPTH + 1
MESSAGE = '[{"role": "user", "content": "hi"}]'
FINDINGS = {
    "a wrong-typed sampling field is shown with orjson.dumps (router/request.py _shown)": (
        "/v1/completions",
        f'{{"model": "v", "prompt": "hi", "max_tokens": {nested(PAST_DUMPS)}}}',
    ),
    "prefix_affinity's canonical prompt dumps a list prompt (policies/prompt.py)": (
        "/v1/completions",
        f'{{"model": "mixed", "prompt": {nested(PAST_DUMPS)}}}',
    ),
    "consistent_hash's key dumps a list prompt (policies/prompt.py via keyed.py)": (
        "/v1/completions",
        f'{{"model": "tr", "prompt": {nested(PAST_DUMPS)}}}',
    ),
    "prefix_affinity hashes a content part with orjson.dumps (policies/prompt.py _content)": (
        "/v1/chat/completions",
        '{"model": "mixed", "messages": [{"role": "user", "content": [{"type": "image_url",'
        f' "image_url": {nested(PAST_DUMPS, "object")}}}]}}]}}',
    ),
    "a renamed model's body is dumped again (backends/openai.py prepare)": (
        "/v1/completions",
        f'{{"model": "renamed", "prompt": "hi", "user": {nested(PAST_DUMPS)}}}',
    ),
    "so is the body of a request naming an alias (backends/openai.py prepare)": (
        "/v1/embeddings",
        f'{{"model": "alias-mixed", "input": {nested(PAST_DUMPS, "object")}}}',
    ),
    "TGI's chat template takes str() of a deep content (backends/templates.py text_of)": (
        "/v1/chat/completions",
        f'{{"model": "t", "messages": [{{"role": "user", "content": {nested(1000, "object")}}}]}}',
    ),
}


@pytest.mark.parametrize("case", list(FINDINGS))
async def test_deep_bodies_are_not_500(case: str) -> None:
    path, body = FINDINGS[case]
    probe = Probe("POST", path, body.encode(), (("content-type", b"application/json"),))
    async with fleet() as f:
        with httpx.Client(base_url=f.url, timeout=ANSWER_TIMEOUT) as client:
            answer = await asyncio.to_thread(send, client, probe)
    assert violations(probe, answer) == [], (answer.status, answer.body)


async def test_admin_open_with_a_malformed_origin_is_no_500() -> None:
    async with simulator() as (sim_url, _):
        config = router_config([{"id": "a", "url": sim_url, "models": ["tiny"]}])
        async with router(config) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/admin/endpoints/a/drain", headers={"origin": "http://[::1"})
    probe = Probe("POST", "/admin/endpoints/a/drain", b"")
    assert violations(probe, Answer(r.status_code, dict(r.headers), r.content)) == []
