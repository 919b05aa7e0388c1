"""Frame -> network input on an OpenCL device (pyopencl): the twin of ``preprocess.prepare``.

One fused kernel does, per output pixel, what ``preprocess`` does in several
passes: bilinear resize with half-pixel centres and clamped borders (OpenCV's
INTER_LINEAR), gray <-> RGB (ITU-R 601 weights), clip, ``x = v * a + b`` per
channel, and the NCHW/NHWC layout, into float32. It computes in float from the
frame's own values, so it is the "exact float implementation" of the
``preprocess`` module doc: the two agree within one input level times
``scale / std`` for integer frames (1.5 levels where the CPU rounds twice, RGB
frames into a 1-channel model) and to float32 precision for float frames.

:func:`probe` finds a usable device (it builds and runs the kernel once);
:func:`choose` picks the CPU or OpenCL path for a ``model.preprocess`` setting
and says why. pyopencl is imported only here, when OpenCL is asked for.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from daemon.engines.base import TensorSpec, device_kind, import_library
from daemon.engines.card import ModelCard
from daemon.errors import ModelError

log = logging.getLogger(__name__)

Prepare = Callable[[np.ndarray, TensorSpec, ModelCard], np.ndarray]
SETTINGS = ("cpu", "opencl", "auto")

# Frame dtypes the kernel reads directly; others are converted to float32 first.
_TYPES = {
    np.dtype(np.uint8): "uchar",
    np.dtype(np.uint16): "ushort",
    np.dtype(np.int16): "short",
    np.dtype(np.float32): "float",
}

KERNEL = """
__kernel void prepare(
    __global const SRC_T *src, const int sh, const int sw, const int sc,
    __global float *dst, const int dh, const int dw, const int dc, const int nhwc,
    const float ry, const float rx,
    __constant float *coef, const float lo, const float hi)
{
    const int x = get_global_id(0), y = get_global_id(1);
    if (x >= dw || y >= dh) return;
    float fy = fmax((y + 0.5f) * ry - 0.5f, 0.0f);
    float fx = fmax((x + 0.5f) * rx - 0.5f, 0.0f);
    int y0 = min((int)fy, sh - 1), x0 = min((int)fx, sw - 1);
    int y1 = min(y0 + 1, sh - 1), x1 = min(x0 + 1, sw - 1);
    fy = (y0 == sh - 1) ? 0.0f : fy - y0;
    fx = (x0 == sw - 1) ? 0.0f : fx - x0;
    float v[3];
    for (int c = 0; c < sc; ++c) {
        float a = src[(y0 * sw + x0) * sc + c], b = src[(y0 * sw + x1) * sc + c];
        float p = src[(y1 * sw + x0) * sc + c], q = src[(y1 * sw + x1) * sc + c];
        float top = a + (b - a) * fx, bottom = p + (q - p) * fx;
        v[c] = top + (bottom - top) * fy;
    }
    if (sc == 3 && dc == 1) v[0] = 0.299f * v[0] + 0.587f * v[1] + 0.114f * v[2];
    for (int c = 0; c < dc; ++c) {
        float s = clamp(v[sc == 1 ? 0 : c], lo, hi);
        float out = s * coef[c] + coef[3 + c];  /* x = v * alpha + beta */
        int i = nhwc ? (y * dw + x) * dc + c : (c * dh + y) * dw + x;
        dst[i] = out;
    }
}
"""


class OpenClPrepare:
    """``prepare(image, spec, card)`` on one OpenCL device (same meaning as the CPU one)."""

    def __init__(self, device: Any) -> None:
        cl, reason = import_library("pyopencl")
        if cl is None:
            raise RuntimeError(reason)
        self._cl = cl
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context)
        self.description = f"OpenCL {device.name.strip()} ({device.platform.name.strip()})"
        self._kernels: dict[str, Any] = {}
        self._buffers: dict[tuple[str, int], Any] = {}

    def _kernel(self, src_type: str) -> Any:
        kernel = self._kernels.get(src_type)
        if kernel is None:
            program = self._cl.Program(self.context, KERNEL).build(options=[f"-DSRC_T={src_type}"])
            kernel = self._kernels[src_type] = self._cl.Kernel(program, "prepare")
        return kernel

    def _buffer(self, role: str, nbytes: int) -> Any:
        buf = self._buffers.get((role, nbytes))
        if buf is None:
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != role}
            buf = self._buffers[(role, nbytes)] = self._cl.Buffer(
                self.context, self._cl.mem_flags.READ_WRITE, nbytes
            )
        return buf

    def __call__(self, image: np.ndarray, spec: TensorSpec, card: ModelCard) -> np.ndarray:
        from daemon.engines import preprocess

        cl = self._cl
        layout = preprocess.layout_of(spec, card)
        src = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        sh, sw = src.shape[0], src.shape[1]
        sc = 1 if src.ndim == 2 else src.shape[2]
        h, w = preprocess.network_size(spec, card, (sh, sw))
        c = preprocess.network_channels(spec, card, sc)
        if src.dtype not in _TYPES:
            src = src.astype(np.float32)
        src = np.ascontiguousarray(src)
        alpha, beta = preprocess.affine(card, c)
        clip = card.input.normalisation.clip
        lo, hi = (
            (np.float32(v) for v in clip) if clip else (np.float32(-np.inf), np.float32(np.inf))
        )
        shape = (1, c, h, w) if layout == "NCHW" else (1, h, w, c)
        out = np.empty(shape, np.float32)
        src_buf = self._buffer("src", src.nbytes)
        dst_buf = self._buffer("dst", out.nbytes)
        coef = self._buffer("coef", 24)
        cl.enqueue_copy(self.queue, src_buf, src, is_blocking=False)
        params = np.zeros(6, np.float32)
        params[:c], params[3 : 3 + c] = alpha, beta
        cl.enqueue_copy(self.queue, coef, params, is_blocking=False)
        kernel = self._kernel(_TYPES[src.dtype])
        kernel(
            self.queue,
            (w, h),
            None,
            src_buf,
            np.int32(sh),
            np.int32(sw),
            np.int32(sc),
            dst_buf,
            np.int32(h),
            np.int32(w),
            np.int32(c),
            np.int32(layout == "NHWC"),
            np.float32(sh / h),
            np.float32(sw / w),
            coef,
            lo,
            hi,
        )
        cl.enqueue_copy(self.queue, out, dst_buf, is_blocking=True)
        dtype = spec.dtype if spec.dtype.kind == "f" else np.dtype(np.float32)
        return out if dtype == out.dtype else out.astype(dtype)


def probe(gpu_only: bool = False) -> tuple[Any, str]:
    """A usable OpenCL device (GPU first, then accelerator, then CPU unless ``gpu_only``),
    or ``(None, why not)``. Usable means the kernel builds and runs."""
    cl, reason = import_library("pyopencl")
    if cl is None:
        return None, f"pyopencl: {reason}"
    try:
        platforms = cl.get_platforms()
    except Exception as exc:  # no ICD at all raises here
        return None, f"no OpenCL platform: {type(exc).__name__}: {exc}"
    kinds = [cl.device_type.GPU, cl.device_type.ACCELERATOR]
    if not gpu_only:
        kinds.append(cl.device_type.CPU)
    tried: list[str] = []
    for kind in kinds:
        for platform in platforms:
            try:
                devices = platform.get_devices(device_type=kind)
            except Exception:  # the platform has none of this kind
                continue
            for device in devices:
                why = _self_test(device)
                if not why:
                    return device, ""
                tried.append(f"{device.name.strip()}: {why}")
    found = ", ".join(p.name.strip() for p in platforms) or "none"
    what = "GPU or accelerator" if gpu_only else "OpenCL"
    return None, f"no usable {what} device (platforms: {found})" + "".join(f"; {t}" for t in tried)


def _self_test(device: Any) -> str:
    """ "" when the kernel builds and resizes a 2x2 frame correctly on ``device``."""
    try:
        runner = OpenClPrepare(device)
        spec = TensorSpec("x", (1, 1, 4, 4), np.dtype(np.float32), "NCHW")
        x = runner(np.array([[0, 255], [255, 0]], np.uint8), spec, ModelCard())
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    if not np.isclose(x[0, 0, 0, 0], 0.0) or not np.isclose(x[0, 0, 0, 3], 1.0):
        return "the kernel computed wrong values"
    return ""


def choose(setting: str, engine_device: str) -> tuple[Prepare, str, str]:
    """The pre-processing for ``setting``: ``(prepare, what runs, why not OpenCL or "")``.

    ``"opencl"`` takes any usable OpenCL device; ``"auto"`` only a GPU or
    accelerator, and only when the engine itself runs off the CPU; both fall
    back to the CPU path with the reason (logged as a warning for ``"opencl"``).
    """
    from daemon.engines import preprocess

    if setting not in SETTINGS:
        close = difflib.get_close_matches(setting, SETTINGS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(SETTINGS)}"
        raise ModelError(f"preprocess = {setting!r}: {hint}")
    if setting == "cpu":
        return preprocess.prepare, "cpu", ""
    if setting == "auto" and device_kind(engine_device) == "cpu":
        return preprocess.prepare, "cpu", "the engine runs on the CPU"
    device, reason = probe(gpu_only=setting == "auto")
    if device is not None:
        runner = OpenClPrepare(device)
        log.info("pre-processing on %s", runner.description)
        return runner, runner.description, ""
    (log.warning if setting == "opencl" else log.info)(
        "pre-processing falls back to the CPU: %s", reason
    )
    return preprocess.prepare, "cpu", reason
