from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, SampleStudy, generate_study
from xca_gateway.xds.kos import (
    KOS_SOP_CLASS_UID,
    InstanceRef,
    build_kos,
    kos_from_bytes,
    kos_references,
    kos_retrieve_locations,
    kos_to_bytes,
)

REPO_UID = "1.3.6.1.4.1.21367.13.80.110"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def _generate(tmp_path: Path, accession: str = "NOR000001", **kw: object) -> SampleStudy:
    kwargs: dict[str, object] = {
        "patient": DEFAULT_PATIENTS[1],
        "patient_id": "C01-1002",
        "issuer_oid": "1.2.3.4.5.1",
        "modality": "MR",
        "body_part": "KNEE",
        "study_date": date(2020, 2, 3),
        "institution": "North Regional Hospital",
        "accession_number": accession,
        "uid_root": "1.2.826.0.1.3680043.10.1",
        "series_count": 3,
        "instances_per_series": 2,
        "rows": 8,
        "columns": 8,
        "seed": 7,
    }
    kwargs.update(kw)
    return generate_study(tmp_path, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def study(tmp_path: Path) -> SampleStudy:
    return _generate(tmp_path)


@pytest.fixture
def instances(study: SampleStudy) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in study.files]


def _expected_refs(instances: list[Dataset]) -> list[InstanceRef]:
    return [
        InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID)
        for ds in instances
    ]


def test_kos_header_and_sr_structure(instances: list[Dataset]) -> None:
    kos = build_kos(
        instances,
        repository_unique_id=REPO_UID,
        institution_name="North Gateway",
        content_datetime=WHEN,
    )
    first = instances[0]
    assert kos.SOPClassUID == KOS_SOP_CLASS_UID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert kos.Modality == "KO"
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        assert kos[keyword].value == first[keyword].value, keyword
    qualifiers = kos.IssuerOfPatientIDQualifiersSequence[0]
    assert qualifiers.UniversalEntityID == "1.2.3.4.5.1"
    assert qualifiers.UniversalEntityIDType == "ISO"
    assert kos.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in instances}
    assert UID_RE.match(kos.SeriesInstanceUID) and len(kos.SeriesInstanceUID) <= 64
    assert UID_RE.match(kos.SOPInstanceUID) and len(kos.SOPInstanceUID) <= 64
    assert kos.SeriesNumber and kos.InstanceNumber == 1
    assert (kos.ContentDate, kos.ContentTime) == ("20240506", "070809")
    assert kos.TimezoneOffsetFromUTC == "+0000"
    assert kos.InstitutionName == "North Gateway"

    concept = kos.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (
        "113030",
        "DCM",
        "Manifest",
    )
    template = kos.ContentTemplateSequence[0]
    assert (template.TemplateIdentifier, template.MappingResource) == ("2010", "DCMR")
    assert kos.ValueType == "CONTAINER"
    assert kos.ContinuityOfContent == "SEPARATE"
    assert kos.ReferencedRequestSequence[0].AccessionNumber == first.AccessionNumber


def test_evidence_grouped_by_series_with_retrieve_location(
    study: SampleStudy, instances: list[Dataset]
) -> None:
    kos = build_kos(
        instances,
        repository_unique_id=REPO_UID,
        retrieve_ae_title="NORTH_IDS",
        retrieve_url="https://north.example/dicom-web",
    )
    (study_item,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == study.study_instance_uid
    series_items = study_item.ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in series_items] == list(study.series_instance_uids)
    for series in series_items:
        assert series.RetrieveLocationUID == REPO_UID
        assert series.RetrieveAETitle == "NORTH_IDS"
        assert series.RetrieveURL == "https://north.example/dicom-web"
        expected = {
            ds.SOPInstanceUID
            for ds in instances
            if ds.SeriesInstanceUID == series.SeriesInstanceUID
        }
        got = {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
        assert got == expected and len(got) == 2

    assert kos_references(kos) == _expected_refs(instances)
    assert kos_retrieve_locations(kos) == dict.fromkeys(study.series_instance_uids, REPO_UID)


def test_retrieve_ae_and_url_omitted_when_not_given(instances: list[Dataset]) -> None:
    kos = build_kos(instances, repository_unique_id=REPO_UID)
    for series in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        assert series.RetrieveLocationUID == REPO_UID
        assert "RetrieveAETitle" not in series
        assert "RetrieveURL" not in series


def test_content_sequence_has_one_image_item_per_instance(instances: list[Dataset]) -> None:
    kos = build_kos(instances, repository_unique_id=REPO_UID)
    assert len(kos.ContentSequence) == len(instances)
    for item, ds in zip(kos.ContentSequence, instances, strict=True):
        assert item.RelationshipType == "CONTAINS"
        assert item.ValueType == "IMAGE"
        (ref,) = item.ReferencedSOPSequence
        assert ref.ReferencedSOPClassUID == ds.SOPClassUID
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_non_image_instances_become_composite_items(instances: list[Dataset]) -> None:
    sr = Dataset()
    sr.StudyInstanceUID = instances[0].StudyInstanceUID
    sr.SeriesInstanceUID = "1.2.3.999"
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    sr.SOPInstanceUID = "1.2.3.999.1"
    sr.PatientID = instances[0].PatientID
    sr.IssuerOfPatientID = instances[0].IssuerOfPatientID
    kos = build_kos([*instances, sr], repository_unique_id=REPO_UID)
    assert kos.ContentSequence[-1].ValueType == "COMPOSITE"
    assert kos.ContentSequence[0].ValueType == "IMAGE"
    assert len(kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 4


def test_explicit_sop_instance_uid_and_duplicates(instances: list[Dataset]) -> None:
    kos = build_kos(
        [*instances, instances[0]], repository_unique_id=REPO_UID, sop_instance_uid="1.2.3.4.5"
    )
    assert kos.SOPInstanceUID == "1.2.3.4.5"
    assert len(kos_references(kos)) == len(instances)


def test_round_trip_through_part10_bytes(instances: list[Dataset]) -> None:
    tz = timezone(timedelta(hours=-5, minutes=-30))
    kos = build_kos(
        instances,
        repository_unique_id=REPO_UID,
        retrieve_ae_title="NORTH_IDS",
        content_datetime=datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz),
    )
    data = kos_to_bytes(kos)
    assert data[128:132] == b"DICM"
    assert not hasattr(kos, "file_meta") or "TransferSyntaxUID" not in kos.file_meta

    parsed = kos_from_bytes(data)
    assert parsed.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert parsed.file_meta.MediaStorageSOPClassUID == KOS_SOP_CLASS_UID
    assert parsed.file_meta.MediaStorageSOPInstanceUID == kos.SOPInstanceUID
    assert parsed.SOPInstanceUID == kos.SOPInstanceUID
    assert parsed.TimezoneOffsetFromUTC == "-0530"
    assert kos_references(parsed) == kos_references(kos) == _expected_refs(instances)
    assert kos_retrieve_locations(parsed) == kos_retrieve_locations(kos)
    assert str(parsed.PatientName) == str(instances[0].PatientName)


def test_kos_from_bytes_rejects_garbage_and_non_kos(
    instances: list[Dataset], tmp_path: Path
) -> None:
    with pytest.raises(ValueError):
        kos_from_bytes(b"not dicom at all")
    image_bytes = (Path(instances[0].filename)).read_bytes()
    with pytest.raises(ValueError, match="Key Object Selection"):
        kos_from_bytes(image_bytes)


def test_rejects_mixed_studies(tmp_path: Path, instances: list[Dataset]) -> None:
    other = _generate(tmp_path / "other", accession="NOR000002", series_count=1)
    other_ds = pydicom.dcmread(other.files[0])
    assert other_ds.StudyInstanceUID != instances[0].StudyInstanceUID
    with pytest.raises(ValueError, match="one study"):
        build_kos([*instances, other_ds], repository_unique_id=REPO_UID)


def test_rejects_mixed_patients(instances: list[Dataset]) -> None:
    instances[-1].PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match="PatientID"):
        build_kos(instances, repository_unique_id=REPO_UID)


def test_rejects_bad_input(instances: list[Dataset]) -> None:
    with pytest.raises(ValueError):
        build_kos([], repository_unique_id=REPO_UID)
    with pytest.raises(ValueError):
        build_kos(instances, repository_unique_id="not-a-uid")
    incomplete = Dataset()
    incomplete.StudyInstanceUID = instances[0].StudyInstanceUID
    with pytest.raises(ValueError, match=r"SOPClassUID|SeriesInstanceUID"):
        build_kos([incomplete], repository_unique_id=REPO_UID)
    conflicting = pydicom.dcmread(instances[0].filename)
    conflicting.SeriesInstanceUID = "1.2.3.42"
    with pytest.raises(ValueError, match="conflicting"):
        build_kos([*instances, conflicting], repository_unique_id=REPO_UID)


def test_kos_references_requires_evidence() -> None:
    with pytest.raises(ValueError):
        kos_references(Dataset())


def test_minimal_instances_get_empty_type2_attributes() -> None:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.1.1"
    kos = build_kos([ds], repository_unique_id=REPO_UID)
    assert kos.PatientID == "" and kos.AccessionNumber == "" and kos.StudyDate == ""
    assert "IssuerOfPatientIDQualifiersSequence" not in kos
    assert "ReferencedRequestSequence" not in kos
    # Still encodes to a valid file.
    assert kos_references(kos_from_bytes(kos_to_bytes(kos))) == [
        InstanceRef("1.2.3", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1.1")
    ]
