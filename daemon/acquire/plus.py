"""PLUS per-frame fields and image orientation, shared by the MetaImage and NRRD readers.

PLUS (and echod's recorder, :mod:`daemon.record`) write ``Seq_FrameNNNN_<Field>``
header fields for every frame:

- ``Timestamp``: seconds; used when every frame has one.
- ``ImageStatus`` (PLUS's NRRD writer: ``Status``): frames not ``OK`` are skipped.
- a pose: 16 numbers, a row-major 4x4 in mm, with ``<Name>Status``. echod's frame
  has one pose, taken from the first of :data:`POSE_FIELDS` the file has (the
  recorder writes the first); a frame whose pose is missing or not ``OK`` is
  untracked. The frame's ijk-to-world is that pose times the header's geometry.

``UltrasoundImageOrientation`` (NRRD: ``ultrasound image orientation``) says
which way the pixels lie: the first letter is the image x axis (``M``arked or
``U``nmarked side of the transducer), the second the y axis (``F``ar or
``N``ear), an optional third the slice axis of a volume. Frames are turned to
``MF``, as PLUS holds B-mode images in memory, near field at the top (what the
model and the display expect, and what the recorder writes); the poses refer
to the ``MF`` image, as in PLUS. A missing field means ``MF``, PLUS's unknown
``XX`` is played as it is (warned), an RF orientation (``FM``, ...) is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.errors import SourceError

log = logging.getLogger(__name__)

POSE_FIELDS = (
    "ProbeToTrackerTransform",
    "ImageToReferenceTransform",
    "ImageToTrackerTransform",
    "ProbeToReferenceTransform",
)
"""Per-frame transforms read as the frame's pose, in order of preference."""

STATUS_FIELDS = ("ImageStatus", "Status")
_ORIENTATION = re.compile(r"([MU])([FN])[AD]?")
_FIX = "re-export the recording from PLUS"


@dataclass(frozen=True)
class PlusFrames:
    """What the per-frame fields of a sequence of ``n`` frames say."""

    valid: list[int]
    """Frames whose image status is OK, in file order."""
    timestamps: np.ndarray | None
    """Seconds per frame (all ``n``), or None when not every frame has one."""
    poses: list[np.ndarray | None]
    """Each frame's pose (4x4), None where untracked."""
    flip: tuple[bool, bool]
    """Flip rows (``N``: near field at the bottom), flip columns (``U``) to reach ``MF``."""

    def oriented(self, image: np.ndarray) -> np.ndarray:
        """``image`` turned to ``MF`` (a C-contiguous copy when it has to be flipped)."""
        rows, cols = self.flip
        if rows:
            image = image[::-1]
        if cols:
            image = image[:, ::-1]
        return np.ascontiguousarray(image) if rows or cols else image

    def transform(self, i: int, geometry: np.ndarray) -> np.ndarray:
        """Frame ``i``'s ijk-to-world: its pose (if any) times the header's ``geometry``."""
        pose = self.poses[i]
        return geometry if pose is None else pose @ geometry


def read_frames(
    fields: Mapping[str, str], n: int, orientation: str | None, path: Path
) -> PlusFrames:
    """The per-frame fields of ``n`` frames from a header's ``fields``; see the module docstring.

    ``orientation`` is the header's orientation value (None when absent).
    """
    status = [_first(fields, i, STATUS_FIELDS) or "OK" for i in range(n)]
    valid = [i for i in range(n) if status[i].upper() == "OK"]
    return PlusFrames(
        valid, _timestamps(fields, n, path), _poses(fields, n, path), _flip(orientation, path)
    )


def _first(fields: Mapping[str, str], i: int, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = fields.get(f"Seq_Frame{i:04d}_{name}")
        if value is not None:
            return value.strip()
    return None


def _timestamps(fields: Mapping[str, str], n: int, path: Path) -> np.ndarray | None:
    keys = [f"Seq_Frame{i:04d}_Timestamp" for i in range(n)]
    present = sum(k in fields for k in keys)
    if present < n:
        if present:
            log.warning("%s: only %d of %d frames have timestamps; ignoring them", path, present, n)
        return None
    try:
        return np.array([float(fields[k]) for k in keys])
    except ValueError as exc:
        raise SourceError(
            f"{path}: a Seq_Frame..._Timestamp field is not a number ({exc}); {_FIX}"
        ) from exc


def _poses(fields: Mapping[str, str], n: int, path: Path) -> list[np.ndarray | None]:
    name = next(
        (p for p in POSE_FIELDS if any(f"Seq_Frame{i:04d}_{p}" in fields for i in range(n))), None
    )
    if name is None:
        return [None] * n
    poses: list[np.ndarray | None] = []
    for i in range(n):
        value = fields.get(f"Seq_Frame{i:04d}_{name}")
        if value is None or fields.get(f"Seq_Frame{i:04d}_{name}Status", "OK").strip() != "OK":
            poses.append(None)
            continue
        try:
            pose = np.array([float(v) for v in value.split()], np.float64)
        except ValueError:
            pose = np.empty(0)
        if pose.size != 16 or not np.all(np.isfinite(pose)):
            raise SourceError(
                f"{path}: Seq_Frame{i:04d}_{name} is not 16 finite numbers (a 4x4 matrix); {_FIX}"
            )
        poses.append(pose.reshape(4, 4))
    log.info("%s: frame poses from %s", path, name)
    return poses


def _flip(orientation: str | None, path: Path) -> tuple[bool, bool]:
    value = (orientation or "MF").strip().upper()
    if value.strip("X") == "":  # PLUS's "unknown" (XX): nothing to turn by
        log.warning("%s: ultrasound image orientation unknown (%s); played as MF", path, value)
        return False, False
    match = _ORIENTATION.fullmatch(value)
    if match is None:
        raise SourceError(
            f"{path}: ultrasound image orientation {value!r} is not a B-mode orientation "
            f"(MF, MN, UF, UN, optionally with A or D); echod plays B-mode and colour images"
        )
    return match[2] == "N", match[1] == "U"
