"""What each control command does, for a running :class:`~daemon.supervisor.Supervisor`.

Reads (ping, status, config.get, engines, models) are answered in the control
thread from the supervisor's snapshots; changes (config.set, model.load,
screenshot) run in the supervisor's own thread through ``in_main``, so they
never race its bookkeeping of the stages. Neither thread ever waits: a change
returns a Future, and the control server replies when it resolves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import __version__, protocol
from daemon.config import RUNTIME_SETTINGS, ConfigError, child, validate_change
from daemon.paths import check_folder, check_new_file, confine
from daemon.protocol import Parsed, ProtocolError, Role

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor


def then(future: Future[Any], fn: Callable[[Any], Any]) -> Future[Any]:
    """A Future of ``fn(result)`` once ``future`` succeeds (its error otherwise); ``fn``
    runs in the thread that resolves ``future``."""
    out: Future[Any] = Future()

    def step(f: Future[Any]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:
            out.set_exception(e)

    future.add_done_callback(step)
    return out


# run-time settings that name a folder: confined to the screenshot roots, like `screenshot`
PATH_SETTINGS = frozenset({"display.screenshot_dir"})


class ControlCommands:
    """The control server's handler: one method per command (``config.set`` -> ``config_set``)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    def __call__(self, req: Parsed, role: Role) -> Any:
        name = req.command.name
        return getattr(self, name.replace(".", "_"))(req.args, role)

    # -- reads ----------------------------------------------------------------------

    def ping(self, args: Any, role: Role) -> dict[str, Any]:
        return {
            "pong": True,
            "version": __version__,
            "uptime_s": self.sup.uptime(),
            "telemetry": self.sup.control.telemetry_endpoint,
        }

    def status(self, args: Any, role: Role) -> dict[str, Any]:
        return self.sup.status()

    def config_get(self, args: protocol.ConfigGetArgs, role: Role) -> Any:
        node: Any = self.sup.config.model_dump(mode="json")
        for part in [p for p in args.key.split(".") if p]:
            try:
                node = child(node, part)  # model.1.path: the second model's
            except (LookupError, TypeError):
                raise ConfigError(f"no setting '{args.key}'") from None
        return node

    def engines(self, args: Any, role: Role) -> list[dict[str, Any]]:
        from daemon.engines.registry import probe_all

        return [dataclasses.asdict(p) for p in probe_all()]

    def models(self, args: Any, role: Role) -> list[dict[str, Any]]:
        from daemon.models import list_models

        return [m.to_dict() for m in list_models(self.sup.config.paths.cache())]

    # -- changes ----------------------------------------------------------------------

    def config_set(self, args: protocol.ConfigSetArgs, role: Role) -> Future[Any]:
        stage = RUNTIME_SETTINGS.get(args.key)
        if stage is None:
            raise ConfigError(
                f"'{args.key}' cannot change while running (restart to change it); "
                f"run-time settings: {', '.join(RUNTIME_SETTINGS)}"
            )
        args = args.model_copy(update={"value": self.confined(args.key, args.value)})
        changed = validate_change(self.sup.config, args.key, args.value)
        if stage == "sink" and self.sup.workers["sink"].spec.kind != "display":
            raise ProtocolError(
                protocol.UNAVAILABLE,
                f"'{args.key}' applies to the display, and none is running (headless)",
            )
        sup = self.sup

        def applied(result: Any) -> dict[str, Any]:  # in the supervisor's thread
            sup.config = changed
            sup.publish("config", {"key": args.key, "value": args.value})
            return {"key": args.key, "value": args.value, "applied": result}

        set_args = {"key": args.key, "value": args.value}
        return sup.in_main(lambda: then(sup.call(sup.workers[stage], "set", set_args), applied))

    def model_load(self, args: protocol.ModelLoadArgs, role: Role) -> Future[Any]:
        """Returns at once with the swap's id; its outcome is published on ``model``."""
        stage = self.infer_stage(args)
        path = confine(args.path, self.roots("models"), what="model")
        return self.sup.in_main(
            lambda: self.sup.begin_swap(path, args.engine, args.device, stage)
        )

    def infer_stage(self, args: protocol.ModelLoadArgs) -> str:
        """The infer stage a swap replaces the model of: ``stage``, or model ``index``'s,
        else the first model's."""
        from daemon.pipeline import infer_stage

        running = [w.spec.name for w in self.sup.infer_workers()]
        if not running:
            raise ProtocolError(protocol.UNAVAILABLE, "no live pipeline runs: no model to swap")
        by_index = None if args.index is None else infer_stage(args.index)
        if args.stage and by_index and args.stage != by_index:
            raise ProtocolError(
                protocol.BAD_ARGS,
                f"index {args.index} is stage {by_index}, not {args.stage}: give one of them",
            )
        wanted = args.stage or by_index or running[0]
        if wanted not in running:
            models = ", ".join(f"{i} ({name})" for i, name in enumerate(running))
            raise ProtocolError(
                protocol.BAD_ARGS,
                f"no model {args.stage or args.index} runs here; models: {models}",
            )
        return wanted

    def screenshot(self, args: protocol.ScreenshotArgs, role: Role) -> Future[Any]:
        sink = self.sup.workers["sink"]
        if sink.spec.kind != "display":
            raise ProtocolError(
                protocol.UNAVAILABLE,
                "no display is running (headless): screenshots need the display stage",
            )
        path = check_new_file(self.in_screenshots(args.path, "screenshot"), "screenshot")
        return self.sup.in_main(lambda: self.sup.call(sink, "screenshot", {"path": str(path)}))

    # -- offline jobs ---------------------------------------------------------------

    def jobs_submit(self, args: protocol.JobSubmitArgs, role: Role) -> Future[Any]:
        """Answered once the job is committed to the store (its id), or refused."""
        return self.sup.jobs.submit(args, "local", self.roots, self.sup.publish)

    def jobs_get(self, args: protocol.JobIdArgs, role: Role) -> dict[str, Any]:
        return self.sup.jobs.get(args.job)

    def jobs_list(self, args: protocol.JobListArgs, role: Role) -> list[dict[str, Any]]:
        return self.sup.jobs.list(args.state, args.limit)

    def jobs_result(self, args: protocol.JobIdArgs, role: Role) -> dict[str, Any]:
        return self.sup.jobs.result(args.job)

    def jobs_cancel(self, args: protocol.JobIdArgs, role: Role) -> Future[Any]:
        """Takes effect at once: a queued job never starts, a running one's worker is
        stopped and its partial outputs removed."""
        return self.sup.in_main(lambda: self.sup.cancel_job(args.job))

    # -- the DICOM node ---------------------------------------------------------------

    def dicom_status(self, args: protocol.DicomStatusArgs, role: Role) -> dict[str, Any]:
        if self.sup.dicom is None:
            raise ProtocolError(
                protocol.UNAVAILABLE, "the DICOM node is off: set dicom.enabled = true"
            )
        return dict(self.sup.dicom.status(args.job))

    def shutdown(self, args: Any, role: Role) -> dict[str, Any]:
        self.sup.request_stop(f"shutdown requested by a {role} client")
        return {"stopping": True}

    def in_screenshots(self, path: str, what: str) -> Path:
        """``path`` confined to the screenshot roots, resolved; a relative one (``now.png``)
        is taken in the state directory's screenshots/ (made if missing)."""
        folder = self.sup.config.paths.state() / "screenshots"
        p = Path(path).expanduser()
        if not p.is_absolute():
            folder.mkdir(parents=True, exist_ok=True)
            p = folder / p
        return confine(p, self.roots("screenshots"), what=what, must_exist=False)

    def confined(self, key: str, value: Any) -> Any:
        """A path-valued setting's value confined like a path argument and resolved (a
        relative folder is taken in the screenshots folder); other values as they are."""
        if key not in PATH_SETTINGS or not isinstance(value, str) or not value:
            return value
        what = f"setting '{key}'"
        return str(check_folder(self.in_screenshots(value, what), what))

    def roots(self, kind: str) -> list[Path]:
        """Folders a path argument of ``kind`` may lie in."""
        from daemon.models import BUNDLED

        cfg = self.sup.config
        roots = [Path(r) for r in cfg.control.roots]
        if kind == "models":
            roots += [BUNDLED, cfg.paths.cache() / "models"]
        elif kind == "screenshots":
            roots.append(cfg.paths.state() / "screenshots")
        elif kind == "outputs":
            roots.append(cfg.paths.results())
        return roots
