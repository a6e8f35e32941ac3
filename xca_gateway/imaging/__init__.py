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

from xca_gateway.imaging.config import ImagingConfig, parse_imaging_config
from xca_gateway.imaging.service import ImagingService

__all__ = ["ImagingConfig", "ImagingService", "parse_imaging_config"]
