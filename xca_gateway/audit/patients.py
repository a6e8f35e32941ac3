"""Who a retrieve was about: the patient of each document, study and SOP instance. Sans-IO.

A retrieve request names documents or instances, never the patient, yet every retrieve audit
record must name one (DICOM PS3.15 A.5.3.4, ITI TF-2 3.39.5/3.43.5). Each side learns it where
it can:

* the registry's metadata: a DocumentEntry's patientId and sourcePatientInfo (PID-5 name), and
  the studies its referenceIdList names (:func:`entry_patients`, on a responding gateway from
  its own registry, on an initiating gateway from the query answers that went through it);
* the DICOM instances themselves as they stream: PatientID + IssuerOfPatientID, PatientName
  and the SOP Class UID of each header (:class:`HeaderSniffer`);
* the KOS manifests a front door read (:meth:`PatientMemory.learn_study`).

:class:`PatientMemory` keeps what an initiating gateway learnt from answers that went through
it, bounded (oldest first out) and thread-safe (the DIMSE door works from pynetdicom's threads),
so that the retrieve that follows a query is audited with the query's patient. What it never
saw it cannot tell: the audit record then says "patient not known to this node".
"""

from __future__ import annotations

import io
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from lxml import etree

from xca_gateway.audit.messages import PatientRef
from xca_gateway.protocol.namespaces import RIM
from xca_gateway.xds import ebrim

# request.context keys through which handlers tell the auditor what they know: uid (document
# uniqueId, Study or SOP Instance UID) -> PatientRef, and a retrieve's InstanceObservations.
CONTEXT_PATIENTS = "audit_patients"
CONTEXT_INSTANCES = "audit_instances"

__all__ = [
    "CONTEXT_INSTANCES",
    "CONTEXT_PATIENTS",
    "HeaderSniffer",
    "InstanceFacts",
    "InstanceObservations",
    "PatientMemory",
    "entry_patients",
    "header_facts",
]

# The part of a DICOM instance read to find its header's patient (the patient module comes
# early; a header beyond this is not looked for further, the instance streams on regardless).
MAX_SNIFF_BYTES = 256 * 1024
DEFAULT_MEMORY_SIZE = 200_000

_PATIENT_GROUP_END = 0x0010_0024  # IssuerOfPatientIDQualifiersSequence

_V = TypeVar("_V")


# --------------------------------------------------------------------------- XDS metadata


@dataclass(frozen=True)
class EntryPatient:
    """One DocumentEntry's patient, and the studies it references (KOS manifests)."""

    document_unique_id: str
    patient: PatientRef
    study_instance_uids: tuple[str, ...] = ()


def _slot_values(element: etree._Element, name: str) -> list[str]:
    return [
        (v.text or "").strip()
        for slot in element.iterfind(f"{{{RIM}}}Slot")
        if slot.get("name") == name
        for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
    ]


def _pid5(source_patient_info: Iterable[str]) -> str | None:
    """The patient name (PID-5, HL7 XPN ``Family^Given``) of a sourcePatientInfo slot."""
    for value in source_patient_info:
        field, _, rest = value.partition("|")
        if field.strip().upper() == "PID-5" and rest.strip("^ "):
            # The first repetition, components as DICOM PN has them.
            return rest.split("~", 1)[0].strip()
    return None


def _external_id(entry: etree._Element, scheme: str) -> str:
    for ext in entry.iterfind(f"{{{RIM}}}ExternalIdentifier"):
        if ext.get("identificationScheme") == scheme:
            return (ext.get("value") or "").strip()
    return ""


def entry_patients(root: etree._Element) -> Iterator[EntryPatient]:
    """The patients of the DocumentEntries (ExtrinsicObjects) under ``root``: a query answer
    or a stored registry object. Entries without uniqueId or patientId are skipped."""
    entries = (
        [root]
        if root.tag == f"{{{RIM}}}ExtrinsicObject"
        else root.iter(f"{{{RIM}}}ExtrinsicObject")
    )
    for entry in entries:
        unique_id = _external_id(entry, ebrim.DE_UNIQUE_ID)
        patient_id = _external_id(entry, ebrim.DE_PATIENT_ID)
        if not unique_id or not patient_id:
            continue
        studies = []
        for value in _slot_values(entry, ebrim.SLOT_REFERENCE_ID_LIST):
            # CXi: id^^^^type (the 5th component says what the id is).
            parts = value.split("^")
            if len(parts) >= 5 and parts[4] == ebrim.REFERENCE_ID_STUDY_INSTANCE_UID and parts[0]:
                studies.append(parts[0])
        name = _pid5(_slot_values(entry, ebrim.SLOT_SOURCE_PATIENT_INFO))
        yield EntryPatient(unique_id, PatientRef(patient_id, name), tuple(studies))


# --------------------------------------------------------------------------- DICOM headers


@dataclass(frozen=True)
class InstanceFacts:
    """What an instance's own header says about it."""

    patient: PatientRef | None
    sop_class_uid: str | None


def header_patient(patient_id: str, issuer: str, name: str | None) -> PatientRef | None:
    """The CX of a DICOM Patient ID and its issuer (the bare id when there is no issuer)."""
    patient_id, issuer = patient_id.strip(), issuer.strip()
    if not patient_id:
        return None
    cx = f"{patient_id}^^^&{issuer}&ISO" if issuer else patient_id
    return PatientRef(cx, (name or "").strip() or None)


def header_facts(data: bytes, *, complete: bool) -> InstanceFacts | None:
    """The facts of a DICOM Part 10 instance from its first bytes; None while more bytes are
    needed (``complete``: there are no more, answer with what there is)."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    buffer = io.BytesIO(data)
    try:
        ds = read_partial(
            buffer,
            stop_when=lambda tag, _vr, _length: int(tag) > _PATIENT_GROUP_END,
        )
        stopped = buffer.tell() < len(data)
        if not stopped and not complete:
            return None
        pid = str(ds.get("PatientID", "") or "")
        issuer = str(ds.get("IssuerOfPatientID", "") or "")
        for item in ds.get("IssuerOfPatientIDQualifiersSequence", []) or []:
            issuer = issuer or str(item.get("UniversalEntityID", "") or "")
        name = str(ds.get("PatientName", "") or "")
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or "") or (
            str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
        )
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        # Cut in the middle of an element: more bytes may complete it.
        if not complete and len(data) < MAX_SNIFF_BYTES:
            return None
        return InstanceFacts(None, None)
    except Exception:  # a header pydicom cannot read tells us nothing, and stops nothing
        return InstanceFacts(None, None)
    return InstanceFacts(header_patient(pid, issuer, name), sop_class or None)


_MORE = object()
# The file meta group is a few hundred bytes.
_MAX_META_BYTES = 16 * 1024
# Explicit VRs with a 4-byte length (PS3.5 7.1.2); the others have 2 bytes.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"} | {b"UR", b"UT", b"UV"}
)


_ELEMENT_HEAD = struct.Struct("<HH2sH")  # group, element, VR, a 2-byte length
_LONG_LENGTH = struct.Struct("<I")


def meta_sop_class(data: bytes | bytearray | memoryview) -> str | object | None:
    """MediaStorageSOPClassUID from a Part 10 file meta group (explicit VR little endian,
    PS3.10 7.1): cheap enough for every instance, read where it lies (``data`` may be a view
    of a relay's receive buffer: only the UID is copied). ``_MORE`` while the group is
    incomplete, None when the bytes are not Part 10."""
    end = len(data)
    if end < 132:
        return _MORE
    if data[128:132] != b"DICM":
        return None
    pos = 132
    unpack = _ELEMENT_HEAD.unpack_from
    while True:
        if end < pos + 8:
            return _MORE
        group, element, vr, length = unpack(data, pos)
        if group != 0x0002:
            return None
        if vr in _LONG_VRS:
            if end < pos + 12:
                return _MORE
            (length,) = _LONG_LENGTH.unpack_from(data, pos + 8)
            pos += 12
        else:
            pos += 8
        if length == 0xFFFFFFFF:
            return None
        if element == 0x0002:
            if end < pos + length:
                return _MORE
            uid = bytes(data[pos : pos + length]).rstrip(b"\x00 ")
            return uid.decode("ascii", "replace") or None
        pos += length


class HeaderSniffer:
    """Reads the facts of one instance from its chunks as they stream past, without holding
    more than :data:`MAX_SNIFF_BYTES` of it; :attr:`facts` once known.

    The SOP class (file meta) is read for every instance; the patient (the dataset's patient
    module, parsed by pydicom, about a millisecond) only when ``want_patient``: the caller
    reads it once per series, as a series belongs to one patient (PS3.3 C.7.3).
    """

    def __init__(self, want_patient: bool = True) -> None:
        self._buffer = bytearray()
        self.want_patient = want_patient
        self.facts: InstanceFacts | None = None

    @property
    def done(self) -> bool:
        return self.facts is not None

    def feed(self, chunk: bytes | bytearray | memoryview) -> InstanceFacts | None:
        if self.facts is not None:
            return self.facts
        if not self.want_patient and not self._buffer:
            # Nearly always: the instance's first piece holds its whole file meta group,
            # read in place instead of copied into the buffer.
            sop_class = meta_sop_class(chunk)
            if sop_class is not _MORE:
                self.facts = InstanceFacts(None, sop_class if isinstance(sop_class, str) else None)
                return self.facts
        limit = MAX_SNIFF_BYTES if self.want_patient else _MAX_META_BYTES
        room = limit - len(self._buffer)
        self._buffer += chunk[:room]
        self._try(complete=len(self._buffer) >= limit)
        return self.facts

    def _try(self, *, complete: bool) -> None:
        data = bytes(self._buffer)
        if self.want_patient:
            # Parse once the meta and patient module are likely in (not per tiny chunk).
            if complete or len(data) >= 4096:
                self.facts = header_facts(data, complete=complete)
        else:
            sop_class = meta_sop_class(data)
            if sop_class is _MORE and not complete:
                return
            self.facts = InstanceFacts(None, sop_class if isinstance(sop_class, str) else None)
        if self.facts is not None:
            self._buffer = bytearray()

    def finish(self) -> InstanceFacts:
        """The instance ended: the facts from whatever was seen."""
        if self.facts is None:
            self._try(complete=True)
        assert self.facts is not None
        return self.facts


class InstanceObservations:
    """What the headers of one retrieve's instances said as they streamed past: the patient of
    each series (read from its first instance) and each instance's SOP class. Filled by the
    streaming engine, read by the audit once the response went out."""

    def __init__(self) -> None:
        self.sop_classes: dict[str, str] = {}
        self._classes: dict[str, str] = {}
        # Series Instance UID -> its patient; SOP Instance UID -> its series.
        self._series_patients: dict[str, PatientRef] = {}
        self._series_of: dict[str, str] = {}

    def sniffer(self, series_instance_uid: str) -> HeaderSniffer:
        return HeaderSniffer(want_patient=series_instance_uid not in self._series_patients)

    def record(self, sop_instance_uid: str, series_instance_uid: str, facts: InstanceFacts) -> None:
        self._series_of[sop_instance_uid] = series_instance_uid
        if facts.sop_class_uid:
            # A handful of SOP classes per study: one string each, not one per instance.
            self.sop_classes[sop_instance_uid] = self._classes.setdefault(
                facts.sop_class_uid, facts.sop_class_uid
            )
        if facts.patient is not None:
            self._series_patients.setdefault(series_instance_uid, facts.patient)

    def patients(self) -> dict[str, PatientRef]:
        """SOP Instance UID -> patient, for every instance seen whose series named one."""
        return {
            sop: patient
            for sop, series in self._series_of.items()
            if (patient := self._series_patients.get(series)) is not None
        }


# --------------------------------------------------------------------------- memory


class PatientMemory:
    """Patients by document uniqueId, Study Instance UID and SOP Instance UID, learnt from
    the answers that went through this gateway; bounded LRU, thread-safe."""

    def __init__(self, max_entries: int = DEFAULT_MEMORY_SIZE) -> None:
        self.max_entries = max_entries
        self._patients: OrderedDict[str, PatientRef] = OrderedDict()
        self._sop_classes: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._patients)

    def _put(self, store: OrderedDict[str, _V], key: str, value: _V) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > self.max_entries:
            store.popitem(last=False)

    def learn(self, uid: str, patient: PatientRef) -> None:
        """``uid`` (a document uniqueId, Study or SOP Instance UID: all globally unique)."""
        if not uid or not patient.patient_id:
            return
        with self._lock:
            known = self._patients.get(uid)
            if known is not None and known.patient_id == patient.patient_id and not patient.name:
                patient = known  # keep a name learnt earlier
            self._put(self._patients, uid, patient)

    def learn_sop_class(self, sop_instance_uid: str, sop_class_uid: str) -> None:
        if sop_instance_uid and sop_class_uid:
            with self._lock:
                self._put(self._sop_classes, sop_instance_uid, sop_class_uid)

    def learn_entries(self, root: etree._Element) -> int:
        """Every DocumentEntry's patient (and its referenced studies') under ``root``."""
        count = 0
        for found in entry_patients(root):
            self.learn(found.document_unique_id, found.patient)
            for study in found.study_instance_uids:
                self.learn(study, found.patient)
            count += 1
        return count

    def patient(self, *uids: str) -> PatientRef | None:
        """The patient of the first of ``uids`` that is known (e.g. SOP Instance, then Study)."""
        with self._lock:
            for uid in uids:
                found = self._patients.get(uid) if uid else None
                if found is not None:
                    return found
        return None

    def sop_class(self, sop_instance_uid: str) -> str | None:
        with self._lock:
            return self._sop_classes.get(sop_instance_uid)


def merged(*mappings: Mapping[str, PatientRef] | None) -> dict[str, PatientRef]:
    """The union of uid -> patient mappings, the earlier winning."""
    out: dict[str, PatientRef] = {}
    for mapping in reversed([m for m in mappings if m]):
        out.update(mapping)
    return out
