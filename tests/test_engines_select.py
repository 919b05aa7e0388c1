"""Selection per device class, ONNX Runtime's provider checks, `echod engines`,
`--engine NAME:DEVICE`, and the example configurations."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_engines import nhwc_model

from daemon import cli, config
from daemon.engines import registry
from daemon.engines.base import DEVICE_CLASSES, device_index, device_kind, parse_options
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.errors import ConfigError, EngineError

EXAMPLES = Path(__file__).resolve().parent.parent / "config" / "examples"


def test_device_names() -> None:
    assert [device_kind(d) for d in ("CUDA:1", "GPU.1", "AUTO:GPU,CPU", " npu ")] == [
        "cuda",
        "gpu",
        "auto",
        "npu",
    ]
    assert [device_index(d) for d in ("cuda:1", "GPU.2", "cpu", "AUTO:GPU")] == [1, 2, 0, 0]


def test_common_options_are_checked() -> None:
    opts = parse_options("x", {"mode": "all", "cache_dir": "~/c", "own": 1}, ["own"])
    assert opts.mode == "all" and opts.cache_dir == Path.home() / "c" and opts.extra == {"own": 1}
    with pytest.raises(EngineError, match="option precision = 'fp61': did you mean 'fp16'"):
        parse_options("x", {"precision": "fp61"})
    with pytest.raises(EngineError, match="threads must be an int >= 0"):
        parse_options("x", {"threads": -1})


def test_every_device_class_has_a_deterministic_preference() -> None:
    assert set(registry.PREFERENCE) == set(DEVICE_CLASSES)
    for kind, order in registry.PREFERENCE.items():
        assert set(order) <= set(registry.BUILTINS), kind
        assert registry.preference(kind)[: len(order)] == order
    assert registry.preference("cuda:1")[:2] == ("tensorrt", "onnxruntime")


def test_select_explains_every_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = nhwc_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO):
        cls, skipped = registry.select(["tensorrt", "pytorch", "openvino"], "cpu", model)
    assert cls.name == "openvino"
    torch = registry.probe("pytorch")
    why = "does not load .onnx files (loads .pt2, .pt, .ts)" if torch.available else torch.reason
    assert skipped == [
        "tensorrt: ModuleNotFoundError: No module named 'tensorrt'",
        f"pytorch: {why}",
    ]
    assert "engine tensorrt skipped: ModuleNotFoundError" in caplog.text
    with pytest.raises(EngineError) as err:
        registry.select(registry.preference("cuda"), "cuda", model)
    msg = str(err.value)
    assert "tensorrt: ModuleNotFoundError" in msg and "onnxruntime: no device 'cuda'" in msg
    # the same inputs give the same answer
    assert registry.select(["tensorrt", "pytorch", "openvino"], "cpu", model) == (cls, skipped)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_onnxruntime_never_falls_back_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = nhwc_model(tmp_path / "m.onnx")
    with pytest.raises(EngineError, match=r"asked for CUDAExecutionProvider .* runs on CPU"):
        OnnxRuntimeEngine().load(model, "cuda")
    eng = OnnxRuntimeEngine()
    with caplog.at_level(logging.WARNING):
        eng.load(model, "cuda:0", fallback="warn", provider="tensorrt", cache_dir=tmp_path)
    assert eng.device == "CPUExecutionProvider"
    assert "asked for TensorrtExecutionProvider" in caplog.text and "RUNNING ON CPU" in caplog.text
    with pytest.raises(EngineError, match="provider 'rocm' is not one of"):
        OnnxRuntimeEngine().load(model, provider="rocm")
    with pytest.raises(EngineError, match='precision "bf16" is not offered'):
        OnnxRuntimeEngine().load(model, precision="bf16")


def test_echod_engines_lists_every_engine() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "engines", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) >= {"onnxruntime", "openvino", "tensorrt", "pytorch"}
    for r in rows.values():
        assert set(r) == {"name", "version", "available", "devices", "reason"}
    assert rows["onnxruntime"]["available"] and "cpu" in rows["onnxruntime"]["devices"]
    assert rows["openvino"]["available"] and "cpu" in rows["openvino"]["devices"]
    assert not rows["tensorrt"]["available"] and rows["tensorrt"]["version"] is None
    assert rows["tensorrt"]["reason"] == "ModuleNotFoundError: No module named 'tensorrt'"


def test_echod_engines_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["engines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ENGINE", "VERSION", "AVAILABLE", "DEVICES", "REASON"]
    tensorrt = next(ln for ln in lines if ln.startswith("tensorrt"))
    assert " no " in tensorrt and tensorrt.endswith("No module named 'tensorrt'")


def overrides(*argv: str) -> dict[str, object]:
    return cli._overrides(cli._parser().parse_args(["run", *argv]))


def test_engine_name_colon_device() -> None:
    got = overrides("--engine", "openvino:GPU.1")
    assert got["model.engine"] == "openvino" and got["model.device"] == "GPU.1"
    got = overrides("--engine", "pytorch:cuda:1", "--device", "cuda:1")
    assert got["model.engine"] == "pytorch" and got["model.device"] == "cuda:1"
    assert overrides("--engine", "onnxruntime", "--device", "cpu")["model.engine"] == "onnxruntime"
    with pytest.raises(ConfigError, match="names device 'npu' but --device says 'cpu'"):
        overrides("--engine", "openvino:npu", "--device", "cpu")
    cfg = config.load(None, overrides("--engine", "openvino:AUTO:GPU,CPU"))
    assert (cfg.model.engine, cfg.model.device) == ("openvino", "AUTO:GPU,CPU")


@pytest.mark.parametrize("name", ["nuc-igpu", "nuc-npu", "jetson", "workstation-gpu", "cpu-only"])
def test_example_configs_load(name: str) -> None:
    cfg = config.load(EXAMPLES / f"{name}.toml")
    m = cfg.model
    assert device_kind(m.device) in DEVICE_CLASSES
    assert m.engine == "" or m.engine in registry.BUILTINS
    assert m.engine == "" or m.engine in registry.PREFERENCE[device_kind(m.device)]
    parse_options(m.engine or "any", m.options, ["max_batch"])  # common options are valid


def test_preprocess_and_options_settings() -> None:
    cfg = config.load(None, {"model.preprocess": "opencl", "model.options": {"mode": "all"}})
    assert cfg.model.preprocess == "opencl" and cfg.model.options == {"mode": "all"}
    with pytest.raises(ConfigError, match="did you mean 'opencl'"):
        config.load(None, {"model.preprocess": "opencll"})
