"""Bundled models, and the model a run uses when none is named."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED = Path(__file__).resolve().parent
ULTRASOUND = "ultrasound-seg.onnx"
REFERENCE_2D = "unet2d-256"


def default_model(cache_dir: Path) -> Path:
    """The bundled ultrasound segmentation model.

    Until a trained one is bundled, the paper-size 2-D U-Net (random weights)
    is generated into the cache, and the log says so: its overlay is noise.
    """
    bundled = BUNDLED / ULTRASOUND
    if bundled.exists():
        return bundled
    from daemon.engines.reference import ensure_reference

    path = ensure_reference(REFERENCE_2D, cache_dir)
    log.warning(
        "no trained ultrasound model is bundled yet: using the paper-size 2-D U-Net with "
        "random weights from %s (timings are real, the overlay is not)",
        path,
    )
    return path
