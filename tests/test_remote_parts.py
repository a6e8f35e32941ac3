"""The peer's reply read part by part (RemoteRetrieval, MultipartStream.poll), pure logic.

A relay takes each MIME event as the last read already parsed it (``poll``, no coroutine) and
only awaits the socket when none is left; these tests pin that this changes nothing a peer can
see or abuse: parts out of order, unreferenced parts, the reorder bound, parts that never
come, truncation, base64 parts, and the header-line cache's bound.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator

import pytest

from xca_gateway.imaging.remote import RemoteRetrieval
from xca_gateway.imaging.request import DocumentRequest
from xca_gateway.imaging.sources import InstanceStreamError, PlannedInstance
from xca_gateway.protocol import mtom
from xca_gateway.protocol.http_client import ReadPieces
from xca_gateway.protocol.mtom import MultipartEvent, MultipartParser, PartData, PartStart
from xca_gateway.protocol.multipart import MultipartStream

BOUNDARY = "MIMEBoundary_0123456789abcdef"


def reply(parts: list[tuple[str, bytes]], *, close: bool = True, b64: bool = False) -> bytes:
    out = [f"--{BOUNDARY}\r\nContent-ID: <root>\r\n\r\n<root/>".encode()]
    for cid, body in parts:
        encoding = "base64" if b64 else "binary"
        head = f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
        head += f"Content-Transfer-Encoding: {encoding}\r\nContent-ID: <{cid}>\r\n\r\n"
        out += [head.encode(), base64.encodebytes(body) if b64 else body]
    if close:
        out.append(f"\r\n--{BOUNDARY}--\r\n".encode())
    return b"".join(out)


async def reads(data: bytes, size: int) -> AsyncIterator[ReadPieces]:
    """``data`` as the relay client hands it on: reads of ``size`` bytes, as buffer ranges."""
    for start in range(0, len(data), size):
        yield ReadPieces([(bytearray(data), start, min(start + size, len(data)))])


class _Reply:
    async def aclose(self) -> None:
        pass


async def retrieval(
    data: bytes, wanted: list[str], *, read_size: int, max_reorder_bytes: int = 1 << 20
) -> RemoteRetrieval:
    """The retrieval after the root part, as ``_read_root`` leaves it (one event loop: the
    reads are an async generator of that loop)."""
    parts = MultipartStream(reads(data, read_size), BOUNDARY, max_parts=64)
    planned = [
        PlannedInstance(DocumentRequest("1.2", "1.2.3", "1.3.6", f"1.2.3.{i}", None), handle=cid)
        for i, cid in enumerate(wanted)
    ]
    remote = RemoteRetrieval(
        planned,
        [],
        response=_Reply(),  # type: ignore[arg-type]
        parts=parts,
        what="peer",
        max_part_bytes=1 << 24,
        max_reorder_bytes=max_reorder_bytes,
    )
    assert await parts.next_part() is not None
    await parts.read_part(1024)
    return remote


async def read_all(remote: RemoteRetrieval, instance: PlannedInstance) -> bytes:
    reader = remote.reader(instance)
    out = bytearray()
    while chunk := await reader.read():
        out += chunk
    return bytes(out)


async def read_first(data: bytes, wanted: list[str], **options: int) -> bytes:
    remote = await retrieval(data, wanted, **options)
    return await read_all(remote, remote.planned[0])


@pytest.mark.parametrize("read_size", [7, 100, 4096, 1 << 20])
def test_parts_out_of_order_and_unreferenced_ones_come_out_whole_and_in_order(
    read_size: int,
) -> None:
    rng = random.Random(read_size)
    bodies = {cid: rng.randbytes(rng.randint(1, 3000)) for cid in ("a", "b", "c", "x")}
    # The peer sends c first, an unreferenced x in between, then a and b.
    data = reply([(cid, bodies[cid]) for cid in ("c", "x", "a", "b")])

    async def run() -> list[bytes]:
        remote = await retrieval(data, ["a", "b", "c"], read_size=read_size)
        return [await read_all(remote, p) for p in remote.planned]

    assert asyncio.run(run()) == [bodies["a"], bodies["b"], bodies["c"]]


def test_parts_held_back_beyond_the_reorder_bound_fail_the_instance() -> None:
    data = reply([("b", b"B" * 5000), ("a", b"A" * 10)])
    with pytest.raises(InstanceStreamError, match="broken MTOM reply: MIME part larger"):
        asyncio.run(read_first(data, ["a", "b"], read_size=1000, max_reorder_bytes=4000))


def test_a_part_that_never_comes_fails_its_instance() -> None:
    with pytest.raises(InstanceStreamError, match="<z> never came"):
        asyncio.run(read_first(reply([("a", b"A" * 10)]), ["z"], read_size=64))


@pytest.mark.parametrize("cut", [5, 40, 2500])
def test_a_reply_cut_inside_a_part_is_never_a_complete_instance(cut: int) -> None:
    data = reply([("a", b"A" * 3000)], close=False)[: -3000 + cut]
    with pytest.raises(InstanceStreamError, match="broken MTOM reply"):
        asyncio.run(read_first(data, ["a"], read_size=256))


def test_polling_gives_the_events_of_awaiting_each_one_base64_decoded() -> None:
    rng = random.Random(3)
    parts = [(f"p{i}", rng.randbytes(rng.randint(1, 2000))) for i in range(6)]
    data = reply(parts, b64=True)

    async def events(poll: bool) -> list[tuple[str, bytes]]:
        stream = MultipartStream(reads(data, 333), BOUNDARY, max_parts=16)
        out: list[tuple[str, bytes]] = []
        while not stream.finished:
            event = (stream.poll() if poll else None) or await stream.next_event()
            out.append((type(event).__name__, bytes(getattr(event, "data", b""))))
        assert stream.poll() is None
        return out

    polled, awaited = asyncio.run(events(True)), asyncio.run(events(False))
    assert polled == awaited
    assert b"".join(d for kind, d in polled if kind == "PartData").endswith(parts[-1][1])


def test_header_lines_are_parsed_alike_from_the_cache_and_the_cache_stays_bounded() -> None:
    def headers(block: bytes) -> list[mtom.PartHeaders]:
        parser = MultipartParser("b", max_parts=10_000)
        events: list[MultipartEvent] = parser.feed(b"--b\r\n" + block + b"\r\n\r\nx\r\n--b--")
        return [e.headers for e in events if isinstance(e, PartStart)]

    block = b"Content-Type: application/dicom \r\nX-Same:  v\r\nContent-ID: <a@x>"
    assert headers(block) == headers(block)  # the second time from the cache
    assert headers(block)[0].headers == {
        "content-type": "application/dicom",
        "x-same": "v",
        "content-id": "<a@x>",
    }
    # A name seen before, in a line that is not a header line, is still refused.
    with pytest.raises(mtom.MtomError, match="malformed"):
        headers(b"Content-Type application/dicom")
    for i in range(2000):  # a peer sending ever new lines
        assert headers(b"X-%d: %d" % (i, i))[0].headers == {f"x-{i}": str(i)}
    assert len(mtom._HEADER_LINES) <= mtom._HEADER_CACHE_MAX
    assert len(mtom._HEADER_NAMES) <= mtom._HEADER_CACHE_MAX
    assert all(len(line) <= mtom._HEADER_LINE_CHARS for line in mtom._HEADER_LINES)


def test_part_data_is_a_view_of_the_receive_buffer_not_a_copy() -> None:
    buffer = bytearray(reply([("a", b"A" * 5000)]))
    stream = MultipartStream(reads(bytes(buffer), len(buffer)), BOUNDARY, max_parts=4)

    async def first_data() -> PartData:
        while True:
            event = stream.poll() or await stream.next_event()
            if isinstance(event, PartData) and len(event.data) == 5000:
                return event

    data = asyncio.run(first_data()).data
    assert isinstance(data, memoryview) and data.readonly
