"""The control server: a ZeroMQ ROUTER for requests and a PUB for telemetry and events.

It runs in a thread of the supervisor and owns its sockets (ZeroMQ sockets are
not thread-safe: other threads hand it messages to publish through a queue).
A request is parsed and checked by :mod:`daemon.protocol`, answered by the
supervisor's handler, and every failure becomes an error reply: the server
never dies of a request, and a slow or vanished client never blocks it (sends
are non-blocking; a reply that cannot be queued is dropped).

Endpoints: ``ipc://`` in the runtime directory by default (socket mode 0660);
``tcp://`` only with CURVE, a server key and an allow-list of client public
keys in ``clients_dir/{read,control,admin}/*.key`` (``echod keys`` makes them).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from daemon import protocol
from daemon.config import ControlConfig
from daemon.errors import ConfigError, EchodError
from daemon.protocol import ROLES, Parsed, ProtocolError, Role

log = logging.getLogger(__name__)

Handler = Callable[[Parsed, Role], Any]
POLL_MS = 50
HARD_LIMIT_FACTOR = 16  # messages above this many times the limit are cut by ZeroMQ itself


class ControlServer:
    """Serves the control protocol for ``handler`` until :meth:`close`."""

    def __init__(
        self,
        settings: ControlConfig,
        runtime_dir: Path,
        handler: Handler,
        telemetry: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.telemetry = telemetry
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._roles: dict[str, Role] = {}
        self._outbox: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.router = self._ctx.socket(zmq.ROUTER)
        self.pub = self._ctx.socket(zmq.PUB)
        try:
            self.endpoint, self.telemetry_endpoint = self._bind(runtime_dir)
        except BaseException:
            # a context left to the garbage collector with sockets open blocks in term()
            self._release()
            raise
        self._thread = threading.Thread(target=self._serve, name="echod-control", daemon=True)

    # -- binding and security ------------------------------------------------

    def _bind(self, runtime_dir: Path) -> tuple[str, str]:
        s = self.settings
        endpoint = s.endpoint or f"ipc://{runtime_dir / 'control.sock'}"
        pub_endpoint = s.telemetry_endpoint or f"ipc://{runtime_dir / 'telemetry.sock'}"
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
        self.router.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes * HARD_LIMIT_FACTOR)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if endpoint.startswith("tcp://") or pub_endpoint.startswith("tcp://"):
            self._enable_curve()
        return self._bind_one(self.router, endpoint), self._bind_one(self.pub, pub_endpoint)

    def _bind_one(self, sock: zmq.Socket[Any], endpoint: str) -> str:
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if path.exists() or path.is_symlink():
                path.unlink()  # a stale socket from a killed daemon
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind control endpoint {endpoint}: {e}") from None
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if bound.startswith("ipc://"):
            os.chmod(bound[len("ipc://") :], 0o660)
        return bound

    def _enable_curve(self) -> None:
        s = self.settings
        if not s.server_key or not s.clients_dir:
            raise ConfigError(
                "a tcp:// control endpoint needs CURVE: set control.server_key (secret key file)"
                " and control.clients_dir (allowed client public keys); make them with `echod keys`"
            )
        try:
            public, secret = zmq.auth.load_certificate(s.server_key)
        except (OSError, ValueError) as e:
            raise ConfigError(f"control.server_key {s.server_key}: {e}") from None
        if secret is None:
            raise ConfigError(
                f"control.server_key {s.server_key} holds no secret key: "
                "use the .key_secret file that `echod keys` wrote"
            )
        self._roles = load_client_keys(Path(s.clients_dir))
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(f"{__name__}.auth"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        for sock in (self.router, self.pub):
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: a CURVE client is let in only when its public key is on the allow-list."""
        allowed = key.decode() in self._roles
        if not allowed:
            log.warning("refused control client with unknown CURVE key %s", key.decode())
        return allowed

    def _role(self, frame: zmq.Frame) -> Role:
        if self._auth is None:
            return self.settings.ipc_role
        user = frame.get("User-Id")
        return self._roles.get(user, "read") if isinstance(user, str) else "read"

    # -- serving ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        log.info("control on %s, telemetry on %s", self.endpoint, self.telemetry_endpoint)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Queue an event for the PUB socket (any thread)."""
        self._outbox.put((topic, data))

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_telemetry = time.monotonic()
        while not self._stop.is_set():
            if poller.poll(POLL_MS):
                self._drain_requests()
            while True:
                try:
                    topic, data = self._outbox.get_nowait()
                except queue.Empty:
                    break
                self._send_pub(topic, data)
            now = time.monotonic()
            if now >= next_telemetry:
                next_telemetry = now + self.settings.telemetry_interval_s
                self._send_pub("telemetry", self._safe(self.telemetry))

    def _drain_requests(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = self.answer(frames[-1].bytes, self._role(frames[-1]))
            try:
                self.router.send_multipart([*frames[:-1], reply], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the client is gone or not reading: drop the reply
                log.debug("reply dropped: %s", e)

    def answer(self, raw: bytes, role: Role) -> bytes:
        """One request in, one reply out; never raises."""
        rid: str | None = None
        try:
            parsed = protocol.parse(raw, self.settings.max_message_bytes)
            rid = parsed.id
            if not protocol.allowed(role, parsed.command):
                raise ProtocolError(
                    protocol.FORBIDDEN,
                    f"'{parsed.command.name}' needs the "
                    f"{parsed.command.role} role; this client has {role}",
                )
            return protocol.ok(rid, self.handler(parsed, role))
        except ProtocolError as e:
            return protocol.error(rid or e.request_id, e.code, e.message)
        except EchodError as e:
            return protocol.error(rid, e.code, e.message)
        except Exception as e:
            log.exception("control request failed")
            return protocol.error(rid, protocol.INTERNAL, f"{type(e).__name__}: {e}")

    def _send_pub(self, topic: str, data: dict[str, Any]) -> None:
        try:
            self.pub.send_multipart([topic.encode(), protocol.ok(None, data)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("event %s dropped: %s", topic, e)

    @staticmethod
    def _safe(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return fn()
        except Exception as e:  # telemetry must not take the server down
            log.exception("telemetry failed")
            return {"error": str(e)}

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        for endpoint in (self.endpoint, self.telemetry_endpoint):
            if endpoint.startswith("ipc://"):
                Path(endpoint[len("ipc://") :]).unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        self.router.close(0)
        self.pub.close(0)
        self._ctx.term()

def load_client_keys(clients_dir: Path) -> dict[str, Role]:
    """Allowed client public keys (z85) and their role, from ``{read,control,admin}/*.key``."""
    roles: dict[str, Role] = {}
    for role in ROLES:
        for path in sorted((clients_dir / role).glob("*.key")):
            public, _ = zmq.auth.load_certificate(path)
            roles[public.decode()] = role
    if not roles:
        raise ConfigError(
            f"control.clients_dir {clients_dir} has no client keys in "
            "read/, control/ or admin/: add one with `echod keys --client NAME`"
        )
    return roles
