"""Recording sink: frames to a PLUS sequence metafile that echod (and PLUS, 3D Slicer) replays.

File layout. A PLUS sequence is a 3-D MetaImage (``NDims = 3``, the third axis
time) whose header carries per-frame fields: ``Seq_FrameNNNN_Timestamp``,
``_ImageStatus``, ``_FrameNumber`` and, when the frame has a pose,
``_ProbeToTrackerTransform`` (+ ``Status``). The pixels go to a ``.raw`` file
beside the header (``ElementDataFile``), not ``LOCAL``: with local data the
header, which grows by a few lines per frame, must precede the pixels, so the
data would have to be moved behind the final header when recording stops (what
PLUS does: a copy of the whole session at stop, and a crash loses the file).
Instead each frame is streamed:

1. its pixels are appended to the ``.raw`` (straight from the ring slot);
2. its header lines are written over the header's last line, followed by that
   line again (``ElementDataFile = name.raw``);
3. the frame count in ``DimSize``, written with a fixed width, is updated in place.

Each step is one ``pwrite``, so if echod dies at any point the files are a
valid recording of the frames counted (the ``.raw`` may hold one frame more,
the header one frame's lines more: readers ignore both); nothing is rewritten
or copied, whatever the length. Durability against a power cut: the folder is
synced when the files are made, and both files at least every ``sync_s``
(1 s) while recording, the pixels before the header, and at close; a power cut
loses about the last second.
Timestamps are written with Python's shortest round-trip ``repr``, so a replay
through :class:`daemon.acquire.MetaImageSequence` gives back the same pixels
and the same ``t_source`` bit for bit.

Geometry: ``ElementSpacing`` is the first frame's spacing. A frame's pose is
its ijk-to-world with the spacing divided out; when that is not the identity
(a tracked probe, or a scanner placing its image in a world frame) it is
written as the frame's ``ProbeToTrackerTransform``; the header's
``Offset``/``TransformMatrix`` stay the identity, as in PLUS files. echod's
readers multiply it back (:mod:`daemon.acquire.plus`). Orientation: sources
hand frames over near field at the top (PLUS's ``MF``; a file in another
orientation is turned when read), so the header says ``MFA``.

A frame of another size or type than the recording's (the scanner's depth
changed) starts a new file, ``name-2.igs.mha``, ... ; an existing file is
never overwritten (the next free name is taken).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from daemon.errors import ConfigError, StageError
from daemon.frame import FrameMeta
from daemon.stage import POLL_S, Stage

log = logging.getLogger(__name__)

_MET_TYPES = {
    "u1": "MET_UCHAR",
    "i1": "MET_CHAR",
    "u2": "MET_USHORT",
    "i2": "MET_SHORT",
    "u4": "MET_UINT",
    "i4": "MET_INT",
    "f4": "MET_FLOAT",
    "f8": "MET_DOUBLE",
}
_COUNT_WIDTH = 12  # digits reserved for the frame count in DimSize
_POSE_FIELD = "ProbeToTrackerTransform"
_IDENTITY_ATOL = 1e-5
SYNC_S = 1.0
"""Longest time recorded frames stay in the page cache only (lost in a power cut)."""


def free_path(path: Path) -> Path:
    """``path``, or ``name-2.igs.mha``, ``name-3...`` : the first whose header and data are free."""
    stem, dot, suffixes = path.name.partition(".")
    candidate, k = path, 1
    while candidate.exists() or data_path(candidate).exists():
        k += 1
        candidate = path.with_name(f"{stem}-{k}{dot}{suffixes}")
    return candidate


def data_path(header: Path) -> Path:
    """The pixel file beside a header: ``name.igs.mha`` -> ``name.igs.raw``."""
    return header.with_suffix(".raw")


def _number(x: float) -> str:
    return repr(float(x))


class SequenceWriter:
    """Appends frames of one shape and dtype to a new PLUS sequence metafile."""

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        meta: FrameMeta,
        *,
        sync_s: float = SYNC_S,
    ):
        """Create ``path`` (and its ``.raw``) for frames like the first one, ``meta``;
        committed frames reach the disk within ``sync_s`` seconds."""
        if dtype.str[1:] not in _MET_TYPES or len(shape) not in (2, 3):
            raise StageError(f"cannot record frames of {shape} {dtype} as a MetaImage sequence")
        self.path, self.shape, self.dtype = path, tuple(shape), dtype
        self.count = 0
        self._sync_s = sync_s
        self._data = os.open(data_path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._data_end = 0
        try:
            self._header = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            os.close(self._data)
            data_path(path).unlink()
            raise
        channels = shape[2] if len(shape) == 3 else 1
        sx, sy, _ = meta.spacing
        head = "".join(
            line + "\n"
            for line in (
                "ObjectType = Image",
                "NDims = 3",
                "AnatomicalOrientation = RAI",
                "BinaryData = True",
                "BinaryDataByteOrderMSB = False",
                "CenterOfRotation = 0 0 0",
                "CompressedData = False",
            )
        )
        dims = f"DimSize = {shape[1]} {shape[0]} "
        self._count_at = len(head) + len(dims)  # the frame count is updated here, in place
        text = head + "".join(
            line + "\n"
            for line in (
                dims + "0".ljust(_COUNT_WIDTH),
                f"ElementNumberOfChannels = {channels}",
                f"ElementSpacing = {_number(sx)} {_number(sy)} 1",
                f"ElementType = {_MET_TYPES[dtype.str[1:]]}",
                "Kinds = domain domain list",
                "Offset = 0 0 0",
                "TransformMatrix = 1 0 0 0 1 0 0 0 1",
                "UltrasoundImageOrientation = MFA",
                f"UltrasoundImageType = {'BRIGHTNESS' if channels == 1 else 'RGB_COLOR'}",
            )
        )
        self._tail = f"ElementDataFile = {data_path(path).name}\n".encode()
        self._end = len(text)
        os.pwrite(self._header, text.encode() + self._tail, 0)
        _sync_folder(path)
        self._synced, self._synced_count = time.monotonic(), 0
        self._dtype_le = dtype.newbyteorder("<")
        log.info("recording to %s (%s %s)", path, "x".join(map(str, shape)), dtype)

    def append(self, image: np.ndarray, meta: FrameMeta) -> None:
        """Write the pixels of ``image`` (in place if they are little-endian, C-contiguous)."""
        data = image if image.dtype == self._dtype_le else image.astype(self._dtype_le)
        view = np.ascontiguousarray(data).data.cast("B")
        at = self._data_end
        while view:
            written = os.pwrite(self._data, view, at)
            view, at = view[written:], at + written
        self._pending = (at, meta)

    def commit(self) -> None:
        """Publish the frame just appended: its header lines, then the count."""
        at, meta = self._pending
        i = self.count
        fields = [
            (f"Seq_Frame{i:04d}_FrameNumber", str(meta.index)),
            (f"Seq_Frame{i:04d}_Timestamp", _number(meta.t_source)),
            (f"Seq_Frame{i:04d}_ImageStatus", "OK"),
        ]
        pose = pose_of(meta)
        if pose is not None:
            fields.append(
                (f"Seq_Frame{i:04d}_{_POSE_FIELD}", " ".join(_number(v) for v in pose.ravel()))
            )
            fields.append((f"Seq_Frame{i:04d}_{_POSE_FIELD}Status", "OK"))
        lines = "".join(f"{k} = {v}\n" for k, v in fields).encode()
        os.pwrite(self._header, lines + self._tail, self._end)
        self._end += len(lines)
        self.count += 1
        os.pwrite(self._header, str(self.count).ljust(_COUNT_WIDTH).encode(), self._count_at)
        self._data_end = at
        self.sync_due()

    def sync_due(self) -> None:
        """Flush the pixels, then the header that counts them, to the disk if frames
        committed since the last flush are ``sync_s`` old (the recorder also calls this
        while no frame comes)."""
        if self.count > self._synced_count and time.monotonic() - self._synced >= self._sync_s:
            os.fdatasync(self._data)
            os.fdatasync(self._header)
            self._synced, self._synced_count = time.monotonic(), self.count

    def close(self) -> None:
        """Flush both files to disk and close them (remove them if no frame was committed)."""
        for fd in (self._data, self._header):
            os.fsync(fd)
            os.close(fd)
        if self.count == 0:
            self.path.unlink()
            data_path(self.path).unlink()
            _sync_folder(self.path)
        log.info("recorded %d frames to %s", self.count, self.path)


def _sync_folder(path: Path) -> None:
    """Make the creation (or removal) of files in ``path``'s folder durable."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pose_of(meta: FrameMeta) -> np.ndarray | None:
    """The frame's ijk-to-world with its spacing divided out, unless that is the identity
    (within 1e-5: OpenIGTLink geometry is float32, so an untracked image is not exact)."""
    # each column divided by its spacing: fl(fl(t / s) * s) == t for any t = fl(p * s), so the
    # readers' pose @ diag(spacing) gives the transform back bit for bit (1 / s does not)
    pose = np.asarray(meta.transform, np.float64) / np.array([*meta.spacing, 1.0])
    return None if np.allclose(pose, np.eye(4), rtol=0, atol=_IDENTITY_ATOL) else pose


class RecordStage(Stage):
    """Reads the frames ring in mode "all" and writes every frame to a sequence file.

    Config ``[record]``: ``path`` (the first file; later parts and existing names
    get ``-2``, ``-3``...). A frame overwritten in the ring while it was being
    written (the acquire writer does not wait under the "overwrite" policy) is
    not committed (counted as torn; the next frame's pixels go over it). A write
    that fails (disk full, removed) stops the recording, not the pipeline: the
    frames are still read and counted as skipped.
    """

    def setup(self) -> dict[str, Any]:
        path = self.config.record.path
        if not path:
            raise ConfigError("record.enabled needs record.path (the .igs.mha to write)")
        self.base = Path(path).expanduser()
        if not self.base.parent.is_dir():
            raise ConfigError(f"record.path {self.base}: folder {self.base.parent} does not exist")
        self.reader = self.ctx.input("frames")
        self.writer: SequenceWriter | None = None
        self.parts: list[SequenceWriter] = []
        self.recorded = self.torn = self.skipped = 0
        self.error: str | None = None
        return {"recording": str(self.base)}

    def step(self) -> bool:
        f = self.reader.read(timeout=POLL_S)
        if f is not None and self.error is not None:
            self.skipped += 1
            return True
        try:
            if f is not None:
                self._write(f.image, f.meta, f.valid)
            elif self.writer is not None:
                self.writer.sync_due()  # no frame now: the last ones still reach the disk
        except OSError as e:
            self.error = f"{e.strerror or e}: {e.filename or self.base}"
            log.error("recording stopped (%s); the live pipeline goes on", self.error)
            self.skipped += f is not None
            self._close_writer()
        return True

    def _write(self, image: np.ndarray, meta: FrameMeta, valid: Callable[[], bool]) -> None:
        w = self.writer
        if w is None or image.shape != w.shape or image.dtype != w.dtype:
            self._close_writer()
            w = self.writer = SequenceWriter(free_path(self.base), image.shape, image.dtype, meta)
            self.parts.append(w)
        w.append(image, meta)
        if not valid():
            self.torn += 1  # the slot was overwritten meanwhile: the pixels are not kept
            return
        w.commit()
        self.recorded += 1

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError as e:
                log.error("recording %s: closing failed (%s)", writer.path, e.strerror or e)

    def teardown(self) -> None:
        if hasattr(self, "reader"):
            self._close_writer()

    def summary(self) -> dict[str, Any]:
        files = [str(w.path) for w in self.parts if w.count]
        return {
            "recorded": self.recorded,
            "torn": self.torn,
            "skipped": self.skipped,
            "files": files,
            "error": self.error,
        }
