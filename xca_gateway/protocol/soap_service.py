"""SOAP 1.2 / MTOM endpoint dispatch: HTTP request in, SOAP response (or fault) out.

The HTTP server hands every request here. This layer enforces the message limits, reads plain
SOAP or MTOM bodies (attachments spooled to disk above a threshold), parses the XML safely,
checks the envelope and WS-Addressing, and dispatches on ``wsa:Action`` to the operation
registered for the endpoint path. Whatever goes wrong becomes a SOAP fault, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from lxml import etree

from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol import mtom
from xca_gateway.protocol.http_server import (
    PeerInfo,
    Request,
    RequestBodyTooSlow,
    Response,
    source_of,
)
from xca_gateway.protocol.namespaces import SOAP12
from xca_gateway.protocol.soap import (
    Envelope,
    SoapFault,
    action_not_supported,
    build_envelope,
    build_fault,
    check_xop_references,
    parse_envelope,
    serialize,
    serialize_around,
)
from xca_gateway.protocol.xmlsafe import (
    FairParser,
    MarkupCount,
    MarkupCounter,
    XmlLimits,
    XmlRejected,
    check_markup,
)
from xca_gateway.protocol.xmlstream import PrunedXmlParser, in_soap_body
from xca_gateway.settings import LimitsConfig

log = logging.getLogger(__name__)

# A payload read element by element is parsed this much at a time between event-loop turns.
_PARSE_SLICE = 64 * 1024

# Transactions whose requests are queries: their endpoints take bodies up to
# ``limits.max_query_bytes`` instead of ``limits.max_request_bytes``.
QUERY_TRANSACTIONS = frozenset({"ITI-18", "ITI-38", "ITI-45", "ITI-55"})
# Bytes sent are added to the metric in steps of this size while a body streams.
_COUNT_EVERY = 1024 * 1024


@dataclass
class SoapRequest:
    envelope: Envelope
    attachments: Mapping[str, mtom.Attachment]
    peer: PeerInfo
    endpoint: SoapEndpoint
    http: Request
    # Filled by the authorizer and handlers for later layers (e.g. the XUA identity, the
    # policy decision, audit details).
    context: dict[str, Any] = field(default_factory=dict)
    # The payload as compact records, when a :class:`PayloadReader` read it element by
    # element (its elements are then gone from ``payload``): what the reader's ``finish``
    # returned, e.g. the request or why it is refused.
    parsed: object | None = None

    @property
    def payload(self) -> etree._Element:
        return self.envelope.payload


@dataclass(frozen=True)
class StreamedChildren:
    """Children of a response payload written straight to bytes, after the payload element's
    own children: a retrieve's DocumentResponses, one per instance, are never a tree.
    ``chunks`` is called once, when the response is sent; ``count`` says how many."""

    count: int
    chunks: Callable[[], Iterator[bytes]]
    # The MIME parts they reference, made one by one as they are sent (after ``parts``).
    parts: Callable[[], Iterable[mtom.OutgoingPart]] | None = None
    # The element (in the payload) they are children of, when not the payload itself: the
    # RegistryObjectList of a fan-out's answer, whose peers' objects were serialised as
    # each answer arrived.
    holder: etree._Element | None = None


@dataclass
class SoapResponse:
    payload: etree._Element
    action: str
    parts: list[mtom.OutgoingPart] = field(default_factory=list)
    # Retrieve responses are MTOM even when they carry no document (IHE: MTOM both ways).
    mtom: bool = False
    # For metrics and audit: success | partial | failure.
    outcome: str = "success"
    # More children of ``payload``, written as bytes (observers see ``payload`` without them).
    streamed: StreamedChildren | None = None


class PayloadReader(Protocol):
    """Reads one kind of request payload element by element as it is parsed (see
    :class:`~xca_gateway.protocol.xmlstream.PrunedXmlParser`): ``take`` gets each complete
    element inside the payload (depth 1 = a child of the payload) and returns True for what
    it consumed; ``finish`` gets what is left of the payload and returns the compact result
    (:attr:`SoapRequest.parsed`). ``max_depth``: the deepest element ``take`` consumes
    (deeper ones are not handed to it), or None."""

    @property
    def max_depth(self) -> int | None: ...

    @property
    def tags(self) -> Collection[str] | None:
        """The elements ``take`` may consume (Clark names; the others never reach Python),
        or None for every element."""

    def take(self, element: etree._Element, depth: int) -> bool: ...

    def finish(self, payload: etree._Element) -> object: ...


Handler = Callable[[SoapRequest], Awaitable[SoapResponse]]


@dataclass(frozen=True)
class Operation:
    action: str
    transaction: str
    handler: Handler


@dataclass
class SoapEndpoint:
    path: str
    name: str
    operations: dict[str, Operation]
    # The access-table door of an endpoint at a path of its own (the standard paths are known
    # to the door guard); None = the path decides.
    door: str | None = None

    def add(self, operation: Operation) -> None:
        self.operations[operation.action] = operation


# Runs after dispatch, before the handler (XUA, access policy): raise SoapFault to refuse with a
# fault, return a SoapResponse to answer instead of the handler (a policy refusal shaped as the
# transaction's own Failure), or None to let the handler run.
Authorizer = Callable[[SoapRequest, Operation], Awaitable["SoapResponse | None"]]

# Runs before the body is read (the door guard): return a Response to refuse the caller
# cheaply, or None to go on. It sees only what the connection proved (the peer's certificate).
Admission = Callable[[Request, "SoapEndpoint"], "Response | None"]

# The request being handled, for layers below the handler that act on its behalf (e.g. the
# outbound XUA assertion of the initiating gateway's calls to peers).
CURRENT_REQUEST: contextvars.ContextVar[SoapRequest | None] = contextvars.ContextVar(
    "xca_current_soap_request", default=None
)
# Told about every dispatched request once it is over (audit): (request, transaction,
# response payload or None, fault reason or None, whether the response was fully sent).
Observer = Callable[[SoapRequest, str, etree._Element | None, str | None, bool], None]


class SoapService:
    """The HTTP application serving a set of SOAP endpoints."""

    def __init__(
        self,
        endpoints: list[SoapEndpoint],
        limits: LimitsConfig,
        metrics: GatewayMetrics,
        authorizer: Authorizer | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.admission = admission
        self.observers: list[Observer] = []
        self.endpoints = {e.path: e for e in endpoints}
        self.limits = limits
        self.metrics = metrics
        self.xml_limits = XmlLimits(
            max_bytes=limits.max_xml_bytes,
            max_depth=limits.max_xml_depth,
            max_attribute_bytes=limits.max_attribute_bytes,
            max_text_bytes=limits.max_xml_text_bytes,
            max_elements=limits.max_xml_elements,
            max_attributes=limits.max_xml_attributes,
            max_namespaces=limits.max_xml_namespaces,
        )
        # Large messages are parsed off the event loop, one at a time per source address.
        self.parser = FairParser()
        # Payloads read element by element instead of as a tree, by payload element (Clark
        # notation): the requests of many instances (RAD-69/RAD-75), whose trees would cost
        # more than everything else kept per instance.
        self.payload_readers: dict[str, Callable[[], PayloadReader]] = {}

    def body_limit(self, endpoint: SoapEndpoint) -> int:
        """The largest request body ``endpoint`` reads: small for queries, large otherwise.

        Decided from the operations the endpoint serves, before a byte of the body is read.
        """
        operations = endpoint.operations.values()
        if operations and all(op.transaction in QUERY_TRANSACTIONS for op in operations):
            return min(self.limits.max_query_bytes, self.limits.max_request_bytes)
        return self.limits.max_request_bytes

    async def __call__(self, request: Request) -> Response:
        endpoint = self.endpoints.get(request.path.rstrip("/") or "/")
        if endpoint is None:
            return Response(404, [("content-type", "text/plain")], b"no SOAP endpoint here\n")
        if request.method != "POST":
            return Response(
                405,
                [("content-type", "text/plain"), ("allow", "POST")],
                b"SOAP endpoints accept POST only\n",
            )
        if self.admission is not None:
            refused = self.admission(request, endpoint)
            if refused is not None:
                self.metrics.requests.labels(endpoint.name, "refused").inc()
                return refused
        started = time.monotonic()
        transaction = "unknown"
        relates_to: str | None = None
        attachments: dict[str, mtom.Attachment] = {}
        soap_request: SoapRequest | None = None
        try:
            try:
                envelope, attachments, parsed = await self._read(request, self.body_limit(endpoint))
            except RequestBodyTooSlow as exc:
                raise SoapFault.sender(f"{exc}: too slow", http_status=408) from None
            relates_to = envelope.addressing.message_id
            operation = endpoint.operations.get(envelope.addressing.action)
            if operation is None:
                raise action_not_supported(envelope.addressing.action)
            transaction = operation.transaction
            soap_request = SoapRequest(
                envelope, attachments, request.peer, endpoint, request, parsed=parsed
            )
            CURRENT_REQUEST.set(soap_request)
            try:
                refusal = None
                if self.authorizer is not None:
                    refusal = await self.authorizer(soap_request, operation)
                result = refusal if refusal is not None else await operation.handler(soap_request)
            except SoapFault:
                raise
            except Exception:
                log.exception("%s handler failed", transaction)
                raise SoapFault.receiver("internal error while processing the request") from None
        except SoapFault as fault:
            _close_attachments(attachments)
            if soap_request is not None:
                self._notify(soap_request, transaction, None, fault.reason, False)
            body, content_type = build_fault(fault, relates_to=relates_to)
            self.metrics.requests.labels(transaction, "fault").inc()
            self.metrics.latency.labels(transaction).observe(time.monotonic() - started)
            # A refused body may still be arriving: close instead of reading it to the end.
            return Response(
                fault.http_status,
                [("content-type", content_type)],
                body,
                close=not request.body_consumed,
            )
        return self._respond(result, relates_to, transaction, started, attachments, soap_request)

    def _notify(
        self,
        request: SoapRequest,
        transaction: str,
        payload: etree._Element | None,
        fault: str | None,
        delivered: bool,
    ) -> None:
        _observe_safely(self.observers, request, transaction, payload, fault, delivered)

    async def _read(
        self, request: Request, body_limit: int
    ) -> tuple[Envelope, dict[str, mtom.Attachment], object | None]:
        limits = self.limits
        length = request.content_length
        if length is not None and length > body_limit:
            raise SoapFault.sender(
                f"request body of {length} bytes exceeds the limit of {body_limit}",
                http_status=413,
            )
        content_type = request.header("content-type") or ""
        try:
            media_type, params = mtom.parse_content_type(content_type)
        except mtom.MtomError:
            media_type, params = "", {}
        attachments: dict[str, mtom.Attachment] = {}
        http_action: str | None = None
        count: MarkupCount | None = None
        if media_type == "multipart/related":
            message = await self._read_mtom(request, content_type, body_limit)
            root_bytes = message.root
            attachments = dict(message.attachments)
            http_action = message.action
            del message  # its root bytes are dropped once parsed
        elif media_type in ("application/soap+xml", "text/xml"):
            root_bytes, count = await self._read_xml(request, min(limits.max_xml_bytes, body_limit))
            http_action = params.get("action")
        else:
            raise SoapFault.sender(
                "Content-Type must be application/soap+xml (SOAP 1.2) or multipart/related "
                "(MTOM/XOP)",
                http_status=415,
            )
        reader = self._reader_for(root_bytes)
        try:
            if reader is not None:
                root = await self._parse_pruned(root_bytes, *reader)
            else:
                root = await self.parser.parse(
                    root_bytes,
                    self.xml_limits,
                    count=count,
                    source=source_of(request.peer.address),
                )
            del root_bytes
            envelope = parse_envelope(root, http_action=_usable_action(http_action))
            if media_type == "text/xml" and envelope is not None:
                # text/xml is the SOAP 1.1 binding; a SOAP 1.2 envelope must not use it.
                raise SoapFault("VersionMismatch", "SOAP 1.2 requires application/soap+xml")
            check_xop_references(envelope.root, attachments)
        except XmlRejected as exc:
            _close_attachments(attachments)
            raise SoapFault.sender(exc.reason) from None
        except SoapFault:
            _close_attachments(attachments)
            raise
        parsed = None
        if reader is not None and envelope.payload.tag == reader[0]:
            parsed = reader[1].finish(envelope.payload)
        return envelope, attachments, parsed

    def _reader_for(self, root_bytes: bytes) -> tuple[str, PayloadReader] | None:
        """A payload reader when the message may hold a payload one reads (a cheap look for
        its local name; the reader only takes elements under a payload of its tag)."""
        for tag, factory in self.payload_readers.items():
            if tag.rpartition("}")[2].encode() in root_bytes:
                return tag, factory()
        return None

    async def _parse_pruned(self, data: bytes, tag: str, reader: PayloadReader) -> etree._Element:
        """The envelope with the payload's elements handed to ``reader`` as they complete,
        parsed on the event loop a slice at a time (Python sees every element anyway)."""
        take = in_soap_body(
            reader.take, f"{{{SOAP12}}}Body", payload_tag=tag, max_depth=reader.max_depth
        )
        parser = PrunedXmlParser(self.xml_limits, take, tags=reader.tags)
        view = memoryview(data)
        for start in range(0, len(data), _PARSE_SLICE):
            parser.feed(view[start : start + _PARSE_SLICE])
            if start + _PARSE_SLICE < len(data):
                await asyncio.sleep(0)
        return parser.close()

    async def _read_xml(self, request: Request, limit: int) -> tuple[bytes, MarkupCount]:
        """The SOAP message, its markup counted as it arrives: a flood of elements is refused
        as soon as the count passes the limit, without reading (or holding) the rest."""
        data = bytearray()
        counter = MarkupCounter()
        async for chunk in request.body():
            data += chunk
            if len(data) > limit:
                raise SoapFault.sender(
                    f"SOAP message exceeds the limit of {limit} bytes", http_status=413
                )
            counter.feed(chunk)
            try:
                check_markup(counter.count, self.xml_limits)
            except XmlRejected as exc:
                raise SoapFault.sender(exc.reason) from None
        return bytes(data), counter.count

    async def _read_mtom(
        self, request: Request, content_type: str, body_limit: int
    ) -> mtom.MtomMessage:
        limits = self.limits
        try:
            reader = mtom.MtomRequestReader(
                content_type,
                max_root_bytes=min(limits.max_xml_bytes, body_limit),
                max_part_bytes=body_limit,
                max_total_bytes=body_limit,
                max_parts=limits.max_mime_parts,
                spool_threshold=limits.spool_threshold,
                spool_dir=str(limits.spool_dir) if limits.spool_dir else None,
            )
        except mtom.MtomError as exc:
            raise SoapFault.sender(f"invalid MTOM message: {exc.reason}") from None
        try:
            async for chunk in request.body():
                reader.feed(chunk)
            return reader.close()
        except mtom.MtomError as exc:
            reader.abort()
            # Only a size or count limit is "too large"; anything else is a malformed message.
            size_limits = ("exceeds", "too many", "too large")
            status = 413 if any(word in exc.reason for word in size_limits) else 400
            raise SoapFault.sender(
                f"invalid MTOM message: {exc.reason}", http_status=status
            ) from None
        except BaseException:
            reader.abort()
            raise

    def _respond(
        self,
        result: SoapResponse,
        relates_to: str | None,
        transaction: str,
        started: float,
        attachments: dict[str, mtom.Attachment],
        soap_request: SoapRequest,
    ) -> Response:
        envelope = build_envelope(result.payload, action=result.action, relates_to=relates_to)
        root: bytes | Iterable[bytes]
        if result.streamed is not None:
            holder = result.streamed.holder
            head, tail = serialize_around(envelope, result.payload if holder is None else holder)
            root = itertools.chain((head,), result.streamed.chunks(), (tail,))
        else:
            root = serialize(envelope)
        metrics = self.metrics

        def complete(ok: bool) -> None:
            _close_attachments(attachments)
            self._notify(soap_request, transaction, result.payload, None, ok)
            outcome = result.outcome if ok else "aborted"
            metrics.requests.labels(transaction, outcome).inc()
            metrics.latency.labels(transaction).observe(time.monotonic() - started)

        if result.mtom or result.parts:
            writer = mtom.MtomWriter(root, action=result.action)
            for part in result.parts:
                writer.add_part(part)
            if result.streamed is not None and result.streamed.parts is not None:
                writer.add_parts(result.streamed.parts())
            # Counted per megabyte, not per piece: the counter takes a lock each time.
            counter = metrics.bytes_sent.labels(transaction)
            body = writer.aiter_bytes(count=counter.inc, count_every=_COUNT_EVERY)
            return Response(
                200, [("content-type", writer.content_type)], body, on_complete=complete
            )
        xml = root if isinstance(root, bytes) else b"".join(root)
        metrics.bytes_sent.labels(transaction).inc(len(xml))
        content_type = f'application/soap+xml; charset=UTF-8; action="{result.action}"'
        return Response(200, [("content-type", content_type)], xml, on_complete=complete)


def _observe_safely(
    observers: list[Observer],
    request: SoapRequest,
    transaction: str,
    payload: etree._Element | None,
    fault: str | None,
    delivered: bool,
) -> None:
    for observer in observers:
        try:
            observer(request, transaction, payload, fault, delivered)
        except Exception:  # an observer (audit) must never break the response
            log.exception("request observer failed")


def _usable_action(value: str | None) -> str | None:
    """The Content-Type action parameter, if it can be compared with wsa:Action.

    Some SOAP stacks send a placeholder (zeep sends ``action="None"`` when the WSDL has no
    soapAction, as the IHE WSDLs do). Only an absolute URI is taken as a real claim.
    """
    if value and ":" in value:
        return value
    return None


def _close_attachments(attachments: Mapping[str, mtom.Attachment]) -> None:
    for attachment in attachments.values():
        try:
            attachment.file.close()
        except Exception:  # pragma: no cover - closing a temp file
            log.debug("closing attachment failed", exc_info=True)
