"""The Initiating Gateway role, retrieve side: an ITI-43 from a local consumer is routed as
ITI-39."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from lxml import etree

from xca_gateway.initiating.query import InitiatingGateway
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.settings import PeerConfig
from xca_gateway.transactions.iti39 import cross_gateway_retrieve
from xca_gateway.transactions.iti43 import (
    DocumentRequest,
    RetrievedDocument,
    RetrieveResult,
    parse_retrieve_document_set_request,
    retrieve_response,
    same_community,
)
from xca_gateway.xds.ebrs import RegistryError

LocalRetrieve = Callable[[Sequence[DocumentRequest]], Awaitable[RetrieveResult]]


class InitiatingRetrieve:
    """An ITI-43 from a local consumer, split by homeCommunityId into one ITI-39 per community.

    Peers are asked in parallel; their documents (spooled to disk by the client above a
    threshold, so memory stays bounded) are re-streamed in the order the consumer asked.
    """

    def __init__(
        self,
        gateway: InitiatingGateway,
        *,
        local_retrieve: LocalRetrieve | None = None,
        local_repositories: frozenset[str] = frozenset(),
    ) -> None:
        self.gateway = gateway
        self.local_retrieve = local_retrieve
        self.local_repositories = local_repositories
        self.peers = {h: p for h, p in gateway.all_peers.items() if p.iti39 is not None}

    async def retrieve(self, payload: etree._Element) -> RetrieveResult:
        home_id = self.gateway.home_community_id
        parsed = parse_retrieve_document_set_request(payload)
        errors: list[RegistryError] = []
        local: list[DocumentRequest] = []
        by_peer: dict[str, list[DocumentRequest]] = {}
        for doc in parsed.documents:
            home = doc.home_community_id
            if not doc.document_unique_id or not doc.repository_unique_id:
                # Answered here, never forwarded: no community can serve it.
                missing = "DocumentUniqueId" if not doc.document_unique_id else "RepositoryUniqueId"
                errors.append(
                    RegistryError(
                        "XDSDocumentUniqueIdError"
                        if not doc.document_unique_id
                        else "XDSUnknownRepositoryId",
                        f"DocumentRequest for document {doc.document_unique_id!r} without "
                        f"{missing}",
                        location=home_id,
                    )
                )
            elif home is None and doc.repository_unique_id not in self.local_repositories:
                errors.append(
                    RegistryError(
                        "XDSMissingHomeCommunityId",
                        f"document {doc.document_unique_id}: HomeCommunityId is required",
                        location=home_id,
                    )
                )
            elif home is None or same_community(home, home_id):
                local.append(doc)
            elif home in self.peers:
                by_peer.setdefault(home, []).append(doc)
            else:
                errors.append(
                    RegistryError(
                        "XDSUnknownCommunity",
                        f"document {doc.document_unique_id}: no route to community {home}",
                        location=home,
                    )
                )
        jobs: list[Awaitable[RetrieveResult]] = []
        if local:
            jobs.append(self._local(local))
        jobs.extend(self._peer(self.peers[home], docs) for home, docs in by_peer.items())
        results = await asyncio.gather(*jobs)
        merged = RetrieveResult(errors=errors)
        found: dict[tuple[str, str], RetrievedDocument] = {}
        for result in results:
            merged.errors.extend(result.errors)
            for document in result.documents:
                found[(document.repository_unique_id, document.document_unique_id)] = document
        for doc in parsed.documents:
            if doc.key in found:
                merged.documents.append(found.pop(doc.key))
        for leftover in found.values():  # pragma: no cover - defensive: never asked for
            leftover.close()
        return merged

    async def _local(self, docs: Sequence[DocumentRequest]) -> RetrieveResult:
        home_id = self.gateway.home_community_id
        if self.local_retrieve is None:
            return RetrieveResult(
                errors=[
                    RegistryError(
                        "XDSUnknownRepositoryId",
                        f"document {d.document_unique_id}: no repository in this community",
                        location=home_id,
                    )
                    for d in docs
                ]
            )
        result = await self.local_retrieve(docs)
        for document in result.documents:
            document.home_community_id = home_id
        return result

    async def _peer(self, peer: PeerConfig, docs: Sequence[DocumentRequest]) -> RetrieveResult:
        health = self.gateway.health.get(peer.home_community_id)
        if health is not None and health.is_open():
            return RetrieveResult(
                errors=[
                    RegistryError(
                        "XDSUnavailableCommunity",
                        f"document {d.document_unique_id}: community {peer.name} is marked down",
                        location=peer.home_community_id,
                    )
                    for d in docs
                ]
            )
        assert peer.iti39 is not None
        return await cross_gateway_retrieve(
            self.gateway.peer_client,
            peer.iti39,
            docs,
            peer_name=peer.name,
            home_community_id=peer.home_community_id,
            deadline=self.gateway.config.peer_deadline,
        )


def initiating_retrieve_handler(retriever: InitiatingRetrieve) -> Handler:
    """ITI-43 at the initiating endpoint: routed by HomeCommunityId, answered as one MTOM."""

    async def handle(request: SoapRequest) -> SoapResponse:
        result = await retriever.retrieve(request.payload)
        return retrieve_response(result, action=Action.ITI43_RESPONSE, home_community_id=None)

    return handle
