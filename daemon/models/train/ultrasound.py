"""Train the FAST paper's 2-D U-Net on the B-mode phantom -> ultrasound-seg.onnx + card.

The network is the paper-size reference (daemon/engines/reference.py): 256x256
gray in, 4 levels of two 3x3 conv + ReLU (16..128 channels, 256 at the bottom),
max-pool down, 2x2 transposed conv up, skip concatenation, 1x1 conv to 3
classes (background, artery, vein), softmax; BatchNorm while training, folded
into the convolutions on export (1,940,851 parameters, as the reference).

Data: phantom frames (daemon/acquire/synthetic.py), two per anatomy seed at
random times, most rendered at 256x256 and some at 384 or 512 and resized to
256 as the Segmenter does; augmented on the fly (flip, rotation, scale,
shift, gain, gamma). The phantom needs OpenCV and pydantic, so where they are
missing (a training machine), ``prepare`` writes the frames to an .npz here
first::

    python -m daemon.models.train.ultrasound prepare build/traindata/us.npz
    python -m daemon.models.train.ultrasound --data build/traindata/us.npz   # GPU
    python -m daemon.models.train.ultrasound --quick --out /tmp/m            # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from daemon.models import cards
from daemon.models.train import common

log = logging.getLogger(__name__)

NAME = "ultrasound-seg"
SIZE = 256
TRAIN_SEED0, TRAIN_SEEDS = 10_000, 320  # two frames each at 256x256
BIG_SEED0, BIG_SEEDS = 20_000, 80  # one frame each at 384 or 512, resized
VAL_SEED0, VAL_SEEDS = 30_000, 20  # two frames each, held out
FRAMES_PER_SEED = 2

FIELDS = cards.ULTRASOUND


def render(seeds: range, size: int, per_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom frames (uint8) and labels at 256x256, ``per_seed`` random times per seed."""
    import cv2

    from daemon.phantoms.ultrasound import SyntheticSettings, SyntheticSource

    xs, ys = [], []
    for seed in seeds:
        src = SyntheticSource(SyntheticSettings(width=size, height=size, seed=seed), fps=30.0)
        times = np.random.default_rng([seed, 1]).integers(0, 900, per_seed)
        for t in times:
            frame, labels = src.frame_with_labels(int(t))
            image = frame.image
            if size != SIZE:
                image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
                labels = cv2.resize(labels, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
            xs.append(image)
            ys.append(labels)
    return np.stack(xs), np.stack(ys)


def dataset(quick: bool) -> dict[str, np.ndarray]:
    """Training and validation frames, rendered here (needs OpenCV and pydantic)."""
    scale = 20 if quick else 1
    x1, y1 = render(range(TRAIN_SEED0, TRAIN_SEED0 + TRAIN_SEEDS // scale), SIZE, FRAMES_PER_SEED)
    half = BIG_SEEDS // scale // 2
    x2, y2 = render(range(BIG_SEED0, BIG_SEED0 + half), 384, 1)
    x3, y3 = render(range(BIG_SEED0 + half, BIG_SEED0 + 2 * half), 512, 1)
    xv, yv = render(range(VAL_SEED0, VAL_SEED0 + VAL_SEEDS // (4 if quick else 1)), SIZE, 2)
    return {
        "x": np.concatenate([x1, x2, x3]),
        "y": np.concatenate([y1, y2, y3]),
        "x_val": xv,
        "y_val": yv,
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with LZMA members (about 30 % smaller than zlib on speckle); np.load reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as z:
        for key, a in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a)


WIDTHS = (16, 32, 64, 128)  # see the module docstring


def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation (+-12 deg), scale (0.85-1.15), shift (+-10 %), gain, gamma."""
    n, dev = x.shape[0], x.device
    ang = (torch.rand(n, device=dev) - 0.5) * (2 * math.radians(12))
    scale = 0.85 + 0.3 * torch.rand(n, device=dev)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, device=dev) - 0.5) * 0.2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = F.grid_sample(
        y[:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=False
    )[:, 0].long()
    gain = 0.8 + 0.45 * torch.rand(n, 1, 1, 1, device=dev)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, device=dev) - 0.5) * 0.6)
    x = (x.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    return x, y


def evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray, dev: torch.device) -> dict[str, float]:
    """Mean per-frame Dice of artery and vein (argmax) on held-out frames."""
    net.eval()
    preds = []
    with torch.no_grad(), common.autocast(dev):
        for i in range(0, len(x), 32):
            batch = torch.from_numpy(x[i : i + 32]).to(dev)[:, None].float() / 255.0
            preds.append(net(batch).argmax(1).cpu().numpy())
    pred = np.concatenate(preds)
    net.train()
    return {
        f"dice_{name}": float(
            np.mean([common.dice(p, t, label) for p, t in zip(pred, y, strict=True)])
        )
        for label, name in ((1, "artery"), (2, "vein"))
    }


def train(a: argparse.Namespace) -> None:
    dev = common.setup(a.seed)
    data = dict(np.load(a.data)) if a.data else dataset(a.quick)
    x_all, y_all = data["x"], data["y"]
    log.info("%d training frames, %d held out", len(x_all), len(data["x_val"]))
    x = torch.from_numpy(x_all).to(dev)
    y = torch.from_numpy(y_all).to(dev)
    net = common.UNet(2, WIDTHS, classes=3).to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 8 if a.quick else 32
    weights = torch.tensor([0.5, 1.0, 1.0], device=dev)
    gen = torch.Generator(device=dev).manual_seed(a.seed)

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch,), device=dev, generator=gen)
        xb, yb = augment(x[idx][:, None].float() / 255.0, y[idx].long())
        with common.autocast(dev):
            logits = net(xb.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), yb, weight=weights) + common.soft_dice_loss(
            logits, yb, (1, 2)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    budget = common.Budget(a.minutes)
    epochs, steps = common.fit(
        opt, step, max(1, len(x) // batch), 1 if a.quick else a.epochs, budget, 2e-3
    )
    seconds = budget.seconds()
    scores = evaluate(net, data["x_val"], data["y_val"], dev)
    log.info("held-out scores: %s", scores)
    training = common.training_record(
        "ultrasound",
        f"{len(x_all)} phantom frames from seeds {TRAIN_SEED0}+ (2 each, 256x256) and "
        f"{BIG_SEED0}+ (1 each, 384 or 512 resized to 256)",
        f"{len(data['x_val'])} frames (2 per seed) of seeds {VAL_SEED0}+",
        seed=a.seed,
        epochs=epochs,
        steps=steps,
        batch=batch,
        dev=dev,
        seconds=seconds,
    )
    common.publish(
        net,
        torch.zeros(1, 1, SIZE, SIZE),
        a.out,
        NAME,
        "segmentation",
        FIELDS,
        training,
        scores,
        lambda params: (
            f"FAST paper 2-D U-Net ({params:,} parameters) trained on the echod B-mode phantom "
            f"({len(x_all)} frames, {steps} steps, {common.device_name(dev)}, "
            f"{seconds:.0f} s); held-out Dice artery {scores['dice_artery']:.3f}, "
            f"vein {scores['dice_vein']:.3f}; synthetic data only, not for clinical use"
        ),
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        logging.basicConfig(level=logging.INFO)
        out = Path(argv[1] if len(argv) > 1 else "build/traindata/us.npz")
        arrays = dataset(quick=False)
        save_npz(out, arrays)
        log.info(
            "wrote %s (%.1f MB): %s",
            out,
            out.stat().st_size / 1e6,
            {k: v.shape for k, v in arrays.items()},
        )
        return
    p = common.arguments(__doc__, epochs=80, minutes=4.0)
    p.add_argument("--data", type=Path, help="frames from `prepare` (default: render them here)")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
