"""Policies keyed by something the request names: consistent_hash, session_affinity."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.base import Decision, EndpointView, RequestView, StatelessPolicy
from policies.prompt import canonical_prompt
from policies.ring import RingCache, bounded_capacity, ring_order


class KeyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Where the key comes from: ``header:<name>``, ``user`` (the OpenAI field),
    #: or ``prefix`` (the first ``prefix_chars`` of the prompt).
    key: str = "prefix"
    prefix_chars: int = Field(256, ge=1)
    vnodes: int = Field(100, ge=1)

    @field_validator("key")
    @classmethod
    def _source(cls, key: str) -> str:
        if key in ("user", "prefix") or (key.startswith("header:") and len(key) > 7):
            return key.lower()
        raise ValueError("key must be 'user', 'prefix' or 'header:<name>'")


def request_key(request: RequestView, params: KeyParams) -> str | None:
    if params.key == "prefix":
        text = canonical_prompt(request.body)
        return text[: params.prefix_chars] if text else None
    if params.key == "user":
        user = request.body.get("user")
        return user if isinstance(user, str) and user else None
    return request.headers.get(params.key[len("header:") :]) or None


def key_hash(model: str, key: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{model}\x00{key}".encode())


class ConsistentHashParams(KeyParams):
    #: Bounded load: past (1 + epsilon) x its fair share, an endpoint passes the
    #: key to the next on the ring. ``null`` turns the bound off.
    epsilon: float | None = Field(0.25, gt=0)


class ConsistentHash(StatelessPolicy):
    name = "consistent_hash"

    def __init__(self, params: ConsistentHashParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng
        self._rings = RingCache(params.vnodes)

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        key = request_key(request, self.params)
        if key is None:
            ranked = sorted(candidates, key=lambda e: e.load / e.weight)
            return Decision(tuple(ranked), "no_key")
        ring = self._rings.ring(candidates)
        order, owner = ring_order(
            ring, key_hash(request.model, key), candidates, self.params.epsilon
        )
        return Decision(tuple(order), "ring_owner" if owner else "ring_spill")


class SessionAffinityParams(KeyParams):
    key: str = "header:x-session-id"
    epsilon: float = Field(0.25, gt=0)
    #: Sessions remembered (least recent forgotten first).
    max_sessions: int = Field(100_000, ge=1)
    #: What an unhealthy or overloaded sticky endpoint's session does.
    on_overload: Literal["move", "stay"] = "move"


class SessionAffinity(StatelessPolicy):
    """Sticky sessions: a session stays where it started while that endpoint is
    available and not overloaded. New sessions go to their ring owner, so
    router replicas agree on where a session starts."""

    name = "session_affinity"

    def __init__(self, params: SessionAffinityParams, rng: random.Random) -> None:
        self.params = params
        self._rings = RingCache(params.vnodes)
        #: Endpoint id by the session's ``key_hash`` (the model's and the key's):
        #: a client's key, up to a header's or a body's size, is not kept.
        self._sessions: OrderedDict[int, str] = OrderedDict()

    def rank(self, request: RequestView, candidates: Sequence[EndpointView]) -> Decision:
        key = request_key(request, self.params)
        if key is None:
            ranked = sorted(candidates, key=lambda e: e.load / e.weight)
            return Decision(tuple(ranked), "no_key")
        session = key_hash(request.model, key)
        sticky = self._sessions.get(session)
        by_id = {e.id: e for e in candidates}
        if sticky is not None and sticky in by_id:
            endpoint = by_id[sticky]
            cap = bounded_capacity(candidates, self.params.epsilon)
            if self.params.on_overload == "stay" or endpoint.load + 1 <= cap[sticky]:
                self._sessions.move_to_end(session)
                rest = sorted(
                    (e for e in candidates if e.id != sticky), key=lambda e: e.load / e.weight
                )
                return Decision((endpoint, *rest), "sticky")
        ring = self._rings.ring(candidates)
        order, _ = ring_order(ring, session, candidates, self.params.epsilon)
        self._sessions[session] = order[0].id
        self._sessions.move_to_end(session)
        if len(self._sessions) > self.params.max_sessions:
            self._sessions.popitem(last=False)
        return Decision(tuple(order), "new_session" if sticky is None else "moved")

    def forget(self, endpoint_id: str) -> None:
        for key in [k for k, v in self._sessions.items() if v == endpoint_id]:
            del self._sessions[key]
