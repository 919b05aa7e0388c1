"""Train the needle-tip keypoint model -> ultrasound-needle.onnx + card.

An encoder-decoder CNN on 256x256 grey frames (/255) with a CenterNet keypoint head at
1/4 of the input (daemon/models/train/nets.py ``TipNet``): a heatmap of the tip and a
sub-cell offset. Exported with its decoding (``TipPoint``): output ``tip`` is (1, 1, 3),
the best cell's x, y normalised to the input's extent and its score; the card's
threshold hides points that score less (no needle tip in view).

Data: :func:`daemon.phantoms.us_tasks.needle_example` (half with one in-plane needle
whose tip is in view, half with no needle among look-alike bright lines: fasciae, bone,
a tank's bottom), plus live-phantom loops with the advancing needle (``Phantom(needle=
True)``); augmented on the GPU (flip, rotation, scale, shift, gain, gamma; the tip moves
with the frame). Loss: CenterNet's focal loss on a Gaussian heatmap (sigma 1 cell) and
L1 on the offsets around the tip. Two steps, the first on a GPU::

    python -m daemon.models.train.needle --out build/needle               # train
    python -m daemon.models.train.needle evaluate build/needle/ultrasound-needle.onnx

``evaluate`` (CPU, ONNX Runtime, frames prepared as echod prepares them) sets the
threshold from held-out simulator frames without a needle (never from real data),
measures the tip error (mm) on held-out frames and live-phantom loops, runs the model on
the real recordings in ../shared/data/us (no needle in them) and writes it all on the
card. ``--quick --out DIR`` is a CPU smoke run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.models import cards
from daemon.models.train import evaluation

log = logging.getLogger(__name__)

NAME = "ultrasound-needle"
SIZE = cards.NEEDLE_SIZE
TRAIN_SEED0 = 200_000  # training seeds: 200000 .. + frames - 1
LIVE_TRAIN = range(200, 260)  # live phantom seeds seen in training
VAL_SEED0, VAL_FRAMES = 650_000, 1000  # held out (evaluate)
LIVE_VAL = range(650, 658)  # live phantom seeds held out
LIVE_STEP = 3
THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)  # the smallest that keeps ...
MAX_FALSE_POINTS = 0.005  # ... at most this share of held-out frames without a tip with a point
SIGMA = 1.0  # heatmap Gaussian, cells
# tests use seeds from 1_000_000 up (tests/test_models.py)

Frame = tuple[np.ndarray, tuple[float, float] | None]  # image, tip (x, y) pixels


def _needle(seed: int) -> Frame:
    from daemon.phantoms.us_tasks import needle_example

    ex = needle_example(seed, SIZE)
    return ex.image, ex.truth.tip


def live_frames(seed: int, step: int = LIVE_STEP) -> list[tuple[np.ndarray, Any]]:
    """(frame, truth) of one live-phantom loop with the advancing needle (and the probe
    sweep in every other seed), every ``step``-th frame, at 256 x 256."""
    from daemon.phantoms.ultrasound import Phantom

    ph = Phantom((256, 256), seed=seed, needle=True, sweep=seed % 2 == 1)
    out = []
    for i in range(0, ph.loop_frames, step):
        image, _, truth = ph.frame_with_truth(i)
        out.append((image, truth))
    return out


def _live(seed: int) -> list[Frame]:
    return [(im, tr.tip) for im, tr in live_frames(seed)]  # the live source's size = SIZE


# -- training (torch) ----------------------------------------------------------------------


def train(a: argparse.Namespace) -> None:
    import torch

    from daemon.models.train import common
    from daemon.models.train.nets import STRIDE, TipNet, TipPoint

    started = time.perf_counter()
    dev = common.setup(a.seed)
    n = 64 if a.quick else a.frames
    frames: list[Frame] = common.render(_needle, range(a.seed0, a.seed0 + n), a.workers)
    live = LIVE_TRAIN[:2] if a.quick else LIVE_TRAIN
    for loop in common.render(_live, live, a.workers):
        frames += loop
    x = torch.from_numpy(np.stack([f[0] for f in frames])).to(dev)
    tips = torch.tensor(
        [f[1] if f[1] is not None else (float("nan"),) * 2 for f in frames],
        device=dev,
        dtype=torch.float32,
    )
    log.info(
        "%d frames, %.2f with a needle tip", len(x), float((~tips[:, 0].isnan()).float().mean())
    )
    net = TipNet().to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if a.init is not None:
        common.start_from(net, a.init)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    batch = 8 if a.quick else a.batch
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    cells = SIZE // STRIDE
    grid = torch.arange(cells, device=dev, dtype=torch.float32)

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch,), device=dev, generator=gen)
        xb, pts = common.augment(x[idx][:, None].float() / 255.0, tips[idx])
        assert pts is not None
        with common.autocast(dev):
            maps = net(xb.contiguous(memory_format=torch.channels_last)).float()
        loss = tip_loss(maps, pts, grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    record = common.fit_task(
        a,
        started,
        opt,
        step,
        len(x),
        batch,
        dev,
        script="needle",
        task="keypoints",
        data=(
            f"{len(x)} simulated frames: seeds {a.seed0}-{a.seed0 + n - 1} "
            f"(daemon/phantoms/us_tasks.py needle_example) and live-phantom needle loops of seeds "
            f"{live.start}-{live.stop - 1}; simulated only, no real image"
        ),
        val_seed0=VAL_SEED0,
        live_val=LIVE_VAL,
    )
    path = a.out / f"{NAME}.onnx"
    net.eval()
    params = common.export(
        TipPoint(net), torch.zeros(1, 1, SIZE, SIZE), path, record, output="tip", softmax=False
    )
    path.with_suffix(".toml").write_text(card(record, params))


def tip_loss(maps: Any, pts: Any, grid: Any) -> Any:
    """CenterNet's penalty-reduced focal loss on the heatmap (a Gaussian of ``SIGMA``
    cells at each tip; zeros for frames without) plus L1 on the offsets over the 3x3
    cells around each tip, per tip."""
    import torch

    from daemon.models.train.nets import STRIDE

    has = ~pts[:, 0].isnan()
    c = (torch.nan_to_num(pts) + 0.5) / STRIDE - 0.5  # tip in cell coordinates
    dx = c[:, 0, None, None] - grid[None, None, :]  # (N, 1, W)
    dy = c[:, 1, None, None] - grid[None, :, None]  # (N, H, 1)
    gauss = torch.exp(-(dx**2 + dy**2) / (2 * SIGMA**2)) * has[:, None, None]
    peak = (dx.abs() <= 0.5) & (dy.abs() <= 0.5) & has[:, None, None]
    target = torch.where(peak, torch.ones_like(gauss), gauss)
    p = maps[:, 0].sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = -((1 - p) ** 2) * torch.log(p) * peak
    neg = -((1 - target) ** 4) * p**2 * torch.log(1 - p) * ~peak
    n_pos = peak.sum().clamp(min=1)
    near = (dx.abs() <= 1.5) & (dy.abs() <= 1.5) & has[:, None, None]
    off = (maps[:, 1] - dx).abs() + (maps[:, 2] - dy).abs()
    return (pos.sum() + neg.sum()) / n_pos + (off * near).sum() / near.sum().clamp(min=1)


# -- evaluation (ONNX Runtime, CPU) ------------------------------------------------------------


def evaluate(model: Path, frames: int, live: range, data: Path) -> None:
    """The threshold (from held-out frames without a needle tip), held-out and
    live-phantom figures, and the real recordings; into the ONNX record and the card."""
    from daemon.phantoms.us_tasks import needle_example

    record = evaluation.read_record(model)
    with evaluation.Runner(model) as run:
        held = []
        for s in range(VAL_SEED0, VAL_SEED0 + frames):
            e = needle_example(s, SIZE)
            held.append((run(e.image), e.image.shape, e.truth.tip, e.truth.spacing))
        loops = []
        for seed in live:
            for im, tr in live_frames(seed):
                loops.append((run(im), im.shape, tr.tip, tr.spacing))
        neg = np.array([o[0, 0, 2] for o, _, tip, _ in held + loops if tip is None])
        threshold = next(
            (float(t) for t in THRESHOLDS if (neg >= t).mean() <= MAX_FALSE_POINTS), 0.95
        )
        record["threshold"] = threshold
        record["held_out"] = {"threshold": threshold, **scores(held, threshold)}
        record["live_phantom"] = {
            "seeds": f"{live.start}-{live.stop - 1}",
            **scores(loops, threshold),
        }
        real: dict[str, Any] = {}
        for name, images in evaluation.real_recordings(data):
            score = np.array([float(run(im)[0, 0, 2]) for im in images])
            real[name] = {
                "frames": len(images),
                "points_shown": round(float((score >= threshold).mean()), 4),
                "max_score": round(float(score.max()), 4),
            }
        record["real_data"] = real
    held_fig, live_fig = record["held_out"], record["live_phantom"]
    record["scores"] = {
        "tip_error_mm": held_fig["tip_error_mm_mean"],
        "tip_error_mm_live": live_fig["tip_error_mm_mean"],
        "detected": held_fig["detected"],
        "false_points": held_fig["false_points"],
    }
    record["evaluation"] = {
        "command": f"python -m daemon.models.train.needle evaluate {model.name} --frames {frames}",
        "held_out": f"{frames} simulated frames, seeds {VAL_SEED0}-{VAL_SEED0 + frames - 1}; "
        f"live phantom seeds {live.start}-{live.stop - 1}, every {LIVE_STEP}rd frame",
        "threshold": f"the smallest of 0.5, 0.55, ... 0.95 that shows a point on at most "
        f"{MAX_FALSE_POINTS:.1%} of the held-out frames without a needle tip (simulated "
        "and live phantom)",
        "real_data": f"{data} (measured only)",
    }
    log.info("held out %s; live %s; real %s", held_fig, live_fig, real)
    evaluation.write_record(model, record, card)


def scores(
    runs: list[tuple[np.ndarray, tuple[int, ...], Any, Any]], threshold: float
) -> dict[str, Any]:
    """Over (output, frame shape, true tip, spacing) per frame: the share of frames with a
    tip where a point is shown, its error (mm: mean, median, 90th percentile, share within
    2 mm), and the share of frames without a tip where one is shown."""
    errors, shown, false = [], [], []
    for out, shape, tip, spacing in runs:
        found = evaluation.point(out, shape, threshold)
        if tip is None:
            false.append(found is not None)
            continue
        shown.append(found is not None)
        if found is not None:
            errors.append(evaluation.tip_error_mm(found, tip, spacing))
    e = np.array(errors) if errors else np.array([np.nan])
    return {
        "frames_with_tip": len(shown),
        "frames_without": len(false),
        "detected": round(float(np.mean(shown)), 4),
        "tip_error_mm_mean": round(float(e.mean()), 3),
        "tip_error_mm_median": round(float(np.median(e)), 3),
        "tip_error_mm_p90": round(float(np.quantile(e, 0.9)), 3),
        "within_2mm": round(float((e <= 2.0).mean()), 4),
        "false_points": round(float(np.mean(false)), 4) if false else 0.0,
    }


def card(record: dict[str, Any], params: int) -> str:
    training = record.get("training", {})
    held = record.get("held_out", {})
    figures = (
        f"held-out tip error {held['tip_error_mm_mean']:.2f} mm (mean), found on "
        f"{held['detected']:.1%} of frames with a needle, a point on "
        f"{held['false_points']:.1%} of frames without"
        if held
        else "not evaluated yet"
    )
    provenance = (
        f"encoder-decoder CNN with a CenterNet keypoint head at {SIZE}x{SIZE} grey "
        f"({params:,} parameters), trained on the echod ultrasound simulator "
        f"({training.get('data', '?').split(':')[0]}, {training.get('steps', '?')} steps); "
        f"{figures}; synthetic data only, not for clinical use"
    )
    return cards.task_card(
        "needle",
        record,
        provenance,
        (cards.NEEDLE_USE, cards.TASK_DATA, cards.NEEDLE_LIMITS),
        cards.needle_fields(record.get("threshold", 0.5)),
    )


def main(argv: list[str] | None = None) -> None:
    evaluation.task_main(
        argv,
        __doc__,
        "needle",
        evaluate=evaluate,
        train=train,
        val_frames=VAL_FRAMES,
        live_val=LIVE_VAL,
        batch=64,
        seed0=TRAIN_SEED0,
    )


if __name__ == "__main__":
    main()
