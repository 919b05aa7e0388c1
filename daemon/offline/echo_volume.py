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

import functools
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from daemon.engines import registry
from daemon.engines.base import Engine
from daemon.engines.card import load_card
from daemon.errors import EchodError
from daemon.models import BUNDLED, CT
from daemon.offline.kind import (
    JobContext,
    JobInputError,
    KindOptions,
    ModelSpec,
    Plan,
    Unit,
    UnitKind,
    load_unit,
    stamp,
)


class EchoVolumeOptions(KindOptions):
    slab: int = Field(32, ge=1, le=512, description="slices per unit of work")


class EchoVolume(UnitKind):
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

    def plan(self, ctx: JobContext) -> Plan:
        self.check(ctx.input, ctx.options)
        with ctx.phase("read"):
            image = _image(str(ctx.input), stamp(ctx.input))
        model = ctx.model or BUNDLED / CT
        card = load_card(model)
        norm = card.input.normalisation
        lo, hi = norm.clip or (-np.inf, np.inf)
        mean, std = (norm.mean or (0.0,))[0], (norm.std or (1.0,))[0]
        z, step = image.GetSize()[2], ctx.options.slab
        units = [
            Unit(
                f"slab-{z0:05d}",
                segment_slab,
                (
                    str(ctx.input),
                    stamp(ctx.input),
                    z0,
                    min(z0 + step, z),
                    (lo, hi, norm.scale, mean, std),
                ),
            )
            for z0 in range(0, z, step)
        ]
        spec = ModelSpec(
            "daemon.offline.echo_volume:load_engine",
            str(model),
            ctx.engine,
            ctx.device,
            ctx.threads,
        )
        geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        return Plan(spec, units, "slabs", (geometry, card))

    def assemble(self, ctx: JobContext, plan: Plan) -> dict[str, Any]:
        import SimpleITK as sitk

        (spacing, origin, direction), card = plan.state
        with ctx.phase("write"):
            labels = np.concatenate([load_unit(ctx, u.id) for u in plan.units])
            out = sitk.GetImageFromArray(labels)
            out.SetSpacing(spacing)
            out.SetOrigin(origin)
            out.SetDirection(direction)
            sitk.WriteImage(out, str(ctx.output / "labels.nii.gz"), useCompression=True)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        names = [c.name for c in card.class_list(max(2, int(labels.max(initial=0)) + 1))]
        counts = np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
        return {
            "outputs": {"labels": "labels.nii.gz"},
            "slabs": len(plan.units),
            "volume_ml": {
                name: round(float(c) * voxel_ml, 3)
                for name, c in zip(names[1:], counts[1:], strict=True)
            },
        }


def load_engine(model: Path, engine: str | None, device: str, threads: int) -> Engine:
    """The engine for ``model`` (the job's engine, or the best one on ``device``)."""
    order = [engine] if engine else registry.preference(device)
    engine_cls, _ = registry.select(order, device, model)
    eng = engine_cls()
    eng.load(model, device, **({"threads": threads} if threads else {}))
    return eng


def segment_slab(
    engine: Engine,
    path: str,
    mtime: int,
    z0: int,
    z1: int,
    norm: tuple[float, float, float, float, float],
) -> np.ndarray:
    """Labels (z1 - z0, y, x) of slices ``z0:z1`` of the volume at ``path``, in pieces of
    the network's depth, each resized in-plane to its size and back."""
    import SimpleITK as sitk

    volume = sitk.GetArrayViewFromImage(_image(path, mtime))  # (z, y, x)
    spec, out_spec = engine.inputs[0], engine.outputs[0]
    depth, height, width = (d or 32 for d in spec.shape[2:5])
    return np.concatenate(
        [
            _slab(
                engine,
                (spec.name, out_spec.name),
                volume[s : min(s + depth, z1)],
                (depth, height, width),
                norm,
            )
            for s in range(z0, z1, depth)
        ]
    )


def _slab(
    engine: Engine,
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
    return np.stack([cv2.resize(p, (x, y), interpolation=cv2.INTER_NEAREST_EXACT) for p in labels])


@functools.lru_cache(maxsize=1)
def _image(path: str, mtime: int) -> Any:
    """The volume at ``path`` (a file, or a folder of one DICOM series), read once per
    process for all the slabs that need it."""
    import SimpleITK as sitk

    folder = Path(path)
    return sitk.ReadImage(_series(folder)) if folder.is_dir() else sitk.ReadImage(path)


def _series(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in slice order (GDCM's sort)."""
    import SimpleITK as sitk

    if not any(folder.glob("*.dcm")):
        raise JobInputError(f"{folder.name} is a folder without .dcm files: give one volume")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise JobInputError(f"{folder.name} holds {len(ids)} DICOM series: one is needed")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
