"""RAD-69 / RAD-75 Retrieve Imaging Document Set request (sans-IO model, parse and build).

The request (IHEXDSIB.xsd) nests DocumentRequests under SeriesRequest under StudyRequest and
ends with the TransferSyntaxUIDList. By the XSD the ``DocumentRequest`` element is in the
xdsi-b namespace and its children (HomeCommunityId, RepositoryUniqueId, DocumentUniqueId) in the
xds-b namespace; real senders also put ``DocumentRequest`` in xds-b (NIST toolkit) or the
children in xdsi-b, so parsing accepts either namespace for all of them and building emits the
schema-valid form. Values are trimmed: test tools send UIDs with line breaks around them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

from xca_gateway.namespaces import XDSB, XDSI

__all__ = [
    "DocumentRequest",
    "InvalidImagingRequest",
    "RetrieveImagingDocumentSetRequest",
    "build_retrieve_imaging_request",
    "check_retrieve_imaging_request",
    "parse_retrieve_imaging_request",
]

_NAMESPACES = (XDSI, XDSB)
# DICOM UIDs and ISO OIDs: dotted decimal, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


class InvalidImagingRequest(ValueError):
    """The request does not follow the RAD-69 schema; ``reason`` is safe to return."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DocumentRequest:
    """One requested SOP instance with the study and series it was requested under."""

    study_instance_uid: str
    series_instance_uid: str
    repository_unique_id: str
    document_unique_id: str  # SOP Instance UID
    home_community_id: str | None = None


@dataclass(frozen=True)
class RetrieveImagingDocumentSetRequest:
    documents: tuple[DocumentRequest, ...]
    transfer_syntax_uids: tuple[str, ...]

    def subset(self, documents: Iterable[DocumentRequest]) -> RetrieveImagingDocumentSetRequest:
        """The same request restricted to ``documents`` (for splitting by source or community)."""
        return RetrieveImagingDocumentSetRequest(tuple(documents), self.transfer_syntax_uids)


def is_uid(value: str) -> bool:
    return len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def _local(element: etree._Element) -> str | None:
    tag: object = element.tag
    if not isinstance(tag, str):
        return None  # comment or processing instruction
    qname = etree.QName(tag)
    return qname.localname if qname.namespace in _NAMESPACES else f"{{{qname.namespace}}}?"


def _children(element: etree._Element, name: str) -> list[etree._Element]:
    return [child for child in element if _local(child) == name]


def _text(element: etree._Element, name: str, *, required: bool, where: str) -> str | None:
    found = _children(element, name)
    if len(found) > 1:
        raise InvalidImagingRequest(f"{where}: more than one {name}")
    if not found:
        if required:
            raise InvalidImagingRequest(f"{where}: {name} is missing")
        return None
    value = (found[0].text or "").strip()
    if not value:
        if required:
            raise InvalidImagingRequest(f"{where}: {name} is empty")
        return None
    return value


def _uid_attribute(element: etree._Element, name: str, where: str) -> str:
    value = (element.get(name) or "").strip()
    if not value:
        raise InvalidImagingRequest(f"{where}: attribute {name} is missing")
    if not is_uid(value):
        raise InvalidImagingRequest(f"{where}: {name} {value[:80]!r} is not a DICOM UID")
    return value


def parse_retrieve_imaging_request(
    payload: etree._Element, *, max_documents: int = 100_000
) -> RetrieveImagingDocumentSetRequest:
    """Read a RetrieveImagingDocumentSetRequest element; raise InvalidImagingRequest if bad."""
    if _local(payload) != "RetrieveImagingDocumentSetRequest":
        raise InvalidImagingRequest(
            f"expected RetrieveImagingDocumentSetRequest, got {etree.QName(payload).localname}"
        )
    documents: list[DocumentRequest] = []
    studies = _children(payload, "StudyRequest")
    if not studies:
        raise InvalidImagingRequest("at least one StudyRequest is required")
    for study in studies:
        study_uid = _uid_attribute(study, "studyInstanceUID", "StudyRequest")
        series_list = _children(study, "SeriesRequest")
        if not series_list:
            raise InvalidImagingRequest(f"StudyRequest {study_uid} has no SeriesRequest")
        for series in series_list:
            series_uid = _uid_attribute(series, "seriesInstanceUID", "SeriesRequest")
            requests = _children(series, "DocumentRequest")
            if not requests:
                raise InvalidImagingRequest(f"SeriesRequest {series_uid} has no DocumentRequest")
            for request in requests:
                where = f"DocumentRequest in series {series_uid}"
                repository = _text(request, "RepositoryUniqueId", required=True, where=where)
                document = _text(request, "DocumentUniqueId", required=True, where=where)
                home = _text(request, "HomeCommunityId", required=False, where=where)
                assert repository is not None and document is not None
                if not is_uid(document):
                    raise InvalidImagingRequest(
                        f"DocumentUniqueId {document[:80]!r} is not a SOP Instance UID"
                    )
                documents.append(DocumentRequest(study_uid, series_uid, repository, document, home))
                if len(documents) > max_documents:
                    raise InvalidImagingRequest(
                        f"more than {max_documents} DocumentRequests in one request"
                    )
    syntax_lists = _children(payload, "TransferSyntaxUIDList")
    if len(syntax_lists) != 1:
        raise InvalidImagingRequest("exactly one TransferSyntaxUIDList is required")
    syntaxes: list[str] = []
    for element in _children(syntax_lists[0], "TransferSyntaxUID"):
        value = (element.text or "").strip()
        if not is_uid(value):
            raise InvalidImagingRequest(f"TransferSyntaxUID {value[:80]!r} is not a UID")
        if value not in syntaxes:
            syntaxes.append(value)
    if not syntaxes:
        raise InvalidImagingRequest("TransferSyntaxUIDList needs at least one TransferSyntaxUID")
    return RetrieveImagingDocumentSetRequest(tuple(documents), tuple(syntaxes))


def check_retrieve_imaging_request(
    request: RetrieveImagingDocumentSetRequest, *, max_documents: int = 100_000
) -> None:
    """What :func:`parse_retrieve_imaging_request` enforces, for a request built in-process
    (from a KOS manifest, which may come from anywhere): raise InvalidImagingRequest if bad."""
    if not request.documents:
        raise InvalidImagingRequest("at least one DocumentRequest is required")
    if len(request.documents) > max_documents:
        raise InvalidImagingRequest(f"more than {max_documents} DocumentRequests in one request")
    for doc in request.documents:
        for name, value in (
            ("studyInstanceUID", doc.study_instance_uid),
            ("seriesInstanceUID", doc.series_instance_uid),
            ("DocumentUniqueId", doc.document_unique_id),
        ):
            if not is_uid(value):
                raise InvalidImagingRequest(f"{name} {value[:80]!r} is not a DICOM UID")
        if not doc.repository_unique_id.strip():
            raise InvalidImagingRequest(
                f"DocumentRequest {doc.document_unique_id}: RepositoryUniqueId is empty"
            )
    if not request.transfer_syntax_uids:
        raise InvalidImagingRequest("TransferSyntaxUIDList needs at least one TransferSyntaxUID")
    for uid in request.transfer_syntax_uids:
        if not is_uid(uid):
            raise InvalidImagingRequest(f"TransferSyntaxUID {uid[:80]!r} is not a UID")


def build_retrieve_imaging_request(
    request: RetrieveImagingDocumentSetRequest,
) -> etree._Element:
    """The schema-valid element; documents are grouped by study and series, order kept."""
    root = etree.Element(
        f"{{{XDSI}}}RetrieveImagingDocumentSetRequest", nsmap={"iherad": XDSI, "xdsb": XDSB}
    )
    studies: dict[str, dict[str, list[DocumentRequest]]] = {}
    for doc in request.documents:
        studies.setdefault(doc.study_instance_uid, {}).setdefault(
            doc.series_instance_uid, []
        ).append(doc)
    for study_uid, series_map in studies.items():
        study = etree.SubElement(root, f"{{{XDSI}}}StudyRequest")
        study.set("studyInstanceUID", study_uid)
        for series_uid, docs in series_map.items():
            series = etree.SubElement(study, f"{{{XDSI}}}SeriesRequest")
            series.set("seriesInstanceUID", series_uid)
            for doc in docs:
                element = etree.SubElement(series, f"{{{XDSI}}}DocumentRequest")
                if doc.home_community_id:
                    etree.SubElement(
                        element, f"{{{XDSB}}}HomeCommunityId"
                    ).text = doc.home_community_id
                etree.SubElement(
                    element, f"{{{XDSB}}}RepositoryUniqueId"
                ).text = doc.repository_unique_id
                etree.SubElement(
                    element, f"{{{XDSB}}}DocumentUniqueId"
                ).text = doc.document_unique_id
    syntax_list = etree.SubElement(root, f"{{{XDSI}}}TransferSyntaxUIDList")
    for uid in request.transfer_syntax_uids:
        etree.SubElement(syntax_list, f"{{{XDSI}}}TransferSyntaxUID").text = uid
    return root


def group_in_order(
    documents: Sequence[DocumentRequest], key: str
) -> dict[str, list[DocumentRequest]]:
    """Group documents by an attribute (e.g. repository_unique_id), keeping first-seen order."""
    groups: dict[str, list[DocumentRequest]] = {}
    for doc in documents:
        groups.setdefault(str(getattr(doc, key) or ""), []).append(doc)
    return groups
