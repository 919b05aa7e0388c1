"""The ``wsi`` job kind: classify a whole-slide image patch by patch (the paper's case 3).

``run`` opens the slide (:mod:`daemon.offline.slides`), picks the level for the target
resolution, computes the tissue mask on an overview, lays the patch grid over it and
classifies, in batches, the patches whose tissue fraction reaches ``tissue_fraction``,
reading them on a pool of threads ahead of the network. Each batch's probabilities go
to ``ctx.work`` and the batch is marked done, so a job that is interrupted resumes where
it stopped and gives the same outputs (:mod:`daemon.offline.wsi_outputs`). A slide with
no tissue is a result ("no tissue"), not an error.

The manifest has the paper's Table 4 per patch: ``generator`` (reading one patch, in a
reader thread), ``wait`` (what the network waited for reading), ``nn_input``,
``inference``, ``nn_output`` and ``stitcher``, the wall time per patch, patches per
second and the time to the first patch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from daemon.engines.card import ClassCard
from daemon.models import BUNDLED, WSI
from daemon.offline import slides
from daemon.offline.classifier import PatchClassifier
from daemon.offline.kind import (
    JobContext,
    KindOptions,
    ModelSpec,
    Plan,
    Unit,
    UnitKind,
    load_unit,
    save_unit,
)
from daemon.offline.slides import Grid, PatchReader, Sampling, Slide, TissueMethod
from daemon.offline.wsi_outputs import (
    Result,
    class_areas,
    read_png,
    thumbnail,
    write_csv,
    write_geojson,
    write_heatmap,
    write_png,
)

log = logging.getLogger(__name__)

Positive = Annotated[float, Field(gt=0)]

OUTPUTS = {
    "heatmap": "heatmap.tiff",
    "thumbnail": "thumbnail.png",
    "tissue_mask": "tissue.png",
    "geojson": "patches.geojson",
    "csv": "patches.csv",
}


class WsiOptions(KindOptions):
    """Options of a ``wsi`` job (``echod submit wsi PATH --mpp 0.5 --batch 8 ...``)."""

    mpp: Positive | None = Field(
        None, description="microns per pixel of the patches (default 0.5, i.e. 20x)"
    )
    magnification: Positive | None = Field(
        None, description="instead of mpp: objective magnification (20 means 0.5 um/px)"
    )
    batch: int = Field(8, ge=1, le=256, description="patches per inference")
    slide_mpp: Positive | None = Field(
        None, description="level-0 microns per pixel of a slide that does not say its own"
    )
    tissue: TissueMethod = Field(
        "saturation",
        description="tissue mask: saturation (H&E), darkness (weak stains) or fluorescence",
    )
    tissue_threshold: float | None = Field(
        None, ge=0, le=255, description="floor of Otsu's threshold, or fluorescence's (20)"
    )
    tissue_fraction: float = Field(
        0.5, ge=0, le=1, description="tissue a patch needs to be classified (0: every patch)"
    )
    tissue_radius: float = Field(
        16.0, ge=0, description="um: closing and opening of the tissue mask (0: none)"
    )
    readers: int = Field(0, ge=0, le=64, description="reading threads (0: one per core)")
    prefetch: int = Field(0, ge=0, description="patches read ahead (0: two batches)")
    thumbnail: int = Field(1024, ge=64, le=8192, description="long side of thumbnail.png")

    @model_validator(mode="after")
    def _one_target(self) -> WsiOptions:
        if self.mpp is not None and self.magnification is not None:
            raise ValueError("give mpp or magnification, not both")
        return self


class WsiJob(UnitKind):
    name: ClassVar[str] = "wsi"
    Options: ClassVar[type[KindOptions]] = WsiOptions

    @classmethod
    def check(cls, path: Path, options: Any) -> None:
        with slides.open_slide(path) as slide:
            slides.resolve(slide, options.mpp, options.magnification, options.slide_mpp)

    def run(self, ctx: JobContext) -> dict[str, Any]:
        """The local executor: one classifier, patches read ahead on a pool of threads."""
        t_start = time.perf_counter()
        opts: WsiOptions = ctx.options
        with ExitStack() as stack:
            slide, sampling, clf, pool, readers, prep = _open(ctx, stack)
            with ctx.phase("classify"):
                probs, timing = _classify(ctx, slide, sampling, clf, pool, prep, opts, t_start)
        return _finish(ctx, prep, probs, timing | {"readers": readers}, t_start)

    def plan(self, ctx: JobContext) -> Plan:
        """Batches of patches as units that read their patches from the slide themselves."""
        t_start = time.perf_counter()
        opts: WsiOptions = ctx.options
        with ExitStack() as stack:
            _, sampling, _, _, _, prep = _open(ctx, stack)
        units = [
            Unit(
                _unit(prep, i),
                classify_batch,
                (str(ctx.input), sampling, prep.origins(b), opts.readers or UNIT_READERS),
                len(b),
            )
            for i, b in enumerate(prep.batches)
        ]
        now = sum(u.size for u in units if not ctx.done(u.id))
        spec = ModelSpec("daemon.offline.wsi:load_classifier", str(_model(ctx)), *_engine(ctx))
        return Plan(spec, units, "patches", (prep, now, t_start))

    def assemble(self, ctx: JobContext, plan: Plan) -> dict[str, Any]:
        prep, now, t_start = plan.state
        probs = np.zeros((prep.grid.rows, prep.grid.cols, len(prep.classes)), np.float32)
        for unit, b in zip(plan.units, prep.batches, strict=True):
            probs[b[:, 0], b[:, 1]] = load_unit(ctx, unit.id)
        return _finish(ctx, prep, probs, {"classified_now": now}, t_start)


UNIT_READERS = 4  # threads reading one unit's patches on a Dask worker (readers = 0)


def load_classifier(model: Path, engine: str | None, device: str, threads: int) -> PatchClassifier:
    return PatchClassifier.open(model, engine, device, threads)


def classify_batch(
    clf: PatchClassifier,
    path: str,
    sampling: Sampling,
    origins: list[tuple[int, int]],
    readers: int,
) -> np.ndarray:
    """(n, classes) probabilities of the patches at level-0 ``origins`` of the slide at
    ``path`` (a unit of work: it opens the slide and reads its own patches)."""
    with slides.open_slide(Path(path)) as slide, ThreadPoolExecutor(readers) as pool:
        reader = PatchReader(slide, sampling, clf.size, pool, len(origins))
        with closing(reader.patches(origins)) as stream:
            patches = [p for p, _ in stream]
    return clf.finish(clf.infer(clf.prepare(patches)))


@dataclass
class _Prepared:
    """A job ready to classify: grid, tissue, the batches, what the outputs need."""

    slide: dict[str, Any]
    slide_name: str
    sampling: Sampling
    grid: Grid
    down: int
    overview: np.ndarray
    mask: np.ndarray
    cover: np.ndarray
    cells: np.ndarray
    batches: list[np.ndarray]
    plan: str  # the fingerprint in the batches' unit ids
    model: dict[str, Any]
    model_name: str
    classes: tuple[ClassCard, ...]
    size: int

    def origins(self, batch: np.ndarray) -> list[tuple[int, int]]:
        """Level-0 (x, y) of each patch of a batch of (row, col) cells."""
        s = self.grid.stride
        return [(round(int(c) * s), round(int(r) * s)) for r, c in batch]


def _model(ctx: JobContext) -> Path:
    return ctx.model or BUNDLED / WSI


def _engine(ctx: JobContext) -> tuple[str | None, str, int]:
    return ctx.engine, ctx.device, ctx.threads


def _unit(prep: _Prepared, i: int) -> str:
    return f"batch-{prep.plan}-{i:06d}"


def _prepare(
    ctx: JobContext,
    slide: Slide,
    sampling: Sampling,
    clf: PatchClassifier,
    pool: Executor,
    opts: WsiOptions,
) -> _Prepared:
    """Grid, tissue mask (or an earlier attempt's), the patches on tissue in batches."""
    grid = Grid(slide.width, slide.height, clf.size * sampling.downsample)
    down = slides.overview_downsample(slide, grid.stride)
    log.info(
        "%s: %d x %d, level %d for %.3g um/px, %d x %d patches of %d",
        slide.path.name, slide.width, slide.height, sampling.level, sampling.mpp,
        grid.cols, grid.rows, clf.size,
    )  # fmt: skip
    with ctx.phase("tissue"):
        overview, mask = _tissue(ctx, slide, sampling, down, pool, opts)
    cover = slides.coverage(mask, down, grid)
    cells = np.argwhere(cover >= opts.tissue_fraction)  # row-major (row, col)
    plan = _fingerprint(
        slide.describe(),
        sampling.describe(),
        clf.describe(),
        opts.batch,
        hashlib.sha1(cells.tobytes()).hexdigest(),
    )
    return _Prepared(
        slide=slide.describe(),
        slide_name=slide.path.name,
        sampling=sampling,
        grid=grid,
        down=down,
        overview=overview,
        mask=mask,
        cover=cover,
        cells=cells,
        batches=[cells[i : i + opts.batch] for i in range(0, len(cells), opts.batch)],
        plan=plan,
        model=clf.describe(),
        model_name=clf.model.name,
        classes=clf.classes,
        size=clf.size,
    )


def _finish(
    ctx: JobContext,
    prep: _Prepared,
    probs: np.ndarray,
    timing: dict[str, Any],
    t_start: float,
) -> dict[str, Any]:
    """Write the outputs from the grid's probabilities; the manifest."""
    opts: WsiOptions = ctx.options
    grid, cells, sampling = prep.grid, prep.cells, prep.sampling
    classified = np.zeros((grid.rows, grid.cols), bool)
    classified[cells[:, 0], cells[:, 1]] = True
    result = Result(grid, probs, classified, prep.cover, prep.classes)
    with ctx.phase("outputs"):
        _write_outputs(ctx.output, prep, result, opts)
    manifest = {
        "kind": WsiJob.name,
        "result": "classified" if len(cells) else "no tissue",
        "outputs": dict(OUTPUTS),
        "slide": prep.slide,
        "sampling": sampling.describe(),
        "model": prep.model,
        "patches": {
            "size": prep.size,
            "stride": round(grid.stride, 3),
            "grid": [grid.rows, grid.cols],
            "tissue": len(cells),
            "classified_now": timing.pop("classified_now"),
            "readers": timing.pop("readers", None),
        },
        "tissue": {
            "method": opts.tissue,
            "fraction": opts.tissue_fraction,
            "overview_downsample": prep.down,
            "area_mm2": round(
                float(prep.mask.sum()) * (sampling.slide_mpp * prep.down * 1e-3) ** 2, 4
            ),
        },
        "classes": class_areas(result, sampling.slide_mpp),
        "timings": timing | {"total_s": round(time.perf_counter() - t_start, 3)},
    }
    if not len(cells):
        manifest["message"] = (
            f"no tissue found in {prep.slide_name} (tissue {opts.tissue}, "
            f"tissue_fraction {opts.tissue_fraction}): nothing was classified"
        )
        log.warning("%s", manifest["message"])
    return manifest


def _open(ctx: JobContext, stack: ExitStack) -> tuple[Any, Any, Any, Any, int, Any]:
    """The slide, its sampling, the classifier, the reading pool and the prepared grid
    (tissue mask, cells), shared by the local run and the Dask plan; closed by ``stack``."""
    opts: WsiOptions = ctx.options
    slide = stack.enter_context(slides.open_slide(ctx.input))
    sampling = slides.resolve(slide, opts.mpp, opts.magnification, opts.slide_mpp)
    clf = stack.enter_context(load_classifier(_model(ctx), *_engine(ctx)))
    readers = opts.readers or os.cpu_count() or 1
    pool = stack.enter_context(ThreadPoolExecutor(readers, thread_name_prefix="wsi-read"))
    prep = _prepare(ctx, slide, sampling, clf, pool, opts)
    return slide, sampling, clf, pool, readers, prep


def _fingerprint(*parts: Any) -> str:
    """A short hash of what a unit's result depends on (a unit of another plan never matches)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _tissue(
    ctx: JobContext,
    slide: Slide,
    sampling: Sampling,
    down: int,
    pool: Executor,
    opts: WsiOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """The overview (RGB) and the tissue mask on it: from ``ctx.work`` when an earlier
    attempt made them."""
    unit = "tissue-" + _fingerprint(
        slide.describe(), down, opts.tissue, opts.tissue_threshold, opts.tissue_radius
    )
    ov_path, mask_path = ctx.work / f"{unit}-overview.png", ctx.work / f"{unit}-mask.png"
    if ctx.done(unit):
        return read_png(ov_path, rgb=True), (read_png(mask_path, rgb=False) > 0).astype(np.uint8)
    overview = slides.read_overview(
        slide, down, pool, lambda done, total: ctx.progress(done, total, "tissue")
    )
    radius = round(opts.tissue_radius / (sampling.slide_mpp * down))
    mask = slides.tissue_mask(overview, opts.tissue, opts.tissue_threshold, radius)
    for path, img in ((ov_path, overview), (mask_path, mask * 255)):
        tmp = path.with_suffix(".tmp.png")
        write_png(tmp, img)
        tmp.replace(path)
    ctx.mark(unit)
    return overview, mask


def _classify(
    ctx: JobContext,
    slide: Slide,
    sampling: Sampling,
    clf: PatchClassifier,
    pool: Executor,
    prep: _Prepared,
    opts: WsiOptions,
    t_start: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Probabilities on the grid (rows, cols, classes), batch by batch, resuming the
    batches an earlier attempt finished; and the timings of the patches classified now."""
    grid, cells, batches = prep.grid, prep.cells, prep.batches
    n_cls = len(clf.classes)
    probs = np.zeros((grid.rows, grid.cols, n_cls), np.float32)
    todo: list[int] = []
    for i, b in enumerate(batches):
        unit = _unit(prep, i)
        if ctx.done(unit):
            probs[b[:, 0], b[:, 1]] = load_unit(ctx, unit)
        else:
            todo.append(i)
    done = len(cells) - sum(len(batches[i]) for i in todo)
    ctx.progress(done, len(cells), "patches")
    reader = PatchReader(slide, sampling, clf.size, pool, opts.prefetch or 2 * opts.batch)
    origins = (xy for i in todo for xy in prep.origins(batches[i]))
    sums = dict.fromkeys(
        ("generator", "wait", "nn_input", "inference", "nn_output", "stitcher"), 0.0
    )
    first_patch: float | None = None
    first_result: float | None = None
    t0 = time.perf_counter()
    with closing(reader.patches(origins)) as stream:
        for i in todo:
            b = batches[i]
            ta = time.perf_counter()
            got = []
            for _ in range(len(b)):
                got.append(next(stream))
                if first_patch is None:
                    first_patch = time.perf_counter() - t_start
            tb = time.perf_counter()
            x = clf.prepare([p for p, _ in got])
            tc = time.perf_counter()
            y = clf.infer(x)
            td = time.perf_counter()
            p = clf.finish(y)
            te = time.perf_counter()
            probs[b[:, 0], b[:, 1]] = p
            tf = time.perf_counter()
            save_unit(ctx, _unit(prep, i), p)
            if first_result is None:
                first_result = time.perf_counter() - t_start
            sums["generator"] += sum(s for _, s in got)
            sums["wait"] += tb - ta
            sums["nn_input"] += tc - tb
            sums["inference"] += td - tc
            sums["nn_output"] += te - td
            sums["stitcher"] += tf - te
            done += len(b)
            ctx.progress(done, len(cells), "patches")
    wall = time.perf_counter() - t0
    n = sum(len(batches[i]) for i in todo)
    per_patch = {k: round(v / n * 1e3, 3) for k, v in sums.items()} if n else {}
    timing: dict[str, Any] = {
        "classified_now": n,
        "per_patch_ms": per_patch | ({"total": round(wall / n * 1e3, 3)} if n else {}),
        "patches_per_s": round(n / wall, 2) if n else None,
        "time_to_first_patch_s": None if first_patch is None else round(first_patch, 3),
        "time_to_first_result_s": None if first_result is None else round(first_result, 3),
        "classify_s": round(wall, 3),
    }
    return probs, timing


def _write_outputs(out: Path, prep: _Prepared, result: Result, opts: WsiOptions) -> None:
    names = ", ".join(f"{i} {c.name}" for i, c in enumerate(prep.classes))
    down = prep.down
    description = (
        f"echod WSI heatmap of {prep.slide_name}: model {prep.model_name} (classes {names}); "
        f"one pixel is {down} x {down} slide level-0 pixels; colour: class, white: none"
    )
    write_heatmap(out / OUTPUTS["heatmap"], result, down, prep.sampling.slide_mpp, description)
    write_png(out / OUTPUTS["thumbnail"], thumbnail(prep.overview, down, result, opts.thumbnail))
    write_png(out / OUTPUTS["tissue_mask"], prep.mask * 255)
    write_geojson(out / OUTPUTS["geojson"], result)
    write_csv(out / OUTPUTS["csv"], result)
