"""Ring micro-benchmark: one hop across processes, and bulk throughput.

1. Hop latency: the writer stamps ``t_acquired_ns`` and writes a frame; a
   reader in another process, asleep on the ring's wake-up, reads it zero-copy
   and records ``now - stamp``. Frames are paced (500 Hz by default) so that the
   reader is asleep when each one comes, as in the live pipeline. Reported:
   p50/p99 of the hop until ``read()`` returns, the same including the first
   use of ``frame.meta`` (unpacked lazily), and the writer's own ``write()``.
2. Throughput: 4 MiB frames writer -> reader ("block" policy, the reader
   reads zero-copy and checks ``valid()``), against ``np.copyto`` of 4 MiB in
   the same run.

    python bench/ring_hop.py [--quick]

Prints a table and writes ``bench/results/ring_hop.json``. Targets (not
asserted): hop p50 <= 50 us, p99 <= 250 us; throughput >= 50 % of memcpy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from daemon.frame import FrameMeta
from daemon.ring import EndOfStream, Ring

HOP_SHAPES = {"256x256": (256, 256), "820x616": (616, 820)}
BIG = (2048, 2048)  # 4 MiB of uint8
TIMEOUT_S = 60.0


def _hop_reader(ring_name: str, ready: Any, out: Connection) -> None:
    """Read every frame; send back (hop to read() return, hop incl. meta) in ns."""
    ring = Ring.attach(ring_name)
    reader = ring.reader("bench")
    ready.set()
    read_ns, meta_ns = [], []
    try:
        while True:
            f = reader.read(timeout=TIMEOUT_S)
            t = time.monotonic_ns()
            if f is None:
                break
            stamp = f.meta.t_acquired_ns
            read_ns.append(t - stamp)
            meta_ns.append(time.monotonic_ns() - stamp)
    except EndOfStream:
        pass
    reader.close()
    ring.close()
    out.send((np.array(read_ns), np.array(meta_ns)))


def _throughput_reader(ring_name: str, ready: Any, out: Connection) -> None:
    """Read every frame zero-copy (touching it, checking it is valid); send back the end time."""
    ring = Ring.attach(ring_name)
    reader = ring.reader("bench")
    ready.set()
    frames = invalid = 0
    try:
        while (f := reader.read(timeout=TIMEOUT_S)) is not None:
            _ = int(f.image[0, 0]) + int(f.image[-1, -1])
            invalid += not f.valid()
            frames += 1
    except EndOfStream:
        pass
    t_end = time.perf_counter()
    reader.close()
    ring.close()
    out.send((frames, invalid, t_end))


def _start(ctx: Any, target: Any, ring: Ring) -> tuple[Any, Connection]:
    ready = ctx.Event()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(ring.name, ready, send), daemon=True)
    proc.start()
    if not ready.wait(TIMEOUT_S):
        raise RuntimeError("reader process did not start")
    return proc, recv


def _pct(a: np.ndarray) -> dict[str, float]:
    us = a / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "mean_us": float(us.mean())}


def hop(ctx: Any, shape: tuple[int, int], frames: int, rate_hz: float, warmup: int
        ) -> dict[str, Any]:
    """Paced frames to a sleeping reader in another process."""
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    ring = Ring.create(f"{os.getpid()}-hop", slots=8, payload_bytes=img.nbytes)
    try:
        proc, recv = _start(ctx, _hop_reader, ring)
        writer = ring.writer("block")
        period = 1.0 / rate_hz
        write_ns = []
        nxt = time.perf_counter()
        for i in range(frames + warmup):
            nxt += period
            while (left := nxt - time.perf_counter()) > 0:
                time.sleep(left)  # pacing: the reader sleeps between frames
            t0 = time.monotonic_ns()
            writer.write(img, FrameMeta(index=i, t_acquired_ns=t0), timeout=TIMEOUT_S)
            write_ns.append(time.monotonic_ns() - t0)
        writer.close_stream()
        if not recv.poll(TIMEOUT_S):
            raise RuntimeError("hop reader did not report")
        read_ns, meta_ns = recv.recv()
        proc.join(TIMEOUT_S)
    finally:
        ring.close()
        ring.unlink()
    if len(read_ns) != frames + warmup:
        raise RuntimeError(f"reader got {len(read_ns)} of {frames + warmup} frames")
    return {"frames": frames, "rate_hz": rate_hz, "bytes": img.nbytes,
            "hop": _pct(read_ns[warmup:]), "hop_with_meta": _pct(meta_ns[warmup:]),
            "write": _pct(np.array(write_ns[warmup:]))}


def throughput(ctx: Any, frames: int) -> dict[str, Any]:
    """4 MiB frames as fast as the ring takes them ("block"), against np.copyto."""
    img = np.random.default_rng(1).integers(0, 255, BIG, dtype=np.uint8)
    dst = np.empty_like(img)
    np.copyto(dst, img)
    t0 = time.perf_counter()
    for _ in range(frames):
        np.copyto(dst, img)
    memcpy_s = time.perf_counter() - t0
    ring = Ring.create(f"{os.getpid()}-tput", slots=8, payload_bytes=img.nbytes)
    try:
        proc, recv = _start(ctx, _throughput_reader, ring)
        writer = ring.writer("block")
        meta = FrameMeta()
        t0 = time.perf_counter()
        for i in range(frames):
            meta.index = i
            writer.write(img, meta, timeout=TIMEOUT_S)
        writer.close_stream()
        if not recv.poll(TIMEOUT_S):
            raise RuntimeError("throughput reader did not report")
        got, invalid, t_end = recv.recv()
        proc.join(TIMEOUT_S)
    finally:
        ring.close()
        ring.unlink()
    ring_s = t_end - t0
    gib = frames * img.nbytes / 2**30
    return {"frames": frames, "bytes": img.nbytes, "received": got, "invalid": invalid,
            "ring_gib_s": gib / ring_s, "memcpy_gib_s": gib / memcpy_s,
            "fraction_of_memcpy": memcpy_s / ring_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    ap.add_argument("--rate", type=float, default=500.0, help="paced frame rate (Hz)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    n_hop, n_big, warmup = (200, 50, 10) if args.quick else (1000, 300, 50)
    results: dict[str, Any] = {"quick": args.quick, "hop": {}}
    print(f"{'case':<28}{'p50 us':>10}{'p99 us':>10}{'max us':>10}")
    for label, shape in HOP_SHAPES.items():
        r = hop(ctx, shape, n_hop, args.rate, warmup)
        results["hop"][label] = r
        for key in ("hop", "hop_with_meta", "write"):
            p = r[key]
            print(f"{label + ' ' + key:<28}{p['p50_us']:>10.1f}{p['p99_us']:>10.1f}"
                  f"{p['max_us']:>10.1f}")
    t = throughput(ctx, n_big)
    results["throughput"] = t
    print(f"\n4 MiB frames: ring {t['ring_gib_s']:.2f} GiB/s, np.copyto {t['memcpy_gib_s']:.2f} "
          f"GiB/s: {100 * t['fraction_of_memcpy']:.0f} % of memcpy "
          f"({t['received']}/{t['frames']} frames, {t['invalid']} invalid)")
    write_result("ring_hop", results)


if __name__ == "__main__":
    main()
