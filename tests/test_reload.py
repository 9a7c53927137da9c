"""Hot reload: file edits, SIGHUP, /admin/reload; never serving from a broken config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.engine import EngineParams
from router import reload as reload_module
from router.app import build_app
from router.config import Config, load_config
from router.lifecycle import Lifecycle
from router.monitor import Monitor
from router.reload import Reloader
from router.state import AppState
from tests.helpers import eventually, free_socket, serve_app, simulator

ROOT = Path(__file__).resolve().parent.parent
MSG = [{"role": "user", "content": "hi"}]


def write(path: Path, endpoints: list[dict[str, Any]], **extra: Any) -> None:
    raw = {
        "endpoints": endpoints,
        "server": {"access_log": False},
        "admin": {"open": True},
        "health": {"enabled": False},
        "scrape": {"enabled": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(raw))


def ep(i: int, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": f"s{i}", "url": url, "kind": "vllm", "models": ["tiny"], **extra}


async def models(c: httpx.AsyncClient) -> list[str]:
    return [m["id"] for m in (await c.get("/v1/models")).json()["data"]]


def reloads(metrics: str, result: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "kvroute_config_reload_total" and sample.labels["result"] == result:
                return sample.value
    return 0.0


async def test_admin_reload_and_file_watch(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    async with AsyncExitStack() as stack:
        sim, _ = await stack.enter_async_context(simulator())
        write(path, [ep(0, sim)])
        app = build_app(load_config(path), str(path))
        url = await stack.enter_async_context(serve_app(app))
        async with httpx.AsyncClient(base_url=url) as c:
            assert await models(c) == ["tiny"]
            write(path, [ep(0, sim)], models={"tiny": {"aliases": ["gpt-4o-mini"]}})
            r = await c.post("/admin/reload")
            assert r.json() == {"result": "success"}
            assert await models(c) == ["gpt-4o-mini", "tiny"]

            # The file watcher picks up an edit by itself.
            write(path, [ep(0, sim)], models={"tiny": {"aliases": ["small"]}})

            async def watched() -> bool:
                return await models(c) == ["small", "tiny"]

            await eventually(watched)
            # At least the two: a loaded machine's watcher may also have taken
            # the first edit before /admin/reload did.
            assert reloads((await c.get("/metrics")).text, "success") >= 2


async def test_invalid_reload_under_load_loses_nothing_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    async with AsyncExitStack() as stack:
        sim, _ = await stack.enter_async_context(simulator())
        write(path, [ep(0, sim)], models={"tiny": {"policy": "least_load"}})
        app = build_app(load_config(path), str(path))
        url = await stack.enter_async_context(serve_app(app))
        before = app.state.config
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url) as c:

            async def load() -> None:
                for _ in range(60):
                    r = await c.post(
                        "/v1/chat/completions",
                        json={"model": "tiny", "messages": MSG, "max_tokens": 2},
                    )
                    statuses.append(r.status_code)

            workers = [asyncio.create_task(load()) for _ in range(3)]
            path.write_text(path.read_text().replace("least_load", "no_such_policy"))
            r = await c.post("/admin/reload")
            assert r.status_code == 422
            assert r.json()["errors"] == [
                "models.tiny.policy: unknown policy 'no_such_policy' (known: composite, "
                "consistent_hash, least_latency, least_load, power_of_two, prefix_affinity, "
                "random, round_robin, session_affinity, weighted, weighted_round_robin)"
            ]
            path.write_text("endpoints: [oops")
            assert (await c.post("/admin/reload")).status_code == 422
            await asyncio.gather(*workers)
            status = (await c.get("/admin/config")).json()["reload"]
            assert "invalid YAML" in status["last_error"][0]
            metrics = (await c.get("/metrics")).text
        assert statuses == [200] * 180
        assert app.state.config is before
        assert 'kvroute_config_reload_total{result="error"}' in metrics


async def test_state_that_should_survive_a_reload_does(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    async with AsyncExitStack() as stack:
        a, _ = await stack.enter_async_context(simulator())
        b, _ = await stack.enter_async_context(simulator())
        write(path, [ep(0, a), ep(1, b)], models={"tiny": {"policy": "prefix_affinity"}})
        app = build_app(load_config(path), str(path))
        url = await stack.enter_async_context(serve_app(app))
        async with httpx.AsyncClient(base_url=url) as c:
            for q in ("a", "b", "c"):
                await c.post(
                    "/v1/chat/completions",
                    json={
                        "model": "tiny",
                        "max_tokens": 2,
                        "messages": [
                            {"role": "system", "content": "S" * 3000},
                            {"role": "user", "content": q},
                        ],
                    },
                )
            s1 = app.state.registry.get("s1")
            assert s1 is not None
            s1.healthy = False
            s1.circuit.failure(0.0)
            index_before = (await c.get("/admin/prefix-index")).json()["tiny"]["entries"]
            assert index_before > 0
            # An unrelated change: a weight, and a new model elsewhere.
            write(
                path,
                [ep(0, a), ep(1, b, weight=2)],
                models={"tiny": {"policy": "prefix_affinity"}, "extra": {}},
                circuit={"failures": 7},
            )
            assert (await c.post("/admin/reload")).json() == {"result": "success"}
            s1 = app.state.registry.get("s1")
            assert s1 is not None
            assert (s1.healthy, s1.circuit.failures, s1.config.weight) == (False, 1, 2.0)
            assert s1.circuit.config.failures == 7  # new thresholds, same state
            index_after = (await c.get("/admin/prefix-index")).json()["tiny"]["entries"]
            assert index_after == index_before


async def test_removed_endpoint_drains_instead_of_cutting(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    slow = EngineParams(step_base=0.02, prefill_per_token=0, decode_per_seq=0)
    async with AsyncExitStack() as stack:
        a, _ = await stack.enter_async_context(simulator(params=slow))
        b, _ = await stack.enter_async_context(simulator())
        write(path, [ep(0, a)])
        app = build_app(load_config(path), str(path))
        url = await stack.enter_async_context(serve_app(app))
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "tiny", "messages": MSG, "max_tokens": 40, "stream": True}
            flight = asyncio.create_task(c.post("/v1/chat/completions", json=body))

            async def in_flight() -> bool:
                s0 = app.state.registry.get("s0")
                return s0 is not None and s0.in_flight == 1

            await eventually(in_flight)
            write(path, [ep(1, b)])
            assert (await c.post("/admin/reload")).json() == {"result": "success"}
            assert app.state.registry.get("s0") is None
            r = await flight
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            r = await c.post(
                "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2}
            )
            assert r.status_code == 200


async def test_sighup_reloads(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    async with simulator() as (sim, _):
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()
        write(path, [ep(0, sim)])
        raw = yaml.safe_load(path.read_text())
        raw["server"].update(port=port, watch_config=False)  # only the signal reloads
        path.write_text(yaml.safe_dump(raw))
        # This checkout's code, whatever the virtualenv's console script points at.
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "serve", "--config", str(path)],
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:

                async def ready() -> bool:
                    try:
                        return (await c.get("/ready")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(ready)
                raw["models"] = {"tiny": {"aliases": ["via-sighup"]}}
                path.write_text(yaml.safe_dump(raw))
                proc.send_signal(signal.SIGHUP)

                async def reloaded() -> bool:
                    return "via-sighup" in await models(c)

                await eventually(reloaded)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_schema_command(capsys: Any) -> None:
    from router.cli import main

    assert main(["schema"]) == 0
    import json

    schema = json.loads(capsys.readouterr().out)
    assert "endpoints" in schema["properties"] and "discovery" in schema["properties"]


async def test_a_file_that_is_not_utf8_is_reported_and_watching_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kvroute.yaml"
    async with AsyncExitStack() as stack:
        sim, _ = await stack.enter_async_context(simulator())
        write(path, [ep(0, sim)])
        app = build_app(load_config(path), str(path))
        before = asyncio.all_tasks()
        closed: list[bool] = []
        close = app.state.forwarder.close

        async def spy_close() -> None:
            closed.append(True)
            await close()

        monkeypatch.setattr(app.state.forwarder, "close", spy_close)
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as c:

            async def error_count() -> float:
                return reloads((await c.get("/metrics")).text, "error")

            path.write_bytes(b"endpoints: []\nseed: 7 # caf\xe9\n")

            async def watch_reported() -> bool:
                return await error_count() == 1

            await eventually(watch_reported)
            status = (await c.get("/admin/config")).json()["reload"]
            assert status["last_error"] == [
                f"{path}: line 2: not UTF-8 text (byte 0xe9: invalid continuation byte)"
            ]
            assert status["last_error_at"] > 0
            r = await c.post("/admin/reload")
            assert r.status_code == 422
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {"result": "error", "errors": status["last_error"]}
            assert await error_count() == 2
            assert await models(c) == ["tiny"]  # nothing changed

            # The watch goes on: a valid save, even by renaming a new file over
            # the old one as editors do, is picked up.
            new = tmp_path / ".kvroute.yaml.swp"
            write(new, [ep(0, sim)], models={"tiny": {"aliases": ["renamed"]}})
            os.replace(new, path)

            async def picked_up() -> bool:
                return await models(c) == ["renamed", "tiny"]

            await eventually(picked_up)
            assert (await c.get("/admin/config")).json()["reload"]["last_error"] is None

            # A reload that failed does not keep the shutdown from closing everything.
            path.write_bytes(b"\xff")

            async def failed_again() -> bool:
                return await error_count() == 3

            await eventually(failed_again)
        assert closed == [True]
        assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()


async def test_the_file_is_read_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kvroute.yaml"
    write(path, [ep(0, "http://127.0.0.1:1")])
    state = AppState.from_config(load_config(path), str(path))
    readers: list[threading.Thread] = []

    def spy_load(p: Path) -> Config:
        readers.append(threading.current_thread())
        return load_config(p)

    monkeypatch.setattr(reload_module, "load_config", spy_load)
    assert await Reloader(state).reload("test") == {"result": "success"}
    assert readers and threading.main_thread() not in readers


async def test_reloaded_intervals_restart_the_monitor_loops(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    hour = {"enabled": True, "interval": 3600}
    cfg = {
        "server": {"access_log": False, "watch_config": False},
        "scrape": {"enabled": False},
        "admin": {"open": True},
    }
    write(path, [ep(0, "http://e:1")], **cfg, health=hour)
    state = AppState.from_config(load_config(path), str(path))
    probes: list[str] = []

    def backend(request: httpx.Request) -> httpx.Response:
        probes.append(request.url.path)
        return httpx.Response(200, text="")

    client = httpx.AsyncClient(transport=httpx.MockTransport(backend))
    lifecycle = Lifecycle(state, monitor=Monitor(state, client=client))
    loops = lifecycle.monitor.loops
    await lifecycle.start()
    try:
        health = loops["health"]
        assert (health.interval, set(loops)) == (3600, {"health"})
        fast = {"enabled": True, "interval": 0.01}
        write(path, [ep(0, "http://e:1")], **{**cfg, "scrape": fast}, health=fast)
        assert await lifecycle.reloader.reload("test") == {"result": "success"}
        assert (loops["health"].interval, loops["scrape"].interval) == (0.01, 0.01)
        assert loops["health"] is not health and health.task.done()

        async def fast_probes() -> bool:
            # An hour apart, there would be one of each.
            return probes.count("/health") >= 5 and probes.count("/metrics") >= 5

        await eventually(fast_probes)
        # A change elsewhere leaves the loops running as they are.
        running = dict(loops)
        write(
            path,
            [ep(0, "http://e:1")],
            **{**cfg, "scrape": fast},
            health={**fast, "fall": 3},
            circuit={"failures": 9},
        )
        assert await lifecycle.reloader.reload("test") == {"result": "success"}
        assert loops == running
        write(path, [ep(0, "http://e:1")], **cfg, health=fast)
        assert await lifecycle.reloader.reload("test") == {"result": "success"}
        assert set(loops) == {"health"} and running["scrape"].task.done()
    finally:
        await lifecycle.stop()
        await client.aclose()
    assert loops == {} and health.task.done()


class Broken:
    def __init__(self, fail_start: bool = False) -> None:
        self.fail_start = fail_start

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("cannot start")

    async def stop(self) -> None:
        raise RuntimeError("cannot stop")

    async def reconfigure(self, old: Config, new: Config) -> None:
        raise RuntimeError("cannot follow")


async def test_every_service_stops_even_when_one_fails(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    write(path, [ep(0, "http://127.0.0.1:1")], health={"interval": 3600})
    state = AppState.from_config(load_config(path), str(path))
    lifecycle = Lifecycle(state)
    lifecycle.services.insert(1, Broken())
    await lifecycle.start()
    assert set(lifecycle.monitor.loops) == {"health"}
    # A service that cannot follow a reload keeps neither the reload nor the others from it.
    write(path, [ep(0, "http://127.0.0.1:1")], health={"interval": 1800})
    assert await lifecycle.reloader.reload("test") == {"result": "success"}
    assert lifecycle.monitor.loops["health"].interval == 1800
    await lifecycle.stop()  # Broken.stop raises between the reloader and the monitor
    assert lifecycle.monitor.loops == {}

    failing = Lifecycle(state)
    failing.services.append(Broken(fail_start=True))
    with pytest.raises(RuntimeError, match="cannot start"):
        await failing.start()
    assert failing.monitor.loops == {}


async def test_the_watch_survives_its_watcher_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kvroute.yaml"
    write(path, [ep(0, "http://127.0.0.1:1")])
    state = AppState.from_config(load_config(path), str(path))
    polling: list[bool | None] = []
    awatch = reload_module.awatch

    def no_inotify_at_first(*paths: Path, **options: Any) -> Any:
        polling.append(options.get("force_polling"))
        if len(polling) == 1:
            raise OSError("inotify instance limit reached")
        return awatch(*paths, **options)

    monkeypatch.setattr(reload_module, "awatch", no_inotify_at_first)
    reloader = Reloader(state)
    await reloader.start()
    try:
        saves = 0

        async def picked_up() -> bool:
            # Saved again on every look: the polling watcher may start after a save.
            nonlocal saves
            saves += 1
            write(path, [ep(0, "http://127.0.0.1:1")], models={"tiny": {"aliases": [f"v{saves}"]}})
            return "tiny" in state.config.models

        await eventually(picked_up, interval=0.5)
    finally:
        await reloader.stop()
    assert polling == [None, True]
