"""The fleet page (/admin/ui) and the JSON behind it (/admin/overview, /admin/models).

The page is tested in a real headless browser: Debian's Chromium (``./dev
test`` installs it) driven by Playwright's Python client, against a router
and simulated backends on loopback. The screenshot it takes is kept in the
test's tmp_path; with KVROUTE_SCREENSHOT_DIR set it is also written there
(how docs/fleet-page.png is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from backends.sim.engine import EngineParams
from router.config import Config
from tests.helpers import eventually, router, router_config, simulator

if TYPE_CHECKING:
    from playwright.async_api import Page

TOKEN = "fleet-page-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
#: Debian's Chromium (the package "chromium"); KVROUTE_CHROMIUM points elsewhere.
CHROMIUM = os.environ.get("KVROUTE_CHROMIUM", "/usr/bin/chromium")
#: Without the background-networking flags Chromium stalls on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Endpoint -> the model it serves.
FLEET = {
    "llama-0": "llama-3-8b",
    "llama-1": "llama-3-8b",
    "llama-2": "llama-3-8b",
    "qwen-0": "qwen-7b",
}
SYSTEM = "You are a careful assistant for the support team. " * 12


def fleet_config(sims: dict[str, str], admin: dict[str, Any] | None = None) -> Config:
    """Three replicas of a chat model on prefix affinity, one of another model."""
    endpoints = [
        {"id": name, "url": url, "kind": "vllm", "models": [FLEET[name]]}
        for name, url in sims.items()
    ]
    return router_config(
        endpoints,
        admin={"token": TOKEN} if admin is None else admin,
        models={
            "llama-3-8b": {"policy": "prefix_affinity", "aliases": ["llama"]},
            "qwen-7b": {"policy": "least_latency"},
        },
        health={"interval": 0.2, "rise": 1, "fall": 1},
        scrape={"interval": 0.2},
    )


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A router (admin token TOKEN) in front of four simulated vLLM servers."""
    params = EngineParams(num_blocks=512)
    async with contextlib.AsyncExitStack() as stack:
        sims = {}
        for name, model in FLEET.items():
            sims[name], _ = await stack.enter_async_context(simulator([model], params))
        url = await stack.enter_async_context(router(fleet_config(sims)))
        yield url, sims


async def traffic(url: str, n: int = 24) -> list[dict[str, Any]]:
    """Chats that share system prompts (so prefixes repeat), and a few for the other model."""

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        model = "qwen-7b" if i % 6 == 5 else "llama-3-8b"
        body = {
            "model": model,
            "max_tokens": 8,
            "messages": [
                {"role": "system", "content": f"{SYSTEM} Team {i % 3}."},
                {"role": "user", "content": f"question {i}"},
            ],
        }
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        answer: dict[str, Any] = r.json()
        return answer

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answers = []
        for start in range(0, n, 6):  # in waves, so later ones find cached prefixes
            answers += await asyncio.gather(*(one(client, i) for i in range(start, start + 6)))
        return answers


# -- the JSON ---------------------------------------------------------------------------------


async def test_models_report_the_counters_behind_metrics(
    fleet: tuple[str, dict[str, str]],
) -> None:
    url, _ = fleet
    answers = await traffic(url)
    llama = [a for a in answers if a["model"] == "llama-3-8b"]
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        models = {m["model"]: m for m in (await client.get("/admin/models")).json()["models"]}
        metrics = (await client.get("/metrics")).text
    m = models["llama-3-8b"]
    assert m["policy"] == "prefix_affinity" and m["aliases"] == ["llama"]
    assert sorted(m["endpoints"]) == ["llama-0", "llama-1", "llama-2"]
    # one decision per request, each under a reason the policy gave
    assert sum(m["decisions"].values()) == len(llama)
    for reason, n in m["decisions"].items():
        assert f'model="llama-3-8b",policy="prefix_affinity",reason="{reason}"}} {n}' in metrics
    assert m["requests"] == {"200": len(llama)}
    # tokens: what the backends said in usage, summed
    prompt = sum(a["usage"]["prompt_tokens"] for a in llama)
    cached = sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in llama)
    assert cached > 0  # the waves repeat three system prompts
    assert m["tokens"] == {
        "prompt": prompt,
        "cached": cached,
        "cached_share": round(cached / prompt, 4),
    }
    # the mean prefix match ratio is the histogram's sum / count
    total = float(re.search(r'prefix_match_ratio_sum\{model="llama-3-8b"\} (\S+)', metrics)[1])  # type: ignore[index]
    count = float(re.search(r'prefix_match_ratio_count\{model="llama-3-8b"\} (\S+)', metrics)[1])  # type: ignore[index]
    assert m["prefix_match"] == {"mean": round(total / count, 4), "decisions": count}
    assert set(m["index_sources"]) == {"llama-0", "llama-1", "llama-2"}
    assert set(m["index_sources"].values()) == {"approximate"}  # no KV events here
    q = models["qwen-7b"]
    assert q["policy"] == "least_latency" and q["index_sources"] is None
    assert sum(q["decisions"].values()) == len(answers) - len(llama)


async def test_overview_is_one_snapshot_of_what_admin_knows(
    fleet: tuple[str, dict[str, str]],
) -> None:
    url, _ = fleet
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        await client.post("/admin/endpoints/llama-1/drain")
        data = (await client.get("/admin/overview")).json()
    endpoints = {e["id"]: e for e in data["endpoints"]}
    assert set(endpoints) == {"llama-0", "llama-1", "llama-2", "qwen-0"}
    assert endpoints["llama-1"]["draining"] and not endpoints["llama-1"]["available"]
    assert endpoints["llama-0"]["index_sources"] == {"llama-3-8b": "approximate"}
    assert endpoints["qwen-0"]["index_sources"] == {} and endpoints["qwen-0"]["kv_events"] is None
    assert {m["model"] for m in data["models"]} == {"llama-3-8b", "qwen-7b"}
    assert data["reload"]["path"] is None and data["reload"]["last_error"] is None
    assert data["discovery"] == {}
    # The router process that answered (the app runs in this test's process).
    assert data["instance"] == f"{socket.gethostname()[:64]} (pid {os.getpid()})"
    assert TOKEN not in str(data)


async def test_without_the_token_nothing_is_served_but_the_empty_page(
    fleet: tuple[str, dict[str, str]],
) -> None:
    url, _ = fleet
    async with httpx.AsyncClient(base_url=url) as client:
        for path in ("/admin/overview", "/admin/models"):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"cookie": f"token={TOKEN}"}):
                r = await client.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        page = await client.get("/admin/ui")
        script = await client.get("/admin/ui/fleet.js")
        style = await client.get("/admin/ui/fleet.css")
    # The page is the same static bytes for anyone: it names no endpoint or model.
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    for r in (page, script, style):
        assert "llama-0" not in r.text and "qwen-7b" not in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # the only script is the file CSP allows


async def test_the_page_is_off_when_the_admin_api_is(fleet: tuple[str, dict[str, str]]) -> None:
    _, sims = fleet
    async with (
        router(fleet_config(sims, admin={})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for path in ("/admin/ui", "/admin/ui/fleet.js", "/admin/overview", "/admin/models"):
            r = await client.get(path, headers=AUTH)
            assert r.status_code == 403, path
            assert r.json()["error"]["code"] == "admin_disabled"


# -- the page, in a browser ------------------------------------------------------------------


def chromium() -> str:
    path = shutil.which(CHROMIUM) or CHROMIUM
    if not Path(path).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: `./dev test` installs Debian's chromium "
            "(apt-get install chromium), or set KVROUTE_CHROMIUM"
        )
    return path


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Page, list[str]]]:
    """A page of Debian's Chromium, and the errors its console and scripts report."""
    from playwright.async_api import async_playwright, expect

    # Bounds for a busy machine, not measurements: the page refreshes every 2 s.
    expect.set_options(timeout=30_000)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 760})
            page.set_default_timeout(30_000)
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            yield page, problems
        finally:
            await browser.close()


async def test_the_fleet_page_in_a_browser(
    fleet: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    from playwright.async_api import expect

    url, _ = fleet
    await traffic(url)
    async with browser_page() as (page, problems):
        # No token yet: the page asks for it and shows no data.
        await page.goto(url + "/admin/ui")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#banner")).to_contain_text("needs its token")
        assert await page.locator("tr[data-endpoint]").count() == 0
        assert "llama-0" not in await page.content()

        # A wrong token: refused, still nothing shown.
        await page.fill("#token", "not-the-token")
        await page.press("#token", "Enter")
        await expect(page.locator("#banner")).to_contain_text("refused")
        assert await page.locator("tr[data-endpoint]").count() == 0

        # The token: the fleet appears.
        await page.fill("#token", TOKEN)
        await page.click("#login button[type=submit]")
        rows = page.locator("#endpoints tbody tr")
        await expect(rows).to_have_count(4)
        await expect(page.locator("#banner")).to_be_hidden()
        row = page.locator('tr[data-endpoint="llama-2"]')
        await expect(row.locator("td.status")).to_have_text("up")
        card = page.locator('.card[data-model="llama-3-8b"]')
        await expect(card).to_contain_text("prefix_affinity")
        await expect(card.locator("dd.cached")).to_contain_text("prompt tokens")
        await expect(page.locator("#updated")).to_contain_text("updated")
        # the token never went into the URL
        assert TOKEN not in page.url
        # The two 401s above are logged by the browser; nothing else may be.
        assert all("401" in p for p in problems), problems
        problems.clear()

        # Drain: the row says so, and so does the admin API.
        await row.locator("button[data-action=drain]").click()
        await expect(row.locator("td.status")).to_have_text("draining")
        assert (await admin_endpoints_auth(url))["llama-2"]["draining"] is True
        await expect(row.locator("button")).to_have_text("Undrain")

        # The screenshot, of a fleet at work: streams in flight, load scraped.
        stop = asyncio.Event()
        load = asyncio.create_task(streams(url, stop))
        try:
            await wait_for_load(url)
            await expect(page.locator("tr[data-endpoint] meter")).to_have_count(4)
            await expect(page.locator("#summary")).not_to_contain_text("in flight 0")
            shot = tmp_path / "fleet-page.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            stop.set()
            await load
        print(f"fleet page screenshot: {shot}")
        if out := os.environ.get("KVROUTE_SCREENSHOT_DIR"):
            await asyncio.to_thread(keep, shot, Path(out))

        # Undrain restores it.
        await row.locator("button[data-action=undrain]").click()
        await expect(row.locator("td.status")).to_have_text("up")
        assert (await admin_endpoints_auth(url))["llama-2"]["draining"] is False

        # Reloading the page keeps the token (the tab's sessionStorage).
        await page.reload()
        await expect(rows).to_have_count(4)
        await expect(page.locator("#login")).to_be_hidden()
        assert problems == []  # no script error, no CSP violation
    assert shot.stat().st_size > 0


async def test_an_open_admin_page_drains_from_its_own_origin() -> None:
    """admin.open (a demo): no token asked, and the page's own POSTs pass the
    cross-site check that refuses other sites' pages. Names are shown as text."""
    from playwright.async_api import expect

    # A model name is whatever a config file or Consul says: the page shows it as text.
    model = '<img src=x onerror="document.body.dataset.pwned=1">'
    async with simulator([model]) as (sim, _):
        endpoints = [{"id": "only", "url": sim, "kind": "vllm", "models": [model]}]
        async with router(router_config(endpoints, admin={"open": True})) as url:
            async with browser_page() as (page, problems):
                await page.goto(url + "/admin/ui")
                row = page.locator('tr[data-endpoint="only"]')
                await expect(row.locator("td.status")).to_have_text("up")
                await expect(page.locator("#login")).to_be_hidden()
                await expect(page.locator(".card h3")).to_have_text(model)
                assert await page.locator("main img").count() == 0
                assert await page.evaluate("document.body.dataset.pwned") is None
                await row.locator("button[data-action=drain]").click()
                await expect(row.locator("td.status")).to_have_text("draining")
                async with httpx.AsyncClient() as client:
                    state = (await client.get(url + "/admin/endpoints")).json()
                assert state["endpoints"][0]["draining"] is True
                assert problems == []


def keep(shot: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, directory / shot.name)


async def admin_endpoints_auth(url: str) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(headers=AUTH) as client:
        data = (await client.get(url + "/admin/endpoints")).json()
    return {e["id"]: e for e in data["endpoints"]}


async def streams(url: str, stop: asyncio.Event, concurrency: int = 6) -> None:
    """Long streams to the chat model, ``concurrency`` at a time, until ``stop``."""

    async def loop(client: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            body = {
                "model": "llama-3-8b" if i % 3 else "qwen-7b",
                "max_tokens": 200,
                "stream": True,
                "messages": [
                    {"role": "system", "content": f"{SYSTEM} Team {i % 3}."},
                    {"role": "user", "content": f"a long answer, please ({i})"},
                ],
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for _ in r.aiter_bytes():
                    pass

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(loop(client, i) for i in range(concurrency)))


async def wait_for_load(url: str) -> None:
    """Until every endpoint's load has been scraped and streams are in flight."""

    async def busy() -> bool:
        eps = (await admin_endpoints_auth(url)).values()
        scraped = all(e["load"]["kv_usage"] is not None for e in eps)
        return scraped and sum(e["in_flight"] for e in eps) > 0

    await eventually(busy)
