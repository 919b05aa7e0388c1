"""Results out: C-STORE SCU to a destination, and PNG results as DICOM Secondary Capture.

:func:`store_files` sends a job's files to one destination over one association
and says, per file, whether it was stored or why not; nothing here retries (the
node schedules retries). Which files are sent is decided by their content, not by
the job kind: a DICOM file (``DICM`` after the preamble: a CT job's SEG) as it is,
a PNG as a Secondary Capture in the study of the series it came from.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE

from daemon.dicom.settings import DicomConfig, DicomDestination

log = logging.getLogger(__name__)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
SUCCESS_OR_WARNING = (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB007, 0xB006)
SC_SERIES_NUMBER = 9901  # the series results converted to Secondary Capture go in


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: the ``DICM`` prefix after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def store_files(
    settings: DicomConfig, dest: DicomDestination, files: list[Path]
) -> tuple[bool, dict[Path, str | None]]:
    """C-STORE ``files`` to ``dest`` in one association: whether it was established, and
    per file None (stored) or why it was not (one line)."""
    outcome: dict[Path, str | None] = {}
    datasets: list[tuple[Path, Dataset]] = []
    for path in files:
        try:
            datasets.append((path, dcmread(path)))
        except (OSError, InvalidDicomError) as e:
            outcome[path] = f"cannot read {path.name}: {e}"
    if not datasets:
        return False, outcome
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
    ae.connection_timeout = settings.timeout_s
    for sop_class, syntax in sorted(
        {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for _, ds in datasets}
    ):
        offered = [syntax] + [s for s in UNCOMPRESSED if s != syntax and syntax in UNCOMPRESSED]
        ae.add_requested_context(sop_class, offered)
    tls = (_client_context(settings), dest.host) if dest.tls else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        # pynetdicom reports a refused or timed-out connection as an abort
        why = "association rejected" if assoc.is_rejected else "cannot connect, or aborted"
        reason = f"{why} by {dest.ae_title} at {dest.host}:{dest.port}"
        return False, {**outcome, **{p: reason for p, _ in datasets}}
    try:
        for path, ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code in SUCCESS_OR_WARNING:
                outcome[path] = None
            elif code is None:
                outcome[path] = "no answer to the C-STORE (connection lost or timed out)"
            else:
                outcome[path] = f"C-STORE of {path.name} answered status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    return True, outcome


def _client_context(settings: DicomConfig) -> ssl.SSLContext:
    tls = settings.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def secondary_capture(png: Path, reference: Path, out: Path, seed: str) -> Path:
    """``png`` as a Secondary Capture image in the study (patient, study) of the instance
    ``reference``; UIDs derive from ``seed`` and the name, so a retry writes the same."""
    import cv2
    import highdicom as hd

    pixels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError(f"{png.name} is not an image OpenCV reads")
    if pixels.ndim == 3:
        code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
        pixels = cv2.cvtColor(pixels, code)
    photometric = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    ref = dcmread(reference, stop_before_pixels=True)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation=photometric,
        bits_allocated=8 if pixels.dtype == np.uint8 else 16,
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        series_instance_uid=generate_uid(entropy_srcs=[seed, "series"]),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[seed, png.name]),
        instance_number=1,
        manufacturer="echod",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = f"echod {png.stem}"
    out.parent.mkdir(parents=True, exist_ok=True)
    sc.save_as(out, enforce_file_format=True)
    return out
