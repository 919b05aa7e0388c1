"""Offline jobs on a Dask cluster (``offline.executor = "dask://..."``): a real
``distributed.LocalCluster`` of worker processes on 127.0.0.1 runs the units; outputs
are compared byte for byte with the local executor's."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.offline.echo_volume import EchoVolume, EchoVolumeOptions
from daemon.offline.kind import Cancelled, KindOptions, UnitKind
from tests.test_jobs import tiny_model, volume

distributed = pytest.importorskip("distributed")
from daemon.offline.dask_executor import DaskExecutor, cluster  # noqa: E402

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
