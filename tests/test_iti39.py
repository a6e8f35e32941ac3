"""ITI-39 Cross Gateway Retrieve (responding gateway) over mutual TLS.

Community alpha answers; its documents live in the embedded repository and in a remote XDS
repository of the same community, played by gateway beta's ITI-43 endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from lxml import etree

from tests.test_iti43 import (
    ALPHA_HOME,
    ALPHA_REPO,
    BETA_REPO,
    Answer,
    assert_schema_valid,
    post_mtom,
    repository,
    request_body,
    serve_iti43,
)
from tests.test_server import consumer, fault_of, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.namespaces import XDSB, Action, ResponseStatus
from xca_gateway.protocol.soap_service import Operation
from xca_gateway.protocol.wsdl import BINDINGS, wsdl_path, zeep_service
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.iti39 import check_home_community, iti39_handler
from xca_gateway.transactions.iti43 import DocumentRequest, RemoteRepositories

OPERATION = "RespondingGateway_CrossGatewayRetrieve"


@dataclass
class Community:
    url: str
    documents: dict[str, bytes]  # documentUniqueId -> content (both repositories)


@pytest.fixture
def alpha(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> Community:
    local = {"1.2.3.1": b"DICM local manifest", "1.2.3.2": os.urandom(1024 * 1024 + 3)}
    remote = {"2.2.2.1": os.urandom(600_000)}
    beta = gateway_factory("beta")
    beta_url = serve_iti43(beta, {BETA_REPO: repository(tmp_path, "beta", BETA_REPO, remote)})
    gateway = gateway_factory("alpha")
    handler = iti39_handler(
        {ALPHA_REPO: repository(tmp_path, "alpha", ALPHA_REPO, local)},
        home_community_id=ALPHA_HOME,
        remote=RemoteRepositories(gateway.peer_client, {BETA_REPO: beta_url}),
    )
    gateway.endpoints["iti39"].add(Operation(Action.ITI39, "ITI-39", handler))
    return Community(gateway.endpoint_urls()["iti39"], {**local, **remote})


def zeep_envelope(documents: Sequence[dict[str, str]]) -> bytes:
    """The ITI-39 request as zeep builds it from the IHE WSDL (wsa headers included)."""
    import zeep

    client: Any = zeep.Client(str(wsdl_path("iti39")))  # type: ignore[no-untyped-call]
    service = client.create_service(BINDINGS["iti39"][1], "https://127.0.0.1/xca/iti39")
    envelope = client.create_message(service, OPERATION, DocumentRequest=list(documents))
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def retrieve39(pki: DevPki, url: str, envelope: bytes) -> Answer:
    return Answer(post_mtom(pki, url, Action.ITI39, envelope), Action.ITI39_RESPONSE)


def test_zeep_built_request_gets_local_and_remote_documents(alpha: Community, pki: DevPki) -> None:
    wanted = [(ALPHA_REPO, "1.2.3.1"), (BETA_REPO, "2.2.2.1"), (ALPHA_REPO, "1.2.3.2")]
    envelope = zeep_envelope(
        [
            {"HomeCommunityId": ALPHA_HOME, "RepositoryUniqueId": r, "DocumentUniqueId": d}
            for r, d in wanted
        ]
    )
    answer = retrieve39(pki, alpha.url, envelope)
    assert answer.model.status == ResponseStatus.SUCCESS and answer.model.errors == []
    assert [(d.repository_unique_id, d.document_unique_id) for d in answer.model.documents] == (
        wanted
    )
    for doc in answer.model.documents:
        assert doc.home_community_id == ALPHA_HOME
        assert doc.mime_type == "application/dicom"
        assert answer.content(doc.document_unique_id) == alpha.documents[doc.document_unique_id]
    assert_schema_valid(answer.payload, answer.attachments)


def test_each_failure_gets_its_xds_error_with_our_location(alpha: Community, pki: DevPki) -> None:
    body = request_body(
        [
            (ALPHA_HOME, ALPHA_REPO, "1.2.3.1"),  # found
            (None, ALPHA_REPO, "1.2.3.2"),  # XDSMissingHomeCommunityId
            ("urn:oid:1.2.3.999", ALPHA_REPO, "1.2.3.2"),  # XDSUnknownCommunity
            (ALPHA_HOME, "1.9.9.9", "1.2.3.2"),  # XDSUnknownRepositoryId
            (ALPHA_HOME, ALPHA_REPO, "1.2.3.404"),  # XDSDocumentUniqueIdError (local)
            (ALPHA_HOME, BETA_REPO, "2.2.2.404"),  # XDSDocumentUniqueIdError (relayed)
            (ALPHA_HOME, BETA_REPO, "2.2.2.1"),  # found remotely
        ]
    )
    answer = retrieve39(pki, alpha.url, soap12(Action.ITI39, body))
    assert answer.model.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in answer.model.documents] == ["1.2.3.1", "2.2.2.1"]
    assert sorted(answer.codes()) == [
        "XDSDocumentUniqueIdError",
        "XDSDocumentUniqueIdError",
        "XDSMissingHomeCommunityId",
        "XDSUnknownCommunity",
        "XDSUnknownRepositoryId",
    ]
    # ITI39-012: every RegistryError names our community, the relayed one included.
    assert {e.location for e in answer.model.errors} == {ALPHA_HOME}
    contexts = " ".join(e.code_context for e in answer.model.errors)
    assert "1.2.3.404" in contexts and "2.2.2.404" in contexts and "1.9.9.9" in contexts
    assert_schema_valid(answer.payload, answer.attachments)


def test_nothing_retrievable_is_failure(alpha: Community, pki: DevPki) -> None:
    body = request_body([(None, ALPHA_REPO, "1.2.3.1"), (ALPHA_HOME, ALPHA_REPO, "9.9")])
    answer = retrieve39(pki, alpha.url, soap12(Action.ITI39, body))
    assert answer.model.status == ResponseStatus.FAILURE
    assert answer.model.documents == []
    assert sorted(answer.codes()) == ["XDSDocumentUniqueIdError", "XDSMissingHomeCommunityId"]
    assert_schema_valid(answer.payload, answer.attachments)


def test_home_community_scheme_is_case_insensitive(alpha: Community, pki: DevPki) -> None:
    shouted = "URN:OID:" + ALPHA_HOME.removeprefix("urn:oid:")
    answer = retrieve39(
        pki, alpha.url, soap12(Action.ITI39, request_body([(shouted, ALPHA_REPO, "1.2.3.1")]))
    )
    assert answer.model.status == ResponseStatus.SUCCESS
    assert answer.model.documents[0].home_community_id == ALPHA_HOME


def test_zeep_service_call(alpha: Community, pki: DevPki) -> None:
    from zeep.transports import Transport

    session = requests.Session()
    session.trust_env = False
    session.cert = (str(pki.client.cert), str(pki.client.key))
    session.verify = str(pki.ca)
    transport = Transport(session=session)  # type: ignore[no-untyped-call]
    service: Any = zeep_service("iti39", alpha.url, transport=transport)
    result = getattr(service, OPERATION)(
        DocumentRequest=[
            {
                "HomeCommunityId": ALPHA_HOME,
                "RepositoryUniqueId": BETA_REPO,
                "DocumentUniqueId": "2.2.2.1",
            }
        ]
    )
    assert result.RegistryResponse.status == ResponseStatus.SUCCESS
    (doc,) = result.DocumentResponse
    assert doc.HomeCommunityId == ALPHA_HOME
    assert doc.Document == alpha.documents["2.2.2.1"]


def test_wrong_payload_is_a_sender_fault(alpha: Community, pki: DevPki) -> None:
    bad = f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"/>'
    with consumer(pki) as client:
        response = client.post(
            alpha.url,
            content=soap12(Action.ITI39, bad),
            headers={"content-type": "application/soap+xml; charset=UTF-8"},
        )
    assert response.status_code == 400
    code, _, reason = fault_of(response)
    assert code.endswith(":Sender") and "DocumentRequest" in reason


def test_unreachable_remote_repository_is_reported_by_us(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> None:
    gateway = gateway_factory("alpha")
    handler = iti39_handler(
        {ALPHA_REPO: repository(tmp_path, "alpha", ALPHA_REPO, {"1.2.3.1": b"x"})},
        home_community_id=ALPHA_HOME,
        remote=RemoteRepositories(
            gateway.peer_client, {BETA_REPO: "https://127.0.0.1:1/ig/iti43"}, deadline=5.0
        ),
    )
    gateway.endpoints["iti39"].add(Operation(Action.ITI39, "ITI-39", handler))
    body = request_body([(ALPHA_HOME, BETA_REPO, "2.2.2.1"), (ALPHA_HOME, ALPHA_REPO, "1.2.3.1")])
    answer = retrieve39(pki, gateway.endpoint_urls()["iti39"], soap12(Action.ITI39, body))
    assert answer.model.status == ResponseStatus.PARTIAL_SUCCESS
    (error,) = answer.model.errors
    assert (error.error_code, error.location) == ("XDSRepositoryError", ALPHA_HOME)
    assert answer.content("1.2.3.1") == b"x"


def test_home_community_check_is_pure() -> None:
    accepted, errors = check_home_community(
        (
            DocumentRequest(ALPHA_REPO, "1", ALPHA_HOME),
            DocumentRequest(ALPHA_REPO, "2"),
            DocumentRequest(ALPHA_REPO, "3", "urn:oid:9.9"),
        ),
        ALPHA_HOME,
    )
    assert [a.document_unique_id for a in accepted] == ["1"]
    assert [(e.error_code, e.location) for e in errors] == [
        ("XDSMissingHomeCommunityId", ALPHA_HOME),
        ("XDSUnknownCommunity", ALPHA_HOME),
    ]
