"""Control socket round trip of ``ping`` and ``status`` (p50, p99) while frames stream.

Starts ``echod run`` (synthetic source at 30 fps, the 2-D U-Net, headless) as a
real process and times requests from this process over the ipc socket.
Target: ``status`` p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import write_result

from daemon.ctl import Client, CtlError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    runtime = tempfile.mkdtemp(prefix="echod-bench-")
    endpoint = f"ipc://{runtime}/control.sock"
    env = {**os.environ, "RUNTIME_DIRECTORY": runtime}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--pace", "fps", "--fps", "30"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = Client(endpoint, timeout_s=2.0)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if (client.call("status")["frames_out"] or 0) > 30:
                    break
            except CtlError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("echod did not start streaming within 120 s")
            time.sleep(0.2)
        result: dict[str, dict[str, float]] = {}
        for cmd in ("ping", "status"):
            times = []
            for _ in range(args.requests):
                t = time.perf_counter()
                client.call(cmd)
                times.append((time.perf_counter() - t) * 1e3)
            p50, p99 = np.percentile(times, [50, 99])
            result[cmd] = {
                "p50_ms": round(float(p50), 3),
                "p99_ms": round(float(p99), 3),
                "n": len(times),
            }
            print(f"{cmd:<7} p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({len(times)} requests)")
        streaming = client.call("status")
        print(f"while streaming at {streaming['fps']:.1f} fps (status p99 target <= 5 ms)")
        write_result("control_rtt", {**result, "stream_fps": streaming["fps"]})
    finally:
        client.close()
        daemon.terminate()
        daemon.wait(30)


if __name__ == "__main__":
    main()
