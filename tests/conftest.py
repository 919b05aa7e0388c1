"""Shared fixtures: the reference data folder, and running ``echod`` as a real process."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WATERTANK = DATA / "us" / "WaterTankBottomTranslationVideoBuffer.igs.mha"


def pytest_configure(config: pytest.Config) -> None:
    """Each test session gets runtime and state directories of its own: daemons of
    concurrent sessions (CI, a developer's run) never meet, and none touches the user's."""
    import tempfile

    for var in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY"):
        os.environ[var] = tempfile.mkdtemp(prefix=f"echod-test-{var.split('_')[0].lower()}-")


def need_data(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} is missing (../shared/data beside the checkout)")
    return path


class Echod:
    """``echod`` in a subprocess, tagged so that every process it starts can be found."""

    def __init__(self, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        env = {**(os.environ if env is None else env), "ECHOD_TEST_TAG": self.tag}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for r in self._readers:
            r.start()

    def _read(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            self._lines.put(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first output line (stdout or stderr, from now on) containing ``text``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s; stderr:\n{''.join(self.stderr)}")

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        """Wait for the exit; the exit code and the whole stdout."""
        self.proc.wait(timeout)
        for r in self._readers:
            r.join(5)
        return self.proc.returncode, "".join(self.stdout)

    def leftovers(self) -> list[psutil.Process]:
        """Processes still alive that this run started (its environment carries the tag)."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("ECHOD_TEST_TAG") == self.tag:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"echod-{self.proc.pid}-")]


@pytest.fixture
def run_echod() -> Iterator[type[Echod]]:
    started: list[Echod] = []

    class Tracked(Echod):
        def __init__(self, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None):
            super().__init__(*args, cwd=cwd, env=env)
            started.append(self)

    yield Tracked
    for e in started:  # never leave a daemon behind, whatever the test did
        if e.proc.poll() is None:
            e.proc.kill()
            e.proc.wait(10)
        for p in e.leftovers():
            p.kill()
