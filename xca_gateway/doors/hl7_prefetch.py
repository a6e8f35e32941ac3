"""HL7 v2 auto-prefetch: an order for a patient pulls their priors from other communities.

An order placer or RIS sends ORM^O01 (or OMI^O23, IHE SWF.b) over MLLP; the gateway answers
with an original-mode ACK at once and schedules an import of the patient's foreign priors into
the local PACS (:mod:`xca_gateway.doors.import_priors`, in-process through this gateway's initiating
side), so that they are there when the radiologist reads the new study.

* The ACK never waits for the import: AA when the order is accepted (a job queued, or one for
  the same patient already queued or run within ``dedupe_seconds``, or an order control that
  does not call for priors), AE with an ERR segment when the content is wrong (no PID, no
  usable local patient id, no ORC), AR when the message cannot be processed at all
  (unparseable, unsupported message type, event or version, queue full: the sender retries).
  MSA-2 echoes MSH-10 of the order.
* The patient is PID-3's repetition whose assigning authority is the local one (universal id =
  our OID, or a namespace listed in ``local_namespaces``; an unqualified id counts as local
  when ``accept_unqualified_ids``). PID-5/7/8 become the local demographics written into the
  imported instances (IRWF: the local record wins), when ``reconcile_demographics``.
* Relevant priors: every foreign study of the patient by default; with ``match_modality`` only
  those of the ordered modality (IPC-5, OBR-24 or a DICOM modality code in OBR-4); with
  ``lookback_days`` only recent ones.
* Jobs are bounded: a queue of ``max_queue`` with ``workers`` workers.
* Who may send orders: the door guard admits a connection once, before any HL7 is read, as
  :attr:`~xca_gateway.security.callers.Door.MLLP` (role ``interface-engine``), identified by its
  client certificate (MLLP over TLS) or, on plain loopback MLLP, by its address
  (``addresses`` of a ``[[policy.callers]]`` entry). A caller the policy does not know at all is
  closed before a byte is read: it learns nothing about the HL7 layer. A known system without
  the role (say a PACS or a consumer) gets one AR ACK naming the refusal (ERR-3 207, so its
  interface engine's operators see why, instead of retrying a dropped connection forever), and
  the connection is closed. Either way the guard audits the refusal once per connection (a
  Security Alert naming the verified identity). The admitted principal is the current caller of
  the jobs its orders queue: the import acts, and is audited, for it.

MLLP uses the ``hl7`` package's asyncio server (``hl7.mllp.start_hl7_server``) and its raw
``readblock()`` / ``writeblock()``: the message is parsed with ``hl7.parse`` after the
header was read by hand (:mod:`xca_gateway.doors.hl7v2`, sans I/O), so that even a message hl7
cannot parse gets a correct ACK.

Configuration (``[prefetch]``)::

    [prefetch]
    host = "127.0.0.1"            # MLLP listener
    port = 2575                   # 0: any free port (see /readyz "ports")
    tls = true                    # MLLP over mutual TLS ([tls]); false only on loopback
    pacs_host = "127.0.0.1"       # the local PACS (C-STORE SCP)
    pacs_port = 4242
    pacs_ae_title = "ORTHANC"
    calling_ae_title = "XCA-PREFETCH"
    lookback_days = 3650          # absent: no limit
    match_modality = false
    max_queue = 100
    workers = 1
    dedupe_seconds = 300
    local_namespaces = ["NORTH"]  # PID-3 namespace ids that mean the local domain
    [prefetch.accession_prefixes] # default: the peer's name upper-cased plus "-"
    "urn:oid:1.3.6.1.4.1.21367.13.70.2" = "SOUTH-"
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from xca_gateway.audit.messages import Node
from xca_gateway.doors.hl7v2 import (
    APPLICATION_INTERNAL_ERROR,
    UNKNOWN_KEY_IDENTIFIER,
    AckError,
    Header,
    OrderMessage,
    build_ack,
    decode_message,
    local_patient_id,
    parse_order,
    read_header,
)
from xca_gateway.doors.import_priors import (
    Demographics,
    ImportReport,
    InProcessFederation,
    PacsStore,
    PriorSelection,
    StudyImport,
    import_audit_messages,
    import_priors,
)
from xca_gateway.doors.ports import DoorHost
from xca_gateway.protocol.http_server import ConnectionGate, ConnectionLimits, PeerInfo, tls_accept
from xca_gateway.protocol.tls import server_context
from xca_gateway.schema import (
    AeTitle,
    Matches,
    NonEmpty,
    NonNegativeSeconds,
    PeerPort,
    Port,
    Range,
    Seconds,
    Section,
)
from xca_gateway.security.callers import (
    Door,
    Principal,
    reset_current_caller,
    set_current_caller,
)
from xca_gateway.security.guard import identity_from_peer
from xca_gateway.settings import ConfigError, is_loopback_host
from xca_gateway.xds.kos import InstanceRef

log = logging.getLogger(__name__)

# How long a refused (known, but not an interface engine) sender has to send the message its
# AR answers.
_REFUSAL_READ_TIMEOUT = 30.0

__all__ = [
    "PrefetchConfig",
    "Prefetcher",
    "parse_prefetch_config",
]

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PrefetchConfig:
    pacs_port: int
    pacs_ae_title: str
    pacs_host: str = "127.0.0.1"
    host: str = "127.0.0.1"
    port: int = 2575
    # MLLP over mutual TLS with the gateway's [tls] certificate (ITI-19); plain MLLP only on
    # a loopback address (e.g. behind an interface engine or TLS proxy on the same host).
    tls: bool = True
    calling_ae_title: str = "XCA-PREFETCH"
    # DIMSE timeouts (association, response) towards the PACS.
    pacs_timeout: float = 30.0
    accession_prefixes: Mapping[str, str] = field(default_factory=dict)
    lookback_days: int | None = None
    match_modality: bool = False
    max_queue: int = 100
    workers: int = 1
    dedupe_seconds: float = 300.0
    local_namespaces: tuple[str, ...] = ()
    accept_unqualified_ids: bool = True
    reconcile_demographics: bool = True
    order_controls: tuple[str, ...] = ("NW", "XO")
    max_message_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    max_connections: int = 16
    # Connections from one address at once (counted at accept, before TLS), so one host cannot
    # take every MLLP slot; and the seconds a connection has to send its first message (then
    # idle_timeout between messages): a connection that never frames one is not held for long.
    max_connections_per_source: int = 4
    first_message_timeout: float = 30.0
    job_timeout: float = 3600.0
    # MSH-3 / MSH-4 of our ACKs (facility default: the community's name).
    application: str = "XCA-GATEWAY"
    facility: str | None = None


class PrefetchSection(Section):
    """HL7 v2 ORM^O01 / OMI^O23 over MLLP: fetch the patient's foreign priors into the local
    PACS (reconciled: local patient id, prefixed accession number) ahead of the exam. Only
    callers with the interface-engine role in [policy] may send orders: by certificate over
    TLS, or (plain MLLP on loopback) by address."""

    host: NonEmpty = Field("127.0.0.1", description="Address of the MLLP listener.")
    port: Port = Field(2575, description="Its port (0: any free port).")
    tls: bool = Field(True, description="MLLP over mutual TLS; false only on loopback.")
    pacs_host: NonEmpty = Field("127.0.0.1", description="The local PACS.")
    pacs_port: PeerPort = Field(description="Its DICOM port.", examples=[4242])
    pacs_ae_title: AeTitle = Field(description="Its AE title.", examples=["ORTHANC"])
    calling_ae_title: AeTitle = Field("XCA-PREFETCH", description="Our AE title towards it.")
    pacs_timeout: Seconds = Field(30.0, description="DIMSE timeouts towards the PACS.")
    accession_prefixes: dict[
        str, Annotated[str, Matches(r"[^\\]{0,15}", "a prefix (< 16 characters)")]
    ] = Field(
        {},
        description=(
            "Accession number prefix per community (homeCommunityId = prefix, < 16 characters)."
        ),
        examples=[{"urn:oid:1.3.6.1.4.1.21367.13.70.2": "SOUTH-"}],
    )
    lookback_days: Annotated[int, Range(0, 100_000)] | None = Field(
        None, description="Only priors of the last so many days (default: all).", examples=[1825]
    )
    match_modality: bool = Field(False, description="Only priors of the ordered modality.")
    max_queue: Annotated[int, Range(1, 1_000_000)] = Field(100, description="Jobs waiting.")
    workers: Annotated[int, Range(1, 64)] = Field(1, description="Jobs at once.")
    dedupe_seconds: NonNegativeSeconds = Field(
        300.0, description="A repeated order within this many seconds is one job."
    )
    local_namespaces: list[NonEmpty] = Field(
        [], description="Assigning authorities of our own patient ids in orders."
    )
    accept_unqualified_ids: bool = Field(
        True, description="Take a PID-3 without assigning authority as ours."
    )
    reconcile_demographics: bool = Field(
        True, description="Write the local patient's demographics into fetched instances."
    )
    order_controls: list[NonEmpty] = Field(
        ["NW", "XO"], description="ORC-1 order controls that start a prefetch."
    )
    max_message_bytes: Annotated[int, Range(1024, 1 << 30)] = Field(
        1024 * 1024, description="Largest HL7 message."
    )
    idle_timeout: Seconds = Field(300.0, description="Seconds between two messages.")
    max_connections: Annotated[int, Range(1, 10_000)] = Field(
        16, description="MLLP connections at once."
    )
    max_connections_per_source: Annotated[int, Range(1, 10_000)] = Field(
        4, description="...from one address, counted at accept, before TLS."
    )
    first_message_timeout: Seconds = Field(
        30.0, description="Seconds a new connection has to send its first message."
    )
    job_timeout: Seconds = Field(3600.0, description="Seconds one prefetch job may take.")
    application: NonEmpty = Field("XCA-GATEWAY", description="MSH-3 of our ACKs.")
    facility: NonEmpty | None = Field(
        None, description="MSH-4 of our ACKs (default: the community's name).", examples=["NORTH"]
    )


def _ae(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value:
        raise ConfigError(f"{where} must be an AE title of 1-16 characters")
    if not value.isascii():
        raise ConfigError(f"{where} must be ASCII")
    return value.strip()


def _int(value: Any, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer from {low} to {high}")
    return value


def _number(value: Any, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where} must be a non-negative number")
    if positive and value == 0:
        raise ConfigError(f"{where} must be positive")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def parse_prefetch_config(table: dict[str, Any], base_dir: Path | None = None) -> PrefetchConfig:
    """Validate ``[prefetch]`` (``base_dir`` is unused: no paths in it)."""
    known = set(PrefetchConfig.__dataclass_fields__)
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[prefetch]: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("pacs_port", "pacs_ae_title"):
        if key not in table:
            raise ConfigError(f"[prefetch] {key} is required")
    prefixes = table.get("accession_prefixes", {})
    if not isinstance(prefixes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) < 16 and "\\" not in v
        for k, v in prefixes.items()
    ):
        raise ConfigError(
            "[prefetch.accession_prefixes] maps homeCommunityIds to prefixes (< 16 characters)"
        )
    lookback = table.get("lookback_days")
    host = _text(table.get("host", "127.0.0.1"), "prefetch.host")
    tls = _bool(table.get("tls", True), "prefetch.tls")
    if not tls and not is_loopback_host(host):
        raise ConfigError(
            f"prefetch.tls = false is only allowed on a loopback host, not {host!r}: "
            "orders carry patient identity (ITI-19: mutual TLS)"
        )
    return PrefetchConfig(
        host=host,
        tls=tls,
        port=_int(table.get("port", 2575), "prefetch.port", 0, 65535),
        pacs_host=_text(table.get("pacs_host", "127.0.0.1"), "prefetch.pacs_host"),
        pacs_port=_int(table["pacs_port"], "prefetch.pacs_port", 1, 65535),
        pacs_ae_title=_ae(table["pacs_ae_title"], "prefetch.pacs_ae_title"),
        calling_ae_title=_ae(
            table.get("calling_ae_title", "XCA-PREFETCH"), "prefetch.calling_ae_title"
        ),
        pacs_timeout=_number(
            table.get("pacs_timeout", 30.0), "prefetch.pacs_timeout", positive=True
        ),
        accession_prefixes=dict(prefixes),
        lookback_days=None
        if lookback is None
        else _int(lookback, "prefetch.lookback_days", 0, 100_000),
        match_modality=_bool(table.get("match_modality", False), "prefetch.match_modality"),
        max_queue=_int(table.get("max_queue", 100), "prefetch.max_queue", 1, 1_000_000),
        workers=_int(table.get("workers", 1), "prefetch.workers", 1, 64),
        dedupe_seconds=_number(
            table.get("dedupe_seconds", 300.0), "prefetch.dedupe_seconds", positive=False
        ),
        local_namespaces=_strings(table.get("local_namespaces", []), "prefetch.local_namespaces"),
        accept_unqualified_ids=_bool(
            table.get("accept_unqualified_ids", True), "prefetch.accept_unqualified_ids"
        ),
        reconcile_demographics=_bool(
            table.get("reconcile_demographics", True), "prefetch.reconcile_demographics"
        ),
        order_controls=tuple(
            c.upper()
            for c in _strings(table.get("order_controls", ["NW", "XO"]), "prefetch.order_controls")
        ),
        max_message_bytes=_int(
            table.get("max_message_bytes", 1024 * 1024), "prefetch.max_message_bytes", 1024, 1 << 30
        ),
        idle_timeout=_number(
            table.get("idle_timeout", 300.0), "prefetch.idle_timeout", positive=True
        ),
        max_connections=_int(
            table.get("max_connections", 16), "prefetch.max_connections", 1, 10_000
        ),
        max_connections_per_source=_int(
            table.get("max_connections_per_source", 4),
            "prefetch.max_connections_per_source",
            1,
            10_000,
        ),
        first_message_timeout=_number(
            table.get("first_message_timeout", 30.0),
            "prefetch.first_message_timeout",
            positive=True,
        ),
        job_timeout=_number(
            table.get("job_timeout", 3600.0), "prefetch.job_timeout", positive=True
        ),
        application=_text(table.get("application", "XCA-GATEWAY"), "prefetch.application"),
        facility=None
        if table.get("facility") is None
        else _text(table.get("facility"), "prefetch.facility"),
    )


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class PrefetchJob:
    patient_id: str  # local CX
    control_id: str
    demographics_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    modalities: tuple[str, ...] = ()
    # The interface engine whose order queued the job: the import runs as its caller.
    requested_by: Principal | None = field(default=None, compare=False)


@dataclass
class JobResult:
    job: PrefetchJob
    report: ImportReport | None = None
    error: str | None = None
    finished: float = field(default_factory=time.time)

    @property
    def nothing_to_import(self) -> bool:
        return self.error is None and self.report is not None and self.report.nothing_to_import

    @property
    def ok(self) -> bool:
        return self.error is None and self.report is not None and self.report.ok


class _PrefetchMetrics:
    def __init__(self, registry: Any, queue_length: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.messages = Counter(
            "xca_gateway_prefetch_messages",
            "HL7 order messages received, by ACK code",
            ["ack"],
            registry=registry,
        )
        self.jobs = Counter(
            "xca_gateway_prefetch_jobs",
            "Prefetch jobs by outcome (queued, duplicate, queue_full, imported, "
            "nothing_to_import, failed)",
            ["outcome"],
            registry=registry,
        )
        self.instances = Counter(
            "xca_gateway_prefetch_instances",
            "Prior instances stored in the local PACS by prefetch, by outcome",
            ["outcome"],
            registry=registry,
        )
        gauge = Gauge(
            "xca_gateway_prefetch_queue_length", "Prefetch jobs waiting", registry=registry
        )
        gauge.set_function(queue_length)


class Prefetcher:
    """The MLLP listener, the job queue and its workers, for one gateway."""

    def __init__(self, gateway: DoorHost, config: PrefetchConfig) -> None:
        self.gateway = gateway
        self.config = config
        community = gateway.config.community
        self.local_authority = community.patient_id_assigning_authority
        self.home_community_id = community.home_community_id
        self.facility = config.facility or community.name
        self.community_names = {p.home_community_id: p.name for p in gateway.config.peers}
        self.recent: collections.deque[JobResult] = collections.deque(maxlen=100)
        self._queue: asyncio.Queue[PrefetchJob] = asyncio.Queue(config.max_queue)
        self._scheduled: dict[str, float] = {}  # patient -> when last queued (monotonic)
        self._pending: set[str] = set()  # patients queued or running
        self._server: asyncio.Server | None = None
        self._ssl = server_context(gateway.config.tls) if config.tls else None
        self._workers: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self.metrics = _PrefetchMetrics(gateway.metrics.registry, self._queue.qsize)
        # Admission at accept (global and per-source caps), and a bounded pool of connections
        # before the end of their handshake in which a newcomer displaces the oldest.
        self.gate = ConnectionGate(
            ConnectionLimits(
                max_connections=config.max_connections,
                max_connections_per_source=config.max_connections_per_source,
                max_pending_handshakes=config.max_connections,
            ),
            name="mllp",
            on_refused=gateway.connection_refused,
        )

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.config.port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        from hl7.mllp import start_hl7_server

        self._server = await start_hl7_server(
            self._on_connection,
            self.config.host,
            self.config.port,
            limit=self.config.max_message_bytes,
        )
        self._workers = [
            asyncio.create_task(self._worker(), name=f"prefetch-worker-{i}")
            for i in range(self.config.workers)
        ]
        log.info("HL7 prefetch listening (MLLP) on %s:%d", self.config.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [*self._connections, *self._workers]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        self._workers.clear()

    # -- MLLP

    async def _on_connection(self, reader: Any, writer: Any) -> None:
        from hl7.mllp import InvalidBlockError

        task = asyncio.current_task()
        assert task is not None
        address = str(writer.get_extra_info("peername")[0])
        if self.gate.admit(address) is not None:
            writer.transport.abort()  # over a cap: refused before any TLS or HL7
            return
        self._connections.add(task)
        try:
            if self._ssl is not None:
                peer = await self._handshake(writer, task)
                if peer is None:
                    return
            else:
                address, port = writer.get_extra_info("peername")[:2]
                peer = PeerInfo(address=address, port=port)
            principal = await self._admit(peer, reader, writer)
            if principal is None:
                return
            # The first message must come soon; then the connection may idle between orders.
            wait = min(self.config.first_message_timeout, self.config.idle_timeout)
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), wait)
                    wait = self.config.idle_timeout
                except InvalidBlockError:
                    # Bytes before the start block: the block is lost, the framing is intact.
                    self._send(writer, self._refusal("data outside an MLLP start block"))
                    continue
                except ValueError:
                    # Larger than max_message_bytes: where the next message starts is unknown.
                    self._send(writer, self._refusal("message larger than the limit"))
                    break
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                self._send(writer, self.handle_message(block, principal))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.gate.settled(task)
            self.gate.release(address)
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _handshake(self, writer: Any, task: asyncio.Task[Any]) -> PeerInfo | None:
        """Our own handshake, so a refused one reaches the gateway's audit trail; within
        [server] hello_timeout (orders come from a few known systems on the LAN), and in the
        bounded pool of pending handshakes."""
        assert self._ssl is not None
        displaced = False

        def drop() -> None:
            nonlocal displaced
            displaced = True
            task.cancel()

        self.gate.pending(task, drop)
        try:
            return await tls_accept(
                writer,
                self._ssl,
                timeout=min(
                    self.gateway.config.tls.handshake_timeout,
                    self.gateway.config.server.hello_timeout,
                ),
                on_failure=self.gateway.on_handshake_failure,
            )
        except asyncio.CancelledError:
            if not displaced:
                raise
            task.uncancel()
            writer.transport.abort()
            return None
        finally:
            self.gate.settled(task)

    async def _admit(self, peer: PeerInfo, reader: Any, writer: Any) -> Principal | None:
        """The door guard, once per connection and before any HL7 is read (see the module
        docstring); None: refused (audited once by the guard), the caller closes."""
        decision = self.gateway.guard.admit(
            identity_from_peer(peer),
            Door.MLLP,
            resource=f"mllp://{self.config.host}:{self.port}",
        )
        if decision.allowed:
            return decision.principal
        if decision.principal is None:
            return None  # unknown caller: closed before reading
        # A known system without the role: one AR to its first message, then close.
        try:
            block = await asyncio.wait_for(
                reader.readblock(), min(self.config.idle_timeout, _REFUSAL_READ_TIMEOUT)
            )
        except Exception:  # anything unreadable: nothing to answer, just close
            return None
        text, encoding = decode_message(block)
        header: Header | None = None
        with contextlib.suppress(AckError):
            header = read_header(text)
        self.metrics.messages.labels("AR").inc()
        error = AckError(
            "AR",
            APPLICATION_INTERNAL_ERROR,
            f"{decision.principal.name} is not authorized to send orders to this gateway",
        )
        with contextlib.suppress(ConnectionError):
            self._send(writer, self._ack(header, "AR", error).encode(encoding, errors="replace"))
            await writer.drain()
        return None

    def _send(self, writer: Any, payload: bytes) -> None:
        writer.writeblock(payload)

    def _refusal(self, text: str) -> bytes:
        self.metrics.messages.labels("AR").inc()
        error = AckError("AR", APPLICATION_INTERNAL_ERROR, text)
        return self._ack(None, "AR", error).encode("ascii")

    def _ack(self, header: Header | None, code: str, error: AckError | None = None) -> str:
        return build_ack(
            header,
            code,
            now=datetime.now(UTC),
            control_id=uuid.uuid4().hex[:20],
            application=self.config.application,
            facility=self.facility,
            error=error,
        )

    def handle_message(self, raw: bytes, principal: Principal | None = None) -> bytes:
        """ACK for one MLLP block from the admitted ``principal``; schedules the prefetch job.
        Never blocks, never raises."""
        text, encoding = decode_message(raw)
        header: Header | None = None
        try:
            with contextlib.suppress(AckError):
                header = read_header(text)
            order = parse_order(text)
            header = order.header
            code = self._accept(order, principal)
            ack = self._ack(header, code)
        except AckError as exc:
            log.info("HL7 message refused (%s %s): %s", exc.ack_code, exc.condition[0], exc.text)
            code, ack = exc.ack_code, self._ack(header, exc.ack_code, exc)
        except Exception as exc:  # a bug must still answer the sender
            log.exception("HL7 message handling failed")
            code = "AE"
            ack = self._ack(
                header, code, AckError("AE", APPLICATION_INTERNAL_ERROR, type(exc).__name__)
            )
        self.metrics.messages.labels(code).inc()
        return ack.encode(encoding, errors="replace")

    def _accept(self, order: OrderMessage, principal: Principal | None) -> str:
        cfg = self.config
        patient = local_patient_id(
            order,
            self.local_authority,
            local_namespaces=cfg.local_namespaces,
            accept_unqualified=cfg.accept_unqualified_ids,
        )
        if patient is None:
            raise AckError(
                "AE",
                UNKNOWN_KEY_IDENTIFIER,
                f"no PID-3 identifier in the local domain {self.local_authority}",
                "PID^1^3",
            )
        if order.order_control not in cfg.order_controls:
            log.info("order control %s for %s: no prefetch", order.order_control, patient)
            return "AA"
        demographics = cfg.reconcile_demographics
        job = PrefetchJob(
            patient_id=patient,
            control_id=order.header.control_id,
            demographics_name=order.patient_name if demographics else None,
            birth_date=order.birth_date if demographics else None,
            sex=order.sex if demographics else None,
            modalities=order.modalities if cfg.match_modality else (),
            requested_by=principal,
        )
        outcome = self.schedule(job)
        if outcome == "queue_full":
            raise AckError("AR", APPLICATION_INTERNAL_ERROR, "prefetch queue full, retry later")
        return "AA"

    # -- jobs

    def schedule(self, job: PrefetchJob) -> str:
        """queued, duplicate (same patient queued, running or done within the window) or
        queue_full."""
        now = time.monotonic()
        window = self.config.dedupe_seconds
        if len(self._scheduled) > 10 * self.config.max_queue:
            self._scheduled = {p: t for p, t in self._scheduled.items() if now - t < window}
        last = self._scheduled.get(job.patient_id)
        if job.patient_id in self._pending or (last is not None and now - last < window):
            outcome = "duplicate"
        else:
            try:
                self._queue.put_nowait(job)
            except asyncio.QueueFull:
                outcome = "queue_full"
            else:
                outcome = "queued"
                self._pending.add(job.patient_id)
                self._scheduled[job.patient_id] = now
        self.metrics.jobs.labels(outcome).inc()
        log.info("prefetch for %s (order %s): %s", job.patient_id, job.control_id, outcome)
        return outcome

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                result = await self.run_job(job)
            finally:
                self._pending.discard(job.patient_id)
                self._queue.task_done()
            self.recent.append(result)

    async def run_job(self, job: PrefetchJob) -> JobResult:
        # The worker task outlives the connection: the caller travels with the job.
        token = set_current_caller(job.requested_by)
        try:
            return await self._run_job(job)
        finally:
            reset_current_caller(token)

    async def _run_job(self, job: PrefetchJob) -> JobResult:
        cfg = self.config
        store = PacsStore(
            cfg.pacs_host,
            cfg.pacs_port,
            cfg.pacs_ae_title,
            cfg.calling_ae_title,
            timeout=cfg.pacs_timeout,
        )
        try:
            async with asyncio.timeout(cfg.job_timeout):
                report = await import_priors(
                    InProcessFederation(self.gateway),
                    patient_id=job.patient_id,
                    selection=PriorSelection(
                        self.home_community_id,
                        modalities=frozenset(job.modalities),
                        not_before=PriorSelection.lookback(cfg.lookback_days),
                    ),
                    store=store,
                    accession_prefixes=cfg.accession_prefixes,
                    community_names=self.community_names,
                    demographics=Demographics(job.demographics_name, job.birth_date, job.sex),
                    modifying_system=f"xca-gateway {self.gateway.config.community.name} prefetch",
                    on_study=lambda study, refs: self._audit(job, study, refs),
                )
        except Exception as exc:
            log.warning("prefetch for %s failed: %s", job.patient_id, exc)
            self.metrics.jobs.labels("failed").inc()
            return JobResult(job, error=f"{type(exc).__name__}: {exc}")
        self.metrics.instances.labels("stored").inc(report.stored)
        self.metrics.instances.labels("failed").inc(report.failed)
        outcome = (
            "nothing_to_import"
            if report.nothing_to_import
            else ("imported" if report.ok else "failed")
        )
        self.metrics.jobs.labels(outcome).inc()
        log.info(
            "prefetch for %s: %d stud(ies), %d instance(s) stored, %d failed",
            job.patient_id,
            len(report.studies),
            report.stored,
            report.failed,
        )
        return JobResult(job, report)

    def _audit(self, job: PrefetchJob, study: StudyImport, refs: Mapping[str, InstanceRef]) -> None:
        audit = self.gateway.audit
        if not audit.config.enabled:
            return

        audit.record(
            import_audit_messages(
                audit.context,
                study=study,
                patient_id=job.patient_id,
                importer=audit.context.local_node(self.config.calling_ae_title),
                source=Node(study.manifest.home_community_id),
                pacs=Node(self.config.pacs_ae_title, self.config.pacs_host),
                refs=refs,
                patient_name=job.demographics_name,
            )
        )
