"""The backend adapter interface, in the spirit of an httpx transport.

An adapter knows one wire protocol. It builds the upstream request from the
client's OpenAI request and turns the upstream answer back into OpenAI JSON
or SSE chunks. The translation is pure code over bytes (no sockets), so it is
tested on recorded responses; the router owns all I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    body: bytes
    headers: Mapping[str, str]


class StreamTranslator(Protocol):
    def feed(self, chunk: bytes) -> bytes:
        """Bytes of the upstream stream in, bytes of an OpenAI SSE stream out."""
        ...

    def close(self) -> bytes:
        """Whatever is still owed to the client once the upstream stream ends."""
        ...


@dataclass(frozen=True, slots=True)
class Load:
    """What a backend's metrics say about its load; None where it says nothing."""

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    kv_capacity_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """The model a request goes to on one endpoint."""

    #: The name the client used (after aliases), for response bodies.
    model: str
    #: The name the backend knows it by.
    served: str
    #: For text-prompt backends: a chat template preset or Jinja2 source.
    chat_template: str | None = None


class Adapter(Protocol):
    kind: str
    #: Path of the Prometheus metrics (relative to the endpoint's URL), or None.
    metrics_path: str | None

    def health_paths(self, served: Sequence[str]) -> list[str]:
        """Paths that must all answer 2xx for the endpoint to count as healthy."""
        ...

    def parse_load(self, metrics_text: str) -> Load:
        """The load in a scrape of the metrics (Prometheus text format)."""
        ...

    def build(
        self,
        base_url: str,
        path: str,
        raw: bytes,
        body: Mapping[str, Any],
        target: Target,
        headers: Mapping[str, str],
    ) -> UpstreamRequest:
        """The upstream request for the OpenAI request ``body`` (raw bytes ``raw``)
        that the client sent to ``path``."""
        ...

    def translate_json(
        self, path: str, body: Mapping[str, Any], target: Target, data: bytes
    ) -> bytes:
        """A successful non-streamed upstream body as OpenAI JSON. Raises
        ``UpstreamProtocolError`` for an error the backend hid in a 200."""
        ...

    def stream_translator(
        self, path: str, body: Mapping[str, Any], target: Target
    ) -> StreamTranslator | None:
        """A translator for a streamed answer, or None to pass bytes through."""
        ...


class UpstreamProtocolError(Exception):
    """The backend answered 2xx with an error inside (Triton does)."""


@dataclass(frozen=True, slots=True)
class AdapterFactory:
    """How an endpoint's ``kind`` and ``options`` become its adapter."""

    options_model: type[BaseModel]
    build: Callable[[Any], Adapter]


class NoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
