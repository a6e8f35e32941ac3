"""The operator page on the admin port: one community's gateway at a glance.

``GET /`` (HTML, Jinja2 with autoescape) and ``GET /status.json`` show the version and uptime,
each peer community's state (its last call), circuit breaker and last error, the audit spool
and its destinations, the expiry of our certificate, of the trust anchors and of every peer
certificate seen (pinned ones marked; warnings from 30 days), and the latest refusals (callers
refused at a door, TLS handshakes refused). The same facts feed two metrics:
``xca_gateway_build_info`` and ``xca_gateway_certificate_expiry_seconds``.

The admin port is plain HTTP on loopback without authentication: nothing here names a patient;
a peer's error text is cut short and shown as the peer said it.

:func:`collect_status` reads the gateway's state into plain dataclasses (:class:`OperatorStatus`)
and :func:`render_html` turns them into the page; neither does I/O beyond reading our own
certificate files.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from xca_gateway.app.admin import AdminApp
from xca_gateway.app.config import GatewayConfig
from xca_gateway.audit.trail import AuditTrail
from xca_gateway.initiating.query import InitiatingGateway
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.http_server import Request, Response
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.tls import HandshakeFailure
from xca_gateway.security.guard import DoorGuard
from xca_gateway.version import __version__


class ObservedGateway(Protocol):
    """What the page reads of its gateway (:class:`xca_gateway.app.gateway.Gateway`)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def peer_client(self) -> PeerClient: ...

    @property
    def initiating(self) -> InitiatingGateway: ...

    @property
    def audit(self) -> AuditTrail: ...

    @property
    def guard(self) -> DoorGuard: ...

    @property
    def handshake_failures(self) -> deque[HandshakeFailure]: ...

    @property
    def base_url(self) -> str: ...

    @property
    def admin_app(self) -> AdminApp: ...

    @property
    def metrics(self) -> GatewayMetrics: ...


WARNING_DAYS = 30
MAX_ERROR_CHARS = 200
MAX_REFUSALS = 25


@dataclass(frozen=True)
class CertificateStatus:
    kind: str  # "own", "trust_anchor", "peer"
    name: str
    subject: str
    not_after: str  # ISO 8601, UTC
    seconds_left: float
    pinned: bool = False

    @property
    def days_left(self) -> int:
        return int(self.seconds_left // 86400)

    @property
    def level(self) -> str:
        if self.seconds_left <= 0:
            return "expired"
        return "warning" if self.seconds_left < WARNING_DAYS * 86400 else "ok"


@dataclass(frozen=True)
class PeerStatus:
    name: str
    home_community_id: str
    url: str
    state: str  # "up", "down", "unknown" (not called since start)
    breaker: str  # "closed", "open"
    breaker_open_seconds: float
    consecutive_failures: int
    latency_ms: float | None
    last_error: str | None
    last_error_at: str | None
    last_success_at: str | None
    pinned: bool


@dataclass(frozen=True)
class DestinationStatus:
    name: str
    address: str
    up: bool
    pending: int
    sent: int


@dataclass(frozen=True)
class AuditStatus:
    enabled: bool
    spool_dir: str
    spool_bytes: int
    spool_limit_bytes: int
    alarm: bool
    pending: int
    destinations: tuple[DestinationStatus, ...]
    dropped: dict[str, int]


@dataclass(frozen=True)
class Refusal:
    at: str
    kind: str  # "door" or "tls"
    who: str
    where: str
    reason: str


@dataclass(frozen=True)
class OperatorStatus:
    version: str
    community: str
    home_community_id: str
    base_url: str
    host: str
    started_at: str
    uptime_seconds: float
    peers: tuple[PeerStatus, ...]
    certificates: tuple[CertificateStatus, ...]
    audit: AuditStatus
    refusals: tuple[Refusal, ...]
    refused_at_doors: int
    refused_handshakes: int
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for cert, item in zip(self.certificates, data["certificates"], strict=True):
            item["level"] = cert.level
            item["days_left"] = cert.days_left
        return data


# ------------------------------------------------------------------------------- facts


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def certificate_status(
    cert: x509.Certificate, *, kind: str, name: str, now: datetime, pinned: bool = False
) -> CertificateStatus:
    not_after = cert.not_valid_after_utc
    return CertificateStatus(
        kind=kind,
        name=name,
        subject=cert.subject.rfc4514_string(),
        not_after=not_after.strftime("%Y-%m-%d %H:%M UTC"),
        seconds_left=(not_after - now).total_seconds(),
        pinned=pinned,
    )


def _file_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


class PeerCallLog:
    """The outcome of the latest outbound call per peer origin (host:port), fed by the peer
    client's observers: when it last succeeded, when and why it last failed."""

    def __init__(self) -> None:
        self.last_success: dict[str, float] = {}
        self.last_error: dict[str, tuple[float, str]] = {}

    def __call__(
        self, url: str, action: str, request: Any, reply: Any, error: str | None, facts: Any
    ) -> None:
        origin = urlsplit(url).netloc
        if error is None:
            self.last_success[origin] = time.time()
        else:
            self.last_error[origin] = (time.time(), error[:MAX_ERROR_CHARS])


class OperatorPage:
    """Collects the status of one gateway and serves it (an admin app for ``/``)."""

    def __init__(self, gateway: ObservedGateway) -> None:
        self.gateway = gateway
        self.started = time.time()
        self.calls = PeerCallLog()
        gateway.peer_client.observers.append(self.calls)
        self._env = Environment(
            loader=PackageLoader("xca_gateway", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._own: tuple[float, list[x509.Certificate], list[x509.Certificate]] | None = None

    # ------------------------------------------------------------------ collecting

    def _own_certificates(self) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
        """Our certificate and the trust anchors, re-read at most once a minute (a renewed
        certificate shows without a restart of the page, not on every scrape)."""
        if self._own is None or time.monotonic() - self._own[0] > 60:
            tls = self.gateway.config.tls
            self._own = (
                time.monotonic(),
                _file_certificates(tls.certificate)[:1],
                _file_certificates(tls.trust_store),
            )
        return self._own[1], self._own[2]

    def certificates(self, now: datetime | None = None) -> list[CertificateStatus]:
        now = now or datetime.now(UTC)
        config = self.gateway.config
        own, anchors = self._own_certificates()
        found = [
            certificate_status(c, kind="own", name=config.community.name, now=now) for c in own
        ]
        found += [
            certificate_status(c, kind="trust_anchor", name=f"trust store #{i + 1}", now=now)
            for i, c in enumerate(anchors)
        ]
        seen = self.gateway.peer_client.peer_certificates
        for peer in config.peers:
            for url in (peer.iti38, peer.iti39, peer.rad75):
                der = seen.get(urlsplit(url).netloc) if url else None
                if der is None:
                    continue
                try:
                    cert = x509.load_der_x509_certificate(der)
                except ValueError:
                    continue
                found.append(
                    certificate_status(
                        cert,
                        kind="peer",
                        name=peer.name,
                        now=now,
                        pinned=bool(peer.certificate_sha256),
                    )
                )
                break
        return found

    def peers(self) -> list[PeerStatus]:
        initiating = self.gateway.initiating
        out = []
        for peer in self.gateway.config.peers:
            origins = {urlsplit(u).netloc for u in (peer.iti38, peer.iti39, peer.rad75) if u}
            success = max((self.calls.last_success.get(o, 0.0) for o in origins), default=0.0)
            errors = [self.calls.last_error[o] for o in origins if o in self.calls.last_error]
            error_at, error = max(errors) if errors else (0.0, None)
            health = initiating.health.get(peer.home_community_id)
            breaker_open = health is not None and health.is_open()
            if not success and not error_at:
                state = "unknown"
            else:
                state = "up" if success >= error_at else "down"
            out.append(
                PeerStatus(
                    name=peer.name,
                    home_community_id=peer.home_community_id,
                    url=peer.iti38 or peer.iti39 or peer.rad75 or "",
                    state=state,
                    breaker="open" if breaker_open else "closed",
                    breaker_open_seconds=(
                        max(0.0, health.open_until - time.monotonic())
                        if health is not None and breaker_open
                        else 0.0
                    ),
                    consecutive_failures=health.consecutive_failures if health else 0,
                    latency_ms=round(health.latency * 1000, 1)
                    if health and health.latency
                    else None,
                    last_error=error,
                    last_error_at=_iso(error_at) if error else None,
                    last_success_at=_iso(success) if success else None,
                    pinned=bool(peer.certificate_sha256),
                )
            )
        return out

    def audit(self) -> AuditStatus:
        trail = self.gateway.audit
        config = trail.config
        destinations = []
        spool_bytes, alarm = 0, False
        if config.enabled and trail.senders:
            spool = trail.spool
            spool_bytes, alarm = spool.size_bytes, bool(spool.alarm)
            for sender in trail.senders:
                d = sender.destination
                destinations.append(
                    DestinationStatus(
                        sender.name,
                        f"{d.transport}://{d.host}:{d.port}",
                        bool(sender.up),
                        int(sender.pending),
                        int(sender.sent),
                    )
                )
        return AuditStatus(
            enabled=bool(config.enabled),
            spool_dir=str(config.spool_dir),
            spool_bytes=int(spool_bytes),
            spool_limit_bytes=int(config.max_spool_bytes),
            alarm=alarm,
            pending=sum(d.pending for d in destinations),
            destinations=tuple(destinations),
            dropped=trail.dropped,
        )

    def refusals(self) -> list[Refusal]:
        rows = [
            Refusal(
                _iso(at) or "",
                "door",
                decision.who,
                f"{resource} ({decision.door.value if decision.door else 'no door'})",
                decision.reason,
            )
            for at, decision, resource in list(self.gateway.guard.recent)
        ]
        rows += [
            Refusal(
                _iso(f.at) or "",
                "tls",
                f.certificate_subject or f"{f.address}:{f.port}",
                f"TLS handshake from {f.address}",
                f.reason,
            )
            for f in list(self.gateway.handshake_failures)
        ]
        rows.sort(key=lambda r: r.at, reverse=True)
        return rows[:MAX_REFUSALS]

    def status(self) -> OperatorStatus:
        gateway = self.gateway
        config = gateway.config
        certificates = self.certificates()
        peers = self.peers()
        audit = self.audit()
        warnings = [
            f"certificate of {c.name} ({c.kind}) "
            + ("has expired" if c.level == "expired" else f"expires in {c.days_left} day(s)")
            for c in certificates
            if c.level != "ok"
        ]
        warnings += [f"peer {p.name}: circuit breaker open" for p in peers if p.breaker == "open"]
        if audit.alarm:
            warnings.append("audit spool above its warning threshold")
        warnings += [
            f"audit destination {d.name} is down ({d.pending} record(s) waiting)"
            for d in audit.destinations
            if not d.up
        ]
        return OperatorStatus(
            version=__version__,
            community=config.community.name,
            home_community_id=config.community.home_community_id,
            base_url=gateway.base_url,
            host=socket.gethostname(),
            started_at=_iso(self.started) or "",
            uptime_seconds=round(time.time() - self.started, 1),
            peers=tuple(peers),
            certificates=tuple(certificates),
            audit=audit,
            refusals=tuple(self.refusals()),
            refused_at_doors=gateway.guard.refused,
            refused_handshakes=len(gateway.handshake_failures),
            warnings=tuple(warnings),
        )

    # ------------------------------------------------------------------ serving

    def render_html(self, status: OperatorStatus) -> str:
        template = self._env.get_template("operator.html")
        return template.render(s=status, uptime=readable_duration(status.uptime_seconds))

    async def __call__(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("allow", "GET, HEAD"), ("content-type", "text/plain")], b"")
        status = self.status()
        headers = [("cache-control", "no-store")]
        if request.path == "/status.json":
            body = json.dumps(status.to_json(), indent=2).encode() + b"\n"
            return Response(200, [("content-type", "application/json"), *headers], body)
        html = self.render_html(status).encode()
        return Response(
            200,
            [
                ("content-type", "text/html; charset=utf-8"),
                # The page runs no script and loads nothing from elsewhere.
                ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'"),
                *headers,
            ],
            html,
        )


def readable_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


# ------------------------------------------------------------------------------- metrics


class OperatorCollector:
    """Prometheus: build info, and seconds until each certificate expires (negative once it
    has), computed at scrape time."""

    def __init__(self, page: OperatorPage) -> None:
        self.page = page

    def describe(self) -> Sequence[Any]:
        return [
            InfoMetricFamily("xca_gateway_build", "Version of the running gateway"),
            GaugeMetricFamily(
                "xca_gateway_certificate_expiry_seconds",
                "Seconds until the certificate expires",
                labels=["kind", "name", "subject"],
            ),
        ]

    def collect(self) -> Iterator[Any]:
        config = self.page.gateway.config
        info = InfoMetricFamily("xca_gateway_build", "Version of the running gateway")
        info.add_metric(
            [],
            {
                "version": __version__,
                "community": config.community.name,
                "home_community_id": config.community.home_community_id,
            },
        )
        yield info
        expiry = GaugeMetricFamily(
            "xca_gateway_certificate_expiry_seconds",
            "Seconds until the certificate expires",
            labels=["kind", "name", "subject"],
        )
        for cert in self.page.certificates():
            expiry.add_metric([cert.kind, cert.name, cert.subject], cert.seconds_left)
        yield expiry


def install_operator_page(gateway: ObservedGateway) -> OperatorPage:
    """Serve the page on the gateway's admin port and export its metrics."""
    page = OperatorPage(gateway)
    gateway.admin_app.index = page
    gateway.metrics.registry.register(OperatorCollector(page))
    return page
