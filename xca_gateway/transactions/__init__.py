"""The IHE transactions, one module per transaction, named after it: the request made to one
peer (initiating side, where the gateway makes it), the handler that answers (responding side)
and the audit records of both (``audit_served`` / ``audit_called``, dispatched by
:mod:`xca_gateway.app.transaction_audit`). Fan-out and routing across peers are the actors'
(:mod:`xca_gateway.initiating`).

This package's root holds what all of them share: the table of transactions (name, wsa:Action,
endpoint path, side) and the answer given while a transaction has no back end configured, a
standards-shaped RegistryResponse with status Failure rather than a bare HTTP error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.xds.ebrs import RegistryError, adhoc_query_response, retrieve_document_set_response


@dataclass(frozen=True)
class TransactionSpec:
    key: str
    name: str
    title: str
    action: str
    response_action: str
    kind: Literal["query", "retrieve"]
    # responding: called by peer communities; initiating: called by local consumers.
    side: Literal["responding", "initiating"]
    path: str


TRANSACTIONS: tuple[TransactionSpec, ...] = (
    TransactionSpec(
        "iti38",
        "ITI-38",
        "Cross Gateway Query",
        Action.ITI38,
        Action.ITI38_RESPONSE,
        "query",
        "responding",
        "/xca/iti38",
    ),
    TransactionSpec(
        "iti39",
        "ITI-39",
        "Cross Gateway Retrieve",
        Action.ITI39,
        Action.ITI39_RESPONSE,
        "retrieve",
        "responding",
        "/xca/iti39",
    ),
    TransactionSpec(
        "rad75",
        "RAD-75",
        "Cross Gateway Retrieve Imaging Document Set",
        Action.RAD75,
        Action.RAD75_RESPONSE,
        "retrieve",
        "responding",
        "/xca/rad75",
    ),
    TransactionSpec(
        "iti18",
        "ITI-18",
        "Registry Stored Query",
        Action.ITI18,
        Action.ITI18_RESPONSE,
        "query",
        "initiating",
        "/ig/iti18",
    ),
    TransactionSpec(
        "iti43",
        "ITI-43",
        "Retrieve Document Set",
        Action.ITI43,
        Action.ITI43_RESPONSE,
        "retrieve",
        "initiating",
        "/ig/iti43",
    ),
    TransactionSpec(
        "rad69",
        "RAD-69",
        "Retrieve Imaging Document Set",
        Action.RAD69,
        Action.RAD69_RESPONSE,
        "retrieve",
        "initiating",
        "/ig/rad69",
    ),
)

BY_KEY = {t.key: t for t in TRANSACTIONS}


def unavailable_handler(spec: TransactionSpec, home_community_id: str, reason: str) -> Handler:
    """Answer ``spec`` with status Failure and the catch-all XDS error of its kind."""
    code = "XDSRegistryError" if spec.kind == "query" else "XDSRepositoryError"
    error = RegistryError(code, f"{spec.name} {spec.title}: {reason}", location=home_community_id)

    async def handle(request: SoapRequest) -> SoapResponse:
        if spec.kind == "query":
            payload = adhoc_query_response(ResponseStatus.FAILURE, [error])
            return SoapResponse(payload, spec.response_action, outcome="failure")
        payload = retrieve_document_set_response(ResponseStatus.FAILURE, [error])
        return SoapResponse(payload, spec.response_action, mtom=True, outcome="failure")

    return handle
