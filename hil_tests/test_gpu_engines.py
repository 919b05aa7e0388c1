"""GPU engines on an NVIDIA machine, each against the CPU: PyTorch on CUDA (fp16 +
CUDA graphs), OpenCL pre-processing on the NVIDIA GPU, ONNX Runtime's CUDA
provider and TensorRT. Each skips with the precise reason where it cannot run.

Tolerances against float32 on the CPU (reference U-Net, softmax outputs):
fp32 on the GPU ``FP32_ATOL``; fp16 ``FP16_ATOL`` in probabilities and at most
``FP16_FLIPS`` of labels different (near-ties). OpenCL pre-processing as in
tests/test_engines_opencl.py (one input level).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.engines.base import import_library
from daemon.engines.card import load_card
from daemon.engines.onnxruntime import OnnxRuntimeEngine
from daemon.engines.reference import ensure_reference

ROOT = Path(__file__).resolve().parent.parent
FP32_ATOL = 1e-4  # "fp32" turns TF32 off
FP16_ATOL = 2e-2
FP16_FLIPS = 5e-3
NVIDIA_ICD = "libnvidia-opencl.so.1"


def need(module: str) -> Any:
    lib, reason = import_library(module)
    if lib is None:
        pytest.skip(f"{module} is not importable: {reason}")
    return lib


def need_cuda() -> Any:
    torch = need("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device")
    return torch


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def unet(cache: Path) -> Path:
    return ensure_reference("unet2d-256", cache)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(3).random((4, 1, 256, 256), np.float32)


@pytest.fixture(scope="module")
def cpu_out(unet: Path, batch: np.ndarray) -> np.ndarray:
    eng = OnnxRuntimeEngine()
    eng.load(unet, "cpu")
    return eng.run({"image": batch})["probabilities"]


def agree(y: np.ndarray, ref: np.ndarray, atol: float, flips: float) -> None:
    np.testing.assert_allclose(y, ref, rtol=0, atol=atol)
    differ = float(np.mean(y.argmax(1) != ref.argmax(1)))
    assert differ <= flips, f"{differ:.3%} of labels differ"


def test_pytorch_cuda_batches_in_flight(
    cache: Path, batch: np.ndarray, cpu_out: np.ndarray
) -> None:
    """Batches of every size up to 4, several in flight (a CUDA graph per size, copies on
    their own streams): each comes back in order with the values of its images."""
    need_cuda()
    from daemon.engines.pytorch import PyTorchEngine

    eng = PyTorchEngine()
    eng.load(ensure_reference("unet2d-256", cache, "pt2"), "cuda", mode="all")
    assert eng.max_batch >= 4 and eng.per_batch_size and eng.depth > 1
    sizes = [1, 3, 2, 4, 4, 1, 2, 3, 1, 1, 4, 2] * 4
    pending: list[tuple[Any, list[int]]] = []
    got: list[np.ndarray] = []
    want: list[np.ndarray] = []
    for k, n in enumerate(sizes):
        rows = [(k + j) % 4 for j in range(n)]
        if len(pending) >= eng.depth:  # views stay valid for `depth` more submissions
            p, r = pending.pop(0)
            got.append(np.array(p.wait()["probabilities"]))
            want.append(cpu_out[r])
        p = eng.submit_batch([{"image": batch[i : i + 1]} for i in rows])
        pending.append((p, rows))
    for p, r in pending:
        got.append(np.array(p.wait()["probabilities"]))
        want.append(cpu_out[r])
    assert [g.shape[0] for g in got] == sizes
    agree(np.concatenate(got), np.concatenate(want), FP16_ATOL, FP16_FLIPS)
    one = PyTorchEngine()  # mode newest: one at a time, on one stream
    one.load(ensure_reference("unet2d-256", cache, "pt2"), "cuda")
    out = one.submit_batch([{"image": batch[2:3]}]).wait()["probabilities"]
    agree(out, cpu_out[2:3], FP16_ATOL, FP16_FLIPS)
    eng.close()
    one.close()


def test_pytorch_cuda_labels_in_the_graph(
    cache: Path, batch: np.ndarray, cpu_out: np.ndarray
) -> None:
    """A segmentation's argmax taken in the CUDA graph: the same labels as the CPU's
    argmax of the probabilities that come back with it, batched and in flight; the
    Network takes them (no argmax of its own) and decodes the same label maps."""
    need_cuda()
    from daemon.engines import postprocess
    from daemon.engines.network import Network
    from daemon.engines.pytorch import PyTorchEngine

    path = ensure_reference("unet2d-256", cache, "pt2")
    eng = PyTorchEngine()
    eng.load(path, "cuda", mode="all")
    assert eng.label_on_device("probabilities", 1) == "probabilities:labels"
    pending = [eng.submit_batch([{"image": batch[i : i + 1]} for i in range(n)]) for n in (1, 3)]
    for n, p in zip((1, 3), pending, strict=True):
        out = p.wait()
        labels, probs = out["probabilities:labels"], out["probabilities"]
        assert labels.dtype == np.uint8 and labels.shape == (n, 256, 256)
        np.testing.assert_array_equal(labels, probs.argmax(1))
        agree(probs, cpu_out[:n], FP16_ATOL, FP16_FLIPS)
    eng.close()

    net = Network.open(path, engine="pytorch", device="cuda")
    assert [h.argmax for h in net.heads] == ["probabilities:labels"]
    frame = (batch[1, 0] * 255).astype(np.uint8)
    for shape in ((256, 256), (300, 420)):  # the network's size, then resized back
        img = np.ascontiguousarray(np.resize(frame, shape))
        x = net.prepare(img)
        out = net.result(net.submit(x))
        (decoded,), _ = net.finish(out, img.shape, x)
        g = net.geometry(shape)
        cpu = postprocess.labels(out["probabilities"], net.heads[0].card, shape, geometry=g)
        np.testing.assert_array_equal(decoded.array, cpu)
    net.close()


def test_calibrate_pytorch_on_cuda(cache: Path, tmp_path: Path) -> None:
    """``echod models calibrate`` on the GPU: fp32, fp16 and bf16 rows for PyTorch on
    CUDA (the only engine here that loads a .pt2), beside the CPU row the card had;
    ``precision = "auto"`` then picks among them."""
    need_cuda()
    from daemon.engines.card import MeasuredPrecision, PrecisionCard, card_path
    from daemon.engines.precision import choose
    from daemon.engines.segmenter import Segmenter
    from daemon.models import calibrate

    ref = ensure_reference("unet2d-256", cache, "pt2")
    model = tmp_path / ref.name
    shutil.copy(ref, model)
    shutil.copy(card_path(ref), card_path(model))
    cpu = MeasuredPrecision(engine="onnxruntime", device="cpu", precision="fp32", drop=0, fps=30)
    calibrate.write_precision(model, PrecisionCard(data="d", machine="m", measured=(cpu,)))
    result = calibrate.calibrate(model, calibrate.phantom_frames(24, 8), device="cuda", rounds=2)
    got = {(m.engine, m.device, m.precision): m for m in result.measured}
    cuda = {k[2]: m for k, m in got.items() if k[:2] == ("pytorch", "cuda")}
    assert set(cuda) == {"fp32", "fp16", "bf16"} and len(got) == 4
    assert got[("onnxruntime", "cpu", "fp32")].machine == "m"
    assert cuda["fp32"].drop == 0 and set(cuda["fp32"].agreement.values()) == {1.0}
    assert min(cuda["fp16"].agreement.values()) > 0.9, cuda["fp16"]  # near-ties only
    assert all(m.fps > 0 for m in cuda.values())
    best = max((m for m in cuda.values() if m.drop <= result.tolerance), key=lambda m: m.fps)
    assert choose(load_card(model), model, "pytorch", "cuda", "auto").precision == best.precision
    with Segmenter.open(model, engine="pytorch", device="cuda") as seg:
        assert seg.describe()["precision"] == best.precision


@pytest.fixture(scope="module")
def ct_on_cuda(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The bundled CT model as a .pt2, calibrated on the GPU (held-out phantom slabs
    through the ct job's steps)."""
    need_cuda()
    from daemon.engines.reference import export_torch
    from daemon.models import BUNDLED, CT, calibrate

    model = export_torch(BUNDLED / CT, tmp_path_factory.mktemp("ct") / "ct-nodule-seg.pt2", "pt2")
    assert load_card(model).precision is None  # the ONNX file's rows stay with it
    return model, calibrate.calibrate(
        model, calibrate.phantom(model, 8, 4), device="cuda", rounds=2
    )


def test_calibrate_a_3d_model_on_cuda(ct_on_cuda: tuple[Path, Any]) -> None:
    """fp32, fp16 and bf16 rows for PyTorch on CUDA, nodule Dice in 3-D; auto picks the
    fastest within tolerance."""
    from daemon.engines.precision import choose

    model, result = ct_on_cuda
    cuda = {m.precision: m for m in result.measured}
    assert set(cuda) == {"fp32", "fp16", "bf16"}
    assert all(m.engine == "pytorch" and m.device == "cuda" for m in cuda.values())
    assert min(cuda["fp16"].agreement.values()) > 0.95 and cuda["fp16"].drop <= 0.01
    best = max((m for m in cuda.values() if m.drop <= result.tolerance), key=lambda m: m.fps)
    assert choose(load_card(model), model, "pytorch", "cuda", "auto").precision == best.precision
    print(result.machine, {p: (m.drop, m.fps, m.agreement) for p, m in cuda.items()})


def test_a_ct_job_on_cuda_runs_the_calibrated_precision(
    ct_on_cuda: tuple[Path, Any], tmp_path: Path
) -> None:
    """A ct job at auto on the GPU runs what calibration chose and finds the nodules of
    a phantom slab never seen in training or calibration."""
    need("SimpleITK")  # the job's NIfTI input and labels
    from daemon.engines.precision import choose
    from daemon.offline import volumes
    from daemon.offline.ct import CtJob, CtOptions
    from daemon.offline.kind import FolderContext
    from daemon.phantoms.ct import training_slab, write_image

    model, _ = ct_on_cuda
    slab = training_slab(1_000_602, (32, 512, 512))
    assert slab.nodules
    source = write_image(slab, tmp_path / "slab.nii.gz")
    ctx = FolderContext.under(
        tmp_path / "job", source, CtOptions(), engine="pytorch", device="cuda", model=model
    )
    manifest = CtJob().run(ctx)
    chosen = choose(load_card(model), model, "pytorch", "cuda", "auto").precision
    assert manifest["engine"]["precision"] == chosen
    found = volumes.read_image(ctx.output / "labels.nii.gz").hu == 1
    truth = slab.labels == 1
    dice = 2 * float((found & truth).sum()) / max(1, int(found.sum() + truth.sum()))
    assert dice >= 0.8, dice


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_pytorch_cuda_fp16_cuda_graphs(
    fmt: str, cache: Path, batch: np.ndarray, cpu_out: np.ndarray
) -> None:
    need_cuda()
    from daemon.engines.pytorch import PyTorchEngine

    path = ensure_reference("unet2d-256", cache, fmt)  # type: ignore[arg-type]
    eng = PyTorchEngine()
    eng.load(path, "cuda", mode="all")
    assert eng.device == "cuda:0 float16 cuda-graphs" and eng.depth > 1
    offline = PyTorchEngine()
    offline.load(path, "cuda", priority="offline", cuda_graphs=False)
    # live frames on a higher-priority stream than an offline job's (lower is higher)
    assert eng._stream.priority < offline._stream.priority, "stream priorities"
    offline.close()
    agree(eng.run({"image": batch})["probabilities"], cpu_out, FP16_ATOL, FP16_FLIPS)
    # one frame at a time through the asynchronous path: in order, same values
    frames = [{"image": batch[i : i + 1]} for i in range(4)] * 3
    got = np.concatenate([o["probabilities"].copy() for o in eng.run_many(frames)])
    agree(got, np.concatenate([cpu_out] * 3), FP16_ATOL, FP16_FLIPS)
    eng.close()

    fp32 = PyTorchEngine()
    fp32.load(path, "cuda", precision="fp32", cuda_graphs=False)
    assert fp32.device == "cuda:0 float32"
    agree(fp32.run({"image": batch})["probabilities"], cpu_out, FP32_ATOL, FP16_FLIPS)


def test_onnxruntime_cuda(unet: Path, batch: np.ndarray, cpu_out: np.ndarray) -> None:
    ort = need("onnxruntime")
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        pytest.skip(
            f"onnxruntime {ort.__version__} has no CUDA provider ({', '.join(providers)}): "
            "install onnxruntime-gpu"
        )
    eng = OnnxRuntimeEngine()
    eng.load(unet, "cuda")  # raises if the session fell back to the CPU
    assert eng.device == "CUDAExecutionProvider"
    agree(eng.run({"image": batch})["probabilities"], cpu_out, FP32_ATOL, FP16_FLIPS)


def test_tensorrt(unet: Path, cache: Path, batch: np.ndarray, cpu_out: np.ndarray) -> None:
    need("tensorrt")
    from daemon.engines.tensorrt import TensorRtEngine

    probe = TensorRtEngine.probe()
    if not probe.available:
        pytest.skip(f"tensorrt: {probe.reason}")
    eng = TensorRtEngine()
    eng.load(unet, "cuda", cache_dir=cache, max_batch=4)
    agree(eng.run({"image": batch})["probabilities"], cpu_out, FP16_ATOL, FP16_FLIPS)
    engines = list((cache / "tensorrt").glob("unet2d-256-*.engine"))
    assert len(engines) == 1 and engines[0].with_suffix(".json").is_file()
    again = TensorRtEngine()
    again.load(unet, "cuda", cache_dir=cache, max_batch=4)  # from the cache this time
    assert list((cache / "tensorrt").glob("unet2d-256-*.engine")) == engines
    agree(again.run({"image": batch[:1]})["probabilities"], cpu_out[:1], FP16_ATOL, FP16_FLIPS)
    # fp32 of an fp32 model: a strongly typed network on TensorRT >= 10 (TF32 stays allowed)
    fp32 = TensorRtEngine()
    fp32.load(unet, "cuda", cache_dir=cache, max_batch=4, precision="fp32")
    assert fp32.device.endswith(" fp32")
    agree(fp32.run({"image": batch})["probabilities"], cpu_out, FP16_ATOL, FP16_FLIPS)


def test_tensorrt_int8_from_calibrate(cache: Path, tmp_path: Path) -> None:
    """The bundled model's int8 file for TensorRT (symmetric Q/DQ, made by ``echod models
    calibrate``'s quantizer) builds with its Q/DQ layers in int8 and labels as f32 does."""
    need("tensorrt")
    from daemon.engines.segmenter import Segmenter
    from daemon.engines.tensorrt import TensorRtEngine
    from daemon.models import BUNDLED, ULTRASOUND, calibrate

    probe = TensorRtEngine.probe()
    if not probe.available:
        pytest.skip(f"tensorrt: {probe.reason}")
    need("onnxruntime")  # its quantizer writes the file
    model = tmp_path / ULTRASOUND
    shutil.copy(BUNDLED / ULTRASOUND, model)
    shutil.copy((BUNDLED / ULTRASOUND).with_suffix(".toml"), model.with_suffix(".toml"))
    result = calibrate.calibrate(
        model, calibrate.phantom_frames(24, 16), engines=("tensorrt",), device="cuda", rounds=1
    )
    got = {m.precision: m for m in result.measured if m.engine == "tensorrt"}
    assert "int8" in got and got["int8"].file.endswith("tensorrt.onnx"), got
    assert got["int8"].drop <= 0.02 and min(got["int8"].agreement.values()) > 0.9, got["int8"]
    eng = TensorRtEngine()
    eng.load(model.parent / got["int8"].file, "cuda", cache_dir=cache, precision="fp32")
    assert eng.device.endswith(" fp32 + int8")
    with Segmenter(eng, load_card(model), model) as seg:
        assert seg.segment(np.zeros((256, 256), np.uint8)).shape == (256, 256)


OPENCL_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from daemon.engines import opencl, preprocess
    from daemon.engines.base import TensorSpec
    from daemon.engines.card import ModelCard

    device, reason = opencl.probe(gpu_only=True)
    if device is None:
        print(json.dumps({"device": None, "reason": reason}))
        sys.exit(0)
    run = opencl.OpenClPrepare(device)
    norm = {"scale": 1 / 200, "clip": [20, 220], "mean": [0.4], "std": [0.2]}
    card = ModelCard.model_validate({"input": {"normalisation": norm}})
    rng = np.random.default_rng(5)
    worst = 0.0
    cases = [((616, 820), np.uint8), ((480, 640, 3), np.uint8), ((300, 200), np.float32)]
    for shape, dtype in cases:
        img = rng.integers(0, 256, shape).astype(dtype)
        for layout, c in [("NCHW", 1), ("NHWC", 3)]:
            dims = (1, c, 256, 256) if layout == "NCHW" else (1, 256, 256, c)
            spec = TensorSpec("x", dims, np.dtype(np.float32), layout)
            d = np.abs(run(img, spec, card) - preprocess.prepare(img, spec, card)).max()
            worst = max(worst, float(d) / (1 / 200 / 0.2))  # in input levels
    print(json.dumps({"device": run.description, "worst_levels": worst}))
    """
)


def test_opencl_on_the_nvidia_gpu(tmp_path: Path) -> None:
    need("pyopencl")
    try:
        ctypes.CDLL(NVIDIA_ICD)
    except OSError as exc:
        pytest.skip(f"no NVIDIA OpenCL library here: {exc}")
    env = dict(os.environ)
    if not Path("/etc/OpenCL/vendors/nvidia.icd").is_file():
        vendors = tmp_path / "vendors"
        vendors.mkdir()
        (vendors / "nvidia.icd").write_text(NVIDIA_ICD + "\n")
        env["OCL_ICD_VENDORS"] = str(vendors)
    # its own process: the ICD loader reads the vendor list once per process
    done = subprocess.run(
        [sys.executable, "-c", OPENCL_CHECK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] is not None, result["reason"]
    assert "NVIDIA" in result["device"]
    assert result["worst_levels"] <= 1.5, result  # 1.5: RGB frames into 1 channel
