"""MetaImage recordings (``.mha``/``.mhd``), PLUS sequence metafiles included.

A 2-D+t image gives one frame per slice along its last (time) axis; a plain
2-D image is a one-frame sequence. PLUS writes per-frame header fields
(``Seq_Frame0000_Timestamp``, ``Seq_Frame0000_ImageStatus``, poses, ...) and the
``UltrasoundImageOrientation``, which SimpleITK exposes as metadata keys; they
are read as :mod:`daemon.acquire.plus` says (frames turned to ``MF``).

Memory: the whole pixel data is decoded once, when the source is opened
(that is what validates it, and compressed MetaImages cannot be read in
parts); frames are read-only views into it, so a recording costs its
uncompressed size (the 201-frame 820x616 reference recording: 101 MB).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # SimpleITK is imported when a recording is opened, not with echod
    import SimpleITK as sitk

log = logging.getLogger(__name__)

_FIX_CORRUPT = "re-copy or re-export the recording"
_MAX_HEADER_LINE = 1 << 20
_CHUNK = 1 << 22


def _sitk_reason(exc: RuntimeError) -> str:
    """The useful line of a SimpleITK exception (they span several lines)."""
    for line in str(exc).splitlines():
        if "ERROR:" in line:
            return line.split("):", 1)[-1].split("ERROR:", 1)[-1].strip()
    return str(exc).splitlines()[-1].strip() if str(exc) else type(exc).__name__


def _read_header(path: Path) -> tuple[dict[str, str], int]:
    """The MetaImage header fields and the byte offset where the header ends."""
    fields: dict[str, str] = {}
    with path.open("rb") as f:
        while line := f.readline(_MAX_HEADER_LINE):
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                break
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        return fields, f.tell()


def _check_data(path: Path, fields: dict[str, str], header_end: int, raw: int) -> None:
    """Raise a precise SourceError when the pixel data is missing, cut short or corrupt.

    MetaIO reports a truncated file only as "File cannot be read" and a corrupt
    compressed stream not at all (it prints on stderr and returns garbage),
    so the sizes are checked here and a compressed stream is inflated once
    (in chunks, output discarded; about 0.1 s per 100 MB).
    """
    data_file = fields.get("ElementDataFile", "")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    expected = int(fields.get("CompressedDataSize", "-1")) if compressed else raw
    if data_file == "LOCAL":
        where, offset = path, header_end
    elif data_file:
        where = _beside(path, data_file)
        if not where.is_file():
            raise SourceError(
                f"{path}: its pixel data file {where} is missing; keep the .raw beside the .mhd"
            )
        offset = int(fields.get("HeaderSize", "0"))
        if offset < 0:  # -1: the data are the file's last bytes
            offset = max(where.stat().st_size - expected, 0) if expected >= 0 else 0
    else:
        return  # no data file named: SimpleITK says what is wrong
    present = where.stat().st_size - offset
    if present < expected:
        raise SourceError(
            f"{where}: pixel data is truncated ({present} of {expected} bytes present); "
            f"{_FIX_CORRUPT}"
        )
    if compressed:
        _check_inflates(where, offset, raw)


def _beside(path: Path, data_file: str) -> Path:
    """The detached pixel file a header names, refused unless it lies beside the header
    (in its folder or below): a crafted header must not make echod read another file."""
    if data_file == "LIST" or "%" in data_file:
        raise SourceError(
            f"{path}: pixel data split over several files (ElementDataFile = {data_file}) is "
            "not supported; write one .mha, or a .mhd with one .raw beside it"
        )
    folder = path.parent.resolve()
    where = (folder / data_file).resolve()
    if (
        Path(data_file).is_absolute()
        or ".." in Path(data_file).parts
        or folder not in where.parents
    ):
        raise SourceError(
            f"{path}: its pixel data file {data_file!r} is not beside the header (an absolute "
            f"path, '..' or a link out of {folder}); keep the .raw in the .mhd's folder"
        )
    return where


def _check_inflates(where: Path, offset: int, raw: int) -> None:
    """Inflate the zlib stream at ``offset`` and check it yields ``raw`` bytes."""
    inflater = zlib.decompressobj()
    produced = 0
    try:
        with where.open("rb") as f:
            f.seek(offset)
            while not inflater.eof and produced <= raw and (chunk := f.read(_CHUNK)):
                while chunk and produced <= raw:
                    produced += len(inflater.decompress(chunk, _CHUNK))
                    chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise SourceError(
            f"{where}: compressed pixel data is corrupt (zlib: {exc}); {_FIX_CORRUPT}"
        ) from exc
    if not inflater.eof or produced != raw:
        raise SourceError(
            f"{where}: compressed pixel data inflates to {produced} bytes, expected {raw}"
            f"{'' if inflater.eof else ' (stream cut short)'}; {_FIX_CORRUPT}"
        )


def _pixel_dtype(reader: sitk.ImageFileReader) -> np.dtype:
    """The numpy dtype SimpleITK will give for the file's pixel type."""
    import SimpleITK as sitk

    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    return sitk.GetArrayViewFromImage(probe).dtype


class MetaImageSequence:
    """Frames of a MetaImage file; see the module docstring."""

    def __init__(self, path: Path, *, fps: float | None = None) -> None:
        """Open and fully validate ``path``; ``fps`` times frames without timestamps."""
        self.path = path
        fields, header_end = _read_header(path)
        if "ElementDataFile" not in fields:
            raise SourceError(
                f"{path}: not a MetaImage or its header is cut short (no ElementDataFile "
                f"field); {_FIX_CORRUPT}"
            )
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise SourceError(
                f"{path}: not a readable MetaImage header ({_sitk_reason(exc)}); {_FIX_CORRUPT}"
            ) from exc
        dim, size = reader.GetDimension(), reader.GetSize()
        if dim not in (2, 3):
            raise SourceError(f"{path}: a {dim}-D image; expected 2-D frames or a 2-D+t sequence")
        ncomp = reader.GetNumberOfComponents()
        self.dtype = _pixel_dtype(reader)
        n_raw = int(np.prod(size, dtype=np.int64)) * ncomp * self.dtype.itemsize
        _check_data(path, fields, header_end, n_raw)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise SourceError(
                f"{path}: pixel data cannot be decoded ({_sitk_reason(exc)}); the file is "
                f"corrupt: {_FIX_CORRUPT}"
            ) from exc
        # a copy that owns its memory: frames are views of it and may outlive this source
        array = sitk.GetArrayFromImage(image)
        del image
        if dim == 2:
            array = array[np.newaxis]
        self._array: np.ndarray | None = array
        n = array.shape[0]
        meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}

        self._plus = read_frames(meta, n, meta.get("UltrasoundImageOrientation"), path)
        self._valid = self._plus.valid
        self.skipped = n - len(self._valid)
        if not self._valid:
            raise SourceError(f"{path}: none of its {n} frames has ImageStatus OK; record again")
        self._t, self.nominal_fps = self._timing(reader.GetSpacing(), fps)
        if np.any(np.diff(self._t[self._valid]) <= 0):
            log.warning("%s: frame timestamps are not strictly increasing", path)

        spacing = reader.GetSpacing()
        direction = np.array(reader.GetDirection()).reshape(dim, dim)[:2, :2]
        self._spacing = (float(spacing[0]), float(spacing[1]), 1.0)
        check_frames(path, array.shape[1:], self.dtype, self._spacing)
        self._transform = np.eye(4)
        self._transform[:2, :2] = direction @ np.diag(spacing[:2])
        self._transform[:2, 3] = reader.GetOrigin()[:2]

        self.max_shape: tuple[int, ...] = tuple(array.shape[1:])
        skipped = f", {self.skipped} skipped (ImageStatus not OK)" if self.skipped else ""
        self.description = (
            f"recording {path.name} ({len(self._valid)} frames{skipped}, "
            f"{shape_str(self.max_shape, self.dtype)}, {fps_str(self.nominal_fps)})"
        )
        log.info("opened %s: %s, %.1f MB in memory", path, self.description, array.nbytes / 1e6)

    def _timing(
        self, spacing: tuple[float, ...], fps: float | None
    ) -> tuple[np.ndarray, float | None]:
        """Per-frame seconds and the nominal rate.

        PLUS timestamps when every frame has one; else ``fps`` when given; else
        the spacing along time (a 2-D+t MetaImage); else ``DEFAULT_FPS`` with
        the rate reported as unknown.
        """
        n = len(self._valid) + self.skipped
        t = self._plus.timestamps
        if t is not None:
            span = float(t[self._valid[-1]] - t[self._valid[0]])
            return t, (len(self._valid) - 1) / span if span > 0 else None
        if fps is not None:
            return np.arange(n) / fps, fps
        if len(spacing) == 3 and spacing[2] > 0:
            return np.arange(n) * spacing[2], 1.0 / spacing[2]
        return np.arange(n) / DEFAULT_FPS, None

    def frames(self) -> Iterator[Frame]:
        """Each frame with ImageStatus OK, in file order, turned to ``MF``; ``index`` is its
        slice number."""
        array = self._array
        if array is None:
            raise closed_error(self.path)
        plus = self._plus
        for i in self._valid:
            image = plus.oriented(array[i])
            transform = plus.transform(i, self._transform)
            yield recorded_frame(image, i, float(self._t[i]), self._spacing, transform)

    def close(self) -> None:
        """Release the pixel data."""
        self._array = None
