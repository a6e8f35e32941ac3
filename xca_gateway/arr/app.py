"""The embedded Audit Record Repository as a service: configuration, composition, CLI.

One process runs the syslog-TLS and syslog-UDP receivers, the ingest thread and store, and one
HTTPS server with the ITI-81 FHIR API under ``/fhir`` and the officers' review UI elsewhere.

Officers' browsers and machines are told apart when ``[arr.https] ui_port`` is set: the review
UI then has a listener of its own that asks for no client certificate (officers sign in; the
same TLS floor and ciphers), where a browser that drops a handshake (it does not trust the
certificate yet, or speculates) is counted, not reported as a failed node authentication; the
``[arr.https] port`` listener then requires a certificate (ITI-19): the ITI-81 API for audit
consumers, and the UI for officers who sign in with theirs. Without ``ui_port`` one listener
serves both and asks for a certificate without requiring one. ``[arr.admin]`` (plain HTTP, for
loopback) serves ``/metrics`` (Prometheus) and ``/healthz``.

Example ``arr.toml``::

    [arr]
    database = "data/arr.sqlite3"          # or: postgresql = "postgresql://..."
    audit_source_id = "arr.example.org"
    xref_csv = "xref.csv"                 # optional: one person's ids across communities

    [arr.tls]                              # the repository's certificate (mutual TLS, ITI-19)
    certificate = "certs/arr.pem"
    private_key = "certs/arr.key"
    trust_store = "certs/ca.pem"

    [arr.syslog]
    tls_port = 6514                        # 0 = any free port; tls_enabled = false: off
    udp_enabled = false                    # RFC 5426 UDP: off unless enabled, and then only
    udp_port = 514                         #   from addresses listed for an audit source
    max_message_bytes = 262144
    max_connections_per_sender = 64        # connections from one address, refused at accept
    frame_timeout = 30.0                   # a frame, once begun, must be complete within it

    [arr.https]
    port = 8443                            # machines (mutual TLS): ITI-81, certificate sign-in
    ui_port = 8444                         # officers' browsers: no client certificate asked

    [arr.admin]                            # optional: /metrics and /healthz over plain HTTP
    port = 9464

    [arr.communities]                      # display names in the UI
    "urn:oid:1.3.6.1.4.1.21367.13.70.1" = "north"

    [[arr.access.callers]]                 # deny by default: who may send and search
    name = "north gateway"
    roles = ["audit-source"]
    certificate_dns_names = ["north.example.org"]
    audit_source_ids = ["north-gateway"]   # what it may report as (else: flagged)

    [[arr.access.callers]]
    name = "SIEM"
    roles = ["audit-consumer"]             # ITI-81 and raw messages
    certificate_fingerprints = ["3f9a..."]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import getpass
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xca_gateway.arr.access import (
    ArrAccess,
    SenderGrant,
    access_toml,
    parse_access,
    sender_label,
)
from xca_gateway.arr.fhir import (
    FHIR_JSON,
    FhirError,
    audit_event,
    capability_statement,
    operation_outcome,
    parse_search,
    search_bundle,
)
from xca_gateway.arr.parse import AuditRecord, Transport
from xca_gateway.arr.receiver import (
    Counters,
    Ingestor,
    ReceiverLimits,
    SenderLimits,
    SyslogTlsServer,
    SyslogUdpServer,
)
from xca_gateway.arr.store import AuditStore, open_store
from xca_gateway.arr.web import (
    SESSION_COOKIE,
    PatientXref,
    ReviewUI,
    SelfAudit,
    UiSettings,
    new_officer,
    request_cookies,
)
from xca_gateway.audit.messages import security_alert_node_authentication
from xca_gateway.protocol.http_server import HttpServer, Request, Response, ServerTimeouts
from xca_gateway.protocol.tls import (
    HandshakeFailure,
    certificate_info,
    enable_certificate_capture,
    server_context,
)
from xca_gateway.security.callers import (
    AccessDecision,
    CallerRule,
    Door,
    Identity,
    Role,
    decide,
)
from xca_gateway.security.dev_pki import CertPair, DevPki, issue_client_certificate
from xca_gateway.security.guard import DoorGuard, access_denied_message, identity_from_peer
from xca_gateway.settings import ConfigError, TlsConfig

log = logging.getLogger(__name__)

# ITI-81 totals: ordinary searches count matches up to _ESTIMATE_CAP (a quick answer for the
# UI); _summary=count and _total=accurate count exactly (bounded, to keep a query finite).
_ESTIMATE_CAP = 10_000
_EXACT_COUNT_CAP = 1_000_000_000

# Same convention as ``xca-gateway serve``: sockets bound by a launcher, e.g.
# ``https=3,syslog-tls=4,syslog-udp=5``.
LISTEN_FDS_ENV = "XCA_GATEWAY_LISTEN_FDS"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class ArrConfig:
    tls: TlsConfig
    database: Path | None
    postgresql: str | None = None
    syslog_tls: Listen | None = field(default_factory=lambda: Listen(port=6514))
    # UDP proves nothing about a sender: off unless enabled (then only listed addresses).
    syslog_udp: Listen | None = None
    https: Listen = field(default_factory=lambda: Listen(port=8443))
    # The officers' UI listener (no client certificate asked); None: the UI on ``https``.
    ui_https: Listen | None = None
    # /metrics and /healthz over plain HTTP (loopback); None: not served.
    admin_http: Listen | None = None
    public_base_url: str | None = None
    limits: ReceiverLimits = field(default_factory=ReceiverLimits)
    ui: UiSettings = field(default_factory=UiSettings)
    xref_csv: Path | None = None
    audit_source_id: str = field(default_factory=socket.gethostname)
    enterprise_site_id: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    # Let /fhir be used with an officer's UI session too (handy to look at raw JSON).
    fhir_allow_officer_session: bool = True
    # Who may send records and search them ([arr.access]); nobody unless listed.
    access: ArrAccess = field(default_factory=ArrAccess)


def _path(base: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _check_keys(table: dict[str, Any], known: set[str], section: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s): {', '.join(sorted(unknown))}")


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
        raise ConfigError(f"{what} must be a port number (0 = any free port)")
    return value


def _listen(table: dict[str, Any], prefix: str, default_port: int | None) -> Listen | None:
    host_key, port_key = f"{prefix}_host", f"{prefix}_port"
    if table.get(f"{prefix}_enabled") is False:
        return None
    if port_key not in table and default_port is None:
        return None
    host = table.get(host_key, "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"arr.syslog.{host_key} must be a host")
    return Listen(host, _port(table.get(port_key, default_port), f"arr.syslog.{port_key}"))


def parse_arr_config(table: dict[str, Any], base_dir: Path) -> ArrConfig:
    """Build the repository's configuration from its TOML ``[arr]`` table."""
    if not isinstance(table, dict):
        raise ConfigError("[arr] must be a table")
    data = dict(table)
    _check_keys(
        data,
        {
            "tls",
            "database",
            "postgresql",
            "syslog",
            "https",
            "ui",
            "communities",
            "xref_csv",
            "audit_source_id",
            "enterprise_site_id",
            "hostname",
            "fhir_allow_officer_session",
            "access",
            "admin",
        },
        "arr",
    )
    tls_t = dict(data.get("tls", {}))
    for key in ("certificate", "private_key", "trust_store"):
        if key not in tls_t:
            raise ConfigError(f"[arr.tls] {key} is required")
        tls_t[key] = _path(base_dir, tls_t[key], f"arr.tls.{key}")
    _check_keys(tls_t, {f.name for f in fields(TlsConfig)}, "arr.tls")
    tls = TlsConfig(**tls_t)
    if tls.minimum_version not in ("1.2", "1.3"):
        raise ConfigError('arr.tls.minimum_version must be "1.2" or "1.3"')

    postgresql = data.get("postgresql")
    if postgresql is not None and (not isinstance(postgresql, str) or not postgresql):
        raise ConfigError("arr.postgresql must be a connection string")
    database = (
        _path(base_dir, data.get("database", "data/arr.sqlite3"), "arr.database")
        if not postgresql
        else None
    )

    syslog_t = dict(data.get("syslog", {}))
    limit_names = {f.name for f in fields(ReceiverLimits)}
    _check_keys(
        syslog_t,
        {"tls_host", "tls_port", "tls_enabled", "udp_host", "udp_port", "udp_enabled"}
        | limit_names,
        "arr.syslog",
    )
    limits_kw = {k: v for k, v in syslog_t.items() if k in limit_names}
    for key, value in limits_kw.items():
        minimum = 0 if key == "parse_workers" else 1e-9
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(f"arr.syslog.{key} must be a positive number")
    limits = ReceiverLimits(**limits_kw)
    if limits.max_message_bytes < 32768:
        raise ConfigError("arr.syslog.max_message_bytes must be at least 32768 (DICOM PS3.15 A.6)")
    syslog_tls = _listen(syslog_t, "tls", 6514)
    udp_enabled = syslog_t.get("udp_enabled", False)
    if not isinstance(udp_enabled, bool):
        raise ConfigError("arr.syslog.udp_enabled must be true or false")
    if udp_enabled:
        syslog_udp = _listen(syslog_t, "udp", 514)
    elif "udp_enabled" not in syslog_t and ("udp_port" in syslog_t or "udp_host" in syslog_t):
        # A port without the switch: an older configuration that expects UDP on.
        raise ConfigError(
            "arr.syslog: UDP syslog is off unless udp_enabled = true (and then it accepts only "
            "the addresses listed for an audit source); enable it or remove udp_host/udp_port"
        )
    else:
        syslog_udp = None

    https_t = dict(data.get("https", {}))
    _check_keys(https_t, {"host", "port", "public_base_url", "ui_host", "ui_port"}, "arr.https")
    https = Listen(
        str(https_t.get("host", "127.0.0.1")), _port(https_t.get("port", 8443), "arr.https.port")
    )
    ui_https = None
    if "ui_port" in https_t:
        ui_https = Listen(
            str(https_t.get("ui_host", https.host)),
            _port(https_t["ui_port"], "arr.https.ui_port"),
        )
    public = https_t.get("public_base_url")
    admin_t = data.get("admin")
    admin_http = None
    if admin_t is not None:
        if not isinstance(admin_t, dict):
            raise ConfigError("[arr.admin] must be a table")
        _check_keys(admin_t, {"host", "port"}, "arr.admin")
        admin_http = Listen(
            str(admin_t.get("host", "127.0.0.1")), _port(admin_t.get("port", 0), "arr.admin.port")
        )

    ui_t = dict(data.get("ui", {}))
    ui_names = {f.name for f in fields(UiSettings)} - {"community_names"}
    _check_keys(ui_t, ui_names, "arr.ui")
    communities = data.get("communities", {})
    if not isinstance(communities, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in communities.items()
    ):
        raise ConfigError("[arr.communities] maps homeCommunityId strings to names")
    try:
        ui = UiSettings(**ui_t, community_names=dict(communities))
    except TypeError as exc:
        raise ConfigError(f"[arr.ui] {exc}") from None

    xref = _path(base_dir, data["xref_csv"], "arr.xref_csv") if "xref_csv" in data else None
    extra: dict[str, Any] = {}
    for key in ("audit_source_id", "enterprise_site_id", "hostname"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise ConfigError(f"arr.{key} must be a non-empty string")
            extra[key] = data[key]
    if "fhir_allow_officer_session" in data:
        extra["fhir_allow_officer_session"] = bool(data["fhir_allow_officer_session"])
    if "access" in data:
        extra["access"] = parse_access(data["access"])
    return ArrConfig(
        tls=tls,
        database=database,
        postgresql=postgresql,
        syslog_tls=syslog_tls,
        syslog_udp=syslog_udp,
        https=https,
        ui_https=ui_https,
        admin_http=admin_http,
        public_base_url=public if isinstance(public, str) else None,
        limits=limits,
        ui=ui,
        xref_csv=xref,
        **extra,
    )


def load_arr_config(path: Path) -> ArrConfig:
    """A TOML file with an ``[arr]`` table (a gateway's file may carry one too)."""
    path = path.resolve()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if "arr" not in data:
        raise ConfigError(f"{path}: no [arr] table")
    return parse_arr_config(data["arr"], path.parent)


def arr_config_toml(
    *,
    certificate: str,
    private_key: str,
    trust_store: str,
    database: str,
    syslog_tls_port: int = 0,
    syslog_udp_port: int | None = None,
    https_port: int = 0,
    ui_port: int | None = None,
    admin_port: int | None = None,
    audit_source_id: str = "xca-gateway-arr",
    communities: dict[str, str] | None = None,
    xref_csv: str | None = None,
    callers: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A configuration file for the demo launcher (ports may be inherited sockets instead);
    ``callers`` become ``[[arr.access.callers]]`` (nobody may send or search otherwise)."""

    def q(value: str) -> str:
        return json.dumps(value)

    lines = [
        "# audit record repository: generated by xca-gateway demo",
        "[arr]",
        f"database = {q(database)}",
        f"audit_source_id = {q(audit_source_id)}",
    ]
    if xref_csv:
        lines.append(f"xref_csv = {q(xref_csv)}")
    lines += [
        "",
        "[arr.tls]",
        f"certificate = {q(certificate)}",
        f"private_key = {q(private_key)}",
        f"trust_store = {q(trust_store)}",
        "",
        "[arr.syslog]",
        f"tls_port = {syslog_tls_port}",
        *(
            ["udp_enabled = true", f"udp_port = {syslog_udp_port}"]
            if syslog_udp_port is not None
            else []
        ),
        "",
        "[arr.https]",
        f"port = {https_port}",
        *([f"ui_port = {ui_port}"] if ui_port is not None else []),
        "",
        *(["[arr.admin]", f"port = {admin_port}", ""] if admin_port is not None else []),
    ]
    if communities:
        lines.append("[arr.communities]")
        lines += [f"{q(k)} = {q(v)}" for k, v in communities.items()]
        lines.append("")
    if callers:
        lines.append(access_toml(callers))
    return "\n".join(lines)


# --------------------------------------------------------------------------- TLS for the UI


def ui_server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """Like the gateway's server context, but the client certificate is optional: browsers of
    officers have none; when one is presented it must still chain to the trust store."""
    ctx = server_context(cfg)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    enable_certificate_capture(ctx)
    return ctx


def browser_server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The officers' UI listener: the same TLS floor, ciphers and certificate, but no client
    certificate asked for (officers sign in), so that a browser is never taken for a node."""
    ctx = server_context(cfg)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def syslog_server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The gateway's mutual-TLS server rules, without TLS 1.3 session tickets: a syslog sender
    never reads, so tickets would sit unread in its socket, and a sender that closes right
    after writing would then reset the connection - discarding whatever the repository had
    not read yet."""
    ctx = server_context(cfg)
    ctx.num_tickets = 0
    return ctx


# --------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class ArrSockets:
    """Already-bound sockets (socket activation, or the demo launcher)."""

    https: socket.socket | None = None
    syslog_tls: socket.socket | None = None
    syslog_udp: socket.socket | None = None
    ui: socket.socket | None = None
    admin: socket.socket | None = None


class AuditRecordRepository:
    def __init__(self, config: ArrConfig, store: AuditStore | None = None) -> None:
        self.config = config
        self.store = store or open_store(config.database, config.postgresql)
        self.counters = Counters()
        self.senders = SenderLimits(config.limits)
        self.ingestor = Ingestor(
            self.store,
            self.counters,
            queue_size=config.limits.queue_size,
            parse_workers=config.limits.parse_workers,
            # Workers open their own connection, unless the store was handed in (tests).
            worker_store=(config.database, config.postgresql) if store is None else None,
        )
        self.syslog_tls: SyslogTlsServer | None = None
        self.syslog_udp: SyslogUdpServer | None = None
        self._initial_total = self.store.total()
        self._alert_windows: asyncio.Task[None] | None = None
        self.self_audit = SelfAudit(
            self._submit_local,
            audit_source_id=config.audit_source_id,
            enterprise_site_id=config.enterprise_site_id,
            hostname=config.hostname,
            application_id="xca-gateway-arr",
        )
        # Deny by default: the access list names every audit source and audit consumer.
        self._directory = config.access.directory()
        self.guard = DoorGuard(lambda: self._directory, on_refusal=self._on_refusal)
        xref = PatientXref.load(config.xref_csv) if config.xref_csv else None
        self.ui = ReviewUI(self.store, config.ui, self.self_audit, xref=xref, status=self.status)
        timeouts = ServerTimeouts(handshake=config.tls.handshake_timeout, handler=120.0)
        split = config.ui_https is not None
        # Split: machines only here (a certificate is required, every refusal a Security
        # Alert); officers' browsers on the UI listener. Else one listener for both.
        self.https = HttpServer(
            self._app,
            ssl_context=server_context(config.tls) if split else ui_server_context(config.tls),
            on_handshake_failure=(
                self._on_handshake_failure if split else self._on_ui_handshake_failure
            ),
            timeouts=timeouts,
            max_connections=256,
        )
        self.ui_https: HttpServer | None = None
        if split:
            self.ui_https = HttpServer(
                self._ui_app,
                ssl_context=browser_server_context(config.tls),
                on_handshake_failure=self._on_browser_handshake_failure,
                timeouts=timeouts,
                max_connections=256,
                name="ui",
            )
        self.admin_http: HttpServer | None = None
        if config.admin_http is not None:
            self.admin_http = HttpServer(self._admin_app, ssl_context=None, name="admin")
        # (monotonic time, records stored) every few seconds: the ingest rate in /metrics.
        self._ingest_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=13)
        self._sampler: asyncio.Task[None] | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sockets: ArrSockets | None = None) -> None:
        sockets = sockets or ArrSockets()
        cfg = self.config
        self.ingestor.start()
        self._alert_windows = asyncio.create_task(self._close_alert_windows())
        if cfg.syslog_tls is not None or sockets.syslog_tls is not None:
            self.syslog_tls = SyslogTlsServer(
                self.ingestor,
                syslog_server_context(cfg.tls),
                cfg.limits,
                self.counters,
                self.senders,
                on_handshake_failure=self._on_handshake_failure,
                admit=self._admit_sender,
            )
            listen = cfg.syslog_tls or Listen()
            await self.syslog_tls.start(listen.host, listen.port, sock=sockets.syslog_tls)
        if cfg.syslog_udp is None and sockets.syslog_udp is not None:
            # Handed a UDP socket while UDP is off: do not listen on it.
            sockets.syslog_udp.close()
        elif cfg.syslog_udp is not None:
            if not cfg.access.udp_senders:
                log.warning(
                    "syslog-udp is enabled but no audit source lists an address: every "
                    "datagram will be refused"
                )
            self.syslog_udp = SyslogUdpServer(
                self.ingestor, cfg.limits, self.counters, self.senders, admit=self._admit_sender
            )
            listen = cfg.syslog_udp or Listen()
            await self.syslog_udp.start(listen.host, listen.port, sock=sockets.syslog_udp)
        await self.https.start(cfg.https.host, cfg.https.port, sock=sockets.https)
        if self.ui_https is not None and cfg.ui_https is not None:
            await self.ui_https.start(cfg.ui_https.host, cfg.ui_https.port, sock=sockets.ui)
        elif sockets.ui is not None:
            sockets.ui.close()
        admin = cfg.admin_http
        if self.admin_http is not None and admin is not None:
            await self.admin_http.start(admin.host, admin.port, sock=sockets.admin)
        elif sockets.admin is not None:
            sockets.admin.close()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_ingest())
        self._started = True
        log.info(
            "audit record repository: syslog-tls %s, syslog-udp %s, https %s, ui %s",
            self.syslog_tls.port if self.syslog_tls else "off",
            self.syslog_udp.port if self.syslog_udp else "off",
            self.base_url,
            self.ui_url,
        )

    async def _close_alert_windows(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.self_audit.close_alert_windows()

    async def stop(self) -> None:
        self._started = False
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self._alert_windows is not None:
            self._alert_windows.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alert_windows
            self._alert_windows = None
        self.self_audit.close_alert_windows(all_of_them=True)
        if self.syslog_tls is not None:
            await self.syslog_tls.close()
        if self.syslog_udp is not None:
            await self.syslog_udp.close()
        await self.https.close()
        if self.ui_https is not None:
            await self.ui_https.close()
        if self.admin_http is not None:
            await self.admin_http.close()
        await self.ingestor.flush()
        await self.ingestor.stop()
        await asyncio.to_thread(self.store.close)

    async def flush(self) -> None:
        """Wait until everything received so far is stored (tests, shutdown)."""
        await self.ingestor.flush()

    @property
    def base_url(self) -> str:
        if self.config.public_base_url:
            return self.config.public_base_url.rstrip("/")
        return f"https://{self.config.https.host}:{self.https.port}"

    @property
    def fhir_base(self) -> str:
        return self.base_url + "/fhir"

    @property
    def ui_url(self) -> str:
        """Where officers' browsers go: the UI listener, else the one HTTPS listener."""
        if self.ui_https is not None and self.config.ui_https is not None:
            return f"https://{self.config.ui_https.host}:{self.ui_https.port}"
        return self.base_url

    @property
    def admin_url(self) -> str | None:
        if self.admin_http is None or self.config.admin_http is None:
            return None
        return f"http://{self.config.admin_http.host}:{self.admin_http.port}"

    def status(self) -> dict[str, Any]:
        return {
            "total": self._initial_total + self.ingestor.stored,
            "backlog": self.ingestor.backlog,
            "counters": self.counters.snapshot(),
        }

    def endpoints(self) -> dict[str, Any]:
        """The ``auditRepository`` entry of the demo's endpoints.json (without the officer)."""
        out: dict[str, Any] = {"fhir": self.fhir_base, "ui": self.ui_url}
        if self.ui_https is not None:
            out["uiCertificate"] = self.base_url
        if self.admin_url is not None:
            out["metrics"] = self.admin_url + "/metrics"
        if self.syslog_tls is not None:
            out["syslogTls"] = f"{self.config.https.host}:{self.syslog_tls.port}"
        if self.syslog_udp is not None:
            out["syslogUdp"] = f"{self.config.https.host}:{self.syslog_udp.port}"
        return out

    # ------------------------------------------------------------------ self audit

    def _submit_local(self, raw: bytes) -> None:
        self.ingestor.submit_record_bytes(raw, "127.0.0.1", "local")

    def _admit_sender(self, identity: Identity, transport: Transport) -> SenderGrant | None:
        """The syslog door: audit sources only; each is told which AuditSourceIDs it may
        report as. A refusal is audited once (per connection; per address over UDP)."""
        decision = self.guard.check(identity, Door.SYSLOG)
        if not decision.allowed:
            self.guard.refuse(decision, f"syslog-{transport}")
            return None
        return SenderGrant(
            sender_label(identity, transport), self.config.access.bound_source_ids(identity)
        )

    def _on_refusal(self, decision: AccessDecision, resource: str) -> None:
        """A caller refused at a door is a Security Alert in our own trail (once)."""
        self.counters.inc("refused_callers", str(decision.door))
        self.self_audit.record(
            access_denied_message(
                self.self_audit.ctx, decision, resource=resource, reporter_user_id="xca-gateway-arr"
            )
        )

    def _on_ui_handshake_failure(self, failure: HandshakeFailure) -> None:
        """Browsers open speculative connections and drop them mid-handshake; only refusals
        that involve a certificate (or a protocol the node tried) are Security Alerts."""
        self.counters.inc("ui_handshake_failures")
        benign = failure.reason in ("connection closed during handshake", "handshake timed out")
        if benign and failure.certificate_der is None and failure.verify_message is None:
            return
        self._on_handshake_failure(failure)

    def _on_browser_handshake_failure(self, failure: HandshakeFailure) -> None:
        """The officers' listener authenticates no node: a browser that does not (yet) trust
        the repository's certificate, or drops a speculative connection, is counted only."""
        self.counters.inc("ui_handshake_failures")
        log.debug("UI handshake from %s dropped: %s", failure.address, failure.reason)

    def _on_handshake_failure(self, failure: HandshakeFailure) -> None:
        """A refused node is a Security Alert (Node Authentication) in our own trail."""
        reason = failure.reason
        if failure.verify_message and failure.verify_message not in reason:
            reason = f"{reason} ({failure.verify_message})"
        message = security_alert_node_authentication(
            self.self_audit.ctx,
            address=failure.address,
            port=failure.port,
            reason=reason,
            certificate_subject=failure.certificate_subject,
            reporter=self.self_audit.ctx.local_node("xca-gateway-arr"),
        )
        # Through the self-audit trail: repeated alerts of one node are aggregated.
        self.self_audit.record(message)

    # ------------------------------------------------------------------ HTTP

    async def _ui_app(self, request: Request) -> Response:
        """The officers' listener: the review UI only (the ITI-81 API is for nodes)."""
        try:
            if request.path == "/healthz":
                return _json(200, {"ready": self._started}, "application/json")
            if request.path == "/fhir" or request.path.startswith("/fhir/"):
                return _json(
                    404,
                    operation_outcome(
                        "not-found", "the ITI-81 API is on the mutual-TLS listener, not here"
                    ),
                )
            return await self.ui(request)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return Response(500, [("content-type", "text/plain")], b"internal error\n")

    async def _admin_app(self, request: Request) -> Response:
        if request.path == "/metrics":
            text = await asyncio.to_thread(self.metrics_text)
            return Response(
                200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], text.encode()
            )
        if request.path == "/healthz":
            return _json(200, {"ready": self._started, **self.status()}, "application/json")
        return Response(404, [("content-type", "text/plain")], b"not found\n")

    async def _sample_ingest(self) -> None:
        while True:
            self._ingest_samples.append((time.monotonic(), self.ingestor.stored))
            await asyncio.sleep(5.0)

    def ingest_rate(self) -> float:
        """Records stored per second over the last minute (or since start)."""
        samples = [*self._ingest_samples, (time.monotonic(), self.ingestor.stored)]
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def metrics_text(self) -> str:
        """Prometheus text exposition: ingest, store, refused senders, flagged records."""
        counters = self.counters.snapshot()
        total = self.store.total()
        size = _store_bytes(self.config.database)
        refused = {k: v for k, v in counters.items() if k.startswith("refused_callers")}
        lines = [
            "# HELP xca_arr_ingest_records_per_second Records stored per second (last minute).",
            "# TYPE xca_arr_ingest_records_per_second gauge",
            f"xca_arr_ingest_records_per_second {self.ingest_rate():.3f}",
            "# HELP xca_arr_ingested_records_total Records stored since this process started.",
            "# TYPE xca_arr_ingested_records_total counter",
            f"xca_arr_ingested_records_total {self.ingestor.stored}",
            "# HELP xca_arr_ingest_backlog Records received, not yet stored.",
            "# TYPE xca_arr_ingest_backlog gauge",
            f"xca_arr_ingest_backlog {self.ingestor.backlog}",
            "# HELP xca_arr_store_records Records in the store.",
            "# TYPE xca_arr_store_records gauge",
            f"xca_arr_store_records {total}",
        ]
        if size is not None:
            lines += [
                "# HELP xca_arr_store_bytes Size of the store's database files.",
                "# TYPE xca_arr_store_bytes gauge",
                f"xca_arr_store_bytes {size}",
            ]
        lines += [
            "# HELP xca_arr_refused_senders_total Callers refused at a door (syslog, ITI-81).",
            "# TYPE xca_arr_refused_senders_total counter",
        ]
        for key, value in sorted(refused.items()):
            door = key.partition("{")[2].rstrip("}") or "unknown"
            lines.append(f'xca_arr_refused_senders_total{{door="{door}"}} {value}')
        if not refused:
            lines.append('xca_arr_refused_senders_total{door="syslog"} 0')
        lines += [
            "# HELP xca_arr_flagged_records_total Records stored flagged since start.",
            "# TYPE xca_arr_flagged_records_total counter",
            f"xca_arr_flagged_records_total {counters.get('stored_flagged', 0)}",
            "# HELP xca_arr_handshake_failures_total Refused TLS handshakes (nodes).",
            "# TYPE xca_arr_handshake_failures_total counter",
            f"xca_arr_handshake_failures_total {counters.get('handshake_failures', 0)}",
            "# HELP xca_arr_ui_handshake_failures_total Dropped browser handshakes (UI).",
            "# TYPE xca_arr_ui_handshake_failures_total counter",
            f"xca_arr_ui_handshake_failures_total {counters.get('ui_handshake_failures', 0)}",
        ]
        return "\n".join(lines) + "\n"

    async def _app(self, request: Request) -> Response:
        try:
            if request.path == "/fhir" or request.path.startswith("/fhir/"):
                return await self._fhir(request)
            if request.path == "/healthz":
                return _json(200, {"ready": self._started, **self.status()}, "application/json")
            return await self.ui(request)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return Response(500, [("content-type", "text/plain")], b"internal error\n")

    async def _fhir_caller(self, request: Request) -> tuple[str, str | None] | Response:
        """Admit an ITI-81 caller (audit consumers and security officers only), or refuse.

        A client certificate counts only if the access list (or an officer account) names it;
        an officer signed in to the UI may use the API too. A refusal is a 401 (nothing
        presented) or a 403, audited once as a Security Alert naming what was verified.
        """
        resource = request.path
        identity = identity_from_peer(request.peer)
        directory = self._directory
        if identity.certificate_fingerprint is not None:
            officer = await asyncio.to_thread(
                self.store.officer_by_certificate, identity.certificate_fingerprint
            )
            if officer is not None:
                directory = directory.with_rules(
                    [
                        CallerRule(
                            f"officer {officer.username}",
                            frozenset({Role.SECURITY_OFFICER}),
                            certificate_fingerprints=frozenset({identity.certificate_fingerprint}),
                        )
                    ]
                )
        decision = decide(directory, identity, Door.ITI81)
        if decision.allowed and decision.principal is not None:
            return decision.principal.user_id, decision.principal.name
        if self.config.fhir_allow_officer_session:
            session = self.ui.sessions.get(request_cookies(request).get(SESSION_COOKIE))
            if session is not None:
                return session.username, None
        self.guard.refuse(decision, resource)
        if not identity.has_certificate:
            return _json(
                401,
                operation_outcome(
                    "security", "a client certificate (ATNA secure node) or a session is required"
                ),
            )
        return _json(
            403,
            operation_outcome(
                "forbidden",
                "this certificate is not an audit consumer or security officer of this "
                "audit record repository",
            ),
        )

    async def _fhir(self, request: Request) -> Response:
        user = await self._fhir_caller(request)
        if isinstance(user, Response):
            return user
        if request.method != "GET":
            return _json(405, operation_outcome("not-supported", "the audit trail is read-only"))
        path = request.path[len("/fhir") :].strip("/")
        address = request.peer.address
        if path == "metadata":
            return _json(200, capability_statement(self.fhir_base))
        if path == "AuditEvent":
            try:
                search = parse_search(
                    request.query, strict="handling=strict" in (request.header("prefer") or "")
                )
            except FhirError as exc:
                return _json(exc.status, operation_outcome(exc.code, exc.diagnostics))
            if search.summary_count:
                exact = await asyncio.to_thread(self.store.count, search.filter, _EXACT_COUNT_CAP)
                self.self_audit.audit_log_used(
                    user[0],
                    address,
                    f"{self.fhir_base}/AuditEvent",
                    request.query,
                    user_name=user[1],
                )
                bundle = search_bundle(
                    search, [], base_url=self.fhir_base, total=exact, has_more=False
                )
                return _json(200, bundle)
            rows = await asyncio.to_thread(
                self.store.search,
                search.filter,
                limit=search.count + 1,
                offset=search.offset,
                newest_first=search.newest_first,
            )
            has_more = len(rows) > search.count
            rows = rows[: search.count]
            stored = await asyncio.to_thread(self.store.get_many, [r.id for r in rows])
            records: list[AuditRecord] = [s.record() for s in stored]
            total: int | None = None
            if search.offset == 0 and not has_more:
                total = len(records)
            else:
                # Ordinary searches count up to a cap (an estimate beyond it is omitted);
                # _total=accurate asks for the exact number.
                cap = _EXACT_COUNT_CAP if search.total_accurate else _ESTIMATE_CAP
                counted = await asyncio.to_thread(self.store.count, search.filter, cap)
                total = counted if counted < cap else None
            self.self_audit.audit_log_used(
                user[0], address, f"{self.fhir_base}/AuditEvent", request.query, user_name=user[1]
            )
            bundle = search_bundle(
                search, records, base_url=self.fhir_base, total=total, has_more=has_more
            )
            return _json(200, bundle)
        parts = path.split("/")
        if len(parts) in (2, 3) and parts[0] == "AuditEvent" and parts[1].isdigit():
            stored_one = await asyncio.to_thread(self.store.get, int(parts[1]))
            if stored_one is None:
                return _json(404, operation_outcome("not-found", f"AuditEvent/{parts[1]} unknown"))
            self.self_audit.audit_log_used(
                user[0], address, f"{self.fhir_base}/{path}", "", user_name=user[1]
            )
            if len(parts) == 3:
                if parts[2] != "$raw":
                    return _json(404, operation_outcome("not-found", f"unknown path {path}"))
                return Response(
                    200,
                    [("content-type", "application/octet-stream"), ("cache-control", "no-store")],
                    stored_one.raw,
                )
            return _json(200, audit_event(stored_one.record(), self.fhir_base))
        return _json(404, operation_outcome("not-found", f"unknown path /fhir/{path}"))


def _store_bytes(database: Path | None) -> int | None:
    """Bytes of an SQLite store (with its WAL); None for PostgreSQL."""
    if database is None:
        return None
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += Path(str(database) + suffix).stat().st_size
    return total


def _json(status: int, body: dict[str, Any], content_type: str = FHIR_JSON) -> Response:
    return Response(
        status,
        [("content-type", f"{content_type}; charset=utf-8"), ("cache-control", "no-store")],
        json.dumps(body, ensure_ascii=False).encode("utf-8"),
    )


# --------------------------------------------------------------------------- demo support


@dataclass
class DemoRepository:
    """Everything ``xca-gateway demo`` needs to run one repository (see :func:`prepare_demo`)."""

    config_path: Path
    https: socket.socket
    syslog_tls: socket.socket
    # None: UDP syslog is off (the secured default).
    syslog_udp: socket.socket | None
    officer_username: str
    officer_password: str
    https_port: int
    syslog_tls_port: int
    syslog_udp_port: int | None
    # The client certificate that may search ITI-81 (endpoints.json auditConsumer).
    audit_consumer: CertPair | None = None
    # The officers' UI listener (no client certificate asked) and /metrics (plain HTTP).
    ui: socket.socket | None = None
    admin: socket.socket | None = None
    # Their ports (the sockets are closed once the child runs).
    ui_port: int | None = None
    admin_port: int | None = None
    # For the officer's browser: the CA to trust, and a PKCS#12 (certificate + key) to import
    # for certificate sign-in on the mutual-TLS listener.
    ca: Path | None = None
    officer_pkcs12: Path | None = None
    officer_pkcs12_password: str | None = None

    @property
    def ui_url(self) -> str:
        """Where the officer's browser goes (the UI listener when there is one)."""
        return f"https://127.0.0.1:{self.ui_port or self.https_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "xca_gateway.arr", "serve", "--config", str(self.config_path)]

    def _sockets(self) -> dict[str, socket.socket]:
        found = {"https": self.https, "syslog-tls": self.syslog_tls}
        if self.syslog_udp is not None:
            found["syslog-udp"] = self.syslog_udp
        if self.ui is not None:
            found["ui"] = self.ui
        if self.admin is not None:
            found["admin"] = self.admin
        return found

    def pass_fds(self) -> tuple[int, ...]:
        return tuple(sock.fileno() for sock in self._sockets().values())

    def environment(self) -> dict[str, str]:
        """The variables to add to the child's environment (inherited listening sockets)."""
        return {
            LISTEN_FDS_ENV: ",".join(
                f"{name}={sock.fileno()}" for name, sock in self._sockets().items()
            )
        }

    def close_sockets(self) -> None:
        """Once the child runs, the launcher's copies of the sockets can go."""
        for sock in self._sockets().values():
            sock.close()

    def endpoints_json(self) -> dict[str, Any]:
        """The ``auditRepository`` entry of endpoints.json (contract.md)."""
        out: dict[str, Any] = {"syslogTls": f"127.0.0.1:{self.syslog_tls_port}"}
        if self.syslog_udp_port is not None:
            out["syslogUdp"] = f"127.0.0.1:{self.syslog_udp_port}"
        officer: dict[str, Any] = {
            "username": self.officer_username,
            "password": self.officer_password,
        }
        if self.ca is not None:
            officer["ca"] = str(self.ca)
        if self.officer_pkcs12 is not None:
            officer["pkcs12"] = str(self.officer_pkcs12)
            officer["pkcs12Password"] = self.officer_pkcs12_password
        out |= {"fhir": f"{self.https_url}/fhir", "ui": self.ui_url, "officer": officer}
        if self.ui_port is not None:
            # Certificate sign-in (the officer's PKCS#12) on the mutual-TLS listener.
            out["uiCertificate"] = self.https_url
        if self.admin_port is not None:
            out["metrics"] = f"http://127.0.0.1:{self.admin_port}/metrics"
        if self.audit_consumer is not None:
            out["auditConsumer"] = self.audit_consumer.to_json()
        return out

    def audit_destinations_toml(self, audit_source_id: str | None = None) -> str:
        """The ``[audit]`` section for a demo gateway's configuration: send to this repository
        over syslog-TLS with the gateway's own certificate (the [tls] defaults)."""
        source = [f"audit_source_id = {json.dumps(audit_source_id)}"] if audit_source_id else []
        return "\n".join(
            [
                "[audit]",
                *source,
                "[[audit.destinations]]",
                'name = "arr"',
                'transport = "tls"',
                'host = "127.0.0.1"',
                f"port = {self.syslog_tls_port}",
                "",
            ]
        )


def _bind(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def demo_callers(
    audit_sources: Mapping[str, Path], audit_consumer: Path | None
) -> list[dict[str, Any]]:
    """The demo's ``[[arr.access.callers]]``: each audit source's certificate (by fingerprint)
    bound to its AuditSourceIDs, and the audit consumer."""

    by_cert: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for source_id, cert in audit_sources.items():
        info = certificate_info(cert.read_bytes())
        by_cert.setdefault(info.fingerprint_sha256, []).append(source_id)
        names.setdefault(info.fingerprint_sha256, info.subject)
    callers: list[dict[str, Any]] = [
        {
            "name": names[fingerprint],
            "roles": ["audit-source"],
            "certificate_fingerprints": [fingerprint],
            "audit_source_ids": ids,
        }
        for fingerprint, ids in by_cert.items()
    ]
    if audit_consumer is not None:
        info = certificate_info(audit_consumer.read_bytes())
        callers.append(
            {
                "name": "demo audit consumer",
                "roles": ["audit-consumer"],
                "certificate_fingerprints": [info.fingerprint_sha256],
            }
        )
    return callers


def prepare_demo(
    workdir: Path,
    *,
    certificate: Path,
    private_key: Path,
    trust_store: Path,
    communities: dict[str, str] | None = None,
    xref_csv: Path | None = None,
    base_port: int = 0,
    officer_username: str = "officer",
    pki: DevPki | None = None,
    audit_sources: Mapping[str, Path] | None = None,
    audit_consumer: CertPair | None = None,
    udp: bool = False,
) -> DemoRepository:
    """Bind the repository's sockets (base_port, +1, +2 UDP; 0 = free ports), write its
    configuration under ``workdir`` and create the demo officer with a fresh password.

    Who may send and search is deny-by-default: ``audit_sources`` maps each AuditSourceID to
    the certificate (PEM file) that may report as it, and ``audit_consumer`` may search
    ITI-81. With the demo's ``pki`` they default to each community's gateway certificate bound
    to ``<community>-gateway``, the demo ``client`` bound to ``xca-gateway-import`` (what
    ``import-priors --endpoints`` reports as), and an ``audit-consumer`` certificate
    issued from the demo CA. UDP syslog is off (the secured configuration); ``udp`` binds a
    UDP port for it, which accepts nothing until an audit source lists its address."""
    import secrets

    if pki is not None:
        if audit_sources is None:
            audit_sources = {
                f"{name}-gateway": pki.communities[name].cert
                for name in (communities or {}).values()
                if name in pki.communities
            }
            audit_sources["xca-gateway-import"] = pki.client.cert
        if audit_consumer is None:
            audit_consumer = issue_client_certificate(pki, "audit-consumer")
    workdir.mkdir(parents=True, exist_ok=True)
    https = _bind(socket.SOCK_STREAM, base_port)
    tls = _bind(socket.SOCK_STREAM, base_port + 1 if base_port else 0)
    udp_sock = _bind(socket.SOCK_DGRAM, base_port + 2 if base_port else 0) if udp else None
    ui = _bind(socket.SOCK_STREAM, base_port + 3 if base_port else 0)
    admin = _bind(socket.SOCK_STREAM, base_port + 4 if base_port else 0)
    config_path = workdir / "arr.toml"
    text = arr_config_toml(
        certificate=str(certificate),
        private_key=str(private_key),
        trust_store=str(trust_store),
        database=str(workdir / "data" / "arr.sqlite3"),
        syslog_tls_port=tls.getsockname()[1],
        syslog_udp_port=udp_sock.getsockname()[1] if udp_sock else None,
        https_port=https.getsockname()[1],
        ui_port=ui.getsockname()[1],
        admin_port=admin.getsockname()[1],
        audit_source_id="demo-arr",
        communities=communities,
        xref_csv=str(xref_csv) if xref_csv else None,
        callers=demo_callers(audit_sources or {}, audit_consumer.cert if audit_consumer else None),
    )
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, config_path)
    password = secrets.token_urlsafe(12)
    officer_pair = issue_client_certificate(pki, "officer") if pki is not None else None
    create_officer(
        load_arr_config(config_path),
        officer_username,
        password,
        certificate=officer_pair.cert if officer_pair is not None else None,
    )
    pkcs12_path: Path | None = None
    pkcs12_password: str | None = None
    if officer_pair is not None:
        pkcs12_password = secrets.token_urlsafe(12)
        pkcs12_path = workdir / "officer.p12"
        pkcs12_path.write_bytes(
            officer_pkcs12(officer_pair, trust_store, pkcs12_password, name=officer_username)
        )
        pkcs12_path.chmod(0o600)
    return DemoRepository(
        config_path,
        https,
        tls,
        udp_sock,
        officer_username,
        password,
        https_port=https.getsockname()[1],
        syslog_tls_port=tls.getsockname()[1],
        syslog_udp_port=udp_sock.getsockname()[1] if udp_sock else None,
        audit_consumer=audit_consumer,
        ui=ui,
        admin=admin,
        ui_port=ui.getsockname()[1],
        admin_port=admin.getsockname()[1],
        ca=trust_store,
        officer_pkcs12=pkcs12_path,
        officer_pkcs12_password=pkcs12_password,
    )


def officer_pkcs12(pair: CertPair, ca: Path, password: str, *, name: str) -> bytes:
    """The officer's certificate, key and the CA as one PKCS#12 file (what browsers import),
    encrypted with ``password``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    if not isinstance(key, pkcs12.PKCS12PrivateKeyTypes):  # type: ignore[arg-type]
        raise ValueError("unsupported officer key type")
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    cas = x509.load_pem_x509_certificates(ca.read_bytes())
    return pkcs12.serialize_key_and_certificates(
        name.encode("utf-8"),
        key,  # type: ignore[arg-type]
        cert,
        cas,
        serialization.BestAvailableEncryption(password.encode("utf-8")),
    )


# --------------------------------------------------------------------------- CLI


def _inherited_sockets() -> ArrSockets:
    spec = os.environ.pop(LISTEN_FDS_ENV, "")
    found: dict[str, socket.socket] = {}
    for item in filter(None, spec.split(",")):
        name, _, fd = item.partition("=")
        found[name.strip()] = socket.socket(fileno=int(fd))
    return ArrSockets(
        https=found.get("https"),
        syslog_tls=found.get("syslog-tls"),
        syslog_udp=found.get("syslog-udp"),
        ui=found.get("ui"),
        admin=found.get("admin"),
    )


async def _serve(config: ArrConfig) -> int:
    repository = AuditRecordRepository(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await repository.start(_inherited_sockets())
    # Long-lived objects from start-up need no more scanning, and ingest allocates many
    # short-lived ones: fewer young collections save CPU (a process of our own, so global).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    print(json.dumps(repository.endpoints()), flush=True)
    try:
        await stop.wait()
    finally:
        await repository.stop()
    return 0


def cmd_arr_serve(args: argparse.Namespace) -> int:
    try:
        config = load_arr_config(Path(args.config))
        return asyncio.run(_serve(config))
    except ConfigError as exc:
        print(f"xca-gateway arr: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xca-gateway arr: {exc}", file=sys.stderr)
        return 1


def create_officer(
    config: ArrConfig,
    username: str,
    password: str | None,
    *,
    certificate: Path | None = None,
    display_name: str | None = None,
) -> None:
    """Add (or replace) an officer account in the repository's store."""
    fingerprint = None
    if certificate is not None:
        fingerprint = certificate_info(certificate.read_bytes()).fingerprint_sha256
    officer = new_officer(username, password, fingerprint, display_name)
    if officer.password_hash is None and officer.certificate_fingerprint is None:
        raise ValueError("an officer needs a password or a client certificate")
    store = open_store(config.database, config.postgresql)
    try:
        store.add_officer(officer)
    finally:
        store.close()


def cmd_arr_add_officer(args: argparse.Namespace) -> int:
    try:
        config = load_arr_config(Path(args.config))
        password: str | None = None
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif args.password_file:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        elif args.certificate is None:
            password = getpass.getpass("Password for the new officer: ")
            if getpass.getpass("Again: ") != password:
                print("xca-gateway arr: passwords differ", file=sys.stderr)
                return 2
        create_officer(
            config,
            args.username,
            password,
            certificate=Path(args.certificate) if args.certificate else None,
            display_name=args.display_name,
        )
    except ConfigError as exc:
        print(f"xca-gateway arr: configuration error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"xca-gateway arr: {exc}", file=sys.stderr)
        return 2
    print(f"officer {args.username} saved")
    return 0


def add_arr_command(subparsers: Any) -> None:
    """``xca-gateway arr serve | add-officer`` (for ``cli.build_parser``)."""
    arr = subparsers.add_parser(
        "arr",
        help="the embedded audit record repository",
        description="The embedded ATNA Audit Record Repository: syslog TLS (RFC 5425) and UDP "
        "(RFC 5426) receivers, ITI-81 FHIR AuditEvent search, and the security officers' "
        "review UI.",
    )
    sub = arr.add_subparsers(dest="arr_command", required=True, metavar="ACTION")
    serve = sub.add_parser(
        "serve",
        help="run the audit record repository",
        description="Run the audit record repository from the [arr] table of a TOML file. "
        "Prints its endpoints as JSON once listening; stops cleanly on SIGINT/SIGTERM.",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML file with [arr]")
    serve.set_defaults(func=cmd_arr_serve)
    add = sub.add_parser(
        "add-officer",
        help="create or update a security officer account",
        description="Create or update a security officer account (password hashed with scrypt, "
        "and/or a client certificate registered by its SHA-256 fingerprint).",
    )
    add.add_argument("--config", required=True, metavar="FILE", help="TOML file with [arr]")
    add.add_argument("--username", required=True)
    add.add_argument("--display-name", default=None)
    group = add.add_mutually_exclusive_group()
    group.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    group.add_argument("--password-file", metavar="FILE", help="read the password from a file")
    add.add_argument(
        "--certificate", metavar="PEM", help="the officer's client certificate (PEM or DER)"
    )
    add.set_defaults(func=cmd_arr_add_officer)
