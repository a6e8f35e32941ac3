"""ATNA audit trail (ITI-20 Record Audit Event): what the gateway calls to audit.

``AuditTrail.record(message)`` formats a DICOM audit message (built with
:mod:`xca_gateway.audit.messages`) as an RFC 5424 syslog message, hands it to a writer thread
and returns at once. The writer appends it, fsync'd, to the durable spool
(:mod:`~xca_gateway.audit.spool`), one fsync per batch. Sender tasks
(:mod:`~xca_gateway.audit.sender`) deliver the spool to every configured audit record
repository over syslog-TLS (RFC 5425) or syslog-UDP (RFC 5426), each in order and from where it
left off, so that an unreachable repository, a restart or a crash loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from xca_gateway.audit.alerts import AlertAggregator, is_security_alert
from xca_gateway.audit.config import AuditConfig
from xca_gateway.audit.messages import (
    AuditContext,
    AuditMessage,
    AuditSource,
    Node,
    application_activity,
    requester_node,
    security_alert_node_authentication,
)
from xca_gateway.audit.sender import DestinationSender, destination_ssl_context
from xca_gateway.audit.spool import Spool
from xca_gateway.audit.syslog import format_message
from xca_gateway.metrics import GatewayMetrics
from xca_gateway.protocol.soap_service import SoapRequest
from xca_gateway.protocol.tls import HandshakeFailure

log = logging.getLogger(__name__)


# Records the writer takes from the queue per fsync (group commit).
_MAX_BATCH = 1024
# After waking for a record, the writer waits this long for more before it commits, unless the
# batch is already this big: at thousands of records a second one wake-up (and one fsync) per
# record cost more CPU in thread switches than the records themselves; an audit record waits
# at most a millisecond longer.
_LINGER_SECONDS = 0.001
_LINGER_BELOW = 256


class _RecordQueue:
    """A bounded hand-off from the loop to the writer thread that wakes the writer only when
    it sleeps (``queue.Queue`` signals a condition on every put)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[object] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._consumer_waiting = False
        self._producers_waiting = 0

    def put(self, item: object, timeout: float | None = None) -> None:
        """Append ``item``; when full, wait at most ``timeout`` (None: for good) for room,
        then raise ``queue.Full``."""
        with self._lock:
            if len(self._items) >= self.maxsize:
                deadline = None if timeout is None else time.monotonic() + timeout
                self._producers_waiting += 1
                try:
                    while len(self._items) >= self.maxsize:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise queue.Full
                        self._not_full.wait(left)
                finally:
                    self._producers_waiting -= 1
            self._items.append(item)
            if self._consumer_waiting:
                self._not_empty.notify()

    def get_batch(self, max_items: int) -> list[object]:
        """Wait for at least one item; take up to ``max_items``."""
        with self._lock:
            while not self._items:
                self._consumer_waiting = True
                try:
                    self._not_empty.wait()
                finally:
                    self._consumer_waiting = False
            return self._take(max_items)

    def get_more(self, max_items: int) -> list[object]:
        """Take up to ``max_items`` without waiting."""
        with self._lock:
            return self._take(max_items)

    def __len__(self) -> int:
        return len(self._items)

    def _take(self, max_items: int) -> list[object]:
        # Called with the lock held.
        items = self._items
        count = min(max_items, len(items))
        batch = [items.popleft() for _ in range(count)]
        if count and self._producers_waiting:
            self._not_full.notify_all()
        return batch


_ERROR_LOG_INTERVAL = 10.0


class _Barrier:
    """Queued behind records: set once everything before it is committed (or refused)."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class _AuditMetrics:
    """Prometheus series of the audit trail, in the gateway's registry."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        from prometheus_client import Counter, Gauge

        registry = metrics.registry
        self.spooled = Counter(
            "xca_gateway_audit_records_spooled",
            "Audit records committed (fsync'd) to the local spool",
            registry=registry,
        )
        self.sent = Counter(
            "xca_gateway_audit_records_sent",
            "Audit records written to an audit record repository, by destination",
            ["destination"],
            registry=registry,
        )
        self.dropped = Counter(
            "xca_gateway_audit_records_dropped",
            "Audit records that could not be kept, by reason",
            ["reason"],
            registry=registry,
        )
        self.pending = Gauge(
            "xca_gateway_audit_records_pending",
            "Spooled audit records a destination has not acknowledged yet",
            ["destination"],
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "xca_gateway_audit_spool_bytes", "Size of the audit spool on disk", registry=registry
        )
        self.spool_limit = Gauge(
            "xca_gateway_audit_spool_limit_bytes",
            "Size at which the audit spool refuses new records",
            registry=registry,
        )
        self.alarm = Gauge(
            "xca_gateway_audit_spool_alarm",
            "1 while the audit spool is above its warning threshold",
            registry=registry,
        )
        self.security_alerts = Counter(
            "xca_gateway_audit_security_alerts",
            "Security Alerts raised, by event type code (each one, aggregated or not)",
            ["type"],
            registry=registry,
        )
        self.security_alerts_aggregated = Counter(
            "xca_gateway_audit_security_alerts_aggregated",
            "Security Alerts folded into the count of a repeat record instead of a record of "
            "their own",
            registry=registry,
        )
        self.destination_up = Gauge(
            "xca_gateway_audit_destination_up",
            "1 while connected to the audit record repository",
            ["destination"],
            registry=registry,
        )


def soap_requester(request: SoapRequest) -> Node:
    """The remote requester of a SOAP transaction: address, certificate subject, wsa:ReplyTo."""
    peer = request.peer
    subject = peer.certificate.subject if peer.certificate is not None else None
    return requester_node(peer.address, request.envelope.addressing.reply_to, subject)


def _pending_of(spool: Spool, name: str) -> Callable[[], float]:
    return lambda: spool.pending(name)


class AuditTrail:
    """The gateway's audit trail: non-blocking ``record()``, durable spool, senders."""

    def __init__(self, config: AuditConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.context = AuditContext(
            audit_source=AuditSource(config.audit_source_id, config.enterprise_site_id),
            host=config.hostname,
            process_id=str(os.getpid()),
        )
        # The reporting application's UserID (Application Activity, Security Alert); the
        # gateway may set its base URL here.
        self.application_id = config.audit_source_id
        self._metrics = _AuditMetrics(metrics) if metrics is not None else None
        self._queue = _RecordQueue(config.queue_size)
        self._spool: Spool | None = None
        self._writer: threading.Thread | None = None
        self._senders: list[DestinationSender] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = config.enabled
        self._dropped: dict[str, int] = {}
        self._last_error_log: dict[str, float] = {}
        self._lock = threading.Lock()
        self.spooled = 0
        # Repeated Security Alerts (one source, one kind) within a window: one record + a count.
        self._alerts = AlertAggregator(config.alert_window) if config.alert_window > 0 else None
        self._alerts_lock = threading.Lock()
        self._alert_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def senders(self) -> tuple[DestinationSender, ...]:
        """One per destination while started (state, pending, sent: the operator page)."""
        return tuple(self._senders)

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError("audit trail not started")
        return self._spool

    async def start(self, *, application_activity_events: bool = True) -> None:
        """Open the spool (recovering it after a crash), start the writer and the senders."""
        if not self.config.enabled or self._spool is not None:
            return
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        # Certificates are loaded first: a broken TLS setup fails start() before anything opens.
        contexts = {
            d.name: destination_ssl_context(d) for d in cfg.destinations if d.transport == "tls"
        }
        self._spool = await asyncio.to_thread(
            Spool,
            cfg.spool_dir,
            [d.name for d in cfg.destinations],
            max_bytes=cfg.max_spool_bytes,
            warn_bytes=cfg.effective_warn_bytes,
            segment_bytes=cfg.segment_bytes,
        )
        spool = self._spool
        for destination in cfg.destinations:
            self._senders.append(
                DestinationSender(
                    spool,
                    destination,
                    ssl_context=contexts.get(destination.name),
                    ack_delay=cfg.ack_delay,
                    ack_persist_interval=cfg.ack_persist_interval,
                    reconnect_min=cfg.reconnect_min,
                    reconnect_max=cfg.reconnect_max,
                    observer=self,
                )
            )
        if self._metrics is not None:
            m = self._metrics
            m.spool_bytes.set_function(lambda: spool.size_bytes)
            m.spool_limit.set(cfg.max_spool_bytes)
            m.alarm.set_function(lambda: 1.0 if spool.alarm else 0.0)
            for sender in self._senders:
                m.pending.labels(sender.name).set_function(_pending_of(spool, sender.name))
                m.destination_up.labels(sender.name).set(0)
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()
        for sender in self._senders:
            self._tasks.append(asyncio.create_task(sender.run(), name=f"audit-{sender.name}"))
        if self._alerts is not None:
            self._alert_task = asyncio.create_task(self._close_alert_windows(), name="audit-alerts")
        pending = sum(s.pending for s in self._senders)
        log.info(
            "audit trail started: spool %s (%d record(s) pending), destinations %s",
            cfg.spool_dir,
            pending,
            ", ".join(f"{d.name}={d.transport}://{d.host}:{d.port}" for d in cfg.destinations),
        )
        if application_activity_events:
            self.record(self.application_activity("start"))

    async def stop(
        self, *, application_activity_events: bool = True, drain_timeout: float | None = None
    ) -> None:
        """Record Application Stop, commit what is queued, give the senders ``drain_timeout``
        to deliver the backlog, then stop. What is left stays in the spool for next time."""
        if self._spool is None:
            return
        if self._alert_task is not None:
            self._alert_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alert_task
            self._alert_task = None
        self._record_now(self._flush_alerts())
        if application_activity_events:
            self.record(self.application_activity("stop"))
        self._accepting = False
        await self.flush()
        await asyncio.to_thread(self._queue.put, _STOP)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        # Repositories that are down now will get the backlog after the next start.
        with contextlib.suppress(TimeoutError):
            await self.wait_delivered(timeout, reachable_only=True)
        for sender in self._senders:
            sender.request_stop()
        if self._tasks:
            _done, not_done = await asyncio.wait(self._tasks, timeout=5.0)
            for task in not_done:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._spool.close)
        self._spool = None
        self._tasks.clear()
        self._senders.clear()

    # ------------------------------------------------------------------ recording

    def record(self, message: AuditMessage | Iterable[AuditMessage]) -> None:
        """Queue audit message(s) for the spool and return. Never raises; blocks at most
        ``queue_block_seconds`` if the writer is that far behind, then drops (counted)."""
        try:
            messages = [message] if isinstance(message, AuditMessage) else list(message)
            if self._alerts is not None or self._metrics is not None:
                messages = self._aggregate_alerts(messages)
            self._record_now(messages)
        except Exception:
            log.exception("audit record could not be queued")

    def _record_now(self, messages: list[AuditMessage]) -> None:
        try:
            if not messages:
                return
            if not self._accepting:
                if self.config.enabled:
                    self._drop("stopped", len(messages))
                return
            for index, item in enumerate(messages):
                # Serialised here, so that what waits for the writer is one bytes object
                # (which the garbage collector never walks) instead of a graph of data
                # classes: a backlog of 10,000 messages made every collection walk ~300,000
                # objects, a fifth of the trail's CPU at 20,000 records/s.
                try:
                    payload = self._format(item)
                except Exception:
                    log.exception("audit message could not be serialised")
                    self._drop("unserialisable", 1)
                    continue
                try:
                    self._queue.put(payload, timeout=self.config.queue_block_seconds)
                except queue.Full:
                    self._drop("queue_full", len(messages) - index)
                    return
        except Exception:
            log.exception("audit record could not be queued")

    def _aggregate_alerts(self, messages: list[AuditMessage]) -> list[AuditMessage]:
        """Security Alerts through the aggregator (counted each); other records unchanged."""
        out: list[AuditMessage] = []
        for message in messages:
            if not is_security_alert(message):
                out.append(message)
                continue
            if self._metrics is not None:
                kind = message.event.type_codes[0].code if message.event.type_codes else ""
                self._metrics.security_alerts.labels(kind).inc()
            if self._alerts is None:
                out.append(message)
                continue
            with self._alerts_lock:
                before = self._alerts.aggregated
                out.extend(self._alerts.offer(message, time.monotonic()))
                folded = self._alerts.aggregated - before
            if folded and self._metrics is not None:
                self._metrics.security_alerts_aggregated.inc(folded)
        return out

    async def _close_alert_windows(self) -> None:
        """Write the repeat record of each burst whose window has closed."""
        assert self._alerts is not None
        period = min(1.0, self._alerts.window / 4)
        while True:
            await asyncio.sleep(period)
            with self._alerts_lock:
                summaries = self._alerts.expire(time.monotonic())
            self._record_now(summaries)

    def _flush_alerts(self) -> list[AuditMessage]:
        if self._alerts is None:
            return []
        with self._alerts_lock:
            return self._alerts.flush()

    @property
    def aggregated_alerts(self) -> int:
        """Security Alerts folded into repeat records so far."""
        return self._alerts.aggregated if self._alerts is not None else 0

    def application_activity(self, event: str) -> AuditMessage:
        try:
            launcher: str | None = getpass.getuser()
        except Exception:
            launcher = None
        return application_activity(
            self.context,
            event="start" if event == "start" else "stop",
            application_id=self.application_id,
            launcher=launcher,
        )

    def local_node(self, endpoint_url: str) -> Node:
        """This gateway as a participant: ``endpoint_url`` of the transaction, our pid."""
        return self.context.local_node(endpoint_url)

    def on_handshake_failure(self, failure: HandshakeFailure) -> None:
        """Listener for ``Gateway.add_handshake_listener``: a Security Alert per refusal."""
        reason = failure.reason
        if failure.verify_message and failure.verify_message not in reason:
            reason = f"{reason} ({failure.verify_message})"
        self.record(
            security_alert_node_authentication(
                self.context,
                address=failure.address,
                port=failure.port,
                reason=reason,
                certificate_subject=failure.certificate_subject,
                reporter=self.context.local_node(self.application_id),
            )
        )

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything recorded so far is committed to the spool (or refused)."""
        if self._writer is None or not self._writer.is_alive():
            return
        barrier = _Barrier()
        await asyncio.to_thread(self._queue.put, barrier)
        await asyncio.to_thread(barrier.done.wait, timeout)

    async def wait_delivered(self, timeout: float, *, reachable_only: bool = False) -> None:
        """Wait until every destination has acknowledged everything recorded so far; with
        ``reachable_only``, not waiting for those whose last connection attempt failed."""
        async with asyncio.timeout(timeout):
            await self.flush(timeout)
            while any(s.pending and not (reachable_only and s.unreachable) for s in self._senders):
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        spool = self.spool
        stop = False
        while not stop:
            batch = self._queue.get_batch(_MAX_BATCH)
            if len(batch) < _LINGER_BELOW and not any(
                item is _STOP or isinstance(item, _Barrier) for item in batch
            ):
                time.sleep(_LINGER_SECONDS)
                batch += self._queue.get_more(_MAX_BATCH - len(batch))
            payloads: list[bytes] = []
            barriers: list[_Barrier] = []
            for item in batch:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Barrier):
                    barriers.append(item)
                elif isinstance(item, bytes):
                    payloads.append(item)
            if payloads:
                self._commit(spool, payloads)
            for barrier in barriers:
                barrier.done.set()

    def _format(self, message: AuditMessage) -> bytes:
        return format_message(
            message.to_xml(),
            outcome=message.outcome,
            timestamp=message.event.date_time,
            hostname=self.config.hostname,
            app_name=self.config.app_name,
            procid=self.context.process_id,
        )

    def _commit(self, spool: Spool, payloads: list[bytes]) -> None:
        accepted = 0
        reason = "spool_full"
        for attempt in range(3):
            try:
                accepted += spool.append(payloads[accepted:])
                break
            except Exception as exc:
                reason = "disk_error"
                log.error("audit spool write failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.1 * (attempt + 1))
        refused = len(payloads) - accepted
        if refused:
            self._drop(reason, refused)
        if accepted:
            with self._lock:
                self.spooled += accepted
            if self._metrics is not None:
                self._metrics.spooled.inc(accepted)
            self._notify_senders()

    def _notify_senders(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for sender in self._senders:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(sender.notify)

    # ------------------------------------------------------------------ accounting

    def _drop(self, reason: str, count: int) -> None:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + count
            now = time.monotonic()
            quiet = now - self._last_error_log.get(reason, -_ERROR_LOG_INTERVAL)
            if quiet >= _ERROR_LOG_INTERVAL:
                self._last_error_log[reason] = now
        if self._metrics is not None:
            self._metrics.dropped.labels(reason).inc(count)
        if quiet >= _ERROR_LOG_INTERVAL:
            log.error(
                "AUDIT RECORDS LOST: %d record(s) dropped (%s); %d dropped so far",
                count,
                reason,
                self._dropped[reason],
            )

    @property
    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    # SenderObserver
    def sent(self, destination: str, count: int) -> None:
        if self._metrics is not None:
            self._metrics.sent.labels(destination).inc(count)

    def connected(self, destination: str, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.destination_up.labels(destination).set(1 if up else 0)

    def dropped_records(self, reason: str, count: int) -> None:
        self._drop(reason, count)

    def stats(self) -> dict[str, Any]:
        return {
            "spooled": self.spooled,
            "dropped": self.dropped,
            "destinations": {
                s.name: {
                    "up": s.up,
                    "sent": s.sent,
                    "pending": s.pending,
                    "connections": s.connections,
                    "last_problem": s.last_problem,
                }
                for s in self._senders
            },
        }
