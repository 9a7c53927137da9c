"""Retry policy pieces: the fleet-wide retry budget and Retry-After parsing."""

from __future__ import annotations

import collections

from router.config import RetryConfig


def retry_after_seconds(value: str, ceiling: float = 60.0) -> float:
    try:
        return min(max(float(value), 0.0), ceiling)
    except ValueError:
        return 1.0  # an HTTP date: rare from inference servers; wait a little


class RetryBudget:
    """Retries may be at most ``ratio`` of requests over a sliding window (plus a
    floor of ``minimum``), so a sick fleet is not hit with a multiple of its load."""

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryBudget:
        return cls(cfg.budget_ratio, cfg.budget_window, cfg.budget_min)

    def __init__(self, ratio: float, window: float, minimum: int) -> None:
        self.ratio, self.window, self.minimum = ratio, window, minimum
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def record_request(self, now: float) -> None:
        self._requests.append(now)
        if len(self._requests) > 4096 and self._requests[0] < now - self.window:
            self._trim(now)

    def allow_retry(self, now: float) -> bool:
        self._trim(now)
        if len(self._retries) >= max(self.minimum, self.ratio * len(self._requests)):
            return False
        self._retries.append(now)
        return True
