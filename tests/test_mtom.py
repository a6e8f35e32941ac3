"""Tests for the sans-IO MTOM/XOP multipart support."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from xca_gateway.protocol import mtom as mtom_module
from xca_gateway.protocol.encrypted_spool import EncryptedSpool
from xca_gateway.protocol.http_client import ReadPieces
from xca_gateway.protocol.mtom import (
    Attachment,
    Finished,
    MtomError,
    MtomMessage,
    MtomRequestReader,
    MtomWriter,
    MultipartEvent,
    MultipartParser,
    OutgoingPart,
    PartData,
    PartEnd,
    PartHeaders,
    PartStart,
    cid_from_href,
    is_mtom,
    make_content_id,
    parse_content_type,
)
from xca_gateway.protocol.multipart import MultipartStream

ENVELOPE = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
    b'<Doc><xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" href="cid:doc1@x"/>'
    b"</Doc></s:Body></s:Envelope>"
)
ACTION = "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"

LIMITS = {
    "max_root_bytes": 1 << 20,
    "max_part_bytes": 64 << 20,
    "max_total_bytes": 128 << 20,
    "max_parts": 100,
}


def nasty_payloads(boundary: str) -> dict[str, bytes]:
    """Binary bodies made of near-delimiters, CR/LF runs and random bytes."""
    b = boundary.encode()
    rng = random.Random(1234)
    return {
        "doc1@x": b"--" + b + b"\r\n--" + b[:-1] + b"\r\n\r\n--\r\n" + bytes(range(256)),
        "doc2@x": b"\r\n" * 50 + b"\n--" + b[:-1] + b"\r",  # ends in CR right before delimiter
        "doc3@x": b"",
        "doc4@x": rng.randbytes(200_000) + b"--" + b + b"--",
        "doc5@x": b"\r",
    }


def build(parts: dict[str, bytes], **kw: object) -> tuple[MtomWriter, bytes]:
    w = MtomWriter(ENVELOPE, action=ACTION, **kw)  # type: ignore[arg-type]
    for cid, body in parts.items():
        w.add_part(OutgoingPart(cid, "application/dicom", body))
    return w, b"".join(w.iter_bytes())


def collect(events: Iterable[MultipartEvent]) -> list[tuple[PartHeaders, bytes]]:
    """Collapse events into (headers, body) pairs; checks event ordering on the way."""
    out: list[tuple[PartHeaders, bytes]] = []
    cur: tuple[PartHeaders, bytearray] | None = None
    finished = False
    for ev in events:
        assert not finished
        if isinstance(ev, PartStart):
            assert cur is None
            cur = (ev.headers, bytearray())
        elif isinstance(ev, PartData):
            assert cur is not None and ev.data
            cur[1].extend(ev.data)
        elif isinstance(ev, PartEnd):
            assert cur is not None
            out.append((cur[0], bytes(cur[1])))
            cur = None
        elif isinstance(ev, Finished):
            assert cur is None
            finished = True
    assert finished
    return out


def parse_chunked(body: bytes, boundary: str, sizes: Iterable[int]) -> list[MultipartEvent]:
    p = MultipartParser(boundary)
    events: list[MultipartEvent] = []
    pos = 0
    for size in sizes:
        if pos >= len(body):
            break
        events += p.feed(body[pos : pos + size])
        pos += size
    if pos < len(body):
        events += p.feed(body[pos:])
    events += p.close()
    return events


def read(
    content_type: str,
    body: bytes,
    chunk: int = 8192,
    *,
    max_root_bytes: int = LIMITS["max_root_bytes"],
    max_part_bytes: int = LIMITS["max_part_bytes"],
    max_total_bytes: int = LIMITS["max_total_bytes"],
    max_parts: int = LIMITS["max_parts"],
) -> MtomMessage:
    r = MtomRequestReader(
        content_type,
        max_root_bytes=max_root_bytes,
        max_part_bytes=max_part_bytes,
        max_total_bytes=max_total_bytes,
        max_parts=max_parts,
    )
    for i in range(0, len(body), chunk):
        r.feed(body[i : i + chunk])
    return r.close()


# --- parse_content_type ---------------------------------------------------------------------


def test_parse_content_type_mtom_header() -> None:
    value = (
        'Multipart/Related ; type="application/xop+xml";START="<root@x>" ;'
        ' start-info="application/soap+xml; action=\\"urn:a;b\\"";boundary=MIMEBoundary_1'
    )
    mtype, params = parse_content_type(value)
    assert mtype == "multipart/related"
    assert params == {
        "type": "application/xop+xml",
        "start": "<root@x>",
        "start-info": 'application/soap+xml; action="urn:a;b"',
        "boundary": "MIMEBoundary_1",
    }
    assert parse_content_type(params["start-info"]) == (
        "application/soap+xml",
        {"action": "urn:a;b"},
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text/xml", ("text/xml", {})),
        ("  TEXT/XML  ", ("text/xml", {})),
        ("text/xml;", ("text/xml", {})),
        ("text/xml;; charset=utf-8 ;", ("text/xml", {"charset": "utf-8"})),
        ("text/xml; flag; charset=utf-8", ("text/xml", {"charset": "utf-8"})),
        ('a/b; x = "q\\\\z"', ("a/b", {"x": "q\\z"})),
        ('a/b; x=""', ("a/b", {"x": ""})),
        ('a/b; x="semi;colon" ; y=2', ("a/b", {"x": "semi;colon", "y": "2"})),
        ("a/b;\r\n\tcharset=UTF-8", ("a/b", {"charset": "UTF-8"})),
    ],
)
def test_parse_content_type_edge_cases(value: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_content_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "textxml",
        "text/",
        "/xml",
        "te xt/xml",
        'a/b; x="unterminated',
        'a/b; x="v" junk',
        "a/b; boundary=1; BOUNDARY=2",
        "a/b; =v",
    ],
)
def test_parse_content_type_rejects(value: str) -> None:
    with pytest.raises(MtomError) as info:
        parse_content_type(value)
    assert info.value.reason


def test_is_mtom() -> None:
    w = MtomWriter(ENVELOPE)
    assert is_mtom(w.content_type)
    assert is_mtom('multipart/related; boundary=x; type="application/xop+xml"')
    assert not is_mtom("application/soap+xml; charset=utf-8")
    assert not is_mtom("text/xml")
    assert not is_mtom("garbage")


def test_is_mtom_false_for_zeep_soap12_request() -> None:
    zeep = pytest.importorskip("zeep")
    wsdl = Path(__file__).resolve().parents[1] / "wsdl" / "iti39.wsdl"
    client = zeep.Client(str(wsdl))
    binding = client.service._binding
    _envelope, headers = binding._create(
        "RespondingGateway_CrossGatewayRetrieve",
        (),
        {
            "DocumentRequest": [
                {
                    "HomeCommunityId": "urn:oid:1.2.3",
                    "RepositoryUniqueId": "1.2.3",
                    "DocumentUniqueId": "1.2.3.4",
                }
            ]
        },
        client=client,
    )
    content_type = headers["Content-Type"]
    assert content_type.startswith("application/soap+xml")
    assert not is_mtom(content_type)


# --- small helpers ----------------------------------------------------------------------------


def test_cid_from_href_and_make_content_id() -> None:
    assert cid_from_href("cid:doc1@x") == "doc1@x"
    assert cid_from_href("CID:a%20b%40c@x") == "a b@c@x"
    assert cid_from_href("cid:%C3%A9t%C3%A9@x") == "été@x"
    a, b = make_content_id(), make_content_id("example.org")
    assert a != b
    assert a.endswith("@xca-gateway") and b.endswith("@example.org")
    assert "<" not in a


# --- writer -----------------------------------------------------------------------------------


def test_writer_content_type_and_root_part() -> None:
    w = MtomWriter(ENVELOPE, action=ACTION, root_content_id="<root@x>")
    mtype, params = parse_content_type(w.content_type)
    assert mtype == "multipart/related"
    assert params["type"] == "application/xop+xml"
    assert params["start"] == "<root@x>"
    assert params["boundary"] == w.boundary
    assert w.boundary.startswith("MIMEBoundary_") and len(w.boundary) == 13 + 32
    assert parse_content_type(params["start-info"]) == ("application/soap+xml", {"action": ACTION})
    head = next(iter(w.iter_bytes()))
    assert head.startswith(f"--{w.boundary}\r\n".encode())
    assert (
        b'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"; '
        b'action="' + ACTION.encode() + b'"\r\n'
    ) in head
    assert b"Content-Transfer-Encoding: binary\r\n" in head
    assert head[head.index(b"Content-ID") :] == b"Content-ID: <root@x>\r\n\r\n" + ENVELOPE


def test_writer_without_action() -> None:
    w = MtomWriter(ENVELOPE)
    params = parse_content_type(w.content_type)[1]
    assert params["start-info"] == "application/soap+xml"
    assert b"action" not in b"".join(w.iter_bytes())
    assert MtomWriter(ENVELOPE).boundary != w.boundary


def test_writer_rejects_bad_input() -> None:
    w = MtomWriter(ENVELOPE)
    w.add_part(OutgoingPart("a@x", "application/dicom", b"1"))
    with pytest.raises(ValueError):
        w.add_part(OutgoingPart("<a@x>", "application/dicom", b"2"))
    with pytest.raises(ValueError):
        w.add_part(OutgoingPart("b@x", "application/dicom\r\nX-Evil: 1", b"2"))
    with pytest.raises(ValueError):
        w.add_part(OutgoingPart("c@x", "application/dicom", b"", {"Content-ID": "<d@x>"}))
    with pytest.raises(ValueError):
        MtomWriter(ENVELOPE, boundary="x" * 71)
    with pytest.raises(ValueError):
        MtomWriter(ENVELOPE, action='urn:"\r\n')


def test_writer_streams_chunks_without_concatenation() -> None:
    chunks = [b"A" * 10, b"", b"B" * 20, b"C" * 30]
    w = MtomWriter(ENVELOPE)
    w.add_part(OutgoingPart("a@x", "application/octet-stream", iter(chunks)))
    w.add_part(OutgoingPart("b@x", "application/octet-stream", b"bytes-body", {"X-Extra": "1"}))
    out = list(w.iter_bytes())
    # root, part head, 3 non-empty chunks, part head, body, close delimiter
    assert out[2:5] == [b"A" * 10, b"B" * 20, b"C" * 30]
    assert out[-1] == f"\r\n--{w.boundary}--\r\n".encode()
    assert b"X-Extra: 1\r\n" in out[5]
    assert w.content_length() is None


def test_lazily_made_parts_have_the_heads_of_parts_added_one_by_one() -> None:
    specs = [
        ("<1.tok@xca-gateway>", "application/dicom", {}),
        ("2.tok@xca-gateway", "application/dicom", {}),
        (" 3.tok@h\u00e9te ", "application/octet-stream", {}),
        ("4.tok@x", "application/dicom", {"X-Extra": "1"}),
        ("5.tok@x", "application/dicom", {}),
    ]
    one_by_one = MtomWriter(ENVELOPE, boundary="b0", root_content_id="root@x")
    lazy = MtomWriter(ENVELOPE, boundary="b0", root_content_id="root@x")
    for cid, content_type, headers in specs:
        one_by_one.add_part(OutgoingPart(cid, content_type, b"x", headers))
    lazy.add_parts(OutgoingPart(cid, ct, b"x", headers) for cid, ct, headers in specs)
    expected = list(one_by_one.iter_bytes())
    assert list(lazy.iter_bytes()) == expected
    assert expected[3] == b"\r\n--b0\r\nContent-Type: application/dicom\r\n" + (
        b"Content-Transfer-Encoding: binary\r\nContent-ID: <2.tok@xca-gateway>\r\n\r\n"
    )
    # Checked as they come, as add_part checks them.
    for cid, content_type in [
        ("<root@x>", "application/dicom"),
        ("a@x\r\nX-Evil: 1", "application/dicom"),
        ("a@x", "application/dicom\r\nX-Evil: 1"),
        ("<>", "application/dicom"),
    ]:
        w = MtomWriter(ENVELOPE, root_content_id="root@x")
        w.add_parts([OutgoingPart("ok@x", "application/dicom", b"1")])
        w.add_parts([OutgoingPart(cid, content_type, b"2")])
        with pytest.raises(ValueError):
            list(w.iter_bytes())


def test_writer_content_length() -> None:
    w, body = build({"a@x": b"x" * 1000, "b@x": b"yz"})
    assert w.content_length() == len(body)


async def test_writer_async_bodies() -> None:
    async def agen() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([i]) * 1000

    w = MtomWriter(ENVELOPE, action=ACTION)
    w.add_part(OutgoingPart("doc1@x", "application/dicom", agen()))
    w.add_part(OutgoingPart("doc2@x", "application/dicom", [b"sync", b"chunks"]))
    w.add_part(OutgoingPart("doc3@x", "application/dicom", b"plain"))
    out = [chunk async for chunk in w.aiter_bytes()]
    assert out[2:7] == [bytes([i]) * 1000 for i in range(5)]
    msg = read(w.content_type, b"".join(out))
    with msg:
        assert msg.attachments["doc1@x"].read_all() == b"".join(out[2:7])
        assert msg.attachments["doc2@x"].read_all() == b"syncchunks"
        assert msg.attachments["doc3@x"].read_all() == b"plain"


async def test_writer_sync_iteration_refuses_async_body() -> None:
    async def agen() -> AsyncIterator[bytes]:
        yield b"x"

    w = MtomWriter(ENVELOPE)
    w.add_part(OutgoingPart("a@x", "application/dicom", agen()))
    with pytest.raises(TypeError):
        list(w.iter_bytes())


# --- parser -----------------------------------------------------------------------------------


def test_round_trip_parser_and_reader() -> None:
    boundary = "MIMEBoundary_0123456789abcdef0123456789abcdef"
    payloads = nasty_payloads(boundary)
    w, body = build(payloads, boundary=boundary, root_content_id="root@x")
    parts = collect(parse_chunked(body, boundary, [1 << 16] * 100))
    assert [h.content_id for h, _ in parts] == ["root@x", *payloads]
    assert parts[0][1] == ENVELOPE
    assert [data for _, data in parts[1:]] == list(payloads.values())
    assert parts[1][0].headers["content-transfer-encoding"] == "binary"
    assert parts[1][0].content_type == "application/dicom"

    with read(w.content_type, body) as msg:
        assert msg.root == ENVELOPE
        assert msg.action == ACTION
        assert msg.root_content_id == "root@x"
        assert msg.root_content_type.startswith("application/xop+xml")
        assert list(msg.attachments) == list(payloads)
        for cid, data in payloads.items():
            att = msg.attachments[cid]
            assert isinstance(att, Attachment)
            assert (att.content_id, att.content_type, att.size) == (
                cid,
                "application/dicom",
                len(data),
            )
            assert att.file.tell() == 0
            assert att.read_all() == data
            assert b"".join(att.iter_chunks(7)) == data
        assert cid_from_href("cid:doc1%40x") in msg.attachments


def test_all_chunkings_give_identical_results() -> None:
    boundary = "MIMEBoundary_" + "f" * 32
    payloads = nasty_payloads(boundary)
    payloads["doc4@x"] = payloads["doc4@x"][:5000]  # keep the 1-byte run quick
    _, body = build(payloads, boundary=boundary)
    reference = collect(parse_chunked(body, boundary, [len(body)]))
    assert len(reference) == 1 + len(payloads)
    assert collect(parse_chunked(body, boundary, [1] * len(body))) == reference
    rng = random.Random(42)
    for _ in range(30):
        sizes = [rng.randint(1, 200) for _ in range(len(body))]
        assert collect(parse_chunked(body, boundary, sizes)) == reference
    for size in (2, 3, len(boundary) - 1, len(boundary) + 3, len(boundary) + 4, 4096):
        assert collect(parse_chunked(body, boundary, [size] * len(body))) == reference


def test_delimiter_split_at_every_offset() -> None:
    body = b"--b\r\nContent-ID: <x>\r\n\r\nhello\r\r\n--b\r\n\r\nsecond\r\n--b--"
    expected = [b"hello\r", b"second"]
    for cut in range(len(body) + 1):
        p = MultipartParser("b")
        events = p.feed(body[:cut]) + p.feed(body[cut:]) + p.close()
        assert [data for _, data in collect(events)] == expected, cut


def test_preamble_epilogue_padding_and_bare_lf_headers() -> None:
    body = (
        b"This is a preamble, with --b inside but not at line start.\r\n"
        b"--bX is not a delimiter either\r\n"
        b"--b \t \r\n"  # transport padding
        b"Content-Type: application/xop+xml;\n"
        b"  charset=UTF-8\n"  # folded header line
        b"content-id:<r@x>\n"
        b"\n"
        b"<root/>"
        b"\r\n--b\t\r\n"
        b"\r\n"  # no headers at all
        b"data with\r\n--bogus and \r\n--b- lines"
        b"\r\n--b--  \r\nepilogue ignored\r\n--b\r\nContent-ID: <z>\r\n\r\n"
    )
    p = MultipartParser("b")
    parts = collect(p.feed(body) + p.close())
    assert len(parts) == 2
    root_headers, root = parts[0]
    assert root == b"<root/>"
    assert root_headers.content_id == "r@x"
    assert root_headers.content_type == "application/xop+xml; charset=UTF-8"
    assert parts[1][0].headers == {}
    assert parts[1][0].content_type == "text/plain"
    assert parts[1][1] == b"data with\r\n--bogus and \r\n--b- lines"
    assert p.finished and p.part_count == 2
    assert p.feed(b"more epilogue") == []


def test_lf_only_message() -> None:
    body = (
        b"--MIME_b\nContent-Type: application/xop+xml\nContent-ID: <r@x>\n\n<r/>\n"
        b"--MIME_b\nContent-ID: <a@x>\n\nbinary\r\n\n--MIME_b--\n"
    )
    parts = collect(parse_chunked(body, "MIME_b", [1] * len(body)))
    assert [data for _, data in parts] == [b"<r/>", b"binary\r\n"]


def test_parser_limits_and_errors() -> None:
    with pytest.raises(MtomError):
        MultipartParser("")
    with pytest.raises(MtomError):
        MultipartParser("x" * 71)
    MultipartParser("x" * 70)
    with pytest.raises(MtomError):
        MultipartParser("bad\r\nboundary")

    p = MultipartParser("b", max_part_header_bytes=100)
    with pytest.raises(MtomError, match="headers too large"):
        p.feed(b"--b\r\nX-Long: " + b"a" * 200)
    with pytest.raises(MtomError):  # errors are sticky
        p.feed(b"\r\n\r\n")
    with pytest.raises(MtomError):
        p.close()

    p = MultipartParser("b", max_preamble_bytes=1000)
    with pytest.raises(MtomError, match="preamble"):
        for _ in range(100):
            p.feed(b"x" * 100)

    p = MultipartParser("b")
    with pytest.raises(MtomError, match="after multipart boundary"):
        p.feed(b"--b junk\r\n\r\n")

    p = MultipartParser("b")
    with pytest.raises(MtomError, match="malformed"):
        p.feed(b"--b\r\nno colon here\r\n\r\n")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no delimiter at all",
        b"--b\r\n",
        b"--b\r\nContent-ID: <a>\r\n",
        b"--b\r\nContent-ID: <a>\r\n\r\nunterminated body",
        b"--b\r\nContent-ID: <a>\r\n\r\nbody\r\n--b\r\n",
        b"--b\r\nContent-ID: <a>\r\n\r\nbody\r\n--b",
        b"--b\r\nContent-ID: <a>\r\n\r\nbody\r\n--b-",
    ],
)
def test_close_raises_when_unfinished(body: bytes) -> None:
    p = MultipartParser("b")
    p.feed(body)
    with pytest.raises(MtomError):
        p.close()


def test_max_parts_refused_early() -> None:
    tiny = b"".join(b"\r\n--b\r\nContent-ID: <p%d>\r\n\r\nx" % i for i in range(10_000))
    body = b"--b\r\nContent-ID: <root>\r\n\r\n<r/>" + tiny + b"\r\n--b--\r\n"
    p = MultipartParser("b", max_parts=100)
    fed = 0
    with pytest.raises(MtomError, match="too many MIME parts"):
        for i in range(0, len(body), 4096):
            p.feed(body[i : i + 4096])
            fed += 4096
    assert fed < len(body) // 20  # stopped within the first ~100 parts


# --- reader -----------------------------------------------------------------------------------


def test_large_attachment_spooled_to_disk(tmp_path: Path) -> None:
    big = random.Random(7).randbytes(5 << 20)
    w, body = build({"big@x": big, "small@x": b"tiny"})
    r = MtomRequestReader(
        w.content_type,
        max_root_bytes=4096,
        max_part_bytes=LIMITS["max_part_bytes"],
        max_total_bytes=LIMITS["max_total_bytes"],
        max_parts=LIMITS["max_parts"],
        spool_threshold=1 << 20,
        spool_dir=str(tmp_path),
    )
    for i in range(0, len(body), 65536):
        r.feed(body[i : i + 65536])
    with r.close() as msg:
        assert msg.root == ENVELOPE
        att = msg.attachments["big@x"]
        assert att.size == len(big)
        assert att.on_disk and att.file._rolled  # type: ignore[attr-defined]
        assert not msg.attachments["small@x"].on_disk
        assert att.read_all() == big
        assert b"".join(att.iter_chunks()) == big
    assert att.file.closed


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"max_root_bytes": len(ENVELOPE) - 1}, "root part exceeds"),
        ({"max_part_bytes": 999}, "exceeds 999 bytes"),
        ({"max_total_bytes": len(ENVELOPE) + 1500}, "message exceeds"),
        ({"max_parts": 2}, "too many MIME parts"),
    ],
)
def test_reader_limits(limits: dict[str, int], reason: str) -> None:
    w, body = build({"a@x": b"a" * 1000, "b@x": b"b" * 1000})
    read(w.content_type, body)  # fits with default limits
    with pytest.raises(MtomError, match=reason) as info:
        read(w.content_type, body, **limits)
    assert reason in info.value.reason


def test_reader_closes_spools_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[EncryptedSpool] = []

    def tracking(*args: Any, **kwargs: Any) -> EncryptedSpool:
        f = EncryptedSpool(*args, **kwargs)
        created.append(f)
        return f

    monkeypatch.setattr(mtom_module, "EncryptedSpool", tracking)
    w, body = build({"a@x": b"a" * 1000, "b@x": b"b" * 5000})
    r = MtomRequestReader(
        w.content_type,
        max_root_bytes=1 << 20,
        max_part_bytes=2000,
        max_total_bytes=1 << 20,
        max_parts=9,
    )
    with pytest.raises(MtomError):
        r.feed(body)
    assert len(created) == 2 and all(f.closed for f in created)
    with pytest.raises(MtomError):
        r.feed(b"more")


def _message(parts: list[tuple[str, bytes]], boundary: str = "bnd") -> bytes:
    out = b""
    for headers, data in parts:
        out += b"\r\n--" + boundary.encode() + b"\r\n" + headers.encode() + b"\r\n\r\n" + data
    return out[2:] + b"\r\n--" + boundary.encode() + b"--\r\n"


ROOT_HDR = 'Content-ID: <r@x>\r\nContent-Type: application/xop+xml; type="application/soap+xml"'
CT = 'multipart/related; type="application/xop+xml"; boundary=bnd'


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ('multipart/related; type="application/xop+xml"', b"", "without boundary"),
        (CT + ";x=" + "y", b"", None),  # valid header, but empty body
        ('multipart/related; type="text/xml"; boundary=bnd', b"", "unsupported"),
        ("multipart/mixed; boundary=bnd", b"", "expected multipart/related"),
        ("application/soap+xml", b"", "not a multipart"),
        ("multipart/related; boundary=" + "x" * 71, b"", "longer than 70"),
        (
            CT + '; start="<other@x>"',
            _message([(ROOT_HDR, b"<r/>"), ("Content-ID: <a@x>", b"a")]),
            "start part not found",
        ),
        (
            CT,
            _message(
                [(ROOT_HDR, b"<r/>"), ("Content-ID: <a@x>", b"1"), ("Content-ID: <a@x>", b"")]
            ),
            "duplicate Content-ID",
        ),
        (
            CT + '; start="<r@x>"',
            _message([(ROOT_HDR, b"<r/>"), ("Content-ID: <r@x>", b"1")]),
            "duplicate Content-ID",
        ),
        (CT, _message([(ROOT_HDR, b"<r/>"), ("X-No-Id: 1", b"1")]), "without Content-ID"),
        (
            CT,
            _message([(ROOT_HDR, b"<r/>"), ("Content-ID: <a>\r\nContent-ID: <b>", b"1")]),
            "duplicate content-id header",
        ),
        (CT, _message([("Content-Type: image/png", b"<r/>")]), "root part Content-Type"),
        (
            CT,
            _message([(ROOT_HDR + "\r\nContent-Transfer-Encoding: quoted-printable", b"<r/>")]),
            "Content-Transfer-Encoding",
        ),
        (
            CT,
            _message([(ROOT_HDR, b"<r/>"), ("Content-ID: <a>", b"unterminated")])[:-10],
            "without close delimiter",
        ),
        (CT, b"--bnd--\r\n", "no MIME parts"),
    ],
)
def test_reader_malformed(content_type: str, body: bytes, reason: str | None) -> None:
    with pytest.raises(MtomError) as info:
        read(content_type, body)
    if reason is not None:
        assert reason in info.value.reason


def test_reader_start_optional_and_root_not_first() -> None:
    # No start: first part is the root; no type param is tolerated.
    body = _message([(ROOT_HDR, b"<r/>"), ("Content-ID: <a@x>", b"A")])
    msg = read("multipart/related; boundary=bnd", body)
    assert msg.root == b"<r/>" and list(msg.attachments) == ["a@x"]
    # start pointing at a later part.
    body = _message([("Content-ID: <a@x>", b"A"), (ROOT_HDR, b"<r/>")])
    msg = read(CT + '; start="<r@x>"', body, chunk=1)
    assert msg.root == b"<r/>" and msg.attachments["a@x"].read_all() == b"A"
    assert msg.action is None


def test_reader_action_sources() -> None:
    body = _message([(ROOT_HDR + '; action="urn:from-part"', b"<r/>")])
    assert read(CT, body).action == "urn:from-part"
    ct = CT + '; start-info="application/soap+xml; action=\\"urn:from-start-info\\""'
    assert read(ct, body).action == "urn:from-start-info"
    body = _message([(ROOT_HDR, b"<r/>")])
    assert read(CT + '; action="urn:outer"', body).action == "urn:outer"


def test_reader_base64_part() -> None:
    body = _message(
        [
            (ROOT_HDR, b"<r/>"),
            (
                "Content-ID: <a@x>\r\nContent-Transfer-Encoding: base64",
                b"aGVs\r\nbG8g\r\nd29y\nbGQ=",
            ),
        ]
    )
    assert read(CT, body, chunk=3).attachments["a@x"].read_all() == b"hello world"
    bad = body.replace(b"bG8g", b"bG8")
    with pytest.raises(MtomError, match="base64"):
        read(CT, bad)


def test_cxf_style_message() -> None:
    """Response as Apache CXF writes it (uuid: boundary, root.message@cxf.apache.org)."""
    boundary = "uuid:8f6c3a2e-1b7d-4c55-9e0a-3f2d1c4b5a69"
    content_type = (
        'multipart/related; type="application/xop+xml"; '
        f'boundary="{boundary}"; start="<root.message@cxf.apache.org>"; '
        'start-info="application/soap+xml; action=\\"urn:ihe:iti:2007:'
        'CrossGatewayRetrieveResponse\\""'
    )
    envelope = (
        b'<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope"><soap:Body>'
        b'<xdsb:RetrieveDocumentSetResponse xmlns:xdsb="urn:ihe:iti:xds-b:2007">'
        b"<xdsb:DocumentResponse><xdsb:Document>"
        b'<xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" '
        b'href="cid:2f0a3c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b-1@urn%3Aihe%3Aiti%3Axds-b%3A2007"/>'
        b"</xdsb:Document></xdsb:DocumentResponse></xdsb:RetrieveDocumentSetResponse>"
        b"</soap:Body></soap:Envelope>"
    )
    dicom = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 10 + b"\r\n--uuid:"
    b = boundary.encode()
    body = (
        b"\r\n--" + b + b"\r\n"
        b'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"; '
        b'action="urn:ihe:iti:2007:CrossGatewayRetrieveResponse"\r\n'
        b"Content-Transfer-Encoding: binary\r\n"
        b"Content-ID: <root.message@cxf.apache.org>\r\n\r\n" + envelope + b"\r\n--" + b + b"\r\n"
        b"Content-Type: application/dicom\r\n"
        b"Content-Transfer-Encoding: binary\r\n"
        b"Content-ID: <2f0a3c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b-1@urn:ihe:iti:xds-b:2007>\r\n"
        b"\r\n" + dicom + b"\r\n--" + b + b"--"
    )
    assert is_mtom(content_type)
    for chunk in (1, 7, 1 << 20):
        with read(content_type, body, chunk=chunk) as msg:
            assert msg.root == envelope
            assert msg.action == "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"
            assert msg.root_content_type.startswith("application/xop+xml")
            href = "cid:2f0a3c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b-1@urn%3Aihe%3Aiti%3Axds-b%3A2007"
            att = msg.attachments[cid_from_href(href)]
            assert att.content_type == "application/dicom"
            assert att.read_all() == dicom


@pytest.mark.parametrize("cut", [1, 7, 64, 1000, 100_000])
def test_feed_views_gives_the_same_parts_as_feed_as_views(cut: int) -> None:
    boundary = "b0undary"
    body = bytes(range(256)) * 40
    wire = (
        b"--b0undary\r\nContent-ID: <root>\r\n\r\n<root/>"
        b"\r\n--b0undary\r\nContent-ID: <i1>\r\n\r\n" + body + b"\r\n--b0undary--\r\n"
    )

    def run(views: bool) -> list[tuple[str, bytes]]:
        parser = MultipartParser(boundary)
        out: list[tuple[str, bytes]] = []
        for pos in range(0, len(wire), cut):
            piece = wire[pos : pos + cut]
            # Pieces of one read may come split (chunk-size lines removed between them).
            events = (
                parser.feed_views([piece[: len(piece) // 2], memoryview(piece)[len(piece) // 2 :]])
                if views
                else parser.feed(piece)
            )
            for event in events:
                if isinstance(event, PartData):
                    assert isinstance(event.data, memoryview if views else bytes)
                    out.append(("data", bytes(event.data)))
                else:
                    out.append((type(event).__name__, b""))
        return out

    def merged(events: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        result: list[tuple[str, bytes]] = []
        for kind, data in events:
            if result and kind == "data" and result[-1][0] == "data":
                result[-1] = ("data", result[-1][1] + data)
            else:
                result.append((kind, data))
        return result

    expected = [
        ("PartStart", b""),
        ("data", b"<root/>"),
        ("PartEnd", b""),
        ("PartStart", b""),
        ("data", body),
        ("PartEnd", b""),
        ("Finished", b""),
    ]
    assert merged(run(views=False)) == expected
    assert merged(run(views=True)) == expected


def _drain_case(tail: list[bytes], max_bytes: int) -> tuple[list[bytes], Exception | None]:
    """Read the one wanted part of a reply, then drain it; what the source had left to give."""
    body = [
        b"--b\r\nContent-ID: <one>\r\n\r\nFIRST\r\n",
        b"--b\r\nContent-ID: <two>\r\n\r\nSECOND",
        b"\r\n--b--\r\n",
        *tail,
    ]
    left = list(body)

    async def chunks() -> AsyncIterator[bytes]:
        while left:
            yield left.pop(0)

    async def run() -> Exception | None:
        parts = MultipartStream(chunks(), "b", max_parts=8)
        headers = await parts.next_part()
        assert headers is not None and headers.content_id == "one"
        data = b""
        while not isinstance(event := await parts.next_event(), PartEnd):
            assert isinstance(event, PartData)
            data += event.data
        assert data == b"FIRST"
        try:
            await parts.drain(max_bytes)
        except Exception as exc:
            return exc
        return None

    return left, asyncio.run(run())


def test_drain_reads_the_reply_to_its_end() -> None:
    # The relay's last wanted part ended: the unreferenced part, the close delimiter and
    # what follows it on the connection are read, so the sender's write completes.
    left, error = _drain_case([b"epilogue"], max_bytes=1024)
    assert error is None
    assert left == []


def test_drain_is_bounded() -> None:
    left, error = _drain_case([b"x" * 100, b"y" * 100], max_bytes=120)
    assert isinstance(error, MtomError)
    assert left == []  # stopped at the piece that passed the bound
    left, error = _drain_case([b"x" * 100, b"y" * 100, b"z"], max_bytes=120)
    assert isinstance(error, MtomError) and left == [b"z"]


# --- in-place parsing of split input ----------------------------------------------------------


def _random_multipart(rng: random.Random, boundary: bytes) -> bytes:
    """A body whose parts are full of near-delimiters, with CRLF or bare LF framing,
    transport padding, folded headers, a preamble and an epilogue, sometimes malformed."""
    nl = rng.choice([b"\r\n", b"\n"])
    near = [
        b"\r\n--" + boundary[:-1],
        b"\n--" + boundary + b"-x",
        b"\r\r\n--" + boundary + b"X",
        b"--" + boundary,
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n--",
    ]
    out = [rng.choice([b"", b"preamble" + nl, b"x" * rng.randint(0, 300) + nl])]
    for i in range(rng.randint(1, 6)):
        out.append(b"--" + boundary + rng.choice([b"", b" \t", b"  "]) + nl)
        out.append(b"Content-ID: <p%d@x>" % i + nl)
        if rng.random() < 0.3:
            out.append(b"X-Folded: a" + nl + b"  b" + nl)
        out.append(nl)
        body = [rng.randbytes(rng.randint(0, 400)) if rng.random() < 0.5 else rng.choice(near)]
        for _ in range(rng.randint(0, 12)):
            near_or_random = rng.choice(near) if rng.random() < 0.5 else None
            body.append(near_or_random or rng.randbytes(rng.randint(0, 60)))
        out.append(b"".join(body) + nl)
    if rng.random() < 0.1:
        out.append(b"--" + boundary + b" junk" + nl)  # refused
    out.append(b"--" + boundary + b"--" + rng.choice([b"", nl + b"epilogue"]))
    return b"".join(out)


def _outcome(run: Any) -> tuple[list[tuple[str, bytes]], str | None]:
    """Merged events (adjacent data joined) and the error reason, if any."""
    merged: list[tuple[str, bytes]] = []

    def add(events: list[MultipartEvent]) -> None:
        for event in events:
            if isinstance(event, PartData):
                data = bytes(event.data)
                assert data  # no empty data events
                if merged and merged[-1][0] == "data":
                    merged[-1] = ("data", merged[-1][1] + data)
                else:
                    merged.append(("data", data))
            elif isinstance(event, PartStart):
                merged.append(("start", repr(event.headers).encode()))
            else:
                merged.append((type(event).__name__, b""))

    try:
        run(add)
    except MtomError as exc:
        return [], exc.reason  # events before the error depend on where the input was cut
    return merged, None


def _cuts(rng: random.Random, body: bytes, boundary: bytes) -> list[int]:
    """Cut points: random ones, and ones inside or around every delimiter and header end."""
    cuts = {rng.randint(0, len(body)) for _ in range(rng.randint(0, 12))}
    at = body.find(b"--" + boundary)
    while at >= 0:
        cuts.update(at + k for k in rng.sample(range(-2, len(boundary) + 5), 3))
        at = body.find(b"--" + boundary, at + 1)
    at = body.find(b"\n\n")
    if at >= 0:
        cuts.update((at, at + 1))
    return sorted(c for c in cuts if 0 <= c <= len(body))


def _parse_one_shot(boundary: str, body: bytes, add: Any) -> None:
    parser = MultipartParser(boundary, max_parts=5)
    add(parser.feed(body))
    add(parser.close())


def _parse_split(boundary: str, pieces: list[bytes], rng: random.Random, add: Any) -> None:
    """Reads of 1-4 pieces, each a range of a larger buffer (bytes the parser must not look
    at around it: near-delimiters), sometimes with empty pieces or as memoryviews."""
    parser = MultipartParser(boundary, max_parts=5)
    i = 0
    while i < len(pieces):
        count = rng.randint(1, 4)
        spans: list[tuple[bytes | bytearray, int, int]] = []
        for piece in pieces[i : i + count]:
            pad = rng.randbytes(rng.randint(0, 3)) + b"\r\n--" + boundary.encode()
            buffer = bytearray(pad + piece + pad) if rng.random() < 0.5 else pad + piece
            spans.append((buffer, len(pad), len(pad) + len(piece)))
            if rng.random() < 0.1:
                spans.append((buffer, 0, 0))  # empty piece
        i += count
        if rng.random() < 0.3:
            add(parser.feed_views([memoryview(b)[s:e] for b, s, e in spans]))
        else:
            add(parser.feed_spans(spans))
    add(parser.close())


@pytest.mark.parametrize("seed", range(8))
def test_split_parsing_equals_one_shot(seed: int) -> None:
    # Any split of the input (inside delimiters, between CR and LF, inside the close
    # delimiter's "--" and header blocks, one-byte and empty pieces, several per read) gives
    # the events and data of parsing the whole body at once; errors too.
    rng = random.Random(seed)
    for _ in range(150):
        boundary = rng.choice([b"b", b"MIMEBoundary_" + rng.randbytes(8).hex().encode()])
        body = _random_multipart(rng, boundary)
        expected = _outcome(functools.partial(_parse_one_shot, boundary.decode(), body))
        cuts = _cuts(rng, body, boundary)
        if rng.random() < 0.2:  # one-byte pieces around a random spot
            spot = rng.randint(0, len(body))
            cuts = sorted({*cuts, *range(spot, min(len(body), spot + 80))})
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        split = functools.partial(_parse_split, boundary.decode(), pieces, rng)
        assert _outcome(split) == expected, (seed, body, cuts)


def test_multipart_stream_over_reads_of_receive_buffers() -> None:
    # What RelayResponse.aiter_reads yields: per read, ranges of receive buffers (one range
    # is searched in place, several are joined); the parts come out whole and in order.
    boundary = "MIMEBoundary_" + "a" * 32
    payloads = nasty_payloads(boundary)
    _, body = build(payloads, boundary=boundary)
    rng = random.Random(7)
    reads: list[ReadPieces] = []
    pos = 0
    while pos < len(body):
        spans: list[tuple[bytes | bytearray, int, int]] = []
        for _ in range(rng.choice([1, 1, 3])):
            size = rng.randint(1, 70_000)
            buffer = bytearray(b"\r\n--" + boundary.encode() + body[pos : pos + size] + b"--")
            spans.append((buffer, len(boundary) + 4, len(buffer) - 2))
            pos += size
        reads.append(ReadPieces(spans))

    async def chunks() -> AsyncIterator[ReadPieces]:
        for read in reads:
            yield read

    async def run() -> list[tuple[str | None, bytes]]:
        parts = MultipartStream(chunks(), boundary, max_parts=10)
        out = []
        while (headers := await parts.next_part()) is not None:
            out.append((headers.content_id, await parts.read_part(1 << 20)))
        return out

    got = asyncio.run(run())
    assert got[1:] == list(payloads.items())
