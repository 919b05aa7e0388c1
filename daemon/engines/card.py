"""Model cards: what a model file cannot say about itself, in TOML beside it.

``unet.onnx`` has its card in ``unet.toml``::

    task = "segmentation"
    engines = ["onnxruntime"]          # preferred engines, in order
    provenance = "trained on ..., see ..."

    [input]
    size = [256, 256]                  # (h, w); leave out to take it from the model
    layout = "NCHW"                    # only when it cannot be detected
    channels = 1                       # 1 or 3; leave out to take it from the model

    [input.normalisation]              # x = (clip(v) * scale - mean) / std
    scale = 0.00392156862745098        # default 1/255
    clip = [0, 255]
    mean = [0.5]                       # one value, or one per channel
    std = [0.25]

    [output]
    layout = "NCHW"                    # only when it differs from the input's
    activation = "softmax"             # what the model applied already: softmax, sigmoid, none
    threshold = 0.5                    # single-channel outputs: foreground above this probability

    [[classes]]
    name = "background"
    colour = [0, 0, 0]
    opacity = 0.0

    [guard]                            # optional: withhold the overlay of doubtful frames
    min_confidence = 0.9               # mean max-probability over the pixels of a finding
    [guard.domain]                     # network-input statistics (daemon/engines/guard.py)
    fov_fraction = [0.15, 1.0]         # [min, max]

A model with several outputs (or one that is not a segmentation) lists each output's role
instead of ``[output]``; the roles and what each becomes are in daemon/results.py::

    [[outputs]]
    tensor = "view"                    # the model's output name ("" = by position)
    role = "classification"            # segmentation, confidence, classification,
    activation = "none"                # detection, keypoints, regression
    classes = [{ name = "no vessels", colour = [128, 128, 128] },
               { name = "vessels in view", colour = [0, 200, 0] }]

    [[outputs]]
    tensor = "tip"
    role = "keypoints"
    format = "heatmaps"                # or "coordinates"; detection: "boxes", "anchor-free"
    names = ["needle tip"]
    threshold = 0.5                    # points (boxes) scoring less are not shown

``[input] sequence = S`` feeds the last S frames (oldest first) to a model whose input is
(1, S, C, H, W) or (1, S, H, W, C); ``aspect = "keep"`` pads instead of stretching.

``intended_use``, ``training_data``, ``limits`` (text) and ``[evaluation]`` (measured
figures) document the model; echod shows them, it does not act on them.

``[precision]`` is written by ``echod models calibrate`` (daemon/models/calibrate.py):
each precision measured per engine and device, its Dice drop against f32 and its speed;
``precision = "auto"`` runs the fastest one within ``tolerance``
(daemon/engines/precision.py)::

    [precision]
    tolerance = 0.01                   # largest Dice drop (or top-1 drop) auto accepts
    [[precision.measured]]
    engine = "openvino"
    device = "cpu"
    precision = "int8"                 # fp32, fp16, bf16, int8
    file = "unet.int8/openvino.xml"    # int8: the quantized model, relative to the card
    drop = 0.004                       # accuracy drop against f32 (max over classes)
    fps = 180.0                        # frames/s in mode "all" where it was calibrated
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.compat import tomllib
from daemon.engines.base import VOLUME_LAYOUTS, Layout
from daemon.errors import ModelError

log = logging.getLogger(__name__)

Byte = Annotated[int, Field(ge=0, le=255)]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalisation(_Strict):
    """``x = (clip(v) * scale - mean) / std``, per channel for mean and std."""

    scale: PositiveFloat = 1 / 255
    clip: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[PositiveFloat, ...] | None = None

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_or_per_channel(cls, v: Any) -> Any:
        return (v,) if isinstance(v, int | float) else v

    @field_validator("mean", "std")
    @classmethod
    def _length(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and len(v) not in (1, 3):
            raise ValueError(f"needs 1 or 3 values, got {len(v)}")
        return v

    @field_validator("clip")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError("clip must be [min, max] with min < max")
        return v


class InputCard(_Strict):
    size: tuple[PositiveInt, PositiveInt] | None = None  # (h, w); None = from the model
    layout: Layout | Literal["NSCHW", "NSHWC"] | None = None  # None = detected from the model
    channels: Literal[1, 3] | None = None  # None = from the model
    normalisation: Normalisation = Normalisation()
    # a model with free height/width whose strides need sides in multiples of this
    # (None: any side, or learned by probing at start); "pad" pads the frame with zeros
    # (bottom/right) and crops the labels back, "resize" resizes to the nearest multiple
    multiple: PositiveInt | None = None
    fit: Literal["pad", "resize"] = "pad"
    # "keep": scale the frame by one factor to fit the network size and pad the rest with
    # zeros (bottom/right); "stretch": resize each side to the network's
    aspect: Literal["stretch", "keep"] = "stretch"
    # frames per input: 1 is one frame; S > 1 feeds the last S frames, oldest first, as
    # (1, S, C, H, W) ("NSCHW") or (1, S, H, W, C) ("NSHWC")
    sequence: Annotated[int, Field(ge=1, le=64)] = 1

    @property
    def volumetric(self) -> bool:
        """A 3-D model's (CT patches; what the ct job takes)."""
        return self.layout in VOLUME_LAYOUTS


class OutputCard(_Strict):
    layout: Literal["NCHW", "NHWC"] | None = None  # None = the input's layout
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5


class ClassCard(_Strict):
    name: Annotated[str, Field(min_length=1)]
    colour: tuple[Byte, Byte, Byte]
    opacity: Annotated[float, Field(ge=0, le=1)] = 0.5


Role = Literal[
    "segmentation", "confidence", "classification", "detection", "keypoints", "regression"
]
ROLES: tuple[Role, ...] = typing.get_args(Role)


class RoleCard(_Strict):
    """One model output and what it means (``[[outputs]]``, in the model's output order
    unless ``tensor`` names it). What each role becomes in a result record is in
    daemon/results.py."""

    role: Role
    tensor: str = ""  # the model's output name; "" = the output at this entry's position
    layout: Literal["NCHW", "NHWC"] | None = None  # maps; None = the input's layout
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"  # what the model applied
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5  # foreground / min score shown
    classes: tuple[ClassCard, ...] = ()  # () = the card's [[classes]] (segmentation) or defaults
    # detection: "boxes" = (1, N, 6) x1 y1 x2 y2 score class after NMS; "anchor-free" =
    # (1, 4 + C, A) cx cy w h + C class scores per anchor (YOLOv8), NMS in echod.
    # keypoints: "coordinates" = (1, K, 2|3) x y [score]; "heatmaps" = (1, K, h, w)
    format: Literal["boxes", "anchor-free", "coordinates", "heatmaps"] | None = None
    coordinates: Literal["pixels", "normalised"] = "pixels"  # of the network input
    iou: Annotated[float, Field(gt=0, le=1)] = 0.45  # NMS overlap above which boxes merge
    max_detections: PositiveInt = 100
    names: tuple[str, ...] = ()  # keypoint or regression value names
    units: tuple[str, ...] = ()  # regression: one unit per value ("mm", "%", "")

    @model_validator(mode="after")
    def _fits_role(self) -> RoleCard:
        formats = {"detection": ("boxes", "anchor-free"), "keypoints": ("coordinates", "heatmaps")}
        allowed = formats.get(self.role, ())
        if self.format is not None and self.format not in allowed:
            which = f"one of {', '.join(allowed)}" if allowed else "not set"
            raise ValueError(f"format {self.format!r} for role {self.role}: must be {which}")
        if self.units and self.names and len(self.units) != len(self.names):
            raise ValueError(f"{len(self.names)} names but {len(self.units)} units")
        return self


class GuardCard(_Strict):
    """The uncertainty guard's thresholds (daemon/engines/guard.py): a frame is withheld
    when a domain statistic of its network input is outside its range, or when the mean
    probability over the pixels labelled a finding is below ``min_confidence``."""

    min_confidence: Annotated[float, Field(ge=0, le=1)]
    domain: dict[str, tuple[float, float]] = {}

    @field_validator("domain")
    @classmethod
    def _known(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        from daemon.engines.guard import FEATURES

        for name, (lo, hi) in v.items():
            if name not in FEATURES:
                close = difflib.get_close_matches(name, FEATURES, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(FEATURES)}"
                raise ValueError(f"unknown statistic {name!r} ({hint})")
            if not lo <= hi:
                raise ValueError(f"{name}: range [{lo}, {hi}] is empty")
        return v


Quantity = Literal["fp32", "fp16", "bf16", "int8"]


class MeasuredPrecision(_Strict):
    """One precision of one engine and device class, as calibration measured it."""

    engine: Annotated[str, Field(min_length=1)]
    device: Annotated[str, Field(min_length=1)]  # device class: cpu, cuda, gpu, ...
    precision: Quantity
    file: str = ""  # a quantized model beside the card ("" = the model itself)
    drop: Annotated[float, Field(ge=0)]  # accuracy lost against f32 (0 for f32 itself)
    fps: Annotated[float, Field(ge=0)]
    agreement: dict[str, float] = {}  # per class: Dice against f32's labels (top-1 for cls)
    # the frames and machine, where not the card's (a row kept from an earlier calibration)
    data: str = ""
    machine: str = ""


class PrecisionCard(_Strict):
    """Calibration results (``echod models calibrate``) and the tolerance auto keeps to."""

    tolerance: Annotated[float, Field(ge=0, le=1)] = 0.01
    data: str = ""  # what the frames were
    machine: str = ""  # where speed was measured
    measured: tuple[MeasuredPrecision, ...] = ()


class ModelCard(_Strict):
    """Everything about a model that its file does not say."""

    task: Literal["segmentation", "classification"] = "segmentation"
    input: InputCard = InputCard()
    output: OutputCard = OutputCard()
    classes: tuple[ClassCard, ...] = ()
    outputs: tuple[RoleCard, ...] = ()  # () = one output whose role is ``task``
    engines: tuple[str, ...] = ()  # preferred engines, in order; () = the device's default
    provenance: str = ""
    intended_use: str = ""
    training_data: str = ""
    limits: str = ""
    guard: GuardCard | None = None  # None: every frame's overlay is shown
    evaluation: dict[str, Any] = {}  # measured figures, as the training scripts wrote them
    precision: PrecisionCard | None = None  # None: not calibrated, auto = the engine's default

    @model_validator(mode="after")
    def _unique_names(self) -> ModelCard:
        names = [c.name for c in self.classes]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"class name {dup!r} appears more than once")
        return self

    def roles(self) -> tuple[RoleCard, ...]:
        """Every output's role: ``[[outputs]]``, else the first output as ``task`` with
        ``[output]`` and ``[[classes]]``."""
        if self.outputs:
            return self.outputs
        o = self.output
        return (
            RoleCard(
                role=self.task,
                layout=o.layout,
                activation=o.activation,
                threshold=o.threshold,
                classes=self.classes,
            ),
        )

    def class_list(self, n: int) -> tuple[ClassCard, ...]:
        """The card's classes, or ``n`` default ones (class 0 is transparent background)."""
        if self.classes:
            return self.classes
        return tuple(
            ClassCard(
                name="background" if i == 0 else f"class{i}",
                colour=_PALETTE[i % len(_PALETTE)],
                opacity=0.0 if i == 0 else 0.5,
            )
            for i in range(n)
        )


_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


_PRECISION_TABLE = re.compile(r"^\[\[?precision[.\]]")


def without_precision(text: str) -> str:
    """A card's TOML text without its ``[precision]`` tables (figures measured for one
    model file: a converted file is calibrated anew), the rest as it was."""
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skipping = bool(_PRECISION_TABLE.match(line))
        if not skipping:
            kept.append(line)
    return "\n".join(kept).rstrip("\n") + "\n"


def card_path(model: Path) -> Path:
    return Path(model).with_suffix(".toml")


def load_card(model: Path) -> ModelCard:
    """The card beside ``model``, or the defaults (logged) when there is none."""
    path = card_path(model)
    if not path.is_file():
        card = ModelCard()
        log.warning(
            "no model card beside %s; using defaults: %s",
            model,
            json.dumps(card.model_dump(mode="json"), separators=(",", ":")),
        )
        return card
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(f"model card {path} cannot be read: {exc}") from exc
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"model card {path}: {_explain(exc)}") from exc


def _explain(exc: ValidationError) -> str:
    """One line per card mistake: field, rule, value received, nearest valid field."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(card)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            parts.append(f"{loc}: unknown field ({hint})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {err['input']!r})")
    return "; ".join(parts)


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the card section at ``loc`` (list indices skipped)."""
    model: type[BaseModel] = ModelCard
    for part in loc:
        if isinstance(part, int) or part not in model.model_fields:
            continue
        nested = _model_in(model.model_fields[part].annotation)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
