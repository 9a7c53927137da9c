"""Policies composed in YAML: filters -> weighted scorers in [0, 1] -> picker.

    policy:
      name: composite
      filters: [not_overloaded, {name: label, key: zone, values: [a, b]}]
      scorers: [{name: prefix_match, weight: 2}, {name: low_load, weight: 1}]
      picker: max            # or weighted_random

Filters drop candidates (a filter that would drop them all is skipped);
each scorer gives every remaining candidate a score in [0, 1]; the weighted
mean orders them, either strictly (``max``, ties broken by the RNG) or by
weighted random sampling (``weighted_random``). Components are found by
name in the registries below; add one by adding a factory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from policies.base import Decision, EndpointView, Outcome, RequestView
from policies.latency import LowLatency, LowLatencyParams
from policies.precise import PrecisePrefix, PrecisePrefixParams
from policies.prefix_index import IndexParams, IndexStats, PrefixIndex, capacity_blocks
from policies.prompt import block_hashes, canonical_prompt, model_seed
from policies.ring import RingCache, bounded_capacity, ring_order


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- filters ---------------------------------------------------------------------


class Filter(Protocol):
    def keep(self, candidates: Sequence[EndpointView]) -> list[EndpointView]: ...


class NotOverloadedParams(Params):
    epsilon: float = Field(0.25, gt=0)


class NotOverloaded:
    def __init__(self, params: NotOverloadedParams) -> None:
        self.epsilon = params.epsilon

    def keep(self, candidates: Sequence[EndpointView]) -> list[EndpointView]:
        cap = bounded_capacity(candidates, self.epsilon)
        return [e for e in candidates if e.load + 1 <= cap[e.id]]


class LabelParams(Params):
    key: str
    values: tuple[str, ...] = Field(min_length=1)


class Label:
    def __init__(self, params: LabelParams) -> None:
        self.params = params

    def keep(self, candidates: Sequence[EndpointView]) -> list[EndpointView]:
        return [e for e in candidates if e.labels.get(self.params.key) in self.params.values]


class KVUsageBelowParams(Params):
    max: float = Field(0.95, gt=0, le=1)


class KVUsageBelow:
    def __init__(self, params: KVUsageBelowParams) -> None:
        self.max = params.max

    def keep(self, candidates: Sequence[EndpointView]) -> list[EndpointView]:
        return [e for e in candidates if e.kv_usage is None or e.kv_usage < self.max]


# -- scorers ---------------------------------------------------------------------


class Scorer(Protocol):
    #: Whether ``score`` looks at ``RequestView.tokens``.
    uses_tokens: bool

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        """Scores in [0, 1], one per candidate, and a memo for ``picked``."""
        ...

    def picked(self, memo: Any, endpoint: EndpointView) -> None: ...

    def forget(self, endpoint_id: str) -> None: ...

    def index_stats(self) -> IndexStats | None: ...


class _Stateless:
    uses_tokens = False

    def picked(self, memo: Any, endpoint: EndpointView) -> None:
        return None

    def forget(self, endpoint_id: str) -> None:
        return None

    def index_stats(self) -> IndexStats | None:
        return None


class LowLoad(_Stateless):
    """1 for the least loaded (per weight), falling linearly to 0 for the most."""

    def __init__(self, params: Params) -> None:
        pass

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        loads = [e.load / e.weight for e in candidates]
        top = max(loads)
        return ([1.0 - x / top if top else 1.0 for x in loads], None)


class KVFree(_Stateless):
    """Share of KV cache free (0.5 when unknown)."""

    def __init__(self, params: Params) -> None:
        pass

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        return ([0.5 if e.kv_usage is None else 1.0 - e.kv_usage for e in candidates], None)


class WeightScore(_Stateless):
    def __init__(self, params: Params) -> None:
        pass

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        top = max(e.weight for e in candidates)
        return ([e.weight / top for e in candidates], None)


class PrefixMatchParams(IndexParams):
    pass


class PrefixMatch:
    """Share of the prompt's blocks an endpoint is believed to hold."""

    uses_tokens = False

    def __init__(self, params: PrefixMatchParams) -> None:
        self.params = params
        self.index = PrefixIndex(params.max_index_entries)

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        text = canonical_prompt(request.body)
        hashes = block_hashes(text, self.params.block_chars, model_seed(request.model))
        if not hashes:
            return ([0.0] * len(candidates), hashes)
        matches = self.index.match(hashes, [e.id for e in candidates])
        return ([matches.get(e.id, 0) / len(hashes) for e in candidates], hashes)

    def picked(self, memo: Any, endpoint: EndpointView) -> None:
        p = self.params
        self.index.insert(
            memo,
            endpoint.id,
            capacity_blocks(endpoint, p.default_capacity_tokens, p.chars_per_token, p.block_chars),
        )

    def forget(self, endpoint_id: str) -> None:
        self.index.forget(endpoint_id)

    def index_stats(self) -> IndexStats:
        return self.index.stats()


class RingOwnerParams(Params):
    prefix_chars: int = Field(256, ge=1)
    epsilon: float = Field(0.25, gt=0)
    vnodes: int = Field(100, ge=1)


class RingOwner(_Stateless):
    """1 for the bounded-load ring owner of the prompt's first characters."""

    def __init__(self, params: RingOwnerParams) -> None:
        self.params = params
        self._rings = RingCache(params.vnodes)

    def score(
        self, request: RequestView, candidates: Sequence[EndpointView]
    ) -> tuple[list[float], Any]:
        key = canonical_prompt(request.body)[: self.params.prefix_chars]
        seed = model_seed(request.model)
        order, _ = ring_order(
            self._rings.ring(candidates),
            block_hashes(key, len(key) or 1, seed)[0] if key else seed,
            candidates,
            self.params.epsilon,
        )
        return ([1.0 if e is order[0] else 0.0 for e in candidates], None)


@dataclass(frozen=True)
class Component:
    params_model: type[BaseModel]
    build: Callable[[Any], Any]


FILTERS: dict[str, Component] = {
    "not_overloaded": Component(NotOverloadedParams, NotOverloaded),
    "label": Component(LabelParams, Label),
    "kv_usage_below": Component(KVUsageBelowParams, KVUsageBelow),
}
SCORERS: dict[str, Component] = {
    "low_load": Component(Params, LowLoad),
    "kv_free": Component(Params, KVFree),
    "weight": Component(Params, WeightScore),
    "prefix_match": Component(PrefixMatchParams, PrefixMatch),
    "ring_owner": Component(RingOwnerParams, RingOwner),
    "precise_prefix": Component(PrecisePrefixParams, PrecisePrefix),
    "low_latency": Component(LowLatencyParams, LowLatency),
}


class ComponentSpec(BaseModel):
    """``name`` or ``{name: ..., <params>}``; scorers also take ``weight``."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str
    weight: float = Field(1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _resolve(kind: str, spec: ComponentSpec, registry: dict[str, Component]) -> Any:
    component = registry.get(spec.name)
    if component is None:
        raise PydanticCustomError(
            "unknown_component",
            "unknown {kind} '{name}' (known: {known})",
            {"kind": kind, "name": spec.name, "known": ", ".join(sorted(registry))},
        )
    try:
        params = component.params_model.model_validate(spec.params())
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PydanticCustomError(
            "component_params",
            "bad parameters for {kind} '{name}': {details}",
            {"kind": kind, "name": spec.name, "details": details},
        ) from None
    return params


class CompositeParams(Params):
    filters: tuple[ComponentSpec, ...] = ()
    scorers: tuple[ComponentSpec, ...] = ()
    picker: Literal["max", "weighted_random"] = "max"
    #: Each component's parameters, validated once, at load.
    _filters: list[tuple[Component, Any]] = PrivateAttr(default_factory=list)
    _scorers: list[tuple[float, Component, Any]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _components_exist(self) -> CompositeParams:
        for spec in self.filters:
            params = _resolve("filter", spec, FILTERS)
            self._filters.append((FILTERS[spec.name], params))
        for spec in self.scorers:
            params = _resolve("scorer", spec, SCORERS)
            self._scorers.append((spec.weight, SCORERS[spec.name], params))
        return self


class Composite:
    name = "composite"

    def __init__(self, params: CompositeParams, rng: random.Random) -> None:
        self._rng = rng
        self.picker = params.picker
        self.filters: list[Filter] = [c.build(p) for c, p in params._filters]
        self.scorers: list[tuple[float, Scorer]] = [(w, c.build(p)) for w, c, p in params._scorers]
        self._total_weight = sum(w for w, _ in self.scorers)
        #: Prompts are tokenized for this policy only if a scorer reads tokens.
        self.uses_tokens = any(s.uses_tokens for _, s in self.scorers)

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        kept = list(candidates)
        for f in self.filters:
            narrowed = f.keep(kept)
            if narrowed:
                kept = narrowed
        totals = [0.0] * len(kept)
        memos: list[Any] = []
        for weight, scorer in self.scorers:
            scores, memo = scorer.score(request, kept)
            memos.append(memo)
            for i, s in enumerate(scores):
                totals[i] += weight * s
        if self._total_weight:
            totals = [t / self._total_weight for t in totals]
        order = list(range(len(kept)))
        self._rng.shuffle(order)
        if self.picker == "max":
            order.sort(key=lambda i: -totals[i])
        else:
            # Weighted sampling without replacement (Efraimidis-Spirakis).
            keys = {i: self._rng.random() ** (1.0 / max(totals[i], 1e-9)) for i in order}
            if not self.scorers:
                keys = {i: float(-n) for n, i in enumerate(order)}
            order.sort(key=lambda i: -keys[i])
        ranked = [kept[i] for i in order]
        kept_ids = {e.id for e in kept}
        dropped = [e for e in candidates if e.id not in kept_ids]
        for (_, scorer), memo in zip(self.scorers, memos, strict=True):
            scorer.picked(memo, ranked[0])
        return Decision((*ranked, *dropped), "score", prompt_len=0)

    def observe(self, decision: Decision, endpoint_id: str, outcome: Outcome) -> None:
        return None

    def forget(self, endpoint_id: str) -> None:
        for _, scorer in self.scorers:
            scorer.forget(endpoint_id)

    def index_stats(self) -> IndexStats | None:
        stats = [s for _, scorer in self.scorers if (s := scorer.index_stats()) is not None]
        return IndexStats.combine(stats)


RANDOM_PRESET = CompositeParams(picker="weighted_random")
WEIGHTED_PRESET = CompositeParams(scorers=(ComponentSpec(name="weight"),), picker="weighted_random")
