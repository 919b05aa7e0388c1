"""The headless sink: consumes results, keeps run statistics, reports them once a second.

It is the display's stand-in where no screen is attached (and the measuring
end of every benchmark): frame latency is acquisition stamp -> read here. It
counts the results whose overlay the uncertainty guard withheld ("no confident
finding").

With several models it reads every results port (``results``, ``results-1``, ...: one
per model, see ``daemon.pipeline``) and keeps each one's figures: the first port in the
stage's own loop, each other one in a thread of its own that sleeps on its ring, so a
result is stamped when it arrives whichever port it comes on. The figures at the top of
its reports are the first port's (the only one's); ``ports`` has each port's. It reads
only the frame header (:class:`~daemon.frame.FrameMeta`), never the payload.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from daemon.frame import WITHHELD, FrameMeta, Timing
from daemon.metrics import FrameHistograms, LatencyParts, Percentiles, RateMeter, RunningStats
from daemon.ring import EndOfStream, RingReader
from daemon.stage import POLL_S, Stage

TABLE2 = {  # the paper's Table 2 columns, in the order they happen
    "nn_input": Timing.NN_INPUT,
    "nn_inference": Timing.NN_INFERENCE,
    "nn_output": Timing.NN_OUTPUT,
}
PARTS = ("queue", *TABLE2, "delivery")
"""A frame's latency in parts: waiting in the frames ring, Table 2's three, and the rest
(the results ring, up to the read here)."""


def is_results_port(port: str) -> bool:
    """A port that reads a model's results ring (the display's fallback has ``frames`` too)."""
    return port == "results" or port.startswith("results-")


class PortStats:
    """What the sink measures on one results port; safe to read while another thread adds."""

    def __init__(self, now: float) -> None:
        self.lock = threading.Lock()
        self.latency = Percentiles()
        self.overhead = Percentiles()  # latency minus the frame's own inference time
        self.stages = {name: RunningStats() for name in TABLE2}
        self.histograms = FrameHistograms(TABLE2)  # for /metrics
        self.parts = LatencyParts(PARTS)
        self.count = 0
        self.withheld = 0  # results flagged WITHHELD by the guard
        self.first_ns = self.last_ns = 0
        self.meter = RateMeter(now)

    def add(self, meta: FrameMeta) -> None:
        now_ns = time.monotonic_ns()
        latency = (now_ns - meta.t_acquired_ns) / 1e6
        with self.lock:
            self.latency.add(latency)
            self.histograms.latency.add(latency)
            t = meta.timings_ms.tolist()
            self.overhead.add(latency - t[Timing.NN_INFERENCE])
            steps = [t[idx] for idx in TABLE2.values()]
            for name, ms in zip(TABLE2, steps, strict=True):
                self.stages[name].add(ms)
                self.histograms.steps[name].add(ms)
            queue = t[Timing.QUEUE]
            self.parts.add(latency, (queue, *steps, latency - queue - sum(steps)))
            self.count += 1
            self.withheld += bool(meta.flags & WITHHELD)
            self.first_ns = self.first_ns or now_ns
            self.last_ns = now_ns
            self.meter.tick()

    def live(self, now: float) -> dict[str, Any]:
        """The figures of the last interval."""
        with self.lock:
            return {
                "fps": round(self.meter.rate(now), 2),
                "latency_ms": self.latency.recent(50, 99),
                "inference_ms": round(self.stages["nn_inference"].mean, 3),
                "timings_ms": {name: round(s.mean, 3) for name, s in self.stages.items()},
                "frames": self.count,
                "withheld": withheld_figures(self.withheld, self.count),
            }

    def summary(self) -> dict[str, Any]:
        """The run's figures: fps, latency, overhead, the paper's Table 2."""
        with self.lock:
            span = (self.last_ns - self.first_ns) / 1e9
            return {
                "frames_out": self.count,
                "fps": round((self.count - 1) / span, 2) if span > 0 else 0.0,
                "latency_ms": self.latency.summary(50, 90, 99),
                "overhead_ms": self.overhead.summary(50, 99),
                "latency_parts_ms": self.parts.summary(),
                "stages": {name: s.summary() for name, s in self.stages.items()},
                "withheld": withheld_figures(self.withheld, self.count),
            }


class HeadlessSink(Stage):
    def setup(self) -> dict[str, Any]:
        now = time.monotonic()
        ports = [p for p in self.spec.inputs if is_results_port(p)]
        self.readers: dict[str, RingReader] = {p: self.ctx.input(p) for p in ports}
        self.ports = {p: PortStats(now) for p in ports}
        first = ports[0]
        self.reader, self.first = self.readers[first], self.ports[first]
        self.open = True  # the first port's stream has not ended
        self.errors: list[BaseException] = []  # what a port's thread died of
        self.halt = threading.Event()  # the stage is going (a failure): threads end first
        self.followers = [
            threading.Thread(target=self._follow, args=(p,), name=f"sink-{p}", daemon=True)
            for p in ports[1:]
        ]
        for t in self.followers:
            t.start()
        self.next_status = now + self.config.sink.status_interval_s
        return {}

    @property
    def count(self) -> int:
        """Results read on the first port."""
        return self.first.count

    def _follow(self, port: str) -> None:
        """A port's own reader loop (each port after the first), until its stream ends."""
        reader, stats = self.readers[port], self.ports[port]
        try:
            while not (self.ctx.stop.is_set() or self.halt.is_set()):
                f = reader.read(timeout=POLL_S)
                if f is not None:
                    stats.add(f.meta)
        except EndOfStream:
            return
        except BaseException as e:  # raised in the stage's own loop: it reports and fails
            self.errors.append(e)

    def step(self) -> bool:
        if self.errors:
            raise self.errors[0]
        if self.open:
            try:
                f = self.reader.read(timeout=POLL_S)
            except EndOfStream:
                self.open = False
                f = None
            if f is not None:
                self.first.add(f.meta)
        else:
            self.ctx.stop.wait(POLL_S)
        now = time.monotonic()
        if now >= self.next_status:
            self.next_status = now + self.config.sink.status_interval_s
            self.ctx.report("stats", **self.live(now))
        if not self.open and not any(t.is_alive() for t in self.followers):
            if self.errors:
                raise self.errors[0]
            return False  # every port's stream ended
        return True

    def command(self, name: str, args: dict[str, Any]) -> Any:
        if name == "model":  # a hot-swap: nothing is drawn here, the summary names the model
            return {"generation": args["generation"]}
        return super().command(name, args)

    def live(self, now: float) -> dict[str, Any]:
        """The figures of the last interval (the supervisor prints and publishes them)."""
        ports = {p: s.live(now) for p, s in self.ports.items()}
        for p, figures in ports.items():
            figures["dropped"] = self.readers[p].dropped
        with self.first.lock:
            histograms = self.first.histograms.snapshot()
        return {**next(iter(ports.values())), "histograms": histograms, "ports": ports}

    def _join(self) -> None:
        """Each port's thread ended (it sees a stop within POLL_S): the rings outlive it."""
        for t in self.followers:
            t.join()

    def summary(self) -> dict[str, Any]:
        self._join()
        ports = {p: s.summary() for p, s in self.ports.items()}
        return {**next(iter(ports.values())), "ports": ports}

    def teardown(self) -> None:
        if hasattr(self, "followers"):
            self.halt.set()
            self._join()


def withheld_figures(withheld: int, results: int) -> dict[str, Any]:
    """How many results had their overlay withheld (no confident finding), and which
    fraction of all results that is."""
    return {"frames": withheld, "fraction": round(withheld / results, 4) if results else 0.0}
