"""The configuration types and checks every part of the gateway shares: the community, TLS,
listeners, limits, peers, OIDs and loopback hosts. The whole file is composed in
:mod:`xca_gateway.app.config`; each subsystem parses its own section.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from xca_gateway.schema import (
    Bytes,
    Count,
    HomeCommunityId,
    HttpsUrl,
    HttpUrl,
    Matches,
    NonEmpty,
    NonNegativeCount,
    NonNegativeSeconds,
    Oid,
    PathText,
    Port,
    Range,
    Rate,
    Seconds,
    Section,
    Strings,
)

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
    max_handshakes_per_source: int = 16
    handshake_rate_per_source: float = 200.0
    handshake_burst_per_source: int = 400
    handshake_rate: float = 1000.0
    # Handshakes a source's bucket pays when one of its request bodies is refused part-way
    # (a bomb, a flood, over a limit): refused over and over, it reconnects a few times a
    # second instead of as fast as the event loop would handshake it.
    refused_body_penalty: int = 50
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
    statement_timeout: float = 5.0


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


# --------------------------------------------------------------------------- schema
# The sections above as the configuration file states them (validated before anything is
# built; the dataclasses are made from them). Descriptions and examples are what the reference
# conf/gateway.toml and the README table say (both generated: xca-gateway config reference).


class CommunitySection(Section):
    """This community: its name, homeCommunityId and patient identifier domain."""

    name: NonEmpty = Field(
        description="Human-readable name, used in logs and metrics.", examples=["north"]
    )
    home_community_id: HomeCommunityId = Field(
        description=(
            "This community's homeCommunityId. Peers route to us by it; every object we return"
            " carries it as `home`, every RegistryError as `location`."
        ),
        examples=["urn:oid:1.3.6.1.4.1.21367.13.70.1"],
    )
    patient_id_assigning_authority: Oid = Field(
        description="OID of the patient identifier domain (assigning authority) of this community.",
        examples=["1.3.6.1.4.1.21367.13.20.1000"],
    )


class ServerSection(Section):
    """The HTTPS (mutual TLS) listener of both sides: responding endpoints /xca/iti38,
    /xca/iti39, /xca/rad75 for peer communities; initiating endpoints /ig/iti18, /ig/iti43,
    /ig/rad69 for local consumers. No caller stalls the others: connections are counted per
    source at accept, before TLS, and every phase of a request has a deadline."""

    host: NonEmpty = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(8443, description="TCP port (0: any free port).")
    public_base_url: HttpUrl | None = Field(
        None,
        description=(
            "URL peers and audit records use for us when it differs from https://host:port"
            " (a proxy, NAT)."
        ),
        examples=["https://gw.north.example.org:8443"],
    )
    max_connections: Count = Field(1000, description="Connections at once, from everyone.")
    max_connections_per_source: Count = Field(
        256,
        description=(
            "Connections at once from one address (IPv6: one /64), counted at accept, before TLS."
        ),
    )
    max_pending_handshakes: Count = Field(
        256,
        description=(
            "Connections accepted and not through the TLS handshake yet; when full, the oldest"
            " (an idle or stalled socket) is dropped for the newcomer."
        ),
    )
    hello_timeout: Seconds = Field(
        5.0,
        description=(
            "Seconds for a new connection's ClientHello to start (tls.handshake_timeout bounds"
            " the rest); then the connection is dropped and reported."
        ),
    )
    max_large_bodies_per_source: Count = Field(
        1,
        description=(
            "Request bodies over 64 KiB read at once per source; its others wait their turn"
            " unread, so one source streaming many large bodies cannot take the event loop."
        ),
    )
    max_handshakes_per_source: Count = Field(
        16,
        description=(
            "TLS handshakes in progress at once per source; the others wait their turn, unread"
            " (until [tls] handshake_timeout), waiting sources served in turn. Each turn of the"
            " event loop runs a step of every handshake in progress: a burst of hundreds from"
            " one source would hold every other caller for that many steps (on one core more"
            " at once do not go faster)."
        ),
    )
    handshake_rate_per_source: Rate = Field(
        200.0,
        description=(
            "TLS handshakes started per second from one source (a token bucket), so a burst"
            " from one source cannot take the event loop from everyone else."
        ),
    )
    handshake_burst_per_source: Count = Field(
        400, description="Handshakes one source may save up in that bucket."
    )
    handshake_rate: Rate = Field(
        1000.0, description="TLS handshakes started per second from all sources together."
    )
    refused_body_penalty: NonNegativeCount = Field(
        50,
        description=(
            "Handshakes taken from a source's bucket when one of its request bodies is refused"
            " part-way (an XML bomb or flood, a body over its limit): each one costs the"
            " connection it closes, so a source refused over and over gets"
            " handshake_rate_per_source / refused_body_penalty new connections a second"
            " (4 at the defaults); 0: no penalty."
        ),
    )
    header_timeout: Seconds = Field(
        15.0,
        description=(
            "One deadline for a whole request head (request line and headers), not one per read:"
            " a trickled header block is cut off."
        ),
    )
    body_timeout: Seconds = Field(60.0, description="Seconds between two chunks of a request body.")
    keepalive_timeout: Seconds = Field(
        75.0, description="Seconds a kept-alive connection waits for its next request."
    )
    handler_timeout: Seconds = Field(300.0, description="Seconds for a handler's answer.")
    proxy_protocol: bool = Field(
        False,
        description=(
            "PROXY protocol v2 (HAProxy send-proxy-v2): every connection must start with the"
            " header, read before the TLS handshake, and only from proxy_sources; the address it"
            " carries is the caller's for audit records, per-source limits and the access"
            " policy's addresses."
        ),
    )
    proxy_sources: Strings = Field(
        [],
        description="The balancers' addresses or networks (required with proxy_protocol).",
        examples=[["127.0.0.1", "10.0.0.0/24"]],
    )
    drain_timeout: Seconds = Field(
        30.0,
        description="On SIGTERM: stop accepting, let requests in flight finish this many seconds.",
    )
    min_body_rate: Annotated[float, Range(0)] = Field(
        1024.0,
        description=(
            "Slow-body (slowloris) defence: after body_grace seconds a request body must average"
            " at least this many bytes/s, else it is answered 408 and the connection closed."
        ),
    )
    body_grace: NonNegativeSeconds = Field(
        10.0, description="Seconds before min_body_rate applies to a request body."
    )


class TlsSection(Section):
    """ATNA ITI-19 node authentication: TLS 1.2 floor, BCP195 suites, client certificate
    required and verified against trust_store. The certificate is the server certificate and,
    towards peers, the client certificate (it needs serverAuth and clientAuth usage)."""

    certificate: PathText = Field(
        description="PEM certificate (chain) of this gateway.", examples=["../certs/north.pem"]
    )
    private_key: PathText = Field(
        description="PEM private key of the certificate.", examples=["../certs/north.key"]
    )
    trust_store: PathText = Field(
        description="PEM bundle of the CAs whose certificates we accept (peers, local systems).",
        examples=["../certs/ca.pem"],
    )
    minimum_version: Literal["1.2", "1.3"] = Field(
        "1.2", description="Lowest TLS version (BCP195: TLS 1.2 floor)."
    )
    ciphers: NonEmpty = Field(
        BCP195_CIPHERS,
        description=(
            "OpenSSL names of the TLS 1.2 suites; the default is the four BCP195 AEAD suites."
        ),
    )
    handshake_timeout: Seconds = Field(
        10.0,
        description=(
            "A peer that has not finished the handshake after this many seconds is dropped."
        ),
    )
    session_tickets: Annotated[int, Range(0, 16)] = Field(
        1,
        description=(
            "TLS 1.3 session tickets sent per full handshake: a returning client resumes without"
            " the certificate signature and chain verification, keeping its verified identity."
            " 0: every connection makes a full handshake (a revoked certificate cannot resume a"
            " session then)."
        ),
    )
    crl_file: PathText | None = Field(
        None,
        description=(
            "PEM file of certificate revocation lists of the trust store's CAs: revoked peer"
            " certificates are refused at the handshake, inbound and outbound."
        ),
        examples=["../certs/crl.pem"],
    )


class LimitsSection(Section):
    """Hostile input is refused cheaply: the HTTP body (all MTOM parts included), the XML of
    the SOAP envelope (counted from its markup, before any tree is built), its nesting depth
    and attribute sizes, and the number of MIME parts."""

    max_request_bytes: Bytes = Field(
        1024 * 1024 * 1024,
        description=(
            "Bodies of retrieves and registrations (ITI-39, RAD-75, ITI-43, RAD-69, ITI-42)."
        ),
    )
    max_query_bytes: Bytes = Field(
        1024 * 1024,
        description=(
            "Bodies of queries (ITI-18, ITI-38, ITI-45, ITI-55): refused from Content-Length when"
            " larger."
        ),
    )
    max_xml_bytes: Bytes = Field(16 * 1024 * 1024, description="XML of one SOAP envelope.")
    max_xml_depth: Count = Field(100, description="Nesting depth of the XML.")
    max_xml_elements: Count = Field(
        1_000_000,
        description=(
            "Elements of one message (and as many attributes in all), counted from its markup."
        ),
    )
    max_xml_attributes: Count = Field(256, description="Attributes of one element.")
    max_xml_namespaces: Count = Field(
        256, description="Distinct namespace declarations of one message."
    )
    max_xml_text_bytes: Bytes = Field(8 * 1024 * 1024, description="One text node.")
    max_attribute_bytes: Bytes = Field(64 * 1024, description="One attribute value.")
    max_mime_parts: Count = Field(1000, description="MIME parts of one MTOM message.")
    max_header_bytes: Bytes = Field(64 * 1024, description="HTTP or MIME part headers.")
    spool_threshold: Annotated[int, Range(0)] = Field(
        1024 * 1024,
        description="MTOM attachments larger than this are spooled to a temporary file.",
    )
    spool_dir: PathText | None = Field(
        None,
        description="Directory of those temporary files (default: the system temp directory).",
        examples=["/var/tmp/xca-gateway"],
    )


class AdminSection(Section):
    """The plain-HTTP admin port: the operator page (/), /healthz, /readyz, /metrics
    (Prometheus), the /consent API. Loopback only: any other address is refused."""

    host: NonEmpty = Field("127.0.0.1", description="A loopback address.")
    port: Port = Field(9090, description="TCP port (0: any free port).")


class OutboundSection(Section):
    """The shared HTTPS client towards peer communities (mutual TLS with our certificate)."""

    connect_timeout: Seconds = Field(5.0, description="Seconds to connect (TCP and TLS).")
    request_timeout: Seconds = Field(30.0, description="Seconds for one exchange.")
    max_connections: Count = Field(100, description="Connections at once.")
    max_keepalive_connections: Annotated[int, Range(0)] = Field(
        20, description="Idle connections kept for reuse."
    )


class StorageSection(Section):
    """Where this community's embedded registry, repository, imaging and audit data live."""

    data_dir: PathText = Field("data", description="The data directory.")


class DiagnosticsSection(Section):
    """Diagnostics for benchmarks. Never on a live node."""

    echo: bool = Field(False, description="An MTOM echo operation at /diagnostics/echo.")


class InitiatingSection(Section):
    """The fan-out of a consumer's ITI-18 to every peer (ITI-38) and the routing of ITI-43
    (ITI-39) and RAD-69 (RAD-75). Total time is bounded by the slowest live peer and by
    overall_deadline."""

    peer_deadline: Seconds = Field(10.0, description="Deadline of one peer's ITI-38 exchange.")
    overall_deadline: Seconds = Field(15.0, description="Deadline of the whole fan-out.")
    query_local_community: bool = Field(
        True, description="Ask our own registry too, so a consumer sees one merged view."
    )
    breaker_failures: Count = Field(
        3,
        description=(
            "Circuit breaker: a peer failing this many times in a row is answered at once as"
            " XDSUnavailableCommunity while a background probe watches it..."
        ),
    )
    breaker_open_seconds: Seconds = Field(30.0, description="...for this many seconds.")
    follow_up_batch: Count = Field(
        50,
        description=(
            "ObjectRefs a peer returns to a LeafClass query are fetched with GetDocuments in "
            "batches of this size."
        ),
    )


class SharedSection(Section):
    """The database the replicas of one community share (several gateways behind one
    balancer). Absent: every store stays in-process (one gateway). Present: the consent rules,
    the XUA replay cache and the front doors' study access live there, so that every replica
    decides alike."""

    database: Annotated[str, Matches(r"postgres(ql)?://\S+", "a postgresql:// URL")] | None = Field(
        None,
        description="The shared PostgreSQL.",
        examples=["postgresql://xca@db.north.example.org:5432/xca"],
    )
    statement_timeout: Seconds = Field(
        5.0,
        description=(
            "Longest a shared-database statement may run (lock waits included); a request"
            " needing the database waits at most this plus 3 s, then is refused (fail closed:"
            " consent unknown withholds, a replay check unavailable refuses the assertion)."
        ),
    )


class PeerSection(Section):
    """A peer community: its homeCommunityId and responding endpoints."""

    name: NonEmpty = Field(description="Name of the peer, in logs and metrics.", examples=["south"])
    home_community_id: HomeCommunityId = Field(
        description="The peer's homeCommunityId.", examples=["urn:oid:1.3.6.1.4.1.21367.13.70.2"]
    )
    iti38: HttpUrl | None = Field(
        None,
        description="Its Responding Gateway's Cross Gateway Query (ITI-38) endpoint.",
        examples=["https://127.0.0.1:8453/xca/iti38"],
    )
    iti39: HttpUrl | None = Field(
        None,
        description="Its Cross Gateway Retrieve (ITI-39) endpoint.",
        examples=["https://127.0.0.1:8453/xca/iti39"],
    )
    rad75: HttpUrl | None = Field(
        None,
        description="Its Cross Gateway Retrieve Imaging Document Set (RAD-75) endpoint.",
        examples=["https://127.0.0.1:8453/xca/rad75"],
    )
    xcpd: HttpsUrl | None = Field(
        None,
        description='Its XCPD (ITI-55) Responding Gateway, for patient_id_sources "xcpd".',
        examples=["https://127.0.0.1:8453/xca/iti55"],
    )
    patient_id_assigning_authority: Oid | None = Field(
        None,
        description="The peer's patient identifier domain (absent: it shares ours).",
        examples=["1.3.6.1.4.1.21367.13.20.2000"],
    )
    patient_id_sources: list[Literal["xref", "pix", "xcpd"]] = Field(
        ["xref"],
        description=(
            "Where to find the peer's id for our patient, in order of preference: the"
            " cross-reference table, a PIX Manager (ITI-45), XCPD (ITI-55)."
        ),
    )
    certificate_sha256: (
        Annotated[
            str, Matches(r"([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}", "a SHA-256 (64 hex digits)")
        ]
        | None
    ) = Field(
        None,
        description=(
            "Pin the peer's certificate (SHA-256 of its DER, hex) to this community: on our calls"
            " to it, any other certificate, even one the trust store accepts, is refused."
        ),
        examples=["3f1c" + "0" * 56 + "a0e9"],
    )
