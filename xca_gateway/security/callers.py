"""One caller model for every door: verified identity → named principal with roles → allowed?

A certificate from the trust store proves *who* calls; in a real federation one CA signs every
participant, so it never says *what* they may do. Every listener (SOAP, DICOMweb, DIMSE, MLLP,
syslog, ITI-81, admin) turns what it verified into an :class:`Identity`, looks the caller up in
the :class:`CallerDirectory` (from ``[policy]``), and asks :func:`decide` whether the principal's
roles admit the door. Unknown callers have no roles: every door is deny-by-default.

This module is sans-IO: plain data and pure functions, no sockets, no configuration files.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """What a principal may do, independent of how it proved who it is."""

    # Another community's Initiating Gateway: the responding side (/xca/*).
    PEER_GATEWAY = "peer-gateway"
    # An EHR, viewer or PACS workstation of this community: the initiating side and front doors.
    LOCAL_CONSUMER = "local-consumer"
    # An XDS Document Repository of this community that registers documents (ITI-42).
    LOCAL_REPOSITORY = "local-repository"
    # The community's PACS/VNA as a system (e.g. the destination of imported priors).
    PACS = "pacs"
    # An HL7 v2 interface engine sending orders (MLLP prefetch).
    INTERFACE_ENGINE = "interface-engine"
    # A node that sends ATNA audit records (ITI-20) to the Audit Record Repository.
    AUDIT_SOURCE = "audit-source"
    # A system that may search the audit trail (ITI-81) and read raw audit messages.
    AUDIT_CONSUMER = "audit-consumer"
    # A person who reviews the audit trail (ARR UI, ITI-81).
    SECURITY_OFFICER = "security-officer"
    # An operator of the gateway: the admin API (consent changes).
    OPERATOR = "operator"
    # A person who looks at images in a browser (web door), authenticated by an IUA token.
    CLINICIAN = "clinician"


# The community's own systems (local-only endpoints such as /registry/iti18).
LOCAL_SYSTEMS = frozenset(
    {Role.LOCAL_CONSUMER, Role.LOCAL_REPOSITORY, Role.PACS, Role.INTERFACE_ENGINE}
)


class Door(enum.StrEnum):
    """Endpoint families; each says which roles may call it (:data:`ACCESS`)."""

    XCA = "xca"  # /xca/iti38, /xca/iti39, /xca/rad75, /xca/iti55 (responding side)
    INITIATING = "ig"  # /ig/iti18, /ig/iti43, /ig/rad69 (initiating side)
    REGISTRY_QUERY = "registry-query"  # /registry/iti18
    REGISTRY_REGISTER = "registry-register"  # /registry/iti42
    REPOSITORY = "repository"  # /repository/iti43
    PIX = "pix"  # /pix/iti45
    DIAGNOSTICS = "diagnostics"  # /diagnostics/echo
    DICOMWEB = "dicomweb"  # QIDO-RS / WADO-RS front door
    DIMSE = "dimse"  # C-FIND / C-GET / C-MOVE front door
    MLLP = "mllp"  # HL7 v2 orders (prefetch)
    SYSLOG = "syslog"  # ARR: ITI-20 audit record ingest
    ITI81 = "iti81"  # ARR: FHIR AuditEvent search and raw messages
    ADMIN = "admin"  # gateway admin API that changes state (consent)
    WEB = "web"  # browser door: IID launch, viewer, DICOMweb with IUA bearer tokens


# The one access table. README's "Who may call what" is generated from it (see
# :func:`access_table_markdown`), and the acceptance test drives every row against a demo.
ACCESS: Mapping[Door, frozenset[Role]] = {
    Door.XCA: frozenset({Role.PEER_GATEWAY}),
    Door.INITIATING: frozenset({Role.LOCAL_CONSUMER}),
    Door.REGISTRY_QUERY: LOCAL_SYSTEMS,
    Door.REGISTRY_REGISTER: frozenset({Role.LOCAL_REPOSITORY}),
    Door.REPOSITORY: LOCAL_SYSTEMS,
    Door.PIX: LOCAL_SYSTEMS,
    Door.DIAGNOSTICS: LOCAL_SYSTEMS | {Role.PEER_GATEWAY},
    Door.DICOMWEB: frozenset({Role.LOCAL_CONSUMER}),
    Door.DIMSE: frozenset({Role.LOCAL_CONSUMER}),
    Door.MLLP: frozenset({Role.INTERFACE_ENGINE}),
    Door.SYSLOG: frozenset({Role.AUDIT_SOURCE}),
    Door.ITI81: frozenset({Role.AUDIT_CONSUMER, Role.SECURITY_OFFICER}),
    Door.ADMIN: frozenset({Role.OPERATOR}),
    Door.WEB: frozenset({Role.CLINICIAN}),
}

# SOAP endpoint paths → door. A path not listed here is refused (deny-by-default).
SOAP_DOORS: Mapping[str, Door] = {
    "/xca/iti38": Door.XCA,
    "/xca/iti39": Door.XCA,
    "/xca/rad75": Door.XCA,
    "/xca/iti55": Door.XCA,
    "/ig/iti18": Door.INITIATING,
    "/ig/iti43": Door.INITIATING,
    "/ig/rad69": Door.INITIATING,
    "/registry/iti18": Door.REGISTRY_QUERY,
    "/registry/iti42": Door.REGISTRY_REGISTER,
    "/repository/iti43": Door.REPOSITORY,
    "/pix/iti45": Door.PIX,
    "/diagnostics/echo": Door.DIAGNOSTICS,
}


def soap_door(path: str) -> Door | None:
    return SOAP_DOORS.get(path.rstrip("/") or "/")


def normalize_fingerprint(value: str) -> str:
    return value.strip().lower().replace(":", "")


@dataclass(frozen=True)
class Identity:
    """What a listener verified about the caller (never what a message claims).

    ``certificate_*`` come from a TLS client certificate that chained to the trust store;
    ``ae_title`` is a DICOM calling AE title (an identity only together with a certificate or an
    address bound to it); ``address`` is the TCP peer address. ``token_*`` name a person whose
    bearer token (IHE IUA) was verified: its issuer (``iss``), subject (``sub``) and the
    display name the token gives (``name``).
    """

    address: str | None = None
    certificate_subject: str | None = None
    certificate_fingerprint: str | None = None
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    ae_title: str | None = None
    token_issuer: str | None = None
    token_subject: str | None = None
    person_name: str | None = None

    @property
    def has_certificate(self) -> bool:
        return self.certificate_fingerprint is not None

    @property
    def is_person(self) -> bool:
        """A user authenticated by a verified token, not a system by its certificate."""
        return self.token_subject is not None and self.token_issuer is not None

    def describe(self) -> str:
        if self.is_person:
            who = f"{self.person_name or ''}<{self.token_subject}@{self.token_issuer}>"
            return f"{who} from {self.address}" if self.address else who
        who = self.certificate_subject or (
            f"AE {self.ae_title}" if self.ae_title else "no certificate"
        )
        return f"{who} from {self.address}" if self.address else who


@dataclass(frozen=True)
class CallerRule:
    """One ``[[policy.callers]]`` (or ``[[policy.peers]]``) entry: how to recognise a principal.

    A certificate matches by SHA-256 fingerprint, RFC 4514 subject, DNS SAN or URI SAN. A DIMSE
    association matches by calling AE title *and* a certificate or address of this entry. A
    person matches by the issuer of the token that was verified for them (``token_issuers``).
    """

    name: str
    roles: frozenset[Role]
    home_community_id: str | None = None
    certificate_subjects: frozenset[str] = frozenset()
    certificate_fingerprints: frozenset[str] = frozenset()
    certificate_dns_names: frozenset[str] = frozenset()
    certificate_uris: frozenset[str] = frozenset()
    # DICOM calling AE titles this principal uses (DIMSE door).
    ae_titles: frozenset[str] = frozenset()
    # Source addresses that identify this principal where no certificate is presented (plain
    # DIMSE / MLLP / UDP syslog on loopback only).
    addresses: frozenset[str] = frozenset()
    # Authorization servers (token "iss") whose users this entry names (web door).
    token_issuers: frozenset[str] = frozenset()

    def matches_certificate(self, identity: Identity) -> bool:
        if not identity.has_certificate:
            return False
        if identity.certificate_fingerprint in self.certificate_fingerprints:
            return True
        if identity.certificate_subject in self.certificate_subjects:
            return True
        if self.certificate_dns_names & set(identity.san_dns):
            return True
        if self.certificate_uris & set(identity.san_uri):
            return True
        # A homeCommunityId bound into the certificate (URI SAN) by the affinity domain's CA.
        return bool(self.home_community_id and self.home_community_id in identity.san_uri)

    def matches(self, identity: Identity) -> bool:
        if identity.is_person:
            # A browser has no certificate: the verified token alone says who the user is.
            return identity.token_issuer in self.token_issuers
        if identity.ae_title is not None:
            # DIMSE: the AE title alone proves nothing; it must belong to this entry, and the
            # association must come with this entry's certificate or from one of its addresses.
            if identity.ae_title not in self.ae_titles:
                return False
            return self.matches_certificate(identity) or (
                not identity.has_certificate and identity.address in self.addresses
            )
        if identity.has_certificate:
            return self.matches_certificate(identity)
        return identity.address is not None and identity.address in self.addresses


@dataclass(frozen=True)
class Principal:
    """A recognised caller: a name, its roles, and (for peer gateways) its community.

    For a person (:attr:`Identity.is_person`) the name is the display name the token gives.
    """

    name: str
    roles: frozenset[Role]
    identity: Identity
    home_community_id: str | None = None

    def has(self, *roles: Role) -> bool:
        return bool(self.roles & set(roles))

    @property
    def is_person(self) -> bool:
        return self.identity.is_person

    @property
    def user_id(self) -> str:
        """How audit records name this caller: a person's token subject, else the verified
        certificate subject, else the name."""
        if self.identity.is_person:
            assert self.identity.token_subject is not None
            return self.identity.token_subject
        return self.identity.certificate_subject or self.name

    @property
    def key(self) -> str:
        """Unique among callers (display names of people are not): ``sub@iss`` for a person."""
        if self.identity.is_person:
            return f"{self.identity.token_subject}@{self.identity.token_issuer}"
        return self.name

    @property
    def audit_user_name(self) -> str:
        """The ATNA UserName: ``name<sub@iss>`` for a person, the form ITI TF-2 3.40.4.2 gives
        an XUA user (so audit readers tell people from systems); else the principal's name."""
        if self.identity.is_person:
            return f"{self.identity.person_name or ''}<{self.key}>"
        return self.name


@dataclass(frozen=True)
class CallerDirectory:
    """The known principals; the first entry that matches an identity names it."""

    rules: tuple[CallerRule, ...] = ()

    def identify(self, identity: Identity) -> Principal | None:
        """The first matching entry names the principal (and its community); every matching
        entry adds its roles, so one certificate may be listed for several duties."""
        matching = [rule for rule in self.rules if rule.matches(identity)]
        if not matching:
            return None
        first = matching[0]
        roles = frozenset(role for rule in matching for role in rule.roles)
        if identity.is_person:
            # A person is named as the token names them, not as the entry that admits them.
            name = identity.person_name or identity.token_subject or first.name
            return Principal(name, roles, identity, first.home_community_id)
        return Principal(first.name, roles, identity, first.home_community_id)

    def with_rules(self, extra: Iterable[CallerRule]) -> CallerDirectory:
        return CallerDirectory((*self.rules, *extra))


@dataclass(frozen=True)
class AccessDecision:
    allowed: bool
    # None: a path that no door of the access table serves (refused).
    door: Door | None
    identity: Identity
    principal: Principal | None
    reason: str
    # The refusal was recorded already (one audit record per refusal).
    audited: bool = field(default=False, compare=False)

    @property
    def who(self) -> str:
        """The refused caller for logs and audit: verified names only."""
        if self.principal is not None:
            return f"{self.principal.name} ({self.principal.user_id})"
        return self.identity.describe()


def decide(directory: CallerDirectory, identity: Identity, door: Door) -> AccessDecision:
    """Deny-by-default: the door admits the caller only if one of its roles is listed."""
    principal = directory.identify(identity)
    if principal is None:
        reason = (
            "the token's issuer is not named by this community's access policy"
            if identity.is_person
            else "the caller's certificate is not known to this community's access policy"
            if identity.has_certificate
            else "the caller presented no certificate and is not a known local system"
        )
        return AccessDecision(False, door, identity, None, reason)
    allowed = ACCESS.get(door, frozenset())
    if principal.roles & allowed:
        return AccessDecision(True, door, identity, principal, f"{principal.name} may use {door}")
    roles = ", ".join(sorted(principal.roles)) or "no roles"
    return AccessDecision(
        False,
        door,
        identity,
        principal,
        f"{principal.name} ({roles}) may not use the {door} endpoints",
    )


# The principal the current task acts for (set by each door once it admitted the caller). The
# initiating side reads it to carry the local caller into what it sends and audits, consent and
# the front doors' study access read it instead of anything a message claims.
_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "xca_gateway_caller", default=None
)


def current_caller() -> Principal | None:
    return _CURRENT.get()


def set_current_caller(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _CURRENT.set(principal)


def reset_current_caller(token: contextvars.Token[Principal | None]) -> None:
    _CURRENT.reset(token)


# What each door is, for the README's table.
DOOR_ENDPOINTS: Mapping[Door, str] = {
    Door.XCA: "`/xca/iti38`, `/xca/iti39`, `/xca/rad75`, `/xca/iti55`",
    Door.INITIATING: "`/ig/iti18`, `/ig/iti43`, `/ig/rad69`",
    Door.REGISTRY_QUERY: "`/registry/iti18`",
    Door.REGISTRY_REGISTER: "`/registry/iti42`",
    Door.REPOSITORY: "`/repository/iti43`",
    Door.PIX: "`/pix/iti45`",
    Door.DIAGNOSTICS: "`/diagnostics/echo`",
    Door.DICOMWEB: "DICOMweb port (QIDO-RS, WADO-RS)",
    Door.DIMSE: "DICOM port (C-FIND, C-GET, C-MOVE)",
    Door.MLLP: "MLLP port (HL7 v2 orders)",
    Door.SYSLOG: "ARR syslog (ITI-20)",
    Door.ITI81: "ARR `/fhir` (ITI-81), raw messages",
    Door.ADMIN: "admin `/consent/...`",
    Door.WEB: "web port (browser: IID launch, viewer, DICOMweb with IUA tokens)",
}


def access_table_markdown() -> str:
    """The README's table of which roles may call which door (generated, tested equal)."""
    roles = list(Role)
    head = "| door | endpoints | " + " | ".join(r.value for r in roles) + " |"
    rule = "|---|---|" + "---|" * len(roles)
    rows = [
        f"| `{door.value}` | {DOOR_ENDPOINTS[door]} | "
        + " | ".join("allow" if role in ACCESS[door] else "—" for role in roles)
        + " |"
        for door in Door
    ]
    return "\n".join([head, rule, *rows])
