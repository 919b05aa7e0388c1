"""The live pipeline: acquire -> ring "frames" -> infer -> ring "results" -> sink.

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
from pathlib import Path
from typing import Any, Literal

import numpy as np

from daemon.acquire import FrameSource, open_source, paced
from daemon.batching import SKIPPED, Batcher, batch_size
from daemon.config import Config, SourceConfig
from daemon.engines.base import Pending
from daemon.errors import ModelError
from daemon.frame import WITHHELD, Frame, FrameMeta, Timing
from daemon.ring import ReaderMode
from daemon.stage import POLL_S, InputPort, OutputPort, Stage, StageSpec

log = logging.getLogger(__name__)

Taken = tuple[np.ndarray, FrameMeta, float, float]  # a prepared frame, when it started, ended

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


def build(
    config: Config, ring_names: dict[str, str], frame_shape: tuple[int, ...]
) -> list[StageSpec]:
    """Stage specs, downstream first (readers must exist before the writer starts)."""
    every = config.pipeline.mode == "all"
    policy: Literal["block", "overwrite"] = "block" if every else "overwrite"
    frames, results = ring_names["frames"], ring_names["results"]
    # a consumer of label maps gets every one in mode "all", the newest in real time
    consumers = config.pipeline.mode
    specs = [
        _sink(config, frames, results, consumers),
        StageSpec(
            "infer",
            "infer",
            inputs={"frames": InputPort(frames, config.pipeline.mode)},
            outputs={"results": OutputPort(results, policy)},
            params={"frame_shape": frame_shape},
        ),
    ]
    if config.record.enabled:
        specs.append(StageSpec("record", "record", inputs={"frames": InputPort(frames, "all")}))
    if config.igtl_out.enabled:
        specs.append(
            StageSpec("igtl_out", "igtl_out", inputs={"results": InputPort(results, consumers)})
        )
    specs.append(StageSpec("acquire", "acquire", outputs={"frames": OutputPort(frames, policy)}))
    return specs


def job_workers(config: Config) -> list[StageSpec]:
    """The offline job workers: stages without rings, watched like the others but with
    the patience of one unit of work (``offline.heartbeat_timeout_s``)."""
    patience = {"heartbeat_timeout_s": config.offline.heartbeat_timeout_s}
    return [
        StageSpec(f"jobs-{i}", "job_worker", params=patience)
        for i in range(config.offline.workers)
    ]


def open_configured(src: SourceConfig) -> FrameSource:
    """The configured source, opened and validated (supervisor and acquire stage alike)."""
    return open_source(src.uri, fps=src.fps, synthetic=src.synthetic, igtl=src.igtl)


def screen_available() -> bool:
    """An X or Wayland session, or SDL told to drive the screen itself (kmsdrm: a bare
    console, no window system)."""
    kms = os.environ.get("SDL_VIDEODRIVER") == "kmsdrm"
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or kms)


def _sink(config: Config, frames: str, results: str, consumers: ReaderMode) -> StageSpec:
    """The display (the newest frame; the results as ``consumers`` reads them) when there is
    a screen, else the headless sink (every result: it measures)."""
    if config.sink.headless or not screen_available():
        return StageSpec("sink", "headless", inputs={"results": InputPort(results, "all")})
    return StageSpec(
        "sink",
        "display",
        inputs={"frames": InputPort(frames, "newest"), "results": InputPort(results, consumers)},
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
    """Pre-process, run the network, post-process; label maps go to the results ring.

    Started with ``params["standby"]`` (a hot-swap successor), it loads and warms
    up its model but reads no frame until the supervisor says ``go``; its reader
    entry has the same name as its predecessor's, so it resumes at the first
    frame the predecessor did not take.
    """

    def setup(self) -> dict[str, Any]:
        from daemon.engines.segmenter import Segmenter
        from daemon.models import default_model

        cfg, m, p = self.config, self.config.model, self.spec.params
        import cv2

        # frame-sized OpenCV work gains nothing from threads, whose wake-ups fight the
        # engine's for the CPU (the guard: ~20 % less time with OpenVINO busy beside it)
        cv2.setNumThreads(1)
        model = p.get("model") or m.path
        path = Path(model) if model else default_model()
        options: dict[str, Any] = {
            **m.options,
            "mode": cfg.pipeline.mode,
            "preprocess": m.preprocess,
            "cache_dir": str(cfg.paths.cache() / "engines"),
        }
        if m.threads:
            options["threads"] = m.threads
        self.seg = Segmenter.open(
            path,
            engine=p.get("engine") or m.engine or None,
            device=p.get("device") or m.device,
            **options,
        )
        shape = tuple(p["frame_shape"])
        self.seg.check_frame(shape)
        self.seg.fit_frames(shape)  # the real frame size: a misfit fails here, exit 65
        warmup_ms = self.seg.warmup(m.warmup, frame_shape=shape) if m.warmup else None
        self.count = 0
        self.torn = 0
        self.rejected = 0
        self._refused: set[tuple[tuple[int, ...], str]] = set()
        self.inflight: deque[tuple[Pending, FrameMeta, float, float, np.ndarray]] = deque()
        size = batch_size(cfg.pipeline.max_batch, cfg.pipeline.mode, p.get("device") or m.device)
        self.batcher: Batcher[Taken] = Batcher(
            self.seg, size, cfg.pipeline.max_batch_delay_ms / 1e3
        )
        if self.batcher.max_batch > 1 and m.warmup and self.seg.engine.per_batch_size:
            self.batcher.warmup(shape)  # every batch size (CUDA graphs are made per size)
        self.withheld = 0
        self.doubt = ""  # why the last frame was withheld ("" when it was not)
        self.active = False
        if not p.get("standby"):
            self._activate()
        return {**self.seg.describe(), "warmup_ms": warmup_ms}

    def _activate(self) -> None:
        self.reader = self.ctx.input("frames")
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
            self.inflight.append((p, meta, t0, t1, x))
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
        try:
            x = self.seg.prepare(f.image)  # reads the slot in place (zero-copy)
        except ModelError as e:  # this frame does not fit the model: refuse it, go on
            self._refuse(f.image, e)
            return SKIPPED
        if not f.valid():  # overwritten while we read it: "newest" mode under load
            self.torn += 1
            return SKIPPED
        return x, f.meta, t0, time.perf_counter()

    def _finish_oldest(self) -> None:
        pending, meta, t0, t1, x = self.inflight.popleft()
        out = self.seg.result(pending)
        t2 = time.perf_counter()  # with several in flight, inference includes queueing
        labels, verdict = self.seg.finish_guarded(out, meta.shape, x)
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
        self.ctx.send("results", labels, meta)
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
        if hasattr(self, "seg"):
            self.seg.close()

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.count,
            "torn": self.torn,
            "rejected": self.rejected,
            "withheld": self.withheld,
            **self.batcher.summary(),
        }
