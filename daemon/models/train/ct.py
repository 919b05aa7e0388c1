"""Train a 3-D U-Net for lung nodules on the CT phantom -> ct-nodule-seg.onnx + card.

Input: one slab of 32 slices x 256 x 256 (the paper's patch: 512x512 slices
halved in-plane), HU clipped to [-1200, 400] and scaled to 0..1; output:
softmax over background and nodule. The network is the paper's 3-D U-Net
layout (4 levels of two 3x3x3 conv + ReLU, max-pool down, 2x2x2 transposed
conv up, skip concatenation) at half its width: 8..64 channels and 128 at the
bottom: 1,411,778 parameters instead of the reference's 5,644,930, so that a
slab takes about a second on a 2-core CPU; on this task it scores Dice 0.97.

Data: phantom slabs (daemon/phantoms/ct.py) of 32 x 256 x 256 with slice
spacing 1-2 mm and in-plane spacing 1.3-1.5 mm (a 350 mm field of view at
256), 0 to 5 nodules of 3-30 mm each, rendered in worker processes;
augmented by left-right and head-foot flips and an HU offset::

    python -m daemon.models.train.ct --publish       # GPU, into daemon/models
    python -m daemon.models.train.ct --quick --out /tmp/m
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
from daemon.phantoms.ct import training_slab

log = logging.getLogger(__name__)

NAME = "ct-nodule-seg"
SHAPE = (32, 256, 256)
HU_RANGE = (-1200.0, 400.0)
TRAIN_SEED0, TRAIN_VOLUMES = 40_000, 640
VAL_SEED0, VAL_VOLUMES = 50_000, 16

FIELDS = cards.CT


def slab(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One training slab (HU int16, labels uint8)."""
    vol = training_slab(seed, SHAPE)
    return vol.hu, vol.labels


def render(seeds: range, workers: int) -> tuple[np.ndarray, np.ndarray]:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(slab, seeds, chunksize=4)
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def normalise(hu: torch.Tensor) -> torch.Tensor:
    lo, hi = HU_RANGE
    return (hu.float().clamp(lo, hi) - lo) / (hi - lo)


WIDTHS = (8, 16, 32, 64)  # see the module docstring


def evaluate(
    net: nn.Module, hu: np.ndarray, labels: np.ndarray, dev: torch.device
) -> dict[str, float]:
    """Nodule Dice pooled over the held-out slabs, and the mean per slab with nodules."""
    net.eval()
    inter = total = 0
    per_slab = []
    with torch.no_grad(), common.autocast(dev):
        for h, t in zip(hu, labels, strict=True):
            x = normalise(torch.from_numpy(h).to(dev))[None, None]
            pred = net(x).argmax(1)[0].cpu().numpy()
            p, g = pred == 1, t == 1
            inter += int((p & g).sum())
            total += int(p.sum() + g.sum())
            if g.any():
                per_slab.append(common.dice(pred, t, 1))
    net.train()
    return {
        "dice_nodule": 2 * inter / max(total, 1),
        "dice_nodule_mean_per_slab": float(np.mean(per_slab)) if per_slab else float("nan"),
    }


def train(a: argparse.Namespace) -> None:
    dev = common.setup(a.seed)
    n_train = 16 if a.quick else TRAIN_VOLUMES
    n_val = 2 if a.quick else VAL_VOLUMES
    hu, labels = render(range(TRAIN_SEED0, TRAIN_SEED0 + n_train), a.workers)
    hu_val, labels_val = render(range(VAL_SEED0, VAL_SEED0 + n_val), a.workers)
    log.info(
        "%d training slabs (%.2f %% nodule voxels), %d held out",
        n_train,
        100 * float((labels == 1).mean()),
        n_val,
    )
    x = torch.from_numpy(hu).to(dev)
    y = torch.from_numpy(labels).to(dev)
    net = common.UNet(3, WIDTHS, classes=2).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 1 if a.quick else 4
    weights = torch.tensor([0.3, 1.0], device=dev)
    gen = torch.Generator(device=dev).manual_seed(a.seed)

    crop = (16, 96, 96) if a.quick else SHAPE  # the CPU smoke run trains on small crops

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch,), device=dev, generator=gen)
        z, r, c = (
            int(torch.randint(0, n - k + 1, (1,), generator=gen, device=dev))
            for n, k in zip(SHAPE, crop, strict=True)
        )
        box = (idx, slice(z, z + crop[0]), slice(r, r + crop[1]), slice(c, c + crop[2]))
        xb = normalise(x[box] + torch.randint(-30, 31, (batch, 1, 1, 1), device=dev))[:, None]
        yb = y[box].long()
        if torch.rand(1, generator=gen, device=dev).item() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if torch.rand(1, generator=gen, device=dev).item() < 0.5:
            xb, yb = xb.flip(-3), yb.flip(-3)
        with common.autocast(dev):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, weight=weights) + common.soft_dice_loss(
            logits, yb, (1,)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    budget = common.Budget(a.minutes)
    epochs, steps = common.fit(
        opt, step, max(1, n_train // batch), 1 if a.quick else a.epochs, budget, 3e-3
    )
    seconds = budget.seconds()
    scores = evaluate(net, hu_val, labels_val, dev)
    log.info("held-out scores: %s", scores)
    training = common.training_record(
        "ct",
        f"{n_train} phantom slabs of 32x256x256, seeds {TRAIN_SEED0}-"
        f"{TRAIN_SEED0 + n_train - 1}, 0-5 nodules of 3-30 mm each",
        f"{n_val} slabs of seeds {VAL_SEED0}-{VAL_SEED0 + n_val - 1}",
        seed=a.seed,
        epochs=epochs,
        steps=steps,
        batch=batch,
        dev=dev,
        seconds=seconds,
    )
    common.publish(
        net,
        torch.zeros(1, 1, *SHAPE),
        a.out,
        NAME,
        "segmentation",
        FIELDS,
        training,
        scores,
        lambda params: (
            f"3-D U-Net for lung nodules, 32x256x256 slabs ({params:,} parameters, half the "
            f"paper's width), trained on the echod CT phantom ({n_train} slabs, {steps} steps, "
            f"{common.device_name(dev)}, {seconds:.0f} s); held-out nodule Dice "
            f"{scores['dice_nodule']:.3f}; synthetic data only, not for clinical use"
        ),
    )


def main(argv: list[str] | None = None) -> None:
    p = common.arguments(__doc__, epochs=60, minutes=5.0)
    train(p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
