"""What a pipeline stage is (router/pipeline.py lists them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from router.request import InferenceRequest
from router.types import Send

#: The rest of the pipeline, as a stage sees it.
Handler = Callable[[InferenceRequest, Send], Awaitable[None]]


class Stage(Protocol):
    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        """Answer (or raise a RouterError), or ``await call_next(request, send)``."""
        ...
