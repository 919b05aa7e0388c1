"""TensorRT engine (TensorRT 8.6 and 10.x, extra ``tensorrt``): ONNX models on NVIDIA GPUs.

The first load of a model builds a TensorRT engine from the ONNX file (minutes
for a large network; on TensorRT >= 10 the builder's phases are logged as they
go) and serializes it under ``cache_dir/tensorrt``. The file name carries a key
of the model's SHA-256, the TensorRT version, the GPU's name and compute
capability, the precision and the optimisation profile's shapes, so an engine
copied to another GPU or TensorRT is rebuilt rather than loaded (FAST's key
lacks the GPU); one that fails to deserialize is rebuilt too. Autotuning
results are kept in a timing cache per GPU and TensorRT version beside it,
which makes rebuilds (other shapes, other models) much faster.

One module serves TensorRT 8.6 (JetPack 6.0) and 10.x; what differs is decided
once, in :class:`Gates`, from what the module has:

- network: 8.6 needs the ``EXPLICIT_BATCH`` flag (without it the network is
  implicit-batch, which the ONNX parser refuses); 10.x is always explicit
  batch, and ``STRONGLY_TYPED`` where no builder flag is needed.
- precision below the model's own: ``BuilderFlag.FP16`` on 8.6 (no ``BF16``
  before 9); ``FP16``/``BF16`` on 10.x, deprecated since 10.12 and gone in 11
  (export the model in that precision instead).
- build progress: none on 8.6 (no ``IProgressMonitor``); logged on 10.x, the
  monitor held by the engine for as long as the builder lives, as the API requires.
- tensor types: FLOAT, HALF, INT8, INT32, BOOL, UINT8, and INT64 on 10.x; BF16,
  FP8, INT4 or FP4 inputs and outputs are refused (numpy has no such type).

Precision: a network is strongly typed (10.x) when the precision asked for is
the model's own float type (``fp32`` for an fp32 model, ``fp16``/``auto`` for
an fp16 one); a lower one is reached with the builder flag while this
TensorRT has it. ``"auto"`` is fp16 where the builder can lower an fp32
model, else the model's own type.

int8 is explicit: a model with QuantizeLinear / DequantizeLinear nodes (symmetric,
as ``echod models calibrate`` writes for TensorRT) is built with those layers in
int8. A strongly typed network needs no flag for that; a weakly typed one (8.6, or a
float precision lowered by a flag) gets ``BuilderFlag.INT8``. TensorRT's implicit
int8 calibrators are not used: deprecated in 10.x, gone in 11.

Dynamic dimensions get one optimisation profile: the batch (axis 0) from 1 to
``max_batch`` (optimum 1), any other dynamic dimension from 32 to 1024
(optimum 256), unless the option ``shapes`` gives ``{input: [min, opt, max]}``
shapes. Device memory and the stream are cuda-python's
(``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6).

Own options: ``max_batch`` (int, default 8), ``shapes``, ``workspace_mb``
(builder scratch memory, default 1024).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
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

INSTALL = (
    "on a Jetson, TensorRT comes with JetPack (apt install nvidia-jetpack; a venv made with "
    "--system-site-packages sees it); elsewhere install NVIDIA's wheels: "
    "pip install 'echod[tensorrt]' (needs NVIDIA's driver)"
)
"""How to get this engine, said when its library is missing."""

_OPTIONS = ("max_batch", "shapes", "workspace_mb")
_DYNAMIC = (32, 256, 1024)  # min, opt, max of a dynamic non-batch dimension
OLDEST = (8, 6)  # JetPack 6.0's TensorRT; 8.5 (JetPack 5) runs only on Python 3.8
# TensorRT tensor types that numpy holds (by DataType member name; INT64 from 10.0)
_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}
# ONNX float element types -> echod precision names
_ONNX_FLOAT = {1: "fp32", 10: "fp16", 16: "bf16"}


def version_of(trt: Any) -> tuple[int, int]:
    """``(10, 12)`` of ``"10.12.0.36"``."""
    m = re.match(r"(\d+)\.(\d+)", str(trt.__version__))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@dataclass(frozen=True)
class Gates:
    """What this TensorRT's Python API has, decided once from the module (8.6 or 10.x)."""

    version: tuple[int, int]
    explicit_batch_flag: bool  # < 10: networks are implicit-batch without EXPLICIT_BATCH
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (>= 9)
    progress: bool  # IProgressMonitor and IBuilderConfig.progress_monitor (>= 10)
    lowering: tuple[str, ...]  # precisions a builder flag can lower to: "fp16", "bf16"

    @classmethod
    def of(cls, trt: Any) -> Gates:
        version = version_of(trt)
        return cls(
            version=version,
            explicit_batch_flag=version < (10, 0),
            strongly_typed=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
            progress=hasattr(trt, "IProgressMonitor"),
            lowering=tuple(p for p in ("fp16", "bf16") if hasattr(trt.BuilderFlag, p.upper())),
        )

    def network_flags(self, trt: Any, strongly_typed: bool) -> int:
        """The ``create_network`` flags: explicit batch before 10, strongly typed if asked."""
        flags = 0
        if self.explicit_batch_flag:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return flags

    def plan(self, asked: str, model: str) -> tuple[str, bool]:
        """``(precision, strongly typed)`` for precision ``asked`` of a ``model``-typed network.

        The model's own type needs no builder flag: strongly typed where this
        TensorRT can. A lower one needs the flag; without it, an EngineError says how.
        """
        name = ".".join(map(str, self.version))
        if asked == "auto":
            asked = "fp16" if model == "fp32" and "fp16" in self.lowering else model
        if asked == model:
            return asked, self.strongly_typed
        if asked == "fp32":
            raise EngineError(
                f"tensorrt {name}: the model is {model}; precision fp32 needs an fp32 model"
            )
        if asked not in self.lowering:
            why = f"this TensorRT has no BuilderFlag.{asked.upper()}"
            if self.version >= (11, 0):
                why += " (TensorRT 11 builds strongly typed networks only)"
            raise EngineError(
                f"tensorrt {name}: cannot build {asked} from the {model} model: {why}; "
                f"export the model in {asked}, or set precision to {model!r}"
            )
        return asked, False


def numpy_dtype(trt: Any, dtype: Any, tensor: str) -> np.dtype[Any]:
    """The numpy type of a TensorRT tensor type; a ModelError for one numpy cannot hold."""
    for member, np_type in _NUMPY.items():
        if getattr(trt.DataType, member, None) == dtype:
            return np.dtype(np_type)
    kind = getattr(dtype, "name", str(dtype))
    raise ModelError(
        f"tensorrt: tensor {tensor!r} is {kind}, which echod cannot feed or read as a numpy "
        f"array: export the model with {', '.join(k.lower() for k in _NUMPY)} inputs and outputs"
    )


def _cudart() -> tuple[Any, str]:
    rt, reason = import_library("cuda.bindings.runtime")
    if rt is not None:
        return rt, ""
    old, _ = import_library("cuda.cudart")
    return (old, "") if old is not None else (None, reason)


def _check(result: Any) -> Any:
    """Unpack a cuda-python call's ``(error, *values)``; raise EngineError on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"tensorrt: CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def _gpu(cudart: Any, index: int) -> tuple[str, str]:
    """The GPU's name and compute capability (``"8.6"``)."""
    props = _check(cudart.cudaGetDeviceProperties(index))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return str(name).strip("\x00 "), f"{props.major}.{props.minor}"


def _library() -> tuple[Any, Any, str]:
    trt, reason = import_library("tensorrt")
    if trt is None:
        return None, None, reason
    cudart, reason = _cudart()
    if cudart is None:
        return None, None, f"cuda-python: {reason}"
    return trt, cudart, ""


class TensorRtEngine(Engine):
    """One deserialized TensorRT engine with its execution context and device buffers."""

    name = "tensorrt"
    formats = (".onnx",)

    def __init__(self) -> None:
        super().__init__()
        self._trt: Any = None
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._monitor: Any = None  # the build's progress monitor: must outlive the builder
        self._max_batch = 1

    @classmethod
    def probe(cls) -> Probe:
        trt, cudart, reason = _library()
        if trt is None:
            return Probe(cls.name, None, False, (), f"{reason}; {INSTALL}")
        version = str(trt.__version__)
        if version_of(trt) < OLDEST:
            return Probe(
                cls.name,
                version,
                False,
                (),
                f"tensorrt {version} is older than {'.'.join(map(str, OLDEST))}, the oldest "
                "echod supports (JetPack 6)",
            )
        try:
            count = _check(cudart.cudaGetDeviceCount())
        except Exception as exc:  # no driver
            return Probe(cls.name, version, False, (), f"no CUDA device: {exc}")
        if not count:
            return Probe(cls.name, version, False, (), "no CUDA device")
        return Probe(cls.name, version, True, ("cuda",), "")

    def load(self, model: Path, device: str = "cuda", **options: Any) -> None:
        opts = parse_options(self.name, options, _OPTIONS)
        trt, cudart, reason = _library()
        if trt is None:
            raise EngineError(f"tensorrt is not usable here: {reason}; {INSTALL}")
        if version_of(trt) < OLDEST:
            raise EngineError(f"tensorrt: {self.probe().reason}")
        if device_kind(device) != "cuda":
            raise EngineError(f"tensorrt: no device {device!r} (cuda[:N])")
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"model file not found: {model}")
        index = device_index(device)
        _check(cudart.cudaSetDevice(index))
        self._trt, self._cudart = trt, cudart
        logger = _logger(trt)
        gpu, cc = _gpu(cudart, index)
        data = model.read_bytes()
        graph = _graph(model)
        gates = Gates.of(trt)
        precision, strongly_typed = gates.plan(opts.precision, _model_precision(graph))
        int8 = _quantized(graph)
        shapes = _profile(graph, opts)
        key = {
            "model_sha256": hashlib.sha256(data).hexdigest(),
            "tensorrt": str(trt.__version__),
            "gpu": gpu,
            "compute_capability": cc,
            "precision": precision,
            "shapes": shapes,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        cache = opts.cache_dir / "tensorrt" if opts.cache_dir else None
        path = cache / f"{model.stem}-{digest}.engine" if cache else None
        runtime = trt.Runtime(logger)
        engine = None
        if path is not None and path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                log.warning("tensorrt: cached engine %s does not deserialize; rebuilding", path)
            else:
                log.info("tensorrt: loaded cached engine %s", path)
        if engine is None:
            build = _Build(precision, strongly_typed, int8, shapes, gpu, cc)
            plan = self._build(trt, gates, logger, data, model, build, opts, cache)
            if path is not None:
                _write(path, plan)
                _write(path.with_suffix(".json"), json.dumps(key, indent=1).encode())
                log.info("tensorrt: engine cached as %s", path)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineError(f"tensorrt: the engine built from {model} does not deserialize")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate())
        self.inputs, self.outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(None if d < 0 else int(d) for d in engine.get_tensor_shape(name))
            dtype = numpy_dtype(trt, engine.get_tensor_dtype(name), name)
            spec = TensorSpec(name, shape, dtype, detect_layout(shape))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)
        self.version = str(trt.__version__)
        first = shapes.get(self.inputs[0].name) if self.inputs else None
        self._max_batch = min(first[2][0], super().max_batch) if first else super().max_batch
        self.device = f"cuda:{index} {gpu} (sm {cc}) {precision}{' + int8' if int8 else ''}"
        log.info("tensorrt %s: %s ready on %s", self.version, model, self.device)

    def _build(
        self,
        trt: Any,
        gates: Gates,
        logger: Any,
        data: bytes,
        model: Path,
        build: _Build,
        opts: Options,
        cache: Path | None,
    ) -> bytes:
        log.info(
            "tensorrt %s: building an engine for %s (%s, %s%s%s); this takes a while",
            trt.__version__,
            model,
            build.gpu,
            build.precision,
            " + int8 (Q/DQ)" if build.int8 else "",
            ", strongly typed" if build.strongly_typed else "",
        )
        flags = gates.network_flags(trt, build.strongly_typed)
        builder, network, _parser = _parse(trt, logger, data, model, flags)
        config = builder.create_builder_config()
        workspace = opts.extra.get("workspace_mb", 1024)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace) << 20)
        if not build.strongly_typed and build.precision in ("fp16", "bf16"):
            flag = build.precision.upper()
            config.set_flag(getattr(trt.BuilderFlag, flag))
            if gates.version >= (10, 12):
                log.warning(
                    "tensorrt %s: %s through BuilderFlag.%s, deprecated since 10.12 and gone "
                    "in 11: export the model in %s to build a strongly typed engine",
                    trt.__version__,
                    build.precision,
                    flag,
                    build.precision,
                )
        if build.int8 and not build.strongly_typed:
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ layers in a weakly typed network
        if build.shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in build.shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        gpu, cc = build.gpu.replace(" ", "_"), build.cc
        timing = cache / f"timing-{gpu}-sm{cc}-trt{trt.__version__}.cache" if cache else None
        blob = timing.read_bytes() if timing is not None and timing.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)
        if gates.progress:
            # the config does not own the monitor: the engine holds it past the builder's life
            self._monitor = _progress(trt, model.name)
            config.progress_monitor = self._monitor
        else:
            log.info(
                "tensorrt %s reports no build progress (from 10.0 on it does)", trt.__version__
            )
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"tensorrt could not build an engine for {model} (see the log above)")
        if timing is not None:
            _write(timing, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)

    def _bind(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for tensor ``name``, bound to the context."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = int(_check(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
            self._context.set_tensor_address(name, ptr)
        return ptr

    @property
    def max_batch(self) -> int:
        """The optimisation profile's largest batch (option ``max_batch``)."""
        return self._max_batch

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise EngineError("tensorrt: run() before load() or after close()")
        rt, kind = self._cudart, self._cudart.cudaMemcpyKind
        for spec in self.inputs:
            x = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
            if not self._context.set_input_shape(spec.name, x.shape):
                raise EngineError(
                    f"tensorrt: input {spec.name!r} shape {x.shape} is outside the profile"
                )
            ptr = self._bind(spec.name, x.nbytes)
            _check(
                rt.cudaMemcpyAsync(
                    ptr, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, self._stream
                )
            )
        results = {}
        for spec in self.outputs:
            shape = tuple(self._context.get_tensor_shape(spec.name))
            results[spec.name] = np.empty(shape, spec.dtype)
            self._bind(spec.name, results[spec.name].nbytes)
        if not self._context.execute_async_v3(self._stream):
            raise EngineError("tensorrt: execute_async_v3 failed (see the log)")
        for name, y in results.items():
            ptr = self._buffers[name][0]
            _check(
                rt.cudaMemcpyAsync(
                    y.ctypes.data, ptr, y.nbytes, kind.cudaMemcpyDeviceToHost, self._stream
                )
            )
        _check(rt.cudaStreamSynchronize(self._stream))
        return results

    def close(self) -> None:
        if self._cudart is not None:
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._context = self._engine = self._stream = self._monitor = None
        super().close()


@dataclass(frozen=True)
class _Build:
    """What one engine build is for (its cache key less the model and TensorRT)."""

    precision: str
    strongly_typed: bool
    int8: bool  # the model has Q/DQ nodes: explicit int8
    shapes: dict[str, list[list[int]]]
    gpu: str
    cc: str


def _parse(trt: Any, logger: Any, data: bytes, model: Path, flags: int) -> tuple[Any, Any, Any]:
    """Builder, network and parser (kept: the network refers to the parser's weights)."""
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"tensorrt cannot parse {model}: {errors}")
    return builder, network, parser


def _graph(model: Path) -> Any:
    """The ONNX graph of ``model`` (weights in external files are not read)."""
    import onnx

    try:
        return onnx.load(str(model), load_external_data=False).graph
    except Exception as exc:
        raise ModelError(f"cannot load model {model}: {type(exc).__name__}: {exc}") from exc


def _quantized(graph: Any) -> bool:
    """Whether the graph quantizes explicitly (QuantizeLinear / DequantizeLinear nodes)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def _model_precision(graph: Any) -> str:
    """The model's own float type: that of most weight elements, else of its inputs."""
    sizes: dict[str, int] = {}
    for t in graph.initializer:
        if t.data_type in _ONNX_FLOAT:
            count = int(np.prod(t.dims)) if len(t.dims) else 1
            sizes[_ONNX_FLOAT[t.data_type]] = sizes.get(_ONNX_FLOAT[t.data_type], 0) + count
    if sizes:
        return max(sizes, key=lambda k: sizes[k])
    for t in graph.input:
        if t.type.tensor_type.elem_type in _ONNX_FLOAT:
            return _ONNX_FLOAT[t.type.tensor_type.elem_type]
    return "fp32"


def _profile(graph: Any, opts: Options) -> dict[str, list[list[int]]]:
    """``{input: [min, opt, max]}`` for each ONNX input with a dynamic dimension."""
    given = opts.extra.get("shapes") or {}
    max_batch = opts.extra.get("max_batch", 8)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise EngineError(f"tensorrt: option max_batch must be an int >= 1, got {max_batch!r}")
    weights = {t.name for t in graph.initializer}
    shapes: dict[str, list[list[int]]] = {}
    for t in graph.input:
        if t.name in weights:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim
        ]
        if t.name in given:
            shapes[t.name] = [[int(d) for d in s] for s in given[t.name]]
        elif any(d < 0 for d in dims):
            batch = (1, 1, max_batch)
            shapes[t.name] = [
                [d if d >= 0 else (batch if a == 0 else _DYNAMIC)[k] for a, d in enumerate(dims)]
                for k in range(3)
            ]
    return shapes


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to this module's logger."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def log(self, severity: Any, msg: str) -> None:
            log.log(levels.get(severity, logging.INFO), "tensorrt: %s", msg)

    return Logger()


def _progress(trt: Any, model: str) -> Any:
    """A build progress monitor that logs each top-level phase and every 10% of its steps,
    and tells the supervisor the build is getting on (it gives the stage more time, and
    systemd too: EXTEND_TIMEOUT_USEC).

    TensorRT calls it from its own threads and does not own it: whoever sets it
    on a builder config keeps a reference for as long as the builder lives.
    """
    from daemon.stage import progress

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.logged: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                log.info("tensorrt build %s: %s (%d steps)", model, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            progress(f"tensorrt build {model}: {phase_name} step {step + 1}")
            total = self.steps.get(phase_name, 0)
            tenth = (10 * (step + 1)) // total if total else 0
            if tenth > self.logged.get(phase_name, 0):
                self.logged[phase_name] = tenth
                log.info("tensorrt build %s: %s %d%%", model, phase_name, 10 * tenth)
            return True  # go on

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)
            self.logged.pop(phase_name, None)

    return Progress()
