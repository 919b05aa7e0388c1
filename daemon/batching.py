"""Dynamic batching for the infer stage (Triton's dynamic batcher, in mode "all").

Frames waiting in the frames ring go to the engine together: :meth:`Batcher.gather`
takes up to ``max_batch`` of them, the first as the stage would (waiting up to its poll
time when nothing is in flight), the others only while they come within
``max_delay_s`` of the first (0: those already waiting). :meth:`Batcher.submit` makes
one engine call of them (``Segmenter.submit_batch``) and gives one :class:`Pending`
per frame, in frame order, so the stage finishes, times and sends each frame as
before. Mode "newest", or an engine whose model takes one image at a time
(``Engine.max_batch`` 1), keeps batches of one: then ``gather`` reads one frame and
``submit`` is ``Segmenter.submit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from daemon.engines.base import Pending
from daemon.engines.segmenter import Segmenter
from daemon.ring import EndOfStream

log = logging.getLogger(__name__)

T = TypeVar("T")

SKIPPED = object()
"""What a ``take`` function returns for a frame it read but will not infer (refused, torn)."""


class Batcher(Generic[T]):
    """Gathers frames into batches for one :class:`Segmenter` and submits them."""

    def __init__(self, seg: Segmenter, max_batch: int = 1, max_delay_s: float = 0.0) -> None:
        self.seg = seg
        self.max_batch = max(1, min(max_batch, seg.engine.max_batch))
        self.max_delay_s = max_delay_s
        self.batches = 0
        self.frames = 0
        self.largest = 0
        if max_batch > self.max_batch:
            log.info(
                "batches of at most %d (engine %s takes %d at a time)",
                self.max_batch,
                seg.engine.name,
                seg.engine.max_batch,
            )

    @property
    def depth(self) -> int:
        """Frames worth keeping in flight: the engine's depth in batches."""
        return self.seg.depth * self.max_batch

    def gather(self, take: Callable[[float], T | object | None], wait: float) -> list[T]:
        """Up to ``max_batch`` items from ``take(timeout)`` (an item, None when no frame
        came within ``timeout``, or :data:`SKIPPED`), the first within ``wait`` seconds.
        At most ``max_batch`` frames are read per call; the end of the stream ends the
        batch (and is raised when the batch is empty)."""
        items: list[T] = []
        timeout, deadline = wait, 0.0
        for _ in range(self.max_batch):
            try:
                got = take(timeout)
            except EndOfStream:
                if not items:
                    raise
                break
            if got is None:
                break
            if got is not SKIPPED:
                items.append(got)  # type: ignore[arg-type]
                if len(items) == 1:
                    deadline = time.monotonic() + self.max_delay_s
            if items:
                timeout = max(0.0, deadline - time.monotonic())
        return items

    def submit(self, xs: list[np.ndarray]) -> list[Pending]:
        """One engine call for the prepared inputs ``xs``; a Pending per frame, in order."""
        self.batches += 1
        self.frames += len(xs)
        self.largest = max(self.largest, len(xs))
        if len(xs) == 1:
            return [self.seg.submit(xs[0])]
        return self.seg.submit_batch(xs)

    def warmup(self, frame_shape: tuple[int, ...]) -> None:
        """One blank batch of each size up to ``max_batch`` through the engine (an engine
        that captures a CUDA graph per batch size does it here, not on the first frames)."""
        x = self.seg.prepare(np.zeros(frame_shape, np.uint8))
        for n in range(2, self.max_batch + 1):
            for p in self.seg.submit_batch([x] * n):
                self.seg.result(p)
        log.info("%s warmed up for batches of 2 to %d", self.seg.model.name, self.max_batch)

    def summary(self) -> dict[str, float | int]:
        """Batches made, their mean and largest size (for the stage's summary)."""
        mean = self.frames / self.batches if self.batches else 0.0
        return {"batches": self.batches, "batch_mean": round(mean, 2), "batch_max": self.largest}
