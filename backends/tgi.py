"""Hugging Face TGI (``kind: tgi``).

``api: messages`` passes OpenAI requests to TGI's own ``/v1/chat/completions``
(like any OpenAI server). ``api: generate`` (the default) speaks TGI's native
API: the chat is rendered to one prompt with the model's chat template, sent
to ``/generate`` or ``/generate_stream``, and the answer translated back:

    max_tokens -> max_new_tokens; temperature, top_p, seed, stop (at most 4),
    frequency_penalty passed on; details on.
    finish_reason length | eos_token | stop_sequence -> length | stop | stop.

Usage: completion tokens are TGI's ``generated_tokens``. Prompt tokens are
TGI's where it reports them: ``input_length`` in a stream's final details,
and, for whole answers with ``decoder_input_details`` on, the length of
``details.prefill`` (one entry per prompt token; TGI refuses the option on
streams, and TGI 3 leaves ``prefill`` empty unless launched with
``--enable-prefill-logprobs``). Otherwise kvroute counts the prompt it sent
with the model's tokenizer (special tokens added, as TGI does), or estimates
(``backends.tokens``).

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

from backends.base import (
    Exchange,
    Load,
    OpenAIRequest,
    Operation,
    Target,
    UpstreamProtocolError,
    Usage,
)
from backends.openai import OpenAIAdapter
from backends.openai_shapes import ChunkWriter, completion, error_event
from backends.sse import SSEParser, json_events
from backends.templates import ChatTemplate, render
from backends.tokens import TokenCounter

FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
MAX_STOP = 4  # TGI's default --max-stop-sequences


class TGIOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api: Literal["generate", "messages"] = "generate"
    #: Chat template for models that name none (a preset or Jinja2 source).
    chat_template: ChatTemplate = "chatml"
    #: max_new_tokens when the client sets no max_tokens.
    default_max_tokens: int = 256
    #: Ask for ``decoder_input_details`` on whole (non-streamed) answers, so
    #: TGI lists the prompt's tokens and usage counts them. Off by default:
    #: TGI 3 lists them only when launched with ``--enable-prefill-logprobs``,
    #: and computing them costs GPU memory on long prompts.
    decoder_input_details: bool = False


def prompt_of(request: OpenAIRequest, template: str) -> str:
    """The one prompt string a text-generation backend gets for ``request``."""
    if request.op is Operation.CHAT:
        return render(template, request.body["messages"])
    prompt = request.body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


def text_only(request: OpenAIRequest, kind: str) -> str | None:
    """Why a text-generation backend cannot serve ``request``, or None."""
    if not request.op.generates:
        return f"{kind} endpoints do not serve {request.op.path}"
    if request.sampling.n != 1:
        return f"{kind} endpoints generate one choice per request (n must be 1)"
    return None


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
    serves_every_request = False
    metrics_path: str | None = "/metrics"

    def __init__(self, options: TGIOptions) -> None:
        self.options = options
        self._messages = OpenAIAdapter()

    def health_paths(self, served: Sequence[str]) -> list[str]:
        return ["/health"]

    def parse_load(self, metrics_text: str) -> Load:
        return parse_tgi_load(metrics_text)

    def unsupported(self, request: OpenAIRequest) -> str | None:
        if self.options.api == "messages" and request.op is Operation.CHAT:
            return None
        return text_only(request, "TGI")

    def prepare(self, request: OpenAIRequest, target: Target) -> Exchange:
        if self.options.api == "messages" and request.op is Operation.CHAT:
            return self._messages.prepare(request, target)
        sampling = request.sampling
        params: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens or self.options.default_max_tokens,
            "details": True,
        }
        # TGI wants temperature > 0; 0 means greedy, its default.
        if sampling.temperature:
            params["temperature"] = sampling.temperature
        for name, value in (
            ("top_p", sampling.top_p),
            ("seed", sampling.seed),
            ("frequency_penalty", sampling.frequency_penalty),
        ):
            if value is not None:
                params[name] = value
        if sampling.stop:
            params["stop"] = list(sampling.stop[:MAX_STOP])
        if self.options.decoder_input_details and not request.stream:
            params["decoder_input_details"] = True
        template = target.chat_template or self.options.chat_template
        prompt = prompt_of(request, template)
        payload = {"inputs": prompt, "parameters": params}
        chat = request.op is Operation.CHAT
        writer = ChunkWriter(chat, target.model, sampling.include_usage)
        # TGI tokenizes its inputs with special tokens (BOS) added.
        counter = TokenCounter(target.tokenizer, prompt_special_tokens=True)
        translator = TGITranslator(chat, target.model, writer, prompt, counter)
        path = "/generate_stream" if request.stream else "/generate"
        return Exchange(path, orjson.dumps(payload), translator)


def count_of(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def prompt_tokens_of(details: Mapping[str, Any]) -> int | None:
    """TGI's own prompt count, where its details carry one."""
    if (length := count_of(details.get("input_length"))) is not None:
        return length
    prefill = details.get("prefill")
    return len(prefill) if isinstance(prefill, list) and prefill else None


class TGITranslator:
    """TGI ``generate`` answers and ``generate_stream`` events -> OpenAI."""

    def __init__(
        self, chat: bool, model: str, writer: ChunkWriter, prompt: str, counter: TokenCounter
    ) -> None:
        self.chat = chat
        self.model = model
        self.writer = writer
        self.prompt = prompt
        self.counter = counter
        self.parser = SSEParser()
        self.generated = 0
        self.done = False
        self.usage: Usage | None = None

    def answer(self, data: bytes) -> bytes:
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError("TGI answered with invalid JSON") from exc
        if isinstance(answer, list) and answer:
            answer = answer[0]
        if not isinstance(answer, dict) or "generated_text" not in answer:
            raise UpstreamProtocolError(f"unexpected TGI answer: {data[:200]!r}")
        details = answer.get("details") or {}
        if not isinstance(details, dict):
            raise UpstreamProtocolError("TGI answer's details are not an object")
        text = str(answer["generated_text"])
        self.usage = self.counter.usage(
            self.prompt, text, prompt_tokens_of(details), count_of(details.get("generated_tokens"))
        )
        finish = FINISH.get(details.get("finish_reason", ""), "stop")
        return completion(self.chat, self.model, text, finish, self.usage)

    def feed(self, chunk: bytes) -> bytes:
        return self._events(self.parser.feed(chunk))

    def server_fault(self, status: int, data: bytes) -> bool:
        # TGI answers a failed generation 424 (Failed Dependency): the engine's
        # failure, not the request's (that is 422).
        return status >= 500 or status == 424

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
            if not isinstance(token, dict) or not isinstance(details, dict | None):
                raise UpstreamProtocolError(f"malformed TGI stream event: {str(event)[:200]}")
            text = "" if token.get("special") else str(token.get("text", ""))
            self.generated += 1
            if details:
                finish = FINISH.get(details.get("finish_reason", ""), "stop")
                generated = count_of(details.get("generated_tokens")) or self.generated
                self.usage = self.counter.usage(
                    self.prompt,
                    str(event.get("generated_text") or ""),
                    prompt_tokens_of(details),
                    generated,
                )
                out += self.writer.delta(text, finish)
                out += self.writer.end(self.usage)
                self.done = True
            else:
                out += self.writer.delta(text)
        return out
