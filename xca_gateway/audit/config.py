"""``[audit]`` configuration: the spool and the audit record repositories to send to.

Example::

    [audit]
    audit_source_id = "alpha-gateway"
    enterprise_site_id = "1.3.6.1.4.1.21367.13.70.1"
    spool_dir = "data/audit-spool"        # default: <storage.data_dir>/audit-spool
    max_spool_bytes = 1073741824
    warn_spool_bytes = 858993459         # default: 80 % of max_spool_bytes

    [[audit.destinations]]
    name = "arr"
    transport = "tls"                    # RFC 5425; "udp" for RFC 5426
    host = "arr.example.org"
    port = 6514
    # certificate / private_key / trust_store default to the gateway's [tls] files
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from xca_gateway.audit.spool import DESTINATION_NAME
from xca_gateway.schema import (
    Bytes,
    Count,
    Matches,
    NonEmpty,
    NonNegativeSeconds,
    PathText,
    PeerPort,
    Seconds,
    Section,
)
from xca_gateway.settings import ConfigError, TlsConfig

DEFAULT_PORTS = {"tls": 6514, "udp": 514}


@dataclass(frozen=True)
class AuditDestination:
    name: str
    transport: Literal["tls", "udp"]
    host: str
    port: int
    # TLS only. The certificate and key we present (mutual TLS) and the CAs we trust.
    certificate: Path | None = None
    private_key: Path | None = None
    trust_store: Path | None = None
    # Name checked against the repository's certificate (default: host).
    server_name: str | None = None
    check_hostname: bool = True
    minimum_version: str = "1.2"
    ciphers: str | None = None
    connect_timeout: float = 5.0
    # A write that the repository does not take within this time counts as a broken connection.
    write_timeout: float = 30.0


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool
    spool_dir: Path
    destinations: tuple[AuditDestination, ...] = ()
    max_spool_bytes: int = 1024 * 1024 * 1024
    warn_spool_bytes: int | None = None
    segment_bytes: int = 16 * 1024 * 1024
    app_name: str = "xca-gateway"
    audit_source_id: str = field(default_factory=socket.gethostname)
    enterprise_site_id: str | None = None
    # Syslog HOSTNAME and this system's NetworkAccessPointID.
    hostname: str = field(default_factory=socket.gethostname)
    # Records waiting for the writer thread; record() blocks at most queue_block_seconds when
    # it is full, then drops (counted, logged).
    queue_size: int = 10000
    queue_block_seconds: float = 1.0
    # Records written to a TLS connection count as delivered once the connection has stayed
    # healthy this long afterwards (no application-level acks in RFC 5425).
    ack_delay: float = 0.5
    ack_persist_interval: float = 0.5
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    # On stop, how long to keep sending what is spooled before leaving it for the next start.
    drain_timeout: float = 5.0
    # Security Alerts of one kind from one source within this many seconds become one record
    # and, when the window closes, one more carrying the count of the others (0: one record per
    # alert). A flood of refused connections cannot fill the spool or the repositories.
    alert_window: float = 60.0

    @property
    def effective_warn_bytes(self) -> int:
        if self.warn_spool_bytes is not None:
            return self.warn_spool_bytes
        return self.max_spool_bytes * 8 // 10


class AuditDestinationSection(Section):
    """An audit record repository (ATNA ITI-20) to send every record to."""

    name: (
        Annotated[
            str, Matches(DESTINATION_NAME.pattern.strip("^$"), "letters, digits, '.', '_' or '-'")
        ]
        | None
    ) = Field(
        None,
        description="Its name in metrics and the spool (default: arr1, arr2, ...).",
        examples=["arr"],
    )
    transport: Literal["tls", "udp"] = Field(
        "tls", description="tls: RFC 5425 (mutual TLS, our [tls] certificate); udp: RFC 5426."
    )
    host: NonEmpty = Field(description="Its address.", examples=["arr.example.org"])
    port: PeerPort | None = Field(
        None, description="Its port (default: 6514 for tls, 514 for udp).", examples=[6514]
    )
    certificate: PathText | None = Field(
        None, description="TLS: our certificate (default: [tls]).", examples=["../certs/north.pem"]
    )
    private_key: PathText | None = Field(
        None, description="TLS: its key (default: [tls]).", examples=["../certs/north.key"]
    )
    trust_store: PathText | None = Field(
        None,
        description="TLS: CAs of the repository (default: [tls]).",
        examples=["../certs/ca.pem"],
    )
    server_name: NonEmpty | None = Field(
        None,
        description="Name checked against the repository's certificate (default: host).",
        examples=["arr.example.org"],
    )
    check_hostname: bool = Field(True, description="Check that name.")
    minimum_version: Literal["1.2", "1.3"] | None = Field(
        None, description="TLS: lowest version (default: [tls]).", examples=["1.2"]
    )
    ciphers: NonEmpty | None = Field(
        None,
        description="TLS: OpenSSL names of the TLS 1.2 suites (default: [tls]).",
        examples=["ECDHE-RSA-AES128-GCM-SHA256"],
    )
    connect_timeout: Seconds = Field(5.0, description="Seconds to connect.")
    write_timeout: Seconds = Field(
        30.0,
        description="A write the repository does not take within this time breaks the connection.",
    )


class AuditSection(Section):
    """ATNA (ITI-20): every transaction, both sides, as DICOM audit messages over syslog.
    Records go through a durable spool first and are replayed when a repository comes back."""

    enabled: bool | None = Field(
        None,
        description="Send audit records (default: when destinations are given).",
        examples=[True],
    )
    destinations: list[AuditDestinationSection] = Field(
        [], description="The audit record repositories."
    )
    spool_dir: PathText | None = Field(
        None,
        description="The spool (default: <data_dir>/audit-spool).",
        examples=["../data/north/audit-spool"],
    )
    max_spool_bytes: Bytes = Field(
        1024 * 1024 * 1024, description="Most bytes spooled; beyond, records are dropped (counted)."
    )
    warn_spool_bytes: Bytes | None = Field(
        None,
        description="Spool alarm threshold (default: 80 % of max_spool_bytes).",
        examples=[858993459],
    )
    segment_bytes: Bytes | None = Field(
        None,
        description=(
            "Bytes of one spool segment, at most a quarter of max_spool_bytes (default:"
            " max_spool_bytes / 8, 64 KiB..16 MiB)."
        ),
        examples=[16 * 1024 * 1024],
    )
    app_name: NonEmpty = Field("xca-gateway", description="Syslog APP-NAME.")
    audit_source_id: NonEmpty | None = Field(
        None,
        description="AuditSourceIdentification of our records (default: this host's name).",
        examples=["north-gateway"],
    )
    enterprise_site_id: NonEmpty | None = Field(
        None, description="AuditEnterpriseSiteID.", examples=["1.3.6.1.4.1.21367.13.70.1"]
    )
    hostname: NonEmpty | None = Field(
        None,
        description="Syslog HOSTNAME and our NetworkAccessPointID (default: this host's name).",
        examples=["gw.north.example.org"],
    )
    queue_size: Count = Field(10000, description="Records waiting for the writer thread.")
    queue_block_seconds: Seconds = Field(
        1.0, description="A full queue blocks a record this long, then drops it (counted)."
    )
    ack_delay: Seconds = Field(
        0.5,
        description=(
            "Records written to a TLS connection count as delivered once it has stayed healthy"
            " this long (RFC 5425 has no acknowledgements)."
        ),
    )
    ack_persist_interval: Seconds = Field(
        0.5, description="Seconds between two writes of the delivered mark."
    )
    reconnect_min: Seconds = Field(0.5, description="First delay before reconnecting.")
    reconnect_max: Seconds = Field(30.0, description="Longest delay before reconnecting.")
    drain_timeout: Seconds = Field(
        5.0,
        description=(
            "On stop, seconds to send what is spooled before leaving it for the next start."
        ),
    )
    alert_window: NonNegativeSeconds = Field(
        60.0,
        description=(
            "Security Alerts of one kind from one source within this many seconds are one record,"
            " plus one with the count of the others when the window closes (0: one per alert)."
        ),
    )


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _positive(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{what} must be a positive number")


def _destination(raw: Any, index: int, base_dir: Path, tls: TlsConfig) -> AuditDestination:
    if not isinstance(raw, dict):
        raise ConfigError("[[audit.destinations]] must be an array of tables")
    table = dict(raw)
    where = f"audit.destinations[{index}]"
    known = {f.name for f in fields(AuditDestination)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[{where}] unknown key(s): {', '.join(sorted(unknown))}")
    name = table.get("name", f"arr{index + 1}")
    if not isinstance(name, str) or not DESTINATION_NAME.match(name):
        raise ConfigError(f"[{where}] name must be letters, digits, '.', '_' or '-'")
    table["name"] = name
    transport = table.get("transport", "tls")
    if transport not in ("tls", "udp"):
        raise ConfigError(f'[{where}] transport must be "tls" (RFC 5425) or "udp" (RFC 5426)')
    table["transport"] = transport
    if not isinstance(table.get("host"), str) or not table["host"]:
        raise ConfigError(f"[{where}] host is required")
    port = table.setdefault("port", DEFAULT_PORTS[transport])
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"[{where}] port must be 1..65535")
    for key in ("connect_timeout", "write_timeout"):
        if key in table:
            _positive(table[key], f"{where}.{key}")
    if transport == "tls":
        defaults = {
            "certificate": tls.certificate,
            "private_key": tls.private_key,
            "trust_store": tls.trust_store,
        }
        for key, default in defaults.items():
            table[key] = _path(base_dir, table[key], f"{where}.{key}") if key in table else default
        table.setdefault("minimum_version", tls.minimum_version)
        table.setdefault("ciphers", tls.ciphers)
        if table["minimum_version"] not in ("1.2", "1.3"):
            raise ConfigError(f'[{where}] minimum_version must be "1.2" or "1.3"')
    try:
        return AuditDestination(**table)
    except TypeError as exc:
        raise ConfigError(f"[{where}] {exc}") from None


def parse_audit_config(
    table: dict[str, Any], base_dir: Path, data_dir: Path, tls: TlsConfig
) -> AuditConfig:
    """Build the audit configuration from the TOML ``[audit]`` table (may be empty: then
    auditing is off unless ``enabled = true`` and destinations are given)."""
    if not isinstance(table, dict):
        raise ConfigError("[audit] must be a table")
    data = dict(table)
    known = {f.name for f in fields(AuditConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"[audit] unknown key(s): {', '.join(sorted(unknown))}")
    raw_destinations = data.pop("destinations", [])
    if not isinstance(raw_destinations, list):
        raise ConfigError("[[audit.destinations]] must be an array of tables")
    destinations = tuple(
        _destination(raw, i, base_dir, tls) for i, raw in enumerate(raw_destinations)
    )
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError("[[audit.destinations]] names must be unique")
    enabled = data.pop("enabled", bool(destinations))
    if not isinstance(enabled, bool):
        raise ConfigError("audit.enabled must be true or false")
    if enabled and not destinations:
        raise ConfigError("[audit] is enabled but has no [[audit.destinations]]")
    spool_dir = (
        _path(base_dir, data.pop("spool_dir"), "audit.spool_dir")
        if "spool_dir" in data
        else data_dir / "audit-spool"
    )
    for key in (
        "max_spool_bytes",
        "segment_bytes",
        "queue_size",
        "queue_block_seconds",
        "ack_delay",
        "ack_persist_interval",
        "reconnect_min",
        "reconnect_max",
        "drain_timeout",
    ):
        if key in data:
            _positive(data[key], f"audit.{key}")
    window = data.get("alert_window", 0)
    if isinstance(window, bool) or not isinstance(window, int | float) or window < 0:
        raise ConfigError("audit.alert_window must be a number of seconds (0: no aggregation)")
    for key in ("app_name", "audit_source_id", "enterprise_site_id", "hostname"):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise ConfigError(f"audit.{key} must be a non-empty string")
    if "segment_bytes" not in data and "max_spool_bytes" in data:
        # Several segments within the bound, so that acknowledged ones can be deleted.
        data["segment_bytes"] = max(64 * 1024, min(16 * 1024 * 1024, data["max_spool_bytes"] // 8))
    try:
        config = AuditConfig(
            enabled=enabled, spool_dir=spool_dir, destinations=destinations, **data
        )
    except TypeError as exc:
        raise ConfigError(f"[audit] {exc}") from None
    warn = config.effective_warn_bytes
    if not 0 < warn < config.max_spool_bytes:
        raise ConfigError("audit.warn_spool_bytes must be below audit.max_spool_bytes")
    if config.segment_bytes * 4 > config.max_spool_bytes:
        raise ConfigError("audit.segment_bytes must be at most a quarter of max_spool_bytes")
    if config.reconnect_min > config.reconnect_max:
        raise ConfigError("audit.reconnect_min must not exceed audit.reconnect_max")
    return config
