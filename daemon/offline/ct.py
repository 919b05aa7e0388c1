"""The ``ct`` job: a CT volume segmented by a 3-D network, patch by patch (the paper's case 2).

The volume (a DICOM series, NIfTI or MetaImage; :mod:`daemon.offline.volumes`) is cut
into patches of ``patch`` voxels (z, y, x; the paper's 32 x 512 x 512) with
``overlap``; in the prefetch thread each batch is clipped and scaled as the model
card says (the paper's [-1200, 400] HU -> 0..1) and resized to the network's input
(32 x 256 x 256); the network runs on any engine that takes 3-D convolutions; its
probabilities are resized back to the patch and blended (``blend``) into the
original grid (:mod:`daemon.offline.tiling`); the argmax is the label volume.

Checkpoints: each batch's network output is saved in ``ctx.work`` and marked done;
a job resumed after a crash loads those and runs only the rest, with the same result.
Outputs: :mod:`daemon.offline.ct_outputs`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from daemon.engines.card import ClassCard, ModelCard
from daemon.engines.segmenter import Segmenter
from daemon.errors import ModelError
from daemon.models import BUNDLED, CT
from daemon.offline import ct_outputs, tiling, volumes
from daemon.offline.kind import JobContext, JobInputError, JobKind, KindOptions

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
        if len(spec.shape) != 5 or spec.layout not in ("NCDHW", "NDHWC"):
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
        t0 = time.perf_counter()
        y = self.seg.infer(x)
        self.timings.add("inference", time.perf_counter() - t0)
        return np.asarray(y, np.float32)

    def finish(self, y: np.ndarray) -> np.ndarray:
        """Network output -> probabilities of the foreground classes 1..C-1, (N, C-1, *patch).

        Background is 1 minus their sum (softmax sums to 1, and resizing and blending are
        convex): it is neither resized nor blended, which halves both for one class."""
        t0 = time.perf_counter()
        if self.channels_last:
            y = np.moveaxis(y, -1, 1)
        activation = self.card.output.activation
        if y.shape[1] == 1:
            y = 1 / (1 + np.exp(-y)) if activation == "none" else y
        else:
            if activation == "none":
                e = np.exp(y - y.max(axis=1, keepdims=True))
                y = e / e.sum(axis=1, keepdims=True)
            y = y[:, 1:]
        out = resize3(y, self.patch)
        self.timings.add("nn_output", time.perf_counter() - t0)
        return out


class _Checkpointed:
    """The predictor: each batch's network output saved in ``ctx.work`` and marked done;
    a batch done in an earlier attempt is loaded instead of run."""

    def __init__(self, net: Network, ctx: JobContext, batch: int, patches: int) -> None:
        self.net, self.ctx, self.batch, self.patches = net, ctx, batch, patches
        self.calls = 0
        self.resumed = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        unit = f"batch-{self.calls:05d}"
        self.calls += 1
        path = self.ctx.work / f"{unit}.npy"
        if self.ctx.done(unit) and path.is_file():
            y = np.load(path)
            self.resumed += 1
        else:
            y = self.net.infer(x)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, y)
            os.replace(tmp, path)
            self.ctx.mark(unit)
        out = self.net.finish(y)
        self.ctx.progress(min(self.calls * self.batch, self.patches), self.patches, "patches")
        return out


class CtJob(JobKind):
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
            manifest = self._write(volume, labels, net, model, ctx)
        manifest.update(
            engine={k: described[k] for k in ("engine", "engine_version", "device")},
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
        labels = np.zeros(shape, np.uint8)
        for start, block in tiling.windows(
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
        ):
            labels[start : start + block.shape[1]] = label_map(block)
        if predictor.resumed:
            log.info(
                "resumed: %d of %d batches loaded from the checkpoint", predictor.resumed, batches
            )
        return labels

    @staticmethod
    def _write(
        volume: volumes.Volume,
        labels: np.ndarray,
        net: Network,
        model: Path,
        ctx: JobContext,
    ) -> dict[str, Any]:
        classes = net.classes
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


def table3(timings: tiling.Timings, patches: int) -> dict[str, float]:
    """Mean ms per patch of each step (the paper's Table 3) and their total."""
    steps = ("generator", "nn_input", "inference", "nn_output", "stitcher")
    row = {s: round(timings.total_ms(s) / max(patches, 1), 2) for s in steps}
    row["total"] = round(sum(row.values()), 2)
    return row
