"""What the ultrasound simulator images: acoustic properties of a scene, in millimetres.

A :class:`Scene` is a medium (layered soft tissue, or water) and a list of objects
painted over it in order: vessels (a pulsating artery, a compressible vein: the only
labelled things), and what a vessel detector must *not* call a vessel: cysts and
fluid collections (anechoic, with posterior enhancement), bone (a bright surface with
an acoustic shadow), needles (a bright line with a comet tail), air (no coupling:
shadow and reverberation lines), a tank bottom or wire targets in water.

Objects paint, at any set of points ``(x, z)`` (lateral, depth in mm; z = 0 at the
skin, x = 0 under the probe's centre), five fields on a :class:`Canvas`:

- ``echo``: diffuse backscatter intensity, linear, relative to reference soft tissue
  (1.0 = 0 dB; blood about -40 dB; water and cyst fluid nearly nothing);
- ``spec``: specular reflectors (fasciae, vessel walls, bone, needles, interfaces):
  amplitude of a coherent echo, scaled by how squarely the beam meets the surface;
- ``alpha``: attenuation in dB/(cm MHz) (tissue about 0.5-0.8, blood 0.2, water 0,
  bone 20, air: total);
- ``reverb``: amplitude of a reflector that rings between itself and the probe face;
- ``blood``: where the scatterers move between frames (their speckle decorrelates).

and vessels also write ``labels`` (0 background, 1 artery, 2 vein: FAST's convention).
Time ``t`` (seconds) moves the vessels: the artery's radius follows a cardiac waveform
and the vein's height a slow compression with a faint venous pulse.

:func:`draw_scene` draws a random scene of a named kind; everything random comes from
the generator it is given. Needs numpy and OpenCV only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import cv2
import numpy as np

ARTERY, VEIN = 1, 2

SceneKind = Literal["neck", "abdomen", "water", "fluid", "air"]
SCENE_KINDS: tuple[SceneKind, ...] = ("neck", "abdomen", "water", "fluid", "air")

_TEXEL_MM = 0.25  # resolution of the tissue textures


def db(value: float) -> float:
    """Linear intensity of ``value`` dB."""
    return 10.0 ** (value / 10.0)


class Canvas:
    """Acoustic fields at sample points, filled by a scene's objects in order."""

    def __init__(
        self,
        x: np.ndarray,
        z: np.ndarray,
        bx: np.ndarray | None = None,
        bz: np.ndarray | None = None,
    ) -> None:
        """``x``, ``z``: point positions (mm); ``bx``, ``bz``: unit beam direction there
        (straight down where not given)."""
        self.x, self.z = x.astype(np.float32), z.astype(np.float32)
        self.bx = np.zeros_like(self.x) if bx is None else bx.astype(np.float32)
        self.bz = np.ones_like(self.x) if bz is None else bz.astype(np.float32)
        shape = self.x.shape
        self.echo = np.zeros(shape, np.float32)
        self.spec = np.zeros(shape, np.float32)
        self.alpha = np.zeros(shape, np.float32)
        self.reverb = np.zeros(shape, np.float32)
        self.blood = np.zeros(shape, bool)
        self.labels = np.zeros(shape, np.uint8)

    def crop(self, rows: slice, cols: slice) -> Canvas:
        """A copy of the fields on a window of the points."""
        out = Canvas.__new__(Canvas)
        for name in ("x", "z", "bx", "bz", "echo", "spec", "alpha", "reverb", "blood", "labels"):
            setattr(out, name, getattr(self, name)[rows, cols].copy())
        return out

    def incidence(self, nx: np.ndarray, nz: np.ndarray, power: float = 2.0) -> np.ndarray:
        """How squarely the beam meets a surface of normal (nx, nz): |cos|^power."""
        norm = np.sqrt(nx * nx + nz * nz) + 1e-6
        return np.abs((nx * self.bx + nz * self.bz) / norm) ** power


class SceneObject(Protocol):
    def paint(self, c: Canvas, t: float) -> None: ...


def cardiac(phase: float) -> float:
    """Arterial distension over one heart beat (0..1): a fast systolic rise, slow decay."""
    x = (phase % 1.0) / 0.18
    return x * math.exp(1.0 - x)


class Texture:
    """Smooth random heterogeneity (unit std) on a grid of ``_TEXEL_MM``, sampled anywhere
    in the scene's extent by bilinear interpolation."""

    def __init__(
        self,
        rng: np.random.Generator,
        extent: tuple[float, float, float],
        sigma_mm: tuple[float, float],
    ) -> None:
        x0, x1, depth = extent
        self.x0 = x0
        w = math.ceil((x1 - x0) / _TEXEL_MM) + 2
        h = math.ceil(depth / _TEXEL_MM) + 2
        noise = rng.standard_normal((h, w), dtype=np.float32)
        sx, sz = (max(s / _TEXEL_MM, 0.3) for s in sigma_mm)
        blurred = cv2.GaussianBlur(noise, (0, 0), sigmaX=sx, sigmaY=sz)
        self.grid: np.ndarray = (blurred / max(float(blurred.std()), 1e-6)).astype(np.float32)

    def __call__(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        mx = ((x - self.x0) / _TEXEL_MM).astype(np.float32)
        mz = (z / _TEXEL_MM).astype(np.float32)
        out: np.ndarray = cv2.remap(
            self.grid, mx, mz, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        return out


# -- the medium --------------------------------------------------------------------------


@dataclass
class Layer:
    """Tissue above ``bottom`` mm (a gently undulating boundary), with its echo level
    (dB re reference tissue), heterogeneity (dB of texture), attenuation and the
    specular strength (dB) of its lower boundary (a fascia)."""

    bottom: float
    echo_db: float
    texture_db: float
    alpha: float
    fascia_db: float
    wave: tuple[float, float, float] = (0.0, 20.0, 0.0)  # amplitude mm, period mm, phase
    striated: bool = False

    def boundary(self, x: np.ndarray) -> np.ndarray:
        amp, period, phase = self.wave
        return self.bottom + amp * np.sin(2 * np.pi * x / period + phase)

    def slope(self, x: np.ndarray) -> np.ndarray:
        amp, period, phase = self.wave
        return amp * 2 * np.pi / period * np.cos(2 * np.pi * x / period + phase)


@dataclass
class Tissue:
    """Layered soft tissue; the last layer continues to any depth."""

    layers: list[Layer]
    blobs: Texture
    grain: Texture
    striae: Texture

    def paint(self, c: Canvas, t: float) -> None:
        x, z = c.x, c.z
        idx = np.zeros(x.shape, np.int32)
        bounds = [layer.boundary(x) for layer in self.layers[:-1]]
        for b in bounds:
            idx += z > b
        echo_db = np.zeros(x.shape, np.float32)
        alpha = np.zeros(x.shape, np.float32)
        blob, grain, striae = self.blobs(x, z), self.grain(x, z), self.striae(x, z)
        for i, layer in enumerate(self.layers):
            sel = idx == i
            tex = striae if layer.striated else 0.6 * blob + 0.4 * grain
            echo_db[sel] = layer.echo_db + layer.texture_db * tex[sel]
            alpha[sel] = layer.alpha
        c.echo[:] = 10.0 ** (echo_db / 10.0)
        c.alpha[:] = alpha
        for layer, b in zip(self.layers, bounds, strict=False):
            band = np.abs(z - b) < 0.35
            if layer.fascia_db > -50 and band.any():
                inc = c.incidence(-layer.slope(x), np.ones_like(x))
                amp = math.sqrt(db(layer.fascia_db)) * inc * (1.0 + 0.3 * grain)
                c.spec[band] = np.maximum(c.spec[band], amp[band])
                c.echo[band] *= db(6.0)
        skin = z < 0.5
        c.echo[skin] = db(8.0)
        c.spec[z < 0.15] = math.sqrt(db(10.0))


@dataclass
class Water:
    """Degassed water: no scatterers, almost no attenuation."""

    def paint(self, c: Canvas, t: float) -> None:
        c.echo[:] = db(-90.0)
        c.alpha[:] = 0.002


# -- vessels -----------------------------------------------------------------------------


@dataclass
class Vessel:
    """A vessel in cross-section: an elliptic lumen (labelled) with a wall.

    ``kind`` ARTERY: round, thick bright wall, radius pulsating with the heart;
    VEIN: flattened ellipse resting on its lower side, thin wall, its height changing
    with probe pressure (``press_hz``) and a faint venous pulse.
    """

    kind: int
    cx: float
    cz: float  # artery: centre depth; vein: depth of the lowest point
    a: float  # semi-axes (lateral, axial) at rest / full filling
    b: float
    tilt: float
    wall_mm: float
    wall_db: float
    blood_db: float
    heart_hz: float
    heart_phase: float
    distension: float = 0.0
    min_fill: float = 1.0
    press_hz: float = 0.0
    press_phase: float = 0.0

    def axes(self, t: float) -> tuple[float, float, float]:
        """(a, b, centre depth) at time ``t``."""
        if self.kind == ARTERY:
            r = 1.0 + self.distension * cardiac(self.heart_hz * t + self.heart_phase)
            return self.a * r, self.b * r, self.cz
        fill = self.min_fill + (1.0 - self.min_fill) * (
            0.5 + 0.5 * math.sin(2 * math.pi * self.press_hz * t + self.press_phase)
        )
        pulse = 1.0 + 0.04 * cardiac(self.heart_hz * t + self.heart_phase + 0.6)
        b = self.b * fill * pulse
        return self.a * (1.0 + 0.25 * (1.0 - fill)), b, self.cz - b

    def reach(self) -> float:
        """Largest extent from the centre at any time (mm), wall included."""
        grow = 1.0 + self.distension if self.kind == ARTERY else 1.3
        return max(self.a, self.b) * grow + self.wall_mm

    def _coords(
        self, x: np.ndarray, z: np.ndarray, t: float
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        a, b, cz = self.axes(t)
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        dx, dz = x - self.cx, z - cz
        u, v = dx * c + dz * s, dz * c - dx * s
        return u, v, a, b

    def lumen(self, x: np.ndarray, z: np.ndarray, t: float) -> np.ndarray:
        u, v, a, b = self._coords(x, z, t)
        result: np.ndarray = (u / a) ** 2 + (v / b) ** 2 < 1.0
        return result

    def paint(self, c: Canvas, t: float) -> None:
        u, v, a, b = self._coords(c.x, c.z, t)
        r = (u / a) ** 2 + (v / b) ** 2
        lumen = r < 1.0
        w = self.wall_mm
        ring = ((u / (a + w)) ** 2 + (v / (b + w)) ** 2 < 1.0) & ~lumen
        if ring.any():
            c.echo[ring] = db(self.wall_db)
            c.alpha[ring] = 0.7
            # the surface normal of the ellipse, rotated back to the image axes
            nu, nv = u / (a * a), v / (b * b)
            cs, sn = math.cos(self.tilt), math.sin(self.tilt)
            inc = c.incidence(nu * cs - nv * sn, nu * sn + nv * cs)
            amp = math.sqrt(db(self.wall_db + 6.0)) * inc
            c.spec[ring] = np.maximum(c.spec[ring], amp[ring])
        c.echo[lumen] = db(self.blood_db)
        c.alpha[lumen] = 0.18
        c.spec[lumen] = 0.0
        c.blood |= lumen
        c.labels[lumen] = self.kind


# -- things that are not vessels --------------------------------------------------------


@dataclass
class Cyst:
    """An anechoic collection: a lobulated outline, a thin bright wall (or none: free
    fluid), optional internal septa and dependent debris; strong posterior enhancement."""

    cx: float
    cz: float
    r: float
    aspect: float
    tilt: float
    lobes: tuple[tuple[float, float], ...]  # (relative amplitude, phase) for harmonics 2..
    wall_db: float  # below -50: no wall
    debris_db: float  # below -50: none
    septa: tuple[float, ...] = ()  # lateral positions (relative -1..1) of thin septa

    def _radius(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        theta = np.arctan2(v, u)
        rad = np.ones_like(u)
        for k, (amp, phase) in enumerate(self.lobes, start=2):
            rad += amp * np.cos(k * theta + phase)
        return rad

    def paint(self, c: Canvas, t: float) -> None:
        cs, sn = math.cos(self.tilt), math.sin(self.tilt)
        dx, dz = c.x - self.cx, c.z - self.cz
        u, v = (dx * cs + dz * sn) / self.r, (dz * cs - dx * sn) / (self.r * self.aspect)
        dist = np.sqrt(u * u + v * v) / self._radius(u, v)
        inside = dist < 1.0
        if self.wall_db > -50:
            ring = (dist >= 1.0) & (dist < 1.0 + 0.4 / self.r)
            c.echo[ring] = db(self.wall_db)
            inc = c.incidence(u, v)
            c.spec[ring] = np.maximum(c.spec[ring], (math.sqrt(db(self.wall_db)) * inc)[ring])
        c.echo[inside] = db(-75.0)
        c.alpha[inside] = 0.05
        c.spec[inside] = 0.0
        if self.debris_db > -50:
            low = inside & (v > 0.55)
            c.echo[low] = db(self.debris_db)
        for s in self.septa:
            band = inside & (np.abs(u - s) < 0.25 / self.r)
            c.spec[band] = math.sqrt(db(2.0))
            c.echo[band] = db(0.0)


@dataclass
class Bone:
    """A bony surface (rib, vertebra, clavicle): a bright curved line over
    [x0, x1] at depth ``z0`` (parabolic with ``curve``) and total shadow beneath."""

    x0: float
    x1: float
    z0: float
    curve: float  # 1/mm
    thickness: float

    def surface(self, x: np.ndarray) -> np.ndarray:
        xc = 0.5 * (self.x0 + self.x1)
        return self.z0 + self.curve * (x - xc) ** 2

    def blocks(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Where sound does not pass (the bone below its surface)."""
        out: np.ndarray = (x > self.x0) & (x < self.x1) & (z >= self.surface(x))
        return out

    def paint(self, c: Canvas, t: float) -> None:
        inside_x = (c.x > self.x0) & (c.x < self.x1)
        top = self.surface(c.x)
        surface = inside_x & (c.z >= top) & (c.z < top + 0.5)
        body = inside_x & (c.z >= top + 0.5) & (c.z < top + self.thickness)
        xc = 0.5 * (self.x0 + self.x1)
        inc = c.incidence(-2 * self.curve * (c.x - xc), np.ones_like(c.x), power=1.0)
        c.spec[surface] = (math.sqrt(db(30.0)) * inc)[surface]
        c.echo[surface] = db(15.0)
        c.alpha[surface | body] = 25.0
        c.echo[body] = db(5.0)


@dataclass
class Needle:
    """A steel needle in plane: a bright line from the skin at ``angle`` (radians from
    the horizontal), a comet tail of decaying echoes beneath, a faint shadow.

    ``advance_mm`` > 0 moves it: withdrawn by that much at t = 0 (at the phase
    ``advance_phase``, radians), pushed in to ``length`` and back once every
    ``1 / advance_hz`` seconds."""

    x_entry: float
    angle: float
    length: float
    diameter: float
    tail: int
    advance_mm: float = 0.0
    advance_hz: float = 0.0
    advance_phase: float = 0.0

    def inserted(self, t: float) -> float:
        """Length in the tissue (mm) at time ``t``."""
        back = 0.5 + 0.5 * math.cos(2 * math.pi * self.advance_hz * t + self.advance_phase)
        return self.length - self.advance_mm * back

    def tip(self, t: float) -> tuple[float, float]:
        """Where the tip is (x, z; mm) at time ``t``."""
        n = self.inserted(t)
        return self.x_entry + n * math.cos(self.angle), n * math.sin(self.angle)

    def paint(self, c: Canvas, t: float) -> None:
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        dx, dz = c.x - self.x_entry, c.z
        along = dx * ca + dz * sa
        across = -dx * sa + dz * ca  # positive below the shaft
        on = (along > 0) & (along < self.inserted(t))
        inc = c.incidence(np.full_like(c.x, -sa), np.full_like(c.x, ca), power=4.0)
        strength = math.sqrt(db(28.0)) * (0.15 + 0.85 * inc)
        shaft = on & (np.abs(across) < 0.5 * self.diameter)
        c.spec[shaft] = strength[shaft]
        c.echo[shaft] = db(12.0)
        c.alpha[shaft] = 8.0
        for k in range(1, self.tail + 1):
            band = on & (np.abs(across - k * self.diameter * 1.2) < 0.15)
            c.spec[band] = np.maximum(c.spec[band], strength[band] * 0.55**k)


@dataclass
class Air:
    """Air under the probe over [x0, x1] (lost coupling, bowel gas at ``depth``, a probe
    held in air): a bright interface, nothing beneath it but reverberations."""

    x0: float
    x1: float
    depth: float

    def blocks(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Where sound does not pass (the air and its face)."""
        out: np.ndarray = (x > self.x0) & (x < self.x1) & (z >= self.depth)
        return out

    def paint(self, c: Canvas, t: float) -> None:
        inside_x = (c.x > self.x0) & (c.x < self.x1)
        face = inside_x & (c.z >= self.depth) & (c.z < self.depth + 0.4)
        below = inside_x & (c.z >= self.depth + 0.4)
        c.spec[face] = math.sqrt(db(30.0))
        c.reverb[face] = math.sqrt(db(30.0))
        c.alpha[below] = 400.0
        c.echo[below] = db(-90.0)
        c.spec[below] = 0.0


@dataclass
class Reflector:
    """A flat strong reflector (a tank bottom, a plate): a bright line tilted by
    ``slope`` over [x0, x1] that reverberates; below it, a layer of ``below_db``."""

    x0: float
    x1: float
    z0: float
    slope: float
    below_db: float

    def paint(self, c: Canvas, t: float) -> None:
        inside_x = (c.x > self.x0) & (c.x < self.x1)
        top = self.z0 + self.slope * c.x
        face = inside_x & (c.z >= top) & (c.z < top + 0.5)
        below = inside_x & (c.z >= top + 0.5)
        inc = c.incidence(np.full_like(c.x, -self.slope), np.ones_like(c.x), power=2.0)
        c.spec[face] = (math.sqrt(db(26.0)) * inc)[face]
        c.reverb[face] = (math.sqrt(db(20.0)) * inc)[face]
        c.echo[face] = db(10.0)
        c.echo[below] = db(self.below_db)
        c.alpha[below] = 3.0


@dataclass
class Points:
    """Point targets (wires in a test phantom, calcifications)."""

    xs: tuple[float, ...]
    zs: tuple[float, ...]
    radius: float

    def paint(self, c: Canvas, t: float) -> None:
        for x, z in zip(self.xs, self.zs, strict=True):
            hit = (c.x - x) ** 2 + (c.z - z) ** 2 < self.radius**2
            c.spec[hit] = math.sqrt(db(24.0))
            c.echo[hit] = db(12.0)


# -- the scene ---------------------------------------------------------------------------


@dataclass
class Scene:
    """A medium and the objects over it; ``extent`` = (x min, x max, depth) in mm."""

    kind: SceneKind
    extent: tuple[float, float, float]
    medium: Tissue | Water
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def vessels(self) -> list[Vessel]:
        return [o for o in self.objects if isinstance(o, Vessel)]

    def paint(self, c: Canvas, t: float) -> Canvas:
        self.medium.paint(c, t)
        for obj in self.objects:
            obj.paint(c, t)
        return c

    def labels(self, x: np.ndarray, z: np.ndarray, t: float) -> np.ndarray:
        """Vessel labels at points ``(x, z)`` (mm): 0 background, 1 artery, 2 vein."""
        out = np.zeros(x.shape, np.uint8)
        for v in self.vessels:
            out[v.lumen(x, z, t)] = v.kind
        return out


# -- random scenes -----------------------------------------------------------------------


def _tissue(
    rng: np.random.Generator, extent: tuple[float, float, float], layers: list[Layer]
) -> Tissue:
    return Tissue(
        layers=layers,
        blobs=Texture(rng, extent, (rng.uniform(2.0, 5.0), rng.uniform(1.5, 4.0))),
        grain=Texture(rng, extent, (rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8))),
        striae=Texture(rng, extent, (rng.uniform(2.5, 6.0), rng.uniform(0.12, 0.3))),
    )


def _wave(rng: np.random.Generator, amp: float) -> tuple[float, float, float]:
    return (rng.uniform(0.0, amp), rng.uniform(15.0, 60.0), rng.uniform(0, 2 * np.pi))


def neck_layers(rng: np.random.Generator, depth: float) -> list[Layer]:
    """Skin and fat, a striated muscle between fasciae, deeper tissue, a deep fascia."""
    fat = rng.uniform(1.5, 5.0)
    muscle = fat + rng.uniform(4.0, 10.0)
    deep = muscle + rng.uniform(0.45, 0.75) * max(depth - muscle, 5.0)
    return [
        Layer(
            fat, rng.uniform(-12, -6), rng.uniform(2, 4), 0.6, rng.uniform(2, 8), _wave(rng, 0.6)
        ),
        Layer(
            muscle,
            rng.uniform(-9, -4),
            rng.uniform(2, 4),
            0.8,
            rng.uniform(4, 10),
            _wave(rng, 0.8),
            striated=True,
        ),
        Layer(
            deep,
            rng.uniform(-4, 2),
            rng.uniform(1.5, 3.5),
            0.6,
            rng.uniform(4, 10),
            _wave(rng, 1.5),
        ),
        Layer(depth * 2, rng.uniform(-6, 0), rng.uniform(1.5, 3.5), 0.7, -99.0),
    ]


def abdomen_layers(rng: np.random.Generator, depth: float) -> list[Layer]:
    """Skin, fat, abdominal wall muscle, then organ parenchyma (liver-like)."""
    fat = rng.uniform(3.0, 15.0)
    wall = fat + rng.uniform(5.0, 15.0)
    return [
        Layer(
            fat, rng.uniform(-12, -5), rng.uniform(2, 4), 0.6, rng.uniform(2, 8), _wave(rng, 2.0)
        ),
        Layer(
            wall,
            rng.uniform(-8, -3),
            rng.uniform(2, 4),
            0.8,
            rng.uniform(6, 12),
            _wave(rng, 2.0),
            striated=True,
        ),
        Layer(depth * 2, rng.uniform(-3, 3), rng.uniform(1.0, 3.0), 0.5, -99.0),
    ]


Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]  # points (x, z) -> in the view


def _within(box: tuple[float, float, float, float], inside: Inside | None) -> bool:
    """Whether the box's corners and edge midpoints are all in the field of view."""
    if inside is None:
        return True
    x0, z0, x1, z1 = box
    xs = np.array([x0, x1, x0, x1, (x0 + x1) / 2, (x0 + x1) / 2, x0, x1])
    zs = np.array([z0, z0, z1, z1, z0, z1, (z0 + z1) / 2, (z0 + z1) / 2])
    return bool(inside(xs, zs).all())


def _clear(box: tuple[float, float, float, float], taken: list[tuple[float, ...]]) -> bool:
    x0, z0, x1, z1 = box
    return all(x1 < a0 or x0 > a1 or z1 < b0 or z0 > b1 for a0, b0, a1, b1 in taken)


def _vessels(
    rng: np.random.Generator,
    which: Sequence[int],
    extent: tuple[float, float, float],
    top: float,
    big: bool,
    taken: list[tuple[float, ...]],
    inside: Inside | None,
) -> list[Vessel]:
    """Vessels of the kinds in ``which``, inside [x0, x1] x [top, depth - margin], clear of
    each other; sizes of the neck (carotid, jugular) or, ``big``, the abdomen (aorta, IVC)."""
    x0, x1, depth = extent
    heart_hz, heart_phase = rng.uniform(0.9, 1.4), rng.uniform(0, 1)
    out: list[Vessel] = []
    for kind in which:
        for _ in range(200):
            scale = rng.uniform(2.6, 4.0) if big else 1.0
            if kind == ARTERY:
                r = rng.uniform(2.5, 4.0) * scale
                a, b, tilt = r, r, 0.0
            else:
                a, b = rng.uniform(3.5, 7.0) * scale, rng.uniform(2.5, 4.5) * scale
                tilt = rng.uniform(-0.3, 0.3)
            reach = max(a, b) * 1.35 + 1.5
            cx = rng.uniform(x0 + reach + 1.0, x1 - reach - 1.0) if x1 - x0 > 2 * reach + 2 else 0.0
            lo, hi = top + reach + 0.5, min(depth - reach - 2.0, top + (35.0 if not big else 90.0))
            if hi <= lo:
                continue
            cz = rng.uniform(lo, hi)
            box = (cx - reach, cz - reach, cx + reach, cz + reach)
            if not _clear(box, taken) or not _within(box, inside):
                continue
            taken.append(box)
            if kind == ARTERY:
                out.append(
                    Vessel(
                        ARTERY,
                        cx,
                        cz,
                        a,
                        b,
                        tilt,
                        wall_mm=rng.uniform(0.5, 1.1) * (1.5 if big else 1.0),
                        wall_db=rng.uniform(4.0, 12.0),
                        blood_db=rng.uniform(-50.0, -35.0),
                        heart_hz=heart_hz,
                        heart_phase=heart_phase,
                        distension=rng.uniform(0.05, 0.12),
                    )
                )
            else:
                out.append(
                    Vessel(
                        VEIN,
                        cx,
                        cz + b,
                        a,
                        b,
                        tilt,
                        wall_mm=rng.uniform(0.25, 0.5),
                        wall_db=rng.uniform(-2.0, 6.0),
                        blood_db=rng.uniform(-48.0, -30.0),
                        heart_hz=heart_hz,
                        heart_phase=heart_phase,
                        min_fill=rng.uniform(0.45, 0.8),
                        press_hz=rng.uniform(0.08, 0.3),
                        press_phase=rng.uniform(0, 2 * np.pi),
                    )
                )
            break
    return out


def _cyst(
    rng: np.random.Generator,
    extent: tuple[float, float, float],
    top: float,
    big: bool,
    taken: list[tuple[float, ...]],
    free_fluid: bool = False,
) -> Cyst | None:
    x0, x1, depth = extent
    r = rng.uniform(6.0, 25.0) if big else rng.uniform(2.5, 9.0)
    r = min(r, 0.3 * (x1 - x0), 0.3 * depth)
    aspect = rng.uniform(0.5, 1.1)
    lobes = tuple(
        (rng.uniform(0.0, 0.25 if free_fluid else 0.12), rng.uniform(0, 2 * np.pi))
        for _ in range(int(rng.integers(1, 5)))
    )
    reach = r * 1.4
    for _ in range(50):
        cx = rng.uniform(x0 + 0.5 * reach, x1 - 0.5 * reach)
        cz = rng.uniform(top + reach * aspect, max(top + reach * aspect + 0.1, depth - reach))
        box = (cx - reach, cz - reach, cx + reach, cz + reach)
        if _clear(box, taken):
            taken.append(box)
            return Cyst(
                cx,
                cz,
                r,
                aspect,
                rng.uniform(-0.5, 0.5),
                lobes,
                wall_db=-99.0 if free_fluid or rng.random() < 0.3 else rng.uniform(-2.0, 8.0),
                debris_db=rng.uniform(-25.0, -10.0) if rng.random() < 0.25 else -99.0,
                septa=tuple(rng.uniform(-0.6, 0.6, int(rng.integers(1, 3))))
                if rng.random() < 0.2
                else (),
            )
    return None


def _bone(
    rng: np.random.Generator,
    extent: tuple[float, float, float],
    top: float,
    taken: list[tuple[float, ...]],
) -> Bone | None:
    x0, x1, depth = extent
    width = rng.uniform(0.15, 0.45) * (x1 - x0)
    for _ in range(30):
        bx0 = rng.uniform(x0 - 0.3 * width, x1 - 0.7 * width)
        z0 = rng.uniform(top, max(top + 1.0, 0.8 * depth))
        box = (bx0, z0 - 2.0, bx0 + width, depth * 2)  # the shadow takes everything below
        if _clear(box, taken):
            taken.append(box)
            return Bone(bx0, bx0 + width, z0, rng.uniform(-0.02, 0.06), rng.uniform(3.0, 12.0))
    return None


def _distractors(
    rng: np.random.Generator,
    extent: tuple[float, float, float],
    top: float,
    big: bool,
    taken: list[tuple[float, ...]],
) -> list[SceneObject]:
    """Cysts, fluid, bone, a needle, air: each with its own probability."""
    x0, x1, depth = extent
    out: list[SceneObject] = []
    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):
        cyst = _cyst(rng, extent, top, big, taken, free_fluid=rng.random() < 0.3)
        if cyst is not None:
            out.append(cyst)
    if rng.random() < 0.2:
        bone = _bone(rng, extent, top, taken)
        if bone is not None:
            out.append(bone)
    if rng.random() < 0.15:
        out.append(
            Points(
                tuple(rng.uniform(x0, x1, 3)),
                tuple(rng.uniform(top, depth, 3)),
                rng.uniform(0.2, 0.5),
            )
        )
    if rng.random() < 0.15:
        side = x0 if rng.random() < 0.5 else x1
        width = rng.uniform(0.08, 0.25) * (x1 - x0)
        a0, a1 = (side, side + width) if side == x0 else (side - width, side)
        box = (a0, 0.0, a1, depth * 2)
        if _clear(box, taken):
            taken.append(box)
            out.append(Air(a0, a1, rng.uniform(0.0, 1.0)))
    if rng.random() < 0.15:
        entry = x0 if rng.random() < 0.5 else x1
        angle = rng.uniform(0.15, 0.7) * (1 if entry == x0 else -1)
        angle = angle if entry == x0 else math.pi + angle
        length = rng.uniform(0.4, 1.0) * (x1 - x0)
        out.append(Needle(entry, angle, length, rng.uniform(0.4, 0.9), int(rng.integers(2, 8))))
    return out


def vessel_kinds(rng: np.random.Generator) -> tuple[int, ...]:
    """None, an artery, a vein, or both (the last most often)."""
    return ((), (ARTERY,), (VEIN,), (ARTERY, VEIN))[int(rng.choice(4, p=[0.22, 0.15, 0.15, 0.48]))]


def draw_scene(
    rng: np.random.Generator,
    kind: SceneKind,
    extent: tuple[float, float, float],
    vessels: Sequence[int] | None = None,
    distractors: bool = True,
    inside: Inside | None = None,
) -> Scene:
    """A random scene of ``kind`` over ``extent`` (x min, x max, depth; mm).

    ``vessels``: the vessel kinds to place (None: drawn, see :func:`vessel_kinds`);
    only "neck" and "abdomen" scenes have vessels. ``distractors``: add cysts, bone,
    needles, air at random. ``inside``: the field of view, which vessels stay in.
    """
    x0, x1, depth = extent
    taken: list[tuple[float, ...]] = []
    objects: list[SceneObject] = []
    medium: Tissue | Water
    if kind in ("neck", "abdomen"):
        big = kind == "abdomen"
        layers = abdomen_layers(rng, depth) if big else neck_layers(rng, depth)
        medium = _tissue(rng, extent, layers)
        top = layers[0].bottom + (layers[1].bottom - layers[0].bottom) * (0.9 if big else 1.0)
        which = vessel_kinds(rng) if vessels is None else tuple(vessels)
        objects += _vessels(rng, which, extent, top, big, taken, inside)
        if distractors:
            objects += _distractors(rng, extent, top, big, taken)
    elif kind == "fluid":
        medium = _tissue(rng, extent, abdomen_layers(rng, depth))
        for _ in range(int(rng.integers(1, 3))):
            cyst = _cyst(rng, extent, 8.0, True, taken, free_fluid=rng.random() < 0.5)
            if cyst is not None:
                objects.append(cyst)
        if distractors:
            objects += _distractors(rng, extent, 8.0, True, taken)
    elif kind == "water":
        medium = Water()
        if rng.random() < 0.8:
            objects.append(
                Reflector(
                    x0 + rng.uniform(-0.2, 0.3) * (x1 - x0),
                    x1 - rng.uniform(-0.2, 0.3) * (x1 - x0),
                    rng.uniform(0.3, 0.9) * depth,
                    rng.uniform(-0.15, 0.15),
                    rng.uniform(-20.0, 0.0),
                )
            )
        if rng.random() < 0.4:
            n = int(rng.integers(1, 8))
            objects.append(
                Points(tuple(rng.uniform(x0, x1, n)), tuple(rng.uniform(2, depth, n)), 0.3)
            )
    else:  # air: the probe in air, or lifted at one side
        medium = _tissue(rng, extent, neck_layers(rng, depth))
        if rng.random() < 0.6:
            objects.append(Air(x0 - 1.0, x1 + 1.0, 0.0))
        else:
            split = rng.uniform(x0, x1)
            objects.append(
                Air(x0 - 1.0, split, 0.0) if rng.random() < 0.5 else Air(split, x1 + 1, 0)
            )
    return Scene(kind, extent, medium, objects)
