"""The newest result of each model as Prometheus gauges (part of daemon/exporter.py).

At each scrape the newest record of each results ring is looked at in place
(``Ring.latest``: no reader entry, nothing counted or held back) and turned into
gauges labelled by the infer ``stage`` (one per model: ``infer``, ``infer-1``...),
its ``model`` (file name), the record's ``output`` and the row's name (``class``,
``point``, ``value``: from the model description, see daemon/result_names.py).
Cardinality is bounded by the models' outputs: classes of the description (or the
rows of the newest record), keypoints and values the model has. A record that is
not valid is skipped (its consumers count it); so is one from another model
generation than the stage's now (a hot-swap in progress) or one overwritten while
read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric

from daemon import results
from daemon.frame import WITHHELD
from daemon.result_names import by_name, names
from daemon.ring import Ring

MAX_CLASSES = 1024  # detection class numbers above are not counted (a bound on series)


@dataclass(frozen=True)
class Source:
    """One model's results ring, its infer stage's name, generation and description."""

    stage: str
    ring: Ring
    generation: int
    description: Mapping[str, Any] = field(default_factory=dict)


def sources(rings: Mapping[str, Ring], workers: Mapping[str, Any]) -> Iterator[Source]:
    """The supervisor's results rings (``results``, ``results-1``...) with the infer stage
    that writes each (``infer``, ``infer-1``...: the names of docs/DESIGN.md)."""
    for port, ring in sorted(rings.items()):
        if not port.startswith("results"):
            continue
        stage = "infer" + port.removeprefix("results")
        w = workers.get(stage)
        if w is not None:
            yield Source(stage, ring, w.spec.generation, w.info)


class _Families:
    def __init__(self) -> None:
        head = ["stage", "model"]
        self.age = GaugeMetricFamily(
            "echod_result_age_seconds",
            "age of each model's newest result (acquisition to now)",
            labels=head,
        )
        self.withheld = GaugeMetricFamily(
            "echod_result_withheld",
            "1 when the uncertainty guard withheld each model's newest result",
            labels=head,
        )
        self.probability = GaugeMetricFamily(
            "echod_classification_probability",
            "class probabilities of the newest classification",
            labels=[*head, "output", "class"],
        )
        self.detections = GaugeMetricFamily(
            "echod_detections",
            "boxes of each class in the newest detection",
            labels=[*head, "output", "class"],
        )
        self.found = GaugeMetricFamily(
            "echod_keypoint_found",
            "1 when the newest result found the keypoint, else 0",
            labels=[*head, "output", "point"],
        )
        self.score = GaugeMetricFamily(
            "echod_keypoint_score",
            "score of each keypoint in the newest result",
            labels=[*head, "output", "point"],
        )
        self.value = GaugeMetricFamily(
            "echod_regression_value",
            "values of the newest regression, in their unit",
            labels=[*head, "output", "value", "unit"],
        )

    def all(self) -> list[Metric]:
        return [
            self.age,
            self.withheld,
            self.probability,
            self.detections,
            self.found,
            self.score,
            self.value,
        ]


def collect(found: Iterable[Source]) -> Iterator[Metric]:
    """The result gauges of every source (empty families when no result is readable)."""
    f = _Families()
    now_ns = time.monotonic_ns()
    for source in found:
        frame = source.ring.latest()
        if frame is None:
            continue
        meta = frame.meta
        if meta.generation != source.generation:
            continue
        try:
            record = results.unpack(frame.image)
            rows = list(_rows(record, source.description))
        except results.RecordError:
            continue
        if not frame.valid():  # overwritten while read
            continue
        head = [source.stage, str(source.description.get("model") or "")]
        if meta.t_acquired_ns:
            f.age.add_metric(head, max(0, now_ns - meta.t_acquired_ns) / 1e9)
        f.withheld.add_metric(head, float(bool(meta.flags & WITHHELD)))
        for family, labels, value in rows:
            getattr(f, family).add_metric([*head, *labels], value)
    yield from f.all()


def _rows(
    record: results.Record, description: Mapping[str, Any]
) -> Iterator[tuple[str, list[str], float]]:
    """(family, labels after stage and model, value) of each gauge of ``record``; values
    are copied out of the slot here, before the caller checks it was not overwritten."""
    described = by_name(description)
    for o in record.outputs:
        entry = described.get(o.name)
        n = names(o, entry)
        a = o.array
        if o.role == "classification":
            for i, p in enumerate(a):
                yield "probability", [o.name, n.name(i)], float(p)
        elif o.role == "detection":  # every described class, and any other one seen
            ids = a[:, 5]
            ids = ids[np.isfinite(ids) & (ids >= 0) & (ids < MAX_CLASSES)].astype(np.int64)
            counts = np.bincount(ids, minlength=len(n.names))
            for c, count in enumerate(counts):
                if c < len(n.names) or count:
                    yield "detections", [o.name, n.name(c)], float(count)
        elif o.role == "keypoints":
            for k, (x, y, score) in enumerate(a):
                point = n.name(k)
                yield "found", [o.name, point], float(np.isfinite(x) and np.isfinite(y))
                yield "score", [o.name, point], float(score)
        elif o.role == "regression":
            for i, v in enumerate(a):
                yield "value", [o.name, n.name(i), n.unit(i)], float(v)
