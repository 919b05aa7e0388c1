"""Two models on the same frames against each model alone (issue 17: several models per frame).

Three configurations of ``echod run --headless --mode all`` on the synthetic phantom:
model 0 alone, model 1 alone, and both in one run (``[[model]]``: one infer stage each,
the same frames ring). Each is run twice per round: as fast as it goes (``--pace none``:
throughput, frames per second at the sink) and paced at a rate every configuration keeps
up with (half the two-model throughput of the first round: latency without queueing, p50
and p99 acquisition -> sink). Rounds interleave the configurations (their order rotates),
so a machine whose load drifts weighs on all three alike; the table gives the median over
rounds. By default both models are the bundled ultrasound model, on ONNX Runtime and on
OpenVINO.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from _common import write_result


def run(settings: dict[str, str], frames: int, pace: list[str]) -> dict[str, Any]:
    """One ``echod run``; its JSON summary."""
    cmd = [sys.executable, "-m", "daemon", "run", "--headless", "--json", "--mode", "all"]
    cmd += ["--frames", str(frames), *pace, "--set", "control.enabled=false"]
    cmd += ["--set", "offline.workers=0", "--set", "source.synthetic.loop_s=0.5"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def model_settings(i: int, args: argparse.Namespace, key: str) -> dict[str, str]:
    """Model ``i``'s settings as the ``[model]`` table ``key`` (``model`` or ``model.1``)."""
    out = {f"{key}.engine": args.engines[i], f"{key}.warmup": "10"}
    if args.models[i]:
        out[f"{key}.path"] = args.models[i]
    if args.device:
        out[f"{key}.device"] = args.device
    return out


def figures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model: fps, latency, Table 2 and counts (the run's ``models``)."""
    keys = ("stage", "engine", "device", "fps", "latency_ms", "stages", "frames_out", "dropped")
    return [{k: m.get(k) for k in keys} for m in summary["models"]]


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=150, help="frames per throughput run")
    ap.add_argument("--paced-frames", type=int, default=60, help="frames per latency run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", nargs=2, default=["onnxruntime", "openvino"])
    ap.add_argument("--models", nargs=2, default=["", ""], help="'': the bundled model")
    ap.add_argument("--device", default="", help="both models' device ('': model.device)")
    args = ap.parse_args()
    configs = {
        "model 0 alone": model_settings(0, args, "model"),
        "model 1 alone": model_settings(1, args, "model"),
        "both": {**model_settings(0, args, "model"), **model_settings(1, args, "model.1")},
    }
    names = list(configs)
    fast: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    paced: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    fps = 0.0  # the latency runs' pace, from the first two-model throughput run
    for r in range(args.rounds):
        order = names[r % 3 :] + names[: r % 3]
        if not fps:
            order = ["both", *(n for n in order if n != "both")]
        for name in order:
            s = run(configs[name], args.frames, ["--pace", "none"])
            fast[name].append(figures(s))
            if not fps:
                fps = round(min(m["fps"] for m in s["models"]) / 2, 2)
            s = run(configs[name], args.paced_frames, ["--pace", "fps", "--fps", str(fps)])
            paced[name].append(figures(s))
            print(f"round {r + 1} {name}: done", flush=True)
    table = []
    for name in names:
        for i, first in enumerate(fast[name][0]):
            row = {
                "run": name,
                "stage": first["stage"],
                "engine": first["engine"],
                "device": first["device"],
                "fps": median([f[i]["fps"] for f in fast[name]]),
                "inference_ms": median(
                    [f[i]["stages"]["nn_inference"]["mean_ms"] for f in fast[name]]
                ),
                "latency_p50_ms": median([p[i]["latency_ms"]["p50"] for p in paced[name]]),
                "latency_p99_ms": median([p[i]["latency_ms"]["p99"] for p in paced[name]]),
                "dropped": sum(sum(f[i]["dropped"].values()) for f in fast[name] + paced[name]),
            }
            table.append(row)
    write_result(
        "two_models",
        {
            "frames": args.frames,
            "paced_frames": args.paced_frames,
            "paced_fps": fps,
            "rounds": args.rounds,
            "table": table,
            "runs": {"throughput": fast, "paced": paced},
        },
    )
    print(f"mode all; throughput at --pace none, latency paced at {fps} fps; medians of "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'run':<14} {'stage':<8} {'engine':<12} {'fps':>7} {'inference':>10} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'dropped':>8}")  # fmt: skip
    for row in table:
        print(
            f"{row['run']:<14} {row['stage']:<8} {row['engine']:<12} {row['fps']:7.1f} "
            f"{row['inference_ms']:8.1f} ms {row['latency_p50_ms']:8.1f} "
            f"{row['latency_p99_ms']:8.1f} {row['dropped']:8d}"
        )


if __name__ == "__main__":
    main()
