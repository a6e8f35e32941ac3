"""A Python TLS stream relay: the floor under the gateway's imaging hop, in the hop's own run.

``imaging_bench.py --floor`` puts this relay in alpha's place, next to nginx: it accepts the
consumer's TLS connection (client certificate required), opens one to beta with alpha's
certificate, and moves bytes both ways without reading them: no HTTP, no MIME, no XML, no
asyncio. Each side's TLS is done the way the gateway does it:

* toward beta (the relay client), TLS on the socket with OpenSSL's read-ahead (``NativeTls``),
  each readable event decrypting record after record into one reused 256 KiB buffer;
* toward the consumer (the server side, asyncio's TLS transport in the gateway), a memory-BIO
  ``SSLObject`` whose records go out with one ``send`` per piece read.

Its CPU per GB against nginx's HTTP proxy, relaying the same reply from the same beta, is what
a hop whose loop is Python pays for TLS alone; the gateway's HTTP, MIME, XML, audit and asyncio
layers come on top.

``--frame`` (``imaging_bench.py --frame``) adds the least of those layers a gateway cannot
drop, done where the bytes arrive, in the read callback: beta's HTTP framing decoded, its MIME
parts found, each instance's SOP class read for the audit, the parts sent on under a boundary
and part heads of the relay's own (:class:`_Framer`). What that costs over the floor is the
price of parsing the stream in Python at all; what the gateway costs over it is its asyncio
tasks and generators, the root part's XML and the audit record.

One thread per connection (httpx keeps connections across legs), one selector loop per thread.

    python benchmarks/stream_relay.py --port P --upstream-port U --cert C --key K --ca CA \
        --ready FILE [--frame]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import selectors
import socket
import ssl
import sys
import threading
from pathlib import Path

from xca_gateway.audit.patients import HeaderSniffer
from xca_gateway.protocol.http_client import _BodyDecoder
from xca_gateway.protocol.mtom import (
    Finished,
    MultipartParser,
    PartData,
    PartStart,
    parse_content_type,
)
from xca_gateway.protocol.tls import NATIVE_TLS

PIECE = 256 * 1024
# Ciphertext held for the consumer before reading beta stops (backpressure), and plaintext
# held for beta before reading the consumer stops.
HELD = 4 * PIECE
IDLE = 600.0  # a connection quiet this long is closed


def _contexts(cert: Path, key: Path, ca: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    inbound = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    inbound.load_cert_chain(cert, key)
    inbound.load_verify_locations(ca)
    inbound.verify_mode = ssl.CERT_REQUIRED
    outbound = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    outbound.load_cert_chain(cert, key)
    outbound.load_verify_locations(ca)
    return inbound, outbound


class _Framer:
    """``--frame``: what a relay must do to each reply beyond TLS, done in the read callback
    itself (no tasks, no generators): beta's HTTP framing decoded, its MIME parts found
    (the gateway's ``MultipartParser``), each instance's SOP class read for the audit (the
    gateway's ``HeaderSniffer``), and the parts sent on under a boundary and part heads of
    the relay's own, one HTTP chunk per read. Not done: the root part's XML (read and
    rewritten by the gateway, ``xml_per_instance.py`` measures it) and the audit record."""

    BOUNDARY = "MIMEBoundary_relay0123456789abcdef0123456789ab"

    def __init__(self) -> None:
        self._head = bytearray()
        self._decoder: _BodyDecoder | None = None
        self._parser: MultipartParser | None = None
        self._sniffer: HeaderSniffer | None = None
        self._first = True
        self.instances = 0

    def feed(self, buf: bytearray, n: int) -> list[bytes | memoryview]:
        """What goes to the consumer for ``buf[:n]`` (views of ``buf`` among them)."""
        out: list[bytes | memoryview] = []
        start = 0
        while start < n:
            if self._decoder is None:
                start = self._read_head(buf, start, n, out)
                continue
            assert self._parser is not None
            body: list[bytes | memoryview] = []
            for event in self._parser.feed_spans(self._decoder.feed_span(buf, start, n)):
                if isinstance(event, PartData):
                    if self._sniffer is not None and not self._sniffer.done:
                        self._sniffer.feed(event.data)
                    body.append(event.data)
                elif isinstance(event, PartStart):
                    headers = event.headers
                    lead = "" if self._first else "\r\n"
                    self._first = False
                    body.append(
                        f"{lead}--{self.BOUNDARY}\r\ncontent-type: {headers.content_type}\r\n"
                        f"content-transfer-encoding: binary\r\n"
                        f"content-id: <{headers.content_id}>\r\n\r\n".encode()
                    )
                    if self._parser.part_count > 1:
                        self._sniffer = HeaderSniffer(want_patient=False)
                        self.instances += 1
                elif isinstance(event, Finished):
                    body.append(f"\r\n--{self.BOUNDARY}--\r\n".encode())
            size = sum(len(piece) for piece in body)
            if size:
                out.append(b"%x\r\n" % size)
                out.extend(body)
                out.append(b"\r\n")
            start = n
            if self._decoder.done:  # the reply is whole: the next one starts afresh
                out.append(b"0\r\n\r\n")
                leftover = self._decoder.leftover
                self._decoder = self._parser = self._sniffer = None
                self._first = True
                if leftover:
                    out.extend(self.feed(bytearray(leftover), len(leftover)))
        return out

    def _read_head(self, buf: bytearray, start: int, n: int, out: list[bytes | memoryview]) -> int:
        self._head += buf[start:n]
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > 65536:
                raise OSError("reply head too long")
            return n
        lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
        rest = len(self._head) - end - 4  # body bytes that came with the head
        self._head = bytearray()
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        status = lines[0].split(" ", 2)[1]
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = None if chunked else int(headers.get("content-length", "0"))
        self._decoder = _BodyDecoder(length=length, chunked=chunked)
        media, params = parse_content_type(headers.get("content-type", "text/plain"))
        if status != "200" or "boundary" not in params:
            raise OSError(f"reply {status} {media}: not relayed by --frame")
        self._parser = MultipartParser(params["boundary"], max_parts=100_000)
        content_type = (
            f'multipart/related; type="application/xop+xml"; boundary="{self.BOUNDARY}"; '
            f'start-info="application/soap+xml"'
        )
        out.append(
            f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n"
            f"transfer-encoding: chunked\r\n\r\n".encode()
        )
        return n - rest


class _Pair:
    """One consumer connection and its connection to beta."""

    def __init__(
        self,
        down: socket.socket,
        tls: ssl.SSLObject,
        outgoing: ssl.MemoryBIO,
        incoming: ssl.MemoryBIO,
        up: ssl.SSLSocket,
        framer: _Framer | None = None,
    ) -> None:
        self.down, self.tls, self.outgoing, self.incoming, self.up = (
            down,
            tls,
            outgoing,
            incoming,
            up,
        )
        self.read = up._sslobj.read  # type: ignore[attr-defined]  # the C SSL_read, as the gateway
        self.buffer = bytearray(PIECE)
        self.view = memoryview(self.buffer)
        self.to_down: collections.deque[memoryview] = collections.deque()
        self.to_down_bytes = 0
        self.to_up = bytearray()
        self.up_retry: bytes | None = None  # SSL_write is retried with the same bytes
        self.up_eof = self.down_eof = False
        self.framer = framer

    # consumer -> beta (the request: small)
    def from_down(self) -> None:
        try:
            data = self.down.recv(PIECE)
        except BlockingIOError:
            return
        if not data:
            self.down_eof = True
            return
        self.incoming.write(data)
        self.drain_down()

    def drain_down(self) -> None:
        """Decrypt what the consumer sent (also what came with the handshake's last read)."""
        while True:
            try:
                plain = self.tls.read(PIECE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.down_eof = True
                break
            if not plain:
                self.down_eof = True
                break
            self.to_up += plain
        self._queue_outgoing()  # TLS 1.3 tickets, key updates
        self.to_beta()

    def to_beta(self) -> None:
        while self.up_retry is not None or self.to_up:
            if self.up_retry is None:
                self.up_retry = bytes(self.to_up[:PIECE])
                del self.to_up[: len(self.up_retry)]
            try:
                self.up.send(self.up_retry)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            self.up_retry = None

    # beta -> consumer (the reply: the bytes measured)
    def from_up(self) -> None:
        read, view = self.read, self.view
        while self.to_down_bytes < HELD:
            filled = 0
            try:
                while filled < PIECE:
                    count = read(PIECE - filled, view[filled:] if filled else view)
                    if count == 0:
                        self.up_eof = True
                        break
                    filled += count
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.up_eof = True
            if filled:
                if self.framer is None:
                    self.tls.write(view[:filled])
                else:
                    # A TLS write per piece: joining them first (one record run per read,
                    # a copy of every byte) measured the same.
                    for piece in self.framer.feed(self.buffer, filled):
                        self.tls.write(piece)
                self._queue_outgoing()
                self.to_consumer()
            if filled < PIECE or self.up_eof:
                return

    def _queue_outgoing(self) -> None:
        if self.outgoing.pending:
            data = self.outgoing.read()
            self.to_down.append(memoryview(data))
            self.to_down_bytes += len(data)

    def to_consumer(self) -> None:
        while self.to_down:
            try:
                sent = self.down.send(self.to_down[0])
            except BlockingIOError:
                return
            self.to_down_bytes -= sent
            if sent < len(self.to_down[0]):
                self.to_down[0] = self.to_down[0][sent:]
                return
            self.to_down.popleft()


def _handshake_down(
    down: socket.socket, inbound: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = inbound.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                down.sendall(outgoing.read())
            data = down.recv(65536)
            if not data:
                return None
            incoming.write(data)
        except ssl.SSLError:
            if outgoing.pending:  # the alert tells the caller why (no certificate, ...)
                down.sendall(outgoing.read())
            raise
    if outgoing.pending:
        down.sendall(outgoing.read())
    return tls, outgoing, incoming


def relay(
    down: socket.socket,
    inbound: ssl.SSLContext,
    outbound: ssl.SSLContext,
    upstream_port: int,
    frame: bool = False,
) -> None:
    down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    down.settimeout(30)
    handshaken = _handshake_down(down, inbound)
    if handshaken is None:
        return
    raw = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = outbound.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    with up:
        pointer = NATIVE_TLS.pointer(up)
        if pointer is not None:
            NATIVE_TLS.read_ahead(pointer, PIECE)
        up.do_handshake()
        pair = _Pair(down, *handshaken, up, _Framer() if frame else None)
        up.setblocking(False)
        down.setblocking(False)
        pair.drain_down()
        _pump(pair)


def _pump(pair: _Pair) -> None:
    selector = selectors.DefaultSelector()
    down_events = up_events = 0
    with selector:
        while not (pair.up_eof and not pair.to_down) and not pair.down_eof:
            want_down = (selectors.EVENT_READ if len(pair.to_up) < HELD else 0) | (
                selectors.EVENT_WRITE if pair.to_down else 0
            )
            want_up = (
                selectors.EVENT_READ if pair.to_down_bytes < HELD and not pair.up_eof else 0
            ) | (selectors.EVENT_WRITE if pair.up_retry or pair.to_up else 0)
            down_events = _watch(selector, pair.down, down_events, want_down)
            up_events = _watch(selector, pair.up, up_events, want_up)
            ready = selector.select(IDLE)
            if not ready:
                return
            for key, events in ready:
                if key.fileobj is pair.down:
                    if events & selectors.EVENT_WRITE:
                        pair.to_consumer()
                        if pair.to_down_bytes < HELD:
                            pair.from_up()  # what OpenSSL read ahead wakes no selector
                    if events & selectors.EVENT_READ:
                        pair.from_down()
                else:
                    if events & selectors.EVENT_WRITE:
                        pair.to_beta()
                    if events & selectors.EVENT_READ:
                        pair.from_up()
        with contextlib.suppress(OSError):
            pair.tls.unwrap()
        pair._queue_outgoing()
        pair.down.setblocking(True)
        for piece in pair.to_down:
            pair.down.sendall(piece)


def _watch(selector: selectors.BaseSelector, sock: socket.socket, now: int, want: int) -> int:
    if want == now:
        return now
    if now and want:
        selector.modify(sock, want)
    elif want:
        selector.register(sock, want)
    else:
        selector.unregister(sock)
    return want


def _serve_one(
    raw: socket.socket,
    inbound: ssl.SSLContext,
    outbound: ssl.SSLContext,
    upstream_port: int,
    frame: bool,
) -> None:
    try:
        relay(raw, inbound, outbound, upstream_port, frame)
    except OSError as exc:  # this connection only: say why
        print(f"stream relay: {exc!r}", file=sys.stderr, flush=True)
    finally:
        raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument(
        "--frame", action="store_true", help="decode and re-frame each reply (see _Framer)"
    )
    args = parser.parse_args()
    inbound, outbound = _contexts(args.cert, args.key, args.ca)
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        args.ready.touch()
        while True:
            raw, _ = listener.accept()
            threading.Thread(
                target=_serve_one,
                args=(raw, inbound, outbound, args.upstream_port, args.frame),
                daemon=True,
            ).start()


if __name__ == "__main__":
    main()
