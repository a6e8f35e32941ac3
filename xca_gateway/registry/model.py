"""The registry's data model: registry objects as stored, and the filters the store answers.

A registry object is kept twice: as the canonical ebRIM XML that was registered (so a LeafClass
answer returns exactly that metadata, with the registry-assigned entryUUIDs), and as indexed
columns and rows for the stored query parameters (patient id, status, codes, times, authors,
referenceIdList values, association ends). Everything here is plain data, no I/O.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

from lxml import etree

from xca_gateway.protocol.namespaces import RIM
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError


class Kind(enum.StrEnum):
    DOCUMENT_ENTRY = "DocumentEntry"
    SUBMISSION_SET = "SubmissionSet"
    FOLDER = "Folder"
    ASSOCIATION = "Association"


class CodeAttribute(enum.StrEnum):
    """Coded metadata attributes that stored queries match on, as (code, codingScheme)."""

    CLASS_CODE = "classCode"
    TYPE_CODE = "typeCode"
    PRACTICE_SETTING_CODE = "practiceSettingCode"
    HEALTHCARE_FACILITY_TYPE_CODE = "healthcareFacilityTypeCode"
    EVENT_CODE = "eventCodeList"
    CONFIDENTIALITY_CODE = "confidentialityCode"
    FORMAT_CODE = "formatCode"
    CONTENT_TYPE_CODE = "contentTypeCode"
    FOLDER_CODE = "codeList"


class ValueAttribute(enum.StrEnum):
    """Multi-valued string attributes that stored queries match on."""

    AUTHOR_PERSON = "authorPerson"
    REFERENCE_ID = "referenceIdList"


class TimeColumn(enum.StrEnum):
    CREATION_TIME = "creation_time"
    SERVICE_START_TIME = "service_start"
    SERVICE_STOP_TIME = "service_stop"
    SUBMISSION_TIME = "submission_time"
    LAST_UPDATE_TIME = "last_update"


# Classification schemes of coded attributes, per kind of registry object.
CODE_SCHEMES: dict[str, CodeAttribute] = {
    ebrim.DE_CLASS_CODE: CodeAttribute.CLASS_CODE,
    ebrim.DE_TYPE_CODE: CodeAttribute.TYPE_CODE,
    ebrim.DE_PRACTICE_SETTING_CODE: CodeAttribute.PRACTICE_SETTING_CODE,
    ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE: CodeAttribute.HEALTHCARE_FACILITY_TYPE_CODE,
    ebrim.DE_EVENT_CODE: CodeAttribute.EVENT_CODE,
    ebrim.DE_CONFIDENTIALITY_CODE: CodeAttribute.CONFIDENTIALITY_CODE,
    ebrim.DE_FORMAT_CODE: CodeAttribute.FORMAT_CODE,
    ebrim.SS_CONTENT_TYPE_CODE: CodeAttribute.CONTENT_TYPE_CODE,
    ebrim.FOLDER_CODE_LIST: CodeAttribute.FOLDER_CODE,
}

DOCUMENT_ENTRY_TYPES = (ebrim.DOCUMENT_ENTRY_STABLE, ebrim.DOCUMENT_ENTRY_ON_DEMAND)
STATUSES = (ebrim.STATUS_APPROVED, ebrim.STATUS_DEPRECATED, ebrim.STATUS_SUBMITTED)
ASSOCIATION_TYPES = (
    ebrim.HAS_MEMBER,
    ebrim.RPLC,
    ebrim.XFRM,
    ebrim.APND,
    ebrim.XFRM_RPLC,
    ebrim.SIGNS,
    ebrim.IS_SNAPSHOT_OF,
    ebrim.UPDATE_AVAILABILITY_STATUS,
    ebrim.SUBMIT_ASSOCIATION,
)
# Document relationships (ITI TF-3 4.2.2.2): source is the new DocumentEntry.
RELATIONSHIP_TYPES = (ebrim.RPLC, ebrim.XFRM, ebrim.APND, ebrim.XFRM_RPLC, ebrim.SIGNS)
REPLACING_TYPES = (ebrim.RPLC, ebrim.XFRM_RPLC)


@dataclass(frozen=True)
class Code:
    code: str
    # None only in query parameters: "code" without "^^scheme" matches any coding scheme.
    scheme: str | None

    def __str__(self) -> str:
        return self.code if self.scheme is None else f"{self.code}^^{self.scheme}"


@dataclass(frozen=True)
class StoredObject:
    """One row of the registry; ``xml`` is absent when only references were asked for."""

    seq: int
    uuid: str
    kind: Kind
    object_type: str
    status: str
    patient_id: str | None = None
    unique_id: str | None = None
    source_uuid: str | None = None
    target_uuid: str | None = None
    hash: str | None = None
    xml: bytes | None = None


# ------------------------------------------------------------------------------ query filters


@dataclass(frozen=True)
class CodeCondition:
    """The object has at least one ``attribute`` code among ``any_of``."""

    attribute: CodeAttribute
    any_of: tuple[Code, ...]


@dataclass(frozen=True)
class ValueCondition:
    """The object has a value of ``attribute`` equal to (or, with ``like``, matching the SQL
    LIKE pattern of) one of ``any_of``."""

    attribute: ValueAttribute
    any_of: tuple[str, ...]
    like: bool = False


@dataclass(frozen=True)
class TimeRange:
    """``low <= value < high`` on DTM strings; a bound may be absent."""

    column: TimeColumn
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True)
class ObjectFilter:
    """Selects DocumentEntries, SubmissionSets or Folders; every given criterion must hold
    (AND), alternatives within one criterion are OR. ``None`` means "no restriction"."""

    kind: Kind
    patient_id: str | None = None
    statuses: tuple[str, ...] | None = None
    object_types: tuple[str, ...] | None = None
    uuids: tuple[str, ...] | None = None
    unique_ids: tuple[str, ...] | None = None
    lids: tuple[str, ...] | None = None
    availability: tuple[str, ...] | None = None
    source_ids: tuple[str, ...] | None = None
    codes: tuple[CodeCondition, ...] = ()
    values: tuple[ValueCondition, ...] = ()
    times: tuple[TimeRange, ...] = ()


@dataclass(frozen=True)
class AssociationFilter:
    uuids: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    # source or target among these
    either: tuple[str, ...] | None = None
    types: tuple[str, ...] | None = None
    statuses: tuple[str, ...] | None = None


# ------------------------------------------------------------------------- registered objects


@dataclass
class NewObject:
    """A registry object accepted from a submission, ready to be inserted."""

    uuid: str
    kind: Kind
    object_type: str
    element: etree._Element
    lid: str
    status: str = ebrim.STATUS_APPROVED
    patient_id: str | None = None
    unique_id: str | None = None
    creation_time: str | None = None
    service_start: str | None = None
    service_stop: str | None = None
    availability: str | None = None
    submission_time: str | None = None
    source_id: str | None = None
    last_update: str | None = None
    source_uuid: str | None = None
    target_uuid: str | None = None
    hash: str | None = None
    submission_set_status: str | None = None
    codes: list[tuple[CodeAttribute, Code]] = field(default_factory=list)
    values: list[tuple[ValueAttribute, str]] = field(default_factory=list)

    def xml(self) -> bytes:
        # A detached copy, so the request's unused namespace declarations are not kept.
        element = copy.deepcopy(self.element)
        etree.cleanup_namespaces(element)
        return etree.tostring(element, encoding="utf-8")


def set_slot(element: etree._Element, name: str, values: list[str]) -> None:
    """Set (replace or insert) a rim:Slot on a registry object, keeping ebRIM element order:
    slots come first in IdentifiableType."""
    for slot in element.findall(f"{{{RIM}}}Slot"):
        if slot.get("name") == name:
            element.remove(slot)
    slot = etree.Element(f"{{{RIM}}}Slot", name=name)
    value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
    for value in values:
        etree.SubElement(value_list, f"{{{RIM}}}Value").text = value
    existing = element.findall(f"{{{RIM}}}Slot")
    position = element.index(existing[-1]) + 1 if existing else 0
    element.insert(position, slot)


_TRUSTED_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def load_element(xml: bytes) -> etree._Element:
    """Parse XML the registry wrote itself (re-serialized by lxml from checked input)."""
    return etree.fromstring(xml, _TRUSTED_PARSER)


@dataclass
class QueryResult:
    """The outcome of a stored query: status URN, RegistryErrors, and the returned objects
    (rim:ExtrinsicObject / rim:RegistryPackage / rim:Association, or rim:ObjectRef)."""

    status: str
    errors: list[RegistryError] = field(default_factory=list)
    objects: list[etree._Element] = field(default_factory=list)


class RegistryAction:
    """wsa:Action of ITI-42 Register Document Set-b (IHE iti42.wsdl)."""

    ITI42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
    ITI42_RESPONSE = "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"
