"""The paper's Table 4 on this machine: whole-slide classification, echod against pyFAST.

1. echod's ``wsi`` job on a slide (a synthetic H&E phantom by default, or ``--slide``),
   run directly with a context of temporary folders: per patch the generator (reading,
   in a reader thread), the wait for it, NN input, inference, NN output and stitcher ms;
   the wall time per patch, patches per second and the time to the first patch.
2. Reading alone, on the job's own tissue patches, each way with the same number of
   readers: raw OpenSlide ``read_region`` on a thread pool (the ceiling), echod's
   :class:`PatchReader` (threads, bounded prefetch: what the job uses), and a process
   pool (each process its own OpenSlide handle, patches pickled back). Target: echod's
   reading at least 0.9 of raw OpenSlide's patches per second.
3. With pyFAST (``bench/setup_peers.sh`` makes ``.venv-peers``, with Debian's PoCL and
   libusb; or ``--pyfast DIR``, a venv or ``pip install --target`` folder): pyFAST's
   WholeSlideImageImporter -> TissueSegmentation (colour thresholding) -> PatchGenerator
   -> ImageToBatchGenerator -> NeuralNetwork -> PatchStitcher on the same slide, model,
   engine (ONNX Runtime, CPU) and batch, in a child process; once to warm its OpenCL
   kernel cache, then measured. Target: echod at least 2x FAST's patches per second.

    python bench/wsi_table4.py [--slide PATH | --width 8000 --height 6000 --seed 0]
                               [--batch 8] [--readers N] [--pyfast DIR]

Prints the tables and writes ``bench/results/wsi_table4.json``. Numbers, not asserts.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import PEERS, fast_python, write_result

from daemon.models import BUNDLED, WSI
from daemon.offline import slides
from daemon.offline.kind import FolderContext
from daemon.offline.wsi import WsiJob, WsiOptions

STAGES = ("generator", "wait", "nn_input", "inference", "nn_output", "stitcher", "total")


def run_echod(slide: Path, root: Path, batch: int, readers: int, engine: str | None) -> dict:
    out, work = root / "out", root / "work"
    out.mkdir(parents=True)
    work.mkdir()
    ctx = FolderContext(slide, out, work, WsiOptions(batch=batch, readers=readers), engine=engine)
    manifest = WsiJob().run(ctx)
    manifest["phases_s"] = {k: round(v, 3) for k, v in ctx.seconds.items()}
    return manifest


# -- reading alone ---------------------------------------------------------------------

_worker_slide: Any = None


def _open_in_worker(path: str) -> None:
    import openslide

    global _worker_slide
    _worker_slide = openslide.OpenSlide(path)


def _read_in_worker(args: tuple[int, int, int, int]) -> np.ndarray:
    x, y, level, side = args
    return np.asarray(_worker_slide.read_region((x, y), level, (side, side)).convert("RGB"))


def _rate(n: int, run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return n / (time.perf_counter() - t0)


def _cpu_ms(todo: list[tuple[int, int]], read: Callable[[tuple[int, int]], Any]) -> float:
    """CPU milliseconds of this thread per read (robust to a loaded machine)."""
    t0 = time.thread_time()
    for origin in todo:
        read(origin)
    return (time.thread_time() - t0) / len(todo) * 1e3


def reading(
    slide_path: Path, origins: list[tuple[int, int]], readers: int, prefetch: int, rounds: int = 5
) -> dict:
    """Patches per second, best of ``rounds`` interleaved: raw OpenSlide ``read_region`` on
    a thread pool, echod's PatchReader (threads), a process pool (one handle each); and
    echod over raw as the median of each round's pair (a shared machine's load moves
    both alike); and the CPU time of one read on one thread, raw and echod's."""
    import openslide

    todo = origins * max(1, -(-256 // max(1, len(origins))))  # at least 256 reads a round
    side = 512
    rates: dict[str, list[float]] = {
        k: [] for k in ("raw_openslide_threads", "echod_threads", "processes")
    }
    raw = openslide.OpenSlide(str(slide_path))
    spawn = mp.get_context("spawn")
    with (
        slides.open_slide(slide_path) as s,
        ThreadPoolExecutor(readers) as pool,
        ProcessPoolExecutor(
            readers, mp_context=spawn, initializer=_open_in_worker, initargs=(str(slide_path),)
        ) as procs,
    ):
        level = slides.resolve(s).level
        reader = slides.PatchReader(s, slides.resolve(s), side, pool, prefetch)
        jobs = [(x, y, level, side) for x, y in todo]
        list(procs.map(_read_in_worker, jobs[:readers]))  # start the workers first

        def raw_threads() -> None:
            for _ in pool.map(lambda o: raw.read_region(o, level, (side, side)), todo):
                pass

        def echod() -> None:
            for _ in reader.patches(todo):
                pass

        def processes(ex: Executor = procs) -> None:
            for _ in ex.map(_read_in_worker, jobs, chunksize=4):
                pass

        raw_threads()  # warm the page cache
        cpu: dict[str, list[float]] = {"raw": [], "echod": []}
        for _ in range(rounds):
            for key, run in zip(rates, (raw_threads, echod, processes), strict=True):
                rates[key].append(_rate(len(todo), run))
            cpu["raw"].append(_cpu_ms(todo, lambda o: raw.read_region(o, level, (side, side))))
            cpu["echod"].append(_cpu_ms(todo, reader.read))
    raw.close()
    result: dict[str, Any] = {"reads": len(todo), "readers": readers, "rounds": rounds}
    result |= {k: round(max(v), 1) for k, v in rates.items()}
    pairs = np.array(rates["echod_threads"]) / np.array(rates["raw_openslide_threads"])
    result["echod_over_raw"] = round(float(np.median(pairs)), 3)
    result["echod_over_raw_rounds"] = [round(float(r), 3) for r in pairs]
    cpu_ms = {k: float(np.median(v)) for k, v in cpu.items()}
    result["cpu_ms_per_read"] = {k: round(v, 3) for k, v in cpu_ms.items()}
    result["echod_over_raw_cpu"] = round(cpu_ms["raw"] / cpu_ms["echod"], 3)
    return result


# -- pyFAST, in a child process (bench/_pyfast_wsi.py) ------------------------------------


def run_fast(pyfast: Path | None, slide: Path, model: Path, batch: int) -> dict:
    python, env = fast_python(pyfast)
    env.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="fast-xdg-"))
    child = Path(__file__).resolve().parent / "_pyfast_wsi.py"
    proc = subprocess.run(
        [python, str(child), str(slide), str(model), str(batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _row(name: str, ms: dict[str, float], rate: float, first: float | None) -> str:
    cells = " ".join(f"{ms[s]:>10.2f}" if s in ms else f"{'-':>10}" for s in STAGES)
    return f"{name:>16} {cells} {rate:>10.1f} {'-' if first is None else f'{first:.3f}':>12}"


def _header() -> str:
    head = " ".join(f"{s:>10}" for s in STAGES)
    return f"{'per patch, ms':>16} {head} {'patches/s':>10} {'1st result s':>12}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slide", type=Path, help="a slide to use instead of a phantom")
    p.add_argument("--width", type=int, default=8000)
    p.add_argument("--height", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--readers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--engine", default=None, help="echod engine (default: best available)")
    p.add_argument("--pyfast", type=Path, help="pyFAST's venv or folder (.venv-peers)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slide = args.slide
        if slide is None:
            from daemon.phantoms.wsi import write_slide

            slide = root / "phantom.tiff"
            t0 = time.perf_counter()
            write_slide(slide, args.width, args.height, seed=args.seed)
            print(
                f"phantom {args.width} x {args.height} written in {time.perf_counter() - t0:.1f} s"
            )
        manifest = run_echod(slide, root / "echod", args.batch, args.readers, args.engine)
        t, n = manifest["timings"], manifest["patches"]["tissue"]
        whole = n / t["total_s"]  # the whole job, as FAST's figure below
        print(_header() + "   (total and patches/s: the whole job, tissue mask included)")
        ms = t["per_patch_ms"] | {"total": 1e3 / whole}
        print(_row("echod", ms, whole, t["time_to_first_result_s"]))
        print(f"echod: first patch read {t['time_to_first_patch_s']} s after the start")
        print(f"phases (s): {manifest['phases_s']}; patches: {manifest['patches']}")
        print(f"classes: { {k: v['patches'] for k, v in manifest['classes'].items()} }")

        with (root / "echod" / "out" / "patches.csv").open() as f:
            origins = [(int(r["x"]), int(r["y"])) for r in csv.DictReader(f)]
        reads = reading(slide, origins, args.readers, 2 * args.batch)
        print(
            f"reading ({reads['reads']} reads, {args.readers} readers, best of {reads['rounds']}), "
            f"patches/s: raw "
            f"OpenSlide {reads['raw_openslide_threads']}, echod {reads['echod_threads']} "
            f"({reads['echod_over_raw']:.2f} of raw, median of the rounds; target 0.9), "
            f"processes {reads['processes']}; CPU per read on one thread: raw "
            f"{reads['cpu_ms_per_read']['raw']} ms, echod {reads['cpu_ms_per_read']['echod']} ms "
            f"({reads['echod_over_raw_cpu']:.2f})"
        )
        result: dict[str, Any] = {
            "slide": str(args.slide) if args.slide else f"phantom {args.width}x{args.height}",
            "batch": args.batch,
            "echod": {
                k: manifest[k] for k in ("timings", "patches", "sampling", "model", "classes")
            }
            | {"phases_s": manifest["phases_s"]},
            "reading": reads,
        }
        if args.pyfast or PEERS.exists():
            fast = run_fast(args.pyfast, slide, BUNDLED / WSI, args.batch)
            result["fast"] = fast
            if "warm" in fast:
                w = fast["warm"]
                result["echod_over_fast"] = round(whole / w["patches_per_s"], 2)
                print(
                    _row("FAST (warm)", w["per_patch_ms"], w["patches_per_s"], w["first_batch_s"])
                )
                print(
                    f"FAST (warm): {w['patches']} patches in {w['wall_s']} s, first batch out "
                    f"{w['first_batch_s']} s, importer + tissue "
                    f"{w['importer_tissue_ms']} ms; cold run {fast['cold']['wall_s']} s"
                )
                print(
                    f"echod, whole job: {whole:.1f} patches/s = {result['echod_over_fast']}x "
                    "FAST's (target 2x)"
                )
            else:
                print(f"FAST did not run: {fast}")
    write_result("wsi_table4", result)


if __name__ == "__main__":
    main()
