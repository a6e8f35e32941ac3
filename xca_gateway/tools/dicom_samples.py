"""Synthetic DICOM studies for the demo federation and tests.

Each community gets the same people under its own local patient ids and issuer OID, which is
exactly the situation XCA-I patient-id mapping has to handle. Everything is deterministic for
a given set of indexes so demo data is reproducible; pixel data is generated in pure Python
to avoid a numpy dependency.

Every instance carries a small private block (explicit VRs that a transcoding to Implicit VR
would lose), and each community has one study stored RLE Lossless compressed (encoded by
pydicom's own codec), so that every door can be checked byte for byte against the source,
compressed instances included.
"""

from __future__ import annotations

import random
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from xca_gateway.xds.kos import is_valid_uid

__all__ = [
    "DEFAULT_PATIENTS",
    "MODALITY_SOP_CLASSES",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "SamplePatient",
    "SampleStudy",
    "community_prefix",
    "generate_community_samples",
    "generate_study",
    "local_patient_id",
]

MANUFACTURER = "xca-gateway synthetic"
# The private block of every sample instance: group 0x0071, this creator (PS3.5 7.8.1).
PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "XCA-GATEWAY SYNTHETIC"

MODALITY_SOP_CLASSES: dict[str, str] = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
}

# Rotation used by generate_community_samples; body parts are DICOM PS3.16 Annex L terms.
_MODALITY_CYCLE = ("CT", "MR", "CR", "US")
_BODY_PARTS: dict[str, tuple[str, ...]] = {
    "CT": ("CHEST", "ABDOMEN", "HEAD"),
    "MR": ("BRAIN", "KNEE", "LSPINE"),
    "CR": ("CHEST", "HAND", "KNEE"),
    "US": ("ABDOMEN", "THYROID", "PELVIS"),
}
# (series, instances per series) small enough for fast demos, shaped like real studies.
_STUDY_SHAPE: dict[str, tuple[int, int]] = {"CT": (2, 3), "MR": (2, 3), "CR": (1, 2), "US": (1, 3)}
_REFERRERS = ("Berg^Ingrid", "Dahl^Per", "Lund^Sofie", "Moe^Anders")

# generate_uid appends a numeric suffix to "<root>." and caps the prefix at 54 characters.
_MAX_UID_ROOT_LEN = 53
_BITS_STORED = 12
# Study index (accession number suffix, seed) of each community's compressed study.
COMPRESSED_STUDY_INDEX = 9


@dataclass(frozen=True)
class SamplePatient:
    """A person; ``cross_community_key`` identifies them across communities."""

    cross_community_key: str
    family: str
    given: str
    birth_date: str  # YYYYMMDD
    sex: str  # M, F or O


@dataclass(frozen=True)
class SampleStudy:
    patient_id: str
    issuer_oid: str
    study_instance_uid: str
    accession_number: str
    study_date: str  # YYYYMMDD
    modality: str
    body_part: str
    description: str
    institution: str
    files: tuple[Path, ...]
    series_instance_uids: tuple[str, ...]
    # How the instances are stored (Explicit VR Little Endian, or RLE Lossless).
    transfer_syntax_uid: str = str(ExplicitVRLittleEndian)


DEFAULT_PATIENTS: tuple[SamplePatient, ...] = (
    SamplePatient("alice", "Lindqvist", "Alice", "19620314", "F"),
    SamplePatient("bob", "Haugen", "Bob", "19751102", "M"),
    SamplePatient("carol", "Berg", "Carol", "19880527", "F"),
    SamplePatient("dave", "Johansen", "Dave", "19490830", "M"),
)


def local_patient_id(community_index: int, patient_index: int) -> str:
    """Community-local MRN, e.g. ``C01-1001``; the community is part of the id, so the same
    person never shares an id across communities (as with real, independently issued MRNs)."""
    if community_index < 0 or patient_index < 0:
        raise ValueError("indexes must be non-negative")
    return f"C{community_index + 1:02d}-{(community_index + 1) * 1000 + patient_index + 1}"


def community_prefix(community_name: str) -> str:
    """Accession prefix: first three ASCII letters of the community name, upper-cased."""
    letters = "".join(ch for ch in community_name if ch.isascii() and ch.isalpha())
    if not letters:
        raise ValueError(f"community name has no letters: {community_name!r}")
    return letters[:3].upper()


def _check_uid_root(uid_root: str) -> None:
    if len(uid_root) > _MAX_UID_ROOT_LEN or not is_valid_uid(uid_root):
        raise ValueError(
            f"uid_root must be a valid UID of at most {_MAX_UID_ROOT_LEN} chars: {uid_root!r}"
        )


class _UidFactory:
    """Hash-derived UIDs when seeded (reproducible), random ones otherwise."""

    def __init__(self, prefix: str, entropy: list[str] | None) -> None:
        self._prefix = prefix
        self._entropy = entropy

    def make(self, *role: str) -> str:
        if self._entropy is None:
            return str(generate_uid(prefix=self._prefix))
        # Unambiguous separator: generate_uid just concatenates its entropy sources.
        return str(
            generate_uid(prefix=self._prefix, entropy_srcs=["\x1f".join([*self._entropy, *role])])
        )


def _uid_factory(uid_root: str, seed: int | None, context: Sequence[str]) -> _UidFactory:
    return _UidFactory(f"{uid_root}.", None if seed is None else [str(seed), *context])


def _pixel_bytes(rows: int, columns: int, phase: int) -> bytes:
    """Diagonal 12-bit gradient, shifted per instance so frames differ."""
    limit = 1 << _BITS_STORED
    row_step = max(1, limit // max(rows, 1))
    col_step = max(1, limit // max(columns, 1))
    pixels = array("H")
    for r in range(rows):
        base = r * row_step + phase
        pixels.extend([(base + c * col_step) % limit for c in range(columns)])
    if sys.byteorder == "big":
        pixels.byteswap()  # DICOM Explicit VR Little Endian
    return pixels.tobytes()


def _add_modality_attributes(
    ds: Dataset, modality: str, frame_of_reference_uid: str, instance_number: int
) -> None:
    if modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-160.0, -160.0, 5.0 * instance_number]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 5.0
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    elif modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 15.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
    elif modality in ("CR", "DX"):
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.BurnedInAnnotation = "NO"
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.PatientOrientation = ["L", "F"] if instance_number % 2 else ["P", "F"]
        ds.ViewPosition = "PA" if instance_number % 2 else "LL"
    elif modality == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]


def generate_study(
    out_dir: Path,
    *,
    patient: SamplePatient,
    patient_id: str,
    issuer_oid: str,
    modality: str,
    body_part: str,
    study_date: date,
    institution: str,
    accession_number: str,
    uid_root: str,
    series_count: int = 2,
    instances_per_series: int = 3,
    rows: int = 64,
    columns: int = 64,
    seed: int | None = None,
    transfer_syntax_uid: str = str(ExplicitVRLittleEndian),
) -> SampleStudy:
    """Write one synthetic study as ``<study uid>/<series uid>/<sop uid>.dcm`` under out_dir.

    With ``seed`` set, UIDs, times and pixels are reproducible; without it UIDs are random.
    ``transfer_syntax_uid``: Explicit VR Little Endian or RLE Lossless.
    """
    if transfer_syntax_uid not in (ExplicitVRLittleEndian, RLELossless):
        raise ValueError("transfer_syntax_uid must be Explicit VR Little Endian or RLE Lossless")
    modality = modality.upper()
    sop_class_uid = MODALITY_SOP_CLASSES.get(modality)
    if sop_class_uid is None:
        raise ValueError(f"unsupported modality {modality!r}; use {sorted(MODALITY_SOP_CLASSES)}")
    if series_count < 1 or instances_per_series < 1 or rows < 1 or columns < 1:
        raise ValueError("series_count, instances_per_series, rows and columns must be >= 1")
    _check_uid_root(uid_root)
    if not is_valid_uid(issuer_oid):
        raise ValueError(f"issuer_oid is not a valid OID: {issuer_oid!r}")

    rng = random.Random(seed)
    uids = _uid_factory(uid_root, seed, (issuer_oid, patient_id, accession_number))
    study_uid = uids.make("study")
    frame_of_reference_uid = uids.make("frame-of-reference")
    study_date_str = study_date.strftime("%Y%m%d")
    start_seconds = rng.randrange(7 * 3600, 17 * 3600)
    study_time = _hhmmss(start_seconds)
    description = f"{modality} {body_part.title()}"
    referrer = _REFERRERS[rng.randrange(len(_REFERRERS))]
    pixel_phase = rng.randrange(1 << _BITS_STORED)
    study_id = str(rng.randrange(1, 100_000))

    files: list[Path] = []
    series_uids: list[str] = []
    for series_index in range(series_count):
        series_uid = uids.make("series", str(series_index))
        series_uids.append(series_uid)
        series_dir = out_dir / study_uid / series_uid
        series_dir.mkdir(parents=True, exist_ok=True)
        for instance_index in range(instances_per_series):
            sop_uid = uids.make("instance", str(series_index), str(instance_index))
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names may be non-ASCII
            ds.SOPClassUID = sop_class_uid
            ds.SOPInstanceUID = sop_uid
            ds.Modality = modality

            ds.PatientName = f"{patient.family}^{patient.given}"
            ds.PatientID = patient_id
            ds.IssuerOfPatientID = issuer_oid
            qualifiers = Dataset()
            qualifiers.UniversalEntityID = issuer_oid
            qualifiers.UniversalEntityIDType = "ISO"
            ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
            ds.PatientBirthDate = patient.birth_date
            ds.PatientSex = patient.sex

            ds.StudyInstanceUID = study_uid
            ds.StudyDate = study_date_str
            ds.StudyTime = study_time
            ds.StudyID = study_id
            ds.AccessionNumber = accession_number
            ds.StudyDescription = description
            ds.ReferringPhysicianName = referrer

            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = series_index + 1
            ds.SeriesDescription = f"{description} series {series_index + 1}"
            ds.SeriesDate = study_date_str
            ds.SeriesTime = _hhmmss(start_seconds + 60 * series_index)
            ds.BodyPartExamined = body_part
            ds.InstanceNumber = instance_index + 1
            ds.ContentDate = study_date_str
            ds.ContentTime = _hhmmss(start_seconds + 60 * series_index + instance_index)

            ds.InstitutionName = institution
            ds.Manufacturer = MANUFACTURER
            ds.ManufacturerModelName = "sample generator"

            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = rows
            ds.Columns = columns
            ds.BitsAllocated = 16
            ds.BitsStored = _BITS_STORED
            ds.HighBit = _BITS_STORED - 1
            ds.PixelRepresentation = 0
            _add_modality_attributes(ds, modality, frame_of_reference_uid, instance_index + 1)
            _add_private_block(ds, series_index, instance_index)
            ds.PixelData = _pixel_bytes(
                rows,
                columns,
                pixel_phase + 97 * (series_index * instances_per_series + instance_index),
            )

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(sop_class_uid)
            meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            if transfer_syntax_uid == RLELossless:
                # pydicom's own RLE encoder (no numpy needed); same SOP Instance UID.
                ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
            path = series_dir / f"{sop_uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)

    return SampleStudy(
        patient_id=patient_id,
        issuer_oid=issuer_oid,
        study_instance_uid=study_uid,
        accession_number=accession_number,
        study_date=study_date_str,
        modality=modality,
        body_part=body_part,
        description=description,
        institution=institution,
        files=tuple(files),
        series_instance_uids=tuple(series_uids),
        transfer_syntax_uid=str(transfer_syntax_uid),
    )


def _add_private_block(ds: Dataset, series_index: int, instance_index: int) -> None:
    """Private attributes of several VRs, a sequence among them: in Explicit VR they keep
    their VR; a detour through Implicit VR turns them into UN."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", "synthetic sample")
    block.add_new(0x11, "DS", "1.50")
    block.add_new(0x12, "US", 100 * series_index + instance_index)
    block.add_new(0x13, "FD", 0.25)
    item = Dataset()
    item.add_new(0x00710010, "LO", PRIVATE_CREATOR)
    item.add_new(0x00711020, "SH", f"ITEM{instance_index + 1}")
    block.add_new(0x14, "SQ", [item])


def _hhmmss(seconds: int) -> str:
    seconds %= 24 * 3600
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def generate_community_samples(
    out_dir: Path,
    *,
    community_index: int,
    community_name: str,
    issuer_oid: str,
    uid_root: str,
    patients: Sequence[SamplePatient] = DEFAULT_PATIENTS,
    institution: str | None = None,
) -> list[SampleStudy]:
    """Write 1-2 studies per patient for one community, and one more for the first patient
    stored RLE Lossless compressed (last in the list); reproducible from the indexes.

    Every patient gets at least one study, so anyone listed in several communities has
    studies in each of them under a different local patient id.
    """
    if community_index < 0:
        raise ValueError("community_index must be non-negative")
    prefix = community_prefix(community_name)
    institution = (
        institution or f"{community_name[:1].upper()}{community_name[1:]} Regional Hospital"
    )
    studies: list[SampleStudy] = []
    for patient_index, patient in enumerate(patients):
        study_count = 1 + (community_index + patient_index) % 2
        for study_index in range(study_count):
            modality = _MODALITY_CYCLE[
                (community_index + 2 * patient_index + study_index) % len(_MODALITY_CYCLE)
            ]
            parts = _BODY_PARTS[modality]
            body_part = parts[(community_index + patient_index + study_index) % len(parts)]
            day_offset = (community_index * 401 + patient_index * 157 + study_index * 613) % 3000
            series_count, instances = _STUDY_SHAPE[modality]
            studies.append(
                generate_study(
                    out_dir,
                    patient=patient,
                    patient_id=local_patient_id(community_index, patient_index),
                    issuer_oid=issuer_oid,
                    modality=modality,
                    body_part=body_part,
                    study_date=date(2016, 1, 4) + timedelta(days=day_offset),
                    institution=institution,
                    accession_number=(
                        f"{prefix}{community_index:02d}{patient_index:03d}{study_index + 1}"
                    ),
                    uid_root=uid_root,
                    series_count=series_count,
                    instances_per_series=instances,
                    seed=community_index * 100_000 + patient_index * 100 + study_index,
                )
            )
    if patients:
        # The first patient's compressed study: a modality none of their others has.
        modality = _MODALITY_CYCLE[(community_index + 2) % len(_MODALITY_CYCLE)]
        series_count, instances = _STUDY_SHAPE[modality]
        studies.append(
            generate_study(
                out_dir,
                patient=patients[0],
                patient_id=local_patient_id(community_index, 0),
                issuer_oid=issuer_oid,
                modality=modality,
                body_part=_BODY_PARTS[modality][community_index % len(_BODY_PARTS[modality])],
                study_date=date(2016, 1, 4) + timedelta(days=(community_index * 401 + 1777) % 3000),
                institution=institution,
                accession_number=f"{prefix}{community_index:02d}{0:03d}{COMPRESSED_STUDY_INDEX}",
                uid_root=uid_root,
                series_count=series_count,
                instances_per_series=instances,
                seed=community_index * 100_000 + COMPRESSED_STUDY_INDEX,
                transfer_syntax_uid=str(RLELossless),
            )
        )
    return studies
