"""Per-endpoint circuit breaker: passive outlier detection with exponential backoff.

    closed --(N consecutive failures)--> open --(backoff elapsed)--> half-open
    half-open --(trial succeeds)--> closed
    half-open --(trial fails)--> open, backoff doubled (up to a ceiling)

Failures are what the router saw: connection errors, timeouts, 5xx answers.
Time comes from the caller, so tests drive it exactly.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from router.config import CircuitConfig


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Circuit:
    config: CircuitConfig
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    backoff: float = 0.0
    trial_in_flight: bool = False
    #: Told of every change of ``state`` (the registry's cached candidates).
    on_change: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def admits(self, now: float) -> bool:
        """May a request be sent now? (A half-open circuit admits one trial.)"""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and now < self.opened_at + self.backoff:
            return False
        return not self.trial_in_flight

    def begin(self, now: float) -> None:
        if self.state is CircuitState.OPEN and now >= self.opened_at + self.backoff:
            self._enter(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN:
            self.trial_in_flight = True

    def abandon(self) -> None:
        """The attempt ended without a verdict (the client left, or a 429): a
        half-open circuit may try again."""
        self.trial_in_flight = False

    def success(self) -> None:
        self._enter(CircuitState.CLOSED)
        self.failures = 0
        self.backoff = 0.0
        self.trial_in_flight = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN:
            self.trial_in_flight = False
            self._open(now, min(self.backoff * 2, self.config.max_backoff))
        elif self.state is CircuitState.CLOSED and self.failures >= self.config.failures:
            self._open(now, self.config.base_backoff)

    def _open(self, now: float, backoff: float) -> None:
        self._enter(CircuitState.OPEN)
        self.opened_at = now
        self.backoff = backoff

    def _enter(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change()
