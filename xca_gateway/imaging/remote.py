"""Streaming RAD-69 / RAD-75 client: send a retrieve, read the root part, then relay the parts.

``PeerClient.call`` reads a whole reply (spooling attachments); a gateway that must never store
images instead keeps the reply open: the root part (status, RegistryErrors, DocumentResponses)
is read and parsed at once, and each instance's MIME part is read from the socket only when the
gateway's own response is ready to send it. Peers normally send parts in root order; a part
that arrives before its turn is held in memory up to ``max_reorder_bytes`` (else the retrieve
fails rather than buffering a study).

Peers are untrusted: the root goes through the safe XML parser and its size limit, part count
and part size are bounded, and every failure maps either to :class:`SourceUnavailable` (nothing
sent yet) or to :class:`InstanceStreamError` (mid-stream).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Sequence

from lxml import etree

from xca_gateway.audit.exchange import ImagingFacts
from xca_gateway.imaging.request import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    requested_references,
    retrieve_imaging_request_shell,
    write_retrieve_imaging_request,
)
from xca_gateway.imaging.response import (
    DocumentResponse,
    InvalidImagingResponse,
    RetrieveResponse,
    RetrieveResponseReader,
)
from xca_gateway.imaging.sources import (
    BytesReader,
    InstanceReader,
    InstanceStreamError,
    PlannedInstance,
    Retrieval,
    SourceUnavailable,
)
from xca_gateway.protocol import mtom
from xca_gateway.protocol.http_client import RelayConnectError, RelayError, RelayResponse
from xca_gateway.protocol.mtom import Finished, MtomError, PartData, PartEnd, PartStart
from xca_gateway.protocol.multipart import MultipartStream, TruncatedMultipart
from xca_gateway.protocol.peer_client import PeerClient, PeerError
from xca_gateway.protocol.soap import build_envelope, read_fault, serialize_around
from xca_gateway.protocol.xmlsafe import XmlLimits, XmlRejected
from xca_gateway.protocol.xmlstream import PrunedXmlParser, in_soap_body
from xca_gateway.xds.ebrs import RegistryError

log = logging.getLogger(__name__)

SOAP12_BODY = "{http://www.w3.org/2003/05/soap-envelope}Body"
# Requests for more instances than this are streamed out rather than joined first.
STREAMED_REQUEST_DOCUMENTS = 1000
# Relay in large pieces: per-chunk costs (generators, HTTP framing, TLS records, drain) and
# not the bytes dominate a relaying gateway's CPU time. Memory: one chunk per open reply.
RELAY_CHUNK = 1024 * 1024
# What a reply may still carry after its last wanted part (unreferenced parts, the close
# delimiter, the end of the HTTP body), and how long it may take to send it.
FINISH_BYTES = 1024 * 1024
FINISH_SECONDS = 2.0


class RemoteRetrieval(Retrieval):
    def __init__(
        self,
        planned: Sequence[PlannedInstance],
        errors: Sequence[RegistryError],
        *,
        response: RelayResponse | None,
        parts: MultipartStream | None,
        what: str,
        max_part_bytes: int,
        max_reorder_bytes: int,
        reply_payload: etree._Element | None = None,
    ) -> None:
        super().__init__(planned, errors)
        # The reply's RetrieveDocumentSetResponse (root part), for the audit of this call.
        self.reply_payload = reply_payload
        self._response = response
        self._parts = parts
        self._what = what
        self._max_part_bytes = max_part_bytes
        self._max_reorder_bytes = max_reorder_bytes
        self._early: dict[str, bytes] = {}  # parts that arrived before their turn
        self._early_bytes = 0
        self._wanted = {p.handle for p in planned if isinstance(p.handle, str)}
        self._closed = False

    def reader(self, instance: PlannedInstance) -> InstanceReader:
        handle = instance.handle
        if isinstance(handle, bytes):  # inline base64 document
            return BytesReader(handle)
        assert isinstance(handle, str)
        early = self._early.pop(handle, None)
        if early is not None:
            self._early_bytes -= len(early)
            self._wanted.discard(handle)
            return BytesReader(early)
        return _PartReader(self, handle)

    async def stream(self, instance: PlannedInstance) -> AsyncIterator[bytes]:
        reader = self.reader(instance)
        while chunk := await reader.read():
            yield chunk

    async def _seek(self, content_id: str) -> MultipartStream:
        """Read up to the start of part ``content_id``, keeping wanted parts that come first."""
        parts = self._parts
        if parts is None:
            raise InstanceStreamError(f"{self._what}: reply has no MIME part <{content_id}>")
        while True:
            # next_part() without its coroutine when the part's start was in the last read.
            event = parts.poll() or await parts.next_event()
            if isinstance(event, Finished):
                raise InstanceStreamError(f"{self._what}: MIME part <{content_id}> never came")
            if not isinstance(event, PartStart):
                continue  # the rest of a part nobody referenced
            cid = event.headers.content_id
            if cid == content_id:
                break
            if cid is not None and cid in self._wanted:
                data = await parts.read_part(self._max_reorder_bytes - self._early_bytes)
                self._early[cid] = data
                self._early_bytes += len(data)
        self._wanted.discard(content_id)
        return parts

    async def finish(self) -> None:
        # Without this the reply's tail (close delimiter, last chunk) is cut off by closing
        # the connection: the peer's write fails and its audit says "response not delivered"
        # for a study that was delivered whole. Bounded: a peer holding its tail costs at most
        # FINISH_SECONDS before the connection is closed anyway.
        parts = self._parts
        if parts is None or self._closed or self._early:
            return
        try:
            async with asyncio.timeout(FINISH_SECONDS):
                await parts.drain(FINISH_BYTES)
        except (TimeoutError, MtomError, TruncatedMultipart, RelayError, OSError) as exc:
            log.debug("%s: reply tail not read: %r", self._what, exc)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._early.clear()
        if self._response is not None:
            try:
                await self._response.aclose()
            except Exception:  # pragma: no cover - closing a broken connection
                log.debug("closing %s reply failed", self._what, exc_info=True)


class _PartReader(InstanceReader):
    """One instance's MIME part of the reply, piece by piece as the socket delivered it: one
    coroutine call per piece between the relay client and the gateway's response."""

    __slots__ = ("_content_id", "_parts", "_retrieval", "_size")

    def __init__(self, retrieval: RemoteRetrieval, content_id: str) -> None:
        self._retrieval = retrieval
        self._content_id = content_id
        self._parts: MultipartStream | None = None  # once at the part's start
        self._size = 0

    async def read(self) -> bytes:
        retrieval = self._retrieval
        try:
            parts = self._parts
            if parts is None:
                if self._size < 0:
                    return b""
                parts = self._parts = await retrieval._seek(self._content_id)
            while True:
                # Mostly the event is already parsed: no coroutine for it.
                event = parts.poll() or await parts.next_event()
                if isinstance(event, PartData):
                    data = event.data
                    if not data:
                        continue
                    self._size += len(data)
                    if self._size > retrieval._max_part_bytes:
                        raise InstanceStreamError(
                            f"{retrieval._what}: part <{self._content_id}> exceeds "
                            f"{retrieval._max_part_bytes} bytes"
                        )
                    return data
                if isinstance(event, PartEnd):
                    if self._size == 0:
                        raise InstanceStreamError(
                            f"{retrieval._what}: part <{self._content_id}> is empty"
                        )
                    self._parts, self._size = None, -1  # ended
                    return b""
                # A PartStart or Finished before the part ended: not the parser's order.
                raise InstanceStreamError(  # pragma: no cover
                    f"{retrieval._what}: part <{self._content_id}> did not end"
                )
        except (MtomError, TruncatedMultipart) as exc:
            raise InstanceStreamError(f"{retrieval._what}: broken MTOM reply: {exc}") from None
        except (RelayError, ssl.SSLError, OSError) as exc:
            raise InstanceStreamError(f"{retrieval._what}: connection failed: {exc!r}") from None


async def open_remote_retrieve(
    peer_client: PeerClient,
    url: str,
    request: RetrieveImagingDocumentSetRequest,
    *,
    action: str,
    what: str,
    timeout: float | None = None,
    max_part_bytes: int = 4 * 1024 * 1024 * 1024,
    max_reorder_bytes: int = 64 * 1024 * 1024,
) -> RemoteRetrieval:
    """Send ``request`` to ``url`` and return once the reply's root part has been read;
    the client's observers (audit) hear of the call either way.

    Neither message is ever a tree: the request is written straight to bytes and the reply's
    root part parsed as it arrives, each DocumentResponse planned and dropped (a 20,000-
    instance retrieve keeps a few hundred bytes per instance, not kilobytes). The observers get
    the payload elements without their instances and the instances as :class:`ImagingFacts`.
    """
    shell = retrieve_imaging_request_shell()
    requested = ImagingFacts(lambda: requested_references(request))
    try:
        retrieval = await _open_remote_retrieve(
            peer_client,
            url,
            request,
            shell,
            action=action,
            what=what,
            timeout=timeout,
            max_part_bytes=max_part_bytes,
            max_reorder_bytes=max_reorder_bytes,
        )
    except SourceUnavailable as exc:
        _observe(peer_client, url, action, shell, None, str(exc), requested)
        raise
    planned = retrieval.planned
    facts = ImagingFacts(
        requested.requested, lambda: (p.document.document_unique_id for p in planned)
    )
    _observe(peer_client, url, action, shell, retrieval.reply_payload, None, facts)
    retrieval.reply_payload = None
    return retrieval


async def _open_remote_retrieve(
    peer_client: PeerClient,
    url: str,
    request: RetrieveImagingDocumentSetRequest,
    shell: etree._Element,
    *,
    action: str,
    what: str,
    timeout: float | None,
    max_part_bytes: int,
    max_reorder_bytes: int,
) -> RemoteRetrieval:
    """Send ``request`` to ``url`` and return once the reply's root part has been read.

    Raises SourceUnavailable when the peer cannot be reached, answers with a fault or HTTP
    error, or sends an unreadable root part.
    """
    provider = peer_client.header_provider  # e.g. the outbound XUA assertion
    extra = provider(url, action, shell) if provider is not None else ()
    envelope = build_envelope(
        shell, action=action, to=url, reply_to_anonymous=True, extra_headers=extra
    )
    head, tail = serialize_around(envelope, shell)
    root = itertools.chain((head,), write_retrieve_imaging_request(request), (tail,))
    writer = mtom.MtomWriter(root, action=action)  # IHE: MTOM both ways
    body: bytes | AsyncIterator[bytes]
    if len(request.documents) > STREAMED_REQUEST_DOCUMENTS:
        # Written as it is sent (chunked, on a connection of its own): a 20,000-instance
        # request is some 6 MB that would otherwise be held while it goes out.
        body = writer.aiter_bytes()
    else:  # small: one piece, over a pooled connection (a viewer's one-instance retrieves)
        body = b"".join(writer.iter_bytes())
    content_type = writer.content_type
    del writer, root, envelope
    response: RelayResponse | None = None
    try:
        async with asyncio.timeout(timeout or peer_client.outbound.request_timeout):
            response = await peer_client.relay.post(url, body, [("content-type", content_type)])
            del body  # sent: not kept while the reply is read
            try:
                peer_client.check_pin_der(url, response.peer_certificate)
            except PeerError as exc:
                raise SourceUnavailable(exc.message) from None
            retrieval = await _read_root(
                peer_client, response, request, what, max_part_bytes, max_reorder_bytes
            )
        return retrieval
    except SourceUnavailable:
        if response is not None:
            await response.aclose()
        raise
    except TimeoutError:
        if response is not None:
            await response.aclose()
        raise SourceUnavailable("no answer in time") from None
    except RelayConnectError as exc:
        raise SourceUnavailable(str(exc)) from None
    except (RelayError, ssl.SSLError, OSError) as exc:
        if response is not None:
            await response.aclose()
        raise SourceUnavailable(f"transport error: {exc!r}") from None
    except BaseException:
        if response is not None:
            await response.aclose()
        raise


def _observe(
    peer_client: PeerClient,
    url: str,
    action: str,
    request: etree._Element,
    reply: etree._Element | None,
    error: str | None,
    facts: ImagingFacts,
) -> None:
    """Tell the client's observers (audit) about this call, as PeerClient.call does."""
    for observer in peer_client.observers:
        try:
            observer(url, action, request, reply, error, facts)
        except Exception:
            log.exception("outbound call observer failed")


# The reply's root part is parsed this much at a time, yielding to the event loop between.
_PARSE_SLICE = 64 * 1024


class _RootReader:
    """The reply's root part, parsed as it arrives (sans-IO: bytes in, plan out): each
    DocumentResponse is planned (:class:`Planner`) and dropped from the tree."""

    def __init__(self, limits: XmlLimits, requested: Sequence[DocumentRequest]) -> None:
        self.planner = Planner(requested)
        self.reader = RetrieveResponseReader(self.planner.add)
        self.parser = PrunedXmlParser(
            limits,
            in_soap_body(self.reader.take, SOAP12_BODY, max_depth=1),  # DocumentResponse
            tags=self.reader.tags,
        )

    async def feed(self, data: bytes) -> None:
        if len(data) <= _PARSE_SLICE:
            self.parser.feed(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), _PARSE_SLICE):
            self.parser.feed(view[start : start + _PARSE_SLICE])
            await asyncio.sleep(0)


async def _read_root(
    peer_client: PeerClient,
    response: RelayResponse,
    request: RetrieveImagingDocumentSetRequest,
    what: str,
    max_part_bytes: int,
    max_reorder_bytes: int,
) -> RemoteRetrieval:
    limits = peer_client.xml_limits
    content_type = response.headers.get("content-type", "")
    parts: MultipartStream | None = None
    early: dict[str, bytes] = {}
    root = _RootReader(limits, request.documents)
    try:
        if mtom.is_mtom(content_type):
            try:
                _mtype, params = mtom.parse_content_type(content_type)
                boundary = params.get("boundary") or ""
                start = (params.get("start") or "").strip().strip("<>") or None
                parts = MultipartStream(
                    response.aiter_reads(), boundary, max_parts=len(request.documents) + 8
                )
                early_total = 0
                while True:
                    headers = await parts.next_part()
                    if headers is None:
                        raise SourceUnavailable("MTOM reply without its root part")
                    if start is None or headers.content_id == start:
                        break
                    if headers.content_id is not None:
                        data = await parts.read_part(max_reorder_bytes - early_total)
                        early[headers.content_id] = data
                        early_total += len(data)
                while True:
                    event = await parts.next_event()
                    if isinstance(event, PartData):
                        await root.feed(event.data)
                    elif isinstance(event, PartEnd):
                        break
                    else:
                        raise TruncatedMultipart("MIME part did not end")
            except (MtomError, TruncatedMultipart) as exc:
                raise SourceUnavailable(f"malformed MTOM reply: {exc}") from None
        else:
            async for chunk in response.aiter_raw():
                await root.feed(chunk)
        envelope = root.parser.close()
    except XmlRejected as exc:
        raise SourceUnavailable(
            f"HTTP {response.status_code}, unreadable reply: {exc.reason}"
        ) from None
    fault = read_fault(envelope)
    if fault is not None:
        raise SourceUnavailable(f"SOAP fault {fault.code}: {fault.reason}")
    body = envelope.find(SOAP12_BODY)
    payload = next((c for c in body if isinstance(c.tag, str)), None) if body is not None else None
    if payload is None or response.status_code >= 400:
        raise SourceUnavailable(f"HTTP {response.status_code} without a SOAP payload")
    try:
        _status, errors = root.reader.finish(payload)
    except InvalidImagingResponse as exc:
        raise SourceUnavailable(f"invalid response: {exc.reason}") from None
    planned = root.planner.planned
    if not planned:
        await response.aclose()  # nothing to relay: free the connection now
        parts = None
    retrieval = RemoteRetrieval(
        planned,
        list(errors),
        reply_payload=payload,
        response=response,
        parts=parts,
        what=what,
        max_part_bytes=max_part_bytes,
        max_reorder_bytes=max_reorder_bytes,
    )
    for cid, data in early.items():
        if cid in retrieval._wanted:
            retrieval._early[cid] = data
            retrieval._early_bytes += len(data)
    return retrieval


class Planner:
    """One planned instance per DocumentResponse that answers a requested instance, added
    as the responses are read.

    Documents nobody asked for, duplicates and documents whose MIME part another response
    already claimed are dropped; a consumer only ever receives what it requested.
    """

    def __init__(self, requested: Sequence[DocumentRequest]) -> None:
        # Requested and not answered yet: an answered instance leaves, so that a duplicate
        # is refused like an unrequested one without a set of the answered UIDs (the
        # response's copies of 20,000 UIDs kept to the end of the retrieve, ~3 MB).
        self.by_uid: dict[str, DocumentRequest] = {}
        for request in requested:
            self.by_uid.setdefault(request.document_unique_id, request)
        self.planned: list[PlannedInstance] = []
        self._seen_cids: set[str] = set()

    def add(self, doc: DocumentResponse) -> None:
        wanted = self.by_uid.get(doc.document_unique_id)
        if wanted is None:
            log.warning("ignoring unrequested or duplicate document %s", doc.document_unique_id)
            return
        if wanted.repository_unique_id != doc.repository_unique_id:
            log.warning(
                "ignoring %s from unexpected repository %s",
                doc.document_unique_id,
                doc.repository_unique_id,
            )
            return
        handle: str | bytes
        if doc.content_id is not None:
            if doc.content_id in self._seen_cids:
                return
            self._seen_cids.add(doc.content_id)
            handle = doc.content_id
        else:
            assert doc.inline is not None
            handle = doc.inline
        del self.by_uid[wanted.document_unique_id]
        # The request's own record and strings: the response's copies are dropped.
        self.planned.append(
            PlannedInstance(wanted, None, home_community_id=doc.home_community_id, handle=handle)
        )


def plan_from_response(
    parsed: RetrieveResponse, requested: Sequence[DocumentRequest]
) -> list[PlannedInstance]:
    """:class:`Planner` over a response read as a whole."""
    planner = Planner(requested)
    for doc in parsed.documents:
        planner.add(doc)
    return planner.planned
