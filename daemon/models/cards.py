"""The card fields (TOML) of each task, said once.

A bundled model and the reference network of the same task share them: input
size and layout, normalisation, class names and colours. A card is these fields
after a provenance line (and, for trained models, the training record).
"""

from __future__ import annotations

import json
from typing import Any

WSI_MEAN, WSI_STD = 0.5, 0.25  # of RGB in 0..1; the training code normalises with these


def _grey_input(size: int) -> str:
    """The ``[input]`` of a B-mode model: one grey channel of ``size`` x ``size``, NCHW,
    scaled to 0..1."""
    return f"""\
[input]
size = [{size}, {size}]
layout = "NCHW"
channels = 1

[input.normalisation]
scale = 0.00392156862745098
"""


ULTRASOUND = f"""\
task = "segmentation"

{_grey_input(256)}
[output]
activation = "softmax"

[[classes]]
name = "background"
colour = [0, 0, 0]
opacity = 0.0

[[classes]]
name = "artery"
colour = [255, 0, 0]
opacity = 0.5

[[classes]]
name = "vein"
colour = [0, 0, 255]
opacity = 0.5
"""

CT = """\
task = "segmentation"

[input]
layout = "NCDHW"
channels = 1

[input.normalisation]
clip = [-1200.0, 400.0]
scale = 0.000625
mean = [-0.75]

[output]
activation = "softmax"

[[classes]]
name = "background"
colour = [0, 0, 0]
opacity = 0.0

[[classes]]
name = "nodule"
colour = [255, 200, 0]
opacity = 0.6
"""

WSI = f"""\
task = "classification"

[input]
size = [512, 512]
layout = "NCHW"
channels = 3

[input.normalisation]
scale = 0.00392156862745098
mean = [{WSI_MEAN}]
std = [{WSI_STD}]

[output]
activation = "softmax"

[[classes]]
name = "normal"
colour = [0, 160, 0]
opacity = 0.4

[[classes]]
name = "benign"
colour = [0, 90, 255]
opacity = 0.4

[[classes]]
name = "in-situ"
colour = [255, 200, 0]
opacity = 0.5

[[classes]]
name = "invasive"
colour = [230, 0, 0]
opacity = 0.5
"""


ULTRASOUND_USE = (
    "Research and demonstration: live artery/vein segmentation of B-mode frames in the "
    "echod pipeline. Not a medical device; not for diagnosis or guidance."
)
ULTRASOUND_DATA = (
    "Simulated frames only (daemon/phantoms/ultrasound.py): convolution-model B-mode "
    "images of neck and abdomen scenes with zero, one or two vessels and of water, fluid, "
    "cysts, bone, needles, air, blank and dark frames; linear and curvilinear probes. "
    "No real image was used for training or for setting any threshold."
)
ULTRASOUND_LIMITS = (
    "Seen only simulated anatomy: real vessels, other anatomy and other scanners may be "
    "missed or mislabelled. Artery and vein are told apart by shape and wall, not by flow "
    "or compression over time. The guard withholds frames that do not look like its "
    "training domain, or where the model is unsure; a frame that passes is not thereby "
    "correct. Real-data figures below are from two recordings that contain no vessel: "
    "they bound false positives on them, they measure no sensitivity."
)


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def _toml_tables(prefix: str, table: dict[str, Any]) -> list[str]:
    """``[prefix]`` with the plain values of ``table``, then its sub-tables."""
    lines = [f"\n[{prefix}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += _toml_tables(f"{prefix}.{k}", v)
    return lines


def ultrasound_card(record: dict[str, Any], params: int) -> str:
    """The bundled ultrasound model's card from its record (the ONNX metadata that the
    training script and ``calibrate`` / ``measure`` write)."""
    training = record.get("training", {})
    scores = record.get("scores", {})
    lines = ["# Model card (daemon/engines/card.py), written by daemon/models/train/ultrasound.py."]
    lines += [f"# training {k}: {v}" for k, v in training.items()]
    for step in ("calibration",):
        lines += [f"# {step} {k}: {v}" for k, v in record.get(step, {}).items()]
    if "real_data" in record:
        lines.append(
            "# measure: python -m daemon.models.train.ultrasound measure ultrasound-seg.onnx "
            "(real recordings ../shared/data/us, measured only)"
        )
    provenance = (
        f"FAST paper 2-D U-Net ({params:,} parameters) trained on the echod ultrasound "
        f"simulator ({training.get('data', '?').split(',')[0]}, {training.get('steps', '?')} "
        f"steps); held-out Dice artery {scores.get('dice_artery', float('nan')):.3f}, vein "
        f"{scores.get('dice_vein', float('nan')):.3f}; synthetic data only, not for clinical use"
    )
    lines += [
        f"provenance = {json.dumps(provenance)}",
        f"intended_use = {json.dumps(ULTRASOUND_USE)}",
        f"training_data = {json.dumps(ULTRASOUND_DATA)}",
        f"limits = {json.dumps(ULTRASOUND_LIMITS)}",
        "",
        ULTRASOUND.rstrip("\n"),
    ]
    if "guard" in record:
        lines += _toml_tables("guard", record["guard"])
    evaluation: dict[str, Any] = {"held_out": scores}
    if "real_data" in record:
        real: dict[str, dict[str, Any]] = {}
        for key, value in record["real_data"].items():
            name, _, field = key.partition(".")
            real.setdefault(name, {})[field] = value
        evaluation["real_data"] = real
    lines += _toml_tables("evaluation", evaluation)
    return "\n".join(lines) + "\n"


VIEW_SIZE, NEEDLE_SIZE = 128, 256  # network input sides (h = w)


def view_fields() -> str:
    """The view classifier's card fields: its output is (1, 2) class probabilities, in
    the order of :data:`daemon.phantoms.us_tasks.VIEW_CLASSES`."""
    from daemon.phantoms.us_tasks import VIEW_CLASSES

    return f"""\
task = "classification"

{_grey_input(VIEW_SIZE)}
[[outputs]]
tensor = "view"
role = "classification"
activation = "softmax"
classes = [
  {{ name = "{VIEW_CLASSES[0]}", colour = [160, 160, 160], opacity = 0.5 }},
  {{ name = "{VIEW_CLASSES[1]}", colour = [0, 200, 0], opacity = 0.5 }},
]
"""


def needle_fields(threshold: float) -> str:
    """The keypoint model's card fields: its output is (1, 1, 3), the tip's x and y
    normalised to the input's extent and its score (a sigmoid probability)."""
    return f"""\
{_grey_input(NEEDLE_SIZE)}
[[outputs]]
tensor = "tip"
role = "keypoints"
format = "coordinates"
coordinates = "normalised"
activation = "sigmoid"
names = ["needle tip"]
threshold = {threshold}
"""


VIEW_USE = (
    "Research and demonstration: tells live B-mode frames with a vessel in view (an artery "
    "or vein in cross-section, at least half of it) from frames without one. Not a medical "
    "device; not for diagnosis or guidance."
)
NEEDLE_USE = (
    "Research and demonstration: marks the tip of an in-plane needle in live B-mode frames, "
    "and nothing when no needle tip is in view. Not a medical device; not for guidance."
)
TASK_DATA = (
    "Simulated frames only (daemon/phantoms/us_tasks.py over daemon/phantoms/ultrasound.py): "
    "convolution-model B-mode images of neck and abdomen scenes with and without vessels, "
    "water (a tank's bottom, wires), fluid collections and cysts, bone, air, blank and dark "
    "frames, in-plane needles at 11-46 degrees; linear and curvilinear probes; plus frames of "
    "the live phantom (probe sweep, advancing needle). No real image was used for training "
    "or for setting any threshold."
)
VIEW_LIMITS = (
    "Seen only simulated anatomy: real vessels, other anatomy and other scanners may be "
    "missed or called vessels; an anechoic round cyst is the closest look-alike. A vessel "
    "only partly in view (under half its lumen) belongs to neither class and is not scored. "
    "Real-data figures are from two recordings with no vessel: they bound false 'vessels in "
    "view' on them, they measure no sensitivity."
)
NEEDLE_LIMITS = (
    "Seen only simulated needles (a straight bright shaft with a comet tail): bent or "
    "out-of-plane needles, other bright lines and other scanners may be missed or marked. "
    "One tip per frame. Real-data figures are from two recordings with no needle: they bound "
    "false points on them, they measure no sensitivity."
)


def task_card(
    script: str,
    record: dict[str, Any],
    provenance: str,
    texts: tuple[str, str, str],
    fields: str,
) -> str:
    """A trained task model's card (view classifier, needle tip) from its record:
    the training run as comments, the texts (intended use, training data, limits),
    ``fields`` and ``[evaluation]`` (held out, live phantom, real data)."""
    lines = [f"# Model card (daemon/engines/card.py), written by daemon/models/train/{script}.py."]
    lines += [f"# training {k}: {v}" for k, v in record.get("training", {}).items()]
    lines += [f"# evaluation {k}: {v}" for k, v in record.get("evaluation", {}).items()]
    use, data, limits = texts
    lines += [
        f"provenance = {json.dumps(provenance)}",
        f"intended_use = {json.dumps(use)}",
        f"training_data = {json.dumps(data)}",
        f"limits = {json.dumps(limits)}",
        "",
        fields.rstrip("\n"),
    ]
    figures: dict[str, Any] = {
        k: record[k] for k in ("held_out", "live_phantom", "real_data") if k in record
    }
    if figures:
        lines += _toml_tables("evaluation", figures)
    return "\n".join(lines) + "\n"
