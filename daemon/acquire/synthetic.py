"""The synthetic source: live frames of the ultrasound simulator, with ground-truth labels.

Frames come from :class:`daemon.phantoms.ultrasound.Phantom`: by default a transverse
view of the neck through a linear probe (skin, fat, a striated muscle between fasciae,
deeper tissue) with a pulsating carotid artery and a compressible jugular vein, imaged
with the convolution model (scatterers, a depth-dependent point-spread function,
envelope detection, time-gain compensation, log compression); ``scene`` picks another
(an abdomen through a curvilinear probe, water, fluid, air). Labels follow FAST's
convention: 0 background, 1 artery, 2 vein (lumens).

Everything random is drawn from ``seed``, and frame ``i`` is a pure function of ``i``,
so :meth:`SyntheticSource.frame_with_labels` can be called in any order.

Real time: the motion repeats every ``loop_s`` seconds and the source keeps the frames
of one loop once rendered (about 25 ms a frame at 256 x 256 on one core of a 2-core
machine, so the first loop is real time and later ones cost a lookup). ``prerender``
renders the loop before the first frame: for benchmarks, whose pace is faster than the
simulator renders (the first loop would come late, then its overdue frames in a burst).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from daemon.acquire.base import DEFAULT_FPS, fps_str, shape_str
from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta
from daemon.phantoms.ultrasound import ARTERY, VEIN, Phantom, Truth

__all__ = ["ARTERY", "VEIN", "SyntheticSettings", "SyntheticSource"]

log = logging.getLogger(__name__)

CACHE_BYTES = 64 * 2**20  # one loop of frames and labels is kept up to this size


class SyntheticSettings(BaseModel):
    """The synthetic source's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(
        default=256, ge=256, le=1024, description="Image width in pixels (lateral direction)."
    )
    height: int = Field(
        default=256,
        ge=256,
        le=1024,
        description="Image height in pixels (depth). Pixels are square; the field of view "
        "fills the image.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Random seed for the scene (vessel positions and sizes, heart rate, "
        "layers, motion), the scanner settings and the speckle: the same seed and size give "
        "the same frames.",
    )
    scene: Literal["neck", "abdomen", "water", "fluid", "air"] = Field(
        default="neck",
        description="What the probe sees: 'neck' (linear probe, carotid artery and jugular "
        "vein), 'abdomen' (curvilinear probe, aorta and vena cava), or scenes with no vessel: "
        "'water', 'fluid', 'air'.",
    )
    loop_s: float = Field(
        default=4.0,
        gt=0,
        le=60,
        description="Seconds after which the motion (heart beat, vein compression, probe "
        "drift) repeats; one loop of frames is rendered once and then replayed.",
    )
    prerender: bool = Field(
        default=False,
        description="Render the whole loop when the source opens, before the first frame "
        "(seconds for a long loop): the first loop then comes at the pace asked, not as fast "
        "as the simulator renders (benchmarks at hundreds of frames a second).",
    )
    sweep: bool = Field(
        default=False,
        description="Slide the probe sideways once per loop, from the vessels to where none "
        "is in view and back (something for a view classifier: 'vessels in view' / 'no "
        "vessels'). Needs a linear probe: not with scene 'abdomen'.",
    )
    needle: bool = Field(
        default=False,
        description="A needle that advances in plane toward the artery and back once per "
        "loop (something for a needle-tip detector); its tip is the ground truth "
        "(SyntheticSource.truth).",
    )

    @model_validator(mode="after")
    def _sweep_needs_linear(self) -> SyntheticSettings:
        if self.sweep and self.scene == "abdomen":
            raise ValueError(
                "sweep slides a linear probe; scene 'abdomen' is imaged through a curvilinear "
                "one: use scene 'neck', or sweep = false"
            )
        return self


class SyntheticSource:
    """Endless frames of the simulator; see the module docstring."""

    def __init__(self, settings: SyntheticSettings | None = None, fps: float | None = None) -> None:
        """``fps``: the simulated scanner's frame rate (frame i has t_source = i / fps)."""
        self.settings = s = settings or SyntheticSettings()
        self.fps = fps or DEFAULT_FPS
        self.phantom = Phantom(
            (s.height, s.width),
            seed=s.seed,
            kind=s.scene,
            fps=self.fps,
            loop_s=s.loop_s,
            sweep=s.sweep,
            needle=s.needle,
        )
        self.spacing_mm = sp = self.phantom.spacing_mm
        self.heart_rate_hz = self.phantom.heart_rate_hz
        self.nominal_fps: float | None = self.fps
        self.max_shape: tuple[int, ...] = (s.height, s.width)
        self.dtype = np.dtype(np.uint8)
        extras = "".join(f", {name}" for name in ("sweep", "needle") if getattr(s, name))
        self.description = (
            f"synthetic {s.scene} ({shape_str(self.max_shape, self.dtype)}, {fps_str(self.fps)}, "
            f"seed {s.seed}{extras})"
        )
        self._transform = np.diag([sp, sp, 1.0, 1.0])
        loop = self.phantom.loop_frames
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, Truth]] | None = (
            {} if loop * 2 * s.width * s.height <= CACHE_BYTES else None
        )
        log.info(
            "synthetic source: %s, %.3f mm/px, %s probe %.0f mm deep at %.1f MHz, "
            "loop of %d frames%s",
            self.description,
            sp,
            self.phantom.probe.kind,
            self.phantom.probe.depth,
            self.phantom.scanner.f0,
            loop,
            "" if self._cache is not None else " (too large to keep: rendered every time)",
        )
        if s.prerender:
            self._prerender()

    def _prerender(self) -> None:
        loop = self.phantom.loop_frames
        if self._cache is None:
            raise SourceError(
                f"source.synthetic.prerender: a loop of {loop} frames of "
                f"{shape_str(self.max_shape, self.dtype)} is more than the "
                f"{CACHE_BYTES >> 20} MiB kept; shorten source.synthetic.loop_s or the frame"
            )
        t = time.monotonic()
        for i in range(loop):
            self._render(i)
        log.info(
            "synthetic source: loop of %d frames rendered in %.1f s", loop, time.monotonic() - t
        )

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray, Truth]:
        key = index % self.phantom.loop_frames
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is None:
            cached = self.phantom.frame_with_truth(key)
            if self._cache is not None:
                self._cache[key] = cached
        return cached

    def truth(self, index: int) -> Truth:
        """What frame ``index`` shows: vessels in view or not, the needle's tip (pixels and
        mm) when one is in view (daemon/phantoms/ultrasound.py)."""
        return self._render(index)[2]

    def frame_with_labels(self, index: int) -> tuple[Frame, np.ndarray]:
        """Frame ``index`` and its label map (uint8: 0 background, 1 artery, 2 vein)."""
        image, labels, _ = self._render(index)
        meta = FrameMeta.for_array(
            image,
            index=index,
            t_source=index / self.fps,
            spacing=(self.spacing_mm, self.spacing_mm, 1.0),
            transform=self._transform.copy(),
        )
        return Frame(image.copy(), meta), labels.copy()

    def frames(self) -> Iterator[Frame]:
        """Frames 0, 1, 2, ... without end."""
        index = 0
        while True:
            yield self.frame_with_labels(index)[0]
            index += 1

    def close(self) -> None:
        """Nothing to release."""
