"""The interface every frame source implements, and helpers they share."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta

DEFAULT_FPS = 30.0
"""Frame rate assumed for ``t_source`` when a source carries no timing at all."""

CHANNELS = (1, 3, 4)
"""Channels a frame may have (its third axis): grey, RGB, RGBA."""


class FrameSource(Protocol):
    """A recording, a folder of images, a scanner or a phantom, read in order.

    ``frames()`` yields each frame once, as fast as it can (pacing is
    :func:`daemon.acquire.pacing.paced`'s job). Every frame's image is
    C-contiguous with at most ``max_shape`` and exactly ``dtype``; its meta has
    ``index``, ``t_source`` (seconds), ``spacing`` (mm: x, y, z) and
    ``transform`` (4x4 ijk-to-world) filled; ``t_acquired_ns`` is left at 0.
    Calling ``frames()`` again starts a new pass from the first frame.
    """

    description: str
    nominal_fps: float | None
    max_shape: tuple[int, ...]
    dtype: np.dtype

    def frames(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def frame_problem(
    shape: tuple[int, ...], dtype: np.dtype, spacing: tuple[float, ...] = (1.0, 1.0)
) -> str | None:
    """Why a frame cannot enter the pipeline, or None: the one rule every source applies.

    A frame is rows x columns [x channels], both at least 1, channels 1, 3 or 4,
    numeric pixels (integers or floats of at most 8 bytes), and a finite,
    positive pixel spacing in x and y.
    """
    if len(shape) not in (2, 3):
        return f"{len(shape)}-D, not rows x columns [x channels]"
    if min(shape[:2]) < 1:
        return "no pixels (0 rows or columns)"
    if len(shape) == 3 and shape[2] not in CHANNELS:
        return f"{shape[2]} channels per pixel (expected {', '.join(map(str, CHANNELS))})"
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        return f"pixel type {dtype} is not a number type"
    if not all(math.isfinite(s) and s > 0 for s in spacing[:2]):
        return f"pixel spacing {tuple(float(s) for s in spacing[:2])} is not finite and positive"
    return None


def fits(shape: tuple[int, ...], max_shape: tuple[int, ...]) -> bool:
    """Whether a frame of ``shape`` fits a ring sized for ``max_shape`` (rows, columns,
    channels; a 2-D ``max_shape`` holds one channel)."""
    channels = shape[2] if len(shape) == 3 else 1
    limit = max_shape[2] if len(max_shape) == 3 else 1
    return shape[0] <= max_shape[0] and shape[1] <= max_shape[1] and channels <= limit


def check_frames(
    where: Path, shape: tuple[int, ...], dtype: np.dtype, spacing: tuple[float, ...]
) -> None:
    """SourceError (one line) when a recording's frames break :func:`frame_problem`'s rule."""
    problem = frame_problem(shape, dtype, spacing)
    if problem is not None:
        raise SourceError(
            f"{where}: its frames ({shape_str(shape, dtype)}) cannot be played: {problem}; "
            "export the recording as 2-D grey or colour frames"
        )


def shape_str(shape: tuple[int, ...], dtype: np.dtype) -> str:
    """``(616, 820)``, ``uint8`` -> ``"616x820 u1"`` for descriptions."""
    return "x".join(str(s) for s in shape) + " " + dtype.str[1:]


def fps_str(fps: float | None) -> str:
    return "fps unknown" if fps is None else f"{fps:.3g} fps"


def closed_error(path: Path) -> SourceError:
    return SourceError(f"{path}: the source was closed; open it again to read frames")


def recorded_frame(
    image: np.ndarray,
    index: int,
    t_source: float,
    spacing: tuple[float, float, float],
    transform: np.ndarray,
) -> Frame:
    """Frame ``index`` of a recording, with its own copy of the recording's geometry."""
    meta = FrameMeta.for_array(
        image, index=index, t_source=t_source, spacing=spacing, transform=transform.copy()
    )
    return Frame(image, meta)
