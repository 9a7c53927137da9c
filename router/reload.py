"""Hot reload: the config file changing on disk, SIGHUP, or POST /admin/reload.

A reload reads and validates the whole file in a worker thread, never on the
event loop. Only a valid config is swapped in (``AppState.apply``); then the
app's services hear what changed (``on_change``, see router/lifecycle.py).
Any error reading or validating the file changes nothing: it shows on
/admin/config (``reload.last_error``), in the log and in
``kvroute_config_reload_total{result="error"}``, and the watch goes on.

The file is watched with watchfiles (inotify) through its directory, so
editors that save by renaming a new file over the old one are seen, and so
is Kubernetes swapping a ConfigMap volume's ``..data`` link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from router.config import Config, ConfigError, load_config
from router.state import AppState

LOG = logging.getLogger("kvroute.reload")

#: Told (old, new) after a new config was applied.
OnChange = Callable[[Config, Config], Awaitable[None]]

#: Read when the process starts, never again.
START_ONLY = (
    ("server", "host"),
    ("server", "port"),
    ("server", "log_level"),
    ("server", "limits"),
    ("shutdown", "grace"),
    ("shutdown", "timeout"),
)


def signature(*paths: Path) -> str | None:
    """A digest of the files' bytes together (None if the first is unreadable)."""
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        try:
            digest.update(path.read_bytes())
        except OSError:
            if i == 0:
                return None
            digest.update(b"\0missing")
        digest.update(b"\0")
    return digest.hexdigest()


def start_only_changes(old: Config, new: Config) -> list[str]:
    return [
        f"{section}.{name}"
        for section, name in START_ONLY
        if getattr(getattr(old, section), name) != getattr(getattr(new, section), name)
    ]


class Reloader:
    """A lifespan service: the file watch and SIGHUP; ``reload`` for the admin API.

    ``step_ms`` is the quiet time after a change before the file is read (a
    save in several writes is read once); ``debounce_ms`` bounds the wait.
    """

    def __init__(
        self,
        state: AppState,
        on_change: OnChange | None = None,
        *,
        step_ms: int = 100,
        debounce_ms: int = 1600,
    ) -> None:
        self.state = state
        self.path = Path(state.config_path).absolute() if state.config_path else None
        self.on_change = on_change
        self.step_ms, self.debounce_ms = step_ms, debounce_ms
        #: The digest of the file as last read, so the watch skips a save that changed nothing.
        self._seen: str | None = None
        self._lock = asyncio.Lock()
        self._started = self._closed = False
        self._watcher: asyncio.Task[None] | None = None
        self._stop_watch = asyncio.Event()
        #: SIGHUP reloads and watchers told to stop, awaited by ``stop``.
        self._pending: set[asyncio.Task[Any]] = set()

    async def reload(self, trigger: str, *, if_changed: bool = False) -> dict[str, Any]:
        """Read, validate and apply the file now; the outcome, for the admin API.

        With ``if_changed`` (the watch), a file whose bytes are those last read
        is left alone: ``{"result": "unchanged"}``.
        """
        if self.path is None:
            return self._failed(trigger, ["the router was not started from a file"])
        async with self._lock:
            if self._closed:
                return {"result": "error", "errors": ["the router is stopping"]}
            digest = await asyncio.to_thread(signature, *self.watched())
            if if_changed and digest is not None and digest == self._seen:
                return {"result": "unchanged"}
            self._seen = digest
            try:
                config = await asyncio.to_thread(load_config, self.path)
            except ConfigError as exc:
                return self._failed(trigger, exc.errors)
            except Exception as exc:  # whatever goes wrong reading the file is reported
                LOG.exception({"event": "config_reload", "trigger": trigger})
                return self._failed(
                    trigger, [f"{self.path}: cannot load: {exc.__class__.__name__}: {exc}"]
                )
            old = self.state.config
            try:
                self.state.apply(config)
            except Exception as exc:
                LOG.exception({"event": "config_reload", "trigger": trigger})
                return self._failed(
                    trigger, [f"internal error applying the config: {exc.__class__.__name__}"]
                )
            self.state.metrics.reloads.labels("success").inc()
            self.state.metrics.last_reload.set(self.state.reload_status["last_success"])
            LOG.info({"event": "config_reload", "result": "success", "trigger": trigger})
            if ignored := start_only_changes(old, config):
                LOG.warning(
                    {"event": "config_reload", "restart_required": ignored, "trigger": trigger}
                )
            if self.on_change is not None:
                try:
                    await self.on_change(old, config)
                except Exception:  # the config is in force; a service that failed says so
                    LOG.exception({"event": "config_reload", "trigger": trigger})
            return {"result": "success"}

    def _failed(self, trigger: str, errors: list[str]) -> dict[str, Any]:
        self.state.reload_status.update(last_error=errors, last_error_at=time.time())
        self.state.metrics.reloads.labels("error").inc()
        LOG.error(
            {"event": "config_reload", "result": "error", "trigger": trigger, "errors": errors}
        )
        return {"result": "error", "errors": errors}

    # -- the service -----------------------------------------------------------------

    async def start(self) -> None:
        if self.path is None:
            return
        self._started = True
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._seen = await asyncio.to_thread(signature, *self.watched())
        if self.state.config.server.watch_config:
            self._watch_file()

    async def stop(self) -> None:
        """Stop watching; reloads under way finish first."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self._unwatch_file()
        await asyncio.gather(*self._pending, return_exceptions=True)
        async with self._lock:
            self._closed = True

    def watched(self) -> list[Path]:
        """The config file, and the tenants file it names."""
        assert self.path is not None
        paths = [self.path]
        tenants = self.state.config.auth.tenants_file
        if tenants:
            extra = Path(tenants)
            paths.append(extra if extra.is_absolute() else self.path.parent / extra)
        return paths

    async def reconfigure(self, old: Config, new: Config) -> None:
        if not self._started:
            return
        if old.auth.tenants_file != new.auth.tenants_file:
            self._unwatch_file()  # another file to watch: start over
        if new.server.watch_config:
            self._watch_file()
        else:
            self._unwatch_file()

    def _on_sighup(self) -> None:
        self._track(asyncio.create_task(self.reload("sighup")))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _watch_file(self) -> None:
        if self._watcher is None:
            self._stop_watch = asyncio.Event()
            self._watcher = asyncio.create_task(self._watch(self._stop_watch), name="config-watch")

    def _unwatch_file(self) -> None:
        # Not awaited here: a reload the watcher itself started may be what turns
        # it off. ``stop`` awaits it.
        if self._watcher is not None:
            self._stop_watch.set()
            self._track(self._watcher)
            self._watcher = None

    async def _watch(self, stopping: asyncio.Event) -> None:
        paths = self.watched()
        dirs = sorted({str(p.parent) for p in paths})
        # Kubernetes updates a ConfigMap volume by renaming a new ``..data`` link
        # into place; the config file, a link through it, never changes itself.
        names = {p.name for p in paths} | {"..data"}

        def relevant(change: Change, changed: str) -> bool:
            return Path(changed).name in names

        polling: bool | None = None  # watchfiles' choice (inotify) first
        while not stopping.is_set():
            try:
                async for _ in awatch(
                    *dirs,
                    watch_filter=relevant,
                    step=self.step_ms,
                    debounce=self.debounce_ms,
                    stop_event=stopping,
                    recursive=False,
                    force_polling=polling,
                ):
                    await self.reload("file", if_changed=True)
            except Exception:
                # E.g. the directory went away, or no inotify here: try again,
                # polling this time, which works everywhere.
                LOG.exception({"event": "config_watch_failed", "path": str(self.path)})
                polling = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 1.0)
