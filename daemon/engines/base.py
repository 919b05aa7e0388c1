"""The engine interface: one shape for every inference library (paper, Table 1).

An :class:`Engine` loads one model file, says what its inputs and outputs are
(:class:`TensorSpec`), runs it on numpy arrays and closes. ``probe()`` says,
cheaply and without raising, whether the engine's library is importable here
and which devices it can use. Engine modules import their library lazily (in
``probe`` and ``load``), so importing echod never imports an engine.

Every engine takes the :data:`COMMON_OPTIONS` (parsed by :func:`parse_options`)
besides its own, and has an asynchronous path: :meth:`Engine.submit` returns a
:class:`Pending` at once and up to :attr:`Engine.depth` of them are worth
keeping in flight; :meth:`Engine.run_many` pipelines a stream of inputs with it.
The base class runs ``submit`` synchronously (``depth`` 1).

Several frames go through one call with :meth:`Engine.submit_batch` (up to
:attr:`Engine.max_batch`: 1 where the model's batch is fixed at one); the base class
stacks them along axis 0 and submits the stack.
"""

from __future__ import annotations

import difflib
import importlib
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal, cast

import numpy as np

from daemon.errors import EngineError

Layout = Literal["NC", "NCHW", "NHWC", "NCDHW", "NDHWC"]
VOLUME_LAYOUTS: tuple[Layout, ...] = ("NCDHW", "NDHWC")  # 3-D images (CT patches)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    layout: Layout | None

    @property
    def channels_last(self) -> bool:
        return self.layout in ("NHWC", "NDHWC")

    @property
    def channels(self) -> int | None:
        """Size of the channel dimension, ``None`` when dynamic or unknown."""
        if self.layout is None:
            return None
        return self.shape[-1] if self.channels_last else self.shape[1]

    @property
    def spatial(self) -> tuple[int | None, ...]:
        """Spatial dimensions (``(H, W)`` or ``(D, H, W)``) in layout order."""
        if self.layout is None or self.layout == "NC":
            return ()
        return self.shape[1:-1] if self.channels_last else self.shape[2:]

    def describe(self) -> str:
        """``NCHW (?, 1, 256, 256) float32``: for messages."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.layout or 'layout unknown'} ({dims}) {self.dtype}"


@dataclass(frozen=True)
class Probe:
    """Whether an engine can run here, and on which devices."""

    name: str
    version: str | None
    available: bool
    devices: tuple[str, ...]
    reason: str  # why unavailable; "" when available
    missing: tuple[str, ...] = ()  # "device: what is missing" for devices it knows but lacks here

    def why_missing(self, device: str) -> str:
        """What is missing for ``device`` (by class), "" when nothing is known."""
        kind = device_kind(device) + ": "
        return next((m[len(kind) :] for m in self.missing if m.startswith(kind)), "")


def detect_layout(shape: tuple[int | None, ...]) -> Layout | None:
    """Guess the layout: a channel dimension of 1 or 3 right after the batch is
    channel-first, at the end channel-last (channel-first wins a tie)."""
    rank = len(shape)
    if rank == 2:
        return "NC"
    if rank not in (4, 5):
        return None
    if shape[1] in (1, 3):
        return "NCHW" if rank == 4 else "NCDHW"
    if shape[-1] in (1, 3):
        return "NHWC" if rank == 4 else "NDHWC"
    return None


# Device classes: cpu; cuda (NVIDIA GPU, Jetson); gpu (Intel GPU, OpenVINO's name);
# npu (Intel NPU); myriad (Neural Compute Stick 2); auto (OpenVINO picks).
DEVICE_CLASSES = ("cpu", "cuda", "gpu", "npu", "myriad", "auto")


def device_kind(device: str) -> str:
    """The device class of a device name: ``"CUDA:1"`` -> ``"cuda"``, ``"GPU.1"`` -> ``"gpu"``,
    ``"AUTO:GPU,CPU"`` -> ``"auto"``."""
    return re.split(r"[:.]", device.strip(), maxsplit=1)[0].lower()


def device_index(device: str) -> int:
    """The device number in ``"cuda:1"`` / ``"GPU.1"`` (0 when none is given)."""
    m = re.fullmatch(r"[A-Za-z]+[:.](\d+)", device.strip())
    return int(m.group(1)) if m else 0


Mode = Literal["newest", "all"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Fallback = Literal["error", "warn"]
Priority = Literal["live", "offline"]
_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("newest", "all"),
    "precision": ("auto", "fp32", "fp16", "bf16"),
    "fallback": ("error", "warn"),
    "priority": ("live", "offline"),
}
COMMON_OPTIONS = ("threads", "mode", "cache_dir", "precision", "fallback", "priority")
_process_priority: Priority = "live"


def run_as_offline() -> None:
    """This process runs offline jobs: its engines' default ``priority`` is ``"offline"``
    (a job worker says so once, before loading any engine)."""
    global _process_priority
    _process_priority = "offline"


@dataclass(frozen=True)
class Options:
    """Options every engine takes (each ignores what does not apply to it).

    - ``threads``: CPU threads for inference (0 = the engine decides).
    - ``mode``: ``"newest"`` tunes for latency (one request), ``"all"`` for
      throughput (several requests in flight through ``submit``).
    - ``cache_dir``: where compiled models / serialized engines are kept (None: no cache).
    - ``precision``: ``"auto"`` (fp32 on CPUs, fp16 on GPUs/NPUs), ``"fp32"``, ``"fp16"``,
      ``"bf16"``; an engine refuses one it cannot honour.
    - ``fallback``: when the engine would run somewhere other than asked (e.g. an
      ONNX Runtime GPU provider that cannot load): ``"error"`` or ``"warn"`` (loudly).
    - ``priority``: ``"live"`` or ``"offline"`` work on a shared GPU: an engine that can
      (PyTorch: CUDA stream priorities) runs live frames ahead of offline jobs' kernels.
      The default is the process's (:func:`run_as_offline`).
    """

    threads: int = 0
    mode: Mode = "newest"
    cache_dir: Path | None = None
    precision: Precision = "auto"
    fallback: Fallback = "error"
    priority: Priority = "live"
    extra: dict[str, Any] = field(default_factory=dict)  # the engine's own options


def parse_options(engine: str, options: Mapping[str, Any], own: Iterable[str] = ()) -> Options:
    """Split and check ``options``: common ones typed, the engine's ``own`` in ``extra``.

    An unknown name or bad value is an EngineError naming the nearest valid one.
    """
    own = tuple(own)
    known = COMMON_OPTIONS + own
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise EngineError(f"{engine}: unknown option {key!r}: {hint}")
    for key, choices in _CHOICES.items():
        value = options.get(key, choices[0])
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(choices)}"
            raise EngineError(f"{engine}: option {key} = {value!r}: {hint}")
    threads = options.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise EngineError(f"{engine}: option threads must be an int >= 0, got {threads!r}")
    cache = options.get("cache_dir")
    return Options(
        threads=threads,
        mode=cast(Mode, options.get("mode", "newest")),
        cache_dir=Path(cache).expanduser() if cache else None,
        precision=cast(Precision, options.get("precision", "auto")),
        fallback=cast(Fallback, options.get("fallback", "error")),
        priority=cast(Priority, options.get("priority", _process_priority)),
        extra={k: v for k, v in options.items() if k in own},
    )


def import_library(module: str) -> tuple[ModuleType | None, str]:
    """Import an engine's library: ``(module, "")`` or ``(None, the error text)``."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # an engine library may fail in any way when imported
        return None, f"{type(exc).__name__}: {exc}"


MAX_BATCH = 64
"""The largest batch an engine takes by default when the model's batch is dynamic."""


class Pending:
    """One submitted inference; :meth:`wait` gives its outputs (once, then cached)."""

    def __init__(self, wait: Callable[[], dict[str, np.ndarray]], done: Callable[[], bool]):
        self._wait: Callable[[], dict[str, np.ndarray]] | None = wait
        self._done = done
        self._result: dict[str, np.ndarray] | None = None

    @classmethod
    def completed(cls, result: dict[str, np.ndarray]) -> Pending:
        p = cls(lambda: result, lambda: True)
        p.wait()
        return p

    def done(self) -> bool:
        """True when :meth:`wait` would not block."""
        return self._result is not None or self._done()

    def detach(self) -> None:
        """Before the engine reuses this submission's buffers: outputs nobody has collected
        yet are collected now, as copies (submitting past ``depth`` loses nothing);
        collected ones were the caller's to use in time (:meth:`Engine.submit`)."""
        if self._result is None:
            self._result = {k: np.array(v) for k, v in self.wait().items()}

    def wait(self) -> dict[str, np.ndarray]:
        """Block until the outputs are there; output name -> array. From :meth:`Engine.run`
        the arrays are the caller's; from ``submit`` they may be views of the engine's
        buffers, valid until :attr:`Engine.depth` more submissions."""
        if self._result is None:
            assert self._wait is not None
            self._result, self._wait = self._wait(), None
        return self._result


class Engine(ABC):
    """An inference engine holding one loaded model."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]] = (".onnx",)  # model file suffixes it loads

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.device: str = ""  # in use, as the engine reports it
        self.version: str | None = None

    @classmethod
    @abstractmethod
    def probe(cls) -> Probe:
        """Cheap availability check; never raises."""

    @classmethod
    def supports(cls, model: Path, device: str) -> str:
        """Why ``model`` cannot run on ``device`` with this engine; "" when it can.

        Cheap: looks at the file name (and, in subclasses, what the model needs).
        """
        suffix = Path(model).suffix.lower()
        if suffix not in cls.formats:
            return f"does not load {suffix or 'suffix-less'} files (loads {', '.join(cls.formats)})"
        return ""

    @abstractmethod
    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        """Load ``model`` on ``device``; ModelError for a bad file, EngineError otherwise."""

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: input name -> array in, output name -> array out."""

    @property
    def depth(self) -> int:
        """Inferences worth keeping in flight through :meth:`submit` (1: it runs at once)."""
        return 1

    @property
    def max_batch(self) -> int:
        """The most one-image inputs :meth:`submit_batch` takes in one call: 1 unless every
        input's batch dimension (axis 0) is dynamic, then :data:`MAX_BATCH` (engines that
        know a tighter limit say it)."""
        if self.inputs and all(s.shape and s.shape[0] is None for s in self.inputs):
            return MAX_BATCH
        return 1

    @property
    def per_batch_size(self) -> bool:
        """True where each batch size is prepared on its first use (a CUDA graph each):
        worth a blank batch of each size at start."""
        return False

    def label_on_device(self, output: str, axis: int) -> str | None:
        """Ask for the label map of a segmentation output computed where the network runs
        (the index of the largest value along the class ``axis``, first on ties, uint8,
        that axis dropped), so that the caller's CPU need not take the argmax. Returns the
        name of the extra output that carries it from then on, or None where this engine
        does not (here: never). Call it before inference starts."""
        return None

    def submit_batch(self, batch: Sequence[Mapping[str, np.ndarray]]) -> Pending:
        """Start one inference on several one-image inputs (each as :meth:`submit` takes
        it, batch dimension 1), at most :attr:`max_batch`; the outputs have the batch
        dimension ``len(batch)``, in the order given; they may be views of the engine's
        buffers, valid until :attr:`depth` more submissions. Here: the inputs stacked
        along axis 0 and submitted."""
        if len(batch) == 1:
            return self.submit(batch[0])
        if not 0 < len(batch) <= self.max_batch:
            raise EngineError(
                f"{self.name}: a batch of {len(batch)} (this model takes 1 to {self.max_batch})"
            )
        return self.submit({k: np.concatenate([b[k] for b in batch]) for k in batch[0]})

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Pending:
        """Start one inference and return at once where the engine can (here: synchronous).

        ``inputs`` must stay unchanged until the result is waited for. Results
        come back in submission order; submitting more than :attr:`depth`
        without waiting makes ``submit`` wait for the oldest first. The outputs may be
        views of the engine's buffers (no copy per frame), valid until :attr:`depth`
        more submissions: use or copy them before.
        """
        return Pending.completed(self.run(inputs))

    def run_many(
        self, batches: Iterable[Mapping[str, np.ndarray]]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Outputs for each of ``batches``, in order, with up to :attr:`depth` in flight;
        each valid until the next is asked for (see :meth:`submit`)."""
        pending: deque[Pending] = deque()
        for inputs in batches:
            if len(pending) >= self.depth:
                yield pending.popleft().wait()
            pending.append(self.submit(inputs))
        while pending:
            yield pending.popleft().wait()

    def close(self) -> None:
        """Release the model and its resources (idempotent)."""
        self.inputs = []
        self.outputs = []
