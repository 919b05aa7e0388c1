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

import math
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
    if img.ndim == 3:
        c = img.shape[0 if layout == "NCHW" else -1]
        one = img[0] if layout == "NCHW" else img[..., 0]
        img = one if c == 1 else img.mean(axis=0 if layout == "NCHW" else -1)
    return np.ascontiguousarray(img, np.float32)


_K5 = np.ones((5, 5), np.uint8)
_K9 = np.ones((9, 9), np.uint8)


def fov_mask(image: np.ndarray) -> np.ndarray:
    """:func:`field_of_view` as a uint8 mask (1 inside, 0 outside)."""
    above = (cv2.blur(image, (9, 9)) > FOV_LEVEL).view(np.uint8)  # dim speckle counts too
    mask: np.ndarray = cv2.morphologyEx(above, cv2.MORPH_OPEN, _K5)
    n, comp = cv2.connectedComponents(mask, connectivity=8)
    if n <= 1:
        return mask
    if n > 2:  # keep the largest (the first on a tie); with one, the mask is it
        biggest = 1 + int(np.bincount(comp.ravel(), minlength=n)[1:].argmax())
        mask = (comp == biggest).view(np.uint8)
    # closed: dark regions inside the view (vessels, cysts, shadows) are part of it
    closed: np.ndarray = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _K9)
    return closed


def field_of_view(image: np.ndarray) -> np.ndarray:
    """The field of view: the largest region whose local mean (9 x 9) is above
    :data:`FOV_LEVEL`, without what thin strokes (the scanner's text and marks) add to it,
    dark regions inside it included."""
    return fov_mask(image).view(bool)


def domain_features(image: np.ndarray) -> dict[str, float]:
    """The statistics :data:`FEATURES` of one input image (h, w), values 0..1.

    Masked sums are OpenCV's, with the masks as 0/1 factors and float64 accumulators:
    no float64 copies, no BLAS (OpenBLAS's threads woken per product fought the
    inference engine's for the CPU), about 0.45 ms for 256 x 256 on one core."""
    image = np.ascontiguousarray(image, np.float32)
    fov = fov_mask(image)
    out = dict.fromkeys(FEATURES, 0.0)
    n = cv2.countNonZero(fov)
    out["fov_fraction"] = n / fov.size
    if n < _MIN_FOV_PIXELS:
        return out
    mean, d = _centred(image, fov, n)
    out["fov_mean"] = mean
    out["fov_std"] = math.sqrt(_sum_sq(d) / n)
    out["neighbour_corr"] = _neighbour_corr(image, fov)
    out["local_std"] = _local_std(image, fov)
    out["top_sag"] = top_sag(fov)
    return out


def _sum(a: np.ndarray) -> float:
    """Sum of a float32 image, accumulated in float64."""
    return float(cv2.sumElems(a)[0])


def _sum_sq(a: np.ndarray) -> float:
    """Sum of squares of a float32 image, accumulated in float64."""
    return float(cv2.norm(a, cv2.NORM_L2SQR))


def _centred(x: np.ndarray, mask: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """The mean of ``x`` over ``mask`` (uint8 0/1, ``n`` ones) and ``x`` minus that mean
    where the mask is, 0 elsewhere: the second pass of a two-pass variance (one pass,
    E[x^2] - E[x]^2 in float32 products, is off by their rounding on a flat image)."""
    mean = _sum(cv2.multiply(x, mask, dtype=cv2.CV_32F)) / n
    return mean, cv2.multiply(np.subtract(x, mean, dtype=np.float32), mask, dtype=cv2.CV_32F)


def _neighbour_corr(image: np.ndarray, fov: np.ndarray) -> float:
    """Correlation of horizontally neighbouring pixels that are both in the field of view
    (``fov``: uint8 0/1): the pairs are the image without its first column (``a``) and
    without its last (``b``), where the pair mask is 1."""
    pair = cv2.min(fov[:, 1:], fov[:, :-1])
    k = cv2.countNonZero(pair)
    if k == 0:
        return 0.0
    _, da = _centred(image[:, 1:], pair, k)
    _, db = _centred(image[:, :-1], pair, k)
    va, vb = _sum_sq(da) / k, _sum_sq(db) / k
    if va <= 1e-12 or vb <= 1e-12:  # std below 1e-6: no correlation to speak of
        return 0.0
    return _sum(cv2.multiply(da, db)) / k / math.sqrt(va * vb)


def _local_std(image: np.ndarray, fov: np.ndarray) -> float:
    """Median over the eroded field of view of the 5 x 5 standard deviation; the median
    of the variance is taken (sqrt is monotone), the square root of its middle values
    (one partition: the upper middle is the least above the lower, numpy's partition at
    two places at once costs eight times as much)."""
    mean = cv2.blur(image, (5, 5))
    var = cv2.subtract(cv2.blur(cv2.multiply(image, image), (5, 5)), cv2.multiply(mean, mean))
    v = var[cv2.erode(fov, _K5).view(bool)]
    if not len(v):
        return 0.0
    lo, hi = (len(v) - 1) // 2, len(v) // 2
    part = np.partition(v, lo)
    upper = part[lo] if hi == lo else part[hi:].min()
    mid = np.sqrt(np.maximum(np.array([part[lo], upper], np.float32), 0.0))
    return float((mid[0] + mid[1]) / np.float32(2))


def top_sag(fov: np.ndarray) -> float:
    """How much the middle of the field of view's top edge lies below its ends (fraction
    of the image height), over the columns where the top edge is within 8 % of the
    image height of its highest point. A linear probe's face is flat (0), a curvilinear
    one bulges into the body (> 0); a body outline arches the other way (< 0).
    ``fov``: bool or uint8 mask."""
    cols = cv2.transpose(fov.view(np.uint8))  # a row per column: argmax finds its top
    first = cols.argmax(axis=1)
    inside = cols[np.arange(len(cols)), first] > 0
    if int(inside.sum()) < 10:
        return 0.0
    h = fov.shape[0]
    top = first[inside]
    t = top[top <= top.min() + 0.08 * h].astype(np.float32)
    if len(t) < 9:
        return 0.0
    third = len(t) // 3
    ends = np.concatenate([t[:third], t[-third:]])
    return float(_median(t[third:-third]) - _median(ends)) / h


def _median(v: np.ndarray) -> np.float32:
    """``np.median`` of a short float32 vector, without its generic machinery (15 us)."""
    s = np.sort(v)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / np.float32(2)


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
    # a pixel's most probable class is not 0 (ties go to the first, as argmax) exactly
    # where the best of the other classes beats class 0, and that best is its maximum
    other = probs[1]
    for plane in probs[2:]:
        other = cv2.max(other, plane)
    found = other > probs[0]
    n = int(np.count_nonzero(found))
    if n == 0:
        return 1.0, 0
    return float(other[found].mean()), n


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
        return self.verdict(self.out_of_domain(image), probs)

    def verdict(self, out_of_domain: str, probs: np.ndarray) -> Verdict:
        """Verdict for an input whose :meth:`out_of_domain` said ``out_of_domain`` and the
        class probabilities (C, h, w)."""
        conf, _ = finding_confidence(probs)
        why = out_of_domain
        if not why and conf < self.min_confidence:
            why = f"low confidence {conf:.3f} < {self.min_confidence:.3f}"
        return Verdict(not why, why, conf)
