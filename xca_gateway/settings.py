"""The configuration types and checks every part of the gateway shares: the community, TLS,
listeners, limits, peers, OIDs and loopback hosts. The whole file is composed in
:mod:`xca_gateway.app.config`; each subsystem parses its own section.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

# BCP195 (RFC 7525) TLS 1.2 suites, as required at IHE Connectathons (ITI-19); TLS 1.3 suites
# are OpenSSL's defaults, all of which are AEAD.
BCP195_CIPHERS = (
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class ConfigError(ValueError):
    pass


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or address to listen on) is only reachable from this machine:
    plain-text listeners (no TLS) are allowed there and nowhere else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_oid(value: str, what: str) -> str:
    if not _OID.match(value):
        raise ConfigError(f"{what}: {value!r} is not an OID")
    return value


def validate_home_community_id(value: str, what: str = "home_community_id") -> str:
    if not value.startswith("urn:oid:"):
        raise ConfigError(f"{what}: {value!r} must be of the form urn:oid:<OID>")
    validate_oid(value[len("urn:oid:") :], what)
    return value


@dataclass(frozen=True)
class CommunityConfig:
    name: str
    home_community_id: str
    patient_id_assigning_authority: str


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path
    private_key: Path
    trust_store: Path
    minimum_version: str = "1.2"
    ciphers: str = BCP195_CIPHERS
    handshake_timeout: float = 10.0
    # PEM file of certificate revocation lists of the trust store's CAs: revoked peer
    # certificates are refused at the handshake, inbound and outbound.
    crl_file: Path | None = None
    # TLS 1.3 session tickets sent after each full handshake, so a returning client may resume
    # (no certificate signature nor chain verification; its verified identity is kept). One
    # per connection is enough to resume again and again; each costs the server ~0.15 ms per
    # handshake whether used or not. 0: no resumption (every connection proves itself anew,
    # e.g. so that a revoked certificate cannot resume within the session lifetime).
    session_tickets: int = 1


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    # Base URL that peers use to reach us (what goes into endpoints and audit records).
    public_base_url: str | None = None
    max_connections: int = 1000
    # Connections from one address (IPv6: one /64) at once, counted at accept before TLS.
    max_connections_per_source: int = 256
    # Connections accepted and not through the TLS handshake yet; when full, the oldest is
    # dropped for the newcomer (an idle socket is older than any handshake in progress).
    max_pending_handshakes: int = 256
    # Seconds for a new connection's ClientHello to start (tls.handshake_timeout bounds the rest).
    hello_timeout: float = 5.0
    # Request bodies over 64 KiB read at once per source (the others wait their turn unread), so
    # one source streaming many large bodies cannot take the event loop from everyone else.
    max_large_bodies_per_source: int = 1
    # TLS handshakes started per second from one source (a token bucket holding
    # handshake_burst_per_source), and from all sources together: the excess waits unread
    # (within tls.handshake_timeout), sources served in turn, so a burst of connections from
    # one source cannot take the event loop from everyone else's handshakes and requests.
    # TLS handshakes in progress at once per source (the others wait their turn, unread).
    max_handshakes_per_source: int = 8
    handshake_rate_per_source: float = 25.0
    handshake_burst_per_source: int = 50
    handshake_rate: float = 400.0
    # One absolute deadline for a request head (request line and headers), from the end of the
    # handshake or, on a kept-alive connection, from the head's first byte.
    header_timeout: float = 15.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    handler_timeout: float = 300.0
    # Slow-body defence: after body_grace seconds a request body must average min_body_rate
    # bytes/s, else 408.
    min_body_rate: float = 1024.0
    body_grace: float = 10.0
    # PROXY protocol v2 (HAProxy ``send-proxy-v2``): every connection must start with the
    # header, read before the TLS handshake, and only from ``proxy_sources`` (the balancers'
    # addresses or networks); the address it carries is the caller's for audit records,
    # per-source limits and the access policy's ``addresses``.
    proxy_protocol: bool = False
    proxy_sources: tuple[str, ...] = ()
    # SIGTERM: stop accepting, let requests in flight finish for at most this many seconds.
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.handshake_rate_per_source <= 0 or self.handshake_rate <= 0:
            raise ConfigError("[server] handshake rates must be positive")
        if self.handshake_burst_per_source < 1 or self.max_handshakes_per_source < 1:
            raise ConfigError(
                "[server] handshake_burst_per_source and max_handshakes_per_source must be >= 1"
            )


@dataclass(frozen=True)
class LimitsConfig:
    # Request bodies of retrieves and registrations (MTOM attachments included).
    max_request_bytes: int = 1024 * 1024 * 1024
    # Request bodies of queries (ITI-18, ITI-38, ITI-45, ITI-55): small by nature, so a caller
    # cannot make the gateway read and parse megabytes to answer one.
    max_query_bytes: int = 1024 * 1024
    max_xml_bytes: int = 16 * 1024 * 1024
    max_xml_depth: int = 100
    # Elements of one SOAP message (counted from its markup before anything is built), and
    # as many attributes in all.
    max_xml_elements: int = 1_000_000
    # Attributes of one element, and distinct namespace declarations of one message.
    max_xml_attributes: int = 256
    max_xml_namespaces: int = 256
    max_xml_text_bytes: int = 8 * 1024 * 1024
    max_attribute_bytes: int = 64 * 1024
    max_mime_parts: int = 1000
    max_header_bytes: int = 64 * 1024
    spool_threshold: int = 1024 * 1024
    spool_dir: Path | None = None


@dataclass(frozen=True)
class SharedConfig:
    """``[shared]``: the database replicas of one community share (``postgresql://...``).

    Absent: every store stays in-process (one gateway). Present: the consent rules, the XUA
    replay cache and the front doors' study access live there, so that every replica decides
    alike."""

    database: str | None = None


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090


@dataclass(frozen=True)
class OutboundConfig:
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    max_connections: int = 100
    max_keepalive_connections: int = 20


@dataclass(frozen=True)
class PeerConfig:
    name: str
    home_community_id: str
    iti38: str | None = None
    iti39: str | None = None
    rad75: str | None = None
    # The peer's patient identifier domain; None = it shares ours (affinity-domain MPI).
    patient_id_assigning_authority: str | None = None
    # Where to find the peer's id for our patient, in order of preference.
    patient_id_sources: tuple[str, ...] = ("xref",)
    # Pin the peer's TLS certificate (SHA-256 of its DER, hex) to this community: any other
    # certificate, even from the trust store, is refused on our calls to it.
    certificate_sha256: str | None = None
    # The peer's XCPD (ITI-55) Responding Gateway, for patient_id_sources "xcpd".
    xcpd: str | None = None


PATIENT_ID_SOURCES = frozenset({"xref", "pix", "xcpd"})


@dataclass(frozen=True)
class InitiatingConfig:
    # Per-peer deadline for one ITI-38 exchange, and for the whole fan-out.
    peer_deadline: float = 10.0
    overall_deadline: float = 15.0
    # Ask our own community's registry too, so a consumer sees one merged view.
    query_local_community: bool = True
    # Circuit breaker: after this many consecutive failures a peer is skipped for
    # breaker_open_seconds (answered at once as unavailable) while a background probe checks it.
    breaker_failures: int = 3
    breaker_open_seconds: float = 30.0
    # ObjectRefs returned by a peer to a LeafClass query are fetched with GetDocuments in
    # batches of this size.
    follow_up_batch: int = 50


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path


@dataclass(frozen=True)
class DiagnosticsConfig:
    # An echo action for MTOM throughput and memory benchmarks; never enable on a live node.
    echo: bool = False
