"""Offline jobs on a Dask cluster (``offline.executor = "dask://..."``): a real
``distributed.LocalCluster`` of worker processes on 127.0.0.1 runs the units; outputs
are compared byte for byte with the local executor's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main as cli_main
from daemon.offline.echo_volume import EchoVolume, EchoVolumeOptions
from daemon.offline.kind import Cancelled, KindOptions, UnitKind
from tests.conftest import Echod
from tests.test_jobs import Appliance, tiny_model, volume

distributed = pytest.importorskip("distributed")
from daemon.offline.dask_executor import DaskExecutor  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@dataclass
class Ctx:
    """A JobContext of real folders: units in a set; ``on_progress`` sees each call."""

    input: Path
    output: Path
    work: Path
    options: KindOptions
    model: Path | None = None
    engine: str | None = None
    device: str = "cpu"
    threads: int = 1
    marked: set[str] = field(default_factory=set)
    on_progress: Any = None

    def done(self, unit: str) -> bool:
        return unit in self.marked

    def mark(self, unit: str) -> None:
        self.marked.add(unit)

    def progress(self, done: int, total: int, what: str) -> None:
        if self.on_progress is not None:
            self.on_progress(self, done, total)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


def context(root: Path, input: Path, options: KindOptions, model: Path | None = None) -> Ctx:
    (root / "out").mkdir(parents=True)
    (root / "work").mkdir()
    return Ctx(input, root / "out", root / "work", options, model)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


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
    kind.run(local)
    dask = context(root / "dask", *args)
    executor.run(kind, dask)
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


def released(executor: DaskExecutor, timeout: float = 30) -> None:
    """Wait until the scheduler holds none of echod's tasks (releasing is asynchronous)."""
    deadline = time.monotonic() + timeout
    while _tasks(executor):
        assert time.monotonic() < deadline, "the job's tasks stayed on the scheduler"
        time.sleep(0.05)


def test_a_dask_worker_killed_mid_job_gives_the_same_output(
    local_cluster: Any, executor: DaskExecutor, ct: tuple[Path, Path], tmp_path: Path
) -> None:
    vol, model = ct
    reference = context(tmp_path / "local", vol, EchoVolumeOptions(slab=1), model)
    EchoVolume().run(reference)
    ctx = context(tmp_path / "dask", vol, EchoVolumeOptions(slab=1), model)
    killed: list[int] = []

    def kill_one(c: Ctx, done: int, total: int) -> None:
        if done and not killed:  # units came back: both workers have loaded the model
            nanny = next(iter(local_cluster.workers.values()))
            killed.append(nanny.process.pid)
            os.kill(nanny.process.pid, signal.SIGKILL)

    ctx.on_progress = kill_one
    executor.run(EchoVolume(), ctx)
    assert killed and ctx.marked == reference.marked
    assert digest(ctx.output) == digest(reference.output)
    released(executor)
    local_cluster.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_cancel_releases_the_jobs_futures(
    executor: DaskExecutor, ct: tuple[Path, Path], tmp_path: Path
) -> None:
    vol, model = ct
    ctx = context(tmp_path, vol, EchoVolumeOptions(slab=1), model)
    seen: list[int] = []

    def cancel_after_some(c: Ctx, done: int, total: int) -> None:
        seen.append(_tasks(executor))
        if done >= 3:
            raise Cancelled("cancelled by the test")

    ctx.on_progress = cancel_after_some
    with pytest.raises(Cancelled):
        executor.run(EchoVolume(), ctx)
    assert max(seen) > 0 and 3 <= len(ctx.marked) < 40
    released(executor)
    assert not list(ctx.output.iterdir())


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
