"""The uncertainty guard: whether a frame's overlay may be shown at all.

Two checks per frame, on what the network saw and what it answered; their thresholds
are on the model card (``[guard]``, calibrated by the training script on held-out
simulated frames, never on real recordings):

- **domain**: does the network input look like the model's training domain? Image
  statistics (:data:`FEATURES`) of the input (its only or mean channel), each within the
  card's range: how much of the frame is the field of view (non-black), the field of
  view's mean and spread of grey, the correlation of neighbouring pixels (speckle is
  correlated over a few pixels, noise is not, smooth images are nearly 1), and the
  median local spread (speckle has texture everywhere, a CT slice or a drawing has
  flat regions), and the shape of the field of view's top edge (a probe's face is flat
  or bulges into the body; a body outline arches the other way).
- **confidence**: the mean, over the pixels labelled as a finding (any class but 0),
  of the probability of the label given there (max-softmax), at least
  ``min_confidence``. A frame with no finding passes this check.

A frame that fails either is *withheld*: its label map is blanked and it is flagged,
and the display says "no confident finding" instead of painting. Needs numpy and
OpenCV only (the training machine imports it too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

FEATURES = ("fov_fraction", "fov_mean", "fov_std", "neighbour_corr", "local_std", "top_sag")
FOV_LEVEL = 0.02  # inputs (0..1) above this are inside the field of view
_MIN_FOV_PIXELS = 256


def as_plane(x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    """The (h, w) image of a one-image network input (channels averaged)."""
    img = x[0]
    plane: np.ndarray = img.mean(axis=0 if layout == "NCHW" else -1) if img.ndim == 3 else img
    return plane.astype(np.float32, copy=False)


def field_of_view(image: np.ndarray) -> np.ndarray:
    """The field of view: the largest region whose local mean (9 x 9) is above
    :data:`FOV_LEVEL`, without what thin strokes (the scanner's text and marks) add to it,
    dark regions inside it included."""
    above = (cv2.blur(image, (9, 9)) > FOV_LEVEL).view(np.uint8)  # dim speckle counts too
    mask: np.ndarray = cv2.morphologyEx(above, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    biggest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    # closed: dark regions inside the view (vessels, cysts, shadows) are part of it
    inside = cv2.morphologyEx(
        (comp == biggest).view(np.uint8), cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8)
    )
    return inside.astype(bool)


def domain_features(image: np.ndarray) -> dict[str, float]:
    """The statistics :data:`FEATURES` of one input image (h, w), values 0..1."""
    fov = field_of_view(image)
    n = int(fov.sum())
    out = dict.fromkeys(FEATURES, 0.0)
    out["fov_fraction"] = n / fov.size
    if n < _MIN_FOV_PIXELS:
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
    out["top_sag"] = top_sag(fov)
    return out


def top_sag(fov: np.ndarray) -> float:
    """How much the middle of the field of view's top edge lies below its ends (fraction
    of the image height), over the columns where the top edge is within 8 % of the
    image height of its highest point. A linear probe's face is flat (0), a curvilinear
    one bulges into the body (> 0); a body outline arches the other way (< 0)."""
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


def probabilities(planes: np.ndarray | Sequence[np.ndarray], activation: str) -> np.ndarray:
    """Class probabilities (C, h, w; float32) from a segmentation output's class planes
    (C, h, w) with the card's output activation; one plane becomes background and
    foreground."""
    p = np.asarray(planes, np.float32)
    if len(p) == 1:
        fg = 1 / (1 + np.exp(-p[0])) if activation == "none" else p[0]
        return np.stack([1 - fg, fg])
    if activation == "none":
        e = np.exp(p - p.max(axis=0))
        p = e / e.sum(axis=0)
    return p


def finding_confidence(probs: np.ndarray) -> tuple[float, int]:
    """(mean max-probability over the pixels whose most probable class is not 0, their
    count) for class probabilities (C, h, w); (1.0, 0) when there is no such pixel."""
    best = probs.max(axis=0)
    # a pixel's most probable class is not 0 (ties go to the first, as argmax) exactly
    # where class 0 is below the best: one compare instead of an argmax over the classes
    found = probs[0] < best
    n = int(found.sum())
    if n == 0:
        return 1.0, 0
    return float(best[found].mean()), n


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one frame."""

    confident: bool
    reason: str  # "" when confident; else what failed, one line
    confidence: float  # finding_confidence (1.0 with no finding)


@dataclass(frozen=True)
class Guard:
    """Thresholds (from a model card) and the checks."""

    min_confidence: float
    domain: Mapping[str, tuple[float, float]]

    def out_of_domain(self, image: np.ndarray) -> str:
        """Why the input (h, w) is outside the training domain, or ""."""
        f = domain_features(image)
        for name, (lo, hi) in self.domain.items():
            if not lo <= f[name] <= hi:
                return f"out of domain: {name} {f[name]:.3f} not in [{lo:.3f}, {hi:.3f}]"
        return ""

    def judge(self, image: np.ndarray, probs: np.ndarray) -> Verdict:
        """Verdict for the input ``image`` (h, w) and the class probabilities (C, h, w)."""
        conf, _ = finding_confidence(probs)
        why = self.out_of_domain(image)
        if not why and conf < self.min_confidence:
            why = f"low confidence {conf:.3f} < {self.min_confidence:.3f}"
        return Verdict(not why, why, conf)
