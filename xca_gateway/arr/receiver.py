"""ITI-20 receiving side: syslog over mutual TLS (RFC 5425) and over UDP (RFC 5426).

The event loop only accepts, deframes and rate-limits; parsing and storing run on one ingest
thread in batches (one transaction per batch). Between the two sits a bounded queue:

* over TLS a full queue stops reading from the connections (TCP backpressure: the senders'
  spools hold the records, nothing is lost);
* over UDP there is no backpressure, so a datagram that finds the queue full is dropped and
  counted (``dropped{queue_full}``) - one more reason ATNA prefers TLS.

Hostile or broken input never stops the receiver: a frame that is not RFC 5425 is stored
flagged (the bytes seen, bounded) and that connection closed, since octet counting cannot
resynchronise; an oversize frame is skipped and counted without closing; a sender over its
rate is throttled (TLS) or dropped with a counter (UDP); a sender over its connection quota is
refused with a counter. Refused TLS handshakes are audited here as Security Alerts.

A sender that completed the handshake is still only admitted if ``admit`` (the repository's
syslog door) names it an audit source; each admitted connection (or UDP source address) carries
its grant - the authenticated sender stored with every record, and the AuditSourceIDs it may
report as, against which each record is checked after parsing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import logging
import multiprocessing
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, cast

from xca_gateway.arr.access import SenderGrant, sender_label
from xca_gateway.arr.parse import FLAG_FRAMING, FLAG_TRUNCATED, Transport, parse_record
from xca_gateway.arr.store import AuditStore, PreparedBatch, open_store, prepare_batch
from xca_gateway.protocol.tls import (
    HANDSHAKE_CAPTURE,
    HandshakeCapture,
    HandshakeFailure,
    certificate_info,
    describe_handshake_error,
)
from xca_gateway.security.callers import Identity, normalize_fingerprint

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
# How much of an unframeable stream is kept as the flagged record's raw bytes.
_MAX_GARBAGE = 64 * 1024
_BATCH = 2000


@dataclass(frozen=True)
class ReceiverLimits:
    # DICOM PS3.15 A.6 requires at least 32768 octets; real messages with many instance UIDs
    # are larger.
    max_message_bytes: int = 256 * 1024
    max_connections: int = 1024
    max_connections_per_sender: int = 64
    # Token bucket per sender address (messages per second and burst).
    sender_rate: float = 50000.0
    sender_burst: int = 100000
    handshake_timeout: float = 10.0
    # A syslog connection may stay quiet between events; close it after this long idle.
    idle_timeout: float = 3600.0
    # Once a frame has begun, the rest of it must arrive within this many seconds: a frame
    # trickled a byte at a time (slowloris) does not hold a connection for idle_timeout.
    frame_timeout: float = 30.0
    queue_size: int = 50000
    # Processes that parse received messages (0: parse in a thread of the main process).
    parse_workers: int = 2


class Counters:
    """Thread-safe named counters with an optional label, e.g. ``refused{oversize}``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: collections.Counter[str] = collections.Counter()

    def inc(self, name: str, label: str | None = None, amount: int = 1) -> None:
        key = f"{name}{{{label}}}" if label else name
        with self._lock:
            self._values[key] += amount

    def get(self, name: str, label: str | None = None) -> int:
        key = f"{name}{{{label}}}" if label else name
        with self._lock:
            return self._values.get(key, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._values.items()))

    def prometheus(self, prefix: str = "xca_arr") -> str:
        lines = []
        for key, value in self.snapshot().items():
            name, _, label = key.partition("{")
            metric = f"{prefix}_{name}_total"
            lines.append(
                f'{metric}{{reason="{label.rstrip("}")}"}} {value}'
                if label
                else f"{metric} {value}"
            )
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Frame:
    payload: bytes
    # None for a good frame; otherwise why it is not one (the payload is what was seen).
    problem: str | None = None
    # True when the connection cannot continue after this frame.
    fatal: bool = False
    oversize: int | None = None


class FrameReader:
    """Incremental RFC 5425 deframer that survives bad input.

    Octet-counted frames (``MSGLEN SP SYSLOG-MSG``) are the norm. A frame whose MSGLEN exceeds
    the limit is skipped (its bytes are read and discarded) and reported, so the connection
    goes on. A stream that starts with ``<`` is taken as RFC 6587 non-transparent framing
    (one message per LF), which older senders use. Anything else cannot be resynchronised.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        self._need: int | None = None
        self._skip = 0
        self._failed = False

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed:
            return []
        self._buffer += data
        frames: list[Frame] = []
        while self._buffer:
            if self._skip:
                n = min(self._skip, len(self._buffer))
                del self._buffer[:n]
                self._skip -= n
                continue
            if self._need is not None:
                if len(self._buffer) < self._need:
                    break
                frames.append(Frame(bytes(self._buffer[: self._need])))
                del self._buffer[: self._need]
                self._need = None
                continue
            first = self._buffer[0]
            if 0x31 <= first <= 0x39:  # "1".."9": MSGLEN
                space = self._buffer.find(b" ", 0, 11)
                if space < 0:
                    head = bytes(self._buffer[:11])
                    if len(self._buffer) >= 11 or not head.isdigit():
                        frames.append(self._fail("MSGLEN is not digits followed by a space"))
                    break
                digits = bytes(self._buffer[:space])
                if not digits.isdigit():
                    frames.append(self._fail("MSGLEN is not a decimal number"))
                    break
                length = int(digits)
                del self._buffer[: space + 1]
                if length > self.max_message:
                    self._skip = length
                    frames.append(
                        Frame(b"", f"frame of {length} octets exceeds the limit", oversize=length)
                    )
                else:
                    self._need = length
            elif first == 0x3C:  # "<": non-transparent framing (RFC 6587 3.4.2)
                end = self._buffer.find(b"\n")
                if end < 0:
                    if len(self._buffer) > self.max_message:
                        frames.append(
                            self._fail("LF-delimited message exceeds the limit", oversize=True)
                        )
                    break
                message = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[: end + 1]
                if message:
                    frames.append(Frame(message))
            elif first in (0x0A, 0x0D, 0x00):  # stray line ends between frames
                del self._buffer[:1]
            else:
                frames.append(self._fail("not an RFC 5425 frame (expected MSGLEN SP)"))
                break
        return frames

    def _fail(self, problem: str, *, oversize: bool = False) -> Frame:
        self._failed = True
        garbage = bytes(self._buffer[:_MAX_GARBAGE])
        self._buffer.clear()
        return Frame(garbage, problem, fatal=True, oversize=len(garbage) if oversize else None)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def remainder(self) -> bytes:
        """The bytes of an unfinished frame (bounded), e.g. when the sender hung up."""
        return bytes(self._buffer[:_MAX_GARBAGE])


# --------------------------------------------------------------------------- rate limiting


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: int = 1) -> bool:
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def consume(self, n: int) -> float:
        """Take ``n`` tokens, going into debt if need be; returns how long the caller should
        pause so that it stays within the rate."""
        self._refill()
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class SenderLimits:
    """Per-sender-address state: token buckets and open connection counts."""

    def __init__(self, limits: ReceiverLimits) -> None:
        self.limits = limits
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self.connections: collections.Counter[str] = collections.Counter()

    def bucket(self, sender: str) -> TokenBucket:
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = TokenBucket(self.limits.sender_rate, self.limits.sender_burst)
            self._buckets[sender] = bucket
            if len(self._buckets) > 10000:  # bounded memory under address spoofing (UDP)
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(sender)
        return bucket


# --------------------------------------------------------------------------- ingest


class _Item(NamedTuple):
    raw: bytes
    sender: str
    port: int | None
    transport: Transport
    received_at: datetime
    flags: tuple[str, ...] = ()
    # The authenticated sender and the AuditSourceIDs it may report as (None: any).
    sender_identity: str | None = None
    bound: frozenset[str] | None = None


@dataclass
class _Barrier:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()

# Admission of a syslog sender (the caller model's syslog door): its verified identity and
# transport in, the grant (who it is, what it may report as) out, or None: refused.
Admit = Callable[[Identity, Transport], SenderGrant | None]


def _admit_all(identity: Identity, transport: Transport) -> SenderGrant:
    return SenderGrant(sender_label(identity, transport))


def tls_identity(writer: asyncio.StreamWriter, address: str) -> Identity:
    """What the TLS handshake verified about a syslog sender."""
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return Identity(address=address)
    info = certificate_info(der)
    return Identity(
        address=address,
        certificate_subject=info.subject,
        certificate_fingerprint=normalize_fingerprint(info.fingerprint_sha256),
        san_dns=info.san_dns,
        san_uri=info.san_uri,
    )


ItemTuple = tuple[
    bytes,
    str,
    int | None,
    Transport,
    datetime,
    tuple[str, ...],
    str | None,
    frozenset[str] | None,
]


def parse_batch(items: Sequence[ItemTuple]) -> tuple[PreparedBatch, int]:
    """Parse raw messages into insertable rows; returns the rows and how many are flagged.
    A module-level function over plain tuples, so that worker processes can run it cheaply."""
    records = [
        parse_record(
            raw,
            sender=sender,
            sender_port=port,
            transport=transport,
            received_at=received_at,
            extra_flags=flags,
            sender_identity=identity,
            bound_source_ids=bound,
        )
        for raw, sender, port, transport, received_at, flags, identity, bound in items
    ]
    return prepare_batch(records), sum(1 for r in records if r.flags)


_WORKER_STORE: AuditStore | None = None
_WORKER_WRITE_LOCK: Any = None


def _worker_init(database: Path | None, postgresql: str | None, write_lock: Any) -> None:
    global _WORKER_STORE, _WORKER_WRITE_LOCK
    # Parsing allocates many short-lived objects and no cycles worth chasing: a rarer young
    # collection saves a good part of the CPU.
    gc.set_threshold(100_000, 50, 100)
    _WORKER_WRITE_LOCK = write_lock
    if database is not None or postgresql is not None:
        _WORKER_STORE = open_store(database, postgresql)


def parse_and_store(items: Sequence[ItemTuple]) -> tuple[int, int]:
    """Worker task: parse a batch and insert it through the worker's own connection."""
    prepared, flagged = parse_batch(items)
    if prepared.events:
        if _WORKER_STORE is None:
            raise RuntimeError("worker has no store")
        if _WORKER_WRITE_LOCK is not None:
            # SQLite has one writer at a time and its busy handler sleeps in growing steps;
            # taking turns on a lock of our own hands the database over at once.
            with _WORKER_WRITE_LOCK:
                _WORKER_STORE.add_prepared(prepared)
        else:
            _WORKER_STORE.add_prepared(prepared)
    return len(items), flagged


class Ingestor:
    """Parses and stores received messages in batches, one transaction per batch.

    With ``parse_workers`` > 0 (and ``worker_store`` naming the database) worker processes
    parse and insert the batches through connections of their own: parsing is CPU-bound Python
    and would otherwise compete for the GIL with the event loop. Without workers a dispatcher
    thread parses and a writer thread inserts. Either way the writer thread accounts for the
    batches in arrival order, so that :meth:`flush` means "everything before is stored"; a
    batch whose worker failed is parsed and stored here instead (never lost).
    """

    def __init__(
        self,
        store: AuditStore,
        counters: Counters,
        *,
        queue_size: int = 50000,
        parse_workers: int = 0,
        worker_store: tuple[Path | None, str | None] | None = None,
    ) -> None:
        self.store = store
        # Where worker processes open their own connection (SQLite file or PostgreSQL DSN);
        # without it, parsing stays in this process.
        self.worker_store = worker_store
        self.counters = counters
        self.queue_size = queue_size
        self.parse_workers = parse_workers
        self._queue: queue.Queue[object] = queue.Queue()
        # Batches in flight between the dispatcher and the writer, in order (bounded: the
        # dispatcher waits for the disk).
        self._pending: queue.Queue[object] = queue.Queue(maxsize=max(4, 2 * parse_workers))
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._space = asyncio.Event()
        self._threads: list[threading.Thread] = []
        self.stored = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()
        self._space.set()
        if self.parse_workers > 0 and self.worker_store is not None:
            # "spawn": the parent has threads, which fork would copy in an unknown state.
            context = multiprocessing.get_context("spawn")
            database, postgresql = self.worker_store
            # PostgreSQL takes concurrent inserts; SQLite writers take turns.
            lock = context.Lock() if postgresql is None else None
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.parse_workers,
                mp_context=context,
                initializer=_worker_init,
                initargs=(database, postgresql, lock),
            )
            # Start the workers now rather than on the first message.
            started = [self._pool.submit(parse_and_store, []) for _ in range(self.parse_workers)]
            for future in started:
                future.result(timeout=60)
        self._threads = [
            threading.Thread(target=self._dispatch_loop, name="arr-parse", daemon=True),
            threading.Thread(target=self._write_loop, name="arr-write", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        if not self._threads:
            return
        self._queue.put(_STOP)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads = []
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=False)
            self._pool = None

    @property
    def backlog(self) -> int:
        with self._inflight_lock:
            return self._inflight

    def offer(self, item: _Item) -> bool:
        """Queue without waiting (UDP); False when the queue is full."""
        with self._inflight_lock:
            if self._inflight >= self.queue_size:
                self._space.clear()
                return False
            self._inflight += 1
        self._queue.put(item)
        return True

    async def put_many(self, items: list[_Item]) -> None:
        """Queue what one read brought, waiting for room first (TLS: the connection is not
        read meanwhile, so TCP holds the sender back). One queue operation per read."""
        while True:
            with self._inflight_lock:
                # A read larger than the whole queue still goes in once the queue is empty.
                if self._inflight == 0 or self._inflight + len(items) <= self.queue_size:
                    self._inflight += len(items)
                    break
                self._space.clear()
            self.counters.inc("backpressure_waits")
            await self._space.wait()
        self._queue.put(items)

    def submit_record_bytes(
        self,
        raw: bytes,
        sender: str,
        transport: Transport,
        flags: tuple[str, ...] = (),
        sender_identity: str | None = None,
    ) -> None:
        """Queue a message produced locally (the repository's own audit events); never
        refused, whatever the backlog."""
        identity = sender_identity or ("local" if transport == "local" else None)
        item = _Item(raw, sender, None, transport, datetime.now(UTC), flags, identity)
        with self._inflight_lock:
            self._inflight += 1
        self._queue.put(item)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far is stored."""
        barrier = _Barrier()
        self._queue.put(barrier)
        await asyncio.to_thread(barrier.done.wait, timeout)

    def _released(self) -> None:
        with self._inflight_lock:
            has_room = self._inflight < self.queue_size
        if has_room:
            self._space.set()

    def _dispatch_loop(self) -> None:
        stop = False
        while not stop:
            batch: list[object] = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items: list[_Item] = []
            for b in batch:
                if isinstance(b, list):
                    items.extend(b)
                elif isinstance(b, _Item):
                    items.append(b)
            if items:
                work: object
                if self._pool is not None:
                    try:
                        tuples = [cast(ItemTuple, tuple(i)) for i in items]
                        work = self._pool.submit(parse_and_store, tuples)
                    except RuntimeError:  # pool broken or shut down: parse here
                        work = parse_batch(items)
                else:
                    work = parse_batch(items)
                self._pending.put((items, work))
            for b in batch:
                if isinstance(b, _Barrier):
                    self._pending.put(b)
                elif b is _STOP:
                    stop = True
        self._pending.put(_STOP)

    def _write_loop(self) -> None:
        while True:
            entry = self._pending.get()
            if entry is _STOP:
                return
            if isinstance(entry, _Barrier):
                entry.done.set()
                continue
            items, work = cast(tuple[list[_Item], Any], entry)
            count = len(items)
            if isinstance(work, concurrent.futures.Future):
                try:
                    _count, flagged = work.result()
                    self._stored(count, flagged)
                except Exception as exc:
                    # The worker died or could not write: do it here; a batch the worker may
                    # have committed before failing can then be stored twice, never lost.
                    log.error("parse worker failed (%s); storing in process", exc)
                    self.counters.inc("parse_worker_errors")
                    prepared, flagged = parse_batch(items)
                    self._store(prepared, count, flagged)
            else:
                prepared, flagged = cast(tuple[PreparedBatch, int], work)
                self._store(prepared, count, flagged)
            with self._inflight_lock:
                self._inflight -= count
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._released)

    def _store(self, prepared: PreparedBatch, count: int, flagged: int) -> None:
        delay = 0.1
        while True:
            try:
                self.store.add_prepared(prepared)
                break
            except Exception as exc:
                # Never drop: keep retrying (the queue fills, TLS senders are held back).
                self.counters.inc("store_errors")
                log.error("audit store write failed (%d records), retrying: %s", count, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._stored(count, flagged)

    def _stored(self, count: int, flagged: int) -> None:
        self.stored += count
        self.counters.inc("stored", amount=count)
        if flagged:
            self.counters.inc("stored_flagged", amount=flagged)


# --------------------------------------------------------------------------- TLS server


class SyslogTlsServer:
    """RFC 5425 listener: mutual TLS, octet-counted frames."""

    def __init__(
        self,
        ingestor: Ingestor,
        ssl_context: ssl.SSLContext,
        limits: ReceiverLimits,
        counters: Counters,
        senders: SenderLimits,
        on_handshake_failure: Callable[[HandshakeFailure], None] | None = None,
        admit: Admit = _admit_all,
    ) -> None:
        self.ingestor = ingestor
        self.admit = admit
        self.ssl_context = ssl_context
        self.limits = limits
        self.counters = counters
        self.senders = senders
        self.on_handshake_failure = on_handshake_failure
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.open_connections = 0

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        if sock is not None:
            self._server = await asyncio.start_server(self._on_connect, sock=sock, backlog=1024)
        else:
            self._server = await asyncio.start_server(
                self._on_connect, host, port, backlog=1024, reuse_address=True
            )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        address, port = writer.get_extra_info("peername")[:2]
        if self.open_connections >= self.limits.max_connections:
            self.counters.inc("connections_refused", "max_connections")
            writer.transport.abort()
            return
        if self.senders.connections[address] >= self.limits.max_connections_per_sender:
            self.counters.inc("connections_refused", "per_sender_limit")
            writer.transport.abort()
            return
        self._tasks.add(task)
        self.open_connections += 1
        self.senders.connections[address] += 1
        try:
            if await self._handshake(writer, address, port):
                # A trusted certificate is not enough: its principal must be an audit source.
                grant = self.admit(tls_identity(writer, address), "tls")
                if grant is None:
                    self.counters.inc("connections_refused", "not_an_audit_source")
                    return
                self.counters.inc("connections", "tls")
                await self._serve(reader, writer, address, port, grant)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("syslog-TLS connection from %s failed", address)
        finally:
            self.open_connections -= 1
            self.senders.connections[address] -= 1
            if self.senders.connections[address] <= 0:
                del self.senders.connections[address]
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def _handshake(self, writer: asyncio.StreamWriter, address: str, port: int) -> bool:
        capture = HandshakeCapture()
        HANDSHAKE_CAPTURE.set(capture)
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                await writer.start_tls(
                    self.ssl_context, ssl_handshake_timeout=self.limits.handshake_timeout + 5
                )
        except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
            reason, verify_message = describe_handshake_error(exc)
            failure = HandshakeFailure(
                address, port, reason, verify_message, capture.certificate_der
            )
            self.counters.inc("handshake_failures")
            log.warning("syslog-TLS handshake from %s:%s refused: %s", address, port, reason)
            if self.on_handshake_failure is not None:
                try:
                    self.on_handshake_failure(failure)
                except Exception:
                    log.exception("handshake failure callback failed")
            return False
        return True

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        port: int,
        grant: SenderGrant,
    ) -> None:
        frames = FrameReader(self.limits.max_message_bytes)
        who, bound = grant.sender, grant.audit_source_ids

        def item(payload: bytes, now: datetime, flags: tuple[str, ...] = ()) -> _Item:
            return _Item(payload, address, port, "tls", now, flags, who, bound)

        bucket = self.senders.bucket(address)
        loop = asyncio.get_running_loop()
        frame_deadline: float | None = None
        while True:
            wait = (
                self.limits.idle_timeout
                if frame_deadline is None
                else max(0.0, frame_deadline - loop.time())
            )
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), wait)
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
                # Abrupt end (no TLS close_notify, reset, idle, a frame too slow): like EOF.
                data = b""
            if not data:
                if frames.pending:
                    # The sender closed mid-frame: keep what arrived, flagged.
                    await self.ingestor.put_many(
                        [
                            item(
                                frames.remainder(),
                                datetime.now(UTC),
                                (FLAG_TRUNCATED, FLAG_FRAMING),
                            )
                        ]
                    )
                    self.counters.inc("frames_invalid", "truncated")
                return
            received = frames.feed(data)
            # The deadline runs from the start of the frame still incomplete, if any.
            if not frames.pending:
                frame_deadline = None
            elif received or frame_deadline is None:
                frame_deadline = loop.time() + self.limits.frame_timeout
            good = sum(1 for f in received if f.problem is None)
            pause = bucket.consume(good) if good else 0.0
            if pause > 0:
                # Over its rate: stop reading for a while (TCP pushes back on the sender).
                self.counters.inc("throttled", "rate")
                await asyncio.sleep(min(pause, 5.0))
            if not received:
                continue
            self.counters.inc("received", "tls", len(received))
            now = datetime.now(UTC)
            items: list[_Item] = []
            close = False
            for frame in received:
                if frame.oversize is not None:
                    self.counters.inc("refused", "oversize")
                    log.warning(
                        "syslog-TLS from %s: %s, skipped", address, frame.problem or "oversize"
                    )
                    close = close or frame.fatal
                elif frame.problem is not None:
                    self.counters.inc("frames_invalid", "framing")
                    log.warning("syslog-TLS from %s: %s; connection closed", address, frame.problem)
                    items.append(item(frame.payload, now, (FLAG_FRAMING,)))
                    close = True
                else:
                    items.append(item(frame.payload, now))
            if items:
                await self.ingestor.put_many(items)
            if close:
                return


# --------------------------------------------------------------------------- UDP server


class SyslogUdpServer(asyncio.DatagramProtocol):
    """RFC 5426 listener: one syslog message per datagram."""

    def __init__(
        self,
        ingestor: Ingestor,
        limits: ReceiverLimits,
        counters: Counters,
        senders: SenderLimits,
        admit: Admit = _admit_all,
    ) -> None:
        self.ingestor = ingestor
        self.limits = limits
        self.counters = counters
        self.senders = senders
        self.admit = admit
        # One decision per source address (the access list does not change while running):
        # a flood of datagrams costs one lookup, and one refusal audit, per address.
        self._grants: collections.OrderedDict[str, SenderGrant | None] = collections.OrderedDict()
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        # A large receive buffer absorbs bursts while the loop is busy.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._transport = transport

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        address, port = str(addr[0]), int(addr[1])
        self.counters.inc("received", "udp")
        grant = self._grant(address)
        if grant is None:
            # Not a listed address: UDP proves nothing else about a sender.
            self.counters.inc("refused", "sender")
            return
        if len(data) > self.limits.max_message_bytes:
            self.counters.inc("refused", "oversize")
            return
        if not self.senders.bucket(address).take():
            self.counters.inc("refused", "rate")
            return
        payload = data.rstrip(b"\n\x00") or data
        item = _Item(
            payload,
            address,
            port,
            "udp",
            datetime.now(UTC),
            (),
            grant.sender,
            grant.audit_source_ids,
        )
        if not self.ingestor.offer(item):
            self.counters.inc("dropped", "queue_full")

    def _grant(self, address: str) -> SenderGrant | None:
        if address in self._grants:
            self._grants.move_to_end(address)
            return self._grants[address]
        grant = self.admit(Identity(address=address), "udp")
        self._grants[address] = grant
        if len(self._grants) > 10000:  # bounded memory under address spoofing
            self._grants.popitem(last=False)
        return grant

    def error_received(self, exc: Exception) -> None:
        self.counters.inc("udp_errors")
