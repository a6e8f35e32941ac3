"""The local patient directory: registration, deterministic matching, DICOM loading."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from xca_gateway.patients.directory import (
    MATCH_THRESHOLD,
    SCORE_WITHOUT_GENDER,
    Address,
    Demographics,
    PatientDirectory,
    demographics_from_dicom,
    name_key,
    normalize_gender,
)
from xca_gateway.tools.dicom_samples import SamplePatient, generate_study
from xca_gateway.xds.patient_id import PatientId

AA = "1.3.6.1.4.1.21367.13.20.1000"
OTHER_AA = "1.3.6.1.4.1.21367.13.20.2000"


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[PatientDirectory]:
    d = PatientDirectory(tmp_path / "patients.sqlite3")
    yield d
    d.close()


def alice(**changes: object) -> Demographics:
    values: dict[str, object] = {
        "family": "Lindqvist",
        "given": "Alice",
        "birth_date": "19620314",
        "gender": "F",
    }
    values.update(changes)
    return Demographics(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Søren-Åke", "soren ake"),
        ("MÜLLER", "muller"),
        ("O'Brien", "OBrien"),
        ("Łukasz", "lukasz"),
        ("Ærøe", "aeroe"),
        ("  de  la Cruz ", "De La Cruz"),
        ("Straße", "STRASSE"),
    ],
)
def test_name_keys_ignore_case_diacritics_and_punctuation(a: str, b: str) -> None:
    assert name_key(a) == name_key(b) != ""


def test_name_keys_still_tell_different_names_apart() -> None:
    assert name_key("Berg") != name_key("Borg")
    assert name_key("Anna Maria") != name_key("Anna")


def test_gender_codes_from_hl7_and_dicom() -> None:
    assert [normalize_gender(v) for v in ("m", "F", "O", "UN", "U", "", None)] == [
        "M",
        "F",
        "UN",
        "UN",
        None,
        None,
        None,
    ]


def test_register_and_lookup_round_trip(directory: PatientDirectory) -> None:
    pid = PatientId("C01-1001", AA)
    assert directory.lookup(pid) is None
    address = Address("Storgata 1", "Oslo", None, "0150", "NO")
    directory.register(pid, alice(address=address, phone="+47 555 1234"))
    found = directory.lookup(pid)
    assert found is not None
    assert (found.family, found.given, found.birth_date, found.gender) == (
        "Lindqvist",
        "Alice",
        "19620314",
        "F",
    )
    assert found.address == address
    assert found.phone == "+47 555 1234"
    # Registering again updates (latest demographics win), it does not duplicate.
    directory.register(pid, alice(family="Lindqvist-Berg"))
    assert len(directory) == 1
    updated = directory.lookup(pid)
    assert updated is not None and updated.family == "Lindqvist-Berg"
    assert updated.address is None


def test_register_rejects_bad_values(directory: PatientDirectory) -> None:
    with pytest.raises(ValueError, match="OID"):
        directory.register(PatientId("X", "not-an-oid"), alice())
    with pytest.raises(ValueError, match="YYYYMMDD"):
        directory.register(PatientId("X", AA), alice(birth_date="14.03.1962"))


def test_match_by_demographics_is_case_and_diacritics_insensitive(
    directory: PatientDirectory,
) -> None:
    pid = PatientId("C01-1001", AA)
    directory.register(pid, alice(family="Lindqvíst"))
    directory.register(PatientId("C01-1002", AA), alice(given="Bob", gender="M"))
    matches = directory.match(alice(family="LINDQVIST", given="alice"))
    assert matches == [(pid, 100)]
    # Every rule field counts: another birth date, gender or given name is no match.
    assert directory.match(alice(birth_date="19620315")) == []
    assert directory.match(alice(gender="M")) == []
    assert directory.match(alice(given="Alicia")) == []


def test_missing_gender_is_a_hint_not_an_answer(directory: PatientDirectory) -> None:
    pid = PatientId("C01-1001", AA)
    directory.register(pid, alice())
    assert directory.match(alice(gender=None)) == []
    assert directory.match(alice(gender=None), minimum_score=0) == [(pid, SCORE_WITHOUT_GENDER)]
    assert SCORE_WITHOUT_GENDER < MATCH_THRESHOLD


def test_match_by_exact_identifier(directory: PatientDirectory) -> None:
    pid = PatientId("C01-1001", AA)
    directory.register(pid, alice())
    assert directory.match(Demographics(identifiers=(pid,))) == [(pid, 100)]
    # Same id text in another domain is another person.
    assert directory.match(Demographics(identifiers=(PatientId("C01-1001", OTHER_AA),))) == []


def test_two_people_with_the_same_demographics_are_both_returned(
    directory: PatientDirectory,
) -> None:
    directory.register(PatientId("C01-1001", AA), alice())
    directory.register(PatientId("C01-1099", AA), alice())
    matches = directory.match(alice())
    assert [m.patient_id.id for m in matches] == ["C01-1001", "C01-1099"]
    assert all(score == 100 for _, score in matches)


def test_demographics_from_a_dicom_dataset() -> None:
    ds = Dataset()
    ds.PatientName = "Øvergård^Åse^Marie"
    ds.PatientID = "MRN-7"
    ds.IssuerOfPatientID = "HOSPITAL-A"  # a namespace, not an OID
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = OTHER_AA
    qualifiers.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.PatientAddress = "Kirkegata 2, Bergen"
    pid, demographics = demographics_from_dicom(ds, AA)
    assert pid == PatientId("MRN-7", OTHER_AA)
    assert (demographics.family, demographics.given) == ("Øvergård", "Åse")
    assert (demographics.birth_date, demographics.gender) == ("19800101", "UN")
    assert demographics.address == Address(street="Kirkegata 2, Bergen")

    bare = Dataset()
    bare.PatientID = "MRN-8"
    bare.IssuerOfPatientID = "HOSPITAL-A"
    pid, demographics = demographics_from_dicom(bare, AA)
    assert pid == PatientId("MRN-8", AA)  # no OID issuer: the community's own domain
    assert demographics.family is None and demographics.birth_date is None

    with pytest.raises(ValueError, match="PatientID"):
        demographics_from_dicom(Dataset(), AA)
    hl7 = Dataset()
    hl7.PatientID = "A^B"
    with pytest.raises(ValueError, match="delimiter"):
        demographics_from_dicom(hl7, AA)


def test_register_from_dicom_files(directory: PatientDirectory, tmp_path: Path) -> None:
    study = generate_study(
        tmp_path / "dicom",
        patient=SamplePatient("carol", "Berg", "Carol", "19880527", "F"),
        patient_id="C02-2003",
        issuer_oid=OTHER_AA,
        modality="CT",
        body_part="HEAD",
        study_date=date(2020, 2, 3),
        institution="Test Hospital",
        accession_number="ACC1",
        uid_root="1.2.826.0.1.3680043.10.543",
        series_count=1,
        instances_per_series=1,
        rows=8,
        columns=8,
        seed=1,
    )
    ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    pid = directory.register_from_dicom(ds, AA)
    assert pid == PatientId("C02-2003", OTHER_AA)
    assert directory.match(
        Demographics(family="berg", given="CAROL", birth_date="19880527", gender="F")
    ) == [(pid, 100)]
