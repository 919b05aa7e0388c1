"""Where the infer stage's time goes, with a network that costs almost nothing.

The 1x1-conv probe network (one gray 256x256 input, three classes: inference is a few
microseconds) makes everything but inference visible. In one run:

- engine rate: the engine alone on the prepared frames (ONNX Runtime, CPU, mode "all");
- pipeline: ``echod run --mode all --pace none`` on 64 pre-rendered phantom frames
  (a PLUS recording, looped: the simulator would be the limit), stages as processes;
- ratio = pipeline frames/s / engine rate;
- ``--profile``: the same run with the stages as threads of this process
  (``pipeline.workers = "threads"``: they share one GIL, so its rate is lower), the
  infer stage under cProfile, its top functions by own time.

Alternate runs (``--repeat``) and read the load it prints: the machine may be shared.
``--unet`` profiles the reference U-Net instead, ``--engine``/``--device`` another engine
(``--engine pytorch --device cuda --unet``: the GPU pipeline), ``--set`` adds settings,
``--synthetic`` takes the phantom's pre-rendered loop as the source (a machine without
SimpleITK, which reads recordings).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from _common import write_result
from onnx import TensorProto, helper, numpy_helper

from daemon import config as config_mod
from daemon import supervisor
from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.config import Config
from daemon.engines.reference import ensure_reference
from daemon.engines.segmenter import Segmenter
from daemon.frame import FrameMeta
from daemon.record import SequenceWriter

CARD = """task = "segmentation"
[[classes]]
name = "background"
colour = [0, 0, 0]
[[classes]]
name = "a"
colour = [255, 0, 0]
[[classes]]
name = "b"
colour = [0, 0, 255]
"""


def probe_network(path: Path) -> Path:
    """1x1 convolution, 1 -> 3 channels, 256x256: inference costs next to nothing."""
    w = np.array([[[[0.0]]], [[[-8.0]]], [[[8.0]]]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 256, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 256, 256])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)
    path.with_suffix(".toml").write_text(CARD)
    return path


def phantom_recording(path: Path) -> list[np.ndarray]:
    """64 frames of the default phantom as a PLUS recording at ``path`` (and as arrays):
    a recording is memory-mapped, so the source costs little next to the infer stage."""
    src = SyntheticSource(SyntheticSettings(width=256, height=256))
    frames = [f.image.copy() for _, f in zip(range(64), src.frames(), strict=False)]
    meta = FrameMeta(shape=frames[0].shape, dtype="u1")
    writer = SequenceWriter(path, frames[0].shape, frames[0].dtype, meta)
    for i, f in enumerate(frames):
        writer.append(f, FrameMeta(index=i, t_source=i / 30, shape=f.shape, dtype="u1"))
        writer.commit()
    writer.close()
    return frames


def engine_rate(
    model: Path, frames: list[np.ndarray], n: int, engine: str = "onnxruntime", device: str = "cpu"
) -> float:
    with Segmenter.open(model, engine=engine, device=device, mode="all") as seg:
        xs = [seg.prepare(frames[i % 64]) for i in range(n)]
        for _ in seg.engine.run_many({seg.input.name: x} for x in xs[:50]):
            pass
        t0 = time.perf_counter()
        for _ in seg.engine.run_many({seg.input.name: x} for x in xs):
            pass
        return n / (time.perf_counter() - t0)


def pipeline(
    model: Path,
    folder: Path | None,
    n: int,
    runtime: Path,
    workers: str,
    engine: str = "onnxruntime",
    device: str = "cpu",
    settings: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """Summary of one run, and (threads) the infer stage's profile (top by own time)."""
    stats = io.StringIO()
    original = supervisor._thread_main

    def profiled(spec: Any, config: Any, events: Any, stop: Any, commands: Any) -> None:
        prof = cProfile.Profile(time.thread_time)  # CPU time: not the GIL waits of threads
        prof.runcall(original, spec, config, events, stop, commands)
        st = pstats.Stats(prof, stream=stats)
        stats.write(f"stage {spec.name}: {st.total_tt:.3f} s CPU\n")  # type: ignore[attr-defined]
        if spec.kind == "infer":
            st.sort_stats("tottime").print_stats(20)
        return None

    cfg = config_mod.load(
        None,
        {
            **(
                {
                    "source.uri": "synthetic",
                    "source.synthetic.loop_s": 0.25,
                    "source.synthetic.prerender": True,
                }
                if folder is None
                else {"source.uri": str(folder)}
            ),
            "source.loop": True,
            "source.frames": n,
            "source.pace": "none",
            "pipeline.mode": "all",
            "pipeline.workers": workers,
            "model.path": str(model),
            "model.engine": engine,
            "model.device": device,
            "sink.headless": True,
            "paths.runtime_dir": str(runtime),
            "paths.state_dir": str(runtime / "state"),
            **(settings or {}),
        },
    )
    supervisor._thread_main = profiled
    try:
        summary = supervisor.Supervisor(cfg).run()
    finally:
        supervisor._thread_main = original
    return summary, stats.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=2, help="alternating engine/pipeline rounds")
    p.add_argument("--profile", action="store_true", help="print the infer stage's profile")
    p.add_argument("--engine", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--unet", action="store_true", help="the reference U-Net, not the probe")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for the pipeline")
    p.add_argument("--synthetic", action="store_true", help="the phantom's loop as the source")
    a = p.parse_args()
    settings = {k: config_mod.toml_or_str(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.unet:
            fmt = "pt2" if a.engine == "pytorch" else "onnx"
            model = ensure_reference("unet2d-256", Config().paths.cache(), fmt=fmt)
        else:
            model = probe_network(Path(tmp) / "probe.onnx")
        folder = Path(tmp) / "frames.igs.mha"
        frames = phantom_recording(folder)
        source = None if a.synthetic else folder
        os.chmod(tmp, 0o700)
        for i in range(a.repeat):
            rate = engine_rate(model, frames, a.frames, a.engine, a.device)
            summary, _ = pipeline(
                model,
                source,
                a.frames,
                Path(tmp) / f"p{i}",
                "processes",
                a.engine,
                a.device,
                settings,
            )
            fps = float(summary.get("fps") or 0.0)
            print(f"round {i}: batches {summary.get('batching')}, stages {summary.get('stages')}")
            rounds.append({"engine_fps": round(rate, 1), "pipeline_fps": fps,
                           "ratio": round(fps / rate, 3), "load": os.getloadavg()})  # fmt: skip
            print(f"round {i}: engine {rate:.0f} frames/s, pipeline {fps:.0f} frames/s, "
                  f"ratio {fps / rate:.3f}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
        if a.profile:
            summary, profile = pipeline(
                model, source, a.frames, Path(tmp) / "t", "threads", a.engine, a.device, settings
            )
            print(
                f"threads: pipeline {summary.get('fps')} frames/s, {summary.get('batching')};"
                f" infer stage:\n{profile}"
            )
    write_result("infer_profile", {"frames": a.frames, "rounds": rounds})


if __name__ == "__main__":
    main()
