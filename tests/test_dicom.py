"""The DICOM node against real peers: dcmtk's ``echoscu``, ``storescu`` and ``storescp``
(Debian's ``dcmtk``), and pynetdicom, on 127.0.0.1 only.

The node in a real daemon takes a series from ``storescu`` and runs its job; in process
(:class:`DicomNode` with a real job store) its results go out to ``storescp``, retried
while it is down, and a dead destination holds up nobody else; the store keeps to its
quota and loses nothing across a restart; allow-lists and TLS refuse whom they should.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from daemon import config
from daemon.cli import main as cli_main
from daemon.ctl import Client
from daemon.dicom.node import DicomNode, _matches
from daemon.dicom.scp import OUT_OF_RESOURCES, Scp
from daemon.dicom.send import store_files
from daemon.dicom.settings import DicomDestination, DicomRoute
from daemon.dicom.store import DONE, Instance, StorageFull
from daemon.offline.kinds import KINDS
from daemon.offline.service import JobService
from daemon.phantoms.ct import ct_phantom, write_dicom_series
from tests.conftest import Echod
from tests.test_jobs import tiny_model

pytestmark = pytest.mark.timeout(180)

DCMTK = all(shutil.which(p) for p in ("storescu", "storescp", "echoscu"))
need_dcmtk = pytest.mark.skipif(
    not DCMTK, reason="dcmtk (storescu, storescp, echoscu) is missing: apt-get install dcmtk"
)


def wait(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def series(folder: Path, slices: int = 12, seed: int = 1) -> list[Path]:
    """A CT phantom as a DICOM series, one file a slice."""
    return write_dicom_series(ct_phantom((slices, 64, 64), seed=seed, nodules=(1, 1)), folder)


def c_store(port: int, files: list[Path], calling: str = "TESTSCU") -> list[int]:
    """pynetdicom as the sender: the status of each C-STORE."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHOD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


class Storescp:
    """dcmtk's storescp, the destination, writing what it gets into ``folder``."""

    def __init__(self, port: int, folder: Path, ae_title: str = "PACS") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.proc = subprocess.Popen(
            ["storescp", "-aet", ae_title, "-od", str(folder), "+xa", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)

        def answers() -> bool:
            assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
            up = bool(assoc.is_established)
            if up:
                assoc.release()
            return up

        wait(answers, 20)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def storescps() -> Iterator[list[Storescp]]:
    started: list[Storescp] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def settings(state: Path, **dicom: Any) -> config.Config:
    overrides = {"paths.state_dir": str(state), "dicom.enabled": True, "dicom.port": 0}
    return config.load(None, {**overrides, **{f"dicom.{k}": v for k, v in dicom.items()}})


# -- routing -----------------------------------------------------------------------------


def test_a_route_matches_when_every_pattern_it_sets_matches_case_blind() -> None:
    receipt = {
        "modality": "CT",
        "body_part": "CHEST",
        "description": "Thorax 1.0 B30f lung",
        "calling_ae": "CT01",
    }
    assert _matches(DicomRoute(kind="ct"), receipt)
    assert _matches(DicomRoute(kind="ct", modality="ct", series_description="*LUNG*"), receipt)
    assert _matches(DicomRoute(kind="ct", calling_ae="CT0?", body_part="chest"), receipt)
    assert not _matches(DicomRoute(kind="ct", modality="MR"), receipt)
    assert not _matches(DicomRoute(kind="ct", modality="CT", calling_ae="CT02"), receipt)


def test_routes_and_destinations_are_checked_when_the_configuration_loads(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"send names no destination nowhere"):
        settings(tmp_path, routes=[{"kind": "ct", "send": ["nowhere"]}])
    with pytest.raises(config.ConfigError, match="1 to 16 characters"):
        settings(tmp_path, ae_title="A-TITLE-FAR-TOO-LONG")
    cfg = settings(tmp_path, routes=[{"kind": "ctt"}])
    with pytest.raises(config.ConfigError, match=r"routes\[0\]: unknown job kind 'ctt'"):
        DicomNode(cfg, JobService(cfg), lambda *_: None)


# -- in process: store, SCP, sends -------------------------------------------------------


def test_storage_keeps_to_its_quota_removing_the_oldest_finished_study(tmp_path: Path) -> None:
    from daemon.dicom.store import DicomStore

    store = DicomStore(tmp_path, max_bytes=3000)

    def inst(study: str, n: int) -> Instance:
        return Instance(f"1.{study}.{n}", f"1.{study}.9", f"1.{study}", "CT", "", "")

    a = store.add(inst("1", 1), b"a" * 1000, "X", "127.0.0.1")
    store.settle(a, DONE)
    store.add(inst("2", 1), b"b" * 1500, "X", "127.0.0.1")  # still receiving
    store.add(inst("3", 1), b"c" * 1000, "X", "127.0.0.1")  # study 1 makes room
    assert not (store.incoming / "1.1").exists() and store.used() == 2500
    with pytest.raises(StorageFull, match="series not finished yet"):
        store.add(inst("2", 2), b"b" * 1500, "X", "127.0.0.1")  # nothing finished to remove
    assert (store.incoming / "1.2").exists() and (store.incoming / "1.3").exists()
    assert store.used() == 2500


def test_the_scp_refuses_a_stranger_and_answers_out_of_resources_when_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.dicom.store import DicomStore

    files = series(tmp_path / "sent", slices=3)
    store = DicomStore(tmp_path / "state", max_bytes=int(2.5 * files[0].stat().st_size))
    cfg = settings(tmp_path, allowed_aes=["TESTSCU"]).dicom
    scp = Scp(cfg, store.add)
    scp.start()
    try:
        assert c_store(scp.port, files) == [0, 0, OUT_OF_RESOURCES]
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(Verification)
        with caplog.at_level(logging.WARNING, logger="daemon.dicom.scp"):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="ECHOD")
            assert assoc.is_rejected
            wait(lambda: "'STRANGER' is not in dicom.allowed_aes" in caplog.text, 5)
        assert scp.snapshot() == {"accepted": 1, "rejected": 1, "instances": 2}
    finally:
        scp.close()
    hosts = Scp(settings(tmp_path, allowed_hosts=["10.0.0.0/8"]).dicom, store.add)
    hosts.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        with caplog.at_level(logging.WARNING, logger="daemon.dicom.scp"):
            assert not ae.associate("127.0.0.1", hosts.port, ae_title="ECHOD").is_established
            wait(lambda: "127.0.0.1 refused: not in dicom.allowed_hosts" in caplog.text, 5)
    finally:
        hosts.close()


def test_tls_both_ways_with_client_certificates(tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    tls = {"enabled": True, "cert_file": str(cert), "key_file": str(key), "ca_file": str(cert)}
    from daemon.dicom.store import DicomStore

    store = DicomStore(tmp_path / "state", max_bytes=2**30)
    cfg = settings(tmp_path, tls=tls, ae_title="ECHOD").dicom
    scp = Scp(cfg, store.add)
    scp.start()
    try:
        files = series(tmp_path / "sent", slices=2)
        dest = DicomDestination(name="self", ae_title="ECHOD", host="127.0.0.1", port=scp.port)
        established, outcome = store_files(cfg, dest, files)
        assert not established and set(outcome.values()) != {None}  # plain TCP: refused
        tls_dest = dest.model_copy(update={"tls": True})
        assert store_files(cfg, tls_dest, files) == (True, dict.fromkeys(files))
        anonymous = ssl.create_default_context(cafile=str(cert))  # no client certificate
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1", scp.port, ae_title="ECHOD", tls_args=(anonymous, "127.0.0.1")
        )
        assert not assoc.is_established
    finally:
        scp.close()
    assert scp.snapshot()["instances"] == 2


def _finish_like_a_worker(jobs: JobService, job_id: str, received: Path, out: Path) -> None:
    """What a CT job leaves: a DICOM SEG referring to the series, a PNG, a NIfTI file."""
    import cv2
    import highdicom as hd
    from pydicom.sr.codedict import codes

    store = jobs.store()
    assert store.claim("test-worker") is not None
    sources = sorted(
        (dcmread(p) for p in received.glob("*.dcm")), key=lambda d: d.ImagePositionPatient[2]
    )
    for ds in sources:  # type 2 attributes the phantom leaves out and a SEG copies
        for name in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName"):
            setattr(ds, name, ds.get(name, ""))
    mask = np.zeros((len(sources), 64, 64), bool)
    mask[2:5, 20:30, 20:30] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test", version="1", family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    out.mkdir(parents=True)
    seg.save_as(out / "seg.dcm")
    cv2.imwrite(str(out / "preview.png"), np.full((40, 50, 3), (0, 128, 255), np.uint8))
    (out / "labels.nii.gz").write_bytes(b"not sent")
    outputs = {"seg": "seg.dcm", "preview": "preview.png", "labels": "labels.nii.gz"}
    store.finish(job_id, "done", manifest={"output": str(out), "outputs": outputs})


@need_dcmtk
def test_results_reach_storescp_retried_while_it_is_down_and_a_dead_one_blocks_nobody(
    tmp_path: Path, storescps: list[Storescp]
) -> None:
    pacs_port, dead_port = free_port(), free_port()
    cfg = settings(
        tmp_path / "state",
        quiet_s=0.2,
        retry_s=0.2,
        retry_max_s=0.4,
        routes=[{"modality": "CT", "kind": "echo-volume"}],
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
            {"name": "dead", "ae_title": "DEAD", "host": "127.0.0.1", "port": dead_port},
        ],
    )
    jobs = JobService(cfg)
    events: list[dict[str, Any]] = []
    node = DicomNode(cfg, jobs, lambda topic, data: events.append(data))
    node.start()
    try:
        files = series(tmp_path / "sent")
        assert c_store(node.scp.port, files) == [0] * len(files)
        job = wait(lambda: jobs.list("queued", 10))[0]
        assert job["kind"] == "echo-volume" and job["client"] == "dicom:TESTSCU"
        assert len(list(Path(job["input"]).glob("*.dcm"))) == len(files)
        _finish_like_a_worker(jobs, job["id"], Path(job["input"]), tmp_path / "results")

        def tries(dest: str) -> int:
            sends = node.status(job["id"])["sends"]
            return min((s["attempts"] for s in sends if s["destination"] == dest), default=0)

        wait(lambda: tries("pacs") >= 2)  # down: tried, and tried again
        pending = node.status()["sends"]
        assert {s["file"] for s in pending} == {"seg.dcm", "preview.dcm"}
        assert all("cannot connect" in s["error"] for s in pending)
        storescps.append(pacs := Storescp(pacs_port, tmp_path / "pacs"))

        def states(dest: str) -> dict[str, str]:
            sends = node.status(job["id"])["sends"]
            return {s["file"]: s["state"] for s in sends if s["destination"] == dest}

        wait(lambda: states("pacs") == {"seg.dcm": "sent", "preview.dcm": "sent"})
        assert len(pacs.files()) == 2
        assert tries("dead") >= 2 and set(states("dead").values()) == {"pending"}
    finally:
        node.close()
        jobs.close()
    import highdicom as hd

    by_modality = {dcmread(f).Modality: f for f in pacs.files()}
    seg = hd.seg.segread(by_modality["SEG"])
    sent_series = dcmread(files[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sent_series.SeriesInstanceUID
    assert seg.StudyInstanceUID == sent_series.StudyInstanceUID
    sc = dcmread(by_modality["OT"])
    assert sc.StudyInstanceUID == sent_series.StudyInstanceUID and sc.Rows == 40
    assert {e["state"] for e in events if e.get("event") == "send"} >= {"retry", "sent"}


def test_a_series_interrupted_by_a_restart_completes_and_gets_one_job(tmp_path: Path) -> None:
    route = [{"modality": "CT", "kind": "echo-volume"}]
    files = series(tmp_path / "sent")
    first = settings(tmp_path / "state", quiet_s=3600.0, routes=route)
    jobs = JobService(first)
    node = DicomNode(first, jobs, lambda *_: None)
    node.start()
    try:
        c_store(node.scp.port, files[:5])
    finally:
        node.close()  # the daemon stops with the series half there
    again = settings(tmp_path / "state", quiet_s=3600.0, routes=route)
    node = DicomNode(again, jobs, lambda *_: None)
    node.start()
    try:
        c_store(node.scp.port, files[5:])
        status = node.status()["series"]
        assert [(s["instances"], s["state"]) for s in status] == [(len(files), "receiving")]
    finally:
        node.close()
    last = settings(tmp_path / "state", quiet_s=0.1, routes=route)
    node = DicomNode(last, jobs, lambda *_: None)
    node.start()
    try:
        wait(lambda: node.status()["series"] and node.status()["series"][0]["job"])
        node.tick(time.time())  # and again: still one job
        assert len(jobs.list("", 10)) == 1
    finally:
        node.close()
        jobs.close()


# -- a real daemon and dcmtk --------------------------------------------------------------


@need_dcmtk
def test_storescu_series_becomes_a_job_by_itself_and_a_stranger_is_refused(
    run_echod: type[Echod], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="ed-"))  # ipc paths must be short
    model = tiny_model(tmp_path / "tiny3d.onnx")
    cfg = tmp_path / "echod.toml"
    cfg.write_text(
        "[offline]\nthreads = 1\n"
        '[dicom]\nenabled = true\nport = 0\nquiet_s = 0.3\nallowed_aes = ["STORESCU", "ECHOSCU"]\n'
        f'[[dicom.routes]]\nmodality = "CT"\nkind = "echo-volume"\nmodel = "{model}"\n'
        "options = { slab = 4 }\n"
    )
    e = run_echod(
        "run",
        "--config",
        str(cfg),
        "--source",
        "none",
        "--set",
        f"paths.runtime_dir={runtime}",
        "--set",
        f"paths.state_dir={tmp_path / 'state'}",
    )
    try:
        port = e.wait_for("DICOM node ECHOD on 127.0.0.1:").strip().rsplit(":", 1)[1]
        files = series(tmp_path / "sent")
        echo = ["echoscu", "-aec", "ECHOD", "127.0.0.1", port]
        assert subprocess.run([*echo, "-aet", "ECHOSCU"], capture_output=True).returncode == 0
        refused = subprocess.run([*echo, "-aet", "EVIL"], capture_output=True, text=True)
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
        e.wait_for("refused: calling AE title 'EVIL' is not in dicom.allowed_aes", 10)
        store = ["storescu", "-aet", "STORESCU", "-aec", "ECHOD", "+sd", "127.0.0.1", port]
        assert subprocess.run([*store, str(tmp_path / "sent")], capture_output=True).returncode == 0
        client = Client(f"ipc://{runtime}/control.sock", timeout_s=30)
        try:
            job_id = wait(lambda: client.call("jobs.list", {"state": ""}), 30)[0]["id"]
            job = wait(
                lambda: (j := client.call("jobs.get", {"job": job_id}))["state"] == "done" and j,
                120,
            )
            received = {p.stem for p in Path(job["input"]).glob("*.dcm")}
            assert received == {str(dcmread(f).SOPInstanceUID) for f in files}
            assert client.call("jobs.result", {"job": job_id})["outputs"] == {
                "labels": "labels.nii.gz"
            }
            wait(lambda: not client.call("dicom.status")["series"], 10)  # followed to its end
        finally:
            client.close()
        code = cli_main(["ctl", "--endpoint", f"ipc://{runtime}/control.sock", "dicom", "status"])
        out = capsys.readouterr().out
        assert code == 0 and "accepted=2 rejected=1" in out and "instances_received  12" in out
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@need_dcmtk
@pytest.mark.skipif("ct" not in KINDS, reason="the ct job kind is not on this branch yet")
def test_storescu_series_to_ct_job_to_seg_at_storescp_retried_while_it_was_down(
    run_echod: type[Echod], tmp_path: Path, storescps: list[Storescp]
) -> None:
    """The issue's case: a phantom CT series from storescu; the CT job runs by itself; its
    SEG reaches storescp (down at first: retried until it is up) and refers to the series."""
    import highdicom as hd

    runtime = Path(tempfile.mkdtemp(prefix="ec-"))
    pacs_port = free_port()
    cfg = tmp_path / "echod.toml"
    cfg.write_text(
        "[offline]\nthreads = 1\n"
        '[dicom]\nenabled = true\nport = 0\nquiet_s = 0.3\nallowed_aes = ["STORESCU"]\n'
        "retry_s = 0.5\nretry_max_s = 1.0\n"
        '[[dicom.routes]]\nmodality = "CT"\nkind = "ct"\n'
        '[[dicom.destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {pacs_port}\n"
    )
    e = run_echod(
        "run",
        *("--config", str(cfg), "--source", "none"),
        *("--set", f"paths.runtime_dir={runtime}", "--set", f"paths.state_dir={tmp_path / 's'}"),
    )
    try:
        port = e.wait_for("DICOM node ECHOD on 127.0.0.1:").strip().rsplit(":", 1)[1]
        files = series(tmp_path / "sent", slices=16, seed=3)
        store = ["storescu", "-aet", "STORESCU", "-aec", "ECHOD", "+sd", "127.0.0.1", port]
        assert subprocess.run([*store, str(tmp_path / "sent")], capture_output=True).returncode == 0
        client = Client(f"ipc://{runtime}/control.sock", timeout_s=30)
        try:

            def sends() -> list[dict[str, Any]]:
                return list(client.call("dicom.status")["sends"])

            failing = wait(lambda: [s for s in sends() if s["attempts"] >= 2], 300)
            assert all("cannot connect" in s["error"] for s in failing)
            storescps.append(pacs := Storescp(pacs_port, tmp_path / "pacs"))
            wait(lambda: not sends() and pacs.files(), 60)
        finally:
            client.close()
        segs = [f for f in pacs.files() if dcmread(f, stop_before_pixels=True).Modality == "SEG"]
        assert len(segs) == 1
        seg = hd.seg.segread(segs[0])
        sent = dcmread(files[0], stop_before_pixels=True)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sent.SeriesInstanceUID
        assert seg.StudyInstanceUID == sent.StudyInstanceUID
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
