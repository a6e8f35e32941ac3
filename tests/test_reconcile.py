"""Import reconciliation (IRWF.b, PS3.3 C.12.1.1.9) on pydicom datasets: pure, no I/O."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from xca_gateway.doors.reconcile import (
    Reconciliation,
    ReconciliationError,
    accession_prefix_for,
    reconcile,
)

SOUTH = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
NORTH_OID = "1.3.6.1.4.1.21367.13.20.1000"
SOUTH_OID = "1.3.6.1.4.1.21367.13.20.2000"
WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def foreign_instance() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5.3"
    ds.StudyInstanceUID = "1.2.3.4.5.1"
    ds.SeriesInstanceUID = "1.2.3.4.5.2"
    ds.PatientName = "Lindqvist^Alice"
    ds.PatientID = "C02-2001"
    ds.IssuerOfPatientID = SOUTH_OID
    qualifier = Dataset()
    qualifier.UniversalEntityID = SOUTH_OID
    qualifier.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
    ds.PatientBirthDate = "19620314"
    ds.PatientSex = "F"
    ds.AccessionNumber = "SOU010001"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "SOUTH-RIS"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def north(**overrides: str) -> Reconciliation:
    values = {
        "local_patient_id": "C01-1001",
        "local_issuer": NORTH_OID,
        "source_community_id": SOUTH,
        "accession_prefix": "SOUTH-",
        "modifying_system": "xca-gateway north",
        **overrides,
    }
    return Reconciliation(**values)  # type: ignore[arg-type]


def test_patient_identity_becomes_local_and_the_foreign_one_is_kept() -> None:
    source = foreign_instance()
    result = reconcile(source, north(), now=WHEN)
    ds = result.dataset
    assert ds.PatientID == "C01-1001"
    assert ds.IssuerOfPatientID == NORTH_OID
    assert len(ds.IssuerOfPatientIDQualifiersSequence) == 1
    assert ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == NORTH_OID
    assert ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityIDType == "ISO"
    [other] = ds.OtherPatientIDsSequence
    assert other.PatientID == "C02-2001"
    assert other.IssuerOfPatientID == SOUTH_OID
    assert other.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == SOUTH_OID
    assert other.TypeOfPatientID == "TEXT"
    # The input dataset is left as it was.
    assert source.PatientID == "C02-2001"
    assert source.AccessionNumber == "SOU010001"
    assert "OriginalAttributesSequence" not in source
    assert source.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == SOUTH_OID


def test_accession_number_is_prefixed_and_the_foreign_issuer_removed() -> None:
    ds = reconcile(foreign_instance(), north(), now=WHEN).dataset
    assert ds.AccessionNumber == "SOUTH-SOU010001"
    assert "IssuerOfAccessionNumberSequence" not in ds


def test_original_attributes_sequence_records_every_previous_value() -> None:
    result = reconcile(foreign_instance(), north(), now=WHEN)
    [item] = result.dataset.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.SourceOfPreviousValues == SOUTH
    assert item.ModifyingSystem == "xca-gateway north"
    assert item.AttributeModificationDateTime == "20240506070809.000000+0000"
    [previous] = item.ModifiedAttributesSequence
    assert previous.PatientID == "C02-2001"
    assert previous.IssuerOfPatientID == SOUTH_OID
    assert previous.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == SOUTH_OID
    assert previous.AccessionNumber == "SOU010001"
    assert previous.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "SOUTH-RIS"
    # Attributes that were absent before (Other Patient IDs) have no previous value to keep.
    assert "OtherPatientIDsSequence" not in previous
    # Unchanged attributes are not listed.
    assert "PatientName" not in previous
    assert set(result.modified) == {
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "OtherPatientIDsSequence",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "OriginalAttributesSequence",
    }


def test_uids_and_pixel_data_are_unchanged() -> None:
    source = foreign_instance()
    ds = reconcile(source, north(), now=WHEN).dataset
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert ds[keyword].value == source[keyword].value
    assert ds.PixelData == source.PixelData
    assert ds.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID


def test_reconciling_twice_changes_nothing_more() -> None:
    once = reconcile(foreign_instance(), north(), now=WHEN).dataset
    twice = reconcile(once, north(), now=datetime(2025, 1, 1, tzinfo=UTC))
    assert twice.modified == ()
    assert twice.dataset.AccessionNumber == "SOUTH-SOU010001"
    assert len(twice.dataset.OriginalAttributesSequence) == 1
    assert len(twice.dataset.OtherPatientIDsSequence) == 1
    assert twice.dataset == once


def test_idempotent_through_a_part10_round_trip() -> None:
    """As when an imported prior comes back from the PACS and is imported again."""
    once = reconcile(foreign_instance(), north(), now=WHEN).dataset
    buffer = io.BytesIO()
    once.save_as(buffer, enforce_file_format=True)
    reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    again = reconcile(reread, north(), now=WHEN)
    assert again.modified == ()
    assert again.dataset.AccessionNumber == "SOUTH-SOU010001"


def test_an_accession_that_merely_starts_with_the_prefix_is_still_prefixed() -> None:
    """Only our own Original Attributes item proves a prefix was added by us."""
    source = foreign_instance()
    source.AccessionNumber = "SOUTH-1"
    ds = reconcile(source, north(), now=WHEN).dataset
    assert ds.AccessionNumber == "SOUTH-SOUTH-1"


def test_another_importers_history_is_kept() -> None:
    source = foreign_instance()
    earlier = Dataset()
    earlier.ReasonForTheAttributeModification = "CORRECT"
    earlier.SourceOfPreviousValues = "EAST"
    earlier.ModifyingSystem = "east-pacs"
    earlier.AttributeModificationDateTime = "20200101000000"
    modified = Dataset()
    modified.PatientName = "Lindqvst^Alice"
    earlier.ModifiedAttributesSequence = [modified]
    source.OriginalAttributesSequence = [earlier]
    existing = Dataset()
    existing.PatientID = "E-77"
    existing.IssuerOfPatientID = "EAST"
    source.OtherPatientIDsSequence = [existing]
    ds = reconcile(source, north(), now=WHEN).dataset
    assert [i.ReasonForTheAttributeModification for i in ds.OriginalAttributesSequence] == [
        "CORRECT",
        "COERCE",
    ]
    assert [o.PatientID for o in ds.OtherPatientIDsSequence] == ["E-77", "C02-2001"]
    # The previous Other Patient IDs Sequence (one item) is recorded as modified.
    previous = ds.OriginalAttributesSequence[1].ModifiedAttributesSequence[0]
    assert [o.PatientID for o in previous.OtherPatientIDsSequence] == ["E-77"]


def test_local_demographics_are_coerced_when_known() -> None:
    rec = north(
        local_patient_name="Lindqvist^Alice^Maria",
        local_patient_birth_date="19620315",
        local_patient_sex="F",
    )
    result = reconcile(foreign_instance(), rec, now=WHEN)
    ds = result.dataset
    assert ds.PatientName == "Lindqvist^Alice^Maria"
    assert ds.PatientBirthDate == "19620315"
    previous = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert previous.PatientName == "Lindqvist^Alice"
    assert previous.PatientBirthDate == "19620314"
    assert "PatientSex" not in previous  # same value: not modified
    assert "PatientSex" not in result.modified


def test_non_ascii_local_name_switches_to_utf8() -> None:
    rec = north(local_patient_name="Lindqvist^Åsa")
    ds = reconcile(foreign_instance(), rec, now=WHEN).dataset
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert pydicom.dcmread(io.BytesIO(buffer.getvalue())).PatientName == "Lindqvist^Åsa"


def test_instance_without_issuer_or_accession() -> None:
    source = foreign_instance()
    del source.IssuerOfPatientID
    del source.IssuerOfPatientIDQualifiersSequence
    source.AccessionNumber = ""
    ds = reconcile(source, north(), now=WHEN).dataset
    assert ds.AccessionNumber == ""
    assert ds.PatientID == "C01-1001"
    [other] = ds.OtherPatientIDsSequence
    assert other.PatientID == "C02-2001"
    assert "IssuerOfPatientID" not in other


def test_a_namespace_issuer_drops_the_foreign_qualifiers() -> None:
    ds = reconcile(foreign_instance(), north(local_issuer="NORTH-MRN"), now=WHEN).dataset
    assert ds.IssuerOfPatientID == "NORTH-MRN"
    assert "IssuerOfPatientIDQualifiersSequence" not in ds
    previous = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert previous.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == SOUTH_OID


def test_too_long_prefixed_accession_is_refused_not_truncated() -> None:
    source = foreign_instance()
    source.AccessionNumber = "0123456789AB"
    with pytest.raises(ReconciliationError, match="16"):
        reconcile(source, north(), now=WHEN)


def test_empty_local_identity_is_refused() -> None:
    with pytest.raises(ReconciliationError):
        north(local_patient_id=" ")
    with pytest.raises(ReconciliationError):
        north(accession_prefix="A\\B")


def test_already_local_instance_is_left_alone() -> None:
    source = foreign_instance()
    source.PatientID = "C01-1001"
    source.IssuerOfPatientID = NORTH_OID
    source.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID = NORTH_OID
    result = reconcile(source, north(accession_prefix=""), now=WHEN)
    assert result.modified == ()
    assert "OriginalAttributesSequence" not in result.dataset
    assert "OtherPatientIDsSequence" not in result.dataset


def test_accession_prefix_defaults() -> None:
    names = {SOUTH: "south"}
    assert accession_prefix_for(SOUTH, {}, names) == "SOUTH-"
    assert accession_prefix_for(SOUTH, {"1.3.6.1.4.1.21367.13.70.2": "S/"}, names) == "S/"
    assert accession_prefix_for("urn:oid:1.2.3.44", {}, names) == "44-"
    assert accession_prefix_for("URN:OID:1.3.6.1.4.1.21367.13.70.2", None, names) == "SOUTH-"


def test_sequences_of_the_source_are_not_shared_with_the_result() -> None:
    source = foreign_instance()
    source.OtherPatientIDsSequence = Sequence([Dataset()])
    source.OtherPatientIDsSequence[0].PatientID = "X"
    ds = reconcile(source, north(), now=WHEN).dataset
    ds.OtherPatientIDsSequence.append(Dataset())
    assert len(source.OtherPatientIDsSequence) == 1
