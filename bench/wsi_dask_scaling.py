"""WSI patches per second on a Dask ``LocalCluster`` of 1, 2, 4, 8 ... worker processes.

echod's ``wsi`` job (a synthetic H&E phantom by default, or ``--slide``) runs through
the Dask executor, each worker one thread and one engine thread; the tissue step is
done once beforehand (its checkpoint is reused), so the figures are classification
only: patches/s and scaling efficiency (patches/s at n workers / (n x at 1 worker);
target at least 0.8 at 4 workers). ``--device cuda`` gives the workers the GPU (each
worker its own engine on it).

    python bench/wsi_dask_scaling.py [--slide PATH | --width 12000 --height 9000]
                                     [--workers 1,2,4,8] [--batch 16] [--device cpu]

Prints a table and writes ``bench/results/wsi_dask_scaling.json``. Numbers, not asserts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import write_result

from daemon.offline.dask_executor import DaskExecutor
from daemon.offline.wsi import WsiJob, WsiOptions
from daemon.phantoms.wsi import write_slide


@dataclass
class Ctx:
    input: Path
    output: Path
    work: Path
    options: WsiOptions
    device: str
    model: Path | None = None
    engine: str | None = None
    threads: int = 1
    marked: set[str] = field(default_factory=set)

    def done(self, unit: str) -> bool:
        return unit in self.marked

    def mark(self, unit: str) -> None:
        self.marked.add(unit)

    def progress(self, done: int, total: int, what: str) -> None:
        pass

    @contextmanager
    def phase(self, name: str) -> Any:
        yield


def main() -> None:
    from distributed import LocalCluster

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path)
    p.add_argument("--width", type=int, default=12000)
    p.add_argument("--height", type=int, default=9000)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wsi-dask-"))
    slide = args.slide
    if slide is None:
        slide = root / "phantom.tiff"
        write_slide(slide, args.width, args.height, seed=0)
    opts = WsiOptions(batch=args.batch, readers=1)
    work = root / "work"
    work.mkdir()
    tissue = Ctx(slide, root / "o", work, opts, args.device)
    tissue.output.mkdir()
    plan = WsiJob().plan(tissue)  # the tissue mask once: every run below reuses it
    keep = {u for u in tissue.marked if u.startswith("tissue-")}
    rows = []
    for n in (int(v) for v in args.workers.split(",")):
        with LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            ex = DaskExecutor("dask://" + cluster.scheduler_address.removeprefix("tcp://"))
            warm = Ctx(slide, root / f"w{n}", work, opts, args.device, marked=set(keep))
            warm.output.mkdir()
            ex.run(WsiJob(), warm)  # loads the model on every worker it reaches
            for f in work.glob("batch-*"):
                f.unlink()
            ctx = Ctx(slide, root / f"r{n}", work, opts, args.device, marked=set(keep))
            ctx.output.mkdir()
            t0 = time.perf_counter()
            ex.run(WsiJob(), ctx)
            wall = time.perf_counter() - t0
            for f in work.glob("batch-*"):
                f.unlink()
            ex.close()
        patches = sum(u.size for u in plan.units)
        rows.append({"workers": n, "patches": patches, "s": round(wall, 2),
                     "patches_per_s": round(patches / wall, 2)})  # fmt: skip
    base = rows[0]["patches_per_s"] / rows[0]["workers"]
    for r in rows:
        r["efficiency"] = round(r["patches_per_s"] / (r["workers"] * base), 3)
    print(f"{'WORKERS':>8} {'PATCHES':>8} {'S':>8} {'PATCHES/S':>10} {'EFFICIENCY':>10}")
    for r in rows:
        print(f"{r['workers']:>8} {r['patches']:>8} {r['s']:>8} {r['patches_per_s']:>10} "
              f"{r['efficiency']:>10}")  # fmt: skip
    write_result("wsi_dask_scaling", {"device": args.device, "batch": args.batch, "rows": rows})
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
