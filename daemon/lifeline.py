"""The supervisor's lifeline segment: the stop flag every stage polls, and proof of life.

``/dev/shm/echod-{pid}-supervisor`` holds one 32-bit word, the stop flag.
Setting it is a store and a futex wake-up; a stage reads it with an atomic
load and sleeps on it with a futex wait. Nothing is locked on the way, so a
stage killed in the middle of any of these (SIGKILL, the OOM killer) leaves
nothing held: a ``multiprocessing.Event`` in the same place kept counting a
dead sleeper and blocked ``set()`` for ever.

The supervisor holds an exclusive ``flock`` on the segment for its whole life.
The kernel drops that lock when the process dies, however it dies, so a free
lock, not a pid that may have been reused or that lives in another pid
namespace sharing ``/dev/shm``, is what tells :func:`daemon.ring.remove_stale_segments`
that the rings ``{pid}-*`` are abandoned.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from pathlib import Path

from daemon.errors import RingError
from daemon.wakeup import AtomicWord, futex_wait, futex_wake

SHM_DIR = Path("/dev/shm")
SUFFIX = "supervisor"
_SIZE = 64


def segment_path(owner_pid: int) -> Path:
    return SHM_DIR / f"echod-{owner_pid}-{SUFFIX}"


def owner_alive(owner_pid: int) -> bool | None:
    """Whether the supervisor ``owner_pid`` still holds its lifeline (None: it has none)."""
    try:
        fd = os.open(segment_path(owner_pid), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Lifeline:
    """A stop flag in shared memory that no process can poison by dying.

    :meth:`create` (the supervisor) makes the segment and holds its lock;
    a stage gets the flag pickled by name and :meth:`attach` es it.
    """

    def __init__(self, path: Path, fd: int, owner: bool) -> None:
        self.path = path
        self._fd = fd
        self._owner = owner
        self._mm = mmap.mmap(fd, _SIZE)
        self._word = AtomicWord(memoryview(self._mm)[:4])

    @classmethod
    def create(cls, owner_pid: int | None = None) -> Lifeline:
        """The supervisor's flag (and lock); fails if a live supervisor owns that name."""
        path = segment_path(owner_pid or os.getpid())
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RingError(f"{path} belongs to a running supervisor") from None
        os.ftruncate(fd, 0)  # a leftover of a dead pid that had the same number
        os.ftruncate(fd, _SIZE)
        return cls(path, fd, owner=True)

    @classmethod
    def attach(cls, path: str) -> Lifeline:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RingError(f"the supervisor's segment {path} is gone") from None
        return cls(Path(path), fd, owner=False)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Lifeline.attach, (str(self.path),))

    def set(self) -> None:
        self._word.store(1)
        futex_wake(self._word.address)

    def is_set(self) -> bool:
        return self._word.load() != 0

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set or ``timeout`` s; whether it is set."""
        if not self.is_set():
            futex_wait(self._word.address, 0, timeout)
        return self.is_set()

    def close(self) -> None:
        """Unmap; the owner also unlinks the segment and so gives up its lock."""
        if self._fd < 0:
            return
        self._word.close()
        self._mm.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = -1
