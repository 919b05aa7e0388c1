"""Release frames in real time, and replay a recording forever.

:func:`paced` is where a frame "enters echod": it sleeps until the frame is
due (on ``time.monotonic``; never a busy loop) and stamps
``meta.t_acquired_ns``. The schedule is absolute, so sleeping errors do not
accumulate; a consumer that falls more than :data:`RESYNC_AFTER_S` behind
moves the schedule instead of receiving a burst of overdue frames.

Looping: pass ``loop_source`` (typically the source's ``frames`` method) and,
each time a pass ends, it is called for the next one. Indices and
``t_source`` are shifted so both keep increasing across passes: the next
pass starts one frame interval (the mean interval of the pass just played,
else ``1/fps``, else :data:`~daemon.acquire.base.DEFAULT_FPS`) after the last
frame. The stream ends when a pass yields nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, Protocol

from daemon.acquire.base import DEFAULT_FPS
from daemon.frame import Frame

log = logging.getLogger(__name__)

Pace = Literal["timestamps", "fps", "none"]

RESYNC_AFTER_S = 0.5
"""A frame released this much later than due moves the schedule back to now."""


class StopEvent(Protocol):
    """A stop flag :func:`paced` can sleep on (``threading``/``multiprocessing.Event``)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def looped(
    first: Iterable[Frame],
    again: Callable[[], Iterable[Frame]] | None,
    *,
    fps: float | None = None,
) -> Iterator[Frame]:
    """``first``, then passes from ``again()`` until one is empty; see the module docstring."""
    passes = first
    index_shift, t_shift = 0, 0.0
    resume_at: tuple[int, float] | None = None  # (index, t_source) of the next pass's start
    while True:
        n, t_first, t_last, last_index = 0, 0.0, 0.0, 0
        for frame in passes:
            meta = frame.meta
            if n == 0 and resume_at is not None:
                index_shift, t_shift = resume_at[0] - meta.index, resume_at[1] - meta.t_source
            meta.index += index_shift
            meta.t_source += t_shift
            if n == 0:
                t_first = meta.t_source
            t_last, last_index = meta.t_source, meta.index
            n += 1
            yield frame
        if n == 0 or again is None:
            return
        period = (t_last - t_first) / (n - 1) if n > 1 else 0.0
        if period <= 0:
            period = 1.0 / (fps or DEFAULT_FPS)
        resume_at = (last_index + 1, t_last + period)
        log.debug("looping: a pass of %d frames ended; next index %d", n, resume_at[0])
        passes = again()


def paced(
    frames: Iterable[Frame],
    *,
    pace: Pace,
    fps: float | None,
    loop_source: Callable[[], Iterable[Frame]] | None = None,
    stop: StopEvent | None = None,
) -> Iterator[Frame]:
    """Yield ``frames`` when due and stamp ``meta.t_acquired_ns``.

    ``pace``: ``"timestamps"`` releases frame i at start + (t_source_i - t_source_0),
    ``"fps"`` every ``1/fps`` seconds, ``"none"`` at once. ``loop_source`` repeats the
    stream (module docstring). Setting ``stop`` ends the stream promptly, even
    mid-sleep. Bad arguments raise ValueError here, not at the first frame.
    """
    if pace not in ("timestamps", "fps", "none"):
        raise ValueError(f"pace must be 'timestamps', 'fps' or 'none', not {pace!r}")
    if pace == "fps" and (fps is None or fps <= 0):
        raise ValueError(f"pace='fps' needs a positive fps, got {fps!r}")
    interval = 1.0 / fps if pace == "fps" and fps else 0.0
    stream = looped(frames, loop_source, fps=fps)
    # never set, its wait() is a plain sleep
    return _released(stream, pace, interval, threading.Event() if stop is None else stop)


def _released(
    stream: Iterator[Frame], pace: Pace, interval: float, stop: StopEvent
) -> Iterator[Frame]:
    """The generator behind :func:`paced`."""
    start = t0 = 0.0
    for k, frame in enumerate(stream):
        if stop.is_set():
            return
        if pace != "none":
            now = time.monotonic()
            if k == 0:
                start, t0 = now, frame.meta.t_source
            offset = frame.meta.t_source - t0 if pace == "timestamps" else k * interval
            delay = start + offset - now
            if delay > 0:
                if stop.wait(delay):
                    return
            elif delay < -RESYNC_AFTER_S:
                log.debug("pacing %.3f s behind; moving the schedule", -delay)
                start -= delay
        frame.meta.t_acquired_ns = time.monotonic_ns()
        yield frame
