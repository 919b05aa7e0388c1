"""Offline jobs on a Dask cluster (``offline.executor = "dask://..."``): a real
``distributed.LocalCluster`` of worker processes on 127.0.0.1 runs the units; outputs
are compared byte for byte with the local executor's (a DICOM SEG by its pixels: its
UIDs are new each time)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main as cli_main
from daemon.offline.ct import CtJob, CtOptions
from daemon.offline.echo_volume import EchoVolume, EchoVolumeOptions
from daemon.offline.kind import Cancelled, KindOptions, UnitKind
from daemon.offline.kind import FolderContext as Ctx
from tests.conftest import Echod
from tests.test_jobs import Appliance, tiny_model, volume

distributed = pytest.importorskip("distributed")
from daemon.offline.dask_executor import DaskExecutor  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def context(root: Path, input: Path, options: KindOptions, model: Path | None = None) -> Ctx:
    return Ctx.under(root, input, options, model=model, threads=1)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(_content(p)).hexdigest() for p in sorted(folder.iterdir())}


def _content(path: Path) -> bytes:
    if path.suffix != ".dcm":
        return path.read_bytes()
    import pydicom

    ds = pydicom.dcmread(path)
    return bytes(ds.PixelData) + repr(ds.PerFrameFunctionalGroupsSequence).encode()


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Any]:
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as c:
        yield c


@pytest.fixture
def executor(local_cluster: Any) -> Iterator[DaskExecutor]:
    ex = DaskExecutor("dask://" + local_cluster.scheduler_address.removeprefix("tcp://"))
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ct")
    return volume(root / "vol.nii.gz", slices=40), tiny_model(root / "tiny3d.onnx")


def run_both(kind: UnitKind, executor: DaskExecutor, root: Path, *args: Any) -> tuple[Ctx, Ctx]:
    local = context(root / "local", *args)
    local.manifest = kind.run(local)
    dask = context(root / "dask", *args)
    dask.manifest = executor.run(kind, dask)
    return local, dask


def test_echo_volume_on_dask_gives_the_local_output(
    executor: DaskExecutor, ct: tuple[Path, Path], tmp_path: Path
) -> None:
    vol, model = ct
    local, dask = run_both(EchoVolume(), executor, tmp_path, vol, EchoVolumeOptions(slab=4), model)
    assert dask.marked == local.marked and len(dask.marked) == 10
    assert digest(dask.output) == digest(local.output)
    assert digest(dask.work) == digest(local.work)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small chest phantom as a DICOM series (40 slices of 64 x 64)."""
    from daemon.phantoms.ct import ct_phantom, write_dicom_series

    folder = tmp_path_factory.mktemp("series") / "CT"
    write_dicom_series(ct_phantom((40, 64, 64), seed=1_000_401, nodules=(1, 2)), folder)
    return folder


def ct_options(**more: Any) -> CtOptions:
    """Patches of 8 x 64 x 64 made into the tiny model's 8 x 32 x 32, half overlapping:
    9 units, each blended with its neighbours."""
    return CtOptions(**{"patch": (8, 64, 64), "overlap": 0.5, **more})


def test_ct_on_dask_gives_the_local_output(
    executor: DaskExecutor, ct: tuple[Path, Path], ct_series: Path, tmp_path: Path
) -> None:
    _, model = ct
    local, dask = run_both(CtJob(), executor, tmp_path, ct_series, ct_options(), model)
    assert "cluster" in dask.phases and "cluster" not in local.phases  # the units ran there
    assert dask.marked == local.marked and len(dask.marked) == 9
    assert sorted(p.name for p in dask.output.iterdir()) == [
        "labels.nii.gz",
        "preview.png",
        "seg.dcm",
    ]
    assert digest(dask.output) == digest(local.output)
    assert digest(dask.work) == digest(local.work)
    assert dask.manifest["volume_ml"] == local.manifest["volume_ml"]
    assert dask.manifest["volume_ml"]["nodule"] > 0


def test_a_ct_job_started_here_is_finished_on_dask(
    executor: DaskExecutor, ct: tuple[Path, Path], ct_series: Path, tmp_path: Path
) -> None:
    """The two executors share units and checkpoint files: a job interrupted on the
    local executor resumes on the cluster, which runs only the units left."""
    _, model = ct
    reference = context(tmp_path / "reference", ct_series, ct_options(), model)
    CtJob().run(reference)
    ctx = context(tmp_path / "job", ct_series, ct_options(), model)

    def stop_after_three(c: Ctx, done: int, total: int, what: str) -> None:
        if done >= 3:
            raise Cancelled("the appliance went down")

    ctx.on_progress = stop_after_three
    with pytest.raises(Cancelled):
        CtJob().run(ctx)
    first = {p.name: p.stat().st_mtime_ns for p in ctx.work.iterdir()}
    assert len(first) == 3 and not list(ctx.output.iterdir())
    ctx.on_progress, ctx.phases = None, []
    executor.run(CtJob(), ctx)
    assert "cluster" in ctx.phases
    assert {n: (ctx.work / n).stat().st_mtime_ns for n in first} == first
    assert ctx.marked == reference.marked
    assert digest(ctx.output) == digest(reference.output)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from daemon.phantoms.wsi import write_slide

    path = tmp_path_factory.mktemp("slide") / "phantom.tiff"
    write_slide(path, 3072, 2560, seed=21, smallest=256)
    return path


def test_wsi_on_dask_gives_the_local_output(
    executor: DaskExecutor, phantom: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openslide")
    from daemon.offline.wsi import WsiJob, WsiOptions

    local, dask = run_both(WsiJob(), executor, tmp_path, phantom, WsiOptions(batch=4))
    assert len(dask.marked) > 3 and dask.marked == local.marked
    assert digest(dask.output) == digest(local.output)
    assert digest(dask.work) == digest(local.work)


def _tasks(executor: DaskExecutor) -> int:
    """echod's tasks the scheduler still holds."""
    return int(
        executor._client().run_on_scheduler(
            lambda dask_scheduler: sum(str(k).startswith("echod-") for k in dask_scheduler.tasks)
        )
    )


def released(executor: DaskExecutor) -> None:
    """Wait until the scheduler holds none of echod's tasks (releasing is asynchronous)."""
    wait_until(lambda: not _tasks(executor), "the scheduler let the job's tasks go")


def job(name: str, request: pytest.FixtureRequest) -> tuple[UnitKind, tuple[Any, ...]]:
    """A kind and its (input, options, model): units of one slice (echo-volume, 40) or one
    patch (ct, 9)."""
    vol, model = request.getfixturevalue("ct")
    if name == "echo-volume":
        return EchoVolume(), (vol, EchoVolumeOptions(slab=1), model)
    return CtJob(), (request.getfixturevalue("ct_series"), ct_options(), model)


@pytest.mark.parametrize("name", ["echo-volume", "ct"])
def test_a_dask_worker_killed_mid_job_gives_the_same_output(
    local_cluster: Any,
    executor: DaskExecutor,
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    kind, args = job(name, request)
    reference = context(tmp_path / "local", *args)
    kind.run(reference)
    ctx = context(tmp_path / "dask", *args)
    killed: list[int] = []

    def kill_one(c: Ctx, done: int, total: int, what: str) -> None:
        if done and not killed:  # units came back, more are on the workers
            assert done < total
            nanny = next(iter(local_cluster.workers.values()))
            killed.append(nanny.process.pid)
            os.kill(nanny.process.pid, signal.SIGKILL)

    ctx.on_progress = kill_one
    executor.run(kind, ctx)
    assert killed and "cluster" in ctx.phases and ctx.marked == reference.marked
    assert digest(ctx.output) == digest(reference.output)
    released(executor)
    local_cluster.wait_for_workers(2, timeout=60)  # the nanny restarted it


def _hold(event: str) -> None:
    """A task of some other work on the cluster: runs until ``event`` is set."""
    distributed.Event(event).wait()


@pytest.mark.parametrize("name", ["echo-volume", "ct"])
def test_cancel_cancels_the_jobs_tasks_on_the_cluster(
    local_cluster: Any,
    executor: DaskExecutor,
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """The cluster is busy with other work (a long task on each worker), so the job's
    units wait on the scheduler; the job is cancelled (``Cancelled`` out of
    ``ctx.progress``). The scheduler drops its tasks at once, although the exception,
    whose traceback holds the job's futures, is still alive (as while the job worker
    handles it), and when the cluster frees up none of its units runs. Without the
    executor's cancel and release the futures live on with the exception and every
    unit runs: this fails (checked). The cluster being busy makes sure the units are
    still waiting when the cancel comes (units of a few ms otherwise mostly run first)."""
    kind, args = job(name, request)
    ctx = context(tmp_path, *args)
    client = executor._client()
    free = f"free-{name}"
    others = [client.submit(_hold, free, pure=False) for _ in local_cluster.workers]
    wait_until(
        lambda: sum(map(len, client.processing().values())) >= len(others), "the workers got busy"
    )
    seen: list[int] = []

    def cancel_once_submitted(c: Ctx, done: int, total: int, what: str) -> None:
        seen.append(_tasks(executor))
        if len(seen) == 2:  # the first call is before the units are submitted
            raise Cancelled("cancelled by the test")

    ctx.on_progress = cancel_once_submitted
    with distributed.get_task_stream(client) as stream:
        try:
            with pytest.raises(Cancelled) as cancelled:
                executor.run(kind, ctx)
            released(executor)
        finally:
            distributed.Event(free, client=client).set()
            distributed.wait(others)
    ran = [t["key"] for t in stream.data if str(t["key"]).startswith("echod-")]
    assert seen[1] == len(kind.plan(context(tmp_path / "plan", *args)).units)
    assert not ran and not ctx.marked and not list(ctx.output.iterdir())
    del cancelled  # kept alive until here, with the job's futures in its traceback


def wait_until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_echod_workers_shows_the_cluster_and_the_models_loaded(
    local_cluster: Any,
    executor: DaskExecutor,
    ct: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vol, model = ct
    executor.run(EchoVolume(), context(tmp_path, vol, EchoVolumeOptions(slab=2), model))
    address = "dask://" + local_cluster.scheduler_address.removeprefix("tcp://")
    capsys.readouterr()
    assert cli_main(["workers", "--executor", address, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scheduler"] == local_cluster.scheduler_address
    assert len(info["workers"]) == 2 and all(w["threads"] == 1 for w in info["workers"])
    loaded = [m for w in info["workers"] for m in w["models"]]
    assert loaded and {(m["model"], m["device"]) for m in loaded} == {("tiny3d.onnx", "cpu")}
    assert cli_main(["workers", "--executor", address]) == 0
    assert "2 worker(s)" in capsys.readouterr().out


def test_warm_loads_the_model_on_every_worker(
    executor: DaskExecutor, ct: tuple[Path, Path], tmp_path: Path
) -> None:
    vol, model = ct
    plan = EchoVolume().plan(context(tmp_path, vol, EchoVolumeOptions(), model))
    assert executor.warm(plan.model) == 2
    spec = executor.spec(plan.model)
    loaded = executor._client().run(
        lambda dask_worker: spec in dask_worker.plugins["echod-models"].models
    )
    assert list(loaded.values()) == [True, True]


def test_a_daemon_with_a_dask_executor_runs_jobs_through_the_socket(
    local_cluster: Any, run_echod: type[Echod], ct: tuple[Path, Path], tmp_path: Path
) -> None:
    vol, _ = ct
    address = "dask://" + local_cluster.scheduler_address.removeprefix("tcp://")
    app = Appliance(run_echod, tmp_path, "--set", f"offline.executor={address}")
    try:
        shutil.copy(vol, app.data / "vol.nii.gz")
        manifest = app.wait_done(app.submit(app.data / "vol.nii.gz"))
        assert manifest["slabs"] == 20 and "cluster" in manifest["timings_s"]
        reference = context(tmp_path / "local", vol, EchoVolumeOptions(slab=2), app.model)
        EchoVolume().run(reference)
        out = Path(manifest["output"]) / "labels.nii.gz"
        assert out.read_bytes() == (reference.output / "labels.nii.gz").read_bytes()
    finally:
        app.stop()
