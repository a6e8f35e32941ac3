"""What a door needs of the gateway it is mounted on, and nothing more.

The doors (DIMSE, DICOMweb, HL7 v2 prefetch, import of priors) sit above the federation's actors
and below the application that wires them, so they see their gateway through these two
protocols: :class:`InitiatingSide` (the federation, called in-process) and :class:`DoorHost`
(that, plus what a listener needs). :class:`xca_gateway.app.gateway.Gateway` is both; a test may
hand a door anything else that is.
"""

from __future__ import annotations

from typing import Protocol

from xca_gateway.audit.trail import AuditTrail
from xca_gateway.imaging.service import ImagingService
from xca_gateway.initiating.query import InitiatingGateway
from xca_gateway.initiating.retrieve import InitiatingRetrieve
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.tls import HandshakeFailure
from xca_gateway.security.guard import DoorGuard
from xca_gateway.settings import (
    CommunityConfig,
    LimitsConfig,
    PeerConfig,
    ServerConfig,
    TlsConfig,
)


class InitiatingSide(Protocol):
    """The federation as this community's initiating side answers it, in-process."""

    @property
    def initiating(self) -> InitiatingGateway:
        """ITI-18, fanned out as ITI-38 to every community."""

    @property
    def retrieving(self) -> InitiatingRetrieve:
        """ITI-43, routed as ITI-39 to the community that holds the document."""

    @property
    def imaging(self) -> ImagingService:
        """RAD-69, routed to local sources and as RAD-75 to peers."""


class DoorSettings(Protocol):
    """The parts of the gateway's configuration a door reads."""

    @property
    def community(self) -> CommunityConfig: ...

    @property
    def peers(self) -> tuple[PeerConfig, ...]: ...

    @property
    def server(self) -> ServerConfig: ...

    @property
    def tls(self) -> TlsConfig: ...

    @property
    def limits(self) -> LimitsConfig: ...


class DoorHost(InitiatingSide, Protocol):
    """The federation, plus what a listener of the gateway needs: its configuration, the audit
    trail, the door guard (who may call), the metrics, and where refused handshakes and
    connections go."""

    @property
    def config(self) -> DoorSettings: ...

    @property
    def audit(self) -> AuditTrail: ...

    @property
    def guard(self) -> DoorGuard: ...

    @property
    def metrics(self) -> GatewayMetrics: ...

    def on_handshake_failure(self, failure: HandshakeFailure) -> None: ...

    def connection_refused(self, listener: str, reason: str) -> None:
        """A listener refused a connection at accept (per-source and global caps)."""
