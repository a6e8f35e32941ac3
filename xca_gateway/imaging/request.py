"""RAD-69 / RAD-75 Retrieve Imaging Document Set request (sans-IO model, parse and build).

The request (IHEXDSIB.xsd) nests DocumentRequests under SeriesRequest under StudyRequest and
ends with the TransferSyntaxUIDList. By the XSD the ``DocumentRequest`` element is in the
xdsi-b namespace and its children (HomeCommunityId, RepositoryUniqueId, DocumentUniqueId) in the
xds-b namespace; real senders also put ``DocumentRequest`` in xds-b (NIST toolkit) or the
children in xdsi-b, so parsing accepts either namespace for all of them and building emits the
schema-valid form. Values are trimmed: test tools send UIDs with line breaks around them.

Two classes of bad request (issue 17): XML/schema breakage (a required element or attribute
missing, one duplicated, no StudyRequest/SeriesRequest/DocumentRequest/TransferSyntaxUID) raises
:class:`InvalidImagingRequest`, which the endpoints answer with a SOAP Sender fault. A
schema-valid request whose *values* cannot name an instance (a DocumentUniqueId that is not a
<= 64 character DICOM UID, an empty studyInstanceUID, an empty RepositoryUniqueId, no usable
TransferSyntaxUID) is not refused as a whole: the offending DocumentRequests are set aside as
:class:`RejectedDocument` and each gets its own RegistryError, while the others are retrieved
(PartialSuccess), as ITI-43 does. Peers treat a fault as a transport failure and would drop the
good instances with it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from xca_gateway.audit.extract import requested_instance
from xca_gateway.audit.messages import ImagingInstanceReference
from xca_gateway.protocol.namespaces import XDSB, XDSI
from xca_gateway.protocol.xmlstream import walk_tree

__all__ = [
    "DOCUMENT_UNIQUE_ID_ERROR",
    "IMAGING_REQUEST",
    "UNKNOWN_REPOSITORY_ID",
    "DocumentRequest",
    "InvalidImagingRequest",
    "RejectedDocument",
    "RetrieveImagingDocumentSetRequest",
    "build_retrieve_imaging_request",
    "check_retrieve_imaging_request",
    "is_uid",
    "parse_retrieve_imaging_request",
    "screen_documents",
]

_NAMESPACES = (XDSI, XDSB)
# The payload element :class:`RetrieveImagingRequestReader` reads, as senders name it.
IMAGING_REQUEST = f"{{{XDSI}}}RetrieveImagingDocumentSetRequest"
# DICOM UIDs and ISO OIDs: dotted decimal, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64
DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"


class InvalidImagingRequest(ValueError):
    """The request does not follow the RAD-69 schema; ``reason`` is safe to return."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        # Every instance the refused request asked for, for its audit record (when known).
        self.requested: tuple[ImagingInstanceReference, ...] = ()


def slot_setters(cls: type) -> tuple[Callable[[object, object], None], ...]:
    """The setters of a slotted dataclass's fields, in field order: what a frozen record made
    per instance sets its fields with (``object.__setattr__`` looks each one up by name)."""
    return tuple(cls.__dict__[field.name].__set__ for field in dataclasses.fields(cls))


@dataclass(frozen=True, slots=True, init=False)  # one per instance: 20,000 in a large study
class DocumentRequest:
    """One requested SOP instance with the study and series it was requested under."""

    study_instance_uid: str
    series_instance_uid: str
    repository_unique_id: str
    document_unique_id: str  # SOP Instance UID
    home_community_id: str | None = None

    def __init__(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        repository_unique_id: str,
        document_unique_id: str,
        home_community_id: str | None = None,
    ) -> None:
        # Frozen all the same: the generated __init__ would set each field with
        # object.__setattr__, twice as slow as the slots' setters.
        _SET_REQUEST[0](self, study_instance_uid)
        _SET_REQUEST[1](self, series_instance_uid)
        _SET_REQUEST[2](self, repository_unique_id)
        _SET_REQUEST[3](self, document_unique_id)
        _SET_REQUEST[4](self, home_community_id)


_SET_REQUEST = slot_setters(DocumentRequest)


@dataclass(frozen=True)
class RejectedDocument:
    """A DocumentRequest whose identifiers cannot name an instance, as it was asked for, with
    the XDS error code and the reason it gets instead of being retrieved."""

    document: DocumentRequest
    error_code: str
    reason: str

    @property
    def code_context(self) -> str:
        doc = self.document
        return (
            f"DocumentRequest for SOP instance {doc.document_unique_id[:80]!r} (study "
            f"{doc.study_instance_uid[:80]!r}, series {doc.series_instance_uid[:80]!r}, "
            f"repository {doc.repository_unique_id[:80]!r}) not retrieved: {self.reason}"
        )


@dataclass(frozen=True)
class RetrieveImagingDocumentSetRequest:
    documents: tuple[DocumentRequest, ...]
    transfer_syntax_uids: tuple[str, ...]
    # Asked for, but with identifiers that cannot name an instance: never sent anywhere.
    rejected: tuple[RejectedDocument, ...] = ()

    def subset(self, documents: Iterable[DocumentRequest]) -> RetrieveImagingDocumentSetRequest:
        """The same request restricted to ``documents`` (for splitting by source or community);
        the rejected DocumentRequests stay with the gateway that answers for them."""
        return RetrieveImagingDocumentSetRequest(tuple(documents), self.transfer_syntax_uids)

    @property
    def requested(self) -> tuple[DocumentRequest, ...]:
        """Every DocumentRequest asked for, rejected ones included."""
        return self.documents + tuple(r.document for r in self.rejected)


def is_uid(value: str) -> bool:
    return len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


# Local names by Clark tag: a request names a handful of tags thousands of times (a QName
# per element and look-up was a third of the request's parse). Bounded: tags are untrusted.
_LOCAL_NAMES: dict[str, str] = {}
_MAX_LOCAL_NAMES = 256


def _local(element: etree._Element) -> str | None:
    tag: object = element.tag
    if not isinstance(tag, str):
        return None  # comment or processing instruction
    name = _LOCAL_NAMES.get(tag)
    if name is None:
        qname = etree.QName(tag)
        name = qname.localname if qname.namespace in _NAMESPACES else f"{{{qname.namespace}}}?"
        if len(_LOCAL_NAMES) < _MAX_LOCAL_NAMES:
            _LOCAL_NAMES[tag] = name
    return name


def _children(element: etree._Element, name: str) -> list[etree._Element]:
    return [child for child in element if _local(child) == name]


_DOCUMENT_FIELDS = ("RepositoryUniqueId", "DocumentUniqueId", "HomeCommunityId")


# A DocumentRequest's fields by tag, in either namespace.
_DOCUMENT_SLOTS = {
    f"{{{namespace}}}{name}": slot
    for namespace in _NAMESPACES
    for slot, name in enumerate(_DOCUMENT_FIELDS)
}


def _document_texts(element: etree._Element, series_uid: str) -> tuple[str, str, str]:
    """(RepositoryUniqueId, DocumentUniqueId, HomeCommunityId) of a DocumentRequest, in one
    look at its children (each child's tag and text read once)."""
    texts: list[str | None] = [None, None, None]
    broken = False
    slots = _DOCUMENT_SLOTS
    for child in element:
        slot = slots.get(child.tag)  # None for comments (their tag is a function)
        if slot is not None:
            if texts[slot] is not None:
                broken = True
            texts[slot] = (child.text or "").strip()
    repository, document, home = texts
    if broken or repository is None or document is None:
        _check_document_fields(element, f"DocumentRequest in series {series_uid[:80]!r}")
    return repository or "", document or "", home or ""


def _check_document_fields(element: etree._Element, where: str) -> tuple[str, str, str]:
    """:func:`_document_texts` the long way, for a broken DocumentRequest: the errors, and
    their order, of :func:`_text` for each field."""
    found: dict[str, list[etree._Element]] = {}
    for child in element:
        name = _local(child)
        if name in _DOCUMENT_FIELDS:
            found.setdefault(name, []).append(child)
    texts = []
    for name in _DOCUMENT_FIELDS:
        children = found.get(name, ())
        if len(children) > 1:
            raise InvalidImagingRequest(f"{where}: more than one {name}")
        if not children:
            if name != "HomeCommunityId":
                raise InvalidImagingRequest(f"{where}: {name} is missing")
            texts.append("")
        else:
            texts.append((children[0].text or "").strip())
    return texts[0], texts[1], texts[2]


def _attribute(element: etree._Element, name: str, where: str) -> str:
    """A required attribute: absent breaks the schema; its (trimmed) value may be anything."""
    value = element.get(name)
    if value is None:
        raise InvalidImagingRequest(f"{where}: attribute {name} is missing")
    return value.strip()


def _problem(doc: DocumentRequest, good: set[str] | None = None) -> tuple[str, str] | None:
    """(XDS error code, reason) when ``doc`` cannot name an instance, else None. ``good``:
    study and series UIDs found valid already (shared by thousands of instances)."""
    uid = doc.document_unique_id
    if not uid:
        return DOCUMENT_UNIQUE_ID_ERROR, "DocumentUniqueId is empty"
    if not is_uid(uid):
        return (
            DOCUMENT_UNIQUE_ID_ERROR,
            f"DocumentUniqueId is not a SOP Instance UID (digits and dots, at most "
            f"{MAX_UID_LENGTH} characters; this one has {len(uid)})",
        )
    study, series = doc.study_instance_uid, doc.series_instance_uid
    if good is None or study not in good or series not in good:
        for name, value in (("studyInstanceUID", study), ("seriesInstanceUID", series)):
            if not value:
                return DOCUMENT_UNIQUE_ID_ERROR, f"{name} is empty"
            if not is_uid(value):
                return DOCUMENT_UNIQUE_ID_ERROR, f"{name} is not a DICOM UID"
        if good is not None:
            good.update((study, series))
    if not doc.repository_unique_id:
        return UNKNOWN_REPOSITORY_ID, "RepositoryUniqueId is empty"
    return None


def screen_documents(
    documents: Sequence[DocumentRequest], transfer_syntax_uids: Sequence[str]
) -> RetrieveImagingDocumentSetRequest:
    """The request for ``documents``, with every DocumentRequest whose identifiers cannot name
    an instance set aside as rejected (sans-IO; both the SOAP endpoints and the in-process
    retrieve use it). TransferSyntaxUIDs that are not UIDs name no syntax and are dropped;
    with none left, nothing can be returned in a requested syntax and every DocumentRequest
    is rejected."""
    syntaxes = tuple(dict.fromkeys(uid for uid in transfer_syntax_uids if is_uid(uid)))
    accepted: list[DocumentRequest] = []
    rejected: list[RejectedDocument] = []
    good: set[str] = set()
    for doc in documents:
        problem = _problem(doc, good)
        if problem is None and not syntaxes:
            listed = ", ".join(repr(u[:80]) for u in transfer_syntax_uids)
            problem = (
                DOCUMENT_UNIQUE_ID_ERROR,
                f"no TransferSyntaxUID of the request is a UID ({listed}): the instance "
                "cannot be returned in a requested transfer syntax",
            )
        if problem is None:
            accepted.append(doc)
        else:
            rejected.append(RejectedDocument(doc, *problem))
    return RetrieveImagingDocumentSetRequest(tuple(accepted), syntaxes, tuple(rejected))


def parse_retrieve_imaging_request(
    payload: etree._Element, *, max_documents: int = 100_000
) -> RetrieveImagingDocumentSetRequest:
    """Read a RetrieveImagingDocumentSetRequest element. Schema breakage raises
    InvalidImagingRequest; bad identifier values become rejected DocumentRequests."""
    reader = RetrieveImagingRequestReader(max_documents=max_documents)
    walk_tree(payload, reader.take)
    result = reader.finish(payload)
    if isinstance(result, InvalidImagingRequest):
        raise result
    return result


class RetrieveImagingRequestReader:
    """Reads a RetrieveImagingDocumentSetRequest element by element, as
    :class:`~xca_gateway.protocol.xmlstream.PrunedXmlParser` hands them over (``take``; depth
    1 = a child of the payload), into compact :class:`DocumentRequest` records: each
    DocumentRequest, SeriesRequest and StudyRequest is consumed when complete, so a request
    of 20,000 instances never exists as a tree. Identifiers repeated across instances
    (study, series, repository, community) are kept once.

    :meth:`finish` returns the request, or the :class:`InvalidImagingRequest` that parsing
    would have raised, carrying (``requested``) every instance the request asked for, for its
    audit record.
    """

    # The only elements taken (for PrunedXmlParser's ``tags``), in either namespace.
    tags = tuple(
        f"{{{namespace}}}{name}"
        for namespace in _NAMESPACES
        for name in ("DocumentRequest", "SeriesRequest", "StudyRequest")
    )

    def __init__(self, *, max_documents: int = 100_000) -> None:
        self.max_documents = max_documents
        self.documents: list[DocumentRequest] = []
        # The SeriesRequest of the last DocumentRequest read and its (study, series) UIDs,
        # or the error they raise: read once per series, not per instance.
        self._series: etree._Element | None = None
        self._series_uids: tuple[str, str] | InvalidImagingRequest = ("", "")
        self.error: InvalidImagingRequest | None = None
        # After a schema error: what each DocumentRequest asked for, as its audit names it.
        self._asked: list[ImagingInstanceReference] | None = None
        self._shared: dict[str, str] = {}
        self._series_documents = 0
        self._study_series = 0
        self._studies = 0

    def _share(self, value: str) -> str:
        return self._shared.setdefault(value, value)

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = InvalidImagingRequest(reason)
            self._asked = [instance_reference(d) for d in self.documents]
            self.documents = []

    # Nothing deeper than a DocumentRequest is taken (its children are read with it).
    max_depth = 3

    def take(self, element: etree._Element, depth: int) -> bool:
        if depth > 3:
            return False
        name = _local(element)
        if depth == 3 and name == "DocumentRequest":
            series = element.getparent()
            if series is None:
                return False
            if series is not self._series:
                study = series.getparent()
                if study is None or _local(series) != "SeriesRequest":
                    return False
                if _local(study) != "StudyRequest":
                    return False
                self._series = series
                self._series_uids = self._uids(series, study)
            self._series_documents += 1
            self._document(element, series)
            return True
        if depth == 2 and name == "SeriesRequest":
            where = "SeriesRequest"
            try:
                series_uid = _attribute(element, "seriesInstanceUID", where)
                if not self._series_documents:
                    raise InvalidImagingRequest(
                        f"SeriesRequest {series_uid[:80]!r} has no DocumentRequest"
                    )
            except InvalidImagingRequest as exc:
                self._fail(exc.reason)
            self._series_documents = 0
            self._study_series += 1
            return True
        if depth == 1 and name == "StudyRequest":
            try:
                study_uid = _attribute(element, "studyInstanceUID", "StudyRequest")
                if not self._study_series:
                    raise InvalidImagingRequest(
                        f"StudyRequest {study_uid[:80]!r} has no SeriesRequest"
                    )
            except InvalidImagingRequest as exc:
                self._fail(exc.reason)
            self._study_series = 0
            self._studies += 1
            return True
        return False

    def _uids(
        self, series: etree._Element, study: etree._Element
    ) -> tuple[str, str] | InvalidImagingRequest:
        """(studyInstanceUID, seriesInstanceUID) of a series' DocumentRequests, or why not."""
        try:
            return (
                self._share(_attribute(study, "studyInstanceUID", "StudyRequest")),
                self._share(_attribute(series, "seriesInstanceUID", "SeriesRequest")),
            )
        except InvalidImagingRequest as exc:
            return exc

    def _document(self, element: etree._Element, series: etree._Element) -> None:
        if self._asked is not None:  # the request is refused: only its audit is left to feed
            if len(self._asked) <= self.max_documents:
                study = series.getparent()
                self._asked.append(
                    requested_instance(
                        (study.get("studyInstanceUID") or "").strip() if study is not None else "",
                        (series.get("seriesInstanceUID") or "").strip(),
                        element,
                    )
                )
            return
        share = self._share
        try:
            uids = self._series_uids
            if isinstance(uids, InvalidImagingRequest):
                raise InvalidImagingRequest(uids.reason)
            study_uid, series_uid = uids
            repository, document, home = _document_texts(element, series_uid)
            if len(self.documents) >= self.max_documents:
                raise InvalidImagingRequest(
                    f"more than {self.max_documents} DocumentRequests in one request"
                )
        except InvalidImagingRequest as exc:
            self._fail(exc.reason)
            self._document(element, series)
            return
        self.documents.append(
            DocumentRequest(
                study_uid, series_uid, share(repository), document, share(home) if home else None
            )
        )

    def finish(
        self, payload: etree._Element
    ) -> RetrieveImagingDocumentSetRequest | InvalidImagingRequest:
        """The request read from ``payload`` (what is left of it), or why it is refused."""
        try:
            if _local(payload) != "RetrieveImagingDocumentSetRequest":
                raise InvalidImagingRequest(
                    "expected RetrieveImagingDocumentSetRequest, got "
                    f"{etree.QName(payload).localname}"
                )
            if self.error is not None:
                raise self.error
            if not self._studies:
                raise InvalidImagingRequest("at least one StudyRequest is required")
            syntax_lists = _children(payload, "TransferSyntaxUIDList")
            if len(syntax_lists) != 1:
                raise InvalidImagingRequest("exactly one TransferSyntaxUIDList is required")
            syntaxes = [
                (e.text or "").strip() for e in _children(syntax_lists[0], "TransferSyntaxUID")
            ]
            if not syntaxes:
                raise InvalidImagingRequest(
                    "TransferSyntaxUIDList needs at least one TransferSyntaxUID"
                )
        except InvalidImagingRequest as exc:
            refused = exc if exc is self.error else InvalidImagingRequest(exc.reason)
            refused.requested = tuple(
                self._asked
                if self._asked is not None
                else [instance_reference(d) for d in self.documents]
            )
            return refused
        request = screen_documents(self.documents, syntaxes)
        self.documents = []
        return request


def instance_reference(doc: DocumentRequest) -> ImagingInstanceReference:
    """What a DocumentRequest asked for, as the audit record names it (as
    :func:`xca_gateway.audit.extract.requested_instances` reads it from the XML)."""
    problem = None
    if not doc.study_instance_uid:
        problem = "empty studyInstanceUID"
    if not doc.document_unique_id:
        empty = "DocumentRequest with an empty DocumentUniqueId"
        problem = f"{problem}; {empty}" if problem else empty
    return ImagingInstanceReference(
        study_instance_uid=doc.study_instance_uid,
        series_instance_uid=doc.series_instance_uid,
        sop_instance_uid=doc.document_unique_id,
        repository_unique_id=doc.repository_unique_id or None,
        home_community_id=doc.home_community_id or None,
        problem=problem,
    )


def requested_references(
    request: RetrieveImagingDocumentSetRequest,
) -> Iterator[ImagingInstanceReference]:
    """Every instance ``request`` asked for (rejected ones included), for its audit record."""
    for doc in request.requested:
        yield instance_reference(doc)


def check_retrieve_imaging_request(
    request: RetrieveImagingDocumentSetRequest, *, max_documents: int = 100_000
) -> RetrieveImagingDocumentSetRequest:
    """What :func:`parse_retrieve_imaging_request` does, for a request built in-process (from a
    KOS manifest, which may come from anywhere): InvalidImagingRequest for what the endpoint
    would fault (no DocumentRequest, too many, no TransferSyntaxUID); otherwise the request
    with the DocumentRequests that cannot name an instance set aside as rejected."""
    requested = request.requested
    if not requested:
        raise InvalidImagingRequest("at least one DocumentRequest is required")
    if len(requested) > max_documents:
        raise InvalidImagingRequest(f"more than {max_documents} DocumentRequests in one request")
    if not request.transfer_syntax_uids:
        raise InvalidImagingRequest("TransferSyntaxUIDList needs at least one TransferSyntaxUID")
    screened = screen_documents(request.documents, request.transfer_syntax_uids)
    if request.rejected:
        screened = dataclasses.replace(screened, rejected=request.rejected + screened.rejected)
    return screened


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


# Characters XML 1.0 cannot carry (lxml refuses them in a tree too).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# Bytes handed to the writer at a time.
WRITE_CHUNK = 64 * 1024


def retrieve_imaging_request_shell() -> etree._Element:
    """The RetrieveImagingDocumentSetRequest element without children, declaring the prefixes
    :func:`write_retrieve_imaging_request` writes them with."""
    return etree.Element(
        f"{{{XDSI}}}RetrieveImagingDocumentSetRequest", nsmap={"iherad": XDSI, "xdsb": XDSB}
    )


# What makes a value more than itself in XML text or a quoted attribute value: one search
# answers for the UIDs that fill a retrieve's messages (escape() is three replaces).
_SPECIAL = re.compile("[&<>\"'\t\n\r\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(value: str) -> str:
    """``value`` as XML character data (ValueError for characters XML cannot carry)."""
    if _SPECIAL.search(value) is None:
        return value
    if _NOT_XML.search(value):
        raise ValueError("All strings must be XML compatible")
    return escape(value)


def _xml_attribute(value: str) -> str:
    if _SPECIAL.search(value) is None:
        return f'"{value}"'
    if _NOT_XML.search(value):
        raise ValueError("All strings must be XML compatible")
    return quoteattr(value)


def write_retrieve_imaging_request(
    request: RetrieveImagingDocumentSetRequest,
) -> Iterator[bytes]:
    """The children of :func:`retrieve_imaging_request_shell` for ``request``, written
    straight to bytes: what :func:`build_retrieve_imaging_request` builds as a tree (the same
    grouping by study and series, order kept), without the tree."""
    studies: dict[str, dict[str, list[DocumentRequest]]] = {}
    for doc in request.documents:
        studies.setdefault(doc.study_instance_uid, {}).setdefault(
            doc.series_instance_uid, []
        ).append(doc)
    out: list[str] = []
    size = 0
    home: object = None
    repository: object = None
    head = ""
    for study_uid, series_map in studies.items():
        out.append(f"<iherad:StudyRequest studyInstanceUID={_xml_attribute(study_uid)}>")
        for series_uid, docs in series_map.items():
            out.append(f"<iherad:SeriesRequest seriesInstanceUID={_xml_attribute(series_uid)}>")
            for doc in docs:
                if doc.home_community_id is not home or doc.repository_unique_id is not repository:
                    # The same strings instance after instance: escaped when they change.
                    home, repository = doc.home_community_id, doc.repository_unique_id
                    head = "<iherad:DocumentRequest>" + (
                        f"<xdsb:HomeCommunityId>{xml_text(doc.home_community_id)}"
                        "</xdsb:HomeCommunityId>"
                        if doc.home_community_id
                        else ""
                    )
                    head += f"<xdsb:RepositoryUniqueId>{xml_text(doc.repository_unique_id)}"
                    head += "</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>"
                out.append(
                    f"{head}{xml_text(doc.document_unique_id)}</xdsb:DocumentUniqueId>"
                    "</iherad:DocumentRequest>"
                )
                size += 200
                if size >= WRITE_CHUNK:
                    yield "".join(out).encode("utf-8")
                    out.clear()
                    size = 0
            out.append("</iherad:SeriesRequest>")
        out.append("</iherad:StudyRequest>")
    out.append("<iherad:TransferSyntaxUIDList>")
    for uid in request.transfer_syntax_uids:
        out.append(f"<iherad:TransferSyntaxUID>{xml_text(uid)}</iherad:TransferSyntaxUID>")
    out.append("</iherad:TransferSyntaxUIDList>")
    yield "".join(out).encode("utf-8")


def group_in_order(
    documents: Sequence[DocumentRequest], key: str
) -> dict[str, list[DocumentRequest]]:
    """Group documents by an attribute (e.g. repository_unique_id), keeping first-seen order."""
    groups: dict[str, list[DocumentRequest]] = {}
    for doc in documents:
        groups.setdefault(str(getattr(doc, key) or ""), []).append(doc)
    return groups
