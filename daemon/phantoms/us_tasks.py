"""Frames for the two tasks beyond segmentation, drawn from the ultrasound simulator.

- :func:`view_example`: is a vessel in view? Half the seeds draw a neck or abdomen scene
  with vessels (at times placed across a wider field, so that some are cut by the edge
  of the view or lie outside it), half a frame with none: the same scenes without
  vessels, water, fluid collections and cysts, air, blank and dark frames. The class is
  the frame's :class:`~daemon.phantoms.ultrasound.Truth` ``view`` (1 when a vessel shows
  at least half its lumen, 0 when none shows any, None between: not used).
- :func:`needle_example`: where is the needle's tip? Half the seeds have exactly one
  in-plane needle whose tip is in view (``truth.tip``, pixels; ``truth.tip_mm``), half
  no tip in view: no needle among the same scenes and bright lines that are not needles
  (fasciae, bone, a tank's bottom in water), or a needle's shaft that leaves the view
  with its tip beyond it.

Both are deterministic by seed and need numpy and OpenCV only.
"""

from __future__ import annotations

import numpy as np

from daemon.phantoms.ultrasound import ARTERY, VEIN, Example, ExampleKind, example

VIEW_CLASSES = ("no vessels", "vessels in view")  # class index = Truth.view
_VESSELS = ((ARTERY,), (VEIN,), (ARTERY, VEIN))
_WITHOUT: tuple[tuple[ExampleKind, float], ...] = (
    ("neck", 0.28),
    ("abdomen", 0.22),
    ("water", 0.14),
    ("fluid", 0.16),
    ("air", 0.10),
    ("blank", 0.10),
)
_WITH_NEEDLE: tuple[tuple[ExampleKind, float], ...] = (
    ("neck", 0.45),
    ("abdomen", 0.30),
    ("fluid", 0.12),
    ("water", 0.13),
)
_NO_NEEDLE: tuple[tuple[ExampleKind, float], ...] = (
    ("neck", 0.30),
    ("abdomen", 0.25),
    ("fluid", 0.10),
    ("water", 0.20),
    ("air", 0.08),
    ("blank", 0.07),
)


def _pick(rng: np.random.Generator, table: tuple[tuple[ExampleKind, float], ...]) -> ExampleKind:
    return table[int(rng.choice(len(table), p=[p for _, p in table]))][0]


def view_example(seed: int, size: int) -> Example:
    """A frame with vessels in view or without (about half each), ``size`` x ``size``."""
    rng = np.random.default_rng([seed, 17])
    if rng.random() < 0.5:
        kind: ExampleKind = "neck" if rng.random() < 0.55 else "abdomen"
        vessels = _VESSELS[int(rng.integers(len(_VESSELS)))]
        return example(seed, kind, size, vessels=vessels, dark=False, wide=rng.random() < 0.3)
    kind = _pick(rng, _WITHOUT)
    return example(seed, kind, size, vessels=(), dark=bool(rng.random() < 0.1))


def needle_example(seed: int, size: int) -> Example:
    """A frame with one needle whose tip is in view, or with none (about half each); some
    of those without show a needle's shaft leaving the view, its tip beyond it: only in
    tissue, whose field of view ends visibly (in water the view's edge is as black as the
    water, and a shaft cut by it looks like one whose tip is there)."""
    rng = np.random.default_rng([seed, 19])
    if rng.random() < 0.5:
        return example(seed, _pick(rng, _WITH_NEEDLE), size, needle="tip", dark=False)
    kind = _pick(rng, _NO_NEEDLE)
    if kind in ("neck", "abdomen") and rng.random() < 0.4:
        return example(seed, kind, size, needle="shaft")
    return example(seed, kind, size, needle="none")
