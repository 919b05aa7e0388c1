"""What a WSI job writes: heatmap TIFF, thumbnail and tissue PNGs, GeoJSON and CSV.

Everything is made from the patch grid (one probability vector per patch) and the
overview the tissue mask was computed on, never from a whole slide level:

- ``heatmap.tiff``: a tiled pyramidal TIFF at the overview's resolution (each level half
  the one above, tiles of 256, deflate), with its resolution in pixels per centimetre so
  that OpenSlide and QuPath report microns per pixel consistent with the slide; each patch
  in its class colour mixed with white by its confidence (white: not classified). Each
  level is sampled from the grid tile row by tile row.
- ``thumbnail.png``: the overview with each patch's class colour over it, opacity the
  class's card opacity times the confidence (FAST's HeatmapRenderer).
- ``tissue.png``: the tissue mask (255 tissue).
- ``patches.geojson``: one QuPath ``tile`` per classified patch, a polygon in level-0
  pixels clipped to the slide, its class (name and colour) and probabilities as
  measurements; written feature by feature.
- ``patches.csv``: the same, one row per patch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from daemon.engines.card import ClassCard
from daemon.offline.slides import Grid

TILE = 256


@dataclass(frozen=True)
class Result:
    """Per-patch results on the grid."""

    grid: Grid
    probs: np.ndarray  # (rows, cols, classes) float32; 0 where not classified
    classified: np.ndarray  # (rows, cols) bool
    tissue: np.ndarray  # (rows, cols) float32 tissue fraction
    classes: tuple[ClassCard, ...]

    @property
    def label(self) -> np.ndarray:
        lab: np.ndarray = self.probs.argmax(axis=2)
        return lab

    @property
    def confidence(self) -> np.ndarray:
        conf: np.ndarray = np.where(self.classified, self.probs.max(axis=2), 0.0)
        return conf.astype(np.float32)

    def cell_colours(self) -> np.ndarray:
        """(rows, cols, 3) uint8: class colour mixed with white by confidence."""
        colours = np.array([c.colour for c in self.classes], np.float32)
        a = self.confidence[..., None]
        rgb = colours[self.label] * a + 255.0 * (1.0 - a)
        out: np.ndarray = np.rint(rgb).astype(np.uint8)
        return out


def write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")


def read_png(path: Path, rgb: bool) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if rgb else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot read {path}")
    out: np.ndarray = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img
    return out


def _sample(grid: Grid, n: int, pixel: float, length: int) -> np.ndarray:
    """Grid cell of each of ``n`` pixels of ``pixel`` level-0 pixels (centres) along an
    axis of ``length`` cells."""
    centres = (np.arange(n) + 0.5) * pixel
    return np.minimum((centres / grid.stride).astype(np.int64), length - 1)


def heatmap_levels(grid: Grid, downsample: int) -> list[tuple[int, int, int]]:
    """(width, height, level-0 pixels per pixel) of each heatmap level."""
    w, h, d = -(-grid.width // downsample), -(-grid.height // downsample), downsample
    levels = [(w, h, d)]
    while max(w, h) > TILE:
        w, h, d = -(-w // 2), -(-h // 2), d * 2
        levels.append((w, h, d))
    return levels


def write_heatmap(
    path: Path, result: Result, downsample: int, mpp: float | None, description: str
) -> None:
    """The heatmap TIFF (see the module doc); ``mpp`` the slide's level-0 microns per
    pixel (None: no resolution tags)."""
    import tifffile

    colours = result.cell_colours()
    grid = result.grid

    def tiles(w: int, h: int, d: int) -> Iterator[np.ndarray]:
        rows, cols = _sample(grid, h, d, grid.rows), _sample(grid, w, d, grid.cols)
        for y in range(0, h, TILE):
            strip = colours[rows[y : y + TILE]][:, cols]
            for x in range(0, w, TILE):
                t = strip[:, x : x + TILE]
                if t.shape[:2] != (TILE, TILE):
                    t = np.pad(
                        t,
                        ((0, TILE - t.shape[0]), (0, TILE - t.shape[1]), (0, 0)),
                        constant_values=255,
                    )
                yield np.ascontiguousarray(t)

    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i, (w, h, d) in enumerate(heatmap_levels(grid, downsample)):
            ppcm = None if mpp is None else 1e4 / (mpp * d)
            tif.write(
                tiles(w, h, d),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if i else 0,
                description=description if i == 0 else None,
                metadata=None,
                resolution=None if ppcm is None else (ppcm, ppcm),
                resolutionunit=None if ppcm is None else "CENTIMETER",
            )


def thumbnail(overview: np.ndarray, downsample: int, result: Result, side: int) -> np.ndarray:
    """The overview with the patches' colours over it, at most ``side`` pixels long."""
    grid = result.grid
    h, w = overview.shape[:2]
    rows = _sample(grid, h, downsample, grid.rows)
    cols = _sample(grid, w, downsample, grid.cols)
    colours = np.array([c.colour for c in result.classes], np.float32)
    opacity = np.array([c.opacity for c in result.classes], np.float32)
    lab = result.label
    alpha = np.where(result.classified, opacity[lab] * result.confidence, 0.0)
    a = alpha[rows][:, cols][..., None].astype(np.float32)
    over = colours[lab][rows][:, cols]
    img = np.rint(overview * (1.0 - a) + over * a).astype(np.uint8)
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


def _rows(result: Result) -> Iterator[tuple[int, int, tuple[int, int, int, int], int, float]]:
    """(row, col, box, class, confidence) of each classified patch, row-major."""
    lab, conf = result.label, result.confidence
    for r, c in zip(*np.nonzero(result.classified), strict=True):
        yield int(r), int(c), result.grid.box(int(r), int(c)), int(lab[r, c]), float(conf[r, c])


def write_geojson(path: Path, result: Result) -> None:
    names = [c.name for c in result.classes]
    with path.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        first = True
        for r, c, (x0, y0, x1, y1), k, conf in _rows(result):
            cls = result.classes[k]
            measurements = {
                "confidence": round(conf, 5),
                "tissue": round(float(result.tissue[r, c]), 4),
            }
            measurements |= {
                f"p_{n}": round(float(p), 5) for n, p in zip(names, result.probs[r, c], strict=True)
            }
            feature = {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": f"patch {r},{c}",
                    "classification": {"name": cls.name, "color": list(cls.colour)},
                    "measurements": measurements,
                },
            }
            f.write(("" if first else ",\n") + json.dumps(feature, separators=(",", ":")))
            first = False
        f.write("\n]}\n")


def write_csv(path: Path, result: Result) -> None:
    names = [c.name for c in result.classes]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            ["row", "col", "x", "y", "width", "height", "tissue", "class", "confidence"]
            + [f"p_{n}" for n in names]
        )
        for r, c, (x0, y0, x1, y1), k, conf in _rows(result):
            out.writerow(
                [
                    r,
                    c,
                    x0,
                    y0,
                    x1 - x0,
                    y1 - y0,
                    f"{result.tissue[r, c]:.4f}",
                    names[k],
                    f"{conf:.5f}",
                ]
                + [f"{p:.5f}" for p in result.probs[r, c]]
            )


def class_areas(result: Result, mpp: float | None) -> dict[str, dict[str, float | int | None]]:
    """Per class: patches, and tissue area in mm² (each patch's tissue fraction times its
    area within the slide; None when the slide's microns per pixel are unknown)."""
    lab = result.label
    out: dict[str, dict[str, float | int | None]] = {}
    for k, cls in enumerate(result.classes):
        sel = result.classified & (lab == k)
        area: float | None = None
        if mpp is not None:
            px = sum(
                (b[2] - b[0]) * (b[3] - b[1]) * float(result.tissue[r, c])
                for r, c in zip(*np.nonzero(sel), strict=True)
                for b in (result.grid.box(int(r), int(c)),)
            )
            area = round(px * (mpp * 1e-3) ** 2, 4)
        out[cls.name] = {"patches": int(sel.sum()), "area_mm2": area}
    return out
