"""DICOM ultrasound cine loops: multi-frame images, JPEG-compressed or not.

Only ultrasound is played: the ``Modality`` must be one of
:data:`ULTRASOUND_MODALITIES` (``US``, and ``IVUS`` for intravascular
ultrasound); a file without one must have an ultrasound SOP class. Anything
else is refused with the job that takes it (a CT slice: the CT job, a
whole-slide image, modality ``SM``: the WSI job), because the live model
would paint an ultrasound segmentation on it.

Frames are decoded one at a time as they are played (pydicom's
``iter_pixels`` reads the file as it goes), so memory stays about one frame
whatever the loop's length; opening reads the header and decodes the first
frame, which validates the file and the decoder.

Timing: ``FrameTimeVector`` (ms from the previous frame, the first 0), else
``FrameTime`` (ms per frame), else ``CineRate`` / ``RecommendedDisplayFrameRate``
(frames per second), else ``fps``. ``t_source`` counts from the first frame.

Spacing: from ``SequenceOfUltrasoundRegions``, the region whose physical units
are cm in x and y (``PhysicalDeltaX/Y``, cm -> mm), a 2-D tissue region
(``RegionSpatialFormat`` 1) first, then the largest; else ``PixelSpacing``;
else 1 mm (warned). The ijk-to-world is that scaling (no patient position:
ultrasound regions have none).

Compression: pydicom's decoder plugins. Pillow (a dependency, permissive
licence) decodes JPEG Baseline, what cine loops are usually compressed with,
8-bit JPEG Extended and JPEG 2000; JPEG-LS and lossless JPEG need python-gdcm
(BSD) or pylibjpeg-libjpeg (GPL-3, so not a dependency): a file that needs a
decoder that is missing fails to open with the packages to install. YBR colour
is converted to RGB; palette colour is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, iter_pixels, pixel_array

from daemon.acquire.base import (
    DEFAULT_FPS,
    check_frames,
    closed_error,
    fps_str,
    recorded_frame,
    shape_str,
)
from daemon.errors import SourceError
from daemon.frame import Frame

log = logging.getLogger(__name__)

_CM = 3  # PhysicalUnitsX/YDirection: centimetres
_TISSUE = 1  # RegionSpatialFormat: 2-D tissue or flow
_FIX = "re-export the loop from the scanner or PACS"

ULTRASOUND_MODALITIES = frozenset({"US", "IVUS"})
"""DICOM modalities played as an ultrasound cine (PS3.3 C.7.3.1.1.1)."""
_ULTRASOUND_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.6",  # (retired) Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.3",  # (retired) Ultrasound Multi-frame Image Storage
    }
)
# modality -> the echod job that takes it, for the refusal's advice
_OTHER_JOBS = {
    "CT": "CT volumes go to the CT job (`echod submit ct`, coming with the offline job system)",
    "SM": "whole-slide images go to the WSI job (`echod submit wsi`, coming with the offline "
    "job system)",
}


def _check_modality(ds: Any, path: Path) -> None:
    """SourceError unless ``ds`` is ultrasound; see the module docstring."""
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in ULTRASOUND_MODALITIES:
        return
    if not modality and str(ds.get("SOPClassUID", "")) in _ULTRASOUND_SOP_CLASSES:
        log.warning("%s: no Modality; played as ultrasound (its SOP class is)", path)
        return
    what = f"modality {modality}" if modality else "no modality"
    sop = ds.get("SOPClassUID")
    kind = f" ({sop.name})" if sop is not None and sop.name != str(sop) else ""
    advice = _OTHER_JOBS.get(modality, "echod's live pipeline plays only ultrasound")
    raise SourceError(
        f"{path}: {what}{kind} is not ultrasound (live playback takes modality "
        f"{' or '.join(sorted(ULTRASOUND_MODALITIES, reverse=True))}); {advice}"
    )


def _timing(ds: Any, n: int, fps: float | None, path: Path) -> tuple[np.ndarray, float | None]:
    """Per-frame seconds and the nominal rate; see the module docstring."""
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        steps = np.atleast_1d(np.asarray(vector, np.float64))
        if len(steps) == n:
            t = np.cumsum(steps) / 1000.0
            t -= t[0]
            span = float(t[-1])
            return t, ((n - 1) / span if span > 0 else fps)
        log.warning("%s: FrameTimeVector has %d values for %d frames; ignored", path, len(steps), n)
    frame_ms = ds.get("FrameTime")
    if frame_ms is not None and float(frame_ms) > 0:
        return np.arange(n) * float(frame_ms) / 1000.0, 1000.0 / float(frame_ms)
    for rate_tag in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = ds.get(rate_tag)
        if rate is not None and float(rate) > 0:
            return np.arange(n) / float(rate), float(rate)
    return np.arange(n) / (fps or DEFAULT_FPS), fps


def _spacing(ds: Any, path: Path) -> tuple[float, float]:
    """(x, y) mm per pixel; see the module docstring."""
    regions = [
        r
        for r in ds.get("SequenceOfUltrasoundRegions", [])
        if r.get("PhysicalUnitsXDirection") == _CM
        and r.get("PhysicalUnitsYDirection") == _CM
        and r.get("PhysicalDeltaX")
        and r.get("PhysicalDeltaY")
    ]
    if regions:

        def rank(r: Any) -> tuple[bool, int]:
            area = (int(r.get("RegionLocationMaxX1", 0)) - int(r.get("RegionLocationMinX0", 0))) * (
                int(r.get("RegionLocationMaxY1", 0)) - int(r.get("RegionLocationMinY0", 0))
            )
            return r.get("RegionSpatialFormat") == _TISSUE, area

        best = max(regions, key=rank)
        return abs(float(best.PhysicalDeltaX)) * 10.0, abs(float(best.PhysicalDeltaY)) * 10.0
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        return float(spacing[1]), float(spacing[0])  # PixelSpacing is (row, column)
    log.warning("%s: no ultrasound region in cm and no PixelSpacing; assuming 1 mm pixels", path)
    return 1.0, 1.0


class DicomCine:
    """Frames of a DICOM (ultrasound) multi-frame file; see the module docstring."""

    def __init__(self, path: Path, *, fps: float | None = None) -> None:
        """Open ``path``, decode its first frame; ``fps`` times frames without timing."""
        self.path = path
        self._open = True
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            _check_modality(ds, path)
            syntax = ds.file_meta.TransferSyntaxUID
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            raise SourceError(f"{path}: not a readable DICOM image ({exc}); {_FIX}") from exc
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
            raise SourceError(f"{path}: palette colour images are not supported; export as RGB")
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise SourceError(f"{path}: pixel data in {syntax.name} cannot be decoded") from exc
        if not decoder.is_available:
            raise SourceError(
                f"{path}: pixel data in {syntax.name} needs a decoder that is not installed: "
                f"{'; '.join(decoder.missing_dependencies)}"
            )
        try:
            first = pixel_array(path, index=0)
        except Exception as exc:  # any decoder's failure on a corrupt file
            raise SourceError(f"{path}: pixel data cannot be decoded ({exc}); {_FIX}") from exc
        n = int(ds.get("NumberOfFrames") or 1)
        self._t, self.nominal_fps = _timing(ds, n, fps, path)
        sx, sy = _spacing(ds, path)
        self._spacing = (sx, sy, 1.0)
        self._transform = np.diag([sx, sy, 1.0, 1.0])
        self.max_shape: tuple[int, ...] = tuple(first.shape)
        self.dtype = first.dtype
        if first.shape[:2] != (rows, cols):
            raise SourceError(f"{path}: frame 0 decodes to {first.shape}, not {rows}x{cols}")
        check_frames(path, first.shape, first.dtype, self._spacing)
        self.description = (
            f"DICOM cine {path.name} ({n} frames, {shape_str(self.max_shape, self.dtype)}, "
            f"{fps_str(self.nominal_fps)}, {syntax.name})"
        )
        log.info("opened %s: %s", path, self.description)

    def frames(self) -> Iterator[Frame]:
        """Each frame in file order, decoded as it is reached."""
        path = self.path
        if not self._open:
            raise closed_error(path)
        try:
            for i, decoded in enumerate(iter_pixels(path)):
                image = np.ascontiguousarray(decoded)
                yield recorded_frame(image, i, float(self._t[i]), self._spacing, self._transform)
        except Exception as exc:  # a frame after the first is corrupt, or the file changed
            raise SourceError(f"{path}: a frame cannot be decoded ({exc}); {_FIX}") from exc

    def close(self) -> None:
        self._open = False
