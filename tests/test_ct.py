"""The ``ct`` job kind, run directly (the job system's socket test is the lead's): reading
DICOM (compressed too), NIfTI and MetaImage, the real CT slices, segmentation of the
phantom checked against its truth, outputs reopened, resume after an interruption, and
bad input refused with one clear line."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from conftest import DATA, need_data
from daemon.offline import volumes
from daemon.offline.ct import CtJob, CtOptions, resize3
from daemon.offline.kind import JobInputError
from daemon.phantoms.ct import CTVolume, ct_phantom, write_dicom_series, write_image

REAL = DATA / "ct" / "ct-3slice"
FRESH = 1_000_300  # phantom seeds >= 1,000,000: never seen in training


class Stop(Exception):
    """Raised from progress to interrupt a run."""


@dataclass
class Ctx:
    """A JobContext of real folders; done/mark backed by a set; progress recorded."""

    input: Path
    output: Path
    work: Path
    options: Any
    model: Path | None = None
    engine: str | None = "onnxruntime"
    device: str = "cpu"
    threads: int = 0
    marked: set[str] = field(default_factory=set)
    calls: list[tuple[int, int, str]] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    stop_after: int | None = None

    def done(self, unit: str) -> bool:
        return unit in self.marked

    def mark(self, unit: str) -> None:
        self.marked.add(unit)

    def progress(self, done: int, total: int, what: str) -> None:
        self.calls.append((done, total, what))
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise Stop

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.phases.append(name)
        yield


def make_ctx(tmp: Path, source: Path, name: str = "run", **options: Any) -> Ctx:
    out, work = tmp / name / "out", tmp / name / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    return Ctx(input=source, output=out, work=work, options=CtOptions(**options))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def digest(folder: Path, names: tuple[str, ...] = ("labels.nii.gz",)) -> str:
    import SimpleITK as sitk

    h = hashlib.sha256()
    for n in names:
        h.update(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / n))).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def phantom() -> CTVolume:
    return ct_phantom((40, 512, 512), seed=FRESH, nodules=(3, 5))


@pytest.fixture(scope="module")
def series(phantom: CTVolume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dicom_series(phantom, tmp_path_factory.mktemp("series") / "CT")[0].parent


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
                frame, uid = imagecodecs.jpeg2k_encode(a, level=0, codecformat="J2K"), JPEG2000Lossless
            elif syntax == "jpeg-lossless":
                frame, uid = imagecodecs.jpeg8_encode(a, lossless=True, predictor=1, bitspersample=12), JPEGLosslessSV1
            else:  # baseline: 8 bits, 16 HU per level
                a8 = (np.clip(a, 0, 4095) // 16).astype(np.uint8)
                frame, uid = imagecodecs.jpeg8_encode(a8, level=95), JPEGBaseline8Bit
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.RescaleSlope = 8, 8, 7, 16
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(dst / f.name, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpeg-lossless", "jpegls", "rle", "jpeg-baseline"])
def test_compressed_series_read_as_the_uncompressed_one(
    phantom: CTVolume, tmp_path: Path, syntax: str
) -> None:
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
        for kw in ("SliceLocation", "SeriesDescription", "WindowCenter", "WindowWidth", "RescaleType"):
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
