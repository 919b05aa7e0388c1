"""Pre- and post-processing against straightforward numpy reference implementations."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.engines.base import TensorSpec
from daemon.engines.card import ModelCard
from daemon.engines.postprocess import confidences, labels
from daemon.engines.preprocess import prepare
from daemon.errors import ModelError

RNG = np.random.default_rng(1234)
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def ref_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and clamped borders, in float64."""
    img = img.astype(np.float64)

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = taps(h, img.shape[0])
    x0, x1, fx = taps(w, img.shape[1])
    fy = fy.reshape((-1, 1) + (1,) * (img.ndim - 2))
    fx = fx.reshape((1, -1) + (1,) * (img.ndim - 2))
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def ref_prepare(
    img: np.ndarray, size: tuple[int, int], layout: str, c: int, card: ModelCard
) -> np.ndarray:
    """The meaning of prepare(), spelled out step by step."""
    v = ref_resize(img, *size)
    if v.ndim == 2:
        v = v[:, :, None]
    if c == 1 and v.shape[2] == 3:
        v = (v @ GRAY_WEIGHTS)[:, :, None]
    v = np.broadcast_to(v, (*size, c))
    n = card.input.normalisation
    if n.clip is not None:
        v = np.clip(v, *n.clip)
    x = v * n.scale
    x = (x - np.asarray(n.mean or (0.0,))) / np.asarray(n.std or (1.0,))
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return x[None]


def spec(layout: str, c: int | None, h: int | None = 64, w: int | None = 48) -> TensorSpec:
    shape = (None, c, h, w) if layout == "NCHW" else (None, h, w, c)
    return TensorSpec("x", shape, np.dtype(np.float32), layout)  # type: ignore[arg-type]


CARDS = {
    "default": ModelCard(),
    "clip+mean/std": ModelCard.model_validate(
        {
            "input": {
                "normalisation": {"scale": 1 / 200, "clip": [20, 220], "mean": [0.4], "std": [0.2]}
            }
        }
    ),
    "per-channel": ModelCard.model_validate(
        {"input": {"normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}}
    ),
}


@pytest.mark.parametrize(
    ("card_name", "channels"),
    [(name, c) for name in CARDS for c in (1, 3) if (name, c) != ("per-channel", 1)],
)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("frame", ["gray", "rgb"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_prepare_matches_reference(
    card_name: str, channels: int, layout: str, frame: str, dtype: type
) -> None:
    card = CARDS[card_name]
    shape = (123, 157) if frame == "gray" else (123, 157, 3)
    img: np.ndarray = RNG.integers(0, 256, shape).astype(dtype)
    x = prepare(img, spec(layout, channels), card)
    expected = ref_prepare(img, (64, 48), layout, channels, card)
    assert x.shape == expected.shape and x.dtype == np.float32
    n = card.input.normalisation
    step = n.scale / min(n.std or (1.0,))  # one input level after normalisation
    # integer frames are resized (and turned gray) in their own type: within 1.5 levels
    atol = 1.5 * step if dtype == np.uint8 else 1e-5 * 255 * step
    np.testing.assert_allclose(x, expected, rtol=0, atol=atol)
    if dtype == np.uint8:  # and most elements are within one level
        assert np.mean(np.abs(x - expected) <= step) > 0.99


def test_prepare_same_size_is_exact() -> None:
    img = RNG.integers(0, 4096, (64, 48)).astype(np.uint16)
    card = CARDS["clip+mean/std"]
    x = prepare(img, spec("NCHW", 1), card)
    np.testing.assert_allclose(x, ref_prepare(img, (64, 48), "NCHW", 1, card), atol=1e-6)


def test_prepare_per_channel_normalisation_needs_that_many_channels() -> None:
    with pytest.raises(ModelError, match="mean has 3 values; the model has 1 channels"):
        prepare(np.zeros((8, 8), np.uint8), spec("NCHW", 1), CARDS["per-channel"])


def test_prepare_dynamic_spec_takes_card_size_then_frame_size() -> None:
    img = RNG.integers(0, 256, (40, 30), np.uint8)
    dyn = spec("NCHW", None, None, None)
    assert prepare(img, dyn, ModelCard()).shape == (1, 1, 40, 30)
    sized = ModelCard.model_validate({"input": {"size": [32, 16], "channels": 3}})
    x = prepare(img, dyn, sized)
    np.testing.assert_allclose(x, ref_prepare(img, (32, 16), "NCHW", 3, sized), atol=1.01 / 255)


def ref_nearest(lab: np.ndarray, h: int, w: int) -> np.ndarray:
    yi = np.floor((np.arange(h) + 0.5) * lab.shape[0] / h).astype(int)
    xi = np.floor((np.arange(w) + 0.5) * lab.shape[1] / w).astype(int)
    return lab[yi][:, xi]


@pytest.mark.parametrize("n_classes", [2, 3, 7])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_labels_argmax_and_resize_back(n_classes: int, layout: str) -> None:
    # sizes where no output pixel centre falls exactly on an input pixel edge
    # (OpenCV's fixed point and the float reference may round such ties apart)
    probs = RNG.random((1, n_classes, 48, 40)).astype(np.float32)
    out = probs if layout == "NCHW" else np.ascontiguousarray(probs.transpose(0, 2, 3, 1))
    lab = labels(out, ModelCard(), (208, 176), layout)
    assert lab.dtype == np.uint8 and lab.shape == (208, 176)
    np.testing.assert_array_equal(lab, ref_nearest(np.argmax(probs[0], axis=0), 208, 176))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_labels_from_the_engine_replace_the_argmax(layout: str) -> None:
    """An engine's own label map (Engine.label_on_device) is what comes back, cropped and
    resized like the CPU's; a copy, not a view of the engine's buffer; a misfit is refused."""
    probs = RNG.random((1, 3, 48, 40)).astype(np.float32)
    out = probs if layout == "NCHW" else np.ascontiguousarray(probs.transpose(0, 2, 3, 1))
    engine = np.zeros((1, 48, 40), np.uint8)
    engine[0, 10:20, 5:30] = 2  # not the argmax: proves which map was taken
    lab = labels(out, ModelCard(), (208, 176), layout, argmax=engine)
    np.testing.assert_array_equal(lab, ref_nearest(engine[0], 208, 176))
    same = labels(out, ModelCard(), (48, 40), layout, argmax=engine)
    same[:] = 7
    assert engine.max() == 2, "the engine's buffer was written through the label map"
    for bad in (engine[:, :47], engine.astype(np.int64)):
        with pytest.raises(ValueError, match="engine's label map"):
            labels(out, ModelCard(), (48, 40), layout, argmax=bad)
    one = RNG.random((1, 1, 4, 4)).astype(np.float32)  # one class: the threshold, as before
    np.testing.assert_array_equal(
        labels(one, ModelCard(), (4, 4), argmax=engine[:, :4, :4]), (one[0, 0] > 0.5)
    )


def test_labels_known_map_ties_take_first_class() -> None:
    out = np.zeros((1, 3, 2, 2), np.float32)
    out[0, 1, 0, 1] = 1.0  # top right: class 1
    out[0, 2, 1, 0] = 1.0  # bottom left: class 2
    out[0, :, 1, 1] = 0.5  # bottom right: a three-way tie -> class 0
    lab = labels(out, ModelCard(), (4, 4, 3))
    np.testing.assert_array_equal(lab, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]])


def test_labels_threshold_probabilities_and_logits() -> None:
    p = np.array([[0.1, 0.29], [0.31, 0.9]], np.float32)[None, None]
    card = ModelCard.model_validate({"output": {"activation": "sigmoid", "threshold": 0.3}})
    np.testing.assert_array_equal(labels(p, card, (2, 2)), [[0, 0], [1, 1]])
    logits = np.log(p / (1 - p))
    logit_card = ModelCard.model_validate({"output": {"activation": "none", "threshold": 0.3}})
    np.testing.assert_array_equal(labels(logits, logit_card, (2, 2)), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(
        labels(p.reshape(1, 2, 2, 1), card, (4, 2), "NHWC"), [[0, 0], [0, 0], [1, 1], [1, 1]]
    )


def test_confidences() -> None:
    logits = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    e = np.exp(logits[0])
    soft = e / e.sum(axis=0)
    logit_card = ModelCard.model_validate({"output": {"activation": "none"}})
    np.testing.assert_allclose(
        confidences(logits, logit_card), soft.reshape(3, -1).max(1), rtol=1e-5
    )
    np.testing.assert_allclose(confidences(soft[None], ModelCard()), soft.reshape(3, -1).max(1))
    p = np.array([[0.2, 0.7]], np.float32)[None, None]
    np.testing.assert_allclose(confidences(p, ModelCard()), [0.8, 0.7])
