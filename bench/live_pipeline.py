"""Live pipeline vs the engine alone: the paper's 2-D U-Net at 256x256, same frames, one run.

- engine rate: the engine alone, in this process, on the prepared frames;
- throughput: ``echod run --mode all --pace none`` (acquire, infer, sink as separate
  processes over the shared-memory rings); ratio = pipeline fps / engine rate
  (target >= 0.95: transport, pre- and post-processing hidden behind inference);
- latency: ``--mode all`` paced at half the engine rate (no queueing): p99 frame latency
  minus mean inference time (target <= 3 ms); and ``--mode newest`` paced at 90 % of the
  engine rate: p50 latency (GPU target <= 2 ms).

``--engine pytorch --device cuda`` runs it on an NVIDIA GPU (the model is converted to
an ExportedProgram first). ``--set KEY=VALUE`` passes settings to every run (e.g.
``pipeline.max_batch=1`` turns dynamic batching off); ``--tag`` names the result file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import write_result
from _hiccups import PERIOD_S, Hiccups

from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.config import Config
from daemon.engines.reference import ensure_reference
from daemon.engines.segmenter import Segmenter


def engine_rate(model: Path, engine: str | None, device: str, n: int) -> dict[str, float]:
    src = SyntheticSource(SyntheticSettings(width=256, height=256))
    frames = [f.image for _, f in zip(range(n), src.frames(), strict=False)]
    seg = Segmenter.open(model, engine=engine, device=device)
    seg.warmup(20)
    xs = [seg.prepare(f) for f in frames]
    times = []
    for x in xs:
        t = time.perf_counter()
        seg.infer(x)
        times.append(time.perf_counter() - t)
    seg.close()
    mean = statistics.fmean(times)
    return {"fps": 1 / mean, "mean_ms": mean * 1e3, "sd_ms": statistics.stdev(times) * 1e3}


def pipeline(
    n: int, common: list[str], *extra: str, meter: Hiccups | None = None
) -> dict[str, Any]:
    """One ``echod run``; its JSON summary. ``meter`` runs while the source streams."""
    cmd = [
        sys.executable,
        "-m",
        "daemon",
        "run",
        "--source",
        "synthetic",
        "--frames",
        str(n),
        "--headless",
        "--json",
        "--set",
        "control.enabled=false",
        *common,
        *extra,
    ]
    if meter is not None:
        meter.start()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        log = []
        for line in proc.stderr:  # the log: the stream starts once every stage is ready
            log.append(line)
            if meter is not None and "source streaming" in line:
                meter.mark()
        code = proc.wait()
        if meter is not None:
            meter.stop()
        if code != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{''.join(log[-20:])}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--engine", default="", help="engine name (default: best for the device)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, help="default: the paper-size reference 2-D U-Net")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args()
    cache = Config().paths.cache()
    fmt = "pt2" if args.engine == "pytorch" else "onnx"
    model = args.model or ensure_reference("unet2d-256", cache, fmt=fmt)
    # a short synthetic loop (a quarter second of motion), rendered before the first frame:
    # the simulator takes ~25 ms a frame, and this measures the pipeline (rendered while it
    # streams, the first loop came late, then in a burst: the slowest 1 % of a paced run)
    common = ["--model", str(model), "--device", args.device, "--set", "model.warmup=20",
              "--set", "source.synthetic.loop_s=0.25",
              "--set", "source.synthetic.prerender=true"]  # fmt: skip
    if args.engine:
        common += ["--engine", args.engine]
    for kv in args.set:
        common += ["--set", kv]
    eng = engine_rate(model, args.engine or None, args.device, min(args.frames, 500))
    thr = pipeline(args.frames, common, "--mode", "all", "--pace", "none")
    hiccups = Hiccups()  # did the machine stall too when a frame was late?
    lat = pipeline(
        max(60, args.frames // 3),
        common,
        "--mode",
        "all",
        "--pace",
        "fps",
        "--fps",
        f"{eng['fps'] / 2:.2f}",
        meter=hiccups,
    )
    new = pipeline(
        max(60, args.frames // 2),
        common,
        "--mode",
        "newest",
        "--pace",
        "fps",
        "--fps",
        f"{eng['fps'] * 0.9:.2f}",
    )
    inf_mean = lat["stages"]["nn_inference"]["mean_ms"]
    result = {
        "model": thr["model"],
        "engine": thr["engine"],
        "device": thr["device"],
        "engine_alone": eng,
        "settings": args.set,
        "pipeline_all": {
            k: thr.get(k)
            for k in ("fps", "frames_out", "dropped", "latency_ms", "stages", "batching")
        },
        "throughput_ratio": thr["fps"] / eng["fps"],
        "paced_all_latency_ms": lat["latency_ms"],
        "paced_all_inference_mean_ms": inf_mean,
        "latency_overhead_p99_ms": lat["latency_ms"]["p99"] - inf_mean,
        "latency_overhead_p50_ms": lat["latency_ms"]["p50"] - inf_mean,
        "per_frame_overhead_ms": lat["overhead_ms"],
        "paced_all_latency_parts_ms": lat.get("latency_parts_ms"),
        "paced_all_machine_hiccups": hiccups.summary(),
        "newest": {
            k: new.get(k)
            for k in ("fps", "frames_in", "frames_out", "dropped", "latency_ms", "latency_parts_ms")
        },
    }
    print(f"{thr['engine']} on {thr['device']}, {thr['model']}")
    print(f"engine alone        {eng['fps']:8.1f} fps  ({eng['mean_ms']:.3f} ms/frame)")
    print(
        f"pipeline (all)      {thr['fps']:8.1f} fps  ratio {result['throughput_ratio']:.3f}"
        "  (target >= 0.95)"
    )
    for name, s in thr["stages"].items():
        print(f"  {name:<14} {s['mean_ms']:7.3f} ms  sd {s['sd_ms']:.3f}")
    print(f"  batches: {thr.get('batching')}")
    print(
        f"all, paced at {eng['fps'] / 2:.1f} fps: latency p50 {lat['latency_ms']['p50']:.2f}"
        f" p99 {lat['latency_ms']['p99']:.2f} ms; p99 - inference "
        f"{result['latency_overhead_p99_ms']:.2f} ms (target <= 3)"
    )
    h = result["paced_all_machine_hiccups"]
    if h["wakeups"]:
        print(
            f"  meanwhile a {PERIOD_S * 1e3:.1f} ms sleeper woke late by p50 {h['p50_ms']:.3f} "
            f"p99 {h['p99_ms']:.3f} max {h['max_ms']:.1f} ms; {h['over_1ms']} wake-ups "
            f"> 1 ms late, {h['over_5ms']} > 5 ms in {h['seconds']} s (the machine's stalls)"
        )
    print(
        f"newest, paced at {eng['fps'] * 0.9:.1f} fps: {new['fps']:.1f} fps, latency p50 "
        f"{new['latency_ms']['p50']:.2f} p99 {new['latency_ms']['p99']:.2f} ms, "
        f"{sum(new['dropped'].values())} of {new['frames_in']} dropped"
    )
    for name, run in (("all, paced", lat), ("newest", new)):
        for label, parts in (run.get("latency_parts_ms") or {}).items():
            print(f"  {name} {label:<13} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    write_result(f"live_pipeline_{args.device.replace(':', '')}{args.tag}", result)


if __name__ == "__main__":
    main()
