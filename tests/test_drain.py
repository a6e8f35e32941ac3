"""Drain (issue 21): on SIGTERM a listener stops accepting, closes idle connections, lets the
requests in flight finish within the deadline and cuts the rest; /readyz says not ready."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from xca_gateway.app.gateway import Gateway
from xca_gateway.protocol.http_server import HttpServer, Request, Response


async def _request(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()  # the server closes after its answer while draining
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]) if head else 0, body
    finally:
        writer.close()


async def test_drain_finishes_requests_in_flight_and_refuses_new_ones() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def app(request: Request) -> Response:
        if request.path == "/slow":
            started.set()
            await release.wait()
        if request.path == "/stuck":
            await asyncio.sleep(3600)
        return Response(200, [("content-type", "text/plain")], request.path.encode())

    server = HttpServer(app, ssl_context=None)
    await server.start("127.0.0.1", 0)
    port = server.port
    # An idle kept-alive connection: closed by the drain, not waited for.
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    slow = asyncio.create_task(_request(port, "/slow"))
    await asyncio.wait_for(started.wait(), 10)

    drain = asyncio.create_task(server.drain(5.0))
    await asyncio.sleep(0)  # the drain has closed the listening socket
    for _ in range(50):
        if server.draining:
            break
        await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        refused = False
    except OSError:
        refused = True
    assert refused
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    idle_writer.close()

    release.set()
    assert await slow == (200, b"/slow")
    assert await asyncio.wait_for(drain, 10) == 0
    await server.close(1.0)


async def test_drain_cuts_what_outlives_the_deadline() -> None:
    started = asyncio.Event()

    async def app(request: Request) -> Response:
        started.set()
        await asyncio.sleep(3600)
        return Response(200)

    server = HttpServer(app, ssl_context=None)
    await server.start("127.0.0.1", 0)
    stuck = asyncio.create_task(_request(server.port, "/stuck"))
    await asyncio.wait_for(started.wait(), 10)
    assert await asyncio.wait_for(server.drain(0.2), 10) == 1
    assert (await stuck)[0] == 0  # cut: no answer
    await server.close(1.0)


def test_readyz_is_503_while_draining(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory("alpha")
    url = f"{gateway.admin_url}/readyz"
    assert httpx.get(url).status_code == 200
    gateway.draining = True
    response = httpx.get(url)
    assert response.status_code == 503
    assert response.json()["checks"]["accepting"] is False
