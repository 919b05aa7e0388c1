"""A job worker: a pipeline stage (its own process, started and watched by the
supervisor like the live stages) that claims jobs from the store and runs them.

It runs below the live stages: ``nice`` (``offline.nice``) and a cap on the CPU
threads of engines, OpenCV and BLAS (``offline.threads``), set before any of
them is imported. A job's outputs are written to ``.<name>.partial`` beside
their final folder and renamed into place once the kind returns (after an
fsync), so outputs appear whole or not at all; a manifest already in place means
a crash came between the rename and the store's update, and the job is closed
without running again. A job whose worker died ``offline.max_attempts`` times
while running it fails instead of taking the worker down again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import OfflineConfig
from daemon.errors import ConfigError, EchodError
from daemon.offline.kind import Cancelled
from daemon.offline.kinds import kind_class
from daemon.offline.store import Job, JobStore
from daemon.stage import Stage, StageContext

if TYPE_CHECKING:
    from daemon.offline.dask_executor import DaskExecutor

log = logging.getLogger(__name__)

IDLE_S = 0.25  # how often an idle worker looks for a job
PROGRESS_EVERY_S = 0.5  # at most 2 progress events a second
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
MANIFEST = "manifest.json"


def partial_of(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def work_of(jobs_dir: Path, job_id: str) -> Path:
    return jobs_dir / job_id


@dataclass
class RunContext:
    """What a running job kind sees (:class:`daemon.offline.kind.JobContext`)."""

    job: Job
    store: JobStore
    stage: StageContext
    input: Path
    output: Path
    work: Path
    options: Any
    model: Path | None
    engine: str | None
    device: str
    threads: int
    timings: dict[str, float] = field(default_factory=dict)
    _units: set[str] = field(default_factory=set)
    _last_event: float = 0.0

    def done(self, unit: str) -> bool:
        return unit in self._units

    def mark(self, unit: str) -> None:
        self.store.mark(self.job.id, unit)
        self._units.add(unit)

    def progress(self, done: int, total: int, what: str) -> None:
        self.stage.beat()
        if self.store.state(self.job.id) == "cancelled":
            raise Cancelled(f"job {self.job.id} was cancelled")
        self.store.progress(self.job.id, done, total, what)
        now = time.monotonic()
        if now - self._last_event >= PROGRESS_EVERY_S or done == total:
            self._last_event = now
            self.stage.report(
                "job", job=self.job.id, state="progress", done=done, total=total, what=what
            )

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(
                self.timings.get(name, 0.0) + time.perf_counter() - t0, 4
            )


class JobWorker(Stage):
    def setup(self) -> dict[str, Any]:
        from daemon.engines.base import run_as_offline

        cfg = self.config.offline
        run_as_offline()  # engines loaded here yield to the live stage on a shared GPU
        if cfg.nice:
            os.nice(cfg.nice)
        if cfg.sched_idle and hasattr(os, "SCHED_IDLE"):  # threads started later inherit it
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        if cfg.threads:
            for name in THREAD_VARIABLES:
                os.environ[name] = str(cfg.threads)
            import cv2

            cv2.setNumThreads(cfg.threads)
        self.store = JobStore(self.config.paths.jobs() / "jobs.db")
        self.executor = _executor(cfg)
        return {
            "worker": self.spec.name,
            "nice": cfg.nice,
            "sched_idle": cfg.sched_idle,
            "threads": cfg.threads,
            "executor": cfg.executor,
        }

    def step(self) -> bool:
        job = self.store.claim(self.spec.name)
        if job is None:
            self.ctx.stop.wait(IDLE_S)
            return True
        if job.attempts > self.config.offline.max_attempts:
            self._close(job, "failed", error=("stage", self._gave_up(job)))
            return True
        self._run(job)
        return True

    @staticmethod
    def _gave_up(job: Job) -> str:
        return (
            f"the worker died {job.attempts - 1} times while running this job "
            "(offline.max_attempts): see the log"
        )

    def _run(self, job: Job) -> None:
        final = Path(job.output)
        partial = partial_of(final)
        work = work_of(self.config.paths.jobs(), job.id)
        if (final / MANIFEST).exists():  # renamed into place, then the process died
            manifest = json.loads((final / MANIFEST).read_text())
            self._close(job, "done", manifest=manifest)
            shutil.rmtree(work, ignore_errors=True)
            return
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        work.mkdir(parents=True, exist_ok=True)
        kind = kind_class(job.kind)
        cfg = self.config
        ctx = RunContext(
            job=job,
            store=self.store,
            stage=self.ctx,
            input=Path(job.input),
            output=partial,
            work=work,
            options=kind.Options.model_validate(job.options),
            model=Path(job.model) if job.model else None,
            engine=job.engine or None,
            device=job.device,
            threads=cfg.offline.threads,
            _units=self.store.units(job.id),
        )
        resumed = len(ctx._units)
        log.info(
            "job %s (%s %s) started%s",
            job.id,
            job.kind,
            job.input,
            f", resuming after {resumed} unit(s)" if resumed else "",
            extra={"job": job.id},
        )
        self.ctx.report("job", job=job.id, state="started", attempt=job.attempts, resumed=resumed)
        t0 = time.perf_counter()
        try:
            manifest = kind().run(ctx) if self.executor is None else self.executor.run(kind(), ctx)
        except Cancelled:
            self._discard(partial, work)
            return  # the store says cancelled already; the supervisor published it
        except EchodError as e:
            self._discard(partial, work)
            self._close(job, "failed", error=(e.code, e.message))
            return
        except Exception as e:  # a bug in the kind, or a library's error: one line
            log.debug("job %s crashed", job.id, exc_info=True)
            self._discard(partial, work)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self._close(job, "failed", error=("internal", f"{type(e).__name__}: {first}"))
            return
        ctx.timings["total"] = round(time.perf_counter() - t0, 4)
        manifest = {
            "job": job.id,
            "kind": job.kind,
            "input": job.input,
            "output": str(final),
            **manifest,
            "timings_s": ctx.timings,
        }
        _write_synced(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
        _sync_tree(partial)
        os.rename(partial, final)
        _fsync_dir(final.parent)
        self._close(job, "done", manifest=manifest, timings=ctx.timings)
        shutil.rmtree(work, ignore_errors=True)

    def _close(self, job: Job, state: str, **outcome: Any) -> None:
        if not self.store.finish(job.id, state, **outcome):
            return  # cancelled meanwhile
        error = outcome.get("error")
        event: dict[str, Any] = {"job": job.id, "state": state}
        if error:
            event["error"] = {"code": error[0], "message": error[1]}
            log.error("job %s failed: %s", job.id, error[1], extra={"job": job.id})
        else:
            log.info("job %s %s", job.id, state, extra={"job": job.id})
        self.ctx.report("job", **event)

    @staticmethod
    def _discard(partial: Path, work: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    def teardown(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.close()
        if hasattr(self, "store"):
            self.store.close()


def _executor(cfg: OfflineConfig) -> DaskExecutor | None:
    """None: units run here (``offline.executor = "local"``); else the Dask executor."""
    if cfg.executor == "local":
        return None
    try:
        from daemon.offline.dask_executor import DaskExecutor
    except ImportError:
        raise ConfigError(
            f"offline.executor = {cfg.executor!r} needs Dask: pip install 'echod[dask]'"
        ) from None
    return DaskExecutor(cfg.executor, cfg.dask_paths, cfg.dask_device, cfg.dask_threads)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_tree(root: Path) -> None:
    """Every file and folder under ``root`` on disk before the rename publishes them."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
