"""Imaging Document Source backed by DICOMweb: QIDO-RS to resolve, WADO-RS to retrieve (a VNA).

Resolve: one QIDO-RS query per requested series (``/studies/{st}/series/{se}/instances``, paged)
tells which SOP instances exist; a request for a few instances of a series (up to four) asks
for each by ``SOPInstanceUID`` instead of listing the series. QIDO-RS does not reliably return
the stored transfer syntax (Orthanc omits it), so the syntax is settled per instance while
streaming:

1. ``GET .../instances/{sop}`` with ``transfer-syntax=*`` (as stored). The file meta at the
   start of the part names the stored syntax: if it was requested, the bytes are relayed as they
   arrive (byte-identical); if the gateway can convert it losslessly into a requested syntax
   (native <-> RLE, see :mod:`.transfer_syntax`), that one instance is converted in memory.
2. Otherwise the origin server is asked to transcode, one requested syntax at a time, lossless
   ones first (PS3.18 8.7.3.5: 406/400 when it cannot); the answer is relayed if its file meta
   really names that syntax.
3. If nothing works the instance cannot be delivered; as this is only known once the root part
   is out, the response is aborted (see :mod:`.retrieve`).

The origin server is inside the community, so it has its own client (plain HTTP or TLS with a
configured CA and optional client certificate), not the gateway's peer client; it is the same
lean client as the relays (:mod:`xca_gateway.protocol.http_client`), so instance bytes are not
handled
per TLS record on their way through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlencode

from xca_gateway.imaging.request import DocumentRequest, RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.sources import (
    DEFAULT_CHUNK,
    ImagingSource,
    InstanceStreamError,
    PlannedInstance,
    Retrieval,
    SourceUnavailable,
    chunked,
    document_not_found,
)
from xca_gateway.imaging.transfer_syntax import (
    META_SNIFF_LIMIT,
    NeedMoreData,
    TranscodeError,
    choose_target,
    lossless_first,
    sniff_transfer_syntax,
    transcode,
)
from xca_gateway.protocol import mtom
from xca_gateway.protocol.http_client import RelayClient, RelayError, RelayResponse
from xca_gateway.protocol.mtom import MtomError, PartData, PartEnd
from xca_gateway.protocol.multipart import MultipartStream, TruncatedMultipart
from xca_gateway.xds.ebrs import RegistryError

log = logging.getLogger(__name__)

_SOP_INSTANCE_UID = "00080018"
_REFUSED = frozenset({400, 406, 415, 500, 501})  # "cannot produce that transfer syntax"
_MAX_QIDO_BYTES = 64 * 1024 * 1024  # one page of QIDO-RS JSON
# Up to this many instances of one series are resolved one by one (SOPInstanceUID matching).
_SINGLE_LOOKUPS_UP_TO = 4


def accept_header(transfer_syntax: str) -> str:
    return f'multipart/related; type="application/dicom"; transfer-syntax={transfer_syntax}'


class DicomwebSource(ImagingSource):
    kind = "dicomweb"

    def __init__(
        self,
        repository_unique_id: str,
        base_url: str,
        *,
        ca_file: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        page_size: int = 1000,
        max_transcode_bytes: int = 512 * 1024 * 1024,
        max_connections: int = 8,
    ) -> None:
        super().__init__(repository_unique_id)
        self.base_url = base_url.rstrip("/")
        self.ca_file = ca_file
        self.client_cert = client_cert
        self.client_key = client_key
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.page_size = page_size
        self.max_transcode_bytes = max_transcode_bytes
        self.max_connections = max_connections
        self._client: RelayClient | None = None

    def describe(self) -> str:
        return f"DICOMweb imaging source {self.repository_unique_id} at {self.base_url}"

    def client(self) -> RelayClient:
        if self._client is None:
            context: ssl.SSLContext | None = None
            if self.base_url.startswith("https:"):
                context = ssl.create_default_context(
                    cafile=str(self.ca_file) if self.ca_file else None
                )
                if self.client_cert is not None:
                    context.load_cert_chain(
                        str(self.client_cert), str(self.client_key) if self.client_key else None
                    )
            self._client = RelayClient(
                context,
                connect_timeout=self.timeout,
                max_connections=self.max_connections,
                max_idle_per_origin=self.max_connections,
            )
        return self._client

    async def _get(self, url: str, accept: str) -> RelayResponse:
        """GET with the configured headers; the reply's headers within ``timeout``."""
        headers = [*self.headers.items(), ("accept", accept), ("accept-encoding", "identity")]
        async with asyncio.timeout(self.timeout):
            response = await self.client().get(url, headers)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            await response.aclose()
            raise RelayError(f"DICOMweb server sent content-encoding {encoding[:40]!r}")
        return response

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def instance_url(self, doc: DocumentRequest) -> str:
        return (
            f"{self.base_url}/studies/{doc.study_instance_uid}/series/"
            f"{doc.series_instance_uid}/instances/{doc.document_unique_id}"
        )

    async def series_instances(
        self, study: str, series: str, sop_instance_uid: str | None = None
    ) -> set[str]:
        """SOP Instance UIDs of one series (QIDO-RS, paged), or whether one instance of it
        exists (matching on SOPInstanceUID)."""
        url = f"{self.base_url}/studies/{study}/series/{series}/instances"
        found: set[str] = set()
        offset = 0
        for _page in range(10_000):  # bounded: 10M instances at the default page size
            params = {"limit": str(self.page_size), "offset": str(offset)}
            if sop_instance_uid is not None:
                params["SOPInstanceUID"] = sop_instance_uid
            try:
                response = await self._get(f"{url}?{urlencode(params)}", "application/dicom+json")
                try:
                    status = response.status_code
                    content = bytearray()
                    async with asyncio.timeout(self.timeout):
                        async for piece in response.aiter_raw():
                            content += piece
                            if len(content) > _MAX_QIDO_BYTES:
                                raise SourceUnavailable("QIDO-RS answer too large")
                finally:
                    await response.aclose()
            except (RelayError, TimeoutError, OSError) as exc:
                raise SourceUnavailable(f"QIDO-RS failed: {exc!r}") from None
            if status in (204, 404):
                return found
            if status != 200:
                raise SourceUnavailable(f"QIDO-RS answered HTTP {status}")
            try:
                items = json.loads(bytes(content) or b"[]")
            except ValueError:
                raise SourceUnavailable("QIDO-RS answer is not JSON") from None
            if not isinstance(items, list):
                raise SourceUnavailable("QIDO-RS answer is not a JSON array")
            for item in items:
                element = item.get(_SOP_INSTANCE_UID) if isinstance(item, dict) else None
                value = element.get("Value") if isinstance(element, dict) else None
                if isinstance(value, list) and value and isinstance(value[0], str):
                    found.add(value[0])
            if len(items) < self.page_size:
                return found
            offset += len(items)
        return found

    async def open(self, request: RetrieveImagingDocumentSetRequest) -> Retrieval:
        asked: dict[tuple[str, str], list[str]] = {}
        for d in request.documents:
            asked.setdefault((d.study_instance_uid, d.series_instance_uid), []).append(
                d.document_unique_id
            )
        # A series asked for all or most of its instances is listed in one query; a few
        # instances of a large series (a viewer fetching images one by one) are asked for by
        # SOP Instance UID, so each retrieve costs the source one small match rather than a
        # listing of the whole series.
        keys: list[tuple[str, str, str | None]] = []
        for (study, series), uids in asked.items():
            if len(uids) <= _SINGLE_LOOKUPS_UP_TO:
                keys.extend((study, series, uid) for uid in dict.fromkeys(uids))
            else:
                keys.append((study, series, None))
        limiter = asyncio.Semaphore(4)

        async def query(key: tuple[str, str, str | None]) -> set[str]:
            async with limiter:
                return await self.series_instances(*key)

        results = await asyncio.gather(*(query(key) for key in keys))
        present: dict[tuple[str, str], set[str]] = {}
        for (study, series, _), found in zip(keys, results, strict=True):
            present.setdefault((study, series), set()).update(found)
        planned: list[PlannedInstance] = []
        errors: list[RegistryError] = []
        for doc in request.documents:
            if doc.document_unique_id in present[(doc.study_instance_uid, doc.series_instance_uid)]:
                planned.append(PlannedInstance(doc))
            else:
                errors.append(document_not_found(doc))
        return DicomwebRetrieval(self, planned, errors, request.transfer_syntax_uids)


class DicomwebRetrieval(Retrieval):
    def __init__(
        self,
        source: DicomwebSource,
        planned: list[PlannedInstance],
        errors: list[RegistryError],
        requested: tuple[str, ...],
    ) -> None:
        super().__init__(planned, errors)
        self.source = source
        self.requested = requested

    async def stream(self, instance: PlannedInstance) -> AsyncIterator[bytes]:
        doc = instance.document
        url = self.source.instance_url(doc)
        tried: list[str] = []
        try:
            for syntax in ["*", *lossless_first(self.requested)]:
                r = await self.source._get(url, accept_header(syntax))
                try:
                    if r.status_code == 404:
                        raise InstanceStreamError(f"WADO-RS: {doc.document_unique_id} is gone")
                    if r.status_code in _REFUSED and syntax != "*":
                        tried.append(f"{syntax}: HTTP {r.status_code}")
                        continue
                    if r.status_code != 200:
                        raise InstanceStreamError(
                            f"WADO-RS answered HTTP {r.status_code} for {doc.document_unique_id}"
                        )
                    delivered = False
                    async for chunk in self._relay(r, syntax):
                        delivered = True
                        yield chunk
                    if delivered:
                        return
                    tried.append(f"{syntax}: not usable")
                finally:
                    await r.aclose()
        except (RelayError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise InstanceStreamError(f"WADO-RS of {doc.document_unique_id}: {exc!r}") from None
        except (MtomError, TruncatedMultipart, TranscodeError) as exc:
            raise InstanceStreamError(f"WADO-RS of {doc.document_unique_id}: {exc}") from None
        raise InstanceStreamError(
            f"{doc.document_unique_id}: no requested transfer syntax available ({'; '.join(tried)})"
        )

    async def _relay(self, response: RelayResponse, asked: str) -> AsyncIterator[bytes]:
        """Yield the instance if usable for the request, else nothing."""
        media_type, params = mtom.parse_content_type(response.headers.get("content-type", ""))
        if media_type != "multipart/related" or not params.get("boundary"):
            raise InstanceStreamError(f"WADO-RS answered {media_type!r}, not multipart/related")
        parts = MultipartStream(response.aiter_raw(), params["boundary"], max_parts=4)
        if await parts.next_part() is None:
            raise InstanceStreamError("WADO-RS answer has no part")
        prefix = bytearray()
        stored: str | None = None
        ended = False
        while stored is None:
            event = await parts.next_event()
            if isinstance(event, PartEnd):
                ended = True
            elif isinstance(event, PartData):
                prefix += event.data
            else:
                raise InstanceStreamError("WADO-RS part ended early")
            try:
                stored = sniff_transfer_syntax(bytes(prefix[:META_SNIFF_LIMIT]))
            except NeedMoreData:
                if ended or len(prefix) > META_SNIFF_LIMIT:
                    raise InstanceStreamError("WADO-RS part is not a DICOM file") from None
        if stored in self.requested:
            yield bytes(prefix)
            while not ended:
                event = await parts.next_event()
                if isinstance(event, PartData):
                    if event.data:
                        yield event.data
                elif isinstance(event, PartEnd):
                    ended = True
                else:
                    raise InstanceStreamError("WADO-RS part did not end")
            return
        target = choose_target(stored, self.requested)
        if asked == "*" and target is not None:
            limit = self.source.max_transcode_bytes
            rest = b"" if ended else await parts.read_part(limit)
            data = bytes(prefix) + rest
            converted = await asyncio.to_thread(transcode, data, target)
            del data, rest
            async for chunk in chunked(converted, DEFAULT_CHUNK):
                yield chunk
        # else: the server sent a syntax we cannot use; the caller tries the next one.
