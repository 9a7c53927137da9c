"""What a request asks of a tenant's limits, and what the store answers.

Rates are kept by GCRA (the generic cell rate algorithm): per limit, one
number, the theoretical arrival time (TAT). ``limit`` units per ``period``
seconds means one unit every ``T = period / limit`` seconds, with a burst of
the whole limit (tolerance ``period - T``). A charge of ``cost`` units is
allowed when ``max(TAT, now) + cost*T - now <= period``; it then moves TAT to
``max(TAT, now) + cost*T``. ``remaining`` is ``floor((period - (TAT - now)) / T)``
and ``reset`` (until the limit is whole again) is ``max(0, TAT - now)``.
Settling moves TAT by ``delta*T`` (negative: a refund), never below ``now``.

A plan is all or nothing: if any of its limits refuses, nothing is charged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` units per ``period`` seconds."""

    limit: int
    period: float = 60.0


@dataclass(frozen=True, slots=True)
class RateCharge:
    #: The counter's key, under the store's prefix (e.g. ``rpm:acme``).
    key: str
    rate: Rate
    #: Units this request takes (1 for a request; the estimated tokens).
    cost: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A slot among ``limit`` concurrent ones, held by ``holder`` (a request id)."""

    key: str
    limit: int
    holder: str


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens per UTC day: admitted while fewer than ``limit`` are used; the
    tokens are added when the request settles."""

    #: Includes the day, e.g. ``day:acme:20261130``; expires after the day.
    key: str
    limit: int
    #: Unix time at which the key may expire (the end of its day, plus margin).
    expire_at: int


@dataclass(frozen=True, slots=True)
class Plan:
    rates: tuple[RateCharge, ...] = ()
    lease: Lease | None = None
    budget: Budget | None = None


@dataclass(frozen=True, slots=True)
class RateStatus:
    limit: int
    #: Units still available at once after this verdict.
    remaining: int
    #: Seconds until the limit is whole again.
    reset: float


Refusal = Literal["rate", "concurrency", "budget"]


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    #: One per ``plan.rates``, in order (after the charge, if admitted).
    rates: tuple[RateStatus, ...]
    #: What refused (None if admitted), and for a rate, its index in ``plan.rates``.
    refused: Refusal | None = None
    refused_rate: int | None = None
    #: Seconds until a retry could be admitted (0 if admitted; for a full
    #: concurrency limit, an estimate: 1).
    retry_after: float = 0.0
    #: Slots held (after this verdict) and tokens used today, when the plan has them.
    in_flight: int | None = None
    budget_used: int | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a finished request really cost."""

    #: Per ``plan.rates``, in order: real cost minus the cost charged (may be negative).
    deltas: tuple[int, ...]
    #: Tokens to add to the day's budget.
    budget_tokens: int = 0


class QuotaStore(Protocol):
    async def admit(self, plan: Plan) -> Verdict:
        """Charge ``plan`` if every limit allows it; otherwise charge nothing."""
        ...

    async def settle(self, plan: Plan, settlement: Settlement) -> None:
        """Adjust an admitted plan to what the request cost, and free its lease."""
        ...

    async def peek(self, plan: Plan) -> Verdict:
        """The state of ``plan``'s limits, charging nothing (costs are ignored)."""
        ...

    async def reset(self, keys: tuple[str, ...]) -> None:
        """Forget these counters (a tenant's reset)."""
        ...

    async def close(self) -> None: ...


class QuotaUnavailable(Exception):
    """The store could not answer (Redis down, slow or refusing)."""
