"""A result record as OpenIGTLink messages (what daemon/igtl_out.py serves).

Per output, by role (README, "OpenIGTLink output", has the formats with examples):

- segmentation: an IMAGE label map (uint8, one slice) with the frame's geometry;
- classification: a STRING, a JSON object: ``class``, ``score``, ``probabilities``
  (every class, by name);
- detection: a STRING (JSON: each box's class, score, ``box`` in frame pixels,
  ``centre`` in world mm, ``size`` in mm) and a POINT message with a point at each box
  centre, named by its class, in the class colour (device ``<name>Centres``);
- keypoints: a POINT message, one point per keypoint found (not found: absent), named
  by the keypoint, in world mm;
- regression: a STRING (JSON: each value's ``name``, ``value``, ``unit``);
- confidence maps are not sent.

Why POINT and not TRANSFORM for points: 3D Slicer turns a POINT message into a markups
point list named by the device, each point labelled with its name, drawn over the
IMAGE without any set-up, and a point that goes missing disappears (the message says
how many there are); a TRANSFORM would need a model or a transform hierarchy to be seen,
one device per point, and cannot say "not found".

Coordinates: record coordinates are frame pixels, (x, y) = (column, row), the centre
of pixel (i, j) at (i, j); world = ``meta.transform`` @ (x, y, 0, 1), the same
ijk-to-world matrix the IMAGE message carries, so points sit on the label map in any
receiver. Every STRING has the frame's ``frame`` index and ``withheld`` (the
uncertainty guard's verdict); a withheld result's POINT messages are sent empty.
STRINGs are ASCII (JSON escapes the rest), and every message has the frame's
``t_source`` as its timestamp.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyigtl

from daemon.frame import WITHHELD, FrameMeta
from daemon.result_names import Names, by_name, names
from daemon.results import Output, Record

DEVICE_BYTES = 20  # the header's device name field
POINT_NAME_BYTES = 64
CENTRES = "Centres"  # suffix of a detection output's POINT device
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def device_name(base: str, suffix: str = "") -> str:
    """An OpenIGTLink device name: printable ASCII (others become ``_``), cut to fit 20
    bytes with ``suffix`` (a port's ``-1``...) kept."""
    return _UNPRINTABLE.sub("_", base)[: DEVICE_BYTES - len(suffix)] + suffix


def label_message(labels: np.ndarray, meta: FrameMeta, device: str) -> bytes:
    """A packed IMAGE message of ``labels`` (HxW) with the frame geometry of ``meta``."""
    message = pyigtl.ImageMessage(
        image=labels[np.newaxis],  # pyigtl's axes: (k, j, i)
        ijk_to_world_matrix=meta.transform,
        world_coordinate_system="lps",
        timestamp=meta.t_source,
        device_name=device,
    )
    return bytes(message.pack())


class _Points(pyigtl.PointMessage):
    """pyigtl's POINT message that may also be empty (every point gone)."""

    def _pack_content(self) -> bytes:
        if len(self.positions) == 0:
            return b""
        return bytes(super()._pack_content())


def point_message(
    positions: np.ndarray,
    labels: list[str],
    colours: list[tuple[int, int, int]],
    group: str,
    meta: FrameMeta,
    device: str,
) -> bytes:
    """A packed POINT message: one point per row of ``positions`` (world mm)."""
    message = _Points(
        positions=np.asarray(positions, np.float32).reshape(-1, 3),
        names=[_cut(n, POINT_NAME_BYTES) for n in labels],
        rgba_colors=[(*c, 255) for c in colours] or None,
        groups=group,
        timestamp=meta.t_source,
        device_name=device,
    )
    return bytes(message.pack())


def string_message(content: Mapping[str, Any], meta: FrameMeta, device: str) -> bytes:
    """A packed STRING message of ``content`` as one line of ASCII JSON."""
    text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(", ", ": "))
    return bytes(pyigtl.StringMessage(text, timestamp=meta.t_source, device_name=device).pack())


def world(meta: FrameMeta, xy: np.ndarray) -> np.ndarray:
    """Frame pixel coordinates (N, 2) -> world mm (N, 3) through ``meta.transform``."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    ijk = np.column_stack([xy, np.zeros(len(xy)), np.ones(len(xy))])
    return (ijk @ np.asarray(meta.transform, np.float64).T)[:, :3]


Device = Callable[[str], str]  # a device name for an output, with an extra suffix


class ResultMessages:
    """Builds the messages of a record's outputs; ``segmentation_device`` names the first
    segmentation output of a port (``igtl_out.device``), the others their output's name."""

    def __init__(self, segmentation_device: str) -> None:
        self.segmentation_device = segmentation_device
        self._build: dict[str, Callable[[Output, FrameMeta, Names, Device], Iterator[bytes]]] = {
            "segmentation": self._segmentation,
            "confidence": self._confidence,
            "classification": self._classification,
            "detection": self._detection,
            "keypoints": self._keypoints,
            "regression": self._regression,
        }

    def messages(
        self, record: Record, meta: FrameMeta, description: Mapping[str, Any] | None, suffix: str
    ) -> Iterator[bytes]:
        """The packed messages of ``record`` (its frame's ``meta``); ``description`` is the
        model's (None: unknown), ``suffix`` the port's (``""`` for ``results``)."""
        described = by_name(description)
        first = record.get("segmentation")
        for o in record.outputs:
            base = self.segmentation_device if o is first else o.name

            def device(extra: str, base: str = base) -> str:
                return device_name(base, extra + suffix)

            yield from self._build[o.role](o, meta, names(o, described.get(o.name)), device)

    @staticmethod
    def _segmentation(o: Output, meta: FrameMeta, _n: Names, device: Device) -> Iterator[bytes]:
        yield label_message(o.array, meta, device(""))

    @staticmethod
    def _confidence(o: Output, meta: FrameMeta, _n: Names, device: Device) -> Iterator[bytes]:
        yield from ()

    @staticmethod
    def _classification(o: Output, meta: FrameMeta, n: Names, device: Device) -> Iterator[bytes]:
        p = o.array
        best = int(np.nanargmax(p)) if len(p) and not np.isnan(p).all() else -1
        content = {
            **_frame(meta),
            "class": n.name(best) if best >= 0 else None,
            "score": _number(p[best]) if best >= 0 else None,
            "probabilities": {n.name(i): _number(v) for i, v in enumerate(p)},
        }
        yield string_message(content, meta, device(""))

    @staticmethod
    def _detection(o: Output, meta: FrameMeta, n: Names, device: Device) -> Iterator[bytes]:
        rows = o.array[np.isfinite(o.array[:, :4]).all(axis=1)]
        classes = [_index(c) for c in rows[:, 5]]
        centres = world(meta, (rows[:, 0:2] + rows[:, 2:4]) / 2)
        scale = np.linalg.norm(np.asarray(meta.transform, np.float64)[:3, :2], axis=0)
        sizes = np.abs(rows[:, 2:4] - rows[:, 0:2]) * scale
        boxes = [
            {
                "class": n.name(c),
                "score": _number(r[4]),
                "box": [_number(v, 2) for v in r[:4]],
                "centre": [_number(v, 3) for v in centre],
                "size": [_number(v, 3) for v in size],
            }
            for r, c, centre, size in zip(rows, classes, centres, sizes, strict=True)
        ]
        yield string_message({**_frame(meta), "boxes": boxes}, meta, device(""))
        if meta.flags & WITHHELD:
            centres, classes = centres[:0], []
        yield point_message(
            centres,
            [n.name(c) for c in classes],
            [n.colour(c) for c in classes],
            "Labeled Point",
            meta,
            device(CENTRES),
        )

    @staticmethod
    def _keypoints(o: Output, meta: FrameMeta, n: Names, device: Device) -> Iterator[bytes]:
        found = np.flatnonzero(np.isfinite(o.array[:, :2]).all(axis=1))
        if meta.flags & WITHHELD:
            found = found[:0]
        yield point_message(
            world(meta, o.array[found, :2]),
            [n.name(int(k)) for k in found],
            [n.colour(int(k)) for k in found],
            "Landmark",
            meta,
            device(""),
        )

    @staticmethod
    def _regression(o: Output, meta: FrameMeta, n: Names, device: Device) -> Iterator[bytes]:
        values = [
            {"name": n.name(i), "value": _number(v, significant=6), "unit": n.unit(i)}
            for i, v in enumerate(o.array)
        ]
        yield string_message({**_frame(meta), "values": values}, meta, device(""))


def _frame(meta: FrameMeta) -> dict[str, Any]:
    return {"frame": int(meta.index), "withheld": bool(meta.flags & WITHHELD)}


def _number(v: Any, digits: int = 4, significant: int | None = None) -> float | None:
    """A JSON number: ``v`` rounded (to ``digits`` decimals or ``significant`` digits), or
    None (null) when it is not finite."""
    x = float(v)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{significant}g}") if significant else round(x, digits)


def _index(v: Any) -> int:
    """A detection's class column as an index (-1 when it is not a class number)."""
    x = float(v)
    return int(x) if math.isfinite(x) and 0 <= x < 2**31 else -1


def _cut(text: str, nbytes: int) -> str:
    """``text`` cut to at most ``nbytes`` of UTF-8, on a character boundary."""
    return text.encode()[:nbytes].decode(errors="ignore")
