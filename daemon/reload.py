"""What a SIGHUP reload may change while echod runs, and what waits for a restart.

:func:`plan` compares the running configuration with the file as it is now and
sorts every changed setting: those that can change safely are applied (the log
level in every process, the display's run-time settings, the control socket's
roots, roles, limits and client keys, the job queue's limits); the others
(the source, the model, the rings, the endpoints...) are named as not reloaded:
they need a restart. :class:`Reload` carries one out for the supervisor: systemd
hears RELOADING=1 at once and READY=1 when every stage has taken its part.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from daemon import logs
from daemon.config import DISPLAY_RUNTIME, Config, model_key
from daemon.errors import ConfigError, EchodError
from daemon.notify import notify, reloading

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor

log = logging.getLogger(__name__)

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


# run-time state an operator set over the control socket, not configuration: a reload keeps it
KEPT = frozenset({"source.paused"})


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
    changed = [k for k in new if new[k] != now.get(k) and k not in KEPT]
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
    """Every setting by its dotted name (tables are walked, values are leaves; the models
    as ``model.path``, ``model.1.path``...)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(flat(value, f"{prefix}{name}."))
        elif isinstance(model, Config) and name == "models":
            for i, m in enumerate(value):
                out.update(flat(m, f"{model_key(i)}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


class Reload:
    """One reload, begun in the supervisor's thread: :meth:`finished` is polled by its loop
    (nothing here waits) and says what happened once every stage has answered."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.plan: Plan | None = None
        self.calls: list[tuple[str, Future[Any]]] = []
        reloading()
        try:
            if sup.loader is None:
                raise ConfigError("this daemon was started without a configuration to re-read")
            wanted = sup.loader()
        except EchodError as e:
            log.error("reload refused, the configuration is as it was: %s", e)
            notify("READY=1", f"STATUS=reload refused: {e}")
            return
        self.plan = plan(sup.config, wanted)
        sup.config = self.plan.config
        self._apply(self.plan.apply)

    def _apply(self, changes: dict[str, dict[str, Any]]) -> None:
        sup = self.sup
        level = changes.get("all", {}).get("logging.level")
        if level is not None:
            logs.set_level(level)
            change = {"key": "logging.level", "value": level}
            self.calls += [
                ("logging.level", sup.call(w, "set", change)) for w in sup.live_workers()
            ]
        sink = sup.workers.get("sink")
        if sink is not None and sink.spec.kind == "display" and sink.alive:
            for key, value in changes.get("sink", {}).items():
                self.calls.append((key, sup.call(sink, "set", {"key": key, "value": value})))
        if sup.control is not None:
            try:
                sup.control.reload(sup.config.control)
            except ConfigError as e:
                log.error("reload: the control socket keeps its client keys: %s", e)
                failed: Future[Any] = Future()
                failed.set_exception(e)
                self.calls.append(("control.clients_dir", failed))
        if sup.jobs is not None:
            sup.jobs.config = sup.config

    def finished(self) -> bool:
        """Once every stage has answered: say what was applied and what waits for a restart
        (log, the ``config`` topic, READY=1 with STATUS=); True from then on."""
        if self.plan is None:
            return True
        if not all(f.done() for _, f in self.calls):
            return False
        failed = sorted({key for key, f in self.calls if f.exception() is not None})
        applied = [k for k in self.plan.applied if k not in failed]
        skipped = self.plan.not_reloaded
        parts = [f"applied {', '.join(applied)}" if applied else "no run-time setting changed"]
        if failed:
            parts.append(f"failed {', '.join(failed)} (see above)")
        if skipped:
            parts.append(f"not reloaded (restart echod to apply): {', '.join(skipped)}")
        log.info("reload: %s", "; ".join(parts))
        self.sup.publish(
            "config", {"reload": {"applied": applied, "failed": failed, "not_reloaded": skipped}}
        )
        self.sup.say(f"reloaded: {'; '.join(parts)}", ready=True)
        self.plan = None
        return True
