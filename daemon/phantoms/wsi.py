"""H&E-like breast tissue of four classes, and a pyramidal tiled-TIFF slide writer.

Classes (the FAST paper's WSI task; map values 1..4, classifier indices 0..3):

- normal: pale loose stroma with small round acini (a white lumen in a ring of
  cuboidal cells) and sparse spindle-shaped stromal nuclei;
- benign: dense, strongly pink collagen with slit-like ducts lined by nuclei;
- in-situ: large round ducts filled with tightly packed uniform nuclei, some
  with central necrosis, separated by stroma;
- invasive: stroma infiltrated everywhere by large, dark, pleomorphic nuclei.

Colour follows Beer-Lambert: each pixel has a hematoxylin and an eosin optical
density, mixed with stain vectors (Ruifrok & Johnston) and varied per slide or
patch, so classes differ by texture and colour and the stain varies as between
labs. Every texture is a pure function of level-0 pixel coordinates and the
seed (hashed lattice noise, objects drawn per grid cell from a generator seeded
by the cell), so any region renders the same whichever tile asks for it.

:func:`tissue_patch` renders one patch of one class (training and tests);
:func:`write_slide` streams a slide of any size (tissue sections of several
classes on white glass) into a pyramidal JPEG-tiled BigTIFF that OpenSlide
opens, holding one row of tiles at a time, and returns the ground-truth class
map. Rendering needs only numpy; writing imports tifffile (with imagecodecs).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

log = logging.getLogger(__name__)

CLASSES = ("normal", "benign", "in-situ", "invasive")
GLASS = 0  # class-map value of background; class i of CLASSES is i + 1
MPP = 0.5  # 20x
_H = np.array([0.65, 0.70, 0.29], np.float32)  # hematoxylin optical density per unit
_E = np.array([0.07, 0.99, 0.11], np.float32)  # eosin
_H /= np.linalg.norm(_H)
_E /= np.linalg.norm(_E)
_GLASS_OD = np.array([0.03, 0.035, 0.025], np.float32)
_U64 = np.uint64


def _hash01(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) per integer lattice point (splitmix64 of the coordinates)."""
    h = (iy.astype(np.int64).astype(_U64) * _U64(0x9E3779B97F4A7C15)) ^ (
        ix.astype(np.int64).astype(_U64) * _U64(0xC2B2AE3D27D4EB4F)
    )
    h ^= _U64((salt * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
    h ^= h >> _U64(30)
    h *= _U64(0xBF58476D1CE4E5B9)
    h ^= h >> _U64(27)
    h *= _U64(0x94D049BB133111EB)
    h ^= h >> _U64(31)
    result: np.ndarray = (h >> _U64(40)).astype(np.float32) / np.float32(1 << 24)
    return result


def _noise(ys: np.ndarray, xs: np.ndarray, cell: tuple[float, float], salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] at rows ``ys`` x columns ``xs`` (level-0 pixels)."""
    gy, gx = ys / cell[0], xs / cell[1]
    iy0, ix0 = math.floor(float(gy.min())), math.floor(float(gx.min()))
    ny, nx = math.floor(float(gy.max())) - iy0 + 2, math.floor(float(gx.max())) - ix0 + 2
    lattice = _hash01(np.arange(iy0, iy0 + ny)[:, None], np.arange(ix0, ix0 + nx)[None, :], salt)
    ry, rx = np.floor(gy).astype(np.intp) - iy0, np.floor(gx).astype(np.intp) - ix0
    fy, fx = (gy - np.floor(gy)).astype(np.float32), (gx - np.floor(gx)).astype(np.float32)
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep
    rows = lattice[ry] * (1 - fy)[:, None] + lattice[ry + 1] * fy[:, None]
    result: np.ndarray = rows[:, rx] * (1 - fx) + rows[:, rx + 1] * fx
    return result


def _salt(seed: int, field: int) -> int:
    """Base of the noise salts of a seed's ``field`` (0 the slide layout, 1..4 the classes);
    each field has 8 salts of its own."""
    return (seed * 5 + field) * 8


@dataclass(frozen=True, slots=True)
class _Objects:
    """Ellipses: centres, semi-axes, angle (level-0 pixels, radians) and a value each
    (float64: centres are level-0 coordinates of a slide up to 2**28 pixels)."""

    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    value: np.ndarray

    @staticmethod
    def cat(parts: list[_Objects]) -> _Objects:
        if not parts:
            e = np.zeros(0)
            return _Objects(e, e, e, e, e, e)
        return _Objects(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("cy", "cx", "a", "b", "angle", "value")
            )
        )


def _splat(
    shape: tuple[int, ...], y0: int, x0: int, obj: _Objects
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """(Row, column) indices, coverage (anti-aliased) and object of every ellipse pixel."""
    if obj.cy.size == 0:
        none = np.zeros(0, np.intp)
        return (none, none), np.zeros(0, np.float32), none
    r = math.ceil(float(np.maximum(obj.a, obj.b).max())) + 1
    d = np.arange(-r, r + 1, dtype=np.float32)
    cy, cx = (obj.cy - y0).astype(np.float32), (obj.cx - x0).astype(np.float32)
    iy, ix = np.broadcast_arrays(
        np.rint(cy)[:, None, None] + d[None, :, None], np.rint(cx)[:, None, None] + d[None, None, :]
    )
    dy, dx = iy - cy[:, None, None], ix - cx[:, None, None]
    c = np.cos(obj.angle).astype(np.float32)[:, None, None]
    s = np.sin(obj.angle).astype(np.float32)[:, None, None]
    u, v = dx * c + dy * s, dy * c - dx * s
    a = obj.a.astype(np.float32)[:, None, None]
    b = obj.b.astype(np.float32)[:, None, None]
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    alpha = np.clip((1.0 - rho) * b + 0.5, 0.0, 1.0)
    keep = (alpha > 0) & (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
    which = np.broadcast_to(np.arange(obj.cy.size)[:, None, None], keep.shape)[keep]
    return (iy[keep].astype(np.intp), ix[keep].astype(np.intp)), alpha[keep], which


def _paint(
    target: np.ndarray, y0: int, x0: int, obj: _Objects, mode: str, value: np.ndarray | None = None
) -> None:
    """Draw ``obj`` into ``target``: ``max`` of coverage x value, or ``blend`` towards value."""
    at, alpha, which = _splat(target.shape, y0, x0, obj)
    v = (obj.value if value is None else value)[which]
    if mode == "max":
        target[at] = np.maximum(target[at], alpha * v)
    else:
        target[at] = target[at] * (1 - alpha) + alpha * v


def _cells(y0: int, x0: int, h: int, w: int, size: int, margin: int) -> Iterator[tuple[int, int]]:
    """Grid cells of ``size`` whose objects (reaching ``margin`` out) may touch the region."""
    for cy in range((y0 - margin) // size, (y0 + h + margin) // size + 1):
        for cx in range((x0 - margin) // size, (x0 + w + margin) // size + 1):
            yield cy, cx


def _ring_nuclei(
    rng: np.random.Generator, cy: float, cx: float, a: float, b: float, ang: float, r: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of nuclei spaced about ``2.4 r`` along an ellipse's outline."""
    n = max(6, round(math.pi * (a + b) / (2.4 * r)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    u, v = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(ang), math.sin(ang)
    return cy + u * s + v * c + rng.normal(0, 0.6, n), cx + u * c - v * s + rng.normal(0, 0.6, n)


def _nuclei(
    rng: np.random.Generator,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: tuple[float, float],
    aspect: tuple[float, float],
    dark: tuple[float, float],
) -> _Objects:
    n = cy.size
    r = rng.uniform(*radius, n)
    asp = rng.uniform(*aspect, n)
    return _Objects(
        cy, cx, r * np.sqrt(asp), r / np.sqrt(asp), rng.uniform(0, np.pi, n), rng.uniform(*dark, n)
    )


def _spindles(rng: np.random.Generator, oy: float, ox: float, size: int, lam: float) -> _Objects:
    n = int(rng.poisson(lam))
    return _nuclei(
        rng,
        oy + rng.uniform(0, size, n),
        ox + rng.uniform(0, size, n),
        (2.2, 2.8),
        (3, 6),
        (0.7, 1.0),
    )


def _render_class(
    cls: int, y0: int, x0: int, h: int, w: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin densities (h, w) of class ``cls`` (0..3) over a level-0 region."""
    ys = np.arange(y0, y0 + h, dtype=np.float64)
    xs = np.arange(x0, x0 + w, dtype=np.float64)
    salt = _salt(seed, 1 + cls)
    mix = _noise(ys, xs, (300, 300), salt + 1)
    fibre = _noise(ys, xs, (5, 40), salt + 2) * mix + _noise(ys, xs, (40, 5), salt + 3) * (1 - mix)
    grain = _noise(ys, xs, (2.5, 2.5), salt + 4)
    stroma_e, fibre_e = ((0.22, 0.12), (0.50, 0.35), (0.34, 0.2), (0.40, 0.15))[cls]
    eo = (stroma_e + fibre_e * fibre + 0.05 * grain).astype(np.float32)
    he = (0.04 + 0.03 * grain).astype(np.float32)
    nuclei: list[_Objects] = []
    if cls in (0, 1):  # acini (normal) or slit-like ducts (benign), in 256-px cells
        lumens, epith = [], []
        for gy, gx in _cells(y0, x0, h, w, 256, 80):
            rng = np.random.default_rng([seed, cls, 1, gy + 2**20, gx + 2**20])
            for _ in range(int(rng.poisson(3.0 if cls == 0 else 1.2))):
                ly, lx, ang = gy * 256 + rng.uniform(0, 256), gx * 256 + rng.uniform(0, 256), 0.0
                if cls == 0:
                    la, lb = rng.uniform(5, 10, 2)
                    ang = rng.uniform(0, np.pi)
                else:
                    la, lb, ang = rng.uniform(25, 55), rng.uniform(2.5, 7), rng.uniform(0, np.pi)
                wall = rng.uniform(6, 9)
                epith.append((ly, lx, la + wall, lb + wall, ang))
                lumens.append((ly, lx, la, lb, ang))
                ny, nx = _ring_nuclei(rng, ly, lx, la + wall / 2, lb + wall / 2, ang, 3.2)
                nuclei.append(_nuclei(rng, ny, nx, (2.8, 3.6), (1, 1.4), (0.8, 1.0)))
            nuclei.append(_spindles(rng, gy * 256, gx * 256, 256, 10 if cls == 0 else 16))
        for objs, hv, ev in ((epith, 0.18, 0.30), (lumens, 0.0, 0.02)):
            if objs:
                arr = np.array(objs, np.float32).T
                o = _Objects(arr[0], arr[1], arr[2], arr[3], arr[4], np.full(arr.shape[1], hv))
                _paint(he, y0, x0, o, "blend")
                _paint(eo, y0, x0, o, "blend", np.full(arr.shape[1], ev, np.float32))
    elif cls == 2:  # in-situ: large ducts full of packed nuclei, in 384-px cells
        for gy, gx in _cells(y0, x0, h, w, 384, 100):
            rng = np.random.default_rng([seed, cls, 1, gy + 2**20, gx + 2**20])
            nuclei.append(_spindles(rng, gy * 384, gx * 384, 384, 12))
            for _ in range(int(rng.poisson(2.2))):
                dy, dx = gy * 384 + rng.uniform(0, 384), gx * 384 + rng.uniform(0, 384)
                rad = rng.uniform(35, 85)
                duct = _Objects(*(np.array([v], np.float32) for v in (dy, dx, rad, rad, 0, 0.25)))
                _paint(he, y0, x0, duct, "blend")
                _paint(eo, y0, x0, duct, "blend", np.array([0.28], np.float32))
                step = rng.uniform(8.0, 9.5)
                g = np.arange(-rad, rad + step, step)
                py, px = np.meshgrid(g, g, indexing="ij")
                py = py.ravel() + rng.normal(0, 1.2, py.size)
                px = px.ravel() + rng.normal(0, 1.2, px.size)
                inner = 0.35 * rad if rng.random() < 0.4 else 0.0  # central necrosis
                keep = (np.hypot(py, px) < rad - 3.5) & (np.hypot(py, px) > inner)
                nuclei.append(
                    _nuclei(rng, dy + py[keep], dx + px[keep], (3.3, 4.2), (1, 1.3), (1.0, 1.25))
                )
                if inner:
                    core = _Objects(
                        *(np.array([v], np.float32) for v in (dy, dx, inner, inner, 0, 0.1))
                    )
                    _paint(he, y0, x0, core, "blend")
                    _paint(eo, y0, x0, core, "blend", np.array([0.45], np.float32))
    else:  # invasive: pleomorphic dark nuclei everywhere, in 128-px cells
        for gy, gx in _cells(y0, x0, h, w, 128, 12):
            rng = np.random.default_rng([seed, cls, 1, gy + 2**20, gx + 2**20])
            n = int(rng.poisson(38))
            ny, nx = gy * 128 + rng.uniform(0, 128, n), gx * 128 + rng.uniform(0, 128, n)
            nuclei.append(_nuclei(rng, ny, nx, (3.8, 6.5), (1, 2.2), (1.25, 1.7)))
            halo = _nuclei(rng, ny, nx, (6.5, 8.5), (1, 1.5), (0.2, 0.3))
            _paint(he, y0, x0, halo, "max")
    if nuclei:
        allnuc = _Objects.cat(nuclei)
        chroma = (0.8 + 0.4 * grain).astype(np.float32)
        hn = np.zeros_like(he)
        _paint(hn, y0, x0, allnuc, "max")
        cover = np.minimum(hn / np.maximum(allnuc.value.max(), 1e-3), 1.0)
        he = np.maximum(he, hn * chroma)
        eo *= 1.0 - 0.7 * cover
    return he, eo


@dataclass(frozen=True, slots=True)
class Stain:
    """Per-slide (or per-patch) staining: density gains and a brightness factor."""

    h_gain: float = 1.0
    e_gain: float = 1.0
    brightness: float = 1.0

    @staticmethod
    def draw(rng: np.random.Generator) -> Stain:
        return Stain(rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25), rng.uniform(0.93, 1.05))


def _to_rgb(
    he: np.ndarray, eo: np.ndarray, tissue: np.ndarray | None, stain: Stain, noise: np.ndarray
) -> np.ndarray:
    """Beer-Lambert mix of the two densities (and glass where ``tissue`` < 1) to RGB uint8."""
    h = he * np.float32(stain.h_gain)
    e = eo * np.float32(stain.e_gain)
    if tissue is not None:
        h, e = h * tissue, e * tissue
    od = h[..., None] * _H + e[..., None] * _E + _GLASS_OD
    rgb = np.exp(-od) * np.float32(255.0 * stain.brightness) + noise[..., None]
    out: np.ndarray = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def tissue_patch(cls: int, seed: int, size: int = 512) -> np.ndarray:
    """An RGB uint8 patch (size x size, level 0 at 0.5 um/px) of class ``cls`` (0..3).

    ``seed`` picks the place in an endless tissue of that class and the stain.
    """
    if not 0 <= cls < len(CLASSES):
        raise ValueError(f"class {cls} is not one of 0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")
    rng = np.random.default_rng([seed, 77])
    y0, x0 = (int(v) for v in rng.integers(0, 2**28, 2))
    he, eo = _render_class(cls, y0, x0, size, size, seed)
    noise = rng.normal(0.0, 2.0, (size, size)).astype(np.float32)
    return _to_rgb(he, eo, None, Stain.draw(rng), noise)


class Slide:
    """The layout of one synthetic slide: tissue sections and class regions on glass."""

    def __init__(self, width: int, height: int, seed: int = 0) -> None:
        if width < 256 or height < 256:
            raise ValueError(f"slide {width} x {height}: needs at least 256 x 256 pixels")
        self.width, self.height, self.seed = width, height, seed
        rng = np.random.default_rng([seed, 11])
        self.stain = Stain.draw(rng)
        self._feature = max(width, height) / 5.0  # size of the tissue sections' lobes
        n = max(4, round(width * height / 3000.0**2))
        self._sites = np.stack([rng.uniform(0, height, n), rng.uniform(0, width, n)], 1)
        self._site_class = (rng.permutation(n) % len(CLASSES)).astype(np.uint8)

    def tissue(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Tissue fraction (0 glass .. 1) on rows ``ys`` x columns ``xs``."""
        f = self._feature
        salt = _salt(self.seed, 0)
        field = _noise(ys, xs, (f, f), salt + 1) + 0.3 * _noise(ys, xs, (f / 4, f / 4), salt + 2)
        ey = np.minimum(ys, self.height - ys)[:, None] / (0.12 * self.height)
        ex = np.minimum(xs, self.width - xs)[None, :] / (0.12 * self.width)
        field = field * np.clip(np.minimum(ey, ex), 0, 1)
        result: np.ndarray = np.clip((field - 0.55) * 120.0, 0.0, 1.0).astype(np.float32)
        return result

    def classes(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Class index (0..3) of the nearest class site, through a warp for ragged borders."""
        f = self._feature / 3
        salt = _salt(self.seed, 0)
        wy = ys[:, None] + 600.0 * (_noise(ys, xs, (f, f), salt + 3) - 0.5)
        wx = xs[None, :] + 600.0 * (_noise(ys, xs, (f, f), salt + 4) - 0.5)
        cy, cx = float(ys.mean()), float(xs.mean())
        reach = math.hypot(float(np.ptp(ys)), float(np.ptp(xs))) + 850.0
        dist = np.hypot(self._sites[:, 0] - cy, self._sites[:, 1] - cx)
        near = np.flatnonzero(dist <= dist.min() + 2 * reach)
        best = np.full(wy.shape, np.inf, np.float32)
        out = np.zeros(wy.shape, np.uint8)
        for i in near:
            d2 = (wy - self._sites[i, 0]) ** 2 + (wx - self._sites[i, 1]) ** 2
            closer = d2 < best
            best[closer] = d2[closer]
            out[closer] = self._site_class[i]
        return out

    def class_map(self, downsample: int) -> np.ndarray:
        """Ground truth, one value per ``downsample`` x ``downsample`` block, the last ones
        partial (at the block's centre, or its last pixel): 0 glass, 1..4 the classes of
        :data:`CLASSES`; computed in bands of rows."""
        ys, xs = (
            np.minimum(np.arange(-(-n // downsample)) * downsample + downsample / 2, n - 1.0)
            for n in (self.height, self.width)
        )
        out = np.zeros((ys.size, xs.size), np.uint8)
        for i in range(0, ys.size, 64):
            band = ys[i : i + 64]
            cls = self.classes(band, xs) + 1
            out[i : i + 64] = np.where(self.tissue(band, xs) >= 0.5, cls, GLASS)
        return out

    def render(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 of the level-0 region; glass where there is no tissue."""
        ys = np.arange(y0, y0 + h, dtype=np.float64)
        xs = np.arange(x0, x0 + w, dtype=np.float64)
        tissue = self.tissue(ys, xs)
        rng = np.random.default_rng([self.seed, 13, y0, x0])
        noise = rng.normal(0.0, 1.5, (h, w)).astype(np.float32)
        he = np.zeros((h, w), np.float32)
        eo = np.zeros((h, w), np.float32)
        if tissue.any():  # class borders are ragged anyway: decide them on a 4-px grid
            cls = np.repeat(np.repeat(self.classes(ys[::4], xs[::4]), 4, 0), 4, 1)[:h, :w]
            for c in np.unique(cls[tissue > 0]):
                hc, ec = _render_class(int(c), y0, x0, h, w, self.seed)
                if c == cls.min() == cls.max():
                    he, eo = hc, ec
                else:
                    sel = cls == c
                    he[sel], eo[sel] = hc[sel], ec[sel]
        return _to_rgb(he, eo, tissue, self.stain, noise)


@dataclass(frozen=True)
class SlideTruth:
    """What :func:`write_slide` wrote: level sizes and the ground-truth class map."""

    path: Path
    levels: tuple[tuple[int, int], ...]  # (width, height) per level
    mpp: float
    class_map: np.ndarray  # uint8, 0 glass, 1..4 = CLASSES[v - 1]
    map_downsample: int  # level-0 pixels per class-map cell


def _box_down(strip: np.ndarray, f: int) -> np.ndarray:
    """Mean of ``f`` x ``f`` blocks (the last partial block by edge replication)."""
    h, w = strip.shape[:2]
    ph, pw = -h % f, -w % f
    if ph or pw:
        strip = np.pad(strip, ((0, ph), (0, pw), (0, 0)), mode="edge")
    blocks = strip.reshape(strip.shape[0] // f, f, strip.shape[1] // f, f, 3)
    out: np.ndarray = (blocks.mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)
    return out


def _tiles(
    strips: Iterator[np.ndarray], width: int, tile: int, down: int, sink: BinaryIO | None
) -> Iterator[np.ndarray]:
    """Tiles of each strip (``tile`` rows), row-major, padded white; the strips go on to
    ``sink`` reduced by ``down`` for the next level."""
    for strip in strips:
        if sink is not None:
            sink.write(_box_down(strip, down).tobytes())
        for x in range(0, width, tile):
            t = strip[:, x : x + tile]
            if t.shape[:2] != (tile, tile):
                t = np.pad(
                    t,
                    ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)),
                    constant_values=255,
                )
            yield t


def _read_strips(src: BinaryIO, width: int, height: int, rows: int) -> Iterator[np.ndarray]:
    src.seek(0)
    for y in range(0, height, rows):
        n = min(rows, height - y)
        yield np.frombuffer(src.read(n * width * 3), np.uint8).reshape(n, width, 3)


def write_slide(
    path: Path,
    width: int,
    height: int,
    seed: int = 0,
    *,
    tile: int = 512,
    downsample: int = 4,
    smallest: int = 1024,
    quality: int = 90,
    mpp: float = MPP,
    map_downsample: int = 64,
) -> SlideTruth:
    """Write a synthetic H&E slide as a pyramidal, JPEG-tiled BigTIFF; return its truth.

    Levels shrink by ``downsample`` until the next one would be narrower than
    ``smallest`` on both sides (at least two levels). Each level is a tiled RGB
    page (level 0 full resolution, the others reduced-resolution pages) with
    its resolution in pixels per centimetre, which OpenSlide reports as
    microns per pixel. Level 0 is rendered one row of tiles at a time; each
    level is box-filtered from the one above through a temporary file, so
    memory stays at a few rows of tiles whatever the slide's size.
    """
    import tifffile

    if tile % 16 or downsample < 2:
        raise ValueError("tile must be a multiple of 16 and downsample at least 2")
    slide = Slide(width, height, seed)
    sizes = [(width, height)]
    while len(sizes) < 2 or max(sizes[-1]) >= smallest * downsample:
        w, h = sizes[-1]
        sizes.append((-(-w // downsample), -(-h // downsample)))
    path = Path(path)
    log.info("writing %d x %d slide (seed %d, levels %s) to %s", width, height, seed, sizes, path)

    def level0() -> Iterator[np.ndarray]:
        for y in range(0, height, tile):
            n = min(tile, height - y)
            yield np.concatenate(
                [slide.render(y, x, n, min(tile, width - x)) for x in range(0, width, tile)], axis=1
            )

    description = f"echod synthetic H&E slide: seed {seed}; {mpp} um/px; classes " + ", ".join(
        f"{i + 1} {c}" for i, c in enumerate(CLASSES)
    )
    with ExitStack() as stack:
        tif = stack.enter_context(tifffile.TiffWriter(path, bigtiff=True))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        strips: Iterator[np.ndarray] = level0()
        for level, (w, h) in enumerate(sizes):
            last = level == len(sizes) - 1
            sink = None if last else stack.enter_context(open(tmp / f"{level + 1}.raw", "w+b"))
            res = 1e4 / (mpp * downsample**level)  # pixels per cm
            tif.write(
                _tiles(strips, w, tile, downsample, sink),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
            )
            if sink is not None:
                nw, nh = sizes[level + 1]
                strips = _read_strips(sink, nw, nh, tile)
    return SlideTruth(
        path=path,
        levels=tuple(sizes),
        mpp=mpp,
        class_map=slide.class_map(map_downsample),
        map_downsample=map_downsample,
    )
