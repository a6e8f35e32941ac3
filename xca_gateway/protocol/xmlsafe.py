"""Parsing of untrusted XML with cheap refusal of hostile input, in time linear in its size.

Everything a peer sends passes through :func:`parse_xml` (or :func:`parse_xml_async` on the
event loop). Defences, cheapest first:

* a byte limit checked before any parsing;
* no DTD at all: the prolog is scanned for ``<!DOCTYPE`` before libxml2 sees the document, so
  internal entities (billion laughs, quadratic blowup) and external entities (XXE) never get
  declared; without a DTD an entity reference is simply a well-formedness error;
* the markup is counted before anything is built (``<`` minus ``</`` bounds the elements,
  ``=`` the attributes, ``xmlns`` the namespace declarations), so an element flood is refused
  after one pass of ``bytes.count`` instead of after libxml2 has built millions of nodes;
* libxml2 builds the tree in one C call (entity resolution, DTD loading, network off, its own
  depth and node-size caps on), which releases the GIL;
* the per-element limits (depth, attributes per element, attribute and text size) are checked
  on the built tree with XPath, also in C without the GIL, each in one linear walk. Reading
  ``element.attrib`` from Python is not an option: lxml looks every value up by name, which is
  quadratic in the attributes of an element (60,000 attributes took seconds, 200,000 minutes).

:func:`parse_xml_async` counts the markup on the event loop a slice at a time, yielding between
slices, and parses a large document in a small dedicated pool of threads, so one body never
holds the loop for more than a millisecond or so, and at most that many trees are being built
at once (bounded memory).
"""

from __future__ import annotations

import asyncio
import codecs
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lxml import etree

# Documents below this size are parsed on the event loop: libxml2 takes well under a
# millisecond for them, less than a hop to a worker thread.
INLINE_PARSE_BYTES = 64 * 1024
# bytes.count holds the GIL: the event loop counts this much at a time between yields.
_COUNT_SLICE = 256 * 1024
# Namespace declarations are only examined one by one beyond this many (rare).
_FEW_NAMESPACE_DECLARATIONS = 64
_NAMESPACE_DECLARATION = re.compile(rb"""xmlns(:[^\s=/>]+)?\s*=\s*("[^"]*"|'[^']*')""")

# Large documents are parsed here: libxml2 runs without the GIL, and two workers bound the
# memory held by trees under construction, whatever the number of callers.
_PARSE_WORKERS = 2
_executor: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class XmlLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_depth: int = 100
    max_attribute_bytes: int = 64 * 1024
    max_text_bytes: int = 8 * 1024 * 1024
    # Elements of one document (comments and processing instructions count too), and as many
    # attributes in all: what the tree costs in memory.
    max_elements: int = 1_000_000
    # Attributes of one element.
    max_attributes: int = 256
    # Distinct namespace declarations in one document. lxml copies the namespaces in scope
    # whenever a subtree is serialised, at a cost quadratic in their number.
    max_namespaces: int = 256


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


# Encodings in which every byte 0x3C is a ``<`` and a character takes at least one byte.
_LT_IS_LT = re.compile(r"^(utf-?8|us-ascii|ascii|iso[-_]?8859-\d+|latin-?1|windows-125\d)$")
_ENCODING_DECLARATION = re.compile(rb"""^<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def lt_is_markup(prolog: bytes) -> bool:
    """True when every ``<`` byte of a document starting with ``prolog`` is a ``<``
    character (UTF-8, ASCII and its 8-bit supersets), so that byte scans can bound its text:
    no UTF-16/32 or EBCDIC, whose characters may contain the byte 0x3C."""
    if prolog.startswith(codecs.BOM_UTF8):
        prolog = prolog[3:]
    elif prolog[:1] != b"<" and prolog[:1].strip():
        return False  # a UTF-16/32 BOM or encoding, EBCDIC: not for a byte scan
    if prolog[1:2] == b"\x00":
        return False
    match = _ENCODING_DECLARATION.match(prolog.lstrip())
    return match is None or bool(_LT_IS_LT.match(match.group(1).decode("ascii").lower()))


@dataclass
class MarkupCount:
    """Upper bounds of what a document will build, from its bytes alone.

    Every element starts with ``<`` that is not ``</`` (so do comments, PIs and CDATA
    sections, which only makes the bound looser), every attribute has an ``=``, every
    namespace declaration says ``xmlns``. Character data cannot contain a raw ``<``.
    """

    opens: int = 0
    closes: int = 0
    equals: int = 0
    xmlns: int = 0

    def add(self, data: bytes, start: int, end: int) -> None:
        # Two-byte patterns are counted by where they start: the window reaches one byte
        # further so that one straddling two slices is counted exactly once.
        self.opens += data.count(b"<", start, end)
        self.closes += data.count(b"</", start, end + 1)
        self.equals += data.count(b"=", start, end)
        self.xmlns += data.count(b"xmlns", start, end + 4)

    @property
    def elements(self) -> int:
        return self.opens - self.closes


_STRADDLING = (b"</", b"xmlns")


class MarkupCounter:
    """:class:`MarkupCount` of a document fed in chunks as it arrives (no copy of the chunks).

    Lets a receiver refuse an element flood part-way through the body, before reading the
    rest of it.
    """

    def __init__(self, *, xmlns_up_to: int | None = None) -> None:
        # Past this many, namespace declarations are no longer counted: a caller that then
        # examines them one by one needs no more (a relayed reply declares one per instance).
        self._xmlns_up_to = xmlns_up_to
        self.count = MarkupCount()
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        count = self.count
        up_to = self._xmlns_up_to
        xmlns = up_to is None or count.xmlns <= up_to
        if xmlns:
            count.add(chunk, 0, len(chunk))
        else:
            count.opens += chunk.count(b"<")
            count.closes += chunk.count(b"</")
            count.equals += chunk.count(b"=")
        if self._tail:
            # Patterns that start in the previous chunk and end in this one (neither pattern
            # can overlap itself, so counts subtract).
            head = chunk[:4]
            joined = self._tail + head
            count.closes += joined.count(b"</") - self._tail.count(b"</") - head.count(b"</")
            if xmlns:
                count.xmlns += (
                    joined.count(b"xmlns") - self._tail.count(b"xmlns") - head.count(b"xmlns")
                )
        self._tail = (self._tail + chunk)[-4:] if len(chunk) < 4 else chunk[-4:]


def check_markup(count: MarkupCount, limits: XmlLimits) -> None:
    """Refuse a document whose markup alone exceeds the element or attribute budget.

    More ``=`` than ``max_attributes`` per element, on average, is an attribute bomb refused
    before a tree is built (the tree of 200,000 attributes would take some 100 MB); a real
    message has a few attributes per element and hardly any ``=`` in its text.
    """
    if count.elements > limits.max_elements:
        raise XmlRejected(f"XML document has more than {limits.max_elements} elements")
    if count.equals > limits.max_elements:
        raise XmlRejected(f"XML document has more than {limits.max_elements} attributes")
    if count.equals > limits.max_attributes * max(1, count.elements):
        raise XmlRejected(
            f"XML markup has more than {limits.max_attributes} attributes per element"
        )


def _check_size(data: bytes, limits: XmlLimits) -> None:
    if len(data) > limits.max_bytes:
        raise XmlRejected(f"XML document larger than {limits.max_bytes} bytes")
    if not data.strip():
        raise XmlRejected("empty XML document")
    check_no_dtd(data)


def _check_count(data: bytes, count: MarkupCount, limits: XmlLimits) -> None:
    check_markup(count, limits)
    if count.xmlns > _FEW_NAMESPACE_DECLARATIONS:
        if count.xmlns > limits.max_elements:
            raise XmlRejected("XML document has too many namespace declarations")
        distinct: set[bytes] = set()
        for match in _NAMESPACE_DECLARATION.finditer(data):
            distinct.add(match.group(0))
            if len(distinct) > limits.max_namespaces:  # stops a flood after a few matches
                raise XmlRejected(
                    f"XML document declares more than {limits.max_namespaces} namespaces"
                )


def count_markup(data: bytes) -> MarkupCount:
    count = MarkupCount()
    count.add(data, 0, len(data))
    return count


async def count_markup_async(data: bytes) -> MarkupCount:
    """:func:`count_markup`, yielding to the event loop between slices."""
    count = MarkupCount()
    for start in range(0, len(data), _COUNT_SLICE):
        count.add(data, start, min(start + _COUNT_SLICE, len(data)))
        if start + _COUNT_SLICE < len(data):
            await asyncio.sleep(0)
    return count


def _parser() -> etree.XMLParser:
    # A parser is not thread-safe, and creating one costs microseconds.
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        remove_blank_text=False,
    )


def _build(data: bytes, limits: XmlLimits) -> etree._Element:
    """libxml2 builds the tree, then XPath checks the per-element limits (both in C)."""
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise XmlRejected(f"malformed XML: {exc.msg}") from None
    if root is None:  # pragma: no cover - fromstring raises on empty input
        raise XmlRejected("empty XML document")
    docinfo: Any = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        # Belt and braces: the prolog scan should have refused this already.
        raise XmlRejected("document type declarations (DTD) are not accepted")
    reason = _violation(root, limits)
    if reason is not None:
        # Freed here, in the worker: a traceback keeping the tree alive would have the event
        # loop free it (a tree of 200,000 attributes takes milliseconds to free).
        del root
        raise XmlRejected(reason)
    return root


def _violation(root: etree._Element, limits: XmlLimits) -> str | None:
    for check, reason in _checks(limits):
        if check(root):
            return reason
    return None


# Compiled once per set of limits and thread (compiling the four paths cost 70 µs of the 80 a
# small document's checks took; a compiled XPath is not shared between threads).
_compiled = threading.local()


def _checks(limits: XmlLimits) -> list[tuple[etree.XPath, str]]:
    cache: dict[XmlLimits, list[tuple[etree.XPath, str]]] | None = getattr(
        _compiled, "checks", None
    )
    if cache is None:
        cache = _compiled.checks = {}
    checks = cache.get(limits)
    if checks is None:
        checks = cache[limits] = [
            (etree.XPath(f"boolean({path})"), reason)
            for path, reason in (
                # One absolute path one step deeper than allowed: each step walks one level
                # once.
                ("/*" * (limits.max_depth + 1), f"XML nesting deeper than {limits.max_depth}"),
                (
                    f"//*[count(@*) > {int(limits.max_attributes)}]",
                    f"XML element with more than {limits.max_attributes} attributes",
                ),
                (
                    f"//@*[string-length(.) > {int(limits.max_attribute_bytes)}]",
                    "XML attribute value too large",
                ),
                (
                    f"//text()[string-length(.) > {int(limits.max_text_bytes)}]",
                    "XML text node too large",
                ),
            )
        ]
    return checks


def parse_xml(data: bytes, limits: XmlLimits | None = None) -> etree._Element:
    """Parse ``data`` into an element tree or raise :class:`XmlRejected`."""
    limits = limits or XmlLimits()
    _check_size(data, limits)
    _check_count(data, count_markup(data), limits)
    return _build(data, limits)


def _parse_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_PARSE_WORKERS, thread_name_prefix="xml-parse")
    return _executor


async def parse_xml_async(
    data: bytes, limits: XmlLimits | None = None, *, count: MarkupCount | None = None
) -> etree._Element:
    """:func:`parse_xml` for the event loop: counting in slices, large parses off the loop.

    ``count`` is the markup count of ``data`` when the caller made it while receiving it.
    """
    limits = limits or XmlLimits()
    _check_size(data, limits)
    if len(data) <= INLINE_PARSE_BYTES:
        _check_count(data, count or count_markup(data), limits)
        return _build(data, limits)
    if count is None:
        count = await count_markup_async(data)
    if count.xmlns > _FEW_NAMESPACE_DECLARATIONS:
        await asyncio.get_running_loop().run_in_executor(
            _parse_executor(), _check_count, data, count, limits
        )
    else:
        _check_count(data, count, limits)
    return await asyncio.get_running_loop().run_in_executor(_parse_executor(), _build, data, limits)


class FairParser:
    """Large parses of one source run one at a time.

    A caller sending many large bodies at once waits for its own parses instead of taking
    every worker of the pool (and the machine's cores) from the other callers.
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    async def parse(
        self,
        data: bytes,
        limits: XmlLimits | None = None,
        *,
        count: MarkupCount | None = None,
        source: str | None = None,
    ) -> etree._Element:
        if source is None or len(data) <= INLINE_PARSE_BYTES:
            return await parse_xml_async(data, limits, count=count)
        lock = self._locks.setdefault(source, asyncio.Lock())
        self._users[source] = self._users.get(source, 0) + 1
        try:
            async with lock:
                return await parse_xml_async(data, limits, count=count)
        finally:
            self._users[source] -= 1
            if not self._users[source]:
                del self._users[source], self._locks[source]

    @property
    def sources(self) -> int:
        """Sources with a large parse running or waiting."""
        return len(self._users)
