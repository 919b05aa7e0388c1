"""The interface every frame source implements, and helpers they share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta

DEFAULT_FPS = 30.0
"""Frame rate assumed for ``t_source`` when a source carries no timing at all."""


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
