"""A JobContext of real folders without the job system, for tests that run a kind directly.

Units done are a set; every ``progress`` call is recorded in ``calls`` and then handed
to ``on_progress`` (a test stops a run there by raising, or kills a worker); phases are
listed in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Ctx:
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
    manifest: dict[str, Any] = field(default_factory=dict)
    on_progress: Callable[[Ctx, int, int, str], None] | None = None

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
        yield


def in_folders(root: Path, input: Path, options: Any, **kw: Any) -> Ctx:
    """A context whose output and work folders are made under ``root``."""
    (root / "out").mkdir(parents=True)
    (root / "work").mkdir(exist_ok=True)
    return Ctx(input, root / "out", root / "work", options, **kw)
