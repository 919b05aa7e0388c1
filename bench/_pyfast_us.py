"""pyFAST's ultrasound segmentation pipeline, for bench/us_table1.py (run as a child with
pyFAST on PYTHONPATH; imports nothing of echod's, so FAST's own libraries load alone).

    python bench/_pyfast_us.py 'FOLDER/frame_#.mhd' MODEL ENGINE   # prints one JSON line

Every frame is processed (ImageFileStreamer without timestamps, as fast as it goes);
frames/s is counted from the first segmentation to the last (the model load and
FAST's OpenCL build are before it), the best of two runs.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import fast

    pattern, model, engine = sys.argv[1:4]
    runs = []
    for _ in range(2):
        streamer = fast.ImageFileStreamer.create(pattern, loop=False, useTimestamps=False)
        streamer.setStreamingMode(fast.StreamingMode_ProcessAllFrames)
        nn = fast.SegmentationNetwork.create(
            model, scaleFactor=1 / 255, inferenceEngine=engine
        ).connect(streamer)
        n, first, t0 = 0, 0.0, time.perf_counter()
        for _ in fast.DataStream(nn):
            n += 1
            if n == 1:
                first = time.perf_counter()
        wall = time.perf_counter() - first
        runs.append({"frames": n, "fps": (n - 1) / wall, "total_s": time.perf_counter() - t0})
    best = max(runs, key=lambda r: r["fps"])
    print(json.dumps({"fast": fast.__version__ if hasattr(fast, "__version__") else "4", **best}))


if __name__ == "__main__":
    main()
