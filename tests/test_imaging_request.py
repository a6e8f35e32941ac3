"""RAD-69 request/response models (sans-IO): parsing leniency, building, validation."""

from __future__ import annotations

import pytest
from lxml import etree

from xca_gateway.imaging.remote import plan_from_response
from xca_gateway.imaging.request import (
    DocumentRequest,
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
    build_retrieve_imaging_request,
    check_retrieve_imaging_request,
    parse_retrieve_imaging_request,
)
from xca_gateway.imaging.response import (
    DocumentResponse,
    InvalidImagingResponse,
    build_retrieve_response,
    parse_retrieve_response,
)
from xca_gateway.protocol.namespaces import XDSB, XDSI, ResponseStatus
from xca_gateway.protocol.wsdl import wsdl_path
from xca_gateway.xds.ebrs import RegistryError

DOCS = (
    DocumentRequest("1.2.3", "1.2.3.1", "1.9.1", "1.2.3.1.1", "urn:oid:1.9"),
    DocumentRequest("1.2.3", "1.2.3.1", "1.9.1", "1.2.3.1.2", None),
    DocumentRequest("1.2.3", "1.2.3.2", "1.9.2", "1.2.3.2.1", "urn:oid:1.8"),
    DocumentRequest("1.2.4", "1.2.4.1", "1.9.1", "1.2.4.1.1", None),
)


def test_build_is_schema_shaped_and_round_trips() -> None:
    request = RetrieveImagingDocumentSetRequest(DOCS, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"))
    element = build_retrieve_imaging_request(request)
    assert element.tag == f"{{{XDSI}}}RetrieveImagingDocumentSetRequest"
    studies = element.findall(f"{{{XDSI}}}StudyRequest")
    assert [s.get("studyInstanceUID") for s in studies] == ["1.2.3", "1.2.4"]
    series = studies[0].findall(f"{{{XDSI}}}SeriesRequest")
    assert [s.get("seriesInstanceUID") for s in series] == ["1.2.3.1", "1.2.3.2"]
    first = series[0].find(f"{{{XDSI}}}DocumentRequest")
    assert first is not None
    # DocumentRequest in xdsi-b, its children in xds-b (IHEXDSIB.xsd + IHEXDSB.xsd).
    assert [c.tag for c in first] == [
        f"{{{XDSB}}}HomeCommunityId",
        f"{{{XDSB}}}RepositoryUniqueId",
        f"{{{XDSB}}}DocumentUniqueId",
    ]
    assert element[-1].tag == f"{{{XDSI}}}TransferSyntaxUIDList"
    assert parse_retrieve_imaging_request(element) == request


def test_built_request_reads_back_through_the_wsdl_schema() -> None:
    import zeep

    client = zeep.Client(str(wsdl_path("rad69")))
    request = RetrieveImagingDocumentSetRequest(DOCS, ("1.2.840.10008.1.2.1",))
    element = client.get_element(f"{{{XDSI}}}RetrieveImagingDocumentSetRequest")
    # zeep binds children by the schema's qualified names: wrong namespaces would be lost.
    value = element.parse(build_retrieve_imaging_request(request), client.wsdl.types)
    first = value.StudyRequest[0].SeriesRequest[0].DocumentRequest[0]
    assert (first.HomeCommunityId, first.RepositoryUniqueId, first.DocumentUniqueId) == (
        "urn:oid:1.9",
        "1.9.1",
        "1.2.3.1.1",
    )
    assert [s.studyInstanceUID for s in value.StudyRequest] == ["1.2.3", "1.2.4"]
    assert value.TransferSyntaxUIDList.TransferSyntaxUID == ["1.2.840.10008.1.2.1"]


def test_parse_is_lenient_about_namespaces_and_whitespace() -> None:
    # NIST toolkit style: DocumentRequest in xds-b, values wrapped in line breaks.
    xml = f"""<x:RetrieveImagingDocumentSetRequest xmlns:x="{XDSI}" xmlns:b="{XDSB}">
      <x:StudyRequest studyInstanceUID=" 1.2.3 ">
        <x:SeriesRequest seriesInstanceUID="1.2.3.1">
          <!-- a comment -->
          <b:DocumentRequest>
            <b:HomeCommunityId>urn:oid:1.9
            </b:HomeCommunityId>
            <b:RepositoryUniqueId>1.9.1
            </b:RepositoryUniqueId>
            <x:DocumentUniqueId>1.2.3.1.1</x:DocumentUniqueId>
          </b:DocumentRequest>
        </x:SeriesRequest>
      </x:StudyRequest>
      <x:TransferSyntaxUIDList>
        <x:TransferSyntaxUID>1.2.840.10008.1.2.1
        </x:TransferSyntaxUID>
        <x:TransferSyntaxUID>1.2.840.10008.1.2.1</x:TransferSyntaxUID>
      </x:TransferSyntaxUIDList>
    </x:RetrieveImagingDocumentSetRequest>"""
    parsed = parse_retrieve_imaging_request(etree.fromstring(xml))
    assert parsed.documents == (DOCS[0],)
    assert parsed.transfer_syntax_uids == ("1.2.840.10008.1.2.1",)  # duplicates dropped


@pytest.mark.parametrize(
    ("fragment", "reason"),
    [
        ("", "StudyRequest"),
        ("<x:StudyRequest studyInstanceUID='1.2'/>", "no SeriesRequest"),
        (
            "<x:StudyRequest studyInstanceUID='1.2'><x:SeriesRequest seriesInstanceUID='1.2.3'/>"
            "</x:StudyRequest>",
            "no DocumentRequest",
        ),
        (
            "<x:StudyRequest studyInstanceUID='1.2'><x:SeriesRequest seriesInstanceUID='1.2.3'>"
            "<x:DocumentRequest><b:DocumentUniqueId>1.2.3.4</b:DocumentUniqueId>"
            "</x:DocumentRequest></x:SeriesRequest></x:StudyRequest>",
            "RepositoryUniqueId is missing",
        ),
        (
            "<x:StudyRequest><x:SeriesRequest seriesInstanceUID='1.2.3'>"
            "<x:DocumentRequest><b:RepositoryUniqueId>1.2</b:RepositoryUniqueId>"
            "<b:DocumentUniqueId>1.2.3.4</b:DocumentUniqueId>"
            "</x:DocumentRequest></x:SeriesRequest></x:StudyRequest>",
            "attribute studyInstanceUID is missing",
        ),
        (
            "<x:StudyRequest studyInstanceUID='1.2'><x:SeriesRequest seriesInstanceUID='1.2.3'>"
            "<x:DocumentRequest><b:RepositoryUniqueId>1.2</b:RepositoryUniqueId>"
            "</x:DocumentRequest></x:SeriesRequest></x:StudyRequest>",
            "DocumentUniqueId is missing",
        ),
        (
            "<x:StudyRequest studyInstanceUID='1.2'><x:SeriesRequest seriesInstanceUID='1.2.3'>"
            "<x:DocumentRequest><b:RepositoryUniqueId>1.2</b:RepositoryUniqueId>"
            "<b:DocumentUniqueId>1.2.3.4</b:DocumentUniqueId><b:DocumentUniqueId>1.2.3.5"
            "</b:DocumentUniqueId></x:DocumentRequest></x:SeriesRequest></x:StudyRequest>",
            "more than one DocumentUniqueId",
        ),
    ],
)
def test_invalid_requests(fragment: str, reason: str) -> None:
    syntaxes = "<x:TransferSyntaxUIDList><x:TransferSyntaxUID>1.2</x:TransferSyntaxUID>"
    syntaxes += "</x:TransferSyntaxUIDList>"
    xml = (
        f"<x:RetrieveImagingDocumentSetRequest xmlns:x='{XDSI}' xmlns:b='{XDSB}'>"
        f"{fragment}{syntaxes}</x:RetrieveImagingDocumentSetRequest>"
    )
    with pytest.raises(InvalidImagingRequest, match=reason):
        parse_retrieve_imaging_request(etree.fromstring(xml))


def _request(
    study: str, docs: str, syntaxes: str = "<x:TransferSyntaxUID>1.2</x:TransferSyntaxUID>"
) -> etree._Element:
    return etree.fromstring(
        f"<x:RetrieveImagingDocumentSetRequest xmlns:x='{XDSI}' xmlns:b='{XDSB}'>"
        f"<x:StudyRequest studyInstanceUID='{study}'><x:SeriesRequest seriesInstanceUID='1.2.3'>"
        f"{docs}</x:SeriesRequest></x:StudyRequest>"
        f"<x:TransferSyntaxUIDList>{syntaxes}</x:TransferSyntaxUIDList>"
        "</x:RetrieveImagingDocumentSetRequest>"
    )


def _doc(uid: str, repository: str = "1.9") -> str:
    return (
        f"<x:DocumentRequest><b:RepositoryUniqueId>{repository}</b:RepositoryUniqueId>"
        f"<b:DocumentUniqueId>{uid}</b:DocumentUniqueId></x:DocumentRequest>"
    )


def test_bad_identifiers_are_set_aside_per_document_not_refused() -> None:
    real = "1.2.826.0.1.3680043.10.543.1.1.20240501.123456.1.1.12345678901"
    assert len(real) <= 64 < len(real + ".999")
    parsed = parse_retrieve_imaging_request(
        _request(
            "1.2",
            _doc("1.2.3.4")
            + _doc(real + ".999")
            + _doc("")
            + _doc("../../etc/passwd")
            + _doc("1.2.3.5", repository=""),
        )
    )
    assert [d.document_unique_id for d in parsed.documents] == ["1.2.3.4"]
    assert [(r.document.document_unique_id, r.error_code) for r in parsed.rejected] == [
        (real + ".999", "XDSDocumentUniqueIdError"),
        ("", "XDSDocumentUniqueIdError"),
        ("../../etc/passwd", "XDSDocumentUniqueIdError"),
        ("1.2.3.5", "XDSUnknownRepositoryId"),
    ]
    assert "at most 64 characters; this one has 66" in parsed.rejected[0].code_context
    assert "DocumentUniqueId is empty" in parsed.rejected[1].code_context
    assert [d.document_unique_id for d in parsed.requested] == [
        "1.2.3.4",
        real + ".999",
        "",
        "../../etc/passwd",
        "1.2.3.5",
    ]

    # An empty studyInstanceUID: every instance under it is rejected.
    empty_study = parse_retrieve_imaging_request(_request("", _doc("1.2.3.4") + _doc("1.2.3.5")))
    assert empty_study.documents == ()
    assert {r.reason for r in empty_study.rejected} == {"studyInstanceUID is empty"}

    # Empty TransferSyntaxUIDs name no syntax: dropped; with none left nothing can come back.
    some = parse_retrieve_imaging_request(
        _request(
            "1.2",
            _doc("1.2.3.4"),
            "<x:TransferSyntaxUID/><x:TransferSyntaxUID>1.2.840.10008.1.2.1</x:TransferSyntaxUID>",
        )
    )
    assert some.transfer_syntax_uids == ("1.2.840.10008.1.2.1",) and some.rejected == ()
    none = parse_retrieve_imaging_request(
        _request("1.2", _doc("1.2.3.4"), "<x:TransferSyntaxUID> </x:TransferSyntaxUID>")
    )
    assert none.documents == () and none.transfer_syntax_uids == ()
    (rejected,) = none.rejected
    assert rejected.error_code == "XDSDocumentUniqueIdError"
    assert "TransferSyntaxUID" in rejected.reason


def test_in_process_requests_are_screened_the_same_way() -> None:
    bad = DocumentRequest("1.2.3", "1.2.3.1", "1.9.1", "1.2.x")
    screened = check_retrieve_imaging_request(
        RetrieveImagingDocumentSetRequest((DOCS[0], bad), ("1.2.840.10008.1.2.1",))
    )
    assert screened.documents == (DOCS[0],)
    assert [r.document for r in screened.rejected] == [bad]
    for structural in (
        RetrieveImagingDocumentSetRequest((), ("1.2.840.10008.1.2.1",)),
        RetrieveImagingDocumentSetRequest(DOCS, ()),
    ):
        with pytest.raises(InvalidImagingRequest):
            check_retrieve_imaging_request(structural)
    with pytest.raises(InvalidImagingRequest, match="more than 2"):
        check_retrieve_imaging_request(
            RetrieveImagingDocumentSetRequest(DOCS, ("1.2",)), max_documents=2
        )


def test_missing_or_empty_transfer_syntax_list() -> None:
    docs = build_retrieve_imaging_request(RetrieveImagingDocumentSetRequest(DOCS[:1], ("1.2",)))
    docs.remove(docs[-1])
    with pytest.raises(InvalidImagingRequest, match="TransferSyntaxUIDList"):
        parse_retrieve_imaging_request(docs)
    etree.SubElement(docs, f"{{{XDSI}}}TransferSyntaxUIDList")
    with pytest.raises(InvalidImagingRequest, match="at least one TransferSyntaxUID"):
        parse_retrieve_imaging_request(docs)


def test_document_count_is_bounded() -> None:
    many = tuple(DocumentRequest("1.2", "1.2.3", "1.9", f"1.2.3.{i}") for i in range(1, 12))
    element = build_retrieve_imaging_request(RetrieveImagingDocumentSetRequest(many, ("1.2",)))
    with pytest.raises(InvalidImagingRequest, match="more than 10"):
        parse_retrieve_imaging_request(element, max_documents=10)


def test_response_round_trip_and_plan() -> None:
    docs = [
        DocumentResponse("urn:oid:1.9", "1.9.1", "1.2.3.1.1", "application/dicom", "a@x"),
        DocumentResponse(None, "1.9.1", "1.2.3.1.2", "application/dicom", "b@x"),
    ]
    errors = [RegistryError("XDSDocumentUniqueIdError", "gone", "urn:oid:1.9")]
    element = build_retrieve_response(ResponseStatus.PARTIAL_SUCCESS, errors, docs)
    parsed = parse_retrieve_response(element)
    assert parsed.status == ResponseStatus.PARTIAL_SUCCESS
    assert parsed.errors == tuple(errors)
    assert parsed.documents == tuple(docs)
    # Only requested instances from the right repository are planned, each once.
    extra = DocumentResponse(None, "1.9.1", "9.9.9", "application/dicom", "c@x")
    wrong_repo = DocumentResponse(None, "1.9.7", "1.2.3.1.2", "application/dicom", "d@x")
    from dataclasses import replace

    mixed = replace(parsed, documents=(*parsed.documents, extra, wrong_repo, docs[0]))
    planned = plan_from_response(mixed, DOCS)
    assert [(p.document.document_unique_id, p.handle) for p in planned] == [
        ("1.2.3.1.1", "a@x"),
        ("1.2.3.1.2", "b@x"),
    ]
    assert planned[0].home_community_id == "urn:oid:1.9"


def test_inline_base64_document_and_bad_responses() -> None:
    element = build_retrieve_response(ResponseStatus.SUCCESS, [], [])
    response = etree.SubElement(element, f"{{{XDSB}}}DocumentResponse")
    etree.SubElement(response, f"{{{XDSB}}}RepositoryUniqueId").text = "1.9.1"
    etree.SubElement(response, f"{{{XDSB}}}DocumentUniqueId").text = "1.2.3.1.1"
    etree.SubElement(response, f"{{{XDSB}}}Document").text = "RElDTQ=="
    assert parse_retrieve_response(element).documents[0].inline == b"DICM"
    response.find(f"{{{XDSB}}}Document").text = "not base64!"  # type: ignore[union-attr]
    with pytest.raises(InvalidImagingResponse, match="base64"):
        parse_retrieve_response(element)
    with pytest.raises(InvalidImagingResponse):
        parse_retrieve_response(etree.Element(f"{{{XDSB}}}Something"))
