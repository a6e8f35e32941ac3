"""Configuration of the caller model: one ``callers`` entry (TOML table) → :class:`CallerRule`.

The gateway's ``[[policy.callers]]`` and the audit record repository's ``[[arr.access.callers]]``
use the same keys, parsed here, so that a principal is described the same way wherever it calls.
A listener that needs more per caller (the repository binds AuditSourceIDs to its audit sources)
names its extra keys and reads them itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import Field

from xca_gateway.schema import HomeCommunityId, NonEmpty, OneOf, OneOrMany, Section, Strings
from xca_gateway.security.callers import CallerRule, Role, normalize_fingerprint

CALLER_KEYS = frozenset(
    {
        "name",
        "roles",
        "home_community_id",
        "certificate_subjects",
        "certificate_fingerprints",
        "certificate_dns_names",
        "certificate_uris",
        "token_issuers",
        "ae_titles",
        "addresses",
    }
)


RoleName = Annotated[str, OneOf(tuple(role.value for role in Role))]


class CallerSection(Section):
    """A system that may call the gateway (other than a peer gateway): its roles, and how it
    is recognised: by certificate (subject, SHA-256 fingerprint, DNS or URI SAN), or, for plain
    listeners on loopback, by address; a DICOM caller also by its calling AE titles."""

    name: NonEmpty | None = Field(
        None, description="Its name in logs and audit records.", examples=["reading-room-1"]
    )
    roles: Annotated[list[RoleName], Field(min_length=1), OneOrMany()] = Field(
        description="Its roles (at least one).", examples=[["local-consumer"]]
    )
    home_community_id: HomeCommunityId | None = Field(
        None,
        description="The community it belongs to.",
        examples=["urn:oid:1.3.6.1.4.1.21367.13.70.1"],
    )
    certificate_subjects: Strings = Field([], description="Certificate subjects (RFC 4514).")
    certificate_fingerprints: Strings = Field(
        [], description="SHA-256 fingerprints of its certificates (hex)."
    )
    certificate_dns_names: Strings = Field(
        [], description="DNS names of its certificate.", examples=[["ws1.north.example.org"]]
    )
    certificate_uris: Strings = Field([], description="URI SANs of its certificate.")
    ae_titles: Strings = Field(
        [],
        description="Calling AE titles it may use (DIMSE), tied to its certificate or address.",
        examples=[["WORKSTATION1"]],
    )
    addresses: Strings = Field(
        [], description="Addresses it calls from (plain listeners on loopback only)."
    )
    token_issuers: Strings = Field(
        [],
        description=(
            "A person at the web door: the issuers of the verified tokens (IUA) it matches."
        ),
        examples=[["https://auth.north.example.org"]],
    )


class CallerConfigError(ValueError):
    """A ``callers`` entry that cannot be used."""


def config_strings(
    value: Any, what: str, error: type[ValueError] = CallerConfigError
) -> tuple[str, ...]:
    """A string or a list of strings (a lone string is a list of one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise error(f"{what} must be a list of strings")
    return tuple(value)


def parse_caller_rule(
    table: Any,
    index: int,
    *,
    section: str = "policy.callers",
    extra_keys: Iterable[str] = (),
    error: type[ValueError] = CallerConfigError,
) -> CallerRule:
    """One caller entry; ``section`` names it in messages, ``extra_keys`` are left to the
    caller, and ``error`` is the exception type raised for a bad entry."""
    if not isinstance(table, dict):
        raise error(f"[[{section}]] must be an array of tables")
    name = str(table.get("name") or f"caller {index + 1}")
    what = f"{section}[{name}]"
    unknown = set(table) - CALLER_KEYS - set(extra_keys)
    if unknown:
        raise error(f"{what}: unknown key(s): {', '.join(sorted(unknown))}")

    def strings(key: str) -> frozenset[str]:
        return frozenset(config_strings(table.get(key, []), f"{what}.{key}", error))

    roles: set[Role] = set()
    for value in config_strings(table.get("roles", []), f"{what}.roles", error):
        try:
            roles.add(Role(value))
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise error(f"{what}.roles: unknown role {value!r} (one of {known})") from None
    if not roles:
        raise error(f"{what}.roles: name at least one role")
    hcid = table.get("home_community_id")
    if hcid is not None and not isinstance(hcid, str):
        raise error(f"{what}.home_community_id must be a string")
    rule = CallerRule(
        name=name,
        roles=frozenset(roles),
        home_community_id=hcid,
        certificate_subjects=strings("certificate_subjects"),
        certificate_fingerprints=frozenset(
            normalize_fingerprint(f) for f in strings("certificate_fingerprints")
        ),
        certificate_dns_names=strings("certificate_dns_names"),
        certificate_uris=strings("certificate_uris"),
        ae_titles=strings("ae_titles"),
        addresses=strings("addresses"),
        token_issuers=strings("token_issuers"),
    )
    if not (
        rule.certificate_subjects
        or rule.certificate_fingerprints
        or rule.certificate_dns_names
        or rule.certificate_uris
        or rule.addresses
        or rule.token_issuers
    ):
        raise error(
            f"{what}: name the caller by certificate, (loopback) addresses or token_issuers"
        )
    return rule
