"""The shared-memory ring: fixed-size frame slots, one writer, several readers.

A ring is a file ``/dev/shm/echod-{name}`` that every process maps (``os.open``
+ ``mmap``; not ``multiprocessing.shared_memory``, whose resource tracker
unlinks a segment when a process that merely attached to it exits). Ring names
start with the supervisor's pid (``"{pid}-frames"``) so that segments left by a
killed supervisor can be found (:func:`remove_stale_segments`).

Layout (all offsets fixed at creation; :data:`LAYOUT_VERSION` changes with it):

- header (:data:`_HEADER`): magic, layout version, the frame header size
  (``META_SIZE``), slots, payload bytes, max readers, and the synchronisation
  words: ``written`` (frames published), ``closed``, two wake-up channels
  (``data``: readers sleep there, the writer notifies; ``space``: a ``block``
  writer sleeps there, readers notify) and ``table_gen`` (bumped whenever the
  set of registered readers changes);
- the reader table, ``max_readers`` entries (:data:`_ENTRY`, one cache line
  pair each): state (free / reading all / reading newest / closed), mode,
  ``release`` (every frame before it is released), ``delivered`` (every frame
  before it was delivered once), frames read, dropped, age of the last frame,
  ``keep`` (how many frames before ``release`` it still reads: a sequence window,
  :meth:`RingReader.window`), the name;
- the slots, ``slot_bytes`` each: the sequence word, the frame header
  (``daemon.frame.META_DTYPE``), the payload at a 64-byte boundary.

Frame ``n`` (0, 1, ...) lives in slot ``n % slots``. Its slot's sequence word is
a seqlock: the writer makes it odd (``2n + 1``) before it touches the slot and
publishes ``2n + 2`` when done, then ``written = n + 1``. A reader that saw
``written > n`` copies the slot's header, then re-checks the word; a view of the
payload stays valid while the word still reads ``2n + 2``
(:meth:`RingFrame.valid`).

Memory ordering (correct on ARM, not only x86): every atomic operation is
sequentially consistent (:class:`daemon.wakeup.AtomicWord`). The writer marks a
slot odd with an atomic *exchange*, a read-modify-write with acquire semantics,
so its later payload writes cannot become visible before the mark. A reader
re-checks with ``fetch_add(0)`` rather than a load (Boehm, "Can seqlocks get
along with programming language memory models?", 2012): a plain acquire load
may be reordered *before* the data reads that precede it, a read-modify-write
with release semantics may not. If that re-check reads ``2n + 2``, it precedes
the writer's next exchange of that word in the word's modification order, so
(release RMW, then acquire RMW of the same word) everything the reader read
happens-before the writer's next overwrite: the reader saw no byte of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from daemon.errors import RingError
from daemon.frame import MAX_DIMS, META_DTYPE, META_SIZE, FrameMeta
from daemon.lifeline import owner_alive
from daemon.wakeup import AtomicWord, Futex

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "echod-"
MAGIC = b"ECHORING"
LAYOUT_VERSION = 3

ReaderMode = Literal["all", "newest"]
WriterPolicy = Literal["overwrite", "block"]

# Reader entry states (the entry's atomic ``state`` word).
_FREE, _ALL, _NEWEST, _CLOSED = 0, 1, 2, 3
_MODE_STATE = {"all": _ALL, "newest": _NEWEST}
_STATE_MODE = {_ALL: "all", _NEWEST: "newest"}
_NAME_BYTES = 32
_RING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def _padded(fields: list[tuple[str, str]], itemsize: int) -> np.dtype[Any]:
    base = np.dtype(fields, align=True)
    assert base.itemsize <= itemsize
    layout: Any = base.fields
    spec: Any = {
        "names": list(layout),
        "formats": [layout[n][0] for n in layout],
        "offsets": [layout[n][1] for n in layout],
        "itemsize": itemsize,
    }
    return np.dtype(spec)


_HEADER = _padded(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("meta_size", "<u4"),
        ("slots", "<u4"),
        ("max_readers", "<u4"),
        ("payload_bytes", "<u8"),
        ("slot_bytes", "<u8"),
        # atomics:
        ("written", "<u8"),
        ("closed", "<u4"),
        ("data_word", "<u4"),
        ("data_waiters", "<u4"),
        ("space_word", "<u4"),
        ("space_waiters", "<u4"),
        ("table_gen", "<u4"),
    ],
    128,
)

_ENTRY = _padded(
    [
        ("state", "<u4"),  # atomic
        ("mode", "<u4"),  # _ALL or _NEWEST, kept after close for stats
        ("release", "<u8"),  # atomic: frames before it are released
        ("delivered", "<u8"),  # frames before it were delivered at least once
        ("read", "<u8"),
        ("dropped", "<u8"),
        ("last_age_ns", "<u8"),  # 0: nothing read yet
        ("keep", "<u8"),  # frames before ``release`` the writer must not overwrite yet
        ("name", f"S{_NAME_BYTES}"),
    ],
    128,
)

# u64 indices of the entry's plain counters (the hot path uses a memoryview cast to "Q").
_DELIVERED, _READ, _DROPPED, _AGE, _KEEP = (
    _ENTRY.fields[f][1] // 8  # type: ignore[index]
    for f in ("delivered", "read", "dropped", "last_age_ns", "keep")
)

_SEQ_BYTES = 8
_META_OFFSET = 8  # META_DTYPE is 8-byte aligned
_PAYLOAD_OFFSET = -(-(_META_OFFSET + META_SIZE) // 64) * 64


def _header_struct() -> struct.Struct:
    """t_acquired_ns, ndim, dtype code, shape: what a read needs before the lazy full unpack."""
    fmt, at = "<", 0
    for field, code in (
        ("t_acquired_ns", "q"),
        ("ndim", "B"),
        ("dtype", "3s"),
        ("shape", f"{MAX_DIMS}I"),
    ):
        off = META_DTYPE.fields[field][1]  # type: ignore[index]
        fmt += f"{off - at}x{code}" if off > at else code
        at = off + struct.calcsize("<" + code)
    return struct.Struct(fmt)


_HDR_FIELDS = _header_struct()
_U1 = np.dtype("u1")
_DTYPES: dict[bytes, np.dtype[Any]] = {}


def _dtype_of(code: bytes) -> np.dtype[Any]:
    dt = _DTYPES.get(code)
    if dt is None:
        dt = _DTYPES[code] = np.dtype(code.rstrip(b"\0").decode())
    return dt


def _align64(n: int) -> int:
    return -(-n // 64) * 64


def _path(name: str) -> Path:
    return Path(SHM_DIR) / f"{PREFIX}{name}"


def _map(fd: int, size: int) -> mmap.mmap:
    """Map the whole segment, page tables filled now (no page faults on the first frames)."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


class EndOfStream(Exception):
    """The writer closed the stream and this reader has consumed all it will get."""


class FrameOverwritten(RingError):
    """A frame's slot was overwritten while it was being copied (:meth:`RingFrame.copy`)."""


class Ring:
    """A mapped ring; see the module docstring. Make one with :meth:`create` or :meth:`attach`."""

    def __init__(self, name: str, fd: int, mm: mmap.mmap) -> None:
        self.name = name
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._lock = threading.Lock()
        hdr = np.frombuffer(mm, _HEADER, count=1)[0]
        self.slots = int(hdr["slots"])
        self.payload_bytes = int(hdr["payload_bytes"])
        self.max_readers = int(hdr["max_readers"])
        self._slot_bytes = int(hdr["slot_bytes"])
        table_off = _HEADER.itemsize
        slots_off = _align64(table_off + self.max_readers * _ENTRY.itemsize)
        self._mv = memoryview(mm)
        self._words: list[AtomicWord] = []

        def word(offset: int, width: int) -> AtomicWord:
            w = AtomicWord(self._mv[offset : offset + width])
            self._words.append(w)
            return w

        def hword(field: str) -> AtomicWord:
            dt, off = _HEADER.fields[field][:2]  # type: ignore[index]
            return word(off, dt.itemsize)

        self._written = hword("written")
        self._closed = hword("closed")
        self._data = Futex(hword("data_word"), hword("data_waiters"))
        self._space = Futex(hword("space_word"), hword("space_waiters"))
        self._gen = hword("table_gen")
        self._table = np.frombuffer(mm, _ENTRY, count=self.max_readers, offset=table_off)
        self._entries = [
            self._mv[table_off + i * _ENTRY.itemsize :][: _ENTRY.itemsize].cast("Q")
            for i in range(self.max_readers)
        ]
        state_off = _ENTRY.fields["state"][1]  # type: ignore[index]
        release_off = _ENTRY.fields["release"][1]  # type: ignore[index]
        self._state = [
            word(table_off + i * _ENTRY.itemsize + state_off, 4) for i in range(self.max_readers)
        ]
        self._release = [
            word(table_off + i * _ENTRY.itemsize + release_off, 8) for i in range(self.max_readers)
        ]
        starts = [slots_off + i * self._slot_bytes for i in range(self.slots)]
        self._seq = [word(s, _SEQ_BYTES) for s in starts]
        self._meta_at = [s + _META_OFFSET for s in starts]
        self._payload = [
            np.frombuffer(mm, np.uint8, count=self.payload_bytes, offset=s + _PAYLOAD_OFFSET)
            for s in starts
        ]
        # Per slot, the last view made of it (frames mostly keep their shape): (key, view).
        self._views: list[tuple[tuple[Any, ...], np.ndarray] | None] = [None] * self.slots

    # -- making and finding rings --------------------------------------------------

    @classmethod
    def create(cls, name: str, *, slots: int, payload_bytes: int, max_readers: int = 8) -> Ring:
        """Create the segment ``/dev/shm/echod-{name}``; :class:`RingError` if it exists.

        The segment is built under a temporary name and linked into place whole,
        so :meth:`attach` never sees a half-made ring.
        """
        if not _RING_NAME.fullmatch(name):
            raise RingError(
                f"ring name {name!r}: use letters, digits, '_', '.', '-' "
                "(at most 200, not starting with a punctuation mark)"
            )
        if slots < 2 or payload_bytes < 1 or not 1 <= max_readers <= 1024:
            raise RingError(
                f"ring {name!r}: need slots >= 2, payload_bytes >= 1 and "
                f"1 <= max_readers <= 1024 (got {slots}, {payload_bytes}, "
                f"{max_readers})"
            )
        path = _path(name)
        if path.exists():
            raise RingError(
                f"ring {name!r} already exists ({path}); unlink it or, if its "
                "supervisor died, call remove_stale_segments()"
            )
        slot_bytes = _PAYLOAD_OFFSET + _align64(payload_bytes)
        size = _align64(_HEADER.itemsize + max_readers * _ENTRY.itemsize) + slots * slot_bytes
        tmp = path.with_name(f"{path.name}.new-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise RingError(
                    f"ring {name!r}: cannot reserve {size / 2**20:.1f} MiB in "
                    f"{SHM_DIR}: {e.strerror}; free space or use fewer/smaller "
                    "slots"
                ) from e
            with mmap.mmap(fd, size) as mm:
                hdr = np.frombuffer(mm, _HEADER, count=1)
                hdr["version"] = LAYOUT_VERSION
                hdr["meta_size"] = META_SIZE
                hdr["slots"] = slots
                hdr["max_readers"] = max_readers
                hdr["payload_bytes"] = payload_bytes
                hdr["slot_bytes"] = slot_bytes
                hdr["magic"] = MAGIC
                del hdr
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RingError(f"ring {name!r} already exists ({path})") from None
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink()
        log.debug(
            "created ring %s: %d slots of %d bytes, %d readers",
            name,
            slots,
            payload_bytes,
            max_readers,
        )
        return cls(name, fd, _map(fd, size))

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map an existing ring; :class:`RingError` if missing, not a ring, or another layout."""
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RingError(
                f"no ring {name!r} ({path} does not exist); the stage that "
                "creates it (the supervisor) is not running, or it was removed"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.itemsize:
                raise RingError(f"{path} is not an echod ring ({size} bytes)")
            mm = _map(fd, size)
            hdr = np.frombuffer(mm, _HEADER, count=1)[0].copy()
            if bytes(hdr["magic"]) != MAGIC:
                mm.close()
                raise RingError(f"{path} is not an echod ring (no magic number)")
            if int(hdr["version"]) != LAYOUT_VERSION or int(hdr["meta_size"]) != META_SIZE:
                mm.close()
                raise RingError(
                    f"ring {name!r} has layout version {int(hdr['version'])} with "
                    f"{int(hdr['meta_size'])}-byte frame headers; this echod uses version "
                    f"{LAYOUT_VERSION} with {META_SIZE}: run every stage from one install"
                )
            need = _align64(_HEADER.itemsize + int(hdr["max_readers"]) * _ENTRY.itemsize) + int(
                hdr["slots"]
            ) * int(hdr["slot_bytes"])
            if size < need:
                mm.close()
                raise RingError(f"ring {name!r} is truncated ({size} of {need} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, mm)

    # -- endpoints -----------------------------------------------------------------

    def writer(self, policy: WriterPolicy = "overwrite") -> RingWriter:
        """The writing end; only one may write at a time. It continues the sequence."""
        if policy not in ("overwrite", "block"):
            raise RingError(f"writer policy {policy!r}: use 'overwrite' or 'block'")
        return RingWriter(self, policy)

    def reader(self, name: str, mode: ReaderMode = "all", keep: int = 0) -> RingReader:
        """Register (or resume) the reader entry ``name``.

        ``keep``: the reader also reads the ``keep`` frames before the one it holds
        (:meth:`RingReader.window`); a ``block`` writer leaves them in place (an
        "overwrite" writer does not wait: the window may be torn). The ring needs more
        than ``keep + 1`` slots for the writer to stay ahead.

        A new "all" reader starts with the oldest frame certainly still in the
        ring, a new "newest" reader with the latest one. An entry of that name
        that was not closed (its stage crashed) is resumed as it is: its
        unreleased frame is delivered again, counters continue. A closed entry
        is resumed too, skipping (and counting as dropped) what was overwritten
        meanwhile. Only one :class:`RingReader` may use an entry at a time.
        """
        if mode not in _MODE_STATE:
            raise RingError(f"reader mode {mode!r}: use 'all' or 'newest'")
        if not 0 <= keep < self.slots - 1:
            raise RingError(
                f"ring {self.name!r}: a reader keeping {keep} earlier frames needs more than "
                f"{keep + 1} slots, the ring has {self.slots}"
            )
        key = name.encode()
        if not key or len(key) > _NAME_BYTES or b"\0" in key:
            raise RingError(f"reader name {name!r}: 1 to {_NAME_BYTES} bytes, no NUL")
        new_state = _MODE_STATE[mode]
        with self._table_lock():
            states = [s.load() for s in self._state]
            i = next(
                (
                    i
                    for i, s in enumerate(states)
                    if s != _FREE and bytes(self._table[i]["name"]) == key
                ),
                None,
            )
            if i is not None and states[i] in (_ALL, _NEWEST):
                if states[i] != new_state or self._entries[i][_KEEP] != keep:
                    self._entries[i][_KEEP] = keep
                    self._table[i]["mode"] = new_state
                    self._state[i].store(new_state)
                    self._gen.fetch_add(1)
            else:
                resume = i is not None
                if i is None:
                    i = next((i for i, s in enumerate(states) if s == _FREE), None)
                if i is None:
                    i = next((i for i, s in enumerate(states) if s == _CLOSED), None)
                if i is None:
                    raise RingError(
                        f"ring {self.name!r}: all {self.max_readers} reader entries "
                        "are in use; create it with a larger max_readers"
                    )
                self._activate(i, key, new_state, resume, keep)
        return RingReader(self, i, name, mode)

    def _activate(self, i: int, key: bytes, state: int, resume: bool, keep: int) -> None:
        """(Re)start entry ``i`` without a window where a block writer could lap it."""
        entry, release = self._entries[i], self._release[i]
        floor = release.load() if resume else 0
        if not resume:
            self._table[i] = np.zeros((), _ENTRY)
            self._table[i]["name"] = key
        self._table[i]["mode"] = state
        entry[_KEEP] = keep
        release.store(floor)  # holds a block writer back until the start is known
        self._state[i].store(state)
        self._gen.fetch_add(1)  # the writer rescans the table before its next frame
        written = self._written.load()
        if state == _ALL:
            start = max(floor, written - self.slots + 1, 0)  # slot of `written` may be in work
        else:
            start = max(floor, written - 1, 0)
        if resume:
            entry[_DROPPED] += max(0, start - max(floor, entry[_DELIVERED]))
        release.store(start)
        self._space.notify()

    @contextlib.contextmanager
    def _table_lock(self) -> Iterator[None]:
        """Registration is rare: a thread lock plus ``flock`` (released if a process dies)."""
        if self._mm is None:
            raise RingError(f"ring {self.name!r} is closed")
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- state ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for operators: frames written, whether closed, and per reader entry
        its mode, frames read, dropped, age of the last frame read (ms, ``None`` before the
        first), ``lag`` (frames published it has not released) and ``active``."""
        with self._table_lock():
            written = self._written.load()
            readers: dict[str, dict[str, Any]] = {}
            for i, e in enumerate(self._entries):
                state = self._state[i].load()
                if state == _FREE:
                    continue
                name = bytes(self._table[i]["name"]).decode(errors="replace")
                readers[name] = {
                    "mode": _STATE_MODE[int(self._table[i]["mode"])],
                    "read": e[_READ],
                    "dropped": e[_DROPPED],
                    "last_age_ms": e[_AGE] / 1e6 if e[_AGE] else None,
                    "lag": max(0, written - self._release[i].load()),
                    "active": state != _CLOSED,
                }
            return {"written": written, "closed": bool(self._closed.load()), "readers": readers}

    def held(self, name: str) -> int | None:
        """The frame reader ``name`` was given and has not released (its stage is working
        on it, or died on it), or ``None``."""
        with self._table_lock():
            i = self._active_entry(name)
            if i is None:
                return None
            release = self._release[i].load()
            return release if self._entries[i][_DELIVERED] > release else None

    def skip_held(self, name: str) -> int | None:
        """Release, and count as dropped, the frame reader ``name`` holds (its stage died on
        it: the poison-pill rule), so that the restarted stage resumes after it. Returns
        its sequence number, or ``None`` when it held none."""
        with self._table_lock():
            i = self._active_entry(name)
            if i is None:
                return None
            release = self._release[i].load()
            if self._entries[i][_DELIVERED] <= release:
                return None
            self._entries[i][_DROPPED] += 1
            self._release[i].store(release + 1)
        self._space.notify()
        return release

    def _active_entry(self, name: str) -> int | None:
        key = name.encode()
        for i, state in enumerate(self._state):
            if state.load() in (_ALL, _NEWEST) and bytes(self._table[i]["name"]) == key:
                return i
        return None

    # -- frames --------------------------------------------------------------------

    def latest(self) -> RingFrame | None:
        """The newest published frame, looked at without a reader entry (nothing counted,
        nothing held back: statistics such as /metrics), or ``None`` when there is none yet
        or it is being overwritten. Check ``valid()`` after using it."""
        written = self._written.load()
        return self._frame(written - 1) if written else None

    def _frame(self, seq: int) -> RingFrame | None:
        """Frame ``seq`` (published: ``written > seq``), or ``None`` if it was overwritten."""
        slot = seq % self.slots
        at = self._meta_at[slot]
        raw = self._mm[at : at + META_SIZE]  # type: ignore[index]
        word = self._seq[slot]
        if word.fetch_add(0) != 2 * seq + 2:  # RMW re-check: see the module docstring
            return None
        t_acquired, ndim, code, *dims = _HDR_FIELDS.unpack_from(raw)
        key = (False, code, *dims[:ndim])
        cached = self._views[slot]
        if cached is not None and cached[0] == key:
            image = cached[1]
        else:
            image = self._view(slot, tuple(dims[:ndim]), _dtype_of(code), writable=False)
        return RingFrame(seq, image, raw, t_acquired, word)

    def _view(
        self, slot: int, shape: tuple[int, ...], dtype: np.dtype[Any], *, writable: bool
    ) -> np.ndarray:
        """A view of the slot's payload as an array (cached until the slot's shape changes)."""
        image = self._payload[slot][: math.prod(shape) * dtype.itemsize].view(dtype)
        image = image.reshape(shape)
        image.flags.writeable = writable
        code = dtype.str[1:].encode().ljust(3, b"\0")
        self._views[slot] = ((writable, code, *shape), image)
        return image

    def _min_release(self) -> int:
        """The lowest ``release - keep`` of the "all" readers (the writer may overwrite
        below it)."""
        low = 2**63
        for state, release, entry in zip(self._state, self._release, self._entries, strict=True):
            if state.load() == _ALL:
                low = min(low, release.load() - entry[_KEEP])
        return low

    def _laggards(self, need: int) -> list[str]:
        return [
            bytes(self._table[i]["name"]).decode(errors="replace")
            for i in range(self.max_readers)
            if self._state[i].load() == _ALL
            and self._release[i].load() - self._entries[i][_KEEP] < need
        ]

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (safe to call twice). Frames still referenced keep the mapping alive."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        for w in self._words:
            w.close()
        self._words.clear()
        for e in self._entries:
            e.release()
        self._entries.clear()
        self._table = np.zeros(0, _ENTRY)
        self._payload.clear()
        self._views.clear()
        self._mv.release()
        try:
            mm.close()
        except BufferError:
            log.debug("ring %s: frames still referenced; unmapped when they are freed", self.name)
        os.close(self._fd)

    def unlink(self) -> None:
        """Remove the segment file (mappings stay valid until closed)."""
        with contextlib.suppress(FileNotFoundError):
            _path(self.name).unlink()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ring({self.name!r}, slots={self.slots}, payload_bytes={self.payload_bytes})"


class RingWriter:
    """The writing end of a ring (see :meth:`Ring.writer`)."""

    def __init__(self, ring: Ring, policy: WriterPolicy) -> None:
        self._ring = ring
        self.policy = policy
        self._next = ring._written.load()
        self._claimed: tuple[int, tuple[int, ...], str] | None = None
        # The last (shape, dtype) claimed, and what _check() made of it.
        self._asked: tuple[Any, Any] = ((), None)
        self._spec: tuple[tuple[int, ...], np.dtype[Any], str, tuple[Any, ...]] = (
            (),
            _U1,
            "u1",
            (),
        )
        # Under "block": the lowest release of the "all" readers at table generation _gen.
        self._gen = -1
        self._floor = 0

    def write(self, image: np.ndarray, meta: FrameMeta, timeout: float | None = None) -> int:
        """Copy ``image`` into the next slot and publish it with ``meta`` (its shape and
        dtype are taken from ``image``); returns the frame's sequence number."""
        view = self.claim(image.shape, image.dtype, timeout=timeout)
        np.copyto(view, image)
        return self.publish(meta)

    def claim(self, shape: tuple[int, ...], dtype: Any, timeout: float | None = None) -> np.ndarray:
        """A writable view of the next slot's payload to fill in place, then :meth:`publish`.

        Under "block" waits until every "all" reader released the frame it will
        overwrite (``TimeoutError`` after ``timeout`` s).
        """
        ring = self._ring
        if self._claimed is not None:
            raise RingError(f"ring {ring.name!r}: claim() again before publish()")
        if (shape, dtype) != self._asked:
            self._spec = self._check(shape, dtype)
            self._asked = (shape, dtype)
        shape, dt, code, key = self._spec
        seq = self._next
        slot = seq % ring.slots
        if self.policy == "block" and seq >= ring.slots:
            self._wait_for_space(seq - ring.slots + 1, timeout)
        ring._seq[slot].exchange(2 * seq + 1)  # odd: write in progress (acquire RMW)
        self._claimed = (seq, shape, code)
        cached = ring._views[slot]
        if cached is not None and cached[0] == key:
            return cached[1]
        return ring._view(slot, shape, dt, writable=True)

    def _check(
        self, shape: tuple[int, ...], dtype: Any
    ) -> tuple[tuple[int, ...], np.dtype[Any], str, tuple[Any, ...]]:
        """Validate a frame's shape and dtype: (shape, native dtype, its code as in
        FrameMeta.dtype, view cache key)."""
        ring = self._ring
        dt = np.dtype(dtype)
        if dt.kind not in "biufc":
            raise RingError(f"ring {ring.name!r}: frames are numeric arrays, not {dt}")
        dt = dt.newbyteorder("=")
        shape = tuple(int(s) for s in shape)
        if len(shape) > MAX_DIMS:
            raise RingError(
                f"ring {ring.name!r}: frames have at most {MAX_DIMS} dimensions, not shape {shape}"
            )
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes > ring.payload_bytes:
            raise RingError(
                f"ring {ring.name!r}: a frame of {nbytes} bytes ({shape} {dt}) "
                f"does not fit its payload_bytes = {ring.payload_bytes}; raise "
                "payload_bytes (pipeline.max_frame_bytes)"
            )
        code = dt.str[1:]
        return shape, dt, code, (True, code.encode().ljust(3, b"\0"), *shape)

    def publish(self, meta: FrameMeta) -> int:
        """Publish the claimed slot with ``meta`` (shape and dtype are the claim's)."""
        ring = self._ring
        if self._claimed is None:
            raise RingError(f"ring {ring.name!r}: publish() without claim()")
        seq, shape, code = self._claimed
        if meta.shape != shape or meta.dtype != code:
            meta = dataclasses.replace(meta, shape=shape, dtype=code)
        slot = seq % ring.slots
        meta.pack_into(ring._mm, ring._meta_at[slot])
        ring._seq[slot].store(2 * seq + 2)
        ring._written.store(seq + 1)
        self._claimed = None
        self._next = seq + 1
        ring._data.notify()
        return seq

    def close_stream(self) -> None:
        """Mark the end of the stream: readers get :class:`EndOfStream` after the last frame."""
        self._ring._closed.store(1)
        self._ring._data.notify()

    def _wait_for_space(self, need: int, timeout: float | None) -> None:
        """Wait until every "all" reader's ``release`` is at least ``need``."""
        ring = self._ring
        if self._floor >= need and ring._gen.load() == self._gen:
            return

        def ready() -> bool:
            self._gen = ring._gen.load()  # before the scan: a registration meanwhile rescans
            self._floor = ring._min_release()
            return self._floor >= need

        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if not ring._space.wait(ready, deadline):
                late = ", ".join(ring._laggards(need))
                raise TimeoutError(
                    f"ring {ring.name!r}: reader(s) {late} did not release "
                    f"frame {need - 1} within {timeout} s"
                )


class RingReader:
    """A named reading end (see :meth:`Ring.reader`). Counters live in shared memory."""

    def __init__(self, ring: Ring, index: int, name: str, mode: ReaderMode) -> None:
        self._ring = ring
        self._i = index
        self.name = name
        self.mode = mode
        self._all = mode == "all"
        self._entry = ring._entries[index]
        self._release = ring._release[index]
        self._rel = self._pos = self._release.load()  # released up to / next candidate
        self._held = -1  # the frame last returned, not yet released
        self._open = True

    @property
    def read_count(self) -> int:
        """Frames delivered (a frame delivered again after a restart counts once)."""
        return int(self._entry[_READ])

    @property
    def dropped(self) -> int:
        """Frames skipped: overwritten before this reader got them, or not the newest."""
        return int(self._entry[_DROPPED])

    def read(self, timeout: float | None = None) -> RingFrame | None:
        """The next frame ("all": in order; "newest": the latest not yet seen).

        Releases the frame returned before. ``None`` after ``timeout`` s without
        a frame; :class:`EndOfStream` once the stream is closed and consumed.
        """
        if not self._open:
            raise RingError(f"reader {self.name!r} of ring {self._ring.name!r} is closed")
        ring = self._ring
        self.release()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            written = ring._written.load()
            if self._pos < written:
                frame = ring._frame(self._pos if self._all else written - 1)
                if frame is not None:
                    return self._deliver(frame)
                if self._all:  # lapped (overwrite policy): on to the oldest frame left
                    self._skip_to(max(ring._written.load() - ring.slots, self._pos + 1))
                continue
            if ring._closed.load():
                if ring._written.load() > self._pos:
                    continue
                raise EndOfStream(
                    f"ring {ring.name!r}: stream closed after {ring._written.load()} frames"
                )
            if not ring._data.wait(self._more, deadline):
                return None

    def window(self, n: int, start: int = 0) -> list[RingFrame | None]:
        """The frames ``max(start, held - n + 1, 0)`` .. ``held`` (the one :meth:`read`
        returned last), oldest first, each ``None`` if it is no longer in the ring. A
        reader registered with ``keep >= n - 1`` under a ``block`` writer always has them;
        check each frame's :meth:`RingFrame.valid` after using it, as for :meth:`read`'s."""
        held = self._held
        if held < 0:
            raise RingError(f"reader {self.name!r}: window() before a frame was read")
        ring = self._ring
        return [ring._frame(seq) for seq in range(max(start, held - n + 1, 0), held + 1)]

    def _more(self) -> bool:
        """Something to do: a frame after ``_pos``, or the end of the stream."""
        return self._ring._written.load() > self._pos or self._ring._closed.load() != 0

    def _deliver(self, frame: RingFrame) -> RingFrame:
        seq, e = frame.seq, self._entry
        if seq > self._pos:  # "newest" jumped ahead
            self._skip_to(seq)
        if seq >= e[_DELIVERED]:
            e[_READ] += 1
            e[_DELIVERED] = seq + 1
        if frame.t_acquired_ns > 0:
            e[_AGE] = max(time.monotonic_ns() - frame.t_acquired_ns, 1)
        if self._rel < seq:
            self._rel = seq
            self._release.store(seq)
        self._held = seq
        self._pos = seq + 1
        return frame

    def _skip_to(self, seq: int) -> None:
        e = self._entry
        e[_DROPPED] += max(0, seq - max(self._pos, e[_DELIVERED]))
        self._pos = seq

    def _release_to(self, seq: int) -> None:
        self._rel = seq
        self._release.store(seq)
        if self._all:
            self._ring._space.notify()

    def release(self) -> None:
        """Release the frame last returned without unregistering: a successor taking over
        this entry by name (hot-swap) starts after it instead of receiving it again."""
        if self._held >= 0:
            self._release_to(self._held + 1)
            self._held = -1

    def close(self) -> None:
        """Release the held frame and unregister: a block writer no longer waits for it."""
        if not self._open:
            return
        self._open = False
        ring = self._ring
        with ring._table_lock():
            if self._held >= 0:
                self._release.store(self._held + 1)
            ring._state[self._i].store(_CLOSED)
            ring._gen.fetch_add(1)
        ring._space.notify()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingFrame:
    """A frame as read: ``seq``, ``image`` (a read-only view of the slot) and ``meta``."""

    __slots__ = ("_meta", "_raw", "_word", "image", "seq", "t_acquired_ns")

    def __init__(
        self, seq: int, image: np.ndarray, raw: bytes, t_acquired_ns: int, word: AtomicWord
    ) -> None:
        self.seq = seq
        self.image = image
        self.t_acquired_ns = t_acquired_ns
        self._raw = raw
        self._word = word
        self._meta: FrameMeta | None = None

    @property
    def meta(self) -> FrameMeta:
        """The frame's metadata (verified at read; unpacked on first use, then the same object)."""
        if self._meta is None:
            self._meta = FrameMeta.unpack_from(self._raw)
        return self._meta

    def valid(self) -> bool:
        """``True`` if the slot was not overwritten since the read: call it after using the
        view in place (an RMW re-check, ordered after those reads; see the module docstring)."""
        return self._word.fetch_add(0) == 2 * self.seq + 2

    def copy(self) -> tuple[np.ndarray, FrameMeta]:
        """The image copied out of the slot and its metadata; :class:`FrameOverwritten` if
        the slot was overwritten meanwhile."""
        image = self.image.copy()
        if not self.valid():
            raise FrameOverwritten(f"frame {self.seq} was overwritten while being copied")
        return image, self.meta


def remove_segments(owner_pid: int) -> list[str]:
    """Unlink every ring ``{owner_pid}-*``; returns the ring names removed."""
    removed = []
    for path in sorted(Path(SHM_DIR).glob(f"{PREFIX}{owner_pid}-*")):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("cannot remove %s (another user's)", path)
            continue
        removed.append(path.name[len(PREFIX) :])
    if removed:
        log.debug("removed rings of pid %d: %s", owner_pid, ", ".join(removed))
    return removed


def remove_stale_segments() -> list[str]:
    """Unlink the rings ``{pid}-*`` whose supervisor is gone; returns their names.

    Gone means its lifeline's lock is free (:mod:`daemon.lifeline`): the kernel
    releases it with the process, so neither a reused pid nor a live daemon in
    another pid namespace sharing ``/dev/shm`` is mistaken. Rings of an owner
    without a lifeline (not a supervisor's) are left alone.
    """
    removed = []
    for pid in sorted(
        {
            int(m.group(1))
            for p in Path(SHM_DIR).glob(f"{PREFIX}*")
            if (m := re.match(rf"{re.escape(PREFIX)}(\d+)-", p.name))
        }
    ):
        if owner_alive(pid) is False:
            removed += remove_segments(pid)
    return removed
