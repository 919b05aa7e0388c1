"""The bedside display's own cost per frame, and acquisition -> swap latency.

- cost: upload (frame + label map) + draw (filled overlay, status line) + swap, per
  frame, for 256x256 and 820x616 phantom frames in a 1280x800 window, in OpenGL 3.3 core
  and OpenGL ES 3.0;
- roles: the same for each output role alone (820x616 frames): take (the result record
  read, its maps uploaded, the rest kept), draw, swap; and all roles in one record;
- live: a producer process writes phantom frames at ``--fps`` into a real "frames" ring
  and records of their ground-truth labels into a "results" ring (inference taking no
  time); the display stage reads both (newest) and reports acquisition -> buffer swap
  latency.

Without a ``DISPLAY`` it starts its own Xvfb (Mesa llvmpipe renders then).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from _common import write_result

from daemon import results
from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.config import Config
from daemon.display.compose import ModelView, PortView
from daemon.display.gl import DisplayConfig, DisplayStage, Renderer, Window
from daemon.display.scene import MapLayer, Scene
from daemon.engines import card
from daemon.frame import FrameMeta
from daemon.metrics import Percentiles
from daemon.ring import Ring
from daemon.stage import InputPort, StageContext, StageSpec

WINDOW = (1280, 800)
ROLES = (*card.ROLES, "all")


@contextlib.contextmanager
def x_server() -> Iterator[str]:
    """The current DISPLAY, or an Xvfb started for the benchmark."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        raise SystemExit("no DISPLAY and no Xvfb (apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            f"{WINDOW[0]}x{WINDOW[1]}x24",
            "-nolisten",
            "tcp",
            "-noreset",
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        os.environ["DISPLAY"] = f":{f.readline().strip()}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        del os.environ["DISPLAY"]
        proc.terminate()
        proc.wait(10)


def phantom(shape: tuple[int, int], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    src = SyntheticSource(SyntheticSettings(width=shape[1], height=shape[0]))
    out = []
    for i in range(n):
        frame, labels = src.frame_with_labels(i)
        out.append((frame.image, labels))
    return out


def cost(api: Literal["gl33", "gles30"], shape: tuple[int, int], n: int) -> dict[str, Any]:
    frames = phantom(shape, 30)
    window = Window(fullscreen=False, size=WINDOW, vsync=False, api=api)
    renderer = Renderer(window.dialect, window.size)
    renderer.set_status(
        [("60.0 fps | latency 12 ms | onnxruntime cpu | unet | filled", (235, 235, 235))]
    )
    parts = {k: Percentiles() for k in ("upload", "draw", "swap", "total")}
    try:
        for i in range(n + 10):
            image, labels = frames[i % len(frames)]
            t0 = time.perf_counter()
            renderer.upload_image(image)
            scene = Scene()
            renderer.upload_labels("labels", labels)
            scene.maps.append(MapLayer("labels", "labels"))
            t1 = time.perf_counter()
            renderer.draw(scene, "filled", status=True)
            t2 = time.perf_counter()
            window.swap()
            t3 = time.perf_counter()
            if i >= 10:  # warm-up: first texture allocations, shader compilation
                for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                    parts[k].add(v * 1e3)
        return {
            "gl": window.description,
            "frame": list(shape),
            "frames": n,
            **{k: p.summary(50, 99) for k, p in parts.items()},
        }
    finally:
        renderer.close()
        window.close()


def role_records(shape: tuple[int, int], labels: np.ndarray) -> dict[str, np.ndarray]:
    """One record per role, as a model would send it for an ``shape`` frame, and one
    with every role."""
    h, w = shape
    side = results.CONFIDENCE_MAX_SIDE / max(h, w)
    conf = np.random.default_rng(0).random((3, round(h * side), round(w * side)))
    rng = np.random.default_rng(1)
    xy = rng.random((10, 2)) * (w / 2, h / 2)
    size = np.array([w / 4, h / 4])
    boxes = np.column_stack([xy, xy + size, rng.random(10), rng.integers(0, 3, 10)])
    points = np.column_stack([rng.random((5, 2)) * (w, h), np.ones(5)])
    outputs = {
        "segmentation": results.Output("segmentation", "labels", labels),
        "confidence": results.Output("confidence", "conf", conf.astype(np.float16)),
        "classification": results.Output(
            "classification", "view", np.array([0.7, 0.2, 0.05, 0.05], np.float32)
        ),
        "detection": results.Output("detection", "boxes", boxes.astype(np.float32)),
        "keypoints": results.Output("keypoints", "points", points.astype(np.float32)),
        "regression": results.Output("regression", "values", np.array([42.1, 3.5], np.float32)),
    }
    out = {role: results.pack([o]) for role, o in outputs.items()}
    out["all"] = results.pack(list(outputs.values()))
    return out


ROLE_MODEL = ModelView.parse(
    {
        "model": "bench",
        "outputs": [
            {
                "name": "values",
                "role": "regression",
                "names": ["depth", "area"],
                "units": ["mm", "cm2"],
            },
            {"name": "points", "role": "keypoints", "names": [f"p{k}" for k in range(5)]},
        ],
    }
)


def roles(api: Literal["gl33", "gles30"], shape: tuple[int, int], n: int) -> dict[str, Any]:
    """Per frame, for each role's record: take, draw (with the status line), swap."""
    image, labels = phantom(shape, 1)[0]
    window = Window(fullscreen=False, size=WINDOW, vsync=False, api=api)
    renderer = Renderer(window.dialect, window.size)
    settings = DisplayConfig()
    out: dict[str, Any] = {"gl": window.description, "frame": list(shape), "frames": n}
    try:
        renderer.upload_image(image)
        for role, payload in role_records(shape, labels).items():
            port = PortView("results", ROLE_MODEL)
            parts = {k: Percentiles() for k in ("take", "draw", "swap", "total")}
            for i in range(n + 10):
                t0 = time.perf_counter()
                port.take(payload, FrameMeta(index=i), renderer, settings)
                text = " | ".join(["60.0 fps", "latency 12 ms", "bench", *port.scalars()])
                renderer.set_status([(text, (235, 235, 235))])
                t1 = time.perf_counter()
                renderer.draw(port.scene(), "filled", status=True)
                t2 = time.perf_counter()
                window.swap()
                t3 = time.perf_counter()
                if i >= 10:
                    for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                        parts[k].add(v * 1e3)
            out[role] = {k: p.summary(50, 99) for k, p in parts.items()}
        return out
    finally:
        renderer.close()
        window.close()


def produce(frames: str, results_ring: str, shape: tuple[int, int], fps: float, n: int) -> None:
    """The stand-in scanner and inference: frame i at t0 + i / fps, its labels right after."""
    data = phantom(shape, 30)
    f_ring, r_ring = Ring.attach(frames), Ring.attach(results_ring)
    f_out, r_out = f_ring.writer(), r_ring.writer()
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / fps - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        image, labels = data[i % len(data)]
        meta = FrameMeta(index=i, t_acquired_ns=time.monotonic_ns())
        f_out.write(image, meta)
        r_out.write(results.pack([results.Output("segmentation", "labels", labels)]), meta)
    f_out.close_stream()
    r_out.close_stream()
    f_ring.close()
    r_ring.close()


def live(shape: tuple[int, int], fps: float, seconds: float) -> dict[str, Any]:
    tag = f"{os.getpid()}-bench-display"
    rings = [
        Ring.create(f"{tag}-frames", slots=8, payload_bytes=shape[0] * shape[1]),
        Ring.create(f"{tag}-results", slots=8, payload_bytes=results.capacity(shape)),
    ]
    spec = StageSpec(
        "sink",
        "display",
        inputs={
            "frames": InputPort(rings[0].name, "newest"),
            "results": InputPort(rings[1].name, "newest"),
        },
    )
    ctx = StageContext(spec, queue.Queue(), threading.Event())
    settings = DisplayConfig(fullscreen=False, width=WINDOW[0], height=WINDOW[1], vsync=False)
    stage = DisplayStage(spec, Config(), ctx, settings)
    try:
        stage.setup()
        producer = mp.get_context("spawn").Process(
            target=produce, args=(rings[0].name, rings[1].name, shape, fps, int(fps * seconds))
        )
        producer.start()
        while stage.step():
            pass
        producer.join(10)
        return {"frame": list(shape), "fps_in": fps, **stage.summary()}
    finally:
        stage.teardown()
        ctx.close(finished=True)
        for ring in rings:
            ring.close()
            ring.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=300, help="frames per cost measurement")
    ap.add_argument("--fps", type=float, default=30.0, help="frame rate of the live run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each live run")
    args = ap.parse_args()
    result: dict[str, Any] = {"window": list(WINDOW), "cost_ms": {}, "roles_ms": {}, "live": {}}
    with x_server():
        apis: tuple[Literal["gl33", "gles30"], ...] = ("gl33", "gles30")
        for api in apis:
            for shape in ((256, 256), (616, 820)):
                key = f"{api} {shape[1]}x{shape[0]}"
                r = result["cost_ms"][key] = cost(api, shape, args.frames)
                print(
                    f"cost {key:<16} upload {r['upload']['p50']:6.2f}  draw "
                    f"{r['draw']['p50']:6.2f}  swap {r['swap']['p50']:6.2f}  total p50 "
                    f"{r['total']['p50']:6.2f} p99 {r['total']['p99']:6.2f} ms"
                )
        for api in apis:
            key = f"{api} 820x616"
            r = result["roles_ms"][key] = roles(api, (616, 820), args.frames)
            for role in ROLES:
                t = r[role]
                print(
                    f"role {key:<12} {role:<15} take {t['take']['p50']:6.2f}  draw "
                    f"{t['draw']['p50']:6.2f}  swap {t['swap']['p50']:6.2f}  total p50 "
                    f"{t['total']['p50']:6.2f} p99 {t['total']['p99']:6.2f} ms"
                )
        for shape in ((256, 256), (616, 820)):
            key = f"{shape[1]}x{shape[0]}"
            r = result["live"][key] = live(shape, args.fps, args.seconds)
            lat, tot = r["latency_ms"], r["display_ms"]["total"]
            print(
                f"live {key:<8} at {args.fps:g} fps: {r['frames_out']} frames shown, "
                f"acquisition -> swap p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} ms; "
                f"display cost p50 {tot['p50']:.2f} p99 {tot['p99']:.2f} ms"
            )
        result["gl"] = result["cost_ms"]["gl33 256x256"]["gl"]
    write_result("display", result)


if __name__ == "__main__":
    main()
