"""The ``ct`` job: a CT volume segmented by a 3-D network, patch by patch (the paper's case 2).

The volume (a DICOM series, NIfTI or MetaImage; :mod:`daemon.offline.volumes`) is cut
into patches of ``patch`` voxels (z, y, x; the paper's 32 x 512 x 512) with
``overlap``; in the prefetch thread each batch is clipped and scaled as the model
card says (the paper's [-1200, 400] HU -> 0..1) and resized to the network's input
(32 x 256 x 256); the network runs on any engine that takes 3-D convolutions; its
probabilities are resized back to the patch and blended (``blend``) into the
original grid (:mod:`daemon.offline.tiling`); the argmax is the label volume.

Units and checkpoints: a unit is a batch of ``batch`` patches (one 32-slice slab at the
defaults), ``batch-NNNNN``; its network output (float32, channels first, at the
network's size) is saved in ``ctx.work`` and marked done, and a job resumed after a
crash loads those and runs only the rest, with the same result.

Two executors, one result. :meth:`CtJob.run` (local) streams: patches cut and made into
network input in a prefetch thread, the Table 3 timings. On Dask (:meth:`CtJob.plan`,
:meth:`CtJob.assemble`) a unit is :func:`infer_batch` on a worker: it reads the volume
from shared storage (once per worker process and input), cuts and prepares its patches
and runs the network, exactly as the local run does, and sends back only that network
output. Resizing back and blending stay on the appliance, in grid order, through the
same :func:`tiling.stitch`: blending is order-dependent in float32 (the overlap sums),
so it is done in one place and one order whatever order the units finish in, and the
output is the local executor's byte for byte (given workers whose engine computes the
same network output; CPUs of one kind do). It is also the smaller thing to send (at
the defaults a quarter of the patch's voxels per class), and the files are the same, so
a job checkpointed by one executor resumes on the other. Outputs:
:mod:`daemon.offline.ct_outputs`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from daemon.engines.base import VOLUME_LAYOUTS
from daemon.engines.card import ClassCard, ModelCard, load_card
from daemon.engines.segmenter import Segmenter
from daemon.errors import ModelError
from daemon.models import BUNDLED, CT
from daemon.offline import ct_outputs, tiling, volumes
from daemon.offline.kind import (
    JobContext,
    JobInputError,
    KindOptions,
    ModelSpec,
    Plan,
    Unit,
    UnitKind,
    load_unit,
    save_unit,
    stamp,
)

log = logging.getLogger(__name__)

Size3 = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
PAD_HU: dict[str, tiling.Pad] = {"air": volumes.AIR_HU, "edge": "edge", "reflect": "reflect"}
_CV_MAX_CHANNELS = 512  # cv2.resize takes the slices of a patch as channels up to this


class CtOptions(KindOptions):
    series: str | None = None  # SeriesInstanceUID, when the input holds several
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    blend: tiling.Blend = "gaussian"
    patch: Size3 = (32, 512, 512)  # (z, y, x) voxels of the volume per patch
    network: Size3 | None = None  # (z, y, x) the network gets; None: the model's input
    batch: Annotated[int, Field(ge=1, le=64)] = 1
    pad: Literal["air", "edge", "reflect"] = "air"  # outside the volume
    prefetch: Annotated[int, Field(ge=1, le=16)] = 2

    @field_validator("series", mode="before")
    @classmethod
    def _uid_as_text(cls, v: Any) -> Any:
        """A UID read as a number from the command line (``--series 1.2``) is text."""
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def resize3(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Linear resize of ``(..., D, H, W)`` to ``(..., *shape)``, float32 (half-pixel
    centres, as cv2): in-plane in one cv2 call that takes the slices as channels."""
    d, h, w = shape
    lead = x.shape[:-3]
    if x.shape[-2:] != (h, w):
        planes = x.reshape(-1, *x.shape[-2:])
        if len(planes) <= _CV_MAX_CHANNELS:
            hwc = cv2.resize(np.ascontiguousarray(planes.transpose(1, 2, 0)), (w, h))
            planes = np.ascontiguousarray(hwc.reshape(h, w, -1).transpose(2, 0, 1))
        else:
            planes = np.stack([cv2.resize(p, (w, h)) for p in planes])
        x = planes.reshape(*lead, -1, h, w)
    n = x.shape[-3]
    if n != d:
        pos = np.clip((np.arange(d) + 0.5) * n / d - 0.5, 0, n - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        f = (pos - i0).astype(np.float32)[:, None, None]
        x = x[..., i0, :, :] * (1 - f) + x[..., i1, :, :] * f
    return np.ascontiguousarray(x, np.float32)


def label_map(foreground: np.ndarray) -> np.ndarray:
    """uint8 labels of blended foreground probabilities (C-1, ...): the most probable class,
    background (1 - their sum) first on ties."""
    if len(foreground) == 1:
        return (foreground[0] > 0.5).view(np.uint8)
    background = 1 - foreground.sum(axis=0, keepdims=True)
    return np.argmax(np.concatenate([background, foreground]), axis=0).astype(np.uint8)


class Network:
    """NN input, inference and NN output around one loaded 3-D segmentation model."""

    def __init__(self, seg: Segmenter, options: CtOptions, timings: tiling.Timings) -> None:
        self.seg = seg
        self.card: ModelCard = seg.card
        spec = seg.input
        if len(spec.shape) != 5 or spec.layout not in VOLUME_LAYOUTS:
            raise ModelError(
                f"model {seg.model.name} input {spec.describe()}: the ct job needs a 3-D "
                "model (NCDHW or NDHWC; set layout under [input] in its card)"
            )
        self.channels_last = spec.layout == "NDHWC"
        fixed = spec.spatial
        size = options.network or tuple(f or p for f, p in zip(fixed, options.patch, strict=True))
        if any(f is not None and f != s for f, s in zip(fixed, size, strict=True)):
            raise ModelError(
                f"model {seg.model.name} takes {spec.describe()}; option network {list(size)} "
                "does not fit it"
            )
        self.size: tuple[int, int, int] = (int(size[0]), int(size[1]), int(size[2]))
        self.patch = options.patch
        self.timings = timings
        norm = self.card.input.normalisation
        self.clip = norm.clip
        self.scale = norm.scale
        self.mean = float((norm.mean or (0.0,))[0])
        self.std = float((norm.std or (1.0,))[0])
        out_c = seg.output.shape[-1 if self.channels_last else 1]
        self.classes: tuple[ClassCard, ...] = self.card.class_list(max(int(out_c or 2), 2))
        self.activation = self.card.output.activation

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """HU patches (N, D, H, W) -> network input: resized, then clipped and scaled (as
        the live pre-processing: the fewer voxels after the resize), in the model's layout."""
        t0 = time.perf_counter()
        x = resize3(batch, self.size)
        if self.clip is not None:
            np.clip(x, *self.clip, out=x)
        a = np.float32(self.scale / self.std)
        x *= a
        x -= np.float32(self.mean / self.std)
        out = x[..., None] if self.channels_last else x[:, None]
        self.timings.add("nn_input", time.perf_counter() - t0)
        return np.ascontiguousarray(out)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Network input -> its output, float32 with the channels first (N, C, D, H, W)."""
        t0 = time.perf_counter()
        y = self.channels_first(self.seg.infer(x))
        self.timings.add("inference", time.perf_counter() - t0)
        return y

    def channels_first(self, y: np.ndarray) -> np.ndarray:
        """The engine's output as float32 (N, C, D, H, W)."""
        y = np.asarray(y, np.float32)
        return np.ascontiguousarray(np.moveaxis(y, -1, 1)) if self.channels_last else y

    def finish(self, y: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = foreground(y, self.activation, self.patch)
        self.timings.add("nn_output", time.perf_counter() - t0)
        return out


def foreground(y: np.ndarray, activation: str, patch: tuple[int, int, int]) -> np.ndarray:
    """Network output (N, C, D, H, W) -> probabilities of the foreground classes 1..C-1,
    (N, C-1, *patch).

    Background is 1 minus their sum (softmax sums to 1, and resizing and blending are
    convex): it is neither resized nor blended, which halves both for one class."""
    if y.shape[1] == 1:
        y = 1 / (1 + np.exp(-y)) if activation == "none" else y
    else:
        if activation == "none":
            e = np.exp(y - y.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        y = y[:, 1:]
    return resize3(y, patch)


class _Checkpointed:
    """The local run's predictor: each batch's network output saved in ``ctx.work`` and
    marked done (the unit :func:`infer_batch` is on Dask); a batch done in an earlier
    attempt, by either executor, is loaded instead of run."""

    def __init__(self, net: Network, ctx: JobContext, batch: int, patches: int) -> None:
        self.net, self.ctx, self.batch, self.patches = net, ctx, batch, patches
        self.calls = 0
        self.resumed = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        unit = _unit(self.calls)
        self.calls += 1
        if self.ctx.done(unit) and (self.ctx.work / f"{unit}.npy").is_file():
            y = load_unit(self.ctx, unit)
            self.resumed += 1
        else:
            y = self.net.infer(x)
            save_unit(self.ctx, unit, y)
        out = self.net.finish(y)
        self.ctx.progress(min(self.calls * self.batch, self.patches), self.patches, "patches")
        return out


def _unit(i: int) -> str:
    return f"batch-{i:05d}"


class CtJob(UnitKind):
    """Segment a CT volume with a 3-D network; labels as NIfTI (+ DICOM SEG), volumes, preview."""

    name: ClassVar[str] = "ct"
    Options: ClassVar[type[KindOptions]] = CtOptions

    @classmethod
    def check(cls, path: Path, options: Any) -> None:
        if not path.exists():
            raise JobInputError(f"{path}: no such file or folder")
        volumes.check(path, getattr(options, "series", None))

    def run(self, ctx: JobContext) -> dict[str, Any]:
        options: CtOptions = ctx.options
        with ctx.phase("read"):
            volume = volumes.read(ctx.input, options.series)
        model = ctx.model or BUNDLED / CT
        timings = tiling.Timings()
        with ctx.phase("load"):
            seg = Segmenter.open(model, engine=ctx.engine, device=ctx.device, threads=ctx.threads)
        try:
            net = Network(seg, options, timings)
            described = seg.describe()
            with ctx.phase("segment"):
                labels = self._segment(volume, net, options, ctx, timings)
        finally:
            seg.close()
        with ctx.phase("write"):
            manifest = self._write(volume, labels, net.classes, model, ctx)
        manifest.update(
            engine={
                k: described[k]
                for k in ("engine", "engine_version", "device", "precision", "precision_reason")
            },
            model={"name": model.name, "provenance": net.card.provenance},
            options=options.model_dump(mode="json"),
            table3_ms_per_patch=table3(
                timings, len(tiling.grid(labels.shape, options.patch, options.overlap))
            ),
        )
        log.info("ct job done: %s", {k: manifest[k] for k in ("shape", "volume_ml")})
        return manifest

    @staticmethod
    def _segment(
        volume: volumes.Volume,
        net: Network,
        options: CtOptions,
        ctx: JobContext,
        timings: tiling.Timings,
    ) -> np.ndarray:
        shape = volume.hu.shape
        positions = tiling.grid(shape, options.patch, options.overlap)
        batches = -(-len(positions) // options.batch)
        predictor = _Checkpointed(net, ctx, options.batch, len(positions))
        labels = _labels(
            shape,
            tiling.windows(
                volume.hu,
                predictor,
                options.patch,
                overlap=options.overlap,
                blend=options.blend,
                batch=options.batch,
                pad=PAD_HU[options.pad],
                depth=options.prefetch,
                prepare=net.prepare,
                timings=timings,
            ),
        )
        if predictor.resumed:
            log.info(
                "resumed: %d of %d batches loaded from the checkpoint", predictor.resumed, batches
            )
        return labels

    # -- on an executor (Dask): units on workers, blended and written here --------------

    def plan(self, ctx: JobContext) -> Plan:
        """Batches of patches as units that read the volume and run the network themselves."""
        options: CtOptions = ctx.options
        with ctx.phase("read"):
            volume = volumes.read(ctx.input, options.series)
        model = ctx.model or BUNDLED / CT
        positions = tiling.grid(volume.hu.shape, options.patch, options.overlap)
        groups = [positions[i : i + options.batch] for i in range(0, len(positions), options.batch)]
        source = (str(ctx.input), stamp(ctx.input), options.series)
        units = [
            Unit(_unit(i), infer_batch, (*source, group, options), len(group))
            for i, group in enumerate(groups)
        ]
        spec = ModelSpec(
            "daemon.offline.ct:load_segmenter", str(model), ctx.engine, ctx.device, ctx.threads
        )
        return Plan(spec, units, "patches", (volume, groups, model))

    def assemble(self, ctx: JobContext, plan: Plan) -> dict[str, Any]:
        options: CtOptions = ctx.options
        volume, groups, model = plan.state
        card = load_card(model)
        channels: list[int] = []

        def outputs() -> Iterator[tuple[list[tiling.Position], np.ndarray]]:
            for unit, group in zip(plan.units, groups, strict=True):
                y = load_unit(ctx, unit.id)
                channels.append(y.shape[1])
                yield group, foreground(y, card.output.activation, options.patch)

        with ctx.phase("segment"):
            labels = _labels(
                volume.hu.shape,
                tiling.stitch(
                    volume.hu.shape,
                    options.patch,
                    outputs(),
                    overlap=options.overlap,
                    blend=options.blend,
                ),
            )
        classes = card.class_list(max(channels[0], 2))
        with ctx.phase("write"):
            manifest = self._write(volume, labels, classes, model, ctx)
        manifest.update(
            engine={"engine": ctx.engine, "device": ctx.device, "on": "cluster"},
            model={"name": model.name, "provenance": card.provenance},
            options=options.model_dump(mode="json"),
        )
        return manifest

    @staticmethod
    def _write(
        volume: volumes.Volume,
        labels: np.ndarray,
        classes: tuple[ClassCard, ...],
        model: Path,
        ctx: JobContext,
    ) -> dict[str, Any]:
        found = ct_outputs.findings(labels, volume, classes)
        files = {"labels": ct_outputs.LABELS}
        ct_outputs.write_labels(labels, volume, ctx.output / ct_outputs.LABELS)
        if volume.headers:
            version = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
            ct_outputs.write_seg(
                labels, volume, classes, (model.stem, version), ctx.output / ct_outputs.SEG
            )
            files["seg"] = ct_outputs.SEG
        centre = found[0]["voxel_kji"] if found else None
        ct_outputs.write_preview(labels, volume, classes, centre, ctx.output / ct_outputs.PREVIEW)
        files["preview"] = ct_outputs.PREVIEW
        return {
            "outputs": files,
            "input": {"what": volume.description, "series": volume.series_uid or None},
            "shape": list(labels.shape),
            "spacing_mm": list(volume.spacing),
            "volume_ml": ct_outputs.class_volumes(labels, volume, classes),
            "findings": found[: ct_outputs.MAX_FINDINGS],
            "findings_total": len(found),
            "warnings": list(volume.warnings),
        }


def _labels(shape: tuple[int, ...], blocks: Iterable[tuple[int, np.ndarray]]) -> np.ndarray:
    """The label volume of blended foreground row blocks ``(start, (C-1, n, y, x))``."""
    labels = np.zeros(shape, np.uint8)
    for start, block in blocks:
        labels[start : start + block.shape[1]] = label_map(block)
    return labels


def load_segmenter(model: Path, engine: str | None, device: str, threads: int) -> Segmenter:
    """The model a Dask worker keeps for the ct units (:class:`ModelSpec`'s loader)."""
    return Segmenter.open(model, engine=engine, device=device, threads=threads)


def infer_batch(
    seg: Segmenter,
    path: str,
    mtime: int,
    series: str | None,
    positions: list[tiling.Position],
    options: CtOptions,
) -> np.ndarray:
    """A unit on a Dask worker: the network output (N, C, D, H, W) of the patches at
    ``positions`` of the volume at ``path``, cut and prepared as the local run does."""
    hu = _volume(path, mtime, series).hu
    net = Network(seg, options, tiling.Timings())
    pad = PAD_HU[options.pad]
    return net.infer(
        net.prepare(np.stack([tiling.extract(hu, p, options.patch, pad) for p in positions]))
    )


@functools.lru_cache(maxsize=1)
def _volume(path: str, mtime: int, series: str | None) -> volumes.Volume:
    """The volume, read once per worker process for all the units that need it."""
    return volumes.read(Path(path), series)


def table3(timings: tiling.Timings, patches: int) -> dict[str, float]:
    """Mean ms per patch of each step (the paper's Table 3) and their total."""
    steps = ("generator", "nn_input", "inference", "nn_output", "stitcher")
    row = {s: round(timings.total_ms(s) / max(patches, 1), 2) for s in steps}
    row["total"] = round(sum(row.values()), 2)
    return row
