"""A synthetic neck B-mode phantom with ground-truth vessel labels.

A transverse view of the neck as a linear probe sees it: skin, subcutaneous
fat with septa, a striated muscle layer between bright fasciae, deeper tissue
and a deep fascia; Rayleigh speckle, log compression and residual depth
attenuation. In it a pulsating carotid artery (round, anechoic, bright
specular near and far walls, radius following a cardiac waveform at about
1.1 Hz) and a compressible jugular vein (a tilted ellipse beside and above the
artery whose height changes slowly, as under varying probe pressure, with a
faint venous pulse). Both show posterior acoustic enhancement. The whole
anatomy drifts slowly (probe motion).

Everything random is drawn from ``seed`` when the source is built (vessel
positions and sizes within anatomical ranges, heart rate, layer depths,
speckle), and every frame is a pure function of its index, so
:meth:`SyntheticSource.frame_with_labels` can be called in any order.
Labels follow FAST's convention: 0 background, 1 artery, 2 vein (lumens).

Speed: speckle and tissue are pre-computed on a canvas larger than the image
and cropped at the motion's offset, so a frame is a crop, a handful of
operations on the two vessel boxes and a conversion to ``uint8``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from daemon.acquire.base import DEFAULT_FPS, fps_str, shape_str
from daemon.frame import Frame, FrameMeta

log = logging.getLogger(__name__)

ARTERY, VEIN = 1, 2

_DEPTH_MM = 40.0  # at least this deep and ...
_WIDTH_MM = 30.0  # ... this wide a field of view; square pixels
_FLOOR_DB, _RANGE_DB = -36.0, 50.0  # log compression: display dynamic range
_GRAY = 255.0 / _RANGE_DB  # grey levels per dB
_BLOOD_DB = -30.0  # lumen echo level (anechoic)
_ENHANCE_DB_PER_MM = 0.6  # posterior enhancement per mm of blood above
_ATTEN_DB_PER_MM = 0.35  # what the time-gain compensation leaves of attenuation
_MOTION_MM = (2.0, 0.6)  # largest probe drift: lateral, axial


class SyntheticSettings(BaseModel):
    """The synthetic phantom's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(
        default=256, ge=256, le=1024, description="Image width in pixels (lateral direction)."
    )
    height: int = Field(
        default=256,
        ge=256,
        le=1024,
        description="Image height in pixels (depth). Pixels are square; the field of view is "
        "at least 40 mm deep and 30 mm wide.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Random seed for the anatomy (vessel positions and sizes, heart rate, "
        "layers, motion) and the speckle: the same seed and size give the same frames.",
    )


def _cardiac(phase: float) -> float:
    """Arterial distension over one heart beat (0..1): a fast systolic rise, slow decay."""
    x = (phase % 1.0) / 0.18
    return x * math.exp(1.0 - x)


@dataclass(frozen=True, slots=True)
class _Anatomy:
    """The random draw of one phantom; lengths in mm, frequencies in Hz."""

    artery_xy: tuple[float, float]
    artery_r: float
    distension: float  # relative radius increase at peak systole
    heart_hz: float
    heart_phase: float
    vein_x: float
    vein_bottom: float
    vein_a: float  # semi-axes at full filling
    vein_b: float
    vein_tilt: float  # radians
    vein_min_fill: float  # smallest height fraction under compression
    press_hz: float
    press_phase: float
    drift: tuple[tuple[float, float, float], ...]  # (amplitude mm, Hz, phase) x: 2, y: 2
    layers: tuple[float, float, float]  # bottom of fat, bottom of muscle, deep fascia

    def artery_radius(self, t: float) -> float:
        """Lumen radius at time ``t``: diastolic radius, distended in systole."""
        return self.artery_r * (
            1.0 + self.distension * _cardiac(self.heart_hz * t + self.heart_phase)
        )

    def vein_axes(self, t: float) -> tuple[float, float]:
        """Semi-axes (lateral, axial): flattened and widened under pressure, faint pulse."""
        fill = self.vein_min_fill + (1.0 - self.vein_min_fill) * (
            0.5 + 0.5 * math.sin(2 * math.pi * self.press_hz * t + self.press_phase)
        )
        pulse = 1.0 + 0.04 * _cardiac(self.heart_hz * t + self.heart_phase + 0.6)
        return self.vein_a * (1.0 + 0.25 * (1.0 - fill)), self.vein_b * fill * pulse

    def shift(self, t: float) -> tuple[float, float]:
        """Probe drift (mm): how far the anatomy has moved, lateral and axial."""
        (ax, fx, px), (ax2, fx2, px2), (ay, fy, py), (ay2, fy2, py2) = self.drift
        two_pi = 2 * math.pi
        return (
            ax * math.sin(two_pi * fx * t + px) + ax2 * math.sin(two_pi * fx2 * t + px2),
            ay * math.sin(two_pi * fy * t + py) + ay2 * math.sin(two_pi * fy2 * t + py2),
        )


def _vein_outline(a: float, b: float, tilt: float, cx: float, bottom: float) -> np.ndarray:
    """Points (mm) on the vein wall; the ellipse rests on ``bottom``."""
    th = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    u, v = a * np.cos(th), b * np.sin(th)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + u * c - v * s, bottom - b + u * s + v * c], axis=1)


def _fits(
    artery: tuple[float, float, float],
    vein: tuple[float, float, float, float, float, float],
    width_mm: float,
    fat: float,
    margin: float,
) -> bool:
    """Whether the vein, at every filling, stays clear of the artery and inside the view."""
    ax, ay, r_out = artery
    vx, bottom, a, b, tilt, min_fill = vein
    if not margin < ax - r_out < ax + r_out < width_mm - margin:
        return False
    c, s = math.cos(tilt), math.sin(tilt)
    for fill in np.linspace(min_fill, 1.0, 5):
        va, vb = a * (1.25 - 0.25 * fill), b * fill * 1.04  # widest and tallest of vein_axes
        pts = _vein_outline(va, vb, tilt, vx, bottom)
        dx, dy = ax - vx, ay - (bottom - vb)
        artery_inside = ((dx * c + dy * s) / va) ** 2 + ((dy * c - dx * s) / vb) ** 2 < 1.0
        if (
            artery_inside
            or np.hypot(pts[:, 0] - ax, pts[:, 1] - ay).min() <= r_out
            or pts[:, 0].min() <= margin
            or pts[:, 0].max() >= width_mm - margin
            or pts[:, 1].min() <= fat + 0.8
        ):
            return False
    return True


def _draw_anatomy(rng: np.random.Generator, width_mm: float) -> _Anatomy:
    """Vessels within anatomical ranges, the vein clear of the artery and inside the view."""
    fat = rng.uniform(2.0, 4.0)
    layers = (fat, fat + rng.uniform(5.0, 9.0), rng.uniform(28.0, 34.0))
    margin = _MOTION_MM[0] + 1.0
    for _ in range(1000):  # about one draw in six fits
        r = rng.uniform(2.8, 3.8)
        distension = rng.uniform(0.06, 0.12)
        ax, ay = rng.uniform(0.3, 0.7) * width_mm, rng.uniform(15.0, 24.0)
        a, b = rng.uniform(4.5, 7.0), rng.uniform(3.0, 5.0)
        tilt, min_fill = rng.uniform(-0.25, 0.25), rng.uniform(0.3, 0.6)
        side = 1.0 if rng.random() < 0.5 else -1.0
        vx = ax + side * rng.uniform(0.3, 1.3) * (r + a)
        bottom = ay + rng.uniform(-1.8, 0.5) * r  # the vein rests at about the artery's level
        r_out = r * (1 + distension) + 1.5  # wall and a gap
        if _fits((ax, ay, r_out), (vx, bottom, a, b, tilt, min_fill), width_mm, fat, margin):
            break
    else:  # pragma: no cover - the ranges above leave ample room
        raise RuntimeError("synthetic phantom: no vessel layout fits the field of view")
    mx, my = _MOTION_MM
    return _Anatomy(
        artery_xy=(ax, ay),
        artery_r=r,
        distension=distension,
        heart_hz=rng.uniform(0.95, 1.25),
        heart_phase=rng.uniform(0, 1),
        vein_x=vx,
        vein_bottom=bottom,
        vein_a=a,
        vein_b=b,
        vein_tilt=tilt,
        vein_min_fill=min_fill,
        press_hz=rng.uniform(0.08, 0.25),
        press_phase=rng.uniform(0, 2 * np.pi),
        drift=(
            (rng.uniform(0.3, 0.7) * mx, rng.uniform(0.04, 0.12), rng.uniform(0, 2 * np.pi)),
            (rng.uniform(0.0, 0.3) * mx, rng.uniform(0.2, 0.4), rng.uniform(0, 2 * np.pi)),
            (rng.uniform(0.3, 0.7) * my, rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)),
            (rng.uniform(0.0, 0.3) * my, rng.uniform(0.2, 0.5), rng.uniform(0, 2 * np.pi)),
        ),
        layers=layers,
    )


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_xy: tuple[float, float]
) -> np.ndarray:
    """Gaussian noise low-passed with (lateral, axial) sigmas in pixels, unit std."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    blurred: np.ndarray = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_xy[0], sigmaY=sigma_xy[1])
    return blurred / max(float(blurred.std()), 1e-6)


class SyntheticSource:
    """Endless frames of the phantom; see the module docstring."""

    def __init__(self, settings: SyntheticSettings | None = None, fps: float | None = None) -> None:
        """``fps``: the simulated scanner's frame rate (frame i has t_source = i / fps)."""
        self.settings = s = settings or SyntheticSettings()
        self.fps = fps or DEFAULT_FPS
        h, w = s.height, s.width
        self.spacing_mm = sp = max(_DEPTH_MM / h, _WIDTH_MM / w)
        rng = np.random.default_rng(s.seed)
        self.anatomy = anat = _draw_anatomy(rng, w * sp)
        self.heart_rate_hz = anat.heart_hz
        self.nominal_fps: float | None = self.fps
        self.max_shape: tuple[int, ...] = (h, w)
        self.dtype = np.dtype(np.uint8)
        self.description = (
            f"synthetic phantom ({shape_str(self.max_shape, self.dtype)}, {fps_str(self.fps)}, "
            f"seed {s.seed})"
        )
        self._transform = np.diag([sp, sp, 1.0, 1.0])

        # The canvas: the image plus a margin for the probe drift, in grey levels.
        self._m = m = math.ceil(max(_MOTION_MM) / sp) + 2
        ch, cw = h + 2 * m, w + 2 * m
        z = _smooth_noise(rng, (ch, cw), (1.6 * 0.15 / sp, 0.15 / sp))
        z2 = _smooth_noise(rng, (ch, cw), (1.6 * 0.15 / sp, 0.15 / sp))
        speckle_db = (20.0 * np.log10(np.hypot(z, z2) / math.sqrt(2.0) + 1e-6)).astype(np.float32)
        self._speckle = speckle_db * _GRAY
        tissue_db = self._tissue(rng, ch, cw)
        self._canvas = ((tissue_db + speckle_db - _FLOOR_DB) * _GRAY).astype(np.float32)
        depth = np.arange(h, dtype=np.float32)[:, None] * sp
        self._gain = (-_ATTEN_DB_PER_MM * _GRAY * depth).astype(np.float32)
        self._rows = np.arange(h, dtype=np.float32)
        self._cols = np.arange(w, dtype=np.float32)
        log.info(
            "synthetic phantom: %s, %.3f mm/px, heart rate %.2f Hz",
            self.description,
            sp,
            anat.heart_hz,
        )

    def _tissue(self, rng: np.random.Generator, ch: int, cw: int) -> np.ndarray:
        """Mean echogenicity (dB) of the layered neck tissue on the canvas."""
        sp, m = self.spacing_mm, self._m
        y = ((np.arange(ch, dtype=np.float32) - m) * sp)[:, None]
        x = ((np.arange(cw, dtype=np.float32) - m) * sp)[None, :]

        def boundary(depth: float) -> np.ndarray:
            amp, period = rng.uniform(0.2, 0.8), rng.uniform(15.0, 40.0)
            return depth + amp * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))

        fat, muscle, deep = (boundary(d) for d in self.anatomy.layers)
        striation = _smooth_noise(rng, (ch, cw), (2.5 / sp, 0.12 / sp))
        septa = np.zeros((ch, cw), np.float32)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.uniform(0, cw), m + rng.uniform(1.0, self.anatomy.layers[0]) / sp
            half, slope = rng.uniform(1.5, 6.0) / sp, rng.uniform(-0.25, 0.25)
            p0 = (round(x0 - half), round(y0 - slope * half))
            p1 = (round(x0 + half), round(y0 + slope * half))
            cv2.line(septa, p0, p1, 1.0, max(1, round(0.2 / sp)))
        tissue = np.where(y < muscle, -11.0 + 3.0 * striation, -4.0).astype(np.float32)
        tissue = np.where(y < fat, -15.0 + 12.0 * septa, tissue)
        tissue = np.where(y < 0.6, 3.0, tissue)
        for line, gain in ((fat, 5.0), (muscle, 6.0), (deep, 7.0)):
            tissue += gain * np.exp(-(((y - line) / 0.35) ** 2))
        tissue += 1.5 * _smooth_noise(rng, (ch, cw), (2.0 / sp, 2.0 / sp))
        return tissue.astype(np.float32)

    def frame_with_labels(self, index: int) -> tuple[Frame, np.ndarray]:
        """Frame ``index`` and its label map (uint8: 0 background, 1 artery, 2 vein)."""
        s, anat, sp, m = self.settings, self.anatomy, self.spacing_mm, self._m
        h, w = s.height, s.width
        t = index / self.fps
        dx_mm, dy_mm = anat.shift(t)
        dx, dy = round(dx_mm / sp), round(dy_mm / sp)
        out = self._canvas[m - dy : m - dy + h, m - dx : m - dx + w] + self._gain
        labels = np.zeros((h, w), np.uint8)

        r = anat.artery_radius(t) / sp
        ax, ay = anat.artery_xy[0] / sp + dx, anat.artery_xy[1] / sp + dy
        va, vb = (v / sp for v in anat.vein_axes(t))
        vx, vy = anat.vein_x / sp + dx, anat.vein_bottom / sp + dy - vb
        c, sn = math.cos(anat.vein_tilt), math.sin(anat.vein_tilt)
        wall_a, wall_v = 0.8 / sp, 0.45 / sp

        vessels = []
        for label, cx, cy, reach in (
            (ARTERY, ax, ay, r + wall_a),
            (VEIN, vx, vy, max(va, vb) + wall_v),
        ):
            y0, y1 = max(0, math.floor(cy - reach - 1)), min(h, math.ceil(cy + reach + 2))
            x0, x1 = max(0, math.floor(cx - reach - 1)), min(w, math.ceil(cx + reach + 2))
            ddy = (self._rows[y0:y1] - cy)[:, None]
            ddx = (self._cols[x0:x1] - cx)[None, :]
            if label == ARTERY:
                u, v, a, b, wall = ddx, ddy, r, r, wall_a
            else:
                u, v, a, b, wall = ddx * c + ddy * sn, ddy * c - ddx * sn, va, vb, wall_v
            lumen = (u / a) ** 2 + (v / b) ** 2 < 1.0
            ring = ((u / (a + wall)) ** 2 + (v / (b + wall)) ** 2 < 1.0) & ~lumen
            specular = v * v / (u * u + v * v + 1e-6)  # near and far walls shine most
            vessels.append((label, slice(y0, y1), slice(x0, x1), lumen, ring, specular))

        gain_wall = {ARTERY: 14.0 * _GRAY, VEIN: 7.0 * _GRAY}
        for label, ys, xs, _, ring, specular in vessels:
            out[ys, xs] += ring * (gain_wall[label] * (0.2 + 0.8 * specular))
        for _, ys, xs, lumen, _, _ in vessels:
            path = np.cumsum(lumen, axis=0, dtype=np.float32) * (_ENHANCE_DB_PER_MM * sp * _GRAY)
            out[ys, xs] += path
            out[ys.stop :, xs] += path[-1]
        # blood: faint speckle that decorrelates from frame to frame
        oy, ox = (index * 7) % (2 * m + 1), (index * 13) % (2 * m + 1)
        for label, ys, xs, lumen, _, _ in vessels:
            blood = self._speckle[oy + ys.start : oy + ys.stop, ox + xs.start : ox + xs.stop]
            out[ys, xs][lumen] = (_BLOOD_DB - _FLOOR_DB) * _GRAY + 0.6 * blood[lumen]
            labels[ys, xs][lumen] = label

        np.clip(out, 0.0, 255.0, out=out)
        image = out.astype(np.uint8)
        meta = FrameMeta.for_array(
            image,
            index=index,
            t_source=t,
            spacing=(sp, sp, 1.0),
            transform=self._transform.copy(),
        )
        return Frame(image, meta), labels

    def frames(self) -> Iterator[Frame]:
        """Frames 0, 1, 2, ... without end."""
        index = 0
        while True:
            yield self.frame_with_labels(index)[0]
            index += 1

    def close(self) -> None:
        """Nothing to release."""
