"""The caps stage: what one request may ask of its model.

``n`` and ``max_tokens`` are bounded per model (``models.<name>.limits``, else
``requests``). A request over a cap is the client's error (400 with
``param``); the length checked is the one the engine will use
(``max_completion_tokens`` before ``max_tokens`` in a chat, as vLLM and
OpenAI read them). A request that sets neither where a cap exists gets the
cap written into its body, so no backend's default can exceed it.
"""

from __future__ import annotations

import dataclasses

import orjson

from router.errors import InvalidRequest
from router.pipeline_types import Handler
from router.request import InferenceRequest, max_tokens_field
from router.state import AppState
from router.types import Send


class Caps:
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        if not request.op.generates:
            await call_next(request, send)
            return
        config = self.state.config
        model = request.routed.model
        own = config.models.get(model)
        max_n = (own.limits.max_n if own else None) or config.requests.max_n
        max_tokens = (own.limits.max_tokens if own else None) or config.requests.max_tokens
        sampling = request.sampling
        if sampling.n > max_n:
            raise InvalidRequest(f"'n' is at most {max_n} for model '{model}'", param="n")
        if max_tokens is None:
            await call_next(request, send)
            return
        if sampling.max_tokens is not None:
            if sampling.max_tokens > max_tokens:
                name = max_tokens_field(request.body, request.op)
                raise InvalidRequest(
                    f"'{name}' is at most {max_tokens} for model '{model}'", param=name
                )
            await call_next(request, send)
            return
        body = {**request.body, "max_tokens": max_tokens}
        capped = dataclasses.replace(
            request,
            body=body,
            raw=orjson.dumps(body),
            sampling=dataclasses.replace(sampling, max_tokens=max_tokens),
        )
        await call_next(capped, send)
