"""xca-gateway: an IHE XCA-I federation gateway.

The public API is what an embedding program needs to run one community's gateway::

    config = xca_gateway.load_config(Path("gateway.toml"))
    gateway = xca_gateway.Gateway(config)
    await gateway.start()
    ...
    await gateway.stop()

or ``await xca_gateway.serve(path)`` (until SIGINT/SIGTERM), or ``xca_gateway.main(argv)``, the
``xca-gateway`` command line. Everything else is private by convention, laid out in layers
(README, "Code layout"). The names load on first use, so that importing one module of the
package (the Audit Record Repository, a tool) does not load the whole gateway.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from xca_gateway.version import __version__

if TYPE_CHECKING:
    from xca_gateway.app.config import GatewayConfig, load_config, parse_config
    from xca_gateway.app.gateway import Gateway
    from xca_gateway.app.serve import serve
    from xca_gateway.cli import main

__all__ = [
    "Gateway",
    "GatewayConfig",
    "__version__",
    "load_config",
    "main",
    "parse_config",
    "serve",
]

# name -> the module that defines it (the imports above, for type checkers and import-linter).
_PUBLIC = {
    "Gateway": "xca_gateway.app.gateway",
    "GatewayConfig": "xca_gateway.app.config",
    "load_config": "xca_gateway.app.config",
    "parse_config": "xca_gateway.app.config",
    "serve": "xca_gateway.app.serve",
    "main": "xca_gateway.cli",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'xca_gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
