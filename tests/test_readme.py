"""Every shell command in the README's ``sh`` blocks, run as written, or skipped with the reason.

``echod run`` examples stop after a few frames (``--frames``); ``echod ctl``
examples talk to one daemon started for them. Commands run from the checkout,
``.venv/bin/echod`` being this interpreter's ``python -m daemon``, without a
screen (``$DISPLAY`` removed), so the result is the same on every machine.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.engines import registry
from tests.conftest import ROOT, Echod, need_data

pytestmark = pytest.mark.timeout(300)

README = ROOT / "README.md"
ECHOD = ".venv/bin/echod"
FRAMES = 10  # where an `echod run` example stops
SKIPPED = {  # the start of a command -> why it is not run here
    "make run": "installs .venv, then runs until stopped; `echod run` is run below",
    "make test": "the whole test suite",
    ".venv/bin/python -m pytest": "the test suite itself",
    ".venv/bin/python bench/": "a benchmark: minutes, and it writes bench/results/",
    "bench/setup_peers.sh": "the benchmarks' peers: downloads pyFAST, MONAI and torch",
    f"{ECHOD} run --source ~/": "plays a folder of your own images",
    f"{ECHOD} models calibrate": "rewrites a model's card and int8 files (the bundled ones "
    "are tracked); tests/test_precision.py calibrates models of its own through the CLI",
    f"{ECHOD} ctl screenshot": "needs the display (a screen); tests/test_display.py takes "
    "screenshots under Xvfb",
    f"{ECHOD} run --source none": "runs until stopped; tests/test_jobs.py runs it",
    f"{ECHOD} submit": "needs a daemon taking jobs; tests/test_jobs.py submits through it",
    f"{ECHOD} jobs": "needs a daemon taking jobs; tests/test_jobs.py runs these",
    f"{ECHOD} ctl dicom": "needs the DICOM node (dicom.enabled); tests/test_dicom.py runs it",
    "echoscu": "a DICOM peer (dcmtk) for a running node: tests/test_dicom.py",
    "storescu": "a DICOM peer (dcmtk) for a running node: tests/test_dicom.py",
    "dask ": "a Dask cluster's own commands; tests/test_dask.py starts a LocalCluster",
    "sudo ": "changes this machine (tests/test_service.py installs into a temporary root)",
}


def commands() -> list[str]:
    """The README's ``sh`` commands: continued lines joined, comments and repeats dropped."""
    found: list[str] = []
    inside, pending = False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = line == "```sh"
            continue
        if not inside:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        words = shlex.split(pending, comments=True)
        if words:
            found.append(" ".join(pending.split("#")[0].split()))
        pending = ""
    return list(dict.fromkeys(found))


COMMANDS = commands()


def env() -> dict[str, str]:
    """This environment without a screen: the examples run headless everywhere."""
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == ECHOD, command
    return [sys.executable, "-m", "daemon", *words[1:]]


def skip_if_needed(command: str) -> None:
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words.pop(0)
    bare = " ".join(words)
    reason = next((why for start, why in SKIPPED.items() if bare.startswith(start)), None)
    if reason:
        pytest.skip(reason)
    for word in shlex.split(command):
        if word.startswith("../shared/data/"):
            need_data(ROOT / word)
    if "openvino" in command and not registry.probe("openvino").available:
        pytest.skip("the openvino extra is not installed here")


def test_the_readme_shows_each_kind_of_command() -> None:
    """The extraction itself: runs, ctl commands, listings and skipped ones are all found."""
    starts = {" ".join(c.split()[:2]) for c in COMMANDS}
    assert {f"{ECHOD} run", f"{ECHOD} ctl", f"{ECHOD} engines", "make run"} <= starts
    assert f"{ECHOD} ctl status" in COMMANDS
    joined = [c for c in COMMANDS if "WaterTank" in c and "--pace none" in c]
    assert joined and joined[0].endswith("--mode all --pace none --headless --json"), joined


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith(f"{ECHOD} ctl")])
def test_example(command: str) -> None:
    skip_if_needed(command)
    args = argv(command)
    run = args[3] == "run"
    if run and "--frames" not in args and "source.frames" not in command:
        args += ["--frames", str(FRAMES)]
    done = subprocess.run(
        args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stdout.strip().splitlines()[-1]
    if run and "--json" in args:
        assert json.loads(last)["frames_in"] == FRAMES
    elif run:  # the closing lines: what went in and out (then, if any, what was withheld)
        closing = rf"echod: {FRAMES} frames in = \d+ out \+ \d+ dropped"
        assert any(re.match(closing, line) for line in done.stdout.splitlines()), done.stdout


@pytest.fixture(scope="module")
def daemon() -> Iterator[dict[str, str]]:
    """`echod run` with a runtime folder of its own; the environment its ctl commands need."""
    runtime = Path(tempfile.mkdtemp(prefix="echod-readme-", dir="/tmp"))  # ipc paths are short
    environment = {**env(), "RUNTIME_DIRECTORY": str(runtime)}
    e = Echod("run", "--source", "synthetic", env=environment)
    try:
        e.wait_for("stage acquire ready", timeout=120)
        yield environment
    finally:
        e.proc.kill()
        e.proc.wait(10)
        for p in e.leftovers():
            p.kill()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(f"{ECHOD} ctl")])
def test_ctl_example(command: str, daemon: dict[str, str]) -> None:
    skip_if_needed(command)
    args = argv(command)
    args.insert(4, "--timeout=60")  # a bound for a loaded machine, not what is tested
    if args[-1] == "watch":
        assert first_line(args, daemon), "watch printed nothing"
        return
    done = subprocess.run(
        args, cwd=ROOT, env=daemon, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr


def first_line(args: list[str], environment: dict[str, str]) -> str:
    """The first line a never-ending command prints; then it is stopped."""
    proc = subprocess.Popen(
        args, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=60)
    finally:
        proc.terminate()
        proc.wait(10)
