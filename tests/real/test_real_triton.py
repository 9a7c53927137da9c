"""Real Triton 2.51 behind kvroute: the official openai SDK through a kind: triton endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import router, router_config
from tests.real.engines import Triton, triton_server

# Setting up a real engine (installing it on a fresh machine, then starting it on
# 2 busy cores) can take longer than pytest's default bound of 300 s per test.
pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    with triton_server(Path(tmp_path_factory.mktemp("triton"))) as server:
        yield server


def config(t: Triton) -> object:
    return router_config(
        [
            {
                "id": "triton-0",
                "url": t.url,
                "kind": "triton",
                "metrics_url": t.metrics_url,
                "models": [{"name": "tiny", "served_name": "ensemble"}],
            }
        ],
        health={"interval": 0.2, "jitter": 0},
        scrape={"interval": 0.2},
    )


async def test_openai_sdk_through_real_triton(triton: Triton) -> None:
    async with router(config(triton)) as url:  # type: ignore[arg-type]
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        text = chat.choices[0].message.content or ""
        assert len(text.split()) == 4 and all(w.startswith("w") for w in text.split())

        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        assert "".join(pieces) == text
        assert finish == "length" and usage is not None and usage.completion_tokens == 4

        comp = await client.completions.create(model="tiny", prompt="abc", max_tokens=2)
        assert len(comp.choices[0].text.split()) == 2
        await client.close()


async def test_real_triton_errors_health_and_metrics(triton: Triton) -> None:
    async with router(config(triton)) as url, httpx.AsyncClient(base_url=url) as c:
        # kvroute refuses what it can check itself, before Triton sees it ...
        ours = await c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": -1,
            },
        )
        assert ours.status_code == 400 and ours.json()["error"]["param"] == "max_tokens"
        # ... and passes on the model's own refusal (a 400 whose body is one SSE event).
        bad = await c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "x [refuse]"}],
                "max_tokens": 3,
                "stream": True,
            },
        )
        assert bad.status_code == 400
        assert "the model refuses this prompt" in bad.json()["error"]["message"]
        endpoints = (await c.get("/admin/endpoints")).json()["endpoints"]
        assert endpoints[0]["healthy"] is True
        load = (await c.get(triton.metrics_url)).text
    assert "nv_inference_pending_request_count" in load
