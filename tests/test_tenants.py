"""API keys and tenants: 401 without a valid key, 403 for a model the tenant
may not use, /v1/models by tenant, rotation, and keys kept out of every output."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.config import ConfigError, parse_config
from router.tenants import Tenants, hash_key, new_key, presented_key
from tests.helpers import KVROUTE, eventually, router, router_config, simulator

KEY_A1, KEY_A2, KEY_B = new_key(), new_key(), new_key()


def tenants_config(url: str, endpoints: list[dict[str, Any]] | None = None, **extra: Any) -> Any:
    endpoints = endpoints or [
        {"id": "e", "url": url, "kind": "vllm", "models": ["small", "big", "other"]}
    ]
    return router_config(
        endpoints,
        models={
            "small": {"aliases": ["tiny-chat"]},
            "big": {"fallbacks": ["other", "small"]},
            "other": {},
        },
        auth={"enabled": True},
        tenants={
            "acme": {"keys": [hash_key(KEY_A1), hash_key(KEY_A2)], "models": ["tiny-*", "big"]},
            "beta": {"keys": [hash_key(KEY_B)], "models": ["*"], "priority": "batch"},
        },
        **extra,
    )


def body(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": "hello", "max_tokens": 2}


async def test_keys_name_tenants_and_missing_or_wrong_keys_get_401() -> None:
    async with simulator(["small", "big", "other"]) as (sim, _), router(tenants_config(sim)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            missing = await client.post("/v1/completions", json=body("small"))
            wrong = await client.post(
                "/v1/completions", json=body("small"), headers={"authorization": "Bearer nope"}
            )
            long_key = "k" * 5000
            too_long = await client.post(
                "/v1/completions",
                json=body("small"),
                headers={"authorization": f"Bearer {long_key}"},
            )
            bearer = await client.post(
                "/v1/completions", json=body("small"), headers={"authorization": f"Bearer {KEY_A1}"}
            )
            rotated = await client.post(
                "/v1/completions", json=body("small"), headers={"authorization": f"Bearer {KEY_A2}"}
            )
            azure = await client.post(
                "/v1/completions", json=body("small"), headers={"api-key": KEY_B}
            )
            # An unauthenticated client gets 401 before its body is even parsed.
            garbage = await client.post("/v1/completions", content=b"{not json")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert missing.json()["error"]["type"] == "authentication_error"
    for refused in (wrong, too_long):
        assert refused.status_code == 401
        assert refused.json()["error"] == {
            "message": "Incorrect API key provided.",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    assert garbage.status_code == 401
    assert [bearer.status_code, rotated.status_code, azure.status_code] == [200, 200, 200]


async def test_models_a_tenant_may_not_use_get_403_and_are_not_listed() -> None:
    async with simulator(["small", "big", "other"]) as (sim, _), router(tenants_config(sim)) as url:
        acme = {"authorization": f"Bearer {KEY_A1}"}
        async with httpx.AsyncClient(base_url=url) as client:
            by_alias = await client.post("/v1/completions", json=body("tiny-chat"), headers=acme)
            # the pattern names the alias; the model behind it is granted too
            by_name = await client.post("/v1/completions", json=body("small"), headers=acme)
            other = await client.post("/v1/completions", json=body("other"), headers=acme)
            unknown = await client.post("/v1/completions", json=body("nope"), headers=acme)
            listed_acme = await client.get("/v1/models", headers=acme)
            listed_beta = await client.get(
                "/v1/models", headers={"authorization": f"Bearer {KEY_B}"}
            )
            listed_nobody = await client.get("/v1/models")
    assert [by_alias.status_code, by_name.status_code] == [200, 200]
    assert other.status_code == 403
    assert other.json()["error"] == {
        "message": "Tenant 'acme' may not use the model `other`.",
        "type": "permission_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    assert unknown.status_code == 404
    assert {m["id"] for m in listed_acme.json()["data"]} == {"small", "tiny-chat", "big"}
    assert {m["id"] for m in listed_beta.json()["data"]} == {"small", "tiny-chat", "big", "other"}
    assert listed_nobody.status_code == 401


async def test_fallbacks_skip_models_the_tenant_may_not_use() -> None:
    async with simulator(["small", "other"]) as (sim, _):
        async with simulator(["big"]) as (dead, _):
            pass  # "big"'s only endpoint is gone: requests for it fall back
        endpoints = [
            {"id": "e", "url": sim, "kind": "vllm", "models": ["small", "other"]},
            {"id": "d", "url": dead, "kind": "vllm", "models": ["big"]},
        ]
        async with router(tenants_config(sim, endpoints)) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                acme = await client.post(
                    "/v1/completions",
                    json=body("big"),
                    headers={"authorization": f"Bearer {KEY_A1}"},
                )
                beta = await client.post(
                    "/v1/completions",
                    json=body("big"),
                    headers={"authorization": f"Bearer {KEY_B}"},
                )
    # big falls back to other, then small; acme may not use other
    assert acme.status_code == 200 and acme.json()["model"] == "small"
    assert beta.status_code == 200 and beta.json()["model"] == "other"


async def test_auth_off_is_one_anonymous_tenant_with_its_own_limits() -> None:
    async with simulator(["small"]) as (sim, _):
        endpoints = [{"id": "e", "url": sim, "kind": "vllm", "models": ["small"]}]
        cfg = router_config(endpoints, auth={"anonymous": {"models": ["nothing-*"]}})
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            refused = await client.post("/v1/completions", json=body("small"))
            listed = await client.get("/v1/models")
            admin = await client.get("/admin/tenants")
    assert refused.status_code == 403
    assert "anonymous" in refused.json()["error"]["message"]
    assert listed.json()["data"] == []
    assert [t["name"] for t in admin.json()["tenants"]] == ["anonymous"]
    assert admin.json()["auth"] is False


async def test_keys_reach_no_log_metric_or_admin_answer(caplog: pytest.LogCaptureFixture) -> None:
    async with simulator(["small", "big", "other"]) as (sim, _):
        cfg = tenants_config(sim, server={"access_log": True})
        async with router(cfg) as url, httpx.AsyncClient(base_url=url) as client:
            with caplog.at_level(logging.INFO, logger="kvroute.access"):
                await client.post(
                    "/v1/completions",
                    json=body("small"),
                    headers={"authorization": f"Bearer {KEY_A1}"},
                )
                await client.post(
                    "/v1/completions",
                    json=body("small"),
                    headers={"authorization": f"Bearer {KEY_B}x"},
                )
            metrics = (await client.get("/metrics")).text
            shown = (await client.get("/admin/config")).text + (
                await client.get("/admin/tenants")
            ).text
    logged = "\n".join(str(r.msg) for r in caplog.records)
    assert "'tenant': 'acme'" in logged
    assert 'kvroute_tenant_requests_total{status="200",tenant="acme"} 1.0' in metrics
    for secret in (KEY_A1, KEY_B, hash_key(KEY_A1)[7:], hash_key(KEY_B)[7:]):
        assert secret not in logged and secret not in metrics and secret not in shown


async def test_rotation_by_reload_retires_a_key(tmp_path: Path) -> None:
    async with simulator(["small"]) as (sim, _):
        keys_file = tmp_path / "tenants.yaml"

        def write(keys: list[str]) -> None:
            tenants = {"tenants": {"acme": {"keys": [hash_key(k) for k in keys]}}}
            keys_file.write_text(yaml.safe_dump(tenants))

        write([KEY_A1, KEY_A2])
        cfg_file = tmp_path / "kvroute.yaml"
        cfg_file.write_text(
            yaml.safe_dump(
                {
                    "endpoints": [{"id": "e", "url": sim, "kind": "vllm", "models": ["small"]}],
                    "auth": {"enabled": True, "tenants_file": "tenants.yaml"},
                    "admin": {"open": True},
                    "server": {"access_log": False},
                }
            )
        )
        from router.app import build_app
        from router.config import load_config
        from tests.helpers import serve_app

        app = build_app(load_config(cfg_file), str(cfg_file))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:

            async def status(key: str) -> int:
                r = await client.post(
                    "/v1/completions",
                    json=body("small"),
                    headers={"authorization": f"Bearer {key}"},
                )
                return r.status_code

            assert [await status(KEY_A1), await status(KEY_A2)] == [200, 200]
            write([KEY_A2])  # the watch reloads the tenants file by itself

            async def retired() -> bool:
                return await status(KEY_A1) == 401

            await eventually(retired)
            assert await status(KEY_A2) == 200


def test_tenant_config_errors_name_their_place() -> None:
    cases = {
        "tenants: {acme: {keys: [sk-live-123]}}": "is not a key hash",
        "tenants: {acme: {priority: urgent}}": "not one of admission.priorities",
        "tenants: {'a b': {}}": "tenant name 'a b'",
        "tenants: {acme: {model_limits: {ghost: {rpm: 1}}}}": "'ghost', which is not in models",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        assert expected in str(info.value)
        assert "sk-live-123" not in str(info.value)
    h = hash_key("k")
    with pytest.raises(ConfigError, match="share a key"):
        parse_config(f"tenants: {{a: {{keys: ['{h}']}}, b: {{keys: ['{h}']}}}}")


def test_presented_key_reads_bearer_and_api_key_headers() -> None:
    assert presented_key([(b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert presented_key([(b"api-key", b"xyz")]) == b"xyz"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([]) is None
    tenants = Tenants(
        parse_config(f"auth: {{enabled: true}}\ntenants: {{t: {{keys: ['{hash_key('abc')}']}}}}")
    )
    assert tenants.authenticate([(b"authorization", b"Bearer abc")]).name == "t"


def test_keys_command_mints_and_hashes() -> None:
    minted = subprocess.run(
        [str(KVROUTE), "keys", "new", "--tenant", "acme"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = minted.split("): ", 1)[1].split()[0]
    assert key.startswith("kvr-") and len(key) == 47
    assert hash_key(key) in minted
    hashed = subprocess.run(
        [str(KVROUTE), "keys", "hash"], input=key + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    assert hashed == hash_key(key)
