"""``echod models calibrate MODEL``: the precision ladder of a 2-D or 3-D segmentation,
classification or keypoint model (what its first output is).

On each engine here that loads the model on the device (or those named) the model
runs at f32, at the reduced float precisions the engine offers there (OpenVINO: bf16 /
f16 where the device reports them; PyTorch: the model cast to fp16 and bf16 on CUDA,
bf16 on the CPU; TensorRT: its fp16 / bf16 builder flags) and at int8 (OpenVINO: NNCF
post-training quantization, when ``nncf`` is installed; ONNX Runtime:
``onnxruntime.quantization`` static QDQ quantization; TensorRT: the same quantizer,
symmetric, whose Q/DQ nodes TensorRT builds as int8 layers). A variant the engine refuses
here is skipped with its reason; int8 files go beside the model, in ``STEM.int8/``.
Every variant runs the same validation frames: simulator frames with ground truth
(``--data phantom``: held-out seeds of the model's own simulator, :func:`phantom`; the
quantizers calibrate on other seeds) or a recording's frames (no ground truth). A 3-D
model's "frames" are CT patches of the ct job's default size (32 x 512 x 512 voxels),
each prepared and finished as the ct job does (:class:`Patches`: resized to the network
and back, the argmax at the patch's size): phantom slabs with their nodules, or the
patches of a CT volume (``--data SERIES``). Written to the card's ``[precision]``:

- ``drop``: with ground truth, the largest per-class loss in mean Dice against f32's
  (per frame; a 3-D model's per patch, in 3-D); without, the largest per-class
  ``1 - Dice(variant labels, f32 labels)``. A
  classifier's: the loss in top-1 accuracy against f32's; without ground truth, the
  share of frames whose top-1 class differs from f32's.
- ``agreement``: per class, the mean Dice of the variant's labels against f32's; a
  classifier's, the share of the frames f32 puts in the class that the variant does; a
  keypoint model's, per point, the share of frames where both show it at the same
  place or neither does (:func:`compare_points`, whose drop counts frames gained wrong).
- ``fps``: frames/s in mode "all" (every request in flight; a 3-D model's: patches/s),
  the best of ``rounds`` rounds with the variants interleaved (a shared machine's load
  hits them alike).

Rows of other engines and devices already in the card are kept (with the frames and
machine they were measured on): a model calibrated on the CPU, then on a GPU, has both.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.compat import tomllib
from daemon.engines import registry
from daemon.engines.base import device_kind
from daemon.engines.card import (
    MeasuredPrecision,
    ModelCard,
    PrecisionCard,
    card_path,
    load_card,
    without_precision,
)
from daemon.engines.network import Network
from daemon.engines.precision import unit
from daemon.engines.segmenter import Segmenter
from daemon.errors import EngineError, ModelError
from daemon.models import CT, NEEDLE, VIEW, WSI
from daemon.offline import ct, tiling


class Patches:
    """A 3-D segmentation model run on CT patches as the ct job runs it (its default
    options): HU resized to the network, clipped and scaled; the output resized back to
    the patch; the label volume its argmax."""

    def __init__(self, seg: Segmenter) -> None:
        self.seg, self.engine, self.input, self.output = seg, seg.engine, seg.input, seg.output
        self.net = ct.Network(seg, ct.CtOptions(), tiling.Timings())
        self.classes = self.net.classes

    def prepare(self, hu: np.ndarray) -> np.ndarray:
        return self.net.prepare(hu[None].astype(np.float32, copy=False))

    def finish(self, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return ct.label_map(self.net.finish(self.net.channels_first(y))[0])

    def close(self) -> None:
        self.seg.close()


Runner = Segmenter | Network | Patches
ROLES = ("segmentation", "classification", "keypoints")
POINT_PX = 2.0
"""Keypoints of two precisions within this many frame pixels are the same point."""
POINT_MM = 2.0
"""A keypoint within this distance (mm) of the true one is found (the needle card's gate)."""

log = logging.getLogger(__name__)

VAL_SEED0 = 500_000  # held-out simulator seeds (as the training script's calibrate)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# the WSI classifier's held-out seeds and patch side (daemon/models/train/wsi.py, which
# imports torch: not imported here)
WSI_SEED0, WSI_PATCH = 70_000, 512
QUANT_SEED0 = 700_000  # seeds the quantizers calibrate on (never validated on)
# the CT model's held-out slabs (daemon/models/train/ct.py, which imports torch)
CT_SEED0 = 50_000
FRAMES = 300  # validation frames by default (a 3-D model's: patches, default_frames)


@dataclass(frozen=True)
class Frames:
    """Validation images, their ground truth (None for a recording) and what they are;
    ``calibration``: images the quantizers may look at."""

    images: list[np.ndarray]
    truth: list[Any] | None  # label maps, or a classifier's classes
    calibration: list[np.ndarray]
    text: str


@dataclass(frozen=True)
class Variant:
    engine: str
    precision: str  # fp32, bf16, fp16, int8
    file: Path


def phantom_frames(n: int, n_calibration: int) -> Frames:
    """``n`` held-out simulator frames with labels, ``n_calibration`` others to quantize on."""
    from daemon.phantoms.ultrasound import example

    val = [example(s) for s in range(VAL_SEED0, VAL_SEED0 + n)]
    cal = [example(s).image for s in range(QUANT_SEED0, QUANT_SEED0 + n_calibration)]
    text = f"{n} simulated frames, seeds {VAL_SEED0}-{VAL_SEED0 + n - 1} (ultrasound phantom)"
    return Frames([e.image for e in val], [e.labels for e in val], cal, text)


def view_frames(n: int, n_calibration: int) -> Frames:
    """``n`` held-out frames of the view classifier's simulator with their class (frames
    with a vessel only partly in view belong to neither and are left out), and
    ``n_calibration`` others to quantize on."""
    from daemon.models.cards import VIEW_SIZE
    from daemon.models.train.view import VAL_SEED0 as VIEW_SEED0
    from daemon.phantoms.us_tasks import view_example

    images: list[np.ndarray] = []
    truth: list[int] = []
    seed = VIEW_SEED0
    while len(images) < n:
        ex = view_example(seed, VIEW_SIZE)
        if ex.truth.view is not None:
            images.append(ex.image)
            truth.append(ex.truth.view)
        seed += 1
    seeds = range(QUANT_SEED0, QUANT_SEED0 + n_calibration)
    cal = [view_example(s, VIEW_SIZE).image for s in seeds]
    text = f"{n} simulated frames, seeds {VIEW_SEED0}-{seed - 1} (view phantom, classified)"
    return Frames(images, truth, cal, text)


def needle_frames(n: int, n_calibration: int) -> Frames:
    """``n`` held-out frames of the needle model's simulator with their truth (the tip in
    pixels or None, the spacing), and ``n_calibration`` others to quantize on."""
    from daemon.models.cards import NEEDLE_SIZE
    from daemon.models.train.needle import VAL_SEED0 as NEEDLE_SEED0
    from daemon.phantoms.us_tasks import needle_example

    held = [needle_example(s, NEEDLE_SIZE) for s in range(NEEDLE_SEED0, NEEDLE_SEED0 + n)]
    seeds = range(QUANT_SEED0, QUANT_SEED0 + n_calibration)
    cal = [needle_example(s, NEEDLE_SIZE).image for s in seeds]
    truth = [(e.truth.tip, e.truth.spacing) for e in held]
    text = f"{n} simulated frames, seeds {NEEDLE_SEED0}-{NEEDLE_SEED0 + n - 1} (needle phantom)"
    return Frames([e.image for e in held], truth, cal, text)


def patch_frames(n: int, n_calibration: int) -> Frames:
    """About ``n`` held-out tissue-phantom patches, as many of each class (their truth),
    and ``n_calibration`` others to quantize on (the WSI patch classifier's)."""
    from daemon.phantoms.wsi import CLASSES, tissue_patch

    k, size = len(CLASSES), WSI_PATCH
    per = max(1, n // k)
    held = [(c, WSI_SEED0 + c * per + i) for c in range(k) for i in range(per)]
    cal = [tissue_patch(i % k, QUANT_SEED0 + i, size) for i in range(n_calibration)]
    text = f"{len(held)} tissue-phantom patches ({per} per class), seeds {WSI_SEED0}+"
    return Frames([tissue_patch(c, s, size) for c, s in held], [c for c, _ in held], cal, text)


def ct_frames(n: int, n_calibration: int) -> Frames:
    """``n`` held-out CT phantom slabs of the ct job's patch with their nodules, drawn as
    the CT model's training slabs were, and ``n_calibration`` others to quantize on."""
    from daemon.phantoms.ct import training_slab

    patch = ct.CtOptions().patch
    held = [training_slab(s, patch) for s in range(CT_SEED0, CT_SEED0 + n)]
    cal = [training_slab(s, patch).hu for s in range(QUANT_SEED0, QUANT_SEED0 + n_calibration)]
    shape = "x".join(map(str, patch))
    text = f"{n} CT phantom slabs of {shape}, seeds {CT_SEED0}-{CT_SEED0 + n - 1}"
    return Frames([v.hu for v in held], [v.labels for v in held], cal, text)


def default_frames(model: Path) -> int:
    """Validation frames by default: 300, a 3-D model's 24 patches (about a second each
    at f32 on two cores)."""
    return 24 if load_card(model).input.volumetric else FRAMES


_SIMULATED = {
    Path(VIEW).stem: view_frames,
    Path(NEEDLE).stem: needle_frames,
    Path(WSI).stem: patch_frames,
    Path(CT).stem: ct_frames,
}  # the bundled models by stem (a .pt2 made from one has its simulator too)


def phantom(model: Path, n: int, n_calibration: int) -> Frames:
    """Simulator frames for ``model``: the bundled view, needle-tip, WSI patch and CT
    models' own simulators; the ultrasound phantom for any other 2-D segmentation model.
    Any other model needs data of its own domain (a 3-D one's classes are not the CT
    phantom's nodules: measured against them, it would look perfect)."""
    card = load_card(model)
    name, role = Path(model).name, card.roles()[0].role
    if (frames := _SIMULATED.get(Path(model).stem)) is not None:
        return frames(n, n_calibration)
    if role == "segmentation" and not card.input.volumetric:
        return phantom_frames(n, n_calibration)
    what = "a CT volume" if card.input.volumetric else "a recording"
    raise ModelError(
        f"model {name}: no simulator here makes frames for its {role} output; "
        f"calibrate it on {what} of its own domain: --data FILE"
    )


def recording_frames(path: Path, n: int) -> Frames:
    """Up to ``n`` frames of a recording (every other one validates, the rest calibrate)."""
    from daemon.acquire import open_source

    source = open_source(str(path))
    try:
        images = [f.image.copy() for _, f in zip(range(2 * n), source.frames(), strict=False)]
    finally:
        source.close()
    val, cal = images[::2], images[1::2] or images[:1]
    return Frames(val, None, cal, f"{len(val)} frames of {path.name} (no ground truth)")


def volume_frames(path: Path, n: int) -> Frames:
    """Up to ``n`` patches of a CT volume (DICOM series, NIfTI, MetaImage) cut as the ct
    job cuts them (every other one validates, the rest calibrate)."""
    from daemon.offline import volumes

    options = ct.CtOptions()
    hu = volumes.read(path, None).hu
    positions = tiling.grid(hu.shape, options.patch, options.overlap)[: 2 * n]
    pad = ct.PAD_HU[options.pad]
    patches = [tiling.extract(hu, p, options.patch, pad) for p in positions]
    val, cal = patches[::2], patches[1::2] or patches[:1]
    return Frames(val, None, cal, f"{len(val)} patches of {path.name} (no ground truth)")


def data_frames(model: Path, path: Path, n: int) -> Frames:
    """``--data PATH``: a CT volume's patches for a 3-D model, else a recording's frames."""
    volumetric = load_card(model).input.volumetric
    return volume_frames(path, n) if volumetric else recording_frames(path, n)


def _quantize_openvino(model: Path, inputs: list[np.ndarray], out: Path) -> Path | None:
    try:
        import nncf
    except ImportError as exc:
        log.warning("openvino int8 skipped: nncf is not installed (pip install nncf): %s", exc)
        return None
    import openvino as ov

    net = ov.Core().read_model(str(model))
    quantized = nncf.quantize(net, nncf.Dataset(inputs), subset_size=len(inputs))
    target = out / "openvino.xml"
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return target


_FLOAT_OPS = {"Softmax", "Sigmoid"}
"""Left in float by the ONNX quantizer: an output's probabilities in 8 bits come in steps
of 1/255 and no longer sum to 1 (the guard's confidence, a classifier's results)."""


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over prepared inputs."""

    def __init__(self, name: str, inputs: list[np.ndarray]):
        self._it: Iterator[np.ndarray] = iter(inputs)
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}


def _quantize_qdq(
    model: Path, name: str, inputs: list[np.ndarray], out: Path, engine: str
) -> Path | None:
    """Static post-training quantization to a QDQ ONNX file (``onnxruntime.quantization``),
    calibrated on ``inputs``. For TensorRT the activations are signed and both they and
    the weights symmetric (zero points 0): TensorRT quantizes only so, and builds the Q/DQ
    nodes as int8 layers (explicit quantization)."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        log.warning("%s int8 skipped: no onnxruntime (its quantizer): %s", engine, exc)
        return None
    import onnx

    symmetric = engine == "tensorrt"
    target = out / f"{engine}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        ops = {n.op_type for n in onnx.load(str(pre), load_external_data=False).graph.node}
        quantize_static(
            str(pre),
            str(target),
            _Reader(name, inputs),  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted(ops - _FLOAT_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}
            if symmetric
            else {},
        )
    return target


def _reduced(engine: str, device: str) -> list[str]:
    """Float precisions below f32 the engine offers on ``device`` here."""
    if engine == "openvino":
        import openvino as ov

        caps = set(ov.Core().get_property(device.upper(), "OPTIMIZATION_CAPABILITIES"))
        return [p for p, cap in (("bf16", "BF16"), ("fp16", "FP16")) if cap in caps]
    if engine == "pytorch":
        return ["fp16", "bf16"] if device_kind(device) == "cuda" else ["bf16"]
    if engine == "tensorrt":
        return ["fp16", "bf16"]
    return []


def usable_engines(model: Path, device: str, named: Iterable[str] = ()) -> list[str]:
    """The engines to calibrate ``model`` on ``device`` with: those ``named`` (default:
    every registered engine) that are usable here, know the device and load the file."""
    found = []
    for name in named or registry.preference(device):
        if why := registry.unfit(name, device, model):
            (log.warning if named else log.debug)("%s skipped: %s", name, why)
        else:
            found.append(name)
    return found


def variants(
    model: Path, engines: Iterable[str], device: str, inputs: list[np.ndarray], input_name: str
) -> list[Variant]:
    """Every (engine, precision, file) to measure; int8 files are made here."""
    out = card_path(model).parent / f"{model.stem}.int8"
    found: list[Variant] = []
    for engine in engines:
        found += [Variant(engine, p, model) for p in ("fp32", *_reduced(engine, device))]
        if engine not in ("openvino", "onnxruntime", "tensorrt"):
            continue  # no int8 quantizer here for this engine
        out.mkdir(exist_ok=True)
        if engine == "openvino":
            q = _quantize_openvino(model, inputs, out)
        else:
            q = _quantize_qdq(model, input_name, inputs, out, engine)
        if q is not None:
            found.append(Variant(engine, "int8", q))
    return found


def _open(v: Variant, card: ModelCard, model: Path, device: str) -> Runner | None:
    """The variant loaded, or None (logged) where the engine refuses it here."""
    eng = registry.engine_class(v.engine)()
    option = "fp32" if v.precision == "int8" else v.precision
    try:
        eng.load(v.file, device, precision=option, mode="all")
    except EngineError as exc:
        if v.precision == "fp32":
            raise
        log.warning("%s %s skipped: %s", v.engine, v.precision, exc)
        return None
    segments = card.roles()[0].role == "segmentation"
    return _runner(Segmenter(eng, card, model) if segments else Network(eng, card, model))


def _runner(opened: Segmenter | Network) -> Runner:
    """What runs the frames: a 3-D segmentation model through the ct job's steps."""
    if isinstance(opened, Segmenter) and opened.card.input.volumetric:
        try:
            return Patches(opened)
        except BaseException:
            opened.close()
            raise
    return opened


def _names(runner: Runner) -> list[str]:
    """A segmentation's label names, a classifier's classes, a keypoint model's points."""
    if not isinstance(runner, Network):
        return [c.name for c in runner.classes]
    head = runner.heads[0]
    return list(head.names) if head.role.role == "keypoints" else [c.name for c in head.classes]


def _labels(runner: Runner, xs: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[Any]:
    """Per frame: a segmentation's label map, a classifier's top-1 class, a keypoint
    model's (K, 3) points (x y in frame pixels, NaN where none is shown; score)."""
    outs = runner.engine.run_many({runner.input.name: x} for x in xs)
    if not isinstance(runner, Network):
        return [runner.finish(y[runner.output.name], s) for y, s in zip(outs, shapes, strict=True)]
    found = []
    for x, y, s in zip(xs, outs, shapes, strict=True):
        first = runner.finish(y, s, x)[0][0]
        found.append(int(np.argmax(first.array)) if first.role == "classification" else first.array)
    return found


def _fps(seg: Runner, xs: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for _ in seg.engine.run_many({seg.input.name: x} for x in xs):
        pass
    return len(xs) / (time.perf_counter() - t0)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    p, t = a == label, b == label
    return 2.0 * float((p & t).sum()) / max(1, int(p.sum() + t.sum()))


def _mean_dice(pred: list[Any], ref: list[Any], label: int, by: list[Any]) -> float:
    """Mean Dice of ``pred`` against ``ref`` over the frames where ``by`` has the class."""
    frames = [i for i in range(len(ref)) if (by[i] == label).any()]
    return float(np.mean([dice(pred[i], ref[i], label) for i in frames])) if frames else 1.0


def compare(
    names: list[str], pred: list[Any], f32: list[Any], truth: list[Any] | None
) -> tuple[float, dict[str, float]]:
    """(drop, agreement per class name) of ``pred`` against the f32 labels ``f32``."""
    agreement, drops = {}, []
    for label, name in enumerate(names[1:], start=1):
        either = [(p == label) | (f == label) for p, f in zip(pred, f32, strict=True)]
        agreement[name] = round(_mean_dice(pred, f32, label, [e * label for e in either]), 5)
        if truth is None:
            drops.append(1.0 - agreement[name])
        else:
            drops.append(
                _mean_dice(f32, truth, label, truth) - _mean_dice(pred, truth, label, truth)
            )
    return round(max(0.0, *drops), 5), agreement


def compare_top1(
    names: list[str], pred: list[int], f32: list[int], truth: list[int] | None
) -> tuple[float, dict[str, float]]:
    """(drop, agreement per class name) of a classifier's top-1 classes ``pred`` against
    f32's (module docstring)."""
    p, f = np.asarray(pred), np.asarray(f32)
    agreement = {
        name: round(float((p[f == k] == k).mean()), 5) if (f == k).any() else 1.0
        for k, name in enumerate(names)
    }
    if truth is None:
        drop = float((p != f).mean())
    else:
        t = np.asarray(truth)
        drop = float((f == t).mean() - (p == t).mean())
    return round(max(0.0, drop), 5), agreement


def compare_points(
    names: list[str], pred: list[np.ndarray], f32: list[np.ndarray], truth: list[Any] | None
) -> tuple[float, dict[str, float]]:
    """(drop, agreement per point name) of a keypoint model's (K, 3) points against f32's:
    per point, the share of frames where both show none, or both show it within
    :data:`POINT_PX` frame pixels. The drop: without ground truth, 1 - the lowest
    agreement; with it (per frame ``(true point or None, spacing (rows, columns))``, the
    first point), the share of frames gained wrong against f32's: a point shown where
    there is none, none where there is one, or one farther than :data:`POINT_MM`."""
    agreement = {}
    for k, name in enumerate(names):
        same = [_same_point(p[k, :2], f[k, :2]) for p, f in zip(pred, f32, strict=True)]
        agreement[name] = round(float(np.mean(same)), 5)
    if truth is None:
        return round(1.0 - min(agreement.values()), 5), agreement
    right = [[_right(p[0, :2], t) for p, t in zip(run, truth, strict=True)] for run in (pred, f32)]
    drop = float(np.mean(right[1]) - np.mean(right[0]))
    return round(max(0.0, drop), 5), agreement


def _same_point(a: np.ndarray, b: np.ndarray) -> bool:
    shown_a, shown_b = not np.isnan(a).any(), not np.isnan(b).any()
    if shown_a != shown_b:
        return False
    return not shown_a or float(np.hypot(*(a - b))) <= POINT_PX


def _right(found: np.ndarray, truth: tuple[Any, tuple[float, float]]) -> bool:
    tip, spacing = truth
    if np.isnan(found).any():
        return tip is None
    if tip is None:
        return False
    dx, dy = (found[0] - tip[0]) * spacing[1], (found[1] - tip[1]) * spacing[0]
    return float(np.hypot(dx, dy)) <= POINT_MM


def machine(device: str = "cpu") -> str:
    """The CPU model and core count, and the device where it is not the CPU."""
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    where = f"{cpu}, {os.cpu_count()} cores"
    return where if device_kind(device) == "cpu" else f"{where}; {device}"


def calibrate(
    model: Path,
    frames: Frames,
    engines: Iterable[str] = (),
    device: str = "cpu",
    rounds: int = 3,
    tolerance: float | None = None,
) -> PrecisionCard:
    """Measure every variant on ``frames`` with ``engines`` (default: every engine that
    runs the model on ``device`` here) and write the card's ``[precision]``."""
    model = Path(model)
    card = load_card(model)
    role = card.roles()[0].role
    if role not in ROLES:
        raise ModelError(
            f"model {model.name}: calibrate measures {', '.join(ROLES)} models, "
            f"not {role} (its first output)"
        )
    usable = usable_engines(model, device, engines)
    if not usable:
        raise EngineError(
            f"no engine here runs {model.name} on {device}"
            + (f" (asked for {', '.join(engines)})" if engines else "")
            + ": echod engines says why"
        )
    kind = Segmenter if role == "segmentation" else Network
    ref = _runner(kind.open(model, engine=usable[0], device=device, precision="fp32"))
    try:
        xs = [ref.prepare(im) for im in frames.images]
        cal = [ref.prepare(im) for im in frames.calibration]
        name, names = ref.input.name, _names(ref)
    finally:
        ref.close()
    measure = {"segmentation": compare, "classification": compare_top1}.get(role, compare_points)
    shapes = [im.shape for im in frames.images]
    segs: dict[Variant, Runner] = {}
    try:
        for v in variants(model, usable, device, cal, name):
            if (seg := _open(v, card, model, device)) is not None:
                segs[v] = seg
        labels = {v: _labels(s, xs, shapes) for v, s in segs.items()}
        fps = dict.fromkeys(segs, 0.0)
        for _ in range(rounds):  # interleaved: load on a shared machine hits all alike
            for v, s in segs.items():
                fps[v] = max(fps[v], _fps(s, xs))
    finally:
        for s in segs.values():
            s.close()
    rows = []
    for v in segs:
        f32 = labels[Variant(v.engine, "fp32", model)]
        drop, agreement = measure(names, labels[v], f32, frames.truth)
        rel = v.file.relative_to(card_path(model).parent).as_posix() if v.file != model else ""
        rows.append(
            MeasuredPrecision(
                engine=v.engine,
                device=device_kind(device),
                precision=v.precision,
                file=rel,
                drop=drop,
                fps=round(fps[v], 1),
                agreement=agreement,
            )
        )
        log.info(
            "%s %s: drop %.4f, %.1f %s/s, agreement %s",
            v.engine, v.precision, drop, fps[v], unit(card), agreement,
        )  # fmt: skip
    old = card.precision.tolerance if card.precision else 0.01
    result = PrecisionCard(
        tolerance=old if tolerance is None else tolerance,
        data=frames.text,
        machine=machine(device),
        measured=(*_kept(card.precision, rows), *rows),
    )
    write_precision(model, result)
    return result


def _kept(old: PrecisionCard | None, new: list[MeasuredPrecision]) -> list[MeasuredPrecision]:
    """The rows of ``old`` for engines and devices not measured again, each naming the
    frames and machine it was measured on."""
    if old is None:
        return []
    again = {(m.engine, m.device) for m in new}
    return [
        m.model_copy(update={"data": m.data or old.data, "machine": m.machine or old.machine})
        for m in old.measured
        if (m.engine, m.device) not in again
    ]


# -- the card's [precision] section, rewritten in place -------------------------------------


def _value(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def _key(k: str) -> str:
    """A TOML key: bare where TOML allows it (``artery``), else quoted (``"no vessels"``)."""
    return k if _BARE_KEY.fullmatch(k) else _value(k)


def render(p: PrecisionCard) -> str:
    lines = [
        "[precision]",
        '# written by echod models calibrate: precision = "auto" runs the fastest within tolerance',
        f"tolerance = {p.tolerance!r}",
        f"data = {_value(p.data)}",
        f"machine = {_value(p.machine)}",
    ]
    for m in p.measured:
        lines += ["", "[[precision.measured]]"]
        unset = {k for k in ("data", "machine") if not getattr(m, k)}  # the card's
        row = m.model_dump(mode="json", exclude=unset)
        lines += [f"{k} = {_value(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


def write_precision(model: Path, p: PrecisionCard) -> None:
    """Replace the card's ``[precision]`` tables (kept elsewhere as they are) and check it."""
    path = card_path(model)
    body = without_precision(path.read_text()).rstrip("\n") if path.is_file() else ""
    new = (body + "\n\n" if body else "") + render(p)
    ModelCard.model_validate(tomllib.loads(new))  # never write a card echod cannot read
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(new)
    tmp.replace(path)
    log.info("wrote [precision] of %s", path)
