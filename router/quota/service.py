"""The tenants' quota service: plans from configs, the store, settlements.

``Quotas`` turns a tenant's config into the ``Plan`` of one request (which
counters, with which costs), and settles finished requests in the background
(a settle is a store round trip the client need not wait for). ``StoreKeeper``
is the lifecycle peer that drains settlements and closes stores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.config import Config, QuotaConfig
from router.metrics import Metrics
from router.quota.base import (
    Budget,
    Lease,
    Plan,
    QuotaStore,
    QuotaUnavailable,
    Rate,
    RateCharge,
    RateStatus,
    Settlement,
)
from router.quota.guard import GuardedStore
from router.tenants import Tenant

if TYPE_CHECKING:
    from router.state import AppState

LOG = logging.getLogger("kvroute.quota")

MINUTE = 60.0
DAY = 86_400
#: A day's key outlives its day by this much (so a late settle still finds it).
DAY_MARGIN = 3600
#: Seconds a stopping router waits for its last settlements.
DRAIN_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Kinds:
    """Which of a plan's rates count requests and which count tokens."""

    requests: tuple[int, ...]
    tokens: tuple[int, ...]
    #: Rates of the tenant on this one model (``model_limits``).
    per_model: tuple[int, ...] = ()


def counter_key(tenant: str, what: str, model: str | None = None) -> str:
    """The key of one of a tenant's counters (``rpm``, ``tpm``, ``conc``, ``day``).
    The tenant is a Redis Cluster hash tag: its keys share a slot, as a Lua
    script over several of them requires."""
    key = f"{{{tenant}}}:{what}"
    return key if model is None else f"{key}:{model}"


def tenant_keys(tenant: str, models: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every counter of a tenant except the day's budget (for a reset)."""
    keys = [counter_key(tenant, what) for what in ("rpm", "tpm", "conc")]
    for model in models:
        keys += [counter_key(tenant, "rpm", model), counter_key(tenant, "tpm", model)]
    return tuple(keys)


def day_key(tenant: str, now: float) -> tuple[str, int]:
    day = int(now // DAY)
    stamp = time.strftime("%Y%m%d", time.gmtime(day * DAY))
    return counter_key(tenant, "day", stamp), (day + 1) * DAY + DAY_MARGIN


class Quotas:
    """Builds plans from tenants' configs; the stage and /admin/tenants use it."""

    def __init__(
        self,
        config: Config,
        store: QuotaStore,
        pending: set[asyncio.Task[None]] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config: QuotaConfig = config.quotas
        self.store = store
        self.wall = wall
        #: Settlements under way (kept so they are not collected mid-flight;
        #: shared with the Quotas a reload makes).
        self.pending: set[asyncio.Task[None]] = set() if pending is None else pending

    def plan(
        self, tenant: Tenant, model: str | None, tokens: int, holder: str
    ) -> tuple[Plan, Kinds]:
        tc = tenant.config
        name = tenant.name
        rates: list[RateCharge] = []
        requests: list[int] = []
        token_rates: list[int] = []
        per_model = tc.model_limits.get(model) if model is not None else None
        model_rpm = per_model.rpm if per_model else None
        model_tpm = per_model.tpm if per_model else None
        scoped: list[int] = []
        for key, limit, cost, kind, on_model in (
            (counter_key(name, "rpm"), tc.rpm, 1, requests, False),
            (counter_key(name, "tpm"), tc.tpm, tokens, token_rates, False),
            (counter_key(name, "rpm", model), model_rpm, 1, requests, True),
            (counter_key(name, "tpm", model), model_tpm, tokens, token_rates, True),
        ):
            if limit:
                kind.append(len(rates))
                if on_model:
                    scoped.append(len(rates))
                rates.append(RateCharge(key, Rate(limit, MINUTE), min(cost, limit)))
        lease = (
            Lease(counter_key(name, "conc"), tc.max_concurrent, holder)
            if tc.max_concurrent
            else None
        )
        budget = None
        if tc.daily_tokens:
            key, expire_at = day_key(name, self.wall())
            budget = Budget(key, tc.daily_tokens, expire_at)
        return Plan(tuple(rates), lease, budget), Kinds(
            tuple(requests), tuple(token_rates), tuple(scoped)
        )

    def counts_tokens(self, tenant: Tenant, model: str) -> bool:
        tc = tenant.config
        per_model = tc.model_limits.get(model)
        return bool(tc.tpm or tc.daily_tokens or (per_model and per_model.tpm))

    def limited(self, tenant: Tenant, model: str) -> bool:
        tc = tenant.config
        return bool(
            tc.rpm or tc.tpm or tc.max_concurrent or tc.daily_tokens or model in tc.model_limits
        )

    async def usage(self, tenant: Tenant) -> dict[str, Any]:
        """What the tenant has used of its limits (for /admin/tenants); raises
        QuotaUnavailable when the store cannot say."""
        tc = tenant.config
        plan, kinds = self.plan(tenant, None, 0, "-")
        verdict = await self.store.peek(plan)
        out: dict[str, Any] = {
            "requests_per_minute": _window(verdict.rates, kinds.requests, kinds.per_model, False),
            "tokens_per_minute": _window(verdict.rates, kinds.tokens, kinds.per_model, False),
            "in_flight": verdict.in_flight,
            "max_concurrent": tc.max_concurrent,
        }
        if plan.budget is not None:
            used = verdict.budget_used or 0
            out["tokens_today"] = used
            out["daily_tokens"] = plan.budget.limit
            out["budget_left"] = max(0, plan.budget.limit - used)
        per_model = {}
        for model in tc.model_limits:
            mplan, mk = self.plan(tenant, model, 0, "-")
            mverdict = await self.store.peek(Plan(mplan.rates))
            per_model[model] = {
                "requests_per_minute": _window(mverdict.rates, mk.requests, mk.per_model, True),
                "tokens_per_minute": _window(mverdict.rates, mk.tokens, mk.per_model, True),
            }
        if per_model:
            out["models"] = per_model
        return out

    async def reset(self, tenant: Tenant) -> None:
        """Forget the tenant's counters: its windows, slots and today's tokens."""
        keys = tenant_keys(tenant.name, tuple(tenant.config.model_limits))
        await self.store.reset((*keys, day_key(tenant.name, self.wall())[0]))

    def settle_later(self, plan: Plan, settlement: Settlement, metrics: Metrics) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(plan, settlement, metrics))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _settle(self, plan: Plan, settlement: Settlement, metrics: Metrics) -> None:
        try:
            await self.store.settle(plan, settlement)
        except QuotaUnavailable:
            metrics.quota_settle_failures.inc()
        except Exception:
            LOG.exception("settling a request's quota failed")
            metrics.quota_settle_failures.inc()

    async def drain(self) -> None:
        """Wait (briefly) for the settlements under way."""
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=DRAIN_TIMEOUT)


def _window(
    statuses: tuple[RateStatus, ...],
    indices: tuple[int, ...],
    scoped: tuple[int, ...],
    on_model: bool,
) -> dict[str, Any] | None:
    """The tenant's own (or its per-model) limit among ``indices``, as admin JSON."""
    chosen = [i for i in indices if (i in scoped) == on_model]
    if not chosen:
        return None
    status = statuses[chosen[0]]
    return {
        "limit": status.limit,
        "used": status.limit - status.remaining,
        "remaining": status.remaining,
        "reset_s": round(status.reset, 3),
    }


def store_status(quotas: Quotas) -> dict[str, Any]:
    """Where the counters live and whether that store answers (for /admin)."""
    store = quotas.store
    status: dict[str, Any] = {
        "kind": "redis" if quotas.config.redis else "memory",
        "on_failure": quotas.config.on_failure,
    }
    if isinstance(store, GuardedStore):
        status.update(
            up=store.up,
            failures=store.failures,
            last_error=store.last_error,
        )
    else:
        status["up"] = True
    return status


class StoreKeeper:
    """Lifecycle peer: closes quota and cache stores a reload replaced, and at
    stop drains the last settlements and closes the stores."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.state.quotas.drain()
        await self._close_retired()
        await self.state.quotas.store.close()
        await self.state.cache.close()

    async def reconfigure(self, old: Config, new: Config) -> None:
        await self._close_retired()

    async def _close_retired(self) -> None:
        retired, self.state.retired_stores = self.state.retired_stores, []
        for store in retired:
            try:
                await store.close()
            except Exception:
                LOG.exception("closing a replaced quota store failed")
