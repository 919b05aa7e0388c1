"""The control socket's side of the job system: submit, get, list, result, cancel.

Submitting checks everything that can be checked before a job is queued (the
kind, its options, the input's path, size and format, the output folder) and
commits the job before answering with its id. The input check reads headers and
can take a moment, so it runs on a small thread pool and the request is answered
when it is done: the control thread never waits on it. Each thread has its own
connection to the store.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon import protocol
from daemon.config import Config, ConfigError
from daemon.offline.kinds import kind_class
from daemon.offline.store import Job, JobStore
from daemon.paths import confine
from daemon.protocol import ProtocolError


class JobService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.paths.jobs() / "jobs.db"
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="echod-submit")
        interrupted = self.store().requeue_running()  # validates the store at start
        self.resumed = interrupted

    def store(self) -> JobStore:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = JobStore(self.path)
        return store

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ----------------------------------------------------------------------

    def submit(
        self,
        args: protocol.JobSubmitArgs,
        client: str,
        roots: Callable[[str], list[Path]],
        publish: Callable[[str, dict[str, Any]], None],
    ) -> Future[Any]:
        """Check and queue (on the pool): the job's id and state once it is committed."""
        if self.config.offline.workers == 0:
            raise ProtocolError(
                protocol.UNAVAILABLE, "this daemon runs no job workers (offline.workers = 0)"
            )
        kind = kind_class(args.kind)
        try:
            options = kind.Options.model_validate(args.options)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "options"
            raise ProtocolError(
                protocol.BAD_ARGS, f"{args.kind} option {where}: {err['msg']}"
            ) from None
        path = confine(args.input, roots("inputs"), what="input")
        model = confine(args.model, roots("models"), what="model") if args.model else None
        out_root = (
            confine(args.output, roots("outputs"), what="output folder", must_exist=False)
            if args.output
            else self.config.paths.results()
        )

        def queue_it() -> dict[str, Any]:
            self._check_size(path)
            kind.check(path, options)
            store = self.store()
            job, new = store.submit(
                kind=args.kind,
                input=str(path),
                output_root=str(out_root),
                options=options.model_dump(mode="json"),
                model=None if model is None else str(model),
                engine=args.engine or None,
                device=args.device or self.config.model.device,
                client=client,
                key=args.key or None,
                max_queued=self.config.offline.max_queued,
            )
            if new:
                publish("job", {"job": job.id, "state": "queued", "kind": job.kind})
            return {"job": job.id, "state": job.state, "new": new, "output": job.output}

        return self._pool.submit(queue_it)

    def _check_size(self, path: Path) -> None:
        limit = self.config.offline.max_input_gb * 2**30
        size = 0
        if path.is_dir():
            for folder, _, files in os.walk(path):
                size += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
                if size > limit:
                    break
        else:
            size = path.stat().st_size
        if size > limit:
            raise ConfigError(
                f"input {path} is over offline.max_input_gb = "
                f"{self.config.offline.max_input_gb:g} GB: raise the limit to accept it"
            )

    def get(self, job_id: str) -> dict[str, Any]:
        return self._job(job_id).to_dict()

    def list(self, state: str, limit: int) -> list[dict[str, Any]]:
        return [j.to_dict() for j in self.store().jobs(state, limit)]

    def result(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        manifest = self.store().manifest(job_id)
        if job.state != "done" or manifest is None:
            raise ProtocolError(
                protocol.UNAVAILABLE, f"job {job_id} is {job.state}: no result (yet)"
            )
        return manifest

    def cancel(self, job_id: str) -> Job:
        """Mark the job cancelled (the caller stops its worker); the job as it was."""
        job = self._job(job_id)
        if job.state in ("queued", "running"):
            self.store().finish(job_id, "cancelled")
        return job

    def counts(self) -> dict[str, int]:
        return self.store().counts()

    def _job(self, job_id: str) -> Job:
        job = self.store().get(job_id)
        if job is None:
            raise ProtocolError(protocol.NOT_FOUND, f"no job {job_id!r}: see `echod jobs list`")
        return job

