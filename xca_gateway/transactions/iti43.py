"""ITI-43 Retrieve Document Set: messages, the retrieval engine, and the repository handler.

The message models are sans-IO (parse/build on lxml elements). The retrieval engine
(:func:`retrieve_documents`) resolves DocumentRequests against the embedded repositories or
forwards them with ITI-43 to the remote XDS repositories of our community (``[[repository
.remote]]``), re-streaming their MTOM attachments. ITI-39 (responding gateway) uses the same
engine, so a local consumer and a peer community get the same documents the same way.

Documents are streamed into the MTOM response one at a time: a local document is opened
only when its part is written, so a request for thousands of documents does not hold
thousands of open files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lxml import etree

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import RS, XDSB, XOP, Action, ResponseStatus
from xca_gateway.protocol.peer_client import PeerError, SoapReply
from xca_gateway.protocol.soap import SoapFault, element_content
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.repository import (
    CHUNK_SIZE,
    DocumentRepository,
    RepositoryConfig,
    StoredDocument,
    valid_mime_type,
)
from xca_gateway.xds.ebrs import (
    RegistryError,
    parse_registry_errors,
    retrieve_document_set_response,
    status_for,
)

__all__ = [
    "DocumentRequest",
    "DocumentResponse",
    "RemoteRepositories",
    "RetrieveDocumentSetRequest",
    "RetrieveDocumentSetResponse",
    "RetrieveResult",
    "RetrievedDocument",
    "audit_called",
    "audit_served",
    "build_retrieve_document_set_request",
    "build_retrieve_document_set_response",
    "parse_retrieve_document_set_request",
    "parse_retrieve_document_set_response",
    "repository_retrieve_handler",
    "retrieve_audit",
    "retrieve_documents",
    "retrieve_response",
    "same_community",
]

log = logging.getLogger(__name__)

XDS_REPOSITORY_ERROR = "XDSRepositoryError"
XDS_UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"
XDS_DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
XDS_UNKNOWN_COMMUNITY = "XDSUnknownCommunity"
XDS_MISSING_HOME_COMMUNITY_ID = "XDSMissingHomeCommunityId"

_OCTET_STREAM = "application/octet-stream"


# ----------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class DocumentRequest:
    repository_unique_id: str
    document_unique_id: str
    home_community_id: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.repository_unique_id, self.document_unique_id)


@dataclass(frozen=True)
class RetrieveDocumentSetRequest:
    documents: tuple[DocumentRequest, ...]


@dataclass(frozen=True)
class DocumentResponse:
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    home_community_id: str | None = None
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None
    # Built: the Content-ID the xop:Include points at. Parsed: the xdsb:Document element,
    # whose content (inline base64 or XOP attachment) soap.element_content() resolves.
    content_id: str | None = None
    document: etree._Element | None = field(default=None, compare=False, repr=False)


@dataclass
class RetrieveDocumentSetResponse:
    status: str
    errors: list[RegistryError] = field(default_factory=list)
    documents: list[DocumentResponse] = field(default_factory=list)


def _q(name: str) -> str:
    return f"{{{XDSB}}}{name}"


def _child_text(parent: etree._Element, name: str) -> str | None:
    element = parent.find(_q(name))
    if element is None:
        return None
    return (element.text or "").strip()


def _elements(parent: etree._Element) -> list[etree._Element]:
    return [c for c in parent if isinstance(c.tag, str)]


def parse_retrieve_document_set_request(payload: etree._Element) -> RetrieveDocumentSetRequest:
    """Read an xdsb:RetrieveDocumentSetRequest; structural errors are SOAP Sender faults.

    Empty or missing ids are kept as "" so that the answer can name the faulty
    DocumentRequest with a RegistryError while the other documents are still served.
    """
    if payload.tag != _q("RetrieveDocumentSetRequest"):
        raise SoapFault.sender(
            f"expected xdsb:RetrieveDocumentSetRequest, got {etree.QName(payload).localname}"
        )
    documents: list[DocumentRequest] = []
    for child in _elements(payload):
        if child.tag != _q("DocumentRequest"):
            raise SoapFault.sender(
                f"unexpected element {etree.QName(child).localname} in RetrieveDocumentSetRequest"
            )
        home = _child_text(child, "HomeCommunityId")
        documents.append(
            DocumentRequest(
                repository_unique_id=_child_text(child, "RepositoryUniqueId") or "",
                document_unique_id=_child_text(child, "DocumentUniqueId") or "",
                home_community_id=home or None,
            )
        )
    if not documents:
        raise SoapFault.sender("RetrieveDocumentSetRequest has no DocumentRequest")
    return RetrieveDocumentSetRequest(tuple(documents))


def build_retrieve_document_set_request(request: RetrieveDocumentSetRequest) -> etree._Element:
    root = etree.Element(_q("RetrieveDocumentSetRequest"), nsmap={"xdsb": XDSB})
    for doc in request.documents:
        element = etree.SubElement(root, _q("DocumentRequest"))
        if doc.home_community_id:
            etree.SubElement(element, _q("HomeCommunityId")).text = doc.home_community_id
        etree.SubElement(element, _q("RepositoryUniqueId")).text = doc.repository_unique_id
        etree.SubElement(element, _q("DocumentUniqueId")).text = doc.document_unique_id
    return root


def build_retrieve_document_set_response(
    status: str, errors: Sequence[RegistryError], documents: Sequence[DocumentResponse]
) -> etree._Element:
    """xdsb:RetrieveDocumentSetResponse; each Document is an xop:Include of its content_id."""
    root = retrieve_document_set_response(status, errors)
    for doc in documents:
        if doc.content_id is None:
            raise ValueError(f"document {doc.document_unique_id} has no content_id")
        element = etree.SubElement(root, _q("DocumentResponse"))
        if doc.home_community_id:
            etree.SubElement(element, _q("HomeCommunityId")).text = doc.home_community_id
        etree.SubElement(element, _q("RepositoryUniqueId")).text = doc.repository_unique_id
        etree.SubElement(element, _q("DocumentUniqueId")).text = doc.document_unique_id
        if doc.new_repository_unique_id:
            etree.SubElement(
                element, _q("NewRepositoryUniqueId")
            ).text = doc.new_repository_unique_id
        if doc.new_document_unique_id:
            etree.SubElement(element, _q("NewDocumentUniqueId")).text = doc.new_document_unique_id
        etree.SubElement(element, _q("mimeType")).text = doc.mime_type
        document = etree.SubElement(element, _q("Document"))
        include = etree.SubElement(document, f"{{{XOP}}}Include", nsmap={"xop": XOP})
        include.set("href", f"cid:{doc.content_id}")
    return root


def parse_retrieve_document_set_response(payload: etree._Element) -> RetrieveDocumentSetResponse:
    """Read an xdsb:RetrieveDocumentSetResponse (from an untrusted peer: ValueError if bad)."""
    if payload.tag != _q("RetrieveDocumentSetResponse"):
        raise ValueError(f"expected RetrieveDocumentSetResponse, got {payload.tag}")
    registry_response = payload.find(f"{{{RS}}}RegistryResponse")
    if registry_response is None:
        raise ValueError("RetrieveDocumentSetResponse without rs:RegistryResponse")
    status = registry_response.get("status") or ""
    documents: list[DocumentResponse] = []
    for element in payload.iterfind(_q("DocumentResponse")):
        documents.append(
            DocumentResponse(
                repository_unique_id=_child_text(element, "RepositoryUniqueId") or "",
                document_unique_id=_child_text(element, "DocumentUniqueId") or "",
                mime_type=_child_text(element, "mimeType") or "",
                home_community_id=_child_text(element, "HomeCommunityId") or None,
                new_repository_unique_id=_child_text(element, "NewRepositoryUniqueId") or None,
                new_document_unique_id=_child_text(element, "NewDocumentUniqueId") or None,
                document=element.find(_q("Document")),
            )
        )
    return RetrieveDocumentSetResponse(
        status=status, errors=parse_registry_errors(registry_response), documents=documents
    )


# ------------------------------------------------------------------------ retrieval engine


class PeerCaller(Protocol):
    """What the engine needs of :class:`xca_gateway.protocol.peer_client.PeerClient`."""

    async def call(
        self,
        url: str,
        payload: etree._Element,
        action: str,
        *,
        peer: str = ...,
        transaction: str = ...,
        deadline: float | None = ...,
        parts: Sequence[mtom.OutgoingPart] = ...,
        use_mtom: bool = ...,
    ) -> SoapReply: ...


@dataclass(frozen=True)
class RemoteRepositories:
    """XDS Document Repositories of our community reached with ITI-43 over mutual TLS."""

    client: PeerCaller
    urls: Mapping[str, str]  # repositoryUniqueId -> ITI-43 endpoint URL
    deadline: float | None = None  # whole-call bound; None: the client's request timeout

    @classmethod
    def from_config(
        cls, config: RepositoryConfig, client: PeerCaller, deadline: float | None = None
    ) -> RemoteRepositories:
        return cls(client, {r.repository_unique_id: r.url for r in config.remote}, deadline)


@dataclass
class RetrievedDocument:
    """A document ready to be streamed into a response (exactly once)."""

    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    body: bytes | AsyncIterator[bytes]
    close: Callable[[], None] = field(default=lambda: None)
    # The community the document comes from, when it is not the responder's own.
    home_community_id: str | None = None


@dataclass
class RetrieveResult:
    documents: list[RetrievedDocument] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)

    @property
    def status(self) -> str:
        return status_for(self.errors, results=len(self.documents))

    def close(self) -> None:
        """Release everything not streamed (call when the result is not sent)."""
        for doc in self.documents:
            doc.close()


def same_community(a: str | None, b: str) -> bool:
    """homeCommunityIds compare equal ignoring the case of the ``urn:oid:`` scheme part."""
    if a is None:
        return False

    def norm(value: str) -> str:
        value = value.strip()
        return "urn:oid:" + value[8:] if value[:8].lower() == "urn:oid:" else value

    return norm(a) == norm(b)


async def _stream_local(
    repository: DocumentRepository, stored: StoredDocument
) -> AsyncIterator[bytes]:
    reader = await asyncio.to_thread(repository.open, stored.document_unique_id)
    if reader is None:
        # Deleted after the request was checked; failing the stream aborts the connection,
        # so the consumer cannot take a truncated response for a complete one.
        raise FileNotFoundError(f"document {stored.document_unique_id} disappeared")
    async for chunk in reader.aiter_chunks():
        yield chunk


async def _stream_attachment(attachment: mtom.Attachment) -> AsyncIterator[bytes]:
    try:
        attachment.file.seek(0)
        while chunk := await asyncio.to_thread(attachment.file.read, CHUNK_SIZE):
            yield chunk
    finally:
        attachment.close()


def _locate_local(
    repositories: Mapping[str, DocumentRepository], requests: Sequence[DocumentRequest]
) -> list[StoredDocument | OSError | None]:
    found: list[StoredDocument | OSError | None] = []
    for request in requests:
        try:
            found.append(repositories[request.repository_unique_id].get(request.document_unique_id))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("repository lookup of %s failed: %r", request.document_unique_id, exc)
            found.append(OSError(str(exc)))
    return found


async def _retrieve_remote(
    remote: RemoteRepositories,
    repository_unique_id: str,
    requests: Sequence[DocumentRequest],
    *,
    location: str,
    override_location: bool,
) -> tuple[dict[tuple[str, str], RetrievedDocument], list[RegistryError]]:
    # Inside our community: no HomeCommunityId, a plain XDS repository need not know it.
    return await retrieve_from(
        remote.client,
        remote.urls[repository_unique_id],
        [DocumentRequest(repository_unique_id, r.document_unique_id) for r in requests],
        source=f"repository {repository_unique_id}",
        peer_label=repository_unique_id,
        deadline=remote.deadline,
        location=location,
        override_location=override_location,
    )


async def retrieve_from(
    client: PeerCaller,
    url: str,
    requests: Sequence[DocumentRequest],
    *,
    source: str,
    peer_label: str,
    location: str,
    override_location: bool,
    deadline: float | None = None,
    action: str = Action.ITI43,
    transaction: str = "ITI-43",
    unavailable_code: str = XDS_REPOSITORY_ERROR,
    home_community_id: str | None = None,
) -> tuple[dict[tuple[str, str], RetrievedDocument], list[RegistryError]]:
    """Retrieve ``requests`` from one remote endpoint (an XDS repository with ITI-43, or a
    peer community's responding gateway with ITI-39) and get its documents ready to re-stream.

    ``source`` names the remote in error texts; ``location`` goes on the errors we raise.
    """
    payload = build_retrieve_document_set_request(RetrieveDocumentSetRequest(tuple(requests)))

    def each(code: str, context: str) -> list[RegistryError]:
        return [
            RegistryError(code, f"document {r.document_unique_id}: {context}", location)
            for r in requests
        ]

    try:
        reply = await client.call(
            url,
            payload,
            action,
            peer=peer_label,
            transaction=transaction,
            deadline=deadline,
            use_mtom=True,
        )
    except PeerError as exc:
        # Details (URLs, TLS errors) go to our log, not to the peer community.
        log.warning("%s to %s failed: %s", transaction, source, exc.message)
        return {}, each(unavailable_code, f"{source} is unavailable ({exc.kind})")
    used: set[str] = set()
    try:
        try:
            parsed = parse_retrieve_document_set_response(reply.payload)
        except ValueError as exc:
            log.warning("bad %s reply from %s: %s", transaction, source, exc)
            return {}, each(XDS_REPOSITORY_ERROR, f"{source} sent an unreadable response")
        wanted = {r.key for r in requests}
        documents: dict[tuple[str, str], RetrievedDocument] = {}
        errors: list[RegistryError] = []
        for error in parsed.errors:
            keep = error.location if error.location and not override_location else location
            errors.append(RegistryError(error.error_code, error.code_context, keep, error.severity))
        for doc in parsed.documents:
            key = (doc.repository_unique_id, doc.document_unique_id)
            if key not in wanted or key in documents or doc.document is None:
                continue  # not asked for (or repeated): a peer does not get to add documents
            if not valid_mime_type(doc.mime_type):
                errors.append(
                    RegistryError(
                        XDS_REPOSITORY_ERROR,
                        f"document {doc.document_unique_id}: {source} sent no valid mimeType",
                        location,
                    )
                )
                continue
            try:
                content = element_content(doc.document, reply.attachments)
                if not isinstance(content, bytes) and content.content_id in used:
                    raise SoapFault.sender("two documents refer to one MIME part")
            except SoapFault as fault:
                errors.append(
                    RegistryError(
                        XDS_REPOSITORY_ERROR,
                        f"document {doc.document_unique_id}: {source} sent bad content "
                        f"({fault.reason})",
                        location,
                    )
                )
                continue
            retrieved = RetrievedDocument(
                doc.repository_unique_id,
                doc.document_unique_id,
                doc.mime_type,
                b"",
                home_community_id=home_community_id,
            )
            if isinstance(content, bytes):
                retrieved.body = content
            else:
                attachment = reply.attachments[content.content_id]
                used.add(content.content_id)
                retrieved.body, retrieved.close = _stream_attachment(attachment), attachment.close
            documents[key] = retrieved
        if not parsed.errors:
            # A repository that drops documents silently still owes the consumer an answer.
            for r in requests:
                if r.key not in documents and not any(
                    r.document_unique_id in e.code_context for e in errors
                ):
                    errors.append(
                        RegistryError(
                            XDS_DOCUMENT_UNIQUE_ID_ERROR,
                            f"document {r.document_unique_id} was not returned by {source}",
                            location,
                        )
                    )
        return documents, errors
    finally:
        for cid, attachment in reply.attachments.items():
            if cid not in used:
                attachment.close()


async def retrieve_documents(
    requests: Sequence[DocumentRequest],
    repositories: Mapping[str, DocumentRepository],
    remote: RemoteRepositories | None = None,
    *,
    location: str,
    override_remote_location: bool = True,
) -> RetrieveResult:
    """Resolve DocumentRequests (homeCommunityId already checked by the caller).

    ``location`` goes on every RegistryError we raise; errors relayed from a remote
    repository keep their own location unless ``override_remote_location`` (ITI39-012).
    Results keep the order of the requests; repeated requests are answered once.
    """
    result = RetrieveResult()
    local: list[DocumentRequest] = []
    by_remote: dict[str, list[DocumentRequest]] = {}
    seen: set[tuple[str, str]] = set()
    remote_urls = remote.urls if remote is not None else {}
    for request in requests:
        if request.key in seen:
            continue
        seen.add(request.key)
        rid, uid = request.key
        if not uid:
            result.errors.append(
                RegistryError(
                    XDS_DOCUMENT_UNIQUE_ID_ERROR,
                    "DocumentRequest without DocumentUniqueId",
                    location,
                )
            )
        elif not rid:
            result.errors.append(
                RegistryError(
                    XDS_UNKNOWN_REPOSITORY_ID,
                    f"DocumentRequest for document {uid} without RepositoryUniqueId",
                    location,
                )
            )
        elif rid in repositories:
            local.append(request)
        elif rid in remote_urls:
            by_remote.setdefault(rid, []).append(request)
        else:
            result.errors.append(
                RegistryError(
                    XDS_UNKNOWN_REPOSITORY_ID,
                    f"document {uid}: repositoryUniqueId {rid} is not known in this community",
                    location,
                )
            )

    retrieved: dict[tuple[str, str], RetrievedDocument] = {}
    remote_calls = []
    if by_remote:
        assert remote is not None
        remote_calls = [
            _retrieve_remote(
                remote, rid, docs, location=location, override_location=override_remote_location
            )
            for rid, docs in by_remote.items()
        ]
    # Local lookups (in a thread: file system) and remote calls run concurrently.
    located, remote_outcomes = await asyncio.gather(
        asyncio.to_thread(_locate_local, repositories, local), asyncio.gather(*remote_calls)
    )
    for request, stored in zip(local, located, strict=True):
        if isinstance(stored, OSError):
            result.errors.append(
                RegistryError(
                    XDS_REPOSITORY_ERROR,
                    f"document {request.document_unique_id} could not be read",
                    location,
                )
            )
        elif stored is None:
            result.errors.append(
                RegistryError(
                    XDS_DOCUMENT_UNIQUE_ID_ERROR,
                    f"document {request.document_unique_id} is not in repository "
                    f"{request.repository_unique_id}",
                    location,
                )
            )
        else:
            retrieved[request.key] = RetrievedDocument(
                request.repository_unique_id,
                request.document_unique_id,
                stored.mime_type,
                _stream_local(repositories[request.repository_unique_id], stored),
            )
    for documents, errors in remote_outcomes:
        retrieved.update(documents)
        result.errors.extend(errors)
    for request in requests:
        doc = retrieved.pop(request.key, None)
        if doc is not None:
            result.documents.append(doc)
    return result


_OUTCOME = {
    ResponseStatus.SUCCESS: "success",
    ResponseStatus.PARTIAL_SUCCESS: "partial",
    ResponseStatus.FAILURE: "failure",
}


def retrieve_response(
    result: RetrieveResult, *, action: str, home_community_id: str | None
) -> SoapResponse:
    """The MTOM SOAP response for ``result``; documents stream as attachments."""
    status = result.status
    parts: list[mtom.OutgoingPart] = []
    responses: list[DocumentResponse] = []
    for doc in result.documents:
        content_id = mtom.make_content_id()
        responses.append(
            DocumentResponse(
                repository_unique_id=doc.repository_unique_id,
                document_unique_id=doc.document_unique_id,
                mime_type=doc.mime_type,
                home_community_id=doc.home_community_id or home_community_id,
                content_id=content_id,
            )
        )
        parts.append(mtom.OutgoingPart(content_id, doc.mime_type, doc.body))
    payload = build_retrieve_document_set_response(status, result.errors, responses)
    return SoapResponse(payload, action, parts=parts, mtom=True, outcome=_OUTCOME[status])


# --------------------------------------------------------------------------------- handler


def repository_retrieve_handler(
    repositories: Mapping[str, DocumentRepository],
    *,
    home_community_id: str,
    remote: RemoteRepositories | None = None,
) -> Handler:
    """ITI-43 served by this community's repository (embedded stores and remote ones).

    A HomeCommunityId is optional here; when present it must be ours (XDSUnknownCommunity
    otherwise: routing to other communities is the initiating gateway's job).
    """

    async def handle(request: SoapRequest) -> SoapResponse:
        parsed = parse_retrieve_document_set_request(request.payload)
        errors: list[RegistryError] = []
        accepted: list[DocumentRequest] = []
        for doc in parsed.documents:
            if doc.home_community_id is not None and not same_community(
                doc.home_community_id, home_community_id
            ):
                errors.append(
                    RegistryError(
                        XDS_UNKNOWN_COMMUNITY,
                        f"document {doc.document_unique_id}: homeCommunityId "
                        f"{doc.home_community_id} is not served by this repository",
                        home_community_id,
                    )
                )
            else:
                accepted.append(doc)
        result = await retrieve_documents(
            accepted,
            repositories,
            remote,
            location=home_community_id,
            override_remote_location=False,
        )
        result.errors[:0] = errors
        return retrieve_response(
            result, action=Action.ITI43_RESPONSE, home_community_id=home_community_id
        )

    return handle


# ---------------------------------------- audit records (ITI TF-2b 3.43.5)


def retrieve_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["consumer", "repository"],
    documents: Sequence[m.DocumentReference],
    failed: Sequence[m.DocumentReference] = (),
    failure_outcome: m.EventOutcome = m.EventOutcome.SERIOUS_FAILURE,
    patient_id: str | None = None,
    patients: Mapping[str, m.PatientRef] | None = None,
) -> tuple[m.AuditMessage, ...]:
    """ITI-43 Retrieve Document Set: Import (C) by the consumer, Export (R) by the repository
    (the Initiating Gateway answers its local consumers as a repository)."""
    m.check_side(side, ("consumer", "repository"))
    return m.document_retrieve_messages(
        ctx,
        m.EventTypeCode.ITI43,
        parties,
        exporting=side == "repository",
        documents=documents,
        failed=failed,
        failure_outcome=failure_outcome,
        patient_id=patient_id,
        patients=patients,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """ITI-43 answered here, as the Document Repository (the Initiating Gateway to its local
    consumers too): one record per outcome and patient."""
    delivered, failed, patients = exchange.documents()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="repository",
        documents=delivered,
        failed=failed,
        patients=patients,
    )


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """ITI-43 asked of another system, as the Document Consumer (a Responding Gateway relaying
    ITI-39, an Initiating Gateway retrieving locally)."""
    delivered, failed, patients = exchange.documents()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="consumer",
        documents=delivered,
        failed=failed,
        patients=patients,
    )
