"""The bedside display: the live image with what the models found, in an OpenGL window.

Three layers, each usable alone:

- :class:`Window`: a pygame window (fullscreen, or windowed by the settings) with a
  current OpenGL 3.3 core context, else an OpenGL ES 3.0 one (Jetson); vsync where the
  driver has it; key presses.
- :class:`Renderer`: the GL objects and one :meth:`Renderer.draw` of a
  :class:`~daemon.display.scene.Scene`: the frame as a texture, letterboxed so that the
  aspect ratio *and* the physical pixel spacing are kept; label maps as ``R8UI`` textures
  coloured in the fragment shader from a 256-entry lookup table (the classes' colours and
  opacities; class 0 transparent), filled or as contours (borders found by comparing
  neighbouring labels); confidence maps as ``R16F`` textures through the heat lookup
  table, filtered bilinearly; box outlines, keypoint crosses and classification bars as
  triangles; text (labels, scores, names, the status line) as pygame.font textures. Tests
  drive it directly.
- :class:`DisplayStage`: the pipeline stage (input ports ``frames`` and every
  ``results``, ``results-1``... port, all ``newest``). Each results port carries result
  records (daemon/results.py); :class:`~daemon.display.compose.PortView` turns a port's
  newest record into what it draws, in the colours and names of the model that made it,
  and the stage composes all ports over the frame: heat maps, label maps, boxes, crosses,
  class labels with their bars (top right), regression values in the status line. It
  never waits for inference: each step takes the newest frame and the newest result of
  each port, and the image keeps flowing when results stop (that port's drawing is then
  hidden and the status line says "inference stopped"). When the uncertainty guard
  withheld a result (its WITHHELD flag), nothing of it is drawn and the status line says
  "no confident finding"; a payload that is not a record is counted and skipped. Keys:
  ``o`` overlay on/off, ``m`` filled / contour, ``h`` heat maps on/off, ``f`` freeze,
  ``s`` screenshot, ``Esc``/``q`` quit when ``allow_quit``.

If no window with either context can be opened (no display, no driver, the ``display``
extra not installed), setup logs a :class:`DisplayError` and the stage behaves as the
headless sink (``fallback = "headless"``), or fails with it (``fallback = "fail"``; ``auto``:
fail under systemd, headless elsewhere).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import statistics
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import ValidationError

from daemon.config import DISPLAY_RUNTIME, Config, DisplayConfig
from daemon.display import shaders
from daemon.display.colours import class_lut, heatmap_lut
from daemon.display.compose import ModelView, PortView
from daemon.display.headless import TABLE2, HeadlessSink, withheld_figures
from daemon.display.scene import Colour, MapLayer, Scene
from daemon.engines.card import ClassCard, load_card
from daemon.errors import ConfigError, EchodError, ModelError, StageError
from daemon.frame import WITHHELD, FrameMeta
from daemon.metrics import FrameHistograms, Percentiles, RateMeter, RunningStats
from daemon.notify import under_systemd
from daemon.paths import check_new_file
from daemon.results import RecordError
from daemon.ring import EndOfStream, FrameOverwritten, RingFrame, RingReader
from daemon.stage import POLL_S, Stage, StageContext, StageSpec

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
try:
    import pygame
    from OpenGL import GL
except ImportError as exc:  # the "display" extra is not installed
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

Mode = Literal["filled", "contour", "off"]
Rect = tuple[int, int, int, int]  # x, y (from the top), width, height in window pixels

IDLE_S = min(POLL_S, 0.05)  # longest wait for a frame: keys and the status line stay live
STATUS_S = 0.5  # status line refresh
TEXT_COLOUR: Colour = (235, 235, 235)
WARN_COLOUR: Colour = (255, 176, 0)
INFERENCE_STOPPED = "inference stopped"
SCANNER_DISCONNECTED = "scanner disconnected"
FRAME_OLD = "frame old"
NO_CONFIDENT_FINDING = "no confident finding"  # the guard withheld the overlay shown


def _port_order(name: str) -> tuple[int, str]:
    """``results`` first, then ``results-1``, ``results-2``... in number order."""
    return len(name), name


class DisplayError(StageError):
    """The display cannot open a window with an OpenGL 3.3 or OpenGL ES 3.0 context."""

    fatal = True  # restarting does not bring a screen or a driver


def letterbox(
    frame_wh: tuple[int, int], spacing_xy: tuple[float, float], window_wh: tuple[int, int]
) -> Rect:
    """The largest centred rectangle in the window with the frame's physical aspect ratio
    (width x spacing_x : height x spacing_y); bars on the remaining sides."""
    (w, h), (W, H) = frame_wh, window_wh
    sx, sy = (s if s > 0 and math.isfinite(s) else 1.0 for s in spacing_xy)
    scale = min(W / (w * sx), H / (h * sy))
    qw, qh = min(W, round(w * sx * scale)), min(H, round(h * sy * scale))
    return (W - qw) // 2, (H - qh) // 2, qw, qh


def as_u8(image: np.ndarray) -> np.ndarray:
    """``image`` as uint8 for display: unsigned ints by their top byte, floats as 0..1."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind == "u":
        return (image >> (8 * (image.dtype.itemsize - 1))).astype(np.uint8)
    if image.dtype.kind == "f":
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


_NO_SCREEN = ("offscreen", "dummy", "evdev")  # SDL's last resorts: nothing is shown


def _require_libraries() -> None:
    if _IMPORT_ERROR is not None:
        raise DisplayError(
            f"the display needs pygame and PyOpenGL ({_IMPORT_ERROR}): install "
            "them with pip install 'echod[display]'"
        )


def _set_mode(size: tuple[int, int], flags: int, vsync: bool) -> bool:
    """Open the window; whether vsync is on (pygame warns, or in older versions fails,
    where the driver cannot sync: then it goes on without)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pygame.display.set_mode(size, flags, vsync=int(vsync))
        except pygame.error as e:
            if not vsync or "vsync" not in str(e):
                raise
            pygame.display.set_mode(size, flags, vsync=0)
            return False
    return vsync and not any("vsync" in str(w.message) for w in caught)


class Window:
    """A pygame window with a current OpenGL context; ``dialect`` says which one."""

    def __init__(
        self,
        *,
        fullscreen: bool,
        size: tuple[int, int],
        vsync: bool,
        api: Literal["auto", "gl33", "gles30"] = "auto",
        title: str = "echod",
    ) -> None:
        _require_libraries()
        try:
            pygame.display.init()
            driver = pygame.display.get_driver()
            if driver in _NO_SCREEN and os.environ.get("SDL_VIDEODRIVER") != driver:
                pygame.display.quit()
                raise pygame.error(f"SDL found only its {driver!r} video driver")
        except pygame.error as e:
            raise DisplayError(
                f"no display to open a window on ({e}; DISPLAY={os.environ.get('DISPLAY', '')!r})"
            ) from None
        flags = pygame.OPENGL | pygame.DOUBLEBUF | (pygame.FULLSCREEN if fullscreen else 0)
        tried = []
        order: tuple[shaders.Dialect, ...] = ("gl33", "gles30") if api == "auto" else (api,)
        for dialect in order:
            major, minor, profile = (
                (3, 3, pygame.GL_CONTEXT_PROFILE_CORE)
                if dialect == "gl33"
                else (3, 0, pygame.GL_CONTEXT_PROFILE_ES)
            )
            pygame.display.gl_set_attribute(pygame.GL_CONTEXT_MAJOR_VERSION, major)
            pygame.display.gl_set_attribute(pygame.GL_CONTEXT_MINOR_VERSION, minor)
            pygame.display.gl_set_attribute(pygame.GL_CONTEXT_PROFILE_MASK, profile)
            try:
                self.vsync = _set_mode((0, 0) if fullscreen else size, flags, vsync)
            except pygame.error as e:
                tried.append(f"{dialect}: {e}")
                continue
            self.dialect = dialect
            break
        else:
            pygame.display.quit()
            raise DisplayError(
                "cannot create an OpenGL 3.3 core or OpenGL ES 3.0 context ("
                + "; ".join(tried)
                + "): check the GPU driver (Mesa: "
                "libgl1-mesa-dri, libegl-mesa0)"
            )
        pygame.display.set_caption(title)
        if fullscreen:
            pygame.mouse.set_visible(False)
        pygame.font.init()
        self.size: tuple[int, int] = pygame.display.get_window_size()
        self.description = (
            f"{GL.glGetString(GL.GL_VERSION).decode()} on {GL.glGetString(GL.GL_RENDERER).decode()}"
        )
        log.info(
            "display: %dx%d %s, %s, vsync %s",
            *self.size,
            "fullscreen" if fullscreen else "window",
            self.description,
            "on" if self.vsync else "off",
        )

    def pressed(self) -> list[str]:
        """Keys pressed since the last call (pygame names: 'o', 'escape'...); 'quit' when
        the window manager asks the window to close."""
        out = []
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                out.append("quit")
            elif event.type == pygame.KEYDOWN:
                out.append(pygame.key.name(event.key))
        return out

    def swap(self) -> None:
        pygame.display.flip()

    def close(self) -> None:
        pygame.font.quit()
        pygame.display.quit()


def _compile(dialect: shaders.Dialect, vertex: str, fragment: str) -> int:
    program = GL.glCreateProgram()
    for kind, body in ((GL.GL_VERTEX_SHADER, vertex), (GL.GL_FRAGMENT_SHADER, fragment)):
        shader = GL.glCreateShader(kind)
        GL.glShaderSource(shader, shaders.source(body, dialect))
        GL.glCompileShader(shader)
        if not GL.glGetShaderiv(shader, GL.GL_COMPILE_STATUS):
            info = GL.glGetShaderInfoLog(shader).decode(errors="replace").strip()
            raise DisplayError(f"{dialect} shader does not compile on this driver: {info}")
        GL.glAttachShader(program, shader)
        GL.glDeleteShader(shader)
    GL.glLinkProgram(program)
    if not GL.glGetProgramiv(program, GL.GL_LINK_STATUS):
        info = GL.glGetProgramInfoLog(program).decode(errors="replace").strip()
        raise DisplayError(f"{dialect} shaders do not link on this driver: {info}")
    return int(program)


def _texture(unit: int, filtering: int) -> int:
    tex = int(GL.glGenTextures(1))
    GL.glActiveTexture(GL.GL_TEXTURE0 + unit)
    GL.glBindTexture(GL.GL_TEXTURE_2D, tex)
    for name, value in (
        (GL.GL_TEXTURE_MIN_FILTER, filtering),
        (GL.GL_TEXTURE_MAG_FILTER, filtering),
        (GL.GL_TEXTURE_WRAP_S, GL.GL_CLAMP_TO_EDGE),
        (GL.GL_TEXTURE_WRAP_T, GL.GL_CLAMP_TO_EDGE),
    ):
        GL.glTexParameteri(GL.GL_TEXTURE_2D, name, value)
    return tex


def _pointer(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


# texture units
_IMAGE, _MAP, _LUT, _TEXT = 0, 1, 2, 3

MARGIN = 8  # window pixels between the panels and the window's edge
BAR_BG: Colour = (40, 40, 48)  # the empty part of a classification bar
BAND_ALPHA = 170  # the dark band under text
TEXT_CACHE = 256  # text textures kept (labels with scores change every frame)


@dataclass
class _Map:
    """A map's texture: a label map with its lookup table, or a confidence map."""

    tex: int
    lut: int | None  # labels only
    shape: tuple[int, int] | None = None
    classes: tuple[ClassCard, ...] | None = None


@dataclass(frozen=True)
class _Band:
    """Text on a dark band, as a texture of ``w`` x ``h`` pixels."""

    tex: int
    w: int
    h: int


class Renderer:
    """GL objects and drawing for a window of ``size`` (w, h) pixels with a current context.

    Upload the frame with :meth:`upload_image`, maps with :meth:`upload_labels` /
    :meth:`upload_heat` (each under a key; textures are re-created only when a size
    changes), then :meth:`draw` a :class:`~daemon.display.scene.Scene`;
    :meth:`read_pixels` reads what was drawn before the buffers are swapped.
    """

    def __init__(self, dialect: shaders.Dialect, size: tuple[int, int]) -> None:
        _require_libraries()
        self.size = size
        self._image_prog = _compile(dialect, shaders.QUAD_VERTEX, shaders.IMAGE_FRAGMENT)
        self._labels_prog = _compile(dialect, shaders.QUAD_VERTEX, shaders.LABELS_FRAGMENT)
        self._heat_prog = _compile(dialect, shaders.QUAD_VERTEX, shaders.HEAT_FRAGMENT)
        self._text_prog = _compile(dialect, shaders.QUAD_VERTEX, shaders.TEXT_FRAGMENT)
        self._solid_prog = _compile(dialect, shaders.SOLID_VERTEX, shaders.SOLID_FRAGMENT)
        self._programs = (
            self._image_prog,
            self._labels_prog,
            self._heat_prog,
            self._text_prog,
            self._solid_prog,
        )
        units = {
            "u_image": _IMAGE,
            "u_labels": _MAP,
            "u_heat": _MAP,
            "u_lut": _LUT,
            "u_text": _TEXT,
        }
        for prog in self._programs:
            GL.glUseProgram(prog)
            for name, unit in units.items():
                loc = GL.glGetUniformLocation(prog, name)
                if loc >= 0:
                    GL.glUniform1i(loc, unit)
        self._u = {
            (prog, name): GL.glGetUniformLocation(prog, name)
            for prog in self._programs
            for name in ("u_mode", "u_opacity", "u_step", "u_size")
        }

        self._vao = int(GL.glGenVertexArrays(1))
        GL.glBindVertexArray(self._vao)
        self._vbo = int(GL.glGenBuffers(1))
        GL.glBindBuffer(GL.GL_ARRAY_BUFFER, self._vbo)
        quad = np.array([0, 0, 1, 0, 0, 1, 1, 1], np.float32)
        GL.glBufferData(GL.GL_ARRAY_BUFFER, quad.nbytes, quad, GL.GL_STATIC_DRAW)
        GL.glEnableVertexAttribArray(0)
        GL.glVertexAttribPointer(0, 2, GL.GL_FLOAT, GL.GL_FALSE, 0, None)
        # solid shapes: x, y (window pixels), r, g, b, a per vertex
        self._shapes_vao = int(GL.glGenVertexArrays(1))
        GL.glBindVertexArray(self._shapes_vao)
        self._shapes_vbo = int(GL.glGenBuffers(1))
        GL.glBindBuffer(GL.GL_ARRAY_BUFFER, self._shapes_vbo)
        GL.glEnableVertexAttribArray(0)
        GL.glVertexAttribPointer(0, 2, GL.GL_FLOAT, GL.GL_FALSE, 24, None)
        GL.glEnableVertexAttribArray(1)
        GL.glVertexAttribPointer(1, 4, GL.GL_FLOAT, GL.GL_FALSE, 24, ctypes.c_void_p(8))
        GL.glBindVertexArray(self._vao)
        GL.glPixelStorei(GL.GL_UNPACK_ALIGNMENT, 1)
        GL.glPixelStorei(GL.GL_PACK_ALIGNMENT, 1)

        self._image = _texture(_IMAGE, GL.GL_LINEAR)
        self._heat_lut = _texture(_LUT, GL.GL_NEAREST)
        self._load_lut(self._heat_lut, heatmap_lut())
        self._maps: dict[str, _Map] = {}
        self._bands: OrderedDict[tuple[tuple[str, Colour], ...], _Band] = OrderedDict()
        self.image_shape: tuple[int, int, int] | None = None  # h, w, channels
        self._status: tuple[tuple[str, Colour], ...] = ()
        self._font = pygame.font.Font(None, max(16, size[1] // 32))
        self.line_h = self._font.get_height() + 2 * (self._font.get_height() // 4)  # a band's
        self.bar_w, self.bar_h = max(120, size[0] // 6), max(6, self.line_h // 3)
        self.mark_px = max(6, size[1] // 80)  # half the length of a cross's arms

    # -- uploads ---------------------------------------------------------------------

    @staticmethod
    def _load_lut(tex: int, lut: np.ndarray) -> None:
        GL.glActiveTexture(GL.GL_TEXTURE0 + _LUT)
        GL.glBindTexture(GL.GL_TEXTURE_2D, tex)
        GL.glTexImage2D(
            GL.GL_TEXTURE_2D,
            0,
            GL.GL_RGBA8,
            lut.shape[0],
            1,
            0,
            GL.GL_RGBA,
            GL.GL_UNSIGNED_BYTE,
            _pointer(np.ascontiguousarray(lut)),
        )

    def upload_image(self, image: np.ndarray) -> None:
        """The frame: grey (h, w) or RGB (h, w, 3), any numeric type (see :func:`as_u8`).
        A uint8 C-contiguous view (a ring slot) is uploaded in place, without a copy."""
        img = np.ascontiguousarray(as_u8(image))
        h, w = img.shape[:2]
        c = 1 if img.ndim == 2 else img.shape[2]
        if c not in (1, 3):
            raise DisplayError(
                f"frames of shape {image.shape}: the display shows grey (HxW) or RGB (HxWx3) images"
            )
        fmt = GL.GL_RED if c == 1 else GL.GL_RGB
        GL.glActiveTexture(GL.GL_TEXTURE0 + _IMAGE)
        GL.glBindTexture(GL.GL_TEXTURE_2D, self._image)
        if self.image_shape != (h, w, c):
            GL.glTexImage2D(
                GL.GL_TEXTURE_2D,
                0,
                GL.GL_R8 if c == 1 else GL.GL_RGB8,
                w,
                h,
                0,
                fmt,
                GL.GL_UNSIGNED_BYTE,
                None,
            )
            grey = GL.GL_RED if c == 1 else None
            for channel, default in (
                (GL.GL_TEXTURE_SWIZZLE_G, GL.GL_GREEN),
                (GL.GL_TEXTURE_SWIZZLE_B, GL.GL_BLUE),
            ):
                GL.glTexParameteri(GL.GL_TEXTURE_2D, channel, grey or default)
            self.image_shape = (h, w, c)
        GL.glTexSubImage2D(GL.GL_TEXTURE_2D, 0, 0, 0, w, h, fmt, GL.GL_UNSIGNED_BYTE, _pointer(img))

    def upload_labels(
        self, key: str, labels: np.ndarray, classes: Sequence[ClassCard] = ()
    ) -> None:
        """A label map (uint8, h x w; any size, stretched over the frame) under ``key``,
        coloured by ``classes`` (colour and opacity per label; the default palette when
        empty). A C-contiguous view (a ring slot) is uploaded in place."""
        m = self._maps.get(key)
        if m is None:
            m = self._maps[key] = _Map(
                _texture(_MAP, GL.GL_NEAREST),  # integer textures are never filtered
                _texture(_LUT, GL.GL_NEAREST),
            )
        if m.classes != tuple(classes):
            assert m.lut is not None
            self._load_lut(m.lut, class_lut(classes))
            m.classes = tuple(classes)
        self._upload(m, np.ascontiguousarray(labels, np.uint8), GL.GL_R8UI, GL.GL_RED_INTEGER)

    def upload_heat(self, key: str, heat: np.ndarray) -> None:
        """A confidence map (h x w, 0..1; any size, filtered bilinearly over the frame)
        under ``key``, drawn with the heat lookup table."""
        m = self._maps.get(key)
        if m is None:
            m = self._maps[key] = _Map(_texture(_MAP, GL.GL_LINEAR), None)
        self._upload(m, np.ascontiguousarray(heat, np.float16), GL.GL_R16F, GL.GL_RED)

    @staticmethod
    def _upload(m: _Map, data: np.ndarray, internal: int, fmt: int) -> None:
        h, w = data.shape[:2]
        kind = GL.GL_HALF_FLOAT if data.dtype == np.float16 else GL.GL_UNSIGNED_BYTE
        GL.glActiveTexture(GL.GL_TEXTURE0 + _MAP)
        GL.glBindTexture(GL.GL_TEXTURE_2D, m.tex)
        if m.shape != (h, w):
            GL.glTexImage2D(GL.GL_TEXTURE_2D, 0, internal, w, h, 0, fmt, kind, None)
            m.shape = (h, w)
        GL.glTexSubImage2D(GL.GL_TEXTURE_2D, 0, 0, 0, w, h, fmt, kind, _pointer(data))

    def set_status(self, parts: Sequence[tuple[str, Colour]]) -> None:
        """The status line: text pieces and their colours, on a translucent dark band."""
        self._status = tuple(parts)

    def _band(self, parts: tuple[tuple[str, Colour], ...]) -> _Band:
        """The texture of ``parts`` (text and colour each) on a dark band; kept for reuse."""
        band = self._bands.get(parts)
        if band is not None:
            self._bands.move_to_end(parts)
            return band
        rendered = [self._font.render(text, True, colour) for text, colour in parts if text]
        pad = self._font.get_height() // 4
        w = sum(r.get_width() for r in rendered) + 2 * pad
        surface = pygame.Surface((w, self.line_h), pygame.SRCALPHA)
        surface.fill((0, 0, 0, BAND_ALPHA))
        x = pad
        for r in rendered:
            surface.blit(r, (x, pad))
            x += r.get_width()
        data = np.frombuffer(pygame.image.tobytes(surface, "RGBA"), np.uint8)
        tex = _texture(_TEXT, GL.GL_NEAREST)
        GL.glTexImage2D(
            GL.GL_TEXTURE_2D,
            0,
            GL.GL_RGBA8,
            w,
            self.line_h,
            0,
            GL.GL_RGBA,
            GL.GL_UNSIGNED_BYTE,
            _pointer(data),
        )
        band = self._bands[parts] = _Band(tex, w, self.line_h)
        if len(self._bands) > TEXT_CACHE:
            _, old = self._bands.popitem(last=False)
            GL.glDeleteTextures([old.tex])
        return band

    # -- drawing ---------------------------------------------------------------------

    def image_rect(self, spacing_xy: tuple[float, float]) -> Rect | None:
        """Where the frame goes in the window (see :func:`letterbox`); None before a frame."""
        if self.image_shape is None:
            return None
        h, w, _ = self.image_shape
        return letterbox((w, h), spacing_xy, self.size)

    def bar_rect(self, i: int) -> Rect:
        """Where the bar of the ``i``-th classification panel goes (top right, below the
        status line; its label is right above it)."""
        top = self.line_h + MARGIN + i * (2 * self.line_h + MARGIN)
        return self.size[0] - MARGIN - self.bar_w, top + self.line_h + 2, self.bar_w, self.bar_h

    def draw(
        self,
        scene: Scene | None = None,
        style: Literal["filled", "contour"] = "filled",
        spacing_xy: tuple[float, float] = (1.0, 1.0),
        opacity: float = 1.0,
        contour_px: float = 2.0,
        status: bool = False,
    ) -> None:
        """Draw the uploaded frame and ``scene`` over it into the back buffer (black bars
        around): heat maps, then label maps (``style``), boxes, crosses, panels, text.
        ``contour_px`` is the width of contours and of every line."""
        W, H = self.size
        GL.glViewport(0, 0, W, H)
        GL.glClearColor(0.0, 0.0, 0.0, 1.0)
        GL.glClear(GL.GL_COLOR_BUFFER_BIT)
        GL.glBindVertexArray(self._vao)
        GL.glEnable(GL.GL_BLEND)  # colour by source alpha; the window stays opaque
        GL.glBlendFuncSeparate(GL.GL_SRC_ALPHA, GL.GL_ONE_MINUS_SRC_ALPHA, GL.GL_ZERO, GL.GL_ONE)
        rect = self.image_rect(spacing_xy)
        if rect is not None:
            x, y, w, h = rect
            GL.glViewport(x, H - y - h, w, h)
            GL.glUseProgram(self._image_prog)
            GL.glDrawArrays(GL.GL_TRIANGLE_STRIP, 0, 4)
            if scene is not None:
                for layer in sorted(scene.maps, key=lambda m: m.kind != "heat"):
                    self._draw_map(layer, style, opacity, contour_px, (w, h))
                GL.glViewport(0, 0, W, H)
                self._draw_vectors(scene, rect, contour_px)
        if status and self._status:
            self._draw_band(self._band(self._status), 0, 0)
        GL.glDisable(GL.GL_BLEND)

    def _draw_map(
        self,
        layer: MapLayer,
        style: Literal["filled", "contour"],
        opacity: float,
        contour_px: float,
        wh: tuple[int, int],
    ) -> None:
        m = self._maps.get(layer.key)
        if m is None or m.shape is None:
            return
        GL.glActiveTexture(GL.GL_TEXTURE0 + _MAP)
        GL.glBindTexture(GL.GL_TEXTURE_2D, m.tex)
        GL.glActiveTexture(GL.GL_TEXTURE0 + _LUT)
        GL.glBindTexture(GL.GL_TEXTURE_2D, self._heat_lut if m.lut is None else m.lut)
        prog = self._heat_prog if layer.kind == "heat" else self._labels_prog
        GL.glUseProgram(prog)
        GL.glUniform1f(self._u[prog, "u_opacity"], opacity)
        if layer.kind == "labels":
            mode = shaders.MODE_CONTOUR if style == "contour" else shaders.MODE_FILLED
            GL.glUniform1i(self._u[prog, "u_mode"], mode)
            (lh, lw), (w, h) = m.shape, wh
            GL.glUniform2f(
                self._u[prog, "u_step"],
                max(contour_px / w, 1.0 / lw),
                max(contour_px / h, 1.0 / lh),
            )
        GL.glDrawArrays(GL.GL_TRIANGLE_STRIP, 0, 4)

    def _draw_vectors(self, scene: Scene, rect: Rect, line_px: float) -> None:
        """Boxes, crosses and bars in one draw call, then their text."""
        assert self.image_shape is not None
        x0, y0, qw, qh = rect
        fh, fw, _ = self.image_shape
        sx, sy = qw / fw, qh / fh

        def at(x: float, y: float) -> tuple[float, float]:  # pixel centres at integers
            return x0 + (x + 0.5) * sx, y0 + (y + 0.5) * sy

        half, arm = line_px / 2, self.mark_px
        rects: list[tuple[float, float, float, float, Colour]] = []
        texts: list[tuple[str, Colour, float, float, str]] = []  # text, colour, x, y, anchor
        for b in scene.boxes:
            (left, t), (r, bot) = at(b.x1, b.y1), at(b.x2, b.y2)
            rects += [
                (left - half, t - half, r + half, t + half, b.colour),
                (left - half, bot - half, r + half, bot + half, b.colour),
                (left - half, t + half, left + half, bot - half, b.colour),
                (r - half, t + half, r + half, bot - half, b.colour),
            ]
            texts.append((b.text, b.colour, left - half, t - half, "above"))
        for m in scene.marks:
            x, y = at(m.x, m.y)
            rects += [
                (x - arm, y - half, x + arm, y + half, m.colour),
                (x - half, y - arm, x + half, y + arm, m.colour),
            ]
            texts.append((m.text, m.colour, x + arm + 3, y, "beside"))
        for i, p in enumerate(scene.panels):
            bx, by, bw, bh = self.bar_rect(i)
            fill = bx + bw * min(max(p.fraction, 0.0), 1.0)
            rects += [(bx, by, bx + bw, by + bh, BAR_BG), (bx, by, fill, by + bh, p.colour)]
            texts.append((p.text, p.colour, bx + bw, by - 2, "panel"))
        if rects:
            self._draw_rects(rects)
        for text, colour, x, y, anchor in texts:
            band = self._band(((text, colour),))
            if anchor == "above":  # over the box, inside it when there is no room above
                y = y - band.h if y - band.h >= 0 else y + line_px
            elif anchor == "beside":
                y -= band.h / 2
            else:  # right-aligned above the bar
                x, y = x - band.w, y - band.h
            self._draw_band(band, round(min(max(x, 0), self.size[0] - band.w)), round(y))

    def _draw_rects(self, rects: list[tuple[float, float, float, float, Colour]]) -> None:
        corners = (0, 1), (2, 1), (0, 3), (0, 3), (2, 1), (2, 3)  # two triangles a rectangle
        data = np.array(
            [
                (r[i], r[j], c[0] / 255, c[1] / 255, c[2] / 255, 1.0)
                for *r, c in rects
                for i, j in corners
            ],
            np.float32,
        )
        GL.glBindVertexArray(self._shapes_vao)
        GL.glBindBuffer(GL.GL_ARRAY_BUFFER, self._shapes_vbo)
        GL.glBufferData(GL.GL_ARRAY_BUFFER, data.nbytes, data, GL.GL_STREAM_DRAW)
        GL.glUseProgram(self._solid_prog)
        GL.glUniform2f(self._u[self._solid_prog, "u_size"], *self.size)
        GL.glDrawArrays(GL.GL_TRIANGLES, 0, len(data))
        GL.glBindVertexArray(self._vao)

    def _draw_band(self, band: _Band, x: int, y: int) -> None:
        """A text band with its top left at window pixel (x, y)."""
        GL.glViewport(x, self.size[1] - y - band.h, band.w, band.h)
        GL.glActiveTexture(GL.GL_TEXTURE0 + _TEXT)
        GL.glBindTexture(GL.GL_TEXTURE_2D, band.tex)
        GL.glUseProgram(self._text_prog)
        GL.glDrawArrays(GL.GL_TRIANGLE_STRIP, 0, 4)

    def read_pixels(self) -> np.ndarray:
        """The back buffer as (h, w, 3) uint8 RGB, top row first (call before the swap)."""
        W, H = self.size
        GL.glReadBuffer(GL.GL_BACK)
        out = np.empty((H, W, 4), np.uint8)
        GL.glReadPixels(0, 0, W, H, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE, _pointer(out))
        return out[::-1, :, :3]

    def close(self) -> None:
        textures = [self._image, self._heat_lut, *(b.tex for b in self._bands.values())]
        for m in self._maps.values():
            textures += [m.tex] if m.lut is None else [m.tex, m.lut]
        GL.glDeleteTextures(textures)
        GL.glDeleteBuffers(2, [self._vbo, self._shapes_vbo])
        GL.glDeleteVertexArrays(2, [self._vao, self._shapes_vao])
        for prog in self._programs:
            GL.glDeleteProgram(prog)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """``rgb`` (h, w, 3) to a PNG at ``path``, written whole under a temporary name in the
    same folder first (removed when anything fails). ConfigError when ``path`` is a folder
    or its folder is missing; StageError when the file cannot be written."""
    path = check_new_file(Path(path), "screenshot")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    try:
        if not cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
            raise OSError(f"cannot write {tmp.name}")
        tmp.replace(path)
    except (OSError, cv2.error) as e:
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip()
        raise StageError(
            f"cannot write the screenshot {path} ({why}): check the folder's permissions "
            "and free space"
        ) from None
    return path


class DisplayStage(Stage):
    """The bedside display (module docstring). Settings: ``config.display``, or ``settings``."""

    def __init__(
        self,
        spec: StageSpec,
        config: Config,
        context: StageContext,
        settings: DisplayConfig | None = None,
    ) -> None:
        super().__init__(spec, config, context)
        self.settings = settings or config.display
        self.headless: HeadlessSink | None = None

    def setup(self) -> dict[str, Any]:
        s = self.settings
        try:
            self.window = Window(
                fullscreen=s.fullscreen, size=(s.width, s.height), vsync=s.vsync, api=s.gl_api
            )
        except DisplayError as e:
            if s.fallback == "fail" or (s.fallback == "auto" and under_systemd()):
                raise
            log.error("%s; running headless instead (display.fallback = %r)", e, s.fallback)
            self.headless = HeadlessSink(self.spec, self.config, self.ctx)
            return {"display": "headless", "display_error": str(e), **self.headless.setup()}
        params, m = self.spec.params, self.config.model
        model = self._model_path()
        try:
            self.renderer = Renderer(self.window.dialect, self.window.size)
        except BaseException:
            self.window.close()
            raise
        first = ModelView.parse(
            {**params, "classes": [c.model_dump() for c in self._classes(model)]},
            info=f"{params.get('engine') or m.engine or 'auto'} {params.get('device') or m.device}"
            f" | {model.name if model else 'bundled model'}",
        )
        # every results port, "results" first; each draws its records in the colours and
        # names of the model (generation) that made them
        names = sorted((n for n in self.spec.inputs if n.startswith("results")), key=_port_order)
        self.ports = {n: PortView(n, first if n == "results" else ModelView(n)) for n in names}
        for d in params.get("models") or ():  # the other models, as the supervisor described them
            if d.get("port") in self.ports and d["port"] != "results":
                self.ports[d["port"]].describe(int(d.get("generation", 0)), ModelView.parse(d))
        self.primary = names[0] if names else None  # the port "synchronised" follows
        self.frames: RingReader | None = self.ctx.input("frames")
        self.results: dict[str, RingReader | None] = {n: self.ctx.input(n) for n in names}
        self.mode: Literal["filled", "contour"] = "contour" if s.overlay == "contour" else "filled"
        self.overlay_on = s.overlay != "off"
        self.frozen = False
        self.history: deque[tuple[np.ndarray, FrameMeta]] = deque(maxlen=s.sync_history)
        # synchronised: the other ports' results (copies) until a frame of theirs is shown
        self.waiting: dict[str, deque[tuple[np.ndarray, FrameMeta]]] = {
            n: deque(maxlen=s.sync_history) for n in names if n != self.primary
        }
        self.shown: FrameMeta | None = None  # the frame on screen
        self.status_text = ""
        self.warnings: list[str] = []
        self.warned: set[str] = set()  # every warning shown during the run
        now = time.monotonic()
        self.started = now
        self.last_frame_t: float | None = None
        self.first_frame_t: float | None = None
        self.newest_age_ms = 0.0
        self.next_status = now
        self.meter = RateMeter(now)
        self.stats_meter = RateMeter(now)
        self.next_stats = now + self.config.sink.status_interval_s
        self.recent_latency: list[float] = []
        self.latency = Percentiles()
        self.cost = {k: Percentiles() for k in ("upload", "draw", "swap", "total")}
        self.stages = {name: RunningStats() for name in TABLE2}
        self.histograms = FrameHistograms(TABLE2)  # for /metrics
        self.frames_shown = self.results_in = self.unmatched = self.torn = self.bad = 0
        self.withheld = 0  # results whose overlay the guard withheld
        self.frames_without_inference = 0
        self.first_ns = self.last_ns = 0
        self._update_status(now)
        return {
            "display": self.window.description,
            "gl": self.window.dialect,
            "vsync": self.window.vsync,
            "size": list(self.window.size),
        }

    def _model_path(self) -> Path | None:
        """The model the infer stage runs (the supervisor passes on what it reported)."""
        from daemon.models import model_path

        named = self.spec.params.get("model") or self.config.model.path
        return model_path(named) if named else None

    def _classes(self, model: Path | None) -> list[ClassCard]:
        """``params["classes"]``, else the model card's classes (empty: default palette)."""
        given = self.spec.params.get("classes")
        if given is not None:
            return [ClassCard.model_validate(c) for c in given]
        if model is None:
            return []
        try:
            return list(load_card(model).classes)
        except ModelError as e:
            log.warning("overlay in the default colours: %s", e)
            return []

    # -- the loop --------------------------------------------------------------------

    def step(self) -> bool:
        if self.headless is not None:
            return self.headless.step()
        dirty = False
        for key in self.window.pressed():
            if key in ("escape", "q", "quit"):
                if self.settings.allow_quit:
                    log.info("display closed by the user (%s)", key)
                    return False
                log.info("%s ignored: display.allow_quit is off", key)
            dirty = self._key(key) or dirty
        frame = self._read("frames", IDLE_S)
        results = {}
        for name in self.results:
            results[name] = self._read(name, 0.0 if self.frames is not None else IDLE_S)
        if self.frames is None and all(r is None for r in self.results.values()):
            return False
        now = time.monotonic()
        t0 = time.perf_counter()
        upload = self._take(frame, results, now)
        t1 = time.perf_counter()
        if now >= self.next_status or self._current_warnings(now) != self.warnings:
            dirty = self._update_status(now) or dirty
        if now >= self.next_stats:
            self._report_stats(now)
        if upload is None and not dirty:
            return True
        self._draw()
        t2 = time.perf_counter()
        self.window.swap()
        t3 = time.perf_counter()
        if upload is not None:
            self._account(upload, (t1 - t0, t2 - t1, t3 - t2))
        return True

    def _read(self, port: str, timeout: float) -> RingFrame | None:
        """The newest frame (``frames``) or result (a results port), None when none came."""
        reader = self.frames if port == "frames" else self.results[port]
        if reader is None:
            return None
        try:
            return reader.read(timeout=timeout)
        except EndOfStream:
            if port == "frames":
                self.frames = None
            else:
                self.results[port] = None
            return None

    def _take(
        self, frame: RingFrame | None, results: dict[str, RingFrame | None], now: float
    ) -> FrameMeta | None:
        """Note what arrived, upload what is to be shown; the newly shown frame's meta."""
        if frame is not None:
            self.last_frame_t = now
            self.first_frame_t = self.first_frame_t or now
            self.newest_age_ms = (time.monotonic_ns() - frame.t_acquired_ns) / 1e6
        arrived = {name: r for name, r in results.items() if r is not None}
        for name, result in arrived.items():
            self._note(name, result.meta, now)
        if self.frozen:
            return None
        if self.settings.sync == "synchronised":
            return self._take_synchronised(frame, arrived, now)
        for name, result in arrived.items():
            self._ingest(name, result)
        if frame is None:
            return None
        self.renderer.upload_image(frame.image)  # in place from the ring slot
        if not frame.valid():  # overwritten while uploading: the next frame replaces it
            self.torn += 1
            return None
        self.shown = frame.meta
        return frame.meta

    def _take_synchronised(
        self, frame: RingFrame | None, results: dict[str, RingFrame], now: float
    ) -> FrameMeta | None:
        """Show a frame only with the primary port's result computed on it, or, once
        inference has stopped, the newest frame without an overlay. Each other port draws
        its newest result computed on that frame or an earlier one, never on a later one
        (a faster model's mark would be where things will be, not where they are shown)."""
        if frame is not None:
            try:
                self.history.append(frame.copy())
            except FrameOverwritten:
                self.torn += 1
        for name, other in results.items():
            if name != self.primary:
                try:
                    self.waiting[name].append(other.copy())
                except FrameOverwritten:
                    self.torn += 1
        result = results.get(self.primary or "")
        if result is not None:
            index = result.meta.index
            match = next((i for i, (_, m) in enumerate(self.history) if m.index == index), None)
            if match is None:
                self.unmatched += 1
            elif self._ingest(self.primary or "", result):
                image, meta = self.history[match]
                for _ in range(match + 1):
                    self.history.popleft()
                self._catch_up(index)
                self.renderer.upload_image(image)
                self.shown = meta
                return meta
        if frame is not None and self._inference_stopped(now) and self.history:
            image, meta = self.history[-1]
            self.renderer.upload_image(image)
            self.shown = meta
            return meta
        return None

    def _catch_up(self, index: int) -> None:
        """Synchronised: each other port takes its newest waiting result of frame
        ``index`` or earlier (those after it wait for their frames)."""
        for name, waiting in self.waiting.items():
            due = None
            while waiting and waiting[0][1].index <= index:
                due = waiting.popleft()
            if due is not None:
                self._accept(name, *due, lambda: True)  # a copy: never torn

    def _note(self, name: str, meta: FrameMeta, now: float) -> None:
        """Count a result that came on port ``name`` (the primary port's Table-2 timings)."""
        port = self.ports[name]
        port.last_t = now
        port.results += 1
        self.results_in += 1
        self.withheld += bool(meta.flags & WITHHELD)
        if name == self.primary:
            for step, idx in TABLE2.items():
                self.stages[step].add(float(meta.timings_ms[idx]))
                self.histograms.steps[step].add(float(meta.timings_ms[idx]))

    def _ingest(self, name: str, result: RingFrame) -> bool:
        """Upload and keep what the result on port ``name`` draws; False when it was torn
        or is not a result record (counted; nothing of that port is drawn until the next)."""
        return self._accept(name, result.image, result.meta, result.valid)

    def _accept(
        self, name: str, payload: np.ndarray, meta: FrameMeta, valid: Callable[[], bool]
    ) -> bool:
        """:meth:`_ingest` of a payload (a ring slot, or a copy) whose slot ``valid`` checks."""
        port = self.ports[name]
        try:
            if port.take(payload, meta, self.renderer, self.settings, valid):
                return True
        except RecordError as e:
            if valid():
                port.clear()
                port.bad += 1
                self.bad += 1
                log.warning("display: a result on port %s skipped: %s", name, e)
                return False
            port.clear()
        self.torn += 1
        return False

    def _account(self, shown: FrameMeta, costs: tuple[float, float, float]) -> None:
        now_ns = time.monotonic_ns()
        if shown.t_acquired_ns > 0:
            ms = (now_ns - shown.t_acquired_ns) / 1e6
            self.latency.add(ms)
            self.histograms.latency.add(ms)
            self.recent_latency.append(ms)
        for name, s in zip(("upload", "draw", "swap"), costs, strict=True):
            self.cost[name].add(s * 1e3)
        self.cost["total"].add(sum(costs) * 1e3)
        self.frames_shown += 1
        self.frames_without_inference += INFERENCE_STOPPED in self.warnings
        self.stats_meter.tick()
        self.first_ns = self.first_ns or now_ns
        self.last_ns = now_ns
        self.meter.tick()

    # -- state -----------------------------------------------------------------------

    def _stale(self, port: PortView, now: float) -> bool:
        """No result on ``port`` for inference_stopped_ms while frames flow."""
        since = port.last_t or self.first_frame_t
        return (
            self._frames_flowing(now)
            and since is not None
            and now - since > self.settings.inference_stopped_ms / 1e3
        )

    def _inference_stopped(self, now: float) -> bool:
        return any(self._stale(p, now) for p in self.ports.values())

    def _visible(self, port: PortView, now: float) -> bool:
        """Whether ``port``'s newest result is drawn: overlay on, a result that is not
        stale and, synchronised, for the primary port, the result of the frame shown."""
        return (
            self.overlay_on
            and self.shown is not None
            and port.index is not None
            and not self._stale(port, now)
            and not (
                self.settings.sync == "synchronised"
                and port.port == self.primary
                and port.index != self.shown.index
            )
        )

    def _scene(self, now: float) -> Scene:
        """What the visible ports draw (heat maps only when display.heatmap is on)."""
        scene = Scene()
        for port in self.ports.values():
            if self._visible(port, now):
                scene.extend(port.scene())
        if not self.settings.heatmap:
            scene.maps = [m for m in scene.maps if m.kind != "heat"]
        return scene

    @property
    def info(self) -> str:
        """The models drawn, "engine device | model" each."""
        return " + ".join(p.model.info for p in self.ports.values())

    def _frames_flowing(self, now: float) -> bool:
        return now - (self.last_frame_t or self.started) <= self.settings.no_frames_ms / 1e3

    def _current_warnings(self, now: float) -> list[str]:
        if not self._frames_flowing(now):
            return [SCANNER_DISCONNECTED]
        out = [INFERENCE_STOPPED] if self._inference_stopped(now) else []
        if not out and any(p.withheld and p.index is not None for p in self.ports.values()):
            out.append(NO_CONFIDENT_FINDING)
        if self.newest_age_ms > self.settings.frame_old_ms:
            out.append(FRAME_OLD)
        return out

    def draw_mode(self) -> Mode:
        """How label maps look now: off when hidden, or when no port's result is drawn
        (none yet, inference stopped, or not of the frame shown when synchronised)."""
        now = time.monotonic()
        if not any(self._visible(p, now) for p in self.ports.values()):
            return "off"
        return self.mode

    def _report_stats(self, now: float) -> None:
        """The figures of the last interval, as the headless sink reports them (the
        supervisor publishes them as telemetry), and the warnings."""
        self.next_stats = now + self.config.sink.status_interval_s
        self.ctx.report(
            "stats",
            fps=round(self.stats_meter.rate(now), 2),
            latency_ms=self.latency.recent(50, 99),
            inference_ms=round(self.stages["nn_inference"].mean, 3),
            frames=self.frames_shown,
            dropped=self.frames.dropped if self.frames is not None else 0,
            withheld=withheld_figures(self.withheld, self.results_in),
            warnings=list(self.warnings),
            histograms=self.histograms.snapshot(),
        )

    def _update_status(self, now: float) -> bool:
        """Refresh warnings and the status line; whether anything visible changed."""
        self.next_status = now + STATUS_S
        before = self.warnings
        self.warnings = self._current_warnings(now)
        self.warned.update(self.warnings)
        if self.warnings and before != self.warnings:
            log.warning("display: %s", ", ".join(self.warnings))
        elif before and not self.warnings:
            log.info("display: %s cleared", ", ".join(before))
        if not self.settings.status_line:
            return before != self.warnings
        lat = f"{statistics.median(self.recent_latency):.0f} ms" if self.recent_latency else "-"
        self.recent_latency.clear()
        mode = "overlay off" if not self.overlay_on else self.mode
        scalars = [v for p in self.ports.values() if self._visible(p, now) for v in p.scalars()]
        text = " | ".join(
            [f"{self.meter.rate(now):5.1f} fps", f"latency {lat}", self.info, mode, *scalars]
            + (["FROZEN"] if self.frozen else [])
        )
        self.status_text = text
        self.renderer.set_status(
            [(text, TEXT_COLOUR)] + [(f"  {w.upper()}", WARN_COLOUR) for w in self.warnings]
        )
        return True

    def command(self, name: str, args: dict[str, Any]) -> Any:
        """``screenshot`` {path}: save the screen as a PNG. ``set`` {key: "display.<name>",
        value}: change one of :data:`~daemon.config.DISPLAY_RUNTIME` while running.
        ``model`` {generation, model, engine, device, classes, outputs, port}: the model
        whose results of that generation come on ``port`` (default ``results``; sent by
        the supervisor before a hot-swap takes over)."""
        if name == "model" and self.headless is not None:
            return self.headless.command(name, args)
        if name == "model":  # a hot-swap: results of this generation come from it
            port = str(args.get("port") or "results")
            if port not in self.ports:
                raise StageError(
                    f"the display reads no results port {port!r} (it reads "
                    f"{', '.join(self.ports) or 'none'}): check the pipeline's wiring"
                )
            self.ports[port].describe(int(args["generation"]), ModelView.parse(args))
            self.next_status = 0.0  # the status line names the model
            return {"generation": args["generation"], "port": port}
        if name == "screenshot":
            path = self.screenshot(Path(args["path"]))
            return {"path": str(path), "frame": None if self.shown is None else self.shown.index}
        key = str(args.get("key", ""))
        if name == "set" and key.removeprefix("display.") in DISPLAY_RUNTIME:
            self.set(key.removeprefix("display."), args["value"])
            return {"key": key, "value": args["value"]}
        return super().command(name, args)

    def set(self, name: str, value: Any) -> None:
        """Change the display setting ``name`` (one of :data:`~daemon.config.DISPLAY_RUNTIME`)."""
        try:
            self.settings = DisplayConfig.model_validate(
                {**self.settings.model_dump(), name: value}
            )
        except ValidationError as e:
            raise ConfigError(
                f"setting 'display.{name}': {e.errors()[0]['msg'].lower()} (got {value!r})"
            ) from None
        if name == "overlay" and self.headless is None:
            self.overlay_on = value != "off"
            self.mode = "contour" if value == "contour" else "filled"
        self.next_status = 0.0  # redraw with the new state

    def _key(self, key: str) -> bool:
        """Apply a key; whether the picture changes."""
        if key == "o":
            self.overlay_on = not self.overlay_on
        elif key == "m":
            self.mode = "contour" if self.mode == "filled" else "filled"
            self.overlay_on = True
        elif key == "h":
            self.set("heatmap", not self.settings.heatmap)
        elif key == "f":
            self.frozen = not self.frozen
        elif key == "s":
            try:
                self.screenshot(self._screenshot_path())
            except (EchodError, OSError) as e:  # a key never takes the display down
                log.warning("screenshot not saved: %s", e)
            return False
        else:
            return False
        self.next_status = 0.0  # show the new state now
        return True

    def _screenshot_path(self) -> Path:
        """A new file in the screenshot folder (made if missing) for the ``s`` key."""
        folder = (
            Path(self.settings.screenshot_dir)
            if self.settings.screenshot_dir
            else self.config.paths.state() / "screenshots"
        )
        folder.mkdir(parents=True, exist_ok=True)
        index = self.shown.index if self.shown is not None else 0
        return folder / f"echod-{time.strftime('%Y%m%d-%H%M%S')}-{index}.png"

    # -- pictures --------------------------------------------------------------------

    def _draw(self) -> None:
        spacing = self.shown.spacing[:2] if self.shown is not None else (1.0, 1.0)
        s = self.settings
        self.renderer.draw(
            self._scene(time.monotonic()),
            self.mode,
            (spacing[0], spacing[1]),
            s.opacity,
            s.contour_px,
            status=s.status_line,
        )

    def capture(self) -> np.ndarray:
        """What the screen shows now, as (h, w, 3) RGB (drawn again, read back)."""
        if self.headless is not None:
            raise DisplayError("no picture: the display runs headless (no OpenGL window)")
        self._draw()
        return self.renderer.read_pixels()

    def screenshot(self, path: Path) -> Path:
        """Save what the screen shows to ``path`` (PNG); call on the display's thread."""
        path = write_png(path, self.capture())
        log.info("screenshot saved to %s", path)
        return path

    def teardown(self) -> None:
        if self.headless is not None:
            self.headless.teardown()
        if hasattr(self, "renderer"):
            self.renderer.close()
        if hasattr(self, "window"):
            self.window.close()

    def summary(self) -> dict[str, Any]:
        if self.headless is not None:
            return {"display": "headless", **self.headless.summary()}
        span = (self.last_ns - self.first_ns) / 1e9
        return {
            "frames_out": self.frames_shown,
            "fps": round((self.frames_shown - 1) / span, 2) if span > 0 else 0.0,
            "latency_ms": self.latency.summary(50, 90, 99),
            "stages": {name: s.summary() for name, s in self.stages.items()},
            "display_ms": {name: p.summary(50, 99) for name, p in self.cost.items()},
            "results_in": self.results_in,
            "results_bad": self.bad,
            "ports": {n: {"results": p.results, "bad": p.bad} for n, p in self.ports.items()},
            "withheld": withheld_figures(self.withheld, self.results_in),
            "results_unmatched": self.unmatched,
            "frames_without_inference": self.frames_without_inference,
            "warned": sorted(self.warned),
            "torn": self.torn,
            "display": self.window.description,
        }
