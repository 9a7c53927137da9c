"""The backend adapter interface, in the spirit of an httpx transport.

An adapter knows one wire protocol. From one client request (an OpenAI
operation, already parsed and validated by the router) it prepares one
``Exchange``: the upstream request (a path under the endpoint's URL and a
body) and the ``Translator`` that turns the answer back into OpenAI JSON or
SSE. Translation is pure code over bytes (no sockets), so it is tested on
recorded responses; the router owns all I/O, URLs and headers.

An adapter also says which requests it can serve at all (``unsupported``):
TGI and Triton generate text, they do not embed, so the router never sends
them an embedding request.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class Operation(enum.Enum):
    """The OpenAI operations kvroute routes; the value is the route's path."""

    CHAT = "/v1/chat/completions"
    COMPLETION = "/v1/completions"
    EMBEDDING = "/v1/embeddings"

    @property
    def path(self) -> str:
        return self.value

    @property
    def generates(self) -> bool:
        return self is not Operation.EMBEDDING


@dataclass(frozen=True, slots=True)
class Sampling:
    """The OpenAI request fields that adapters translate, read and type-checked
    once by the router (None: the client did not set it)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    frequency_penalty: float | None = None
    #: ``stream_options.include_usage``: a final chunk with usage.
    include_usage: bool = False


class OpenAIRequest(Protocol):
    """What an adapter may know of the client's request."""

    @property
    def op(self) -> Operation: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def body(self) -> Mapping[str, Any]: ...
    @property
    def stream(self) -> bool: ...
    @property
    def sampling(self) -> Sampling: ...
    @property
    def router_usage(self) -> bool:
        """kvroute needs the answer's usage (a stream's adapter asks the engine
        for it, and keeps the extra chunk from the client)."""
        ...


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer. ``estimated``: counted by kvroute, not the engine."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    estimated: bool = False


class Translator(Protocol):
    """Upstream answer -> OpenAI answer, for one exchange."""

    def answer(self, data: bytes) -> bytes:
        """A whole successful (2xx) upstream body as OpenAI JSON. Raises
        ``UpstreamProtocolError`` for an error the backend hid in a 2xx."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """Bytes of the upstream stream in, bytes of an OpenAI SSE stream out."""
        ...

    def close(self) -> bytes:
        """Whatever is still owed to the client once the upstream stream ends."""
        ...

    def server_fault(self, status: int, data: bytes) -> bool:
        """Whether an error answer (``status`` >= 400, body ``data``) is the
        backend's failure rather than a refusal of the request: then another
        endpoint may answer it, and it counts against this one."""
        ...

    @property
    def usage(self) -> Usage | None:
        """The answer's usage, once seen (after ``answer``, or during a stream)."""
        ...


@dataclass(frozen=True, slots=True)
class Exchange:
    """One upstream call: where to send what, and how to read the answer."""

    #: Path under the endpoint's base URL.
    path: str
    body: bytes
    translator: Translator


@dataclass(frozen=True, slots=True)
class Load:
    """What a backend's metrics say about its load; None where it says nothing."""

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    kv_capacity_tokens: int | None = None
    #: Requests finished since the backend started (a counter).
    finished: float | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """The model a request goes to on one endpoint."""

    #: The name the client used (after aliases), for response bodies.
    model: str
    #: The name the backend knows it by.
    served: str
    #: For text-prompt backends: a chat template preset or Jinja2 source.
    chat_template: str | None = None
    #: The model's tokenizer (loaded from ``models[].tokenizer``), for the
    #: token counts the backend does not report.
    tokenizer: Tokenizer | None = None


class Adapter(Protocol):
    kind: str
    #: ``unsupported`` never refuses a request (an OpenAI server): the
    #: registry then need not ask it for every request.
    serves_every_request: bool
    #: Path of the Prometheus metrics (relative to the endpoint's URL), or None.
    metrics_path: str | None

    def health_paths(self, served: Sequence[str]) -> list[str]:
        """Paths that must all answer 2xx for the endpoint to count as healthy."""
        ...

    def parse_load(self, metrics_text: str) -> Load:
        """The load in a scrape of the metrics (Prometheus text format)."""
        ...

    def unsupported(self, request: OpenAIRequest) -> str | None:
        """Why this backend cannot serve ``request`` at all, or None if it can."""
        ...

    def prepare(self, request: OpenAIRequest, target: Target) -> Exchange:
        """The upstream call for ``request`` to ``target``. Raises
        ``ChatTemplateRejected`` when the model's chat template refuses the
        conversation (the client's fault) and ``ChatTemplateFailed`` when the
        template breaks (the endpoint's)."""
        ...


class UpstreamProtocolError(Exception):
    """The backend answered 2xx with an error inside (Triton does), or with
    something that is not its protocol."""


@dataclass(frozen=True, slots=True)
class AdapterFactory:
    """How an endpoint's ``kind`` and ``options`` become its adapter."""

    options_model: type[BaseModel]
    build: Callable[[Any], Adapter]


class NoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
