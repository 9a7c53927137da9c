"""Hot reload: the config file changing on disk, SIGHUP, or POST /admin/reload.

A reload validates the whole file first; only a valid config is swapped in
(``AppState.apply``). An invalid one changes nothing: the error, with its
path in the file, shows on /admin/config, in the log and in
``kvroute_config_reload_total{result="error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

from router.config import ConfigError, load_config
from router.consul import DiscoverySupervisor
from router.state import AppState

LOG = logging.getLogger("kvroute.reload")


def signature(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Reloader:
    def __init__(self, state: AppState, poll_interval: float = 1.0) -> None:
        self.state = state
        self.path = Path(state.config_path) if state.config_path else None
        self.poll_interval = poll_interval
        self._seen = signature(self.path) if self.path else None
        self._task: asyncio.Task[None] | None = None
        #: Discovery follows the config: a reload that changes it restarts it.
        self.discovery = DiscoverySupervisor(state)
        self._pending: set[asyncio.Task[None]] = set()

    def reload(self, trigger: str) -> dict[str, Any]:
        """Load, validate and apply the file now; the outcome as a dict."""
        state = self.state
        if self.path is None:
            return {"result": "error", "errors": ["the router was not started from a file"]}
        self._seen = signature(self.path)
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            state.reload_status.update(last_error=exc.errors, last_error_at=time.time())
            state.metrics.reloads.labels("error").inc()
            LOG.error(
                {
                    "event": "config_reload",
                    "result": "error",
                    "trigger": trigger,
                    "errors": exc.errors,
                }
            )
            return {"result": "error", "errors": exc.errors}
        state.apply(config)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to restart
            task = asyncio.get_running_loop().create_task(self.discovery.ensure())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        state.metrics.reloads.labels("success").inc()
        state.metrics.last_reload.set(state.reload_status["last_success"])
        LOG.info({"event": "config_reload", "result": "success", "trigger": trigger})
        return {"result": "success"}

    async def start(self) -> None:
        if self.path is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload, "sighup")
        if self.state.config.server.watch_config:
            self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        assert self.path is not None
        while True:
            await asyncio.sleep(self.poll_interval)
            current = signature(self.path)
            if current is not None and current != self._seen:
                self.reload("file")
