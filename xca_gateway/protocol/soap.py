"""SOAP 1.2 envelopes with WS-Addressing 1.0: parse, build, and faults (sans-IO).

The IHE web-service transactions (ITI TF-2 Appendix V) use SOAP 1.2, WS-Addressing with
``mustUnderstand`` on ``wsa:Action``, and synchronous exchanges (``ReplyTo`` anonymous).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from xml.sax.saxutils import escape as xml_escape

from lxml import etree

from xca_gateway.protocol.mtom import cid_from_href
from xca_gateway.protocol.namespaces import (
    SOAP11,
    SOAP12,
    SOAP_FAULT_ACTION,
    WSA,
    WSA_ANONYMOUS,
    WSA_FAULT_ACTION,
    WSSE,
    XOP,
)

# Header blocks we accept with mustUnderstand: WS-Addressing is processed here; WS-Security is
# read by the XUA layer (a receiver that does not require XUA must still not fault on it).
UNDERSTOOD_HEADER_NAMESPACES = frozenset({WSA, WSSE})
_ULTIMATE_RECEIVER_ROLES = frozenset(
    {
        None,
        "",
        f"{SOAP12}/role/ultimateReceiver",
        "http://www.w3.org/2003/05/soap-envelope/role/next",
    }
)


def new_message_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


class SoapFault(Exception):
    """A SOAP 1.2 fault to send back. ``code`` is the env:Code value (local name)."""

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        subcode: tuple[str, str] | None = None,
        detail: etree._Element | None = None,
        action: str = SOAP_FAULT_ACTION,
        http_status: int | None = None,
        soap11: bool = False,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.subcode = subcode
        self.detail = detail
        self.action = action
        self.soap11 = soap11
        # SOAP 1.2 HTTP binding (Part 2, table 20): Sender faults are 400, all others 500.
        self.http_status = http_status or (400 if code == "Sender" else 500)

    @classmethod
    def sender(cls, reason: str, **kw: object) -> SoapFault:
        return cls("Sender", reason, **kw)  # type: ignore[arg-type]

    @classmethod
    def receiver(cls, reason: str, **kw: object) -> SoapFault:
        return cls("Receiver", reason, **kw)  # type: ignore[arg-type]


def addressing_fault(subcode: str, reason: str, detail: etree._Element | None = None) -> SoapFault:
    return SoapFault(
        "Sender", reason, subcode=(WSA, subcode), detail=detail, action=WSA_FAULT_ACTION
    )


def action_not_supported(action: str) -> SoapFault:
    detail = etree.Element(f"{{{SOAP12}}}Detail")
    problem = etree.SubElement(detail, f"{{{WSA}}}ProblemAction")
    etree.SubElement(problem, f"{{{WSA}}}Action").text = action
    return addressing_fault(
        "ActionNotSupported", f"The action {action!r} is not supported at this endpoint", detail
    )


@dataclass(frozen=True)
class Addressing:
    action: str
    message_id: str | None = None
    to: str | None = None
    reply_to: str | None = None
    relates_to: str | None = None


@dataclass
class Envelope:
    """A received SOAP 1.2 envelope. ``payload`` is the single child of env:Body."""

    root: etree._Element
    header: etree._Element | None
    payload: etree._Element
    addressing: Addressing

    def header_blocks(self, namespace: str, local_name: str) -> list[etree._Element]:
        if self.header is None:
            return []
        return list(self.header.iterchildren(f"{{{namespace}}}{local_name}"))


def _is_element(node: etree._Element) -> bool:
    # Comments and processing instructions are nodes too; their tag is not a string.
    tag: Any = node.tag
    return isinstance(tag, str)


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip() in ("1", "true")


def _single_wsa(header: etree._Element, name: str) -> str | None:
    found = list(header.iterchildren(f"{{{WSA}}}{name}"))
    if len(found) > 1:
        detail = etree.Element(f"{{{SOAP12}}}Detail")
        etree.SubElement(detail, f"{{{WSA}}}ProblemHeaderQName").text = f"wsa:{name}"
        raise addressing_fault("InvalidAddressingHeader", f"duplicate wsa:{name} header", detail)
    if not found:
        return None
    element = found[0]
    if name in ("ReplyTo", "FaultTo"):
        address = element.find(f"{{{WSA}}}Address")
        return (address.text or "").strip() if address is not None else None
    return (element.text or "").strip()


def parse_envelope(root: etree._Element, *, http_action: str | None = None) -> Envelope:
    """Validate the SOAP 1.2 + WS-Addressing structure of a parsed request."""
    if root.tag == f"{{{SOAP11}}}Envelope":
        raise SoapFault("VersionMismatch", "SOAP 1.1 is not supported; use SOAP 1.2", soap11=True)
    if root.tag != f"{{{SOAP12}}}Envelope":
        raise SoapFault("VersionMismatch", "the document is not a SOAP 1.2 envelope")
    header: etree._Element | None = None
    body: etree._Element | None = None
    for child in root:
        if not _is_element(child):
            continue
        if child.tag == f"{{{SOAP12}}}Header" and header is None and body is None:
            header = child
        elif child.tag == f"{{{SOAP12}}}Body" and body is None:
            body = child
        else:
            raise SoapFault.sender(f"unexpected element {child.tag} in env:Envelope")
    if body is None:
        raise SoapFault.sender("env:Body is missing")
    payloads = [c for c in body if _is_element(c)]
    if len(payloads) != 1:
        raise SoapFault.sender("env:Body must contain exactly one element")
    if header is None:
        raise addressing_fault("MessageAddressingHeaderRequired", "wsa:Action header is required")

    not_understood = []
    for block in header:
        if not _is_element(block):
            continue
        role = block.get(f"{{{SOAP12}}}role")
        if not _is_true(block.get(f"{{{SOAP12}}}mustUnderstand")):
            continue
        if role not in _ULTIMATE_RECEIVER_ROLES:
            continue
        if etree.QName(block).namespace not in UNDERSTOOD_HEADER_NAMESPACES:
            not_understood.append(block.tag)
    if not_understood:
        raise SoapFault(
            "MustUnderstand", f"header block(s) not understood: {', '.join(not_understood)}"
        )

    action = _single_wsa(header, "Action")
    if not action:
        raise addressing_fault("MessageAddressingHeaderRequired", "wsa:Action header is required")
    if http_action and http_action != action:
        raise addressing_fault(
            "ActionMismatch", "the action parameter of the Content-Type differs from wsa:Action"
        )
    reply_to = _single_wsa(header, "ReplyTo")
    if reply_to and reply_to != WSA_ANONYMOUS:
        raise addressing_fault(
            "OnlyAnonymousAddressSupported",
            "only synchronous exchanges (anonymous wsa:ReplyTo) are supported",
        )
    addressing = Addressing(
        action=action,
        message_id=_single_wsa(header, "MessageID"),
        to=_single_wsa(header, "To"),
        reply_to=reply_to,
        relates_to=_single_wsa(header, "RelatesTo"),
    )
    return Envelope(root=root, header=header, payload=payloads[0], addressing=addressing)


def _wsa_header(
    parent: etree._Element, name: str, text: str, must_understand: bool = False
) -> None:
    el = etree.SubElement(parent, f"{{{WSA}}}{name}")
    el.text = text
    if must_understand:
        el.set(f"{{{SOAP12}}}mustUnderstand", "true")


def build_envelope(
    payload: etree._Element,
    *,
    action: str,
    relates_to: str | None = None,
    message_id: str | None = None,
    to: str | None = None,
    reply_to_anonymous: bool = False,
    extra_headers: Iterable[etree._Element] = (),
) -> etree._Element:
    nsmap = {"soap": SOAP12, "wsa": WSA}
    env = etree.Element(f"{{{SOAP12}}}Envelope", nsmap=nsmap)
    header = etree.SubElement(env, f"{{{SOAP12}}}Header")
    _wsa_header(header, "Action", action, must_understand=True)
    _wsa_header(header, "MessageID", message_id or new_message_id())
    if reply_to_anonymous:
        reply = etree.SubElement(header, f"{{{WSA}}}ReplyTo")
        etree.SubElement(reply, f"{{{WSA}}}Address").text = WSA_ANONYMOUS
    if relates_to:
        _wsa_header(header, "RelatesTo", relates_to)
    if to:
        _wsa_header(header, "To", to, must_understand=True)
    for block in extra_headers:
        header.append(block)
    body = etree.SubElement(env, f"{{{SOAP12}}}Body")
    body.append(payload)
    return env


def serialize(element: etree._Element) -> bytes:
    return etree.tostring(element, xml_declaration=True, encoding="UTF-8")


# Where a template's per-call values go (the header blocks precede the Body, so the first
# occurrence of each marker is ours whatever the payload holds).
_MESSAGE_ID_MARKER = "urn:xca-gateway:template:message-id"
_TO_MARKER = "urn:xca-gateway:template:to"


@dataclass(frozen=True)
class EnvelopeTemplate:
    """A request envelope serialised once for many endpoints (a fan-out): only wsa:MessageID
    and wsa:To differ from one call to the next, and they are filled into the bytes."""

    head: bytes
    middle: bytes
    tail: bytes

    def render(self, to: str, message_id: str | None = None) -> bytes:
        return b"".join(
            (
                self.head,
                xml_escape(message_id or new_message_id()).encode(),
                self.middle,
                xml_escape(to).encode(),
                self.tail,
            )
        )


def envelope_template(
    payload: etree._Element,
    *,
    action: str,
    reply_to_anonymous: bool = False,
    extra_headers: Iterable[etree._Element] = (),
) -> EnvelopeTemplate:
    """:func:`build_envelope` + :func:`serialize` once; ``render`` gives each call's bytes.

    ``payload`` is moved into the template's envelope, as :func:`build_envelope` does."""
    envelope = build_envelope(
        payload,
        action=action,
        message_id=_MESSAGE_ID_MARKER,
        to=_TO_MARKER,
        reply_to_anonymous=reply_to_anonymous,
        extra_headers=extra_headers,
    )
    head, _, rest = serialize(envelope).partition(_MESSAGE_ID_MARKER.encode())
    middle, _, tail = rest.partition(_TO_MARKER.encode())
    return EnvelopeTemplate(head, middle, tail)


# Where a payload's streamed children go in its serialised envelope.
_STREAM_MARKER = "xca-gateway:streamed-children"


def serialize_around(envelope: etree._Element, holder: etree._Element) -> tuple[bytes, bytes]:
    """``envelope`` serialised and cut where children written straight to bytes go: after
    ``holder``'s own children (a retrieve's DocumentResponses, 20,000 of them, are not built
    as a tree). The streamed children use the prefixes ``holder`` (or its ancestors)
    declares."""
    marker = etree.Comment(_STREAM_MARKER)
    holder.append(marker)
    try:
        xml = serialize(envelope)
    finally:
        holder.remove(marker)
    head, found, tail = xml.partition(f"<!--{_STREAM_MARKER}-->".encode())
    if not found:  # pragma: no cover - the comment is always serialised
        raise ValueError("holder is not inside the envelope")
    return head, tail


def build_fault(fault: SoapFault, *, relates_to: str | None = None) -> tuple[bytes, str]:
    """Return (body, content type) for ``fault``."""
    if fault.soap11:
        return _build_soap11_version_mismatch(fault), "text/xml; charset=utf-8"
    env = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"soap": SOAP12, "wsa": WSA})
    header = etree.SubElement(env, f"{{{SOAP12}}}Header")
    if fault.code == "VersionMismatch":
        _append_upgrade(header, SOAP12)
    _wsa_header(header, "Action", fault.action, must_understand=True)
    _wsa_header(header, "MessageID", new_message_id())
    if relates_to:
        _wsa_header(header, "RelatesTo", relates_to)
    body = etree.SubElement(env, f"{{{SOAP12}}}Body")
    f = etree.SubElement(body, f"{{{SOAP12}}}Fault")
    code = etree.SubElement(f, f"{{{SOAP12}}}Code")
    etree.SubElement(code, f"{{{SOAP12}}}Value").text = f"soap:{fault.code}"
    if fault.subcode is not None:
        ns, local = fault.subcode
        sub = etree.SubElement(code, f"{{{SOAP12}}}Subcode")
        value = etree.SubElement(sub, f"{{{SOAP12}}}Value", nsmap={"fc": ns} if ns != WSA else None)
        value.text = f"{'wsa' if ns == WSA else 'fc'}:{local}"
    reason = etree.SubElement(f, f"{{{SOAP12}}}Reason")
    text = etree.SubElement(reason, f"{{{SOAP12}}}Text")
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    text.text = fault.reason
    if fault.detail is not None:
        detail = fault.detail
        if detail.tag != f"{{{SOAP12}}}Detail":
            wrapper = etree.Element(f"{{{SOAP12}}}Detail")
            wrapper.append(detail)
            detail = wrapper
        f.append(detail)
    return serialize(env), "application/soap+xml; charset=utf-8"


def _append_upgrade(header: etree._Element, upgrade_ns: str) -> None:
    upgrade = etree.SubElement(header, f"{{{SOAP12}}}Upgrade", nsmap={"soap12": SOAP12})
    supported = etree.SubElement(upgrade, f"{{{SOAP12}}}SupportedEnvelope")
    supported.set("qname", "soap12:Envelope")


def _build_soap11_version_mismatch(fault: SoapFault) -> bytes:
    # SOAP 1.2 Part 1 appendix A: answer a SOAP/1.1 message with a SOAP/1.1 VersionMismatch
    # fault carrying an Upgrade header that names the SOAP 1.2 envelope.
    env = etree.Element(f"{{{SOAP11}}}Envelope", nsmap={"SOAP-ENV": SOAP11})
    header = etree.SubElement(env, f"{{{SOAP11}}}Header")
    _append_upgrade(header, SOAP12)
    body = etree.SubElement(env, f"{{{SOAP11}}}Body")
    f = etree.SubElement(body, f"{{{SOAP11}}}Fault")
    etree.SubElement(f, "faultcode").text = "SOAP-ENV:VersionMismatch"
    etree.SubElement(f, "faultstring").text = fault.reason
    return serialize(env)


@dataclass
class Fault:
    """A fault as read back from a response (client side)."""

    code: str
    subcodes: list[str] = field(default_factory=list)
    reason: str = ""


def read_fault(root: etree._Element) -> Fault | None:
    body = root.find(f"{{{SOAP12}}}Body")
    if body is None:
        body = root.find(f"{{{SOAP11}}}Body")
        if body is not None and (f11 := body.find(f"{{{SOAP11}}}Fault")) is not None:
            return Fault(
                code=(f11.findtext("faultcode") or ""), reason=f11.findtext("faultstring") or ""
            )
        return None
    f = body.find(f"{{{SOAP12}}}Fault")
    if f is None:
        return None
    code = f.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value") or ""
    subcodes = [
        (v.text or "").strip() for v in f.iterfind(f".//{{{SOAP12}}}Subcode/{{{SOAP12}}}Value")
    ]
    reason = f.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text") or ""
    return Fault(code=code.strip(), subcodes=subcodes, reason=reason.strip())


class AttachmentLike(Protocol):
    content_id: str
    content_type: str
    size: int

    def read_all(self) -> bytes: ...


def xop_includes(root: etree._Element) -> list[etree._Element]:
    return list(root.iter(f"{{{XOP}}}Include"))


def check_xop_references(root: etree._Element, attachments: Mapping[str, object]) -> None:
    """Every xop:Include must point at a part of the message (else a Sender fault)."""

    for include in xop_includes(root):
        href = include.get("href") or ""
        if not href.startswith("cid:"):
            raise SoapFault.sender("xop:Include href must be a cid: URL")
        if cid_from_href(href) not in attachments:
            raise SoapFault.sender(f"xop:Include refers to a missing MIME part: {href}")


def element_content(
    element: etree._Element, attachments: Mapping[str, AttachmentLike]
) -> AttachmentLike | bytes:
    """Return the bytes of a base64Binary element, whether inline or an XOP attachment."""

    include = element.find(f"{{{XOP}}}Include")
    if include is not None:
        cid = cid_from_href(include.get("href") or "")
        try:
            return attachments[cid]
        except KeyError:
            raise SoapFault.sender(f"xop:Include refers to a missing MIME part: {cid}") from None
    try:
        return base64.b64decode("".join((element.text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise SoapFault.sender(f"{etree.QName(element).localname} is not valid base64") from None
