"""What the renderer draws over a frame: maps, boxes, marks and class panels.

Positions are in frame pixel indices as result records have them
(daemon/results.py): x the column, y the row, the centre of pixel (column i,
row j) at (i, j), so the frame spans ``[-0.5, width - 0.5]`` in x. The renderer
maps them through the letterbox onto the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Colour = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class MapLayer:
    """A texture uploaded under ``key``: a label map (coloured by its classes' lookup
    table, filled or as contours) or a confidence map (the heat lookup table, bilinear)."""

    key: str
    kind: Literal["labels", "heat"]


@dataclass(frozen=True, slots=True)
class Box:
    """A detection: an outline in ``colour`` with ``text`` ("class score") above it."""

    x1: float
    y1: float
    x2: float
    y2: float
    colour: Colour
    text: str


@dataclass(frozen=True, slots=True)
class Mark:
    """A keypoint: a cross centred at (x, y) in ``colour``, ``text`` (its name) beside it."""

    x: float
    y: float
    colour: Colour
    text: str


@dataclass(frozen=True, slots=True)
class Panel:
    """A classification: the class name in its colour and a bar ``fraction`` full."""

    text: str
    colour: Colour
    fraction: float


@dataclass
class Scene:
    """Everything drawn over one frame, bottom to top: maps, boxes, marks, panels."""

    maps: list[MapLayer] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)

    def extend(self, other: Scene) -> None:
        self.maps += other.maps
        self.boxes += other.boxes
        self.marks += other.marks
        self.panels += other.panels
