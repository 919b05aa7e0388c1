"""Network outputs -> result arrays, one pure function per role (numpy/OpenCV).

Each decoder takes one model output (batch of one) and gives the array its role has in
a result record (daemon/results.py): label maps and confidence maps over the whole
frame, class probabilities, boxes, points and values. Coordinates are mapped back
from the network input to the FRAME through its :class:`~daemon.engines.preprocess.
Geometry` (resize, aspect-keeping letterbox, padding to a multiple).

Coordinates are pixel indices, in the network input as in the frame (the record's
convention, daemon/results.py): x is the column, y the row, and the centre of pixel
(column i, row j) is (i, j), so the image spans -0.5 .. w - 0.5. A point maps as
``x_frame = (x + 0.5) * scale - 0.5`` (scale: frame pixels per network pixel).
``coordinates = "normalised"`` outputs are fractions of the network input's width and
height (0 and 1 are its edges). Box corners map as points and are clipped to the frame.

- **detection** ``"boxes"``: (1, N, 6) or (N, 6), x1 y1 x2 y2 score class after the
  model's own NMS: kept when score >= threshold, best first, at most
  ``max_detections``. ``"anchor-free"``: (1, 4 + C, A) (YOLOv8), cx cy w h and C class
  scores per anchor: each anchor's best class, score >= threshold, then NMS per class
  (:func:`nms`: greedy, IoU above ``iou`` suppressed). Boxes are clipped to the frame.
- **keypoints** ``"coordinates"``: (1, K, 2 | 3), x y [score] (no score: 1).
  ``"heatmaps"``: (1, K, h, w) (or (1, h, w, K)): the peak of each map, refined to
  sub-pixel by a parabola through the peak and its neighbours on each axis, on the
  logarithm of the values when they are positive (exact for a Gaussian blob), else on
  the values (probabilities: logits go through a sigmoid first); the score is the
  peak value. Points scoring below the threshold get NaN coordinates (not found).
- Scores of an output whose card says ``activation = "none"`` (logits) go through a
  sigmoid (detection, keypoints) or a softmax (classification, confidence) first.

A model without ``[[outputs]]`` in its card gets roles guessed from output shapes
(:func:`guess`): 4-D with a spatial size -> segmentation; (1, C, 1, 1) and (1, C) with
C > 1 -> classification; (1, 1) -> regression (a single value: a score or a measure);
(1, N, 6) -> detection boxes. A (1, V) output of several measurements is taken for
class scores: its card says ``role = "regression"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from daemon.engines.base import TensorSpec, detect_layout
from daemon.engines.card import RoleCard
from daemon.engines.guard import probabilities
from daemon.engines.postprocess import planes
from daemon.engines.preprocess import Geometry
from daemon.results import CONFIDENCE_MAX_SIDE


def sigmoid(v: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(v, np.float32)))).astype(np.float32)


def _scores(v: np.ndarray, activation: str) -> np.ndarray:
    return sigmoid(v) if activation == "none" else np.asarray(v, np.float32)


# -- classification, regression -------------------------------------------------------


def _values(output: np.ndarray) -> np.ndarray:
    """The values of a one-image output, flat (batch dimension dropped)."""
    a = np.asarray(output)
    if a.ndim >= 2 and a.shape[0] == 1:
        a = a[0]
    return a.reshape(-1).astype(np.float32)


def classification(output: np.ndarray, activation: str) -> np.ndarray:
    """(C,) class probabilities: logits ("none") through softmax; a single output is the
    probability of class 1 (class 0 is its complement)."""
    v = _values(output)
    if v.size == 1:
        p = sigmoid(v)[0] if activation == "none" else float(v[0])
        return np.array([1.0 - p, p], np.float32)
    if activation == "none":
        e = np.exp(v - v.max())
        return (e / e.sum()).astype(np.float32)
    return v


def regression(output: np.ndarray) -> np.ndarray:
    """(V,) values as the model gives them."""
    return _values(output)


# -- maps -----------------------------------------------------------------------------


def confidence_size(frame_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a confidence map for a frame: the frame's shape, longest side at most
    :data:`CONFIDENCE_MAX_SIDE`."""
    h, w = frame_hw
    s = min(1.0, CONFIDENCE_MAX_SIDE / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def confidence(output: np.ndarray, layout: str, activation: str, geometry: Geometry) -> np.ndarray:
    """(C, h, w) float16 class probabilities over the whole frame (padding cut off), at
    :func:`confidence_size`; one channel becomes background and foreground."""
    p = probabilities(planes(output, layout), activation)  # (C, h, w) float32
    ch, cw = geometry.crop((p.shape[1], p.shape[2]))
    th, tw = confidence_size(geometry.frame)
    hwc = np.ascontiguousarray(p[:, :ch, :cw].transpose(1, 2, 0))
    if (ch, cw) != (th, tw):
        shrink = th <= ch and tw <= cw
        hwc = cv2.resize(
            hwc, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
    hwc = hwc.reshape(th, tw, -1)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float16)


# -- coordinates ----------------------------------------------------------------------


def _edges_to_frame(xy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Points measured from the network input's top-left edge -> frame pixel indices."""
    return (xy * np.array(geometry.scale, np.float32) - 0.5).astype(np.float32)


def to_frame(xy: np.ndarray, geometry: Geometry, normalised: bool = False) -> np.ndarray:
    """Points (..., 2) x y, network-input pixel indices (or fractions) -> frame pixel
    indices."""
    xy = np.asarray(xy, np.float32)
    if normalised:
        return _edges_to_frame(xy * np.array(geometry.network[::-1], np.float32), geometry)
    return _edges_to_frame(xy + 0.5, geometry)


def _boxes_to_frame(b: np.ndarray, geometry: Geometry, normalised: bool) -> np.ndarray:
    out = to_frame(b.reshape(-1, 2, 2), geometry, normalised).reshape(-1, 4)
    h, w = geometry.frame
    np.clip(out[:, 0::2], -0.5, w - 0.5, out=out[:, 0::2])
    np.clip(out[:, 1::2], -0.5, h - 0.5, out=out[:, 1::2])
    return out


# -- detection ------------------------------------------------------------------------


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box (4,) with each of ``boxes`` (N, 4), x1 y1 x2 y2."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    classes: np.ndarray | None = None,
    limit: int | None = None,
) -> np.ndarray:
    """Indices of the boxes (N, 4; x1 y1 x2 y2) kept by greedy non-maximum suppression,
    best first: a box goes when its IoU with a better kept one is above ``threshold``.
    With ``classes``, only boxes of one class suppress each other (each class's boxes
    are moved apart: torchvision's ``batched_nms``). Ties keep the earlier box."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    if classes is not None:
        span = float(boxes.max() - min(boxes.min(), 0.0)) + 1.0
        boxes = boxes + (np.asarray(classes, np.float64) * span)[:, None]
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep: list[int] = []
    while order.size and (limit is None or len(keep) < limit):
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou(boxes[best], boxes[rest]) <= threshold]
    return np.asarray(keep, np.int64)


def detection_boxes(output: np.ndarray, role: RoleCard, geometry: Geometry) -> np.ndarray:
    """(N, 6) x1 y1 x2 y2 score class in frame pixels, from (1, N, 6) boxes after NMS."""
    b = np.asarray(output, np.float32).reshape(-1, 6)
    scores = _scores(b[:, 4], role.activation)
    keep = np.nonzero(scores >= role.threshold)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][: role.max_detections]
    out = np.empty((len(keep), 6), np.float32)
    out[:, :4] = _boxes_to_frame(b[keep, :4], geometry, role.coordinates == "normalised")
    out[:, 4] = scores[keep]
    out[:, 5] = b[keep, 5]
    return out


def detection_anchor_free(output: np.ndarray, role: RoleCard, geometry: Geometry) -> np.ndarray:
    """(N, 6) x1 y1 x2 y2 score class in frame pixels, from YOLOv8-style (1, 4 + C, A):
    each anchor's best class, score >= threshold, NMS per class."""
    a = np.asarray(output, np.float32).reshape(output.shape[-2], output.shape[-1])
    scores_all = _scores(a[4:], role.activation)  # (C, A)
    cls = scores_all.argmax(axis=0)
    scores = scores_all[cls, np.arange(a.shape[1])]
    sel = np.nonzero(scores >= role.threshold)[0]
    cx, cy, w, h = a[0, sel], a[1, sel], a[2, sel], a[3, sel]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = nms(xyxy, scores[sel], role.iou, cls[sel], role.max_detections)
    out = np.empty((len(keep), 6), np.float32)
    out[:, :4] = _boxes_to_frame(xyxy[keep], geometry, role.coordinates == "normalised")
    out[:, 4] = scores[sel][keep]
    out[:, 5] = cls[sel][keep]
    return out


# -- keypoints ------------------------------------------------------------------------


def _not_found(points: np.ndarray, threshold: float) -> np.ndarray:
    points[points[:, 2] < threshold, :2] = np.nan
    return points


def keypoints_coordinates(output: np.ndarray, role: RoleCard, geometry: Geometry) -> np.ndarray:
    """(K, 3) x y score in frame pixels, from (1, K, 2 | 3)."""
    a = np.asarray(output, np.float32)
    a = a.reshape(-1, a.shape[-1])
    points = np.ones((len(a), 3), np.float32)
    points[:, :2] = to_frame(a[:, :2], geometry, role.coordinates == "normalised")
    if a.shape[1] == 3:
        points[:, 2] = _scores(a[:, 2], role.activation)
    return _not_found(points, role.threshold)


def _refine(lo: float, mid: float, hi: float) -> float:
    """Offset (-0.5..0.5) of the vertex of the parabola through (-1, lo), (0, mid),
    (1, hi); on logarithms when all are positive (exact for a Gaussian)."""
    if lo > 0 and mid > 0 and hi > 0:
        lo, mid, hi = math.log(lo), math.log(mid), math.log(hi)
    curvature = lo - 2 * mid + hi
    if curvature >= 0:  # flat or not a maximum
        return 0.0
    return max(-0.5, min(0.5, 0.5 * (lo - hi) / curvature))


def peak(heatmap: np.ndarray) -> tuple[float, float, float]:
    """(x, y, value) of a map's maximum, x y sub-pixel from the map's top-left edge (cell
    (r, c) covers [c, c + 1) x [r, r + 1))."""
    r, c = divmod(int(np.argmax(heatmap)), heatmap.shape[1])
    v = float(heatmap[r, c])
    dx = dy = 0.0
    if 0 < c < heatmap.shape[1] - 1:
        dx = _refine(float(heatmap[r, c - 1]), v, float(heatmap[r, c + 1]))
    if 0 < r < heatmap.shape[0] - 1:
        dy = _refine(float(heatmap[r - 1, c]), v, float(heatmap[r + 1, c]))
    return c + 0.5 + dx, r + 0.5 + dy, v


def keypoints_heatmaps(
    output: np.ndarray, role: RoleCard, layout: str, geometry: Geometry
) -> np.ndarray:
    """(K, 3) x y score in frame pixels, from (1, K, h, w) heatmaps (one per point)."""
    maps = _scores(np.asarray(planes(output, layout), np.float32), role.activation)
    k, hh, hw = maps.shape
    points = np.empty((k, 3), np.float32)
    for i in range(k):
        x, y, v = peak(maps[i])
        points[i] = (x * geometry.network[1] / hw, y * geometry.network[0] / hh, v)
    points[:, :2] = _edges_to_frame(points[:, :2], geometry)
    return _not_found(points, role.threshold)


# -- what an output can be ------------------------------------------------------------


def _known(dims: Sequence[int | None]) -> bool:
    return all(d is not None for d in dims)


def problem(role: RoleCard, shape: tuple[int | None, ...], layout: str | None) -> str:
    """Why an output of ``shape`` cannot have ``role`` ("" when it can)."""
    rank = len(shape)
    batch_ok = rank > 0 and shape[0] in (1, None)
    if role.role in ("segmentation", "confidence") or (
        role.role == "keypoints" and fmt(role, shape) == "heatmaps"
    ):
        if rank != 4 or not batch_ok or layout not in ("NCHW", "NHWC"):
            return "needs a map (1, C, h, w) or (1, h, w, C)"
        c = shape[1] if layout == "NCHW" else shape[3]
        if c is None:
            return "needs a fixed number of channels"
        return ""
    if role.role == "keypoints":
        if rank != 3 or not batch_ok or shape[2] not in (2, 3) or shape[1] is None:
            return 'needs (1, K, 2) or (1, K, 3) x y [score] (format "coordinates")'
        return ""
    if role.role == "detection":
        if fmt(role, shape) == "anchor-free":
            if rank != 3 or not batch_ok or shape[1] is None or shape[1] < 5:
                return 'needs (1, 4 + C, A) cx cy w h + C class scores (format "anchor-free")'
            return ""
        if not ((rank == 3 and batch_ok) or rank == 2) or shape[-1] != 6:
            return 'needs (1, N, 6) x1 y1 x2 y2 score class (format "boxes")'
        return ""
    # classification and regression: a fixed number of values per image
    values = shape[1:] if rank >= 2 and batch_ok else shape
    if not values or not _known(values) or math.prod(values) < 1:  # type: ignore[arg-type]
        return "needs (1, V) (or (1, V, 1, 1)) with a fixed number of values"
    if role.role == "classification" and rank == 4 and tuple(values[1:]) != (1, 1):
        return "needs (1, C) or (1, C, 1, 1) class scores, not a map"
    return ""


def fmt(role: RoleCard, shape: tuple[int | None, ...]) -> str | None:
    """The role's format: the card's, else by rank (keypoints: 4-D heatmaps, else
    coordinates; detection: boxes)."""
    if role.format is not None:
        return role.format
    if role.role == "keypoints":
        return "heatmaps" if len(shape) == 4 else "coordinates"
    if role.role == "detection":
        return "boxes"
    return None


def count(role: RoleCard, shape: tuple[int | None, ...], layout: str | None) -> int | None:
    """Classes (maps, classification, anchor-free), points or values the output gives
    (None: boxes, whose classes the output does not bound)."""
    f = fmt(role, shape)
    if role.role in ("segmentation", "confidence"):
        c = shape[1] if layout == "NCHW" else shape[3]
        return max(int(c or 1), 2)
    if role.role == "keypoints" and f == "heatmaps":
        return int((shape[1] if layout == "NCHW" else shape[3]) or 0)
    if role.role == "keypoints":
        return int(shape[1] or 0)
    if role.role == "detection":
        return int(shape[1] or 0) - 4 if f == "anchor-free" else None
    values = shape[1:] if len(shape) >= 2 and shape[0] in (1, None) else shape
    n = math.prod(int(v or 1) for v in values)
    return max(n, 2) if role.role == "classification" else n


def guess(spec: TensorSpec, layout: str | None = None) -> RoleCard | None:
    """The role an output of this shape most likely has (see the module doc), or None;
    ``layout``: a map's when its own cannot be detected (the input's)."""
    shape = spec.shape
    rank = len(shape)
    if rank == 4:
        if shape[2:] == (1, 1) or shape[1:3] == (1, 1):  # (1, C, 1, 1) or (1, 1, 1, C)
            return RoleCard(role="classification")
        if spec.layout in ("NCHW", "NHWC"):
            layout = spec.layout
        layout = detect_layout(shape) or layout
        if layout == "NCHW" or layout == "NHWC":
            return RoleCard(role="segmentation", layout=layout)
        return None
    if rank == 3 and shape[-1] == 6:
        return RoleCard(role="detection", format="boxes")
    if rank == 2 and shape[1] is not None:
        return RoleCard(role="classification" if shape[1] > 1 else "regression")
    return None
