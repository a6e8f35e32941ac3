"""Consent enforcement on query results and retrieve requests (pure functions)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from xca_gateway.imaging.request import DocumentRequest as ImagingDocumentRequest
from xca_gateway.protocol.namespaces import RIM, ResponseStatus
from xca_gateway.security.consent.enforcement import (
    XDS_DOCUMENT_UNIQUE_ID_ERROR,
    document_facts,
    filter_document_requests,
    filter_imaging_requests,
    filter_query_objects,
    study_index,
)
from xca_gateway.security.consent.service import (
    ConsentConfig,
    ConsentService,
    ConsentStore,
    DocumentClassification,
    DocumentCode,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import (
    LOCAL_POLICY_RESTRICTION_ERROR,
    adhoc_query_response,
    retrieve_document_set_response,
)

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
PEER = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
PATIENT = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
OTHER_PATIENT = "P2^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
LOINC = "2.16.840.1.113883.6.1"
CONFIDENTIALITY = "2.16.840.1.113883.5.25"
SCHEMA_DIR = Path(__file__).parent.parent / "xca_gateway" / "wsdl" / "schema"


def _slot(parent: etree._Element, name: str, *values: str) -> None:
    slot = etree.SubElement(parent, f"{{{RIM}}}Slot", name=name)
    value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
    for value in values:
        etree.SubElement(value_list, f"{{{RIM}}}Value").text = value


def _coded(parent: etree._Element, scheme: str, code: str, coding_scheme: str) -> None:
    c = etree.SubElement(
        parent,
        f"{{{RIM}}}Classification",
        id=f"urn:uuid:{uuid.uuid4()}",
        classificationScheme=scheme,
        classifiedObject=parent.get("id", ""),
        nodeRepresentation=code,
    )
    _slot(c, ebrim.SLOT_CODING_SCHEME, coding_scheme)


def _external_id(parent: etree._Element, scheme: str, value: str) -> None:
    etree.SubElement(
        parent,
        f"{{{RIM}}}ExternalIdentifier",
        id=f"urn:uuid:{uuid.uuid4()}",
        identificationScheme=scheme,
        registryObject=parent.get("id", ""),
        value=value,
    )


def document_entry(
    class_code: str,
    confidentiality: Sequence[str] = ("N",),
    *,
    patient: str | None = PATIENT,
    unique_id: str | None = None,
    study_uid: str | None = None,
) -> etree._Element:
    entry_id = f"urn:uuid:{uuid.uuid4()}"
    eo = etree.Element(
        f"{{{RIM}}}ExtrinsicObject",
        nsmap={"rim": RIM},
        id=entry_id,
        mimeType="application/dicom",
        objectType=ebrim.DOCUMENT_ENTRY_STABLE,
        status=ebrim.STATUS_APPROVED,
        home=HOME,
    )
    _slot(eo, ebrim.SLOT_REPOSITORY_UNIQUE_ID, "1.3.6.1.4.1.21367.13.80.1")
    if study_uid:
        _slot(
            eo,
            ebrim.SLOT_REFERENCE_ID_LIST,
            f"{study_uid}^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}",
        )
    _coded(eo, ebrim.DE_CLASS_CODE, class_code, LOINC)
    for code in confidentiality:
        _coded(eo, ebrim.DE_CONFIDENTIALITY_CODE, code, CONFIDENTIALITY)
    if patient:
        _external_id(eo, ebrim.DE_PATIENT_ID, patient)
    _external_id(eo, ebrim.DE_UNIQUE_ID, unique_id or f"1.2.3.{uuid.uuid4().int % 10**12}")
    return eo


def submission_set(patient: str = PATIENT) -> etree._Element:
    ss = etree.Element(
        f"{{{RIM}}}RegistryPackage",
        nsmap={"rim": RIM},
        id=f"urn:uuid:{uuid.uuid4()}",
        objectType=ebrim.OBJECT_TYPE_REGISTRY_PACKAGE,
        home=HOME,
    )
    _external_id(ss, ebrim.SS_PATIENT_ID, patient)
    _external_id(ss, ebrim.SS_UNIQUE_ID, f"1.2.4.{uuid.uuid4().int % 10**12}")
    return ss


def association(source: etree._Element, target: etree._Element) -> etree._Element:
    return etree.Element(
        f"{{{RIM}}}Association",
        nsmap={"rim": RIM},
        id=f"urn:uuid:{uuid.uuid4()}",
        associationType=ebrim.HAS_MEMBER,
        sourceObject=source.get("id", ""),
        targetObject=target.get("id", ""),
    )


def withhold_class(code: str):  # type: ignore[no-untyped-def]
    def decide(patient: str | None, docs: Sequence[DocumentClassification]) -> list[bool]:
        out = []
        for class_code, _ in docs:
            cc = class_code.code if isinstance(class_code, DocumentCode) else class_code
            out.append(patient is not None and cc != code)
        return out

    return decide


@pytest.fixture
def consent(tmp_path: Path) -> Iterator[ConsentService]:
    service = ConsentService(
        ConsentStore(tmp_path / "consent.sqlite3"), ConsentConfig(enabled=True)
    )
    yield service
    service.close()


def _query_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "ebRS30" / "query.xsd")))


# --------------------------------------------------------------------------- facts


def test_document_facts_read_the_consent_relevant_metadata() -> None:
    eo = document_entry("18748-4", ["N", "R"], unique_id="1.2.3.4", study_uid="1.2.840.99.1")
    facts = document_facts(eo)
    assert facts.patient_id == PATIENT
    assert facts.unique_id == "1.2.3.4"
    assert facts.class_code == DocumentCode("18748-4", LOINC)
    assert facts.confidentiality_codes == (
        DocumentCode("N", CONFIDENTIALITY),
        DocumentCode("R", CONFIDENTIALITY),
    )
    assert facts.study_instance_uids == ("1.2.840.99.1",)
    assert facts.entry_uuid == eo.get("id")


# --------------------------------------------------------------------------- queries


def test_query_withholds_refused_entries_with_partial_success() -> None:
    keep = document_entry("18748-4")
    drop = document_entry("PSY")
    ss = submission_set()
    objects = [keep, drop, ss, association(ss, keep), association(ss, drop)]
    result = filter_query_objects(objects, withhold_class("PSY"), home_community_id=HOME)
    kept_ids = {o.get("id") for o in result.kept}
    assert drop.get("id") not in kept_ids
    # The association pointing at the withheld entry would reveal its id: gone too.
    assert objects[4].get("id") not in kept_ids
    assert {keep.get("id"), ss.get("id"), objects[3].get("id")} == kept_ids
    assert result.status == ResponseStatus.PARTIAL_SUCCESS
    [error] = result.errors
    assert error.error_code == LOCAL_POLICY_RESTRICTION_ERROR
    assert error.location == HOME and error.is_error
    # The wire says nothing about which or how many documents.
    assert drop.get("id", "") not in error.code_context and "1" not in error.code_context
    assert result.audit_description is not None and drop.get("id", "") in result.audit_description

    response = adhoc_query_response(result.status, result.errors, result.kept)
    schema = _query_schema()
    assert schema.validate(response), schema.error_log


def test_query_with_nothing_left_is_a_failure() -> None:
    result = filter_query_objects(
        [document_entry("PSY"), document_entry("PSY")],
        withhold_class("PSY"),
        home_community_id=HOME,
    )
    assert result.kept == []
    assert result.status == ResponseStatus.FAILURE


def test_query_with_nothing_withheld_is_untouched() -> None:
    objects = [document_entry("18748-4"), submission_set()]
    result = filter_query_objects(objects, withhold_class("PSY"), home_community_id=HOME)
    assert result.kept == objects
    assert result.errors == [] and result.status == ResponseStatus.SUCCESS
    assert result.audit_description is None


def test_entries_without_a_patient_id_are_withheld() -> None:
    result = filter_query_objects(
        [document_entry("18748-4", patient=None)], withhold_class("none"), home_community_id=HOME
    )
    assert result.kept == [] and len(result.withheld) == 1


def test_an_opted_out_patient_leaves_nothing_behind(consent: ConsentService) -> None:
    consent.store.set(PATIENT, "opt-out")
    entries = [document_entry("18748-4"), document_entry("11488-4")]
    ss = submission_set()
    objects = [*entries, ss, *(association(ss, e) for e in entries)]
    # An object ref to a withheld entry (e.g. from a mixed result) goes too.
    ref = etree.Element(f"{{{RIM}}}ObjectRef", id=entries[0].get("id", ""))
    other = document_entry("18748-4", patient=OTHER_PATIENT)
    result = filter_query_objects(
        [*objects, ref, other],
        lambda p, d: consent.verdicts_for_documents(p, PEER, d),
        home_community_id=HOME,
    )
    assert result.kept == [other]
    assert result.status == ResponseStatus.PARTIAL_SUCCESS
    assert result.audit_description is not None
    assert "opt-out for all communities" in result.audit_description


def test_consent_per_class_and_confidentiality(consent: ConsentService) -> None:
    consent.store.set(PATIENT, "opt-out", class_code=f"{LOINC}|11488-4")
    consent.store.set(PATIENT, "opt-out", confidentiality_code="V")
    normal = document_entry("18748-4", ["N"])
    consult = document_entry("11488-4", ["N"])
    very_restricted = document_entry("18748-4", ["N", "V"])
    result = filter_query_objects(
        [normal, consult, very_restricted],
        lambda p, d: consent.verdicts_for_documents(p, PEER, d),
        home_community_id=HOME,
    )
    assert result.kept == [normal]


# --------------------------------------------------------------------------- retrieves


@dataclass(frozen=True)
class Iti39Request:
    home_community_id: str
    repository_unique_id: str
    document_unique_id: str


def test_retrieve_refuses_withheld_documents_per_request(consent: ConsentService) -> None:
    consent.store.set(PATIENT, "opt-out", community=PEER, class_code="PSY")
    ok = document_entry("18748-4", unique_id="1.2.3.1")
    psy = document_entry("PSY", unique_id="1.2.3.2")
    metadata = {f.unique_id or "": f for f in map(document_facts, [ok, psy])}
    requests = [
        Iti39Request(HOME, "1.3.6.1.4.1.21367.13.80.1", "1.2.3.1"),
        Iti39Request(HOME, "1.3.6.1.4.1.21367.13.80.1", "1.2.3.2"),
        Iti39Request(HOME, "1.3.6.1.4.1.21367.13.80.1", "9.9.9"),  # no metadata
    ]
    result = filter_document_requests(
        requests,
        metadata,
        lambda p, d: consent.verdicts_for_documents(p, PEER, d),
        home_community_id=HOME,
    )
    assert result.permitted == requests[:1]
    assert result.refused == requests[1:]
    assert [e.error_code for e in result.errors] == [XDS_DOCUMENT_UNIQUE_ID_ERROR] * 2
    assert all(e.location == HOME for e in result.errors)
    # Withheld and unknown documents look the same to the requester.
    texts = [e.code_context.replace("1.2.3.2", "X").replace("9.9.9", "X") for e in result.errors]
    assert texts[0] == texts[1]
    assert result.audit_description is not None and "PSY" in result.audit_description
    # Another community is not affected by that rule.
    other = filter_document_requests(
        requests[:2],
        metadata,
        lambda p, d: consent.verdicts_for_documents(p, "urn:oid:1.2.3.99", d),
        home_community_id=HOME,
    )
    assert other.refused == []


def test_rad75_refuses_studies_whose_manifest_is_withheld(consent: ConsentService) -> None:
    consent.store.set(PATIENT, "opt-out")
    kos = document_entry("IMG", study_uid="1.2.840.99.1")
    other_kos = document_entry("IMG", patient=OTHER_PATIENT, study_uid="1.2.840.99.2")
    index = study_index([kos, other_kos])
    requests = [
        ImagingDocumentRequest(
            "1.2.840.99.1",
            "1.2.840.99.1.1",
            "1.3.6.1.4.1.21367.13.80.2",
            f"1.2.840.99.1.1.{n}",
            HOME,
        )
        for n in range(3)
    ] + [
        ImagingDocumentRequest(
            "1.2.840.99.2", "1.2.840.99.2.1", "1.3.6.1.4.1.21367.13.80.2", "1.2.840.99.2.1.1", HOME
        )
    ]
    result = filter_imaging_requests(
        requests,
        index,
        lambda p, d: consent.verdicts_for_documents(p, PEER, d),
        home_community_id=HOME,
    )
    assert result.permitted == requests[3:]
    assert result.refused == requests[:3]
    # One error for the study, not one per instance.
    [error] = result.errors
    assert "1.2.840.99.1" in error.code_context
    response = retrieve_document_set_response(ResponseStatus.PARTIAL_SUCCESS, result.errors)
    assert response.find(".//{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryError") is not None


def test_the_decision_must_answer_every_document() -> None:
    with pytest.raises(ValueError):
        filter_query_objects(
            [document_entry("X"), document_entry("Y")], lambda p, d: [True], home_community_id=HOME
        )
