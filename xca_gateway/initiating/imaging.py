"""The Initiating Imaging Gateway: a RAD-69 from a local consumer is routed as RAD-75 (or to a
local source)."""

from __future__ import annotations

from collections.abc import Mapping

from xca_gateway.imaging.request import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    check_retrieve_imaging_request,
)
from xca_gateway.imaging.retrieve import (
    DEFAULT_ABANDON_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    ImagingRetrieval,
    Route,
    open_retrieval,
    soap_response,
)
from xca_gateway.imaging.routing import local_routes, parse_or_fault
from xca_gateway.imaging.sources import ImagingSource, rejected_errors
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.transactions.rad75 import peer_route
from xca_gateway.xds.ebrs import RegistryError


class InitiatingImagingGateway:
    """The Initiating Imaging Gateway: RAD-69 routed to local sources and peer communities.

    :meth:`retrieve` is the in-process entry point (front doors, import of priors);
    :meth:`handle` serves ``/ig/rad69`` through it, so both take the same path. ``peers`` maps a
    peer's homeCommunityId to its RAD-75 endpoint URL.
    """

    def __init__(
        self,
        sources: Mapping[str, ImagingSource],
        *,
        home_community_id: str,
        peers: Mapping[str, str],
        peer_client: PeerClient,
        open_timeout: float | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        abandon_timeout: float = DEFAULT_ABANDON_TIMEOUT,
        max_documents: int = 100_000,
    ) -> None:
        self.sources = sources
        self.home_community_id = home_community_id
        self.peers = dict(peers)
        self.peer_client = peer_client
        self.open_timeout = open_timeout or peer_client.outbound.request_timeout
        self.idle_timeout = idle_timeout
        self.abandon_timeout = abandon_timeout
        self.max_documents = max_documents

    def route(
        self, request: RetrieveImagingDocumentSetRequest
    ) -> tuple[list[tuple[Route, list[DocumentRequest]]], list[RegistryError]]:
        """Split the request by HomeCommunityId (then RepositoryUniqueId for our own). Rejected
        DocumentRequests are answered here, never forwarded to a source or peer."""
        errors = rejected_errors(request, self.home_community_id)
        local: list[DocumentRequest] = []
        remote: dict[str, list[DocumentRequest]] = {}
        unknown: dict[str, int] = {}
        for doc in request.documents:
            community = doc.home_community_id
            if community is None or community == self.home_community_id:
                local.append(doc)
            elif community in self.peers:
                remote.setdefault(community, []).append(doc)
            else:
                unknown[community] = unknown.get(community, 0) + 1
        for community, count in unknown.items():
            errors.append(
                RegistryError(
                    "XDSUnknownCommunity",
                    f"no Responding Imaging Gateway known for HomeCommunityId {community} "
                    f"({count} instance(s) not retrieved)",
                    location=community,
                )
            )
        routes, routing_errors = local_routes(local, self.sources, self.home_community_id)
        for community, docs in remote.items():
            url = self.peers[community]
            routes.append(
                (peer_route(self.peer_client, community, url, timeout=self.open_timeout), docs)
            )
        return routes, errors + routing_errors

    async def retrieve(self, request: RetrieveImagingDocumentSetRequest) -> ImagingRetrieval:
        """RAD-69 in-process; InvalidImagingRequest for a request the SOAP endpoint would fault
        (no document, more than ``max_documents``, no transfer syntax). A DocumentRequest
        whose identifiers cannot name an instance gets a RegistryError, as on the endpoint."""
        screened = check_retrieve_imaging_request(request, max_documents=self.max_documents)
        return await self._open(screened)

    async def _open(self, request: RetrieveImagingDocumentSetRequest) -> ImagingRetrieval:
        routes, errors = self.route(request)
        return await open_retrieval(
            request,
            routes,
            errors,
            open_timeout=self.open_timeout,
            idle_timeout=self.idle_timeout,
            abandon_timeout=self.abandon_timeout,
        )

    async def handle(self, request: SoapRequest) -> SoapResponse:
        parsed = parse_or_fault(request, self.max_documents)
        retrieval = await self._open(parsed)
        # The audit names the patients the instances' headers name as they stream.
        return soap_response(
            retrieval, response_action=Action.RAD69_RESPONSE, context=request.context
        )


def rad69_handler(
    sources: Mapping[str, ImagingSource],
    *,
    home_community_id: str,
    peers: Mapping[str, str],
    peer_client: PeerClient,
    open_timeout: float | None = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    abandon_timeout: float = DEFAULT_ABANDON_TIMEOUT,
    max_documents: int = 100_000,
) -> Handler:
    """The ``/ig/rad69`` handler of an :class:`InitiatingImagingGateway`."""
    return InitiatingImagingGateway(
        sources,
        home_community_id=home_community_id,
        peers=peers,
        peer_client=peer_client,
        open_timeout=open_timeout,
        idle_timeout=idle_timeout,
        abandon_timeout=abandon_timeout,
        max_documents=max_documents,
    ).handle
