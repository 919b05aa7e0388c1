"""One daemon per runtime directory: an exclusive lock on ``echod.pid`` there.

Taken before any socket or ring is touched, so a second ``echod run`` pointed at
the same runtime directory can neither unlink the first one's control socket
nor clean up its rings: it exits with :class:`AlreadyRunningError` naming the
running pid. The kernel drops the lock with the process, however it dies, so a
stale pid file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from daemon.errors import AlreadyRunningError

PID_FILE = "echod.pid"


class InstanceLock:
    """The runtime directory's pid file, locked for as long as this daemon runs."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / PID_FILE
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another echod (pid {holder}) is running with runtime directory "
                f"{self.path.parent}: stop it first, or give this one its own "
                "(--set paths.runtime_dir=DIR)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the lock; the file stays (unlinking would race)
        self._fd = -1
