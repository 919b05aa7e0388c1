"""Shared by the benchmarks: machine facts and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = Path(__file__).resolve().parent.parent / ".venv-peers"
"""pyFAST's own venv, made by ``bench/setup_peers.sh``."""


def fast_python(where: Path | None = None) -> tuple[str, dict[str, str]]:
    """The interpreter and environment that run pyFAST: a venv (``where/bin/python``; by
    default :data:`PEERS`), or a ``pip install --target`` folder on this interpreter's path.
    Exits naming the setup step where there is neither."""
    where = where or PEERS
    if (where / "bin" / "python").exists():
        return str(where / "bin" / "python"), dict(os.environ)
    if (where / "fast").is_dir():
        return sys.executable, {**os.environ, "PYTHONPATH": str(where)}
    raise SystemExit(f"no pyFAST in {where}: run bench/setup_peers.sh, or pass its folder")


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
