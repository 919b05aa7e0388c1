"""The FAST paper's Table 2 on this machine: NN input / inference / output ms per frame
for the reference 2-D U-Net (256x256, 3 classes) on every available engine and
device, then frames/s of mode "newest" (one request, latency hint) against mode
"all" (several requests in flight through Segmenter.submit, throughput hint).

    python bench/table2.py                      # CPU engines
    python bench/table2.py --device cuda        # GPU engines (on the GPU machine)

Each configuration runs ``--rounds`` rounds and the median round is reported
(this machine's cores are shared); newest and all alternate round by round. Prints a table; writes
bench/results/table2-<device>[-<part>].json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_result

from daemon.engines import registry
from daemon.engines.reference import ensure_reference
from daemon.engines.segmenter import Segmenter
from daemon.errors import EchodError

# (label, engine, model format, options, pre-processing) per device class
ROWS: dict[str, list[tuple[str, str, str, dict[str, Any], str]]] = {
    "cpu": [
        ("ONNX Runtime CPU fp32", "onnxruntime", "onnx", {}, "cpu"),
        ("OpenVINO CPU fp32", "openvino", "onnx", {}, "cpu"),
        ("OpenVINO CPU bf16", "openvino", "onnx", {"precision": "bf16"}, "cpu"),
        ("PyTorch CPU fp32 (.pt2)", "pytorch", "pt2", {}, "cpu"),
        ("ONNX Runtime CPU fp32, OpenCL pre-processing", "onnxruntime", "onnx", {}, "opencl"),
    ],
    "cuda": [
        ("PyTorch CUDA fp16 + CUDA graphs", "pytorch", "pt2", {}, "cpu"),
        ("PyTorch CUDA fp32", "pytorch", "pt2", {"precision": "fp32", "cuda_graphs": False}, "cpu"),
        ("PyTorch CUDA fp16 + graphs, OpenCL pre-processing", "pytorch", "pt2", {}, "opencl"),
        ("ONNX Runtime CUDA", "onnxruntime", "onnx", {}, "cpu"),
        ("TensorRT fp16", "tensorrt", "onnx", {}, "cpu"),
    ],
}
# engines whose mode "all" keeps several inferences in flight, per device class
THROUGHPUT: dict[str, list[tuple[str, str, str, dict[str, Any]]]] = {
    "cpu": [
        ("OpenVINO CPU fp32", "openvino", "onnx", {}),
        ("OpenVINO CPU bf16", "openvino", "onnx", {"precision": "bf16"}),
    ],
    "cuda": [("PyTorch CUDA fp16 + CUDA graphs", "pytorch", "pt2", {})],
}


def stats(ms: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(ms), 3), "sd": round(statistics.pstdev(ms), 3)}


def table2_row(seg: Segmenter, frames: list[np.ndarray], n: int) -> dict[str, list[float]]:
    """Per-frame ms of prepare / infer / finish, one frame at a time (mode newest)."""
    t: dict[str, list[float]] = {"input": [], "inference": [], "output": []}
    for i in range(n):
        f = frames[i % len(frames)]
        t0 = time.perf_counter()
        x = seg.prepare(f)
        t1 = time.perf_counter()
        y = seg.infer(x)
        t2 = time.perf_counter()
        seg.finish(y, f.shape)
        t3 = time.perf_counter()
        t["input"].append((t1 - t0) * 1e3)
        t["inference"].append((t2 - t1) * 1e3)
        t["output"].append((t3 - t2) * 1e3)
    return t


def pipelined(seg: Segmenter, frames: list[np.ndarray], n: int) -> float:
    """Frames/s end to end with up to ``seg.depth`` frames in flight (InferStage's loop)."""
    inflight: deque[tuple[Any, tuple[int, ...]]] = deque()
    t0 = time.perf_counter()
    for i in range(n):
        f = frames[i % len(frames)]
        inflight.append((seg.submit(seg.prepare(f)), f.shape))
        if len(inflight) >= seg.depth:
            pending, shape = inflight.popleft()
            seg.finish(seg.result(pending), shape)
    while inflight:
        pending, shape = inflight.popleft()
        seg.finish(seg.result(pending), shape)
    return n / (time.perf_counter() - t0)


def median_round(rounds: list[Any], key: Callable[[Any], float]) -> Any:
    return sorted(rounds, key=key)[len(rounds) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--frames", type=int, default=60, help="frames per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--frame-size", default="616x820", help="frame HxW (uint8), default 616x820")
    ap.add_argument("--cache", type=Path, help="model cache (default: a temporary folder)")
    ap.add_argument(
        "--part", choices=["all", "table", "throughput"], default="all", help="what to measure"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kind = args.device.split(":")[0].lower()
    h, w = (int(v) for v in args.frame_size.lower().split("x"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w), np.uint8) for _ in range(8)]
    cache = args.cache or Path(tempfile.mkdtemp(prefix="echod-table2-"))
    probes = {p.name: p for p in registry.probe_all()}

    def open_seg(engine: str, fmt: str, options: dict[str, Any], pre: str, mode: str) -> Segmenter:
        model = ensure_reference("unet2d-256", cache, fmt)  # type: ignore[arg-type]
        return Segmenter.open(
            model, engine=engine, device=args.device, preprocess=pre, mode=mode, **options
        )

    def usable(engine: str) -> str:
        p = probes.get(engine)
        if p is None or not p.available:
            return p.reason if p else "not registered"
        return "" if kind in p.devices else f"no device {args.device} (has {', '.join(p.devices)})"

    rows: list[dict[str, Any]] = []
    segs: dict[str, Segmenter] = {}
    for label, engine, fmt, options, pre in ROWS.get(kind, []) if args.part != "throughput" else []:
        why = usable(engine)
        try:
            if not why:
                segs[label] = open_seg(engine, fmt, options, pre, "newest")
                segs[label].warmup(5, (h, w))
        except EchodError as exc:
            why = str(exc)
        if why:
            rows.append({"row": label, "skipped": why})
            print(f"{label}: skipped: {why}", flush=True)
    # each row's rounds back to back: engines' idle worker threads (OpenMP spin-waits)
    # would otherwise slow the next engine in this process
    per_round = {
        label: [table2_row(seg, frames, args.frames) for _ in range(args.rounds)]
        for label, seg in segs.items()
    }
    print(f"\nTable 2, reference 2-D U-Net 256x256, frames {h}x{w} uint8, ms per frame (mean sd)")
    print(f"{'':52} {'NN input':>13} {'NN inference':>13} {'NN output':>13}")
    for label, seg in segs.items():
        t = median_round(per_round[label], lambda r: statistics.fmean(r["inference"]))
        info = seg.describe()
        row = {
            "row": label,
            "engine": info["engine"],
            "engine_version": info["engine_version"],
            "device": info["device"],
            "preprocess": info["preprocess"],
            **{k: stats(v) for k, v in t.items()},
        }
        rows.append(row)
        cells = [
            f"{row[k]['mean']:7.2f} {row[k]['sd']:5.2f}" for k in ("input", "inference", "output")
        ]
        print(f"{label:52} {'  '.join(cells)}   [{info['device']}, pre {info['preprocess']}]")
        seg.close()

    throughput: list[dict[str, Any]] = []
    print(f"\nframes/s end to end (prepare + infer + finish), median of {args.rounds} rounds")
    for label, engine, fmt, options in THROUGHPUT.get(kind, []) if args.part != "table" else []:
        if usable(engine):
            continue
        newest = open_seg(engine, fmt, options, "cpu", "newest")
        every = open_seg(engine, fmt, options, "cpu", "all")
        for seg in (newest, every):
            pipelined(seg, frames, 2 * seg.depth + 4)  # warm up every request
        fps: dict[str, list[float]] = {"newest": [], "all": []}
        for _ in range(args.rounds):
            fps["newest"].append(pipelined(newest, frames, args.frames))
            fps["all"].append(pipelined(every, frames, args.frames))
        med = {k: statistics.median(v) for k, v in fps.items()}
        gain = med["all"] / med["newest"] - 1
        throughput.append(
            {
                "row": label,
                "newest_fps": round(med["newest"], 1),
                "all_fps": round(med["all"], 1),
                "all_in_flight": every.depth,
                "gain": round(gain, 3),
                "rounds": {k: [round(x, 1) for x in v] for k, v in fps.items()},
            }
        )
        print(
            f"{label:34} newest (latency, 1 request) {med['newest']:7.1f}   all (throughput, "
            f"{every.depth} in flight) {med['all']:7.1f}   {gain:+.0%}"
        )
        newest.close()
        every.close()
    write_result(
        f"table2-{kind}" + ("" if args.part == "all" else f"-{args.part}"),
        {
            "model": "unet2d-256 (random weights)",
            "frame": [h, w],
            "frames": args.frames,
            "rounds": args.rounds,
            "device": args.device,
            "table2_ms": rows,
            "throughput_fps": throughput,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
