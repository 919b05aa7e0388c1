"""Decoding network outputs by role: exact numbers on constructed outputs (issue 17)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from daemon.engines import decoders
from daemon.engines.base import TensorSpec
from daemon.engines.card import InputCard, ModelCard, RoleCard
from daemon.engines.postprocess import labels
from daemon.engines.preprocess import Geometry, geometry, prepare

F32 = np.dtype(np.float32)


def letterbox() -> Geometry:
    """A 100 x 200 frame in a 64 x 64 input, aspect kept: it fills the top 32 rows."""
    spec = TensorSpec("x", (1, 1, 64, 64), F32, "NCHW")
    g = geometry(spec, ModelCard(input=InputCard(aspect="keep")), (100, 200))
    assert g == Geometry(frame=(100, 200), network=(64, 64), content=(32, 64))
    assert g.scale == (3.125, 3.125)
    return g


# -- detection --------------------------------------------------------------------------


def test_nms_suppresses_overlaps_of_a_class_and_keeps_the_best_first() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 0, 1])
    # IoU(A, B) = 81 / 119 = 0.68 > 0.45; D is A's twin of another class
    assert decoders.iou(boxes[0], boxes[1:2])[0] == pytest.approx(81 / 119)
    assert decoders.nms(boxes, scores, 0.45, classes).tolist() == [0, 2, 3]
    assert decoders.nms(boxes, scores, 0.45).tolist() == [0, 2]
    assert decoders.nms(boxes, scores, 0.7, classes).tolist() == [0, 1, 2, 3]
    assert decoders.nms(boxes, scores, 0.45, classes, limit=2).tolist() == [0, 2]
    assert decoders.nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_nms_agrees_with_opencv_on_random_boxes() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (300, 2))
    wh = rng.uniform(5, 60, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 300)
    rects = [
        [float(x), float(y), float(w), float(h)] for (x, y), (w, h) in zip(xy, wh, strict=True)
    ]
    want = cv2.dnn.NMSBoxes(rects, scores.tolist(), 0.0, 0.45)
    got = decoders.nms(boxes, scores, 0.45)
    assert got.tolist() == np.asarray(want).reshape(-1).tolist()


def test_anchor_free_output_is_decoded_with_nms_per_class_in_frame_pixels() -> None:
    #                 a0    a1    a2    a3    a4
    anchors = np.array(
        [
            [20, 21, 21, 50, 60],  # cx
            [20, 20, 20, 50, 30],  # cy
            [10, 10, 10, 20, 8],  # w
            [10, 10, 10, 10, 16],  # h
            [0.9, 0.8, 0.1, 0.3, 0.05],  # class 0
            [0.1, 0.2, 0.7, 0.2, 0.95],  # class 1
        ],
        np.float32,
    )[None]
    role = RoleCard(role="detection", format="anchor-free", activation="sigmoid", threshold=0.5)
    out = decoders.detection_anchor_free(anchors, role, letterbox())
    # a1 overlaps a0 (IoU 0.82) in class 0; a2 is class 1; a3 scores 0.3; a4's box leaves
    # the frame (x2 = 64 -> 201.0625, y2 = 38 -> 119.8125) and is clipped to its edges
    f = lambda v: (v + 0.5) * 3.125 - 0.5  # noqa: E731 - network to frame pixel index
    want = np.array(
        [
            [f(56), f(22), 199.5, 99.5, 0.95, 1],
            [f(15), f(15), f(25), f(25), 0.9, 0],
            [f(16), f(15), f(26), f(25), 0.7, 1],
        ],
        np.float32,
    )
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == (3, 6)


def test_boxes_after_nms_filter_sort_cap_and_map_normalised_coordinates() -> None:
    b = np.array(
        [[[0.1, 0.1, 0.5, 0.5, 0.6, 2], [0, 0, 1, 1, 0.9, 0], [0.2, 0.2, 0.3, 0.3, 0.4, 1]]],
        np.float32,
    )
    role = RoleCard(role="detection", coordinates="normalised", threshold=0.5, max_detections=5)
    g = Geometry(frame=(120, 160), network=(60, 80), content=(60, 80))  # stretch x2
    out = decoders.detection_boxes(b, role, g)
    # fractions of the input's width and height: 0 and 1 are its edges (-0.5, w - 0.5)
    want = [[-0.5, -0.5, 159.5, 119.5, 0.9, 0], [15.5, 11.5, 79.5, 59.5, 0.6, 2]]
    np.testing.assert_allclose(out, want, rtol=1e-6)
    capped = role.model_copy(update={"max_detections": 1})
    assert decoders.detection_boxes(b, capped, g).shape == (1, 6)


# -- keypoints --------------------------------------------------------------------------


def gaussian(shape: tuple[int, int], x: float, y: float, sigma: float) -> np.ndarray:
    """A blob centred on (x, y) in continuous coordinates (cell centres at + 0.5)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_heatmap_peaks_are_sub_pixel_exact_and_mapped_to_the_frame() -> None:
    maps = np.stack([gaussian((16, 16), 5.8, 10.1, 1.5), 0.2 * gaussian((16, 16), 3.5, 3.5, 1)])
    g = Geometry(frame=(128, 96), network=(64, 64), content=(64, 64))  # x 1.5, y 2
    role = RoleCard(role="keypoints", format="heatmaps", threshold=0.5)
    points = decoders.keypoints_heatmaps(maps[None], role, "NCHW", g)
    # heatmap -> network: x 4 (16 -> 64); network -> frame: x 1.5, y 2; edges -> indices
    np.testing.assert_allclose(points[0, :2], [5.8 * 4 * 1.5 - 0.5, 10.1 * 4 * 2 - 0.5], atol=1e-3)
    peak = np.exp(-((5.5 - 5.8) ** 2 + (10.5 - 10.1) ** 2) / (2 * 1.5**2))
    assert points[0, 2] == pytest.approx(peak, abs=1e-6)
    assert np.isnan(points[1, :2]).all() and points[1, 2] == pytest.approx(0.2, abs=1e-6)


def test_heatmaps_channel_last_and_logits() -> None:
    heat = gaussian((8, 8), 2.25, 6.75, 1.0)
    logits = np.log(heat / (1 - heat + 1e-6)).astype(np.float32)  # sigmoid(logits) = heat
    g = Geometry(frame=(8, 8), network=(8, 8), content=(8, 8))
    role = RoleCard(role="keypoints", format="heatmaps", activation="none", threshold=0.5)
    points = decoders.keypoints_heatmaps(logits[None, :, :, None], role, "NHWC", g)
    assert points.shape == (1, 3)
    np.testing.assert_allclose(points[0, :2], [1.75, 6.25], atol=1e-3)
    assert points[0, 2] == pytest.approx(heat.max(), abs=1e-4)


def test_coordinates_through_letterbox_and_padding() -> None:
    role = RoleCard(role="keypoints", threshold=0.5)
    pts = np.array([[[31.5, 15.5, 0.9], [0, 0, 0.8], [10, 10, 0.2]]], np.float32)
    out = decoders.keypoints_coordinates(pts, role, letterbox())
    # (x + 0.5) * 3.125 - 0.5: the network's pixel (0, 0) covers the frame's 0 .. 3.125
    np.testing.assert_allclose(out[:2], [[99.5, 49.5, 0.9], [1.0625, 1.0625, 0.8]], rtol=1e-6)
    assert np.isnan(out[2, :2]).all()
    # padded to a multiple of 32: one pixel is one pixel; normalised is of the padded input
    spec = TensorSpec("x", (1, 1, None, None), F32, "NCHW")
    padded = geometry(spec, ModelCard(input=InputCard(multiple=32)), (100, 90))
    assert padded == Geometry(frame=(100, 90), network=(128, 96), content=(100, 90))
    norm = role.model_copy(update={"coordinates": "normalised"})
    xy = decoders.keypoints_coordinates(np.array([[[0.5, 0.25]]], np.float32), norm, padded)
    np.testing.assert_allclose(xy, [[47.5, 31.5, 1]])


# -- maps -------------------------------------------------------------------------------


def test_letterbox_input_and_maps_cover_only_the_frame() -> None:
    g = letterbox()
    spec = TensorSpec("x", (1, 1, 64, 64), F32, "NCHW")
    card = ModelCard(input=InputCard(aspect="keep"))
    frame = np.full((100, 200), 255, np.uint8)
    x = prepare(frame, spec, card)
    assert (x[0, 0, :32] == 1).all() and (x[0, 0, 32:] == 0).all()
    # an output that says class 1 in the left half of the frame, and everywhere in the padding
    p1 = np.zeros((64, 64), np.float32)
    p1[:32, :32] = 1
    p1[32:] = 1
    out = np.stack([1 - p1, p1])[None]
    lab = labels(out, card, (100, 200), geometry=g)
    assert lab.shape == (100, 200)
    assert (lab[:, :100] == 1).all() and (lab[:, 100:] == 0).all()
    conf = decoders.confidence(out, "NCHW", "softmax", g)
    assert conf.dtype == np.float16 and conf.shape == (2, 64, 128)  # longest side 128
    # every row is the frame's (none of the padding below it); bilinear across the edge
    np.testing.assert_array_equal(conf[1, :, :63], 1)
    np.testing.assert_array_equal(conf[1, :, 65:], 0)


def test_confidence_of_one_channel_logits_and_small_frames() -> None:
    logits = np.zeros((1, 1, 4, 4), np.float32)
    g = Geometry(frame=(8, 8), network=(4, 4), content=(4, 4))
    conf = decoders.confidence(logits, "NCHW", "none", g)
    assert conf.shape == (2, 8, 8)  # small frames keep their size
    np.testing.assert_array_equal(conf, 0.5)
    assert decoders.confidence_size((480, 640)) == (96, 128)


# -- scores and values ------------------------------------------------------------------


def test_classification_and_regression_values() -> None:
    p = decoders.classification(np.array([[1.0, 2.0, 3.0]]), "none")
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(decoders.classification(np.array([[0.25]]), "sigmoid"), [0.75, 0.25])
    np.testing.assert_allclose(decoders.classification(np.zeros((1, 1, 1, 1)), "none"), [0.5, 0.5])
    probs = np.array([[0.1, 0.7, 0.2]], np.float32)
    np.testing.assert_array_equal(
        decoders.classification(probs.reshape(1, 3, 1, 1), "softmax"), probs[0]
    )
    np.testing.assert_array_equal(decoders.regression(np.array([[1.5, -2.0]])), [1.5, -2.0])


# -- what an output can be --------------------------------------------------------------


def spec(shape: tuple[int | None, ...], layout: str | None = None) -> TensorSpec:
    return TensorSpec("y", shape, F32, layout)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "role", "fmt"),
    [
        ((1, 2, 64, 64), "segmentation", None),
        ((1, 64, 64, 3), "segmentation", None),
        ((1, 4, 1, 1), "classification", None),
        ((None, 4), "classification", None),
        ((1, 1), "regression", None),
        ((1, 10, 6), "detection", "boxes"),
    ],
)
def test_roles_are_guessed_from_shapes(
    shape: tuple[int | None, ...], role: str, fmt: str | None
) -> None:
    guess = decoders.guess(spec(shape), "NHWC" if shape[-1] == 3 else "NCHW")
    assert guess is not None and (guess.role, guess.format) == (role, fmt)


def test_shapes_that_cannot_be_guessed_or_have_a_role() -> None:
    assert decoders.guess(spec((1, 3, 7))) is None
    assert decoders.guess(spec((5,))) is None
    det = RoleCard(role="detection")
    assert "needs (1, N, 6)" in decoders.problem(det, (1, 4), "NC")
    assert decoders.problem(det, (1, None, 6), None) == ""
    af = RoleCard(role="detection", format="anchor-free")
    assert "(1, 4 + C, A)" in decoders.problem(af, (1, 4, 100), None)
    seg = RoleCard(role="segmentation")
    assert "map" in decoders.problem(seg, (1, 4), "NC")
    cls = RoleCard(role="classification")
    assert "not a map" in decoders.problem(cls, (1, 4, 8, 8), "NCHW")
    kp = RoleCard(role="keypoints")
    assert decoders.problem(kp, (1, 17, 3), None) == ""
    assert "(1, K, 2)" in decoders.problem(kp, (1, 17, 4), None)
    assert decoders.count(kp, (1, 17, 3), None) == 17
