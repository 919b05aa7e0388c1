"""The live pipeline: acquire -> ring "frames" -> infer -> ring "results" -> sink.

With several models (``[[model]]``) each has its infer stage (``infer``, ``infer-1``, ...)
on the same frames ring, writing its own results ring (``results``, ``results-1``, ...).

:func:`build` lays out the stages and their rings for a configuration; the
stage classes here are the two that every run has (sinks live in
``daemon.display``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np

from daemon import results
from daemon.acquire import FrameSource, open_source, paced
from daemon.batching import SKIPPED, Batcher, batch_size
from daemon.config import Config, SourceConfig
from daemon.engines.base import Pending
from daemon.errors import ConfigError, ModelError
from daemon.frame import WITHHELD, Frame, FrameMeta, Timing
from daemon.ring import ReaderMode, RingFrame
from daemon.stage import POLL_S, InputPort, OutputPort, Stage, StageSpec

log = logging.getLogger(__name__)

Taken = tuple[np.ndarray, FrameMeta, float, float]  # a prepared frame, when it started, ended
# ... in flight: its inference, meta, start, end of preparation, input, guard's domain check
InFlight = tuple[Pending, FrameMeta, float, float, np.ndarray, "Future[str] | None"]

STANDBY_POLL_S = 0.001

STAGES = {
    "acquire": "daemon.pipeline:AcquireStage",
    "infer": "daemon.pipeline:InferStage",
    "headless": "daemon.display.headless:HeadlessSink",
    "display": "daemon.display.gl:DisplayStage",
    "record": "daemon.record:RecordStage",
    "igtl_out": "daemon.igtl_out:IgtlOutStage",
    "job_worker": "daemon.offline.worker:JobWorker",
}


def infer_stage(index: int) -> str:
    """The infer stage of model ``index``: ``infer``, ``infer-1``, ..."""
    return "infer" if index == 0 else f"infer-{index}"


def results_port(index: int) -> str:
    """The results ring model ``index`` writes, and the consumers' port that reads it:
    ``results``, ``results-1``, ..."""
    return "results" if index == 0 else f"results-{index}"


def results_ports(config: Config) -> list[str]:
    return [results_port(i) for i in range(len(config.models))]


def build(
    config: Config, ring_names: dict[str, str], frame_shape: tuple[int, ...]
) -> list[StageSpec]:
    """Stage specs, downstream first (readers must exist before the writer starts): one
    infer stage per model, all reading the frames ring, each writing its results ring;
    the consumers get one input port per results ring."""
    every = config.pipeline.mode == "all"
    policy: Literal["block", "overwrite"] = "block" if every else "overwrite"
    frames = ring_names["frames"]
    results = {port: ring_names[port] for port in results_ports(config)}
    # a consumer of label maps gets every one in mode "all", the newest in real time
    consumers = config.pipeline.mode
    specs = [_sink(config, frames, results, consumers)]
    specs += [
        StageSpec(
            infer_stage(i),
            "infer",
            inputs={"frames": InputPort(frames, config.pipeline.mode)},
            outputs={"results": OutputPort(results[results_port(i)], policy)},
            params={"frame_shape": frame_shape, "model_index": i},
        )
        for i in range(len(config.models))
    ]
    if config.record.enabled:
        specs.append(StageSpec("record", "record", inputs={"frames": InputPort(frames, "all")}))
    if config.igtl_out.enabled:
        specs.append(StageSpec("igtl_out", "igtl_out", inputs=_ports(results, consumers)))
    specs.append(StageSpec("acquire", "acquire", outputs={"frames": OutputPort(frames, policy)}))
    return specs


def _ports(results: dict[str, str], mode: ReaderMode) -> dict[str, InputPort]:
    """A consumer's input ports: one per results ring, named like it."""
    return {port: InputPort(ring, mode) for port, ring in results.items()}


def job_workers(config: Config) -> list[StageSpec]:
    """The offline job workers: stages without rings, watched like the others but with
    the patience of one unit of work (``offline.heartbeat_timeout_s``)."""
    patience = {"heartbeat_timeout_s": config.offline.heartbeat_timeout_s}
    return [
        StageSpec(f"jobs-{i}", "job_worker", params=patience) for i in range(config.offline.workers)
    ]


def open_configured(src: SourceConfig) -> FrameSource:
    """The configured source, opened and validated (supervisor and acquire stage alike)."""
    return open_source(src.uri, fps=src.fps, synthetic=src.synthetic, igtl=src.igtl)


def screen_available() -> bool:
    """An X or Wayland session, or SDL told to drive the screen itself (kmsdrm: a bare
    console, no window system)."""
    kms = os.environ.get("SDL_VIDEODRIVER") == "kmsdrm"
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or kms)


def _sink(
    config: Config, frames: str, results: dict[str, str], consumers: ReaderMode
) -> StageSpec:
    """The display (the newest frame; the results as ``consumers`` reads them) when there is
    a screen, else the headless sink (every result: it measures)."""
    if config.sink.headless or not screen_available():
        return StageSpec("sink", "headless", inputs=_ports(results, "all"))
    return StageSpec(
        "sink",
        "display",
        inputs={"frames": InputPort(frames, "newest"), **_ports(results, consumers)},
    )


class AcquireStage(Stage):
    """Reads the source, paces it, stamps acquisition time, writes the frames ring.

    A live source (a scanner: it has ``poll``) is paced by the sender and stamps
    its own acquisition time; recordings and the phantom are paced here.
    """

    def setup(self) -> dict[str, Any]:
        src = self.config.source
        self.source = open_configured(src)
        self.ctx.output("frames")
        self.live: Callable[[float], Frame | None] | None = getattr(self.source, "poll", None)
        if self.live is None:
            self.frames: Iterator[Frame] = paced(
                self.source.frames(),
                pace=src.pace,
                fps=src.fps,
                loop_source=self.source.frames if src.loop else None,
                stop=self.ctx.stop,
            )
        self.limit = src.frames or None
        self.count = 0
        self.paused = src.paused
        self.source_state = ""
        self._report_source()
        return {"source": self.source.description}

    def _report_source(self) -> None:
        """Tell the supervisor when the source's connection state changes (a scanner:
        connecting, connected, disconnected; a recording: streaming)."""
        raw = getattr(self.source, "state", "streaming")
        stats = self.source.stats() if hasattr(self.source, "stats") else {}
        if raw == "connected":
            state = "connected"
        elif raw in ("waiting", "connecting"):
            state = "disconnected" if stats.get("connects") else "connecting"
        else:
            state = "streaming"
        if state != self.source_state:
            self.source_state = state
            endpoint = getattr(self.source, "endpoint", None)
            self.ctx.report(
                "source",
                state=state,
                since=time.time(),
                reconnects=stats.get("reconnects", 0),
                **({"endpoint": endpoint} if endpoint else {}),
            )

    def command(self, name: str, args: dict[str, Any]) -> Any:
        if name == "set" and args["key"] == "source.paused":
            self.paused = bool(args["value"])
            return {"paused": self.paused}
        return super().command(name, args)

    def step(self) -> bool:
        if self.limit is not None and self.count >= self.limit:
            return False
        if self.live is not None:
            frame = self.live(POLL_S)  # keeps reading the socket while paused
            self._report_source()
            if frame is None or self.paused:
                return True  # heartbeats, commands and stop keep flowing
        elif self.paused:
            self.ctx.stop.wait(POLL_S)
            return True
        else:
            frame = next(self.frames, None)
            if frame is None:
                return False
        self.ctx.send("frames", frame.image, frame.meta)
        self.count += 1
        return True

    def teardown(self) -> None:
        if hasattr(self, "source"):
            self.source.close()

    def summary(self) -> dict[str, Any]:
        stats = getattr(self.source, "stats", None)
        return {"frames": self.count, **({"source": stats()} if stats else {})}


class InferStage(Stage):
    """Pre-process, run the network, decode its outputs; each frame's result record
    (daemon/results.py) goes to the results ring.

    Started with ``params["standby"]`` (a hot-swap successor), it loads and warms
    up its model but reads no frame until the supervisor says ``go``; its reader
    entry has the same name as its predecessor's, so it resumes at the first
    frame the predecessor did not take.

    A sequence model (``[input] sequence = S``) gets the last S frames: its reader
    keeps the S - 1 frames before the one it reads (a ``block`` writer leaves them in
    the ring), each frame is prepared once and kept by the network
    (:meth:`~daemon.engines.network.Network.window`). In mode "newest" a window
    whose frames were overwritten while prepared is counted as torn. Frames from
    before this stage's first frame that the ring no longer has are stood in for by
    the oldest it has.
    """

    def setup(self) -> dict[str, Any]:
        from daemon.engines.network import Network
        from daemon.models import model_path

        cfg, p = self.config, self.spec.params
        m = cfg.models[p.get("model_index", 0)]
        import cv2

        # frame-sized OpenCV work gains nothing from threads, whose wake-ups fight the
        # engine's for the CPU (the guard: ~20 % less time with OpenVINO busy beside it)
        cv2.setNumThreads(1)
        model = p.get("model") or m.path
        path = model_path(model)
        options: dict[str, Any] = {
            **m.options,
            "mode": cfg.pipeline.mode,
            "preprocess": m.preprocess,
            "cache_dir": str(cfg.paths.cache() / "engines"),
        }
        if m.threads:
            options["threads"] = m.threads
        self.net = Network.open(
            path,
            engine=p.get("engine") or m.engine or None,
            device=p.get("device") or m.device,
            **options,
        )
        shape = tuple(p["frame_shape"])
        self.net.check_frame(shape)
        self.net.fit_frames(shape)  # the real frame size: a misfit fails here, exit 65
        self._check_rings(shape)
        warmup_ms = self.net.warmup(m.warmup, frame_shape=shape) if m.warmup else None
        self.count = 0
        self.torn = 0
        self.rejected = 0
        self._refused: set[tuple[tuple[int, ...], str]] = set()
        self.inflight: deque[InFlight] = deque()
        size = batch_size(cfg.pipeline.max_batch, cfg.pipeline.mode, p.get("device") or m.device)
        if self.net.sequence > 1:  # its windows share the frames kept for depth in flight
            size = 1
        self.batcher: Batcher[Taken] = Batcher(
            self.net, size, cfg.pipeline.max_batch_delay_ms / 1e3
        )
        if self.batcher.max_batch > 1 and m.warmup and self.net.engine.per_batch_size:
            self.batcher.warmup(shape)  # every batch size (CUDA graphs are made per size)
        self.withheld = 0
        self.doubt = ""  # why the last frame was withheld ("" when it was not)
        self.first = self.last = -1  # sequence numbers of the first and last frame read
        self.active = False
        if not p.get("standby"):
            self._activate()
        channels = 1 if len(shape) == 2 else shape[2]
        return {**self.net.describe(channels), "warmup_ms": warmup_ms}

    def _check_rings(self, shape: tuple[int, ...]) -> None:
        """At start, in one line: the frames ring holds a sequence's frames with room for
        the writer, the results ring a record of this model's outputs."""
        s, name = self.net.sequence, self.net.model.name
        slots = self.ctx.ring("frames").slots
        if s > 1 and slots <= s + 1:
            raise ConfigError(
                f"model {name} takes the last {s} frames: the frames ring needs more than "
                f"{s + 1} slots and has pipeline.ring_slots = {slots}; set it to {s + 2} or more"
            )
        need, have = self.net.record_bytes(shape), self.ctx.ring("results").payload_bytes
        if need > have:
            frames = "x".join(map(str, shape))
            raise ModelError(
                f"model {name}'s outputs take up to {need} bytes per frame of {frames}; the "
                f"results ring holds {have}: fewer or smaller outputs (or smaller frames)"
            )

    def _activate(self) -> None:
        self.reader = self.ctx.input("frames", keep=self.net.sequence - 1)
        self.ctx.output("results")
        self.active = True

    def command(self, name: str, args: dict[str, Any]) -> Any:
        if name == "go":
            self._activate()
            return {"active": True}
        return super().command(name, args)

    def step(self) -> bool:
        if not self.active:
            self.ctx.stop.wait(STANDBY_POLL_S)  # a successor in standby: commands come soon
            return True
        # with inferences in flight, never sleep on the reader: finish one instead
        taken = self.batcher.gather(self._take, 0.0 if self.inflight else POLL_S)
        if not taken:
            if self.inflight:
                self._finish_oldest()
            return True
        pending = self.batcher.submit([x for x, _, _, _ in taken])
        for p, (x, meta, t0, t1) in zip(pending, taken, strict=True):
            self.inflight.append((p, meta, t0, t1, x, self.net.check_domain(x)))
        # in order; at most `depth` in flight; a finished one goes out at once (latency)
        while self.inflight and (
            self.batcher.saturated(len(self.inflight)) or self.inflight[0][0].done()
        ):
            self._finish_oldest()
        return True

    def _take(self, timeout: float) -> Taken | object | None:
        """The next frame prepared (input, meta, start and end of its preparation), None
        when none came within ``timeout``, SKIPPED when it was refused or torn. A frame's
        inference time runs from the end of its preparation (a synchronous engine runs
        inside submit; a batch waits for its last frame)."""
        f = self.reader.read(timeout=timeout)
        if f is None:
            return None
        t0 = time.perf_counter()
        meta = f.meta
        if meta.t_acquired_ns:
            meta.timings_ms[Timing.QUEUE] = (time.monotonic_ns() - meta.t_acquired_ns) / 1e6
        try:
            x = self._input(f)  # reads the slot(s) in place (zero-copy)
        except ModelError as e:  # this frame does not fit the model: refuse it, go on
            self._refuse(f.image, e)
            return SKIPPED
        if x is None:  # overwritten while we read it: "newest" mode under load
            self.torn += 1
            return SKIPPED
        return x, meta, t0, time.perf_counter()

    def _input(self, f: RingFrame) -> np.ndarray | None:
        """The network input for frame ``f`` (None: torn): the frame prepared, or the
        window of the last S frames, each prepared once."""
        net, k = self.net, f.seq
        if self.first < 0:
            self.first = k
        if net.sequence == 1:
            x = net.prepare(f.image)
            return x if f.valid() else None
        if k != self.last + 1:  # a jump ("newest"): windows in flight keep their frames
            self.flush()
        self.last = k
        s = net.sequence
        start = next((q for q in range(max(k - s + 1, 0), k + 1) if not net.kept(q)), k + 1)
        for q, frame in zip(range(start, k + 1), self.reader.window(s, start), strict=True):
            if frame is None:
                if q < self.first:
                    continue  # before this stage began and gone: the oldest there stands in
                return None
            net.keep(q, net.prepare(frame.image))
            if not frame.valid():
                net.forget(q)
                return None
        return net.window(k)

    def _finish_oldest(self) -> None:
        pending, meta, t0, t1, x, domain = self.inflight.popleft()
        out = self.net.result(pending)
        t2 = time.perf_counter()  # with several in flight, inference includes queueing
        outputs, verdict = self.net.finish(out, meta.shape, x, domain)
        t3 = time.perf_counter()
        meta.confidence, meta.flags = verdict.confidence, 0 if verdict.confident else WITHHELD
        self.withheld += not verdict.confident
        if bool(verdict.reason) != bool(self.doubt):  # log changes, not every frame
            log.info("overlay %s", f"withheld: {verdict.reason}" if verdict.reason else "shown")
        self.doubt = verdict.reason
        meta.timings_ms[Timing.NN_INPUT] = (t1 - t0) * 1e3
        meta.timings_ms[Timing.NN_INFERENCE] = (t2 - t1) * 1e3
        meta.timings_ms[Timing.NN_OUTPUT] = (t3 - t2) * 1e3
        meta.generation = self.spec.generation
        # the slot's payload is the record: described so, publish need not copy the meta
        meta.shape, meta.dtype = (results.nbytes(outputs),), "u1"
        slot = self.ctx.claim("results", meta.shape, np.uint8)
        if slot is None:  # stopped while a slow reader held the ring
            return
        results.pack_into(slot, outputs)
        self.ctx.output("results").publish(meta)
        self.count += 1

    def _refuse(self, image: Any, error: ModelError) -> None:
        self.rejected += 1
        key = (tuple(image.shape), str(image.dtype))
        if key not in self._refused:  # once per kind of frame, not per frame
            self._refused.add(key)
            log.warning("frames refused: %s", error)

    def flush(self) -> None:
        while self.inflight:
            self._finish_oldest()

    def teardown(self) -> None:
        if hasattr(self, "net"):
            self.net.close()

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.count,
            "torn": self.torn,
            "rejected": self.rejected,
            "withheld": self.withheld,
            **self.batcher.summary(),
        }
