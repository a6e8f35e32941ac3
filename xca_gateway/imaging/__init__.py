"""XCA-I imaging retrieval: RAD-69 / RAD-75 with decentralised Imaging Document Sources.

Images stay at the source that produced them and cross the gateways only when asked for, as a
stream: nothing is stored centrally or on the gateway. Modules: ``request`` / ``response``
(sans-IO messages), ``sources`` (the source interface), one module per source kind
(``filesystem``, ``dimse``, ``dicomweb``, ``rad69_source``), ``remote`` (streaming RAD-69/RAD-75
client), ``retrieve`` (the streaming retrieve engine: :class:`ImagingRetrieval` in-process, MTOM
responses for the SOAP endpoints), ``transfer_syntax`` and ``config``. In-process callers use
``gateway.imaging.retrieve(request)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xca_gateway.imaging.config import ImagingConfig, ImagingService, parse_imaging_config

if TYPE_CHECKING:
    from xca_gateway.gateway import Gateway

__all__ = ["ImagingConfig", "ImagingService", "install_imaging", "parse_imaging_config"]


def install_imaging(gateway: Gateway, config: ImagingConfig) -> ImagingService:
    """Register the RAD-75 (responding) and RAD-69 (initiating) handlers on ``gateway``.

    Returns the service whose ``start()``/``stop()`` must run with the gateway's own; its
    ``retrieve()`` is RAD-69 in-process, the same path ``/ig/rad69`` takes.
    """
    from xca_gateway.namespaces import Action
    from xca_gateway.soap_service import Operation
    from xca_gateway.transactions.rad69 import InitiatingImagingGateway
    from xca_gateway.transactions.rad75 import rad75_handler

    home = gateway.config.community.home_community_id
    service = ImagingService(config, peer_client=gateway.peer_client, home_community_id=home)
    peers = {p.home_community_id: p.rad75 for p in gateway.config.peers if p.rad75}
    gateway.endpoints["rad75"].add(
        Operation(
            Action.RAD75,
            "RAD-75",
            rad75_handler(
                service.sources,
                home_community_id=home,
                open_timeout=config.open_timeout,
                idle_timeout=config.idle_timeout,
                abandon_timeout=config.abandon_timeout,
                max_documents=config.max_documents,
            ),
        )
    )
    service.initiating = InitiatingImagingGateway(
        service.sources,
        home_community_id=home,
        peers=peers,
        peer_client=gateway.peer_client,
        open_timeout=config.open_timeout,
        idle_timeout=config.idle_timeout,
        abandon_timeout=config.abandon_timeout,
        max_documents=config.max_documents,
    )
    gateway.endpoints["rad69"].add(Operation(Action.RAD69, "RAD-69", service.initiating.handle))
    return service
