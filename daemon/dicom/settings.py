"""The ``[dicom]`` settings: the node's AE, who may send to it, routing rules, destinations."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _ae_title(value: str) -> str:
    """A DICOM AE title: 1 to 16 printable ASCII characters, no backslash."""
    if not 1 <= len(value.strip()) <= 16 or len(value) > 16:
        raise ValueError("an AE title is 1 to 16 characters")
    if not value.isascii() or not value.isprintable() or "\\" in value:
        raise ValueError("an AE title is printable ASCII without a backslash")
    return value.strip()


def _network(value: str) -> str:
    ipaddress.ip_network(value, strict=False)  # ValueError names the problem
    return value


AeTitle = Annotated[str, AfterValidator(_ae_title)]
Network = Annotated[str, AfterValidator(_network)]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DicomTls(_Settings):
    enabled: bool = Field(False, description="TLS on the SCP (destinations: their own tls)")
    cert_file: str = Field(
        "", description="this node's certificate (PEM): the SCP's, and the client's at sends"
    )
    key_file: str = Field("", description="its private key (PEM)")
    ca_file: str = Field(
        "",
        description="CA certificates (PEM) that peers' certificates are checked against; "
        "set, the SCP also requires a client certificate",
    )


class DicomRoute(_Settings):
    """A series matching every non-empty pattern (shell-style, case-insensitive) gets a job."""

    modality: str = Field("", description="e.g. 'CT'")
    body_part: str = Field("", description="Body Part Examined, e.g. 'CHEST'")
    series_description: str = Field("", description="e.g. '*lung*'")
    calling_ae: str = Field("", description="the sender's AE title, e.g. 'CT01'")
    kind: str = Field(min_length=1, description="the job kind: ct, echo-volume, ...")
    model: str = Field("", description="model file; empty: the kind's own")
    options: dict[str, Any] = Field(default_factory=dict, description="the kind's options")
    send: list[str] = Field(
        default_factory=list, description="destination names for the results; empty: all"
    )


class DicomDestination(_Settings):
    name: str = Field(min_length=1, max_length=64, description="used in routes and status")
    ae_title: AeTitle = Field(description="the destination's AE title")
    host: str = Field(min_length=1, description="its address")
    port: int = Field(ge=1, le=65535, description="its port")
    tls: bool = Field(False, description="connect with TLS ([dicom.tls])")


class DicomConfig(_Settings):
    enabled: bool = Field(False, description="run the DICOM node (C-STORE/C-ECHO SCP, sends)")
    ae_title: AeTitle = Field("ECHOD", description="this node's AE title (callers must use it)")
    host: str = Field(
        "127.0.0.1", description="interface to listen on ('0.0.0.0': all; see allowed_hosts)"
    )
    port: int = Field(11112, ge=0, le=65535, description="DICOM port (0: any free one, logged)")
    allowed_aes: list[AeTitle] = Field(
        default_factory=list,
        description="calling AE titles accepted; empty: any (a warning at start)",
    )
    allowed_hosts: list[Network] = Field(
        default_factory=list,
        description="peer addresses or networks (CIDR) accepted; empty: any",
    )
    max_associations: int = Field(8, ge=1, le=256, description="associations served at once")
    quiet_s: float = Field(
        10.0, gt=0, description="a series is complete after this long without a new instance"
    )
    max_storage_gb: float = Field(
        20.0,
        gt=0,
        description="received series kept at most; the oldest completed studies go first, "
        "and instances are refused (out of resources) while nothing can go",
    )
    timeout_s: float = Field(30.0, gt=0, description="network, ACSE and DIMSE timeouts")
    send_attempts: int = Field(20, ge=1, description="tries of a send before it is marked failed")
    retry_s: float = Field(5.0, gt=0, description="wait before the first retry (then doubled)")
    retry_max_s: float = Field(600.0, gt=0, description="longest wait between tries")
    routes: list[DicomRoute] = Field(
        default_factory=list,
        description="routing rules, first match wins, as [[dicom.routes]] tables "
        "(modality, body_part, series_description, calling_ae, kind, model, options, send)",
    )
    destinations: list[DicomDestination] = Field(
        default_factory=list,
        description="where results go, as [[dicom.destinations]] tables "
        "(name, ae_title, host, port, tls)",
    )
    tls: DicomTls = Field(default_factory=DicomTls)

    @model_validator(mode="after")
    def _names(self) -> DicomConfig:
        names = [d.name for d in self.destinations]
        twice = {n for n in names if names.count(n) > 1}
        if twice:
            raise ValueError(f"destination names must be unique: {', '.join(sorted(twice))}")
        for i, route in enumerate(self.routes):
            unknown = [n for n in route.send if n not in names]
            if unknown:
                raise ValueError(
                    f"routes[{i}].send names no destination {', '.join(unknown)} "
                    f"(destinations: {', '.join(names) or 'none'})"
                )
        if self.tls.enabled and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        return self
