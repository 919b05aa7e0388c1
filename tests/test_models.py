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
from daemon.models import BUNDLED, CT, ULTRASOUND, WSI, default_model, list_models
from daemon.phantoms.ct import ct_phantom
from daemon.phantoms.wsi import CLASSES, GLASS, Slide, tissue_patch

FRESH = 1_000_000  # training and validation seeds are all below (daemon/models/README.md)


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    return 2.0 * float((p & t).sum()) / max(1, int(p.sum() + t.sum()))


@pytest.mark.parametrize("name", [ULTRASOUND, CT, WSI])
def test_bundled_model_file_and_card(name: str) -> None:
    path = BUNDLED / name
    assert path.stat().st_size < (10e6 if name == ULTRASOUND else 25e6)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert 13 <= next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 17
    for value in (model.graph.input[0], model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    props = {p.key: p.value for p in model.metadata_props}
    assert props["echod.weights"] == "trained" and json.loads(props["echod.scores"])
    card = load_card(path)
    assert "trained on the echod" in card.provenance and card.classes


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
    ref = rows["unet2d-256"]
    assert ref["origin"] == "cache" and ref["weights"] == "random" and not ref["scores"]
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert "ultrasound-seg" in text and "dice_artery=" in text and str(tmp_path) in text
    assert [m.name for m in list_models(None)] == [
        "ct-nodule-seg",
        "ultrasound-seg",
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
