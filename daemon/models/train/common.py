"""What the training scripts share: devices, budgets, losses, augmentation, ONNX export.

Needs numpy, torch and onnx only (``pip install -e .[train]``); never imported by
the daemon.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

OPSET = 17  # ONNX Runtime and OpenVINO both read it
PACKAGE = Path(__file__).resolve().parent.parent  # daemon/models: only with --publish


def arguments(doc: str | None, epochs: int, minutes: float) -> argparse.ArgumentParser:
    """The options every script takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the .onnx and its card")
    where.add_argument(
        "--publish",
        dest="out",
        action="store_const",
        const=PACKAGE,
        help=f"write them into the package ({PACKAGE}), replacing the bundled model",
    )
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    p.add_argument(
        "--minutes",
        type=float,
        default=minutes,
        help=f"stop training after this long, whatever the epoch (default {minutes})",
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes that render phantom data",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a CPU smoke run: little data, one epoch (the scores mean little)",
    )
    return p


def setup(seed: int) -> torch.device:
    """Seeded torch on the best device here; logging to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info("training on %s", hardware(dev))
    return dev


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"


def hardware(dev: torch.device) -> str:
    cpu = f"{os.cpu_count()} CPU cores"
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, {cpu}, torch {torch.__version__}"
    return f"CPU only ({platform.machine()}, {cpu}), torch {torch.__version__}"


def autocast(dev: torch.device) -> torch.autocast:
    """bf16 mixed precision on a GPU; a no-op context on the CPU."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


class Budget:
    """Wall-clock budget for a training loop."""

    def __init__(self, minutes: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + 60.0 * minutes

    def over(self) -> bool:
        return time.perf_counter() > self.deadline

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int]
) -> torch.Tensor:
    """1 - mean soft Dice over ``classes`` (foreground), pooled over the batch."""
    prob = logits.float().softmax(1)
    losses = []
    for c in classes:
        p, t = prob[:, c], (target == c).float()
        losses.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    return torch.stack(losses).mean()


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice of ``label`` between two label maps (1.0 when neither has it)."""
    p, t = pred == label, truth == label
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def conv_block(dims: int, cin: int, cout: int) -> nn.Sequential:
    """Two 3x3(x3) convolutions, each with batch norm and ReLU."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net of ``dims`` (2 or 3) spatial dimensions: conv blocks, max-pool down,
    transposed-convolution up, skip connections by concatenation; returns logits."""

    def __init__(self, dims: int, widths: tuple[int, ...], classes: int, channels: int = 1) -> None:
        super().__init__()
        self.pool = F.max_pool2d if dims == 2 else F.max_pool3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.down = nn.ModuleList()
        cin = channels
        for c in widths:
            self.down.append(conv_block(dims, cin, c))
            cin = c
        self.bottom = conv_block(dims, cin, 2 * cin)
        cin *= 2
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for c in reversed(widths):
            self.ups.append(up(cin, c, 2, stride=2))
            self.up_blocks.append(conv_block(dims, 2 * c, c))
            cin = c
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for b in self.down:
            x = b(x)
            skips.append(x)
            x = self.pool(x, 2)
        x = self.bottom(x)
        for up, b, skip in zip(self.ups, self.up_blocks, reversed(skips), strict=True):
            x = b(torch.cat([up(x), skip], 1))
        out: torch.Tensor = self.head(x)
        return out


class Softmax(nn.Module):
    """The network as exported: class probabilities over axis 1."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x).softmax(1)
        return out


def export(
    net: nn.Module,
    example: torch.Tensor,
    path: Path,
    props: dict[str, Any],
    output: str = "probabilities",
    softmax: bool = True,
) -> int:
    """ONNX (opset 17, dynamic batch, BatchNorm folded) at ``path`` with ``props`` as
    metadata (``echod.*`` keys, JSON values); returns the parameter count in the file.
    The input is ``image``, the output ``output``: ``net``'s, after a softmax over axis 1
    unless ``softmax`` is False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = (Softmax(net) if softmax else net).cpu().float().eval()
    torch.onnx.export(
        model,
        (example.cpu().float(),),
        str(path),
        input_names=["image"],
        output_names=[output],
        dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    helper.set_model_props(
        proto, {f"echod.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    log.info("exported %s: %d parameters, %.1f MB", path, params, path.stat().st_size / 1e6)
    return params


def card(fields: str, provenance: str, training: dict[str, Any], scores: dict[str, float]) -> str:
    """Model card text: the training record as comments, then ``fields`` (TOML)."""
    lines = ["# Model card (daemon/engines/card.py), written by daemon/models/train/."]
    lines += [f"# {k}: {v}" for k, v in training.items()]
    lines += [f"# held-out {k}: {v:.4f}" for k, v in scores.items()]
    lines.append(f"provenance = {json.dumps(provenance)}")
    return "\n".join(lines) + "\n" + fields


def fit(
    opt: torch.optim.Optimizer,
    step: Any,
    steps_per_epoch: int,
    epochs: int,
    budget: Budget,
    lr: float,
) -> tuple[int, int]:
    """Run ``step(i) -> loss`` for ``epochs`` or until the budget is spent, with a
    warm-up then cosine learning rate over whichever ends first; returns
    (epochs, steps) done."""
    total = max(1, epochs * steps_per_epoch)
    done = 0
    for epoch in range(epochs):
        losses = []
        for _ in range(steps_per_epoch):
            progress = max(done / total, budget.seconds() / (budget.deadline - budget.start))
            warm = min(1.0, (done + 1) / max(1, total // 30))
            for group in opt.param_groups:
                group["lr"] = lr * warm * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))
            losses.append(float(step(done)))
            done += 1
            if budget.over():
                break
        log.info("epoch %d: loss %.4f (%.0f s)", epoch + 1, np.mean(losses), budget.seconds())
        if budget.over():
            log.info("time budget spent after %d steps", done)
            return epoch + 1, done
    return epochs, done


def publish(
    net: nn.Module,
    example: torch.Tensor,
    out: Path,
    name: str,
    task: str,
    fields: str,
    training: dict[str, Any],
    scores: dict[str, float],
    provenance: Callable[[int], str],
) -> None:
    """Export ``net`` to ``out/name.onnx`` with its training record, and write its card
    (``provenance`` gets the exported parameter count)."""
    record = {"task": task, "weights": "trained", "scores": scores, "training": training}
    params = export(net, example, out / f"{name}.onnx", record)
    (out / f"{name}.toml").write_text(card(fields, provenance(params), training, scores))


def training_record(
    script: str,
    data: str,
    held_out: str,
    *,
    seed: int,
    epochs: int,
    steps: int,
    batch: int,
    dev: torch.device,
    seconds: float,
) -> dict[str, Any]:
    """What the card and the ONNX metadata say about a training run."""
    return {
        "script": f"python -m daemon.models.train.{script}",
        "data": data,
        "held_out": held_out,
        "seed": seed,
        "epochs": epochs,
        "steps": steps,
        "batch": batch,
        "hardware": hardware(dev),
        "training_seconds": round(seconds, 1),
    }


def fit_task(
    a: argparse.Namespace,
    started: float,
    opt: torch.optim.Optimizer,
    step: Callable[[int], torch.Tensor],
    items: int,
    batch: int,
    dev: torch.device,
    *,
    script: str,
    task: str,
    data: str,
    val_seed0: int,
    live_val: range,
) -> dict[str, Any]:
    """A task model's training (view, needle: :func:`evaluation.task_main`'s options in
    ``a``) within what is left of ``a.total`` minutes since ``started`` (at most
    ``a.minutes``), and the record of it for the ONNX metadata and the card (``data``:
    what it was trained on; held out: simulator seeds from ``val_seed0`` and the live
    seeds ``live_val``)."""
    minutes = min(a.minutes, a.total - (time.perf_counter() - started) / 60 - 0.5)
    budget = Budget(max(minutes, 0.05))
    epochs, steps = fit(opt, step, max(1, items // batch), 1 if a.quick else a.epochs, budget, a.lr)
    held_out = f"seeds {val_seed0}+ and live seeds {live_val.start}-{live_val.stop - 1} (evaluate)"
    training = training_record(
        script,
        data,
        held_out,
        seed=a.seed,
        epochs=epochs,
        steps=steps,
        batch=batch,
        dev=dev,
        seconds=budget.seconds(),
    )
    training["command"] = (f"{training['script']} " + " ".join(sys.argv[1:])).strip()
    if a.init is not None:
        training["started_from"] = provenance_of(a.init)
    return {"task": task, "weights": "trained", "scores": {}, "training": training}


def render(fn: Callable[[int], Any], seeds: Sequence[int], workers: int) -> list[Any]:
    """``fn(seed)`` for every seed, in ``workers`` processes (spawned: the phantoms are
    numpy and OpenCV, which fork badly under a GPU process)."""
    import multiprocessing

    t0 = time.perf_counter()
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            out = pool.map(fn, seeds, chunksize=16)
    else:
        out = [fn(s) for s in seeds]
    log.info(
        "rendered %d frames in %.1f s (%d workers)", len(out), time.perf_counter() - t0, workers
    )
    return out


def augment(
    x: torch.Tensor, points: torch.Tensor | None = None, degrees: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random horizontal flip, rotation (+-``degrees``), scale (0.85-1.15) and shift (+-8 %)
    with black beyond the frame, gain and gamma, of images ``x`` (N, 1, H, W) in 0..1;
    ``points`` (N, 2) x, y in pixels (NaN: none) move with them, NaN once outside."""
    n, dev = x.shape[0], x.device
    h, w = x.shape[2:]
    ang = (torch.rand(n, device=dev) - 0.5) * (2 * np.radians(degrees))
    scale = 0.85 + 0.3 * torch.rand(n, device=dev)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, device=dev) - 0.5) * 0.16
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    m = torch.stack([torch.stack([cos * flip, -sin], 1), torch.stack([sin * flip, cos], 1)], 1)
    theta = torch.cat([m, shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, device=dev)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, device=dev) - 0.5) * 0.5)
    x = (x.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    if points is None:
        return x, None
    size = torch.tensor([w, h], device=dev, dtype=x.dtype)
    unit = (2 * points + 1) / size - 1  # grid coordinates of the input
    moved = torch.linalg.solve(m, (unit - shift)[:, :, None])[:, :, 0]
    out = ((moved + 1) * size - 1) / 2
    inside = ((out >= 0) & (out <= size - 1)).all(1, keepdim=True)
    return x, torch.where(inside, out, torch.full_like(out, float("nan")))


def start_from(net: nn.Module, path: Path) -> None:
    """Load an exported model's weights (:func:`export` folded each BatchNorm into the
    convolution before it) into ``net``: the file's Conv and Gemm weights in order into
    ``net``'s Conv2d and Linear layers, each folded bias into the layer's bias or, where
    a BatchNorm follows a bias-free convolution, into that BatchNorm, set to the
    identity and frozen (eval mode, no statistics kept): ``net`` computes what the file
    does, and training goes on from there."""
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    modules = list(net.modules())
    layers = [(i, m) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d | nn.Linear)]
    if len(nodes) != len(layers):
        raise SystemExit(f"{path}: {len(nodes)} Conv/Gemm layers, the network has {len(layers)}")
    with torch.no_grad():
        for node, (i, layer) in zip(nodes, layers, strict=True):
            w = weights[node.input[1]]
            trans = next((a.i for a in node.attribute if a.name == "transB"), 1)
            if node.op_type == "Gemm" and not trans:
                w = w.T
            layer.weight.copy_(torch.from_numpy(np.array(w)))
            b = torch.from_numpy(np.array(weights[node.input[2]]))
            if layer.bias is not None:
                layer.bias.copy_(b)
                continue
            norm = next(m for m in modules[i + 1 :] if isinstance(m, nn.BatchNorm2d))
            norm.weight.fill_(1.0)
            norm.bias.copy_(b)
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
    freeze_norms(net)
    log.info("started from %s (%d layers)", path, len(layers))


def freeze_norms(net: nn.Module) -> None:
    """Every BatchNorm normalises with its running statistics and keeps them."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def provenance_of(model: Path) -> str:
    """One line on how an exported model was trained (its ``echod.training`` record)."""
    proto = onnx.load(str(model), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    t = json.loads(props.get("echod.training", "{}"))
    return (
        f"{model.name}: {t.get('steps', '?')} steps of {t.get('batch', '?')} in "
        f"{t.get('training_seconds', '?')} s on {t.get('hardware', '?')} "
        f"({t.get('data', '?').split(':')[0]}; {t.get('command', '?')})"
    )
