"""Synthetic whole-slide writer: a 50,000 x 40,000 slide, its time and peak memory.

A child process writes the slide (daemon/phantoms/wsi.py: tissue rendered tile
by tile, a JPEG-tiled pyramidal BigTIFF); the parent reads the child's peak
resident memory (``ru_maxrss``), then opens the file with OpenSlide and
reports its levels, microns per pixel and a read of each level.

    python bench/wsi_writer.py [--width 50000 --height 40000] [--seed 0] [--keep PATH]

Prints a table and writes ``bench/results/wsi_writer.json``. Target (not
asserted): peak RSS of the writer under 2 GiB whatever the slide's size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from daemon.phantoms.wsi import CLASSES, GLASS, write_slide


def _write(path: str, width: int, height: int, seed: int, out: Any) -> None:
    t0 = time.perf_counter()
    truth = write_slide(Path(path), width, height, seed)
    counts = np.bincount(truth.class_map.ravel(), minlength=len(CLASSES) + 1)
    out.send(
        {
            "write_s": round(time.perf_counter() - t0, 1),
            "levels_written": [list(s) for s in truth.levels],
            "class_map_shape": list(truth.class_map.shape),
            "tissue_fraction": round(float(1 - counts[GLASS] / counts.sum()), 3),
            "class_fractions": {
                c: round(float(counts[i + 1] / counts.sum()), 3) for i, c in enumerate(CLASSES)
            },
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=50_000)
    p.add_argument("--height", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="write the slide here and keep it")
    args = p.parse_args()

    import openslide

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "slide.tiff"
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_write, args=(str(path), args.width, args.height, args.seed, send)
        )
        child.start()
        result = recv.recv()
        child.join()
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        slide = openslide.OpenSlide(str(path))
        reads = {}
        for level, (w, h) in enumerate(slide.level_dimensions):
            t0 = time.perf_counter()
            region = slide.read_region((0, 0), level, (min(w, 2048), min(h, 2048)))
            reads[level] = round((time.perf_counter() - t0) * 1e3, 1)
            region.close()
        result |= {
            "width": args.width,
            "height": args.height,
            "seed": args.seed,
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "peak_rss_mib": round(peak_mib, 1),
            "openslide_levels": [list(d) for d in slide.level_dimensions],
            "openslide_downsamples": [round(d, 3) for d in slide.level_downsamples],
            "mpp": [
                float(slide.properties["openslide.mpp-x"]),
                float(slide.properties["openslide.mpp-y"]),
            ],
            "vendor": slide.properties.get("openslide.vendor"),
            "read_2048_ms_per_level": reads,
        }
        slide.close()
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    print(f"{'target':>24}: peak RSS < 2048 MiB -> {'met' if peak_mib < 2048 else 'NOT met'}")
    write_result("wsi_writer", result)


if __name__ == "__main__":
    main()
