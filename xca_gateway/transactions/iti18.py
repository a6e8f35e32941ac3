"""ITI-18 Registry Stored Query, answered by this community's registry.

The same :class:`~xca_gateway.registry.Registry` serves local Document Consumers here and peer
communities through ITI-38, so both see one implementation of the 14 stored queries. Objects
get ``home`` (our homeCommunityId) unless the registry already set one, so that a consumer can
route follow-up queries and retrieves through an Initiating Gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.registry import Registry
from xca_gateway.xds.ebrs import adhoc_query_response

__all__ = [
    "audit_called",
    "audit_served",
    "outcome_of",
    "query_audit",
    "registry_stored_query_handler",
]


def outcome_of(status: str) -> str:
    if status == ResponseStatus.SUCCESS:
        return "success"
    if status == ResponseStatus.PARTIAL_SUCCESS:
        return "partial"
    return "failure"


def registry_stored_query_handler(registry: Registry, *, home_community_id: str) -> Handler:
    async def handle(request: SoapRequest) -> SoapResponse:
        result = await registry.stored_query(request.payload)
        for obj in result.objects:
            if not obj.get("home"):
                obj.set("home", home_community_id)
        payload = adhoc_query_response(result.status, result.errors, result.objects)
        return SoapResponse(payload, Action.ITI18_RESPONSE, outcome=outcome_of(result.status))

    return handle


# ---------------------------------------- audit record (ITI TF-2a 3.18.5)


def query_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["consumer", "registry"],
    query_id: str | None,
    query: bytes,
    home_community_id: str | None = None,
    patient_ids: Sequence[str] = (),
    outcome: m.EventOutcome = m.EventOutcome.SUCCESS,
    encoding: str = "UTF-8",
) -> m.AuditMessage:
    """ITI-18 Registry Stored Query: the Initiating Gateway audits it as the registry its local
    consumers call; a Responding Gateway audits its call to the local registry as a consumer."""
    m.check_side(side, ("consumer", "registry"))
    return m.query_message(
        ctx,
        m.EventTypeCode.ITI18,
        parties,
        query_id=query_id,
        query=query,
        details=m.stored_query_details(home_community_id, encoding),
        patient_ids=patient_ids,
        outcome=outcome,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-18 answered here as the Document Registry (the registry endpoint, or the Initiating
    Gateway answering its local consumers); the community asked is this one."""
    exchange.remember_answer()
    q = exchange.stored_query()
    return [
        query_audit(
            ctx,
            exchange.parties,
            side="registry",
            query_id=q.query_id,
            query=q.query,
            home_community_id=q.home_community_id or exchange.community,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> list[m.AuditMessage]:
    """ITI-18 asked of a registry of this community, as its Document Consumer."""
    exchange.remember_answer()
    q = exchange.stored_query()
    return [
        query_audit(
            ctx,
            exchange.parties,
            side="consumer",
            query_id=q.query_id,
            query=q.query,
            home_community_id=q.home_community_id,
            patient_ids=q.patient_ids,
            outcome=exchange.outcome,
        )
    ]
