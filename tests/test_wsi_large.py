"""The 50,000 x 40,000 synthetic slide: written with bounded memory, opened by OpenSlide.

Slow (about four minutes on this machine): the slide is JPEG-encoded tile by tile.
The writer runs in a child process so that its own peak resident memory is measured.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from daemon.phantoms.wsi import MPP, write_slide

pytestmark = [pytest.mark.slow, pytest.mark.full, pytest.mark.timeout(1800)]

WIDTH, HEIGHT = 50_000, 40_000
LIMIT_MIB = 2048


def _write(path: str, report: Connection) -> None:
    write_slide(Path(path), WIDTH, HEIGHT, seed=7)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent
    # (here the whole test session), the high-water mark of this process's own memory not
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    report.send(kib / 1024)


def test_a_50000_x_40000_slide_stays_under_2_gib_and_opens_in_openslide(tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    path = tmp_path / "large.tiff"
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_write, args=(str(path), send))
    child.start()
    peak_mib = receive.recv()  # the writer's own peak resident memory
    child.join()
    assert child.exitcode == 0
    assert peak_mib < LIMIT_MIB, f"the writer peaked at {peak_mib:.0f} MiB"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert slide.level_count >= 3
        assert [round(d) for d in slide.level_downsamples][:3] == [1, 4, 16]
        props = slide.properties
        assert float(props[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP, rel=1e-3)
        assert float(props[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP, rel=1e-3)
        corner = slide.read_region((WIDTH // 2, HEIGHT // 2), 0, (512, 512))
        assert corner.size == (512, 512)
