"""ONNX Runtime engine: CPU now; other execution providers through ``providers``.

Options of :meth:`OnnxRuntimeEngine.load`:

- ``providers``: ONNX Runtime execution providers, as ``InferenceSession`` takes
  them (names or ``(name, options)`` pairs); default from the device.
- ``intra_op_threads``: threads inside one operator (0 = ONNX Runtime decides).
- ``graph_optimisation``: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
- ``spin``: let idle worker threads spin-wait between runs (default False: on a
  shared edge CPU spinning steals time from acquisition and display).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daemon.engines.base import (
    Engine,
    Probe,
    TensorSpec,
    detect_layout,
    device_kind,
    import_library,
)
from daemon.errors import EngineError, ModelError

log = logging.getLogger(__name__)

# Execution provider -> device class it runs on; add a provider here (and to
# _DEVICE_PROVIDERS) to make it selectable by device.
_PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu"}
_DEVICE_PROVIDERS: dict[str, list[str]] = {"cpu": ["CPUExecutionProvider"]}

_OPTIMISATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_OPTIONS = ("providers", "intra_op_threads", "graph_optimisation", "spin")

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
            return Probe(cls.name, None, False, (), reason)
        try:
            providers = ort.get_available_providers()
        except Exception as exc:  # a broken install may fail here too
            return Probe(cls.name, ort.__version__, False, (), f"{type(exc).__name__}: {exc}")
        devices = tuple(
            dict.fromkeys(_PROVIDER_DEVICE[p] for p in providers if p in _PROVIDER_DEVICE)
        )
        if not devices:
            return Probe(cls.name, ort.__version__, False, (), f"no usable provider in {providers}")
        return Probe(cls.name, ort.__version__, True, devices, "")

    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        unknown = [k for k in options if k not in _OPTIONS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], _OPTIONS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(_OPTIONS)}"
            raise EngineError(f"onnxruntime: unknown option {unknown[0]!r}: {hint}")
        ort, reason = import_library("onnxruntime")
        if ort is None:
            raise EngineError(f"onnxruntime is not usable here: {reason}")
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"model file not found: {model}")
        providers = self._providers(device, options.get("providers"))
        so = self._session_options(ort, options)
        try:
            session = ort.InferenceSession(str(model), sess_options=so, providers=providers)
        except Exception as exc:
            if type(exc).__name__ in _MODEL_ERRORS:
                raise ModelError(f"cannot load model {model}: {_first_line(exc)}") from exc
            raise EngineError(f"onnxruntime cannot load {model}: {_first_line(exc)}") from exc
        used = session.get_providers()
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if used[0] != wanted:
            log.warning("onnxruntime: asked for %s, running on %s", wanted, used[0])
        self._session = session
        self.device = used[0]
        self.version = ort.__version__
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        log.info("onnxruntime %s loaded %s on %s", ort.__version__, model, ", ".join(used))

    @staticmethod
    def _providers(device: str, providers: Sequence[Any] | None) -> list[Any]:
        if providers:
            return list(providers)
        found = _DEVICE_PROVIDERS.get(device_kind(device))
        if found is None:
            raise EngineError(
                f"onnxruntime: no execution provider for device {device!r} "
                f"(known: {', '.join(_DEVICE_PROVIDERS)}); pass providers=[...]"
            )
        return found

    @staticmethod
    def _session_options(ort: Any, options: Mapping[str, Any]) -> Any:
        so = ort.SessionOptions()
        level = str(options.get("graph_optimisation", "all"))
        if level not in _OPTIMISATION:
            raise EngineError(
                f"onnxruntime: graph_optimisation {level!r} is not one of "
                f"{', '.join(_OPTIMISATION)}"
            )
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMISATION[level])
        threads = options.get("intra_op_threads")
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


def _spec(arg: Any) -> TensorSpec:
    """TensorSpec of an ONNX Runtime ``NodeArg`` (symbolic or unknown dims -> None)."""
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"tensor {arg.name!r} has type {arg.type}, which echod does not handle")
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorSpec(arg.name, shape, np.dtype(dtype), detect_layout(shape))
