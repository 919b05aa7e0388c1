"""``precision = "auto"``: the fastest calibrated precision within the card's tolerance.

``echod models calibrate`` (daemon/models/calibrate.py) measures each precision an
engine offers (f32, bf16/f16, int8 from a quantized file beside the card) for its
accuracy drop against f32 and its speed, and writes them under ``[precision]`` in the
model card. Here the infer stage picks one for its engine and device class: the
fastest whose drop is within ``tolerance``; f32 (the engine's default) when the card
has no figures for them. The choice and why travel in :class:`Choice`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from daemon.engines.base import device_kind
from daemon.engines.card import MeasuredPrecision, ModelCard, card_path
from daemon.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """What runs: ``precision`` (fp32, fp16, bf16, int8, or auto: the engine's default),
    the engine option that gives it, the file to load, and why."""

    precision: str
    option: str
    file: Path
    reason: str


def _option(precision: str) -> str:
    """The engine option for a calibrated precision: int8 is in the file, the rest f32."""
    return "fp32" if precision == "int8" else precision


def _file(model: Path, row: MeasuredPrecision) -> Path:
    return card_path(model).parent / row.file if row.file else model


_MEASURE = {
    "segmentation": "Dice drop",
    "classification": "top-1 drop",
    "keypoints": "keypoint drop",
}  # what daemon/models/calibrate.py measures of a model's first output


def unit(card: ModelCard) -> str:
    """What a row's ``fps`` counts: frames, a 3-D model's patches."""
    return "patches" if card.input.volumetric else "frames"


def _text(row: MeasuredPrecision, per: str) -> str:
    rate = f"{row.fps:.1f}" if row.fps < 100 else f"{row.fps:.0f}"
    return f"{row.precision} ({rate} {per}/s, drop {row.drop:.4f})"


def choose(card: ModelCard, model: Path, engine: str, device: str, requested: str) -> Choice:
    """The precision to run ``model`` at on ``engine``/``device``; ``requested`` is the
    ``precision`` option ("auto" or one named)."""
    kind = device_kind(device)
    measured = card.precision.measured if card.precision else ()
    rows = [m for m in measured if m.engine == engine and m.device == kind]
    if requested == "int8":
        row = next((m for m in rows if m.precision == "int8"), None)
        if row is None or not _file(model, row).is_file():
            raise ModelError(
                f"model {model.name} has no int8 file for {engine} on {kind}: run "
                f"echod models calibrate {model} (with NNCF / onnxruntime.quantization)"
            )
        return Choice("int8", "fp32", _file(model, row), "int8 set in model.options")
    if requested != "auto":
        return Choice(requested, requested, model, f"{requested} set in model.options")
    if not rows:
        why = (
            f"no calibration for {engine} on {kind} in its card"
            if measured
            else "model not calibrated (echod models calibrate)"
        )
        return Choice("auto", "auto", model, f"{why}: the engine's default")
    assert card.precision is not None
    tol = card.precision.tolerance
    usable, refused = [], []
    for m in rows:
        if m.drop > tol:
            refused.append(f"{m.precision} drop {m.drop:.4f} > {tol}")
        elif not _file(model, m).is_file():
            refused.append(f"{m.precision} file {m.file} missing")
        else:
            usable.append(m)
    if not usable:
        return Choice("auto", "auto", model, f"none within tolerance ({'; '.join(refused)})")
    best = max(usable, key=lambda m: m.fps)
    per = unit(card)
    slower = [_text(m, per) for m in usable if m is not best]
    measure = _MEASURE.get(card.roles()[0].role, "drop")
    reason = f"fastest within {measure} <= {tol}: {_text(best, per)}"
    if slower:
        reason += f"; slower: {', '.join(slower)}"
    if refused:
        reason += f"; refused: {', '.join(refused)}"
    return Choice(best.precision, _option(best.precision), _file(model, best), reason)
