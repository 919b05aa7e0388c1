"""A hiccup meter (after jHiccup), run beside a benchmark: a process that sleeps
``period`` at a time and records how late each wake-up comes. A stall that the meter
sees too was the machine's (every process stood still: a virtual CPU descheduled, the
host busy), not the benchmarked program's own.

    meter = Hiccups()
    meter.start()
    prepare_the_benchmark()
    meter.mark()
    run_the_benchmark()
    meter.stop()
    print(meter.summary())
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

PERIOD_S = 0.0005
_CHECK_EVERY = 100  # wake-ups between looks at the control pipe


def _meter(period: float, conn: Connection) -> None:
    late: list[float] = []
    while True:
        for _ in range(_CHECK_EVERY):
            t = time.perf_counter()
            time.sleep(period)
            late.append(time.perf_counter() - t - period)
        if conn.poll():
            if conn.recv() == "stop":
                break
            late.clear()  # "mark": what counts starts now
    conn.send(np.array(late))


class Hiccups:
    """The meter: :meth:`start`, :meth:`mark` where counting begins, :meth:`stop`, then
    :meth:`summary`."""

    def __init__(self, period: float = PERIOD_S) -> None:
        self.period = period
        self.late = np.zeros(0)
        self.seconds = 0.0
        self._proc: Any = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_meter, args=(self.period, child), daemon=True)
        self._proc.start()
        self._t0 = time.perf_counter()

    def mark(self) -> None:
        """Count from now on (the meter started earlier, so that its own start-up does
        not load the machine while it measures)."""
        self._conn.send("mark")
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._proc is None:
            return
        self.seconds = time.perf_counter() - self._t0
        self._conn.send("stop")
        if self._conn.poll(10):
            self.late = self._conn.recv()
        self._proc.join(10)
        self._proc = None

    def summary(self) -> dict[str, Any]:
        """Lateness of the meter's wake-ups: p50, p99, max (ms), and how many came
        more than 1 and 5 ms late, over the block's seconds."""
        ms = self.late * 1e3
        if not ms.size:
            return {"wakeups": 0, "seconds": round(self.seconds, 2)}
        return {
            "wakeups": int(ms.size),
            "seconds": round(self.seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3),
            "over_1ms": int((ms > 1).sum()),
            "over_5ms": int((ms > 5).sum()),
        }
