"""Seeded hostile control requests for the fuzzer (tests/test_control.py).

:func:`hostile_requests` yields the message parts of one request at a time,
every shape the issue names, in a fixed order for a seed: binary garbage, text,
wrong encodings (UTF-16/32, Latin-1, a BOM), deep nesting, integers over 4,300
digits, NaN and Infinity, NUL bytes and lone surrogates, wrong types and
unknown keys in every field, huge strings, truncated and non-object JSON,
duplicate keys, multipart messages, and well-formed requests of every command
with hostile arguments.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

from daemon import protocol
from daemon.commands import RUNTIME_SETTINGS

ENCODINGS = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be", "latin-1", "utf-8-sig")
ARG_NAMES = ("key", "value", "path", "engine", "device", "job", "kind", "input", "state", "x")


def hostile_requests(seed: int, n: int, max_bytes: int) -> Iterator[list[bytes]]:
    """``n`` requests (each a list of message parts) for a server answering up to
    ``max_bytes``; nothing over 16 times that (ZeroMQ would drop the connection)."""
    rng = random.Random(seed)
    gen = _Generator(rng, max_bytes)
    shapes: list[Callable[[], bytes]] = [
        gen.garbage,
        gen.text,
        gen.envelope,
        gen.envelope,
        gen.envelope,
        gen.command,
        gen.command,
        gen.command,
        gen.encoded,
        gen.deep,
        gen.huge_int,
        gen.constant,
        gen.surrogate,
        gen.huge_string,
        gen.not_an_object,
        gen.truncated,
        gen.duplicate_keys,
        lambda: b"",
        lambda: b"{" + b" " * rng.randint(max_bytes, 3 * max_bytes) + b"}",
    ]
    for _ in range(n):
        if rng.random() < 0.05:
            yield [rng.choice(shapes)() for _ in range(rng.randint(2, 4))]
        else:
            yield [rng.choice(shapes)()]


class _Generator:
    def __init__(self, rng: random.Random, max_bytes: int) -> None:
        self.rng = rng
        self.max_bytes = max_bytes

    # -- values -------------------------------------------------------------------------

    def string(self) -> str:
        r = self.rng
        return r.choice(
            [
                "",
                "x" * r.randint(1, 40),
                "".join(chr(r.randint(1, 0x2FFF)) for _ in range(r.randint(1, 20))),
                "a\0b",
                "/tmp/shot\0.png",
                "../../../etc/passwd",
                "/etc/shadow",
                "now.png",
                "~/x.onnx",
                "/",
                "." * r.randint(1, 4),
                "%s%n%x" * 3,
                "\u202e\ufeff\u200b",
                r.choice(list(RUNTIME_SETTINGS)),
                r.choice(list(protocol.COMMANDS)),
            ]
        )

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**300, r.randint(-9, 9)])
        if kind == 3:
            return r.choice([0.0, -0.0, 1e308, -1e-308, 3.5, 1e-320])
        if kind in (4, 5):
            return self.string()
        if kind in (6, 7):
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.string(): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=self.rng.random() < 0.5).encode(
            "utf-8", "surrogatepass"
        )

    # -- shapes -------------------------------------------------------------------------

    def garbage(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, 300))

    def text(self) -> bytes:
        return self.string().encode("utf-8", "surrogatepass")

    def envelope(self) -> bytes:
        """Every field valid or of a wrong type; sometimes fields missing or unknown ones."""
        r = self.rng
        obj: dict[str, Any] = {
            "v": 1 if r.random() < 0.6 else self.value(),
            "id": str(r.randint(0, 10**6)) if r.random() < 0.6 else self.value(),
            "cmd": r.choice(list(protocol.COMMANDS)) if r.random() < 0.6 else self.value(),
            "args": self.args() if r.random() < 0.6 else self.value(),
        }
        for key in list(obj):
            if r.random() < 0.1:
                del obj[key]
        if r.random() < 0.2:
            obj[self.string() or "extra"] = self.value()
        return self.dumps(obj)

    def args(self) -> dict[str, Any]:
        r = self.rng
        return {r.choice(ARG_NAMES): self.value() for _ in range(r.randint(0, 3))}

    def command(self) -> bytes:
        """A well-formed request of any command, its arguments hostile."""
        r = self.rng
        cmd = r.choice(list(protocol.COMMANDS))
        args: dict[str, Any] = self.args()
        if cmd == "config.set":
            args = {"key": r.choice([*RUNTIME_SETTINGS, self.string()]), "value": self.value()}
        elif cmd in ("model.load", "screenshot"):
            args = {"path": self.string() or "x"}
        elif cmd == "config.get":
            args = {"key": self.string()}
        return self.dumps({"v": 1, "id": str(r.randint(0, 10**6)), "cmd": cmd, "args": args})

    def encoded(self) -> bytes:
        req = {"v": 1, "id": "é-1", "cmd": "ping", "args": {}}
        return json.dumps(req, ensure_ascii=False).encode(self.rng.choice(ENCODINGS))

    def deep(self) -> bytes:
        r = self.rng
        depth = r.choice([33, 100, 1_000, 5_000, r.randint(1, 60)])
        nested = (
            b"[" * depth + b"]" * depth
            if r.random() < 0.5
            else b'{"a":' * depth + b"1" + b"}" * depth
        )
        if r.random() < 0.5:
            return nested
        return (
            b'{"v": 1, "id": "d", "cmd": "config.set", "args": {"key": "source.paused", "value": '
            + nested
            + b"}}"
        )

    def huge_int(self) -> bytes:
        digits = str(self.rng.randint(1, 9)).encode() * self.rng.randint(4_000, 6_000)
        field = self.rng.choice([b'"v": ', b'"id": ', b'"args": {"value": '])
        closing = b"}" if field.startswith(b'"args"') else b""
        return b'{"cmd": "ping", ' + field + digits + closing + b"}"

    def constant(self) -> bytes:
        c = self.rng.choice([b"NaN", b"Infinity", b"-Infinity"])
        return (
            b'{"v": 1, "id": "c", "cmd": "config.set", "args": {"key": "display.opacity", "value": '
            + c
            + b"}}"
        )

    def surrogate(self) -> bytes:
        bad = self.rng.choice([b"\\ud800", b"\\udfff", b"\\udc80x", b"\\ud83d"])
        return (
            b'{"v": 1, "id": "'
            + bad
            + b'", "cmd": "screenshot", "args": {"path": "a'
            + bad
            + b'.png"}}'
        )

    def huge_string(self) -> bytes:
        n = self.rng.choice(
            [4_097, 10_000, self.max_bytes - 100, self.max_bytes + 10, 5 * self.max_bytes]
        )
        field = self.rng.choice(["id", "cmd", "path", "value"])
        req: dict[str, Any] = {"v": 1, "id": "h", "cmd": "screenshot", "args": {"path": "x.png"}}
        if field in ("id", "cmd"):
            req[field] = "x" * n
        else:
            req["args"] = (
                {"key": "display.screenshot_dir", "value": "y" * n}
                if field == "value"
                else {"path": "p" * n}
            )
            req["cmd"] = "config.set" if field == "value" else "screenshot"
        return self.dumps(req)

    def not_an_object(self) -> bytes:
        return self.dumps(self.rng.choice([[], [1, 2], "ping", 1, None, True, 1.5]))

    def truncated(self) -> bytes:
        whole = self.command()
        return whole[: self.rng.randint(0, len(whole) - 1)]

    def duplicate_keys(self) -> bytes:
        return (
            b'{"v": 1, "v": 2, "id": "x", "id": 7, "cmd": "ping", "cmd": "shutdown", '
            b'"args": {}, "args": []}'
        )
