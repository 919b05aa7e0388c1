"""A live model: a frame in, its typed outputs (daemon/results.py) out.

The infer stage calls the steps separately to time each (the paper's Table 2: NN
input, NN inference, NN output)::

    net = Network.open(path, engine=None, device="cpu")
    net.check_frame(frame.shape, frame.dtype)    # once: one-line ModelError if it cannot fit
    x = net.prepare(frame)                       # resize / letterbox + normalise + layout
    p = net.submit(x)                            # up to net.depth in flight
    outputs, verdict = net.finish(net.result(p), frame.shape, x)

Each model output the card lists (``[[outputs]]``, by ``tensor`` name or position; a
legacy card is one output of its ``task``) is decoded by its role
(daemon/engines/decoders.py) into a :class:`~daemon.results.Output` named as in
:meth:`Network.describe`'s ``outputs``. A model without a card, or whose card's
segmentation output is not a map, gets its roles guessed from its output shapes, with
a warning that names the card lines that would say it.

Frames: gray frames go to 3-channel models replicated, colour frames to 1-channel
models as luminance (ITU-R 601), both said in ``describe()["input_conversion"]``.

Sequences: a card with ``[input] sequence = S`` feeds the last S frames, oldest first,
as one (1, S, C, H, W) or (1, S, H, W, C) input. Each frame is prepared once
(:meth:`Network.prepare`) and kept by its sequence number (:meth:`Network.keep`) in a
mirrored buffer, so that :meth:`Network.window` is a contiguous view, no copy. Before
S frames exist (the stream's start) the oldest frame there is stands in for the ones
before it.

The uncertainty guard (``[guard]``, daemon/engines/guard.py) judges the frame as the
Segmenter does: the first segmentation output's finding confidence and the input's
domain; a classification output is doubtful when its top probability is below
``min_confidence``. A withheld frame's label maps are blanked; its other outputs stay
in the record, and the frame is flagged so that consumers do not show them.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import numpy as np
from numpy.typing import DTypeLike

from daemon import results
from daemon.engines import decoders, loading, opencl, postprocess, precision, preprocess
from daemon.engines.base import Engine, Layout, Pending, TensorSpec, detect_layout, device_kind
from daemon.engines.card import ClassCard, ModelCard, OutputCard, RoleCard, card_path
from daemon.engines.guard import Guard, Verdict, as_plane, probabilities
from daemon.errors import ModelError
from daemon.results import NAME_BYTES, Output

log = logging.getLogger(__name__)

_IMAGE_LAYOUTS = ("NCHW", "NHWC")
_SEQUENCE_LAYOUTS = {"NSCHW": "NCHW", "NSHWC": "NHWC"}
_MAPS = ("segmentation", "confidence")
TRUSTED = Verdict(True, "", 1.0)


@dataclass(frozen=True)
class Head:
    """One decoded output: its card entry, record name, model output and meaning."""

    role: RoleCard
    name: str  # in the record and the description
    spec: TensorSpec  # the model output (layout set for maps)
    format: str | None  # detection / keypoints format
    classes: tuple[ClassCard, ...]
    names: tuple[str, ...]  # keypoint or value names
    card: ModelCard  # the model card with this output as its [output] (label maps)
    argmax: str | None = None  # the engine's output with this map's labels, if it makes one

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.role,
            "tensor": self.spec.name,
            "shape": [d for d in self.spec.shape],
            "format": self.format,
            "classes": [c.model_dump(mode="json") for c in self.classes],
            "names": list(self.names),
            "units": list(self.role.units),
            "threshold": self.role.threshold,
        }


class Network:
    """A loaded model that turns frames into typed outputs."""

    def __init__(
        self,
        engine: Engine,
        card: ModelCard,
        model: Path,
        skipped: list[str] | None = None,
        prepare: opencl.Prepare = preprocess.prepare,
        prepare_info: tuple[str, str] = ("cpu", ""),
    ) -> None:
        self.engine = engine
        self.card = card
        self.model = Path(model)
        self.skipped = skipped or []
        self._prepare = prepare
        self.prepare_info = prepare_info
        self.precision = precision.Choice("auto", "auto", self.model, "as the engine was loaded")
        name = self.model.name
        if len(engine.inputs) != 1 or not engine.outputs:
            raise ModelError(
                f"model {name} has {len(engine.inputs)} inputs and {len(engine.outputs)} "
                "outputs; echod feeds one image (or sequence) input and needs an output"
            )
        self.sequence = card.input.sequence
        spec = engine.inputs[0]
        self.input, self.frame_input = self._input_specs(spec)
        self._frame_card = self._for_frames(card)
        self._validate_input()
        self.heads: tuple[Head, ...] = tuple(self._argmax_on_device(h) for h in self._heads())
        self.guard: Guard | None = (
            Guard(card.guard.min_confidence, card.guard.domain) if card.guard else None
        )
        self.domain_workers = 0  # threads for the guard's domain checks (0: in line)
        self._domain_pool: ThreadPoolExecutor | None = None
        self._checked: tuple[tuple[int, ...], np.dtype[Any]] | None = None
        self._geometry: dict[tuple[int, int], preprocess.Geometry] = {}
        self._ring: np.ndarray | None = None  # sequences: 2M prepared frames, mirrored
        self._stamps: np.ndarray = np.full(0, -1, np.int64)

    @classmethod
    def open(
        cls, model: Path, engine: str | None = None, device: str = "cpu", **options: Any
    ) -> Network:
        """Load ``model`` with its card on ``engine`` (None: the best available on
        ``device``); ``preprocess`` ("cpu", "opencl", "auto") picks the pre-processing,
        the other ``options`` go to the engine (daemon/engines/loading.py)."""
        net = loading.open_runner(cls, model, engine, device, **options)
        net.domain_workers = domain_workers(device)
        return net

    # -- the model's input --------------------------------------------------------------

    def _input_specs(self, spec: TensorSpec) -> tuple[TensorSpec, TensorSpec]:
        """The model input (its layout known where it can be) and one frame's part of it
        (the same for S = 1; (1, C, H, W) or (1, H, W, C) of a sequence input)."""
        name, card, s = self.model.name, self.card, self.sequence
        layout = card.input.layout
        if s == 1:
            if layout in _SEQUENCE_LAYOUTS:
                raise ModelError(
                    f"model card {card_path(self.model)}: layout {layout} is for sequences; "
                    "set [input] sequence = S"
                )
            full = replace(spec, layout=cast(Layout | None, layout) or spec.layout)
            return full, full
        shape = spec.shape
        where = f"model {name} input {spec.name!r} ({', '.join(map(_dim, shape))})"
        if len(shape) != 5:
            raise ModelError(
                f"{where}: [input] sequence = {s} needs a (1, S, C, H, W) or (1, S, H, W, C) "
                f"input, the model's is {len(shape)}-D"
            )
        if shape[1] not in (s, None):
            raise ModelError(f"{where}: takes {shape[1]} frames, the card says sequence = {s}")
        if layout in _IMAGE_LAYOUTS:  # each frame's layout
            layout = "NSCHW" if layout == "NCHW" else "NSHWC"
        elif layout not in _SEQUENCE_LAYOUTS:
            layout = "NSCHW" if shape[2] in (1, 3) else "NSHWC" if shape[4] in (1, 3) else None
        if layout is None:
            raise ModelError(
                f'{where}: its layout cannot be detected; set layout = "NSCHW" or "NSHWC" '
                f"under [input] in {card_path(self.model)}"
            )
        frame_layout = cast(Layout, _SEQUENCE_LAYOUTS[layout])
        frame = TensorSpec(spec.name, (1, *shape[2:]), spec.dtype, frame_layout)
        return replace(spec, layout=None), frame

    def _for_frames(self, card: ModelCard) -> ModelCard:
        """The card as prepare() sees it: a sequence input's layout is one frame's."""
        if self.sequence == 1:
            return card
        layout = self.frame_input.layout
        return card.model_copy(update={"input": card.input.model_copy(update={"layout": layout})})

    def _validate_input(self) -> None:
        """An image input of a known layout (frames are 2-D), and the card against it."""
        spec, card, name = self.frame_input, self.card, self.model.name
        if len(spec.shape) != 4:
            raise ModelError(
                f"model {name} expects {len(spec.shape)}-D input {spec.describe()}; frames are "
                "2-D images: use a 2-D model (a model fed the last S frames says [input] "
                "sequence = S in its card)"
            )
        if spec.layout not in _IMAGE_LAYOUTS:
            raise ModelError(
                f"model {name} input {spec.describe()}: its layout cannot be detected; set "
                f'layout = "NCHW" or "NHWC" under [input] in {card_path(self.model)}'
            )
        where = f"model {name} input {spec.describe()}"
        if spec.dtype.kind != "f":
            raise ModelError(f"{where}: echod feeds floating-point inputs")
        size, fixed = card.input.size, spec.spatial
        if size is not None and any(
            f is not None and f != s for f, s in zip(fixed, size, strict=True)
        ):
            raise ModelError(f"{where}: the card's size {list(size)} does not match the model")
        c = spec.channels
        if c is not None and c not in (1, 3):
            raise ModelError(f"{where}: echod feeds 1 or 3 channels, the model has {c}")
        if c is not None and card.input.channels not in (None, c):
            raise ModelError(f"{where}: the card says {card.input.channels} channels")
        if c is not None:
            preprocess.affine(card, c)

    # -- the model's outputs ------------------------------------------------------------

    def _roles(self) -> list[tuple[RoleCard, TensorSpec]]:
        """Each decoded output's role and model output: the card's, or guessed."""
        card, outputs = self.card, self.engine.outputs
        has_card = card_path(self.model).is_file()
        if card.outputs:
            return [(r, self._tensor(r, i)) for i, r in enumerate(card.outputs)]
        (legacy,) = card.roles()
        first = outputs[0]
        if card.task == "classification" or (
            has_card and not decoders.problem(legacy, first.shape, self._map_layout(legacy, first))
        ):
            return [(legacy, first)]
        return self._guess(has_card)

    def _tensor(self, role: RoleCard, i: int) -> TensorSpec:
        outputs, name = self.engine.outputs, self.model.name
        if role.tensor:
            found = next((o for o in outputs if o.name == role.tensor), None)
            if found is None:
                have = ", ".join(repr(o.name) for o in outputs)
                raise ModelError(
                    f"model {name} has no output {role.tensor!r} (its outputs: {have}); fix "
                    f"tensor in [[outputs]] of {card_path(self.model)}"
                )
            return found
        if i >= len(outputs):
            raise ModelError(
                f"model card {card_path(self.model)} lists output {i + 1} ({role.role}); "
                f"model {name} has {len(outputs)}"
            )
        return outputs[i]

    def _guess(self, has_card: bool) -> list[tuple[RoleCard, TensorSpec]]:
        outputs, name = self.engine.outputs, self.model.name
        found, lines, texts, unknown = [], [], [], []
        for spec in outputs:
            role = decoders.guess(spec, self.frame_input.layout)
            if role is None:
                unknown.append(f"{spec.name!r} ({', '.join(map(_dim, spec.shape))})")
                continue
            role = role.model_copy(update={"tensor": spec.name})
            found.append((role, spec))
            texts.append(f"{spec.name!r} ({', '.join(map(_dim, spec.shape))}) -> {role.role}")
            extra = f', format = "{role.format}"' if role.format else ""
            lines.append(f'{{ tensor = "{spec.name}", role = "{role.role}"{extra} }}')
        why = "has no model card" if not has_card else "has a card that does not list its outputs"
        if not found:
            raise ModelError(
                f"model {name} {why} and echod cannot guess what its outputs "
                f"{', '.join(unknown)} are; list them as [[outputs]] with a role in "
                f"{card_path(self.model)}"
            )
        log.warning(
            "model %s %s: output roles guessed from their shapes: %s%s; to say so (or "
            "correct it), put in %s: outputs = [%s]",
            name,
            why,
            "; ".join(texts),
            f" (not used: {', '.join(unknown)})" if unknown else "",
            card_path(self.model),
            ", ".join(lines),
        )
        return found

    def _map_layout(self, role: RoleCard, spec: TensorSpec) -> Layout | None:
        """A map output's layout: the card's, else the input's, else detected."""
        if role.layout is not None:
            return role.layout
        if len(spec.shape) != 4:
            return spec.layout
        if self.frame_input.layout in _IMAGE_LAYOUTS:
            return self.frame_input.layout
        return detect_layout(spec.shape)

    def _heads(self) -> tuple[Head, ...]:
        heads: list[Head] = []
        used: set[str] = set()
        where = card_path(self.model)
        for role, spec in self._roles():
            layout = self._map_layout(role, spec)
            shape = spec.shape
            dims = ", ".join(map(_dim, shape))
            problem = decoders.problem(role, shape, layout)
            if problem:
                raise ModelError(
                    f"model {self.model.name} output {spec.name!r} ({dims}) cannot be role "
                    f"{role.role}: it {problem}; fix its [[outputs]] entry in {where}"
                )
            n = decoders.count(role, shape, layout)
            if role.role in _MAPS and n is not None and n > postprocess.MAX_CLASSES:
                raise ModelError(
                    f"model {self.model.name} output {spec.name!r} has {n} classes; label "
                    "maps hold at most 255"
                )
            classes = self._classes(role, n, spec, dims)
            names = self._names(role, n, spec, dims)
            head_card = self.card.model_copy(
                update={
                    "output": OutputCard(
                        layout=layout if layout == "NCHW" or layout == "NHWC" else None,
                        activation=role.activation,
                        threshold=role.threshold,
                    )
                }
            )
            heads.append(
                Head(
                    role=role,
                    name=_unique(role.tensor or role.role, used),
                    spec=replace(spec, layout=layout),
                    format=decoders.fmt(role, shape),
                    classes=classes,
                    names=names,
                    card=head_card,
                )
            )
        return tuple(heads)

    def _argmax_on_device(self, head: Head) -> Head:
        """A multi-class label map's argmax taken where the network runs, if the engine
        can (PyTorch on CUDA: in the CUDA graph), not on this process's CPU."""
        spec = head.spec
        if head.role.role != "segmentation" or spec.layout not in _IMAGE_LAYOUTS:
            return head
        if spec.channels is None or spec.channels < 2:
            return head
        name = self.engine.label_on_device(spec.name, 1 if spec.layout == "NCHW" else 3)
        return replace(head, argmax=name) if name else head

    def _classes(
        self, role: RoleCard, n: int | None, spec: TensorSpec, dims: str
    ) -> tuple[ClassCard, ...]:
        if role.role not in (*_MAPS, "classification", "detection"):
            return ()
        given = role.classes or (self.card.classes if role.role in _MAPS else ())
        if n is None:  # boxes: as many classes as the card names
            return given
        if not given:
            defaults = self.card.model_copy(update={"classes": ()}).class_list(n)
            if role.role in _MAPS:
                return defaults  # class 0 is the transparent background
            return tuple(
                c.model_copy(update={"name": f"class{i}", "opacity": 0.5})
                for i, c in enumerate(self.card.class_list(n + 1)[1:])
            )
        if len(given) != n:
            raise ModelError(
                f"model card {card_path(self.model)} lists {len(given)} classes; model "
                f"{self.model.name} output {spec.name!r} ({dims}) gives {n} ({role.role})"
            )
        return given

    def _names(self, role: RoleCard, n: int | None, spec: TensorSpec, dims: str) -> tuple[str, ...]:
        if role.role not in ("keypoints", "regression") or n is None:
            return ()
        if not role.names:
            prefix = "point" if role.role == "keypoints" else "value"
            return tuple(f"{prefix}{i}" for i in range(n))
        if len(role.names) != n or (role.units and len(role.units) != n):
            raise ModelError(
                f"model card {card_path(self.model)} names {len(role.names)} values; model "
                f"{self.model.name} output {spec.name!r} ({dims}) gives {n} ({role.role})"
            )
        return role.names

    # -- frames -------------------------------------------------------------------------

    def check_frame(self, shape: tuple[int, ...], dtype: DTypeLike | None = None) -> None:
        """One-line ModelError when frames of ``shape`` (and ``dtype``, if given) cannot
        go into this model."""
        shape = tuple(shape)
        loading.check_frame(shape, dtype)
        c = preprocess.network_channels(self.frame_input, self._frame_card, _channels(shape))
        preprocess.affine(self.card, c)
        if dtype is not None:
            self._checked = (shape, np.dtype(dtype))

    def conversion(self, frame_channels: int) -> str:
        """What happens to frames of ``frame_channels`` on the way in (run summary)."""
        c = preprocess.network_channels(self.frame_input, self._frame_card, frame_channels)
        if frame_channels == 1 and c == 3:
            return "gray frames replicated to the model's 3 channels"
        if frame_channels == 3 and c == 1:
            return "colour frames converted to luminance (ITU-R 601) for the model's 1 channel"
        return ""

    def geometry(self, frame_hw: tuple[int, int]) -> preprocess.Geometry:
        """Where frames of ``frame_hw`` lie in the network input."""
        g = self._geometry.get(frame_hw)
        if g is None:
            g = self._geometry[frame_hw] = preprocess.geometry(
                self.frame_input, self._frame_card, frame_hw
            )
        return g

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        """One frame's network input (a new array; ``frame`` is only read). With S = 1
        it is the model's input; a sequence model's input is :meth:`window`."""
        if self._checked != (frame.shape, frame.dtype):
            self.check_frame(frame.shape, frame.dtype)
        return self._prepare(frame, self.frame_input, self._frame_card)

    # -- sequences ----------------------------------------------------------------------

    def kept(self, seq: int) -> bool:
        """Whether frame ``seq``'s input is kept for :meth:`window`."""
        m = len(self._stamps)
        return m > 0 and self._stamps[seq % m] == seq

    def keep(self, seq: int, x: np.ndarray) -> None:
        """Keep frame ``seq``'s input (from :meth:`prepare`) for the windows that hold it.
        The first frame kept (or the first of a new size) fills every place: it stands in
        for the frames before it."""
        s = self.sequence
        m = s + self.depth - 1  # windows in flight never share a place with a new frame
        ring = self._ring
        if ring is None or ring.shape[1:] != x.shape[1:] or ring.dtype != x.dtype:
            ring = self._ring = np.empty((2 * m, *x.shape[1:]), x.dtype)
            ring[:] = x
            self._stamps = np.full(m, -1, np.int64)
        i = seq % m
        ring[i] = x[0]
        ring[i + m] = x[0]
        self._stamps[i] = seq

    def forget(self, seq: int) -> None:
        """Drop frame ``seq``'s input (it was torn while prepared)."""
        if self.kept(seq):
            self._stamps[seq % len(self._stamps)] = -1

    def window(self, last: int) -> np.ndarray:
        """The input for the S frames ending at ``last``, oldest first: (1, S, ...), a
        contiguous view of the kept frames (valid until S + depth - 1 more are kept)."""
        assert self._ring is not None, "keep() frames before window()"
        m = len(self._stamps)
        start = (last - self.sequence + 1) % m
        return self._ring[start : start + self.sequence][None]

    def frame_of(self, x: np.ndarray) -> np.ndarray:
        """The last frame's part of a model input (the input itself for S = 1)."""
        return x if self.sequence == 1 else x[:, -1]

    # -- inference ----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Frames worth keeping in flight with :meth:`submit` (1: it runs at once)."""
        return self.engine.depth

    def submit(self, x: np.ndarray) -> Pending:
        """Start inference on ``x`` (left unchanged until the result)."""
        return self.engine.submit({self.input.name: x})

    def submit_batch(self, xs: list[np.ndarray]) -> list[Pending]:
        """One engine call for several prepared frames (at most ``engine.max_batch``); a
        Pending per frame, in order, for :meth:`result` (its outputs may be views of the
        engine's buffers: use them before ``depth`` more submissions)."""
        batch = self.engine.submit_batch([{self.input.name: x} for x in xs])

        def row(i: int) -> Pending:
            return Pending(lambda: {k: v[i : i + 1] for k, v in batch.wait().items()}, batch.done)

        return [row(i) for i in range(len(xs))]

    def result(self, pending: Pending) -> dict[str, np.ndarray]:
        """The model's outputs for a :meth:`submit`; waits for them."""
        return pending.wait()

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.engine.run({self.input.name: x})

    def check_domain(self, x: np.ndarray) -> Future[str] | None:
        """Start the guard's domain check of input ``x`` (left unchanged until
        :meth:`finish`) on a worker thread, where this network has them
        (:attr:`domain_workers`); None: :meth:`finish` checks it in line."""
        guard = self.guard
        if guard is None or not self.domain_workers:
            return None
        if self._domain_pool is None:
            self._domain_pool = ThreadPoolExecutor(self.domain_workers, "guard")
        plane, layout = self.frame_of(x), self.frame_input.layout or "NCHW"
        return self._domain_pool.submit(lambda: guard.out_of_domain(as_plane(plane, layout)))

    def finish(
        self,
        outputs: dict[str, np.ndarray],
        frame_shape: tuple[int, ...],
        x: np.ndarray,
        domain: Future[str] | None = None,
    ) -> tuple[list[Output], Verdict]:
        """Every output decoded for a frame of ``frame_shape`` (coordinates in its
        pixels), and the guard's verdict (``x``: the input the outputs came from;
        ``domain``: its :meth:`check_domain`, None to check here)."""
        g = self.geometry((frame_shape[0], frame_shape[1]))
        decoded = [Output(h.role.role, h.name, self._decode(h, outputs, g)) for h in self.heads]
        verdict = self.judge(x, outputs, decoded, None if domain is None else domain.result())
        if not verdict.confident:
            for o in decoded:
                if o.role == "segmentation":
                    o.array[:] = 0
        return decoded, verdict

    def _decode(
        self, h: Head, outputs: dict[str, np.ndarray], g: preprocess.Geometry
    ) -> np.ndarray:
        y, role, layout = outputs[h.spec.name], h.role, h.spec.layout or "NCHW"
        if role.role == "segmentation":
            argmax = outputs[h.argmax] if h.argmax else None
            return postprocess.labels(y, h.card, g.frame, layout, geometry=g, argmax=argmax)
        if role.role == "confidence":
            return decoders.confidence(y, layout, role.activation, g)
        if role.role == "classification":
            return decoders.classification(y, role.activation)
        if role.role == "detection":
            if h.format == "anchor-free":
                return decoders.detection_anchor_free(y, role, g)
            return decoders.detection_boxes(y, role, g)
        if role.role == "keypoints":
            if h.format == "heatmaps":
                return decoders.keypoints_heatmaps(y, role, layout, g)
            return decoders.keypoints_coordinates(y, role, g)
        return decoders.regression(y)

    def judge(
        self,
        x: np.ndarray,
        outputs: dict[str, np.ndarray],
        decoded: list[Output],
        domain: str | None = None,
    ) -> Verdict:
        """The guard's verdict on one frame (always confident without a guard): the first
        segmentation output and the input as the Segmenter judges them, and each
        classification's top probability against ``min_confidence``. ``domain``: the
        input's domain check, done already (None: done here)."""
        guard = self.guard
        if guard is None:
            return TRUSTED
        if domain is None:
            domain = guard.out_of_domain(
                as_plane(self.frame_of(x), self.frame_input.layout or "NCHW")
            )
        seg = next((h for h in self.heads if h.role.role == "segmentation"), None)
        if seg is not None:
            y = outputs[seg.spec.name]
            probs = probabilities(
                postprocess.planes(y, seg.spec.layout or "NCHW"), seg.role.activation
            )
            verdict = guard.verdict(domain, probs)
        else:
            verdict = Verdict(not domain, domain, 1.0)
        for o in decoded:
            if o.role != "classification":
                continue
            top = float(o.array.max())
            if verdict.confident and top < guard.min_confidence:
                why = f"low class confidence {top:.3f} < {guard.min_confidence:.3f} ({o.name})"
                verdict = Verdict(False, why, top)
            elif top < verdict.confidence:
                verdict = Verdict(verdict.confident, verdict.reason, top)
        return verdict

    # -- start-up -----------------------------------------------------------------------

    def network_size(self) -> tuple[int | None, int | None]:
        """(h, w) the network gets; None where it follows the frame."""
        if self.card.input.size is not None:
            return self.card.input.size
        if len(self.frame_input.spatial) != 2:
            return (None, None)
        h, w = self.frame_input.spatial
        return (h, w)

    def fit_frames(self, frame_shape: tuple[int, ...]) -> None:
        """Run one blank frame of ``frame_shape`` through every step, so that a model that
        cannot take the frames fails here, at start, with a one-line ModelError (a model
        with free height/width gets the multiple its strides need probed:
        :func:`daemon.engines.loading.fit`)."""
        shape = tuple(frame_shape)
        card = self.card
        free = card.input.size is None and None in self.frame_input.spatial
        fitted = loading.fit(self.model, card, free, shape, lambda c: self._run_blank(shape, c))
        self._use_card(fitted)
        if fitted is not card:
            self._prepare = preprocess.prepare
            m = fitted.input.multiple
            self.prepare_info = ("cpu", f"frames padded to multiples of {m} on the CPU")

    def _use_card(self, card: ModelCard) -> None:
        self.card = card
        self._frame_card = self._for_frames(card)
        self._geometry.clear()

    def _run_blank(self, frame_shape: tuple[int, ...], card: ModelCard) -> None:
        self._use_card(card)
        self.finish(*self._blank(frame_shape))

    def _blank(
        self, frame_shape: tuple[int, ...]
    ) -> tuple[dict[str, np.ndarray], tuple[int, ...], np.ndarray]:
        x = self.prepare(np.zeros(frame_shape, np.uint8))
        if self.sequence > 1:
            x = np.ascontiguousarray(np.broadcast_to(x[:, None], (1, self.sequence, *x.shape[1:])))
        return self.infer(x), frame_shape, x

    def warmup(self, n: int = 3, frame_shape: tuple[int, ...] | None = None) -> float:
        """Run ``n`` blank frames through all steps; returns the last inference in ms.
        ``frame_shape`` defaults to the network size (256 where that is dynamic)."""
        if frame_shape is None:
            frame_shape = tuple(d or 256 for d in self.network_size())
        ms = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            outputs, shape, x = self._blank(frame_shape)
            ms = (time.perf_counter() - t0) * 1e3
            self.finish(outputs, shape, x, self.check_domain(x))
        log.info("%s warmed up (%d runs): %.1f ms inference", self.model.name, n, ms)
        return ms

    def record_bytes(self, frame_shape: tuple[int, ...]) -> int:
        """Bytes of the largest result record of one frame of ``frame_shape`` (detection:
        ``max_detections`` boxes), as daemon.results packs it."""
        hw = (frame_shape[0], frame_shape[1])
        largest = []
        for h in self.heads:
            role = h.role.role
            n = decoders.count(h.role, h.spec.shape, h.spec.layout) or 0
            shape = {
                "segmentation": hw,
                "confidence": (n, *decoders.confidence_size(hw)),
                "detection": (h.role.max_detections, 6),
                "keypoints": (n, 3),
            }.get(role, (n,))
            largest.append(Output(role, h.name, np.empty(shape, results.ROLE_DTYPES[role])))
        return results.nbytes(largest)

    def describe(self, frame_channels: int = 1) -> dict[str, Any]:
        """What runs: engine, device, model, input and what frames become on the way,
        outputs (name, role, classes, names, units, threshold), guard (JSON-ready). The
        first segmentation output's classes are ``classes`` (what the overlay draws)."""
        seg = next((h for h in self.heads if h.role.role == "segmentation"), None)
        return {
            "engine": self.engine.name,
            "engine_version": self.engine.version,
            "engine_skipped": list(self.skipped),
            "device": self.engine.device,
            "in_flight": self.depth,
            "precision": self.precision.precision,
            "precision_reason": self.precision.reason,
            "preprocess": self.prepare_info[0],
            "preprocess_fallback": self.prepare_info[1],
            "model": self.model.name,
            "model_path": str(self.model),
            "provenance": self.card.provenance,
            "input": {
                "name": self.input.name,
                "shape": [d for d in self.input.shape],
                "dtype": str(self.input.dtype),
                "layout": self.frame_input.layout,
                "sequence": self.sequence,
                "aspect": self.card.input.aspect,
            },
            "input_conversion": self.conversion(frame_channels),
            "network_size": list(self.network_size()),
            "classes": [c.model_dump(mode="json") for c in seg.classes] if seg else [],
            "outputs": [h.describe() for h in self.heads],
            "guard": self.card.guard.model_dump(mode="json") if self.card.guard else None,
        }

    def close(self) -> None:
        if self._domain_pool is not None:
            self._domain_pool.shutdown(cancel_futures=True)
        self.engine.close()

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


ACCELERATORS = ("cuda", "gpu", "npu", "myriad")  # device classes that leave the CPU free


def domain_workers(device: str, cores: int | None = None) -> int:
    """Threads beside the stage's own for the guard's domain checks of frames on
    ``device``: none where the engine may compute on the CPU (they would take its cores)
    or on fewer than 4 cores; else a quarter of the cores, at most 4. The checks are
    OpenCV and numpy work that mostly runs without the GIL: on a GPU they were the infer
    stage's limit (H200, the bundled model: ~1 ms of its one thread a frame, 533
    frames/s)."""
    cores = cores or os.cpu_count() or 1
    if device_kind(device) not in ACCELERATORS or cores < 4:
        return 0
    return min(4, cores // 4)


def _dim(d: int | None) -> str:
    return "?" if d is None else str(d)


def _channels(shape: tuple[int, ...]) -> int:
    return 1 if len(shape) == 2 else shape[2]


def _unique(base: str, used: set[str]) -> str:
    """``base`` cut to a record name's bytes, numbered if it is taken; added to ``used``."""
    name = base.encode()[:NAME_BYTES].decode(errors="ignore")
    n = 2
    while name in used:
        tail = f"-{n}"
        name = base.encode()[: NAME_BYTES - len(tail)].decode(errors="ignore") + tail
        n += 1
    used.add(name)
    return name
