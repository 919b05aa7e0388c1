"""Train the frame classifier "vessels in view" / "no vessels" -> ultrasound-view.onnx + card.

A small CNN on 128x128 grey frames (/255): a stride-2 stem and four stages of two 3x3
conv + BatchNorm + ReLU with max-pooling (16..128 channels), global average and max
pooling, dropout, 2 outputs with softmax (output ``view``).

Data: :func:`daemon.phantoms.us_tasks.view_example` (half with a vessel in view, half
without; the partly-in-view frames between are left out), plus frames of the live
phantom with its probe sweep (daemon/phantoms/ultrasound.py ``Phantom(sweep=True)``);
rendered in worker processes, augmented on the GPU (flip, rotation, scale, shift, gain,
gamma). Two steps, the first on a GPU::

    python -m daemon.models.train.view --out build/view                  # train
    python -m daemon.models.train.view evaluate build/view/ultrasound-view.onnx

``evaluate`` (CPU, ONNX Runtime, frames prepared as echod prepares them) scores the
exported model on held-out simulator seeds and live-phantom loops, runs it on the real
recordings in ../shared/data/us (no vessel in them) and writes the figures on the card.
``--quick --out DIR`` is a CPU smoke run.
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

NAME = "ultrasound-view"
SIZE = cards.VIEW_SIZE
TRAIN_SEED0 = 100_000  # training seeds: 100000 .. + frames - 1
LIVE_TRAIN = range(100, 160)  # live phantom seeds seen in training
VAL_SEED0, VAL_FRAMES = 600_000, 1000  # held out (evaluate)
LIVE_VAL = range(600, 608)  # live phantom seeds held out
LIVE_STEP = 3  # every third frame of a loop
# tests use seeds from 1_000_000 up (tests/test_models.py)


def _view(seed: int) -> tuple[np.ndarray, int]:
    """A training frame and its class (-1: partly in view, left out)."""
    from daemon.phantoms.us_tasks import view_example

    ex = view_example(seed, SIZE)
    return ex.image, -1 if ex.truth.view is None else ex.truth.view


def live_frames(seed: int, step: int = LIVE_STEP) -> list[tuple[np.ndarray, Any]]:
    """(frame, truth) of one live-phantom loop with its probe sweep (a needle in every
    other seed), every ``step``-th frame, at the live source's default 256 x 256."""
    from daemon.phantoms.ultrasound import Phantom

    ph = Phantom((256, 256), seed=seed, sweep=True, needle=seed % 2 == 0)
    out = []
    for i in range(0, ph.loop_frames, step):
        image, _, truth = ph.frame_with_truth(i)
        out.append((image, truth))
    return out


def _live(seed: int) -> list[tuple[np.ndarray, int]]:
    import cv2

    return [
        (cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), tr.view)
        for im, tr in live_frames(seed)
        if tr.view is not None
    ]


# -- training (torch) ----------------------------------------------------------------------


def train(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from daemon.models.train import common
    from daemon.models.train.nets import ViewNet

    started = time.perf_counter()
    dev = common.setup(a.seed)
    n = 64 if a.quick else a.frames
    pairs = common.render(_view, range(a.seed0, a.seed0 + n), a.workers)
    live = LIVE_TRAIN[:2] if a.quick else LIVE_TRAIN
    for frames in common.render(_live, live, a.workers):
        pairs += frames
    pairs = [p for p in pairs if p[1] >= 0]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(dev)
    y = torch.tensor([p[1] for p in pairs], device=dev)
    log.info("%d frames, %.2f with vessels in view", len(y), float(y.float().mean()))
    net = ViewNet().to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if a.init is not None:
        common.start_from(net, a.init)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    batch = 8 if a.quick else a.batch
    gen = torch.Generator(device=dev).manual_seed(a.seed)

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch,), device=dev, generator=gen)
        xb = common.augment(x[idx][:, None].float() / 255.0)[0]
        with common.autocast(dev):
            logits = net(xb.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    record = common.fit_task(
        a,
        started,
        opt,
        step,
        len(y),
        batch,
        dev,
        script="view",
        task="classification",
        data=(
            f"{len(y)} simulated frames: seeds {a.seed0}-{a.seed0 + n - 1} "
            f"(daemon/phantoms/us_tasks.py view_example) and live-phantom sweeps of seeds "
            f"{live.start}-{live.stop - 1}; simulated only, no real image"
        ),
        val_seed0=VAL_SEED0,
        live_val=LIVE_VAL,
    )
    path = a.out / f"{NAME}.onnx"
    params = common.export(net, torch.zeros(1, 1, SIZE, SIZE), path, record, output="view")
    path.with_suffix(".toml").write_text(card(record, params))


# -- evaluation (ONNX Runtime, CPU) ------------------------------------------------------------


def evaluate(model: Path, frames: int, live: range, data: Path) -> None:
    """Held-out accuracy (simulator seeds, live-phantom loops) and the class fractions on
    the real recordings; into the ONNX record and the card."""
    from daemon.phantoms.us_tasks import VIEW_CLASSES, view_example

    record = evaluation.read_record(model)
    with evaluation.Runner(model) as run:
        held = [view_example(s, SIZE) for s in range(VAL_SEED0, VAL_SEED0 + frames)]
        scored = [(run(e.image)[0], e.truth.view) for e in held if e.truth.view is not None]
        record["held_out"] = {
            "frames": len(scored),
            "unscored_partly_in_view": len(held) - len(scored),
            **scores(scored),
        }
        loops = [
            (run(im)[0], tr.view) for s in live for im, tr in live_frames(s) if tr.view is not None
        ]
        record["live_phantom"] = {
            "seeds": f"{live.start}-{live.stop - 1}",
            "frames": len(loops),
            **scores(loops),
        }
        real: dict[str, Any] = {}
        for name, images in evaluation.real_recordings(data):
            probs = np.stack([run(im)[0] for im in images])
            pick = probs.argmax(1)
            real[name] = {"frames": len(images)}
            for c, cls in enumerate(VIEW_CLASSES):
                real[name][cls.replace(" ", "_")] = round(float((pick == c).mean()), 4)
            real[name]["mean_confidence"] = round(float(probs.max(1).mean()), 4)
        record["real_data"] = real
    record["scores"] = {
        "accuracy": record["held_out"]["accuracy"],
        "accuracy_live": record["live_phantom"]["accuracy"],
    }
    record["evaluation"] = {
        "command": f"python -m daemon.models.train.view evaluate {model.name} --frames {frames}",
        "held_out": f"{frames} simulated frames, seeds {VAL_SEED0}-{VAL_SEED0 + frames - 1}; "
        f"live phantom seeds {live.start}-{live.stop - 1}, every {LIVE_STEP}rd frame",
        "real_data": f"{data} (measured only)",
    }
    log.info("held out %s; live %s; real %s", record["held_out"], record["live_phantom"], real)
    evaluation.write_record(model, record, card)


def scores(pairs: list[tuple[np.ndarray, int]]) -> dict[str, float]:
    """Accuracy, per class, and the mean confidence (max probability) of (probabilities,
    class) pairs."""
    from daemon.phantoms.us_tasks import VIEW_CLASSES

    probs = np.stack([p for p, _ in pairs])
    truth = np.array([c for _, c in pairs])
    pick = probs.argmax(1)
    out = {"accuracy": round(float((pick == truth).mean()), 4)}
    for c, cls in enumerate(VIEW_CLASSES):
        out[f"accuracy_{cls.replace(' ', '_')}"] = round(float((pick[truth == c] == c).mean()), 4)
    out["mean_confidence"] = round(float(probs.max(1).mean()), 4)
    return out


def card(record: dict[str, Any], params: int) -> str:
    training = record.get("training", {})
    held = record.get("held_out", {})
    figures = (
        f"held-out accuracy {held['accuracy']:.3f} on {held['frames']} simulated frames, "
        f"{record['live_phantom']['accuracy']:.3f} on live-phantom sweeps"
        if held
        else "not evaluated yet"
    )
    provenance = (
        f"small CNN, 2 classes at {SIZE}x{SIZE} grey ({params:,} parameters), trained on the "
        f"echod ultrasound simulator ({training.get('data', '?').split(':')[0]}, "
        f"{training.get('steps', '?')} steps); {figures}; synthetic data only, not for "
        "clinical use"
    )
    return cards.task_card(
        "view",
        record,
        provenance,
        (cards.VIEW_USE, cards.TASK_DATA, cards.VIEW_LIMITS),
        cards.view_fields(),
    )


def main(argv: list[str] | None = None) -> None:
    evaluation.task_main(
        argv,
        __doc__,
        "view",
        evaluate=evaluate,
        train=train,
        val_frames=VAL_FRAMES,
        live_val=LIVE_VAL,
        batch=128,
        seed0=TRAIN_SEED0,
    )


if __name__ == "__main__":
    main()
