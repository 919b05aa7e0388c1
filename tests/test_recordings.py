"""Recording formats (DICOM cine, NRRD sequences) and the recording sink's round trip.

The DICOM and NRRD files are made here: multi-frame ultrasound with JPEG
Baseline frames encoded by Pillow (pydicom cannot encode JPEG Baseline) and
uncompressed RGB; 3D Slicer style ``.seq.nrrd`` files written with pynrrd.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nrrd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from daemon.acquire import MetaImageSequence, NrrdSequence, SyntheticSource, open_source
from daemon.config import Config
from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta
from daemon.record import RecordStage, SequenceWriter, data_path
from daemon.ring import Ring
from daemon.stage import InputPort, StageSpec, run_stage
from tests.conftest import DATA, WATERTANK, need_data

pytestmark = pytest.mark.timeout(120)

T = 30.0


def gradient(i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth frame ``i`` (JPEG keeps it close), distinct per frame."""
    y, x = np.indices(shape[:2])
    base = (x * 2 + y * 3 + i * 11) % 256
    if len(shape) == 3:
        base = np.stack([base, 255 - base, (base + 80) % 256], axis=-1)
    return base.astype(np.uint8)


# -- DICOM cine -----------------------------------------------------------------------------


def jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def region(delta_x_cm: float, delta_y_cm: float, box: tuple[int, int, int, int], fmt: int) -> Any:
    r = Dataset()
    r.RegionSpatialFormat = fmt  # 1: 2-D tissue, 3: spectral (Doppler)
    r.RegionDataType = 1
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = box
    r.PhysicalUnitsXDirection = 3  # cm
    r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = delta_x_cm
    r.PhysicalDeltaY = delta_y_cm
    return r


def us_cine(path: Path, frames: list[np.ndarray], syntax: UID, **attrs: Any) -> Path:
    """A multi-frame ultrasound DICOM file of ``frames`` (JPEG Baseline or uncompressed)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = frames[0].shape[:2]
    ds.NumberOfFrames = len(frames)
    rgb = frames[0].ndim == 3
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = np.stack(frames).tobytes()
    else:
        ds.PixelData = encapsulate([jpeg(f) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_jpeg_cine_with_frame_time_vector_and_regions(tmp_path: Path) -> None:
    frames = [gradient(i, (60, 80)) for i in range(6)]
    steps = [0.0, 33.0, 34.0, 33.5, 40.0, 30.0]  # ms from the frame before
    path = us_cine(
        tmp_path / "loop.dcm",
        frames,
        JPEGBaseline8Bit,
        FrameTimeVector=steps,
        FrameIncrementPointer=0x00181065,
        SequenceOfUltrasoundRegions=[
            region(0.05, 0.02, (0, 40, 79, 59), fmt=3),  # a Doppler strip: not the image's
            region(0.0125, 0.015, (0, 0, 79, 39), fmt=1),
        ],
    )
    src = open_source(str(path))
    got = list(src.frames())
    assert src.max_shape == (60, 80) and src.dtype == np.uint8
    assert "JPEG Baseline" in src.description
    for i, f in enumerate(got):
        decoded = np.array(Image.open(io.BytesIO(jpeg(frames[i]))))
        assert np.array_equal(f.image, decoded), "what Pillow decodes from the same JPEG"
        assert np.abs(f.image.astype(int) - frames[i]).mean() < 2, "close to the original"
        assert f.meta.spacing == pytest.approx((0.125, 0.15, 1.0))
        assert f.meta.transform == pytest.approx(np.diag([0.125, 0.15, 1.0, 1.0]))
    times = np.cumsum(steps) / 1000
    assert [f.meta.t_source for f in got] == pytest.approx(list(times))
    assert src.nominal_fps == pytest.approx(5 / times[-1])
    src.close()
    with pytest.raises(SourceError, match="closed"):
        next(iter(src.frames()))


def test_dicom_uncompressed_rgb_with_frame_time_and_pixel_spacing(tmp_path: Path) -> None:
    frames = [gradient(i, (30, 40, 3)) for i in range(4)]
    path = us_cine(
        tmp_path / "rgb.dcm",
        frames,
        ExplicitVRLittleEndian,
        FrameTime=40.0,
        PixelSpacing=[0.3, 0.2],
    )
    src = open_source(str(path))
    got = list(src.frames())
    assert all(np.array_equal(f.image, frames[i]) for i, f in enumerate(got))
    assert [f.meta.t_source for f in got] == pytest.approx([0.0, 0.04, 0.08, 0.12])
    assert src.nominal_fps == pytest.approx(25.0)
    assert got[0].meta.spacing == pytest.approx((0.2, 0.3, 1.0)), "PixelSpacing is (row, column)"


def test_dicom_without_timing_uses_fps_and_errors_are_one_line(tmp_path: Path) -> None:
    frames = [gradient(i, (20, 20)) for i in range(3)]
    plain = us_cine(tmp_path / "plain.dcm", frames, ExplicitVRLittleEndian)
    src = open_source(str(plain), fps=10.0)
    assert [f.meta.t_source for f in src.frames()] == pytest.approx([0.0, 0.1, 0.2])
    assert src.nominal_fps == 10.0

    jls = us_cine(tmp_path / "jls.dcm", frames, JPEGBaseline8Bit)
    jls.write_bytes(jls.read_bytes().replace(JPEGBaseline8Bit.encode(), JPEGLSLossless.encode()))
    # a JPEG-LS transfer syntax over baseline JPEG bytes: with no decoder installed the
    # message names the packages; with one, it says the data cannot be decoded
    words = r"JPEG-LS.*needs a decoder.*(gdcm|pylibjpeg)|jls.dcm: pixel data cannot be decoded"
    with pytest.raises(SourceError, match=words):
        open_source(str(jls))

    corrupt = us_cine(tmp_path / "corrupt.dcm", frames, JPEGBaseline8Bit)
    data = bytearray(corrupt.read_bytes())
    at = data.index(b"\xff\xd8") + 200  # inside the first frame's entropy-coded data
    data[at : at + 200] = bytes(200)
    corrupt.write_bytes(data)
    with pytest.raises(SourceError, match=r"corrupt\.dcm: pixel data cannot be decoded"):
        open_source(str(corrupt))

    (tmp_path / "text.dcm").write_text("not DICOM")
    with pytest.raises(SourceError, match="not a readable DICOM image"):
        open_source(str(tmp_path / "text.dcm"))


CT_SLICE = DATA / "ct" / "ct-3slice" / "01.dcm"


def test_dicom_that_is_not_ultrasound_is_refused_with_the_job_that_takes_it(
    tmp_path: Path,
) -> None:
    with pytest.raises(SourceError) as err:
        open_source(str(need_data(CT_SLICE)))
    msg = str(err.value)
    assert "01.dcm: modality CT" in msg and "not ultrasound" in msg
    assert "`echod submit ct`" in msg and "\n" not in msg

    frames = [gradient(i, (32, 32, 3)) for i in range(2)]
    slide = us_cine(tmp_path / "slide.dcm", frames, ExplicitVRLittleEndian, Modality="SM")
    with pytest.raises(SourceError, match=r"modality SM .*not ultrasound.*`echod submit wsi`"):
        open_source(str(slide))
    mr = us_cine(tmp_path / "mr.dcm", frames, ExplicitVRLittleEndian, Modality="MR")
    with pytest.raises(SourceError, match=r"modality MR .*plays only ultrasound"):
        open_source(str(mr))

    # the allow-list: intravascular ultrasound, and an ultrasound SOP class without Modality
    ivus = us_cine(tmp_path / "ivus.dcm", frames, ExplicitVRLittleEndian, Modality="IVUS")
    assert len(list(open_source(str(ivus)).frames())) == 2
    bare = us_cine(tmp_path / "bare.dcm", frames, ExplicitVRLittleEndian)
    ds = dcmread(bare)
    del ds.Modality
    ds.save_as(bare)
    assert len(list(open_source(str(bare)).frames())) == 2


# -- NRRD sequences -------------------------------------------------------------------------


def seq_nrrd(path: Path, frames: np.ndarray, header: dict[str, Any]) -> Path:
    """``frames`` (N, rows, cols[, channels]) as a Slicer volume sequence (I, J, K=1, N)."""
    data = np.expand_dims(frames.T, -2)  # NRRD order: [channels,] I, J, K = 1, N
    nrrd.write(str(path), np.asfortranarray(data), header)
    return path


def test_slicer_sequence_with_time_index_values(tmp_path: Path) -> None:
    frames = np.stack([gradient(i, (50, 70)) for i in range(5)])
    times = [0.0, 0.033, 0.0667, 0.1, 0.1333]
    nan = [np.nan] * 3
    path = seq_nrrd(
        tmp_path / "us.seq.nrrd",
        frames,
        {
            "space": "left-posterior-superior",
            "kinds": ["domain", "domain", "domain", "list"],
            "space directions": [[0.2, 0, 0], [0, 0.25, 0], [0, 0, 1.0], nan],
            "space origin": [1.0, 2.0, 3.0],
            "labels": ["", "", "", "time"],
            "units": ["", "", "", "s"],
            "axis 3 index type": "numeric",
            "axis 3 index values": " ".join(map(str, times)),
            "DataNodeClassName": "vtkMRMLScalarVolumeNode",
        },
    )
    src = open_source(str(path))
    assert isinstance(src, NrrdSequence) and src.max_shape == (50, 70)
    got = list(src.frames())
    assert all(np.array_equal(f.image, frames[i]) for i, f in enumerate(got))
    assert [f.meta.t_source for f in got] == pytest.approx(times)
    expected = np.array([[0.2, 0, 0, 1.0], [0, 0.25, 0, 2.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])
    assert got[0].meta.transform == pytest.approx(expected)
    assert got[0].meta.spacing == pytest.approx((0.2, 0.25, 1.0))
    assert src.nominal_fps == pytest.approx(4 / 0.1333)


def test_rgb_sequence_in_ras_with_milliseconds(tmp_path: Path) -> None:
    frames = np.stack([gradient(i, (20, 30, 3)) for i in range(3)])
    nan = [np.nan] * 3
    path = seq_nrrd(
        tmp_path / "colour.seq.nrrd",
        frames,
        {
            "space": "right-anterior-superior",
            "kinds": ["RGB-color", "domain", "domain", "domain", "list"],
            "space directions": [nan, [0.5, 0, 0], [0, 0.5, 0], [0, 0, 1.0], nan],
            "space origin": [10.0, 20.0, 0.0],
            "labels": ["", "", "", "", "time"],
            "units": ["", "", "", "", "ms"],
            "axis 4 index values": "0 50 100",
        },
    )
    src = open_source(str(path))
    got = list(src.frames())
    assert src.max_shape == (20, 30, 3)
    assert all(np.array_equal(f.image, frames[i]) for i, f in enumerate(got))
    assert [f.meta.t_source for f in got] == pytest.approx([0.0, 0.05, 0.1])
    lps = np.array([[-0.5, 0, 0, -10.0], [0, -0.5, 0, -20.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert got[0].meta.transform == pytest.approx(lps)


def test_nrrd_without_timing_and_bad_files(tmp_path: Path) -> None:
    frames = np.stack([gradient(i, (16, 24)) for i in range(4)])
    path = seq_nrrd(
        tmp_path / "plain.nrrd",
        frames.astype(">u2"),  # big-endian on disk
        {"kinds": ["domain", "domain", "domain", "list"], "spacings": [0.1, 0.2, 1.0, np.nan]},
    )
    src = open_source(str(path), fps=20.0)
    got = list(src.frames())
    assert src.dtype == np.dtype("uint16") and got[0].image.dtype.isnative
    assert all(np.array_equal(f.image, frames[i]) for i, f in enumerate(got))
    assert [f.meta.t_source for f in got] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert got[0].meta.spacing == pytest.approx((0.1, 0.2, 1.0))

    volume = tmp_path / "volume.seq.nrrd"
    nrrd.write(str(volume), np.zeros((8, 8, 3, 2), np.uint8), {"kinds": ["domain"] * 3 + ["list"]})
    with pytest.raises(SourceError, match="a volume of 3 slices"):
        open_source(str(volume))
    (tmp_path / "junk.nrrd").write_text("NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(SourceError, match="not a readable NRRD file"):
        open_source(str(tmp_path / "junk.nrrd"))


def plus_nrrd(path: Path, frames: np.ndarray, fields: dict[str, str]) -> Path:
    """``frames`` (N, rows, cols) as PLUS writes a sequence: 3-D frames of one slice, a
    list axis, identity geometry, per-frame fields as ``key:=value``."""
    header: dict[str, Any] = {
        "kinds": ["domain", "domain", "domain", "list"],
        "space dimension": 3,
        "space directions": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [np.nan] * 3],
        "space origin": [0.0, 0.0, 0.0],
        "ultrasound image type": "BRIGHTNESS",
        **fields,
    }
    return seq_nrrd(path, frames, header)


def tracked_poses(n: int) -> list[np.ndarray]:
    """A probe turning and moving: poses with many-digit values."""
    poses = []
    for i in range(n):
        c, s = np.cos(0.3 + 0.1 * i), np.sin(0.3 + 0.1 * i)
        pose = np.array([[c, -s, 0, i * 0.37], [s, c, 0, -3.1], [0, 0, 1, 7.3], [0, 0, 0, 1]])
        poses.append(pose)
    return poses


def test_plus_nrrd_keeps_timestamps_poses_status_and_orientation(tmp_path: Path) -> None:
    n = 8
    frames = np.stack([gradient(i, (40, 60)) for i in range(n)])
    t = 7417.7313 + np.cumsum([0.0] + [0.1058 + 0.001 * (i % 3) for i in range(n - 1)])
    poses = tracked_poses(n)
    fields = {"ultrasound image orientation": "MN"}
    for i in range(n):
        fields[f"Seq_Frame{i:04d}_Timestamp"] = repr(float(t[i]))
        fields[f"Seq_Frame{i:04d}_ProbeToTrackerTransform"] = " ".join(
            repr(float(v)) for v in poses[i].ravel()
        )
        fields[f"Seq_Frame{i:04d}_ProbeToTrackerTransformStatus"] = "OK" if i != 5 else "INVALID"
        fields[f"Seq_Frame{i:04d}_Status"] = "OK" if i != 3 else "INVALID"
    path = plus_nrrd(tmp_path / "plus.seq.nrrd", frames, fields)
    src = open_source(str(path))
    got = list(src.frames())
    assert [f.meta.index for f in got] == [0, 1, 2, 4, 5, 6, 7], "frame 3's image is INVALID"
    assert [f.meta.t_source for f in got] == [t[f.meta.index] for f in got], "recorded times"
    assert src.nominal_fps == pytest.approx(6 / (t[7] - t[0])) and src.nominal_fps < 9.5
    for f in got:
        assert np.array_equal(f.image, frames[f.meta.index][::-1]), "MN: near field at the top"
        pose = np.eye(4) if f.meta.index == 5 else poses[f.meta.index]  # 5: pose INVALID
        assert np.array_equal(f.meta.transform, pose)

    fields["ultrasound image orientation"] = "XX"  # PLUS's "unknown": played as stored
    unknown = open_source(str(plus_nrrd(tmp_path / "xx.seq.nrrd", frames, fields)))
    assert np.array_equal(next(iter(unknown.frames())).image, frames[0])
    fields["ultrasound image orientation"] = "FM"  # an RF orientation
    with pytest.raises(SourceError, match="orientation 'FM' is not a B-mode orientation"):
        open_source(str(plus_nrrd(tmp_path / "rf.seq.nrrd", frames, fields)))


def test_an_mn_recording_is_re_recorded_upright_with_its_poses(tmp_path: Path) -> None:
    n = 6
    frames = phantom_frames(n)
    for f, pose in zip(frames, tracked_poses(n), strict=True):
        f.meta.spacing = (0.3, 0.7, 1.0)  # not powers of two: 1 / spacing is not exact
        f.meta.transform = pose @ np.diag([0.3, 0.7, 1.0, 1.0])
    first = tmp_path / "mn.igs.mha"
    Recorder(first, 256 * 256).record(frames)
    header = first.read_text("latin-1")
    first.write_text(
        header.replace("UltrasoundImageOrientation = MFA", "UltrasoundImageOrientation = MN ")
    )
    stored = np.fromfile(data_path(first), np.uint8).reshape(n, 256, 256)

    replay = [Frame(f.image.copy(), f.meta) for f in open_source(str(first)).frames()]
    for f, raw in zip(replay, stored, strict=True):
        assert np.array_equal(f.image, raw[::-1]), "what a PLUS reader shows: near field up"
    again = tmp_path / "again.igs.mha"
    Recorder(again, 256 * 256).record(replay)
    assert "UltrasoundImageOrientation = MFA" in again.read_text("latin-1")
    rerecorded = np.fromfile(data_path(again), np.uint8).reshape(n, 256, 256)
    assert np.array_equal(rerecorded, stored[:, ::-1]), "pixels turned to match the MFA header"
    assert_replays(again, replay)
    poses = re.findall(r"ProbeToTrackerTransform = (.+)", again.read_text("latin-1"))
    assert poses == re.findall(r"ProbeToTrackerTransform = (.+)", header), "poses as written"


def test_recordings_reach_the_disk_while_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real: Any = real) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, name, spy)
    frames = phantom_frames(3)
    path = tmp_path / "power.igs.mha"
    w = SequenceWriter(path, (256, 256), np.dtype(np.uint8), frames[0].meta, sync_s=0.0)
    assert synced == [str(tmp_path)], "the new files' folder entry"
    for f in frames:
        w.append(f.image, f.meta)
        w.commit()
    # each commit (sync_s = 0): the pixels, then the header that counts them; no close yet
    assert synced[1:] == [str(data_path(path)), str(path)] * 3
    w.sync_due()  # what the recorder calls while no frame comes: nothing new to flush
    assert len(synced) == 7
    w.close()


# -- the recording sink ---------------------------------------------------------------------


class Recorder:
    """A RecordStage running (run_stage, in a thread) on a fresh "frames" ring."""

    def __init__(self, path: Path, payload_bytes: int) -> None:
        self.name = f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}-frames"
        self.ring = Ring.create(self.name, slots=4, payload_bytes=payload_bytes)
        spec = StageSpec("record", "record", inputs={"frames": InputPort(self.name, "all")})
        config = Config.model_validate({"record": {"enabled": True, "path": str(path)}})
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=run_stage, args=(RecordStage, spec, config, self.events, self.stop)
        )
        self.thread.start()
        assert self.event("ready")["recording"] == str(path)
        self.writer = self.ring.writer("block")  # waits for the recorder: no frame lost

    def event(self, kind: str) -> dict[str, Any]:
        while True:
            e = self.events.get(timeout=T)
            if e["event"] == "failed":
                raise AssertionError(e)
            if e["event"] == kind:
                return e

    def record(self, frames: list[Frame]) -> dict[str, Any]:
        """Write ``frames``, end the stream; the stage's summary."""
        for f in frames:
            self.writer.write(f.image, f.meta, timeout=T)
        self.writer.close_stream()
        summary = self.event("done")
        self.thread.join(T)
        self.ring.close()
        self.ring.unlink()
        return summary


def phantom_frames(n: int, t0: float = 1_700_000_123.456789) -> list[Frame]:
    """Synthetic frames with scanner-like timestamps (irregular, many digits)."""
    src = SyntheticSource(fps=30.0)
    frames = []
    for i, f in zip(range(n), src.frames(), strict=False):
        f.meta.t_source = t0 + i / 29.97 + (i % 3) * 1e-4
        f.meta.index = 1000 + i
        frames.append(f)
    return frames


def assert_replays(path: Path, frames: list[Frame]) -> MetaImageSequence:
    replay = open_source(str(path))
    assert isinstance(replay, MetaImageSequence)
    got = list(replay.frames())
    assert len(got) == len(frames)
    for f, g in zip(frames, got, strict=True):
        assert g.image.dtype == f.image.dtype and np.array_equal(g.image, f.image)
        assert g.meta.t_source == f.meta.t_source, "timestamps bit for bit"
        assert g.meta.spacing == f.meta.spacing
        assert np.array_equal(g.meta.transform, f.meta.transform), "poses bit for bit"
    return replay


def test_recording_replays_with_identical_pixels_and_timestamps(tmp_path: Path) -> None:
    frames = phantom_frames(25)
    rotation = np.array([[0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for f in frames[10:]:  # tracked from frame 10 on: pose . spacing
        pose = rotation.copy()
        pose[:3, 3] = (f.meta.index * 0.5, -3.25, 7.0)
        f.meta.transform = pose @ f.meta.transform
    path = tmp_path / "session.igs.mha"
    summary = Recorder(path, 256 * 256).record(frames)
    assert summary["recorded"] == 25 and summary["torn"] == 0
    assert summary["files"] == [str(path)]
    assert data_path(path).stat().st_size == 25 * 256 * 256
    replay = assert_replays(path, frames)
    assert replay.nominal_fps == pytest.approx(
        24 / (frames[-1].meta.t_source - frames[0].meta.t_source)
    )

    header = path.read_text("latin-1")
    assert header.endswith("ElementDataFile = session.igs.raw\n")
    assert re.search(r"^DimSize = 256 256 25 +$", header, re.M)
    poses = re.findall(r"Seq_Frame(\d{4})_ProbeToTrackerTransform = (.+)", header)
    assert [int(i) for i, _ in poses] == list(range(10, 25))
    for i, values in poses:
        f = frames[int(i)]
        written = np.array([float(v) for v in values.split()]).reshape(4, 4)
        expected = f.meta.transform @ np.diag([*(1 / s for s in f.meta.spacing), 1.0])
        assert written == pytest.approx(expected, abs=1e-12)
    numbers = re.findall(r"Seq_Frame\d{4}_FrameNumber = (\d+)", header)
    assert [int(n) for n in numbers] == [f.meta.index for f in frames]


def test_real_recording_round_trip_and_size_change_starts_a_new_file(tmp_path: Path) -> None:
    tank = MetaImageSequence(need_data(WATERTANK))
    real = [Frame(f.image.copy(), f.meta) for f, _ in zip(tank.frames(), range(30), strict=False)]
    tank.close()
    small = phantom_frames(5)
    path = tmp_path / "tank.igs.mha"
    path.write_text("an earlier recording")  # never overwritten
    summary = Recorder(path, 616 * 820).record(real + small)
    first, second = (tmp_path / "tank-2.igs.mha"), (tmp_path / "tank-3.igs.mha")
    assert summary["files"] == [str(first), str(second)] and summary["recorded"] == 35
    assert path.read_text() == "an earlier recording"
    assert_replays(first, real)
    assert_replays(second, small)


@pytest.mark.parametrize(
    ("shape", "dtype"), [((40, 50), "uint16"), ((40, 50, 3), "uint8"), ((8, 9), "float32")]
)
def test_pixel_types_replay(tmp_path: Path, shape: tuple[int, ...], dtype: str) -> None:
    rng = np.random.default_rng(0)
    frames = [
        Frame(
            (rng.random(shape) * 1000).astype(dtype),
            FrameMeta(
                index=i,
                t_source=0.1 * i + 1e-9,
                spacing=(0.3, 0.4, 1.0),
                transform=np.diag([0.3, 0.4, 1.0, 1.0]),
            ),
        )
        for i in range(4)
    ]
    path = tmp_path / f"{dtype}.igs.mha"
    w = SequenceWriter(path, shape, np.dtype(dtype), frames[0].meta)
    for f in frames:
        w.append(f.image, f.meta)
        w.commit()
    w.close()
    assert_replays(path, frames)


def test_a_crash_leaves_a_valid_recording_of_the_frames_committed(tmp_path: Path) -> None:
    frames = phantom_frames(4)
    path = tmp_path / "crash.igs.mha"
    w = SequenceWriter(path, (256, 256), np.dtype(np.uint8), frames[0].meta)
    for f in frames[:3]:
        w.append(f.image, f.meta)
        w.commit()
    w.append(frames[3].image, frames[3].meta)  # the pixels are out, the header not yet
    assert_replays(path, frames[:3])  # the files as a crash now would leave them


def test_a_failing_disk_stops_the_recording_not_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = phantom_frames(10)
    path = tmp_path / "full.igs.mha"
    recorder = Recorder(path, 256 * 256)
    real_pwrite, calls = os.pwrite, [0]

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):  # the header file
            calls[0] += 1
            if calls[0] > 1 + 5 * 2:  # the first header, then 5 frames (header lines + count)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    summary = recorder.record(frames)  # every frame is still taken from the ring
    monkeypatch.undo()
    assert (summary["recorded"], summary["skipped"]) == (5, 5)
    assert "No space left on device" in summary["error"]
    assert_replays(path, frames[:5])


def test_record_needs_a_path(tmp_path: Path) -> None:
    config = Config.model_validate({"record": {"enabled": True}})
    spec = StageSpec("record", "record", inputs={"frames": InputPort("none", "all")})
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    assert run_stage(RecordStage, spec, config, events, threading.Event()) == 78
    failed = [e for e in iter_events(events) if e["event"] == "failed"]
    assert "record.path" in failed[0]["error"]["message"]


def iter_events(events: queue.Queue[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while not events.empty():
        yield events.get_nowait()
