"""Consul discovery against a fake agent with real blocking semantics."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router import consul as consul_module
from router.config import EndpointConfig
from router.consul import Discovery, DiscoveryError, InvalidInstance, instance_endpoint, next_index
from router.kvevents.hub import KVEventsHub
from router.sources import Source
from router.state import AppState
from tests.fake_consul import FakeConsul
from tests.helpers import admin_endpoints, eventually, router, router_config, serve_app, simulator
from tests.kvevents_helpers import cached_prefix_blocks, generate, our_hashes, publishing_engine

MSG = [{"role": "user", "content": "hi"}]
META = {"kvroute-kind": "vllm", "kvroute-models": "tiny", "zone": "a"}


def consul_config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "discovery": {
            "consul": {
                "url": url,
                "services": [{"name": "llm"}],
                "wait": "1s",
                "backoff_base": 0.05,
                "backoff_max": 0.2,
                **extra,
            }
        },
        "health": {"enabled": False},
    }


def port_of(url: str) -> int:
    return int(url.rpartition(":")[2])


def metric(metrics: str, name: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def test_index_rules() -> None:
    assert next_index(0, "15") == 15
    assert next_index(15, "17") == 17
    assert next_index(15, "3") == 0  # backwards: reset
    assert next_index(0, "0") == 1  # never below 1
    with pytest.raises(DiscoveryError, match="X-Consul-Index"):
        next_index(5, None)


def test_instance_mapping() -> None:
    entry = {
        "Node": {"Node": "n", "Address": "10.0.0.9"},
        "Service": {
            "ID": "v1",
            "Address": "",
            "Port": 8000,
            "Tags": ["kvroute-kind=tgi", "kvroute-weight=3"],
            "Meta": {
                "kvroute-models": "chat=org/chat,code",
                "rack": "r7",
                "kvroute-options": '{"api": "messages"}',
            },
        },
    }
    ep = instance_endpoint("llm", entry)
    assert (ep.id, ep.url, ep.kind, ep.weight) == (
        "consul:llm:v1",
        "http://10.0.0.9:8000",
        "tgi",
        3.0,
    )
    assert [(m.name, m.served_name) for m in ep.models] == [("chat", "org/chat"), ("code", None)]
    assert ep.labels == {"rack": "r7", "consul_node": "n"}
    assert ep.options == {"api": "messages"}
    with pytest.raises(ValueError, match="kvroute-models"):
        instance_endpoint("llm", {"Service": {"ID": "x", "Address": "a", "Port": 1, "Meta": {}}})


SERVICE = {"ID": "x", "Address": "10.0.0.1", "Port": 8000, "Meta": {"kvroute-models": "tiny"}}


def with_meta(**meta: str) -> dict[str, Any]:
    return {"Service": {**SERVICE, "Meta": {"kvroute-models": "tiny", **meta}}}


MALFORMED: dict[str, Any] = {
    "entry is a list": [{"Service": SERVICE}],
    "Service is a list": {"Service": [SERVICE]},
    "Node is a string": {"Node": "node-1", "Service": SERVICE},
    "Meta is a string": {"Service": {**SERVICE, "Meta": "kvroute-models=tiny"}},
    "a Meta value is a list": {"Service": {**SERVICE, "Meta": {"kvroute-models": ["tiny"]}}},
    "Tags is a string": {"Service": {**SERVICE, "Tags": "kvroute-kind=vllm"}},
    "Port is a string": {"Service": {**SERVICE, "Port": "8000"}},
    "Port is out of range": {"Service": {**SERVICE, "Port": 70000}},
    "Address is a number": {"Service": {**SERVICE, "Address": 10}},
    "ID is an object": {"Service": {**SERVICE, "ID": {"id": "x"}}},
    "options are not JSON": with_meta(**{"kvroute-options": "{api: messages"}),
    "options are not an object": with_meta(**{"kvroute-options": '["messages"]'}),
    "weight is not a number": with_meta(**{"kvroute-weight": "heavy"}),
    "weight is infinite": with_meta(**{"kvroute-weight": "inf"}),
    "capacity is not a number": with_meta(**{"kvroute-kv-capacity-tokens": "lots"}),
    "kind is unknown": with_meta(**{"kvroute-kind": "grpc"}),
    "event port is not a number": with_meta(**{"kvroute-kv-events-port": "zmq"}),
    "event port is out of range": with_meta(**{"kvroute-kv-events-port": "0"}),
    "replay port is out of range": with_meta(
        **{"kvroute-kv-events-port": "5557", "kvroute-kv-events-replay-port": "65536"}
    ),
}


@pytest.mark.parametrize("entry", MALFORMED.values(), ids=MALFORMED)
def test_a_malformed_entry_is_an_invalid_instance(entry: Any) -> None:
    with pytest.raises(InvalidInstance):
        instance_endpoint("llm", entry)


def test_an_instance_can_carry_its_kv_event_feed() -> None:
    # vLLM binds tcp://*:5557; kvroute reaches the ports at the instance's address.
    ep = instance_endpoint(
        "llm",
        with_meta(
            **{
                "kvroute-kind": "vllm",
                "kvroute-kv-events-port": "5557",
                "kvroute-kv-events-replay-port": "5558",
                "kvroute-kv-events-topic": "kv",
            }
        ),
    )
    assert ep.kv_events is not None
    assert (ep.kv_events.endpoint, ep.kv_events.replay_endpoint, ep.kv_events.topic) == (
        "tcp://10.0.0.1:5557",
        "tcp://10.0.0.1:5558",
        "kv",
    )
    plain = instance_endpoint("llm", {"Service": SERVICE})
    assert plain.kv_events is None
    v6 = {
        **SERVICE,
        "Address": "fd00::7",
        "Meta": {"kvroute-models": "t", "kvroute-kv-events-port": "5557"},
    }
    ep6 = instance_endpoint("llm", {"Service": v6})
    assert ep6.url == "http://[fd00::7]:8000"
    assert ep6.kv_events is not None and ep6.kv_events.endpoint == "tcp://[fd00::7]:5557"
    assert ep6.kv_events.replay_endpoint is None


def test_a_well_formed_entry_maps() -> None:
    assert isinstance(instance_endpoint("llm", {"Service": SERVICE}), EndpointConfig)


async def test_malformed_entries_are_skipped_and_counted_and_the_watch_goes_on() -> None:
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim, _ = await stack.enter_async_context(simulator())
        for entry in MALFORMED.values():  # before the good one in the same answer
            consul.register_raw("llm", entry)
        consul.register("llm", "a", port_of(sim), META)
        url = await stack.enter_async_context(
            router(router_config([], **consul_config(consul_url)))
        )

        async def has(ids: set[str]) -> bool:
            return set(await admin_endpoints(url)) == ids

        await eventually(lambda: has({"consul:llm:a"}))
        async with httpx.AsyncClient(base_url=url) as c:
            metrics = (await c.get("/metrics")).text
            skipped = metric(metrics, "kvroute_discovery_invalid_instances_total")
            assert skipped >= len(MALFORMED) and skipped % len(MALFORMED) == 0
            assert metric(metrics, "kvroute_discovery_errors_total") == 0
            consul.register("llm", "b", port_of(sim), META)  # the watch still follows
            await eventually(lambda: has({"consul:llm:a", "consul:llm:b"}))
            service = (await c.get("/admin/config")).json()["discovery"]["consul"]["services"]
            assert (service["llm"]["last_error"], service["llm"]["endpoints"]) == (None, 2)


async def test_an_unexpected_error_is_counted_and_the_watch_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def fails_once(service: str, entry: Any) -> EndpointConfig:
        calls.append(service)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return instance_endpoint(service, entry)

    monkeypatch.setattr(consul_module, "instance_endpoint", fails_once)
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim, _ = await stack.enter_async_context(simulator())
        consul.register("llm", "a", port_of(sim), META)
        url = await stack.enter_async_context(
            router(router_config([], **consul_config(consul_url)))
        )

        async def found() -> bool:
            return "consul:llm:a" in await admin_endpoints(url)

        await eventually(found)
        async with httpx.AsyncClient(base_url=url) as c:
            metrics = (await c.get("/metrics")).text
        assert metric(metrics, "kvroute_discovery_errors_total") == 1
        # The failed answer was applied again, not skipped by moving the index on.
        assert consul.requests[1].get("index") is None


async def test_a_reload_that_stops_watching_a_service_drops_only_its_endpoints() -> None:
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        consul.register("llm", "a", 9001, META)
        consul.register("emb", "e", 9002, META)
        both = [{"name": "llm"}, {"name": "emb"}]
        old = router_config([], **consul_config(consul_url, services=both))
        new = router_config([], **consul_config(consul_url, services=[{"name": "emb"}]))
        state = AppState.from_config(old)
        discovery = Discovery(state)
        await discovery.start()
        try:

            async def both_found() -> bool:
                return {e.id for e in state.registry.all()} == {"consul:llm:a", "consul:emb:e"}

            await eventually(both_found)
            kept = state.registry.get("consul:emb:e")
            assert kept is not None and kept.source == Source.consul("emb")
            kept.healthy = False
            await discovery.reconfigure(old, new)
            assert {e.id for e in state.registry.all()} == {"consul:emb:e"}
            asked = len(consul.requests)
            await eventually(lambda: _count(consul, asked + 1))
            assert state.registry.get("consul:emb:e") is kept and not kept.healthy
            assert state.registry.ids(Source.consul("llm")) == set()
        finally:
            await discovery.stop()


async def test_instances_come_and_go_and_mix_with_static() -> None:
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim_a, _ = await stack.enter_async_context(simulator())
        sim_b, _ = await stack.enter_async_context(simulator())
        static = [
            {
                "id": "static-0",
                "url": sim_b,
                "kind": "vllm",
                "models": [{"name": "other", "served_name": "tiny"}],
            }
        ]
        url = await stack.enter_async_context(
            router(router_config(static, **consul_config(consul_url)))
        )
        consul.register("llm", "a", port_of(sim_a), META)

        async def has(ids: set[str]) -> bool:
            return set(await admin_endpoints(url)) == ids

        await eventually(lambda: has({"static-0", "consul:llm:a"}))
        state = (await admin_endpoints(url))["consul:llm:a"]
        assert (state["source"], state["kind"]) == ({"kind": "consul", "service": "llm"}, "vllm")
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert r.status_code == 200
            consul.deregister("llm", "a")
            await eventually(lambda: has({"static-0"}))
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert r.status_code == 404  # nothing serves it any more
            assert (
                await c.post("/v1/chat/completions", json={"model": "other", "messages": MSG})
            ).status_code == 200


async def test_blocking_queries_do_not_busy_loop() -> None:
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim, _ = await stack.enter_async_context(simulator())
        consul.register("llm", "a", port_of(sim), META)
        await stack.enter_async_context(router(router_config([], **consul_config(consul_url))))
        await eventually(lambda: _count(consul, 2))
        first = len(consul.requests)
        await asyncio.sleep(2.5)
        # wait=1s: at most a few queries in 2.5 s with nothing changing, each blocking.
        assert len(consul.requests) - first <= 4
        assert all("index" in q for q in consul.requests[1:])
        assert consul.requests[0].get("index") is None and consul.requests[0]["passing"]


async def _count(consul: FakeConsul, n: int) -> bool:
    return len(consul.requests) >= n


async def test_index_going_backwards_resets_to_a_full_read() -> None:
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim, _ = await stack.enter_async_context(simulator())
        consul.register("llm", "a", port_of(sim), META)
        await stack.enter_async_context(router(router_config([], **consul_config(consul_url))))
        await eventually(lambda: _count(consul, 2))
        consul.go_backwards(3)
        await eventually(lambda: _has_query_without_index(consul))


async def _has_query_without_index(consul: FakeConsul) -> bool:
    return any("index" not in q for q in consul.requests[1:])


async def test_outage_keeps_the_last_set_and_shows_it() -> None:
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim, _ = await stack.enter_async_context(simulator())
        consul.register("llm", "a", port_of(sim), META)
        url = await stack.enter_async_context(
            router(router_config([], **consul_config(consul_url)))
        )

        async def found() -> bool:
            return "consul:llm:a" in await admin_endpoints(url)

        await eventually(found)
        consul.down = True
        consul.register("llm", "b", 1, META)  # wake the blocked query into the outage
        async with httpx.AsyncClient(base_url=url) as c:

            async def outage_visible() -> bool:
                cfg = (await c.get("/admin/config")).json()
                return cfg["discovery"]["consul"]["up"] is False

            await eventually(outage_visible)
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert r.status_code == 200  # the last known set keeps serving
            metrics = (await c.get("/metrics")).text
            assert 'kvroute_discovery_up{source="consul"} 0.0' in metrics
            assert 'kvroute_discovery_errors_total{source="consul"}' in metrics
            errors_then = len(consul.requests)
            await asyncio.sleep(1.0)
            # Backoff (capped at 0.2 s in this test, with a token bucket) - not a busy loop.
            assert len(consul.requests) - errors_then <= 12
            consul.down = False

            async def back() -> bool:
                cfg = (await c.get("/admin/config")).json()
                return cfg["discovery"]["consul"]["up"] is True

            await eventually(back)


async def test_missing_index_header_is_an_error_not_a_busy_loop() -> None:
    consul = FakeConsul()
    consul.omit_index = True
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        url = await stack.enter_async_context(
            router(router_config([], **consul_config(consul_url)))
        )
        async with httpx.AsyncClient(base_url=url) as c:

            async def error_shown() -> bool:
                cfg = (await c.get("/admin/config")).json()
                service = cfg["discovery"]["consul"]["services"].get("llm", {})
                return "X-Consul-Index" in (service.get("last_error") or "")

            await eventually(error_shown)
        before = len(consul.requests)
        await asyncio.sleep(1.0)
        assert len(consul.requests) - before <= 12


async def test_a_reload_starts_and_stops_discovery(tmp_path: Any) -> None:
    import yaml

    from router.app import build_app
    from router.config import load_config

    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        sim, _ = await stack.enter_async_context(simulator())
        consul.register("llm", "a", port_of(sim), META)
        path = tmp_path / "kvroute.yaml"
        static = [{"id": "static-0", "url": sim, "kind": "vllm", "models": ["tiny"]}]
        base = {
            "endpoints": static,
            "health": {"enabled": False},
            "server": {"access_log": False, "watch_config": False},
            "admin": {"open": True},
        }
        path.write_text(yaml.safe_dump(base))
        app = build_app(load_config(path), str(path))
        url = await stack.enter_async_context(serve_app(app))
        async with httpx.AsyncClient(base_url=url) as c:
            assert set(await admin_endpoints(url)) == {"static-0"}
            path.write_text(yaml.safe_dump({**base, **consul_config(consul_url)}))
            assert (await c.post("/admin/reload")).json() == {"result": "success"}

            async def both() -> bool:
                return set(await admin_endpoints(url)) == {"static-0", "consul:llm:a"}

            await eventually(both)
            path.write_text(yaml.safe_dump(base))
            assert (await c.post("/admin/reload")).json() == {"result": "success"}

            async def static_only() -> bool:
                return set(await admin_endpoints(url)) == {"static-0"}

            await eventually(static_only)


async def test_a_discovered_vllm_feeds_the_precise_index() -> None:
    # Consul -> registry -> the KV-event hub subscribes to the instance's feed.
    consul = FakeConsul()
    async with AsyncExitStack() as stack:
        consul_url = await stack.enter_async_context(serve_app(consul.app))
        p = await stack.enter_async_context(publishing_engine())
        assert p.replay_endpoint is not None
        state = AppState.from_config(router_config([], **consul_config(consul_url)))
        discovery = Discovery(state)
        hub = KVEventsHub(state, follow_interval=0.05)
        await discovery.start()
        await hub.start()
        try:
            consul.register(
                "llm",
                "v",
                9001,
                {
                    **META,
                    "kvroute-kv-events-port": p.endpoint.rpartition(":")[2],
                    "kvroute-kv-events-replay-port": p.replay_endpoint.rpartition(":")[2],
                },
            )
            ids = await generate(p.engine, "a system prompt long enough to fill some blocks " * 4)

            async def mirrored() -> bool:
                blocks = state.blocks.get("consul:llm:v")
                return (
                    blocks is not None
                    and not blocks.stale
                    and blocks.match(our_hashes(p.engine, ids))
                    == cached_prefix_blocks(p.engine, ids)
                    and cached_prefix_blocks(p.engine, ids) > 0
                )

            await eventually(mirrored, within=10)
            consul.deregister("llm", "v")

            async def unsubscribed() -> bool:
                return hub.status() == {} and state.blocks.get("consul:llm:v") is None

            await eventually(unsubscribed, within=10)
        finally:
            await hub.stop()
            await discovery.stop()
