"""Several models on the same frames: ``[[model]]``, one infer stage and results ring per
model, counts, status and summary per model, restarts and hot swaps of one model.

The runs use the bundled ultrasound model twice, on ONNX Runtime and on OpenVINO, with
real stage processes over real rings (the headless sink: the same with and without
``$DISPLAY``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon import config, human, pipeline
from daemon.ctl import CtlError, parse_args
from daemon.display.headless import HeadlessSink
from daemon.errors import ConfigError
from daemon.frame import N_TIMINGS, WITHHELD, FrameMeta, Timing
from daemon.models import default_model
from daemon.reload import flat
from daemon.ring import Ring
from daemon.stage import InputPort, StageSpec, run_stage
from tests.conftest import Echod
from tests.test_control import Running, live, runtime, until  # noqa: F401 (fixture)
from tests.test_supervisor import strided_model

pytestmark = pytest.mark.timeout(240)

TWO = {"model.engine": "onnxruntime", "model.1.engine": "openvino", "model.1.warmup": 1}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "echod.toml"
    p.write_text(text)
    return p


# -- configuration ----------------------------------------------------------------------


def test_model_is_a_table_or_an_array_of_tables(tmp_path: Path) -> None:
    one = config.load(write(tmp_path, "[model]\nengine = 'openvino'\n"))
    assert [m.engine for m in one.models] == ["openvino"] and one.model is one.models[0]
    two = config.load(
        write(tmp_path, "[[model]]\nengine = 'onnxruntime'\n[[model]]\nengine = 'openvino'\n"),
        {"model.path": "first.onnx", "model.1.warmup": 0},
    )
    assert [(m.path, m.engine, m.warmup) for m in two.models] == [
        ("first.onnx", "onnxruntime", 3),
        ("", "openvino", 0),
    ], "--set model.path is the first model, model.1.warmup the second"
    # the command line adds the next one; the file's tables write back as [[model]]
    three = config.load(write(tmp_path, config.to_toml(two)), {"model.2.device": "cpu"})
    assert three.models[:2] == two.models and len(three.models) == 3
    assert "[[model]]" in config.to_toml(two) and "[model]\n" in config.to_toml(one)
    assert config.validate_change(two, "source.paused", True).models == two.models
    assert {"model.path", "model.1.engine"} <= set(flat(two)), "reload names model.1.*"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model = []\n", {}, "setting 'model' lists 0 models: give 1 to 6 [[model]] tables"),
        ("[[model]]\n" * 7, {}, "setting 'model' lists 7 models: give 1 to 6"),
        ("[[model]]\n[[model]]\nwarmup = -1\n", {}, "setting 'model.1.warmup'"),
        ("[[model]]\nengin = 'x'\n", {}, "did you mean 'model.engine'"),
        ("", {"model.2.path": "x.onnx"}, "--set model.2.path (command line): no setting"),
    ],
)
def test_a_bad_model_list_is_one_line(
    tmp_path: Path, text: str, overrides: dict[str, Any], expected: str
) -> None:
    origins = {k: f"--set {k} (command line)" for k in overrides}
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text), overrides, origins)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_each_model_gets_an_infer_stage_on_the_same_frames_and_a_results_ring() -> None:
    cfg = config.load(None, {**TWO, "igtl_out.enabled": True, "sink.headless": True})
    rings = {"frames": "f", "results": "r0", "results-1": "r1"}
    specs = {s.name: s for s in pipeline.build(cfg, rings, (64, 64))}
    infer, infer1 = specs["infer"], specs["infer-1"]
    assert infer.inputs == infer1.inputs == {"frames": InputPort("f", "newest")}
    assert (infer.outputs["results"].ring, infer1.outputs["results"].ring) == ("r0", "r1")
    assert (infer.params["model_index"], infer1.params["model_index"]) == (0, 1)
    for consumer in ("sink", "igtl_out"):
        assert {p: i.ring for p, i in specs[consumer].inputs.items()} == {
            "results": "r0",
            "results-1": "r1",
        }
    assert specs["sink"].inputs["results-1"].mode == "all", "the headless sink measures all"


def test_ctl_model_load_takes_the_path_then_which_model() -> None:
    assert parse_args("model.load", ["m.onnx", "index=1"]) == {
        "path": os.path.abspath("m.onnx"),
        "index": 1,
    }
    assert parse_args("model.load", ["m.onnx", "stage=infer-1"])["stage"] == "infer-1"
    with pytest.raises(CtlError, match="expected KEY=VALUE"):
        parse_args("model.load", ["m.onnx", "1"])


# -- the headless sink: every results port ------------------------------------------------


@pytest.fixture
def rings() -> Iterator[Callable[[str], Ring]]:
    made: list[Ring] = []

    def make(name: str) -> Ring:
        ring = Ring.create(f"{os.getpid()}-multi-{name}", slots=4, payload_bytes=4096)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()
        ring.unlink()


def test_headless_sink_reads_every_port_and_keeps_each_ones_figures(
    rings: Callable[[str], Ring],
) -> None:
    """Results on two ports, the payloads arbitrary bytes (the sink reads only the frame
    header): each port's count, withheld and Table 2 come back apart, and the sink goes
    on after the first port's stream ended, until the second's has too."""
    ports = {"results": rings("a"), "results-1": rings("b")}
    spec = StageSpec(
        "sink", "headless", inputs={p: InputPort(r.name, "all") for p, r in ports.items()}
    )
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    stop = threading.Event()
    cfg = config.load(None, {"sink.status_interval_s": 60.0})
    t = threading.Thread(target=run_stage, args=(HeadlessSink, spec, cfg, events, stop))
    t.start()
    until(lambda: all(r.stats()["readers"] for r in ports.values()), 30)
    payload = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)

    def send(port: str, count: int, inference: float) -> None:
        writer = ports[port].writer("block")
        for i in range(count):
            timings = np.zeros(N_TIMINGS, np.float32)
            timings[Timing.NN_INFERENCE] = inference
            flags = WITHHELD if i % 2 else 0
            meta = FrameMeta(index=i, t_acquired_ns=time.monotonic_ns(), timings_ms=timings)
            meta.flags = flags
            writer.write(payload, meta)
        writer.close_stream()

    try:
        send("results", 3, 10.0)
        until(lambda: ports["results"].stats()["readers"]["sink"]["read"] == 3, 30)
        send("results-1", 5, 20.0)  # after the first port's stream ended
        t.join(30)
        assert not t.is_alive(), "the sink ends once every port's stream has"
    finally:
        stop.set()
        t.join(30)
    done = next(e for e in iter_events(events) if e["event"] == "done")
    assert done["frames_out"] == 3 and done["stages"]["nn_inference"]["mean_ms"] == 10.0
    first, second = done["ports"]["results"], done["ports"]["results-1"]
    assert (first["frames_out"], second["frames_out"]) == (3, 5)
    assert second["stages"]["nn_inference"]["mean_ms"] == 20.0
    assert (first["withheld"]["frames"], second["withheld"]["frames"]) == (1, 2)


def iter_events(events: queue.Queue[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while not events.empty():
        yield events.get_nowait()


# -- two models in one run -------------------------------------------------------------------


def run_all(
    run_echod: type[Echod], n: int, settings: dict[str, object]
) -> tuple[Echod, dict[str, Any]]:
    """``echod run --mode all`` of ``n`` frames, unpaced, with ``settings``: the finished
    process (exit 0 asserted) and its JSON summary."""
    args = ["run", "--headless", "--json", "--mode", "all", "--set", f"source.frames={n}"]
    for key, value in {"source.pace": "none", **settings}.items():
        args += ["--set", f"{key}={value}"]
    e = run_echod(*args)
    code, out = e.finish(timeout=200)
    assert code == 0, "".join(e.stderr)
    return e, json.loads(out.strip().splitlines()[-1])


def test_two_models_in_mode_all_process_every_frame_each_with_its_table2(
    run_echod: type[Echod],
) -> None:
    n = 30
    e, s = run_all(run_echod, n, {**TWO, "model.warmup": 1})
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (n, n, {})
    models = {m["stage"]: m for m in s["models"]}
    assert [m["engine"] for m in s["models"]] == ["onnxruntime", "openvino"]
    for name, port in (("infer", "results"), ("infer-1", "results-1")):
        m = models[name]
        assert (m["port"], m["frames_out"], m["dropped"], m["skipped"]) == (port, n, {}, {})
        assert set(m["stages"]) == {"nn_input", "nn_inference", "nn_output"}
        assert all(t["n"] == n and t["mean_ms"] > 0 for t in m["stages"].values()), m
        assert 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]
    lines = human.run_summary(s)
    assert any(line.startswith("echod: infer-1 (") and "nn_inference" in line for line in lines)
    assert not e.segments() and not e.leftovers()


def test_a_segmenter_and_a_classifier_on_the_same_frames_in_mode_all(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    """Issue 17's pair: the bundled segmentation model and a 4-class channel-last
    classifier (fed the grey frames, replicated) each process every frame, 0 dropped,
    with their own Table 2; the second model's description says it classifies."""
    from tests import netmodels

    cls = netmodels.classifier(tmp_path / "view.onnx")
    n = 24
    _, s = run_all(run_echod, n, {"model.warmup": 1, "model.1.path": cls, "model.1.warmup": 1})
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (n, n, {})
    seg, clf = s["models"]
    for m in (seg, clf):
        assert (m["frames_out"], m["dropped"]) == (n, {}), m
        assert all(t["n"] == n and t["mean_ms"] > 0 for t in m["stages"].values()), m
    assert [o["role"] for o in seg["outputs"]] == ["segmentation"]
    assert [o["role"] for o in clf["outputs"]] == ["classification"]


def test_the_three_bundled_models_run_together_out_of_the_box(run_echod: type[Echod]) -> None:
    """config/examples/three-models.toml: segmentation, the view classifier and the
    needle-tip model (named by their bundled file names) on the phantom's sweep and
    needle, every frame through all three."""
    example = Path(__file__).resolve().parent.parent / "config/examples/three-models.toml"
    n = 12
    e = run_echod("run", "--config", str(example), "--headless", "--json", "--mode", "all",
                  "--frames", str(n), "--set", "model.warmup=1")  # fmt: skip
    code, out = e.finish(timeout=300)
    assert code == 0, "".join(e.stderr)
    s = json.loads(out.strip().splitlines()[-1])
    assert (s["frames_in"], s["frames_out"], s["dropped"]) == (n, n, {})
    got = [(m["model"], [o["role"] for o in m["outputs"]], m["frames_out"]) for m in s["models"]]
    assert got == [
        ("ultrasound-seg.onnx", ["segmentation"], n),
        ("ultrasound-view.onnx", ["classification"], n),
        ("ultrasound-needle.onnx", ["keypoints"], n),
    ]


def test_counts_add_up_after_a_stop_with_a_frame_in_flight(runtime: Path) -> None:  # noqa: F811
    """Mode newest, frames faster than inference: the stage is busy when the stop comes;
    the frame it was working on counts as dropped (infer), so in = out + dropped."""
    r = Running(live(runtime, **{"offline.workers": 0, "source.fps": 40.0}))
    c = r.client()
    until(lambda: c.call("status")["frames_out"] >= 3, 60)
    c.close()
    s = r.stop()
    assert s["frames_in"] == s["frames_out"] + sum(s["dropped"].values()), s
    (m,) = s["models"]
    assert (m["frames_out"], m["dropped"]) == (s["frames_out"], s["dropped"])


def test_a_second_model_that_cannot_take_the_frames_fails_at_start(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    model = strided_model(tmp_path / "fixed.onnx", fixed_pixels=100 * 96)
    e = run_echod("run", "--headless", "--set", f"model.1.path={model}")
    code, _ = e.finish(timeout=120)
    assert code == 65, "".join(e.stderr)
    assert "fixed.onnx" in e.stderr[-1] and "256x256" in e.stderr[-1], e.stderr[-1]
    assert "Traceback" not in "".join(e.stderr) and "restart" not in "".join(e.stderr)


def model_of(status: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(m for m in status["models"] if m["stage"] == stage)


def is_back(status: dict[str, Any]) -> bool:
    """infer-1 restarted once and running again."""
    st = status["stages"]["infer-1"]
    return bool(st["restarts"] == 1 and st["state"] == "running")


def test_status_shows_both_and_killing_one_infer_stage_leaves_the_other_running(
    runtime: Path,  # noqa: F811
) -> None:
    """Mode newest: model 1's stage is killed; model 0 keeps producing while it restarts
    (same pid, no restart), then both run; the counts add up for each."""
    r = Running(live(runtime, **{**TWO, "offline.workers": 0}))
    c = r.client()
    try:
        until(lambda: all(m["frames_out"] and m["fps"] for m in c.call("status")["models"]), 60)
        s = c.call("status")
        assert set(s["stages"]) == {"sink", "infer", "infer-1", "acquire"}
        assert [(m["stage"], m["port"], m["engine"]) for m in s["models"]] == [
            ("infer", "results", "onnxruntime"),
            ("infer-1", "results-1", "openvino"),
        ]
        for m in s["models"]:
            assert m["state"] == "running" and m["device"] and m["precision"], m
            assert m["timings_ms"]["nn_inference"] > 0 and m["withheld"]["frames"] >= 0, m
        assert "infer-1" in human.render(s)
        told = r.sup.workers["sink"].spec.params["models"]  # what the consumers learn
        assert [(m["stage"], m["port"], m["generation"]) for m in told] == [
            ("infer", "results", 0),
            ("infer-1", "results-1", 0),
        ]
        assert all("outputs" in m and m["classes"] for m in told), told
        pids = {name: st["pid"] for name, st in s["stages"].items()}
        before = model_of(s, "infer")["frames_out"]
        os.kill(pids["infer-1"], signal.SIGKILL)
        went_on, deadline = False, time.monotonic() + 60
        while not is_back(now := c.call("status")):  # model 1 down, then starting again
            went_on = went_on or model_of(now, "infer")["frames_out"] > before
            assert time.monotonic() < deadline, "infer-1 was not restarted"
            time.sleep(0.02)
        assert went_on, "model 0 produced nothing while model 1 was restarted"
        after = model_of(now, "infer-1")["frames_out"]
        until(lambda: model_of(c.call("status"), "infer-1")["frames_out"] > after, 30)
        infer = c.call("status")["stages"]["infer"]
        assert (infer["pid"], infer["restarts"]) == (pids["infer"], 0)
    finally:
        c.close()
    summary = r.stop()
    assert summary["restarts"] == {"infer-1": 1}
    for m in summary["models"]:
        assert summary["frames_in"] == m["frames_out"] + sum(m["dropped"].values()), m


def test_a_hot_swap_of_model_1_leaves_model_0_running(
    runtime: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Mode all: model 1 moves from OpenVINO to ONNX Runtime and a model file of another
    name while frames flow; model 0 keeps its stage and goes on through the swap, and
    neither loses a frame."""
    n = 150
    model = tmp_path / "models" / "swapped.onnx"
    model.parent.mkdir()
    shutil.copy(default_model(), model)
    r = Running(
        live(
            runtime,
            **TWO,
            **{
                "pipeline.mode": "all",
                "source.frames": n,
                "source.fps": 15.0,
                "offline.workers": 0,
                "control.roots": [str(model.parent)],
            },
        )
    )
    c = r.client(timeout_s=90)
    until(lambda: min(m["frames_out"] for m in c.call("status")["models"]) >= 5, 60)
    before = c.call("status")
    assert c.call("config.get", {"key": "model.1.engine"}) == "openvino"
    with pytest.raises(CtlError) as e:
        c.call("model.load", {"path": str(model), "index": 2})
    assert e.value.code == "bad_args" and "0 (infer), 1 (infer-1)" in e.value.message
    started = c.call("model.load", {"path": str(model), "index": 1, "engine": "onnxruntime"})
    assert started["state"] == "warming" and started["stage"] == "infer-1"
    done = c.wait_swap(started["swap"])
    assert done["state"] == "switched" and done["stage"] == "infer-1", done
    s = c.call("status")
    c.close()
    told = r.sup.workers["sink"].spec.params["models"]  # a restarted sink would draw with it
    assert [(m["port"], m["generation"], m["engine"]) for m in told] == [
        ("results", 0, "onnxruntime"),
        ("results-1", 1, "onnxruntime"),
    ]
    m0, m1 = model_of(s, "infer"), model_of(s, "infer-1")
    assert s["stages"]["infer"]["pid"] == before["stages"]["infer"]["pid"]
    assert (m0["generation"], m0["model"]) == (0, "ultrasound-seg.onnx")
    assert (m1["generation"], m1["model"], m1["engine"]) == (1, "swapped.onnx", "onnxruntime")
    assert m0["frames_out"] > model_of(before, "infer")["frames_out"], "model 0 went on"
    r.thread.join(120)
    summary = r.summary
    assert summary is not None, r.error
    assert summary["restarts"] == {}
    for m in summary["models"]:
        assert (m["frames_out"], m["dropped"]) == (n, {}), m
