"""ITI-42 Register Document Set-b: validation and registration rules (sans-IO).

:func:`parse_submission` checks an ``lcm:SubmitObjectsRequest`` on its own (ITI TF-2 3.42.4.1.3,
ITI TF-3 4.1 and 4.2): exactly one SubmissionSet, the required attributes of every
DocumentEntry, SubmissionSet and Folder (TF-3 Table 4.3.1-3, XDS column), well-formed codes,
times and identifiers, HasMember associations for every submitted DocumentEntry and Folder,
one patient per submission, no duplicate uniqueIds. It assigns UUIDs to symbolic ids, nests
top-level Classifications and ExternalIdentifiers into the objects they describe, and sets the
registry-managed attributes (status, lid, Folder lastUpdateTime).

:func:`plan_registration` then applies the rules that depend on what the registry already
holds (given as a :class:`RegistryContext` the store fetched inside its transaction):
uniqueIds and entryUUIDs already taken, references to existing objects, document relationships
(RPLC, XFRM, APND, XFRM_RPLC, signs) and their effects: a replaced DocumentEntry, and the
transforms and addenda of it, become Deprecated; the replacement joins the Folders of the
original; Folders that gain members get a new lastUpdateTime.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree

from xca_gateway.protocol.namespaces import LCM, RIM
from xca_gateway.registry.model import (
    ASSOCIATION_TYPES,
    CODE_SCHEMES,
    DOCUMENT_ENTRY_TYPES,
    RELATIONSHIP_TYPES,
    REPLACING_TYPES,
    Code,
    CodeAttribute,
    Kind,
    NewObject,
    StoredObject,
    ValueAttribute,
    set_slot,
)
from xca_gateway.registry.stored_query import ValueSyntaxError, validate_dtm, validate_patient_id
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode
from xca_gateway.xds.ebrs import RegistryError

_UUID_URN = re.compile(
    r"^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")

_REFERENCE_ATTRIBUTES = (
    "classifiedObject",
    "registryObject",
    "sourceObject",
    "targetObject",
    "lid",
)
_TOP_LEVEL = {
    f"{{{RIM}}}ExtrinsicObject",
    f"{{{RIM}}}RegistryPackage",
    f"{{{RIM}}}Classification",
    f"{{{RIM}}}ExternalIdentifier",
    f"{{{RIM}}}Association",
    f"{{{RIM}}}ObjectRef",
}
# ebRIM RegistryObjectType child order (Slot comes from IdentifiableType).
_CHILD_RANK = {
    f"{{{RIM}}}Slot": 0,
    f"{{{RIM}}}Name": 1,
    f"{{{RIM}}}Description": 2,
    f"{{{RIM}}}VersionInfo": 3,
    f"{{{RIM}}}Classification": 4,
    f"{{{RIM}}}ExternalIdentifier": 5,
}

MAX_OBJECTS = 100_000


class SubmissionRejected(Exception):
    """The submission is not registered; ``errors`` say why (RegistryErrors, IHE codes)."""

    def __init__(self, errors: Sequence[RegistryError]) -> None:
        super().__init__("; ".join(e.code_context for e in errors))
        self.errors = list(errors)


def _metadata_error(context: str) -> RegistryError:
    return RegistryError(ErrorCode.REGISTRY_METADATA_ERROR, context)


def now_dtm() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


@dataclass
class Submission:
    """A checked submission: new objects in insertion order and what it refers to."""

    submission_set: NewObject
    objects: list[NewObject]
    # Existing registry objects that associations of the submission point at.
    references: set[str] = field(default_factory=set)
    # Existing DocumentEntries replaced (RPLC, XFRM_RPLC) by this submission.
    replaced: set[str] = field(default_factory=set)
    registered_at: str = ""

    @property
    def uuids(self) -> list[str]:
        return [o.uuid for o in self.objects]

    @property
    def unique_ids(self) -> list[str]:
        return [o.unique_id for o in self.objects if o.unique_id]


# ------------------------------------------------------------------------------ element helpers


def _slots(element: etree._Element) -> dict[str, list[str]]:
    slots: dict[str, list[str]] = {}
    for slot in element.findall(f"{{{RIM}}}Slot"):
        values = [
            (v.text or "").strip() for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
        ]
        slots.setdefault(slot.get("name") or "", []).extend(values)
    return slots


def _external_ids(element: etree._Element, scheme: str) -> list[str]:
    return [
        (ei.get("value") or "").strip()
        for ei in element.findall(f"{{{RIM}}}ExternalIdentifier")
        if ei.get("identificationScheme") == scheme
    ]


def _classifications(element: etree._Element, scheme: str) -> list[etree._Element]:
    return [
        c
        for c in element.findall(f"{{{RIM}}}Classification")
        if c.get("classificationScheme") == scheme
    ]


def _insert_child(parent: etree._Element, child: etree._Element) -> None:
    """Insert ``child`` at its place in the ebRIM sequence of ``parent``."""
    rank = _CHILD_RANK[child.tag]
    position = 0
    for index, existing in enumerate(parent):
        if isinstance(existing.tag, str) and _CHILD_RANK.get(existing.tag, 99) <= rank:
            position = index + 1
    child.tail = None
    parent.insert(position, child)


class _Checker:
    """Collects metadata errors about one object."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.errors: list[RegistryError] = []

    def fail(self, message: str, code: str = ErrorCode.REGISTRY_METADATA_ERROR) -> None:
        self.errors.append(RegistryError(code, f"{self.what}: {message}"))

    def single(self, values: list[str], name: str, *, required: bool = True) -> str | None:
        if not values:
            if required:
                self.fail(f"{name} is required")
            return None
        if len(values) > 1:
            self.fail(f"{name} must have exactly one value, has {len(values)}")
            return None
        if not values[0]:
            self.fail(f"{name} is empty")
            return None
        return values[0]

    def dtm(self, values: list[str], name: str, *, required: bool) -> str | None:
        value = self.single(values, name, required=required)
        if value is None:
            return None
        try:
            return validate_dtm(value)
        except ValueSyntaxError as exc:
            self.fail(f"{name}: {exc}")
            return None

    def patient_id(self, values: list[str], name: str) -> str | None:
        value = self.single(values, name)
        if value is None:
            return None
        try:
            return validate_patient_id(value)
        except ValueSyntaxError as exc:
            self.fail(f"{name}: {exc}")
            return None

    def oid(self, value: str | None, name: str) -> None:
        if value is not None and (not _OID.match(value) or len(value) > 64):
            self.fail(f"{name} {value!r} is not an OID of at most 64 characters")

    def codes(
        self,
        element: etree._Element,
        scheme: str,
        name: str,
        *,
        minimum: int,
        maximum: int | None,
    ) -> list[Code]:
        found = _classifications(element, scheme)
        if len(found) < minimum or (maximum is not None and len(found) > maximum):
            expected = f"exactly {minimum}" if minimum == maximum else f"at least {minimum}"
            if maximum is not None and minimum != maximum:
                expected = f"{minimum} to {maximum}"
            self.fail(f"{name} needs {expected} code(s), has {len(found)}")
        codes = []
        for classification in found:
            code = (classification.get("nodeRepresentation") or "").strip()
            schemes = _slots(classification).get(ebrim.SLOT_CODING_SCHEME, [])
            if not code:
                self.fail(f"{name} has a code without nodeRepresentation")
                continue
            if len(schemes) != 1 or not schemes[0]:
                self.fail(f"{name} code {code!r} needs exactly one codingScheme")
                continue
            codes.append(Code(code, schemes[0]))
        return codes


def _authors(element: etree._Element, scheme: str) -> list[str]:
    return [
        person
        for author in _classifications(element, scheme)
        for person in _slots(author).get(ebrim.SLOT_AUTHOR_PERSON, [])
        if person
    ]


# ------------------------------------------------------------------------------ object readers


def _document_entry(
    element: etree._Element, uid: str, label: str
) -> tuple[NewObject, list[RegistryError]]:
    check = _Checker(f"DocumentEntry {label}")
    object_type = element.get("objectType") or ""
    if object_type not in DOCUMENT_ENTRY_TYPES:
        check.fail(f"objectType {object_type!r} is neither the stable nor on-demand type")
    stable = object_type != ebrim.DOCUMENT_ENTRY_ON_DEMAND
    mime_type = (element.get("mimeType") or "").strip()
    if not mime_type:
        check.fail("mimeType is required")
    slots = _slots(element)
    obj = NewObject(uid, Kind.DOCUMENT_ENTRY, object_type, element, lid=uid)
    obj.patient_id = check.patient_id(_external_ids(element, ebrim.DE_PATIENT_ID), "patientId")
    obj.unique_id = check.single(_external_ids(element, ebrim.DE_UNIQUE_ID), "uniqueId")
    if obj.unique_id and len(obj.unique_id) > 128:
        check.fail("uniqueId is longer than 128 characters")
    obj.creation_time = check.dtm(
        slots.get(ebrim.SLOT_CREATION_TIME, []), "creationTime", required=stable
    )
    obj.service_start = check.dtm(
        slots.get(ebrim.SLOT_SERVICE_START_TIME, []), "serviceStartTime", required=False
    )
    obj.service_stop = check.dtm(
        slots.get(ebrim.SLOT_SERVICE_STOP_TIME, []), "serviceStopTime", required=False
    )
    if (
        obj.service_start
        and obj.service_stop
        and obj.service_stop < obj.service_start[: len(obj.service_stop)]
    ):
        check.fail("serviceStopTime is before serviceStartTime")
    if stable:
        obj.hash = check.single(slots.get(ebrim.SLOT_HASH, []), "hash")
        if obj.hash is not None and (len(obj.hash) not in (40, 64) or not _HEX.match(obj.hash)):
            check.fail("hash must be a hex SHA-1 (or SHA-256) digest")
        size = check.single(slots.get(ebrim.SLOT_SIZE, []), "size")
        if size is not None and not size.isdigit():
            check.fail(f"size {size!r} is not a number")
        repository = check.single(
            slots.get(ebrim.SLOT_REPOSITORY_UNIQUE_ID, []), "repositoryUniqueId"
        )
        check.oid(repository, "repositoryUniqueId")
    check.single(slots.get(ebrim.SLOT_LANGUAGE_CODE, []), "languageCode")
    check.single(slots.get(ebrim.SLOT_SOURCE_PATIENT_ID, []), "sourcePatientId")
    availability = check.single(
        slots.get(ebrim.SLOT_DOCUMENT_AVAILABILITY, []), "documentAvailability", required=False
    )
    if availability is not None and availability not in (
        ebrim.AVAILABILITY_ONLINE,
        ebrim.AVAILABILITY_OFFLINE,
    ):
        check.fail(f"documentAvailability {availability!r} is not Online or Offline")
    obj.availability = availability or ebrim.AVAILABILITY_ONLINE
    for value in slots.get(ebrim.SLOT_REFERENCE_ID_LIST, []):
        if not value:
            check.fail("referenceIdList has an empty value")
        obj.values.append((ValueAttribute.REFERENCE_ID, value))
    for person in _authors(element, ebrim.DE_AUTHOR):
        obj.values.append((ValueAttribute.AUTHOR_PERSON, person))
    cardinality = {
        ebrim.DE_CLASS_CODE: (1, 1),
        ebrim.DE_TYPE_CODE: (1, 1),
        ebrim.DE_FORMAT_CODE: (1, 1),
        ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE: (1, 1),
        ebrim.DE_PRACTICE_SETTING_CODE: (1, 1),
        ebrim.DE_CONFIDENTIALITY_CODE: (1, None),
        ebrim.DE_EVENT_CODE: (0, None),
    }
    for scheme, (minimum, maximum) in cardinality.items():
        attribute = CODE_SCHEMES[scheme]
        for code in check.codes(element, scheme, attribute.value, minimum=minimum, maximum=maximum):
            obj.codes.append((attribute, code))
    if _limited_metadata(element, ebrim.DE_LIMITED_METADATA):
        check.fail("limitedMetadata DocumentEntries are not accepted by an XDS registry")
    format_codes = [c for a, c in obj.codes if a is CodeAttribute.FORMAT_CODE]
    kos = Code(ebrim.KOS_FORMAT_CODE, ebrim.DICOM_UID_REGISTRY)
    if kos in format_codes and mime_type and mime_type != ebrim.KOS_MIME_TYPE:
        # XDS-I.b imaging manifest (RAD TF-3 4.68.4.1.2.3.2): the KOS is DICOM Part 10.
        check.fail(
            f"a KOS manifest (formatCode {ebrim.KOS_FORMAT_CODE}) must have mimeType "
            f"{ebrim.KOS_MIME_TYPE}, not {mime_type!r}"
        )
    return obj, check.errors


def _limited_metadata(element: etree._Element, node: str) -> bool:
    return any(
        c.get("classificationNode") == node for c in element.findall(f"{{{RIM}}}Classification")
    )


def _submission_set(
    element: etree._Element, uid: str, label: str
) -> tuple[NewObject, list[RegistryError]]:
    check = _Checker(f"SubmissionSet {label}")
    obj = NewObject(uid, Kind.SUBMISSION_SET, ebrim.SUBMISSION_SET_NODE, element, lid=uid)
    obj.patient_id = check.patient_id(_external_ids(element, ebrim.SS_PATIENT_ID), "patientId")
    obj.unique_id = check.single(_external_ids(element, ebrim.SS_UNIQUE_ID), "uniqueId")
    check.oid(obj.unique_id, "uniqueId")
    obj.source_id = check.single(_external_ids(element, ebrim.SS_SOURCE_ID), "sourceId")
    check.oid(obj.source_id, "sourceId")
    obj.submission_time = check.dtm(
        _slots(element).get(ebrim.SLOT_SUBMISSION_TIME, []), "submissionTime", required=True
    )
    for code in check.codes(
        element, ebrim.SS_CONTENT_TYPE_CODE, "contentTypeCode", minimum=1, maximum=1
    ):
        obj.codes.append((CodeAttribute.CONTENT_TYPE_CODE, code))
    for person in _authors(element, ebrim.SS_AUTHOR):
        obj.values.append((ValueAttribute.AUTHOR_PERSON, person))
    if _limited_metadata(element, ebrim.SS_LIMITED_METADATA):
        check.fail("limitedMetadata SubmissionSets are not accepted by an XDS registry")
    return obj, check.errors


def _folder(
    element: etree._Element, uid: str, label: str, now: str
) -> tuple[NewObject, list[RegistryError]]:
    check = _Checker(f"Folder {label}")
    obj = NewObject(uid, Kind.FOLDER, ebrim.FOLDER_NODE, element, lid=uid)
    obj.patient_id = check.patient_id(_external_ids(element, ebrim.FOLDER_PATIENT_ID), "patientId")
    obj.unique_id = check.single(_external_ids(element, ebrim.FOLDER_UNIQUE_ID), "uniqueId")
    check.oid(obj.unique_id, "uniqueId")
    if element.find(f"{{{RIM}}}Name") is None:
        check.fail("title (rim:Name) is required")
    for code in check.codes(element, ebrim.FOLDER_CODE_LIST, "codeList", minimum=1, maximum=None):
        obj.codes.append((CodeAttribute.FOLDER_CODE, code))
    if _limited_metadata(element, ebrim.FOLDER_LIMITED_METADATA):
        check.fail("limitedMetadata Folders are not accepted by an XDS registry")
    # lastUpdateTime is the registry's to set (ITI TF-3 4.2.3.4.5).
    obj.last_update = now
    set_slot(element, ebrim.SLOT_LAST_UPDATE_TIME, [now])
    return obj, check.errors


def _association(
    element: etree._Element, uid: str, label: str
) -> tuple[NewObject, list[RegistryError]]:
    check = _Checker(f"Association {label}")
    kind = element.get("associationType") or ""
    if kind not in ASSOCIATION_TYPES:
        check.fail(f"associationType {kind!r} is not an XDS association type")
    elif kind in (ebrim.UPDATE_AVAILABILITY_STATUS, ebrim.SUBMIT_ASSOCIATION):
        check.fail(f"{kind} belongs to Metadata Update, which this registry does not support")
    source = (element.get("sourceObject") or "").strip()
    target = (element.get("targetObject") or "").strip()
    if not source or not target:
        check.fail("sourceObject and targetObject are required")
    obj = NewObject(uid, Kind.ASSOCIATION, kind, element, lid=uid)
    obj.source_uuid, obj.target_uuid = source, target
    statuses = _slots(element).get(ebrim.SLOT_SUBMISSION_SET_STATUS, [])
    obj.submission_set_status = statuses[0] if len(statuses) == 1 else None
    if len(statuses) > 1:
        check.fail("SubmissionSetStatus must have a single value")
    return obj, check.errors


# ------------------------------------------------------------------------------- the request


def parse_submission(
    request: etree._Element,
    *,
    now: str | None = None,
    patient_id_domains: Iterable[str] = (),
) -> Submission:
    """Check an lcm:SubmitObjectsRequest; raise :class:`SubmissionRejected` with all errors."""
    now = now or now_dtm()
    if request.tag != f"{{{LCM}}}SubmitObjectsRequest":
        raise SubmissionRejected(
            [_metadata_error("the request must be an lcm:SubmitObjectsRequest")]
        )
    object_list = request.find(f"{{{RIM}}}RegistryObjectList")
    if object_list is None:
        raise SubmissionRejected([_metadata_error("rim:RegistryObjectList is missing")])
    top = [el for el in object_list if isinstance(el.tag, str)]
    if len(top) > MAX_OBJECTS:
        raise SubmissionRejected([_metadata_error("too many registry objects in one submission")])
    errors: list[RegistryError] = []
    for el in top:
        if el.tag not in _TOP_LEVEL:
            errors.append(_metadata_error(f"{etree.QName(el).localname} objects are not accepted"))
    if errors:
        raise SubmissionRejected(errors)

    id_map = _assign_uuids(object_list, errors)
    if errors:
        raise SubmissionRejected(errors)
    for el in object_list.iter("*"):
        for attribute in _REFERENCE_ATTRIBUTES:
            value = el.get(attribute)
            if value is not None and value.strip() in id_map:
                el.set(attribute, id_map[value.strip()])
    objects = {el.get("id", ""): el for el in top if el.tag != f"{{{RIM}}}ObjectRef"}
    _nest_top_level(top, objects, errors)
    if errors:
        raise SubmissionRejected(errors)

    packages: list[NewObject] = []
    folders: list[NewObject] = []
    documents: list[NewObject] = []
    associations: list[NewObject] = []
    submitted_as = {new: old for old, new in id_map.items()}
    for uid, el in objects.items():
        # Errors name the id the submitter used.
        label = f"{submitted_as[uid]} ({uid})" if uid in submitted_as else uid
        tag = etree.QName(el).localname
        if tag == "ExtrinsicObject":
            obj, problems = _document_entry(el, uid, label)
            documents.append(obj)
        elif tag == "RegistryPackage":
            nodes = {c.get("classificationNode") for c in el.findall(f"{{{RIM}}}Classification")}
            is_ss, is_folder = ebrim.SUBMISSION_SET_NODE in nodes, ebrim.FOLDER_NODE in nodes
            if is_ss == is_folder:
                errors.append(
                    _metadata_error(
                        f"RegistryPackage {uid} must be classified as either a SubmissionSet "
                        "or a Folder"
                    )
                )
                continue
            if is_ss:
                obj, problems = _submission_set(el, uid, label)
                packages.append(obj)
            else:
                obj, problems = _folder(el, uid, label, now)
                folders.append(obj)
        elif tag == "Association":
            obj, problems = _association(el, uid, label)
            associations.append(obj)
        else:  # pragma: no cover - nested above
            continue
        errors.extend(problems)
    if len(packages) != 1:
        errors.append(
            _metadata_error(f"a submission needs exactly one SubmissionSet, found {len(packages)}")
        )
    if errors:
        raise SubmissionRejected(errors)
    submission_set = packages[0]
    new = [submission_set, *folders, *documents, *associations]
    submission = Submission(submission_set, new, registered_at=now)
    _check_submission(submission, set(objects), errors, tuple(patient_id_domains))
    if errors:
        raise SubmissionRejected(errors)
    for obj in new:
        obj.element.set("status", obj.status)
        if not obj.element.get("lid"):
            obj.element.set("lid", obj.uuid)
        elif obj.element.get("lid") != obj.uuid:
            raise SubmissionRejected(
                [
                    _metadata_error(
                        f"{obj.uuid}: a logicalID different from the entryUUID is a Metadata "
                        "Update, which this registry does not support"
                    )
                ]
            )
        obj.element.tail = None
    return submission


def _assign_uuids(object_list: etree._Element, errors: list[RegistryError]) -> dict[str, str]:
    """Map every symbolic id to a fresh urn:uuid; check that ids are unique."""
    id_map: dict[str, str] = {}
    seen: set[str] = set()
    for el in object_list.iter("*"):
        if el.tag == f"{{{RIM}}}ObjectRef" or el.tag not in _TOP_LEVEL:
            continue
        value = (el.get("id") or "").strip()
        if not value:
            if el.getparent() is object_list and el.tag != f"{{{RIM}}}Association":
                errors.append(_metadata_error(f"a {etree.QName(el).localname} has no id"))
                continue
            value = f"urn:uuid:{uuid.uuid4()}"
            el.set("id", value)
        if value in seen:
            errors.append(_metadata_error(f"id {value} is used by more than one object"))
            continue
        seen.add(value)
        if value.startswith("urn:uuid:"):
            if not _UUID_URN.match(value):
                errors.append(_metadata_error(f"{value} is not a valid UUID URN"))
            continue
        new_id = f"urn:uuid:{uuid.uuid4()}"
        id_map[value] = new_id
        el.set("id", new_id)
    return id_map


def _nest_top_level(
    top: list[etree._Element], objects: dict[str, etree._Element], errors: list[RegistryError]
) -> None:
    """Move top-level Classifications / ExternalIdentifiers into the object they describe."""
    for el in top:
        if el.tag == f"{{{RIM}}}Classification":
            owner_id = el.get("classifiedObject") or ""
        elif el.tag == f"{{{RIM}}}ExternalIdentifier":
            owner_id = el.get("registryObject") or ""
        else:
            continue
        owner = objects.get(owner_id)
        if owner is None or owner.tag not in (
            f"{{{RIM}}}ExtrinsicObject",
            f"{{{RIM}}}RegistryPackage",
        ):
            errors.append(
                _metadata_error(
                    f"{etree.QName(el).localname} {el.get('id')} describes {owner_id!r}, which is "
                    "not a DocumentEntry, SubmissionSet or Folder of this submission"
                )
            )
            continue
        del objects[el.get("id", "")]
        el.getparent().remove(el)  # type: ignore[union-attr]
        _insert_child(owner, el)
    # Nested ones must describe their parent.
    for owner_id, owner in objects.items():
        for child in owner:
            if child.tag == f"{{{RIM}}}Classification":
                attribute = "classifiedObject"
            elif child.tag == f"{{{RIM}}}ExternalIdentifier":
                attribute = "registryObject"
            else:
                continue
            value = child.get(attribute)
            if not value:
                child.set(attribute, owner_id)
            elif value != owner_id:
                errors.append(
                    _metadata_error(
                        f"{etree.QName(child).localname} {child.get('id')} nested in {owner_id} "
                        f"names {value} as its {attribute}"
                    )
                )


def _check_submission(
    sub: Submission,
    submitted_ids: set[str],
    errors: list[RegistryError],
    patient_id_domains: tuple[str, ...],
) -> None:
    ss = sub.submission_set
    by_uuid = {o.uuid: o for o in sub.objects}
    documents = [o for o in sub.objects if o.kind is Kind.DOCUMENT_ENTRY]
    folders = [o for o in sub.objects if o.kind is Kind.FOLDER]
    associations = [o for o in sub.objects if o.kind is Kind.ASSOCIATION]

    if patient_id_domains and ss.patient_id:
        authority = ss.patient_id.split("^")[3].split("&")[1]
        if authority not in patient_id_domains:
            errors.append(
                RegistryError(
                    ErrorCode.UNKNOWN_PATIENT_ID,
                    f"patient id {ss.patient_id} is not from an assigning authority of this "
                    "affinity domain",
                )
            )
    for obj in (*documents, *folders):
        if obj.patient_id != ss.patient_id:
            errors.append(
                RegistryError(
                    ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                    f"{obj.kind} {obj.uuid} has patient id {obj.patient_id}, the SubmissionSet "
                    f"{ss.patient_id}",
                )
            )
    seen_unique: dict[str, str] = {}
    for obj in sub.objects:
        if obj.unique_id is None:
            continue
        if obj.unique_id in seen_unique:
            errors.append(
                RegistryError(
                    ErrorCode.REGISTRY_DUPLICATE_UNIQUE_ID_IN_MESSAGE,
                    f"uniqueId {obj.unique_id} is used by {seen_unique[obj.unique_id]} and "
                    f"{obj.uuid}",
                )
            )
        seen_unique[obj.unique_id] = obj.uuid

    members: dict[str, str | None] = {}
    for assoc in associations:
        source, target = assoc.source_uuid or "", assoc.target_uuid or ""
        for end in (source, target):
            if end not in submitted_ids:
                if not end.startswith("urn:uuid:"):
                    errors.append(
                        _metadata_error(f"Association {assoc.uuid}: unresolved reference {end!r}")
                    )
                else:
                    sub.references.add(end)
        if assoc.object_type == ebrim.HAS_MEMBER:
            if source == ss.uuid:
                members[target] = assoc.submission_set_status
                target_obj = by_uuid.get(target)
                expected = "Original" if target_obj is not None else "Reference"
                if target_obj is not None and target_obj.kind is Kind.ASSOCIATION:
                    continue
                if target_obj is not None and target_obj.kind is Kind.FOLDER:
                    continue
                if assoc.submission_set_status != expected:
                    errors.append(
                        _metadata_error(
                            f"Association {assoc.uuid}: SubmissionSet HasMember of "
                            f"{'a submitted' if target_obj else 'an existing'} DocumentEntry "
                            f"needs SubmissionSetStatus {expected!r}"
                        )
                    )
            elif source in by_uuid:
                source_obj = by_uuid[source]
                if source_obj.kind is not Kind.FOLDER:
                    errors.append(
                        _metadata_error(
                            f"Association {assoc.uuid}: HasMember must come from the "
                            "SubmissionSet or a Folder"
                        )
                    )
                else:
                    target_obj = by_uuid.get(target)
                    if target_obj is not None and target_obj.kind is not Kind.DOCUMENT_ENTRY:
                        errors.append(
                            _metadata_error(
                                f"Association {assoc.uuid}: a Folder can only hold DocumentEntries"
                            )
                        )
        elif assoc.object_type in RELATIONSHIP_TYPES or assoc.object_type == ebrim.IS_SNAPSHOT_OF:
            origin = by_uuid.get(source)
            if origin is None or origin.kind is not Kind.DOCUMENT_ENTRY:
                errors.append(
                    _metadata_error(
                        f"Association {assoc.uuid}: the source of a document relationship must be "
                        "a DocumentEntry of this submission"
                    )
                )
            target_obj = by_uuid.get(target)
            if target_obj is not None and assoc.object_type != ebrim.SIGNS:
                errors.append(
                    _metadata_error(
                        f"Association {assoc.uuid}: {assoc.object_type} must target a "
                        "DocumentEntry already in the registry"
                    )
                )
            if assoc.object_type in REPLACING_TYPES and target_obj is None:
                sub.replaced.add(target)
    for obj in (*documents, *folders):
        if obj.uuid not in members:
            errors.append(
                _metadata_error(
                    f"{obj.kind} {obj.uuid} is not a member (HasMember) of the SubmissionSet"
                )
            )
    replacing = [a.target_uuid for a in associations if a.object_type in REPLACING_TYPES]
    if len(replacing) != len(set(replacing)):
        errors.append(_metadata_error("a DocumentEntry is replaced twice in one submission"))


# ------------------------------------------------------------------------ registry-state rules


@dataclass
class RegistryContext:
    """What the store read about existing objects, inside the registering transaction."""

    # Referenced (and replaced) existing objects, by entryUUID.
    objects: dict[str, StoredObject] = field(default_factory=dict)
    # Existing objects holding a uniqueId of the submission.
    unique_ids: dict[str, StoredObject] = field(default_factory=dict)
    # entryUUIDs of the submission that are already in use.
    taken_uuids: set[str] = field(default_factory=set)
    # For each replaced DocumentEntry: associations that target it, and their sources.
    incoming: dict[str, list[StoredObject]] = field(default_factory=dict)
    sources: dict[str, StoredObject] = field(default_factory=dict)


@dataclass
class RegistrationPlan:
    inserts: list[NewObject]
    deprecate: list[str]
    # Folders (entryUUID) whose lastUpdateTime becomes ``now``.
    touch_folders: list[str]
    now: str


def plan_registration(sub: Submission, ctx: RegistryContext) -> RegistrationPlan:
    """Apply the rules that depend on registry content; raise :class:`SubmissionRejected`."""
    errors: list[RegistryError] = []
    for uid in sub.uuids:
        if uid in ctx.taken_uuids:
            errors.append(_metadata_error(f"entryUUID {uid} is already registered"))
    for obj in sub.objects:
        existing = ctx.unique_ids.get(obj.unique_id or "")
        if existing is None:
            continue
        if (
            obj.kind is Kind.DOCUMENT_ENTRY
            and existing.kind is Kind.DOCUMENT_ENTRY
            and existing.hash is not None
            and obj.hash is not None
            and existing.hash.lower() != obj.hash.lower()
        ):
            errors.append(
                RegistryError(
                    ErrorCode.NON_IDENTICAL_HASH,
                    f"DocumentEntry uniqueId {obj.unique_id} is registered with another hash",
                )
            )
        else:
            errors.append(
                RegistryError(
                    ErrorCode.DUPLICATE_UNIQUE_ID_IN_REGISTRY,
                    f"uniqueId {obj.unique_id} is already registered ({existing.uuid})",
                )
            )
    for ref in sorted(sub.references):
        if ref not in ctx.objects:
            errors.append(_metadata_error(f"unresolved reference: {ref} is not in the registry"))
    if errors:
        raise SubmissionRejected(errors)

    by_uuid = {o.uuid: o for o in sub.objects}
    touch: list[str] = []
    deprecate: list[str] = []
    generated: list[NewObject] = []

    def patient_of(uid: str) -> str | None:
        if uid in by_uuid:
            return by_uuid[uid].patient_id
        return ctx.objects[uid].patient_id

    for assoc in (o for o in sub.objects if o.kind is Kind.ASSOCIATION):
        source, target = assoc.source_uuid or "", assoc.target_uuid or ""
        source_existing = ctx.objects.get(source) if source not in by_uuid else None
        target_existing = ctx.objects.get(target) if target not in by_uuid else None
        where = f"Association {assoc.uuid}"
        if assoc.object_type == ebrim.HAS_MEMBER:
            if source_existing is not None:
                if source_existing.kind is not Kind.FOLDER:
                    errors.append(
                        _metadata_error(f"{where}: HasMember source {source} is not a Folder")
                    )
                    continue
                if source not in touch:
                    touch.append(source)
            if target_existing is not None and target_existing.kind not in (
                Kind.DOCUMENT_ENTRY,
                Kind.FOLDER,
                Kind.ASSOCIATION,
            ):
                errors.append(_metadata_error(f"{where}: HasMember of a {target_existing.kind}"))
                continue
            if source == sub.submission_set.uuid and target_existing is not None:
                if target_existing.kind in (Kind.DOCUMENT_ENTRY, Kind.FOLDER) and (
                    target_existing.patient_id != sub.submission_set.patient_id
                ):
                    errors.append(
                        RegistryError(
                            ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                            f"{where}: {target_existing.kind} {target} is of another patient "
                            "than the SubmissionSet",
                        )
                    )
                continue
            folder = source_existing or by_uuid.get(source)
            if folder is not None and folder.kind is Kind.FOLDER:
                target_kind = target_existing.kind if target_existing else by_uuid[target].kind
                if target_kind is not Kind.DOCUMENT_ENTRY:
                    errors.append(
                        _metadata_error(f"{where}: a Folder can only hold DocumentEntries")
                    )
                elif patient_of(source) != patient_of(target):
                    errors.append(
                        RegistryError(
                            ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                            f"{where}: Folder {source} and DocumentEntry {target} are of "
                            "different patients",
                        )
                    )
        elif assoc.object_type in RELATIONSHIP_TYPES or assoc.object_type == ebrim.IS_SNAPSHOT_OF:
            if target_existing is None:
                continue  # signs within the submission
            if target_existing.kind is not Kind.DOCUMENT_ENTRY:
                errors.append(_metadata_error(f"{where}: target {target} is not a DocumentEntry"))
                continue
            if patient_of(source) != target_existing.patient_id:
                errors.append(
                    RegistryError(
                        ErrorCode.PATIENT_ID_DOES_NOT_MATCH,
                        f"{where}: the related DocumentEntries are of different patients",
                    )
                )
                continue
            if assoc.object_type != ebrim.SIGNS and target_existing.status != ebrim.STATUS_APPROVED:
                errors.append(
                    RegistryError(
                        ErrorCode.REGISTRY_DEPRECATED_DOCUMENT_ERROR,
                        f"{where}: {assoc.object_type.rsplit(':', 1)[-1]} of DocumentEntry "
                        f"{target}, which is not Approved",
                    )
                )
                continue
            if assoc.object_type in REPLACING_TYPES:
                deprecate.append(target)
                # Transforms and addenda of the replaced document go with it (ITI TF-3 4.1.6).
                for incoming in ctx.incoming.get(target, []):
                    origin = ctx.sources.get(incoming.source_uuid or "")
                    if origin is None:
                        continue
                    if (
                        incoming.object_type in (ebrim.XFRM, ebrim.APND)
                        and origin.kind is Kind.DOCUMENT_ENTRY
                        and origin.status == ebrim.STATUS_APPROVED
                        and origin.uuid not in deprecate
                    ):
                        deprecate.append(origin.uuid)
                    elif incoming.object_type == ebrim.HAS_MEMBER and origin.kind is Kind.FOLDER:
                        # The replacement joins the Folders of the original (ITI TF-3 4.1.6.1).
                        generated.append(_has_member(origin.uuid, source))
                        if origin.uuid not in touch:
                            touch.append(origin.uuid)
    if errors:
        raise SubmissionRejected(errors)
    return RegistrationPlan([*sub.objects, *generated], deprecate, touch, sub.registered_at)


def _has_member(source: str, target: str) -> NewObject:
    uid = f"urn:uuid:{uuid.uuid4()}"
    element = etree.Element(
        f"{{{RIM}}}Association",
        nsmap={"rim": RIM},
        id=uid,
        lid=uid,
        associationType=ebrim.HAS_MEMBER,
        sourceObject=source,
        targetObject=target,
        objectType=ebrim.OBJECT_TYPE_ASSOCIATION,
        status=ebrim.STATUS_APPROVED,
    )
    obj = NewObject(uid, Kind.ASSOCIATION, ebrim.HAS_MEMBER, element, lid=uid)
    obj.source_uuid, obj.target_uuid = source, target
    return obj
