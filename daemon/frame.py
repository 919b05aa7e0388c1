"""What travels with every frame: the metadata header of a ring slot.

A frame is an image (``numpy`` array, up to 3 dimensions: height, width,
channels) plus a :class:`FrameMeta`. The metadata has a fixed binary layout,
:data:`META_DTYPE`, so the ring can store it in the slot header without
pickling; this module is the one place that layout is decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAX_DIMS = 3


class Timing(IntEnum):
    """Indices of the per-stage timings carried in the header (milliseconds).

    The three ``NN_*`` rows are the paper's Table 2 columns.
    """

    ACQUIRE = 0
    NN_INPUT = 1
    NN_INFERENCE = 2
    NN_OUTPUT = 3
    DISPLAY = 4


N_TIMINGS = 8

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
        ("checksum", "<u8"),  # optional content checksum (0 = none), used by tests
    ],
    align=True,
)
META_SIZE = META_DTYPE.itemsize


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
    checksum: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def pack_into(self, rec: np.ndarray) -> None:
        """Write into a ``META_DTYPE`` record (a view of shared memory)."""
        if len(self.shape) > MAX_DIMS:
            raise ValueError(f"frames have at most {MAX_DIMS} dimensions, got shape {self.shape}")
        shape = np.zeros(MAX_DIMS, np.uint32)
        shape[: len(self.shape)] = self.shape
        rec["index"] = self.index
        rec["t_acquired_ns"] = self.t_acquired_ns
        rec["t_source"] = self.t_source
        rec["ndim"] = len(self.shape)
        rec["dtype"] = self.dtype.encode()
        rec["shape"] = shape
        rec["spacing"] = self.spacing
        rec["transform"] = self.transform
        rec["timings_ms"] = self.timings_ms
        rec["checksum"] = self.checksum

    @classmethod
    def unpack_from(cls, rec: np.ndarray) -> FrameMeta:
        """Read a ``META_DTYPE`` record into an independent ``FrameMeta``."""
        ndim = int(rec["ndim"])
        return cls(
            index=int(rec["index"]),
            t_acquired_ns=int(rec["t_acquired_ns"]),
            t_source=float(rec["t_source"]),
            shape=tuple(int(s) for s in rec["shape"][:ndim]),
            dtype=bytes(rec["dtype"]).decode(),
            spacing=tuple(float(s) for s in rec["spacing"]),  # type: ignore[arg-type]
            transform=np.array(rec["transform"], dtype=np.float64),
            timings_ms=np.array(rec["timings_ms"], dtype=np.float32),
            checksum=int(rec["checksum"]),
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
