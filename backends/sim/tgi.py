"""The TGI face of the simulator: Hugging Face text-generation-inference's API.

    POST /generate           {"generated_text", "details"}
    POST /generate_stream    SSE, ``data:{...}`` per token; the last carries
                             generated_text and details
    POST /                   TGI's compat route: a list for generate, SSE for stream
    POST /v1/chat/completions   the Messages API (OpenAI shapes)
    GET  /health, /info, /metrics (tgi_queue_size, tgi_batch_current_size, ...)

Errors are TGI's ``{"error", "error_type"}``: 422 validation, 424 generation,
429 overloaded. The shapes follow TGI's router types (the ``text-generation``
client parses them; tests prove it): ``details`` only when asked for
(``details`` or ``decoder_input_details``); with ``decoder_input_details``,
``details.prefill`` lists the prompt's tokens, the first with a null logprob,
as a TGI launched with ``--enable-prefill-logprobs`` does
(``prefill_logprobs=False``: TGI 3's default, an empty list); on a stream that
option is refused with an error event in a 200 stream, as TGI does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
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
from backends.sim.tokenizer import token_ids, tokenize
from backends.sim.vllm import VLLMSimulator
from backends.tokens import load_tokenizer

FINISH = {"length": "length", "stop": "eos_token"}
PREFILL_DETAILS_STREAM = (
    "Input validation error: `decoder_input_details` == true is not supported when streaming tokens"
)


def tgi_error(message: str, error_type: str, status: int) -> Response:
    return json_response({"error": message, "error_type": error_type}, status)


def token_json(text: str, index: int) -> dict[str, Any]:
    return {
        "id": token_ids([text])[0],
        "text": text,
        "logprob": -0.5 - (index % 7) / 10,
        "special": False,
    }


def prefill_json(pieces: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
    """TGI's ``details.prefill``: the first token has no logprob (TGI sends NaN,
    which serialises as null)."""
    return [
        {"id": i, "text": text, "logprob": None if n == 0 else -1.0 - (n % 5) / 10}
        for n, (i, text) in enumerate(pieces)
    ]


class TGISimulator:
    def __init__(
        self,
        models: Sequence[str],
        params: EngineParams | None = None,
        faults: Faults | None = None,
        prefill_logprobs: bool = True,
    ) -> None:
        self.models = list(models)
        #: Whether decoder_input_details fills ``details.prefill`` (TGI 3 does
        #: only with --enable-prefill-logprobs).
        self.prefill_logprobs = prefill_logprobs
        self.faults = faults or Faults()
        # The Messages API speaks OpenAI: the vLLM face's handlers, on this engine.
        self.messages = VLLMSimulator(models, params, self.faults)
        self.engine: Engine = self.messages.engine
        self.fault_state = FaultState(self.faults, self.engine.params.seed + 1)
        faults_route, stats_route = fault_routes_handlers(self.faults, self.engine)
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/info", self.info),
                Route("/metrics", self.metrics),
                Route("/generate", self.generate, methods=["POST"]),
                Route("/generate_stream", self.generate_stream, methods=["POST"]),
                Route("/", self.compat, methods=["POST"]),
                Route("/v1/chat/completions", self.messages.chat, methods=["POST"]),
                Route("/v1/models", self.messages.list_models),
                Route("/sim/faults", faults_route, methods=["GET", "POST"]),
                Route("/sim/stats", stats_route),
            ],
            lifespan=engine_lifespan(self.engine),
        )

    async def health(self, request: Request) -> Response:
        return Response(status_code=503 if self.faults.unhealthy else 200)

    async def info(self, request: Request) -> Response:
        p = self.engine.params
        return json_response(
            {
                "model_id": self.models[0],
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": 128,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_tokens": p.max_model_len - 1,
                "max_total_tokens": p.max_model_len,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": "3.0.0-sim",
                "sha": None,
                "docker_label": None,
            }
        )

    async def metrics(self, request: Request) -> Response:
        e = self.engine
        lines = [
            "# TYPE tgi_queue_size gauge",
            f"tgi_queue_size {float(len(e.waiting))}",
            "# TYPE tgi_batch_current_size gauge",
            f"tgi_batch_current_size {float(len(e.running))}",
            "# TYPE tgi_request_count counter",
            f"tgi_request_count {float(e.stats.requests)}",
            "# TYPE tgi_request_success counter",
            f"tgi_request_success {float(e.stats.finished['length'] + e.stats.finished['stop'])}",
            "# TYPE tgi_request_input_length_sum counter",
            f"tgi_request_input_length_sum {float(e.stats.prompt_tokens)}",
        ]
        return Response(("\n".join(lines) + "\n").encode(), media_type="text/plain")

    async def _parse(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return Response(f"Failed to parse the request body as JSON: {exc}", 422)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            return tgi_error("Input validation error: `inputs` must be a string", "validation", 422)
        params = body.get("parameters") or {}
        max_new = params.get("max_new_tokens", 100)
        if not isinstance(max_new, int) or max_new < 1:
            return tgi_error(
                "Input validation error: `max_new_tokens` must be strictly positive",
                "validation",
                422,
            )
        stop = params.get("stop") or []
        if len(stop) > 4:
            return tgi_error(
                f"Input validation error: `stop` supports up to 4 stop sequences. Given: "
                f"{len(stop)}",
                "validation",
                422,
            )
        if self.fault_state.should_fail():
            status = self.faults.fail_status
            kind = "overloaded" if status == 429 else "generation"
            failure = tgi_error("simulated failure", kind, status if status != 500 else 424)
            failure.headers.update(self.faults.failure_headers())
            return failure
        return body["inputs"], params

    async def _start(self, request: Request) -> tuple[Sequence_, str, dict[str, Any]] | Response:
        """Parse, apply the stall knob, submit: the sequence, its prompt and
        parameters, or the answer to give."""
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        prompt, params = parsed
        if self.faults.stall and not await until_disconnect(request, self.fault_state.stall()):
            return Response(status_code=499)
        seq = self._submit(prompt, params)
        return seq if isinstance(seq, Response) else (seq, prompt, params)

    def _submit(self, prompt: str, params: dict[str, Any]) -> Sequence_ | Response:
        seed = params.get("seed")
        try:
            return self.engine.submit(
                prompt, params.get("max_new_tokens", 100), seed if isinstance(seed, int) else None
            )
        except PromptTooLong:
            return tgi_error(
                f"Input validation error: `inputs` must have less than "
                f"{self.engine.params.max_model_len} tokens",
                "validation",
                422,
            )

    def _prompt_pieces(self, prompt: str) -> list[tuple[int, str]]:
        """The prompt's tokens as the engine counts them: (id, text) each."""
        path = self.engine.params.tokenizer
        if path is None:
            texts = tokenize(prompt)
            return list(zip(token_ids(texts), texts, strict=True))
        tokenizer = load_tokenizer(path)
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(zip(ids, tokenizer.decode_batch([[i] for i in ids]), strict=True))

    async def generate(self, request: Request) -> Response:
        return await self._generate(request, as_list=False)

    async def _generate(self, request: Request, as_list: bool) -> Response:
        started = await self._start(request)
        if isinstance(started, Response):
            return started
        seq, prompt, params = started
        out = await until_disconnect(request, collect(self.engine, seq))
        if out is None:
            return Response(status_code=499)
        answer: dict[str, Any] = {"generated_text": "".join(out)}
        prefill_details = params.get("decoder_input_details") is True
        if params.get("details") is True or prefill_details:
            prefill = []
            if prefill_details and self.prefill_logprobs:
                prefill = prefill_json(self._prompt_pieces(prompt))
            answer["details"] = {
                "finish_reason": FINISH[seq.finish_reason],
                "generated_tokens": len(out),
                "seed": params.get("seed"),
                "prefill": prefill,
                "tokens": [token_json(t, i) for i, t in enumerate(out)],
            }
        return json_response([answer] if as_list else answer)

    async def generate_stream(self, request: Request) -> Response:
        try:
            params = (orjson.loads(await request.body()).get("parameters")) or {}
        except (orjson.JSONDecodeError, AttributeError):
            params = {}
        if isinstance(params, dict) and params.get("decoder_input_details") is True:
            # TGI checks this inside its stream: a 200 whose one event is the error.
            refusal = {"error": PREFILL_DETAILS_STREAM, "error_type": "validation"}
            body = b"data:" + orjson.dumps(refusal) + b"\n\n"
            return Response(body, media_type="text/event-stream")
        started = await self._start(request)
        if isinstance(started, Response):
            return started
        seq, _, params = started
        return StreamingResponse(self._stream(seq, params), media_type="text/event-stream")

    async def _stream(self, seq: Sequence_, params: dict[str, Any]) -> AsyncIterator[bytes]:
        die_after = self.faults.die_after_chunks
        text: list[str] = []
        async for token in tokens(self.engine, seq):
            if die_after >= 0 and len(text) >= die_after:
                raise SimulatedCrash("die_after_chunks")
            text.append(token)
            last = len(text) == seq.max_tokens
            event: dict[str, Any] = {
                "index": len(text),
                "token": token_json(token, len(text)),
                "generated_text": None,
                "details": None,
            }
            if last:
                event["generated_text"] = "".join(text)
            if last and params.get("details") is True:
                event["details"] = {
                    "finish_reason": FINISH[seq.finish_reason],
                    "generated_tokens": len(text),
                    "seed": params.get("seed"),
                    "input_length": seq.num_prompt,
                }
            yield b"data:" + orjson.dumps(event) + b"\n\n"

    async def compat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            stream = bool(orjson.loads(raw).get("stream"))
        except (orjson.JSONDecodeError, AttributeError):
            stream = False
        if stream:
            return await self.generate_stream(request)
        return await self._generate(request, as_list=True)
