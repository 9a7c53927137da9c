"""The Cache stage: serve a repeated deterministic request from a stored answer.

    not enabled for the model, not cacheable, no-store  -> bypass
    lookup (unless no-cache) -> fresh enough?            -> hit: replayed as
                                                            JSON or a stream
    miss -> the same request already in flight here?     -> wait for its answer
         -> another replica fetching it (Redis lock)?    -> poll for its answer
         -> ask upstream, capturing what the client gets -> store it if it is
            a complete, successful answer

Every answer carries ``x-kvroute-cache: hit|miss|bypass`` (a hit also
``age``). The cache never fails a request: with the store down or slow, the
request is a bypass. A hit counts against the tenant's request rate (the
Quota stage runs first) but costs no tokens; the answer's ``usage`` is what
the model produced, and the tokens served from the cache are counted in
``kvroute_cache_tokens_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from router.cache.answer import (
    CorruptEntry,
    decode,
    encode,
    from_json,
    from_stream,
    to_json,
    to_stream,
)
from router.cache.answer_types import CachedAnswer, Kind
from router.cache.key import Directives, deterministic, digest, directives
from router.cache.store import CacheStore, CacheUnavailable
from router.config import CacheConfig, ModelCache
from router.pipeline_types import Handler
from router.request import InferenceRequest
from router.types import Message, Send

if TYPE_CHECKING:
    from router.state import AppState

LOG = logging.getLogger("kvroute.cache")

Result = Literal["hit", "miss", "bypass"]
HEADER = b"x-kvroute-cache"
#: Captured answers larger than this are read back in a worker thread.
PARSE_IN_THREAD_BYTES = 128 * 1024
KINDS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}


@dataclass(slots=True)
class Flight:
    """One upstream call for a key, and the requests waiting for its answer."""

    done: asyncio.Future[CachedAnswer | None]
    waiters: int = 0


@dataclass(slots=True)
class ResponseCache:
    """The store and this process's in-flight misses (single flight)."""

    config: CacheConfig
    store: CacheStore
    flights: dict[str, Flight] = field(default_factory=dict)

    async def close(self) -> None:
        await self.store.close()


class Capture:
    """Wraps ``send``: passes every message on, keeps a copy of a 200 answer's
    body up to ``limit`` bytes, and adds the cache header."""

    def __init__(self, send: Send, result: Result, limit: int) -> None:
        self.send = send
        self.result = result
        self.limit = limit
        self.status = 0
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message.get("headers", ()), (HEADER, self.result.encode())]
        elif message["type"] == "http.response.body" and self.status == 200:
            body = message.get("body", b"")
            self.size += len(body)
            if self.size <= self.limit:
                self.chunks.append(body)
            if not message.get("more_body", False):
                self.complete = True
        await self.send(message)

    def body(self) -> bytes | None:
        if self.status != 200 or not self.complete or self.size > self.limit:
            return None
        return b"".join(self.chunks)


class CacheStage:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.metrics = state.metrics

    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        state = self.state
        model = request.routed.model
        own = state.config.models.get(model)
        settings = own.cache if own is not None else None
        if settings is None or not settings.enabled:
            await call_next(request, _with_header(send, b"bypass"))
            return
        said = directives(request.headers)
        if said.no_store or not (said.use or deterministic(request.op, request.body)):
            self._count(model, "bypass")
            await call_next(request, _with_header(send, b"bypass"))
            return
        cache = state.cache
        tenant = request.ctx.tenant
        scope = "*" if settings.shared or tenant is None else tenant.name
        key = digest(request.op, model, scope, request.body)
        if not said.no_cache:
            try:
                found = await self._lookup(cache, model, key, said)
            except CacheUnavailable:
                # The store is down or slow: the cache steps aside, never an error.
                self._count(model, "bypass")
                await call_next(request, _with_header(send, b"bypass"))
                return
            if found is not None:
                await self._serve(request, send, found[0], found[1])
                return
            flight = cache.flights.get(key)
            if flight is not None:
                # Waiting on another request's backend: not kvroute's own time.
                ctx = request.ctx
                ctx.waits.begin(ctx.clock())
                answer = await self._wait(flight)
                ctx.waits.end(ctx.clock())
                if answer is not None:
                    await self._serve(request, send, answer, 0.0)
                    return
                await self._fetch(request, send, call_next, cache, settings, model, key, None)
                return
        await self._fetch(
            request, send, call_next, cache, settings, model, key, None if said.no_cache else said
        )

    async def _lookup(
        self, cache: ResponseCache, model: str, key: str, said: Directives
    ) -> tuple[CachedAnswer, float] | None:
        """The entry and its age, if fresh enough; raises CacheUnavailable."""
        started = time.perf_counter()
        try:
            data = await cache.store.get(model, key)
        finally:
            self.metrics.child(self.metrics.cache_lookup, model).observe(
                time.perf_counter() - started
            )
        if data is None:
            return None
        try:
            answer, stored_at = decode(data)
        except CorruptEntry:
            LOG.warning({"event": "cache_entry_unreadable", "model": model})
            return None
        age = max(0.0, time.time() - stored_at)
        if said.max_age is not None and age > said.max_age:
            return None
        return answer, age

    async def _wait(self, flight: Flight) -> CachedAnswer | None:
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.done)
        finally:
            flight.waiters -= 1

    async def _fetch(
        self,
        request: InferenceRequest,
        send: Send,
        call_next: Handler,
        cache: ResponseCache,
        settings: ModelCache,
        model: str,
        key: str,
        lead: Directives | None,
    ) -> None:
        """A miss: ask upstream (leading the single flight when ``lead``, the
        request's cache directives), and store the answer if it is complete
        and successful."""
        flight = None
        locked = False
        answer: CachedAnswer | None = None
        if lead is not None and key not in cache.flights:
            flight = cache.flights[key] = Flight(asyncio.get_running_loop().create_future())
        try:
            if flight is not None and lead is not None:
                locked = await self._lock(cache, model, key)
                if locked:
                    # Looked up again now that nobody else may be fetching it:
                    # a leader that stored the answer and let go of the key
                    # between this request's lookup and its lock (a loaded
                    # machine) would otherwise be followed by a second call.
                    found = None
                    with contextlib.suppress(CacheUnavailable):
                        found = await self._lookup(cache, model, key, lead)
                    if found is not None:
                        answer = found[0]
                        await self._serve(request, send, found[0], found[1])
                        return
                else:
                    # Another replica is fetching it: its answer, if it comes in time.
                    request.ctx.waits.begin(request.ctx.clock())
                    answer = await self._poll(cache, model, key)
                    request.ctx.waits.end(request.ctx.clock())
                    if answer is not None:
                        await self._serve(request, send, answer, 0.0)
                        return
            self._count(model, "miss")
            capture = Capture(send, "miss", cache.config.max_entry_bytes)
            if request.stream and request.op.generates:
                # The engine's usage, for the stored answer (stripped from the
                # client's stream if it did not ask).
                request = dataclasses.replace(request, router_usage=True)
            await call_next(request, capture)
            answer = await self._answer(request, capture)
            if answer is not None:
                await self._store(cache, model, key, answer, settings.ttl)
        finally:
            # Whatever happened (an error, the client leaving), the waiters
            # are told: the answer, or None (then they ask upstream themselves).
            if flight is not None:
                self._land(cache, key, flight, answer)
            if locked:
                with contextlib.suppress(CacheUnavailable):
                    await cache.store.release(model, key)

    def _land(
        self, cache: ResponseCache, key: str, flight: Flight, answer: CachedAnswer | None
    ) -> None:
        if cache.flights.get(key) is flight:
            del cache.flights[key]
        if not flight.done.done():
            flight.done.set_result(answer)

    async def _lock(self, cache: ResponseCache, model: str, key: str) -> bool:
        try:
            return await cache.store.acquire(model, key, cache.config.lock_ttl)
        except CacheUnavailable:
            return True  # no store to share: fetch it ourselves

    async def _poll(self, cache: ResponseCache, model: str, key: str) -> CachedAnswer | None:
        config = cache.config
        deadline = time.monotonic() + config.lock_ttl
        while time.monotonic() < deadline:
            await asyncio.sleep(config.poll_interval)
            try:
                found = await self._lookup(cache, model, key, Directives())
                if found is not None:
                    return found[0]
                if await cache.store.acquire(model, key, config.lock_ttl):
                    await cache.store.release(model, key)
                    return None  # the other replica gave up: fetch it ourselves
            except CacheUnavailable:
                return None
        return None

    async def _answer(self, request: InferenceRequest, capture: Capture) -> CachedAnswer | None:
        """The answer the client got, if it is complete and successful."""
        ctx = request.ctx
        body = capture.body()
        if body is None or ctx.error or ctx.cancelled:
            return None
        kind = KINDS[request.op.path]
        parse = from_stream if request.stream else from_json
        if len(body) > PARSE_IN_THREAD_BYTES:
            # A long answer takes milliseconds to read back: not on the loop.
            answer = await asyncio.to_thread(parse, kind, body)
        else:
            answer = parse(kind, body)
        if answer is None:
            return None
        if answer.usage is None and ctx.prompt_tokens is not None and not ctx.usage_estimated:
            completion = ctx.completion_tokens or 0
            usage: dict[str, Any] = {
                "prompt_tokens": ctx.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": ctx.prompt_tokens + completion,
            }
            answer = dataclasses.replace(answer, usage=usage)
        return answer

    async def _store(
        self, cache: ResponseCache, model: str, key: str, answer: CachedAnswer, ttl: float
    ) -> None:
        data = encode(answer, time.time())
        try:
            stored = await cache.store.put(model, key, data, ttl)
        except CacheUnavailable:
            return
        if stored:
            self.metrics.child(self.metrics.cache_stores, model).inc()
            self.metrics.child(self.metrics.cache_stored_bytes, model).inc(len(data))

    async def _serve(
        self, request: InferenceRequest, send: Send, answer: CachedAnswer, age: float
    ) -> None:
        ctx = request.ctx
        model = request.routed.model
        ctx.cache = "hit"
        self._count(model, "hit")
        usage = answer.usage or {}
        for kind in ("prompt_tokens", "completion_tokens"):
            count = usage.get(kind)
            if isinstance(count, int):
                self.metrics.child(self.metrics.cache_tokens, model, kind[:-7]).inc(count)
        now = time.time()
        if request.stream and answer.embedding_json is None:
            data = to_stream(
                answer, model=model, now=now, include_usage=request.sampling.include_usage
            )
            content_type = b"text/event-stream"
        else:
            data = to_json(answer, model=model, now=now)
            content_type = b"application/json"
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(data)).encode()),
            (HEADER, b"hit"),
            (b"age", str(int(age)).encode()),
        ]
        if content_type == b"text/event-stream":
            headers.append((b"cache-control", b"no-cache"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        ctx.finishing = True
        await send({"type": "http.response.body", "body": data})

    def _count(self, model: str, result: Result) -> None:
        self.metrics.child(self.metrics.cache_requests, model, result).inc()


def _with_header(send: Send, value: bytes) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (HEADER, value)]
        await send(message)

    return sender
