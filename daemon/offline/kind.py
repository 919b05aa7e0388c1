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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Protocol

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
