"""WSI patches per second on a Dask ``LocalCluster`` of 1, 2, 4, 8 ... worker processes.

echod's ``wsi`` job (a synthetic H&E phantom by default, or ``--slide``) runs through
the Dask executor, each worker one thread, one engine thread and ``--readers`` reading
threads; the tissue step is done once beforehand (its checkpoint is reused) and every
worker has loaded the model before the clock starts (``DaskExecutor.warm``), so the
figures are classification only: patches/s over the job's cluster phase (units out,
results saved) and scaling efficiency (patches/s at n workers / (n x at 1 worker);
target at least 0.8 at 4 workers); ``wall_s`` adds planning and writing the outputs.
``--device cuda`` gives the workers the GPU (each worker its own engine on it), e.g.
with the PyTorch engine and the classifier as ``.pt2``
(``daemon.engines.reference.export_torch``).

    python bench/wsi_dask_scaling.py [--slide PATH | --width 12000 --height 9000]
                                     [--workers 1,2,4,8] [--batch 16] [--readers 1]
                                     [--device cpu] [--engine NAME] [--model PATH]
                                     [--name wsi_dask_scaling]

Prints a table and writes ``bench/results/NAME.json``. Numbers, not asserts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import write_result

from daemon.offline.dask_executor import DaskExecutor
from daemon.offline.kind import FolderContext
from daemon.offline.wsi import WsiJob, WsiOptions
from daemon.phantoms.wsi import write_slide


def main() -> None:
    from distributed import LocalCluster

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path)
    p.add_argument("--width", type=int, default=12000)
    p.add_argument("--height", type=int, default=9000)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--readers", type=int, default=1, help="reading threads per unit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", help="engine on the workers (default: the best on --device)")
    p.add_argument("--model", type=Path, help="classifier (default: the bundled one)")
    p.add_argument("--name", default="wsi_dask_scaling", help="result file's name")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wsi-dask-"))
    slide = args.slide
    if slide is None:
        slide = root / "phantom.tiff"
        write_slide(slide, args.width, args.height, seed=0)
    opts = WsiOptions(batch=args.batch, readers=args.readers)
    work = root / "work"
    work.mkdir()

    def context(name: str, marked: set[str]) -> FolderContext:
        ctx = FolderContext(
            slide, root / name, work, opts, args.model, args.engine, args.device, threads=1
        )
        ctx.marked = set(marked)
        ctx.output.mkdir()
        return ctx

    tissue = context("o", set())
    plan = WsiJob().plan(tissue)  # the tissue mask once: every run below reuses it
    keep = {u for u in tissue.marked if u.startswith("tissue-")}
    patches = sum(u.size for u in plan.units)
    rows = []
    for n in (int(v) for v in args.workers.split(",")):
        with LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            ex = DaskExecutor("dask://" + cluster.scheduler_address.removeprefix("tcp://"))
            t0 = time.perf_counter()
            ex.warm(plan.model)  # every worker loads the model before the clock starts
            warm = time.perf_counter() - t0
            ctx = context(f"r{n}", keep)
            t0 = time.perf_counter()
            ex.run(WsiJob(), ctx)
            wall = time.perf_counter() - t0
            for f in work.glob("batch-*"):
                f.unlink()
            ex.close()
        secs = ctx.seconds["cluster"]
        rows.append({"workers": n, "patches": patches, "units": len(plan.units),
                     "s": round(secs, 2), "patches_per_s": round(patches / secs, 2),
                     "wall_s": round(wall, 2), "warm_s": round(warm, 2)})  # fmt: skip
    base = rows[0]["patches_per_s"] / rows[0]["workers"]
    for r in rows:
        r["efficiency"] = round(r["patches_per_s"] / (r["workers"] * base), 3)
    print(
        f"{'WORKERS':>8} {'PATCHES':>8} {'S':>8} {'PATCHES/S':>10} {'EFFICIENCY':>10} {'WALL S':>8}"
    )
    for r in rows:
        print(f"{r['workers']:>8} {r['patches']:>8} {r['s']:>8} {r['patches_per_s']:>10} "
              f"{r['efficiency']:>10} {r['wall_s']:>8}")  # fmt: skip
    write_result(
        args.name,
        {
            "slide": str(args.slide) if args.slide else f"phantom {args.width} x {args.height}",
            "device": args.device,
            "engine": args.engine,
            "model": str(args.model or "bundled"),
            "batch": args.batch,
            "readers": args.readers,
            "rows": rows,
        },
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
