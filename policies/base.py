"""The policy interface: pure decisions over immutable views.

A policy ranks the candidate endpoints for one request. The first is the
primary; the rest are the failover order. Policies do no I/O, no logging and
no metrics; randomness comes from the ``random.Random`` they are built with,
so a seeded policy is exactly reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from policies.prefix_index import IndexStats


class HeldBlocks(Protocol):
    """An endpoint's KV-cache blocks as its engine's own KV events report them
    (a live view kept by the router's event subscriber; see ``policies/blocks.py``).

    Block hashes are kvroute's chained hashes of token ids (``PromptTokens``),
    not the engine's own hashes."""

    @property
    def block_size(self) -> int: ...

    @property
    def stale(self) -> bool:
        """True while the publisher is silent or a gap is being repaired:
        the contents are not to be trusted, use the approximate index."""
        ...

    @property
    def hashes(self) -> Container[int]:
        """The held blocks' hashes, for membership tests: a container whose
        ``in`` runs in C (a dict), asked once per candidate per decision, where
        a Python ``__contains__`` cost 0.4 us a call."""
        ...

    @property
    def roots(self) -> Container[int]:
        """The held hashes that start a chain (a prompt's first block): a few
        per endpoint, asked of every candidate, where probing ``hashes`` (a
        dict of up to a million blocks) missed the CPU's cache each time."""
        ...

    def __contains__(self, block_hash: object) -> bool: ...


class PromptTokens(Protocol):
    """A request's prompt as the model's tokenizer sees it (chat template
    applied as the engine applies it), computed by the router before ranking."""

    @property
    def num_tokens(self) -> int: ...

    def block_hashes(self, block_size: int) -> Sequence[int]:
        """Chained hashes of the prompt's full blocks of ``block_size`` tokens."""
        ...


class LatencyView(Protocol):
    """Decayed latency estimates of one endpoint, in seconds (None: no data)."""

    @property
    def ttft(self) -> float | None: ...

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (streams)."""
        ...

    @property
    def duration(self) -> float | None:
        """A whole non-streamed answer (router/latency.py: of a reference
        size, so that endpoints answering requests of other sizes compare)."""
        ...

    def samples(self, quantity: Literal["ttft", "tpot", "duration"]) -> float:
        """How much data backs an estimate: its samples, each counting 1 when
        fresh and half as much every half-life (0: none). Policies shrink a
        thinly backed estimate toward the fleet's."""
        ...


@dataclass(frozen=True, slots=True)
class EndpointView:
    """What a policy may know of one endpoint, frozen at decision time."""

    id: str
    url: str
    kind: str
    weight: float = 1.0
    in_flight: int = 0
    #: Of ``in_flight``, the requests that have had no byte back yet: queued or
    #: in prefill at the endpoint (a stream's first chunk, a whole answer's end).
    awaiting_first: int = 0
    #: Scraped from the backend's metrics; ``None`` when unknown or stale.
    running: float | None = None
    waiting: float | None = None
    #: This router's ``in_flight`` when the scrape came back (None: unknown).
    in_flight_at_scrape: int | None = None
    #: Requests the backend has finished (a counter, from the last scrape;
    #: None: it publishes none), and how many of this router's it had
    #: answered when that scrape came back: this router's share of the
    #: traffic, without the race of two gauges (policies/share.py).
    finished: float | None = None
    completed_at_scrape: int | None = None
    #: Changes whenever one of the scraped fields above is assigned: while it
    #: is unchanged they are too, and what a policy learned from them stands.
    #: -1: not tracked (a view made by hand), to be read every time.
    scrape_version: int = -1
    kv_usage: float | None = None
    #: Tokens the endpoint's KV cache holds (scraped or configured), if known.
    kv_capacity_tokens: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The endpoint's KV blocks from its KV events; None when it publishes none.
    blocks: HeldBlocks | None = None
    #: What this router measured of the endpoint's latency, read when asked
    #: (the router's views carry one always; None: a view made without it).
    latency: LatencyView | None = None
    #: ``load_of(self)``, computed once: every policy reads it of every
    #: candidate, and the router keeps a view across decisions.
    load: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "load", load_of(self))


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy may know of one request."""

    model: str
    endpoint: str
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The prompt's tokens, when the model has a tokenizer configured and a
    #: candidate publishes KV events (else None: policies use characters).
    tokens: PromptTokens | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt at an endpoint went, as far as the router saw it."""

    ok: bool
    #: From the response's ``usage``, when the router saw it.
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


class Ranking(Sequence[EndpointView]):
    """Endpoints in order: the first known, the rest (the failover order)
    computed when first asked for. A request's first attempt succeeds as a
    rule, and ordering 64 candidates for the others cost a tenth of a
    decision (benchmarks/README.md, "Decision latency, fourth pass").
    ``rest`` must read only what cannot change (frozen views, the decision's
    own values)."""

    __slots__ = ("_all", "_first", "_rest")

    def __init__(self, first: EndpointView, rest: Callable[[], Sequence[EndpointView]]) -> None:
        self._first = first
        self._rest: Callable[[], Sequence[EndpointView]] | None = rest
        self._all: tuple[EndpointView, ...] | None = None

    def _ordered(self) -> tuple[EndpointView, ...]:
        ordered = self._all
        if ordered is None:
            assert self._rest is not None
            ordered = self._all = (self._first, *self._rest())
            self._rest = None
        return ordered

    def __iter__(self) -> Iterator[EndpointView]:
        yield self._first
        yield from self._ordered()[1:]

    def __len__(self) -> int:
        return len(self._ordered())

    @overload
    def __getitem__(self, index: int) -> EndpointView: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[EndpointView, ...]: ...
    def __getitem__(self, index: int | slice) -> EndpointView | tuple[EndpointView, ...]:
        if index == 0:
            return self._first
        return self._ordered()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ranking):
            other = other._ordered()
        return isinstance(other, tuple) and self._ordered() == other

    def __hash__(self) -> int:
        return hash(self._ordered())

    def __repr__(self) -> str:
        return f"Ranking({self._ordered()!r})"


@dataclass(frozen=True, slots=True)
class Decision:
    #: The first is the primary; the rest are the failover order.
    ranked: Sequence[EndpointView]
    reason: str
    #: Characters of the prompt prefix the chosen endpoint is believed to hold,
    #: and of the whole prompt (0 when the policy does not look at prompts).
    match_len: int = 0
    prompt_len: int = 0
    #: The policy's own note to itself, handed back to ``observe``.
    memo: Any = None


class Policy(Protocol):
    name: str
    #: Whether ``rank`` looks at ``RequestView.tokens``: the router tokenizes
    #: prompts only for such policies (tokenizing costs more than a decision).
    uses_tokens: bool

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        """Order ``candidates`` (never empty) for ``request``."""
        ...

    def observe(self, decision: Decision, endpoint_id: str, outcome: Outcome) -> None:
        """Learn from a finished attempt at ``endpoint_id`` (which need not be
        the first ranked: failover moves on down the list)."""
        ...

    def forget(self, endpoint_id: str) -> None:
        """Drop all state about an endpoint that left the fleet."""
        ...

    def index_stats(self) -> IndexStats | None:
        """The policy's prefix index (size, evictions), if it keeps one."""
        ...


def load_of(endpoint: EndpointView) -> float:
    """Requests an endpoint holds. This router's in-flight count is exact and
    current for its own traffic; the backend's scraped running + waiting also
    counts what other routers sent, but lags (up to a scrape interval). So:
    our in-flight now, plus what the scrape saw beyond our own in-flight at
    that moment (the others' share). Taking the larger of the two instead let
    a 2 s old scrape hide the requests sent since, and at saturation every
    request went to the endpoint that had looked emptiest at the last scrape
    (benchmarks/README.md, "admission")."""
    if endpoint.running is None and endpoint.waiting is None:
        return float(endpoint.in_flight)
    scraped = (endpoint.running or 0.0) + (endpoint.waiting or 0.0)
    if endpoint.in_flight_at_scrape is None:
        return max(float(endpoint.in_flight), scraped)
    others = max(0.0, scraped - endpoint.in_flight_at_scrape)
    return endpoint.in_flight + others


class NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True, slots=True)
class PolicyFactory:
    """How a policy is built from YAML: its parameter model and a constructor."""

    params_model: type[BaseModel]
    build: Callable[[Any, random.Random], Policy]


class StatelessPolicy:
    """Base for policies that learn nothing from outcomes."""

    name = "stateless"
    uses_tokens = False

    def observe(self, decision: Decision, endpoint_id: str, outcome: Outcome) -> None:
        return None

    def forget(self, endpoint_id: str) -> None:
        return None

    def index_stats(self) -> IndexStats | None:
        return None
