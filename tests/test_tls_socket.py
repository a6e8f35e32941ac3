"""TLS on the socket for relay connections (tls_socket) and the per-connection OpenSSL
settings behind it (NativeTls): real TLS over loopback, and in-memory TLS for the callback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator

import pytest

from xca_gateway.protocol.http_client import RelayClient, RelayError, _Reader
from xca_gateway.protocol.http_server import HttpServer, Request, Response
from xca_gateway.protocol.tls import NATIVE_TLS, client_context, server_context
from xca_gateway.protocol.tls_socket import TlsSocketTransport, open_tls_connection
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.settings import TlsConfig

BLOCK = hashlib.sha256(b"tls-socket").digest() * 2048  # 64 KiB


def server_tls(pki: DevPki) -> ssl.SSLContext:
    peer = pki.communities["alpha"]
    return server_context(
        TlsConfig(certificate=peer.cert, private_key=peer.key, trust_store=pki.ca)
    )


def client_tls(pki: DevPki) -> ssl.SSLContext:
    peer = pki.communities["beta"]
    return client_context(pki.ca, peer.cert, peer.key)


async def blocks(request: Request) -> Response:
    """``x-blocks`` blocks of 64 KiB, streamed (chunked)."""
    await request.read(1 << 16)
    count = int(request.header("x-blocks") or "1")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield BLOCK

    return Response(200, [("content-type", "application/octet-stream")], body())


async def test_relay_connections_are_tls_on_the_socket_reading_ahead(pki: DevPki) -> None:
    server = HttpServer(blocks, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        response = await client.post(
            f"https://127.0.0.1:{server.port}/", b"go", [("x-blocks", "64")]
        )
        connection = response._connection
        assert connection is not None
        transport = connection.transport
        assert isinstance(transport, TlsSocketTransport)
        sock = transport.get_extra_info("ssl_object")
        assert isinstance(sock, ssl.SSLSocket)
        assert connection.peer_certificate == sock.getpeercert(binary_form=True)
        native = NATIVE_TLS.pointer(sock)
        assert native is not None  # CPython: the SSL * is found
        assert NATIVE_TLS.reading_ahead(native)
        digest = hashlib.sha256()
        async for piece in response.aiter_raw():
            digest.update(piece)
        await response.aclose()
        assert digest.digest() == hashlib.sha256(BLOCK * 64).digest()
    finally:
        await client.aclose()
        await server.close()


async def test_a_slow_reader_pauses_the_connection_and_nothing_read_ahead_is_stranded(
    pki: DevPki,
) -> None:
    # 8 MiB read slowly: reading pauses above the reader's high-water mark while OpenSSL
    # still holds read-ahead bytes no socket event will announce; resuming must drain them.
    server = HttpServer(blocks, ssl_context=server_tls(pki))
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        response = await client.post(
            f"https://127.0.0.1:{server.port}/", b"go", [("x-blocks", "128")]
        )
        connection = response._connection
        assert connection is not None
        transport = connection.transport
        pauses: list[int] = []
        pause = transport.pause_reading

        def counted() -> None:
            pauses.append(1)
            pause()

        transport.pause_reading = counted  # type: ignore[method-assign]
        digest = hashlib.sha256()
        async with asyncio.timeout(60):
            async for pieces in response.aiter_reads():
                for piece in pieces:
                    digest.update(piece)
                await asyncio.sleep(0.02)
        await response.aclose()
        assert pauses
        assert digest.digest() == hashlib.sha256(BLOCK * 128).digest()
    finally:
        await client.aclose()
        await server.close()


async def test_a_server_refusing_our_certificate_is_a_relay_error(pki: DevPki) -> None:
    # TLS 1.3: the client learns of the refusal only after its handshake, on its first read
    # (the gateway's server aborts: an EOF, or the alert when it got out first).
    other = server_context(
        TlsConfig(
            certificate=pki.communities["alpha"].cert,
            private_key=pki.communities["alpha"].key,
            trust_store=pki.communities["gamma"].cert,  # trusts no CA: refuses beta
        )
    )
    server = HttpServer(blocks, ssl_context=other)
    await server.start()
    client = RelayClient(client_tls(pki))
    try:
        with pytest.raises(RelayError):
            async with asyncio.timeout(20):
                await client.post(f"https://127.0.0.1:{server.port}/", b"go", [])
    finally:
        await client.aclose()
        await server.close()


async def test_writes_larger_than_the_socket_takes_go_out_whole(pki: DevPki) -> None:
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(received) < 16 * len(BLOCK):
            data = await reader.read(1 << 16)
            if not data:
                break
            received.extend(data)
            await asyncio.sleep(0.001)  # slower than the writer: its buffer fills
        done.set()
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0, ssl=server_tls(pki))
    port = server.sockets[0].getsockname()[1]
    try:
        transport, reader = await open_tls_connection(
            _Reader, "127.0.0.1", port, ssl_context=client_tls(pki), server_hostname="localhost"
        )
        assert isinstance(reader, _Reader)
        big = BLOCK * 16  # 1 MiB in one write
        transport.write(big)
        assert transport.get_write_buffer_size() in (0, len(big))
        async with asyncio.timeout(30):
            await reader.drain()
            await done.wait()
        assert bytes(received) == big
        transport.close()
    finally:
        server.close()
        await server.wait_closed()


def _memory_pair(pki: DevPki, calls: list[int]) -> tuple[ssl.SSLObject, ssl.SSLObject, list]:
    server_ctx = server_tls(pki)
    ssl.SSLContext._msg_callback.__set__(  # type: ignore[attr-defined]
        server_ctx, lambda *args: calls.append(1)
    )
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_tls(pki).wrap_bio(bios[2], bios[3], server_hostname="localhost")
    return server, client, bios


def _pump(server: ssl.SSLObject, client: ssl.SSLObject, bios: list) -> None:
    bios[0].write(bios[3].read())
    bios[2].write(bios[1].read())


def test_the_message_callback_stops_after_the_handshake(pki: DevPki) -> None:
    calls: list[int] = []
    server, client, bios = _memory_pair(pki, calls)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        _pump(server, client, bios)
    assert server.version() == "TLSv1.3"
    handshake = len(calls)
    assert handshake > 0  # the capture sees the handshake's messages

    server.write(b"x" * 100_000)
    assert len(calls) > handshake  # ... and, left on, every record after it
    _pump(server, client, bios)
    assert NATIVE_TLS.quiet(server)
    before = len(calls)
    server.write(b"y" * 100_000)
    _pump(server, client, bios)
    assert len(calls) == before
    received = bytearray()
    while True:
        try:
            received += client.read(1 << 16)
        except ssl.SSLWantReadError:
            break
    assert received == b"x" * 100_000 + b"y" * 100_000
