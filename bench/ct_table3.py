"""The FAST paper's Table 3 on this machine (CT volume segmentation), and echod side by side
with MONAI's sliding_window_inference and pyFAST on the same ONNX model and engine.

echod: per patch the generator, NN input, inference, NN output and stitcher ms, and the
total, at overlap 0 (constant) and 25 % (Gaussian); at its default precision ("auto":
what the model card's calibration allows, e.g. int8 on OpenVINO) and at fp32. MONAI
(same engine, same model, same overlaps; its predictor resizes with torch) and pyFAST
(PatchGenerator -> SegmentationNetwork -> PatchStitcher, overlap 0 only: its stitcher
does not blend) in the same run. Each system is timed from reading the volume file to
the label volume in memory (model loading included), and again without the loading
where it can be separated.

    python bench/ct_table3.py                                  # echod only, 305 x 512 x 512
    bench/setup_peers.sh    # once: pyFAST and MONAI in .venv-peers
    python bench/ct_table3.py               # with both there: all three
    python bench/ct_table3.py --shape 64 512 512 --engine openvino

MONAI comes from ``--monai-site`` (a site-packages folder added after echod's; by
default .venv-peers'), or wherever it imports; pyFAST, from .venv-peers or
``--fast-python``, runs in a
child process with its own interpreter (it bundles ONNX Runtime and OpenVINO, whose
libraries must not meet echod's in one process), with an OpenCL ICD (Debian's
pocl-opencl-icd) and libusb-1.0-0. Writes bench/results/ct_table3.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import PEERS, write_result

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "daemon" / "models" / "ct-nodule-seg.onnx"
STEPS = ("generator", "nn_input", "inference", "nn_output", "stitcher")
FAST_ENGINES = {"onnxruntime": "ONNXRuntime", "openvino": "OpenVINO"}
OVERLAPS = {"0": 0.0, "25 % gaussian": 0.25}
PRECISIONS = (("", "auto"), (" fp32", "fp32"), (" bf16", "bf16"))  # label tag, precision


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, g = pred == 1, truth == 1
    return round(2 * float((p & g).sum()) / max(1, int(p.sum() + g.sum())), 4)


def run_echod(
    image: Path, engine: str, overlap: float, blend: str, threads: int, precision: str = "auto"
) -> dict[str, Any]:
    from daemon.engines.segmenter import Segmenter
    from daemon.offline import tiling, volumes
    from daemon.offline.ct import PAD_HU, CtOptions, Network, label_map, table3

    opts = CtOptions(overlap=overlap, blend=blend)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    volume = volumes.read(image)
    timings = tiling.Timings()
    with Segmenter.open(
        MODEL, engine=engine, device="cpu", threads=threads, precision=precision
    ) as seg:
        net = Network(seg, opts, timings)
        ran = seg.precision.precision
        t1 = time.perf_counter()

        def predictor(x: np.ndarray) -> np.ndarray:
            return net.finish(net.infer(x))

        labels = np.zeros(volume.hu.shape, np.uint8)
        for start, block in tiling.windows(
            volume.hu,
            predictor,
            opts.patch,
            overlap=opts.overlap,
            blend=opts.blend,
            pad=PAD_HU[opts.pad],
            prepare=net.prepare,
            timings=timings,
        ):
            labels[start : start + block.shape[1]] = label_map(block)
        t2 = time.perf_counter()
    patches = len(tiling.grid(volume.hu.shape, opts.patch, opts.overlap))
    return {
        "precision": ran,
        "patches": patches,
        "ms_per_patch": table3(timings, patches),
        "segment_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "labels": labels,
    }


def run_monai(image: Path, engine: str, overlap: float, blend: str, threads: int) -> dict[str, Any]:
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from daemon.engines import registry

    torch.set_num_threads(max(threads, 1) if threads else torch.get_num_threads())
    t0 = time.perf_counter()
    hu = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32))
    eng = registry.engine_class(engine)()
    eng.load(MODEL, "cpu", threads=threads)
    name, out = eng.inputs[0].name, eng.outputs[0].name
    t1 = time.perf_counter()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        x = (x.clamp(-1200.0, 400.0) + 1200.0) / 1600.0
        x = F.interpolate(x, size=(32, 256, 256), mode="trilinear")
        y = torch.from_numpy(eng.run({name: x.numpy()})[out])
        return F.interpolate(y, size=(32, 512, 512), mode="trilinear")

    with torch.no_grad():
        probs = sliding_window_inference(
            hu[None, None],
            (32, 512, 512),
            1,
            predictor,
            overlap=overlap,
            mode=blend,
            padding_mode="constant",
            cval=-1024.0,
        )
        labels = probs[0].argmax(0).numpy().astype(np.uint8)
    t2 = time.perf_counter()
    eng.close()
    return {"segment_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2), "labels": labels}


FAST_CHILD = r"""
import json, sys, time
import numpy as np
import fast
image, model, engine, out = sys.argv[1:5]
t0 = time.perf_counter()
imp = fast.ImageFileImporter.create(image)
clip = fast.IntensityClipping.create(-1200, 400).connect(imp)
norm = fast.IntensityNormalization.create(0.0, 1.0, -1200, 400).connect(clip)
gen = fast.PatchGenerator.create(512, 512, 32, overlapPercent=0).connect(norm)
net = fast.SegmentationNetwork.create(model, inferenceEngine=engine).connect(gen)
net.setResizeBackToOriginalSize(True)
stitch = fast.PatchStitcher.create().connect(net)
result = None
for data in fast.DataStream(stitch):
    result = data
t1 = time.perf_counter()
np.save(out, np.asarray(result)[..., 0])
print(json.dumps({"total_s": round(t1 - t0, 2)}))
"""


def run_fast(python: str, image: Path, engine: str, tmp: Path) -> dict[str, Any]:
    out = tmp / "fast-labels.npy"
    proc = subprocess.run(
        [python, "-c", FAST_CHILD, str(image), str(MODEL), FAST_ENGINES[engine], str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"pyFAST failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(line)
    result["labels"] = np.load(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", type=int, nargs=3, default=(305, 512, 512))
    p.add_argument("--seed", type=int, default=1_000_500)
    p.add_argument("--engine", choices=sorted(FAST_ENGINES), default="onnxruntime")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0: the engine's)")
    p.add_argument("--monai-site", help="a site-packages folder with monai and torch")
    p.add_argument("--fast-python", help="an interpreter with pyfast")
    p.add_argument("--rounds", type=int, default=1, help="rounds; the best and median reported")
    p.add_argument("--bf16", action="store_true", help="also echod with OpenVINO in bf16")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    from daemon.phantoms.ct import ct_phantom, write_image

    peers_site = sorted(PEERS.glob("lib/python3*/site-packages"))
    monai_site = a.monai_site or (str(peers_site[0]) if peers_site else None)
    if monai_site:
        import site

        site.addsitedir(monai_site)
    with_monai = importlib.util.find_spec("monai") is not None
    fast = a.fast_python or (str(PEERS / "bin/python") if PEERS.exists() else None)
    best: dict[str, dict[str, Any]] = {}
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        volume = ct_phantom(tuple(a.shape), seed=a.seed, nodules=(3, 6))
        image = write_image(volume, Path(tmp) / "volume.mhd")
        runs: list[tuple[str, Any]] = [
            (
                f"echod{tag}, overlap {o}",
                lambda o=o, b=b, p=p: run_echod(image, a.engine, OVERLAPS[o], b, a.threads, p),
            )
            for o, b in (("0", "constant"), ("25 % gaussian", "gaussian"))
            for tag, p in PRECISIONS[: 3 if a.bf16 else 2]
        ]
        if with_monai:
            runs += [
                (
                    f"MONAI, overlap {o}",
                    lambda o=o, b=b: run_monai(image, a.engine, OVERLAPS[o], b, a.threads),
                )
                for o, b in (("0", "constant"), ("25 % gaussian", "gaussian"))
            ]
        if fast:
            runs.append(("pyFAST, overlap 0", lambda: run_fast(fast, image, a.engine, Path(tmp))))
        for n in range(a.rounds):  # systems alternate within a round: load hits all alike
            for label, fn in runs:
                r = fn()
                r["dice"] = dice(r.pop("labels"), volume.labels)
                totals.setdefault(label, []).append(r["total_s"])
                if label not in best or r["total_s"] < best[label]["total_s"]:
                    best[label] = {"system": label, **r}
                ran = f"  ({r['precision']})" if "precision" in r else ""
                took = f"{r['total_s']:7.2f} s  Dice {r['dice']:.3f}{ran}"
                print(f"round {n + 1}: {label:34s} {took}")
    print()
    print(f"{a.shape[0]}x{a.shape[1]}x{a.shape[2]}, {a.engine}, CPU, {a.rounds} round(s)")
    print(f"{'':34s}{'best s':>9s}{'median s':>10s}{'Dice':>8s}")
    for label, r in best.items():
        med = statistics.median(totals[label])
        print(f"{label:34s}{r['total_s']:9.2f}{med:10.2f}{r['dice']:8.3f}")
    print()
    print("Table 3, ms per patch (the best round)")
    print(f"{'':34s}" + "".join(f"{s:>11s}" for s in (*STEPS, "total")))
    for label, r in best.items():
        if "ms_per_patch" in r:
            row = "".join(f"{r['ms_per_patch'][s]:11.1f}" for s in (*STEPS, "total"))
            print(f"{label:34s}{row}")
    write_result(
        "ct_table3",
        {"shape": a.shape, "engine": a.engine, "totals_s": totals, "best": list(best.values())},
    )


if __name__ == "__main__":
    main()
