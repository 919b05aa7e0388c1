"""The precision ladder: calibration into the card, and ``precision = "auto"`` choosing from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.compat import tomllib
from daemon.engines import registry
from daemon.engines.card import MeasuredPrecision, PrecisionCard, load_card
from daemon.engines.precision import choose
from daemon.engines.segmenter import Segmenter
from daemon.errors import EngineError, ModelError
from daemon.models import calibrate
from daemon.models.train.evaluation import real_recordings
from tests.conftest import need_data

ROOT = Path(__file__).resolve().parent.parent
ORT = pytest.mark.skipif(
    not registry.probe("onnxruntime").available, reason="onnxruntime is not installed"
)

CARD = """\
    # a hand-written comment that calibration keeps
    task = "segmentation"

    [input]
    size = [64, 64]

    [[classes]]
    name = "background"
    colour = [0, 0, 0]

    [[classes]]
    name = "dark"
    colour = [0, 0, 255]

    [[classes]]
    name = "bright"
    colour = [255, 0, 0]
"""


def tiny_model(path: Path) -> Path:
    """64x64 gray in, 3 classes out: background mid-grey, 'dark' below, 'bright' above."""
    w = np.array([[[[0.0]]], [[[-8.0]]], [[[8.0]]]], np.float32)
    b = np.array([0.0, 2.4, -5.6], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)
    path.with_suffix(".toml").write_text(textwrap.dedent(CARD))
    return path


def bundled_copy(tmp_path: Path, name: str) -> Path:
    """A bundled model and its card copied where calibration may write."""
    from daemon.models import BUNDLED

    model = tmp_path / name
    shutil.copy(BUNDLED / name, model)
    shutil.copy((BUNDLED / name).with_suffix(".toml"), model.with_suffix(".toml"))
    return model


def row(precision: str, drop: float, fps: float, file: str = "", engine: str = "openvino"):
    return MeasuredPrecision(
        engine=engine, device="cpu", precision=precision, file=file, drop=drop, fps=fps
    )


def card_with(tmp_path: Path, *rows: MeasuredPrecision):
    model = tiny_model(tmp_path / "m.onnx")
    calibrate.write_precision(model, PrecisionCard(tolerance=0.01, measured=rows))
    return model, load_card(model)


def test_auto_picks_the_fastest_within_tolerance(tmp_path: Path) -> None:
    (tmp_path / "m.int8").mkdir()
    (tmp_path / "m.int8" / "openvino.xml").write_text("")
    model, card = card_with(
        tmp_path,
        row("fp32", 0.0, 60.0),
        row("bf16", 0.002, 110.0),
        row("fp16", 0.05, 300.0),  # fastest, but loses too much
        row("int8", 0.004, 150.0, "m.int8/openvino.xml"),
        row("int8", 0.0, 500.0, "m.int8/onnxruntime.onnx", "onnxruntime"),  # other engine
    )
    c = choose(card, model, "openvino", "CPU", "auto")
    assert (c.precision, c.option, c.file) == ("int8", "fp32", tmp_path / "m.int8/openvino.xml")
    assert "fastest within Dice drop <= 0.01" in c.reason
    assert "fp16 drop 0.0500 > 0.01" in c.reason


def test_auto_skips_a_missing_int8_file(tmp_path: Path) -> None:
    model, card = card_with(
        tmp_path, row("fp32", 0.0, 60.0), row("int8", 0.0, 150.0, "m.int8/openvino.xml")
    )
    c = choose(card, model, "openvino", "cpu", "auto")
    assert (c.precision, c.file) == ("fp32", model)
    assert "int8 file m.int8/openvino.xml missing" in c.reason


def test_named_precision_and_uncalibrated_models(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    card = load_card(model)
    c = choose(card, model, "openvino", "cpu", "auto")
    assert (c.precision, c.option) == ("auto", "auto")
    assert "not calibrated" in c.reason
    assert choose(card, model, "openvino", "cpu", "bf16").option == "bf16"
    with pytest.raises(ModelError, match="no int8 file for openvino on cpu"):
        choose(card, model, "openvino", "cpu", "int8")


def test_write_precision_replaces_its_section_only(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    for fps in (10.0, 20.0):
        calibrate.write_precision(
            model, PrecisionCard(data="x", measured=(row("fp32", 0.0, fps), row("bf16", 0.0, 9)))
        )
    text = model.with_suffix(".toml").read_text()
    assert text.startswith("# a hand-written comment that calibration keeps")
    assert text.count("[precision]") == 1 and text.count("[[precision.measured]]") == 2
    card = load_card(model)
    assert [m.fps for m in card.precision.measured] == [20.0, 9.0]
    assert [c.name for c in card.classes] == ["background", "dark", "bright"]
    assert tomllib.loads(text)["precision"]["data"] == "x"


def test_a_converted_model_is_not_calibrated_by_its_sources_card() -> None:
    """The ONNX file's figures (and int8 files) are not a .pt2's: the card goes without
    ``[precision]``, every other table kept, wherever it stood."""
    from daemon.engines.card import without_precision

    text = "task = 'segmentation'\n\n[precision]\ntolerance = 0.01\n\n"
    text += "[[precision.measured]]\nengine = 'openvino'\n\n[guard]\nmin_confidence = 0.5\n"
    assert without_precision(text) == "task = 'segmentation'\n\n[guard]\nmin_confidence = 0.5\n"
    assert without_precision("task = 'segmentation'\n") == "task = 'segmentation'\n"


def test_compare_drop_against_truth_and_against_f32() -> None:
    truth = [np.array([[1, 1, 0, 0]]), np.array([[0, 0, 2, 2]])]
    f32 = [t.copy() for t in truth]
    worse = [np.array([[1, 0, 0, 0]]), truth[1].copy()]  # artery Dice 1 -> 2/3
    drop, agreement = calibrate.compare(["bg", "a", "v"], worse, f32, truth)
    assert drop == pytest.approx(1 / 3, abs=1e-4)
    assert agreement == {"a": pytest.approx(2 / 3, abs=1e-4), "v": 1.0}
    drop_no_truth, _ = calibrate.compare(["bg", "a", "v"], worse, f32, None)
    assert drop_no_truth == pytest.approx(1 / 3, abs=1e-4)


@ORT
def test_calibrate_writes_the_card_and_auto_runs_what_it_chose(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny.onnx")
    result = calibrate.calibrate(
        model, calibrate.phantom_frames(4, 4), engines=("onnxruntime",), rounds=1
    )
    got = {m.precision: m for m in result.measured}
    assert set(got) == {"fp32", "int8"}
    assert got["fp32"].drop == 0.0 and got["fp32"].agreement == {"dark": 1.0, "bright": 1.0}
    assert (tmp_path / "tiny.int8" / "onnxruntime.onnx").is_file()
    assert got["int8"].file == "tiny.int8/onnxruntime.onnx"
    assert load_card(model).precision == result
    with Segmenter.open(model, engine="onnxruntime") as seg:
        info = seg.describe()
    allowed = [m for m in result.measured if m.drop <= result.tolerance]
    assert info["precision"] == max(allowed, key=lambda m: m.fps).precision
    assert "fastest within Dice drop <= 0.01" in info["precision_reason"]


@ORT
def test_calibrating_one_engine_keeps_the_other_engines_rows(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny.onnx")
    gpu = MeasuredPrecision(engine="pytorch", device="cuda", precision="fp16", drop=0.0, fps=900)
    earlier = PrecisionCard(data="earlier frames", machine="a GPU box", measured=(gpu,))
    calibrate.write_precision(model, earlier)
    first = calibrate.calibrate(
        model, calibrate.phantom_frames(3, 3), engines=("onnxruntime",), rounds=1
    )
    again = calibrate.calibrate(
        model, calibrate.phantom_frames(3, 3), engines=("onnxruntime",), rounds=1
    )
    kept = [m for m in again.measured if m.engine == "pytorch"]
    assert kept == [gpu.model_copy(update={"data": "earlier frames", "machine": "a GPU box"})]
    ours = [(m.engine, m.precision) for m in again.measured if m.engine == "onnxruntime"]
    assert ours == [("onnxruntime", "fp32"), ("onnxruntime", "int8")]  # replaced, not added
    assert len(again.measured) == len(first.measured) == 3
    assert all(not m.machine for m in again.measured if m.engine == "onnxruntime")
    assert load_card(model).precision == again  # the kept row's origin survives the file
    c = choose(load_card(model), model, "pytorch", "cuda:0", "auto")
    assert c.precision == "fp16" and "900 frames/s" in c.reason


@ORT
def test_the_tensorrt_int8_file_is_symmetric_q_dq_and_agrees_with_f32(tmp_path: Path) -> None:
    """TensorRT quantizes symmetrically only: the file calibrate makes for it has int8 zero
    points of 0 everywhere; ONNX Runtime runs the same Q/DQ arithmetic on the CPU, and on
    the bundled model its labels agree with f32's."""
    from daemon.models import ULTRASOUND

    model = bundled_copy(tmp_path, ULTRASOUND)
    frames = calibrate.phantom_frames(6, 8)
    with Segmenter.open(model, engine="onnxruntime", precision="fp32") as ref:
        cal = [ref.prepare(im) for im in frames.calibration]
        f32 = [ref.segment(im) for im in frames.images]
        name, names = ref.input.name, [c.name for c in ref.classes]
    found = calibrate.variants(model, ["tensorrt"], "cuda", cal, name)
    assert [(v.precision, v.file.name) for v in found] == [
        ("fp32", ULTRASOUND),
        ("fp16", ULTRASOUND),
        ("bf16", ULTRASOUND),
        ("int8", "tensorrt.onnx"),
    ]
    graph = onnx.load(found[-1].file).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    points = [weights[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(points) > 10 and all(p.dtype == np.int8 and not p.any() for p in points)
    eng = registry.engine_class("onnxruntime")()
    eng.load(found[-1].file, "cpu", precision="fp32")
    with Segmenter(eng, load_card(model), model) as int8:
        got = [int8.segment(im) for im in frames.images]
        # the real recordings show no vessel: the card's gate, vessel pixels <= 1 %
        data = need_data(ROOT.parent / "shared" / "data" / "us")
        for rec, images in real_recordings(data):
            vessel = np.mean([(int8.segment(im) > 0).mean() for im in images[::8]])
            assert vessel <= 0.01, f"{rec}: {vessel:.4f} of pixels called vessel at int8"
    drop, agreement = calibrate.compare(names, got, f32, frames.truth)
    assert drop <= 0.01 and min(agreement.values()) > 0.9, (drop, agreement)


def test_top1_agreement_per_class_and_the_drop_against_truth() -> None:
    names, f32, pred = ["a", "b"], [0, 0, 1, 1], [0, 1, 1, 1]
    drop, agreement = calibrate.compare_top1(names, pred, f32, None)
    assert agreement == {"a": 0.5, "b": 1.0} and drop == 0.25  # one frame of four differs
    # against the truth the variant is the better one here: no drop
    assert calibrate.compare_top1(names, pred, f32, [0, 1, 1, 1])[0] == 0.0
    assert calibrate.compare_top1(names, pred, f32, [0, 0, 1, 1])[0] == 0.25
    assert calibrate.compare_top1(names, [1, 1], [1, 1], None) == (0.0, {"a": 1.0, "b": 1.0})


@ORT
def test_calibrate_a_classifier_and_auto_runs_what_it_chose(tmp_path: Path) -> None:
    """The bundled view classifier: top-1 agreement on its own simulator's held-out
    frames, written to a card whose class names need quoting, then chosen by auto."""
    from daemon.engines.network import Network
    from daemon.models import VIEW

    model = bundled_copy(tmp_path, VIEW)
    frames = calibrate.phantom(model, 24, 8)
    assert frames.truth is not None and set(frames.truth) == {0, 1}
    result = calibrate.calibrate(model, frames, engines=("onnxruntime",), rounds=1)
    ours = [m for m in result.measured if m.engine == "onnxruntime"]
    got = {m.precision: m for m in ours}
    assert set(got) == {"fp32", "int8"} and len(ours) == 2
    assert got["fp32"].drop == 0.0
    assert got["fp32"].agreement == {"no vessels": 1.0, "vessels in view": 1.0}
    assert min(got["int8"].agreement.values()) > 0.8 and got["int8"].drop <= 0.1
    assert (tmp_path / "ultrasound-view.int8" / "onnxruntime.onnx").is_file()
    assert load_card(model).precision == result
    with Network.open(model, engine="onnxruntime") as net:
        info = net.describe()
    allowed = [m for m in ours if m.drop <= result.tolerance]
    assert info["precision"] == max(allowed, key=lambda m: m.fps).precision
    assert "fastest within top-1 drop <= 0.01" in info["precision_reason"]


def test_keypoint_agreement_and_the_drop_against_truth() -> None:
    nan = np.nan
    f32 = [np.array([[10.0, 10.0, 0.9]]), np.array([[nan, nan, 0.1]]), np.array([[5, 5, 0.9]])]
    near = [np.array([[11.0, 10.5, 0.8]]), np.array([[nan, nan, 0.2]]), np.array([[nan, nan, 0.3]])]
    drop, agreement = calibrate.compare_points(["tip"], near, f32, None)
    assert agreement == {"tip": pytest.approx(2 / 3, abs=1e-4)}  # the third: shown, not shown
    assert drop == pytest.approx(1 / 3, abs=1e-4)
    spacing = (0.5, 0.5)  # mm per pixel: 2 mm is 4 pixels
    truth = [((10.0, 10.0), spacing), (None, spacing), ((5.0, 5.0), spacing)]
    # f32 is right on all three; the variant misses the third tip: a third of frames lost
    assert calibrate.compare_points(["tip"], near, f32, truth)[0] == pytest.approx(1 / 3, abs=1e-4)
    far = [np.array([[16.0, 10.0, 0.9]]), *f32[1:]]  # 3 mm off: wrong against the truth
    assert calibrate.compare_points(["tip"], far, f32, truth)[0] == pytest.approx(1 / 3, abs=1e-4)
    assert calibrate.compare_points(["tip"], f32, f32, truth) == (0.0, {"tip": 1.0})


@ORT
def test_calibrate_a_keypoint_model(tmp_path: Path) -> None:
    """The bundled needle-tip model on its simulator's held-out frames: per-point
    agreement with f32 and the frames gained wrong against the true tip."""
    from daemon.models import NEEDLE

    model = bundled_copy(tmp_path, NEEDLE)
    frames = calibrate.phantom(model, 12, 6)
    assert frames.truth is not None and any(tip is None for tip, _ in frames.truth)
    assert any(tip is not None for tip, _ in frames.truth)
    result = calibrate.calibrate(model, frames, engines=("onnxruntime",), rounds=1)
    got = {m.precision: m for m in result.measured if m.engine == "onnxruntime"}
    assert set(got) == {"fp32", "int8"}
    assert got["fp32"].drop == 0.0 and got["fp32"].agreement == {"needle tip": 1.0}
    assert got["int8"].agreement["needle tip"] >= 0.75
    c = choose(load_card(model), model, "onnxruntime", "cpu", "auto")
    assert "keypoint drop <= 0.01" in c.reason


@ORT
def test_calibrate_a_3d_model_on_ct_phantom_slabs_and_the_ct_job_says_what_runs(
    tmp_path: Path,
) -> None:
    """The bundled CT model on held-out phantom slabs of the ct job's patch (32 x 512 x
    512, halved for the network and back as the job does): nodule Dice in 3-D against
    f32's, written to the card; a ct job at auto then runs what it chose and says why."""
    from daemon.offline.ct import CtJob, CtOptions
    from daemon.offline.kind import FolderContext
    from daemon.phantoms.ct import ct_phantom, write_image

    model = bundled_copy(tmp_path, "ct-nodule-seg.onnx")
    assert load_card(model).input.volumetric and calibrate.default_frames(model) == 24
    frames = calibrate.phantom(model, 2, 2)
    assert [t.shape for t in frames.truth] == [(32, 512, 512)] * 2  # a patch each, with truth
    assert any((t == 1).any() for t in frames.truth) and "seeds 50000-50001" in frames.text
    result = calibrate.calibrate(model, frames, engines=("onnxruntime",), rounds=1)
    got = {m.precision: m for m in result.measured if m.engine == "onnxruntime"}
    assert set(got) == {"fp32", "int8"}
    assert got["fp32"].drop == 0.0 and got["fp32"].agreement == {"nodule": 1.0}
    assert got["int8"].agreement["nodule"] >= 0.95 and got["int8"].drop <= 0.01
    assert (tmp_path / "ct-nodule-seg.int8" / "onnxruntime.onnx").is_file()
    assert load_card(model).precision == result

    slab = ct_phantom((8, 96, 96), seed=1_000_400, spacing=(2.0, 3.0, 3.0))
    source = write_image(slab, tmp_path / "slab.nii.gz")
    options = CtOptions(patch=(8, 96, 96), overlap=0.0)
    ctx = FolderContext.under(tmp_path / "job", source, options, engine="onnxruntime", model=model)
    engine = CtJob().run(ctx)["engine"]
    best = max((m for m in got.values() if m.drop <= result.tolerance), key=lambda m: m.fps)
    assert engine["precision"] == best.precision
    assert engine["precision_reason"].startswith("fastest within Dice drop <= 0.01")
    assert f"{best.precision} ({best.fps:.1f} patches/s" in engine["precision_reason"]


@ORT
def test_calibrate_a_3d_model_on_a_real_ct_series(tmp_path: Path) -> None:
    """``--data SERIES`` for a 3-D model: the series' patches as the ct job cuts them
    (the 3 real slices, padded with air, are one 32-slice patch); no ground truth."""
    series = need_data(ROOT.parent / "shared" / "data" / "ct" / "ct-3slice")
    frames = calibrate.volume_frames(series, 4)
    assert [im.shape for im in frames.images] == [(32, 512, 512)]
    assert frames.truth is None and len(frames.calibration) == 1
    assert frames.text == "1 patches of ct-3slice (no ground truth)"
    model = bundled_copy(tmp_path, "ct-nodule-seg.onnx")
    cal = subprocess.run(
        [
            sys.executable, "-m", "daemon", "models", "calibrate", str(model),
            "--data", str(series), "--rounds", "1", "--engine", "onnxruntime",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cal.returncode == 0, cal.stderr
    card = load_card(model).precision
    assert card is not None and card.data == frames.text
    rows = {m.precision: m for m in card.measured if m.engine == "onnxruntime" and not m.data}
    assert set(rows) == {"fp32", "int8"} and rows["fp32"].agreement == {"nodule": 1.0}
    assert "onnxruntime  cpu     int8" in cal.stdout


def test_the_wsi_classifiers_patches_are_balanced_and_held_out() -> None:
    from daemon.models import BUNDLED, WSI

    frames = calibrate.phantom(BUNDLED / WSI, 8, 2)
    assert frames.truth == [0, 0, 1, 1, 2, 2, 3, 3]  # two of each class
    assert all(im.shape == (512, 512, 3) and im.dtype == np.uint8 for im in frames.images)
    assert "seeds 70000+" in frames.text  # the training script's held-out range (60000+ trains)


def test_a_model_whose_first_output_is_not_measured_is_refused(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "boxes.onnx")
    card = model.with_suffix(".toml")
    card.write_text(card.read_text() + '\n[[outputs]]\nrole = "detection"\n')
    with pytest.raises(ModelError, match=r"not detection \(its first output\)"):
        calibrate.calibrate(model, calibrate.phantom_frames(2, 2), engines=("onnxruntime",))
    assert "[precision]" not in card.read_text()  # nothing written


def test_a_classifier_without_a_simulator_needs_a_recording(tmp_path: Path) -> None:
    from daemon.models import BUNDLED, VIEW

    model = tmp_path / "my-classifier.onnx"  # not a bundled model: no simulator known
    shutil.copy((BUNDLED / VIEW).with_suffix(".toml"), model.with_suffix(".toml"))
    model.write_bytes(b"")
    refused = r"no simulator here makes frames for its classification output.*--data FILE"
    with pytest.raises(ModelError, match=refused):
        calibrate.phantom(model, 4, 4)


def test_a_3d_model_of_its_own_needs_a_ct_volume(tmp_path: Path) -> None:
    """CT phantom slabs are the bundled CT model's: another 3-D model (its classes are
    not lung nodules) is sent to --data, a copy of the bundled one keeps its slabs."""
    from daemon.models import BUNDLED, CT

    model = tmp_path / "liver.onnx"
    shutil.copy((BUNDLED / CT).with_suffix(".toml"), model.with_suffix(".toml"))
    model.write_bytes(b"")
    with pytest.raises(ModelError, match=r"on a CT volume of its own domain: --data FILE"):
        calibrate.phantom(model, 1, 1)
    copy = tmp_path / "ct-nodule-seg.pt2"  # the bundled model in another format
    shutil.copy((BUNDLED / CT).with_suffix(".toml"), copy.with_suffix(".toml"))
    assert calibrate.phantom(copy, 1, 1).text.startswith("1 CT phantom slabs")


def test_calibrate_takes_only_engines_that_load_the_file(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny.onnx")
    found = [e for e in calibrate.usable_engines(model, "cpu") if e in registry.BUILTINS]
    assert found == [e for e in ("onnxruntime", "openvino") if registry.probe(e).available]
    assert calibrate.usable_engines(model, "cpu", ["pytorch", "tensorrt"]) == []
    with pytest.raises(EngineError, match=r"no engine here runs tiny.onnx on cpu \(asked for"):
        calibrate.calibrate(model, calibrate.phantom_frames(2, 2), engines=("tensorrt",))


@ORT
def test_cli_calibrate_then_the_run_summary_says_which_and_why(tmp_path: Path, run_echod) -> None:
    model = tiny_model(tmp_path / "tiny.onnx")
    cal = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "models",
            "calibrate",
            str(model),
            "--frames",
            "3",
            "--rounds",
            "1",
            "--engine",
            "onnxruntime",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cal.returncode == 0, cal.stderr
    assert "ENGINE" in cal.stdout and "int8" in cal.stdout
    e = run_echod(
        "run", "--model", str(model), "--engine", "onnxruntime", "--source", "synthetic",
        "--frames", "5", "--pace", "none", "--mode", "all", "--headless", "--json",
    )  # fmt: skip
    code, out = e.finish()
    assert code == 0, "".join(e.stderr)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["precision"] in ("fp32", "int8")
    assert "fastest within Dice drop" in summary["precision_reason"]
    assert any("stage infer ready" in line and "precision" in line for line in e.stderr)


def test_cli_calibrate_refuses_a_missing_model(tmp_path: Path) -> None:
    cal = subprocess.run(
        [sys.executable, "-m", "daemon", "models", "calibrate", str(tmp_path / "none.onnx")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cal.returncode == 65
    assert cal.stderr.strip().splitlines() == [
        f"echod: error: model file not found: {tmp_path}/none.onnx"
    ]


@pytest.mark.parametrize(
    "name",
    [
        "ultrasound-seg.onnx",
        "ultrasound-view.onnx",
        "ultrasound-needle.onnx",
        "wsi-patch-cls.onnx",
        "ct-nodule-seg.onnx",
    ],
)
def test_the_bundled_models_ship_calibrated(name: str) -> None:
    from daemon.models import BUNDLED

    model = BUNDLED / name
    card = load_card(model)
    assert card.precision is not None and card.precision.tolerance == 0.01
    for m in card.precision.measured:
        assert m.precision == "fp32" or m.agreement, m
        assert not m.file or (BUNDLED / m.file).is_file(), f"{m.file} is not shipped"
    c = choose(card, model, "openvino", "cpu", "auto")
    best = max(
        (m for m in card.precision.measured if m.engine == "openvino" and m.drop <= 0.01),
        key=lambda m: m.fps,
    )
    assert c.precision == best.precision


@pytest.mark.skipif(not registry.probe("openvino").available, reason="openvino is not installed")
def test_auto_on_openvino_runs_the_chosen_file_and_agrees_with_f32() -> None:
    from daemon.models import default_model
    from daemon.phantoms.ultrasound import example

    images = [example(s).image for s in (500_003, 500_004, 500_007)]
    with Segmenter.open(default_model(), engine="openvino", precision="fp32") as f32:
        ref = [f32.segment(im) for im in images]
    with Segmenter.open(default_model(), engine="openvino") as seg:
        info = seg.describe()
        got = [seg.segment(im) for im in images]
    assert info["precision"] != "auto" and info["precision_reason"].startswith("fastest")
    agree = np.mean([(a == b).mean() for a, b in zip(got, ref, strict=True)])
    assert agree > 0.98  # pixels labelled alike (Dice per class is on the card)
