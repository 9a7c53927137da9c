"""NVIDIA Triton serving a TensorRT-LLM ensemble (``kind: triton``), through
Triton's generate extension.

    POST /v2/models/{model}/generate          one JSON answer
    POST /v2/models/{model}/generate_stream   one SSE event per response, no [DONE]

Request fields (names configurable per endpoint, since TensorRT-LLM model
repositories differ): text_input, max_tokens, stream, temperature, top_p,
top_k, seed, stop_words, bad_words. Chats are rendered with the model's chat
template. Shapes as recorded from Triton 2.51 (tests/fixtures/triton):

- an error Triton finds before the model runs is plain JSON ``{"error": ...}``
  with 4xx/5xx, even on generate_stream; a model error on the first response
  is a 400 whose body is one SSE event; a model error later is an extra
  ``data: {"error": ...}`` event inside the 200 stream: every event is checked.
- generate on a decoupled model that sends several responses answers 200 with
  an ``{"error": ...}`` body: that is an error, not an answer.
- the end of a stream is the end of the body; an empty final response sends
  no event.
- ``text_output`` is a delta (TensorRT-LLM's streaming) or the text so far
  (some ensembles): ``output_mode`` says which, ``auto`` detects it from the
  first events (an event that starts with everything seen so far is
  accumulated text).

Usage: with ``token_counts`` on, the request asks for the model's counts
(``return_num_input_tokens``, ``return_num_output_tokens``: optional inputs
of the ensemble in TensorRT-LLM's ``triton_backend/all_models``) and every
response carries ``num_input_tokens`` (the prompt) and ``num_output_tokens``
(the tokens in that response, so a stream's are summed). Where the model gives none,
kvroute counts the prompt it sent and the text it got with the model's
tokenizer (no special tokens added: TensorRT-LLM's preprocessing adds none by
default), or estimates (``backends.tokens``); a stream without a tokenizer
counts one token per response, as TensorRT-LLM streams one decoding step per
response, unless the whole text came in one response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import orjson
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from backends.base import (
    Exchange,
    Load,
    OpenAIRequest,
    Operation,
    Target,
    UpstreamProtocolError,
    Usage,
)
from backends.openai_shapes import ChunkWriter, completion, error_event
from backends.sse import SSEParser, json_events
from backends.templates import ChatTemplate
from backends.tgi import prompt_of, text_only
from backends.tokens import TokenCounter

DEFAULT_FIELDS = {
    "text_input": "text_input",
    "text_output": "text_output",
    "max_tokens": "max_tokens",
    "stream": "stream",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop_words": "stop_words",
    "bad_words": "bad_words",
    "return_num_input_tokens": "return_num_input_tokens",
    "return_num_output_tokens": "return_num_output_tokens",
    "num_input_tokens": "num_input_tokens",
    "num_output_tokens": "num_output_tokens",
}


class TritonOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Field names in the generate request/response, where they differ from
    #: TensorRT-LLM's ensemble (e.g. {"seed": "random_seed"}).
    fields: dict[str, str] = Field(default_factory=dict)
    output_mode: Literal["auto", "delta", "accumulated"] = "auto"
    chat_template: ChatTemplate = "chatml"
    default_max_tokens: int = Field(256, ge=1)
    #: Ask the model for its token counts (``return_num_input_tokens`` and
    #: ``return_num_output_tokens``). Off by default: only recent TensorRT-LLM
    #: ensembles declare these inputs.
    token_counts: bool = False

    def field(self, name: str) -> str:
        return self.fields.get(name, DEFAULT_FIELDS[name])


def parse_triton_load(metrics_text: str) -> Load:
    pending = active = None
    used = max_blocks = tokens_per = None
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "nv_inference_pending_request_count":
                pending = (pending or 0.0) + s.value
            elif s.name == "nv_trt_llm_request_metrics":
                if s.labels.get("request_type") == "active":
                    active = (active or 0.0) + s.value
            elif s.name == "nv_trt_llm_kv_cache_block_metrics":
                kind = s.labels.get("kv_cache_block_type")
                if kind == "used":
                    used = (used or 0.0) + s.value
                elif kind == "max":
                    max_blocks = (max_blocks or 0.0) + s.value
                elif kind == "tokens_per":
                    tokens_per = s.value
    usage = used / max_blocks if used is not None and max_blocks else None
    capacity = int(max_blocks * tokens_per) if max_blocks and tokens_per else None
    return Load(running=active, waiting=pending, kv_usage=usage, kv_capacity_tokens=capacity)


class TritonAdapter:
    kind = "triton"
    serves_every_request = False
    #: Triton serves metrics on a port of its own: set the endpoint's metrics_url.
    metrics_path: str | None = None

    def __init__(self, options: TritonOptions) -> None:
        self.options = options

    def health_paths(self, served: Sequence[str]) -> list[str]:
        return ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in served)]

    def parse_load(self, metrics_text: str) -> Load:
        return parse_triton_load(metrics_text)

    def unsupported(self, request: OpenAIRequest) -> str | None:
        return text_only(request, "Triton")

    def prepare(self, request: OpenAIRequest, target: Target) -> Exchange:
        o = self.options
        sampling = request.sampling
        max_tokens = sampling.max_tokens or o.default_max_tokens
        prompt = prompt_of(request, target.chat_template or o.chat_template)
        payload: dict[str, Any] = {
            o.field("text_input"): prompt,
            o.field("max_tokens"): max_tokens,
            o.field("stream"): request.stream,
        }
        for name, value in (
            ("temperature", sampling.temperature),
            ("top_p", sampling.top_p),
            ("top_k", sampling.top_k),
            ("seed", sampling.seed),
        ):
            if value is not None:
                payload[o.field(name)] = value
        if sampling.stop:
            payload[o.field("stop_words")] = list(sampling.stop)
        if o.token_counts:
            payload[o.field("return_num_input_tokens")] = True
            payload[o.field("return_num_output_tokens")] = True
        route = "generate_stream" if request.stream else "generate"
        chat = request.op is Operation.CHAT
        writer = ChunkWriter(chat, target.model, sampling.include_usage)
        counter = TokenCounter(target.tokenizer, prompt_special_tokens=False)
        translator = TritonTranslator(chat, target.model, writer, o, max_tokens, prompt, counter)
        return Exchange(f"/v2/models/{target.served}/{route}", orjson.dumps(payload), translator)


def count_of(value: Any) -> int | None:
    """A count output: a number (Triton unwraps one-element tensors), or a
    list of one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TritonTranslator:
    """Triton generate answers and generate_stream events -> OpenAI."""

    def __init__(
        self,
        chat: bool,
        model: str,
        writer: ChunkWriter,
        options: TritonOptions,
        max_tokens: int,
        prompt: str,
        counter: TokenCounter,
    ) -> None:
        self.chat = chat
        self.model = model
        self.writer = writer
        self.parser = SSEParser()
        self.output = options.field("text_output")
        self.input_count = options.field("num_input_tokens")
        self.output_count = options.field("num_output_tokens")
        self.mode = options.output_mode
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.counter = counter
        self.text = ""
        self.responses = 0
        #: The model's counts, where its responses carry them.
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.failed = False
        self.usage: Usage | None = None

    def answer(self, data: bytes) -> bytes:
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError("Triton answered with invalid JSON") from exc
        if not isinstance(answer, dict):
            raise UpstreamProtocolError(f"unexpected Triton answer: {data[:200]!r}")
        if "error" in answer:
            raise UpstreamProtocolError(f"Triton: {answer['error']}")
        text = answer.get(self.output)
        if isinstance(text, list):
            text = "".join(str(t) for t in text)
        text = str(text or "")
        generated = count_of(answer.get(self.output_count))
        self.usage = self.counter.usage(
            self.prompt, text, count_of(answer.get(self.input_count)), generated
        )
        finish = "length" if generated is not None and generated >= self.max_tokens else "stop"
        return completion(self.chat, self.model, text, finish, self.usage)

    def feed(self, chunk: bytes) -> bytes:
        return self._events(self.parser.feed(chunk))

    def server_fault(self, status: int, data: bytes) -> bool:
        # Triton answers a model's failure 400 (its first response's error, as
        # one SSE event on generate_stream, or {"error"} on generate). kvroute
        # writes every field of the request itself from checked values, so a
        # 400 is the model's or the endpoint's configuration's failure, not
        # the client's: another endpoint may serve it.
        return status >= 500 or status == 400

    def close(self) -> bytes:
        out = self._events(self.parser.close())
        if self.failed:
            return out
        # The end of the body is the end of the answer: an empty delta carries
        # the finish reason (vLLM does the same).
        usage = self.counter.usage(
            self.prompt, self.text, self.prompt_tokens, self.completion_tokens
        )
        if self.completion_tokens is None and self.counter.tokenizer is None and self.responses > 1:
            # TensorRT-LLM streams a response per decoding step: one token each
            # (several with speculative decoding), a better count than characters.
            usage = replace(usage, completion_tokens=self.responses)
        self.usage = usage
        generated = self.responses if self.completion_tokens is None else self.completion_tokens
        finish = "length" if generated >= self.max_tokens else "stop"
        return out + self.writer.delta("", finish) + self.writer.end(usage)

    def _delta(self, value: str) -> str:
        if self.mode == "auto" and self.responses >= 1:
            # Accumulated text is longer than, and starts with, everything so far
            # (two equal deltas in a row, "ab" then "ab", are not accumulation).
            grows = len(value) > len(self.text) and value.startswith(self.text)
            self.mode = "accumulated" if self.text and grows else "delta"
        if self.mode == "accumulated":
            delta = value[len(self.text) :] if value.startswith(self.text) else value
            self.text = value
            return delta
        self.text += value
        return value

    def _events(self, events: list[bytes]) -> bytes:
        out = b""
        for event in json_events(events):
            if self.failed:
                break
            if "error" in event:
                self.failed = True
                out += error_event(f"Triton: {event['error']}")
                break
            value = event.get(self.output)
            if isinstance(value, list):
                value = "".join(str(v) for v in value)
            if not isinstance(value, str):
                continue
            delta = self._delta(value)
            self.responses += 1
            if (prompt := count_of(event.get(self.input_count))) is not None:
                self.prompt_tokens = prompt
            if (generated := count_of(event.get(self.output_count))) is not None:
                self.completion_tokens = (self.completion_tokens or 0) + generated
            if delta:
                out += self.writer.delta(delta)
        return out
