"""OpenVINO on Intel accelerators (iGPU, NPU, Neural Compute Stick 2), each against ONNX
Runtime on the CPU. Each skips with what is missing (the probe's explanation) where its
device is absent; docs/platforms.md says how to install each.

Tolerances: these devices compute in fp16 by default (``FP16_ATOL`` in probabilities, at
most ``FP16_FLIPS`` of labels different, as in test_gpu_engines.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.engines.openvino import OpenVinoEngine
from daemon.engines.reference import ensure_reference

FP16_ATOL = 2e-2
FP16_FLIPS = 5e-3


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_reference("unet2d-256", tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("device", ["GPU", "NPU", "MYRIAD"])
def test_openvino_device_agrees_with_the_cpu(device: str, unet: Path) -> None:
    probe = OpenVinoEngine.probe()
    if not probe.available:
        pytest.skip(f"openvino: {probe.reason}")
    if device.lower() not in probe.devices:
        pytest.skip(f"openvino {probe.version}: no {device}: {probe.why_missing(device)}")
    x = np.random.default_rng(11).random((1, 1, 256, 256), np.float32)
    ref = OnnxRuntimeEngine()
    ref.load(unet, "cpu")
    eng = OpenVinoEngine()
    eng.load(unet, device)  # NPU, MYRIAD: the dynamic batch is fixed to 1
    assert eng.device == device
    y, want = eng.run({"image": x})["probabilities"], ref.run({"image": x})["probabilities"]
    np.testing.assert_allclose(y, want, rtol=0, atol=FP16_ATOL)
    assert float(np.mean(y.argmax(1) != want.argmax(1))) <= FP16_FLIPS
