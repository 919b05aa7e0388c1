"""A folder of still images played as a sequence.

Files are taken in natural order (``frame2`` before ``frame10``) and read with
OpenCV, depth and channels unchanged except that colour becomes RGB(A). Opening
decodes every file once to check that all have the same shape and dtype;
``frames()`` decodes them again as it goes, so memory stays one frame whatever
the folder's size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from daemon.acquire.base import DEFAULT_FPS, check_frames, closed_error, fps_str, shape_str
from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_TO_RGB = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}


def natural_key(name: str) -> list[int | str]:
    """Sort key treating digit runs as numbers: ``frame2`` < ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_image(path: Path) -> np.ndarray:
    """One image as stored (8/16-bit, grey or RGB(A)); SourceError if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SourceError(f"{path}: cannot be decoded as an image; replace or remove the file")
    if image.ndim == 3 and image.shape[2] in _TO_RGB:
        image = cv2.cvtColor(image, _TO_RGB[image.shape[2]])
    return np.ascontiguousarray(image)


class ImageFolder:
    """Frames from the image files of one folder; see the module docstring."""

    def __init__(self, path: Path, *, fps: float | None = None) -> None:
        """Open ``path`` and check every image; ``fps`` times the frames."""
        self.path = path
        try:
            files = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                key=lambda p: natural_key(p.name),
            )
        except OSError as exc:
            raise SourceError(
                f"{path}: cannot list the folder ({exc.strerror}); check permissions"
            ) from exc
        if not files:
            raise SourceError(
                f"{path}: folder has no images ({' '.join(sorted(IMAGE_SUFFIXES))}); "
                "add frames or point the source at a .mha recording"
            )
        first = read_image(files[0])
        for f in files[1:]:
            image = read_image(f)
            if image.shape != first.shape or image.dtype != first.dtype:
                raise SourceError(
                    f"{f}: is {shape_str(image.shape, image.dtype)} but {files[0].name} is "
                    f"{shape_str(first.shape, first.dtype)}; all images of a folder must have "
                    "the same size and type"
                )
        check_frames(files[0], first.shape, first.dtype, (1.0, 1.0))
        self._files: list[Path] | None = files
        self.nominal_fps = fps
        self._period = 1.0 / (fps or DEFAULT_FPS)
        self.max_shape: tuple[int, ...] = tuple(first.shape)
        self.dtype = first.dtype
        self.description = (
            f"folder {path.name}/ ({len(files)} images, {shape_str(self.max_shape, self.dtype)}, "
            f"{fps_str(fps)})"
        )
        log.info("opened %s: %s", path, self.description)

    def frames(self) -> Iterator[Frame]:
        """Each image in natural order; ``t_source`` is ``index / fps``."""
        if self._files is None:
            raise closed_error(self.path)
        for i, f in enumerate(self._files):
            image = read_image(f)
            if image.shape != self.max_shape or image.dtype != self.dtype:
                raise SourceError(
                    f"{f}: changed since the folder was opened (now "
                    f"{shape_str(image.shape, image.dtype)}); restore it or reopen the source"
                )
            yield Frame(image, FrameMeta.for_array(image, index=i, t_source=i * self._period))

    def close(self) -> None:
        self._files = None
