"""OpenAI response shapes, for adapters that translate from other protocols."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def max_tokens_of(body: Mapping[str, Any], default: int) -> int:
    """The request's output cap (``max_tokens`` or ``max_completion_tokens``)."""
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    return value if isinstance(value, int) else default


def stop_of(body: Mapping[str, Any]) -> list[str]:
    """The request's stop sequences, as a list (OpenAI allows one string too)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str)]
    return []


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    chat: bool,
    model: str,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
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
            "usage": usage(prompt_tokens, completion_tokens),
        }
    )


class ChunkWriter:
    """OpenAI stream chunks for one response: the role first, deltas, the finish,
    the usage chunk when asked for, ``[DONE]``."""

    def __init__(self, chat: bool, model: str, body: Mapping[str, Any]) -> None:
        self.chat = chat
        options = body.get("stream_options")
        self.include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
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

    def end(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = b""
        if self.include_usage:
            out += self._event({"choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        return out + DONE


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"
