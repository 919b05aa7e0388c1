"""The engine interface: one shape for every inference library (paper, Table 1).

An :class:`Engine` loads one model file, says what its inputs and outputs are
(:class:`TensorSpec`), runs it on numpy arrays and closes. ``probe()`` says,
cheaply and without raising, whether the engine's library is importable here
and which devices it can use. Engine modules import their library lazily (in
``probe`` and ``load``), so importing echod never imports an engine.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np

Layout = Literal["NC", "NCHW", "NHWC", "NCDHW", "NDHWC"]
LAYOUTS: tuple[Layout, ...] = ("NC", "NCHW", "NHWC", "NCDHW", "NDHWC")


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


def device_kind(device: str) -> str:
    """The device class a device name belongs to: ``"CUDA:1"`` -> ``"cuda"``."""
    return device.partition(":")[0].strip().lower()


def import_library(module: str) -> tuple[ModuleType | None, str]:
    """Import an engine's library: ``(module, "")`` or ``(None, the error text)``."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # an engine library may fail in any way when imported
        return None, f"{type(exc).__name__}: {exc}"


class Engine(ABC):
    """An inference engine holding one loaded model."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.device: str = ""  # in use, as the engine reports it
        self.version: str | None = None

    @classmethod
    @abstractmethod
    def probe(cls) -> Probe:
        """Cheap availability check; never raises."""

    @abstractmethod
    def load(self, model: Path, device: str = "cpu", **options: Any) -> None:
        """Load ``model`` on ``device``; ModelError for a bad file, EngineError otherwise."""

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: input name -> array in, output name -> array out."""

    def close(self) -> None:
        """Release the model and its resources (idempotent)."""
        self.inputs = []
        self.outputs = []
