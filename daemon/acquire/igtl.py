"""OpenIGTLink source: IMAGE messages from a scanner or a PLUS server, as frames.

``igtl://HOST:PORT[/DEVICE]`` (port 18944 when left out; DEVICE: follow only the
IMAGE messages of that device name).

Receiver. pyigtl's client runs a thread that reads its socket with 10 ms
timeouts, keeps the latest message per device in a dict (so it loses frames
when two arrive within one poll), and ``wait_for_message`` polls that dict
with 10 ms sleeps. This module keeps pyigtl's message classes (header
parsing, the IMAGE/TRANSFORM/STRING contents, the version 2 extended header
and metadata) and replaces the transport: blocking reads on the caller's
thread with a timeout (so stop requests are seen), the body received straight
into the buffer the frame's pixels are a view of (no copy after the kernel's),
and messages handled in arrival order (a TRANSFORM sent before an IMAGE
applies to it). Measured on loopback (``bench/igtl_hop.py``; this 2-core
machine, shared, load ~3), sender's timestamp to:

=====================  =================  =================  ==================
256x256 / 820x616      frame out of poll  frame in the ring  pyigtl's client
=====================  =================  =================  ==================
30 fps, p50            0.43 / 0.58 ms     0.63 / 0.81 ms     5.3 / 5.7 ms
30 fps, p99            2.9 / 3.4 ms       5.3 / 4.7 ms       10.3 / 11.3 ms
100 fps, p50           0.39 / 0.53 ms     0.56 / 0.76 ms     4.5 / 5.2 ms
100 fps, p99           5.7 / 3.9 ms       5.9 / 5.5 ms       10.2 / 10.5 ms
=====================  =================  =================  ==================

("in the ring": read by another process, as the next stage does; pyigtl
lost 20 and 26 of 605 frames at 100 fps.) The receiver's own CPU time, the
kernel's copy included, is 0.09 ms a frame for 256x256 and 0.22 ms for
820x616; the rest is the sender's copy into the socket and wake-ups.

pyigtl's version 2 unpacking is correct, but parses metadata only from
``bytes``; the metadata part is given to it as bytes and the content as a
zero-copy view. pyigtl has no STATUS message: :class:`StatusMessage` adds it.

Geometry: the IMAGE's ijk-to-world (spacing included; pyigtl converts the
protocol's image centre to the origin) becomes ``meta.transform`` in LPS
(a RAS image is converted), its column norms ``meta.spacing``. TRANSFORM
messages update :attr:`IgtlSource.poses` (latest per device); with
``pose_device`` set, that device's latest pose is composed onto each frame's
ijk-to-world (for scanners whose image geometry is in probe coordinates; PLUS
with an embedded transform already sends images in the reference frame, so
leave it empty there). ``t_source`` is the message's timestamp (seconds since
1970; receive time when the sender leaves it 0), ``t_acquired_ns`` is stamped
when the message is complete.

Frame size: the supervisor opens the source before anything runs to size the
rings, and an appliance starts before the scanner streams (or while it is
frozen), and a scanner changes its image size with depth and zoom. So the
size is configured, not learnt from a first image: ``max_shape`` and ``dtype``
bound what is accepted, sizing the rings; an image outside them is rejected
(counted, warned once per size) and the stream goes on.

Robustness: a message larger than ``max_message_bytes`` is read and discarded
(counted as oversized; the framing is kept); a body that does not unpack, or
an IMAGE that breaks the frame rule every source applies
(:func:`~daemon.acquire.base.frame_problem`: no pixels, 2 or 5+ components, a
non-numeric scalar type, a spacing that is not finite and positive), is
malformed (counted, warned once per problem; the next message follows); a header that is not
OpenIGTLink, a connection closed mid-message or a message that stops arriving
for ``stall_timeout_s`` loses the framing: counted (malformed / truncated) and
the connection is dropped and made again. Connecting retries with exponential
backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``, back to the
minimum once a message arrives). CRC-64 checking is off by default: it costs
about 2.5 ms per MB here (pyigtl's crcmod), more than the rest of the hop, and
TCP already checks the bytes; OpenIGTLink's own library does not check by
default either.

Pacing is the scanner's: the source is live (:meth:`IgtlSource.poll` returns
each frame as it arrives, ``None`` after a timeout), so the acquire stage does
not pace it and its ``frames()`` never ends until :meth:`IgtlSource.close`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pyigtl.messages import CRC64, MessageBase

from daemon.acquire.base import fits, frame_problem, shape_str
from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta

log = logging.getLogger(__name__)

DEFAULT_PORT = 18944
HEADER_SIZE: int = MessageBase.IGTL_HEADER_SIZE
DEVICE_NAME_BYTES = 20
POLL_S = 0.1
"""The longest a blocked ``frames()`` goes without noticing :meth:`IgtlSource.close`."""

State = Literal["waiting", "connecting", "connected", "closed"]

_CRC = struct.Struct(">Q")
_CRC_AT = HEADER_SIZE - _CRC.size
_EXT_HEADER = struct.Struct(">HHII")
_TYPE = re.compile(r"[A-Za-z0-9_]{1,12}")
_DISCARD_CHUNK = 1 << 16
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# What pyigtl raises on a body that does not match its header.
_MALFORMED = (struct.error, ValueError, KeyError, IndexError, TypeError, NotImplementedError)


class IgtlSettings(BaseModel):
    """How the OpenIGTLink source receives (``[source.igtl]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_shape: tuple[int, ...] = Field(
        default=(1024, 1024),
        description="largest image accepted: [rows, columns] or [rows, columns, channels]; "
        "sizes the rings (the scanner's image size is not known when the pipeline starts)",
    )
    dtype: Literal["uint8", "uint16", "float32"] = Field(
        default="uint8", description="pixel type of the images followed; others are rejected"
    )
    max_message_bytes: int = Field(
        default=64 * 2**20,
        ge=1024,
        description="larger messages are skipped and counted as oversized",
    )
    pose_device: str = Field(
        default="",
        max_length=DEVICE_NAME_BYTES,
        description="TRANSFORM device whose latest pose is composed onto each frame's "
        "ijk-to-world (empty: none; leave empty when images already carry it, as PLUS's do)",
    )
    connect_timeout_s: float = Field(
        default=2.0, gt=0, description="give up one connection attempt after this"
    )
    reconnect_min_s: float = Field(
        default=0.1, gt=0, description="first wait before connecting again (doubles per failure)"
    )
    reconnect_max_s: float = Field(
        default=5.0, gt=0, description="longest wait between connection attempts"
    )
    stall_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="a message whose bytes stop coming for this long is truncated: reconnect",
    )
    check_crc: bool = Field(
        default=False,
        description="verify each message's CRC-64 (about 2.5 ms per MB; TCP already checks)",
    )

    @field_validator("max_shape")
    @classmethod
    def _frame_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) not in (2, 3) or min(v) < 1 or (len(v) == 3 and v[2] > 4):
            raise ValueError("must be [rows, columns] or [rows, columns, channels (1-4)]")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> IgtlSettings:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        return self


class StatusMessage(MessageBase):
    """OpenIGTLink STATUS (pyigtl has none): code (1 = OK), subcode, error name, text."""

    OK = 1
    _HEAD = struct.Struct(">Hq20s")

    def __init__(
        self,
        code: int = OK,
        subcode: int = 0,
        error_name: str = "",
        status: str = "",
        timestamp: float | None = None,
        device_name: str | None = None,
    ) -> None:
        super().__init__(timestamp=timestamp, device_name=device_name)
        self._message_type = "STATUS"
        self.code, self.subcode, self.error_name, self.status = code, subcode, error_name, status
        self._valid_message = True

    def _pack_content(self) -> bytes:
        name = self.error_name.encode()[:20]
        return bytes(self._HEAD.pack(self.code, self.subcode, name) + self.status.encode() + b"\0")

    def _unpack_content(self, content: Any) -> None:
        self.code, self.subcode, name = self._HEAD.unpack_from(content)
        self.error_name = name.rstrip(b"\0").decode(errors="replace")
        text = bytes(content[self._HEAD.size :]).split(b"\0", 1)[0]
        self.status = text.decode(errors="replace")


def create_message(message_type: str) -> Any:
    """An empty message of that type (pyigtl's, or :class:`StatusMessage`); None if unknown."""
    if message_type == "STATUS":
        return StatusMessage()
    return MessageBase.create_message(message_type)


def unpack(fields: dict[str, Any], body: memoryview) -> Any:
    """The message of a parsed header and its body; None for types pyigtl does not know.

    An IMAGE's content is given to pyigtl as a view (its pixels stay in ``body``).
    Raises one of ``struct.error``, ``ValueError``, ``KeyError``, ... when the body
    does not match the header.
    """
    msg = create_message(fields["message_type"])
    if msg is None:
        return None
    content: memoryview | bytes = body
    if fields["message_type"] != "IMAGE":
        content = bytes(body)  # small; pyigtl decodes text only from bytes
    if fields["header_version"] < 2:
        msg.unpack(fields, content)
        return msg
    ext_size, meta_header, meta_body, _ = _EXT_HEADER.unpack_from(body)
    meta = meta_header + meta_body
    if ext_size < _EXT_HEADER.size or ext_size + meta > len(body):
        raise ValueError(f"extended header ({ext_size} + {meta} bytes) exceeds the body")
    end = len(body) - meta
    head = MessageBase()  # pyigtl parses the extended header and metadata (from bytes)
    head.unpack(fields, bytes(body[:ext_size]) + bytes(body[end:]))
    msg.unpack({**fields, "header_version": 1}, content[ext_size:end])
    msg.header_version, msg.message_id, msg.metadata = (
        fields["header_version"],
        head.message_id,
        head.metadata,
    )
    return msg


def parse_uri(uri: str) -> tuple[str, int, str]:
    """``igtl://HOST[:PORT][/DEVICE]`` -> (host, port, device); SourceError if malformed."""
    parts = urlsplit(uri)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = -1
    device = unquote(parts.path.lstrip("/"))
    if parts.scheme != "igtl" or not parts.hostname or port < 1 or parts.query or parts.fragment:
        raise SourceError(
            f"{uri}: not an OpenIGTLink address; write igtl://HOST:PORT[/DEVICE], "
            f"e.g. igtl://127.0.0.1:{DEFAULT_PORT}/Image"
        )
    if len(device.encode()) > DEVICE_NAME_BYTES or "/" in device:
        raise SourceError(
            f"{uri}: device name {device!r} is not an OpenIGTLink device name "
            f"(at most {DEVICE_NAME_BYTES} bytes, no '/')"
        )
    return parts.hostname, port, device


@dataclass
class IgtlCounters:
    """What the source has seen since it was opened."""

    frames: int = 0  # IMAGE messages of the followed device turned into frames
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    malformed: int = 0  # header not OpenIGTLink, or a body that does not unpack
    truncated: int = 0  # connection closed or stalled mid-message
    oversized: int = 0  # over max_message_bytes: skipped
    crc: int = 0  # CRC-64 mismatch (check_crc)
    rejected: int = 0  # images outside max_shape / dtype, or volumes
    ignored: int = 0  # other devices' images, message types not handled
    transforms: int = 0
    statuses: int = 0
    strings: int = 0

    @property
    def reconnects(self) -> int:
        return max(self.connects - 1, 0)

    @property
    def errors(self) -> int:
        return self.malformed + self.truncated + self.oversized + self.crc + self.rejected


class IgtlSource:
    """Frames from an OpenIGTLink server; see the module docstring.

    Opening does not connect: the first :meth:`poll` does, and a server that is
    not there yet is retried with backoff. ``state`` is ``"waiting"`` (before the
    next attempt), ``"connecting"``, ``"connected"`` or ``"closed"``;
    :meth:`stats` has the counters. One thread polls; :meth:`close` may come
    from another.
    """

    def __init__(
        self, host: str, port: int, device: str = "", settings: IgtlSettings | None = None
    ) -> None:
        self.host, self.port, self.device = host, port, device
        self.settings = s = settings or IgtlSettings()
        self.max_shape: tuple[int, ...] = s.max_shape
        self.dtype = np.dtype(s.dtype)
        self.nominal_fps: float | None = None
        where = f"{host}:{port}" + (f"/{device}" if device else "")
        self.endpoint = where
        self.description = (
            f"OpenIGTLink {where} (up to {shape_str(self.max_shape, self.dtype)}, "
            "paced by the sender)"
        )
        self.state: State = "waiting"
        self.counters = IgtlCounters()
        self.poses: dict[str, np.ndarray] = {}
        self.last_status: StatusMessage | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending: tuple[socket.socket, float] | None = None  # connecting, until
        self._retry_at = 0.0
        self._backoff = s.reconnect_min_s
        self._heard = False  # a message arrived on this connection
        self._index = 0
        self._warned: set[tuple[tuple[int, ...], str]] = set()
        self._warned_malformed: set[str] = set()
        self._head = bytearray(HEADER_SIZE)
        self._scratch = memoryview(bytearray(_DISCARD_CHUNK))
        self._reset_message()
        log.info("opened %s", self.description)

    @classmethod
    def from_uri(cls, uri: str, settings: IgtlSettings | None = None) -> IgtlSource:
        host, port, device = parse_uri(uri)
        return cls(host, port, device, settings)

    # -- the FrameSource interface ---------------------------------------------------

    def frames(self) -> Iterator[Frame]:
        """Frames as they arrive, until :meth:`close` (a live stream has no second pass)."""
        while not self._closed.is_set():
            frame = self.poll(POLL_S)
            if frame is not None:
                yield frame

    def poll(self, timeout: float) -> Frame | None:
        """The next frame of the followed device, or None after ``timeout`` s (or closed).

        Connects, reconnects and handles the other messages on the way.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed.is_set():
                if self._sock is None and not self._connect(deadline):
                    return None
                frame = self._receive(deadline)
                if frame is not None or time.monotonic() >= deadline:
                    return frame
        return None

    def close(self) -> None:
        """Disconnect; a :meth:`poll` in another thread returns promptly."""
        self._closed.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv (safe across threads)
        with self._lock:
            for s in (self._sock, self._pending[0] if self._pending else None):
                if s is not None:
                    s.close()
            self._sock, self._pending = None, None
            self.state = "closed"

    def stats(self) -> dict[str, Any]:
        """State and counters, for the acquire stage's reports and the run summary."""
        c = self.counters
        status = self.last_status
        return {
            "state": self.state,
            **asdict(c),
            "reconnects": c.reconnects,
            "errors": c.errors,
            "last_status": None
            if status is None
            else {"code": status.code, "name": status.error_name, "text": status.status},
        }

    # -- connecting --------------------------------------------------------------------

    def _connect(self, deadline: float) -> bool:
        """Advance connecting until connected (True), or the deadline or close (False)."""
        while not self._closed.is_set():
            now = time.monotonic()
            if self._pending is None:
                if now < self._retry_at:
                    self.state = "waiting"
                    if self._closed.wait(min(self._retry_at, deadline) - now) or (
                        time.monotonic() >= deadline
                    ):
                        return False
                    continue
                self._start_connect(now)
                continue
            sock, until = self._pending
            _, ready, _ = select.select([], [sock], [], max(min(until, deadline) - now, 0.0))
            if ready:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    self._connected(sock)
                    return True
                self._connect_failed(errno.errorcode.get(err, str(err)))
            elif time.monotonic() >= until:
                self._connect_failed("timed out")
            else:
                return False
        return False

    def _start_connect(self, now: float) -> None:
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM
            )[0]
        except OSError as e:
            self._connect_failed(f"cannot resolve {self.host}: {e}")
            return
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        self._pending = (sock, now + self.settings.connect_timeout_s)
        self.state = "connecting"
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._connect_failed(errno.errorcode.get(err, str(err)))

    def _connect_failed(self, reason: str) -> None:
        if self._pending is not None:
            self._pending[0].close()
            self._pending = None
        c = self.counters
        c.connect_failures += 1
        level = logging.WARNING if c.connect_failures == 1 or self._heard else logging.DEBUG
        log.log(
            level,
            "OpenIGTLink %s:%d: cannot connect (%s); retrying in %.3g s",
            self.host,
            self.port,
            reason,
            self._backoff,
        )
        self._heard = False
        self._wait_before_retry()

    def _wait_before_retry(self) -> None:
        self.state = "waiting"
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.reconnect_max_s)

    def _connected(self, sock: socket.socket) -> None:
        self._pending = None
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):  # a peer gone without a FIN is noticed in ~11 s
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        self._sock = sock
        self._heard = False
        self._reset_message()
        self.poses.clear()  # poses of an earlier connection are stale
        self.counters.connects += 1
        self.state = "connected"
        again = f" (reconnect {self.counters.reconnects})" if self.counters.reconnects else ""
        log.info("OpenIGTLink %s:%d: connected%s", self.host, self.port, again)

    def _drop(self, reason: str, *, truncated: bool = False) -> None:
        """Close the connection (framing lost or peer gone) and schedule a reconnect."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._closed.is_set():
            return
        self.counters.disconnects += 1
        self.counters.truncated += truncated
        log.warning(
            "OpenIGTLink %s:%d: %s; reconnecting in %.3g s",
            self.host,
            self.port,
            reason,
            self._backoff,
        )
        self._wait_before_retry()

    # -- receiving ---------------------------------------------------------------------

    def _reset_message(self) -> None:
        """Expect a header next."""
        self._fields: dict[str, Any] | None = None
        self._body: np.ndarray | None = None
        self._view = memoryview(self._head)
        self._need, self._got = HEADER_SIZE, 0
        self._progress = time.monotonic()

    def _mid_message(self) -> bool:
        return self._got > 0 or self._fields is not None

    def _receive(self, deadline: float) -> Frame | None:
        """Read until a frame is complete, the deadline passes or the connection drops."""
        sock = self._sock
        while sock is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            view = self._view
            if self._body is None and self._fields is not None:  # discarding an oversized body
                view = self._scratch[: min(self._need - self._got, _DISCARD_CHUNK)]
            else:
                view = view[self._got : self._need]
            try:
                n = sock.recv_into(view)
            except TimeoutError:
                break
            except OSError as e:
                self._drop(f"connection lost ({e.strerror or e})", truncated=self._mid_message())
                return None
            if n == 0:
                self._drop("connection closed by the server", truncated=self._mid_message())
                return None
            self._got += n
            self._progress = time.monotonic()
            if self._got == self._need:
                frame = self._complete()
                if frame is not None:
                    return frame
            sock = self._sock
        if self._sock is not None and self._mid_message():
            stalled = time.monotonic() - self._progress
            if stalled > self.settings.stall_timeout_s:
                self._drop(f"message cut short (no data for {stalled:.1f} s)", truncated=True)
        return None

    def _complete(self) -> Frame | None:
        """A header or a body is complete: parse it, handle the message if it is whole."""
        if self._fields is None:
            fields = self._parse_header()
            if fields is None:
                return None
            size = fields["body_size"]
            self._fields, self._need, self._got = fields, size, 0
            if size > self.settings.max_message_bytes:
                self.counters.oversized += 1
                log.warning(
                    "OpenIGTLink %s message from %r of %d bytes is over max_message_bytes = %d; "
                    "skipped",
                    fields["message_type"],
                    fields["device_name"],
                    size,
                    self.settings.max_message_bytes,
                )
            else:
                self._body = np.empty(size, np.uint8)
                self._view = self._body.data
            if size > 0:
                return None
        fields, view, whole = self._fields, self._view, self._body is not None
        self._reset_message()
        if not self._heard:
            self._heard = True
            self._backoff = self.settings.reconnect_min_s
        return self._handle(fields, view) if whole else None

    def _parse_header(self) -> dict[str, Any] | None:
        """The header's fields, or None (counted, connection dropped) if it is not one."""
        try:
            fields: dict[str, Any] = MessageBase.parse_header(bytes(self._head))
        except (UnicodeDecodeError, struct.error):
            fields = {}
        if not (
            fields.get("header_version") in (1, 2)
            and _TYPE.fullmatch(fields["message_type"])
            and (fields["header_version"] == 1 or fields["body_size"] >= _EXT_HEADER.size)
        ):
            self.counters.malformed += 1
            self._drop(f"not an OpenIGTLink header ({bytes(self._head[:14])!r}...)")
            return None
        fields["crc"] = _CRC.unpack_from(self._head, _CRC_AT)[0]
        return fields

    def _handle(self, fields: dict[str, Any], body: memoryview) -> Frame | None:
        """One whole message: a frame for a followed IMAGE, else None (counted)."""
        c = self.counters
        kind, device = fields["message_type"], fields["device_name"]
        if self.settings.check_crc and CRC64(body) != fields["crc"]:
            c.crc += 1
            log.warning("OpenIGTLink %s message from %r: CRC mismatch; skipped", kind, device)
            return None
        if (kind == "IMAGE" and self.device and device != self.device) or kind not in (
            "IMAGE",
            "TRANSFORM",
            "STATUS",
            "STRING",
        ):
            c.ignored += 1
            return None
        try:
            msg = unpack(fields, body)
            if kind == "IMAGE":
                return self._frame(msg, fields)
        except _MALFORMED as e:
            self._malformed(kind, device, str(e), type(e).__name__)
            return None
        if kind == "TRANSFORM":
            c.transforms += 1
            self.poses[device] = np.asarray(msg.matrix, np.float64)
        elif kind == "STATUS":
            c.statuses += 1
            self.last_status = msg
            level = logging.DEBUG if msg.code == StatusMessage.OK else logging.WARNING
            log.log(
                level,
                "OpenIGTLink STATUS from %r: %d %s %s",
                device,
                msg.code,
                msg.error_name,
                msg.status,
            )
        else:
            c.strings += 1
            log.info("OpenIGTLink STRING from %r: %s", device, msg.string)
        return None

    def _frame(self, msg: Any, fields: dict[str, Any]) -> Frame | None:
        """The frame of an IMAGE message, or None: malformed (breaks the frame rule of
        :func:`~daemon.acquire.base.frame_problem`) or rejected (does not fit the settings)."""
        image: np.ndarray = msg.image  # (k, j, i[, c])
        matrix = np.asarray(msg.ijk_to_world_matrix, np.float64)
        if msg.world_coordinate_system == "ras":
            matrix = _LPS_FROM_RAS @ matrix
        sx, sy, sz = (float(v) for v in np.linalg.norm(matrix[:3, :3], axis=0))
        if image.shape[0] > 1:
            self._reject(image.shape, image.dtype, f"a volume of {image.shape[0]} slices")
            return None
        slice_shape = image.shape[1:] if image.shape[0] else (0, 0)
        if len(slice_shape) == 3 and slice_shape[2] == 1:
            slice_shape = slice_shape[:2]
        problem = frame_problem(slice_shape, image.dtype, (sx, sy))
        if problem is not None:
            self._malformed("IMAGE", fields["device_name"], problem, problem)
            return None
        image = image.reshape(slice_shape)
        if not image.dtype.isnative:
            image = image.astype(image.dtype.newbyteorder("="))
        if image.dtype != self.dtype or not fits(image.shape, self.max_shape):
            self._reject(image.shape, image.dtype, "larger than max_shape or not dtype")
            return None
        pose = self.poses.get(self.settings.pose_device) if self.settings.pose_device else None
        if pose is not None:
            matrix = pose @ matrix
        meta = FrameMeta.for_array(
            image,
            index=self._index,
            t_acquired_ns=time.monotonic_ns(),
            t_source=fields["timestamp"] or time.time(),
            spacing=(sx, sy, sz),
            transform=matrix,
        )
        self._index += 1
        self.counters.frames += 1
        return Frame(image, meta)

    def _malformed(self, kind: str, device: str, why: str, key: str) -> None:
        """Count a message that breaks the protocol or the frame rule; warn once per ``key``."""
        self.counters.malformed += 1
        level = logging.DEBUG if key in self._warned_malformed else logging.WARNING
        self._warned_malformed.add(key)
        log.log(level, "OpenIGTLink %s from %r is malformed (%s); skipped", kind, device, why)

    def _reject(self, shape: tuple[int, ...], dtype: np.dtype, why: str) -> None:
        self.counters.rejected += 1
        key = (tuple(shape), dtype.str)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "OpenIGTLink image %s rejected: %s (%s); set source.igtl.max_shape / dtype "
                "to follow it",
                shape_str(tuple(shape), dtype),
                why,
                shape_str(self.max_shape, self.dtype),
            )
