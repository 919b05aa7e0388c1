"""The ultrasound simulator: randomised B-mode frames with vessel labels.

The physics is in :mod:`daemon.phantoms.us_imaging` (the convolution model: scatterers,
depth-dependent point-spread function, envelope detection, log compression,
time-gain compensation, scan conversion) and the anatomy in
:mod:`daemon.phantoms.us_scene` (tissue layers, a pulsating artery, a compressible
vein, and the things that are not vessels: water, fluid, cysts, bone and its shadow,
reverberation, needles, air). This module draws them at random:

- :func:`example` is one training or test frame of a seed: a scene kind (neck or
  abdomen with zero, one or two vessels, water, a fluid collection, air, a blank
  frame), a probe (linear, or curvilinear and scan-converted), scanner settings
  (frequency, depth, gain, dynamic range, focus, TGC; a dark frame at times), a
  display layout (size, aspect ratio, margins, screen annotations), resized to the
  network's 256 x 256 exactly as the Segmenter resizes frames.
- :class:`Phantom` is a live sequence (what ``echod run`` shows with no source): one
  scene, probe and scanner of a seed, moving periodically (heart beat, vein compression,
  probe drift) so that frames repeat after ``loop_s``.

Labels follow FAST's convention: 0 background, 1 artery, 2 vein (lumens). Everything is
deterministic by seed. Needs numpy and OpenCV only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from daemon.phantoms.us_imaging import Imager, Layout, Probe, Scanner
from daemon.phantoms.us_scene import ARTERY, VEIN, Scene, SceneKind, draw_scene

__all__ = ["ARTERY", "KINDS", "NET_SIZE", "VEIN", "Example", "Phantom", "example"]

NET_SIZE = 256  # the bundled model's input (h = w)
ExampleKind = Literal["neck", "abdomen", "water", "fluid", "air", "blank"]
KINDS: tuple[ExampleKind, ...] = ("neck", "abdomen", "water", "fluid", "air", "blank")
KIND_P = (0.36, 0.30, 0.11, 0.08, 0.08, 0.07)  # how often training draws each
MAX_LOOP_FPS = 60.0  # frames per second of motion a synthetic loop holds at most


def random_probe(rng: np.random.Generator, kind: SceneKind) -> Probe:
    """A probe for ``kind``: linear high-frequency for the neck, mostly curvilinear for the
    abdomen and fluid, either for water and air."""
    curved = {"neck": 0.1, "abdomen": 0.85, "fluid": 0.85}.get(kind, 0.5)
    if rng.random() < curved:
        return Probe(
            "curvilinear",
            depth=rng.uniform(70.0, 170.0) if kind != "neck" else rng.uniform(40.0, 70.0),
            lines=int(rng.integers(96, 192)),
            radius=rng.uniform(15.0, 70.0),
            sector=rng.uniform(0.8, 1.35),
        )
    width = rng.uniform(30.0, 50.0)
    return Probe(
        "linear",
        depth=rng.uniform(25.0, 55.0) if kind != "abdomen" else rng.uniform(45.0, 80.0),
        lines=int(np.clip(round(width / rng.uniform(0.15, 0.35)), 96, 256)),
        width=width,
    )


def random_scanner(rng: np.random.Generator, probe: Probe, dark: bool = False) -> Scanner:
    """Settings a sonographer might use for ``probe`` (lower frequency deeper); ``dark``:
    the gain turned far down."""
    top = 13.0 if probe.depth < 45 else 9.0 if probe.depth < 80 else 5.5
    f0 = rng.uniform(max(2.5, top - 5.0), top)
    return Scanner(
        f0=f0,
        bandwidth=rng.uniform(0.45, 0.75),
        focus=rng.uniform(0.3, 0.8) * probe.depth,
        f_number=rng.uniform(1.2, 3.0),
        gain_grey=rng.uniform(3.0, 30.0) if dark else rng.uniform(55.0, 150.0),
        dynamic_range=rng.uniform(40.0, 80.0),
        tgc_alpha=rng.uniform(0.4, 0.85),
        tgc_sliders=tuple(rng.normal(0.0, 2.5, 6)),
        noise_db=rng.uniform(-95.0, -65.0),
        reverb_decay=rng.uniform(0.35, 0.65),
        gamma=rng.uniform(0.75, 1.3),
        smooth_px=rng.uniform(0.0, 1.2) if rng.random() < 0.5 else 0.0,
        nearest=bool(rng.random() < 0.3),
    )


def random_layout(rng: np.random.Generator, probe: Probe) -> Layout:
    """A display: mostly 256-1024 pixels of any aspect with margins; sometimes the field
    of view filling a square (as the live source shows it)."""
    if rng.random() < 0.3:
        size = int(rng.choice([256, 320, 384, 512]))
        return Layout.fill(probe, (size, size))
    h = int(rng.integers(256, 720))
    w = int(np.clip(h * rng.uniform(0.8, 1.6), 256, 1024))
    lay = Layout.fill(probe, (h, w), margin=rng.uniform(0.0, 0.25))
    shift = rng.uniform(-0.1, 0.1) * w
    return Layout(lay.shape, lay.pixel_mm, lay.col0 + shift, lay.row0 * rng.uniform(0.3, 1.5))


def annotate(rng: np.random.Generator, image: np.ndarray, fov: np.ndarray) -> None:
    """What scanners print around the image: text in the corners, depth marks beside
    the field of view (never over it)."""
    h, w = image.shape
    marks = np.zeros_like(image)
    colour = int(rng.integers(120, 256))
    scale = max(0.3, h / 900)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .-"
    for corner in range(int(rng.integers(1, 4))):
        text = "".join(rng.choice(list(letters), int(rng.integers(4, 14))))
        x = 4 if corner % 2 == 0 else w - int(w * 0.3)
        y = int(14 * scale / 0.4) if corner < 2 else h - 6
        cv2.putText(marks, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    cols = np.nonzero(fov.any(axis=0))[0]
    if len(cols) and cols[-1] + 6 < w:
        x = int(cols[-1]) + 4
        for y in range(int(rng.integers(5, 30)), h, int(rng.integers(20, 60))):
            cv2.circle(marks, (x, y), 1, colour, -1)
    put = (marks > 0) & ~fov
    image[put] = marks[put]


@dataclass(frozen=True)
class Example:
    """One simulated frame at the network's size, its labels and what it shows."""

    image: np.ndarray  # uint8, NET_SIZE x NET_SIZE
    labels: np.ndarray  # uint8: 0 background, 1 artery, 2 vein
    kind: ExampleKind
    probe: str  # linear, curvilinear, or "" for a blank frame
    vessels: tuple[int, ...]  # the vessel kinds in the scene
    dark: bool = False  # the gain turned far down


def example(seed: int, kind: ExampleKind | None = None, size: int = NET_SIZE) -> Example:
    """A random frame of ``seed`` (``kind`` drawn with :data:`KIND_P` unless given), at
    ``size`` x ``size`` as the Segmenter would feed it to the network."""
    rng = np.random.default_rng([seed, 7])
    k: ExampleKind = kind or KINDS[int(rng.choice(len(KINDS), p=KIND_P))]
    if k == "blank":
        return _blank(rng, size)
    probe = random_probe(rng, k)
    dark = rng.random() < 0.08  # nothing can be seen: no vessel to find either
    scanner = random_scanner(rng, probe, dark=dark)
    layout = random_layout(rng, probe)
    scene = draw_scene(rng, k, probe.extent(), vessels=() if dark else None, inside=probe.contains)
    imager = Imager(probe, scanner, layout, rng)
    t = rng.uniform(0.0, 10.0)
    canvas = imager.frame(scene, t, rng)
    if rng.random() < 0.5:
        annotate(rng, canvas, imager.fov)
    h, w = layout.shape
    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    rows, cols = np.meshgrid(centres * h - 0.5, centres * w - 0.5, indexing="ij")
    labels = imager.labels(scene, t, at=(rows, cols))
    return Example(image, labels, k, probe.kind, tuple(v.kind for v in scene.vessels), dark)


def _blank(rng: np.random.Generator, size: int) -> Example:
    """A frame with no image: black, one grey level, or only the screen's annotations."""
    image = np.zeros((size, size), np.uint8)
    what = rng.random()
    if what < 0.25:
        image[:] = int(rng.integers(0, 256))
    elif what < 0.6:
        annotate(rng, image, np.zeros_like(image, bool))
    return Example(image, np.zeros_like(image), "blank", "", ())


class Phantom:
    """A live scene: one seed's scene, probe and scanner, imaged at ``shape`` (h, w) with
    the field of view filling it (square pixels).

    Motion repeats every ``loop_s`` seconds: the heart rate is rounded to whole beats per
    loop, the vein is compressed once per loop, a linear probe drifts and comes back
    (in whole lines and IQ samples, with the tissue's speckle; the medium is painted
    once). Blood
    speckle is drawn from the frame's place in the loop, so frame ``i`` and frame
    ``i + loop`` are identical (a source may cache one loop).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        seed: int = 0,
        kind: SceneKind = "neck",
        fps: float = 30.0,
        loop_s: float = 4.0,
        motion_mm: tuple[float, float] = (1.5, 0.5),
    ) -> None:
        rng = np.random.default_rng([seed, 11])
        # a loop holds at most MAX_LOOP_FPS frames a second of motion: a source paced faster
        # (a benchmark) replays it faster instead of rendering every frame anew
        self.kind, self.fps = kind, min(fps, MAX_LOOP_FPS)
        self.loop_frames = max(1, round(loop_s * self.fps))
        self.loop_s = self.loop_frames / self.fps
        if kind == "abdomen":
            self.probe = Probe(
                "curvilinear",
                depth=rng.uniform(110, 150),
                lines=128,
                radius=rng.uniform(40, 60),
                sector=rng.uniform(1.0, 1.2),
            )
        else:
            self.probe = Probe(
                "linear", depth=rng.uniform(38.0, 45.0), lines=128, width=rng.uniform(36.0, 42.0)
            )
        base = random_scanner(rng, self.probe)
        self.scanner = Scanner(
            **{
                **base.__dict__,
                "gain_grey": rng.uniform(95, 120),
                "dynamic_range": rng.uniform(55, 65),
                "smooth_px": 0.0,
                "nearest": False,
                "gamma": 1.0,
            }
        )
        self.layout = Layout.fill(self.probe, shape)
        self.scene: Scene = draw_scene(
            rng,
            kind,
            self.probe.extent(),
            vessels=(ARTERY, VEIN) if kind in ("neck", "abdomen") else None,
            distractors=False,
            inside=self.probe.contains,
        )
        for v in self.scene.vessels:  # motion periodic over the loop
            v.heart_hz = max(1, round(v.heart_hz * self.loop_s)) / self.loop_s
            v.press_hz = 1.0 / self.loop_s
        self.heart_rate_hz = self.scene.vessels[0].heart_hz if self.scene.vessels else 0.0
        self._drift = (
            motion_mm,
            (rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        )
        if self.probe.kind != "linear":
            motion_mm = (0.0, 0.0)  # a sector's lines are not parallel: no drift
        self._drift = (motion_mm, self._drift[1])
        self.imager = Imager(self.probe, self.scanner, self.layout, rng, motion_mm)
        self.seed = seed

    @property
    def spacing_mm(self) -> float:
        return self.layout.pixel_mm

    def shift(self, t: float) -> tuple[float, float]:
        """Probe drift (mm) at time ``t``: lateral and axial, periodic over the loop."""
        (ax, az), (px, pz) = self._drift
        w = 2 * math.pi / self.loop_s
        return ax * math.sin(w * t + px), az * math.sin(2 * w * t + pz)

    def frame_with_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``index`` (uint8) and its labels; a pure function of the index."""
        i = index % self.loop_frames
        t = i / self.fps
        step = self.imager.step_of(self.shift(t))
        rng = np.random.default_rng([self.seed, 13, i])
        image = self.imager.frame(self.scene, t, rng, step)
        return image, self.imager.labels(self.scene, t, step)
