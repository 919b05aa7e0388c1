"""systemd's notify protocol (``sd_notify``): READY, STATUS, WATCHDOG, RELOADING,
STOPPING, EXTEND_TIMEOUT_USEC.

A datagram to ``$NOTIFY_SOCKET``; a no-op when not started by systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

MIN_WATCHDOG_S = 2.0  # stages beat every 0.5 s: half of a shorter WatchdogSec= is too tight


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=..."``); ``False`` when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as e:  # systemd went away (or never listened): the service goes on
        log.debug("sd_notify to %s failed: %s", address, e)
        return False
    return True


def under_systemd() -> bool:
    """Started by systemd as a notify service (the appliance), not from a shell."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def watchdog_s() -> float | None:
    """The unit's ``WatchdogSec=`` in seconds (``$WATCHDOG_USEC``), or None when it has none.
    Half of it is both the ping period and the staleness that stops the pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


def reloading() -> bool:
    """RELOADING=1, stamped with CLOCK_MONOTONIC as systemd 253+ wants it."""
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now_us}")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the current start (or stop) times out."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


def status_text(status: dict[str, Any]) -> str:
    """The unit's one-line STATUS= from the supervisor's status: state, fps, model, jobs
    queued, and what is wrong (a display that failed, a scanner that is gone)."""
    parts = [status.get("state") or "?"]
    if status.get("fps") is not None:
        parts.append(f"{status['fps']:.1f} fps")
    if status.get("model"):
        parts.append(f"model {status['model']} ({status.get('engine')} {status.get('device')})")
    jobs = status.get("jobs")
    if jobs is not None:
        parts.append(f"{jobs.get('queued', 0)} jobs queued, {jobs.get('running', 0)} running")
    troubled = [
        f"stage {name} {st['state']}"
        for name, st in (status.get("stages") or {}).items()
        if st.get("state") not in ("running", "done")
    ]
    parts += troubled
    source = status.get("source") or {}
    if source.get("state") in ("connecting", "disconnected"):
        parts.append(f"scanner {source['state']}")
    display = status.get("display") or {}
    if display.get("state") == "failed":
        parts.append(f"DISPLAY FAILED: {display.get('error')}")
    return f"{parts[0]}: {', '.join(parts[1:])}" if len(parts) > 1 else parts[0]
