"""One client request, read and parsed once into a frozen object.

``InferenceRequest`` is what every stage of the pipeline and every attempt
sees: the operation (an enum, not a path), ``stream``, the parsed body and
its raw bytes, the client's headers, the request id, the sampling fields
kvroute translates (type-checked here, once), and (after the resolve stage)
the model's route. ``RequestContext`` is the mutable record of how the
request went, which the access log and the metrics read at the end.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from backends.base import Operation, Sampling
from router.config import RequestLimits
from router.errors import BodyTooLarge, InvalidRequest, MalformedJSON
from router.overhead import Waits
from router.trace_context import TraceContext, new_trace
from router.types import Receive, Scope

if TYPE_CHECKING:
    from router.registry import Route
    from router.tenants import Tenant
    from router.tracing import ServerSpan

OPERATIONS: dict[str, Operation] = {op.path: op for op in Operation}
#: The field each operation requires besides ``model``.
REQUIRED = {
    Operation.CHAT: "messages",
    Operation.COMPLETION: "prompt",
    Operation.EMBEDDING: "input",
}


#: The scope key under which the connection's ``ClientProtocol`` offers to drop it.
DROP_CONNECTION = "kvroute.drop_connection"


@dataclass(slots=True)
class RequestContext:
    """What one request's handling learns; the access log reads it at the end."""

    request_id: str
    start: float
    #: The request's trace (the client's, validated, or the server span's): the
    #: access log's ``trace_id``, and the ``traceparent`` the backend gets. None
    #: until first asked for when the client sent none and tracing is off: such a
    #: trace is never sent upstream, only logged, and making one costs about as
    #: much as the rest of the overhead bookkeeping (see ``trace_id``).
    trace: TraceContext | None
    #: The request's server span, when tracing is on.
    span: ServerSpan | None = None
    status: int = 0
    #: The model as the client named it (truncated), and as kvroute resolved it.
    requested_model: str | None = None
    model: str | None = None
    endpoint: str | None = None
    policy: str | None = None
    reason: str | None = None
    stream: bool = False
    ttft: float | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    #: The token counts are kvroute's estimate, not the engine's word.
    usage_estimated: bool = False
    attempts: int = 0
    #: "hit" when the answer came from the response cache.
    cache: str | None = None
    #: Milliseconds waited in the admission queue (None: not queued).
    queued_ms: float | None = None
    #: Set just before the last body message: a disconnect after it is no abort.
    finishing: bool = False
    cancelled: bool = False
    #: Drops the client's connection (``ClientProtocol.drop``, from the scope's
    #: ``DROP_CONNECTION``): for a client that stopped reading. None when
    #: kvroute is served without its client limits (tests).
    drop: Callable[[], None] | None = None
    #: Who is calling (set before the body is read).
    tenant: Tenant | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The clock ``start`` was read from; and the time that was not kvroute's
    #: (router/overhead.py), which leaves ``overhead``, set at response start.
    clock: Callable[[], float] = time.perf_counter
    waits: Waits = field(default_factory=Waits)
    overhead: float | None = None

    def trace_id(self) -> str:
        """The request's trace id; a new trace is made up the first time one is
        asked for and there is none (every request has a trace, made when needed)."""
        if self.trace is None:
            self.trace = new_trace()
        return self.trace.trace_id


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One parsed client request, as every stage and every attempt sees it."""

    op: Operation
    request_id: str
    #: The client's headers, names in lower case.
    headers: Mapping[str, str]
    raw: bytes
    body: Mapping[str, Any]
    #: The model name as the client sent it.
    model: str
    stream: bool
    sampling: Sampling
    ctx: RequestContext
    #: Set by the resolve stage.
    route: Route | None = None
    #: kvroute needs the answer's usage (a tenant's token limits): a stream's
    #: adapter asks the engine for it even if the client did not, and keeps
    #: that extra chunk from the client.
    router_usage: bool = False

    def with_route(self, route: Route) -> InferenceRequest:
        # Positional, not dataclasses.replace: this runs for every request.
        return InferenceRequest(
            self.op,
            self.request_id,
            self.headers,
            self.raw,
            self.body,
            self.model,
            self.stream,
            self.sampling,
            self.ctx,
            route,
            self.router_usage,
        )

    @property
    def routed(self) -> Route:
        assert self.route is not None, "the resolve stage has not run"
        return self.route


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header") from None
            if declared > limit:
                raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


#: JSON strings, to count the brackets outside them. Possessive, and an
#: unterminated string runs to the end of the body: one pass whatever the body
#: (a backtracking pattern rescanned to the end from every quote of a string
#: that never closes: minutes of event loop for a 1 MiB body). Unrolled (runs
#: of plain characters between escapes): 4x faster than one character at a
#: time, 57 ms for 18 MB of escaped string (``re`` holds the GIL even in the
#: thread that parses large bodies).
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def check_json_shape(raw: bytes, limits: RequestLimits) -> None:
    """At most ``max_json_containers`` JSON objects and arrays in ``raw``, nested
    at most ``max_json_depth`` deep, checked before parsing (parsing is where the
    memory goes). Brackets inside strings do not count. A body with fewer
    brackets than the depth bound (most requests) costs two ``count``s."""
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets <= limits.max_json_depth:
        return
    outside = _STRING.sub(b"", raw)
    opened = outside.count(b"{") + outside.count(b"[")
    if opened > limits.max_json_containers:
        raise BodyTooLarge(
            f"request body has more than {limits.max_json_containers} JSON objects and "
            "arrays (requests.max_json_containers)"
        )
    if outside.count(b"}") + outside.count(b"]") != opened:
        return  # unbalanced, so not JSON: the parser says where (and the passes
        # below stay over at most twice the containers' brackets)
    # Each pass removes every innermost pair: the passes are the depth.
    skeleton = _NOT_BRACKET.sub(b"", outside)
    for _ in range(limits.max_json_depth):
        skeleton, removed = _INNERMOST.subn(b"", skeleton)
        if not skeleton or not removed:
            return  # nested within the bound (or unbalanced: the parser says why)
    if _INNERMOST.search(skeleton):
        raise InvalidRequest(
            f"request body nests JSON deeper than {limits.max_json_depth} levels "
            "(requests.max_json_depth)"
        )


def parse_body(raw: bytes, op: Operation, limits: RequestLimits) -> dict[str, Any]:
    """The body as a JSON object with a model and the operation's required field."""
    if not raw:
        raise MalformedJSON("request body is empty; expected a JSON object")
    check_json_shape(raw, limits)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    required = REQUIRED[op]
    if required not in body:
        raise InvalidRequest(f"'{required}' is a required property", param=required)
    if op is Operation.CHAT:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", param="messages")
        if len(messages) > limits.max_messages:
            raise InvalidRequest(
                f"'messages' has {len(messages)} items; at most {limits.max_messages}",
                param="messages",
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(
                    f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]"
                )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    return body


# -- the sampling fields -------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int to Python, not to OpenAI


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _check(body: Mapping[str, Any], name: str, ok: Callable[[Any], bool], expected: str) -> Any:
    value = body.get(name)
    if value is not None and not ok(value):
        raise InvalidRequest(f"'{name}' must be {expected}, got {_shown(value)}", param=name)
    return value


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


#: The fields that bound a generation's length, by operation: chat has two
#: (``max_tokens``, deprecated by OpenAI, and ``max_completion_tokens``); the
#: completions API has only ``max_tokens`` (vLLM ignores the other there).
TOKEN_FIELDS: dict[Operation, tuple[str, ...]] = {
    Operation.CHAT: ("max_completion_tokens", "max_tokens"),
    Operation.COMPLETION: ("max_tokens",),
}


def max_tokens_field(body: Mapping[str, Any], op: Operation) -> str:
    """The field the engine takes the length bound from: the first of the
    operation's ``TOKEN_FIELDS`` that is set (vLLM's chat: ``max_completion_tokens``
    when not null, else ``max_tokens``), else ``max_tokens``."""
    for name in TOKEN_FIELDS.get(op, ()):
        if body.get(name) is not None:
            return name
    return "max_tokens"


def parse_sampling(
    body: Mapping[str, Any], op: Operation, stream: bool, max_stop: int = 16
) -> Sampling:
    """The OpenAI fields that kvroute translates for non-OpenAI backends, checked
    with OpenAI's rules (400 with ``param``) whatever the backend."""
    if not op.generates:
        return Sampling()
    for name in TOKEN_FIELDS[op]:
        value = _check(body, name, _is_int, "an integer")
        if value is not None and value < 1:
            raise InvalidRequest(f"'{name}' must be at least 1, got {value}", param=name)
    max_tokens = body.get(max_tokens_field(body, op))
    temperature = _check(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidRequest(
            f"'temperature' must be between 0 and 2, got {temperature}", param="temperature"
        )
    top_p = _check(body, "top_p", _is_number, "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequest(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _check(body, "top_k", _is_int, "an integer")
    seed = _check(body, "seed", _is_int, "an integer")
    n = _check(body, "n", _is_int, "an integer")
    if n is not None and n < 1:
        raise InvalidRequest(f"'n' must be at least 1, got {n}", param="n")
    penalty = _check(body, "frequency_penalty", _is_number, "a number")
    if penalty is not None and not -2 <= penalty <= 2:
        raise InvalidRequest(
            f"'frequency_penalty' must be between -2 and 2, got {penalty}",
            param="frequency_penalty",
        )
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest("'stop' must be a string or an array of strings", param="stop")
    if len(stops) > max_stop:
        raise InvalidRequest(f"'stop' has {len(stops)} sequences; at most {max_stop}", param="stop")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options"
            )
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise InvalidRequest(
                "'stream_options.include_usage' must be a boolean",
                param="stream_options.include_usage",
            )
        include_usage = usage is True
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        n=1 if n is None else n,
        stop=stops,
        frequency_penalty=penalty,
        include_usage=include_usage,
    )


def client_headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
