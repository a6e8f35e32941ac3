"""XDS metadata of imaging manifests: content, vocabulary, and validity against lcm.xsd."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path

import pydicom
import pytest
from lxml import etree
from pydicom.dataset import Dataset

from xca_gateway.protocol.namespaces import LCM, RIM
from xca_gateway.protocol.wsdl import WSDL_DIR
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study
from xca_gateway.xds import ebrim
from xca_gateway.xds.kos import is_valid_uid
from xca_gateway.xds.metadata import (
    DCM_SYSTEM,
    LOINC,
    SNOMED_CT,
    ImagingStudy,
    ManifestDocument,
    ManifestMetadataError,
    ManifestOptions,
    build_submit_objects_request,
    cx,
    escape_hl7,
    imaging_study_from_datasets,
    parse_manifest_options,
    service_start_time,
    xcn_from_pn,
    xpn_from_pn,
)

AFFINITY = "1.3.6.1.4.1.21367.13.20.1000"
REPO_ID = "1.3.6.1.4.1.21367.13.80.1"
UID_ROOT = "1.2.826.0.1.3680043.10.543"
NS = {"rim": RIM, "lcm": LCM}


@cache
def lcm_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(WSDL_DIR / "schema" / "ebRS30" / "lcm.xsd")))


def assert_valid(request: etree._Element) -> None:
    schema = lcm_schema()
    assert schema.validate(request), schema.error_log


def study_datasets(tmp: Path, modality: str = "CT", body_part: str = "CHEST") -> list[Dataset]:
    sample = generate_study(
        tmp,
        patient=DEFAULT_PATIENTS[0],
        patient_id="NORTH-0001",
        issuer_oid=AFFINITY,
        modality=modality,
        body_part=body_part,
        study_date=date(2021, 6, 15),
        institution="North Regional Hospital",
        accession_number="ACC-77",
        uid_root=UID_ROOT,
        series_count=2,
        instances_per_series=1,
        rows=8,
        columns=8,
        seed=7,
    )
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sample.files]


def manifest(unique_id: str = "1.2.3.4.5.6") -> ManifestDocument:
    return ManifestDocument(
        unique_id=unique_id,
        repository_unique_id=REPO_ID,
        size=4321,
        sha1="0123456789abcdef0123456789abcdef01234567",
        creation_time=datetime(2024, 3, 1, 12, 30, 5, tzinfo=UTC),
    )


def document_entry(request: etree._Element) -> etree._Element:
    entry = request.find("rim:RegistryObjectList/rim:ExtrinsicObject", NS)
    assert entry is not None
    return entry


def slot(element: etree._Element, name: str) -> list[str]:
    return [v.text or "" for v in element.iterfind(f"rim:Slot[@name='{name}']//rim:Value", NS)]


def classifications(element: etree._Element, scheme: str) -> list[etree._Element]:
    return element.findall(f"rim:Classification[@classificationScheme='{scheme}']", NS)


def coded(element: etree._Element, scheme: str) -> list[tuple[str, str, str]]:
    out = []
    for c in classifications(element, scheme):
        name = c.find("rim:Name/rim:LocalizedString", NS)
        assert name is not None
        code = c.get("nodeRepresentation") or ""
        out.append((code, slot(c, "codingScheme")[0], name.get("value") or ""))
    return out


def external_id(element: etree._Element, scheme: str) -> tuple[str, str]:
    found = element.find(f"rim:ExternalIdentifier[@identificationScheme='{scheme}']", NS)
    assert found is not None
    name = found.find("rim:Name/rim:LocalizedString", NS)
    assert name is not None and found.get("registryObject") == element.get("id")
    return found.get("value") or "", name.get("value") or ""


@pytest.mark.parametrize(
    ("modality", "body_part"), [("CT", "CHEST"), ("MR", "BRAIN"), ("CR", "HAND"), ("US", "PELVIS")]
)
def test_submission_validates_against_lcm_xsd(
    tmp_path: Path, modality: str, body_part: str
) -> None:
    study = imaging_study_from_datasets(study_datasets(tmp_path, modality, body_part))
    submission = build_submit_objects_request(study, manifest(), affinity_domain=AFFINITY)
    assert submission.request.tag == f"{{{LCM}}}SubmitObjectsRequest"
    assert_valid(submission.request)


def test_document_entry_carries_the_required_xds_metadata(tmp_path: Path) -> None:
    datasets = study_datasets(tmp_path)
    for ds in datasets:
        ds.PerformingPhysicianName = "Hansen^Kari^M"
        ds.TimezoneOffsetFromUTC = "+0200"
    study = imaging_study_from_datasets(datasets)
    submission = build_submit_objects_request(study, manifest(), affinity_domain=AFFINITY)
    entry = submission.request.find("rim:RegistryObjectList/rim:ExtrinsicObject", NS)
    assert entry is not None
    assert entry.get("id") == submission.document_entry_id
    assert entry.get("objectType") == ebrim.DOCUMENT_ENTRY_STABLE
    assert entry.get("mimeType") == "application/dicom"

    patient = f"NORTH-0001^^^&{AFFINITY}&ISO"
    assert external_id(entry, ebrim.DE_PATIENT_ID) == (patient, "XDSDocumentEntry.patientId")
    assert external_id(entry, ebrim.DE_UNIQUE_ID) == ("1.2.3.4.5.6", "XDSDocumentEntry.uniqueId")
    assert slot(entry, "sourcePatientId") == [patient]
    assert slot(entry, "sourcePatientInfo") == [
        f"PID-3|{patient}",
        "PID-5|Lindqvist^Alice",
        f"PID-7|{DEFAULT_PATIENTS[0].birth_date}",
        f"PID-8|{DEFAULT_PATIENTS[0].sex}",
    ]
    assert slot(entry, "creationTime") == ["20240301123005"]
    assert slot(entry, "hash") == ["0123456789abcdef0123456789abcdef01234567"]
    assert slot(entry, "size") == ["4321"]
    assert slot(entry, "repositoryUniqueId") == [REPO_ID]
    assert slot(entry, "languageCode") == ["en-US"]
    # StudyDate/StudyTime are local time at +02:00; XDS times are UTC.
    local = f"{datasets[0].StudyDate}{datasets[0].StudyTime}"
    expected = datetime.strptime(local + "+0200", "%Y%m%d%H%M%S%z").astimezone(UTC)
    assert slot(entry, "serviceStartTime") == [expected.strftime("%Y%m%d%H%M%S")]

    study_uid = str(datasets[0].StudyInstanceUID)
    assert slot(entry, ebrim.SLOT_REFERENCE_ID_LIST) == [
        f"{study_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
        f"ACC-77^^^&{AFFINITY}&ISO^urn:ihe:iti:xds:2013:accession",
    ]
    name = entry.find("rim:Name/rim:LocalizedString", NS)
    assert name is not None and name.get("value") == "CT Chest"

    assert coded(entry, ebrim.DE_CLASS_CODE) == [("18726-0", LOINC, "Radiology studies (set)")]
    assert coded(entry, ebrim.DE_TYPE_CODE) == [("18748-4", LOINC, "Diagnostic imaging study")]
    assert coded(entry, ebrim.DE_CONFIDENTIALITY_CODE) == [
        ("N", "2.16.840.1.113883.5.25", "normal")
    ]
    assert coded(entry, ebrim.DE_FORMAT_CODE) == [
        ("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "Key Object Selection Document")
    ]
    assert coded(entry, ebrim.DE_PRACTICE_SETTING_CODE) == [("394914008", SNOMED_CT, "Radiology")]
    assert coded(entry, ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE) == [
        ("22232009", SNOMED_CT, "Hospital")
    ]
    assert coded(entry, ebrim.DE_EVENT_CODE) == [
        ("CT", DCM_SYSTEM, "Computed Tomography"),
        ("816094009", SNOMED_CT, "Chest"),
    ]
    (author,) = classifications(entry, ebrim.DE_AUTHOR)
    assert author.get("nodeRepresentation") == ""
    assert slot(author, "authorPerson") == ["^Hansen^Kari^M"]
    assert slot(author, "authorInstitution") == ["North Regional Hospital"]
    for c in entry.iterfind("rim:Classification", NS):
        assert c.get("classifiedObject") == entry.get("id")


def test_submission_set_and_association(tmp_path: Path) -> None:
    study = imaging_study_from_datasets(study_datasets(tmp_path))
    options = ManifestOptions(source_id="1.2.3.77")
    submitted = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    submission = build_submit_objects_request(
        study, manifest(), affinity_domain=AFFINITY, options=options, submission_time=submitted
    )
    objects = submission.request.find("rim:RegistryObjectList", NS)
    assert objects is not None
    package = objects.find("rim:RegistryPackage", NS)
    assert package is not None and package.get("id") == submission.submission_set_id
    assert slot(package, "submissionTime") == ["20240506070809"]
    assert external_id(package, ebrim.SS_SOURCE_ID) == ("1.2.3.77", "XDSSubmissionSet.sourceId")
    assert external_id(package, ebrim.SS_PATIENT_ID)[0] == f"NORTH-0001^^^&{AFFINITY}&ISO"
    unique_id, _ = external_id(package, ebrim.SS_UNIQUE_ID)
    assert unique_id == submission.submission_set_unique_id and is_valid_uid(unique_id)
    assert coded(package, ebrim.SS_CONTENT_TYPE_CODE) == [
        ("18748-4", LOINC, "Diagnostic imaging study")
    ]
    assert slot(classifications(package, ebrim.SS_AUTHOR)[0], "authorInstitution")

    (node,) = objects.findall(
        f"rim:Classification[@classificationNode='{ebrim.SUBMISSION_SET_NODE}']", NS
    )
    assert node.get("classifiedObject") == package.get("id")
    (association,) = objects.findall("rim:Association", NS)
    assert association.get("associationType") == ebrim.HAS_MEMBER
    assert association.get("sourceObject") == package.get("id")
    assert association.get("targetObject") == submission.document_entry_id
    assert slot(association, "SubmissionSetStatus") == ["Original"]
    # Every id is a distinct urn:uuid.
    ids = [e.get("id") for e in submission.request.iter() if e.get("id")]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", i or "") for i in ids)


def test_configured_codes_and_author_replace_the_defaults(tmp_path: Path) -> None:
    options = parse_manifest_options(
        {
            "class_code": {"code": "IMG", "scheme": "1.2.3.4.1", "display_name": "Images"},
            "confidentiality_code": {
                "code": "R",
                "scheme": "2.16.840.1.113883.5.25",
                "display_name": "restricted",
            },
            "format_code": {
                "code": "urn:ihe:rad:1.2.840.10008.5.1.4.1.1.88.59",
                "scheme": "2.16.756.5.30.1.127.3.10.1.9",
                "display_name": "KOS",
            },
            "author_person": "^Radiology^Team",
            "author_institution": "Other Name",
            "author_institution_oid": "1.2.3.88",
            "language_code": "nb-NO",
            "accession_number_issuer": "1.2.3.66",
        }
    )
    study = imaging_study_from_datasets(study_datasets(tmp_path))
    submission = build_submit_objects_request(
        study, manifest(), affinity_domain=AFFINITY, options=options
    )
    assert_valid(submission.request)
    entry = submission.request.find(".//rim:ExtrinsicObject", NS)
    assert entry is not None
    assert coded(entry, ebrim.DE_CLASS_CODE) == [("IMG", "1.2.3.4.1", "Images")]
    assert coded(entry, ebrim.DE_CONFIDENTIALITY_CODE)[0][0] == "R"
    assert coded(entry, ebrim.DE_FORMAT_CODE)[0][0] == "urn:ihe:rad:1.2.840.10008.5.1.4.1.1.88.59"
    (author,) = classifications(entry, ebrim.DE_AUTHOR)
    assert slot(author, "authorPerson") == ["^Radiology^Team"]
    assert slot(author, "authorInstitution") == ["Other Name^^^^^^^^^1.2.3.88"]
    assert slot(entry, "languageCode") == ["nb-NO"]
    assert slot(entry, ebrim.SLOT_REFERENCE_ID_LIST)[1].startswith("ACC-77^^^&1.2.3.66&ISO^")
    with pytest.raises(ValueError, match="unknown"):
        parse_manifest_options({"class": "x"})


def test_without_a_person_in_dicom_the_author_is_the_source_device(tmp_path: Path) -> None:
    study = imaging_study_from_datasets(study_datasets(tmp_path))
    request = build_submit_objects_request(study, manifest(), affinity_domain=AFFINITY).request
    (author,) = classifications(document_entry(request), ebrim.DE_AUTHOR)
    assert slot(author, "authorPerson") == ["^Imaging Document Source"]


def test_patient_of_another_identifier_domain_is_refused(tmp_path: Path) -> None:
    datasets = study_datasets(tmp_path)
    for ds in datasets:
        ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID = "1.9.9.9"
        ds.IssuerOfPatientID = "1.9.9.9"
    study = imaging_study_from_datasets(datasets)
    with pytest.raises(ManifestMetadataError, match=r"1\.9\.9\.9"):
        build_submit_objects_request(study, manifest(), affinity_domain=AFFINITY)


def test_missing_issuer_means_the_community_domain(tmp_path: Path) -> None:
    datasets = study_datasets(tmp_path)
    for ds in datasets:
        del ds.IssuerOfPatientIDQualifiersSequence
        del ds.IssuerOfPatientID
        del ds.AccessionNumber
    study = imaging_study_from_datasets(datasets)
    submission = build_submit_objects_request(study, manifest(), affinity_domain=AFFINITY)
    assert_valid(submission.request)
    entry = submission.request.find(".//rim:ExtrinsicObject", NS)
    assert entry is not None
    assert external_id(entry, ebrim.DE_PATIENT_ID)[0] == f"NORTH-0001^^^&{AFFINITY}&ISO"
    assert len(slot(entry, ebrim.SLOT_REFERENCE_ID_LIST)) == 1  # no accession number


def test_hl7_delimiters_in_dicom_values_are_escaped() -> None:
    assert escape_hl7("a^b&c|d~e\\f") == "a\\S\\b\\T\\c\\F\\d\\R\\e\\E\\f"
    assert cx("ID&1", "1.2.3") == "ID\\T\\1^^^&1.2.3&ISO"
    assert xpn_from_pn("O'Brien^Seán^^Dr^Jr") == "O'Brien^Seán^^Jr^Dr"
    assert xcn_from_pn("Smith^John") == "^Smith^John"
    assert xpn_from_pn("Yamada^Tarou=山田^太郎") == "Yamada^Tarou"


def test_event_codes_cover_every_modality_and_known_body_part(tmp_path: Path) -> None:
    datasets = study_datasets(tmp_path)
    datasets[1].Modality = "PT"
    datasets[1].BodyPartExamined = "NOT_A_TERM"
    study = imaging_study_from_datasets(datasets)
    assert study.modalities == ("CT", "PT") and study.series_count == 2
    request = build_submit_objects_request(study, manifest(), affinity_domain=AFFINITY).request
    codes = coded(document_entry(request), ebrim.DE_EVENT_CODE)
    assert codes == [
        ("CT", DCM_SYSTEM, "Computed Tomography"),
        ("PT", DCM_SYSTEM, "Positron emission tomography"),
        ("816094009", SNOMED_CT, "Chest"),
    ]


@pytest.mark.parametrize(
    ("study_date", "study_time", "offset", "tz", "expected"),
    [
        ("20210615", "", "", "UTC", "20210615"),
        ("20210615", "0930", "", "UTC", "202106150930"),
        ("20210615", "093012.123", "", "Europe/Oslo", "20210615073012"),  # CEST
        ("20210115", "093012", "", "Europe/Oslo", "20210115083012"),  # CET
        ("20210615", "233000", "-0500", "UTC", "20210616043000"),  # offset beats zone
        ("2021.06.15", "10", "", "UTC", "2021061510"),
        ("garbage", "10", "", "UTC", None),
    ],
)
def test_service_start_time_is_utc_at_dicom_precision(
    study_date: str, study_time: str, offset: str, tz: str, expected: str | None
) -> None:
    study = ImagingStudy(
        study_instance_uid="1.2",
        patient_id="P",
        patient_id_issuer=None,
        study_date=study_date,
        study_time=study_time,
        timezone_offset=offset,
    )
    assert service_start_time(study, ManifestOptions(timezone=tz).tz()) == expected
