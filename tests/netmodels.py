"""Small real ONNX models for the live-network tests and benchmarks (issue 17), built with
onnx.helper and numpy weights (no torch), each with its model card when it needs one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IMAGENET = """
[input.normalisation]
scale = 0.00392156862745098
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
"""


def save(graph: onnx.GraphProto, path: Path, card: str | None = None, opset: int = 13) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, path)
    if card is not None:
        path.with_suffix(".toml").write_text(card)
    return path


def _w(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def classifier(path: Path, card: str | None = None) -> Path:
    """A 4-class ImageNet-style classifier, channel-last input (N, 240, 240, 3):
    conv 3x3/2 + ReLU, global average pool, fully connected, softmax -> "probs" (N, 4)."""
    rng = np.random.default_rng(17)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 240, 240, 3])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])
    weights = [
        _w("k", rng.normal(0, 0.5, (8, 3, 3, 3))),
        _w("kb", rng.normal(0, 0.1, 8)),
        _w("fc", rng.normal(0, 2.0, (8, 4))),
        _w("fcb", np.array([-2.0, 1.0, 1.5, 0.5])),
    ]
    nodes = [
        helper.make_node("Transpose", ["image"], ["chw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["chw", "k", "kb"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(nodes, "classifier", [x], [y], weights)
    default = f'task = "classification"\n{IMAGENET}'
    return save(graph, path, default if card is None else card)


def segmenter(path: Path, card: str | None = None) -> Path:
    """Two classes, dynamic height and width, 3 input channels (1, 3, H, W): conv 3x3 +
    ReLU, conv 1x1, softmax -> "seg" (1, 2, H, W)."""
    rng = np.random.default_rng(18)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])
    y = helper.make_tensor_value_info("seg", TensorProto.FLOAT, [1, 2, "H", "W"])
    k = rng.normal(0, 0.05, (4, 3, 3, 3))
    k[0] += 1 / 27  # the local mean, and its negative: class 1 where brighter than average
    k[1] -= 1 / 27
    k2 = rng.normal(0, 0.1, (2, 4, 1, 1))
    k2[1, :2, 0, 0] += (4.0, -4.0)
    weights = [_w("k", k), _w("kb", np.zeros(4)), _w("k2", k2), _w("k2b", np.zeros(2))]
    nodes = [
        helper.make_node("Conv", ["image", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "k2", "k2b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["seg"], axis=1),
    ]
    graph = helper.make_graph(nodes, "segmenter", [x], [y], weights)
    return save(graph, path, IMAGENET if card is None else card)


SEQUENCE_CARD = """
[input]
sequence = {s}
[input.normalisation]
scale = 1.0

[[outputs]]
tensor = "frames"
role = "regression"

[[outputs]]
tensor = "mean"
role = "regression"
names = ["mean"]
units = ["frame index"]
"""


def sequence(path: Path, s: int = 4, size: int = 32, channels_last: bool = False) -> Path:
    """A sequence model fed the last ``s`` frames, (1, S, 1, H, W) (or (1, S, H, W, 1)):
    "frames" (1, S) is each frame's mean, "mean" (1, 1) the mean of all of them through
    a 3-D convolution (a box filter over time)."""
    dims = [1, s, size, size, 1] if channels_last else [1, s, 1, size, size]
    x = helper.make_tensor_value_info("clip", TensorProto.FLOAT, dims)
    frames = helper.make_tensor_value_info("frames", TensorProto.FLOAT, [1, s])
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 1])
    perm = [0, 4, 1, 2, 3] if channels_last else [0, 2, 1, 3, 4]  # -> (1, C, S, H, W)
    nodes = [
        helper.make_node("ReduceMean", ["clip"], ["frames"], axes=[2, 3, 4], keepdims=0),
        helper.make_node("Transpose", ["clip"], ["cdhw"], perm=perm),
        helper.make_node("Conv", ["cdhw", "box"], ["t"]),  # (1, 1, 1, H, W)
        helper.make_node("ReduceMean", ["t"], ["m"], axes=[2, 3, 4], keepdims=1),
        helper.make_node("Flatten", ["m"], ["mean"], axis=1),
    ]
    box = _w("box", np.full((1, 1, s, 1, 1), 1.0 / s))
    graph = helper.make_graph(nodes, "sequence", [x], [frames, mean], [box])
    return save(graph, path, SEQUENCE_CARD.format(s=s))


def multitask(path: Path, card: str, size: int = 64) -> Path:
    """(1, 1, size, size) in; outputs: "seg" (1, 2, h, w) softmax map (class 1 above
    0.5), "view" (1, 3) logits (2, 0, -2) x the input's mean, "boxes" (1, 5, 6) fixed,
    "tip" (1, 1, h/4, w/4) a Gaussian heatmap peaking at (5.3, 9.6), "depth" (1, 1) the
    input's mean: so the tests know what to expect."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, size, size])
    outs = {
        "seg": [1, 2, size, size],
        "view": [1, 3],
        "boxes": [1, 5, 6],
        "tip": [1, 1, size // 4, size // 4],
        "depth": [1, 1],
    }
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outs.items()]
    boxes = np.array(
        [
            [8, 8, 24, 24, 0.9, 1],
            [10, 10, 26, 26, 0.8, 1],
            [40, 40, 60, 56, 0.3, 0],
            [0, 0, 64, 64, 0.6, 2],
            [1, 1, 2, 2, 0.1, 0],
        ]
    ).reshape(1, 5, 6)
    yy, xx = np.mgrid[0 : size // 4, 0 : size // 4] + 0.5  # cell centres
    heat = np.exp(-((xx - 5.3) ** 2 + (yy - 9.6) ** 2) / (2 * 1.5**2)).reshape(
        1, 1, size // 4, size // 4
    )
    weights = [
        _w("k", np.array([-10.0, 10.0]).reshape(2, 1, 1, 1)),  # class 1: brighter than 0.5
        _w("kb", np.array([5.0, -5.0])),
        _w("vw", np.array([[2.0, 0.0, -2.0]])),
        _w("boxes_c", boxes),
        _w("heat", heat),
        _w("zero", np.zeros(1)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "k", "kb"], ["l"]),
        helper.make_node("Softmax", ["l"], ["seg"], axis=1),
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["m"], ["m2"], axis=1),  # (1, 1)
        helper.make_node("MatMul", ["m2", "vw"], ["view"]),
        helper.make_node("Mul", ["m2", "zero"], ["z"]),
        helper.make_node("Add", ["boxes_c", "z"], ["boxes"]),
        helper.make_node("Add", ["heat", "z"], ["tip"]),
        helper.make_node("Identity", ["m2"], ["depth"]),
    ]
    graph = helper.make_graph(nodes, "multitask", [x], ys, weights)
    return save(graph, path, card)
