"""Background tasks owned by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

LOG = logging.getLogger("kvroute.tasks")


async def cancel_all(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has stopped.

    A task that had already failed is logged, not raised: stopping goes on.
    The caller's own cancellation is not swallowed.
    """
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for task, outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, Exception):
            LOG.error({"event": "task_failed", "task": task.get_name()}, exc_info=outcome)
