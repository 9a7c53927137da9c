"""Hugging Face TGI (``kind: tgi``).

``api: messages`` passes OpenAI requests to TGI's own ``/v1/chat/completions``
(like any OpenAI server). ``api: generate`` (the default) speaks TGI's native
API: the chat is rendered to one prompt with the model's chat template, sent
to ``/generate`` or ``/generate_stream``, and the answer translated back:

    max_tokens -> max_new_tokens; temperature, top_p, seed, stop (at most 4),
    frequency_penalty passed on; details on.
    finish_reason length | eos_token | stop_sequence -> length | stop | stop.
    usage: generated_tokens from details; prompt tokens from details'
    input_length where TGI sends it (its stream details do), else 0.

Errors: TGI's ``{"error", "error_type"}`` bodies (422 validation, 424
generation, 429 overloaded) become OpenAI errors at the boundary; an error
event inside a stream becomes an OpenAI error event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict

from backends.base import Load, StreamTranslator, Target, UpstreamProtocolError, UpstreamRequest
from backends.openai import OpenAIAdapter
from backends.openai_shapes import ChunkWriter, completion, error_event, max_tokens_of, stop_of
from backends.sse import SSEParser, json_events
from backends.templates import render

FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
MAX_STOP = 4  # TGI's default --max-stop-sequences


class TGIOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api: Literal["generate", "messages"] = "generate"
    #: Chat template for models that name none (a preset or Jinja2 source).
    chat_template: str = "chatml"
    #: max_new_tokens when the client sets no max_tokens.
    default_max_tokens: int = 256


def prompt_of(path: str, body: Mapping[str, Any], template: str) -> str:
    if path.endswith("chat/completions"):
        messages = body.get("messages")
        return render(template, messages if isinstance(messages, list) else [])
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


def parse_tgi_load(metrics_text: str) -> Load:
    queue = batch = None
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "tgi_queue_size":
                queue = (queue or 0.0) + sample.value
            elif sample.name == "tgi_batch_current_size":
                batch = (batch or 0.0) + sample.value
    return Load(running=batch, waiting=queue)


class TGIAdapter:
    kind = "tgi"
    metrics_path: str | None = "/metrics"

    def __init__(self, options: TGIOptions) -> None:
        self.options = options
        self._messages = OpenAIAdapter()

    def health_paths(self, served: Sequence[str]) -> list[str]:
        return ["/health"]

    def parse_load(self, metrics_text: str) -> Load:
        return parse_tgi_load(metrics_text)

    def _native(self, path: str) -> bool:
        return self.options.api == "generate" or not path.endswith("chat/completions")

    def build(
        self,
        base_url: str,
        path: str,
        raw: bytes,
        body: Mapping[str, Any],
        target: Target,
        headers: Mapping[str, str],
    ) -> UpstreamRequest:
        if not self._native(path):
            return self._messages.build(base_url, path, raw, body, target, headers)
        template = target.chat_template or self.options.chat_template
        params: dict[str, Any] = {
            "max_new_tokens": max_tokens_of(body, self.options.default_max_tokens),
            "details": True,
        }
        for name in ("temperature", "top_p", "seed", "frequency_penalty"):
            if body.get(name) is not None:
                params[name] = body[name]
        if isinstance(params.get("temperature"), int | float) and params["temperature"] == 0:
            del params["temperature"]  # TGI wants > 0; 0 means greedy, its default
        if stop := stop_of(body):
            params["stop"] = stop[:MAX_STOP]
        stream = body.get("stream") is True
        payload = {"inputs": prompt_of(path, body, template), "parameters": params}
        route = "/generate_stream" if stream else "/generate"
        return UpstreamRequest(base_url + route, orjson.dumps(payload), headers)

    def translate_json(
        self, path: str, body: Mapping[str, Any], target: Target, data: bytes
    ) -> bytes:
        if not self._native(path):
            return data
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError("TGI answered with invalid JSON") from exc
        if isinstance(answer, list) and answer:
            answer = answer[0]
        if not isinstance(answer, dict) or "generated_text" not in answer:
            raise UpstreamProtocolError(f"unexpected TGI answer: {data[:200]!r}")
        details = answer.get("details") or {}
        return completion(
            path.endswith("chat/completions"),
            target.model,
            str(answer["generated_text"]),
            FINISH.get(details.get("finish_reason", ""), "stop"),
            prompt_tokens_of(details),
            int(details.get("generated_tokens") or 0),
        )

    def stream_translator(
        self, path: str, body: Mapping[str, Any], target: Target
    ) -> StreamTranslator | None:
        if not self._native(path):
            return None
        return TGIStream(ChunkWriter(path.endswith("chat/completions"), target.model, body))


def prompt_tokens_of(details: Mapping[str, Any]) -> int:
    if isinstance(details.get("input_length"), int):
        return int(details["input_length"])
    prefill = details.get("prefill")
    return len(prefill) if isinstance(prefill, list) else 0


class TGIStream:
    """TGI ``generate_stream`` events -> OpenAI chunks."""

    def __init__(self, writer: ChunkWriter) -> None:
        self.writer = writer
        self.parser = SSEParser()
        self.generated = 0
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        return self._events(self.parser.feed(chunk))

    def close(self) -> bytes:
        out = self._events(self.parser.close())
        if not self.done:
            self.done = True
            out += error_event("TGI stream ended without its final event")
        return out

    def _events(self, events: list[bytes]) -> bytes:
        out = b""
        for event in json_events(events):
            if self.done:
                break
            if "error" in event:
                self.done = True
                out += error_event(str(event["error"]), "upstream_error", event.get("error_type"))
                break
            token = event.get("token") or {}
            details = event.get("details")
            text = "" if token.get("special") else str(token.get("text", ""))
            self.generated += 1
            if details:
                finish = FINISH.get(details.get("finish_reason", ""), "stop")
                generated = int(details.get("generated_tokens") or self.generated)
                out += self.writer.delta(text, finish)
                out += self.writer.end(prompt_tokens_of(details), generated)
                self.done = True
            else:
                out += self.writer.delta(text)
        return out
