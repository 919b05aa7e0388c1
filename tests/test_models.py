"""Bundled models on fresh phantom data (seeds never used in training), the reference
networks and ``echod models``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from daemon import cli
from daemon.engines.card import load_card
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.engines.reference import ensure_reference, parameter_count, unet3d_32x256x256
from daemon.errors import ModelError
from daemon.models import BUNDLED, CT, NEEDLE, ULTRASOUND, VIEW, WSI, default_model, list_models
from daemon.models.cards import NEEDLE_SIZE, VIEW_SIZE
from daemon.models.train import needle, view
from daemon.models.train.evaluation import Runner, point, real_recordings
from daemon.phantoms.ct import ct_phantom
from daemon.phantoms.ultrasound import Phantom
from daemon.phantoms.us_tasks import VIEW_CLASSES, needle_example, view_example
from daemon.phantoms.wsi import CLASSES, GLASS, Slide, tissue_patch
from tests.conftest import ROOT, need_data

FRESH = 1_000_000  # training and validation seeds are all below (daemon/models/README.md)


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    return 2.0 * float((p & t).sum()) / max(1, int(p.sum() + t.sum()))


@pytest.mark.parametrize("name", [ULTRASOUND, CT, WSI, VIEW, NEEDLE])
def test_bundled_model_file_and_card(name: str) -> None:
    path = BUNDLED / name
    assert path.stat().st_size < {ULTRASOUND: 10e6, VIEW: 5e6, NEEDLE: 5e6}.get(name, 25e6)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert 13 <= next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 17
    for value in (model.graph.input[0], model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    props = {p.key: p.value for p in model.metadata_props}
    assert props["echod.weights"] == "trained" and json.loads(props["echod.scores"])
    card = load_card(path)
    assert "trained on the echod" in card.provenance and (card.classes or card.outputs)
    if card.outputs:  # the task models: what they are for and how they scored, stated
        assert card.intended_use and card.training_data and card.limits
        assert {"held_out", "live_phantom", "real_data"} <= set(card.evaluation)


def test_default_model_is_the_bundled_one() -> None:
    assert default_model() == BUNDLED / ULTRASOUND


def test_no_silent_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing, unreadable or untrained bundled model is a one-line error naming the fix;
    nothing is generated in its place (the gates live in tests/test_guard.py)."""
    monkeypatch.setattr("daemon.models.BUNDLED", tmp_path)
    with pytest.raises(ModelError, match=r"ultrasound-seg.onnx is missing: .*--model") as e:
        default_model()
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    (tmp_path / ULTRASOUND).write_bytes(b"\x08\x07 not a model")
    with pytest.raises(ModelError, match="cannot be read"):
        default_model()
    random = ensure_reference("unet2d-256", tmp_path / "cache")
    (tmp_path / ULTRASOUND).write_bytes(random.read_bytes())
    with pytest.raises(ModelError, match="has no trained weights"):
        default_model()


def test_ct_nodule_dice_on_a_fresh_volume() -> None:
    path = BUNDLED / CT
    norm = load_card(path).input.normalisation
    assert norm.clip is not None and norm.mean is not None
    volume = ct_phantom((32, 256, 256), seed=FRESH, spacing=(1.5, 1.4, 1.4), nodules=(3, 5))
    assert len(volume.nodules) >= 3
    x = (np.clip(volume.hu, *norm.clip) * norm.scale - norm.mean[0]).astype(np.float32)
    engine = OnnxRuntimeEngine()
    engine.load(path, "cpu")
    try:
        probs = engine.run({engine.inputs[0].name: x[None, None]})[engine.outputs[0].name]
    finally:
        engine.close()
    pred = probs[0].argmax(0)
    assert dice(pred, volume.labels, 1) >= 0.70


@pytest.fixture(scope="module")
def classifier() -> OnnxRuntimeEngine:
    engine = OnnxRuntimeEngine()
    engine.load(BUNDLED / WSI, "cpu")
    yield engine
    engine.close()


def classify(engine: OnnxRuntimeEngine, patches: list[np.ndarray]) -> np.ndarray:
    norm = load_card(BUNDLED / WSI).input.normalisation
    assert norm.mean is not None and norm.std is not None
    x = (np.stack(patches).astype(np.float32) * norm.scale - norm.mean[0]) / norm.std[0]
    out = engine.run({engine.inputs[0].name: x.transpose(0, 3, 1, 2).copy()})
    return out[engine.outputs[0].name].argmax(1)


def test_wsi_patch_accuracy_on_fresh_tiles(classifier: OnnxRuntimeEngine) -> None:
    truth = np.repeat(np.arange(len(CLASSES)), 6)
    patches = [tissue_patch(int(c), FRESH + i) for i, c in enumerate(truth)]
    pred = np.concatenate([classify(classifier, patches[i : i + 8]) for i in range(0, 24, 8)])
    assert (pred == truth).mean() >= 0.90, list(zip(truth, pred, strict=True))


def test_wsi_classifies_tiles_of_a_fresh_slide(classifier: OnnxRuntimeEngine) -> None:
    """512x512 tiles of a whole slide, where the ground truth is one class throughout."""
    slide = Slide(12_000, 9_000, seed=FRESH)
    cmap = slide.class_map(64)
    tiles, truth = [], []
    for ty in range(0, 9_000 - 511, 512):
        for tx in range(0, 12_000 - 511, 512):
            block = cmap[ty // 64 : ty // 64 + 8, tx // 64 : tx // 64 + 8]
            if block.min() == block.max() != GLASS:
                tiles.append((ty, tx))
                truth.append(int(block[0, 0]) - 1)
    pick = np.random.default_rng(0).permutation(len(tiles))[:16]
    assert len(set(np.array(truth)[pick])) >= 3
    patches = [slide.render(*tiles[i], 512, 512) for i in pick]
    pred = np.concatenate([classify(classifier, patches[i : i + 8]) for i in range(0, 16, 8)])
    assert (pred == np.array(truth)[pick]).mean() >= 0.90


def test_reference_networks_of_the_paper_size(tmp_path: Path) -> None:
    assert parameter_count(unet3d_32x256x256()) == 5_644_930
    path = ensure_reference("inception-v3-512", tmp_path)
    model = onnx.load(str(path))
    assert parameter_count(model) == 21_899_748
    assert {p.key: p.value for p in model.metadata_props}["echod.weights"] == "random"
    card = load_card(path)
    assert card.task == "classification" and "random weights" in card.provenance
    engine = OnnxRuntimeEngine()
    engine.load(path, "cpu")
    try:
        out = engine.run({"image": np.random.default_rng(0).random((1, 3, 512, 512), np.float32)})
    finally:
        engine.close()
    assert out["probabilities"].shape == (1, 4)
    assert out["probabilities"].sum() == pytest.approx(1.0, abs=1e-4)


def test_echod_models_lists_bundled_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path))
    assert cli.main(["models", "--json", "--reference", "unet2d-256"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    us = rows["ultrasound-seg"]
    assert us["origin"] == "bundled" and us["weights"] == "trained"
    assert us["input_shape"] == ["batch", 1, 256, 256] and us["layout"] == "NCHW"
    assert us["classes"] == ["background", "artery", "vein"] and us["parameters"] == 1_940_851
    assert us["scores"]["dice_artery"] >= 0.9 and us["scores"]["dice_vein"] >= 0.9
    assert rows["ct-nodule-seg"]["layout"] == "NCDHW"
    assert rows["ct-nodule-seg"]["scores"]["dice_nodule"] >= 0.7
    assert rows["wsi-patch-cls"]["classes"] == list(CLASSES)
    assert rows["wsi-patch-cls"]["scores"]["accuracy"] >= 0.9
    assert rows["ultrasound-view"]["task"] == "classification"
    assert rows["ultrasound-view"]["classes"] == list(VIEW_CLASSES)
    assert rows["ultrasound-view"]["scores"]["accuracy_live"] >= 0.95
    assert rows["ultrasound-view"]["scores"]["accuracy"] >= 0.95
    assert rows["ultrasound-needle"]["task"] == "keypoints"
    assert rows["ultrasound-needle"]["classes"] == ["needle tip"]
    assert rows["ultrasound-needle"]["scores"]["tip_error_mm"] <= 2.0
    ref = rows["unet2d-256"]
    assert ref["origin"] == "cache" and ref["weights"] == "random" and not ref["scores"]
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert "ultrasound-seg" in text and "dice_artery=" in text and str(tmp_path) in text
    assert [m.name for m in list_models(None)] == [
        "ct-nodule-seg",
        "ultrasound-needle",
        "ultrasound-seg",
        "ultrasound-view",
        "wsi-patch-cls",
    ]


def test_a_training_script_makes_a_model_echod_loads(tmp_path: Path) -> None:
    """The WSI script's CPU smoke run: an ONNX file and a card that load and run."""
    pytest.importorskip("torch", reason="the training scripts need the 'train' extra (torch)")
    from daemon.models.train import wsi

    wsi.main(["--quick", "--minutes", "0.2", "--workers", "1", "--out", str(tmp_path)])
    card = load_card(tmp_path / "wsi-patch-cls.onnx")
    assert card.task == "classification" and len(card.classes) == 4
    assert "synthetic data only" in card.provenance
    engine = OnnxRuntimeEngine()
    engine.load(tmp_path / "wsi-patch-cls.onnx")
    out = engine.run({engine.inputs[0].name: np.zeros((2, 3, 512, 512), np.float32)})
    probs = next(iter(out.values()))
    assert probs.shape == (2, 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_training_scripts_write_into_the_package_only_when_asked() -> None:
    pytest.importorskip("torch", reason="the training scripts need the 'train' extra (torch)")
    from daemon.models.train import common

    parser = common.arguments(None, epochs=1, minutes=1.0)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # neither --out nor --publish
    assert parser.parse_args(["--out", "x"]).out == Path("x")
    assert parser.parse_args(["--publish"]).out == BUNDLED


def test_view_classifier_on_fresh_frames() -> None:
    """The bundled frame classifier meets the gate (accuracy >= 0.95) on frames it never
    saw: a live-phantom sweep of a fresh seed, and 60 random simulator frames (seeds from
    1,000,000; the harder set, with anechoic cysts drawn to look like vessels; 0.963 on
    the card's 990 held-out frames from ``python -m daemon.models.train.view evaluate``)."""
    with Runner(BUNDLED / VIEW) as run:
        frames = [view_example(FRESH + i, VIEW_SIZE) for i in range(60)]
        held = [(run(e.image)[0], e.truth.view) for e in frames if e.truth.view is not None]
        ph = Phantom((256, 256), seed=FRESH, sweep=True)
        live = [
            (run(image)[0], truth.view)
            for image, _, truth in map(ph.frame_with_truth, range(0, ph.loop_frames, 5))
            if truth.view is not None
        ]
    assert {c for _, c in held} == {0, 1} and {c for _, c in live} == {0, 1}
    assert view.scores(live)["accuracy"] >= 0.95, view.scores(live)
    assert view.scores(held)["accuracy"] >= 0.95, view.scores(held)


def test_needle_tip_on_fresh_frames() -> None:
    """The gates of the bundled needle-tip model on frames it never saw (40 simulator
    seeds from 1,000,000, a live-phantom loop of a fresh seed): tip error <= 2 mm at the
    frames' spacing where a needle's tip is in view, no point where none is (the card's
    figures: ``python -m daemon.models.train.needle evaluate``, 1,000 frames)."""
    (tip,) = load_card(BUNDLED / NEEDLE).outputs
    assert tip.role == "keypoints" and tip.names == ("needle tip",)
    with Runner(BUNDLED / NEEDLE) as run:
        frames = [needle_example(FRESH + i, NEEDLE_SIZE) for i in range(40)]
        held = [(run(e.image), e.image.shape, e.truth.tip, e.truth.spacing) for e in frames]
        ph = Phantom((256, 256), seed=FRESH, needle=True)
        live = [
            (run(image), image.shape, truth.tip, truth.spacing)
            for image, _, truth in map(ph.frame_with_truth, range(0, ph.loop_frames, 5))
        ]
    for figures in (needle.scores(held, tip.threshold), needle.scores(live, tip.threshold)):
        assert figures["frames_with_tip"] >= 10 and figures["frames_without"] >= 3, figures
        assert figures["tip_error_mm_mean"] <= 2.0, figures
        assert figures["detected"] >= 0.75, figures  # most tips found (card: 0.89, 0.97)
        assert figures["false_points"] == 0.0, figures


@pytest.mark.slow
def test_task_models_on_real_frames_show_no_needle_and_no_vessel() -> None:
    """Both real recordings have no needle and no vessel: the keypoint model shows no
    point on any frame, the classifier says "no vessels" (as their cards state)."""
    data = need_data(ROOT.parent / "shared" / "data" / "us")
    (tip,) = load_card(BUNDLED / NEEDLE).outputs
    with Runner(BUNDLED / NEEDLE) as tips, Runner(BUNDLED / VIEW) as views:
        for name, images in real_recordings(data):
            shown = [point(tips(im), im.shape, tip.threshold) is not None for im in images]
            assert not any(shown), f"{name}: a needle tip on {sum(shown)} frames"
            vessels = np.mean([views(im)[0].argmax() == 1 for im in images])
            assert vessels <= 0.05, f"{name}: 'vessels in view' on {vessels:.0%} of frames"


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("name", [VIEW, NEEDLE])
def test_task_models_at_their_calibrated_precision_on_real_frames(name: str, engine: str) -> None:
    """``precision = "auto"`` runs what the cards allow (int8 where its top-1 / keypoint drop
    on held-out simulator frames is within 0.01: not the needle model's OpenVINO int8,
    0.197); on the real recordings, which show no vessel and no needle, the view
    classifier says "no vessels" and the needle model shows no tip, as f32 does."""
    from daemon.engines import registry
    from daemon.engines.network import Network
    from daemon.engines.precision import choose

    if not registry.probe(engine).available:
        pytest.skip(f"{engine} is not installed")
    data = need_data(ROOT.parent / "shared" / "data" / "us")

    def first(net: Network, image: np.ndarray) -> np.ndarray:
        x = net.prepare(image)
        return net.finish(net.infer(x), image.shape, x)[0][0].array

    with (
        Network.open(BUNDLED / name, engine=engine) as auto,
        Network.open(BUNDLED / name, engine=engine, precision="fp32") as f32,
    ):
        card = load_card(BUNDLED / name)
        chosen = choose(card, BUNDLED / name, engine, "cpu", "auto").precision
        assert auto.describe()["precision"] == chosen != "auto"
        assert chosen == ("fp32" if (name, engine) == (NEEDLE, "openvino") else "int8")
        for rec, images in real_recordings(data):
            got = [first(auto, im) for im in images]
            ref = [first(f32, im) for im in images]
            if name == VIEW:
                top = np.array([g.argmax() for g in got])
                assert (top == 1).mean() <= 0.05, f"{rec}: 'vessels in view' on {top.mean():.0%}"
                agree = (top == np.array([r.argmax() for r in ref])).mean()
                assert agree >= 0.95, f"{rec}: int8 and f32 agree on {agree:.0%} of frames"
            else:
                shown = [sum(not np.isnan(a[0, 0]) for a in run) for run in (got, ref)]
                assert shown == [0, 0], f"{rec}: a needle tip on {shown} frames (int8, f32)"


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_wsi_classifier_at_its_calibrated_precision_on_the_real_slide(engine: str) -> None:
    """On the real H&E slide's 512 x 512 patches (20, tissue and glass), the WSI patch
    classifier at what ``auto`` chooses from its card labels as f32 does."""
    import openslide

    from daemon.engines import registry
    from daemon.engines.network import Network
    from daemon.engines.precision import choose

    if not registry.probe(engine).available:
        pytest.skip(f"{engine} is not installed")
    svs = need_data(ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs")
    with openslide.OpenSlide(str(svs)) as slide:
        w, h = slide.dimensions
        patches = [
            np.asarray(slide.read_region((x, y), 0, (512, 512)))[..., :3].copy()
            for y in range(0, h - 511, 512)
            for x in range(0, w - 511, 512)
        ]

    def top(net: Network, image: np.ndarray) -> int:
        x = net.prepare(image)
        return int(net.finish(net.infer(x), image.shape, x)[0][0].array.argmax())

    chosen = choose(load_card(BUNDLED / WSI), BUNDLED / WSI, engine, "cpu", "auto").precision
    with (
        Network.open(BUNDLED / WSI, engine=engine) as auto,
        Network.open(BUNDLED / WSI, engine=engine, precision="fp32") as f32,
    ):
        assert auto.describe()["precision"] == chosen != "auto"
        got, ref = [top(auto, p) for p in patches], [top(f32, p) for p in patches]
    assert len(patches) == 20 and len(set(ref)) >= 3  # tissue of several kinds, and glass
    assert np.mean(np.array(got) == np.array(ref)) >= 0.9, (chosen, got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("script", [view, needle])
def test_task_training_scripts_make_models_echod_loads(script: object, tmp_path: Path) -> None:
    """The view and needle scripts' CPU smoke runs: an ONNX file and a card that load."""
    pytest.importorskip("torch", reason="the training scripts need the 'train' extra (torch)")
    main = script.main  # type: ignore[attr-defined]
    main(["--quick", "--minutes", "0.1", "--workers", "1", "--out", str(tmp_path)])
    (model,) = tmp_path.glob("*.onnx")
    card = load_card(model)
    (role,) = card.outputs
    assert "synthetic data only" in card.provenance
    with Runner(model) as run:
        out = run(np.zeros((300, 400), np.uint8))
    assert out.shape == ((1, 2) if role.role == "classification" else (1, 1, 3))
