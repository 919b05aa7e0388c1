"""Frame sources: a scanner (OpenIGTLink), recordings, image folders, a phantom; pacing.

:func:`open_source` turns the configured URI into a :class:`FrameSource`;
:func:`paced` releases its frames in real time. Typical use::

    source = open_source(cfg.uri, fps=cfg.fps)
    again = source.frames if cfg.loop else None
    for frame in paced(source.frames(), pace=cfg.pace, fps=cfg.fps, loop_source=again, stop=ev):
        ...
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.acquire.base import DEFAULT_FPS, FrameSource
from daemon.acquire.folder import IMAGE_SUFFIXES, ImageFolder
from daemon.acquire.igtl import IgtlSettings, IgtlSource
from daemon.acquire.metaimage import MetaImageSequence
from daemon.acquire.nrrd import NrrdSequence
from daemon.acquire.pacing import Pace, StopEvent, looped, paced
from daemon.acquire.synthetic import SyntheticSettings, SyntheticSource
from daemon.errors import SourceError

__all__ = [
    "DEFAULT_FPS",
    "FrameSource",
    "IgtlSettings",
    "IgtlSource",
    "ImageFolder",
    "MetaImageSequence",
    "NrrdSequence",
    "Pace",
    "StopEvent",
    "SyntheticSettings",
    "SyntheticSource",
    "looped",
    "open_source",
    "paced",
]

_EXPECTED = (
    "expected .mha/.mhd, .dcm or .nrrd, a folder of images, igtl://HOST:PORT[/DEVICE] "
    "or 'synthetic'"
)


def open_source(
    uri: str,
    *,
    fps: float | None = None,
    synthetic: SyntheticSettings | None = None,
    igtl: IgtlSettings | None = None,
) -> FrameSource:
    """Open and validate a source; SourceError (one line: file, problem, fix) if it can't be.

    ``uri``: ``"synthetic"`` (``synthetic`` settings, defaults if None),
    ``igtl://HOST:PORT[/DEVICE]`` (a scanner; ``igtl`` settings; it connects on
    its first poll, not here), a ``.mha``/``.mhd`` (PLUS), ``.dcm`` (DICOM cine)
    or ``.nrrd`` (``.seq.nrrd``) recording, or a folder of images. ``fps``: the
    frame rate of recordings that carry no timing; recorded timestamps always win.
    """
    if uri == "synthetic":
        return SyntheticSource(synthetic, fps=fps)
    if uri.startswith("igtl://"):
        return IgtlSource.from_uri(uri, igtl)
    path = Path(os.path.abspath(Path(uri).expanduser()))
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder; check the path ({_EXPECTED})")
    if path.is_dir():
        return ImageFolder(path, fps=fps)
    suffix = path.suffix.lower()
    if suffix == ".nrrd":
        return NrrdSequence(path, fps=fps)
    if suffix == ".dcm":
        from daemon.acquire.dicom_cine import DicomCine  # pydicom takes ~0.1 s to import

        return DicomCine(path, fps=fps)
    if suffix not in (".mha", ".mhd"):
        hint = " (for a single image, put it in a folder)" if suffix in IMAGE_SUFFIXES else ""
        raise SourceError(f"{path}: not a recognised source{hint}; {_EXPECTED}")
    return MetaImageSequence(path, fps=fps)
