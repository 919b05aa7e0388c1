"""A thoracic CT phantom in Hounsfield units, with lung-nodule ground truth.

An axial stack through the chest: air around a body of subcutaneous fat and
muscle, ribs, the spine and the mediastinum (with the aorta) between two lungs
of parenchyma around -850 HU. In the lungs, vessels run outward from the hilum
as tubes of blood density that taper, and solid spherical nodules of 3 to 30 mm
sit clear of the pleura and of each other. Vessels and nodules have the same
density: a nodule is told from a vessel seen end-on only in 3-D. CT noise is
Gaussian, slightly correlated in-plane.

Geometry follows DICOM's patient coordinates (LPS): voxel ``hu[k, j, i]`` is at
``origin + (i * sx, j * sy, k * sz)`` mm, ``x`` towards the patient's left,
``y`` posterior (the spine is at the bottom of an axial image), ``z`` towards
the head. Anatomy scales with the field of view: any shape up to the paper's
305 x 512 x 512 works, and a few dozen slices are a slab of the mid-chest.

Everything random is drawn from ``seed``; the same seed, shape and spacing give
the same volume. Labels: 0 background, 1 nodule. Only numpy is needed to make a
volume; :func:`write_dicom_series` imports pydicom and :func:`write_image`
SimpleITK when called.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

AIR, LUNG, FAT, MUSCLE, BLOOD, CONTRAST, BONE, MARROW = (
    -1000.0,
    -850.0,
    -100.0,
    45.0,
    40.0,
    170.0,
    750.0,
    250.0,
)
NODULE = 1
PAPER_SHAPE = (305, 512, 512)
NODULE_MM = (3.0, 30.0)  # diameter range
_SPHERE_DIRS = np.array(
    [
        (dz, dy, dx)
        for dz in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dz, dy, dx) != (0, 0, 0)
    ],
    np.float64,
)
_SPHERE_DIRS /= np.linalg.norm(_SPHERE_DIRS, axis=1, keepdims=True)


@dataclass(frozen=True, slots=True)
class Nodule:
    """A spherical nodule; ``centre`` in mm (z, y, x) from the first voxel's centre."""

    centre: tuple[float, float, float]
    diameter: float


@dataclass(frozen=True)
class CTVolume:
    """A phantom volume: HU (int16) and labels (uint8), both (z, y, x)."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # (x, y, z) mm of voxel (0, 0, 0), LPS
    nodules: tuple[Nodule, ...]
    seed: int


@dataclass(frozen=True, slots=True)
class _Anatomy:
    """The random draw of one chest; lengths in mm, in-plane centre at (0, 0)."""

    body: tuple[float, float]  # semi-axes (x, y)
    fat: float  # subcutaneous fat thickness
    wall: float  # fat + muscle + ribs: body edge to the pleura
    body_wave: tuple[float, float]  # relative amplitude, period along z
    mediastinum: tuple[float, float, float]  # centre x, semi-axes x, y
    aorta: tuple[float, float, float]  # centre x, y, radius
    spine: tuple[float, float]  # centre y, radius
    rib_period: float
    rib_phase: float
    lung_length: float  # craniocaudal extent of the lungs
    noise_hu: float


def _draw_anatomy(rng: np.random.Generator, fov: tuple[float, float, float]) -> _Anatomy:
    """A chest scaled to the field of view ``fov`` (z, y, x) mm."""
    fz, fy, fx = fov
    a, b = rng.uniform(0.40, 0.45) * fx, rng.uniform(0.29, 0.33) * fy
    fat = rng.uniform(0.02, 0.045) * fx
    wall = fat + rng.uniform(0.035, 0.05) * fx
    med_a = rng.uniform(0.09, 0.12) * fx
    med_x = rng.uniform(-0.02, 0.02) * fx
    spine_r = rng.uniform(0.045, 0.055) * fx
    return _Anatomy(
        body=(a, b),
        fat=fat,
        wall=wall,
        body_wave=(rng.uniform(0.0, 0.04), rng.uniform(150.0, 400.0)),
        mediastinum=(med_x, med_a, (b - wall) * rng.uniform(0.85, 1.0)),
        aorta=(med_x + rng.uniform(0.3, 0.6) * med_a, 0.35 * b, rng.uniform(0.03, 0.04) * fx),
        spine=(b - wall - 0.4 * spine_r, spine_r),
        rib_period=rng.uniform(22.0, 30.0),
        rib_phase=rng.uniform(0.0, 1.0),
        lung_length=max(1.1 * fz, 220.0),
        noise_hu=rng.uniform(10.0, 25.0),
    )


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Squared normalised radius: < 1 inside the ellipse."""
    result: np.ndarray = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    return result


def _box_blur(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Moving average over ``2 * radius + 1`` samples along ``axis`` (edges clamped)."""
    if radius < 1 or a.shape[axis] < 2:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    result: np.ndarray = (hi - lo) / np.float32(2 * radius + 1)
    return result


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], radius: int) -> np.ndarray:
    """Unit-variance noise low-passed by two box blurs of ``radius`` along each axis."""
    z = rng.standard_normal(shape, dtype=np.float32)
    for axis in range(z.ndim):
        r = min(radius, shape[axis] // 4)
        z = _box_blur(_box_blur(z, r, axis), r, axis)
    return z / max(float(z.std()), 1e-6)


def _upsample(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``a`` to ``shape`` (corners aligned), axis by axis."""
    for axis, n in enumerate(shape):
        m = a.shape[axis]
        pos = np.linspace(0.0, m - 1.0, n, dtype=np.float32)
        i0 = np.minimum(pos.astype(np.intp), m - 1)
        i1 = np.minimum(i0 + 1, m - 1)
        f = (pos - i0).reshape([-1 if j == axis else 1 for j in range(a.ndim)])
        a = np.take(a, i0, axis) * (1.0 - f) + np.take(a, i1, axis) * f
    return a


class _Chest:
    """Renders slices of one drawn anatomy on a fixed in-plane grid."""

    def __init__(
        self, anat: _Anatomy, shape: tuple[int, int, int], spacing: tuple[float, float, float]
    ) -> None:
        d, h, w = shape
        sz, sy, sx = spacing
        self.anat = anat
        self.y = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * sy)[:, None]
        self.x = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * sx)[None, :]
        self.z = (np.arange(d, dtype=np.float64) - (d - 1) / 2) * sz
        self.theta = np.arctan2(self.y, self.x)  # pi/2: posterior

    def slice(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) of slice ``k`` without vessels, nodules or noise, and its lung mask."""
        an, x, y, z = self.anat, self.x, self.y, float(self.z[k])
        amp, period = an.body_wave
        scale = 1.0 + amp * math.sin(2 * math.pi * z / period)
        a, b = an.body[0] * scale, an.body[1] * scale
        body = _ellipse(x, y, 0.0, 0.0, a, b)
        hu = np.where(body < 1.0, MUSCLE, AIR).astype(np.float32)
        hu[(body < 1.0) & (_ellipse(x, y, 0.0, 0.0, a - an.fat, b - an.fat) >= 1.0)] = FAT

        lung_scale = math.sqrt(max(0.0, 1.0 - (2.0 * z / an.lung_length) ** 2))
        ca, cb = (a - an.wall) * lung_scale, (b - an.wall) * lung_scale
        ribs_in = _ellipse(x, y, 0.0, 0.0, a - an.wall + 2.0, b - an.wall + 2.0)
        ribs_out = _ellipse(x, y, 0.0, 0.0, a - an.fat - 4.0, b - an.fat - 4.0)
        band = np.sin(2 * math.pi * ((z + 60.0 * self.theta) / an.rib_period + an.rib_phase))
        ribs = (ribs_in >= 1.0) & (ribs_out < 1.0) & (band > 0.55)
        ribs &= np.abs(self.theta - math.pi / 2) > 0.35
        hu[ribs] = BONE

        mx, ma, mb = an.mediastinum
        lung = (_ellipse(x, y, 0.0, 0.0, ca, cb) < 1.0) & (_ellipse(x, y, mx, 0.0, ma, mb) >= 1.0)
        sy0, sr = an.spine
        lung &= (x**2 + (y - sy0) ** 2) > (sr + 6.0) ** 2
        hu[lung] = LUNG
        hu[_ellipse(x, y, mx, 0.0, ma, mb) < 1.0] = BLOOD
        spine = x**2 + (y - sy0) ** 2
        hu[spine < sr**2] = MARROW
        hu[(spine < sr**2) & (spine > (0.8 * sr) ** 2)] = BONE
        hu[x**2 + (y - sy0 - 1.4 * sr) ** 2 < (0.4 * sr) ** 2] = BLOOD  # spinal canal
        ax, ay, ar = an.aorta
        hu[(x - ax) ** 2 + (y - ay) ** 2 < ar**2] = CONTRAST
        return hu, lung


def _draw_tube(
    hu: np.ndarray,
    lung: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    radius: float,
    spacing: np.ndarray,
) -> None:
    """Blood-density cylinder from ``p0`` to ``p1`` (mm, z y x), drawn inside the lungs."""
    reach = radius + 1.5 * spacing.max()
    lo = np.maximum(np.floor((np.minimum(p0, p1) - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((np.maximum(p0, p1) + reach) / spacing).astype(int) + 1, hu.shape)
    if np.any(hi <= lo):
        return
    zz, yy, xx = (
        (np.arange(lo[i], hi[i], dtype=np.float32) * spacing[i]).reshape(
            [-1 if j == i else 1 for j in range(3)]
        )
        for i in range(3)
    )
    d = (p1 - p0).astype(np.float32)
    t = ((zz - p0[0]) * d[0] + (yy - p0[1]) * d[1] + (xx - p0[2]) * d[2]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt(
        (zz - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2 + (xx - p0[2] - t * d[2]) ** 2
    )
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    alpha = np.clip((radius - dist) / float(spacing.min()) + 0.5, 0.0, 1.0) * lung[box]
    hu[box] += alpha * (BLOOD - hu[box])


def _draw_vessels(
    rng: np.random.Generator,
    hu: np.ndarray,
    lung: np.ndarray,
    anat: _Anatomy,
    spacing: np.ndarray,
) -> None:
    """Tapering polylines that run outward from the hilum, about one per 25 cm^3 of lung."""
    lung_idx = np.flatnonzero(lung)
    if lung_idx.size == 0:
        return
    count = round(lung_idx.size * float(np.prod(spacing)) / 2.5e4)
    extent = np.array(hu.shape) * spacing
    centre = (extent - spacing) / 2
    for start in rng.choice(lung_idx, size=count):
        p = np.array(np.unravel_index(start, hu.shape), np.float64) * spacing
        side = 1.0 if p[2] > centre[2] + anat.mediastinum[0] else -1.0
        hilum = centre + np.array([0.0, 0.0, anat.mediastinum[0] + side * anat.mediastinum[1]])
        direction = p - hilum + rng.normal(0.0, 15.0, 3)
        direction[0] += rng.normal(0.0, 40.0)  # many run through the slices: dots in 2-D
        radius = float(np.clip(3.8 - np.linalg.norm(p - hilum) / 45.0, 0.7, 3.5))
        radius *= rng.uniform(0.8, 1.2)
        for _ in range(int(rng.integers(3, 6))):
            direction /= max(float(np.linalg.norm(direction)), 1e-6)
            q = p + direction * rng.uniform(8.0, 20.0)
            _draw_tube(hu, lung, p, q, radius, spacing)
            p, radius = q, max(0.6, radius * rng.uniform(0.75, 0.95))
            direction = direction + rng.normal(0.0, 0.35, 3)


def _place_nodules(
    rng: np.random.Generator,
    lung: np.ndarray,
    spacing: np.ndarray,
    count: int,
) -> list[Nodule]:
    """Up to ``count`` spheres of 3-30 mm wholly inside the lungs, clear of each other."""
    lung_idx = np.flatnonzero(lung)
    shape = np.array(lung.shape)
    largest = min(NODULE_MM[1], float((shape * spacing).min()) - 4.0 * float(spacing.max()))
    placed: list[Nodule] = []
    for _ in range(count):
        if lung_idx.size == 0 or largest < NODULE_MM[0]:
            break
        diameter = float(rng.uniform(NODULE_MM[0], largest))
        for _ in range(200):
            c = np.array(np.unravel_index(rng.choice(lung_idx), lung.shape), np.float64) * spacing
            r = diameter / 2
            probe = np.rint((c + (r + 1.0) * _SPHERE_DIRS) / spacing).astype(int)
            inside = np.all((probe >= 0) & (probe < shape), axis=1)
            clear = all(np.linalg.norm(c - n.centre) > r + n.diameter / 2 + 3.0 for n in placed)
            if clear and inside.all() and lung[tuple(probe.T)].all():
                placed.append(Nodule((float(c[0]), float(c[1]), float(c[2])), diameter))
                break
            diameter = max(NODULE_MM[0], diameter * 0.95)  # shrink until one fits
    return placed


def _draw_nodule(
    rng: np.random.Generator,
    hu: np.ndarray,
    labels: np.ndarray,
    nodule: Nodule,
    spacing: np.ndarray,
) -> None:
    """A solid sphere (-20..60 HU, slightly lobulated density) and its label."""
    c, r = np.array(nodule.centre), nodule.diameter / 2
    reach = r + 1.5 * float(spacing.max())
    lo = np.maximum(np.floor((c - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((c + reach) / spacing).astype(int) + 1, hu.shape)
    zz, yy, xx = (
        ((np.arange(lo[i], hi[i], dtype=np.float32) * spacing[i]) - c[i]).reshape(
            [-1 if j == i else 1 for j in range(3)]
        )
        for i in range(3)
    )
    dist = np.sqrt(zz**2 + yy**2 + xx**2)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    density = rng.uniform(-20.0, 60.0) + 15.0 * _smooth_noise(rng, dist.shape, 2)
    alpha = np.clip((r - dist) / float(spacing.min()) + 0.5, 0.0, 1.0)
    hu[box] += alpha * (density - hu[box])
    labels[box][dist <= r] = NODULE


def ct_phantom(
    shape: tuple[int, int, int] = PAPER_SHAPE,
    seed: int = 0,
    spacing: tuple[float, float, float] | None = None,
    nodules: tuple[int, int] = (1, 6),
) -> CTVolume:
    """A chest CT volume of ``shape`` (z, y, x) with ``nodules[0]..nodules[1]`` nodules.

    ``spacing`` (z, y, x) mm defaults to 1 mm slices and a 360 mm field of view
    in-plane (0.70 mm at 512). Nodules that cannot fit (a thin slab) are left out.
    """
    d, h, w = shape
    if min(shape) < 1 or h < 32 or w < 32:
        raise ValueError(f"CT phantom shape {shape}: needs at least 1 x 32 x 32 voxels")
    sp = np.array(spacing or (1.0, 360.0 / h, 360.0 / w), np.float64)
    rng = np.random.default_rng(seed)
    anat = _draw_anatomy(rng, (d * float(sp[0]), h * float(sp[1]), w * float(sp[2])))
    chest = _Chest(anat, shape, (float(sp[0]), float(sp[1]), float(sp[2])))
    # tissue texture: smooth noise on a grid of about 2 mm (z) x 3 mm (in-plane)
    grid = tuple(
        max(2, math.ceil(n * s / g) + 1) for n, s, g in zip(shape, sp, (2, 3, 3), strict=True)
    )
    coarse = _upsample(_smooth_noise(rng, grid, 1), (grid[0], h, w))
    zpos = np.linspace(0.0, grid[0] - 1.0, d)
    hu = np.empty(shape, np.float32)
    lung = np.empty(shape, bool)
    for k in range(d):
        hu[k], lung[k] = chest.slice(k)
        i0 = min(int(zpos[k]), grid[0] - 1)
        f = np.float32(zpos[k] - i0)
        texture = coarse[i0] * (1 - f) + coarse[min(i0 + 1, grid[0] - 1)] * f
        hu[k] += np.where(lung[k], np.float32(25.0), np.float32(8.0)) * texture
    del coarse
    _draw_vessels(rng, hu, lung, anat, sp)
    labels = np.zeros(shape, np.uint8)
    placed = _place_nodules(rng, lung, sp, int(rng.integers(nodules[0], nodules[1] + 1)))
    for n in placed:
        _draw_nodule(rng, hu, labels, n, sp)
    del lung
    sigma = np.float32(anat.noise_hu * 3.0)  # a 3x3 box blur divides the std by 3
    for k in range(d):  # slice by slice: no volume-size temporaries
        noise = rng.standard_normal((h, w), dtype=np.float32)
        hu[k] += _box_blur(_box_blur(noise, 1, 0), 1, 1) * sigma
    out = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    origin = (-(w - 1) / 2 * sp[2], -(h - 1) / 2 * sp[1], -(d - 1) / 2 * sp[0])
    log.debug("CT phantom %s seed %d: %d nodules", shape, seed, len(placed))
    return CTVolume(
        hu=out,
        labels=labels,
        spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        nodules=tuple(placed),
        seed=seed,
    )


def training_slab(seed: int, shape: tuple[int, int, int] = (32, 256, 256)) -> CTVolume:
    """A slab drawn as the bundled CT model's were (daemon/models/train/ct.py): slices
    1-2 mm apart, a 333-384 mm field of view in-plane (1.3-1.5 mm at 256 columns),
    0-5 nodules; ``shape`` samples the same field finer or coarser (512 columns: the
    ct job's default patch, which it halves for the network)."""
    rng = np.random.default_rng([seed, 2])
    inplane = float(rng.uniform(1.3, 1.5)) * 256 / shape[2]
    spacing = (float(rng.uniform(1.0, 2.0)), inplane, inplane)
    return ct_phantom(shape, seed=seed, spacing=spacing, nodules=(0, 5))


def write_dicom_series(volume: CTVolume, folder: Path, description: str = "") -> list[Path]:
    """One CT Image Storage file per slice in ``folder`` (created); returns them in order.

    Stored as unsigned 12-bit values with RescaleIntercept -1024, slope 1. UIDs
    derive from the seed (the same phantom gives the same UIDs); slice ``k`` is
    at ``ImagePositionPatient`` z = origin z + k * spacing, axial orientation.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d, h, w = volume.hu.shape
    sz, sy, sx = volume.spacing
    x0, y0, z0 = volume.origin
    shape_text = "x".join(map(str, volume.hu.shape))
    key = f"echod-ct-phantom/{volume.seed}/{shape_text}/{volume.spacing}"
    study, series, frame = (generate_uid(entropy_srcs=[key, part]) for part in "ABC")
    stored = np.clip(volume.hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    paths = []
    for k in range(d):
        sop = generate_uid(entropy_srcs=[key, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "Phantom^Chest", f"ECHOD-{volume.seed}"
        ds.PatientPosition = "HFS"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20190101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.SeriesDescription = description or f"echod CT phantom seed {volume.seed}"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Manufacturer = "echod phantom"
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z0 + k * sz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z0 + k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{sz:.6f}"
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored[k].tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.info("wrote DICOM series of %d slices (%s) to %s", d, shape_text, folder)
    return paths


def write_image(volume: CTVolume, path: Path, labels: bool = False) -> Path:
    """HU (or, with ``labels``, the label map) as .nii.gz, .mha, .nrrd ... (SimpleITK)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.labels if labels else volume.hu)
    image.SetSpacing(tuple(reversed(volume.spacing)))
    image.SetOrigin(volume.origin)
    sitk.WriteImage(image, str(path), useCompression=True)
    return Path(path)
