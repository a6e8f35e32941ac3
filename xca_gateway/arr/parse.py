"""Audit messages as the repository receives them, parsed into an indexed record (sans-IO).

Real IHE actors send two dialects of the same ``AuditMessage``: the DICOM PS3.15 A.5 schema
(coded values as ``csd-code``/``codeSystemName``/``originalText``) and the older RFC 3881 one
(``code``/``codeSystemName``/``displayName``). Both use the same element names, so one tolerant
walker reads them, matching on local names so that a stray default namespace does not matter.

:func:`parse_record` never raises. The raw bytes are always kept verbatim; what could not be
understood becomes a flag on the record (``flags``) and a readable ``problem``, so that a broken
message from a misbehaving node is stored and shown, never dropped.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from functools import cached_property
from typing import Any, Literal, NamedTuple

from lxml import etree

from xca_gateway.audit.syslog import BOM, SyslogError, parse_message
from xca_gateway.protocol.xmlsafe import XmlLimits, XmlRejected, check_no_dtd

Transport = Literal["tls", "udp", "local"]
Dialect = Literal["dicom", "rfc3881", "unknown"]

# Flags: why a record is not a clean, fully understood audit message.
FLAG_SYSLOG_HEADER = "syslog-header-invalid"
FLAG_RFC3164 = "rfc3164-header"
FLAG_NO_XML = "no-xml"
FLAG_XML_INVALID = "xml-invalid"
FLAG_NOT_AUDIT_MESSAGE = "not-audit-message"
FLAG_NO_EVENT_ID = "event-id-missing"
FLAG_EVENT_TIME = "event-time-invalid"
FLAG_OUTCOME = "outcome-invalid"
FLAG_NO_PARTICIPANT = "participant-missing"
FLAG_NO_AUDIT_SOURCE = "audit-source-missing"
FLAG_FRAMING = "framing-invalid"
FLAG_TRUNCATED = "truncated"
# The AuditSourceID is not one the authenticated sender may report as: a node passing its
# records off as another's, or a misconfigured one. Stored (never dropped), but flagged.
FLAG_SOURCE_UNBOUND = "audit-source-unbound"

# Detail types that carry a homeCommunityId (IPF and the Gazelle audit specs use both).
HOME_COMMUNITY_DETAILS = frozenset(
    {"urn:ihe:iti:xca:2010:homeCommunityId", "ihe:homeCommunityID", "homeCommunityID"}
)
IHE_TRANSACTIONS = "IHE Transactions"

# Audit XML is small (DICOM A.6 asks repositories to take 32 KiB); anything deep or huge is
# hostile or broken, and is stored flagged rather than parsed.
AUDIT_XML_LIMITS = XmlLimits(
    max_bytes=4 * 1024 * 1024, max_depth=32, max_attribute_bytes=64 * 1024, max_text_bytes=1 << 20
)


# The parts of a record are named tuples: thousands are made per second, and a tuple is
# several times cheaper to build than a frozen dataclass.


class Code(NamedTuple):
    code: str
    system: str | None = None
    display: str | None = None

    def label(self) -> str:
        return f"{self.code} {self.display}" if self.display else self.code


class Participant(NamedTuple):
    user_id: str
    user_is_requestor: bool | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    network_access_point_id: str | None = None
    network_access_point_type: str | None = None
    roles: tuple[Code, ...] = ()
    media_type: Code | None = None

    @property
    def is_source(self) -> bool:
        return any(r.code == "110153" for r in self.roles)

    @property
    def is_destination(self) -> bool:
        return any(r.code == "110152" for r in self.roles)

    @property
    def is_human(self) -> bool:
        """A person rather than a system: a requestor with no network access point, or a
        participant whose UserName is an XUA ``alias<user@issuer>``."""
        if self.user_name and _XUA_NAME.search(self.user_name):
            return True
        return (
            bool(self.user_is_requestor)
            and not self.network_access_point_id
            and not (self.is_source or self.is_destination)
        )


class AuditSourceId(NamedTuple):
    source_id: str
    enterprise_site_id: str | None = None
    types: tuple[Code, ...] = ()


class Detail(NamedTuple):
    type: str
    # The decoded value (base64 in the message); the text as-is when it was not base64.
    value: bytes

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "replace")


class Entity(NamedTuple):
    object_id: str
    id_type: Code | None = None
    type_code: str | None = None
    role: str | None = None
    lifecycle: str | None = None
    sensitivity: str | None = None
    name: str | None = None
    query: bytes | None = None
    details: tuple[Detail, ...] = ()
    study_uids: tuple[str, ...] = ()
    sop_classes: tuple[tuple[str, int | None], ...] = ()

    @property
    def is_patient(self) -> bool:
        if self.role == "1" and self.type_code in (None, "1"):
            return True
        return (
            self.role is None
            and self.id_type is not None
            and self.id_type.code == "2"
            and (self.id_type.system or "RFC-3881") == "RFC-3881"
        )

    def detail_values(self, types: Iterable[str]) -> list[str]:
        wanted = set(types)
        return [d.text for d in self.details if d.type in wanted]


class SyslogHeader(NamedTuple):
    priority: int | None
    timestamp: str | None = None
    hostname: str | None = None
    app_name: str | None = None
    procid: str | None = None
    msgid: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One received message: the verbatim bytes plus everything understood from them."""

    raw: bytes
    received_at: datetime
    sender: str
    transport: Transport
    # Always set: EventDateTime, else the syslog timestamp, else the receipt time.
    event_time: datetime
    dialect: Dialect = "unknown"
    flags: tuple[str, ...] = ()
    problem: str | None = None
    syslog: SyslogHeader | None = None
    event_id: Code | None = None
    action: str | None = None
    outcome: int | None = None
    outcome_description: str | None = None
    event_types: tuple[Code, ...] = ()
    purposes_of_use: tuple[Code, ...] = ()
    participants: tuple[Participant, ...] = ()
    audit_sources: tuple[AuditSourceId, ...] = ()
    entities: tuple[Entity, ...] = ()
    sender_port: int | None = None
    # Who sent it, as verified: the TLS client certificate's subject, ``udp:<address>`` (an
    # address only: unauthenticated), ``local`` (the repository's own); None when not recorded.
    sender_identity: str | None = None
    # Set by the store.
    record_id: int | None = field(default=None, compare=False)

    @property
    def parsed(self) -> bool:
        """True when the message was understood as an audit message (it may still be flagged)."""
        return self.event_id is not None

    # ------------------------------------------------------------------ index keys

    @cached_property
    def transaction(self) -> Code | None:
        """The IHE transaction (``ITI-38`` ...) or, failing that, the first EventTypeCode."""
        for code in self.event_types:
            if code.system == IHE_TRANSACTIONS:
                return code
        return self.event_types[0] if self.event_types else None

    @cached_property
    def patient_ids(self) -> list[str]:
        return _unique(e.object_id for e in self.entities if e.is_patient)

    @cached_property
    def patient_names(self) -> list[str]:
        """The patients' names as the records give them (DICOM PN, ``Family^Given``)."""
        return _unique(e.name for e in self.entities if e.is_patient and e.name)

    @cached_property
    def other_entity_ids(self) -> list[str]:
        return _unique(e.object_id for e in self.entities if not e.is_patient)

    @cached_property
    def user_keys(self) -> list[str]:
        """Every name a participant goes by: UserID, UserName, and the ``user@issuer`` inside
        an XUA ``alias<user@issuer>``."""
        keys: list[str] = []
        for p in self.participants:
            for value in (p.user_id, p.user_name):
                if value:
                    keys.append(value)
                    match = _XUA_NAME.search(value)
                    if match:
                        keys.append(match.group(1))
        return _unique(keys)

    @cached_property
    def addresses(self) -> list[str]:
        return _unique(p.network_access_point_id for p in self.participants)

    @cached_property
    def alternative_user_ids(self) -> list[str]:
        return _unique(p.alternative_user_id for p in self.participants)

    @cached_property
    def community_ids(self) -> list[str]:
        values: list[str] = []
        for entity in self.entities:
            values.extend(v.strip() for v in entity.detail_values(HOME_COMMUNITY_DETAILS))
        return _unique(values)

    @cached_property
    def requestor(self) -> Participant | None:
        """Who asked: the human requestor if one is named, else the requesting system."""
        humans = [p for p in self.participants if p.is_human]
        if humans:
            return humans[0]
        for p in self.participants:
            if p.user_is_requestor:
                return p
        sources = [p for p in self.participants if p.is_source]
        return sources[0] if sources else (self.participants[0] if self.participants else None)

    @cached_property
    def requesting_system(self) -> Participant | None:
        """The machine the request came from (the one with a network address)."""
        requestor = self.requestor
        if requestor is not None and requestor.network_access_point_id:
            return requestor
        for p in self.participants:
            if p.user_is_requestor and p.network_access_point_id:
                return p
        # Queries: the Source is the requester; retrieves: the Destination is.
        role = "110152" if self.action in ("C", "R") and self.event_types else "110153"
        for p in self.participants:
            if any(r.code == role for r in p.roles) and p.network_access_point_id:
                return p
        return None

    @cached_property
    def audit_source_id(self) -> str | None:
        return self.audit_sources[0].source_id if self.audit_sources else None


_XUA_NAME = re.compile(r"<([^<>@\s]+@[^<>]+)>")


def _unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


# --------------------------------------------------------------------------- syslog layer

# RFC 3164 (BSD syslog) header: "<PRI>Mmm dd hh:mm:ss HOST TAG: MSG". Some older actors send it.
_RFC3164 = re.compile(
    rb"^<(\d{1,3})>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (\S+) ([^:\s\[]{1,48})(?:\[(\S+)\])?: ?"
)
_XML_START = re.compile(rb"<\?xml|<(?:[A-Za-z_][\w.-]*:)?AuditMessage[\s>/]")


def _split_syslog(raw: bytes, flags: list[str]) -> tuple[SyslogHeader | None, bytes, str | None]:
    """(header, MSG, problem) of a syslog message; MSG is everything after the header."""
    try:
        message = parse_message(raw)
        header = SyslogHeader(
            priority=message.priority,
            timestamp=message.timestamp,
            hostname=message.hostname,
            app_name=message.app_name,
            procid=message.procid,
            msgid=message.msgid,
        )
        return header, message.msg, None
    except (SyslogError, ValueError):
        pass
    match = _RFC3164.match(raw)
    if match:
        flags.append(FLAG_RFC3164)
        header = SyslogHeader(
            priority=int(match.group(1)),
            timestamp=match.group(2).decode("ascii"),
            hostname=match.group(3).decode("ascii", "replace"),
            app_name=match.group(4).decode("ascii", "replace"),
            procid=match.group(5).decode("ascii", "replace") if match.group(5) else None,
        )
        return header, raw[match.end() :], None
    flags.append(FLAG_SYSLOG_HEADER)
    pri = re.match(rb"^<(\d{1,3})>", raw)
    bare = SyslogHeader(priority=int(pri.group(1))) if pri else None
    xml = _XML_START.search(raw)
    return bare, raw[xml.start() :] if xml else raw, "not an RFC 5424 or RFC 3164 syslog message"


def _xml_payload(msg: bytes) -> bytes | None:
    body = msg[len(BOM) :] if msg.startswith(BOM) else msg
    body = body.strip(b" \t\r\n\x00")
    if body.startswith(BOM):
        body = body[len(BOM) :]
    if body.startswith(b"<"):
        return body
    found = _XML_START.search(body)
    return body[found.start() :] if found else None


# --------------------------------------------------------------------------- XML layer


def _local(element: etree._Element) -> str:
    tag: object = element.tag
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _strip_namespaces(root: etree._Element) -> None:
    """Some senders put the audit message in a default namespace; the schema has none."""
    for element in root.iter():
        tag: object = element.tag
        if isinstance(tag, str) and tag.startswith("{"):
            element.tag = tag.rsplit("}", 1)[-1]


_PARSERS = threading.local()


def _parser() -> etree.XMLParser:
    parser: etree.XMLParser | None = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            resolve_entities=False,
            load_dtd=False,
            dtd_validation=False,
            no_network=True,
            huge_tree=False,
            remove_comments=True,
            remove_pis=True,
        )
        _PARSERS.parser = parser
    return parser


def parse_audit_xml(xml: bytes) -> etree._Element:
    """Parse an audit message from the network (raises :class:`XmlRejected`).

    The same defences as :func:`xca_gateway.protocol.xmlsafe.parse_xml` - a size bound first, any
    DTD
    refused before libxml2 sees the document (so no entity can be declared), no entity
    resolution, no network - but in one libxml2 call instead of a pull-parser loop: audit
    messages arrive by the thousand per second and are small (bounded by the syslog frame
    limit), and libxml2 itself caps nesting depth (256) and node sizes without ``huge_tree``.
    """
    if len(xml) > AUDIT_XML_LIMITS.max_bytes:
        raise XmlRejected(f"XML document larger than {AUDIT_XML_LIMITS.max_bytes} bytes")
    check_no_dtd(xml)
    try:
        root = etree.fromstring(xml, _parser())
    except etree.XMLSyntaxError as exc:
        raise XmlRejected(f"malformed XML: {exc.msg}") from None
    if root is None:
        raise XmlRejected("empty XML document")
    docinfo: Any = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise XmlRejected("document type declarations (DTD) are not accepted")
    if b"xmlns" in xml:
        _strip_namespaces(root)
    return root


Groups = dict[str, list[etree._Element]]


def _attr(attrs: etree._Element, *names: str) -> str | None:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            value = value.strip()
            if value:
                return value
    return None


def _groups(element: etree._Element) -> Groups:
    """The element's children by tag, in one pass (repeated tag lookups are slower)."""
    out: Groups = {}
    for child in element:
        tag: object = child.tag
        if isinstance(tag, str):
            out.setdefault(tag, []).append(child)
    return out


def _first(groups: Groups, name: str) -> etree._Element | None:
    found = groups.get(name)
    return found[0] if found else None


def _code(element: etree._Element | None) -> Code | None:
    """A coded value in either dialect (DICOM ``csd-code`` or RFC 3881 ``code``)."""
    if element is None:
        return None
    attrs = element
    code = attrs.get("csd-code") or attrs.get("code")
    if not code or not (code := code.strip()):
        return None
    return Code(
        code,
        attrs.get("codeSystemName") or attrs.get("codeSystem"),
        attrs.get("originalText") or attrs.get("displayName"),
    )


def _codes(groups: Groups, name: str) -> tuple[Code, ...]:
    return tuple(c for c in (_code(e) for e in groups.get(name, ())) if c is not None)


def _b64(text: str | None) -> bytes:
    if not text:
        return b""
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        # Some senders put plain text where base64 belongs; keep what they sent.
        return text.encode("utf-8")


_DATETIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_datetime(value: str | None) -> datetime | None:
    """xs:dateTime / RFC 3339 with any number of fraction digits; no zone means UTC."""
    if not value:
        return None
    match = _DATETIME.match(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz: timezone = UTC
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        parsed = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None
    return parsed.astimezone(UTC)


def _participant(element: etree._Element) -> Participant | None:
    attrs = element
    user_id = _attr(attrs, "UserID")
    if user_id is None:
        return None
    groups = _groups(element)
    requestor = _attr(attrs, "UserIsRequestor")
    return Participant(
        user_id=user_id,
        user_is_requestor=None if requestor is None else requestor.lower() in ("true", "1"),
        alternative_user_id=_attr(attrs, "AlternativeUserID"),
        user_name=_attr(attrs, "UserName"),
        network_access_point_id=_attr(attrs, "NetworkAccessPointID"),
        network_access_point_type=_attr(attrs, "NetworkAccessPointTypeCode"),
        roles=_codes(groups, "RoleIDCode"),
        media_type=_code(_first(groups, "MediaType")),
    )


def _audit_source(element: etree._Element) -> AuditSourceId | None:
    attrs = element
    source_id = _attr(attrs, "AuditSourceID")
    if source_id is None:
        return None
    types: list[Code] = []
    for t in element.iterchildren("AuditSourceTypeCode"):
        code = _code(t)
        if code is None and (t.text or "").strip():
            code = Code((t.text or "").strip())
        if code is not None:
            types.append(code)
    # RFC 3881 also allows the type as an attribute.
    attr_type = _attr(attrs, "code", "AuditSourceTypeCode")
    if attr_type and not types:
        types.append(Code(attr_type))
    return AuditSourceId(source_id, _attr(attrs, "AuditEnterpriseSiteID"), tuple(types))


def _entity(element: etree._Element) -> Entity | None:
    attrs = element
    object_id = _attr(attrs, "ParticipantObjectID")
    if object_id is None:
        return None
    groups = _groups(element)
    query = _first(groups, "ParticipantObjectQuery")
    name = _first(groups, "ParticipantObjectName")
    details = tuple(
        Detail(d.get("type") or "", _b64(d.get("value")))
        for d in groups.get("ParticipantObjectDetail", ())
    )
    study_uids: list[str] = []
    sop_classes: list[tuple[str, int | None]] = []
    for description in groups.get("ParticipantObjectDescription", ()):
        for contains in description.iterchildren("ParticipantObjectContainsStudy"):
            study_uids.extend(
                uid.strip() for s in contains.iterchildren("StudyIDs") if (uid := s.get("UID"))
            )
        for sop in description.iterchildren("SOPClass"):
            count = sop.get("NumberOfInstances")
            sop_classes.append(
                ((sop.get("UID") or "").strip(), int(count) if count and count.isdigit() else None)
            )
    return Entity(
        object_id=object_id,
        id_type=_code(_first(groups, "ParticipantObjectIDTypeCode")),
        type_code=_attr(attrs, "ParticipantObjectTypeCode"),
        role=_attr(attrs, "ParticipantObjectTypeCodeRole"),
        lifecycle=_attr(attrs, "ParticipantObjectDataLifeCycle"),
        sensitivity=_attr(attrs, "ParticipantObjectSensitivity"),
        name=(name.text or "").strip() or None if name is not None else None,
        query=_b64(query.text) if query is not None else None,
        details=details,
        study_uids=tuple(study_uids),
        sop_classes=tuple(sop_classes),
    )


def _dialect(event_id: etree._Element | None) -> Dialect:
    if event_id is None:
        return "unknown"
    if event_id.get("csd-code") is not None:
        return "dicom"
    return "rfc3881" if event_id.get("code") is not None else "unknown"


@dataclass
class _Parsed:
    event_id: Code | None = None
    action: str | None = None
    outcome: int | None = None
    outcome_description: str | None = None
    event_time: datetime | None = None
    event_types: tuple[Code, ...] = ()
    purposes: tuple[Code, ...] = ()
    participants: tuple[Participant, ...] = ()
    sources: tuple[AuditSourceId, ...] = ()
    entities: tuple[Entity, ...] = ()
    dialect: Dialect = "unknown"


def _read_audit_message(root: etree._Element, flags: list[str]) -> _Parsed:
    out = _Parsed()
    top = _groups(root)
    event = _first(top, "EventIdentification")
    if event is not None:
        attrs = event
        groups = _groups(event)
        event_id = _first(groups, "EventID")
        out.dialect = _dialect(event_id)
        out.event_id = _code(event_id)
        action = _attr(attrs, "EventActionCode")
        out.action = action if action in ("C", "R", "U", "D", "E") else None
        outcome = _attr(attrs, "EventOutcomeIndicator")
        if outcome is not None and outcome.isdigit() and int(outcome) in (0, 4, 8, 12):
            out.outcome = int(outcome)
        else:
            flags.append(FLAG_OUTCOME)
        description = _first(groups, "EventOutcomeDescription")
        if description is not None and description.text:
            out.outcome_description = description.text.strip() or None
        out.event_time = parse_datetime(_attr(attrs, "EventDateTime"))
        if out.event_time is None:
            flags.append(FLAG_EVENT_TIME)
        out.event_types = _codes(groups, "EventTypeCode")
        out.purposes = _codes(groups, "PurposeOfUse")
    if out.event_id is None:
        flags.append(FLAG_NO_EVENT_ID)
    out.participants = tuple(
        p for p in (_participant(e) for e in top.get("ActiveParticipant", ())) if p
    )
    if not out.participants:
        flags.append(FLAG_NO_PARTICIPANT)
    out.sources = tuple(
        s for s in (_audit_source(e) for e in top.get("AuditSourceIdentification", ())) if s
    )
    if not out.sources:
        flags.append(FLAG_NO_AUDIT_SOURCE)
    out.entities = tuple(
        e
        for e in (_entity(x) for x in top.get("ParticipantObjectIdentification", ()))
        if e is not None
    )
    return out


def _syslog_time(header: SyslogHeader | None) -> datetime | None:
    return parse_datetime(header.timestamp) if header is not None else None


def parse_record(
    raw: bytes,
    *,
    sender: str,
    transport: Transport,
    received_at: datetime | None = None,
    sender_port: int | None = None,
    extra_flags: Iterable[str] = (),
    sender_identity: str | None = None,
    bound_source_ids: Collection[str] | None = None,
) -> AuditRecord:
    """Parse one syslog message (or bare audit XML). Never raises.

    ``bound_source_ids`` are the AuditSourceIDs the authenticated sender may report as (None:
    any); a record claiming another one is flagged :data:`FLAG_SOURCE_UNBOUND`."""
    received = received_at or datetime.now(UTC)
    flags: list[str] = list(extra_flags)
    header: SyslogHeader | None = None
    problem: str | None = None
    parsed = _Parsed()
    try:
        header, msg, problem = _split_syslog(raw, flags)
        xml = _xml_payload(msg)
        if xml is None:
            flags.append(FLAG_NO_XML)
            problem = problem or "the syslog message carries no XML audit message"
        else:
            try:
                root = parse_audit_xml(xml)
            except XmlRejected as exc:
                flags.append(FLAG_XML_INVALID)
                problem = exc.reason
            else:
                if _local(root) != "AuditMessage":
                    flags.append(FLAG_NOT_AUDIT_MESSAGE)
                    problem = f"root element is <{_local(root)}>, not <AuditMessage>"
                else:
                    before = len(flags)
                    parsed = _read_audit_message(root, flags)
                    if len(flags) > before:
                        problem = "incomplete audit message: " + ", ".join(flags[before:])
    except Exception as exc:  # never lose a message to a parser bug
        flags.append(FLAG_XML_INVALID)
        problem = f"unexpected parse failure: {type(exc).__name__}: {exc}"
    event_time = parsed.event_time or _syslog_time(header) or received
    if bound_source_ids is not None and FLAG_SOURCE_UNBOUND not in flags:
        claimed = [source.source_id for source in parsed.sources]
        unbound = [c for c in claimed if c not in bound_source_ids]
        if unbound or not claimed:
            flags.append(FLAG_SOURCE_UNBOUND)
            why = (
                f"AuditSourceID {unbound[0]!r} is not bound to the sender"
                if unbound
                else "no AuditSourceID to check against the sender's bindings"
            )
            if sender_identity:
                why += f" ({sender_identity})"
            problem = f"{problem}; {why}" if problem else why
    return AuditRecord(
        raw=raw,
        received_at=received,
        sender=sender,
        sender_port=sender_port,
        sender_identity=sender_identity,
        transport=transport,
        event_time=event_time,
        dialect=parsed.dialect,
        flags=tuple(dict.fromkeys(flags)),
        problem=problem,
        syslog=header,
        event_id=parsed.event_id,
        action=parsed.action,
        outcome=parsed.outcome,
        outcome_description=parsed.outcome_description,
        event_types=parsed.event_types,
        purposes_of_use=parsed.purposes,
        participants=parsed.participants,
        audit_sources=parsed.sources,
        entities=parsed.entities,
    )


# --------------------------------------------------------------------------- patient ids


def patient_key(value: str) -> str:
    """Index form of a patient id: ``id|oid`` for a CX ``id^^^&oid&ISO`` (and for FHIR
    ``urn:oid:oid|id``), ``id|`` when no assigning authority is known. A search by the bare id
    is then a prefix match on ``id|``."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    if "^" in text:
        parts = text.split("^")
        authority = parts[3].split("&") if len(parts) > 3 else []
        oid = authority[1] if len(authority) > 1 else (authority[0] if authority else "")
        return f"{parts[0]}|{oid}"
    if "|" in text:
        system, _, ident = text.partition("|")
        if system.startswith("urn:oid:"):
            system = system[len("urn:oid:") :]
        return f"{ident}|{system}"
    return f"{text}|"


_NAME_WORD = re.compile(r"[^\W_]+")


def name_words(value: str) -> list[str]:
    """Index form of a person's name: its words, lower case (``Lindqvist^Alice`` -> lindqvist,
    alice); a search for any of them, or all, finds the name whatever its component order."""
    return _unique(w.casefold() for w in _NAME_WORD.findall(value) if len(w) > 1)
