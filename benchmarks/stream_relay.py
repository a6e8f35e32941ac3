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
layers come on top. One thread per connection (httpx keeps connections across legs), one
selector loop per thread.

    python benchmarks/stream_relay.py --port P --upstream-port U --cert C --key K --ca CA \
        --ready FILE
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


class _Pair:
    """One consumer connection and its connection to beta."""

    def __init__(
        self,
        down: socket.socket,
        tls: ssl.SSLObject,
        outgoing: ssl.MemoryBIO,
        incoming: ssl.MemoryBIO,
        up: ssl.SSLSocket,
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
                self.tls.write(view[:filled])
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
    down: socket.socket, inbound: ssl.SSLContext, outbound: ssl.SSLContext, upstream_port: int
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
        pair = _Pair(down, *handshaken, up)
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
    raw: socket.socket, inbound: ssl.SSLContext, outbound: ssl.SSLContext, upstream_port: int
) -> None:
    try:
        relay(raw, inbound, outbound, upstream_port)
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
    args = parser.parse_args()
    inbound, outbound = _contexts(args.cert, args.key, args.ca)
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        args.ready.touch()
        while True:
            raw, _ = listener.accept()
            threading.Thread(
                target=_serve_one, args=(raw, inbound, outbound, args.upstream_port), daemon=True
            ).start()


if __name__ == "__main__":
    main()
