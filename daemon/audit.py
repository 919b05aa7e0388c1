"""Who talks to the control socket: client identities, refusals logged without flooding.

Every accepted ``control`` or ``admin`` command is logged at INFO (who, what,
the outcome; the log line's time is when). Refusals (a ``forbidden`` command, a
malformed request, a refused CURVE handshake) repeat as fast as a client
retries, so each kind is logged once per client per :data:`INTERVAL_S`, with
the number left out since.

Identity: a local (ipc) client by its uid and pid (the kernel's peer
credentials, which ZeroMQ reports as ``Peer-Address``); a tcp client by the
name of its allow-listed key file and its address. A handshake that fails
before the client is authenticated (no CURVE key, or one for another server)
has no identity yet: ZeroMQ's monitor reports only the endpoint and the reason.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Hashable, Mapping
from typing import Any

import zmq

INTERVAL_S = 60.0
_MAX_KEYS = 1024  # clients remembered at once (older ones are forgotten first)

HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_PROTOCOL_REASONS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the client sent no CURVE key",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its handshake does not decrypt (a wrong server key?)",
}


class Throttle:
    """Log a repeating line at most once per ``interval`` seconds per key (any thread)."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL_S) -> None:
        self.log = logger
        self.interval = interval
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (logged at, left out)
        self._lock = threading.Lock()

    def __call__(self, key: Hashable, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            at, left_out = self._last.get(key, (-math.inf, 0))
            if now - at < self.interval:
                self._last[key] = (at, left_out + 1)
                return
            if len(self._last) >= _MAX_KEYS:
                for old in sorted(self._last, key=lambda k: self._last[k][0])[: _MAX_KEYS // 2]:
                    del self._last[old]
            self._last[key] = (now, 0)
        if left_out:
            msg, args = msg + " (%d more like it since the last such line)", (*args, left_out)
        self.log.log(level, msg, *args)


def who(frame: zmq.Frame, key_names: dict[str, str]) -> str:
    """A request's client: ``uid 1000 pid 4242`` (ipc) or ``ops at 10.0.0.7`` (tcp, CURVE)."""
    try:
        peer = str(frame.get("Peer-Address") or "")
    except zmq.ZMQError:
        peer = ""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler (ipc): there is no User-Id
        user = None
    if isinstance(user, str) and user:
        return f"{key_names.get(user, 'key ' + user[:8])} at {peer or 'an unknown address'}"
    parts = peer.split(":")
    if len(parts) == 4 and parts[0] == "localhost":  # ipc: localhost:uid:gid:pid
        return f"uid {parts[1]} pid {parts[3]}"
    return peer or "an unknown client"


def handshake_failure(event: Mapping[str, Any]) -> str:
    """Why a monitor event says a handshake failed, in words."""
    value = int(event["value"])
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _PROTOCOL_REASONS.get(value, f"ZMTP protocol error {value:#x}")
    # the client noticed the mismatch first and hung up
    return f"the client broke off the handshake ({zmq.strerror(value)}; one with no CURVE key does)"
