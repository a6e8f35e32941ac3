"""The lean relay client: body framing (pure) and real mutual-TLS exchanges on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
from collections.abc import AsyncIterator

import pytest

from xca_gateway.protocol.http_client import (
    BULK_AFTER,
    RelayClient,
    RelayConnectError,
    RelayError,
    _BodyDecoder,
    _Reader,
)
from xca_gateway.protocol.http_server import HttpServer, Request, Response, ServerTimeouts
from xca_gateway.protocol.peer_client import PeerClient, PeerError
from xca_gateway.protocol.tls import client_context, server_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import OutboundConfig, TlsConfig

# ------------------------------------------------------------------------ body framing (pure)


def decode_in_pieces(decoder: _BodyDecoder, wire: bytes, cut: int) -> bytes:
    out = bytearray()
    for pos in range(0, len(wire), cut):
        for piece in decoder.feed(wire[pos : pos + cut]):
            out += piece
    return bytes(out)


CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 16, len(CHUNKED)])
def test_chunked_body_is_decoded_whatever_the_read_boundaries(cut: int) -> None:
    decoder = _BodyDecoder(length=None, chunked=True)
    assert decode_in_pieces(decoder, CHUNKED, cut) == b"hello world0123456789"
    assert decoder.done


def test_bytes_after_the_body_are_kept_as_leftover_not_body() -> None:
    decoder = _BodyDecoder(length=4, chunked=False)
    assert b"".join(decoder.feed(b"abcdEXTRA")) == b"abcd"
    assert decoder.done and decoder.leftover == b"EXTRA"


def test_body_pieces_are_views_of_the_received_buffer_not_copies() -> None:
    data = b"x" * 1000
    pieces = _BodyDecoder(length=1000, chunked=False).feed(data)
    assert len(pieces) == 1 and pieces[0].obj is data


async def test_bytes_handed_out_stay_what_was_received() -> None:
    # A receive buffer is never written again: views held downstream (a PartData on its
    # way to the consumer) keep the bytes they were given while more arrives.
    reader = _Reader()
    kept: list[tuple[memoryview, bytes]] = []
    for i in range(400):  # 128 small buffers before BULK_AFTER, then full-size ones
        view = reader.get_buffer(-1)
        data = hashlib.sha256(b"%d" % i).digest() * (len(view) // 32)
        view[: len(data)] = data
        del view
        reader.buffer_updated(len(data))
        spans = await reader.read_spans()
        for buf, start, end in spans:
            piece = memoryview(buf)[start:end]
            if i % 7 == 0:  # still held downstream
                kept.append((piece, bytes(piece)))
        del spans, buf, piece
        if i % 11 == 0:
            kept = kept[len(kept) // 2 :]
    for view, content in kept:
        assert bytes(view) == content
    assert reader._received > BULK_AFTER


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not hex
        b"-5\r\nhello\r\n0\r\n\r\n",  # negative
        b"3\r\nhello\r\n0\r\n\r\n",  # data longer than announced
        b"F" * 5000,  # endless size line
    ],
)
def test_malformed_chunked_bodies_are_refused(wire: bytes) -> None:
    with pytest.raises(RelayError):
        _BodyDecoder(length=None, chunked=True).feed(wire)


def _chunked_wire(rng: random.Random) -> tuple[bytes, bytes | None]:
    """A chunked body (sizes in either case, leading zeros, extensions, trailers) and its
    payload; sometimes with one framing byte changed (payload None)."""
    payload, wire = bytearray(), bytearray()
    for _ in range(rng.randint(0, 8)):
        data = rng.randbytes(rng.choice([1, 2, 15, 16, 300, 5000]))
        size = rng.choice(["%x", "%X", "00%x"]) % len(data)
        extension = rng.choice([b"", b"", b";name=value", b" ;x"])
        wire += size.encode() + extension + b"\r\n" + data + b"\r\n"
        payload += data
    wire += rng.choice([b"0\r\n\r\n", b"000\r\nTrailer: x\r\n\r\n", b"0;e\r\n\r\n"])
    if rng.random() < 0.3:  # framing damaged: a size digit, a CR or an LF changed
        framing = [i for i, c in enumerate(wire) if c in b"0123456789abcdefABCDEF\r\n"]
        at = rng.choice(framing)
        wire[at] = rng.choice(b"0x_;zF\r\n ")
        return bytes(wire), None
    return bytes(wire), bytes(payload)


def _decoded(wire: bytes, cuts: list[int]) -> tuple[bytes, bool] | str:
    decoder = _BodyDecoder(length=None, chunked=True)
    out = bytearray()
    try:
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            # Each piece a range of a larger buffer, as the relay client's receive buffers.
            buffer = b"\r\n7\r\n" + wire + b"\r\n5\r\n"
            for buf, a, b in decoder.feed_span(buffer, start + 5, end + 5):
                out += buf[a:b]
    except RelayError:
        return "refused"  # which complaint comes first depends on where the cuts fall
    return bytes(out), decoder.done


@pytest.mark.parametrize("seed", range(4))
def test_chunk_heads_read_whole_or_cut_anywhere_give_the_same_answers(seed: int) -> None:
    # Whole pieces take the one-match path for a chunk's CRLF and the next size line; one-byte
    # pieces never can: both must agree, on sound and on damaged framing alike.
    rng = random.Random(seed)
    for _ in range(400):
        wire, payload = _chunked_wire(rng)
        whole = _decoded(wire, [])
        assert _decoded(wire, list(range(1, len(wire)))) == whole
        cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, 5)))
        assert _decoded(wire, cuts) == whole
        if payload is not None:
            assert whole == (payload, True)


def test_eof_before_the_end_is_an_error_except_for_until_close_bodies() -> None:
    short = _BodyDecoder(length=10, chunked=False)
    short.feed(b"12345")
    with pytest.raises(RelayError, match="before the end"):
        short.eof()
    chunked = _BodyDecoder(length=None, chunked=True)
    chunked.feed(b"5\r\nhel")
    with pytest.raises(RelayError):
        chunked.eof()
    until_close = _BodyDecoder(length=None, chunked=False)
    assert b"".join(until_close.feed(b"anything")) == b"anything"
    until_close.eof()
    assert until_close.done


# ------------------------------------------------------------------- over real TLS sockets


def server_tls(pki: DevPki) -> ssl.SSLContext:
    peer = pki.communities["alpha"]
    return server_context(
        TlsConfig(certificate=peer.cert, private_key=peer.key, trust_store=pki.ca)
    )


def client_tls(pki: DevPki) -> ssl.SSLContext:
    peer = pki.communities["beta"]
    return client_context(pki.ca, peer.cert, peer.key)


class StreamingApp:
    """Answers a POST with its body repeated ``times`` times, streamed (chunked)."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []

    async def __call__(self, request: Request) -> Response:
        payload = await request.read(1 << 20)
        self.peers.append((request.peer.address, request.peer.port))
        times = int(request.header("x-times") or "1")

        async def body() -> AsyncIterator[bytes]:
            for _ in range(times):
                yield payload

        return Response(200, [("content-type", "application/octet-stream")], body())


async def read_all(client: RelayClient, url: str, payload: bytes, times: int) -> bytes:
    response = await client.post(url, payload, [("x-times", str(times))])
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    data = bytearray()
    async for piece in response.aiter_raw():
        data += piece
    await response.aclose()
    return bytes(data)


async def test_streamed_replies_arrive_whole_over_one_kept_alive_connection(pki: DevPki) -> None:
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        url = f"https://127.0.0.1:{server.port}/echo"
        payload = bytes(range(256)) * 1024  # 256 KiB
        for times in (1, 40, 3):
            assert await read_all(client, url, payload, times) == payload * times
        # All three exchanges used the same TCP connection (same client port).
        assert len(set(app.peers)) == 1
    finally:
        await client.aclose()
        await server.close()


async def test_connection_closed_while_idle_is_replaced_transparently(pki: DevPki) -> None:
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki), timeouts=ServerTimeouts(keepalive=0.2))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        url = f"https://127.0.0.1:{server.port}/echo"
        assert await read_all(client, url, b"one", 1) == b"one"
        await asyncio.sleep(0.6)  # the server drops the idle connection
        assert await read_all(client, url, b"two", 2) == b"twotwo"
        assert len(set(app.peers)) == 2
    finally:
        await client.aclose()
        await server.close()


async def test_reply_cut_short_is_an_error_never_a_complete_body(pki: DevPki) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls(pki))
    port = server.sockets[0].getsockname()[1]
    client = RelayClient(client_tls(pki))
    try:
        response = await client.post(f"https://127.0.0.1:{port}/", b"", [])
        received = 0
        with pytest.raises(RelayError, match="before the end"):
            async for piece in response.aiter_raw():
                received += len(piece)
        assert received == 5000
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_untrusted_server_and_closed_port_are_connect_errors(
    pki: DevPki, silent_port: int
) -> None:
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    # A client that trusts nothing we have.
    untrusting = ssl.create_default_context()
    client = RelayClient(untrusting, connect_timeout=2.0)
    try:
        with pytest.raises(RelayConnectError) as tls_failure:
            await client.post(f"https://127.0.0.1:{server.port}/", b"", [])
        assert tls_failure.value.tls
        with pytest.raises(RelayConnectError) as timeout:
            await client.post(f"https://127.0.0.1:{silent_port}/", b"", [])
        assert not timeout.value.tls
        assert app.peers == []
    finally:
        await client.aclose()
        await server.close()


async def test_pinned_certificate_is_checked_on_relay_connections(pki: DevPki) -> None:
    server = HttpServer(StreamingApp(), ssl_context=server_tls(pki))
    await server.start()
    peer_client = PeerClient(client_tls(pki), OutboundConfig())
    url = f"https://127.0.0.1:{server.port}/echo"
    try:
        response = await peer_client.relay.post(url, b"x", [])
        der = response.peer_certificate
        await response.aclose()
        assert der is not None
        peer_client.pin(url, hashlib.sha256(der).hexdigest())
        peer_client.check_pin_der(url, der)  # the right certificate passes
        peer_client.pin(url, "00" * 32)
        with pytest.raises(PeerError, match="pinned"):
            peer_client.check_pin_der(url, der)
    finally:
        await peer_client.aclose()
        await server.close()


async def test_connections_in_use_are_capped_and_given_back_on_close(pki: DevPki) -> None:
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki), max_connections=1)
    url = f"https://127.0.0.1:{server.port}/echo"
    try:
        first = await client.post(url, b"a", [])
        second = asyncio.ensure_future(client.post(url, b"b", []))
        await asyncio.sleep(0.3)
        assert not second.done()  # waiting for the only slot
        await first.aclose()  # not read to the end: the connection is closed, the slot freed
        response = await asyncio.wait_for(second, 5)
        assert b"".join([bytes(p) async for p in response.aiter_raw()]) == b"b"
        await response.aclose()
        assert await read_all(client, url, b"c", 2) == b"cc"  # the slot came back again
    finally:
        await client.aclose()
        await server.close()


async def test_requests_that_must_not_run_twice_never_use_a_pooled_connection(
    pki: DevPki,
) -> None:
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    url = f"https://127.0.0.1:{server.port}/echo"
    try:
        assert await read_all(client, url, b"query", 1) == b"query"
        response = await client.post(url, b"register", [], idempotent=False)
        assert b"".join([bytes(p) async for p in response.aiter_raw()]) == b"register"
        await response.aclose()
        # The registration went over a connection of its own, not the pooled one.
        assert len(set(app.peers)) == 2
    finally:
        await client.aclose()
        await server.close()


async def test_get_sends_no_body_framing_and_streams_the_reply(pki: DevPki) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def app(request: Request) -> Response:
        seen.append((request.method, request.header("content-length"), request.header("accept")))
        return Response(200, [("content-type", "text/plain")], b"x" * 100_000)

    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        response = await client.get(
            f"https://127.0.0.1:{server.port}/studies?limit=1", [("accept", "text/plain")]
        )
        body = b"".join([bytes(p) async for p in response.aiter_raw()])
        await response.aclose()
        assert response.status_code == 200 and body == b"x" * 100_000
        assert seen == [("GET", None, "text/plain")]
        with pytest.raises(ValueError):
            await client.request("HEAD", f"https://127.0.0.1:{server.port}/", b"", [])
    finally:
        await client.aclose()
        await server.close()


async def test_read_by_read_pieces_of_a_long_body_join_to_the_body(pki: DevPki) -> None:
    # 600 small chunks (past BULK_AFTER, where reads are gathered): each item is what one
    # socket read carried, as views between the chunk-size lines; the connection is reused.
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        url = f"https://127.0.0.1:{server.port}/echo"
        payload = hashlib.sha256(b"relay").digest() * 256  # 8 KiB
        for _ in range(2):
            response = await client.post(url, payload, [("x-times", "600")])
            data = bytearray()
            async for pieces in response.aiter_reads():
                assert pieces and all(isinstance(p, memoryview) for p in pieces)
                for piece in pieces:
                    data += piece
            await response.aclose()
            assert bytes(data) == payload * 600
        assert len(set(app.peers)) == 1
    finally:
        await client.aclose()
        await server.close()


async def test_receive_buffers_grow_with_the_body_and_go_when_the_connection_idles(
    pki: DevPki,
) -> None:
    # A fan-out holds a hundred replies at once: small replies get small buffers, and a
    # pooled idle connection holds none.
    app = StreamingApp()
    server = HttpServer(app, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        url = f"https://127.0.0.1:{server.port}/echo"
        response = await client.post(url, b"x" * 1000, [("x-times", "1")])
        sizes = set()
        async for _piece in response.aiter_raw():
            connection = response._connection
            assert connection is not None
            sizes.add(len(connection.reader._buffer))
        await response.aclose()
        assert sizes == {_Reader.SMALL_BUFFER}
        payload = bytes(range(256)) * 1024
        response = await client.post(url, payload, [("x-times", "12")])
        sizes = set()
        async for _piece in response.aiter_raw():
            if response._connection is not None:
                sizes.add(len(response._connection.reader._buffer))
        await response.aclose()
        assert _Reader.BUFFER in sizes
        (idle,) = client._idle.values()
        assert len(idle) == 1 and len(idle[0].reader._buffer) == 0
    finally:
        await client.aclose()
        await server.close()
