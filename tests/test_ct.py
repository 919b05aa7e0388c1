"""The ``ct`` job kind, run directly (the job system's socket test is the lead's): reading
DICOM (compressed too), NIfTI and MetaImage, the real CT slices, segmentation of the
phantom checked against its truth, outputs reopened, resume after an interruption, and
bad input refused with one clear line."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from daemon.offline import volumes
from daemon.offline.ct import CtJob, CtOptions, resize3
from daemon.offline.kind import FolderContext as Ctx
from daemon.offline.kind import JobInputError
from daemon.phantoms.ct import (
    PAPER_SHAPE,
    CTVolume,
    ct_phantom,
    write_dicom_series,
    write_image,
)
from tests.conftest import DATA, need_data

REAL = DATA / "ct" / "ct-3slice"
FRESH = 1_000_300  # phantom seeds >= 1,000,000: never seen in training


class Stop(Exception):
    """Raised from progress to interrupt a run."""


def stop_after(n: int) -> Callable[[Ctx, int, int, str], None]:
    """An ``on_progress`` that interrupts the run at its ``n``-th progress call."""

    def stop(ctx: Ctx, done: int, total: int, what: str) -> None:
        if len(ctx.calls) >= n:
            raise Stop

    return stop


def make_ctx(
    tmp: Path, source: Path, name: str = "run", engine: str = "onnxruntime", **options: Any
) -> Ctx:
    out, work = tmp / name / "out", tmp / name / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    return Ctx(source, out, work, CtOptions(**options), engine=engine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def digest(folder: Path, names: tuple[str, ...] = ("labels.nii.gz",)) -> str:
    import SimpleITK as sitk

    h = hashlib.sha256()
    for n in names:
        h.update(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / n))).tobytes())
    return h.hexdigest()


# --- reading ------------------------------------------------------------------------------


def test_real_ct_slices_load_with_hu_and_geometry() -> None:
    v = volumes.read(need_data(REAL))
    assert v.hu.shape == (3, 512, 512)
    # sorted along the normal (z up): 03.dcm (z -128.69) first; spacing 1 mm from the
    # positions, not the 1.25 mm SliceThickness
    assert [h.InstanceNumber for h in v.headers] == [3, 2, 1]
    assert v.spacing == pytest.approx((1.0, 0.810547, 0.810547))
    assert v.origin == pytest.approx((-235.199997, -226.800003, -128.690002))
    np.testing.assert_allclose(v.direction, np.eye(3))
    raw = pydicom.dcmread(REAL / "02.dcm")
    stored = raw.pixel_array.astype(np.float32)
    expected = np.where(stored == -2000, volumes.AIR_HU, stored - 1024)  # padding -> air
    np.testing.assert_array_equal(v.hu[1], expected)
    body = v.hu[1][200:300, 200:300]
    assert -200 < float(np.median(body)) < 100  # soft tissue in HU
    assert v.hu.min() >= -1024 and v.series_uid == raw.SeriesInstanceUID


def _recode(src: Path, dst: Path, syntax: str) -> None:
    """Each file of ``src`` re-encoded in a compressed transfer syntax (imagecodecs + pydicom)."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        a = ds.pixel_array
        if syntax == "rle":
            ds.compress(RLELossless)
        elif syntax == "jpegls":
            ds.compress(JPEGLSLossless)
        else:
            if syntax == "jpeg2000":
                frame, uid = (
                    imagecodecs.jpeg2k_encode(a, level=0, codecformat="J2K"),
                    JPEG2000Lossless,
                )
            elif syntax == "jpeg-lossless":
                frame, uid = (
                    imagecodecs.jpeg8_encode(a, lossless=True, predictor=1, bitspersample=12),
                    JPEGLosslessSV1,
                )
            else:  # baseline: 8 bits, 16 HU per level
                a8 = (np.clip(a, 0, 4095) // 16).astype(np.uint8)
                frame, uid = imagecodecs.jpeg8_encode(a8, level=95), JPEGBaseline8Bit
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.RescaleSlope = 8, 8, 7, 16
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(dst / f.name, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpeg-lossless", "jpegls", "rle", "jpeg-baseline"])
def test_compressed_series_read_as_the_uncompressed_one(tmp_path: Path, syntax: str) -> None:
    small = ct_phantom((4, 64, 64), seed=FRESH + 1)
    plain = write_dicom_series(small, tmp_path / "plain")[0].parent
    _recode(plain, tmp_path / syntax, syntax)
    ts = pydicom.dcmread(next((tmp_path / syntax).iterdir())).file_meta.TransferSyntaxUID
    assert ts.is_compressed
    got = volumes.read(tmp_path / syntax)
    if syntax == "jpeg-baseline":  # lossy, 8 bits of 16 HU: close on average
        assert float(np.abs(got.hu - small.hu).mean()) < 24  # 1.5 levels
    else:
        np.testing.assert_array_equal(got.hu, small.hu.astype(np.float32))


def test_a_zip_of_the_folder_reads_as_the_folder(tmp_path: Path) -> None:
    small = ct_phantom((4, 64, 64), seed=FRESH + 2)
    folder = write_dicom_series(small, tmp_path / "s")[0].parent
    zpath = tmp_path / "series.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("README.txt", "not DICOM")
        for f in folder.iterdir():
            z.write(f, f"export/{f.name}")
    v = volumes.read(zpath)
    np.testing.assert_array_equal(v.hu, small.hu.astype(np.float32))


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nifti_and_metaimage_keep_geometry(tmp_path: Path, suffix: str) -> None:
    small = ct_phantom((6, 48, 40), seed=FRESH + 3, spacing=(2.0, 0.9, 0.8))
    path = write_image(small, tmp_path / f"v{suffix}")
    v = volumes.read(path)
    np.testing.assert_array_equal(v.hu, small.hu)
    assert v.spacing == pytest.approx(small.spacing) and v.origin == pytest.approx(small.origin)


def test_slices_are_sorted_by_position_not_by_name_and_spacing_warns(tmp_path: Path) -> None:
    small = ct_phantom((6, 48, 48), seed=FRESH + 4, spacing=(1.5, 1.0, 1.0))
    paths = write_dicom_series(small, tmp_path / "s")
    for i, p in enumerate(paths):  # shuffle names; move slice 4 by 0.6 mm: a gap
        ds = pydicom.dcmread(p)
        if i >= 4:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.6]
        ds.SliceThickness = 5.0
        del ds.SpacingBetweenSlices
        ds.save_as(tmp_path / "s" / f"x{(7 * i) % 6}.dcm")
        p.unlink()
    v = volumes.read(tmp_path / "s")
    np.testing.assert_array_equal(v.hu, small.hu.astype(np.float32))
    assert v.spacing[0] == pytest.approx(1.5)
    assert any("non-uniform slice spacing" in w for w in v.warnings)


def test_real_world_headers_are_tolerated(tmp_path: Path) -> None:
    """Missing optional attributes, an empty SeriesInstanceUID, private tags."""
    small = ct_phantom((3, 32, 32), seed=FRESH + 5)
    for p in write_dicom_series(small, tmp_path / "s"):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = ""
        for kw in (
            "SliceLocation",
            "SeriesDescription",
            "WindowCenter",
            "WindowWidth",
            "RescaleType",
        ):
            delattr(ds, kw)
        block = ds.private_block(0x0029, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "vendor secret")
        ds.save_as(p, enforce_file_format=True)
    v = volumes.read(tmp_path / "s")
    assert v.hu.shape == (3, 32, 32) and v.series_uid == ""


def test_resize3_halves_in_plane_by_averaging() -> None:
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    y = resize3(x, (2, 2, 2))
    np.testing.assert_allclose(y[0, 0, 0], x[0, :2, :2].mean())
    assert resize3(np.ones((3, 8, 8), np.float32), (6, 4, 4)).shape == (6, 4, 4)


# --- the job, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def slab() -> CTVolume:
    """56 slices of the paper's 512 x 512: at 50 % overlap, three patches (three units)."""
    return ct_phantom((56, 512, 512), seed=FRESH + 10, nodules=(3, 5))


@pytest.fixture(scope="module")
def slab_series(slab: CTVolume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dicom_series(slab, tmp_path_factory.mktemp("slab") / "CT")[0].parent


@pytest.fixture(scope="module")
def slab_run(slab_series: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ctx, dict]:
    ctx = make_ctx(tmp_path_factory.mktemp("run"), slab_series, overlap=0.5)
    return ctx, CtJob().run(ctx)


def check_outputs(ctx: Ctx, manifest: dict, truth: CTVolume, series: Path | None) -> None:
    """Reopen what the job wrote: geometry, Dice, SEG references, manifest, preview."""
    import cv2
    import nibabel

    files = manifest["outputs"]
    assert sorted(p.name for p in ctx.output.iterdir()) == sorted(files.values())
    nii = nibabel.load(ctx.output / files["labels"])
    labels = np.asarray(nii.dataobj).transpose(2, 1, 0)  # NIfTI i, j, k -> k, j, i
    assert labels.shape == truth.hu.shape and labels.dtype == np.uint8
    source = volumes.read(ctx.input)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(nii.affine, lps_to_ras @ source.affine(), atol=1e-4)
    assert dice(labels == 1, truth.labels == 1) >= 0.70
    voxel_ml = float(np.prod(truth.spacing)) / 1000
    assert manifest["volume_ml"]["nodule"] == pytest.approx(
        (labels == 1).sum() * voxel_ml, rel=1e-3
    )
    assert manifest["findings"][0]["volume_ml"] >= manifest["findings"][-1]["volume_ml"]
    preview = cv2.imread(str(ctx.output / files["preview"]))
    assert preview is not None and preview.shape[0] == 384
    b, g, r = (preview[..., c].astype(int) for c in range(3))
    assert ((r > b + 100) & (g > b + 60)).any()  # the nodule colour (255, 200, 0) over gray
    assert set(manifest["table3_ms_per_patch"]) >= {
        "generator",
        "nn_input",
        "inference",
        "nn_output",
        "stitcher",
    }
    if series is None:
        assert "seg" not in files
        return
    import highdicom as hd

    seg = hd.seg.segread(ctx.output / files["seg"])
    first = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    refs = seg.get_source_image_uids()
    assert {r[1] for r in refs} == {first.SeriesInstanceUID}
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in series.iterdir()}
    assert {r[2] for r in refs} <= set(sops) and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.get_segment_description(1).segment_label == "nodule"
    by_instance = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in source.headers],
        segment_numbers=[1],
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(by_instance[..., 0], (labels == 1).astype(np.uint8))


def test_phantom_series_is_segmented_and_outputs_reopen(
    slab_run: tuple[Ctx, dict], slab: CTVolume
) -> None:
    ctx, manifest = slab_run
    check_outputs(ctx, manifest, slab, ctx.input)
    assert ctx.phases == ["read", "load", "segment", "write"]
    assert ctx.calls == [(1, 3, "patches"), (2, 3, "patches"), (3, 3, "patches")]
    assert ctx.marked == {"batch-00000", "batch-00001", "batch-00002"}
    assert (
        manifest["input"]["series"] == pydicom.dcmread(next(ctx.input.iterdir())).SeriesInstanceUID
    )


def test_an_interrupted_job_resumes_to_the_same_output(
    slab_run: tuple[Ctx, dict], slab_series: Path, tmp_path: Path
) -> None:
    ctx = make_ctx(tmp_path, slab_series, overlap=0.5)
    ctx.on_progress = stop_after(2)
    with pytest.raises(Stop):
        CtJob().run(ctx)
    assert ctx.marked == {"batch-00000", "batch-00001"}
    saved = {p.name: p.stat().st_mtime_ns for p in ctx.work.iterdir()}
    assert set(saved) == {"batch-00000.npy", "batch-00001.npy"}
    shutil.rmtree(ctx.output)  # the job system gives each attempt a fresh output folder
    ctx.output.mkdir()
    ctx.on_progress, ctx.calls = None, []
    CtJob().run(ctx)
    assert {p.name: p.stat().st_mtime_ns for p in ctx.work.iterdir() if p.name in saved} == saved
    assert ctx.marked == {"batch-00000", "batch-00001", "batch-00002"}
    assert digest(ctx.output) == digest(slab_run[0].output)


def test_nifti_input_is_segmented_without_a_seg(slab: CTVolume, tmp_path: Path) -> None:
    path = write_image(slab, tmp_path / "slab.nii.gz")
    ctx = make_ctx(tmp_path, path, overlap=0.0)
    check_outputs(ctx, CtJob().run(ctx), slab, None)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_what_the_bundled_model_finds_on_the_real_slices(tmp_path: Path, engine: str) -> None:
    """At the precision its card's calibration allows on each engine (OpenVINO: int8),
    and the manifest says which and why."""
    from daemon.engines import registry
    from daemon.engines.card import load_card
    from daemon.engines.precision import choose
    from daemon.models import BUNDLED, CT

    if not registry.probe(engine).available:
        pytest.skip(f"{engine} is not installed")
    ctx = make_ctx(tmp_path, need_data(REAL), engine=engine)
    manifest = CtJob().run(ctx)
    chosen = choose(load_card(BUNDLED / CT), BUNDLED / CT, engine, "cpu", "auto")
    assert manifest["engine"]["precision"] == chosen.precision != "auto"
    assert manifest["engine"]["precision_reason"] == chosen.reason
    labels = volumes.read_image(ctx.output / "labels.nii.gz")
    assert labels.hu.shape == (3, 512, 512)
    np.testing.assert_allclose(labels.affine(), volumes.read(REAL).affine(), atol=1e-4)
    # what its card says: no nodule in these lung bases (a speck of a few voxels at most)
    assert manifest["volume_ml"]["nodule"] < 0.05, manifest["findings"][:3]


@pytest.fixture(scope="module")
def paper() -> CTVolume:
    return ct_phantom(PAPER_SHAPE, seed=FRESH + 30, nodules=(3, 6))


@pytest.mark.slow
@pytest.mark.full
@pytest.mark.parametrize("syntax", ["plain", "jpeg2000"])
def test_a_paper_size_series_end_to_end(paper: CTVolume, tmp_path: Path, syntax: str) -> None:
    """305 x 512 x 512 as a DICOM series (and once as JPEG 2000), the paper's case 2."""
    series = write_dicom_series(paper, tmp_path / "plain")[0].parent
    if syntax != "plain":
        _recode(series, tmp_path / syntax, syntax)
        series = tmp_path / syntax
    ctx = make_ctx(tmp_path, series)
    manifest = CtJob().run(ctx)
    check_outputs(ctx, manifest, paper, series)
    print(syntax, manifest["table3_ms_per_patch"], manifest["volume_ml"])


# --- bad input ----------------------------------------------------------------------------


def refused(path: Path, match: str, **options: Any) -> None:
    """A JobInputError naming the problem, from check at submit or else from run."""
    opts = CtOptions(**options)
    with pytest.raises(JobInputError, match=match) as err:
        CtJob.check(path, opts)
        ctx = make_ctx(Path(tempfile.mkdtemp(dir=path.parent)), path, **options)
        CtJob().run(ctx)
    assert "\n" not in str(err.value)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_dicom_series(ct_phantom((4, 32, 32), seed=FRESH + 20), tmp_path / "tiny")[0].parent


def test_no_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "folder is empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no images here")
    refused(tmp_path / "docs", "no DICOM image found")
    refused(tmp_path / "missing", "no such file or folder")


def test_two_series_need_a_choice(tiny: Path, tmp_path: Path) -> None:
    other = write_dicom_series(ct_phantom((3, 32, 32), seed=FRESH + 21), tmp_path / "o")
    for p in other:
        shutil.copy(p, tiny / f"other-{p.name}")
    uid = pydicom.dcmread(other[0]).SeriesInstanceUID
    refused(tiny, f"holds 2 series: choose one with --series UID: .*{uid}")
    refused(tiny, "no series '1.2.3'", series="1.2.3")
    CtJob.check(tiny, CtOptions(series=uid))
    assert volumes.read(tiny, uid).hu.shape == (3, 32, 32)


def test_a_truncated_file_is_refused(tiny: Path) -> None:
    victim = sorted(tiny.iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 700])  # pixel data cut short
    refused(tiny, f"{victim.name}: the pixel data cannot be read.*truncated")
    victim.write_bytes(data[:300])  # header cut short
    refused(tiny, f"{victim.name}: a DICOM file whose header cannot be read")


def test_a_non_ct_modality_is_refused(tiny: Path) -> None:
    for p in tiny.iterdir():
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    refused(tiny, "is MR, not CT")


def test_a_localizer_in_the_series_is_refused(tiny: Path) -> None:
    ds = pydicom.dcmread(next(tiny.iterdir()))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.save_as(tiny / "scout.dcm")
    refused(tiny, "1 localizer image.*scout.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # unmarked, but in another plane
    ds.save_as(tiny / "scout.dcm")
    refused(tiny, "1 image.* in another plane .*scout.dcm")


def test_bad_options_are_refused_at_submit() -> None:
    from pydantic import ValidationError

    for bad in ({"overlap": 1.0}, {"blend": "median"}, {"patch": (0, 512, 512)}, {"sereis": "1"}):
        with pytest.raises(ValidationError):
            CtOptions(**bad)
    assert CtOptions(series=1.2).series == "1.2"  # a short UID that TOML read as a number
