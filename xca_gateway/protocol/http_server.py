"""HTTP/1.1 server that owns the TLS accept: asyncio streams + h11.

Why not uvicorn/hypercorn: they neither hand the verified client certificate to the application
nor tell it about failed handshakes, and the gateway needs both (authorization by peer identity,
ATNA Security Alert audits for refused nodes). Here every TCP connection is accepted in clear,
upgraded with ``start_tls`` under our control, and a failed handshake becomes a
:class:`~xca_gateway.protocol.tls.HandshakeFailure` callback.

No caller can stall the others (:class:`ConnectionLimits`): a connection is admitted at accept,
before a byte is read, against a global cap and a cap per source address (a few accepts per
turn of the event loop, by our own accept rather than asyncio's); a silent TLS connection waits
as a bare socket (no transport, no task) and its ClientHello must start within a short
``hello_timeout``; connections still before the end of their handshake are
a bounded pool in which a newcomer displaces the oldest (an idle socket is always older than a
handshake in progress); a request head has one absolute deadline, not one per read.

Bodies stream in both directions: the application reads the request body as an async iterator
and may answer with an async iterable, sent with chunked transfer encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11

from xca_gateway.protocol.handshake_schedule import HandshakeLimits, HandshakeSchedule
from xca_gateway.protocol.proxy_protocol import (
    FIXED_LENGTH,
    ProxyHeader,
    ProxyProtocolError,
    ProxySources,
    header_length,
    parse_header,
)
from xca_gateway.protocol.tls import (
    HANDSHAKE_CAPTURE,
    NATIVE_TLS,
    HandshakeCapture,
    HandshakeFailure,
    certificate_info,
    describe_handshake_error,
)
from xca_gateway.settings import ServerConfig, TlsConfig


class ListenerSettings(Protocol):
    """The parts of a gateway's configuration that time its HTTPS listeners."""

    @property
    def server(self) -> ServerConfig: ...

    @property
    def tls(self) -> TlsConfig: ...


log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
_LINGER_SECONDS = 1.0
# Bytes queued in the transport before a streamed response waits for the reader.
_DRAIN_ABOVE = 1024 * 1024
# A chunked body's pieces are gathered while its producer has more at hand, up to this much,
# and go out as one HTTP chunk in one transport write (see ChunkBatch, _ChunkedWriter). Above
# a relay's reads (about 256 KiB), so that one read's pieces are one write.
GATHER_BYTES = 512 * 1024
# Pieces shorter than this (a MIME part's head, a delimiter) are copied into the bytes before
# them, the framing included, instead of being a TLS record of their own.
SMALL_PIECE = 2048
# What a refused body may still send while our answer reaches its client (then reset): enough
# for a client to notice the answer, too little to keep the event loop decrypting a flood.
_LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PeerCertificate:
    subject: str
    issuer: str
    serial_number: int
    fingerprint_sha256: str
    san_dns: tuple[str, ...] = ()
    san_ip: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    der: bytes = b""


@dataclass(frozen=True)
class PeerInfo:
    address: str
    port: int
    certificate: PeerCertificate | None = None
    tls_version: str | None = None
    cipher: str | None = None


class BodyTooLarge(Exception):
    pass


class Request:
    """One HTTP request; ``body()`` streams the request body exactly once."""

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        peer: PeerInfo,
        body: AsyncIterator[bytes],
        scheme: str,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.peer = peer
        self.scheme = scheme
        self._body = body
        self.body_consumed = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            return None

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk
        self.body_consumed = True

    async def read(self, limit: int) -> bytes:
        data = bytearray()
        async for chunk in self.body():
            data += chunk
            if len(data) > limit:
                raise BodyTooLarge
        return bytes(data)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] = b""
    close: bool = False
    # Called once the response has been sent (or failed), e.g. to close temp files.
    on_complete: Callable[[bool], None] | None = None


App = Callable[[Request], Awaitable[Response]]

Buffer = bytes | bytearray | memoryview


class ChunkBatch:
    """The pieces of a chunked body gathered for one write, framed as ONE HTTP chunk. Sans-IO.

    Each buffer handed to asyncio's TLS transport is an ``SSLObject.write`` of its own (a TLS
    record at least) and each ``writelines`` a ``send``: a relay writing a chunk-size line, a
    part head and a piece per call paid four records and two sends per instance. Here small
    pieces are copied together with the framing before them into one buffer, large ones (a
    relay's pieces: memoryviews of what it received) are passed on uncopied, and the whole
    batch is one chunk, so the receiver also parses one chunk-size line per batch.
    """

    __slots__ = ("_buffers", "_lead", "_small", "size")

    def __init__(self) -> None:
        self._buffers: list[Buffer] = []  # after the lead: large pieces and joined small ones
        self._lead = bytearray()  # small pieces before the first large one
        self._small = self._lead  # where the next small piece goes
        self.size = 0

    def add(self, piece: Buffer) -> None:
        """Gather ``piece`` (non-empty). A large piece is kept as it is: its producer must
        not change it afterwards."""
        n = len(piece)
        self.size += n
        if n < SMALL_PIECE:
            self._small += piece
        else:
            self._buffers.append(piece)
            self._small = bytearray()
            self._buffers.append(self._small)

    def take(self, before: bytes) -> list[Buffer]:
        """The batch as one chunk after ``before`` (the CRLF ending the previous chunk's
        data, or nothing), without its own closing CRLF; the batch is empty afterwards."""
        head = bytearray(before)
        head += b"%x\r\n" % self.size
        head += self._lead
        out: list[Buffer] = [head]
        out.extend(b for b in self._buffers if b)
        self._buffers = []
        self._lead = self._small = bytearray()
        self.size = 0
        return out


class _ChunkedWriter:
    """A chunked body's writes: pieces gathered (:class:`ChunkBatch`) while the producer
    yields them without waiting, written when it is about to wait (a callback at the event
    loop's next turn, which comes only once the writing task is suspended) or once
    :data:`GATHER_BYTES` are gathered. Nothing is held back while the producer waits, so this
    adds no latency; a relay's pieces of one socket read go out in one ``send``."""

    __slots__ = ("_batch", "_loop", "_scheduled", "_transport", "closed", "pending")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._batch = ChunkBatch()
        self._scheduled = False
        self.pending = b""  # the CRLF ending the last chunk written
        self.closed = False  # done (or failed): a scheduled write does nothing

    def add(self, piece: Buffer) -> None:
        batch = self._batch
        batch.add(piece)
        if batch.size >= GATHER_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        if not self.closed and not self._transport.is_closing():
            self.flush()

    def flush(self) -> None:
        batch = self._batch
        if batch.size:
            self._transport.writelines(batch.take(self.pending))
            self.pending = b"\r\n"


@dataclass(frozen=True)
class ServerTimeouts:
    handshake: float = 10.0
    header: float = 15.0
    body: float = 60.0
    keepalive: float = 75.0
    handler: float = 300.0
    # A request body must average at least this many bytes/s once body_grace seconds have
    # passed: a client dripping a byte at a time (slowloris) is cut off instead of holding a
    # connection until the handler timeout.
    min_body_rate: float = 1024.0
    body_grace: float = 10.0

    @classmethod
    def for_gateway(cls, config: ListenerSettings) -> ServerTimeouts:
        """The timeouts of every HTTPS listener of a gateway, from ``[server]`` and ``[tls]``."""
        server = config.server
        return cls(
            handshake=config.tls.handshake_timeout,
            header=server.header_timeout,
            body=server.body_timeout,
            keepalive=server.keepalive_timeout,
            handler=server.handler_timeout,
            min_body_rate=server.min_body_rate,
            body_grace=server.body_grace,
        )


@dataclass(frozen=True)
class ConnectionLimits:
    """Admission of TCP connections, decided at accept before any byte is read."""

    max_connections: int = 1000
    # Connections from one source address (an IPv6 /64) at once: one host cannot take them all.
    max_connections_per_source: int = 256
    # Connections accepted but not through the TLS handshake yet. When the pool is full, the
    # oldest is dropped for the newcomer: a legitimate handshake takes milliseconds, so the
    # oldest is an idle or stalled socket.
    max_pending_handshakes: int = 256
    # Seconds for the first bytes of the ClientHello to arrive after the TCP accept (the rest of
    # the handshake has tls.handshake_timeout).
    hello_timeout: float = 5.0
    # Request bodies larger than LARGE_BODY_BYTES read at once per source; the others wait their
    # turn unread. A source streaming many bodies at once would otherwise get a turn of the
    # event loop for each of them at every round, and every other caller would wait for them.
    max_large_bodies_per_source: int = 1
    # TLS handshakes in progress at once per source (the others wait, unread, within
    # tls.handshake_timeout): a source opening hundreds of connections at once gets a few
    # turns of the event loop per round for its handshakes, not hundreds.
    max_handshakes_per_source: int = 16
    # TLS handshakes started per second per source (a token bucket holding a burst of them),
    # and by all sources together: the excess waits unread, sources served round-robin
    # (see handshake_schedule).
    handshake_rate_per_source: float = 200.0
    handshake_burst_per_source: int = 400
    handshake_rate: float = 1000.0
    # Handshake tokens a source pays when a request body of its is refused part-way (the
    # connection closes, and a bomb would otherwise be resent at once on a new one).
    refused_body_penalty: int = 50

    @classmethod
    def for_gateway(cls, config: ListenerSettings) -> ConnectionLimits:
        server = config.server
        return cls(
            max_connections=server.max_connections,
            max_connections_per_source=server.max_connections_per_source,
            max_pending_handshakes=server.max_pending_handshakes,
            hello_timeout=server.hello_timeout,
            max_large_bodies_per_source=server.max_large_bodies_per_source,
            max_handshakes_per_source=server.max_handshakes_per_source,
            handshake_rate_per_source=server.handshake_rate_per_source,
            handshake_burst_per_source=server.handshake_burst_per_source,
            handshake_rate=server.handshake_rate,
            refused_body_penalty=server.refused_body_penalty,
        )

    def handshake_limits(self) -> HandshakeLimits:
        return HandshakeLimits(
            per_source_concurrency=self.max_handshakes_per_source,
            per_source_rate=self.handshake_rate_per_source,
            per_source_burst=float(self.handshake_burst_per_source),
            rate=self.handshake_rate,
            # A second's worth: a burst of many sources at once is spread like a flood.
            burst=max(1.0, self.handshake_rate),
        )


def source_of(address: str) -> str:
    """The unit of the per-source cap: the IPv4 address, or the IPv6 /64 (one host's prefix)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_REFUSAL_LOG_INTERVAL = 10.0


class _QuietLog:
    """At most one warning per key every ten seconds, the next one saying how many were not
    logged: a flood of refused connections must not become a flood of log lines."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -_REFUSAL_LOG_INTERVAL) < _REFUSAL_LOG_INTERVAL:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            message += f" (and {skipped} more like it in the last {_REFUSAL_LOG_INTERVAL:g} s)"
        log.warning(message, *args)


_handshake_log = _QuietLog()
# Connections taken from a listening socket per turn of the event loop: a burst of thousands
# is spread over many turns, with every other caller's work in between, instead of one turn
# that makes a transport and a task of each (asyncio's own accept takes up to the backlog).
_ACCEPTS_PER_TURN = 16
# Silent connections whose hello_timeout ended, dropped per turn of the loop (the rest on the
# next turns): a flood that arrived at once must not be reported in one long turn either.
_EXPIRIES_PER_TURN = 32
# Above this many bytes a request body is "large": the rest of it is read in its source's turn.
LARGE_BODY_BYTES = 64 * 1024


class ConnectionGate:
    """Accounting of one listener's connections by source, and of the pending handshakes.

    Plain bookkeeping (no sockets): :meth:`admit` at accept, :meth:`release` when the
    connection ends, :meth:`pending` / :meth:`settled` around the handshake. Refusals are
    counted by reason and reported to ``on_refused`` (metrics), and logged at most every
    ten seconds, so a flood of connections does not become a flood of log lines.
    """

    def __init__(
        self,
        limits: ConnectionLimits,
        *,
        name: str = "https",
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self.name = name
        self.on_refused = on_refused
        self.active = 0
        self.by_source: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        # Insertion-ordered (the first entry is the oldest): connections before the end of
        # their handshake that have sent nothing yet, and those that have.
        self._pending: dict[object, Callable[[], None]] = {}
        self._speaking: dict[object, Callable[[], None]] = {}
        self._probes: dict[object, Callable[[], bool]] = {}
        # (kind, source) -> [its turns (a semaphore), connections holding or waiting for one].
        self._turns: dict[tuple[str, str], list[Any]] = {}
        self._logged: dict[str, float] = {}
        # Handshakes: who starts next (created on first use: it needs the running loop's clock).
        self._schedule: HandshakeSchedule | None = None
        self._wake: asyncio.TimerHandle | None = None
        self._swept = 0.0

    def admit(self, address: str) -> str | None:
        """Count a new connection in, or return why it is refused."""
        source = source_of(address)
        if self.active >= self.limits.max_connections:
            reason = "max_connections"
        elif self.by_source.get(source, 0) >= self.limits.max_connections_per_source:
            reason = "max_connections_per_source"
        else:
            self.active += 1
            self.by_source[source] = self.by_source.get(source, 0) + 1
            return None
        self._refuse(reason, address)
        return reason

    def release(self, address: str) -> None:
        source = source_of(address)
        self.active -= 1
        left = self.by_source.get(source, 0) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)

    async def acquire_turn(self, kind: str, source: str) -> None:
        """Wait for one of ``source``'s turns at ``kind`` (``body``: reading a large request
        body; ``handshake``: a TLS handshake), of which it has a fixed number at once."""
        key = (kind, source)
        entry = self._turns.get(key)
        if entry is None:
            turns = (
                self.limits.max_large_bodies_per_source
                if kind == "body"
                else self.limits.max_handshakes_per_source
            )
            entry = self._turns[key] = [asyncio.Semaphore(turns), 0]
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._forget_turn(key, entry)
            raise

    def release_turn(self, kind: str, source: str) -> None:
        key = (kind, source)
        entry = self._turns.get(key)
        if entry is not None:
            entry[0].release()
            self._forget_turn(key, entry)

    def _forget_turn(self, key: tuple[str, str], entry: list[Any]) -> None:
        entry[1] -= 1
        if not entry[1]:
            del self._turns[key]

    def waiting_or_holding(self, kind: str, source: str) -> int:
        """Connections of ``source`` holding or waiting for a turn at ``kind``."""
        if kind == "handshake":
            schedule = self._schedule
            if schedule is None:
                return 0
            return schedule.waiting(source) + schedule.in_progress(source)
        entry = self._turns.get((kind, source))
        return int(entry[1]) if entry is not None else 0

    async def acquire_handshake(self, source: str) -> None:
        """Wait, unread, until ``source`` may start a TLS handshake (its rate, its handshakes
        in progress, all sources' rate; sources in turn). Cancel the wait to give up."""
        loop = asyncio.get_running_loop()
        if self._schedule is None:
            self._schedule = HandshakeSchedule(self.limits.handshake_limits(), loop.time())
        granted: asyncio.Future[None] = loop.create_future()
        self._schedule.enqueue((granted, source), source, loop.time())
        self._grant()
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release_handshake(source)  # granted as it was given up
            else:
                self._schedule.cancel((granted, source), source, loop.time())
                self._grant()
            raise

    def penalize(self, source: str) -> None:
        """``source``'s request body was refused part-way: its next handshakes wait."""
        if self.limits.refused_body_penalty <= 0:
            return
        loop = asyncio.get_running_loop()
        if self._schedule is None:
            self._schedule = HandshakeSchedule(self.limits.handshake_limits(), loop.time())
        self._schedule.penalize(source, self.limits.refused_body_penalty, loop.time())

    def release_handshake(self, source: str) -> None:
        """A granted handshake ended, either way."""
        if self._schedule is not None:
            self._schedule.finished(source, asyncio.get_running_loop().time())
            self._grant()

    def _grant(self) -> None:
        schedule = self._schedule
        assert schedule is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key in schedule.grants(now):
            assert isinstance(key, tuple)
            waiter, source = key
            if waiter.done():  # given up, its task not yet told: hand the turn back
                schedule.finished(source, now)
            else:
                waiter.set_result(None)
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        at = schedule.next_grant_at(now)
        if at is not None:
            self._wake = loop.call_at(at, self._grant)
        if now - self._swept > 10.0:
            self._swept = now
            schedule.sweep(now)

    def pending(
        self,
        key: object,
        drop: Callable[[], None],
        has_spoken: Callable[[], bool] | None = None,
    ) -> None:
        """``key`` starts waiting for its handshake; ``drop`` ends it if it is displaced.

        A full pool displaces its oldest *silent* connection (it has sent nothing yet) before
        any that is handshaking: a client whose handshake is slow on a busy machine is not
        pushed out by a flood of sockets that never speak. ``has_spoken`` looks at the socket
        itself: a burst of accepts displaces before any connection's task has run, and a
        client whose ClientHello is already there must not pass for silent then.
        """
        while self.pending_handshakes >= self.limits.max_pending_handshakes:
            if self._pending:
                oldest = next(iter(self._pending))
                probe = self._probes.pop(oldest, None)
                if probe is not None and probe():
                    self.speaking(oldest)  # each connection is looked at once at most
                    continue
                pool = self._pending
            else:
                pool = self._speaking
                oldest = next(iter(pool))
            displaced = pool.pop(oldest)
            self._refuse("max_pending_handshakes", "oldest pending handshake")
            displaced()
        self._pending[key] = drop
        if has_spoken is not None:
            self._probes[key] = has_spoken

    def speaking(self, key: object) -> None:
        """``key`` has sent its first bytes: displaced only when no silent one is left."""
        self._probes.pop(key, None)
        drop = self._pending.pop(key, None)
        if drop is not None:
            self._speaking[key] = drop

    def settled(self, key: object) -> None:
        self._probes.pop(key, None)
        self._pending.pop(key, None)
        self._speaking.pop(key, None)

    @property
    def pending_handshakes(self) -> int:
        return len(self._pending) + len(self._speaking)

    def large_bodies(self, source: str) -> int:
        """Requests of ``source`` reading a large body or waiting for their turn to."""
        return self.waiting_or_holding("body", source)

    def _refuse(self, reason: str, who: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.on_refused is not None:
            try:
                self.on_refused(self.name, reason)
            except Exception:
                log.exception("connection refusal callback failed")
        now = time.monotonic()
        if now - self._logged.get(reason, -_REFUSAL_LOG_INTERVAL) >= _REFUSAL_LOG_INTERVAL:
            self._logged[reason] = now
            log.warning(
                "%s: refused a connection (%s, latest: %s); %d refused so far for this reason",
                self.name,
                reason,
                who,
                self.refused[reason],
            )


class _Pending:
    """A connection in the pool of pending handshakes, from its accept on.

    A TLS connection starts as a bare accepted socket (``sock``) watched for its first byte
    (the lobby): no transport, no task, no buffers, so a flood of sockets that never speak,
    displaced or timed out by the thousand, costs an accept, an epoll registration and a
    reset each. The first byte makes it a transport and a task (``sock`` None from then on).
    """

    __slots__ = (
        "address",
        "admitted",
        "displaced",
        "heard",
        "made",
        "port",
        "since",
        "sock",
        "task",
    )

    def __init__(
        self, sock: socket.socket | None = None, address: str = "?", port: int = 0
    ) -> None:
        self.task: asyncio.Task[None] | None = None
        self.displaced = False
        self.sock = sock
        self.address = address
        self.port = port
        self.since = 0.0
        # Its first bytes were seen in the lobby: no need to wait for them again.
        self.heard = False
        # A transport owns the socket; the address counted in at the gate (to release).
        self.made = False
        self.admitted: str | None = None

    def drop(self) -> None:
        self.displaced = True
        if self.task is not None:
            self.task.cancel()


class _BodySlot:
    """One request's turn to read a large body, released once (body read, or request over)."""

    def __init__(self, gate: ConnectionGate, source: str) -> None:
        self.gate = gate
        self.source = source
        self.held = False

    async def acquire(self) -> None:
        await self.gate.acquire_turn("body", self.source)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release_turn("body", self.source)


async def wait_readable(transport: asyncio.BaseTransport, timeout: float) -> bool:
    """Wait until the peer has sent something (or closed), without reading it.

    The transport must not be reading (paused from ``connection_made``). Its socket cannot be
    watched directly while a transport owns it, so a duplicate of the descriptor is.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:  # pragma: no cover - every TCP transport has one
        return True
    loop = asyncio.get_running_loop()
    fd = os.dup(sock.fileno())
    try:
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout(timeout):
                await ready
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _has_spoken(transport: asyncio.Transport) -> bool:
    """Whether the peer has sent something (or closed) that is not read yet; no waiting."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return False
    return _readable_now(sock.fileno())


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: nothing to linger over, no TIME_WAIT kept."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# accept() errors after which the listener rests a moment (as asyncio's own accept does):
# out of descriptors or memory, accepting again at once would only spin.
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RequestBodyTooSlow(Exception):
    pass


def peer_certificate(ssl_object: Any) -> PeerCertificate | None:
    """The verified client certificate of a TLS connection (SSLObject or SSLSocket)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None

    info = certificate_info(der)
    return PeerCertificate(
        subject=info.subject,
        issuer=info.issuer,
        serial_number=info.serial_number,
        fingerprint_sha256=info.fingerprint_sha256,
        san_dns=info.san_dns,
        san_ip=info.san_ip,
        san_uri=info.san_uri,
        der=der,
    )


async def tls_accept(
    writer: asyncio.StreamWriter,
    ssl_context: ssl.SSLContext,
    *,
    timeout: float,
    on_failure: Callable[[HandshakeFailure], None] | None,
    peer: tuple[str, int] | None = None,
) -> PeerInfo | None:
    """Run the server side of the TLS handshake on an accepted connection.

    Returns the verified peer, or None after reporting the refusal (address, reason and the
    certificate the peer presented) to ``on_failure`` and aborting the connection. Any TCP
    server of the gateway (HTTPS, MLLP) accepts plain TCP and calls this, so that refused
    handshakes reach the audit trail, which a server started with ``ssl=`` never tells.
    """
    # ``peer``: the client a PROXY protocol header named (else the TCP peer).
    address, port = peer or writer.get_extra_info("peername")[:2]
    capture = HandshakeCapture()
    HANDSHAKE_CAPTURE.set(capture)  # this connection's task context only
    try:
        # Our own deadline (not ssl_handshake_timeout) so that a stalled handshake surfaces
        # as TimeoutError and is reported like any other refusal.
        async with asyncio.timeout(timeout):
            await writer.start_tls(ssl_context, ssl_handshake_timeout=timeout + 5)
    except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
        reason, verify_message = describe_handshake_error(exc)
        failure = HandshakeFailure(address, port, reason, verify_message, capture.certificate_der)
        _handshake_log.warning(
            reason,
            "TLS handshake from %s:%s refused: %s (certificate: %s)",
            address,
            port,
            reason,
            failure.certificate_subject or "none",
        )
        if on_failure is not None:
            try:
                on_failure(failure)
            except Exception:
                log.exception("handshake failure callback failed")
        writer.transport.abort()
        return None
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None:
        # The capture's message callback ran for every record of every response (~65,000
        # per GB relayed); after the handshake it has nothing to capture.
        NATIVE_TLS.quiet(ssl_object)
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return PeerInfo(
        address=address,
        port=port,
        certificate=peer_certificate(ssl_object),
        tls_version=ssl_object.version() if ssl_object is not None else None,
        cipher=cipher[0] if cipher else None,
    )


class _AcceptProtocol(asyncio.Protocol):
    """Holds a fresh transport, not reading, until the connection's task takes it over."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called before the transport first reads: paused here, the ClientHello (or the PROXY
        # header) is left in the socket for the connection's task.
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:  # pragma: no cover - paused until replaced
        raise AssertionError("read before admission")


class HttpServer:
    """Serve ``app`` on one listening socket, with or without TLS."""

    def __init__(
        self,
        app: App,
        *,
        ssl_context: ssl.SSLContext | None,
        on_handshake_failure: Callable[[HandshakeFailure], None] | None = None,
        timeouts: ServerTimeouts | None = None,
        max_connections: int = 1000,
        max_header_bytes: int = 64 * 1024,
        server_header: str = "xca-gateway",
        limits: ConnectionLimits | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        name: str = "https",
        proxy: ProxySources | None = None,
    ) -> None:
        self.app = app
        # PROXY protocol v2: connections come from these balancers, each starting with the
        # header that names its client (read before the TLS handshake).
        self.proxy = proxy
        self.name = name
        self.ssl_context = ssl_context
        self.on_handshake_failure = on_handshake_failure
        self.timeouts = timeouts or ServerTimeouts()
        self.limits = limits or ConnectionLimits(max_connections=max_connections)
        self.gate = ConnectionGate(self.limits, name=name, on_refused=on_refused)
        self.max_header_bytes = max_header_bytes
        self.server_header = server_header.encode()
        self._server: asyncio.Server | None = None
        # Our own descriptors of the server's listening sockets, accepted from by
        # _accept_some (asyncio's server is made with start_serving=False).
        self._listeners: list[socket.socket] = []
        # The lobby: silent TLS connections (bare sockets), oldest first; see _Pending.
        self._lobby: dict[_Pending, None] = {}
        self._lobby_timer: asyncio.TimerHandle | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Connections inside a request (head read, answer not yet sent): what a drain waits for.
        self._busy: set[asyncio.Task[None]] = set()
        self.draining = False

    @property
    def max_connections(self) -> int:
        return self.limits.max_connections

    @property
    def active_connections(self) -> int:
        return self.gate.active

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        # asyncio binds (addresses, options) but does not serve: its accept takes up to the
        # backlog per turn of the loop and makes a transport and a task of each connection
        # before anything can refuse it. _accept_some takes a few per turn and decides first.
        if sock is not None:
            self._server = await loop.create_server(
                _AcceptProtocol, sock=sock, backlog=1024, start_serving=False
            )
        else:
            self._server = await loop.create_server(
                _AcceptProtocol,
                host,
                port,
                backlog=1024,
                reuse_address=True,
                start_serving=False,
            )
        for listening in self._server.sockets:
            # A descriptor of our own (the server closes its own on close()).
            own = socket.socket(fileno=os.dup(listening.fileno()))
            own.setblocking(False)
            own.listen(1024)  # asyncio listens only when it serves
            self._listeners.append(own)
            loop.add_reader(own.fileno(), self._accept_some, own)

    def _stop_listening(self) -> None:
        loop = asyncio.get_running_loop()
        for own in self._listeners:
            loop.remove_reader(own.fileno())
            own.close()
        self._listeners = []
        if self._server is not None:
            self._server.close()
        if self._lobby_timer is not None:
            self._lobby_timer.cancel()
            self._lobby_timer = None
        for pending in list(self._lobby):
            self.gate.settled(pending)
            self._discard(pending, None)

    async def close(self, grace: float = 5.0) -> None:
        self._stop_listening()
        if self._connections:
            _, pending = await asyncio.wait(self._connections, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def drain(self, deadline: float) -> int:
        """Stop accepting; close idle connections; give requests in flight ``deadline``
        seconds to finish (each connection closes after its answer), then cut the rest.
        Returns how many requests were cut."""
        self.draining = True
        self._stop_listening()
        for task in self._connections - self._busy:
            task.cancel()
        busy = set(self._busy)
        cut = 0
        if busy:
            _, pending = await asyncio.wait(busy, timeout=deadline)
            cut = len(pending)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        idle = set(self._connections)
        if idle:
            await asyncio.wait(idle, timeout=1.0)
        return cut

    def _accept_some(self, listening: socket.socket) -> None:
        """The listening socket is readable: accept a few connections and decide on each."""
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                conn, addr = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS and listening in self._listeners:
                    _handshake_log.warning(
                        "accept", "%s: cannot accept connections: %s", self.name, exc
                    )
                    loop = asyncio.get_running_loop()
                    loop.remove_reader(listening.fileno())
                    loop.call_later(1.0, self._resume_accepting, listening)
                return  # e.g. ECONNABORTED: the next turn goes on
            try:
                self._arrived(conn, addr)
            except Exception:  # one connection must never stop the listener
                log.exception("accepting a connection failed")
                _reset(conn)

    def _resume_accepting(self, listening: socket.socket) -> None:
        if listening in self._listeners:
            asyncio.get_running_loop().add_reader(listening.fileno(), self._accept_some, listening)

    def _arrived(self, conn: socket.socket, addr: Any) -> None:
        """A connection just accepted: refused (reset, no transport, no task), started, or
        put in the lobby to wait for its first byte."""
        address = str(addr[0]) if isinstance(addr, tuple) else "?"
        port = int(addr[1]) if isinstance(addr, tuple) and len(addr) > 1 else 0
        conn.setblocking(False)
        if self.proxy is not None:
            # The balancer's address says nothing of the caller: admission (per-source caps,
            # pending handshakes) waits for the header's address, read in the task.
            if not self.proxy.allows(address):
                self._refuse_proxy(address, port, "not a configured balancer")
                _reset(conn)
                return
            self._connect(conn, address, _Pending(address=address, port=port))
            return
        if self.gate.admit(address) is not None:
            _reset(conn)
            return
        if self.ssl_context is None:
            self._connect(conn, address, _Pending(address=address, port=port))
            return
        pending = _Pending(conn, address, port)
        # In the bounded pool from the accept on: a burst displaces older silent ones at once.
        fd = conn.fileno()
        self.gate.pending(
            pending,
            lambda: self._displace(pending),
            lambda: pending.sock is None or _readable_now(fd),
        )
        loop = asyncio.get_running_loop()
        pending.since = loop.time()
        self._lobby[pending] = None
        loop.add_reader(fd, self._heard, pending)
        if self._lobby_timer is None:
            self._lobby_timer = loop.call_at(
                pending.since + self.limits.hello_timeout, self._expire_lobby
            )

    def _heard(self, pending: _Pending) -> None:
        """A lobby socket has sent its first bytes (or closed): it becomes a connection."""
        sock = pending.sock
        if sock is None:
            return
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # nothing after all: keep waiting
        except OSError:
            first = b""
        if not first:
            # Closed (or reset) without a byte: nothing to hand to TLS, nothing to report
            # (an attacker closing a thousand idle sockets must not cost a thousand tasks).
            self.gate.settled(pending)
            self._discard(pending, None)
            return
        self._leave_lobby(pending)
        pending.heard = True
        self.gate.speaking(pending)
        self._connect(sock, pending.address, pending)

    def _leave_lobby(self, pending: _Pending) -> socket.socket | None:
        sock, pending.sock = pending.sock, None
        if sock is not None:
            self._lobby.pop(pending, None)
            asyncio.get_running_loop().remove_reader(sock.fileno())
        return sock

    def _discard(self, pending: _Pending, reason: str | None) -> None:
        """End a lobby connection: reset, counted out, reported (``reason``) as a refusal."""
        sock = self._leave_lobby(pending)
        if sock is None:
            return
        _reset(sock)
        self.gate.release(pending.address)
        if reason is not None:
            self._report(HandshakeFailure(pending.address, pending.port, reason))

    def _displace(self, pending: _Pending) -> None:
        """The pool of pending handshakes is full and ``pending`` is its oldest."""
        if pending.sock is not None:
            self._discard(
                pending, "dropped before its handshake ended: too many pending handshakes"
            )
        else:
            pending.drop()

    def _expire_lobby(self) -> None:
        """Drop the lobby's sockets silent for hello_timeout (oldest first, a few per turn)."""
        self._lobby_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.limits.hello_timeout
        for _ in range(_EXPIRIES_PER_TURN):
            oldest = next(iter(self._lobby), None)
            if oldest is None:
                return
            if oldest.since + timeout > now:
                self._lobby_timer = loop.call_at(oldest.since + timeout, self._expire_lobby)
                return
            self.gate.settled(oldest)
            self._discard(oldest, f"no TLS ClientHello within {timeout:g} s")
        if self._lobby:
            self._lobby_timer = loop.call_at(now, self._expire_lobby)  # after other work

    def _connect(self, sock: socket.socket, address: str, pending: _Pending) -> None:
        """Make a connection's task: its transport (paused, nothing read), then serving."""
        pending.admitted = address if self.proxy is None else None
        task = asyncio.get_running_loop().create_task(self._run_connection(sock, pending))
        pending.task = task
        self._connections.add(task)
        # Cleanup in a callback: a task cancelled (displaced) before its first step never
        # runs its coroutine's finally.
        task.add_done_callback(lambda done: self._connection_ended(done, sock, pending))

    def _connection_ended(
        self, task: asyncio.Task[None], sock: socket.socket, pending: _Pending
    ) -> None:
        self._connections.discard(task)
        self.gate.settled(pending)
        if pending.admitted is not None:
            self.gate.release(pending.admitted)
            pending.admitted = None
        if not pending.made:  # no transport owns the socket
            sock.close()

    async def _run_connection(self, sock: socket.socket, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(_AcceptProtocol, sock)
            pending.made = True
            reader = asyncio.StreamReader(loop=loop)
            # With a callback, the protocol is the server side (what start_tls looks at); a
            # plain function's result is not made a task.
            made: list[asyncio.StreamWriter] = []
            protocol = asyncio.StreamReaderProtocol(
                reader, lambda _, writer: made.append(writer), loop=loop
            )
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            writer = made[0]
            await self._on_connect(reader, writer, pending)
        except asyncio.CancelledError:
            pass  # displaced before its transport was made, or the server closing
        except Exception:  # a connection must never take the server down
            log.exception("accepting a connection failed")

    def _refuse_proxy(self, address: str, port: int, reason: str) -> None:
        """A connection refused on a PROXY listener: counted, logged and audited once (as a
        refused handshake: the caller never reached TLS)."""
        if self.gate.on_refused is not None:
            try:
                self.gate.on_refused(self.name, "proxy_protocol")
            except Exception:
                log.exception("refusal callback failed")
        self._report(HandshakeFailure(address, port, f"PROXY protocol: {reason}"))

    async def _proxied_peer(self, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        """Read the PROXY v2 header (exactly its bytes, from the paused socket, so that the
        ClientHello after it stays for TLS); the client's (address, port), or None after the
        refusal is reported and the connection aborted."""
        address, port = writer.get_extra_info("peername")[:2]
        sock = writer.transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.hello_timeout
        data = b""
        header: ProxyHeader | None = None
        reason = ""
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            raw.setblocking(False)
            while header is None:
                try:
                    wanted = header_length(data) or FIXED_LENGTH
                except ProxyProtocolError as exc:
                    reason = str(exc)
                    break
                if len(data) >= wanted:
                    try:
                        header = parse_header(data)
                    except ProxyProtocolError as exc:
                        reason = str(exc)
                        break
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or not await wait_readable(writer.transport, remaining):
                    reason = f"no complete header within {self.limits.hello_timeout:g} s"
                    break
                try:
                    chunk = raw.recv(wanted - len(data))
                except BlockingIOError:
                    continue
                except OSError as exc:
                    reason = f"connection failed: {exc}"
                    break
                if not chunk:
                    reason = "connection closed inside the header" if data else "no header"
                    break
                data += chunk
        finally:
            raw.close()  # the duplicate only: the connection stays with its transport
        if header is None:
            self._refuse_proxy(address, port, reason)
            writer.transport.abort()
            return None
        return header.source or (address, port)

    async def _on_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: _Pending
    ) -> None:
        peer: tuple[str, int] | None = None
        try:
            if self.proxy is not None:
                peer = await self._proxied_peer(writer)
                if peer is None:
                    return
                if self.gate.admit(peer[0]) is not None:
                    writer.transport.abort()
                    return
                pending.admitted = peer[0]
                if self.ssl_context is not None:
                    transport = writer.transport
                    assert isinstance(transport, asyncio.Transport)
                    self.gate.pending(pending, pending.drop, lambda: _has_spoken(transport))
            await self._serve_connection(reader, writer, pending, peer)
        except asyncio.CancelledError:
            writer.transport.abort()
        except Exception:  # a connection must never take the server down
            log.exception("connection handler failed")
            writer.transport.abort()

    async def _handshake(
        self,
        writer: asyncio.StreamWriter,
        pending: _Pending,
        peer: tuple[str, int] | None = None,
    ) -> PeerInfo | None:
        address, port = peer or writer.get_extra_info("peername")[:2]
        if self.ssl_context is None:
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            return PeerInfo(address=address, port=port)
        task = asyncio.current_task()
        assert task is not None
        try:
            if pending.displaced:  # displaced before its task first ran
                raise asyncio.CancelledError
            readable = pending.heard or await wait_readable(
                writer.transport, self.limits.hello_timeout
            )
            self.gate.speaking(pending)
            if not readable:
                self._report(
                    HandshakeFailure(
                        address, port, f"no TLS ClientHello within {self.limits.hello_timeout:g} s"
                    )
                )
                writer.transport.abort()
                return None
            source = source_of(address)
            try:
                # Unread until granted: the source's rate and turns, and the other sources'.
                async with asyncio.timeout(self.timeouts.handshake):
                    await self.gate.acquire_handshake(source)
            except TimeoutError:
                self._report(
                    HandshakeFailure(
                        address, port, "too many TLS handshakes from this source (rate or at once)"
                    )
                )
                writer.transport.abort()
                return None
            try:
                return await tls_accept(
                    writer,
                    self.ssl_context,
                    timeout=self.timeouts.handshake,
                    on_failure=self.on_handshake_failure,
                    peer=peer,
                )
            finally:
                self.gate.release_handshake(source)
        except asyncio.CancelledError:
            if not pending.displaced:
                raise
            if task.cancelling():
                task.uncancel()
            self._report(
                HandshakeFailure(
                    address, port, "dropped before its handshake ended: too many pending handshakes"
                )
            )
            writer.transport.abort()
            return None
        finally:
            self.gate.settled(pending)

    def _report(self, failure: HandshakeFailure) -> None:
        _handshake_log.warning(
            failure.reason,
            "TLS handshake from %s:%s refused: %s",
            failure.address,
            failure.port,
            failure.reason,
        )
        if self.on_handshake_failure is not None:
            try:
                self.on_handshake_failure(failure)
            except Exception:
                log.exception("handshake failure callback failed")

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: _Pending,
        proxied: tuple[str, int] | None = None,
    ) -> None:
        peer = await self._handshake(writer, pending, proxied)
        if peer is None:
            return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        first = True
        try:
            while True:
                event = await self._next_head(conn, reader, first=first)
                first = False
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                task = asyncio.current_task()
                assert task is not None
                self._busy.add(task)
                try:
                    keep_going = await self._handle_request(conn, event, reader, writer, peer)
                finally:
                    self._busy.discard(task)
                if not keep_going or self.draining:
                    return
        except h11.RemoteProtocolError as exc:
            await self._send_simple_error(conn, writer, exc.error_status_hint, str(exc))
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            await self._close(reader, writer, linger=conn.their_state not in (h11.DONE, h11.IDLE))

    async def _next_head(
        self, conn: h11.Connection, reader: asyncio.StreamReader, *, first: bool
    ) -> Any:
        """The next request head, within one absolute deadline.

        The deadline runs from the end of the handshake for the first request and from the
        first byte of the head on a kept-alive connection (which may idle ``keepalive`` until
        then). A per-read timeout would let a client trickle a header line every few seconds
        for ever.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.header if first else None
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return None if event is h11.PAUSED else event
            if deadline is None and conn.trailing_data[0]:
                deadline = loop.time() + self.timeouts.header
            timeout = self.timeouts.keepalive if deadline is None else deadline - loop.time()
            if timeout <= 0:
                raise TimeoutError("request head not complete in time")
            data = await asyncio.wait_for(reader.read(_READ_SIZE), timeout)
            if deadline is None and data:
                deadline = loop.time() + self.timeouts.header
            conn.receive_data(data)

    async def _next_event(
        self, conn: h11.Connection, reader: asyncio.StreamReader, timeout: float
    ) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), timeout)
                conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                return None
            return event

    async def _handle_request(
        self,
        conn: h11.Connection,
        event: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: PeerInfo,
    ) -> bool:
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        body_done = False
        source = source_of(peer.address)
        slot = _BodySlot(self.gate, source)

        async def body() -> AsyncIterator[bytes]:
            nonlocal body_done
            if conn.they_are_waiting_for_100_continue:
                writer.write(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            loop = asyncio.get_running_loop()
            started, received, counted_from = loop.time(), 0, 0
            while True:
                if received >= LARGE_BODY_BYTES and not slot.held:
                    # The rest of a large body is read in the source's turn (see ConnectionGate):
                    # its time in the queue does not count against its rate.
                    await slot.acquire()
                    started, counted_from = loop.time(), received
                ev = await self._next_event(conn, reader, self.timeouts.body)
                if isinstance(ev, h11.Data):
                    received += len(ev.data)
                    elapsed = loop.time() - started
                    rate = (received - counted_from) / elapsed if elapsed > 0 else 0.0
                    if elapsed > self.timeouts.body_grace and rate < self.timeouts.min_body_rate:
                        raise RequestBodyTooSlow(f"request body arrives at {rate:.0f} bytes/s")
                    yield bytes(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    body_done = True
                    slot.release()
                    return
                else:
                    raise ConnectionError("connection closed while reading the request body")

        request = Request(
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace"),
            headers,
            peer,
            body(),
            "https" if self.ssl_context else "http",
        )
        try:
            response = await asyncio.wait_for(self.app(request), self.timeouts.handler)
        except TimeoutError:
            response = Response(
                503, [("content-type", "text/plain")], b"handler timed out\n", close=True
            )
        except (ConnectionError, ssl.SSLError):
            return False
        finally:
            slot.release()  # a body refused part-way is not read further
        if not body_done and response.status >= 400:
            # Refused part-way: the connection closes, and the caller pays for the next one.
            self.gate.penalize(source)

        ok = False
        try:
            await self._send_response(conn, writer, response, close=response.close or not body_done)
            ok = True
        finally:
            if response.on_complete is not None:
                try:
                    response.on_complete(ok)
                except Exception:
                    log.exception("response completion callback failed")
        if conn.our_state is h11.MUST_CLOSE or response.close or not body_done:
            return False
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    async def _send_response(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, *, close: bool
    ) -> None:
        headers = [(k.lower(), v) for k, v in response.headers]
        headers.append(("server", self.server_header.decode()))
        if close:
            headers.append(("connection", "close"))
        if isinstance(response.body, bytes | bytearray):
            headers.append(("content-length", str(len(response.body))))
        head = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        writer.write(head)
        end = b""
        if isinstance(response.body, bytes | bytearray):
            if response.body:
                writer.write(conn.send(h11.Data(data=response.body)) or b"")
        else:
            # h11 chose the framing: chunked (HTTP/1.1) is done here, without an h11 event
            # and a join per chunk; h11 still writes the last-chunk.
            chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
            try:
                end = await self._stream_body(conn, writer, response.body, chunked=chunked)
            finally:
                # Whatever happened, release the producer now (files, upstream connections).
                aclose = getattr(response.body, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(aclose(), 5.0)
        writer.write(end + (conn.send(h11.EndOfMessage()) or b""))
        await asyncio.wait_for(writer.drain(), self.timeouts.body)

    async def _stream_body(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        body: AsyncIterable[bytes],
        *,
        chunked: bool,
    ) -> bytes:
        """Write ``body``; returns what must precede the last-chunk (the CRLF ending the
        final chunk's data, held back so that it travels with the next chunk-size line)."""
        transport = writer.transport
        chunks = _ChunkedWriter(transport) if chunked else None
        try:
            async for chunk in body:
                if chunk:
                    if chunks is not None:
                        chunks.add(chunk)
                    else:  # h11 keeps count (a declared length, or until close)
                        transport.write(conn.send(h11.Data(data=chunk)) or b"")
                    # Backpressure: once the socket's buffer passes the high-water mark, wait
                    # for the reader, so a slow consumer slows the producer instead of the
                    # response piling up in memory. Checking the buffer first keeps the
                    # common case (a fast reader) free of a timer per chunk.
                    if transport.is_closing():
                        # The client went away: stop the producer now (write() on a lost
                        # connection would silently discard the rest of the study).
                        raise ConnectionResetError("client disconnected during the response")
                    if transport.get_write_buffer_size() > _DRAIN_ABOVE:
                        if chunks is not None:
                            chunks.flush()
                        async with asyncio.timeout(self.timeouts.body):
                            await writer.drain()
            if chunks is not None:
                chunks.flush()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            writer.transport.abort()
            raise
        except Exception as exc:
            # The producer failed after the status line went out (e.g. an imaging source
            # died mid-study). Reset the connection without the terminating chunk so the
            # client cannot mistake a truncated response for a complete one.
            log.warning("response body failed mid-stream, aborting connection: %r", exc)
            writer.transport.abort()
            raise ConnectionAbortedError("response body failed") from exc
        finally:
            if chunks is not None:
                chunks.closed = True  # a write still scheduled (after a failure) is dropped
        return chunks.pending if chunks is not None else b""

    async def _send_simple_error(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{message}\n".encode()
        with contextlib.suppress(Exception):
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("content-type", "text/plain"),
                            ("content-length", str(len(body))),
                            ("connection", "close"),
                        ],
                    )
                )
                or b""
            )
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await asyncio.wait_for(writer.drain(), 2.0)

    async def _close(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, linger: bool = False
    ) -> None:
        if linger and not writer.transport.is_closing():
            # The peer may still be sending a body we refused (e.g. over the size limit).
            # Closing with unread data makes the kernel send RST, and the client would lose
            # our error response; read and discard for a moment first (bounded).
            ended = False
            with contextlib.suppress(Exception):
                deadline = asyncio.get_running_loop().time() + _LINGER_SECONDS
                discarded = 0
                while discarded < _LINGER_BYTES:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    chunk = await asyncio.wait_for(reader.read(_READ_SIZE), left)
                    if not chunk:
                        ended = True
                        break
                    discarded += len(chunk)
            if not ended:
                # Still sending: a graceful TLS close would wait (30 s) for a close_notify the
                # peer never reads, decrypting and discarding what it sends all the while.
                writer.transport.abort()
                return
        closed = False
        with contextlib.suppress(Exception):
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2.0)
            closed = True
        if not closed:
            writer.transport.abort()  # the peer did not finish the TLS close in time


class ListenError(OSError):
    """A listener that cannot bind, said in the configuration's words (which key, which port,
    why) rather than as ``[Errno 98]``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_BIND_REASONS = {
    errno.EADDRINUSE: "already in use (another process listens there)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


@contextlib.contextmanager
def listen_errors(what: str, host: str, port: int) -> Iterator[None]:
    """Turn a failed bind of ``host:port`` (configured as ``what``, e.g. ``[server] port``)
    into a :class:`ListenError` naming both."""
    try:
        yield
    except ListenError:
        raise
    except OSError as exc:
        reason = _BIND_REASONS.get(exc.errno or 0)
        if exc.errno == errno.EADDRNOTAVAIL:
            reason = f"{host} is not an address of this machine"
        elif isinstance(exc, socket.gaierror):
            reason = f"unknown host {host!r}"
        if reason is None:
            raise
        raise ListenError(f"{what} = {port}: {host}:{port} {reason}") from None
