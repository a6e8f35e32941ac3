"""RAD-69 / RAD-75 response (xdsb:RetrieveDocumentSetResponse), sans-IO parse and build.

Imaging answers reuse the ITI-43 response: status and RegistryErrors in rs:RegistryResponse, then
one DocumentResponse per SOP instance whose ``Document`` is an ``xop:Include`` of an
application/dicom MIME part (or, from senders that do not optimise, inline base64).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from xca_gateway.protocol.mtom import cid_from_href
from xca_gateway.protocol.namespaces import RS, XDSB, XOP
from xca_gateway.xds.ebrs import (
    RegistryError,
    parse_registry_errors,
    retrieve_document_set_response,
)

DICOM_MIME_TYPE = "application/dicom"


class InvalidImagingResponse(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)  # one per instance in flight
class DocumentResponse:
    home_community_id: str | None
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    content_id: str | None = None  # MIME part holding the document
    inline: bytes | None = None  # base64 content carried in the XML itself


@dataclass(frozen=True)
class RetrieveResponse:
    status: str
    errors: tuple[RegistryError, ...]
    documents: tuple[DocumentResponse, ...]


def _child_text(element: etree._Element, name: str) -> str | None:
    found = element.find(f"{{{XDSB}}}{name}")
    if found is None:
        return None
    return (found.text or "").strip() or None


def parse_retrieve_response(payload: etree._Element) -> RetrieveResponse:
    if payload.tag != f"{{{XDSB}}}RetrieveDocumentSetResponse":
        raise InvalidImagingResponse(f"unexpected response element {payload.tag}")
    registry_response = payload.find(f"{{{RS}}}RegistryResponse")
    if registry_response is None:
        raise InvalidImagingResponse("RetrieveDocumentSetResponse without rs:RegistryResponse")
    status = registry_response.get("status") or ""
    if not status:
        raise InvalidImagingResponse("rs:RegistryResponse without status")
    errors = tuple(parse_registry_errors(registry_response))
    documents: list[DocumentResponse] = []
    for element in payload.iterfind(f"{{{XDSB}}}DocumentResponse"):
        repository = _child_text(element, "RepositoryUniqueId")
        document_uid = _child_text(element, "DocumentUniqueId")
        if not repository or not document_uid:
            raise InvalidImagingResponse(
                "DocumentResponse without RepositoryUniqueId or DocumentUniqueId"
            )
        document = element.find(f"{{{XDSB}}}Document")
        if document is None:
            raise InvalidImagingResponse(f"DocumentResponse {document_uid} without Document")
        include = document.find(f"{{{XOP}}}Include")
        content_id: str | None = None
        inline: bytes | None = None
        if include is not None:
            href = include.get("href") or ""
            if not href.startswith("cid:"):
                raise InvalidImagingResponse("xop:Include href must be a cid: URL")
            content_id = cid_from_href(href)
        else:
            try:
                inline = base64.b64decode("".join((document.text or "").split()), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidImagingResponse(
                    f"Document of {document_uid} is not valid base64"
                ) from None
        documents.append(
            DocumentResponse(
                home_community_id=_child_text(element, "HomeCommunityId"),
                repository_unique_id=repository,
                document_unique_id=document_uid,
                mime_type=_child_text(element, "mimeType") or DICOM_MIME_TYPE,
                content_id=content_id,
                inline=inline,
            )
        )
    return RetrieveResponse(status, errors, tuple(documents))


def build_retrieve_response(
    status: str, errors: Iterable[RegistryError], documents: Iterable[DocumentResponse]
) -> etree._Element:
    """The response element; every document must reference its MIME part by content_id."""
    root = retrieve_document_set_response(status, errors)
    for doc in documents:
        if doc.content_id is None:
            raise ValueError("imaging responses carry documents as MTOM parts")
        element = etree.SubElement(root, f"{{{XDSB}}}DocumentResponse")
        if doc.home_community_id:
            etree.SubElement(element, f"{{{XDSB}}}HomeCommunityId").text = doc.home_community_id
        etree.SubElement(element, f"{{{XDSB}}}RepositoryUniqueId").text = doc.repository_unique_id
        etree.SubElement(element, f"{{{XDSB}}}DocumentUniqueId").text = doc.document_unique_id
        etree.SubElement(element, f"{{{XDSB}}}mimeType").text = doc.mime_type
        document = etree.SubElement(element, f"{{{XDSB}}}Document")
        etree.SubElement(document, f"{{{XOP}}}Include", nsmap={"xop": XOP}).set(
            "href", f"cid:{doc.content_id}"
        )
    return root
