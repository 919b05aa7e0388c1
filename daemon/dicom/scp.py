"""The node's SCP: C-STORE (every storage SOP class, every transfer syntax) and C-ECHO.

An association is refused, and logged, when the peer's address is not on
``allowed_hosts`` (the connection is closed before any PDU), when its calling AE
title is not on ``allowed_aes``, or when it does not call this node's AE title
(A-ASSOCIATE-RJ). An instance is written to the store before it is acknowledged;
one the store cannot take gets a failure status the sender retries on (out of
resources), one without its identifying UIDs is refused (0xA900).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socketserver
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from daemon.dicom.settings import DicomConfig
from daemon.dicom.store import UID, Instance, StorageFull
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_MATCHING = 0xA900  # "data set does not match SOP class": no usable UIDs

Receive = Callable[[Instance, bytes, str, str], str]


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with a check of the peer's address before anything is read."""

    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    refused: Callable[[str], None]
    daemon_threads = True
    block_on_close = False

    def shutdown(self) -> None:
        """Stop serving (pynetdicom's own also unregisters from ``AE.start_server``)."""
        socketserver.BaseServer.shutdown(self)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed:
            return True
        host = str(client_address[0])
        address = ipaddress.ip_address(host)
        if any(address in net for net in self.allowed):
            return True
        self.refused(host)
        return False


class Scp:
    """Serves ``settings`` until :meth:`close`; ``receive`` stores an instance."""

    def __init__(self, settings: DicomConfig, receive: Receive) -> None:
        self.settings = settings
        self.receive = receive
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        ae = AE(ae_title=settings.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(settings.allowed_aes)
        ae.require_called_aet = True
        ae.maximum_associations = settings.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
        self.ae = ae
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ABORTED, lambda event: self._count("aborted")),
        ]
        try:
            server = ae.make_server(
                (settings.host, settings.port),
                ssl_context=self._ssl_context(),
                evt_handlers=handlers,
                server_class=_Server,
            )
        except OSError as e:
            raise ConfigError(
                f"DICOM port {settings.host}:{settings.port} cannot be used ({e.strerror}): "
                "set dicom.host and dicom.port to a free one"
            ) from None
        assert isinstance(server, _Server)
        server.allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_hosts]
        server.refused = self._host_refused
        self.server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="echod-dicom-scp",
            daemon=True,
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if not tls.enabled:
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file or None)
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"dicom.tls: {e}: check cert_file, key_file and ca_file") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.ca_file else ssl.CERT_NONE
        return ctx

    def start(self) -> None:
        self._thread.start()
        tls = " (TLS)" if self.settings.tls.enabled else ""
        log.info(
            "DICOM node %s on %s:%d%s", self.settings.ae_title, self.settings.host, self.port, tls
        )
        if not self.settings.allowed_aes:
            log.warning("dicom.allowed_aes is empty: any calling AE title is accepted")

    def close(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        for assoc in self.server.active_associations:
            assoc.abort()
        self.server.server_close()

    def active(self) -> int:
        return len(self.server.active_associations)

    def snapshot(self) -> dict[str, int]:
        """Associations accepted, rejected, aborted; instances stored."""
        with self._lock:
            return dict(self.counts)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    # -- events (association threads) ------------------------------------------------

    def _host_refused(self, host: str) -> None:
        self._count("rejected")
        log.warning("DICOM association from %s refused: not in dicom.allowed_hosts", host)

    def _accepted(self, event: Any) -> None:
        self._count("accepted")
        peer = event.assoc.requestor
        log.info("DICOM association from %s (%s) accepted", peer.ae_title, peer.address)

    def _rejected(self, event: Any) -> None:
        self._count("rejected")
        peer = event.assoc.requestor
        allowed = self.ae.require_calling_aet
        why = (
            f"calling AE title {peer.ae_title!r} is not in dicom.allowed_aes"
            if allowed and peer.ae_title not in allowed
            else f"it did not call {self.settings.ae_title!r}, or too many associations"
        )
        log.warning("DICOM association from %s refused: %s", peer.address, why)

    def _store(self, event: Any) -> int:
        ds = event.dataset
        try:
            inst = Instance(
                sop=str(ds.SOPInstanceUID),
                series=str(ds.SeriesInstanceUID),
                study=str(ds.StudyInstanceUID),
                modality=str(ds.get("Modality", "") or ""),
                body_part=str(ds.get("BodyPartExamined", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
            )
        except AttributeError as e:
            log.warning("C-STORE refused: %s", e)
            return NOT_MATCHING
        if not all(UID.match(u) and len(u) <= 64 for u in (inst.sop, inst.series, inst.study)):
            log.warning("C-STORE refused: malformed UID in %s", inst)
            return NOT_MATCHING
        peer = event.assoc.requestor
        try:
            self.receive(
                inst, event.encoded_dataset(include_meta=True), peer.ae_title, peer.address
            )
        except StorageFull as e:
            log.error("C-STORE from %s refused: %s: raise dicom.max_storage_gb", peer.ae_title, e)
            return OUT_OF_RESOURCES
        except OSError as e:
            log.error("C-STORE from %s refused: cannot write: %s", peer.ae_title, e)
            return OUT_OF_RESOURCES
        self._count("instances")
        return SUCCESS
