"""Label maps back over OpenIGTLink, for a navigation system such as 3D Slicer.

Each label map goes out as an IMAGE message (uint8, one slice) with the
source frame's geometry: its ijk-to-world (spacing, orientation, origin; LPS)
and timestamp (``t_source``: the scanner's own time for an OpenIGTLink
source, so the receiver can pair it with the image), under a configured device
name (``"Segmentation"``).

Server, not client: echod listens (port 18945 by default, next to a PLUS
server's 18944) and any number of viewers connect to it, as they connect to
PLUS; the appliance needs no address of the navigation system, keeps nothing
to retry when nobody listens (messages are not even packed then), and a viewer
that comes and goes changes nothing for the others. Never blocking: sockets
are non-blocking, a client still sending the previous message skips the next
one (counted as dropped; it gets the newest afterwards, as a "newest" reader),
and what clients send to echod is read and discarded. There is no
authentication in OpenIGTLink: the default interface is 127.0.0.1.

Cost: pyigtl packs a message with a copy of the pixels and a CRC-64 of the
body (about 1.8 ms for 820x616 here), in this stage's process, off the path
of the image shown.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from typing import Any

import numpy as np
import pyigtl

from daemon import results
from daemon.frame import FrameMeta
from daemon.stage import POLL_S, Stage

log = logging.getLogger(__name__)

BUSY_POLL_S = 0.005
"""How long a step waits for a label map while a client still has bytes to send."""
_RECV_BYTES = 1 << 16


def label_message(labels: np.ndarray, meta: FrameMeta, device: str) -> bytes:
    """A packed IMAGE message of ``labels`` (HxW) with the frame geometry of ``meta``."""
    message = pyigtl.ImageMessage(
        image=labels[np.newaxis],  # pyigtl's axes: (k, j, i)
        ijk_to_world_matrix=meta.transform,
        world_coordinate_system="lps",
        timestamp=meta.t_source,
        device_name=device,
    )
    return bytes(message.pack())


class LabelServer:
    """Serves packed messages to the clients connected; never waits for one."""

    def __init__(self, host: str, port: int, max_clients: int) -> None:
        self._listen = socket.create_server((host, port))
        self._listen.setblocking(False)
        self.host = host
        self.port: int = self._listen.getsockname()[1]
        self.max_clients = max_clients
        self._pending: dict[socket.socket, memoryview | None] = {}
        self.sent = 0  # messages sent whole, over all clients
        self.dropped = 0  # messages a client skipped (still sending the one before)
        self.connections = 0
        log.info("OpenIGTLink output: serving on %s:%d", host, self.port)

    @property
    def clients(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """A client still has bytes of a message to take."""
        return any(p is not None for p in self._pending.values())

    def service(self, timeout: float) -> None:
        """Accept clients, send pending bytes, read and discard client input, drop leavers;
        waits up to ``timeout`` s for any of it."""
        writers = [s for s, p in self._pending.items() if p is not None]
        readable, writable, _ = select.select([self._listen, *self._pending], writers, [], timeout)
        for sock in readable:
            if sock is self._listen:
                self._accept()
                continue
            try:
                data = sock.recv(_RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._forget(sock, "left")
        for sock in writable:
            if sock in self._pending:
                self._flush(sock)

    def publish(self, message: bytes) -> None:
        """Give ``message`` to every client that is not still sending an earlier one."""
        view = memoryview(message)
        for sock in list(self._pending):
            if self._pending[sock] is not None:
                self.dropped += 1
                continue
            self._pending[sock] = view
            self._flush(sock)

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listen.accept()
            except BlockingIOError:
                return
            if len(self._pending) >= self.max_clients:
                log.warning("OpenIGTLink output: %s refused (max_clients reached)", peer)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pending[sock] = None
            self.connections += 1
            log.info("OpenIGTLink output: client %s connected", peer)

    def _flush(self, sock: socket.socket) -> None:
        view = self._pending[sock]
        if view is None:
            return
        try:
            n = sock.send(view)
        except BlockingIOError:
            return
        except OSError as e:
            self._forget(sock, f"lost ({e.strerror or e})")
            return
        rest = view[n:]
        if rest:
            self._pending[sock] = rest
        else:
            self._pending[sock] = None
            self.sent += 1

    def _forget(self, sock: socket.socket, why: str) -> None:
        with contextlib.suppress(OSError):
            log.info("OpenIGTLink output: client %s %s", sock.getpeername(), why)
        del self._pending[sock]
        sock.close()

    def close(self) -> None:
        for sock in list(self._pending):
            sock.close()
        self._pending.clear()
        self._listen.close()


class IgtlOutStage(Stage):
    """Reads the results ring ("newest") and serves each result's label map (its first
    segmentation output); config ``[igtl_out]``."""

    def setup(self) -> dict[str, Any]:
        cfg = self.config.igtl_out
        self.device = cfg.device
        self.server = LabelServer(cfg.host, cfg.port, cfg.max_clients)
        self.reader = self.ctx.input("results")
        self.torn = 0
        return {"igtl_out": f"{cfg.host}:{self.server.port}"}

    def step(self) -> bool:
        server = self.server
        server.service(0.0)
        f = self.reader.read(timeout=BUSY_POLL_S if server.busy else POLL_S)
        if f is None or not server.clients:
            return True
        try:
            labels = results.unpack(f.image).labels
        except results.RecordError:  # torn while read (checked below) or not a record
            labels = None
        if labels is None:  # no label map in this result: nothing to send
            self.torn += not f.valid()
            return True
        message = label_message(labels, f.meta, self.device)
        if not f.valid():  # overwritten while packed
            self.torn += 1
            return True
        server.publish(message)
        return True

    def teardown(self) -> None:
        if hasattr(self, "server"):
            self.server.close()

    def summary(self) -> dict[str, Any]:
        s = self.server
        return {"sent": s.sent, "dropped": s.dropped, "clients": s.connections, "torn": self.torn}
