"""DICOM PS3.15 Annex A.5 audit messages (ATNA ITI-20) as the IHE frameworks shape them.

Sans-IO: frozen dataclasses for the message model with a ``to_xml()`` builder, the participant
and object helpers, and the shapes the transactions share (:func:`query_message`,
:func:`document_retrieve_messages`, :func:`imaging_retrieve_messages`, who took part as one
:class:`Parties`); each IHE transaction's own record, per side, is built in its module
(``xca_gateway.transactions.iti38.query_audit`` and so on). The field values follow ITI TF-2 /
RAD TF-3 audit sections (cross-checked against IPF's audit strategies and dcm4che's audit
messages): queries are EventID 110112 "Query"; retrieves are 110107 "Import" on the side that
receives the documents and 110106 "Export" on the side that hands them out; imaging retrieves
are 110104 "DICOM Instances Transferred" on both ends (PS3.15 A.5.3.4 describes one transfer
between two Application Entities, reported by each: action R by the sender, C by the receiver,
which holds no copy before), so that an audit repository can pair the two records.

Participants. Queries name the requester as Source (110153) and the responder as Destination
(110152). Retrieves name them the other way round: the Source is where the documents come from
(repository, Responding Gateway) and the Destination is the requester, as ITI-43/ITI-39/RAD-69/
RAD-75 define it. The local system carries its process id as AlternativeUserID; a remote system
carries its TLS certificate subject as UserName. XUA users become "human requestor" participants
named ``alias<user@issuer>`` (ITI TF-2 3.40.4.2).

A.5.2: when some documents of a retrieve succeed and others fail, the retrieve records are one
message for the successes (outcome 0) and one for the failures.

Every retrieve record names its patient (ParticipantObjectTypeCode 1, role 1, the CX id and,
when seen, the name): A.5.3.4 allows one patient per record, so a retrieve spanning several
patients gives one record per patient (``patients`` maps each document or SOP instance to
its patient). A record whose patient the system cannot tell carries a Patient participant
without id and a ``PatientNotKnown`` detail saying so, rather than silently none.
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from xca_gateway.protocol.namespaces import WSA_ANONYMOUS, ResponseStatus

_T = TypeVar("_T")

XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class CodedValue:
    """A DICOM audit coded value: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    code_system_name: str
    original_text: str
    display_name: str | None = None


class EventOutcome(enum.IntEnum):
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    # "Reporting application now unavailable".
    MAJOR_FAILURE = 12


EventAction = Literal["C", "R", "U", "D", "E"]


def _dcm(code: str, text: str) -> CodedValue:
    return CodedValue(code, "DCM", text)


def _ihe(code: str, text: str) -> CodedValue:
    return CodedValue(code, "IHE Transactions", text)


def _rfc3881(code: str, text: str) -> CodedValue:
    return CodedValue(code, "RFC-3881", text)


class EventId:
    """DICOM CID 400 Audit Event ID."""

    APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
    AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
    BEGIN_TRANSFERRING_DICOM_INSTANCES = _dcm("110102", "Begin Transferring DICOM Instances")
    DICOM_INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
    DICOM_INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
    EXPORT = _dcm("110106", "Export")
    IMPORT = _dcm("110107", "Import")
    QUERY = _dcm("110112", "Query")
    SECURITY_ALERT = _dcm("110113", "Security Alert")
    USER_AUTHENTICATION = _dcm("110114", "User Authentication")


class EventTypeCode:
    """DICOM CID 401 event types and the IHE transaction codes."""

    APPLICATION_START = _dcm("110120", "Application Start")
    APPLICATION_STOP = _dcm("110121", "Application Stop")
    LOGIN = _dcm("110122", "Login")
    LOGOUT = _dcm("110123", "Logout")
    NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
    ITI18 = _ihe("ITI-18", "Registry Stored Query")
    ITI38 = _ihe("ITI-38", "Cross Gateway Query")
    ITI39 = _ihe("ITI-39", "Cross Gateway Retrieve")
    ITI42 = _ihe("ITI-42", "Register Document Set-b")
    ITI43 = _ihe("ITI-43", "Retrieve Document Set")
    ITI45 = _ihe("ITI-45", "PIX Query")
    ITI55 = _ihe("ITI-55", "Cross Gateway Patient Discovery")
    RAD69 = _ihe("RAD-69", "Retrieve Imaging Document Set")
    RAD75 = _ihe("RAD-75", "Cross Gateway Retrieve Imaging Document Set")


class RoleId:
    """DICOM CID 402 Audit Active Participant Role ID."""

    APPLICATION = _dcm("110150", "Application")
    APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
    DESTINATION = _dcm("110152", "Destination Role ID")
    SOURCE = _dcm("110153", "Source Role ID")


class ParticipantObjectIdType:
    """ParticipantObjectIDTypeCode values (RFC 3881, DICOM CID 404, IHE)."""

    PATIENT_NUMBER = _rfc3881("2", "Patient Number")
    REPORT_NUMBER = _rfc3881("9", "Report Number")
    URI = _rfc3881("12", "URI")
    STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
    SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
    NODE_ID = _dcm("110182", "Node ID")
    XDS_SUBMISSION_SET = CodedValue(
        "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd",
        "IHE XDS Metadata",
        "submission set classificationNode",
    )


class ObjectType(enum.IntEnum):
    PERSON = 1
    SYSTEM_OBJECT = 2
    ORGANIZATION = 3
    OTHER = 4


class ObjectRole(enum.IntEnum):
    PATIENT = 1
    REPORT = 3
    RESOURCE = 4
    USER = 6
    SECURITY_RESOURCE = 13
    JOB = 20
    QUERY = 24
    PROCESSING_ELEMENT = 26


class AuditSourceType(enum.IntEnum):
    END_USER_INTERFACE = 1
    DATA_ACQUISITION_DEVICE = 2
    WEB_SERVER = 3
    APPLICATION_SERVER = 4
    DATABASE_SERVER = 5
    SECURITY_SERVER = 6
    NETWORK_COMPONENT = 7
    OPERATING_SOFTWARE = 8
    OTHER = 9


_AUDIT_SOURCE_TYPE_TEXT = {
    1: "End-user display device, diagnostic device",
    2: "Data acquisition device or instrument",
    3: "Web Server process or thread",
    4: "Application Server process or thread",
    5: "Database Server process or thread",
    6: "Security server, e.g., a domain controller",
    7: "ISO level 1-3 network component",
    8: "ISO level 4-6 operating software",
    9: "other",
}

# ParticipantObjectDetail types used by IHE (names as IPF and the Gazelle audit specs use them).
DETAIL_QUERY_ENCODING = "QueryEncoding"
# DICOM A.5.3.12: the transfer syntax a DIMSE query identifier is encoded in.
DETAIL_TRANSFER_SYNTAX = "TransferSyntax"
DETAIL_XCA_HOME_COMMUNITY_ID = "urn:ihe:iti:xca:2010:homeCommunityId"
DETAIL_HOME_COMMUNITY_ID = "ihe:homeCommunityID"
DETAIL_REPOSITORY_UNIQUE_ID = "Repository Unique Id"
DETAIL_SERIES_INSTANCE_UID = "Series Instance Unique Id"
DETAIL_ALERT_DESCRIPTION = "Alert Description"
DETAIL_CERTIFICATE_SUBJECT = "Certificate Subject"
# What a refused node presented but did not prove (its chain or validity failed): a claim.
DETAIL_UNVERIFIED_CERTIFICATE_SUBJECT = "Certificate Subject (unverified)"
# On a Patient participant without ParticipantObjectID: why the patient could not be named.
DETAIL_PATIENT_NOT_KNOWN = "PatientNotKnown"
PATIENT_NOT_KNOWN = "patient not known to this node"


# --------------------------------------------------------------------------- message model


@dataclass(frozen=True)
class EventIdentification:
    event_id: CodedValue
    action: EventAction | None
    outcome: EventOutcome
    date_time: datetime
    type_codes: tuple[CodedValue, ...] = ()
    outcome_description: str | None = None
    purposes_of_use: tuple[CodedValue, ...] = ()


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    user_is_requestor: bool
    alternative_user_id: str | None = None
    user_name: str | None = None
    network_access_point_id: str | None = None
    # 1 machine name, 2 IP address, 5 URI; derived from the id when not given.
    network_access_point_type: int | None = None
    role_id_codes: tuple[CodedValue, ...] = ()


@dataclass(frozen=True)
class AuditSource:
    audit_source_id: str
    enterprise_site_id: str | None = None
    type_codes: tuple[AuditSourceType, ...] = (AuditSourceType.APPLICATION_SERVER,)


@dataclass(frozen=True)
class SopClass:
    uid: str | None
    number_of_instances: int
    instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class DicomObjectDescription:
    """ParticipantObjectDescription (DICOM extension): SOP classes and contained studies."""

    accession_numbers: tuple[str, ...] = ()
    sop_classes: tuple[SopClass, ...] = ()
    study_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParticipantObject:
    object_id: str | None
    id_type_code: CodedValue
    type_code: ObjectType | None = None
    type_code_role: ObjectRole | None = None
    data_life_cycle: int | None = None
    sensitivity: str | None = None
    name: str | None = None
    # ParticipantObjectQuery: the raw query, base64-encoded on output.
    query: bytes | None = None
    # ParticipantObjectDetail (type, value): values are base64-encoded on output.
    details: tuple[tuple[str, bytes], ...] = ()
    description: DicomObjectDescription | None = None


@dataclass(frozen=True)
class AuditMessage:
    event: EventIdentification
    participants: tuple[ActiveParticipant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()

    @property
    def outcome(self) -> EventOutcome:
        return self.event.outcome

    def to_xml(self) -> bytes:
        """UTF-8 XML with declaration, on one line (no pretty-printing) as syslog carries it.

        Serialised directly rather than through an lxml tree: this runs for every audited
        transaction and is several times faster, and the tests check the output against the
        DICOM schema and lxml's own serialisation.
        """
        out = _XmlOut()
        out.start("AuditMessage", ())
        _event_xml(out, self.event)
        # Participants and the audit source repeat from record to record (this system, its
        # peers): their XML is rendered once and reused.
        for participant in self.participants:
            out.raw(_participant_fragment(participant))
        out.raw(_source_fragment(self.source))
        for obj in self.objects:
            _object_xml(out, obj)
        out.end("AuditMessage")
        return XML_DECLARATION + out.getvalue()

    def to_element(self) -> etree._Element:
        return etree.fromstring(self.to_xml())


# Characters XML 1.0 cannot carry (controls, lone surrogates, U+FFFE/U+FFFF): values come from
# the network (certificate subjects, query ids), so they are replaced rather than rejected.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ATTR_SPECIAL = re.compile('[&<>"\t\n\r]')
_TEXT_SPECIAL = re.compile("[&<>\r]")
# Anything that needs escaping or replacing: the fast path skips values without it.
_ATTR_ANY = re.compile('[&<>"\t\n\r]|[^\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]')
_TEXT_ANY = re.compile("[&<>\r]|[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "\t": "&#9;",
    "\n": "&#10;",
    "\r": "&#13;",
}


def _x(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _attr(value: str) -> str:
    if _ATTR_ANY.search(value) is None:
        return value
    return _ATTR_SPECIAL.sub(lambda m: _ESCAPES[m.group()], _x(value))


def _text(value: str) -> str:
    if _TEXT_ANY.search(value) is None:
        return value
    return _TEXT_SPECIAL.sub(lambda m: _ESCAPES[m.group()], _x(value))


def utf8(value: str) -> bytes:
    """UTF-8 of a value that may hold lone surrogates (replaced, as in the XML)."""
    return _x(value).encode("utf-8")


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


Attrs = Sequence[tuple[str, str | None]]


class _XmlOut:
    """Minimal XML writer: elements, escaped attributes (None = absent) and text."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def _open(self, tag: str, attrs: Attrs) -> None:
        parts = self._parts
        parts.append("<" + tag)
        for name, value in attrs:
            if value is not None:
                parts.append(f' {name}="{_attr(value)}"')

    def start(self, tag: str, attrs: Attrs) -> None:
        self._open(tag, attrs)
        self._parts.append(">")

    def empty(self, tag: str, attrs: Attrs) -> None:
        self._open(tag, attrs)
        self._parts.append("/>")

    def text_element(self, tag: str, text: str) -> None:
        self._parts.append(f"<{tag}>{_text(text)}</{tag}>" if text else f"<{tag}/>")

    def end(self, tag: str) -> None:
        self._parts.append(f"</{tag}>")

    def raw(self, xml: str) -> None:
        self._parts.append(xml)

    def getvalue(self) -> bytes:
        return "".join(self._parts).encode("utf-8")

    def text(self) -> str:
        return "".join(self._parts)


@functools.lru_cache(maxsize=4096)
def _coded_xml(tag: str, value: CodedValue) -> str:
    """A coded-value element; the vocabulary is small, so rendered ones are reused."""
    out = _XmlOut()
    out.empty(tag, _coded_attrs(value))
    return out.getvalue().decode("utf-8")


def _coded_attrs(value: CodedValue) -> Attrs:
    return (
        ("csd-code", value.code),
        ("codeSystemName", value.code_system_name),
        ("displayName", value.display_name),
        ("originalText", value.original_text),
    )


@functools.lru_cache(maxsize=256)
def _event_codes(event_id: CodedValue, type_codes: tuple[CodedValue, ...]) -> str:
    return _coded_xml("EventID", event_id) + "".join(
        _coded_xml("EventTypeCode", code) for code in type_codes
    )


def _event_xml(out: _XmlOut, event: EventIdentification) -> None:
    # The date and outcome are plain ASCII digits; the action code one letter of a Literal.
    action = "" if event.action is None else f' EventActionCode="{_attr(event.action)}"'
    out.raw(
        f"<EventIdentification{action} EventDateTime="
        f'"{format_datetime(event.date_time)}" EventOutcomeIndicator="{int(event.outcome)}">'
    )
    out.raw(_event_codes(event.event_id, event.type_codes))
    if event.outcome_description is not None:
        out.text_element("EventOutcomeDescription", event.outcome_description)
    for purpose in event.purposes_of_use:
        out.raw(_coded_xml("PurposeOfUse", purpose))
    out.end("EventIdentification")


def _participant_xml(out: _XmlOut, p: ActiveParticipant) -> None:
    nap = p.network_access_point_id or None
    nap_type = None
    if nap is not None:
        nap_type = str(p.network_access_point_type or network_access_point_type(nap))
    attrs = (
        ("UserID", p.user_id),
        ("AlternativeUserID", p.alternative_user_id),
        ("UserName", p.user_name),
        ("UserIsRequestor", "true" if p.user_is_requestor else "false"),
        ("NetworkAccessPointID", nap),
        ("NetworkAccessPointTypeCode", nap_type),
    )
    if not p.role_id_codes:
        out.empty("ActiveParticipant", attrs)
        return
    out.start("ActiveParticipant", attrs)
    for role in p.role_id_codes:
        out.raw(_coded_xml("RoleIDCode", role))
    out.end("ActiveParticipant")


@functools.lru_cache(maxsize=4096)
def _participant_fragment(p: ActiveParticipant) -> str:
    out = _XmlOut()
    _participant_xml(out, p)
    return out.text()


@functools.lru_cache(maxsize=64)
def _source_fragment(source: AuditSource) -> str:
    out = _XmlOut()
    _source_xml(out, source)
    return out.text()


def _source_xml(out: _XmlOut, source: AuditSource) -> None:
    attrs = (
        ("AuditEnterpriseSiteID", source.enterprise_site_id),
        ("AuditSourceID", source.audit_source_id),
    )
    if not source.type_codes:
        out.empty("AuditSourceIdentification", attrs)
        return
    out.start("AuditSourceIdentification", attrs)
    for kind in source.type_codes:
        out.empty(
            "AuditSourceTypeCode",
            (
                ("csd-code", str(int(kind))),
                ("codeSystemName", "DCM"),
                ("originalText", _AUDIT_SOURCE_TYPE_TEXT[int(kind)]),
            ),
        )
    out.end("AuditSourceIdentification")


def _object_xml(out: _XmlOut, obj: ParticipantObject) -> None:
    parts = ["<ParticipantObjectIdentification"]
    if obj.object_id is not None:
        parts.append(f' ParticipantObjectID="{_attr(obj.object_id)}"')
    if obj.type_code is not None:
        parts.append(f' ParticipantObjectTypeCode="{int(obj.type_code)}"')
    if obj.type_code_role is not None:
        parts.append(f' ParticipantObjectTypeCodeRole="{int(obj.type_code_role)}"')
    if obj.data_life_cycle is not None:
        parts.append(f' ParticipantObjectDataLifeCycle="{int(obj.data_life_cycle)}"')
    if obj.sensitivity is not None:
        parts.append(f' ParticipantObjectSensitivity="{_attr(obj.sensitivity)}"')
    parts.append(">")
    out.raw("".join(parts))
    out.raw(_coded_xml("ParticipantObjectIDTypeCode", obj.id_type_code))
    if obj.query is not None:
        # base64 needs no escaping.
        out.raw(f"<ParticipantObjectQuery>{_b64(obj.query)}</ParticipantObjectQuery>")
    elif obj.name is not None:
        out.text_element("ParticipantObjectName", obj.name)
    for kind, value in obj.details:
        out.raw(f'<ParticipantObjectDetail type="{_attr(kind)}" value="{_b64(value)}"/>')
    if obj.description is not None:
        _description_xml(out, obj.description)
    out.end("ParticipantObjectIdentification")


def _description_xml(out: _XmlOut, d: DicomObjectDescription) -> None:
    out.start("ParticipantObjectDescription", ())
    for number in d.accession_numbers:
        out.empty("Accession", (("Number", number),))
    for sop_class in d.sop_classes:
        attrs = (("UID", sop_class.uid), ("NumberOfInstances", str(sop_class.number_of_instances)))
        if not sop_class.instance_uids:
            out.empty("SOPClass", attrs)
            continue
        out.start("SOPClass", attrs)
        for uid in sop_class.instance_uids:
            out.empty("Instance", (("UID", uid),))
        out.end("SOPClass")
    if d.study_uids:
        out.start("ParticipantObjectContainsStudy", ())
        for uid in d.study_uids:
            out.empty("StudyIDs", (("UID", uid),))
        out.end("ParticipantObjectContainsStudy")
    out.end("ParticipantObjectDescription")


def format_datetime(value: datetime) -> str:
    """xs:dateTime in UTC with milliseconds, e.g. ``2026-01-15T10:22:33.123Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # isoformat is C and truncates to milliseconds as the DICOM examples do; strftime was a
    # tenth of an audit record's serialisation.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat("T", "milliseconds") + "Z"


@functools.lru_cache(maxsize=1024)
def network_access_point_type(value: str) -> int:
    """1 for a machine name, 2 for an IP address (brackets and zone ids tolerated)."""
    candidate = value.strip("[]").split("%", 1)[0]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return 1
    return 2


# --------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class Node:
    """A system taking part in a transaction (a machine ActiveParticipant).

    ``user_id`` is the endpoint URL for a responder and the wsa:ReplyTo (or another agreed id)
    for a requester; ``network_access_point`` its host name or IP address.
    """

    user_id: str
    network_access_point: str | None = None
    alternative_user_id: str | None = None
    # For a remote system: the subject of its TLS certificate.
    user_name: str | None = None


@dataclass(frozen=True)
class HumanRequestor:
    user_id: str
    user_name: str | None = None
    roles: tuple[CodedValue, ...] = ()


@dataclass(frozen=True)
class AuditContext:
    """What every message of one auditing system shares."""

    audit_source: AuditSource
    # This system's NetworkAccessPointID (host name or IP address).
    host: str = field(default_factory=socket.gethostname)
    process_id: str = field(default_factory=lambda: str(os.getpid()))

    def local_node(self, user_id: str, network_access_point: str | None = None) -> Node:
        """This system, e.g. ``user_id`` = our endpoint URL for the transaction."""
        return Node(user_id, network_access_point or self.host, self.process_id)


@dataclass(frozen=True)
class Parties:
    """Who took part in one exchange, as every record of it names them (DICOM PS3.15 A.5.3):
    the requesting and the responding system, the people a system acted for (XUA user, the
    local caller of an outbound call), their purposes of use, and why it did not succeed."""

    requester: Node
    responder: Node
    human_requestors: Sequence[HumanRequestor] = ()
    purposes_of_use: Sequence[CodedValue] = ()
    outcome_description: str | None = None
    # One time for every record of the exchange (None: now).
    when: datetime | None = None


def remote_node(
    address: str | None,
    *,
    user_id: str | None = None,
    certificate_subject: str | None = None,
) -> Node:
    """A peer system seen on the network: its address and, if any, its certificate subject.

    ``user_id`` defaults to the certificate subject, then to the address, so that the
    participant names the peer as precisely as we know it.
    """
    return Node(
        user_id or certificate_subject or address or "unknown",
        address,
        None,
        certificate_subject,
    )


def endpoint_node(url: str, certificate_subject: str | None = None) -> Node:
    """A remote responder known by its endpoint URL (the IG's view of a Responding Gateway)."""
    host = urlsplit(url).hostname
    return Node(url, host, None, certificate_subject)


def requester_node(
    address: str | None, reply_to: str | None, certificate_subject: str | None
) -> Node:
    """A remote requester as a SOAP server sees it.

    The TF names the wsa:ReplyTo as its UserID, but that is the anonymous URI in synchronous
    exchanges; the TLS certificate subject then says far more about who asked.
    """
    if reply_to and reply_to != WSA_ANONYMOUS:
        return Node(reply_to, address, None, certificate_subject)
    return remote_node(address, certificate_subject=certificate_subject)


def xua_user_name(name_id: str, issuer: str, sp_provided_id: str | None = None) -> str:
    """``alias<user@issuer>`` as ITI TF-2 3.40.4.2 names an XUA-authenticated user."""
    return f"{sp_provided_id or ''}<{name_id}@{issuer}>"


def xua_requestor(
    name_id: str,
    issuer: str,
    sp_provided_id: str | None = None,
    roles: Iterable[CodedValue] = (),
) -> HumanRequestor:
    name = xua_user_name(name_id, issuer, sp_provided_id)
    return HumanRequestor(name, name, tuple(roles))


def outcome_for_registry_status(status: str | None) -> EventOutcome:
    """Map an ebRS RegistryResponse status to EventOutcomeIndicator."""
    if status == ResponseStatus.SUCCESS:
        return EventOutcome.SUCCESS
    if status == ResponseStatus.PARTIAL_SUCCESS:
        return EventOutcome.MINOR_FAILURE
    return EventOutcome.SERIOUS_FAILURE


def _now(when: datetime | None) -> datetime:
    return when if when is not None else datetime.now(UTC)


def system_participant(node: Node, role: CodedValue | None, requestor: bool) -> ActiveParticipant:
    """A machine participant (``role`` None: a third system with no Source/Destination role,
    e.g. the C-MOVE requester when the instances go elsewhere)."""
    return ActiveParticipant(
        user_id=node.user_id,
        user_is_requestor=requestor,
        alternative_user_id=node.alternative_user_id,
        user_name=node.user_name,
        network_access_point_id=node.network_access_point,
        role_id_codes=(role,) if role is not None else (),
    )


def _human_participants(humans: Sequence[HumanRequestor]) -> list[ActiveParticipant]:
    return [
        ActiveParticipant(
            user_id=h.user_id, user_is_requestor=True, user_name=h.user_name, role_id_codes=h.roles
        )
        for h in humans
    ]


def active_participants(
    source: Node,
    destination: Node,
    requester: Node,
    humans: Sequence[HumanRequestor],
) -> tuple[ActiveParticipant, ...]:
    # The requesting machine is "the requestor" only when no human is known (ITI TF-2 3.40.4.2).
    machine_requests = not humans
    return (
        system_participant(source, RoleId.SOURCE, machine_requests and source is requester),
        *_human_participants(humans),
        system_participant(
            destination, RoleId.DESTINATION, machine_requests and destination is requester
        ),
    )


@dataclass(frozen=True)
class PatientRef:
    """A patient as an audit record names it: the CX id (``id^^^&oid&ISO``) and, when the
    system saw it (DICOM header, XDS sourcePatientInfo), the name (DICOM PN, ``Family^Given``)."""

    patient_id: str
    name: str | None = None


def patient_object(patient_id: str, name: str | None = None) -> ParticipantObject:
    """Patient participant: CX-formatted id (``id^^^&oid&ISO``), the name when known."""
    return ParticipantObject(
        object_id=patient_id,
        id_type_code=ParticipantObjectIdType.PATIENT_NUMBER,
        type_code=ObjectType.PERSON,
        type_code_role=ObjectRole.PATIENT,
        name=name or None,
    )


def as_patient(value: str | PatientRef) -> PatientRef:
    return value if isinstance(value, PatientRef) else PatientRef(value)


def unknown_patient_object(reason: str = PATIENT_NOT_KNOWN) -> ParticipantObject:
    """The Patient participant of a record whose patient this system cannot tell (no registry
    entry, no header seen): present, so that the record says so, but without an id."""
    return ParticipantObject(
        object_id=None,
        id_type_code=ParticipantObjectIdType.PATIENT_NUMBER,
        type_code=ObjectType.PERSON,
        type_code_role=ObjectRole.PATIENT,
        details=((DETAIL_PATIENT_NOT_KNOWN, utf8(reason)),),
    )


def patient_objects(patients: Iterable[PatientRef | None]) -> list[ParticipantObject]:
    """One Patient participant per distinct patient id (the first name seen for it); the
    "not known" participant when there is none."""
    names: dict[str, str | None] = {}
    for patient in patients:
        if patient is not None and patient.patient_id and not names.get(patient.patient_id):
            names[patient.patient_id] = patient.name
    if not names:
        return [unknown_patient_object()]
    return [patient_object(pid, name) for pid, name in names.items()]


def _by_patient(
    items: Sequence[_T],
    key: Callable[[_T], str],
    patients: Mapping[str, PatientRef] | None,
    default: PatientRef | None,
) -> list[tuple[PatientRef | None, list[_T]]]:
    """Items grouped by their patient (``patients`` by key, else ``default``), first-seen
    order; one group with no items when there are none (a record of nothing retrieved)."""
    groups: dict[str | None, tuple[PatientRef | None, list[_T]]] = {}
    for item in items:
        patient = (patients or {}).get(key(item)) or default
        pid = patient.patient_id if patient is not None else None
        if pid not in groups:
            groups[pid] = (patient, [])
        groups[pid][1].append(item)
    return list(groups.values()) or [(default, [])]


def query_object(
    transaction: CodedValue,
    query_id: str | None,
    query: bytes,
    details: Sequence[tuple[str, bytes]] = (),
) -> ParticipantObject:
    return ParticipantObject(
        object_id=query_id or "unknown",
        id_type_code=transaction,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.QUERY,
        query=query,
        details=tuple(details),
    )


def _unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def audit_message(
    ctx: AuditContext,
    *,
    event_id: CodedValue,
    action: EventAction,
    type_code: CodedValue | None,
    outcome: EventOutcome,
    when: datetime | None,
    outcome_description: str | None,
    purposes_of_use: Sequence[CodedValue],
    participants: tuple[ActiveParticipant, ...],
    objects: Sequence[ParticipantObject],
) -> AuditMessage:
    return AuditMessage(
        event=EventIdentification(
            event_id=event_id,
            action=action,
            outcome=EventOutcome(outcome),
            date_time=_now(when),
            type_codes=(type_code,) if type_code is not None else (),
            outcome_description=outcome_description,
            purposes_of_use=tuple(purposes_of_use),
        ),
        participants=participants,
        source=ctx.audit_source,
        objects=tuple(objects),
    )


# --------------------------------------------------------------------------- queries


def query_message(
    ctx: AuditContext,
    transaction: CodedValue,
    parties: Parties,
    *,
    query_id: str | None,
    query: bytes,
    details: Sequence[tuple[str, bytes]],
    patient_ids: Sequence[str],
    outcome: EventOutcome,
) -> AuditMessage:
    """A transaction's query record (EventID 110112 "Query", action E): the requester is the
    Source, the responder the Destination; the patients the query names, then the query
    itself (ParticipantObjectQuery) with ``details``."""
    objects = [patient_object(p) for p in _unique(patient_ids)]
    objects.append(query_object(transaction, query_id, query, details))
    return audit_message(
        ctx,
        event_id=EventId.QUERY,
        action="E",
        type_code=transaction,
        outcome=outcome,
        when=parties.when,
        outcome_description=parties.outcome_description,
        purposes_of_use=parties.purposes_of_use,
        participants=active_participants(
            parties.requester, parties.responder, parties.requester, parties.human_requestors
        ),
        objects=objects,
    )


def stored_query_details(home_community_id: str | None, encoding: str) -> list[tuple[str, bytes]]:
    details = [(DETAIL_QUERY_ENCODING, utf8(encoding))]
    if home_community_id:
        details.append((DETAIL_XCA_HOME_COMMUNITY_ID, utf8(home_community_id)))
    return details


# --------------------------------------------------------------------------- document retrieves


@dataclass(frozen=True)
class DocumentReference:
    document_unique_id: str
    repository_unique_id: str | None = None
    home_community_id: str | None = None
    # What was wrong with the request for it (e.g. no DocumentUniqueId): a retrieve audit
    # names everything asked for, malformed requests included (ParticipantObjectName).
    problem: str | None = None


def document_object(
    doc: DocumentReference, home_community_detail: str = DETAIL_HOME_COMMUNITY_ID
) -> ParticipantObject:
    details: list[tuple[str, bytes]] = []
    if doc.repository_unique_id:
        details.append((DETAIL_REPOSITORY_UNIQUE_ID, utf8(doc.repository_unique_id)))
    if doc.home_community_id:
        details.append((home_community_detail, utf8(doc.home_community_id)))
    return ParticipantObject(
        object_id=doc.document_unique_id,
        id_type_code=ParticipantObjectIdType.REPORT_NUMBER,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        name=doc.problem,
        details=tuple(details),
    )


def _outcome_groups(
    succeeded: Sequence[_T], failed: Sequence[_T], failure_outcome: EventOutcome
) -> list[tuple[EventOutcome, Sequence[_T]]]:
    groups: list[tuple[EventOutcome, Sequence[_T]]] = []
    if succeeded:
        groups.append((EventOutcome.SUCCESS, succeeded))
    if failed or not succeeded:
        # Nothing retrieved at all is a failure too, reported with whatever was asked for.
        groups.append((failure_outcome, failed))
    return groups


def document_retrieve_messages(
    ctx: AuditContext,
    transaction: CodedValue,
    parties: Parties,
    *,
    exporting: bool,
    documents: Sequence[DocumentReference],
    failed: Sequence[DocumentReference],
    failure_outcome: EventOutcome,
    patient_id: str | None,
    patients: Mapping[str, PatientRef] | None,
) -> tuple[AuditMessage, ...]:
    """A document retrieve's records: Export (R) by the side that hands the documents out,
    Import (C) by the side that receives them; one per outcome (A.5.2) and patient."""
    messages = []
    # One time for every record of the request (A.5.2 splits), so that they read as one.
    when = _now(parties.when)
    # Retrieves name the document holder Source and the requester Destination.
    participants = active_participants(
        parties.responder, parties.requester, parties.requester, parties.human_requestors
    )
    default = PatientRef(patient_id) if patient_id else None
    for outcome, group in _outcome_groups(documents, failed, failure_outcome):
        # One record per patient (ITI TF-2: Patient 0..1), so that each names its own.
        for patient, docs in _by_patient(group, lambda d: d.document_unique_id, patients, default):
            objects = patient_objects([patient])
            objects.extend(document_object(d) for d in docs)
            messages.append(
                audit_message(
                    ctx,
                    event_id=EventId.EXPORT if exporting else EventId.IMPORT,
                    action="R" if exporting else "C",
                    type_code=transaction,
                    outcome=outcome,
                    when=when,
                    outcome_description=parties.outcome_description if outcome else None,
                    purposes_of_use=parties.purposes_of_use,
                    participants=participants,
                    objects=objects,
                )
            )
    return tuple(messages)


# --------------------------------------------------------------------------- imaging retrieves


@dataclass(frozen=True, slots=True)  # one per instance of a retrieve's record, 20,000 at times
class ImagingInstanceReference:
    """One DICOM instance of a RAD-69 / RAD-75 request (StudyRequest/SeriesRequest/Document)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None = None
    repository_unique_id: str | None = None
    home_community_id: str | None = None
    # What was wrong with the request for it (see DocumentReference.problem).
    problem: str | None = None


# A message lists instance UIDs only up to this many per study; beyond, the SOP class counts
# stand alone, so that a large study still fits a syslog message (DICOM A.6: ARRs take 32 KiB).
MAX_LISTED_INSTANCES = 100


def study_objects(
    instances: Sequence[ImagingInstanceReference],
    *,
    home_community_detail: str,
    max_listed_instances: int = MAX_LISTED_INSTANCES,
) -> list[ParticipantObject]:
    """One Study participant per Study Instance UID (DICOM A.5.3.x), in first-seen order."""
    by_study: dict[str, list[ImagingInstanceReference]] = {}
    for inst in instances:
        by_study.setdefault(inst.study_instance_uid, []).append(inst)
    objects = []
    for study_uid, members in by_study.items():
        by_class: dict[str | None, list[str]] = {}
        for inst in members:
            by_class.setdefault(inst.sop_class_uid, []).append(inst.sop_instance_uid)
        listed = len(members) <= max_listed_instances
        sop_classes = tuple(
            SopClass(uid, len(uids), tuple(uids) if listed else ())
            for uid, uids in by_class.items()
        )
        details: list[tuple[str, bytes]] = []
        for series in _unique(i.series_instance_uid for i in members):
            details.append((DETAIL_SERIES_INSTANCE_UID, utf8(series)))
        for repo in _unique(i.repository_unique_id for i in members):
            details.append((DETAIL_REPOSITORY_UNIQUE_ID, utf8(repo)))
        for hcid in _unique(i.home_community_id for i in members):
            details.append((home_community_detail, utf8(hcid)))
        problems = "; ".join(_unique(i.problem for i in members))
        objects.append(
            ParticipantObject(
                object_id=study_uid,
                id_type_code=ParticipantObjectIdType.STUDY_INSTANCE_UID,
                type_code=ObjectType.SYSTEM_OBJECT,
                type_code_role=ObjectRole.REPORT,
                name=problems or None,
                details=tuple(details),
                description=DicomObjectDescription(
                    sop_classes=sop_classes, study_uids=(study_uid,)
                ),
            )
        )
    return objects


def imaging_retrieve_messages(
    ctx: AuditContext,
    transaction: CodedValue,
    parties: Parties,
    *,
    serving: bool,
    home_community_detail: str,
    instances: Sequence[ImagingInstanceReference],
    failed: Sequence[ImagingInstanceReference],
    failure_outcome: EventOutcome,
    patient_id: str | None,
    patients: Mapping[str, PatientRef] | None,
) -> tuple[AuditMessage, ...]:
    """An imaging retrieve's records, "DICOM Instances Transferred" by both ends (A.5.3.4):
    one per outcome (A.5.2) and patient, the studies with their SOP classes."""
    messages = []
    when = _now(parties.when)  # one time for every record of the request (A.5.2 splits)
    participants = active_participants(
        parties.responder, parties.requester, parties.requester, parties.human_requestors
    )
    default = PatientRef(patient_id) if patient_id else None
    for outcome, group in _outcome_groups(instances, failed, failure_outcome):
        # A.5.3.4 names exactly one patient per record: one record per patient.
        for patient, members in _by_patient(group, lambda i: i.sop_instance_uid, patients, default):
            objects = patient_objects([patient])
            objects.extend(study_objects(members, home_community_detail=home_community_detail))
            messages.append(
                audit_message(
                    ctx,
                    # Both ends of the transfer (A.5.3.4); the action is the receiver's: C, as
                    # it held no copy, or R when the record comes from the sender.
                    event_id=EventId.DICOM_INSTANCES_TRANSFERRED,
                    action="R" if serving else "C",
                    type_code=transaction,
                    outcome=outcome,
                    when=when,
                    outcome_description=parties.outcome_description if outcome else None,
                    purposes_of_use=parties.purposes_of_use,
                    participants=participants,
                    objects=objects,
                )
            )
    return tuple(messages)


# --------------------------------------------------------------------------- DICOM services


def dicom_query(
    ctx: AuditContext,
    *,
    requester: Node,
    responder: Node,
    sop_class_uid: str,
    query: bytes,
    transfer_syntax: str | None,
    patient_ids: Sequence[str] = (),
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    type_code: CodedValue | None = None,
    when: datetime | None = None,
) -> AuditMessage:
    """A DIMSE C-FIND as DICOM PS3.15 A.5.3.12 "Query" (110112, E): the requester is the
    Source, the responder the Destination; the object queried is the SOP class (110181, role
    Report) with the identifier dataset as ParticipantObjectQuery and its transfer syntax as a
    detail. DICOM gives no EventTypeCode (``type_code`` for a profile that names one)."""
    details = [(DETAIL_TRANSFER_SYNTAX, utf8(transfer_syntax))] if transfer_syntax else []
    objects = [patient_object(p) for p in _unique(patient_ids)]
    objects.append(
        ParticipantObject(
            object_id=sop_class_uid,
            id_type_code=ParticipantObjectIdType.SOP_CLASS_UID,
            type_code=ObjectType.SYSTEM_OBJECT,
            type_code_role=ObjectRole.REPORT,
            query=query,
            details=tuple(details),
        )
    )
    return audit_message(
        ctx,
        event_id=EventId.QUERY,
        action="E",
        type_code=type_code,
        outcome=outcome,
        when=when,
        outcome_description=outcome_description,
        purposes_of_use=(),
        participants=active_participants(requester, responder, requester, ()),
        objects=objects,
    )


def instances_transferred(
    ctx: AuditContext,
    *,
    source: Node,
    destination: Node,
    study_uid: str,
    instances: Sequence[ImagingInstanceReference],
    patient_ids: Sequence[str | PatientRef] = (),
    requester: Node | None = None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    type_code: CodedValue | None = None,
    home_community_detail: str = DETAIL_HOME_COMMUNITY_ID,
    when: datetime | None = None,
    human_requestors: Sequence[HumanRequestor] = (),
) -> AuditMessage:
    """DICOM PS3.15 A.5.3.4 "DICOM Instances Transferred" (110104, R) by the system that sent
    them (``source``) to ``destination``, which asked for them unless a third ``requester``
    did (C-MOVE). Objects: the patients (the "not known" participant when none is known) and
    the study with its SOP classes and instances (the bare study when ``instances`` is
    empty)."""
    participants = list(
        active_participants(source, destination, requester or destination, human_requestors)
    )
    if requester is not None:  # C-MOVE: a third system asked for the transfer
        participants.append(system_participant(requester, None, True))
    objects = patient_objects(as_patient(p) for p in patient_ids)
    if instances:
        objects.extend(study_objects(instances, home_community_detail=home_community_detail))
    else:
        objects.append(
            ParticipantObject(
                object_id=study_uid,
                id_type_code=ParticipantObjectIdType.STUDY_INSTANCE_UID,
                type_code=ObjectType.SYSTEM_OBJECT,
                type_code_role=ObjectRole.REPORT,
                description=DicomObjectDescription(study_uids=(study_uid,)),
            )
        )
    return audit_message(
        ctx,
        event_id=EventId.DICOM_INSTANCES_TRANSFERRED,
        action="R",
        type_code=type_code,
        outcome=outcome,
        when=when,
        outcome_description=outcome_description,
        purposes_of_use=(),
        participants=tuple(participants),
        objects=objects,
    )


# --------------------------------------------------------------------------- ITI-42


# --------------------------------------------------------------------------- security, lifecycle


def application_activity(
    ctx: AuditContext,
    *,
    event: Literal["start", "stop"],
    application_id: str,
    launcher: str | None = None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
) -> AuditMessage:
    """Application Activity (110100) with Application Start / Stop (DICOM A.5.3.1).

    ``application_id`` names the gateway (e.g. its base URL or AE title); ``launcher`` the user
    or process that started or stopped it.
    """
    check_side(event, ("start", "stop"))
    participants = [
        ActiveParticipant(
            user_id=application_id,
            user_is_requestor=launcher is None,
            alternative_user_id=ctx.process_id,
            network_access_point_id=ctx.host,
            role_id_codes=(RoleId.APPLICATION,),
        )
    ]
    if launcher is not None:
        participants.append(
            ActiveParticipant(
                user_id=launcher,
                user_is_requestor=True,
                role_id_codes=(RoleId.APPLICATION_LAUNCHER,),
            )
        )
    return audit_message(
        ctx,
        event_id=EventId.APPLICATION_ACTIVITY,
        action="E",
        type_code=(
            EventTypeCode.APPLICATION_START if event == "start" else EventTypeCode.APPLICATION_STOP
        ),
        outcome=outcome,
        when=when,
        outcome_description=outcome_description,
        purposes_of_use=(),
        participants=tuple(participants),
        objects=(),
    )


def security_alert_node_authentication(
    ctx: AuditContext,
    *,
    address: str,
    reason: str,
    certificate_subject: str | None = None,
    port: int | None = None,
    reporter: Node | None = None,
    outcome: EventOutcome = EventOutcome.MINOR_FAILURE,
    when: datetime | None = None,
) -> AuditMessage:
    """Security Alert (110113) / Node Authentication (110126) for a refused TLS handshake.

    The remote node is the performing participant (it asked for the connection); ``reporter``
    (default: this system) detected it. DICOM A.5.3.11: minor/serious failure means the
    mitigation worked (the connection was refused), hence the default outcome 4.

    The handshake failed, so nothing about the node was verified but its address: it is named
    by ``address:port``, and the certificate subject it presented is kept only as a detail
    labelled unverified (anyone can put any subject in a certificate the CA never signed).
    """
    reporter = reporter or ctx.local_node(ctx.audit_source.audit_source_id)
    node_id = f"{address}:{port}" if port is not None else address
    remote = ActiveParticipant(
        user_id=node_id,
        user_is_requestor=True,
        network_access_point_id=address,
    )
    local = ActiveParticipant(
        user_id=reporter.user_id,
        user_is_requestor=False,
        alternative_user_id=reporter.alternative_user_id,
        network_access_point_id=reporter.network_access_point,
    )
    details: list[tuple[str, bytes]] = [(DETAIL_ALERT_DESCRIPTION, utf8(reason))]
    if certificate_subject:
        details.append((DETAIL_UNVERIFIED_CERTIFICATE_SUBJECT, utf8(certificate_subject)))
    subject = ParticipantObject(
        object_id=node_id,
        id_type_code=ParticipantObjectIdType.NODE_ID,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.SECURITY_RESOURCE,
        details=tuple(details),
    )
    return audit_message(
        ctx,
        event_id=EventId.SECURITY_ALERT,
        action="E",
        type_code=EventTypeCode.NODE_AUTHENTICATION,
        outcome=outcome,
        when=when,
        outcome_description=reason,
        purposes_of_use=(),
        participants=(local, remote),
        objects=(subject,),
    )


def user_authentication(
    ctx: AuditContext,
    *,
    event: Literal["login", "logout"],
    user: HumanRequestor,
    authenticator: Node,
    user_node: Node | None = None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
) -> AuditMessage:
    """User Authentication (110114) Login / Logout (DICOM A.5.3.12).

    With XUA, ``user`` is the assertion's subject (``xua_requestor``), ``authenticator`` this
    X-Service Provider and ``user_node`` the system that presented the assertion. A rejected
    assertion is a Login with a failure outcome and the reason as description.
    """
    check_side(event, ("login", "logout"))
    participants = [
        ActiveParticipant(
            user_id=user.user_id,
            user_is_requestor=True,
            user_name=user.user_name,
            network_access_point_id=user_node.network_access_point if user_node else None,
            role_id_codes=user.roles,
        ),
        ActiveParticipant(
            user_id=authenticator.user_id,
            user_is_requestor=False,
            alternative_user_id=authenticator.alternative_user_id,
            user_name=authenticator.user_name,
            network_access_point_id=authenticator.network_access_point,
        ),
    ]
    return audit_message(
        ctx,
        event_id=EventId.USER_AUTHENTICATION,
        action="E",
        type_code=EventTypeCode.LOGIN if event == "login" else EventTypeCode.LOGOUT,
        outcome=outcome,
        when=when,
        outcome_description=outcome_description,
        purposes_of_use=(),
        participants=tuple(participants),
        objects=(),
    )


def check_side(value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
