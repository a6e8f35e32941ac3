"""RAD-69 Retrieve Imaging Document Set: Initiating Imaging Gateway and Imaging Document Source.

Initiating Imaging Gateway (:class:`~xca_gateway.initiating.imaging.InitiatingImagingGateway`,
endpoint ``/ig/rad69``, and in-process through its ``retrieve``): a local Imaging Document
Consumer (or a front door of this gateway) asks for SOP instances anywhere in the federation.
DocumentRequests are split by HomeCommunityId (RAD TF-3 4.69.4.1.3, Initiating Imaging Gateway):

* own community, or none given (RAD69-002: only needed for other communities): by
  RepositoryUniqueId to the configured local Imaging Document Sources;
* a known peer: one RAD-75 per community, Study/Series nesting and the TransferSyntaxUIDList
  kept (RAD75-001), to that community's Responding Imaging Gateway;
* anything else: ``XDSUnknownCommunity``; a peer that cannot be reached or answers garbage:
  ``XDSUnavailableCommunity`` (location = that community).

All answers are merged into one streamed MTOM response; the errors relayed from peers keep their
location. :func:`imaging_document_source_handler` is the plain Imaging Document Source (no
routing to other communities), e.g. for a community whose gateway also fronts its PACS. The
consumer side, a RAD-69 to an XDS-I.b source of this community, is an imaging source
(:mod:`xca_gateway.imaging.rad69_source`). The audit records of both sides are built here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from xca_gateway.audit import messages as m
from xca_gateway.audit.exchange import Exchange
from xca_gateway.imaging.request import (
    DocumentRequest,
)
from xca_gateway.imaging.retrieve import (
    DEFAULT_ABANDON_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    respond,
)
from xca_gateway.imaging.routing import local_routes, parse_or_fault
from xca_gateway.imaging.sources import ImagingSource, rejected_errors
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.xds.ebrs import RegistryError

__all__ = ["audit_called", "audit_served", "imaging_document_source_handler", "retrieve_audit"]


def imaging_document_source_handler(
    sources: Mapping[str, ImagingSource],
    *,
    home_community_id: str | None = None,
    open_timeout: float = 30.0,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    abandon_timeout: float = DEFAULT_ABANDON_TIMEOUT,
    max_documents: int = 100_000,
) -> Handler:
    """RAD-69 served straight from the configured sources, without community routing."""

    async def handle(request: SoapRequest) -> SoapResponse:
        parsed = parse_or_fault(request, max_documents)
        errors = rejected_errors(parsed, home_community_id)
        ours: list[DocumentRequest] = []
        for doc in parsed.documents:
            community = doc.home_community_id
            if community and home_community_id and community != home_community_id:
                errors.append(
                    RegistryError(
                        "XDSUnknownCommunity",
                        f"SOP instance {doc.document_unique_id} is requested from community "
                        f"{community}; this Imaging Document Source is in {home_community_id}",
                        location=doc.document_unique_id,
                    )
                )
            else:
                ours.append(doc)
        routes, routing_errors = local_routes(ours, sources, home_community_id)
        return await respond(
            parsed,
            routes,
            errors + routing_errors,
            response_action=Action.RAD69_RESPONSE,
            open_timeout=open_timeout,
            idle_timeout=idle_timeout,
            abandon_timeout=abandon_timeout,
            context=request.context,
        )

    return handle


# ---------------------------------------- audit records (RAD TF-3 4.69.4.1.4)


def retrieve_audit(
    ctx: m.AuditContext,
    parties: m.Parties,
    *,
    side: Literal["consumer", "imaging_document_source"],
    instances: Sequence[m.ImagingInstanceReference],
    failed: Sequence[m.ImagingInstanceReference] = (),
    failure_outcome: m.EventOutcome = m.EventOutcome.SERIOUS_FAILURE,
    patient_id: str | None = None,
    patients: Mapping[str, m.PatientRef] | None = None,
) -> tuple[m.AuditMessage, ...]:
    """RAD-69 Retrieve Imaging Document Set: "DICOM Instances Transferred" by both ends, R by
    the Imaging Document Source (the Initiating Imaging Gateway to its consumers), C by the
    consumer (a Responding Imaging Gateway calling its local source)."""
    m.check_side(side, ("consumer", "imaging_document_source"))
    return m.imaging_retrieve_messages(
        ctx,
        m.EventTypeCode.RAD69,
        parties,
        serving=side == "imaging_document_source",
        home_community_detail=m.DETAIL_HOME_COMMUNITY_ID,
        instances=instances,
        failed=failed,
        failure_outcome=failure_outcome,
        patient_id=patient_id,
        patients=patients,
    )


def audit_served(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """RAD-69 answered here, as the Imaging Document Source (the Initiating Imaging Gateway to
    its local consumers too): one record per outcome and patient."""
    delivered, failed, patients = exchange.instances()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="imaging_document_source",
        instances=delivered,
        failed=failed,
        patients=patients,
    )


def audit_called(ctx: m.AuditContext, exchange: Exchange) -> Sequence[m.AuditMessage]:
    """RAD-69 asked of another system, as the Imaging Document Consumer (a Responding Imaging
    Gateway calling its local source)."""
    delivered, failed, patients = exchange.instances()
    return retrieve_audit(
        ctx,
        exchange.parties,
        side="consumer",
        instances=delivered,
        failed=failed,
        patients=patients,
    )
