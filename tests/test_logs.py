"""Log lines for journald and for collectors, from a real daemon: priority prefixes when
stderr is the journal, one JSON object a line with --log-format json, the stage on every
line, a traceback folded into its line, and a scanner that comes and goes not flooding.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import logs
from tests.conftest import ROOT, Echod

pytestmark = pytest.mark.timeout(180)

RUN = ("run", "--headless", "--frames", "6", "--pace", "none", "--mode", "all")


def test_journal_lines_carry_priorities_and_the_stage_when_stderr_is_the_journal(
    tmp_path: Path,
) -> None:
    """$JOURNAL_STREAM names the stream systemd connected stderr to (device:inode)."""
    err = tmp_path / "stderr"
    with err.open("w") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        done = subprocess.run(
            [sys.executable, "-m", "daemon", *RUN, "--set", f"paths.runtime_dir={tmp_path}/rt"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, err.read_text()
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>[\w-]+\[\d+\]: ", line) for line in lines), lines
    stages = {line.split(">")[1].split("[")[0] for line in lines}
    assert {"echod", "infer"} <= stages, stages  # the supervisor and a stage process


def test_journal_only_when_stderr_really_is_the_journal(tmp_path: Path) -> None:
    """A $JOURNAL_STREAM inherited by a process whose stderr goes elsewhere (a shell started
    from a service) is not the journal: plain text there."""
    env = {**os.environ, "JOURNAL_STREAM": "1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", *RUN, "--set", f"paths.runtime_dir={tmp_path}/rt"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert not any(line.startswith("<") for line in done.stderr.splitlines())
    assert " echod[" in done.stderr and " INFO " in done.stderr


def test_json_lines_for_other_collectors(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            *RUN,
            "--log-format",
            "json",
            "--set",
            f"paths.runtime_dir={tmp_path}/rt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all(
        {"time", "level", "priority", "stage", "pid", "logger", "message"} <= r.keys()
        for r in records
    )
    ready = [r for r in records if r["message"].startswith("stage infer ready")]
    assert ready and ready[0]["stage"] == "echod" and ready[0]["priority"] == 6
    assert any(r["stage"] == "infer" for r in records)


def test_a_bad_log_format_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--log-format", "xml"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'xml'" in last and "'journal'" in last and "'json'" in last, last


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("daemon.test", logging.WARNING, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


@pytest.mark.parametrize("fmt", ["text", "journal"])
def test_frame_job_and_traceback_stay_on_the_event_line(fmt: str) -> None:
    formatter = logs.FORMATTERS[fmt]()
    r = record("frame %d skipped", 12, frame=12, stage="infer")
    assert formatter.format(r).endswith("frame 12 skipped (frame 12)")
    try:
        raise ValueError("two\nlines")
    except ValueError:
        r = record("job %s failed", "j1", job="j1", stage="jobs-0")
        r.exc_info = sys.exc_info()
    line = formatter.format(r)
    assert "\n" not in line and "(job j1)" in line and "ValueError: two | lines" in line
    if fmt == "journal":
        assert line.startswith("<4>jobs-0[")


def test_repeats_are_let_through_five_times_a_window_then_counted() -> None:
    f = logs.RepeatFilter(window_s=3600)
    passed = [
        f.filter(record("reconnecting in %.3g s (reconnect %s)", 0.1 * n, f"#{n}"))
        for n in range(50)
    ]
    assert passed == [True] * logs.BURST + [False] * (50 - logs.BURST)
    assert f.filter(record("another message"))  # others are not held back
    f.window_s = 0.0  # the window is over
    later = record("reconnecting in %.3g s (reconnect %s)", 5.0, "#51")
    assert f.filter(later) and later.repeats == 50 - logs.BURST


@pytest.fixture
def flapping_scanner() -> Iterator[int]:
    """A scanner that accepts each connection and drops it at once; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_a_scanner_that_comes_and_goes_does_not_flood_the_log(
    run_echod: type[Echod], flapping_scanner: int, tmp_path: Path
) -> None:
    e = run_echod(
        "run",
        "--headless",
        "--json",
        "--source",
        f"igtl://127.0.0.1:{flapping_scanner}/Image",
        "--set",
        "source.igtl.reconnect_min_s=0.01",
        "--set",
        "source.igtl.reconnect_max_s=0.01",
        "--set",
        "logging.repeat_s=1",
        "--set",
        f"paths.runtime_dir={tmp_path}/rt",
    )
    e.wait_for("more like this in 1 s left out", timeout=120)
    e.proc.send_signal(signal.SIGTERM)
    code, out = e.finish(timeout=60)
    assert code == 0, "".join(e.stderr)
    reconnects = json.loads(out.strip().splitlines()[-1])["source_stats"]["reconnects"]
    said = [line for line in e.stderr if "reconnecting in" in line]
    assert reconnects > 4 * len(said), (reconnects, len(said))
