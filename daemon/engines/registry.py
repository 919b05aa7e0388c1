"""Engines by name: built-ins, and third parties through the ``echod.engines`` entry points.

Names map to ``"module:Class"`` strings that are imported only when asked for,
and engine modules import their library only in ``probe``/``load``: nothing
here imports an inference library until an engine is probed or loaded.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Sequence
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from daemon.engines.base import Engine, Probe, device_kind
from daemon.errors import EngineError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "echod.engines"

BUILTINS: dict[str, str] = {
    "onnxruntime": "daemon.engines.onnxruntime:OnnxRuntimeEngine",
    "openvino": "daemon.engines.openvino:OpenVinoEngine",
    "tensorrt": "daemon.engines.tensorrt:TensorRtEngine",
    "pytorch": "daemon.engines.pytorch:PyTorchEngine",
}

# Fixed preference per device class (base.DEVICE_CLASSES); names that are not
# registered are skipped. GPUs: the engine that compiles for the device first.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("onnxruntime", "openvino", "pytorch"),
    "cuda": ("tensorrt", "onnxruntime", "pytorch"),
    "gpu": ("openvino", "onnxruntime"),
    "npu": ("openvino", "onnxruntime"),
    "myriad": ("openvino",),
    "auto": ("openvino",),
}


@cache
def _third_party() -> dict[str, str]:
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTINS:
            log.warning(
                "entry point %s = %s ignored: %r is a built-in engine", ep.name, ep.value, ep.name
            )
        else:
            found[ep.name] = ep.value
    return found


def engines() -> dict[str, str]:
    """Every registered engine: name -> ``"module:Class"`` (built-ins first)."""
    return {**BUILTINS, **_third_party()}


def names() -> list[str]:
    return list(engines())


def engine_class(name: str) -> type[Engine]:
    """The engine class registered as ``name`` (imports its module, not its library)."""
    registered = engines()
    target = registered.get(name)
    if target is None:
        close = difflib.get_close_matches(name, registered, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(registered)}"
        raise EngineError(f"unknown engine {name!r}: {hint}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        raise EngineError(f"engine {name!r} ({target}) cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise EngineError(f"engine {name!r} ({target}) is not an echod Engine subclass")
    return cls


def probe(name: str) -> Probe:
    """Probe one engine by name; an engine that fails to import or probe is reported."""
    try:
        return engine_class(name).probe()
    except EngineError as exc:
        return Probe(name, None, False, (), str(exc))
    except Exception as exc:  # a third-party probe broke its promise not to raise
        return Probe(name, None, False, (), f"probe failed: {type(exc).__name__}: {exc}")


def probe_all() -> list[Probe]:
    return [probe(name) for name in engines()]


def preference(device: str) -> tuple[str, ...]:
    """Default order of engines to try on ``device``: the fixed preference of its
    device class, then any other registered engine in registration order."""
    fixed = PREFERENCE.get(device_kind(device), ())
    return fixed + tuple(n for n in engines() if n not in fixed)


def select(
    preferred: Sequence[str], device: str, model: Path | None = None
) -> tuple[type[Engine], list[str]]:
    """The first engine in ``preferred`` whose probe says it can run on ``device``
    and, given ``model``, that loads that file and supports what it needs.

    Returns the class and why each engine before it was skipped (also logged);
    raises EngineError with all the reasons when none fits.
    """
    skipped: list[str] = []
    for name in preferred:
        if why := unfit(name, device, model):
            skipped.append(f"{name}: {why}")
        else:
            for s in skipped:
                log.info("engine %s skipped: %s", *s.split(": ", 1))
            return engine_class(name), skipped
    why = "; ".join(skipped) or "no engine was named"
    raise EngineError(f"no engine can run on {device!r}: {why}")


def unfit(name: str, device: str, model: Path | None = None) -> str:
    """Why engine ``name`` cannot run on ``device`` here (and, given ``model``, load that
    file and run what it needs); "" when it can."""
    p = probe(name)
    if not p.available:
        return p.reason
    if device_kind(device) not in p.devices:
        has = f"has {', '.join(p.devices) or 'none'}"
        why = p.why_missing(device)
        return f"no device {device!r} ({has}){': ' + why if why else ''}"
    if model is None:
        return ""
    try:
        return engine_class(name).supports(model, device)
    except Exception as exc:  # a third-party check broke
        return f"cannot check the model: {type(exc).__name__}: {exc}"
