"""Train the FAST paper's 2-D U-Net on the ultrasound simulator -> ultrasound-seg.onnx + card.

The network is the paper-size reference (daemon/engines/reference.py): 256x256
gray in, 4 levels of two 3x3 conv + ReLU (16..128 channels, 256 at the bottom),
max-pool down, 2x2 transposed conv up, skip concatenation, 1x1 conv to 3
classes (background, artery, vein), softmax; BatchNorm while training, folded
into the convolutions on export (1,940,851 parameters, as the reference).

Data: simulated frames (daemon/phantoms/ultrasound.py ``example(seed)``, seeds
0..frames-1), rendered in worker processes at the start: neck and abdomen scenes
with zero, one or two vessels, water, fluid, air, blank and dark frames, linear
and curvilinear probes, display sizes resized to 256x256 as the Segmenter does;
augmented on the GPU (horizontal flip, rotation, scale, shift, gain, gamma).
Loss: weighted cross-entropy + soft Dice. Three steps, the first on a GPU::

    python -m daemon.models.train.ultrasound --out build/us            # train (GPU)
    python -m daemon.models.train.ultrasound calibrate build/us/ultrasound-seg.onnx
    python -m daemon.models.train.ultrasound measure build/us/ultrasound-seg.onnx

``calibrate`` (CPU, ONNX Runtime) scores the exported model on held-out simulator
seeds and sets the uncertainty guard's thresholds from them (never from real data);
``measure`` runs it on the real recordings in ../shared/data/us (no vessels in them)
and writes the fraction of pixels it labels, alone and behind the guard, on the card.
Both rewrite the card beside the model. ``--quick --out DIR`` is a CPU smoke run.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.models.train import evaluation

log = logging.getLogger(__name__)

NAME = "ultrasound-seg"
TRAIN_SEED0 = 0  # training seeds: 0 .. frames - 1
VAL_SEED0, VAL_FRAMES = 500_000, 600  # held out: scores and the guard's thresholds
# tests use seeds from 1_000_000 up (tests/test_models.py)
DOMAIN_KINDS = ("neck", "abdomen", "fluid")  # what the guard's domain ranges are taken from
GUARD_QUANTILE = 0.005  # domain ranges: these quantiles of held-out frames, then widened
GUARD_WIDEN = 0.1  # ... by this fraction of the range on each side
CONFIDENCE_QUANTILE = 0.02  # min_confidence: this quantile on held-out frames segmented well


def _example(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from daemon.phantoms.ultrasound import example

    ex = example(seed)
    return ex.image, ex.labels


def render(seed0: int, n: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (uint8, n x 256 x 256) and labels of seeds seed0 .. seed0 + n - 1."""
    t0 = time.perf_counter()
    seeds = range(seed0, seed0 + n)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pairs = pool.map(_example, seeds, chunksize=16)
    else:
        pairs = [_example(s) for s in seeds]
    log.info("rendered %d frames in %.1f s (%d workers)", n, time.perf_counter() - t0, workers)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# -- training (torch) ----------------------------------------------------------------------


def train(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from daemon.models import cards
    from daemon.models.train import common

    dev = common.setup(a.seed)
    n = 64 if a.quick else a.frames
    x_all, y_all = render(TRAIN_SEED0, n, a.workers)
    xv, yv = render(VAL_SEED0, 16 if a.quick else 200, a.workers)
    x = torch.from_numpy(x_all).to(dev)
    y = torch.from_numpy(y_all).to(dev)
    net = common.UNet(2, WIDTHS, classes=3).to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 8 if a.quick else a.batch
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
    net.eval()
    with torch.no_grad(), common.autocast(dev):
        probs = np.concatenate(
            [
                net(torch.from_numpy(xv[i : i + 32]).to(dev)[:, None].float() / 255.0)
                .float()
                .softmax(1)
                .cpu()
                .numpy()
                for i in range(0, len(xv), 32)
            ]
        )
    scores = segmentation_scores(probs.argmax(1), yv)
    log.info("held-out scores (GPU, %d frames): %s", len(xv), scores)
    training = common.training_record(
        "ultrasound",
        f"{n} simulated frames, seeds {TRAIN_SEED0}-{TRAIN_SEED0 + n - 1} "
        "(daemon/phantoms/ultrasound.py example(seed)); simulated only, no real image",
        f"seeds {VAL_SEED0}+ (calibrate)",
        seed=a.seed,
        epochs=epochs,
        steps=steps,
        batch=batch,
        dev=dev,
        seconds=seconds,
    )
    command = "python -m daemon.models.train.ultrasound " + " ".join(sys.argv[1:])
    training["command"] = command.strip()
    common.publish(
        net,
        torch.zeros(1, 1, SIZE, SIZE),
        a.out,
        NAME,
        "segmentation",
        cards.ULTRASOUND,
        training,
        scores,
        lambda params: provenance(params, training, scores),
    )


SIZE = 256
WIDTHS = (16, 32, 64, 128)  # see the module docstring


def augment(x: Any, y: Any) -> tuple[Any, Any]:
    """Random horizontal flip, rotation (+-10 deg), scale (0.85-1.15), shift (+-8 %) with
    black beyond the frame, gain, gamma."""
    import torch
    import torch.nn.functional as F

    n, dev = x.shape[0], x.device
    ang = (torch.rand(n, device=dev) - 0.5) * (2 * math.radians(10))
    scale = 0.85 + 0.3 * torch.rand(n, device=dev)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, device=dev) - 0.5) * 0.16
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(
        y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].long()
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, device=dev)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, device=dev) - 0.5) * 0.5)
    x = (x.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    return x, y


def provenance(params: int, training: dict[str, Any], scores: dict[str, float]) -> str:
    return (
        f"FAST paper 2-D U-Net ({params:,} parameters) trained on the echod ultrasound "
        f"simulator ({training['data'].split(',')[0]}, {training['steps']} steps, "
        f"{training['hardware'].split(',')[0]}, {training['training_seconds']:.0f} s); "
        f"held-out Dice artery {scores['dice_artery']:.3f}, vein {scores['dice_vein']:.3f}; "
        "synthetic data only, not for clinical use"
    )


# -- scores (numpy) ------------------------------------------------------------------------


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    return 2.0 * float((p & t).sum()) / max(1, int(p.sum() + t.sum()))


def segmentation_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean Dice per vessel class over the frames that contain it; on frames with no
    vessel, the mean fraction of pixels labelled a vessel."""
    out: dict[str, float] = {}
    for label, name in ((1, "artery"), (2, "vein")):
        has = [i for i in range(len(truth)) if (truth[i] == label).any()]
        out[f"dice_{name}"] = float(np.mean([dice(pred[i], truth[i], label) for i in has]))
    empty = [i for i in range(len(truth)) if not truth[i].any()]
    out["vessel_fraction_no_vessel"] = float(np.mean([(pred[i] > 0).mean() for i in empty]))
    return out


# -- calibration and measurement (ONNX Runtime, CPU) -------------------------------------------


def _run(model: Path, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(network input image (h, w), class probabilities (C, h, w)) of each frame, prepared
    as echod prepares it."""
    from daemon.engines import postprocess
    from daemon.engines.guard import as_plane, probabilities
    from daemon.engines.segmenter import Segmenter

    out = []
    with Segmenter.open(model, engine="onnxruntime") as seg:
        for image in images:
            x = seg.prepare(image)
            planes = postprocess.planes(seg.infer(x), seg.output.layout or "NCHW")
            out.append((as_plane(x), probabilities(planes, seg.card.output.activation)))
    return out


def calibrate(model: Path, frames: int) -> None:
    """Held-out scores and the guard's thresholds, from simulator seeds only."""
    from daemon.engines.guard import FEATURES, Guard, domain_features, finding_confidence
    from daemon.phantoms.ultrasound import example

    examples = [example(s) for s in range(VAL_SEED0, VAL_SEED0 + frames)]
    runs = _run(model, [e.image for e in examples])
    pred = np.stack([p.argmax(0) for _, p in runs])
    truth = np.stack([e.labels for e in examples])
    scores = segmentation_scores(pred, truth)
    ref = [
        domain_features(x)
        for (x, _), e in zip(runs, examples, strict=True)
        if e.kind in DOMAIN_KINDS and not e.dark
    ]
    domain = {}
    for name in FEATURES:
        v = np.array([f[name] for f in ref])
        lo, hi = np.quantile(v, [GUARD_QUANTILE, 1 - GUARD_QUANTILE])
        pad = GUARD_WIDEN * (hi - lo)
        domain[name] = [round(float(lo - pad), 4), round(float(hi + pad), 4)]
    domain["fov_fraction"][1] = 1.0
    good = [
        finding_confidence(p)[0]
        for (_, p), pr, t in zip(runs, pred, truth, strict=True)
        if t.any() and np.mean([dice(pr, t, c) for c in np.unique(t[t > 0])]) >= 0.7
    ]
    min_conf = round(float(np.quantile(good, CONFIDENCE_QUANTILE)), 4)
    guard = Guard(min_conf, {k: (v[0], v[1]) for k, v in domain.items()})
    verdicts = [guard.judge(x, p) for x, p in runs]
    shown = [v.confident for v, e in zip(verdicts, examples, strict=True) if e.vessels]
    scores["withheld_with_vessels"] = round(1.0 - float(np.mean(shown)), 4)
    log.info("held-out scores: %s", scores)
    log.info("guard: min_confidence %.4f, domain %s", min_conf, domain)
    record = evaluation.read_record(model)
    record.pop("real_data", None)  # measured with other thresholds: measure again
    record["scores"] = scores
    record["guard"] = {"min_confidence": min_conf, "domain": domain}
    record["calibration"] = {
        "command": f"python -m daemon.models.train.ultrasound calibrate {model.name} "
        f"--frames {frames}",
        "held_out": f"{frames} simulated frames, seeds {VAL_SEED0}-{VAL_SEED0 + frames - 1}",
    }
    _write(model, record)


def measure(model: Path, data: Path) -> None:
    """Fraction of pixels labelled artery or vein on real recordings with no vessel: the
    model alone, and behind the guard (a withheld frame shows nothing)."""
    from daemon.acquire.metaimage import MetaImageSequence
    from daemon.engines.card import load_card
    from daemon.engines.guard import Guard

    card = load_card(model)
    if card.guard is None:
        raise SystemExit(f"{model}: calibrate it first (its card has no [guard])")
    guard = Guard(card.guard.min_confidence, card.guard.domain)
    record = evaluation.read_record(model)
    figures: dict[str, float] = {}
    for path in sorted(data.glob("*.mha")):
        source = MetaImageSequence(path)
        try:
            images = [f.image for f in source.frames()]
        finally:
            source.close()
        alone, guarded, withheld = [], [], []
        for x, p in _run(model, images):
            frac = float((p.argmax(0) > 0).mean())
            ok = guard.judge(x, p).confident
            alone.append(frac)
            guarded.append(frac if ok else 0.0)
            withheld.append(0.0 if ok else 1.0)
        key = path.name.split(".")[0]
        figures[f"{key}.frames"] = len(images)
        figures[f"{key}.vessel_fraction"] = round(float(np.mean(alone)), 5)
        figures[f"{key}.vessel_fraction_guarded"] = round(float(np.mean(guarded)), 5)
        figures[f"{key}.withheld"] = round(float(np.mean(withheld)), 4)
        log.info("%s: %s", path.name, {k: v for k, v in figures.items() if k.startswith(key)})
    record["real_data"] = figures
    _write(model, record)


def _write(model: Path, record: dict[str, Any]) -> None:
    """The record into the ONNX metadata and the card rewritten from it."""
    from daemon.models.cards import ultrasound_card

    evaluation.write_record(model, record, ultrasound_card)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["calibrate"], ["measure"]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        p = argparse.ArgumentParser(prog=f"ultrasound {argv[0]}")
        p.add_argument("model", type=Path)
        if argv[0] == "calibrate":
            p.add_argument("--frames", type=int, default=VAL_FRAMES)
            a = p.parse_args(argv[1:])
            calibrate(a.model, a.frames)
        else:
            p.add_argument("--data", type=Path, default=Path("../shared/data/us"))
            a = p.parse_args(argv[1:])
            measure(a.model, a.data)
        return
    from daemon.models.train import common

    p = common.arguments(__doc__, epochs=1000, minutes=5.0)
    p.add_argument("--frames", type=int, default=16_000, help="training frames (default 16000)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
