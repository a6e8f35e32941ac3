"""A streamed (chunked) response's writes: pieces gathered while the producer has them at hand,
one HTTP chunk per gathering, nothing held back while the producer waits, no terminating chunk
after a failure; over real TLS sockets, the client decoding with h11."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator

import h11
import pytest

from xca_gateway.protocol.http_server import (
    GATHER_BYTES,
    SMALL_PIECE,
    ChunkBatch,
    HttpServer,
    Request,
    Response,
)
from xca_gateway.security.dev_pki import DevPki


def _decode(data: bytes) -> tuple[bytes, int, bool]:
    """A chunked response's body, its number of chunks, and whether it ended properly."""
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.receive_data(data)
    body, chunks = bytearray(), 0
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            chunks += event.chunk_start
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body), chunks, True
        elif event is h11.NEED_DATA:
            return bytes(body), chunks, False
        else:
            assert isinstance(event, h11.Response)


def _piece(rng: random.Random) -> bytes | memoryview:
    if rng.random() < 0.5:  # a part head, a delimiter
        return rng.randbytes(rng.randint(1, SMALL_PIECE - 1))
    data = rng.randbytes(rng.randint(SMALL_PIECE, 40_000))
    return memoryview(data)[rng.randint(0, 9) :]  # a relay's piece: a view into its buffer


def test_batch_is_one_chunk_with_small_pieces_joined() -> None:
    rng = random.Random(22)
    for _ in range(300):
        batch, wire, sent = ChunkBatch(), bytearray(b"HTTP/1.1 200 OK\r\n"), bytearray()
        wire += b"transfer-encoding: chunked\r\n\r\n"
        takes, before = 0, b""
        for _ in range(rng.randint(1, 6)):
            pieces = [_piece(rng) for _ in range(rng.randint(1, 12))]
            for piece in pieces:
                batch.add(piece)
                sent += piece
            out = batch.take(before)
            takes += 1
            assert batch.size == 0
            large = sum(len(p) >= SMALL_PIECE for p in pieces)
            # The framing and the small pieces before the first large one: one buffer; then
            # each large piece as it came, each run of small ones after it as one buffer.
            assert len(out) <= 1 + 2 * large
            assert all(len(b) >= SMALL_PIECE for b in out[1:] if isinstance(b, memoryview))
            for buffer in out:
                wire += buffer
            before = b"\r\n"
        wire += before + b"0\r\n\r\n"
        body, chunks, complete = _decode(bytes(wire))
        assert complete and body == sent and chunks == takes


def _contexts(pki: DevPki) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.communities["alpha"].cert, pki.communities["alpha"].key)
    client = ssl.create_default_context(cafile=str(pki.ca))
    client.check_hostname = False
    return server, client


async def _get(port: int, context: ssl.SSLContext, seen: asyncio.Event | None = None) -> bytes:
    """The raw response to a GET (read to the server's close); ``seen`` is set once the
    bytes received so far hold the marker the waiting producer sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = bytearray()
        async with asyncio.timeout(20):
            while piece := await reader.read(1 << 20):
                data += piece
                if seen is not None and b"<waiting>" in data:
                    seen.set()
        return bytes(data)
    except (ConnectionError, ssl.SSLError):  # reset after a failure: what came is returned
        return bytes(data)
    finally:
        writer.close()


async def _serve(pki: DevPki, body: AsyncIterator[bytes]) -> tuple[HttpServer, ssl.SSLContext]:
    server_context, client_context = _contexts(pki)

    async def app(request: Request) -> Response:
        return Response(200, [("content-type", "application/octet-stream")], body)

    server = HttpServer(app, ssl_context=server_context)
    await server.start("127.0.0.1", 0)
    return server, client_context


async def test_pieces_at_hand_go_out_as_one_chunk_per_wait(pki: DevPki) -> None:
    rng = random.Random(5)
    groups = [[_piece(rng) for _ in range(rng.randint(1, 6))] for _ in range(40)]
    assert all(sum(map(len, group)) < GATHER_BYTES for group in groups)
    groups.append([rng.randbytes(100_000) for _ in range(12)])  # past GATHER_BYTES: split
    expected = b"".join(bytes(p) for group in groups for p in group)

    async def body() -> AsyncIterator[bytes]:
        for group in groups:
            for piece in group:
                yield piece  # type: ignore[misc]  # bytes-like, as a relay's pieces are
            await asyncio.sleep(0)  # the producer waits (a relay's next socket read)

    server, client_context = await _serve(pki, body())
    try:
        received, chunks, complete = _decode(await _get(server.port, client_context))
    finally:
        await server.close(1.0)
    assert complete and received == expected
    # One chunk per group the producer had at hand; the last group goes out in writes of
    # GATHER_BYTES or more, then what is left as it waits.
    last, gathered = 0, 0
    for piece in groups[-1]:
        gathered += len(piece)
        if gathered >= GATHER_BYTES:
            last, gathered = last + 1, 0
    assert last >= 1
    assert chunks == len(groups) - 1 + last + (gathered > 0)


async def test_nothing_is_held_back_while_the_producer_waits(pki: DevPki) -> None:
    seen = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"--boundary\r\n<waiting>"  # small: gathered, then written as the producer waits
        await seen.wait()  # only once the client has it
        yield b"rest" * 1000

    server, client_context = await _serve(pki, body())
    try:
        received, _, complete = _decode(await _get(server.port, client_context, seen))
    finally:
        await server.close(1.0)
    assert complete and received == b"--boundary\r\n<waiting>" + b"rest" * 1000


async def test_a_failing_producer_leaves_no_terminating_chunk(pki: DevPki) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"x" * GATHER_BYTES  # written at once
        await asyncio.sleep(0)
        yield b"head"  # gathered, never written
        raise RuntimeError("the source died mid-study")

    server, client_context = await _serve(pki, body())
    try:
        received, _, complete = _decode(await _get(server.port, client_context))
    finally:
        await server.close(1.0)
    assert not complete
    assert received == b"x" * len(received) and len(received) <= GATHER_BYTES


@pytest.mark.parametrize("pieces", [1, 50])
async def test_a_slow_reader_holds_the_producer_back(pki: DevPki, pieces: int) -> None:
    """Backpressure: with a reader that does not read, the producer is not drained to its
    end into memory (it stops within a few MB of what the socket buffers hold)."""
    produced = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(2000):
            for _ in range(pieces):
                produced += 1024 * 1024 // pieces
                yield b"y" * (1024 * 1024 // pieces)
            await asyncio.sleep(0)

    server, client_context = await _serve(pki, body())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client_context)
    try:
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readexactly(1000)
        for _ in range(100):  # the producer runs until the writes stall
            await asyncio.sleep(0.01)
        assert produced < 64 * 1024 * 1024
    finally:
        writer.close()
        await server.close(1.0)
