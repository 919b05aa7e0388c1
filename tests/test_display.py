"""The bedside display under a real X server (Xvfb + Mesa llvmpipe): pixels read back.

The module starts its own Xvfb on a free display number and stops it at the end;
it is skipped when Xvfb, pygame or PyOpenGL is missing.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
pygame = pytest.importorskip("pygame")
pytest.importorskip("OpenGL.GL")

from daemon import config, pipeline, result_names, results  # noqa: E402
from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource  # noqa: E402
from daemon.cli import main as cli_main  # noqa: E402
from daemon.config import Config  # noqa: E402
from daemon.ctl import Client, CtlError  # noqa: E402
from daemon.display.colours import class_lut, heatmap_lut  # noqa: E402
from daemon.display.gl import (  # noqa: E402
    BAR_BG,
    INFERENCE_STOPPED,
    NO_CONFIDENT_FINDING,
    SCANNER_DISCONNECTED,
    DisplayConfig,
    DisplayError,
    DisplayStage,
    Renderer,
    Window,
    letterbox,
    write_png,
)
from daemon.display.scene import Box, MapLayer, Mark, Panel, Scene  # noqa: E402
from daemon.engines.card import ClassCard  # noqa: E402
from daemon.errors import StageError  # noqa: E402
from daemon.frame import WITHHELD, FrameMeta  # noqa: E402
from daemon.ring import Ring, RingWriter  # noqa: E402
from daemon.stage import InputPort, StageContext, StageSpec, run_stage  # noqa: E402
from daemon.supervisor import Supervisor  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
SCREEN = (1280, 800)
CLASSES = (
    ClassCard(name="background", colour=(0, 0, 0), opacity=0.0),
    ClassCard(name="a", colour=(255, 0, 0), opacity=0.5),
    ClassCard(name="b", colour=(0, 255, 0), opacity=0.3),
)


@pytest.fixture(scope="module", autouse=True)
def x_server() -> Iterator[str]:
    """Xvfb on a display number it picks itself (-displayfd), DISPLAY set to it."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian: apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            f"{SCREEN[0]}x{SCREEN[1]}x24",
            "-nolisten",
            "tcp",
            "-noreset",  # else it resets when its last client leaves, refusing new ones meanwhile
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        number = f.readline().strip()  # written once the server accepts connections
    if not number:
        proc.kill()
        pytest.fail(f"Xvfb exited with code {proc.wait(10)} before it was ready")
    saved = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    yield os.environ["DISPLAY"]
    if saved is None:
        del os.environ["DISPLAY"]
    else:
        os.environ["DISPLAY"] = saved
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["gl33", "gles30"])
def gl(request: pytest.FixtureRequest) -> Iterator[tuple[Window, Renderer]]:
    """A 1280x800 window and a renderer, in OpenGL 3.3 core and in OpenGL ES 3.0."""
    window = Window(fullscreen=False, size=SCREEN, vsync=False, api=request.param)
    assert window.dialect == request.param and window.size == SCREEN
    renderer = Renderer(window.dialect, window.size)
    yield window, renderer
    renderer.close()
    window.close()


# -- the picture ----------------------------------------------------------------------


def blocks(h: int, w: int, size: int = 24) -> np.ndarray:
    """A frame of constant blocks (values 30..229, never black)."""
    y, x = np.mgrid[:h, :w]
    return (30 + ((x // size) * 37 + (y // size) * 61) % 200).astype(np.uint8)


def texels(
    rect: tuple[int, int, int, int], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """For each window pixel in ``rect``, the texel its centre falls in (row, column)."""
    x0, y0, qw, qh = rect
    h, w = shape
    ty = ((np.arange(qh) + 0.5) / qh * h).astype(int)
    tx = ((np.arange(qw) + 0.5) / qw * w).astype(int)
    return ty, tx, (slice(y0, y0 + qh), slice(x0, x0 + qw))


def flat(a: np.ndarray) -> np.ndarray:
    """Texels whose 5x5 neighbourhood has one value: filtering cannot change them there."""
    lo = cv2.erode(a, np.ones((5, 5), np.uint8))
    hi = cv2.dilate(a, np.ones((5, 5), np.uint8))
    return np.asarray(lo == hi)


def labels_scene(
    r: Renderer, labels: np.ndarray, classes: tuple[ClassCard, ...] = CLASSES
) -> Scene:
    """Upload ``labels`` coloured by ``classes``; the scene that draws them."""
    r.upload_labels("labels", labels, classes)
    return Scene(maps=[MapLayer("labels", "labels")])


def blend(image: np.ndarray, labels: np.ndarray, lut: np.ndarray, scale: float = 1.0) -> np.ndarray:
    alpha = np.clip(lut[labels, 3:4] / 255.0 * scale, 0, 1)
    grey = image[..., None].astype(float)
    return grey * (1 - alpha) + lut[labels, :3] * alpha


def test_filled_overlay_is_the_alpha_blend_and_background_is_the_image(
    gl: tuple[Window, Renderer],
) -> None:
    _, r = gl
    image = blocks(616, 820)
    labels = np.zeros((616, 820), np.uint8)
    labels[100:300, 200:400] = 1
    labels[350:500, 450:700] = 2
    r.upload_image(image)
    r.draw(labels_scene(r, labels), "filled", opacity=0.8)
    shot = r.read_pixels()
    rect = letterbox((820, 616), (1.0, 1.0), SCREEN)
    ty, tx, (rows, cols) = texels(rect, (616, 820))
    safe = (flat(image) & flat(labels))[np.ix_(ty, tx)]
    got = shot[rows, cols].astype(int)
    want = blend(image, labels, class_lut(CLASSES), 0.8)[np.ix_(ty, tx)]
    lab = labels[np.ix_(ty, tx)]
    assert safe.sum() > 0.5 * safe.size
    for k in (1, 2):
        sel = safe & (lab == k)
        assert sel.sum() > 10_000
        assert np.abs(got[sel] - want[sel]).max() <= 2, f"class {k}"
    sel = safe & (lab == 0)
    assert np.array_equal(got[sel], np.repeat(image[np.ix_(ty, tx)][sel][:, None], 3, 1))


def test_overlay_off_shows_the_plain_image(gl: tuple[Window, Renderer]) -> None:
    _, r = gl
    image = blocks(616, 820)
    r.upload_image(image)
    r.draw(labels_scene(r, np.zeros((616, 820), np.uint8)))
    plain = r.read_pixels()
    labels_scene(r, np.ones((616, 820), np.uint8))
    r.draw(Scene())
    off = r.read_pixels()
    assert np.array_equal(off, plain)
    rect = letterbox((820, 616), (1.0, 1.0), SCREEN)
    ty, tx, (rows, cols) = texels(rect, (616, 820))
    safe = flat(image)[np.ix_(ty, tx)]
    assert np.array_equal(off[rows, cols][safe][:, 0], image[np.ix_(ty, tx)][safe])


@pytest.mark.parametrize(
    ("shape", "spacing", "rect"),
    [
        ((616, 820), (1.0, 1.0), (107, 0, 1065, 800)),  # pillarbox: 820:616 in 1280:800
        ((616, 820), (0.1, 0.2), (374, 0, 532, 800)),  # tall pixels: 82 mm x 123.2 mm
        ((256, 256), (0.3, 0.15), (0, 80, 1280, 640)),  # wide pixels: letterbox 2:1
    ],
)
def test_letterbox_keeps_the_physical_aspect_ratio(
    gl: tuple[Window, Renderer],
    shape: tuple[int, int],
    spacing: tuple[float, float],
    rect: tuple[int, int, int, int],
) -> None:
    _, r = gl
    assert letterbox((shape[1], shape[0]), spacing, SCREEN) == rect
    r.upload_image(blocks(*shape))
    r.draw(spacing_xy=spacing)
    lit = r.read_pixels().max(axis=2) > 0
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    x, y, w, h = rect
    assert (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1) == (x, x + w, y, y + h)
    assert lit[y : y + h, x : x + w].all(), "the image fills its rectangle"
    physical = shape[1] * spacing[0] / (shape[0] * spacing[1])
    assert abs(w / h - physical) < 2 / h


def test_contour_mode_colours_only_class_borders(gl: tuple[Window, Renderer]) -> None:
    _, r = gl
    image = blocks(616, 820)
    labels = np.zeros((616, 820), np.uint8)
    labels[200:400, 300:600] = 1
    r.upload_image(image)
    scene = labels_scene(r, labels)
    r.draw()
    plain = r.read_pixels()
    r.draw(scene, "contour", contour_px=3.0)
    contour = r.read_pixels()
    changed = (contour != plain).any(axis=2)
    x0, y0, qw, qh = letterbox((820, 616), (1.0, 1.0), SCREEN)
    left, right = x0 + 300 * qw / 820, x0 + 600 * qw / 820
    top, bottom = y0 + 200 * qh / 616, y0 + 400 * qh / 616
    yy, xx = np.mgrid[: SCREEN[1], : SCREEN[0]] + 0.5
    inside = (xx > left) & (xx < right) & (yy > top) & (yy < bottom)
    depth = np.minimum.reduce([xx - left, right - xx, yy - top, bottom - yy])
    border = inside & (depth < 3.0 + 2.0)  # the line, plus a texel of label rounding
    assert changed.any()
    assert not (changed & ~border).any(), "colour outside the class border"
    assert (changed & border).sum() >= 0.8 * (inside & (depth < 3.0)).sum()
    assert (contour[changed] == (255, 0, 0)).all(), "contours are opaque class colour"
    assert np.array_equal(contour[inside & (depth > 6)], plain[inside & (depth > 6)])


def heat_pixel(base: float, v: np.ndarray) -> np.ndarray:
    """What confidence ``v`` (0..1, any shape) looks like over a grey level ``base``."""
    lut = heatmap_lut().astype(float)[np.clip(np.round(v * 255), 0, 255).astype(int)]
    alpha = lut[..., 3:4] / 255
    return base * (1 - alpha) + lut[..., :3] * alpha


def test_heatmap_follows_the_confidence_bilinearly(gl: tuple[Window, Renderer]) -> None:
    """A 32-texel ramp (0 -> 1 left to right) over a 256x256 frame: each window pixel has
    the heat colour of the bilinear value at its centre; flat regions their own."""
    _, r = gl
    r.upload_image(np.full((256, 256), 90, np.uint8))
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float16), (8, 1))
    ramp[:2] = 0.0  # top quarter: no confidence, the image shows through
    r.upload_heat("heat", ramp)
    r.draw(Scene(maps=[MapLayer("heat", "heat")]))
    shot = r.read_pixels().astype(float)
    x0, y0, q, _ = letterbox((256, 256), (1.0, 1.0), SCREEN)
    row = shot[y0 + q // 2, x0 : x0 + q]
    t = np.clip((np.arange(q) + 0.5) / q * 32 - 0.5, 0, 31)  # texel coordinate of each pixel
    want = heat_pixel(90, t / 31)
    # within 3 steps of the 256-entry table (GLES filters in medium precision)
    near = np.stack([heat_pixel(90, np.clip(t / 31 + d / 255, 0, 1)) for d in range(-3, 4)])
    err = np.abs(near - row).max(axis=2).min(axis=0)
    assert err.max() <= 2, f"pixel {err.argmax()}: {row[err.argmax()]} vs {want[err.argmax()]}"
    assert row[-1, 0] > row[q // 2, 0] > row[0, 0], "brighter with confidence"
    assert (shot[y0 + q // 16, x0 : x0 + q] == 90).all(), "no confidence: the image"


def test_rgb_frames_and_texture_reuse(gl: tuple[Window, Renderer]) -> None:
    _, r = gl
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 120, 240
    r.upload_image(rgb)
    r.draw()
    assert (r.read_pixels()[400, 640] == (10, 120, 240)).all()
    r.upload_image(np.full((64, 96), 50, np.uint16) << 8)  # 16-bit: shown by its top byte
    r.draw()
    assert (r.read_pixels()[400, 640] == 50).all()
    assert r.image_shape == (64, 96, 1)


def test_phantom_screenshot_for_the_readme(gl: tuple[Window, Renderer], tmp_path: Path) -> None:
    """The README's docs/screenshot.png (OpenGL 3.3 core); the test writes its own copy and
    refreshes the tracked file only when asked: ``ECHOD_WRITE_DOCS=1``."""
    _, r = gl
    source = SyntheticSource(SyntheticSettings(width=512, height=512, seed=3))
    frame, labels = source.frame_with_labels(40)
    classes = (
        ClassCard(name="background", colour=(0, 0, 0), opacity=0.0),
        ClassCard(name="artery", colour=(230, 25, 75), opacity=0.45),
        ClassCard(name="vein", colour=(0, 130, 200), opacity=0.45),
    )
    r.upload_image(frame.image)
    scene = labels_scene(r, labels, classes)
    r.set_status(
        [
            (
                "synthetic neck phantom, frame 40 | ground-truth labels: artery, vein | filled",
                (235, 235, 235),
            )
        ]
    )
    r.draw(scene, "filled", frame.meta.spacing[:2], status=True)
    shot = r.read_pixels()
    path = tmp_path / f"{gl[0].dialect}.png"
    write_png(path, shot)
    saved = cv2.imread(str(path))
    assert saved is not None and np.array_equal(saved[:, :, ::-1], shot)
    if os.environ.get("ECHOD_WRITE_DOCS") == "1" and gl[0].dialect == "gl33":
        write_png(ROOT / "docs" / "screenshot.png", shot)
    x0, y0, q, _ = letterbox((512, 512), frame.meta.spacing[:2], SCREEN)
    ty, tx, (rows, cols) = texels((x0, y0, q, q), (512, 512))
    lab = labels[np.ix_(ty, tx)]
    px = shot[rows, cols].astype(int)
    assert (px[lab == 0][:, 0] == px[lab == 0][:, 2]).all(), "background stays grey"
    assert (px[lab == 1][:, 0] > px[lab == 1][:, 2]).mean() > 0.95, "artery tinted red"
    assert (px[lab == 2][:, 2] > px[lab == 2][:, 0]).mean() > 0.95, "vein tinted blue"


# -- the stage, through real rings ----------------------------------------------------


def record(labels: np.ndarray | None = None, *outputs: results.Output) -> np.ndarray:
    """A result record: ``labels`` as the segmentation output (when given), then ``outputs``."""
    seg = [] if labels is None else [results.Output("segmentation", "labels", labels)]
    return results.pack([*seg, *outputs])


class Rig:
    """Rings "frames" and one per results port, their writers, and a DisplayStage reading
    them; ``outputs`` describes the model of port "results" (its ``model`` description)."""

    def __init__(
        self,
        settings: DisplayConfig,
        shape: tuple[int, int] = (128, 160),
        ports: tuple[str, ...] = ("results",),
        outputs: tuple[dict[str, Any], ...] = (),
    ) -> None:
        tag = f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}"
        self.rings = [Ring.create(f"{tag}-frames", slots=8, payload_bytes=shape[0] * shape[1])]
        self.rings += [
            Ring.create(f"{tag}-{p}", slots=8, payload_bytes=results.capacity(shape)) for p in ports
        ]
        self.frames: RingWriter = self.rings[0].writer()
        self.ports = dict(zip(ports, self.rings[1:], strict=True))
        self.writers = {p: ring.writer() for p, ring in self.ports.items()}
        self.results = self.writers[ports[0]]
        self.shape = shape
        spec = StageSpec(
            "sink",
            "display",
            inputs={
                "frames": InputPort(self.rings[0].name, "newest"),
                **{p: InputPort(ring.name, "newest") for p, ring in self.ports.items()},
            },
            params={
                "classes": [c.model_dump() for c in CLASSES],
                "engine": "test",
                "device": "cpu",
                "model": "none",
                "outputs": list(outputs),
            },
        )
        self.ctx = StageContext(spec, queue.Queue(), threading.Event())
        self.stage = DisplayStage(spec, Config(), self.ctx, settings)
        self.index = 0

    def frame(self, value: int) -> int:
        """Write a uniform frame; its index."""
        image = np.full(self.shape, value, np.uint8)
        self.frames.write(image, FrameMeta(index=self.index, t_acquired_ns=time.monotonic_ns()))
        self.index += 1
        return self.index - 1

    def show(self, value: int) -> int:
        """Write a uniform frame and step until the stage has shown it; its index."""
        seen = self.stage.frames_shown
        index = self.frame(value)
        self.step_until(lambda: self.stage.frames_shown > seen)
        return index

    def result(self, index: int, labels: np.ndarray, flags: int = 0) -> None:
        """Write a record of the label map ``labels`` for frame ``index`` to "results"."""
        self.send(index, record(labels), flags=flags)

    def send(self, index: int, payload: np.ndarray, port: str = "results", flags: int = 0) -> None:
        meta = FrameMeta(index=index, t_acquired_ns=time.monotonic_ns(), flags=flags)
        self.writers[port].write(payload, meta)

    def deliver(self, payload: np.ndarray, value: int = 100, port: str = "results") -> None:
        """A frame and its result on ``port``; steps until the stage has taken both."""
        taken = self.stage.ports[port].results
        self.send(self.frame(value), payload, port)
        self.step_until(lambda: self.stage.ports[port].results > taken)
        self.step_until(
            lambda: self.stage.shown is not None and self.stage.shown.index == self.index - 1
        )

    def step_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.stage.step()
            assert time.monotonic() < deadline, "condition not reached in time"

    def centre(self) -> np.ndarray:
        shot = self.stage.capture()
        return shot[shot.shape[0] // 2, shot.shape[1] // 2].astype(int)

    def close(self) -> None:
        self.stage.teardown()
        self.ctx.close(finished=True)
        for ring in self.rings:
            ring.close()
            ring.unlink()


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(
        ports: tuple[str, ...] = ("results",),
        outputs: tuple[dict[str, Any], ...] = (),
        **settings: object,
    ) -> Rig:
        base: dict[str, object] = {
            "fullscreen": False,
            "width": 640,
            "height": 480,
            "vsync": False,
            "status_line": True,
        }
        config = DisplayConfig.model_validate({**base, **settings})
        made.append(Rig(config, ports=ports, outputs=outputs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def square(shape: tuple[int, int], k: int = 1) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    h, w = shape
    labels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = k
    return labels


def test_stage_keeps_the_image_flowing_when_inference_stops(rig: Callable[..., Rig]) -> None:
    r = rig(inference_stopped_ms=300)
    info = r.stage.setup()
    assert info["gl"] in ("gl33", "gles30")
    first = r.frame(100)
    r.result(first, square(r.shape))
    r.step_until(lambda: r.stage.frames_shown >= 1 and r.stage.results_in >= 1)
    r.step_until(lambda: r.stage.draw_mode() == "filled")
    want = blend(np.array([[100]], np.uint8), np.array([[1]]), class_lut(CLASSES))[0, 0]
    assert np.abs(r.centre() - want).max() <= 2, "the overlay is drawn"
    # inference stops; frames keep coming, each with its own grey level
    shown_then = r.stage.frames_shown
    value = 100
    while INFERENCE_STOPPED not in r.stage.warnings:
        value = 40 + (r.index * 17) % 180
        r.show(value)
        assert r.index < 5000, "no warning"
    assert r.stage.frames_shown - shown_then >= 3
    assert r.stage.draw_mode() == "off", "a stale overlay is not drawn over a live image"
    assert (r.centre() == value).all(), "the newest frame is on screen, no overlay"
    for _ in range(5):  # and it keeps updating
        value = 40 + (r.index * 17) % 180
        r.show(value)
        assert (r.centre() == value).all()
    assert INFERENCE_STOPPED in r.stage.warnings
    # inference comes back: the warning clears, the overlay returns
    r.result(r.frame(value), square(r.shape))
    r.step_until(
        lambda: INFERENCE_STOPPED not in r.stage.warnings and r.stage.draw_mode() == "filled"
    )
    s = r.stage.summary()
    assert s["frames_out"] == r.stage.frames_shown and s["results_in"] == 2
    assert s["latency_ms"]["p50"] > 0 and s["display_ms"]["total"]["p99"] > 0


def test_stage_says_no_confident_finding_when_the_guard_withholds(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.stage.setup()
    r.result(r.show(100), np.zeros(r.shape, np.uint8), flags=WITHHELD)
    r.step_until(lambda: NO_CONFIDENT_FINDING in r.stage.warnings)
    assert (r.centre() == 100).all(), "nothing painted"
    assert r.stage.summary()["withheld"] == {"frames": 1, "fraction": 1.0}
    r.result(r.show(120), square(r.shape))
    r.step_until(lambda: NO_CONFIDENT_FINDING not in r.stage.warnings)
    r.step_until(lambda: r.stage.draw_mode() == "filled")
    assert r.stage.summary()["withheld"] == {"frames": 1, "fraction": 0.5}
    assert NO_CONFIDENT_FINDING in r.stage.summary()["warned"]


def test_headless_sink_counts_withheld_results(
    rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    r = rig()
    assert r.stage.setup()["display"] == "headless"
    for k in range(4):  # one at a time: the rig's results port reads the newest
        r.result(r.frame(10), square(r.shape), flags=WITHHELD if k % 2 else 0)
        r.step_until(lambda k=k: r.stage.headless is not None and r.stage.headless.count == k + 1)
    assert r.stage.summary()["withheld"] == {"frames": 2, "fraction": 0.5}
    assert r.stage.headless is not None
    assert r.stage.headless.live(30.0)["withheld"] == {"frames": 2, "fraction": 0.5}


def test_stage_warns_when_frames_stop(rig: Callable[..., Rig]) -> None:
    r = rig(no_frames_ms=200)
    r.stage.setup()
    r.show(50)
    r.step_until(lambda: SCANNER_DISCONNECTED in r.stage.warnings)
    r.frame(60)
    r.step_until(lambda: SCANNER_DISCONNECTED not in r.stage.warnings)


def test_synchronised_mode_shows_the_frame_the_overlay_was_computed_on(
    rig: Callable[..., Rig],
) -> None:
    r = rig(sync="synchronised")
    r.stage.setup()
    for i in range(6):
        r.frame(20 + 30 * i)
        r.step_until(lambda: len(r.stage.history) == r.index)
    assert r.stage.frames_shown == 0, "no frame is shown before its result"
    r.result(2, square(r.shape))
    r.step_until(lambda: r.stage.frames_shown == 1)
    assert r.stage.shown is not None and r.stage.shown.index == 2
    assert r.stage.draw_mode() == "filled"
    want = blend(np.array([[80]], np.uint8), np.array([[1]]), class_lut(CLASSES))[0, 0]
    assert np.abs(r.centre() - want).max() <= 2
    r.result(5, square(r.shape, 2))
    r.step_until(lambda: r.stage.frames_shown == 2)
    assert r.stage.shown.index == 5


def test_synchronised_other_ports_draw_no_result_of_a_later_frame_than_the_one_shown(
    rig: Callable[..., Rig],
) -> None:
    """A faster second model's results arrive ahead of the first model's: with the frame
    of the first model's result on screen, the second draws its result of that frame (or
    an earlier one), never one of a later frame (its mark would be off the shown image)."""
    r = rig(sync="synchronised", ports=("results", "results-1"))
    r.stage.setup()
    for i in range(6):
        r.frame(20 + 30 * i)
        r.step_until(lambda: len(r.stage.history) == r.index)
    tip = np.array([[10.0, 12.0, 0.9]], np.float32)
    for index in (1, 2, 4):  # the fast model, ahead of the slow one
        r.send(index, record(None, Output("keypoints", "tip", tip + index)), "results-1")
        r.step_until(lambda index=index: r.stage.ports["results-1"].results == index - index // 4)
    r.result(2, square(r.shape))
    r.step_until(lambda: r.stage.shown is not None and r.stage.shown.index == 2)
    assert r.stage.ports["results-1"].index == 2, "its result of the frame shown"
    r.result(5, square(r.shape))
    r.step_until(lambda: r.stage.shown is not None and r.stage.shown.index == 5)
    assert r.stage.ports["results-1"].index == 4, "its newest result up to the frame shown"


def test_after_a_hot_swap_each_overlay_has_the_colours_of_the_model_that_made_it(
    rig: Callable[..., Rig],
) -> None:
    r = rig(sync="synchronised")
    r.stage.setup()
    swapped = [c.model_copy(update={"colour": (0, 255, 0)}) for c in CLASSES]
    assert r.stage.command(
        "model",
        {
            "generation": 1,
            "model": "swapped.onnx",
            "engine": "openvino",
            "device": "cpu",
            "classes": [c.model_dump() for c in swapped],
        },
    ) == {"generation": 1, "port": "results"}
    for generation, classes in ((0, CLASSES), (1, swapped)):
        index = r.frame(100)
        r.step_until(
            lambda index=index: len(r.stage.history) and r.stage.history[-1][1].index == index
        )
        meta = FrameMeta(index=index, t_acquired_ns=time.monotonic_ns(), generation=generation)
        r.results.write(record(square(r.shape)), meta)
        r.step_until(lambda index=index: r.stage.shown is not None and r.stage.shown.index == index)
        want = blend(np.array([[100]], np.uint8), np.array([[1]]), class_lut(classes))[0, 0]
        assert np.abs(r.centre() - want).max() <= 2, f"generation {generation}"
    assert "swapped.onnx" in r.stage.info and "openvino" in r.stage.info


def post_key(key: int) -> None:
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key, mod=0, unicode="", scancode=0))


def test_keys(rig: Callable[..., Rig], tmp_path: Path) -> None:
    r = rig(screenshot_dir=str(tmp_path))
    r.stage.setup()
    r.result(r.frame(100), square(r.shape))
    r.step_until(lambda: r.stage.draw_mode() == "filled")
    post_key(pygame.K_o)
    r.step_until(lambda: not r.stage.overlay_on)
    assert r.stage.draw_mode() == "off" and (r.centre() == 100).all()
    post_key(pygame.K_m)
    r.step_until(lambda: r.stage.draw_mode() == "contour")
    post_key(pygame.K_f)
    r.step_until(lambda: r.stage.frozen)
    reader = r.stage.frames
    assert reader is not None
    r.frame(200)
    r.step_until(lambda: reader.read_count == 2)
    assert r.stage.frames_shown == 1 and (r.centre() == 100).all(), "frozen"
    post_key(pygame.K_s)
    r.step_until(lambda: any(tmp_path.glob("echod-*.png")))
    shot = cv2.imread(str(next(tmp_path.glob("echod-*.png"))))
    assert shot is not None and shot.shape == (480, 640, 3)
    post_key(pygame.K_q)
    post_key(pygame.K_ESCAPE)
    assert r.stage.step(), "quit keys do nothing unless allow_quit"


def test_quit_when_allowed(rig: Callable[..., Rig]) -> None:
    r = rig(allow_quit=True)
    r.stage.setup()
    post_key(pygame.K_ESCAPE)
    assert not r.stage.step()


def test_stage_ends_with_both_streams(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.stage.setup()
    r.frame(10)
    r.frames.close_stream()
    r.results.close_stream()
    deadline = time.monotonic() + 5
    while r.stage.step():
        assert time.monotonic() < deadline, "the stage did not end"
    assert r.stage.frames_shown == 1 and r.stage.frames is None
    assert r.stage.results == {"results": None}


def test_no_display_falls_back_to_the_headless_sink(
    rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPLAY", ":65000")  # nothing listens there
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(DisplayError, match=r"no display|OpenGL"):
        rig(fallback="fail").stage.setup()
    r = rig()
    assert r.stage.setup()["display"] == "headless"
    r.result(r.frame(10), square(r.shape))
    r.step_until(lambda: r.stage.headless is not None and r.stage.headless.count == 1)
    assert r.stage.summary()["frames_out"] == 1
    with pytest.raises(DisplayError, match="headless"):
        r.stage.capture()


def test_stage_loop_answers_screenshot_and_set_commands(tmp_path: Path) -> None:
    settings = DisplayConfig(fullscreen=False, width=320, height=240, vsync=False)

    class Windowed(DisplayStage):
        def __init__(self, spec: StageSpec, config: Config, context: StageContext) -> None:
            super().__init__(spec, config, context, settings)

    rig = Rig(settings)
    events: queue.Queue[dict[str, object]] = queue.Queue()
    commands: queue.Queue[tuple[str, str, dict[str, object]]] = queue.Queue()
    stop = threading.Event()
    loop = threading.Thread(
        target=run_stage, args=(Windowed, rig.ctx.spec, Config(), events, stop, commands)
    )
    loop.start()

    def ask(name: str, **args: object) -> dict[str, object]:
        token = uuid.uuid4().hex
        commands.put((token, name, args))
        while True:
            event = events.get(timeout=10)
            if event["event"] == "failed":
                pytest.fail(f"display stage failed: {event}")
            if event.get("token") == token:
                return event

    try:
        while events.get(timeout=10)["event"] != "ready":
            pass
        rig.result(rig.frame(120), square(rig.shape))
        reply = ask("set", key="display.overlay", value="contour")
        assert reply["result"] == {"key": "display.overlay", "value": "contour"}
        reply = ask("set", key="display.opacity", value=2.0)
        assert "display.opacity" in str(reply["error"])
        reply = ask("screenshot", path=str(tmp_path / "shot.png"))
        assert reply["result"]["path"] == str(tmp_path / "shot.png")  # type: ignore[index]
        saved = cv2.imread(str(tmp_path / "shot.png"))
        assert saved is not None and saved.shape == (240, 320, 3)
        assert "error" in ask("no-such-command")
    finally:
        stop.set()
        loop.join(10)
        rig.ctx.close(finished=True)
        for ring in rig.rings:
            ring.close()
            ring.unlink()
    left = []
    while not events.empty():
        left.append(events.get_nowait())
    done = [e for e in left if e["event"] == "done"]
    assert done and done[0]["frames_out"] == 1, left


@pytest.mark.skipif(
    "display" not in pipeline.STAGES, reason="the display stage is not in pipeline.STAGES yet"
)
def test_killing_inference_keeps_the_display_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real pipeline (processes, rings, ONNX Runtime) with the display as its sink:
    SIGKILL the infer stage; the display keeps showing frames and warns until the
    restarted stage (its engine takes 2 s to load: the gap is visible) delivers again."""
    from tests import plugin_engines

    plugin_engines.install(tmp_path / "site")
    monkeypatch.setenv(plugin_engines.LOAD_S, "2")
    cfg = config.load(
        None,
        {
            "sink.headless": False,
            "display.fullscreen": False,
            "display.width": 640,
            "display.height": 480,
            "display.vsync": False,
            "display.inference_stopped_ms": 300.0,
            "source.pace": "fps",
            "source.fps": 30.0,
            "model.engine": "slow",
            "model.warmup": 1,
            "control.enabled": False,
        },
    )
    sup = Supervisor(cfg)
    summary: list[dict[str, object]] = []
    runner = threading.Thread(target=lambda: summary.append(sup.run()))
    runner.start()

    def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert runner.is_alive(), f"echod stopped before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)  # polling the supervisor's snapshots, with a deadline

    def stats() -> dict[str, Any]:
        sink = sup.workers.get("sink")
        return sink.stats if sink is not None and sink.stats else {}

    try:
        until(
            lambda: stats().get("frames", 0) > 10 and stats().get("inference_ms", 0) > 0,
            "frames with results on the display",
        )
        infer = sup.workers["infer"]
        assert isinstance(infer.handle, BaseProcess) and infer.handle.pid is not None
        os.kill(infer.handle.pid, signal.SIGKILL)
        until(lambda: infer.restarts == 1 and infer.ready, "the restarted stage")
        shown = stats()["frames"]
        until(lambda: stats()["frames"] > shown + 10 and not stats().get("warnings"), "recovery")
    finally:
        sup.request_stop("test over")
        runner.join(60)
    done = sup.workers["sink"].done
    assert done is not None and INFERENCE_STOPPED in done["warned"]
    assert done["frames_without_inference"] >= 10, "frames kept coming while it was down"
    assert done["latency_ms"]["p50"] > 0
    assert summary and summary[0]["restarts"] == {"infer": 1}


@contextmanager
def display_daemon(roots: list[Path]) -> Iterator[Supervisor]:
    """A running daemon with its display (640x480 window) and control socket."""
    runtime = Path(f"/tmp/echod-shot-{os.getpid()}")
    cfg = config.load(
        None,
        {
            "display.fullscreen": False,
            "display.width": 640,
            "display.height": 480,
            "display.vsync": False,
            "source.pace": "fps",
            "source.fps": 30.0,
            "model.warmup": 1,
            "paths.runtime_dir": str(runtime),
            "control.roots": [str(r) for r in roots],
        },
    )
    sup = Supervisor(cfg)
    runner = threading.Thread(target=sup.run)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while sup.state != "running" or not sup.workers["sink"].stats:
            assert runner.is_alive() and time.monotonic() < deadline, "echod did not start"
            time.sleep(0.05)
        assert sup.workers["sink"].spec.kind == "display"
        yield sup
    finally:
        sup.request_stop("test over")
        runner.join(60)
        shutil.rmtree(runtime, ignore_errors=True)


def test_ctl_screenshot_writes_the_display_to_png(tmp_path: Path) -> None:
    """`echod ctl screenshot PATH` against a running daemon with its display."""
    with display_daemon([tmp_path]) as sup:
        endpoint = sup.control.endpoint
        shot = tmp_path / "bedside.png"
        assert cli_main(["ctl", "--endpoint", endpoint, "screenshot", str(shot)]) == 0
        image = cv2.imread(str(shot))
        assert image is not None and image.shape == (480, 640, 3)
        assert image.std() > 5  # the phantom, not a blank buffer
        outside = cli_main(["ctl", "--endpoint", endpoint, "screenshot", "/etc/echod.png"])
        assert outside == 78 and not Path("/etc/echod.png").exists()
        # a bare name goes to the state directory's screenshots/ (the README's example)
        assert cli_main(["ctl", "--endpoint", endpoint, "screenshot", "now.png"]) == 0
        assert cv2.imread(str(sup.config.paths.state() / "screenshots" / "now.png")) is not None


def test_screenshot_paths_that_cannot_be_written_are_refused_and_the_display_lives(
    tmp_path: Path,
) -> None:
    """A folder, the root itself, a path under a regular file, a missing folder: a
    config error each, nothing written (no temporary file either), the display lives;
    config.set display.screenshot_dir is confined like a path argument."""
    root = tmp_path / "root"
    (root / "folder").mkdir(parents=True)
    (root / "file.txt").write_text("x")
    bad = {
        str(root / "folder"): "is a folder",
        str(root): "is a folder",
        str(root / "file.txt" / "shot.png"): "is not a folder",
        str(root / "missing" / "shot.png"): "does not exist",
        str(root / "folder" / ".." / ".." / "escape.png"): "outside the allowed folders",
        "../../escape.png": "outside the allowed folders",
    }
    with display_daemon([root]) as sup:
        c = Client(sup.control.endpoint, timeout_s=30)
        try:
            for _ in range(2):  # 12 refusals: once 6 ended the daemon
                for path, why in bad.items():
                    with pytest.raises(CtlError) as e:
                        c.call("screenshot", {"path": path})
                    assert e.value.code == "config" and why in e.value.message, e.value.message
            for folder in ("/etc", str(root / "file.txt")):
                with pytest.raises(CtlError) as e:
                    c.call("config.set", {"key": "display.screenshot_dir", "value": folder})
                assert e.value.code == "config", e.value.message
            assert sup.config.display.screenshot_dir == ""
            inside = str(root / "folder" / "..")
            reply = c.call("config.set", {"key": "display.screenshot_dir", "value": inside})
            assert reply["value"] == str(root.resolve())
            assert c.call("screenshot", {"path": str(root / "ok.png")})["path"]
            status = c.call("status")
            sink = status["stages"]["sink"]
            assert sink["state"] == "running" and sink["restarts"] == 0
        finally:
            c.close()
    left = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert left == [Path(n) for n in ("root", "root/file.txt", "root/folder", "root/ok.png")]


def test_the_s_key_with_an_unusable_screenshot_folder_warns(
    rig: Callable[..., Rig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("x")
    r = rig(screenshot_dir=str(tmp_path / "file"))  # a regular file: no folder can be made
    r.stage.setup()
    r.show(80)
    post_key(pygame.K_s)
    r.step_until(lambda: "screenshot not saved" in caplog.text)
    r.show(90)  # and the display goes on
    assert (r.centre() == 90).all()


# -- every role: boxes, crosses, class panels, heat maps, values, several ports ---------------

Output = results.Output
DETECTOR = {
    "name": "boxes",
    "role": "detection",
    "classes": [
        {"name": "needle", "colour": [255, 0, 255]},
        {"name": "artery", "colour": [255, 0, 0]},
    ],
}
POINTS = {"name": "tips", "role": "keypoints", "names": ["tip", "hub"]}
VALUES = {"name": "size", "role": "regression", "names": ["depth", "angle"], "units": ["mm", "deg"]}
CLASSIFIER = {
    "name": "view",
    "role": "classification",
    "classes": [
        {"name": "no vessels", "colour": [255, 0, 0]},
        {"name": "vessels", "colour": [0, 255, 0]},
    ],
}
CONFIDENCE = {
    "name": "conf",
    "role": "confidence",
    "classes": [c.model_dump() for c in CLASSES[:1]]
    + [{"name": "artery", "colour": [230, 25, 75]}, {"name": "vein", "colour": [0, 130, 200]}],
}
PATIENT = 60_000.0  # inference_stopped_ms: a slow test machine never hides a result


def to_window(
    rect: tuple[int, int, int, int], shape: tuple[int, int], x: float, y: float
) -> tuple[float, float]:
    """Frame pixel indices (a pixel's centre at integers, as in records) -> window pixels."""
    x0, y0, qw, qh = rect
    return x0 + (x + 0.5) * qw / shape[1], y0 + (y + 0.5) * qh / shape[0]


def is_colour(shot: np.ndarray, colour: tuple[int, int, int] | list[int]) -> np.ndarray:
    return np.asarray((shot == np.asarray(colour)).all(axis=2))


def test_a_box_is_outlined_in_its_class_colour_with_its_label_above(
    gl: tuple[Window, Renderer],
) -> None:
    _, r = gl
    r.upload_image(np.full((128, 160), 90, np.uint8))
    r.draw()
    plain = r.read_pixels()
    box = Box(40.0, 30.0, 100.5, 90.25, (255, 0, 0), "artery 0.87")
    r.draw(Scene(boxes=[box]), contour_px=2.0)
    shot = r.read_pixels()
    rect = letterbox((160, 128), (1.0, 1.0), SCREEN)
    (left, top), (right, bottom) = (
        to_window(rect, (128, 160), box.x1, box.y1),
        to_window(rect, (128, 160), box.x2, box.y2),
    )
    red = is_colour(shot, box.colour)
    t, b, lft, rt = int(top), int(bottom), int(left), int(right)  # the pixels the edges cross
    assert red[t, lft : rt + 1].all() and red[b, lft : rt + 1].all(), "top and bottom edges"
    assert red[t : b + 1, lft].all() and red[t : b + 1, rt].all(), "left and right edges"
    assert np.array_equal(
        shot[t + 3 : b - 2, lft + 3 : rt - 2], plain[t + 3 : b - 2, lft + 3 : rt - 2]
    )
    changed = (shot != plain).any(axis=2)
    changed[t - 1 : b + 2, lft - 1 : rt + 2] = False  # the outline, a line wide around the edges
    rows, cols = np.nonzero(changed)
    assert rows.min() >= t - 1 - r.line_h and rows.max() < t, "only the label, right above"
    assert cols.min() >= lft - 1
    assert red[t - 1 - r.line_h : t - 1, lft - 1 :].sum() > 20, "the label in the class colour"


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.1, 0.2)])
def test_a_cross_is_centred_on_its_keypoint(
    gl: tuple[Window, Renderer], spacing: tuple[float, float]
) -> None:
    _, r = gl
    r.upload_image(np.full((128, 160), 90, np.uint8))
    colour = (255, 225, 25)
    r.draw(Scene(marks=[Mark(37.25, 81.5, colour, "")]), spacing_xy=spacing, contour_px=2.0)
    mask = is_colour(r.read_pixels(), colour)
    x, y = to_window(letterbox((160, 128), spacing, SCREEN), (128, 160), 37.25, 81.5)
    arm_rows = np.flatnonzero(mask.sum(axis=1) > 4)  # the horizontal arm
    arm_cols = np.flatnonzero(mask.sum(axis=0) > 4)  # the vertical arm
    assert len(arm_rows) == 2 and len(arm_cols) == 2, "arms a line (2 px) wide"
    assert abs(arm_rows.mean() + 0.5 - y) <= 1 and abs(arm_cols.mean() + 0.5 - x) <= 1
    across, down = np.flatnonzero(mask[arm_rows[0]]), np.flatnonzero(mask[:, arm_cols[0]])
    assert abs((across[0] + across[-1] + 1) / 2 - x) <= 1, "the arms are even"
    assert abs((down[0] + down[-1] + 1) / 2 - y) <= 1
    assert across[-1] - across[0] + 1 == 2 * r.mark_px


def test_a_class_bar_is_as_long_as_the_probability(gl: tuple[Window, Renderer]) -> None:
    _, r = gl
    r.upload_image(np.full((128, 160), 90, np.uint8))
    colour = (0, 200, 0)
    for fraction in (0.0, 0.25, 0.6, 1.0):
        r.draw(Scene(panels=[Panel("vessels", colour, fraction)]))
        shot = r.read_pixels()
        bx, by, bw, bh = r.bar_rect(0)
        row = shot[by + bh // 2, bx : bx + bw]
        filled, empty = is_colour(row[None], colour)[0], is_colour(row[None], BAR_BG)[0]
        assert (filled | empty).all() and filled[: filled.sum()].all(), "filled from the left"
        assert abs(filled.sum() - fraction * bw) <= 1, fraction
        label = is_colour(shot[by - 2 - r.line_h : by - 2, : bx + bw + 1], colour)
        assert label.sum() > 20, "the class name above the bar, in its colour"


def panel(r: Rig) -> tuple[int, int, int]:
    """Pixels of the first class panel (label and bar) in red, in green, and the bar's
    filled length."""
    shot = r.stage.capture()
    renderer = r.stage.renderer
    bx, by, bw, bh = renderer.bar_rect(0)
    area = shot[by - 2 - renderer.line_h : by + bh]
    red, green = is_colour(area, (255, 0, 0)).sum(), is_colour(area, (0, 255, 0)).sum()
    bar = shot[by + bh // 2, bx : bx + bw][None]
    filled = int((~is_colour(bar, BAR_BG)).sum())
    return int(red), int(green), filled


def test_the_class_label_changes_only_when_the_smoothing_allows(rig: Callable[..., Rig]) -> None:
    """Probabilities whose argmax alternates every frame do not flip the label; a lasting
    change flips it exactly at the frame where the smoothed probabilities (computed here
    again) beat the shown class by the hysteresis, and the bar shows the smoothed value."""
    s, h = 0.8, 0.1
    r = rig(
        outputs=(CLASSIFIER,),
        classification_smoothing=s,
        classification_hysteresis=h,
        inference_stopped_ms=PATIENT,
    )
    r.stage.setup()
    bw = r.stage.renderer.bar_w
    p, shown = np.array([0.9, 0.1]), 0

    def classify(p0: float) -> int:
        nonlocal p, shown
        new = np.array([p0, 1 - p0])
        if r.stage.ports["results"].results:
            p = s * p + (1 - s) * new
            best = int(np.argmax(p))
            shown = best if p[best] >= p[shown] + h else shown
        scores = new.astype(np.float32)
        r.deliver(record(None, Output("classification", "view", scores)))
        red, green, filled = panel(r)
        assert (red > 0) != (green > 0), (red, green)
        assert abs(filled - p[shown] * bw) <= 1, (filled, p[shown] * bw)
        assert (1 if green else 0) == shown
        return shown

    assert classify(0.9) == 0
    for k in range(12):  # the argmax alternates every frame
        assert classify(0.3 if k % 2 else 0.7) == 0, f"flickered at frame {k}"
    for _ in range(8):  # settled on "no vessels"
        assert classify(0.9) == 0
    switched = [classify(0.05) for _ in range(12)]
    first = switched.index(1)
    assert first >= 2, "smoothing delays the change"
    assert switched[first:] == [1] * (12 - first), "and it stays"


def test_boxes_points_and_values_through_the_stage(rig: Callable[..., Rig]) -> None:
    r = rig(outputs=(DETECTOR, POINTS, VALUES), inference_stopped_ms=PATIENT)
    r.stage.setup()
    boxes = np.array([[20, 16, 80, 64, 0.87, 1]], np.float32)
    points = np.array([[120, 40, 0.9], [np.nan, np.nan, 0.1]], np.float32)
    outputs = (
        Output("detection", "boxes", boxes),
        Output("keypoints", "tips", points),
        Output("regression", "size", np.array([42.5, 12.0], np.float32)),
    )
    r.deliver(record(None, *outputs))
    shot = r.stage.capture()
    rect = letterbox((160, 128), (1.0, 1.0), (640, 480))
    (left, top), (right, bottom) = (
        to_window(rect, r.shape, 20, 16),
        to_window(rect, r.shape, 80, 64),
    )
    red = is_colour(shot, (255, 0, 0))  # class 1, "artery"
    mid_x, mid_y = int((left + right) / 2), int((top + bottom) / 2)
    assert red[int(top), mid_x] and red[int(bottom), mid_x]
    assert red[mid_y, int(left)] and red[mid_y, int(right)]
    tip, hub = result_names.Names().colour(0), result_names.Names().colour(1)
    x, y = to_window(rect, r.shape, 120, 40)
    mark = is_colour(shot, tip)
    assert mark[int(y), int(x)], "the tip's cross"
    assert mark[int(y) - r.stage.renderer.line_h :, int(x) + r.stage.renderer.mark_px + 2 :].any()
    assert not is_colour(shot, hub).any(), "the hub was not found (NaN): no cross"
    r.step_until(lambda: "depth 42.5 mm | angle 12 deg" in r.stage.status_text)
    # withheld by the guard: nothing of it is drawn
    taken = r.stage.ports["results"].results
    r.send(r.frame(100), record(None, *outputs), flags=WITHHELD)
    r.step_until(lambda: r.stage.ports["results"].results > taken)
    r.step_until(lambda: NO_CONFIDENT_FINDING in r.stage.warnings)
    shot = r.stage.capture()
    assert not is_colour(shot, (255, 0, 0)).any() and not is_colour(shot, tip).any()
    assert "depth" not in r.stage.status_text


def test_confidence_maps_show_the_foreground_maximum_or_the_chosen_class(
    rig: Callable[..., Rig],
) -> None:
    r = rig(outputs=(CONFIDENCE,), inference_stopped_ms=PATIENT)
    r.stage.setup()
    conf = np.zeros((3, 32, 40), np.float16)
    conf[0] = 1.0  # background everywhere: never shown
    conf[1, :, :20] = 1.0  # artery on the left
    conf[2, :, 20:] = 0.5  # vein on the right, less sure
    rect = letterbox((160, 128), (1.0, 1.0), (640, 480))
    at = [tuple(int(v) for v in to_window(rect, r.shape, x, 64)) for x in (40, 120)]

    def sides() -> list[np.ndarray]:
        shot = r.stage.capture().astype(float)
        return [shot[y, x] for x, y in at]

    r.deliver(record(None, Output("confidence", "conf", conf)), value=90)
    left, right = sides()
    assert np.abs(left - heat_pixel(90, np.array(1.0))).max() <= 2
    assert np.abs(right - heat_pixel(90, np.array(0.5))).max() <= 2
    r.stage.command("set", {"key": "display.heatmap_class", "value": "vein"})
    r.deliver(record(None, Output("confidence", "conf", conf)), value=90)
    left, right = sides()
    assert (left == 90).all(), "the artery's confidence is not shown"
    assert np.abs(right - heat_pixel(90, np.array(0.5))).max() <= 2
    post_key(pygame.K_h)
    r.step_until(lambda: not r.stage.settings.heatmap)
    assert all((v == 90).all() for v in sides()), "key h: heat maps off"


def test_two_ports_are_composed_in_one_frame(rig: Callable[..., Rig]) -> None:
    """Segmentation from "results", classification from "results-1" (its model announced
    with the ``model`` command), drawn over the same frame."""
    r = rig(
        ports=("results", "results-1"), classification_smoothing=0.0, inference_stopped_ms=PATIENT
    )
    r.stage.setup()
    view = {"model": "view.onnx", "engine": "openvino", "device": "cpu", "outputs": [CLASSIFIER]}
    reply = r.stage.command("model", {"generation": 0, "port": "results-1", **view})
    assert reply == {"generation": 0, "port": "results-1"}
    with pytest.raises(StageError, match="results-7"):
        r.stage.command("model", {"generation": 0, "port": "results-7", **view})
    index = r.frame(100)
    r.send(index, record(square(r.shape)))
    scores = np.array([0.2, 0.8], np.float32)
    r.send(index, record(None, Output("classification", "view", scores)), port="results-1")
    ports = r.stage.ports
    r.step_until(lambda: ports["results"].results == 1 and ports["results-1"].results == 1)
    r.step_until(lambda: r.stage.shown is not None and r.stage.shown.index == index)
    want = blend(np.array([[100]], np.uint8), np.array([[1]]), class_lut(CLASSES))[0, 0]
    assert np.abs(r.centre() - want).max() <= 2, "the segmentation"
    red, green, filled = panel(r)
    assert green > 0 and red == 0, "the classification, from the other port"
    assert abs(filled - 0.8 * r.stage.renderer.bar_w) <= 1
    assert "view.onnx" in r.stage.info and "test cpu" in r.stage.info
    assert r.stage.summary()["ports"] == {
        "results": {"results": 1, "bad": 0},
        "results-1": {"results": 1, "bad": 0},
    }


def test_a_payload_that_is_not_a_record_is_counted_and_skipped(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(inference_stopped_ms=PATIENT)
    r.stage.setup()
    r.deliver(square(r.shape))  # a bare label map, as InferStage wrote before records
    r.deliver(np.full(5000, 7, np.uint8))  # not a record at all
    assert r.stage.draw_mode() == "off" and (r.centre() == 100).all()
    assert "not a result record" in caplog.text and "1-D uint8" in caplog.text
    r.deliver(record(square(r.shape)))
    assert r.stage.draw_mode() == "filled"
    want = blend(np.array([[100]], np.uint8), np.array([[1]]), class_lut(CLASSES))[0, 0]
    assert np.abs(r.centre() - want).max() <= 2
    s = r.stage.summary()
    assert s["results_bad"] == 2 and s["results_in"] == 3 and s["torn"] == 0


def test_empty_outputs_draw_nothing(rig: Callable[..., Rig]) -> None:
    """A model that found nothing: no classes, boxes, points or values; the stage lives."""
    r = rig(outputs=(CONFIDENCE, DETECTOR), inference_stopped_ms=PATIENT)
    r.stage.setup()
    empty = (
        Output("confidence", "conf", np.zeros((0, 8, 8), np.float16)),
        Output("classification", "view", np.zeros(0, np.float32)),
        Output("detection", "boxes", np.zeros((0, 6), np.float32)),
        Output("keypoints", "tips", np.zeros((0, 3), np.float32)),
        Output("regression", "size", np.zeros(0, np.float32)),
    )
    r.deliver(record(np.zeros((0, 0), np.uint8), *empty), value=70)
    shot = r.stage.capture()
    rect = letterbox((160, 128), (1.0, 1.0), (640, 480))
    x, y, w, h = rect
    below_status = max(y, r.stage.renderer.line_h)
    assert (shot[below_status : y + h, x : x + w] == 70).all(), "the plain frame"
    assert r.stage.summary()["results_bad"] == 0
