"""Running a job's units on a Dask cluster (``offline.executor = "dask://HOST:PORT"``).

The job worker stage stays the job's owner: it plans the job (:meth:`UnitKind.plan`),
submits the units it has not finished to the scheduler as tasks, and, as each result
comes back, writes it to ``ctx.work`` and marks it (:func:`save_unit`), exactly as the
local executor does; then it assembles the outputs. So progress, cancel (the job's
futures are cancelled, which releases them on the cluster) and resume after a crash
of the appliance work as with local workers, and a Dask worker that dies has its
tasks run again elsewhere by the scheduler (units are pure: the output is the same).

Each Dask worker loads a model once (:class:`ModelCache`, a worker plugin the job
worker registers) and keeps it for every unit that needs it. Units read their input
from shared storage: the paths in their arguments are rewritten by
``offline.dask_paths`` (``APPLIANCE_PREFIX=WORKER_PREFIX``) for workers that mount it
elsewhere. ``dask+tls://`` connects with TLS, its certificates and the scheduler's
other security settings taken from Dask's own configuration
(``distributed.comm.tls.*``). Kinds that are not :class:`UnitKind` run locally.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
from distributed import Client, WorkerPlugin, get_worker, wait
from distributed.security import Security

from daemon.errors import EchodError, EngineError
from daemon.offline.kind import JobContext, JobKind, ModelSpec, UnitKind, save_unit

log = logging.getLogger(__name__)

PLUGIN = "echod-models"
POLL_S = 0.5  # how often the job worker looks at cancel while units run
CONNECT_S = 10.0


def scheduler_address(executor: str) -> str:
    """Dask's address for ``offline.executor`` (``dask://H:P`` -> ``tcp://H:P``)."""
    for prefix, protocol in (("dask://", "tcp://"), ("dask+tls://", "tls://")):
        if executor.startswith(prefix):
            return protocol + executor[len(prefix) :]
    raise ValueError(f"{executor!r}: give 'local', 'dask://HOST:PORT' or 'dask+tls://HOST:PORT'")


def connect(executor: str) -> Any:
    """A ``distributed.Client`` of the scheduler ``offline.executor`` names."""
    address = scheduler_address(executor)
    try:
        return Client(address, timeout=CONNECT_S, security=Security())
    except (OSError, TimeoutError) as e:
        raise EngineError(
            f"cannot reach the Dask scheduler at {address} ({e}): start it (dask scheduler) "
            "or set offline.executor = 'local'"
        ) from None


class ModelCache(WorkerPlugin):
    """A Dask worker plugin: each model loaded once per worker, on its first unit."""

    name = PLUGIN

    def setup(self, worker: Any) -> None:
        self.models: dict[ModelSpec, Any] = {}

    def teardown(self, worker: Any) -> None:
        for model in self.models.values():
            model.close()
        self.models.clear()

    def get(self, spec: ModelSpec) -> Any:
        model = self.models.get(spec)
        if model is None:
            log.info("loading %s on %s (%s)", spec.model, spec.device, spec.engine or "best")
            model = self.models[spec] = spec.load()
        return model

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "model": os.path.basename(s.model),
                "engine": getattr(m, "name", None)
                or getattr(getattr(m, "engine", None), "name", None),
                "device": s.device,
            }
            for s, m in self.models.items()
        ]


def run_unit(spec: ModelSpec, fn: Callable[..., np.ndarray], args: tuple[Any, ...]) -> np.ndarray:
    """The task a unit becomes: ``fn`` with this worker's copy of the model."""
    cache = cast(ModelCache, get_worker().plugins[PLUGIN])
    return fn(cache.get(spec), *args)


def _load(spec: ModelSpec, dask_worker: Any) -> None:
    cast(ModelCache, dask_worker.plugins[PLUGIN]).get(spec)


def _describe_models(dask_worker: Any) -> dict[str, Any]:
    cache = dask_worker.plugins.get(PLUGIN)
    return {"host": socket.gethostname(), "models": cache.describe() if cache else []}


class PathMap:
    """Appliance path prefixes rewritten to where the workers mount the same storage."""

    def __init__(self, items: Iterable[str]) -> None:
        self.pairs = [tuple(i.split("=", 1)) for i in items]

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for ours, theirs in self.pairs:
            if value == ours or value.startswith(ours.rstrip("/") + "/"):
                return theirs + value[len(ours) :]
        return value


class DaskExecutor:
    """Runs the jobs of one job worker on a Dask cluster (one client, kept open)."""

    def __init__(
        self, executor: str, paths: Iterable[str] = (), device: str = "", threads: int = 0
    ) -> None:
        self.executor, self.paths = executor, PathMap(paths)
        self.device, self.threads = device, threads
        self.client: Any = None

    def _client(self) -> Any:
        if self.client is None or self.client.status != "running":
            self.client = connect(self.executor)
            self.client.register_plugin(ModelCache(), name=PLUGIN)
            log.info("job units go to the Dask scheduler at %s", self.client.scheduler.address)
        return self.client

    def run(self, kind: JobKind, ctx: JobContext) -> dict[str, Any]:
        if not isinstance(kind, UnitKind):
            log.info("%s jobs run here: the kind is not made of units", kind.name)
            return kind.run(ctx)
        plan = kind.plan(ctx)
        total = sum(u.size for u in plan.units)
        done = sum(u.size for u in plan.units if ctx.done(u.id))
        todo = [u for u in plan.units if not ctx.done(u.id)]
        ctx.progress(done, total, plan.what)
        if todo:
            client = self._client()
            spec = self.spec(plan.model)
            job = getattr(getattr(ctx, "job", None), "id", "job")
            futures = {
                client.submit(
                    run_unit,
                    spec,
                    u.fn,
                    tuple(self.paths(a) for a in u.args),
                    key=f"echod-{job}-{u.id}",
                ): u
                for u in todo
            }
            try:
                with ctx.phase("cluster"):  # the manifest says the units ran on Dask
                    done = self._collect(ctx, futures, done, total, plan.what)
            finally:
                pending = [f for f in futures if not f.done()]
                if pending:
                    client.cancel(pending)
                for f in futures:
                    f.release()
        return kind.assemble(ctx, plan)

    def spec(self, model: ModelSpec) -> ModelSpec:
        """``model`` as the workers load it: their path, device and threads."""
        return ModelSpec(
            model.loader,
            self.paths(model.model),
            model.engine,
            self.device or model.device,
            self.threads or model.threads,
        )

    def warm(self, model: ModelSpec) -> int:
        """Load ``model`` on every worker now rather than on each one's first unit (a
        benchmark's warm-up); the number of workers."""
        return len(self._client().run(_load, self.spec(model)))

    @staticmethod
    def _collect(
        ctx: JobContext, futures: Mapping[Any, Any], done: int, total: int, what: str
    ) -> int:
        pending = set(futures)
        while pending:
            try:
                finished, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:  # none finished: look at cancel again
                finished = set()
            for f in finished:
                unit = futures[f]
                try:
                    result = f.result()
                except EchodError:
                    raise
                except Exception as e:  # KilledWorker, a library's error on the worker
                    raise EngineError(f"unit {unit.id} failed on the Dask cluster: {e}") from e
                save_unit(ctx, unit.id, result)
                done += unit.size
            ctx.progress(done, total, what)  # checks cancel (raises Cancelled)
        return done

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def cluster(executor: str) -> dict[str, Any]:
    """The cluster as ``echod workers`` shows it: workers, their models, tasks in flight."""
    client = connect(executor)
    try:
        info = client.scheduler_info(n_workers=-1)
        processing = client.processing()
        try:
            models = client.run(_describe_models)
        except Exception:  # a worker that went away meanwhile
            models = {}
        workers = []
        for address, w in sorted(info["workers"].items()):
            mine = models.get(address, {})
            keys = [str(k) for k in processing.get(address, ())]
            workers.append(
                {
                    "address": address,
                    "name": str(w.get("name", "")),
                    "host": mine.get("host", w.get("host", "")),
                    "threads": w.get("nthreads", 0),
                    "memory_gb": round(w.get("memory_limit", 0) / 2**30, 1),
                    "models": mine.get("models", []),
                    "in_flight": len(keys),
                    "echod_tasks": sum(k.startswith("echod-") for k in keys),
                }
            )
        return {"scheduler": info.get("address", ""), "workers": workers}
    finally:
        client.close()
