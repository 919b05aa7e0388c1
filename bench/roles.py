"""Per-frame NN input / inference / output for each output role (issue 17) on this machine.

One small ONNX model per role, built here with onnx.helper (a shared backbone: two
3x3 stride-2 convolutions on a 256 x 256 grey input, then the role's head), runs through
:class:`daemon.engines.network.Network` on grey phantom frames of ``--size`` (the
synthetic source): NN input (resize, normalise, layout), inference, NN output (the role's
decoder, back to frame pixels), and ``record`` (packing the outputs into a result
record, as the infer stage writes the results ring). Sequence input: the "sequence" row
feeds the last 4 frames (each prepared once, the window a view).

    python bench/roles.py                    # ONNX Runtime, 300 frames per role
    python bench/roles.py --engine openvino --frames 100

Prints a table (median and p99 ms per frame); writes bench/results/roles-<engine>.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from _common import write_result
from onnx import TensorProto, helper, numpy_helper

from daemon import results
from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.engines.network import Network
from daemon.metrics import Percentiles

N = 256  # network input side
F = N // 4  # feature map side after the backbone


def _w(name: str, a: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _backbone(rng: np.random.Generator, sequence: int = 1) -> tuple[list[Any], list[Any], Any]:
    shape = [1, 1, N, N] if sequence == 1 else [1, sequence, 1, N, N]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
    nodes = []
    src = "image"
    if sequence > 1:  # the mean over time (a 3-D convolution), then one 2-D frame
        nodes += [
            helper.make_node("Transpose", ["image"], ["cdhw"], perm=[0, 2, 1, 3, 4]),
            helper.make_node("Conv", ["cdhw", "box"], ["t"]),
            helper.make_node("Squeeze", ["t", "axis2"], ["frame"]),
        ]
        src = "frame"
    nodes += [
        helper.make_node("Conv", [src, "k1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["feat"]),  # (1, 8, F, F)
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["pooled"], axis=1),  # (1, 8)
    ]
    weights = [
        _w("k1", rng.normal(0, 0.3, (8, 1, 3, 3))),
        _w("b1", np.zeros(8)),
        _w("k2", rng.normal(0, 0.3, (8, 8, 3, 3))),
        _w("b2", np.zeros(8)),
    ]
    if sequence > 1:
        weights.append(_w("box", np.full((1, 1, sequence, 1, 1), 1 / sequence)))
        weights.append(numpy_helper.from_array(np.array([2], np.int64), "axis2"))
    return nodes, weights, x


def _anchors(rng: np.random.Generator, classes: int = 3) -> np.ndarray:
    """(1, 4 + C, F * F) YOLOv8-style: a box per feature cell, a few dozen scoring high."""
    a = F * F
    out = np.zeros((1, 4 + classes, a), np.float32)
    cy, cx = (np.mgrid[0:F, 0:F].reshape(2, -1) + 0.5) * (N / F)
    out[0, 0], out[0, 1], out[0, 2:4] = cx, cy, 24.0
    out[0, 4:] = rng.uniform(-8, -3, (classes, a))  # logits: mostly nothing
    hot = rng.choice(a, 40, replace=False)
    out[0, 4 + rng.integers(0, classes, 40), hot] = rng.uniform(1, 4, 40)
    return out


def build(role: str, path: Path) -> Path:
    """The model for ``role`` (and its card) at ``path``."""
    rng = np.random.default_rng(1)
    seq = 4 if role == "sequence" else 1
    nodes, weights, x = _backbone(rng, seq)
    card = "[input.normalisation]\nscale = 0.00392156862745098\n"
    if seq > 1:
        card = f"[input]\nsequence = {seq}\n" + card
    head = "regression" if role == "sequence" else role
    # a fixed output that still depends on the input: + 0 x (the pooled features)
    zero = [
        helper.make_node("Mul", ["pooled", "zero8"], ["z"]),
        helper.make_node("ReduceMean", ["z"], ["z1"], axes=[1], keepdims=1),  # (1, 1)
    ]
    if head in ("segmentation", "confidence"):
        nodes += [
            helper.make_node("Conv", ["feat", "kh"], ["lo"]),
            helper.make_node("Resize", ["lo", "", "scales"], ["up"], mode="linear"),
            helper.make_node("Softmax", ["up"], ["y"], axis=1),
        ]
        weights += [
            _w("kh", rng.normal(0, 1, (3, 8, 1, 1))),
            _w("scales", [1, 1, N / F, N / F]),
        ]
        y = [1, 3, N, N]
    elif head == "classification" or head == "regression":
        c = 4 if head == "classification" else 2
        nodes += [helper.make_node("Gemm", ["pooled", "fc"], ["y"])]
        weights.append(_w("fc", rng.normal(0, 1, (8, c))))
        y = [1, c]
        card += f'[[outputs]]\ntensor = "y"\nrole = "{head}"\nactivation = "none"\n'
    elif head == "detection-boxes":
        boxes = np.concatenate(
            [rng.uniform(0, N - 40, (1, 100, 2)), rng.uniform(0, N, (1, 100, 2))], axis=2
        )
        boxes[..., 2:] = boxes[..., :2] + 30
        boxes = np.concatenate(
            [boxes, rng.uniform(0, 1, (1, 100, 1)), rng.integers(0, 3, (1, 100, 1))], axis=2
        )
        nodes += [*zero, helper.make_node("Add", ["const", "z1"], ["y"])]
        weights += [_w("const", boxes), _w("zero8", np.zeros(8))]
        y = [1, 100, 6]
        card += '[[outputs]]\ntensor = "y"\nrole = "detection"\nformat = "boxes"\n'
    elif head == "detection-anchor-free":
        nodes += [*zero, helper.make_node("Add", ["const", "z1"], ["y"])]
        weights += [_w("const", _anchors(rng)), _w("zero8", np.zeros(8))]
        y = [1, 7, F * F]
        card += (
            '[[outputs]]\ntensor = "y"\nrole = "detection"\nformat = "anchor-free"\n'
            'activation = "none"\n'
        )
    elif head == "keypoints-heatmaps":
        nodes += [
            helper.make_node("Conv", ["feat", "kh"], ["lo"]),
            helper.make_node("Sigmoid", ["lo"], ["y"]),
        ]
        weights.append(_w("kh", rng.normal(0, 1, (4, 8, 1, 1))))
        y = [1, 4, F, F]
        card += '[[outputs]]\ntensor = "y"\nrole = "keypoints"\nformat = "heatmaps"\n'
    elif head == "keypoints-coordinates":
        nodes += [
            helper.make_node("Gemm", ["pooled", "fc"], ["flat"]),
            helper.make_node("Reshape", ["flat", "kshape"], ["y"]),
        ]
        weights += [
            _w("fc", rng.uniform(0, 10, (8, 12))),
            numpy_helper.from_array(np.array([1, 4, 3], np.int64), "kshape"),
        ]
        y = [1, 4, 3]
        card += '[[outputs]]\ntensor = "y"\nrole = "keypoints"\nformat = "coordinates"\n'
    else:
        raise ValueError(role)
    if head == "confidence":
        card += '[[outputs]]\ntensor = "y"\nrole = "confidence"\n'
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, y)
    graph = helper.make_graph(nodes, role, [x], [out], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)
    path.with_suffix(".toml").write_text(card)
    return path


ROLES = (
    "segmentation",
    "confidence",
    "classification",
    "detection-boxes",
    "detection-anchor-free",
    "keypoints-heatmaps",
    "keypoints-coordinates",
    "regression",
    "sequence",
)


def measure(model: Path, engine: str, frames: list[np.ndarray]) -> dict[str, Any]:
    parts = {k: Percentiles() for k in ("nn_input", "nn_inference", "nn_output", "record")}
    buffer = np.zeros(results.capacity(frames[0].shape), np.uint8)
    with Network.open(model, engine=engine) as net:
        net.fit_frames(frames[0].shape)
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            x = net.prepare(frame)
            if net.sequence > 1:  # as the infer stage: each frame prepared once, kept
                net.keep(i, x)
                x = net.window(i)
            t1 = time.perf_counter()
            y = net.result(net.submit(x))
            t2 = time.perf_counter()
            outputs, _ = net.finish(y, frame.shape, x)
            t3 = time.perf_counter()
            results.pack_into(buffer, outputs)
            t4 = time.perf_counter()
            if i >= 10:  # warm-up
                for k, a, b in zip(parts, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                    parts[k].add((b - a) * 1e3)
        head = net.heads[0]
        shape = [d for d in head.spec.shape]
    return {"output": shape, **{k: p.summary(50, 99) for k, p in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="onnxruntime")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    h, w = args.size
    src = SyntheticSource(SyntheticSettings(height=h, width=w, loop_s=1.0))
    frames = [f.image for _, f in zip(range(args.frames), src.frames(), strict=False)]
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role in ROLES:
            rows[role] = measure(build(role, Path(tmp) / f"{role}.onnx"), args.engine, frames)
    print(f"{args.engine}, frames {h}x{w} grey, network {N}x{N}, ms per frame (p50 / p99)")
    print(f"{'role':24} {'output':18} {'NN input':>13} {'inference':>13} {'NN output':>13} "
          f"{'record':>13}")  # fmt: skip
    for role, r in rows.items():
        cells = " ".join(
            f"{r[k]['p50']:6.3f}/{r[k]['p99']:6.3f}"
            for k in ("nn_input", "nn_inference", "nn_output", "record")
        )
        print(f"{role:24} {tuple(r['output'])!s:18} {cells}")
    write_result(
        f"roles-{args.engine}",
        {"engine": args.engine, "frame": [h, w], "network": [N, N], "frames": args.frames,
         "roles": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()
