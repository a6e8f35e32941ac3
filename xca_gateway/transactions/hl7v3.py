"""HL7 v3 message building blocks shared by XCPD (ITI-55) and PIXV3 Query (ITI-45), sans-IO.

Both transactions use the same transmission wrapper (MCCI_MT000100UV01 for requests,
MCCI_MT000300UV01 for responses): message id, creation time, interaction id, sender and
receiver devices (with the homeCommunityId in the device's ``asAgent/representedOrganization``),
an acknowledgement of the request, and a control act (QUQI / MFMI) carrying the query and its
queryAck. Element order follows the HL7 v3 Normative Edition 2008 schemas that IHE references.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lxml import etree

from xca_gateway.patients.directory import (
    Address,
    Demographics,
    normalize_birth_date,
    normalize_gender,
)
from xca_gateway.xds.patient_id import PatientId

HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
# HL7 v3 instances conventionally use the default namespace (lxml-stubs only type str keys).
NSMAP: Any = {None: HL7, "xsi": XSI}

# HL7 interaction ids and trigger-event codes live in this code system.
INTERACTION_ID_ROOT = "2.16.840.1.113883.1.6"
# AcknowledgementDetailCode (INTERR, SYN1xx, NS2xx).
ACK_DETAIL_CODE_SYSTEM = "2.16.840.1.113883.5.1100"
# ActCode: DetectedIssueEvent codes (ActAdministrativeDetectedIssueCode).
ACT_CODE_SYSTEM = "2.16.840.1.113883.5.4"
# HL7 v2 table 0357 (message error condition codes); PIXV3 uses 204 "unknown key identifier".
V2_ERROR_CODE_SYSTEM = "2.16.840.1.113883.12.357"

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def q(local: str) -> str:
    """Clark name of an element in the HL7 v3 namespace."""
    return f"{{{HL7}}}{local}"


def sub(parent: etree._Element, local: str, **attributes: str) -> etree._Element:
    return etree.SubElement(parent, q(local), attributes)


def oid_of(home_community_id: str) -> str:
    """``urn:oid:1.2.3`` → ``1.2.3`` (HL7 v3 ids carry bare OIDs)."""
    return home_community_id.removeprefix("urn:oid:")


def timestamp(when: datetime | None = None) -> str:
    """An HL7 TS in UTC with an explicit offset."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


class Hl7v3Error(Exception):
    """A request that cannot be answered normally; becomes an AE acknowledgement.

    ``query_response_code`` is AE (application error) or QE (query parameter error);
    ``code``/``code_system`` go to acknowledgementDetail, ``location`` is an XPath to the
    offending element; ``issue`` optionally names a detectedIssueManagement code
    (code, codeSystem) for the control act's reasonOf.
    """

    def __init__(
        self,
        text: str,
        *,
        code: str = "INTERR",
        code_system: str = ACK_DETAIL_CODE_SYSTEM,
        location: str | None = None,
        query_response_code: str = "AE",
        issue: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.code_system = code_system
        self.location = location
        self.query_response_code = query_response_code
        self.issue = issue


# ---------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class II:
    """Instance identifier; ``root`` alone may be the whole id."""

    root: str
    extension: str | None = None

    @classmethod
    def new(cls) -> II:
        return cls(str(uuid.uuid4()))

    def __str__(self) -> str:
        return f"{self.root}^{self.extension}" if self.extension else self.root


def add_ii(parent: etree._Element, local: str, ii: II | None) -> etree._Element:
    el = sub(parent, local)
    if ii is None:
        el.set("nullFlavor", "UNK")
        return el
    el.set("root", ii.root)
    if ii.extension:
        el.set("extension", ii.extension)
    return el


def read_ii(el: etree._Element | None) -> II | None:
    if el is None or el.get("nullFlavor") or not (el.get("root") or "").strip():
        return None
    extension = (el.get("extension") or "").strip()
    return II(el.get("root", "").strip(), extension or None)


def patient_ii(pid: PatientId) -> II:
    return II(pid.assigning_authority, pid.id)


def ii_patient(ii: II | None) -> PatientId | None:
    """A patient id from an II: root an OID, extension present and free of HL7 v2 delimiters
    (it goes into a CX value of the next ITI-38, so nothing may break out of it)."""
    if ii is None or not ii.extension or not _OID.match(ii.root):
        return None
    if any(c in ii.extension for c in "^&~\\|"):
        return None
    return PatientId(ii.extension, ii.root)


def text_of(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    value = "".join(str(t) for t in el.itertext()).strip()
    return value or None


def add_name(parent: etree._Element, local: str, demographics: Demographics) -> etree._Element:
    name = sub(parent, local)
    if not (demographics.family or demographics.given):
        name.set("nullFlavor", "NA")
        return name
    if demographics.given:
        sub(name, "given").text = demographics.given
    if demographics.family:
        sub(name, "family").text = demographics.family
    return name


def add_address(parent: etree._Element, local: str, address: Address) -> etree._Element:
    addr = sub(parent, local)
    # AD is a mixed-content type: part order is free.
    for part, value in (
        ("streetAddressLine", address.street),
        ("city", address.city),
        ("state", address.state),
        ("postalCode", address.postal_code),
        ("country", address.country),
    ):
        if value:
            sub(addr, part).text = value
    return addr


def telecom_value(phone: str) -> str:
    return phone if ":" in phone else f"tel:{phone.replace(' ', '')}"


def read_name(el: etree._Element | None) -> tuple[str | None, str | None]:
    """(family, given) of a PN/EN: the first part of each kind."""
    if el is None or el.get("nullFlavor"):
        return None, None
    return text_of(el.find(q("family"))), text_of(el.find(q("given")))


def read_address(el: etree._Element | None) -> Address | None:
    if el is None or el.get("nullFlavor"):
        return None
    address = Address(
        street=text_of(el.find(q("streetAddressLine"))),
        city=text_of(el.find(q("city"))),
        state=text_of(el.find(q("state"))),
        postal_code=text_of(el.find(q("postalCode"))),
        country=text_of(el.find(q("country"))),
    )
    return None if address.is_empty() else address


def read_phone(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    value = (el.get("value") or "").strip()
    return value.removeprefix("tel:") or None


def read_person(person: etree._Element, identifiers: Sequence[PatientId] = ()) -> Demographics:
    """Demographics of a patientPerson (PRPA_MT201310UV02 / PRPA_MT201304UV02 Person)."""
    family, given = read_name(person.find(q("name")))
    gender = person.find(q("administrativeGenderCode"))
    birth = person.find(q("birthTime"))
    return Demographics(
        family=family,
        given=given,
        birth_date=normalize_birth_date(birth.get("value") if birth is not None else None),
        gender=normalize_gender(gender.get("code") if gender is not None else None),
        address=read_address(person.find(q("addr"))),
        phone=read_phone(person.find(q("telecom"))),
        identifiers=tuple(identifiers),
    )


# ---------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """A sender or receiver device; ``organization`` is the OID of its representedOrganization
    (in XCA/XCPD, the homeCommunityId without ``urn:oid:``)."""

    id: II | None
    telecom: str | None = None
    organization: str | None = None


def add_device(parent: etree._Element, role: str, device: Device) -> etree._Element:
    holder = sub(parent, role, typeCode="RCV" if role == "receiver" else "SND")
    el = sub(holder, "device", classCode="DEV", determinerCode="INSTANCE")
    add_ii(el, "id", device.id)
    if device.telecom:
        sub(el, "telecom", value=device.telecom)
    if device.organization:
        agent = sub(el, "asAgent", classCode="AGNT")
        org = sub(agent, "representedOrganization", classCode="ORG", determinerCode="INSTANCE")
        sub(org, "id", root=device.organization)
    return holder


def read_device(root: etree._Element, role: str) -> Device | None:
    el = root.find(f"{q(role)}/{q('device')}")
    if el is None:
        return None
    telecom = el.find(q("telecom"))
    org = read_ii(el.find(f"{q('asAgent')}/{q('representedOrganization')}/{q('id')}"))
    return Device(
        id=read_ii(el.find(q("id"))),
        telecom=(telecom.get("value") if telecom is not None else None) or None,
        organization=org.root if org is not None else None,
    )


# ---------------------------------------------------------------------------- wrapper


def transmission_wrapper(
    interaction: str,
    *,
    receiver: Device,
    sender: Device,
    accept_ack_code: str,
    message_id: II | None = None,
) -> etree._Element:
    """Root element with the wrapper fields up to and including the sender."""
    root = etree.Element(q(interaction), nsmap=NSMAP)
    root.set("ITSVersion", "XML_1.0")
    add_ii(root, "id", message_id or II.new())
    sub(root, "creationTime", value=timestamp())
    sub(root, "interactionId", root=INTERACTION_ID_ROOT, extension=interaction)
    sub(root, "processingCode", code="P")
    sub(root, "processingModeCode", code="T")
    sub(root, "acceptAckCode", code=accept_ack_code)
    add_device(root, "receiver", receiver)
    add_device(root, "sender", sender)
    return root


def add_acknowledgement(
    root: etree._Element, type_code: str, target: II | None, error: Hl7v3Error | None = None
) -> None:
    ack = sub(root, "acknowledgement")
    sub(ack, "typeCode", code=type_code)
    target_el = sub(ack, "targetMessage")
    add_ii(target_el, "id", target)
    if error is not None:
        detail = sub(ack, "acknowledgementDetail", typeCode="E")
        sub(detail, "code", code=error.code, codeSystem=error.code_system)
        sub(detail, "text").text = error.text
        if error.location:
            sub(detail, "location").text = error.location


def add_detected_issue(
    control_act: etree._Element, management_code: str, management_code_system: str
) -> None:
    """reasonOf/detectedIssueEvent, how XCPD names a reason (error or attributes wanted)."""
    reason = sub(control_act, "reasonOf", typeCode="RSON")
    event = sub(reason, "detectedIssueEvent", classCode="ALRT", moodCode="EVN")
    sub(event, "code", code="ActAdministrativeDetectedIssueCode", codeSystem=ACT_CODE_SYSTEM)
    mitigated = sub(event, "mitigatedBy", typeCode="MITGT")
    management = sub(mitigated, "detectedIssueManagement", classCode="ACT", moodCode="EVN")
    sub(management, "code", code=management_code, codeSystem=management_code_system)


def add_query_ack(
    control_act: etree._Element,
    query_id: II | None,
    response_code: str,
    *,
    results: int | None = None,
) -> None:
    ack = sub(control_act, "queryAck")
    add_ii(ack, "queryId", query_id)
    sub(ack, "statusCode", code="aborted" if response_code in ("AE", "QE") else "deliveredResponse")
    sub(ack, "queryResponseCode", code=response_code)
    if results is not None:
        sub(ack, "resultTotalQuantity", value=str(results))
        sub(ack, "resultCurrentQuantity", value=str(results))
        sub(ack, "resultRemainingQuantity", value="0")


@dataclass(frozen=True)
class Acknowledgement:
    """What a response says about the request: ack typeCode, query response, issues."""

    type_code: str
    target: II | None
    query_id: II | None
    query_response_code: str
    details: tuple[str, ...]  # acknowledgementDetail texts / codes, for messages
    issues: tuple[str, ...]  # detectedIssueManagement codes

    @property
    def accepted(self) -> bool:
        return self.type_code in ("AA", "CA")


def read_acknowledgement(root: etree._Element) -> Acknowledgement:
    ack = root.find(q("acknowledgement"))
    type_code = ""
    target: II | None = None
    details: list[str] = []
    if ack is not None:
        type_el = ack.find(q("typeCode"))
        type_code = (type_el.get("code") or "") if type_el is not None else ""
        target = read_ii(ack.find(f"{q('targetMessage')}/{q('id')}"))
        for detail in ack.iterfind(q("acknowledgementDetail")):
            code = detail.find(q("code"))
            parts = [
                (code.get("code") or "") if code is not None else "",
                text_of(detail.find(q("text"))) or "",
            ]
            details.append(": ".join(p for p in parts if p))
    control_act = root.find(q("controlActProcess"))
    query_ack = control_act.find(q("queryAck")) if control_act is not None else None
    response_code = ""
    query_id: II | None = None
    if query_ack is not None:
        code_el = query_ack.find(q("queryResponseCode"))
        response_code = (code_el.get("code") or "") if code_el is not None else ""
        query_id = read_ii(query_ack.find(q("queryId")))
    issues = (
        [
            code.get("code") or ""
            for code in control_act.iterfind(
                f"{q('reasonOf')}/{q('detectedIssueEvent')}/{q('mitigatedBy')}"
                f"/{q('detectedIssueManagement')}/{q('code')}"
            )
        ]
        if control_act is not None
        else []
    )
    return Acknowledgement(
        type_code, target, query_id, response_code, tuple(details), tuple(issues)
    )


def require_query_by_parameter(payload: etree._Element, interaction: str) -> etree._Element:
    qbp = payload.find(f"{q('controlActProcess')}/{q('queryByParameter')}")
    if qbp is None:
        raise Hl7v3Error(
            "controlActProcess/queryByParameter is required",
            code="SYN100",
            location=f"/{interaction}/controlActProcess",
            query_response_code="QE",
        )
    return qbp


# ---------------------------------------- audit records (ITI-45, ITI-55)


@dataclass(frozen=True)
class AuditedQuery:
    """What the record of an HL7 v3 query names of it: the queryId extension, the
    queryByParameter element and the patient ids it gives."""

    query_id: str | None
    query: bytes
    patient_ids: list[str]


def audited_query(payload: etree._Element) -> AuditedQuery:
    query = payload.find(f".//{{{HL7}}}queryByParameter")
    if query is None:
        return AuditedQuery(None, etree.tostring(payload), [])
    query_id = query.find(f"{{{HL7}}}queryId")
    patients = [
        f"{v.get('extension')}^^^&{v.get('root')}&ISO"
        for v in query.iter(f"{{{HL7}}}value")
        if v.get("root") and v.get("extension")
    ]
    return AuditedQuery(
        query_id.get("extension") if query_id is not None else None,
        etree.tostring(query),
        patients,
    )
