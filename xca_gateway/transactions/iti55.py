"""ITI-55 Cross Gateway Patient Discovery (XCPD), both sides, synchronous mode.

The Initiating Gateway sends the demographics of a local patient (and, "query and feed" mode,
the patient's local id plus its assigning authority in ``authorOrPerformer``) in an HL7 v3
``PRPA_IN201305UV02``; the Responding Gateway matches them against its own patients and answers
``PRPA_IN201306UV02`` (ITI TF-2 3.55):

* exactly one confident match → acknowledgement AA, queryResponseCode OK, one
  ``subject/registrationEvent`` whose patient id is valid in the responding community, and a
  ``custodian`` carrying the responding homeCommunityId (root only);
* no (or more than one) match → AA / NF, no registrationEvent; when a match is near but the
  request lacks the gender, a ``reasonOf/detectedIssueEvent`` asks for it
  (``LivingSubjectAdministrativeGenderRequested``, code system 1.3.6.1.4.1.19376.1.2.27.1);
* an error → AE / AE (or QE for a bad query parameter) with an ``acknowledgementDetail``
  and, for internal errors, the XCPD ``InternalError`` issue (1.3.6.1.4.1.19376.1.2.27.3).

A payload that is not a ``PRPA_IN201305UV02`` at all gets a SOAP Sender fault. The deferred
response option (its own wsa:Action) is not offered; a synchronous request asking for deferred
processing (``responsePriorityCode`` D) is refused with NS250.

Message building and parsing are pure functions; only :func:`iti55_handler` (via the
directory, off the event loop) and :func:`discover` do I/O.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.patients.directory import (
    MATCH_THRESHOLD,
    Demographics,
    PatientDirectory,
    PatientRecord,
    normalize_birth_date,
    normalize_gender,
)
from xca_gateway.patients.xref import CrossReferenceTable
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import (
    Handler,
    Operation,
    SoapEndpoint,
    SoapRequest,
    SoapResponse,
)
from xca_gateway.transactions.hl7v3 import (
    HL7,
    II,
    XSI,
    Acknowledgement,
    Device,
    Hl7v3Error,
    add_acknowledgement,
    add_address,
    add_detected_issue,
    add_ii,
    add_name,
    add_query_ack,
    audited_query,
    ii_patient,
    oid_of,
    patient_ii,
    q,
    read_acknowledgement,
    read_address,
    read_device,
    read_ii,
    read_name,
    read_person,
    read_phone,
    require_query_by_parameter,
    sub,
    telecom_value,
    transmission_wrapper,
)
from xca_gateway.xds.patient_id import PatientId

log = logging.getLogger(__name__)

ACTION = "urn:hl7-org:v3:PRPA_IN201305UV02:CrossGatewayPatientDiscovery"
RESPONSE_ACTION = "urn:hl7-org:v3:PRPA_IN201306UV02:CrossGatewayPatientDiscovery"
DEFERRED_ACTION = "urn:hl7-org:v3:PRPA_IN201305UV02:Deferred:CrossGatewayPatientDiscovery"
PATH = "/xca/iti55"
TRANSACTION = "ITI-55"

QUERY = "PRPA_IN201305UV02"
RESPONSE = "PRPA_IN201306UV02"
QUERY_TRIGGER = "PRPA_TE201305UV02"
RESPONSE_TRIGGER = "PRPA_TE201306UV02"

# ITI TF-2 3.55.4.2.2.6: attributes a Responding Gateway may ask for.
MORE_ATTRIBUTES_CODE_SYSTEM = "1.3.6.1.4.1.19376.1.2.27.1"
GENDER_REQUESTED = "LivingSubjectAdministrativeGenderRequested"
# ITI TF-2 3.55.4.2.2.5: custodian/assignedEntity/code, Health Data Locator support.
HEALTH_DATA_LOCATOR_CODE_SYSTEM = "1.3.6.1.4.1.19376.1.2.27.2"
# ITI TF-2 3.55.4.2.2.7: reasons for not answering.
XCPD_ERROR_CODE_SYSTEM = "1.3.6.1.4.1.19376.1.2.27.3"

_PARAMETERS = f"/{QUERY}/controlActProcess/queryByParameter/parameterList"
# HL7 v3 TS: a (possibly partial) date-time with optional fraction and UTC offset.
_TS = re.compile(r"^[0-9]{4,14}(\.[0-9]+)?([+-][0-9]{1,4})?$")


class XcpdError(Exception):
    """The peer's XCPD answer is an error or cannot be used (initiating side)."""


# ---------------------------------------------------------------------------- the query


@dataclass(frozen=True)
class XcpdQuery:
    """A parsed PRPA_IN201305UV02. ``demographics.identifiers`` are its livingSubjectIds."""

    message_id: II | None
    query_id: II | None
    sender: Device | None
    receiver: Device | None
    demographics: Demographics
    # authorOrPerformer/assignedDevice/id: the assigning authority of the initiating
    # community's patient ids ("query and feed" mode).
    community_authority: str | None
    response_priority: str | None

    @property
    def initiating_home_community_id(self) -> str | None:
        org = self.sender.organization if self.sender is not None else None
        return f"urn:oid:{org}" if org else None

    @property
    def initiator_patient_id(self) -> PatientId | None:
        """The patient's id in the initiating community, if the request names it."""
        if self.community_authority is None:
            return None
        return next(
            (
                pid
                for pid in self.demographics.identifiers
                if pid.assigning_authority == self.community_authority
            ),
            None,
        )


def build_query(
    demographics: Demographics,
    *,
    sender: Device,
    receiver: Device,
    community_authority: str | None = None,
    query_id: II | None = None,
    message_id: II | None = None,
) -> etree._Element:
    """A synchronous PRPA_IN201305UV02 for ``demographics`` (identifiers → livingSubjectId)."""
    ids = [pid for pid in demographics.identifiers if pid.id]
    birth_date = normalize_birth_date(demographics.birth_date)
    if not ids and not ((demographics.family or demographics.given) and birth_date is not None):
        # ITI TF-2 3.55.4.1.2.1: no identifier → both name and birth time are required.
        raise ValueError("an XCPD query needs a patient identifier or name and birth date")
    root = transmission_wrapper(
        QUERY, receiver=receiver, sender=sender, accept_ack_code="AL", message_id=message_id
    )
    control_act = sub(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    sub(control_act, "code", code=QUERY_TRIGGER, codeSystem="2.16.840.1.113883.1.6")
    if community_authority:
        author = sub(control_act, "authorOrPerformer", typeCode="AUT")
        device = sub(author, "assignedDevice", classCode="ASSIGNED")
        sub(device, "id", root=community_authority)
    qbp = sub(control_act, "queryByParameter")
    add_ii(qbp, "queryId", query_id or II.new())
    sub(qbp, "statusCode", code="new")
    sub(qbp, "responseModalityCode", code="R")
    sub(qbp, "responsePriorityCode", code="I")
    params = sub(qbp, "parameterList")
    # Order of the parameters is the PRPA_MT201306UV02.ParameterList sequence.
    gender = normalize_gender(demographics.gender)
    if gender is not None:
        el = sub(params, "livingSubjectAdministrativeGender")
        sub(el, "value", code=gender)
        sub(el, "semanticsText").text = "LivingSubject.administrativeGender"
    if birth_date is not None:
        el = sub(params, "livingSubjectBirthTime")
        sub(el, "value", value=birth_date)
        sub(el, "semanticsText").text = "LivingSubject.birthTime"
    for pid in ids:
        el = sub(params, "livingSubjectId")
        add_ii(el, "value", patient_ii(pid))
        sub(el, "semanticsText").text = "LivingSubject.id"
    if demographics.family or demographics.given:
        el = sub(params, "livingSubjectName")
        add_name(el, "value", demographics)
        sub(el, "semanticsText").text = "LivingSubject.name"
    if demographics.address is not None and not demographics.address.is_empty():
        el = sub(params, "patientAddress")
        add_address(el, "value", demographics.address)
        sub(el, "semanticsText").text = "Patient.addr"
    if demographics.phone:
        el = sub(params, "patientTelecom")
        sub(el, "value", value=telecom_value(demographics.phone))
        sub(el, "semanticsText").text = "Patient.telecom"
    return root


def parse_query(payload: etree._Element) -> XcpdQuery:
    """Read a PRPA_IN201305UV02; raise :class:`Hl7v3Error` (QE) for unusable parameters."""
    qbp = require_query_by_parameter(payload, QUERY)
    priority_el = qbp.find(q("responsePriorityCode"))
    priority = (priority_el.get("code") or "").strip() if priority_el is not None else None
    params = qbp.find(q("parameterList"))
    if params is None:
        raise Hl7v3Error(
            "queryByParameter/parameterList is required",
            code="SYN100",
            location=f"/{QUERY}/controlActProcess/queryByParameter",
            query_response_code="QE",
        )
    identifiers: list[PatientId] = []
    for index, value in enumerate(params.iterfind(f"{q('livingSubjectId')}/{q('value')}"), start=1):
        if value.get("nullFlavor"):
            continue
        ii = read_ii(value)
        if ii is None or not ii.extension:
            raise Hl7v3Error(
                "a livingSubjectId needs both root and extension",
                code="SYN102",
                location=f"{_PARAMETERS}/livingSubjectId[{index}]/value",
                query_response_code="QE",
            )
        pid = ii_patient(ii)
        if pid is not None:  # else not an OID-rooted id we could ever hold: no match by it
            identifiers.append(pid)
    family, given = read_name(params.find(f"{q('livingSubjectName')}/{q('value')}"))
    birth_el = params.find(f"{q('livingSubjectBirthTime')}/{q('value')}")
    birth_text = (birth_el.get("value") or "").strip() if birth_el is not None else ""
    birth_date = normalize_birth_date(birth_text)
    if birth_text and not _TS.match(birth_text):
        raise Hl7v3Error(
            f"livingSubjectBirthTime {birth_text!r} is not an HL7 TS",
            code="SYN102",
            location=f"{_PARAMETERS}/livingSubjectBirthTime/value",
            query_response_code="QE",
        )
    if not identifiers and not ((family or given) and birth_text):
        raise Hl7v3Error(
            "without a livingSubjectId, livingSubjectName and livingSubjectBirthTime are "
            "required (ITI TF-2 3.55.4.1.2.1)",
            code="SYN100",
            location=_PARAMETERS,
            query_response_code="QE",
        )
    gender_el = params.find(f"{q('livingSubjectAdministrativeGender')}/{q('value')}")
    author = read_ii(
        payload.find(
            f"{q('controlActProcess')}/{q('authorOrPerformer')}/{q('assignedDevice')}/{q('id')}"
        )
    )
    return XcpdQuery(
        message_id=read_ii(payload.find(q("id"))),
        query_id=read_ii(qbp.find(q("queryId"))),
        sender=read_device(payload, "sender"),
        receiver=read_device(payload, "receiver"),
        demographics=Demographics(
            family=family,
            given=given,
            birth_date=birth_date,
            gender=normalize_gender(gender_el.get("code") if gender_el is not None else None),
            address=read_address(params.find(f"{q('patientAddress')}/{q('value')}")),
            phone=read_phone(params.find(f"{q('patientTelecom')}/{q('value')}")),
            identifiers=tuple(identifiers),
        ),
        community_authority=author.root if author is not None else None,
        response_priority=priority,
    )


# ---------------------------------------------------------------------------- the response


@dataclass(frozen=True)
class XcpdMatch:
    patient_id: PatientId
    home_community_id: str | None  # from the custodian, as urn:oid:
    demographics: Demographics
    score: int | None  # queryMatchObservation, when the responder gives one


@dataclass(frozen=True)
class XcpdResponse:
    acknowledgement: Acknowledgement
    matches: tuple[XcpdMatch, ...]
    sender: Device | None

    @property
    def response_code(self) -> str:
        return self.acknowledgement.query_response_code


def _add_patient(subject: etree._Element, record: PatientRecord, score: int) -> None:
    event = sub(subject, "registrationEvent", classCode="REG", moodCode="EVN")
    sub(event, "id", nullFlavor="NA")
    sub(event, "statusCode", code="active")
    subject1 = sub(event, "subject1", typeCode="SBJ")
    patient = sub(subject1, "patient", classCode="PAT")
    add_ii(patient, "id", patient_ii(record.patient_id))
    sub(patient, "statusCode", code="active")
    person = sub(patient, "patientPerson", classCode="PSN", determinerCode="INSTANCE")
    d = record.demographics
    add_name(person, "name", d)
    if d.phone:
        sub(person, "telecom", value=telecom_value(d.phone))
    if d.gender:
        sub(person, "administrativeGenderCode", code=d.gender)
    if d.birth_date:
        sub(person, "birthTime", value=d.birth_date)
    if d.address is not None and not d.address.is_empty():
        add_address(person, "addr", d.address)
    observation = sub(
        sub(patient, "subjectOf1"), "queryMatchObservation", classCode="COND", moodCode="EVN"
    )
    sub(observation, "code", code="IHE_PDQ")
    value = sub(observation, "value", value=str(score))
    value.set(f"{{{XSI}}}type", "INT")


def _add_custodian(subject: etree._Element, home_community_id: str) -> None:
    event = subject.find(q("registrationEvent"))
    assert event is not None
    custodian = sub(event, "custodian", typeCode="CST")
    entity = sub(custodian, "assignedEntity", classCode="ASSIGNED")
    sub(entity, "id", root=oid_of(home_community_id))
    sub(
        entity,
        "code",
        code="NotHealthDataLocator",
        codeSystem=HEALTH_DATA_LOCATOR_CODE_SYSTEM,
    )


def build_response(
    request: etree._Element,
    *,
    sender: Device,
    home_community_id: str,
    matches: Sequence[tuple[PatientRecord, int]] = (),
    more_attributes: Sequence[str] = (),
    error: Hl7v3Error | None = None,
) -> etree._Element:
    """The PRPA_IN201306UV02 answering ``request`` (read leniently: it may be malformed)."""
    requester = read_device(request, "sender") or Device(None)
    root = transmission_wrapper(RESPONSE, receiver=requester, sender=sender, accept_ack_code="NE")
    add_acknowledgement(root, "AE" if error else "AA", read_ii(request.find(q("id"))), error)
    control_act = sub(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    sub(control_act, "code", code=RESPONSE_TRIGGER, codeSystem="2.16.840.1.113883.1.6")
    if error is None:
        for record, score in matches:
            subject = sub(control_act, "subject", typeCode="SUBJ")
            _add_patient(subject, record, score)
            _add_custodian(subject, home_community_id)
        for code in more_attributes:
            add_detected_issue(control_act, code, MORE_ATTRIBUTES_CODE_SYSTEM)
    elif error.issue is not None:
        add_detected_issue(control_act, *error.issue)
    qbp = request.find(f"{q('controlActProcess')}/{q('queryByParameter')}")
    query_id = read_ii(qbp.find(q("queryId"))) if qbp is not None else None
    code = error.query_response_code if error else ("OK" if matches else "NF")
    add_query_ack(control_act, query_id, code, results=None if error else len(matches))
    if qbp is not None and qbp.find(q("queryId")) is not None:
        # The response echoes the query (ITI TF-2 3.55.4.2.2).
        control_act.append(copy.deepcopy(qbp))
    return root


def parse_response(payload: etree._Element) -> XcpdResponse:
    """Read a PRPA_IN201306UV02; raise :class:`XcpdError` when it is not one."""
    if payload.tag != q(RESPONSE):
        raise XcpdError(f"expected {RESPONSE}, got {etree.QName(payload).localname}")
    ack = read_acknowledgement(payload)
    if not ack.type_code or not ack.query_response_code:
        raise XcpdError("the response has no acknowledgement typeCode or queryResponseCode")
    matches: list[XcpdMatch] = []
    control_act = payload.find(q("controlActProcess"))
    assert control_act is not None  # read_acknowledgement found the queryAck in it
    for event in control_act.iterfind(f"{q('subject')}/{q('registrationEvent')}"):
        patient = event.find(f"{q('subject1')}/{q('patient')}")
        if patient is None:
            continue
        ids = [p for p in (ii_patient(read_ii(i)) for i in patient.iterfind(q("id"))) if p]
        if len(ids) != 1:
            # ITI TF-2 3.55.4.2.2.2: exactly one patient id (others go in asOtherIDs).
            raise XcpdError(f"a matched patient has {len(ids)} usable ids, not one")
        person = patient.find(q("patientPerson"))
        demographics = read_person(person, ids) if person is not None else Demographics()
        custodian = read_ii(event.find(f"{q('custodian')}/{q('assignedEntity')}/{q('id')}"))
        score_el = patient.find(f"{q('subjectOf1')}/{q('queryMatchObservation')}/{q('value')}")
        score: int | None = None
        if score_el is not None:
            try:
                score = int((score_el.get("value") or "").strip())
            except ValueError:
                score = None
        matches.append(
            XcpdMatch(
                ids[0],
                f"urn:oid:{custodian.root}" if custodian is not None else None,
                demographics,
                score,
            )
        )
    return XcpdResponse(ack, tuple(matches), read_device(payload, "sender"))


def select_match(
    response: XcpdResponse,
    *,
    query_id: II | None = None,
    peer_authority: str | None = None,
    peer_home_community_id: str | None = None,
    minimum_score: int = MATCH_THRESHOLD,
) -> PatientId | None:
    """The one confident match of a response, or None; raise :class:`XcpdError` on errors."""
    ack = response.acknowledgement
    if not ack.accepted or ack.query_response_code in ("AE", "QE"):
        why = "; ".join(ack.details + ack.issues) or "no detail"
        raise XcpdError(f"the peer answered {ack.type_code}/{ack.query_response_code}: {why}")
    if query_id is not None and ack.query_id is not None and ack.query_id != query_id:
        raise XcpdError(f"the response is for query {ack.query_id}, not {query_id}")
    if ack.query_response_code != "OK":
        return None
    candidates = [
        m
        for m in response.matches
        if (peer_authority is None or m.patient_id.assigning_authority == peer_authority)
        and (
            peer_home_community_id is None
            or m.home_community_id is None
            or m.home_community_id == peer_home_community_id
        )
    ]
    if len(candidates) != 1:
        return None
    match = candidates[0]
    if match.score is not None and match.score < minimum_score:
        return None
    return match.patient_id


# ---------------------------------------------------------------------------- initiating


async def cross_gateway_patient_discovery(
    peer_client: PeerClient,
    url: str,
    query: etree._Element,
    *,
    peer_name: str = "",
    deadline: float | None = None,
) -> XcpdResponse:
    """Send ``query``; transport problems raise ``PeerError``, bad answers :class:`XcpdError`."""
    reply = await peer_client.call(
        url, query, ACTION, peer=peer_name, transaction=TRANSACTION, deadline=deadline
    )
    try:
        return parse_response(reply.payload)
    finally:
        reply.close()


async def discover(
    peer_client: PeerClient,
    url: str,
    demographics: Demographics,
    *,
    home_community_id: str,
    assigning_authority: str | None = None,
    patient_id: PatientId | None = None,
    peer_home_community_id: str | None = None,
    peer_authority: str | None = None,
    peer_name: str = "",
    deadline: float | None = None,
    minimum_score: int = MATCH_THRESHOLD,
) -> PatientId | None:
    """Ask the Responding Gateway at ``url`` who ``demographics`` are in its community.

    Returns the patient id only for a single confident match (of ``peer_authority``, when
    given); NF, several matches or a low match score give None. ``patient_id`` (our local id,
    of ``assigning_authority``) is sent too, so the peer can record the correlation.
    An error answer raises :class:`XcpdError`; transport failures raise ``PeerError``.
    """
    identifiers = tuple(demographics.identifiers)
    if patient_id is not None and patient_id not in identifiers:
        identifiers = (patient_id, *identifiers)
    ours = oid_of(home_community_id)
    peer_oid = oid_of(peer_home_community_id) if peer_home_community_id else None
    query_id = II(ours, II.new().root)
    query = build_query(
        Demographics(
            family=demographics.family,
            given=demographics.given,
            birth_date=demographics.birth_date,
            gender=demographics.gender,
            address=demographics.address,
            phone=demographics.phone,
            identifiers=identifiers,
        ),
        sender=Device(II(ours), organization=ours),
        receiver=Device(II(peer_oid) if peer_oid else None, telecom=url, organization=peer_oid),
        community_authority=assigning_authority,
        query_id=query_id,
    )
    response = await cross_gateway_patient_discovery(
        peer_client, url, query, peer_name=peer_name, deadline=deadline
    )
    return select_match(
        response,
        query_id=query_id,
        peer_authority=peer_authority,
        peer_home_community_id=peer_home_community_id,
        minimum_score=minimum_score,
    )


# ---------------------------------------------------------------------------- responding


@dataclass(frozen=True)
class Answer:
    matches: list[tuple[PatientRecord, int]]
    more_attributes: list[str]


def answer_query(
    directory: PatientDirectory,
    query: XcpdQuery,
    *,
    assigning_authority: str,
    xref: CrossReferenceTable | None = None,
) -> Answer:
    """Match the query against our patients (blocking: call off the event loop).

    Only patients of our assigning authority are answers: the id returned must be usable in
    an ITI-38 to this community. An identifier of another domain that our cross-reference
    table already correlates with one of our patients counts as an identifier match.
    """
    demographics = query.demographics
    identifiers = list(demographics.identifiers)
    if xref is not None:
        for pid in demographics.identifiers:
            if pid.assigning_authority != assigning_authority:
                ours = xref.lookup(pid, assigning_authority)
                if ours is not None:
                    identifiers.append(ours)
    probe = Demographics(
        family=demographics.family,
        given=demographics.given,
        birth_date=demographics.birth_date,
        gender=demographics.gender,
        identifiers=tuple(identifiers),
    )
    candidates = [
        m
        for m in directory.match(probe, minimum_score=0)
        if m.patient_id.assigning_authority == assigning_authority
    ]
    confident = [m for m in candidates if m.score >= MATCH_THRESHOLD]
    if len(confident) == 1:
        match = confident[0]
        record = directory.record(match.patient_id)
        assert record is not None
        initiator = query.initiator_patient_id
        if xref is not None and initiator is not None and initiator != match.patient_id:
            # "Query and feed": remember who this patient is in the initiating community.
            xref.link_if_consistent(match.patient_id, initiator)
        return Answer([(record, match.score)], [])
    more: list[str] = []
    if not confident and candidates and demographics.gender is None:
        more.append(GENDER_REQUESTED)
    return Answer([], more)


def iti55_handler(
    directory: PatientDirectory,
    *,
    home_community_id: str,
    assigning_authority: str,
    xref: CrossReferenceTable | None = None,
    device_id: str | None = None,
) -> Handler:
    """ITI-55 at the Responding Gateway, answered from the local patient directory.

    With ``xref``, identifiers the initiator sends are resolved through the cross-reference
    table, and a confident match records the initiator's patient id there ("feed").
    """
    ours = oid_of(home_community_id)
    sender = Device(II(device_id or ours), organization=ours)

    async def handle(request: SoapRequest) -> SoapResponse:
        payload = request.payload
        if payload.tag != q(QUERY):
            raise SoapFault.sender(
                f"{TRANSACTION} expects hl7:{QUERY} ({HL7}) in the SOAP Body, not "
                f"{etree.QName(payload).text}"
            )
        error: Hl7v3Error | None = None
        answer = Answer([], [])
        try:
            query = parse_query(payload)
            if query.response_priority not in (None, "", "I"):
                raise Hl7v3Error(
                    "only immediate responses are supported (responsePriorityCode I); the "
                    "deferred option is not offered",
                    code="NS250",
                    location=f"/{QUERY}/controlActProcess/queryByParameter/responsePriorityCode",
                )
            answer = await asyncio.to_thread(
                answer_query, directory, query, assigning_authority=assigning_authority, xref=xref
            )
        except Hl7v3Error as exc:
            error = exc
        except Exception:
            log.exception("ITI-55 matching failed")
            error = Hl7v3Error(
                "internal error while matching the patient",
                issue=("InternalError", XCPD_ERROR_CODE_SYSTEM),
            )
        response = build_response(
            payload,
            sender=sender,
            home_community_id=home_community_id,
            matches=answer.matches,
            more_attributes=answer.more_attributes,
            error=error,
        )
        return SoapResponse(response, RESPONSE_ACTION, outcome="failure" if error else "success")

    return handle


def endpoint(handler: Handler, path: str = PATH) -> SoapEndpoint:
    """The SOAP endpoint serving ITI-55 (add it before the gateway's SoapService is built)."""
    ep = SoapEndpoint(path=path, name="iti55", operations={})
    ep.add(Operation(ACTION, TRANSACTION, handler))
    return ep


# ---------------------------------------- audit record (ITI TF-2b 3.55.5)


def query_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["initiating", "responding"],
    query_id: str | None,
    query: bytes,
    home_community_id: str | None = None,
    patient_ids: Sequence[str] = (),
    outcome: m.EventOutcome = m.EventOutcome.SUCCESS,
) -> m.AuditMessage:
    """ITI-55 Cross Gateway Patient Discovery (XCPD).

    ``query`` is the HL7v3 queryByParameter element, ``query_id`` its queryId. The Initiating
    Gateway lists no patients; the Responding Gateway lists the patient ids it matched.
    """
    m.check_side(side, ("initiating", "responding"))
    details = [(m.DETAIL_HOME_COMMUNITY_ID, m.utf8(home_community_id))] if home_community_id else []
    return m.query_message(
        ctx,
        m.EventTypeCode.ITI55,
        parties,
        query_id=query_id,
        query=query,
        details=details,
        patient_ids=patient_ids if side == "responding" else (),
        outcome=outcome,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-55 answered here, as the Responding Gateway."""
    q = audited_query(exchange.request)
    return [
        query_audit(
            ctx,
            exchange.parties,
            side="responding",
            query_id=q.query_id,
            query=q.query,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-55 asked of another system, as the Initiating Gateway."""
    q = audited_query(exchange.request)
    return [
        query_audit(
            ctx,
            exchange.parties,
            side="initiating",
            query_id=q.query_id,
            query=q.query,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]
