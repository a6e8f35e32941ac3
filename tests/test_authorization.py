"""Regression tests for the authorization findings of the caller-model work, each through real
gateways on mutual TLS: what a message claims never widens what a certificate may do."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pytest
from lxml import etree

from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import QUERY, RIM, RS, SOAP12, WSA, Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.registry import open_registry
from xca_gateway.repository import DocumentRepository
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.security.xua import (
    Ce,
    XuaIdentity,
    issue_assertion,
    load_signing_key,
    wsse_security_header,
)
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study
from xca_gateway.tools.import_manifests import import_studies

ARC = "1.3.6.1.4.1.21367.13"
ALPHA, BETA, GAMMA = (f"urn:oid:{ARC}.70.{i}" for i in (1, 2, 3))
AUTHORITY = f"{ARC}.20.2000"
REPOSITORY = f"{ARC}.80.2"
SOURCE = f"{ARC}.81.2"
PATIENT = f"C02-2001^^^&{AUTHORITY}&ISO"


def peer_policy(**alpha: Any) -> dict[str, Any]:
    """beta's policy: alpha and gamma are peers of their communities, nothing else."""
    return {
        "default": "deny",
        "callers": [],
        "peers": [
            {
                "name": "alpha",
                "home_community_id": ALPHA,
                "certificate_dns_names": ["alpha.xca-gateway.test"],
                **alpha,
            },
            {
                "name": "gamma",
                "home_community_id": GAMMA,
                "certificate_dns_names": ["gamma.xca-gateway.test"],
            },
        ],
    }


def start_beta(
    gateway_factory: Callable[..., Gateway], tmp: Path, **sections: dict[str, Any]
) -> Gateway:
    """beta with one of its patients' studies registered (a KOS manifest to find)."""
    data = tmp / "beta"
    study = generate_study(
        data / "images",
        patient=DEFAULT_PATIENTS[0],
        patient_id="C02-2001",
        issuer_oid=AUTHORITY,
        modality="CT",
        body_part="HEAD",
        study_date=date(2024, 1, 1),
        institution="South",
        accession_number="SOU1",
        uid_root="1.2.826.0.1.3680043.10.543",
        series_count=1,
        instances_per_series=1,
        seed=1,
    )
    assert study.files
    beta = gateway_factory(
        "beta",
        storage={"data_dir": str(data)},
        # A known port: XUA audiences default to the configured endpoint URLs.
        server={"host": "127.0.0.1", "port": _free_port()},
        repository={"repository_unique_id": REPOSITORY, "manifest": {"imaging_source_id": SOURCE}},
        imaging={"sources": [{"repository_unique_id": SOURCE, "kind": "filesystem"}]},
        **sections,
    )

    async def register() -> None:
        registry = await open_registry(beta.config.registry)
        try:
            report = await import_studies(
                [data / "images"],
                repository=DocumentRepository(data / "repository", REPOSITORY),
                registry=registry,
                community=beta.config.community,
                progress=False,
                options=beta.config.repository.manifest,
            )
        finally:
            await registry.close()
        assert len(report.with_status("registered")) == 1

    asyncio.run(register())
    return beta


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(patient: str) -> str:
    return (
        f'<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">'
        '<query:ResponseOption returnType="LeafClass" returnComposedObjects="true"/>'
        '<rim:AdhocQuery id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">'
        '<rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>'
        f"<rim:Value>'{escape(patient)}'</rim:Value></rim:ValueList></rim:Slot>"
        '<rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList>'
        "<rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</rim:Value>"
        "</rim:ValueList></rim:Slot></rim:AdhocQuery></query:AdhocQueryRequest>"
    )


def assertion(pki: DevPki, signer: str, audience: str, home_community_id: str) -> str:
    """A signed assertion for a user of ``home_community_id``, signed with ``signer``'s pair."""
    pair = pki.communities[signer]
    identity = XuaIdentity(
        name_id="dr.who",
        subject_id="Dr. Who",
        organization="Somewhere",
        organization_id=home_community_id,
        home_community_id=home_community_id,
        roles=(Ce("309343006", "2.16.840.1.113883.6.96"),),
        purposes_of_use=(Ce("TREATMENT", "2.16.840.1.113883.3.18.7.1"),),
    )
    signed = issue_assertion(
        identity,
        issuer=f"https://idp.{signer}.test",
        audience=audience,
        key_pem=load_signing_key(pair.key.read_bytes()),
        cert_pem=pair.cert.read_bytes(),
        lifetime=timedelta(minutes=5),
    )
    return etree.tostring(wsse_security_header(signed)).decode()


def call_iti38(pki: DevPki, who: str, url: str, header: str = "") -> httpx.Response:
    pair = pki.communities[who]
    body = (
        f'<s:Envelope xmlns:s="{SOAP12}" xmlns:a="{WSA}"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{Action.ITI38}</a:Action>'
        f"<a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>{header}</s:Header>"
        f"<s:Body>{query(PATIENT)}</s:Body></s:Envelope>"
    ).encode()
    with httpx.Client(verify=client_context(pki.ca, pair.cert, pair.key), timeout=20) as client:
        return client.post(url, content=body, headers={"content-type": "application/soap+xml"})


def documents(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text[:500]
    return len(list(etree.fromstring(response.content).iter(f"{{{RIM}}}ExtrinsicObject")))


def fault_subcode(response: httpx.Response) -> str:
    root = etree.fromstring(response.content)
    values = [v.text for v in root.iter(f"{{{SOAP12}}}Value")]
    return " ".join(v for v in values if v)


def trusted_issuer(pki: DevPki, signer: str, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": f"https://idp.{signer}.test",
        "certificates": [str(pki.communities[signer].cert)],
        **extra,
    }


def test_consent_decides_on_the_authenticated_peer_not_the_claimed_community(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    """Opted in for gamma only: alpha claiming gamma's homeCommunityId gets nothing."""
    beta = start_beta(
        gateway_factory,
        tmp_path,
        policy=peer_policy(),
        consent={"enabled": True, "default_mode": "opt-in"},
    )
    assert beta.consent is not None
    beta.consent.store.set(PATIENT, "opt-in", community=GAMMA)
    url = beta.endpoint_urls()["iti38"]
    # gamma, authenticated by its certificate, is served.
    assert documents(call_iti38(pki, "gamma", url)) == 1
    # alpha, with an (unvalidated: [xua] is off) assertion claiming to be a user of gamma.
    forged = call_iti38(pki, "alpha", url, assertion(pki, "alpha", url, GAMMA))
    assert documents(forged) == 0
    codes = [
        e.get("errorCode") for e in etree.fromstring(forged.content).iter(f"{{{RS}}}RegistryError")
    ]
    assert codes == ["LocalPolicyRestrictionError"]


def test_an_assertion_for_another_community_than_the_peer_is_refused(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    beta = start_beta(
        gateway_factory,
        tmp_path,
        policy=peer_policy(),
        xua={"enabled": True, "trusted_issuers": [trusted_issuer(pki, "alpha")]},
    )
    url = beta.endpoint_urls()["iti38"]
    own = call_iti38(pki, "alpha", url, assertion(pki, "alpha", url, ALPHA))
    assert documents(own) == 1
    claimed = call_iti38(pki, "alpha", url, assertion(pki, "alpha", url, GAMMA))
    assert documents(claimed) == 0


def test_xua_enabled_means_required_unless_the_peer_is_exempted(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    beta = start_beta(
        gateway_factory,
        tmp_path,
        policy=peer_policy(),  # alpha has no require_xua: [xua] enabled is enough
        xua={"enabled": True, "trusted_issuers": [trusted_issuer(pki, "alpha")]},
    )
    url = beta.endpoint_urls()["iti38"]
    bare = call_iti38(pki, "alpha", url)
    assert bare.status_code in (400, 500)
    assert "InvalidSecurity" in fault_subcode(bare) or b"assertion is required" in bare.content
    assert documents(call_iti38(pki, "alpha", url, assertion(pki, "alpha", url, ALPHA))) == 1


def test_an_exempted_peer_is_served_without_an_assertion(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    beta = start_beta(
        gateway_factory,
        tmp_path,
        policy=peer_policy(xua_exempt=True),
        xua={"enabled": True, "trusted_issuers": [trusted_issuer(pki, "gamma")]},
    )
    url = beta.endpoint_urls()["iti38"]
    assert documents(call_iti38(pki, "alpha", url)) == 1
    # gamma is not exempted.
    assert call_iti38(pki, "gamma", url).status_code != 200


def test_an_identity_provider_vouches_only_for_its_communities(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    beta = start_beta(
        gateway_factory,
        tmp_path,
        policy=peer_policy(),
        xua={
            "enabled": True,
            # gamma's provider may vouch for gamma's users only.
            "trusted_issuers": [trusted_issuer(pki, "gamma", communities=[GAMMA])],
        },
    )
    url = beta.endpoint_urls()["iti38"]
    # alpha presents an assertion signed by gamma's provider for one of alpha's users.
    foreign = call_iti38(pki, "alpha", url, assertion(pki, "gamma", url, ALPHA))
    assert foreign.status_code != 200
    assert "FailedAuthentication" in fault_subcode(foreign)
    assert documents(call_iti38(pki, "gamma", url, assertion(pki, "gamma", url, GAMMA))) == 1


@pytest.mark.parametrize("path", ["/registry/iti18", "/ig/iti18", "/repository/iti43"])
def test_a_peer_certificate_gets_nothing_from_the_local_doors(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path, path: str
) -> None:
    """The finding: south's gateway certificate read north's registry through local doors."""
    beta = start_beta(gateway_factory, tmp_path, policy=peer_policy())
    response = call_iti38(pki, "alpha", beta.base_url + path)
    assert response.status_code == 403
    assert b"may not use" in response.content
    assert not list(etree.fromstring(response.content).iter(f"{{{RIM}}}ExtrinsicObject"))
