"""The ``wsi`` job kind, run directly with a context of real folders (no job system):
the real SVS end to end, synthetic slides against their ground truth, resume after an
interruption, the tifffile fallback, level choice, and bad input."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile

from daemon.errors import ModelError
from daemon.models import BUNDLED, ULTRASOUND
from daemon.offline import slides
from daemon.offline.kind import Cancelled, JobInputError
from daemon.offline.kind import FolderContext as Ctx
from daemon.offline.wsi import OUTPUTS, WsiJob, WsiOptions
from daemon.phantoms.wsi import CLASSES, GLASS, Slide, write_slide
from tests.conftest import DATA, need_data

openslide = pytest.importorskip("openslide")

CMU = DATA / "wsi" / "CMU-1-Small-Region.svs"
SMALL = (3072, 2560, 21)  # width, height, seed: a few dozen patches of 512


def cancel_after_batches(n: int) -> Callable[[Ctx, int, int, str], None]:
    """An ``on_progress`` that cancels the run once ``n`` batches are marked."""

    def cancel(ctx: Ctx, done: int, total: int, what: str) -> None:
        if sum(u.startswith("batch-") for u in ctx.marked) >= n:
            raise Cancelled("stopped by the test")

    return cancel


def context(path: Path, root: Path, work: Path | None = None, **options: Any) -> Ctx:
    out = root / "out"
    out.mkdir(parents=True)
    if work is None:
        work = root / "work"
        work.mkdir()
    return Ctx(path, out, work, WsiOptions(**options))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w, h, seed = SMALL
    path = tmp_path_factory.mktemp("slide") / "phantom.tiff"
    write_slide(path, w, h, seed=seed, smallest=256)
    return path


def test_the_real_svs_end_to_end(tmp_path: Path) -> None:
    ctx = context(need_data(CMU), tmp_path)
    m = WsiJob().run(ctx)
    assert m["result"] == "classified"
    assert sorted(p.name for p in ctx.output.iterdir()) == sorted(OUTPUTS.values())
    width, height, mpp = m["slide"]["width"], m["slide"]["height"], m["slide"]["mpp"]
    assert (width, height) == (2220, 2967) and mpp == pytest.approx(0.499)
    assert m["sampling"]["level"] == 0 and not m["sampling"]["resized"]
    n = m["patches"]["tissue"]
    assert 0 < n <= m["patches"]["grid"][0] * m["patches"]["grid"][1]
    assert sum(c["patches"] for c in m["classes"].values()) == n
    assert sum(c["area_mm2"] for c in m["classes"].values()) > 0

    down = m["tissue"]["overview_downsample"]
    with openslide.OpenSlide(str(ctx.output / "heatmap.tiff")) as heat:
        assert heat.dimensions == (-(-width // down), -(-height // down))
        assert float(heat.properties["openslide.mpp-x"]) == pytest.approx(mpp * down, rel=1e-3)
        assert heat.level_count >= 2
        assert np.asarray(heat.get_thumbnail((64, 64))).std() > 0  # not blank
    mask = cv2.imread(str(ctx.output / "tissue.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (-(-height // down), -(-width // down))
    thumb = cv2.imread(str(ctx.output / "thumbnail.png"))
    assert max(thumb.shape[:2]) == 1024
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(width / height, rel=0.01)

    features = json.loads((ctx.output / "patches.geojson").read_text())["features"]
    assert len(features) == n
    for f in features:
        xy = np.array(f["geometry"]["coordinates"][0])
        assert (xy >= 0).all() and (xy[:, 0] <= width).all() and (xy[:, 1] <= height).all()
        assert f["properties"]["objectType"] == "tile"
        assert f["properties"]["classification"]["name"] in CLASSES
    rows = list(csv.DictReader((ctx.output / "patches.csv").open()))
    assert len(rows) == n
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-3)


def _accuracy(csv_path: Path, truth: np.ndarray, cell: int) -> float:
    """Fraction of classified patches whose class is the most common tissue class under them."""
    hits = []
    for r in csv.DictReader(csv_path.open()):
        x, y, w, h = (int(r[k]) for k in ("x", "y", "width", "height"))
        block = truth[y // cell : -(-(y + h) // cell), x // cell : -(-(x + w) // cell)]
        tissue = block[block != GLASS]
        if tissue.size:
            hits.append(CLASSES[np.bincount(tissue).argmax() - 1] == r["class"])
    assert hits, "no classified patch lies on tissue"
    return float(np.mean(hits))


def test_a_phantom_slide_is_classified_against_its_ground_truth(
    phantom: Path, tmp_path: Path
) -> None:
    ctx = context(phantom, tmp_path, batch=4)
    m = WsiJob().run(ctx)
    w, h, seed = SMALL
    assert m["patches"]["tissue"] >= 8
    assert _accuracy(ctx.output / "patches.csv", Slide(w, h, seed).class_map(64), 64) >= 0.9
    t = m["timings"]
    assert set(t["per_patch_ms"]) == {
        "generator", "wait", "nn_input", "inference", "nn_output", "stitcher", "total",
    }  # fmt: skip
    assert t["patches_per_s"] > 0 and 0 < t["time_to_first_patch_s"] <= t["total_s"]
    done = [d for d, _, what in ctx.calls if what == "patches"]
    assert done == sorted(done) and done[-1] == m["patches"]["tissue"]


def test_an_interrupted_job_resumes_and_gives_the_same_outputs(
    phantom: Path, tmp_path: Path
) -> None:
    whole = context(phantom, tmp_path / "whole", batch=2)
    reference = WsiJob().run(whole)
    assert reference["patches"]["tissue"] > 6  # more than three batches

    first = context(phantom, tmp_path / "first", batch=2)
    first.on_progress = cancel_after_batches(2)
    with pytest.raises(Cancelled):
        WsiJob().run(first)
    assert sum(u.startswith("batch-") for u in first.marked) == 2
    second = context(phantom, tmp_path / "second", work=first.work, batch=2)
    second.marked = set(first.marked)
    resumed = WsiJob().run(second)
    assert resumed["patches"]["classified_now"] == reference["patches"]["tissue"] - 4
    assert resumed["classes"] == reference["classes"]
    for name in ("patches.csv", "patches.geojson", "tissue.png", "thumbnail.png"):
        assert (second.output / name).read_bytes() == (whole.output / name).read_bytes(), name
    a = tifffile.imread(second.output / "heatmap.tiff")
    assert np.array_equal(a, tifffile.imread(whole.output / "heatmap.tiff"))


def test_level_choice_reads_a_matching_level_as_it_is_and_resizes_otherwise(
    phantom: Path,
) -> None:
    with slides.open_slide(phantom) as s:
        assert [lv.downsample for lv in s.levels][:2] == [1.0, 4.0] and s.mpp == 0.5
        at_2um = slides.resolve(s, mpp=2.0)
        assert (at_2um.level, at_2um.scale, at_2um.resized) == (1, 1.0, False)
        near = slides.resolve(s, mpp=2.08)  # within the 5 % tolerance of level 1
        assert (near.level, near.downsample) == (1, 4.0)
        at_1um = slides.resolve(s, mpp=1.0)  # between levels: the finer one, halved
        assert (at_1um.level, at_1um.scale, at_1um.resized) == (0, 2.0, True)
        at_5x = slides.resolve(s, magnification=5)
        assert (at_5x.level, at_5x.mpp) == (1, 2.0)
        assert slides.resolve(s).mpp == 0.5  # default 20x
        with pytest.raises(JobInputError, match=r"gives at most 20x .* ask for 20x"):
            slides.resolve(s, magnification=40)


def test_a_level_that_does_not_match_is_read_finer_and_resized(
    phantom: Path, tmp_path: Path
) -> None:
    ctx = context(phantom, tmp_path, mpp=1.0)
    m = WsiJob().run(ctx)
    assert m["sampling"] == pytest.approx(
        {"level": 0, "level_downsample": 1.0, "downsample": 2.0, "resized": True,
         "slide_mpp": 0.5, "mpp": 1.0, "magnification": 10.0}
    )  # fmt: skip
    assert m["patches"]["stride"] == 1024 and m["patches"]["tissue"] > 0


def test_a_tiled_tiff_openslide_rejects_is_read_through_tifffile(tmp_path: Path) -> None:
    w, h, seed = 1800, 1300, 5
    image = Slide(w, h, seed).render(0, 0, h, w)
    webp = tmp_path / "webp.tiff"
    with tifffile.TiffWriter(webp) as tif:
        for level, img in enumerate((image, image[::4, ::4])):
            tif.write(
                img, tile=(256, 256), photometric="rgb", compression="webp",
                compressionargs={"lossless": True, "method": 0}, subfiletype=1 if level else 0,
                resolution=(1e4 / (0.5 * 4**level),) * 2, resolutionunit="CENTIMETER",
            )  # fmt: skip
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(webp))
    with slides.open_slide(webp) as s:
        assert s.reader == "tifffile" and s.mpp == pytest.approx(0.5)
        assert [(lv.width, lv.height) for lv in s.levels] == [(w, h), (450, 325)]
        assert np.array_equal(s.region(300, 200, 0, 700, 600), image[200:800, 300:1000])
        edge = s.region(1600, 1200, 0, 300, 200)  # past the corner: white
        assert np.array_equal(edge[:100, :200], image[1200:, 1600:])
        assert (edge[100:] == 255).all() and (edge[:, 200:] == 255).all()
        assert np.array_equal(s.region(400, 400, 1, 100, 50), image[::4, ::4][100:150, 100:200])
    m = WsiJob().run(context(webp, tmp_path / "job"))
    assert m["slide"]["reader"] == "tifffile" and m["patches"]["tissue"] > 0


def test_the_same_deflate_tiff_reads_the_same_through_openslide_and_tifffile(
    tmp_path: Path,
) -> None:
    image = Slide(1100, 900, 8).render(0, 0, 900, 1100)
    path = tmp_path / "deflate.tiff"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    with slides.OpenSlideSlide(path) as a, slides.TiffSlide(path) as b:
        for x, y, w, h in ((0, 0, 512, 512), (700, 500, 512, 512), (-10, 880, 64, 64)):
            assert np.array_equal(a.region(x, y, 0, w, h), b.region(x, y, 0, w, h)), (x, y)


def test_the_reader_stays_at_most_prefetch_patches_ahead(phantom: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls: list[tuple[int, int]] = []

    class Counting(slides.OpenSlideSlide):
        def region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
            calls.append((x, y))
            return super().region(x, y, level, w, h)

    origins = [(i * 64, 0) for i in range(20)]
    with Counting(phantom) as s, ThreadPoolExecutor(4) as pool:
        reader = slides.PatchReader(s, slides.resolve(s), 64, pool, prefetch=3)
        stream = reader.patches(origins)
        got = [next(stream) for _ in range(5)]
        deadline = time.monotonic() + 10
        while len(calls) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the pool's progress, bounded by the deadline
        assert len(calls) == 8  # 5 handed out + 3 ahead, never more
        rest = list(stream)
    assert len(got) + len(rest) == 20 and sorted(calls) == origins
    assert all(p.shape == (64, 64, 3) for p, _ in got + rest)


def test_a_slide_without_tissue_is_a_result_not_an_error(tmp_path: Path) -> None:
    blank = tmp_path / "glass.tiff"
    glass = np.full((1500, 2000, 3), 246, np.uint8)
    glass += np.random.default_rng(0).integers(0, 4, glass.shape, dtype=np.uint8)
    tifffile.imwrite(
        blank, glass, tile=(256, 256), photometric="rgb", compression="jpeg",
        resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
    )  # fmt: skip
    ctx = context(blank, tmp_path / "job")
    m = WsiJob().run(ctx)
    assert m["result"] == "no tissue" and "no tissue found in glass.tiff" in m["message"]
    assert m["patches"]["tissue"] == 0 and m["tissue"]["area_mm2"] == 0
    assert sorted(p.name for p in ctx.output.iterdir()) == sorted(OUTPUTS.values())
    assert json.loads((ctx.output / "patches.geojson").read_text())["features"] == []


def test_fluorescence_tissue_is_bright_on_dark() -> None:
    dark = np.full((64, 64, 3), 4, np.uint8)
    dark[10:40, 20:50, 1] = 90  # a green-glowing section
    mask = slides.tissue_mask(dark, "fluorescence", None, 0)
    assert mask.sum() == 30 * 30 and mask[10:40, 20:50].all()
    assert not slides.tissue_mask(dark, "saturation", None, 0)[:10].any()


def _truncated(src: Path, dest: Path, size: int) -> Path:
    dest.write_bytes(src.read_bytes()[:size])
    return dest


@pytest.mark.parametrize("keep", [0.6, -200])
def test_a_truncated_tiff_is_refused_at_once(phantom: Path, tmp_path: Path, keep: float) -> None:
    total = phantom.stat().st_size
    cut = _truncated(
        phantom, tmp_path / "cut.tiff", int(total * keep) if keep > 0 else total + int(keep)
    )
    with pytest.raises(
        JobInputError, match=r"^cut.tiff is truncated: .* past its end .*copy the slide again$"
    ):
        WsiJob.check(cut, WsiOptions())
    with pytest.raises(JobInputError, match="truncated"):
        WsiJob().run(context(cut, tmp_path / "job"))


@pytest.mark.parametrize("content", [b"not a slide at all\n", b"\x89PNG\r\n\x1a\n" + bytes(64)])
def test_a_file_that_is_not_a_slide_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.svs"
    path.write_bytes(content)
    with pytest.raises(
        JobInputError, match=r"^notes.svs is not a slide OpenSlide can read .*give an SVS"
    ):
        WsiJob.check(path, WsiOptions())


def test_a_magnification_the_slide_cannot_give_is_refused(tmp_path: Path) -> None:
    options = WsiOptions(magnification=40)
    with pytest.raises(JobInputError, match=r"gives at most 20x \(0.499 um/px\).*40x"):
        WsiJob.check(need_data(CMU), options)
    with pytest.raises(JobInputError, match="gives at most 20x"):
        WsiJob().run(context(CMU, tmp_path, magnification=40))


def test_a_slide_that_does_not_say_its_resolution_needs_slide_mpp(tmp_path: Path) -> None:
    path = tmp_path / "plain.tiff"
    tifffile.imwrite(path, Slide(1024, 1024, 2).render(0, 0, 1024, 1024), tile=(256, 256),
                     photometric="rgb", compression="jpeg")  # fmt: skip
    with pytest.raises(JobInputError, match=r"neither microns per pixel nor .* --slide-mpp"):
        WsiJob.check(path, WsiOptions())
    WsiJob.check(path, WsiOptions(slide_mpp=0.5))
    m = WsiJob().run(context(path, tmp_path / "job", slide_mpp=0.25, mpp=0.5))
    assert m["sampling"]["downsample"] == 2.0 and m["sampling"]["slide_mpp"] == 0.25


def test_options_are_checked_at_submit() -> None:
    with pytest.raises(ValueError, match="mpp or magnification, not both"):
        WsiOptions(mpp=0.5, magnification=20)
    with pytest.raises(ValueError, match="extra"):
        WsiOptions.model_validate({"batchsize": 4})
    with pytest.raises(ValueError, match="tissue"):
        WsiOptions.model_validate({"tissue": "otsu-ish"})


def test_a_segmentation_model_is_refused_with_the_reason(phantom: Path, tmp_path: Path) -> None:
    ctx = context(phantom, tmp_path)
    ctx.model = BUNDLED / ULTRASOUND
    with pytest.raises(ModelError, match=r"is a segmentation model .* give a classification model"):
        WsiJob().run(ctx)


LARGE = os.environ.get("ECHOD_WSI_LARGE", "8000x6000")  # 50000x40000: the paper's size


def _classify_large(slide: str, root: str, report: Connection) -> None:
    ctx = context(Path(slide), Path(root))
    manifest = WsiJob().run(ctx)
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    report.send((manifest, kib / 1024))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_large_slide_is_classified_in_bounded_memory(tmp_path: Path) -> None:
    """ECHOD_WSI_LARGE=50000x40000 for the paper's size (about ten minutes here)."""
    w, h = (int(v) for v in LARGE.split("x"))
    truth = write_slide(tmp_path / "large.tiff", w, h, seed=1_000_003)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_classify_large, args=(str(truth.path), str(tmp_path / "job"), send))
    child.start()
    manifest, peak_mib = receive.recv()
    child.join()
    assert child.exitcode == 0
    assert peak_mib < 2048, f"the job peaked at {peak_mib:.0f} MiB"
    assert manifest["patches"]["tissue"] > 0
    accuracy = _accuracy(
        tmp_path / "job" / "out" / "patches.csv", truth.class_map, truth.map_downsample
    )
    print(f"{LARGE}: {manifest['patches']}, peak {peak_mib:.0f} MiB, accuracy {accuracy:.3f}")
    print(json.dumps(manifest["timings"]))
    assert accuracy >= 0.9
