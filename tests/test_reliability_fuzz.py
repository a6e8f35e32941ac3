"""Property-based fuzzing of the parsers that read network input (issue 11).

Each property states what a parser may do with arbitrary input: return a model, or raise its
own documented rejection (which the gateway turns into a SOAP Fault / RegistryError / dropped
frame). Any other exception would become a 500 with a traceback, so it fails the property.
"""

from __future__ import annotations

import contextlib
import itertools
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from xca_gateway.arr.parse import parse_record
from xca_gateway.arr.receiver import FrameReader
from xca_gateway.audit.syslog import OctetCountingParser, SyslogError, frame, parse_message
from xca_gateway.imaging.request import (
    DocumentRequest,
    InvalidImagingRequest,
    RetrieveImagingDocumentSetRequest,
    build_retrieve_imaging_request,
    is_uid,
    parse_retrieve_imaging_request,
)
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import SOAP12, WSA, XDSB, XDSI
from xca_gateway.protocol.soap import SoapFault, parse_envelope
from xca_gateway.protocol.xmlsafe import XmlLimits, XmlRejected, parse_xml

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_LIMITS = XmlLimits(max_bytes=4096, max_depth=8, max_attribute_bytes=64, max_text_bytes=256)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ------------------------------------------------------------------------------- XML and SOAP

_names = st.sampled_from(["a", "Envelope", "Body", "Header", "x:y", "Action", "soap:Body"])
_xmlish = st.recursive(
    st.text(alphabet="<>&;=\"' /!?[]-abc\x00\u00e9\ud7ff", max_size=20),
    lambda inner: (
        st.tuples(_names, inner).map(lambda t: f"<{t[0]}>{t[1]}</{t[0]}>")
        | st.lists(inner, max_size=4).map("".join)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.one_of(st.binary(max_size=600), _xmlish.map(lambda s: s.encode("utf-8", "replace"))))
def test_parse_xml_returns_a_tree_or_rejects(data: bytes) -> None:
    try:
        root = parse_xml(data, SMALL_LIMITS)
    except XmlRejected as exc:
        assert exc.reason
    else:
        assert isinstance(root.tag, str)


@FUZZ
@given(st.integers(min_value=1, max_value=40), st.sampled_from(["SYSTEM", "PUBLIC", "ENTITY"]))
def test_parse_xml_never_accepts_a_dtd(depth: int, keyword: str) -> None:
    data = f'<?xml version="1.0"?><!DOCTYPE r [<!{keyword} e "x">]>'.encode() + b"<r/>" * depth
    try:
        parse_xml(data)
    except XmlRejected:
        return
    raise AssertionError("a DTD was accepted")


_header_blocks = st.lists(
    st.sampled_from(
        [
            f'<wsa:Action xmlns:wsa="{WSA}">urn:ihe:iti:2007:RegistryStoredQuery</wsa:Action>',
            f'<wsa:Action xmlns:wsa="{WSA}"></wsa:Action>',
            f'<wsa:MessageID xmlns:wsa="{WSA}">urn:uuid:1</wsa:MessageID>',
            f'<wsa:To xmlns:wsa="{WSA}">https://x</wsa:To>',
            f'<wsa:ReplyTo xmlns:wsa="{WSA}"><wsa:Address>x</wsa:Address></wsa:ReplyTo>',
            f'<u xmlns:s="{SOAP12}" s:mustUnderstand="true"/>',
            f'<u xmlns:s="{SOAP12}" s:mustUnderstand="banana"/>',
            "text",
            "<plain/>",
        ]
    ),
    max_size=5,
)


@FUZZ
@given(
    st.booleans(),
    _header_blocks,
    st.lists(st.sampled_from(["<a/>", "<b>t</b>", "x", "<!-- c -->"]), max_size=3),
    st.sampled_from([SOAP12, "http://schemas.xmlsoap.org/soap/envelope/", "urn:other"]),
    st.one_of(st.none(), st.just("urn:ihe:iti:2007:RegistryStoredQuery")),
)
def test_parse_envelope_returns_an_envelope_or_a_soap_fault(
    with_header: bool, headers: list[str], body: list[str], ns: str, http_action: str | None
) -> None:
    header = f"<s:Header>{''.join(headers)}</s:Header>" if with_header else ""
    data = f'<s:Envelope xmlns:s="{ns}">{header}<s:Body>{"".join(body)}</s:Body></s:Envelope>'
    root = parse_xml(data.encode())
    try:
        envelope = parse_envelope(root, http_action=http_action)
    except SoapFault as fault:
        assert fault.code in ("Sender", "Receiver", "VersionMismatch", "MustUnderstand")
    else:
        assert envelope is not None


# ------------------------------------------------------------------------------- RAD-69 model

_uid = st.lists(st.integers(min_value=1, max_value=999), min_size=2, max_size=6).map(
    lambda parts: ".".join(str(p) for p in parts)
)
_documents = st.lists(
    st.builds(
        DocumentRequest,
        study_instance_uid=_uid,
        series_instance_uid=_uid,
        repository_unique_id=_uid,
        document_unique_id=_uid,
        home_community_id=st.one_of(st.none(), _uid.map(lambda u: f"urn:oid:{u}")),
    ),
    min_size=1,
    max_size=8,
)


@FUZZ
@given(_documents, st.lists(_uid, min_size=1, max_size=3, unique=True))
def test_rad69_request_round_trips(documents: list[DocumentRequest], syntaxes: list[str]) -> None:
    request = RetrieveImagingDocumentSetRequest(tuple(documents), tuple(syntaxes))
    wire = etree.tostring(build_retrieve_imaging_request(request))
    parsed = parse_retrieve_imaging_request(parse_xml(wire))
    assert parsed.transfer_syntax_uids == request.transfer_syntax_uids
    assert sorted(parsed.documents, key=repr) == sorted(request.documents, key=repr)


_rad69_pieces = st.lists(
    st.sampled_from(
        [
            '<xdsi:StudyRequest studyInstanceUID="1.2">',
            '<xdsi:StudyRequest studyInstanceUID="not a uid">',
            "<xdsi:StudyRequest>",
            '<xdsi:SeriesRequest seriesInstanceUID="1.2.3">',
            "<xdsi:SeriesRequest>",
            "<xdsi:DocumentRequest>",
            "<xdsb:RepositoryUniqueId>1.2.3</xdsb:RepositoryUniqueId>",
            "<xdsb:DocumentUniqueId>1.2.3.4</xdsb:DocumentUniqueId>",
            "<xdsb:DocumentUniqueId></xdsb:DocumentUniqueId>",
            "<xdsb:HomeCommunityId>urn:oid:1.2</xdsb:HomeCommunityId>",
            "</xdsi:DocumentRequest>",
            "</xdsi:SeriesRequest>",
            "</xdsi:StudyRequest>",
            "<xdsi:TransferSyntaxUIDList>",
            "<xdsi:TransferSyntaxUID>1.2.840.10008.1.2.1</xdsi:TransferSyntaxUID>",
            "</xdsi:TransferSyntaxUIDList>",
            "<other/>",
        ]
    ),
    max_size=14,
)


@FUZZ
@given(_rad69_pieces)
def test_rad69_parser_answers_or_rejects(pieces: list[str]) -> None:
    data = (
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI}" xmlns:xdsb="{XDSB}">'
        + "".join(pieces)
        + "</xdsi:RetrieveImagingDocumentSetRequest>"
    ).encode()
    try:
        root = parse_xml(data)
    except XmlRejected:
        return  # unbalanced tags: the XML layer refuses it first
    try:
        request = parse_retrieve_imaging_request(root)
    except InvalidImagingRequest as exc:
        assert str(exc)
    else:
        # Schema-valid: every DocumentRequest is either retrievable (UIDs that can name an
        # instance, a transfer syntax to send it in) or rejected with its own error.
        assert request.requested
        for doc in request.documents:
            assert is_uid(doc.document_unique_id) and is_uid(doc.study_instance_uid)
            assert is_uid(doc.series_instance_uid) and doc.repository_unique_id
        assert request.transfer_syntax_uids or not request.documents
        assert all(r.error_code and r.reason for r in request.rejected)


# ------------------------------------------------------------------------------- MTOM

BOUNDARY = "MIMEBoundary_fuzz"
CONTENT_TYPE = (
    f'multipart/related; boundary="{BOUNDARY}"; type="application/xop+xml"; '
    'start="<root@x>"; start-info="application/soap+xml"'
)


def mtom_body(attachment: bytes) -> bytes:
    root = (
        f'<s:Envelope xmlns:s="{SOAP12}"><s:Body><d xmlns:xop="http://www.w3.org/2004/08/xop/'
        'include"><xop:Include href="cid:att@x"/></d></s:Body></s:Envelope>'
    ).encode()
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
        'type="application/soap+xml"\r\nContent-ID: <root@x>\r\n\r\n'.encode()
        + root
        + f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
        "Content-ID: <att@x>\r\n\r\n".encode()
        + attachment
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def read_mtom(chunks: list[bytes]) -> mtom.MtomMessage:
    reader = mtom.MtomRequestReader(
        CONTENT_TYPE,
        max_root_bytes=1 << 16,
        max_part_bytes=1 << 16,
        max_total_bytes=1 << 18,
        max_parts=8,
        spool_threshold=64,
    )
    for chunk in chunks:
        reader.feed(chunk)
    return reader.close()


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=12))
def test_mtom_reader_is_independent_of_chunking(attachment: bytes, cuts: list[int]) -> None:
    body = mtom_body(attachment)
    message = read_mtom(chunked(body, cuts))
    try:
        assert message.attachments["att@x"].read_all() == attachment
        assert b"xop:Include" in message.root
    finally:
        message.close()


@FUZZ
@given(
    st.binary(max_size=300),
    st.integers(min_value=0),
    st.integers(min_value=0, max_value=40),
    st.binary(max_size=40),
    st.lists(st.integers(min_value=0), max_size=6),
)
def test_mtom_reader_rejects_damaged_bodies_with_mtom_error(
    attachment: bytes, where: int, cut: int, noise: bytes, cuts: list[int]
) -> None:
    body = mtom_body(attachment)
    at = where % (len(body) + 1)
    damaged = body[:at] + noise + body[at + cut :]
    try:
        message = read_mtom(chunked(damaged, cuts))
    except mtom.MtomError as exc:
        assert str(exc)
    else:
        message.close()


# ------------------------------------------------------------------------------- syslog

_syslog_msg = st.builds(
    lambda pri, body: f"<{pri}>1 2026-01-01T00:00:00Z host app - - - ".encode() + body,
    st.integers(min_value=0, max_value=191),
    st.binary(max_size=300),
)


@FUZZ
@given(st.lists(_syslog_msg, max_size=5), st.lists(st.integers(min_value=0), max_size=10))
def test_octet_counting_round_trips_under_any_chunking(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(m) for m in messages)
    for reader in (OctetCountingParser(max_message=4096), FrameReader(max_message=4096)):
        got: list[bytes] = []
        for chunk in chunked(stream, cuts):
            fed = reader.feed(chunk)
            got += [f if isinstance(f, bytes) else f.payload for f in fed]
        assert got == messages
        assert reader.pending == 0
    for m in messages:
        assert parse_message(m).priority == int(m[1 : m.index(b">")])


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=6))
def test_syslog_deframers_survive_garbage(data: bytes, cuts: list[int]) -> None:
    strict = OctetCountingParser(max_message=128)
    try:
        for chunk in chunked(data, cuts):
            strict.feed(chunk)
    except SyslogError:
        pass
    lenient = FrameReader(max_message=128)
    for chunk in chunked(data, cuts):
        for f in lenient.feed(chunk):
            assert f.problem is None or f.problem
    with contextlib.suppress(SyslogError):
        parse_message(data)


@FUZZ
@given(st.one_of(st.binary(max_size=400), _syslog_msg))
def test_audit_repository_stores_any_frame_as_a_record(raw: bytes) -> None:
    # The repository keeps even unparseable frames (flagged), so parse_record never raises.
    record = parse_record(raw, sender="127.0.0.1", transport="tls", received_at=datetime.now(UTC))
    assert record is not None
