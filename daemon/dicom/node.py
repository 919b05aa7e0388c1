"""The DICOM node the supervisor runs: receive, route, follow the job, send the results.

Threads of the supervisor's process: pynetdicom's (one per association) store
instances; the node's loop (``echod-dicom``, twice a second) completes series that
have been quiet for ``quiet_s``, submits each to the job service by the first
matching route (the job's idempotency key is the receipt, so a restart between
submit and record makes no second job), follows submitted jobs in the job store,
queues each result file for each destination of the route when the job is done,
and hands due sends to a pool with one thread per destination: a destination that
is down or slow holds up only its own sends, never another's, nor the loop.
A failed send is retried with exponential backoff (``retry_s`` doubling up to
``retry_max_s``) until ``send_attempts``; every try is recorded.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import protocol
from daemon.config import Config
from daemon.dicom import send
from daemon.dicom.scp import Scp
from daemon.dicom.settings import DicomRoute
from daemon.dicom.store import (
    DONE,
    FAILED,
    PENDING,
    RECEIVING,
    SUBMITTED,
    UNROUTED,
    DicomStore,
)
from daemon.errors import ConfigError, EchodError
from daemon.protocol import ProtocolError

if TYPE_CHECKING:
    from daemon.offline.service import JobService

log = logging.getLogger(__name__)

TICK_S = 0.5
Publish = Callable[[str, dict[str, Any]], None]


class DicomNode:
    def __init__(self, config: Config, jobs: JobService | None, publish: Publish) -> None:
        s = self.settings = config.dicom
        self.config = config
        self.jobs = jobs
        self.publish = publish
        self.routes = list(s.routes)
        self.destinations = {d.name: d for d in s.destinations}
        self._check_routes()
        self.store = DicomStore(config.paths.state() / "dicom", int(s.max_storage_gb * 2**30))
        self.scp = Scp(s, self.store.add)
        self.sends: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._submitting: dict[str, Future[Any]] = {}
        self._sending: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(self.destinations)), thread_name_prefix="echod-dicom-send"
        )
        self._thread = threading.Thread(target=self._loop, name="echod-dicom", daemon=True)

    def _check_routes(self) -> None:
        """Routes are checked at start: a job kind that does not exist or a model file
        that is missing is a configuration error, not a failed job hours later."""
        from daemon.offline.kinds import kind_class

        if self.routes and self.jobs is None:
            raise ConfigError(
                "dicom.routes submit jobs and this daemon runs no job workers "
                "(offline.workers = 0): set offline.workers, or remove the routes"
            )
        for i, route in enumerate(self.routes):
            try:
                kind_class(route.kind)
            except ConfigError as e:
                raise ConfigError(f"dicom.routes[{i}]: {e}") from None
            if route.model and not Path(route.model).expanduser().is_file():
                raise ConfigError(f"dicom.routes[{i}].model {route.model}: no such file")

    def start(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):  # a line per PDU and request otherwise
            logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        self.scp.start()
        self._thread.start()
        resumed = self.store.receipts(RECEIVING, SUBMITTED)
        if resumed:
            log.info("DICOM node: %d series from before the restart followed again", len(resumed))

    def close(self) -> None:
        self._stop.set()
        self.scp.close()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick(time.time())
            except Exception as e:  # the node goes on; the next tick tries again
                log.error("DICOM node: %s: %s", type(e).__name__, e)
                log.debug("DICOM node tick failed", exc_info=True)

    def tick(self, now: float) -> None:
        for receipt in self.store.quiet(now - self.settings.quiet_s):
            self._complete(receipt)
        for receipt in self.store.receipts(SUBMITTED):
            self._follow(receipt)
        for (job, dest), files in self.store.due(now).items():
            with self._lock:
                if (job, dest) in self._sending:
                    continue
                self._sending.add((job, dest))
            self._pool.submit(self._send, job, dest, files)

    # -- receiving and routing ----------------------------------------------------------

    def _complete(self, r: dict[str, Any]) -> None:
        """A series that has been quiet: routed (or not), its job submitted."""
        what = (
            f"series {r['series']} from {r['calling_ae']} ({r['instances']} instances, "
            f"{r['modality'] or 'no modality'})"
        )
        route = self.route(r)
        event = {"event": "series", "receipt": r["id"], "series": r["series"]}
        if route is None:
            self.store.settle(r["id"], UNROUTED)
            log.info("DICOM %s: no route matches, kept until storage is needed", what)
            self.publish("dicom", {**event, "state": UNROUTED})
            return
        self.store.settle(r["id"], SUBMITTED, route=route)
        log.info("DICOM %s complete: %s job", what, self.routes[route].kind)
        self.publish("dicom", {**event, "state": "complete", "kind": self.routes[route].kind})
        self._submit({**r, "route": route})

    def route(self, r: dict[str, Any]) -> int | None:
        """The first route every non-empty pattern of which matches the receipt."""
        for i, route in enumerate(self.routes):
            if _matches(route, r):
                return i
        return None

    def _submit(self, r: dict[str, Any]) -> None:
        assert self.jobs is not None
        if r["id"] in self._submitting:
            return
        if self.jobs.counts().get("queued", 0) >= self.config.offline.max_queued:
            return  # the queue is full: submitted on a later tick
        route = self.routes[r["route"]] if r["route"] < len(self.routes) else None
        if route is None:
            self.store.settle(r["id"], FAILED, error="its route is no longer configured")
            return
        args = protocol.JobSubmitArgs(
            kind=route.kind,
            input=r["folder"],
            model=route.model,
            options=route.options,
            key=f"dicom-{r['id']}",
        )
        try:
            future = self.jobs.submit(args, f"dicom:{r['calling_ae']}", self._roots, self.publish)
        except (EchodError, ProtocolError) as e:
            self._refused(r, e)
            return
        self._submitting[r["id"]] = future

    def _roots(self, kind: str) -> list[Path]:
        """Where a routed job's paths may lie: the received series, the models the routes
        name (the operator's configuration), the results folder."""
        if kind == "inputs":
            return [self.store.incoming]
        if kind == "models":
            return [Path(r.model).expanduser().resolve().parent for r in self.routes if r.model]
        return [self.config.paths.results()]

    def _refused(self, r: dict[str, Any], e: Exception) -> None:
        message = getattr(e, "message", str(e))
        self.store.settle(r["id"], FAILED, error=message)
        log.error("DICOM series %s: the job was refused: %s", r["series"], message)
        self.publish("dicom", {"event": "series", "receipt": r["id"], "state": FAILED})

    # -- following jobs -----------------------------------------------------------------

    def _follow(self, r: dict[str, Any]) -> None:
        assert self.jobs is not None
        future = self._submitting.get(r["id"])
        if future is not None:
            if not future.done():
                return
            del self._submitting[r["id"]]
            try:
                job_id = future.result()["job"]
            except (EchodError, ProtocolError) as e:
                self._refused(r, e)
                return
            self.store.settle(r["id"], SUBMITTED, job=job_id)
            log.info("DICOM series %s: job %s queued", r["series"], job_id)
            return
        if r["job"] is None:  # submitted before a restart, not recorded: the same key
            self._submit(r)
            return
        job = self.jobs.store().get(r["job"])
        if job is None or job.state in ("queued", "running"):
            return
        if job.state != "done" or job.manifest is None:
            self.store.finish_job(r["id"], FAILED, job.id, [])
            log.warning(
                "DICOM series %s: job %s %s: nothing to send", r["series"], job.id, job.state
            )
            self.publish("dicom", {"event": "series", "receipt": r["id"], "state": FAILED})
            return
        files = self._results(r, job.id, job.manifest)
        route = self.routes[r["route"]] if r["route"] < len(self.routes) else None
        names = (route.send if route is not None else []) or list(self.destinations)
        self.store.finish_job(r["id"], DONE, job.id, [(n, str(f)) for n in names for f in files])
        log.info(
            "DICOM series %s: job %s done, %d file(s) to send to %s",
            r["series"],
            job.id,
            len(files),
            ", ".join(names) or "no destination",
        )
        self.publish("dicom", {"event": "series", "receipt": r["id"], "state": DONE, "job": job.id})

    def _results(self, r: dict[str, Any], job: str, manifest: dict[str, Any]) -> list[Path]:
        """The job's files worth sending: DICOM ones as they are, PNGs converted."""
        folder = Path(manifest.get("output", ""))
        named = manifest.get("outputs") or manifest.get("files") or {}
        names = list(named.values()) if isinstance(named, dict) else list(named)
        reference = min(Path(r["folder"]).glob("*.dcm"), default=None)
        out = []
        for name in names:
            path = folder / str(name)
            if send.is_dicom(path):
                out.append(path)
            elif path.suffix.lower() == ".png" and reference is not None:
                target = self.store.outgoing / job / f"{path.stem}.dcm"
                try:
                    out.append(send.secondary_capture(path, reference, target, seed=job))
                except (OSError, ValueError) as e:
                    log.warning("job %s: %s not converted to DICOM: %s", job, path.name, e)
        return out

    # -- sending (pool threads) ---------------------------------------------------------

    def _send(self, job: str, name: str, files: list[str]) -> None:
        try:
            dest = self.destinations.get(name)
            results: dict[Path, str | None]
            if dest is None:
                results = {Path(f): f"destination {name} is no longer configured" for f in files}
                established = False
            else:
                established, results = send.store_files(self.settings, dest, list(map(Path, files)))
            with self._lock:
                self.sends[(name, "association" if established else "association_failed")] += 1
            for path, error in results.items():
                self._record(job, name, path, error)
            if not self.store.sends(job, (PENDING,)):
                shutil.rmtree(self.store.outgoing / job, ignore_errors=True)
        except Exception as e:  # still pending: tried again (after a restart, if stopping)
            if not self._stop.is_set():
                log.error("DICOM send of job %s to %s: %s: %s", job, name, type(e).__name__, e)
        finally:
            with self._lock:
                self._sending.discard((job, name))

    def _record(self, job: str, name: str, path: Path, error: str | None) -> None:
        event = {"event": "send", "job": job, "destination": name, "file": path.name}
        if error is None:
            self.store.sent(job, name, str(path))
            with self._lock:
                self.sends[(name, "sent")] += 1
            log.info("DICOM %s of job %s sent to %s", path.name, job, name)
            self.publish("dicom", {**event, "state": "sent"})
            return
        tries, wait = self.store.failed(job, name, str(path), error, self._backoff)
        with self._lock:
            self.sends[(name, "retry" if wait is not None else "failed")] += 1
        if wait is None:
            log.error(
                "DICOM %s of job %s to %s failed after %d tries: %s",
                path.name,
                job,
                name,
                tries,
                error,
            )
        else:
            log.warning(
                "DICOM %s of job %s to %s failed (try %d of %d, next in %.3g s): %s",
                path.name,
                job,
                name,
                tries,
                self.settings.send_attempts,
                wait,
                error,
            )
        self.publish("dicom", {**event, "state": "retry" if wait else FAILED, "error": error})

    def _backoff(self, tries: int) -> float | None:
        s = self.settings
        if tries >= s.send_attempts:
            return None
        return float(min(s.retry_s * 2 ** (tries - 1), s.retry_max_s))

    # -- reporting ----------------------------------------------------------------------

    def status(self, job: str = "") -> dict[str, Any]:
        """Associations, series in progress, pending sends (``job``: that job's sends)."""
        now = time.time()
        s = self.settings
        series = [
            {
                "series": r["series"],
                "calling_ae": r["calling_ae"],
                "modality": r["modality"],
                "instances": r["instances"],
                "state": r["state"],
                "job": r["job"],
                "quiet_s": round(now - r["last"], 1),
            }
            for r in self.store.receipts(RECEIVING, SUBMITTED)
        ]
        sends = [
            {
                "job": x["job"],
                "destination": x["destination"],
                "file": Path(x["file"]).name,
                "state": x["state"],
                "attempts": x["attempts"],
                "next_in_s": round(max(0.0, x["next_try"] - now), 1)
                if x["state"] == PENDING
                else None,
                "error": x["error"],
            }
            for x in self.store.sends(job, () if job else (PENDING,))
        ]
        counts = self.scp.snapshot()
        return {
            "ae_title": s.ae_title,
            "address": f"{s.host}:{self.scp.port}",
            "tls": s.tls.enabled,
            "associations": {
                "active": self.scp.active(),
                **{k: counts.get(k, 0) for k in ("accepted", "rejected", "aborted")},
            },
            "instances_received": counts.get("instances", 0),
            "storage_gb": {
                "used": round(self.store.used() / 2**30, 3),
                "max": s.max_storage_gb,
            },
            "series": series,
            "sends": sends,
            "destinations": sorted(self.destinations),
        }

    def metrics(self) -> dict[str, Any]:
        """Figures for the Prometheus exporter."""
        with self._lock:
            sends = dict(self.sends)
        return {
            "scp": self.scp.snapshot(),
            "active": self.scp.active(),
            "sends": sends,
            "series_in_progress": len(self.store.receipts(RECEIVING, SUBMITTED)),
            "sends_pending": len(self.store.sends("", (PENDING,))),
            "storage_bytes": self.store.used(),
        }


def _matches(route: DicomRoute, r: dict[str, Any]) -> bool:
    pairs = (
        (route.modality, r["modality"]),
        (route.body_part, r["body_part"]),
        (route.series_description, r["description"]),
        (route.calling_ae, r["calling_ae"]),
    )
    return all(
        not pattern or fnmatch.fnmatchcase(value.upper(), pattern.upper())
        for pattern, value in pairs
    )
