"""The shared-memory ring (daemon.ring) and its wake-ups (daemon.wakeup).

Cross-process behaviour runs in real processes (multiprocessing, spawn). Nothing
sleeps to synchronise: events, queues and waits with deadlines.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from daemon import wakeup
from daemon.errors import RingError
from daemon.frame import N_TIMINGS, FrameMeta
from daemon.lifeline import Lifeline
from daemon.ring import (
    PREFIX,
    SHM_DIR,
    EndOfStream,
    FrameOverwritten,
    Ring,
    remove_segments,
    remove_stale_segments,
)
from daemon.stage import SPIN_AUTO_CORES, spin_seconds
from daemon.wakeup import AtomicWord, Futex, futex_wait

pytestmark = pytest.mark.timeout(120)

SPAWN = mp.get_context("spawn")
T = 30.0  # limit for waits that should end long before it
_counter = itertools.count()


def _wait_for(cond: Callable[[], bool], timeout: float = T) -> None:
    """Poll ``cond`` until true (a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def _segments(prefix: str) -> list[Path]:
    return sorted(Path(SHM_DIR).glob(f"{PREFIX}{prefix}*"))


@pytest.fixture
def make_ring() -> Iterator[Callable[..., Ring]]:
    """Rings named ``{pid}-t{n}`` (unique); closed and removed after the test."""
    rings: list[Ring] = []
    names: list[str] = []

    def make(**kw: Any) -> Ring:
        name = f"{os.getpid()}-t{next(_counter)}"
        names.append(name)
        ring = Ring.create(name, **{"slots": 8, "payload_bytes": 4096, **kw})
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()
    for name in names:
        for path in _segments(name):
            path.unlink(missing_ok=True)


def _meta(**kw: Any) -> FrameMeta:
    """A FrameMeta with every field away from its default."""
    m = FrameMeta(
        index=7,
        t_acquired_ns=time.monotonic_ns(),
        t_source=12.5,
        spacing=(0.1, 0.2, 0.3),
        transform=np.arange(16.0).reshape(4, 4),
        timings_ms=np.arange(N_TIMINGS, dtype=np.float32) + 0.5,
        checksum=2**63 + 5,
    )
    for k, v in kw.items():
        setattr(m, k, v)
    return m


# -- one process ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((16, 24), "u1"),
        ((16, 24, 3), "u1"),
        ((9, 7), "u2"),
        ((5, 6, 2), "u2"),
        ((12, 10), "f4"),
        ((4, 4, 4), "f4"),
    ],
)
def test_round_trip_image_and_every_meta_field(
    make_ring: Callable[..., Ring], shape: tuple[int, ...], dtype: str
) -> None:
    ring = make_ring()
    reader = ring.reader("r")
    image = (np.random.default_rng(0).random(shape) * 1000).astype(dtype)
    sent = _meta(shape=(1,), dtype="f8")  # shape and dtype come from the image
    assert ring.writer().write(image, sent) == 0
    f = reader.read(timeout=T)
    assert f is not None and f.seq == 0
    assert f.image.dtype == np.dtype(dtype) and f.image.shape == shape
    np.testing.assert_array_equal(f.image, image)
    assert not f.image.flags.writeable
    got = f.meta
    assert got.shape == shape and got.dtype == dtype
    for field in ("index", "t_acquired_ns", "t_source", "spacing", "checksum"):
        assert getattr(got, field) == getattr(sent, field), field
    np.testing.assert_array_equal(got.transform, sent.transform)
    np.testing.assert_array_equal(got.timings_ms, sent.timings_ms)
    assert f.meta is got  # unpacked once
    copied, meta2 = f.copy()
    np.testing.assert_array_equal(copied, image)
    assert meta2.index == 7 and f.valid()


def test_write_converts_layout_and_byte_order(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    reader = ring.reader("r")
    big_endian = np.arange(12, dtype=">f4").reshape(3, 4)
    ring.writer().write(big_endian.T, FrameMeta())  # neither contiguous nor native order
    f = reader.read(timeout=T)
    assert f is not None and f.image.dtype == np.dtype("f4") and f.meta.dtype == "f4"
    np.testing.assert_array_equal(f.image, big_endian.T)


def test_oversized_frame_names_both_sizes_and_the_setting(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(payload_bytes=1000)
    with pytest.raises(RingError, match=r"1024 bytes.*payload_bytes = 1000"):
        ring.writer().write(np.zeros((32, 32), np.uint8), FrameMeta())
    with pytest.raises(RingError, match="at most 3 dimensions"):
        ring.writer().claim((1, 1, 1, 1), np.uint8)
    with pytest.raises(RingError, match="numeric"):
        ring.writer().claim((2,), object)


def test_claim_publish_is_zero_copy(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    reader = ring.reader("r")
    writer = ring.writer()
    view = writer.claim((8, 8), np.uint16)
    with pytest.raises(RingError, match="before publish"):
        writer.claim((8, 8), np.uint16)
    view[:] = 513
    assert writer.publish(FrameMeta(index=3)) == 0
    with pytest.raises(RingError, match="without claim"):
        writer.publish(FrameMeta())
    f = reader.read(timeout=T)
    assert f is not None and f.meta.shape == (8, 8) and f.meta.dtype == "u2"
    assert (f.image == 513).all()


def test_read_times_out_with_none(make_ring: Callable[..., Ring]) -> None:
    reader = make_ring().reader("r")
    t0 = time.monotonic()
    assert reader.read(timeout=0.05) is None
    assert 0.05 <= time.monotonic() - t0 < 5
    assert reader.read(timeout=0) is None


def test_end_of_stream_after_the_last_frame(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    reader = ring.reader("r")
    writer = ring.writer()
    for i in range(2):
        writer.write(np.full(4, i, np.uint8), FrameMeta())
    writer.close_stream()
    assert [reader.read(timeout=T).seq for _ in range(2)] == [0, 1]  # type: ignore[union-attr]
    for _ in range(2):
        with pytest.raises(EndOfStream):
            reader.read(timeout=T)
    assert ring.stats()["closed"] is True


def test_close_stream_wakes_a_sleeping_reader(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    reader = ring.reader("r")
    outcome: list[str] = []

    def run() -> None:
        try:
            reader.read(timeout=T)
            outcome.append("frame")
        except EndOfStream:
            outcome.append("eos")

    t = threading.Thread(target=run)
    t.start()
    _wait_for(lambda: ring._data._waiters.load() == 1)  # asleep in the futex
    ring.writer().close_stream()
    t.join(T)
    assert outcome == ["eos"]


def test_threads_of_one_process_block_policy(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=2)
    reader = ring.reader("r")
    n = 300
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            writer = ring.writer("block")
            for i in range(n):
                writer.write(np.full(16, i % 251, np.uint8), FrameMeta(index=i), timeout=T)
            writer.close_stream()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=produce)
    t.start()
    seqs = []
    with pytest.raises(EndOfStream):
        while (f := reader.read(timeout=T)) is not None:
            assert (f.image == f.seq % 251).all() and f.meta.index == f.seq
            seqs.append(f.seq)
    t.join(T)
    assert not errors
    assert seqs == list(range(n)) and reader.dropped == 0 and reader.read_count == n


def test_overwrite_counts_drops_for_a_lapped_reader(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=4)
    every = ring.reader("all")
    newest = ring.reader("newest", "newest")
    writer = ring.writer()
    for i in range(10):
        writer.write(np.full(4, i, np.uint8), FrameMeta(index=i, t_acquired_ns=time.monotonic_ns()))
    f = every.read(timeout=T)
    assert f is not None and f.seq == 6 and every.dropped == 6  # frames 6..9 are left
    f = newest.read(timeout=T)
    assert f is not None and f.seq == 9 and newest.dropped == 9
    assert newest.read(timeout=0) is None
    writer.write(np.zeros(4, np.uint8), FrameMeta())
    assert [every.read(timeout=T).seq for _ in range(4)] == [7, 8, 9, 10]  # type: ignore[union-attr]
    stats = ring.stats()
    assert stats["written"] == 11 and stats["closed"] is False
    assert stats["readers"]["all"] == {
        "mode": "all",
        "read": 5,
        "dropped": 6,
        "lag": 1,
        "active": True,
        "last_age_ms": stats["readers"]["all"]["last_age_ms"],
    }
    assert stats["readers"]["newest"]["mode"] == "newest"
    assert stats["readers"]["newest"]["last_age_ms"] >= 0


def test_frame_view_detects_overwrite(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=2)
    reader = ring.reader("r", "newest")
    writer = ring.writer()
    writer.write(np.zeros(4, np.uint8), FrameMeta())
    f = reader.read(timeout=T)
    assert f is not None and f.valid()
    for _ in range(2):
        writer.write(np.ones(4, np.uint8), FrameMeta())
    assert not f.valid()
    with pytest.raises(FrameOverwritten):
        f.copy()


def test_closed_reader_stops_blocking_the_writer(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=4)
    reader = ring.reader("slow")
    ring.reader("fast", "newest")  # "newest" readers never hold the writer back
    writer = ring.writer("block")
    for _ in range(4):
        writer.write(np.zeros(4, np.uint8), FrameMeta(), timeout=0)
    with pytest.raises(TimeoutError, match="slow"):
        writer.write(np.zeros(4, np.uint8), FrameMeta(), timeout=0.05)
    reader.close()
    reader.close()  # twice is fine
    assert writer.write(np.zeros(4, np.uint8), FrameMeta(), timeout=T) == 4
    assert ring.stats()["readers"]["slow"]["active"] is False
    with pytest.raises(RingError, match="closed"):
        reader.read(timeout=0)


def test_reader_table_full_and_closed_entries_reused(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(max_readers=2)
    a = ring.reader("a")
    ring.reader("b")
    with pytest.raises(RingError, match="max_readers"):
        ring.reader("c")
    a.close()
    ring.reader("c")
    assert sorted(ring.stats()["readers"]) == ["b", "c"]
    with pytest.raises(RingError, match="bytes"):
        ring.reader("x" * 33)


def test_closed_reader_resumes_and_counts_what_it_missed(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=4)
    reader = ring.reader("r")
    writer = ring.writer("block")
    writer.write(np.zeros(4, np.uint8), FrameMeta())
    assert reader.read(timeout=T).seq == 0  # type: ignore[union-attr]
    reader.close()
    for _ in range(9):
        writer.write(np.zeros(4, np.uint8), FrameMeta(), timeout=0)  # nobody to wait for
    again = ring.reader("r")
    f = again.read(timeout=T)
    assert f is not None and f.seq == 7  # the oldest frame surely left (10 - 4 + 1)
    assert again.read_count == 2 and again.dropped == 6


def test_create_and_attach_errors(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    with pytest.raises(RingError, match="already exists"):
        Ring.create(ring.name, slots=2, payload_bytes=8)
    with pytest.raises(RingError, match="does not exist"):
        Ring.attach(f"{os.getpid()}-no-such-ring")
    with pytest.raises(RingError, match="ring name"):
        Ring.create("../etc", slots=2, payload_bytes=8)
    junk = Path(SHM_DIR) / f"{PREFIX}{ring.name}-junk"
    junk.write_bytes(b"x" * 4096)
    try:
        with pytest.raises(RingError, match="not an echod ring"):
            Ring.attach(f"{ring.name}-junk")
    finally:
        junk.unlink()


def test_attach_refuses_another_layout_version(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    path = Path(SHM_DIR) / f"{PREFIX}{ring.name}"
    with path.open("r+b") as fh:
        fh.seek(8)  # the version word, after the magic number
        fh.write((99).to_bytes(4, "little"))
    with pytest.raises(RingError, match="layout version 99"):
        Ring.attach(ring.name)


def test_attached_ring_shares_state_and_close_is_safe(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    other = Ring.attach(ring.name)
    assert (other.slots, other.payload_bytes) == (ring.slots, ring.payload_bytes)
    reader = other.reader("r")
    ring.writer().write(np.arange(6, dtype=np.uint8), FrameMeta())
    f = reader.read(timeout=T)
    assert f is not None
    other.close()
    other.close()
    np.testing.assert_array_equal(f.image, np.arange(6))  # the mapping outlives close()
    with pytest.raises(RingError, match="closed"):
        reader.read(timeout=0)
    with pytest.raises(RingError, match="closed"):
        other.stats()


def test_remove_segments_of_an_owner(make_ring: Callable[..., Ring]) -> None:
    pid = os.getpid()
    for suffix in ("rm-a", "rm-b"):
        Ring.create(f"{pid}-{suffix}", slots=2, payload_bytes=8).close()
    removed = remove_segments(pid)
    assert {f"{pid}-rm-a", f"{pid}-rm-b"} <= set(removed)
    assert not _segments(f"{pid}-rm-")


# -- across processes ------------------------------------------------------------------


def _child_create_ring(out: Any) -> None:
    stop = Lifeline.create()  # a supervisor's lifeline, dropped by the kernel at exit
    Ring.create(f"{os.getpid()}-stale", slots=2, payload_bytes=8).close()
    out.put(os.getpid())
    del stop


def test_remove_stale_segments_of_dead_owners(make_ring: Callable[..., Ring]) -> None:
    live = make_ring()
    q = SPAWN.Queue()
    p = SPAWN.Process(target=_child_create_ring, args=(q,))
    p.start()
    pid = q.get(timeout=T)
    p.join(T)
    assert p.exitcode == 0 and _segments(f"{pid}-stale")
    removed = remove_stale_segments()
    assert f"{pid}-stale" in removed and f"{pid}-supervisor" in removed
    assert not _segments(f"{pid}-stale")
    assert _segments(live.name)  # ours: alive


def _child_hold_lifeline(ghost: int, out: Any) -> None:
    stop = Lifeline.create(ghost)
    Ring.create(f"{ghost}-live", slots=2, payload_bytes=8).close()
    out.put(True)
    stop.wait()  # until killed


def test_stale_cleanup_trusts_the_lock_not_the_pid(make_ring: Callable[..., Ring]) -> None:
    """A pid that is not alive here (another pid namespace sharing /dev/shm, or a number
    that was reused) keeps its rings while its lifeline is locked; once the holder is
    killed they go. Without a lifeline nothing proves the owner gone: they stay."""
    ghost = _unused_pid()
    orphan = _unused_pid(ghost + 1)
    Ring.create(f"{orphan}-nolifeline", slots=2, payload_bytes=8).close()
    q = SPAWN.Queue()
    p = SPAWN.Process(target=_child_hold_lifeline, args=(ghost, q))
    p.start()
    try:
        assert q.get(timeout=T)
        removed = remove_stale_segments()
        assert f"{ghost}-live" not in removed and _segments(f"{ghost}-live")
        assert _segments(f"{orphan}-nolifeline")
        p.kill()
        p.join(T)
        assert f"{ghost}-live" in remove_stale_segments()
    finally:
        p.kill()
        remove_segments(ghost)
        remove_segments(orphan)


def _unused_pid(start: int = 4_000_000) -> int:
    pid = start
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def _child_read_and_crash(name: str, count: int, out: Any) -> None:
    ring = Ring.attach(name)
    reader = ring.reader("stage")
    out.send([reader.read(timeout=T).seq for _ in range(count)])  # type: ignore[union-attr]
    os._exit(0)  # a crash: no close(), the last frame is still held


def test_restarted_reader_resumes_its_cursor(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=4)
    ring.reader("stage")  # registered before the writer starts, as the supervisor does
    writer = ring.writer("block")
    for i in range(4):
        writer.write(np.full(4, i, np.uint8), FrameMeta(index=i), timeout=T)
    recv, send = SPAWN.Pipe(duplex=False)
    p = SPAWN.Process(target=_child_read_and_crash, args=(ring.name, 3, send))
    p.start()
    assert recv.poll(T) and recv.recv() == [0, 1, 2]
    p.join(T)
    # Frame 2 was in flight: the writer may reuse only the slots of 0 and 1.
    for i in range(4, 6):
        writer.write(np.full(4, i, np.uint8), FrameMeta(index=i), timeout=T)
    with pytest.raises(TimeoutError, match="stage"):
        writer.write(np.zeros(4, np.uint8), FrameMeta(), timeout=0.05)
    restarted = ring.reader("stage")
    f = restarted.read(timeout=T)
    assert f is not None and f.seq == 2 and f.meta.index == 2  # delivered again
    assert restarted.read_count == 3 and restarted.dropped == 0  # ... but counted once
    assert [restarted.read(timeout=T).seq for _ in range(3)] == [3, 4, 5]  # type: ignore[union-attr]


K_PATTERNS = 61


def _patterns() -> tuple[np.ndarray, list[int]]:
    images = np.random.default_rng(42).integers(0, 256, (K_PATTERNS, 32, 32), dtype=np.uint8)
    return images, [zlib.crc32(im.data) for im in images]


def _stress_reader(name: str, mode: str, ready: Any, out: Any) -> None:
    """Read to the end of the stream, verifying every frame; report the counts."""
    try:
        _, crcs = _patterns()
        ring = Ring.attach(name)
        reader = ring.reader(mode, mode)  # type: ignore[arg-type]
        ready.set()
        got = torn = overwritten = disorder = 0
        last = -1
        gaps = 0
        try:
            while (f := reader.read(timeout=T)) is not None:
                got += 1
                if f.seq <= last:
                    disorder += 1
                gaps += f.seq != last + 1
                last = f.seq
                meta = f.meta  # verified when read, whatever happens to the slot later
                if meta.index != f.seq or meta.checksum != crcs[f.seq % K_PATTERNS]:
                    torn += 1
                    continue
                if mode == "all":  # zero-copy: verify in place, then check the view held
                    crc = zlib.crc32(f.image.data)
                    if not f.valid():
                        overwritten += 1
                        continue
                else:
                    try:
                        crc = zlib.crc32(f.copy()[0].data)
                    except FrameOverwritten:
                        overwritten += 1
                        continue
                torn += crc != meta.checksum
            raise AssertionError("read timed out")
        except EndOfStream:
            pass
        out.put(
            {
                "mode": mode,
                "got": got,
                "torn": torn,
                "overwritten": overwritten,
                "disorder": disorder,
                "gaps": gaps,
                "last": last,
                "read": reader.read_count,
                "dropped": reader.dropped,
            }
        )
        reader.close()
        ring.close()
    except BaseException as e:
        out.put({"mode": mode, "error": repr(e)})


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["overwrite", "block"])
def test_stress_across_processes(make_ring: Callable[..., Ring], policy: str) -> None:
    """100,000 frames, a writer and two reader processes: no torn frame, exact counts."""
    n = 100_000
    images, crcs = _patterns()
    ring = make_ring(slots=8, payload_bytes=images[0].nbytes)
    q = SPAWN.Queue()
    procs = []
    for mode in ("all", "newest"):
        ready = SPAWN.Event()
        p = SPAWN.Process(target=_stress_reader, args=(ring.name, mode, ready, q), daemon=True)
        p.start()
        procs.append(p)
        assert ready.wait(T), "reader did not start"
    writer = ring.writer(policy)  # type: ignore[arg-type]
    meta = FrameMeta(shape=(32, 32), dtype="u1")
    for i in range(n):
        k = i % K_PATTERNS
        meta.index, meta.checksum = i, crcs[k]
        writer.write(images[k], meta, timeout=T)
    writer.close_stream()
    results = {r["mode"]: r for r in (q.get(timeout=T) for _ in procs)}
    for p in procs:
        p.join(T)
    for r in results.values():
        assert "error" not in r, r
        assert r["torn"] == 0 and r["disorder"] == 0, r
        assert r["read"] == r["got"] and r["read"] + r["dropped"] == n, r
        assert r["last"] == n - 1, r
    every = results["all"]
    if policy == "block":
        assert every["got"] == n and every["dropped"] == 0 and every["gaps"] == 0, every
        assert every["overwritten"] == 0, every
    stats = ring.stats()
    assert stats["written"] == n
    assert {m: (s["read"], s["dropped"]) for m, s in stats["readers"].items()} == {
        m: (r["read"], r["dropped"]) for m, r in results.items()
    }


# -- wake-up primitives ----------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_atomic_word_operations(fast: bool) -> None:
    buf = bytearray(16)
    mv = memoryview(buf)
    w64 = AtomicWord(mv[0:8], fast=fast)
    w32 = AtomicWord(mv[8:12], fast=fast)
    w64.store(2**40 + 1)
    assert w64.load() == 2**40 + 1
    assert w64.fetch_add(1) == 2**40 + 1 and w64.load() == 2**40 + 2
    assert w64.exchange(5) == 2**40 + 2 and w64.load() == 5
    assert w32.fetch_add(-1) == 0 and w32.load() == 2**32 - 1  # negative deltas wrap
    assert int.from_bytes(buf[0:8], "little") == 5
    w64.close()
    w64.close()
    with pytest.raises(RingError, match="closed"):
        w64.load()
    w32.close()
    mv.release()


def test_futex_wait_returns_on_timeout_or_changed_word() -> None:
    buf = bytearray(8)
    mv = memoryview(buf)
    word = AtomicWord(mv[0:4])
    t0 = time.monotonic()
    futex_wait(word.address, 0, 0.02)  # the word is 0: sleeps until the timeout
    assert time.monotonic() - t0 >= 0.015
    t0 = time.monotonic()
    futex_wait(word.address, 1, T)  # the word is not 1: returns at once
    assert time.monotonic() - t0 < 1
    word.close()
    mv.release()


@pytest.fixture
def futex() -> Iterator[tuple[Futex, AtomicWord]]:
    """A Futex over words of a private buffer, and its count of sleepers; no polling
    left set for the tests after."""
    buf = bytearray(8)
    mv = memoryview(buf)
    word, waiters = AtomicWord(mv[0:4]), AtomicWord(mv[4:8])
    yield Futex(word, waiters), waiters
    wakeup.set_spin(0.0)
    word.close()
    waiters.close()
    mv.release()


def test_a_polling_waiter_sees_the_condition_without_sleeping(
    futex: tuple[Futex, AtomicWord],
) -> None:
    fx, waiters = futex
    wakeup.set_spin(5.0)
    flag, sleepers_seen = threading.Event(), []

    def later() -> None:
        time.sleep(0.02)
        sleepers_seen.append(waiters.load())  # the waiter polls: nobody sleeps
        flag.set()
        fx.notify()  # no system call: nobody to wake

    t = threading.Thread(target=later)
    t.start()
    assert fx.wait(flag.is_set, time.monotonic() + T) and flag.is_set()
    t.join()
    assert sleepers_seen == [0]


def test_polling_keeps_the_deadline_and_then_sleeps(futex: tuple[Futex, AtomicWord]) -> None:
    fx, waiters = futex
    wakeup.set_spin(5.0)
    t0 = time.monotonic()
    assert not fx.wait(lambda: False, t0 + 0.05)  # polls until the deadline, not 5 s
    assert 0.04 < time.monotonic() - t0 < 2.0
    wakeup.set_spin(0.01)  # polls 10 ms, then sleeps as a counted waiter until notified
    flag, sleepers_seen = threading.Event(), []

    def later() -> None:
        time.sleep(0.3)
        sleepers_seen.append(waiters.load())
        flag.set()
        fx.notify()

    t = threading.Thread(target=later)
    t.start()
    while not flag.is_set():
        assert fx.wait(flag.is_set, time.monotonic() + T)
    t.join()
    assert sleepers_seen == [1] and waiters.load() == 0


def test_spin_auto_polls_only_where_cores_are_plenty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(2)))
    assert spin_seconds("auto") == 0.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(SPIN_AUTO_CORES)))
    assert spin_seconds("auto") == pytest.approx(0.001)
    assert spin_seconds(0) == 0.0 and spin_seconds(250) == pytest.approx(250e-6)


# -- sequence windows (issue 17) ------------------------------------------------------


def test_a_keeping_reader_holds_a_block_writer_off_its_window(
    make_ring: Callable[..., Ring],
) -> None:
    ring = make_ring(slots=6)
    reader = ring.reader("seq", "all", keep=3)
    writer = ring.writer("block")
    for i in range(6):
        writer.write(np.full(16, i, np.uint8), FrameMeta(index=i), timeout=T)
    windows = []
    for _ in range(4):
        reader.read(timeout=T)
        windows.append([f.seq for f in reader.window(4) if f is not None])
    # holding frame 3, the reader keeps 0..3: frame 6 would take frame 0's slot
    with pytest.raises(TimeoutError, match="seq"):
        writer.write(np.full(16, 6, np.uint8), FrameMeta(index=6), timeout=0.05)
    window = reader.window(4)
    assert [f.seq for f in window if f] == [0, 1, 2, 3] and all(f and f.valid() for f in window)
    assert [int(f.image[0]) for f in window if f] == [0, 1, 2, 3]
    reader.read(timeout=T)  # frame 4: frame 0 leaves the window
    writer.write(np.full(16, 6, np.uint8), FrameMeta(index=6), timeout=T)
    with pytest.raises(TimeoutError, match="seq"):
        writer.write(np.full(16, 7, np.uint8), FrameMeta(index=7), timeout=0.05)
    assert [f.seq for f in reader.window(4, start=3) if f] == [3, 4]
    assert ring.stats()["readers"]["seq"]["lag"] == 7 - 4


def test_a_newest_window_reads_frames_it_skipped_and_sees_them_overwritten(
    make_ring: Callable[..., Ring],
) -> None:
    ring = make_ring(slots=6)
    reader = ring.reader("seq", "newest", keep=3)
    writer = ring.writer("overwrite")
    for i in range(10):
        writer.write(np.full(16, i, np.uint8), FrameMeta(index=i))
    f = reader.read(timeout=T)
    assert f is not None and f.seq == 9
    window = reader.window(4)
    assert [int(w.image[0]) for w in window if w] == [6, 7, 8, 9]
    writer.write(np.full(16, 10, np.uint8), FrameMeta(index=10))  # frame 10 takes 4's slot
    writer.write(np.full(16, 11, np.uint8), FrameMeta(index=11))  # and 11 takes frame 5's
    assert all(w is not None and w.valid() for w in window)
    writer.write(np.full(16, 12, np.uint8), FrameMeta(index=12))  # 12 takes frame 6's
    assert not window[0].valid()  # type: ignore[union-attr]
    assert reader.window(4)[0] is None  # frame 6 is gone: a torn window


def test_keep_needs_a_larger_ring(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slots=4)
    with pytest.raises(RingError, match="more than 4 slots"):
        ring.reader("seq", "all", keep=3)
    reader = ring.reader("seq", "all", keep=2)
    with pytest.raises(RingError, match="before a frame was read"):
        reader.window(3)
