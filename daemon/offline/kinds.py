"""Job kinds by name, imported only where a job of that kind is checked or run."""

from __future__ import annotations

import difflib
import importlib

from daemon.errors import ConfigError
from daemon.offline.kind import JobKind

KINDS: dict[str, str] = {
    "ct": "daemon.offline.ct:CtJob",
    "echo-volume": "daemon.offline.echo_volume:EchoVolume",
    "wsi": "daemon.offline.wsi:WsiJob",
}


def kind_class(name: str) -> type[JobKind]:
    target = KINDS.get(name)
    if target is None:
        near = difflib.get_close_matches(name, KINDS, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"kinds: {', '.join(KINDS)}"
        raise ConfigError(f"unknown job kind {name!r}: {hint}")
    module, _, attr = target.partition(":")
    cls: type[JobKind] = getattr(importlib.import_module(module), attr)
    return cls
