"""Opening a model: its card, the engine (chosen or named), the precision, the
pre-processing path. One place for every model runner (the live :class:`Network`,
the :class:`Segmenter`, the WSI :class:`PatchClassifier`).

The engine is the one named, or the first in the card's ``engines`` then the device's
fixed preference whose probe says it can run the model here (the choice and why the
others were skipped are logged). ``precision = "auto"`` takes the card's calibrated
choice (daemon/engines/precision.py); the option ``preprocess`` ("cpu", "opencl",
"auto") picks the pre-processing path (daemon/engines/opencl.py). :func:`fit` checks,
at start, that frames of the source's size go through every step (probing the multiple
a model with free height/width needs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import DTypeLike

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


PROBE_MULTIPLES = (8, 16, 32, 64, 128)
_FITTING = (ModelError, EngineError, RuntimeError, ValueError)


def frame_text(shape: tuple[int, ...]) -> str:
    """``480x640 gray`` / ``480x640 with 3 channels``: frames in messages."""
    text = "x".join(str(d) for d in shape[:2])
    if len(shape) == 3:
        text += " gray" if shape[2] == 1 else f" with {shape[2]} channels"
    return text


def check_frame(shape: tuple[int, ...], dtype: DTypeLike | None = None) -> None:
    """One-line ModelError unless frames of ``shape`` (and ``dtype``) are images a model
    can take: gray (HxW) or RGB (HxWx3), numeric."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)) or 0 in shape:
        text = "x".join(map(str, shape))
        raise ModelError(f"frames of shape {text} are not gray (HxW) or RGB (HxWx3) images")
    if dtype is not None and np.dtype(dtype).kind not in "uif":
        raise ModelError(f"frames of type {np.dtype(dtype)} are not numeric images")


def fit(
    model: Path,
    card: ModelCard,
    free: bool,
    frame_shape: tuple[int, ...],
    run: Callable[[ModelCard], None],
) -> ModelCard:
    """The card with which frames of ``frame_shape`` go through every step (``run``
    puts one blank frame through prepare, inference and decoding with a card): ``card``
    itself, or, for a model with ``free`` height/width that rejects the frame's sides
    (strides that need multiples of 32, say), ``card`` with the ``multiple`` it needs,
    probed (frames are padded to it). One-line ModelError when none works."""
    try:
        run(card)
        return card
    except _FITTING as e:
        first = e
    probe = free and card.input.multiple is None
    if probe:
        for m in PROBE_MULTIPLES:
            padded = card.model_copy(
                update={"input": card.input.model_copy(update={"multiple": m, "fit": "pad"})}
            )
            try:
                run(padded)
            except _FITTING:
                continue
            log.info(
                "model %s needs sides in multiples of %d (probed): frames of %s are padded",
                model.name,
                m,
                frame_text(frame_shape),
            )
            return padded
    reason = str(first).splitlines()[0] if str(first).strip() else type(first).__name__
    tried = f" (padding to multiples of {', '.join(map(str, PROBE_MULTIPLES))} did not help)"
    raise ModelError(
        f"model {model.name} cannot take frames of {frame_text(frame_shape)}: {reason}"
        + (tried if probe else "")
    ) from None


class _Runner(Protocol):
    precision: precision.Choice

    def __init__(
        self,
        engine: Engine,
        card: ModelCard,
        model: Path,
        skipped: list[str] | None = ...,
        prepare: opencl.Prepare = ...,
        prepare_info: tuple[str, str] = ...,
    ) -> None: ...


R = TypeVar("R", bound=_Runner)


def open_runner(cls: type[R], model: Path, engine: str | None, device: str, **options: Any) -> R:
    """:func:`open_model`, then ``cls`` (Network, Segmenter) around what was opened; the
    engine is closed if ``cls`` refuses the model."""
    opened = open_model(model, engine, device, **options)
    try:
        runner = cls(
            opened.engine,
            opened.card,
            opened.model,
            opened.skipped,
            opened.prepare,
            opened.prepare_info,
        )
    except BaseException:
        opened.engine.close()
        raise
    runner.precision = opened.precision
    return runner
