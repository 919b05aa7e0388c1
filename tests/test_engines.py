"""Engines, registry, model cards, Segmenter and the reference U-Net, on real ONNX Runtime."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.engines import registry
from daemon.engines.base import Probe, import_library
from daemon.engines.card import ModelCard, load_card
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.engines.reference import ensure_reference, parameter_count
from daemon.engines.segmenter import Segmenter
from daemon.errors import EngineError, ModelError

# --- tiny models built in the test -------------------------------------------------


def save(model: onnx.ModelProto, path: Path, card: str | None = None) -> Path:
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, path)
    if card is not None:
        path.with_suffix(".toml").write_text(textwrap.dedent(card))
    return path


def graph_model(
    nodes: list[onnx.NodeProto],
    inp: Sequence[str | int],
    out: Sequence[str | int],
    weights: dict[str, np.ndarray],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def nhwc_model(path: Path) -> Path:
    """NHWC RGB in, NHWC 2 classes out: class 1 where red > green."""
    w = np.zeros((2, 3, 1, 1))
    w[0, 1] = 1.0  # class 0 logit: green
    w[1, 0] = 1.0  # class 1 logit: red
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1]),
    ]
    return save(graph_model(nodes, [1, 32, 32, 3], [1, 32, 32, 2], {"w": w}), path)


def dynamic_model(path: Path, dims: list[str | int], card: str | None = None) -> Path:
    """Dynamic height/width, one channel in, one logit out: x - 0.5."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1])]
    weights = {"w": np.ones((1, 1, 1, 1)), "b": np.array([-0.5])}
    out = [dims[0], 1, *dims[2:]]
    return save(graph_model(nodes, dims, out, weights), path, card)


def volume_model(path: Path) -> Path:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1, 1])]
    shape = [1, 1, 32, 256, 256]
    return save(
        graph_model(nodes, shape, [1, 2, 32, 256, 256], {"w": np.ones((2, 1, 1, 1, 1))}), path
    )


# --- probe, registry, selection ---------------------------------------------------


def test_probe_onnxruntime() -> None:
    p = OnnxRuntimeEngine.probe()
    assert p.available and p.version and p.reason == ""
    assert "cpu" in p.devices
    assert registry.probe("onnxruntime") == p
    assert any(q.name == "onnxruntime" for q in registry.probe_all())


def test_probe_reports_the_import_error() -> None:
    class Missing(OnnxRuntimeEngine):
        name = "missing"

        @classmethod
        def probe(cls) -> Probe:
            lib, reason = import_library("echod_no_such_library")
            return Probe(cls.name, None, lib is not None, (), reason)

    p = Missing.probe()
    assert not p.available
    assert p.reason == "ModuleNotFoundError: No module named 'echod_no_such_library'"


def test_unknown_engine_suggests_the_nearest() -> None:
    with pytest.raises(EngineError, match="did you mean 'onnxruntime'"):
        registry.engine_class("onnxruntim")


def test_select_is_deterministic_and_explains() -> None:
    cls, skipped = registry.select(["tensorrtt", "onnxruntime"], "cpu")
    assert cls is OnnxRuntimeEngine
    assert len(skipped) == 1 and skipped[0].startswith("tensorrtt: unknown engine")
    with pytest.raises(
        EngineError, match=r"no engine can run on 'npu'.*onnxruntime: no device 'npu'"
    ):
        registry.select(["onnxruntime"], "npu")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An installed distribution that registers an engine through the entry point group."""
    (tmp_path / "echod_test_engine.py").write_text(
        textwrap.dedent("""
        from daemon.engines.onnxruntime import OnnxRuntimeEngine

        class SecondOrt(OnnxRuntimeEngine):
            name = "second-ort"
    """)
    )
    dist = tmp_path / "echod_test_engine-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echod-test-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[echod.engines]\nsecond-ort = echod_test_engine:SecondOrt\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._third_party.cache_clear()
    yield "second-ort"
    registry._third_party.cache_clear()


def test_third_party_engine_through_entry_points(third_party: str, tmp_path: Path) -> None:
    assert third_party in registry.names()
    cls = registry.engine_class(third_party)
    assert cls.name == "second-ort" and cls.probe().available
    with Segmenter.open(nhwc_model(tmp_path / "m.onnx"), engine=third_party) as seg:
        assert seg.describe()["engine"] == "second-ort"


def test_importing_echod_imports_no_engine_library() -> None:
    code = (
        "import sys, daemon, daemon.engines, daemon.engines.segmenter, daemon.engines.onnxruntime\n"
        "from daemon.engines import registry\n"
        "registry.engine_class('onnxruntime')\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_engine_rejects_unknown_options(tmp_path: Path) -> None:
    model = nhwc_model(tmp_path / "m.onnx")
    with pytest.raises(EngineError, match="did you mean 'intra_op_threads'"):
        OnnxRuntimeEngine().load(model, intra_op_thread=1)
    eng = OnnxRuntimeEngine()
    eng.load(model, intra_op_threads=1, graph_optimisation="basic")
    assert eng.device == "CPUExecutionProvider"
    assert [s.layout for s in eng.inputs + eng.outputs] == ["NHWC", None]


# --- the reference U-Net -----------------------------------------------------------


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_reference("unet2d-256", tmp_path_factory.mktemp("cache"))


def test_reference_unet_generated_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        path = ensure_reference("unet2d-256", tmp_path)
    assert path == tmp_path / "models" / "unet2d-256.onnx"
    assert "RANDOM weights" in caplog.text
    assert 1_800_000 <= parameter_count(onnx.load(path)) <= 2_400_000
    mtime = path.stat().st_mtime_ns
    assert ensure_reference("unet2d-256", tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporaries
    with pytest.raises(ModelError, match="did you mean 'unet2d-256'"):
        ensure_reference("unet2d-265", tmp_path)


def test_reference_unet_runs_on_onnxruntime(unet: Path) -> None:
    eng = OnnxRuntimeEngine()
    eng.load(unet)
    assert eng.inputs[0].shape == (None, 1, 256, 256) and eng.inputs[0].layout == "NCHW"
    x = np.random.default_rng(0).random((2, 1, 256, 256), np.float32)
    y = eng.run({"image": x[:1]})["probabilities"]
    assert y.shape == (1, 3, 256, 256)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    y2 = eng.run({"image": x})["probabilities"]  # dynamic batch
    assert y2.shape == (2, 3, 256, 256)
    np.testing.assert_allclose(y2[:1], y, atol=1e-5)
    eng.close()
    with pytest.raises(EngineError):
        eng.run({"image": x})


def test_reference_unet_through_segmenter(unet: Path) -> None:
    with Segmenter.open(unet, device="cpu") as seg:
        info = seg.describe()
        assert info["engine"] == "onnxruntime" and info["device"] == "CPUExecutionProvider"
        assert [c["name"] for c in info["classes"]] == ["background", "artery", "vein"]
        assert "random weights" in info["provenance"]
        frame = np.random.default_rng(0).integers(0, 256, (616, 820), np.uint8)
        seg.check_frame(frame.shape)  # the dtype is optional
        seg.check_frame(frame.shape, frame.dtype)
        x = seg.prepare(frame)
        assert x.shape == (1, 1, 256, 256)
        lab = seg.finish(seg.infer(x), frame.shape)
        assert lab.shape == (616, 820) and lab.dtype == np.uint8 and lab.max() <= 2
        assert seg.warmup(1) > 0


# --- other layouts and shapes through Segmenter ------------------------------------


def test_nhwc_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), Segmenter.open(nhwc_model(tmp_path / "rgb.onnx")) as seg:
        assert "no model card beside" in caplog.text
        assert seg.input.layout == "NHWC" and seg.output.layout == "NHWC"
        assert [c.name for c in seg.classes] == ["background", "class1"]
        frame = np.zeros((60, 80, 3), np.uint8)
        frame[:, :40, 0] = 200  # left: red
        frame[:, 40:, 1] = 200  # right: green
        lab = seg.segment(frame)
        assert lab.shape == (60, 80)
        assert (lab[:, :38] == 1).all() and (lab[:, 42:] == 0).all()
        assert seg.segment(frame[:, :, 0]).shape == (60, 80)  # gray frames go in too


def test_dynamic_height_width_model(tmp_path: Path) -> None:
    card = """
        [output]
        activation = "none"
        [[classes]]
        name = "dark"
        colour = [0, 0, 0]
        [[classes]]
        name = "bright"
        colour = [255, 255, 0]
    """
    path = dynamic_model(tmp_path / "dyn.onnx", [1, 1, "h", "w"], card)
    with Segmenter.open(path) as seg:
        assert seg.network_size() == (None, None)
        frame = np.random.default_rng(0).integers(0, 256, (37, 53), np.uint8)
        assert seg.prepare(frame).shape == (1, 1, 37, 53)
        np.testing.assert_array_equal(seg.segment(frame), frame > 127.5)
        assert seg.segment(frame[:20, :31]).shape == (20, 31)


def test_undetectable_layout_needs_the_card(tmp_path: Path) -> None:
    path = dynamic_model(tmp_path / "any.onnx", ["n", "c", "h", "w"])
    with Segmenter.open(path) as seg, pytest.raises(ModelError, match='layout = "NCHW"'):
        seg.check_frame((40, 40), np.uint8)
    path.with_suffix(".toml").write_text(
        '[input]\nlayout = "NCHW"\nchannels = 1\n[output]\nactivation = "none"\n'
    )
    with Segmenter.open(path) as seg:
        assert seg.segment(np.full((40, 40), 255, np.uint8)).all()


def test_volume_model_given_frames_is_one_line_error(tmp_path: Path) -> None:
    with Segmenter.open(volume_model(tmp_path / "ct3d.onnx")) as seg:
        with pytest.raises(ModelError) as err:
            seg.check_frame((616, 820), np.uint8)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg == (
            "model ct3d.onnx expects 5-D input NCDHW (1, 1, 32, 256, 256) float32; frames are "
            "2-D 616x820: use a 2-D segmentation model"
        )
        with pytest.raises(ModelError, match="5-D"):
            seg.prepare(np.zeros((616, 820), np.uint8))


def test_frames_that_are_not_images(tmp_path: Path) -> None:
    with Segmenter.open(nhwc_model(tmp_path / "m.onnx")) as seg:
        with pytest.raises(ModelError, match="not gray"):
            seg.check_frame((10, 10, 4), np.uint8)
        with pytest.raises(ModelError, match="not numeric"):
            seg.check_frame((10, 10), np.bool_)


# --- bad files ---------------------------------------------------------------------


def test_corrupt_model_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match=f"cannot load model {path}"):
        Segmenter.open(path)
    with pytest.raises(ModelError, match=r"not found: .*missing\.onnx"):
        OnnxRuntimeEngine().load(tmp_path / "missing.onnx")


def test_card_missing_gives_logged_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        card = load_card(tmp_path / "x.onnx")
    assert card == ModelCard()
    assert card.input.normalisation.scale == pytest.approx(1 / 255)
    assert f"no model card beside {tmp_path / 'x.onnx'}; using defaults: " in caplog.text
    assert '"scale":0.00392' in caplog.text


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[input.normalisation]\nscale = -1\n",
            r"input\.normalisation\.scale: .*greater than 0.*got -1",
        ),
        ('[output]\nactivation = "relu"\n', r"output\.activation: .*'softmax'.*got 'relu'"),
        (
            '[[classes]]\nname = "a"\ncolor = [1, 2, 3]\n',
            r"classes\.0\.color: unknown field .*'colour'",
        ),
        ("[input]\nsize = [256]\n", r"input\.size"),
        (
            "[input.normalisation]\nclip = [400, -1200]\n",
            r"input\.normalisation\.clip: clip must be",
        ),
        ("task = ", r"cannot be read"),
    ],
)
def test_card_malformed_names_file_field_and_value(
    tmp_path: Path, toml: str, expected: str
) -> None:
    path = tmp_path / "m.toml"
    path.write_text(toml)
    with pytest.raises(ModelError, match=f"model card {path}.*{expected}") as err:
        load_card(tmp_path / "m.onnx")
    assert "\n" not in str(err.value)


def test_card_must_match_the_model(tmp_path: Path) -> None:
    card = '[[classes]]\nname = "only"\ncolour = [1, 2, 3]\n'
    path = nhwc_model(tmp_path / "m.onnx")
    path.with_suffix(".toml").write_text(card)
    with pytest.raises(ModelError, match=r"lists 1 classes; model m\.onnx output .* gives 2"):
        Segmenter.open(path)
    path.with_suffix(".toml").write_text("[input]\nsize = [64, 64]\n")
    with pytest.raises(ModelError, match=r"card's size \[64, 64\] does not match"):
        Segmenter.open(path)


def test_a_job_worker_process_loads_engines_at_offline_priority() -> None:
    """A job worker declares itself offline once; every engine option set parsed there
    defaults to offline priority (PyTorch: a low-priority CUDA stream), and an explicit
    choice still wins. Run in a fresh interpreter: the default is process-wide."""
    code = (
        "from daemon.engines import base\n"
        "assert base.parse_options('x', {}).priority == 'live'\n"
        "base.run_as_offline()\n"
        "assert base.parse_options('x', {}).priority == 'offline'\n"
        "assert base.parse_options('x', {'priority': 'live'}).priority == 'live'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
