"""Outbound SOAP calls to peer communities: one shared client per gateway.

The shared client (:class:`xca_gateway.protocol.http_client.RelayClient`: h11 over asyncio TLS, lean
enough that a fan-out to many peers writes every request within a millisecond or two) carries
the gateway's certificate (mutual TLS, ITI-19), pools connections per peer, and every call runs
under a deadline that bounds the whole exchange (connect, send, wait, read), not just each
socket operation. Peers are untrusted: their replies go through the same safe XML parser and
MTOM limits as inbound requests.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lxml import etree

from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol import mtom
from xca_gateway.protocol.http_client import (
    RelayClient,
    RelayConnectError,
    RelayError,
    RelayResponse,
)
from xca_gateway.protocol.soap import (
    EnvelopeTemplate,
    Fault,
    build_envelope,
    envelope_template,
    read_fault,
    serialize,
)
from xca_gateway.protocol.xmlsafe import XmlLimits, XmlRejected, parse_xml_async
from xca_gateway.settings import OutboundConfig

# (url, action, payload) -> SOAP header blocks to add to an outbound request.
HeaderProvider = Callable[[str, str, etree._Element], Sequence[etree._Element]]
# (url, action, request payload, reply payload or None, error or None, facts or None), after
# every call. Facts: what a caller that never built its messages as trees (a streamed imaging
# retrieve) says about them instead (an ``xca_gateway.audit.exchange.ImagingFacts``).
CallObserver = Callable[
    [str, str, etree._Element, etree._Element | None, str | None, object | None], None
]


# Submissions must not be sent twice, so they never go over a pooled connection that might
# have been closed under them (queries and retrieves may be, and are retried once if so).
_NOT_IDEMPOTENT = frozenset(
    {
        "urn:ihe:iti:2007:RegisterDocumentSet-b",
        "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b",
    }
)


class PeerError(Exception):
    """A call to a peer failed; ``kind`` is timeout | connect | tls | http | fault | malformed."""

    def __init__(self, kind: str, message: str, fault: Fault | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fault = fault


@dataclass
class SoapReply:
    status_code: int
    envelope: etree._Element
    payload: etree._Element
    attachments: dict[str, mtom.Attachment] = field(default_factory=dict)

    def close(self) -> None:
        for attachment in self.attachments.values():
            attachment.file.close()


class SharedRequest:
    """One request payload for many peers (a fan-out's ITI-38): its envelope is serialised
    once, each call fills in only its wsa:MessageID and wsa:To. A call with header blocks of
    its own (an XUA assertion for that peer) builds its envelope from a copy instead."""

    def __init__(self, payload: etree._Element, action: str) -> None:
        self.payload = copy.deepcopy(payload)  # kept out of the template's envelope
        self.action = action
        self.template: EnvelopeTemplate = envelope_template(
            payload, action=action, reply_to_anonymous=True
        )


class PeerClient:
    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        outbound: OutboundConfig,
        metrics: GatewayMetrics | None = None,
        *,
        xml_limits: XmlLimits | None = None,
        max_response_bytes: int = 4 * 1024 * 1024 * 1024,
    ) -> None:
        self.outbound = outbound
        self.metrics = metrics
        self.xml_limits = xml_limits or XmlLimits()
        self.max_response_bytes = max_response_bytes
        self.header_provider: HeaderProvider | None = None
        self.observers: list[CallObserver] = []
        # host:port -> SHA-256 (hex) of the certificate that peer must present (pinning).
        self.pins: dict[str, str] = {}
        # host:port -> the certificate (DER) that peer presented last: its expiry is shown on
        # the operator page and exported as a metric.
        self.peer_certificates: dict[str, bytes] = {}
        self.ssl_context = ssl_context
        # Streamed relays (imaging) use a lean client: see xca_gateway.protocol.http_client.
        self.relay = RelayClient(
            ssl_context,
            connect_timeout=outbound.connect_timeout,
            max_idle_per_origin=outbound.max_keepalive_connections,
            max_connections=outbound.max_connections,
        )

    def pin(self, url: str, sha256_hex: str) -> None:
        """Accept only this certificate at ``url``'s host and port (on top of the CA check)."""
        self.pins[urlsplit(url).netloc] = sha256_hex.replace(":", "").lower()

    def check_pin_der(self, url: str, der: bytes | None) -> None:
        """Raise PeerError if the peer at ``url`` is pinned and presented another certificate
        (``der``, as the TLS handshake gave it)."""
        netloc = urlsplit(url).netloc
        if der:
            self.peer_certificates[netloc] = der
        expected = self.pins.get(netloc)
        if expected is None:
            return
        if not der or hashlib.sha256(der).hexdigest() != expected:
            raise PeerError("tls", f"{url}: the peer's certificate is not the one pinned for it")

    def set_header_provider(self, provider: HeaderProvider | None) -> None:
        self.header_provider = provider

    async def aclose(self) -> None:
        await self.relay.aclose()

    async def call(
        self,
        url: str,
        payload: etree._Element | SharedRequest,
        action: str,
        *,
        peer: str = "",
        transaction: str = "",
        deadline: float | None = None,
        parts: Sequence[mtom.OutgoingPart] = (),
        use_mtom: bool = False,
        extra_headers: Sequence[etree._Element] = (),
    ) -> SoapReply:
        """POST ``payload`` to ``url`` and return the parsed reply or raise :class:`PeerError`.

        ``extra_headers`` are SOAP header blocks to add, e.g. a WS-Security header with an
        XUA assertion; a header provider installed with :meth:`set_header_provider` adds its
        blocks to every call. A :class:`SharedRequest` is sent from its template unless
        there are such blocks.
        """
        shared = payload if isinstance(payload, SharedRequest) else None
        request = payload.payload if isinstance(payload, SharedRequest) else payload
        headers_out = [*extra_headers]
        if self.header_provider is not None:
            headers_out.extend(self.header_provider(url, action, request))
        if shared is not None and not headers_out and shared.action == action:
            xml = shared.template.render(url)
        else:
            body = copy.deepcopy(request) if shared is not None else request
            envelope = build_envelope(
                body, action=action, to=url, reply_to_anonymous=True, extra_headers=headers_out
            )
            xml = serialize(envelope)
        headers: dict[str, str]
        content: bytes | AsyncIterator[bytes]
        if use_mtom or parts:
            writer = mtom.MtomWriter(xml, action=action)
            for part in parts:
                writer.add_part(part)
            headers = {"content-type": writer.content_type}
            if any(isinstance(p.body, AsyncIterable) for p in parts):
                content = writer.aiter_bytes()  # streamed (chunked)
            else:
                content = b"".join(writer.iter_bytes())
        else:
            headers = {"content-type": f'application/soap+xml; charset=UTF-8; action="{action}"'}
            content = xml
        started = time.monotonic()
        outcome = "error"
        reply: SoapReply | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(deadline or self.outbound.request_timeout):
                reply = await self._exchange(url, headers, content, action)
            outcome = "success"
            return reply
        except TimeoutError:
            outcome = "timeout"
            error = f"{peer or url} did not answer in time"
            raise PeerError("timeout", error) from None
        except PeerError as exc:
            outcome = exc.kind
            error = f"{exc.kind}: {exc.message}"
            raise
        finally:
            for observer in self.observers:
                try:
                    observer(url, action, request, reply.payload if reply else None, error, None)
                except Exception:  # an observer (audit) must never break the call
                    logging.getLogger(__name__).exception("outbound call observer failed")
            if self.metrics is not None and peer:
                # A SOAP fault still proves the peer is reachable and speaking SOAP.
                up = outcome in ("success", "fault")
                self.metrics.peer_up.labels(peer).set(1 if up else 0)
                self.metrics.peer_requests.labels(peer, transaction, outcome).inc()
                self.metrics.peer_latency.labels(peer, transaction).observe(
                    time.monotonic() - started
                )

    async def _exchange(
        self,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterator[bytes],
        action: str,
    ) -> SoapReply:
        try:
            response = await self.relay.post(
                url, content, list(headers.items()), idempotent=action not in _NOT_IDEMPOTENT
            )
            try:
                self.check_pin_der(url, response.peer_certificate)
                return await self._read_reply(response)
            finally:
                await response.aclose()
        except RelayConnectError as exc:
            kind = "tls" if exc.tls else "connect"
            raise PeerError(kind, f"cannot connect to {url}: {exc}") from None
        except RelayError as exc:
            # With TLS 1.3 a refused client certificate surfaces on the first read, not in
            # the handshake.
            if exc.tls:
                raise PeerError("tls", f"TLS with {url} failed: {exc}") from None
            raise PeerError("connect", f"transport error with {url}: {exc}") from None

    async def _read_reply(self, response: RelayResponse) -> SoapReply:
        content_type = response.headers.get("content-type", "")
        attachments: dict[str, mtom.Attachment] = {}
        if mtom.is_mtom(content_type):
            try:
                reader = mtom.MtomRequestReader(
                    content_type,
                    max_root_bytes=self.xml_limits.max_bytes,
                    max_part_bytes=self.max_response_bytes,
                    max_total_bytes=self.max_response_bytes,
                    max_parts=100_000,
                )
                async for chunk in response.aiter_raw():
                    reader.feed(chunk)
                message = reader.close()
            except mtom.MtomError as exc:
                raise PeerError("malformed", f"invalid MTOM reply: {exc.reason}") from None
            root_bytes = message.root
            attachments = dict(message.attachments)
        else:
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > self.xml_limits.max_bytes:
                    raise PeerError("malformed", "reply larger than the XML limit")
            root_bytes = bytes(data)
        try:
            root = await parse_xml_async(root_bytes, self.xml_limits)
        except XmlRejected as exc:
            for a in attachments.values():
                a.file.close()
            raise PeerError(
                "malformed" if response.status_code < 400 else "http",
                f"HTTP {response.status_code}, unreadable reply: {exc.reason}",
            ) from None
        fault = read_fault(root)
        if fault is not None:
            for a in attachments.values():
                a.file.close()
            raise PeerError("fault", f"SOAP fault {fault.code}: {fault.reason}", fault)
        body = root.find("{http://www.w3.org/2003/05/soap-envelope}Body")
        payload = (
            next((c for c in body if isinstance(c.tag, str)), None) if body is not None else None
        )
        if payload is None or response.status_code >= 400:
            for a in attachments.values():
                a.file.close()
            raise PeerError("http", f"HTTP {response.status_code} without a SOAP payload")
        return SoapReply(response.status_code, root, payload, attachments)
