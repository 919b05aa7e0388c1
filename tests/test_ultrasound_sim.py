"""The ultrasound simulator (daemon/phantoms/ultrasound.py, us_imaging.py, us_scene.py):
geometry, the physics a vessel detector must not be fooled by, the random examples, the
live phantom."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from daemon.phantoms.ultrasound import (
    ARTERY,
    KINDS,
    VEIN,
    Phantom,
    example,
    random_scanner,
)
from daemon.phantoms.us_imaging import Imager, Layout, Probe
from daemon.phantoms.us_scene import (
    Air,
    Bone,
    Cyst,
    Layer,
    Scene,
    Texture,
    Tissue,
    abdomen_layers,
    draw_scene,
    neck_layers,
)
from tests.conftest import ROOT

SHAPE = (256, 256)


def imager(probe: Probe, seed: int = 0, **settings: float) -> Imager:
    rng = np.random.default_rng(seed)
    base = random_scanner(rng, probe)
    fixed = {
        **base.__dict__,
        "gain_grey": 110.0,
        "dynamic_range": 60.0,
        "tgc_sliders": (0.0,) * 6,
        "smooth_px": 0.0,
        "nearest": False,
        "gamma": 1.0,
        **settings,
    }
    return Imager(probe, type(base)(**fixed), Layout.fill(probe, SHAPE), rng)


def tissue(rng: np.random.Generator, probe: Probe, objects: list) -> Scene:
    """Plain tissue (no distractors, no vessels) with ``objects`` on it."""
    scene = draw_scene(rng, "abdomen", probe.extent(), vessels=(), distractors=False)
    assert isinstance(scene.medium, Tissue)
    return Scene("abdomen", probe.extent(), scene.medium, objects)


def test_simulator_needs_only_numpy_and_opencv() -> None:
    """The training machine has no pydantic: the simulator must not import it."""
    code = (
        "import sys, daemon.phantoms.ultrasound, daemon.engines.guard; "
        "print(sorted(m for m in ('pydantic', 'torch', 'SimpleITK') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_curvilinear_is_a_scan_converted_sector_black_outside() -> None:
    probe = Probe("curvilinear", depth=120.0, lines=128, radius=40.0, sector=1.1)
    im = imager(probe)
    rng = np.random.default_rng(1)
    image = im.frame(tissue(rng, probe, []), 0.0, rng)
    assert (image[~im.fov] == 0).all()
    assert image[im.fov].mean() > 40
    h, w = image.shape
    assert image[h - 3, :5].max() == 0 and image[h - 3, -5:].max() == 0  # below the arc ends
    assert image[2, w // 2] == 0 or not im.fov[0, 0]  # the probe's arc, not a rectangle
    assert im.fov[h // 2, w // 2] and not im.fov[5, 2]


def test_linear_fills_its_rectangle() -> None:
    probe = Probe("linear", depth=40.0, lines=160, width=38.0)
    im = imager(probe)
    rng = np.random.default_rng(2)
    image = im.frame(tissue(rng, probe, []), 0.0, rng)
    cols = np.nonzero(im.fov.any(axis=0))[0]
    assert im.fov[:, cols].all()  # every column of the view, top to bottom
    assert image[:, cols].mean() > 40


def test_speckle_is_fully_developed_in_tissue() -> None:
    """Log-compressed Rayleigh speckle in uniform tissue: its spread is about 5.6 dB."""
    probe = Probe("linear", depth=40.0, lines=192, width=38.0)
    im = imager(probe, tgc_alpha=0.5)
    rng = np.random.default_rng(3)
    flat = Texture(rng, probe.extent(), (1.0, 1.0))
    uniform = Tissue([Layer(1e3, 0.0, 0.0, 0.5, -99.0)], flat, flat, flat)
    scene = Scene("neck", probe.extent(), uniform, [])
    power = im.envelope(im.canvas(scene, 0.0), rng)
    db = 10 * np.log10(power[100:-50, 20:-20])
    assert 5.0 < db.std() < 6.2
    assert abs(np.median(db.mean(axis=1)[:100]) - np.median(db.mean(axis=1)[-100:])) < 2.0


def test_anechoic_cyst_enhances_and_bone_shadows_what_lies_below() -> None:
    probe = Probe("linear", depth=50.0, lines=192, width=40.0)
    im = imager(probe)
    rng = np.random.default_rng(4)
    cyst = Cyst(-8.0, 18.0, 5.0, 1.0, 0.0, ((0.0, 0.0),), wall_db=-99.0, debris_db=-99.0)
    bone = Bone(6.0, 16.0, 15.0, 0.0, 8.0)
    image = im.frame(tissue(rng, probe, [cyst, bone]), 0.0, rng).astype(float)
    x, z = im.pixel_x, im.pixel_z
    inside = (x + 8.0) ** 2 + (z - 18.0) ** 2 < 4.0**2
    below_cyst = (np.abs(x + 8.0) < 3.0) & (z > 26.0) & (z < 34.0)
    below_bone = (x > 8.0) & (x < 14.0) & (z > 25.0) & (z < 34.0)
    beside = (x > -2.0) & (x < 3.0) & (z > 26.0) & (z < 34.0)
    assert image[inside].mean() < 0.3 * image[beside].mean(), "the cyst is anechoic"
    assert image[below_cyst].mean() > 1.1 * image[beside].mean(), "posterior enhancement"
    assert image[below_bone].mean() < 0.3 * image[beside].mean(), "acoustic shadow"
    surface = np.where((x > 8.0) & (x < 14.0) & (z > 14.0) & (z < 17.0), image, 0).max(axis=0)
    assert np.median(surface[surface > 0]) > 1.25 * image[beside].mean(), "a bright bone surface"


def test_air_shows_reverberation_lines_and_nothing_else() -> None:
    probe = Probe("linear", depth=40.0, lines=128, width=38.0)
    im = imager(probe)
    rng = np.random.default_rng(5)
    image = im.frame(tissue(rng, probe, [Air(-30.0, 30.0, 0.0)]), 0.0, rng).astype(float)
    profile = image[:, 100:150].mean(axis=1)
    bright = profile > 3 * np.median(profile) + 10
    runs = np.count_nonzero(np.diff(bright.astype(int)) == 1)
    assert runs >= 3, "repeated horizontal lines (A-lines)"
    assert np.median(profile) < 30


def test_vessels_pulsate_and_the_vein_is_compressed() -> None:
    ph = Phantom((256, 256), seed=0, kind="neck", fps=30.0, loop_s=4.0)
    mm2 = ph.spacing_mm**2
    artery = [np.count_nonzero(ph.frame_with_labels(i)[1] == ARTERY) * mm2 for i in range(0, 40)]
    vein = [np.count_nonzero(ph.frame_with_labels(i)[1] == VEIN) * mm2 for i in range(0, 120, 6)]
    assert max(artery) / min(artery) > 1.08  # systolic distension within a beat
    assert max(vein) / min(vein) > 1.15  # compression within the loop
    first, _ = ph.frame_with_labels(3)
    again, _ = ph.frame_with_labels(3 + ph.loop_frames)
    assert np.array_equal(first, again), "the loop repeats exactly"
    moved, _ = ph.frame_with_labels(ph.loop_frames // 4)
    assert not np.array_equal(first, moved)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_example(kind: str) -> None:
    for seed in range(3):
        ex = example(2_000_000 + seed, kind=kind)  # type: ignore[arg-type]
        assert ex.image.shape == ex.labels.shape == (256, 256) and ex.image.dtype == np.uint8
        assert set(np.unique(ex.labels)) <= {0, ARTERY, VEIN}
        if kind in ("neck", "abdomen"):
            assert set(np.unique(ex.labels)) - {0} == set(ex.vessels)
        else:
            assert not ex.labels.any() and not ex.vessels
        if kind == "blank":
            assert ex.image.std() < 60 and ex.probe == ""


def test_examples_are_deterministic_and_varied() -> None:
    a, b = example(3_000_000), example(3_000_000)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    many = [example(3_000_000 + i) for i in range(40)]
    assert {e.kind for e in many} >= {"neck", "abdomen", "water"}
    assert {e.probe for e in many} >= {"linear", "curvilinear"}
    counts = {len(e.vessels) for e in many if e.kind in ("neck", "abdomen")}
    assert counts == {0, 1, 2}


def test_vessel_lumen_is_dark_with_bright_artery_walls() -> None:
    ph = Phantom((384, 384), seed=2, kind="neck")
    image, labels = ph.frame_with_labels(0)
    import cv2

    for cls in (ARTERY, VEIN):
        lumen = (labels == cls).astype(np.uint8)
        ring = (cv2.dilate(lumen, np.ones((9, 9), np.uint8)) > 0) & (labels == 0)
        assert image[lumen > 0].mean() < 0.4 * image[ring].mean()
    art = (labels == ARTERY).astype(np.uint8)
    wall = (cv2.dilate(art, np.ones((7, 7), np.uint8)) > 0) & (art == 0)
    tissue_around = (cv2.dilate(art, np.ones((41, 41), np.uint8)) > 0) & (labels == 0) & ~wall
    assert image[wall].mean() > image[tissue_around].mean()


def test_abdomen_layers_and_neck_layers_are_ordered() -> None:
    rng = np.random.default_rng(0)
    for layers in (neck_layers(rng, 40.0), abdomen_layers(rng, 150.0)):
        bottoms = [layer.bottom for layer in layers]
        assert bottoms == sorted(bottoms)


def test_depth_dependent_psf_is_narrowest_at_the_focus() -> None:
    probe = Probe("linear", depth=60.0, lines=192, width=40.0)
    im = imager(probe, focus=30.0, f_number=2.0)
    sig = im.sigmas[im.lo] * (1 - im.frac[:, 0]) + im.sigmas[im.lo + 1] * im.frac[:, 0]
    focus_row = int(30.0 / im.dr)
    assert sig[focus_row] < sig[10] and sig[focus_row] < sig[-10]
    assert math.isclose(float(sig.min()), float(sig[focus_row]), rel_tol=0.1)


def test_sweep_moves_the_vessels_out_of_view_and_back() -> None:
    """The live phantom's probe sweep: frames with vessels in view and frames with none,
    each a good share of the loop, and the truth agrees with the label maps."""
    ph = Phantom((256, 256), seed=5, kind="neck", sweep=True)
    views = []
    for i in range(0, ph.loop_frames, 4):
        _, labels, truth = ph.frame_with_truth(i)
        views.append(truth.view)
        assert (truth.view == 0) == (not labels.any())
        if truth.view == 1:
            assert truth.shown >= 0.5
    assert views[0] == 1, "the loop starts over the vessels"
    assert views.count(1) >= 0.3 * len(views) and views.count(0) >= 0.25 * len(views)
    assert views.count(None) <= 0.15 * len(views)  # partly in view: the crossings only
    still = Phantom((256, 256), seed=5, kind="neck")
    assert all(still.frame_with_truth(i)[2].view == 1 for i in range(0, still.loop_frames, 20))


def test_sweep_needs_a_linear_probe() -> None:
    from pydantic import ValidationError

    from daemon.acquire.synthetic import SyntheticSettings

    with pytest.raises(ValueError, match=r"linear probe.*'neck'"):
        Phantom((256, 256), kind="abdomen", sweep=True)
    with pytest.raises(ValidationError, match="sweep slides a linear probe"):
        SyntheticSettings(scene="abdomen", sweep=True)


def test_the_needle_advances_toward_the_artery_with_its_tip_at_the_end_of_the_line() -> None:
    ph = Phantom((256, 256), seed=7, kind="neck", needle=True)
    artery = next(v for v in ph.scene.vessels if v.kind == ARTERY)
    assert ph.needle is not None
    assert ph.frame_with_truth(0)[2].tip is None, "withdrawn: the tip is beside the view"
    tips, gaps, shade = [], [], []
    for i in range(0, ph.loop_frames // 2 + 1, 6):
        image, _, truth = ph.frame_with_truth(i)
        if truth.tip is None or truth.tip_mm is None:
            continue
        x, y = truth.tip
        mx, mz = truth.tip_mm
        sp = ph.spacing_mm
        col, row = ph.layout.pixel(mx, mz)
        assert (col, row) == pytest.approx((x, y)) and truth.spacing == (sp, sp)
        sx, sz = ph.needle.tip(i / ph.fps)  # in the scene (the probe drifts over it)
        gaps.append(math.hypot(sx - artery.cx, sz - artery.cz) - artery.reach())
        tips.append(truth.tip)
        # 2 mm below the shaft just behind the tip: its shadow; below the path ahead: none
        ux, uz = math.cos(ph.needle.angle), math.sin(ph.needle.angle)
        k, down = np.arange(3, 12), 2.0 / sp
        behind = image[np.round(y - k * uz + down).astype(int), np.round(x - k * ux).astype(int)]
        ahead = image[np.round(y + k * uz + down).astype(int), np.round(x + k * ux).astype(int)]
        shade.append(behind.mean() / ahead.mean())
    assert len(tips) >= 6
    assert np.median(shade) < 0.7, "the shaft's shadow ends at the tip"
    assert gaps == sorted(gaps, reverse=True), "closer to the artery frame by frame"
    assert 0.5 < gaps[-1] < 2.0, "stops about 1 mm short of the artery's wall"


def test_task_examples_are_balanced_and_labelled() -> None:
    from daemon.phantoms.us_tasks import needle_example, view_example

    views = [view_example(4_000_000 + s, 128) for s in range(24)]
    classes = [v.truth.view for v in views]
    assert 8 <= classes.count(1) <= 16 and 8 <= classes.count(0) <= 16
    for v in views:
        assert v.image.shape == (128, 128)
        assert (v.truth.view == 0) == (not v.labels.any())
    needles = [needle_example(4_000_000 + s, 256) for s in range(24)]
    with_tip = [n for n in needles if n.truth.tip is not None]
    assert 8 <= len(with_tip) <= 16
    for n in with_tip:
        assert n.truth.tip is not None
        x, y = n.truth.tip
        assert 0 <= x <= 255 and 0 <= y <= 255 and n.truth.spacing is not None
        assert n.image[round(y), round(x)] > 0, "the tip is in the field of view"
    kinds = {n.kind for n in needles if n.truth.tip is None}
    assert len(kinds) >= 3
    for case in ("none", "shaft"):  # the tip beyond the view: no tip
        assert example(4_000_100, "neck", needle=case).truth.tip is None
    ex = example(4_000_100, "neck", needle="tip")
    assert ex.truth.tip is not None and ex.truth.tip_mm is not None


def test_synthetic_source_has_the_phantom_truth() -> None:
    from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource

    src = SyntheticSource(SyntheticSettings(seed=3, sweep=True, needle=True), fps=30.0)
    assert "sweep, needle" in src.description
    ph = Phantom((256, 256), seed=3, fps=30.0, sweep=True, needle=True)
    for i in (0, 37):
        frame, labels = src.frame_with_labels(i)
        image, labels_ph, truth = ph.frame_with_truth(i)
        assert np.array_equal(frame.image, image) and np.array_equal(labels, labels_ph)
        assert src.truth(i) == truth
