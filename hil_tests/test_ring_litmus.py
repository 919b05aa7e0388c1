"""Litmus-style stress of the ring's memory ordering, for ARM (Jetson): runs on aarch64,
skips elsewhere (``ECHOD_LITMUS=1`` runs it on any machine: x86-64 is TSO and shows
little, but it checks the harness).

The two shapes of reordering a weak memory model allows, and where the ring relies on
them not happening (docs/DESIGN.md, "Why each atomic's ordering is enough"):

- message passing (MP): data written, then a flag; another core sees the flag but old
  data. The ring publishes a frame this way (payload and header, then the slot's
  sequence word, then ``written``), and a ``block`` writer reuses a slot after its
  readers' ``release`` words say so. Checked on bare words (plain payload + atomic flag)
  and through real rings with checksummed frames, zero-copy and copied.
- store buffering (SB): each of two cores stores its flag, then loads the other's; both
  read the old value. The futex wake-up (daemon.wakeup.Futex) is this handshake: a lost
  wake-up is a reader asleep with a frame waiting. Checked on bare words and as a
  ping-pong through two rings, where a lost wake-up is a read that times out.

Every case runs in separate processes (spawn) over shared memory; ``ECHOD_LITMUS_N``
scales the iteration counts (default 1: about 90 s on the 2-core x86-64 CI machine with
``ECHOD_LITMUS=1``). What they can show is limited: at Python's speed a weak outcome is
rare even where the hardware allows it (plain numpy stores and loads on x86-64, which
allows SB, showed no (0, 0) in 20,000 rounds there). They catch a gross ordering bug on
real ARM cores; the argument in docs/DESIGN.md is what makes the orderings right.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import platform
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.frame import FrameMeta
from daemon.ring import PREFIX, SHM_DIR, EndOfStream, FrameOverwritten, Ring
from daemon.wakeup import AtomicWord

ARM = platform.machine().lower() in ("aarch64", "arm64")
pytestmark = [
    pytest.mark.skipif(
        not ARM and os.environ.get("ECHOD_LITMUS") != "1",
        reason=f"memory-ordering litmus tests are for aarch64 (this is {platform.machine()}); "
        "ECHOD_LITMUS=1 runs them anyway",
    ),
    pytest.mark.timeout(600),
]

SPAWN = mp.get_context("spawn")
SCALE = max(1, int(os.environ.get("ECHOD_LITMUS_N", "1")))
T = 30.0  # no wait in these tests should come near it
LINE = 64  # bytes between words that must not share a cache line


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Any]:
    """``make(nbytes)`` -> the path of a zeroed shared file in /dev/shm, removed afterwards."""
    paths: list[Path] = []

    def make(nbytes: int) -> str:
        path = Path(SHM_DIR) / f"{PREFIX}litmus-{os.getpid()}-{len(paths)}"
        path.write_bytes(bytes(nbytes))
        paths.append(path)
        return str(path)

    yield make
    for p in paths:
        p.unlink(missing_ok=True)


class Words:
    """Atomic words every ``LINE`` bytes, and a plain byte area after them, in a shared file."""

    def __init__(self, path: str, words: int) -> None:
        self._f = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self.mm = mmap.mmap(self._f.fileno(), 0)
        self.view = memoryview(self.mm)
        self.words = [AtomicWord(self.view[i * LINE : i * LINE + 8]) for i in range(words)]
        self.plain = np.frombuffer(self.mm, np.uint64, offset=words * LINE)

    def close(self) -> None:
        for w in self.words:
            w.close()
        del self.plain
        self.view.release()
        self.mm.close()
        self._f.close()


def _barrier(word: AtomicWord, parties: int, round_: int) -> None:
    """Spin until every party has arrived at ``round_`` (its counter reaches parties * round)."""
    word.fetch_add(1)
    while word.load() < parties * round_:
        pass


# -- store buffering on bare words ---------------------------------------------------------


def _sb_side(path: str, me: int, n: int) -> None:
    """Store my flag, load the other's; record what I read (0: its store was not seen)."""
    w = Words(path, 2 * n + 1)
    barrier = w.words[-1]
    for i in range(n):
        _barrier(barrier, 2, i + 1)
        mine, theirs = w.words[2 * i + me], w.words[2 * i + 1 - me]
        mine.store(1)
        w.plain[2 * i + me] = theirs.load()
    w.close()


def test_store_buffering_on_atomic_words(shared: Any) -> None:
    """SB: r0 == r1 == 0 is forbidden with sequentially consistent atomics (Futex needs it)."""
    n = 20_000 * SCALE
    path = shared((2 * n + 1) * LINE + 2 * n * 8)
    procs = [SPAWN.Process(target=_sb_side, args=(path, me, n)) for me in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(T * 10)
        assert p.exitcode == 0
    w = Words(path, 2 * n + 1)
    seen = w.plain[: 2 * n].reshape(n, 2).copy()
    w.close()
    outcomes = {
        o: int(np.sum((seen[:, 0] == o[0]) & (seen[:, 1] == o[1])))
        for o in [(0, 0), (0, 1), (1, 0), (1, 1)]
    }
    print(f"store buffering, {n} rounds: (r0, r1) -> count {outcomes}")
    assert outcomes[(0, 0)] == 0, outcomes


# -- message passing on bare words ---------------------------------------------------------


def _mp_writer(path: str, n: int) -> None:
    w = Words(path, n + 1)
    for i in range(n):
        w.plain[i] = zlib.crc32(i.to_bytes(8, "little"))  # plain store
        w.words[i].store(1)  # then the flag
    w.close()


def _mp_reader(path: str, n: int, out: Any) -> None:
    w = Words(path, n + 1)
    stale = 0
    for i in range(n):
        while not w.words[i].load():  # the flag, then the data
            pass
        stale += int(w.plain[i]) != zlib.crc32(i.to_bytes(8, "little"))
    w.close()
    out.put(stale)


def test_message_passing_on_atomic_words(shared: Any) -> None:
    """MP: a reader that sees the flag sees the data stored before it."""
    n = 50_000 * SCALE
    path = shared((n + 1) * LINE + n * 8)
    q = SPAWN.Queue()
    reader = SPAWN.Process(target=_mp_reader, args=(path, n, q))
    reader.start()
    writer = SPAWN.Process(target=_mp_writer, args=(path, n))
    writer.start()
    stale = q.get(timeout=T * 10)
    for p in (reader, writer):
        p.join(T)
        assert p.exitcode == 0
    assert stale == 0, f"{stale} of {n} reads saw the flag but stale data"


# -- message passing through rings: checksummed frames -----------------------------------


def _frames(k: int = 31) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(7)
    sizes = [(24, 32), (48, 40), (16, 16)]  # the shape changes too: header and payload
    images = [rng.integers(0, 256, sizes[i % 3], dtype=np.uint8) for i in range(k)]
    return images, [zlib.crc32(im.data) for im in images]


def _ring_reader(name: str, mode: str, ready: Any, out: Any) -> None:
    _, crcs = _frames()
    ring = Ring.attach(name)
    reader = ring.reader(mode, mode)  # type: ignore[arg-type]
    ready.set()
    got = torn = 0
    try:
        while (f := reader.read(timeout=T)) is not None:
            got += 1
            meta = f.meta
            if meta.index != f.seq or meta.checksum != crcs[f.seq % len(crcs)]:
                torn += 1  # a header accepted that is not this frame's
            elif mode == "all":  # zero-copy: checksum in place, then the RMW re-check
                crc = zlib.crc32(f.image.data)
                torn += f.valid() and crc != meta.checksum
            else:
                with contextlib.suppress(FrameOverwritten):  # detected: not accepted
                    torn += zlib.crc32(f.copy()[0].data) != meta.checksum
        got = -1  # timed out: a lost wake-up or a dead writer
    except EndOfStream:
        pass
    out.put((mode, got, torn))
    reader.close()
    ring.close()


@pytest.mark.parametrize("policy", ["overwrite", "block"])
def test_message_passing_through_the_ring(shared: Any, policy: str) -> None:
    """Frames published by the seqlock: no reader accepts a frame whose checksum fails."""
    n = 30_000 * SCALE
    images, crcs = _frames()
    name = f"{os.getpid()}-litmus-{policy}"
    ring = Ring.create(name, slots=3, payload_bytes=max(im.nbytes for im in images))
    try:
        q = SPAWN.Queue()
        procs = []
        for mode in ("all", "newest"):
            ready = SPAWN.Event()
            p = SPAWN.Process(target=_ring_reader, args=(name, mode, ready, q))
            p.start()
            assert ready.wait(T)
            procs.append(p)
        writer = ring.writer(policy)  # type: ignore[arg-type]
        for i in range(n):
            k = i % len(images)
            writer.write(images[k], FrameMeta(index=i, checksum=crcs[k]), timeout=T)
        writer.close_stream()
        results = {}
        for _ in procs:
            mode, got, torn = q.get(timeout=T)
            results[mode] = (got, torn)
        for p in procs:
            p.join(T)
        print(f"message passing ({policy}), {n} frames: mode -> (read, torn) {results}")
        assert all(got > 0 and torn == 0 for got, torn in results.values()), results
        if policy == "block":
            assert results["all"][0] == n, results
    finally:
        ring.close()
        ring.unlink()


# -- store buffering through rings: the futex wake-up ------------------------------------


def _pong(ping: str, pong: str, n: int, out: Any) -> None:
    a, b = Ring.attach(ping), Ring.attach(pong)
    reader, writer = a.reader("pong"), b.writer("block")
    lost = torn = 0
    for _ in range(n):
        f = reader.read(timeout=T)
        if f is None:
            lost += 1
            break
        image, meta = f.copy()
        torn += zlib.crc32(image.data) != meta.checksum
        writer.write(image, meta, timeout=T)
    out.put((lost, torn))
    reader.close()
    a.close()
    b.close()


def test_no_lost_wake_up_in_a_ping_pong(shared: Any) -> None:
    """Each hop sleeps on the futex while the other side publishes: a lost wake-up (SB)
    shows as a read that times out."""
    n = 5_000 * SCALE
    images, crcs = _frames()
    pid = os.getpid()
    size = max(im.nbytes for im in images)
    ping = Ring.create(f"{pid}-litmus-ping", slots=2, payload_bytes=size)
    pong = Ring.create(f"{pid}-litmus-pong", slots=2, payload_bytes=size)
    try:
        ping.reader("pong")  # registered before the first frame; the child resumes it
        back = pong.reader("ping")
        q = SPAWN.Queue()
        p = SPAWN.Process(target=_pong, args=(ping.name, pong.name, n, q))
        p.start()
        writer = ping.writer("overwrite")
        lost = torn = 0
        for i in range(n):
            k = i % len(images)
            writer.write(images[k], FrameMeta(index=i, checksum=crcs[k]), timeout=T)
            f = back.read(timeout=T)
            if f is None:
                lost += 1
                break
            image, meta = f.copy()
            torn += meta.index != i or zlib.crc32(image.data) != crcs[k]
        their_lost, their_torn = q.get(timeout=T)
        p.join(T)
        print(f"ping-pong, {n} round trips: lost wake-ups {lost + their_lost}")
        assert (lost, their_lost, torn, their_torn) == (0, 0, 0, 0)
    finally:
        for r in (ping, pong):
            r.close()
            r.unlink()
