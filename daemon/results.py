"""What an infer stage writes to its results ring: a record of typed outputs.

A result slot's payload is a *record*: a fixed header, then each output's array,
64-byte aligned, so a reader views every array in place (no copy, no pickle). Each
output has a role (the model card's ``[[outputs]]``, daemon/engines/card.py) and a
fixed meaning, always in the frame's pixel coordinates:

================  ========  ===========  =============================================
role              dtype     shape        meaning
================  ========  ===========  =============================================
segmentation      uint8     (H, W)       label map at the frame's size, 0 = background
confidence        float16   (C, h, w)    per-class probability over the whole frame,
                                         at reduced resolution (longest side <= 128)
classification    float32   (C,)         class probabilities (softmax: they sum to 1)
detection         float32   (N, 6)       x1 y1 x2 y2 score class, best first, after NMS,
                                         only boxes scoring at least the threshold
keypoints         float32   (K, 3)       x y score per named point; x, y NaN when the
                                         point scored below the threshold (not found)
regression        float32   (V,)         values in the card's units
================  ========  ===========  =============================================

Coordinates are frame pixel indices: x is the column, y the row, and the centre of
pixel (column i, row j) is (i, j) (the IMAGE matrix OpenIGTLink sends maps them to mm).

Names, classes, colours and units are not in the record: they are the model's, in the
description its infer stage reports (``outputs`` in ``Network.describe()``); an
output's ``name`` links the two. The slot's :class:`~daemon.frame.FrameMeta` has the
frame's metadata (index, timings, guard verdict, generation); its shape is the
record's byte length.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.engines.card import ROLES, Role

MAGIC = b"ECR1"
MAX_OUTPUTS = 16
NAME_BYTES = 24
CONFIDENCE_MAX_SIDE = 128  # confidence maps are reduced to this longest side

ROLE_DTYPES: dict[Role, np.dtype[Any]] = {
    "segmentation": np.dtype(np.uint8),
    "confidence": np.dtype(np.float16),
    "classification": np.dtype(np.float32),
    "detection": np.dtype(np.float32),
    "keypoints": np.dtype(np.float32),
    "regression": np.dtype(np.float32),
}
ROLE_NDIM: dict[Role, int] = {
    "segmentation": 2,
    "confidence": 3,
    "classification": 1,
    "detection": 2,
    "keypoints": 2,
    "regression": 1,
}
_COLUMNS: dict[Role, int] = {"detection": 6, "keypoints": 3}

# count, then per output: role code, ndim, shape (4), offset, nbytes, name
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct(f"<BB2x4III{NAME_BYTES}s")
HEADER_BYTES = -(-(_HEAD.size + MAX_OUTPUTS * _ENTRY.size) // 64) * 64


class RecordError(ValueError):
    """A payload that is not a valid result record (torn, foreign or corrupt)."""


@dataclass(frozen=True, slots=True)
class Output:
    """One output of a result: its role, its name (the model card's ``tensor`` or the
    role, unique in a record) and its array (see the module table)."""

    role: Role
    name: str
    array: np.ndarray


def check(output: Output) -> None:
    """``RecordError`` unless ``output`` has its role's dtype and shape."""
    a, role = output.array, output.role
    if role not in ROLE_DTYPES:
        raise RecordError(f"output {output.name!r}: unknown role {role!r}")
    if a.dtype != ROLE_DTYPES[role] or a.ndim != ROLE_NDIM[role]:
        raise RecordError(
            f"output {output.name!r} ({role}): {a.dtype} {a.shape}, expected "
            f"{ROLE_DTYPES[role]} with {ROLE_NDIM[role]} dimensions"
        )
    cols = _COLUMNS.get(role)
    if cols is not None and a.shape[1] != cols:
        raise RecordError(f"output {output.name!r} ({role}): rows of {a.shape[1]}, not {cols}")
    if not output.name or len(output.name.encode()) > NAME_BYTES:
        raise RecordError(f"output name {output.name!r}: 1 to {NAME_BYTES} bytes")


def _align(n: int) -> int:
    return -(-n // 64) * 64


def nbytes(outputs: Sequence[Output]) -> int:
    """Bytes the record of ``outputs`` takes."""
    return HEADER_BYTES + sum(_align(o.array.nbytes) for o in outputs)


def capacity(frame_shape: tuple[int, ...], label_maps: int = 2, extra: int = 1 << 20) -> int:
    """A results ring's payload size for frames of ``frame_shape``: room for
    ``label_maps`` label maps and ``extra`` bytes of other outputs (confidence maps of
    up to 16 classes at the reduced resolution fit in 1 MiB)."""
    h, w = frame_shape[:2]
    return HEADER_BYTES + label_maps * _align(h * w) + extra


def pack_into(buffer: np.ndarray, outputs: Sequence[Output]) -> int:
    """Write the record of ``outputs`` into ``buffer`` (a uint8 view of a ring slot);
    returns the bytes used. ``RecordError`` if an output is malformed or it does not fit."""
    if len(outputs) > MAX_OUTPUTS:
        raise RecordError(f"{len(outputs)} outputs; a record holds at most {MAX_OUTPUTS}")
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise RecordError(f"output names repeat: {names}")
    for o in outputs:
        check(o)
    need = nbytes(outputs)
    if need > buffer.nbytes:
        raise RecordError(
            f"a record of {need} bytes does not fit the results ring's {buffer.nbytes}"
        )
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise RecordError(f"a record is written to a 1-D uint8 buffer, not {buffer.dtype}")
    raw = buffer.data
    _HEAD.pack_into(raw, 0, MAGIC, len(outputs))
    at = HEADER_BYTES
    for i, o in enumerate(outputs):
        a = o.array
        shape = (*a.shape, *(0,) * (4 - a.ndim))
        _ENTRY.pack_into(
            raw,
            _HEAD.size + i * _ENTRY.size,
            ROLES.index(o.role),
            a.ndim,
            *shape,
            at,
            a.nbytes,
            o.name.encode(),
        )
        np.copyto(np.ndarray(a.shape, a.dtype, buffer=buffer, offset=at), a)
        at += _align(a.nbytes)
    return need


def pack(outputs: Sequence[Output]) -> np.ndarray:
    """The record of ``outputs`` as a new uint8 array (tests, tools)."""
    buffer = np.zeros(nbytes(outputs), np.uint8)
    pack_into(buffer, outputs)
    return buffer


@dataclass(frozen=True, slots=True)
class Record:
    """A result record read back: its outputs (arrays are views of the payload: copy
    what must outlive the ring slot)."""

    outputs: tuple[Output, ...]

    def get(self, role: Role) -> Output | None:
        """The first output of ``role``, or None."""
        return next((o for o in self.outputs if o.role == role), None)

    def all(self, role: Role) -> list[Output]:
        return [o for o in self.outputs if o.role == role]

    @property
    def labels(self) -> np.ndarray | None:
        """The first segmentation's label map (what the overlay draws), or None."""
        o = self.get("segmentation")
        return None if o is None else o.array


def unpack(payload: np.ndarray) -> Record:
    """The record in ``payload`` (a uint8 view of a ring slot), arrays viewed in place;
    ``RecordError`` naming what is wrong if it is not a valid record."""
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise RecordError(f"a record is a 1-D uint8 payload, not {payload.dtype} {payload.shape}")
    size = payload.nbytes
    if size < HEADER_BYTES:
        raise RecordError(f"a record has at least {HEADER_BYTES} bytes, this one {size}")
    raw = payload.data
    magic, count = _HEAD.unpack_from(raw, 0)
    if magic != MAGIC:
        raise RecordError(f"not a result record (magic {magic!r}, expected {MAGIC!r})")
    if count > MAX_OUTPUTS:
        raise RecordError(f"record claims {count} outputs; at most {MAX_OUTPUTS}")
    outputs = []
    for i in range(count):
        code, ndim, *rest = _ENTRY.unpack_from(raw, _HEAD.size + i * _ENTRY.size)
        dims, (offset, length, raw_name) = rest[:4], rest[4:]
        if code >= len(ROLES):
            raise RecordError(f"output {i}: unknown role code {code}")
        role = ROLES[code]
        dtype = ROLE_DTYPES[role]
        shape = tuple(dims[:ndim])
        if ndim != ROLE_NDIM[role] or int(np.prod(shape)) * dtype.itemsize != length:
            raise RecordError(f"output {i} ({role}): shape {shape} does not match {length} bytes")
        if offset < HEADER_BYTES or offset % 64 or offset + length > size:
            raise RecordError(f"output {i} ({role}): bytes {offset}..{offset + length} outside")
        array = np.ndarray(shape, dtype, buffer=payload, offset=offset)
        outputs.append(Output(role, raw_name.rstrip(b"\0").decode(errors="replace"), array))
    return Record(tuple(outputs))
