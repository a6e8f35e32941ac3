"""ITI-42 Register Document Set-b: a Document Repository registers metadata with us.

The request is an ``lcm:SubmitObjectsRequest``, the answer an ``rs:RegistryResponse`` with
status Success, or Failure and the RegistryErrors (XDSRegistryMetadataError,
XDSPatientIdDoesNotMatch, XDSDuplicateUniqueIdInRegistry, ...). Registration is all or
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from lxml import etree

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.protocol.namespaces import RIM, RS, ErrorSeverity
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.registry import Registry, RegistryAction
from xca_gateway.transactions.iti18 import outcome_of
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError, status_for

__all__ = [
    "ITI42_ACTION",
    "ITI42_RESPONSE_ACTION",
    "audit_served",
    "iti42_handler",
    "register_audit",
    "registry_response",
    "submission",
]

ITI42_ACTION = RegistryAction.ITI42
ITI42_RESPONSE_ACTION = RegistryAction.ITI42_RESPONSE


def registry_response(status: str, errors: Iterable[RegistryError] = ()) -> etree._Element:
    root = etree.Element(f"{{{RS}}}RegistryResponse", nsmap={"rs": RS})
    root.set("status", status)
    errors = list(errors)
    if errors:
        error_list = etree.SubElement(root, f"{{{RS}}}RegistryErrorList")
        worst = ErrorSeverity.ERROR if any(e.is_error for e in errors) else ErrorSeverity.WARNING
        error_list.set("highestSeverity", worst)
        for error in errors:
            el = etree.SubElement(error_list, f"{{{RS}}}RegistryError")
            el.set("errorCode", error.error_code)
            el.set("codeContext", error.code_context)
            el.set("severity", error.severity)
            if error.location:
                el.set("location", error.location)
    return root


def iti42_handler(registry: Registry) -> Handler:
    async def handle(request: SoapRequest) -> SoapResponse:
        errors = await registry.submit(request.payload)
        status = status_for(errors, results=0)
        return SoapResponse(
            registry_response(status, errors), ITI42_RESPONSE_ACTION, outcome=outcome_of(status)
        )

    return handle


# ---------------------------------------- audit record (ITI TF-2b 3.42.5)


def submission(payload: etree._Element) -> tuple[str, str | None]:
    """(submission set uniqueId, its patient id) of a SubmitObjectsRequest."""
    unique_id, patient = "", None
    for package in payload.iter(f"{{{RIM}}}RegistryPackage"):
        for ext in package.iter(f"{{{RIM}}}ExternalIdentifier"):
            scheme = ext.get("identificationScheme")
            if scheme == ebrim.SS_UNIQUE_ID:
                unique_id = ext.get("value", "")
            elif scheme == ebrim.SS_PATIENT_ID:
                patient = ext.get("value")
    return unique_id, patient


def register_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["repository", "registry"],
    submission_set_unique_id: str,
    patient_id: str | None,
    outcome: m.EventOutcome = m.EventOutcome.SUCCESS,
) -> m.AuditMessage:
    """ITI-42 Register Document Set-b: Export (R) by the repository, Import (C) by the
    registry; one Submission Set participant (role Job) and the patient."""
    m.check_side(side, ("repository", "registry"))
    exporting = side == "repository"
    objects = [m.patient_object(patient_id)] if patient_id else []
    objects.append(
        m.ParticipantObject(
            object_id=submission_set_unique_id,
            id_type_code=m.ParticipantObjectIdType.XDS_SUBMISSION_SET,
            type_code=m.ObjectType.SYSTEM_OBJECT,
            type_code_role=m.ObjectRole.JOB,
        )
    )
    return m.audit_message(
        ctx,
        event_id=m.EventId.EXPORT if exporting else m.EventId.IMPORT,
        action="R" if exporting else "C",
        type_code=m.EventTypeCode.ITI42,
        outcome=outcome,
        when=parties.when,
        outcome_description=parties.outcome_description,
        purposes_of_use=parties.purposes_of_use,
        participants=m.active_participants(
            parties.requester, parties.responder, parties.requester, parties.human_requestors
        ),
        objects=objects,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-42 registered here, as the Document Registry."""
    unique_id, patient = submission(exchange.request)
    return [
        register_audit(
            ctx,
            exchange.parties,
            side="registry",
            submission_set_unique_id=unique_id or "unknown",
            patient_id=patient,
            outcome=exchange.outcome,
        )
    ]


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-42 sent to a remote Document Registry: this gateway's repository exports the
    submission set (Export, EventActionCode R)."""
    unique_id, patient = submission(exchange.request)
    return [
        register_audit(
            ctx,
            exchange.parties,
            side="repository",
            submission_set_unique_id=unique_id or "unknown",
            patient_id=patient,
            outcome=exchange.outcome,
        )
    ]
