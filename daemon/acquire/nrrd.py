"""NRRD image sequences (``.seq.nrrd``), as 3D Slicer's Sequences module writes them.

Axes (NRRD order, fastest first): the sequence axis is the one of kind
``list`` or ``time`` (Slicer: ``kinds: domain domain domain list``); an axis
of any other non-spatial kind (``vector``, ``RGB-color``, ``3-color``, ...)
holds the channels; the others are spatial, two or three, a third of size 1
(Slicer stores a 2-D image as a one-slice volume). Without ``kinds``, the
last axis of a 3-D or higher file is the sequence; a file without a sequence
axis is one frame.

Time: PLUS's per-frame ``Seq_FrameNNNN_Timestamp:=`` fields when every frame
has one; else Slicer's ``axis N index values:=`` field when the sequence axis
is labelled ``time`` or has a time unit (``s``, ``ms``); else that axis'
``spacings`` entry (seconds); else ``fps``.

PLUS sequences (``.seq.nrrd`` written by PLUS or IGSIO) also carry per-frame
status and poses and an ``ultrasound image orientation:=``: read as
:mod:`daemon.acquire.plus` says (frames not OK skipped, frames turned to ``MF``,
each frame's pose times the header geometry).

Geometry: ``space directions`` and ``space origin`` give the ijk-to-world
matrix, in LPS as elsewhere in echod (a RAS or LAS ``space`` is converted);
without them, ``spacings``.

Memory: the whole file is decoded when it is opened (a gzip stream cannot be
read in parts); frames are views into it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nrrd
import numpy as np

from daemon.acquire.base import (
    DEFAULT_FPS,
    check_frames,
    closed_error,
    fps_str,
    recorded_frame,
    shape_str,
)
from daemon.acquire.plus import read_frames
from daemon.errors import SourceError
from daemon.frame import Frame

log = logging.getLogger(__name__)

_SEQUENCE_KINDS = frozenset({"list", "time"})
_SPATIAL_KINDS = frozenset({"domain", "space", "none", "???"})
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3}
_TO_LPS = {  # NRRD space -> flips of x, y that make it LPS
    "right-anterior-superior": (-1.0, -1.0),
    "ras": (-1.0, -1.0),
    "left-anterior-superior": (1.0, -1.0),
    "las": (1.0, -1.0),
}
_FIX = "re-export the sequence from 3D Slicer (Sequences: save as .seq.nrrd)"


def _axes(
    header: dict[str, Any], ndim: int, path: Path
) -> tuple[int | None, int | None, list[int]]:
    """(sequence axis, channel axis, spatial axes) in NRRD order."""
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    if not kinds:
        kinds = ["domain"] * ndim
        if ndim >= 3:
            kinds[-1] = "list"
    seq = [a for a, k in enumerate(kinds) if k in _SEQUENCE_KINDS]
    comp = [a for a, k in enumerate(kinds) if k not in _SEQUENCE_KINDS | _SPATIAL_KINDS]
    spatial = [a for a, k in enumerate(kinds) if k in _SPATIAL_KINDS]
    if len(seq) > 1 or len(comp) > 1 or len(spatial) not in (2, 3):
        raise SourceError(
            f"{path}: axes of kinds {' '.join(kinds)} are not a sequence of 2-D images "
            f"(expected two or three spatial axes, at most one list and one vector axis); {_FIX}"
        )
    return (seq[0] if seq else None), (comp[0] if comp else None), spatial


def _times(header: dict[str, Any], axis: int | None, n: int, path: Path) -> np.ndarray | None:
    """Per-frame seconds from the file, or None when it has none."""
    if axis is None:
        return None
    label = str(_at(header.get("labels"), axis) or "").lower()
    unit = str(_at(header.get("units"), axis) or "").lower()
    values = header.get(f"axis {axis} index values")
    if values is not None and (label == "time" or unit in _TIME_UNITS):
        try:
            t = np.array([float(v) for v in str(values).split()])
        except ValueError:
            log.warning("%s: sequence index values are not numbers; using spacing or fps", path)
        else:
            if len(t) == n:
                return t * _TIME_UNITS.get(unit, 1.0)
            log.warning("%s: %d index values for %d frames; using spacing or fps", path, len(t), n)
    spacing = _at(header.get("spacings"), axis)
    if spacing is not None and np.isfinite(spacing) and spacing > 0:
        return np.arange(n) * float(spacing) * _TIME_UNITS.get(unit, 1.0)
    return None


def _at(values: Any, i: int) -> Any:
    return None if values is None or i >= len(values) else values[i]


def _geometry(header: dict[str, Any], spatial: list[int]) -> np.ndarray:
    """The 4x4 ijk-to-world (LPS) of the spatial axes."""
    matrix = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, np.float64)
        for col, axis in enumerate(spatial):
            d = directions[axis]
            if np.all(np.isfinite(d)):
                matrix[: len(d), col] = d
        origin = np.asarray(header.get("space origin", np.zeros(3)), np.float64)
        matrix[: len(origin), 3] = np.nan_to_num(origin)
        fx, fy = _TO_LPS.get(str(header.get("space", "")).lower(), (1.0, 1.0))
        matrix = np.diag([fx, fy, 1.0, 1.0]) @ matrix
    else:
        for col, axis in enumerate(spatial):
            s = _at(header.get("spacings"), axis)
            matrix[col, col] = float(s) if s is not None and np.isfinite(s) and s > 0 else 1.0
    return matrix


class NrrdSequence:
    """Frames of a NRRD sequence file; see the module docstring."""

    def __init__(self, path: Path, *, fps: float | None = None) -> None:
        """Open and decode ``path``; ``fps`` times frames when the file has no timing."""
        self.path = path
        try:
            data, header = nrrd.read(str(path), index_order="C")
        except (nrrd.NRRDError, OSError, ValueError, EOFError, zlib.error) as exc:
            raise SourceError(f"{path}: not a readable NRRD file ({exc}); {_FIX}") from exc
        ndim = data.ndim
        seq, comp, spatial = _axes(header, ndim, path)
        c = [ndim - 1 - a for a in range(ndim)]  # NRRD axis -> axis of the C-ordered array
        order = ([] if seq is None else [c[seq]]) + [c[a] for a in reversed(spatial)]
        array = data.transpose(order + ([] if comp is None else [c[comp]]))
        if seq is None:
            array = array[np.newaxis]
        if len(spatial) == 3:
            if array.shape[1] != 1:
                raise SourceError(
                    f"{path}: each item is a volume of {array.shape[1]} slices; echod plays "
                    "2-D frames (one slice per item)"
                )
            array = array[:, 0]
        if array.ndim == 4 and array.shape[3] == 1:
            array = array[..., 0]
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        self._array: np.ndarray | None = array
        n = array.shape[0]
        fields = {k: v for k, v in header.items() if isinstance(v, str)}
        self._plus = read_frames(fields, n, fields.get("ultrasound image orientation"), path)
        self._valid = self._plus.valid
        if not self._valid:
            raise SourceError(f"{path}: none of its {n} frames has status OK; record again")
        times = self._plus.timestamps
        if times is None:
            times = _times(header, seq, n, path)
        if times is not None:
            span = float(times[self._valid[-1]] - times[self._valid[0]])
            self.nominal_fps = (len(self._valid) - 1) / span if span > 0 else fps
        else:
            self.nominal_fps = fps
            times = np.arange(n) / (fps or DEFAULT_FPS)
        self._t = times
        if np.any(np.diff(times[self._valid]) <= 0):
            log.warning("%s: frame times are not strictly increasing", path)
        self._transform = _geometry(header, spatial)
        norms = np.linalg.norm(self._transform[:3, :3], axis=0)
        self._spacing = (float(norms[0]), float(norms[1]), float(norms[2]))
        check_frames(path, array.shape[1:], array.dtype, self._spacing)
        self.max_shape: tuple[int, ...] = tuple(array.shape[1:])
        self.dtype = array.dtype
        skipped = n - len(self._valid)
        self.description = (
            f"recording {path.name} ({len(self._valid)} frames"
            f"{f', {skipped} skipped (status not OK)' if skipped else ''}, "
            f"{shape_str(self.max_shape, self.dtype)}, {fps_str(self.nominal_fps)})"
        )
        log.info("opened %s: %s, %.1f MB in memory", path, self.description, data.nbytes / 1e6)

    def frames(self) -> Iterator[Frame]:
        """Each frame with status OK in sequence order, turned to ``MF``; ``index`` is its
        position in the file."""
        array = self._array
        if array is None:
            raise closed_error(self.path)
        plus = self._plus
        for i in self._valid:
            image = np.ascontiguousarray(plus.oriented(array[i]))
            transform = plus.transform(i, self._transform)
            yield recorded_frame(image, i, float(self._t[i]), self._spacing, transform)

    def close(self) -> None:
        """Release the pixel data."""
        self._array = None
