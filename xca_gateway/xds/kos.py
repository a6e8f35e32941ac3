"""IHE XDS-I.b imaging manifest: DICOM Key Object Selection (KOS) documents.

An XDS-I.b Imaging Document Source publishes one KOS per study (RAD-68). Consumers read the
Current Requested Procedure Evidence Sequence to learn which instances exist and, through each
series' Retrieve Location UID, which Imaging Document Source (repositoryUniqueId) serves them
via RAD-69 / XCA-I.

Sans-IO: everything here works on in-memory datasets and bytes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = [
    "KOS_SOP_CLASS_UID",
    "InstanceRef",
    "build_kos",
    "is_valid_uid",
    "kos_from_bytes",
    "kos_references",
    "kos_retrieve_locations",
    "kos_to_bytes",
]

KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"

# PS3.5 §9.1: digits and dots, no empty or zero-padded components, at most 64 chars.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# Series number for manifests: kept out of the range scanners normally use so a KO series does
# not collide with image series numbering in viewers.
_KOS_SERIES_NUMBER = 9999

# Non-image storage SOP class roots; their references must be COMPOSITE content items rather
# than IMAGE (TID 2010 allows both). Anything not listed is treated as an image.
_NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured reports, KOS
    "1.2.840.10008.5.1.4.1.1.11.",  # Presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # Waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.66",  # Raw data, registration, segmentation-free surfaces
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
)

_PATIENT_STUDY_KEYWORDS = (
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
    # Type 3, but what a clinician reads first in a study list (IID launch page).
    "StudyDescription",
)
# Type 2 attributes of the Patient / General Study modules: must be present, possibly empty.
_TYPE2_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    }
)


@dataclass(frozen=True)
class InstanceRef:
    """One SOP instance referenced by a manifest."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def is_valid_uid(value: str) -> bool:
    """True if ``value`` is a syntactically valid DICOM UID / ISO OID."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _required_uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise ValueError(f"instance is missing {keyword}")
    return str(value)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _sop_ref(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _collect_refs(instances: Sequence[Dataset]) -> list[InstanceRef]:
    refs: list[InstanceRef] = []
    seen: dict[str, InstanceRef] = {}
    for ds in instances:
        ref = InstanceRef(
            study_instance_uid=_required_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_required_uid(ds, "SeriesInstanceUID"),
            sop_class_uid=_required_uid(ds, "SOPClassUID"),
            sop_instance_uid=_required_uid(ds, "SOPInstanceUID"),
        )
        previous = seen.get(ref.sop_instance_uid)
        if previous is not None:
            # The same file listed twice is harmless; the same UID with different identity is
            # corrupt input and would produce a manifest consumers cannot resolve.
            if previous != ref:
                raise ValueError(f"conflicting references for SOP instance {ref.sop_instance_uid}")
            continue
        seen[ref.sop_instance_uid] = ref
        refs.append(ref)
    studies = {r.study_instance_uid for r in refs}
    if len(studies) != 1:
        raise ValueError(f"a KOS manifest covers exactly one study, got {len(studies)}")
    return refs


def _check_same_patient(instances: Sequence[Dataset]) -> None:
    for keyword in ("PatientID", "IssuerOfPatientID"):
        values = {str(ds.get(keyword, "")) for ds in instances}
        if len(values) > 1:
            raise ValueError(f"instances disagree on {keyword}: {sorted(values)}")


def _issuer_qualifiers(first: Dataset) -> list[Dataset] | None:
    seq = first.get("IssuerOfPatientIDQualifiersSequence")
    if not seq:
        return None
    src = seq[0]
    entity_id = src.get("UniversalEntityID")
    if not entity_id:
        return None
    item = Dataset()
    item.UniversalEntityID = str(entity_id)
    item.UniversalEntityIDType = str(src.get("UniversalEntityIDType") or "ISO")
    return [item]


def _format_content_datetime(ds: Dataset, when: datetime) -> None:
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    offset = when.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        hours, mins = divmod(abs(minutes), 60)
        ds.TimezoneOffsetFromUTC = f"{sign}{hours:02d}{mins:02d}"


def _evidence_sequence(
    refs: Sequence[InstanceRef],
    repository_unique_id: str,
    retrieve_ae_title: str | None,
    retrieve_url: str | None,
) -> list[Dataset]:
    by_series: dict[str, list[InstanceRef]] = {}
    for ref in refs:
        by_series.setdefault(ref.series_instance_uid, []).append(ref)
    series_items: list[Dataset] = []
    for series_uid, members in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        # RetrieveLocationUID is how XDS-I.b names the Imaging Document Source holding the series.
        series.RetrieveLocationUID = repository_unique_id
        if retrieve_ae_title is not None:
            series.RetrieveAETitle = retrieve_ae_title
        if retrieve_url is not None:
            series.RetrieveURL = retrieve_url
        series.ReferencedSOPSequence = [
            _sop_ref(m.sop_class_uid, m.sop_instance_uid) for m in members
        ]
        series_items.append(series)
    study = Dataset()
    study.StudyInstanceUID = refs[0].study_instance_uid
    study.ReferencedSeriesSequence = series_items
    return [study]


def _content_item(ref: InstanceRef) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    is_image = not ref.sop_class_uid.startswith(_NON_IMAGE_SOP_CLASS_PREFIXES)
    item.ValueType = "IMAGE" if is_image else "COMPOSITE"
    item.ReferencedSOPSequence = [_sop_ref(ref.sop_class_uid, ref.sop_instance_uid)]
    return item


def _referenced_request(first: Dataset, study_uid: str) -> list[Dataset]:
    # Key Object Document module: identifies the order the manifest fulfils; IHE expects the
    # accession number here when one exists. Other fields are Type 2, left empty.
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = str(first.AccessionNumber)
    item.ReferencedStudySequence = []
    item.RequestedProcedureID = ""
    item.RequestedProcedureDescription = ""
    item.RequestedProcedureCodeSequence = []
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    return [item]


def build_kos(
    instances: Sequence[Dataset],
    *,
    repository_unique_id: str,
    retrieve_ae_title: str | None = None,
    retrieve_url: str | None = None,
    institution_name: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> Dataset:
    """Build an XDS-I.b manifest (KOS, TID 2010) referencing ``instances`` of one study.

    Raises ValueError for empty input, instances from several studies or patients, missing
    UIDs, or an invalid ``repository_unique_id``.
    """
    if not instances:
        raise ValueError("cannot build a KOS manifest without instances")
    if not is_valid_uid(repository_unique_id):
        raise ValueError(f"repository_unique_id is not a valid UID: {repository_unique_id!r}")
    refs = _collect_refs(instances)
    _check_same_patient(instances)
    first = instances[0]

    ds = Dataset()
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SOPClassUID = KOS_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_instance_uid or generate_uid(prefix=None)

    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
        elif keyword in _TYPE2_KEYWORDS:
            setattr(ds, keyword, "")
    qualifiers = _issuer_qualifiers(first)
    if qualifiers is not None:
        ds.IssuerOfPatientIDQualifiersSequence = qualifiers

    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid(prefix=None)
    ds.SeriesNumber = _KOS_SERIES_NUMBER
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "xca-gateway"
    if institution_name is not None:
        ds.InstitutionName = institution_name

    ds.InstanceNumber = 1
    _format_content_datetime(ds, content_datetime or datetime.now(UTC))
    if str(first.get("AccessionNumber", "")):
        ds.ReferencedRequestSequence = _referenced_request(first, refs[0].study_instance_uid)
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence_sequence(
        refs, repository_unique_id, retrieve_ae_title, retrieve_url
    )

    # SR Document Content: root CONTAINER titled "Manifest" per IHE XDS-I.b / TID 2010.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("113030", "DCM", "Manifest")]
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = [template]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = [_content_item(ref) for ref in refs]
    return ds


def kos_references(kos: Dataset) -> list[InstanceRef]:
    """Return every instance in the manifest's Current Requested Procedure Evidence Sequence."""
    if "CurrentRequestedProcedureEvidenceSequence" not in kos:
        raise ValueError("dataset has no CurrentRequestedProcedureEvidenceSequence")
    refs: list[InstanceRef] = []
    for study in kos.CurrentRequestedProcedureEvidenceSequence:
        study_uid = str(study.StudyInstanceUID)
        for series in study.get("ReferencedSeriesSequence", []):
            series_uid = str(series.SeriesInstanceUID)
            for sop in series.get("ReferencedSOPSequence", []):
                refs.append(
                    InstanceRef(
                        study_instance_uid=study_uid,
                        series_instance_uid=series_uid,
                        sop_class_uid=str(sop.ReferencedSOPClassUID),
                        sop_instance_uid=str(sop.ReferencedSOPInstanceUID),
                    )
                )
    return refs


def kos_retrieve_locations(kos: Dataset) -> dict[str, str]:
    """Map SeriesInstanceUID to RetrieveLocationUID (the source's repositoryUniqueId)."""
    locations: dict[str, str] = {}
    for study in kos.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            location = series.get("RetrieveLocationUID")
            if location:
                locations[str(series.SeriesInstanceUID)] = str(location)
    return locations


def kos_to_bytes(ds: Dataset) -> bytes:
    """Encode as a DICOM Part-10 file (Explicit VR Little Endian), as RAD-68 requires."""
    out = copy.deepcopy(ds)  # keep the caller's dataset free of our file meta
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta = meta
    buf = BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def kos_from_bytes(data: bytes) -> Dataset:
    """Parse a Part-10 KOS; ValueError if it is not DICOM or not a KOS."""
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError) as exc:
        raise ValueError(f"not a DICOM Part-10 file: {exc}") from exc
    if str(ds.get("SOPClassUID", "")) != KOS_SOP_CLASS_UID:
        raise ValueError(f"not a Key Object Selection document: {ds.get('SOPClassUID')}")
    return ds
