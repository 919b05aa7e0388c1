"""Prometheus metrics: a live daemon's ``/metrics`` moves as frames flow and passes
``promtool check metrics`` (Debian's ``prometheus`` package); the sinks' histograms."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Histogram
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
        while (page := scrape(url))[1]["echod_frames_out_total{}"] <= first[
            "echod_frames_out_total{}"
        ] or "echod_frame_latency_seconds_count{}" not in page[1]:
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
