"""Parsing of untrusted XML with cheap refusal of hostile input.

Everything a peer sends passes through :func:`parse_xml`. Defences, cheapest first:

* a byte limit checked before any parsing;
* no DTD at all: the prolog is scanned for ``<!DOCTYPE`` before libxml2 sees the document, so
  internal entities (billion laughs, quadratic blowup) and external entities (XXE) never get
  declared; without a DTD an entity reference is simply a well-formedness error;
* libxml2 itself runs with entity resolution, DTD loading and network access switched off;
* element depth and attribute size are bounded while parsing (pull parser events), so a deeply
  nested document is refused as soon as it crosses the limit, not after it is built.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, cast

from lxml import etree

_FEED_CHUNK = 64 * 1024


@dataclass(frozen=True)
class XmlLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_depth: int = 100
    max_attribute_bytes: int = 64 * 1024
    max_text_bytes: int = 8 * 1024 * 1024


class XmlRejected(ValueError):
    """The document is not acceptable; ``reason`` is safe to show to the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _prolog_text(data: bytes) -> str:
    """Decode the first bytes just far enough to inspect the prolog."""
    head = data[:8192]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return head.decode("utf-16", errors="replace")
    if head.startswith(b"\x00<") or head.startswith(b"<\x00"):
        return head.decode("utf-16-be" if head[0] == 0 else "utf-16-le", errors="replace")
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:]
    return head.decode("utf-8", errors="replace")


def check_no_dtd(data: bytes) -> None:
    """Refuse a document type declaration; it can only appear in the prolog."""
    text = _prolog_text(data)
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
        elif text.startswith("<?", i):
            end = text.find("?>", i + 2)
            if end < 0:
                return  # prolog longer than the window: libxml2 still refuses a DTD below
            i = end + 2
        elif text.startswith("<!--", i):
            end = text.find("-->", i + 4)
            if end < 0:
                return
            i = end + 3
        elif text.startswith("<!", i):
            raise XmlRejected("document type declarations (DTD) are not accepted")
        else:
            return


def _parser() -> etree.XMLPullParser:
    return etree.XMLPullParser(
        events=("start", "end"),
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        remove_blank_text=False,
    )


def parse_xml(data: bytes, limits: XmlLimits | None = None) -> etree._Element:
    """Parse ``data`` into an element tree or raise :class:`XmlRejected`."""
    limits = limits or XmlLimits()
    if len(data) > limits.max_bytes:
        raise XmlRejected(f"XML document larger than {limits.max_bytes} bytes")
    if not data.strip():
        raise XmlRejected("empty XML document")
    check_no_dtd(data)
    parser = _parser()
    depth = 0
    view = memoryview(data)
    try:
        for offset in range(0, len(data), _FEED_CHUNK):
            parser.feed(bytes(view[offset : offset + _FEED_CHUNK]))
            for event, item in parser.read_events():
                element = cast(etree._Element, item)
                if event == "start":
                    depth += 1
                    if depth > limits.max_depth:
                        raise XmlRejected(f"XML nesting deeper than {limits.max_depth}")
                    for value in element.attrib.values():
                        if len(value) > limits.max_attribute_bytes:
                            raise XmlRejected("XML attribute value too large")
                else:
                    depth -= 1
                    text = element.text
                    if text is not None and len(text) > limits.max_text_bytes:
                        raise XmlRejected("XML text node too large")
        root = parser.close()
    except etree.XMLSyntaxError as exc:
        raise XmlRejected(f"malformed XML: {exc.msg}") from None
    if root is None:  # pragma: no cover - close() raises on empty input
        raise XmlRejected("empty XML document")
    docinfo: Any = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        # Belt and braces: the prolog scan should have refused this already.
        raise XmlRejected("document type declarations (DTD) are not accepted")
    return root
