"""The supervisor under stress: slow swaps, a second daemon, hung and crashing stages,
deterministic failures, stop after a kill, and the source's state.

Each test runs real stage processes over real rings with ONNX Runtime; misbehaving
engines come in through the real ``echod.engines`` entry points (tests/plugin_engines.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from daemon import config
from daemon.errors import ModelError
from daemon.models import default_model
from daemon.supervisor import Supervisor
from tests import plugin_engines
from tests.conftest import WATERTANK, Echod, need_data
from tests.test_control import Running, live, runtime, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def engines(tmp_path: Path) -> None:
    plugin_engines.install(tmp_path / "site")


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return value


# -- the loop never blocks ------------------------------------------------------------


class NotifySocket:
    """A real $NOTIFY_SOCKET: what the daemon tells systemd, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, field: str) -> list[float]:
        return [t for t, m in self.messages if field in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield ns
    ns.close()


def test_a_slow_model_swap_blocks_neither_ping_nor_the_watchdog(
    runtime: Path,  # noqa: F811
    tmp_path: Path,
    engines: None,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_s = 10.0
    monkeypatch.setenv(plugin_engines.LOAD_S, str(load_s))
    r = Running(live(runtime, **{"control.roots": [str(default_model().parent)]}))
    c = r.client(timeout_s=30)
    try:
        swap = c.call("model.load", {"path": str(default_model()), "engine": "slow"})
        assert swap["state"] == "warming"
        began = time.monotonic()
        rtts = []
        while (status := c.call("status"))["swap"] is not None:
            t0 = time.perf_counter()
            assert c.call("ping")["pong"]
            rtts.append(time.perf_counter() - t0)
            time.sleep(0.01)
        took = time.monotonic() - began
        assert status["last_swap"]["state"] == "switched", status["last_swap"]
        assert status["engine"] == "slow"
        assert took >= load_s * 0.9, "the swap waited for the slow load"
        p99 = float(np.percentile(rtts, 99))
        print(f"ping during a {took:.1f} s swap: {len(rtts)} pings, p99 {p99 * 1e3:.2f} ms")
        # behaviour, not speed (bench numbers are printed above): no request waited for the
        # load, and the watchdog kept being pinged through it
        assert max(rtts) < load_s / 2, f"a ping waited {max(rtts):.1f} s for the model load"
        pings = [t for t in notify_socket.times("WATCHDOG=1") if began <= t <= began + took]
        gaps = np.diff([began, *pings, began + took])
        assert gaps.max() < load_s / 2, f"watchdog silent for {gaps.max():.1f} s during the swap"
    finally:
        c.close()
        r.stop()


# -- one daemon per runtime directory --------------------------------------------------


def test_a_second_daemon_in_the_same_runtime_directory_exits_and_the_first_runs_on(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    rt = tmp_path / "rt"
    args = ("run", "--headless", "--set", f"paths.runtime_dir={rt}")
    first = run_echod(*args)
    first.wait_for("stage acquire ready")
    second = run_echod(*args)
    code, _ = second.finish(timeout=60)
    errors = [line for line in second.stderr if "error" in line.lower()]
    assert code == 75, "".join(second.stderr)
    assert len(errors) == 1 and f"pid {first.proc.pid}" in errors[0], second.stderr
    assert "Traceback" not in "".join(second.stderr)
    ctl = run_echod("ctl", "--endpoint", f"ipc://{rt}/control.sock", "ping")
    code, out = ctl.finish(timeout=30)
    assert code == 0 and "pong" in out, "".join(ctl.stderr)
    assert first.segments(), "the first daemon's rings are untouched"
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish(timeout=60)[0] == 0


# -- hung and crashing stages ------------------------------------------------------------


def test_a_hung_stage_is_killed_and_restarted(run_echod: type[Echod]) -> None:
    e = run_echod(
        "run",
        "--headless",
        "--set",
        "pipeline.heartbeat_timeout_s=1.5",
    )
    e.wait_for("stage acquire ready")
    pid = int(next(x for x in e.stderr if "stage infer started" in x).split("(pid ")[1][:-2])
    os.kill(pid, signal.SIGSTOP)  # alive, silent: a driver stuck in a call
    e.wait_for("stage infer hung")
    e.wait_for("stage infer ready", timeout=60)
    e.wait_for("echod: ")  # frames flow again
    assert not _alive(pid)
    e.proc.send_signal(signal.SIGTERM)
    code, _ = e.finish(timeout=60)
    assert code == 0, "".join(e.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_restarts_are_limited_by_rate_then_the_daemon_stops_cleanly(
    run_echod: type[Echod],
) -> None:
    """Stage kills within the window past max_restarts end the run with exit 70 and the
    reason, not a hang; the acquire stage is killed while it sleeps on the stop flag
    (paused), where a killed sleeper used to poison a multiprocessing.Event."""
    e = run_echod(
        "run",
        "--headless",
        "--set",
        "source.paused=true",
        "--set",
        "pipeline.max_restarts=2",
    )
    e.wait_for("stage acquire ready")
    for n in range(3):
        started = [x for x in e.stderr if "stage acquire started" in x][-1]
        os.kill(int(started.split("(pid ")[1][:-2]), signal.SIGKILL)
        if n < 2:
            e.wait_for(f"restart {n + 1}")
            up = n + 2  # ready lines so far: the first start and each restart

            wait_for(lambda up=up: sum("acquire ready" in x for x in e.stderr) >= up, 60, "up")
    code, _ = e.finish(timeout=60)
    assert code == 70, "".join(e.stderr)
    assert "not restarted again: 2 restart(s) within 60 s" in e.stderr[-1]
    assert not e.segments() and not e.leftovers()


def test_stop_after_killing_a_stage_that_sleeps_on_the_stop_flag(run_echod: type[Echod]) -> None:
    e = run_echod("run", "--headless", "--set", "source.paused=true")
    e.wait_for("stage acquire ready")
    pid = int(next(x for x in e.stderr if "stage acquire started" in x).split("(pid ")[1][:-2])
    os.kill(pid, signal.SIGKILL)  # asleep in stop.wait(): paused
    e.wait_for("stage acquire ready")
    semaphores = [m.path for p in e.leftovers() for m in p.memory_maps() if "/sem." in m.path]
    assert not semaphores, f"process-shared semaphores a killed process can poison: {semaphores}"
    e.proc.send_signal(signal.SIGTERM)
    code, _ = e.finish(timeout=30)
    assert code == 0, "".join(e.stderr)
    assert not e.segments() and not e.leftovers()


def test_a_frame_that_crashes_inference_is_skipped_not_retried(
    tmp_path: Path, engines: None
) -> None:
    """The poison-pill rule: the infer stage dies on frame 3 (its engine raises); the
    restarted stage resumes after it, the other frames all come out (mode all)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(8):
        value = 255 if i == 3 else 40 + 20 * i
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((64, 80), value, np.uint8))
    cfg = config.load(
        None,
        {
            "source.uri": str(folder),
            "source.pace": "none",
            "pipeline.mode": "all",
            "model.engine": "poison",
            "model.warmup": 0,
            "sink.headless": True,
            "control.enabled": False,
        },
    )
    s = Supervisor(cfg).run()
    assert s["restarts"] == {"infer": 1}
    assert (s["frames_in"], s["frames_out"]) == (8, 7)
    assert s["dropped"] == {"poisoned": 1}


# -- deterministic failures -------------------------------------------------------------


def strided_model(path: Path, fixed_pixels: int | None = None) -> Path:
    """A segmentation model with free height and width whose stride-32 branch needs sides
    in multiples of 32 (as real encoder-decoder networks do); with ``fixed_pixels`` it
    reshapes to a fixed size instead and fits no frame at all."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "h", "w"])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 2, "h", "w"])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 32, 32])
    nodes = [
        helper.make_node("MaxPool", ["image"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Resize", ["pooled", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["image", "up"], ["fg"]),
        helper.make_node("Neg", ["fg"], ["bg"]),
        helper.make_node("Concat", ["bg", "fg"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [scales]
    if fixed_pixels is not None:
        shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 1, fixed_pixels, 1])
        nodes.insert(0, helper.make_node("Reshape", ["image", "shape"], ["flat"]))
        nodes[1].input[0] = "flat"
        nodes[3].input[0] = "flat"
        inits.append(shape)
    graph = helper.make_graph(nodes, "strided", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def recording_run(model: Path, frames: int = 6) -> config.Config:
    return config.load(
        None,
        {
            "source.uri": str(need_data(WATERTANK)),
            "source.pace": "none",
            "source.frames": frames,
            "pipeline.mode": "all",
            "model.path": str(model),
            "model.warmup": 1,
            "sink.headless": True,
            "control.enabled": False,
        },
    )


def test_a_model_that_needs_multiples_of_32_runs_on_820x616_frames(tmp_path: Path) -> None:
    s = Supervisor(recording_run(strided_model(tmp_path / "strided.onnx"))).run()
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (6, 6, {})
    assert s["restarts"] == {}


def test_a_model_that_cannot_take_the_frames_fails_at_start_once(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    model = strided_model(tmp_path / "fixed.onnx", fixed_pixels=100 * 96)
    e = run_echod(
        "run", "--source", str(need_data(WATERTANK)), "--headless", "--model", str(model)
    )
    code, _ = e.finish(timeout=120)
    err = "".join(e.stderr)
    assert code == 65, err
    assert "Traceback" not in err and "restart" not in err
    last = e.stderr[-1]
    assert "fixed.onnx" in last and "616x820" in last, last
    with pytest.raises(ModelError, match="cannot take frames of 616x820"):
        Supervisor(recording_run(model)).run()


# -- what an operator sees ------------------------------------------------------------------


def test_a_paused_daemon_says_paused(runtime: Path) -> None:  # noqa: F811
    r = Running(live(runtime, **{"source.paused": True}))
    try:
        assert r.client().call("status")["state"] == "paused"
    finally:
        r.stop()


def test_scanner_state_is_reported_and_published(
    runtime: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_igtl import FAST, igtl_server, image_message

    with socket.socket() as s:  # a free port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = Running(
        live(
            runtime,
            **{
                "source.uri": f"igtl://127.0.0.1:{port}/Image",
                "source.igtl": {**FAST, "max_shape": [96, 128]},
                "sink.status_interval_s": 0.2,
            },
        )
    )
    c = r.client()
    try:
        state = wait_for(lambda: c.call("status")["source"].get("state"), 30, "state")
        assert state == "connecting"
        wait_for(lambda: "waiting for scanner at 127.0.0.1:" in capsys.readouterr().out, 10, "line")
        with igtl_server(port) as server:
            wait_for(lambda: c.call("status")["source"]["state"] == "connected", 30, "connect")
            server.send_message(image_message(0, time.time()), wait=True)
        src = wait_for(
            lambda: (st := c.call("status")["source"])["state"] == "disconnected" and st, 30, "gone"
        )
        assert src["endpoint"] == f"127.0.0.1:{port}/Image" and src["since"] > 0
    finally:
        c.close()
        r.stop()


def test_job_workers_are_ready_before_the_source_starts(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A job worker's start (a process importing echod) must not take the CPU from the
    first live frames: it is ready before the source is started."""
    cfg = config.load(
        None,
        {
            "source.frames": 5,
            "source.pace": "none",
            "pipeline.mode": "all",
            "model.warmup": 1,
            "offline.workers": 1,
            "sink.headless": True,
            "paths.state_dir": str(tmp_path / "state"),
            "paths.runtime_dir": str(tmp_path / "run"),
        },
    )
    with caplog.at_level(logging.INFO, logger="daemon.supervisor"):
        Supervisor(cfg).run()
    ready = [r.args[0] for r in caplog.records if r.msg.startswith("stage %s ready")]
    assert "jobs-0" in ready and ready.index("jobs-0") < ready.index("acquire"), ready
