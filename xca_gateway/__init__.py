"""xca-gateway: an IHE XCA-I federation gateway.

The public API is :mod:`xca_gateway.api` (``Gateway``, ``GatewayConfig``, ``load_config``,
``parse_config``, ``serve``, ``main``); everything else is private by convention, laid out in
layers (README, "Code layout").
"""

from __future__ import annotations

from xca_gateway.version import __version__

__all__ = ["__version__"]
