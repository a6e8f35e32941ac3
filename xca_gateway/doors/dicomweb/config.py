"""The ``[dicomweb]`` configuration table of the DICOMweb front door, validated.

Pure: a dict from the TOML file in, a frozen :class:`DicomWebFrontConfig` or a
:class:`ConfigError` out. Plain HTTP is refused except on a loopback host (ATNA ITI-19).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from xca_gateway.schema import Count, HttpUrl, NonEmpty, Port, Seconds, Section
from xca_gateway.settings import is_loopback_host

DEFAULT_PORT = 8444


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DicomWebFrontConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Mutual TLS with the gateway's certificate and trust store (ATNA ITI-19); plain HTTP only
    # on loopback, e.g. behind a TLS-terminating proxy on the same host.
    tls: bool = True
    # Base of the RetrieveURLs in QIDO-RS answers (default: https://host:port as bound; set it
    # when clients reach the door under another name, e.g. when bound to 0.0.0.0).
    public_base_url: str | None = None
    # Most matches one QIDO-RS answer carries (limit/offset page through the rest).
    max_results: int = 1000
    # How long a caller may name a study its own search found by UID alone (WADO-RS, QIDO-RS
    # below a study); other callers, or later, must name the patient.
    study_access_seconds: float = 3600.0


class DicomWebSection(Section):
    """The DICOMweb front door: QIDO-RS / WADO-RS over the federation (mutual TLS with
    [tls]). Only callers with the local-consumer role in [policy] pass (403 and a Security
    Alert else)."""

    host: NonEmpty = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(DEFAULT_PORT, description="TCP port (0: any free port).")
    tls: bool = Field(True, description="Mutual TLS; false only on a loopback address.")
    public_base_url: HttpUrl | None = Field(
        None,
        description="Base of the RetrieveURLs in QIDO-RS answers (default: https://host:port).",
        examples=["https://gw.north.example.org:8444/dicomweb"],
    )
    max_results: Count = Field(
        1000, description="Most matches one QIDO-RS answer carries (limit/offset page on)."
    )
    study_access_seconds: Seconds = Field(
        3600.0,
        description=(
            "How long a caller's search lets it name a study it found by UID alone (WADO-RS);"
            " others, or later, must name the patient."
        ),
    )


def parse_dicomweb_front_config(
    table: dict[str, Any], base_dir: Path | None = None
) -> DicomWebFrontConfig:
    """Validate the ``[dicomweb]`` table (``base_dir`` is unused: no paths in it)."""
    known = {"host", "port", "tls", "public_base_url", "max_results", "study_access_seconds"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[dicomweb]: unknown key(s) {', '.join(sorted(unknown))}")
    host = table.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError("dicomweb.host must be a host name or address")
    port = table.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("dicomweb.port must be a TCP port number (0 = any free port)")
    tls = table.get("tls", True)
    if not isinstance(tls, bool):
        raise ConfigError("dicomweb.tls must be true or false")
    if not tls and not is_loopback_host(host):
        raise ConfigError(
            f"dicomweb.tls = false is only allowed on a loopback host (127.0.0.1, localhost), "
            f"not {host!r}: images and patient data need mutual TLS (ATNA ITI-19)"
        )
    base = table.get("public_base_url")
    if base is not None and (
        not isinstance(base, str) or not re.match(r"^https?://[^/\s]+(/\S*)?$", base)
    ):
        raise ConfigError("dicomweb.public_base_url must be an http(s) URL")
    max_results = table.get("max_results", 1000)
    if not isinstance(max_results, int) or isinstance(max_results, bool) or max_results < 1:
        raise ConfigError("dicomweb.max_results must be a positive integer")
    access = table.get("study_access_seconds", 3600.0)
    if isinstance(access, bool) or not isinstance(access, int | float) or access <= 0:
        raise ConfigError("dicomweb.study_access_seconds must be a positive number of seconds")
    return DicomWebFrontConfig(
        host=host,
        port=port,
        tls=tls,
        public_base_url=base.rstrip("/") if base else None,
        max_results=max_results,
        study_access_seconds=float(access),
    )
