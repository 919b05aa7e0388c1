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

Audit (:mod:`daemon.audit`, logger ``daemon.control.audit``): every accepted
``control`` or ``admin`` command with its client and outcome; refusals
(forbidden, malformed, refused handshakes) once per client and minute.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from daemon import audit, protocol
from daemon.config import ControlConfig
from daemon.errors import ConfigError, EchodError
from daemon.paths import private_dir
from daemon.protocol import ROLES, Parsed, ProtocolError, Role

log = logging.getLogger(__name__)
audit_log = logging.getLogger(f"{__name__}.audit")

Handler = Callable[[Parsed, Role], Any]
POLL_MS = 50
PARKED_POLL_MS = 2  # while replies are pending
PARKED_TIMEOUT_S = 120.0  # a parked request is answered by then, whatever happens
HARD_LIMIT_FACTOR = 16  # messages above this many times the limit are cut by ZeroMQ itself


class ClientKey(NamedTuple):
    role: Role
    name: str  # the key file's name: who the client is in the audit log


@dataclass
class Parked:
    """A request answered when its Future resolves."""

    parsed: Parsed
    role: Role
    client: str
    future: Future[Any]
    deadline: float
    envelope: list[Any] = field(default_factory=list)  # where the reply goes


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
        self._keys: dict[str, ClientKey] = {}
        self._names: dict[str, str] = {}
        self._monitors: list[zmq.Socket[Any]] = []
        self._throttle = audit.Throttle(audit_log)
        self._outbox: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._parked: list[Parked] = []
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
        """Bind; an ipc socket goes in a private folder (:func:`private_dir`) and is made
        mode 0660 by the umask it is created with (no chmod by path: no symlink race)."""
        umask = None
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://") :])
            private_dir(path.parent, "the control socket's folder")
            if path.exists() or path.is_symlink():
                path.unlink()  # a stale socket from a killed daemon
            umask = os.umask(0o117)  # the socket file: rw for owner and group
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind control endpoint {endpoint}: {e}") from None
        finally:
            if umask is not None:
                os.umask(umask)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

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
        self._keys = load_client_keys(Path(s.clients_dir))
        self._names = {key: k.name for key, k in self._keys.items()}
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(f"{__name__}.auth"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        for sock in (self.router, self.pub):
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            # handshakes that fail before ZAP (no key, another server's key) show only here
            self._monitors.append(sock.get_monitor_socket(audit.HANDSHAKE_EVENTS))

    def reload(self, settings: ControlConfig) -> None:
        """Take new settings (a SIGHUP reload: roles, limits, the telemetry interval; the
        roots are read per request) and read the client keys again: a key added to or
        removed from ``clients_dir`` counts from now on. Bound endpoints stay as they are."""
        if self._auth is not None:
            keys = load_client_keys(Path(settings.clients_dir))  # a bad folder changes nothing
            self._keys, self._names = keys, {key: k.name for key, k in keys.items()}
            log.info("control: %d client key(s) allowed", len(keys))
        self.settings = settings

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: a CURVE client is let in only when its public key is on the allow-list."""
        allowed = key.decode() in self._keys
        if not allowed:
            self._throttle(
                ("unknown key", key),
                logging.WARNING,
                "refused a control client: CURVE key %s is not on the allow-list",
                key.decode(),
            )
        return allowed

    def _role(self, frame: zmq.Frame) -> Role:
        if self._auth is None:
            return self.settings.ipc_role
        user = frame.get("User-Id")
        known = self._keys.get(user) if isinstance(user, str) else None
        return known.role if known is not None else "read"

    def _handshakes_failed(self, monitor: zmq.Socket[Any]) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            why = audit.handshake_failure(event)
            where = event["endpoint"].decode(errors="replace")
            self._throttle(
                ("handshake", where, why),
                logging.WARNING,
                "refused a control client's CURVE handshake on %s: %s",
                where,
                why,
            )

    # -- serving ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        log.info("control on %s, telemetry on %s", self.endpoint, self.telemetry_endpoint)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Queue an event for the PUB socket (any thread)."""
        self._outbox.put((topic, data))

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self.router, *self._monitors):
            poller.register(sock, zmq.POLLIN)
        next_telemetry = time.monotonic()
        while not self._stop.is_set():
            for sock, _ in poller.poll(PARKED_POLL_MS if self._parked else POLL_MS):
                if sock is self.router:
                    self._drain_requests()
                else:
                    self._handshakes_failed(sock)
            if self._parked:
                self._answer_parked()
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
            # [routing id, (REQ's empty delimiter,) request]: the reply goes back the same way
            cut = 2 if len(frames) > 2 and not frames[1].bytes else 1
            envelope, body = frames[:cut], frames[cut:]
            client = audit.who(frames[-1], self._names)
            if len(body) == 1:
                reply = self.answer(body[0].bytes, self._role(frames[-1]), client)
            else:
                reply = self._refuse(
                    None,
                    ProtocolError(
                        protocol.BAD_REQUEST,
                        f"a request is one message part, got {len(body)}: send one JSON object",
                    ),
                    client,
                )
            if isinstance(reply, Parked):
                reply.envelope = envelope
                self._parked.append(reply)
            else:
                self._reply(envelope, reply)

    def _reply(self, envelope: list[Any], reply: bytes) -> None:
        try:
            self.router.send_multipart([*envelope, reply], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the client is gone or not reading: drop the reply
            log.debug("reply dropped: %s", e)

    def answer(self, raw: bytes, role: Role, client: str = "a local client") -> bytes | Parked:
        """One request in, one reply out; never raises. A handler that needs the
        supervisor's thread returns a Future: the request is :class:`Parked` and answered
        when it resolves. Changes (``control`` and ``admin`` commands) are logged with
        ``client`` and their outcome."""
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
        except ProtocolError as e:
            return self._refuse(rid, e, client)
        try:
            result = self.handler(parsed, role)
        except Exception as e:
            reply, outcome = self._failure(parsed.id, e)
        else:
            if isinstance(result, Future):
                return Parked(parsed, role, client, result, time.monotonic() + PARKED_TIMEOUT_S)
            reply, outcome = protocol.ok(parsed.id, result), "done"
        self._audit(parsed, role, client, outcome)
        return reply

    def _answer_parked(self) -> None:
        now = time.monotonic()
        waiting = []
        for p in self._parked:
            if p.future.done():
                error = p.future.exception()
                if error is None:
                    reply, outcome = protocol.ok(p.parsed.id, p.future.result()), "done"
                else:
                    reply, outcome = self._failure(p.parsed.id, error)
            elif now > p.deadline:
                why = "no answer in time"
                reply, outcome = protocol.error(p.parsed.id, protocol.UNAVAILABLE, why), why
            else:
                waiting.append(p)
                continue
            self._audit(p.parsed, p.role, p.client, outcome)
            self._reply(p.envelope, reply)
        self._parked = waiting

    @staticmethod
    def _failure(rid: str | None, e: BaseException) -> tuple[bytes, str]:
        """The error reply for a handler's exception, and the outcome in words."""
        if isinstance(e, (ProtocolError, EchodError)):
            return protocol.error(rid, e.code, e.message), f"{e.code}: {e.message}"
        log.error("control request failed", exc_info=e)
        return protocol.error(
            rid, protocol.INTERNAL, f"{type(e).__name__}: {str(e)[:300]}"
        ), protocol.INTERNAL

    @staticmethod
    def _audit(parsed: Parsed, role: Role, client: str, outcome: str) -> None:
        if parsed.command.role != "read":
            audit_log.info(
                "%s %s by %s (%s role): %s",
                parsed.command.name,
                protocol.brief(parsed.args.model_dump()),
                client,
                role,
                outcome,
            )

    def _refuse(self, rid: str | None, e: ProtocolError, client: str) -> bytes:
        """The error reply to a request that is not served; logged once per client and minute."""
        forbidden = e.code == protocol.FORBIDDEN
        self._throttle(
            (e.code if forbidden else "malformed", client),
            logging.WARNING if forbidden else logging.INFO,
            "refused a request from %s: %s: %s",
            client,
            e.code,
            e.message,
        )
        return protocol.error(rid or e.request_id, e.code, e.message)

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
        for sock in (self.router, self.pub):
            if self._monitors:
                sock.disable_monitor()
        for monitor in self._monitors:
            monitor.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.router.close(0)
        self.pub.close(0)
        self._ctx.term()


def load_client_keys(clients_dir: Path) -> dict[str, ClientKey]:
    """Allowed client public keys (z85), their role and name, from
    ``{read,control,admin}/NAME.key``."""
    roles: dict[str, ClientKey] = {}
    for role in ROLES:
        for path in sorted((clients_dir / role).glob("*.key")):
            public, _ = zmq.auth.load_certificate(path)
            roles[public.decode()] = ClientKey(role, path.stem)
    if not roles:
        raise ConfigError(
            f"control.clients_dir {clients_dir} has no client keys in "
            "read/, control/ or admin/: add one with `echod keys --client NAME`"
        )
    return roles
