"""OpenCL pre-processing (PoCL on this CPU) against the CPU path, and its fallbacks.

Tolerance (preprocess module doc): integer frames within one input level times
``scale / std`` (1.5 levels for RGB frames into a 1-channel model, where the
CPU path rounds twice); float frames to float32 precision.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_engines import nhwc_model
from test_processing import CARDS, spec

from daemon.engines import opencl, preprocess
from daemon.engines.segmenter import Segmenter

pytest.importorskip("pyopencl", reason="extra 'opencl' not installed")

RNG = np.random.default_rng(99)


@pytest.fixture(scope="module")
def runner() -> opencl.OpenClPrepare:
    device, reason = opencl.probe()
    if device is None:
        pytest.skip(f"no OpenCL device: {reason}")
    return opencl.OpenClPrepare(device)


@pytest.mark.parametrize(
    ("card_name", "channels"),
    [(name, c) for name in CARDS for c in (1, 3) if (name, c) != ("per-channel", 1)],
)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("frame", ["gray", "rgb"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_opencl_matches_cpu(
    runner: opencl.OpenClPrepare,
    card_name: str,
    channels: int,
    layout: str,
    frame: str,
    dtype: type,
) -> None:
    card = CARDS[card_name]
    shape = (123, 157) if frame == "gray" else (123, 157, 3)
    img = RNG.integers(0, 256, shape).astype(dtype)
    s = spec(layout, channels)
    cpu, gpu = preprocess.prepare(img, s, card), runner(img, s, card)
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    n = card.input.normalisation
    level = n.scale / min(n.std or (1.0,))
    if np.dtype(dtype).kind == "f":
        atol = 1e-5 * 255 * level
    else:
        atol = (1.5 if frame == "rgb" and channels == 1 else 1.0) * level * 1.001
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=atol)


def test_opencl_same_size_upscale_and_dynamic(runner: opencl.OpenClPrepare) -> None:
    card = CARDS["clip+mean/std"]
    img = RNG.integers(0, 4096, (64, 48)).astype(np.uint16)
    np.testing.assert_allclose(
        runner(img, spec("NCHW", 1), card),
        preprocess.prepare(img, spec("NCHW", 1), card),
        atol=1e-6,
    )
    small = RNG.integers(0, 256, (17, 11), np.uint8)
    level = 1 / 200 / 0.2
    np.testing.assert_allclose(
        runner(small, spec("NHWC", 3), card),
        preprocess.prepare(small, spec("NHWC", 3), card),
        atol=level * 1.001,
    )
    dyn = spec("NCHW", None, None, None)
    assert runner(small, dyn, card).shape == (1, 1, 17, 11)


def test_probe_and_choose(caplog: pytest.LogCaptureFixture) -> None:
    device, reason = opencl.probe()
    assert device is not None and reason == ""
    gpu, no_gpu = opencl.probe(gpu_only=True)
    assert gpu is not None or no_gpu.startswith("no usable GPU or accelerator device")
    assert opencl.choose("cpu", "cuda") == (preprocess.prepare, "cpu", "")
    assert opencl.choose("auto", "cpu")[1:] == ("cpu", "the engine runs on the CPU")
    fn, what, why = opencl.choose("opencl", "cpu")
    assert isinstance(fn, opencl.OpenClPrepare) and what.startswith("OpenCL ") and why == ""
    if gpu is None:
        with caplog.at_level(logging.INFO):
            assert opencl.choose("auto", "cuda")[1:] == ("cpu", no_gpu)
        assert "pre-processing falls back to the CPU" in caplog.text


def test_missing_pyopencl_falls_back_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(name: str) -> tuple[Any, str]:
        return None, f"ModuleNotFoundError: No module named {name!r}"

    monkeypatch.setattr(opencl, "import_library", missing)
    with caplog.at_level(logging.WARNING):
        fn, what, why = opencl.choose("opencl", "gpu")
    assert fn is preprocess.prepare and what == "cpu"
    assert why == "pyopencl: ModuleNotFoundError: No module named 'pyopencl'"
    assert "falls back to the CPU: pyopencl: ModuleNotFoundError" in caplog.text


def test_segmenter_with_opencl(tmp_path: Path) -> None:
    model = nhwc_model(tmp_path / "rgb.onnx")
    frame = np.zeros((60, 80, 3), np.uint8)
    frame[:, :40, 0] = 200
    frame[:, 40:, 1] = 200
    with Segmenter.open(model, preprocess="opencl") as seg, Segmenter.open(model) as ref:
        info = seg.describe()
        assert info["preprocess"].startswith("OpenCL ") and info["preprocess_fallback"] == ""
        np.testing.assert_array_equal(seg.segment(frame), ref.segment(frame))
