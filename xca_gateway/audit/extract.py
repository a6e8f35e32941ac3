"""What the audit messages need, read from the transaction messages themselves. Sans-IO.

Handlers pass the request (and response) elements they already hold; these functions pull out
the stored query id, its patient ids and home community, the documents asked for and the
documents returned, so that successes and failures can be audited separately (DICOM A.5.2).
Element names are matched by local name where implementations disagree on namespaces
(``DocumentRequest`` in RAD-69 is declared in the XDS-I.b schema but often sent in XDS.b's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

from xca_gateway.audit.messages import DocumentReference, ImagingInstanceReference
from xca_gateway.protocol.namespaces import RIM

# Stored query parameters that carry a patient id (ITI TF-2a 3.18.4.1.2.3.7).
PATIENT_ID_PARAMETERS = (
    "$XDSDocumentEntryPatientId",
    "$XDSFolderPatientId",
    "$XDSSubmissionSetPatientId",
    "$patientId",
)
_QUOTED = re.compile(r"'((?:[^']|'')*)'")


@dataclass(frozen=True)
class StoredQuery:
    query_id: str | None
    home_community_id: str | None
    patient_ids: tuple[str, ...]
    # The whole AdhocQueryRequest, as received (ParticipantObjectQuery).
    query: bytes


def _local(element: etree._Element) -> str:
    tag = element.tag
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _children(element: etree._Element, name: str) -> Iterable[etree._Element]:
    return (c for c in element if _local(c) == name)


def _child_text(element: etree._Element, name: str) -> str | None:
    for child in _children(element, name):
        text = (child.text or "").strip()
        return text or None
    return None


def _slot_values(value: str) -> list[str]:
    """'a' or ('a','b') -> [a, b]; unquoted values as they are."""
    quoted = _QUOTED.findall(value)
    if quoted:
        return [q.replace("''", "'") for q in quoted]
    stripped = value.strip().strip("()").strip()
    return [stripped] if stripped else []


def stored_query(adhoc_query_request: etree._Element) -> StoredQuery:
    """Audit fields of an AdhocQueryRequest (ITI-18, ITI-38)."""
    query = next(adhoc_query_request.iter(f"{{{RIM}}}AdhocQuery"), None)
    patients: list[str] = []
    if query is not None:
        for slot in query.iterfind(f"{{{RIM}}}Slot"):
            if slot.get("name") in PATIENT_ID_PARAMETERS:
                for value in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value"):
                    patients.extend(_slot_values(value.text or ""))
    return StoredQuery(
        query_id=query.get("id") if query is not None else None,
        home_community_id=query.get("home") if query is not None else None,
        patient_ids=tuple(dict.fromkeys(p for p in patients if p)),
        query=etree.tostring(adhoc_query_request, encoding="UTF-8"),
    )


def _document(element: etree._Element) -> DocumentReference | None:
    unique_id = _child_text(element, "DocumentUniqueId")
    if unique_id is None:
        return None
    return DocumentReference(
        unique_id,
        _child_text(element, "RepositoryUniqueId"),
        _child_text(element, "HomeCommunityId"),
    )


def _asked(element: etree._Element) -> DocumentReference:
    """What one DocumentRequest asked for, even when malformed: an audit of a retrieve names
    every request, so one without a DocumentUniqueId is recorded with an empty id and what
    was wrong with it, never dropped."""
    unique_id = _child_text(element, "DocumentUniqueId")
    present = any(_local(c) == "DocumentUniqueId" for c in element)
    problem = None
    if unique_id is None:
        problem = (
            "DocumentRequest with an empty DocumentUniqueId"
            if present
            else "DocumentRequest without DocumentUniqueId"
        )
    return DocumentReference(
        unique_id or "",
        _child_text(element, "RepositoryUniqueId"),
        _child_text(element, "HomeCommunityId"),
        problem,
    )


def requested_documents(retrieve_request: etree._Element) -> list[DocumentReference]:
    """The DocumentRequests of an ITI-43 / ITI-39 RetrieveDocumentSetRequest, all of them."""
    return [_asked(e) for e in retrieve_request.iter() if _local(e) == "DocumentRequest"]


def returned_documents(retrieve_response: etree._Element) -> list[DocumentReference]:
    """The DocumentResponses of a RetrieveDocumentSetResponse (ITI-43/39, RAD-69/75)."""
    docs = (_document(e) for e in retrieve_response.iter() if _local(e) == "DocumentResponse")
    return [d for d in docs if d is not None]


def requested_instance(
    study_uid: str, series_uid: str, document_request: etree._Element
) -> ImagingInstanceReference:
    """What one DocumentRequest of a RAD-69 / RAD-75 request asked for, malformed or not."""
    doc = _asked(document_request)
    problem = doc.problem
    if not study_uid:
        problem = "; ".join(filter(None, ("empty studyInstanceUID", problem)))
    return ImagingInstanceReference(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=doc.document_unique_id,
        repository_unique_id=doc.repository_unique_id,
        home_community_id=doc.home_community_id,
        problem=problem,
    )


def requested_instances(imaging_request: etree._Element) -> list[ImagingInstanceReference]:
    """The instances of a RAD-69 / RAD-75 RetrieveImagingDocumentSetRequest."""
    found: list[ImagingInstanceReference] = []
    for study in imaging_request.iter():
        if _local(study) != "StudyRequest":
            continue
        study_uid = (study.get("studyInstanceUID") or "").strip()
        for series in _children(study, "SeriesRequest"):
            series_uid = (series.get("seriesInstanceUID") or "").strip()
            for request in _children(series, "DocumentRequest"):
                found.append(requested_instance(study_uid, series_uid, request))
    return found


def split_documents(
    requested: Sequence[DocumentReference], returned: Sequence[DocumentReference]
) -> tuple[list[DocumentReference], list[DocumentReference]]:
    """(delivered, failed): requested documents that came back, and those that did not.
    Documents returned without being asked for individually count as delivered."""
    got = {d.document_unique_id for d in returned}
    delivered = [d for d in requested if d.document_unique_id in got]
    failed = [d for d in requested if d.document_unique_id not in got]
    asked = {d.document_unique_id for d in requested}
    delivered.extend(d for d in returned if d.document_unique_id not in asked)
    return delivered, failed


def split_instances(
    requested: Sequence[ImagingInstanceReference], returned: Sequence[DocumentReference]
) -> tuple[list[ImagingInstanceReference], list[ImagingInstanceReference]]:
    """(delivered, failed) instances of an imaging retrieve, by SOP Instance UID."""
    got = {d.document_unique_id for d in returned}
    delivered = [i for i in requested if i.sop_instance_uid in got]
    failed = [i for i in requested if i.sop_instance_uid not in got]
    return delivered, failed
