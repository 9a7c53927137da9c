"""OpenAI response shapes, for adapters that translate from other protocols."""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from backends.base import Usage

DONE = b"data: [DONE]\n\n"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()


def usage(counts: Usage) -> dict[str, int]:
    prompt, completion = counts.prompt_tokens or 0, counts.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(
    chat: bool,
    model: str,
    text: str,
    finish_reason: str | None,
    counts: Usage,
) -> bytes:
    choice: dict[str, Any]
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return orjson.dumps(
        {
            "id": new_id(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage(counts),
        }
    )


class ChunkWriter:
    """OpenAI stream chunks for one response: the role first, deltas, the finish,
    the usage chunk when asked for, ``[DONE]``."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self._head = {
            "id": new_id(chat),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._started = False

    def _event(self, payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**self._head, **payload}) + b"\n\n"

    def delta(self, text: str, finish_reason: str | None = None) -> bytes:
        out = b""
        if self.chat and not self._started:
            role = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            out += self._event({"choices": [role]})
        self._started = True
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return out + self._event({"choices": [choice]})

    def end(self, counts: Usage) -> bytes:
        out = b""
        if self.include_usage:
            out += self._event({"choices": [], "usage": usage(counts)})
        return out + DONE


#: A backend's error message in a stream, at most (the router's own cut for error bodies).
MAX_ERROR_MESSAGE = 2000
#: A backend's error code, at most.
MAX_ERROR_CODE = 64


def error_event(message: str, type_: str = "upstream_error", code: object = None) -> bytes:
    """An OpenAI error as an SSE event; the backend's words in ``message`` and
    ``code`` cut (``code`` kept only when it is a string)."""
    kept = code[:MAX_ERROR_CODE] if isinstance(code, str) else None
    body = {
        "error": {
            "message": message[:MAX_ERROR_MESSAGE],
            "type": type_,
            "param": None,
            "code": kept,
        }
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"
