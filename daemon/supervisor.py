"""The supervisor (gunicorn's arbiter): owns the rings, starts, watches and stops stages.

It is the systemd main process: it alone installs signal handlers, sends
``READY=1`` once every stage has loaded and warmed up, pings the watchdog only
while every stage's heartbeat is fresh, restarts a crashed stage (the others
keep running), and on every exit path removes the shared-memory segments it
created, also when a stage was killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import logging
import multiprocessing as mp
import os
import platform
import queue
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

from daemon import __version__, pipeline
from daemon.config import Config
from daemon.errors import EchodError, StageError, from_dict
from daemon.events import EventBus, PipeEvents
from daemon.notify import notify, watchdog_interval
from daemon.ring import Ring, remove_segments, remove_stale_segments
from daemon.stage import RETIRE, Stage, StageSpec, StopFlag, run_stage

log = logging.getLogger(__name__)

TICK_S = 0.2  # the monitor loop's period
JOIN_S = 5.0  # how long a stopping stage may take before it is killed
HEARTBEAT_STALE_S = 5.0
CALL_TIMEOUT_S = 10.0  # a stage must answer a command within this


@dataclass
class Worker:
    spec: StageSpec
    handle: mp.process.BaseProcess | threading.Thread | None = None
    ready: bool = False
    done: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    restarts: int = 0
    heartbeat: float = field(default_factory=time.monotonic)
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    commands: Any = None

    @property
    def alive(self) -> bool:
        return self.handle is not None and self.handle.is_alive()


class Supervisor:
    """Runs the live pipeline of ``config`` until its source ends or it is told to stop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.threads = config.pipeline.workers == "threads"
        self._mp = mp.get_context("spawn")
        self.events = EventBus(None if self.threads else self._mp)
        self.stop: Any = threading.Event() if self.threads else self._mp.Event()
        self.rings: dict[str, Ring] = {}
        self.workers: dict[str, Worker] = {}
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.state = "starting"
        self.source: dict[str, Any] = {}
        self.control: Any = None
        self.resources: dict[str, Any] = {}
        self._actions: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._replies: dict[str, dict[str, Any]] = {}
        self._successor: Worker | None = None  # a hot-swap successor warming up

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Start, watch until the stream ends or a stop is asked, stop; return the summary."""
        for name in remove_stale_segments():
            log.info("removed stale shared-memory segment %s", name)
        self.source = source = self._probe_source()
        previous = self._install_signals()
        try:
            self._create_rings(source["shape"], source["dtype"])
            specs = pipeline.build(
                self.config, {n: r.name for n, r in self.rings.items()}, source["shape"]
            )
            self.workers = {s.name: Worker(s) for s in specs}
            self._start_control()
            self._start_all()
            self.state = "running"
            notify("READY=1", f"STATUS=running: {source['description']}")
            self._watch()
            return self._summary(source)
        finally:
            self.state = "stopping"
            notify("STOPPING=1")
            self._stop_all()
            if self.control is not None:
                self.control.close()
            self.events.close()
            self._remove_rings()
            self._restore_signals(previous)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop.set()

    def _probe_source(self) -> dict[str, Any]:
        """Open the source once here so a bad one fails before anything starts."""
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
        import numpy as np

        frame_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        label_bytes = int(np.prod(shape[:2]))
        limit = self.config.pipeline.max_frame_bytes
        if frame_bytes > limit:
            raise StageError(
                f"frames of {shape} {np.dtype(dtype)} need {frame_bytes} bytes, more than "
                f"pipeline.max_frame_bytes = {limit}: raise it"
            )
        slots = self.config.pipeline.ring_slots
        for name, size in (("frames", frame_bytes), ("results", label_bytes)):
            self.rings[name] = Ring.create(f"{os.getpid()}-{name}", slots=slots, payload_bytes=size)

    def _remove_rings(self) -> None:
        for ring in self.rings.values():
            ring.close()
            with contextlib.suppress(FileNotFoundError):
                ring.unlink()
        self.rings.clear()
        remove_segments(os.getpid())

    # -- starting ---------------------------------------------------------------

    def _start_all(self) -> None:
        """Inference first (the slowest to be ready: the sinks learn from it what runs),
        then the other readers, then the source: every reader exists before the first
        frame is written."""
        infer = self.workers["infer"]
        self._spawn(infer)
        self._await_ready([infer])
        running = {k: infer.info.get(k) for k in ("engine", "device")}
        running["model"] = infer.info.get("model_path")
        others = [w for w in self.workers.values() if w.spec.kind not in ("infer", "acquire")]
        for w in others:
            w.spec = dataclasses.replace(w.spec, params={**w.spec.params, **running})
        for wave in (others, [self.workers["acquire"]]):
            for w in wave:
                self._spawn(w)
            self._await_ready(wave)

    def _spawn(self, w: Worker) -> None:
        w.commands = queue.Queue() if self.threads else self._mp.Queue()
        channel = self.events.channel()
        args = (w.spec, self.config, channel, self.stop, w.commands)
        if self.threads:
            w.handle = threading.Thread(
                target=_thread_main, args=args, name=f"echod-{w.spec.name}", daemon=True
            )
        else:
            w.handle = self._mp.Process(
                target=_process_main, args=args, name=f"echod-{w.spec.name}"
            )
        w.ready, w.failure, w.heartbeat = False, None, time.monotonic()
        w.handle.start()
        if isinstance(channel, PipeEvents):
            channel.close()  # the child has its copy: its death now shows as end of pipe
        self.publish("stage", {"stage": w.spec.name, "state": "started", "restarts": w.restarts})
        log.info("stage %s started (pid %s)", w.spec.name, getattr(w.handle, "pid", "thread"))

    def _await_ready(self, wave: list[Worker]) -> None:
        deadline = time.monotonic() + self.config.pipeline.stage_timeout_s
        while not all(w.ready for w in wave):
            if self.stop.is_set():
                raise StageError(f"stopped while starting ({self.stop_reason})")
            self._drain_events(TICK_S)
            for w in wave:
                if w.failure is not None:
                    raise from_dict(w.failure["error"])
                if not w.ready and not w.alive and not self._pending_events():
                    raise StageError(
                        f"stage '{w.spec.name}' exited with code {_exitcode(w)} while starting;"
                        " see its log above"
                    )
            if time.monotonic() > deadline:
                late = ", ".join(w.spec.name for w in wave if not w.ready)
                raise StageError(
                    f"stage(s) {late} did not report ready within "
                    f"{self.config.pipeline.stage_timeout_s:g} s: raise pipeline.stage_timeout_s"
                    " or check the model and the engine"
                )

    # -- watching ---------------------------------------------------------------

    def _watch(self) -> None:
        """Until the sink has seen the end of the stream, or a stop is requested."""
        ping = watchdog_interval()
        last_ping = 0.0
        sink = self.workers["sink"]
        while sink.done is None and not self.stop.is_set():
            self._drain_events(TICK_S)
            self._run_actions()
            for w in list(self.workers.values()):
                if w.failure is not None and w.failure.get("fatal"):
                    raise from_dict(w.failure["error"])
                if w.done is None and not w.alive and not self._pending_events():
                    self._restart(w)
            now = time.monotonic()
            if ping and now - last_ping >= ping and self._healthy(now):
                notify("WATCHDOG=1")
                last_ping = now

    def _restart(self, w: Worker) -> None:
        reason = (w.failure or {}).get("error", {}).get("message") or f"exit code {_exitcode(w)}"
        if self.threads or w.restarts >= self.config.pipeline.max_restarts:
            raise StageError(
                f"stage '{w.spec.name}' died ({reason}) and is not restarted again"
                f" after {w.restarts} restart(s)"
            )
        w.restarts += 1
        self.publish("stage", {"stage": w.spec.name, "state": "died", "reason": reason})
        log.warning(
            "stage %s died (%s): restart %d of %d",
            w.spec.name,
            reason,
            w.restarts,
            self.config.pipeline.max_restarts,
        )
        self._spawn(w)

    def _healthy(self, now: float) -> bool:
        return all(
            w.done is not None or now - w.heartbeat < HEARTBEAT_STALE_S
            for w in self.workers.values()
        )

    def _pending_events(self) -> bool:
        return self.events.pending()

    def _drain_events(self, timeout: float) -> None:
        for event in self.events.get(timeout):
            self._handle(event)

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "reply":
            self._replies[event["token"]] = event
            return
        w = self._worker(event["stage"], event.get("generation", 0))
        if w is None:
            return
        w.heartbeat = time.monotonic()
        data = {k: v for k, v in event.items() if k not in ("stage", "generation", "event", "t")}
        if kind == "ready":
            w.ready = True
            w.info.update(data)
            log.info("stage %s ready %s", w.spec.name, data or "")
            self.publish("stage", {"stage": w.spec.name, "state": "ready"})
        elif kind == "stats":
            w.stats = data
            self._status_line(data)
        elif kind == "done":
            w.done = data
        elif kind == "failed":
            w.failure = data
            log.error("stage %s failed: %s", w.spec.name, data["error"]["message"])
            self.publish("stage", {"stage": w.spec.name, "state": "failed", **data})

    def _worker(self, name: str, generation: int) -> Worker | None:
        for w in (self.workers.get(name), self._successor):
            if w is not None and w.spec.name == name and w.spec.generation == generation:
                return w
        return None

    def _dropped(self) -> int:
        readers = (r for ring in self.rings.values() for r in ring.stats()["readers"].values())
        return sum(r["dropped"] for r in readers)

    def _status_line(self, live: dict[str, Any]) -> None:
        if self.workers["sink"].spec.kind != "headless":
            return
        lat = live["latency_ms"]
        print(
            f"echod: {live['fps']:6.1f} fps | latency p50 {lat['p50']:.1f} ms p99"
            f" {lat['p99']:.1f} ms | inference {live['inference_ms']:.1f} ms | frames"
            f" {live['frames']} dropped {self._dropped()}",
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

    def in_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the supervisor's thread (from the control thread) and return its result."""
        fut: Future[Any] = Future()
        self._actions.put((fn, fut))
        self.events.wake()
        return fut.result(timeout=self.config.pipeline.stage_timeout_s + CALL_TIMEOUT_S)

    def _run_actions(self) -> None:
        while True:
            try:
                fn, fut = self._actions.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the waiting control thread
                fut.set_exception(e)

    def call(self, w: Worker, name: str, args: dict[str, Any] | None = None) -> Any:
        """Send a stage a command and wait for its answer (supervisor thread)."""
        token = uuid.uuid4().hex
        w.commands.put((token, name, args or {}))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while token not in self._replies:
            if time.monotonic() > deadline or not w.alive:
                raise StageError(f"stage '{w.spec.name}' did not answer '{name}'")
            self._drain_events(0.01)
        reply = self._replies.pop(token)
        if "error" in reply:
            raise from_dict(reply["error"])
        return reply.get("result")

    def swap_model(self, path: Path, engine: str, device: str) -> dict[str, Any]:
        """Hot-swap (supervisor thread): a successor loads and warms up while the current
        model keeps running, then takes over its reader cursor (mode ``all`` loses no
        frame); a model that fails to load is refused and the current one runs on."""
        old = self.workers["infer"]
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
        self._successor = new
        try:
            self._spawn(new)
            self._await_ready([new])
        except EchodError:
            self._kill(new)
            raise
        finally:
            self._successor = None
        self.call(old, RETIRE)
        if old.handle is not None:
            old.handle.join(JOIN_S)
        self.workers["infer"] = new
        self.call(new, "go")
        new.spec = dataclasses.replace(new.spec, params={**params, "standby": False})
        self.publish("model", {"state": "switched", "model": new.info.get("model")})
        log.info("model switched to %s", path)
        return new.info

    def _kill(self, w: Worker) -> None:
        if isinstance(w.handle, mp.process.BaseProcess) and w.handle.is_alive():
            w.handle.kill()
            w.handle.join(1.0)

    def uptime(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def status(self) -> dict[str, Any]:
        """What an operator wants to see, from snapshots (cheap: no stage is asked)."""
        now = time.monotonic()
        sink = self.workers["sink"].stats if "sink" in self.workers else {}
        infer = self.workers["infer"].info if "infer" in self.workers else {}
        return {
            "state": self.state,
            "uptime_s": self.uptime(),
            "source": self.source.get("description"),
            "mode": self.config.pipeline.mode,
            "stages": {
                name: {
                    "pid": getattr(w.handle, "pid", None),
                    "alive": w.alive,
                    "ready": w.ready,
                    "restarts": w.restarts,
                    "heartbeat_age_s": round(now - w.heartbeat, 3),
                }
                for name, w in self.workers.items()
            },
            "fps": sink.get("fps"),
            "latency_ms": sink.get("latency_ms"),
            "frames": sink.get("frames"),
            "dropped": self._dropped() if self.rings else 0,
            "engine": infer.get("engine"),
            "device": infer.get("device"),
            "model": infer.get("model"),
            "resources": self.resources,
            "versions": {"echod": __version__, "python": platform.python_version()},
        }

    def telemetry(self) -> dict[str, Any]:
        """Refresh resource use (control thread, once per telemetry interval) and report."""
        self.resources = _resources(self.workers.values())
        st = self.status()
        return {k: st[k] for k in ("state", "fps", "latency_ms", "frames", "dropped", "resources")}

    # -- stopping ---------------------------------------------------------------

    def _stop_all(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + JOIN_S
        for w in self.workers.values():
            if w.handle is None:
                continue
            w.handle.join(max(0.0, deadline - time.monotonic()))
            if isinstance(w.handle, mp.process.BaseProcess) and w.handle.is_alive():
                log.warning("stage %s did not stop within %g s: killed", w.spec.name, JOIN_S)
                w.handle.kill()
                w.handle.join(1.0)
        self._drain_events(0.0)

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, _frame: object) -> None:
            self.request_stop(signal.Signals(signum).name)

        return {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # -- reporting --------------------------------------------------------------

    def _summary(self, source: dict[str, Any]) -> dict[str, Any]:
        self._stop_all()  # collect the final "done" events
        stats = {name: ring.stats() for name, ring in self.rings.items()}
        sink = self.workers["sink"].done or {}
        infer = self.workers["infer"]
        dropped = sum(r["dropped"] for s in stats.values() for r in s["readers"].values())
        dropped += (infer.done or {}).get("torn", 0)
        return {
            "frames_in": stats["frames"]["written"],
            "frames_out": sink.get("frames_out", 0),
            "dropped": dropped,
            "fps": sink.get("fps", 0.0),
            "latency_ms": sink.get("latency_ms", {}),
            "overhead_ms": sink.get("overhead_ms", {}),
            "stages": sink.get("stages", {}),
            "engine": infer.info.get("engine"),
            "device": infer.info.get("device"),
            "model": infer.info.get("model"),
            "mode": self.config.pipeline.mode,
            "source": source["description"],
            "restarts": {w.spec.name: w.restarts for w in self.workers.values() if w.restarts},
            "source_stats": (self.workers["acquire"].done or {}).get("source"),
            "stopped_by": self.stop_reason,
            "duration_s": round(time.monotonic() - self.started, 3),
        }


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor stops us via `stop`
    logging.basicConfig(
        level=config.logging.level,
        stream=sys.stderr,
        format=f"%(asctime)s {spec.name}[%(process)d] %(levelname)s %(message)s",
    )
    try:
        cls = _stage_class(spec)
    except EchodError as e:
        events.put({"stage": spec.name, "event": "failed", "error": e.to_dict(), "fatal": True})
        sys.exit(e.exit_code)
    code = run_stage(cls, spec, config, events, stop, commands)
    events.close()
    sys.exit(code)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the supervisor is killed, its stages go too (nothing left running)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
