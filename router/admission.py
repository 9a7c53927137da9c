"""Admission: a bounded, fair queue in front of a saturated model (README "Admission").

When every endpoint of a model is busy (the requests of the model in progress
reach the sum of its endpoints' ``max_concurrency``), sending more would only
queue them inside the backends, where nobody orders them by priority and a
client that left still holds a slot. They wait here instead, per model:

    enter ──(admitted < capacity, nobody waiting)──> Ticket at once
      ├──(max_queue already waiting)──> QueueFull       503 queue_full, Retry-After
      └──> FairQueue ──(a release or a kick frees a slot)──> Ticket (ticket.waited)
                     ──(max_wait passes first)──> QueueTimeout    503 queue_timeout, Retry-After
                     ──(the client leaves)──> removed (a slot granted that instant is freed)

A newcomer never barges past waiters: with anyone waiting, it waits too. A slot
is counted when it is granted, not when the waiter's task resumes, so a burst
of releases cannot admit more than the capacity; the waiter that is cancelled
between the two gives its slot back.

The counts are this router process's own: several replicas each admit up to a
model's whole capacity (the backends' own queues absorb the difference).

Its errors extend the tree in router/errors.py:

    RouterError
    └── AdmissionRefused     503 service_unavailable, with Retry-After
        ├── QueueFull        queue_full
        └── QueueTimeout     queue_timeout
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypedDict, TypeVar

from router.config import AdmissionConfig
from router.errors import RouterError

if TYPE_CHECKING:
    from router.pipeline_types import Handler
    from router.registry import EndpointRegistry
    from router.request import InferenceRequest
    from router.state import AppState
    from router.types import Send

T = TypeVar("T", bound=Hashable)


# -- errors -------------------------------------------------------------------


class AdmissionRefused(RouterError):
    """The model stayed saturated: the client should come back after Retry-After."""

    status = 503
    type = "service_unavailable"
    #: A metric label, from a fixed set.
    reason: str = "admission"

    def __init__(self, message: str, retry_after: int, waited: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: Seconds the request waited before it was refused (0: refused at once).
        self.waited = waited

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"retry-after", str(self.retry_after).encode())]


class QueueFull(AdmissionRefused):
    code = "queue_full"
    reason = "queue_full"

    def __init__(self, model: str, max_queue: int, retry_after: int, waited: float = 0.0) -> None:
        why = f"its queue is full ({max_queue} requests waiting)" if max_queue else "none may wait"
        if waited:
            why += " and a request of higher priority took this one's place"
        super().__init__(
            f"Every endpoint of model `{_shown(model)}` is busy and {why}; retry later.",
            retry_after,
            waited,
        )


class QueueTimeout(AdmissionRefused):
    code = "queue_timeout"
    reason = "queue_timeout"

    def __init__(self, model: str, max_wait: float, waited: float, retry_after: int) -> None:
        super().__init__(
            f"Every endpoint of model `{_shown(model)}` stayed busy for the {max_wait:g} s "
            "a request may wait; retry later.",
            retry_after,
            waited,
        )


def _shown(model: str) -> str:
    return model if len(model) <= 128 else model[:125] + "..."


# -- the fair queue -----------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Tenant(Generic[T]):
    name: str
    weight: int
    entries: deque[_Entry[T]] = field(default_factory=deque)
    live: int = 0
    #: Removed entries still in ``entries`` (dropped when they reach its head).
    dead: int = 0
    deficit: int = 0


@dataclass(eq=False, slots=True)
class _Class(Generic[T]):
    name: str
    weight: int
    #: Tenants with someone waiting, in round-robin order (the head's turn).
    ring: OrderedDict[str, _Tenant[T]] = field(default_factory=OrderedDict)
    live: int = 0
    #: Start-time fair queuing: the virtual time its next grant starts at.
    finish: float = 0.0


@dataclass(eq=False, slots=True)
class _Entry(Generic[T]):
    item: T
    cls: _Class[T]
    tenant: _Tenant[T]
    #: Arrival order in the whole queue.
    seq: int = 0
    live: bool = True


class FairQueue(Generic[T]):
    """Waiters ordered by priority class, and fairly between the tenants of a class.

    Two levels, unit costs:

    * Between classes, weighted fair queuing in virtual time (start-time fair
      queuing, Goyal et al.): each class's grants are spaced ``1 / weight``
      apart in virtual time, and the next grant goes to the waiting class
      whose grant would finish first (ties to the heavier class). While
      several classes stay backlogged each gets exactly its weight's share:
      with high=16, normal=4, batch=1, 16, 4 and 1 of every 21 grants. A class
      with nobody waiting takes nothing (work-conserving) and saves up no
      credit: when it waits again it starts from the current virtual time. So
      no class starves, and a high request that arrives while batch requests
      wait is served next: its grant finishes 1/16 after now, batch's a whole
      unit after its last. (Deficit round robin over classes, tried first,
      handed batch a turn after every high grant whenever high's queue ran
      empty: sparse interactive traffic then waited behind batch half the
      time; benchmarks/README.md, "admission".)
    * Within a class, deficit round robin (Shreedhar and Varghese's DRR) over
      its tenants with waiters, each serving up to its weight in items, first
      come first served within a tenant. A tenant that starts waiting joins
      the end of the ring, so a burst queued by another tenant delays it by
      one round at most (the other tenants' weights), however long the burst.

    A tiny example, high=2 and batch=1; in high, tenant ``a`` (weight 2) queued
    a1 a2 a3 and ``b`` (weight 1) b1, after batch's ``c`` queued c1 c2. High's
    grants finish at 0.5, 1, 1.5, 2 in virtual time, batch's at 1 and 2::

        pop  class (finish)   tenant turn   item
        1    high (0.5)       a (2 left)    a1
        2    high (1, tie)    a (1 left)    a2   a to the ring's end
        3    batch (1)        c             c1
        4    high (1.5)       b             b1   b has no more waiters: it leaves
        5    high (2, tie)    a             a3
        6    batch (2)        c             c2

    ``remove`` (a waiter that timed out or left) is lazy: the entry is marked
    and skipped when it reaches its tenant's head, so it costs O(1); a tenant
    whose removed entries outnumber its live ones is compacted (amortised
    O(1)), and one with none live leaves its ring at once, so memory follows
    the live waiters. A removal spends no turn and no deficit.

    A class name not among the weights (one removed by a reload while its
    requests waited) is served with weight 1. Items must be hashable and
    queued at most once at a time.
    """

    def __init__(self, priorities: Mapping[str, int]) -> None:
        self._weights: dict[str, int] = {}
        self._classes: dict[str, _Class[T]] = {}
        #: Classes heaviest first: the order that breaks ties in virtual time.
        self._order: list[_Class[T]] = []
        self._entries: dict[T, _Entry[T]] = {}
        self._seq = 0
        #: Virtual time: the start of the last grant.
        self._vtime = 0.0
        self.set_weights(priorities)

    def set_weights(self, priorities: Mapping[str, int]) -> None:
        """New class weights (a reload); waiters keep their places."""
        if any(weight < 1 for weight in priorities.values()):
            raise ValueError("class weights must be at least 1")
        self._weights = dict(priorities)
        for name in list(self._classes):
            if name not in self._weights and not self._classes[name].live:
                del self._classes[name]
        for name, weight in self._weights.items():
            cls = self._classes.get(name)
            if cls is None:
                self._classes[name] = _Class(name, weight)
            else:
                cls.weight = weight
        for name, cls in self._classes.items():
            if name not in self._weights:
                cls.weight = 1
        self._reorder()

    def _reorder(self) -> None:
        self._order = sorted(self._classes.values(), key=lambda c: (-c.weight, c.name))

    def push(self, item: T, priority: str, tenant: str, weight: int = 1) -> None:
        """Queue ``item`` last of ``tenant``'s waiters in class ``priority``;
        ``weight`` is the tenant's share within the class (the latest counts)."""
        if weight < 1:
            raise ValueError("tenant weight must be at least 1")
        if item in self._entries:
            raise ValueError("item is already queued")
        cls = self._classes.get(priority)
        if cls is None:
            cls = self._classes[priority] = _Class(priority, 1)
            self._reorder()
        if not cls.live:
            # Waiting again: it starts from now in virtual time, with no credit
            # saved up from when it had nobody waiting.
            cls.finish = max(cls.finish, self._vtime)
        queue = cls.ring.get(tenant)
        if queue is None:
            queue = cls.ring[tenant] = _Tenant(tenant, weight)
        queue.weight = weight
        self._seq += 1
        entry = _Entry(item, cls, queue, self._seq)
        queue.entries.append(entry)
        queue.live += 1
        cls.live += 1
        self._entries[item] = entry

    def pop(self, heaviest_only: bool = False) -> T | None:
        """The next item by the schedule, or None when nobody waits (with
        ``heaviest_only``, when nobody of the heaviest class waits)."""
        if not self._entries:
            return None
        top = self._order[0].weight
        waiting = [c for c in self._order if c.live and (c.weight == top or not heaviest_only)]
        if not waiting:
            return None
        # The waiting class whose next grant would finish earliest in virtual
        # time (start + 1/weight); ties go to the heavier class (``_order``).
        cls = min(waiting, key=lambda c: c.finish + 1.0 / c.weight)
        self._vtime = cls.finish
        cls.finish += 1.0 / cls.weight
        tenant = next(iter(cls.ring.values()))
        if tenant.deficit == 0:
            tenant.deficit = tenant.weight
        entry = tenant.entries.popleft()
        while not entry.live:
            tenant.dead -= 1
            entry = tenant.entries.popleft()
        del self._entries[entry.item]
        tenant.live -= 1
        tenant.deficit -= 1
        if not tenant.live:
            del cls.ring[tenant.name]
        elif tenant.deficit == 0:
            cls.ring.move_to_end(tenant.name)
        cls.live -= 1
        if not self._entries:
            # Idle: whoever waits next starts level with the others, owing nothing.
            self._vtime = max(c.finish for c in self._order)
        return entry.item

    def remove(self, item: T) -> bool:
        """Take ``item`` out of the queue; False when it is not queued (any more)."""
        entry = self._entries.pop(item, None)
        if entry is None:
            return False
        entry.live = False
        tenant, cls = entry.tenant, entry.cls
        tenant.live -= 1
        cls.live -= 1
        if not tenant.live:
            del cls.ring[tenant.name]  # its entries, all removed, go with it
            return True
        tenant.dead += 1
        if tenant.dead > tenant.live:
            tenant.entries = deque(e for e in tenant.entries if e.live)
            tenant.dead = 0
        return True

    def heaviest(self, priority: str) -> bool:
        """Whether ``priority`` is (one of) the heaviest class(es)."""
        return self._weights.get(priority, 1) >= self._order[0].weight

    def newest_below(self, priority: str) -> T | None:
        """The newest waiter of the lightest class lighter than ``priority``
        (None if none waits): the one a full queue turns away to make room."""
        weight = self._weights.get(priority, 1)
        lighter = [c for c in self._order if c.live and c.weight < weight]
        if not lighter:
            return None
        cls = min(lighter, key=lambda c: c.weight)
        newest: _Entry[T] | None = None
        for tenant in cls.ring.values():
            for entry in reversed(tenant.entries):
                if entry.live:
                    if newest is None or entry.seq > newest.seq:
                        newest = entry
                    break
        return None if newest is None else newest.item

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: object) -> bool:
        return item in self._entries

    def depth_by_priority(self) -> dict[str, int]:
        """Waiters per class, every configured class included (0 when none waits)."""
        return {cls.name: cls.live for cls in self._order}


# -- the gate -----------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Waiter:
    #: True when granted a slot, False when its deadline passed first or a
    #: higher priority took its place in a full queue (``displaced``).
    future: asyncio.Future[bool]
    granted: bool = False
    displaced: bool = False


@dataclass(eq=False, slots=True)
class _Model:
    name: str
    queue: FairQueue[_Waiter]
    #: Requests holding a slot: tickets not yet released (granted waiters included).
    admitted: int = 0
    #: The capacity most recently seen (None: unbounded).
    capacity: int | None = None
    #: Slots only the heaviest class may take (``admission.reserve``).
    reserve: int = 0

    def free_for(self, heaviest: bool) -> bool:
        """A slot is free for a request of the heaviest class, or of another."""
        if self.capacity is None:
            return True
        bound = self.capacity if heaviest else self.capacity - self.reserve
        return self.admitted < bound

    def grant(self) -> int:
        """Grant waiters slots while there are free ones; how many were granted."""
        granted = 0
        while self.free_for(heaviest=True):
            waiter = self.queue.pop(heaviest_only=not self.free_for(heaviest=False))
            if waiter is None:
                break
            if waiter.future.done():
                # Cancelled: its task, when it runs, finds it neither queued nor granted.
                continue
            waiter.granted = True
            self.admitted += 1
            waiter.future.set_result(True)
            granted += 1
        return granted

    def release(self) -> None:
        self.admitted -= 1
        self.grant()


class Ticket:
    """A slot of a model, held until ``release()`` (idempotent)."""

    __slots__ = ("_model", "model", "priority", "queued", "released", "waited")

    def __init__(self, model: _Model, priority: str, waited: float, queued: bool) -> None:
        self._model = model
        self.model = model.name
        self.priority = priority
        #: Seconds spent in the queue (0.0 when admitted at once).
        self.waited = waited
        #: Whether the request had to wait at all.
        self.queued = queued
        self.released = False

    def release(self) -> None:
        """Free the slot; the next waiters are granted it at once."""
        if not self.released:
            self.released = True
            self._model.release()


class ModelStats(TypedDict):
    admitted: int
    capacity: int | None
    waiting: int
    waiting_by_priority: dict[str, int]


class AdmissionGate:
    """Per-model slots and queues. The caller says each time what the model's
    capacity is (``model_capacity``): the gate keeps no view of the fleet, only
    of the requests it let through.

    ``clock`` measures ``Ticket.waited``; deadlines are the event loop's timers.
    """

    def __init__(
        self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self._models: dict[str, _Model] = {}

    def reconfigure(self, config: AdmissionConfig) -> None:
        """New settings for what comes next: waiters keep their deadlines and
        places (a smaller ``max_queue`` refuses newcomers, evicts nobody); new
        class weights apply from the next grant; disabling admits every waiter."""
        self.config = config
        for state in self._models.values():
            state.queue.set_weights(config.priorities)
            state.reserve = config.reserve
            if not config.enabled:
                state.capacity = None
                state.grant()

    def _model(self, model: str) -> _Model:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _Model(
                model, FairQueue(self.config.priorities), reserve=self.config.reserve
            )
        return state

    async def enter(
        self, model: str, capacity: int | None, tenant: str, priority: str, weight: int
    ) -> Ticket:
        """A slot of ``model``, at once or after waiting; ``capacity`` is how many
        of its requests may be in progress now (None: no bound, or admission off).

        Raises QueueFull when ``max_queue`` requests already wait, QueueTimeout
        when no slot came within ``max_wait``. A caller cancelled while waiting
        holds nothing."""
        config = self.config
        state = self._model(model)
        state.capacity = capacity if config.enabled else None
        if len(state.queue):
            state.grant()  # the capacity may have grown since the last release
        heaviest = state.queue.heaviest(priority)
        if not len(state.queue) and state.free_for(heaviest):
            state.admitted += 1
            return Ticket(state, priority, 0.0, queued=False)
        if len(state.queue) >= config.max_queue:
            # Full: a newcomer of higher priority takes the place of the newest
            # waiter of the lowest class below it; otherwise it is turned away.
            victim = state.queue.newest_below(priority) if config.max_queue else None
            if victim is None:
                raise QueueFull(model, config.max_queue, config.retry_after)
            state.queue.remove(victim)
            # A waiter whose client went away (its future cancelled) may not
            # have unwound yet: it is out of the queue now, and nothing is
            # set on its future (InvalidStateError for the newcomer before).
            if not victim.future.done():
                victim.displaced = True
                victim.future.set_result(False)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future())
        state.queue.push(waiter, priority, tenant, weight)
        start = self.clock()
        if state.reserve:
            state.grant()  # a reserved slot may be free for it, behind lighter waiters
        timer = loop.call_later(config.max_wait, _expire, state, waiter)
        try:
            granted = await waiter.future
        except asyncio.CancelledError:
            # Granted just before the cancellation reached this task: give it back.
            if waiter.granted:
                state.release()
            else:
                state.queue.remove(waiter)
            raise
        finally:
            timer.cancel()
        waited = self.clock() - start
        if waiter.displaced:
            raise QueueFull(model, config.max_queue, config.retry_after, waited)
        if not granted:
            raise QueueTimeout(model, config.max_wait, waited, config.retry_after)
        return Ticket(state, priority, waited, queued=True)

    def kick(self, model: str, capacity: int | None) -> int:
        """The model's capacity changed (an endpoint came back): grant waiters up
        to it. How many were granted."""
        state = self._models.get(model)
        if state is None:
            return 0
        state.capacity = capacity if self.config.enabled else None
        return state.grant()

    def stats(self) -> dict[str, ModelStats]:
        return {
            name: {
                "admitted": state.admitted,
                "capacity": state.capacity,
                "waiting": len(state.queue),
                "waiting_by_priority": state.queue.depth_by_priority(),
            }
            for name, state in self._models.items()
        }


def _expire(state: _Model, waiter: _Waiter) -> None:
    if not waiter.future.done():  # neither granted nor cancelled
        state.queue.remove(waiter)
        waiter.future.set_result(False)


def model_capacity(registry: EndpointRegistry, model: str, now: float) -> int | None:
    """How many requests of ``model`` may be in progress: the sum of
    ``max_concurrency`` over its endpoints that take requests now.

    None (unbounded) when one of them has no ``max_concurrency``; 0 when none
    takes requests (they wait then, for a kick, a release or their deadline).

    An endpoint serving several models counts its whole capacity toward each,
    so their requests together may exceed it (a known approximation: the
    endpoint's own queue takes the excess). A half-open circuit counts only
    while its one trial is not in flight, as ``admits`` says.
    """
    total = 0
    for endpoint in registry.serving(model):
        if not endpoint.admits(now):
            continue
        limit = endpoint.config.max_concurrency
        if limit is None:
            return None
        total += limit
    return total


# -- the pipeline stage ---------------------------------------------------------


class Admission:
    """The stage after Quota: a slot of the model, at once or after waiting in
    its queue by the tenant's priority and weight; held until the answer ends.

    A model whose endpoints set no ``max_concurrency`` (capacity None) is never
    gated; one with no endpoint available (capacity 0) is not gated either, so
    its requests fail over to fallbacks (or get 503) at once instead of waiting.
    """

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        state = self.state
        model = request.routed.model
        capacity = model_capacity(state.registry, model, state.registry.clock())
        tenant = request.ctx.tenant
        if not capacity or tenant is None or not state.config.admission.enabled:
            await call_next(request, send)
            return
        metrics = state.metrics
        try:
            ticket = await state.admission.enter(
                model, capacity, tenant.name, tenant.priority, tenant.config.weight
            )
        except AdmissionRefused as exc:
            metrics.child(metrics.admission_rejections, model, exc.reason).inc()
            if exc.waited:  # the waits of refused requests count too
                metrics.child(metrics.admission_wait, model, tenant.priority).observe(exc.waited)
                request.ctx.waits.add(exc.waited)  # capacity, not kvroute's overhead
            raise
        if ticket.queued:
            metrics.child(metrics.admission_wait, model, ticket.priority).observe(ticket.waited)
            request.ctx.queued_ms = round(ticket.waited * 1000, 3)
            request.ctx.waits.add(ticket.waited)
        try:
            await call_next(request, send)
        finally:
            ticket.release()


def kick_waiting(state: AppState) -> None:
    """Grant waiters of every model whose capacity grew (an endpoint came back);
    the monitor calls it after each health round."""
    now = state.registry.clock()
    for model, stats in state.admission.stats().items():
        if stats["waiting"]:
            state.admission.kick(model, model_capacity(state.registry, model, now))
