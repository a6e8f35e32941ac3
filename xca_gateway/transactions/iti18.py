"""ITI-18 Registry Stored Query, answered by this community's registry.

The same :class:`~xca_gateway.registry.Registry` serves local Document Consumers here and peer
communities through ITI-38, so both see one implementation of the 14 stored queries. Objects
get ``home`` (our homeCommunityId) unless the registry already set one, so that a consumer can
route follow-up queries and retrieves through an Initiating Gateway.
"""

from __future__ import annotations

from xca_gateway.protocol.namespaces import Action, ResponseStatus
from xca_gateway.protocol.soap_service import Handler, SoapRequest, SoapResponse
from xca_gateway.registry import Registry
from xca_gateway.xds.ebrs import adhoc_query_response

__all__ = ["iti18_handler", "outcome_of"]


def outcome_of(status: str) -> str:
    if status == ResponseStatus.SUCCESS:
        return "success"
    if status == ResponseStatus.PARTIAL_SUCCESS:
        return "partial"
    return "failure"


def iti18_handler(registry: Registry, *, home_community_id: str) -> Handler:
    async def handle(request: SoapRequest) -> SoapResponse:
        result = await registry.stored_query(request.payload)
        for obj in result.objects:
            if not obj.get("home"):
                obj.set("home", home_community_id)
        payload = adhoc_query_response(result.status, result.errors, result.objects)
        return SoapResponse(payload, Action.ITI18_RESPONSE, outcome=outcome_of(result.status))

    return handle
