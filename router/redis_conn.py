"""One way to reach Redis, for the quota store and the response cache.

``RedisConn`` owns a redis.asyncio client and knows how to speak of it
without its secrets: ``where`` is the URL redacted, ``describe`` an error
with any password replaced, and ``guarded`` turns whatever Redis did wrong
into the caller's own "unavailable" exception.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from router.config import redact_url

T = TypeVar("T")


class RedisConn:
    def __init__(
        self,
        url: str,
        unavailable: type[Exception],
        *,
        socket_timeout: float = 1.0,
        health_check_interval: int = 5,
        max_connections: int = 64,
    ) -> None:
        self.where = redact_url(url)
        self.unavailable = unavailable
        parts = urlsplit(url)
        self._secrets = [
            secret
            for secret in (parts.password, *parse_qs(parts.query).get("password", ()))
            if secret
        ]
        # No retries with backoff: the caller's guard (router/outage.py) decides
        # when to try again, and a request must not wait out redis-py's backoff.
        # One immediate retry on a connection error lets a connection the server
        # dropped while idle (Redis restarted) be replaced without failing the
        # request. Timeouts are not retried: a script may have run.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        try:
            # Blocking pool: a burst of requests queues for a few connections
            # (Redis runs one command at a time anyway) instead of opening one each.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                health_check_interval=health_check_interval,
                retry=retry,
            )
        except ValueError:
            raise ValueError(f"invalid Redis URL {self.where}") from None
        self.client: Redis = Redis.from_pool(pool)

    async def guarded(self, call: Awaitable[T]) -> T:
        """``call``'s result, or ``unavailable`` for anything Redis did wrong."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise self.unavailable(self.describe(exc)) from exc

    def describe(self, exc: BaseException) -> str:
        """``exc`` for a log or a message: its class and text, never the password."""
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text[:200]}"
