"""Live networks beyond segmentation (issue 17): the Network runner on real ONNX models
(ONNX Runtime and OpenVINO), and the infer stage between real rings, live from grey
frames: a channel-last classifier, a 3-channel segmentation model with free height and
width, a sequence model, several outputs of one model, a card that does not fit."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon import config, results
from daemon.compat import tomllib
from daemon.engines.card import ModelCard
from daemon.engines.network import Network
from daemon.engines.segmenter import Segmenter
from daemon.errors import ModelError
from daemon.frame import WITHHELD, FrameMeta
from daemon.models import default_model
from daemon.pipeline import InferStage
from daemon.ring import EndOfStream, Ring
from daemon.stage import InputPort, OutputPort, StageSpec, run_stage
from tests import netmodels

pytestmark = pytest.mark.timeout(120)
ENGINES = ("onnxruntime", "openvino")
T = 30.0


def grey(k: int, shape: tuple[int, int]) -> np.ndarray:
    """Grey frame ``k``: a gradient whose slope and level change from frame to frame."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    v = (k * 37 % 200) + 50 * np.sin(xx / (7 + k % 5)) * np.cos(yy / 11)
    return np.clip(v, 0, 255).astype(np.uint8)


# -- the infer stage between real rings ---------------------------------------------------


class Pipe:
    """An InferStage (a thread running ``run_stage``) between a real frames ring and a
    real results ring; frames are written here and every result record read back."""

    def __init__(
        self,
        model: Path,
        engine: str,
        mode: str,
        shape: tuple[int, ...],
        dtype: Any = np.uint8,
        slots: int = 8,
        standby: bool = False,
    ) -> None:
        tag = f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}"
        frame_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.rings = [
            Ring.create(f"{tag}-frames", slots=slots, payload_bytes=frame_bytes),
            Ring.create(f"{tag}-results", slots=slots, payload_bytes=results.capacity(shape)),
        ]
        policy = "block" if mode == "all" else "overwrite"
        spec = StageSpec(
            "infer",
            "infer",
            inputs={"frames": InputPort(self.rings[0].name, mode)},  # type: ignore[arg-type]
            outputs={"results": OutputPort(self.rings[1].name, policy)},  # type: ignore[arg-type]
            params={"frame_shape": shape, "model": str(model), "engine": engine},
        )
        if standby:
            spec.params["standby"] = True
        cfg = config.load(None, {"pipeline.mode": mode, "model.warmup": 1})
        self.reader = self.rings[1].reader("test", "all")  # before any frame: reads them all
        self.writer = self.rings[0].writer(policy)  # type: ignore[arg-type]
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.commands: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=run_stage,
            args=(InferStage, spec, cfg, self.events, self.stop, self.commands),
            daemon=True,
        )
        self.thread.start()
        self.records: list[tuple[FrameMeta, dict[str, np.ndarray]]] = []
        self.collector = threading.Thread(target=self._collect, daemon=True)
        self.collector.start()
        self.info = self.event("ready", "failed")

    def event(self, *kinds: str) -> dict[str, Any]:
        deadline = time.monotonic() + T
        while True:
            e = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if e["event"] in kinds:
                return e

    def write(self, image: np.ndarray, index: int) -> None:
        self.writer.write(image, FrameMeta(index=index), timeout=T)

    def go(self) -> None:
        self.commands.put(("go", "go", {}))

    def _collect(self) -> None:
        """Read every result as it comes (a slow "all" reader would hold the stage)."""
        while not self.stop.is_set():
            try:
                f = self.reader.read(timeout=0.1)
            except EndOfStream:
                return
            if f is None:
                continue
            record = results.unpack(f.image)
            arrays = {o.name: o.array.copy() for o in record.outputs}
            assert f.valid()
            self.records.append((f.meta, arrays))

    def take(self, until: int) -> None:
        """Wait for the result of frame ``until``."""
        deadline = time.monotonic() + T
        while not any(m.index == until for m, _ in self.records):
            assert time.monotonic() < deadline, f"no result of frame {until} within {T} s"
            time.sleep(0.005)

    def finish(self) -> dict[str, Any]:
        """End the stream; every result read, the stage's summary."""
        self.writer.close_stream()
        self.collector.join(T)
        self.thread.join(T)
        return self.event("done")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(T)
        self.collector.join(T)
        for ring in self.rings:
            ring.close()
            ring.unlink()


@contextmanager
def pipe(*args: Any, **kw: Any) -> Iterator[Pipe]:
    p = Pipe(*args, **kw)
    try:
        yield p
    finally:
        p.close()


def run_live(model: Path, engine: str, shape: tuple[int, int], n: int) -> Pipe:
    """``n`` grey frames through the infer stage in mode "all": every one has a result."""
    with pipe(model, engine, "all", shape) as p:
        assert p.info["event"] == "ready", p.info
        for k in range(n):
            p.write(grey(k, shape), k)
        done = p.finish()
        assert done["frames"] == n and done["torn"] == done["rejected"] == 0
        assert [m.index for m, _ in p.records] == list(range(n))
        return p


def test_channel_last_classifier_runs_live_from_grey_frames_on_both_engines(
    tmp_path: Path,
) -> None:
    model = netmodels.classifier(tmp_path / "views.onnx")
    runs = {e: run_live(model, e, (120, 160), 12) for e in ENGINES}
    for engine, p in runs.items():
        info = p.info
        assert info["input"]["shape"] == [None, 240, 240, 3] and info["input"]["layout"] == "NHWC"
        assert info["input_conversion"] == "gray frames replicated to the model's 3 channels"
        (out,) = info["outputs"]
        assert (out["name"], out["role"], len(out["classes"])) == (
            "classification",
            "classification",
            4,
        )
        for meta, rec in p.records:
            probs = rec["classification"]
            assert probs.shape == (4,) and probs.sum() == pytest.approx(1, abs=1e-5)
            assert meta.timings_ms[1:4].min() > 0, engine  # Table 2 timings
    a, b = (np.stack([r["classification"] for _, r in runs[e].records]) for e in ENGINES)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(set(a.argmax(axis=1))) > 1, "the frames are told apart"


def test_three_channel_segmenter_with_free_size_runs_live_from_grey_frames_on_both_engines(
    tmp_path: Path,
) -> None:
    model = netmodels.segmenter(tmp_path / "seg.onnx")
    shape = (100, 130)
    runs = {e: run_live(model, e, shape, 8) for e in ENGINES}
    for p in runs.values():
        assert p.info["input"]["shape"] == [1, 3, None, None]
        assert p.info["input_conversion"] == "gray frames replicated to the model's 3 channels"
        assert [o["role"] for o in p.info["outputs"]] == ["segmentation"]
    a, b = ([r["segmentation"] for _, r in runs[e].records] for e in ENGINES)
    for la, lb in zip(a, b, strict=True):
        assert la.shape == shape and la.dtype == np.uint8
        np.testing.assert_array_equal(la, lb)
    assert set(np.unique(np.stack(a))) == {0, 1}


def window(k: int, s: int = 4) -> list[int]:
    """Frame indices a sequence model must see for frame ``k``: the last ``s``, the first
    frame standing in for those before the stream began."""
    return [max(q, 0) for q in range(k - s + 1, k + 1)]


def check_sequence(records: list[tuple[FrameMeta, dict[str, np.ndarray]]]) -> None:
    for meta, rec in records:
        want = window(meta.index)
        np.testing.assert_array_equal(rec["frames"], want, err_msg=f"frame {meta.index}")
        assert rec["mean"] == pytest.approx([np.mean(want)], abs=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_sequence_model_gets_the_last_frames_in_order_in_mode_all(
    engine: str, layout: str, tmp_path: Path
) -> None:
    model = netmodels.sequence(tmp_path / "seq.onnx", channels_last=layout == "NHWC")
    with pipe(model, engine, "all", (32, 32)) as p:
        assert p.info["event"] == "ready", p.info
        assert p.info["input"]["sequence"] == 4 and p.info["input"]["layout"] == layout
        for k in range(30):  # the ring has 8 slots: the writer runs ahead of the stage
            p.write(np.full((32, 32), k, np.uint8), k)
        done = p.finish()
    assert done["frames"] == 30 and done["torn"] == 0
    assert [m.index for m, _ in p.records] == list(range(30))
    check_sequence(p.records)


def test_a_sequence_model_gets_the_last_frames_in_order_in_mode_newest(tmp_path: Path) -> None:
    model = netmodels.sequence(tmp_path / "seq.onnx")
    with pipe(model, "onnxruntime", "newest", (32, 32), standby=True) as p:
        assert p.info["event"] == "ready", p.info
        for k in range(10):  # before the stage reads: it starts at the newest, frame 9
            p.write(np.full((32, 32), k, np.uint8), k)
        p.go()
        p.take(until=9)
        k = 10
        for _ in range(5):  # bursts: the stage jumps to the newest, its window from the ring
            for _ in range(3):
                p.write(np.full((32, 32), k, np.uint8), k)
                k += 1
            p.take(until=k - 1)
        done = p.finish()
    indices = [m.index for m, _ in p.records]
    assert indices[0] == 9, "frames 6..8 were never read, yet are in its window"
    check_sequence(p.records)
    assert done["frames"] == len(p.records)


def test_a_sequence_needs_a_frames_ring_larger_than_its_window(tmp_path: Path) -> None:
    model = netmodels.sequence(tmp_path / "seq.onnx")
    with pipe(model, "onnxruntime", "all", (32, 32), slots=5) as p:
        assert p.info["event"] == "failed"
        error = p.info["error"]
        assert error["code"] == "config", error
        assert error["message"] == (
            "model seq.onnx takes the last 4 frames: the frames ring needs more than 5 slots "
            "and has pipeline.ring_slots = 5; set it to 6 or more"
        )


# -- the Network itself ----------------------------------------------------------------


MULTITASK = """
[[outputs]]
tensor = "seg"
role = "segmentation"
classes = [{ name = "dark", colour = [0, 0, 0], opacity = 0.0 },
           { name = "bright", colour = [255, 0, 0] }]

[[outputs]]
tensor = "seg"
role = "confidence"

[[outputs]]
tensor = "view"
role = "classification"
activation = "none"
classes = [{ name = "a", colour = [255, 0, 0] }, { name = "b", colour = [0, 255, 0] },
           { name = "c", colour = [0, 0, 255] }]

[[outputs]]
tensor = "boxes"
role = "detection"
threshold = 0.5

[[outputs]]
tensor = "tip"
role = "keypoints"
names = ["needle tip"]

[[outputs]]
tensor = "depth"
role = "regression"
names = ["mean level"]
units = ["%"]
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_multi_task_model_gives_every_role(engine: str, tmp_path: Path) -> None:
    model = netmodels.multitask(tmp_path / "multi.onnx", MULTITASK)
    with Network.open(model, engine=engine) as net:
        frame = np.zeros((128, 96), np.uint8)  # 64x64 network input: x 1.5, y 2
        frame[:, 48:] = 255
        x = net.prepare(frame)
        outputs, verdict = net.finish(net.result(net.submit(x)), frame.shape, x)
        described = net.describe()
    assert verdict.confident
    got = {o.name: o for o in outputs}
    assert [(o.name, o.role) for o in outputs] == [
        ("seg", "segmentation"),
        ("seg-2", "confidence"),
        ("view", "classification"),
        ("boxes", "detection"),
        ("tip", "keypoints"),
        ("depth", "regression"),
    ]
    assert [o["name"] for o in described["outputs"]] == list(got)
    assert described["classes"][1]["name"] == "bright"
    assert described["outputs"][5]["units"] == ["%"]
    lab = got["seg"].array
    assert lab.shape == (128, 96) and (lab[:, :46] == 0).all() and (lab[:, 50:] == 1).all()
    assert got["seg-2"].array.shape == (2, 128, 96) and got["seg-2"].array.dtype == np.float16
    level = float(got["depth"].array[0])  # the input's mean
    assert level == pytest.approx(0.5, abs=1e-2)
    e = np.exp(np.array([2.0, 0.0, -2.0]) * level)  # view logits: (2, 0, -2) x mean level
    np.testing.assert_allclose(got["view"].array, e / e.sum(), rtol=1e-5)
    boxes = got["boxes"].array  # network boxes scoring >= 0.5, best first, x 1.5 / x 2
    scale = np.array([1.5, 2, 1.5, 2])
    network = np.array([[8, 8, 24, 24], [10, 10, 26, 26], [0, 0, 64, 64]])
    edges = np.array([95.5, 127.5, 95.5, 127.5])  # the frame's right and bottom edges
    np.testing.assert_allclose(boxes[:, :4], np.minimum((network + 0.5) * scale - 0.5, edges))
    np.testing.assert_allclose(boxes[:, 4:], [[0.9, 1], [0.8, 1], [0.6, 2]], rtol=1e-6)
    tip = got["tip"].array  # heatmap 16x16 over 64x64: x 4, then x 1.5 / x 2 (from edges)
    np.testing.assert_allclose(tip[0, :2], [5.3 * 4 * 1.5 - 0.5, 9.6 * 4 * 2 - 0.5], atol=1e-3)
    back = results.unpack(results.pack(outputs))  # what the ring carries, read back
    assert [(o.name, o.role) for o in back.outputs] == [(o.name, o.role) for o in outputs]
    np.testing.assert_array_equal(back.labels, lab)


def test_guard_withholds_an_unsure_classification(tmp_path: Path) -> None:
    card = MULTITASK + "\n[guard]\nmin_confidence = 0.9\n"
    model = netmodels.multitask(tmp_path / "multi.onnx", card)
    with Network.open(model, engine="onnxruntime") as net:
        frame = np.full((64, 64), 255, np.uint8)  # view logits (2, 0, -2): top p = 0.87
        x = net.prepare(frame)
        outputs, verdict = net.finish(net.infer(x), frame.shape, x)
    assert not verdict.confident
    assert verdict.reason == "low class confidence 0.867 < 0.900 (view)"
    assert verdict.confidence == pytest.approx(0.8668, abs=1e-4)
    assert not outputs[0].array.any(), "a withheld frame's label map is blanked"


def test_the_segmentation_guard_judges_as_the_segmenter_does() -> None:
    from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource

    source = SyntheticSource(SyntheticSettings(loop_s=0.5))
    model = default_model()
    with (
        Network.open(model, engine="onnxruntime") as net,
        Segmenter.open(model, engine="onnxruntime") as seg,
    ):
        assert net.guard is not None
        for i, frame in enumerate(source.frames()):
            if i == 4:
                break
            image = frame.image
            noise = np.random.default_rng(i).integers(0, 255, image.shape, np.uint8)
            for img in (image, noise):  # in and out of the training domain
                x = net.prepare(img)
                outputs, verdict = net.finish(net.infer(x), img.shape, x)
                labels, want = seg.segment_guarded(img)
                assert verdict == want
                np.testing.assert_array_equal(outputs[0].array, labels)


def test_roles_are_guessed_for_a_model_without_a_card(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = netmodels.multitask(tmp_path / "multi.onnx", MULTITASK)
    model.with_suffix(".toml").unlink()
    with caplog.at_level(logging.WARNING), Network.open(model, engine="onnxruntime") as net:
        roles = [(h.spec.name, h.role.role) for h in net.heads]
    assert roles == [
        ("seg", "segmentation"),
        ("view", "classification"),
        ("boxes", "detection"),
        ("tip", "segmentation"),
        ("depth", "regression"),
    ]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "daemon.engines.network"]
    assert line.startswith("model multi.onnx has no model card: output roles guessed from")
    assert "'view' (1, 3) -> classification" in line
    # the card lines the warning gives are a valid card that says the same
    text = line.split("put in ")[1].split(": ", 1)[1]
    card = ModelCard.model_validate(tomllib.loads(text))
    assert [(o.tensor, o.role) for o in card.outputs] == roles


def test_a_card_role_that_does_not_fit_the_output_is_one_line(tmp_path: Path) -> None:
    card = 'task = "classification"\n[[outputs]]\ntensor = "probs"\nrole = "detection"\n'
    model = netmodels.classifier(tmp_path / "views.onnx", card)
    with pytest.raises(ModelError) as e:
        Network.open(model, engine="onnxruntime")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        "model views.onnx output 'probs' (?, 4) cannot be role detection: it needs (1, N, 6) "
        'x1 y1 x2 y2 score class (format "boxes"); fix its [[outputs]] entry in '
    )


def test_withheld_flag_travels_in_the_result_meta(tmp_path: Path) -> None:
    card = MULTITASK + "\n[guard]\nmin_confidence = 0.9\n"
    model = netmodels.multitask(tmp_path / "multi.onnx", card)
    with pipe(model, "onnxruntime", "all", (64, 64)) as p:
        p.write(np.full((64, 64), 255, np.uint8), 0)
        done = p.finish()
    ((meta, rec),) = p.records
    assert meta.flags & WITHHELD and done["withheld"] == 1
    assert meta.confidence == pytest.approx(0.8668, abs=1e-4)
    assert not rec["seg"].any() and rec["view"].argmax() == 0


def test_a_card_that_pads_is_prepared_on_the_cpu_not_stretched_by_opencl(tmp_path: Path) -> None:
    from daemon.engines import opencl, preprocess

    if opencl.probe()[0] is None:
        pytest.skip("no OpenCL device here")
    card = f'[input]\nmultiple = 32\naspect = "keep"\n{netmodels.IMAGENET}'
    model = netmodels.segmenter(tmp_path / "seg.onnx", card)
    frame = grey(3, (100, 130))
    with Segmenter.open(model, engine="onnxruntime", preprocess="opencl") as seg:
        x = seg.prepare(frame)
        assert x.shape == (1, 3, 128, 160)
        np.testing.assert_array_equal(x, preprocess.prepare(frame, seg.input, seg.card))
        assert seg.prepare_info == (
            "cpu",
            "the OpenCL kernel stretches; this card pads (aspect keep or fit pad)",
        )
