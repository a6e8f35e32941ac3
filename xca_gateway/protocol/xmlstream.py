"""Incremental parsing of untrusted XML in which repeated elements are consumed and dropped.

A retrieve of 20,000 SOP instances is a SOAP message of 20,000 ``DocumentRequest`` (or
``DocumentResponse``) elements: as an lxml tree that is some 1.5 KB per instance, more than
everything else the gateway keeps for the instance in flight. :class:`PrunedXmlParser` parses
such a message as it arrives and hands each element its ``take`` callback wants to a reader as
soon as the element is complete; the reader keeps compact records (slotted dataclasses, shared
strings) and the element is removed from the tree. What remains is a *skeleton*: the envelope,
its header and the payload element with whatever was not taken (status, RegistryErrors, the
TransferSyntaxUIDList), which the usual tree functions read as before.

The defences are those of :mod:`xca_gateway.protocol.xmlsafe`, applied as the bytes arrive: the
byte limit; no DTD (the prolog is scanned before libxml2 sees the document, and libxml2 runs
without entity resolution, DTD loading or network); the markup counted in each chunk before it
is parsed, so an element or attribute flood is refused before anything is built; depth,
attributes per element and attribute size checked on each start tag (the attribute count
first: reading many attribute values from Python is quadratic), text size on each end tag, and
the skeleton checked once more at the end with xmlsafe's XPath walk. The parser is plain
bookkeeping over bytes fed to it (sans-IO): callers feed chunks from a socket, a buffer, or
(:func:`walk_tree`) run the same reader over a tree built elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lxml import etree

from xca_gateway.protocol.xmlsafe import (
    _NAMESPACE_DECLARATION,
    MarkupCounter,
    XmlLimits,
    XmlRejected,
    _violation,
    check_markup,
    check_no_dtd,
)

__all__ = ["PrunedXmlParser", "Take", "in_soap_body", "local_name", "walk_tree"]

# The prolog is inspected before libxml2 sees a byte (what check_no_dtd reads).
_PROLOG_BYTES = 8192

# Called with each complete element and its depth (the root is 0, its children 1); True: the
# element was consumed and is removed from the tree.
Take = Callable[[etree._Element, int], bool]


def local_name(element: etree._Element) -> str:
    """The local name of an element ("" for comments and processing instructions)."""
    tag: object = element.tag
    if not isinstance(tag, str):
        return ""
    return tag.rpartition("}")[2]


class PrunedXmlParser:
    """Feed bytes, get the skeleton tree from :meth:`close`; raises :class:`XmlRejected`."""

    def __init__(self, limits: XmlLimits, take: Take) -> None:
        self.limits = limits
        self._take = take
        self._parser = etree.XMLPullParser(
            events=("start", "end"),
            resolve_entities=False,
            load_dtd=False,
            dtd_validation=False,
            no_network=True,
            huge_tree=False,
            remove_blank_text=False,
        )
        self._counter = MarkupCounter()
        self._namespaces: set[bytes] = set()
        self._head: bytearray | None = bytearray()
        self._size = 0
        self._depth = 0
        # The last consumed element: removed once the parser has moved past it (removing the
        # element of the current end event would be removing under libxml2's feet).
        self._consumed: etree._Element | None = None
        self.taken = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        chunk = bytes(data)
        if not chunk:
            return
        self._size += len(chunk)
        if self._size > self.limits.max_bytes:
            raise XmlRejected(f"XML document larger than {self.limits.max_bytes} bytes")
        self._count(chunk)
        if self._head is not None:
            self._head += chunk
            if len(self._head) < _PROLOG_BYTES:
                return
            chunk, self._head = bytes(self._head), None
            check_no_dtd(chunk)
        self._parse(chunk)

    def close(self) -> etree._Element:
        """The skeleton: the document without the consumed elements."""
        if self._head is not None:
            head, self._head = bytes(self._head), None
            if not head.strip():
                raise XmlRejected("empty XML document")
            check_no_dtd(head)
            self._parse(head)
        try:
            root = self._parser.close()
        except etree.XMLSyntaxError as exc:
            raise XmlRejected(f"malformed XML: {exc.msg}") from None
        self._handle_events()
        self._drop_consumed()
        docinfo: Any = root.getroottree().docinfo
        if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
            raise XmlRejected("document type declarations (DTD) are not accepted")
        reason = _violation(root, self.limits)
        if reason is not None:
            raise XmlRejected(reason)
        return root

    def _count(self, chunk: bytes) -> None:
        self._counter.feed(chunk)
        count = self._counter.count
        check_markup(count, self.limits)
        if count.xmlns > 64:  # as xmlsafe: distinct declarations only looked at when many
            for match in _NAMESPACE_DECLARATION.finditer(chunk):
                self._namespaces.add(match.group(0))
                if len(self._namespaces) > self.limits.max_namespaces:
                    raise XmlRejected(
                        f"XML document declares more than {self.limits.max_namespaces} namespaces"
                    )

    def _parse(self, chunk: bytes) -> None:
        try:
            self._parser.feed(chunk)
        except etree.XMLSyntaxError as exc:
            raise XmlRejected(f"malformed XML: {exc.msg}") from None
        self._handle_events()

    def _handle_events(self) -> None:
        limits = self.limits
        events: Iterable[tuple[str, Any]] = self._parser.read_events()
        for event, element in events:
            if event == "start":
                self._depth += 1
                if self._depth > limits.max_depth:
                    raise XmlRejected(f"XML nesting deeper than {limits.max_depth}")
                attributes = len(element.attrib)  # a C count; values only when few
                if attributes > limits.max_attributes:
                    raise XmlRejected(
                        f"XML element with more than {limits.max_attributes} attributes"
                    )
                if attributes and any(
                    len(v) > limits.max_attribute_bytes for v in element.values()
                ):
                    raise XmlRejected("XML attribute value too large")
                continue
            depth = self._depth
            self._depth -= 1
            text = element.text
            if text is not None and len(text) > limits.max_text_bytes:
                raise XmlRejected("XML text node too large")
            if self._take(element, depth - 1):
                self.taken += 1
                self._drop_consumed()
                element.clear()  # and its tail: a removed element takes its tail along
                self._consumed = element

    def _drop_consumed(self) -> None:
        consumed, self._consumed = self._consumed, None
        if consumed is not None:
            parent = consumed.getparent()
            if parent is not None:
                parent.remove(consumed)


def in_soap_body(
    take: Take, body_tag: str, *, payload_tag: str | None = None, max_depth: int | None = None
) -> Take:
    """``take`` for the elements inside the payload of a SOAP envelope (of ``payload_tag``,
    if given), with their depth counted from the payload (its children are 1); anything else
    (header blocks, another payload) is left. Elements deeper than ``max_depth`` (what
    ``take`` never consumes, e.g. the children of a DocumentRequest) are not looked at."""
    deepest = 1 << 30 if max_depth is None else max_depth + 2

    def take_in_body(element: etree._Element, depth: int) -> bool:
        if depth < 3 or depth > deepest:
            return False
        payload: etree._Element | None = element
        for _ in range(depth - 2):
            payload = payload.getparent() if payload is not None else None
        body = payload.getparent() if payload is not None else None
        if body is None or body.tag != body_tag:
            return False
        if payload_tag is not None and payload is not None and payload.tag != payload_tag:
            return False
        return take(element, depth - 2)

    return take_in_body


def walk_tree(root: etree._Element, take: Take) -> None:
    """Run ``take`` over a tree built elsewhere, in the order :class:`PrunedXmlParser` would
    (each element when complete); nothing is removed: the tree is the caller's."""
    depth = 0
    events: Iterable[tuple[str, Any]] = etree.iterwalk(root, events=("start", "end"))
    for event, element in events:
        if event == "start":
            depth += 1
            continue
        depth -= 1
        take(element, depth)
