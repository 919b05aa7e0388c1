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

A withheld result (the guard's WITHHELD flag) draws nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.config import DisplayConfig
from daemon.display.colours import default_classes
from daemon.display.scene import Box, MapLayer, Mark, Panel, Scene
from daemon.engines.card import ClassCard, Role
from daemon.frame import WITHHELD, FrameMeta
from daemon.results import Record, unpack


class Uploader(Protocol):
    """Where the maps go (the renderer: textures under a key)."""

    def upload_labels(self, key: str, labels: np.ndarray, classes: Sequence[ClassCard]) -> None: ...

    def upload_heat(self, key: str, heat: np.ndarray) -> None: ...


@dataclass(frozen=True, slots=True)
class OutputView:
    """One output as its model describes it (``outputs`` of the description)."""

    name: str
    role: str
    classes: tuple[ClassCard, ...] = ()
    names: tuple[str, ...] = ()
    units: tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> OutputView:
        return cls(
            name=str(d["name"]),
            role=str(d["role"]),
            classes=tuple(ClassCard.model_validate(c) for c in d.get("classes") or ()),
            names=tuple(str(n) for n in d.get("names") or ()),
            units=tuple(str(u) for u in d.get("units") or ()),
        )


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model as the display knows it: ``info`` for the status line ("engine device |
    model"), its ``classes`` (a one-output segmentation model's card) and its outputs
    by name."""

    info: str
    classes: tuple[ClassCard, ...] = ()
    outputs: Mapping[str, OutputView] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> ModelView:
        """From a model description (the ``model`` command's arguments)."""
        engine = f"{d.get('engine') or 'auto'} {d.get('device') or ''}".strip()
        outputs = (OutputView.parse(o) for o in d.get("outputs") or ())
        return cls(
            info=f"{engine} | {d.get('model')}",
            classes=tuple(ClassCard.model_validate(c) for c in d.get("classes") or ()),
            outputs={o.name: o for o in outputs},
        )

    def classes_of(self, name: str, role: Role, n: int) -> tuple[ClassCard, ...]:
        """The classes of output ``name``, at least ``n`` (defaults fill in; a label map's
        with ``n = 0``: none means the default palette, labels past those given are
        transparent)."""
        described = self.outputs.get(name)
        given = described.classes if described and described.classes else ()
        if not given and role == "segmentation":
            given = self.classes
        background = role in ("segmentation", "confidence")
        if len(given) >= n:
            return given
        return given + default_classes(n, background)[len(given) :]

    def names_of(self, name: str, n: int, default: str) -> tuple[str, ...]:
        described = self.outputs.get(name)
        given = described.names if described else ()
        return given[:n] + tuple(f"{default} {k}" for k in range(len(given), n))

    def units_of(self, name: str, n: int) -> tuple[str, ...]:
        described = self.outputs.get(name)
        given = described.units if described else ()
        return given[:n] + ("",) * (n - len(given[:n]))


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


def heat_of(confidence: np.ndarray, classes: Sequence[ClassCard], selected: str) -> np.ndarray:
    """(h, w) float16 from (C, h, w) confidence maps: class ``selected`` (by name) when
    the classes have it, else the highest of the foreground classes (1..C-1; a single
    map is taken as is)."""
    names = [c.name for c in classes]
    if selected and selected in names[: len(confidence)]:
        return np.ascontiguousarray(confidence[names.index(selected)])
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
        self._classified: list[str] = []  # the newest record's classification outputs
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
        for name, p in probabilities.items():
            self.stable.setdefault(name, StableLabel()).update(
                p, settings.classification_smoothing, settings.classification_hysteresis
            )
        self.index, self.withheld = meta.index, withheld
        self._scene, self._scalars, self._classified = scene, scalars, list(probabilities)
        return True

    def _read(
        self, record: Record, gpu: Uploader, settings: DisplayConfig
    ) -> tuple[Scene, dict[str, np.ndarray]]:
        """Upload the maps, copy boxes and points; the class probabilities to filter."""
        scene, probabilities = Scene(), {}
        model, count = self.model, dict.fromkeys(("segmentation", "confidence"), 0)
        for out in record.outputs:
            a, name = out.array, out.name
            if out.role in count:
                key = f"{self.port}/{out.role}/{count[out.role]}"
                count[out.role] += 1
                if out.role == "segmentation":
                    gpu.upload_labels(key, a, model.classes_of(name, "segmentation", 0))
                    scene.maps.append(MapLayer(key, "labels"))
                elif settings.heatmap:
                    classes = model.classes_of(name, "confidence", len(a))
                    gpu.upload_heat(key, heat_of(a, classes, settings.heatmap_class))
                    scene.maps.append(MapLayer(key, "heat"))
            elif out.role == "classification":
                if a.size and np.isfinite(a).all():
                    probabilities[name] = a.copy()
            elif out.role == "detection":
                scene.boxes += self._boxes(name, a)
            elif out.role == "keypoints":
                names = model.names_of(name, len(a), "point")
                colours = default_classes(len(a), background=False)
                scene.marks += [
                    Mark(float(x), float(y), colours[k].colour, names[k])
                    for k, (x, y, _) in enumerate(a.tolist())
                    if _finite(x, y)
                ]
        return scene, probabilities

    def _boxes(self, name: str, rows: np.ndarray) -> list[Box]:
        if not len(rows):
            return []
        top = int(np.nan_to_num(rows[:, 5], nan=0.0).clip(0, 255).max()) + 1
        classes = self.model.classes_of(name, "detection", top)
        out = []
        for x1, y1, x2, y2, score, c in rows.tolist():
            if not _finite(x1, y1, x2, y2, score, c):
                continue
            cls = classes[int(min(max(c, 0), len(classes) - 1))]
            out.append(Box(x1, y1, x2, y2, cls.colour, f"{cls.name} {score:.2f}"))
        return out

    def _scalars_of(self, record: Record) -> list[str]:
        out = []
        for o in record.all("regression"):
            values = o.array.tolist()
            names = self.model.names_of(o.name, len(values), o.name)
            units = self.model.units_of(o.name, len(values))
            for n, v, u in zip(names, values, units, strict=True):
                out.append(
                    " ".join(t for t in (n, f"{v:.4g}" if math.isfinite(v) else "-", u) if t)
                )
        return out

    def scene(self) -> Scene:
        """What the newest result draws (the classification panels from the filters)."""
        if self.index is None or self.withheld:
            return Scene()
        panels = []
        for name in self._classified:
            label = self.stable[name]
            assert label.p is not None
            cls = self.model.classes_of(name, "classification", len(label.p))[label.shown]
            panels.append(Panel(cls.name, cls.colour, label.probability))
        s = self._scene
        return Scene(list(s.maps), list(s.boxes), list(s.marks), panels)

    def scalars(self) -> list[str]:
        """The regression values of the newest result, "name value unit" each."""
        return [] if self.index is None or self.withheld else list(self._scalars)
