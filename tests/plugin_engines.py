"""Engines that third parties could ship, for the supervisor's tests: registered through
the real ``echod.engines`` entry-point group (see :func:`install`), they run a real
model with ONNX Runtime and misbehave on purpose where a real engine or driver might.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from daemon.engines import registry
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.stage import progress

LOAD_S = "ECHOD_TEST_LOAD_S"


class SlowEngine(OnnxRuntimeEngine):
    """Takes ``$ECHOD_TEST_LOAD_S`` seconds to load (a big model, a TensorRT build)."""

    name = "slow"

    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        time.sleep(float(os.environ.get(LOAD_S, "0")))
        super().load(model, device, **options)


class BuildingEngine(OnnxRuntimeEngine):
    """Builds for ``$ECHOD_TEST_LOAD_S`` seconds and says how far it got, as a TensorRT first
    build does through its progress monitor."""

    name = "building"

    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        total = float(os.environ.get(LOAD_S, "0"))
        end = time.monotonic() + total
        while (left := end - time.monotonic()) > 0:
            progress(f"building {100 * (1 - left / total):.0f}%")
            time.sleep(min(0.05, left))
        super().load(model, device, **options)


class PoisonEngine(OnnxRuntimeEngine):
    """Raises on an all-white frame (a driver that chokes on one input)."""

    name = "poison"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = next(iter(inputs.values()))
        if x.size and float(x.min()) >= 0.999:
            raise RuntimeError("kernel fault on this input\n(a second line nobody needs)")
        return super().run(inputs)


def install(folder: Path) -> None:
    """Register the engines above as an installed distribution in ``folder`` (on sys.path:
    spawned stage processes inherit it)."""
    info = folder / "echod_test_engines-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: echod-test-engines\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[echod.engines]\n"
        "slow = tests.plugin_engines:SlowEngine\n"
        "building = tests.plugin_engines:BuildingEngine\n"
        "poison = tests.plugin_engines:PoisonEngine\n"
    )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    registry._third_party.cache_clear()
