"""PyTorch engine (optional extra ``torch``): ExportedProgram (``.pt2``) and TorchScript
(``.pt``/``.ts``) models on the CPU or on CUDA.

TorchScript is deprecated from torch 2.10 on (its warnings are silenced here);
prefer ``.pt2``. Inputs and outputs: an ExportedProgram says its shapes (dynamic dimensions
become ``None``); TorchScript does not, so a TorchScript file must carry an
``echod_io.json`` extra file (``torch.jit.save(m, path, _extra_files=...)``)
listing them, as ``io_json`` writes it. The same file in a ``.pt2`` names the
tensors (else the program's own names are used).

On CUDA: ``precision`` ``"auto"``/``"fp16"`` runs in half precision (inputs and
outputs stay float32 at the interface), ``"bf16"`` in bfloat16; CUDA graphs
(option ``cuda_graphs``, default on) are captured once per input shape and
replayed, so one inference is a few launches; the weights are kept channels-last
(cuDNN's fast layout; inputs and outputs keep the model's layout). With mode ``"all"``,
:meth:`PyTorchEngine.submit` queues copy-in, replay and copy-out to pinned host
buffers on a CUDA stream and returns at once (``depth`` inferences in flight), so
the caller prepares the next frame while the GPU works. On the CPU it runs in
float32 (``"bf16"`` on request) and ``threads`` sets torch's intra-op threads.

Own options: ``cuda_graphs`` (bool, default True).
"""

from __future__ import annotations

import json
import logging
import warnings
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
    device_index,
    device_kind,
    import_library,
    parse_options,
)
from daemon.errors import EngineError, ModelError

log = logging.getLogger(__name__)

INSTALL = "install it: pip install 'echod[torch]'"
"""How to get this engine, said when its library is missing."""

IO_FILE = "echod_io.json"
_OPTIONS = ("cuda_graphs",)
_EXPORTED = (".pt2",)
_DEPTH = 3  # inferences in flight on CUDA in mode "all"


def io_json(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    """The ``echod_io.json`` extra file that describes a model's tensors."""

    def one(s: TensorSpec) -> dict[str, Any]:
        return {"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)}

    return json.dumps({"inputs": [one(s) for s in inputs], "outputs": [one(s) for s in outputs]})


def _specs_from_json(text: str, where: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    try:
        data = json.loads(text)

        def specs(key: str) -> list[TensorSpec]:
            out = []
            for t in data[key]:
                shape = tuple(None if d is None else int(d) for d in t["shape"])
                out.append(
                    TensorSpec(str(t["name"]), shape, np.dtype(t["dtype"]), detect_layout(shape))
                )
            return out

        return specs("inputs"), specs("outputs")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{where}: {IO_FILE} is malformed: {type(exc).__name__}: {exc}") from exc


class _Runner:
    """The model on CUDA for one set of input shapes: static device tensors, an optional
    captured CUDA graph, and ``slots`` pinned host buffers for inputs and outputs, so
    one inference is copy-in, replay, copy-out on the stream with no allocation."""

    def __init__(
        self, torch: Any, module: Any, example: list[Any], dtype: Any, slots: int, graph: bool
    ) -> None:
        self.torch, self.module, self.dtype = torch, module, dtype
        # static inputs keep the interface's dtype: the host-to-device copies are plain
        # asynchronous copies from pinned memory, the cast to ``dtype`` is part of the graph
        self.inputs = [x.clone() for x in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (cuDNN autotuning, lazy init) outside any capture
                outs = self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = None
        if graph:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                outs = self._forward()
        self.outputs = outs
        self.host_in = [
            [torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for x in example]
            for _ in range(slots)
        ]
        self.host_out = [
            [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs]
            for _ in range(slots)
        ]
        self.in_views = [[t.numpy() for t in slot] for slot in self.host_in]
        self.out_views = [[t.numpy() for t in slot] for slot in self.host_out]
        self.next = 0

    def _forward(self) -> list[Any]:
        xs = [x.to(self.dtype) if x.is_floating_point() else x for x in self.inputs]
        outs = _as_list(self.module(*xs))
        return [o.float() if o.is_floating_point() else o for o in outs]

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Queue one inference on the current stream; numpy views of the pinned outputs
        (valid once the stream reaches this point, until ``slots`` more calls)."""
        slot = self.next
        self.next = (slot + 1) % len(self.host_in)
        for a, view, pinned, static in zip(
            arrays, self.in_views[slot], self.host_in[slot], self.inputs, strict=True
        ):
            np.copyto(view, a, casting="same_kind")
            static.copy_(pinned, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            outs = self.outputs
        else:
            outs = self._forward()
        for h, o in zip(self.host_out[slot], outs, strict=True):
            h.copy_(o, non_blocking=True)
        return self.out_views[slot]


def _as_list(out: Any) -> list[Any]:
    if isinstance(out, list | tuple):
        return list(out)
    if isinstance(out, Mapping):
        return list(out.values())
    return [out]


class PyTorchEngine(Engine):
    """One PyTorch module on the CPU or a CUDA device."""

    name = "pytorch"
    formats = (".pt2", ".pt", ".ts")

    def __init__(self) -> None:
        super().__init__()
        self._torch: Any = None
        self._module: Any = None
        self._dev: Any = None
        self._dtype: Any = None  # the compute dtype of floating inputs
        self._graphs = False
        self._runners: dict[tuple[tuple[int, ...], ...], _Runner] = {}
        self._stream: Any = None
        self._inflight: deque[Pending] = deque()
        self._depth = 1

    @classmethod
    def probe(cls) -> Probe:
        torch, reason = import_library("torch")
        if torch is None:
            return Probe(cls.name, None, False, (), f"{reason}; {INSTALL}")
        try:
            cuda = bool(torch.cuda.is_available())
        except Exception:  # a CUDA build without a driver may fail here
            cuda = False
        return Probe(
            cls.name, str(torch.__version__), True, ("cpu", "cuda") if cuda else ("cpu",), ""
        )

    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        opts = parse_options(self.name, options, _OPTIONS)
        torch, reason = import_library("torch")
        if torch is None:
            raise EngineError(f"pytorch is not usable here: {reason}; {INSTALL}")
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"model file not found: {model}")
        if model.suffix not in self.formats:
            raise ModelError(f"pytorch loads {', '.join(self.formats)} models, not {model.name}")
        kind = device_kind(device)
        if kind not in ("cpu", "cuda"):
            raise EngineError(f"pytorch: no device {device!r} (cpu or cuda[:N])")
        if kind == "cuda" and not torch.cuda.is_available():
            raise EngineError(
                "pytorch: CUDA is not available here (a CPU build of torch, or no driver)"
            )
        dev = torch.device("cuda", device_index(device)) if kind == "cuda" else torch.device("cpu")
        if opts.threads and kind == "cpu":
            torch.set_num_threads(opts.threads)
        precision = opts.precision
        if precision == "auto":
            precision = "fp16" if kind == "cuda" else "fp32"
        if precision == "fp16" and kind == "cpu":
            raise EngineError(
                'pytorch: precision "fp16" needs CUDA; on the CPU use "fp32" or "bf16"'
            )
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

        extra = {IO_FILE: ""}
        try:
            if model.suffix in _EXPORTED:
                program = torch.export.load(str(model), extra_files=extra)
                inputs, outputs = _program_specs(torch, program)
                module = program.module()
            else:
                with warnings.catch_warnings():  # TorchScript is deprecated from torch 2.10 on
                    warnings.simplefilter("ignore", DeprecationWarning)
                    module = torch.jit.load(str(model), map_location="cpu", _extra_files=extra)
                inputs, outputs = [], []
        except Exception as exc:
            raise ModelError(f"cannot load model {model}: {type(exc).__name__}: {exc}") from exc
        if extra[IO_FILE]:
            named_in, named_out = _specs_from_json(extra[IO_FILE], model)
            inputs = _merge(inputs, named_in)
            outputs = _merge(outputs, named_out)
        elif not inputs:
            raise ModelError(
                f"TorchScript model {model} says nothing of its inputs: save it with _extra_files="
                f"{{'{IO_FILE}': daemon.engines.pytorch.io_json(...)}} or export a .pt2"
            )
        try:
            module = module.to(dev)
            if dtype != torch.float32:
                module = module.to(dtype)
            if kind == "cuda":  # NHWC is what cuDNN's tensor-core convolutions want
                module = module.to(memory_format=torch.channels_last)
            if hasattr(module, "eval") and model.suffix not in _EXPORTED:
                module.eval()
        except Exception as exc:
            raise EngineError(f"pytorch cannot move {model} to {dev} {dtype}: {exc}") from exc
        self._torch, self._module, self._dev, self._dtype = torch, module, dev, dtype
        graphs = opts.extra.get("cuda_graphs", True)
        if not isinstance(graphs, bool):
            raise EngineError(f"pytorch: option cuda_graphs must be true or false, got {graphs!r}")
        self._graphs = kind == "cuda" and graphs
        if kind == "cuda":
            # "fp32" means float32 arithmetic: no TF32 in cuDNN convolutions or matmuls
            # (process-wide settings of torch)
            tf32 = precision != "fp32"
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            # live frames ahead of offline jobs on a shared GPU (lower number: higher priority)
            self._stream = torch.cuda.Stream(dev, priority=-1 if opts.priority == "live" else 0)
            self._depth = _DEPTH if opts.mode == "all" else 1
        self.inputs, self.outputs = inputs, outputs
        self.version = str(torch.__version__)
        self.device = f"{dev} {str(dtype).removeprefix('torch.')}" + (
            " cuda-graphs" if self._graphs else ""
        )
        log.info("pytorch %s loaded %s on %s", self.version, model, self.device)

    @property
    def depth(self) -> int:
        return self._depth

    def _arrays(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise EngineError(f"pytorch: input {missing[0]!r} missing (got {', '.join(inputs)})")
        return [np.asarray(inputs[s.name]) for s in self.inputs]

    def _queue(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Queue one inference on the engine's CUDA stream (see _Runner)."""
        torch = self._torch
        key = tuple(a.shape for a in arrays)
        runner = self._runners.get(key)
        if runner is None:
            log.info(
                "pytorch: preparing %s for input shapes %s",
                "a CUDA graph" if self._graphs else "buffers",
                [list(k) for k in key],
            )
            example = [torch.from_numpy(np.ascontiguousarray(a)).to(self._dev) for a in arrays]
            runner = _Runner(
                torch, self._module, example, self._dtype, self._depth + 1, self._graphs
            )
            self._runners[key] = runner
        return runner(arrays)

    def _named(self, outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(outs) != len(self.outputs):
            raise EngineError(
                f"pytorch: model gave {len(outs)} outputs, expected {len(self.outputs)}"
            )
        return {spec.name: np.array(o) for spec, o in zip(self.outputs, outs, strict=True)}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise EngineError("pytorch: run() before load() or after close()")
        while self._inflight:
            self._inflight.popleft().wait()
        torch = self._torch
        arrays = self._arrays(inputs)
        try:
            with torch.inference_mode():
                if self._stream is None:
                    xs = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
                    xs = [x.to(self._dtype) if x.is_floating_point() else x for x in xs]
                    outs = _as_list(self._module(*xs))
                    return self._named(
                        [o.float().numpy() if o.is_floating_point() else o.numpy() for o in outs]
                    )
                with torch.cuda.stream(self._stream):
                    host = self._queue(arrays)
                self._stream.synchronize()
                return self._named(host)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"pytorch run failed: {type(exc).__name__}: {exc}") from exc

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Pending:
        """On CUDA in mode "all": queue the inference and return at once; else run it now."""
        if self._stream is None or self._depth == 1:
            return super().submit(inputs)
        if len(self._inflight) >= self._depth:
            self._inflight.popleft().wait()
        torch = self._torch
        arrays = self._arrays(inputs)
        try:
            with torch.inference_mode(), torch.cuda.stream(self._stream):
                host = self._queue(arrays)
                event = torch.cuda.Event()
                event.record(self._stream)
        except Exception as exc:
            raise EngineError(f"pytorch submit failed: {type(exc).__name__}: {exc}") from exc

        def wait() -> dict[str, np.ndarray]:
            event.synchronize()
            return self._named(host)  # copies out of the pinned slot

        pending = Pending(wait, event.query)
        self._inflight.append(pending)
        return pending

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._inflight.clear()
        self._runners = {}
        self._module = self._stream = None
        super().close()


def _program_specs(torch: Any, program: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an ExportedProgram (symbolic sizes -> None)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    output = next(n for n in program.graph.nodes if n.op == "output")

    def spec(name: str, node: Any) -> TensorSpec:
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise ModelError(f"exported program tensor {name!r} has no shape information")
        shape = tuple(d if isinstance(d, int) else None for d in val.shape)
        dtype = np.dtype(str(val.dtype).removeprefix("torch."))
        return TensorSpec(name, shape, dtype, detect_layout(shape))

    sig = program.graph_signature
    inputs = [spec(n, placeholders[n]) for n in sig.user_inputs]
    nodes = _as_list(output.args[0])
    outputs = [
        spec(n, node)
        for n, node in zip(sig.user_outputs, nodes[-len(sig.user_outputs) :], strict=True)
    ]
    return inputs, outputs


def _merge(found: list[TensorSpec], named: list[TensorSpec]) -> list[TensorSpec]:
    """The names (and, where nothing was found, the specs) from ``echod_io.json``."""
    if not found:
        return named
    if len(found) != len(named):
        raise ModelError(f"{IO_FILE} lists {len(named)} tensors, the model has {len(found)}")
    return [
        TensorSpec(n.name, f.shape, f.dtype, f.layout) for f, n in zip(found, named, strict=True)
    ]
