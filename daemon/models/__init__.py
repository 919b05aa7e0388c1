"""Bundled models, the model a run uses when none is named, and the model catalogue.

Bundled (trained on echod's phantoms, see README.md beside this file):
``ultrasound-seg.onnx`` (artery/vein, the live default), ``ultrasound-view.onnx``
(frame classifier: vessels in view or not), ``ultrasound-needle.onnx`` (needle-tip
keypoint), ``ct-nodule-seg.onnx`` (3-D lung nodules) and ``wsi-patch-cls.onnx``
(4-class H&E patches), each with its card. Paper-size reference networks (random
weights) are generated into the cache on demand (:mod:`daemon.engines.reference`) and
run only when named: a missing or broken bundled model is an error, never replaced by
random weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import ModelError

log = logging.getLogger(__name__)

BUNDLED = Path(__file__).resolve().parent
ULTRASOUND = "ultrasound-seg.onnx"
CT = "ct-nodule-seg.onnx"
WSI = "wsi-patch-cls.onnx"
VIEW = "ultrasound-view.onnx"
NEEDLE = "ultrasound-needle.onnx"


def default_model() -> Path:
    """The bundled ultrasound segmentation model, checked: a one-line ModelError when it is
    missing, unreadable or has no trained weights. echod never falls back to random
    weights on its own: a reference network runs only when it is named (``--model``)."""
    bundled = BUNDLED / ULTRASOUND
    problem = _unusable(bundled)
    if problem:
        raise ModelError(
            f"the bundled model {bundled} {problem}: reinstall echod, or name a model with "
            "--model FILE (for timing only, a reference network with random weights: "
            "echod models --reference unet2d-256, then --model with the path it prints)"
        )
    return bundled


def model_path(setting: str) -> Path:
    """The model a ``model.path`` setting names: "" is the bundled ultrasound model; a
    bare file name that is not a file here but is a bundled model's (``ultrasound-view.onnx``)
    is that bundled model; anything else is the path as given."""
    if not setting:
        return default_model()
    path = Path(setting)
    if path.name == setting and not path.exists() and (BUNDLED / setting).is_file():
        return BUNDLED / setting
    return path


def _unusable(path: Path) -> str:
    """What makes ``path`` unusable as the default model, or ""."""
    import onnx
    from google.protobuf.message import DecodeError

    from daemon.engines.card import load_card

    if not path.is_file():
        return "is missing"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as exc:
        return (
            f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
    if not model.graph.node:
        return "cannot be read (no graph in it)"
    weights = {p.key: p.value for p in model.metadata_props}.get("echod.weights")
    if weights != "trained":
        return f"has no trained weights (echod.weights = {weights!r})"
    try:
        load_card(path)
    except ModelError as exc:
        return f"has a card that cannot be used ({exc})"
    return ""


@dataclass(frozen=True)
class ModelInfo:
    """One model file as ``echod models`` lists it."""

    name: str
    path: Path
    origin: str  # "bundled" or "cache"
    task: str = ""
    input_shape: tuple[int | str, ...] = ()  # named dimensions are dynamic
    layout: str | None = None
    classes: tuple[str, ...] = ()
    parameters: int = 0
    weights: str = "unknown"  # "trained", "random" or "unknown"
    scores: dict[str, float] = field(default_factory=dict)
    provenance: str = ""
    error: str = ""  # why the file or its card could not be read

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["input_shape"] = list(self.input_shape)
        d["classes"] = list(self.classes)
        return d


def describe(path: Path, origin: str) -> ModelInfo:
    """What the ONNX file and its card say (metadata ``echod.weights``, ``echod.scores``)."""
    import onnx
    from google.protobuf.message import DecodeError

    from daemon.engines.base import detect_layout
    from daemon.engines.card import load_card

    name = path.stem
    try:
        model = onnx.load(str(path), load_external_data=False)
        card = load_card(path)
    except (OSError, DecodeError, ModelError) as exc:
        return ModelInfo(name, path, origin, error=str(exc).splitlines()[0])
    weights = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in weights)
    shape = tuple(d.dim_value or d.dim_param or "?" for d in inp.type.tensor_type.shape.dim)
    out = model.graph.output[0].type.tensor_type.shape.dim
    n_out = out[1].dim_value if len(out) > 1 else 0
    props = {p.key: p.value for p in model.metadata_props}
    numeric = tuple(d if isinstance(d, int) else None for d in shape)
    task: str = card.task
    classes = tuple(c.name for c in card.class_list(max(n_out, 2)))
    if card.outputs:  # [[outputs]]: each output's role, its classes or point/value names
        task = "+".join(dict.fromkeys(r.role for r in card.outputs))
        classes = tuple(n for r in card.outputs for n in (*(c.name for c in r.classes), *r.names))
    return ModelInfo(
        name=name,
        path=path,
        origin=origin,
        task=task,
        input_shape=shape,
        layout=card.input.layout or detect_layout(numeric),
        classes=classes,
        parameters=sum(_numel(t.dims) for t in model.graph.initializer),
        weights=props.get("echod.weights", "unknown"),
        scores=json.loads(props.get("echod.scores", "{}")),
        provenance=card.provenance,
    )


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def list_models(cache_dir: Path | None) -> list[ModelInfo]:
    """Bundled models, then ONNX models in ``cache_dir/models`` (generated references)."""
    found = [describe(p, "bundled") for p in sorted(BUNDLED.glob("*.onnx"))]
    if cache_dir is not None:
        found += [describe(p, "cache") for p in sorted((Path(cache_dir) / "models").glob("*.onnx"))]
    return found
