"""Prometheus metrics: a live daemon's ``/metrics`` moves as frames flow and passes
``promtool check metrics`` (Debian's ``prometheus`` package); the sinks' histograms; the
newest result of each model as gauges."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import config, results
from daemon.config import MetricsConfig
from daemon.exporter import Exporter
from daemon.frame import FrameMeta
from daemon.metrics import Histogram
from daemon.results import Output
from daemon.ring import Ring
from daemon.stage import StageSpec
from daemon.supervisor import Supervisor, Worker
from tests.conftest import Echod

pytestmark = pytest.mark.timeout(180)


def test_a_histogram_counts_each_sample_under_the_first_bound_it_does_not_exceed() -> None:
    h = Histogram((1.0, 10.0))
    for x in (0.5, 1.0, 1.5, 10.0, 99.0):
        h.add(x)
    assert h.snapshot() == {"bounds": [1.0, 10.0], "counts": [2, 4, 5], "sum": 112.0}


def scrape(url: str) -> tuple[str, dict[str, float]]:
    """The page and its samples by name and labels (``name{k=v,...}``)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return text, samples


def test_a_live_run_serves_metrics_that_move_and_pass_promtool(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="em-"))
    e = run_echod(
        "run",
        "--headless",
        "--set",
        f"paths.runtime_dir={runtime}",
        "--set",
        f"paths.state_dir={tmp_path}",
        *("--set", "metrics.enabled=true", "--set", "metrics.port=0"),
        *("--set", "dicom.enabled=true", "--set", "dicom.port=0"),
    )
    try:
        url = e.wait_for("metrics on http://127.0.0.1:", 120).split("metrics on ", 1)[1].strip()
        deadline = time.monotonic() + 60
        while (first := scrape(url)[1]).get("echod_frames_in_total{}", 0) == 0:
            assert time.monotonic() < deadline, "no frame counted"
            time.sleep(0.1)
        counters = ("echod_frames_in_total{}", "echod_frames_out_total{}")
        while not (
            all((page := scrape(url))[1][k] > first[k] for k in counters)
            and page[1].get("echod_frame_latency_seconds_count{}", 0) > 0  # the sink's stats
        ):
            assert time.monotonic() < deadline, "the counters do not move"
            time.sleep(0.1)
        text, samples = page
        assert samples["echod_frames_in_total{}"] > first["echod_frames_in_total{}"]
        assert samples["echod_frame_latency_seconds_count{}"] > 0
        assert samples["echod_step_duration_seconds_count{step=nn_inference}"] > 0
        assert samples["echod_stage_up{stage=infer}"] == 1
        assert samples["echod_stage_restarts_total{stage=infer}"] == 0
        assert samples["echod_jobs{state=queued}"] == 0
        assert samples["echod_dicom_associations_total{outcome=accepted,role=scp}"] == 0
        assert any(k.startswith("echod_model_info{") for k in samples)
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is missing: apt-get install prometheus")
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_metrics_are_off_by_default_and_bound_to_localhost() -> None:
    from daemon.config import Config

    assert not Config().metrics.enabled and Config().metrics.host == "127.0.0.1"
    assert not Config().dicom.enabled and Config().dicom.host == "127.0.0.1"


def test_the_newest_result_of_each_model_is_a_gauge(tmp_path: Path) -> None:
    """The exporter of a supervisor holding real results rings: the newest record of each
    model becomes gauges named from the model's description; a ring whose newest payload is
    not a record (or is from another generation) gives none, and the page passes promtool."""
    nan = float("nan")
    record = results.pack(
        [
            Output("classification", "view", np.array([0.25, 0.75], np.float32)),
            Output("detection", "boxes", np.array([[1, 2, 3, 4, 0.9, 1]] * 2, np.float32)),
            Output("keypoints", "tip", np.array([[5, 6, 0.93], [nan, nan, 0.1]], np.float32)),
            Output("regression", "depth", np.array([42.5], np.float32)),
        ]
    )
    description = {
        "model": "multitask.onnx",
        "outputs": [
            {
                "name": "view",
                "role": "classification",
                "classes": [{"name": "no"}, {"name": "yes"}],
            },
            {
                "name": "boxes",
                "role": "detection",
                "classes": [{"name": "needle"}, {"name": "tip"}],
            },
            {"name": "tip", "role": "keypoints", "names": ["tip", "heel"]},
            {"name": "depth", "role": "regression", "names": ["depth"], "units": ["mm"]},
        ],
    }
    sup = Supervisor(config.load(None, {"paths.state_dir": str(tmp_path)}))
    tag = f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}"
    for name in ("frames", "results", "results-1", "results-2"):
        sup.rings[name] = Ring.create(f"{tag}-{name}", slots=2, payload_bytes=1 << 16)
    for stage, generation in (("infer", 0), ("infer-1", 0), ("infer-2", 1)):
        sup.workers[stage] = Worker(StageSpec(stage, "infer", generation=generation))
        sup.workers[stage].info.update(description)
    stamp = FrameMeta(index=7, t_acquired_ns=time.monotonic_ns())
    older = results.pack([Output("classification", "view", np.array([0.6, 0.4], np.float32))])
    writer = sup.rings["results"].writer()
    writer.write(older, stamp)
    writer.write(record, stamp)  # the newest: the one the gauges show
    sup.rings["results-1"].writer().write(np.zeros((4, 4), np.uint8), stamp)  # not a record
    sup.rings["results-2"].writer().write(record, stamp)  # generation 0: the stage is at 1
    exporter = Exporter(MetricsConfig(enabled=True, port=0), sup)
    try:
        text, samples = scrape(f"http://127.0.0.1:{exporter.port}/metrics")
    finally:
        exporter.close()
        for ring in sup.rings.values():
            ring.close()
            ring.unlink()
    m = "model=multitask.onnx"
    expected = {
        f"echod_classification_probability{{class=no,{m},output=view,stage=infer}}": 0.25,
        f"echod_classification_probability{{class=yes,{m},output=view,stage=infer}}": 0.75,
        f"echod_detections{{class=needle,{m},output=boxes,stage=infer}}": 0.0,
        f"echod_detections{{class=tip,{m},output=boxes,stage=infer}}": 2.0,
        f"echod_keypoint_found{{{m},output=tip,point=tip,stage=infer}}": 1.0,
        f"echod_keypoint_found{{{m},output=tip,point=heel,stage=infer}}": 0.0,
        f"echod_keypoint_score{{{m},output=tip,point=tip,stage=infer}}": 0.93,
        f"echod_keypoint_score{{{m},output=tip,point=heel,stage=infer}}": 0.1,
        f"echod_regression_value{{{m},output=depth,stage=infer,unit=mm,value=depth}}": 42.5,
    }
    for key, figure in expected.items():
        assert samples.get(key) == pytest.approx(figure, abs=1e-6), key
    assert samples["echod_result_withheld{model=multitask.onnx,stage=infer}"] == 0
    assert 0 <= samples["echod_result_age_seconds{model=multitask.onnx,stage=infer}"] < 60
    results_of = [k for k in samples if "model=" in k and "stage=infer-" in k]
    assert not results_of, "only valid records of the stage's generation"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: apt-get install prometheus")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
