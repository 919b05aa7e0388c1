"""Log lines for people and for collectors: journald, JSON or plain text.

Every process (the supervisor and each stage) writes one line per event to
stderr; a traceback is folded into its event's line. Each line names the stage
that wrote it (``echod`` for the supervisor, ``infer``, ``sink``, ``jobs-0``...)
and, when the record carries them, the frame or the job it concerns
(``log.warning("...", extra={"frame": 12})``, ``extra={"job": job_id}``).

Formats (``logging.format``, ``echod run --log-format``):

- ``journal``: ``<4>infer[1234]: message``, the syslog priority first (``<3>`` error,
  ``<4>`` warning, ``<6>`` info, ``<7>`` debug); journald adds the time and keeps the
  priority. ``auto`` picks it when stderr is the journal (``$JOURNAL_STREAM`` names it).
- ``json``: one object per line: ``time``, ``level``, ``priority``, ``stage``, ``pid``,
  ``logger``, ``message``, ``frame`` / ``job`` when known, ``exception``, ``repeats``.
- ``text``: time, stage[pid], level, message (a terminal; ``auto`` elsewhere).

Repeats are limited: the same message from one logger (numbers aside: a backoff
that grows, a reconnect count, a frame index) at most 5 times per
``logging.repeat_s``; the next one after that says how many were left out. A
scanner that comes and goes does not flood the journal.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Literal

Format = Literal["auto", "text", "journal", "json"]

PRIORITY = {  # syslog priorities (sd-daemon(3))
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
BURST = 5  # repeats of one message let through per window (the first few say what happens)
MAX_KEYS = 1024  # repeat-filter memory: older keys are forgotten past this
_DIGITS = re.compile(r"\d+")
THREAD_PREFIX = "echod-"  # threads named echod-<stage> log as that stage (workers = threads)


def journal_stderr() -> bool:
    """Whether stderr is connected to journald (systemd.exec(5): ``$JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of the stream it set up; a redirected stderr no longer matches)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def resolve(fmt: Format) -> Literal["text", "journal", "json"]:
    if fmt == "auto":
        return "journal" if journal_stderr() else "text"
    return fmt


def setup(level: str, fmt: Format, repeat_s: float, stage: str) -> None:
    """Configure the root logger of this process (the CLI and each stage process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(StageFilter(stage))
    if repeat_s > 0:
        handler.addFilter(RepeatFilter(repeat_s))
    handler.setFormatter(FORMATTERS[resolve(fmt)]())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def set_level(level: str) -> None:
    """Change this process's log level (SIGHUP reload)."""
    logging.getLogger().setLevel(level)


class StageFilter(logging.Filter):
    """Stamps ``record.stage``: this process's stage, or the ``echod-<stage>`` thread's."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stage"):
            thread = record.threadName or ""
            named = thread.startswith(THREAD_PREFIX)
            record.stage = thread[len(THREAD_PREFIX) :] if named else self.stage
        return True


class RepeatFilter(logging.Filter):
    """Passes the first :data:`BURST` of a message in a window of ``window_s`` seconds and
    drops the rest; the first one let through in a later window carries ``record.repeats``
    (how many were dropped). A message is its logger, level, text and arguments with the
    numbers left out (a growing backoff, a reconnect count, a frame index)."""

    def __init__(self, window_s: float) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[Any, ...], tuple[float, int, int]] = {}  # start, passed, dropped
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg), _shape(record.args))
        now = time.monotonic()
        with self._lock:
            start, passed, dropped = self._seen.get(key, (-self.window_s, 0, 0))
            if now - start < self.window_s:
                if passed >= BURST:
                    self._seen[key] = (start, passed, dropped + 1)
                    return False
                self._seen[key] = (start, passed + 1, dropped)
                return True
            if len(self._seen) >= MAX_KEYS:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            self._seen[key] = (now, 1, 0)
        if dropped:
            record.repeats = dropped
            record.repeat_s = self.window_s
        return True


def _shape(args: Any) -> tuple[Any, ...]:
    """A message's arguments with the numbers left out (they change between repeats)."""
    if isinstance(args, dict):
        args = tuple(args.values())
    return tuple(
        type(a).__name__ if isinstance(a, int | float) else _DIGITS.sub("#", str(a))
        for a in (args or ())
    )


class TextFormatter(logging.Formatter):
    """One line: the message, its frame or job, left-out repeats, a folded traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k} {getattr(record, k)}" for k in ("frame", "job") if hasattr(record, k)]
        repeats = getattr(record, "repeats", 0)
        if repeats:
            extras.append(
                f"{repeats} more like this in {getattr(record, 'repeat_s', 0):g} s left out"
            )
        if extras:
            head, sep, tail = line.partition("\n")
            line = f"{head} ({', '.join(extras)}){sep}{tail}"
        return " | ".join(part for part in line.splitlines() if part.strip())


class PlainFormatter(TextFormatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(stage)s[%(process)d] %(levelname)s %(message)s")


class JournalFormatter(TextFormatter):
    def __init__(self) -> None:
        super().__init__("%(stage)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "priority": PRIORITY.get(record.levelno, 6),
            "stage": getattr(record, "stage", None),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("frame", "job", "repeats"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": PlainFormatter,
    "journal": JournalFormatter,
    "json": JsonFormatter,
}
