"""Reading whole-slide images for the WSI job: the slide, its level, its tissue, its patches.

- :func:`open_slide`: OpenSlide for SVS, NDPI, MRXS, SCN, Philips TIFF, generic tiled
  TIFF and DICOM WSI; a tiled TIFF that OpenSlide rejects (WebP, JPEG 2000 or JPEG XL
  tiles, say) is read through tifffile. A truncated TIFF is refused at open (its
  directories or tiles reach past the end of the file), not half-way through a job.
- :func:`resolve`: the level to read for a target microns per pixel or magnification: a
  level within :data:`TOLERANCE` of it is read as it is; otherwise the nearest finer level
  is read and each patch resized.
- :func:`read_overview` and :func:`tissue_mask`: the slide at about 2,048 pixels on its
  long side (read in blocks from the coarsest level that is fine enough, so never a whole
  large level in memory), and tissue on it: HSV saturation or darkness with Otsu's
  threshold (not below a floor), or a fixed brightness threshold for fluorescence, then a
  morphological closing and opening.
- :class:`Grid` and :func:`coverage`: the patch grid over the slide (level-0 pixels) and
  the tissue fraction of each patch.
- :class:`PatchReader`: patches read on a pool of threads, in order, at most ``prefetch``
  ahead (a bounded queue), so that inference does not wait for reading and memory stays
  at ``prefetch`` patches. Threads, not processes: OpenSlide and tifffile's codecs decode
  with the GIL released, so threads read in parallel and hand numpy arrays over without
  a copy; ``bench/wsi_table4.py`` measures both.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import cv2
import numpy as np

from daemon.offline.kind import JobInputError

log = logging.getLogger(__name__)

TOLERANCE = 0.05  # a level within 5 % of the asked downsample is read without resizing
DEFAULT_MPP = 0.5  # 20x: the bundled classifier's resolution
OVERVIEW_SIDE = 2048  # long side of the overview the tissue mask is computed on
READ_SIDE = 2048  # largest side of one block read for the overview
FORMATS = "SVS, NDPI, MRXS, SCN, Philips TIFF, tiled TIFF or DICOM WSI"
TissueMethod = Literal["saturation", "darkness", "fluorescence"]


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level


class Slide(ABC):
    """An open slide: its levels, what it says of its resolution, and region reads."""

    reader: str  # "openslide" or "tifffile"

    def __init__(self, path: Path, vendor: str, levels: tuple[Level, ...]) -> None:
        self.path = path
        self.vendor = vendor
        self.levels = levels
        self.mpp: float | None = None  # level-0 microns per pixel, when the slide says
        self.objective: float | None = None  # scanner objective magnification
        self.background = (255, 255, 255)

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @abstractmethod
    def region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``level``, its top-left at level-0 pixel (x, y) (as
        OpenSlide's ``read_region``); outside the slide is the background colour."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the file."""

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "reader": self.reader,
            "format": self.vendor,
            "width": self.width,
            "height": self.height,
            "levels": [[lv.width, lv.height, round(lv.downsample, 4)] for lv in self.levels],
            "mpp": self.mpp,
            "objective": self.objective,
        }

    def _read_error(self, x: int, y: int, level: int, exc: Exception) -> JobInputError:
        return JobInputError(
            f"{self.path.name}: cannot read level {level} at ({x}, {y}): {exc}; the slide is "
            "corrupt or truncated: copy it again"
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class OpenSlideSlide(Slide):
    reader = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._error = openslide.OpenSlideError
        self._slide = openslide.OpenSlide(str(path))
        s = self._slide
        levels = tuple(
            Level(w, h, float(d))
            for (w, h), d in zip(s.level_dimensions, s.level_downsamples, strict=True)
        )
        super().__init__(path, s.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"), levels)
        props = s.properties
        self.mpp = _positive(props.get(openslide.PROPERTY_NAME_MPP_X))
        self.objective = _positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        bg = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
        if bg and len(bg) == 6:
            self.background = (int(bg[0:2], 16), int(bg[2:4], 16), int(bg[4:6], 16))

    def region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        try:
            img = self._slide.read_region((x, y), level, (w, h))
        except self._error as exc:
            raise self._read_error(x, y, level, exc) from exc
        rgba = np.asarray(img)
        # any alpha below 255 (the top byte of each pixel read as a little-endian word):
        # outside the slide or its scanned areas
        if (rgba.view("<u4") < 0xFF000000).any():
            a = rgba[:, :, 3:].astype(np.float32) / 255.0
            bg = np.array(self.background, np.float32)
            return np.rint(rgba[:, :, :3] * a + bg * (1.0 - a)).astype(np.uint8)
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)

    def close(self) -> None:
        self._slide.close()


class TiffSlide(Slide):
    """A tiled TIFF through tifffile: tiles read with ``os.pread`` (no shared file position,
    so any thread reads) and decoded by tifffile's codecs."""

    reader = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        try:
            pages = [lv.keyframe for lv in self._tif.series[0].levels]
            for i, p in enumerate(pages):
                if not p.is_tiled:
                    raise JobInputError(
                        f"{path.name} is a TIFF but level {i} is not tiled; convert it to a "
                        "tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
                    )
                if p.dtype != np.uint8 or p.samplesperpixel not in (1, 3, 4):
                    raise JobInputError(
                        f"{path.name}: level {i} is {p.samplesperpixel} x {p.dtype}; the WSI "
                        "job reads 8-bit gray, RGB or RGBA slides"
                    )
                if p.planarconfig != 1 and p.samplesperpixel > 1:
                    raise JobInputError(
                        f"{path.name}: level {i} stores its colours in separate planes; "
                        "convert it to a contiguous (chunky) RGB TIFF"
                    )
        except BaseException:
            self._tif.close()
            raise
        self._pages = pages
        w0 = pages[0].imagewidth
        levels = tuple(Level(p.imagewidth, p.imagelength, w0 / p.imagewidth) for p in pages)
        super().__init__(path, "tiff", levels)
        self.mpp = _tiff_mpp(pages[0])
        self._fd = os.open(path, os.O_RDONLY)

    def region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        ds = self.levels[level].downsample
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.empty((h, w, 3), np.uint8)
        out[:] = self.background
        for ty in range(max(0, ly // th), min(-(-page.imagelength // th), -(-(ly + h) // th))):
            for tx in range(max(0, lx // tw), min(across, -(-(lx + w) // tw))):
                i = ty * across + tx
                try:
                    data = os.pread(self._fd, page.databytecounts[i], page.dataoffsets[i])
                    tile, _, _ = page.decode(data, i, jpegtables=page.jpegtables)
                except Exception as exc:  # a codec fails in its own ways on bad data
                    raise self._read_error(x, y, level, exc) from exc
                if tile is None:  # a tile never written: background
                    continue
                tile = tile.reshape(th, tw, -1)
                y0, x0 = ty * th - ly, tx * tw - lx  # tile origin in the output
                ys, xs = max(0, y0), max(0, x0)
                ye = min(h, y0 + th, page.imagelength - ly)
                xe = min(w, x0 + tw, page.imagewidth - lx)
                if ye > ys and xe > xs:
                    out[ys:ye, xs:xe] = _rgb(tile[ys - y0 : ye - y0, xs - x0 : xe - x0])
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tif.close()


def _rgb(tile: np.ndarray) -> np.ndarray:
    if tile.shape[2] == 1:
        return np.repeat(tile, 3, axis=2)
    return tile[:, :, :3]


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def _tiff_mpp(page: Any) -> float | None:
    """Microns per pixel from the resolution tags (centimetre or inch units only)."""
    per_um = {2: 25_400.0, 3: 10_000.0}.get(int(page.resolutionunit))
    if per_um is None:
        return None
    xres = _positive(page.get_resolution()[0])
    return per_um / xres if xres else None


def open_slide(path: Path) -> Slide:
    """Open ``path`` with OpenSlide, else (a tiled TIFF it rejects) with tifffile;
    :class:`JobInputError` naming the problem when neither can."""
    path = Path(path)
    if not path.exists():
        raise JobInputError(f"slide not found: {path}")
    if path.is_file() and (why := tiff_truncation(path)):
        raise JobInputError(f"{path.name} is truncated: {why}; copy the slide again")
    import openslide

    try:
        return OpenSlideSlide(path)
    except openslide.OpenSlideError as exc:
        rejected = str(exc) or type(exc).__name__
    if _is_tiff(path):
        try:
            return TiffSlide(path)
        except JobInputError:
            raise
        except Exception as exc:
            raise JobInputError(
                f"{path.name} is a TIFF that neither OpenSlide ({rejected}) nor tifffile ({exc}) "
                f"can read; give an {FORMATS} file"
            ) from exc
    raise JobInputError(
        f"{path.name} is not a slide OpenSlide can read ({rejected}); give an {FORMATS} file"
    )


def _is_tiff(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def tiff_truncation(path: Path) -> str:
    """Why a TIFF file is truncated (a directory or a tile past its end); "" when it is
    whole or not a TIFF. Reads the directories only. NDPI is skipped: its offsets wrap
    past 4 GiB."""
    if not _is_tiff(path) or path.suffix.lower() == ".ndpi":
        return ""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(order + "H", head[2:4])[0] == 43
        count_fmt, entry, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        offset = struct.unpack(order + off_fmt, head[8:16] if big else head[4:8])[0]
        seen: set[int] = set()
        while offset and offset not in seen:
            seen.add(offset)
            n_size = struct.calcsize(count_fmt)
            if offset + n_size > size:
                return f"directory {len(seen)} is at byte {offset}, past its end ({size} bytes)"
            f.seek(offset)
            (n,) = struct.unpack(order + count_fmt, f.read(n_size))
            end = offset + n_size + n * entry + struct.calcsize(off_fmt)
            if end > size:
                return f"directory {len(seen)} ends at byte {end}, past its end ({size} bytes)"
            f.seek(end - struct.calcsize(off_fmt))
            (offset,) = struct.unpack(order + off_fmt, f.read(struct.calcsize(off_fmt)))
    import tifffile

    with tifffile.TiffFile(path) as tif:
        for i, page in enumerate(tif.pages):
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                end = int((offsets + counts).max())
                return f"image {i}'s data reach byte {end}, past its end ({size} bytes)"
    return ""


@dataclass(frozen=True)
class Sampling:
    """Where patches come from: the level read, and how level-0 pixels map to the
    network's pixels."""

    level: int
    level_downsample: float
    downsample: float  # level-0 pixels per network pixel
    slide_mpp: float  # level-0 microns per pixel (the slide's, configured, or 10 / objective)
    magnification: float  # of the network's pixels

    @property
    def mpp(self) -> float:
        """Microns per network pixel."""
        return self.slide_mpp * self.downsample

    @property
    def scale(self) -> float:
        """Level pixels per network pixel (1: read as it is; above 1: read more and shrink)."""
        return self.downsample / self.level_downsample

    @property
    def resized(self) -> bool:
        return self.scale != 1.0

    def describe(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "level_downsample": round(self.level_downsample, 4),
            "downsample": round(self.downsample, 4),
            "resized": self.resized,
            "slide_mpp": round(self.slide_mpp, 5),
            "mpp": round(self.mpp, 4),
            "magnification": round(self.magnification, 2),
        }


def resolve(
    slide: Slide,
    mpp: float | None = None,
    magnification: float | None = None,
    slide_mpp: float | None = None,
) -> Sampling:
    """The level and downsample for a target ``mpp`` or ``magnification`` (neither:
    :data:`DEFAULT_MPP`); ``slide_mpp`` is the level-0 microns per pixel of a slide that
    does not say (it wins over the slide's own). Magnification M is 10 / M um/px."""
    name = slide.path.name
    mpp0 = slide_mpp or slide.mpp or (10.0 / slide.objective if slide.objective else None)
    if mpp0 is None:
        raise JobInputError(
            f"{name} carries neither microns per pixel nor an objective magnification: give "
            "its level-0 microns per pixel (slide_mpp, e.g. --slide-mpp 0.25)"
        )
    mag0 = slide.objective if slide.objective and not slide_mpp else 10.0 / mpp0
    if magnification is not None:
        ds, asked = mag0 / magnification, f"{magnification:g}x"
    else:
        target = mpp if mpp is not None else DEFAULT_MPP
        ds, asked = target / mpp0, f"{target:g} um/px"
    if ds < 1 - TOLERANCE:
        raise JobInputError(
            f"{name} gives at most {mag0:.3g}x ({mpp0:.3g} um/px) at level 0; {asked} would "
            f"need finer pixels than it has: ask for {mag0:.3g}x / {mpp0:.3g} um/px or coarser"
        )
    reach = max(ds, 1.0) * (1 + TOLERANCE)
    finer = [i for i, lv in enumerate(slide.levels) if lv.downsample <= reach]
    level = max(finer, key=lambda i: slide.levels[i].downsample)
    lds = slide.levels[level].downsample
    if abs(lds - ds) <= TOLERANCE * ds:
        ds = lds  # read as it is: the patch's footprint is the level's own
    return Sampling(level, lds, ds, mpp0, mag0 / ds)


@dataclass(frozen=True)
class Grid:
    """Square patches of ``stride`` level-0 pixels over the slide, row-major; the last
    row and column reach past the slide's edge (read as background)."""

    width: int
    height: int
    stride: float

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.height / self.stride))

    @property
    def cols(self) -> int:
        return max(1, math.ceil(self.width / self.stride))

    def edges(self, n: int) -> np.ndarray:
        """Level-0 pixel edges of ``n`` cells (n + 1 values)."""
        return np.rint(np.arange(n + 1) * self.stride).astype(np.int64)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a patch in level-0 pixels, clipped to the slide."""
        x0, y0 = round(col * self.stride), round(row * self.stride)
        x1, y1 = round((col + 1) * self.stride), round((row + 1) * self.stride)
        return x0, y0, min(x1, self.width), min(y1, self.height)

    def cells(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell (row, column) of level-0 coordinates."""
        r = np.minimum((rows / self.stride).astype(np.int64), self.rows - 1)
        c = np.minimum((cols / self.stride).astype(np.int64), self.cols - 1)
        return r, c


def overview_downsample(slide: Slide, stride: float) -> int:
    """Level-0 pixels per overview pixel: the slide at about :data:`OVERVIEW_SIDE` on its
    long side, but at least 4 x 4 overview pixels per patch."""
    d = math.ceil(max(slide.width, slide.height) / OVERVIEW_SIDE)
    return max(1, min(d, math.floor(stride / 4)))


def read_overview(
    slide: Slide,
    downsample: int,
    pool: Executor,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The slide as RGB at ``downsample`` level-0 pixels per pixel, read in blocks of at
    most :data:`READ_SIDE` pixels from the coarsest level fine enough, on ``pool``."""
    d = downsample
    ow, oh = -(-slide.width // d), -(-slide.height // d)
    level = max(
        (i for i, lv in enumerate(slide.levels) if lv.downsample <= d),
        key=lambda i: slide.levels[i].downsample,
    )
    lds = slide.levels[level].downsample
    block = max(16, math.floor(READ_SIDE * lds / d))
    out = np.empty((oh, ow, 3), np.uint8)
    spans = [(y, x) for y in range(0, oh, block) for x in range(0, ow, block)]

    def read(yx: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        y, x = yx
        bh, bw = min(block, oh - y), min(block, ow - x)
        lw, lh = math.ceil(bw * d / lds), math.ceil(bh * d / lds)
        rgb = slide.region(x * d, y * d, level, lw, lh)
        if (lh, lw) != (bh, bw):
            rgb = cv2.resize(rgb, (bw, bh), interpolation=cv2.INTER_AREA)
        return y, x, rgb

    for done, (y, x, rgb) in enumerate(pool.map(read, spans), 1):
        out[y : y + rgb.shape[0], x : x + rgb.shape[1]] = rgb
        if progress is not None:
            progress(done, len(spans))
    return out


def tissue_mask(
    rgb: np.ndarray, method: TissueMethod, threshold: float | None, radius: int
) -> np.ndarray:
    """uint8 mask (1 tissue) of an overview.

    ``saturation`` (H&E): HSV saturation above Otsu's threshold, never below ``threshold``
    (default 20 of 255, so that empty glass stays empty); ``darkness``: the same on
    255 - luminance (weakly stained slides); ``fluorescence``: the brightest channel above
    the fixed ``threshold`` (default 20). Then a closing and an opening with a disc of
    ``radius`` pixels (0: none).
    """
    if method == "fluorescence":
        mask = (rgb.max(axis=2) > (20 if threshold is None else threshold)).astype(np.uint8)
    else:
        if method == "saturation":
            value = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
        else:
            value = 255 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        otsu, _ = cv2.threshold(value, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        floor = 20 if threshold is None else threshold
        mask = (value > max(otsu, floor)).astype(np.uint8)
    if radius > 0:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, disc)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, disc)
    return mask


def coverage(mask: np.ndarray, downsample: int, grid: Grid) -> np.ndarray:
    """Tissue fraction (0..1) of each patch: (rows, cols) float32. The part of an edge
    patch beyond the slide counts as glass."""
    integral = cv2.integral(mask)  # (h + 1, w + 1)
    h, w = mask.shape
    ye = np.rint(grid.edges(grid.rows) / downsample).astype(np.int64)
    xe = np.rint(grid.edges(grid.cols) / downsample).astype(np.int64)
    y0, y1, x0, x1 = ye[:-1], ye[1:], xe[:-1], xe[1:]
    area = np.maximum(y1 - y0, 1)[:, None] * np.maximum(x1 - x0, 1)[None, :]
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    s = (
        integral[cy1][:, cx1]
        - integral[cy0][:, cx1]
        - integral[cy1][:, cx0]
        + integral[cy0][:, cx0]
    )
    result: np.ndarray = (s / area).astype(np.float32)
    return result


class PatchReader:
    """Patches of ``size`` network pixels read on ``pool``, in the order asked, with at
    most ``prefetch`` read or being read ahead of the consumer."""

    def __init__(
        self, slide: Slide, sampling: Sampling, size: int, pool: Executor, prefetch: int
    ) -> None:
        self.slide = slide
        self.level = sampling.level
        self.size = size
        self.read_side = max(1, round(size * sampling.scale))
        self.pool = pool
        self.prefetch = max(1, prefetch)

    def read(self, origin: tuple[int, int]) -> tuple[np.ndarray, float]:
        """One patch at level-0 ``origin`` (x, y) and the seconds it took."""
        t0 = time.perf_counter()
        rgb = self.slide.region(origin[0], origin[1], self.level, self.read_side, self.read_side)
        if self.read_side != self.size:
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return rgb, time.perf_counter() - t0

    def patches(
        self, origins: Iterable[tuple[int, int]]
    ) -> Generator[tuple[np.ndarray, float], None, None]:
        """(patch, read seconds) for each origin, in order."""
        todo = iter(origins)
        pending: deque[Future[tuple[np.ndarray, float]]] = deque()
        try:
            for origin in todo:
                pending.append(self.pool.submit(self.read, origin))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                head = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(self.pool.submit(self.read, nxt))
                yield head.result()
        finally:
            for f in pending:
                f.cancel()
