"""A complete answer's bytes -> a CachedAnswer, and back; pure code, no I/O.

The cache keeps what a client was told, not how it was framed: the content
pieces of each choice, its finish reason and role, the usage and the system
fingerprint. So an answer recorded whole can be served as a stream (one
piece) and a recorded stream can be served whole (its pieces joined); both
get a fresh ``id`` and ``created`` per serving, as a new generation would.

Only what can be replayed faithfully is kept. An answer is refused (None,
the request is simply not cached) when its replay would lose or invent
something the client asked for:

- anything that is not a complete success: not JSON, not the expected
  ``object``, an ``error`` (whole or mid-stream), a stream without its
  ``[DONE]``, a choice without a finish reason, or one that finished as
  ``abort``/``error`` (vLLM's names for a generation cut short);
- tool calls and function calls: they are structured deltas (ids, names,
  argument fragments), not content pieces;
- logprobs, and any other non-null per-choice payload (vLLM's ``token_ids``,
  ``prompt_logprobs``, ...) or message field beyond role and content
  (``refusal``, ``audio``, ``reasoning``, ...): they are aligned with tokens
  or are separate channels, which a list of text pieces cannot rebuild;
- ``n`` choices whose indices are not exactly 0..n-1.

Top-level metadata (``service_tier``, vLLM's ``kv_transfer_params``,
``metrics``, OpenAI's stream ``obfuscation``) is not the answer and is dropped;
vLLM's echo of the prompt (``prompt_logprobs``, ``prompt_token_ids``,
``prompt_text``) is asked for by the client, so a non-null one is refused.

Entries are encoded for the store with a format version, and ``decode``
checks every field: Redis may hold entries written by another kvroute
version, and a bad entry must be a miss (``CorruptEntry``), never a bad answer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

import orjson

from backends.openai_shapes import DONE, new_id
from backends.sse import SSEParser
from router.cache.answer_types import CachedAnswer, CachedChoice, Kind

#: The version of ``encode``'s format; ``decode`` refuses any other.
FORMAT: Final = 1

_OBJECT: Final[dict[str, str]] = {"chat": "chat.completion", "completion": "text_completion"}
_CHUNK_OBJECT: Final[dict[str, str]] = {
    "chat": "chat.completion.chunk",
    "completion": "text_completion",
}
_KINDS: Final[tuple[Kind, ...]] = ("chat", "completion", "embedding")
#: Finish reasons that are not a finished generation to replay: cut short, or
#: pointing at tool calls the pieces do not hold.
_UNREPLAYABLE_FINISH: Final = frozenset({"abort", "error", "tool_calls", "function_call"})
#: The per-choice keys a replay rebuilds; vLLM's ``stop_reason`` (which stop
#: string or token ended it) is vLLM-only and dropped like other metadata.
_CHOICE_KEYS: Final = frozenset(
    {"index", "message", "delta", "text", "finish_reason", "stop_reason"}
)
#: The message (or delta) keys a replay rebuilds.
_MESSAGE_KEYS: Final = frozenset({"role", "content"})
#: Top-level vLLM fields that echo the prompt back when the client asked for it.
_PROMPT_ECHO: Final = ("prompt_logprobs", "prompt_token_ids", "prompt_text")


class CorruptEntry(ValueError):
    """A stored entry this version cannot read: garbage, another format version,
    or a field of the wrong shape. The caller treats it as a miss."""


# -- answers in -----------------------------------------------------------------------


def from_json(kind: Kind, data: bytes) -> CachedAnswer | None:
    """The cacheable content of a whole answer (the body of a 200), or None.

    Chat and completion answers keep their content as one piece per choice
    (an empty content as no piece, as a stream of it would have none), choices
    in index order. An embedding answer keeps its JSON bytes as they came
    (``embedding_json``): it is only ever served whole, and re-serialising
    thousands of floats per hit would cost time and could change their text.
    """
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not _top_level_ok(body):
        return None
    model, usage = body.get("model"), body.get("usage")
    if not isinstance(model, str) or not (usage is None or isinstance(usage, dict)):
        return None
    if kind == "embedding":
        if body.get("object") != "list" or not _embeddings_ok(body.get("data")):
            return None
        return CachedAnswer("embedding", model, (), usage, embedding_json=bytes(data))
    if body.get("object") != _OBJECT[kind]:
        return None
    raw = body.get("choices")
    if not isinstance(raw, list):
        return None
    choices: dict[int, CachedChoice] = {}
    for item in raw:
        choice = _whole_choice(kind, item)
        if choice is None or choice.index in choices:
            return None
        choices[choice.index] = choice
    ordered = _in_index_order(choices)
    if ordered is None:
        return None
    return CachedAnswer(kind, model, ordered, usage, _fingerprint(body))


@dataclass(slots=True)
class _Choice:
    """One choice of a stream, as its chunks arrive."""

    pieces: list[str] = field(default_factory=list)
    role: str | None = None
    finish_reason: str | None = None


def from_stream(kind: Kind, data: bytes) -> CachedAnswer | None:
    """The cacheable content of a complete SSE stream (every byte the client
    got), or None.

    Complete means the last event is ``[DONE]`` (a whole event, with its
    blank line; no event after it) and every choice got a finish reason.
    Each non-empty content delta (chat ``delta.content``, completion
    ``text``) is one piece, in order, per choice index; the role is the first
    one a delta names (chat only, "assistant" if none did).
    Usage is taken from the usage chunk (``choices`` empty, sent for
    ``stream_options.include_usage``); usage that vLLM's
    ``continuous_usage_stats`` puts on every chunk is not kept, only the
    totals. The system fingerprint is whichever chunk carried it (vLLM: the
    finish or usage chunk; OpenAI: every chunk).

    Raises ValueError for kind "embedding": embeddings are never streamed.
    """
    if kind == "embedding":
        raise ValueError("embeddings are never streamed")
    parser = SSEParser()
    events = parser.feed(data)
    if parser.close() or not events or events[-1] != b"[DONE]":
        return None
    model: str | None = None
    usage: dict[str, Any] | None = None
    fingerprint: str | None = None
    building: dict[int, _Choice] = {}
    for payload in events[:-1]:
        try:
            chunk = orjson.loads(payload)  # an early [DONE] is not JSON: refused
        except orjson.JSONDecodeError:
            return None
        if (
            not isinstance(chunk, dict)
            or not _top_level_ok(chunk)
            or chunk.get("object") != _CHUNK_OBJECT[kind]
            or not isinstance(chunk.get("model"), str)
        ):
            return None
        model = model or chunk["model"]
        fingerprint = _fingerprint(chunk) or fingerprint
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return None
        if not choices:
            chunk_usage = chunk.get("usage")
            if chunk_usage is not None:
                if not isinstance(chunk_usage, dict):
                    return None
                usage = chunk_usage
            continue
        for item in choices:
            if not _add_delta(kind, item, building):
                return None
    finished: dict[int, CachedChoice] = {}
    for index, choice in building.items():
        if choice.finish_reason is None:
            return None
        role = (choice.role or "assistant") if kind == "chat" else None
        finished[index] = CachedChoice(index, tuple(choice.pieces), choice.finish_reason, role)
    ordered = _in_index_order(finished)
    if ordered is None or model is None:
        return None
    return CachedAnswer(kind, model, ordered, usage, fingerprint)


def _top_level_ok(body: dict[str, Any]) -> bool:
    return body.get("error") is None and all(body.get(key) is None for key in _PROMPT_ECHO)


def _fingerprint(body: dict[str, Any]) -> str | None:
    value = body.get("system_fingerprint")
    return value if isinstance(value, str) else None


def _empty(value: Any) -> bool:
    """Null or an empty value: OpenAI sends ``annotations: []``, ``tool_calls``
    may be ``[]``; neither carries anything a replay would lose."""
    return value is None or (isinstance(value, str | list | dict) and not value)


def _only(obj: dict[str, Any], keys: frozenset[str]) -> bool:
    """Every field of ``obj`` outside ``keys`` is empty."""
    return all(key in keys or _empty(value) for key, value in obj.items())


def _is_index(value: Any) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def _replayable_finish(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value not in _UNREPLAYABLE_FINISH


def _whole_choice(kind: Kind, item: Any) -> CachedChoice | None:
    if not isinstance(item, dict) or not _only(item, _CHOICE_KEYS):
        return None
    index, finish = item.get("index"), item.get("finish_reason")
    if not _is_index(index) or not _replayable_finish(finish):
        return None
    role: str | None = None
    if kind == "chat":
        message = item.get("message")
        if not isinstance(message, dict) or not _only(message, _MESSAGE_KEYS):
            return None
        role, text = message.get("role"), message.get("content")
        if not isinstance(role, str):
            return None
    else:
        text = item.get("text")
    if not isinstance(text, str):
        return None
    return CachedChoice(index, (text,) if text else (), finish, role)


def _add_delta(kind: Kind, item: Any, building: dict[int, _Choice]) -> bool:
    """Adds one chunk's choice to ``building``; False if it cannot be replayed."""
    if not isinstance(item, dict) or not _only(item, _CHOICE_KEYS):
        return False
    index, finish = item.get("index"), item.get("finish_reason")
    if not _is_index(index) or not (finish is None or _replayable_finish(finish)):
        return False
    choice = building.setdefault(index, _Choice())
    if kind == "chat":
        delta = item.get("delta")
        if not isinstance(delta, dict) or not _only(delta, _MESSAGE_KEYS):
            return False
        role, text = delta.get("role"), delta.get("content")
        if role is not None:
            if not isinstance(role, str):
                return False
            choice.role = choice.role or role
    else:
        text = item.get("text")
    if not (text is None or isinstance(text, str)):
        return False
    if choice.finish_reason is not None and (text or finish not in (None, choice.finish_reason)):
        return False  # content, or another ending, after the choice finished
    if text:
        choice.pieces.append(text)
    if finish is not None:
        choice.finish_reason = finish
    return True


def _in_index_order(choices: dict[int, CachedChoice]) -> tuple[CachedChoice, ...] | None:
    """The choices by index if they are exactly 0..n-1 (n >= 1), else None."""
    if not choices or set(choices) != set(range(len(choices))):
        return None
    return tuple(choices[i] for i in range(len(choices)))


def _embeddings_ok(data: Any) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and all(
            isinstance(item, dict)
            and _is_index(item.get("index"))
            and isinstance(item.get("embedding"), list | str)  # str: encoding_format base64
            for item in data
        )
    )


# -- answers out ----------------------------------------------------------------------


def _answer_id(chat: bool, id_seed: bytes | None) -> str:
    """A fresh id (random, like ``openai_shapes.new_id``), or one derived from
    ``id_seed`` with the same shape, for callers that need it reproducible."""
    if id_seed is None:
        return new_id(chat)
    prefix = "chatcmpl-" if chat else "cmpl-"
    return prefix + hashlib.blake2b(id_seed, digest_size=12).hexdigest()


def _generated(answer: CachedAnswer) -> bool:
    """True for chat; False for completion; ValueError for an embedding."""
    if answer.kind == "embedding":
        raise ValueError("embeddings are never streamed")
    return answer.kind == "chat"


def to_json(answer: CachedAnswer, *, model: str, now: float, id_seed: bytes | None = None) -> bytes:
    """The whole OpenAI answer: each choice's pieces joined, a fresh ``id`` and
    ``created``, ``model`` as the client named it.

    The shape is vLLM's (tests/fixtures/vllm/chat.body) without its vLLM-only
    fields (``stop_reason``, ``token_ids``, ``prompt_*``, ``kv_transfer_params``,
    ``metrics``, the message's ``reasoning``): OpenAI's null ``refusal``,
    ``annotations``, ``audio``, ``function_call`` and ``service_tier`` are kept.
    ``system_fingerprint`` and ``usage`` appear when known.

    An embedding answer is its stored JSON, the very bytes when ``model`` is
    the name it was stored under (the usual case); otherwise parsed, renamed
    and re-serialised (every value the same, floats perhaps written shorter).
    """
    if answer.kind == "embedding":
        if answer.embedding_json is None:
            raise ValueError("an embedding answer without its JSON")
        if model == answer.model:
            return answer.embedding_json
        return orjson.dumps({**orjson.loads(answer.embedding_json), "model": model})
    chat = answer.kind == "chat"
    choices: list[dict[str, Any]] = []
    for choice in answer.choices:
        text = "".join(choice.pieces)
        if chat:
            message = {
                "role": choice.role or "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
            }
            choices.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
            )
        else:
            choices.append(
                {
                    "index": choice.index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
            )
    body: dict[str, Any] = {
        "id": _answer_id(chat, id_seed),
        "object": _OBJECT[answer.kind],
        "created": int(now),
        "model": model,
        "choices": choices,
        "service_tier": None,
    }
    if answer.system_fingerprint is not None:
        body["system_fingerprint"] = answer.system_fingerprint
    if answer.usage is not None:
        body["usage"] = answer.usage
    return orjson.dumps(body)


def to_stream(
    answer: CachedAnswer,
    *,
    model: str,
    now: float,
    include_usage: bool,
    id_seed: bytes | None = None,
) -> bytes:
    """The answer as an OpenAI SSE stream, one ``id`` and ``created`` for all
    its chunks, ending with ``data: [DONE]``.

    Chunks follow vLLM's recorded streams (chat_stream.body, completion_stream.body):

    - chat: a first chunk per choice with ``delta: {role, content: ""}``, one
      chunk per piece (``delta: {content}``), then a finish chunk with
      ``delta: {content: ""}`` and the finish reason;
    - completion: one chunk per piece (``text``), the last one carrying the
      finish reason (a choice with no piece: one chunk with ``text: ""``).

    With n > 1 the choices are interleaved as an engine sends them: all the
    role chunks, then step by step the k-th chunk of every choice still
    generating (choice 0 first), each choice's finish right after its last
    piece. ``system_fingerprint``, when known, is on every chunk (as OpenAI
    sends it, so a client reading it from the first chunk finds it). The
    usage chunk (``choices: []``) comes before ``[DONE]`` when
    ``include_usage`` is asked and the usage is known; there is none to send
    otherwise.

    Raises ValueError for an embedding answer: embeddings are never streamed.
    """
    chat = _generated(answer)
    head: dict[str, Any] = {
        "id": _answer_id(chat, id_seed),
        "object": _CHUNK_OBJECT[answer.kind],
        "created": int(now),
        "model": model,
    }
    if answer.system_fingerprint is not None:
        head["system_fingerprint"] = answer.system_fingerprint

    def event(choice: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    out: list[bytes] = []
    if chat:
        for choice in answer.choices:
            role = choice.role or "assistant"
            out.append(event(_chat_delta(choice.index, {"role": role, "content": ""}, None)))
    # A chat choice takes one step more than its pieces (its finish chunk); a
    # completion choice at least one (its last piece carries the finish).
    steps = max(
        (len(c.pieces) + 1 if chat else max(len(c.pieces), 1) for c in answer.choices), default=0
    )
    for step in range(steps):
        for choice in answer.choices:
            pieces = choice.pieces
            if chat:
                if step < len(pieces):
                    out.append(event(_chat_delta(choice.index, {"content": pieces[step]}, None)))
                elif step == len(pieces):
                    delta = {"content": ""}
                    out.append(event(_chat_delta(choice.index, delta, choice.finish_reason)))
            elif step < max(len(pieces), 1):
                last = step >= len(pieces) - 1
                text = pieces[step] if pieces else ""
                finish = choice.finish_reason if last else None
                out.append(
                    event(
                        {
                            "index": choice.index,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    )
                )
    if include_usage and answer.usage is not None:
        out.append(
            b"data: " + orjson.dumps({**head, "choices": [], "usage": answer.usage}) + b"\n\n"
        )
    out.append(DONE)
    return b"".join(out)


def _chat_delta(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


# -- the store's bytes ----------------------------------------------------------------


def encode(answer: CachedAnswer, stored_at: float) -> bytes:
    """The entry as the store keeps it: compact JSON, versioned (``FORMAT``),
    choices as ``[index, pieces, finish_reason, role]``, the embedding JSON as
    a string (it is UTF-8: orjson read it)."""
    embedding = answer.embedding_json
    return orjson.dumps(
        {
            "v": FORMAT,
            "at": stored_at,
            "kind": answer.kind,
            "model": answer.model,
            "choices": [[c.index, c.pieces, c.finish_reason, c.role] for c in answer.choices],
            "usage": answer.usage,
            "fp": answer.system_fingerprint,
            "emb": None if embedding is None else embedding.decode(),
        }
    )


def decode(data: bytes) -> tuple[CachedAnswer, float]:
    """An entry written by ``encode`` and its ``stored_at``.

    Raises CorruptEntry for anything else: not JSON, another format version,
    a missing or mistyped field, choices not indexed 0..n-1, a generation
    without choices or an embedding without its JSON.
    """
    try:
        entry = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise CorruptEntry("not JSON") from error
    if not isinstance(entry, dict):
        raise CorruptEntry("not a JSON object")
    version = entry.get("v")
    if type(version) is not int or version != FORMAT:
        raise CorruptEntry(f"format {version!r}, this version reads {FORMAT}")
    stored_at, kind, model = entry.get("at"), entry.get("kind"), entry.get("model")
    usage, fingerprint, embedding = entry.get("usage"), entry.get("fp"), entry.get("emb")
    if isinstance(stored_at, bool) or not isinstance(stored_at, int | float):
        raise CorruptEntry("at: not a time")
    if not math.isfinite(stored_at):
        raise CorruptEntry("at: not a time")
    if kind not in _KINDS:
        raise CorruptEntry(f"kind: {kind!r}")
    if not isinstance(model, str):
        raise CorruptEntry("model: not a string")
    if not (usage is None or isinstance(usage, dict)):
        raise CorruptEntry("usage: not an object")
    if not (fingerprint is None or isinstance(fingerprint, str)):
        raise CorruptEntry("fp: not a string")
    if not (embedding is None or isinstance(embedding, str)):
        raise CorruptEntry("emb: not a string")
    choices = _decode_choices(entry.get("choices"))
    if kind == "embedding":
        if embedding is None or choices:
            raise CorruptEntry("an embedding entry holds its JSON and no choices")
    elif embedding is not None or not choices:
        raise CorruptEntry(f"a {kind} entry holds choices and no embedding")
    answer = CachedAnswer(
        kind,
        model,
        choices,
        usage,
        fingerprint,
        None if embedding is None else embedding.encode(),
    )
    return answer, float(stored_at)


def _decode_choices(raw: Any) -> tuple[CachedChoice, ...]:
    if not isinstance(raw, list):
        raise CorruptEntry("choices: not a list")
    choices: list[CachedChoice] = []
    for position, item in enumerate(raw):
        if not isinstance(item, list) or len(item) != 4:
            raise CorruptEntry(f"choices[{position}]: not [index, pieces, finish, role]")
        index, pieces, finish, role = item
        if type(index) is not int or index != position:
            raise CorruptEntry(f"choices[{position}]: index {index!r}")
        if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
            raise CorruptEntry(f"choices[{position}]: pieces not strings")
        if not isinstance(finish, str):
            raise CorruptEntry(f"choices[{position}]: finish_reason not a string")
        if not (role is None or isinstance(role, str)):
            raise CorruptEntry(f"choices[{position}]: role {role!r}")
        choices.append(CachedChoice(index, tuple(pieces), finish, role))
    return tuple(choices)
