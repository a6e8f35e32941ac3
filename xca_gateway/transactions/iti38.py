"""ITI-38 Cross Gateway Query, both sides, and its audit record.

Initiating side: :func:`request_for_peer` turns a local consumer's query into the one a peer
community gets (its patient id, ``home`` when targeted), :func:`read_peer_answer` folds the
peer's answer in, checking ITI38-019; the fan-out to every peer and the merge are the
Initiating Gateway's (:mod:`xca_gateway.initiating.query`).

Responding side: a peer community queries our registry. Before the stored query runs (ITI TF-2
3.38.4.1.3): ``AdhocQuery/@home``, when given, must be our homeCommunityId
(XDSUnknownCommunity), and the id-based queries, which carry no patient id, must give it
(XDSMissingHomeCommunityId, ITI38-001/-012). FindX without a patient id is a missing parameter
of the stored query itself. Every returned object gets ``home`` set to our homeCommunityId
(3.38.1) and every RegistryError our homeCommunityId as its location. A patient the registry
does not know gets an empty Success or XDSUnknownPatientId, by local policy (ITI38-008).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from lxml import etree

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.protocol.namespaces import QUERY, RIM, Action, ResponseStatus
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.registry import QueryResult, Registry
from xca_gateway.registry.stored_query import (
    ID_BASED_QUERIES,
    StoredQueryError,
    parse_stored_query,
)
from xca_gateway.transactions.iti18 import outcome_of
from xca_gateway.xds.ebrim import ErrorCode
from xca_gateway.xds.ebrs import RegistryError, adhoc_query_response, parse_registry_errors
from xca_gateway.xds.patient_id import PatientId

__all__ = [
    "CommunityAnswer",
    "QueryRequest",
    "audit_called",
    "audit_served",
    "check_cross_gateway_query",
    "iti38_handler",
    "query_audit",
    "read_peer_answer",
    "render_objects",
    "request_for_peer",
]


# ---------------------------------------- initiating side


@dataclass
class QueryRequest:
    """What the fan-out needs to know about an AdhocQueryRequest."""

    element: etree._Element
    query_id: str
    return_type: str
    home: str | None
    patient_parameter: str | None
    patient_id: PatientId | None


def request_for_peer(
    request: QueryRequest, patient: PatientId | None, home: str | None
) -> etree._Element:
    """A copy of the consumer's request with the peer's patient id (and home, if targeted)."""
    element = copy.deepcopy(request.element)
    adhoc = element.find(f"{{{RIM}}}AdhocQuery")
    assert adhoc is not None
    if home is not None:
        adhoc.set("home", home)
    if patient is not None and request.patient_parameter is not None:
        for slot in adhoc.iterfind(f"{{{RIM}}}Slot"):
            if slot.get("name") == request.patient_parameter:
                for value in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value"):
                    value.text = patient.quoted
    return element


@dataclass
class CommunityAnswer:
    home_community_id: str
    name: str
    objects: list[etree._Element] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)
    responded: bool = False
    # The objects as bytes once :func:`render_objects` serialised them (then ``objects`` is
    # empty): a fan-out's answer is their concatenation.
    rendered: list[bytes] = field(default_factory=list)

    @property
    def has_objects(self) -> bool:
        return bool(self.objects or self.rendered)


def render_objects(answer: CommunityAnswer) -> None:
    """Serialise ``answer``'s objects now, as the peer's answer arrives, and drop their trees.

    Done per peer while the others are still answering, this leaves the fan-out's response,
    after the slowest peer, a concatenation of bytes instead of a tree of every peer's
    objects to move and serialise. Each object's RegistryObjectList is detached from the
    reply first, so that an object declares only the namespaces it uses (not the envelope's).
    """
    for obj in answer.objects:
        holder = obj.getparent()
        reply = holder.getparent() if holder is not None else None
        if holder is not None and reply is not None:
            reply.remove(holder)
        answer.rendered.append(etree.tostring(obj, with_tail=False))
    answer.objects = []


def read_peer_answer(answer: CommunityAnswer, payload: etree._Element) -> None:
    """Fold a peer's AdhocQueryResponse into ``answer`` (errors keep or get its location)."""
    if payload.tag != f"{{{QUERY}}}AdhocQueryResponse":
        answer.errors.append(
            RegistryError(
                "XDSUnavailableCommunity",
                f"{answer.name} answered {etree.QName(payload).localname}, not a query response",
                location=answer.home_community_id,
            )
        )
        return
    answer.responded = True
    for error in parse_registry_errors(payload):
        if error.location:
            answer.errors.append(error)
        else:
            answer.errors.append(
                RegistryError(
                    error.error_code, error.code_context, answer.home_community_id, error.severity
                )
            )
    object_list = payload.find(f"{{{RIM}}}RegistryObjectList")
    missing_home = 0
    objects = object_list.iterchildren("{*}*") if object_list is not None else iter(())
    for obj in objects:  # elements only, not comments
        if not obj.get("home"):
            missing_home += 1
            continue
        answer.objects.append(obj)
    if missing_home:
        # ITI38-019: objects from a Responding Gateway must carry its homeCommunityId.
        answer.errors.append(
            RegistryError(
                "XDSMissingHomeCommunityId",
                f"{answer.name} returned {missing_home} object(s) without a home attribute",
                location=answer.home_community_id,
            )
        )


# ---------------------------------------- responding side


def check_cross_gateway_query(
    request: etree._Element, home_community_id: str
) -> RegistryError | None:
    """The homeCommunityId rules of a Cross Gateway Query (pure)."""
    if request.tag != f"{{{QUERY}}}AdhocQueryRequest":
        return None  # the stored query parser reports it
    adhoc = request.find(f"{{{RIM}}}AdhocQuery")
    if adhoc is None:
        return None
    home = (adhoc.get("home") or "").strip()
    if home and home != home_community_id:
        return RegistryError(
            ErrorCode.UNKNOWN_COMMUNITY,
            f"this Responding Gateway is community {home_community_id}, not {home}",
        )
    if not home and (adhoc.get("id") or "").strip() in ID_BASED_QUERIES:
        return RegistryError(
            ErrorCode.MISSING_HOME_COMMUNITY_ID,
            "a Cross Gateway Query without a patient id must give the homeCommunityId "
            "(AdhocQuery/@home)",
        )
    return None


def iti38_handler(
    registry: Registry, *, home_community_id: str, unknown_patient: str = "empty"
) -> Handler:
    if unknown_patient not in ("empty", "error"):
        raise ValueError('unknown_patient must be "empty" or "error"')

    async def handle(request: SoapRequest) -> SoapResponse:
        payload = request.payload
        problem = check_cross_gateway_query(payload, home_community_id)
        if problem is not None:
            result = QueryResult(ResponseStatus.FAILURE, [problem])
        else:
            result = await registry.stored_query(payload)
            if unknown_patient == "error" and result.status == ResponseStatus.SUCCESS:
                result = await _unknown_patient(registry, payload, result)
        for obj in result.objects:
            obj.set("home", home_community_id)
        errors = [replace(e, location=home_community_id) for e in result.errors]
        response = adhoc_query_response(result.status, errors, result.objects)
        return SoapResponse(response, Action.ITI38_RESPONSE, outcome=outcome_of(result.status))

    return handle


async def _unknown_patient(
    registry: Registry, request: etree._Element, result: QueryResult
) -> QueryResult:
    if result.objects:
        return result
    try:
        patient_id = parse_stored_query(request).patient_id
    except StoredQueryError:  # pragma: no cover - the query just ran
        return result
    if patient_id is None or await registry.knows_patient(patient_id) is not False:
        return result
    return QueryResult(
        ResponseStatus.FAILURE,
        [RegistryError(ErrorCode.UNKNOWN_PATIENT_ID, f"patient {patient_id} is not known here")],
    )


# ---------------------------------------- audit record (ITI TF-2b 3.38.5)


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
    encoding: str = "UTF-8",
) -> m.AuditMessage:
    """ITI-38 Cross Gateway Query, audited by the Initiating or the Responding Gateway.

    Both sides audit the same shape (the IG as a Document Consumer, the RG as a Document
    Registry, ITI38-027), with the requester (IG) as Source and the responder (RG) as
    Destination. ``query`` is the whole serialized AdhocQueryRequest, ``query_id`` the stored
    query UUID, ``patient_ids`` the $XDSDocumentEntryPatientId values.
    """
    m.check_side(side, ("initiating", "responding"))
    return m.query_message(
        ctx,
        m.EventTypeCode.ITI38,
        parties,
        query_id=query_id,
        query=query,
        details=m.stored_query_details(home_community_id, encoding),
        patient_ids=patient_ids,
        outcome=outcome,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-38 answered here, as the Responding Gateway."""
    return _audit(ctx, exchange, "responding")


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-38 asked of a peer community, as the Initiating Gateway."""
    return _audit(ctx, exchange, "initiating")


def _audit(
    ctx: m.AuditContext, exchange: Exchange, side: Literal["initiating", "responding"]
) -> list[m.AuditMessage]:
    # The answer's DocumentEntries name the patients of the retrieves that follow.
    exchange.remember_answer()
    q = exchange.stored_query()
    return [
        query_audit(
            ctx,
            exchange.parties,
            side=side,
            query_id=q.query_id,
            query=q.query,
            home_community_id=q.home_community_id or exchange.community,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]
