"""The job store: SQLite in WAL mode in the state directory, shared by every process.

A job is accepted only once its row is committed: :meth:`JobStore.submit` returns
its id after the commit. States: ``queued`` -> ``running`` -> ``done`` / ``failed``,
or ``cancelled`` from either of the first two. A worker claims a job in one
``BEGIN IMMEDIATE`` transaction (no two workers get the same job), records each
finished unit of work (:meth:`mark`) so that an interrupted job resumes where it
stopped, and finishes it with its manifest. After a crash of the whole daemon the
jobs left ``running`` go back to the queue (:meth:`requeue_running`), with their
units kept.

Each process opens its own connection. SQLite's locks are ``fcntl`` locks that
the kernel drops with a killed process, and WAL recovers a write cut short:
nothing here can be poisoned by a process dying mid-call.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL,
    options TEXT NOT NULL,
    model TEXT,
    engine TEXT,
    device TEXT NOT NULL,
    client TEXT NOT NULL,
    key TEXT UNIQUE,
    state TEXT NOT NULL,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    what TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT '{}',
    error_code TEXT,
    error_message TEXT,
    manifest TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS units (
    job TEXT NOT NULL,
    unit TEXT NOT NULL,
    PRIMARY KEY (job, unit)
);
"""


@dataclass
class Job:
    id: str
    kind: str
    input: str
    output: str
    options: dict[str, Any]
    model: str | None
    engine: str | None
    device: str
    client: str
    key: str | None
    state: str
    worker: str | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    done: int
    total: int
    what: str
    timings: dict[str, float]
    error_code: str | None
    error_message: str | None
    manifest: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        for name in ("options", "timings", "manifest"):
            if data[name] is not None:
                data[name] = json.loads(data[name])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready view the control socket returns."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["progress"] = round(self.done / self.total, 4) if self.total else 0.0
        out["error"] = (
            None
            if self.error_code is None
            else {"code": self.error_code, "message": self.error_message}
        )
        for name in ("error_code", "error_message", "manifest"):
            del out[name]
        return out


class JobStore:
    """One process's connection to the store at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")  # a committed job survives power loss
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"job store {path} was written by a newer echod (schema {version}): "
                    "upgrade echod, or set paths.state_dir to another folder"
                )
            if version < SCHEMA_VERSION:  # new: made once; every later connection only reads
                with self._write() as db:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("SELECT count(*) FROM jobs").fetchone()
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"job store {path} cannot be used ({e}): nothing was changed; move it "
                "aside to start with an empty queue, or fix its folder's permissions"
            ) from None
        except OSError as e:
            raise ConfigError(f"job store {path}: {e.strerror or e}") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (no upgrade deadlock between processes)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- submitting and reading ----------------------------------------------------

    def submit(
        self,
        *,
        kind: str,
        input: str,
        output_root: str,
        options: dict[str, Any],
        model: str | None,
        engine: str | None,
        device: str,
        client: str,
        key: str | None = None,
        max_queued: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job (committed when this returns); ``(job, True)``. Its outputs will be
        the folder ``KIND-ID`` in ``output_root``. With an idempotency ``key`` already
        used, the job it made and ``False``."""
        with self._write() as db:
            if key is not None:
                row = db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    return Job.from_row(row), False
            if max_queued is not None:
                queued = db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()
                if queued[0] >= max_queued:
                    raise ConfigError(
                        f"the queue is full ({queued[0]} jobs waiting, offline.max_queued = "
                        f"{max_queued}): wait, or cancel some"
                    )
            job_id = uuid.uuid4().hex[:12]
            db.execute(
                "INSERT INTO jobs (id, kind, input, output, options, model, engine, device,"
                " client, key, state, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (
                    job_id,
                    kind,
                    input,
                    str(Path(output_root) / f"{kind}-{job_id}"),
                    json.dumps(options),
                    model,
                    engine,
                    device,
                    client,
                    key,
                    time.time(),
                ),
            )
        job = self.get(job_id)
        assert job is not None
        return job, True

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_row(row)

    def jobs(self, state: str = "", limit: int = 100) -> list[Job]:
        """Newest first, optionally in one state."""
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        rows = self._db.execute(
            f"SELECT * FROM jobs {where} ORDER BY created DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def durations(self) -> list[tuple[str, str, float]]:
        """``(kind, outcome, seconds)`` of every job that ran and ended: first start to end."""
        rows = self._db.execute(
            "SELECT kind, state, finished - started FROM jobs"
            " WHERE state IN ('done', 'failed', 'cancelled') AND started IS NOT NULL"
        ).fetchall()
        return [(kind, state, max(0.0, float(s))) for kind, state, s in rows]

    # -- running -------------------------------------------------------------------

    def claim(self, worker: str) -> Job | None:
        """The job this worker was running when it died (resumed), else the oldest queued
        one, now ``running`` under ``worker``; None when there is nothing to do."""
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE (state = 'running' AND worker = ?) OR state = 'queued'"
                " ORDER BY state = 'running' DESC, created LIMIT 1",
                (worker,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', worker = ?, attempts = attempts + 1,"
                " started = coalesce(started, ?) WHERE id = ?",
                (worker, time.time(), row[0]),
            )
        return self.get(row[0])

    def requeue_running(self) -> list[str]:
        """At start, after a crash: every job left running goes back to the queue (the
        attempt the crash interrupted is not counted against it)."""
        with self._write() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            # the whole daemon stopped (power, SIGKILL): not the job's fault, not an attempt
            db.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, attempts = attempts - 1"
                " WHERE state = 'running'"
            )
        return ids

    def progress(self, job_id: str, done: int, total: int, what: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET done = ?, total = ?, what = ? WHERE id = ?",
                (done, total, what, job_id),
            )

    def mark(self, job_id: str, unit: str) -> None:
        """A unit of the job is finished (its files are complete)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO units (job, unit) VALUES (?, ?)", (job_id, unit))

    def units(self, job_id: str) -> set[str]:
        rows = self._db.execute("SELECT unit FROM units WHERE job = ?", (job_id,)).fetchall()
        return {r[0] for r in rows}

    def state(self, job_id: str) -> str | None:
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else str(row[0])

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        manifest: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
        error: tuple[str, str] | None = None,
    ) -> bool:
        """Close a job (done, failed or cancelled) unless it was already closed (a cancel
        that won the race); whether this call closed it."""
        assert state in FINAL, state
        code, message = error or (None, None)
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, manifest = ?,"
                " timings = coalesce(?, timings), error_code = ?, error_message = ?"
                " WHERE id = ? AND state IN ('queued', 'running')",
                (
                    state,
                    time.time(),
                    None if manifest is None else json.dumps(manifest),
                    None if timings is None else json.dumps(timings),
                    code,
                    message,
                    job_id,
                ),
            )
            if cur.rowcount:
                db.execute("DELETE FROM units WHERE job = ?", (job_id,))
        return bool(cur.rowcount)

    def manifest(self, job_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT manifest FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None or row[0] is None else dict(json.loads(row[0]))
