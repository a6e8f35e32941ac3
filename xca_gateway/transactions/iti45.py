"""ITI-45 PIXV3 Query: ask a PIX Manager for a patient's id in another identifier domain.

Consumer side: :func:`pix_query` sends ``PRPA_IN201309UV02`` (the known patient id in
``patientIdentifier``, the wanted domain in ``dataSource``) and reads ``PRPA_IN201310UV02``.

Manager side, so that a small region can run without a separate PIX Manager (and so the
consumer side is tested against something real): :func:`iti45_handler` answers from our
cross-reference table, following ITI TF-2 3.45.4.2.3:

* id known, correlated ids exist in the requested domains (all domains when none is asked
  for) → AA / OK, one registrationEvent whose ``patient/id`` list holds those ids (not the
  queried one), person name null (``NA``), the manager as custodian;
* id known, nothing in the requested domains → AA / NF;
* queried id, or a requested domain, unknown → AE / AE with acknowledgementDetail code 204
  (HL7 v2 table 0357, "unknown key identifier") and the XPath of the offending value.

A payload that is not a ``PRPA_IN201309UV02`` gets a SOAP Sender fault.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
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
    V2_ERROR_CODE_SYSTEM,
    Acknowledgement,
    Device,
    Hl7v3Error,
    add_acknowledgement,
    add_ii,
    add_query_ack,
    audited_query,
    ii_patient,
    patient_ii,
    q,
    read_acknowledgement,
    read_device,
    read_ii,
    require_query_by_parameter,
    sub,
    transmission_wrapper,
)
from xca_gateway.xds.patient_id import PatientId

log = logging.getLogger(__name__)

ACTION = "urn:hl7-org:v3:PRPA_IN201309UV02"
RESPONSE_ACTION = "urn:hl7-org:v3:PRPA_IN201310UV02"
PATH = "/pix/iti45"
TRANSACTION = "ITI-45"

QUERY = "PRPA_IN201309UV02"
RESPONSE = "PRPA_IN201310UV02"
QUERY_TRIGGER = "PRPA_TE201309UV02"
RESPONSE_TRIGGER = "PRPA_TE201310UV02"
UNKNOWN_KEY_IDENTIFIER = "204"

_PARAMETERS = f"/{QUERY}/controlActProcess/queryByParameter/parameterList"


class PixError(Exception):
    """The PIX Manager answered with an error, or not with a PIXV3 response."""


@dataclass(frozen=True)
class PixQuery:
    message_id: II | None
    query_id: II | None
    sender: Device | None
    receiver: Device | None
    patient: PatientId
    data_sources: tuple[str, ...]  # assigning authority OIDs; empty = all domains


@dataclass(frozen=True)
class PixResponse:
    acknowledgement: Acknowledgement
    identifiers: tuple[PatientId, ...]


def build_query(
    patient: PatientId,
    data_sources: Sequence[str] = (),
    *,
    sender: Device,
    receiver: Device,
    query_id: II | None = None,
    message_id: II | None = None,
) -> etree._Element:
    root = transmission_wrapper(
        QUERY, receiver=receiver, sender=sender, accept_ack_code="AL", message_id=message_id
    )
    control_act = sub(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    sub(control_act, "code", code=QUERY_TRIGGER, codeSystem="2.16.840.1.113883.1.6")
    qbp = sub(control_act, "queryByParameter")
    add_ii(qbp, "queryId", query_id or II.new())
    sub(qbp, "statusCode", code="new")
    sub(qbp, "responsePriorityCode", code="I")
    params = sub(qbp, "parameterList")
    for authority in data_sources:
        source = sub(params, "dataSource")
        sub(source, "value", root=authority)
        sub(source, "semanticsText").text = "DataSource.id"
    identifier = sub(params, "patientIdentifier")
    add_ii(identifier, "value", patient_ii(patient))
    sub(identifier, "semanticsText").text = "Patient.id"
    return root


def parse_query(payload: etree._Element) -> PixQuery:
    qbp = require_query_by_parameter(payload, QUERY)
    params = qbp.find(q("parameterList"))
    values = params.findall(f"{q('patientIdentifier')}/{q('value')}") if params is not None else []
    if len(values) != 1:
        raise Hl7v3Error(
            f"exactly one patientIdentifier/value is required, found {len(values)}",
            code="SYN100",
            location=_PARAMETERS,
            query_response_code="QE",
        )
    ii = read_ii(values[0])
    if ii is None or not ii.extension:
        raise Hl7v3Error(
            "patientIdentifier/value needs both root (assigning authority) and extension",
            code="SYN102",
            location=f"{_PARAMETERS}/patientIdentifier/value",
            query_response_code="QE",
        )
    patient = ii_patient(ii)
    if patient is None:
        # Not an OID domain, or characters no CX id can hold: certainly not in our table.
        raise Hl7v3Error(
            f"unknown patient identifier {ii}",
            code=UNKNOWN_KEY_IDENTIFIER,
            code_system=V2_ERROR_CODE_SYSTEM,
            location=f"{_PARAMETERS}/patientIdentifier/value",
        )
    sources: list[str] = []
    assert params is not None
    for index, value in enumerate(params.iterfind(f"{q('dataSource')}/{q('value')}"), start=1):
        ii = read_ii(value)
        if ii is None:
            raise Hl7v3Error(
                "dataSource/value needs a root (the assigning authority)",
                code="SYN102",
                location=f"{_PARAMETERS}/dataSource[{index}]/value",
                query_response_code="QE",
            )
        sources.append(ii.root)
    return PixQuery(
        message_id=read_ii(payload.find(q("id"))),
        query_id=read_ii(qbp.find(q("queryId"))),
        sender=read_device(payload, "sender"),
        receiver=read_device(payload, "receiver"),
        patient=patient,
        data_sources=tuple(sources),
    )


def build_response(
    request: etree._Element,
    *,
    sender: Device,
    custodian: str | None,
    identifiers: Sequence[PatientId] = (),
    error: Hl7v3Error | None = None,
) -> etree._Element:
    requester = read_device(request, "sender") or Device(None)
    root = transmission_wrapper(RESPONSE, receiver=requester, sender=sender, accept_ack_code="NE")
    add_acknowledgement(root, "AE" if error else "AA", read_ii(request.find(q("id"))), error)
    control_act = sub(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    sub(control_act, "code", code=RESPONSE_TRIGGER, codeSystem="2.16.840.1.113883.1.6")
    if error is None and identifiers:
        subject = sub(control_act, "subject", typeCode="SUBJ")
        event = sub(subject, "registrationEvent", classCode="REG", moodCode="EVN")
        sub(event, "id", nullFlavor="NA")
        sub(event, "statusCode", code="active")
        subject1 = sub(event, "subject1", typeCode="SBJ")
        patient_el = sub(subject1, "patient", classCode="PAT")
        for pid in identifiers:
            add_ii(patient_el, "id", patient_ii(pid))
        sub(patient_el, "statusCode", code="active")
        person = sub(patient_el, "patientPerson", classCode="PSN", determinerCode="INSTANCE")
        sub(person, "name", nullFlavor="NA")
        entity = sub(sub(event, "custodian", typeCode="CST"), "assignedEntity")
        entity.set("classCode", "ASSIGNED")
        add_ii(entity, "id", II(custodian) if custodian else None)
    qbp = request.find(f"{q('controlActProcess')}/{q('queryByParameter')}")
    query_id = read_ii(qbp.find(q("queryId"))) if qbp is not None else None
    code = error.query_response_code if error else ("OK" if identifiers else "NF")
    add_query_ack(control_act, query_id, code)
    if qbp is not None and qbp.find(q("queryId")) is not None:
        control_act.append(copy.deepcopy(qbp))
    return root


def parse_response(payload: etree._Element) -> PixResponse:
    if payload.tag != q(RESPONSE):
        raise PixError(f"expected {RESPONSE}, got {etree.QName(payload).localname}")
    ack = read_acknowledgement(payload)
    if not ack.type_code or not ack.query_response_code:
        raise PixError("the response has no acknowledgement typeCode or queryResponseCode")
    identifiers: list[PatientId] = []
    patients = payload.iterfind(
        f"{q('controlActProcess')}/{q('subject')}/{q('registrationEvent')}"
        f"/{q('subject1')}/{q('patient')}"
    )
    for patient in patients:
        # Managers put the ids in patient/id; some repeat or add them in asOtherIDs.
        elements = [
            *patient.iterfind(q("id")),
            *patient.iterfind(f"{q('patientPerson')}/{q('asOtherIDs')}/{q('id')}"),
        ]
        for el in elements:
            pid = ii_patient(read_ii(el))
            if pid is not None and pid not in identifiers:
                identifiers.append(pid)
    return PixResponse(ack, tuple(identifiers))


def select_identifier(
    response: PixResponse, patient: PatientId, target_authority: str
) -> PatientId | None:
    """The one id of ``target_authority``; None for unknown / not found / ambiguous."""
    ack = response.acknowledgement
    if not ack.accepted or ack.query_response_code in ("AE", "QE"):
        if any(d.startswith(UNKNOWN_KEY_IDENTIFIER) for d in ack.details):
            return None  # the manager does not know the patient (or the domain): unknown
        why = "; ".join(ack.details) or "no detail"
        raise PixError(f"the PIX Manager answered {ack.type_code}/{ack.query_response_code}: {why}")
    if ack.query_response_code != "OK":
        return None
    found = [
        pid
        for pid in response.identifiers
        if pid.assigning_authority == target_authority and pid != patient
    ]
    if len(found) > 1:
        log.warning(
            "PIX Manager returned %d ids of %s for %s; not choosing one",
            len(found),
            target_authority,
            patient,
        )
    return found[0] if len(found) == 1 else None


async def pix_query(
    peer_client: PeerClient,
    url: str,
    patient: PatientId,
    target_authority: str,
    *,
    sender_id: str | None = None,
    receiver_id: str | None = None,
    deadline: float | None = None,
    peer_name: str = "pix-manager",
) -> PatientId | None:
    """``patient``'s id in ``target_authority`` per the PIX Manager at ``url``, or None.

    An error answer other than "unknown patient" raises :class:`PixError`; transport
    failures raise ``PeerError``.
    """
    query = build_query(
        patient,
        [target_authority],
        sender=Device(II(sender_id) if sender_id else None),
        receiver=Device(II(receiver_id) if receiver_id else None, telecom=url),
    )
    reply = await peer_client.call(
        url, query, ACTION, peer=peer_name, transaction=TRANSACTION, deadline=deadline
    )
    try:
        response = parse_response(reply.payload)
    finally:
        reply.close()
    return select_identifier(response, patient, target_authority)


# ---------------------------------------------------------------------------- manager side


@dataclass(frozen=True)
class PixAnswer:
    identifiers: list[PatientId]


def answer_query(xref: CrossReferenceTable, query: PixQuery) -> PixAnswer:
    """Blocking (SQLite): call off the event loop. Raises :class:`Hl7v3Error` for 204 cases."""
    for index, authority in enumerate(query.data_sources, start=1):
        if not xref.knows_authority(authority):
            raise Hl7v3Error(
                f"unknown identifier domain {authority}",
                code=UNKNOWN_KEY_IDENTIFIER,
                code_system=V2_ERROR_CODE_SYSTEM,
                location=f"{_PARAMETERS}/dataSource[{index}]/value",
            )
    group = xref.identifiers(query.patient)
    if not group:
        raise Hl7v3Error(
            f"unknown patient identifier {query.patient}",
            code=UNKNOWN_KEY_IDENTIFIER,
            code_system=V2_ERROR_CODE_SYSTEM,
            location=f"{_PARAMETERS}/patientIdentifier/value",
        )
    wanted = set(query.data_sources)
    return PixAnswer(
        [
            pid
            for pid in group
            if pid != query.patient and (not wanted or pid.assigning_authority in wanted)
        ]
    )


def iti45_handler(xref: CrossReferenceTable, *, manager_id: str | None = None) -> Handler:
    """PIXV3 Query answered from the cross-reference table.

    ``manager_id`` (an OID) identifies this PIX Manager as sender device and custodian; by
    default the device the request was addressed to is used.
    """

    async def handle(request: SoapRequest) -> SoapResponse:
        payload = request.payload
        if payload.tag != q(QUERY):
            raise SoapFault.sender(
                f"{TRANSACTION} expects hl7:{QUERY} ({HL7}) in the SOAP Body, not "
                f"{etree.QName(payload).text}"
            )
        addressed = read_device(payload, "receiver")
        device_id = II(manager_id) if manager_id else (addressed.id if addressed else None)
        error: Hl7v3Error | None = None
        answer = PixAnswer([])
        try:
            query = parse_query(payload)
            answer = await asyncio.to_thread(answer_query, xref, query)
        except Hl7v3Error as exc:
            error = exc
        except Exception:
            log.exception("ITI-45 lookup failed")
            error = Hl7v3Error("internal error while looking up the patient")
        response = build_response(
            payload,
            sender=Device(device_id),
            custodian=device_id.root if device_id else None,
            identifiers=answer.identifiers,
            error=error,
        )
        return SoapResponse(response, RESPONSE_ACTION, outcome="failure" if error else "success")

    return handle


def endpoint(handler: Handler, path: str = PATH) -> SoapEndpoint:
    """The SOAP endpoint serving ITI-45 (add it before the gateway's SoapService is built)."""
    ep = SoapEndpoint(path=path, name="iti45", operations={})
    ep.add(Operation(ACTION, TRANSACTION, handler))
    return ep


# ---------------------------------------- audit record (ITI TF-2b 3.45.5)


def query_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["consumer", "manager"],
    query_id: str | None,
    query: bytes,
    patient_ids: Sequence[str] = (),
    outcome: m.EventOutcome = m.EventOutcome.SUCCESS,
) -> m.AuditMessage:
    """ITI-45 PIXV3 Query (Patient Identifier Cross-reference Consumer / Manager)."""
    m.check_side(side, ("consumer", "manager"))
    return m.query_message(
        ctx,
        m.EventTypeCode.ITI45,
        parties,
        query_id=query_id,
        query=query,
        details=(),
        patient_ids=patient_ids,
        outcome=outcome,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-45 answered here, as the Patient Identifier Cross-reference Manager."""
    q = audited_query(exchange.request)
    return [
        query_audit(
            ctx,
            exchange.parties,
            side="manager",
            query_id=q.query_id,
            query=q.query,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-45 asked of another system, as the Patient Identifier Cross-reference Consumer."""
    q = audited_query(exchange.request)
    return [
        query_audit(
            ctx,
            exchange.parties,
            side="consumer",
            query_id=q.query_id,
            query=q.query,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]
