"""What a CT job writes: the label volume (NIfTI), a DICOM SEG, findings with their
volumes, and a PNG preview.

- ``labels.nii.gz``: uint8 labels on the input's grid, its spacing, origin and
  direction (SimpleITK writes them as NIfTI's qform/sform, RAS on disk: 3D Slicer
  shows the labels on the CT where they belong);
- ``seg.dcm``: a DICOM Segmentation (highdicom, binary, empty frames left out) whose
  frames refer to the source series' instances, one segment per class with the
  class colour (only for DICOM input);
- findings: connected components per class (SimpleITK), largest first, with volume
  in mL, centre (LPS mm) and equivalent-sphere diameter;
- ``preview.png``: axial, coronal and sagittal slices (lung window) through the
  largest finding (the volume's centre when none), labels over them in the class
  colours and opacities, pixels made square by the spacing.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from daemon.engines.card import ClassCard
from daemon.offline.volumes import Volume

log = logging.getLogger(__name__)

LABELS = "labels.nii.gz"
SEG = "seg.dcm"
PREVIEW = "preview.png"
WINDOW = (-600.0, 1500.0)  # lung window: centre, width (HU)
MAX_FINDINGS = 50


def labels_image(labels: np.ndarray, volume: Volume) -> Any:
    """The labels as a SimpleITK image with the volume's geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(labels, np.uint8))
    sz, sy, sx = volume.spacing
    image.SetSpacing((sx, sy, sz))
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(float(v) for v in volume.direction.reshape(-1)))
    return image


def write_labels(labels: np.ndarray, volume: Volume, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(labels_image(labels, volume), str(path), useCompression=True)
    return path


def findings(
    labels: np.ndarray, volume: Volume, classes: tuple[ClassCard, ...]
) -> list[dict[str, Any]]:
    """Connected components of each foreground class (26-connected), largest first."""
    import SimpleITK as sitk

    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    found: list[dict[str, Any]] = []
    for c in range(1, len(classes)):
        if not (labels == c).any():
            continue
        mask = labels_image((labels == c).astype(np.uint8), volume)
        components = sitk.ConnectedComponent(mask, True)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(components)
        for n in stats.GetLabels():
            voxels = int(stats.GetNumberOfPixels(n))
            ml = voxels * voxel_ml
            found.append(
                {
                    "class": classes[c].name,
                    "label": c,
                    "voxels": voxels,
                    "volume_ml": round(ml, 4),
                    "diameter_mm": round(float((6 * ml * 1000 / np.pi) ** (1 / 3)), 2),
                    "centre_lps_mm": [round(float(v), 2) for v in stats.GetCentroid(n)],
                    "voxel_kji": list(
                        reversed(components.TransformPhysicalPointToIndex(stats.GetCentroid(n)))
                    ),
                }
            )
    found.sort(key=lambda f: -f["voxels"])
    return found


def class_volumes(
    labels: np.ndarray, volume: Volume, classes: tuple[ClassCard, ...]
) -> dict[str, float]:
    """mL per foreground class."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    counts = np.bincount(labels.reshape(-1), minlength=len(classes))
    return {classes[c].name: round(float(counts[c]) * voxel_ml, 4) for c in range(1, len(classes))}


def _window(hu: np.ndarray) -> np.ndarray:
    centre, width = WINDOW
    return np.clip((hu - (centre - width / 2)) * (255.0 / width), 0, 255).astype(np.uint8)


def _overlay(gray: np.ndarray, lab: np.ndarray, classes: tuple[ClassCard, ...]) -> np.ndarray:
    rgb = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    for c in range(1, len(classes)):
        where = lab == c
        if where.any():
            a = classes[c].opacity or 0.5
            rgb[where] = (1 - a) * rgb[where] + a * np.asarray(classes[c].colour, np.float32)
    return rgb.astype(np.uint8)


def _resize(
    image: np.ndarray, rows_mm: float, cols_mm: float, pitch: float, nearest: bool
) -> np.ndarray:
    """Resize so that a pixel is ``pitch`` mm on each side."""
    h = max(1, round(image.shape[0] * rows_mm / pitch))
    w = max(1, round(image.shape[1] * cols_mm / pitch))
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return image if (h, w) == image.shape[:2] else cv2.resize(image, (w, h), interpolation=mode)


def write_preview(
    labels: np.ndarray,
    volume: Volume,
    classes: tuple[ClassCard, ...],
    centre: Sequence[int] | None,
    path: Path,
    height: int = 384,
) -> Path:
    """Axial | coronal | sagittal through ``centre`` (k, j, i; None: the volume's centre),
    all at one scale: the tallest view is ``height`` pixels."""
    d, h, w = labels.shape
    k, j, i = tuple(centre) if centre is not None else (d // 2, h // 2, w // 2)
    sz, sy, sx = volume.spacing
    up = volume.direction[2, 2] >= 0  # slices towards the head: put them at the top
    views = [
        (volume.hu[k], labels[k], sy, sx),
        (volume.hu[:, j, :], labels[:, j, :], sz, sx),
        (volume.hu[:, :, i], labels[:, :, i], sz, sy),
    ]
    tallest = max(v[0].shape[0] * v[2] for v in views)  # mm
    pitch = tallest / height
    panels = []
    for n, (hu, lab, row_mm, col_mm) in enumerate(views):
        if n and up:
            hu, lab = hu[::-1], lab[::-1]
        gray = _resize(_window(hu), row_mm, col_mm, pitch, nearest=False)
        lab = _resize(lab, row_mm, col_mm, pitch, nearest=True)
        panel = _overlay(gray, lab, classes)
        top = (height - panel.shape[0]) // 2
        panel = cv2.copyMakeBorder(
            panel, top, height - panel.shape[0] - top, 0, 0, cv2.BORDER_CONSTANT, value=0
        )
        panels.append(panel)
    gap = np.full((height, 4, 3), 64, np.uint8)
    strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    return path


def _code(name: str) -> tuple[Any, Any]:
    """(category, type) codes of a class: SNOMED CT where the name is known."""
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    known = {"nodule": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule)}
    if name.lower() in known:
        return known[name.lower()]
    own = CodedConcept(value=name[:16] or "class", scheme_designator="99ECHOD", meaning=name)
    return codes.SCT.Tissue, own


# Type 2 attributes (present, may be empty) that highdicom copies from the source
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def _complete(ds: Any) -> Any:
    """A copy of a source header with what real files get wrong mended: Type 2 attributes
    missing, an empty SpecificCharacterSet (the default repertoire)."""
    missing = [kw for kw in _TYPE2 if kw not in ds]
    empty_charset = "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet
    if not missing and not empty_charset:
        return ds
    ds = copy.copy(ds)
    for kw in missing:
        setattr(ds, kw, "")
    if empty_charset:
        del ds.SpecificCharacterSet
    return ds


def write_seg(
    labels: np.ndarray,
    volume: Volume,
    classes: tuple[ClassCard, ...],
    algorithm: tuple[str, str],
    path: Path,
) -> Path:
    """A DICOM SEG of ``labels`` over ``volume.headers`` (frame k refers to header k)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from daemon import __version__ as version

    name, model_version = algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=name, family=codes.cid7162.ArtificialIntelligence, version=model_version
    )
    descriptions = []
    for c in range(1, len(classes)):
        category, kind = _code(classes[c].name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=c,
                segment_label=classes[c].name,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
                display_color=hd.color.CIELabColor.from_rgb(*classes[c].colour)
                if any(classes[c].colour)
                else None,
            )
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = _segmentation(hd, volume, labels, descriptions, name, version)
    for w in caught:  # highdicom's doubts about the source's values (names, ...)
        log.info("DICOM SEG: %s", w.message)
    seg.save_as(path)
    return path


def _segmentation(
    hd: Any, volume: Volume, labels: np.ndarray, descriptions: list[Any], name: str, version: str
) -> Any:
    return hd.seg.Segmentation(
        source_images=[_complete(h) for h in volume.headers],
        pixel_array=np.ascontiguousarray(labels, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="echod",
        manufacturer_model_name="echod ct job",
        software_versions=version,
        device_serial_number="0",
        series_description=f"{name} segmentation",
        omit_empty_frames=True,
    )
