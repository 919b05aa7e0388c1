"""The bundled ultrasound model's gates and its uncertainty guard.

Gates (issue 12): on the real recordings in ../shared/data/us, which show no vessel, the
model labels at most 1 % of the pixels artery or vein, alone and behind the guard; on
fresh simulator seeds (never used in training or calibration: those are below
1,000,000) its Dice is at least 0.85 per vessel class on the frames that contain it.
The guard withholds blank frames, pure noise and a CT slice shown as an image.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from daemon.acquire.metaimage import MetaImageSequence
from daemon.engines.card import load_card
from daemon.engines.guard import (
    FEATURES,
    Guard,
    as_plane,
    domain_features,
    finding_confidence,
    probabilities,
)
from daemon.engines.network import Network, domain_workers
from daemon.engines.segmenter import Segmenter
from daemon.errors import ModelError
from daemon.models import BUNDLED, ULTRASOUND
from daemon.phantoms.ultrasound import ARTERY, VEIN, example
from tests.conftest import DATA, ROOT, Echod, need_data

FRESH = 1_000_000
RECORDINGS = (
    "WaterTankBottomTranslationVideoBuffer.igs.mha",
    "UltrasonixCurvilinearScanConvertedData.igs.mha",
)


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.open(BUNDLED / ULTRASOUND, engine="onnxruntime")


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    return 2.0 * float((p & t).sum()) / max(1, int(p.sum() + t.sum()))


@pytest.mark.parametrize("name", RECORDINGS)
def test_gate_real_recordings_get_almost_no_vessel_pixels(seg: Segmenter, name: str) -> None:
    """Every fourth frame of the water tank (201 frames), every frame of the curvilinear
    scan; ``measure`` writes the figure over all frames on the card."""
    source = MetaImageSequence(need_data(DATA / "us" / name))
    try:
        frames = [f.image for i, f in enumerate(source.frames()) if i % 4 == 0 or "Curv" in name]
    finally:
        source.close()
    alone, guarded = [], []
    for image in frames:
        x = seg.prepare(image)
        out = seg.infer(x)
        labels = seg.finish(out, image.shape)
        shown, _ = seg.finish_guarded(out, image.shape, x)
        assert labels.shape == image.shape[:2] and labels.max() <= 2
        alone.append(float((labels > 0).mean()))
        guarded.append(float((shown > 0).mean()))
    assert np.mean(alone) <= 0.01, f"model alone: {np.mean(alone):.4f}"
    assert np.mean(guarded) <= 0.01, f"model + guard: {np.mean(guarded):.4f}"


def test_gate_dice_on_fresh_simulator_seeds(seg: Segmenter) -> None:
    scores: dict[int, list[float]] = {ARTERY: [], VEIN: []}
    seed = FRESH
    while min(len(v) for v in scores.values()) < 20:
        ex = example(seed)
        seed += 1
        if not ex.vessels:
            continue
        pred = seg.segment(ex.image)
        for label, values in scores.items():
            if (ex.labels == label).any():
                values.append(dice(pred, ex.labels, label))
    assert np.mean(scores[ARTERY]) >= 0.85, np.round(scores[ARTERY], 3)
    assert np.mean(scores[VEIN]) >= 0.85, np.round(scores[VEIN], 3)


def test_card_states_use_data_limits_gates_and_thresholds() -> None:
    card = load_card(BUNDLED / ULTRASOUND)
    assert "not for" in card.intended_use.lower() and "simulated" in card.training_data.lower()
    assert "no real image" in card.training_data.lower() and card.limits
    assert card.guard is not None and 0.5 < card.guard.min_confidence < 1.0
    assert set(card.guard.domain) == set(FEATURES)
    held = card.evaluation["held_out"]
    assert held["dice_artery"] >= 0.85 and held["dice_vein"] >= 0.85
    real = card.evaluation["real_data"]
    assert set(real) == {n.split(".")[0] for n in RECORDINGS}
    for figures in real.values():
        assert figures["vessel_fraction"] <= 0.01 and figures["vessel_fraction_guarded"] <= 0.01
    assert (BUNDLED / ULTRASOUND).stat().st_size < 10e6


def ct_slice(path: Path) -> np.ndarray:
    """A CT slice as a viewer shows it: its own display window to 8-bit grey."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    grey = np.clip((hu - centre + width / 2) / width, 0.0, 1.0) * 255
    return grey.astype(np.uint8)


def wrong_frames() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    frames = [
        ("blank", np.zeros((616, 820), np.uint8)),
        ("grey", np.full((480, 640), 128, np.uint8)),
        ("uniform noise", rng.integers(0, 256, (480, 640), dtype=np.uint8)),
        ("gaussian noise", np.clip(rng.normal(100, 40, (480, 640)), 0, 255).astype(np.uint8)),
    ]
    ct = DATA / "ct" / "ct-3slice"
    if ct.is_dir():
        frames += [(f"CT {p.name}", ct_slice(p)) for p in sorted(ct.glob("*.dcm"))]
    return frames


@pytest.mark.parametrize(("what", "image"), wrong_frames(), ids=lambda v: str(v)[:16])
def test_guard_withholds_frames_that_are_not_its_ultrasound(
    seg: Segmenter, what: str, image: np.ndarray
) -> None:
    labels, verdict = seg.segment_guarded(image)
    assert not verdict.confident, f"{what} passed the guard"
    assert verdict.reason.startswith(("out of domain", "low confidence"))
    assert not labels.any() and labels.shape == image.shape[:2]


def test_guard_has_a_ct_slice_to_judge() -> None:
    need_data(DATA / "ct" / "ct-3slice" / "01.dcm")
    assert any(what.startswith("CT") for what, _ in wrong_frames())


def test_guard_passes_most_fresh_simulated_frames_with_vessels(seg: Segmenter) -> None:
    shown = []
    for seed in range(FRESH + 500, FRESH + 560):
        ex = example(seed)
        if ex.vessels and ex.kind in ("neck", "abdomen"):
            labels, verdict = seg.segment_guarded(ex.image)
            shown.append(verdict.confident)
            if verdict.confident:
                assert labels.any()
    assert len(shown) >= 20 and np.mean(shown) >= 0.8, shown


def test_guard_checks_one_by_one() -> None:
    """Domain statistics and confidence, with hand-made thresholds."""
    image = example(FRESH, kind="neck").image.astype(np.float32) / 255.0
    feats = domain_features(image)
    assert 0.3 < feats["fov_fraction"] <= 1.0 and feats["neighbour_corr"] > 0.5
    wide = {k: (v - 1.0, v + 1.0) for k, v in feats.items()}
    sure = np.zeros((3, 8, 8), np.float32)
    sure[0] = 1.0
    sure[:, 2:4, 2:4] = [[[0.02]], [[0.96]], [[0.02]]]
    assert finding_confidence(sure) == (pytest.approx(0.96), 4)
    assert Guard(0.9, wide).judge(image, sure).confident
    low = Guard(0.97, wide).judge(image, sure)
    assert not low.confident and low.reason == "low confidence 0.960 < 0.970"
    narrow = {**wide, "fov_mean": (0.0, feats["fov_mean"] / 2)}
    far = Guard(0.5, narrow).judge(image, sure)
    assert not far.confident and far.reason.startswith("out of domain: fov_mean")
    nothing = np.zeros((3, 8, 8), np.float32)
    nothing[0] = 1.0
    assert Guard(0.99, wide).judge(image, nothing).confidence == 1.0  # no finding, no doubt


def test_card_guard_section_is_validated(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    model.with_suffix(".toml").write_text(
        "[guard]\nmin_confidence = 0.9\n[guard.domain]\nfov_fractoin = [0.1, 1.0]\n"
    )
    with pytest.raises(ModelError, match=r"unknown statistic 'fov_fractoin'.*fov_fraction"):
        load_card(model)
    model.with_suffix(".toml").write_text("[guard]\nmin_confidence = 1.5\n")
    with pytest.raises(ModelError, match=r"guard\.min_confidence"):
        load_card(model)


def test_guard_sees_the_frame_as_the_network_does(seg: Segmenter) -> None:
    """A frame of another size is judged on its resized network input."""
    ex = example(FRESH + 3, kind="neck")
    big = cv2.resize(ex.image, (820, 616), interpolation=cv2.INTER_LINEAR)
    _, small = seg.segment_guarded(ex.image)
    _, large = seg.segment_guarded(big)
    assert small.confident == large.confident


def test_echod_run_withholds_the_water_tank_and_says_why(run_echod: type[Echod]) -> None:
    rec = need_data(DATA / "us" / RECORDINGS[0])
    e = run_echod(
        "run", "--source", str(rec), "--frames", "10", "--mode", "all", "--headless", "--json"
    )
    code, _ = e.finish()
    assert code == 0, "".join(e.stderr)
    assert any("overlay withheld: out of domain" in line for line in e.stderr)


def test_echod_run_without_the_bundled_model_fails_clearly(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    """A copy of the package whose model is gone: one line naming the problem and the fix,
    exit 65 (a model error), no run on random weights."""
    shutil.copytree(ROOT / "daemon", tmp_path / "daemon", ignore=shutil.ignore_patterns("*.pyc"))
    (tmp_path / "daemon" / "models" / ULTRASOUND).unlink()
    e = run_echod("run", "--headless", "--frames", "3", cwd=tmp_path)
    e.proc.wait(120)
    code, _ = e.finish()
    errors = [line for line in e.stderr if "ultrasound-seg.onnx is missing" in line]
    assert code == 65 and errors, "".join(e.stderr)
    assert "--model" in errors[0]


def test_finding_confidence_is_the_argmax_definition_ties_included() -> None:
    """Pixels whose most probable class (the first on a tie, as argmax) is not 0."""
    from daemon.engines.guard import finding_confidence

    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.random((3, 32, 32)).astype(np.float32)
        p[:, rng.random((32, 32)) < 0.3] = 0.5  # three-way ties: class 0 wins them
        p[1:, rng.random((32, 32)) < 0.2] = 0.9  # ties between 1 and 2: a finding
        found = p.argmax(axis=0) != 0
        expected = (float(p.max(axis=0)[found].mean()), int(found.sum()))
        assert finding_confidence(p) == expected
    assert finding_confidence(np.full((3, 4, 4), 1 / 3, np.float32)) == (1.0, 0)


# -- the cheap guard against the reference (the guard as first written) ---------------------


def reference_field_of_view(image: np.ndarray) -> np.ndarray:
    above = (cv2.blur(image, (9, 9)) > 0.02).view(np.uint8)
    mask = cv2.morphologyEx(above, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    biggest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    inside = cv2.morphologyEx(
        (comp == biggest).view(np.uint8), cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8)
    )
    return inside.astype(bool)


def reference_top_sag(fov: np.ndarray) -> float:
    cols = np.nonzero(fov.any(axis=0))[0]
    if len(cols) < 10:
        return 0.0
    h = fov.shape[0]
    top = fov[:, cols].argmax(axis=0)
    near = cols[top <= top.min() + 0.08 * h]
    t = top[np.isin(cols, near)].astype(np.float32)
    if len(t) < 9:
        return 0.0
    third = len(t) // 3
    ends = np.concatenate([t[:third], t[-third:]])
    return float(np.median(t[third:-third]) - np.median(ends)) / h


def reference_features(image: np.ndarray) -> dict[str, float]:
    fov = reference_field_of_view(image)
    n = int(fov.sum())
    out = dict.fromkeys(FEATURES, 0.0)
    out["fov_fraction"] = n / fov.size
    if n < 256:
        return out
    v = image[fov]
    out["fov_mean"] = float(v.mean())
    out["fov_std"] = float(v.std())
    pair = fov[:, 1:] & fov[:, :-1]
    a, b = image[:, 1:][pair], image[:, :-1][pair]
    sa, sb = float(a.std()), float(b.std())
    if sa > 1e-6 and sb > 1e-6:
        out["neighbour_corr"] = float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))
    mean = cv2.blur(image, (5, 5))
    sq = cv2.blur(image * image, (5, 5))
    local = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    inner = cv2.erode(fov.view(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inner.any():
        out["local_std"] = float(np.median(local[inner]))
    out["top_sag"] = reference_top_sag(fov)
    return out


def reference_verdict(guard: Guard, image: np.ndarray, probs: np.ndarray) -> tuple[bool, str]:
    conf, _ = finding_confidence(probs)
    f = reference_features(image)
    for name, (lo, hi) in guard.domain.items():
        if not lo <= f[name] <= hi:
            return False, f"out of domain: {name} {f[name]:.3f} not in [{lo:.3f}, {hi:.3f}]"
    if conf < guard.min_confidence:
        return False, f"low confidence {conf:.3f} < {guard.min_confidence:.3f}"
    return True, ""


def judged_frames() -> list[tuple[str, np.ndarray]]:
    """Fresh simulator frames of every kind, the real recordings (every 8th water-tank
    frame) and the frames that are not ultrasound."""
    out = [(f"seed {s}", example(s).image) for s in range(FRESH + 700, FRESH + 760)]
    for name in RECORDINGS:
        path = DATA / "us" / name
        if path.is_file():
            source = MetaImageSequence(path)
            try:
                out += [
                    (f"{name} {i}", f.image) for i, f in enumerate(source.frames()) if i % 8 == 0
                ]
            finally:
                source.close()
    return out + wrong_frames()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference's std of no pairs
@pytest.mark.parametrize("shape", [(300, 1), (1, 300), (2, 300), (300, 2), (16, 16), (257, 129)])
def test_cheap_guard_on_thin_flat_and_noisy_inputs_is_the_reference(
    shape: tuple[int, int],
) -> None:
    """Inputs no scanner gives (a line, a flat field, white noise, a bright half): the
    same statistics as the reference, and no error."""
    rng = np.random.default_rng(sum(shape))
    half = np.zeros(shape, np.float32)
    half[:, shape[1] // 2 :] = 0.7
    for image in (
        np.zeros(shape, np.float32),
        np.full(shape, 0.5, np.float32),
        rng.random(shape, np.float32),
        half,
    ):
        got, ref = domain_features(image), reference_features(image)
        for k in FEATURES:
            assert got[k] == pytest.approx(ref[k], abs=1e-5), (shape, k)


def test_cheap_guard_judges_as_the_reference(seg: Segmenter) -> None:
    """Same statistics (within float rounding: sums in float64 instead of float32) and the
    same verdict, with the bundled card's thresholds, on every frame; frames of each
    verdict are among them."""
    need_data(DATA / "us" / RECORDINGS[0])
    assert seg.guard is not None
    reasons = set()
    for what, image in judged_frames():
        x = seg.prepare(image)
        plane, out = as_plane(x), seg.infer(x)
        got, ref = domain_features(plane), reference_features(plane)
        for k in FEATURES:
            assert got[k] == pytest.approx(ref[k], abs=1e-5), f"{what}: {k}"
        verdict = seg.judge(x, out)
        expected = reference_verdict(seg.guard, plane, probabilities(out[0], "softmax"))
        assert (verdict.confident, verdict.reason) == expected, what
        reasons.add(verdict.reason[:3])
    assert reasons == {"", "out", "low"}, reasons


def guard_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("guard")]


def test_domain_checks_on_worker_threads_judge_as_in_line() -> None:
    """The infer stage's path on an accelerator: every frame's domain check started on
    worker threads before any of them is finished, then each frame gets the verdict the
    in-line check gives it (shown and withheld frames, real and simulated, mixed)."""
    frames = [image for _, image in judged_frames()[::3]]
    with Network.open(BUNDLED / ULTRASOUND, engine="onnxruntime") as net:
        assert net.domain_workers == 0 and net.check_domain(net.prepare(frames[0])) is None
        inline = []
        for im in frames:
            x = net.prepare(im)
            inline.append(net.finish(net.infer(x), im.shape, x)[1])
        net.domain_workers = 2
        xs = [net.prepare(im) for im in frames]
        checks = [net.check_domain(x) for x in xs]
        threaded = [
            net.finish(net.infer(x), im.shape, x, check)[1]
            for x, im, check in zip(xs, frames, checks, strict=True)
        ]
        assert guard_threads(), "no worker thread checked a frame"
    assert threaded == inline
    assert any(v.confident for v in inline) and any(not v.confident for v in inline)
    assert not guard_threads(), "close() left the guard's threads running"


def test_domain_workers_only_beside_an_accelerator() -> None:
    assert domain_workers("cuda", cores=16) == 4 and domain_workers("cuda:1", cores=8) == 2
    assert domain_workers("GPU.0", cores=64) == 4 and domain_workers("NPU", cores=4) == 1
    assert domain_workers("cpu", cores=64) == 0 and domain_workers("AUTO:GPU,CPU", cores=16) == 0
    assert domain_workers("cuda", cores=2) == 0  # a 2-core box: the stages need both
