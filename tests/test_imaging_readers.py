"""An opened retrieve's instance readers (the response's part bodies): the idle timeout of the
sources, closing mid-instance, the end of each route; and the MTOM writer pulling them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from lxml import etree

from xca_gateway.imaging.request import DocumentRequest, RetrieveImagingDocumentSetRequest
from xca_gateway.imaging.response import (
    DICOM_MIME_TYPE,
    DocumentResponse,
    InvalidImagingResponse,
    document_response,
)
from xca_gateway.imaging.retrieve import ImagingRetrieval, Route, open_retrieval
from xca_gateway.imaging.sources import InstanceStreamError, PlannedInstance, Retrieval
from xca_gateway.protocol import mtom
from xca_gateway.protocol.namespaces import XDSB, XOP
from xca_gateway.xds.ebrs import RegistryError

DOCS = tuple(DocumentRequest("1.2", "1.2.3", "1.9", f"1.2.3.{n}") for n in range(3))


class Source(Retrieval):
    """Each instance: ``pieces`` pieces, then (for instance ``stall_at``) silence."""

    def __init__(self, pieces: int = 2, stall_at: int | None = None) -> None:
        super().__init__([PlannedInstance(d, handle=n) for n, d in enumerate(DOCS)], [])
        self.pieces = pieces
        self.stall_at = stall_at
        self.closed = False
        self.finished = False
        self.streams_closed = 0

    async def stream(self, instance: PlannedInstance) -> AsyncIterator[bytes]:
        try:
            for n in range(self.pieces):
                yield b"%d:%d;" % (instance.handle, n)  # type: ignore[str-format]
            if instance.handle == self.stall_at:
                await asyncio.Event().wait()
        finally:
            self.streams_closed += 1

    async def finish(self) -> None:
        self.finished = True

    async def aclose(self) -> None:
        self.closed = True


async def opened(source: Source, idle_timeout: float = 60.0) -> ImagingRetrieval:
    async def open_(_request: RetrieveImagingDocumentSetRequest) -> Retrieval:
        return source

    def unavailable(reason: str, count: int) -> RegistryError:
        return RegistryError("XDSRepositoryError", reason)

    request = RetrieveImagingDocumentSetRequest(DOCS, ())
    return await open_retrieval(
        request, [(Route("source", open_, unavailable), DOCS)], [], idle_timeout=idle_timeout
    )


async def read_all(reader: mtom.PartReader) -> bytes:
    data = b""
    while piece := await reader.read():
        data += piece
    return data


async def test_every_instance_is_read_and_the_route_finished_then_closed() -> None:
    source = Source()
    retrieval = await opened(source)
    bodies = [await read_all(retrieval.reader(n)) for n in range(3)]
    assert bodies == [b"0:0;0:1;", b"1:0;1:1;", b"2:0;2:1;"]
    assert source.finished and source.closed and retrieval.closed
    assert source.streams_closed == 3


async def test_a_source_that_goes_quiet_fails_the_instance_not_the_task() -> None:
    source = Source(stall_at=1)
    retrieval = await opened(source, idle_timeout=0.05)
    assert await read_all(retrieval.reader(0)) == b"0:0;0:1;"
    reader = retrieval.reader(1)
    assert await reader.read() == b"1:0;"
    assert await reader.read() == b"1:1;"
    with pytest.raises(InstanceStreamError, match=r"1\.2\.3\.1: no data for 0\.05 s"):
        await reader.read()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert source.closed and retrieval.closed  # every route released
    with pytest.raises(InstanceStreamError, match="abandoned"):
        await reader.read()  # never an end that would look like a complete instance


async def test_a_slow_consumer_is_not_an_idle_source() -> None:
    source = Source()
    retrieval = await opened(source, idle_timeout=0.05)
    reader = retrieval.reader(0)
    pieces = []
    while piece := await reader.read():
        pieces.append(piece)
        await asyncio.sleep(0.15)  # the consumer, not the source, is slow
    assert pieces == [b"0:0;", b"0:1;"]


async def test_closing_a_reader_mid_instance_releases_every_route() -> None:
    source = Source()
    retrieval = await opened(source)
    reader = retrieval.reader(0)
    assert await reader.read() == b"0:0;"
    await reader.aclose()
    assert source.closed and retrieval.closed and source.streams_closed == 1
    with pytest.raises(InstanceStreamError, match=r"instance 1\.2\.3\.0: the response was"):
        await reader.read()
    with pytest.raises(InstanceStreamError, match="abandoned"):
        await retrieval.reader(1).read()


async def test_a_source_with_no_bytes_fails_the_instance() -> None:
    source = Source(pieces=0)
    retrieval = await opened(source)
    with pytest.raises(InstanceStreamError, match="sent no data"):
        await retrieval.reader(0).read()
    assert source.closed


async def test_the_writer_pulls_readers_and_counts_every_byte_it_wrote() -> None:
    source = Source()
    retrieval = await opened(source)
    writer = mtom.MtomWriter(b"<root/>")
    writer.add_parts(
        mtom.OutgoingPart(f"{n}@test", "application/dicom", retrieval.reader(n)) for n in range(3)
    )
    counted: list[int] = []
    body = b"".join([c async for c in writer.aiter_bytes(count=counted.append, count_every=64)])
    assert sum(counted) == len(body) and len(counted) > 1
    assert b"\r\n\r\n0:0;0:1;\r\n--" in body and body.endswith(b"--\r\n")
    assert source.finished and retrieval.closed


async def test_a_writer_left_early_releases_the_routes() -> None:
    source = Source()
    retrieval = await opened(source)
    writer = mtom.MtomWriter(b"<root/>")
    writer.add_parts(
        mtom.OutgoingPart(f"{n}@test", "application/dicom", retrieval.reader(n)) for n in range(3)
    )
    chunks = writer.aiter_bytes()
    async for chunk in chunks:
        if chunk == b"0:0;":
            break
    await chunks.aclose()  # type: ignore[attr-defined]
    assert source.closed and retrieval.closed


def test_a_document_response_is_read_from_the_first_child_of_each_name() -> None:
    element = etree.fromstring(
        f'<x:DocumentResponse xmlns:x="{XDSB}" xmlns:xop="{XOP}">'
        "<x:HomeCommunityId> urn:oid:1.2 </x:HomeCommunityId>"
        "<x:RepositoryUniqueId>1.9</x:RepositoryUniqueId><!-- a comment -->"
        "<x:DocumentUniqueId>1.2.3</x:DocumentUniqueId>"
        "<x:DocumentUniqueId>1.2.4</x:DocumentUniqueId>"
        '<x:Document><xop:Include href="cid:a%40b"/></x:Document></x:DocumentResponse>'
    )
    assert document_response(element) == DocumentResponse(
        home_community_id="urn:oid:1.2",
        repository_unique_id="1.9",
        document_unique_id="1.2.3",
        mime_type=DICOM_MIME_TYPE,
        content_id="a@b",
    )
    document = element[-1]
    element.remove(document)
    with pytest.raises(InvalidImagingResponse, match=r"1\.2\.3 without Document"):
        document_response(element)
