"""What systemd hears, on a real ``$NOTIFY_SOCKET`` (a unix datagram socket), from a real
daemon: READY, STATUS, WATCHDOG, RELOADING/READY on SIGHUP, STOPPING, in that order;
WATCHDOG stops while a stage hangs; EXTEND_TIMEOUT_USEC while an engine builds; a display
that cannot open stops the service and says why in STATUS.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import plugin_engines
from tests.conftest import Echod
from tests.test_control import Running, live, runtime, until  # noqa: F401 (fixture)
from tests.test_supervisor import NotifySocket, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[NotifySocket, dict[str, str]]]:
    """The socket, and the environment systemd gives the service (WatchdogSec=4)."""
    sock = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "4000000"}
    env.pop("WATCHDOG_PID", None)
    yield sock, env
    sock.close()


def fields(sock: NotifySocket) -> list[str]:
    """Every field received, in order (a datagram may carry several: READY=1 with STATUS=)."""
    return [f for _, message in sock.messages for f in message.split("\n")]


def first(items: list[str], prefix: str, after: int = -1) -> int:
    return next(i for i, f in enumerate(items) if i > after and f.startswith(prefix))


def after(items: list[str], prefix: str) -> list[str]:
    """The fields after the first one that starts with ``prefix`` (none yet: [])."""
    return next((items[i + 1 :] for i, f in enumerate(items) if f.startswith(prefix)), [])


def test_ready_status_watchdog_reload_and_stopping_in_order(
    run_echod: type[Echod], systemd: tuple[NotifySocket, dict[str, str]], tmp_path: Path
) -> None:
    sock, env = systemd
    conf = tmp_path / "echod.toml"
    conf.write_text('schema_version = 2\n[logging]\nlevel = "INFO"\n')
    rt = f"paths.runtime_dir={tmp_path}/rt"
    e = run_echod("run", "--config", str(conf), "--headless", "--set", rt, env=env)
    wait_for(lambda: any("fps, model" in f for f in fields(sock)), 120, "a STATUS with the fps")
    wait_for(lambda: "WATCHDOG=1" in after(fields(sock), "READY=1"), 60, "a ping once ready")
    conf.write_text('schema_version = 2\n[logging]\nlevel = "DEBUG"\n[source]\nfps = 12.0\n')
    e.proc.send_signal(signal.SIGHUP)
    line = e.wait_for("reload: ")
    assert "applied logging.level" in line, line
    assert "not reloaded (restart echod to apply): source.fps" in line, line
    wait_for(lambda: "RELOADING=1" in fields(sock), 30, "RELOADING")
    wait_for(lambda: fields(sock).count("READY=1") == 2, 30, "READY after the reload")
    e.proc.send_signal(signal.SIGTERM)
    code, _ = e.finish(timeout=60)
    assert code == 0, "".join(e.stderr)
    reloaded = next(i for i, x in enumerate(e.stderr) if "reload: " in x)
    # the new level took effect: the stop's debug lines (rings removed) are logged
    assert any(" DEBUG " in x for x in e.stderr[reloaded:]), "".join(e.stderr[reloaded:])
    got = fields(sock)
    ready = first(got, "READY=1")
    status = next(i for i, f in enumerate(got) if i > ready and "fps, model" in f)
    assert got[status].startswith("STATUS=running: "), got[status]
    assert "model ultrasound-seg.onnx" in got[status] and "jobs queued" in got[status]
    ping = first(got, "WATCHDOG=1", ready)
    reloading = first(got, "RELOADING=1", max(status, ping))
    assert got[reloading + 1].startswith("MONOTONIC_USEC=")
    again = first(got, "READY=1", reloading)
    assert got[again + 1].startswith("STATUS=reloaded: applied logging.level")
    assert first(got, "STOPPING=1", again) == len(got) - 1


def test_watchdog_stops_while_a_stage_hangs_and_resumes_after_its_restart(
    run_echod: type[Echod], systemd: tuple[NotifySocket, dict[str, str]], tmp_path: Path
) -> None:
    """WatchdogSec=4: a stage silent for 2 s (half of it) is stale. From the moment it is
    found hung until its restart, not one WATCHDOG=1; the pings come back after."""
    sock, env = systemd
    e = run_echod("run", "--headless", "--set", f"paths.runtime_dir={tmp_path}/rt", env=env)
    e.wait_for("stage acquire ready", timeout=120)
    assert "a stage silent for 2 s is stale" in "".join(e.stderr)
    wait_for(lambda: fields(sock).count("WATCHDOG=1") >= 1, 60, "a ping")
    started = next(x for x in e.stderr if "stage infer started" in x)
    os.kill(int(started.split("(pid ")[1][:-2]), signal.SIGSTOP)  # a driver stuck in a call
    e.wait_for("stage infer hung")
    e.wait_for("stage infer ready", timeout=120)
    wait_for(lambda: "WATCHDOG=1" in after(fields(sock), "STATUS=stage infer died"), 60, "pings")
    e.proc.send_signal(signal.SIGTERM)
    assert e.finish(timeout=60)[0] == 0, "".join(e.stderr)
    got = fields(sock)
    hung = first(got, "STATUS=stage infer hung (no heartbeat")
    restart = first(got, "STATUS=stage infer died", hung)
    assert "WATCHDOG=1" in got[:hung], "it pinged before the hang"
    assert "WATCHDOG=1" not in got[hung:restart], got[hung:restart]
    assert "WATCHDOG=1" in got[restart:], "the pings came back"


def test_a_stage_found_hung_stops_the_pings_at_once(tmp_path: Path) -> None:
    """The watchdog's question and the hang check agree: from the moment a stage is found
    hung (killing), no ping, although its silence is still within the ping's slack (a
    ping slipped out there under load: the socket test above caught it once)."""
    import time

    from daemon import config
    from daemon.stage import StageSpec
    from daemon.supervisor import Supervisor, Worker

    sup = Supervisor(config.load(None, {"paths.state_dir": str(tmp_path)}))
    w = sup.workers["infer"] = Worker(StageSpec("infer", "infer"), ready=True)
    now = time.monotonic()
    w.heartbeat = now - sup._patience(w) - 0.05  # stale: the hang check has fired
    assert sup._healthy(now)  # the ping's own slack alone would still allow one
    w.killing = now
    assert not sup._healthy(now)
    w.killing, w.heartbeat = None, now  # replaced: fresh again
    assert sup._healthy(now)


def test_an_engine_build_extends_the_start_timeout(
    run_echod: type[Echod], systemd: tuple[NotifySocket, dict[str, str]], tmp_path: Path
) -> None:
    """An engine that builds for 10 s with a stage_timeout_s of 5 s: its progress restarts
    the stage's clock and asks systemd for more time; READY=1 follows the build."""
    sock, env = systemd
    plugin_engines.install(tmp_path / "site")
    env = {**env, "PYTHONPATH": str(tmp_path / "site"), plugin_engines.LOAD_S: "10"}
    rt = f"paths.runtime_dir={tmp_path}/rt"
    e = run_echod(
        "run",
        "--headless",
        "--engine",
        "building",
        "--set",
        "pipeline.stage_timeout_s=5",
        "--set",
        "offline.workers=0",
        "--set",
        rt,
        env=env,
    )
    wait_for(lambda: "READY=1" in fields(sock) or e.proc.poll() is not None, 120, "READY")
    assert e.proc.poll() is None, "".join(e.stderr)
    e.proc.send_signal(signal.SIGTERM)
    assert e.finish(timeout=60)[0] == 0, "".join(e.stderr)
    got = fields(sock)
    ready = first(got, "READY=1")
    extends = [f for f in got[:ready] if f.startswith("EXTEND_TIMEOUT_USEC=")]
    assert set(extends) == {"EXTEND_TIMEOUT_USEC=15000000"}  # stage_timeout_s + 10 s
    waves = 3  # infer, the sink, acquire: one each as it starts
    assert len(extends) > waves, f"no extension for the build's progress: {extends}"


def test_a_display_that_cannot_open_stops_the_service_and_says_why(
    run_echod: type[Echod], systemd: tuple[NotifySocket, dict[str, str]], tmp_path: Path
) -> None:
    """Under systemd (display.fallback = auto: fail) a screen that is not there ends the
    run with exit 70 and one line; STATUS= says why, and READY=1 never came."""
    sock, env = systemd
    env = {**env, "DISPLAY": free_display()}
    env.pop("WAYLAND_DISPLAY", None)
    e = run_echod("run", "--set", f"paths.runtime_dir={tmp_path}/rt", env=env)
    code, _ = e.finish(timeout=120)
    assert code == 70, "".join(e.stderr)
    last = e.stderr[-1]
    assert last.startswith("echod: error: ") and "display" in last.lower(), last
    got = fields(sock)
    assert "READY=1" not in got
    failed = [f for f in got if f.startswith("STATUS=failed: ")]
    assert failed and "display" in failed[0].lower(), got


def free_display() -> str:
    """An X display number no server listens on."""
    n = 90
    while Path(f"/tmp/.X11-unix/X{n}").exists() or Path(f"/tmp/.X{n}-lock").exists():
        n += 1
    return f":{n}"


def test_a_notify_socket_nobody_listens_on_changes_nothing(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    """systemd gone (or a stale $NOTIFY_SOCKET): the datagrams fail, the run does not. The
    first failed send used to raise out of the supervisor and leave it hanging on its
    stages."""
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "nobody.sock")}
    e = run_echod(
        "run",
        "--headless",
        "--frames",
        "8",
        "--pace",
        "none",
        "--mode",
        "all",
        "--set",
        f"paths.runtime_dir={tmp_path}/rt",
        env=env,
    )
    code, out = e.finish(timeout=120)
    assert code == 0, "".join(e.stderr)
    assert out.strip().splitlines()[-1].startswith("echod: 8 frames in = 8 out"), out


def test_in_development_a_display_that_cannot_open_runs_headless_and_says_so(
    runtime: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not under systemd (display.fallback = auto: headless) the run goes on without the
    display, and status and telemetry say it failed, with the reason."""
    pytest.importorskip("pygame", reason="the display extra is not installed here")
    monkeypatch.setenv("DISPLAY", free_display())
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    r = Running(live(runtime, **{"sink.headless": False}))
    c = r.client()
    try:
        until(lambda: (c.call("status")["fps"] or 0) > 0, 60)  # frames flow, headless
        display = c.call("status")["display"]
        assert display["state"] == "failed" and "no display" in display["error"], display
        assert r.sup.telemetry()["display"] == display
    finally:
        c.close()
        r.stop()
