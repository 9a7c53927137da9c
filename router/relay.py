"""One attempt at one endpoint: prepare the exchange, send it, relay the answer.

    adapter.prepare -> upstream request (URL from the endpoint, headers by rule)
      -> forward -> error status?  UpstreamHTTPError (the caller may fail over)
                 -> a whole answer: translator.answer -> one JSON response
                 -> a stream: nothing goes to the client before the first
                    translated chunk (first_byte bounds the wait for it); then
                    chunk by chunk, each within ``idle`` of the last

A failure before the first byte reached the client raises an ``UpstreamError``
(the caller fails over). After it, the stream ends with an OpenAI error event,
is counted in ``kvroute_stream_errors_total``, and the error is raised for the
caller's bookkeeping; the client already has its status line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

import aiohttp

from backends.base import Target, Translator, UpstreamProtocolError
from backends.templates import ChatTemplateError, ChatTemplateRejected
from router.errors import (
    EndpointMisconfigured,
    InvalidRequest,
    RouterError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
    normalise_upstream_error,
)
from router.forward import UpstreamRequest
from router.registry import Attempt
from router.request import InferenceRequest, RequestContext
from router.state import AppState
from router.trace_context import TraceContext
from router.types import Send

if TYPE_CHECKING:
    from router.tracing import ClientSpan

LOG = logging.getLogger("kvroute.relay")

JSON = b"application/json"
SSE = b"text/event-stream"


def upstream_headers(
    client: Mapping[str, str],
    base: Mapping[str, str],
    request_id: str,
    trace: TraceContext | None,
    allowed: tuple[str, ...] = (),
) -> dict[str, str]:
    """The endpoint's own headers, the client headers the config names in
    ``forward_headers`` (``allowed``), the request id and the trace context (None:
    the client sent none and tracing is off, so there is none to send).

    Everything else a client sends stays here (its credentials, hop-by-hop and
    Connection-named headers, x-forwarded-*, expect, cookies...). The trace
    context is kvroute's own: validated and written anew, never passed through."""
    headers = dict(base)
    for name in allowed:
        value = client.get(name)
        if value is not None:
            headers[name] = value
    headers["x-request-id"] = request_id
    if trace is not None and trace.propagate:
        headers["traceparent"] = trace.traceparent()
        if trace.state is not None:
            headers["tracestate"] = trace.state
    # Readable answers: a compressing proxy in between should not compress
    # (and if it does anyway, the forwarder decodes).
    headers["accept-encoding"] = "identity"
    return headers


class Relay:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.forwarder = state.forwarder
        self.metrics = state.metrics

    async def __call__(
        self,
        request: InferenceRequest,
        send: Send,
        attempt: Attempt,
        target: Target,
        span: ClientSpan | None = None,
    ) -> Translator:
        """Serve ``request`` from the attempt's endpoint; the translator (with the
        answer's usage) once the answer is out. With ``span`` (tracing on), the
        backend's parent span is the attempt's."""
        endpoint = attempt.endpoint
        try:
            exchange = endpoint.adapter.prepare(request, target)
        except ChatTemplateRejected as exc:
            # The model's template refuses this conversation: the client's to fix.
            raise InvalidRequest(exc.message, param="messages") from exc
        except ChatTemplateError as exc:
            raise EndpointMisconfigured(
                f"endpoint {endpoint.id} could not render its chat template: {exc}"
            ) from exc
        upstream = UpstreamRequest(
            endpoint.id,
            endpoint.url + exchange.path,
            exchange.body,
            upstream_headers(
                request.headers,
                endpoint.headers,
                request.request_id,
                request.ctx.trace if span is None else span.trace,
                self.state.config.forward_headers,
            ),
            span,
        )
        waits = request.ctx.waits
        try:
            if request.stream:
                await self._stream(request, send, upstream, exchange.translator, attempt)
            else:
                await self._whole(request, send, upstream, exchange.translator)
        finally:
            waits.end(request.ctx.clock())  # a failure's wait ends with it
        return exchange.translator

    async def _whole(
        self, request: InferenceRequest, send: Send, upstream: UpstreamRequest, tr: Translator
    ) -> None:
        request.ctx.waits.begin(request.ctx.clock())
        resp = await self.forwarder.send(upstream, stream=False)
        try:
            await _relay_whole(resp, request, send, tr, upstream.endpoint_id)
        finally:
            resp.release()

    async def _stream(
        self,
        request: InferenceRequest,
        send: Send,
        upstream: UpstreamRequest,
        tr: Translator,
        attempt: Attempt,
    ) -> None:
        ctx = request.ctx
        timeouts = self.forwarder.timeouts
        endpoint_id = upstream.endpoint_id
        started = False
        try:
            async with asyncio.timeout(timeouts.first_byte) as bound:
                ctx.waits.begin(ctx.clock())
                resp = await self.forwarder.send(upstream, stream=True)
                try:
                    if not 200 <= resp.status < 300 or not resp.headers.get(
                        "content-type", ""
                    ).startswith("text/event-stream"):
                        # An error, or a backend that answered a stream request
                        # with one JSON answer.
                        await _relay_whole(resp, request, send, tr, endpoint_id)
                        return
                    chunks = resp.content.iter_any()
                    first, ended = await _first_output(tr, chunks, endpoint_id)
                    now = ctx.clock()
                    ctx.waits.end(now)
                    attempt.first_byte(self.state.registry.clock())
                    ctx.ttft = now - ctx.start
                    started = True
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [(b"content-type", SSE), (b"cache-control", b"no-cache")],
                        }
                    )
                    tail = (
                        first
                        if ended
                        else await _pump(send, tr, chunks, first, bound, timeouts.idle, attempt)
                    )
                finally:
                    resp.release()
        except ClientStalled:
            # As if the client had left: the attempt is abandoned, no verdict on
            # the endpoint, and the connection dropped (a close would wait for
            # the client to read; uvicorn would log the unfinished answer).
            if ctx.drop is not None:
                ctx.drop()
            ctx.cancelled = True
            raise asyncio.CancelledError("the client stopped reading its stream") from None
        except (TimeoutError, aiohttp.ClientError, OSError, UpstreamProtocolError) as exc:
            err = _stream_failure(exc, endpoint_id, started)
            if not started:
                raise err from exc
            if isinstance(exc, UpstreamProtocolError):
                LOG.warning(
                    {"event": "stream_unreadable", "endpoint": endpoint_id, "error": err.message}
                )
            await self._cut(send, ctx, endpoint_id, err)
            raise err from exc
        if started:
            ctx.finishing = True
            await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _cut(
        self, send: Send, ctx: RequestContext, endpoint_id: str, err: RouterError
    ) -> None:
        """Headers are out: the only honest signal left is an error event."""
        self.metrics.child(self.metrics.stream_errors, endpoint_id).inc()
        ctx.error = err.message
        ctx.finishing = True
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + err.to_bytes() + b"\n\n",
                "more_body": False,
            }
        )


def _stream_failure(exc: Exception, endpoint_id: str, started: bool) -> UpstreamError:
    if isinstance(exc, TimeoutError):
        what = "its next chunk within timeouts.idle" if started else "a first chunk in time"
        return UpstreamTimeout(f"endpoint {endpoint_id} sent no {what}")
    if isinstance(exc, UpstreamProtocolError):
        # A stream kvroute cannot read (malformed events): the backend's fault.
        return UpstreamHTTPError(
            502, f"endpoint {endpoint_id} sent a stream kvroute cannot read: {exc}"
        )
    return UpstreamConnectError(
        f"stream from endpoint {endpoint_id} broke off: {exc.__class__.__name__}"
    )


class ClientStalled(Exception):
    """The stream's idle bound passed while a chunk waited for the client to read."""


#: Bytes of one whole answer a backend may send (as decompressed); beyond, 502.
#: Room for embeddings of a 2,048-input batch at 4,096 dimensions as JSON.
MAX_ANSWER_BYTES = 256 << 20
#: Bytes of an error body read (its message is cut to 2,000 characters anyway).
MAX_ERROR_BYTES = 64 << 10


async def _relay_whole(
    resp: aiohttp.ClientResponse,
    request: InferenceRequest,
    send: Send,
    tr: Translator,
    endpoint_id: str,
) -> None:
    """An error status, or one whole answer, translated to OpenAI JSON. Only a
    2xx is an answer: a redirect (not followed) or a status outside HTTP's
    classes is the backend's fault (502)."""
    ok = 200 <= resp.status < 300
    data = await _read_all(resp, endpoint_id, MAX_ANSWER_BYTES if ok else MAX_ERROR_BYTES, ok)
    request.ctx.waits.end(request.ctx.clock())
    if not ok:
        err = normalise_upstream_error(resp.status, data, resp.headers.get("retry-after"))
        err.server_fault = err.status != resp.status or tr.server_fault(resp.status, data)
        raise err
    await _send_json(send, request, _answer(tr, data, endpoint_id))


async def _first_output(
    tr: Translator, chunks: AsyncIterator[bytes], endpoint_id: str
) -> tuple[bytes, bool]:
    """The stream's first translated output, and whether the stream already ended.
    Nothing goes to the client before it: a backend that dies first is still a
    failure before the first byte (the caller fails over)."""
    async for chunk in chunks:
        if out := _feed(tr, chunk):
            return out, False
    # The stream ended with nothing translated: what the translator still owes
    # (a Triton answer of no tokens is a finish and [DONE]) or a failure.
    if out := _feed(tr, None):
        return out, True
    raise UpstreamConnectError(f"stream from endpoint {endpoint_id} ended before its first chunk")


async def _pump(
    send: Send,
    tr: Translator,
    chunks: AsyncIterator[bytes],
    first: bytes,
    bound: asyncio.Timeout,
    idle: float,
    attempt: Attempt,
) -> bytes:
    """Relay ``first`` and the rest of the stream, each chunk within ``idle`` of
    the last; return what the translator owes at the end. Counts the events
    after the first (the endpoint's tokens, when no usage says)."""
    loop = asyncio.get_running_loop()
    out = first
    while True:
        if out:
            try:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            except asyncio.CancelledError:
                if bound.expired():
                    # The bound passed while the client was not taking what the
                    # backend had sent: the client's stall, not the backend's.
                    raise ClientStalled from None
                raise
        bound.reschedule(loop.time() + idle)
        chunk = await anext(chunks, b"")
        if not chunk:
            out = _feed(tr, None)
            attempt.events += out.count(b"data:")
            return out
        out = _feed(tr, chunk)
        attempt.events += out.count(b"data:")


def _feed(tr: Translator, chunk: bytes | None) -> bytes:
    """``tr.feed(chunk)``, or ``tr.close()`` for None; whatever goes wrong in a
    translator is a stream it cannot read."""
    try:
        return tr.close() if chunk is None else tr.feed(chunk)
    except UpstreamProtocolError:
        raise
    except Exception as exc:
        raise UpstreamProtocolError(f"{exc.__class__.__name__}: {str(exc)[:200]}") from exc


def _answer(tr: Translator, data: bytes, endpoint_id: str) -> bytes:
    try:
        return tr.answer(data)
    except Exception as exc:
        raise UpstreamHTTPError(502, f"endpoint {endpoint_id}: {str(exc)[:500]}") from exc


async def _send_json(send: Send, request: InferenceRequest, data: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", JSON), (b"content-length", str(len(data)).encode())],
        }
    )
    request.ctx.finishing = True
    await send({"type": "http.response.body", "body": data})


async def _read_all(
    resp: aiohttp.ClientResponse, endpoint_id: str, limit: int, whole: bool
) -> bytes:
    """The body, at most ``limit`` bytes (as decompressed): beyond, a ``whole``
    answer is a 502 (it cannot be cut and still be one), an error body is cut."""
    too_large = f"endpoint {endpoint_id} sent an answer over {limit} bytes"
    declared = resp.content_length
    if whole and declared is not None and declared > limit:
        raise UpstreamHTTPError(502, too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                if whole:
                    raise UpstreamHTTPError(502, too_large)
                chunks.append(chunk[: limit - size + len(chunk)])
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"endpoint {endpoint_id} stopped sending its answer") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamConnectError(
            f"answer from endpoint {endpoint_id} broke off: {exc.__class__.__name__}"
        ) from exc
