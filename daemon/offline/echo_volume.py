"""``echo-volume``: the built-in job kind that exercises the job system end to end.

It reads a volume (NIfTI, MetaImage: anything SimpleITK reads; or a folder holding one
DICOM series, as the DICOM node hands one over), runs the bundled
CT model (or the job's model) over it slab by slab (``slab`` slices, each resized
in-plane to the network's size and back), and writes the label volume as NIfTI
with the input's geometry. Each slab is a unit: its labels go to the work folder
and are recorded before the next starts, so an interrupted job resumes at the
first unfinished slab and the output is the same as an uninterrupted run's.
The CT job (``ct``) is the full case: DICOM series, overlapping patches, DICOM SEG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from daemon.engines import registry
from daemon.engines.card import load_card
from daemon.errors import EchodError
from daemon.models import BUNDLED, CT
from daemon.offline.kind import JobContext, JobInputError, JobKind, KindOptions


class EchoVolumeOptions(KindOptions):
    slab: int = Field(32, ge=1, le=512, description="slices per unit of work")


class EchoVolume(JobKind):
    name = "echo-volume"
    Options = EchoVolumeOptions

    @classmethod
    def check(cls, path: Path, options: Any) -> None:
        import SimpleITK as sitk

        if path.is_dir():
            _series(path)
            return
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise JobInputError(
                f"{path.name} is not a volume SimpleITK can read (NIfTI, MetaImage, NRRD)"
            ) from None
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            raise JobInputError(
                f"{path.name} is {reader.GetDimension()}-D with "
                f"{reader.GetNumberOfComponents()} components: a 3-D scalar volume is needed"
            )

    def run(self, ctx: JobContext) -> dict[str, Any]:
        import SimpleITK as sitk

        self.check(ctx.input, ctx.options)
        with ctx.phase("read"):
            image = (
                sitk.ReadImage(_series(ctx.input))
                if ctx.input.is_dir()
                else sitk.ReadImage(str(ctx.input))
            )
            volume = sitk.GetArrayViewFromImage(image)  # (z, y, x)
        model = ctx.model or BUNDLED / CT
        card = load_card(model)
        norm = card.input.normalisation
        lo, hi = norm.clip or (-np.inf, np.inf)
        mean, std = (norm.mean or (0.0,))[0], (norm.std or (1.0,))[0]
        with ctx.phase("load"):
            order = [ctx.engine] if ctx.engine else registry.preference(ctx.device)
            engine_cls, _ = registry.select(order, ctx.device, model)
            engine = engine_cls()
            engine.load(model, ctx.device, **({"threads": ctx.threads} if ctx.threads else {}))
        spec, out_spec = engine.inputs[0], engine.outputs[0]
        depth, height, width = (d or 32 for d in spec.shape[2:5])
        z = volume.shape[0]
        step = ctx.options.slab
        units = [(i, min(i + step, z)) for i in range(0, z, step)]
        try:
            for n, (z0, z1) in enumerate(units):
                unit = f"slab-{z0:05d}"
                if ctx.done(unit):
                    continue
                with ctx.phase("inference"):
                    labels = np.concatenate(
                        [
                            self._slab(
                                engine,
                                (spec.name, out_spec.name),
                                volume[s : min(s + depth, z1)],
                                (depth, height, width),
                                (lo, hi, norm.scale, mean, std),
                            )
                            for s in range(z0, z1, depth)
                        ]
                    )
                _save_atomic(ctx.work / f"{unit}.npy", labels)
                ctx.mark(unit)
                ctx.progress(n + 1, len(units), "slabs")
        finally:
            engine.close()
        with ctx.phase("write"):
            labels = np.concatenate([np.load(ctx.work / f"slab-{z0:05d}.npy") for z0, _ in units])
            out = sitk.GetImageFromArray(labels)
            out.CopyInformation(image)
            sitk.WriteImage(out, str(ctx.output / "labels.nii.gz"), useCompression=True)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        names = [c.name for c in card.class_list(max(2, out_spec.channels or 2))]
        counts = np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
        return {
            "outputs": {"labels": "labels.nii.gz"},
            "slabs": len(units),
            "volume_ml": {
                name: round(float(c) * voxel_ml, 3)
                for name, c in zip(names[1:], counts[1:], strict=True)
            },
        }

    @staticmethod
    def _slab(
        engine: Any,
        names: tuple[str, str],
        slab: np.ndarray,
        size: tuple[int, int, int],
        norm: tuple[float, float, float, float, float],
    ) -> np.ndarray:
        """Labels (k, y, x) for ``k <= depth`` slices: resized in-plane, padded in depth."""
        import cv2

        depth, height, width = size
        lo, hi, scale, mean, std = norm
        k, y, x = slab.shape
        net = np.zeros((1, 1, depth, height, width), np.float32)
        for i in range(k):
            plane = np.clip(slab[i].astype(np.float32), lo, hi)
            net[0, 0, i] = cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
        net[0, 0, :k] = (net[0, 0, :k] * scale - mean) / std
        try:
            probabilities = engine.run({names[0]: net})[names[1]]
        except EchodError:
            raise
        except Exception as e:
            raise JobInputError(f"the model cannot run this volume's slabs: {e}") from None
        labels = probabilities[0].argmax(axis=0).astype(np.uint8)[:k]
        return np.stack(
            [cv2.resize(p, (x, y), interpolation=cv2.INTER_NEAREST_EXACT) for p in labels]
        )


def _series(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in slice order (GDCM's sort)."""
    import SimpleITK as sitk

    if not any(folder.glob("*.dcm")):
        raise JobInputError(f"{folder.name} is a folder without .dcm files: give one volume")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise JobInputError(f"{folder.name} holds {len(ids)} DICOM series: one is needed")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
