"""What travels with every frame: the metadata header of a ring slot.

A frame is an image (``numpy`` array, up to 3 dimensions: height, width,
channels) plus a :class:`FrameMeta`. The metadata has a fixed binary layout,
:data:`META_DTYPE`, so the ring can store it in the slot header without
pickling; this module is the one place that layout is decided.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

MAX_DIMS = 3


class Timing(IntEnum):
    """Indices of the per-stage timings carried in the header (milliseconds).

    The three ``NN_*`` rows are the paper's Table 2 columns; the header has room
    for ``N_TIMINGS`` so that more stages can report without a layout change.
    """

    NN_INPUT = 1
    NN_INFERENCE = 2
    NN_OUTPUT = 3
    QUEUE = 4  # in the frames ring: acquisition to the infer stage's read


N_TIMINGS = 8

WITHHELD = 1  # flags: the uncertainty guard withheld this result's overlay (labels blanked)

META_DTYPE = np.dtype(
    [
        ("index", "<i8"),  # frame number at the source
        ("t_acquired_ns", "<i8"),  # CLOCK_MONOTONIC (system-wide) when the frame entered echod
        ("t_source", "<f8"),  # the source's own timestamp in seconds (recording, scanner)
        ("ndim", "<u1"),
        ("dtype", "S3"),  # numpy dtype.str without byte order, e.g. b"u1", b"f4"
        ("shape", "<u4", (MAX_DIMS,)),
        ("spacing", "<f8", (3,)),  # mm per pixel: x, y, z
        ("transform", "<f8", (4, 4)),  # ijk-to-world
        ("timings_ms", "<f4", (N_TIMINGS,)),
        ("confidence", "<f4"),  # results: the guard's finding confidence (1 = no doubt)
        ("flags", "<u4"),  # results: WITHHELD
        ("checksum", "<u8"),  # optional content checksum (0 = none), used by tests
        ("generation", "<u4"),  # results: which model made it (0, then +1 per hot-swap)
    ],
    align=True,
)
META_SIZE = META_DTYPE.itemsize


def _struct_of(dtype: np.dtype[Any]) -> struct.Struct:
    """The ``struct`` twin of ``dtype`` (same offsets, padding as ``x``): packing with
    ``struct`` costs a few microseconds per frame, numpy field by field about ten."""
    codes = {"i8": "q", "u8": "Q", "f8": "d", "f4": "f", "u4": "I", "u1": "B"}
    fmt, at = "<", 0
    for name in dtype.names or ():
        sub, offset = dtype.fields[name][:2]  # type: ignore[index]
        fmt += "x" * (offset - at)
        base = sub.base.str[1:]
        count = int(np.prod(sub.shape)) if sub.shape else 1
        fmt += f"{sub.itemsize}s" if base.startswith("S") else codes[base] * count
        at = offset + sub.itemsize
    fmt += "x" * (dtype.itemsize - at)
    packed = struct.Struct(fmt)
    assert packed.size == dtype.itemsize, (fmt, dtype.itemsize)
    return packed


_STRUCT = _struct_of(META_DTYPE)


@dataclass(slots=True)
class FrameMeta:
    """Per-frame metadata. ``shape``/``dtype`` describe the payload."""

    index: int = 0
    t_acquired_ns: int = 0
    t_source: float = 0.0
    shape: tuple[int, ...] = ()
    dtype: str = "u1"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    transform: np.ndarray = field(default_factory=lambda: np.eye(4))
    timings_ms: np.ndarray = field(default_factory=lambda: np.zeros(N_TIMINGS, np.float32))
    confidence: float = 1.0
    flags: int = 0
    checksum: int = 0
    generation: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def pack_into(self, buffer: Any, offset: int = 0) -> None:
        """Write the ``META_DTYPE`` layout into ``buffer`` (shared memory) at ``offset``."""
        n = len(self.shape)
        if n > MAX_DIMS:
            raise ValueError(f"frames have at most {MAX_DIMS} dimensions, got shape {self.shape}")
        _STRUCT.pack_into(
            buffer,
            offset,
            self.index,
            self.t_acquired_ns,
            self.t_source,
            n,
            self.dtype.encode(),
            *self.shape,
            *(0,) * (MAX_DIMS - n),
            *self.spacing,
            # as Python floats: struct converts numpy scalars one by one, at twice the cost
            *np.asarray(self.transform, np.float64).ravel().tolist(),
            *np.asarray(self.timings_ms).tolist(),
            self.confidence,
            self.flags,
            self.checksum,
            self.generation,
        )

    @classmethod
    def unpack_from(cls, buffer: Any, offset: int = 0) -> FrameMeta:
        """Read the ``META_DTYPE`` layout into an independent ``FrameMeta``."""
        v = _STRUCT.unpack_from(buffer, offset)
        ndim = v[3]
        d = 5 + MAX_DIMS
        return cls(
            index=v[0],
            t_acquired_ns=v[1],
            t_source=v[2],
            shape=v[5 : 5 + ndim],
            dtype=v[4].rstrip(b"\0").decode(),
            spacing=v[d : d + 3],
            transform=np.array(v[d + 3 : d + 19], np.float64).reshape(4, 4),
            timings_ms=np.array(v[d + 19 : d + 19 + N_TIMINGS], np.float32),
            confidence=v[-4],
            flags=v[-3],
            checksum=v[-2],
            generation=v[-1],
        )

    @classmethod
    def for_array(cls, image: np.ndarray, **kw: object) -> FrameMeta:
        """Metadata describing ``image``; other fields from keywords."""
        return cls(shape=tuple(image.shape), dtype=image.dtype.str[1:], **kw)  # type: ignore[arg-type]


@dataclass(slots=True)
class Frame:
    """An image and its metadata as a source produces it (before the ring)."""

    image: np.ndarray
    meta: FrameMeta
