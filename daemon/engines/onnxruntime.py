"""ONNX Runtime engine: CPU, and the CUDA, TensorRT and OpenVINO execution providers.

The execution provider follows the device: ``cpu`` -> CPU, ``cuda[:N]`` -> CUDA,
``gpu``/``npu``/``auto`` (Intel, OpenVINO's names) -> OpenVINO; the option
``provider`` overrides it (``"tensorrt"`` puts TensorRT in front of CUDA, with
its engine and timing caches under ``cache_dir``). onnxruntime-gpu lists GPU
providers even when their CUDA/cuDNN/TensorRT libraries are missing, and ONNX
Runtime then quietly runs on the CPU: after loading, the provider actually in
use is read back from the session and a mismatch is an EngineError, or a loud
warning with ``fallback = "warn"``. :attr:`OnnxRuntimeEngine.device` names the
provider in use.

Options of :meth:`OnnxRuntimeEngine.load`, besides the common ones (base.Options;
``threads`` sets the intra-op threads, ``precision`` "fp16"/"auto" enables fp16
in TensorRT and OpenVINO GPU):

- ``provider``: ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or ``"openvino"``.
- ``providers``: ONNX Runtime execution providers, as ``InferenceSession`` takes
  them (names or ``(name, options)`` pairs): full control, overrides ``provider``.
- ``intra_op_threads``: ONNX Runtime's name for ``threads``.
- ``graph_optimisation``: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
- ``spin``: let idle worker threads spin-wait between runs (default False: on a
  shared edge CPU spinning steals time from acquisition and display).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from daemon.engines.base import (
    Engine,
    Options,
    Probe,
    TensorSpec,
    detect_layout,
    device_index,
    device_kind,
    import_library,
    parse_options,
)
from daemon.errors import EngineError, ModelError

log = logging.getLogger(__name__)

INSTALL = "install it: pip install 'echod[onnxruntime]' (NVIDIA GPUs: 'echod[onnxruntime-gpu]')"
"""How to get this engine, said when its library is missing."""

# Short provider names -> ONNX Runtime's, and the device classes each serves.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_PROVIDER_DEVICES: dict[str, tuple[str, ...]] = {
    "CPUExecutionProvider": ("cpu",),
    "CUDAExecutionProvider": ("cuda",),
    "TensorrtExecutionProvider": ("cuda",),
    "OpenVINOExecutionProvider": ("gpu", "npu", "auto"),
}
_DEVICE_PROVIDER = {
    "cpu": "cpu",
    "cuda": "cuda",
    "gpu": "openvino",
    "npu": "openvino",
    "auto": "openvino",
}

_OPTIMISATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_OPTIONS = ("provider", "providers", "intra_op_threads", "graph_optimisation", "spin")

# ONNX Runtime's type strings -> numpy dtypes.
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}
# ONNX Runtime errors that mean the file is not a usable model (not an engine failure).
_MODEL_ERRORS = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile")


def _first_line(exc: BaseException) -> str:
    """The first line of an ONNX Runtime error, without its ``[ONNXRuntimeError] : N :``."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", str(exc).strip())
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxRuntimeEngine(Engine):
    """One ONNX Runtime ``InferenceSession``."""

    name = "onnxruntime"

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None

    @classmethod
    def probe(cls) -> Probe:
        ort, reason = import_library("onnxruntime")
        if ort is None:
            return Probe(cls.name, None, False, (), f"{reason}; {INSTALL}")
        try:
            providers = ort.get_available_providers()
        except Exception as exc:  # a broken install may fail here too
            return Probe(cls.name, ort.__version__, False, (), f"{type(exc).__name__}: {exc}")
        devices = tuple(dict.fromkeys(d for p in providers for d in _PROVIDER_DEVICES.get(p, ())))
        if not devices:
            return Probe(cls.name, ort.__version__, False, (), f"no usable provider in {providers}")
        return Probe(cls.name, ort.__version__, True, devices, "")

    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        opts = parse_options(self.name, options, _OPTIONS)
        ort, reason = import_library("onnxruntime")
        if ort is None:
            raise EngineError(f"onnxruntime is not usable here: {reason}; {INSTALL}")
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"model file not found: {model}")
        providers = opts.extra.get("providers") or _providers(device, opts)
        so = self._session_options(ort, opts)
        try:
            session = ort.InferenceSession(str(model), sess_options=so, providers=providers)
        except Exception as exc:
            if type(exc).__name__ in _MODEL_ERRORS:
                raise ModelError(f"cannot load model {model}: {_first_line(exc)}") from exc
            raise EngineError(f"onnxruntime cannot load {model}: {_first_line(exc)}") from exc
        used = session.get_providers()
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if used[0] != wanted:
            msg = (
                f"onnxruntime: asked for {wanted} on {device!r} but the session runs on "
                f"{used[0]} (its libraries are missing or do not fit; ONNX Runtime's log says why)"
            )
            if opts.fallback == "error":
                raise EngineError(msg + '; set fallback = "warn" to run there anyway')
            log.warning("%s: RUNNING ON %s", msg, used[0])
        self._session = session
        self.device = used[0]
        self.version = ort.__version__
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        log.info("onnxruntime %s loaded %s on %s", ort.__version__, model, ", ".join(used))

    @staticmethod
    def _session_options(ort: Any, opts: Options) -> Any:
        so = ort.SessionOptions()
        options = opts.extra
        level = str(options.get("graph_optimisation", "all"))
        if level not in _OPTIMISATION:
            raise EngineError(
                f"onnxruntime: graph_optimisation {level!r} is not one of "
                f"{', '.join(_OPTIMISATION)}"
            )
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMISATION[level])
        threads = options.get("intra_op_threads", opts.threads or None)
        if threads is not None:
            if not isinstance(threads, int) or threads < 0:
                raise EngineError(
                    f"onnxruntime: intra_op_threads must be an int >= 0, got {threads!r}"
                )
            so.intra_op_num_threads = threads
        if not options.get("spin", False):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError("onnxruntime: run() before load() or after close()")
        try:
            results = self._session.run(None, dict(inputs))
        except Exception as exc:
            raise EngineError(f"onnxruntime run failed: {_first_line(exc)}") from exc
        return {spec.name: r for spec, r in zip(self.outputs, results, strict=True)}

    def close(self) -> None:
        self._session = None
        super().close()


def _providers(device: str, opts: Options) -> list[Any]:
    """Execution providers for ``device`` (or the ``provider`` option), best first."""
    kind = device_kind(device)
    short = opts.extra.get("provider") or _DEVICE_PROVIDER.get(kind)
    if short is None:
        raise EngineError(
            f"onnxruntime: no execution provider for device {device!r} "
            f"(devices: {', '.join(_DEVICE_PROVIDER)}); set the option provider or providers"
        )
    if short not in PROVIDERS:
        raise EngineError(f"onnxruntime: provider {short!r} is not one of {', '.join(PROVIDERS)}")
    if opts.precision == "bf16":
        raise EngineError('onnxruntime: precision "bf16" is not offered; use "fp32" or "fp16"')
    index = device_index(device)
    fp16 = opts.precision == "fp16" or (opts.precision == "auto" and kind != "cpu")
    cpu = PROVIDERS["cpu"]
    cuda = (PROVIDERS["cuda"], {"device_id": index})
    if short == "cpu":
        return [cpu]
    if short == "cuda":
        return [cuda, cpu]
    if short == "tensorrt":
        trt: dict[str, Any] = {"device_id": index, "trt_fp16_enable": fp16}
        if opts.cache_dir is not None:
            cache = opts.cache_dir / "ort-tensorrt"
            cache.mkdir(parents=True, exist_ok=True)
            trt |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }
        return [(PROVIDERS["tensorrt"], trt), cuda, cpu]
    ov_device = "AUTO" if kind == "auto" else device.strip().upper().replace(":", ".")
    ov: dict[str, Any] = {"device_type": ov_device}
    if kind == "gpu":
        ov["precision"] = "FP16" if fp16 else "FP32"
    if opts.cache_dir is not None:
        (opts.cache_dir / "ort-openvino").mkdir(parents=True, exist_ok=True)
        ov["cache_dir"] = str(opts.cache_dir / "ort-openvino")
    return [(PROVIDERS["openvino"], ov), cpu]


def _spec(arg: Any) -> TensorSpec:
    """TensorSpec of an ONNX Runtime ``NodeArg`` (symbolic or unknown dims -> None)."""
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"tensor {arg.name!r} has type {arg.type}, which echod does not handle")
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorSpec(arg.name, shape, np.dtype(dtype), detect_layout(shape))
