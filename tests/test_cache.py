"""The response cache end to end, in memory and on a real Redis: which
requests it serves, stream replay the openai SDK reads, stream <-> whole
cross-serving, single flight, TTL, tenants, Redis dying, and never a broken
answer stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from backends.sim.common import Faults
from backends.sim.engine import EngineParams
from router.cache.key import directives
from router.tenants import hash_key, new_key
from tests.helpers import router, router_config, set_faults, sim_stats, simulator
from tests.redis_server import RedisServer

KEY_A, KEY_B = new_key(), new_key()


def cache_config(sim: str, redis: str | None = None, **extra: Any) -> Any:
    model_cache = {"enabled": True, "ttl": 60, **extra.pop("model_cache", {})}
    return router_config(
        [{"id": "e", "url": sim, "kind": "vllm", "models": ["m", "plain"]}],
        models={"m": {"cache": model_cache}, "plain": {}},
        # A generous bound per store call: on a busy 2-core machine the default
        # 0.25 s turned a first lookup into a bypass (the guard's verdict).
        cache={"redis": redis, "timeout": 2.0} if redis else {},
        **extra,
    )


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisServer | None]:
    if request.param == "memory":
        yield None
        return
    async with RedisServer() as server:
        yield server


async def upstream_requests(sim: str) -> int:
    return int((await sim_stats(sim))["requests"])


async def test_hit_miss_and_bypass_follow_the_rules(store: RedisServer | None) -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        cfg = cache_config(sim, store.url if store else None)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:

            async def ask(body: dict[str, Any], **headers: str) -> httpx.Response:
                return await client.post("/v1/chat/completions", json=body, headers=headers)

            first, second = await ask(chat()), await ask(chat())
            # the same request spelt otherwise: key order, defaults, max_completion_tokens
            respelt = await ask(
                {
                    "max_completion_tokens": 8,
                    "temperature": 0.0,
                    "n": 1,
                    "top_p": 1,
                    "messages": [{"role": "user", "content": "hello"}],
                    "model": "m",
                    "user": "someone",
                }
            )
            random_1 = await ask(chat(temperature=0.7))
            random_2 = await ask(chat(temperature=0.7))
            seeded_1, seeded_2 = (
                await ask(chat(temperature=0.7, seed=3)),
                await ask(chat(temperature=0.7, seed=3)),
            )
            opted_1 = await ask(chat("opt in", temperature=0.9), **{"x-kvroute-cache": "use"})
            opted_2 = await ask(chat("opt in", temperature=0.9), **{"x-kvroute-cache": "use"})
            no_cache = await ask(chat(), **{"cache-control": "no-cache"})
            no_store = await ask(chat("never kept"), **{"x-kvroute-cache": "no-store"})
            not_kept = await ask(chat("never kept"))
            too_old = await ask(chat(), **{"cache-control": "max-age=0"})
            other_model = await client.post(
                "/v1/chat/completions", json={**chat(), "model": "plain"}
            )
            metrics = (await client.get("/metrics")).text
        served = await upstream_requests(sim)

    def says(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return r.headers["x-kvroute-cache"]

    assert [says(first), says(second), says(respelt)] == ["miss", "hit", "hit"]

    def said(r: httpx.Response) -> list[tuple[str, str]]:
        return [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]

    assert said(second) == said(first)
    assert second.json()["usage"] == first.json()["usage"]  # what the model produced
    assert second.json()["id"] != first.json()["id"]
    assert int(second.headers["age"]) >= 0
    assert [says(random_1), says(random_2)] == ["bypass", "bypass"]
    assert [says(seeded_1), says(seeded_2)] == ["miss", "hit"]
    assert [says(opted_1), says(opted_2)] == ["miss", "hit"]
    assert says(no_cache) == "miss" and says(too_old) == "miss"
    assert [says(no_store), says(not_kept)] == ["bypass", "miss"]
    assert says(other_model) == "bypass"
    # upstream: first, the two random ones, seeded_1, opted_1, no_cache, no_store,
    # not_kept, too_old, the other model
    assert served == 10
    assert 'kvroute_cache_requests_total{model="m",result="hit"} 4.0' in metrics
    completion = first.json()["usage"]["completion_tokens"]
    assert (
        f'kvroute_cache_tokens_total{{kind="completion",model="m"}} {4.0 * completion}' in metrics
    )


async def test_streams_are_replayed_for_the_openai_sdk_and_cross_served(
    store: RedisServer | None,
) -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        cfg = cache_config(sim, store.url if store else None)
        async with router(cfg) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

            async def streamed(content: str, usage: bool = False) -> tuple[str, list[Any]]:
                options = {"include_usage": True} if usage else openai.NOT_GIVEN
                chunks = [
                    c
                    async for c in await client.chat.completions.create(
                        model="m",
                        messages=[{"role": "user", "content": content}],
                        max_tokens=8,
                        temperature=0,
                        stream=True,
                        stream_options=options,
                    )
                ]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                return text, chunks

            async def whole(content: str) -> Any:
                return await client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": content}],
                    max_tokens=8,
                    temperature=0,
                )

            # stream first, then the same stream, a stream with usage, and whole
            live_text, live = await streamed("one")
            replay_text, replay = await streamed("one")
            usage_text, with_usage = await streamed("one", usage=True)
            whole_one = await whole("one")
            # whole first, then a stream of it
            whole_two = await whole("two")
            stream_two_text, stream_two = await streamed("two")
            await client.close()
        served = await upstream_requests(sim)
    assert live_text and replay_text == live_text == usage_text
    assert whole_one.choices[0].message.content == live_text
    assert whole_one.choices[0].finish_reason == live[-1].choices[0].finish_reason
    assert replay[0].id != live[0].id and len({c.id for c in replay}) == 1
    assert all(c.usage is None for c in replay)
    assert with_usage[-1].usage is not None and with_usage[-1].choices == []
    assert with_usage[-1].usage.completion_tokens == whole_one.usage.completion_tokens
    assert stream_two_text == whole_two.choices[0].message.content
    assert stream_two[-1].choices[0].finish_reason == whole_two.choices[0].finish_reason
    assert served == 2


async def test_identical_misses_collapse_into_one_upstream_call(store: RedisServer | None) -> None:
    slow = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)
    async with simulator(["m", "plain"], slow) as (sim, _):
        cfg = cache_config(sim, store.url if store else None)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=chat("together")) for _ in range(50))
            )
        served = await upstream_requests(sim)
    assert served == 1
    assert all(a.status_code == 200 for a in answers)
    results = sorted(a.headers["x-kvroute-cache"] for a in answers)
    assert results == ["hit"] * 49 + ["miss"]
    contents = {a.json()["choices"][0]["message"]["content"] for a in answers}
    assert len(contents) == 1


async def test_entries_expire_after_their_ttl(store: RedisServer | None) -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        cfg = cache_config(sim, store.url if store else None, model_cache={"ttl": 1.0})
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            results = []
            for pause in (0.0, 0.0, 1.3):
                await asyncio.sleep(pause)
                r = await client.post("/v1/chat/completions", json=chat())
                results.append(r.headers["x-kvroute-cache"])
    assert results == ["miss", "hit", "miss"]


async def test_tenants_do_not_share_entries_unless_configured(store: RedisServer | None) -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        for shared, expected in ((False, ["miss", "miss", "hit"]), (True, ["miss", "hit", "hit"])):
            cfg = cache_config(
                sim,
                store.url if store else None,
                model_cache={"shared": shared},
                auth={"enabled": True},
                tenants={"a": {"keys": [hash_key(KEY_A)]}, "b": {"keys": [hash_key(KEY_B)]}},
            )
            async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
                results = []
                for key in (KEY_A, KEY_B, KEY_B):
                    r = await client.post(
                        "/v1/chat/completions",
                        json=chat(f"shared={shared}"),
                        headers={"authorization": f"Bearer {key}"},
                    )
                    results.append(r.headers["x-kvroute-cache"])
            assert results == expected


async def test_hits_count_against_the_request_rate_but_cost_no_tokens() -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        cfg = cache_config(
            sim,
            auth={"enabled": True},
            tenants={"a": {"keys": [hash_key(KEY_A)], "rpm": 2, "daily_tokens": 10_000}},
        )
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            auth = {"authorization": f"Bearer {KEY_A}"}
            miss = await client.post("/v1/chat/completions", json=chat(), headers=auth)
            hit = await client.post("/v1/chat/completions", json=chat(), headers=auth)
            limited = await client.post("/v1/chat/completions", json=chat(), headers=auth)
            await asyncio.sleep(0.2)  # settlements are in the background
            tenants = (await client.get("/admin/tenants")).json()["tenants"]
    assert [miss.status_code, hit.status_code, limited.status_code] == [200, 200, 429]
    assert hit.headers["x-kvroute-cache"] == "hit"
    assert hit.headers["x-ratelimit-remaining-requests"] == "0"
    usage = next(t for t in tenants if t["name"] == "a")["usage"]
    assert usage["tokens_today"] == miss.json()["usage"]["total_tokens"]


async def test_nothing_is_stored_from_a_stream_that_died_midway() -> None:
    async with simulator(["m", "plain"], faults=Faults(die_after_chunks=3)) as (sim, _):
        cfg = cache_config(sim)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            broken = await client.post("/v1/chat/completions", json=chat(stream=True))
            await set_faults(sim, die_after_chunks=-1)
            again = await client.post("/v1/chat/completions", json=chat(stream=True))
            third = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert '"error"' in broken.text  # the client saw the stream break
    assert again.headers["x-kvroute-cache"] == "miss"  # nothing was kept from it
    assert third.headers["x-kvroute-cache"] == "hit"
    assert third.text.rstrip().endswith("data: [DONE]")


async def test_redis_down_bypasses_the_cache_and_never_fails_a_request() -> None:
    async with RedisServer() as redis, simulator(["m", "plain"]) as (sim, _):
        cfg = cache_config(sim, redis.url)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            ok = [await client.post("/v1/chat/completions", json=chat()) for _ in range(2)]
            await redis.stop()
            down = [await client.post("/v1/chat/completions", json=chat()) for _ in range(4)]
            stats = (await client.get("/admin/cache")).json()
            await redis.start()
            await asyncio.sleep(1.2)  # past cache.retry_interval
            back = [await client.post("/v1/chat/completions", json=chat()) for _ in range(2)]
    assert [r.headers["x-kvroute-cache"] for r in ok] == ["miss", "hit"]
    assert all(r.status_code == 200 for r in down)
    assert {r.headers["x-kvroute-cache"] for r in down} == {"bypass"}
    assert stats["store"]["up"] is False
    # Redis came back empty (no persistence): a miss, then hits again
    assert [r.headers["x-kvroute-cache"] for r in back] == ["miss", "hit"]


async def test_admin_purges_a_models_entries() -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        async with router(cache_config(sim)) as url, httpx.AsyncClient(base_url=url) as client:
            await client.post("/v1/chat/completions", json=chat())
            before = (await client.get("/admin/cache")).json()
            purged = (await client.post("/admin/cache/purge", params={"model": "m"})).json()
            after = await client.post("/v1/chat/completions", json=chat())
    assert before["store"]["entries"] == 1 and before["models"]["m"]["enabled"] is True
    assert purged == {"model": "m", "purged": 1}
    assert after.headers["x-kvroute-cache"] == "miss"


async def test_redis_passwords_reach_no_answer_or_log(caplog: pytest.LogCaptureFixture) -> None:
    async with simulator(["m", "plain"]) as (sim, _):
        url_with_secret = "redis://:s3cret-pw@127.0.0.1:1/0"  # nothing listens there
        cfg = cache_config(sim, url_with_secret, quotas={"redis": url_with_secret})
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            answer = await client.post("/v1/chat/completions", json=chat())
            shown = "".join(
                [
                    (await client.get("/admin/config")).text,
                    (await client.get("/admin/cache")).text,
                    (await client.get("/admin/tenants")).text,
                    (await client.get("/metrics")).text,
                ]
            )
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert answer.status_code == 200 and answer.headers["x-kvroute-cache"] == "bypass"
    assert "s3cret-pw" not in shown and "s3cret-pw" not in logged
    assert "redis://***@127.0.0.1:1/0" in shown


async def test_two_routers_sharing_redis_make_one_upstream_call() -> None:
    slow = EngineParams(step_base=0.02, prefill_per_token=0.0, decode_per_seq=0.0)
    async with RedisServer() as redis, simulator(["m", "plain"], slow) as (sim, _):
        cfg = cache_config(sim, redis.url)
        async with router(cfg) as a, router(cfg) as b:
            async with httpx.AsyncClient(timeout=30) as client:
                answers = await asyncio.gather(
                    *(
                        client.post(url + "/v1/chat/completions", json=chat("across"))
                        for url in [a, b] * 10
                    )
                )
        served = await upstream_requests(sim)
    assert served == 1  # one replica asked; the other waited on its lock
    assert sorted(r.headers["x-kvroute-cache"] for r in answers) == ["hit"] * 19 + ["miss"]
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1


async def test_a_leader_looks_again_once_it_holds_the_key(
    store: RedisServer | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that missed, then found no one fetching the key (the leader
    before it stored the answer and let go between this request's lookup and
    its lock, on a loaded machine), looks again under the lock: the stored
    answer, not a second upstream call."""
    from router.cache.store import MemoryCache, RedisCache

    async with simulator(["m", "plain"]) as (sim, _):
        cfg = cache_config(sim, store.url if store else None)
        async with router(cfg) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = await client.post("/v1/chat/completions", json=chat("stored"))
            assert first.headers["x-kvroute-cache"] == "miss"
            stale_once = [True]
            for cls in (MemoryCache, RedisCache):
                real = cls.get

                async def get(self: Any, model: str, digest: str, real: Any = real) -> Any:
                    if stale_once[0]:
                        stale_once[0] = False
                        return None  # what a lookup just before the store saw
                    return await real(self, model, digest)

                monkeypatch.setattr(cls, "get", get)
            second = await client.post("/v1/chat/completions", json=chat("stored"))
        served = await upstream_requests(sim)
    assert not stale_once[0]
    assert second.headers["x-kvroute-cache"] == "hit"
    assert served == 1
    content = [r.json()["choices"][0]["message"]["content"] for r in (first, second)]
    assert content[0] == content[1]


def test_max_age_takes_ascii_digits_only() -> None:
    # "²".isdigit() is True and float("²") raises: a 500 and a traceback per request before.
    for value in ("max-age=²", "max-age=1²", "max-age=٣", "max-age=-1", "max-age="):
        assert directives({"cache-control": value}).max_age is None
    assert directives({"cache-control": "no-store, max-age=30"}).max_age == 30
    assert directives({"x-kvroute-cache": "max-age=0"}).no_cache


def test_the_key_holds_the_length_the_engine_reads() -> None:
    from backends.base import Operation
    from router.cache.key import digest

    def key(op: Operation, **body: Any) -> str:
        return digest(op, "m", "*", {"prompt": "p", "temperature": 0, **body})

    chat, completion = Operation.CHAT, Operation.COMPLETION
    # A chat: max_completion_tokens first, however the body spells it.
    assert key(chat, max_completion_tokens=50) == key(chat, max_tokens=50)
    assert key(chat, max_tokens=9, max_completion_tokens=50) == key(chat, max_tokens=50)
    assert key(chat, max_tokens=50, max_completion_tokens=None) == key(chat, max_tokens=50)
    # A completion: the engine ignores max_completion_tokens (its own default applies).
    assert key(completion, max_completion_tokens=50) == key(completion)
    assert key(completion, max_completion_tokens=50) != key(completion, max_tokens=50)
