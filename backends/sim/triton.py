"""The Triton face of the simulator: Triton 2.51's HTTP/REST API for a
decoupled TensorRT-LLM-style model, shapes as recorded in tests/fixtures/triton.

    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{m}, /v2/models/{m}/config, /v2/models/{m}/ready
    POST /v2/models/{m}/generate, /v2/models/{m}/generate_stream
    GET  /metrics   (nv_inference_*, nv_trt_llm_*; a real Triton serves them on
                     a port of its own)

What it copies: JSON errors before the model runs (unknown model 404, missing
inputs 400, bad JSON 500), a model error on the first response as a 400 with
one SSE event, errors later as an extra event in the 200 stream, no [DONE],
one event per response with ``text_output`` as a delta, an empty body for
max_tokens 0, and ``generate`` on this decoupled model answering 200 with an
error when the model sends more than one response.

By default the model is the recorded one (six inputs). With
``token_counts=True`` it is a TensorRT-LLM ensemble as shipped since mid-2025:
it also declares ``top_k``, ``seed``, ``bad_words`` and the optional BOOL
inputs ``return_num_input_tokens`` / ``return_num_output_tokens``, and when
those are true every response carries the INT32 outputs ``num_input_tokens``
(the prompt's tokens) and ``num_output_tokens`` (the tokens in that response).
Elsewhere such fields match no input and are ignored, as Triton ignores them.
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
    tokens,
    until_disconnect,
)
from backends.sim.engine import Engine, EngineParams, PromptTooLong, Sequence_

INPUTS = (
    "text_input",
    "max_tokens",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop_words",
    "bad_words",
)
COUNT_INPUTS = ("return_num_input_tokens", "return_num_output_tokens")
#: Inputs as the model declares them: (Triton datatype, shape), required first.
RECORDED_INPUTS = {
    "text_input": ("BYTES", [1]),
    "max_tokens": ("INT32", [1]),
    "stream": ("BOOL", [1]),
    "temperature": ("FP32", [1]),
    "top_p": ("FP32", [1]),
    "stop_words": ("BYTES", [-1]),
}
TRTLLM_INPUTS = {
    **RECORDED_INPUTS,
    "top_k": ("INT32", [1]),
    "seed": ("UINT64", [1]),
    "bad_words": ("BYTES", [-1]),
    "return_num_input_tokens": ("BOOL", [1]),
    "return_num_output_tokens": ("BOOL", [1]),
}
RECORDED_OUTPUTS = {"text_output": ("BYTES", [-1])}
TRTLLM_OUTPUTS = {
    **RECORDED_OUTPUTS,
    "num_input_tokens": ("INT32", [1]),
    "num_output_tokens": ("INT32", [1]),
}
REQUIRED = ("text_input", "max_tokens")
CONFIG_TYPES = {
    "BYTES": "TYPE_STRING",
    "INT32": "TYPE_INT32",
    "BOOL": "TYPE_BOOL",
    "FP32": "TYPE_FP32",
    "UINT64": "TYPE_UINT64",
}
SSE = "text/event-stream; charset=utf-8"


def json_bytes(body: Any, status: int = 200, media_type: str = "application/json") -> Response:
    # Set the header itself: Starlette would add a charset to text/plain.
    return Response(orjson.dumps(body), status_code=status, headers={"content-type": media_type})


def empty(status: int = 200) -> Response:
    return Response(status_code=status, headers={"content-type": "text/plain"})


def sse(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class TritonSimulator:
    def __init__(
        self,
        models: Sequence[str],
        params: EngineParams | None = None,
        faults: Faults | None = None,
        token_counts: bool = False,
    ) -> None:
        self.models = list(models)
        self.token_counts = token_counts
        self.inputs = TRTLLM_INPUTS if token_counts else RECORDED_INPUTS
        self.outputs = TRTLLM_OUTPUTS if token_counts else RECORDED_OUTPUTS
        self.engine = Engine(params or EngineParams())
        self.faults = faults or Faults()
        self.fault_state = FaultState(self.faults, self.engine.params.seed + 2)
        self.success: dict[str, int] = dict.fromkeys(self.models, 0)
        faults_route, stats_route = fault_routes_handlers(self.faults, self.engine)
        self.app = Starlette(
            routes=[
                Route("/v2", self.server_metadata),
                Route("/v2/health/live", self.live),
                Route("/v2/health/ready", self.live),
                Route("/v2/models/{model}", self.model_metadata),
                Route("/v2/models/{model}/config", self.model_config),
                Route("/v2/models/{model}/ready", self.model_ready),
                Route("/v2/models/{model}/generate", self.generate, methods=["GET", "POST"]),
                Route(
                    "/v2/models/{model}/generate_stream",
                    self.generate_stream,
                    methods=["GET", "POST"],
                ),
                Route("/metrics", self.metrics),
                Route("/sim/faults", faults_route, methods=["GET", "POST"]),
                Route("/sim/stats", stats_route),
            ],
            lifespan=engine_lifespan(self.engine),
        )

    # -- metadata and health -------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return json_bytes(
            {
                "name": "triton",
                "version": "2.51.0",
                "extensions": [
                    "classification",
                    "sequence",
                    "model_repository",
                    "schedule_policy",
                    "model_configuration",
                    "system_shared_memory",
                    "cuda_shared_memory",
                    "binary_tensor_data",
                    "parameters",
                    "statistics",
                    "trace",
                    "logging",
                ],
            }
        )

    async def live(self, request: Request) -> Response:
        return empty(400 if self.faults.unhealthy else 200)

    def _unknown(self, model: str) -> Response:
        return json_bytes({"error": f"Request for unknown model: '{model}' is not found"}, 404)

    async def model_ready(self, request: Request) -> Response:
        if request.path_params["model"] not in self.models or self.faults.unhealthy:
            return json_bytes({"error": "Model version not ready"}, 400, "text/plain")
        return empty()

    async def model_metadata(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self.models:
            return self._unknown(model)
        return json_bytes(
            {
                "name": model,
                "versions": ["1"],
                "platform": "python",
                "inputs": [
                    {"name": n, "datatype": t, "shape": s} for n, (t, s) in self.inputs.items()
                ],
                "outputs": [
                    {"name": n, "datatype": t, "shape": s} for n, (t, s) in self.outputs.items()
                ],
            }
        )

    async def model_config(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self.models:
            return self._unknown(model)
        return json_bytes(
            {
                "name": model,
                "platform": "",
                "backend": "python",
                "max_batch_size": 0,
                "input": [
                    {
                        "name": n,
                        "data_type": CONFIG_TYPES[t],
                        "dims": s,
                        "optional": n not in REQUIRED,
                    }
                    for n, (t, s) in self.inputs.items()
                ],
                "output": [
                    {"name": n, "data_type": CONFIG_TYPES[t], "dims": s}
                    for n, (t, s) in self.outputs.items()
                ],
                "model_transaction_policy": {"decoupled": True},
            }
        )

    async def metrics(self, request: Request) -> Response:
        e = self.engine
        cache = e.cache
        lines = [
            "# HELP nv_inference_request_success Number of successful inference requests,"
            " all batch sizes",
            "# TYPE nv_inference_request_success counter",
        ]
        lines += [
            f'nv_inference_request_success{{model="{m}",version="1"}} {n}'
            for m, n in self.success.items()
        ]
        lines += [
            "# HELP nv_inference_pending_request_count Instantaneous number of pending"
            " requests awaiting execution per-model.",
            "# TYPE nv_inference_pending_request_count gauge",
            f'nv_inference_pending_request_count{{model="{self.models[0]}",version="1"}} '
            f"{len(e.waiting)}",
            "# TYPE nv_trt_llm_request_metrics gauge",
        ]
        for kind, value in (
            ("active", len(e.running)),
            ("max", e.params.max_num_seqs),
            ("scheduled", len(e.running)),
            ("context", 0),
        ):
            lines.append(
                f'nv_trt_llm_request_metrics{{model="tensorrt_llm",request_type='
                f'"{kind}",version="1"}} {value}'
            )
        lines.append("# TYPE nv_trt_llm_kv_cache_block_metrics gauge")
        for kind, value in (
            ("max", cache.usable_blocks),
            ("free", cache.free_blocks),
            ("used", cache.used_blocks),
            ("tokens_per", cache.block_size),
        ):
            lines.append(
                f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="{kind}",'
                f'model="tensorrt_llm",version="1"}} {value}'
            )
        return Response(("\n".join(lines) + "\n").encode(), media_type="text/plain")

    # -- generate ---------------------------------------------------------------------

    async def _parse(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        model = request.path_params["model"]
        if request.method != "POST":
            return json_bytes({"error": "Method Not Allowed"}, 405)
        if model not in self.models:
            return self._unknown(model)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return json_bytes(
                {"error": f"failed to parse the request JSON buffer: {exc.msg}. at {exc.pos}"}, 500
            )
        if not isinstance(body, dict):
            return json_bytes({"error": "failed to parse the request JSON buffer"}, 500)
        given = [k for k in (*INPUTS, *self._count_inputs()) if k in body]
        most = len(self.inputs)
        if not 2 <= len(given) <= most or "text_input" not in body:
            missing = [k for k in REQUIRED if k not in body]
            return json_bytes(
                {
                    "error": (
                        "[request id: <id_unknown>] expected number of inputs between 2 "
                        f"and {most} but got {len(given)} inputs for model '{model}'. Got "
                        f"input(s) {given}, but missing required input(s) {missing}. "
                        "Please provide all required input(s)."
                    )
                },
                400,
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and not isinstance(max_tokens, int):
            return json_bytes(
                {
                    "error": "Unable to parse 'data': attempt to access JSON "
                    "non-signed-integer as signed-integer"
                },
                500,
            )
        return model, body

    def _count_inputs(self) -> tuple[str, ...]:
        return COUNT_INPUTS if self.token_counts else ()

    def _counts(self, body: dict[str, Any], seq: Sequence_, generated: int) -> dict[str, int]:
        """The count outputs a response carries, as the request asked for them."""
        counts = {}
        if self.token_counts and body.get("return_num_input_tokens") is True:
            counts["num_input_tokens"] = seq.num_prompt
        if self.token_counts and body.get("return_num_output_tokens") is True:
            counts["num_output_tokens"] = generated
        return counts

    def _model_error(self, body: dict[str, Any]) -> str | None:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return "max_tokens is required"
        if max_tokens < 0:
            return f"max_tokens must be >= 0, got {max_tokens}"
        if self.fault_state.should_fail():
            return "simulated failure"
        return None

    def _submit(self, body: dict[str, Any]) -> Sequence_ | str:
        seed = body.get("seed")
        try:
            return self.engine.submit(
                str(body["text_input"]),
                int(body["max_tokens"]),
                seed if isinstance(seed, int) else None,
            )
        except PromptTooLong as exc:
            return str(exc)

    async def generate(self, request: Request) -> Response:
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        model, body = parsed
        error = self._model_error(body)
        if error is not None:
            return json_bytes({"error": error}, 400)
        if self.faults.stall and not await until_disconnect(request, self.fault_state.stall()):
            return Response(status_code=499)
        streaming = body.get("stream", True) is not False
        if streaming and body["max_tokens"] > 1:
            # A decoupled model sending several responses: Triton's generate refuses.
            self.success[model] += 1
            return json_bytes(
                {
                    "error": "generate expects model to produce exactly 1 response, "
                    "use generate stream for model that generates various number "
                    "of responses"
                }
            )
        seq = self._submit(body)
        if isinstance(seq, str):
            return json_bytes({"error": seq}, 400)
        out = await until_disconnect(request, collect(self.engine, seq))
        if out is None:
            return Response(status_code=499)
        self.success[model] += 1
        answer = {"model_name": model, "model_version": "1", "text_output": "".join(out)}
        return json_bytes(answer | self._counts(body, seq, len(out)))

    async def generate_stream(self, request: Request) -> Response:
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        model, body = parsed
        error = self._model_error(body)
        if error is not None:
            self.success[model] += 1  # Triton counts model errors as successes
            return Response(sse({"error": error}), status_code=400, media_type=SSE)
        if self.faults.stall and not await until_disconnect(request, self.fault_state.stall()):
            return Response(status_code=499)
        if body["max_tokens"] == 0:
            self.success[model] += 1
            return Response(b"", media_type=SSE)
        seq = self._submit(body)
        if isinstance(seq, str):
            return Response(sse({"error": seq}), status_code=400, media_type=SSE)
        return StreamingResponse(self._stream(model, seq, body), media_type=SSE)

    async def _stream(
        self, model: str, seq: Sequence_, body: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        streaming = body.get("stream", True) is not False
        die_after = self.faults.die_after_chunks
        head = {"model_name": model, "model_version": "1"}
        sent = 0
        whole: list[str] = []
        try:
            async for token in tokens(self.engine, seq):
                if die_after >= 0 and sent >= die_after:
                    raise SimulatedCrash("die_after_chunks")
                if not streaming:
                    whole.append(token)
                    continue
                yield sse({**head, "text_output": token, **self._counts(body, seq, 1)})
                sent += 1
            if not streaming:
                counts = self._counts(body, seq, len(whole))
                yield sse({**head, "text_output": "".join(whole), **counts})
        finally:
            self.success[model] += 1
