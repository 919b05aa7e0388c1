"""bench/report.py: the results page from benchmark JSON (tables and PNG plots)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import report

PNG = b"\x89PNG\r\n\x1a\n"


def test_results_page_has_each_benchmarks_steps_latency_and_rerun(tmp_path: Path) -> None:
    live = {
        "machine": {"cpu": "testcpu", "cores": 2, "python": "3.12", "when": "now"},
        "pipeline_all": {
            "fps": 100.0,
            "stages": {"nn_input": {"mean_ms": 0.5}, "nn_inference": {"mean_ms": 7.25}},
        },
        "newest": {"latency_ms": {"p50": 1.5, "p99": 3.0, "max": 9.0}},
    }
    table2 = {"table2_ms": [], "rows": [{"row": "ORT fp32", "ms_per_patch": {"a": 1, "b": 2}}]}
    (tmp_path / "live_pipeline_cpu.json").write_text(json.dumps(live))
    (tmp_path / "ct_table3.json").write_text(json.dumps(table2))
    seg = {"output": [1, 3], "nn_input": {"p50": 1}, "nn_inference": {"p50": 2}}
    roles = {"roles": {"seg": seg}}
    (tmp_path / "roles-cpu.json").write_text(json.dumps(roles))
    (tmp_path / "broken.json").write_text("{not json")
    assert report.main(["--results", str(tmp_path)]) == 0
    page = (tmp_path / "README.md").read_text()
    assert "testcpu, 2 cores" in page
    assert "| pipeline_all | 0.50 | 7.25 | 7.75 |" in page
    assert "| newest | 1.50 |  |  | 3.00 |  | 9.00 |" in page
    assert "| ORT fp32 | 1.00 | 2.00 | 3.00 |" in page
    assert "| roles.seg | 1.00 | 2.00 | 3.00 |" in page
    assert "python bench/live_pipeline.py" in page and "python bench/ct_table3.py" in page
    assert "Rerun: `python bench/roles.py`" in page  # the script whose name begins the result
    for png in ("live_pipeline_cpu-stages.png", "live_pipeline_cpu-latency.png",
                "ct_table3-stages.png"):  # fmt: skip
        assert (tmp_path / png).read_bytes().startswith(PNG)
        assert f"]({png})" in page


def test_no_results_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--results", str(tmp_path)]) == 1
    assert "run the benchmarks first" in capsys.readouterr().err
