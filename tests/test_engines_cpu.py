"""Every CPU engine (ONNX Runtime, OpenVINO, PyTorch) on the same models: same outputs.

Tolerance: float32 everywhere, so probabilities agree within ``ATOL`` = 1e-4
(measured: about 1e-5 for the reference U-Net) and label maps in all but
``MAX_FLIPS`` = 0.01 % of pixels (near-ties only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from test_engines import dynamic_model, nhwc_model

from daemon.engines.base import Engine, Pending
from daemon.engines.card import load_card
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.engines.openvino import OpenVinoEngine
from daemon.engines.pytorch import PyTorchEngine
from daemon.engines.reference import ensure_reference, export_torch
from daemon.engines.segmenter import Segmenter
from daemon.engines.tensorrt import TensorRtEngine
from daemon.errors import EngineError, ModelError

pytest.importorskip("openvino", reason="extra 'openvino' not installed")
HAVE_TORCH = PyTorchEngine.probe().available
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="extra 'torch' not installed")

ATOL = 1e-4
MAX_FLIPS = 1e-4
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def unet(cache: Path) -> dict[str, Path]:
    """The reference U-Net as ONNX and, with torch, ExportedProgram and TorchScript."""
    fmts: tuple[Literal["onnx", "pt2", "torchscript"], ...] = (
        ("onnx", "pt2", "torchscript") if HAVE_TORCH else ("onnx",)
    )
    return {fmt: ensure_reference("unet2d-256", cache, fmt) for fmt in fmts}


def engines_for(paths: dict[str, Path]) -> list[tuple[str, Engine, Path]]:
    """Every CPU engine with the file it loads (PyTorch where torch is installed)."""
    found: list[tuple[str, Engine, Path]] = [
        ("onnxruntime", OnnxRuntimeEngine(), paths["onnx"]),
        ("openvino", OpenVinoEngine(), paths["onnx"]),
    ]
    if HAVE_TORCH:
        found += [
            ("pytorch-pt2", PyTorchEngine(), paths["pt2"]),
            ("pytorch-torchscript", PyTorchEngine(), paths["torchscript"]),
        ]
    return found


def test_reference_unet_agrees_on_every_cpu_engine(unet: dict[str, Path]) -> None:
    x = RNG.random((2, 1, 256, 256), np.float32)
    outputs = {}
    for name, eng, path in engines_for(unet):
        eng.load(path, "cpu")
        assert [(s.name, s.shape, s.layout) for s in eng.inputs] == [
            ("image", (None, 1, 256, 256), "NCHW")
        ], name
        assert eng.outputs[0].name == "probabilities", name
        outputs[name] = eng.run({"image": x})["probabilities"]
        eng.close()
    ref = outputs.pop("onnxruntime")
    assert ref.shape == (2, 3, 256, 256)
    for name, y in outputs.items():
        np.testing.assert_allclose(y, ref, rtol=0, atol=ATOL, err_msg=name)
        flips = np.mean(y.argmax(1) != ref.argmax(1))
        assert flips <= MAX_FLIPS, f"{name}: {flips:.2%} of labels differ"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The tests' NHWC and dynamic-H/W models as ONNX and as PyTorch files."""
    d = tmp_path_factory.mktemp("small")
    models = {
        "nhwc": nhwc_model(d / "nhwc.onnx"),
        "dynamic": dynamic_model(
            d / "dynamic.onnx", [1, 1, "h", "w"], '[output]\nactivation = "none"\n'
        ),
    }
    out: dict[str, dict[str, Path]] = {}
    for key, path in models.items():
        out[key] = {"onnx": path}
        if HAVE_TORCH:
            out[key]["pt2"] = export_torch(path, path.with_suffix(".pt2"), "pt2")
            out[key]["torchscript"] = export_torch(path, path.with_suffix(".ts"), "torchscript")
    return out


@pytest.mark.parametrize("which", ["nhwc", "dynamic"])
def test_layouts_and_dynamic_shapes_on_every_cpu_engine(
    small: dict[str, dict[str, Path]], which: str
) -> None:
    paths = small[which]
    frames = (
        [RNG.integers(0, 256, (60, 80, 3), np.uint8)]
        if which == "nhwc"
        else [RNG.integers(0, 256, (37, 53), np.uint8), RNG.integers(0, 256, (20, 31), np.uint8)]
    )
    maps: dict[str, list[np.ndarray]] = {}
    for name, eng, path in engines_for(paths):
        eng.load(path, "cpu")
        with Segmenter(eng, load_card(path), path) as seg:
            if which == "nhwc":
                assert seg.input.layout == "NHWC" and seg.output.layout == "NHWC", name
            else:
                assert seg.network_size() == (None, None), name
            maps[name] = [seg.segment(f) for f in frames]
            outs = [seg.infer(seg.prepare(f)) for f in frames]
            maps[name + "/raw"] = outs
    for name in [n for n in maps if n != "onnxruntime" and "/" not in n]:
        for a, b in zip(maps[name], maps["onnxruntime"], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
        for a, b in zip(maps[name + "/raw"], maps["onnxruntime/raw"], strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=name)
    if which == "dynamic":
        assert [m.shape for m in maps["openvino"]] == [(37, 53), (20, 31)]


# --- OpenVINO -------------------------------------------------------------------------


def test_openvino_modes_cache_and_async(unet: dict[str, Path], cache: Path) -> None:
    x = [RNG.random((1, 1, 256, 256), np.float32) for _ in range(5)]
    lat = OpenVinoEngine()
    lat.load(unet["onnx"], "CPU", mode="newest", cache_dir=cache)
    assert lat.depth == 1 and lat.device == "CPU"
    expected = [lat.run({"image": xi})["probabilities"] for xi in x]
    lat.close()

    tput = OpenVinoEngine()
    tput.load(unet["onnx"], "cpu", mode="all", cache_dir=cache, requests=3)
    assert tput.depth == 3
    assert any((cache / "openvino").iterdir()), "no compiled model in the cache"
    # run_many keeps several requests in flight; results come back in order, each a view
    # of its request's output valid until the next is asked for: kept here as copies
    got = [{k: v.copy() for k, v in o.items()} for o in tput.run_many({"image": xi} for xi in x)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a["probabilities"], b, atol=ATOL)
    # more submissions than requests: the oldest is collected first, nothing is lost
    pending: list[Pending] = [tput.submit({"image": xi}) for xi in x]
    for p, b in zip(pending, expected, strict=True):
        np.testing.assert_allclose(p.wait()["probabilities"], b, atol=ATOL)
        assert p.done()
    tput.close()
    with pytest.raises(EngineError, match="before load"):
        tput.submit({"image": x[0]})


def test_openvino_reads_ir(unet: dict[str, Path], tmp_path: Path) -> None:
    from daemon.engines.openvino import _library

    ov, _ = _library()
    xml = tmp_path / "unet.xml"
    net = ov.Core().read_model(str(unet["onnx"]))
    if hasattr(ov, "save_model"):  # OpenVINO >= 2023.1
        ov.save_model(net, str(xml), compress_to_fp16=False)
    else:  # 2022.3, the Neural Compute Stick's release: weights stay f32
        ov.serialize(net, str(xml))
    x = RNG.random((1, 1, 256, 256), np.float32)
    eng, ref = OpenVinoEngine(), OnnxRuntimeEngine()
    eng.load(xml)
    ref.load(unet["onnx"])
    np.testing.assert_allclose(
        eng.run({"image": x})["probabilities"], ref.run({"image": x})["probabilities"], atol=ATOL
    )


def test_openvino_errors(unet: dict[str, Path], small: dict[str, dict[str, Path]]) -> None:
    with pytest.raises(EngineError, match=r"no device NPU here \(has CPU"):
        OpenVinoEngine().load(unet["onnx"], "npu")
    with pytest.raises(EngineError, match="did you mean 'requests'"):
        OpenVinoEngine().load(unet["onnx"], request=2)
    with pytest.raises(EngineError, match="option mode = 'al': did you mean 'all'"):
        OpenVinoEngine().load(unet["onnx"], mode="al")
    assert "NPU needs static shapes; input 'x' is dynamic" in OpenVinoEngine.supports(
        small["dynamic"]["onnx"], "npu"
    )
    assert OpenVinoEngine.supports(unet["onnx"], "npu") == ""  # only the batch is dynamic
    assert "does not load .pt2" in OpenVinoEngine.supports(Path("m.pt2"), "cpu")


# --- PyTorch --------------------------------------------------------------------------


@needs_torch
def test_pytorch_cpu_details(unet: dict[str, Path], tmp_path: Path) -> None:
    import torch

    eng = PyTorchEngine()
    with pytest.raises(EngineError, match='"fp16" needs CUDA'):
        eng.load(unet["pt2"], precision="fp16")
    with pytest.raises(EngineError, match="CUDA is not available"):
        eng.load(unet["pt2"], "cuda")
    eng.load(unet["pt2"], threads=1, mode="all")
    assert eng.depth == 1 and eng.device == "cpu float32"
    assert eng.label_on_device("probabilities", 1) is None  # the caller's argmax, on the CPU
    assert next(eng.run_many([{"image": np.zeros((1, 1, 256, 256), np.float32)}]))[
        "probabilities"
    ].shape == (1, 3, 256, 256)
    bare = tmp_path / "bare.ts"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(bare))
    with pytest.raises(ModelError, match="says nothing of its inputs"):
        PyTorchEngine().load(bare)


# --- selection through Segmenter -------------------------------------------------------


def test_card_preference_and_skip_reasons(
    unet: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    card = unet["onnx"].with_suffix(".toml")
    text = card.read_text()
    try:
        card.write_text('engines = ["tensorrt", "pytorch", "openvino"]\n' + text)
        with caplog.at_level(logging.INFO), Segmenter.open(unet["onnx"], device="cpu") as seg:
            info = seg.describe()
    finally:
        card.write_text(text)
    assert info["engine"] == "openvino" and info["device"] == "CPU"
    trt = TensorRtEngine.probe()  # missing here, or installed for CUDA devices
    why_trt = trt.reason if not trt.available else f"no device 'cpu' (has {', '.join(trt.devices)})"
    assert info["engine_skipped"][0] == f"tensorrt: {why_trt}"
    pytorch = PyTorchEngine.probe()
    why = "does not load .onnx files (loads .pt2, .pt, .ts)" if HAVE_TORCH else pytorch.reason
    assert info["engine_skipped"][1] == f"pytorch: {why}"
    assert f"engine pytorch skipped: {why}" in caplog.text
    assert info["preprocess"] == "cpu" and info["in_flight"] == 1
