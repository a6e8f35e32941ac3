"""XUA and access policy configured in TOML, end to end through real gateways.

alpha (initiating) issues a signed XUA assertion for its consumer's query; beta (responding)
requires XUA from alpha, validates it, and lets only alpha call ITI-38. gamma, trusted by TLS
but not by the policy, is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from tests.test_client import _client
from tests.test_initiating import find_documents
from tests.test_server import ADHOC_QUERY, consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import QUERY, RS, SOAP12, XDSB, Action
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.security.operators import write_operator_token_file
from xca_gateway.security.policy import current_authorization

IDENTITY = {
    "name_id": "dr.smith",
    "subject_id": "Dr. Jane Smith",
    "organization": "North Hospital",
    "organization_id": "urn:oid:1.3.6.1.4.1.21367.13.40.1",
    "roles": ["2.16.840.1.113883.6.96|309343006"],
    "purposes_of_use": [{"code": "TREATMENT", "code_system": "2.16.840.1.113883.3.18.7.1"}],
}


def start(
    gateway_factory: Callable[..., Gateway], tmp: Path, name: str, port: int, **extra: Any
) -> Gateway:
    return gateway_factory(
        name,
        storage={"data_dir": str(tmp / name)},
        server={"host": "127.0.0.1", "port": port},
        **extra,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_xua_and_policy_from_configuration(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    alpha_port, beta_port = _free_port(), _free_port()
    alpha_url = f"https://127.0.0.1:{alpha_port}"
    beta = start(
        gateway_factory,
        tmp_path,
        "beta",
        beta_port,
        xua={
            "enabled": True,
            "trusted_issuers": [
                {"issuer": alpha_url, "certificates": [str(pki.communities["alpha"].cert)]}
            ],
        },
        policy={
            "default": "deny",
            "peers": [
                {
                    "name": "alpha",
                    "certificate_dns_names": ["alpha.xca-gateway.test"],
                    "transactions": ["ITI-38"],
                    "purposes_of_use": ["TREATMENT"],
                    "require_xua": True,
                }
            ],
            # The test client is only a local consumer here, not a peer gateway.
            "callers": [
                {
                    "name": "consumer",
                    "roles": ["local-consumer"],
                    "certificate_uris": ["urn:xca-gateway:client:consumer"],
                }
            ],
        },
    )
    alpha = start(
        gateway_factory,
        tmp_path,
        "alpha",
        alpha_port,
        xua={"outbound": {"mode": "issue", "identity": IDENTITY}},
        peers=[
            {
                "name": "beta",
                "home_community_id": beta.config.community.home_community_id,
                "iti38": beta.endpoint_urls()["iti38"],
                "iti39": beta.endpoint_urls()["iti39"],
            }
        ],
    )
    seen: list[dict[str, Any]] = []
    original = beta.endpoints["iti38"].operations[Action.ITI38]

    async def spy(request: Any) -> Any:
        auth = current_authorization()
        seen.append({"user": auth.assertion.user_name if auth and auth.assertion else None})
        return await original.handler(request)

    beta.endpoints["iti38"].add(type(original)(Action.ITI38, "ITI-38", spy))

    patient = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    with consumer(pki) as client:
        response = client.post(
            alpha.endpoint_urls()["iti18"],
            content=soap12(Action.ITI18, find_documents(patient)),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200
    # beta's handler ran for the assertion's user (its answer is a Failure: no registry).
    assert seen == [{"user": f"<dr.smith@{alpha_url}>"}]
    payload = etree.fromstring(response.content).find(
        f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse"
    )
    assert payload is not None
    codes = {e.get("errorCode") for e in payload.iter(f"{{{RS}}}RegistryError")}
    assert "LocalPolicyRestrictionError" not in codes and "XDSUnavailableCommunity" not in codes

    # A local consumer calling beta's responding side directly: TLS-trusted, but not a peer
    # gateway, so the door refuses it before reading the body.
    with consumer(pki) as client:
        direct = client.post(
            beta.endpoint_urls()["iti38"],
            content=soap12(Action.ITI38, ADHOC_QUERY),
            headers={"content-type": "application/soap+xml"},
        )
    assert direct.status_code == 403
    fault = etree.fromstring(direct.content).find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    assert fault is not None
    assert "may not use the xca endpoints" in "".join(fault.itertext())
    assert len(seen) == 1  # the handler never ran for the refused caller


async def test_transactions_not_allowed_for_a_peer_are_refused(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    beta = start(
        gateway_factory,
        tmp_path,
        "beta",
        _free_port(),
        policy={
            "peers": [
                {
                    "name": "alpha",
                    "certificate_dns_names": ["alpha.xca-gateway.test"],
                    "transactions": ["ITI-38"],
                }
            ]
        },
    )

    client = _client(pki)
    retrieve = etree.fromstring(
        f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"><xdsb:DocumentRequest>'
        f"<xdsb:HomeCommunityId>{beta.config.community.home_community_id}</xdsb:HomeCommunityId>"
        "<xdsb:RepositoryUniqueId>1.2.3</xdsb:RepositoryUniqueId>"
        "<xdsb:DocumentUniqueId>1.2.3.4</xdsb:DocumentUniqueId>"
        "</xdsb:DocumentRequest></xdsb:RetrieveDocumentSetRequest>"
    )
    try:
        # A policy refusal is the transaction's own Failure response, not a fault.
        reply = await client.call(
            beta.endpoint_urls()["iti39"], retrieve, Action.ITI39, use_mtom=True
        )
    finally:
        await client.aclose()
    codes = [e.get("errorCode") for e in reply.payload.iter(f"{{{RS}}}RegistryError")]
    assert codes == ["LocalPolicyRestrictionError"]


def test_consent_admin_api_on_the_admin_port(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    import urllib.parse

    import httpx

    token = write_operator_token_file(tmp_path / "operators", "ops-anna")
    gateway = gateway_factory(
        "alpha", consent={"enabled": True, "admin_token_file": str(tmp_path / "operators")}
    )
    patient = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    url = f"{gateway.admin_url}/consent/patients/{urllib.parse.quote(patient, safe='')}"
    assert httpx.put(url, json={"mode": "opt-out"}).status_code == 401  # operators only
    auth = {"authorization": f"Bearer {token}"}
    r = httpx.put(url, json={"mode": "opt-out"}, headers=auth)
    assert r.status_code == 200, r.text
    r = httpx.get(url, headers=auth)
    assert r.status_code == 200 and len(r.json()["rules"]) == 1
    assert gateway.consent is not None
    assert gateway.consent.decide_for_documents(patient, "urn:oid:1.2.3", [(None, None)]) == [False]
    # The rest of the admin port is unchanged.
    assert httpx.get(gateway.admin_url + "/healthz").status_code == 200
