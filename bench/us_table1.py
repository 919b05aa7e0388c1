"""Case 1 side by side: echod and pyFAST, the same frames, the same model, OpenVINO on the CPU.

171 held-out simulator frames (256x256, the paper's count) are written once as a PLUS
recording (echod) and as numbered MetaImages (FAST's ImageFileStreamer); both run the
bundled ultrasound U-Net with OpenVINO on the CPU and process every frame as fast as they
can (echod: ``--mode all --pace none``). Rounds alternate pyFAST and echod at each
precision, so a shared machine's load hits them alike; the best round of each counts.
Writes ``bench/results/us_table1.json`` and ``.md``.

``--baseline DIR`` adds, in the same rounds, echod from another checkout at its default
precision (``before``: e.g. ``git archive main | tar -x -C DIR``); ``--probe`` runs both
on the 1x1-conv probe network of ``bench/infer_profile.py`` instead (framework overhead).

Setup (once): pyFAST in a venv of its own (``.venv-peers``), with Debian's PoCL and
libusb (installed when run as root)::

    bench/setup_peers.sh
    python bench/us_table1.py            # --pyfast DIR: another venv or pip --target folder

Cases 2 and 3 have their own benchmarks: ``bench/ct_table3.py`` and ``bench/wsi_table4.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import RESULTS, fast_python, machine, write_result
from infer_profile import probe_network

from daemon.frame import FrameMeta
from daemon.models import BUNDLED, ULTRASOUND
from daemon.phantoms.ultrasound import example
from daemon.record import SequenceWriter

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED0 = 500_000  # held-out seeds (the card's validation set)


def write_frames(folder: Path, n: int) -> tuple[Path, str]:
    """``n`` held-out frames as ``us.igs.mha`` and as ``frame_#.mhd``; (recording, pattern)."""
    images = [example(s).image for s in range(SEED0, SEED0 + n)]
    rec = folder / "us.igs.mha"
    writer = SequenceWriter(rec, images[0].shape, images[0].dtype, FrameMeta(shape=(256, 256)))
    for i, im in enumerate(images):
        writer.append(im, FrameMeta(index=i, t_source=i / 30, shape=im.shape, dtype="u1"))
        writer.commit()
        (folder / f"frame_{i}.raw").write_bytes(im.tobytes())
        (folder / f"frame_{i}.mhd").write_text(
            "ObjectType = Image\nNDims = 2\nDimSize = 256 256\nElementSpacing = 1 1\n"
            f"ElementType = MET_UCHAR\nElementDataFile = frame_{i}.raw\n"
        )
    writer.close()
    return rec, str(folder / "frame_#.mhd")


def echod(
    rec: Path, precision: str, runtime: Path, model: Path | None, root: Path = ROOT
) -> dict[str, Any]:
    args = [sys.executable, "-m", "daemon", "run", "--source", str(rec), "--mode", "all",
            "--pace", "none", "--engine", "openvino", "--device", "cpu", "--headless", "--json",
            "--set", f"paths.runtime_dir={runtime}",
            "--set", f"paths.state_dir={runtime}/state"]  # fmt: skip
    if precision != "auto":
        args += ["--set", f'model.options={{ precision = "{precision}" }}']
    if model is not None:
        args += ["--model", str(model)]
    p = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"echod failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    s = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: s.get(k) for k in ("fps", "frames_out", "precision", "precision_reason", "stages")}


def pyfast(pattern: str, where: Path | None, model: Path) -> dict[str, Any]:
    python, env = fast_python(where)
    cmd = [python, str(HERE / "_pyfast_us.py"), pattern, str(model), "OpenVINO"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if p.returncode != 0:
        raise SystemExit(f"pyFAST failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def table(runs: dict[str, list[dict[str, Any]]], load: list[float]) -> str:
    best = {k: max(r["fps"] for r in v) for k, v in runs.items()}
    median = {k: statistics.median(r["fps"] for r in v) for k, v in runs.items()}
    lines = [
        "| run | precision | frames/s (best) | x pyFAST | frames/s (median) | x pyFAST |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in runs.items():
        what = (
            f"pyFAST {rs[0].get('fast', '')} (OpenVINO, FAST's default)"
            if name == "pyfast"
            else f"echod `{name}`"
        )
        prec = "FAST's default" if name == "pyfast" else rs[0]["precision"]
        lines.append(
            f"| {what} | {prec} | {best[name]:.1f} | {best[name] / best['pyfast']:.2f} "
            f"| {median[name]:.1f} | {median[name] / median['pyfast']:.2f} |"
        )
    m = machine()
    return (
        "\n".join(lines)
        + f"\n\n{m['cpu']}, {m['cores']} cores, {m['when']}; load average during the "
        f"rounds {min(load):.1f}-{max(load):.1f}; {len(load)} rounds, alternating.\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pyfast", type=Path, help="pyFAST's venv or folder (.venv-peers)")
    p.add_argument("--frames", type=int, default=171)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precisions", default="auto,fp32,bf16")
    p.add_argument("--baseline", type=Path, help="another echod checkout, run as 'before'")
    p.add_argument("--probe", action="store_true", help="the 1x1-conv probe network")
    a = p.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    load: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        rec, pattern = write_frames(Path(tmp), a.frames)
        model = probe_network(Path(tmp) / "probe.onnx") if a.probe else None
        for r in range(a.rounds):
            print(f"round {r}: pyFAST", flush=True)
            runs.setdefault("pyfast", []).append(
                pyfast(pattern, a.pyfast, model or BUNDLED / ULTRASOUND)
            )
            if a.baseline:
                print(f"round {r}: echod before", flush=True)
                rt = Path(tmp) / f"rt{r}before"
                runs.setdefault("before", []).append(echod(rec, "auto", rt, model, a.baseline))
            for prec in a.precisions.split(","):
                print(f"round {r}: echod {prec}", flush=True)
                rt = Path(tmp) / f"rt{r}{prec}"
                runs.setdefault(prec, []).append(echod(rec, prec, rt, model))
            load.append(os.getloadavg()[0])
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]['fps']:.1f}" for k, v in runs.items()))
    best = {k: max(v, key=lambda x: x["fps"]) for k, v in runs.items()}
    name = "us_table1_probe" if a.probe else "us_table1"
    write_result(name, {"frames": a.frames, "runs": runs, "best": best, "load": load})
    md = RESULTS / f"{name}.md"
    what = "the 1x1-conv probe network" if a.probe else "the bundled U-Net"
    md.write_text(
        f"# Case 1: echod and pyFAST, {what}, OpenVINO CPU, mode all\n\n" + table(runs, load)
    )
    print(md.read_text())


if __name__ == "__main__":
    main()
