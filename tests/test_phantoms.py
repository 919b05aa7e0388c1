"""Phantoms: CT volume (DICOM series, NIfTI), H&E tissue and the pyramidal slide writer."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.uid import CTImageStorage

from daemon.phantoms import ct, wsi
from tests.conftest import ROOT

# --- CT -----------------------------------------------------------------------------

SMALL = (40, 128, 160)


@pytest.fixture(scope="module")
def volume() -> ct.CTVolume:
    return ct.ct_phantom(SMALL, seed=7, spacing=(1.25, 2.4, 2.2), nodules=(3, 4))


def test_ct_is_deterministic_by_seed(volume: ct.CTVolume) -> None:
    again = ct.ct_phantom(SMALL, seed=7, spacing=(1.25, 2.4, 2.2), nodules=(3, 4))
    other = ct.ct_phantom(SMALL, seed=8, spacing=(1.25, 2.4, 2.2), nodules=(3, 4))
    assert np.array_equal(volume.hu, again.hu) and np.array_equal(volume.labels, again.labels)
    assert volume.nodules == again.nodules
    assert not np.array_equal(volume.hu, other.hu)


def test_ct_anatomy_in_hounsfield_units(volume: ct.CTVolume) -> None:
    hu = volume.hu
    assert hu.shape == SMALL and hu.dtype == np.int16 and volume.labels.dtype == np.uint8
    assert hu.min() >= -1024 and hu.max() <= 3071
    mid = hu[SMALL[0] // 2]
    assert np.median(mid[:4]) < -950  # air above the chest
    lung = (hu > -950) & (hu < -700)
    assert 0.08 < lung.mean() < 0.5
    assert -880 < hu[lung].mean() < -800  # parenchyma around -850
    assert ((hu > 0) & (hu < 100)).mean() > 0.1  # muscle, mediastinum
    assert (hu > 500).any()  # bone


def test_ct_nodules_are_labelled_spheres(volume: ct.CTVolume) -> None:
    assert 3 <= len(volume.nodules) <= 4
    assert set(np.unique(volume.labels)) == {0, 1}
    voxel = math.prod(volume.spacing)
    for n in volume.nodules:
        assert ct.NODULE_MM[0] <= n.diameter <= ct.NODULE_MM[1]
        c = np.rint(np.array(n.centre) / volume.spacing).astype(int)
        assert volume.labels[tuple(c)] == 1
        assert -60 < volume.hu[tuple(c)] < 140  # solid, in a lung at -850
    expected = sum(math.pi / 6 * n.diameter**3 for n in volume.nodules) / voxel
    assert volume.labels.sum() == pytest.approx(expected, rel=0.25)


def test_ct_any_size_and_slab_too_thin_for_nodules() -> None:
    v = ct.ct_phantom((1, 64, 48), seed=1)
    assert v.hu.shape == (1, 64, 48) and v.nodules == () and not v.labels.any()
    with pytest.raises(ValueError, match="at least"):
        ct.ct_phantom((8, 16, 16))


def test_ct_dicom_series_reads_back_in_order(volume: ct.CTVolume, tmp_path) -> None:
    paths = ct.write_dicom_series(volume, tmp_path / "series")
    assert len(paths) == SMALL[0]
    first, last = dcmread(paths[0]), dcmread(paths[-1])
    assert first.Modality == "CT" and first.SOPClassUID == CTImageStorage
    for uid in (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID):
        assert uid.is_valid
    assert first.SeriesInstanceUID == last.SeriesInstanceUID
    assert first.SOPInstanceUID != last.SOPInstanceUID
    assert (first.RescaleSlope, first.RescaleIntercept) == (1, -1024)
    assert float(last.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]) == (
        pytest.approx((SMALL[0] - 1) * volume.spacing[0])
    )
    # file names in the opposite order to the slices: the reader must sort by position
    for i, p in enumerate(paths):
        p.rename(tmp_path / "series" / f"x{len(paths) - i:04d}.dcm")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    image = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(image), volume.hu)
    assert image.GetSpacing() == pytest.approx(tuple(reversed(volume.spacing)))
    assert image.GetOrigin() == pytest.approx(volume.origin, abs=1e-3)
    again = ct.write_dicom_series(volume, tmp_path / "again")
    assert dcmread(again[0]).SeriesInstanceUID == first.SeriesInstanceUID  # UIDs from the seed


def test_ct_nifti_round_trip(volume: ct.CTVolume, tmp_path) -> None:
    for labels in (False, True):
        path = ct.write_image(volume, tmp_path / f"v{int(labels)}.nii.gz", labels=labels)
        image = sitk.ReadImage(str(path))
        want = volume.labels if labels else volume.hu
        assert np.array_equal(sitk.GetArrayFromImage(image), want)
        assert image.GetSpacing() == pytest.approx(tuple(reversed(volume.spacing)), rel=1e-5)


# --- H&E tissue and slides ------------------------------------------------------------


def _stats(cls: int) -> np.ndarray:
    """Per patch: fraction of nuclear (dark, blue) pixels, mean green."""
    out = []
    for seed in range(2_000_000, 2_000_004):
        p = wsi.tissue_patch(cls, seed, 256).astype(np.float32)
        nuclear = ((p[..., 0] < 170) & (p[..., 2] > p[..., 0] + 15)).mean()
        out.append((nuclear, p[..., 1].mean()))
    return np.array(out)


def test_tissue_classes_differ_by_texture_and_colour() -> None:
    normal, benign, insitu, invasive = (_stats(c) for c in range(4))
    assert invasive[:, 0].min() > max(normal[:, 0].max(), benign[:, 0].max()) * 3
    assert insitu[:, 0].mean() > normal[:, 0].mean() * 3
    assert normal[:, 1].min() > benign[:, 1].max()  # pale loose stroma vs dense pink collagen


def test_tissue_patch_is_deterministic() -> None:
    a, b = wsi.tissue_patch(2, 5, 128), wsi.tissue_patch(2, 5, 128)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, wsi.tissue_patch(2, 6, 128))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        wsi.tissue_patch(4, 0)


def test_slide_renders_seamlessly_across_tiles() -> None:
    slide = wsi.Slide(8000, 6000, seed=3)
    whole = slide.render(2000, 3000, 1024, 1024).astype(np.int16)
    part = slide.render(2300, 3500, 300, 400).astype(np.int16)
    assert np.abs(whole[300:600, 500:900] - part).mean() < 3.0  # pixel noise only


def test_slide_tiff_opens_in_openslide(tmp_path) -> None:
    openslide = pytest.importorskip("openslide")
    truth = wsi.write_slide(tmp_path / "s.tiff", 3000, 2500, seed=4, smallest=128)
    assert truth.levels == ((3000, 2500), (750, 625), (188, 157))
    slide = openslide.OpenSlide(str(tmp_path / "s.tiff"))
    assert slide.level_count == 3
    assert slide.level_dimensions == truth.levels
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0), rel=1e-2)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    level0 = np.asarray(slide.read_region((0, 0), 0, (3000, 2500)).convert("RGB"), np.int16)
    rendered = wsi.Slide(3000, 2500, seed=4).render(0, 0, 2500, 3000).astype(np.int16)
    assert np.abs(level0 - rendered).mean() < 3.0  # JPEG error only
    level1 = np.asarray(slide.read_region((0, 0), 1, (750, 625)).convert("RGB"), np.float32)
    boxed = rendered.reshape(625, 4, 750, 4, 3).mean(axis=(1, 3))
    assert np.abs(level1 - boxed).mean() < 3.0
    # ground truth: glass is bright, each tissue class is where the map says
    cmap, d = truth.class_map, truth.map_downsample
    assert cmap.shape == (math.ceil(2500 / d), math.ceil(3000 / d))
    present = set(np.unique(cmap)) - {wsi.GLASS}
    assert present and cmap.dtype == np.uint8 and max(present) <= len(wsi.CLASSES)
    ys = np.minimum(np.arange(cmap.shape[0]) * d + d // 2, 2499)
    xs = np.minimum(np.arange(cmap.shape[1]) * d + d // 2, 2999)
    centres = level0[ys][:, xs].mean(axis=2)
    assert centres[cmap == wsi.GLASS].mean() > 225
    assert centres[cmap != wsi.GLASS].mean() < 205
    slide.close()


# --- import weight: what a training machine needs -------------------------------------


def test_phantoms_import_only_numpy() -> None:
    code = (
        "import sys, daemon.phantoms.ct, daemon.phantoms.wsi; "
        "print(sorted(m for m in ('cv2', 'pydantic', 'SimpleITK', 'pydicom', 'tifffile') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_ultrasound_phantom_is_the_acquisition_source() -> None:
    from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
    from daemon.phantoms import ultrasound

    src = SyntheticSource(SyntheticSettings(width=320, height=288, seed=3))
    assert isinstance(src.phantom, ultrasound.Phantom)
    frame, labels = src.frame_with_labels(5)
    image, truth = ultrasound.Phantom((288, 320), seed=3).frame_with_labels(5)
    assert np.array_equal(frame.image, image) and np.array_equal(labels, truth)
    assert frame.image.shape == labels.shape == (288, 320)
    assert {ultrasound.ARTERY, ultrasound.VEIN} <= set(np.unique(labels))
