"""OpenIGTLink hop latency on loopback: echod's receiver against pyigtl's client.

A sender process serves IMAGE messages (uint8, pre-packed with pyigtl) at a
fixed rate, stamping each header with ``time.time()`` just before ``sendall``.
Measured, as ``time.time()`` minus that stamp:

- ``source``: :class:`daemon.acquire.IgtlSource` ``poll()`` returned the frame
  (in this process);
- ``ring``: the same frames written to a shared-memory ring (as the acquire
  stage does, "overwrite" policy) and read by another process ("all" reader,
  asleep on the ring's wake-up): sender -> frame in the ring, readable downstream;
- ``pyigtl``: pyigtl's ``OpenIGTLinkClient`` + ``wait_for_message`` (its
  thread reads with 10 ms timeouts, the wait polls with 10 ms sleeps; it keeps
  only the latest message per device, so it may also lose frames: counted).

For 256x256 and 820x616 at 30 and 100 fps. The first frames of each run are
left out (connection, first allocations).

    python bench/igtl_hop.py [--quick]

Prints a table and writes ``bench/results/igtl_hop.json``. Target (not
asserted): ``ring`` p50 <= 2 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pyigtl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from daemon.acquire import IgtlSettings, IgtlSource
from daemon.ring import EndOfStream, Ring

SHAPES = {"256x256": (256, 256), "820x616": (616, 820)}
RATES = (30.0, 100.0)
WARMUP = 5
TIMEOUT_S = 30.0
_STAMP_AT = 34  # the header's timestamp: u32 seconds, u32 fraction of 2**32


def _sender(jobs: Connection) -> None:
    """Per job (shape, fps, frames): listen on a fresh port, send it, serve one client."""
    while (job := jobs.recv()) is not None:
        shape, fps, frames = job
        pixels = np.random.default_rng(0).integers(0, 255, (1, *shape), dtype=np.uint8)
        matrix = np.diag([0.2, 0.2, 1.0, 1.0])
        message = pyigtl.ImageMessage(pixels, ijk_to_world_matrix=matrix, device_name="Image")
        packed = bytearray(message.pack())
        with socket.create_server(("127.0.0.1", 0)) as listen:
            listen.settimeout(TIMEOUT_S)
            jobs.send(listen.getsockname()[1])
            conn, _ = listen.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = time.monotonic()
            for k in range(frames):
                delay = start + k / fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing, as a scanner
                t = time.time()
                struct.pack_into(">II", packed, _STAMP_AT, int(t), int((t % 1.0) * 2**32))
                conn.sendall(packed)
            jobs.send("sent")
            conn.recv(1)  # until the receiver closes


def _ring_reader(name: str, counts: Connection) -> None:
    """Per run: read the frames announced, send back sender -> read latencies (ms)."""
    ring = Ring.attach(name)
    reader = ring.reader("bench", "all")
    counts.send("ready")
    try:
        while (n := counts.recv()) is not None:
            lat: list[float] = []
            while len(lat) < n:
                f = reader.read(timeout=5.0)
                if f is None:
                    break
                lat.append((time.time() - f.meta.t_source) * 1e3)
            counts.send((lat, reader.dropped))
    except EndOfStream:
        pass
    reader.close()
    ring.close()


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.array(ms[WARMUP:])
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
    }


def run_echod(
    jobs: Connection, ring_counts: Connection, ring: Ring, shape: Any, fps: float, frames: int
) -> dict[str, Any]:
    ring_counts.send(frames)
    jobs.send((shape, fps, frames))
    port = jobs.recv()
    source = IgtlSource("127.0.0.1", port, "Image", IgtlSettings(max_shape=SHAPES["820x616"]))
    writer = ring.writer("overwrite")
    lat: list[float] = []
    deadline = time.monotonic() + frames / fps + TIMEOUT_S
    while len(lat) < frames and time.monotonic() < deadline:
        f = source.poll(0.1)
        if f is None:
            continue
        lat.append((time.time() - f.meta.t_source) * 1e3)
        writer.write(f.image, f.meta)
    source.close()
    assert jobs.recv() == "sent"
    ring_lat, dropped = ring_counts.recv()
    return {
        "source": _pct(lat),
        "ring": {**_pct(ring_lat), "dropped": dropped},
        "errors": source.counters.errors,
    }


def run_pyigtl(jobs: Connection, shape: Any, fps: float, frames: int) -> dict[str, Any]:
    jobs.send((shape, fps, frames))
    port = jobs.recv()
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", port)
    lat: list[float] = []
    sent = False
    try:
        while len(lat) < frames:
            m = client.wait_for_message("Image", timeout=0.5)
            if m is not None:
                lat.append((time.time() - m.timestamp) * 1e3)
            elif sent:
                break  # the rest was lost (it keeps only the latest message)
            sent = sent or jobs.poll()
    finally:
        client.stop()
    assert jobs.recv() == "sent"
    return {"pyigtl": {**_pct(lat), "lost": frames - len(lat)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer frames per run")
    args = p.parse_args()
    seconds = 2.0 if args.quick else 6.0
    ctx = mp.get_context("spawn")
    jobs, sender_end = ctx.Pipe()
    sender = ctx.Process(target=_sender, args=(sender_end,), daemon=True)
    sender.start()
    ring = Ring.create(f"{os.getpid()}-igtl-hop", slots=8, payload_bytes=616 * 820)
    counts, reader_end = ctx.Pipe()
    reader = ctx.Process(target=_ring_reader, args=(ring.name, reader_end), daemon=True)
    reader.start()
    assert counts.poll(TIMEOUT_S) and counts.recv() == "ready"
    results: dict[str, Any] = {}
    try:
        for name, shape in SHAPES.items():
            for fps in RATES:
                frames = int(seconds * fps) + WARMUP
                key = f"{name}@{fps:g}fps"
                results[key] = {
                    **run_echod(jobs, counts, ring, shape, fps, frames),
                    **run_pyigtl(jobs, shape, fps, frames),
                }
                r = results[key]
                print(
                    f"{key:>16}  source p50 {r['source']['p50_ms']:6.3f} p99 "
                    f"{r['source']['p99_ms']:6.3f} | ring p50 {r['ring']['p50_ms']:6.3f} p99 "
                    f"{r['ring']['p99_ms']:6.3f} | pyigtl p50 {r['pyigtl']['p50_ms']:6.3f} p99 "
                    f"{r['pyigtl']['p99_ms']:6.3f} (lost {r['pyigtl']['lost']}) ms",
                    flush=True,
                )
    finally:
        jobs.send(None)
        counts.send(None)
        sender.join(TIMEOUT_S)
        reader.join(TIMEOUT_S)
        ring.close()
        ring.unlink()
    write_result(
        "igtl_hop",
        {"quick": args.quick, "load_avg_1min": os.getloadavg()[0], "runs": results},
    )


if __name__ == "__main__":
    main()
