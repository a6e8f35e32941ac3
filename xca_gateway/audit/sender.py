"""Sending spooled audit records to audit record repositories (asyncio edge of the audit trail).

One task per destination reads the spool in order and writes the records to the repository:
RFC 5425 (syslog over mutual TLS, octet-counted frames) or RFC 5426 (one datagram per record).
While a repository is unreachable nothing is lost: the spool keeps the records and the task
reconnects with exponential backoff, then resumes after the last acknowledged record.

When is a record delivered? RFC 5425 has no application-level acknowledgement, and bytes that
``drain()`` handed to the kernel can still be lost if the repository closes the connection
before reading them. A record therefore counts as acknowledged only once it was written and
flushed AND the connection then stayed healthy (no EOF, no error from the repository) for
``ack_delay`` seconds; a repository that shuts down closes its connections, which we notice
well within that time, and everything not yet acknowledged is sent again on the next
connection. The same holds for UDP on a connected socket, where an ICMP "port unreachable"
marks the repository down.

Duplicates, the price of never losing a record: after a broken connection, or a crash between
sending and persisting the acknowledgement, the records written but not yet (durably)
acknowledged are sent again. That window is bounded by ``ack_delay`` plus
``ack_persist_interval`` worth of records, not by the outage length, so a repository coming
back gets no duplicate storm, just at most that window once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Protocol, cast

from xca_gateway.audit.config import AuditDestination
from xca_gateway.audit.spool import Record, Spool, SpoolReader
from xca_gateway.audit.syslog import frame
from xca_gateway.protocol.tls import client_context
from xca_gateway.settings import BCP195_CIPHERS

log = logging.getLogger(__name__)

# The largest UDP payload over IPv4; larger syslog messages cannot go over RFC 5426 at all.
MAX_UDP_PAYLOAD = 65507
UDP_BURST = 16
UDP_PAUSE = 0.001
READ_BATCH_RECORDS = 512
READ_BATCH_BYTES = 1024 * 1024


class SenderObserver(Protocol):
    def sent(self, destination: str, count: int) -> None: ...

    def connected(self, destination: str, up: bool) -> None: ...

    def dropped_records(self, reason: str, count: int) -> None: ...


def destination_ssl_context(destination: AuditDestination) -> ssl.SSLContext:
    """Our mutual-TLS client context (ITI-19 rules) for a syslog-TLS repository."""
    if destination.trust_store is None:
        raise ValueError(f"audit destination {destination.name}: no trust_store")
    return client_context(
        destination.trust_store,
        destination.certificate,
        destination.private_key,
        minimum_version=destination.minimum_version,
        ciphers=destination.ciphers or BCP195_CIPHERS,
        check_hostname=destination.check_hostname,
    )


class _Connection(Protocol):
    def alive(self) -> bool: ...

    @property
    def problem(self) -> str | None: ...

    def write(self, records: Sequence[Record]) -> int: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


class _TlsConnection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, write_timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._write_timeout = write_timeout
        self._healthy = True
        self._problem: str | None = None
        # Repositories never send on a syslog connection: reading only tells us when it closes.
        self._watch = asyncio.create_task(self._watch_peer())

    def alive(self) -> bool:
        return self._healthy

    @property
    def problem(self) -> str | None:
        return self._problem

    async def _watch_peer(self) -> None:
        try:
            while await self._reader.read(65536):
                pass
            self._problem = "repository closed the connection"
        except (OSError, ssl.SSLError, EOFError) as exc:
            self._problem = f"connection failed: {exc}"
        finally:
            self._healthy = False

    def write(self, records: Sequence[Record]) -> int:
        self._writer.write(b"".join(frame(r.payload) for r in records))
        return 0

    async def drain(self) -> None:
        async with asyncio.timeout(self._write_timeout):
            await self._writer.drain()

    async def close(self) -> None:
        self._watch.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._writer.wait_closed()
        with contextlib.suppress(BaseException):
            await self._watch


class _UdpConnection(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._queued: list[bytes] = []
        self._healthy = True
        self._problem: str | None = None

    def alive(self) -> bool:
        return self._healthy

    @property
    def problem(self) -> str | None:
        return self._problem

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket an ICMP port unreachable surfaces here.
        self._healthy = False
        self._problem = f"datagram refused: {exc}"

    def connection_lost(self, exc: Exception | None) -> None:
        self._healthy = False

    def write(self, records: Sequence[Record]) -> int:
        oversize = 0
        for record in records:
            if len(record.payload) > MAX_UDP_PAYLOAD:
                oversize += 1
                log.error(
                    "audit record %d (%d bytes) is too large for syslog over UDP; not sent",
                    record.seq,
                    len(record.payload),
                )
                continue
            self._queued.append(record.payload)
        return oversize

    async def drain(self) -> None:
        # Paced bursts: a receiver's socket buffer holds only so many datagrams, and UDP has
        # no flow control. The pauses also let ICMP errors arrive and mark the socket down.
        assert self._transport is not None
        while self._queued and self._healthy:
            burst, self._queued = self._queued[:UDP_BURST], self._queued[UDP_BURST:]
            for payload in burst:
                self._transport.sendto(payload)
            await asyncio.sleep(UDP_PAUSE)

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class DestinationSender:
    """Delivers the spool to one audit record repository, in order, until stopped."""

    def __init__(
        self,
        spool: Spool,
        destination: AuditDestination,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ack_delay: float = 0.5,
        ack_persist_interval: float = 0.5,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        observer: SenderObserver | None = None,
    ) -> None:
        self.spool = spool
        self.destination = destination
        self.name = destination.name
        if destination.transport == "tls" and ssl_context is None:
            ssl_context = destination_ssl_context(destination)
        self._ssl = ssl_context
        self.ack_delay = ack_delay
        self.ack_persist_interval = ack_persist_interval
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._observer = observer
        self._wake = asyncio.Event()
        self._stopping = False
        # (last seq of a write, loop time it was flushed), oldest first.
        self._in_flight: deque[tuple[int, float]] = deque()
        self._last_persist = 0.0
        self.up = False
        # True from a failed attempt until the next successful connection.
        self.unreachable = False
        self.connections = 0
        self.sent = 0
        self.last_problem: str | None = None

    def notify(self) -> None:
        """New records were committed to the spool."""
        self._wake.set()

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def stopping(self) -> bool:
        return self._stopping

    @property
    def pending(self) -> int:
        return self.spool.pending(self.name)

    async def run(self) -> None:
        reader = await asyncio.to_thread(self.spool.reader, self.name)
        delay = self.reconnect_min
        failures = 0
        while not self.stopping():
            connection: _Connection | None = None
            try:
                connection = await self._connect()
                self.connections += 1
                self.unreachable = False
                if failures:
                    log.info(
                        "audit repository %s reachable again; %d record(s) to send",
                        self.name,
                        self.pending,
                    )
                self._set_up(True)
                acked_before = self.spool.acknowledged(self.name)
                since = asyncio.get_running_loop().time()
                await self._pump(connection, reader)
                # Back off afresh only after a connection that worked: one that delivered, or
                # stayed up a while (a repository that accepts and then drops us, e.g. refusing
                # our certificate after the TLS 1.3 handshake, keeps the backoff growing).
                lasted = asyncio.get_running_loop().time() - since
                if self.spool.acknowledged(self.name) > acked_before or lasted > self.reconnect_max:
                    delay, failures = self.reconnect_min, 0
                if connection.problem is not None and not self.stopping():
                    raise ConnectionError(connection.problem)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Expected: OSError, ssl.SSLError, TimeoutError, ConnectionError. Anything else
                # is a bug, but must not end delivery: log it in full and retry like an outage.
                expected = isinstance(exc, OSError | ssl.SSLError | TimeoutError)
                if not expected:
                    log.exception("audit sender %s failed", self.name)
                failures += 1
                self.unreachable = True
                self.last_problem = str(exc) or type(exc).__name__
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "audit repository %s (%s:%d) unreachable: %s; %d record(s) wait in the spool",
                    self.name,
                    self.destination.host,
                    self.destination.port,
                    self.last_problem,
                    self.pending,
                )
            finally:
                self._set_up(False)
                if connection is not None:
                    await connection.close()
                # Whatever was not acknowledged goes again, in order, on the next connection.
                self._in_flight.clear()
                reader.seek(self.spool.acknowledged(self.name) + 1)
            if self.stopping():
                break
            await self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.reconnect_max)
        await asyncio.to_thread(self.spool.persist_acks)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            if self._observer is not None:
                self._observer.connected(self.name, up)

    async def _sleep(self, seconds: float) -> None:
        """Back off: only a stop request cuts this short, not new records."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.stopping():
                    self._wake.clear()
                    await self._wake.wait()

    async def _idle(self, seconds: float) -> None:
        """Wait for new records (or a stop request) at most ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _connect(self) -> _Connection:
        d = self.destination
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(d.connect_timeout * 2):
            if d.transport == "udp":
                _transport, protocol = await loop.create_datagram_endpoint(
                    _UdpConnection, remote_addr=(d.host, d.port)
                )
                return protocol
            reader, writer = await asyncio.open_connection(
                d.host,
                d.port,
                ssl=self._ssl,
                server_hostname=d.server_name or d.host,
                ssl_handshake_timeout=d.connect_timeout,
            )
        return _TlsConnection(reader, writer, d.write_timeout)

    async def _pump(self, connection: _Connection, reader: SpoolReader) -> None:
        loop = asyncio.get_running_loop()
        while connection.alive():
            if self.stopping():
                await self._finish(connection)
                return
            # Cleared before reading, so that a commit racing with the read still wakes us.
            self._wake.clear()
            records = await asyncio.to_thread(reader.read, READ_BATCH_RECORDS, READ_BATCH_BYTES)
            if records:
                oversize = connection.write(records)
                await connection.drain()
                if not connection.alive():
                    return
                self._in_flight.append((records[-1].seq, loop.time()))
                self.sent += len(records) - oversize
                if self._observer is not None:
                    self._observer.sent(self.name, len(records) - oversize)
                    if oversize:
                        self._observer.dropped_records("oversize", oversize)
            await self._settle(connection)
            if not records:
                await self._idle(self.ack_delay if self._in_flight else 1.0)

    async def _settle(self, connection: _Connection) -> None:
        """Acknowledge what has stayed delivered for ack_delay; persist acks now and then."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        acked = None
        while (
            self._in_flight and connection.alive() and now - self._in_flight[0][1] >= self.ack_delay
        ):
            acked = self._in_flight.popleft()[0]
        if acked is not None:
            self.spool.acknowledge(self.name, acked)
        if now - self._last_persist >= self.ack_persist_interval:
            self._last_persist = now
            await asyncio.to_thread(self.spool.persist_acks)

    async def _finish(self, connection: _Connection) -> None:
        """On stop: let the last writes settle (bounded by ack_delay) before closing."""
        if self._in_flight:
            await asyncio.sleep(self.ack_delay)
            if connection.alive():
                self.spool.acknowledge(self.name, self._in_flight[-1][0])
                self._in_flight.clear()
        await asyncio.to_thread(self.spool.persist_acks)
