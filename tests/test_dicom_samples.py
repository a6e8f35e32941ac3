from __future__ import annotations

import io
import re
from collections import defaultdict
from datetime import date
from pathlib import Path

import pydicom
import pytest

from xca_gateway.imaging.transfer_syntax import EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT
from xca_gateway.imaging.transfer_syntax import transcode
from xca_gateway.tools.dicom_samples import (
    DEFAULT_PATIENTS,
    MANUFACTURER,
    MODALITY_SOP_CLASSES,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SamplePatient,
    SampleStudy,
    community_prefix,
    generate_community_samples,
    generate_study,
    local_patient_id,
)

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
COMMUNITIES = (("north", "1.2.3.4.5.1", "1.2.826.0.1.3680043.10.1"),
               ("south", "1.2.3.4.5.2", "1.2.826.0.1.3680043.10.2"),
               ("west", "1.2.3.4.5.3", "1.2.826.0.1.3680043.10.3"))  # fmt: skip


def assert_valid_uid(uid: str) -> None:
    assert len(uid) <= 64, uid
    assert UID_RE.match(uid), uid


def _study(tmp_path: Path, **overrides: object) -> SampleStudy:
    kwargs: dict[str, object] = {
        "patient": DEFAULT_PATIENTS[0],
        "patient_id": "C01-1001",
        "issuer_oid": "1.2.3.4.5.1",
        "modality": "CT",
        "body_part": "CHEST",
        "study_date": date(2021, 3, 9),
        "institution": "North Regional Hospital",
        "accession_number": "NOR000001",
        "uid_root": "1.2.826.0.1.3680043.10.1",
        "seed": 42,
    }
    kwargs.update(overrides)
    return generate_study(tmp_path, **kwargs)  # type: ignore[arg-type]


def _all_communities(root: Path) -> dict[str, list[SampleStudy]]:
    return {
        name: generate_community_samples(
            root / name,
            community_index=index,
            community_name=name,
            issuer_oid=issuer,
            uid_root=uid_root,
        )
        for index, (name, issuer, uid_root) in enumerate(COMMUNITIES)
    }


def test_generate_study_writes_parseable_part10_files(tmp_path: Path) -> None:
    study = _study(tmp_path, series_count=2, instances_per_series=3, rows=32, columns=48)

    assert len(study.files) == 6
    assert len(study.series_instance_uids) == 2
    assert study.study_date == "20210309"
    assert study.modality == "CT"
    sop_uids = set()
    for path in study.files:
        assert path.exists()
        ds = pydicom.dcmread(path)
        # Part-10 layout: <study uid>/<series uid>/<sop uid>.dcm
        assert path.relative_to(tmp_path).parts == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            f"{ds.SOPInstanceUID}.dcm",
        )
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.preamble is not None
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.Modality == "CT"
        assert str(ds.PatientName) == "Lindqvist^Alice"
        assert ds.PatientID == "C01-1001"
        assert ds.IssuerOfPatientID == "1.2.3.4.5.1"
        qualifiers = ds.IssuerOfPatientIDQualifiersSequence[0]
        assert qualifiers.UniversalEntityID == "1.2.3.4.5.1"
        assert qualifiers.UniversalEntityIDType == "ISO"
        assert ds.PatientBirthDate == "19620314"
        assert ds.PatientSex == "F"
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.SeriesInstanceUID in study.series_instance_uids
        assert ds.StudyDate == "20210309"
        assert re.fullmatch(r"\d{6}", ds.StudyTime)
        assert ds.AccessionNumber == "NOR000001"
        assert ds.StudyDescription == study.description
        assert ds.SeriesDescription
        assert ds.SeriesNumber in (1, 2)
        assert ds.InstanceNumber in (1, 2, 3)
        assert ds.BodyPartExamined == "CHEST"
        assert ds.InstitutionName == "North Regional Hospital"
        assert "ReferringPhysicianName" in ds
        assert ds.Manufacturer == MANUFACTURER
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.Rows, ds.Columns) == (32, 48)
        assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 0, 1)
        assert len(ds.PixelData) == 32 * 48 * 2
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert_valid_uid(uid)
            assert uid.startswith("1.2.826.0.1.3680043.10.1.")
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == 6


def test_pixel_data_is_a_non_constant_pattern_within_bits_stored(tmp_path: Path) -> None:
    study = _study(tmp_path, series_count=1, instances_per_series=2, rows=16, columns=16)
    first, second = (pydicom.dcmread(p) for p in study.files)
    values = [int.from_bytes(first.PixelData[i : i + 2], "little") for i in range(0, 512, 2)]
    assert len(set(values)) > 10
    assert max(values) < 1 << first.BitsStored
    assert first.PixelData != second.PixelData


@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [
        ("CT", "1.2.840.10008.5.1.4.1.1.2"),
        ("MR", "1.2.840.10008.5.1.4.1.1.4"),
        ("CR", "1.2.840.10008.5.1.4.1.1.1"),
        ("DX", "1.2.840.10008.5.1.4.1.1.1.1"),
        ("US", "1.2.840.10008.5.1.4.1.1.6.1"),
    ],
)
def test_sop_class_matches_modality(tmp_path: Path, modality: str, sop_class: str) -> None:
    study = _study(tmp_path, modality=modality, series_count=1, instances_per_series=1)
    ds = pydicom.dcmread(study.files[0])
    assert ds.Modality == modality
    assert ds.SOPClassUID == sop_class == MODALITY_SOP_CLASSES[modality]


def test_seeded_generation_is_reproducible_and_unseeded_is_not(tmp_path: Path) -> None:
    a = _study(tmp_path / "a")
    b = _study(tmp_path / "b")
    assert a.study_instance_uid == b.study_instance_uid
    assert a.series_instance_uids == b.series_instance_uids
    assert [p.name for p in a.files] == [p.name for p in b.files]
    assert pydicom.dcmread(a.files[0]).PixelData == pydicom.dcmread(b.files[0]).PixelData

    c = _study(tmp_path / "c", seed=None)
    d = _study(tmp_path / "d", seed=None)
    assert c.study_instance_uid != d.study_instance_uid
    assert_valid_uid(c.study_instance_uid)


def test_same_seed_different_patient_gives_different_uids(tmp_path: Path) -> None:
    a = _study(tmp_path, patient_id="C01-1001")
    b = _study(tmp_path, patient_id="C01-1002")
    assert a.study_instance_uid != b.study_instance_uid


@pytest.mark.parametrize(
    "overrides",
    [
        {"modality": "PT"},
        {"series_count": 0},
        {"instances_per_series": 0},
        {"rows": 0},
        {"uid_root": "1.2.03"},
        {"uid_root": "1.2.abc"},
        {"uid_root": "1." + "2" * 60},
        {"issuer_oid": "not-an-oid"},
    ],
)
def test_generate_study_rejects_bad_arguments(tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _study(tmp_path, **overrides)


def test_local_patient_id_is_deterministic_and_community_specific() -> None:
    assert local_patient_id(0, 0) == local_patient_id(0, 0)
    ids = {local_patient_id(c, p) for c in range(3) for p in range(4)}
    assert len(ids) == 12
    for p in range(4):
        assert local_patient_id(0, p) != local_patient_id(1, p)
    with pytest.raises(ValueError):
        local_patient_id(-1, 0)


def test_community_prefix() -> None:
    assert community_prefix("north") == "NOR"
    assert community_prefix("St. Olav") == "STO"
    assert community_prefix("ab") == "AB"
    with pytest.raises(ValueError):
        community_prefix("123")


def test_every_person_appears_in_every_community_under_different_ids(tmp_path: Path) -> None:
    by_community = _all_communities(tmp_path)

    # person -> community -> set of (patient id, issuer) seen in files on disk
    seen: dict[str, dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    name_to_key = {f"{p.family}^{p.given}": p.cross_community_key for p in DEFAULT_PATIENTS}
    for community, studies in by_community.items():
        per_patient: dict[str, int] = defaultdict(int)
        for study in studies:
            if study.transfer_syntax_uid == str(pydicom.uid.ExplicitVRLittleEndian):
                per_patient[study.patient_id] += 1  # the compressed study is counted apart
            ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
            key = name_to_key[str(ds.PatientName)]
            seen[key][community].add((ds.PatientID, ds.IssuerOfPatientID))
            assert ds.PatientID == study.patient_id
            assert ds.IssuerOfPatientID == study.issuer_oid
        assert len(per_patient) == len(DEFAULT_PATIENTS)
        assert all(1 <= n <= 2 for n in per_patient.values())

    assert set(seen) == {p.cross_community_key for p in DEFAULT_PATIENTS}
    for key, communities in seen.items():
        assert set(communities) == {name for name, _, _ in COMMUNITIES}, key
        ids = [next(iter(v)) for v in communities.values()]
        assert all(len(v) == 1 for v in communities.values())
        assert len({pid for pid, _ in ids}) == len(COMMUNITIES), f"{key}: ids must differ"
        assert len({issuer for _, issuer in ids}) == len(COMMUNITIES)


def test_community_samples_vary_and_use_community_accession_prefix(tmp_path: Path) -> None:
    by_community = _all_communities(tmp_path)
    all_studies = [s for studies in by_community.values() for s in studies]
    assert {s.modality for s in all_studies} == {"CT", "MR", "CR", "US"}
    assert len({s.body_part for s in all_studies}) > 3
    assert len({s.study_date for s in all_studies}) > len(all_studies) // 2
    assert len({s.study_instance_uid for s in all_studies}) == len(all_studies)
    assert len({s.accession_number for s in all_studies}) == len(all_studies)
    for name, studies in by_community.items():
        for study in studies:
            assert study.accession_number.startswith(name[:3].upper())
            assert len(study.accession_number) <= 16  # SH
            assert study.institution == f"{name.capitalize()} Regional Hospital"
            date.fromisoformat(
                f"{study.study_date[:4]}-{study.study_date[4:6]}-{study.study_date[6:]}"
            )
    # Within a community, a patient with two studies gets two different exams.
    for studies in by_community.values():
        by_patient: dict[str, list[SampleStudy]] = defaultdict(list)
        for study in studies:
            by_patient[study.patient_id].append(study)
        for group in by_patient.values():
            if len(group) == 2:
                assert group[0].modality != group[1].modality


def test_community_samples_are_reproducible(tmp_path: Path) -> None:
    def run(root: Path) -> list[tuple[str, str, str, str]]:
        studies = generate_community_samples(
            root,
            community_index=1,
            community_name="south",
            issuer_oid="1.2.3.4.5.2",
            uid_root="1.2.826.0.1.3680043.10.2",
            institution="Custom Clinic",
        )
        assert all(s.institution == "Custom Clinic" for s in studies)
        return [
            (s.study_instance_uid, s.accession_number, s.modality, s.study_date) for s in studies
        ]

    assert run(tmp_path / "one") == run(tmp_path / "two")


def test_custom_patients(tmp_path: Path) -> None:
    patient = SamplePatient("eve", "Strand", "Eve", "20010101", "O")
    studies = generate_community_samples(
        tmp_path,
        community_index=0,
        community_name="north",
        issuer_oid="1.2.3.4.5.1",
        uid_root="1.2.826.0.1.3680043.10.1",
        patients=[patient],
    )
    # Eve's study, and her compressed one.
    assert len(studies) == 2
    assert studies[1].transfer_syntax_uid == pydicom.uid.RLELossless
    ds = pydicom.dcmread(studies[0].files[0])
    assert str(ds.PatientName) == "Strand^Eve"
    assert ds.PatientSex == "O"
    assert ds.PatientID == local_patient_id(0, 0)


def test_each_community_has_one_compressed_study_of_its_first_patient(tmp_path: Path) -> None:
    for index, studies in enumerate(_all_communities(tmp_path).values()):
        *plain, compressed = studies
        assert all(s.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian for s in plain)
        assert compressed.transfer_syntax_uid == pydicom.uid.RLELossless
        assert compressed.patient_id == local_patient_id(index, 0)
        # A modality the patient has no other study of.
        assert compressed.modality not in {
            s.modality for s in plain if s.patient_id == compressed.patient_id
        }
        for path in compressed.files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
            assert ds["PixelData"].is_undefined_length  # encapsulated fragments
            # Decodes (pydicom's own codec, as the gateway converts it) to native pixels.
            native = pydicom.dcmread(io.BytesIO(transcode(path.read_bytes(), EXPLICIT)))
            assert len(native.PixelData) == ds.Rows * ds.Columns * 2
            assert native.SOPInstanceUID == ds.SOPInstanceUID


def test_sample_instances_carry_a_private_block_in_explicit_vr(tmp_path: Path) -> None:
    study = _study(tmp_path, series_count=1, instances_per_series=1)
    ds = pydicom.dcmread(study.files[0])
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert [block[offset].VR for offset in (0x10, 0x11, 0x12, 0x13, 0x14)] == [
        "LO",
        "DS",
        "US",
        "FD",
        "SQ",
    ]
    assert block[0x11].value == "1.50"
