"""Results back over OpenIGTLink, for a navigation system such as 3D Slicer.

Every result record of every results port (``results``, ``results-1``...: one per
model) becomes messages (daemon/igtl_results.py: label maps as IMAGE, classes, boxes
and values as STRING, points as POINT), stamped with the source frame's ``t_source``
(the scanner's own time for an OpenIGTLink source, so the receiver can pair them with
the image) and named after the model's outputs (README, "OpenIGTLink output"). The
names of classes, points and values come from the model's description: the stage's
``params`` at start (``models``: the supervisor's list of described models, each naming
its port; or ``outputs`` alone, for port ``results``) and the ``model`` command of each
hot-swap (``generation``, ``port``, ``outputs``).

Server, not client: echod listens (port 18945 by default, next to a PLUS
server's 18944) and any number of viewers connect to it, as they connect to
PLUS; the appliance needs no address of the navigation system, keeps nothing
to retry when nobody listens (messages are not even packed then), and a viewer
that comes and goes changes nothing for the others. Never blocking: sockets
are non-blocking, a client still sending the previous result skips the next
one (counted as dropped; it gets the newest afterwards, as a "newest" reader),
and what clients send to echod is read and discarded. A result's messages go out
together (a client gets all of a frame's or none). There is no authentication in
OpenIGTLink: the default interface is 127.0.0.1. A payload that is not a valid record
is counted (``malformed``) and skipped.

Cost: pyigtl packs a message with a copy of the pixels and a CRC-64 of the
body (about 1.8 ms for an 820x616 label map here), in this stage's process, off the
path of the image shown.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from typing import Any

from daemon import results
from daemon.igtl_results import ResultMessages
from daemon.ring import EndOfStream, RingFrame
from daemon.stage import POLL_S, Stage

log = logging.getLogger(__name__)

BUSY_POLL_S = 0.005
"""How long a step waits for a result while a client still has bytes to send."""
PORTS_POLL_S = 0.002
"""How long a step waits (for a client, in select) when several ports had nothing."""
_RECV_BYTES = 1 << 16


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
    """Reads every results port ("newest"; "all" in mode all) and serves each result's
    messages; config ``[igtl_out]``."""

    def setup(self) -> dict[str, Any]:
        cfg = self.config.igtl_out
        self.builder = ResultMessages(cfg.device)
        self.server = LabelServer(cfg.host, cfg.port, cfg.max_clients)
        ports = sorted(p for p in self.spec.inputs if p.startswith("results"))
        self.readers = {p: self.ctx.input(p) for p in ports}
        self.ended: set[str] = set()
        params = self.spec.params
        # the supervisor's list of described models (each names its port), else the first
        # model's description alone
        models = {d["port"]: d for d in params.get("models") or ()} or (
            {"results": params} if "outputs" in params else {}
        )
        # port -> generation -> the model description its results of that generation have
        self.models: dict[str, dict[int, dict[str, Any]]] = {
            port: {0: dict(d)} for port, d in models.items()
        }
        self.torn = 0
        self.malformed = 0
        return {"igtl_out": f"{cfg.host}:{self.server.port}", "igtl_ports": ports}

    def command(self, name: str, args: dict[str, Any]) -> Any:
        """``model`` {generation, port (default ``results``), outputs...}: the description
        of the model whose results carry that generation (sent before a hot-swap)."""
        if name == "model":
            port, generation = str(args.get("port") or "results"), int(args["generation"])
            self.models.setdefault(port, {})[generation] = dict(args)
            return {"generation": generation, "port": port}
        return super().command(name, args)

    def step(self) -> bool:
        server = self.server
        server.service(0.0)
        live = [p for p in self.readers if p not in self.ended]
        if not live:
            raise EndOfStream  # every model's stream has ended
        took = False
        for port in live:
            took |= self._take(port, 0.0)
        if not took:
            wait = BUSY_POLL_S if server.busy else POLL_S
            if len(live) == 1:
                self._take(live[0], wait)
            else:  # no wake-up across rings: wait on the clients a little, then look again
                server.service(min(wait, PORTS_POLL_S))
        return True

    def _take(self, port: str, timeout: float) -> bool:
        """Read ``port``'s next result (waiting up to ``timeout``) and serve it."""
        try:
            f = self.readers[port].read(timeout=timeout)
        except EndOfStream:
            self.ended.add(port)
            return False
        if f is not None:
            self._serve(port, f)
        return f is not None

    def _serve(self, port: str, f: RingFrame) -> None:
        try:
            record = results.unpack(f.image)
        except results.RecordError as e:
            if not f.valid():  # overwritten while read
                self.torn += 1
                return
            self.malformed += 1
            if self.malformed == 1:  # once: the count says the rest
                log.warning("OpenIGTLink output: results on %s skipped: %s", port, e)
            return
        if not self.server.clients:
            return
        meta = f.meta
        description = self._description(port, meta.generation)
        suffix = port.removeprefix("results")
        message = b"".join(self.builder.messages(record, meta, description, suffix))
        if not f.valid():  # overwritten while packed
            self.torn += 1
            return
        self.server.publish(message)

    def _description(self, port: str, generation: int) -> dict[str, Any] | None:
        """The description of ``port``'s model of ``generation``: that generation's, else
        the newest one before it (a stage restarted after a swap), else None."""
        known = self.models.get(port, {})
        earlier = [g for g in known if g <= generation]
        return known[max(earlier)] if earlier else None

    def teardown(self) -> None:
        if hasattr(self, "server"):
            self.server.close()

    def summary(self) -> dict[str, Any]:
        s = self.server
        return {
            "sent": s.sent,
            "dropped": s.dropped,
            "clients": s.connections,
            "torn": self.torn,
            "malformed": self.malformed,
            "descriptions": {port: sorted(g) for port, g in self.models.items()},
        }
