"""One process's counters: the store when no Redis is configured.

It is also the reference the Redis scripts (redis.py) mirror line for line: the
contract tests run the same cases against both. Everything happens between two
awaits, so a plan is checked and charged atomically without a lock.

Choices both stores share (base.py leaves them open):

* A plan naming one rate key twice is charged cumulatively: the second charge
  sees the first one's TAT.
* When several rates refuse, the verdict names the one that frees up last
  (first on ties): its ``retry_after`` is then when every rate allows the plan,
  and still "the seconds until that rate would allow the cost".
* A charge larger than the whole limit can never pass: refused with
  ``retry_after`` = the period, and nothing changes.
* Times are floats: sums of ``cost*T`` carry rounding errors, so a limit
  allows a thousandth of a unit more than exact (``SLACK``). A burst of exactly
  ``limit`` always passes and the next unit never does.
* A full budget's ``retry_after`` is the time until the next UTC midnight (the
  day's key is then no longer the one asked for), or until the key expires if
  that is sooner, and at least 1 s.
* Counters are read even when an earlier limit refused: ``in_flight`` and
  ``budget_used`` are reported whenever the plan has a lease or a budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from router.quota.base import (
    Plan,
    RateCharge,
    RateStatus,
    Refusal,
    Settlement,
    Verdict,
)

#: Units of tolerance on every rate decision (float rounding; see above).
SLACK = 1e-3
DAY = 86400
#: Seconds between sweeps of expired counters (an idle tenant's TAT, a past
#: day's budget), so a long-running process does not accumulate them.
SWEEP_EVERY = 60.0


def check_plan(plan: Plan) -> None:
    """Refuse plans no store can evaluate (a caller's bug, not a tenant's)."""
    for charge in plan.rates:
        if charge.rate.limit < 1 or not charge.rate.period > 0 or charge.cost < 0:
            raise ValueError(f"invalid rate charge {charge!r}")
    if plan.lease is not None and plan.lease.limit < 0:
        raise ValueError(f"invalid lease {plan.lease!r}")
    if plan.budget is not None and plan.budget.limit < 0:
        raise ValueError(f"invalid budget {plan.budget!r}")


def check_settlement(plan: Plan, settlement: Settlement) -> None:
    check_plan(plan)
    if len(settlement.deltas) != len(plan.rates):
        raise ValueError(f"{len(settlement.deltas)} deltas for {len(plan.rates)} rates")


def seconds_to_midnight(wall: float) -> float:
    """Until the next UTC day: Unix time has no leap seconds, so days are 86400 s."""
    return DAY - wall % DAY


def budget_retry_after(wall: float, expire_at: float) -> float:
    return max(1.0, min(seconds_to_midnight(wall), expire_at - wall))


def rate_status(charge: RateCharge, tat: float, now: float) -> RateStatus:
    period = charge.rate.period
    step = period / charge.rate.limit
    used = max(0.0, tat - now)
    remaining = math.floor((period - used) / step + SLACK)
    return RateStatus(charge.rate.limit, min(max(remaining, 0), charge.rate.limit), used)


class MemoryStore:
    """GCRA TATs, lease holders and budgets in dicts, on an injected clock.

    ``clock`` times the rates (monotonic: a wall-clock step must not refill or
    freeze every limit); ``wall`` dates the budgets, whose keys and
    ``expire_at`` are Unix times.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._tats: dict[str, float] = {}
        self._leases: dict[str, set[str]] = {}
        #: key -> (tokens used, Unix time at which they are forgotten)
        self._budgets: dict[str, tuple[int, float]] = {}
        self._next_sweep = clock() + SWEEP_EVERY

    async def admit(self, plan: Plan) -> Verdict:
        return self._evaluate(plan, charge=True)

    async def peek(self, plan: Plan) -> Verdict:
        return self._evaluate(plan, charge=False)

    def _evaluate(self, plan: Plan, charge: bool) -> Verdict:
        check_plan(plan)
        now = self._clock()
        wall = self._wall()
        self._sweep(now, wall)
        refused: Refusal | None = None
        refused_rate: int | None = None
        wait = 0.0
        tentative: dict[str, float] = {}
        for i, rc in enumerate(plan.rates):
            period = rc.rate.period
            step = period / rc.rate.limit
            cost = rc.cost if charge else 0
            base = max(tentative.get(rc.key, self._tats.get(rc.key, now)), now)
            new = base + cost * step
            if new - now > period + step * SLACK:
                never = cost * step > period + step * SLACK
                this_wait = period if never else new - now - period
                if refused_rate is None or this_wait > wait:
                    refused, refused_rate, wait = "rate", i, this_wait
            else:
                tentative[rc.key] = new

        in_flight: int | None = None
        adding = False
        if plan.lease is not None:
            holders = self._leases.get(plan.lease.key, set())
            in_flight = len(holders)
            adding = plan.lease.holder not in holders
            if refused is None and adding and in_flight >= plan.lease.limit:
                refused, wait = "concurrency", 1.0

        budget_used: int | None = None
        if plan.budget is not None:
            budget_used = self._budget_used(plan.budget.key, wall)
            if refused is None and budget_used >= plan.budget.limit:
                refused, wait = "budget", budget_retry_after(wall, plan.budget.expire_at)

        admitted = refused is None
        if admitted and charge:
            self._tats.update(tentative)
            if plan.lease is not None and in_flight is not None:
                self._leases.setdefault(plan.lease.key, set()).add(plan.lease.holder)
                in_flight += int(adding)
        statuses = tuple(
            rate_status(
                rc,
                tentative[rc.key] if admitted else self._tats.get(rc.key, now),
                now,
            )
            for rc in plan.rates
        )
        return Verdict(
            admitted=admitted,
            rates=statuses,
            refused=refused,
            refused_rate=refused_rate,
            retry_after=wait,
            in_flight=in_flight,
            budget_used=budget_used,
        )

    async def settle(self, plan: Plan, settlement: Settlement) -> None:
        check_settlement(plan, settlement)
        now = self._clock()
        for rc, delta in zip(plan.rates, settlement.deltas, strict=True):
            if delta == 0:
                continue
            step = rc.rate.period / rc.rate.limit
            tat = max(max(self._tats.get(rc.key, now), now) + delta * step, now)
            if tat > now:
                self._tats[rc.key] = tat
            else:
                self._tats.pop(rc.key, None)  # whole again: nothing to remember
        if plan.lease is not None:
            holders = self._leases.get(plan.lease.key)
            if holders is not None:
                holders.discard(plan.lease.holder)
                if not holders:
                    del self._leases[plan.lease.key]
        if plan.budget is not None and settlement.budget_tokens > 0:
            used = self._budget_used(plan.budget.key, self._wall())
            self._budgets[plan.budget.key] = (
                used + settlement.budget_tokens,
                plan.budget.expire_at,
            )

    def _budget_used(self, key: str, wall: float) -> int:
        entry = self._budgets.get(key)
        if entry is None:
            return 0
        if wall >= entry[1]:
            del self._budgets[key]
            return 0
        return entry[0]

    def _sweep(self, now: float, wall: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        self._budgets = {k: b for k, b in self._budgets.items() if wall < b[1]}

    async def reset(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self._tats.pop(key, None)
            self._leases.pop(key, None)
            self._budgets.pop(key, None)

    async def close(self) -> None:
        pass
