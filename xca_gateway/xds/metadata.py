"""XDS metadata for imaging manifests (XDS-I.b KOS), sans-IO.

Builds what an Imaging Document Source registers for one study (ITI TF-3 4.2.3, RAD TF-3
4.68.4.1.2.3): a DocumentEntry (``rim:ExtrinsicObject``) for the KOS manifest, a SubmissionSet
(``rim:RegistryPackage``) with its classification and HasMember association, all inside an
``lcm:SubmitObjectsRequest`` (the ITI-42 Register Document Set-b payload).

The study facts come from DICOM headers (:func:`imaging_study_from_datasets`); the affinity
domain's codes are configurable (:class:`ManifestOptions`) with imaging defaults. HL7 v2 data
types (CX, CXi, XCN, XPN, XON, DTM) are formatted here, with their delimiters escaped.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lxml import etree
from pydantic import Field
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from xca_gateway.protocol.namespaces import LCM, RIM
from xca_gateway.schema import NonEmpty, Oid, Section
from xca_gateway.xds import ebrim

__all__ = [
    "CONFIDENTIALITY_SYSTEM",
    "DCM_SYSTEM",
    "LOINC",
    "SNOMED_CT",
    "Code",
    "ImagingStudy",
    "ManifestDocument",
    "ManifestMetadataError",
    "ManifestOptions",
    "Submission",
    "body_part_code",
    "build_document_entry",
    "build_submission_set",
    "build_submit_objects_request",
    "cx",
    "dtm",
    "escape_hl7",
    "imaging_study_from_datasets",
    "modality_code",
    "parse_manifest_options",
    "xds_patient_ids",
]

LOINC = "2.16.840.1.113883.6.1"
SNOMED_CT = "2.16.840.1.113883.6.96"
DCM_SYSTEM = "1.2.840.10008.2.16.4"  # DICOM Controlled Terminology (PS3.16)
CONFIDENTIALITY_SYSTEM = "2.16.840.1.113883.5.25"  # HL7 v3 Confidentiality

STUDY_INSTANCE_UID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"
ACCESSION_TYPE = "urn:ihe:iti:xds:2013:accession"
SUBMISSION_SET_STATUS = "SubmissionSetStatus"
# Used as authorPerson when neither the configuration nor the DICOM headers name one; ITI TF-3
# allows authorPerson to identify the machine that authored the document.
DEFAULT_AUTHOR_PERSON = "^Imaging Document Source"


class ManifestMetadataError(ValueError):
    """The DICOM input cannot be described by valid XDS metadata (e.g. foreign patient id)."""


@dataclass(frozen=True)
class Code:
    code: str
    scheme: str  # codingScheme: the OID of the code system
    display_name: str


# DICOM CID 29 (acquisition modality) meanings for the usual modalities.
_MODALITY_MEANINGS: dict[str, str] = {
    "BMD": "Bone Mineral Densitometry",
    "CR": "Computed Radiography",
    "CT": "Computed Tomography",
    "DX": "Digital Radiography",
    "ES": "Endoscopy",
    "IO": "Intra-oral Radiography",
    "IVUS": "Intravascular Ultrasound",
    "MG": "Mammography",
    "MR": "Magnetic Resonance",
    "NM": "Nuclear Medicine",
    "OCT": "Optical Coherence Tomography",
    "OP": "Ophthalmic Photography",
    "PT": "Positron emission tomography",
    "PX": "Panoramic X-Ray",
    "RF": "Radiofluoroscopy",
    "RG": "Radiographic imaging",
    "SM": "Slide Microscopy",
    "US": "Ultrasound",
    "XA": "X-Ray Angiography",
    "XC": "External-camera Photography",
}
# Non-acquisition modalities (derived objects) say nothing about the imaging event.
_NON_EVENT_MODALITIES = frozenset({"KO", "PR", "SR", "DOC", "REG", "SEG", "RWV", "PLAN", "OT"})

# DICOM PS3.16 Annex L: Body Part Examined defined terms -> SNOMED CT concepts.
_BODY_PARTS: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ANKLE": ("70258002", "Ankle joint"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "COCCYX": ("64688005", "Coccyx"),
    "CSPINE": ("122494005", "Cervical spine"),
    "ELBOW": ("16953009", "Elbow joint"),
    "EXTREMITY": ("66019005", "Extremity"),
    "FOOT": ("56459004", "Foot"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "KIDNEY": ("64033007", "Kidney"),
    "KNEE": ("72696002", "Knee"),
    "LIVER": ("10200004", "Liver"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LUNG": ("39607008", "Lung"),
    "NECK": ("45048000", "Neck"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PELVIS": ("816092008", "Pelvis"),
    "PROSTATE": ("41216001", "Prostate"),
    "SACRUM": ("54735007", "Sacrum"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "THYROID": ("69748006", "Thyroid"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
}


def modality_code(modality: str) -> Code | None:
    """eventCodeList entry for a DICOM Modality (DCM, CID 29), None for derived objects."""
    value = modality.strip().upper()
    if not value or value in _NON_EVENT_MODALITIES:
        return None
    return Code(value, DCM_SYSTEM, _MODALITY_MEANINGS.get(value, value))


def body_part_code(body_part: str) -> Code | None:
    """eventCodeList entry (SNOMED CT) for a Body Part Examined defined term, if known."""
    found = _BODY_PARTS.get(body_part.strip().upper())
    return Code(found[0], SNOMED_CT, found[1]) if found else None


@dataclass(frozen=True)
class ManifestOptions:
    """Affinity-domain choices for imaging manifests, the ``[repository.manifest]`` table."""

    class_code: Code = Code("18726-0", LOINC, "Radiology studies (set)")
    type_code: Code = Code("18748-4", LOINC, "Diagnostic imaging study")
    practice_setting_code: Code = Code("394914008", SNOMED_CT, "Radiology")
    healthcare_facility_type_code: Code = Code("22232009", SNOMED_CT, "Hospital")
    confidentiality_code: Code = Code("N", CONFIDENTIALITY_SYSTEM, "normal")
    content_type_code: Code = Code("18748-4", LOINC, "Diagnostic imaging study")
    format_code: Code = Code(
        ebrim.KOS_FORMAT_CODE, ebrim.DICOM_UID_REGISTRY, "Key Object Selection Document"
    )
    language_code: str = "en-US"
    # authorInstitution: the name defaults to the DICOM InstitutionName; the OID is optional.
    author_institution: str | None = None
    author_institution_oid: str | None = None
    # authorPerson as an XCN; default: PerformingPhysicianName, OperatorsName, then a device.
    author_person: str | None = None
    # XDSSubmissionSet.sourceId; default: the repositoryUniqueId.
    source_id: str | None = None
    # IANA time zone of DICOM dates/times without TimezoneOffsetFromUTC; None: this host's.
    timezone: str | None = None
    # Assigning authority of accession numbers when the DICOM carries no issuer;
    # default: the community's patient identifier assigning authority.
    accession_number_issuer: str | None = None
    # KOS content: where the instances are retrieved (RAD-69 Imaging Document Source OID,
    # default the repositoryUniqueId), and optional DICOM AE title / WADO-RS URL.
    imaging_source_id: str | None = None
    retrieve_ae_title: str | None = None
    retrieve_url: str | None = None

    def tz(self) -> tzinfo | None:
        return ZoneInfo(self.timezone) if self.timezone else None


class CodeSection(Section):
    """A coded value of XDS metadata."""

    INLINE = True

    code: NonEmpty = Field(description="The code.")
    scheme: NonEmpty = Field(description="codingScheme: the OID of the code system.")
    display_name: NonEmpty = Field(description="Its display name.")


def _code(name: str, description: str) -> Any:
    default = getattr(ManifestOptions(), name)
    return Field(
        CodeSection(code=default.code, scheme=default.scheme, display_name=default.display_name),
        description=description,
    )


class ManifestSection(Section):
    """XDS metadata of the imaging manifests (KOS) made of imported studies: the affinity
    domain's codes, the author, and where the KOS says the images are retrieved."""

    class_code: CodeSection = _code("class_code", "classCode of the manifests.")
    type_code: CodeSection = _code("type_code", "typeCode of the manifests.")
    practice_setting_code: CodeSection = _code("practice_setting_code", "practiceSettingCode.")
    healthcare_facility_type_code: CodeSection = _code(
        "healthcare_facility_type_code", "healthcareFacilityTypeCode."
    )
    confidentiality_code: CodeSection = _code("confidentiality_code", "confidentialityCode.")
    content_type_code: CodeSection = _code(
        "content_type_code", "contentTypeCode of the submission set."
    )
    format_code: CodeSection = _code("format_code", "formatCode (the KOS format).")
    language_code: NonEmpty = Field("en-US", description="languageCode.")
    author_institution: NonEmpty | None = Field(
        None,
        description="authorInstitution name (default: the DICOM InstitutionName).",
        examples=["North Hospital"],
    )
    author_institution_oid: Oid | None = Field(
        None, description="Its OID.", examples=["1.3.6.1.4.1.21367.13.40.1"]
    )
    author_person: NonEmpty | None = Field(
        None,
        description=(
            "authorPerson as an XCN (default: PerformingPhysicianName, OperatorsName, then a"
            " device)."
        ),
        examples=["^Smith^Jane"],
    )
    source_id: Oid | None = Field(
        None,
        description="XDSSubmissionSet.sourceId (default: the repositoryUniqueId).",
        examples=["1.3.6.1.4.1.21367.13.80.1"],
    )
    timezone: NonEmpty | None = Field(
        None,
        description=(
            "IANA time zone of DICOM dates/times without TimezoneOffsetFromUTC (default: this"
            " host's)."
        ),
        examples=["Europe/Berlin"],
    )
    accession_number_issuer: Oid | None = Field(
        None,
        description=(
            "Assigning authority of accession numbers when the DICOM carries no issuer"
            " (default: the community's patient identifier domain)."
        ),
        examples=["1.3.6.1.4.1.21367.13.20.1000"],
    )
    imaging_source_id: Oid | None = Field(
        None,
        description=(
            "Where the KOS says the instances are retrieved: the RAD-69 Imaging Document"
            " Source (default: the repositoryUniqueId)."
        ),
        examples=["1.3.6.1.4.1.21367.13.81.1"],
    )
    retrieve_ae_title: NonEmpty | None = Field(
        None, description="...a DICOM AE title to retrieve them from.", examples=["PACS"]
    )
    retrieve_url: NonEmpty | None = Field(
        None,
        description="...a WADO-RS URL to retrieve them from.",
        examples=["https://pacs.north.example.org/dicom-web"],
    )


_CODE_FIELDS = frozenset(
    f.name
    for f in fields(ManifestOptions)
    if f.name.endswith("_code") and f.name != "language_code"
)
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def parse_manifest_options(table: Mapping[str, Any]) -> ManifestOptions:
    """Parse ``[repository.manifest]``; codes are tables ``{code, scheme, display_name}``."""
    known = {f.name for f in fields(ManifestOptions)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name in _CODE_FIELDS:
            if not isinstance(value, Mapping) or set(value) != {"code", "scheme", "display_name"}:
                raise ValueError(f"{name} must be a table with code, scheme and display_name")
            if not all(isinstance(v, str) and v for v in value.values()):
                raise ValueError(f"{name}: code, scheme and display_name must be non-empty")
            values[name] = Code(value["code"], value["scheme"], value["display_name"])
        else:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
            values[name] = value
    for name in ("author_institution_oid", "source_id", "accession_number_issuer"):
        if name in values and not _OID_RE.match(values[name]):
            raise ValueError(f"{name}: {values[name]!r} is not an OID")
    if "imaging_source_id" in values and not _OID_RE.match(values["imaging_source_id"]):
        raise ValueError(f"imaging_source_id: {values['imaging_source_id']!r} is not an OID")
    options = replace(ManifestOptions(), **values)
    if options.timezone:
        try:
            options.tz()
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown time zone {options.timezone!r}") from None
    return options


# ------------------------------------------------------------------------------ HL7 v2 types

_HL7_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def escape_hl7(value: str) -> str:
    """Escape HL7 v2 delimiters inside one component (ITI TF-3 uses the default set)."""
    return "".join(_HL7_ESCAPES.get(c, c) for c in value)


def cx(identifier: str, assigning_authority_oid: str) -> str:
    """CX patient identifier ``id^^^&OID&ISO`` (ITI TF-3 Table 4.2.3.1.7-2)."""
    return f"{escape_hl7(identifier)}^^^&{assigning_authority_oid}&ISO"


def _pn_components(person_name: str) -> list[str]:
    # DICOM PN: alphabetic=ideographic=phonetic groups; the alphabetic group comes first.
    alphabetic = person_name.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    return (parts + [""] * 5)[:5]  # family, given, middle, prefix, suffix


def _join_trimmed(components: Sequence[str]) -> str:
    items = list(components)
    while items and not items[-1]:
        items.pop()
    return "^".join(items)


def xpn_from_pn(person_name: str) -> str:
    family, given, middle, prefix, suffix = (escape_hl7(c) for c in _pn_components(person_name))
    return _join_trimmed([family, given, middle, suffix, prefix])


def xcn_from_pn(person_name: str) -> str:
    family, given, middle, prefix, suffix = (escape_hl7(c) for c in _pn_components(person_name))
    return _join_trimmed(["", family, given, middle, suffix, prefix])


def xon(name: str, oid: str | None = None) -> str:
    """XON organisation; with an OID it goes to XON.10 (ITI TF-3 authorInstitution)."""
    if oid:
        return f"{escape_hl7(name)}^^^^^^^^^{oid}"
    return escape_hl7(name)


def dtm(moment: datetime) -> str:
    """XDS DTM in UTC, to the second."""
    if moment.tzinfo is None:
        raise ValueError("XDS times must be timezone-aware (they are expressed in UTC)")
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")


# ------------------------------------------------------------------------- study from DICOM


@dataclass(frozen=True)
class ImagingStudy:
    """What the XDS metadata of a study's manifest is derived from (one patient, one study)."""

    study_instance_uid: str
    patient_id: str
    patient_id_issuer: str | None  # OID from the DICOM header, if any
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    timezone_offset: str = ""  # TimezoneOffsetFromUTC, e.g. "+0100"
    study_description: str = ""
    accession_number: str = ""
    accession_number_issuer: str | None = None
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    institution_name: str = ""
    author_person_names: tuple[str, ...] = ()  # DICOM PN values, best first
    instance_count: int = 0
    series_count: int = 0


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def _text(ds: Dataset, keyword: str) -> str:
    values = _values(ds, keyword)
    return values[0] if values else ""


def _issuer_oid(ds: Dataset) -> str | None:
    for item in ds.get("IssuerOfPatientIDQualifiersSequence", []) or []:
        entity = str(item.get("UniversalEntityID", "")).strip()
        kind = str(item.get("UniversalEntityIDType", "ISO")).strip() or "ISO"
        if entity and kind == "ISO" and _OID_RE.match(entity):
            return entity
    issuer = _text(ds, "IssuerOfPatientID")
    return issuer if _OID_RE.match(issuer) else None


def _accession_issuer(ds: Dataset) -> str | None:
    for item in ds.get("IssuerOfAccessionNumberSequence", []) or []:
        entity = str(item.get("UniversalEntityID", "")).strip()
        if entity and _OID_RE.match(entity):
            return entity
    return None


def imaging_study_from_datasets(datasets: Sequence[Dataset]) -> ImagingStudy:
    """Summarise the instances of one study (headers are enough; pixels are not read)."""
    if not datasets:
        raise ManifestMetadataError("a study needs at least one instance")
    first = datasets[0]
    study_uid = _text(first, "StudyInstanceUID")
    if not study_uid:
        raise ManifestMetadataError("instance without StudyInstanceUID")
    patient_id = _text(first, "PatientID")
    if not patient_id:
        raise ManifestMetadataError(f"study {study_uid} has no PatientID")
    modalities: list[str] = []
    body_parts: list[str] = []
    series: set[str] = set()
    authors: list[str] = []
    for ds in datasets:
        if _text(ds, "StudyInstanceUID") != study_uid:
            raise ManifestMetadataError("instances of several studies given as one study")
        series.add(_text(ds, "SeriesInstanceUID"))
        for keyword, bucket in (("Modality", modalities), ("BodyPartExamined", body_parts)):
            value = _text(ds, keyword).upper()
            if value and value not in bucket:
                bucket.append(value)
        for keyword in ("PerformingPhysicianName", "OperatorsName"):
            for name in _values(ds, keyword):
                if name not in authors:
                    authors.append(name)
    return ImagingStudy(
        study_instance_uid=study_uid,
        patient_id=patient_id,
        patient_id_issuer=_issuer_oid(first),
        patient_name=str(first.get("PatientName", "") or ""),
        patient_birth_date=_text(first, "PatientBirthDate"),
        patient_sex=_text(first, "PatientSex").upper(),
        study_date=_text(first, "StudyDate"),
        study_time=_text(first, "StudyTime"),
        timezone_offset=_text(first, "TimezoneOffsetFromUTC"),
        study_description=_text(first, "StudyDescription"),
        accession_number=_text(first, "AccessionNumber"),
        accession_number_issuer=_accession_issuer(first),
        modalities=tuple(modalities),
        body_parts=tuple(body_parts),
        institution_name=_text(first, "InstitutionName"),
        author_person_names=tuple(authors),
        instance_count=len(datasets),
        series_count=len(series),
    )


def _parse_offset(value: str) -> tzinfo | None:
    m = re.fullmatch(r"([+-])(\d{2})(\d{2})", value.strip())
    if not m:
        return None
    delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return timezone(-delta if m.group(1) == "-" else delta)


def service_start_time(study: ImagingStudy, default_tz: tzinfo | None) -> str | None:
    """StudyDate/StudyTime as an XDS DTM in UTC, at the precision DICOM gave (None if absent).

    DICOM times are local: TimezoneOffsetFromUTC wins, else ``default_tz``, else this host's
    zone. A date without a time stays a date (no conversion is possible).
    """
    date = study.study_date.replace(".", "")  # ACR-NEMA style YYYY.MM.DD still appears
    if not re.fullmatch(r"\d{8}", date):
        return None
    time = study.study_time.replace(":", "").split(".")[0]
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2})?)?", time):
        return date
    precision = len(time)
    padded = (time + "0000")[:6]
    try:
        local = datetime.strptime(date + padded, "%Y%m%d%H%M%S")
    except ValueError:
        return date
    tz = _parse_offset(study.timezone_offset) or default_tz
    aware = local.replace(tzinfo=tz) if tz is not None else local.astimezone()
    return aware.astimezone(UTC).strftime("%Y%m%d%H%M%S")[: 8 + precision]


def xds_patient_ids(study: ImagingStudy, affinity_domain: str) -> tuple[str, str]:
    """(patientId, sourcePatientId) as CX.

    The DocumentEntry patientId must be in the affinity domain. A DICOM PatientID whose
    issuer is another OID would need PIX cross-referencing, which the importer does not do.
    """
    issuer = study.patient_id_issuer or affinity_domain
    if issuer != affinity_domain:
        raise ManifestMetadataError(
            f"patient {study.patient_id} belongs to the identifier domain {issuer}, not to "
            f"this community's {affinity_domain} (no PIX mapping configured)"
        )
    value = cx(study.patient_id, issuer)
    return value, value


# ------------------------------------------------------------------------------ ebRIM output


@dataclass(frozen=True)
class ManifestDocument:
    """The stored KOS as the repository knows it."""

    unique_id: str  # the KOS SOP Instance UID
    repository_unique_id: str
    size: int
    sha1: str
    creation_time: datetime
    mime_type: str = ebrim.KOS_MIME_TYPE


def _uuid_urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _new_uid() -> str:
    # PS3.5 B.2: a UUID as a UID under 2.25.
    return f"2.25.{uuid.uuid4().int}"


def _slot(parent: etree._Element, name: str, values: Iterable[str]) -> None:
    slot = etree.SubElement(parent, f"{{{RIM}}}Slot", name=name)
    value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
    for value in values:
        etree.SubElement(value_list, f"{{{RIM}}}Value").text = value


def _name(parent: etree._Element, text: str) -> None:
    name = etree.SubElement(parent, f"{{{RIM}}}Name")
    etree.SubElement(name, f"{{{RIM}}}LocalizedString", value=text[:1024])


def _classification(
    parent: etree._Element,
    scheme: str,
    classified: str,
    node_representation: str,
    *,
    slots: Sequence[tuple[str, Sequence[str]]] = (),
    name: str | None = None,
) -> None:
    element = etree.SubElement(
        parent,
        f"{{{RIM}}}Classification",
        id=_uuid_urn(),
        objectType=ebrim.OBJECT_TYPE_CLASSIFICATION,
        classificationScheme=scheme,
        classifiedObject=classified,
        nodeRepresentation=node_representation,
    )
    for slot_name, values in slots:
        _slot(element, slot_name, values)
    if name is not None:
        _name(element, name)


def _coded(parent: etree._Element, scheme: str, classified: str, code: Code) -> None:
    _classification(
        parent,
        scheme,
        classified,
        code.code,
        slots=[("codingScheme", [code.scheme])],
        name=code.display_name,
    )


def _external_identifier(
    parent: etree._Element, scheme: str, registry_object: str, value: str, name: str
) -> None:
    element = etree.SubElement(
        parent,
        f"{{{RIM}}}ExternalIdentifier",
        id=_uuid_urn(),
        objectType=ebrim.OBJECT_TYPE_EXTERNAL_IDENTIFIER,
        identificationScheme=scheme,
        registryObject=registry_object,
        value=value,
    )
    _name(element, name)


def _author_slots(study: ImagingStudy, options: ManifestOptions) -> list[tuple[str, Sequence[str]]]:
    person = options.author_person
    if person is None:
        person = (
            xcn_from_pn(study.author_person_names[0])
            if study.author_person_names
            else DEFAULT_AUTHOR_PERSON
        )
    slots: list[tuple[str, Sequence[str]]] = [("authorPerson", [person])]
    institution = options.author_institution or study.institution_name
    if institution:
        slots.append(("authorInstitution", [xon(institution, options.author_institution_oid)]))
    return slots


def _source_patient_info(study: ImagingStudy, source_patient_id: str) -> list[str]:
    info = [f"PID-3|{source_patient_id}"]
    if study.patient_name:
        info.append(f"PID-5|{xpn_from_pn(study.patient_name)}")
    if re.fullmatch(r"\d{8}", study.patient_birth_date):
        info.append(f"PID-7|{study.patient_birth_date}")
    if study.patient_sex in ("M", "F", "O"):
        info.append(f"PID-8|{study.patient_sex}")
    return info


def _reference_ids(study: ImagingStudy, default_accession_issuer: str) -> list[str]:
    # ITI TF-3 4.2.3.2.28: a Study Instance UID is globally unique, so only CXi.1 and CXi.5;
    # an accession number is not, so it carries its assigning authority.
    ids = [f"{study.study_instance_uid}^^^^{STUDY_INSTANCE_UID_TYPE}"]
    if study.accession_number:
        issuer = study.accession_number_issuer or default_accession_issuer
        ids.append(f"{escape_hl7(study.accession_number)}^^^&{issuer}&ISO^{ACCESSION_TYPE}")
    return ids


def event_codes(study: ImagingStudy) -> list[Code]:
    codes: list[Code] = []
    for value in study.modalities:
        code = modality_code(value)
        if code is not None and code not in codes:
            codes.append(code)
    for value in study.body_parts:
        code = body_part_code(value)
        if code is not None and code not in codes:
            codes.append(code)
    return codes


def _title(study: ImagingStudy) -> str:
    if study.study_description:
        return study.study_description
    modalities = "/".join(m for m in study.modalities if modality_code(m) is not None)
    return f"{modalities} imaging study".strip() if modalities else "Imaging study"


def build_document_entry(
    study: ImagingStudy,
    document: ManifestDocument,
    *,
    affinity_domain: str,
    options: ManifestOptions | None = None,
    entry_uuid: str | None = None,
) -> etree._Element:
    """The stable DocumentEntry (``rim:ExtrinsicObject``) of a study's KOS manifest."""
    options = options or ManifestOptions()
    patient_id, source_patient_id = xds_patient_ids(study, affinity_domain)
    entry_id = entry_uuid or _uuid_urn()
    eo = etree.Element(
        f"{{{RIM}}}ExtrinsicObject",
        nsmap={"rim": RIM},
        id=entry_id,
        mimeType=document.mime_type,
        objectType=ebrim.DOCUMENT_ENTRY_STABLE,
    )
    _slot(eo, "creationTime", [dtm(document.creation_time)])
    _slot(eo, "hash", [document.sha1])
    _slot(eo, "languageCode", [options.language_code])
    _slot(eo, ebrim.SLOT_REPOSITORY_UNIQUE_ID, [document.repository_unique_id])
    start = service_start_time(study, options.tz())
    if start:
        _slot(eo, "serviceStartTime", [start])
    _slot(eo, "size", [str(document.size)])
    _slot(eo, "sourcePatientId", [source_patient_id])
    _slot(eo, "sourcePatientInfo", _source_patient_info(study, source_patient_id))
    default_accession_issuer = options.accession_number_issuer or affinity_domain
    _slot(eo, ebrim.SLOT_REFERENCE_ID_LIST, _reference_ids(study, default_accession_issuer))
    _name(eo, _title(study))

    _classification(eo, ebrim.DE_AUTHOR, entry_id, "", slots=_author_slots(study, options))
    _coded(eo, ebrim.DE_CLASS_CODE, entry_id, options.class_code)
    _coded(eo, ebrim.DE_CONFIDENTIALITY_CODE, entry_id, options.confidentiality_code)
    for code in event_codes(study):
        _coded(eo, ebrim.DE_EVENT_CODE, entry_id, code)
    _coded(eo, ebrim.DE_FORMAT_CODE, entry_id, options.format_code)
    _coded(
        eo, ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE, entry_id, options.healthcare_facility_type_code
    )
    _coded(eo, ebrim.DE_PRACTICE_SETTING_CODE, entry_id, options.practice_setting_code)
    _coded(eo, ebrim.DE_TYPE_CODE, entry_id, options.type_code)
    _external_identifier(
        eo, ebrim.DE_PATIENT_ID, entry_id, patient_id, "XDSDocumentEntry.patientId"
    )
    _external_identifier(
        eo, ebrim.DE_UNIQUE_ID, entry_id, document.unique_id, "XDSDocumentEntry.uniqueId"
    )
    return eo


def build_submission_set(
    study: ImagingStudy,
    *,
    affinity_domain: str,
    source_id: str,
    options: ManifestOptions | None = None,
    submission_time: datetime | None = None,
    unique_id: str | None = None,
    entry_uuid: str | None = None,
) -> etree._Element:
    """The SubmissionSet ``rim:RegistryPackage`` (its classification is a sibling object)."""
    options = options or ManifestOptions()
    patient_id, _ = xds_patient_ids(study, affinity_domain)
    package_id = entry_uuid or _uuid_urn()
    package = etree.Element(
        f"{{{RIM}}}RegistryPackage",
        nsmap={"rim": RIM},
        id=package_id,
        objectType=ebrim.OBJECT_TYPE_REGISTRY_PACKAGE,
    )
    _slot(package, "submissionTime", [dtm(submission_time or datetime.now(UTC))])
    _name(package, f"Imaging manifest of study {study.study_instance_uid}")
    _classification(package, ebrim.SS_AUTHOR, package_id, "", slots=_author_slots(study, options))
    _coded(package, ebrim.SS_CONTENT_TYPE_CODE, package_id, options.content_type_code)
    _external_identifier(
        package,
        ebrim.SS_UNIQUE_ID,
        package_id,
        unique_id or _new_uid(),
        "XDSSubmissionSet.uniqueId",
    )
    _external_identifier(
        package, ebrim.SS_SOURCE_ID, package_id, source_id, "XDSSubmissionSet.sourceId"
    )
    _external_identifier(
        package, ebrim.SS_PATIENT_ID, package_id, patient_id, "XDSSubmissionSet.patientId"
    )
    return package


@dataclass(frozen=True)
class Submission:
    request: etree._Element  # lcm:SubmitObjectsRequest
    document_entry_id: str
    submission_set_id: str
    submission_set_unique_id: str


def build_submit_objects_request(
    study: ImagingStudy,
    document: ManifestDocument,
    *,
    affinity_domain: str,
    options: ManifestOptions | None = None,
    submission_time: datetime | None = None,
) -> Submission:
    """ITI-42 payload registering one manifest: DocumentEntry, SubmissionSet, HasMember."""
    options = options or ManifestOptions()
    entry_id = _uuid_urn()
    package_id = _uuid_urn()
    set_unique_id = _new_uid()
    document_entry = build_document_entry(
        study, document, affinity_domain=affinity_domain, options=options, entry_uuid=entry_id
    )
    submission_set = build_submission_set(
        study,
        affinity_domain=affinity_domain,
        source_id=options.source_id or document.repository_unique_id,
        options=options,
        submission_time=submission_time,
        unique_id=set_unique_id,
        entry_uuid=package_id,
    )
    request = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap={"lcm": LCM, "rim": RIM})
    objects = etree.SubElement(request, f"{{{RIM}}}RegistryObjectList")
    objects.append(document_entry)
    objects.append(submission_set)
    etree.SubElement(
        objects,
        f"{{{RIM}}}Classification",
        id=_uuid_urn(),
        objectType=ebrim.OBJECT_TYPE_CLASSIFICATION,
        classifiedObject=package_id,
        classificationNode=ebrim.SUBMISSION_SET_NODE,
    )
    association = etree.SubElement(
        objects,
        f"{{{RIM}}}Association",
        id=_uuid_urn(),
        objectType=ebrim.OBJECT_TYPE_ASSOCIATION,
        associationType=ebrim.HAS_MEMBER,
        sourceObject=package_id,
        targetObject=entry_id,
    )
    _slot(association, SUBMISSION_SET_STATUS, ["Original"])
    return Submission(
        request=request,
        document_entry_id=entry_id,
        submission_set_id=package_id,
        submission_set_unique_id=set_unique_id,
    )
