"""Build ITI-42 SubmitObjectsRequests from plain descriptions (sans-IO).

For seeding a registry (tests, benchmarks, demo data) and for documents whose metadata is
known field by field. Ids may be symbolic (``Document01``); the registry assigns UUIDs.
:func:`kos_document_entry` describes an XDS-I.b imaging manifest: a DICOM KOS
(``application/dicom``, formatCode 1.2.840.10008.5.1.4.1.1.88.59) whose referenceIdList holds
the Study Instance UID (and accession number).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from lxml import etree

from xca_gateway.protocol.namespaces import LCM, RIM
from xca_gateway.registry.model import Code
from xca_gateway.xds import ebrim

LOINC = "2.16.840.1.113883.6.1"
DCM = "1.2.840.10008.2.16.4"
CONFIDENTIALITY = "2.16.840.1.113883.5.25"

# Defaults (LOINC, SNOMED CT, HL7 confidentiality, IHE format codes).
_CLINICAL_NOTE = Code("11369-6", LOINC)
_SUMMARY = Code("34133-9", LOINC)
_MIME_TYPE_SUFFICIENT = Code("urn:ihe:iti:xds:2017:mimeTypeSufficient", "1.3.6.1.4.1.19376.1.2.3")
_GENERAL_MEDICINE = Code("394802001", "2.16.840.1.113883.6.96")
_HOSPITAL = Code("22232009", "2.16.840.1.113883.6.96")
_NORMAL = Code("N", CONFIDENTIALITY)
_IMAGING_STUDY = Code("18748-4", LOINC)


@dataclass
class DocumentEntrySpec:
    patient_id: str
    unique_id: str
    entry_uuid: str = "Document01"
    object_type: str = ebrim.DOCUMENT_ENTRY_STABLE
    mime_type: str = "text/xml"
    class_code: Code = _CLINICAL_NOTE
    type_code: Code = _SUMMARY
    format_code: Code = _MIME_TYPE_SUFFICIENT
    practice_setting_code: Code = _GENERAL_MEDICINE
    healthcare_facility_type_code: Code = _HOSPITAL
    confidentiality_codes: tuple[Code, ...] = (_NORMAL,)
    event_codes: tuple[Code, ...] = ()
    creation_time: str | None = "20240101120000"
    service_start_time: str | None = None
    service_stop_time: str | None = None
    hash: str | None = None
    size: int | None = 1024
    repository_unique_id: str | None = "1.3.6.1.4.1.21367.13.40.1"
    language_code: str = "en-US"
    source_patient_id: str | None = None
    title: str | None = "Document"
    author_persons: tuple[str, ...] = ()
    reference_ids: tuple[str, ...] = ()
    availability: str | None = None
    extra_slots: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass
class SubmissionSetSpec:
    patient_id: str
    unique_id: str
    source_id: str = "1.3.6.1.4.1.21367.13.40.1"
    submission_time: str = "20240101120000"
    content_type_code: Code = _IMAGING_STUDY
    author_persons: tuple[str, ...] = ()
    title: str | None = None
    entry_uuid: str = "SubmissionSet01"


@dataclass
class FolderSpec:
    patient_id: str
    unique_id: str
    codes: tuple[Code, ...] = (_IMAGING_STUDY,)
    title: str = "Folder"
    entry_uuid: str = "Folder01"


@dataclass
class AssociationSpec:
    source: str
    target: str
    type: str = ebrim.HAS_MEMBER
    entry_uuid: str | None = None
    submission_set_status: str | None = None
    slots: tuple[tuple[str, tuple[str, ...]], ...] = field(default_factory=tuple)


def _slot(parent: etree._Element, name: str, values: Sequence[str]) -> None:
    slot = etree.SubElement(parent, f"{{{RIM}}}Slot", name=name)
    value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
    for value in values:
        etree.SubElement(value_list, f"{{{RIM}}}Value").text = value


def _localized(parent: etree._Element, tag: str, text: str) -> None:
    holder = etree.SubElement(parent, f"{{{RIM}}}{tag}")
    etree.SubElement(holder, f"{{{RIM}}}LocalizedString", value=text)


class _Ids:
    def __init__(self) -> None:
        self.count = 0

    def next(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count:04d}"


def _code(
    parent: etree._Element, ids: _Ids, scheme: str, owner: str, code: Code, name: str | None = None
) -> None:
    cl = etree.SubElement(
        parent,
        f"{{{RIM}}}Classification",
        id=ids.next("cl"),
        classificationScheme=scheme,
        classifiedObject=owner,
        nodeRepresentation=code.code,
        objectType=ebrim.OBJECT_TYPE_CLASSIFICATION,
    )
    _slot(cl, ebrim.SLOT_CODING_SCHEME, [code.scheme or ""])
    _localized(cl, "Name", name or code.code)


def _author(parent: etree._Element, ids: _Ids, scheme: str, owner: str, person: str) -> None:
    cl = etree.SubElement(
        parent,
        f"{{{RIM}}}Classification",
        id=ids.next("cl"),
        classificationScheme=scheme,
        classifiedObject=owner,
        nodeRepresentation="",
        objectType=ebrim.OBJECT_TYPE_CLASSIFICATION,
    )
    _slot(cl, ebrim.SLOT_AUTHOR_PERSON, [person])


def _external_id(
    parent: etree._Element, ids: _Ids, scheme: str, owner: str, value: str, name: str
) -> None:
    ei = etree.SubElement(
        parent,
        f"{{{RIM}}}ExternalIdentifier",
        id=ids.next("ei"),
        identificationScheme=scheme,
        registryObject=owner,
        value=value,
        objectType=ebrim.OBJECT_TYPE_EXTERNAL_IDENTIFIER,
    )
    _localized(ei, "Name", name)


def document_entry_element(spec: DocumentEntrySpec, ids: _Ids | None = None) -> etree._Element:
    ids = ids or _Ids()
    eo = etree.Element(
        f"{{{RIM}}}ExtrinsicObject",
        nsmap={"rim": RIM},
        id=spec.entry_uuid,
        mimeType=spec.mime_type,
        objectType=spec.object_type,
    )
    slots: list[tuple[str, Sequence[str]]] = []
    if spec.creation_time:
        slots.append((ebrim.SLOT_CREATION_TIME, [spec.creation_time]))
    if spec.hash or (spec.object_type == ebrim.DOCUMENT_ENTRY_STABLE):
        digest = spec.hash or hashlib.sha1(spec.unique_id.encode()).hexdigest()
        slots.append((ebrim.SLOT_HASH, [digest]))
    if spec.size is not None and spec.object_type == ebrim.DOCUMENT_ENTRY_STABLE:
        slots.append((ebrim.SLOT_SIZE, [str(spec.size)]))
    slots.append((ebrim.SLOT_LANGUAGE_CODE, [spec.language_code]))
    if spec.repository_unique_id:
        slots.append((ebrim.SLOT_REPOSITORY_UNIQUE_ID, [spec.repository_unique_id]))
    if spec.service_start_time:
        slots.append((ebrim.SLOT_SERVICE_START_TIME, [spec.service_start_time]))
    if spec.service_stop_time:
        slots.append((ebrim.SLOT_SERVICE_STOP_TIME, [spec.service_stop_time]))
    slots.append((ebrim.SLOT_SOURCE_PATIENT_ID, [spec.source_patient_id or spec.patient_id]))
    if spec.reference_ids:
        slots.append((ebrim.SLOT_REFERENCE_ID_LIST, list(spec.reference_ids)))
    if spec.availability:
        slots.append((ebrim.SLOT_DOCUMENT_AVAILABILITY, [spec.availability]))
    slots.extend((name, list(values)) for name, values in spec.extra_slots)
    for name, values in slots:
        _slot(eo, name, values)
    if spec.title is not None:
        _localized(eo, "Name", spec.title)
    owner = spec.entry_uuid
    for person in spec.author_persons:
        _author(eo, ids, ebrim.DE_AUTHOR, owner, person)
    _code(eo, ids, ebrim.DE_CLASS_CODE, owner, spec.class_code)
    for code in spec.confidentiality_codes:
        _code(eo, ids, ebrim.DE_CONFIDENTIALITY_CODE, owner, code)
    for code in spec.event_codes:
        _code(eo, ids, ebrim.DE_EVENT_CODE, owner, code)
    _code(eo, ids, ebrim.DE_FORMAT_CODE, owner, spec.format_code)
    _code(
        eo, ids, ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE, owner, spec.healthcare_facility_type_code
    )
    _code(eo, ids, ebrim.DE_PRACTICE_SETTING_CODE, owner, spec.practice_setting_code)
    _code(eo, ids, ebrim.DE_TYPE_CODE, owner, spec.type_code)
    _external_id(eo, ids, ebrim.DE_PATIENT_ID, owner, spec.patient_id, "XDSDocumentEntry.patientId")
    _external_id(eo, ids, ebrim.DE_UNIQUE_ID, owner, spec.unique_id, "XDSDocumentEntry.uniqueId")
    return eo


def _submission_set_element(spec: SubmissionSetSpec, ids: _Ids) -> etree._Element:
    rp = etree.Element(f"{{{RIM}}}RegistryPackage", nsmap={"rim": RIM}, id=spec.entry_uuid)
    rp.set("objectType", ebrim.OBJECT_TYPE_REGISTRY_PACKAGE)
    _slot(rp, ebrim.SLOT_SUBMISSION_TIME, [spec.submission_time])
    if spec.title:
        _localized(rp, "Name", spec.title)
    owner = spec.entry_uuid
    for person in spec.author_persons:
        _author(rp, ids, ebrim.SS_AUTHOR, owner, person)
    _code(rp, ids, ebrim.SS_CONTENT_TYPE_CODE, owner, spec.content_type_code)
    _external_id(rp, ids, ebrim.SS_UNIQUE_ID, owner, spec.unique_id, "XDSSubmissionSet.uniqueId")
    _external_id(rp, ids, ebrim.SS_SOURCE_ID, owner, spec.source_id, "XDSSubmissionSet.sourceId")
    _external_id(rp, ids, ebrim.SS_PATIENT_ID, owner, spec.patient_id, "XDSSubmissionSet.patientId")
    return rp


def _folder_element(spec: FolderSpec, ids: _Ids) -> etree._Element:
    rp = etree.Element(f"{{{RIM}}}RegistryPackage", nsmap={"rim": RIM}, id=spec.entry_uuid)
    rp.set("objectType", ebrim.OBJECT_TYPE_REGISTRY_PACKAGE)
    _localized(rp, "Name", spec.title)
    for code in spec.codes:
        _code(rp, ids, ebrim.FOLDER_CODE_LIST, spec.entry_uuid, code)
    _external_id(
        rp, ids, ebrim.FOLDER_PATIENT_ID, spec.entry_uuid, spec.patient_id, "XDSFolder.patientId"
    )
    _external_id(
        rp, ids, ebrim.FOLDER_UNIQUE_ID, spec.entry_uuid, spec.unique_id, "XDSFolder.uniqueId"
    )
    return rp


def _node_classification(parent: etree._Element, ids: _Ids, owner: str, node: str) -> None:
    etree.SubElement(
        parent,
        f"{{{RIM}}}Classification",
        id=ids.next("cl"),
        classifiedObject=owner,
        classificationNode=node,
        objectType=ebrim.OBJECT_TYPE_CLASSIFICATION,
    )


def _association_element(spec: AssociationSpec, ids: _Ids) -> etree._Element:
    assoc = etree.Element(
        f"{{{RIM}}}Association",
        nsmap={"rim": RIM},
        id=spec.entry_uuid or ids.next("as"),
        associationType=spec.type,
        sourceObject=spec.source,
        targetObject=spec.target,
        objectType=ebrim.OBJECT_TYPE_ASSOCIATION,
    )
    if spec.submission_set_status:
        _slot(assoc, ebrim.SLOT_SUBMISSION_SET_STATUS, [spec.submission_set_status])
    for name, values in spec.slots:
        _slot(assoc, name, values)
    return assoc


def build_submit_objects_request(
    submission_set: SubmissionSetSpec,
    documents: Sequence[DocumentEntrySpec] = (),
    *,
    folders: Sequence[FolderSpec] = (),
    associations: Sequence[AssociationSpec] = (),
    references: Sequence[str] = (),
) -> etree._Element:
    """A SubmitObjectsRequest; the SubmissionSet gets HasMember associations to every document
    and folder (``Original``) and to each of ``references`` (existing DocumentEntries,
    ``Reference``). ``associations`` are added as given (folder membership, RPLC, ...)."""
    ids = _Ids()
    root = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap={"lcm": LCM, "rim": RIM})
    object_list = etree.SubElement(root, f"{{{RIM}}}RegistryObjectList")
    object_list.append(_submission_set_element(submission_set, ids))
    _node_classification(object_list, ids, submission_set.entry_uuid, ebrim.SUBMISSION_SET_NODE)
    for folder in folders:
        object_list.append(_folder_element(folder, ids))
        _node_classification(object_list, ids, folder.entry_uuid, ebrim.FOLDER_NODE)
    for document in documents:
        object_list.append(document_entry_element(document, ids))
    members = [
        AssociationSpec(submission_set.entry_uuid, target, submission_set_status="Original")
        for target in (*(f.entry_uuid for f in folders), *(d.entry_uuid for d in documents))
    ]
    members += [
        AssociationSpec(submission_set.entry_uuid, target, submission_set_status="Reference")
        for target in references
    ]
    for spec in (*members, *associations):
        object_list.append(_association_element(spec, ids))
    return root


def study_reference_id(study_instance_uid: str) -> str:
    """referenceIdList value (CXi) of a Study Instance UID (ITI TF-3 4.2.3.2.28)."""
    return f"{study_instance_uid}^^^^{ebrim.REFERENCE_ID_STUDY_INSTANCE_UID}"


def accession_reference_id(accession: str, issuer_oid: str) -> str:
    return f"{accession}^^^&{issuer_oid}&ISO^{ebrim.REFERENCE_ID_ACCESSION}"


def kos_document_entry(
    *,
    patient_id: str,
    sop_instance_uid: str,
    study_instance_uid: str,
    repository_unique_id: str,
    entry_uuid: str = "Document01",
    accession: tuple[str, str] | None = None,
    modality: str = "CT",
    study_time: str = "20240101120000",
    title: str = "Imaging manifest",
    author_persons: tuple[str, ...] = (),
    confidentiality_codes: tuple[Code, ...] = (_NORMAL,),
    size: int = 2048,
) -> DocumentEntrySpec:
    """An XDS-I.b imaging manifest DocumentEntry (RAD TF-3 4.68.4.1.2.3)."""
    reference_ids = [study_reference_id(study_instance_uid)]
    if accession is not None:
        reference_ids.append(accession_reference_id(*accession))
    return DocumentEntrySpec(
        patient_id=patient_id,
        unique_id=sop_instance_uid,
        entry_uuid=entry_uuid,
        mime_type=ebrim.KOS_MIME_TYPE,
        class_code=Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1"),
        type_code=Code("18748-4", LOINC),
        format_code=Code(ebrim.KOS_FORMAT_CODE, ebrim.DICOM_UID_REGISTRY),
        practice_setting_code=Code("394914008", "2.16.840.1.113883.6.96"),
        healthcare_facility_type_code=Code("RADDX", "2.16.840.1.113883.5.10588"),
        confidentiality_codes=confidentiality_codes,
        event_codes=(Code(modality, DCM),),
        creation_time=study_time,
        service_start_time=study_time,
        repository_unique_id=repository_unique_id,
        title=title,
        author_persons=author_persons,
        reference_ids=tuple(reference_ids),
        size=size,
    )
