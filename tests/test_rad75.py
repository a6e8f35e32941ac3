"""RAD-75 at the Responding Imaging Gateway, over real mTLS, from a filesystem source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import zeep
from lxml import etree

from tests.test_imaging_support import (
    EXPLICIT,
    IMPLICIT,
    JPEG_BASELINE,
    JPEG_LOSSLESS,
    RLE,
    Retrieved,
    documents_for,
    error_codes,
    install,
    make_study,
    pixel_data,
    post_retrieve,
    read_retrieve_reply,
)
from tests.test_server import consumer, fault_of, soap12
from xca_gateway.app.gateway import Gateway
from xca_gateway.imaging.filesystem import FilesystemSource
from xca_gateway.imaging.request import DocumentRequest, parse_retrieve_imaging_request
from xca_gateway.imaging.transfer_syntax import sniff_transfer_syntax
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.wsdl import wsdl_path
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.transactions.rad75 import rad75_handler

REPO = "1.3.6.1.4.1.21367.13.71.2.1"


@pytest.fixture
def rig(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> tuple[Gateway, Path]:
    gateway = gateway_factory("beta")
    images = tmp_path / "beta-images"
    source = FilesystemSource(REPO, images)
    install(
        gateway,
        "rad75",
        Action.RAD75,
        "RAD-75",
        rad75_handler({REPO: source}, home_community_id=gateway.config.community.home_community_id),
    )
    return gateway, images


def test_study_is_returned_byte_identical_with_home_community(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    study = make_study(images, series=2, instances=2)
    home = gateway.config.community.home_community_id
    docs = documents_for(study, REPO, home)
    got = post_retrieve(pki, gateway.endpoint_urls()["rad75"], Action.RAD75, docs)
    assert got.response.status == ResponseStatus.SUCCESS
    assert got.response.errors == ()
    assert [d.document_unique_id for d in got.response.documents] == [
        d.document_unique_id for d in docs
    ]
    for path in study.files:
        assert got.documents[path.stem] == path.read_bytes()
        assert got.content_types[path.stem] == "application/dicom"
    assert {d.home_community_id for d in got.response.documents} == {home}
    assert {d.repository_unique_id for d in got.response.documents} == {REPO}


def test_missing_instances_give_partial_success_with_errors_located_at_the_community(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    study = make_study(images, instances=2)
    home = gateway.config.community.home_community_id
    docs = documents_for(study, REPO, home)
    missing = DocumentRequest(
        docs[0].study_instance_uid, docs[0].series_instance_uid, REPO, "1.2.3.4.5.6.7", home
    )
    unknown_repo = DocumentRequest(
        docs[0].study_instance_uid, docs[0].series_instance_uid, "1.2.3.999", "1.2.3.4.5.6.8", home
    )
    other_community = DocumentRequest(
        docs[0].study_instance_uid,
        docs[0].series_instance_uid,
        REPO,
        "1.2.3.4.5.6.9",
        "urn:oid:1.2.3.4.5.6",
    )
    got = post_retrieve(
        pki,
        gateway.endpoint_urls()["rad75"],
        Action.RAD75,
        [*docs, missing, unknown_repo, other_community],
    )
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert sorted(error_codes(got)) == [
        "XDSDocumentUniqueIdError",
        "XDSUnknownCommunity",
        "XDSUnknownRepositoryId",
    ]
    # RAD75-004 / ITI39-012: location = the Responding Gateway's homeCommunityId.
    assert {e.location for e in got.response.errors} == {home}
    by_code = {e.error_code: e.code_context for e in got.response.errors}
    assert "1.2.3.4.5.6.7" in by_code["XDSDocumentUniqueIdError"]
    assert "1.2.3.999" in by_code["XDSUnknownRepositoryId"]
    assert set(got.documents) == {d.document_unique_id for d in docs}


def test_instance_outside_the_requested_study_is_not_returned(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    first = make_study(images, instances=1, seed=1)
    second = make_study(images, instances=1, seed=2)
    doc = documents_for(first, REPO)[0]
    wrong_study = DocumentRequest(
        second.study_instance_uid,
        second.series_instance_uids[0],
        REPO,
        doc.document_unique_id,
    )
    got = post_retrieve(pki, gateway.endpoint_urls()["rad75"], Action.RAD75, [wrong_study])
    assert got.response.status == ResponseStatus.FAILURE
    assert error_codes(got) == ["XDSDocumentUniqueIdError"]
    assert got.documents == {}


def test_transfer_syntax_conversion_is_lossless_and_keeps_identity(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    study = make_study(images, instances=2)
    docs = documents_for(study, REPO)
    url = gateway.endpoint_urls()["rad75"]
    for wanted in ([RLE], [IMPLICIT], [JPEG_LOSSLESS, RLE]):
        got = post_retrieve(pki, url, Action.RAD75, docs, wanted)
        assert got.response.status == ResponseStatus.SUCCESS, wanted
        for path in study.files:
            data = got.documents[path.stem]
            assert sniff_transfer_syntax(data) in wanted
            assert sniff_transfer_syntax(data) != JPEG_LOSSLESS  # cannot encode: not chosen
            assert pixel_data(data) == pixel_data(path.read_bytes())
            import io

            import pydicom

            received = pydicom.dcmread(io.BytesIO(data))
            assert received.SOPInstanceUID == path.stem
            assert received.PatientName == pydicom.dcmread(path).PatientName


def test_unavailable_transfer_syntax_is_an_error_never_another_syntax(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    study = make_study(images, instances=1)
    docs = documents_for(study, REPO)
    # Only lossy JPEG Baseline: the gateway does not encode it (and never lossy on its own).
    got = post_retrieve(pki, gateway.endpoint_urls()["rad75"], Action.RAD75, docs, [JPEG_BASELINE])
    assert got.response.status == ResponseStatus.FAILURE
    assert error_codes(got) == ["XDSRepositoryError"]
    assert "requested transfer syntaxes" in got.response.errors[0].code_context
    assert got.documents == {}


XDSI_NS = "xmlns:iherad='urn:ihe:rad:xdsi-b:2009' xmlns:xdsb='urn:ihe:iti:xds-b:2007'"
ONE_DOCUMENT = (
    "<iherad:DocumentRequest><xdsb:RepositoryUniqueId>1.2</xdsb:RepositoryUniqueId>"
    "<xdsb:DocumentUniqueId>1.2.3.4</xdsb:DocumentUniqueId></iherad:DocumentRequest>"
)
SYNTAXES = (
    "<iherad:TransferSyntaxUIDList><iherad:TransferSyntaxUID>1.2.840.10008.1.2.1"
    "</iherad:TransferSyntaxUID></iherad:TransferSyntaxUIDList>"
)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            "<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad='urn:ihe:rad:xdsi-b:2009'/>",
            "StudyRequest",
        ),
        (
            f"<iherad:RetrieveImagingDocumentSetRequest {XDSI_NS}>"
            "<iherad:StudyRequest studyInstanceUID='1.2'>"
            f"<iherad:SeriesRequest seriesInstanceUID='1.2.3'>{ONE_DOCUMENT}"
            "</iherad:SeriesRequest></iherad:StudyRequest></iherad:RetrieveImagingDocumentSetRequest>",
            "TransferSyntaxUIDList",
        ),
        (
            f"<iherad:RetrieveImagingDocumentSetRequest {XDSI_NS}>"
            "<iherad:StudyRequest studyInstanceUID='../etc'>"
            "</iherad:StudyRequest></iherad:RetrieveImagingDocumentSetRequest>",
            "has no SeriesRequest",
        ),
        (
            f"<iherad:RetrieveImagingDocumentSetRequest {XDSI_NS}><iherad:StudyRequest>"
            f"<iherad:SeriesRequest seriesInstanceUID='1.2.3'>{ONE_DOCUMENT}"
            f"</iherad:SeriesRequest></iherad:StudyRequest>{SYNTAXES}"
            "</iherad:RetrieveImagingDocumentSetRequest>",
            "attribute studyInstanceUID is missing",
        ),
        (
            f"<iherad:RetrieveImagingDocumentSetRequest {XDSI_NS}>"
            "<iherad:StudyRequest studyInstanceUID='1.2'>"
            "<iherad:SeriesRequest seriesInstanceUID='1.2.3'><iherad:DocumentRequest>"
            "<xdsb:RepositoryUniqueId>1.2</xdsb:RepositoryUniqueId></iherad:DocumentRequest>"
            f"</iherad:SeriesRequest></iherad:StudyRequest>{SYNTAXES}"
            "</iherad:RetrieveImagingDocumentSetRequest>",
            "DocumentUniqueId is missing",
        ),
        (
            f"<iherad:RetrieveImagingDocumentSetRequest {XDSI_NS}>"
            "<iherad:StudyRequest studyInstanceUID='1.2'>"
            f"<iherad:SeriesRequest seriesInstanceUID='1.2.3'>{ONE_DOCUMENT}"
            "</iherad:SeriesRequest></iherad:StudyRequest><iherad:TransferSyntaxUIDList/>"
            "</iherad:RetrieveImagingDocumentSetRequest>",
            "at least one TransferSyntaxUID",
        ),
    ],
)
def test_schema_breakage_gets_a_sender_fault(
    rig: tuple[Gateway, Path], pki: DevPki, body: str, reason: str
) -> None:
    gateway, _ = rig
    with consumer(pki) as client:
        response = client.post(
            gateway.endpoint_urls()["rad75"],
            content=soap12(Action.RAD75, body),
            headers={"content-type": "application/soap+xml; charset=UTF-8"},
        )
    assert response.status_code == 400
    code, _subcodes, text = fault_of(response)
    assert code.endswith("Sender")
    assert reason in text


def zeep_retrieve(
    pki: DevPki,
    url: str,
    *,
    wsdl: str,
    binding: str,
    action: str,
    studies: list[dict[str, Any]],
    syntaxes: list[str],
) -> tuple[Retrieved, Any]:
    """A RetrieveImagingDocumentSetRequest serialised by zeep from the IHE WSDL, posted over
    mTLS; the answer as the tests read it and as zeep reads it (schema-bound)."""
    client = zeep.Client(str(wsdl_path(wsdl)))
    service = client.create_service(binding, url)
    operation = next(iter(service._binding._operations))
    envelope = client.create_message(
        service,
        operation,
        StudyRequest=studies,
        TransferSyntaxUIDList={"TransferSyntaxUID": syntaxes},
    )
    payload = envelope.find(".//{urn:ihe:rad:xdsi-b:2009}RetrieveImagingDocumentSetRequest")
    assert payload is not None
    with consumer(pki) as http:
        response = http.post(
            url,
            content=soap12(action, etree.tostring(payload, encoding="unicode")),
            headers={"content-type": "application/soap+xml; charset=UTF-8"},
        )
    assert response.status_code == 200, response.text[:1000]
    got = read_retrieve_reply(200, response.headers["content-type"], response.content)
    # zeep binds the root part by the response schema: a RetrieveDocumentSetResponse.
    element = client.get_element("{urn:ihe:iti:xds-b:2007}RetrieveDocumentSetResponse")
    return got, element.parse(got.payload, client.wsdl.types)


def _study(uid: str, series: str, documents: list[tuple[str | None, str, str]]) -> dict[str, Any]:
    return {
        "studyInstanceUID": uid,
        "SeriesRequest": [
            {
                "seriesInstanceUID": series,
                "DocumentRequest": [
                    {"HomeCommunityId": h, "RepositoryUniqueId": r, "DocumentUniqueId": d}
                    for h, r, d in documents
                ],
            }
        ],
    }


RAD75_BINDING = "{urn:ihe:rad:xdsi-b:2009}RespondingGateway_Binding_Soap12"


def test_bad_identifiers_get_a_retrieve_response_never_a_fault(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    study = make_study(images, instances=2)
    home = gateway.config.community.home_community_id
    url = gateway.endpoint_urls()["rad75"]
    series = study.series_instance_uids[0]
    good = [(home, REPO, p.stem) for p in study.files]
    # A real SOP Instance UID with ".999" appended, made longer than 64 characters.
    too_long = (study.files[0].stem + ".999" * 20)[:70]
    assert len(too_long) > 64
    call = {"wsdl": "rad75", "binding": RAD75_BINDING, "action": Action.RAD75}

    # Nothing can be returned: Failure, one XDSDocumentUniqueIdError per DocumentRequest.
    for studies, syntaxes, why in (
        ([_study(study.study_instance_uid, series, [(home, REPO, too_long)])], [EXPLICIT], "64"),
        ([_study("", series, good)], [EXPLICIT], "studyInstanceUID is empty"),
        ([_study(study.study_instance_uid, series, good)], [""], "TransferSyntaxUID"),
    ):
        got, bound = zeep_retrieve(pki, url, studies=studies, syntaxes=syntaxes, **call)
        assert got.response.status == ResponseStatus.FAILURE, why
        assert got.documents == {}
        requested = sum(len(s["SeriesRequest"][0]["DocumentRequest"]) for s in studies)
        assert error_codes(got) == ["XDSDocumentUniqueIdError"] * requested, why
        assert {e.location for e in got.response.errors} == {home}  # RAD75-004
        assert all(why in e.code_context for e in got.response.errors), got.response.errors
        assert bound.RegistryResponse.status == ResponseStatus.FAILURE

    # Some can: PartialSuccess with the good instances, byte for byte.
    mixed = [
        _study(study.study_instance_uid, series, [*good, (home, REPO, too_long)]),
        _study("", series, good[:1]),
    ]
    got, bound = zeep_retrieve(pki, url, studies=mixed, syntaxes=["", EXPLICIT], **call)
    assert got.response.status == ResponseStatus.PARTIAL_SUCCESS
    assert got.documents == {p.stem: p.read_bytes() for p in study.files}
    assert error_codes(got) == ["XDSDocumentUniqueIdError"] * 2
    assert {e.location for e in got.response.errors} == {home}
    assert [d.DocumentUniqueId for d in bound.DocumentResponse] == [p.stem for p in study.files]


def test_request_built_by_zeep_from_the_rad75_wsdl_is_understood(
    rig: tuple[Gateway, Path], pki: DevPki
) -> None:
    gateway, images = rig
    study = make_study(images, instances=2)
    home = gateway.config.community.home_community_id
    client = zeep.Client(str(wsdl_path("rad75")))
    service = client.create_service(
        "{urn:ihe:rad:xdsi-b:2009}RespondingGateway_Binding_Soap12",
        gateway.endpoint_urls()["rad75"],
    )
    study_request = {
        "studyInstanceUID": study.study_instance_uid,
        "SeriesRequest": [
            {
                "seriesInstanceUID": study.series_instance_uids[0],
                "DocumentRequest": [
                    {
                        "HomeCommunityId": home,
                        "RepositoryUniqueId": REPO,
                        "DocumentUniqueId": path.stem,
                    }
                    for path in study.files
                ],
            }
        ],
    }
    operation = next(iter(service._binding._operations))
    envelope = client.create_message(
        service,
        operation,
        StudyRequest=[study_request],
        TransferSyntaxUIDList={"TransferSyntaxUID": [EXPLICIT]},
    )
    payload = envelope.find(".//{urn:ihe:rad:xdsi-b:2009}RetrieveImagingDocumentSetRequest")
    parsed = parse_retrieve_imaging_request(payload)  # what the gateway will read
    assert [d.document_unique_id for d in parsed.documents] == [p.stem for p in study.files]
    # And over the wire, with zeep's own serialisation of the payload.
    body = etree.tostring(payload, encoding="unicode")
    with consumer(pki) as http:
        response = http.post(
            gateway.endpoint_urls()["rad75"],
            content=soap12(Action.RAD75, body),
            headers={"content-type": "application/soap+xml; charset=UTF-8"},
        )
    assert response.status_code == 200
    assert isinstance(response, httpx.Response)

    got = read_retrieve_reply(200, response.headers["content-type"], response.content)
    assert got.response.status == ResponseStatus.SUCCESS
    assert got.documents == {p.stem: p.read_bytes() for p in study.files}
