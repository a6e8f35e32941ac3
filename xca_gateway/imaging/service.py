"""The community's imaging: its Imaging Document Sources, running, and the in-process RAD-69."""

from __future__ import annotations

from typing import Protocol

from xca_gateway.imaging.config import ImagingConfig, SourceConfig
from xca_gateway.imaging.dicomweb import DicomwebSource
from xca_gateway.imaging.dimse import DimseSettings, DimseSource
from xca_gateway.imaging.filesystem import FilesystemSource
from xca_gateway.imaging.rad69_source import Rad69Source
from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.retrieve import ImagingRetrieval
from xca_gateway.imaging.sources import ImagingSource
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.settings import ConfigError


class Rad69Router(Protocol):
    """What answers a RAD-69 in-process: the Initiating Imaging Gateway
    (:class:`xca_gateway.initiating.imaging.InitiatingImagingGateway`), a layer above."""

    async def retrieve(self, request: RetrieveImagingDocumentSetRequest) -> ImagingRetrieval: ...


def build_source(
    config: SourceConfig,
    *,
    max_instance_bytes: int = 1024 * 1024 * 1024,
    peer_client: PeerClient | None = None,
    home_community_id: str | None = None,
) -> ImagingSource:
    s = dict(config.settings)
    repo = config.repository_unique_id
    if config.kind == "filesystem":
        return FilesystemSource(
            repo,
            s["path"],
            rescan_interval=float(s.get("rescan_interval", 10.0)),
            max_transcode_bytes=max_instance_bytes,
        )
    if config.kind == "dimse":
        return DimseSource(
            repo,
            DimseSettings(
                host=s["host"],
                port=int(s["port"]),
                called_ae_title=s["called_ae_title"],
                calling_ae_title=s.get("calling_ae_title", "XCAGW"),
                mode=s.get("mode", "c-get"),
                move_destination_ae_title=s.get("move_destination_ae_title"),
                storage_scp_host=s.get("storage_scp_host", "127.0.0.1"),
                storage_scp_port=int(s.get("storage_scp_port", 0)),
                acse_timeout=float(s.get("acse_timeout", 30.0)),
                dimse_timeout=float(s.get("dimse_timeout", 120.0)),
                network_timeout=float(s.get("network_timeout", 60.0)),
                max_pdu=int(s.get("max_pdu", 0)),
                max_instance_bytes=max_instance_bytes,
                sop_classes=tuple(s.get("sop_classes", ())),
            ),
        )
    if config.kind == "dicomweb":
        return DicomwebSource(
            repo,
            s["base_url"],
            ca_file=s.get("ca_file"),
            client_cert=s.get("client_cert"),
            client_key=s.get("client_key"),
            headers=s.get("headers"),
            timeout=float(s.get("timeout", 30.0)),
            max_transcode_bytes=max_instance_bytes,
        )
    if config.kind == "rad69":
        return Rad69Source(
            repo,
            s["url"],
            peer_client=peer_client,
            home_community_id=home_community_id,
            timeout=s.get("timeout"),
            max_instance_bytes=max_instance_bytes,
        )
    raise ConfigError(f"unknown imaging source kind {config.kind!r}")  # pragma: no cover


class ImagingService:
    """The configured sources of one gateway, started and stopped with it, and its Initiating
    Imaging Gateway (set by :func:`xca_gateway.app.gateway.install_imaging`)."""

    initiating: Rad69Router | None = None

    def __init__(
        self,
        config: ImagingConfig,
        *,
        peer_client: PeerClient | None = None,
        home_community_id: str | None = None,
    ) -> None:
        self.config = config
        self.sources: dict[str, ImagingSource] = {
            c.repository_unique_id: build_source(
                c,
                max_instance_bytes=config.max_instance_bytes,
                peer_client=peer_client,
                home_community_id=home_community_id,
            )
            for c in config.sources
        }

    async def retrieve(self, request: RetrieveImagingDocumentSetRequest) -> ImagingRetrieval:
        """RAD-69 in-process, as ``/ig/rad69`` serves it (routed to local sources and as
        RAD-75 to peers): the planned instances with their streams and the RegistryErrors.
        The caller reads the instances in order and must ``aclose()`` the result. Raises
        InvalidImagingRequest for a request the endpoint would refuse."""
        if self.initiating is None:
            raise RuntimeError("the imaging service is not installed on a gateway")
        return await self.initiating.retrieve(request)

    async def start(self) -> None:
        for source in self.sources.values():
            await source.start()

    async def stop(self) -> None:
        for source in self.sources.values():
            await source.stop()
