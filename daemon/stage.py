"""Pipeline stages with named ports, and the loop that runs one.

A stage (Holoscan's operator) declares named input and output ports; the
supervisor wires each port to a shared-memory ring. The stage creates its
heavy resources in :meth:`Stage.setup` (inside its own process), reports
``ready``, then :meth:`Stage.step` runs until it returns ``False`` (its input
ended) or the supervisor asks it to stop. Events travel to the supervisor on a
pipe of the stage's own (:mod:`daemon.events`); frames never do. While it works
or waits, a stage sends a heartbeat every :data:`HEARTBEAT_S`: a stage silent
for ``pipeline.heartbeat_timeout_s`` is hung, and the supervisor kills it.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from daemon import logs, wakeup
from daemon.config import Config
from daemon.errors import EchodError, StageError
from daemon.frame import FrameMeta
from daemon.ring import EndOfStream, Ring, RingReader, RingWriter

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting stage re-checks the stop flag
HEARTBEAT_S = 0.5


@dataclass(frozen=True)
class InputPort:
    ring: str
    mode: Literal["all", "newest"] = "all"


@dataclass(frozen=True)
class OutputPort:
    ring: str
    policy: Literal["overwrite", "block"] = "overwrite"


@dataclass(frozen=True)
class StageSpec:
    """What the supervisor needs to start (and restart) a stage anywhere."""

    name: str
    kind: str  # key of STAGES
    inputs: dict[str, InputPort] = field(default_factory=dict)
    outputs: dict[str, OutputPort] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # what the supervisor learned
    generation: int = 0  # a hot-swap successor has the next one (same name, same reader)


class Events(Protocol):
    def put(self, obj: Any) -> None: ...


class Commands(Protocol):
    def get_nowait(self) -> Any: ...


class StopFlag(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Stage(ABC):
    """One step of the pipeline. Subclasses implement setup/step; teardown is optional."""

    def __init__(self, spec: StageSpec, config: Config, context: StageContext) -> None:
        self.spec = spec
        self.config = config
        self.ctx = context

    @abstractmethod
    def setup(self) -> dict[str, Any]:
        """Acquire resources; return facts for the ready event (engine, model...)."""

    @abstractmethod
    def step(self) -> bool:
        """Do one unit of work; ``False`` when the input has ended."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release resources (always called)."""

    def summary(self) -> dict[str, Any]:
        """Facts for the done event."""
        return {}

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Finish work in flight (the stream ended, or a successor takes over)."""

    def command(self, name: str, args: dict[str, Any]) -> Any:
        """A request from the supervisor (run-time setting, screenshot, handover...). Every
        stage takes ``set`` ``logging.level`` (a SIGHUP reload)."""
        if name == "set" and args.get("key") == "logging.level":
            logs.set_level(str(args["value"]))
            return {"level": args["value"]}
        raise StageError(f"stage '{self.spec.name}' has no command '{name}'")


class StageContext:
    """A stage's view of its rings, the stop flag and the supervisor's event queue."""

    def __init__(
        self, spec: StageSpec, events: Events, stop: StopFlag, commands: Commands | None = None
    ) -> None:
        self.spec = spec
        self.events = events
        self.stop = stop
        self.commands = commands
        self._beat = time.monotonic()
        self._rings: dict[str, Ring] = {}
        self._readers: dict[str, RingReader] = {}
        self._writers: dict[str, RingWriter] = {}

    def _ring(self, name: str) -> Ring:
        if name not in self._rings:
            self._rings[name] = Ring.attach(name)
        return self._rings[name]

    def input(self, port: str, keep: int = 0) -> RingReader:
        """The reader of an input port (``keep``: earlier frames it also reads, a sequence
        window: :meth:`daemon.ring.Ring.reader`)."""
        if port not in self._readers:
            p = self.spec.inputs[port]
            self._readers[port] = self._ring(p.ring).reader(self.spec.name, p.mode, keep)
        return self._readers[port]

    def ring(self, port: str) -> Ring:
        """The ring behind an input or output port (its size: slots, payload bytes)."""
        p = self.spec.inputs.get(port) or self.spec.outputs.get(port)
        if p is None:
            raise StageError(f"stage '{self.spec.name}' has no port '{port}'")
        return self._ring(p.ring)

    def readers(self) -> list[RingReader]:
        return list(self._readers.values())

    def output(self, port: str) -> RingWriter:
        if port not in self._writers:
            p = self.spec.outputs[port]
            self._writers[port] = self._ring(p.ring).writer(p.policy)
        return self._writers[port]

    def send(self, port: str, image: np.ndarray, meta: FrameMeta) -> bool:
        """Write a frame to an output port, waiting for slow "all" readers (``block``)
        but never past a stop request. ``False`` if stopped before it was written."""
        writer = self.output(port)
        while not self.stop.is_set():
            try:
                writer.write(image, meta, timeout=POLL_S)
                return True
            except TimeoutError:
                self.beat()  # waiting for a slow reader is not hanging
        return False

    def claim(self, port: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
        """The next slot of an output port to fill in place (then ``output(port).publish``),
        waiting for slow "all" readers as :meth:`send` does; None if stopped first."""
        writer = self.output(port)
        while not self.stop.is_set():
            try:
                return writer.claim(shape, dtype, timeout=POLL_S)
            except TimeoutError:
                self.beat()
        return None

    def beat(self) -> None:
        """A heartbeat, at most every :data:`HEARTBEAT_S` (call it freely)."""
        now = time.monotonic()
        if now - self._beat >= HEARTBEAT_S:
            self._beat = now
            self.report("heartbeat")

    def report(self, event: str, **data: Any) -> None:
        self.events.put(
            {
                "stage": self.spec.name,
                "generation": self.spec.generation,
                "event": event,
                "t": time.time(),
                **data,
            }
        )

    def close(self, finished: bool) -> None:
        """Unmap the rings. ``finished``: the stage ended its stream (not a crash), so
        downstream is told the stream ended and this stage's reader entries are released;
        after a crash they stay, and the restarted stage resumes their cursors."""
        if finished:
            for reader in self._readers.values():
                reader.close()
            for writer in self._writers.values():
                writer.close_stream()
        for ring in self._rings.values():
            ring.close()


RETIRE = "retire"  # the supervisor's command to hand this stage's place to a successor

_running = threading.local()  # the StageContext of the stage this thread runs


def progress(note: str) -> None:
    """Say that a long start-up is getting on (an engine build: each phase, each tenth):
    the supervisor restarts this stage's ``stage_timeout_s`` clock and asks systemd for
    more time (EXTEND_TIMEOUT_USEC). At most one event per :data:`HEARTBEAT_S`; a no-op
    outside a stage."""
    ctx: StageContext | None = getattr(_running, "ctx", None)
    now = time.monotonic()
    if ctx is not None and now - ctx._beat >= HEARTBEAT_S:
        ctx._beat = now
        ctx.report("progress", note=note)


SPIN_AUTO_US, SPIN_AUTO_CORES = 1000, 8
COMMAND_POLL_S = 0.002
"""How often a running stage looks for the supervisor's commands: a look is a system call
(``poll``), too dear per frame at thousands of frames a second."""


def spin_seconds(setting: int | str) -> float:
    """``pipeline.spin_us`` in seconds, "auto" resolved for this machine's cores."""
    if setting == "auto":
        return SPIN_AUTO_US / 1e6 if len(os.sched_getaffinity(0)) >= SPIN_AUTO_CORES else 0.0
    return int(setting) / 1e6


def run_stage(
    stage_cls: type[Stage],
    spec: StageSpec,
    config: Config,
    events: Events,
    stop: StopFlag,
    commands: Commands | None = None,
    freeze_gc: bool = False,
) -> int:
    """Run one stage to completion; the body of a stage process or thread.

    ``freeze_gc`` (a stage process): once set up, everything it holds (an engine's
    library: torch alone is ~200,000 objects) leaves the garbage collector's view, so
    a full collection while frames flow takes microseconds, not a frame's worth of ms;
    and a module it imports after setup (a hitch in the stream: tens of ms) is logged
    at the end, so that it is found and imported at setup instead.

    Returns the exit code: 0 when done, stopped or retired, the error's exit
    code when setup or a step failed (the failure is reported first). A retired
    stage leaves its reader cursors and output streams open for its successor.
    """
    ctx = StageContext(spec, events, stop, commands)
    wakeup.set_spin(spin_seconds(config.pipeline.spin_us))
    stage: Stage | None = None
    finished = False
    try:
        stage = stage_cls(spec, config, ctx)
        _running.ctx = ctx
        try:
            facts = stage.setup()
        finally:
            _running.ctx = None
        loaded = set(sys.modules) if freeze_gc else None
        if freeze_gc:
            gc.collect()
            gc.freeze()
        ctx.report("ready", **facts)
        next_poll = 0.0
        while not stop.is_set():
            if commands is not None and (now := time.monotonic()) >= next_poll:
                next_poll = now + COMMAND_POLL_S
                if _serve_commands(stage, ctx, commands):
                    return 0  # retired: `finished` stays False
            try:
                if not stage.step():
                    break
            except EndOfStream:
                stage.flush()
                break
            ctx.beat()
        finished = True
        if loaded is not None and (late := sorted(set(sys.modules) - loaded)):
            log.info(
                "stage %s imported %d module(s) while frames flowed, a hitch each: %s",
                spec.name,
                len(late),
                ", ".join(late[:8]),
            )
        ctx.report("done", **stage.summary())
        return 0
    except EchodError as e:
        ctx.report("failed", error=e.to_dict(), fatal=e.fatal)
        return e.exit_code
    except Exception as e:  # a bug or a library's error: one line, the supervisor decides
        log.debug("stage %s crashed", spec.name, exc_info=True)
        message = f"{type(e).__name__}: {_first_line(e)}"
        ctx.report("failed", error={"code": "internal", "message": message}, fatal=False)
        return 70
    finally:
        if stage is not None:
            stage.teardown()
        ctx.close(finished)


def _first_line(e: BaseException) -> str:
    """An exception's message cut to its first non-empty line (engines raise pages)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else "(no message)"


def _serve_commands(stage: Stage, ctx: StageContext, commands: Commands) -> bool:
    """Answer pending supervisor commands; True when told to retire."""
    while True:
        try:
            token, name, args = commands.get_nowait()
        except queue.Empty:
            return False
        if name == RETIRE:
            stage.flush()
            for reader in ctx.readers():
                reader.release()  # the successor starts after the last frame done here
            ctx.report("reply", token=token, result={"retired": True})
            return True
        try:
            ctx.report("reply", token=token, result=stage.command(name, args))
        except EchodError as e:
            ctx.report("reply", token=token, error=e.to_dict())
