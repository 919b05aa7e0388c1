"""What one results port draws: its models' descriptions and its newest record.

A :class:`PortView` follows one results port (``results``, ``results-1``...). It knows
the model of each generation that writes there (:class:`ModelView`, from the
``model`` command's description: classes, names and units per output) and turns
the port's newest result record (daemon/results.py) into scene parts:

- segmentation: a label map texture, coloured by the output's classes;
- confidence: one heat texture, the highest foreground class's confidence per pixel
  (or the class ``display.heatmap_class`` names);
- classification: a label and a bar, through a :class:`StableLabel` (exponential
  smoothing and hysteresis: the label does not flicker between close classes);
- detection: boxes in the class colour, "class score";
- keypoints: crosses with their names, the points found only (not NaN);
- regression: "name value unit" for the status line.

Rows are named and coloured by daemon/result_names.py, as OpenIGTLink and /metrics name
them. A withheld result (the guard's WITHHELD flag) draws nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon import result_names
from daemon.config import DisplayConfig
from daemon.display.scene import Box, MapLayer, Mark, Panel, Scene
from daemon.engines.card import ClassCard
from daemon.frame import WITHHELD, FrameMeta
from daemon.results import Output, Record, unpack


class Uploader(Protocol):
    """Where the maps go (the renderer: textures under a key)."""

    def upload_labels(self, key: str, labels: np.ndarray, classes: Sequence[ClassCard]) -> None: ...

    def upload_heat(self, key: str, heat: np.ndarray) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model as the display knows it: ``info`` for the status line ("engine device |
    model"), its ``classes`` (a one-output segmentation model's card) and the entries of
    its description's ``outputs`` by output name."""

    info: str
    classes: tuple[ClassCard, ...] = ()
    entries: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    label_maps: Mapping[str, tuple[ClassCard, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Mapping[str, Any], info: str | None = None) -> ModelView:
        """From a model description (the ``model`` command's arguments, or the stage's
        parameters with ``info`` given); a ValidationError names a malformed class."""
        engine = f"{d.get('engine') or 'auto'} {d.get('device') or ''}".strip()
        entries = result_names.by_name(d)
        return cls(
            info=info or f"{engine} | {d.get('model')}",
            classes=tuple(ClassCard.model_validate(c) for c in d.get("classes") or ()),
            entries=entries,
            label_maps={
                name: tuple(ClassCard.model_validate(c) for c in e["classes"])
                for name, e in entries.items()
                if e.get("role") == "segmentation" and e.get("classes")
            },
        )

    def names(self, output: Output) -> result_names.Names:
        """What ``output``'s rows (classes, points, values) are called, and their colours."""
        return result_names.names(output, self.entries.get(output.name))

    def label_classes(self, output: Output) -> tuple[ClassCard, ...]:
        """The classes (colour and opacity) a label map is drawn with: its description's,
        else the model's; none means the default palette."""
        return self.label_maps.get(output.name) or self.classes


class StableLabel:
    """The class a classification output shows: the probabilities smoothed over results
    (``p = s * p + (1 - s) * new``), and the label kept until another class's smoothed
    probability beats it by ``hysteresis``. The first result (or one with another
    number of classes) starts afresh."""

    def __init__(self) -> None:
        self.p: np.ndarray | None = None
        self.shown = 0

    def update(self, probabilities: np.ndarray, smoothing: float, hysteresis: float) -> None:
        new = np.asarray(probabilities, np.float64)
        if self.p is None or self.p.shape != new.shape:
            self.p = new.copy()
            self.shown = int(np.argmax(new))
            return
        self.p = smoothing * self.p + (1.0 - smoothing) * new
        best = int(np.argmax(self.p))
        if self.p[best] >= self.p[self.shown] + hysteresis:
            self.shown = best

    @property
    def probability(self) -> float:
        return 0.0 if self.p is None else float(self.p[self.shown])


def heat_of(confidence: np.ndarray, names: result_names.Names, selected: str) -> np.ndarray:
    """(h, w) float16 from (C, h, w) confidence maps: class ``selected`` (by name) when
    the output has it, else the highest of the foreground classes (1..C-1; a single map
    is taken as is)."""
    for i in range(len(confidence)) if selected else ():
        if names.name(i) == selected:
            return np.ascontiguousarray(confidence[i])
    foreground = confidence[1:] if len(confidence) > 1 else confidence
    return np.ascontiguousarray(foreground.max(axis=0))


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


class PortView:
    """One results port: its models by generation and what its newest result draws."""

    def __init__(self, port: str, model: ModelView) -> None:
        self.port = port
        self.models: dict[int, ModelView] = {0: model}
        self.generation = 0
        self.index: int | None = None  # the frame index of the result drawn
        self.withheld = False
        self.last_t: float | None = None  # when a result (even a bad one) last came
        self.results = self.bad = 0
        self.stable: dict[str, StableLabel] = {}  # per classification output
        self._classified: list[Output] = []  # the newest record's classification outputs
        self._scene = Scene()
        self._scalars: list[str] = []

    @property
    def model(self) -> ModelView:
        return self.models[self.generation]

    def describe(self, generation: int, model: ModelView) -> None:
        """Results of ``generation`` come from ``model`` (a hot swap announces it first)."""
        self.models[generation] = model

    def clear(self) -> None:
        """Nothing to draw until the next result (a torn or bad one came)."""
        self.index = None
        self._scene, self._scalars, self._classified = Scene(), [], []

    def take(
        self,
        payload: np.ndarray,
        meta: FrameMeta,
        gpu: Uploader,
        settings: DisplayConfig,
        valid: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Read the record in ``payload`` (a ring slot; ``RecordError`` if it is not one),
        upload its maps, keep what else it draws; False if ``valid()`` says the slot was
        overwritten meanwhile (then nothing is drawn until the next result)."""
        record = unpack(payload)
        if meta.generation != self.generation and meta.generation in self.models:
            self.generation = meta.generation
            self.stable.clear()
        withheld = bool(meta.flags & WITHHELD)
        scene, probabilities = (Scene(), {}) if withheld else self._read(record, gpu, settings)
        scalars = [] if withheld else self._scalars_of(record)
        if not valid():
            self.clear()
            return False
        for name, p in probabilities.items():  # only now: a torn slot leaves them as they were
            self.stable.setdefault(name, StableLabel()).update(
                p, settings.classification_smoothing, settings.classification_hysteresis
            )
        self.index, self.withheld = meta.index, withheld
        self._scene, self._scalars = scene, scalars
        self._classified = [o for o in record.all("classification") if o.name in probabilities]
        return True

    def _read(
        self, record: Record, gpu: Uploader, settings: DisplayConfig
    ) -> tuple[Scene, dict[str, np.ndarray]]:
        """Upload the maps, copy boxes and points; the class probabilities to filter."""
        scene, probabilities = Scene(), {}
        model, count = self.model, dict.fromkeys(("segmentation", "confidence"), 0)
        for out in record.outputs:
            a, name = out.array, out.name
            if not a.size:  # no classes, boxes, points or values: nothing to draw
                continue
            if out.role in count:
                key = f"{self.port}/{out.role}/{count[out.role]}"
                count[out.role] += 1
                if out.role == "segmentation":
                    gpu.upload_labels(key, a, model.label_classes(out))
                    scene.maps.append(MapLayer(key, "labels"))
                else:
                    gpu.upload_heat(key, heat_of(a, model.names(out), settings.heatmap_class))
                    scene.maps.append(MapLayer(key, "heat"))
            elif out.role == "classification":
                if np.isfinite(a).all():
                    probabilities[name] = a.copy()
            elif out.role == "detection":
                names = model.names(out)
                scene.boxes += [
                    Box(x1, y1, x2, y2, names.colour(int(c)), f"{names.name(int(c))} {score:.2f}")
                    for x1, y1, x2, y2, score, c in a.tolist()
                    if _finite(x1, y1, x2, y2, score, c)
                ]
            elif out.role == "keypoints":
                names = model.names(out)
                scene.marks += [
                    Mark(x, y, names.colour(k), names.name(k))
                    for k, (x, y, _) in enumerate(a.tolist())
                    if _finite(x, y)
                ]
        return scene, probabilities

    def _scalars_of(self, record: Record) -> list[str]:
        out = []
        for o in record.all("regression"):
            names = self.model.names(o)
            for i, v in enumerate(o.array.tolist()):
                value = f"{v:.4g}" if math.isfinite(v) else "-"
                out.append(" ".join(t for t in (names.name(i), value, names.unit(i)) if t))
        return out

    def scene(self) -> Scene:
        """What the newest result draws (the classification panels from the filters)."""
        if self.index is None or self.withheld:
            return Scene()
        panels = []
        for out in self._classified:
            label, names = self.stable[out.name], self.model.names(out)
            panels.append(
                Panel(names.name(label.shown), names.colour(label.shown), label.probability)
            )
        s = self._scene
        return Scene(list(s.maps), list(s.boxes), list(s.marks), panels)

    def scalars(self) -> list[str]:
        """The regression values of the newest result, "name value unit" each."""
        return [] if self.index is None or self.withheld else list(self._scalars)
