"""What a SIGHUP reload may change while echod runs, and what waits for a restart.

:func:`plan` compares the running configuration with the file as it is now and
sorts every changed setting: those that can change safely are applied (the log
level in every process, the display's run-time settings, the control socket's
roots, roles, limits and client keys, the job queue's limits); the others
(the source, the model, the rings, the endpoints...) are named as not reloaded:
they need a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from daemon.config import DISPLAY_RUNTIME, Config

# setting -> who applies it: "all" (every process's log level), "sink" (the display's
# "set"), "control" (the control server's settings), "jobs" (the submission checks)
RELOADABLE: dict[str, str] = {
    "logging.level": "all",
    **{f"display.{k}": "sink" for k in DISPLAY_RUNTIME},
    "control.roots": "control",
    "control.ipc_role": "control",
    "control.clients_dir": "control",
    "control.telemetry_interval_s": "control",
    "control.max_message_bytes": "control",
    "offline.max_queued": "jobs",
    "offline.max_input_gb": "jobs",
}


@dataclass
class Plan:
    """The settings a reload changes, by who applies them, and those it leaves."""

    config: Config  # the running configuration with the reloadable changes made
    apply: dict[str, dict[str, Any]] = field(default_factory=dict)  # who -> {key: value}
    not_reloaded: list[str] = field(default_factory=list)

    @property
    def applied(self) -> list[str]:
        return [key for changes in self.apply.values() for key in changes]


def plan(running: Config, wanted: Config) -> Plan:
    """Sort the settings that differ between ``running`` and ``wanted``."""
    now, new = flat(running), flat(wanted)
    changed = [k for k in new if new[k] != now.get(k)]
    merged = running.model_dump()
    out = Plan(running)
    for key in changed:
        who = RELOADABLE.get(key)
        if who is None:
            out.not_reloaded.append(key)
            continue
        out.apply.setdefault(who, {})[key] = new[key]
        section, name = key.split(".")
        merged[section][name] = new[key]
    out.config = Config.model_validate(merged)
    return out


def flat(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Every setting by its dotted name (tables are walked, values are leaves)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out
