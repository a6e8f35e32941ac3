"""A lean HTTP/1.1 client for the gateway's outbound SOAP calls and streamed relays.

A relaying gateway moves every byte of a study through its client. With httpx, httpcore and
anyio each 16 KiB TLS record cost a stack of Python calls (a relay hop spent 5.1 CPU-seconds
per GB, twice what the imaging source spends serving it), and a fan-out to 20 peers spent about
a millisecond per request in awaits before its bytes left. This client lets h11 parse the
status line and headers, then frames the body itself (sans-IO ``_BodyDecoder``) over the very
buffers the asyncio TLS transport produced: no stream buffer, no per-record events, no copies.

It does what the gateway needs: POST with a body in memory or streamed (chunked), a streamed
reply, keep-alive connections pooled per origin (reused only after a reply was read to its
end), a cap on connections in use, one retry on a fresh connection when a pooled one turns
out to be closed before any reply byte arrived (only for bodies in memory, which can be sent
again), and the peer's certificate for pinning.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import h11

from xca_gateway.protocol.mtom import BufferSpan
from xca_gateway.protocol.tls_socket import open_tls_connection

__all__ = [
    "ReadPieces",
    "RelayClient",
    "RelayConnectError",
    "RelayError",
    "RelayResponse",
]

# Large reads: the asyncio TLS transport decrypts up to 256 KiB per socket read, and the
# stream buffer is allowed to hold READ_SIZE before the transport pauses.
READ_SIZE = 1024 * 1024
_MAX_HEADER_BYTES = 64 * 1024
# Request events kept for reuse (see RelayClient._request_event), at most.
_MAX_REQUEST_EVENTS = 4096
# A request body up to this size goes out in the same write as its head (copied once).
_JOIN_BELOW = 64 * 1024
# A long body (past BULK_AFTER bytes) is handed on in pieces of about GATHER_BYTES: the
# transport delivers what one TCP segment carried (~60 KB on loopback), and each piece costs
# the relay the same Python work downstream whatever its size. Data that does not reach
# GATHER_BYTES is handed on GATHER_WAIT seconds after its first byte arrived.
BULK_AFTER = 1024 * 1024
GATHER_BYTES = 256 * 1024
GATHER_WAIT = 0.002


class RelayError(Exception):
    """The exchange with the peer failed; ``tls`` when TLS itself failed (e.g. the peer
    refused our certificate, which TLS 1.3 reports only after the handshake)."""

    def __init__(self, message: str, *, tls: bool = False) -> None:
        super().__init__(message)
        self.tls = tls


class RelayConnectError(RelayError):
    """No connection: refused, unreachable, timed out, or the TLS handshake failed."""


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def _origin(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RelayConnectError(f"unsupported URL {url!r}", tls=False)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return _Origin(parts.scheme, parts.hostname, port), target


class _Reader(asyncio.BufferedProtocol):
    """Receives into buffers of its own (``asyncio.BufferedProtocol``: the TLS transport
    decrypts record after record straight into them, no bytes object per record and no join)
    and hands out memoryviews of what arrived. A buffer is never written twice, so views stay
    valid; it is dropped once its views are. Reading pauses above HIGH_WATER so a slow
    downstream consumer slows the peer instead of filling memory."""

    HIGH_WATER = 2 * READ_SIZE
    # Buffers grow with what the connection carries: a SOAP reply (a fan-out holds a
    # hundred at once) gets 8 KiB ones, a long body 256 KiB ones (one TLS read's worth).
    SMALL_BUFFER = 8 * 1024
    BUFFER = 256 * 1024
    # Buffers are not recycled: reusing one once nothing referred to it any more (tried
    # 2026-12-05) saved its memset and page faults, but SSL_read's copy into a cold buffer
    # took about as much longer, and the relay hop measured no cheaper.

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._min_free = 1  # less room than this left: take a new buffer
        self._received = 0  # since the last release()
        # Received and not yet read: [buffer, start, end], contiguous ranges merged.
        self._chunks: collections.deque[list[Any]] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0  # bytes the pending read would like to gather before waking
        self._gather: asyncio.TimerHandle | None = None
        self._paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        del sizehint  # the TLS transport hints the ciphertext it holds, not what is coming
        if len(self._buffer) - self._filled < self._min_free:
            size = self.BUFFER if self._received >= BULK_AFTER else self.SMALL_BUFFER
            self._buffer = bytearray(size)
            self._view = memoryview(self._buffer)
            self._filled = 0
            self._min_free = size // 16  # 16 KiB at full size: a TLS record's plaintext
        return self._view[self._filled :]

    def release(self) -> None:
        """Drop the receive buffer (the connection goes idle in the pool)."""
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._min_free = 1
        self._received = 0

    def buffer_updated(self, nbytes: int) -> None:
        start, self._filled = self._filled, self._filled + nbytes
        self._received += nbytes
        chunks = self._chunks
        last = chunks[-1] if chunks else None
        if last is not None and last[0] is self._buffer and last[2] == start:
            last[2] = self._filled  # contiguous with what is still unread
        else:
            chunks.append([self._buffer, start, self._filled])
        self._size += nbytes
        if self._size > self.HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._size >= self._want:
            self._wake()
        elif self._gather is None and self._waiter is not None:
            self._gather = asyncio.get_running_loop().call_later(GATHER_WAIT, self._wake)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        await self._can_write.wait()
        if self._error is not None:
            raise self._error
        if self._eof and self.transport is not None and self.transport.is_closing():
            raise ConnectionResetError("connection closed while sending")

    def _wake(self) -> None:
        gather, self._gather = self._gather, None
        if gather is not None:
            gather.cancel()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def read(self, want: int = 0) -> list[memoryview]:
        """Everything received so far as views (waiting for something); [] at a clean EOF.
        With ``want``, waits for that many bytes or GATHER_WAIT after the first one came."""
        return [memoryview(buf)[start:end] for buf, start, end in await self.read_spans(want)]

    async def read_spans(self, want: int = 0) -> list[BufferSpan]:
        """As :meth:`read`, as ranges of the receive buffers: ``(buffer, start, end)``."""
        if want and self._size < want and not self._eof and self._error is None:
            self._want = want
            if self._chunks:
                self._gather = asyncio.get_running_loop().call_later(GATHER_WAIT, self._wake)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._want = 0
                if self._gather is not None:
                    self._gather.cancel()
                    self._gather = None
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        spans: list[BufferSpan] = [(buf, start, end) for buf, start, end in self._chunks]
        self._chunks.clear()
        self._size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return spans


_MAX_LINE = 4096  # a chunk-size or trailer line, its LF included
# A chunk's closing CRLF and the next chunk's size line without extensions.
_CHUNK_HEAD = re.compile(rb"\r\n([0-9A-Fa-f]{1,15})\r\n")


class _BodyDecoder:
    """HTTP/1.1 message body framing (RFC 9112 6-7), sans-IO: Content-Length, chunked, or
    until-close. ``feed`` returns body pieces as memoryviews of the input (no copies)."""

    def __init__(self, *, length: int | None, chunked: bool) -> None:
        self._chunked = chunked
        self._remaining = length  # bytes left in the current chunk / the whole body
        self._until_close = not chunked and length is None
        self._line = bytearray()  # a chunk-size line or a trailer line being collected
        self._state = "size" if chunked else "data"
        self.done = not chunked and length == 0
        self.leftover = b""

    def feed(self, data: bytes | memoryview) -> list[memoryview]:
        """Body pieces of ``data`` as memoryviews of it (a view is copied once first)."""
        buf = data if isinstance(data, bytes) else bytes(data)
        view = memoryview(buf)
        return [view[start:end] for _, start, end in self.feed_span(buf, 0, len(buf))]

    def feed_span(self, buf: bytes | bytearray, pos: int, n: int) -> list[BufferSpan]:
        """Body ranges of ``buf[pos:n]``, in ``buf`` (no copies)."""
        out: list[BufferSpan] = []
        if self.done:
            if n > pos:  # more after the end of the body (e.g. a second piece of the same read)
                self.leftover += buf[pos:n]
            return out
        while pos < n and not self.done:
            if self._state == "data":
                if self._until_close:
                    out.append((buf, pos, n))
                    return out
                assert self._remaining is not None
                take = min(self._remaining, n - pos)
                out.append((buf, pos, pos + take))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    if self._chunked:
                        self._state = "crlf"
                    else:
                        self.done = True
            elif (
                self._state == "crlf"
                and not self._line
                and (head := _CHUNK_HEAD.match(buf, pos, n)) is not None
            ):
                # The end of a chunk's data and the next chunk's size line, whole in this
                # piece: the common case, in one match (a relay meets it once or twice per
                # instance). Anything else (extensions, a line cut by the read) takes the
                # long way below, with the same answers.
                size = int(head.group(1), 16)
                pos = head.end()
                if size:
                    self._remaining = size
                    self._state = "data"
                else:
                    self._state = "trailers"
            elif (
                self._state == "crlf"
                and not self._line
                and n - pos >= 2  # not the bytes past this piece: another read's, or none
                and buf[pos : pos + 2] == b"\r\n"
            ):
                pos += 2  # the end of a chunk's data, whole in this piece
                self._state = "size"
            else:
                # A chunk-size line, a CRLF or a trailer, searched where it lies.
                nl = buf.find(b"\n", pos, min(n, pos + _MAX_LINE))
                if nl >= 0 and not self._line:  # the whole line is here: no collecting
                    line = bytes(buf[pos:nl]).rstrip(b"\r")
                    pos = nl + 1
                    self._line_done(line)
                    continue
                if nl < 0 and n - pos >= _MAX_LINE:
                    raise RelayError("malformed chunked body: line too long")
                end = n if nl < 0 else nl + 1
                self._line += buf[pos:end]
                pos = end
                if len(self._line) > _MAX_LINE:
                    raise RelayError("malformed chunked body: line too long")
                if nl < 0:
                    continue
                line = bytes(self._line).rstrip(b"\r\n")
                self._line.clear()
                self._line_done(line)
        if self.done and pos < n:
            self.leftover = bytes(buf[pos:n])
        return out

    def _line_done(self, line: bytes) -> None:
        if self._state == "crlf":
            if line:
                raise RelayError("malformed chunked body: data longer than its chunk size")
            self._state = "size"
        elif self._state == "size":
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise RelayError("malformed chunked body: bad chunk size") from None
            if size < 0 or not size_text.isalnum():
                raise RelayError("malformed chunked body: bad chunk size")
            if size == 0:
                self._state = "trailers"
            else:
                self._remaining = size
                self._state = "data"
        elif self._state == "trailers" and not line:
            self.done = True

    def eof(self) -> None:
        """The connection ended: fine only for an until-close body."""
        if not self.done and not self._until_close:
            raise RelayError("connection closed before the end of the reply body")
        self.done = True


class _Connection:
    def __init__(self, transport: asyncio.Transport, reader: _Reader) -> None:
        self.transport = transport
        self.reader = reader
        ssl_object = transport.get_extra_info("ssl_object")
        self.peer_certificate: bytes | None = (
            ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        )
        self.buffered = b""  # bytes read past the end of the previous reply

    def reusable(self) -> bool:
        return not self.reader.at_eof and not self.transport.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.close()


class ReadPieces(list[memoryview]):
    """What one socket read carried of a body: its pieces as memoryviews, and ``spans``,
    the same pieces as ranges of the receive buffers (``MultipartParser.feed_spans``)."""

    __slots__ = ("spans",)

    def __init__(self, spans: list[BufferSpan]) -> None:
        super().__init__(memoryview(buf)[start:end] for buf, start, end in spans)
        self.spans = spans

    def release(self) -> None:
        """Forget the pieces once parsed: the reply's generators still hold this read while
        its consumer works on it, and the receive buffers can go as soon as nothing else
        refers to them."""
        self.spans.clear()
        self.clear()


class RelayResponse:
    """A reply whose body is read on demand; close it (``aclose``) when done."""

    def __init__(
        self,
        client: RelayClient,
        origin: _Origin,
        connection: _Connection,
        status_code: int,
        headers: dict[str, str],
        decoder: _BodyDecoder,
        initial: bytes,
        keep_alive: bool,
    ) -> None:
        self._client = client
        self._origin = origin
        self._connection: _Connection | None = connection
        self.status_code = status_code
        self.headers = headers
        self.peer_certificate = connection.peer_certificate
        self._decoder = decoder
        self._initial = initial
        self._keep_alive = keep_alive
        self._on_done: Callable[[], None] | None = None  # gives the client's slot back

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    async def aiter_raw(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives, in pieces as large as the socket delivers them.

        Pieces are memoryviews of received buffers (bytes-like, not copied)."""
        del chunk_size
        async for pieces in self.aiter_reads():
            for piece in pieces:
                yield cast(bytes, piece)

    async def aiter_reads(self) -> AsyncIterator[ReadPieces]:
        """The body as it arrives: per socket read, its body pieces (memoryviews of the
        received buffers, between chunk-size lines); ``spans`` gives the same pieces as
        ranges of those buffers, for a parser that searches them in place."""
        async for spans in self.aiter_spans():
            yield ReadPieces(spans)

    async def aiter_spans(self) -> AsyncIterator[list[BufferSpan]]:
        """The body as it arrives: per socket read, its body pieces as ranges of the
        received buffers, ``(buffer, start, end)``. A buffer is never written twice."""
        connection = self._connection
        decoder = self._decoder
        if connection is None:
            return
        received = 0
        try:
            reads: list[BufferSpan] = (
                [(self._initial, 0, len(self._initial))] if self._initial else []
            )
            self._initial = b""
            while not decoder.done:
                if not reads:
                    reads = await connection.reader.read_spans(
                        GATHER_BYTES if received >= BULK_AFTER else 0
                    )
                    if not reads:
                        decoder.eof()
                        break
                    received += sum(end - start for _, start, end in reads)
                feed = decoder.feed_span
                pieces = [piece for buf, start, end in reads for piece in feed(buf, start, end)]
                reads = []
                if pieces:
                    yield pieces  # the same list as ReadPieces.spans: see release()
        except ssl.SSLError as exc:
            await self.aclose()
            raise RelayError(f"TLS failed: {exc}", tls=True) from None
        except OSError as exc:
            await self.aclose()
            raise RelayError(f"connection failed: {exc!r}") from None
        except RelayError:
            await self.aclose()
            raise
        if decoder.done:
            self._release()

    def _release(self) -> None:
        self._done()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if not self._keep_alive or self._decoder.leftover:
            connection.close()  # asked to close, or the peer sent more than one reply
            return
        self._client._put(self._origin, connection)

    async def aclose(self) -> None:
        """Give the connection back if the reply was read to its end, else close it."""
        if self._decoder.done:
            self._release()
            return
        self._done()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class RelayClient:
    """Pooled keep-alive HTTP/1.1 (over TLS) for streamed relay exchanges."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float = 5.0,
        max_idle_per_origin: int = 8,
        max_connections: int = 100,
    ) -> None:
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_origin
        self._idle: dict[_Origin, collections.deque[_Connection]] = {}
        self._closed = False
        self._request_events: dict[tuple[str, str, tuple[tuple[str, str], ...]], h11.Request] = {}

    def _put(self, origin: _Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, collections.deque())
        if self._closed or len(idle) >= self._max_idle or not connection.reusable():
            connection.close()
            return
        connection.reader.release()
        idle.append(connection)

    def _take(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable():
                return connection
            connection.close()
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        context = self._ssl if origin.scheme == "https" else None
        if origin.scheme == "https" and context is None:
            raise RelayConnectError("https URL but no TLS context", tls=True)
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport
        protocol: asyncio.BaseProtocol
        try:
            async with asyncio.timeout(self._connect_timeout):
                if context is not None:
                    # TLS on the socket itself (tls_socket): no memory BIOs, no asyncio TLS
                    # layers per socket event on the connection a relay's bytes come in by.
                    transport, protocol = await open_tls_connection(
                        _Reader,
                        origin.host,
                        origin.port,
                        ssl_context=context,
                        server_hostname=origin.host,
                    )
                else:
                    transport, protocol = await loop.create_connection(
                        _Reader, origin.host, origin.port
                    )
        except ssl.SSLError as exc:
            raise RelayConnectError(f"TLS handshake failed: {exc}", tls=True) from None
        except TimeoutError:
            raise RelayConnectError("connect timed out", tls=False) from None
        except OSError as exc:
            raise RelayConnectError(f"cannot connect: {exc}", tls=False) from None
        assert isinstance(transport, asyncio.Transport) and isinstance(protocol, _Reader)
        return _Connection(transport, protocol)

    async def post(
        self,
        url: str,
        body: bytes | AsyncIterator[bytes],
        headers: list[tuple[str, str]],
        *,
        idempotent: bool = True,
    ) -> RelayResponse:
        """Send a POST and return once the reply's status line and headers have arrived.

        A streamed ``body`` goes out chunked, on a new connection: it cannot be replayed if
        a pooled connection turned out to be closed. Neither is a request that must not run
        twice (``idempotent=False``, e.g. a registration): a peer closing a pooled connection
        may have read it first."""
        return await self.request("POST", url, body, headers, idempotent=idempotent)

    async def get(self, url: str, headers: list[tuple[str, str]]) -> RelayResponse:
        """Send a GET (e.g. WADO-RS, QIDO-RS) and return once the reply's headers arrived."""
        return await self.request("GET", url, b"", headers)

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | AsyncIterator[bytes],
        headers: list[tuple[str, str]],
        *,
        idempotent: bool = True,
    ) -> RelayResponse:
        """Send a request; see :meth:`post`."""
        if method not in ("GET", "POST", "PUT", "DELETE"):
            raise ValueError(f"unsupported method {method!r}")  # HEAD has no body to frame
        origin, target = _origin(url)
        # One slot per connection in use, released when its reply is closed or read to the
        # end: a flood of consumers queues here instead of opening sockets without bound.
        await self._slots.acquire()
        try:
            response = await self._send(method, origin, target, body, headers, idempotent)
        except BaseException:
            self._slots.release()
            raise
        response._on_done = self._slots.release
        return response

    async def _send(
        self,
        method: str,
        origin: _Origin,
        target: str,
        body: bytes | AsyncIterator[bytes],
        headers: list[tuple[str, str]],
        idempotent: bool,
    ) -> RelayResponse:
        replayable = idempotent and isinstance(body, bytes)
        pooled = self._take(origin) if replayable else None
        if pooled is not None:
            try:
                return await self._exchange(method, origin, pooled, target, body, headers)
            except _StaleConnection:
                pass  # closed while idle: once more on a new connection
        connection = await self._connect(origin)
        try:
            return await self._exchange(method, origin, connection, target, body, headers)
        except _StaleConnection as exc:
            raise RelayError(f"connection closed before the reply: {exc}") from None

    async def _exchange(
        self,
        method: str,
        origin: _Origin,
        connection: _Connection,
        target: str,
        body: bytes | AsyncIterator[bytes],
        headers: list[tuple[str, str]],
    ) -> RelayResponse:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
        framing: list[tuple[str, str]]
        if not isinstance(body, bytes):
            framing = [("transfer-encoding", "chunked")]
        elif body or method in ("POST", "PUT"):
            framing = [("content-length", str(len(body)))]
        else:
            framing = []  # a GET says nothing of a body it does not have (RFC 9110 8.6)
        request = self._request_event(
            method,
            target,
            (("host", origin.netloc), *framing, ("user-agent", "xca-gateway"), *headers),
        )
        received_any = False
        transport = connection.transport
        try:
            head = conn.send(request) or b""
            if isinstance(body, bytes):
                # One write: one TLS record and one send() for a small request, not two.
                transport.write(head + body if len(body) <= _JOIN_BELOW else head)
                if len(body) > _JOIN_BELOW:
                    transport.write(body)
            else:
                transport.write(head)
                async for chunk in body:
                    if chunk:
                        transport.write(b"%x\r\n" % len(chunk))
                        transport.write(chunk)
                        transport.write(b"\r\n")
                        await connection.reader.drain()
                transport.write(b"0\r\n\r\n")
            # h11 parses the status line and headers only; the body is framed by _BodyDecoder
            # straight from the received buffers.
            pending = b""
            while True:
                data = b"".join(await connection.reader.read())
                if not data:
                    if not received_any:
                        raise _StaleConnection("EOF")
                    raise RelayError("connection closed before the reply headers")
                received_any = True
                pending += data
                end = pending.find(b"\r\n\r\n")
                if end < 0:
                    if len(pending) > _MAX_HEADER_BYTES:
                        raise RelayError("reply headers too large")
                    continue
                conn.receive_data(pending[: end + 4])
                event = conn.next_event()
                if isinstance(event, h11.InformationalResponse):
                    pending = pending[end + 4 :]  # h11 now waits for the final reply
                    continue
                if not isinstance(event, h11.Response):
                    raise RelayError(f"unexpected HTTP event {type(event).__name__}")
                response_headers: dict[str, str] = {}
                for name, value in event.headers:
                    key = name.decode("latin-1").lower()
                    text = value.decode("latin-1")
                    # Repeated fields (RFC 9110 5.3) are combined; content-length duplicates
                    # have already been refused by h11.
                    prior = response_headers.get(key)
                    response_headers[key] = text if prior is None else f"{prior}, {text}"
                return RelayResponse(
                    self,
                    origin,
                    connection,
                    event.status_code,
                    response_headers,
                    _decoder_for(event, response_headers),
                    pending[end + 4 :],
                    keep_alive=_keep_alive(event, response_headers),
                )
        except _StaleConnection:
            connection.close()
            raise
        except (ConnectionResetError, BrokenPipeError) as exc:
            connection.close()
            if not received_any:
                raise _StaleConnection(repr(exc)) from None
            raise RelayError(f"connection failed: {exc!r}") from None
        except h11.RemoteProtocolError as exc:
            connection.close()
            raise RelayError(f"malformed HTTP reply: {exc}") from None
        except ssl.SSLError as exc:
            connection.close()
            raise RelayError(f"TLS failed: {exc}", tls=True) from None
        except OSError as exc:
            connection.close()
            raise RelayError(f"connection failed: {exc!r}") from None
        except BaseException:
            connection.close()
            raise

    def _request_event(
        self, method: str, target: str, headers: tuple[tuple[str, str], ...]
    ) -> h11.Request:
        """The h11 request event, made once per method, target and headers: h11 validates
        every header of a new event (a fan-out sends the same few heads again and again, and
        this was a tenth of its CPU). Events are immutable, so one serves every connection."""
        key = (method, target, headers)
        event = self._request_events.get(key)
        if event is None:
            if len(self._request_events) >= _MAX_REQUEST_EVENTS:
                self._request_events.clear()
            event = h11.Request(method=method, target=target, headers=list(headers))
            self._request_events[key] = event
        return event

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A pooled connection was closed by the peer before it could carry this request."""


def _decoder_for(event: h11.Response, headers: dict[str, str]) -> _BodyDecoder:
    if event.status_code in (204, 304) or 100 <= event.status_code < 200:
        return _BodyDecoder(length=0, chunked=False)
    encoding = headers.get("transfer-encoding", "").strip().lower()
    if encoding:
        if encoding != "chunked":
            raise RelayError(f"unsupported transfer-encoding {encoding[:40]!r}")
        return _BodyDecoder(length=None, chunked=True)
    length = headers.get("content-length")
    if length is not None:
        return _BodyDecoder(length=int(length), chunked=False)  # h11 validated it
    return _BodyDecoder(length=None, chunked=False)


def _keep_alive(event: h11.Response, headers: dict[str, str]) -> bool:
    if event.http_version != b"1.1":
        return False
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "close" in tokens:
        return False
    # Without framing the body runs until the connection closes.
    return "transfer-encoding" in headers or "content-length" in headers
