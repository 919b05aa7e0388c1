"""Frame -> network input, on the CPU (numpy/OpenCV); runs once per frame.

``prepare(image, spec, card)`` means, for each output element::

    v = bilinear_resize(image)[y, x, channel]            # half-pixel centres
    x = (clip(v, *card.clip) * card.scale - mean[c]) / std[c]

with gray replicated when the model wants 3 channels, RGB -> gray (ITU-R 601
weights) when it wants 1, the model's layout (NCHW or NHWC) and a batch
dimension of 1. Where the frame goes in the network input is its :class:`Geometry`:
stretched over the whole input (the default), scaled by one factor and padded with
zeros at the bottom/right (the card's ``aspect = "keep"``: a letterbox), or padded to
a multiple of the model's stride (``multiple`` with ``fit = "pad"``). Integer frames
are resized in their own type (OpenCV rounds to the nearest level), so results agree
with an exact float implementation to within one input level times ``scale / std``;
float frames agree to float32 precision. The OpenCL twin must keep this signature and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from daemon.engines.base import Layout, TensorSpec
from daemon.engines.card import ModelCard, Normalisation
from daemon.errors import ModelError

# dtypes cv2.resize handles; anything else is converted to float32 first.
_CV_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64))
# dtypes cv2.cvtColor handles for RGB -> gray.
_GRAY_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.float32))


def layout_of(spec: TensorSpec, card: ModelCard) -> Layout:
    """The input layout: the card's override, else what was detected."""
    layout = card.input.layout or spec.layout
    if layout not in ("NCHW", "NHWC"):
        raise ModelError(
            f"input {spec.name!r} {spec.describe()}: frames need an NCHW or NHWC input"
            + ("; set [input] layout in the model card" if layout is None else "")
        )
    return layout


def network_size(spec: TensorSpec, card: ModelCard, frame_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) the network gets: the card's size, else the model's, else the frame's
    (padded up, or resized to the nearest, multiple of the card's ``multiple``)."""
    if card.input.size is not None:
        return card.input.size
    dims = spec.shape[2:] if layout_of(spec, card) == "NCHW" else spec.shape[1:3]
    m = card.input.multiple or 1
    fit = _padded if card.input.fit == "pad" else _nearest
    return (dims[0] or fit(frame_hw[0], m), dims[1] or fit(frame_hw[1], m))


def _padded(side: int, m: int) -> int:
    return -(-side // m) * m


def _nearest(side: int, m: int) -> int:
    return max(m, round(side / m) * m)


def pads(card: ModelCard) -> bool:
    """Whether frames are padded (not resized) to the network size."""
    return card.input.size is None and card.input.multiple is not None and card.input.fit == "pad"


@dataclass(frozen=True)
class Geometry:
    """Where a frame of ``frame`` (h, w) lies in a network input of ``network`` (h, w):
    in its top-left ``content`` (h, w), resized; the rest is zero padding."""

    frame: tuple[int, int]
    network: tuple[int, int]
    content: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Frame pixels per network-input pixel, (x, y)."""
        return (self.frame[1] / self.content[1], self.frame[0] / self.content[0])

    def crop(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of a map of ``shape`` (h, w) over the whole network input that
        cover the frame (all of them without padding)."""
        if self.content == self.network:
            return shape
        return (
            max(1, min(shape[0], round(self.content[0] * shape[0] / self.network[0]))),
            max(1, min(shape[1], round(self.content[1] * shape[1] / self.network[1]))),
        )


def geometry(spec: TensorSpec, card: ModelCard, frame_hw: tuple[int, int]) -> Geometry:
    """The :class:`Geometry` of frames of ``frame_hw`` for this input and card."""
    h, w = network_size(spec, card, frame_hw)
    fh, fw = frame_hw
    if (h, w) == (fh, fw) or (pads(card) and h >= fh and w >= fw):
        content = (min(fh, h), min(fw, w))
    elif card.input.aspect == "keep":
        f = min(h / fh, w / fw)
        content = (max(1, min(h, round(fh * f))), max(1, min(w, round(fw * f))))
    else:
        content = (h, w)
    return Geometry((fh, fw), (h, w), content)


def network_channels(spec: TensorSpec, card: ModelCard, image_channels: int) -> int:
    """Channels the network gets: the model's, else the card's, else the frame's."""
    dim = spec.shape[1] if layout_of(spec, card) == "NCHW" else spec.shape[3]
    return dim or card.input.channels or image_channels


def affine(card: ModelCard, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(a, b)`` with ``x = v * a + b`` = ``(v * scale - mean) / std``."""
    return _affine(card.input.normalisation, channels)


@lru_cache(maxsize=64)
def _affine(norm: Normalisation, channels: int) -> tuple[np.ndarray, np.ndarray]:
    std = np.asarray(norm.std or (1.0,), np.float64)
    mean = np.asarray(norm.mean or (0.0,), np.float64)
    for what, v in (("mean", mean), ("std", std)):
        if v.size not in (1, channels):
            raise ModelError(
                f"model card normalisation {what} has {v.size} values; "
                f"the model has {channels} channels"
            )
    return np.broadcast_to(norm.scale / std, (channels,)), np.broadcast_to(-mean / std, (channels,))


def prepare(image: np.ndarray, spec: TensorSpec, card: ModelCard) -> np.ndarray:
    """Network input for one frame (HxW or HxWxC, C in 1 or 3); see the module doc."""
    layout = layout_of(spec, card)
    src = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    g = geometry(spec, card, (src.shape[0], src.shape[1]))
    (h, w), (ch, cw) = g.network, g.content
    c = network_channels(spec, card, 1 if src.ndim == 2 else src.shape[2])

    if src.dtype not in _CV_DTYPES:
        src = src.astype(np.float32)
    if src.shape[:2] != (ch, cw):
        src = cv2.resize(src, (cw, ch), interpolation=cv2.INTER_LINEAR)
    if (ch, cw) != (h, w):
        src = cv2.copyMakeBorder(src, 0, h - ch, 0, w - cw, cv2.BORDER_CONSTANT, value=0)
    if c == 1 and src.ndim == 3:
        if src.dtype not in _GRAY_DTYPES:
            src = src.astype(np.float32)
        src = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)

    shape = (1, c, h, w) if layout == "NCHW" else (1, h, w, c)
    dtype = spec.dtype if spec.dtype.kind == "f" else np.dtype(np.float32)
    out = np.empty(shape, dtype)

    # One strided pass converts, scales, broadcasts gray -> C and changes layout.
    hwc = src[:, :, None] if src.ndim == 2 else src
    view = hwc.transpose(2, 0, 1) if layout == "NCHW" else hwc
    alpha, beta, bounds = _coefficients(card.input.normalisation, c, layout)
    np.multiply(view, alpha, out=out[0], casting="unsafe")
    if beta is not None:
        np.add(out[0], beta, out=out[0], casting="unsafe")
    if bounds is not None:
        np.clip(out[0], *bounds, out=out[0], casting="unsafe")
    return out


_Coefficients = tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]


@lru_cache(maxsize=64)
def _coefficients(norm: Normalisation, c: int, layout: Layout) -> _Coefficients:
    """float32 ``a``, ``b`` (None without a mean) and clip bounds (None without a clip),
    shaped to broadcast over one frame: computed once per card, not per frame."""
    alpha, beta = _affine(norm, c)
    per = (c, 1, 1) if layout == "NCHW" else (c,)
    a = alpha.astype(np.float32).reshape(per)
    b = beta.astype(np.float32).reshape(per) if norm.mean is not None else None
    bounds = None
    if norm.clip is not None:
        # clip(v) * a + b == clip(v * a + b, lo * a + b, hi * a + b) as a > 0
        lo, hi = (np.float32(v) * alpha + beta for v in norm.clip)
        bounds = (lo.astype(np.float32).reshape(per), hi.astype(np.float32).reshape(per))
    for arr in (a, b, *(bounds or ())):
        if arr is not None:
            arr.flags.writeable = False  # shared by every frame of this card
    return a, b, bounds
