"""A registry elsewhere: an existing XDS Document Registry reached over mTLS SOAP.

Stored queries go out as ITI-18 through the gateway's shared :class:`PeerClient`; the answer
is read like any peer's (untrusted: safe parser, size limits) and handed on unchanged. If the
remote registry is down or answers nonsense, the query fails with a RegistryError rather than
a SOAP fault, so the responding side still answers in the transaction's terms. Registrations
(ITI-42) are forwarded when an ITI-42 endpoint is configured.
"""

from __future__ import annotations

from lxml import etree

from xca_gateway.protocol.namespaces import QUERY, RIM, RS, Action, ResponseStatus
from xca_gateway.protocol.peer_client import PeerClient, PeerError
from xca_gateway.registry.model import QueryResult, RegistryAction
from xca_gateway.xds.ebrim import ErrorCode
from xca_gateway.xds.ebrs import RegistryError, parse_registry_errors

_STATUSES = (ResponseStatus.SUCCESS, ResponseStatus.PARTIAL_SUCCESS, ResponseStatus.FAILURE)


class RemoteRegistry:
    def __init__(
        self,
        iti18_url: str,
        peer_client: PeerClient,
        *,
        iti42_url: str | None = None,
        timeout: float = 30.0,
        peer_name: str = "registry",
    ) -> None:
        self.iti18_url = iti18_url
        self.iti42_url = iti42_url
        self.client = peer_client
        self.timeout = timeout
        self.peer_name = peer_name

    def _unavailable(self, url: str, exc: PeerError) -> RegistryError:
        return RegistryError(
            ErrorCode.REGISTRY_ERROR, f"the document registry at {url} is not available: {exc}"
        )

    async def stored_query(self, request: etree._Element) -> QueryResult:
        try:
            reply = await self.client.call(
                self.iti18_url,
                request,
                Action.ITI18,
                peer=self.peer_name,
                transaction="ITI-18",
                deadline=self.timeout,
            )
        except PeerError as exc:
            return QueryResult(ResponseStatus.FAILURE, [self._unavailable(self.iti18_url, exc)])
        try:
            payload = reply.payload
            status = payload.get("status", "")
            if payload.tag != f"{{{QUERY}}}AdhocQueryResponse" or status not in _STATUSES:
                return QueryResult(
                    ResponseStatus.FAILURE,
                    [
                        RegistryError(
                            ErrorCode.REGISTRY_ERROR,
                            f"the document registry at {self.iti18_url} answered with an "
                            "invalid AdhocQueryResponse",
                        )
                    ],
                )
            object_list = payload.find(f"{{{RIM}}}RegistryObjectList")
            objects = (
                [el for el in object_list if isinstance(el.tag, str)]
                if object_list is not None
                else []
            )
            return QueryResult(status, parse_registry_errors(payload), objects)
        finally:
            reply.close()

    async def submit(self, request: etree._Element) -> list[RegistryError]:
        if self.iti42_url is None:
            return [
                RegistryError(
                    ErrorCode.REGISTRY_ERROR,
                    "this gateway answers queries from a remote document registry and does "
                    "not accept registrations; register with that registry",
                )
            ]
        try:
            reply = await self.client.call(
                self.iti42_url,
                request,
                RegistryAction.ITI42,
                peer=self.peer_name,
                transaction="ITI-42",
                deadline=self.timeout,
            )
        except PeerError as exc:
            return [self._unavailable(self.iti42_url, exc)]
        try:
            payload = reply.payload
            status = payload.get("status", "")
            if payload.tag != f"{{{RS}}}RegistryResponse" or status not in _STATUSES:
                return [
                    RegistryError(
                        ErrorCode.REGISTRY_ERROR,
                        f"the document registry at {self.iti42_url} answered with an invalid "
                        "RegistryResponse",
                    )
                ]
            errors = parse_registry_errors(payload)
            if status != ResponseStatus.SUCCESS and not any(e.is_error for e in errors):
                errors.append(
                    RegistryError(ErrorCode.REGISTRY_ERROR, "the registration was not accepted")
                )
            return errors
        finally:
            reply.close()

    async def knows_patient(self, patient_id: str) -> bool | None:
        return None  # a remote registry's patient index is not visible from here

    async def close(self) -> None:
        return None  # the PeerClient belongs to the gateway
