"""Dynamic batching for the infer stage (Triton's dynamic batcher, in mode "all").

Frames waiting in the frames ring go to the engine together: :meth:`Batcher.gather`
takes up to ``max_batch`` of them, the first as the stage would (waiting up to its poll
time when nothing is in flight), the others only while they come within
``max_delay_s`` of the first (0: those already waiting). :meth:`Batcher.submit` makes
one engine call of them (``Network.submit_batch``) and gives one :class:`Pending`
per frame, in frame order, so the stage finishes, times and sends each frame as
before; :meth:`Batcher.saturated` keeps at most the engine's ``depth`` batches
unfinished. Mode "newest", or an engine whose model takes one image at a time
(``Engine.max_batch`` 1), and a sequence model keep batches of one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from daemon.engines.base import Pending, device_kind
from daemon.engines.network import Network
from daemon.ring import EndOfStream

log = logging.getLogger(__name__)

T = TypeVar("T")

GPU_BATCH = 8
"""Batch size in mode "all" on a GPU when ``pipeline.max_batch`` is 0 (auto); on a CPU
it is 1: there a batch was slower (ONNX Runtime, reference U-Net: ~20 % fewer frames/s)
and OpenVINO's streams already run requests side by side."""

SKIPPED = object()
"""What a ``take`` function returns for a frame it read but will not infer (refused, torn)."""


def batch_size(setting: int, mode: str, device: str) -> int:
    """The stage's largest batch: 1 in mode "newest"; ``setting``, or for 0 (auto)
    :data:`GPU_BATCH` on a GPU (device class cuda or gpu) and 1 elsewhere."""
    if mode != "all":
        return 1
    if setting:
        return setting
    return GPU_BATCH if device_kind(device) in ("cuda", "gpu") else 1


class Batcher(Generic[T]):
    """Gathers frames into batches for one :class:`Network` and submits them."""

    def __init__(self, net: Network, max_batch: int = 1, max_delay_s: float = 0.0) -> None:
        self.net = net
        self.max_batch = max(1, min(max_batch, net.engine.max_batch))
        self.max_delay_s = max_delay_s
        self.batches = 0
        self.frames = 0
        self.largest = 0
        self._sizes: deque[int] = deque(maxlen=net.depth)  # of the last batches
        if max_batch > self.max_batch:
            log.info(
                "batches of at most %d (engine %s takes %d at a time)",
                self.max_batch,
                net.engine.name,
                net.engine.max_batch,
            )

    def saturated(self, n: int) -> bool:
        """Whether the ``n`` frames in flight (the newest submitted) span the engine's
        depth in batches: then the stage finishes the oldest before it submits again, so
        no more than ``depth`` batches are ever unfinished (an engine may hand out views
        of its buffers, valid until ``depth`` more submissions)."""
        last = self._sizes
        return len(last) == last.maxlen and n > sum(last) - last[0]

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
        self._sizes.append(len(xs))
        return self.net.submit_batch(xs)

    def warmup(self, frame_shape: tuple[int, ...]) -> None:
        """One blank batch of each size up to ``max_batch`` through the engine (an engine
        that captures a CUDA graph per batch size does it here, not on the first frames)."""
        x = self.net.prepare(np.zeros(frame_shape, np.uint8))
        for n in range(self.max_batch, 1, -1):  # the largest first: buffers are made once
            for p in self.net.submit_batch([x] * n):
                self.net.result(p)
        log.info("%s warmed up for batches of 2 to %d", self.net.model.name, self.max_batch)

    def summary(self) -> dict[str, float | int]:
        """Batches made, their mean and largest size (for the stage's summary)."""
        mean = self.frames / self.batches if self.batches else 0.0
        return {"batches": self.batches, "batch_mean": round(mean, 2), "batch_max": self.largest}
