"""Per-peer access policy of the responding gateway, hot-reloaded from TOML.

A peer community is recognised by its TLS client certificate (fingerprint, subject, DNS name, or
its homeCommunityId as a SAN URI); never by what a message claims. Each ``[[policy.peers]]``
entry says which transactions that peer may call, which purposes of use and roles (from its XUA
assertion) are accepted, and whether an assertion is required. Peers not listed are refused
unless ``default = "allow"`` (meant for demos).

:class:`PolicyStore` re-reads the policy file when it changes (checked at most once per
``min_interval``) and swaps the parsed policy in one assignment: requests in flight keep the
policy they started with, the next request sees the new one, no connection is touched, and a
file that does not parse leaves the previous policy in force (logged as an error).

:class:`AuthorizationGate` puts XUA validation and the policy in front of a SOAP operation.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from xca_gateway.audit.messages import (
    ActiveParticipant,
    AuditContext,
    AuditMessage,
    CodedValue,
    EventId,
    EventIdentification,
    EventOutcome,
    HumanRequestor,
    Node,
    ObjectRole,
    ObjectType,
    ParticipantObject,
    ParticipantObjectIdType,
    user_authentication,
)
from xca_gateway.protocol.http_server import PeerInfo
from xca_gateway.protocol.namespaces import ResponseStatus
from xca_gateway.protocol.soap_service import Operation, SoapRequest, SoapResponse
from xca_gateway.schema import (
    HomeCommunityId,
    NonEmpty,
    NonNegativeSeconds,
    PathText,
    Section,
    Strings,
)
from xca_gateway.security.callers import (
    CallerDirectory,
    CallerRule,
    Identity,
    Principal,
    Role,
)
from xca_gateway.security.config import CallerSection, parse_caller_rule
from xca_gateway.security.xua import (
    Ce,
    WsseFault,
    XuaAssertion,
    XuaConfig,
    XuaError,
    XuaValidator,
    audit_requestor,
    find_assertion,
    to_soap_fault,
)
from xca_gateway.transactions import TRANSACTIONS, TransactionSpec
from xca_gateway.xds.ebrs import (
    LOCAL_POLICY_RESTRICTION_ERROR,
    RegistryError,
    adhoc_query_response,
    retrieve_document_set_response,
)

log = logging.getLogger(__name__)

# ITI-55 (XCPD) sits on the responding side too (/xca/iti55) but is not an XDS transaction.
_NAMES = {t.name for t in TRANSACTIONS} | {"ITI-55"}


class PolicyError(ValueError):
    pass


def normalize_transaction(value: str) -> str:
    """``ITI-38``, ``iti38`` or ``ITI38`` → ``ITI-38`` (the Operation.transaction names)."""
    text = value.strip().upper().replace("_", "-")
    if "-" not in text:
        for prefix in ("ITI", "RAD"):
            if text.startswith(prefix):
                text = f"{prefix}-{text[len(prefix) :]}"
    if text not in _NAMES:
        raise PolicyError(f"unknown transaction {value!r} (one of {', '.join(sorted(_NAMES))})")
    return text


RESPONDING_TRANSACTIONS = frozenset(
    {*(t.name for t in TRANSACTIONS if t.side == "responding"), "ITI-55"}
)


def _fingerprint(value: str) -> str:
    return value.strip().lower().replace(":", "")


@dataclass(frozen=True)
class PeerIdentity:
    """What TLS proves about the caller."""

    certificate_subject: str | None = None
    certificate_fingerprint: str | None = None
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    address: str | None = None

    @classmethod
    def from_peer(cls, peer: PeerInfo) -> PeerIdentity:
        cert = peer.certificate
        if cert is None:
            return cls(address=peer.address)
        return cls(
            certificate_subject=cert.subject,
            certificate_fingerprint=_fingerprint(cert.fingerprint_sha256),
            san_dns=cert.san_dns,
            san_uri=cert.san_uri,
            address=peer.address,
        )

    def describe(self) -> str:
        return self.certificate_subject or self.address or "unknown peer"


@dataclass(frozen=True)
class PeerRule:
    name: str
    home_community_id: str | None = None
    certificate_subjects: frozenset[str] = frozenset()
    certificate_fingerprints: frozenset[str] = frozenset()
    certificate_dns_names: frozenset[str] = frozenset()
    transactions: frozenset[str] = RESPONDING_TRANSACTIONS
    # ``code`` or ``codeSystem|code``; empty = no restriction.
    purposes_of_use: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    require_xua: bool = False
    # With [xua] enabled an assertion is required from every peer unless it is exempted here
    # (logged at start-up).
    xua_exempt: bool = False

    def caller_rule(self) -> CallerRule:
        """This peer as a principal of the caller model: a peer gateway of its community."""
        return CallerRule(
            name=self.name,
            roles=frozenset({Role.PEER_GATEWAY}),
            home_community_id=self.home_community_id,
            certificate_subjects=self.certificate_subjects,
            certificate_fingerprints=self.certificate_fingerprints,
            certificate_dns_names=self.certificate_dns_names,
        )

    def matches(self, peer: PeerIdentity) -> bool:
        if peer.certificate_fingerprint and peer.certificate_fingerprint in (
            self.certificate_fingerprints
        ):
            return True
        if peer.certificate_subject and peer.certificate_subject in self.certificate_subjects:
            return True
        if self.certificate_dns_names & set(peer.san_dns):
            return True
        # A homeCommunityId bound into the certificate by the affinity domain's CA.
        return bool(self.home_community_id and self.home_community_id in peer.san_uri)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    # RegistryError code for a refusal answered in the transaction's own response.
    error_code: str | None = None
    peer_name: str | None = None
    home_community_id: str | None = None
    # Set when the refusal is a WS-Security matter (assertion required but absent).
    fault_code: str | None = None


def _accepts(values: tuple[Ce, ...], patterns: tuple[str, ...]) -> bool:
    return any(ce.matches(p) for ce in values for p in patterns)


@dataclass(frozen=True)
class AccessPolicy:
    peers: tuple[PeerRule, ...] = ()
    # "allow" (development only, warned about at start-up): a trusted certificate that no entry
    # names is taken for a peer gateway of no known community on /xca/* (nowhere else).
    default: Literal["deny", "allow"] = "deny"
    # XUA requirement for peers allowed by ``default = "allow"``.
    require_xua: bool = False
    # The community's own systems and the people/services of other doors ([[policy.callers]]).
    callers: tuple[CallerRule, ...] = ()

    @functools.cached_property
    def directory(self) -> CallerDirectory:
        """Every principal this policy knows: peers first, then local callers."""
        rules = [p.caller_rule() for p in self.peers] + list(self.callers)
        return CallerDirectory(tuple(rules))

    def identify(self, identity: Identity) -> Principal | None:
        principal = self.directory.identify(identity)
        if principal is None and self.default == "allow" and identity.has_certificate:
            return Principal("(default)", frozenset({Role.PEER_GATEWAY}), identity)
        return principal

    def caller_directory(self) -> CallerDirectory:
        """The directory the door guard consults (``default = "allow"`` included)."""
        if self.default != "allow":
            return self.directory
        return _AllowUnknownPeers(self.directory.rules)

    def match(self, peer: PeerIdentity) -> PeerRule | None:
        rule = next((rule for rule in self.peers if rule.matches(peer)), None)
        if rule is not None:
            return rule
        # A [[policy.callers]] entry that also holds the peer-gateway role (e.g. a test client
        # or a system acting for a community that is not a configured peer).
        identity = Identity(
            address=peer.address,
            certificate_subject=peer.certificate_subject,
            certificate_fingerprint=peer.certificate_fingerprint,
            san_dns=peer.san_dns,
            san_uri=peer.san_uri,
        )
        for caller in self.callers:
            if Role.PEER_GATEWAY in caller.roles and caller.matches(identity):
                return PeerRule(
                    name=caller.name,
                    home_community_id=caller.home_community_id,
                    certificate_fingerprints=caller.certificate_fingerprints,
                    certificate_subjects=caller.certificate_subjects,
                    certificate_dns_names=caller.certificate_dns_names,
                    require_xua=self.require_xua,
                )
        return None

    def requires_xua(self, peer: PeerIdentity) -> bool:
        rule = self.match(peer)
        return rule.require_xua if rule is not None else self.require_xua

    def decide(
        self,
        peer: PeerIdentity,
        transaction: str,
        assertion: XuaAssertion | None,
        *,
        xua_enabled: bool = False,
    ) -> Decision:
        """``xua_enabled``: ``[xua] enabled`` means an assertion is required, unless the peer
        is exempted (``xua_exempt``)."""
        rule = self.match(peer)
        if rule is None:
            if self.default != "allow":
                return Decision(
                    False,
                    "the requesting system is not known to this community's access policy",
                    LOCAL_POLICY_RESTRICTION_ERROR,
                )
            rule = PeerRule(name="(default)", require_xua=self.require_xua)

        def deny(reason: str, fault_code: str | None = None) -> Decision:
            return Decision(
                False,
                reason,
                None if fault_code else LOCAL_POLICY_RESTRICTION_ERROR,
                rule.name,
                rule.home_community_id,
                fault_code,
            )

        if transaction not in rule.transactions:
            return deny(f"{transaction} is not permitted for this peer")
        required = rule.require_xua or (xua_enabled and not rule.xua_exempt)
        if required and assertion is None:
            return deny("an XUA assertion is required", WsseFault.INVALID_SECURITY)
        if (
            assertion is not None
            and assertion.home_community_id
            and rule.home_community_id
            and assertion.home_community_id != rule.home_community_id
        ):
            # ITI TF-2 3.40.4.1.3: the user's community must be the one the TLS peer belongs to.
            return deny(
                f"the assertion's homeCommunityId {assertion.home_community_id} is not the "
                f"peer's community"
            )
        if rule.purposes_of_use and (
            assertion is None or not _accepts(assertion.purposes_of_use, rule.purposes_of_use)
        ):
            return deny("purpose of use not accepted")
        if rule.roles and (assertion is None or not _accepts(assertion.roles, rule.roles)):
            return deny("role not accepted")
        return Decision(
            True, f"permitted by policy entry {rule.name}", None, rule.name, rule.home_community_id
        )


class _AllowUnknownPeers(CallerDirectory):
    """``default = "allow"``: an unknown trusted certificate is an anonymous peer gateway."""

    def identify(self, identity: Identity) -> Principal | None:
        principal = super().identify(identity)
        if principal is None and identity.has_certificate:
            return Principal("(default)", frozenset({Role.PEER_GATEWAY}), identity)
        return principal


# --------------------------------------------------------------------------- configuration


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{what} must be a list of strings")
    return tuple(value)


class PolicyPeerSection(Section):
    """A peer gateway that may call the responding side, and what it may do there."""

    name: NonEmpty | None = Field(None, description="Its name in logs.", examples=["south"])
    home_community_id: HomeCommunityId | None = Field(
        None, description="Its homeCommunityId.", examples=["urn:oid:1.3.6.1.4.1.21367.13.70.2"]
    )
    certificate_subjects: Strings = Field([], description="Certificate subjects (RFC 4514).")
    certificate_fingerprints: Strings = Field(
        [], description="SHA-256 fingerprints of its certificates (hex)."
    )
    certificate_dns_names: Strings = Field(
        [], description="DNS names of its certificate.", examples=[["south.xca-gateway.test"]]
    )
    transactions: Strings | None = Field(
        None,
        description="Transactions it may call (default: every responding transaction).",
        examples=[["ITI-38", "ITI-39", "RAD-75"]],
    )
    purposes_of_use: Strings = Field(
        [], description="Purposes of use its XUA assertion must state (empty: any)."
    )
    roles: Strings = Field([], description="Roles its XUA assertion must state (empty: any).")
    require_xua: bool | None = Field(
        None,
        description="Its requests must carry a valid XUA assertion (default: the section's).",
        examples=[True],
    )
    xua_exempt: bool = Field(False, description="Exempt from require_xua.")


class PolicySection(Section):
    """The access policy of every door. Absent: every peer whose certificate chains to the
    trust store may call every responding transaction. Present: deny by default; peers in
    [[policy.peers]], every other system in [[policy.callers]] with its roles. The file is
    re-read when it changes (no connection is dropped)."""

    default: Literal["deny", "allow"] = Field(
        "deny", description="What a caller no entry names gets."
    )
    require_xua: bool = Field(False, description="Peers' requests must carry XUA assertions.")
    peers: list[PolicyPeerSection] = Field([], description="Peer gateways.")
    callers: list[CallerSection] = Field([], description="Every other system that calls us.")
    file: PathText | None = Field(
        None,
        description="Rules live in this TOML file instead (a [policy] table or its keys), watched.",
        examples=["policy.toml"],
    )
    reload_interval: NonNegativeSeconds = Field(
        1.0, description="Seconds between two checks of the file for changes."
    )


_RULE_KEYS = {
    "name",
    "home_community_id",
    "certificate_subjects",
    "certificate_fingerprints",
    "certificate_dns_names",
    "transactions",
    "purposes_of_use",
    "roles",
    "require_xua",
    "xua_exempt",
}


def _caller(table: Any, index: int) -> CallerRule:
    # The same entry keys wherever a caller is configured (the ARR's [[arr.access.callers]] too).
    return parse_caller_rule(table, index, section="policy.callers", error=PolicyError)


def _rule(table: Any, index: int, require_xua: bool) -> PeerRule:
    if not isinstance(table, dict):
        raise PolicyError("[[policy.peers]] must be an array of tables")
    name = table.get("name") or table.get("home_community_id") or f"peer {index + 1}"
    what = f"policy.peers[{name}]"
    unknown = set(table) - _RULE_KEYS
    if unknown:
        raise PolicyError(f"{what}: unknown key(s): {', '.join(sorted(unknown))}")
    hcid = table.get("home_community_id")
    if hcid is not None and (not isinstance(hcid, str) or not hcid.startswith("urn:oid:")):
        raise PolicyError(f"{what}.home_community_id must be urn:oid:<OID>")
    rule = PeerRule(
        name=str(name),
        home_community_id=hcid,
        certificate_subjects=frozenset(
            _strings(table.get("certificate_subjects", []), f"{what}.certificate_subjects")
        ),
        certificate_fingerprints=frozenset(
            _fingerprint(f)
            for f in _strings(
                table.get("certificate_fingerprints", []), f"{what}.certificate_fingerprints"
            )
        ),
        certificate_dns_names=frozenset(
            _strings(table.get("certificate_dns_names", []), f"{what}.certificate_dns_names")
        ),
        transactions=(
            frozenset(
                normalize_transaction(t)
                for t in _strings(table["transactions"], f"{what}.transactions")
            )
            if "transactions" in table
            else RESPONDING_TRANSACTIONS
        ),
        purposes_of_use=_strings(table.get("purposes_of_use", []), f"{what}.purposes_of_use"),
        roles=_strings(table.get("roles", []), f"{what}.roles"),
        require_xua=table.get("require_xua", require_xua),
        xua_exempt=table.get("xua_exempt", False),
    )
    if not isinstance(rule.require_xua, bool):
        raise PolicyError(f"{what}.require_xua must be true or false")
    if not isinstance(rule.xua_exempt, bool):
        raise PolicyError(f"{what}.xua_exempt must be true or false")
    if not (
        rule.certificate_subjects
        or rule.certificate_fingerprints
        or rule.certificate_dns_names
        or rule.home_community_id
    ):
        raise PolicyError(f"{what}: name the peer by certificate or home_community_id")
    return rule


def parse_access_policy(table: dict[str, Any]) -> AccessPolicy:
    """The policy rules of a ``[policy]`` table (``file`` is ignored here)."""
    unknown = set(table) - {
        "default",
        "require_xua",
        "peers",
        "callers",
        "file",
        "reload_interval",
    }
    if unknown:
        raise PolicyError(f"[policy] unknown key(s): {', '.join(sorted(unknown))}")
    default = table.get("default", "deny")
    if default not in ("deny", "allow"):
        raise PolicyError('policy.default must be "deny" or "allow"')
    require_xua = table.get("require_xua", False)
    if not isinstance(require_xua, bool):
        raise PolicyError("policy.require_xua must be true or false")
    peers = table.get("peers", [])
    if not isinstance(peers, list):
        raise PolicyError("[[policy.peers]] must be an array of tables")
    callers = table.get("callers", [])
    if not isinstance(callers, list):
        raise PolicyError("[[policy.callers]] must be an array of tables")
    return AccessPolicy(
        peers=tuple(_rule(p, i, require_xua) for i, p in enumerate(peers)),
        default=default,
        require_xua=require_xua,
        callers=tuple(_caller(c, i) for i, c in enumerate(callers)),
    )


@dataclass(frozen=True)
class PolicyConfig:
    """The ``[policy]`` section: inline rules, or a separate file that is watched."""

    policy: AccessPolicy = field(default_factory=AccessPolicy)
    # Rules live here (a TOML file with a [policy] table, or the table's keys at top level).
    file: Path | None = None
    reload_interval: float = 1.0


def parse_policy_config(table: dict[str, Any], base_dir: Path) -> PolicyConfig:
    file: Path | None = None
    if "file" in table:
        if not isinstance(table["file"], str):
            raise PolicyError("policy.file must be a path string")
        file = Path(table["file"]).expanduser()
        file = file if file.is_absolute() else (base_dir / file).resolve()
    interval = table.get("reload_interval", 1.0)
    if not isinstance(interval, int | float) or interval < 0:
        raise PolicyError("policy.reload_interval must be a number >= 0")
    inline = {k: v for k, v in table.items() if k not in ("file", "reload_interval")}
    policy = load_policy_file(file) if file is not None else parse_access_policy(inline)
    return PolicyConfig(policy=policy, file=file, reload_interval=float(interval))


def load_policy_file(path: Path) -> AccessPolicy:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise PolicyError(f"policy file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    if "policy" in data:
        table = data["policy"]
    elif "community" in data:
        table = {}  # the gateway's own configuration without a [policy] section
    else:
        table = data  # a dedicated policy file with the table's keys at top level
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: [policy] must be a table")
    return parse_access_policy(table)


# --------------------------------------------------------------------------- hot reload


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyStore:
    """The current :class:`AccessPolicy`, re-read from ``path`` when the file changes."""

    def __init__(
        self,
        policy: AccessPolicy,
        path: Path | None = None,
        *,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self.path = path
        self.min_interval = min_interval
        self._clock = clock
        self._checked = clock()
        self._seen = _signature(path) if path is not None else None
        self._lock = threading.Lock()
        self.reloads = 0
        self.failed_reloads = 0

    @classmethod
    def from_config(cls, config: PolicyConfig, config_path: Path | None = None) -> PolicyStore:
        """Watch ``policy.file``, else the gateway's own configuration file (its [policy])."""
        return cls(
            config.policy,
            config.file or config_path,
            min_interval=config.reload_interval,
        )

    @property
    def policy(self) -> AccessPolicy:
        if self.path is not None and self._clock() - self._checked >= self.min_interval:
            self._maybe_reload()
        return self._policy

    def _maybe_reload(self) -> None:
        # One checker at a time; everyone else goes on with the policy in force.
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = self._clock()
            assert self.path is not None
            signature = _signature(self.path)
            if signature is None or signature == self._seen:
                return
            self._seen = signature
            try:
                policy = load_policy_file(self.path)
            except (PolicyError, OSError) as exc:
                self.failed_reloads += 1
                log.error(
                    "access policy %s not reloaded, previous policy stays: %s", self.path, exc
                )
                return
            self._policy = policy
            self.reloads += 1
            log.info(
                "access policy reloaded from %s (%d peer entries)", self.path, len(policy.peers)
            )
        finally:
            self._lock.release()

    def decide(
        self,
        peer: PeerIdentity,
        transaction: str,
        assertion: XuaAssertion | None,
        *,
        xua_enabled: bool = False,
    ) -> Decision:
        return self.policy.decide(peer, transaction, assertion, xua_enabled=xua_enabled)


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Authorization:
    """What the gate established for the request being handled."""

    peer: PeerIdentity
    transaction: str
    assertion: XuaAssertion | None
    decision: Decision


@dataclass(frozen=True)
class Refusal:
    """A request the gate refused, for the audit trail."""

    kind: Literal["xua", "policy"]
    transaction: str
    peer: PeerInfo
    reason: str
    # wsse:... for XUA refusals, the RegistryError code for policy refusals.
    code: str
    assertion: XuaAssertion | None = None
    endpoint: str | None = None
    when: datetime | None = None


_CURRENT: contextvars.ContextVar[Authorization | None] = contextvars.ContextVar(
    "xca_gateway_authorization", default=None
)


def current_authorization() -> Authorization | None:
    """The gate's result for the request this task is handling (None if not gated)."""
    return _CURRENT.get()


def _spec_for(operation: Operation) -> TransactionSpec | None:
    return next((t for t in TRANSACTIONS if t.action == operation.action), None)


def refusal_response(
    operation: Operation, error_code: str, reason: str, home_community_id: str
) -> SoapResponse:
    """The transaction's own response with status Failure and one RegistryError."""
    spec = _spec_for(operation)
    error = RegistryError(error_code, reason, location=home_community_id)
    if spec is None or spec.kind == "query":
        action = spec.response_action if spec else operation.action + "Response"
        return SoapResponse(
            adhoc_query_response(ResponseStatus.FAILURE, [error]), action, outcome="failure"
        )
    return SoapResponse(
        retrieve_document_set_response(ResponseStatus.FAILURE, [error]),
        spec.response_action,
        mtom=True,
        outcome="failure",
    )


class AuthorizationGate:
    """XUA validation + access policy in front of the responding gateway's operations.

    ``authorize`` raises a :class:`~xca_gateway.protocol.soap.SoapFault` for WS-Security failures,
    returns a refusal response for policy denials, and returns None (after recording the
    :class:`Authorization` for :func:`current_authorization`) when the handler may run.
    """

    def __init__(
        self,
        policy: PolicyStore | AccessPolicy,
        validator: XuaValidator | None,
        *,
        home_community_id: str,
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.policy = policy
        self.validator = validator
        self.home_community_id = home_community_id
        self.on_refusal = on_refusal

    @classmethod
    def from_config(
        cls,
        xua: XuaConfig,
        policy: PolicyConfig,
        *,
        home_community_id: str,
        default_audiences: Iterable[str],
        config_path: Path | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> AuthorizationGate:
        """The gate of a gateway: ``[xua]`` validation (if enabled) and the ``[policy]`` store."""
        validator = XuaValidator(xua, default_audiences=default_audiences) if xua.enabled else None
        return cls(
            PolicyStore.from_config(policy, config_path),
            validator,
            home_community_id=home_community_id,
            on_refusal=on_refusal,
        )

    def _report(self, refusal: Refusal) -> None:
        log.warning(
            "%s refused for %s (%s): %s [%s]",
            refusal.transaction,
            refusal.peer.certificate.subject if refusal.peer.certificate else refusal.peer.address,
            refusal.assertion.user_name if refusal.assertion else "no XUA user",
            refusal.reason,
            refusal.code,
        )
        if self.on_refusal is not None:
            try:
                self.on_refusal(refusal)
            except Exception:
                log.exception("refusal callback failed")

    async def authorize(self, request: SoapRequest, operation: Operation) -> SoapResponse | None:
        peer = PeerIdentity.from_peer(request.peer)
        transaction = operation.transaction
        header = request.envelope.header
        assertion: XuaAssertion | None = None
        try:
            present = find_assertion(header) is not None
            if present and self.validator is not None:
                cert = request.peer.certificate
                assertion = await self.validator.validate_async(
                    header, peer_certificate_der=cert.der if cert is not None else None
                )
        except XuaError as exc:
            self._report(
                Refusal(
                    "xua",
                    transaction,
                    request.peer,
                    exc.reason,
                    exc.fault_code,
                    exc.assertion,
                    request.http.path,
                )
            )
            raise to_soap_fault(exc) from None
        decision = self.policy.decide(
            peer, transaction, assertion, xua_enabled=self.validator is not None
        )
        if decision.allowed and assertion is not None and self.validator is not None:
            # A trusted identity provider vouches only for the communities it is bound to.
            issuer = self.validator.trusted_issuer(assertion.issuer)
            if issuer is not None and not issuer.may_vouch_for(decision.home_community_id):
                reason = (
                    f"identity provider {assertion.issuer} may not vouch for users of "
                    f"{decision.home_community_id or 'an unknown community'}"
                )
                self._report(
                    Refusal(
                        "xua",
                        transaction,
                        request.peer,
                        reason,
                        WsseFault.FAILED_AUTHENTICATION,
                        assertion,
                        request.http.path,
                    )
                )
                raise to_soap_fault(XuaError(WsseFault.FAILED_AUTHENTICATION, reason))
        if not decision.allowed:
            if decision.fault_code is not None:
                error = XuaError(decision.fault_code, decision.reason)
                self._report(
                    Refusal(
                        "xua",
                        transaction,
                        request.peer,
                        decision.reason,
                        decision.fault_code,
                        None,
                        request.http.path,
                    )
                )
                raise to_soap_fault(error)
            code = decision.error_code or LOCAL_POLICY_RESTRICTION_ERROR
            self._report(
                Refusal(
                    "policy",
                    transaction,
                    request.peer,
                    decision.reason,
                    code,
                    assertion,
                    request.http.path,
                )
            )
            return refusal_response(
                operation, code, f"access denied: {decision.reason}", self.home_community_id
            )
        authorization = Authorization(peer, transaction, assertion, decision)
        _CURRENT.set(authorization)
        # Also on the request: its audit record is written when the answer has been sent,
        # from the connection's context, where this task's context variables are not set.
        request.context["authorization"] = authorization
        return None

    def protect(self, operation: Operation) -> Operation:
        """``operation`` with the gate in front of its handler."""
        inner = operation.handler

        async def gated(request: SoapRequest) -> SoapResponse:
            refused = await self.authorize(request, operation)
            if refused is not None:
                return refused
            return await inner(request)

        return Operation(operation.action, operation.transaction, gated)

    def protect_all(self, operations: Iterable[Operation]) -> list[Operation]:
        return [self.protect(op) for op in operations]


# --------------------------------------------------------------------------- audit


def refusal_audit_message(
    ctx: AuditContext, refusal: Refusal, *, local_user_id: str
) -> AuditMessage:
    """The ATNA record of a refusal (an ``xca_gateway.audit.messages.AuditMessage``).

    XUA refusals are a failed User Authentication (110114 / Login, DICOM PS3.15 A.5.3.3) naming the
    claimed user; policy refusals a Security Alert (110113) of type "Use of Restricted Function"
    (DICOM CID 401 110132) naming the peer, the XUA user if any, and the reason.
    """

    peer = refusal.peer
    subject = peer.certificate.subject if peer.certificate else None
    remote = Node(subject or peer.address, peer.address, None, subject)
    local = ctx.local_node(local_user_id)
    description = f"{refusal.transaction} refused ({refusal.code}): {refusal.reason}"
    if refusal.kind == "xua":
        user = (
            audit_requestor(refusal.assertion)
            if refusal.assertion is not None
            else HumanRequestor(f"<unauthenticated@{subject or peer.address}>")
        )
        return user_authentication(
            ctx,
            event="login",
            user=user,
            authenticator=local,
            user_node=remote,
            outcome=EventOutcome.MINOR_FAILURE,
            outcome_description=description,
            when=refusal.when,
        )
    participants = [
        ActiveParticipant(
            user_id=remote.user_id,
            user_is_requestor=refusal.assertion is None,
            user_name=subject,
            network_access_point_id=peer.address,
        )
    ]
    if refusal.assertion is not None:
        human = audit_requestor(refusal.assertion)
        participants.append(
            ActiveParticipant(
                user_id=human.user_id,
                user_is_requestor=True,
                user_name=human.user_name,
                role_id_codes=human.roles,
            )
        )
    participants.append(
        ActiveParticipant(
            user_id=local.user_id,
            user_is_requestor=False,
            alternative_user_id=local.alternative_user_id,
            network_access_point_id=local.network_access_point,
        )
    )
    return AuditMessage(
        event=EventIdentification(
            event_id=EventId.SECURITY_ALERT,
            action="E",
            outcome=EventOutcome.MINOR_FAILURE,
            date_time=refusal.when or datetime.now(UTC),
            type_codes=(CodedValue("110132", "DCM", "Use of Restricted Function"),),
            outcome_description=description,
        ),
        participants=tuple(participants),
        source=ctx.audit_source,
        objects=(
            ParticipantObject(
                object_id=refusal.endpoint or refusal.transaction,
                id_type_code=ParticipantObjectIdType.URI,
                type_code=ObjectType.SYSTEM_OBJECT,
                type_code_role=ObjectRole.SECURITY_RESOURCE,
                details=(("Alert Description", description.encode()),),
            ),
        ),
    )
