"""One segmentation model ready for frames: engine + model card + pre/post-processing.

The infer stage calls the three steps separately so it can time each (the
paper's Table 2: NN input, NN inference, NN output)::

    seg = Segmenter.open(path, engine=None, device="cpu")
    seg.check_frame(frame.shape, frame.dtype)     # once: one-line ModelError if it cannot fit
    x = seg.prepare(frame)                        # resize + normalise + layout
    y = seg.infer(x)                              # the engine
    label_map = seg.finish(y, frame.shape)        # argmax/threshold + resize back

With a ``[guard]`` on the card, ``labels, verdict = seg.finish_guarded(y, frame.shape, x)``
also judges the frame (daemon/engines/guard.py): a frame the guard does not trust gets
an empty label map and ``verdict.confident`` False, with the reason.

For throughput (mode "all"), keep up to ``seg.depth`` frames in flight:
``p = seg.submit(x)`` returns at once, ``seg.result(p)`` waits for that
frame's output; results come back in submission order.

``preprocess`` ("cpu", "opencl", "auto") picks the pre-processing path
(``opencl.choose``); what runs, and why not OpenCL, is in :meth:`Segmenter.describe`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from daemon.engines import loading, opencl, postprocess, precision, preprocess
from daemon.engines.base import Engine, Pending, TensorSpec
from daemon.engines.card import ClassCard, ModelCard, card_path
from daemon.engines.guard import Guard, Verdict, as_plane, probabilities
from daemon.errors import ModelError

log = logging.getLogger(__name__)

_IMAGE_LAYOUTS = ("NCHW", "NHWC")
_TRUSTED = Verdict(True, "", 1.0)


class Segmenter:
    """A loaded segmentation model that turns frames into label maps."""

    def __init__(
        self,
        engine: Engine,
        card: ModelCard,
        model: Path,
        skipped: list[str] | None = None,
        prepare: opencl.Prepare = preprocess.prepare,
        prepare_info: tuple[str, str] = ("cpu", ""),
    ):
        self.engine = engine
        self.card = card
        self.model = Path(model)
        self.skipped = skipped or []  # why engines before this one were not chosen
        self._prepare = prepare
        self.prepare_info = prepare_info  # (what runs, why not OpenCL or "")
        self.precision = precision.Choice("auto", "auto", self.model, "as the engine was loaded")
        if card.task != "segmentation":
            raise ModelError(
                f"model card {card_path(model)}: task is {card.task!r}, not segmentation"
            )
        if len(engine.inputs) != 1 or not engine.outputs:
            raise ModelError(
                f"model {self.model.name} has {len(engine.inputs)} inputs and "
                f"{len(engine.outputs)} outputs; a segmentation model takes one image "
                "and gives at least one output"
            )
        layout = card.input.layout
        if card.input.sequence > 1 or layout == "NSCHW" or layout == "NSHWC":
            raise ModelError(
                f"model {self.model.name} takes sequences of frames ([input] sequence in "
                f"{card_path(model)}): only the live infer stage feeds them"
            )
        spec = engine.inputs[0]
        self.input: TensorSpec = replace(spec, layout=layout or spec.layout)
        self.output: TensorSpec = engine.outputs[0]
        self.classes: tuple[ClassCard, ...] = card.classes
        self.guard: Guard | None = (
            Guard(card.guard.min_confidence, card.guard.domain) if card.guard else None
        )
        self._checked: tuple[tuple[int, ...], np.dtype[Any]] | None = None
        if len(spec.shape) == 4 and self.input.layout in _IMAGE_LAYOUTS:
            self._validate()

    @classmethod
    def open(
        cls,
        model: Path,
        engine: str | None = None,
        device: str = "cpu",
        **options: Any,
    ) -> Segmenter:
        """Load ``model`` with its card on ``engine`` (None: the best available on ``device``);
        the option ``preprocess`` is "cpu" (default), "opencl" or "auto" (see
        ``opencl.choose``); the other ``options`` go to the engine's ``load``."""
        return loading.open_runner(cls, model, engine, device, **options)

    def _validate(self) -> None:
        """Card against model, for a 4-D image input with a known layout."""
        name, spec, card = self.model.name, self.input, self.card
        where = f"model {name} input {spec.describe()}"
        if spec.dtype.kind != "f":
            raise ModelError(f"{where}: echod feeds floating-point inputs")
        size, fixed = card.input.size, spec.spatial
        if size is not None and any(
            f is not None and f != s for f, s in zip(fixed, size, strict=True)
        ):
            raise ModelError(f"{where}: the card's size {list(size)} does not match the model")
        c = spec.channels
        if c is not None and c not in (1, 3):
            raise ModelError(f"{where}: echod feeds 1 or 3 channels, the model has {c}")
        if c is not None and card.input.channels not in (None, c):
            raise ModelError(f"{where}: the card says {card.input.channels} channels")
        if c is not None:
            preprocess.affine(card, c)

        out = replace(self.output, layout=card.output.layout or spec.layout)
        self.output = out
        n = out.channels
        if len(out.shape) != 4 or n is None:
            raise ModelError(
                f"model {name} output {out.name!r} {out.describe()}: expected (1, C, h, w) or "
                "(1, h, w, C) with a fixed number of classes C"
            )
        if n > postprocess.MAX_CLASSES:
            raise ModelError(f"model {name} has {n} classes; label maps hold at most 255")
        n_labels = max(n, 2)  # one channel: background + foreground
        self.classes = card.class_list(n_labels)
        if len(self.classes) != n_labels:
            raise ModelError(
                f"model card {card_path(self.model)} lists {len(self.classes)} classes; "
                f"model {name} output {out.describe()} gives {n_labels}"
            )

    def check_frame(self, shape: tuple[int, ...], dtype: DTypeLike | None = None) -> None:
        """One-line ModelError when frames of ``shape`` (and ``dtype``, if given) cannot
        go into this model."""
        shape = tuple(shape)
        name, spec = self.model.name, self.input
        loading.check_frame(shape, dtype)
        if len(spec.shape) != 4:
            raise ModelError(
                f"model {name} expects {len(spec.shape)}-D input {spec.describe()}; frames are 2-D "
                f"{loading.frame_text(shape)}: use a 2-D segmentation model"
            )
        if spec.layout not in _IMAGE_LAYOUTS:
            raise ModelError(
                f"model {name} input {spec.describe()}: its layout cannot be detected; set "
                f'layout = "NCHW" or "NHWC" under [input] in {card_path(self.model)}'
            )
        c = preprocess.network_channels(spec, self.card, 1 if len(shape) == 2 else shape[2])
        preprocess.affine(self.card, c)
        if dtype is not None:
            self._checked = (shape, np.dtype(dtype))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Network input for ``image`` (a new array; ``image`` is only read)."""
        if self._checked != (image.shape, image.dtype):
            self.check_frame(image.shape, image.dtype)
        return self._prepare(image, self.input, self.card)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """The model's first output for input ``x``."""
        return self.engine.run({self.input.name: x})[self.output.name]

    @property
    def depth(self) -> int:
        """Frames worth keeping in flight with :meth:`submit` (1: it runs at once)."""
        return self.engine.depth

    def submit(self, x: np.ndarray) -> Pending:
        """Start inference on ``x`` (from :meth:`prepare`, left unchanged until the result)."""
        return self.engine.submit({self.input.name: x})

    def result(self, pending: Pending) -> np.ndarray:
        """The model's first output for a :meth:`submit`; waits for it."""
        return pending.wait()[self.output.name]

    def finish(self, output: np.ndarray, frame_shape: tuple[int, ...]) -> np.ndarray:
        """uint8 label map of the frame's height and width."""
        g = preprocess.geometry(self.input, self.card, (frame_shape[0], frame_shape[1]))
        return postprocess.labels(
            output, self.card, frame_shape, self.output.layout or "NCHW", geometry=g
        )

    def judge(self, x: np.ndarray, output: np.ndarray) -> Verdict:
        """The guard's verdict on one frame from its network input ``x`` (from
        :meth:`prepare`) and the model's output; always confident without a guard."""
        if self.guard is None:
            return _TRUSTED
        layout = self.output.layout or "NCHW"
        probs = probabilities(postprocess.planes(output, layout), self.card.output.activation)
        return self.guard.judge(as_plane(x, self.input.layout or "NCHW"), probs)

    def finish_guarded(
        self, output: np.ndarray, frame_shape: tuple[int, ...], x: np.ndarray
    ) -> tuple[np.ndarray, Verdict]:
        """:meth:`finish` behind the guard: the label map (empty when withheld) and the
        verdict."""
        verdict = self.judge(x, output)
        labels = self.finish(output, frame_shape)
        if not verdict.confident:
            labels[:] = 0
        return labels, verdict

    def segment(self, image: np.ndarray) -> np.ndarray:
        """prepare + infer + finish in one call (the model alone, no guard)."""
        return self.finish(self.infer(self.prepare(image)), image.shape)

    def segment_guarded(self, image: np.ndarray) -> tuple[np.ndarray, Verdict]:
        """prepare + infer + :meth:`finish_guarded` in one call."""
        x = self.prepare(image)
        return self.finish_guarded(self.infer(x), image.shape, x)

    def network_size(self) -> tuple[int | None, int | None]:
        """(h, w) the network gets; None where it follows the frame."""
        if self.card.input.size is not None:
            return self.card.input.size
        if len(self.input.spatial) != 2:
            return (None, None)
        h, w = self.input.spatial
        return (h, w)

    def fit_frames(self, frame_shape: tuple[int, ...]) -> None:
        """Run one blank frame of ``frame_shape`` through every step, so that a model that
        cannot take the frames fails here, at start, with a one-line ModelError naming the
        model, the shape and why. A model with free height/width that rejects the frame's
        sides (strides that need multiples of 32, say) is probed for the multiple it
        needs, and frames are padded to it from then on (the card's ``multiple`` says it
        without probing)."""
        shape = tuple(frame_shape)
        card = self.card
        free = card.input.size is None and None in self.input.spatial
        fitted = loading.fit(self.model, card, free, shape, lambda c: self._run_blank(shape, c))
        self.card = fitted
        if fitted is not card:
            self._prepare = preprocess.prepare
            m = fitted.input.multiple
            self.prepare_info = ("cpu", f"frames padded to multiples of {m} on the CPU")

    def _run_blank(self, frame_shape: tuple[int, ...], card: ModelCard) -> None:
        self.card = card
        blank = np.zeros(frame_shape, np.uint8)
        self.finish(self.infer(self._prepare(blank, self.input, card)), frame_shape)

    def warmup(self, n: int = 3, frame_shape: tuple[int, ...] | None = None) -> float:
        """Run ``n`` blank frames through all steps; returns the last inference in ms.

        ``frame_shape`` defaults to the network size (256 where that is dynamic).
        """
        if frame_shape is None:
            frame_shape = tuple(d or 256 for d in self.network_size())
        blank = np.zeros(frame_shape, np.uint8)
        ms = 0.0
        for _ in range(n):
            x = self.prepare(blank)
            t0 = time.perf_counter()
            y = self.infer(x)
            ms = (time.perf_counter() - t0) * 1e3
            self.finish(y, frame_shape)
        log.info("%s warmed up (%d runs): %.1f ms inference", self.model.name, n, ms)
        return ms

    def describe(self) -> dict[str, Any]:
        """What runs: engine, version, device, model, input, classes (JSON-ready)."""
        return {
            "engine": self.engine.name,
            "engine_version": self.engine.version,
            "engine_skipped": list(self.skipped),
            "device": self.engine.device,
            "in_flight": self.depth,
            "precision": self.precision.precision,
            "precision_reason": self.precision.reason,
            "preprocess": self.prepare_info[0],
            "preprocess_fallback": self.prepare_info[1],
            "model": self.model.name,
            "model_path": str(self.model),
            "provenance": self.card.provenance,
            "input": {
                "name": self.input.name,
                "shape": list(self.input.shape),
                "dtype": str(self.input.dtype),
                "layout": self.input.layout,
            },
            "network_size": list(self.network_size()),
            "classes": [c.model_dump(mode="json") for c in self.classes],
            "guard": self.card.guard.model_dump(mode="json") if self.card.guard else None,
        }

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
