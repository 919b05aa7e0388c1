"""What the live synthetic source costs per frame, and the training simulator per example.

- live: ``SyntheticSource`` frames at each size: the first loop renders every frame
  (the full convolution model), later loops replay the frames kept; real time at 30 fps
  needs the first loop under 33 ms a frame on one core.
- examples: ``example(seed)`` (random scene, probe, scanner and display size, resized
  to 256x256), as the training script renders them in worker processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import write_result

from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.phantoms.ultrasound import example


def live(size: tuple[int, int], frames: int) -> dict[str, float]:
    t0 = time.perf_counter()
    src = SyntheticSource(SyntheticSettings(height=size[0], width=size[1]), fps=30.0)
    start_ms = (time.perf_counter() - t0) * 1e3
    loop = src.phantom.loop_frames
    first, again = [], []
    for i in range(min(frames, loop) + min(frames, loop)):
        t = time.perf_counter()
        src.frame_with_labels(i if i < min(frames, loop) else i - min(frames, loop) + loop)
        (first if i < min(frames, loop) else again).append((time.perf_counter() - t) * 1e3)
    return {
        "start_ms": round(start_ms, 1),
        "first_loop_ms_p50": round(statistics.median(first), 2),
        "first_loop_ms_max": round(max(first), 2),
        "replay_ms_p50": round(statistics.median(again), 3),
        "loop_frames": loop,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--frames", type=int, default=60, help="frames timed per size")
    p.add_argument("--examples", type=int, default=40, help="training examples timed")
    a = p.parse_args()
    results: dict[str, object] = {}
    for size in ((256, 256), (512, 512), (616, 820)):
        key = f"live_{size[0]}x{size[1]}"
        results[key] = live(size, a.frames)
        print(key, results[key])
    times = []
    for seed in range(10_000_000, 10_000_000 + a.examples):
        t = time.perf_counter()
        example(seed)
        times.append((time.perf_counter() - t) * 1e3)
    results["example_ms"] = {
        "p50": round(statistics.median(times), 1),
        "max": round(max(times), 1),
    }
    print("example", results["example_ms"])
    write_result("synthetic", results)


if __name__ == "__main__":
    main()
