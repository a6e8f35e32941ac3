"""The access policies benchmark gateways run under (the deny-by-default caller model).

A certificate from the trust store gets nothing unless the gateway's ``[policy]`` names it, so
every benchmark gateway lists exactly the callers of that benchmark, with the roles a real
deployment would give them:

* the benchmark's consumer (the development PKI's ``client`` certificate, URI SAN
  ``urn:xca-gateway:client:consumer``) as a *local consumer* where it calls ``/ig/*``,
  DICOMweb or the diagnostics echo;
* another gateway's certificate (DNS SAN ``<name>.xca-gateway.test``) in ``[[policy.peers]]``
  where it calls ``/xca/*``. A benchmark that calls ``/xca/*`` itself does so with a community
  certificate listed as a peer, never by giving the consumer the peer-gateway role;
* at the audit record repository (``[[arr.access.callers]]``), a gateway certificate as an
  *audit source* bound to the AuditSourceIDs it reports as, and the consumer as an *audit
  consumer* searching with ITI-81.

Imported by the benchmark scripts (``python benchmarks/<name>.py`` puts this directory on the
path) and by ``tests/test_benchmarks.py``, which checks each generated configuration.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from xca_gateway.security.dev_pki import COMMUNITY_DOMAIN

# The URI SAN of the development PKI's client certificate (xca_gateway.security.dev_pki).
CONSUMER_URI = "urn:xca-gateway:client:consumer"


def gateway_dns_name(community: str) -> str:
    """The DNS SAN of a development PKI community (gateway) certificate."""
    return f"{community}.{COMMUNITY_DOMAIN}"


def consumer(name: str = "bench-consumer") -> dict[str, Any]:
    """The benchmark's consumer (dev PKI ``client``): /ig/*, DICOMweb, diagnostics."""
    return {"name": name, "roles": ["local-consumer"], "certificate_uris": [CONSUMER_URI]}


def local_consumer_gateway(community: str) -> dict[str, Any]:
    """A gateway certificate calling a system of its own community as a local consumer (e.g.
    the responding imaging gateway retrieving from the community's imaging document source)."""
    return {
        "name": f"{community}-gateway",
        "roles": ["local-consumer"],
        "certificate_dns_names": [gateway_dns_name(community)],
    }


def peer(community: str, home_community_id: str) -> dict[str, Any]:
    """A peer gateway of ``home_community_id``, recognised by its certificate's DNS SAN."""
    return {
        "name": community,
        "home_community_id": home_community_id,
        "certificate_dns_names": [gateway_dns_name(community)],
    }


def policy(
    *, callers: Iterable[dict[str, Any]] = (), peers: Iterable[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A ``[policy]`` table: deny by default, these callers and peers only."""
    return {"default": "deny", "callers": list(callers), "peers": list(peers)}


def policy_toml(table: dict[str, Any]) -> str:
    """``table`` (from :func:`policy`) as the TOML ``[policy]`` section of a gateway config."""
    lines = ["[policy]", f"default = {json.dumps(table.get('default', 'deny'))}"]
    for key in ("callers", "peers"):
        for entry in table.get(key, []):
            lines.append(f"[[policy.{key}]]")
            # A JSON string or array of strings is valid TOML.
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def audit_source(community: str, audit_source_ids: Iterable[str]) -> dict[str, Any]:
    """A gateway sending its audit records (ITI-20), bound to the AuditSourceIDs it reports
    as; an ``[[arr.access.callers]]`` entry."""
    return {
        "name": f"{community}-gateway",
        "roles": ["audit-source"],
        "certificate_dns_names": [gateway_dns_name(community)],
        "audit_source_ids": list(audit_source_ids),
    }


def audit_consumer(name: str = "bench-audit-consumer") -> dict[str, Any]:
    """The benchmark's consumer (dev PKI ``client``) searching the repository with ITI-81."""
    return {"name": name, "roles": ["audit-consumer"], "certificate_uris": [CONSUMER_URI]}
