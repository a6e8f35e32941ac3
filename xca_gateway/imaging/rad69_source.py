"""Imaging Document Source reached with RAD-69 over SOAP/MTOM (an XDS-I.b source, mTLS).

The gateway acts as Imaging Document Consumer toward the source, through the gateway's shared
outbound client (its certificate, pool and limits). The reply is relayed, not stored: its root
part is read to learn which instances come and which errors the source reported, and its MIME
parts are passed on as the gateway's own response is written (see :mod:`.remote`).
"""

from __future__ import annotations

import dataclasses

from xca_gateway.imaging.remote import open_remote_retrieve
from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.sources import ImagingSource, Retrieval, SourceUnavailable
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.peer_client import PeerClient


class Rad69Source(ImagingSource):
    kind = "rad69"

    def __init__(
        self,
        repository_unique_id: str,
        url: str,
        *,
        peer_client: PeerClient | None = None,
        home_community_id: str | None = None,
        timeout: float | None = None,
        max_instance_bytes: int = 4 * 1024 * 1024 * 1024,
    ) -> None:
        super().__init__(repository_unique_id)
        self.url = url
        self.peer_client = peer_client
        self.home_community_id = home_community_id
        self.timeout = timeout
        self.max_instance_bytes = max_instance_bytes

    def describe(self) -> str:
        return f"RAD-69 imaging source {self.repository_unique_id} at {self.url}"

    def bind(self, peer_client: PeerClient, home_community_id: str | None) -> None:
        """Attach the gateway's outbound client (known only once the Gateway exists)."""
        self.peer_client = peer_client
        self.home_community_id = home_community_id

    async def open(self, request: RetrieveImagingDocumentSetRequest) -> Retrieval:
        if self.peer_client is None:
            raise SourceUnavailable("no outbound client configured")
        if self.home_community_id:
            # RAD69-001: a Responding Imaging Gateway names its community to the source.
            request = request.subset(
                dataclasses.replace(d, home_community_id=self.home_community_id)
                for d in request.documents
            )
        return await open_remote_retrieve(
            self.peer_client,
            self.url,
            request,
            action=Action.RAD69,
            what=self.describe(),
            timeout=self.timeout,
            max_part_bytes=self.max_instance_bytes,
        )
