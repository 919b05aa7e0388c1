"""The live pipeline end to end: real processes, real rings, real ONNX Runtime."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from daemon import config
from daemon.ring import remove_stale_segments
from daemon.supervisor import Supervisor
from tests import netmodels
from tests.conftest import DATA, WATERTANK, Echod, need_data

pytestmark = pytest.mark.timeout(240)


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_recording_mode_all_processes_every_frame(run_echod: type[Echod]) -> None:
    rec = need_data(WATERTANK)
    e = run_echod("run", "--source", str(rec), "--mode", "all", "--headless", "--json")
    code, out = e.finish(timeout=200)
    assert code == 0, "".join(e.stderr)
    s = summary(out)
    assert (s["frames_in"], s["frames_out"], s["dropped"], s["skipped"]) == (201, 201, {}, {})
    assert set(s["stages"]) == {"nn_input", "nn_inference", "nn_output"}
    assert all(s["stages"][k]["n"] == 201 for k in s["stages"])
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert s["engine"] == "onnxruntime" and s["model"] and s["device"]
    assert not e.segments() and not e.leftovers()
    # every module a stage needs is imported at setup: an import while frames flow is a
    # hitch in the stream (numpy's first percentile: 60 ms on the NVIDIA test machine)
    assert not [line for line in e.stderr if "while frames flowed" in line]


@pytest.mark.parametrize("workers", ["processes", "threads"])
def test_newest_mode_drop_counts_add_up(workers: str) -> None:
    # frames come faster than the engine runs: inference skips to the newest frame
    cfg = config.load(
        None,
        {
            "source.pace": "fps",
            "source.fps": 500.0,
            "source.frames": 150,
            "source.synthetic.loop_s": 0.1,  # a short loop, rendered once: frames come fast
            "pipeline.mode": "newest",
            "pipeline.workers": workers,
            "model.warmup": 1,
            "sink.headless": True,  # the same with and without $DISPLAY
            "sink.status_interval_s": 60.0,
        },
    )
    s = Supervisor(cfg).run()
    assert s["frames_in"] == 150
    assert s["dropped"]["infer"] > 0, "inference skipped to newer frames"
    assert s["frames_out"] + sum(s["dropped"].values()) == s["frames_in"]


def test_mode_all_gives_every_consumer_every_label_map(tmp_path: Path) -> None:
    """With OpenIGTLink output on, mode "all" sends every label map (nothing skipped) and
    the counts add up: nothing counted twice across readers or rings."""
    cfg = config.load(
        None,
        {
            "source.pace": "none",
            "source.frames": 40,
            "pipeline.mode": "all",
            "model.warmup": 1,
            "igtl_out.enabled": True,
            "igtl_out.port": 0,
            "sink.headless": True,
        },
    )
    s = Supervisor(cfg).run()
    assert (s["frames_in"], s["frames_out"]) == (40, 40)
    assert s["dropped"] == {} and s["skipped"] == {}
    assert s["igtl_out"]["sent"] == 0  # its figures are in the summary; no client came


def test_sigkill_of_a_stage_restarts_it_and_stop_leaves_no_segment(run_echod: type[Echod]) -> None:
    e = run_echod(
        "run", "--source", "synthetic", "--pace", "fps", "--fps", "20", "--headless", "--json"
    )
    e.wait_for("stage acquire ready")
    infer = next(line for line in e.stderr if "stage infer started" in line)
    pid = int(infer.split("(pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGKILL)
    e.wait_for("stage infer died")
    e.wait_for("stage infer ready")
    e.wait_for("echod: ")  # status lines: frames flow through the restarted stage
    e.wait_for("echod: ")
    assert e.segments(), "the rings exist while running"
    e.proc.send_signal(signal.SIGTERM)
    code, out = e.finish(timeout=60)
    assert code == 0, "".join(e.stderr)
    s = summary(out)
    assert s["restarts"] == {"infer": 1} and s["stopped_by"] == "SIGTERM"
    assert s["frames_out"] > 0
    assert not e.segments()
    assert not e.leftovers()


def test_supervisor_killed_takes_its_stages_and_next_start_cleans_up(
    run_echod: type[Echod],
) -> None:
    e = run_echod("run", "--source", "synthetic", "--headless")
    e.wait_for("stage acquire ready")
    assert e.segments()
    e.proc.kill()
    e.proc.wait(10)
    deadline_ok = _eventually(lambda: not e.leftovers(), 10.0)
    assert deadline_ok, f"stages outlived the supervisor: {e.leftovers()}"
    stale = e.segments()
    assert stale, "a SIGKILLed supervisor cannot clean up itself"
    removed = remove_stale_segments()
    assert set(stale) <= {f"echod-{name}" for name in removed}
    assert not e.segments()


def _eventually(check, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def volume_model(path: Path) -> Path:
    """A tiny valid 3-D (NCDHW) model: it cannot take 2-D frames."""
    x = helper.make_tensor_value_info("volume", TensorProto.FLOAT, [1, 1, 8, 32, 32])
    y = helper.make_tensor_value_info("labels", TensorProto.FLOAT, [1, 1, 8, 32, 32])
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["volume"], ["labels"])], "vol", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)
    return path


def misfit_card(tmp: Path) -> Path:
    """A classifier whose card calls its (N, 4) output a detection."""
    card = 'task = "classification"\n[[outputs]]\ntensor = "probs"\nrole = "detection"\n'
    return netmodels.classifier(tmp / "views.onnx", card)


def truncated_recording(tmp: Path) -> Path:
    data = need_data(WATERTANK).read_bytes()
    out = tmp / "cut.igs.mha"
    out.write_bytes(data[: len(data) // 2])
    return out


BAD_INPUTS = {
    "missing recording": (lambda t: ["--source", str(t / "nope.mha")], 66, "no such file"),
    "corrupt recording": (lambda t: ["--source", str(truncated_recording(t))], 66, "cut.igs.mha"),
    "CT slice as cine": (
        lambda t: ["--source", str(need_data(DATA / "ct" / "ct-3slice" / "01.dcm"))],
        66,
        "echod submit ct",
    ),
    "model rank": (lambda t: ["--model", str(volume_model(t / "vol.onnx"))], 65, "5-D"),
    "sequence longer than the ring": (
        lambda t: [
            "--model",
            str(netmodels.sequence(t / "seq.onnx")),
            "--set",
            "pipeline.ring_slots=5",
        ],
        78,
        "model seq.onnx takes the last 4 frames: the frames ring needs more than 5 slots",
    ),
    "card role misfit": (
        lambda t: ["--model", str(misfit_card(t))],
        65,
        "model views.onnx output 'probs' (?, 4) cannot be role detection: it needs (1, N, 6)",
    ),
    "unknown key": (
        lambda t: ["--set", "source.fpss=30"],
        78,
        "--set source.fpss (command line): unknown setting 'source.fpss': did you mean "
        "'source.fps'?",
    ),
    "wrong type": (lambda t: ["--set", 'source.fps="fast"'], 78, "source.fps"),
    "bad config file": (
        lambda t: ["--config", str(_write(t / "c.toml", "[pipeline]\nmode = 3\n"))],
        78,
        "pipeline.mode",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_nothing_keeps_running(
    case: str, tmp_path: Path, run_echod: type[Echod]
) -> None:
    make_args, exit_code, text = BAD_INPUTS[case]
    e = run_echod("run", "--headless", "--frames", "5", *make_args(tmp_path))
    code, _ = e.finish(timeout=120)
    last = e.stderr[-1] if e.stderr else ""
    assert code == exit_code, "".join(e.stderr)
    assert last.startswith("echod: error: ") and text in last, last
    assert "Traceback" not in "".join(e.stderr)
    assert not e.segments()
    assert not e.leftovers()


def test_the_closing_line_adds_up(run_echod: type[Echod]) -> None:
    """Without --json the run ends with one line whose counts add up."""
    import re

    e = run_echod(
        "run",
        "--headless",
        "--pace",
        "fps",
        "--fps",
        "400",
        "--set",
        "source.frames=80",
        "--set",
        "source.synthetic.loop_s=0.1",
        "--set",
        "model.warmup=1",
    )
    code, out = e.finish(timeout=120)
    assert code == 0, "".join(e.stderr)
    line = out.strip().splitlines()[-1]
    m = re.match(r"echod: (\d+) frames in = (\d+) out \+ (\d+) dropped(?: \(([^)]*)\))? \|", line)
    assert m, line
    n_in, n_out, n_dropped = (int(m.group(i)) for i in (1, 2, 3))
    causes = {k: int(v) for k, v in (c.split() for c in (m.group(4) or "").split(", ") if c)}
    assert n_in == 80 and n_out + n_dropped == n_in and sum(causes.values()) == n_dropped


@pytest.mark.parametrize(
    ("build", "engine"),
    [(netmodels.classifier, "openvino"), (netmodels.segmenter, "onnxruntime")],
)
def test_a_classifier_and_a_three_channel_segmenter_run_live_from_grey_frames(
    build: Any, engine: str, tmp_path: Path, run_echod: type[Echod]
) -> None:
    """The issue's models through a real daemon: every grey phantom frame has a result,
    and the run summary says how grey frames reach the 3-channel models."""
    model = build(tmp_path / "model.onnx")
    e = run_echod(
        "run", "--model", str(model), "--engine", engine, "--mode", "all", "--frames", "20",
        "--headless", "--json", "--set", "model.warmup=1",
    )  # fmt: skip
    code, out = e.finish(timeout=200)
    assert code == 0, "".join(e.stderr)
    s = summary(out)
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (20, 20, {})
    assert s["engine"] == engine and s["model"] == "model.onnx"
    assert s["input_conversion"] == "gray frames replicated to the model's 3 channels"
    assert all(s["stages"][k]["n"] == 20 for k in ("nn_input", "nn_inference", "nn_output"))
