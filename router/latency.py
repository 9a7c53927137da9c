"""Each endpoint's latency as this router measured it: decayed, robust estimates.

Three quantities, in seconds (``policies.base.LatencyView``):

    ttft      sending -> a stream's first translated chunk
    tpot      a stream's time per output token after the first
    duration  a whole non-streamed answer of ``REFERENCE_TOKENS`` output tokens

The rules, and why:

- Decay in time, not per sample. A sample's weight halves every
  ``half_life`` seconds (``latency.half_life``, default 30) and an estimate
  is the weighted mean of its samples.
  Old data fades at the same pace whatever the traffic; a burst of samples
  counts as the many samples it is, but does not wipe out what came before,
  as a per-sample EWMA does (twenty samples at alpha 0.2 leave 1% of the past).
- Clip upward only. Once ``MIN_SAMPLES`` back an estimate, a sample counts as
  at most ``clip`` times the estimate (``latency.clip``, default 4): one 60 s
  timeout moves the mean by at most (clip - 1) / weight of itself, while a
  real slowdown still gets through (the estimate grows by that factor per
  sample). Fast samples are
  not clipped: an endpoint that looks too fast gets more traffic, hence more
  samples that correct it; one that looks too slow gets none. Guard that side.
- Durations are normalised by size. A whole answer's duration grows with the
  tokens it produced, so raw durations of requests of different sizes are
  noise. The estimator fits ``duration = fixed + per_token * tokens`` by
  time-decayed least squares and reports it at ``REFERENCE_TOKENS``, so
  endpoints compare on the same answer size. Without spread in the sizes to
  fit a slope, it scales proportionally (``per_token = mean d / mean n``).
- Failures only ever slow an endpoint down. A failure before the first byte
  that counts against the endpoint (timeout, broken connection, 5xx) is a
  sample of its elapsed time if that exceeds the current estimate, and
  nothing otherwise (nor when there is no estimate): a dead endpoint that
  refuses at once must not look fast. The circuit breaker handles failure
  as such.
- Idle endpoints fade, they are not condemned. A snapshot carries each
  estimate's decayed weight (``samples``); the policies shrink thin estimates
  toward the fleet's typical value and probe endpoints whose data has faded
  (``policies/latency.py``), so one bad sample cannot starve an endpoint.

Time comes from the caller, so tests drive it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

HALF_LIFE = 30.0
CLIP = 4.0
MIN_SAMPLES = 2.0
REFERENCE_TOKENS = 256
#: Seconds below which an estimate is treated as this, so that clipping
#: against a zero estimate (an instant simulator) does not freeze it at zero.
FLOOR = 0.001


def _decay(half_life: float, elapsed: float) -> float:
    return float(0.5 ** (max(0.0, elapsed) / half_life))


@dataclass(slots=True)
class _Mean:
    """A mean of samples weighted by 2^(-age / half_life)."""

    weight: float = 0.0
    mean: float = 0.0
    at: float = 0.0

    def samples(self, now: float, half_life: float) -> float:
        return self.weight * _decay(half_life, now - self.at) if self.weight else 0.0

    def add(self, x: float, now: float, half_life: float, clip: float) -> None:
        w = self.samples(now, half_life)
        if w >= MIN_SAMPLES:
            x = min(x, clip * max(self.mean, FLOOR))
        w += 1.0
        self.mean += (x - self.mean) / w
        self.weight, self.at = w, now


@dataclass(slots=True)
class _Line:
    """Time-decayed least squares of seconds over output tokens: the decayed
    sums of 1, n, n^2, d and n*d."""

    w: float = 0.0
    n: float = 0.0
    nn: float = 0.0
    d: float = 0.0
    nd: float = 0.0
    at: float = 0.0

    def samples(self, now: float, half_life: float) -> float:
        return self.w * _decay(half_life, now - self.at) if self.w else 0.0

    def add(self, tokens: float, seconds: float, now: float, half_life: float, clip: float) -> None:
        f = _decay(half_life, now - self.at)
        self.w, self.n, self.nn, self.d, self.nd = (
            x * f for x in (self.w, self.n, self.nn, self.d, self.nd)
        )
        if self.w >= MIN_SAMPLES:
            seconds = min(seconds, clip * max(self.predict(tokens), FLOOR))
        self.w += 1.0
        self.n += tokens
        self.nn += tokens * tokens
        self.d += seconds
        self.nd += tokens * seconds
        self.at = now

    def fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token), both >= 0."""
        mean_n, mean_d = self.n / self.w, self.d / self.w
        var = self.nn / self.w - mean_n * mean_n
        if var <= (0.1 * mean_n) ** 2:
            # All answers of about one size: no slope to fit; scale proportionally.
            return 0.0, mean_d / max(mean_n, 1.0)
        slope = (self.nd / self.w - mean_n * mean_d) / var
        fixed = mean_d - slope * mean_n
        if slope < 0:
            return mean_d, 0.0
        if fixed < 0:
            return 0.0, self.nd / self.nn
        return fixed, slope

    def predict(self, tokens: float) -> float:
        fixed, per_token = self.fit()
        return fixed + per_token * tokens

    def mean_tokens(self) -> float:
        return self.n / self.w if self.w else 1.0


Quantity = Literal["ttft", "tpot", "duration"]


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """One endpoint's estimates at one moment (a ``policies.base.LatencyView``)."""

    ttft: float | None = None
    tpot: float | None = None
    duration: float | None = None
    ttft_samples: float = 0.0
    tpot_samples: float = 0.0
    duration_samples: float = 0.0
    #: The duration fit: ``duration = fixed + per_token * tokens``.
    duration_fixed: float | None = None
    duration_per_token: float | None = None

    def samples(self, quantity: Quantity) -> float:
        if quantity == "ttft":
            return self.ttft_samples
        if quantity == "tpot":
            return self.tpot_samples
        return self.duration_samples


@dataclass(slots=True)
class LatencyEstimate:
    """The live estimates of one endpoint; feed it samples, read snapshots."""

    half_life: float = HALF_LIFE
    clip: float = CLIP
    _ttft: _Mean = field(default_factory=_Mean)
    _tpot: _Mean = field(default_factory=_Mean)
    _duration: _Line = field(default_factory=_Line)

    def first_byte(self, seconds: float, now: float) -> None:
        """A stream's first chunk came ``seconds`` after sending."""
        self._ttft.add(seconds, now, self.half_life, self.clip)

    def stream_end(self, seconds: float, tokens: int, now: float) -> None:
        """A stream ended ``seconds`` after its first chunk, ``tokens`` later."""
        if tokens >= 1:
            self._tpot.add(seconds / tokens, now, self.half_life, self.clip)

    def answer(self, seconds: float, tokens: int | None, now: float) -> None:
        """A whole answer of ``tokens`` output tokens (None: unknown, taken as
        this endpoint's typical size) took ``seconds``."""
        n = float(tokens) if tokens is not None else self._duration.mean_tokens()
        self._duration.add(max(n, 1.0), seconds, now, self.half_life, self.clip)

    def failed(self, seconds: float, stream: bool, now: float) -> None:
        """An attempt failed ``seconds`` after sending, before any byte came back."""
        if stream:
            m = self._ttft
            if m.samples(now, self.half_life) > 0 and seconds > m.mean:
                m.add(seconds, now, self.half_life, self.clip)
            return
        line = self._duration
        if line.samples(now, self.half_life) > 0:
            n = line.mean_tokens()
            if seconds > line.predict(n):
                line.add(n, seconds, now, self.half_life, self.clip)

    def estimate(self, quantity: Quantity) -> float | None:
        """The current estimate of ``quantity`` (None: no data); a duration
        is of ``REFERENCE_TOKENS`` output tokens."""
        if quantity == "ttft":
            return self._ttft.mean if self._ttft.weight else None
        if quantity == "tpot":
            return self._tpot.mean if self._tpot.weight else None
        if not self._duration.w:
            return None
        return self._duration.predict(REFERENCE_TOKENS)

    def samples(self, quantity: Quantity, now: float) -> float:
        """The decayed weight of the samples behind ``quantity``'s estimate."""
        if quantity == "ttft":
            return self._ttft.samples(now, self.half_life)
        if quantity == "tpot":
            return self._tpot.samples(now, self.half_life)
        return self._duration.samples(now, self.half_life)

    def view(self, now: float) -> LatencySnapshot | None:
        """The estimates now (None: never measured)."""
        if not (self._ttft.weight or self._tpot.weight or self._duration.w):
            return None
        fixed = per_token = None
        if self._duration.w:
            fixed, per_token = self._duration.fit()
        return LatencySnapshot(
            ttft=self.estimate("ttft"),
            tpot=self.estimate("tpot"),
            duration=self.estimate("duration"),
            ttft_samples=self.samples("ttft", now),
            tpot_samples=self.samples("tpot", now),
            duration_samples=self.samples("duration", now),
            duration_fixed=fixed,
            duration_per_token=per_token,
        )


@dataclass(frozen=True, slots=True)
class LiveLatency:
    """An endpoint's estimates read when asked (a ``policies.base.LatencyView``).

    What an ``EndpointView`` carries instead of a ``LatencySnapshot``: the
    registry keeps each endpoint's view between decisions (rebuilding 64
    views with their snapshots cost 570 us a request), and only the latency
    policies read estimates, which are then computed for the endpoints they
    look at. A decision runs without awaiting, so what it reads cannot
    change under it; decayed weights are taken at the clock's current time.
    """

    estimate: LatencyEstimate
    clock: Callable[[], float]

    @property
    def ttft(self) -> float | None:
        return self.estimate.estimate("ttft")

    @property
    def tpot(self) -> float | None:
        return self.estimate.estimate("tpot")

    @property
    def duration(self) -> float | None:
        return self.estimate.estimate("duration")

    def samples(self, quantity: Quantity) -> float:
        return self.estimate.samples(quantity, self.clock())
