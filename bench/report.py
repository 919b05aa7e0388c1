"""The results page: every benchmark's JSON in ``bench/results/`` as Markdown tables and PNG plots.

Run the benchmarks first (each writes ``bench/results/NAME.json`` with its machine), then::

    python bench/report.py [--results bench/results]

It writes ``bench/results/README.md`` (machine, tables, how to rerun each) and, per
benchmark, ``NAME-stages.png`` (time per step, per contender: the paper's Tables 2-4)
and ``NAME-latency.png`` (latency percentiles, where measured). Needs matplotlib (the
``bench`` extra). Numbers are the benchmarks'; this only draws them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RERUN = {  # how to produce each result (the module docstrings say more)
    "us_table1": "bench/setup_peers.sh && python bench/us_table1.py",
    "table2": "python bench/table2.py --device cpu",
    "live_pipeline": "python bench/live_pipeline.py  (GPU: --engine pytorch --device cuda)",
    "ct_table3": "bench/setup_peers.sh && python bench/ct_table3.py",
    "wsi_table4": "bench/setup_peers.sh && python bench/wsi_table4.py",
    "wsi_dask_scaling": "python bench/wsi_dask_scaling.py --workers 1,2,4,8",
    "ring_hop": "python bench/ring_hop.py",
    "jobs_live": "python bench/jobs_live.py",
}
STEP_KEYS = ("stages", "ms_per_patch", "per_patch_ms", "table2_ms")
STEPS = ("generator", "wait", "nn_input", "nn_inference", "nn_output", "record", "stitcher")
PERCENTILES = ("p50", "p90", "p95", "p99", "p99.9", "max")


def step_times(data: Any, path: str = "") -> Iterator[tuple[str, dict[str, float]]]:
    """(contender, {step: ms}) for every per-step timing table found in ``data``: a dict
    under one of ``STEP_KEYS``, or one with at least two of ``STEPS``, whose values are
    numbers, ``{"mean_ms": x}``, ``{"mean": x}`` or ``{"p50": x}``; the contender is named
    by the nearest "row"/"system" or the path."""
    if isinstance(data, dict):
        label = str(data.get("row") or data.get("system") or path or "run")
        for key in STEP_KEYS:
            steps = _ms(data.get(key))
            if steps:
                yield label, steps
        if sum(k in STEPS for k in data) >= 2:  # the steps themselves, e.g. one role's
            yield label, _ms({k: v for k, v in data.items() if k in STEPS})
            return
        for key, value in data.items():
            if key not in STEP_KEYS:
                yield from step_times(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from step_times(value, f"{path}[{i}]")
    # numbers and strings hold no table


def _ms(table: Any) -> dict[str, float]:
    if not isinstance(table, dict):
        return {}
    out: dict[str, float] = {}
    for step, v in table.items():
        if isinstance(v, dict):
            v = v.get("mean_ms", v.get("mean", v.get("p50")))
        if isinstance(v, int | float) and not isinstance(v, bool) and step != "total":
            out[str(step)] = float(v)
    return out if len(out) >= 2 else {}


def latencies(data: Any, path: str = "") -> Iterator[tuple[str, dict[str, float]]]:
    """(where, {percentile: ms}) for every ``latency_ms`` dict in ``data``."""
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key.startswith("latency") and isinstance(value, dict):
                points = {p: float(value[p]) for p in PERCENTILES if p in value}
                if points:
                    yield path or key, points
            else:
                yield from latencies(value, where)


def plot_steps(name: str, rows: list[tuple[str, dict[str, float]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(dict.fromkeys(s for _, t in rows for s in t))
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows)))
    left = [0.0] * len(rows)
    for step in steps:
        widths = [t.get(step, 0.0) for _, t in rows]
        ax.barh([r for r, _ in rows], widths, left=left, label=step)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("ms (mean per frame or patch)")
    ax.set_title(f"{name}: time per step")
    ax.invert_yaxis()
    ax.legend(fontsize="small", ncol=min(4, len(steps)), loc="lower right")
    fig.tight_layout()
    path = out / f"{name}-stages.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency(name: str, series: list[tuple[str, dict[str, float]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, points in series:
        ax.plot(list(points), list(points.values()), marker="o", label=label)
    ax.set_ylabel("latency, ms")
    ax.set_xlabel("percentile")
    ax.set_title(f"{name}: latency distribution")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / f"{name}-latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rerun(name: str) -> str:
    """The command that makes result ``name``: from :data:`RERUN`, else the benchmark
    whose file name begins it (``roles-onnxruntime`` -> ``bench/roles.py``)."""
    known = next((cmd for key, cmd in RERUN.items() if name.startswith(key)), None)
    if known:
        return known
    scripts = sorted((p.stem for p in HERE.glob("[!_]*.py")), key=len, reverse=True)
    script = next((s for s in scripts if name.startswith(s)), name)
    return f"python bench/{script}.py"


def section(name: str, data: dict[str, Any], out: Path) -> str:
    m = data.get("machine", {})
    lines = [f"## {name}", ""]
    if m:
        lines.append(
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, Python {m.get('python', '?')}, "
            f"{m.get('when', '?')}"
        )
        lines.append("")
    rows = list(step_times({k: v for k, v in data.items() if k != "machine"}))
    if rows:
        steps = list(dict.fromkeys(s for _, t in rows for s in t))
        lines += [
            "| | " + " | ".join(steps) + " | sum |",
            "| --- |" + " --- |" * (len(steps) + 1),
        ]
        for label, t in rows:
            cells = " | ".join(f"{t[s]:.2f}" if s in t else "" for s in steps)
            lines.append(f"| {label} | {cells} | {sum(t.values()):.2f} |")
        lines += ["", f"![time per step]({plot_steps(name, rows, out).name})", ""]
    lat = list(latencies(data))
    if lat:
        lines += ["| latency (ms) | " + " | ".join(PERCENTILES) + " |"]
        lines += ["| --- |" + " --- |" * len(PERCENTILES)]
        for label, points in lat:
            cells = " | ".join(f"{points[p]:.2f}" if p in points else "" for p in PERCENTILES)
            lines.append(f"| {label} | {cells} |")
        lines += ["", f"![latency]({plot_latency(name, lat, out).name})", ""]
    lines += [f"Rerun: `{rerun(name)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    a = p.parse_args(argv)
    files = sorted(a.results.glob("*.json"))
    if not files:
        print(f"no results in {a.results}: run the benchmarks first", file=sys.stderr)
        return 1
    parts = ["# Benchmark results", "", "Generated by `python bench/report.py` from", ""]
    parts += [f"- `{f.name}`" for f in files] + [""]
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipped {f.name}: {e}", file=sys.stderr)
            continue
        if isinstance(data, dict):
            parts.append(section(f.stem, data, a.results))
    page = a.results / "README.md"
    page.write_text("\n".join(parts))
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
