"""Endpoints and their live state, and the routes from model names to policies.

Policies never see these mutable objects: ``EndpointState.view()`` freezes
what a policy may know at decision time. The view is kept between decisions
and dropped when a field it copies is assigned (``VIEWED``): building 64
views for every request cost more than the decision itself
(benchmarks/README.md, "Decision latency, third pass").
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from backends import ADAPTERS, Adapter, OpenAIRequest, Target
from backends.tokens import load_tokenizer
from policies.base import EndpointView, Policy
from policies.blocks import BlockIndex, EndpointBlocks
from policies.prefix_index import IndexStats
from policies.registry import build_policy
from router.circuit import Circuit, CircuitState
from router.config import CircuitConfig, Config, EndpointConfig, LatencyConfig, PolicySpec
from router.errors import EndpointMisconfigured, UpstreamError, UpstreamHTTPError
from router.latency import LatencyEstimate, LiveLatency
from router.retry import retry_after_seconds
from router.sources import STATIC, Source


@dataclass(eq=False)
class EndpointState:
    config: EndpointConfig
    adapter: Adapter
    #: model name -> the name the backend serves it under (None: the same).
    served: dict[str, str | None]
    #: model name -> what the adapter needs to address it.
    targets: dict[str, Target]
    headers: dict[str, str]
    circuit: Circuit
    #: Where the endpoint came from: the config file or a discovered service.
    source: Source = STATIC
    healthy: bool = True
    draining: bool = False
    in_flight: int = 0
    #: Of those, the attempts that have had no byte back yet (queued or in prefill).
    awaiting_first: int = 0
    #: Scraped load; None when unknown or stale.
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    kv_capacity_tokens: int | None = None
    scraped_at: float | None = None
    #: ``in_flight`` when the scrape came back: the part of the scraped load
    #: that was this router's own (policies/base.py ``load_of``).
    in_flight_at_scrape: int | None = None
    #: This router's attempts answered here (a counter); and, as of the last
    #: scrape, the backend's finished requests (its counter) and ``completed``
    #: when that scrape came back: policies/share.py compares their deltas.
    completed: int = 0
    finished: float | None = None
    completed_at_scrape: int | None = None
    #: Assignments to the scraped fields (``SCRAPED``): ``EndpointView.scrape_version``.
    scrape_version: int = 0
    #: Health-probe streaks for hysteresis.
    probe_failures: int = 0
    probe_successes: int = 0
    #: A 429 or 503 with Retry-After keeps the endpoint out of rotation until then.
    cooldown_until: float = 0.0
    #: What this router measured of the endpoint's latency (router/latency.py):
    #: every model's requests (the admin page's and the metrics' figure).
    latency: LatencyEstimate = field(default_factory=LatencyEstimate)
    #: Of an endpoint serving several models, each model's own: a policy
    #: choosing for one model compares that model's latencies (a big model's
    #: seconds beside a small one's would misrank the endpoint for both).
    model_latency: dict[str, LatencyEstimate] = field(default_factory=dict)
    last_error: str | None = None
    #: Its KV-cache blocks, from its KV events (``kv_events`` configured), else None.
    blocks: EndpointBlocks | None = None
    _labels: dict[str, str] = field(default_factory=dict)
    #: The registry's clock (for the latency estimates' decay in ``view``).
    clock: Callable[[], float] = time.monotonic
    #: ``view()``'s result until a field it copies changes (and of an endpoint
    #: serving several models, ``view(model)``'s per model).
    _view: EndpointView | None = field(default=None, repr=False)
    _model_views: dict[str, EndpointView] = field(default_factory=dict, repr=False)
    #: Told when a field that decides admission is assigned (the registry's).
    _admission: Admission | None = field(default=None, repr=False)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ADMISSION:
            admission = self.__dict__.get("_admission")
            if admission is not None and self.__dict__.get(name) != value:
                admission.changed()
        object.__setattr__(self, name, value)
        if name in SCRAPED:
            object.__setattr__(self, "scrape_version", self.__dict__.get("scrape_version", 0) + 1)
        if name in VIEWED:
            object.__setattr__(self, "_view", None)
            views = self.__dict__.get("_model_views")
            if views:
                views.clear()
            admission = self.__dict__.get("_admission")
            if admission is not None:
                admission.redraw(self)

    @classmethod
    def from_config(
        cls, cfg: EndpointConfig, circuit: CircuitConfig, latency: LatencyConfig | None = None
    ) -> EndpointState:
        latency = latency or LatencyConfig()
        served = {m.name: m.served_name for m in cfg.models}
        headers = {"content-type": "application/json"}
        if cfg.api_key is not None:
            headers["authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        return cls(
            config=cfg,
            adapter=ADAPTERS[cfg.kind].build(cfg.adapter_options),
            served=served,
            targets={
                m.name: Target(
                    m.name,
                    m.served_name or m.name,
                    m.chat_template,
                    # Loaded and cached when the config was validated.
                    load_tokenizer(m.tokenizer) if m.tokenizer else None,
                )
                for m in cfg.models
            },
            headers=headers,
            circuit=Circuit(circuit),
            latency=LatencyEstimate(half_life=latency.half_life, clip=latency.clip),
            model_latency={
                name: LatencyEstimate(half_life=latency.half_life, clip=latency.clip)
                for name in (served if len(served) > 1 else ())
            },
            kv_capacity_tokens=cfg.kv_capacity_tokens,
            _labels=dict(cfg.labels),
        )

    def admits(self, now: float) -> bool:
        """Healthy, not draining, circuit not open, not cooling down after a 429."""
        circuit = self.circuit
        return (
            self.healthy
            and not self.draining
            and now >= self.cooldown_until
            and (circuit.state is CircuitState.CLOSED or circuit.admits(now))
        )

    # -- one attempt's bookkeeping: begin, then one verdict, then end -------------

    def begin(self, now: float, stream: bool = False, model: str | None = None) -> Attempt:
        """An attempt starts (a half-open circuit's trial, if it is one), for
        ``model`` (whose own latency it also measures, when the endpoint
        serves several)."""
        self.circuit.begin(now)
        self.in_flight += 1
        self.awaiting_first += 1
        estimates: tuple[LatencyEstimate, ...] = (self.latency,)
        own = self.model_latency.get(model) if model is not None else None
        if own is not None:
            estimates = (self.latency, own)
        return Attempt(self, now, stream, estimates)

    def succeeded(self) -> None:
        self.circuit.success()

    def failed(self, exc: UpstreamError, now: float) -> bool:
        """What a failed attempt says about the endpoint: a 429 (or a 503 with
        Retry-After) cools it down without a circuit verdict; another 4xx is a
        correct refusal; a misconfiguration (its chat template breaks) is ours,
        not the backend's; connection errors, timeouts and 5xx count against it
        (then True)."""
        self.last_error = exc.message
        if isinstance(exc, EndpointMisconfigured):
            self.circuit.abandon()
            return False
        if isinstance(exc, UpstreamHTTPError):
            if exc.status in (429, 503) and exc.retry_after:
                self.cooldown_until = now + retry_after_seconds(exc.retry_after)
            if exc.status == 429:
                self.cooldown_until = max(self.cooldown_until, now + 1.0)
                self.circuit.abandon()
                return False
            if not exc.server_fault:
                self.circuit.success()  # it answered, and correctly refused the request
                return False
        self.circuit.failure(now)
        return True

    def abandoned(self) -> None:
        """The client left mid-attempt: no verdict on the endpoint."""
        self.circuit.abandon()

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def url(self) -> str:
        return self.config.url

    def view(self, model: str | None = None) -> EndpointView:
        """What a policy may know of this endpoint now, choosing for ``model``
        (the same object until one of the ``VIEWED`` fields is assigned)."""
        if model is not None and model in self.model_latency:
            view = self._model_views.get(model)
            if view is None:
                view = self._model_views[model] = self._build_view(model)
            return view
        view = self._view
        if view is None:
            view = self._view = self._build_view()
        return view

    def _build_view(self, model: str | None = None) -> EndpointView:
        estimate = self.model_latency.get(model, self.latency) if model else self.latency
        return EndpointView(
            id=self.config.id,
            url=self.config.url,
            kind=self.config.kind,
            weight=self.config.weight,
            in_flight=self.in_flight,
            awaiting_first=self.awaiting_first,
            running=self.running,
            waiting=self.waiting,
            in_flight_at_scrape=self.in_flight_at_scrape,
            finished=self.finished,
            completed_at_scrape=self.completed_at_scrape,
            scrape_version=self.scrape_version,
            kv_usage=self.kv_usage,
            kv_capacity_tokens=self.kv_capacity_tokens,
            labels=self._labels,
            blocks=self.blocks,
            latency=LiveLatency(estimate, self.clock),
        )


#: The fields ``EndpointState.view`` copies (or reads through): assigning one
#: drops the kept view. Counters are assigned (``+= 1``), never mutated in place.
VIEWED = frozenset(
    {
        "config",
        "in_flight",
        "awaiting_first",
        "running",
        "waiting",
        "in_flight_at_scrape",
        "finished",
        "completed_at_scrape",
        "scrape_version",
        "kv_usage",
        "kv_capacity_tokens",
        "_labels",
        "blocks",
        "latency",
        "model_latency",
        "clock",
    }
)


#: The fields a scrape sets: assigning one moves ``scrape_version`` (a policy
#: learns from them only when it moved: policies/prefix.py ``_learn_share``).
SCRAPED = frozenset(
    {
        "running",
        "waiting",
        "kv_usage",
        "in_flight_at_scrape",
        "finished",
        "completed_at_scrape",
    }
)


#: The fields ``admits`` reads: assigning one tells the registry, whose cached
#: candidates may then be wrong (the circuit's own changes tell it too).
ADMISSION = frozenset({"healthy", "draining", "cooldown_until", "circuit"})


class Admission:
    """Counts the changes to which endpoints admit requests (``admits``), and
    collects, per model, the endpoints whose view was dropped since the
    model's kept views were last drawn."""

    __slots__ = ("stale", "version")

    def __init__(self) -> None:
        self.version = 0
        self.stale: dict[str, set[EndpointState]] = {}

    def changed(self) -> None:
        self.version += 1

    def redraw(self, state: EndpointState) -> None:
        for model in state.served:
            stale = self.stale.get(model)
            if stale is None:
                self.stale[model] = {state}
            else:
                stale.add(state)


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A model's endpoints that admit requests, as of ``Admission.version``,
    and their views (redrawn in place where one was dropped)."""

    version: int
    states: tuple[EndpointState, ...]
    #: No adapter among them refuses a request: no per-request check.
    serves_every_request: bool
    views: list[EndpointView]
    position: dict[EndpointState, int]


@dataclass(slots=True, eq=False)
class Attempt:
    """One attempt's hold on its endpoint's counts, released exactly once each;
    and its timings, the endpoint's latency samples."""

    endpoint: EndpointState
    started: float = 0.0
    stream: bool = False
    #: Where its timings go: the endpoint's estimate, and its model's own
    #: when the endpoint serves several.
    estimates: tuple[LatencyEstimate, ...] = ()
    first_seen: bool = False
    ended: bool = False
    #: When a stream's first chunk came back (None: not yet, or not a stream).
    first_at: float | None = None
    #: SSE events relayed after the first chunk: a stream's tokens, roughly.
    events: int = 0

    def first_byte(self, now: float | None = None) -> None:
        """The endpoint's first byte came back: no longer waiting on it. With
        ``now`` (a stream's first chunk), a time-to-first-token sample."""
        if not self.first_seen:
            self.first_seen = True
            self.endpoint.awaiting_first -= 1
            if now is not None:
                self.first_at = now
                for estimate in self.estimates:
                    estimate.first_byte(now - self.started, now)

    def answered(self, now: float, tokens: int | None) -> None:
        """The answer is complete, of ``tokens`` output tokens (None: unknown):
        a stream's time per token after the first, or a whole answer's duration."""
        self.endpoint.completed += 1
        if self.first_at is None:
            for estimate in self.estimates:
                estimate.answer(now - self.started, tokens, now)
            return
        # Without usage, count the events after the first, less the [DONE].
        after_first = tokens - 1 if tokens is not None else self.events - 1
        for estimate in self.estimates:
            estimate.stream_end(now - self.first_at, after_first, now)

    def failed(self, now: float) -> None:
        """The attempt failed in a way that counts against the endpoint."""
        if self.first_at is None:
            for estimate in self.estimates:
                estimate.failed(now - self.started, self.stream, now)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.first_byte()
            self.endpoint.in_flight -= 1


LIVE_STATE = (
    "healthy",
    "draining",
    "in_flight",
    "awaiting_first",
    "circuit",
    "latency",
    "probe_failures",
    "probe_successes",
    "cooldown_until",
    "running",
    "waiting",
    "kv_usage",
    "scraped_at",
    "in_flight_at_scrape",
    "completed",
    "finished",
    "completed_at_scrape",
    "scrape_version",
)


class EndpointRegistry:
    """All known endpoints, indexed by the models they serve."""

    def __init__(
        self,
        endpoints: Iterable[EndpointConfig] = (),
        circuit: CircuitConfig | None = None,
        latency: LatencyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        blocks: BlockIndex | None = None,
    ) -> None:
        self._by_id: dict[str, EndpointState] = {}
        #: Every event-publishing endpoint's blocks; outlives reloads and endpoints' changes.
        self.blocks = blocks if blocks is not None else BlockIndex()
        self._by_model: dict[str, list[EndpointState]] = {}
        self._circuit = circuit or CircuitConfig()
        self._latency = latency or LatencyConfig()
        self.clock = clock
        self._admission = Admission()
        #: Per model, the endpoints admitting requests while nothing changes
        #: that (``_admit``): filtering 64 endpoints per request cost a sixth
        #: of a decision (benchmarks/README.md, "Decision latency, fourth pass").
        self._admitted: dict[str, _Admitted] = {}
        for cfg in endpoints:
            self.upsert(cfg)

    def upsert(self, cfg: EndpointConfig, source: Source = STATIC) -> EndpointState:
        old = self._by_id.get(cfg.id)
        state = EndpointState.from_config(cfg, self._circuit, self._latency)
        state.source = source
        if cfg.kv_events is not None:
            state.blocks = self.blocks.endpoint(cfg.id)
        state.clock = self.clock
        if old is not None:
            # Live state survives a change of the endpoint's config.
            for name in LIVE_STATE:
                setattr(state, name, getattr(old, name))
            # Each model's estimate, for the models it still serves.
            for model, estimate in old.model_latency.items():
                if model in state.model_latency:
                    state.model_latency[model] = estimate
            self.remove(cfg.id)
        state._admission = self._admission
        state.circuit.on_change = self._admission.changed
        self._by_id[cfg.id] = state
        for model in state.served:
            self._by_model.setdefault(model, []).append(state)
        self._admission.changed()
        return state

    def remove(self, endpoint_id: str) -> EndpointState | None:
        state = self._by_id.pop(endpoint_id, None)
        if state is not None:
            self._admission.changed()
            for model in state.served:
                members = self._by_model[model]
                members.remove(state)
                if not members:
                    del self._by_model[model]
                # Nothing kept may hold the state once it is gone (a model
                # never asked for would keep it until asked).
                self._admitted.pop(model, None)
                stale = self._admission.stale.get(model)
                if stale is not None:
                    stale.discard(state)
        return state

    def set_circuit_config(self, circuit: CircuitConfig) -> None:
        """New thresholds for every circuit; each keeps its state (open stays open)."""
        self._circuit = circuit
        for endpoint in self._by_id.values():
            endpoint.circuit.config = circuit

    def set_latency_config(self, latency: LatencyConfig) -> None:
        """New estimation rules for every endpoint; the estimates are kept."""
        self._latency = latency
        for endpoint in self._by_id.values():
            for estimate in (endpoint.latency, *endpoint.model_latency.values()):
                estimate.half_life = latency.half_life
                estimate.clip = latency.clip

    def ids(self, source: Source) -> set[str]:
        return {e.id for e in self._by_id.values() if e.source == source}

    def get(self, endpoint_id: str) -> EndpointState | None:
        return self._by_id.get(endpoint_id)

    def all(self) -> list[EndpointState]:
        return list(self._by_id.values())

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def serving(self, model: str) -> list[EndpointState]:
        return self._by_model.get(model, [])

    def candidates(self, model: str, request: OpenAIRequest | None = None) -> list[EndpointState]:
        """The endpoints of ``model`` that take requests now (and can serve ``request``)."""
        admitted, _ = self._current(model)
        if request is None or admitted.serves_every_request:
            return list(admitted.states)
        return [s for s in admitted.states if s.adapter.unsupported(request) is None]

    def views(self, model: str, request: OpenAIRequest | None = None) -> list[EndpointView]:
        """The views of ``candidates(model, request)``, in the same order. Kept
        per model with the admitted endpoints: only the endpoints whose view
        was dropped since are redrawn (one or two between two requests of a
        busy router), not 64 method calls per request."""
        admitted, kept = self._current(model)
        if kept:
            stale = self._admission.stale.pop(model, None)
            if stale:
                views, position = admitted.views, admitted.position
                for state in stale:
                    i = position.get(state)
                    if i is not None:
                        views[i] = state.view(model)
        if request is None or admitted.serves_every_request:
            return list(admitted.views)
        return [
            view
            for state, view in zip(admitted.states, admitted.views, strict=True)
            if state.adapter.unsupported(request) is None
        ]

    def _current(self, model: str) -> tuple[_Admitted, bool]:
        """The model's admitted endpoints now, and whether they were kept from
        an earlier request (else admitted afresh, their views just drawn)."""
        admitted = self._admitted.get(model)
        if admitted is not None and admitted.version == self._admission.version:
            return admitted, True
        return self._admit(model), False

    def _admit(self, model: str) -> _Admitted:
        """The endpoints of ``model`` admitting requests now; kept for the next
        requests while only an assignment can change that: every admitted
        endpoint's circuit is closed (it admits until it opens, which tells
        ``Admission``) and every other is unhealthy or draining (until
        assigned otherwise). A cooldown or an open circuit ends with time:
        then nothing is kept and each request filters again."""
        now = self.clock()
        members = self._by_model.get(model, ())
        states = tuple(s for s in members if s.admits(now))
        self._admission.stale.pop(model, None)
        admitted = _Admitted(
            self._admission.version,
            states,
            all(s.adapter.serves_every_request for s in states),
            [s.view(model) for s in states],
            {s: i for i, s in enumerate(states)},
        )
        taken = set(states)
        steady = all(s.circuit.state is CircuitState.CLOSED for s in states) and all(
            not s.healthy or s.draining for s in members if s not in taken
        )
        if steady:
            self._admitted[model] = admitted
        else:
            self._admitted.pop(model, None)
        return admitted

    def unsupported(self, model: str, request: OpenAIRequest) -> str | None:
        """Why no endpoint of ``model``, healthy or not, can serve ``request``
        (None when one can)."""
        reasons = [s.adapter.unsupported(request) for s in self._by_model.get(model, ())]
        if not reasons or None in reasons:
            return None
        return next(r for r in reasons if r)


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    policy_name: str
    policy: Policy
    spec: PolicySpec


class RouteTable:
    """Model names and aliases -> routes; one policy instance per model."""

    def __init__(
        self, config: Config, registry: EndpointRegistry, previous: RouteTable | None = None
    ) -> None:
        """With ``previous`` (a reload), a model whose policy spec did not change
        keeps its policy object, and with it what it learned (the prefix index)."""
        self._registry = registry
        self._default = config.default_policy
        self._rng = random.Random(config.seed)
        self._routes: dict[str, Route] = {}
        self._names: dict[str, str] = {}
        self._fallbacks = {name: model.fallbacks for name, model in config.models.items()}
        self._aliases = {name: model.aliases for name, model in config.models.items()}
        self._configured = set(config.models)
        kept = previous._routes if previous is not None else {}
        for name, model in config.models.items():
            old = kept.get(name)
            same = old is not None and old.spec == model.policy
            self._routes[name] = old if same and old else self._build(name, model.policy)
            self._names[name] = name
            for alias in model.aliases:
                self._names[alias] = name
        for name, old in kept.items():
            if name not in self._routes and old.spec == self._default:
                self._routes[name] = old
                self._names[name] = name

    def _build(self, model: str, spec: PolicySpec) -> Route:
        rng = random.Random(self._rng.getrandbits(64))
        return Route(model, spec.name, build_policy(spec.name, spec.typed_params, rng), spec)

    def resolve(self, name: str) -> Route | None:
        canonical = self._names.get(name)
        if canonical is not None and canonical in self._configured:
            return self._routes[canonical]
        if not self._registry.serving(name):
            # A model only endpoints named (e.g. found by discovery), now served by
            # none: unknown again. Its route is kept for when it comes back.
            return None
        route = self._routes.get(name)
        if route is None:
            route = self._build(name, self._default)
            self._routes[name] = route
            self._names[name] = name
        return route

    def fallbacks(self, model: str) -> tuple[str, ...]:
        return self._fallbacks.get(model, ())

    def aliases(self, model: str) -> tuple[str, ...]:
        return self._aliases.get(model, ())

    def canonical(self, name: str) -> str:
        """The model a public name (a model or an alias) stands for."""
        return self._names.get(name, name)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def index_stats(self) -> list[tuple[str, IndexStats]]:
        out = []
        for route in self._routes.values():
            stats = route.policy.index_stats()
            if stats is not None:
                out.append((route.model, stats))
        return out

    def public_models(self) -> list[str]:
        names = set(self._registry.models())
        for alias, canonical in self._names.items():
            if self._registry.serving(canonical):
                names.add(alias)
        return sorted(names)
