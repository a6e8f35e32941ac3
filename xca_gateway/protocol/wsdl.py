"""zeep clients built from the IHE WSDLs shipped in ``xca_gateway/wsdl``.

zeep is used where a WSDL-driven client fits: conformance-style tests and tools that want the
schema-typed view of a transaction. The gateway's own hot paths build and read messages with
lxml directly (sans-IO modules), which is faster and streams MTOM.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

WSDL_DIR = Path(__file__).parent.parent / "wsdl"

# key -> (wsdl file, binding QName) for the SOAP 1.2 bindings of each transaction.
BINDINGS: dict[str, tuple[str, str]] = {
    "iti18": ("iti18.wsdl", "{urn:ihe:iti:xds-b:2007}DocumentRegistry_Binding_Soap12"),
    "iti38": ("iti38.wsdl", "{urn:ihe:iti:xds-b:2007}RespondingGateway_Binding_Soap12"),
    "iti39": ("iti39.wsdl", "{urn:ihe:iti:xds-b:2007}RespondingGateway_Binding_Soap12"),
    "iti43": ("iti43.wsdl", "{urn:ihe:iti:xds-b:2007}DocumentRepository_Binding_Soap12"),
    "rad69": ("rad69.wsdl", "{urn:ihe:rad:xdsi-b:2009}DocumentRepository_Binding_Soap12"),
    "rad75": ("rad75.wsdl", "{urn:ihe:rad:xdsi-b:2009}RespondingGateway_Binding_Soap12"),
}


def wsdl_path(key: str) -> Path:
    return WSDL_DIR / BINDINGS[key][0]


@cache
def _document(key: str) -> Any:
    import zeep

    return zeep.Client(str(wsdl_path(key))).wsdl


def zeep_service(key: str, address: str, *, transport: Any = None, plugins: Any = None) -> Any:
    """A zeep service proxy for ``key`` bound to ``address``.

    zeep adds the WS-Addressing headers itself, from the ``wsam:Action`` of the WSDL.
    """
    import zeep

    client = zeep.Client(str(wsdl_path(key)), transport=transport, plugins=plugins or [])
    return client.create_service(BINDINGS[key][1], address)
