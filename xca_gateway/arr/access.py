"""Who may use the audit record repository, and for what (sans-IO).

The repository has two doors of the caller model (:mod:`xca_gateway.security.callers`):

* ``syslog`` (ITI-20 ingest) for ``audit-source`` principals: recognised by their TLS client
  certificate or, over UDP when enabled, by a listed source address;
* ``iti81`` (FHIR AuditEvent search and the raw messages) for ``audit-consumer`` and
  ``security-officer`` principals. Signed-in officers of the review UI are security officers.

A trusted certificate alone admits nobody. Each audit source is also *bound* to the
AuditSourceIDs it may report as (``audit_source_ids``): a record whose AuditSourceID is not bound
to its authenticated sender is stored, since an audit record is never dropped, but flagged, so
that a node cannot pass its records off as another's. ``"*"`` binds any AuditSourceID (a relay
that forwards other nodes' records, e.g. a site's rsyslog).

Example::

    [[arr.access.callers]]
    name = "north gateway"
    roles = ["audit-source"]
    certificate_dns_names = ["north.example.org"]
    audit_source_ids = ["north-gateway"]

    [[arr.access.callers]]
    name = "SIEM"
    roles = ["audit-consumer"]
    certificate_fingerprints = ["3f:9a:..."]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xca_gateway.security.callers import CallerDirectory, CallerRule, Identity, Role
from xca_gateway.security.config import config_strings, parse_caller_rule
from xca_gateway.settings import ConfigError

# Binds every AuditSourceID (a relay forwarding other nodes' records).
ANY_SOURCE = "*"
SECTION = "arr.access.callers"


@dataclass(frozen=True)
class ArrAccess:
    """The repository's callers, and the AuditSourceIDs bound to each audit source."""

    callers: tuple[CallerRule, ...] = ()
    # Parallel to ``callers``: the AuditSourceIDs each entry may report as.
    audit_source_ids: tuple[frozenset[str], ...] = ()

    def directory(self) -> CallerDirectory:
        return CallerDirectory(self.callers)

    def bound_source_ids(self, identity: Identity) -> frozenset[str] | None:
        """The AuditSourceIDs a verified sender may report as; None means any."""
        bound: set[str] = set()
        for rule, ids in zip(self.callers, self.audit_source_ids, strict=True):
            if Role.AUDIT_SOURCE in rule.roles and rule.matches(identity):
                if ANY_SOURCE in ids:
                    return None
                bound |= ids
        return frozenset(bound)

    @property
    def udp_senders(self) -> frozenset[str]:
        """Addresses of audit sources that may send over UDP (when UDP is enabled)."""
        return frozenset(
            address
            for rule in self.callers
            if Role.AUDIT_SOURCE in rule.roles
            for address in rule.addresses
        )


def parse_access(table: Any) -> ArrAccess:
    """The ``[arr.access]`` table: ``callers`` entries with the keys of ``[[policy.callers]]``
    plus ``audit_source_ids`` for audit sources."""
    if not isinstance(table, dict):
        raise ConfigError("[arr.access] must be a table")
    unknown = set(table) - {"callers"}
    if unknown:
        raise ConfigError(f"[arr.access] unknown key(s): {', '.join(sorted(unknown))}")
    entries = table.get("callers", [])
    if not isinstance(entries, list):
        raise ConfigError(f"[[{SECTION}]] must be an array of tables")
    rules: list[CallerRule] = []
    bindings: list[frozenset[str]] = []
    for index, entry in enumerate(entries):
        rule = parse_caller_rule(
            entry, index, section=SECTION, extra_keys=("audit_source_ids",), error=ConfigError
        )
        what = f"{SECTION}[{rule.name}].audit_source_ids"
        ids = frozenset(config_strings(entry.get("audit_source_ids", []), what, ConfigError))
        if ids and Role.AUDIT_SOURCE not in rule.roles:
            raise ConfigError(f"{what}: only an audit-source entry reports as AuditSourceIDs")
        if any(not i.strip() for i in ids):
            raise ConfigError(f"{what}: empty AuditSourceID")
        rules.append(rule)
        bindings.append(ids)
    return ArrAccess(tuple(rules), tuple(bindings))


def access_toml(entries: Iterable[Mapping[str, Any]]) -> str:
    """``[[arr.access.callers]]`` tables for a generated configuration file."""
    import json

    lines: list[str] = []
    for entry in entries:
        lines.append(f"[[{SECTION}]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- syslog senders

SenderTransport = Literal["tls", "udp", "local"]


@dataclass(frozen=True)
class SenderGrant:
    """An admitted syslog sender: who it is (as stored with each record) and what it may
    report as."""

    # The authenticated sender: the certificate subject (TLS), ``udp:<address>`` (UDP: an
    # address only, not authenticated), ``local`` (the repository's own records).
    sender: str
    # None: any AuditSourceID (a relay, or the repository itself).
    audit_source_ids: frozenset[str] | None = field(default=None)

    def binds(self, audit_source_id: str | None) -> bool:
        if self.audit_source_ids is None:
            return True
        return audit_source_id is not None and audit_source_id in self.audit_source_ids


def sender_label(identity: Identity, transport: SenderTransport) -> str:
    """How a record names its sender: what was verified, and how."""
    if transport == "tls" and identity.certificate_subject:
        return identity.certificate_subject
    if transport == "udp":
        return f"udp:{identity.address}"
    return transport


def is_unauthenticated(sender_identity: str | None) -> bool:
    """A sender known only by its source address (UDP), which anyone on the path can forge."""
    return bool(sender_identity and sender_identity.startswith("udp:"))
