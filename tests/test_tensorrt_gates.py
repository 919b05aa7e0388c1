"""The TensorRT engine's version gates, against STUB modules (tests/trt_stubs.py).

No TensorRT runs here. These tests check only the *shape of the calls* the engine
makes to TensorRT 8.6, 10.x and 11 APIs as NVIDIA documents them (network flags,
builder flags, the progress monitor's lifetime, tensor types, the cache key);
real builds and results are checked on GPUs by hil_tests/test_gpu_engines.py.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
import trt_stubs
from onnx import TensorProto, helper, numpy_helper

from daemon.engines.tensorrt import TensorRtEngine
from daemon.errors import EngineError, ModelError

Stub = Callable[[str], ModuleType]


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Stub:
    """Install stub ``tensorrt`` (of a given release) and ``cuda.bindings.runtime`` modules."""

    def install(version: str) -> ModuleType:
        trt = trt_stubs.tensorrt_module(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", trt_stubs.cudart_module())
        return trt

    return install


def model(path: Path, dtype: int = TensorProto.FLOAT, out: str = "conv") -> Path:
    """1 channel in, 2 out, dynamic batch; ``out``: "conv", "argmax" (int64), "bf16" (cast)."""
    np_type = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1])]
    result = ("c", dtype, ["n", 2, 32, 32])
    if out == "argmax":
        nodes.append(helper.make_node("ArgMax", ["c"], ["y"], axis=1, keepdims=1))
        result = ("y", TensorProto.INT64, ["n", 1, 32, 32])
    elif out == "bf16":
        nodes.append(helper.make_node("Cast", ["c"], ["y"], to=TensorProto.BFLOAT16))
        result = ("y", TensorProto.BFLOAT16, ["n", 2, 32, 32])
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", dtype, ["n", 1, 32, 32])],
        [helper.make_tensor_value_info(*result)],
        initializer=[numpy_helper.from_array(np.ones((2, 1, 1, 1), np_type), "w")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    return model(tmp_path / "fp32.onnx")


def bit(trt: ModuleType, flag: str) -> int:
    return 1 << int(trt.NetworkDefinitionCreationFlag[flag])


def test_8_6_explicit_batch_fp16_flag_no_progress(
    stub: Stub, fp32: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trt = stub("8.6.1")
    eng = TensorRtEngine()
    with caplog.at_level(logging.INFO, "daemon.engines.tensorrt"):
        eng.load(fp32, "cuda")
    (build,) = trt.builds
    assert build["network_flags"] == bit(trt, "EXPLICIT_BATCH")
    assert build["builder_flags"] == ["FP16"] and not build["strongly_typed"]
    assert build["profiles"] == [{"x": [[1, 1, 32, 32], [1, 1, 32, 32], [8, 1, 32, 32]]}]
    assert not build["monitored"] and "reports no build progress" in caplog.text
    assert eng.device == "cuda:0 Stub Orin (sm 8.7) fp16"
    assert [(s.name, s.shape, s.dtype) for s in eng.inputs] == [
        ("x", (None, 1, 32, 32), np.dtype(np.float32))
    ]
    y = eng.run({"x": np.ones((2, 1, 32, 32), np.float32)})["c"]
    assert y.shape == (2, 2, 32, 32) and y.dtype == np.float32  # a stub computes nothing
    eng.close()


def test_8_6_has_no_bf16(stub: Stub, fp32: Path) -> None:
    stub("8.6.1")
    with pytest.raises(EngineError, match=r"tensorrt 8\.6: cannot build bf16 from the fp32 model"):
        TensorRtEngine().load(fp32, "cuda", precision="bf16")


def test_10_strongly_typed_with_the_models_precision(
    stub: Stub, fp32: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trt = stub("10.3.0")
    with caplog.at_level(logging.INFO, "daemon.engines.tensorrt"):
        TensorRtEngine().load(fp32, "cuda", precision="fp32")
        TensorRtEngine().load(model(tmp_path / "fp16.onnx", TensorProto.FLOAT16), "cuda")
    for build in trt.builds:  # fp32 asked of fp32; auto of an fp16 model
        assert build["network_flags"] == bit(trt, "STRONGLY_TYPED")  # no EXPLICIT_BATCH
        assert build["strongly_typed"] and build["builder_flags"] == []
    # the monitor outlived the builder (the stub's config holds only a weak reference)
    assert all(b["monitored"] for b in trt.builds)
    assert "tensorrt build fp32.onnx: Building engine (2 steps)" in caplog.text
    assert "Tactic selection 100%" in caplog.text


def test_10_lowers_an_fp32_model_with_the_builder_flag(
    stub: Stub, fp32: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trt = stub("10.3.0")
    eng = TensorRtEngine()
    eng.load(fp32, "cuda")  # auto: fp16
    (build,) = trt.builds
    assert build["network_flags"] == 0 and build["builder_flags"] == ["FP16"]
    assert eng.device.endswith(" fp16") and "deprecated" not in caplog.text

    trt = stub("10.13.0.35")
    TensorRtEngine().load(fp32, "cuda", precision="bf16")
    assert trt.builds[0]["builder_flags"] == ["BF16"]
    assert "bf16 through BuilderFlag.BF16, deprecated since 10.12" in caplog.text


def test_11_builds_strongly_typed_only(stub: Stub, fp32: Path) -> None:
    trt = stub("11.0.0")
    with pytest.raises(EngineError, match="export the model in fp16, or set precision to 'fp32'"):
        TensorRtEngine().load(fp32, "cuda", precision="fp16")
    eng = TensorRtEngine()
    eng.load(fp32, "cuda")  # auto: the model's own fp32
    assert trt.builds[-1]["network_flags"] == bit(trt, "STRONGLY_TYPED")
    assert eng.device.endswith(" fp32")


def qdq_model(path: Path) -> Path:
    """The 1x1 conv behind a symmetric int8 QuantizeLinear / DequantizeLinear pair."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node("Conv", ["d", "w"], ["c"], kernel_shape=[1, 1]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 32, 32])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 2, 32, 32])],
        initializer=[
            numpy_helper.from_array(np.array(0.01, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def test_int8_is_explicit_q_dq_with_the_flag_only_where_weakly_typed(
    stub: Stub, tmp_path: Path, fp32: Path
) -> None:
    qdq = qdq_model(tmp_path / "qdq.onnx")
    trt = stub("8.6.1")
    eng = TensorRtEngine()
    eng.load(qdq, "cuda")  # auto: fp16 through the flag, the Q/DQ layers in int8
    assert trt.builds[0]["builder_flags"] == ["FP16", "INT8"]
    assert eng.device.endswith(" fp16 + int8")

    trt = stub("10.3.0")
    eng = TensorRtEngine()
    eng.load(qdq, "cuda", precision="fp32")  # strongly typed: the Q/DQ types say int8
    eng.load(fp32, "cuda", precision="fp32")  # no Q/DQ: no int8
    assert [b["builder_flags"] for b in trt.builds] == [[], []]
    assert all(b["strongly_typed"] for b in trt.builds)
    TensorRtEngine().load(qdq, "cuda")  # auto: weakly typed again, so both flags
    assert trt.builds[2]["builder_flags"] == ["FP16", "INT8"]

    trt = stub("11.0.0")  # no INT8 flag left: strongly typed, explicit only
    eng = TensorRtEngine()
    eng.load(qdq, "cuda")
    assert trt.builds[0]["builder_flags"] == [] and trt.builds[0]["strongly_typed"]
    assert eng.device.endswith(" fp32 + int8")


def test_tensor_types(stub: Stub, tmp_path: Path) -> None:
    stub("10.3.0")
    eng = TensorRtEngine()
    eng.load(model(tmp_path / "argmax.onnx", out="argmax"), "cuda")
    assert eng.outputs[0].dtype == np.int64
    with pytest.raises(ModelError, match="tensor 'y' is BF16, which echod cannot feed or read"):
        TensorRtEngine().load(model(tmp_path / "bf16.onnx", out="bf16"), "cuda")

    stub("8.6.1")  # its parser casts int64 to int32
    eng = TensorRtEngine()
    eng.load(tmp_path / "argmax.onnx", "cuda")
    assert eng.outputs[0].dtype == np.int32


def test_cache_key(
    stub: Stub, fp32: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    trt = stub("10.3.0")
    TensorRtEngine().load(fp32, "cuda", cache_dir=cache)
    (engine,) = (cache / "tensorrt").glob("fp32-*.engine")
    key = json.loads(engine.with_suffix(".json").read_text())
    assert key.keys() == {
        "model_sha256",
        "tensorrt",
        "gpu",
        "compute_capability",
        "precision",
        "shapes",
    }
    assert (key["tensorrt"], key["gpu"], key["compute_capability"], key["precision"]) == (
        "10.3.0",
        "Stub Orin",
        "8.7",
        "fp16",
    )
    TensorRtEngine().load(fp32, "cuda", cache_dir=cache)
    assert len(trt.builds) == 1  # loaded from the cache
    TensorRtEngine().load(fp32, "cuda", cache_dir=cache, precision="fp32")
    assert len(trt.builds) == 2 and len(list((cache / "tensorrt").glob("*.engine"))) == 2
    engine.write_bytes(b"garbage")
    TensorRtEngine().load(fp32, "cuda", cache_dir=cache)
    assert len(trt.builds) == 3 and "does not deserialize; rebuilding" in caplog.text
    stub("8.6.1")
    TensorRtEngine().load(fp32, "cuda", cache_dir=cache)  # another TensorRT: another key
    assert len(list((cache / "tensorrt").glob("*.engine"))) == 3


def test_probe_refuses_older_than_8_6(stub: Stub, fp32: Path) -> None:
    stub("8.5.2")
    probe = TensorRtEngine.probe()
    assert not probe.available and "tensorrt 8.5.2 is older than 8.6" in probe.reason
    with pytest.raises(EngineError, match=r"older than 8\.6"):
        TensorRtEngine().load(fp32, "cuda")
    stub("8.6.1")
    assert TensorRtEngine.probe().devices == ("cuda",)
