"""ITI-43 Retrieve Document Set: message models, and the repository endpoint over mTLS."""

from __future__ import annotations

import base64
import copy
import io
import os
import uuid
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import httpx
import pytest
import requests
from lxml import etree

from tests.test_mtom_server import read_mtom
from tests.test_server import consumer, fault_of, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import (
    RS,
    SOAP12,
    WSA,
    XDSB,
    XOP,
    Action,
    ErrorSeverity,
    ResponseStatus,
)
from xca_gateway.protocol.peer_client import PeerError, SoapReply
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import Operation
from xca_gateway.protocol.wsdl import WSDL_DIR, zeep_service
from xca_gateway.repository import DocumentRepository
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.iti43 import (
    DocumentRequest,
    DocumentResponse,
    RemoteRepositories,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    build_retrieve_document_set_request,
    build_retrieve_document_set_response,
    parse_retrieve_document_set_request,
    parse_retrieve_document_set_response,
    repository_retrieve_handler,
    retrieve_documents,
)
from xca_gateway.xds.ebrs import RegistryError

ALPHA_REPO = "1.3.6.1.4.1.21367.13.80.1"
BETA_REPO = "1.3.6.1.4.1.21367.13.80.2"
ALPHA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
BETA_HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.2"


# ------------------------------------------------------------------------------ test helpers


@cache
def xdsb_schema() -> etree.XMLSchema:
    """IHEXDSB.xsd. rim.xsd imports the xds-b namespace (xcf.xsd) back, a cycle lxml cannot
    follow from IHEXDSB.xsd itself; a wrapper including both files resolves it."""
    wrapper = (
        b'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" '
        b'targetNamespace="urn:ihe:iti:xds-b:2007" elementFormDefault="qualified">'
        b'<xs:include schemaLocation="xcf.xsd"/><xs:include schemaLocation="IHEXDSB.xsd"/>'
        b"</xs:schema>"
    )
    base = str(WSDL_DIR / "schema" / "IHE" / "wrapper.xsd")
    return etree.XMLSchema(etree.fromstring(wrapper, base_url=base))


def inline_xop(payload: etree._Element, attachments: dict[str, mtom.Attachment]) -> etree._Element:
    """The XOP-decoded infoset (xop:Include replaced by base64 text), as the XSD sees it."""
    copied = copy.deepcopy(payload)
    for include in list(copied.iter(f"{{{XOP}}}Include")):
        parent = include.getparent()
        assert parent is not None
        data = attachments[mtom.cid_from_href(include.get("href") or "")].read_all()
        parent.remove(include)
        parent.text = base64.b64encode(data).decode()
    return copied


def assert_schema_valid(payload: etree._Element, attachments: dict[str, mtom.Attachment]) -> None:
    schema = xdsb_schema()
    decoded = inline_xop(payload, attachments)
    assert schema.validate(decoded), schema.error_log


def request_body(documents: Sequence[tuple[str | None, str, str]]) -> str:
    parts = []
    for home, repo, uid in documents:
        home_xml = f"<xdsb:HomeCommunityId>{home}</xdsb:HomeCommunityId>" if home else ""
        parts.append(
            f"<xdsb:DocumentRequest>{home_xml}"
            f"<xdsb:RepositoryUniqueId>{repo}</xdsb:RepositoryUniqueId>"
            f"<xdsb:DocumentUniqueId>{uid}</xdsb:DocumentUniqueId></xdsb:DocumentRequest>"
        )
    return (
        f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}">{"".join(parts)}'
        "</xdsb:RetrieveDocumentSetRequest>"
    )


def post_mtom(pki: DevPki, url: str, action: str, envelope: bytes) -> httpx.Response:
    writer = mtom.MtomWriter(envelope, action=action)
    with consumer(pki) as client:
        return client.post(
            url,
            content=b"".join(writer.iter_bytes()),
            headers={"content-type": writer.content_type},
        )


class Answer:
    """A retrieve response read back: payload, parsed model, attachments by Content-ID."""

    def __init__(self, response: httpx.Response, action: str) -> None:
        assert response.status_code == 200, response.text[:1000]
        assert mtom.is_mtom(response.headers["content-type"])
        message = read_mtom(response)
        self.attachments = message.attachments
        root = etree.fromstring(message.root)
        assert root.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}Action") == action
        body = root.find(f"{{{SOAP12}}}Body")
        assert body is not None
        self.payload = body[0]
        self.model = parse_retrieve_document_set_response(self.payload)

    def content(self, document_unique_id: str) -> bytes:
        for doc in self.model.documents:
            if doc.document_unique_id == document_unique_id:
                assert doc.document is not None
                include = doc.document.find(f"{{{XOP}}}Include")
                assert include is not None, "documents travel as XOP attachments"
                cid = mtom.cid_from_href(include.get("href") or "")
                return self.attachments[cid].read_all()
        raise AssertionError(f"document {document_unique_id} not returned")

    def codes(self) -> list[str]:
        return [e.error_code for e in self.model.errors]


def retrieve43(pki: DevPki, url: str, body: str) -> Answer:
    response = post_mtom(pki, url, Action.ITI43, soap12(Action.ITI43, body))
    return Answer(response, Action.ITI43_RESPONSE)


def repository(
    tmp_path: Path, name: str, repo_id: str, docs: dict[str, bytes]
) -> DocumentRepository:
    repo = DocumentRepository(tmp_path / name, repo_id)
    for uid, content in docs.items():
        repo.store(uid, content, mime_type="application/dicom")
    return repo


# ------------------------------------------------------------------------------ sans-IO models


def test_request_round_trip_and_schema() -> None:
    request = RetrieveDocumentSetRequest(
        (
            DocumentRequest("1.2.3", "1.2.3.1", "urn:oid:1.2"),
            DocumentRequest("1.2.3", "1.2.3.2"),
        )
    )
    element = build_retrieve_document_set_request(request)
    assert xdsb_schema().validate(element), xdsb_schema().error_log
    reparsed = parse_retrieve_document_set_request(etree.fromstring(etree.tostring(element)))
    assert reparsed == request


def test_response_model_is_schema_valid() -> None:
    errors = [RegistryError("XDSDocumentUniqueIdError", "document 9 is unknown", ALPHA_HOME)]
    documents = [
        DocumentResponse("1.2.3", "1.2.3.1", "application/dicom", ALPHA_HOME, content_id="a@x"),
        DocumentResponse("1.2.3", "1.2.3.2", "text/plain", content_id="b@x"),
    ]
    element = build_retrieve_document_set_response(
        ResponseStatus.PARTIAL_SUCCESS, errors, documents
    )
    fake = {"a@x": b"\x00\x01", "b@x": b"text"}

    class Att:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read_all(self) -> bytes:
            return self.data

    assert_schema_valid(element, {k: Att(v) for k, v in fake.items()})  # type: ignore[misc]
    parsed = parse_retrieve_document_set_response(element)
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert parsed.errors == errors
    assert [(d.document_unique_id, d.mime_type, d.home_community_id) for d in parsed.documents] == [
        ("1.2.3.1", "application/dicom", ALPHA_HOME),
        ("1.2.3.2", "text/plain", None),
    ]


@pytest.mark.parametrize(
    "xml",
    [
        f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"/>',
        f'<xdsb:RetrieveDocumentSetResponse xmlns:xdsb="{XDSB}"/>',
        f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"><xdsb:Other/>'
        "</xdsb:RetrieveDocumentSetRequest>",
    ],
)
def test_malformed_requests_are_sender_faults(xml: str) -> None:
    with pytest.raises(SoapFault) as raised:
        parse_retrieve_document_set_request(etree.fromstring(xml))
    assert raised.value.code == "Sender"


# ------------------------------------------------------------------------- over the network


@pytest.fixture
def alpha_repo(tmp_path: Path) -> DocumentRepository:
    return repository(
        tmp_path,
        "alpha-repo",
        ALPHA_REPO,
        {"1.2.3.1": b"DICM first document", "1.2.3.2": os.urandom(3 * 1024 * 1024 + 17)},
    )


def serve_iti43(
    gateway: Gateway,
    repositories: dict[str, DocumentRepository],
    remote: RemoteRepositories | None = None,
) -> str:
    home = gateway.config.community.home_community_id
    handler = repository_retrieve_handler(repositories, home_community_id=home, remote=remote)
    gateway.endpoints["iti43"].add(Operation(Action.ITI43, "ITI-43", handler))
    return gateway.endpoint_urls()["iti43"]


def test_retrieve_local_documents_as_mtom(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    gateway = gateway_factory("alpha")
    url = serve_iti43(gateway, {ALPHA_REPO: alpha_repo})
    body = request_body([(None, ALPHA_REPO, "1.2.3.1"), (ALPHA_HOME, ALPHA_REPO, "1.2.3.2")])
    answer = retrieve43(pki, url, body)
    assert answer.model.status == ResponseStatus.SUCCESS
    assert answer.model.errors == []
    assert answer.content("1.2.3.1") == b"DICM first document"
    assert answer.content("1.2.3.2") == alpha_repo.read_bytes("1.2.3.2")
    for doc in answer.model.documents:
        assert (doc.repository_unique_id, doc.mime_type) == (ALPHA_REPO, "application/dicom")
        assert doc.home_community_id == ALPHA_HOME
    assert_schema_valid(answer.payload, answer.attachments)


def test_missing_and_unknown_documents_are_partial_success(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    gateway = gateway_factory("alpha")
    url = serve_iti43(gateway, {ALPHA_REPO: alpha_repo})
    body = request_body(
        [
            (None, ALPHA_REPO, "1.2.3.1"),
            (None, ALPHA_REPO, "1.2.3.404"),
            (None, "1.9.9.9", "1.2.3.1"),
            (BETA_HOME, ALPHA_REPO, "1.2.3.2"),
            (None, ALPHA_REPO, ""),
            (None, ALPHA_REPO, "1.2.3.1"),  # repeated: answered once
        ]
    )
    answer = retrieve43(pki, url, body)
    assert answer.model.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in answer.model.documents] == ["1.2.3.1"]
    assert sorted(answer.codes()) == sorted(
        [
            "XDSDocumentUniqueIdError",
            "XDSUnknownRepositoryId",
            "XDSUnknownCommunity",
            "XDSDocumentUniqueIdError",
        ]
    )
    for error in answer.model.errors:
        assert error.location == ALPHA_HOME and error.severity == ErrorSeverity.ERROR
    assert any("1.2.3.404" in e.code_context for e in answer.model.errors)
    assert_schema_valid(answer.payload, answer.attachments)

    # Nothing found at all: Failure, still an MTOM RetrieveDocumentSetResponse.
    body = request_body([(None, ALPHA_REPO, "1.2.3.404")])
    answer = retrieve43(pki, url, body)
    assert answer.model.status == ResponseStatus.FAILURE
    assert answer.codes() == ["XDSDocumentUniqueIdError"]
    assert_schema_valid(answer.payload, answer.attachments)


def test_plain_soap_request_and_bad_payload(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    gateway = gateway_factory("alpha")
    url = serve_iti43(gateway, {ALPHA_REPO: alpha_repo})
    ct = f'application/soap+xml; charset=UTF-8; action="{Action.ITI43}"'
    with consumer(pki) as client:
        ok = client.post(
            url,
            content=soap12(Action.ITI43, request_body([(None, ALPHA_REPO, "1.2.3.1")])),
            headers={"content-type": ct},
        )
        assert Answer(ok, Action.ITI43_RESPONSE).content("1.2.3.1") == b"DICM first document"
        for bad in (
            f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}"/>',
            f'<xdsb:ProvideAndRegisterDocumentSetRequest xmlns:xdsb="{XDSB}"/>',
        ):
            response = client.post(
                url, content=soap12(Action.ITI43, bad), headers={"content-type": ct}
            )
            assert response.status_code == 400
            code, _, reason = fault_of(response)
            assert code.endswith(":Sender") and "RetrieveDocumentSet" in reason


def test_zeep_client_from_the_iti43_wsdl(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    from zeep.transports import Transport

    gateway = gateway_factory("alpha")
    url = serve_iti43(gateway, {ALPHA_REPO: alpha_repo})
    session = requests.Session()
    session.trust_env = False
    session.cert = (str(pki.client.cert), str(pki.client.key))
    session.verify = str(pki.ca)
    transport = Transport(session=session)  # type: ignore[no-untyped-call]
    service = zeep_service("iti43", url, transport=transport)
    result = service.DocumentRepository_RetrieveDocumentSet(
        DocumentRequest=[
            {"RepositoryUniqueId": ALPHA_REPO, "DocumentUniqueId": "1.2.3.1"},
            {"RepositoryUniqueId": ALPHA_REPO, "DocumentUniqueId": "1.2.3.404"},
        ]
    )
    # zeep sends plain SOAP and resolves the XOP attachment of the MTOM answer itself.
    assert result.RegistryResponse.status == ResponseStatus.PARTIAL_SUCCESS
    (error,) = result.RegistryResponse.RegistryErrorList.RegistryError
    assert error.errorCode == "XDSDocumentUniqueIdError" and error.location == ALPHA_HOME
    (doc,) = result.DocumentResponse
    assert doc.DocumentUniqueId == "1.2.3.1" and doc.mimeType == "application/dicom"
    assert doc.Document == b"DICM first document"


def test_a_corrupted_document_aborts_the_stream(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    gateway = gateway_factory("alpha")
    url = serve_iti43(gateway, {ALPHA_REPO: alpha_repo})
    stored = alpha_repo.get("1.2.3.2")
    assert stored is not None
    data = bytearray(stored.data_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.data_path.write_bytes(bytes(data))
    body = request_body([(None, ALPHA_REPO, "1.2.3.2")])
    # The consumer must not be able to take a damaged document for a complete answer.
    with pytest.raises(httpx.TransportError):
        post_mtom(pki, url, Action.ITI43, soap12(Action.ITI43, body))


# --------------------------------------------------------------------- remote repositories


def test_remote_repository_is_reached_with_iti43(
    gateway_factory: Callable[..., Gateway],
    pki: DevPki,
    alpha_repo: DocumentRepository,
    tmp_path: Path,
) -> None:
    beta = gateway_factory("beta")
    beta_content = os.urandom(2 * 1024 * 1024)
    beta_repo = repository(tmp_path, "beta-repo", BETA_REPO, {"2.2.2.1": beta_content})
    beta_url = serve_iti43(beta, {BETA_REPO: beta_repo})

    alpha = gateway_factory("alpha")
    remote = RemoteRepositories(alpha.peer_client, {BETA_REPO: beta_url})
    url = serve_iti43(alpha, {ALPHA_REPO: alpha_repo}, remote)
    body = request_body(
        [
            (None, BETA_REPO, "2.2.2.1"),
            (None, ALPHA_REPO, "1.2.3.1"),
            (None, BETA_REPO, "2.2.2.404"),
        ]
    )
    answer = retrieve43(pki, url, body)
    assert answer.model.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in answer.model.documents] == ["2.2.2.1", "1.2.3.1"]
    assert answer.content("2.2.2.1") == beta_content
    assert answer.content("1.2.3.1") == b"DICM first document"
    (error,) = answer.model.errors
    assert error.error_code == "XDSDocumentUniqueIdError" and "2.2.2.404" in error.code_context
    # ITI-43 relays the remote repository's error as it is (its own location).
    assert error.location == BETA_HOME
    assert_schema_valid(answer.payload, answer.attachments)


def test_unreachable_remote_repository(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    alpha = gateway_factory("alpha")
    dead = f"https://127.0.0.1:1/ig/iti43?{uuid.uuid4()}"
    remote = RemoteRepositories(alpha.peer_client, {BETA_REPO: dead}, deadline=5.0)
    url = serve_iti43(alpha, {ALPHA_REPO: alpha_repo}, remote)
    body = request_body([(None, BETA_REPO, "2.2.2.1"), (None, ALPHA_REPO, "1.2.3.1")])
    answer = retrieve43(pki, url, body)
    assert answer.model.status == ResponseStatus.PARTIAL_SUCCESS
    (error,) = answer.model.errors
    assert error.error_code == "XDSRepositoryError" and error.location == ALPHA_HOME
    assert "127.0.0.1" not in error.code_context  # internal addresses stay in our log
    assert answer.content("1.2.3.1") == b"DICM first document"


def test_registry_response_is_first(
    gateway_factory: Callable[..., Gateway], pki: DevPki, alpha_repo: DocumentRepository
) -> None:
    gateway = gateway_factory("alpha")
    url = serve_iti43(gateway, {ALPHA_REPO: alpha_repo})
    body = request_body([(None, ALPHA_REPO, "1.2.3.1")])
    answer = retrieve43(pki, url, body)
    children = [c.tag for c in answer.payload]
    assert children == [f"{{{RS}}}RegistryResponse", f"{{{XDSB}}}DocumentResponse"]


# ------------------------------------------------------------- engine, with in-process fakes


async def test_local_documents_are_opened_only_when_streamed(tmp_path: Path) -> None:
    repo = repository(tmp_path, "lazy", ALPHA_REPO, {"1.2.3.1": b"abc"})
    result = await retrieve_documents(
        [DocumentRequest(ALPHA_REPO, "1.2.3.1")], {ALPHA_REPO: repo}, location=ALPHA_HOME
    )
    (doc,) = result.documents
    assert not isinstance(doc.body, bytes)  # a stream, not the document in memory
    repo.delete("1.2.3.1")  # gone before the part is written: the stream fails, loudly
    with pytest.raises(FileNotFoundError):
        async for _ in doc.body:
            pass


class FakePeer:
    """Plays a remote repository's ITI-43 answer (or failure) without a network."""

    def __init__(self, payload: str | None, attachments: dict[str, bytes] | None = None) -> None:
        self.payload = payload
        self.attachments = attachments or {}
        self.sent: list[etree._Element] = []
        self.files: list[io.BytesIO] = []

    async def call(self, url: str, payload: etree._Element, action: str, **kw: object) -> SoapReply:
        self.sent.append(payload)
        assert action == Action.ITI43 and kw["use_mtom"] is True
        if self.payload is None:
            raise PeerError("connect", "connection refused by https://10.0.0.1/secret")
        attachments = {}
        for cid, data in self.attachments.items():
            file = io.BytesIO(data)
            self.files.append(file)
            attachments[cid] = mtom.Attachment(cid, "application/dicom", len(data), file)
        element = etree.fromstring(self.payload)
        return SoapReply(200, element, element, attachments)


def remote_response(*documents: str, errors: str = "") -> str:
    error_list = f"<rs:RegistryErrorList>{errors}</rs:RegistryErrorList>" if errors else ""
    return (
        f'<xdsb:RetrieveDocumentSetResponse xmlns:xdsb="{XDSB}" xmlns:rs="{RS}" '
        f'xmlns:xop="{XOP}"><rs:RegistryResponse status="{ResponseStatus.SUCCESS}">'
        f"{error_list}</rs:RegistryResponse>{''.join(documents)}</xdsb:RetrieveDocumentSetResponse>"
    )


def remote_document(uid: str, document: str, mime: str = "application/dicom") -> str:
    return (
        f"<xdsb:DocumentResponse><xdsb:RepositoryUniqueId>{BETA_REPO}</xdsb:RepositoryUniqueId>"
        f"<xdsb:DocumentUniqueId>{uid}</xdsb:DocumentUniqueId><xdsb:mimeType>{mime}"
        f"</xdsb:mimeType><xdsb:Document>{document}</xdsb:Document></xdsb:DocumentResponse>"
    )


async def body_of(doc: RetrievedDocument) -> bytes:
    if isinstance(doc.body, bytes):
        return doc.body
    return b"".join([chunk async for chunk in doc.body])


async def test_a_remote_repository_cannot_smuggle_documents() -> None:
    peer = FakePeer(
        remote_response(
            remote_document("2.1", '<xop:Include href="cid:one@x"/>'),
            remote_document("2.2", base64.b64encode(b"inline").decode()),
            remote_document("9.9", '<xop:Include href="cid:extra@x"/>'),  # never asked for
            remote_document("2.3", '<xop:Include href="cid:one@x"/>'),  # reuses a part
            remote_document("2.4", "AAAA", mime="text/plain&#13;&#10;X-Evil: 1"),
            remote_document("2.1", "AAAA"),  # repeated
        ),
        {"one@x": b"first", "extra@x": b"smuggled"},
    )
    wanted = [DocumentRequest(BETA_REPO, uid) for uid in ("2.1", "2.2", "2.3", "2.4", "2.5")]
    result = await retrieve_documents(
        wanted, {}, RemoteRepositories(peer, {BETA_REPO: "https://beta"}), location=ALPHA_HOME
    )
    sent = parse_retrieve_document_set_request(peer.sent[0])
    assert [d.document_unique_id for d in sent.documents] == ["2.1", "2.2", "2.3", "2.4", "2.5"]
    assert all(d.home_community_id is None for d in sent.documents)
    assert [d.document_unique_id for d in result.documents] == ["2.1", "2.2"]
    assert [await body_of(d) for d in result.documents] == [b"first", b"inline"]
    codes = {e.code_context.split(":")[0]: e.error_code for e in result.errors}
    assert codes == {
        "document 2.3": "XDSRepositoryError",
        "document 2.4": "XDSRepositoryError",
        "document 2.5 was not returned by repository 1.3.6.1.4.1.21367.13.80.2": (
            "XDSDocumentUniqueIdError"
        ),
    }
    assert all(f.closed for f in peer.files), "every received part is released"


async def test_remote_errors_keep_or_take_our_location() -> None:
    error = (
        f'<rs:RegistryError errorCode="XDSDocumentUniqueIdError" codeContext="2.9 unknown" '
        f'location="{BETA_HOME}" severity="{ErrorSeverity.ERROR}"/>'
    )
    for override, expected in ((False, BETA_HOME), (True, ALPHA_HOME)):
        peer = FakePeer(remote_response(errors=error))
        result = await retrieve_documents(
            [DocumentRequest(BETA_REPO, "2.9")],
            {},
            RemoteRepositories(peer, {BETA_REPO: "https://beta"}),
            location=ALPHA_HOME,
            override_remote_location=override,
        )
        assert [(e.error_code, e.location) for e in result.errors] == [
            ("XDSDocumentUniqueIdError", expected)
        ]
        assert result.status == ResponseStatus.FAILURE


async def test_unreachable_remote_is_reported_without_internal_details() -> None:
    result = await retrieve_documents(
        [DocumentRequest(BETA_REPO, "2.1"), DocumentRequest(BETA_REPO, "2.2")],
        {},
        RemoteRepositories(FakePeer(None), {BETA_REPO: "https://beta"}),
        location=ALPHA_HOME,
    )
    assert [e.error_code for e in result.errors] == ["XDSRepositoryError"] * 2
    assert not any("10.0.0.1" in e.code_context for e in result.errors)
