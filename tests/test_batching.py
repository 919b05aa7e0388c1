"""Dynamic batching in mode "all" (daemon/batching.py), on the CPU with ONNX Runtime.

The infer stage runs (``run_stage``, in this thread) on a frames ring that already
holds every frame, so the batches it makes are known: full ones, then the rest.
Every frame comes out once, in order, with the label map the model gives it alone.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_engines import graph_model, save

from daemon.batching import GPU_BATCH, SKIPPED, Batcher, batch_size
from daemon.config import Config
from daemon.engines.network import Network
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.engines.segmenter import Segmenter
from daemon.errors import EngineError
from daemon.frame import FrameMeta
from daemon.pipeline import InferStage
from daemon.results import capacity, unpack
from daemon.ring import EndOfStream, Ring
from daemon.stage import InputPort, OutputPort, StageSpec, run_stage

H, W = 32, 48
CARD = """
task = "segmentation"
[output]
activation = "none"
[[classes]]
name = "background"
colour = [0, 0, 0]
[[classes]]
name = "bright"
colour = [255, 0, 0]
[[classes]]
name = "dark"
colour = [0, 0, 255]
"""


def model(path: Path, batch: str | int) -> Path:
    """One grey channel in, three logits out (0, 8x - 2, 2 - 8x): class 1 above a
    quarter of full scale, 2 below it, 0 at it; ``batch`` "batch" is dynamic."""
    w = np.array([0.0, 8.0, -8.0]).reshape(3, 1, 1, 1)
    b = np.array([0.0, -2.0, 2.0])
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1])]
    return save(
        graph_model(nodes, [batch, 1, H, W], [batch, 3, H, W], {"w": w, "b": b}), path, CARD
    )


def frames(n: int) -> list[np.ndarray]:
    """Distinct frames: each one's label map tells it apart."""
    rng = np.random.default_rng(11)
    out = [rng.integers(0, 256, (H, W), dtype=np.uint8) for _ in range(n)]
    for i, f in enumerate(out):
        f[: i % H, :4] = 64  # exactly a quarter of 256: class 0
    return out


@pytest.fixture
def rings() -> Iterator[tuple[Ring, Ring]]:
    tag = f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}"
    made = [
        Ring.create(f"{tag}-f", slots=64, payload_bytes=H * W),
        Ring.create(f"{tag}-r", slots=64, payload_bytes=capacity((H, W))),
    ]
    yield made[0], made[1]
    for r in made:
        r.close()
        r.unlink()


def infer(
    rings: tuple[Ring, Ring], path: Path, images: list[np.ndarray], mode: str, max_batch: int
) -> tuple[list[tuple[FrameMeta, np.ndarray]], dict[str, Any]]:
    """Run the infer stage over ``images`` (all waiting before it starts); the results
    in the order they came out, and the stage's summary."""
    src, dst = rings
    src.reader("infer", "all")  # the stage resumes this entry: every frame is waiting
    out = dst.reader("test", "all")
    writer = src.writer("block")
    for i, image in enumerate(images):
        writer.write(image, FrameMeta(index=i, t_acquired_ns=1, shape=image.shape))
    writer.close_stream()
    spec = StageSpec(
        "infer",
        "infer",
        inputs={"frames": InputPort(src.name, mode)},  # type: ignore[arg-type]
        outputs={"results": OutputPort(dst.name, "block")},
        params={"frame_shape": (H, W)},
    )
    config = Config.model_validate(
        {
            "model": {"path": str(path), "engine": "onnxruntime", "warmup": 1},
            "pipeline": {"mode": mode, "max_batch": max_batch},
        }
    )
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    assert run_stage(InferStage, spec, config, events, threading.Event()) == 0
    done = [e for e in list(events.queue) if e["event"] == "done"]
    results = []
    while True:
        try:
            f = out.read(timeout=0.0)
        except EndOfStream:
            break
        assert f is not None
        labels = unpack(f.image).labels
        assert labels is not None
        results.append((f.meta, labels.copy()))
    return results, done[0]


@pytest.mark.parametrize("max_batch", [4, 7])
def test_mode_all_batches_waiting_frames_every_one_once_in_order(
    tmp_path: Path, rings: tuple[Ring, Ring], max_batch: int
) -> None:
    path = model(tmp_path / "dyn.onnx", "batch")
    images = frames(30)
    results, summary = infer(rings, path, images, "all", max_batch)
    assert [m.index for m, _ in results] == list(range(30))
    with Segmenter.open(path, engine="onnxruntime") as seg:
        for (_, labels), image in zip(results, images, strict=True):
            np.testing.assert_array_equal(labels, seg.segment(image))  # as alone
    assert summary["frames"] == 30
    assert summary["batches"] == math.ceil(30 / max_batch) and summary["batch_max"] == max_batch


def test_a_model_with_a_batch_of_one_and_mode_newest_stay_at_one(
    tmp_path: Path, rings: tuple[Ring, Ring]
) -> None:
    fixed = model(tmp_path / "one.onnx", 1)
    eng = OnnxRuntimeEngine()
    eng.load(fixed, "cpu")
    assert eng.max_batch == 1
    images = frames(10)
    results, summary = infer(rings, fixed, images, "all", 8)
    assert [m.index for m, _ in results] == list(range(10))
    assert (summary["batches"], summary["batch_max"]) == (10, 1)


def test_mode_newest_takes_one_frame_at_a_time(tmp_path: Path, rings: tuple[Ring, Ring]) -> None:
    results, summary = infer(rings, model(tmp_path / "dyn.onnx", "batch"), frames(10), "newest", 8)
    assert results and summary["batch_max"] == 1


def test_engine_batch_entry_point_equals_one_by_one(tmp_path: Path) -> None:
    eng = OnnxRuntimeEngine()
    eng.load(model(tmp_path / "dyn.onnx", "batch"), "cpu")
    assert eng.max_batch > 8
    xs = [(f[None, None] / 255.0).astype(np.float32) for f in frames(5)]
    got = eng.submit_batch([{"x": x} for x in xs]).wait()["y"]
    assert got.shape == (5, 3, H, W)
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(got[i : i + 1], eng.run({"x": x})["y"])
    with pytest.raises(EngineError, match="a batch of 70"):
        eng.submit_batch([{"x": xs[0]}] * 70)


class Arrivals:
    """A ``take`` for :meth:`Batcher.gather`: frames that come only to a caller who waits
    (timeout > 0), then the end of the stream."""

    def __init__(self, n: int, skip: tuple[int, ...] = ()) -> None:
        self.n, self.skip, self.i = n, skip, 0

    def __call__(self, timeout: float) -> object:
        if self.i >= self.n:
            raise EndOfStream("closed")
        if timeout <= 0:
            return None
        self.i += 1
        return SKIPPED if self.i in self.skip else self.i


def test_gather_waits_for_more_frames_only_within_its_delay(tmp_path: Path) -> None:
    with Network.open(model(tmp_path / "dyn.onnx", "batch"), engine="onnxruntime") as net:
        now = Batcher[int](net, 4, 0.0)
        assert now.gather(Arrivals(10), wait=1.0) == [1]  # only what is already there
        patient = Batcher[int](net, 4, 60.0)
        arrivals = Arrivals(10, skip=(2,))
        assert patient.gather(arrivals, wait=1.0) == [1, 3, 4]  # 4 read, one refused
        assert patient.gather(arrivals, wait=1.0) == [5, 6, 7, 8]
        assert patient.gather(arrivals, wait=1.0) == [9, 10]  # the stream ends the batch
        with pytest.raises(EndOfStream):
            patient.gather(arrivals, wait=1.0)
        assert now.gather(Arrivals(10), wait=0.0) == []


def test_batch_size_auto_is_eight_on_a_gpu_one_on_a_cpu_and_in_mode_newest() -> None:
    assert batch_size(0, "all", "cuda:1") == batch_size(0, "all", "GPU.0") == GPU_BATCH == 8
    assert batch_size(0, "all", "cpu") == batch_size(16, "newest", "cuda") == 1
    assert batch_size(4, "all", "cpu") == 4
