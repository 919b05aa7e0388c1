"""The control socket with real ZeroMQ sockets against a running supervisor."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import config, protocol
from daemon.cli import main as cli_main
from daemon.ctl import Client, CtlError
from daemon.models import default_model
from daemon.supervisor import Supervisor

pytestmark = pytest.mark.timeout(180)


class Running:
    """A supervisor running in a thread of the test, with its control socket."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self.sup = Supervisor(config.load(None, overrides))
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        until(lambda: self.sup.state == "running" or self.error is not None, 90)
        assert self.error is None, self.error
        self.endpoint = self.sup.control.endpoint

    def _run(self) -> None:
        try:
            self.summary = self.sup.run()
        except BaseException as e:
            self.error = e

    def client(self, **kw: Any) -> Client:
        return Client(self.endpoint, **kw)

    def stop(self) -> dict[str, Any]:
        self.sup.request_stop("test")
        self.thread.join(60)
        assert self.error is None, self.error
        assert self.summary is not None
        return self.summary


def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def runtime() -> Iterator[Path]:
    d = Path(f"/tmp/echod-test-{os.getpid()}-{time.monotonic_ns()}")  # ipc paths must be short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def live(runtime: Path, **extra: Any) -> dict[str, Any]:
    return {
        "paths.runtime_dir": str(runtime),
        "source.pace": "fps",
        "source.fps": 20.0,
        "model.warmup": 1,
        "sink.headless": True,
        **extra,
    }


@pytest.fixture
def daemon(runtime: Path) -> Iterator[Running]:
    r = Running(live(runtime))
    yield r
    if r.thread.is_alive():
        r.stop()


def test_read_commands_answer_with_live_figures(daemon: Running) -> None:
    c = daemon.client()
    pong = c.call("ping")
    assert pong["pong"] and pong["telemetry"].startswith("ipc://")
    until(lambda: (c.call("status")["frames"] or 0) > 3, 30)
    s = c.call("status")
    assert s["state"] == "running" and set(s["stages"]) == {"sink", "infer", "acquire"}
    assert all(st["alive"] and st["ready"] for st in s["stages"].values())
    assert s["fps"] > 0 and s["latency_ms"]["p50"] > 0 and s["engine"] == "onnxruntime"
    assert c.call("config.get", {"key": "pipeline.mode"}) == "newest"
    assert "source" in c.call("config.get")
    engines = {e["name"]: e for e in c.call("engines")}
    assert engines["onnxruntime"]["available"]
    models = {m["name"]: m for m in c.call("models")}
    assert models["ultrasound-seg"]["weights"] == "trained"
    assert models["ultrasound-seg"]["path"].endswith(".onnx")
    c.close()


def test_ipc_socket_is_group_only(daemon: Running) -> None:
    path = daemon.endpoint[len("ipc://") :]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_run_time_setting_pauses_and_resumes_the_source(daemon: Running) -> None:
    c = daemon.client()
    until(lambda: (c.call("status")["frames"] or 0) > 0, 30)
    assert c.call("config.set", {"key": "source.paused", "value": True})["applied"] == {
        "paused": True
    }
    assert daemon.sup.config.source.paused
    with pytest.raises(CtlError) as e:
        c.call("config.set", {"key": "source.fps", "value": 5.0})
    assert e.value.code == "config" and "cannot change while running" in e.value.message
    with pytest.raises(CtlError) as e:
        c.call("config.set", {"key": "source.pausd", "value": True})
    assert e.value.code == "config"
    with pytest.raises(CtlError) as e:
        c.call("config.set", {"key": "source.paused", "value": "yes"})
    assert e.value.code == "config" and "source.paused" in e.value.message
    assert c.call("config.set", {"key": "source.paused", "value": False})["applied"] == {
        "paused": False
    }
    c.close()


def test_restricted_and_unavailable_commands(daemon: Running) -> None:
    c = daemon.client()
    with pytest.raises(CtlError) as e:
        c.call("shutdown")
    assert e.value.code == protocol.FORBIDDEN
    with pytest.raises(CtlError) as e:
        c.call("screenshot", {"path": "/tmp/x.png"})
    assert e.value.code == protocol.UNAVAILABLE and "display" in e.value.message
    with pytest.raises(CtlError) as e:
        c.call("model.load", {"path": "/etc/passwd"})
    assert e.value.code == "config" and "outside the allowed folders" in e.value.message
    c.close()


def test_shutdown_by_an_admin_stops_the_daemon(runtime: Path) -> None:
    r = Running(live(runtime, **{"control.ipc_role": "admin"}))
    c = r.client()
    assert c.call("shutdown") == {"stopping": True}
    r.thread.join(60)
    assert r.summary is not None and "shutdown" in r.summary["stopped_by"]
    assert not Path(r.endpoint[len("ipc://") :]).exists()
    c.close()


def test_ctl_command_line(daemon: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["ctl", "--endpoint", daemon.endpoint, "--json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "running"
    assert cli_main(["ctl", "--endpoint", daemon.endpoint, "config.get", "pipeline.mode"]) == 0
    assert json.loads(capsys.readouterr().out) == "newest"
    assert cli_main(["ctl", "--endpoint", daemon.endpoint, "nope"]) == 64
    assert "unknown_command" in capsys.readouterr().err
    assert cli_main(["ctl", "--endpoint", daemon.endpoint, "shutdown"]) == 77


def test_ctl_without_a_daemon_times_out_clearly(
    runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["ctl", "--endpoint", f"ipc://{runtime}/none.sock", "--timeout", "0.3", "ping"])
    assert code == 75 and "is echod running there" in capsys.readouterr().err


def test_hot_swap_in_mode_all_loses_no_frame(runtime: Path, tmp_path: Path) -> None:
    n = 120
    model = tmp_path / "models" / "swapped.onnx"
    model.parent.mkdir()
    shutil.copy(default_model(), model)
    r = Running(
        live(
            runtime,
            **{
                "pipeline.mode": "all",
                "source.frames": n,
                "source.fps": 30.0,
                "control.roots": [str(tmp_path / "models")],
            },
        )
    )
    c = r.client(timeout_s=90)
    until(lambda: (c.call("status")["frames"] or 0) >= 10, 60)
    info = c.call("model.load", {"path": str(model)})
    assert info["model"] == "swapped.onnx"
    assert c.call("status")["model"] == "swapped.onnx"
    r.thread.join(120)
    s = r.summary
    assert s is not None, r.error
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (n, n, 0)
    assert s["restarts"] == {} and s["model"] == "swapped.onnx"
    c.close()


# -- security ---------------------------------------------------------------------


def make_keys(root: Path) -> dict[str, Path]:
    for args in (
        ["--dir", str(root)],
        ["--dir", str(root), "--client", "ops"],
        ["--dir", str(root), "--client", "viewer", "--role", "read"],
        ["--dir", str(root / "rogue"), "--client", "rogue"],
    ):
        assert cli_main(["keys", *args]) == 0
    return {
        "server": root / "server.key",
        "server_secret": root / "server.key_secret",
        "ops": root / "ops.key_secret",
        "viewer": root / "viewer.key_secret",
        "rogue": root / "rogue" / "rogue.key_secret",
    }


def test_tcp_needs_curve_and_refuses_unknown_clients(runtime: Path, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    with pytest.raises(config.ConfigError, match="needs CURVE"):
        Supervisor(
            config.load(None, live(runtime, **{"control.endpoint": "tcp://127.0.0.1:0"}))
        ).run()
    r = Running(
        live(
            runtime,
            **{
                "control.endpoint": "tcp://127.0.0.1:0",
                "control.telemetry_endpoint": "tcp://127.0.0.1:0",
                "control.server_key": str(keys["server_secret"]),
                "control.clients_dir": str(tmp_path / "keys" / "clients"),
            },
        )
    )
    try:
        ops = r.client(server_key=keys["server"], client_key=keys["ops"])
        assert ops.call("ping")["pong"]
        assert ops.call("config.set", {"key": "source.paused", "value": False})
        viewer = r.client(server_key=keys["server"], client_key=keys["viewer"])
        assert viewer.call("status")["state"] == "running"
        with pytest.raises(CtlError) as e:
            viewer.call("config.set", {"key": "source.paused", "value": True})
        assert e.value.code == protocol.FORBIDDEN
        for refused in (
            r.client(server_key=keys["server"], client_key=keys["rogue"], timeout_s=1.0),
            r.client(timeout_s=1.0),
        ):
            with pytest.raises(CtlError) as e:
                refused.call("ping")
            assert e.value.code == "timeout"
            refused.close()
        ops.close()
        viewer.close()
    finally:
        r.stop()


# -- fuzzing --------------------------------------------------------------------------

requests = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "v": st.one_of(st.just(1), st.integers(), st.text(max_size=3)),
            "id": st.one_of(st.text(max_size=140), st.integers()),
            "cmd": st.one_of(st.sampled_from(sorted(protocol.COMMANDS)), st.text(max_size=12)),
            "args": st.dictionaries(
                st.sampled_from(["key", "value", "path", "job", "kind", "x"]),
                st.one_of(st.text(max_size=30), st.integers(), st.none()),
                max_size=3,
            ),
        }
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(70_000, 200_000).map(lambda n: b"{" + b" " * n + b"}"),
)


def test_fuzzed_requests_all_get_an_answer_and_the_pipeline_runs_on(runtime: Path) -> None:
    # local clients get the read role here, so no fuzzed request can change anything
    r = Running(live(runtime, **{"control.ipc_role": "read"}))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(r.endpoint)
    codes: dict[str, int] = {}
    try:
        until(lambda: (r.sup.status()["frames"] or 0) > 0, 30)
        before = r.sup.status()["frames"]

        @settings(
            max_examples=2000,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests)
        def answered(raw: bytes) -> None:
            sock.send(raw)
            assert sock.poll(5000), f"no answer to {raw[:80]!r}"
            reply = json.loads(sock.recv())
            assert reply["v"] == 1 and isinstance(reply["ok"], bool)
            if not reply["ok"]:
                assert reply["error"]["code"] and reply["error"]["message"]
                codes[reply["error"]["code"]] = codes.get(reply["error"]["code"], 0) + 1

        answered()
        assert protocol.INTERNAL not in codes, codes
        assert {protocol.BAD_JSON, protocol.BAD_REQUEST, protocol.TOO_LARGE} <= set(codes)
        until(lambda: r.sup.status()["frames"] > before, 30)  # frames still flow
        assert all(s["restarts"] == 0 and s["alive"] for s in r.sup.status()["stages"].values())
    finally:
        sock.close(0)
        r.stop()


def test_telemetry_and_events_are_published(daemon: Running) -> None:
    c = daemon.client()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(c.call("ping")["telemetry"])
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    try:
        while not {"telemetry", "config"} <= set(seen):
            assert time.monotonic() < deadline, f"only {sorted(seen)} published"
            if "config" not in seen and "telemetry" in seen:
                c.call("config.set", {"key": "source.paused", "value": False})
            if sub.poll(500):
                topic, body = sub.recv_multipart()
                seen[topic.decode()] = json.loads(body)["result"]
        assert seen["telemetry"]["state"] == "running"
        assert "cpu_percent" in seen["telemetry"]["resources"]
        assert seen["config"] == {"key": "source.paused", "value": False}
    finally:
        sub.close(0)
        c.close()


def test_a_model_that_cannot_load_is_refused_and_the_old_one_keeps_running(
    daemon: Running, tmp_path: Path
) -> None:
    from tests.test_live import volume_model

    daemon.sup.config.control.roots.append(str(tmp_path))
    c = daemon.client(timeout_s=90)
    until(lambda: (c.call("status")["frames"] or 0) > 0, 30)
    infer_pid = c.call("status")["stages"]["infer"]["pid"]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 not a model")
    for bad, words in ((volume_model(tmp_path / "volume.onnx"), "5-D"), (corrupt, "corrupt.onnx")):
        with pytest.raises(CtlError) as e:
            c.call("model.load", {"path": str(bad)})
        assert e.value.code == "model" and words in e.value.message, e.value.message
    s = c.call("status")
    assert s["stages"]["infer"]["pid"] == infer_pid and s["model"] == "ultrasound-seg.onnx"
    before = s["frames"]
    until(lambda: c.call("status")["frames"] > before, 30)  # the old model still runs
    c.close()
