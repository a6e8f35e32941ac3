"""Which configured Imaging Document Source serves each DocumentRequest of a retrieve. Shared
by the sides that answer from this community's sources: RAD-75 (Responding Imaging Gateway),
RAD-69 (Imaging Document Source, and the Initiating Imaging Gateway for its own community).

:func:`parse_or_fault` reads the request and faults only on XML/schema breakage; bad
identifiers are answered per DocumentRequest.
"""

from __future__ import annotations

from collections.abc import Mapping

from xca_gateway.imaging.request import (
    DocumentRequest,
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
    parse_retrieve_imaging_request,
)
from xca_gateway.imaging.retrieve import Route
from xca_gateway.imaging.sources import (
    ImagingSource,
    source_unavailable_error,
    unknown_repository_error,
)
from xca_gateway.protocol.soap import SoapFault
from xca_gateway.protocol.soap_service import SoapRequest
from xca_gateway.xds.ebrs import RegistryError

__all__ = ["local_routes", "parse_or_fault", "source_route"]


def parse_or_fault(request: SoapRequest, max_documents: int) -> RetrieveImagingDocumentSetRequest:
    """The parsed request (read as it arrived, see ``SoapRequest.parsed``, or from the
    payload element); a SOAP Sender fault only for XML/schema breakage."""
    parsed = request.parsed
    try:
        if isinstance(parsed, InvalidImagingRequest):
            raise parsed
        if isinstance(parsed, RetrieveImagingDocumentSetRequest):
            if len(parsed.documents) + len(parsed.rejected) > max_documents:
                raise InvalidImagingRequest(
                    f"more than {max_documents} DocumentRequests in one request"
                )
            return parsed
        return parse_retrieve_imaging_request(request.payload, max_documents=max_documents)
    except InvalidImagingRequest as exc:
        raise SoapFault.sender(f"invalid RetrieveImagingDocumentSetRequest: {exc.reason}") from None


def source_route(source: ImagingSource, home_community_id: str | None) -> Route:
    repository = source.repository_unique_id

    def unavailable(reason: str, count: int) -> RegistryError:
        return source_unavailable_error(repository, reason, count)

    return Route(source.describe(), source.open, unavailable, home_community_id)


def local_routes(
    documents: list[DocumentRequest],
    sources: Mapping[str, ImagingSource],
    home_community_id: str | None,
) -> tuple[list[tuple[Route, list[DocumentRequest]]], list[RegistryError]]:
    """Group documents by RepositoryUniqueId; unknown repositories become errors."""
    groups: dict[str, list[DocumentRequest]] = {}
    for doc in documents:
        groups.setdefault(doc.repository_unique_id, []).append(doc)
    routes: list[tuple[Route, list[DocumentRequest]]] = []
    errors: list[RegistryError] = []
    for repository, docs in groups.items():
        source = sources.get(repository)
        if source is None:
            errors.append(unknown_repository_error(repository, len(docs)))
        else:
            routes.append((source_route(source, home_community_id), docs))
    return routes, errors
