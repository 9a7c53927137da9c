"""Which requests the cache may serve, and the key of their answer.

A request is cacheable when its answer is deterministic: an embedding, or a
generation with ``temperature: 0`` or a ``seed``; or when the client opts in
(``x-kvroute-cache: use``). The client opts out with ``x-kvroute-cache:
no-cache`` (do not serve from the cache; the fresh answer may be stored) or
``no-store`` (neither), or the same ``Cache-Control`` request directives,
which also bring ``max-age=N`` (serve only an answer at most N seconds old).

The key is a SHA-256 over the operation, the tenant (or ``*`` for a model
whose cache is shared), the resolved model and the canonical body: keys
sorted, ``stream``, ``stream_options`` and ``user`` left out (they change how
an answer is delivered or who asked, not what it is), values equal to
OpenAI's defaults dropped, ``null`` dropped, the length bound the engine
reads (a chat's ``max_completion_tokens`` before its ``max_tokens``; only
``max_tokens`` in a completion) spelt ``max_tokens`` and the other left out,
one stop string as a list, sampling numbers as floats.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from backends.base import Operation
from router.request import max_tokens_field

#: Fields that change how an answer is delivered or who asked, not what it is.
IGNORED = frozenset({"stream", "stream_options", "user", "model"})
#: OpenAI's defaults: a field set to its default asks for the same answer as
#: the field left out.
DEFAULTS: dict[str, Any] = {
    "n": 1,
    "top_p": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "encoding_format": "float",
}
FLOATS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})
#: Characters of a header value read.
MAX_HEADER = 256


@dataclass(frozen=True, slots=True)
class Directives:
    """What the client said about the cache (request headers)."""

    #: Serve from the cache even if the request is not deterministic.
    use: bool = False
    #: Do not serve from the cache (a fresh answer may still be stored).
    no_cache: bool = False
    #: Neither serve nor store.
    no_store: bool = False
    #: Serve only an entry at most this old (seconds).
    max_age: float | None = None


NONE = Directives()


def directives(headers: Mapping[str, str]) -> Directives:
    own = headers.get("x-kvroute-cache")
    control = headers.get("cache-control")
    if own is None and control is None:
        return NONE
    words: list[str] = []
    for value in (own, control):
        if value:
            words += [w.strip().lower() for w in value[:MAX_HEADER].split(",")]
    max_age = None
    for word in words:
        name, _, arg = word.partition("=")
        arg = arg.strip()
        # ASCII digits only: str.isdigit() also takes superscripts ("²"), which float() refuses.
        if name == "max-age" and arg.isascii() and arg.isdigit():
            max_age = float(arg)
    return Directives(
        use="use" in words,
        no_cache="no-cache" in words or max_age == 0,
        no_store="no-store" in words,
        max_age=max_age,
    )


def deterministic(op: Operation, body: Mapping[str, Any]) -> bool:
    if not op.generates:
        return True
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and temperature == 0:
        return True
    return isinstance(body.get("seed"), int)


def canonical(op: Operation, body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name in IGNORED or value is None:
            continue
        if name in FLOATS and isinstance(value, (int, float)) and math.isfinite(value):
            value = float(value)
        if name in DEFAULTS and _same(DEFAULTS[name], value):
            continue
        out[name] = value
    # The length the engine reads, under one name (a chat's max_completion_tokens
    # before its max_tokens; the completions API has only max_tokens).
    bound = body.get(max_tokens_field(body, op))
    out.pop("max_completion_tokens", None)
    out.pop("max_tokens", None)
    if bound is not None:
        out["max_tokens"] = bound
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


def digest(op: Operation, model: str, scope: str, body: Mapping[str, Any]) -> str:
    """The entry's key: hex SHA-256 of the operation, scope (tenant or ``*``),
    model and canonical body."""
    h = hashlib.sha256()
    for part in (op.value, scope, model):
        h.update(part.encode())
        h.update(b"\0")
    h.update(orjson.dumps(canonical(op, body), option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()


def _same(default: Any, value: Any) -> bool:
    """``value`` is the default (``True`` is not 1, and 1 is not ``True``)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    return bool(default == value)
