"""``echod ctl``: the command-line client of the control protocol.

Readable output by default (tables and ``key  value`` lines,
:mod:`daemon.human`), ``--json`` for scripts (the result as one JSON line); the
exit code tells the error class (sysexits), so scripts can branch without
parsing messages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from daemon import config, human, protocol

# error code -> exit status (sysexits.h), one table for every command
EXIT = {
    protocol.BAD_JSON: 64,
    protocol.BAD_REQUEST: 64,
    protocol.BAD_VERSION: 64,
    protocol.UNKNOWN_COMMAND: 64,
    protocol.BAD_ARGS: 64,
    protocol.TOO_LARGE: 64,
    protocol.FORBIDDEN: 77,
    protocol.UNAVAILABLE: 69,
    protocol.NOT_FOUND: 66,
    protocol.INTERNAL: 70,
    "config": 78,
    "model": 65,
    "bad_input": 65,
    "source": 66,
    "engine": 69,
    "stage": 70,
    "ring": 71,
    "timeout": 75,
}
# commands whose single positional argument names this field
POSITIONAL = {
    "config.get": "key",
    "model.load": "path",
    "screenshot": "path",
    "jobs.get": "job",
    "jobs.cancel": "job",
    "jobs.result": "job",
}


class CtlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Client:
    """A DEALER connected to the daemon; CURVE when keys are given (tcp)."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 5.0,
        server_key: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # a DEALER holds a message until some peer takes it: with no daemon there, or
        # a CURVE handshake refused, send would wait for ever
        self.sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self._curve(self.sock, server_key, client_key)
        self.sock.connect(endpoint)

    @staticmethod
    def _curve(sock: zmq.Socket[Any], server_key: Path | None, client_key: Path | None) -> None:
        if server_key is None and client_key is None:
            return
        if server_key is None or client_key is None:
            raise CtlError(
                "config", "CURVE needs both --server-key (public) and --client-key (secret) files"
            )
        server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_key)
        if secret is None:
            raise CtlError("config", f"{client_key} holds no secret key: use the .key_secret file")
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """The result, or :class:`CtlError` with the daemon's code and message."""
        rid = uuid.uuid4().hex[:12]
        try:
            self.sock.send(protocol.request(cmd, args, request_id=rid))
        except zmq.Again:
            raise CtlError(
                "timeout",
                f"cannot reach {self.endpoint} within "
                f"{self.timeout_ms / 1000:g} s: is echod running there, and does it "
                "accept this client's key?",
            ) from None
        while True:
            if not self.sock.poll(self.timeout_ms):
                raise CtlError(
                    "timeout",
                    f"no answer from {self.endpoint} within "
                    f"{self.timeout_ms / 1000:g} s: is echod running there?",
                )
            reply = json.loads(self.sock.recv())
            if reply.get("id") == rid:  # skip late answers to earlier, timed-out requests
                break
        if not reply["ok"]:
            raise CtlError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    def wait_swap(self, swap: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Poll ``status`` until the model hot-swap ``swap`` (the id ``model.load`` returned)
        has switched (its last event) or failed (:class:`CtlError` with the reason)."""
        deadline = time.monotonic() + timeout_s
        while True:
            last = self.call("status").get("last_swap") or {}
            if last.get("swap") == swap:
                if last["state"] == "failed":
                    error = last.get("error") or {}
                    raise CtlError(error.get("code", "model"), error.get("message", "failed"))
                return dict(last)
            if time.monotonic() > deadline:
                raise CtlError("timeout", f"model swap {swap} did not finish in {timeout_s:g} s")
            time.sleep(0.1)

    def close(self) -> None:
        self.sock.close(0)


def add_parser(sub: Any) -> None:
    listing = "\n".join(f"  {c.name:<12} {c.help} ({c.role})" for c in protocol.COMMANDS.values())
    ctl = sub.add_parser(
        "ctl",
        help="talk to a running daemon over its control socket",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands (and the role each needs):\n{listing}\n  watch        print live "
        "telemetry and events",
    )
    ctl.add_argument("--endpoint", help="control endpoint (default: ipc in the runtime directory)")
    ctl.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for an answer (default: %(default)g)",
    )
    ctl.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ctl.add_argument(
        "--wait",
        action="store_true",
        help="model.load: wait until the new model runs, or the swap fails (exit code 65)",
    )
    ctl.add_argument("--server-key", type=Path, help="server public key file (tcp + CURVE)")
    ctl.add_argument("--client-key", type=Path, help="client secret key file (tcp + CURVE)")
    ctl.add_argument("command", help=f"one of: watch, {', '.join(protocol.COMMANDS)}")
    ctl.add_argument("args", nargs="*", help="KEY=VALUE arguments (or one positional value)")
    ctl.set_defaults(func=cmd_ctl)


# path arguments taken relative to where the user is (the daemon runs elsewhere);
# a screenshot's relative name goes to the daemon's screenshots folder instead
CLIENT_PATHS = {"model.load": ("path",), "jobs.submit": ("input", "output", "model")}


def parse_args(command: str, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as TOML, else plain strings), the first of them may be
    the command's positional value (``model.load M.onnx index=1``)."""
    if command == "config.set" and len(items) == 1 and "=" in items[0]:
        key, _, raw = items[0].partition("=")
        return {"key": key, "value": config.parse_value(key, raw)}
    out: dict[str, Any] = {}
    if items and "=" not in items[0] and command in POSITIONAL:  # model.load M.onnx index=1
        out, items = {POSITIONAL[command]: items[0]}, items[1:]
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CtlError(protocol.BAD_ARGS, f"argument {item!r}: expected KEY=VALUE")
        out[key] = config.toml_or_str(raw)
    for key in CLIENT_PATHS.get(command, ()):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    return out


def default_endpoint() -> str:
    return f"ipc://{config.load().paths.runtime() / 'control.sock'}"


def check_endpoint(endpoint: str) -> None:
    """An ``ipc://`` endpoint whose socket file is missing means no daemon: say so now
    (ZeroMQ would wait for one to appear until the timeout)."""
    path = Path(endpoint.removeprefix("ipc://"))
    abstract = str(path).startswith("@")  # Linux's abstract namespace has no file
    if endpoint.startswith("ipc://") and not abstract and not path.exists():
        raise CtlError(
            protocol.UNAVAILABLE,
            f"no daemon at {endpoint}: {path} does not exist; start one (echod run) or name "
            "its socket (--endpoint, or the same paths.runtime_dir / $RUNTIME_DIRECTORY)",
        )


def cmd_ctl(args: argparse.Namespace) -> int:
    endpoint = args.endpoint or default_endpoint()
    if args.args and f"{args.command}.{args.args[0]}" in protocol.COMMANDS:
        # two words for a dotted command: `echod ctl dicom status` = `echod ctl dicom.status`
        args.command, args.args = f"{args.command}.{args.args[0]}", args.args[1:]
    try:
        check_endpoint(endpoint)
        if args.command == "watch":
            return watch(endpoint, args)
        client = Client(endpoint, args.timeout, args.server_key, args.client_key)
        try:
            result = client.call(args.command, parse_args(args.command, args.args))
            if args.wait and args.command == "model.load":
                result = client.wait_swap(result["swap"], max(args.timeout, 120.0))
        finally:
            client.close()
    except CtlError as e:
        print(f"echod ctl: {e.code}: {e.message}", file=sys.stderr)
        return EXIT.get(e.code, 1)
    print(json.dumps(result) if args.json else human.render(result))
    return 0


def watch(endpoint: str, args: argparse.Namespace) -> int:
    """Print telemetry and events as they come (Ctrl-C ends)."""
    client = Client(endpoint, args.timeout, args.server_key, args.client_key)
    try:
        pub = client.call("ping")["telemetry"]
    finally:
        client.close()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    Client._curve(sock, args.server_key, args.client_key)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(pub)
    try:
        while True:
            topic, body = sock.recv_multipart()
            data = json.loads(body)["result"]
            if args.json:
                print(json.dumps({"topic": topic.decode(), **data}), flush=True)
            else:
                print(f"{topic.decode():<10} {_brief(data)}", flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close(0)


def _brief(data: dict[str, Any]) -> str:
    """One line for a telemetry message or an event."""
    if "fps" not in data:
        return human.cell(data)
    lat, cell = data.get("latency_ms") or {}, human.cell
    return (
        f"{data.get('state')} {cell(data.get('fps'))} fps latency p50 {cell(lat.get('p50'))} ms "
        f"p99 {cell(lat.get('p99'))} ms frames {cell(data.get('frames'))} "
        f"dropped {cell(data.get('dropped'))}"
    )
