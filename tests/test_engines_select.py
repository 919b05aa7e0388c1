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


def why_skipped(name: str, device: str) -> str:
    """What selection says of engine ``name`` on ``device`` here, where it cannot run there
    (its library missing, or installed for other devices: TensorRT on a GPU machine)."""
    p = registry.probe(name)
    return p.reason if not p.available else f"no device {device!r} (has {', '.join(p.devices)})"


def test_select_explains_every_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = nhwc_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO):
        cls, skipped = registry.select(["tensorrt", "pytorch", "openvino"], "cpu", model)
    assert cls.name == "openvino"
    torch = registry.probe("pytorch")
    why = "does not load .onnx files (loads .pt2, .pt, .ts)" if torch.available else torch.reason
    assert skipped == [f"tensorrt: {why_skipped('tensorrt', 'cpu')}", f"pytorch: {why}"]
    assert f"engine tensorrt skipped: {why_skipped('tensorrt', 'cpu')}" in caplog.text
    with pytest.raises(EngineError) as err:
        registry.select(["tensorrt", "onnxruntime"], "myriad", model)
    msg = str(err.value)
    assert msg.startswith("no engine can run on 'myriad': ")
    assert f"tensorrt: {why_skipped('tensorrt', 'myriad')}" in msg
    assert "onnxruntime: no device 'myriad'" in msg
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


INSTALL_HINTS = {
    "onnxruntime": "pip install 'echod[onnxruntime]'",
    "openvino": "pip install 'echod[openvino]'",
    "pytorch": "pip install 'echod[torch]'",
    "tensorrt": "JetPack",
}


def test_echod_engines_lists_every_engine_and_how_to_get_a_missing_one() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "engines", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) >= set(INSTALL_HINTS)
    for r in rows.values():
        assert set(r) == {"name", "version", "available", "devices", "reason", "missing"}
        assert r["available"] == (r["reason"] == ""), r
    assert rows["onnxruntime"]["available"] and "cpu" in rows["onnxruntime"]["devices"]
    assert rows["openvino"]["available"] and "cpu" in rows["openvino"]["devices"]
    for name, hint in INSTALL_HINTS.items():
        if rows[name]["version"] is None:  # its library is missing here
            assert not rows[name]["available"] and hint in rows[name]["reason"], rows[name]
    trt = registry.probe("tensorrt")
    if trt.version is None:
        assert "JetPack" in trt.reason and "pip install 'echod[tensorrt]'" in trt.reason


def test_echod_engines_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["engines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ENGINE", "VERSION", "AVAILABLE", "DEVICES", "REASON"]
    for p in registry.probe_all():
        row = next(ln for ln in lines if ln.startswith(p.name + " "))
        assert f" {'yes' if p.available else 'no'} " in row and row.rstrip().endswith(p.reason)


def overrides(*argv: str) -> dict[str, object]:
    return cli._overrides(cli._parser().parse_args(["run", *argv]))[0]


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
