"""Live frames while an offline job runs: p50/p99 latency and fps with and without a job.

Runs ``echod run`` (synthetic source at 30 fps, mode newest, the bundled ultrasound
model, headless) for ``--frames`` frames, alternately alone and with an
``echo-volume`` job (the bundled 3-D CT model over a 512-slice volume) submitted
as the live stages come up, ``--reps`` times each; prints each run and the
medians. Target: p99 with a job <= 1.2 x without, fps unchanged. The worker's
priority is the default configuration's (``offline.nice``, ``offline.threads``),
printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_result

from daemon import config
from daemon.ctl import Client, CtlError


def volume(path: Path, slices: int) -> Path:
    import SimpleITK as sitk

    hu = np.random.default_rng(0).integers(-1000, 400, (slices, 256, 256)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(path))
    return path


def run(frames: int, job: Path | None, data: Path) -> dict[str, Any]:
    runtime = tempfile.mkdtemp(prefix="echod-bench-")
    state = tempfile.mkdtemp(prefix="echod-bench-state-")
    env = {**os.environ, "RUNTIME_DIRECTORY": runtime, "STATE_DIRECTORY": state}
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon",
            "run",
            "--headless",
            "--json",
            "--pace",
            "fps",
            "--fps",
            "30",
            "--frames",
            str(frames),
            "--set",
            f"control.roots={data}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    job_state = None
    if job is not None:
        client = Client(f"ipc://{runtime}/control.sock", timeout_s=2.0)
        deadline = time.monotonic() + 120
        while True:
            try:
                request = {"kind": "echo-volume", "input": str(job)}
                job_id = client.call("jobs.submit", request)["job"]
                break
            except CtlError:
                if time.monotonic() > deadline:
                    raise SystemExit("echod did not take the job within 120 s") from None
                time.sleep(0.2)
    out, _ = daemon.communicate(timeout=frames / 30 * 4 + 120)
    if job is not None:
        job_state = "submitted " + job_id
        client.close()
    summary = json.loads(out.strip().splitlines()[-1])
    return {
        "job": job_state,
        "fps": summary["fps"],
        "latency_ms": summary["latency_ms"],
        "dropped": summary["dropped"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=600, help="frames per run (30 fps)")
    ap.add_argument("--reps", type=int, default=2, help="runs alone and with a job, alternated")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="echod-bench-data-"))
    vol = volume(data / "ct.nii.gz", 512)
    runs: dict[str, list[dict[str, Any]]] = {"alone": [], "with_job": []}
    for _ in range(args.reps):
        for name, job in (("alone", None), ("with_job", vol)):
            r = run(args.frames, job, data)
            runs[name].append(r)
            lat = r["latency_ms"]
            print(
                f"{name:<9} {r['fps']:6.2f} fps  latency p50 {lat['p50']:6.2f} ms  "
                f"p99 {lat['p99']:6.2f} ms  dropped {r['dropped']}",
                flush=True,
            )
    med = {
        name: {
            "fps": float(np.median([r["fps"] for r in rs])),
            "p50_ms": float(np.median([r["latency_ms"]["p50"] for r in rs])),
            "p99_ms": float(np.median([r["latency_ms"]["p99"] for r in rs])),
        }
        for name, rs in runs.items()
    }
    ratio = med["with_job"]["p99_ms"] / med["alone"]["p99_ms"]
    offline = config.Config().offline
    print(
        f"median p99 {med['alone']['p99_ms']:.2f} -> {med['with_job']['p99_ms']:.2f} ms "
        f"(x{ratio:.2f}, target <= 1.2); fps {med['alone']['fps']:.2f} -> "
        f"{med['with_job']['fps']:.2f}; worker nice {offline.nice}, "
        f"sched_idle {offline.sched_idle}, threads {offline.threads}"
    )
    write_result(
        "jobs_live",
        {
            "runs": runs,
            "median": med,
            "p99_ratio": round(ratio, 3),
            "worker": {
                "nice": offline.nice,
                "sched_idle": offline.sched_idle,
                "threads": offline.threads,
            },
        },
    )


if __name__ == "__main__":
    main()
