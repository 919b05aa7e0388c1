"""Network output -> label map at the frame's size, on the CPU (numpy/OpenCV).

``labels`` takes a segmentation output of one image, ``(1, C, h, w)`` or
``(1, h, w, C)``. With C > 1 the label is the index of the largest channel
(first one on ties; an engine that takes it where the network runs gives the same map,
:meth:`~daemon.engines.base.Engine.label_on_device`); with C == 1 it is 1 where the
foreground probability exceeds the card's threshold (a logit output is compared with
the threshold's logit). The frame's part of the map (padding cut off) is resized to the frame
with exact nearest-neighbour (half-pixel centres, the inverse of the input's
bilinear resize). The OpenCL twin must keep these signatures and meanings.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from daemon.engines.card import ModelCard
from daemon.engines.preprocess import Geometry

MAX_CLASSES = 255


def planes(output: np.ndarray, layout: str) -> np.ndarray | list[np.ndarray]:
    """Class planes (C of h x w) of a one-image output in layout NCHW or NHWC."""
    if output.ndim != 4 or output.shape[0] != 1:
        raise ValueError(
            f"expected a (1, C, h, w) or (1, h, w, C) output, got shape {output.shape}"
        )
    if layout == "NCHW":
        return output[0]
    return list(cv2.split(np.ascontiguousarray(output[0])))


def labels(
    output: np.ndarray,
    card: ModelCard,
    frame_shape: tuple[int, ...],
    layout: str = "NCHW",
    geometry: Geometry | None = None,
    argmax: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 label map of ``frame_shape[:2]`` for one segmentation output; ``geometry``
    (None: the output covers the frame, nothing padded) says which part of the output
    is the frame's (:func:`daemon.engines.preprocess.geometry`); ``argmax``: the
    ``(1, h, w)`` label map of a multi-class output where the engine computed it
    (:meth:`~daemon.engines.base.Engine.label_on_device`), taken instead of its own."""
    p = planes(output, layout)
    if len(p) > MAX_CLASSES:
        raise ValueError(f"{len(p)} classes do not fit a uint8 label map")
    if argmax is not None and len(p) > 1:
        if argmax.shape != (1, *p[0].shape) or argmax.dtype != np.uint8:
            raise ValueError(
                f"the engine's label map is {argmax.dtype} {argmax.shape}, expected uint8 "
                f"{(1, *p[0].shape)}"
            )
        lab = np.array(argmax[0])  # the engine's buffer is reused: the record gets a copy
    elif len(p) == 1:
        t = card.output.threshold
        if card.output.activation == "none":
            t = math.log(t / (1 - t))
        lab = (p[0] > t).view(np.uint8)
    else:
        lab = _argmax(p)
    h, w = frame_shape[0], frame_shape[1]
    if geometry is not None:
        ch, cw = geometry.crop((lab.shape[0], lab.shape[1]))
        lab = lab[:ch, :cw]  # the frame's part of a padded input
    if lab.shape != (h, w):
        lab = cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return lab


def _argmax(p: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Per-pixel index of the largest plane (about 20x numpy's argmax over axis 0)."""
    # the running maximum is written only with three classes or more: a copy only then
    best = np.array(p[0], np.float32) if len(p) > 2 else np.asarray(p[0], np.float32)
    lab = np.zeros(best.shape, np.uint8)
    for c in range(1, len(p)):
        plane = np.asarray(p[c], np.float32)
        # lab < c everywhere, so max(lab, c where greater else 0) sets c exactly there.
        greater = cv2.compare(plane, best, cv2.CMP_GT)  # 255 where greater, else 0
        cv2.max(lab, np.bitwise_and(greater, c, out=greater), dst=lab)
        if c < len(p) - 1:
            cv2.max(best, plane, dst=best)
    return lab


def confidences(output: np.ndarray, card: ModelCard, layout: str = "NCHW") -> np.ndarray:
    """Per class, the highest probability any pixel has for it (float32, C or 2 values).

    Logits (activation "none") go through softmax, or sigmoid for one channel.
    """
    p = np.asarray(planes(output, layout), np.float32)
    if len(p) == 1:
        fg = p[0]
        if card.output.activation == "none":
            fg = 1 / (1 + np.exp(-fg))
        return np.array([1 - fg.min(), fg.max()], np.float32)
    if card.output.activation == "none":
        e = np.exp(p - p.max(axis=0))
        p = e / e.sum(axis=0)
    return p.reshape(len(p), -1).max(axis=1)
