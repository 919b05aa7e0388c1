"""Synchronisation words inside a shared segment: atomics and futex wake-ups.

The ring (:mod:`daemon.ring`) keeps all of its synchronisation state in the
shared memory it maps, so that it works the same between processes and between
threads of one process:

- :class:`AtomicWord`, an unsigned 32- or 64-bit word operated on atomically
  (the ``atomics`` package), every operation sequentially consistent;
- :func:`futex_wait` / :func:`futex_wake`, the Linux futex system call on a
  32-bit word of the segment (shared, not ``FUTEX_PRIVATE``: the kernel keys it
  by the page, so it works across processes);
- :class:`Futex`, a wake-up channel built from two such words: a sleeper waits
  for a condition, a notifier wakes it, and the system call is skipped while
  nobody sleeps. A waiter may first poll the condition for a while
  (:func:`set_spin`): where cores are plenty and system calls dear (a sandboxed
  kernel such as gVisor: a futex hop of ~150 us), a poll catches the next frame
  without either side entering the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any, NoReturn

import atomics

from daemon.errors import RingError

log = logging.getLogger(__name__)

_MACHINE = platform.machine().lower()
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(_MACHINE)
_FUTEX_WAIT = 0  # without FUTEX_PRIVATE_FLAG: shared between processes
_FUTEX_WAKE = 1
_WAKE_ALL = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# syscall(2) reads every argument as a long: pass them all that wide.
_syscall.argtypes = [
    ctypes.c_long,
    ctypes.c_void_p,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_long,
]


def _sys_futex() -> int:
    if _SYS_FUTEX is None:
        raise RingError(f"futex wake-ups need Linux on x86_64 or aarch64, not {_MACHINE}")
    return _SYS_FUTEX


def futex_wait(address: int, expected: int, timeout: float | None) -> None:
    """Sleep while the 32-bit word at ``address`` equals ``expected``, at most ``timeout`` s.

    Returns on a wake-up, the timeout, a signal, a spurious wake-up or at once
    when the word differs: callers re-check their condition and deadline.
    The GIL is released while sleeping.
    """
    ts = None
    if timeout is not None:
        sec = max(timeout, 0.0)
        ts = _Timespec(int(sec), int((sec % 1.0) * 1e9))
    ret = _syscall(
        _sys_futex(),
        address,
        _FUTEX_WAIT,
        expected & 0xFFFFFFFF,
        None if ts is None else ctypes.addressof(ts),
        None,
        0,
    )
    if ret == -1:
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
            raise OSError(err, f"futex wait: {os.strerror(err)}")


def futex_wake(address: int, count: int = _WAKE_ALL) -> int:
    """Wake up to ``count`` sleepers on the word at ``address``; returns how many woke."""
    ret = _syscall(_sys_futex(), address, _FUTEX_WAKE, count, None, None, 0)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"futex wake: {os.strerror(err)}")
    return int(ret)


# Signatures of the patomic operations behind the ``atomics`` package
# (object address, [operand address,] memory order, [result address]).
_LOAD_T = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_STORE_T = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_RMW_T = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_SEQ_CST = int(atomics.MemoryOrder.SEQ_CST)


def _closed(*_: object) -> NoReturn:
    raise RingError("atomic word used after its ring was closed")


class AtomicWord:
    """An unsigned 32- or 64-bit word of a shared buffer, operated on atomically.

    Every operation is sequentially consistent (the wake-up protocol of
    :class:`Futex` is a store-then-load handshake, which acquire/release alone
    does not order). The word is an ``atomics.atomicview`` held open until
    :meth:`close`. The package's Python wrapper costs about 5 us an operation
    (it builds buffer objects per call), a tenth of the ring's latency budget,
    so by default the operations call the package's own op table (patomic)
    directly: about 0.5 us, the GIL held (they are a few instructions), fresh
    operand buffers per call so that threads can share a word. ``fast=False``,
    or an ``atomics`` release without that table, uses the public API.
    """

    __slots__ = (
        "_ctx",
        "_mem",
        "_view",
        "address",
        "exchange",
        "fetch_add",
        "load",
        "store",
        "width",
    )

    def __init__(self, mem: memoryview, *, fast: bool = True) -> None:
        self.width = mem.nbytes
        if self.width not in (4, 8):
            raise ValueError(f"an atomic word is 4 or 8 bytes, not {self.width}")
        self._mem = mem
        probe = ctypes.c_char.from_buffer(mem)
        self.address: int = ctypes.addressof(probe)
        del probe  # releases its export of ``mem``
        ctx = atomics.atomicview(buffer=mem, atype=atomics.UINT)
        view = ctx.__enter__()
        self._ctx: Any = ctx
        self._view = view  # open until close(): dropping it would release the buffer
        ctype = ctypes.c_uint32 if self.width == 4 else ctypes.c_uint64
        mask = (1 << (8 * self.width)) - 1
        ops = self._patomic_ops(view) if fast else None
        self.load: Callable[[], int]
        self.store: Callable[[int], None]
        self.fetch_add: Callable[[int], int]  # returns the previous value; negative deltas wrap
        self.exchange: Callable[[int], int]  # returns the previous value
        if ops is None:
            self.load = view.load
            self.store = view.store
            self.fetch_add = lambda delta: view.fetch_add(delta & mask)
            self.exchange = view.exchange
            return
        load_fp, store_fp, add_fp, xchg_fp = ops
        addr = self.address
        byref = ctypes.byref

        def load() -> int:
            r = ctype()
            load_fp(addr, _SEQ_CST, byref(r))
            return r.value

        def store(value: int) -> None:
            store_fp(addr, byref(ctype(value)), _SEQ_CST)

        def fetch_add(delta: int) -> int:
            r = ctype()
            add_fp(addr, byref(ctype(delta & mask)), _SEQ_CST, byref(r))
            return r.value

        def exchange(value: int) -> int:
            r = ctype()
            xchg_fp(addr, byref(ctype(value)), _SEQ_CST, byref(r))
            return r.value

        self.load, self.store, self.fetch_add, self.exchange = load, store, fetch_add, exchange

    @staticmethod
    def _patomic_ops(view: Any) -> tuple[Callable[..., None], ...] | None:
        """The direct operations, or ``None`` where this ``atomics`` lacks the op table."""
        try:
            core = view._core
            fps = [
                core.get_op_func(getattr(atomics.OpType, op))
                for op in ("LOAD", "STORE", "FETCH_ADD", "EXCHANGE")
            ]
        except AttributeError:
            log.warning("this atomics release has no op table: slow atomic operations")
            return None
        raw = [ctypes.cast(fp, ctypes.c_void_p).value or 0 for fp in fps]
        if not all(raw):
            return None
        return (_LOAD_T(raw[0]), _STORE_T(raw[1]), _RMW_T(raw[2]), _RMW_T(raw[3]))

    def close(self) -> None:
        """Exit the atomic view and release the buffer (before the mapping is closed)."""
        ctx = getattr(self, "_ctx", None)  # None: closed, or __init__ failed
        if ctx is None:
            return
        self.load = self.store = self.fetch_add = self.exchange = _closed
        self._ctx = self._view = None
        ctx.__exit__(None, None, None)
        self._mem.release()

    def __del__(self) -> None:
        self.close()


_spin_s = 0.0


def set_spin(seconds: float) -> None:
    """How long every :meth:`Futex.wait` of this process polls before it sleeps (0: never).
    The poll yields the CPU and the GIL between checks (``sched_yield``)."""
    global _spin_s
    _spin_s = max(0.0, seconds)


def _poll(ready: Callable[[], bool], seconds: float) -> bool:
    """Whether ``ready()`` came true within ``seconds`` of polling."""
    end = time.perf_counter() + seconds
    while not ready():
        if time.perf_counter() >= end:
            return False
        os.sched_yield()
    return True


class Futex:
    """A wake-up channel in shared memory: a 32-bit futex word and a count of sleepers.

    A sleeper loops ``while not ready(): futex.wait(ready, deadline)``; whoever
    makes the condition true calls :meth:`notify` afterwards. No wake-up is
    lost: the sleeper counts itself in ``waiters`` and reads the word *before*
    its last check of the condition, the notifier changes the condition
    *before* it reads ``waiters``, all sequentially consistent; so either the
    sleeper sees the new condition, or the notifier sees the sleeper and
    changes the word, and the kernel's wait (which compares the word with what
    the sleeper read) returns at once or is woken. While nobody sleeps,
    :meth:`notify` is one atomic load (no system call, no shared write).
    """

    __slots__ = ("_waiters", "_word")

    def __init__(self, word: AtomicWord, waiters: AtomicWord) -> None:
        if word.width != 4:
            raise ValueError("a futex word is 32 bits")
        self._word = word
        self._waiters = waiters

    def notify(self) -> None:
        """Wake every sleeper (call after making their condition true)."""
        if self._waiters.load():
            self._word.fetch_add(1)
            futex_wake(self._word.address)

    def wait(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Sleep once, unless ``ready()`` holds, until notified or ``deadline``
        (``time.monotonic()``; ``None``: no limit). ``False`` if the deadline had
        passed; ``True`` otherwise, also after a spurious wake-up: re-check."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if _spin_s:
            if _poll(ready, _spin_s if remaining is None else min(_spin_s, remaining)):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
        self._waiters.fetch_add(1)
        try:
            seen = self._word.load()
            if not ready():
                futex_wait(self._word.address, seen, remaining)
        finally:
            self._waiters.fetch_add(-1)
        return True
