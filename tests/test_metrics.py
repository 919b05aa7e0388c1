"""Run statistics: what a sink does per frame and once a second imports nothing.

A module imported while frames flow is a stall in the stream (numpy's first
``percentile`` imports ``numpy.ma``: 7 ms here, 60 ms where Python cannot cache
bytecode, seen as a 66 ms hitch in a stream's first second on the NVIDIA test machine).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from daemon.metrics import Percentiles, percentiles


def test_percentiles_recent_and_summary() -> None:
    p = Percentiles(window=8)
    for x in range(10):
        p.add(float(x))
    assert p.summary(50) == {"p50": 5.5}  # the window: 2..9
    assert p.recent(0, 100) == {"p0": 2.0, "p100": 9.0}
    assert np.isnan(p.recent(50)["p50"])  # nothing added since
    p.add(20.0)
    assert p.recent(50) == {"p50": 20.0}
    assert percentiles(np.array([1.0, 3.0])) == {"p50": 2.0, "p99": 2.98}


def test_a_sinks_statistics_import_nothing_once_set_up() -> None:
    code = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from daemon.display.headless import PortStats
        from daemon.frame import FrameMeta

        stats = PortStats(time.monotonic())  # what the sink's setup makes
        before = set(sys.modules)
        for i in range(50):
            meta = FrameMeta.for_array(np.zeros((4, 4), np.uint8), index=i)
            meta.t_acquired_ns = time.monotonic_ns()
            stats.add(meta)
        stats.live(time.monotonic() + 1)  # the once-a-second report
        print(sorted(set(sys.modules) - before))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"imported while frames flow: {out.strip()}"
