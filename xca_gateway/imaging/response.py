"""RAD-69 / RAD-75 response (xdsb:RetrieveDocumentSetResponse), sans-IO parse and build.

Imaging answers reuse the ITI-43 response: status and RegistryErrors in rs:RegistryResponse, then
one DocumentResponse per SOP instance whose ``Document`` is an ``xop:Include`` of an
application/dicom MIME part (or, from senders that do not optimise, inline base64).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from lxml import etree

from xca_gateway.imaging.request import WRITE_CHUNK, slot_setters, xml_text
from xca_gateway.protocol.mtom import cid_from_href
from xca_gateway.protocol.namespaces import RS, XDSB, XOP
from xca_gateway.protocol.xmlstream import walk_tree
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


@dataclass(frozen=True, slots=True, init=False)  # one per instance in flight
class DocumentResponse:
    home_community_id: str | None
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    content_id: str | None = None  # MIME part holding the document
    inline: bytes | None = None  # base64 content carried in the XML itself

    def __init__(
        self,
        home_community_id: str | None,
        repository_unique_id: str,
        document_unique_id: str,
        mime_type: str,
        content_id: str | None = None,
        inline: bytes | None = None,
    ) -> None:
        # A relaying gateway makes two per instance. The generated __init__ of a frozen
        # dataclass sets each field with object.__setattr__ (0.7 us for these six); the
        # slots' own setters take half that.
        _SET_RESPONSE[0](self, home_community_id)
        _SET_RESPONSE[1](self, repository_unique_id)
        _SET_RESPONSE[2](self, document_unique_id)
        _SET_RESPONSE[3](self, mime_type)
        _SET_RESPONSE[4](self, content_id)
        _SET_RESPONSE[5](self, inline)


_SET_RESPONSE = slot_setters(DocumentResponse)


@dataclass(frozen=True)
class RetrieveResponse:
    status: str
    errors: tuple[RegistryError, ...]
    documents: tuple[DocumentResponse, ...]


_HOME_COMMUNITY_ID = f"{{{XDSB}}}HomeCommunityId"
_REPOSITORY_UNIQUE_ID = f"{{{XDSB}}}RepositoryUniqueId"
_DOCUMENT_UNIQUE_ID = f"{{{XDSB}}}DocumentUniqueId"
_MIME_TYPE = f"{{{XDSB}}}mimeType"
_DOCUMENT = f"{{{XDSB}}}Document"
_INCLUDE_TAG = f"{{{XOP}}}Include"


# Where each field's text goes in document_response's look at the children.
_FIELD_SLOTS = {
    _HOME_COMMUNITY_ID: 0,
    _REPOSITORY_UNIQUE_ID: 1,
    _DOCUMENT_UNIQUE_ID: 2,
    _MIME_TYPE: 3,
}


def document_response(element: etree._Element) -> DocumentResponse:
    """One DocumentResponse element as a compact record (InvalidImagingResponse if broken)."""
    # The first child of each name, in one look at the children (a find() per name was the
    # most of a relayed response root's parse); a tag is built per child, so once.
    texts: list[str | None] = [None, None, None, None]
    document: etree._Element | None = None
    slots = _FIELD_SLOTS
    for child in element:
        tag = child.tag
        slot = slots.get(tag) if isinstance(tag, str) else None
        if slot is not None:
            if texts[slot] is None:  # the first of its name ("" once seen)
                texts[slot] = (child.text or "").strip()
        elif document is None and tag == _DOCUMENT:
            document = child
    home, repository, document_uid, mime_type = texts
    if not repository or not document_uid:
        raise InvalidImagingResponse(
            "DocumentResponse without RepositoryUniqueId or DocumentUniqueId"
        )
    if document is None:
        raise InvalidImagingResponse(f"DocumentResponse {document_uid} without Document")
    include = None
    for child in document:
        if child.tag == _INCLUDE_TAG:
            include = child
            break
    content_id: str | None = None
    inline: bytes | None = None
    if include is not None:
        href = include.get("href") or ""
        if not href.startswith("cid:"):
            raise InvalidImagingResponse("xop:Include href must be a cid: URL")
        # What cid_from_href makes of a plain one, without its unquoting.
        plain = "%" not in href and not href[-1:].isspace()
        content_id = href[4:] if plain else cid_from_href(href)
    else:
        try:
            inline = base64.b64decode("".join((document.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImagingResponse(
                f"Document of {document_uid} is not valid base64"
            ) from None
    return DocumentResponse(
        home or None, repository, document_uid, mime_type or DICOM_MIME_TYPE, content_id, inline
    )


class RetrieveResponseReader:
    """Reads a RetrieveDocumentSetResponse element by element, as
    :class:`~xca_gateway.protocol.xmlstream.PrunedXmlParser` hands them over: each
    DocumentResponse (a child of the payload, at ``depth``) goes to ``on_document`` as a
    compact record and is dropped from the tree; :meth:`finish` reads the status and
    RegistryErrors from what is left. The first broken DocumentResponse is kept in ``error``
    (raised by :meth:`finish`) and stops the reading of the others."""

    # The only elements taken (for PrunedXmlParser's ``tags``).
    tags = (f"{{{XDSB}}}DocumentResponse",)

    def __init__(self, on_document: Callable[[DocumentResponse], None], *, depth: int = 1) -> None:
        self._on_document = on_document
        self._depth = depth
        self.error: InvalidImagingResponse | None = None
        self.count = 0

    def take(self, element: etree._Element, depth: int) -> bool:
        if depth != self._depth or element.tag != _DOCUMENT_RESPONSE:
            return False
        if self.error is None:
            try:
                self._on_document(document_response(element))
                self.count += 1
            except InvalidImagingResponse as exc:
                self.error = exc
        return True

    def finish(self, payload: etree._Element) -> tuple[str, tuple[RegistryError, ...]]:
        """(status, RegistryErrors) of the response; raises InvalidImagingResponse."""
        if payload.tag != f"{{{XDSB}}}RetrieveDocumentSetResponse":
            raise InvalidImagingResponse(f"unexpected response element {payload.tag}")
        registry_response = payload.find(f"{{{RS}}}RegistryResponse")
        if registry_response is None:
            raise InvalidImagingResponse("RetrieveDocumentSetResponse without rs:RegistryResponse")
        status = registry_response.get("status") or ""
        if not status:
            raise InvalidImagingResponse("rs:RegistryResponse without status")
        if self.error is not None:
            raise self.error
        return status, tuple(parse_registry_errors(registry_response))


_DOCUMENT_RESPONSE = f"{{{XDSB}}}DocumentResponse"


def parse_retrieve_response(payload: etree._Element) -> RetrieveResponse:
    documents: list[DocumentResponse] = []
    reader = RetrieveResponseReader(documents.append)
    walk_tree(payload, reader.take)
    status, errors = reader.finish(payload)
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


def retrieve_response_shell(status: str, errors: Iterable[RegistryError]) -> etree._Element:
    """The response element with its status and RegistryErrors, declaring the prefixes
    :func:`write_document_responses` writes its DocumentResponses with."""
    root = retrieve_document_set_response(status, errors)
    if root.prefix != "xdsb":  # pragma: no cover - ebrs declares it so
        raise ValueError("RetrieveDocumentSetResponse must use the xdsb prefix")
    return root


def _attribute_text(value: str) -> str:
    text = xml_text(value)
    return text if '"' not in text else text.replace('"', "&quot;")


_INCLUDE = f'<xop:Include xmlns:xop="{XOP}" href="cid:'


def write_document_responses(documents: Iterable[DocumentResponse]) -> Iterator[bytes]:
    """The DocumentResponses :func:`build_retrieve_response` would append to the shell,
    written straight to bytes in chunks: a 20,000-instance response root is never a tree."""
    out: list[str] = []
    size = 0
    # The community, repository and MIME type are the same strings instance after instance:
    # escaped when they change, not per instance.
    home: object = None
    repository: object = None
    mime_type: object = None
    head = tail = ""
    for doc in documents:
        content_id = doc.content_id
        if content_id is None:
            raise ValueError("imaging responses carry documents as MTOM parts")
        if doc.home_community_id is not home or doc.repository_unique_id is not repository:
            home, repository = doc.home_community_id, doc.repository_unique_id
            head = "<xdsb:DocumentResponse>" + (
                f"<xdsb:HomeCommunityId>{xml_text(doc.home_community_id)}</xdsb:HomeCommunityId>"
                if doc.home_community_id
                else ""
            )
            head += f"<xdsb:RepositoryUniqueId>{xml_text(doc.repository_unique_id)}"
            head += "</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>"
        if doc.mime_type is not mime_type:
            mime_type = doc.mime_type
            tail = (
                f"</xdsb:DocumentUniqueId><xdsb:mimeType>{xml_text(doc.mime_type)}"
                f"</xdsb:mimeType><xdsb:Document>{_INCLUDE}"
            )
        piece = (
            f"{head}{xml_text(doc.document_unique_id)}{tail}{_attribute_text(content_id)}"
            '"/></xdsb:Document></xdsb:DocumentResponse>'
        )
        out.append(piece)
        size += len(piece)
        if size >= WRITE_CHUNK:
            yield "".join(out).encode("utf-8")
            out.clear()
            size = 0
    if out:
        yield "".join(out).encode("utf-8")
