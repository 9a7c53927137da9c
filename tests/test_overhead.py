"""kvroute's own time per request (router/overhead.py): the arithmetic on a fake
clock, then ``x-kvroute-overhead-ms`` and ``kvroute_overhead_seconds`` over
loopback. No timing thresholds: the header is checked against what the client
measured and what the backend was made to spend (relations, not numbers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.common import Faults
from router.overhead import Waits, header_value
from router.tenants import hash_key, new_key
from tests.helpers import eventually, router, router_config, simulator

HEADER = "x-kvroute-overhead-ms"
#: The header's rounding (three decimals of a millisecond).
ROUNDING_MS = 0.0005


# -- the arithmetic -----------------------------------------------------------------


def test_waits_leave_kvroutes_own_time() -> None:
    waits = Waits()
    # received at 10; a failed attempt waits 11 -> 14; a second one 15 -> 17.5;
    # queued 1 s for admission; the response starts at 19.
    waits.begin(11.0)
    waits.end(14.0)
    waits.end(14.5)  # a second end (the relay's finally) changes nothing
    waits.begin(15.0)
    waits.end(17.5)
    waits.add(1.0)
    assert waits.own(10.0, 19.0) == pytest.approx(2.5)


def test_an_open_wait_counts_until_now_and_own_time_is_never_negative() -> None:
    waits = Waits()
    waits.begin(3.0)
    assert waits.own(0.0, 5.0) == pytest.approx(3.0)
    waits.add(100.0)
    assert waits.own(0.0, 5.0) == 0.0


def test_header_value_has_three_decimals() -> None:
    assert header_value(0.000123456) == b"0.123"
    assert header_value(1.5) == b"1500.000"


# -- over loopback ---------------------------------------------------------------------


def chat(model: str = "tiny", stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
        "stream": stream,
    }


async def timed_post(c: httpx.AsyncClient, body: Any, **kw: Any) -> tuple[httpx.Response, float]:
    """The answer (read to its end) and the client's wall time for it, in ms."""
    began = time.perf_counter()
    r = await c.post("/v1/chat/completions", json=body, **kw)
    return r, (time.perf_counter() - began) * 1000


def overhead_ms(r: httpx.Response) -> float:
    value = r.headers[HEADER]
    whole, _, decimals = value.partition(".")
    assert whole.isdigit() and len(decimals) == 3, value
    return float(value)


async def overhead_count(c: httpx.AsyncClient, model: str) -> float:
    text = (await c.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "kvroute_overhead_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels == {"model": model}:
                    return float(sample.value)
    return 0.0


async def test_every_inference_answer_says_its_overhead_and_counts_it() -> None:
    async with simulator() as (sim, _):
        config = router_config([{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"]}])
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            for stream in (False, True):
                before = await overhead_count(c, "tiny")
                r, total = await timed_post(c, chat(stream=stream))
                assert r.status_code == 200
                if stream:
                    assert r.text.rstrip().endswith("data: [DONE]")
                assert 0 <= overhead_ms(r) <= total + ROUNDING_MS
                assert await overhead_count(c, "tiny") == before + 1
            # Answers kvroute makes itself: all of their time is its own.
            r, total = await timed_post(c, chat("no-such-model"))
            assert r.status_code == 404
            assert 0 <= overhead_ms(r) <= total + ROUNDING_MS
            r = await c.post("/v1/chat/completions", content=b"{not json")
            assert r.status_code == 400 and overhead_ms(r) >= 0
            assert await overhead_count(c, "(unknown)") == 1
            # Not on the control routes.
            assert HEADER not in (await c.get("/v1/models")).headers


@pytest.mark.parametrize("stream", [False, True])
async def test_a_slow_backend_does_not_count_as_overhead(stream: bool) -> None:
    stall = 0.3
    async with simulator(faults=Faults(stall=stall)) as (sim, _):
        config = router_config([{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"]}])
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            r, total = await timed_post(c, chat(stream=stream))
            assert r.status_code == 200
            # The client waited at least the stall; kvroute's share excludes it.
            assert 0 <= overhead_ms(r) <= total - stall * 1000 + ROUNDING_MS


async def test_a_failed_attempts_wait_is_not_overhead_either() -> None:
    """The first endpoint never answers (a first-byte timeout), the fallback
    model's does: the timeout was spent waiting on a backend. (The bound is
    the spare's too: a loaded machine must not make it time out as well.)"""
    first_byte = 1.0
    async with (
        simulator(faults=Faults(stall=-1)) as (hung, _),
        simulator(["spare"]) as (spare, _),
    ):
        config = router_config(
            [
                {"id": "hung", "url": hung, "kind": "vllm", "models": ["tiny"]},
                {"id": "spare", "url": spare, "kind": "vllm", "models": ["spare"]},
            ],
            models={"tiny": {"fallbacks": ["spare"]}, "spare": {}},
            timeouts={"first_byte": first_byte},
            health={"enabled": False},
        )
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            r, total = await timed_post(c, chat())
            assert r.status_code == 200 and r.json()["model"] == "spare"
            assert 0 <= overhead_ms(r) <= total - first_byte * 1000 + ROUNDING_MS


async def test_a_cache_hit_says_its_overhead() -> None:
    async with simulator() as (sim, _):
        config = router_config(
            [{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"]}],
            models={"tiny": {"cache": {"enabled": True, "ttl": 60}}},
        )
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {**chat(), "temperature": 0}
            await c.post("/v1/chat/completions", json=body)
            r, total = await timed_post(c, body)
            assert r.headers["x-kvroute-cache"] == "hit"
            assert 0 <= overhead_ms(r) <= total + ROUNDING_MS


async def admission_wait_sum(c: httpx.AsyncClient) -> tuple[float, float]:
    """(count, sum) of kvroute_admission_wait_seconds over every label."""
    count = total = 0.0
    for family in text_string_to_metric_families((await c.get("/metrics")).text):
        if family.name == "kvroute_admission_wait_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
    return count, total


async def test_time_queued_for_admission_is_not_overhead() -> None:
    """One slot, a backend that takes ``stall``: the second request queues for
    the first's, then waits on the backend itself; neither wait is kvroute's."""
    stall = 1.0
    key = new_key()
    async with simulator(faults=Faults(stall=stall)) as (sim, _):
        config = router_config(
            [{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"], "max_concurrency": 1}],
            auth={"enabled": True},
            tenants={"t": {"keys": [hash_key(key)]}},
        )
        headers = {"authorization": f"Bearer {key}"}
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            first = asyncio.ensure_future(timed_post(c, chat(), headers=headers))

            async def holds_the_slot() -> bool:  # forwarded to the endpoint, which stalls
                text = (await c.get("/metrics")).text
                return 'kvroute_in_flight_requests{endpoint="e"} 1.0' in text

            await eventually(holds_the_slot, within=10)
            r, total = await timed_post(c, chat(), headers=headers)
            assert (await first)[0].status_code == 200 and r.status_code == 200
            count, queued = await admission_wait_sum(c)
            assert count == 1 and queued > 0  # only the second one queued
            assert 0 <= overhead_ms(r) <= total - (stall + queued) * 1000 + ROUNDING_MS


async def test_a_slow_upload_is_the_clients_time_not_overhead() -> None:
    pause = 0.1
    body = orjson.dumps(chat())
    halves = [body[: len(body) // 2], body[len(body) // 2 :]]

    async def slowly() -> AsyncIterator[bytes]:
        for part in halves:
            await asyncio.sleep(pause)
            yield part

    async with simulator() as (sim, _):
        config = router_config([{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"]}])
        async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            began = time.perf_counter()
            r = await c.post(
                "/v1/chat/completions",
                content=slowly(),
                headers={"content-type": "application/json"},
            )
            total = (time.perf_counter() - began) * 1000
            assert r.status_code == 200
            # The router saw the request's start, then waited for the second
            # half at least one pause: that wait is not kvroute's.
            assert 0 <= overhead_ms(r) <= total - pause * 1000 + ROUNDING_MS
