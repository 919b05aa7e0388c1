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
(option ``cuda_graphs``, default on) are captured once per input shape (a batch size
is a shape: :meth:`PyTorchEngine.submit_batch`) and replayed, so one inference is a few
launches; a segmentation's label map (:meth:`PyTorchEngine.label_on_device`) is taken in
the graph too, so the CPU gets it ready (for 1 byte a pixel more to copy); the weights
are kept channels-last (cuDNN's fast layout; inputs and outputs keep the model's
layout). On CUDA, :meth:`PyTorchEngine.submit` queues copy-in (from
pinned host buffers), replay and copy-out (to pinned host buffers) and returns at once
(``depth`` inferences in flight), so the caller prepares or decodes frames while the GPU
works: in mode ``"all"`` three, the copies on streams of their own, overlapping the
compute of the neighbouring inferences; in mode ``"newest"`` two on one stream. On the
CPU it runs in float32 (``"bf16"`` on request) and ``threads`` sets torch's intra-op
threads.

Own options: ``cuda_graphs`` (bool, default True).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
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
LABELS = ":labels"
"""Suffix of the output that carries a map's labels taken on the GPU."""


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
    """The model on CUDA for one set of input shapes (one batch size): static device
    inputs and outputs and an optional captured CUDA graph (replayed on the caller's
    stream, so one inference is a few launches)."""

    def __init__(
        self,
        torch: Any,
        module: Any,
        example: list[Any],
        dtype: Any,
        graph: bool,
        pool: Any,
        argmax: Mapping[int, int],
    ) -> None:
        self.torch, self.module, self.dtype, self.argmax = torch, module, dtype, argmax
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
        if graph:  # graphs share one memory pool: they never run at the same time
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                outs = self._forward()
        self.outputs = outs

    def _forward(self) -> list[Any]:
        xs = [x.to(self.dtype) if x.is_floating_point() else x for x in self.inputs]
        outs = _as_list(self.module(*xs))
        # argmax before the cast to float32: the same labels, the cast being exact
        labels = [outs[i].argmax(dim=axis).to(self.torch.uint8) for i, axis in self.argmax.items()]
        return [o.float() if o.is_floating_point() else o for o in outs] + labels

    def __call__(self) -> list[Any]:
        """Run on the current stream on what :attr:`inputs` hold; the outputs (static
        tensors with a graph: overwritten by the next call)."""
        if self.graph is not None:
            self.graph.replay()
            return list(self.outputs)
        return self._forward()


class _Staging:
    """``slots`` sets of buffers for inferences in flight of up to ``rows`` images of one
    shape: pinned host inputs and outputs, device copies of both, and per slot the events
    that order the three streams. A slot's inference is: pinned input -> device (copy-in
    stream) | device -> the runner's static inputs, replay, outputs -> device slot
    (compute stream) | device slot -> pinned output (copy-out stream): the copies of one
    batch overlap the compute of its neighbours."""

    def __init__(
        self, torch: Any, dev: Any, inputs: list[Any], outputs: list[Any], rows: int, slots: int
    ) -> None:
        def alloc(like: list[Any], **kw: Any) -> list[list[Any]]:
            return [
                [torch.empty((rows, *t.shape[1:]), dtype=t.dtype, **kw) for t in like]
                for _ in range(slots)
            ]

        self.rows = rows
        self.host_in = alloc(inputs, pin_memory=True)
        self.host_out = alloc(outputs, pin_memory=True)
        self.dev_in = alloc(inputs, device=dev)
        self.dev_out = alloc(outputs, device=dev)
        self.in_views = [[t.numpy() for t in slot] for slot in self.host_in]
        self.out_views = [[t.numpy() for t in slot] for slot in self.host_out]
        self.copied_in = [torch.cuda.Event() for _ in range(slots)]
        self.computed = [torch.cuda.Event() for _ in range(slots)]
        self.copied_out = [torch.cuda.Event() for _ in range(slots)]
        self.next = 0


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
        self._staging: dict[tuple[tuple[int, ...], ...], _Staging] = {}
        self._pool: Any = None
        self._stream: Any = None  # compute
        self._copy_in: Any = None
        self._copy_out: Any = None
        self._inflight: deque[Pending] = deque()
        self._depth = 1
        self._overlap = False  # copies on streams of their own (mode "all" on CUDA)
        self._max_batch = 1
        self._argmax: dict[int, int] = {}  # output index -> class axis: labels in the graph

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
            if kind == "cuda":
                module = _tensor_core_layout(torch, module, len(inputs[0].shape))
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
            priority = -1 if opts.priority == "live" else 0
            self._stream = torch.cuda.Stream(dev, priority=priority)
            # mode "newest": two in flight, so a frame's inference runs while the last one's
            # result is decoded on the CPU; mode "all": copies get streams of their own and
            # overlap the compute of the batches around them
            self._depth = _DEPTH if opts.mode == "all" else 2
            self._overlap = opts.mode == "all"
            self._copy_in = self._copy_out = self._stream
            if self._overlap:
                self._copy_in = torch.cuda.Stream(dev, priority=priority)
                self._copy_out = torch.cuda.Stream(dev, priority=priority)
            self._pool = torch.cuda.graph_pool_handle()
        self.inputs, self.outputs = inputs, outputs
        self._max_batch = super().max_batch
        self.version = str(torch.__version__)
        self.device = f"{dev} {str(dtype).removeprefix('torch.')}" + (
            " cuda-graphs" if self._graphs else ""
        )
        log.info("pytorch %s loaded %s on %s", self.version, model, self.device)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def per_batch_size(self) -> bool:
        return self._graphs

    def label_on_device(self, output: str, axis: int) -> str | None:
        """On CUDA: the argmax of ``output`` along ``axis`` is taken in the graph, given as
        the output ``output + ":labels"``; on the CPU: None (the caller's own argmax costs
        the same there)."""
        if self._stream is None:
            return None
        index = next((i for i, s in enumerate(self.outputs) if s.name == output), None)
        if index is None:
            raise EngineError(f"pytorch: no output {output!r} to take labels of")
        self._drain()
        self._runners, self._staging = {}, {}  # made again with the labels in them
        self._argmax[index] = axis
        return output + LABELS

    def _arrays(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise EngineError(f"pytorch: input {missing[0]!r} missing (got {', '.join(inputs)})")
        return [np.asarray(inputs[s.name]) for s in self.inputs]

    def _queue(self, items: list[list[np.ndarray]]) -> tuple[list[np.ndarray], Any]:
        """Queue one inference on CUDA of ``items`` (each: the arrays of one submission,
        stacked along axis 0; see _Staging): numpy views of the pinned outputs, valid
        once the returned event is reached and until ``depth`` more calls."""
        torch = self._torch
        rows = sum(int(it[0].shape[0]) for it in items)
        image = tuple(a.shape[1:] for a in items[0])
        if any(tuple(a.shape[1:] for a in it) != image for it in items[1:]):
            raise EngineError("pytorch: the images of one batch must have the same shape")
        key = tuple((rows, *shape) for shape in image)
        runner = self._runners.get(key)
        if runner is None:
            log.info(
                "pytorch: preparing %s for input shapes %s",
                "a CUDA graph" if self._graphs else "buffers",
                [list(k) for k in key],
            )
            example = [
                torch.from_numpy(np.concatenate([it[k] for it in items])).to(self._dev)
                for k in range(len(image))
            ]
            self._drain()  # nothing in flight while it warms up and captures
            runner = _Runner(
                torch, self._module, example, self._dtype, self._graphs, self._pool, self._argmax
            )
            torch.cuda.synchronize(self._dev)
            self._runners[key] = runner
        staging = self._staging.get(image)
        if staging is None or staging.rows < rows:  # grows to the largest batch seen
            self._drain()
            staging = _Staging(
                torch, self._dev, runner.inputs, runner.outputs, rows, self._depth + 1
            )
            self._staging[image] = staging
        s = staging.next
        staging.next = (s + 1) % len(staging.host_in)
        staging.copied_out[s].synchronize()  # its last inference is out: the slot is free
        r = 0
        for it in items:
            n = int(it[0].shape[0])
            for view, a in zip(staging.in_views[s], it, strict=True):
                np.copyto(view[r : r + n], a, casting="same_kind")
            r += n
        if not self._overlap:  # mode "newest", batches of one: one stream, fewest calls
            with torch.cuda.stream(self._stream):
                for static, h in zip(runner.inputs, staging.host_in[s], strict=True):
                    static.copy_(h[:rows], non_blocking=True)
                for h, o in zip(staging.host_out[s], runner(), strict=True):
                    h[:rows].copy_(o, non_blocking=True)
                staging.copied_out[s].record(self._stream)
            return [v[:rows] for v in staging.out_views[s]], staging.copied_out[s]
        with torch.cuda.stream(self._copy_in):
            for d, h in zip(staging.dev_in[s], staging.host_in[s], strict=True):
                d[:rows].copy_(h[:rows], non_blocking=True)
            staging.copied_in[s].record(self._copy_in)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(staging.copied_in[s])
            for static, d in zip(runner.inputs, staging.dev_in[s], strict=True):
                static.copy_(d[:rows], non_blocking=True)
            for d, o in zip(staging.dev_out[s], runner(), strict=True):
                d[:rows].copy_(o, non_blocking=True)
            staging.computed[s].record(self._stream)
        with torch.cuda.stream(self._copy_out):
            self._copy_out.wait_event(staging.computed[s])
            for h, d in zip(staging.host_out[s], staging.dev_out[s], strict=True):
                h[:rows].copy_(d[:rows], non_blocking=True)
            staging.copied_out[s].record(self._copy_out)
        return [v[:rows] for v in staging.out_views[s]], staging.copied_out[s]

    def _named(self, outs: list[np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
        names = [s.name for s in self.outputs]
        names += [names[i] + LABELS for i in self._argmax]
        if len(outs) != len(names):
            raise EngineError(f"pytorch: model gave {len(outs)} outputs, expected {len(names)}")
        return {n: np.array(o) if copy else o for n, o in zip(names, outs, strict=True)}

    def _drain(self) -> None:
        while self._inflight:
            self._inflight.popleft().wait()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise EngineError("pytorch: run() before load() or after close()")
        self._drain()
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
                host, event = self._queue([arrays])
                event.synchronize()
                return self._named(host)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"pytorch run failed: {type(exc).__name__}: {exc}") from exc

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Pending:
        """On CUDA: queue the inference and return at once (``depth`` in flight); on the
        CPU: run it now."""
        if self._stream is None:
            return super().submit(inputs)
        return self._submit([self._arrays(inputs)])

    def submit_batch(self, batch: Sequence[Mapping[str, np.ndarray]]) -> Pending:
        """On CUDA: the images go straight into a pinned buffer (no stacking copy) and
        through the CUDA graph of that batch size; the outputs are views of the pinned
        buffer, valid until :attr:`depth` more submissions."""
        if self._stream is None:
            return super().submit_batch(batch)
        if not 0 < len(batch) <= self._max_batch:
            raise EngineError(
                f"pytorch: a batch of {len(batch)} (this model takes 1 to {self._max_batch})"
            )
        return self._submit([self._arrays(b) for b in batch])

    def _submit(self, items: list[list[np.ndarray]]) -> Pending:
        while len(self._inflight) >= self._depth:
            self._inflight.popleft().detach()  # its pinned buffer is reused below
        torch = self._torch
        try:
            with torch.inference_mode():
                host, event = self._queue(items)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"pytorch submit failed: {type(exc).__name__}: {exc}") from exc

        def wait() -> dict[str, np.ndarray]:
            event.synchronize()
            return self._named(host, copy=False)

        pending = Pending(wait, event.query)
        self._inflight.append(pending)
        return pending

    def close(self) -> None:
        if self._stream is not None:
            torch = self._torch
            torch.cuda.synchronize(self._dev)
        self._inflight.clear()
        self._runners = {}
        self._staging = {}
        self._argmax = {}
        self._module = self._stream = self._copy_in = self._copy_out = self._pool = None
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


def _tensor_core_layout(torch: Any, module: Any, rank: int) -> Any:
    """The module's weights channels-last for an input of ``rank`` (NHWC, NDHWC for a 3-D
    model): what cuDNN's tensor-core convolutions want; as they were where its weights
    are of mixed rank."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(rank)
    if fmt is None:
        return module
    try:
        return module.to(memory_format=fmt)
    except RuntimeError as exc:
        log.info("pytorch: weights left in their layout (%s)", exc)
        return module


def _merge(found: list[TensorSpec], named: list[TensorSpec]) -> list[TensorSpec]:
    """The names (and, where nothing was found, the specs) from ``echod_io.json``."""
    if not found:
        return named
    if len(found) != len(named):
        raise ModelError(f"{IO_FILE} lists {len(named)} tensors, the model has {len(found)}")
    return [
        TensorSpec(n.name, f.shape, f.dtype, f.layout) for f, n in zip(found, named, strict=True)
    ]
