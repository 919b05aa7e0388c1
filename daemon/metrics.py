"""Run statistics: running mean/sd (Welford) and latency percentiles."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np


class RunningStats:
    """Mean and standard deviation without keeping the samples."""

    __slots__ = ("_m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self._m2 = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self._m2 += d * (x - self.mean)

    @property
    def sd(self) -> float:
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 0.0

    def summary(self) -> dict[str, float]:
        return {"mean_ms": round(self.mean, 4), "sd_ms": round(self.sd, 4), "n": self.n}


class Percentiles:
    """The most recent ``window`` samples, for p50/p99 without unbounded memory."""

    def __init__(self, window: int = 100_000) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, x: float) -> None:
        self._samples.append(x)

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self, *qs: float) -> dict[str, float]:
        qs = qs or (50.0, 99.0)
        if not self._samples:
            return {f"p{q:g}": math.nan for q in qs}
        values = np.percentile(np.fromiter(self._samples, float), qs)
        return {f"p{q:g}": round(float(v), 4) for q, v in zip(qs, values, strict=True)}


class RateMeter:
    """Events per second over the last interval (for once-a-second status lines)."""

    def __init__(self, now: float) -> None:
        self._t = now
        self._count = 0

    def tick(self, n: int = 1) -> None:
        self._count += n

    def rate(self, now: float) -> float:
        """Rate since the previous call; resets the interval."""
        dt = now - self._t
        r = self._count / dt if dt > 0 else 0.0
        self._t, self._count = now, 0
        return r


LATENCY_BOUNDS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)
STEP_BOUNDS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


class Histogram:
    """Samples counted into buckets of upper ``bounds`` (a Prometheus histogram), and their
    sum: a fixed size whatever the run's length."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def add(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.sum += x

    def snapshot(self) -> dict[str, Any]:
        """``bounds``, cumulative ``counts`` (one more: +Inf) and ``sum``."""
        return {
            "bounds": list(self.bounds),
            "counts": list(itertools.accumulate(self.counts)),
            "sum": round(self.sum, 4),
        }


class FrameHistograms:
    """A sink's per-frame figures as histograms (ms): latency, and each step of Table 2."""

    def __init__(self, steps: Iterable[str]) -> None:
        self.latency = Histogram(LATENCY_BOUNDS_MS)
        self.steps = {name: Histogram(STEP_BOUNDS_MS) for name in steps}

    def snapshot(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency.snapshot(),
            "steps_ms": {name: h.snapshot() for name, h in self.steps.items()},
        }
