"""RAD-75 Cross Gateway Retrieve Imaging Document Set, both sides, and its audit records.

Initiating Imaging Gateway: :func:`peer_route` is the RAD-75 to one peer community's Responding
Imaging Gateway, streamed (:mod:`xca_gateway.imaging.remote`); which instances go to which
community is decided by :mod:`xca_gateway.initiating.imaging`.

Responding Imaging Gateway: a peer community's Initiating Imaging Gateway asks for SOP
instances; each DocumentRequest is routed by RepositoryUniqueId to the configured Imaging
Document Source of this community (RAD-69 to an XDS-I.b source, C-GET/C-MOVE to a PACS, WADO-RS
to a VNA, or local files), and the instances are streamed back as one MTOM response
(RAD75-002/-003). Every RegistryError carries this community's homeCommunityId as location
(RAD75-004, as ITI39-012), every DocumentResponse its HomeCommunityId (RAD75-005).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.imaging.remote import open_remote_retrieve
from xca_gateway.imaging.request import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
)
from xca_gateway.imaging.retrieve import (
    DEFAULT_ABANDON_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_OPEN_TIMEOUT,
    Route,
    respond,
)
from xca_gateway.imaging.routing import local_routes, parse_or_fault
from xca_gateway.imaging.sources import (
    ImagingSource,
    Retrieval,
    rejected_errors,
)
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.xds.ebrs import RegistryError

__all__ = ["audit_called", "audit_served", "peer_route", "rad75_handler", "retrieve_audit"]


# ---------------------------------------- initiating side


def peer_route(
    peer_client: PeerClient, home_community_id: str, url: str, *, timeout: float | None = None
) -> Route:
    """RAD-75 to the Responding Imaging Gateway of ``home_community_id``."""
    what = f"community {home_community_id}"

    async def open_(request: RetrieveImagingDocumentSetRequest) -> Retrieval:
        return await open_remote_retrieve(
            peer_client, url, request, action=Action.RAD75, what=what, timeout=timeout
        )

    def unavailable(reason: str, count: int) -> RegistryError:
        return RegistryError(
            "XDSUnavailableCommunity",
            f"community {home_community_id} did not answer the retrieve: {reason} "
            f"({count} instance(s) not retrieved)",
            location=home_community_id,
        )

    return Route(what, open_, unavailable, home_community_id)


# ---------------------------------------- responding side


def rad75_handler(
    sources: Mapping[str, ImagingSource],
    *,
    home_community_id: str,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    abandon_timeout: float = DEFAULT_ABANDON_TIMEOUT,
    max_documents: int = 100_000,
) -> Handler:
    async def handle(request: SoapRequest) -> SoapResponse:
        parsed = parse_or_fault(request, max_documents)
        # Bad identifiers are reported per DocumentRequest; only schema breakage faults.
        errors = rejected_errors(parsed, home_community_id)
        ours: list[DocumentRequest] = []
        for doc in parsed.documents:
            # RAD-75 is addressed to this community; an absent HomeCommunityId is taken as ours.
            if doc.home_community_id and doc.home_community_id != home_community_id:
                errors.append(
                    RegistryError(
                        "XDSUnknownCommunity",
                        f"HomeCommunityId {doc.home_community_id} of SOP instance "
                        f"{doc.document_unique_id} is not this community ({home_community_id})",
                    )
                )
            else:
                ours.append(doc)
        routes, routing_errors = local_routes(ours, sources, home_community_id)
        return await respond(
            parsed,
            routes,
            errors + routing_errors,
            response_action=Action.RAD75_RESPONSE,
            error_location=home_community_id,
            open_timeout=open_timeout,
            idle_timeout=idle_timeout,
            abandon_timeout=abandon_timeout,
            context=request.context,
        )

    return handle


# ---------------------------------------- audit records (RAD TF-3 4.75.4.1.4)


def retrieve_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["initiating", "responding"],
    instances: Sequence[m.ImagingInstanceReference],
    failed: Sequence[m.ImagingInstanceReference] = (),
    failure_outcome: m.EventOutcome = m.EventOutcome.SERIOUS_FAILURE,
    patient_id: str | None = None,
    patients: Mapping[str, m.PatientRef] | None = None,
) -> tuple[m.AuditMessage, ...]:
    """RAD-75 Cross Gateway Retrieve Imaging Document Set: "DICOM Instances Transferred" by
    both gateways (PS3.15 A.5.3.4), R by the Responding Imaging Gateway, C by the Initiating
    one, so that the two records of one transfer pair up."""
    m.check_side(side, ("initiating", "responding"))
    return m.imaging_retrieve_messages(
        ctx,
        m.EventTypeCode.RAD75,
        parties,
        serving=side == "responding",
        home_community_detail=m.DETAIL_XCA_HOME_COMMUNITY_ID,
        instances=instances,
        failed=failed,
        failure_outcome=failure_outcome,
        patient_id=patient_id,
        patients=patients,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """RAD-75 answered here, as the Responding Imaging Gateway: one record per outcome and
    patient."""
    delivered, failed, patients = exchange.instances()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="responding",
        instances=delivered,
        failed=failed,
        patients=patients,
    )


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """RAD-75 asked of another system, as the Initiating Imaging Gateway."""
    delivered, failed, patients = exchange.instances()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="initiating",
        instances=delivered,
        failed=failed,
        patients=patients,
    )
