"""The headless sink: consumes results, keeps run statistics, reports them once a second.

It is the display's stand-in where no screen is attached (and the measuring
end of every benchmark): frame latency is acquisition stamp -> read here. It
counts the results whose overlay the uncertainty guard withheld ("no confident
finding").
"""

from __future__ import annotations

import time
from typing import Any

from daemon.frame import WITHHELD, Timing
from daemon.metrics import FrameHistograms, Percentiles, RateMeter, RunningStats
from daemon.stage import POLL_S, Stage

TABLE2 = {  # the paper's Table 2 columns, in the order they happen
    "nn_input": Timing.NN_INPUT,
    "nn_inference": Timing.NN_INFERENCE,
    "nn_output": Timing.NN_OUTPUT,
}


class HeadlessSink(Stage):
    def setup(self) -> dict[str, Any]:
        self.reader = self.ctx.input("results")
        self.latency = Percentiles()
        self.overhead = Percentiles()  # latency minus the frame's own inference time
        self.stages = {name: RunningStats() for name in TABLE2}
        self.histograms = FrameHistograms(TABLE2)  # for /metrics
        self.count = 0
        self.withheld = 0  # results flagged WITHHELD by the guard
        self.first_ns = self.last_ns = 0
        now = time.monotonic()
        self.meter = RateMeter(now)
        self.next_status = now + self.config.sink.status_interval_s
        return {}

    def step(self) -> bool:
        f = self.reader.read(timeout=POLL_S)
        if f is not None:
            now_ns = time.monotonic_ns()
            meta = f.meta
            latency = (now_ns - meta.t_acquired_ns) / 1e6
            self.latency.add(latency)
            self.histograms.latency.add(latency)
            self.overhead.add(latency - float(meta.timings_ms[Timing.NN_INFERENCE]))
            for name, idx in TABLE2.items():
                self.stages[name].add(float(meta.timings_ms[idx]))
                self.histograms.steps[name].add(float(meta.timings_ms[idx]))
            self.count += 1
            self.withheld += bool(meta.flags & WITHHELD)
            self.first_ns = self.first_ns or now_ns
            self.last_ns = now_ns
            self.meter.tick()
        now = time.monotonic()
        if now >= self.next_status:
            self.next_status = now + self.config.sink.status_interval_s
            self.ctx.report("stats", **self.live(self.meter.rate(now)))
        return True

    def command(self, name: str, args: dict[str, Any]) -> Any:
        if name == "model":  # a hot-swap: nothing is drawn here, the summary names the model
            return {"generation": args["generation"]}
        return super().command(name, args)

    def live(self, fps: float) -> dict[str, Any]:
        """The figures of the last interval (the supervisor prints and publishes them)."""
        return {
            "fps": round(fps, 2),
            "latency_ms": self.latency.summary(50, 99),
            "inference_ms": round(self.stages["nn_inference"].mean, 3),
            "frames": self.count,
            "dropped": self.reader.dropped,
            "withheld": withheld_figures(self.withheld, self.count),
            "histograms": self.histograms.snapshot(),
        }

    def summary(self) -> dict[str, Any]:
        span = (self.last_ns - self.first_ns) / 1e9
        return {
            "frames_out": self.count,
            "fps": round((self.count - 1) / span, 2) if span > 0 else 0.0,
            "latency_ms": self.latency.summary(50, 90, 99),
            "overhead_ms": self.overhead.summary(50, 99),
            "stages": {name: s.summary() for name, s in self.stages.items()},
            "withheld": withheld_figures(self.withheld, self.count),
        }


def withheld_figures(withheld: int, results: int) -> dict[str, Any]:
    """How many results had their overlay withheld (no confident finding), and which
    fraction of all results that is."""
    return {"frames": withheld, "fraction": round(withheld / results, 4) if results else 0.0}
