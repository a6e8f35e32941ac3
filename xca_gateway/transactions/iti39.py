"""ITI-39 Cross Gateway Retrieve, both sides, and its audit records.

Initiating side: :func:`cross_gateway_retrieve` asks one peer community's Responding Gateway
for documents and gets them ready to re-stream; which documents go to which community is the
Initiating Gateway's decision (:mod:`xca_gateway.initiating.retrieve`).

Responding side: a peer community's initiating gateway asks for documents of our community. Every
DocumentRequest must carry our homeCommunityId (ITI39-001/-005: missing is
XDSMissingHomeCommunityId, another one XDSUnknownCommunity); the documents come from the
embedded repository or, by repositoryUniqueId, from a remote XDS repository of our community
via ITI-43 (ITI39-009). Each DocumentResponse carries our homeCommunityId, and every
RegistryError our homeCommunityId as location, relayed ones included (ITI39-012).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.repository import DocumentRepository
from xca_gateway.transactions.iti43 import (
    XDS_MISSING_HOME_COMMUNITY_ID,
    XDS_UNKNOWN_COMMUNITY,
    DocumentRequest,
    PeerCaller,
    RemoteRepositories,
    RetrieveResult,
    parse_retrieve_document_set_request,
    retrieve_documents,
    retrieve_from,
    retrieve_response,
    same_community,
)
from xca_gateway.xds.ebrs import RegistryError

__all__ = [
    "audit_called",
    "audit_served",
    "check_home_community",
    "cross_gateway_retrieve",
    "iti39_handler",
    "retrieve_audit",
]


# ---------------------------------------- initiating side


async def cross_gateway_retrieve(
    peer_client: PeerCaller,
    url: str,
    documents: Sequence[DocumentRequest],
    *,
    peer_name: str,
    home_community_id: str,
    deadline: float | None,
) -> RetrieveResult:
    """ITI-39 to the Responding Gateway of community ``home_community_id`` at ``url``. A peer
    that does not answer gives XDSUnavailableCommunity for its documents; the errors it
    returns keep their own location."""
    found, errors = await retrieve_from(
        peer_client,
        url,
        documents,
        source=f"community {peer_name}",
        peer_label=peer_name,
        location=home_community_id,
        override_location=False,
        deadline=deadline,
        action=Action.ITI39,
        transaction="ITI-39",
        unavailable_code="XDSUnavailableCommunity",
        home_community_id=home_community_id,
    )
    return RetrieveResult(documents=list(found.values()), errors=errors)


# ---------------------------------------- responding side


def check_home_community(
    requests: tuple[DocumentRequest, ...], home_community_id: str
) -> tuple[list[DocumentRequest], list[RegistryError]]:
    """Split DocumentRequests into ours and RegistryErrors for the rest (sans-IO)."""
    accepted: list[DocumentRequest] = []
    errors: list[RegistryError] = []
    for request in requests:
        uid = request.document_unique_id or "(no DocumentUniqueId)"
        if request.home_community_id is None:
            errors.append(
                RegistryError(
                    XDS_MISSING_HOME_COMMUNITY_ID,
                    f"DocumentRequest for document {uid} has no HomeCommunityId",
                    home_community_id,
                )
            )
        elif not same_community(request.home_community_id, home_community_id):
            errors.append(
                RegistryError(
                    XDS_UNKNOWN_COMMUNITY,
                    f"document {uid}: homeCommunityId {request.home_community_id} is not "
                    f"this community ({home_community_id})",
                    home_community_id,
                )
            )
        else:
            accepted.append(request)
    return accepted, errors


def iti39_handler(
    repositories: Mapping[str, DocumentRepository],
    *,
    home_community_id: str,
    remote: RemoteRepositories | None = None,
) -> Handler:
    async def handle(request: SoapRequest) -> SoapResponse:
        parsed = parse_retrieve_document_set_request(request.payload)
        accepted, errors = check_home_community(parsed.documents, home_community_id)
        result = await retrieve_documents(
            accepted,
            repositories,
            remote,
            location=home_community_id,
            override_remote_location=True,
        )
        result.errors[:0] = errors
        return retrieve_response(
            result, action=Action.ITI39_RESPONSE, home_community_id=home_community_id
        )

    return handle


# ---------------------------------------- audit records (ITI TF-2b 3.39.5)


def retrieve_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["initiating", "responding"],
    documents: Sequence[m.DocumentReference],
    failed: Sequence[m.DocumentReference] = (),
    failure_outcome: m.EventOutcome = m.EventOutcome.SERIOUS_FAILURE,
    patient_id: str | None = None,
    patients: Mapping[str, m.PatientRef] | None = None,
) -> tuple[m.AuditMessage, ...]:
    """ITI-39 Cross Gateway Retrieve: Import (C) on the Initiating Gateway, Export (R) on the
    Responding Gateway. ``documents`` were delivered, ``failed`` were asked for and not."""
    m.check_side(side, ("initiating", "responding"))
    return m.document_retrieve_messages(
        ctx,
        m.EventTypeCode.ITI39,
        parties,
        exporting=side == "responding",
        documents=documents,
        failed=failed,
        failure_outcome=failure_outcome,
        patient_id=patient_id,
        patients=patients,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """ITI-39 answered here, as the Responding Gateway: one record per outcome and patient."""
    delivered, failed, patients = exchange.documents()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="responding",
        documents=delivered,
        failed=failed,
        patients=patients,
    )


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """ITI-39 asked of another system, as the Initiating Gateway."""
    delivered, failed, patients = exchange.documents()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="initiating",
        documents=delivered,
        failed=failed,
        patients=patients,
    )
