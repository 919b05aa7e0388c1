"""The ``echod`` command line. The only place that configures logging."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from daemon import __version__, config, ctl, human, jobs_cli, logs, service
from daemon.errors import EchodError
from daemon.notify import notify

log = logging.getLogger("echod")

# run's flags -> the config setting each one overrides (one place for the mapping)
RUN_FLAGS: dict[str, str] = {
    "source": "source.uri",
    "pace": "source.pace",
    "fps": "source.fps",
    "frames": "source.frames",
    "mode": "pipeline.mode",
    "workers": "pipeline.workers",
    "model": "model.path",
    "engine": "model.engine",
    "device": "model.device",
    "control": "control.endpoint",
    "log_format": "logging.format",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    args.extra = extra  # a job kind's own options (echod submit)
    if extra and not getattr(args, "takes_options", False):
        # the subcommand's own usage, and the option it most likely meant
        getattr(args, "command_parser", parser).reject(extra)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away (| head) is found here, not at exit
        return code
    except EchodError as e:
        print(f"echod: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader is gone: stop quietly, as a program killed by SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


class Parser(argparse.ArgumentParser):
    """echod's argument parsers: no abbreviated options (``--headles`` is a typo, not
    ``--headless``), and an unknown option is answered with the nearest known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: list[str] = []
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.extend(action.option_strings)
        return action

    def reject(self, extra: list[str]) -> NoReturn:
        """Exit 2 with this parser's usage: ``extra`` are not its arguments."""
        hints = []
        for arg in extra:
            near = difflib.get_close_matches(arg.partition("=")[0], self.options, n=1)
            if arg.startswith("-") and near:
                hints.append(f"{arg}: did you mean {near[0]}?")
        self.error(f"unrecognized arguments: {' '.join(extra)}" + "".join(f"; {h}" for h in hints))


def _parser() -> Parser:
    p = Parser(prog="echod", description="Real-time ultrasound appliance daemon")
    p.add_argument("--version", action="version", version=f"echod {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the live pipeline (the systemd service's command)")
    run.add_argument("--config", type=Path, help="configuration file (default: config/echod.toml)")
    run.add_argument(
        "--source",
        help="'synthetic', igtl://HOST:PORT[/DEVICE] (a scanner), a recording "
        "(.mha/.mhd, .dcm, .nrrd), a folder of images, or 'none' (offline jobs only)",
    )
    run.add_argument("--pace", choices=["timestamps", "fps", "none"], help="frame pacing")
    run.add_argument("--fps", type=float, help="frame rate for --pace fps")
    run.add_argument("--frames", type=int, help="stop after N frames")
    run.add_argument(
        "--mode", choices=["newest", "all"], help="newest: real time; all: every frame"
    )
    run.add_argument("--workers", choices=["processes", "threads"], help="stage isolation")
    run.add_argument("--model", help="model file (default: the bundled ultrasound model)")
    run.add_argument("--engine", help="inference engine (default: best available)")
    run.add_argument("--device", help="engine device (default: cpu)")
    run.add_argument("--headless", action="store_true", help="no display: status lines only")
    run.add_argument("--control", help="control endpoint (default: ipc in the runtime directory)")
    run.add_argument(
        "--log-format",
        choices=["auto", "text", "journal", "json"],
        help="log lines: journald priorities, one JSON object each, or text (default: auto)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set source.loop=true (repeatable)",
    )
    run.add_argument("--json", action="store_true", help="print the run summary as JSON last")
    run.set_defaults(func=cmd_run)

    ctl.add_parser(sub)
    jobs_cli.add_parsers(sub)
    service.add_parser(sub)

    keys = sub.add_parser("keys", help="make CURVE key pairs for a tcp control endpoint")
    keys.add_argument(
        "--dir", type=Path, required=True, help="key folder (control.clients_dir's parent)"
    )
    keys.add_argument(
        "--client", metavar="NAME", help="make a client key (default: the server key)"
    )
    keys.add_argument("--role", choices=["read", "control", "admin"], default="control")
    keys.set_defaults(func=cmd_keys)

    cfg = sub.add_parser("config", help="print the effective configuration as TOML")
    cfg.add_argument("--config", type=Path, help="configuration file to validate and print")
    cfg.add_argument("--defaults", action="store_true", help="print the documented defaults")
    cfg.set_defaults(func=cmd_config)
    cfg_sub = cfg.add_subparsers(metavar="migrate")
    mig = cfg_sub.add_parser(
        "migrate", help="rewrite a configuration file of an earlier echod in this one's schema"
    )
    mig.add_argument("file", type=Path, help="the file (rewritten; the old one is kept as .bak)")
    mig.add_argument("--output", type=Path, help="write the migrated file here instead")
    mig.set_defaults(func=cmd_config_migrate, command_parser=mig)

    eng = sub.add_parser("engines", help="list the inference engines: available here, devices")
    eng.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    eng.set_defaults(func=cmd_engines)

    mod = sub.add_parser("models", help="list the bundled and cached models")
    mod.add_argument("--config", type=Path, help="configuration file (for the cache directory)")
    mod.add_argument("--json", action="store_true", help="print the models as a JSON list")
    mod.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="NAME",
        help="first generate this paper-size reference network into the cache (repeatable): "
        "unet2d-256, unet3d-32x256x256, inception-v3-512",
    )
    mod.set_defaults(func=cmd_models)
    mod_sub = mod.add_subparsers(metavar="ACTION")
    cal = mod_sub.add_parser(
        "calibrate",
        help="measure the model at f32, bf16/f16 and int8 (accuracy against f32, speed) and "
        "write the figures to its card; precision = 'auto' then runs the fastest within "
        "tolerance",
    )
    cal.add_argument("model", type=Path, help="the model file (its card is beside it)")
    cal.add_argument(
        "--data",
        default="phantom",
        help="'phantom' (held-out simulator frames with ground truth, the default) or a "
        "recording (a CT volume for a 3-D model; no ground truth: agreement with f32 only)",
    )
    cal.add_argument(
        "--frames",
        type=int,
        help="validation frames (default 300; a 3-D model's: 24 patches of 32x512x512)",
    )
    cal.add_argument(
        "--engine",
        action="append",
        default=[],
        help="engine to calibrate (repeatable; default: every engine that runs the model on "
        "the device here)",
    )
    cal.add_argument("--device", default="cpu", help="device (default cpu)")
    cal.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (best of)")
    cal.add_argument(
        "--tolerance", type=float, help="largest drop auto accepts (Dice; top-1 of a classifier)"
    )
    cal.set_defaults(func=cmd_calibrate, command_parser=cal)

    wrk = sub.add_parser(
        "workers", help="show the Dask cluster offline jobs run on: workers, models, tasks"
    )
    wrk.add_argument("--config", type=Path, help="configuration file (for offline.executor)")
    wrk.add_argument("--executor", help="the scheduler to ask instead, dask://HOST:PORT")
    wrk.add_argument("--json", action="store_true", help="print the cluster as JSON")
    wrk.set_defaults(func=cmd_workers)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
    return p


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings ``run``'s flags and ``--set`` items override, and where each was given
    (for error messages: a mistake is blamed on the flag, not on the file)."""
    out: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise config.ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. source.loop=true")
        out[key] = config.parse_value(key, raw)
        origins[key] = f"--set {key} (command line)"
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out[key] = value
            origins[key] = f"--{flag.replace('_', '-')} (command line)"
    engine = out.get("model.engine")
    if isinstance(engine, str) and ":" in engine:  # --engine NAME:DEVICE
        name, _, device = engine.partition(":")
        if args.device is not None and args.device != device:
            raise config.ConfigError(
                f"--engine {engine} names device {device!r} but --device says {args.device!r}"
            )
        out["model.engine"], out["model.device"] = name, device
        origins["model.device"] = origins["model.engine"]
    if args.headless:
        out["sink.headless"] = True
        origins["sink.headless"] = "--headless (command line)"
    return out, origins


def _setup_logging(settings: config.LoggingConfig) -> None:
    logs.setup(settings.level, settings.format, settings.repeat_s, stage="echod")


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.supervisor import Supervisor

    overrides = _overrides(args)

    def load() -> config.Config:  # at start and on SIGHUP
        return config.load(args.config, *overrides)

    _setup_logging(config.LoggingConfig())  # until the file says otherwise (its migration)
    cfg = load()
    _setup_logging(cfg.logging)
    try:
        summary = Supervisor(cfg, loader=load).run()
    except EchodError as e:
        notify(f"STATUS=failed: {e}")  # `systemctl status echod` shows why it stopped
        raise
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print("\n".join(human.run_summary(summary)), flush=True)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = config.Config() if args.defaults else config.load(args.config)
    print(config.to_toml(cfg), end="")
    return 0


def cmd_config_migrate(args: argparse.Namespace) -> int:
    """Read FILE as ``echod run`` would (older schemas migrated), check that the result
    loads, and write it: FILE itself (the old one kept as FILE.bak) or ``--output``."""
    from daemon import migrate

    data, was, notes = migrate.upgrade(config._read_toml(args.file), str(args.file))
    config._validated(data, {}, args.file, {})  # a setting that never existed: nothing written
    for note in notes:
        print(note)
    out = args.output or args.file
    if was == migrate.SCHEMA and out == args.file:
        print(f"{args.file} is schema {was} already: nothing to migrate")
        return 0
    if out == args.file:
        backup = args.file.with_name(args.file.name + ".bak")
        backup.write_bytes(args.file.read_bytes())
        print(f"kept the old file as {backup}")
    migrate.write(data, out, was)
    print(f"wrote {out} (schema {migrate.SCHEMA}; comments are not carried over)")
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    """One row per registered engine: name, version, available, devices, reason; then what
    each engine lacks for the devices it knows but cannot use here."""
    from daemon.engines import probe_all

    probes = probe_all()
    if args.json:
        rows = [
            {
                "name": p.name,
                "version": p.version,
                "available": p.available,
                "devices": list(p.devices),
                "reason": p.reason,
                "missing": list(p.missing),
            }
            for p in probes
        ]
        print(json.dumps(rows, indent=1))
        return 0
    table = [("ENGINE", "VERSION", "AVAILABLE", "DEVICES", "REASON")] + [
        (
            p.name,
            p.version or "-",
            "yes" if p.available else "no",
            ",".join(p.devices) or "-",
            p.reason,
        )
        for p in probes
    ]
    print("\n".join(human.table(table)))
    for p in probes:
        for note in p.missing:
            print(f"{p.name}: no {note}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Server: DIR/server.key(_secret). Client NAME: its public key goes to
    DIR/clients/ROLE/NAME.key (the allow-list), its secret to DIR/NAME.key_secret."""
    import shutil

    import zmq.auth

    args.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = args.client or "server"
    made_public, secret = zmq.auth.create_certificates(args.dir, name)
    public = Path(made_public)
    if args.client:
        allowed = args.dir / "clients" / args.role
        allowed.mkdir(parents=True, exist_ok=True)
        public = Path(shutil.move(public, allowed / public.name))
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """The precision ladder of one model, written to its card (daemon/models/calibrate.py)."""
    from daemon.engines.card import load_card
    from daemon.engines.precision import unit
    from daemon.errors import ConfigError, ModelError
    from daemon.models import calibrate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.model.is_file():
        raise ModelError(f"model file not found: {args.model}")
    n = calibrate.default_frames(args.model) if args.frames is None else args.frames
    if n < 1 or args.rounds < 1:
        raise ConfigError("--frames and --rounds must be at least 1")
    if args.data == "phantom":
        frames = calibrate.phantom(args.model, n, min(n, calibrate.FRAMES))
    else:
        frames = calibrate.data_frames(args.model, Path(args.data), n)
    result = calibrate.calibrate(
        args.model,
        frames,
        engines=args.engine,
        device=args.device,
        rounds=args.rounds,
        tolerance=args.tolerance,
    )
    per = f"{unit(load_card(args.model)).upper()}/S"
    rows = [("ENGINE", "DEVICE", "PRECISION", "DROP", per, "AGREEMENT", "FILE")]
    for m in result.measured:
        agree = " ".join(f"{k}={v:.4f}" for k, v in m.agreement.items())
        drop, fps = f"{m.drop:.4f}", f"{m.fps:.1f}"
        rows.append((m.engine, m.device, m.precision, drop, fps, agree, m.file))
    print("\n".join(human.table(rows)))
    earlier = {(m.engine, m.device, m.machine) for m in result.measured if m.machine}
    for engine, device, where in sorted(earlier):
        print(f"{engine} on {device}: kept from an earlier calibration on {where}")
    print(f"tolerance {result.tolerance}; {result.data}; {result.machine}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """One row per model: name, origin, task, input, layout, classes, parameters, scores."""
    from daemon.engines.reference import ensure_reference
    from daemon.models import list_models

    cache = config.load(args.config).paths.cache()
    for name in args.reference:
        ensure_reference(name, cache)
    models = list_models(cache)
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=1))
        return 0
    table = [
        ("MODEL", "ORIGIN", "TASK", "INPUT", "LAYOUT", "CLASSES", "PARAMS", "WEIGHTS", "SCORES")
    ]
    for m in models:
        table.append(
            (
                m.name,
                m.origin,
                m.task or "-",
                "x".join(map(str, m.input_shape)) or "-",
                m.layout or "-",
                ",".join(m.classes) or "-",
                f"{m.parameters:,}",
                m.weights,
                m.error or " ".join(f"{k}={v:.3f}" for k, v in m.scores.items()) or "-",
            )
        )
    print("\n".join(human.table(table)))
    print(f"cache: {cache / 'models'}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """The Dask cluster of ``offline.executor``: one row per worker."""
    overrides = {"offline.executor": args.executor} if args.executor else None
    cfg = config.load(args.config, overrides, {"offline.executor": "--executor (command line)"})
    if cfg.offline.executor == "local":
        print(
            f"offline.executor is 'local': jobs run in {cfg.offline.workers} job worker "
            "stage(s) of the daemon (echod status); set it to dask://HOST:PORT for a cluster"
        )
        return 0
    from daemon.offline.dask_executor import cluster

    info = cluster(cfg.offline.executor)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    table = [("WORKER", "HOST", "THREADS", "MEMORY", "IN FLIGHT", "MODELS")] + [
        (
            w["name"] or w["address"],
            w["host"],
            str(w["threads"]),
            f"{w['memory_gb']:g} GiB",
            f"{w['in_flight']} ({w['echod_tasks']} echod)",
            ", ".join(f"{m['model']} {m['engine']}:{m['device']}" for m in w["models"]) or "-",
        )
        for w in info["workers"]
    ]
    print(f"scheduler {info['scheduler']}: {len(info['workers'])} worker(s)")
    print("\n".join(human.table(table)))
    return 0
