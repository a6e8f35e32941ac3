"""Which audit record each transaction produces, on both sides (ATNA ITI-20).

The SOAP layer reports every served request (after the response went out, or failed) and the
peer client every outbound call; this module turns each into the DICOM audit messages the IHE
framework requires for that transaction and side, and hands them to the non-blocking
:class:`~xca_gateway.audit.AuditTrail`. Recording never raises into a clinical transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lxml import etree

from xca_gateway import ebrim
from xca_gateway.audit import AuditTrail, extract, soap_requester
from xca_gateway.audit import messages as m
from xca_gateway.namespaces import RIM, RS, Action
from xca_gateway.security.callers import Role, current_caller
from xca_gateway.soap_service import SoapRequest

log = logging.getLogger(__name__)

_HL7 = "urn:hl7-org:v3"


@dataclass(frozen=True)
class OutboundCall:
    """One call of the peer client, as the auditor sees it."""

    url: str
    action: str
    request: etree._Element
    reply: etree._Element | None
    error: str | None = None
    # The verified local caller the gateway made this call for (None: the gateway's own call).
    on_behalf_of: m.HumanRequestor | None = None


def local_caller_requestor() -> m.HumanRequestor | None:
    """The current local caller (a system of this community) as an audit requestor."""
    principal = current_caller()
    if principal is None or principal.has(Role.PEER_GATEWAY):
        return None
    return m.HumanRequestor(user_id=principal.user_id, user_name=principal.name)


def response_status(payload: etree._Element | None) -> str | None:
    """The ebRS status of a query or retrieve response (None if there is none)."""
    if payload is None:
        return None
    status = payload.get("status")
    if status:
        return status
    inner = payload.find(f"{{{RS}}}RegistryResponse")
    return inner.get("status") if inner is not None else None


def _outcome(payload: etree._Element | None, error: str | None) -> m.EventOutcome:
    if error is not None:
        return m.EventOutcome.SERIOUS_FAILURE
    if payload is not None and payload.tag.startswith(f"{{{_HL7}}}"):
        code = payload.find(f"{{{_HL7}}}acknowledgement/{{{_HL7}}}typeCode")
        ok = code is None or code.get("code") in ("AA", "CA")
        return m.EventOutcome.SUCCESS if ok else m.EventOutcome.MINOR_FAILURE
    return m.outcome_for_registry_status(response_status(payload))


def _hl7_query(payload: etree._Element) -> tuple[str | None, bytes, list[str]]:
    """(queryId extension, queryByParameter bytes, patient ids) of an HL7v3 query message."""
    query = payload.find(f".//{{{_HL7}}}queryByParameter")
    if query is None:
        return None, etree.tostring(payload), []
    query_id = query.find(f"{{{_HL7}}}queryId")
    patients = [
        f"{v.get('extension')}^^^&{v.get('root')}&ISO"
        for v in query.iter(f"{{{_HL7}}}value")
        if v.get("root") and v.get("extension")
    ]
    return (
        query_id.get("extension") if query_id is not None else None,
        etree.tostring(query),
        patients,
    )


def _submission(payload: etree._Element) -> tuple[str, str | None]:
    unique_id, patient = "", None
    for package in payload.iter(f"{{{RIM}}}RegistryPackage"):
        for ext in package.iter(f"{{{RIM}}}ExternalIdentifier"):
            scheme = ext.get("identificationScheme")
            if scheme == ebrim.SS_UNIQUE_ID:
                unique_id = ext.get("value", "")
            elif scheme == ebrim.SS_PATIENT_ID:
                patient = ext.get("value")
    return unique_id, patient


class TransactionAuditor:
    def __init__(self, trail: AuditTrail, base_url: Callable[[], str]) -> None:
        self.trail = trail
        self.base_url = base_url

    @property
    def ctx(self) -> m.AuditContext:
        return self.trail.context

    # -------------------------------------------------------------- served (our side)

    def served(
        self,
        request: SoapRequest,
        transaction: str,
        response: etree._Element | None,
        *,
        fault: str | None = None,
        delivered: bool = True,
    ) -> None:
        try:
            error = fault or (None if delivered else "response not delivered")
            self.trail.record(self._served(request, transaction, response, error))
        except Exception:  # an audit failure must not touch the transaction
            log.exception("building the %s audit record failed", transaction)

    def _served(
        self,
        request: SoapRequest,
        transaction: str,
        response: etree._Element | None,
        error: str | None,
    ) -> Sequence[m.AuditMessage]:
        requester = soap_requester(request)
        responder = self.trail.local_node(self.base_url() + request.endpoint.path)
        payload = request.payload
        outcome = _outcome(response, error)
        common: dict[str, Any] = {
            "requester": requester,
            "responder": responder,
            # Why something was withheld (consent) when nothing failed outright.
            "outcome_description": error or request.context.get("audit_outcome_description"),
            **_identity(request),
        }
        if transaction in ("ITI-38", "ITI-18"):
            q = extract.stored_query(payload)
            query: dict[str, Any] = {
                "query_id": q.query_id,
                "query": q.query,
                "home_community_id": q.home_community_id,
                "patient_ids": q.patient_ids,
                "outcome": outcome,
            }
            if transaction == "ITI-38":
                return [m.iti38_query(self.ctx, side="responding", **query, **common)]
            return [m.iti18_query(self.ctx, side="registry", **query, **common)]
        if transaction in ("ITI-39", "ITI-43"):
            returned = extract.returned_documents(response) if response is not None else []
            delivered, failed = extract.split_documents(
                extract.requested_documents(payload), returned
            )
            if error is not None:
                delivered, failed = [], [*delivered, *failed]
            if transaction == "ITI-39":
                return m.iti39_retrieve(
                    self.ctx, side="responding", documents=delivered, failed=failed, **common
                )
            return m.iti43_retrieve(
                self.ctx, side="repository", documents=delivered, failed=failed, **common
            )
        if transaction in ("RAD-75", "RAD-69"):
            returned = extract.returned_documents(response) if response is not None else []
            delivered_i, failed_i = extract.split_instances(
                extract.requested_instances(payload), returned
            )
            if error is not None:
                delivered_i, failed_i = [], [*delivered_i, *failed_i]
            if transaction == "RAD-75":
                return m.rad75_retrieve(
                    self.ctx, side="responding", instances=delivered_i, failed=failed_i, **common
                )
            return m.rad69_retrieve(
                self.ctx,
                side="imaging_document_source",
                instances=delivered_i,
                failed=failed_i,
                **common,
            )
        if transaction in ("ITI-55", "ITI-45"):
            query_id, query_bytes, patients = _hl7_query(payload)
            hl7: dict[str, Any] = {
                "query_id": query_id,
                "query": query_bytes,
                "patient_ids": patients,
            }
            if transaction == "ITI-55":
                return [
                    m.iti55_query(self.ctx, side="responding", outcome=outcome, **hl7, **common)
                ]
            return [m.iti45_query(self.ctx, side="manager", outcome=outcome, **hl7, **common)]
        if transaction == "ITI-42":
            unique_id, patient = _submission(payload)
            return [
                m.iti42_register(
                    self.ctx,
                    side="registry",
                    submission_set_unique_id=unique_id or "unknown",
                    patient_id=patient,
                    outcome=outcome,
                    **common,
                )
            ]
        return []

    # -------------------------------------------------------------- outbound calls

    def called(self, call: OutboundCall) -> None:
        try:
            self.trail.record(self._called(call))
        except Exception:
            log.exception("building the audit record of an outbound %s failed", call.action)

    def _called(self, call: OutboundCall) -> Sequence[m.AuditMessage]:
        requester = self.trail.local_node(self.base_url())
        responder = m.endpoint_node(call.url)
        outcome = _outcome(call.reply, call.error)
        common: dict[str, Any] = {
            "requester": requester,
            "responder": responder,
            "outcome_description": call.error,
        }
        if call.on_behalf_of is not None:
            # The local system the gateway acts for is a requestor of the outbound call too.
            common["human_requestors"] = [call.on_behalf_of]
        action = call.action
        if action in (Action.ITI38, Action.ITI18):
            q = extract.stored_query(call.request)
            query: dict[str, Any] = {
                "query_id": q.query_id,
                "query": q.query,
                "home_community_id": q.home_community_id,
                "patient_ids": q.patient_ids,
                "outcome": outcome,
            }
            if action == Action.ITI38:
                return [m.iti38_query(self.ctx, side="initiating", **query, **common)]
            return [m.iti18_query(self.ctx, side="consumer", **query, **common)]
        if action in (Action.ITI39, Action.ITI43):
            returned = extract.returned_documents(call.reply) if call.reply is not None else []
            delivered, failed = extract.split_documents(
                extract.requested_documents(call.request), returned
            )
            if action == Action.ITI39:
                return m.iti39_retrieve(
                    self.ctx, side="initiating", documents=delivered, failed=failed, **common
                )
            return m.iti43_retrieve(
                self.ctx, side="consumer", documents=delivered, failed=failed, **common
            )
        if action in (Action.RAD75, Action.RAD69):
            returned = extract.returned_documents(call.reply) if call.reply is not None else []
            delivered_i, failed_i = extract.split_instances(
                extract.requested_instances(call.request), returned
            )
            if action == Action.RAD75:
                return m.rad75_retrieve(
                    self.ctx, side="initiating", instances=delivered_i, failed=failed_i, **common
                )
            return m.rad69_retrieve(
                self.ctx, side="consumer", instances=delivered_i, failed=failed_i, **common
            )
        if action.endswith("PRPA_IN201305UV02:CrossGatewayPatientDiscovery"):
            query_id, query_bytes, patients = _hl7_query(call.request)
            return [
                m.iti55_query(
                    self.ctx,
                    side="initiating",
                    query_id=query_id,
                    query=query_bytes,
                    patient_ids=patients,
                    outcome=outcome,
                    **common,
                )
            ]
        if action == "urn:hl7-org:v3:PRPA_IN201309UV02":
            query_id, query_bytes, patients = _hl7_query(call.request)
            return [
                m.iti45_query(
                    self.ctx,
                    side="consumer",
                    query_id=query_id,
                    query=query_bytes,
                    patient_ids=patients,
                    outcome=outcome,
                    **common,
                )
            ]
        return []


def _identity(request: SoapRequest) -> dict[str, Any]:
    """The human requestor (alias<user@issuer>) and purposes of use of a validated XUA
    assertion, when the authorization gate established one for this request."""
    from xca_gateway.policy import current_authorization
    from xca_gateway.xua import audit_purposes_of_use, audit_requestor

    auth = current_authorization()
    if auth is None or auth.assertion is None:
        return {}
    return {
        "human_requestors": [audit_requestor(auth.assertion)],
        "purposes_of_use": audit_purposes_of_use(auth.assertion),
    }
