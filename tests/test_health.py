"""Circuit breaker, retry budget, health hysteresis and load scraping: exact, clocked."""

from __future__ import annotations

import httpx
import pytest

from backends import build_adapter
from router.circuit import Circuit
from router.config import CircuitConfig
from router.monitor import Monitor
from router.retry import RetryBudget, retry_after_seconds
from router.state import AppState
from tests.helpers import FIXTURES, router_config

VLLM_METRICS = (FIXTURES / "vllm" / "metrics.body").read_text()


def test_circuit_opens_backs_off_and_closes() -> None:
    c = Circuit(CircuitConfig(failures=3, base_backoff=1.0, max_backoff=4.0))
    for t in (0.0, 0.1):
        c.failure(t)
        assert c.state == "closed" and c.admits(t)
    c.failure(0.2)
    assert c.state == "open" and not c.admits(1.1)
    assert c.admits(1.2)  # backoff over: one trial may go
    c.begin(1.2)
    assert c.state == "half_open" and not c.admits(1.3)  # only one trial at a time
    c.failure(1.3)  # the trial failed: open again, backoff doubled
    assert (c.state, c.backoff) == ("open", 2.0)
    c.begin(3.3)
    c.failure(3.4)
    assert c.backoff == 4.0
    c.begin(7.4)
    c.failure(7.5)
    assert c.backoff == 4.0  # capped
    c.begin(11.5)
    c.success()
    assert (c.state, c.failures, c.admits(11.6)) == ("closed", 0, True)


def test_a_success_resets_the_failure_streak() -> None:
    c = Circuit(CircuitConfig(failures=2))
    c.failure(0)
    c.success()
    c.failure(1)
    assert c.state == "closed"


def test_retry_budget() -> None:
    budget = RetryBudget(ratio=0.1, window=10.0, minimum=2)
    for t in range(20):
        budget.record_request(float(t) / 10)
    assert [budget.allow_retry(2.0) for _ in range(3)] == [True, True, False]
    for t in range(20, 40):
        budget.record_request(float(t) / 10)
    # 40 requests in the window: 4 retries, 2 of them already spent.
    assert [budget.allow_retry(4.0) for _ in range(3)] == [True, True, False]
    assert budget.allow_retry(14.5) is True  # the window slid past the old retries


def test_retry_after_values() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("3600") == 60.0
    assert retry_after_seconds("Wed, 21 Oct 2026 07:28:00 GMT") == 1.0


def state_with(**cfg: object) -> AppState:
    config = router_config(
        [{"id": "a", "url": "http://a:1", "kind": "vllm", "models": ["m"]}], **cfg
    )
    return AppState.from_config(config)


def test_health_hysteresis() -> None:
    state = state_with(health={"fall": 2, "rise": 3})
    monitor = Monitor(state)
    ep = state.registry.get("a")
    assert ep is not None
    monitor.record_probe(ep, False, "boom")
    assert ep.healthy
    monitor.record_probe(ep, False, "boom")
    assert not ep.healthy and ep.last_error == "boom"
    assert state.registry.candidates("m") == []
    monitor.record_probe(ep, True, None)
    monitor.record_probe(ep, True, None)
    assert not ep.healthy
    monitor.record_probe(ep, True, None)
    assert ep.healthy


async def test_probe_and_scrape_over_http() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/metrics":
            body = VLLM_METRICS.replace(
                'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0',
                'vllm:num_requests_running{engine="0",model_name="tiny"} 3.0',
            )
            return httpx.Response(200, text=body)
        return httpx.Response(503)

    clock = [100.0]
    state = state_with(health={"fall": 1}, scrape={"stale_after": 5})
    state.registry.clock = lambda: clock[0]
    monitor = Monitor(state, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    ep = state.registry.get("a")
    assert ep is not None
    await monitor.probe_all()
    assert not ep.healthy and ep.last_error == "health probe /health answered HTTP 503"
    ep.completed = 4  # this router's answered requests when the scrape comes back
    await monitor.scrape_all()
    assert (ep.running, ep.waiting, ep.kv_usage) == (3.0, 0.0, 0.0)
    # The engine's finished requests (every finish reason) beside our own count.
    assert (ep.view().finished, ep.view().completed_at_scrape) == (6.0, 4)
    assert ep.kv_capacity_tokens == 80 * 32  # 81 blocks of 32, one reserved
    assert ep.view().running == 3.0
    clock[0] += 6
    monitor.expire_stale()
    assert ep.running is None and ep.scraped_at is None
    assert calls == ["/health", "/metrics"]


async def test_a_scrape_over_its_bound_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("router.monitor.MAX_SCRAPE_BYTES", len(VLLM_METRICS.encode()) + 100)
    padding = ["\n# " + "x" * 96 + "\n"]  # 100 bytes

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=VLLM_METRICS + "".join(padding))

    state = state_with()
    monitor = Monitor(state, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    ep = state.registry.get("a")
    assert ep is not None
    await monitor.scrape_all()
    assert ep.scraped_at is not None  # within the bound: read
    ep.scraped_at = ep.running = None
    padding.append(padding[0])  # now 100 bytes past it
    await monitor.scrape_all()
    assert ep.scraped_at is None and ep.running is None


def test_vllm_load_parsing_sums_engines() -> None:
    two_engines = VLLM_METRICS + (
        'vllm:num_requests_waiting{engine="1",model_name="tiny"} 4.0\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5\n'
        'vllm:request_success_total{engine="1",finished_reason="stop",model_name="tiny"} 2.0\n'
    )
    load = build_adapter("vllm", {}).parse_load(two_engines)
    assert (load.waiting, load.kv_usage, load.finished) == (4.0, 0.25, 8.0)
    assert build_adapter("openai", {}).parse_load(VLLM_METRICS).running is None
    no_counter = "\n".join(
        line for line in VLLM_METRICS.splitlines() if "request_success_total" not in line
    )
    assert build_adapter("vllm", {}).parse_load(no_counter).finished is None
