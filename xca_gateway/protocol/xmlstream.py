"""Incremental parsing of untrusted XML in which repeated elements are consumed and dropped.

A retrieve of 20,000 SOP instances is a SOAP message of 20,000 ``DocumentRequest`` (or
``DocumentResponse``) elements: as an lxml tree that is some 1.5 KB per instance, more than
everything else the gateway keeps for the instance in flight. :class:`PrunedXmlParser` parses
such a message as it arrives and hands each element its ``take`` callback wants to a reader as
soon as the element is complete; the reader keeps compact records (slotted dataclasses, shared
strings) and the element is removed from the tree. What remains is a *skeleton*: the envelope,
its header and the payload element with whatever was not taken (status, RegistryErrors, the
TransferSyntaxUIDList), which the usual tree functions read as before.

Python sees only the elements a reader may take (``tags``: lxml matches the end events in C),
not every start and end: a relayed retrieve's XML cost some 20 us per instance when each of
its elements went through Python.

The defences are those of :mod:`xca_gateway.protocol.xmlsafe`, applied as the bytes arrive: the
byte limit; no DTD (the prolog is scanned before libxml2 sees the document, and libxml2 runs
without entity resolution, DTD loading or network, with its own depth and size caps); the
markup counted in each chunk before it is parsed, so an element or attribute flood is refused
before anything is built. The per-element limits hold for every element, taken or not: the
skeleton is checked at the end with xmlsafe's XPath walk, and each element handed to ``take``
is checked before it is (its depth, with one XPath walk per feed). Its attribute count,
attribute and text sizes need no walk while the bytes show they cannot break them
(:class:`_RunScreen`: no ``<``-free run of bytes long enough to hold a too large text or
attribute value, or too many attributes); from the first run that might, every element is
checked with XPath too. The parser is plain bookkeeping over bytes fed to it (sans-IO):
callers feed chunks from a socket, a buffer, or (:func:`walk_tree`) run the same reader over
a tree built elsewhere.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any

from lxml import etree

from xca_gateway.protocol.xmlsafe import (
    _FEW_NAMESPACE_DECLARATIONS,
    MarkupCounter,
    XmlLimits,
    XmlRejected,
    _violation,
    check_markup,
    check_no_dtd,
    lt_is_markup,
)

__all__ = ["PrunedXmlParser", "Take", "in_soap_body", "local_name", "walk_tree"]

# xmlsafe's namespace declaration, whole (findall: no Python per declaration).
_DECLARATION = re.compile(rb"""xmlns(?::[^\s=/>]+)?\s*=\s*(?:"[^"]*"|'[^']*')""")
# The prolog is inspected before libxml2 sees a byte (what check_no_dtd reads).
_PROLOG_BYTES = 8192
# Elements checked by one XPath call along the descendant axis: libxml2 merges the node sets
# of several context nodes with a duplicate check quadratic in their size.
_CHECK_GROUP = 32

# Called with each complete element and its depth (the root is 0, its children 1); True: the
# element was consumed and is removed from the tree.
Take = Callable[[etree._Element, int], bool]


def local_name(element: etree._Element) -> str:
    """The local name of an element ("" for comments and processing instructions)."""
    tag: object = element.tag
    if not isinstance(tag, str):
        return ""
    return tag.rpartition("}")[2]


class _RunScreen:
    """Tells, from the bytes alone, when an element *may* break the attribute or text limits.

    A text node or an attribute value holds no raw ``<`` (CDATA sections aside), nor does a
    start tag; so a text or attribute value longer than L characters needs a run of more than
    L bytes without ``<``, and an element with more than A attributes a run holding more than
    A ``=`` (and at least 5 bytes per attribute, `` a=""``). Runs that long are found with a
    ``find`` per block of half their length, not a look at every ``<``. ``suspect`` is set by
    the first such run, CDATA section, or encoding in which a ``<`` byte may be part of
    another character; the elements ending after it are then checked one by one.
    """

    def __init__(self, limits: XmlLimits) -> None:
        self.longest = min(limits.max_text_bytes, limits.max_attribute_bytes)
        self.attributes = limits.max_attributes
        shortest = min(self.longest + 1, 5 * (self.attributes + 1))
        self._block = max(1, shortest // 2)
        self.suspect = False
        self._run = 0  # bytes since the last "<" (the run the next chunk continues)
        self._equals = 0  # "=" in that run

    def _long_run(self, length: int, equals: int) -> None:
        if length > self.longest or equals > self.attributes:
            self.suspect = True

    def feed(self, chunk: bytes) -> None:
        if self.suspect:
            return
        first = chunk.find(b"<")
        if first < 0:
            self._run += len(chunk)
            self._equals += chunk.count(b"=")
            self._long_run(self._run, self._equals)
            return
        self._long_run(self._run + first, self._equals + chunk.count(b"=", 0, first))
        last = chunk.rfind(b"<")
        # Any run of 2 * block - 1 bytes or more holds a whole block: a block without "<"
        # is looked at as the run around it.
        block = self._block
        pos = first + 1
        while pos + block <= last:
            if chunk.find(b"<", pos, pos + block) >= 0:
                pos += block
                continue
            begin = chunk.rfind(b"<", 0, pos)
            end = chunk.find(b"<", pos + block)
            self._long_run(end - begin - 1, chunk.count(b"=", begin, end))
            pos = end + 1
        self._run = len(chunk) - last - 1
        self._equals = chunk.count(b"=", last)
        self._long_run(self._run, self._equals)  # so far


class PrunedXmlParser:
    """Feed bytes, get the skeleton tree from :meth:`close`; raises :class:`XmlRejected`.

    ``tags`` (Clark names): the only elements ``take`` may consume; the others never reach
    Python. None: every element is handed to ``take``."""

    def __init__(
        self, limits: XmlLimits, take: Take, *, tags: Collection[str] | None = None
    ) -> None:
        self.limits = limits
        self._take = take
        options: dict[str, Any] = {} if tags is None else {"tag": list(tags)}
        self._parser = etree.XMLPullParser(
            events=("end",),
            resolve_entities=False,
            load_dtd=False,
            dtd_validation=False,
            no_network=True,
            huge_tree=False,
            remove_blank_text=False,
            **options,
        )
        self._counter = MarkupCounter(xmlns_up_to=_FEW_NAMESPACE_DECLARATIONS)
        self._screen = _RunScreen(limits)
        self._namespaces: set[bytes] = set()
        self._tail = b""  # the last bytes fed, for a "<![" across two chunks
        # Once declarations are collected: the previous chunk from its last "<" (a start tag
        # it may have cut).
        self._tag_tail = b""
        self._tail_bound = limits.max_attribute_bytes + 1024
        self._head: bytearray | None = bytearray()
        self._size = 0
        # The parent of the last element seen and its depth: siblings cost no walk up.
        self._parent: object = self
        self._parent_depth = 0
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
            self._prolog(chunk)
        self._screen.feed(chunk)
        self._parse(chunk)

    def close(self) -> etree._Element:
        """The skeleton: the document without the consumed elements."""
        if self._head is not None:
            head, self._head = bytes(self._head), None
            if not head.strip():
                raise XmlRejected("empty XML document")
            self._prolog(head)
            self._screen.feed(head)
            self._parse(head)
        try:
            root = self._parser.close()
        except etree.XMLSyntaxError as exc:
            raise self._malformed(exc) from None
        self._handle_events()
        self._drop_consumed()
        docinfo: Any = root.getroottree().docinfo
        if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
            raise XmlRejected("document type declarations (DTD) are not accepted")
        reason = _violation(root, self.limits)
        if reason is not None:
            raise XmlRejected(reason)
        return root

    def _prolog(self, head: bytes) -> None:
        check_no_dtd(head)
        if not lt_is_markup(head):
            self._screen.suspect = True

    def _count(self, chunk: bytes) -> None:
        self._counter.feed(chunk)
        count = self._counter.count
        check_markup(count, self.limits)
        # A CDATA section may hold a raw "<" in character data (memchr for "!" first: a
        # message rarely has one).
        if (b"!" in chunk and b"<![" in chunk) or b"<![" in self._tail + chunk[:2]:
            self._screen.suspect = True
        self._tail = chunk[-2:]
        if count.xmlns > _FEW_NAMESPACE_DECLARATIONS:  # as xmlsafe: looked at when many
            # A declaration the previous chunk cut is whole in what followed its last "<" and
            # this chunk (a set: one found twice counts once).
            scan = self._tag_tail + chunk if self._tag_tail else chunk
            self._namespaces.update(_DECLARATION.findall(scan))  # bounded by the chunk
            if len(self._namespaces) > self.limits.max_namespaces:
                raise XmlRejected(
                    f"XML document declares more than {self.limits.max_namespaces} namespaces"
                )
            # Kept bounded: a declaration longer than this misses the count only if cut, and
            # each such costs the document more than max_bytes / max_namespaces.
            keep = scan[scan.rfind(b"<") :]
            self._tag_tail = keep[-self._tail_bound :]

    def _parse(self, chunk: bytes) -> None:
        try:
            self._parser.feed(chunk)
        except etree.XMLSyntaxError as exc:
            raise self._malformed(exc) from None
        self._handle_events()

    def _malformed(self, exc: etree.XMLSyntaxError) -> XmlRejected:
        # libxml2 stops at 256 levels of elements nobody looked at yet: that is our limit.
        if exc.msg.startswith("Excessive depth") and self.limits.max_depth < 256:
            return XmlRejected(f"XML nesting deeper than {self.limits.max_depth}")
        return XmlRejected(f"malformed XML: {exc.msg}")

    def _depth_of(self, element: etree._Element) -> int:
        parent = element.getparent()
        if parent is None:
            return 0
        if parent is self._parent:
            return self._parent_depth + 1
        if element is self._parent:
            depth = self._parent_depth
        else:
            depth = 1
            above = parent.getparent()
            while above is not None:  # at most libxml2's 256 levels
                depth += 1
                above = above.getparent()
        self._parent, self._parent_depth = parent, depth - 1
        return depth

    def _handle_events(self) -> None:
        events: Iterable[tuple[str, Any]] = self._parser.read_events()
        depth_of = self._depth_of
        batch = [(element, depth_of(element)) for _event, element in events]
        if not batch:
            return
        self._check(batch)
        take = self._take
        for element, depth in batch:
            if take(element, depth):
                self.taken += 1
                self._drop_consumed()
                element.clear()  # and its tail: a removed element takes its tail along
                self._consumed = element

    def _check(self, batch: list[tuple[etree._Element, int]]) -> None:
        """The limits, for the elements ``take`` is about to see (and may remove)."""
        limits = self.limits
        by_depth: dict[int, list[etree._Element]] = {}
        for element, depth in batch:
            if depth >= limits.max_depth:  # the root is at depth 0 and nesting level 1
                raise XmlRejected(f"XML nesting deeper than {limits.max_depth}")
            by_depth.setdefault(depth, []).append(element)
        suspect = self._screen.suspect
        for depth, elements in by_depth.items():
            (deeper, reason), *checks = _subtree_checks(limits, depth)
            nodes: list[Any] = elements  # an XPath node-set
            if deeper(elements[0], b=nodes):  # child steps only: no duplicates to merge
                raise XmlRejected(reason)
            if not suspect:
                continue  # the bytes rule the rest out
            for start in range(0, len(elements), _CHECK_GROUP):
                group = nodes[start : start + _CHECK_GROUP]
                for check, reason in checks:
                    if check(group[0], b=group):
                        raise XmlRejected(reason)

    def _drop_consumed(self) -> None:
        consumed, self._consumed = self._consumed, None
        if consumed is not None:
            parent = consumed.getparent()
            if parent is not None:
                parent.remove(consumed)


# Compiled once per limits, depth and thread (a compiled XPath is not shared between threads).
_compiled = threading.local()


def _subtree_checks(limits: XmlLimits, depth: int) -> list[tuple[etree.XPath, str]]:
    """xmlsafe's limits as XPath over the subtrees of the elements ``$b`` (at ``depth``):
    the nesting first, then attributes per element, attribute and text sizes."""
    cache: dict[tuple[XmlLimits, int], list[tuple[etree.XPath, str]]] | None = getattr(
        _compiled, "checks", None
    )
    if cache is None:
        cache = _compiled.checks = {}
    checks = cache.get((limits, depth))
    if checks is None:
        checks = cache[(limits, depth)] = [
            (etree.XPath(f"boolean({path})"), reason)
            for path, reason in (
                (
                    "$b" + "/*" * (limits.max_depth - depth),
                    f"XML nesting deeper than {limits.max_depth}",
                ),
                (
                    f"$b/descendant-or-self::*[@*[{int(limits.max_attributes) + 1}]]",
                    f"XML element with more than {limits.max_attributes} attributes",
                ),
                (
                    "$b/descendant-or-self::*/@*"
                    f"[string-length() > {int(limits.max_attribute_bytes)}]",
                    "XML attribute value too large",
                ),
                (
                    f"$b/descendant::text()[string-length() > {int(limits.max_text_bytes)}]",
                    "XML text node too large",
                ),
            )
        ]
    return checks


def in_soap_body(
    take: Take, body_tag: str, *, payload_tag: str | None = None, max_depth: int | None = None
) -> Take:
    """``take`` for the elements inside the payload of a SOAP envelope (of ``payload_tag``,
    if given), with their depth counted from the payload (its children are 1); anything else
    (header blocks, another payload) is left. Elements deeper than ``max_depth`` (what
    ``take`` never consumes, e.g. the children of a DocumentRequest) are not looked at."""
    deepest = 1 << 30 if max_depth is None else max_depth + 2
    # The verdict for the last parent: siblings (thousands of DocumentRequests in a series)
    # share it.
    last_parent: object = None
    last_verdict = False

    def in_payload(parent: etree._Element, depth: int) -> bool:
        """Whether ``parent`` (at ``depth``) is in the payload of the Body."""
        payload: etree._Element | None = parent
        for _ in range(depth - 2):
            payload = payload.getparent() if payload is not None else None
        body = payload.getparent() if payload is not None else None
        if body is None or body.tag != body_tag:
            return False
        return payload_tag is None or (payload is not None and payload.tag == payload_tag)

    def take_in_body(element: etree._Element, depth: int) -> bool:
        nonlocal last_parent, last_verdict
        if depth < 3 or depth > deepest:
            return False
        parent = element.getparent()
        if parent is None:
            return False
        if parent is not last_parent:
            last_parent, last_verdict = parent, in_payload(parent, depth - 1)
        return last_verdict and take(element, depth - 2)

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
