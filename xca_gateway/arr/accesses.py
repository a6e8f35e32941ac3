"""Audit records grouped into accesses: what the patient access report lists (sans-IO).

One user request leaves several records across the federation: a consumer's RAD-69 at the
initiating gateway is recorded there (RAD-69, and RAD-75 out to each community holding the
images) and at every responding gateway (RAD-75); a C-GET at the DIMSE door adds the door's own
query and manifest fetches (ITI-38, ITI-39). The officer asks "who looked at this patient's
images, from where, and when", so the report shows one row per *access*:

* the entry point of a request is its *primary* record: ITI-18, ITI-43 (served), RAD-69
  (served), a DIMSE C-FIND / C-GET / C-MOVE, a QIDO-RS or WADO-RS, an import, a clinician's
  IID launch (RAD-106) or a study a clinician viewed (both DICOM Instances Accessed, 110103);
* the federation legs (ITI-38, ITI-39, RAD-75, ITI-55, a relayed ITI-43 or RAD-69) attach to the
  nearest primary recorded at or after them for the same person (resolved through the
  cross-reference table) that accepts them, preferring the same user and the same studies or
  documents; each leg says which community answered;
* the records one request splits into (DICOM A.5.2: successes and failures apart; one record per
  patient) merge back into one access;
* a leg whose primary is not in the repository (a foreign gateway that does not report here)
  is an access of its own.

Counts (studies, series, instances, documents) come from the primary's successful records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from xca_gateway.arr.parse import FLAG_SOURCE_UNBOUND, AuditRecord, patient_key

__all__ = ["Access", "AccessRecord", "group_accesses", "kind_of"]

QUERY = "query"
DOCUMENT_RETRIEVE = "document retrieve"
STUDY_RETRIEVE = "study retrieve"
IMPORT = "import"
REGISTER = "register"
# A clinician in a browser (the web door): an IID launch (RAD-106) lists the patient's studies,
# a view is a study shown to them (DICOM Instances Accessed, 110103, action R, no transaction).
LAUNCH = "launch"
VIEW = "view"
LAUNCH_LABEL = "IID launch (RAD-106)"
VIEW_LABEL = "Study viewed (110103)"

# A leg is recorded before its primary (which is written once the answer went out), by at
# most this much (the gateways' request timeouts are shorter); and after it by clock skew only.
LEG_WINDOW = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=5)
# Records of one request recorded apart (success and failure, one per patient) carry the same
# EventDateTime (our gateways stamp them once); others' within the millisecond they are
# written in. A fast client's next request comes later than that (the demo's: 10 ms).
SPLIT_WINDOW = timedelta(milliseconds=2)

_SERIES_DETAIL = "Series Instance Unique Id"
_STUDY_ID_TYPE = "110180"
_DOCUMENT_ID_TYPE = "9"
_SOP_CLASS_ID_TYPE = "110181"


@dataclass(frozen=True)
class AccessRecord:
    """A stored record as the grouping needs it."""

    record_id: int
    record: AuditRecord


@dataclass(frozen=True)
class Role:
    """What a record is in an access: its kind, the transaction label shown, primary or leg."""

    kind: str
    label: str
    primary: bool


def _is_move(record: AuditRecord) -> bool:
    # C-MOVE: a third system (no Source/Destination role) asked for the transfer.
    return any(not p.roles and p.user_is_requestor for p in record.participants)


def kind_of(record: AuditRecord) -> Role | None:
    """The role of a record in the report; None for what is not an access to patient data
    (application start/stop, security alerts, audit log use)."""
    event = record.event_id.code if record.event_id else None
    transaction = record.transaction.code if record.transaction else None
    action = record.action
    if transaction == "ITI-18":
        return Role(QUERY, "ITI-18 Registry Stored Query", True)
    if transaction == "RAD-129":
        return Role(QUERY, "QIDO-RS", True)
    if transaction in ("ITI-38", "ITI-55", "ITI-45"):
        return Role(QUERY, transaction, False)
    if transaction == "ITI-43":
        # The repository side hands documents out (Export): the consumer-facing entry point.
        if event == "110106":
            return Role(DOCUMENT_RETRIEVE, "ITI-43 Retrieve Document Set", True)
        return Role(DOCUMENT_RETRIEVE, "ITI-43", False)
    if transaction == "ITI-39":
        return Role(DOCUMENT_RETRIEVE, "ITI-39", False)
    if transaction == "RAD-69":
        if action == "R":
            return Role(STUDY_RETRIEVE, "RAD-69 Retrieve Imaging Document Set", True)
        return Role(STUDY_RETRIEVE, "RAD-69", False)
    if transaction == "RAD-75":
        return Role(STUDY_RETRIEVE, "RAD-75", False)
    if transaction == "RAD-107":
        return Role(STUDY_RETRIEVE, "WADO-RS", True)
    if transaction == "ITI-42":
        return Role(REGISTER, "ITI-42 Register Document Set", True)
    if transaction is None and event == "110104":
        return Role(STUDY_RETRIEVE, "C-MOVE" if _is_move(record) else "C-GET", True)
    if transaction is None and event == "110112":
        if any(e.id_type and e.id_type.code == _SOP_CLASS_ID_TYPE for e in record.entities):
            return Role(QUERY, "C-FIND", True)
        return None
    if transaction is None and event == "110107":
        return Role(IMPORT, "Import", True)
    if event == "110103" and action == "R":
        # DICOM Instances Accessed, read: the web door's records of what a person was shown.
        if transaction == "RAD-106":
            return Role(LAUNCH, LAUNCH_LABEL, True)
        if transaction is None:
            return Role(VIEW, VIEW_LABEL, True)
    return None


# Which legs an access of each kind takes in; a DIMSE / DICOMweb retrieve first finds the
# patient's manifests itself (ITI-38 out, ITI-39 for the manifests).
_ACCEPTS: dict[str, frozenset[str]] = {
    QUERY: frozenset({"ITI-38", "ITI-55", "ITI-45"}),
    DOCUMENT_RETRIEVE: frozenset({"ITI-39", "ITI-43"}),
    STUDY_RETRIEVE: frozenset({"RAD-75", "RAD-69"}),
    IMPORT: frozenset(),
    REGISTER: frozenset(),
    # The launch's search of the federation: queries out, manifests fetched.
    LAUNCH: frozenset({"ITI-38", "ITI-55", "ITI-45", "ITI-39", "ITI-43"}),
    # A view's images came through the door's WADO-RS (its own access, which takes the legs);
    # the view names the community holding the study itself.
    VIEW: frozenset(),
}
_DOOR_RETRIEVES = frozenset({"C-GET", "C-MOVE", "WADO-RS"})
_DOOR_EXTRA = frozenset({"ITI-38", "ITI-55", "ITI-45", "ITI-39", "ITI-43"})


@dataclass
class Access:
    """One row of the report."""

    kind: str
    label: str
    first: datetime
    last: datetime
    user: str | None
    node: str | None
    recorded_by: list[str] = field(default_factory=list)
    record_ids: list[int] = field(default_factory=list)
    leg_ids: list[int] = field(default_factory=list)
    communities: list[str] = field(default_factory=list)
    # CX id -> name (None when no record named it)
    patients: dict[str, str | None] = field(default_factory=dict)
    persons: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    instances: int = 0
    documents: set[str] = field(default_factory=set)
    outcomes: list[int] = field(default_factory=list)
    outcome_descriptions: list[str] = field(default_factory=list)
    purposes: list[str] = field(default_factory=list)
    sender_identities: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    # Studies / documents named by any record (delivered or not): to match legs.
    objects: set[str] = field(default_factory=set)
    user_keys: set[str] = field(default_factory=set)

    @property
    def time(self) -> datetime:
        return self.last

    @property
    def outcome(self) -> int | None:
        """0 when everything succeeded, 4 when some part failed, else the worst failure."""
        if not self.outcomes:
            return None
        if all(o == 0 for o in self.outcomes):
            return 0
        if any(o == 0 for o in self.outcomes):
            return 4
        return max(self.outcomes)

    @property
    def unbound(self) -> bool:
        """Recorded by a sender not bound to the AuditSourceID it reported as."""
        return FLAG_SOURCE_UNBOUND in self.flags

    @property
    def primary_id(self) -> int:
        return self.record_ids[0] if self.record_ids else self.leg_ids[0]


def _add(values: list[str], new: Iterable[str | None]) -> None:
    for value in new:
        if value and value not in values:
            values.append(value)


def _objects(record: AuditRecord) -> set[str]:
    return {
        e.object_id
        for e in record.entities
        if e.object_id and e.id_type and e.id_type.code in (_STUDY_ID_TYPE, _DOCUMENT_ID_TYPE)
    }


def _same_sender(access: Access, record: AuditRecord) -> bool:
    """Records one request split into come from one sender: never merge a record another
    node sent (e.g. one passing itself off as that audit source) into an access."""
    return (record.sender_identity or "") in (access.sender_identities or [""])


def _user(record: AuditRecord) -> str | None:
    requestor = record.requestor
    if requestor is None:
        return None
    return requestor.user_name or requestor.user_id


def _node(record: AuditRecord) -> str | None:
    system = record.requesting_system
    if system is not None:
        return system.network_access_point_id or system.user_id
    return None


class _Grouper:
    def __init__(self, person_of: Callable[[str], str]) -> None:
        self.person_of = person_of

    def persons(self, record: AuditRecord) -> set[str]:
        return {self.person_of(patient_key(p)) for p in record.patient_ids}

    def new_access(self, item: AccessRecord, role: Role) -> Access:
        record = item.record
        access = Access(
            kind=role.kind,
            label=role.label,
            first=record.event_time,
            last=record.event_time,
            user=_user(record),
            node=_node(record),
        )
        return access

    def absorb(self, access: Access, item: AccessRecord, *, leg: bool) -> None:
        record = item.record
        access.first = min(access.first, record.event_time)
        access.last = max(access.last, record.event_time)
        (access.leg_ids if leg else access.record_ids).append(item.record_id)
        _add(access.recorded_by, [record.audit_source_id])
        transaction = record.transaction.code if record.transaction else ""
        if not leg or transaction in _ACCEPTS.get(access.kind, frozenset()):
            # Where the data came from; a door's own search asks every community, which says
            # nothing about where the images it then retrieved were.
            _add(access.communities, record.community_ids)
        access.persons |= self.persons(record)
        for entity in record.entities:
            if entity.is_patient and entity.object_id and not access.patients.get(entity.object_id):
                access.patients[entity.object_id] = entity.name or None
        access.objects |= _objects(record)
        if not leg:
            access.user_keys |= set(record.user_keys)
            if record.outcome is not None:
                access.outcomes.append(record.outcome)
            _add(access.outcome_descriptions, [record.outcome_description])
            _add(access.purposes, (c.display or c.code for c in record.purposes_of_use))
            _add(access.sender_identities, [record.sender_identity])
            _add(access.flags, record.flags)
            if record.outcome == 0:
                self.count(access, record)

    def count(self, access: Access, record: AuditRecord) -> None:
        for entity in record.entities:
            code = entity.id_type.code if entity.id_type else None
            if code == _STUDY_ID_TYPE and entity.object_id:
                access.studies.add(entity.object_id)
                access.series |= set(entity.detail_values([_SERIES_DETAIL]))
                access.instances += sum(n or 0 for _uid, n in entity.sop_classes)
            elif code == _DOCUMENT_ID_TYPE and entity.object_id:
                access.documents.add(entity.object_id)

    def accepts(self, access: Access, leg_transaction: str) -> bool:
        if leg_transaction in _ACCEPTS.get(access.kind, frozenset()):
            return True
        return access.label in _DOOR_RETRIEVES and leg_transaction in _DOOR_EXTRA


def group_accesses(
    records: Sequence[AccessRecord],
    *,
    person_of: Callable[[str], str] = lambda key: key,
) -> list[Access]:
    """The accesses of ``records`` (any order), newest first. ``person_of`` maps a patient key
    (:func:`~xca_gateway.arr.parse.patient_key`) to the person it belongs to (the same value for
    every id of one person: the cross-reference table)."""
    grouper = _Grouper(person_of)
    items = sorted(
        ((item, role) for item in records if (role := kind_of(item.record)) is not None),
        key=lambda pair: (pair[0].record.event_time, pair[0].record_id),
    )
    accesses: list[Access] = []
    legs: list[tuple[AccessRecord, Role]] = []
    # Primaries first: one request's split records merge into one access.
    for item, role in items:
        if not role.primary:
            legs.append((item, role))
            continue
        record = item.record
        persons = grouper.persons(record)
        user, source = _user(record), record.audit_source_id
        merged = False
        for access in reversed(accesses):
            if record.event_time - access.last > SPLIT_WINDOW:
                break
            if (
                access.label == role.label
                and access.user == user
                and source in access.recorded_by
                and _same_sender(access, record)
                and (access.persons & persons or not persons)
            ):
                grouper.absorb(access, item, leg=False)
                merged = True
                break
        if not merged:
            access = grouper.new_access(item, role)
            grouper.absorb(access, item, leg=False)
            accesses.append(access)
    # Then each leg to the nearest access recorded at or after it that takes it in.
    orphans: list[Access] = []
    for item, role in legs:
        record = item.record
        transaction = record.transaction.code if record.transaction else ""
        persons = grouper.persons(record)
        objects = _objects(record)
        users = set(record.user_keys)
        best: tuple[tuple[int, int, int, float], Access] | None = None
        for access in accesses:
            gap = access.last - record.event_time
            if gap < -CLOCK_SKEW or gap > LEG_WINDOW:
                continue
            if not grouper.accepts(access, transaction):
                continue
            if persons and access.persons and not persons & access.persons:
                continue
            score = (
                0 if objects & access.objects else 1,
                0 if users & access.user_keys else 1,
                0 if gap >= timedelta(0) else 1,  # recorded after it: clock skew only
                abs(gap.total_seconds()),
            )
            if best is None or score < best[0]:
                best = (score, access)
        if best is not None:
            grouper.absorb(best[1], item, leg=True)
            continue
        # No primary here: the leg is the only trace of the access (e.g. a foreign gateway).
        merged = False
        for access in orphans:
            if (
                access.label == role.label
                and abs(access.last - record.event_time) <= SPLIT_WINDOW
                and access.user == _user(record)
                and access.recorded_by == [record.audit_source_id]
                and _same_sender(access, record)
            ):
                grouper.absorb(access, item, leg=False)
                merged = True
                break
        if not merged:
            access = grouper.new_access(item, role)
            grouper.absorb(access, item, leg=False)
            orphans.append(access)
    result = accesses + orphans
    result.sort(key=lambda a: (a.last, a.primary_id), reverse=True)
    return result
