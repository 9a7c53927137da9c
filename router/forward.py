"""The data-path HTTP client: one pooled aiohttp session, errors mapped at the edge.

aiohttp rather than httpx here because it measured about 7x faster as a
proxy's client on this machine (DESIGN.md); httpx serves the control plane.

Errors name the endpoint by its id, never by its URL (which may carry
credentials). Upstream answers are always readable: kvroute asks for no
compression, and decodes it where a proxy in between compresses anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from router.config import Timeouts
from router.errors import UpstreamConnectError, UpstreamTimeout

if TYPE_CHECKING:
    from router.tracing import ClientSpan

#: Seconds an idle upstream connection is kept for reuse: under uvicorn's 5.
KEEPALIVE_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    endpoint_id: str
    url: str
    body: bytes
    headers: Mapping[str, str]
    #: The attempt's span (tracing on): it learns the answer's status here.
    span: ClientSpan | None = None


class Forwarder:
    def __init__(self, timeouts: Timeouts) -> None:
        self.set_timeouts(timeouts)
        self._session: aiohttp.ClientSession | None = None

    def set_timeouts(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        # A non-streamed answer's headers arrive when generation ends: the
        # first-byte bound covers them. A stream's reads are bounded by the
        # relay instead (first_byte for its first chunk, idle after it).
        self._plain = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.first_byte
        )
        self._stream = aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect)

    async def start(self) -> None:
        # An idle connection is dropped before the backend drops it: uvicorn
        # (vLLM's server) closes idle keep-alive connections after 5 s, and a
        # request written to a connection the server is closing fails with no
        # answer (seen as 502s in benchmarks/overhead.py with a 30 s keep-alive).
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_SECONDS
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: UpstreamRequest, stream: bool) -> aiohttp.ClientResponse:
        """Send ``request``; return the response once its headers are in."""
        assert self._session is not None, "Forwarder.start() was not awaited"
        timeout = self._stream if stream else self._plain
        try:
            try:
                resp = await self._session.post(
                    request.url,
                    data=request.body,
                    headers=request.headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
            except aiohttp.ServerDisconnectedError:
                # The server closed the connection without a byte of answer: the
                # classic race with its keep-alive timer on a pooled connection.
                # Once more (a backend that is really down refuses the next
                # connection, and the caller fails over).
                resp = await self._session.post(
                    request.url,
                    data=request.body,
                    headers=request.headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"endpoint {request.endpoint_id} did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(
                f"cannot reach endpoint {request.endpoint_id}: {exc.__class__.__name__}"
            ) from exc
        if request.span is not None:
            request.span.responded(resp.status)
        return resp
