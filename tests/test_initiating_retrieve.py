"""ITI-43 at the initiating gateway: split by HomeCommunityId into ITI-39s, merged as one MTOM."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from tests.test_mtom_server import read_mtom
from tests.test_server import consumer, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import RS, SOAP12, XDSB, Action, ResponseStatus
from xca_gateway.protocol.soap import element_content
from xca_gateway.repository import DocumentRepository
from xca_gateway.security.dev_pki import DevPki


def home(index: int) -> str:
    return f"urn:oid:1.3.6.1.4.1.21367.13.70.{index}"


def community_with_repository(
    gateway_factory: Callable[..., Gateway], tmp: Path, cert: str, index: int, **extra: Any
) -> tuple[Gateway, DocumentRepository]:
    rid = f"1.3.6.1.4.1.21367.13.80.{index}"
    directory = tmp / f"repo{index}"
    gateway = gateway_factory(
        cert,
        community={
            "name": f"c{index}",
            "home_community_id": home(index),
            "patient_id_assigning_authority": f"1.3.6.1.4.1.21367.13.20.{index}000",
        },
        storage={"data_dir": str(tmp / f"c{index}")},
        repository={"repository_unique_id": rid, "directory": str(directory)},
        **extra,
    )
    return gateway, DocumentRepository(directory, rid)


def request_xml(docs: list[tuple[str | None, str, str]]) -> str:
    parts = []
    for community, rid, uid in docs:
        hc = f"<xdsb:HomeCommunityId>{community}</xdsb:HomeCommunityId>" if community else ""
        parts.append(
            f"<xdsb:DocumentRequest>{hc}<xdsb:RepositoryUniqueId>{rid}</xdsb:RepositoryUniqueId>"
            f"<xdsb:DocumentUniqueId>{uid}</xdsb:DocumentUniqueId></xdsb:DocumentRequest>"
        )
    joined = "".join(parts)
    return (
        f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}">{joined}'
        "</xdsb:RetrieveDocumentSetRequest>"
    )


def test_retrieve_is_split_by_community_and_merged(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path, silent_port: int
) -> None:
    beta, beta_repo = community_with_repository(gateway_factory, tmp_path, "beta", 2)
    gamma, gamma_repo = community_with_repository(gateway_factory, tmp_path, "gamma", 3)
    content = {
        "2.1": os.urandom(3 * 1024 * 1024),  # spooled to disk on the way through
        "3.1": b"report from gamma",
        "1.1": b"local document",
    }
    beta_repo.store("2.1", content["2.1"], mime_type="application/dicom")
    gamma_repo.store("3.1", content["3.1"], mime_type="text/plain")
    peers = [
        {"name": "c2", "home_community_id": home(2), "iti39": beta.endpoint_urls()["iti39"]},
        {"name": "c3", "home_community_id": home(3), "iti39": gamma.endpoint_urls()["iti39"]},
        {
            "name": "hung",
            "home_community_id": home(5),
            "iti39": f"https://127.0.0.1:{silent_port}/x",
        },
    ]
    alpha, alpha_repo = community_with_repository(
        gateway_factory, tmp_path, "alpha", 1, peers=peers, initiating={"peer_deadline": 1.0}
    )
    alpha_repo.store("1.1", content["1.1"], mime_type="text/plain")
    rid = "1.3.6.1.4.1.21367.13.80."
    body = request_xml(
        [
            (home(2), rid + "2", "2.1"),
            (home(1), rid + "1", "1.1"),
            (home(3), rid + "3", "3.1"),
            (home(2), rid + "2", "2.404"),
            (home(5), rid + "5", "5.1"),
            ("urn:oid:1.2.3.999", rid + "9", "9.1"),
            (None, rid + "1", "1.1"),  # no home, but a local repository: served locally
            (home(2), rid + "2", ""),  # no DocumentUniqueId: answered here, not sent to c2
        ]
    )
    writer_body = soap12(Action.ITI43, body)
    with consumer(pki) as client:
        response = client.post(
            alpha.endpoint_urls()["iti43"],
            content=writer_body,
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200, response.text[:500]
    with read_mtom(response) as message:
        root = etree.fromstring(message.root)
        payload = root.find(f"{{{SOAP12}}}Body/{{{XDSB}}}RetrieveDocumentSetResponse")
        assert payload is not None
        status = payload.find(f"{{{RS}}}RegistryResponse")
        assert status is not None and status.get("status") == ResponseStatus.PARTIAL_SUCCESS
        got = {}
        for doc in payload.iterfind(f"{{{XDSB}}}DocumentResponse"):
            uid = doc.findtext(f"{{{XDSB}}}DocumentUniqueId") or ""
            data = element_content(doc.find(f"{{{XDSB}}}Document"), message.attachments)  # type: ignore[arg-type]
            got[uid] = (
                doc.findtext(f"{{{XDSB}}}HomeCommunityId"),
                data if isinstance(data, bytes) else data.read_all(),
            )
        # Documents come back in the order asked, each tagged with its own community.
        assert list(got) == ["2.1", "1.1", "3.1"]
        assert got["2.1"] == (home(2), content["2.1"])
        assert got["1.1"] == (home(1), content["1.1"])
        assert got["3.1"] == (home(3), content["3.1"])
        errors = {
            (e.get("errorCode"), e.get("location")) for e in status.iter(f"{{{RS}}}RegistryError")
        }
    assert ("XDSDocumentUniqueIdError", home(2)) in errors
    assert ("XDSDocumentUniqueIdError", home(1)) in errors  # ours: never forwarded
    assert ("XDSUnavailableCommunity", home(5)) in errors
    assert ("XDSUnknownCommunity", "urn:oid:1.2.3.999") in errors


def test_retrieve_without_home_for_a_foreign_repository(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    alpha, _ = community_with_repository(gateway_factory, tmp_path, "alpha", 1)
    with consumer(pki) as client:
        response = client.post(
            alpha.endpoint_urls()["iti43"],
            content=soap12(Action.ITI43, request_xml([(None, "1.2.3.4", "9.9")])),
            headers={"content-type": "application/soap+xml"},
        )
    with read_mtom(response) as message:
        root = etree.fromstring(message.root)
    found = [(e.get("errorCode"), e.get("location")) for e in root.iter(f"{{{RS}}}RegistryError")]
    assert found == [("XDSMissingHomeCommunityId", home(1))]
    assert root.find(f".//{{{RS}}}RegistryResponse").get("status") == ResponseStatus.FAILURE  # type: ignore[union-attr]
