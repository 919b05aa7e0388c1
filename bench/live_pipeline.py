"""Live pipeline, mode ``all``, the paper's 2-D U-Net at 256x256, vs the engine's own rate.

Measured in one run on the same frames:
- engine rate: the engine alone, in this process, on the prepared frames;
- pipeline throughput: ``echod run --mode all --pace none`` (acquire, infer, sink as
  separate processes over the shared-memory rings); ratio = pipeline fps / engine rate
  (target >= 0.95: transport, pre- and post-processing hidden behind inference);
- latency overhead: the same pipeline paced at half the engine rate (no queueing),
  p99 frame latency minus mean inference time (target <= 3 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.config import Config
from daemon.engines.segmenter import Segmenter
from daemon.models import default_model


def engine_rate(model: Path, n: int) -> dict[str, float]:
    src = SyntheticSource(SyntheticSettings(width=256, height=256))
    frames = [f.image for _, f in zip(range(n), src.frames(), strict=False)]
    seg = Segmenter.open(model, engine=None, device="cpu")
    seg.warmup(5)
    xs = [seg.prepare(f) for f in frames]
    times = []
    for x in xs:
        t = time.perf_counter()
        seg.infer(x)
        times.append(time.perf_counter() - t)
    seg.close()
    mean = statistics.fmean(times)
    return {"fps": 1 / mean, "mean_ms": mean * 1e3, "sd_ms": statistics.stdev(times) * 1e3}


def pipeline(n: int, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "daemon",
        "run",
        "--source",
        "synthetic",
        "--mode",
        "all",
        "--frames",
        str(n),
        "--headless",
        "--json",
        *extra,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args()
    model = default_model(Config().paths.cache())
    eng = engine_rate(model, min(args.frames, 200))
    thr = pipeline(args.frames, "--pace", "none")
    lat = pipeline(max(60, args.frames // 3), "--pace", "fps", "--fps", f"{eng['fps'] / 2:.2f}")
    inf_mean = lat["stages"]["nn_inference"]["mean_ms"]
    result = {
        "model": thr["model"],
        "engine": thr["engine"],
        "device": thr["device"],
        "engine_alone": eng,
        "pipeline_throughput": {k: thr[k] for k in ("fps", "frames_out", "dropped", "stages")},
        "throughput_ratio": thr["fps"] / eng["fps"],
        "paced_latency_ms": lat["latency_ms"],
        "paced_inference_mean_ms": inf_mean,
        "latency_overhead_p99_ms": lat["latency_ms"]["p99"] - inf_mean,
        "latency_overhead_p50_ms": lat["latency_ms"]["p50"] - inf_mean,
    }
    print(f"engine alone        {eng['fps']:8.1f} fps  ({eng['mean_ms']:.2f} ms/frame)")
    print(
        f"pipeline (all)      {thr['fps']:8.1f} fps  ratio {result['throughput_ratio']:.3f}"
        "  (target >= 0.95)"
    )
    for name, s in thr["stages"].items():
        print(f"  {name:<14} {s['mean_ms']:7.2f} ms  sd {s['sd_ms']:.2f}")
    print(
        f"paced at {eng['fps'] / 2:.1f} fps: latency p50 {lat['latency_ms']['p50']:.2f} ms "
        f"p99 {lat['latency_ms']['p99']:.2f} ms; overhead p99 - inference "
        f"{result['latency_overhead_p99_ms']:.2f} ms (target <= 3)"
    )
    write_result("live_pipeline", result)


if __name__ == "__main__":
    main()
