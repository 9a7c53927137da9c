"""Who may use /admin: closed by default, a bearer token, or open for a demo
(and then never from another site's page)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from router.app import build_app
from router.config import parse_config
from tests.helpers import router, router_config, serve_app, simulator


async def admin_calls(url: str, **headers: str) -> list[int]:
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        return [
            (await client.get("/admin/endpoints")).status_code,
            (await client.get("/admin/config")).status_code,
            (await client.post("/admin/endpoints/e/drain")).status_code,
            (await client.post("/admin/reload")).status_code,
        ]


def config(url: str, **admin: Any) -> Any:
    endpoints = [{"id": "e", "url": url, "kind": "vllm", "models": ["m"]}]
    return router_config(endpoints, admin=admin)


async def test_no_token_means_no_admin_api() -> None:
    async with simulator(["m"]) as (sim, _), router(config(sim)) as url:
        assert await admin_calls(url) == [403, 403, 403, 403]
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/admin/endpoints")
            drained = (await client.post(url + "/admin/endpoints/e/drain")).json()
            # and the model is still served: nothing was drained
            ok = await client.post(
                url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}
            )
    assert r.json()["error"]["code"] == "admin_disabled"
    assert r.json()["error"]["type"] == "permission_error"
    assert drained["error"]["code"] == "admin_disabled" and ok.status_code == 200


async def test_a_token_is_required_when_set() -> None:
    async with simulator(["m"]) as (sim, _), router(config(sim, token="s3cret")) as url:
        assert await admin_calls(url) == [401, 401, 401, 401]
        assert await admin_calls(url, authorization="Bearer wrong") == [401, 401, 401, 401]
        calls = await admin_calls(url, authorization="Bearer s3cret")
        # reload: 200 or 422 is the reloader's answer (no file here), not a refusal
        assert calls[:3] == [200, 200, 200] and calls[3] not in (401, 403)
        async with httpx.AsyncClient() as client:
            shown = await client.get(
                url + "/admin/config", headers={"authorization": "Bearer s3cret"}
            )
    assert "s3cret" not in shown.text and shown.json()["config"]["admin"]["token"] == "**********"


async def test_open_admin_refuses_state_changes_from_other_sites() -> None:
    async with simulator(["m"]) as (sim, _), router(config(sim, open=True)) as url:
        assert (await admin_calls(url))[:3] == [200, 200, 200]
        forged = await admin_calls(url, origin="https://evil.example")
        assert forged[:2] == [200, 200]  # reading is harmless
        assert forged[2:] == [403, 403]  # a form on another site cannot drain or reload
        fetched = await admin_calls(url, **{"sec-fetch-site": "cross-site"})
        assert fetched[2:] == [403, 403]


async def test_open_admin_answers_only_a_loopback_host() -> None:
    """DNS rebinding: a page at attacker.example whose name now points at this
    machine is same-origin with it; its requests say ``Host: attacker.example``."""
    async with simulator(["m"]) as (sim, _), router(config(sim, open=True)) as url:
        rebound = {"host": "attacker.example:8080", "origin": "http://attacker.example:8080"}
        assert await admin_calls(url, **rebound) == [403, 403, 403, 403]
        async with httpx.AsyncClient(base_url=url) as client:
            page = await client.get("/admin/overview", headers={"host": "attacker.example"})
            assert page.status_code == 403 and page.json()["error"]["code"] == "admin_host"
            for host in ("localhost:8080", "127.0.0.1", "[::1]:8080"):
                r = await client.get("/admin/endpoints", headers={"host": host})
                assert r.status_code == 200, host
        # A token is what a router on a reachable address uses: any Host then.
    async with simulator(["m"]) as (sim, _), router(config(sim, token="t")) as url:
        auth = {"host": "kvroute.internal", "authorization": "Bearer t"}
        assert (await admin_calls(url, **auth))[:2] == [200, 200]


def test_the_older_admin_token_spelling_still_works() -> None:
    assert parse_config("admin_token: t", {}).admin.token is not None
    with pytest.raises(Exception, match="both set"):
        parse_config("admin_token: t\nadmin: {token: u}", {})


async def test_control_routes_answer_in_openai_shape_with_allow_on_405() -> None:
    async with simulator(["m"]) as (sim, _), router(config(sim, open=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            wrong = await client.get("/v1/chat/completions")
            assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
            assert wrong.json()["error"]["code"] == "method_not_allowed"
            drain = await client.get("/admin/endpoints/e/drain")
            assert drain.status_code == 405 and drain.headers["allow"] == "POST"
            assert drain.json()["error"]["type"] == "invalid_request_error"
            missing = await client.get("/admin/nothing-here")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
            metrics = await client.post("/metrics")
            assert metrics.status_code == 405 and "GET" in metrics.headers["allow"]


async def test_a_control_route_that_fails_answers_500_in_openai_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = build_app(router_config([]))

    def broken() -> list[str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.routes, "public_models", broken)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/v1/models")
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "internal_error"
        assert (await client.get("/health")).status_code == 200
