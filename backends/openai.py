"""OpenAI-protocol backends (vLLM, SGLang, TGI's Messages API, any OpenAI server).

The client's body passes through untouched unless the backend knows the model
by another name, in which case only ``model`` is rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from backends.base import Load, StreamTranslator, Target, UpstreamRequest


class OpenAIAdapter:
    kind = "openai"
    metrics_path: str | None = None

    def health_paths(self, served: Sequence[str]) -> list[str]:
        return ["/health"]

    def parse_load(self, metrics_text: str) -> Load:
        return Load()

    def build(
        self,
        base_url: str,
        path: str,
        raw: bytes,
        body: Mapping[str, Any],
        target: Target,
        headers: Mapping[str, str],
    ) -> UpstreamRequest:
        if body.get("model") != target.served:
            raw = orjson.dumps({**body, "model": target.served})
        return UpstreamRequest(base_url + path, raw, headers)

    def translate_json(
        self, path: str, body: Mapping[str, Any], target: Target, data: bytes
    ) -> bytes:
        if target.served == target.model:
            return data
        return ModelRename(target).feed(data)

    def stream_translator(
        self, path: str, body: Mapping[str, Any], target: Target
    ) -> StreamTranslator | None:
        # Bytes pass through untouched unless the backend knows the model by
        # another name: then the client still sees the name it routes by.
        return None if target.served == target.model else ModelRename(target)


class ModelRename:
    """Puts the router's model name back where the backend wrote its served name.

    A byte replacement of the compact ``"model":"<served>"`` (vLLM and OpenAI
    servers write compact JSON), not a parse: the body is otherwise untouched.
    """

    def __init__(self, target: Target) -> None:
        self._old = b'"model":' + orjson.dumps(target.served)
        self._new = b'"model":' + orjson.dumps(target.model)

    def feed(self, chunk: bytes) -> bytes:
        return chunk.replace(self._old, self._new)

    def close(self) -> bytes:
        return b""


class VLLMAdapter(OpenAIAdapter):
    kind = "vllm"
    metrics_path: str | None = "/metrics"

    def parse_load(self, metrics_text: str) -> Load:
        """vLLM's gauges, summed over its ``engine`` label (data-parallel engines);
        KV usage is the mean over engines, capacity the sum of usable blocks (one
        block per engine is vLLM's reserved null block)."""
        running = waiting = 0.0
        usage: list[float] = []
        capacity = 0
        seen = set()
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                name = sample.name
                if name == "vllm:num_requests_running":
                    running += sample.value
                elif name == "vllm:num_requests_waiting":
                    waiting += sample.value
                elif name == "vllm:kv_cache_usage_perc":
                    usage.append(sample.value)
                elif name == "vllm:cache_config_info":
                    blocks = sample.labels.get("num_gpu_blocks", "")
                    size = sample.labels.get("block_size", "")
                    if blocks.isdigit() and size.isdigit():
                        capacity += (int(blocks) - 1) * int(size)
                else:
                    continue
                seen.add(name)
        return Load(
            running=running if "vllm:num_requests_running" in seen else None,
            waiting=waiting if "vllm:num_requests_waiting" in seen else None,
            kv_usage=sum(usage) / len(usage) if usage else None,
            kv_capacity_tokens=capacity or None,
        )
