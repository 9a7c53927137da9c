"""Tests run on uvloop, the loop kvroute serves on (router/cli.py).

On the default asyncio loop, a client and a uvicorn server sharing one loop
over loopback wait ~40 ms per request (measured: 44 ms a /health on asyncio,
1.8 ms on uvloop), which made the end-to-end tiers slow for no reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

# The real redis-server fixture, for every test module that asks for it.
from tests.redis_server import redis_server  # noqa: F401


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
