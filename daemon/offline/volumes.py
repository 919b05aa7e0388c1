"""CT volumes in Hounsfield units: a DICOM series (a folder, a file of it, a .zip), NIfTI
or MetaImage.

DICOM is read with pydicom: it parses what real archives hold (private tags, missing
optional attributes, empty UIDs) and lets this module decide what a series is, which
SimpleITK's series reader decides for itself. Compressed pixel data (JPEG baseline and
extended, JPEG lossless, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's plugins:
GDCM (python-gdcm, BSD) for all of them, Pillow and pyjpegls where GDCM is absent
(pylibjpeg-libjpeg, the other JPEG-lossless decoder, is GPL). NIfTI and MetaImage go
through SimpleITK, which turns NIfTI's RAS into DICOM's LPS.

A series is chosen by SeriesInstanceUID (refused with the list when a folder holds
several and none is named); slices are sorted by position along the slice normal and
the slice spacing is measured from those positions, never taken from SliceThickness
(a single slice has no other). Stored values become HU by RescaleSlope/Intercept;
PixelPaddingValue pixels (outside the scanned circle) become air, -1024 HU.

Geometry: ``hu[k, j, i]`` is at ``origin + i*sx*D[:,0] + j*sy*D[:,1] + k*sz*D[:,2]``
(LPS mm), ``D`` the direction matrix (columns: row, column and slice directions), as
SimpleITK keeps it.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from daemon.offline.kind import JobInputError

log = logging.getLogger(__name__)

AIR_HU = -1024.0
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap that counts as non-uniform
_NOT_IMAGES = {"1.2.840.10008.1.3.10"}  # Media Storage Directory (DICOMDIR)


@dataclass(frozen=True)
class Volume:
    """HU (float32, z y x) with its geometry; ``headers``: the DICOM slices in ``hu``'s
    order (no pixel data), for writing a SEG that refers to them."""

    hu: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # (x, y, z) LPS mm of voxel (0, 0, 0)
    direction: np.ndarray  # 3x3, columns: the i (x), j (y), k (z) axes in LPS
    headers: tuple[Any, ...] = ()
    warnings: tuple[str, ...] = ()
    description: str = ""

    @property
    def series_uid(self) -> str:
        return str(getattr(self.headers[0], "SeriesInstanceUID", "")) if self.headers else ""

    def affine(self) -> np.ndarray:
        """4x4 voxel (i, j, k) -> LPS mm."""
        a = np.eye(4)
        sz, sy, sx = self.spacing
        a[:3, :3] = self.direction @ np.diag([sx, sy, sz])
        a[:3, 3] = self.origin
        return a


@dataclass
class _Slice:
    name: str
    open: Callable[[], IO[bytes]]
    ds: Any  # header, no pixel data


@dataclass
class Series:
    """One series found in the input: its slices' headers (unsorted)."""

    uid: str
    slices: list[_Slice] = field(default_factory=list)

    def describe(self) -> str:
        ds = self.slices[0].ds
        what = " ".join(
            str(v) for v in (ds.get("Modality", "?"), ds.get("SeriesDescription", "")) if v
        )
        return f"{self.uid or '(no SeriesInstanceUID)'} ({what}, {len(self.slices)} images)"


def is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


@contextmanager
def _sources(path: Path) -> Iterator[list[tuple[str, Callable[[], IO[bytes]]]]]:
    """(name, opener) of every candidate DICOM file: a folder (recursively), one file, or
    the members of a .zip."""
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise JobInputError(f"{path}: cannot open the zip: {exc}") from exc
        with zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            yield [(n, _zip_opener(zf, n)) for n in sorted(names)]
        return
    if path.is_file():
        yield [(path.name, _file_opener(path))]
        return
    files = sorted(p for p in path.rglob("*") if p.is_file())
    yield [(str(p.relative_to(path)), _file_opener(p)) for p in files]


def _zip_opener(zf: zipfile.ZipFile, name: str) -> Callable[[], IO[bytes]]:
    return lambda: io.BytesIO(zf.read(name))


def _file_opener(p: Path) -> Callable[[], IO[bytes]]:
    return lambda: p.open("rb")


def _read_header(name: str, opener: Callable[[], IO[bytes]]) -> Any | None:
    """The dataset without pixel data, or None when the file is not DICOM."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        with opener() as f:
            return dcmread(f, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as exc:  # a DICOM preamble but a broken header: truncated, corrupt
        raise JobInputError(
            f"{name}: a DICOM file whose header cannot be read ({type(exc).__name__}: {exc}); "
            "it is truncated or corrupt: export the series again or remove the file"
        ) from exc


def _not_an_image(name: str, ds: Any) -> None:
    """Skip a DICOM object without pixels (a report, a DICOMDIR), unless its file says it is
    an image: then the file ends early."""
    sop = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "")
    if "Image Storage" in getattr(sop, "name", ""):
        raise JobInputError(
            f"{name}: a DICOM file whose header cannot be read (a {sop.name} without its image "
            "attributes); it is truncated or corrupt: export the series again or remove the file"
        )
    log.info("%s: not an image (%s), skipped", name, getattr(sop, "name", "unknown SOP class"))


def scan(path: Path) -> list[Series]:
    """Image series in ``path`` (headers only: cheap), largest first."""
    found: dict[str, Series] = {}
    with _sources(path) as sources:
        for name, opener in sources:
            ds = _read_header(name, opener)
            if ds is None or ds.get("SOPClassUID", "") in _NOT_IMAGES:
                continue
            if "Rows" not in ds:
                _not_an_image(name, ds)
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            found.setdefault(uid, Series(uid)).slices.append(_Slice(name, opener, ds))
    return sorted(found.values(), key=lambda s: -len(s.slices))


def choose(path: Path, series: str | None) -> Series:
    """The series to segment: the only one, or the one named; else a JobInputError."""
    if path.is_dir() and not any(path.iterdir()):
        raise JobInputError(f"{path}: the folder is empty: give a folder of DICOM CT images")
    found = scan(path)
    if not found:
        raise JobInputError(
            f"{path}: no DICOM image found: give a DICOM series (folder, file or .zip), "
            f"or a volume ({', '.join(IMAGE_SUFFIXES)})"
        )
    listing = "; ".join(s.describe() for s in found)
    if series is not None:
        chosen = [s for s in found if s.uid == series.strip()]
        if not chosen:
            raise JobInputError(f"{path}: no series {series!r}; the series here are: {listing}")
        picked = chosen[0]
    elif len(found) > 1:
        raise JobInputError(
            f"{path} holds {len(found)} series: choose one with --series UID: {listing}"
        )
    else:
        picked = found[0]
    _check_modality(picked)
    return picked


def _check_modality(series: Series) -> None:
    modality = str(series.slices[0].ds.get("Modality", "") or "")
    others = {str(s.ds.get("Modality", "") or "") for s in series.slices}
    if (modality and modality != "CT") or len(others - {""}) > 1:
        raise JobInputError(
            f"series {series.describe()} is {'/'.join(sorted(others))}, not CT: "
            "the ct job segments CT images (ultrasound plays with echod run)"
        )
    if not modality:
        log.warning("series %s names no Modality; read as CT", series.uid)


def _vector(ds: Any, keyword: str, default: list[float] | None, name: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) == 0:
        if default is None:
            raise JobInputError(
                f"{name}: no {keyword}: the slices cannot be placed in space; "
                "export the series with its geometry"
            )
        return np.asarray(default, np.float64)
    return np.asarray([float(v) for v in value], np.float64)


def _geometry(series: Series) -> tuple[list[_Slice], np.ndarray, list[str]]:
    """Slices sorted along the normal, the direction matrix and warnings."""
    warnings: list[str] = []
    sl = series.slices
    first = sl[0]
    localizers = [
        s.name for s in sl if "LOCALIZER" in [str(v).upper() for v in s.ds.get("ImageType", [])]
    ]
    if localizers:
        raise JobInputError(
            f"series {series.uid}: {len(localizers)} localizer image(s) among the slices "
            f"({', '.join(localizers[:5])}): move them out of the folder"
        )
    if "ImageOrientationPatient" not in first.ds:
        warnings.append("no ImageOrientationPatient: the slices are taken as axial")
    orient = [_vector(s.ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0], s.name) for s in sl]
    common = Counter(tuple(np.round(o, 3)) for o in orient).most_common(1)[0][0]
    odd = [s.name for s, o in zip(sl, orient, strict=True) if not np.allclose(o, common, atol=1e-3)]
    if odd:
        raise JobInputError(
            f"series {series.uid}: {len(odd)} image(s) lie in another plane than the rest "
            f"({', '.join(odd[:5])}): a localizer or another reconstruction; move them out"
        )
    sizes = Counter((int(s.ds.Rows), int(s.ds.Columns)) for s in sl)
    if len(sizes) > 1:
        raise JobInputError(
            f"series {series.uid}: images of several sizes "
            f"({', '.join(f'{r}x{c}' for r, c in sizes)}): "
            "one volume needs slices of one size"
        )
    row, col = np.asarray(common[:3]), np.asarray(common[3:])
    normal = np.cross(row, col)
    if len(sl) == 1:
        return sl, np.column_stack([row, col, normal]), warnings
    pos = [_vector(s.ds, "ImagePositionPatient", None, s.name) for s in sl]
    dist = np.array([float(p @ normal) for p in pos])
    order = np.argsort(dist, kind="stable")
    sl, dist = [sl[i] for i in order], dist[order]
    gaps = np.diff(dist)
    dup = [sl[i + 1].name for i in np.flatnonzero(np.abs(gaps) < 1e-3)]
    if dup:
        raise JobInputError(
            f"series {series.uid}: {len(dup)} image(s) at the same position as another "
            f"({', '.join(dup[:5])}): several acquisitions in one series; keep one"
        )
    return sl, np.column_stack([row, col, normal]), warnings


def _slice_spacing(sl: list[_Slice], direction: np.ndarray, warnings: list[str]) -> float:
    if len(sl) == 1:
        thickness = sl[0].ds.get("SliceThickness")
        return float(thickness) if thickness else 1.0
    normal = direction[:, 2]
    dist = np.array(
        [float(_vector(s.ds, "ImagePositionPatient", None, s.name) @ normal) for s in sl]
    )
    gaps = np.diff(dist)
    spacing = round(float(np.median(gaps)), 6)
    worst = float(np.max(np.abs(gaps - spacing)))
    if worst > max(SPACING_TOLERANCE * spacing, 1e-3):
        warnings.append(
            f"non-uniform slice spacing: gaps of {gaps.min():.3f} to {gaps.max():.3f} mm; "
            f"the label volume uses the median, {spacing:.3f} mm"
        )
    return spacing


def _pixels(s: _Slice) -> np.ndarray:
    from pydicom import dcmread

    try:
        with s.open() as f:
            ds = dcmread(f)
            stored = ds.pixel_array
    except Exception as exc:
        raise JobInputError(
            f"{s.name}: the pixel data cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is truncated, corrupt "
            "or in a transfer syntax no installed decoder takes (python-gdcm decodes them all)"
        ) from exc
    if stored.ndim != 2:
        raise JobInputError(
            f"{s.name}: {stored.shape} pixels: one gray image per file is expected "
            "(multi-frame and colour images are not CT slices)"
        )
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        hu[stored == padding] = AIR_HU
    return hu


def read_dicom(path: Path, series: str | None = None) -> Volume:
    """The chosen series of ``path`` as a volume."""
    chosen = choose(path, series)
    sl, direction, warnings = _geometry(chosen)
    sz = _slice_spacing(sl, direction, warnings)
    first = sl[0].ds
    if "PixelSpacing" not in first:
        warnings.append("no PixelSpacing: 1 mm pixels assumed")
    sy, sx = _vector(first, "PixelSpacing", [1.0, 1.0], sl[0].name)[:2]
    origin = _vector(first, "ImagePositionPatient", [0.0, 0.0, 0.0], sl[0].name)
    with _sources(path) as sources:
        openers = dict(sources)
        hu = np.empty((len(sl), int(first.Rows), int(first.Columns)), np.float32)
        for k, s in enumerate(sl):
            s.open = openers[s.name]
            hu[k] = _pixels(s)
    for w in warnings:
        log.warning("%s: %s", path, w)
    return Volume(
        hu=hu,
        spacing=(sz, float(sy), float(sx)),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=direction,
        headers=tuple(s.ds for s in sl),
        warnings=tuple(warnings),
        description=chosen.describe(),
    )


def read_image(path: Path) -> Volume:
    """A NIfTI or MetaImage volume (values taken as HU)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise JobInputError(f"{path}: cannot read the volume: {reason}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise JobInputError(
            f"{path}: a {image.GetDimension()}-D image of {image.GetNumberOfComponentsPerPixel()} "
            "components; the ct job takes one 3-D gray volume in HU"
        )
    sx, sy, sz = image.GetSpacing()
    return Volume(
        hu=sitk.GetArrayFromImage(image).astype(np.float32, copy=False),
        spacing=(float(sz), float(sy), float(sx)),
        origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=np.asarray(image.GetDirection(), np.float64).reshape(3, 3),
        description=path.name,
    )


def check(path: Path, series: str | None = None) -> str:
    """Cheap check at submit (headers only): what would be read, or a JobInputError."""
    if is_image_file(path):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise JobInputError(
                f"{path}: not a readable volume: {str(exc).strip().splitlines()[-1]}"
            ) from exc
        if reader.GetDimension() != 3:
            raise JobInputError(f"{path}: a {reader.GetDimension()}-D image; the ct job takes 3-D")
        return path.name
    chosen = choose(path, series)
    _geometry(chosen)
    return chosen.describe()


def read(path: Path, series: str | None = None) -> Volume:
    """A CT volume from a DICOM series (folder, file, .zip) or a NIfTI/MetaImage file."""
    if not path.exists():
        raise JobInputError(f"{path}: no such file or folder")
    if is_image_file(path):
        return read_image(path)
    return read_dicom(path, series)
