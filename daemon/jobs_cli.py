"""``echod submit`` and ``echod jobs``: offline jobs from the command line.

Both talk to the running daemon over its control socket (:class:`daemon.ctl.Client`).
``submit KIND INPUT`` queues a job; the kind's options are given as ``--NAME VALUE``
(``--overlap 0.25``, ``--series 1.2.3``; a bare ``--NAME`` is true) and validated
by the daemon. ``--wait`` shows a progress bar (tqdm: percentage, rate, ETA) until
the job ends; the exit code tells how it ended (0 done, 65 failed on its input,
70 failed otherwise, 130 cancelled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from daemon import config, ctl, human

POLL_S = 0.25
EXIT = {"done": 0, "cancelled": 130}


def add_parsers(sub: Any) -> None:
    submit = sub.add_parser(
        "submit",
        help="queue an offline job (echo-volume, ct, wsi) on the running daemon",
        description="Queue an offline job; the kind's options follow as --NAME VALUE.",
    )
    submit.add_argument("kind", help="echo-volume, ct or wsi")
    submit.add_argument("input", help="the file or folder to process (inside control.roots)")
    submit.add_argument("--model", help="model file (default: the kind's bundled model)")
    submit.add_argument("--engine", help="inference engine (default: best available)")
    submit.add_argument("--device", help="engine device (default: the daemon's model.device)")
    submit.add_argument("--out", help="folder to put the job's output folder in")
    submit.add_argument("--key", help="idempotency key: submitting it again gives the same job")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    _client_options(submit)
    submit.set_defaults(func=cmd_submit, takes_options=True)

    jobs = sub.add_parser("jobs", help="list, show, wait for or cancel offline jobs")
    jobs.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "wait", "cancel", "result"]
    )
    jobs.add_argument("job", nargs="?", help="job id (show, wait, cancel, result)")
    jobs.add_argument("--state", default="", help="list: only jobs in this state")
    jobs.add_argument("--limit", type=int, default=50, help="list: at most this many")
    _client_options(jobs)
    jobs.set_defaults(func=cmd_jobs)


def _client_options(p: Any) -> None:
    p.add_argument("--endpoint", help="control endpoint (default: ipc in the runtime directory)")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for an answer (default: 5)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def kind_options(extra: list[str]) -> dict[str, Any]:
    """``--NAME VALUE`` / ``--NAME=VALUE`` / ``--NAME`` items as options (values as TOML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) < 3:
            raise config.ConfigError(f"option {item!r}: kind options are --NAME VALUE")
        name, sep, raw = item[2:].partition("=")
        if not sep:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                raw, i = extra[i + 1], i + 1
            else:
                raw = "true"
        out[name.replace("-", "_")] = config.toml_or_str(raw)
        i += 1
    return out


def _client(args: argparse.Namespace) -> ctl.Client:
    endpoint = args.endpoint or ctl.default_endpoint()
    ctl.check_endpoint(endpoint)
    return ctl.Client(endpoint, args.timeout)


def _fail(e: ctl.CtlError) -> int:
    print(f"echod: {e.code}: {e.message}", file=sys.stderr)
    return ctl.EXIT.get(e.code, 1)


def cmd_submit(args: argparse.Namespace) -> int:
    request = {
        "kind": args.kind,
        "input": os.path.abspath(os.path.expanduser(args.input)),
        "options": kind_options(args.extra),
    }
    for name in ("model", "out"):
        value = getattr(args, name)
        if value:
            request["output" if name == "out" else name] = os.path.abspath(
                os.path.expanduser(value)
            )
    for name in ("engine", "device", "key"):
        if getattr(args, name):
            request[name] = getattr(args, name)
    try:
        client = _client(args)
        try:
            queued = client.call("jobs.submit", request)
            if not args.wait:
                print(json.dumps(queued) if args.json else f"job {queued['job']} {queued['state']}")
                return 0
            return _follow(client, queued["job"], args.json)
        finally:
            client.close()
    except ctl.CtlError as e:
        return _fail(e)


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        client = _client(args)
        try:
            if args.action == "list":
                rows = client.call("jobs.list", {"state": args.state, "limit": args.limit})
                print(json.dumps(rows) if args.json else _table(rows))
                return 0
            if not args.job:
                raise ctl.CtlError("bad_args", f"`echod jobs {args.action}` needs a job id")
            if args.action == "wait":
                return _follow(client, args.job, args.json)
            command = {"show": "jobs.get", "cancel": "jobs.cancel", "result": "jobs.result"}
            result = client.call(command[args.action], {"job": args.job})
            if args.action == "show" and result["state"] == "done":  # where its files are
                manifest = client.call("jobs.result", {"job": args.job})
                folder = Path(manifest["output"])
                outputs = manifest.get("outputs") or {}
                result["outputs"] = {k: str(folder / v) for k, v in outputs.items()}
            print(json.dumps(result) if args.json else human.render(result))
            return 0
        finally:
            client.close()
    except ctl.CtlError as e:
        return _fail(e)


def _follow(client: ctl.Client, job_id: str, as_json: bool) -> int:
    """Poll the job until it ends, with a progress bar on a terminal; its exit code."""
    from tqdm import tqdm

    bar = None
    try:
        while True:
            job = client.call("jobs.get", {"job": job_id})
            if job["total"] and not as_json:
                if bar is None:
                    bar = tqdm(total=job["total"], unit=job["what"] or "unit", desc=job_id)
                bar.total = job["total"]
                bar.update(job["done"] - bar.n)
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(POLL_S)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        print(json.dumps(job))
    elif job["state"] == "done":
        manifest = client.call("jobs.result", {"job": job_id})
        print(f"job {job_id} done: {manifest.get('output')}")
    else:
        error = job.get("error") or {}
        print(f"job {job_id} {job['state']}: {error.get('message', '')}".rstrip(": "))
    if job["state"] == "failed":
        return 65 if (job.get("error") or {}).get("code") == "bad_input" else 70
    return EXIT[job["state"]]


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    lines = [["id", "kind", "state", "progress", "created", "input"]]
    for r in rows:
        done = f"{r['done']}/{r['total']} {r['what']}".strip() if r["total"] else "-"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        lines.append([r["id"], r["kind"], r["state"], done, created, r["input"]])
    return "\n".join(human.table(lines))
