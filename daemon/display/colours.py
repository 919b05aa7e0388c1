"""Colours of the display: the overlay's lookup tables and the default class colours.

A lookup table has 256 RGBA entries, one per label (or confidence level). The
fragment shader colours label ``k`` with ``lut[k].rgb`` at opacity ``lut[k].a / 255``.
Class 0 of a label map is always transparent (the image shows through).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from daemon.engines.card import ClassCard, ModelCard

LUT_SIZE = 256


def class_lut(classes: Sequence[ClassCard] = ()) -> np.ndarray:
    """(256, 4) uint8 from the model card's classes: colour and opacity per label.

    With no classes, the default palette (``ModelCard.class_list``); labels past
    the classes listed are transparent.
    """
    classes = classes or ModelCard().class_list(LUT_SIZE)
    lut = np.zeros((LUT_SIZE, 4), np.uint8)
    for k, c in enumerate(classes[:LUT_SIZE]):
        lut[k, :3] = c.colour
        lut[k, 3] = round(c.opacity * 255)
    lut[0, 3] = 0
    return lut


def heatmap_lut(opacity: float = 0.6) -> np.ndarray:
    """(256, 4) uint8 for confidence maps (0..255): the inferno colour map, opacity
    rising linearly from 0 (no confidence) to ``opacity`` (certain)."""
    ramp = np.arange(LUT_SIZE, dtype=np.uint8)[:, None]
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_INFERNO)[:, 0, :]
    lut = np.empty((LUT_SIZE, 4), np.uint8)
    lut[:, :3] = bgr[:, ::-1]
    lut[:, 3] = np.round(np.linspace(0.0, opacity * 255, LUT_SIZE))
    return lut
