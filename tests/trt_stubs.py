"""STUBS, NOT TensorRT: modules shaped like TensorRT's and cuda-python's Python APIs.

No TensorRT runs on this CI machine, so the TensorRT engine's version gates are
tested against these stand-ins. They copy the *shape* of each release's API
(which names exist, which arguments calls take, what a call returns) and a few
documented rules that the engine must obey; they compute nothing. Whether an
engine builds and runs correctly is tested on real GPUs only, in
hil_tests/test_gpu_engines.py.

What each stub mimics, from NVIDIA's API documentation:

- ``tensorrt_module("8.6.1")``: no ``IProgressMonitor`` (the builder config has
  no ``progress_monitor``); ``NetworkDefinitionCreationFlag`` has only
  ``EXPLICIT_BATCH`` (and the deprecated ``EXPLICIT_PRECISION``); a network
  created without ``EXPLICIT_BATCH`` is implicit-batch, which the ONNX parser
  refuses; ``BuilderFlag`` has ``FP16`` but no ``BF16``; ``DataType`` has no
  ``BF16`` or ``INT64`` (the parser casts int64 tensors to int32).
- ``tensorrt_module("10.x")``: ``IProgressMonitor`` and
  ``IBuilderConfig.progress_monitor`` (the config does not own the monitor: it
  must outlive the builder); ``STRONGLY_TYPED`` (a strongly typed network
  refuses precision flags); ``EXPLICIT_BATCH`` deprecated and ignored;
  ``BF16``, ``INT64``, ``FP8``, ``INT4``, ``FP4`` types.
- ``tensorrt_module("11.0.0")``: as 10.x without ``BuilderFlag.FP16``/``BF16``/
  ``INT8``/``FP8`` (quantization is explicit, Q/DQ nodes in strongly typed
  networks) and without ``EXPLICIT_BATCH``.

A "plan" is JSON; a "device pointer" is the address of a host buffer.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
import weakref
from typing import Any

import onnx

PLAN_MAGIC = b"STUBPLAN"


def _version(text: str) -> tuple[int, int]:
    major, minor, *_ = text.split(".")
    return int(major), int(minor)


def tensorrt_module(version: str) -> types.ModuleType:
    """A stand-in ``tensorrt`` module with release ``version``'s API shape."""
    v = _version(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.builds = []  # type: ignore[attr-defined]  # every build: what the engine asked for

    flags = ["EXPLICIT_BATCH", "EXPLICIT_PRECISION"] if v < (10, 0) else ["EXPLICIT_BATCH"]
    if v >= (11, 0):
        flags = []
    if v >= (9, 0):
        flags.append("STRONGLY_TYPED")
    creation = enum.IntEnum("NetworkDefinitionCreationFlag", flags, start=0)  # type: ignore[misc]
    builder_flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "TF32"]
    if v < (11, 0):
        builder_flags = ["FP16", "INT8", *builder_flags, "FP8"]
        if v >= (9, 0):
            builder_flags.append("BF16")
    builder_flag = enum.IntEnum("BuilderFlag", builder_flags, start=0)  # type: ignore[misc]
    types_ = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8"]
    if v >= (10, 0):
        types_ += ["BF16", "INT64", "INT4", "FP4"]
    data_type = enum.IntEnum("DataType", types_, start=0)  # type: ignore[misc]
    io_mode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], start=0)  # type: ignore[misc]
    memory_pool = enum.IntEnum("MemoryPoolType", ["WORKSPACE"], start=0)  # type: ignore[misc]
    severity = enum.IntEnum(  # type: ignore[misc]
        "Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0
    )

    class ILogger:
        Severity = severity

        def __init__(self) -> None:
            pass

    # ONNX element type -> this release's DataType as its parser maps it
    onnx_types = {
        onnx.TensorProto.FLOAT: "FLOAT",
        onnx.TensorProto.FLOAT16: "HALF",
        onnx.TensorProto.INT8: "INT8",
        onnx.TensorProto.INT32: "INT32",
        onnx.TensorProto.INT64: "INT64" if v >= (10, 0) else "INT32",
        onnx.TensorProto.BOOL: "BOOL",
        onnx.TensorProto.UINT8: "UINT8",
    }
    if v >= (10, 0):
        onnx_types[onnx.TensorProto.BFLOAT16] = "BF16"

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.implicit_batch = v < (10, 0) and not flags & (1 << creation.EXPLICIT_BATCH)
            self.strongly_typed = "STRONGLY_TYPED" in creation.__members__ and bool(
                flags & (1 << creation["STRONGLY_TYPED"])
            )
            self.tensors: list[dict[str, Any]] = []

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def parse(self, data: bytes) -> bool:
            if self.network.implicit_batch:
                self.errors.append(
                    "This version of the ONNX parser only supports TensorRT "
                    "INetworkDefinitions with an explicit batch dimension. Please ensure the "
                    "network was initialized with the EXPLICIT_BATCH NetworkDefinitionCreationFlag."
                )
                return False
            graph = onnx.load_from_string(data).graph
            weights = {t.name for t in graph.initializer}
            for mode, values in (("INPUT", graph.input), ("OUTPUT", graph.output)):
                for t in values:
                    if t.name in weights:
                        continue
                    kind = onnx_types.get(t.type.tensor_type.elem_type)
                    if kind is None:
                        self.errors.append(f"{t.name}: unsupported ONNX data type")
                        return False
                    dims = [
                        d.dim_value if d.HasField("dim_value") else -1
                        for d in t.type.tensor_type.shape.dim
                    ]
                    self.network.tensors.append(
                        {"name": t.name, "mode": mode, "dtype": kind, "shape": dims}
                    )
            return True

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob or b"timing"

        def serialize(self) -> bytes:
            return self.blob

    slots = ["flags", "pool", "profiles", "timing"]
    if v >= (10, 0):
        slots.append("_monitor")

    class IBuilderConfig:
        __slots__ = tuple(slots)

        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.profiles: list[Profile] = []
            self.timing: TimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pool = (pool, size)

        def set_flag(self, flag: Any) -> None:
            self.flags.add(builder_flag(flag).name)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.timing

    if v >= (10, 0):

        class IProgressMonitor:
            def __init__(self) -> None:
                pass

        def _get_monitor(self: Any) -> Any:
            ref = getattr(self, "_monitor", None)
            return ref() if ref is not None else None

        def _set_monitor(self: Any, monitor: Any) -> None:
            # like the binding: the config keeps a plain pointer, not a reference
            self._monitor = weakref.ref(monitor)

        IBuilderConfig.progress_monitor = property(_get_monitor, _set_monitor)  # type: ignore[attr-defined]
        trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: IBuilderConfig) -> Any:
            build = {
                "network_flags": network.flags,
                "strongly_typed": network.strongly_typed,
                "builder_flags": sorted(config.flags),
                "profiles": [p.shapes for p in config.profiles],
                "monitored": False,
            }
            trt.builds.append(build)  # type: ignore[attr-defined]
            lowered = {"FP16", "BF16", "INT8", "FP8"} & config.flags
            if network.strongly_typed and lowered:
                self.logger.log(
                    severity.ERROR,
                    f"IBuilderConfig: precision flags {sorted(lowered)} are not allowed on a "
                    "strongly typed network",
                )
                return None
            if "_monitor" in IBuilderConfig.__slots__ and getattr(config, "_monitor", None):
                monitor = config.progress_monitor  # type: ignore[attr-defined]
                if monitor is None:
                    self.logger.log(
                        severity.INTERNAL_ERROR,
                        "the progress monitor was destroyed while the builder used it",
                    )
                    return None
                monitor.phase_start("Building engine", None, 2)
                for phase, steps in (("Tactic selection", 20), ("Weights", 3)):
                    monitor.phase_start(phase, "Building engine", steps)
                    for step in range(steps):
                        monitor.step_complete(phase, step)
                    monitor.phase_finish(phase)
                    monitor.step_complete("Building engine", 0 if phase != "Weights" else 1)
                monitor.phase_finish("Building engine")
                build["monitored"] = True
            plan = {"tensors": network.tensors}
            return memoryview(PLAN_MAGIC + json.dumps(plan).encode())

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            declared = self.engine.tensors[name]["shape"]
            ok = len(shape) == len(declared) and all(
                d in (-1, s) for d, s in zip(declared, shape, strict=False)
            )
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            batch = next(iter(self.shapes.values()))[0] if self.shapes else 1
            return tuple(batch if d == -1 else d for d in self.engine.tensors[name]["shape"])

        def execute_async_v3(self, stream: int) -> bool:
            return set(self.addresses) == set(self.engine.tensors)  # outputs stay zero

    class Engine:
        def __init__(self, plan: dict[str, Any]) -> None:
            self.tensors = {t["name"]: t for t in plan["tensors"]}
            self.names = list(self.tensors)

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_shape(self, name: str) -> list[int]:
            return list(self.tensors[name]["shape"])

        def get_tensor_dtype(self, name: str) -> Any:
            return data_type[self.tensors[name]["dtype"]]

        def get_tensor_mode(self, name: str) -> Any:
            return io_mode[self.tensors[name]["mode"]]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, blob: Any) -> Engine | None:
            blob = bytes(blob)
            if not blob.startswith(PLAN_MAGIC):
                self.logger.log(severity.ERROR, "Serialization assertion failed: magic tag")
                return None
            return Engine(json.loads(blob[len(PLAN_MAGIC) :]))

    for name, value in {
        "NetworkDefinitionCreationFlag": creation,
        "BuilderFlag": builder_flag,
        "DataType": data_type,
        "TensorIOMode": io_mode,
        "MemoryPoolType": memory_pool,
        "ILogger": ILogger,
        "Builder": Builder,
        "OnnxParser": OnnxParser,
        "Runtime": Runtime,
    }.items():
        setattr(trt, name, value)
    return trt


def cudart_module() -> types.ModuleType:
    """A stand-in ``cuda.bindings.runtime``: one "GPU" whose memory is host memory."""
    rt = types.ModuleType("cuda.bindings.runtime")
    buffers: dict[int, Any] = {}
    props = types.SimpleNamespace(name=b"Stub Orin\x00\x00", major=8, minor=7)

    def malloc(n: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(n)
        buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def free(ptr: int) -> tuple[int]:
        buffers.pop(ptr)
        return (0,)

    def memcpy(dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, n)
        return (0,)

    calls = {
        "cudaGetDeviceCount": lambda: (0, 1),
        "cudaSetDevice": lambda i: (0,),
        "cudaGetDeviceProperties": lambda i: (0, props),
        "cudaStreamCreate": lambda: (0, 1),
        "cudaStreamSynchronize": lambda s: (0,),
        "cudaStreamDestroy": lambda s: (0,),
        "cudaMalloc": malloc,
        "cudaFree": free,
        "cudaMemcpyAsync": memcpy,
        "cudaMemcpyKind": types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
    }
    for name, value in calls.items():
        setattr(rt, name, value)
    rt.buffers = buffers  # type: ignore[attr-defined]
    return rt
