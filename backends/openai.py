"""OpenAI-protocol backends (vLLM, SGLang, TGI's Messages API, any OpenAI server).

The client's body passes through untouched unless the backend knows the model
by another name, in which case only ``model`` is rewritten, and the answer's
``model`` is put back to the name the client routed by.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import orjson
from prometheus_client.parser import text_string_to_metric_families

from backends.base import Exchange, Load, OpenAIRequest, Target, Usage
from backends.usage import scan_usage

#: Bytes of an unfinished SSE event held back for renaming, at most.
MAX_PENDING = 1 << 20


class OpenAIAdapter:
    kind = "openai"
    serves_every_request = True
    metrics_path: str | None = None

    def health_paths(self, served: Sequence[str]) -> list[str]:
        return ["/health"]

    def parse_load(self, metrics_text: str) -> Load:
        return Load()

    def unsupported(self, request: OpenAIRequest) -> str | None:
        return None

    def prepare(self, request: OpenAIRequest, target: Target) -> Exchange:
        raw = request.raw
        body = request.body
        ask_usage = request.stream and request.router_usage and not request.sampling.include_usage
        if ask_usage:
            options = body.get("stream_options")
            body = {
                **body,
                "stream_options": {**(options or {}), "include_usage": True},
                "model": target.served,
            }
            raw = orjson.dumps(body)
        elif body.get("model") != target.served:
            raw = orjson.dumps({**body, "model": target.served})
        inner = Passthrough() if target.served == target.model else ModelRename(target)
        return Exchange(request.op.path, raw, StripUsage(inner) if ask_usage else inner)


class Passthrough:
    """An OpenAI answer as it came; usage read off the bytes (of whole events:
    a usage object split across two network chunks is still read whole)."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        #: The stream after its last complete event.
        self._tail = b""

    def answer(self, data: bytes) -> bytes:
        self.usage = scan_usage(data)
        return data

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        end = _last_event_end(data)
        if end < 0:
            self._tail = data if len(data) <= MAX_PENDING else b""
            return chunk
        self._tail = data[end:]
        if b'"usage"' in data:
            self.usage = scan_usage(data[:end]) or self.usage
        return chunk

    def close(self) -> bytes:
        return b""

    def server_fault(self, status: int, data: bytes) -> bool:
        return status >= 500


class ModelRename(Passthrough):
    """Puts the router's model name back where the backend wrote its served name.

    Per JSON answer and per SSE event, not per network chunk: a stream is cut
    at event boundaries (a blank line) first, so a name split across two
    chunks is still found. ``"model": "<served>"`` is matched with or without
    spaces; inside strings quotes are escaped, so only the key itself matches
    (in a JSON answer, only its first occurrence: the top-level one). The
    rest of the bytes are untouched.
    """

    def __init__(self, target: Target) -> None:
        super().__init__()
        served = re.escape(orjson.dumps(target.served))
        self._pattern = re.compile(rb'("model"\s*:\s*)' + served)
        self._new = rb"\g<1>" + orjson.dumps(target.model).replace(b"\\", b"\\\\")
        self._pending = b""

    def answer(self, data: bytes) -> bytes:
        return super().answer(self._pattern.sub(self._new, data, count=1))

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = _last_event_end(data)
        if end < 0:
            if len(data) <= MAX_PENDING:
                self._pending = data
                return b""
            end = len(data)  # no event framing from this backend: do not hoard it
        self._pending = data[end:]
        return super().feed(self._pattern.sub(self._new, data[:end]))

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        return super().feed(self._pattern.sub(self._new, rest)) if rest else b""


_USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class StripUsage:
    """A stream whose usage chunk kvroute asked for and the client did not:
    the inner translator reads the usage, and the usage-only event (``choices``
    empty) is kept from the client. Cut at event boundaries, like ModelRename."""

    def __init__(self, inner: Passthrough) -> None:
        self.inner = inner
        self._pending = b""

    @property
    def usage(self) -> Usage | None:
        return self.inner.usage

    def answer(self, data: bytes) -> bytes:
        return self.inner.answer(data)

    def server_fault(self, status: int, data: bytes) -> bool:
        return self.inner.server_fault(status, data)

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + self.inner.feed(chunk)
        end = _last_event_end(data)
        if end < 0:
            if len(data) <= MAX_PENDING:
                self._pending = data
                return b""
            end = len(data)
        self._pending = data[end:]
        return _drop_usage_events(data[:end])

    def close(self) -> bytes:
        rest, self._pending = self._pending + self.inner.close(), b""
        return _drop_usage_events(rest)


def _drop_usage_events(data: bytes) -> bytes:
    if b'"usage"' not in data:
        return data
    kept = []
    for event in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)", data):
        if b'"usage"' in event and _USAGE_ONLY.search(event):
            continue
        kept.append(event)
    return b"".join(kept)


def _last_event_end(data: bytes) -> int:
    """Offset just past the last complete SSE event in ``data`` (-1 if none)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > lf + 2:
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


class VLLMAdapter(OpenAIAdapter):
    kind = "vllm"
    metrics_path: str | None = "/metrics"

    def parse_load(self, metrics_text: str) -> Load:
        """vLLM's gauges, summed over its ``engine`` label (data-parallel engines);
        KV usage is the mean over engines, capacity the sum of usable blocks (one
        block per engine is vLLM's reserved null block); finished requests
        summed over every finish reason."""
        running = waiting = finished = 0.0
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
                elif name == "vllm:request_success_total":
                    finished += sample.value
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
            finished=finished if "vllm:request_success_total" in seen else None,
        )
