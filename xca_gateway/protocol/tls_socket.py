"""TLS straight on the socket for the relay client: a non-blocking ``ssl.SSLSocket`` driven by
the event loop's ``add_reader`` / ``add_writer``.

asyncio's TLS transport runs OpenSSL over memory BIOs: each socket event is a ``recv`` into a
Python buffer, a copy into OpenSSL (``BIO_write``), decryption out of it, and several layers of
Python (``SSLProtocol``) in between; each write the same in reverse. A relaying gateway moves
whole studies through its outbound connections, so it paid that per TCP segment. Here OpenSSL
reads and writes the socket itself (``SSL_read`` / ``SSL_write`` on the descriptor, as nginx
does), and one callback per readable event decrypts everything the socket holds, record after
record, into the protocol's own buffer (``asyncio.BufferedProtocol``).

Only what the relay client needs: a client connection, reads into a buffered protocol, writes
with flow control, close with a ``close_notify``, abort.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from xca_gateway.protocol.tls import NATIVE_TLS

__all__ = ["TlsSocketTransport", "open_tls_connection"]

log = logging.getLogger(__name__)

# What one readable event decrypts at most before letting other callbacks run.
_READ_PER_EVENT = 1024 * 1024
# close() with unsent data: how long the peer has to take it before the socket is cut.
_CLOSE_TIMEOUT = 30.0
# OpenSSL's own receive buffer with read-ahead: one recv() brings many TLS records. Without
# read-ahead OpenSSL reads the socket record by record, two recv() per 16 KiB (the 5-byte
# header, then the rest): measured, those system calls cost the relay hop more than asyncio's
# memory BIOs did. With it, SSL_read decrypts record after record out of one big read, as
# nginx does.
READ_AHEAD_BYTES = 256 * 1024


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await future
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _tcp_connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    error: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # as asyncio's transports: no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    assert error is not None
    raise error


async def open_tls_connection(
    protocol_factory: Callable[[], asyncio.BufferedProtocol],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    server_hostname: str | None,
) -> tuple[TlsSocketTransport, asyncio.BufferedProtocol]:
    """Connect, run the TLS handshake and return (transport, protocol). Raises OSError (an
    ``ssl.SSLError`` when TLS failed); the caller bounds the time it takes."""
    loop = asyncio.get_running_loop()
    raw = await _tcp_connect(loop, host, port)
    try:
        sock = ssl_context.wrap_socket(
            raw, do_handshake_on_connect=False, server_hostname=server_hostname
        )
    except BaseException:
        raw.close()
        raise
    try:
        # Kept alive by the SSLSocket; only used while it is open.
        native = NATIVE_TLS.pointer(sock)
        if native is not None:
            NATIVE_TLS.read_ahead(native, READ_AHEAD_BYTES)
        if native is None:
            log.debug("TLS read-ahead not available: reading record by record")
        fd = sock.fileno()
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _ready(loop, fd, write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, fd, write=True)
        protocol = protocol_factory()
        transport = TlsSocketTransport(loop, sock, protocol, read_ahead=native)
    except BaseException:
        sock.close()
        raise
    return transport, protocol


class TlsSocketTransport(asyncio.Transport):
    """An asyncio transport over a connected, handshaken, non-blocking ``ssl.SSLSocket``,
    for a :class:`asyncio.BufferedProtocol`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.BufferedProtocol,
        *,
        read_ahead: int | None = None,
    ) -> None:
        extra: dict[str, Any] = {"socket": sock, "ssl_object": sock}
        with contextlib.suppress(OSError):
            extra["peername"] = sock.getpeername()
            extra["sockname"] = sock.getsockname()
        extra["cipher"] = sock.cipher()
        extra["peercert"] = sock.getpeercert()
        super().__init__(extra)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._native = read_ahead  # the SSL * when OpenSSL reads ahead
        # SSL_read into a buffer: the C method itself, without SSLSocket's two Python layers
        # per record (SSLSocket.recv_into -> read), when this Python has it.
        native = getattr(sock, "_sslobj", None)
        self._read_into: Callable[[int, memoryview], int] = getattr(
            native, "read", lambda size, buffer: sock.recv_into(buffer, size)
        )
        self._closing = False  # close() or abort() called, or the connection is lost
        self._lost = False  # connection_lost scheduled, socket closed
        self._reading = True
        self._reader_on = False
        self._writer_on = False
        # SSL_write must be retried with the same data after a want-read/write: that piece.
        self._retry: bytes | None = None
        self._write_buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._high_water = 256 * 1024
        self._low_water = 64 * 1024
        self._protocol_paused = False
        self._read_wants_write = False  # SSL_read needs the socket writable (TLS rare case)
        self._write_wants_read = False  # SSL_write needs the socket readable (idem)
        protocol.connection_made(self)
        self._reader(True)

    # -- registration --------------------------------------------------------------------

    def _reader(self, on: bool) -> None:
        if on and not self._reader_on and not self._lost:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reader_on = True
        elif not on and self._reader_on:
            self._loop.remove_reader(self._fd)
            self._reader_on = False

    def _writer(self, on: bool) -> None:
        if on and not self._writer_on and not self._lost:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer_on = True
        elif not on and self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False

    # -- reading ---------------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._write_wants_read:
            self._write_wants_read = False
            self._write_ready()
            if self._lost:
                return
        if self._reading:
            self._read()
        elif not self._write_wants_read:
            self._reader(False)  # watched only for the write: no spinning on unread data

    def _read(self) -> None:
        protocol, read = self._protocol, self._read_into
        total = 0
        while self._reading and not self._lost:
            try:
                buffer = memoryview(protocol.get_buffer(-1))
            except BaseException as exc:
                self._fatal(exc)
                return
            size = len(buffer)
            filled = 0
            drained = eof = False
            try:
                while filled < size:
                    count = read(size - filled, buffer[filled:] if filled else buffer)
                    if count == 0:  # the peer's close_notify
                        eof = True
                        break
                    filled += count
            except ssl.SSLEOFError:  # closed without close_notify: the framing judges
                eof = True
            except ssl.SSLWantReadError:
                drained = True
            except ssl.SSLWantWriteError:
                drained = self._read_wants_write = True
                self._writer(True)
            except OSError as exc:  # ssl.SSLError included
                if filled:
                    with contextlib.suppress(Exception):  # failing anyway: the error wins
                        protocol.buffer_updated(filled)
                self._fatal(exc)
                return
            if filled:
                try:
                    protocol.buffer_updated(filled)
                except BaseException as exc:
                    self._fatal(exc)
                    return
            if eof:
                self._eof()
                return
            total += filled
            if drained:
                return
            if total >= _READ_PER_EVENT:
                # What OpenSSL already holds does not wake the selector: come back for it.
                if self._reading and self._holds_data():
                    self._loop.call_soon(self._read_soon)
                return

    def _holds_data(self) -> bool:
        if self._lost:
            return False
        if self._native is not None:
            return NATIVE_TLS.has_pending(self._native)
        return self._sock.pending() > 0

    def _read_soon(self) -> None:
        if self._reading and not self._lost:
            self._read()

    def _eof(self) -> None:
        self._reader(False)
        try:
            keep_open = self._protocol.eof_received()
        except BaseException as exc:
            self._fatal(exc)
            return
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reader(False)

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._reader(True)
        # What OpenSSL kept (read ahead, or the rest of a record) does not wake the selector.
        if self._holds_data():
            self._loop.call_soon(self._read_soon)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing:
            return  # as asyncio's transports: writes after close go nowhere
        if self._retry is None and not self._write_buffer:
            try:
                self._sock.send(data)
                return
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                # OpenSSL took part of it: the same data goes again when the socket allows.
                self._retry = data if isinstance(data, bytes) else bytes(data)
                self._buffered += len(data)
                self._wait_to_write(isinstance(exc, ssl.SSLWantReadError))
            except OSError as exc:
                self._fatal(exc)
                return
        else:
            # Kept past this call: a copy unless immutable (the caller may reuse its buffer).
            self._write_buffer.append(data if isinstance(data, bytes) else bytes(data))
            self._buffered += len(data)
        self._check_high_water()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def _wait_to_write(self, wants_read: bool) -> None:
        if wants_read:
            self._write_wants_read = True
            self._reader(True)
        else:
            self._writer(True)

    def _write_ready(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            if self._retry is None and not self._write_buffer:
                self._writer(False)
            if self._reading:
                self._read()
            if self._lost or self._read_wants_write:
                return  # lost, or the read wants the socket writable again: still watched
        while self._retry is not None or self._write_buffer:
            piece = self._retry if self._retry is not None else self._write_buffer.popleft()
            self._retry = piece
            try:
                self._sock.send(piece)
            except ssl.SSLWantWriteError:
                self._writer(True)
                return
            except ssl.SSLWantReadError:
                self._writer(False)
                self._wait_to_write(True)
                return
            except OSError as exc:
                self._fatal(exc)
                return
            self._retry = None
            self._buffered -= len(piece)
        self._writer(False)
        self._check_low_water()
        if self._closing and not self._lost:
            self._shutdown()

    def _check_high_water(self) -> None:
        if not self._protocol_paused and self._buffered > self._high_water:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except BaseException as exc:
                self._fatal(exc)

    def _check_low_water(self) -> None:
        if self._protocol_paused and self._buffered <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except BaseException as exc:
                self._fatal(exc)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = 64 * 1024 if high is None else high
        self._low_water = self._high_water // 4 if low is None else low
        self._check_high_water()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    # -- closing ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is buffered, then a close_notify, and close."""
        if self._closing:
            return
        self._closing = True
        self._reading = False
        self._reader(False)
        if self._retry is None and not self._write_buffer:
            self._shutdown()
        else:  # a peer that never reads what is left does not keep the socket for ever
            self._loop.call_later(_CLOSE_TIMEOUT, self._force_close, None)

    def abort(self) -> None:
        self._force_close(None)

    def _shutdown(self) -> None:
        # One try at the close_notify, without waiting for the peer's: the connection is
        # done either way (framing, not the TLS close, ends an HTTP message).
        with contextlib.suppress(OSError, ValueError):
            self._sock.unwrap()
        self._force_close(None)

    def _fatal(self, exc: BaseException) -> None:
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._closing = True
        self._reading = False
        self._reader(False)
        self._writer(False)
        self._lost = True
        self._write_buffer.clear()
        self._retry = None
        self._buffered = 0
        self._sock.close()
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        self._protocol.connection_lost(exc if isinstance(exc, Exception) or exc is None else None)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.BufferedProtocol)
        self._protocol = protocol
