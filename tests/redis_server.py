"""A real ``redis-server`` on loopback for the tests, which can crash and come back.

The quota store's hard cases are about Redis misbehaving (gone, hung, back on the
same port with its memory wiped), so the tests drive a real server process rather
than a fake: ``stop()`` SIGKILLs it (a crash: no goodbye to connected clients),
``pause()`` SIGSTOPs it (a hung server: connections stay open, nothing answers)
and ``start()`` brings it back on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import pytest

from tests.helpers import free_socket

#: What a missing binary means: ``./dev test`` installs Debian's package.
MISSING = (
    "redis-server is not on PATH: run ./dev test (it installs it) or apt-get install redis-server"
)
#: Seconds a starting server has to answer PING (it takes ~20 ms).
START_TIMEOUT = 10.0


class RedisServer:
    """One ``redis-server`` without persistence on ``127.0.0.1:<free port>``."""

    def __init__(self, password: str | None = None, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(MISSING)
        self.binary = path
        self.password = password
        sock = free_socket()
        self.port: int = sock.getsockname()[1]
        sock.close()  # redis-server binds it again (SO_REUSEADDR), on every start
        self._dir = tempfile.TemporaryDirectory(prefix="kvroute-redis-")
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the server (again) on the same port; return once it answers PING."""
        if self.running:
            return
        log = Path(self._dir.name) / "redis.log"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(log),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await self._pings():
            if self._proc.returncode is not None:
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"redis-server exited ({self._proc.returncode}): {text[-2000:]}")
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT} s")
            await asyncio.sleep(0.01)

    async def _pings(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            if self.password:
                writer.write(f"AUTH {self.password}\r\n".encode())
            writer.write(b"PING\r\n")
            await writer.drain()
            if self.password:
                await asyncio.wait_for(reader.readline(), 1.0)
            return (await asyncio.wait_for(reader.readline(), 1.0)) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        """SIGKILL: a crash, with the data gone (no persistence)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        self._dir.cleanup()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A password-protected server for a test; a missing binary fails the test
    (not a skip: ./dev test installs redis-server)."""
    try:
        server = RedisServer(password="s3cret")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    async with server:
        yield server
