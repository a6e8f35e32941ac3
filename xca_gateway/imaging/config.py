"""``[imaging]`` configuration: the community's Imaging Document Sources, one per OID.

```toml
[imaging]
open_timeout = 30.0          # resolving a request at every source (C-FIND, QIDO-RS, RAD-69 root)
idle_timeout = 60.0          # a source silent this long mid-instance fails the response
abandon_timeout = 120.0      # sources of a response nobody reads any more are released
max_instance_bytes = 1073741824

[[imaging.sources]]          # the embedded demo: files under <data_dir>/images
repository_unique_id = "1.3.6.1.4.1.21367.13.71.1"
kind = "filesystem"
path = "images"              # relative to the data directory; this is the default

[[imaging.sources]]          # a PACS that speaks only DIMSE
repository_unique_id = "1.3.6.1.4.1.21367.13.71.2"
kind = "dimse"
host = "127.0.0.1"
port = 4242
called_ae_title = "ORTHANC"
calling_ae_title = "XCAGW"
mode = "c-get"               # or "c-move" (then also move_destination_ae_title, storage_scp_port)

[[imaging.sources]]          # a VNA with DICOMweb
repository_unique_id = "1.3.6.1.4.1.21367.13.71.3"
kind = "dicomweb"
base_url = "http://127.0.0.1:8042/dicom-web"
# ca_file, client_cert, client_key for https; headers = { authorization = "..." }

[[imaging.sources]]          # an XDS-I.b Imaging Document Source (RAD-69 over mTLS)
repository_unique_id = "1.3.6.1.4.1.21367.13.71.4"
kind = "rad69"
url = "https://pacs.example.org/xdsi/rad69"
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from xca_gateway.schema import (
    AeTitle,
    Bytes,
    Count,
    HttpsUrl,
    HttpUrl,
    NonEmpty,
    NonNegativeSeconds,
    Oid,
    PathText,
    PeerPort,
    Port,
    Range,
    Seconds,
    Section,
)
from xca_gateway.settings import ConfigError, validate_oid

KINDS = ("filesystem", "dimse", "dicomweb", "rad69")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash


@dataclass(frozen=True)
class SourceConfig:
    repository_unique_id: str
    kind: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImagingConfig:
    sources: tuple[SourceConfig, ...] = ()
    open_timeout: float = 30.0
    idle_timeout: float = 60.0
    # Release the sources of a response nobody pulls from any more; keep it above the
    # server's body_timeout (the server resets connections that stall longer than that).
    abandon_timeout: float = 120.0
    max_instance_bytes: int = 1024 * 1024 * 1024
    max_documents: int = 100_000


_SOURCE_ID = Field(
    description="repositoryUniqueId of the Imaging Document Source (RAD-69 routes by it).",
    examples=["1.3.6.1.4.1.21367.13.81.1"],
)


class FilesystemSourceSection(Section):
    """DICOM files in a directory (the embedded demo source)."""

    repository_unique_id: Oid = _SOURCE_ID
    kind: Literal["filesystem"] = Field(description="The kind of source.")
    path: PathText = Field("images", description="The directory, relative to the data directory.")
    rescan_interval: NonNegativeSeconds = Field(
        10.0, description="Seconds between two scans of the directory for new files."
    )


class DimseSourceSection(Section):
    """A PACS that speaks only DIMSE (C-FIND, then C-GET or C-MOVE)."""

    repository_unique_id: Oid = _SOURCE_ID
    kind: Literal["dimse"] = Field(description="The kind of source.")
    host: NonEmpty = Field(description="The PACS's address.", examples=["127.0.0.1"])
    port: PeerPort = Field(description="Its DICOM port.", examples=[4242])
    called_ae_title: AeTitle = Field(description="Its AE title.", examples=["ORTHANC"])
    calling_ae_title: AeTitle = Field("XCAGW", description="Our AE title towards it.")
    mode: Literal["c-get", "c-move"] = Field("c-get", description="How instances are fetched.")
    move_destination_ae_title: AeTitle | None = Field(
        None,
        description="C-MOVE: the AE title of our storage SCP, as the PACS knows it.",
        examples=["XCAGW-STORE"],
    )
    storage_scp_host: NonEmpty = Field(
        "127.0.0.1", description="C-MOVE: where our storage SCP listens."
    )
    storage_scp_port: Port = Field(0, description="C-MOVE: its port (0: any free port).")
    acse_timeout: Seconds = Field(30.0, description="Seconds for association set-up.")
    dimse_timeout: Seconds = Field(120.0, description="Seconds for a DIMSE response.")
    network_timeout: Seconds = Field(60.0, description="Seconds of network silence.")
    max_pdu: Annotated[int, Range(0)] = Field(
        0, description="Maximum PDU length we receive (0: unlimited)."
    )
    sop_classes: list[Oid] = Field(
        [], description="SOP Classes to ask for (empty: the usual storage classes)."
    )


class DicomwebSourceSection(Section):
    """A VNA or PACS with DICOMweb (QIDO-RS, WADO-RS)."""

    repository_unique_id: Oid = _SOURCE_ID
    kind: Literal["dicomweb"] = Field(description="The kind of source.")
    base_url: HttpUrl = Field(
        description="Its DICOMweb base URL.", examples=["http://127.0.0.1:8042/dicom-web"]
    )
    ca_file: PathText | None = Field(
        None, description="CAs to verify an https source with.", examples=["../certs/vna-ca.pem"]
    )
    client_cert: PathText | None = Field(
        None, description="Client certificate for it.", examples=["../certs/north.pem"]
    )
    client_key: PathText | None = Field(
        None, description="...and its key.", examples=["../certs/north.key"]
    )
    headers: dict[str, str] = Field(
        {},
        description="HTTP headers of every request (e.g. authorization).",
    )
    timeout: Seconds = Field(30.0, description="Seconds for one request.")


class Rad69SourceSection(Section):
    """An XDS-I.b Imaging Document Source (RAD-69 over mutual TLS)."""

    repository_unique_id: Oid = _SOURCE_ID
    kind: Literal["rad69"] = Field(description="The kind of source.")
    url: HttpsUrl = Field(
        description="Its RAD-69 endpoint.", examples=["https://pacs.example.org/xdsi/rad69"]
    )
    timeout: Seconds | None = Field(
        None, description="Seconds for one request (default: [outbound]).", examples=[60.0]
    )


SourceSection = Annotated[
    FilesystemSourceSection | DimseSourceSection | DicomwebSourceSection | Rad69SourceSection,
    Field(discriminator="kind"),
]


class ImagingSection(Section):
    """The community's Imaging Document Sources (RAD-69 / RAD-75), one per repositoryUniqueId,
    and the deadlines of a retrieve that streams from them."""

    sources: list[SourceSection] = Field(
        [], description="The sources; kind filesystem, dimse, dicomweb or rad69."
    )
    open_timeout: Seconds = Field(
        30.0,
        description="Seconds to resolve a request at every source (C-FIND, QIDO-RS, RAD-69 root).",
    )
    idle_timeout: Seconds = Field(
        60.0, description="A source silent this long in the middle of an instance fails it."
    )
    abandon_timeout: Seconds = Field(
        120.0,
        description=(
            "Sources of a response nobody reads any more are released after this many seconds"
            " (keep it above [server] body_timeout)."
        ),
    )
    max_instance_bytes: Bytes = Field(1024 * 1024 * 1024, description="Largest instance.")
    max_documents: Count = Field(100_000, description="Most instances of one retrieve.")


_COMMON = {"repository_unique_id", "kind"}
_ALLOWED: dict[str, set[str]] = {
    "filesystem": {"path", "rescan_interval"},
    "dimse": {
        "host",
        "port",
        "called_ae_title",
        "calling_ae_title",
        "mode",
        "move_destination_ae_title",
        "storage_scp_host",
        "storage_scp_port",
        "acse_timeout",
        "dimse_timeout",
        "network_timeout",
        "max_pdu",
        "sop_classes",
    },
    "dicomweb": {"base_url", "ca_file", "client_cert", "client_key", "headers", "timeout"},
    "rad69": {"url", "timeout"},
}
_REQUIRED: dict[str, set[str]] = {
    "filesystem": set(),
    "dimse": {"host", "port", "called_ae_title"},
    "dicomweb": {"base_url"},
    "rad69": {"url"},
}


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _ae(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{what}: {value!r} is not a DICOM AE title (1-16 characters)")
    return value.strip()


def _number(value: Any, what: str, *, integer: bool = False, minimum: float = 0) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{what} must be a {'whole ' if integer else ''}number >= {minimum}")
    return value


def _source(entry: Any, index: int, base_dir: Path, data_dir: Path) -> SourceConfig:
    where = f"imaging.sources[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    repository = entry.get("repository_unique_id")
    if not isinstance(repository, str):
        raise ConfigError(f"{where}.repository_unique_id is required")
    validate_oid(repository, f"{where}.repository_unique_id")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(KINDS)}")
    unknown = set(entry) - _COMMON - _ALLOWED[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) for kind {kind}: {', '.join(sorted(unknown))}")
    missing = _REQUIRED[kind] - set(entry)
    if missing:
        raise ConfigError(f"{where}: kind {kind} needs {', '.join(sorted(missing))}")
    settings: dict[str, Any] = {k: v for k, v in entry.items() if k not in _COMMON}
    if kind == "filesystem":
        settings["path"] = (
            _path(data_dir, settings["path"], f"{where}.path")
            if "path" in settings
            else data_dir / "images"
        )
    elif kind == "dimse":
        if not isinstance(settings["host"], str):
            raise ConfigError(f"{where}.host must be a string")
        _number(settings["port"], f"{where}.port", integer=True, minimum=1)
        settings["called_ae_title"] = _ae(settings["called_ae_title"], f"{where}.called_ae_title")
        for key in ("calling_ae_title", "move_destination_ae_title"):
            if key in settings:
                settings[key] = _ae(settings[key], f"{where}.{key}")
        mode = settings.get("mode", "c-get")
        if mode not in ("c-get", "c-move"):
            raise ConfigError(f'{where}.mode must be "c-get" or "c-move"')
        if mode == "c-move" and "move_destination_ae_title" not in settings:
            raise ConfigError(f"{where}: c-move needs move_destination_ae_title")
        for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
            if key in settings:
                _number(settings[key], f"{where}.{key}", minimum=0.1)
        classes = settings.get("sop_classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ConfigError(f"{where}.sop_classes must be a list of SOP Class UIDs")
        for uid in classes:
            validate_oid(uid, f"{where}.sop_classes")
    elif kind == "dicomweb":
        url = settings["base_url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url must be an http(s) URL")
        for key in ("ca_file", "client_cert", "client_key"):
            if key in settings:
                settings[key] = _path(base_dir, settings[key], f"{where}.{key}")
        headers = settings.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(f"{where}.headers must be a table of strings")
    elif kind == "rad69":
        url = settings["url"]
        if not isinstance(url, str) or not url.startswith("https://"):
            raise ConfigError(f"{where}.url must be an https URL (RAD-69 runs over mutual TLS)")
    if "timeout" in settings:
        _number(settings["timeout"], f"{where}.timeout", minimum=0.1)
    return SourceConfig(repository, kind, settings)


def parse_imaging_config(table: dict[str, Any], base_dir: Path, data_dir: Path) -> ImagingConfig:
    """Validate the ``[imaging]`` table (relative paths: files against ``base_dir``, the
    filesystem source's ``path`` against ``data_dir``)."""
    if not isinstance(table, dict):
        raise ConfigError("[imaging] must be a table")
    known = {
        "sources",
        "open_timeout",
        "idle_timeout",
        "abandon_timeout",
        "max_instance_bytes",
        "max_documents",
    }
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[imaging] unknown key(s): {', '.join(sorted(unknown))}")
    raw = table.get("sources", [])
    if not isinstance(raw, list):
        raise ConfigError("[[imaging.sources]] must be an array of tables")
    sources = tuple(_source(entry, i, base_dir, data_dir) for i, entry in enumerate(raw))
    seen: set[str] = set()
    for source in sources:
        if source.repository_unique_id in seen:
            raise ConfigError(f"duplicate imaging source {source.repository_unique_id}")
        seen.add(source.repository_unique_id)
    config = ImagingConfig(sources=sources)
    values: dict[str, Any] = {}
    for key in ("open_timeout", "idle_timeout", "abandon_timeout"):
        if key in table:
            values[key] = float(_number(table[key], f"imaging.{key}", minimum=0.1))
    for key in ("max_instance_bytes", "max_documents"):
        if key in table:
            values[key] = _number(table[key], f"imaging.{key}", integer=True, minimum=1)
    return ImagingConfig(sources=config.sources, **values)
