"""What the classifier and keypoint scripts share after training (numpy, ONNX Runtime,
no torch): running an exported model on frames as echod prepares them, reading what it
says, the ONNX file's record (``echod.*`` metadata) and the real recordings.

Tests use it too (tests/test_models.py): the gates are measured one way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REAL_DATA = Path("../shared/data/us")  # relative to the project root


class Runner:
    """An exported model on ONNX Runtime (CPU), fed frames as the live path feeds them:
    :func:`daemon.engines.preprocess.prepare` per the model's card."""

    def __init__(self, model: Path) -> None:
        from daemon.engines.card import load_card
        from daemon.engines.onnxruntime import OnnxRuntimeEngine

        self.card = load_card(model)
        self.engine = OnnxRuntimeEngine()
        self.engine.load(model, "cpu")
        self.spec = self.engine.inputs[0]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The model's first output for one frame (batch dimension kept)."""
        from daemon.engines.preprocess import prepare

        out = self.engine.run({self.spec.name: prepare(image, self.spec, self.card)})
        return out[self.engine.outputs[0].name]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def point(output: np.ndarray, shape: tuple[int, ...], threshold: float) -> np.ndarray | None:
    """A keypoint model's (1, 1, 3) output (x, y normalised to the input's extent, score)
    as (x, y) in pixels of a frame of ``shape`` (pixel centres at whole numbers), or None
    when it scores below ``threshold`` (no point shown)."""
    x, y, score = (float(v) for v in output.reshape(-1)[:3])
    if score < threshold:
        return None
    h, w = shape[:2]
    return np.array([x * w - 0.5, y * h - 0.5])


def tip_error_mm(
    found: np.ndarray, truth: tuple[float, float], spacing: tuple[float, float]
) -> float:
    """Distance (mm) between a found point and the true one; ``spacing`` (rows, columns)."""
    dx = (found[0] - truth[0]) * spacing[1]
    dy = (found[1] - truth[1]) * spacing[0]
    return float(np.hypot(dx, dy))


def real_recordings(data: Path) -> Iterator[tuple[str, list[np.ndarray]]]:
    """(name, frames) of each real recording in ``data`` (``*.mha``, PLUS sequences)."""
    from daemon.acquire.metaimage import MetaImageSequence

    for path in sorted(data.glob("*.mha")):
        source = MetaImageSequence(path)
        try:
            yield path.name.split(".")[0], [f.image for f in source.frames()]
        finally:
            source.close()


def read_record(model: Path) -> dict[str, Any]:
    """What the ONNX file's metadata says (``echod.*``), JSON values decoded."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        if p.key.startswith("echod."):
            try:
                out[p.key[6:]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[6:]] = p.value
    return out


def write_record(
    model: Path, record: dict[str, Any], card: Callable[[dict[str, Any], int], str]
) -> None:
    """``record`` into the ONNX file's metadata, and the card beside it rewritten from it
    (``card(record, parameters)``)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    helper.set_model_props(
        proto, {f"echod.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
    )
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    tmp = model.with_suffix(".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(model)
    model.with_suffix(".toml").write_text(card(record, params))
    log.info("wrote %s and its card", model)


def task_main(
    argv: list[str] | None,
    doc: str | None,
    name: str,
    *,
    evaluate: Callable[[Path, int, range, Path], None],
    train: Callable[[argparse.Namespace], None],
    val_frames: int,
    live_val: range,
    batch: int,
    seed0: int,
) -> None:
    """The command line of a task model's training script (view, needle): ``evaluate
    MODEL`` (CPU, no torch) or training (``common.arguments`` and the task's own)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        p = argparse.ArgumentParser(prog=f"{name} evaluate")
        p.add_argument("model", type=Path)
        p.add_argument("--frames", type=int, default=val_frames)
        p.add_argument("--live", type=int, default=len(live_val), help="live phantom seeds")
        p.add_argument("--data", type=Path, default=REAL_DATA)
        a = p.parse_args(argv[1:])
        evaluate(a.model, a.frames, live_val[: a.live], a.data)
        return
    from daemon.models.train import common

    p = common.arguments(doc, epochs=1000, minutes=2.5)
    p.add_argument("--frames", type=int, default=10_000, help="training frames (default 10000)")
    p.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    p.add_argument(
        "--total", type=float, default=60.0, help="minutes for the whole run, rendering included"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument(
        "--init",
        type=Path,
        help="go on from an exported model's weights (BatchNorm folded and frozen)",
    )
    p.add_argument("--seed0", type=int, default=seed0, help="first training seed")
    train(p.parse_args(argv))
