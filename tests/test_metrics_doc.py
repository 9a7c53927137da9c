"""docs/metrics.md is the code's own list of metrics, and that list is what
/metrics really exposes (names, types, labels)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.app import build_app
from router.metrics import Kind
from router.metrics_doc import COMMAND, DOC, app_families, render
from tests.helpers import router_config, serve_app, simulator

#: Labels prometheus-client adds to a histogram's buckets.
BUCKET_LABEL = "le"


def test_the_reference_is_up_to_date() -> None:
    expected = render(app_families())
    assert DOC.read_text() == expected, f"docs/metrics.md is out of date: run {COMMAND}"


def test_every_family_is_in_the_reference_once() -> None:
    families = app_families()
    names = [f.exposed for f in families]
    assert len(names) == len(set(names))
    text = DOC.read_text()
    for f in families:
        assert f"| `{f.exposed}` | {f.kind.value} |" in text


async def test_what_metrics_exposes_is_what_the_reference_says() -> None:
    """After real traffic, every family on /metrics is declared, with its type,
    and its samples carry exactly the declared labels."""
    async with simulator() as (sim, _):
        config = router_config([{"id": "e", "url": sim, "kind": "vllm", "models": ["tiny"]}])
        app = build_app(config)
        declared = {f.name: f for f in app.state.metrics.families()}
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            for stream in (False, True):
                r = await c.post("/v1/chat/completions", json={**body, "stream": stream})
                assert r.status_code == 200
            text = (await c.get("/metrics")).text
    seen = 0
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("kvroute_"):
            continue
        if family.name.endswith("_created") and family.name[: -len("_created")] in declared:
            continue  # prometheus-client's creation time of a counter or histogram
        assert family.name in declared, f"{family.name} is exposed but not declared"
        spec = declared[family.name]
        assert family.type == spec.kind.value, family.name
        for sample in family.samples:
            labels = set(sample.labels) - ({BUCKET_LABEL} if spec.kind is Kind.HISTOGRAM else set())
            assert labels == set(spec.labels), (sample.name, sample.labels)
            seen += 1
    assert seen > 20  # the traffic above made samples in many families
