"""Run statistics: running mean/sd (Welford) and latency percentiles."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Iterable, Sequence
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
    """The most recent ``window`` samples, for percentiles without unbounded memory.

    A numpy ring: :meth:`add` is one store, and a once-a-second :meth:`recent` sorts only
    that second's samples (over a full window of 100,000 a percentile takes milliseconds,
    a stall the display or the sink would show as a hitch every second)."""

    def __init__(self, window: int = 100_000) -> None:
        self._ring = np.empty(window, np.float64)
        self._n = 0  # samples ever added
        self._mark = 0  # ``_n`` at the last recent()
        _first_percentile()

    def add(self, x: float) -> None:
        self._ring[self._n % len(self._ring)] = x
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, len(self._ring))

    def last(self, n: int) -> np.ndarray:
        """The ``n`` newest samples (at most the window), oldest first."""
        n = min(n, len(self))
        end = self._n % len(self._ring)
        if n <= end:
            return self._ring[end - n : end]
        return np.concatenate([self._ring[len(self._ring) - (n - end) :], self._ring[:end]])

    def summary(self, *qs: float) -> dict[str, float]:
        """Percentiles ``qs`` (default p50, p99) of the window's samples."""
        return percentiles(self.last(len(self)), qs)

    def recent(self, *qs: float) -> dict[str, float]:
        """Percentiles of the samples added since the previous call (the last interval)."""
        n, self._mark = self._n - self._mark, self._n
        return percentiles(self.last(n), qs)


@functools.cache
def _first_percentile() -> None:
    """numpy's first ``percentile`` imports ``numpy.ma`` (7 ms; 60 ms where Python cannot
    cache bytecode): done when a stage makes its statistics, at setup, not in its first
    once-a-second report while frames flow, where it held up a stream's first frames."""
    np.percentile(np.zeros(2), (50.0, 99.0))


def percentiles(values: np.ndarray, qs: Iterable[float] = ()) -> dict[str, float]:
    """``{"p50": ..., "p99": ...}`` of ``values`` (NaN where there are none)."""
    qs = tuple(qs) or (50.0, 99.0)
    if not len(values):
        return {f"p{q:g}": math.nan for q in qs}
    got = np.percentile(values, qs)
    return {f"p{q:g}": round(float(v), 4) for q, v in zip(qs, got, strict=True)}


class LatencyParts:
    """Where each frame's latency went: a row per frame of the latency and its parts
    (``names``, in the order they happen), for the run's summary: each part's p50 and p99,
    and each part's mean over the slowest frames (latency at or above its p99): what the
    tail is made of."""

    def __init__(self, names: Sequence[str], window: int = 100_000) -> None:
        self.names = tuple(names)
        self._rows = np.empty((window, 1 + len(self.names)), np.float32)
        self._n = 0

    def add(self, latency: float, parts: Sequence[float]) -> None:
        row = self._rows[self._n % len(self._rows)]
        row[0] = latency
        row[1:] = parts
        self._n += 1

    def summary(self) -> dict[str, dict[str, float]]:
        rows = self._rows[: min(self._n, len(self._rows))]
        if not len(rows):
            return {}
        p50, p99 = np.percentile(rows, (50, 99), axis=0)
        slow = rows[rows[:, 0] >= p99[0]].mean(axis=0)
        names = ("latency", *self.names)
        return {
            label: {n: round(float(v), 4) for n, v in zip(names, values, strict=True)}
            for label, values in (("p50", p50), ("p99", p99), ("slowest_1pct", slow))
        }


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
