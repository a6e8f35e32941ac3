"""CPU cost of a gateway's response write path alone: HTTP chunk framing, asyncio's TLS
transport, the send system calls, with the per-instance work of an MTOM response.

The gateway's own ``HttpServer`` (TLS, dev PKI) answers one GET with an ``MtomWriter`` body of
``--instances`` parts whose pieces come as a relaying gateway's do: reads of 256 KiB (views
into one buffer, nothing copied) split at instance boundaries, the event loop turning between
reads (the relay's next socket read). A client in another process reads the response to its
end and checks its last chunk. Printed: the server process's CPU (user + system) per GB sent,
median over ``--repeat`` responses. What is not here: reading and parsing the peer's reply
(``relay_glue.py`` measures the glue without sockets, ``imaging_bench.py`` the whole hop).

    python benchmarks/write_path.py --size 64K --total 512M --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xca_gateway.protocol import mtom
from xca_gateway.protocol.http_server import HttpServer, Request, Response
from xca_gateway.security.dev_pki import DevPki, init_dev_pki

READ = 256 * 1024

CLIENT = r"""
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[2])
context.check_hostname = False
with context.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1])))) as sock:
    sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    buffer, received, tail = bytearray(1 << 20), 0, b""
    while n := sock.recv_into(buffer):
        received += n
        tail = (tail + bytes(buffer[max(0, n - 16) : n]))[-16:]
assert tail.endswith(b"\r\n0\r\n\r\n"), tail
print(received)
"""


class Reads:
    """The relay's socket reads: ``READ`` bytes each, one loop turn to get the next."""

    def __init__(self) -> None:
        self.buffer = memoryview(os.urandom(READ))
        self.left = 0

    async def piece(self, want: int) -> memoryview:
        if self.left == 0:
            await asyncio.sleep(0)
            self.left = READ
        n = min(want, self.left)
        start = READ - self.left
        self.left -= n
        return self.buffer[start : start + n]


class Instance(mtom.PartReader):
    __slots__ = ("left", "reads")

    def __init__(self, reads: Reads, size: int) -> None:
        self.reads = reads
        self.left = size

    async def read(self) -> bytes:
        if self.left == 0:
            return b""
        piece = await self.reads.piece(self.left)
        self.left -= len(piece)
        return piece  # type: ignore[return-value]  # bytes-like, as a relay's pieces

    async def aclose(self) -> None:
        pass


async def respond_once(pki: DevPki, count: int, size: int) -> tuple[float, int]:
    reads = Reads()
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    cpu = [0.0]

    async def app(request: Request) -> Response:
        writer = mtom.MtomWriter(b"<root/>", action="urn:benchmark")
        writer.add_parts(
            mtom.OutgoingPart(f"{i}.token@xca-gateway", "application/dicom", Instance(reads, size))
            for i in range(count)
        )
        cpu[0] = time.process_time()

        def complete(ok: bool) -> None:
            cpu[0] = time.process_time() - cpu[0]
            done.set_result(ok)

        headers = [("content-type", writer.content_type)]
        return Response(200, headers, writer.aiter_bytes(), on_complete=complete)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.communities["alpha"].cert, pki.communities["alpha"].key)
    server = HttpServer(app, ssl_context=context)
    await server.start("127.0.0.1", 0)
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(server.port), str(pki.ca), stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(client.communicate(), 600)
        if not await asyncio.wait_for(done, 30) or client.returncode:
            raise RuntimeError("the response did not complete")
    finally:
        await server.close(1.0)
    return cpu[0], int(out)


def _bytes(text: str) -> int:
    return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64K", help="bytes per instance")
    parser.add_argument("--total", default="512M", help="bytes per response")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = _bytes(args.size)
    count = _bytes(args.total) // size
    with tempfile.TemporaryDirectory() as work:
        pki = init_dev_pki(Path(work) / "pki", ["alpha"])
        costs = []
        for _ in range(args.repeat):
            cpu, sent = asyncio.run(respond_once(pki, count, size))
            costs.append(cpu / (sent / 1e9))
    print(
        f"write path: {count} x {args.size}: server CPU s/GB median "
        f"{statistics.median(costs):.3f} (min {min(costs):.3f}, max {max(costs):.3f})"
    )


if __name__ == "__main__":
    main()
