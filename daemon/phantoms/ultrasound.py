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
  probe drift) so that frames repeat after ``loop_s``; optionally the probe sweeps the
  vessels out of view and back (``sweep``), and a needle advances toward the artery
  and back (``needle``).

Labels follow FAST's convention: 0 background, 1 artery, 2 vein (lumens). Every frame
also has a :class:`Truth`: whether vessels are in view (``view``: the frame classifier's
class) and where the needle's tip is, in pixels and in mm. Everything is deterministic
by seed. Needs numpy and OpenCV only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from daemon.phantoms.us_imaging import Imager, Layout, Probe, Scanner
from daemon.phantoms.us_scene import (
    ARTERY,
    VEIN,
    Air,
    Bone,
    Needle,
    Scene,
    SceneKind,
    Vessel,
    draw_scene,
)

__all__ = [
    "ARTERY",
    "KINDS",
    "NET_SIZE",
    "VEIN",
    "Example",
    "Phantom",
    "Truth",
    "example",
    "place_needle",
]

NET_SIZE = 256  # the bundled model's input (h = w)
ExampleKind = Literal["neck", "abdomen", "water", "fluid", "air", "blank"]
KINDS: tuple[ExampleKind, ...] = ("neck", "abdomen", "water", "fluid", "air", "blank")
KIND_P = (0.36, 0.30, 0.11, 0.08, 0.08, 0.07)  # how often training draws each
MAX_LOOP_FPS = 60.0  # frames per second of motion a synthetic loop holds at most
VIEW_SHOWN = 0.5  # vessels are "in view" when one shows at least this share of its lumen
NEEDLE_ANGLES = (0.2, 0.8)  # radians from the horizontal, in-plane insertions
NeedleCase = Literal["tip", "shaft", "none"]  # what example() draws of a needle


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
class Truth:
    """What a frame shows besides its label map, in that frame's pixels.

    ``view``: 1 vessels in view (one shows at least :data:`VIEW_SHOWN` of its lumen), 0
    none (no vessel pixel), None between (a vessel only partly in view: not scored).
    ``tip``: the needle's tip (x, y) in pixels (pixel centres at whole numbers), None when
    no tip is in view (no needle, the tip outside the field of view or in a shadow);
    ``tip_mm``: the same point (lateral, depth) in mm from the probe's centre at the skin.
    ``spacing``: mm per pixel (rows, columns); None for a blank frame.
    """

    view: int | None = 0
    shown: float = 0.0  # the largest share of a vessel's lumen in view
    tip: tuple[float, float] | None = None
    tip_mm: tuple[float, float] | None = None
    spacing: tuple[float, float] | None = None


@dataclass(frozen=True)
class Example:
    """One simulated frame at the network's size, its labels and what it shows."""

    image: np.ndarray  # uint8, NET_SIZE x NET_SIZE
    labels: np.ndarray  # uint8: 0 background, 1 artery, 2 vein
    kind: ExampleKind
    probe: str  # linear, curvilinear, or "" for a blank frame
    vessels: tuple[int, ...]  # the vessel kinds in the scene
    dark: bool = False  # the gain turned far down
    truth: Truth = field(default_factory=Truth)


def example(
    seed: int,
    kind: ExampleKind | None = None,
    size: int = NET_SIZE,
    *,
    vessels: Sequence[int] | None = None,
    needle: NeedleCase | None = None,
    dark: bool | None = None,
    wide: bool = False,
) -> Example:
    """A random frame of ``seed`` (``kind`` drawn with :data:`KIND_P` unless given), at
    ``size`` x ``size`` as the Segmenter would feed it to the network.

    ``vessels``: the vessel kinds of a neck or abdomen scene (None: drawn); ``needle``:
    "tip" for exactly one needle whose tip is in view (:func:`place_needle`), "shaft" for
    one that crosses the view with its tip beyond it, "none" for none, None as drawn (a
    needle is one of the distractors); ``dark``: the gain turned
    far down (no vessels then), None: drawn; ``wide``: vessels placed over a width
    1.8 times the field of view's, so that they may be cut by its edges or outside it.
    """
    rng = np.random.default_rng([seed, 7])
    k: ExampleKind = kind or KINDS[int(rng.choice(len(KINDS), p=KIND_P))]
    if k == "blank":
        if needle not in (None, "none"):
            raise ValueError("a blank frame cannot show a needle")
        return _blank(rng, size)
    probe = random_probe(rng, k)
    drawn_dark = rng.random() < 0.08  # nothing can be seen: no vessel to find either
    dark = drawn_dark if dark is None else dark
    scanner = random_scanner(rng, probe, dark=dark)
    layout = random_layout(rng, probe)
    extent = probe.extent()
    if wide:
        x0, x1, depth = extent
        extent = (x0 - 0.4 * (x1 - x0), x1 + 0.4 * (x1 - x0), depth)
    scene = draw_scene(
        rng, k, extent, vessels=() if dark else vessels, inside=None if wide else probe.contains
    )
    if needle is not None:
        scene.objects = [o for o in scene.objects if not isinstance(o, Needle)]
        if needle != "none":
            place_needle(rng, scene, probe, layout, tip=needle == "tip")
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
    spacing = (layout.pixel_mm * h / size, layout.pixel_mm * w / size)
    truth = _truth(scene, t, probe, layout, labels, spacing, scale=(size / w, size / h))
    kinds = tuple(v.kind for v in scene.vessels)
    return Example(image, labels, k, probe.kind, kinds, dark, truth)


def _blank(rng: np.random.Generator, size: int) -> Example:
    """A frame with no image: black, one grey level, or only the screen's annotations."""
    image = np.zeros((size, size), np.uint8)
    what = rng.random()
    if what < 0.25:
        image[:] = int(rng.integers(0, 256))
    elif what < 0.6:
        annotate(rng, image, np.zeros_like(image, bool))
    return Example(image, np.zeros_like(image), "blank", "", ())


def _truth(
    scene: Scene,
    t: float,
    probe: Probe,
    layout: Layout,
    labels: np.ndarray,
    spacing: tuple[float, float],
    scale: tuple[float, float] = (1.0, 1.0),
    offset: tuple[float, float] = (0.0, 0.0),
) -> Truth:
    """The :class:`Truth` of a frame whose ``labels`` have ``spacing``; ``scale``: the
    frame's pixels per display pixel (x, y); ``offset``: where the probe has moved over
    the scene (mm, lateral and axial)."""
    shown = vessels_shown(scene.vessels, t, labels, spacing[0] * spacing[1])
    view = 0 if shown == 0 else 1 if shown >= VIEW_SHOWN else None
    tip_mm = visible_tip(scene, t, probe, offset)
    tip = None
    if tip_mm is not None:
        col, row = layout.pixel(*tip_mm)
        x, y = (col + 0.5) * scale[0] - 0.5, (row + 0.5) * scale[1] - 0.5
        h, w = labels.shape
        if 0 <= x <= w - 1 and 0 <= y <= h - 1:
            tip = (x, y)
    return Truth(view, shown, tip, tip_mm if tip else None, spacing)


def vessels_shown(
    vessels: Sequence[Vessel], t: float, labels: np.ndarray, pixel_mm2: float
) -> float:
    """The largest share of a vessel's lumen (at time ``t``) that ``labels`` show."""
    out = 0.0
    for v in vessels:
        a, b, _ = v.axes(t)
        out = max(out, np.count_nonzero(labels == v.kind) * pixel_mm2 / (math.pi * a * b))
    return min(out, 1.0)


def visible_tip(
    scene: Scene, t: float, probe: Probe, offset: tuple[float, float] = (0.0, 0.0)
) -> tuple[float, float] | None:
    """The tip (x, z; mm, from the probe at ``offset`` over the scene) of the first needle
    whose tip is in the field of view with no bone or air above it on its beam."""
    blockers = [o for o in scene.objects if isinstance(o, Bone | Air)]
    for needle in (o for o in scene.objects if isinstance(o, Needle)):
        sx, sz = needle.tip(t)
        x, z = np.array([sx - offset[0]]), np.array([sz - offset[1]])
        if not probe.contains(x, z)[0]:
            continue
        line, r = probe.to_beam(x, z)
        above = np.linspace(0.0, max(float(r[0]) - 0.5, 0.0), 48)
        bx, bz = probe.position(np.full_like(above, line[0]), above)
        if any(o.blocks(bx + offset[0], bz + offset[1]).any() for o in blockers):
            continue
        return float(x[0]), float(z[0])
    return None


def place_needle(
    rng: np.random.Generator, scene: Scene, probe: Probe, layout: Layout, tip: bool = True
) -> Needle:
    """Add a needle to ``scene`` (painted over everything) whose tip lies in the field of
    view and on the display, at least 1 mm inside; bone and air that would shadow the
    tip are taken out of the scene. ``tip`` False: the tip beyond the view's side or
    bottom, the shaft crossing the view."""
    h, w = layout.shape
    for _ in range(100):
        if tip:
            line = rng.uniform(0.06, 0.94) * (probe.lines - 1)
            r = rng.uniform(0.06, 0.88) * probe.depth
        else:
            below = rng.random() < 0.3
            side = rng.uniform(1.03, 1.3) if rng.random() < 0.5 else rng.uniform(-0.3, -0.03)
            line = (rng.uniform(0.1, 0.9) if below else side) * (probe.lines - 1)
            r = (rng.uniform(1.03, 1.2) if below else rng.uniform(0.1, 0.8)) * probe.depth
        tx, tz = (float(v[0]) for v in probe.position(np.array([line]), np.array([r])))
        col, row = layout.pixel(tx, tz)
        if not tip or (
            1.0 / layout.pixel_mm <= col <= w - 1 - 1.0 / layout.pixel_mm and 0 <= row < h - 2
        ):
            break
    angle = rng.uniform(*NEEDLE_ANGLES)
    from_left = rng.random() < 0.5
    if not tip and not 0 <= line <= probe.lines - 1:  # beyond a side: from the other one
        from_left = line > 0
    run = tz / math.tan(angle)
    needle = Needle(
        tx - run if from_left else tx + run,
        angle if from_left else math.pi - angle,
        tz / math.sin(angle),
        rng.uniform(0.4, 1.0),
        int(rng.integers(2, 8)),
    )
    scene.objects.append(needle)
    if visible_tip(scene, 0.0, probe) is None:  # shadowed: take the shadows away
        scene.objects = [o for o in scene.objects if not isinstance(o, Bone | Air)]
    return needle


class Phantom:
    """A live scene: one seed's scene, probe and scanner, imaged at ``shape`` (h, w) with
    the field of view filling it (square pixels).

    Motion repeats every ``loop_s`` seconds: the heart rate is rounded to whole beats per
    loop, the vein is compressed once per loop, a linear probe drifts and comes back
    (in whole lines and IQ samples, with the tissue's speckle; the medium is painted
    once). Blood
    speckle is drawn from the frame's place in the loop, so frame ``i`` and frame
    ``i + loop`` are identical (a source may cache one loop).

    ``sweep`` (a linear probe): the probe also slides sideways once per loop, from the
    vessels to where none is in view (about a third of the loop) and back. ``needle``: a
    needle enters beside the probe, advances in plane toward the artery (the scene's
    middle when there is none), stops short of its wall and is withdrawn, once per loop;
    its tip is out of view at the start of the loop (with ``sweep``: half-way through,
    while the probe is away from the vessels).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        seed: int = 0,
        kind: SceneKind = "neck",
        fps: float = 30.0,
        loop_s: float = 4.0,
        motion_mm: tuple[float, float] = (1.5, 0.5),
        sweep: bool = False,
        needle: bool = False,
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
        if sweep and self.probe.kind != "linear":
            raise ValueError(
                f"sweep slides a linear probe; scene {kind!r} is imaged through a "
                "curvilinear one: use scene 'neck' (or sweep off)"
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
        self.sweep_mm = _sweep_distance(self.scene.vessels, self.probe) if sweep else 0.0
        margin = (abs(motion_mm[0]) + abs(self.sweep_mm), motion_mm[1])
        self.imager = Imager(self.probe, self.scanner, self.layout, rng, margin)
        self.needle = (
            _aim_needle(
                np.random.default_rng([seed, 23]),
                self.scene,
                self.probe,
                self.loop_s,
                math.pi if sweep else 0.0,
                abs(motion_mm[0]) + 1.0,
            )
            if needle
            else None
        )
        self.seed = seed

    @property
    def spacing_mm(self) -> float:
        return self.layout.pixel_mm

    def shift(self, t: float) -> tuple[float, float]:
        """Probe drift (mm) at time ``t``: lateral and axial, periodic over the loop; the
        sweep's travel added to the lateral."""
        (ax, az), (px, pz) = self._drift
        w = 2 * math.pi / self.loop_s
        lateral = ax * math.sin(w * t + px)
        if self.sweep_mm:
            s = min(max((0.5 - 0.5 * math.cos(w * t) - 0.25) / 0.5, 0.0), 1.0)
            lateral += self.sweep_mm * s * s * (3 - 2 * s)  # smoothstep: a third out of view
        return lateral, az * math.sin(2 * w * t + pz)

    def frame_with_truth(self, index: int) -> tuple[np.ndarray, np.ndarray, Truth]:
        """Frame ``index`` (uint8), its labels and its :class:`Truth`; a pure function of
        the index."""
        i = index % self.loop_frames
        t = i / self.fps
        step = self.imager.step_of(self.shift(t))
        rng = np.random.default_rng([self.seed, 13, i])
        image = self.imager.frame(self.scene, t, rng, step)
        labels = self.imager.labels(self.scene, t, step)
        sp = self.layout.pixel_mm
        offset = self.imager.offset_mm(step)
        return (
            image,
            labels,
            _truth(self.scene, t, self.probe, self.layout, labels, (sp, sp), offset=offset),
        )

    def frame_with_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``index`` (uint8) and its labels; a pure function of the index."""
        image, labels, _ = self.frame_with_truth(index)
        return image, labels


def _sweep_distance(vessels: Sequence[Vessel], probe: Probe) -> float:
    """How far (mm, signed: + to the right) the probe slides until no vessel is in view:
    the shorter way; half the width when there is no vessel."""
    x0, x1, _ = probe.extent()
    if not vessels:
        return (x1 - x0) / 2
    right = max(v.cx + v.reach() for v in vessels) - x0 + 1.0
    left = x1 - min(v.cx - v.reach() for v in vessels) + 1.0
    return right if right <= left else -left


def _aim_needle(
    rng: np.random.Generator,
    scene: Scene,
    probe: Probe,
    loop_s: float,
    phase: float,
    beyond: float,
) -> Needle:
    """A needle entering the skin beside the probe, aimed in plane at the artery (or the
    middle of the view), whose tip advances from ``beyond`` mm outside the view (the
    probe's drift and more) to 1 mm short of the artery's wall and back once per loop,
    withdrawn at the loop's ``phase`` (radians); ``scene`` gets it."""
    x0, x1, depth = probe.extent()
    arteries = [v for v in scene.vessels if v.kind == ARTERY]
    if arteries:
        target, stop = (arteries[0].cx, arteries[0].cz), arteries[0].reach() + 1.0
    else:
        target, stop = (rng.uniform(0.3 * x0, 0.3 * x1), rng.uniform(0.4, 0.7) * depth), 0.0
    out = beyond + rng.uniform(2.0, 6.0)  # the entry, mm beside the field of view
    entries = (x0 - out, x1 + out)
    angles = [math.atan2(target[1], abs(target[0] - e)) for e in entries]
    side = int(np.argmin([abs(a - 0.55) for a in angles]))  # nearer a 30 degree insertion
    entry, angle = entries[side], angles[side]
    length = math.hypot(target[0] - entry, target[1]) - stop
    outside = (out - beyond) / math.cos(angle)  # withdrawn: the tip beside the view
    needle = Needle(
        entry,
        angle if side == 0 else math.pi - angle,
        length,
        rng.uniform(0.5, 0.9),
        int(rng.integers(3, 7)),
        advance_mm=max(length - outside, 0.0),
        advance_hz=1.0 / loop_s,
        advance_phase=phase,
    )
    scene.objects.append(needle)
    return needle
