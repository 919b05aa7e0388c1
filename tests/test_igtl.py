"""OpenIGTLink: the source against real servers on loopback, and the label map sent back.

Servers are pyigtl's own (built in the main thread: its constructor installs
signal handlers, restored at once) or a plain socket server sending raw bytes
for the broken messages. Ports are free ones (bind to 0). Nothing sleeps to
synchronise: the source is polled with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pyigtl
import pytest
from pyigtl.messages import CRC64

from daemon import config, results
from daemon.acquire import IgtlSettings, IgtlSource, open_source
from daemon.acquire.igtl import HEADER_SIZE, StatusMessage, parse_uri
from daemon.config import Config
from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta
from daemon.igtl_out import IgtlOutStage
from daemon.ring import Ring
from daemon.stage import InputPort, StageContext, StageSpec
from daemon.supervisor import Supervisor

pytestmark = pytest.mark.timeout(120)

T = 20.0  # limit for waits that should end long before it
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.4}
SHAPE = (96, 128)
MATRIX = np.array(
    [[0.0, -0.3, 0.0, 12.5], [0.2, 0.0, 0.0, -40.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 1.0]]
)  # 0.2 mm columns, 0.3 mm rows, rotated 90 degrees, with an origin


@contextmanager
def igtl_server(port: int = 0) -> Iterator[Any]:
    """pyigtl's server on 127.0.0.1 (its signal handlers undone), stopped afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    server = pyigtl.OpenIGTLinkServer(port=port, local_server=True)
    for s, handler in saved.items():
        signal.signal(s, handler)
    try:
        yield server
    finally:
        server.stop()


def port_of(server: Any) -> int:
    return int(server.server_address[1])


def image(i: int, shape: tuple[int, ...] = SHAPE, dtype: Any = np.uint8) -> np.ndarray:
    """Frame ``i``: distinct content per frame."""
    n = int(np.prod(shape))
    values = (np.arange(n, dtype=np.int64) * 7 + i * 13) % 251
    return values.astype(dtype).reshape(shape)


def image_message(i: int, t: float, device: str = "Image", pixels: np.ndarray | None = None) -> Any:
    """An IMAGE message of frame ``i`` (or ``pixels``) with MATRIX, stamped ``t``."""
    pixels = image(i) if pixels is None else pixels
    return pyigtl.ImageMessage(
        pixels[np.newaxis], ijk_to_world_matrix=MATRIX, timestamp=t, device_name=device
    )


def collect(source: IgtlSource, n: int, timeout: float = T) -> list[Frame]:
    """Poll until ``n`` frames came (or fail at the deadline)."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < n:
        assert time.monotonic() < deadline, f"{len(frames)} of {n} frames; {source.stats()}"
        frame = source.poll(0.05)
        if frame is not None:
            frames.append(frame)
    return frames


def poll_until(source: IgtlSource, cond: Callable[[], bool], timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not reached; {source.stats()}"
        assert source.poll(0.02) is None, "no frame expected meanwhile"


def sender(server: Any, messages: list[Any], fps: float | None = None) -> threading.Thread:
    """Send ``messages`` in a thread, ``fps`` apart (each waits until it left the queue)."""

    def run() -> None:
        start = time.monotonic()
        for k, m in enumerate(messages):
            if fps:
                delay = start + k / fps - time.monotonic()
                if delay > 0:
                    threading.Event().wait(delay)  # pacing the stream, not synchronising
            server.send_message(m, wait=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def source() -> Iterator[Callable[..., IgtlSource]]:
    made: list[IgtlSource] = []

    def make(port: int, device: str = "Image", **settings: Any) -> IgtlSource:
        s = IgtlSource("127.0.0.1", port, device, IgtlSettings(**{**FAST, **settings}))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- a stream from pyigtl's server ----------------------------------------------------------


def test_30_fps_stream_arrives_whole_with_timestamps_and_geometry(
    source: Callable[..., IgtlSource],
) -> None:
    n, t0 = 45, 1_700_000_000.0
    with igtl_server() as server:
        src = source(port_of(server), pose_device="ProbeToTracker")
        poll_until(src, lambda: src.state == "connected")
        pose = np.array([[1.0, 0, 0, 5.0], [0, 0, -1.0, 6.0], [0, 1.0, 0, 7.0], [0, 0, 0, 1]])
        messages: list[Any] = []
        for i in range(n):
            t = t0 + i / 30
            if i == 20:  # the probe is tracked from frame 20 on (a version 2 message)
                m = pyigtl.TransformMessage(pose, timestamp=t, device_name="ProbeToTracker")
                m.header_version, m.metadata = 2, {"TransformStatus": "OK"}
                messages.append(m)
            messages.append(image_message(i, t))
            if i % 10 == 5:
                messages.append(image_message(i + 1000, t, device="OtherImage"))
                messages.append(pyigtl.StringMessage(f"frame {i}", device_name="Notes"))
            if i == 30:
                messages.append(
                    StatusMessage(code=2, error_name="FROZEN", status="freeze", device_name="US")
                )
        sender(server, messages, fps=30)
        frames = collect(src, n)
        # nothing more of this device is pending: the other device's images were not frames
        assert src.poll(0.2) is None

    assert [f.meta.index for f in frames] == list(range(n))
    for i, f in enumerate(frames):
        assert np.array_equal(f.image, image(i)), f"pixels of frame {i}"
        assert f.image.flags.c_contiguous and f.image.dtype == np.uint8
        assert f.meta.t_source == pytest.approx(t0 + i / 30, abs=1e-6)
        assert f.meta.t_acquired_ns > 0
        assert f.meta.spacing == pytest.approx((0.2, 0.3, 1.0), rel=1e-6)
        expected = MATRIX if i < 20 else pose @ MATRIX
        np.testing.assert_allclose(f.meta.transform, expected, atol=1e-4)
    c = src.counters
    assert (c.frames, c.transforms, c.strings, c.statuses, c.ignored) == (n, 1, 4, 1, 4)
    assert c.errors == 0 and c.reconnects == 0
    assert src.last_status is not None and src.last_status.status == "freeze"
    assert src.stats()["last_status"] == {"code": 2, "name": "FROZEN", "text": "freeze"}


@pytest.mark.parametrize(
    ("dtype", "shape", "max_shape", "version"),
    [
        ("uint16", SHAPE, SHAPE, 1),
        ("float32", SHAPE, SHAPE, 2),
        ("uint8", (*SHAPE, 3), (*SHAPE, 3), 2),
        ("uint8", (50, 60), SHAPE, 1),  # smaller than the largest accepted
    ],
)
def test_pixel_types_channels_and_header_version_2(
    source: Callable[..., IgtlSource],
    dtype: str,
    shape: tuple[int, ...],
    max_shape: tuple[int, ...],
    version: int,
) -> None:
    with igtl_server() as server:
        src = source(port_of(server), max_shape=max_shape, dtype=dtype)
        sent = []
        for i in range(3):
            m = image_message(i, 100.0 + i, pixels=image(i, shape, dtype))
            m.header_version = version
            m.metadata = {"Probe": "L14-5", "Depth": f"{40 + i} mm"} if version == 2 else {}
            sent.append(m)
        sender(server, sent)
        frames = collect(src, 3)
    for i, f in enumerate(frames):
        assert f.image.dtype == np.dtype(dtype) and f.image.dtype.isnative
        assert np.array_equal(f.image, image(i, shape, dtype))
        assert f.meta.shape == shape
    assert src.counters.errors == 0


def test_big_endian_pixels_are_made_native(source: Callable[..., IgtlSource]) -> None:
    pixels = image(3, SHAPE, np.uint16)
    packed = raw(image_message(3, 5.0, pixels=pixels))
    body = packed[HEADER_SIZE:]
    big = body[:4] + b"\x01" + body[5:72] + pixels.byteswap().tobytes()  # endianness 1: big
    server = RawServer([(with_body(packed, big), "wait")])
    src = source(server.port, dtype="uint16")
    (frame,) = collect(src, 1)
    src.close()
    server.close()
    assert frame.image.dtype.isnative and np.array_equal(frame.image, pixels)


def test_server_killed_and_restarted_the_source_reconnects(
    source: Callable[..., IgtlSource],
) -> None:
    with igtl_server() as first:
        port = port_of(first)
        src = source(port)
        sender(first, [image_message(i, 10.0 + i) for i in range(5)])
        before = collect(src, 5)
    # the server is gone: the source notices and keeps retrying, backing off
    poll_until(src, lambda: src.counters.disconnects == 1 and src.counters.connect_failures >= 2)
    assert src.state in ("waiting", "connecting")
    with igtl_server(port) as second:
        sender(second, [image_message(i, 10.0 + i) for i in range(5, 12)])
        after = collect(src, 7)
    frames = before + after
    assert [f.meta.index for f in frames] == list(range(12))
    assert [f.meta.t_source for f in frames] == pytest.approx([10.0 + i for i in range(12)])
    assert all(np.array_equal(f.image, image(i)) for i, f in enumerate(frames))
    stats = src.stats()
    assert stats["reconnects"] == 1 and stats["errors"] == 0


def test_frames_blocks_until_close_from_another_thread(source: Callable[..., IgtlSource]) -> None:
    with igtl_server() as server:
        src = source(port_of(server))
        got: queue.Queue[Frame | None] = queue.Queue()

        def consume() -> None:
            for f in src.frames():
                got.put(f)
            got.put(None)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        sender(server, [image_message(0, 1.0)])
        first = got.get(timeout=T)
        assert first is not None and first.meta.index == 0
        src.close()
        assert got.get(timeout=T) is None, "frames() ends after close()"
        thread.join(T)
        assert src.state == "closed"


# -- broken messages from a raw socket server ----------------------------------------------


def raw(message: Any) -> bytes:
    return bytes(message.pack())


def with_body(message: bytes, body: bytes) -> bytes:
    """``message``'s header, its body size set to ``body``'s, followed by ``body``."""
    return message[:42] + struct.pack(">Q", len(body)) + message[50:HEADER_SIZE] + body


class RawServer:
    """Serves one script per connection, in order: bytes to send, then how to end it.

    ``"close"``: close at once; ``"wait"``: wait until the client closes (it lost the framing).
    """

    def __init__(self, scripts: list[tuple[bytes, str]]) -> None:
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.settimeout(T)
        self.port = self._listen.getsockname()[1]
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(scripts,), daemon=True)
        self._thread.start()

    def _run(self, scripts: list[tuple[bytes, str]]) -> None:
        try:
            for data, end in scripts:
                conn, _ = self._listen.accept()
                with conn:
                    conn.settimeout(T)
                    conn.sendall(data)
                    # a client that drops the connection with bytes unread resets it
                    with contextlib.suppress(ConnectionResetError):
                        while end == "wait" and conn.recv(1 << 16):
                            pass
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def close(self) -> None:
        self._thread.join(T)
        self._listen.close()


def test_malformed_truncated_stalled_oversized_and_rejected_messages(
    source: Callable[..., IgtlSource],
) -> None:
    ok = [raw(image_message(i, 50.0 + i)) for i in range(6)]
    bad_body = with_body(ok[0], ok[0][HEADER_SIZE:-100])  # the header is fine, the image short
    garbage = bytes(range(7, 7 + HEADER_SIZE))  # no OpenIGTLink header: framing lost
    big = raw(image_message(0, 1.0, pixels=image(0, (200, 200))))  # over max_message_bytes
    too_wide = raw(image_message(0, 1.0, pixels=image(0, (8, 500))))  # fits the cap, not max_shape
    volume = raw(pyigtl.ImageMessage(np.zeros((2, 4, 4), np.uint8), device_name="Image"))
    unknown = with_body(raw(pyigtl.StringMessage("x", device_name="Image")), b"")
    unknown = unknown[:2] + b"SENSOR".ljust(12, b"\0") + unknown[14:]  # a type not handled
    scripts = [
        (ok[0] + bad_body + ok[1] + garbage, "wait"),
        (ok[2] + ok[3][: HEADER_SIZE + 100], "close"),  # cut short: the server went away
        (ok[3][: HEADER_SIZE - 10], "wait"),  # stalls mid-header
        (big + too_wide + volume + unknown + ok[4] + ok[5], "wait"),
    ]
    server = RawServer(scripts)
    src = source(server.port, max_shape=SHAPE, max_message_bytes=30_000, stall_timeout_s=0.3)
    frames = collect(src, 5)
    src.close()
    server.close()
    assert not server.errors
    assert [f.meta.t_source for f in frames] == [50.0, 51.0, 52.0, 54.0, 55.0]
    assert all(
        np.array_equal(f.image, image(i)) for i, f in zip((0, 1, 2, 4, 5), frames, strict=True)
    )
    c = src.counters
    assert (c.malformed, c.truncated, c.oversized, c.rejected, c.ignored) == (2, 2, 1, 2, 1)
    assert c.reconnects == 3 and c.errors == 7


def test_crc_checked_when_asked(source: Callable[..., IgtlSource]) -> None:
    good = raw(image_message(0, 1.0))
    flipped = bytearray(raw(image_message(1, 2.0)))
    flipped[-1] ^= 0xFF  # one pixel changed after the CRC was computed
    server = RawServer([(bytes(flipped) + good, "wait")])
    src = source(server.port, check_crc=True)
    (frame,) = collect(src, 1)
    src.close()
    server.close()
    assert frame.meta.t_source == 1.0 and src.counters.crc == 1


# -- hostile IMAGE messages: the frame rule at the source ------------------------------------


def framed(message: bytes, body: bytes, size: int | None = None) -> bytes:
    """``message``'s header (type, device, timestamp) with ``body``, its size (or ``size``)
    and its CRC-64: what a sender that means it would send."""
    head = struct.pack(">QQ", len(body) if size is None else size, CRC64(body))
    return message[:42] + head + body


def hostile_image(
    t: float,
    *,
    size: tuple[int, int, int] | None = None,
    components: int | None = None,
    scalar: int | None = None,
    matrix: tuple[float, ...] | None = None,
    pixels: bytes | None = None,
) -> bytes:
    """An IMAGE (correct header and CRC) whose body says what the arguments say: size
    (i, j, k), components, scalar type, the 12 floats of its matrix, the pixel bytes."""
    message = raw(image_message(0, t))
    body = bytearray(message[HEADER_SIZE : HEADER_SIZE + 72])
    if components is not None:
        body[2] = components
    if scalar is not None:
        body[3] = scalar
    if size is not None:
        struct.pack_into(">HHH", body, 6, *size)
        struct.pack_into(">HHH", body, 66, *size)  # the subvolume: all of it
    if matrix is not None:
        struct.pack_into(">12f", body, 12, *matrix)
    rest = message[HEADER_SIZE + 72 :] if pixels is None else pixels
    return framed(message, bytes(body) + rest)


def hostile_stream(t0: float = 100.0) -> tuple[list[tuple[bytes, str]], dict[str, int], int]:
    """Connection scripts for :class:`RawServer`: every kind of broken message, each with
    valid frames before and after; the counters they must add up to; the valid frames."""
    n_pixels = SHAPE[0] * SHAPE[1]
    flat, h, w = b"\x00" * n_pixels, SHAPE[0], SHAPE[1]
    nan = (float("nan"),) * 12
    kept = [  # the framing survives: (message, counter)
        (hostile_image(0, size=(w, 0, 1), pixels=b""), "malformed"),  # 0 rows
        (hostile_image(0, size=(0, h, 1), pixels=b""), "malformed"),  # 0 columns
        (hostile_image(0, size=(w, h, 0), pixels=b""), "malformed"),  # 0 slices
        (hostile_image(0, components=0, pixels=b""), "malformed"),
        (hostile_image(0, components=2, pixels=flat * 2), "malformed"),
        (hostile_image(0, components=5, pixels=flat * 5), "malformed"),
        (hostile_image(0, scalar=99), "malformed"),  # no such scalar type
        (hostile_image(0, scalar=11, pixels=flat * 8), "rejected"),  # float64: not the dtype
        (hostile_image(0, size=(65535, 65535, 1)), "malformed"),  # pixels for 96x128 only
        (hostile_image(0, size=(8, 500, 1), pixels=b"\x01" * 4000), "rejected"),  # > max_shape
        (hostile_image(0, pixels=flat[:-100]), "malformed"),  # fewer pixels than it says
        (hostile_image(0, matrix=nan), "malformed"),
        (hostile_image(0, matrix=(0.0,) * 12), "malformed"),  # zero spacing
        (raw(image_message(0, 1.0, pixels=image(0, (400, 400)))), "oversized"),
    ]
    v2 = image_message(0, 1.0)
    v2.header_version, v2.metadata = 2, {"Depth": "40 mm"}
    v2_bytes = bytearray(raw(v2))
    struct.pack_into(">I", v2_bytes, HEADER_SIZE + 4, 1 << 30)  # metadata "larger" than the body
    kept.append((framed(bytes(v2_bytes), bytes(v2_bytes[HEADER_SIZE:])), "malformed"))
    flipped = bytearray(raw(image_message(0, 1.0)))
    flipped[-1] ^= 0xFF  # one pixel changed after the CRC was computed
    kept.append((bytes(flipped), "crc"))

    valid: list[bytes] = []

    def ok() -> bytes:
        valid.append(raw(image_message(len(valid), t0 + len(valid))))
        return valid[-1]

    first = ok() + b"".join(m + ok() for m, _ in kept)
    expected = {"malformed": 0, "rejected": 0, "oversized": 0, "crc": 0, "truncated": 0}
    for _, counter in kept:
        expected[counter] += 1
    good = raw(image_message(0, 1.0))
    scripts = [
        (first, "close"),
        # framing lost: counted, the connection dropped and made again
        (ok() + bytes(range(7, 7 + HEADER_SIZE)), "wait"),  # not an OpenIGTLink header
        # says 200 bytes more than it has: eats the start of the next message (its CRC
        # cannot match), whose middle is then no header
        (ok() + framed(good, good[HEADER_SIZE:], len(good) - HEADER_SIZE + 200) + good, "wait"),
        # says 100 bytes (CRC right for them): no room for its pixels, and the rest of
        # them is no header (2 malformed)
        (
            ok() + framed(good, good[HEADER_SIZE : HEADER_SIZE + 100]) + good[HEADER_SIZE + 100 :],
            "wait",
        ),
        (ok() + framed(good, b"", 2**64 - 1), "close"),  # endless: discarded until cut off
        (ok() + ok(), "wait"),
    ]
    expected["malformed"] += 4
    expected["crc"] += 1
    expected["oversized"] += 1
    expected["truncated"] += 1
    return scripts, expected, len(valid)


def test_hostile_images_are_counted_and_the_stream_goes_on(
    source: Callable[..., IgtlSource],
) -> None:
    scripts, expected, n = hostile_stream()
    server = RawServer(scripts)
    src = source(
        server.port, max_shape=SHAPE, max_message_bytes=120_000, check_crc=True, stall_timeout_s=5
    )
    frames = collect(src, n)
    src.close()
    server.close()
    assert not server.errors
    assert [f.meta.t_source for f in frames] == [100.0 + i for i in range(n)]
    assert all(np.array_equal(f.image, image(i)) for i, f in enumerate(frames))
    c = src.counters
    got = {k: getattr(c, k) for k in expected}
    assert got == expected and c.reconnects == len(scripts) - 1


def test_echod_survives_a_hostile_scanner_and_counts_each_message(run_echod: Any) -> None:
    """The real daemon (processes, rings, ONNX Runtime) behind a sender of broken IMAGE
    messages: every valid frame goes through, every broken one is counted, nothing dies."""
    scripts, expected, n = hostile_stream()
    server = RawServer(scripts)
    igtl = (
        "{reconnect_min_s = 0.05, reconnect_max_s = 0.4, max_shape = [96, 128], "
        "max_message_bytes = 120000, check_crc = true, stall_timeout_s = 5.0}"
    )
    echod = run_echod(
        "run",
        "--source",
        f"igtl://127.0.0.1:{server.port}/Image",
        "--mode",
        "all",
        "--frames",
        str(n),
        "--headless",
        "--json",
        "--set",
        f"source.igtl={igtl}",
        "--set",
        "model.warmup=1",
        "--set",
        "control.enabled=false",
    )
    code, out = echod.finish(120)
    server.close()
    assert code == 0, "".join(echod.stderr)[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["frames_in"], summary["frames_out"], summary["dropped"]) == (n, n, {})
    assert summary["restarts"] == {}
    stats = summary["source_stats"]
    assert {k: stats[k] for k in expected} == expected
    assert stats["reconnects"] == len(scripts) - 1


# -- addresses and settings -----------------------------------------------------------------


def test_uri_and_settings() -> None:
    assert parse_uri("igtl://scanner.local:18944/Image_Reference") == (
        "scanner.local",
        18944,
        "Image_Reference",
    )
    assert parse_uri("igtl://10.0.0.2") == ("10.0.0.2", 18944, "")
    assert parse_uri("igtl://[::1]:5000/US%20image") == ("::1", 5000, "US image")
    for bad in ("igtl://", "igtl://host:99999", "igtl://host/" + "x" * 21, "igtl://h/a/b"):
        with pytest.raises(SourceError, match="igtl://"):
            parse_uri(bad)
    settings = IgtlSettings(max_shape=(616, 820, 3), dtype="uint16")
    src = open_source("igtl://127.0.0.1:1/Image", igtl=settings)  # does not connect yet
    assert isinstance(src, IgtlSource) and src.state == "waiting"
    assert (src.max_shape, src.dtype, src.nominal_fps) == ((616, 820, 3), np.uint16, None)
    assert "127.0.0.1:1/Image" in src.description
    src.close()
    for bad_shape in ((10,), (10, 10, 5), (0, 10)):
        with pytest.raises(pydantic.ValidationError):
            IgtlSettings(max_shape=bad_shape)
    with pytest.raises(pydantic.ValidationError, match="reconnect_min_s"):
        IgtlSettings(reconnect_min_s=10.0, reconnect_max_s=1.0)


def test_no_server_backs_off_exponentially(
    source: Callable[..., IgtlSource], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # a port nobody listens on once closed
    caplog.set_level(logging.DEBUG, "daemon.acquire.igtl")
    src = source(port, reconnect_min_s=0.01, reconnect_max_s=0.08)
    poll_until(src, lambda: src.counters.connect_failures >= 6)
    delays = [float(m) for m in re.findall(r"retrying in (\S+) s", caplog.text)]
    assert delays[:6] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    assert src.counters.connects == 0 and src.state == "waiting"


# -- the label map sent back ----------------------------------------------------------------


@contextmanager
def out_stage(shape: tuple[int, int] = SHAPE) -> Iterator[tuple[IgtlOutStage, Any]]:
    """An IgtlOutStage (on a free port) reading a fresh results ring, and the ring's writer."""
    name = f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}-results"
    ring = Ring.create(name, slots=4, payload_bytes=results.capacity(shape))
    spec = StageSpec("igtl_out", "igtl_out", inputs={"results": InputPort(name, "newest")})
    config = Config.model_validate({"igtl_out": {"enabled": True, "port": 0}})
    ctx = StageContext(spec, queue.Queue(), threading.Event())
    stage = IgtlOutStage(spec, config, ctx)
    stage.setup()
    try:
        yield stage, ring.writer()
    finally:
        stage.teardown()
        ctx.close(finished=True)
        ring.close()
        ring.unlink()


def labels_record(labels: np.ndarray) -> np.ndarray:
    """A result record holding one label map (what an infer stage writes)."""
    return results.pack([results.Output("segmentation", "segmentation", labels)])


def step_until(stage: IgtlOutStage, cond: Callable[[], bool], timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        stage.step()


def test_segmentation_is_received_by_a_pyigtl_client_with_the_frame_geometry() -> None:
    with out_stage() as (stage, ring):
        client = pyigtl.OpenIGTLinkClient("127.0.0.1", stage.server.port)
        try:
            step_until(stage, lambda: stage.server.clients == 1)
            got: list[Any] = []
            for i in range(3):
                labels = (image(i) % 3).astype(np.uint8)
                meta = FrameMeta(
                    index=i,
                    t_source=1_700_000_000.25 + i,
                    spacing=(0.3, 0.2, 1.0),
                    transform=MATRIX.copy(),
                )
                ring.write(labels_record(labels), meta)

                def received(i: int = i) -> bool:
                    got.extend(client.get_latest_messages())
                    return len(got) > i

                step_until(stage, received)
                m = got[i]
                assert (m.device_name, m.message_type) == ("Segmentation", "IMAGE")
                assert np.array_equal(m.image[0], labels)
                np.testing.assert_allclose(m.ijk_to_world_matrix, MATRIX, atol=1e-4)
                assert m.timestamp == pytest.approx(meta.t_source, abs=1e-6)
        finally:
            client.stop()
        step_until(stage, lambda: stage.server.clients == 0)  # the client left
        assert stage.summary() == {
            "sent": 3,
            "dropped": 0,
            "clients": 1,
            "torn": 0,
            "malformed": 0,
            "descriptions": {},
        }


def test_output_skips_frames_for_a_client_that_is_behind() -> None:
    big, n = (616, 820), 30  # 15 MB unread: more than the socket buffers hold
    with out_stage(big) as (stage, ring):
        client = socket.create_connection(("127.0.0.1", stage.server.port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            step_until(stage, lambda: stage.server.clients == 1)
            for i in range(n):  # never read by the client
                ring.write(
                    labels_record(image(i, big)), FrameMeta(index=i, transform=MATRIX.copy())
                )
                read = i + 1
                step_until(stage, lambda: stage.readers["results"].read_count >= read)  # noqa: B023
            s = stage.server
            assert s.dropped > 0
            assert s.sent + s.dropped + s.busy == n
        finally:
            client.close()


# -- the whole daemon following a scanner ------------------------------------------------


def test_echod_follows_a_scanner_records_it_and_counts(tmp_path: Path) -> None:
    """`--source igtl://HOST:PORT/DEVICE` through the real pipeline (processes, rings,
    ONNX Runtime), every frame kept (mode all) and recorded; the recording replays."""
    n = 30
    recording = tmp_path / "session.igs.mha"
    with igtl_server() as server:
        cfg = config.load(
            None,
            {
                "source.uri": f"igtl://127.0.0.1:{port_of(server)}/Image",
                "source.igtl": {**FAST, "max_shape": list(SHAPE)},
                "source.frames": n,
                "pipeline.mode": "all",
                "model.warmup": 1,
                "sink.headless": True,
                "control.enabled": False,
                "record.enabled": True,
                "record.path": str(recording),
            },
        )
        sup = Supervisor(cfg)
        result: list[dict[str, Any]] = []
        runner = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
        runner.start()
        deadline = time.monotonic() + 90
        while not (sup.state == "running" and server.is_connected()):
            assert runner.is_alive() and time.monotonic() < deadline, "echod did not connect"
            time.sleep(0.05)
        sender(server, [image_message(i, 1000.0 + i / 30) for i in range(n)], fps=30).join(T)
        runner.join(90)
    assert result, "the run did not end after its frames"
    s = result[0]
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (n, n, {})
    stats = s["source_stats"]
    assert (stats["state"], stats["errors"], stats["reconnects"]) == ("connected", 0, 0)
    replay = list(open_source(str(recording)).frames())
    assert len(replay) == n
    for i, frame in enumerate(replay):
        np.testing.assert_array_equal(frame.image, image(i))
        assert frame.meta.t_source == pytest.approx(1000.0 + i / 30, abs=1e-6)
