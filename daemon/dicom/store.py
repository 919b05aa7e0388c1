"""What the DICOM node keeps: received instances on disk, and its bookkeeping in SQLite.

Layout, in ``<state dir>/dicom/``:

- ``incoming/<study>/<series>.<receipt>/<sop>.dcm``: each instance as it arrived
  (written to a temporary name, synced, renamed) before the C-STORE is answered;
- ``outgoing/<job>/``: results converted for sending (PNG -> Secondary Capture);
- ``dicom.db``: a *receipt* per series as it arrives (state ``receiving`` until
  ``quiet_s`` pass without an instance, then ``submitted`` with its job,
  ``unrouted``, ``done`` or ``failed``), and a *send* per result file and
  destination (``pending`` with its attempts and next try, ``sent`` or ``failed``).

Everything is committed before it is acknowledged, so a restart loses nothing: a
series still receiving completes after its quiet time, a submitted one follows its
job, pending sends are tried again. Storage is bounded: when an instance would take
it over the quota, the oldest studies whose series are all finished are removed; if
that is not enough the instance is refused.

One connection, guarded by a lock: association threads, the node's loop, the
senders and the control thread share it (every call is short).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

SCHEMA_VERSION = 1
RECEIVING, SUBMITTED, DONE, FAILED, UNROUTED = (
    "receiving",
    "submitted",
    "done",
    "failed",
    "unrouted",
)
FINISHED = (DONE, FAILED, UNROUTED)
PENDING, SENT = "pending", "sent"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # a DICOM UID: safe as a file name, never a path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    id TEXT PRIMARY KEY,
    series TEXT NOT NULL,
    study TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    modality TEXT NOT NULL,
    body_part TEXT NOT NULL,
    description TEXT NOT NULL,
    folder TEXT NOT NULL,
    state TEXT NOT NULL,
    first REAL NOT NULL,
    last REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    route INTEGER,
    job TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS receipts_state ON receipts (state, last);
CREATE TABLE IF NOT EXISTS sends (
    job TEXT NOT NULL,
    destination TEXT NOT NULL,
    file TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (job, destination, file)
);
CREATE INDEX IF NOT EXISTS sends_state ON sends (state, next_try);
"""


class StorageFull(Exception):
    """An instance does not fit in ``max_storage_gb`` even after removing finished studies."""


@dataclass(frozen=True)
class Instance:
    """What the node records of an arriving instance (from its header)."""

    sop: str
    series: str
    study: str
    modality: str
    body_part: str
    description: str


class DicomStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.outgoing = root / "outgoing"
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        path = root / "dicom.db"
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            self.outgoing.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"DICOM store {path} was written by a newer echod (schema {version}): "
                    "upgrade echod, or set paths.state_dir to another folder"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"DICOM store {path} cannot be used ({e}): move it aside to start afresh"
            ) from None
        except OSError as e:
            raise ConfigError(f"DICOM store {root}: {e.strerror or e}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    # -- receiving -------------------------------------------------------------------

    def add(self, inst: Instance, data: bytes, calling_ae: str, peer: str) -> str:
        """Write one instance (``data``: the whole file) into its series' open receipt,
        made when none is open; committed when this returns. The receipt's id."""
        with self._write() as db:
            row = db.execute(
                "SELECT id, folder FROM receipts WHERE series = ? AND state = ?",
                (inst.series, RECEIVING),
            ).fetchone()
            now = time.time()
            if row is None:
                rid = uuid.uuid4().hex[:12]
                folder = self.incoming / inst.study / f"{inst.series}.{rid}"
                db.execute(
                    "INSERT INTO receipts (id, series, study, calling_ae, peer, modality,"
                    " body_part, description, folder, state, first, last)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rid,
                        inst.series,
                        inst.study,
                        calling_ae,
                        peer,
                        inst.modality,
                        inst.body_part,
                        inst.description,
                        str(folder),
                        RECEIVING,
                        now,
                        now,
                    ),
                )
            else:
                rid, folder = row[0], Path(row[1])
            path = folder / f"{inst.sop}.dcm"
            replaced = path.stat().st_size if path.exists() else None
            self._make_room(len(data) - (replaced or 0))
            _write_synced(path, data)
            db.execute(
                "UPDATE receipts SET instances = instances + ?, bytes = bytes + ?, last = ?"
                " WHERE id = ?",
                (replaced is None, len(data) - (replaced or 0), now, rid),
            )
        return str(rid)

    def _make_room(self, need: int) -> None:
        """Remove the oldest finished studies until ``need`` more bytes fit; when even
        removing all of them would not do, :class:`StorageFull` and nothing is removed."""
        used = self.used()
        if used + need <= self.max_bytes:
            return
        studies = self._db.execute(
            "SELECT study, sum(bytes), max(last) AS newest FROM receipts GROUP BY study"
            " HAVING sum(state NOT IN (?, ?, ?)) = 0 ORDER BY newest",
            FINISHED,
        ).fetchall()
        if used - sum(size for _, size, _ in studies) + need > self.max_bytes:
            raise StorageFull(
                f"DICOM storage is full ({used / 2**20:.1f} of "
                f"{self.max_bytes / 2**20:.1f} MB, in series not finished yet)"
            )
        for study, size, _ in studies:
            if used + need <= self.max_bytes:
                break
            self._db.execute("DELETE FROM receipts WHERE study = ?", (study,))
            shutil.rmtree(self.incoming / study, ignore_errors=True)
            used -= size

    def used(self) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT coalesce(sum(bytes), 0) FROM receipts").fetchone()[0]
            )

    def quiet(self, before: float) -> list[dict[str, Any]]:
        """Receipts still receiving whose last instance came before ``before``."""
        return self._rows(
            "SELECT * FROM receipts WHERE state = ? AND last <= ? ORDER BY last",
            (RECEIVING, before),
        )

    def receipts(self, *states: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(states))
        return self._rows(f"SELECT * FROM receipts WHERE state IN ({marks}) ORDER BY first", states)

    def settle(self, rid: str, state: str, **fields: Any) -> None:
        """Move a receipt on (``route``, ``job``, ``error`` as given)."""
        sets = "".join(f", {k} = ?" for k in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE receipts SET state = ?{sets} WHERE id = ?", (state, *fields.values(), rid)
            )

    # -- sending ---------------------------------------------------------------------

    def finish_job(self, rid: str, state: str, job: str, sends: list[tuple[str, str]]) -> None:
        """A receipt's job ended: its sends ``(destination, file)`` queued and the receipt
        closed, in one transaction."""
        now = time.time()
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO sends (job, destination, file, state, next_try, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(job, dest, file, PENDING, now, now) for dest, file in sends],
            )
            db.execute("UPDATE receipts SET state = ? WHERE id = ?", (state, rid))

    def due(self, now: float) -> dict[tuple[str, str], list[str]]:
        """Pending sends whose time has come, by (job, destination)."""
        out: dict[tuple[str, str], list[str]] = {}
        for r in self._rows(
            "SELECT job, destination, file FROM sends WHERE state = ? AND next_try <= ?"
            " ORDER BY next_try",
            (PENDING, now),
        ):
            out.setdefault((r["job"], r["destination"]), []).append(r["file"])
        return out

    def sent(self, job: str, destination: str, file: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, error = NULL, updated = ?"
                " WHERE job = ? AND destination = ? AND file = ?",
                (SENT, time.time(), job, destination, file),
            )

    def failed(
        self,
        job: str,
        destination: str,
        file: str,
        error: str,
        backoff: Callable[[int], float | None],
    ) -> tuple[int, float | None]:
        """One failed try; ``backoff(tries)`` says when to try again (seconds from now), or
        None: failed for good. The tries so far and that wait."""
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT attempts FROM sends WHERE job = ? AND destination = ? AND file = ?",
                (job, destination, file),
            ).fetchone()
            tries = (row[0] if row else 0) + 1
            wait = backoff(tries)
            db.execute(
                "UPDATE sends SET state = ?, attempts = ?, next_try = ?, error = ?, updated = ?"
                " WHERE job = ? AND destination = ? AND file = ?",
                (
                    FAILED if wait is None else PENDING,
                    tries,
                    now + (wait or 0.0),
                    error,
                    now,
                    job,
                    destination,
                    file,
                ),
            )
        return tries, wait

    def sends(self, job: str = "", states: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        where, args = [], []
        if job:
            where.append("job = ?")
            args.append(job)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self._rows(
            f"SELECT * FROM sends {clause} ORDER BY job, destination, file", tuple(args)
        )


def _write_synced(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
