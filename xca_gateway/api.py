"""The public API: what an embedding program needs to run one community's gateway::

    from xca_gateway import api

    config = api.load_config(Path("gateway.toml"))
    gateway = api.Gateway(config)
    await gateway.start()
    ...
    await gateway.stop()

or ``await api.serve(path)`` (until SIGINT/SIGTERM), or ``api.main(argv)``, the ``xca-gateway``
command line. Everything else is private by convention, laid out in layers (README, "Code
layout"). A module of its own at the top, not the package's ``__init__``: every module of the
package imports its parent package first, so names there that load the gateway would either load
it for the Audit Record Repository and the tools too, or need imports hidden from the layers.
"""

from __future__ import annotations

from xca_gateway.app.config import GatewayConfig, load_config, parse_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.app.serve import serve
from xca_gateway.cli import main
from xca_gateway.version import __version__

__all__ = [
    "Gateway",
    "GatewayConfig",
    "__version__",
    "load_config",
    "main",
    "parse_config",
    "serve",
]
