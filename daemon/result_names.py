"""What the rows of a result record's outputs are called: names, colours and units.

A record (daemon/results.py) carries arrays only; the names are the model's, in the
description its infer stage reports (``outputs``: one entry per output, linked to the
record by ``name``; see docs/DESIGN.md). The consumers that label results for other
systems (OpenIGTLink, /metrics) ask here, so that an output the description does not
know still gets stable names: ``class{i}``, ``point{i}``, ``value{i}``, and colours from
the default palette.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.engines.card import ModelCard, Role
from daemon.results import Output

Colour = tuple[int, int, int]

CLASS_ROLES: frozenset[Role] = frozenset(
    {"segmentation", "confidence", "classification", "detection"}
)
_PREFIX: dict[Role, str] = {"keypoints": "point", "regression": "value"}


@dataclass(frozen=True, slots=True)
class Names:
    """The names, colours and units of one output's rows (classes, points or values)."""

    names: tuple[str, ...] = ()
    colours: tuple[Colour, ...] = ()
    units: tuple[str, ...] = ()
    prefix: str = "class"

    def name(self, i: int) -> str:
        """Row ``i``'s name (``unknown`` for a negative index: not a row)."""
        if i < 0:
            return "unknown"
        return self.names[i] if i < len(self.names) else f"{self.prefix}{i}"

    def colour(self, i: int) -> Colour:
        if 0 <= i < len(self.colours):
            return self.colours[i]
        palette = ModelCard().class_list(max(i, 0) + 2)  # entry 0: the background's black
        r, g, b = palette[max(i, 0) + 1].colour
        return r, g, b

    def unit(self, i: int) -> str:
        return self.units[i] if 0 <= i < len(self.units) else ""


def by_name(description: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """The entries of a model description's ``outputs``, by output name (empty when the
    description has none, or is not one)."""
    entries = (description or {}).get("outputs") or ()
    if not isinstance(entries, (list, tuple)):
        return {}
    return {str(e["name"]): e for e in entries if isinstance(e, Mapping) and e.get("name")}


def names(output: Output, entry: Mapping[str, Any] | None) -> Names:
    """The names of ``output``'s rows from its description ``entry`` (None: unknown)."""
    prefix = _PREFIX.get(output.role, "class")
    if not entry or entry.get("role", output.role) != output.role:
        return Names(prefix=prefix)
    if output.role in CLASS_ROLES:
        classes = [c for c in entry.get("classes") or () if isinstance(c, Mapping)]
        return Names(
            names=tuple(str(c.get("name", "")) or f"class{i}" for i, c in enumerate(classes)),
            colours=tuple(_colour(c.get("colour"), i) for i, c in enumerate(classes)),
            prefix=prefix,
        )
    return Names(
        names=tuple(str(n) for n in entry.get("names") or ()),
        units=tuple(str(u) for u in entry.get("units") or ()),
        prefix=prefix,
    )


def _colour(value: Any, i: int) -> Colour:
    try:
        r, g, b = (max(0, min(255, int(v))) for v in value)
    except (TypeError, ValueError):
        return Names().colour(i)
    return r, g, b
