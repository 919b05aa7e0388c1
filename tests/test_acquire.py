"""Frame sources (recordings, image folders, synthetic phantom) and pacing."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pydantic
import pytest

from daemon.acquire import (
    ImageFolder,
    MetaImageSequence,
    SyntheticSettings,
    SyntheticSource,
    open_source,
    paced,
)
from daemon.errors import SourceError
from daemon.frame import Frame, FrameMeta

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WATER_TANK = DATA / "us" / "WaterTankBottomTranslationVideoBuffer.igs.mha"
CURVILINEAR = DATA / "us" / "UltrasonixCurvilinearScanConvertedData.igs.mha"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"reference data folder {DATA} is missing (see shared/data/README)"
)


def header_timestamps(path: Path) -> list[float]:
    """Seq_FrameNNNN_Timestamp values as written in the file's text header."""
    header = path.read_bytes()[:200_000].split(b"ElementDataFile")[0].decode("latin-1")
    return [float(v) for v in re.findall(r"Seq_Frame\d{4}_Timestamp = (\S+)", header)]


def fake_frames(times: list[float]) -> list[Frame]:
    return [
        Frame(np.zeros((4, 4), np.uint8), FrameMeta(index=i, t_source=t))
        for i, t in enumerate(times)
    ]


# -- recordings ---------------------------------------------------------------------------


@needs_data
def test_water_tank_recording() -> None:
    source = open_source(str(WATER_TANK))
    assert isinstance(source, MetaImageSequence)
    assert source.max_shape == (616, 820) and source.dtype == np.uint8
    frames = list(source.frames())
    assert len(frames) == 201
    expected = header_timestamps(WATER_TANK)
    times = [f.meta.t_source for f in frames]
    assert times == expected
    assert np.all(np.diff(times) > 0)
    assert [f.meta.index for f in frames] == list(range(201))
    for f in frames[:3]:
        assert f.image.shape == (616, 820) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous
        assert f.meta.shape == (616, 820) and f.meta.dtype == "u1"
        assert f.meta.spacing == (1.0, 1.0, 1.0)
        assert f.meta.t_acquired_ns == 0
        np.testing.assert_array_equal(f.meta.transform, np.eye(4))
    assert frames[0].image.std() > 0 and not np.array_equal(frames[0].image, frames[100].image)
    assert source.nominal_fps == pytest.approx(200 / (expected[-1] - expected[0]))
    assert "201 frames" in source.description and WATER_TANK.name in source.description
    source.close()
    with pytest.raises(SourceError, match="closed"):
        next(source.frames())


@needs_data
def test_curvilinear_recording() -> None:
    source = open_source(str(CURVILINEAR))
    frames = list(source.frames())
    assert len(frames) == 5
    assert [f.meta.t_source for f in frames] == header_timestamps(CURVILINEAR)
    assert all(f.image.shape == (616, 820) for f in frames)


def test_metaimage_without_timestamps(tmp_path: Path) -> None:
    import SimpleITK as sitk

    volume = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.2, 0.3, 0.05))  # x, y mm; 50 ms between frames
    sitk.WriteImage(image, str(tmp_path / "seq.mhd"))
    source = open_source(str(tmp_path / "seq.mhd"))
    frames = list(source.frames())
    assert [f.meta.t_source for f in frames] == pytest.approx([0.0, 0.05, 0.1])
    assert source.nominal_fps == pytest.approx(20.0)
    assert frames[1].meta.spacing == (0.2, 0.3, 1.0)
    assert frames[1].meta.transform[0, 0] == pytest.approx(0.2)
    np.testing.assert_array_equal(frames[2].image, volume[2])
    with_fps = open_source(str(tmp_path / "seq.mhd"), fps=10.0)
    assert [f.meta.t_source for f in with_fps.frames()] == pytest.approx([0.0, 0.1, 0.2])

    sitk.WriteImage(sitk.GetImageFromArray(volume[0]), str(tmp_path / "one.mha"))
    single = open_source(str(tmp_path / "one.mha"))
    assert [f.image.shape for f in single.frames()] == [(20, 30)]
    assert single.nominal_fps is None


def test_plus_frames_with_bad_status_are_skipped(tmp_path: Path) -> None:
    frames = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    header = [
        "ObjectType = Image",
        "NDims = 3",
        "DimSize = 5 6 4",
        "ElementSpacing = 0.5 0.25 1",
        "ElementType = MET_UCHAR",
    ]
    for i, status in enumerate(["OK", "INVALID", "OK", "OK"]):
        header += [f"Seq_Frame{i:04d}_Timestamp = {10 + i * 0.1:.6f}"]
        header += [f"Seq_Frame{i:04d}_ImageStatus = {status}"]
    header += ["ElementDataFile = LOCAL"]
    path = tmp_path / "tracked.igs.mha"
    path.write_bytes(("\n".join(header) + "\n").encode() + frames.tobytes())
    source = open_source(str(path))
    assert isinstance(source, MetaImageSequence) and source.skipped == 1
    assert "1 skipped" in source.description
    out = list(source.frames())
    assert [f.meta.index for f in out] == [0, 2, 3]
    assert [f.meta.t_source for f in out] == pytest.approx([10.0, 10.2, 10.3])
    np.testing.assert_array_equal(out[1].image, frames[2])
    assert out[0].meta.spacing == (0.5, 0.25, 1.0)

    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SourceError, match=r"truncated \(110 of 120 bytes present\)"):
        open_source(str(path))


# -- bad input ----------------------------------------------------------------------------


def test_missing_path() -> None:
    with pytest.raises(SourceError, match=r"no-such-recording\.mha: no such file"):
        open_source("/nonexistent/no-such-recording.mha")


@needs_data
def test_truncated_recording(tmp_path: Path) -> None:
    cut = tmp_path / "cut.igs.mha"
    data = WATER_TANK.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.igs\.mha: pixel data is truncated") as info:
        open_source(str(cut))
    assert "\n" not in str(info.value) and "re-copy" in str(info.value)


@needs_data
def test_corrupt_compressed_recording(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mha"
    data = bytearray(WATER_TANK.read_bytes())
    data[200_000:205_000] = bytes(5000)
    bad.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"bad\.mha: compressed pixel data is corrupt"):
        open_source(str(bad))


def test_not_a_metaimage(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"\x89PNG not really\x00\x01")
    with pytest.raises(SourceError, match=r"junk\.mha: not a MetaImage"):
        open_source(str(junk))


def test_missing_raw_file(tmp_path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.uint8)), str(tmp_path / "s.mhd"))
    (tmp_path / "s.raw").unlink()
    with pytest.raises(SourceError, match=r"s\.raw is missing"):
        open_source(str(tmp_path / "s.mhd"))


def test_detached_pixel_data_must_lie_beside_the_header(tmp_path: Path) -> None:
    """A crafted .mhd must not make echod read another file: the data file is refused
    when absolute, through '..', through a link out of the folder, or split over files."""
    secret = tmp_path / "elsewhere" / "secret.raw"
    secret.parent.mkdir()
    secret.write_bytes(bytes(range(128)))  # the size the header asks for: it would be read
    rec = tmp_path / "rec"
    (rec / "data").mkdir(parents=True)
    (rec / "link.raw").symlink_to(secret)
    (rec / "data" / "mine.raw").write_bytes(bytes(128))
    header = "ObjectType = Image\nNDims = 3\nDimSize = 8 8 2\nElementType = MET_UCHAR\n"
    for name in (
        str(secret),
        "../elsewhere/secret.raw",
        "link.raw",
        "data/../../elsewhere/secret.raw",
    ):
        mhd = rec / "crafted.mhd"
        mhd.write_text(header + f"ElementDataFile = {name}\n")
        with pytest.raises(SourceError, match="not beside the header"):
            open_source(str(mhd))
    for split in ("LIST", "slice%03d.raw 1 2 1"):
        mhd.write_text(header + f"ElementDataFile = {split}\n")
        with pytest.raises(SourceError, match="several files"):
            open_source(str(mhd))
    mhd.write_text(header + "ElementDataFile = data/mine.raw\n")  # below the header: fine
    assert len(list(open_source(str(mhd)).frames())) == 2


def test_degenerate_recordings_are_refused_when_opened(tmp_path: Path) -> None:
    """The frame rule every source applies: no empty frames, channels 1, 3 or 4."""
    import nrrd
    import SimpleITK as sitk

    empty = tmp_path / "empty.seq.nrrd"
    nrrd.write(str(empty), np.zeros((0, 8, 3), np.uint8), index_order="F")
    two = tmp_path / "two.seq.nrrd"
    kinds = ["vector", "domain", "domain", "list"]
    nrrd.write(str(two), np.zeros((2, 8, 8, 3), np.uint8), {"kinds": kinds}, index_order="F")
    two_mha = tmp_path / "two.mha"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 8, 8, 2), np.uint8), isVector=True), str(two_mha)
    )
    for path, why in ((empty, "no pixels"), (two, "2 channels"), (two_mha, "2 channels")):
        with pytest.raises(
            SourceError, match=f"{path.name}: its frames .* cannot be played: {why}"
        ):
            open_source(str(path))


def test_unknown_extension(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(SourceError, match=r"notes\.txt: not a recognised source.*expected \.mha"):
        open_source(str(notes))


# -- image folders ------------------------------------------------------------------------


def test_folder_round_trip_in_natural_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = {n: rng.integers(0, 256, (24, 32), dtype=np.uint8) for n in (1, 2, 3, 10, 11)}
    for n, image in images.items():
        assert cv2.imwrite(str(tmp_path / f"frame{n}.png"), image)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path), fps=25.0)
    assert isinstance(source, ImageFolder)
    assert source.max_shape == (24, 32) and source.dtype == np.uint8
    assert source.nominal_fps == 25.0
    frames = list(source.frames())
    assert len(frames) == 5
    for frame, n in zip(frames, sorted(images), strict=True):
        np.testing.assert_array_equal(frame.image, images[n])
    assert [f.meta.index for f in frames] == [0, 1, 2, 3, 4]
    assert [f.meta.t_source for f in frames] == pytest.approx([0, 0.04, 0.08, 0.12, 0.16])


def test_folder_colour_and_16_bit(tmp_path: Path) -> None:
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    rgb = next(open_source(str(tmp_path)).frames()).image
    assert rgb.shape == (10, 12, 3) and rgb[0, 0].tolist() == [0, 0, 200]

    deep = tmp_path / "deep"
    deep.mkdir()
    cv2.imwrite(str(deep / "a.png"), np.full((6, 6), 4000, np.uint16))
    source = open_source(str(deep))
    assert source.dtype == np.uint16 and next(source.frames()).image[0, 0] == 4000
    assert source.nominal_fps is None


def test_folder_mixed_sizes(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "f1.png"), np.zeros((16, 16), np.uint8))
    cv2.imwrite(str(tmp_path / "f2.png"), np.zeros((16, 20), np.uint8))
    with pytest.raises(SourceError, match=r"f2\.png: is 16x20 u1 but f1\.png is 16x16 u1"):
        open_source(str(tmp_path))


def test_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(SourceError, match=f"{re.escape(str(tmp_path))}: folder has no images"):
        open_source(str(tmp_path))


def test_folder_undecodable_image(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "f1.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "f2.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match=r"f2\.png: cannot be decoded"):
        open_source(str(tmp_path))


# -- pacing -------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_paced_by_timestamps_takes_the_recorded_time() -> None:
    source = SyntheticSource(fps=50.0)
    t0 = time.monotonic()
    out = list(paced(itertools.islice(source.frames(), 6), pace="timestamps", fps=None))
    elapsed = time.monotonic() - t0
    assert len(out) == 6
    assert elapsed >= 0.1 * 0.95  # 5 intervals of 20 ms
    acquired = np.array([f.meta.t_acquired_ns for f in out]) / 1e9
    assert np.all(acquired > 0)
    assert np.all(acquired - acquired[0] >= np.arange(6) / 50.0 - 0.01)


@pytest.mark.timeout(20)
def test_paced_at_fps() -> None:
    t0 = time.monotonic()
    out = list(paced(fake_frames([0.0] * 5), pace="fps", fps=40.0))
    assert len(out) == 5
    assert time.monotonic() - t0 >= 4 / 40.0 * 0.95


@pytest.mark.timeout(20)  # the check: pacing by timestamps would take 2000 s
def test_unpaced_does_not_sleep() -> None:
    out = list(paced(fake_frames([0.0, 1000.0, 2000.0]), pace="none", fps=None))
    assert [f.meta.index for f in out] == [0, 1, 2]
    assert all(f.meta.t_acquired_ns > 0 for f in out)


@pytest.mark.timeout(20)  # the check: the next frame is due after an hour
def test_stop_event_ends_a_sleep() -> None:
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    out = list(paced(fake_frames([0.0, 3600.0, 7200.0]), pace="timestamps", fps=None, stop=stop))
    timer.join()
    assert len(out) == 1

    stopped = threading.Event()
    stopped.set()
    assert list(paced(fake_frames([0.0]), pace="none", fps=None, stop=stopped)) == []


@pytest.mark.timeout(20)
def test_loop_continues_indices_and_timestamps(tmp_path: Path) -> None:
    for n in range(3):
        cv2.imwrite(str(tmp_path / f"f{n}.png"), np.full((8, 8), n, np.uint8))
    source = open_source(str(tmp_path), fps=100.0)
    stream = paced(source.frames(), pace="timestamps", fps=None, loop_source=source.frames)
    t0 = time.monotonic()
    out = list(itertools.islice(stream, 8))
    assert time.monotonic() - t0 >= 0.07 * 0.95  # the schedule runs on across passes
    assert [f.meta.index for f in out] == list(range(8))
    assert [f.meta.t_source for f in out] == pytest.approx([i / 100 for i in range(8)])
    assert [int(f.image[0, 0]) for f in out] == [0, 1, 2, 0, 1, 2, 0, 1]


@pytest.mark.timeout(20)
def test_late_frames_do_not_burst() -> None:
    def slow_source() -> Iterator[Frame]:
        frames = fake_frames([0.0, 0.01, 0.02, 0.03])
        yield frames[0]
        threading.Event().wait(0.7)  # a stalled decoder: frame 1 comes 0.7 s late
        yield from frames[1:]

    out = list(paced(slow_source(), pace="timestamps", fps=None))
    acquired = np.array([f.meta.t_acquired_ns for f in out]) / 1e9
    assert acquired[1] - acquired[0] >= 0.69
    assert acquired[3] - acquired[1] >= 0.02 * 0.9  # paced again from frame 1, not a burst


def test_loop_ends_on_an_empty_pass() -> None:
    def again() -> Iterator[Frame]:
        return iter(())

    out = list(paced(fake_frames([5.0, 5.5]), pace="none", fps=None, loop_source=again))
    assert [f.meta.t_source for f in out] == [5.0, 5.5]


def test_paced_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive fps"):
        paced(fake_frames([0.0]), pace="fps", fps=None)
    with pytest.raises(ValueError, match="pace must be"):
        paced(fake_frames([0.0]), pace="fast", fps=None)  # type: ignore[arg-type]


# -- synthetic phantom --------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed() -> None:
    a, b = SyntheticSource(SyntheticSettings(seed=7)), SyntheticSource(SyntheticSettings(seed=7))
    other = SyntheticSource(SyntheticSettings(seed=8))
    for i in (0, 17):
        (fa, la), (fb, lb) = a.frame_with_labels(i), b.frame_with_labels(i)
        np.testing.assert_array_equal(fa.image, fb.image)
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a.frame_with_labels(0)[1], other.frame_with_labels(0)[1])
    frames = list(itertools.islice(a.frames(), 3))
    np.testing.assert_array_equal(frames[2].image, a.frame_with_labels(2)[0].image)


def test_synthetic_frame_metadata() -> None:
    source = open_source("synthetic", fps=20, synthetic=SyntheticSettings(width=320, height=512))
    assert isinstance(source, SyntheticSource)
    frame, labels = source.frame_with_labels(5)
    assert frame.image.shape == labels.shape == (512, 320) == source.max_shape
    assert frame.image.dtype == np.uint8 and labels.dtype == np.uint8
    assert frame.meta.index == 5 and frame.meta.t_source == pytest.approx(0.25)
    sp = source.spacing_mm
    assert frame.meta.spacing == (sp, sp, 1.0) and frame.meta.transform[1, 1] == sp
    assert source.nominal_fps == 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_labels_are_plausible(seed: int) -> None:
    source = SyntheticSource(SyntheticSettings(seed=seed))
    mm2 = source.spacing_mm**2
    per_beat = round(30.0 / source.heart_rate_hz) + 1
    artery, vein = [], []
    for i in range(per_beat):
        frame, labels = source.frame_with_labels(i)
        assert set(np.unique(labels)) == {0, 1, 2}
        artery.append(np.count_nonzero(labels == 1) * mm2)
        vein.append(np.count_nonzero(labels == 2) * mm2)
        if i % 10 == 0:
            image = frame.image.astype(float)
            for cls in (1, 2):
                lumen = (labels == cls).astype(np.uint8)
                around = cv2.dilate(lumen, np.ones((25, 25), np.uint8)) > 0
                ring = around & (labels == 0)
                assert image[lumen > 0].mean() < 0.5 * image[ring].mean()
    # carotid: 2.8-3.8 mm radius, +6-12 % in systole; jugular: larger, flattened
    assert min(artery) > 20 and max(artery) < 60
    assert max(artery) / min(artery) > 1.08  # pulsates over one heart beat
    assert min(vein) > 10 and max(vein) < 250
    slow = [np.count_nonzero(source.frame_with_labels(i)[1] == 2) for i in range(0, 300, 30)]
    assert max(slow) / min(slow) > 1.2  # compression over 10 s


def test_synthetic_prerender_renders_the_loop_before_the_first_frame() -> None:
    """The same frames, all rendered when the source opens; a loop too large to keep is
    refused with the settings to change."""
    settings = SyntheticSettings(seed=3, loop_s=0.2, prerender=True)
    source = SyntheticSource(settings, fps=20)
    assert source._cache is not None and len(source._cache) == 4  # 0.2 s at 20 fps
    lazy = SyntheticSource(SyntheticSettings(seed=3, loop_s=0.2), fps=20)
    for i in (0, 3, 5):  # 5: the second loop
        np.testing.assert_array_equal(
            source.frame_with_labels(i)[0].image, lazy.frame_with_labels(i)[0].image
        )
    assert len(source._cache) == 4
    big = SyntheticSettings(width=1024, height=1024, loop_s=60, prerender=True)
    with pytest.raises(SourceError, match=r"shorten source\.synthetic\.loop_s"):
        SyntheticSource(big, fps=60)


def test_synthetic_settings_validation() -> None:
    with pytest.raises(pydantic.ValidationError):
        SyntheticSettings(width=100)
    with pytest.raises(pydantic.ValidationError):
        SyntheticSettings.model_validate({"seed": 1, "colour": "blue"})
    assert SyntheticSettings.model_fields["seed"].description


@needs_data
def test_recording_frames_outlive_their_source() -> None:
    """Frames are views of memory they keep alive, not of the decoder's (use after free)."""
    frames = list(open_source(str(WATER_TANK)).frames())  # the source is gone after this
    churn = np.full(len(frames) * frames[0].image.nbytes, 7, np.uint8)  # reuses freed memory
    again = list(open_source(str(WATER_TANK)).frames())
    del churn
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, again, strict=True))
