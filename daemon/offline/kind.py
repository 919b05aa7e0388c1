"""What a job kind is, and what it gets to run with.

A kind (``echo-volume``, ``ct``, ``wsi``) is a class with a ``name``, an ``Options``
model (validated at submit: a bad option is refused before the job is queued), a
cheap :meth:`JobKind.check` of the input at submit, and :meth:`JobKind.run`, which
does the work in a worker process through a :class:`JobContext`:

- ``ctx.input``: the input path (confined to the roots, checked to exist);
- ``ctx.output``: an empty folder to write the outputs into; the job system
  renames it into place only when ``run`` returns (outputs appear whole or not at
  all), and removes it if the job fails or is cancelled;
- ``ctx.work``: a folder that survives a crash (the checkpoint's files);
- ``ctx.done(unit)`` / ``ctx.mark(unit)``: units of work (a slab, a batch of
  patches) already finished in an earlier attempt, and recording one as finished
  (call it after the unit's files in ``ctx.work`` are complete: it is committed to
  the job store, so a SIGKILL after it loses nothing);
- ``ctx.progress(done, total, what)``: progress, as counts (at most 2 events/s go
  out); it raises :class:`Cancelled` once the job is cancelled, so a kind that
  reports progress per unit is cancellable within one unit;
- ``ctx.phase(name)``: a context manager timing a phase for the manifest;
- ``ctx.model``, ``ctx.engine``, ``ctx.device``, ``ctx.threads``: the model (None:
  the kind's bundled default) and where to run it.

``run`` returns the manifest: a JSON-ready dict naming the output files (relative
to ``ctx.output``) and the figures a user wants (volumes, areas, counts).
A kind is registered in :data:`daemon.offline.kinds.KINDS` as ``"module:Class"``
and imported only in the worker that runs it.

A kind whose units are independent derives from :class:`UnitKind` instead: it says
its units as (unit id, pure function, args) in a :class:`Plan`, and how to assemble
their results; the job worker then runs them itself or hands them to a Dask cluster
(``offline.executor``, :mod:`daemon.offline.dask_executor`), checkpointing each the
same way (:func:`save_unit`).
"""

from __future__ import annotations

import importlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from daemon.errors import EchodError


class Cancelled(EchodError):
    """The job was cancelled while it ran."""

    code = "cancelled"


class JobInputError(EchodError):
    """The job's input cannot be used (wrong format, truncated, no tissue...)."""

    code = "bad_input"
    exit_code = 65


class KindOptions(BaseModel):
    """Base of a kind's options: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class JobContext(Protocol):
    input: Path
    output: Path
    work: Path
    options: Any  # the kind's Options instance
    model: Path | None
    engine: str | None
    device: str
    threads: int

    def done(self, unit: str) -> bool: ...

    def mark(self, unit: str) -> None: ...

    def progress(self, done: int, total: int, what: str) -> None: ...

    def phase(self, name: str) -> AbstractContextManager[None]: ...


@dataclass
class FolderContext:
    """A :class:`JobContext` of plain folders, without the job system: runs a kind
    directly (benchmarks, tests). Units done are a set; each ``progress`` call is
    recorded in ``calls`` and handed to ``on_progress`` (which may raise to stop the
    run); ``phases`` lists the phases in order and ``seconds`` times each."""

    input: Path
    output: Path
    work: Path
    options: Any
    model: Path | None = None
    engine: str | None = None
    device: str = "cpu"
    threads: int = 0
    marked: set[str] = field(default_factory=set)
    calls: list[tuple[int, int, str]] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    on_progress: Callable[[FolderContext, int, int, str], None] | None = None

    @classmethod
    def under(cls, root: Path, input: Path, options: Any, **kw: Any) -> FolderContext:
        """A context whose ``out`` and ``work`` folders are made under ``root``."""
        (root / "out").mkdir(parents=True)
        (root / "work").mkdir(exist_ok=True)
        return cls(input, root / "out", root / "work", options, **kw)

    def done(self, unit: str) -> bool:
        return unit in self.marked

    def mark(self, unit: str) -> None:
        self.marked.add(unit)

    def progress(self, done: int, total: int, what: str) -> None:
        self.calls.append((done, total, what))
        if self.on_progress is not None:
            self.on_progress(self, done, total, what)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.phases.append(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class JobKind(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[KindOptions]]

    @classmethod  # noqa: B027 - an optional hook
    def check(cls, path: Path, options: Any) -> None:
        """At submit, in the supervisor: refuse an input that cannot work (cheap: no
        pixel data read). Raise :class:`JobInputError` naming the problem."""

    @abstractmethod
    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Do the work; return the manifest."""


# -- kinds that work in independent units (the Dask executor) ---------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What a unit function needs loaded: ``loader`` (``"module:function"``) called once
    per process with the model path, engine, device and threads; the object it returns
    (closed with ``close()``) is the first argument of every unit function."""

    loader: str
    model: str
    engine: str | None
    device: str
    threads: int

    def load(self) -> Any:
        module, _, attr = self.loader.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        return fn(Path(self.model), self.engine, self.device, self.threads)


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``fn(loaded_model, *args)`` is a pure, module-level function
    (it runs wherever the executor sends it; it reads its input from the path in its
    args) returning a numpy array, saved as ``<id>.npy`` in ``ctx.work``; ``size``
    counts toward progress."""

    id: str
    fn: Callable[..., np.ndarray]
    args: tuple[Any, ...]
    size: int = 1


@dataclass
class Plan:
    """A job split into units: the model they need, the units in order, progress's word,
    and what :meth:`UnitKind.assemble` needs besides the units' files (the kind's own)."""

    model: ModelSpec
    units: list[Unit]
    what: str
    state: Any = None


class UnitKind(JobKind):
    """A kind made of independent units, runnable on any executor: :meth:`plan` (in the
    job worker: read headers, prepare), the units (anywhere), :meth:`assemble` (in the
    job worker: stitch the units' files from ``ctx.work``, write the outputs, return the
    manifest). :meth:`run` is the local executor: the units one after the other."""

    @abstractmethod
    def plan(self, ctx: JobContext) -> Plan: ...

    @abstractmethod
    def assemble(self, ctx: JobContext, plan: Plan) -> dict[str, Any]: ...

    def run(self, ctx: JobContext) -> dict[str, Any]:
        plan = self.plan(ctx)
        total = sum(u.size for u in plan.units)
        done = sum(u.size for u in plan.units if ctx.done(u.id))
        todo = [u for u in plan.units if not ctx.done(u.id)]
        if todo:
            with ctx.phase("load"):
                model = plan.model.load()
            try:
                for unit in todo:
                    with ctx.phase("units"):
                        result = unit.fn(model, *unit.args)
                    save_unit(ctx, unit.id, result)
                    done += unit.size
                    ctx.progress(done, total, plan.what)
            finally:
                model.close()
        return self.assemble(ctx, plan)


def save_unit(ctx: JobContext, unit: str, result: np.ndarray) -> None:
    """Write a unit's result to ``ctx.work`` (synced, renamed into place), then mark it."""
    path = ctx.work / f"{unit}.npy"
    tmp = path.with_suffix(".tmp.npy")
    with open(tmp, "wb") as f:
        np.save(f, result)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    ctx.mark(unit)


def load_unit(ctx: JobContext, unit: str) -> np.ndarray:
    result: np.ndarray = np.load(ctx.work / f"{unit}.npy")
    return result


def stamp(path: Path) -> int:
    """What says a unit's cached read of the input at ``path`` is stale (a Dask worker
    keeps it for the next unit): the newest mtime of ``path`` and everything under it
    (a folder's own mtime moves when a file is added, removed or renamed)."""
    times = [path.stat().st_mtime_ns]
    if path.is_dir():
        times += [p.stat().st_mtime_ns for p in path.rglob("*")]
    return max(times)
