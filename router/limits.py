"""Client limits: what one kvroute process lets its clients hold (README "Limits").

Two layers, one per place where the facts are known:

    ClientProtocol   uvicorn's httptools protocol, per connection: the size of
                     the request line and headers (431), the time they take
                     (408), the pace and the whole time of a body (408,
                     answered by the app), the number of open connections
                     (503), the keep-alive idle time, and how long a client
                     may leave its answer unread (dropped)
    RequestLimits    ASGI middleware: inference requests in flight (503),
                     counted from the end of their bodies (an upload in
                     progress is the connection's, bounded by its time), the
                     bytes of bodies held at once (503), and a body the
                     protocol saw stall becomes the app's 408

Every refusal is OpenAI's error shape and closes the connection, except the
in-flight refusal, which leaves a keep-alive connection usable for the retry.
Their errors extend the tree in router/errors.py:

    InvalidRequest
    ├── HeaderTooLarge    431 request_header_too_large
    └── RequestTimeout    408 request_timeout
    ServerBusy            503 server_busy, with Retry-After   (a RouterError)

Each connection has one deadline (headers, body or idle, by phase), a write
deadline while its client leaves the answer unread, and at most one timer,
armed lazily and never more than ``step`` seconds ahead: a new deadline is
rarely earlier than the timer, so a request on a keep-alive connection arms
no timer and cancels none (uvicorn arms and cancels one per request for its
keep-alive alone); one that is (the end of a body's whole time, a linger)
re-arms it. The timer re-arms itself until a deadline passes, or stops when
the connection has none.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter
from typing import Any, cast

import httptools
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from router.config import ClientLimits, ServerConfig
from router.errors import InvalidRequest, RouterError, error_messages
from router.logs import LOG
from router.request import DROP_CONNECTION, OPERATIONS
from router.types import ASGIApp, Message, Receive, Scope, Send

#: Set in a request's scope by the protocol when its body stalled.
BODY_STALLED = "kvroute.body_stalled"
#: Answered on a connection beyond ``max_connections`` (then closed): probes and
#: monitoring must see an overloaded process, not a refusal.
PROBES = frozenset((b"/health", b"/ready", b"/metrics"))
#: Seconds a refused connection stays half-open, reading and dropping what the
#: client still sends, so that it reads the answer instead of a reset (nginx's
#: lingering close, shorter).
LINGER = 2.0


class HeaderTooLarge(InvalidRequest):
    status = 431
    code = "request_header_too_large"


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"connection", b"close")]


class ServerBusy(RouterError):
    status = 503
    type = "service_unavailable"
    code = "server_busy"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"retry-after", str(self.retry_after).encode())]


class Refusals:
    """Refusals by reason, logged as one warning line at most every ``every`` seconds
    (a flood must not turn into a flood of log lines)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.counts: Counter[str] = Counter()
        self._logged_at = -every

    def note(self, reason: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= self.every:
            LOG.warning({"event": "client_refused", "by_reason": dict(self.counts)})
            self.counts.clear()
            self._logged_at = now


class Phase(enum.Enum):
    HEADERS = "headers"  # waiting for or reading a request's line and headers
    BODY = "body"  # headers in, the body still coming
    BUSY = "busy"  # the request is read; the app answers it
    IDLE = "idle"  # between requests on a keep-alive connection


# Module names for the hot path: an Enum member lookup costs about 0.1 us in 3.11.
HEADERS, BODY, BUSY, IDLE = Phase


class ClientProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``limits``; make one for a
    config with :func:`client_protocol`."""

    limits: ClientLimits = ClientLimits()
    refusals: Refusals = Refusals()

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.limits
        self.timeout_keep_alive = limits.keep_alive_timeout
        self._step = min(
            limits.header_timeout,
            limits.body_timeout,
            limits.keep_alive_timeout,
            limits.send_timeout,
        )
        self._max_header_bytes = limits.max_header_bytes
        self._phase = HEADERS
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Bytes received while a request's headers were incomplete (httptools
        #: holds a header until it ends), and the size of the chunk being parsed.
        self._unparsed = 0
        self._chunk = 0
        self._over_limit = False
        self._refusal: tuple[RouterError, str] | None = None
        self._refused = False
        #: When the body being read must be in by (loop time).
        self._body_end = 0.0
        #: When a client that stopped reading is dropped (while writing is paused),
        #: unless the bytes waiting for it (``_unsent``) went down meanwhile.
        self._write_deadline: float | None = None
        self._unsent = 0

    # -- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_limit = len(self.connections) > self.limits.max_connections
        self._expect(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._deadline = self._write_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._phase is IDLE:
            self._phase = HEADERS
            self._deadline = None
        self._chunk = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refusal = self._refusal or (InvalidRequest(f"invalid HTTP request: {exc}"), "invalid")
            self._refuse(*refusal)
            return
        if self._phase is HEADERS:
            self._unparsed += len(data)
            if self._unparsed > self._max_header_bytes:
                self._refuse(*self._too_large())
            elif self._deadline is None:
                self._expect(self.limits.header_timeout)
        elif self._phase is BODY:
            # Each ``body_min_rate`` bytes add a second to the whole body's time
            # (Apache's mod_reqtimeout MinRate): a slow link sending steadily
            # is served, a trickle is not.
            self._body_end += len(data) / self.limits.body_min_rate
            self._expect_body()

    # -- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = HEADERS
        self._unparsed = 0

    def on_headers_complete(self) -> None:
        # The headers came in this chunk and the ones counted before it: only
        # when those could hold too many bytes are the headers measured.
        limit = self._max_header_bytes
        if self._unparsed + self._chunk > limit and self._header_size() > limit:
            self._stop(*self._too_large())
        if self._over_limit and self.url.split(b"?", 1)[0] not in PROBES:
            busy = ServerBusy(
                "the server has too many open connections; retry later", self.limits.retry_after
            )
            self._stop(busy, "connections")
        super().on_headers_complete()
        self.cycle.scope[DROP_CONNECTION] = self.drop  # type: ignore[literal-required]
        self._phase = BODY
        self._deadline = None
        self._body_end = self.loop.time() + self.limits.body_total_timeout
        self._unparsed = 0
        if self._over_limit:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle.response_complete and not self.pipeline:
            # Answered before its body was in (413, 503): idle from now.
            self._idle()
        else:
            self._phase = BUSY
            self._deadline = None

    def on_response_complete(self) -> None:
        # uvicorn's, with the keep-alive bound kept by this connection's one timer.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._phase is BUSY:
            self._idle()

    # -- deadlines ------------------------------------------------------------------

    def _expect_body(self) -> None:
        """The next piece of the body within ``body_timeout``, all of it by ``_body_end``."""
        self._expect(min(self.limits.body_timeout, self._body_end - self.loop.time()))

    def _idle(self) -> None:
        self._phase = IDLE
        self._expect(self.timeout_keep_alive)

    def _expect(self, seconds: float) -> None:
        now = self.loop.time()
        deadline = self._deadline = now + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:
            # An armed timer fires within ``step``: re-armed only for a nearer deadline.
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(now + min(seconds, self._step), self._on_timer)

    def pause_writing(self) -> None:
        # The client is not taking what it asked for as fast as it comes: it
        # has ``send_timeout`` to take some of it (nginx's, between two writes).
        super().pause_writing()
        now = self.loop.time()
        self._write_deadline = now + self.limits.send_timeout
        self._unsent = self.transport.get_write_buffer_size()
        self._rearm(now)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_deadline = None

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        write = self._write_deadline
        if write is not None and now >= write - 0.001:
            unsent = self.transport.get_write_buffer_size()
            if unsent < self._unsent:  # it read some meanwhile: another period
                self._unsent = unsent
                write = self._write_deadline = now + self.limits.send_timeout
            else:
                self.drop()
                return
        if self.transport.is_closing():
            if write is not None:
                self._rearm(now)  # a close still flushing to a client that does not read
            return
        deadline = self._deadline
        if deadline is not None:
            if self._phase is BODY and self.flow.read_paused:
                # The app has not taken what came yet: the pace is the app's, not
                # the client's, and so is the time (of the whole body's too).
                deadline = self._deadline = now + self.limits.body_timeout
                self._body_end = max(self._body_end, deadline)
            if now >= deadline - 0.001:
                self._deadline = None
                if self._phase is HEADERS:
                    self._headers_late()
                elif self._phase is BODY:
                    self._body_late()
                else:
                    self.transport.close()
                    if unsent := self.transport.get_write_buffer_size():
                        # The close waits for the client to take what is left:
                        # it has ``send_timeout`` (renewed on progress), as when
                        # writing paused; a client that never reads is dropped.
                        self._write_deadline = now + self.limits.send_timeout
                        self._unsent = unsent
        self._rearm(now)

    def drop(self) -> None:
        """Drop the connection of a client that does not read what it was sent:
        aborted, not closed (a close would wait for it to read). The app sees a
        disconnect; its request ends as abandoned."""
        self._write_deadline = None
        if not self.transport.is_closing() or self.transport.get_write_buffer_size():
            self.refusals.note("send_time")
            self.transport.abort()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # As connection_lost will say, now: the app may return before it runs.
            cycle.disconnected = True
            cycle.message_event.set()

    def _rearm(self, now: float) -> None:
        """The timer at the nearest deadline (at most ``step`` ahead), unless armed."""
        if self._timer is not None:
            return
        deadline, write = self._deadline, self._write_deadline
        nearest = deadline if write is None else write if deadline is None else min(deadline, write)
        if nearest is not None:
            self._timer = self.loop.call_at(min(nearest, now + self._step), self._on_timer)

    def _headers_late(self) -> None:
        if self._unparsed:
            timeout = self.limits.header_timeout
            self._refuse(RequestTimeout(f"request headers took over {timeout:g} s"), "header_time")
        else:
            self.refusals.note("idle_connection")
            self._refused = True
            self.transport.close()

    def _body_late(self) -> None:
        cycle = self.cycle
        scope = cast(Scope, cycle.scope)
        if cycle.response_started or BODY_STALLED in scope:
            # Nothing clean can be sent, or the app did not answer the stall.
            self.transport.close()
            return
        # The app reads the body: RequestLimits turns this wake-up into its 408
        # (logged and counted like any error); the connection closes after it.
        limits = self.limits
        if self.loop.time() >= self._body_end - 0.001:
            self.refusals.note("body_total_time")
            why = f"the request body took over {limits.body_total_timeout:g} s to arrive"
        else:
            self.refusals.note("body_time")
            why = f"the request body stopped arriving for {limits.body_timeout:g} s"
        scope[BODY_STALLED] = why
        cycle.message_event.set()
        self._expect(self.limits.body_timeout)

    # -- refusals -------------------------------------------------------------------

    def _header_size(self) -> int:
        """The request line and headers, as parsed."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_large(self) -> tuple[RouterError, str]:
        limit = self.limits.max_header_bytes
        return HeaderTooLarge(f"request headers are larger than {limit} bytes"), "header_size"

    def _stop(self, err: RouterError, reason: str) -> None:
        """Refuse from inside the parser: the exception stops it."""
        self._refusal = (err, reason)
        raise _Stop

    def _refuse(self, err: RouterError, reason: str) -> None:
        """Answer ``err`` (unless a response is on its way) and close the connection."""
        self._refused = True
        self._deadline = None
        self.refusals.note(reason)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Finish the answer in progress, then close; read nothing more.
            cycle.keep_alive = False
            return
        self.transport.write(raw_response(err, self.server_state.default_headers))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing with unread input would reset the connection, and the client
        # could lose the answer: send it and a FIN, then drain for a while.
        self.transport.write_eof()
        self._phase = IDLE
        self._expect(LINGER)


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the refusal is on the protocol."""


def raw_response(err: RouterError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """``err`` as a whole HTTP/1.1 response that closes the connection."""
    start, body = error_messages(err)
    out = [STATUS_LINE[err.status]]
    for name, value in (*default_headers, *start["headers"]):
        if name != b"connection":
            out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"connection: close\r\n\r\n")
    out.append(body["body"])
    return b"".join(out)


def client_protocol(limits: ClientLimits, refusals: Refusals) -> type[ClientProtocol]:
    """A protocol class for uvicorn (``http=``) bound to ``limits``."""
    return type("ClientProtocol", (ClientProtocol,), {"limits": limits, "refusals": refusals})


class RequestLimits:
    """Inference requests in flight, at most ``max_in_flight`` (503 ``server_busy``
    with Retry-After beyond: a prompt answer, never a queue); and the 408 of a
    body that ``ClientProtocol`` saw stall, raised where the app reads it.

    A request counts from the end of its body: one still uploading holds its
    connection (bounded by ``max_connections`` and the body's time), not one
    of the slots the requests being answered need. One arriving while the
    slots are full is refused before its body is read."""

    def __init__(self, app: ASGIApp, server: ServerConfig, refusals: Refusals) -> None:
        limits = server.limits
        self.app = app
        self.max_in_flight = limits.max_in_flight
        self.max_body_bytes = limits.max_body_bytes_in_flight
        #: One body's bound (the app answers 413 beyond): never a 503 to retry.
        self.max_body = server.max_body_bytes
        self.retry_after = limits.retry_after
        self.refusals = refusals
        self.in_flight = 0
        #: Bytes of the bodies of the inference requests being read or answered.
        self.body_bytes = 0

    def _busy(self) -> ServerBusy:
        self.refusals.note("in_flight")
        return ServerBusy(
            "the server has too many requests in flight; retry later", self.retry_after
        )

    def _full(self) -> ServerBusy:
        self.refusals.note("body_bytes")
        return ServerBusy(
            "the server holds too many request bodies at once; retry later", self.retry_after
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in OPERATIONS:
            await self.app(scope, _stall_aware(scope, receive), send)
            return
        refusal = self._busy() if self.in_flight >= self.max_in_flight else None
        if refusal is None and self.body_bytes:
            for name, value in scope["headers"]:
                if name == b"content-length":
                    declared = int(value) if value.isdigit() else 0
                    if (
                        declared <= self.max_body
                        and self.body_bytes + declared > self.max_body_bytes
                    ):
                        refusal = self._full()  # before its bytes come
                    break
        if refusal is not None:
            for message in error_messages(refusal):
                await send(message)
            return
        counted = False
        held = 0

        async def receive_counted() -> Message:
            nonlocal counted, held
            message = await receive()
            if message["type"] != "http.request":
                return message
            if size := len(message.get("body", b"")):
                if self.body_bytes + size > self.max_body_bytes:
                    raise self._full()
                self.body_bytes += size
                held += size
            if message.get("more_body", False):
                _raise_if_stalled(scope, message)
            elif not counted:
                if self.in_flight >= self.max_in_flight:
                    raise self._busy()
                self.in_flight += 1
                counted = True
            return message

        try:
            await self.app(scope, receive_counted, send)
        finally:
            self.body_bytes -= held
            if counted:
                self.in_flight -= 1


def _stall_aware(scope: Scope, receive: Receive) -> Receive:
    async def receive_body() -> Message:
        message = await receive()
        if message.get("more_body"):
            _raise_if_stalled(scope, message)
        return message

    return receive_body


def _raise_if_stalled(scope: Scope, message: Message) -> None:
    """The 408 of a body part that is the protocol's wake-up of a stalled
    reader (an empty chunk, and the scope marked), for a message with more to come."""
    if not message.get("body") and BODY_STALLED in scope:
        raise RequestTimeout(scope[BODY_STALLED])
