"""PROXY protocol v2 (issue 21): the parser (sans-IO), and a listener configured for it over
real TLS sockets on loopback: the address the header names is the caller's; anything else
(no header, v1, garbage, a truncated header, a connection not from a balancer) is closed
before TLS and reported once."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import make_config
from xca_gateway.protocol.http_server import ConnectionLimits, HttpServer, Request, Response
from xca_gateway.protocol.proxy_protocol import (
    SIGNATURE,
    ProxyProtocolError,
    ProxySources,
    build_header,
    header_length,
    parse_header,
)
from xca_gateway.protocol.tls import HandshakeFailure, client_context, server_context
from xca_gateway.security.dev_pki import DevPki

# ------------------------------------------------------------------------------ parser


def test_ipv4_and_ipv6_headers_name_the_client() -> None:
    header = build_header(("127.0.0.77", 40000), ("127.0.0.1", 8443))
    assert len(header) == 28
    parsed = parse_header(header + b"\x16\x03\x01client hello")
    assert parsed is not None
    assert parsed.command == "proxy"
    assert parsed.source == ("127.0.0.77", 40000)
    assert parsed.destination == ("127.0.0.1", 8443)
    assert parsed.length == 28
    v6 = parse_header(build_header(("::1", 5), ("::1", 6), tlvs=b"\x04\x00\x01x"))
    assert v6 is not None and v6.source == ("::1", 5) and v6.length == 16 + 36 + 4


def test_local_and_unspecified_headers_keep_the_connections_own_address() -> None:
    local = parse_header(build_header(None))
    assert local is not None and local.command == "local" and local.source is None
    unspec = SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    parsed = parse_header(unspec)
    assert parsed is not None and parsed.command == "proxy" and parsed.source is None


def test_an_incomplete_header_asks_for_more() -> None:
    header = build_header(("127.0.0.77", 1), ("127.0.0.1", 2))
    for cut in (0, 1, 11, 12, 15, 16, 27):
        assert parse_header(header[:cut]) is None
    assert header_length(header[:15]) is None
    assert header_length(header[:16]) == 28


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 127.0.0.77 127.0.0.1 1 2\r\n", "v1"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "signature"),
        (b"GET / HTTP/1.1\r\n", "signature"),
        (SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12), "version 1"),
        (SIGNATURE + bytes([0x2F, 0x11, 0, 12]) + bytes(12), "command"),
        (SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 60000), "too long"),
        (SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4), "shorter"),
        (SIGNATURE + bytes([0x21, 0x51, 0, 12]) + bytes(12), "family"),
        (SIGNATURE + bytes([0x21, 0x13, 0, 12]) + bytes(12), "transport"),
    ],
)
def test_anything_but_a_v2_header_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_header(data)


def test_proxy_sources_are_networks() -> None:
    sources = ProxySources.parse(["127.0.0.1/32", "10.1.0.0/16", "::1"])
    assert sources.allows("127.0.0.1")
    assert sources.allows("::ffff:127.0.0.1")
    assert sources.allows("10.1.2.3") and not sources.allows("10.2.0.1")
    assert sources.allows("::1") and not sources.allows("127.0.0.2")
    assert not sources.allows("not an address")


# ------------------------------------------------------------------------------ listener


class Listener:
    def __init__(self, server: HttpServer, failures: list[HandshakeFailure]) -> None:
        self.server = server
        self.failures = failures
        self.refused: list[tuple[str, str]] = []


@pytest.fixture
async def listener(pki: DevPki, tmp_path: Path) -> AsyncIterator[Listener]:
    async def app(request: Request) -> Response:
        peer = request.peer
        return Response(
            200, [("content-type", "text/plain")], f"{peer.address}:{peer.port}".encode()
        )

    failures: list[HandshakeFailure] = []
    config = make_config(pki, tmp_path)
    server = HttpServer(
        app,
        ssl_context=server_context(config.tls),
        on_handshake_failure=failures.append,
        proxy=ProxySources.parse(["127.0.0.1/32"]),
    )
    box = Listener(server, failures)
    server.gate.on_refused = lambda name, reason: box.refused.append((name, reason))
    await server.start("127.0.0.1", 0)
    yield box
    await server.close(1.0)


def _client(pki: DevPki) -> ssl.SSLContext:
    return client_context(pki.ca, pki.client.cert, pki.client.key)


async def _get(pki: DevPki, port: int, prefix: bytes, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(host, 0))
    try:
        writer.write(prefix)
        await writer.drain()
        await writer.start_tls(_client(pki), server_hostname="alpha.xca-gateway.test")
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
        return data.split(b"\r\n\r\n", 1)[1]
    finally:
        writer.close()


async def _refused(port: int, data: bytes, *, close: bool, source: str = "127.0.0.1") -> bytes:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except ConnectionError:  # reset at the accept, maybe before the client saw it through
        return b""
    writer.write(data)
    await writer.drain()
    if close:
        writer.write_eof()
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_the_header_names_the_caller_behind_the_balancer(
    listener: Listener, pki: DevPki
) -> None:
    port = listener.server.port
    answer = await _get(pki, port, build_header(("127.0.0.77", 40001), ("127.0.0.1", port)))
    assert answer == b"127.0.0.77:40001"
    # LOCAL (the balancer's own connection): its own address stands.
    answer = await _get(pki, port, build_header(None))
    assert answer.startswith(b"127.0.0.1:")
    assert listener.failures == [] and listener.refused == []


@pytest.mark.parametrize(
    ("data", "close", "reason"),
    [
        (b"\x16\x03\x01\x00\x05hello", False, "no PROXY protocol v2 signature"),
        (b"PROXY TCP4 127.0.0.77 127.0.0.1 1 2\r\n", False, "v1"),
        (build_header(("127.0.0.77", 1), ("127.0.0.1", 2))[:20], True, "closed inside"),
        (b"", True, "no header"),
    ],
)
async def test_a_connection_without_a_good_header_is_closed_and_reported_once(
    listener: Listener, data: bytes, close: bool, reason: str
) -> None:
    assert await _refused(listener.server.port, data, close=close) == b""
    for _ in range(100):  # bounded: the report follows the close
        if listener.failures:
            break
        await asyncio.sleep(0.02)
    assert len(listener.failures) == 1
    assert reason in listener.failures[0].reason
    assert listener.failures[0].reason.startswith("PROXY protocol:")
    assert listener.refused == [("https", "proxy_protocol")]


async def test_only_the_configured_balancers_may_connect(listener: Listener) -> None:
    header = build_header(("127.0.0.77", 1), ("127.0.0.1", 2))
    assert await _refused(listener.server.port, header, close=False, source="127.0.0.2") == b""
    for _ in range(100):
        if listener.failures:
            break
        await asyncio.sleep(0.02)
    assert [f.address for f in listener.failures] == ["127.0.0.2"]
    assert "not a configured balancer" in listener.failures[0].reason


async def test_the_balancer_is_not_one_source_capped_at_the_accept(
    pki: DevPki, tmp_path: Path
) -> None:
    """Behind a balancer every connection comes from its address: the per-source cap applies
    to the callers its header names, never to the balancer at the accept."""

    async def app(request: Request) -> Response:
        return Response(200, body=request.peer.address.encode())

    server = HttpServer(
        app,
        ssl_context=server_context(make_config(pki, tmp_path).tls),
        proxy=ProxySources.parse(["127.0.0.1/32"]),
        limits=ConnectionLimits(max_connections_per_source=1),
    )
    await server.start("127.0.0.1", 0)
    try:
        port = server.port
        callers = [f"127.0.0.{70 + i}" for i in range(3)]
        answers = [
            await _get(pki, port, build_header((caller, 40001), ("127.0.0.1", port)))
            for caller in callers
        ]
        assert answers == [caller.encode() for caller in callers]
        assert server.gate.refused == {}
    finally:
        await server.close(1.0)
