"""The OpenVINO engine against the OpenVINO installed here: only API that 2022.3 (the Neural
Compute Stick 2's last release) shares with current releases, and what is missing for a
device it does not see. The Python 3.10 CI run (.ci/py310.sh) runs this file, and the CPU
engine tests, against the real OpenVINO 2022.3.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from test_engines import dynamic_model

from daemon.engines import openvino as ov_engine
from daemon.engines import registry
from daemon.errors import EngineError

SOURCE = Path(ov_engine.__file__)

# Every OpenVINO name (module function, class, method, property, keyword) the engine uses.
# Each is in OpenVINO 2022.3's Python API and in current releases: a name added here must be
# in both (the Python 3.10 CI run checks this list against the real 2022.3).
OPENVINO_2022_3 = frozenset(
    {
        "Core",
        "get_version",
        "available_devices",
        "get_versions",
        "read_model",
        "compile_model",
        "set_property",
        "get_property",
        "create_infer_request",
        "infer",
        "start_async",
        "wait",
        "wait_for",
        "get_output_tensor",
        "data",
        "inputs",
        "outputs",
        "input",
        "reshape",
        "get_partial_shape",
        "get_any_name",
        "get_element_type",
        "get_type_name",
        "get_length",
        "is_static",
        "name",
        "shape",
    }
)
# Property keys the engine sets or reads, all known to 2022.3; EXECUTION_DEVICES is read in a
# try block (2022.3's AUTO may not report it).
PROPERTIES_2022_3 = frozenset(
    {
        "CACHE_DIR",
        "PERFORMANCE_HINT",
        "INFERENCE_NUM_THREADS",
        "INFERENCE_PRECISION_HINT",
        "OPTIMAL_NUMBER_OF_INFER_REQUESTS",
        "EXECUTION_DEVICES",
    }
)
VALUES = {"LATENCY", "THROUGHPUT", "AUTO", "CPU", "GPU", "NPU", "MYRIAD"}  # not property keys


@pytest.fixture(scope="module")
def ov() -> Any:
    module, reason = ov_engine._library()
    if module is None:
        pytest.skip(f"openvino is not importable: {reason}")
    return module


def openvino_names(ov: Any) -> set[str]:
    """Public names of the OpenVINO module and of the classes the engine touches."""
    classes = [ov, ov.Core, ov.CompiledModel, ov.InferRequest, ov.Model, ov.Output]
    classes += [ov.ConstOutput, ov.PartialShape, ov.Dimension, ov.Type, ov.Tensor]
    return {n for c in classes for n in dir(c) if not n.startswith("_")}


def test_the_engine_uses_only_api_openvino_2022_3_has(ov: Any) -> None:
    tree = ast.parse(SOURCE.read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg}
    api = openvino_names(ov)
    newer = (used & api) - OPENVINO_2022_3
    assert not newer, (
        f"{SOURCE.name} calls {sorted(newer)} of OpenVINO {ov.get_version()}: not in the API it "
        "shares with 2022.3 (the Neural Compute Stick's release); keep it out or check 2022.3"
    )
    assert not OPENVINO_2022_3 - api, f"OpenVINO {ov.get_version()} lacks these names"

    keys = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"[A-Z][A-Z_]+", n.value)
    }
    assert keys - VALUES <= PROPERTIES_2022_3, sorted(keys - VALUES - PROPERTIES_2022_3)


def test_what_is_missing_for_a_device_openvino_does_not_see(ov: Any, tmp_path: Path) -> None:
    probe = registry.probe("openvino")
    assert probe.available
    if "myriad" in probe.devices:
        pytest.skip("a Neural Compute Stick 2 is plugged in here")
    why = probe.why_missing("MYRIAD")
    version = ov_engine._version(ov)
    if version >= "2023":
        assert f"OpenVINO {version} has no MYRIAD plugin (2022.3 is the last with it)" in why
    else:  # pip's 2022.3 wheel: the plugin is only in the archive install
        assert "has no MYRIAD plugin" in why and "pip's wheel never had it" in why
    assert "archive install on Python 3.10" in why and "docs/platforms.md" in why
    assert {m.split(":")[0] for m in probe.missing} == {"gpu", "npu", "myriad"} - set(probe.devices)

    # selecting and loading say the same, in one line
    model = dynamic_model(tmp_path / "m.onnx", [1, 1, 32, 32])
    with pytest.raises(EngineError) as err:
        registry.select(["openvino"], "myriad", model)
    assert str(err.value) == (
        f"no engine can run on 'myriad': openvino: no device 'myriad' "
        f"(has {', '.join(probe.devices)}): {why}"
    )
    with pytest.raises(EngineError, match=r"no device MYRIAD here \(has CPU.*\): ") as err:
        ov_engine.OpenVinoEngine().load(model, "myriad")
    assert str(err.value).endswith(why) and "\n" not in str(err.value)
