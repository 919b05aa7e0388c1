"""The offline job system end to end: a real daemon (``--source none`` or live), its
ZeroMQ control socket, worker processes, the SQLite store, SIGKILLs.

Jobs are ``echo-volume`` over NIfTI volumes written here, with a tiny 3-D model so that
a job is many short units (a kill lands in the middle of one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zmq
from onnx import TensorProto, helper

from daemon.cli import main as cli_main
from daemon.ctl import Client, CtlError
from daemon.errors import ConfigError
from daemon.offline.store import JobStore
from tests.conftest import DATA, Echod, need_data

pytestmark = pytest.mark.timeout(300)


def volume(path: Path, slices: int = 120, side: int = 32, seed: int = 0) -> Path:
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 400, (slices, side, side)).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.7, 1.25))
    image.SetOrigin((-20.0, 10.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


def tiny_model(path: Path) -> Path:
    """A 3-D two-class model on 8 x 32 x 32 slabs: foreground where the normalised input
    is over 0.5 (above -400 HU)."""
    x = helper.make_tensor_value_info("volume", TensorProto.FLOAT, [1, 1, 8, 32, 32])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 2, 8, 32, 32])
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["volume", "half"], ["fg"]),
            helper.make_node("Neg", ["fg"], ["bg"]),
            helper.make_node("Concat", ["bg", "fg"], ["logits"], axis=1),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny3d",
        [x],
        [y],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    path.with_suffix(".toml").write_text(
        'task = "segmentation"\n[input]\nlayout = "NCDHW"\n[input.normalisation]\n'
        "clip = [-1200.0, 400.0]\nscale = 0.000625\nmean = [-0.75]\n"
        '[[classes]]\nname = "background"\ncolour = [0, 0, 0]\n'
        '[[classes]]\nname = "nodule"\ncolour = [255, 200, 0]\n'
    )
    return path


class Appliance:
    """A daemon taking jobs, its folders, and a client."""

    def __init__(
        self, run_echod: type[Echod], root: Path, *extra: str, roots: tuple[Path, ...] = ()
    ) -> None:
        self.root = root
        self.roots = roots
        self.data = root / "data"
        self.data.mkdir(exist_ok=True)
        self.runtime = Path(tempfile.mkdtemp(prefix="ej-"))  # ipc paths must be short
        self.state = root / "state"
        self.run_echod = run_echod
        self.extra = extra
        self.model = tiny_model(self.data / "tiny3d.onnx")
        self.start()

    def start(self) -> None:
        self.echod = self.run_echod(
            "run",
            "--source",
            "none",
            "--set",
            f"paths.runtime_dir={self.runtime}",
            "--set",
            f"paths.state_dir={self.state}",
            "--set",
            f"control.roots={','.join(map(str, (self.data, *self.roots)))}",
            "--set",
            "offline.threads=1",
            *self.extra,
        )
        self.echod.wait_for("control on", 60)
        self.client = Client(f"ipc://{self.runtime}/control.sock", timeout_s=60)
        wait(lambda: self.client.call("status")["stages"]["jobs-0"]["state"] == "running", 60)

    def submit(self, vol: Path, **extra: Any) -> str:
        request = {
            "kind": "echo-volume",
            "input": str(vol),
            "model": str(self.model),
            "options": {"slab": 2},
            **extra,
        }
        return str(self.client.call("jobs.submit", request)["job"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.call("jobs.get", {"job": job_id}))

    def wait_done(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        job = wait(lambda: (j := self.job(job_id))["state"] in ("done", "failed") and j, timeout)
        assert job["state"] == "done", job
        return dict(self.client.call("jobs.result", {"job": job_id}))

    def worker_pid(self) -> int:
        return int(self.client.call("status")["stages"]["jobs-0"]["pid"])

    def kill(self) -> None:
        self.client.close()
        self.echod.proc.kill()
        self.echod.proc.wait(10)
        wait(lambda: not self.echod.leftovers(), 10)

    def stop(self) -> None:
        self.client.close()
        if self.echod.proc.poll() is None:
            self.echod.proc.send_signal(signal.SIGTERM)
            assert self.echod.finish(60)[0] == 0, "".join(self.echod.stderr)
        shutil.rmtree(self.runtime, ignore_errors=True)


def wait(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


def labels_digest(manifest: dict[str, Any]) -> str:
    """Voxels and geometry of a job's label volume."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(Path(manifest["output"]) / manifest["outputs"]["labels"]))
    h = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes())
    h.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    return h.hexdigest()


@pytest.fixture
def appliance(run_echod: type[Echod], tmp_path: Path) -> Iterator[Appliance]:
    a = Appliance(run_echod, tmp_path)
    yield a
    a.stop()


# -- the store on its own ----------------------------------------------------------------


def test_store_commits_claims_once_and_keeps_idempotency_keys(tmp_path: Path) -> None:
    a, b = JobStore(tmp_path / "jobs.db"), JobStore(tmp_path / "jobs.db")
    args = dict(
        kind="k",
        input="/i",
        output_root="/o",
        options={},
        model=None,
        engine=None,
        device="cpu",
        client="local",
    )
    first, new = a.submit(**args, key="same")
    again, new_again = b.submit(**args, key="same")
    assert new and not new_again and again.id == first.id
    assert first.output == f"/o/k-{first.id}"
    claimed = [a.claim("w0"), b.claim("w1")]
    assert claimed[0] is not None and claimed[0].id == first.id and claimed[1] is None
    assert b.requeue_running() == [first.id] and a.get(first.id).state == "queued"  # type: ignore[union-attr]
    a.mark(first.id, "u1")
    assert b.units(first.id) == {"u1"}
    with pytest.raises(ConfigError, match="queue is full"):
        a.submit(**args, max_queued=1)


def test_a_corrupt_or_unwritable_store_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "jobs.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match=r"jobs.db cannot be used .*nothing was changed"):
        JobStore(bad)
    assert bad.read_bytes().startswith(b"this is not a database"), "left as it was"
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ConfigError, match=r"ro/jobs\.db"):
            JobStore(locked / "jobs.db")


# -- through the control socket ------------------------------------------------------------


def test_submit_progress_done_and_result_over_the_socket(appliance: Appliance) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"job")
    sub.connect(appliance.client.call("ping")["telemetry"])
    time.sleep(0.3)  # a SUB socket misses what is published before it is connected
    vol = volume(appliance.data / "v.nii.gz")
    job_id = appliance.submit(vol)
    manifest = appliance.wait_done(job_id)
    events = []
    while sub.poll(200):
        _, body = sub.recv_multipart()
        data = json.loads(body)["result"]
        if data.get("job") == job_id:
            events.append(data["state"])
    sub.close(0)
    assert events[0] == "queued" and events[1] == "started" and events[-1] == "done", events
    assert "progress" in events
    assert manifest["slabs"] == 60 and manifest["kind"] == "echo-volume"
    out = Path(manifest["output"])
    assert out.name == f"echo-volume-{job_id}" and (out / "labels.nii.gz").is_file()
    assert not list(out.parent.glob(".*.partial")), "no partial output left"
    import SimpleITK as sitk

    labels, source = sitk.ReadImage(str(out / "labels.nii.gz")), sitk.ReadImage(str(vol))
    assert labels.GetSize() == source.GetSize() and labels.GetOrigin() == source.GetOrigin()
    hu = sitk.GetArrayFromImage(source)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), hu > -400)
    job = appliance.job(job_id)
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["client"] == "local"


def test_echod_submit_wait_and_jobs_commands(
    appliance: Appliance, capsys: pytest.CaptureFixture[str]
) -> None:
    vol = volume(appliance.data / "v.nii.gz", slices=40)
    endpoint = ["--endpoint", f"ipc://{appliance.runtime}/control.sock"]
    code = cli_main(
        [
            "submit",
            "echo-volume",
            str(vol),
            "--model",
            str(appliance.model),
            "--slab",
            "4",
            "--wait",
            *endpoint,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and " done: " in out, out
    job_id = out.split("job ")[1].split()[0]
    assert cli_main(["jobs", "list", *endpoint]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "done" in listing and "10/10 slabs" in listing
    assert cli_main(["jobs", "result", job_id, "--json", *endpoint]) == 0
    assert json.loads(capsys.readouterr().out)["slabs"] == 10
    assert cli_main(["submit", "echo-volume", str(vol), "--slab", "0", *endpoint]) == 64
    assert "slab" in capsys.readouterr().err


def test_sigkill_of_the_worker_mid_job_gives_the_same_output(appliance: Appliance) -> None:
    vol = volume(appliance.data / "v.nii.gz", slices=200)
    reference = labels_digest(appliance.wait_done(appliance.submit(vol)))
    job_id = appliance.submit(vol)
    wait(lambda: appliance.job(job_id)["done"] >= 5, 60)
    os.kill(appliance.worker_pid(), signal.SIGKILL)
    manifest = appliance.wait_done(job_id)
    job = appliance.job(job_id)
    assert job["attempts"] == 2, job
    assert labels_digest(manifest) == reference


def test_sigkill_of_the_daemon_mid_job_then_restart_finishes_it(appliance: Appliance) -> None:
    vol = volume(appliance.data / "v.nii.gz", slices=200)
    reference = labels_digest(appliance.wait_done(appliance.submit(vol)))
    job_id = appliance.submit(vol)
    queued = appliance.submit(vol)  # waits behind it: must not be lost either
    wait(lambda: 5 <= appliance.job(job_id)["done"] < 100, 60)
    appliance.kill()
    appliance.start()
    for j in (job_id, queued):
        assert labels_digest(appliance.wait_done(j)) == reference


@pytest.mark.slow
def test_twenty_daemon_kills_in_a_row_lose_no_job(appliance: Appliance) -> None:
    vol = volume(appliance.data / "v.nii.gz", slices=200)
    reference = labels_digest(appliance.wait_done(appliance.submit(vol)))
    jobs = [appliance.submit(vol) for _ in range(3)]
    for _ in range(20):
        time.sleep(0.5 + np.random.default_rng().random())  # anywhere in a unit of work
        appliance.kill()
        appliance.start()
    for j in jobs:
        assert labels_digest(appliance.wait_done(j, timeout=300)) == reference
    assert len({appliance.job(j)["output"] for j in jobs}) == 3


def test_cancel_is_quick_and_a_cancelled_queued_job_never_starts(appliance: Appliance) -> None:
    vol = volume(appliance.data / "v.nii.gz", slices=400)
    running = appliance.submit(vol)
    queued = appliance.submit(vol)
    wait(lambda: appliance.job(running)["done"] >= 3, 60)
    t0 = time.monotonic()
    assert appliance.client.call("jobs.cancel", {"job": queued})["was"] == "queued"
    assert appliance.client.call("jobs.cancel", {"job": running})["was"] == "running"
    took = time.monotonic() - t0
    assert appliance.job(running)["state"] == "cancelled"
    print(f"two cancels answered in {took * 1e3:.0f} ms")
    wait(lambda: not list(appliance.state.glob("results/.*.partial")), 10)
    wait(lambda: not (appliance.state / "jobs" / running).exists(), 10)  # checkpoints gone
    # the worker is back and takes the next job; the cancelled queued one never started
    after = appliance.submit(volume(appliance.data / "w.nii.gz", slices=8))
    appliance.wait_done(after)
    assert appliance.job(queued)["started"] is None and appliance.job(queued)["attempts"] == 0
    assert appliance.job(running)["state"] == "cancelled"


def test_bad_submissions_are_refused_and_the_daemon_serves_on(appliance: Appliance) -> None:
    vol = volume(appliance.data / "v.nii.gz", slices=8)
    outside = Path(tempfile.mkdtemp()) / "v.nii.gz"
    shutil.copy(vol, outside)
    not_a_volume = appliance.data / "notes.txt"
    not_a_volume.write_text("hello")
    flat = appliance.data / "flat.png"
    import cv2

    cv2.imwrite(str(flat), np.zeros((8, 8), np.uint8))
    cases = [
        ({"kind": "echo-volum"}, "config", "did you mean 'echo-volume'"),
        ({"input": str(appliance.data / "nope.nii.gz")}, "config", "no such file"),
        ({"input": str(outside)}, "config", "outside the allowed folders"),
        ({"options": {"slab": "many"}}, "bad_args", "echo-volume option slab"),
        ({"options": {"slabs": 2}}, "bad_args", "slabs"),
        ({"input": str(not_a_volume)}, "bad_input", "not a volume"),
        ({"input": str(flat)}, "bad_input", "3-D scalar volume"),
    ]
    for change, code, words in cases:
        request = {"kind": "echo-volume", "input": str(vol), **change}
        with pytest.raises(CtlError) as e:
            appliance.client.call("jobs.submit", request)
        assert e.value.code == code and words in e.value.message, (change, e.value.message)
    with pytest.raises(CtlError) as e:
        appliance.client.call("jobs.get", {"job": "nosuchjob"})
    assert e.value.code == "not_found"
    assert appliance.client.call("jobs.list", {}) == []
    assert appliance.client.call("ping")["pong"]


def test_a_corrupt_store_stops_the_daemon_at_start_with_one_line(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "jobs.db").write_bytes(b"garbage" * 1000)
    e = run_echod("run", "--source", "none", "--set", f"paths.state_dir={tmp_path}")
    code, _ = e.finish(60)
    assert code == 78 and "jobs.db cannot be used" in e.stderr[-1], e.stderr
    assert sqlite3.connect(tmp_path / "jobs" / "jobs.db") is not None


def test_no_source_and_no_workers_is_refused(run_echod: type[Echod]) -> None:
    e = run_echod("run", "--source", "none", "--set", "offline.workers=0")
    code, _ = e.finish(30)
    assert code == 78 and "nothing to run" in e.stderr[-1], e.stderr


def test_a_real_slide_is_classified_through_the_socket(
    run_echod: type[Echod], tmp_path: Path
) -> None:
    slide = need_data(DATA / "wsi" / "CMU-1-Small-Region.svs")
    a = Appliance(run_echod, tmp_path, roots=(slide.parent,))
    try:
        job_id = a.client.call("jobs.submit", {"kind": "wsi", "input": str(slide)})["job"]
        manifest = a.wait_done(job_id)
    finally:
        a.stop()
    out = Path(manifest["output"])
    assert manifest["result"] == "classified" and manifest["patches"]["tissue"] > 0
    for name in manifest["outputs"].values():
        assert (out / name).is_file(), name
    features = json.loads((out / manifest["outputs"]["geojson"]).read_text())["features"]
    assert len(features) == manifest["patches"]["tissue"]


def test_real_ct_slices_segmented_through_the_socket_and_shown_with_their_files(
    run_echod: type[Echod], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = need_data(DATA / "ct" / "ct-3slice")
    a = Appliance(run_echod, tmp_path, roots=(series.parent,))
    try:
        request = {"kind": "ct", "input": str(series), "options": {"overlap": 0.25}}
        job_id = a.client.call("jobs.submit", request)["job"]
        manifest = a.wait_done(job_id, timeout=240)
        endpoint = ["--endpoint", f"ipc://{a.runtime}/control.sock"]
        assert cli_main(["jobs", "show", job_id, *endpoint]) == 0
        shown = capsys.readouterr().out
    finally:
        a.stop()
    out = Path(manifest["output"])
    for name in manifest["outputs"].values():
        assert (out / name).is_file(), name
    assert "preview" in manifest["outputs"] and str(out / manifest["outputs"]["preview"]) in shown
