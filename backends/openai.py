"""OpenAI-protocol backends (vLLM, SGLang, TGI's Messages API, any OpenAI server).

The client's body passes through untouched unless the backend knows the model
by another name, in which case only ``model`` is rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from backends.base import StreamTranslator, UpstreamRequest


class OpenAIAdapter:
    kind = "openai"
    health_path = "/health"

    def build(
        self,
        base_url: str,
        path: str,
        raw: bytes,
        body: Mapping[str, Any],
        served_name: str,
        headers: Mapping[str, str],
    ) -> UpstreamRequest:
        if body.get("model") != served_name:
            raw = orjson.dumps({**body, "model": served_name})
        return UpstreamRequest(base_url + path, raw, headers)

    def translate_json(self, path: str, body: bytes) -> bytes:
        return body

    def stream_translator(self, path: str, body: Mapping[str, Any]) -> StreamTranslator | None:
        return None


class VLLMAdapter(OpenAIAdapter):
    kind = "vllm"
