"""How the ultrasound simulator images a scene: the convolution model of B-mode imaging.

For one probe (:class:`Probe`: linear, or curvilinear with a sector) and one set of
scanner settings (:class:`Scanner`: frequency, bandwidth, focus, gain, dynamic range,
time-gain compensation), an :class:`Imager` makes frames of a
:class:`~daemon.phantoms.us_scene.Scene`:

1. the scene's acoustic fields are sampled along each beam (scan line) on a grid of a
   quarter wavelength (:class:`~daemon.phantoms.us_scene.Canvas`);
2. scatterer map: Gaussian scatterers (fixed in the tissue, drawn afresh in blood) of
   amplitude sqrt(echogenicity), plus impulses at specular interfaces and the
   reverberations of strong reflectors, all attenuated along the beam by the two-way
   attenuation (dB/(cm MHz) x f0 x path) accumulated from the probe;
3. radio-frequency lines: the map convolved along each beam with the transmit pulse
   (a Gaussian-windowed cosine at f0 of the given fractional bandwidth), computed in
   the frequency domain;
   Electronic noise (white, not attenuated) is added to the RF before the pulse filter;
4. envelope detection: the analytic signal of the RF (its positive frequencies), shifted
   to baseband and decimated (IQ demodulation);
5. the beam's lateral point-spread function, a Gaussian as wide as
   lambda F# (1 + 1.5 |z - focus| / focus) (dynamic receive focusing keeps it near
   lambda F#), narrowest at the focus; depth-dependent, interpolated between a few blurs;
6. time-gain compensation (an assumed attenuation plus slider offsets), log
   compression to the dynamic range at the gain set, a grey map (gamma);
7. scan conversion to the display grid (bilinear, or nearest as some scanners do),
   black outside the field of view.

Needs numpy and OpenCV only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from daemon.phantoms.us_scene import Canvas, Scene

SOUND_MM_PER_US = 1.54
_LOG_MEAN_DB = -2.51  # mean of 10 log10 of a unit-mean exponential (fully developed speckle)
_REVERB_LENS_MM = 1.0  # extra path of a reverberation in the probe's lens
_SIGMAS = 5  # lateral blurs interpolated between


@dataclass(frozen=True)
class Probe:
    """Transducer geometry. Linear: ``lines`` parallel beams over ``width`` mm.
    Curvilinear: beams fanning from an arc of ``radius`` mm over ``sector`` radians.
    Either images ``depth`` mm below its face (z = 0 at the face's centre)."""

    kind: Literal["linear", "curvilinear"]
    depth: float
    lines: int
    width: float = 40.0
    radius: float = 50.0
    sector: float = 1.0

    def extent(self) -> tuple[float, float, float]:
        """(x min, x max, z max) of the field of view, mm."""
        if self.kind == "linear":
            return -self.width / 2, self.width / 2, self.depth
        half = (self.radius + self.depth) * math.sin(self.sector / 2)
        return -half, half, self.depth

    def beams(
        self, r: np.ndarray, extra: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Positions (x, z) and beam directions (bx, bz) at ranges ``r`` (rows) on every
        line (columns), and on ``extra`` more lines beyond each side at the same pitch."""
        rr = r.astype(np.float32)[:, None]
        step = np.arange(-extra, self.lines + extra, dtype=np.float32) / (self.lines - 1)
        if self.kind == "linear":
            xl = (-self.width / 2 + self.width * step).astype(np.float32)
            x = np.broadcast_to(xl[None, :], (len(r), len(xl)))
            z = np.broadcast_to(rr, x.shape)
            return x, z, np.zeros_like(x), np.ones_like(x)
        th = (-self.sector / 2 + self.sector * step).astype(np.float32)[None, :]
        s, c = np.sin(th), np.cos(th)
        x = (self.radius + rr) * s
        z = (self.radius + rr) * c - self.radius
        return x, z, np.broadcast_to(s, x.shape), np.broadcast_to(c, x.shape)

    def contains(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Whether points (x, z) in mm are in the field of view."""
        line, r = self.to_beam(x, z)
        inside: np.ndarray = (
            (line >= -0.5) & (line <= self.lines - 0.5) & (r >= 0) & (r <= self.depth)
        )
        return inside

    def line_spacing(self, r: np.ndarray) -> np.ndarray:
        """Distance between neighbouring beams (mm) at ranges ``r``."""
        if self.kind == "linear":
            return np.full(r.shape, self.width / (self.lines - 1), np.float32)
        return ((self.radius + r) * self.sector / (self.lines - 1)).astype(np.float32)

    def position(self, line: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points (x, z) in mm at (fractional) ``line`` and range ``r``: :meth:`to_beam`
        inverted."""
        if self.kind == "linear":
            return -self.width / 2 + self.width * line / (self.lines - 1), r
        th = (line / (self.lines - 1) - 0.5) * self.sector
        return (self.radius + r) * np.sin(th), (self.radius + r) * np.cos(th) - self.radius

    def to_beam(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fractional line index, range mm) of points (x, z): the scan conversion."""
        if self.kind == "linear":
            return (x + self.width / 2) / self.width * (self.lines - 1), z
        zz = z + self.radius
        th = np.arctan2(x, zz)
        r = np.hypot(x, zz) - self.radius
        return (th + self.sector / 2) / self.sector * (self.lines - 1), r


@dataclass(frozen=True)
class Scanner:
    """Transmit, receive and display settings."""

    f0: float  # centre frequency, MHz
    bandwidth: float  # fractional -6 dB bandwidth of the pulse
    focus: float  # transmit focus depth, mm
    f_number: float
    gain_grey: float  # grey level of reference tissue (0 dB) once compensated
    dynamic_range: float  # dB shown from black to white
    tgc_alpha: float  # attenuation (dB/(cm MHz)) the time-gain compensation assumes
    tgc_sliders: tuple[float, ...]  # dB added at evenly spaced depths
    noise_db: float  # electronic noise re reference tissue
    reverb_decay: float  # amplitude ratio of successive reverberations
    gamma: float  # grey map: out = 255 (in / 255) ** gamma
    smooth_px: float  # post-detection smoothing (display pixels)
    nearest: bool  # scan conversion by nearest neighbour (else bilinear)

    @property
    def wavelength(self) -> float:
        return SOUND_MM_PER_US / self.f0


@dataclass(frozen=True)
class Layout:
    """Where the field of view lies on the display: ``shape`` (h, w) pixels of
    ``pixel_mm``; the probe's centre (x = 0, z = 0) at pixel (``col0``, ``row0``)."""

    shape: tuple[int, int]
    pixel_mm: float
    col0: float
    row0: float

    @classmethod
    def fill(cls, probe: Probe, shape: tuple[int, int], margin: float = 0.0) -> Layout:
        """The field of view as large as fits ``shape`` (square pixels), centred
        laterally, at the top, with ``margin`` (a fraction) left around it."""
        x0, x1, depth = probe.extent()
        if probe.kind == "curvilinear":
            depth = probe.depth  # the arc's bottom at the centre line
        h, w = shape
        px = max(depth / (h * (1 - margin)), (x1 - x0) / (w * (1 - margin)))
        return cls(shape, px, (w - 1) / 2 - (x0 + x1) / 2 / px, h * margin / 2)

    def points(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions (x, z) in mm of (fractional) pixel coordinates."""
        return (cols - self.col0) * self.pixel_mm, (rows - self.row0) * self.pixel_mm

    def pixel(self, x: float, z: float) -> tuple[float, float]:
        """(column, row) of the point (x, z) mm: :meth:`points` inverted."""
        return x / self.pixel_mm + self.col0, z / self.pixel_mm + self.row0


class Imager:
    """Frames of scenes seen by one probe with one scanner's settings.

    The grids, the pulse's filter, the scan conversion maps and the tissue scatterers
    are made once (``rng``), so frames of a moving scene share their speckle; the
    scene's medium (the tissue, which does not move) is painted once per scene. A probe
    drift is a ``step`` of whole lines and whole IQ samples over the tissue (at most
    ``motion_mm``).
    """

    def __init__(
        self,
        probe: Probe,
        scanner: Scanner,
        layout: Layout,
        rng: np.random.Generator,
        motion_mm: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """``motion_mm``: the largest probe drift (lateral, axial) that frames will ask
        for; the tissue's scatterers are drawn that much wider and deeper."""
        self.probe, self.scanner, self.layout = probe, scanner, layout
        lam = scanner.wavelength
        self.dr = lam / 4  # envelope (IQ) sample spacing
        self.rows = m = math.ceil(probe.depth / self.dr)
        n = 2 * m  # RF samples at lambda / 8
        self.r = (np.arange(m, dtype=np.float32) + 0.5) * self.dr
        self.x, self.z, self.bx, self.bz = probe.beams(self.r)
        self._pitch = float(probe.line_spacing(np.array([probe.depth / 2]))[0])
        self._margin = (  # lines, RF samples
            math.ceil(motion_mm[0] / self._pitch) + 1,
            math.ceil(motion_mm[1] / (self.dr / 2)) + 1,
        )
        ml, mr = self._margin
        self.scatterers = rng.standard_normal((n + 2 * mr, probe.lines + 2 * ml), dtype=np.float32)
        self._mk = mr // 2  # IQ rows of drift the tissue is painted for
        r_ext = (np.arange(-self._mk, m + self._mk, dtype=np.float32) + 0.5) * self.dr
        self._extended = probe.beams(r_ext, extra=ml)
        self._medium: tuple[Scene, Canvas] | None = None

        # the pulse's band (positive RF frequencies), in cycles per mm of depth
        k = np.fft.rfftfreq(n, self.dr / 2)
        k0 = 2.0 / lam
        sk = k0 * scanner.bandwidth / 2.355
        self.band = np.nonzero(np.abs(k - k0) < 2.8 * sk)[0]
        edge = math.exp(-(2.8**2) / 2)  # taken off, so the band ends at zero: no ringing
        h = np.maximum(np.exp(-((k[self.band] - k0) ** 2) / (2 * sk * sk)) - edge, 0.0)
        j0 = round(k0 * n * self.dr / 2)
        assert len(self.band) < m, "the pulse's band must fit the IQ sampling"
        self.to_base = (self.band - j0) % m  # where each band bin lands at baseband
        self.h = (2 * h * m / math.sqrt(n * float(np.sum((2 * h) ** 2)))).astype(np.complex64)
        self.impulse = float(np.sum(np.abs(self.h))) / m  # envelope peak of a unit impulse

        # lateral point-spread function: sigma in lines per depth, a few blurs to mix
        fwhm = lam * scanner.f_number * (1.0 + 1.5 * np.abs(self.r - scanner.focus) / scanner.focus)
        sig = np.clip(fwhm / 2.355 / probe.line_spacing(self.r), 0.5, 12.0)
        self.sigmas = np.geomspace(sig.min(), sig.max() + 1e-3, _SIGMAS)
        pos = np.interp(sig, self.sigmas, np.arange(_SIGMAS))
        self.lo = np.minimum(pos.astype(np.int32), _SIGMAS - 2)
        self.frac = (pos - self.lo).astype(np.float32)[:, None]
        # diffuse scatter and noise are scaled so that speckle keeps unit power after the blur
        self.diffuse_gain = np.sqrt(2 * math.sqrt(math.pi) * sig).astype(np.float32)[:, None]

        slider_at = np.linspace(0, probe.depth, len(scanner.tgc_sliders))
        tgc_db = 2 * scanner.f0 * scanner.tgc_alpha * self.r / 10 + np.interp(
            self.r, slider_at, scanner.tgc_sliders
        )
        self.tgc = (10 ** (tgc_db / 20)).astype(np.float32)[:, None]

        # scan conversion: display pixels -> (line, row) on the decimated beam grid
        h_px, w_px = layout.shape
        rows_out = math.ceil(probe.depth / layout.pixel_mm * 1.5)
        self.dec_rows = min(m, max(rows_out, 16))
        yy, xx = np.mgrid[0:h_px, 0:w_px].astype(np.float32)
        px, pz = layout.points(yy, xx)
        line, rng_mm = probe.to_beam(px, pz)
        self.map_x = line.astype(np.float32)
        self.map_y = (rng_mm / probe.depth * self.dec_rows - 0.5).astype(np.float32)
        self.pixel_x, self.pixel_z = px, pz
        self.fov = probe.contains(px, pz)

    def step_of(self, shift_mm: tuple[float, float]) -> tuple[int, int]:
        """A probe drift (mm, lateral and axial) as a step of whole lines and IQ samples,
        within ``motion_mm``."""
        ml, mk = self._margin[0], self._mk
        dl, dk = round(shift_mm[0] / self._pitch), round(shift_mm[1] / self.dr)
        return max(-ml, min(ml, dl)), max(-mk, min(mk, dk))

    def offset_mm(self, step: tuple[int, int]) -> tuple[float, float]:
        """How far (lateral, axial; mm) a ``step`` moves the probe over the scene (linear
        probes: their lines are parallel)."""
        return step[0] * self._pitch, step[1] * self.dr

    def canvas(self, scene: Scene, t: float, step: tuple[int, int] = (0, 0)) -> Canvas:
        """The scene's acoustic fields on the beam grid at time ``t``, the probe moved
        by ``step`` (lines, IQ samples) over the tissue."""
        if self._medium is None or self._medium[0] is not scene:
            whole = Canvas(*self._extended)
            scene.medium.paint(whole, t)
            self._medium = (scene, whole)
        ml, mk = self._margin[0], self._mk
        rows = slice(mk + step[1], mk + step[1] + self.rows)
        c = self._medium[1].crop(rows, slice(ml + step[0], ml + step[0] + self.probe.lines))
        for obj in scene.objects:
            obj.paint(c, t)
        return c

    def envelope(
        self, c: Canvas, rng: np.random.Generator, step: tuple[int, int] = (0, 0)
    ) -> np.ndarray:
        """Detected, compensated echo power (linear) on the beam grid (rows x lines);
        the tissue's scatterers move with ``step``."""
        s, m = self.scanner, self.rows
        att_db = (2 * s.f0 * self.dr / 10) * np.cumsum(c.alpha, axis=0)
        amp = 10 ** (-att_db / 20)
        diffuse = np.sqrt(c.echo) * amp * self.diffuse_gain
        (ml, mr), lines = self._margin, self.probe.lines
        dl, dr = step[0], 2 * step[1]
        scat = self.scatterers[mr + dr : mr + dr + 2 * m, ml + dl : ml + dl + lines]
        rf = np.repeat(diffuse, 2, axis=0) * scat
        if c.blood.any():
            blood = np.repeat(c.blood, 2, axis=0)
            rf[blood] = np.repeat(diffuse, 2, axis=0)[blood] * rng.standard_normal(
                int(blood.sum()), dtype=np.float32
            )
        # specular echoes at the top of each reflector (an interface), along every line
        on = c.spec > 0
        above = np.zeros_like(on)
        above[1:] = on[:-1]
        rows, cols = np.nonzero(on & ~above)
        rf[2 * rows, cols] += c.spec[rows, cols] * amp[rows, cols] / self.impulse
        self._reverberate(rf, c, amp)
        noise = np.repeat(self.diffuse_gain * 10 ** (s.noise_db / 20), 2, axis=0)
        rf += noise * rng.standard_normal(rf.shape, dtype=np.float32)

        spec = np.fft.rfft(rf, axis=0)[self.band] * self.h[:, None]
        base = np.zeros((m, rf.shape[1]), np.complex64)
        base[self.to_base] = spec
        iq = np.fft.ifft(base, axis=0).astype(np.complex64)
        iq = self._lateral(iq) * self.tgc
        power: np.ndarray = iq.real**2 + iq.imag**2
        return power

    def _reverberate(self, rf: np.ndarray, c: Canvas, amp: np.ndarray) -> None:
        """Echoes of strong reflectors bouncing between them and the probe face."""
        hit = c.reverb > 0
        if not hit.any():
            return
        lines = np.nonzero(hit.any(axis=0))[0]
        first = hit[:, lines].argmax(axis=0)
        a0 = c.reverb[first, lines] * amp[first, lines] / self.impulse
        period = first + round(_REVERB_LENS_MM / self.dr)
        a = a0.copy()
        for k in range(1, 400):
            a *= self.scanner.reverb_decay
            at = first + k * period
            ok = at < self.rows
            if not ok.any() or a.max() < 1e-3:
                break
            rf[2 * at[ok], lines[ok]] += a[ok]

    def _lateral(self, iq: np.ndarray) -> np.ndarray:
        """The depth-dependent lateral PSF: each row blurred with its own sigma."""
        pair = np.ascontiguousarray(iq).view(np.float32).reshape(iq.shape[0], iq.shape[1], 2)
        blurred = []
        for sigma in self.sigmas:
            k = 2 * math.ceil(3 * sigma) + 1
            blurred.append(
                cv2.GaussianBlur(
                    pair, (k, 1), sigmaX=float(sigma), sigmaY=0.0, borderType=cv2.BORDER_REFLECT
                )
            )
        stack = np.stack(blurred)  # sigmas x rows x lines x 2
        rows = np.arange(iq.shape[0])
        out = (
            stack[self.lo, rows] * (1 - self.frac[:, :, None])
            + stack[self.lo + 1, rows] * self.frac[:, :, None]
        )
        return np.ascontiguousarray(out).view(np.complex64).reshape(iq.shape)

    def grey(self, power: np.ndarray) -> np.ndarray:
        """Log compression and grey map of echo power: uint8 on the beam grid (decimated)."""
        s = self.scanner
        level = 10 * np.log10(power + 1e-12)
        lo = _LOG_MEAN_DB - s.gain_grey * s.dynamic_range / 255
        unit = np.clip((level - lo) / s.dynamic_range, 0.0, 1.0)
        if s.gamma != 1.0:
            unit **= s.gamma
        g: np.ndarray = (255 * unit).astype(np.float32)
        if self.dec_rows < self.rows:
            g = cv2.resize(g, (g.shape[1], self.dec_rows), interpolation=cv2.INTER_AREA)
        return g

    def scan_convert(self, beam_grey: np.ndarray) -> np.ndarray:
        """Beam grid -> display pixels (uint8), black outside the field of view."""
        s = self.scanner
        out = cv2.remap(
            beam_grey,
            self.map_x,
            self.map_y,
            cv2.INTER_NEAREST if s.nearest else cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )
        out[~self.fov] = 0
        if s.smooth_px > 0.3:
            out = cv2.GaussianBlur(out, (0, 0), s.smooth_px)
        result: np.ndarray = np.clip(out + 0.5, 0, 255).astype(np.uint8)
        return result

    def labels(
        self,
        scene: Scene,
        t: float,
        step: tuple[int, int] = (0, 0),
        at: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Vessel labels on the display grid, or at display pixel coordinates ``at``
        (rows, cols; fractional), 0 outside the field of view; ``step`` as for
        :meth:`canvas` (a linear probe's: lines are parallel)."""
        if at is None:
            x, z, fov = self.pixel_x, self.pixel_z, self.fov
        else:
            x, z = self.layout.points(*at)
            fov = self.probe.contains(x, z)
        dx, dz = self.offset_mm(step)
        lab = scene.labels(x + dx, z + dz, t)
        lab[~fov] = 0
        return lab

    def frame(
        self,
        scene: Scene,
        t: float,
        rng: np.random.Generator,
        step: tuple[int, int] = (0, 0),
    ) -> np.ndarray:
        """The displayed image (uint8, the layout's shape) of ``scene`` at ``t``."""
        power = self.envelope(self.canvas(scene, t, step), rng, step)
        return self.scan_convert(self.grey(power))
