"""The control protocol, version 1: JSON requests and replies over ZeroMQ.

Request: ``{"v": 1, "id": "...", "cmd": "...", "args": {...}}``.
Reply:   ``{"v": 1, "id": "...", "ok": true, "result": ...}`` or
         ``{"v": 1, "id": "...", "ok": false, "error": {"code": "...", "message": "..."}}``.

Every command has a typed argument model and a permission; parsing a request
either yields a :class:`Request` with validated ``args`` or raises
:class:`ProtocolError` with a stable code and a message that says what to fix.
This module is pure (no sockets): the server and the client both use it.
"""

from __future__ import annotations

import difflib
import json
import reprlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

VERSION = 1
Role = Literal["read", "control", "admin"]
ROLES: tuple[Role, ...] = ("read", "control", "admin")
MAX_DEPTH = 32
"""Deepest nesting of arrays and objects in a request (none needs more than 3)."""

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


def brief(value: Any) -> str:
    """``repr(value)`` cut short (long strings, deep nesting), for messages and logs."""
    return _REPR.repr(value)


class ProtocolError(Exception):
    """A request that cannot be served: ``code`` is stable, ``message`` says what to fix."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# stable error codes of the protocol itself (EchodError codes travel as they are)
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"
BAD_VERSION = "bad_version"
TOO_LARGE = "too_large"
UNKNOWN_COMMAND = "unknown_command"
BAD_ARGS = "bad_args"
FORBIDDEN = "forbidden"
UNAVAILABLE = "unavailable"
NOT_FOUND = "not_found"
INTERNAL = "internal"


def _no_nul(path: str) -> str:
    if "\0" in path:
        raise ValueError("a path cannot contain a NUL byte")
    return path


PathArg = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]
"""A path argument: 1 to 4096 characters, no NUL (the operating system cannot take one)."""


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NoArgs(Args):
    pass


class ConfigGetArgs(Args):
    key: str = Field("", description="dotted setting name; empty = the whole configuration")


class ConfigSetArgs(Args):
    key: str = Field(min_length=1, description="dotted setting name, e.g. display.overlay")
    value: Any = Field(description="new value, validated like the configuration file")


class ModelLoadArgs(Args):
    path: PathArg = Field(description="model file inside a configured model root")
    engine: str = ""
    device: str = ""
    index: int | None = Field(
        None, ge=0, description="which model to swap ([[model]] order, 0 = the first)"
    )
    stage: str = Field(
        "", max_length=64, description="or its infer stage (infer, infer-1...); neither: the first"
    )


class ScreenshotArgs(Args):
    path: PathArg = Field(
        description="PNG file inside a configured output root; a relative path is taken "
        "in the state directory's screenshots/"
    )


class JobSubmitArgs(Args):
    kind: str = Field(min_length=1, max_length=64, description="echo-volume, ct, wsi")
    input: PathArg = Field(description="file or folder inside control.roots")
    output: str = Field(
        "", max_length=4096, description="folder for the job's output folder; empty: state dir"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="the kind's options")
    model: str = Field("", max_length=4096, description="model file; empty: the kind's own")
    engine: str = Field("", max_length=64)
    device: str = Field("", max_length=64, description="empty: model.device")
    key: str = Field("", max_length=128, description="idempotency key: same key, same job")

    @field_validator("output", "model")
    @classmethod
    def _paths(cls, v: str) -> str:
        return _no_nul(v) if v else v


class JobIdArgs(Args):
    job: str = Field(min_length=1, max_length=64)


class JobListArgs(Args):
    state: Literal["", "queued", "running", "done", "failed", "cancelled"] = ""
    limit: int = Field(100, ge=1, le=10_000)


class DicomStatusArgs(Args):
    job: str = Field("", max_length=64, description="that job's sends (all states)")


@dataclass(frozen=True)
class Command:
    name: str
    args: type[Args]
    role: Role
    help: str


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("ping", NoArgs, "read", "is the daemon answering"),
        Command("status", NoArgs, "read", "stages, rates, latency, drops, engine, resources"),
        Command("config.get", ConfigGetArgs, "read", "a setting or the whole configuration"),
        Command("config.set", ConfigSetArgs, "control", "change a run-time setting"),
        Command("engines", NoArgs, "read", "inference engines and why unavailable"),
        Command("models", NoArgs, "read", "bundled and cached models"),
        Command("model.load", ModelLoadArgs, "control", "hot-swap the live model"),
        Command("screenshot", ScreenshotArgs, "control", "write the display to a PNG"),
        Command("jobs.submit", JobSubmitArgs, "control", "queue an offline job"),
        Command("jobs.get", JobIdArgs, "read", "one job's state and progress"),
        Command("jobs.list", JobListArgs, "read", "jobs, newest first"),
        Command("jobs.cancel", JobIdArgs, "control", "cancel a queued or running job"),
        Command("jobs.result", JobIdArgs, "read", "a finished job's manifest"),
        Command("dicom.status", DicomStatusArgs, "read", "DICOM node: associations, series, sends"),
        Command("shutdown", NoArgs, "admin", "stop the daemon"),
    )
}


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    v: int
    id: str = Field(min_length=1, max_length=128)
    cmd: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Parsed:
    id: str
    command: Command
    args: Args


def parse(raw: bytes, max_bytes: int) -> Parsed:
    """Validate one request; :class:`ProtocolError` says what is wrong and how to fix it."""
    if len(raw) > max_bytes:
        raise ProtocolError(
            TOO_LARGE,
            f"request of {len(raw)} bytes is over the limit of "
            f"{max_bytes} bytes: send less (paths, not data)",
        )
    obj = _decode(raw)
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, f"request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id") if isinstance(obj.get("id"), str) else None
    if "v" in obj and obj["v"] != VERSION:
        raise ProtocolError(
            BAD_VERSION,
            f"protocol version {brief(obj['v'])} is not supported: this daemon speaks v={VERSION}",
            rid,
        )
    try:
        req = Request.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError(BAD_REQUEST, _describe(e, "request"), rid) from None
    command = COMMANDS.get(req.cmd)
    if command is None:
        near = difflib.get_close_matches(req.cmd, COMMANDS, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"commands: {', '.join(COMMANDS)}"
        raise ProtocolError(UNKNOWN_COMMAND, f"unknown command '{req.cmd}': {hint}", req.id)
    try:
        args = command.args.model_validate(req.args)
    except ValidationError as e:
        raise ProtocolError(BAD_ARGS, f"{req.cmd}: {_describe(e, 'args')}", req.id) from None
    return Parsed(req.id, command, args)


def _decode(raw: bytes) -> Any:
    """The JSON value of a request: UTF-8 only (``json.loads`` would guess UTF-16 or 32 from
    bytes), no NaN or Infinity, integers of at most 4300 digits, nesting of at most
    :data:`MAX_DEPTH`, strings of Unicode scalar values; else :class:`ProtocolError`."""
    example = 'send one JSON object like {"v": 1, "id": "1", "cmd": "ping"}'
    if b"\0" in raw:  # never in UTF-8 JSON; always in UTF-16/32 text
        raise ProtocolError(
            BAD_JSON, f"request has NUL bytes (UTF-16 or UTF-32?): send UTF-8 only; {example}"
        )
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ProtocolError(
            BAD_JSON,
            f"request is not UTF-8 (byte {e.start} is not; UTF-16/32 are refused): {example}",
        ) from None
    except RecursionError:
        raise ProtocolError(
            BAD_JSON, f"request is nested too deeply (at most {MAX_DEPTH} levels): {example}"
        ) from None
    except ValueError as e:  # JSONDecodeError, integers over 4300 digits, NaN
        raise ProtocolError(BAD_JSON, f"request is not valid JSON ({e}): {example}") from None
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(
                    BAD_JSON, "request has a string with a lone surrogate (\\ud800-\\udfff escapes)"
                ) from None
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ProtocolError(
                    BAD_REQUEST, f"request is nested deeper than {MAX_DEPTH} levels: {example}"
                )
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def allowed(role: Role, command: Command) -> bool:
    return ROLES.index(role) >= ROLES.index(command.role)


def _describe(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or where
    if err["type"] == "extra_forbidden":
        return f"unknown field '{where}.{field}'"
    if err["type"] == "missing":
        return f"missing field '{where}.{field}'"
    return f"field '{where}.{field}': {err['msg'].lower()} (got {brief(err.get('input'))})"


def request(cmd: str, args: dict[str, Any] | None = None, *, request_id: str) -> bytes:
    return json.dumps({"v": VERSION, "id": request_id, "cmd": cmd, "args": args or {}}).encode()


def ok(request_id: str | None, result: Any) -> bytes:
    return json.dumps(
        {"v": VERSION, "id": request_id, "ok": True, "result": result}, default=_jsonable
    ).encode()


def error(request_id: str | None, code: str, message: str) -> bytes:
    return json.dumps(
        {"v": VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}
    ).encode()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
