"""A patch classifier: engine + model card, batches of RGB patches in, probabilities out.

The WSI job calls the three steps separately to time each (the paper's Table 4)::

    clf = PatchClassifier.open(model, engine=None, device="cpu", threads=0)
    x = clf.prepare(patches)        # n RGB uint8 patches -> normalised network input
    y = clf.infer(x)                # the engine
    p = clf.finish(y)               # (n, classes) float32 probabilities

Normalisation is the card's (``x = (clip(v) * scale - mean) / std``, as the live
pre-processing), as a table of 256 values per channel (patches are uint8). An output
the card says is ``none`` (logits) gets a softmax; a single sigmoid output becomes two
classes (1 - p, p).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from daemon.engines import loading, precision, preprocess
from daemon.engines.base import Engine, TensorSpec
from daemon.engines.card import ClassCard, ModelCard, card_path
from daemon.errors import ModelError

log = logging.getLogger(__name__)


class PatchClassifier:
    """A loaded classification model that turns batches of patches into probabilities."""

    def __init__(self, engine: Engine, card: ModelCard, model: Path) -> None:
        self.engine, self.card, self.model = engine, card, Path(model)
        self.precision = precision.Choice("auto", "auto", self.model, "as the engine was loaded")
        name = self.model.name
        if card.task != "classification":
            raise ModelError(
                f"model {name} is a {card.task} model ({card_path(model)}); the WSI job "
                "classifies patches: give a classification model (stitching segmentation "
                "outputs comes with the shared tiling functions)"
            )
        if len(engine.inputs) != 1 or not engine.outputs:
            raise ModelError(f"model {name}: a patch classifier takes one image input")
        spec = engine.inputs[0]
        layout = preprocess.layout_of(spec, card)
        self.input: TensorSpec = TensorSpec(spec.name, spec.shape, spec.dtype, layout)
        self.output: TensorSpec = engine.outputs[0]
        dims = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
        size = card.input.size or (dims[0], dims[1])
        if size[0] is None or size[1] is None or size[0] != size[1]:
            raise ModelError(
                f"model {name} input {spec.describe()}: the WSI job needs square patches of a "
                "fixed size; set [input] size = [S, S] in its card"
            )
        self.size: int = int(size[0])
        channels = preprocess.network_channels(spec, card, 3)
        if channels != 3:
            raise ModelError(f"model {name} takes {channels} channels; slides are RGB (3)")
        a, b = preprocess.affine(card, 3)
        levels = np.arange(256, dtype=np.float64)
        if card.input.normalisation.clip is not None:
            levels = np.clip(levels, *card.input.normalisation.clip)
        # uint8 in: the whole normalisation is a table of 256 values per channel
        self._lut = (levels[:, None] * a + b).astype(np.float32).reshape(1, 256, 3)
        n = self._classes_out()
        self.classes: tuple[ClassCard, ...] = card.class_list(max(n, 2))
        if len(self.classes) != max(n, 2):
            raise ModelError(
                f"model card {card_path(model)} lists {len(self.classes)} classes; model "
                f"{name} output {self.output.describe()} gives {max(n, 2)}"
            )

    def _classes_out(self) -> int:
        shape = self.output.shape
        ok = len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))
        if not ok or shape[1] is None:
            raise ModelError(
                f"model {self.model.name} output {self.output.describe()}: a classifier gives "
                "(N, C) (or (N, C, 1, 1)) with a fixed number of classes C"
            )
        return int(shape[1])

    @classmethod
    def open(
        cls, model: Path, engine: str | None = None, device: str = "cpu", threads: int = 0
    ) -> PatchClassifier:
        """Load ``model`` with its card on ``engine`` (None: the best available on
        ``device``, the card's preference first), tuned for throughput."""
        opened = loading.open_model(model, engine, device, threads=threads, mode="all")
        try:
            clf = cls(opened.engine, opened.card, opened.model)
        except BaseException:
            opened.engine.close()
            raise
        clf.precision = opened.precision
        return clf

    def prepare(self, patches: Sequence[np.ndarray]) -> np.ndarray:
        """Network input for RGB uint8 patches of ``size`` x ``size``."""
        s, chw = self.size, self.input.layout == "NCHW"
        x = np.empty((len(patches), 3, s, s) if chw else (len(patches), s, s, 3), np.float32)
        for i, patch in enumerate(patches):
            v = cv2.LUT(patch, self._lut)
            x[i] = v.transpose(2, 0, 1) if chw else v
        return x if self.input.dtype == np.float32 else x.astype(self.input.dtype)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.engine.run({self.input.name: x})[self.output.name]

    def finish(self, y: np.ndarray) -> np.ndarray:
        """(n, classes) float32 probabilities."""
        y = np.asarray(y, np.float32).reshape(y.shape[0], -1)
        activation = self.card.output.activation
        if y.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-y)) if activation == "none" else y
            return np.concatenate([1.0 - p, p], axis=1)
        if activation == "none":
            e = np.exp(y - y.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return y

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.engine.name,
            "engine_version": self.engine.version,
            "device": self.engine.device,
            "precision": self.precision.precision,
            "precision_reason": self.precision.reason,
            "model": self.model.name,
            "provenance": self.card.provenance,
            "patch": self.size,
            "classes": [c.name for c in self.classes],
        }

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> PatchClassifier:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
