"""Running ASGI apps under uvicorn, alone or several in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import socket
from collections.abc import Callable, Generator, Sequence
from types import FrameType

import uvicorn
import uvicorn.config

from router.app import build_app
from router.config import ClientLimits, Config, ServerConfig
from router.limits import Refusals, RequestLimits, client_protocol
from router.logs import LOG, setup_logging
from router.types import ASGIApp


class Server(uvicorn.Server):
    """A uvicorn server that may share its loop with others.

    Only the server that ``owns_signals`` listens for SIGINT/SIGTERM, and it
    does not re-raise them after a graceful stop, so the process exits 0.

    With ``on_signal``, the first signal calls it (the router marks itself
    not ready) and the server keeps taking requests for ``grace`` seconds
    before it stops accepting; uvicorn then gives in-flight requests up to
    ``timeout_graceful_shutdown`` seconds. A second signal stops at once.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        owns_signals: bool = True,
        on_signal: Callable[[], None] | None = None,
        grace: float = 0.0,
    ) -> None:
        super().__init__(config)
        self.owns_signals = owns_signals
        self.on_signal = on_signal
        self.grace = grace
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.on_started is not None and self.started:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_signal is None or self._signalled or self._loop is None:
            super().handle_exit(sig, frame)
            if self._signalled:
                self.force_exit = True
            return
        self._signalled = True
        self.on_signal()
        self._loop.call_soon_threadsafe(self._loop.call_later, self.grace, self._stop_accepting)

    def _stop_accepting(self) -> None:
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if not self.owns_signals:
            yield
            return
        self._loop = asyncio.get_running_loop()
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def uvicorn_config(
    app: ASGIApp,
    host: str,
    port: int,
    log_level: str = "info",
    quiet: bool = False,
    graceful_timeout: float = 30.0,
    server: ServerConfig | None = None,
) -> uvicorn.Config:
    """``quiet`` leaves uvicorn's logging setup alone (for servers that share a process).

    With ``server``, connections are served by ``ClientProtocol`` with its
    ``limits`` and the app is wrapped in ``RequestLimits`` (router/limits.py);
    without, uvicorn's own httptools protocol serves it as is (the simulators).
    """
    http: type[asyncio.Protocol] | str = "httptools"
    keep_alive = 5
    if server is not None:
        refusals = Refusals()
        app = RequestLimits(app, server, refusals)
        http = client_protocol(server.limits, refusals)
        keep_alive = server.limits.keep_alive_timeout
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        loop="none",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_keep_alive=keep_alive,
        timeout_graceful_shutdown=int(graceful_timeout) or 1,
        log_config=None if quiet else uvicorn.config.LOGGING_CONFIG,
    )


def raise_open_files_limit(limits: ClientLimits) -> None:
    """Raise the soft limit on open files to what ``limits`` may need (each
    connection and each in-flight request's upstream connection is a file),
    as far as the hard limit allows; warn when it does not."""
    needed = limits.max_connections + limits.max_in_flight + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        LOG.warning(
            {
                "event": "open_files_limit",
                "limit": target,
                "needed": needed,
                "msg": "raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower "
                "server.limits.max_connections / max_in_flight",
            }
        )


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def serve(
    config: Config,
    sockets: Sequence[socket.socket] | None = None,
    config_path: str | None = None,
) -> int:
    setup_logging(config.server.log_level)
    limits = config.server.limits
    raise_open_files_limit(limits)
    app = build_app(config, config_path)

    def not_ready() -> None:
        app.state.shutting_down = True
        LOG.info({"event": "shutdown", "grace_s": config.shutdown.grace})

    server = Server(
        uvicorn_config(
            app,
            config.server.host,
            config.server.port,
            config.server.log_level,
            graceful_timeout=config.shutdown.timeout,
            server=config.server,
        ),
        on_signal=not_ready,
        grace=config.shutdown.grace,
    )
    # What exists once the server runs lives as long as the process: keep the
    # garbage collector from walking it again and again (it showed in profiles).
    server.on_started = gc.freeze
    await server.serve(sockets=list(sockets) if sockets else None)
    return 0
