"""Tiling: patches over a 2-D or 3-D image, any predictor, blended back together.

Pure functions and one accumulator, shared by the CT and WSI jobs::

    for start, block in tiling.windows(image, predictor, patch=(32, 512, 512)):
        ...  # block: (C, n, ...) rows start..start+n of the blended output, final

- :func:`grid` places patches as MONAI's ``sliding_window_inference`` does: a stride
  of ``int(patch * (1 - overlap))``, the last patch of each axis moved back to end at
  the image's edge, an axis shorter than the patch padded on both sides (the patch
  starts at a negative index);
- :func:`grid` with a ``mask`` (any resolution: it is scaled to the image) keeps the
  patches that cover at least ``min_fraction`` of mask (any, by default);
- :func:`extract` cuts one patch, padding what lies outside the image (a constant,
  ``"edge"`` or ``"reflect"``);
- :class:`Stitcher` accumulates each output times a weight map (:func:`weights`:
  ``"constant"``, ``"linear"`` ramps over the overlap, ``"gaussian"`` with sigma
  ``sigma_scale * patch`` as MONAI and nnU-Net) and hands out rows along the first
  axis as soon as no later patch can reach them: it holds at most one patch's depth
  of rows, not the whole output;
- :func:`windows` runs it all: the patches are cut in a thread of their own, ahead
  of the predictor, through a bounded queue (:func:`prefetch`), in batches of
  ``batch``. The predictor takes ``(N, *patch, *rest)`` (``rest``: trailing image
  axes such as RGB) and returns ``(N, C, *patch)``;
- :func:`stitch` is its blending half alone, for outputs computed elsewhere (in
  :func:`grid` order: the blend is then the same, float for float).

Rows not covered by any patch (masked out) are ``fill``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

Blend = Literal["constant", "linear", "gaussian"]
Pad = float | Literal["edge", "reflect"]
Position = tuple[int, ...]
Predictor = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")


@dataclass
class Timings:
    """Seconds per step (``generator``, ``stitcher``, and whatever a predictor adds)."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, step: str, seconds: float) -> None:
        self.seconds[step].append(seconds)

    def total_ms(self, step: str) -> float:
        return 1e3 * sum(self.seconds.get(step, ()))


def _per_axis(value: float | Sequence[float], n: int, what: str) -> tuple[float, ...]:
    values = (value,) * n if isinstance(value, int | float) else tuple(value)
    if len(values) != n:
        raise ValueError(f"{what} needs 1 or {n} values, got {len(values)}")
    return values


def strides(
    shape: Sequence[int], patch: Sequence[int], overlap: float | Sequence[float]
) -> tuple[int, ...]:
    """Step between patch origins per axis (MONAI's scan interval)."""
    ov = _per_axis(overlap, len(patch), "overlap")
    if any(not 0 <= o < 1 for o in ov):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return tuple(
        p if max(s, p) == p else max(int(p * (1 - o)), 1)
        for s, p, o in zip(shape, patch, ov, strict=True)
    )


def _starts(size: int, p: int, step: int) -> list[int]:
    if size <= p:
        return [-((p - size) // 2)]  # one patch, padded on both sides
    n = next(d for d in range(math.ceil(size / step)) if d * step + p >= size) + 1
    return [min(d * step, size - p) for d in range(n)]


def grid(
    shape: Sequence[int],
    patch: Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    mask: np.ndarray | None = None,
    min_fraction: float = 0.0,
) -> list[Position]:
    """Patch origins covering ``shape`` (spatial), in raster order (first axis slowest).

    With ``mask`` (same number of axes, any size), a patch is kept when the mask is
    set on more than ``min_fraction`` of its footprint (``> 0``: on any of it)."""
    if len(shape) != len(patch) or any(p < 1 for p in patch):
        raise ValueError(f"patch {tuple(patch)} does not fit an image of {len(shape)} axes")
    step = strides(shape, patch, overlap)
    axes = [_starts(s, p, st) for s, p, st in zip(shape, patch, step, strict=True)]
    positions = [
        tuple(int(v) for v in pos)
        for pos in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))
    ]
    if mask is None:
        return positions
    if mask.ndim != len(shape):
        raise ValueError(f"mask of {mask.ndim} axes for an image of {len(shape)}")
    scale = [m / s for m, s in zip(mask.shape, shape, strict=True)]
    m = mask.astype(bool)
    kept = []
    for pos in positions:
        box = tuple(
            slice(max(0, math.floor(o * f)), max(math.floor(o * f) + 1, math.ceil((o + p) * f)))
            for o, p, f in zip(pos, patch, scale, strict=True)
        )
        part = m[box]
        if part.size and float(part.mean()) > min_fraction:
            kept.append(pos)
    return kept


def extract(
    image: np.ndarray, position: Position, patch: Sequence[int], pad: Pad = 0.0
) -> np.ndarray:
    """The patch at ``position`` (spatial axes first; trailing axes whole): a view when it
    lies inside ``image``, else a padded copy."""
    k = len(patch)
    lo = [max(0, o) for o in position]
    hi = [min(s, o + p) for s, o, p in zip(image.shape[:k], position, patch, strict=True)]
    part = image[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    widths = [(a - o, o + p - b) for a, b, o, p in zip(lo, hi, position, patch, strict=True)]
    if not any(w for pair in widths for w in pair):
        return part
    widths += [(0, 0)] * (image.ndim - k)
    if isinstance(pad, str):
        if part.size == 0:
            raise ValueError(f"patch at {position} lies wholly outside the image")
        return np.pad(part, widths, mode=pad)
    return np.pad(part, widths, mode="constant", constant_values=pad)


def _ramp(p: int, o: int) -> np.ndarray:
    """1-D linear weight: rises over ``o`` samples at each end (pairs sum to 1), flat between."""
    if o <= 0:
        return np.ones(p, np.float32)
    t = np.arange(p, dtype=np.float64)
    return np.clip((np.minimum(t, p - 1 - t) + 0.5) / o, 1e-3, 1.0).astype(np.float32)


def weights(
    patch: Sequence[int],
    blend: Blend = "gaussian",
    overlap: float | Sequence[float] = 0.25,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """The weight map of one patch (float32, at least 1e-3, as MONAI's)."""
    if blend == "constant":
        return np.ones(tuple(patch), np.float32)
    if blend == "linear":
        ov = _per_axis(overlap, len(patch), "overlap")
        axes = [
            _ramp(p, p - max(int(p * (1 - o)), 1) if o > 0 else 0)
            for p, o in zip(patch, ov, strict=True)
        ]
    elif blend == "gaussian":
        axes = []
        for p in patch:
            x = np.arange(p, dtype=np.float64) - (p - 1) / 2
            axes.append(np.exp(-(x**2) / (2 * (sigma_scale * p) ** 2)))
    else:
        raise ValueError(f"blend {blend!r}: one of constant, linear, gaussian")
    w = axes[0]
    for a in axes[1:]:
        w = np.multiply.outer(w, a)
    w = np.asarray(w, np.float32)
    return np.maximum(w, max(float(w.min()), 1e-3))  # MONAI's floor: edges still count


class Stitcher:
    """Blends patch outputs ``(C, *patch)`` into the output ``(C, *shape)``, row block by
    row block: :meth:`add` returns the rows that no later patch can reach.

    Patches must come in :func:`grid` order (first-axis origins never decrease)."""

    def __init__(
        self,
        shape: Sequence[int],
        patch: Sequence[int],
        channels: int,
        blend: Blend = "gaussian",
        overlap: float | Sequence[float] = 0.25,
        sigma_scale: float = 0.125,
        fill: float = 0.0,
    ) -> None:
        self.shape = tuple(shape)
        self.patch = tuple(patch)
        self.channels = channels
        self.fill = fill
        self._w = weights(patch, blend, overlap, sigma_scale)
        self._constant = blend == "constant"
        depth = min(self.patch[0], self.shape[0])
        self._acc = np.zeros((channels, depth, *self.shape[1:]), np.float32)
        self._sum = np.zeros((depth, *self.shape[1:]), np.float32)
        self._base = 0  # image row of buffer row 0
        self._last = -(10**9)

    def _release(self, upto: int) -> list[tuple[int, np.ndarray]]:
        """Hand out rows ``base..upto`` (image rows) and move the buffer on; rows past the
        buffer (a gap no patch covers) are ``fill``."""
        upto = min(upto, self.shape[0])
        n = upto - self._base
        if n <= 0:
            return []
        depth = self._sum.shape[0]
        k = min(n, depth)
        ws = self._sum[:k]
        block = np.full((self.channels, n, *self.shape[1:]), self.fill, np.float32)
        np.divide(self._acc[:, :k], ws, out=block[:, :k], where=ws > 0)
        if k < depth:
            self._acc[:, : depth - k] = self._acc[:, k:].copy()
            self._sum[: depth - k] = self._sum[k:].copy()
        self._acc[:, depth - k :] = 0
        self._sum[depth - k :] = 0
        start, self._base = self._base, upto
        return [(start, block)]

    def add(self, position: Position, output: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Accumulate one output; returns the finished ``(start, rows)`` blocks."""
        if output.shape != (self.channels, *self.patch):
            raise ValueError(
                f"predictor output {output.shape}: expected {(self.channels, *self.patch)}"
            )
        if position[0] < self._last:
            raise ValueError(f"patch at {position} after one at row {self._last}: not grid order")
        self._last = position[0]
        done = self._release(max(position[0], 0))
        lo = [max(0, o) for o in position]
        hi = [min(s, o + p) for s, o, p in zip(self.shape, position, self.patch, strict=True)]
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, position, strict=True))
        dst = (
            slice(lo[0] - self._base, hi[0] - self._base),
            *(slice(a, b) for a, b in zip(lo[1:], hi[1:], strict=True)),
        )
        src_all: tuple[slice, ...] = (slice(None), *src)  # every channel
        dst_all: tuple[slice, ...] = (slice(None), *dst)
        out = output[src_all]
        if self._constant:
            self._acc[dst_all] += out
            self._sum[dst] += 1.0
        else:
            w = self._w[src]
            self._acc[dst_all] += out * w
            self._sum[dst] += w
        return done

    def close(self) -> list[tuple[int, np.ndarray]]:
        """The rows still held (call once, after the last patch)."""
        return self._release(self.shape[0])


_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Generator[T, None, None]:
    """``items``, produced in a thread of its own up to ``depth`` ahead of the consumer.

    An exception in the producer is raised in the consumer; closing the consumer
    (``break``, an exception) stops the producer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:
            put(_Failed(exc))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="tiling-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def _batches(
    image: np.ndarray,
    positions: list[Position],
    patch: Sequence[int],
    batch: int,
    pad: Pad,
    prepare: Callable[[np.ndarray], np.ndarray] | None,
    timings: Timings | None,
) -> Iterator[tuple[list[Position], np.ndarray]]:
    for i in range(0, len(positions), batch):
        t0 = time.perf_counter()
        group = positions[i : i + batch]
        data = np.stack([extract(image, p, patch, pad) for p in group])
        if timings is not None:
            timings.add("generator", time.perf_counter() - t0)
        yield group, data if prepare is None else prepare(data)


def stitch(
    shape: Sequence[int],
    patch: Sequence[int],
    outputs: Iterable[tuple[list[Position], np.ndarray]],
    *,
    overlap: float | Sequence[float] = 0.25,
    blend: Blend = "gaussian",
    sigma_scale: float = 0.125,
    fill: float = 0.0,
    timings: Timings | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Blend batches of outputs ``(positions, (N, C, *patch))``, given in :func:`grid`
    order, into the output rows ``(start, (C, n, ...))``, in order, each once: the one
    place patches are blended, whether the outputs come from a predictor here
    (:func:`windows`) or from files a cluster wrote (the CT job on Dask)."""
    k = len(patch)
    stitcher: Stitcher | None = None
    for group, batch in outputs:
        out = np.asarray(batch)
        if out.ndim != k + 2 or out.shape[0] != len(group):
            raise ValueError(
                f"predictor output {out.shape} for a batch of {len(group)} patches: "
                f"expected ({len(group)}, C, {', '.join(map(str, patch))})"
            )
        t0 = time.perf_counter()
        if stitcher is None:
            stitcher = Stitcher(shape, patch, out.shape[1], blend, overlap, sigma_scale, fill)
        done = [block for pos, o in zip(group, out, strict=True) for block in stitcher.add(pos, o)]
        if timings is not None:
            timings.add("stitcher", time.perf_counter() - t0)
        yield from done
    if stitcher is None:  # nothing to predict (all masked out): one block of fill
        return
    yield from stitcher.close()


def windows(
    image: np.ndarray,
    predictor: Predictor,
    patch: Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    blend: Blend = "gaussian",
    batch: int = 1,
    mask: np.ndarray | None = None,
    min_fraction: float = 0.0,
    pad: Pad = 0.0,
    depth: int = 2,
    sigma_scale: float = 0.125,
    fill: float = 0.0,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    timings: Timings | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Sliding-window inference, streamed: ``(start, block)`` with ``block`` the blended
    output rows ``start..start + len`` as ``(C, n, ...)``, in order, each once.

    The predictor is called once per batch, in :func:`grid` order, with the batch of
    patches, or what ``prepare`` made of it in the prefetch thread (a network's input
    step, overlapping the previous batch's inference); ``timings`` gets ``generator``
    (per batch, in the prefetch thread) and ``stitcher`` seconds."""
    k = len(patch)
    positions = grid(image.shape[:k], patch, overlap, mask, min_fraction)
    cut = _batches(image, positions, patch, batch, pad, prepare, timings)
    with closing(prefetch(cut, depth)) as batches:
        yield from stitch(
            image.shape[:k],
            patch,
            ((group, predictor(data)) for group, data in batches),
            overlap=overlap,
            blend=blend,
            sigma_scale=sigma_scale,
            fill=fill,
            timings=timings,
        )


def predict(
    image: np.ndarray, predictor: Predictor, patch: Sequence[int], **options: Any
) -> np.ndarray:
    """:func:`windows` gathered into one ``(C, *shape)`` array (for small images and tests).

    With no patch to run (all masked out) the result has 0 channels."""
    k = len(patch)
    blocks = list(windows(image, predictor, patch, **options))
    if not blocks:
        return np.zeros((0, *image.shape[:k]), np.float32)
    return np.concatenate([b for _, b in blocks], axis=1)
