"""Train a 512x512 H&E patch classifier on the tissue phantom -> wsi-patch-cls.onnx + card.

Four classes (normal, benign, in-situ, invasive), RGB at 20x (0.5 um/px). A
small CNN, not the paper's Inception v3 (the reference network of that size
is generated on demand for benchmarks): a stride-2 stem, five 3x3
conv + BatchNorm + ReLU stages with max-pooling (24..128 channels), global
average pooling, then the paper's head: a 64-unit fully connected layer,
dropout and 4 outputs with softmax; about 0.4 M parameters.

Data: patches of each class (daemon/phantoms/wsi.py, each seed another place
and another stain), rendered in worker processes; augmented by flips, 90-degree
turns and brightness/colour jitter::

    python -m daemon.models.train.wsi --publish       # GPU, into daemon/models
    python -m daemon.models.train.wsi --quick --out /tmp/m
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from daemon.models import cards
from daemon.models.train import common
from daemon.phantoms.wsi import CLASSES, tissue_patch

log = logging.getLogger(__name__)

NAME = "wsi-patch-cls"
SIZE = 512
TRAIN_SEED0, TRAIN_PER_CLASS = 60_000, 1200
VAL_SEED0, VAL_PER_CLASS = 70_000, 100
MEAN, STD = cards.WSI_MEAN, cards.WSI_STD

FIELDS = cards.WSI


def _patch(job: tuple[int, int]) -> np.ndarray:
    return tissue_patch(job[0], job[1], SIZE)


def render(seed0: int, per_class: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` patches of each class (uint8 NHWC) and their class indices."""
    jobs = [(c, seed0 + c * per_class + i) for c in range(len(CLASSES)) for i in range(per_class)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        patches = pool.map(_patch, jobs, chunksize=8)
    return np.stack(patches), np.array([c for c, _ in jobs], np.int64)


def stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class PatchNet(nn.Module):
    """The classifier of the module docstring; returns logits."""

    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
            stage(24, 32),
            stage(32, 64),
            stage(64, 96),
            stage(96, 128),
            nn.Conv2d(128, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Linear(128, 64), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x).mean((2, 3)))
        return out


def to_input(patches: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, as the card says."""
    return (patches.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips, a 90-degree turn, brightness and per-channel gain (normalised input)."""
    n, dev = x.shape[0], x.device
    if torch.rand(1, generator=gen, device=dev).item() < 0.5:
        x = x.flip(-1)
    if torch.rand(1, generator=gen, device=dev).item() < 0.5:
        x = x.flip(-2)
    if torch.rand(1, generator=gen, device=dev).item() < 0.5:
        x = x.transpose(-1, -2)
    v = x * STD + MEAN
    bright = 1 + 0.16 * (torch.rand(n, 1, 1, 1, generator=gen, device=dev) - 0.5)
    colour = 1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=gen, device=dev) - 0.5)
    return ((v * bright * colour).clamp(0, 1) - MEAN) / STD


def evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray, dev: torch.device) -> dict[str, float]:
    """Accuracy over all held-out patches, and per class."""
    net.eval()
    preds = []
    with torch.no_grad(), common.autocast(dev):
        for i in range(0, len(x), 32):
            preds.append(net(to_input(torch.from_numpy(x[i : i + 32]).to(dev))).argmax(1).cpu())
    pred = torch.cat(preds).numpy()
    net.train()
    scores = {"accuracy": float((pred == y).mean())}
    for c, name in enumerate(CLASSES):
        scores[f"accuracy_{name}"] = float((pred[y == c] == c).mean())
    return scores


def train(a: argparse.Namespace) -> None:
    dev = common.setup(a.seed)
    per_class = 8 if a.quick else TRAIN_PER_CLASS
    val_per_class = 4 if a.quick else VAL_PER_CLASS
    x_np, y_np = render(TRAIN_SEED0, per_class, a.workers)
    xv, yv = render(VAL_SEED0, val_per_class, a.workers)
    log.info("%d training patches, %d held out", len(x_np), len(xv))
    x = torch.from_numpy(x_np).to(dev)
    y = torch.from_numpy(y_np).to(dev)
    net = PatchNet().to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 8 if a.quick else 64
    gen = torch.Generator(device=dev).manual_seed(a.seed)

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch,), device=dev, generator=gen)
        xb = augment(to_input(x[idx]), gen).contiguous(memory_format=torch.channels_last)
        with common.autocast(dev):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    budget = common.Budget(a.minutes)
    epochs, steps = common.fit(
        opt, step, max(1, len(x) // batch), 1 if a.quick else a.epochs, budget, 2e-3
    )
    seconds = budget.seconds()
    scores = evaluate(net, xv, yv, dev)
    log.info("held-out scores: %s", scores)
    training = common.training_record(
        "wsi",
        f"{len(x_np)} phantom patches ({per_class} per class), seeds {TRAIN_SEED0}+",
        f"{len(xv)} patches ({val_per_class} per class), seeds {VAL_SEED0}+",
        seed=a.seed,
        epochs=epochs,
        steps=steps,
        batch=batch,
        dev=dev,
        seconds=seconds,
    )
    common.publish(
        net,
        torch.zeros(1, 3, SIZE, SIZE),
        a.out,
        NAME,
        "classification",
        FIELDS,
        training,
        scores,
        lambda params: (
            f"small CNN + FC64 + dropout, 4 classes at 512x512 ({params:,} parameters), trained "
            f"on the echod H&E phantom ({len(x_np)} patches, {steps} steps, "
            f"{common.device_name(dev)}, {seconds:.0f} s); held-out patch accuracy "
            f"{scores['accuracy']:.3f}; synthetic data only, not for clinical use"
        ),
    )


def main(argv: list[str] | None = None) -> None:
    p = common.arguments(__doc__, epochs=20, minutes=4.0)
    train(p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
