"""Opening a model: its card, the engine (chosen or named), the precision, the
pre-processing path. One place for every model runner (the live :class:`Network`,
the :class:`Segmenter`, the WSI :class:`PatchClassifier`).

The engine is the one named, or the first in the card's ``engines`` then the device's
fixed preference whose probe says it can run the model here (the choice and why the
others were skipped are logged). ``precision = "auto"`` takes the card's calibrated
choice (daemon/engines/precision.py); the option ``preprocess`` ("cpu", "opencl",
"auto") picks the pre-processing path (daemon/engines/opencl.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.engines import opencl, precision, preprocess, registry
from daemon.engines.base import Engine
from daemon.engines.card import ModelCard, load_card
from daemon.errors import EngineError, ModelError

log = logging.getLogger(__name__)


@dataclass
class Opened:
    """A model loaded on an engine, with what was decided on the way."""

    engine: Engine
    card: ModelCard
    model: Path
    skipped: list[str]  # why engines before the chosen one were not taken
    precision: precision.Choice
    prepare: opencl.Prepare
    prepare_info: tuple[str, str]  # (what pre-processes, why not OpenCL or "")


def engine_class(
    model: Path, card: ModelCard, engine: str | None, device: str
) -> tuple[type[Engine], list[str]]:
    """The engine class for ``model`` on ``device`` and why others were skipped."""
    if engine is not None:
        cls = registry.engine_class(engine)
        probe = cls.probe()
        if not probe.available:
            raise EngineError(f"engine {engine!r} is not usable here: {probe.reason}")
        return cls, []
    default = registry.preference(device)
    order = [*card.engines, *(n for n in default if n not in card.engines)]
    cls, skipped = registry.select(order, device, model)
    log.info(
        "engine %s chosen for %s on %s%s",
        cls.name,
        model.name,
        device,
        "".join(f"; skipped {s}" for s in skipped),
    )
    return cls, skipped


def open_model(
    model: Path, engine: str | None = None, device: str = "cpu", **options: Any
) -> Opened:
    """Load ``model`` with its card on ``engine`` (None: the best available on ``device``).
    ``preprocess`` ("cpu" by default) is taken out of ``options``; the rest go to the
    engine's ``load`` (``precision = "auto"`` resolved from the card first)."""
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"model file not found: {model}")
    card = load_card(model)
    cls, skipped = engine_class(model, card, engine, device)
    setting = str(options.pop("preprocess", "cpu"))
    choice = precision.choose(card, model, cls.name, device, str(options.get("precision", "auto")))
    if choice.option != "auto":
        options["precision"] = choice.option
    log.info("precision %s for %s: %s", choice.precision, model.name, choice.reason)
    eng = cls()
    eng.load(choice.file, device, **options)
    try:
        prepare, what, why = opencl.choose(setting, device)
    except BaseException:
        eng.close()
        raise
    if what != "cpu" and (card.input.aspect == "keep" or preprocess.pads(card)):
        prepare, what = preprocess.prepare, "cpu"
        why = "the OpenCL kernel stretches; this card pads (aspect keep or fit pad)"
    return Opened(eng, card, model, skipped, choice, prepare, (what, why))
