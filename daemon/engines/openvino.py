"""OpenVINO engine: ONNX and IR (``.xml`` + ``.bin``) models on CPU, GPU, NPU, MYRIAD, AUTO.

Only API present both in OpenVINO 2022.3 and in current releases is used
(``Core`` from ``openvino`` or, in 2022.x, ``openvino.runtime``; string-keyed
properties; ``InferRequest.infer``/``start_async``/``wait``/``wait_for``;
``get_output_tensor(i).data``), so one module serves every device. Version
pins per device (pip package ``openvino``):

| device | what | OpenVINO |
| --- | --- | --- |
| ``CPU`` | x86-64 (SSE4.2 and up), ARM64 | >= 2022.3; model cache on CPU from 2023.0 |
| ``GPU`` | Intel iGPU / Arc, through its OpenCL driver (intel-opencl-icd) | >= 2022.3 |
| ``NPU`` | Intel Core Ultra NPU (intel-npu-driver) | >= 2024.0 |
| ``MYRIAD`` | Neural Compute Stick 2 (Movidius Myriad X) | == 2022.3.* (LTS; removed in 2023.0) |
| ``AUTO`` | OpenVINO picks among the above | >= 2022.3 |

Devices are named as OpenVINO names them, case-insensitively (``gpu.1`` is
``GPU.1``, ``AUTO:GPU,CPU`` passes through). NPU and MYRIAD need static shapes:
a dynamic batch is fixed to 1, other dynamic dimensions are refused.

Modes (common option ``mode``): ``"newest"`` compiles with the LATENCY hint and
one request; ``"all"`` with the THROUGHPUT hint and the device's optimal number
of infer requests (at least 2) plus one, kept in flight by :meth:`OpenVinoEngine.submit`.
Compiled models are cached under ``cache_dir/openvino`` (OpenVINO's CACHE_DIR).
``precision`` sets INFERENCE_PRECISION_HINT: ``"auto"`` is f32 on the CPU (as the
other CPU engines; OpenVINO's own default there is bf16 on CPUs that have it,
about twice as fast on this project's AVX512-BF16 CI machine but about 0.06 off
in probabilities: ask for ``"bf16"``) and the device's default (f16) elsewhere.

Own options: ``requests`` (infer requests for mode "all"; 0 = the device's optimum + 1).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from daemon.engines.base import (
    Engine,
    Pending,
    Probe,
    TensorSpec,
    detect_layout,
    device_kind,
    import_library,
    parse_options,
)
from daemon.errors import EngineError, ModelError

log = logging.getLogger(__name__)

INSTALL = (
    "install it: pip install 'echod[openvino]' (Neural Compute Stick 2: "
    "pip install 'openvino==2022.3.*')"
)
"""How to get this engine, said when its library is missing."""

_OPTIONS = ("requests",)
_DTYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "f64": np.float64,
    "u8": np.uint8,
    "i8": np.int8,
    "u16": np.uint16,
    "i16": np.int16,
    "i32": np.int32,
    "i64": np.int64,
    "boolean": np.bool_,
}
_STATIC_ONLY = ("npu", "myriad")
_ACCELERATORS = ("gpu", "npu", "myriad")  # explained by ``missing_devices`` when absent
_MYRIAD_INSTALL = (
    "OpenVINO 2022.3's archive install on Python 3.10 (numpy < 1.25): docs/platforms.md"
)
_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def _library() -> tuple[Any, str]:
    """OpenVINO's runtime module (``openvino`` >= 2023.1, ``openvino.runtime`` before)."""
    ov, reason = import_library("openvino")
    if ov is not None and hasattr(ov, "Core"):
        return ov, ""
    runtime, reason2 = import_library("openvino.runtime")
    return runtime, reason2 if ov is not None else reason


def ov_device(device: str) -> str:
    """OpenVINO's spelling of ``device``: ``"gpu:1"`` -> ``"GPU.1"``."""
    name = device.strip().upper()
    kind, sep, rest = name.partition(":")
    return name if kind == "AUTO" else (kind + "." + rest if sep else kind)


def dynamic_inputs(model: Path) -> list[str]:
    """Inputs of an ONNX model with a dynamic dimension other than the batch."""
    import onnx

    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception:  # unreadable: the loader reports it properly
        return []
    weights = {t.name for t in graph.initializer}
    return [
        i.name
        for i in graph.input
        if i.name not in weights
        and any(not d.HasField("dim_value") for d in list(i.type.tensor_type.shape.dim)[1:])
    ]


class OpenVinoEngine(Engine):
    """One compiled OpenVINO model and its infer requests."""

    name = "openvino"
    formats = (".onnx", ".xml")

    def __init__(self) -> None:
        super().__init__()
        self._compiled: Any = None
        self._request: Any = None  # for run()
        self._requests: list[Any] = []  # for submit()
        self._next = 0
        self._inflight: deque[Pending] = deque()

    @classmethod
    def probe(cls) -> Probe:
        ov, reason = _library()
        if ov is None:
            return Probe(cls.name, None, False, (), f"{reason}; {INSTALL}")
        version = _version(ov)
        try:
            found = ov.Core().available_devices
        except Exception as exc:  # a broken plugin may fail here
            return Probe(cls.name, version, False, (), f"{type(exc).__name__}: {exc}")
        devices = tuple(dict.fromkeys([*(device_kind(d) for d in found), "auto"]))
        return Probe(cls.name, version, True, devices, "", missing_devices(ov, ov.Core()))

    @classmethod
    def supports(cls, model: Path, device: str) -> str:
        why = super().supports(model, device)
        if why or device_kind(device) not in _STATIC_ONLY or Path(model).suffix != ".onnx":
            return why
        dynamic = dynamic_inputs(model)
        if dynamic:
            kind = device_kind(device).upper()
            return f"{kind} needs static shapes; input {dynamic[0]!r} is dynamic"
        return ""

    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        opts = parse_options(self.name, options, _OPTIONS)
        requests = opts.extra.get("requests", 0)
        if not isinstance(requests, int) or isinstance(requests, bool) or requests < 0:
            raise EngineError(f"openvino: option requests must be an int >= 0, got {requests!r}")
        ov, reason = _library()
        if ov is None:
            raise EngineError(f"openvino is not usable here: {reason}; {INSTALL}")
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"model file not found: {model}")
        if model.suffix not in self.formats:
            raise ModelError(f"openvino loads .onnx and .xml (IR) models, not {model.name}")
        target = ov_device(device)
        core = ov.Core()
        kind = device_kind(device)
        if kind != "auto" and kind not in {device_kind(d) for d in core.available_devices}:
            why = _why_missing(ov, core, kind)
            raise EngineError(
                f"openvino: no device {target} here (has {', '.join(core.available_devices)})"
                + (f": {why}" if why else "")
            )
        if opts.cache_dir is not None:
            cache = opts.cache_dir / "openvino"
            cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache)})
        try:
            net = core.read_model(str(model))
        except Exception as exc:
            raise ModelError(f"cannot load model {model}: {_first_line(exc)}") from exc
        if kind in _STATIC_ONLY:
            _make_static(net, target)
        config = {"PERFORMANCE_HINT": "THROUGHPUT" if opts.mode == "all" else "LATENCY"}
        if opts.threads and kind == "cpu":
            config["INFERENCE_NUM_THREADS"] = str(opts.threads)
        precision = "fp32" if opts.precision == "auto" and kind == "cpu" else opts.precision
        if precision in _PRECISION:
            config["INFERENCE_PRECISION_HINT"] = _PRECISION[precision]
        try:
            compiled = core.compile_model(net, target, config)
        except Exception as exc:
            raise EngineError(
                f"openvino cannot compile {model} for {target}: {_first_line(exc)}"
            ) from exc
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        n = 1
        if opts.mode == "all":
            # one more than the device's optimum: the device stays busy while the caller
            # handles a result (case 1, 2 CPU cores: about 15 % more frames/s)
            optimal = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            n = requests or max(2, optimal) + 1
            self._requests = [compiled.create_infer_request() for _ in range(n)]
        self.version = _version(ov)
        self.device = target if kind != "auto" else f"AUTO ({_auto_choice(compiled)})"
        self.inputs = [_spec(p, f"input{i}") for i, p in enumerate(compiled.inputs)]
        self.outputs = [_spec(p, f"output{i}") for i, p in enumerate(compiled.outputs)]
        log.info(
            "openvino %s compiled %s for %s: %s hint, %d request(s) in flight",
            self.version,
            model,
            self.device,
            config["PERFORMANCE_HINT"],
            n,
        )

    @property
    def depth(self) -> int:
        return max(1, len(self._requests))

    @property
    def max_batch(self) -> int:
        """1: the THROUGHPUT hint already runs requests side by side (streams; on GPUs it
        batches them itself), and a new batch size reshapes the model."""
        return 1

    def _live(self) -> None:
        if self._compiled is None:
            raise EngineError("openvino: run() before load() or after close()")

    def _outputs(self, request: Any, copy: bool = True) -> dict[str, np.ndarray]:
        """The request's outputs: copies, or views of its tensors (``copy=False``: valid
        until the request runs again)."""
        return {
            spec.name: np.array(request.get_output_tensor(i).data, copy=copy)
            for i, spec in enumerate(self.outputs)
        }

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._live()
        try:
            self._request.infer(dict(inputs))
        except Exception as exc:
            raise EngineError(f"openvino run failed: {_first_line(exc)}") from exc
        return self._outputs(self._request)

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Pending:
        """Start an inference on the next free infer request (mode "all"), else run it now."""
        self._live()
        if not self._requests:
            return super().submit(inputs)
        if len(self._inflight) >= len(self._requests):
            self._inflight.popleft().detach()  # its request runs again below
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        feed = dict(inputs)
        try:
            request.start_async(feed)
        except Exception as exc:
            raise EngineError(f"openvino submit failed: {_first_line(exc)}") from exc

        # ``feed`` is bound to ``wait`` so the arrays outlive the request in every release
        # (2022.3 may share their memory instead of copying).
        def wait(feed: dict[str, np.ndarray] = feed) -> dict[str, np.ndarray]:
            try:
                request.wait()
            except Exception as exc:
                raise EngineError(f"openvino run failed: {_first_line(exc)}") from exc
            return self._outputs(request, copy=False)  # the request runs again `depth` later

        pending = Pending(wait, lambda: bool(request.wait_for(0)))
        self._inflight.append(pending)
        return pending

    def close(self) -> None:
        for p in self._inflight:
            p.wait()
        self._inflight.clear()
        self._requests = []
        self._request = None
        self._compiled = None
        super().close()


def missing_devices(ov: Any, core: Any) -> tuple[str, ...]:
    """``"myriad: what is missing"`` for each Intel accelerator class OpenVINO does not see."""
    found = {device_kind(d) for d in core.available_devices}
    return tuple(f"{k}: {_why_missing(ov, core, k)}" for k in _ACCELERATORS if k not in found)


def _why_missing(ov: Any, core: Any, kind: str) -> str:
    """What is missing for device class ``kind`` (gpu, npu, myriad); "" for any other."""
    version = _version(ov)
    year = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    try:
        plugin = "" if core.get_versions(kind.upper()) else "not in this OpenVINO"
    except Exception as exc:  # 2022.3: an unknown or broken plugin raises
        plugin = _first_line(exc)
    if kind == "myriad":
        if year >= (2023, 0):
            return (
                f"OpenVINO {version} has no MYRIAD plugin (2022.3 is the last with it): the "
                f"Neural Compute Stick 2 needs {_MYRIAD_INSTALL}"
            )
        if plugin:
            return (
                f"this OpenVINO {version} has no MYRIAD plugin ({plugin}; pip's wheel never "
                f"had it): the Neural Compute Stick 2 needs {_MYRIAD_INSTALL}"
            )
        return (
            "the MYRIAD plugin sees no Neural Compute Stick 2: plug it in, install the "
            "Movidius udev rules (97-myriad-usbboot.rules) and reload udev; see docs/platforms.md"
        )
    if kind == "npu":
        if year < (2024, 0):
            return f"OpenVINO {version} has no NPU plugin (NPU: OpenVINO >= 2024.0)"
        if plugin:
            return f"this OpenVINO {version} has no NPU plugin ({plugin})"
        return (
            "the NPU plugin finds no NPU: an Intel Core Ultra needs the intel-npu-driver "
            "(/dev/accel/accel0) and the user in the render group; see docs/platforms.md"
        )
    if kind == "gpu":
        fix = (
            "an Intel iGPU needs its compute runtime (Debian: intel-opencl-icd) and the user "
            "in the render group"
        )
        return (
            f"the GPU plugin does not load ({plugin}): {fix}"
            if plugin
            else (f"the GPU plugin finds no Intel GPU: {fix}")
        )
    return ""


def _version(ov: Any) -> str:
    """``"2026.4.1"`` of ``"2026.4.1-22982-e213a147257-releases/2026/4"``."""
    return str(ov.get_version()).split("-")[0]


def _make_static(net: Any, target: str) -> None:
    """Fix a dynamic batch to 1 (NPU/MYRIAD); refuse other dynamic dimensions."""
    shapes = {}
    for i, port in enumerate(net.inputs):
        dims = list(port.get_partial_shape())
        name = _name(port, f"input{i}")
        if any(not d.is_static for d in dims[1:]):
            raise EngineError(
                f"openvino: {target} needs static shapes; input {name!r} is "
                f"{port.get_partial_shape()}: export the model with a fixed size"
            )
        if dims and not dims[0].is_static:
            shapes[name] = [1, *(d.get_length() for d in dims[1:])]
    if shapes:
        net.reshape(shapes)


def _auto_choice(compiled: Any) -> str:
    try:
        return ", ".join(compiled.get_property("EXECUTION_DEVICES"))
    except Exception:  # older releases do not report it
        return "device chosen by OpenVINO"


def _name(port: Any, default: str) -> str:
    try:
        return str(port.get_any_name())
    except Exception:  # an IR tensor without a name
        return default


def _spec(port: Any, default: str) -> TensorSpec:
    """TensorSpec of an OpenVINO port (dynamic dims -> None)."""
    name = _name(port, default)
    kind = port.get_element_type().get_type_name()
    dtype = _DTYPES.get(kind)
    if dtype is None:
        raise ModelError(f"tensor {name!r} has type {kind}, which echod does not handle")
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(name, shape, np.dtype(dtype), detect_layout(shape))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
