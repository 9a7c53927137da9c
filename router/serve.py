"""Running ASGI apps under uvicorn, alone or several in one event loop."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Generator, Sequence

import uvicorn
import uvicorn.config

from router.app import build_app
from router.config import Config
from router.logs import setup_logging
from router.types import ASGIApp


class Server(uvicorn.Server):
    """A uvicorn server that may share its loop with others.

    Only the server that ``owns_signals`` listens for SIGINT/SIGTERM, and it
    does not re-raise them after a graceful stop, so the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, owns_signals: bool = True) -> None:
        super().__init__(config)
        self.owns_signals = owns_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if not self.owns_signals:
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def uvicorn_config(
    app: ASGIApp, host: str, port: int, log_level: str = "info", quiet: bool = False
) -> uvicorn.Config:
    """``quiet`` leaves uvicorn's logging setup alone (for servers that share a process)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        loop="none",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        log_config=None if quiet else uvicorn.config.LOGGING_CONFIG,
    )


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def serve(config: Config, sockets: Sequence[socket.socket] | None = None) -> int:
    setup_logging(config.server.log_level)
    app = build_app(config)
    server = Server(
        uvicorn_config(app, config.server.host, config.server.port, config.server.log_level)
    )
    await server.serve(sockets=list(sockets) if sockets else None)
    return 0
