"""Events from stages to the supervisor (ready, failed, heartbeat, stats, source, done,
reply), and commands from the supervisor to a stage.

Each stage process has two pipes of its own, one each way. A shared
``multiprocessing.Queue`` would be simpler, but a process killed while it holds
the queue's lock (SIGKILL, the OOM killer) blocks every other user for good:
the supervisor would go deaf while frames still flow. A pipe has no lock: a
killed stage can only break its own pipes, and its restart gets new ones.
Stages run as threads use plain queues.
"""

from __future__ import annotations

import contextlib
import queue
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any


class PipeEvents:
    """A stage process's end: ``put`` sends one event (a single small write)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def put(self, event: dict[str, Any]) -> None:
        self._conn.send(event)

    def close(self) -> None:
        self._conn.close()


class PipeCommands:
    """Commands to one stage process: the supervisor :meth:`put` s, the stage
    :meth:`get_nowait` s (``queue.Empty`` when there is none), like a queue."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def put(self, command: Any) -> None:
        with contextlib.suppress(OSError):  # the stage is gone: the caller's deadline passes
            self._conn.send(command)

    def get_nowait(self) -> Any:
        if not self._conn.poll():
            raise queue.Empty
        return self._conn.recv()

    def close(self) -> None:
        self._conn.close()


class EventBus:
    """The supervisor's end: a channel per stage, one place to wait on them all."""

    def __init__(self, mp: BaseContext | None) -> None:
        self._mp = mp  # None: stages are threads
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._readers: list[Connection] = []
        self._wake_r: Connection | None = None
        self._wake_w: Connection | None = None
        if mp is not None:
            self._wake_r, self._wake_w = mp.Pipe(duplex=False)

    def channel(self) -> Any:
        """A new channel for one stage (process: a pipe; thread: the shared queue)."""
        if self._mp is None:
            return self._queue
        reader, writer = self._mp.Pipe(duplex=False)
        self._readers.append(reader)
        return PipeEvents(writer)

    def commands(self) -> tuple[Any, Any]:
        """A new command channel for one stage: (the supervisor's end, the stage's end)."""
        if self._mp is None:
            q: queue.Queue[Any] = queue.Queue()
            return q, q
        reader, writer = self._mp.Pipe(duplex=False)
        return PipeCommands(writer), PipeCommands(reader)

    def wake(self) -> None:
        """Make :meth:`get` return now (any thread)."""
        if self._wake_w is None:
            self._queue.put({"stage": "", "event": "wake"})
        else:
            self._wake_w.send(None)

    def pending(self) -> bool:
        """Events are waiting (a stage that just exited may have said why)."""
        if self._mp is None:
            return not self._queue.empty()
        return any(r.poll() for r in self._readers)

    def get(self, timeout: float) -> list[dict[str, Any]]:
        """The events that came within ``timeout`` seconds (all that are there once one is)."""
        if self._mp is None:
            try:
                first = (
                    self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                return []
            events = [first]
            while True:
                try:
                    events.append(self._queue.get_nowait())
                except queue.Empty:
                    return events
        assert self._wake_r is not None
        ready = wait([*self._readers, self._wake_r], timeout)
        events = []
        for conn in ready:
            assert isinstance(conn, Connection)
            while conn.poll():
                try:
                    item = conn.recv()
                except (EOFError, OSError):  # the stage is gone: its pipe is done
                    self._drop(conn)
                    break
                if item is not None:
                    events.append(item)
        return events

    def _drop(self, conn: Connection) -> None:
        if conn in self._readers:
            self._readers.remove(conn)
        conn.close()

    def close(self) -> None:
        for conn in [*self._readers, self._wake_r, self._wake_w]:
            if conn is not None:
                conn.close()
        self._readers.clear()
