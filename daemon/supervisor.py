"""The supervisor (gunicorn's arbiter): owns the rings, starts, watches and stops stages.

It is the systemd main process: it alone installs signal handlers, sends
``READY=1`` once every stage has loaded and warmed up, pings the watchdog while
it is in control of every stage, restarts a crashed stage (the others keep
running), kills a hung one, and on every exit path removes the shared-memory
segments it created, also when a stage was killed with SIGKILL.

Its loop never blocks. Everything that takes time is a state machine that the
loop advances a tick at a time: a command to a stage is a :class:`Future`
resolved when the stage's reply event arrives (or its deadline passes); a model
hot-swap goes warming -> retiring -> announcing -> switching; a hung stage is
sent SIGABRT, then SIGKILL. So a ``ping`` and the watchdog are answered however
slow a model load is.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import faulthandler
import importlib
import logging
import multiprocessing as mp
import os
import platform
import queue
import resource
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from daemon import __version__, logs, pipeline, reload
from daemon.config import MAX_MODELS, NO_SOURCE, Config
from daemon.errors import ConfigError, EchodError, StageError, from_dict
from daemon.events import EventBus
from daemon.instance import InstanceLock
from daemon.lifeline import Lifeline
from daemon.notify import (
    MIN_WATCHDOG_S,
    extend_timeout,
    notify,
    status_text,
    under_systemd,
    watchdog_s,
)
from daemon.ring import Ring, remove_segments, remove_stale_segments
from daemon.stage import RETIRE, Stage, StageSpec, StopFlag, run_stage

log = logging.getLogger(__name__)

TICK_S = 0.2  # the loop's longest sleep
JOIN_S = 5.0  # how long a stopping stage may take before it is killed
KILL_GRACE_S = 2.0  # SIGABRT (a traceback) -> SIGKILL
CALL_TIMEOUT_S = 10.0  # a stage must answer a command within this
MAX_PENDING_CALLS = 32  # per stage: a stage that does not read its commands is not flooded
STATUS_S = 1.0  # the unit's STATUS= is refreshed at most this often
EXTEND_MARGIN_S = 10.0  # EXTEND_TIMEOUT_USEC asks for stage_timeout_s plus this


@dataclass
class Worker:
    spec: StageSpec
    handle: mp.process.BaseProcess | threading.Thread | None = None
    commands: Any = None  # the supervisor's end of the stage's command channel
    ready: bool = False
    done: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    restarts: int = 0
    restart_times: collections.deque[float] = field(default_factory=collections.deque)
    started: float = field(default_factory=time.monotonic)  # or its last start-up progress
    heartbeat: float = field(default_factory=time.monotonic)
    killing: float | None = None  # when it was found hung and sent SIGABRT
    retiring: bool = False  # a hot-swap predecessor on its way out
    replaced: bool = False  # stopped on purpose (its job was cancelled): start it again
    crash_held: dict[str, int] = field(default_factory=dict)  # ring -> frame held at a crash
    poisoned: int = 0  # frames skipped because the stage died on them
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.handle is not None and self.handle.is_alive()

    @property
    def pid(self) -> int | None:
        return getattr(self.handle, "pid", None)


@dataclass
class _Call:
    future: Future[Any]
    worker: Worker
    name: str
    deadline: float


@dataclass
class Swap:
    """A model hot-swap in progress (see :meth:`Supervisor.begin_swap`)."""

    id: str
    worker: Worker
    model: str
    deadline: float
    phase: str = "warming"  # -> retiring -> announcing -> switching
    pending: Future[Any] | None = None
    told: list[Future[Any]] = field(default_factory=list)  # other consumers told the model
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs the live pipeline of ``config`` until its source ends or it is told to stop."""

    def __init__(self, config: Config, loader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.loader = loader  # reads the configuration again (SIGHUP); None: nothing to read
        self.live = config.source.uri != NO_SOURCE
        self.threads = config.pipeline.workers == "threads"
        self._mp = mp.get_context("spawn")
        self.events = EventBus(None if self.threads else self._mp)
        self.stop: Any = threading.Event()  # the shared lifeline replaces it in run()
        self.rings: dict[str, Ring] = {}
        self.workers: dict[str, Worker] = {}
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.state = "starting"
        self.source: dict[str, Any] = {}
        self.source_state: dict[str, Any] = {}
        self.control: Any = None
        self.jobs: Any = None  # the JobService when offline.workers > 0
        self.dicom: Any = None  # the DicomNode when dicom.enabled
        self.exporter: Any = None  # the Prometheus exporter when metrics.enabled
        self.resources: dict[str, Any] = {}
        self.swap: Swap | None = None
        self.last_swap: dict[str, Any] | None = None
        self._actions: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._calls: dict[str, _Call] = {}
        self._ping_every, self.stale_s = self._staleness()
        self._last_ping = 0.0
        self._last_line = 0.0
        self._reload_asked = False
        self._reload: reload.Reload | None = None
        self._status_text = ""
        self._last_status = self._last_extend = 0.0

    def _staleness(self) -> tuple[float | None, float]:
        """The one place that says when a stage is stale: under systemd's watchdog, half of
        ``WatchdogSec=`` (which is also the ping period), else
        ``pipeline.heartbeat_timeout_s``. A stale stage stops the pings and is killed."""
        watchdog = watchdog_s()
        if watchdog is None:
            return None, self.config.pipeline.heartbeat_timeout_s
        if watchdog < MIN_WATCHDOG_S:
            raise ConfigError(
                f"WatchdogSec={watchdog:g}s is too short: stages beat every 0.5 s; "
                f"set WatchdogSec={MIN_WATCHDOG_S:g}s or more in the unit"
            )
        log.info(
            "watchdog: WatchdogSec=%gs; a stage silent for %g s is stale", watchdog, watchdog / 2
        )
        return watchdog / 2, watchdog / 2

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Start, watch until the stream ends or a stop is asked, stop; return the summary."""
        runtime = self.config.paths.runtime()
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = InstanceLock(runtime)
        lock.acquire()  # before any socket or ring is touched
        try:
            removed = remove_stale_segments()
            if removed:
                log.info("removed %d stale shared-memory segment(s) of dead daemons", len(removed))
            self.source = source = self._probe_source()
            self._open_jobs()
            if not self.threads:
                self.stop = Lifeline.create()
            previous = self._install_signals()
            try:
                specs = pipeline.job_workers(self.config) if self.jobs is not None else []
                if self.live:
                    self._create_rings(source["shape"], source["dtype"])
                    rings = {n: r.name for n, r in self.rings.items()}
                    specs = pipeline.build(self.config, rings, source["shape"]) + specs
                self.workers = {s.name: Worker(s) for s in specs}
                self._start_control()
                self._start_all()
                self._start_hospital()
                self.state = "running"
                notify("READY=1", f"STATUS=running: {source['description']}")
                self._watch()
                return self._summary(source)
            finally:
                self.state = "stopping"
                notify("STOPPING=1")
                self._stop_hospital()
                self._stop_all()
                if self.control is not None:
                    self.control.close()
                if self.jobs is not None:
                    self.jobs.close()
                self.events.close()
                self._remove_rings()
                if isinstance(self.stop, Lifeline):
                    self.stop.close()
                self._restore_signals(previous)
        finally:
            lock.release()

    def request_reload(self) -> None:
        """Read the configuration again at the loop's next tick (SIGHUP; any thread)."""
        self._reload_asked = True

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop.set()

    def _probe_source(self) -> dict[str, Any]:
        """Open the source once here so a bad one fails before anything starts."""
        if not self.live:
            return {"description": "no live source (offline jobs only)"}
        src = pipeline.open_configured(self.config.source)
        try:
            return {
                "shape": tuple(src.max_shape),
                "dtype": src.dtype,
                "description": src.description,
            }
        finally:
            src.close()

    def _create_rings(self, shape: tuple[int, ...], dtype: Any) -> None:
        """The frames ring (a reader entry per model, the display's and the recorder's) and
        a results ring per model, sized for a result record of frames of ``shape``."""
        import numpy as np

        from daemon.results import capacity

        frame_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        limit = self.config.pipeline.max_frame_bytes
        if frame_bytes > limit:
            raise StageError(
                f"frames of {shape} {np.dtype(dtype)} need {frame_bytes} bytes, more than "
                f"pipeline.max_frame_bytes = {limit}: raise it"
            )
        slots, pid = self.config.pipeline.ring_slots, os.getpid()
        self.rings["frames"] = Ring.create(
            f"{pid}-frames", slots=slots, payload_bytes=frame_bytes, max_readers=MAX_MODELS + 2
        )
        size = capacity(tuple(shape))
        for port in pipeline.results_ports(self.config):
            self.rings[port] = Ring.create(f"{pid}-{port}", slots=slots, payload_bytes=size)

    def _remove_rings(self) -> None:
        for ring in self.rings.values():
            ring.close()
            with contextlib.suppress(FileNotFoundError):
                ring.unlink()
        self.rings.clear()
        remove_segments(os.getpid())

    def _ring(self, name: str) -> Ring:
        return next(r for r in self.rings.values() if r.name == name)

    # -- starting ---------------------------------------------------------------

    def _open_jobs(self) -> None:
        """The job store, checked at start (a corrupt or unwritable one is one clear line);
        jobs a crash left running go back to the queue."""
        if self.config.offline.workers == 0:
            if not self.live:
                raise ConfigError(
                    "nothing to run: --source none takes no frames and offline.workers = 0 "
                    "takes no jobs; give a source or at least one worker"
                )
            return
        from daemon.offline.service import JobService

        self.jobs = JobService(self.config)
        if self.jobs.resumed:
            log.info("%d interrupted job(s) queued again to resume", len(self.jobs.resumed))

    def _start_all(self) -> None:
        """Inference first (the slowest to be ready: the sinks learn from it what runs),
        then the other readers, then the job workers, then the source: every reader
        exists before the first frame is written, and a job worker's start (a Python
        process importing echod, about half a second of a core before it lowers its
        priority) is over before the first live frame: started after the source, it made
        the first 50 frames of a 2-core run 30 % slower."""
        workers = [w for w in self.workers.values() if w.spec.kind == "job_worker"]
        if self.live:
            self._start_live(workers)
            return
        for w in workers:
            self._spawn(w)
        self._await_ready(workers)

    def _start_live(self, jobs: list[Worker]) -> None:
        """Every model's infer stage at once (each runs one frame of the real size through
        every step: a misfit exits 65), then the consumers, told what each model is, then
        the job workers (``jobs``), then the source."""
        infers = self.infer_workers()
        for w in infers:
            self._spawn(w)
        self._await_ready(infers)
        first = infers[0].info
        running = {k: first.get(k) for k in ("engine", "device", "classes", "outputs")}
        running["model"] = first.get("model_path")
        running["models"] = [_described(w) for w in infers]
        others = [
            w
            for w in self.workers.values()
            if w.spec.kind not in ("infer", "acquire", "job_worker")
        ]
        for w in others:
            w.spec = dataclasses.replace(w.spec, params={**w.spec.params, **running})
        for wave in (others, jobs, [self.workers["acquire"]]):
            for w in wave:
                self._spawn(w)
            self._await_ready(wave)

    def _spawn(self, w: Worker) -> None:
        w.commands, theirs = self.events.commands()
        channel = self.events.channel()
        args = (w.spec, self.config, channel, self.stop, theirs)
        if self.threads:
            w.handle = threading.Thread(
                target=_thread_main, args=args, name=f"echod-{w.spec.name}", daemon=True
            )
        else:
            w.handle = self._mp.Process(
                target=_process_main, args=args, name=f"echod-{w.spec.name}"
            )
        w.ready, w.failure, w.killing = False, None, None
        w.started = w.heartbeat = time.monotonic()
        w.handle.start()
        if not self.threads:  # the child has its copies: its death shows as end of pipe
            channel.close()
            theirs.close()
        self.publish("stage", {"stage": w.spec.name, "state": "started", "restarts": w.restarts})
        log.info("stage %s started (pid %s)", w.spec.name, w.pid or "thread")

    def _await_ready(self, wave: list[Worker]) -> None:
        """Until every stage of ``wave`` is ready; each has ``stage_timeout_s`` from its start
        or its last progress (an engine build), and systemd is asked for as long."""
        timeout = self.config.pipeline.stage_timeout_s
        self._extend_start(force=True)
        while not all(w.ready for w in wave):
            if self.stop.is_set():
                raise StageError(f"stopped while starting ({self.stop_reason})")
            self._tick(TICK_S)
            for w in wave:
                if w.failure is not None:
                    raise from_dict(w.failure["error"])
                if not w.ready and not w.alive and not self.events.pending():
                    raise StageError(
                        f"stage '{w.spec.name}' exited with code {_exitcode(w)} while starting;"
                        " see its log above"
                    )
            now = time.monotonic()
            late = [w.spec.name for w in wave if not w.ready and now - w.started > timeout]
            if late:
                raise StageError(
                    f"stage(s) {', '.join(late)} did not report ready (or progress) within "
                    f"{timeout:g} s: raise pipeline.stage_timeout_s or check the model and the"
                    " engine"
                )

    def _extend_start(self, force: bool = False) -> None:
        """While starting, ask systemd for ``stage_timeout_s`` more (EXTEND_TIMEOUT_USEC):
        at each wave, and as a stage reports progress (at most once a second)."""
        now = time.monotonic()
        if self.state == "starting" and (force or now - self._last_extend >= STATUS_S):
            self._last_extend = now
            extend_timeout(self.config.pipeline.stage_timeout_s + EXTEND_MARGIN_S)

    # -- watching ---------------------------------------------------------------

    def _watch(self) -> None:
        """Until the sink has seen the end of the stream, or a stop is requested."""
        sink = self.workers.get("sink")
        while (sink is None or sink.done is None) and not self.stop.is_set():
            self._tick(TICK_S)
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.retiring:
                    continue
                if w.failure is not None and w.failure.get("fatal"):
                    raise from_dict(w.failure["error"])
                if w.done is None and not w.alive and w.replaced:
                    w.replaced = False
                    self._spawn(w)
                elif w.done is None and not w.alive:
                    if not self.events.pending():
                        self._restart(w)
                elif w.done is None:
                    self._check_hung(w, now)
            self._waiting_line(now)

    def _tick(self, timeout: float) -> None:
        """One turn of the loop: events, control actions, deadlines, the swap, the watchdog.
        Sleeps at most ``timeout`` (less when an event or a control action arrives)."""
        for event in self.events.get(timeout):
            self._handle(event)
        self._run_actions()
        now = time.monotonic()
        self._expire_calls(now)
        self._advance_swap(now)
        if self._reload_asked:
            self._reload_asked = False
            self._reload = reload.Reload(self)
        if self._reload is not None and self._reload.finished():
            self._reload = None
        if self._ping_every and now - self._last_ping >= self._ping_every and self._healthy(now):
            notify("WATCHDOG=1")
            self._last_ping = now
        self._refresh_status(now)

    def _check_hung(self, w: Worker, now: float) -> None:
        """A stage alive but silent (a driver stuck in a call) is killed, then restarted:
        SIGABRT first (its traceback goes to the log), SIGKILL if that does not end it."""
        if self.threads or w.pid is None:
            return
        if w.killing is not None:
            if now - w.killing > KILL_GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
            return
        cfg = self.config.pipeline
        since, limit = (
            (w.heartbeat, self._patience(w)) if w.ready else (w.started, cfg.stage_timeout_s)
        )
        if now - since <= limit:
            return
        what = "no heartbeat" if w.ready else "not ready"
        log.error(
            "stage %s hung (%s for %.1f s): killing it (SIGABRT, then SIGKILL)",
            w.spec.name,
            what,
            now - since,
        )
        self.publish("stage", {"stage": w.spec.name, "state": "hung", "silent_s": now - since})
        self.say(f"stage {w.spec.name} hung ({what} for {now - since:.1f} s): killing it")
        w.failure = {"error": {"code": "stage", "message": f"hung ({what} for {limit:g} s)"}}
        w.killing = now
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGABRT)

    def _restart(self, w: Worker) -> None:
        reason = (w.failure or {}).get("error", {}).get("message") or f"exit code {_exitcode(w)}"
        cfg = self.config.pipeline
        now = time.monotonic()
        while w.restart_times and now - w.restart_times[0] > cfg.restart_window_s:
            w.restart_times.popleft()
        if self.threads or len(w.restart_times) >= cfg.max_restarts:
            raise StageError(
                f"stage '{w.spec.name}' died ({reason}) and is not restarted again: "
                f"{len(w.restart_times)} restart(s) within {cfg.restart_window_s:g} s"
                f" (pipeline.max_restarts = {cfg.max_restarts})"
            )
        self._skip_poison(w)
        w.restarts += 1
        w.restart_times.append(now)
        self.publish("stage", {"stage": w.spec.name, "state": "died", "reason": reason})
        log.warning("stage %s died (%s): restart %d", w.spec.name, reason, w.restarts)
        self.say(f"stage {w.spec.name} died ({reason}): restart {w.restarts}")
        self._spawn(w)

    def _skip_poison(self, w: Worker) -> None:
        """The poison-pill rule: the frame a stage held when it died is skipped on restart
        if the stage failed on it (an error while working), or if it already died once
        holding that same frame (killed from outside, it is delivered once more)."""
        hung_or_failed = w.failure is not None
        for port in w.spec.inputs.values():
            ring = self._ring(port.ring)
            held = ring.held(w.spec.name)
            if held is None:
                continue
            if hung_or_failed or w.crash_held.get(port.ring) == held:
                ring.skip_held(w.spec.name)
                w.poisoned += 1
                log.warning(
                    "frame %d of ring %s skipped: stage %s died on it",
                    held,
                    port.ring,
                    w.spec.name,
                    extra={"frame": held},
                )
            else:
                w.crash_held[port.ring] = held

    def _patience(self, w: Worker) -> float:
        """How long a running stage may be silent: :attr:`stale_s`, or its own (a job worker
        beats once per unit of work)."""
        patience: float = w.spec.params.get("heartbeat_timeout_s", self.stale_s)
        return patience

    def _healthy(self, now: float) -> bool:
        """The watchdog's question: is every stage done, starting within its time, or fresh?
        A stale one (hung, or being killed) stops the pings until its restart is under way:
        if the supervisor cannot replace it, systemd's watchdog takes over."""
        cfg = self.config.pipeline
        for w in self.workers.values():
            if w.done is not None or w.retiring:
                continue
            if w.killing is not None:  # found hung: no ping until it is replaced
                return False
            if w.ready:
                late = now - w.heartbeat > self._patience(w) + TICK_S
            else:
                late = now - w.started > cfg.stage_timeout_s + TICK_S
            if late:
                return False
        return True

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "reply":
            call = self._calls.pop(event["token"], None)
            if call is not None:
                if "error" in event:
                    call.future.set_exception(from_dict(event["error"]))
                else:
                    call.future.set_result(event.get("result"))
            return
        w = self._worker(event["stage"], event.get("generation", 0))
        if w is None:
            return
        w.heartbeat = time.monotonic()
        data = {k: v for k, v in event.items() if k not in ("stage", "generation", "event", "t")}
        if kind == "ready":
            w.ready = True
            w.info.update(data)
            log.info("stage %s ready%s", w.spec.name, _ready_text(data))
            log.debug("stage %s ready: %s", w.spec.name, data)
            self.publish("stage", {"stage": w.spec.name, "state": "ready"})
        elif kind == "progress" and not w.ready:  # a long start-up getting on
            w.started = w.heartbeat
            if self.swap is not None and w is self.swap.worker:
                self.swap.deadline = w.started + self.config.pipeline.stage_timeout_s
            log.debug("stage %s starting: %s", w.spec.name, data.get("note"))
            self._extend_start()
        elif kind == "stats":
            w.stats = data
            self._status_line(data)
        elif kind == "source":
            self._source_changed(data)
        elif kind == "job":
            self.publish("job", data)
        elif kind == "done":
            w.done = data
        elif kind == "failed":
            w.failure = data
            log.error("stage %s failed: %s", w.spec.name, data["error"]["message"])
            self.publish("stage", {"stage": w.spec.name, "state": "failed", **data})

    def _worker(self, name: str, generation: int) -> Worker | None:
        successor = self.swap.worker if self.swap is not None else None
        for w in (self.workers.get(name), successor):
            if w is not None and w.spec.name == name and w.spec.generation == generation:
                return w
        return None

    # -- the source ---------------------------------------------------------------

    def _source_changed(self, state: dict[str, Any]) -> None:
        self.source_state = state
        self.publish("source", state)
        line = f"source {state.get('state')}"
        if state.get("endpoint"):
            line += f": {state['endpoint']}"
        if state.get("reconnects"):
            line += f" ({state['reconnects']} reconnects)"
        log.info("%s", line)

    def _waiting_line(self, now: float) -> None:
        """Headless, a scanner that is not streaming is said once per status interval,
        also while the sink reports nothing (no frame arrives)."""
        headless = self.live and self.workers["sink"].spec.kind == "headless"
        if headless and now - self._last_line >= self.config.sink.status_interval_s:
            text = self._waiting_text()
            if text:
                self._last_line = now
                print(text, flush=True)

    def _waiting_text(self) -> str | None:
        """ "waiting for scanner at HOST:PORT ..." while the scanner is not connected."""
        state = self.source_state.get("state")
        if state in (None, "connected", "streaming"):
            return None
        since = self.source_state.get("since")
        when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "?"
        return (
            f"echod: waiting for scanner at {self.source_state.get('endpoint', '?')} "
            f"({state} since {when}, {self.source_state.get('reconnects', 0)} reconnects)"
        )

    # -- counting -----------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Frames in and out, and where the others went, per reader role:

        - ``dropped``: frames that got no label map. ``infer``: skipped by inference in
          mode ``newest`` (it took a newer one), or left in the ring or in flight (read,
          not finished) at a stop; ``torn``: overwritten while being read; ``poisoned``: a
          stage died on them.
        - ``skipped``: label maps a consumer reading the newest did not show or send
          (``display``, ``igtl_out``); in mode ``all`` every consumer gets every one.

        ``frames_in = frames_out + sum(dropped)`` once the stream has stopped, for each
        model: ``models`` has each infer stage's counts (``stage``, ``port``, ``frames_out``,
        ``dropped``, ``skipped``); the top-level ones are the first model's."""
        if not self.rings:
            return {"frames_in": 0, "frames_out": 0, "dropped": {}, "skipped": {}, "models": []}
        frames = self.rings["frames"].stats()
        models = [self._model_counts(w, frames) for w in self.infer_workers()]
        first = models[0]
        return {
            "frames_in": frames["written"],
            **{k: first[k] for k in ("frames_out", "dropped", "skipped")},
            "models": models,
        }

    def _model_counts(self, infer: Worker, frames: dict[str, Any]) -> dict[str, Any]:
        """One infer stage's share of :meth:`counts` (``frames``: the frames ring's stats)."""
        port = _port(infer)
        results = self.rings[port].stats()
        reader = frames["readers"].get(infer.spec.name, {})
        done = infer.done or {}
        skipped_by_ring = reader.get("dropped", 0) - infer.poisoned  # the ring counts both
        dropped = {
            "infer": skipped_by_ring,
            "torn": done.get("torn", 0),
            "poisoned": infer.poisoned,
            "rejected": done.get("rejected", 0),
        }
        if infer.done is not None:  # stopped: frames left in the ring, and those in flight
            due = reader.get("read", 0) - sum(dropped[k] for k in ("torn", "poisoned", "rejected"))
            dropped["infer"] += reader.get("lag", 0) + max(0, due - results["written"])
        skipped = {
            ("display" if name == "sink" else name): r["dropped"]
            for name, r in results["readers"].items()
            if r["mode"] == "newest"
        }
        return {
            "stage": infer.spec.name,
            "port": port,
            "frames_out": results["written"],
            "dropped": {k: v for k, v in dropped.items() if v},
            "skipped": skipped,
        }

    def _status_line(self, live: dict[str, Any]) -> None:
        if self.workers["sink"].spec.kind != "headless":
            return
        self._last_line = time.monotonic()
        waiting = self._waiting_text()
        if waiting:  # the fps of a scanner that is not there says nothing
            print(waiting, flush=True)
            return
        lat = live["latency_ms"]
        c = self.counts()
        if len(c["models"]) > 1:  # each model: its inference, its frames out and dropped
            ports = live.get("ports") or {}
            each = " | ".join(
                f"{m['stage']} {(ports.get(m['port']) or {}).get('inference_ms', 0.0):.1f} ms"
                f" out {m['frames_out']} dropped {sum(m['dropped'].values())}"
                for m in c["models"]
            )
            print(
                f"echod: {live['fps']:6.1f} fps | latency p50 {lat['p50']:.1f} ms p99"
                f" {lat['p99']:.1f} ms | frames in {c['frames_in']} | {each}",
                flush=True,
            )
            return
        print(
            f"echod: {live['fps']:6.1f} fps | latency p50 {lat['p50']:.1f} ms p99"
            f" {lat['p99']:.1f} ms | inference {live['inference_ms']:.1f} ms | frames in"
            f" {c['frames_in']} out {c['frames_out']} dropped {sum(c['dropped'].values())}",
            flush=True,
        )

    # -- control ----------------------------------------------------------------

    def _start_control(self) -> None:
        if not self.config.control.enabled:
            return
        from daemon.commands import ControlCommands
        from daemon.control import ControlServer

        self.control = ControlServer(
            self.config.control, self.config.paths.runtime(), ControlCommands(self), self.telemetry
        )
        self.control.start()

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.publish(topic, data)

    def in_main(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` in the supervisor's thread (from the control thread); its result, or
        the result of the Future it returns, arrives on the Future returned here."""
        fut: Future[Any] = Future()
        self._actions.put((fn, fut))
        self.events.wake()
        return fut

    def _run_actions(self) -> None:
        while True:
            try:
                fn, fut = self._actions.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except BaseException as e:  # handed to the waiting control request
                fut.set_exception(e)
                continue
            if isinstance(result, Future):
                _chain(result, fut)
            else:
                fut.set_result(result)

    def call(self, w: Worker, name: str, args: dict[str, Any] | None = None) -> Future[Any]:
        """Send a stage a command (supervisor thread); its answer arrives on the Future, or
        a StageError when the stage does not answer within ``CALL_TIMEOUT_S``."""
        fut: Future[Any] = Future()
        if sum(c.worker is w for c in self._calls.values()) >= MAX_PENDING_CALLS:
            fut.set_exception(StageError(f"stage '{w.spec.name}' is not answering commands"))
            return fut
        token = uuid.uuid4().hex
        self._calls[token] = _Call(fut, w, name, time.monotonic() + CALL_TIMEOUT_S)
        w.commands.put((token, name, args or {}))
        return fut

    def _expire_calls(self, now: float) -> None:
        for token, call in list(self._calls.items()):
            if now > call.deadline or (not call.worker.alive and not self.events.pending()):
                del self._calls[token]
                call.future.set_exception(
                    StageError(f"stage '{call.worker.spec.name}' did not answer '{call.name}'")
                )

    # -- model hot-swap -----------------------------------------------------------

    def begin_swap(
        self, path: Path, engine: str, device: str, stage: str = "infer"
    ) -> dict[str, Any]:
        """Start a hot-swap of the model infer stage ``stage`` runs (supervisor thread) and
        return at once: a successor loads and warms up in standby while the current model
        runs on; the loop then retires the old stage (it finishes what it has in flight),
        tells the sink the new model's description, and lets the successor take over the
        reader cursor (mode ``all`` loses no frame). The other models run on untouched. A
        model that fails to load is refused and the current one runs on. Each step is
        published on the ``model`` topic; one swap runs at a time."""
        if self.swap is not None:
            raise StageError(
                f"a model swap is already in progress ({self.swap.id}, {self.swap.phase}):"
                " wait for it (echod ctl model.load --wait)"
            )
        old = self.workers[stage]
        params = {
            **old.spec.params,
            "model": str(path),
            "engine": engine,
            "device": device,
            "standby": True,
        }
        new = Worker(
            dataclasses.replace(old.spec, params=params, generation=old.spec.generation + 1)
        )
        self.swap = Swap(
            uuid.uuid4().hex[:12],
            new,
            str(path),
            time.monotonic() + self.config.pipeline.stage_timeout_s,
        )
        self._spawn(new)
        return self._swap_event("warming")

    def _swap_event(self, state: str, **extra: Any) -> dict[str, Any]:
        sw = self.swap
        assert sw is not None
        event = {
            "swap": sw.id,
            "state": state,
            "stage": sw.worker.spec.name,
            "model": sw.model,
            "elapsed_s": round(time.monotonic() - sw.started, 3),
            **extra,
        }
        self.publish("model", event)
        if state in ("switched", "failed"):
            self.last_swap = event
            self.swap = None
            log.log(
                logging.INFO if state == "switched" else logging.ERROR,
                "model swap %s: %s%s",
                sw.model,
                state,
                f" ({extra['error']['message']})" if "error" in extra else "",
            )
        return event

    def _advance_swap(self, now: float) -> None:
        sw = self.swap
        if sw is None:
            return
        new, old = sw.worker, self.workers[sw.worker.spec.name]
        if sw.phase == "warming":
            if new.failure is not None:
                self._swap_failed(new.failure["error"])
            elif not new.alive and not self.events.pending():
                self._swap_failed(f"the new infer stage exited with code {_exitcode(new)}")
            elif now > sw.deadline:
                self._swap_failed(
                    f"not warmed up within {self.config.pipeline.stage_timeout_s:g} s"
                    " (pipeline.stage_timeout_s)"
                )
            elif new.ready:
                old.retiring = True
                sw.phase, sw.pending = "retiring", self.call(old, RETIRE)
                sw.deadline = now + CALL_TIMEOUT_S
        elif sw.phase == "retiring":
            if old.alive and now > sw.deadline:
                log.warning("the old %s stage did not retire in time: killed", old.spec.name)
                self._kill(old)
            if old.alive:
                return
            new.spec = dataclasses.replace(
                new.spec, params={**new.spec.params, "standby": False}
            )  # restarted from here on, it reads at once
            self.workers[new.spec.name] = new
            sink = self.workers["sink"]
            announce = _described(new)
            self._remember(sink, announce)
            sw.phase, sw.pending = "announcing", self.call(sink, "model", announce)
            if "igtl_out" in self.workers:  # names its messages after the model's outputs
                self._remember(self.workers["igtl_out"], announce)
                sw.told.append(self.call(self.workers["igtl_out"], "model", announce))
        elif sw.phase == "announcing":
            assert sw.pending is not None
            # a consumer without model-specific output may refuse: fine
            if sw.pending.done() and all(f.done() for f in sw.told):
                sw.phase, sw.pending = "switching", self.call(new, "go")
        elif sw.phase == "switching":
            assert sw.pending is not None
            if sw.pending.done():
                self._swap_event("switched", info=_brief(new.info))

    def _remember(self, sink: Worker, described: dict[str, Any]) -> None:
        """A swapped model's description in a consumer's parameters too, so that a restarted
        consumer (the sink, igtl_out) uses it (the ``model`` command tells the running one)."""
        models = [
            described if m.get("stage") == described["stage"] else m
            for m in sink.spec.params.get("models", ())
        ]
        first = {}
        if described["port"] == pipeline.results_port(0):
            first = {k: described[k] for k in ("engine", "device", "classes", "outputs")}
            first["model"] = described["model_path"]
        params = {**sink.spec.params, **first, "models": models}
        sink.spec = dataclasses.replace(sink.spec, params=params)

    def _swap_failed(self, error: str | dict[str, str]) -> None:
        assert self.swap is not None
        self._kill(self.swap.worker)
        if isinstance(error, str):
            error = {"code": "stage", "message": error}
        self._swap_event("failed", error=error)

    # -- the hospital network: DICOM node, Prometheus exporter ------------------------

    def _start_hospital(self) -> None:
        """The DICOM node and the /metrics exporter, when configured (a port in use is a
        configuration error, before READY)."""
        if self.config.dicom.enabled:
            from daemon.dicom.node import DicomNode

            self.dicom = DicomNode(self.config, self.jobs, self.publish)
            self.dicom.start()
        if self.config.metrics.enabled:
            from daemon.exporter import Exporter

            self.exporter = Exporter(self.config.metrics, self)

    def _stop_hospital(self) -> None:
        for part in (self.exporter, self.dicom):
            if part is not None:
                part.close()
        self.exporter = self.dicom = None

    # -- SIGHUP (daemon/reload.py) and the unit's STATUS= ----------------------------------

    def infer_workers(self) -> list[Worker]:
        """The infer stages, one per model, in the models' order (``infer``, ``infer-1``...)."""
        return [w for w in self.workers.values() if w.spec.kind == "infer"]

    def live_workers(self) -> list[Worker]:
        """The stages running now (a hot-swap's successor included)."""
        workers = [*self.workers.values(), *([self.swap.worker] if self.swap else [])]
        return [w for w in workers if w.alive]

    def _refresh_status(self, now: float) -> None:
        """Keep the unit's STATUS= current (fps, model, jobs queued, what is wrong)."""
        if self.state != "running" or not under_systemd() or now - self._last_status < STATUS_S:
            return
        self._last_status = now
        text = status_text(self.status())
        if text != self._status_text:
            self.say(text)

    def say(self, text: str, ready: bool = False) -> None:
        """The unit's STATUS= now (an event: a stage hung, restarted; a reload, with READY=1
        in the same datagram)."""
        self._status_text = text
        notify(*(["READY=1"] if ready else []), f"STATUS={text}")

    # -- offline jobs ---------------------------------------------------------------

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel (supervisor thread): a queued job never starts; a running one's worker is
        killed at once (the store is crash-safe) and started again, and the job's partial
        outputs and checkpoints are removed."""
        from daemon.offline.worker import partial_of, work_of

        job = self.jobs.cancel(job_id)
        if job.state not in ("queued", "running"):
            return {"job": job_id, "state": job.state, "cancelled": False}
        worker = self.workers.get(job.worker or "")
        if job.state == "running" and worker is not None and worker.alive:
            worker.replaced = True
            self._kill(worker)
        for path in (partial_of(Path(job.output)), work_of(self.config.paths.jobs(), job_id)):
            threading.Thread(target=_remove_tree, args=(path,), daemon=True).start()
        self.publish("job", {"job": job_id, "state": "cancelled", "was": job.state})
        log.info("job %s cancelled (was %s)", job_id, job.state)
        return {"job": job_id, "state": "cancelled", "cancelled": True, "was": job.state}

    def _kill(self, w: Worker) -> None:
        """SIGKILL, without waiting: the loop sees it gone (and reaps it) on a later tick."""
        if isinstance(w.handle, mp.process.BaseProcess) and w.handle.is_alive():
            w.handle.kill()

    def uptime(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def status(self) -> dict[str, Any]:
        """What an operator wants to see, from snapshots (cheap: no stage is asked)."""
        now = time.monotonic()
        sink = self.workers["sink"].stats if "sink" in self.workers else {}
        infer = self.workers["infer"].info if "infer" in self.workers else {}
        counts = self.counts()
        state = self.state
        if state == "running" and self.config.source.paused:
            state = "paused"
        return {
            "state": state,
            "uptime_s": self.uptime(),
            "source": {"description": self.source.get("description"), **self.source_state},
            "mode": self.config.pipeline.mode,
            "models": self._models(counts["models"], sink, ("fps", "latency_ms", "timings_ms")),
            "stages": {
                name: {
                    "pid": w.pid,
                    "state": _stage_state(w),
                    "restarts": w.restarts,
                    "heartbeat_age_s": round(now - w.heartbeat, 3),
                }
                for name, w in self.workers.items()
            },
            "fps": sink.get("fps"),
            "latency_ms": sink.get("latency_ms"),
            "withheld": sink.get("withheld"),
            "display": self.display_state(),
            **{k: v for k, v in counts.items() if k != "models"},
            "engine": infer.get("engine"),
            "device": infer.get("device"),
            "model": infer.get("model"),
            "swap": None
            if self.swap is None
            else {
                "id": self.swap.id,
                "phase": self.swap.phase,
                "stage": self.swap.worker.spec.name,
            },
            "jobs": self.jobs.counts() if self.jobs is not None else None,
            "last_swap": self.last_swap,
            "resources": self.resources,
            "versions": {"echod": __version__, "python": platform.python_version()},
        }

    def _models(
        self, counts: list[dict[str, Any]], sink: dict[str, Any], figures: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        """Each model's infer stage: what runs (engine, device, precision, each output's name
        and role), its counts, the ``figures`` the sink measured on its results port (from
        its ``stats`` or ``done``: fps, latency, Table 2 timings) and the results the guard
        withheld."""
        ports = sink.get("ports") or {"results": sink}  # a sink that measures one port
        out = []
        for w, c in zip(self.infer_workers(), counts, strict=False):
            measured = ports.get(c["port"]) or {}
            out.append(
                {
                    "stage": w.spec.name,
                    "port": c["port"],
                    "state": _stage_state(w),
                    "restarts": w.restarts,
                    "generation": w.spec.generation,
                    **{k: w.info.get(k) for k in ("model", "engine", "device", "precision")},
                    "outputs": [
                        {"name": o["name"], "role": o["role"]} for o in w.info.get("outputs") or ()
                    ],
                    **{k: c[k] for k in ("frames_out", "dropped", "skipped")},
                    **{k: measured.get(k) for k in figures},
                    "withheld": measured.get("withheld"),
                }
            )
        return out

    def display_state(self) -> dict[str, Any]:
        """The bedside display: ``open``, ``starting``, ``headless`` (none asked for or no
        screen), or ``failed`` with the error (it could not open, or it died)."""
        w = self.workers.get("sink")
        if w is None or w.spec.kind != "display":
            return {"state": "headless"}
        error = w.info.get("display_error") or (w.failure or {}).get("error", {}).get("message")
        if error or (w.done is None and not w.alive and w.handle is not None):
            return {"state": "failed", "error": error or f"exit code {_exitcode(w)}"}
        if not w.ready:
            return {"state": "starting"}
        return {"state": "open", "screen": w.info.get("display")}

    def telemetry(self) -> dict[str, Any]:
        """Refresh resource use (control thread, once per telemetry interval) and report."""
        self.resources = _resources(self.workers.values())
        st = self.status()
        keys = (
            "state",
            "source",
            "display",
            "fps",
            "latency_ms",
            "withheld",
            "frames_in",
            "frames_out",
        )
        return {k: st[k] for k in (*keys, "dropped", "skipped", "jobs", "resources")}

    # -- stopping ---------------------------------------------------------------

    def _stop_all(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + JOIN_S
        workers = list(self.workers.values())
        if self.swap is not None:
            workers.append(self.swap.worker)
        for w in workers:
            if w.handle is None:
                continue
            w.handle.join(max(0.0, deadline - time.monotonic()))
            if isinstance(w.handle, mp.process.BaseProcess) and w.handle.is_alive():
                log.warning("stage %s did not stop within %g s: killed", w.spec.name, JOIN_S)
                w.handle.kill()
                w.handle.join(1.0)
        for event in self.events.get(0.0):
            self._handle(event)

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, _frame: object) -> None:
            self.request_stop(signal.Signals(signum).name)

        def on_hangup(_signum: int, _frame: object) -> None:
            self.request_reload()

        previous: dict[int, Any] = {
            s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # -- reporting --------------------------------------------------------------

    def _summary(self, source: dict[str, Any]) -> dict[str, Any]:
        self._stop_all()  # collect the final "done" events
        if not self.live:
            return {"source": source["description"], "stopped_by": self.stop_reason}
        sink = self.workers["sink"].done or {}
        infer = self.workers["infer"]
        counts = self.counts()
        figures = ("fps", "latency_ms", "overhead_ms", "latency_parts_ms", "stages")
        return {
            **counts,
            "models": self._models(counts["models"], sink, figures),
            "fps": sink.get("fps", 0.0),
            "latency_ms": sink.get("latency_ms", {}),
            "overhead_ms": sink.get("overhead_ms", {}),
            "latency_parts_ms": sink.get("latency_parts_ms", {}),  # what the tail is made of
            "withheld": sink.get("withheld"),  # overlays the guard held back
            "stages": sink.get("stages", {}),
            "engine": infer.info.get("engine"),
            "device": infer.info.get("device"),
            "model": infer.info.get("model"),
            "precision": infer.info.get("precision"),
            "precision_reason": infer.info.get("precision_reason"),
            "input_conversion": infer.info.get("input_conversion"),
            "mode": self.config.pipeline.mode,
            # dynamic batching in mode "all": batches, mean and largest size
            "batching": {k: v for k, v in (infer.done or {}).items() if k.startswith("batch")},
            "source": source["description"],
            "restarts": {w.spec.name: w.restarts for w in self.workers.values() if w.restarts},
            "source_stats": (self.workers["acquire"].done or {}).get("source"),
            **({"igtl_out": self.workers["igtl_out"].done} if "igtl_out" in self.workers else {}),
            "stopped_by": self.stop_reason,
            "duration_s": round(time.monotonic() - self.started, 3),
        }


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _chain(source: Future[Any], target: Future[Any]) -> None:
    def copy(f: Future[Any]) -> None:
        e = f.exception()
        if e is not None:
            target.set_exception(e)
        else:
            target.set_result(f.result())

    source.add_done_callback(copy)


def _stage_state(w: Worker) -> str:
    if w.done is not None:
        return "done"
    if w.killing is not None:
        return "killing"
    if not w.alive:
        return "dead"
    return "running" if w.ready else "starting"


def _ready_text(info: dict[str, Any]) -> str:
    """One short phrase for a stage's ready line: what runs (details at debug level)."""
    parts = []
    if info.get("engine"):
        parts.append(f"{info['engine']} on {info.get('device')}")
    if info.get("model"):
        parts.append(f"model {info['model']}")
    if info.get("precision"):
        parts.append(f"precision {info['precision']} ({info.get('precision_reason')})")
    if info.get("input_conversion"):
        parts.append(str(info["input_conversion"]))
    if info.get("warmup_ms") is not None:
        parts.append(f"warm-up {info['warmup_ms']:.0f} ms")
    for key in ("source", "display"):
        if info.get(key):
            parts.append(str(info[key]))
    return f": {', '.join(parts)}" if parts else ""


def _port(infer: Worker) -> str:
    """The results port (and ring) an infer stage writes."""
    return pipeline.results_port(infer.spec.params.get("model_index", 0))


def _described(infer: Worker) -> dict[str, Any]:
    """What a consumer is told about the model an infer stage runs (its ``model`` command,
    and ``params["models"]`` at start): the results port it writes and the generation its
    results carry, and the model's description (classes, ``outputs``)."""
    info = infer.info
    return {
        "stage": infer.spec.name,
        "port": _port(infer),
        "generation": infer.spec.generation,
        **{k: info.get(k) for k in ("model", "model_path", "engine", "device", "classes")},
        "outputs": info.get("outputs"),
    }


def _brief(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info.get(k) for k in ("engine", "device", "model", "warmup_ms")}


def _resources(workers: Any) -> dict[str, Any]:
    """CPU, memory, load and temperatures where the platform reports them."""
    rss = 0
    for w in [*workers, None]:
        pid = os.getpid() if w is None else getattr(w.handle, "pid", None)
        with contextlib.suppress(psutil.Error, TypeError):
            rss += psutil.Process(pid).memory_info().rss
    temps: dict[str, float] = {}
    with contextlib.suppress(AttributeError, OSError):
        for chip, sensors in psutil.sensors_temperatures().items():
            for i, t in enumerate(sensors):
                temps[f"{chip}/{t.label or i}"] = t.current
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": psutil.virtual_memory().percent,
        "load": list(os.getloadavg()),
        "rss_mb": round(rss / 2**20, 1),
        "temperatures_c": temps,
    }


def _exitcode(w: Worker) -> int | None:
    return w.handle.exitcode if isinstance(w.handle, mp.process.BaseProcess) else None


def _stage_class(spec: StageSpec) -> type[Stage]:
    module, _, name = pipeline.STAGES[spec.kind].partition(":")
    cls: type[Stage] = getattr(importlib.import_module(module), name)
    return cls


def _thread_main(
    spec: StageSpec, config: Config, events: Any, stop: StopFlag, commands: Any
) -> None:
    run_stage(_stage_class(spec), spec, config, events, stop, commands)


def _process_main(
    spec: StageSpec, config: Config, events: Any, stop: StopFlag, commands: Any
) -> None:
    """Entry of a stage process: dies with the supervisor, leaves signals to it."""
    _die_with_parent()
    faulthandler.enable()  # SIGABRT from the supervisor (hung): the traceback goes to the log
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ...and no core file
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor stops us via `stop`
    logs.setup(config.logging.level, config.logging.format, config.logging.repeat_s, spec.name)
    try:
        cls = _stage_class(spec)
    except EchodError as e:
        events.put({"stage": spec.name, "event": "failed", "error": e.to_dict(), "fatal": True})
        sys.exit(e.exit_code)
    code = run_stage(cls, spec, config, events, stop, commands, freeze_gc=True)
    events.close()
    sys.exit(code)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the supervisor is killed, its stages go too (nothing left running)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
