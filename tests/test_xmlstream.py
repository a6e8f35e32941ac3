"""Pull parsing with pruning (issue 22): the limits of xmlsafe hold, consumed elements are gone,
and the byte writers produce what the tree builders build."""

from __future__ import annotations

import itertools

import pytest
from lxml import etree

from xca_gateway.imaging.remote import Planner
from xca_gateway.imaging.request import (
    DocumentRequest,
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
    RetrieveImagingRequestReader,
    build_retrieve_imaging_request,
    parse_retrieve_imaging_request,
    requested_references,
    retrieve_imaging_request_shell,
    write_retrieve_imaging_request,
)
from xca_gateway.imaging.response import (
    DocumentResponse,
    RetrieveResponseReader,
    build_retrieve_response,
    parse_retrieve_response,
    retrieve_response_shell,
    write_document_responses,
)
from xca_gateway.protocol.namespaces import SOAP12, ResponseStatus
from xca_gateway.protocol.soap import build_envelope, serialize_around
from xca_gateway.protocol.xmlsafe import MarkupCounter, XmlLimits, XmlRejected, lt_is_markup
from xca_gateway.protocol.xmlstream import PrunedXmlParser, _RunScreen, in_soap_body
from xca_gateway.xds.ebrs import RegistryError

BODY = f"{{{SOAP12}}}Body"


def _feed(parser: PrunedXmlParser, data: bytes, size: int = 7) -> etree._Element:
    for start in range(0, len(data), size):
        parser.feed(data[start : start + size])
    return parser.close()


def _never(element: etree._Element, depth: int) -> bool:
    return False


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b'<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>', "DTD"),
        (b"<a>" + b"<b/>" * 50 + b"</a>", "more than 20 elements"),
        (b"<a>" * 12 + b"</a>" * 12, "deeper than 10"),
        (b"<a " + b" ".join(b'x%d="1"' % i for i in range(9)) + b"/>", "more than 8 attributes"),
        (b'<a x="' + b"v" * 100 + b'"/>', "attribute value too large"),
        (b"<a>" + b"t" * 200 + b"</a>", "text node too large"),
        (b"<a><b></a>", "malformed"),
        (b"", "empty"),
        (b"x" * 5000, "larger than 4096"),
    ],
)
def test_hostile_xml_is_refused_as_it_arrives(document: bytes, reason: str) -> None:
    limits = XmlLimits(
        max_bytes=4096,
        max_depth=10,
        max_elements=20,
        max_attributes=8,
        max_attribute_bytes=64,
        max_text_bytes=128,
    )
    with pytest.raises(XmlRejected, match=reason):
        _feed(PrunedXmlParser(limits, _never), document)


def test_taken_elements_leave_the_tree_and_the_rest_stays() -> None:
    seen: list[str] = []

    def take(element: etree._Element, depth: int) -> bool:
        if depth == 1 and element.tag == "item":
            seen.append(element.get("n") or "")
            return True
        return False

    parser = PrunedXmlParser(XmlLimits(), take)
    doc = b"<list><head>h</head>" + b"".join(b'<item n="%d"><x/></item>' % i for i in range(50))
    root = _feed(parser, doc + b"<tail/></list>")
    assert seen == [str(i) for i in range(50)]
    assert [child.tag for child in root] == ["head", "tail"]
    assert parser.taken == 50


DOCS = tuple(
    DocumentRequest(
        f"1.2.3.{i // 6}",
        f"1.2.3.{i // 6}.{i // 3}",
        "1.3.6.1.4.1.21367.13.71.2.1",
        f"1.2.3.4.5.{i}",
        "urn:oid:1.2.3&<4>" if i % 2 else None,
    )
    for i in range(12)
)


def _request_envelope(request: RetrieveImagingDocumentSetRequest) -> bytes:
    shell = retrieve_imaging_request_shell()
    envelope = build_envelope(shell, action="urn:x", to="https://peer/")
    head, tail = serialize_around(envelope, shell)
    return b"".join(itertools.chain((head,), write_retrieve_imaging_request(request), (tail,)))


def test_written_request_is_the_built_one_and_reads_back_compactly() -> None:
    request = RetrieveImagingDocumentSetRequest(DOCS, ("1.2.840.10008.1.2.1", "1.2"))
    wire = _request_envelope(request)
    tree = etree.fromstring(wire)
    payload = tree.find(BODY)[0]  # type: ignore[index]
    built = build_retrieve_imaging_request(request)
    assert etree.tostring(payload, method="c14n", exclusive=True) == etree.tostring(
        built, method="c14n", exclusive=True
    )

    reader = RetrieveImagingRequestReader()
    parser = PrunedXmlParser(XmlLimits(), in_soap_body(reader.take, BODY))
    skeleton = _feed(parser, wire, 97)
    payload = skeleton.find(BODY)[0]  # type: ignore[index]
    assert [c.tag for c in payload] == [built[-1].tag]  # only the TransferSyntaxUIDList left
    parsed = reader.finish(payload)
    assert parsed == parse_retrieve_imaging_request(built)
    assert isinstance(parsed, RetrieveImagingDocumentSetRequest)
    assert parsed.documents == DOCS
    # Identifiers repeated across instances are one string.
    assert len({id(d.repository_unique_id) for d in parsed.documents}) == 1


def test_a_refused_streamed_request_still_names_its_instances_for_the_audit() -> None:
    request = RetrieveImagingDocumentSetRequest(DOCS[:4], ("1.2",))
    wire = _request_envelope(request).replace(
        b"<iherad:TransferSyntaxUIDList>", b"<x:y xmlns:x='u'>", 1
    )
    wire = wire.replace(b"</iherad:TransferSyntaxUIDList>", b"</x:y>")
    reader = RetrieveImagingRequestReader()
    skeleton = _feed(PrunedXmlParser(XmlLimits(), in_soap_body(reader.take, BODY)), wire)
    refused = reader.finish(skeleton.find(BODY)[0])  # type: ignore[index]
    assert isinstance(refused, InvalidImagingRequest)
    assert "TransferSyntaxUIDList" in refused.reason
    assert refused.requested == tuple(requested_references(request))


def test_header_blocks_are_never_taken_for_payload_elements() -> None:
    taken: list[int] = []

    def take(element: etree._Element, depth: int) -> bool:
        taken.append(depth)
        return False

    wire = (
        f'<s:Envelope xmlns:s="{SOAP12}"><s:Header><a><b><c/></b></a></s:Header>'
        "<s:Body><p><q><r/></q></p></s:Body></s:Envelope>"
    ).encode()
    _feed(PrunedXmlParser(XmlLimits(), in_soap_body(take, BODY)), wire)
    assert taken == [2, 1]  # r and q, counted from the payload p


def test_written_document_responses_are_the_built_ones() -> None:
    docs = [
        DocumentResponse(
            "urn:oid:1.2" if i % 2 else None, "1.3.6", f"1.2.3.{i}", "application/dicom", f"{i}@x"
        )
        for i in range(40)
    ]
    errors = [RegistryError("XDSDocumentUniqueIdError", "not found: 9", location="1.2.3.9")]
    shell = retrieve_response_shell(ResponseStatus.PARTIAL_SUCCESS, errors)
    envelope = build_envelope(shell, action="urn:y")
    head, tail = serialize_around(envelope, shell)
    wire = b"".join([head, *write_document_responses(docs), tail])
    payload = etree.fromstring(wire).find(BODY)[0]  # type: ignore[index]
    built = build_retrieve_response(ResponseStatus.PARTIAL_SUCCESS, errors, docs)
    assert parse_retrieve_response(payload) == parse_retrieve_response(built)

    planner = Planner(
        [DocumentRequest("1.2", "1.2.1", "1.3.6", f"1.2.3.{i}") for i in range(0, 40, 2)]
    )
    reader = RetrieveResponseReader(planner.add)
    skeleton = _feed(PrunedXmlParser(XmlLimits(), in_soap_body(reader.take, BODY)), wire, 1000)
    payload = skeleton.find(BODY)[0]  # type: ignore[index]
    assert len(payload) == 1  # the RegistryResponse; every DocumentResponse consumed
    assert reader.finish(payload) == (ResponseStatus.PARTIAL_SUCCESS, tuple(errors))
    assert [p.handle for p in planner.planned] == [f"{i}@x" for i in range(0, 40, 2)]


# Limits small enough to break in a few bytes; every element named "item" is taken.
SMALL = XmlLimits(
    max_bytes=1 << 20,
    max_depth=6,
    max_elements=10_000,
    max_attributes=8,
    max_attribute_bytes=64,
    max_text_bytes=128,
)


def _take_items(element: etree._Element, depth: int) -> bool:
    return depth == 1 and element.tag == "item"


def _items(inside: bytes, *, many: int = 40, prolog: bytes = b"") -> bytes:
    """A list of ``many`` items, the middle one holding ``inside``."""
    items = [b'<item n="%d"><x>v</x></item>' % i for i in range(many)]
    items[many // 2] = b"<item>" + inside + b"</item>"
    return prolog + b"<list><head/>" + b"".join(items) + b"</list>"


HOSTILE_INSIDE = [
    (b"<a><b><c><d><e/></d></c></b></a>", "deeper than 6"),
    (b"<a " + b" ".join(b'x%d="1"' % i for i in range(9)) + b"/>", "more than 8 attributes"),
    (b'<a x="' + b"v" * 100 + b'"/>', "attribute value too large"),
    (b"<a>" + b"t" * 200 + b"</a>", "text node too large"),
    (b"<a><![CDATA[" + b"<" * 200 + b"]]></a>", "text node too large"),
    (b"<a>" + b"&amp;" * 140 + b"</a>", "text node too large"),
]


@pytest.mark.parametrize("tags", [None, ("item",)])
@pytest.mark.parametrize("size", [7, 64, 100_000])
@pytest.mark.parametrize(("inside", "reason"), HOSTILE_INSIDE)
def test_limits_hold_inside_taken_elements(
    inside: bytes, reason: str, size: int, tags: tuple[str, ...] | None
) -> None:
    taken: list[int] = []

    def take(element: etree._Element, depth: int) -> bool:
        taken.append(depth)
        return _take_items(element, depth)

    parser = PrunedXmlParser(SMALL, take, tags=tags)
    with pytest.raises(XmlRejected, match=reason):
        _feed(parser, _items(inside), size)
    # Refused before the element breaking the limit was handed over.
    assert len([d for d in taken if d == 1]) <= 20


@pytest.mark.parametrize(("inside", "reason"), HOSTILE_INSIDE[1:4])
def test_limits_hold_in_a_utf16_document(inside: bytes, reason: str) -> None:
    # A "<" byte is no "<" character in UTF-16: the byte screen must not vouch for it.
    document = _items(inside).decode().encode("utf-16")
    parser = PrunedXmlParser(SMALL, _take_items, tags=("item",))
    with pytest.raises(XmlRejected, match=reason):
        _feed(parser, document, 1000)


def test_tags_keep_other_elements_out_of_python_and_the_skeleton_keeps_them() -> None:
    seen: list[tuple[str, int]] = []

    def take(element: etree._Element, depth: int) -> bool:
        seen.append((str(element.tag), depth))
        return depth == 1

    parser = PrunedXmlParser(XmlLimits(), take, tags=("item",))
    root = _feed(parser, _items(b"<x>y</x>", many=10), 13)
    assert seen == [("item", 1)] * 10
    assert [child.tag for child in root] == ["head"]
    assert parser.taken == 10


@pytest.mark.parametrize("size", [1, 5, 64, 4096])
def test_the_byte_screen_finds_every_run_that_may_hold_too_much(size: int) -> None:
    def suspect(document: bytes) -> bool:
        screen = _RunScreen(SMALL)  # runs over 64 bytes, or with more than 8 "="
        for start in range(0, len(document), size):
            screen.feed(document[start : start + size])
        return screen.suspect

    plain = _items(b"<a>" + b"t" * 60 + b"</a>", many=200)
    assert not suspect(plain)
    attributes = b"a" + b"".join(b' x%d=""' % i for i in range(9))  # 9 in 55 bytes
    for run in (b"t" * 65, attributes, b" " * 30 + b"t" * 35):
        for where in (0, 1, 50, len(plain) - 8, len(plain) - 1):
            assert suspect(plain[:where] + b"<" + run + b"<" + plain[where:]), (run, where)
    # A run's end in the document's last bytes counts too.
    assert suspect(b"<a>" + b"t" * 65)


def test_prologs_whose_lt_bytes_may_not_be_markup() -> None:
    assert lt_is_markup(b"<a/>")
    assert lt_is_markup(b"\xef\xbb\xbf<?xml version='1.0' encoding='UTF-8'?><a/>")
    assert lt_is_markup(b'<?xml version="1.0" encoding="ISO-8859-1"?><a/>')
    assert not lt_is_markup("<a/>".encode("utf-16"))
    assert not lt_is_markup("<a/>".encode("utf-16-le"))
    assert not lt_is_markup("<a/>".encode("utf-16-be"))
    assert not lt_is_markup(b'<?xml version="1.0" encoding="UTF-16"?><a/>')
    assert not lt_is_markup(b'<?xml version="1.0" encoding="Shift_JIS"?><a/>')


@pytest.mark.parametrize("record", [DocumentRequest, DocumentResponse])
def test_per_instance_records_set_every_field_and_stay_frozen(record: type) -> None:
    import dataclasses
    import pickle

    fields = dataclasses.fields(record)
    values = tuple(f"v{i}" for i in range(len(fields)))
    made = record(*values)
    assert dataclasses.astuple(made) == values
    assert made == record(**{f.name: v for f, v in zip(fields, values, strict=True)})
    assert hash(made) == hash(record(*values))
    assert pickle.loads(pickle.dumps(made)) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.document_unique_id = "x"
    changed = dataclasses.replace(made, document_unique_id="x")
    assert changed.document_unique_id == "x" and changed != made


def test_a_namespace_flood_cut_inside_every_declaration_is_refused() -> None:
    # Each chunk ends in the middle of a declaration: none is whole in one chunk.
    same = b"".join(b'<i xmlns:p="urn:same"/>' for _ in range(80))
    declarations = [b'<i xmlns:p="urn:%d"/>' % i for i in range(300)]
    pieces = [b"<list>" + same]
    for declaration in declarations:
        cut = declaration.index(b"urn:") + 2
        pieces[-1] += declaration[:cut]
        pieces.append(declaration[cut:])
    pieces[-1] += b"</list>"
    parser = PrunedXmlParser(XmlLimits(), _never)
    with pytest.raises(XmlRejected, match="more than 256 namespaces"):
        for piece in pieces:
            parser.feed(piece)
        parser.close()


def test_a_few_namespaces_cut_across_chunks_are_accepted() -> None:
    # The same declarations over and over, each cut by a chunk: counted once each.
    declarations = [b'<i xmlns:p="urn:%d"/>' % (i % 10) for i in range(400)]
    document = b"<list>" + b"".join(declarations) + b"</list>"
    root = _feed(PrunedXmlParser(XmlLimits(), _never), document, 11)
    assert len(root) == 400


def test_nesting_past_libxml2s_own_cap_gets_the_nesting_reason() -> None:
    # Nobody looks at these elements before libxml2 stops at 256 levels: still our limit.
    document = b"<a>" * 300 + b"</a>" * 300
    parser = PrunedXmlParser(XmlLimits(max_depth=100), _never, tags=("item",))
    with pytest.raises(XmlRejected, match="nesting deeper than 100"):
        _feed(parser, document, 4096)


@pytest.mark.parametrize("size", [4096, 65536])
def test_a_namespace_flood_is_refused_once_declarations_are_no_longer_counted(size: int) -> None:
    # The first 64 declarations are the same one (counted, then no longer), then a flood.
    same = b"".join(b'<i xmlns:p="urn:same"/>' for _ in range(80))
    flood = b"".join(b'<i xmlns:p="urn:%d"/>' % i for i in range(300))
    document = b"<list>" + same + flood + b"</list>"
    with pytest.raises(XmlRejected, match="more than 256 namespaces"):
        _feed(PrunedXmlParser(XmlLimits(), _never), document, size)
    counter = MarkupCounter(xmlns_up_to=64)
    for start in range(0, len(document), size):
        counter.feed(document[start : start + size])
    everything = MarkupCounter()
    everything.feed(document)
    assert counter.count.xmlns > 64  # the rest was not counted
    assert (counter.count.opens, counter.count.closes, counter.count.equals) == (
        everything.count.opens,
        everything.count.closes,
        everything.count.equals,
    )
