"""The audit record store: SQLite by default, PostgreSQL (psycopg 3) for scale, one interface.

Layout. ``events`` holds one row per received message: the columns a list or a filter needs
(event time, EventID, outcome, transaction, who asked and from where, first patient, community)
and the raw message, verbatim, zlib-compressed (``raw_z``; decompression gives back the exact
bytes). Multi-valued keys live in ``tokens`` (kind, value, time, event), a covering index
ordered by time per value, so that "every event for patient X between A and B, newest first"
is one index range scan however many events are stored.

Records are append-only: no code path updates or deletes them, and triggers refuse UPDATE and
DELETE on both tables, so that an officer (or a bug) cannot alter the trail through the
application. Details (participants, objects) are not stored twice: they are read again from the
raw message, which the parser does deterministically.
"""

from __future__ import annotations

import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from xca_gateway.arr.parse import (
    FLAG_FRAMING,
    FLAG_SOURCE_UNBOUND,
    FLAG_TRUNCATED,
    AuditRecord,
    name_words,
    parse_record,
    patient_key,
)

# tokens.kind
KIND_PATIENT = 1
KIND_USER = 2
KIND_ADDRESS = 3
KIND_COMMUNITY = 4
KIND_ENTITY = 5
# Words of the patients' names (parse.name_words): search by name.
KIND_PATIENT_NAME = 6

_US = 1_000_000
# Longest value kept in an index column; longer ones are cut (the raw message keeps them whole).
_MAX_KEY = 512


def to_us(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * _US)


def from_us(value: int) -> datetime:
    return datetime.fromtimestamp(value / _US, UTC)


def _bar(values: Iterable[str]) -> str:
    """``|a|b|`` so that membership is a substring test on ``|a|``."""
    items = [v.replace("|", "/") for v in values if v]
    return "|" + "|".join(items) + "|" if items else ""


def _cut(value: str | None) -> str | None:
    return value[:_MAX_KEY] if value else value


# --------------------------------------------------------------------------- query model

# One search clause: the event matches if it matches ANY of the values (FHIR "a,b");
# a filter field holds several clauses that must ALL match (FHIR repeated parameter).
Clause = tuple[str, ...]


@dataclass(frozen=True)
class EventFilter:
    since: datetime | None = None
    until: datetime | None = None
    # Patient keys as patient_key() makes them; a key ending in "|" matches any authority.
    patients: tuple[Clause, ...] = ()
    # Words of a patient's name (parse.name_words), each clause one word.
    patient_names: tuple[Clause, ...] = ()
    users: tuple[Clause, ...] = ()
    addresses: tuple[Clause, ...] = ()
    communities: tuple[Clause, ...] = ()
    entities: tuple[Clause, ...] = ()
    # EventID codes (FHIR "type"), EventTypeCodes (FHIR "subtype"), the IHE transaction.
    event_codes: tuple[Clause, ...] = ()
    subtypes: tuple[Clause, ...] = ()
    transactions: tuple[Clause, ...] = ()
    outcomes: tuple[tuple[int, ...], ...] = ()
    sources: tuple[Clause, ...] = ()
    entity_types: tuple[Clause, ...] = ()
    entity_roles: tuple[Clause, ...] = ()
    altids: tuple[Clause, ...] = ()
    senders: tuple[Clause, ...] = ()
    # Authenticated senders (certificate subject, udp:<address>, local).
    sender_identities: tuple[Clause, ...] = ()
    # True: only flagged (not fully understood) records; False: only clean ones.
    flagged: bool | None = None
    # Free-text prefix match on the requesting user (UI convenience).
    user_prefix: str | None = None


@dataclass(frozen=True)
class EventRow:
    """The indexed summary of one stored record (what lists and reports show)."""

    id: int
    event_time: datetime
    received_at: datetime
    event_code: str | None
    event_system: str | None
    event_display: str | None
    action: str | None
    outcome: int | None
    transaction: str | None
    transaction_display: str | None
    subtypes: tuple[str, ...]
    source_id: str | None
    sender: str
    transport: str
    dialect: str
    flags: tuple[str, ...]
    problem: str | None
    requestor: str | None
    requestor_address: str | None
    peer: str | None
    patient: str | None
    community: str | None
    raw_size: int
    # The authenticated sender (certificate subject, ``udp:<address>``, ``local``); None for
    # records stored before the repository kept it.
    sender_identity: str | None = None

    @property
    def source_unbound(self) -> bool:
        """The AuditSourceID is not one this sender may report as."""
        return FLAG_SOURCE_UNBOUND in self.flags


@dataclass(frozen=True)
class StoredEvent:
    row: EventRow
    raw: bytes

    def record(self) -> AuditRecord:
        """The full parsed record, read again from the raw message."""
        record = parse_record(
            self.raw,
            sender=self.row.sender,
            transport=self.row.transport,  # type: ignore[arg-type]
            received_at=self.row.received_at,
            extra_flags=[f for f in self.row.flags if f in _RECEIVE_FLAGS],
            sender_identity=self.row.sender_identity,
        )
        object.__setattr__(record, "record_id", self.row.id)
        if FLAG_SOURCE_UNBOUND in self.row.flags and self.row.problem:
            # Why it was flagged at receipt (the bytes alone do not say).
            object.__setattr__(record, "problem", self.row.problem)
        return record


# Flags set by the receiver (framing, the sender's bindings), not derivable from the bytes.
_RECEIVE_FLAGS = frozenset({FLAG_FRAMING, FLAG_TRUNCATED, FLAG_SOURCE_UNBOUND})


@dataclass(frozen=True)
class Officer:
    username: str
    password_hash: str | None
    certificate_fingerprint: str | None
    display_name: str | None
    created: datetime


class AuditStore(Protocol):
    def add(self, records: Sequence[AuditRecord]) -> list[int]: ...

    def prepare(self, records: Sequence[AuditRecord]) -> PreparedBatch: ...

    def add_prepared(self, batch: PreparedBatch) -> list[int]: ...

    def search(
        self, flt: EventFilter, *, limit: int = 50, offset: int = 0, newest_first: bool = True
    ) -> list[EventRow]: ...

    def count(self, flt: EventFilter, cap: int = 10000) -> int: ...

    def get(self, event_id: int) -> StoredEvent | None: ...

    def get_many(self, ids: Sequence[int]) -> list[StoredEvent]: ...

    def histogram(
        self, flt: EventFilter, bucket_seconds: int, group_by: str | None = None
    ) -> list[tuple[datetime, str | None, int]]: ...

    def top(
        self, flt: EventFilter, column: str, limit: int = 20
    ) -> list[tuple[str | None, int]]: ...

    def total(self) -> int: ...

    def add_officer(self, officer: Officer) -> None: ...

    def officer(self, username: str) -> Officer | None: ...

    def officer_by_certificate(self, fingerprint: str) -> Officer | None: ...

    def officers(self) -> list[Officer]: ...

    def close(self) -> None: ...


# Columns a histogram may be grouped by and top() may count (never user input in SQL).
GROUPABLE = frozenset(
    {
        "sender",
        "sender_identity",
        "peer",
        "requestor",
        "transaction",
        "outcome",
        "event_code",
        "community",
    }
)

_EVENT_COLUMNS = (
    "id, event_time, received_at, event_code, event_system, event_display, action, outcome, "
    "trans_code, trans_display, subtypes, source_id, sender, transport, dialect, flags, problem, "
    "requestor, requestor_address, peer, patient, community, raw_size, sender_identity"
)
_COLUMN_SQL = {"transaction": "trans_code"}


def _row(values: Sequence[Any]) -> EventRow:
    (
        id_,
        event_time,
        received_at,
        code,
        system,
        display,
        action,
        outcome,
        trans,
        trans_display,
        subtypes,
        source_id,
        sender,
        transport,
        dialect,
        flags,
        problem,
        requestor,
        requestor_address,
        peer,
        patient,
        community,
        raw_size,
        sender_identity,
    ) = values
    return EventRow(
        id=int(id_),
        event_time=from_us(int(event_time)),
        received_at=from_us(int(received_at)),
        event_code=code,
        event_system=system,
        event_display=display,
        action=action,
        outcome=None if outcome is None else int(outcome),
        transaction=trans,
        transaction_display=trans_display,
        subtypes=tuple(s for s in (subtypes or "").split("|") if s),
        source_id=source_id,
        sender=sender,
        transport=transport,
        dialect=dialect,
        flags=tuple(f for f in (flags or "").split(",") if f),
        problem=problem,
        requestor=requestor,
        requestor_address=requestor_address,
        peer=peer,
        patient=patient,
        community=community,
        raw_size=int(raw_size),
        sender_identity=sender_identity,
    )


def event_values(record: AuditRecord, event_id: int) -> tuple[Any, ...]:
    requestor = record.requestor
    system = record.requesting_system
    transaction = record.transaction
    patients = record.patient_ids
    communities = record.community_ids
    entity_types = [f"{e.type_code or ''}:{e.role or ''}" for e in record.entities]
    return (
        event_id,
        to_us(record.event_time),
        to_us(record.received_at),
        _cut(record.event_id.code) if record.event_id else None,
        _cut(record.event_id.system) if record.event_id else None,
        _cut(record.event_id.display) if record.event_id else None,
        record.action,
        record.outcome,
        _cut(transaction.code) if transaction else None,
        _cut(transaction.display) if transaction else None,
        _bar(c.code for c in record.event_types),
        _cut(record.audit_source_id),
        record.sender,
        record.transport,
        record.dialect,
        ",".join(record.flags),
        _cut(record.problem),
        _cut(requestor.user_name or requestor.user_id) if requestor else None,
        _cut(system.network_access_point_id) if system else None,
        _cut((system.network_access_point_id or system.user_id) if system else None),
        _cut(patients[0]) if patients else None,
        _cut(communities[0]) if communities else None,
        _bar(entity_types),
        _bar(record.alternative_user_ids),
        zlib.compress(record.raw, 1),
        len(record.raw),
        _cut(record.sender_identity),
    )


_INSERT_EVENT_COLUMNS = (
    "id, event_time, received_at, event_code, event_system, event_display, action, outcome, "
    "trans_code, trans_display, subtypes, source_id, sender, transport, dialect, flags, problem, "
    "requestor, requestor_address, peer, patient, community, entity_types, altids, raw_z, "
    "raw_size, sender_identity"
)


def token_values(record: AuditRecord, event_id: int) -> Iterator[tuple[int, str, int, int]]:
    time = to_us(record.event_time)
    seen: set[tuple[int, str]] = set()

    def emit(kind: int, values: Iterable[str]) -> Iterator[tuple[int, str, int, int]]:
        for value in values:
            key = (kind, value[:_MAX_KEY])
            if key not in seen:
                seen.add(key)
                yield kind, key[1], time, event_id

    yield from emit(KIND_PATIENT, (patient_key(p) for p in record.patient_ids))
    yield from emit(KIND_USER, record.user_keys)
    yield from emit(KIND_ADDRESS, record.addresses)
    yield from emit(KIND_COMMUNITY, record.community_ids)
    yield from emit(KIND_ENTITY, record.other_entity_ids)
    yield from emit(KIND_PATIENT_NAME, (w for n in record.patient_names for w in name_words(n)))


@dataclass
class PreparedBatch:
    """Rows ready to insert; events lack their id, tokens name their record by index."""

    events: list[tuple[Any, ...]]
    tokens: list[tuple[int, str, int, int]]


def prepare_batch(records: Sequence[AuditRecord]) -> PreparedBatch:
    events = []
    tokens: list[tuple[int, str, int, int]] = []
    for n, record in enumerate(records):
        events.append(event_values(record, 0)[1:])
        tokens.extend(token_values(record, n))
    return PreparedBatch(events, tokens)


# --------------------------------------------------------------------------- SQL building


class _Sql:
    """Builds the WHERE clause of a filter with ``?`` placeholders."""

    def __init__(self, contains: str) -> None:
        self.where: list[str] = []
        self.params: list[Any] = []
        self._contains = contains

    def add(self, sql: str, *params: Any) -> None:
        self.where.append(sql)
        self.params.extend(params)

    def contains(self, column: str, clauses: tuple[Clause, ...]) -> None:
        for clause in clauses:
            parts = [self._contains.format(col=column) for _ in clause]
            self.add("(" + " OR ".join(parts) + ")", *(f"|{v.replace('|', '/')}|" for v in clause))

    def equals(self, column: str, clauses: Sequence[Sequence[Any]]) -> None:
        for clause in clauses:
            marks = ", ".join("?" for _ in clause)
            self.add(f"{column} IN ({marks})", *clause)

    @property
    def clause(self) -> str:
        return " AND ".join(self.where) if self.where else "1=1"


def _token_condition(kind: int, values: Clause, alias: str = "t") -> tuple[str, list[Any]]:
    parts: list[str] = []
    params: list[Any] = [kind]
    for value in values:
        if kind == KIND_PATIENT and value.endswith("|"):
            parts.append(f"({alias}.value >= ? AND {alias}.value < ?)")
            params.extend([value, value[:-1] + "}"])  # "}" sorts right after "|"
        else:
            parts.append(f"{alias}.value = ?")
            params.append(value)
    return f"{alias}.kind = ? AND (" + " OR ".join(parts or ["1=0"]) + ")", params


def _token_clauses(flt: EventFilter) -> list[tuple[int, Clause]]:
    out: list[tuple[int, Clause]] = []
    for kind, clauses in (
        (KIND_PATIENT, flt.patients),
        (KIND_PATIENT_NAME, flt.patient_names),
        (KIND_ENTITY, flt.entities),
        (KIND_COMMUNITY, flt.communities),
        (KIND_ADDRESS, flt.addresses),
        (KIND_USER, flt.users),
    ):
        out.extend((kind, c) for c in clauses)
    return out


@dataclass
class _Plan:
    sql: str
    params: list[Any] = field(default_factory=list)


class SqlAuditStore:
    """Shared SQL of the SQLite and PostgreSQL stores (subclasses bring the connections)."""

    placeholder = "?"
    contains_sql = "instr({col}, ?) > 0"
    join_forced = "CROSS JOIN"

    # ------------------------------------------------------------------ plumbing for subclasses

    def _read(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _next_ids(self, conn: Any, count: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ writing

    def prepare(self, records: Sequence[AuditRecord]) -> PreparedBatch:
        """The rows of ``records`` (pure Python; may run on another thread than add)."""
        return prepare_batch(records)

    def add(self, records: Sequence[AuditRecord]) -> list[int]:
        return self.add_prepared(prepare_batch(records))

    def add_prepared(self, batch: PreparedBatch) -> list[int]:
        if not batch.events:
            return []
        with self._write() as conn:
            ids = self._next_ids(conn, len(batch.events))
            marks = ", ".join("?" for _ in range(27))
            cur = conn.cursor()
            cur.executemany(
                self._sql(f"INSERT INTO events ({_INSERT_EVENT_COLUMNS}) VALUES ({marks})"),
                [(i, *row) for i, row in zip(ids, batch.events, strict=True)],
            )
            if batch.tokens:
                cur.executemany(
                    self._sql("INSERT INTO tokens (kind, value, time, event) VALUES (?, ?, ?, ?)"),
                    [(k, v, t, ids[n]) for k, v, t, n in batch.tokens],
                )
        return ids

    # ------------------------------------------------------------------ reading

    def _plan(self, flt: EventFilter, select: str, *, with_tokens: bool = True) -> _Plan:
        """FROM/WHERE for a filter. The most selective token clause (patient first) drives the
        query through ``tokens`` in time order; the others become EXISTS probes."""
        sql = _Sql(self.contains_sql)
        since = to_us(flt.since) if flt.since else None
        until = to_us(flt.until) if flt.until else None
        tokens = _token_clauses(flt) if with_tokens else []
        driver = tokens[0] if tokens else None
        time_col = "t.time" if driver else "e.event_time"
        if since is not None:
            sql.add(f"{time_col} >= ?", since)
        if until is not None:
            sql.add(f"{time_col} <= ?", until)
        if driver is not None:
            cond, params = _token_condition(*driver)
            sql.add(cond, *params)
        for kind, clause in tokens[1:]:
            cond, params = _token_condition(kind, clause, "x")
            sql.add(f"EXISTS (SELECT 1 FROM tokens x WHERE x.event = e.id AND {cond})", *params)
        sql.equals("e.event_code", flt.event_codes)
        sql.equals("e.trans_code", flt.transactions)
        sql.equals("e.outcome", flt.outcomes)
        sql.equals("e.source_id", flt.sources)
        sql.equals("e.sender", flt.senders)
        sql.equals("e.sender_identity", flt.sender_identities)
        sql.contains("e.subtypes", flt.subtypes)
        sql.contains("e.altids", flt.altids)
        for clause in flt.entity_types:
            parts = [self.contains_sql.format(col="e.entity_types") for _ in clause]
            sql.add("(" + " OR ".join(parts) + ")", *(f"|{v}:" for v in clause))
        for clause in flt.entity_roles:
            parts = [self.contains_sql.format(col="e.entity_types") for _ in clause]
            sql.add("(" + " OR ".join(parts) + ")", *(f":{v}|" for v in clause))
        if flt.flagged is True:
            sql.add("e.flags <> ''")
        elif flt.flagged is False:
            sql.add("e.flags = ''")
        if flt.user_prefix:
            sql.add(
                "e.requestor >= ? AND e.requestor < ?", flt.user_prefix, flt.user_prefix + "\uffff"
            )
        source = f"tokens t {self.join_forced} events e ON e.id = t.event" if driver else "events e"
        return _Plan(f"SELECT {select} FROM {source} WHERE {sql.clause}", sql.params)

    def _order(self, flt: EventFilter, newest_first: bool) -> str:
        direction = "DESC" if newest_first else "ASC"
        col = "t.time" if _token_clauses(flt) else "e.event_time"
        return f" ORDER BY {col} {direction}, e.id {direction}"

    def search(
        self, flt: EventFilter, *, limit: int = 50, offset: int = 0, newest_first: bool = True
    ) -> list[EventRow]:
        cols = ", ".join(f"e.{c.strip()}" for c in _EVENT_COLUMNS.split(","))
        plan = self._plan(flt, cols)
        sql = plan.sql + self._order(flt, newest_first) + " LIMIT ? OFFSET ?"
        with self._read() as conn:
            rows = conn.execute(self._sql(sql), [*plan.params, limit, offset]).fetchall()
        return [_row(r) for r in rows]

    def count(self, flt: EventFilter, cap: int = 10000) -> int:
        plan = self._plan(flt, "1")
        sql = f"SELECT count(*) FROM ({plan.sql} LIMIT ?) AS capped"
        with self._read() as conn:
            row = conn.execute(self._sql(sql), [*plan.params, cap]).fetchone()
        return int(row[0])

    def get(self, event_id: int) -> StoredEvent | None:
        found = self.get_many([event_id])
        return found[0] if found else None

    def get_many(self, ids: Sequence[int]) -> list[StoredEvent]:
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        sql = f"SELECT {_EVENT_COLUMNS}, raw_z FROM events WHERE id IN ({marks})"
        with self._read() as conn:
            rows = conn.execute(self._sql(sql), list(ids)).fetchall()
        by_id = {int(r[0]): StoredEvent(_row(r[:-1]), zlib.decompress(bytes(r[-1]))) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def histogram(
        self, flt: EventFilter, bucket_seconds: int, group_by: str | None = None
    ) -> list[tuple[datetime, str | None, int]]:
        """Event counts per time bucket (and per ``group_by`` column), oldest first."""
        if group_by is not None and group_by not in GROUPABLE:
            raise ValueError(f"cannot group by {group_by!r}")
        bucket = max(1, int(bucket_seconds)) * _US
        time_col = "t.time" if _token_clauses(flt) else "e.event_time"
        group = f"e.{_COLUMN_SQL.get(group_by, group_by)}" if group_by else "NULL"
        select = f"({time_col} / {bucket}) * {bucket} AS b, {group} AS g, count(*) AS n"
        plan = self._plan(flt, select)
        sql = plan.sql + " GROUP BY b, g ORDER BY b"
        with self._read() as conn:
            rows = conn.execute(self._sql(sql), plan.params).fetchall()
        return [(from_us(int(b)), None if g is None else str(g), int(n)) for b, g, n in rows]

    def top(self, flt: EventFilter, column: str, limit: int = 20) -> list[tuple[str | None, int]]:
        if column not in GROUPABLE:
            raise ValueError(f"cannot count by {column!r}")
        col = f"e.{_COLUMN_SQL.get(column, column)}"
        plan = self._plan(flt, f"{col} AS g, count(*) AS n")
        sql = plan.sql + f" GROUP BY {col} ORDER BY n DESC LIMIT ?"
        with self._read() as conn:
            rows = conn.execute(self._sql(sql), [*plan.params, limit]).fetchall()
        return [(None if g is None else str(g), int(n)) for g, n in rows]

    def total(self) -> int:
        """How many records are stored (ids are dense, and max() is instant where count(*)
        scans millions of rows)."""
        with self._read() as conn:
            row = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ officers

    def add_officer(self, officer: Officer) -> None:
        with self._write() as conn:
            conn.execute(
                self._sql(
                    "INSERT INTO officers (username, password_hash, certificate_fingerprint, "
                    "display_name, created) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash, "
                    "certificate_fingerprint = excluded.certificate_fingerprint, "
                    "display_name = excluded.display_name"
                ),
                (
                    officer.username,
                    officer.password_hash,
                    officer.certificate_fingerprint,
                    officer.display_name,
                    to_us(officer.created),
                ),
            )

    def _officer_where(self, where: str, value: str) -> Officer | None:
        sql = (
            "SELECT username, password_hash, certificate_fingerprint, display_name, created "
            f"FROM officers WHERE {where} = ?"
        )
        with self._read() as conn:
            row = conn.execute(self._sql(sql), (value,)).fetchone()
        return _officer(row) if row else None

    def officer(self, username: str) -> Officer | None:
        return self._officer_where("username", username)

    def officer_by_certificate(self, fingerprint: str) -> Officer | None:
        return self._officer_where("certificate_fingerprint", fingerprint.lower())

    def officers(self) -> list[Officer]:
        sql = (
            "SELECT username, password_hash, certificate_fingerprint, display_name, created "
            "FROM officers ORDER BY username"
        )
        with self._read() as conn:
            return [_officer(r) for r in conn.execute(sql).fetchall()]


def _officer(row: Sequence[Any]) -> Officer:
    return Officer(row[0], row[1], row[2], row[3], from_us(int(row[4])))


# --------------------------------------------------------------------------- SQLite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    event_time INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    event_code TEXT, event_system TEXT, event_display TEXT,
    action TEXT, outcome INTEGER,
    trans_code TEXT, trans_display TEXT, subtypes TEXT NOT NULL DEFAULT '',
    source_id TEXT, sender TEXT NOT NULL, transport TEXT NOT NULL, dialect TEXT NOT NULL,
    flags TEXT NOT NULL DEFAULT '', problem TEXT,
    requestor TEXT, requestor_address TEXT, peer TEXT, patient TEXT, community TEXT,
    entity_types TEXT NOT NULL DEFAULT '', altids TEXT NOT NULL DEFAULT '',
    raw_z BLOB NOT NULL, raw_size INTEGER NOT NULL,
    sender_identity TEXT
);
CREATE INDEX IF NOT EXISTS events_time ON events (event_time);
CREATE INDEX IF NOT EXISTS events_trans_time ON events (trans_code, event_time);
CREATE INDEX IF NOT EXISTS events_outcome_time ON events (outcome, event_time);
CREATE INDEX IF NOT EXISTS events_code_time ON events (event_code, event_time);
CREATE TABLE IF NOT EXISTS tokens (
    kind INTEGER NOT NULL, value TEXT NOT NULL, time INTEGER NOT NULL, event INTEGER NOT NULL,
    PRIMARY KEY (kind, value, time, event)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS officers (
    username TEXT PRIMARY KEY, password_hash TEXT, certificate_fingerprint TEXT UNIQUE,
    display_name TEXT, created INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'audit records are read-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'audit records are read-only'); END;
CREATE TRIGGER IF NOT EXISTS tokens_no_update BEFORE UPDATE ON tokens
BEGIN SELECT RAISE(ABORT, 'audit records are read-only'); END;
CREATE TRIGGER IF NOT EXISTS tokens_no_delete BEFORE DELETE ON tokens
BEGIN SELECT RAISE(ABORT, 'audit records are read-only'); END;
"""


class SqliteAuditStore(SqlAuditStore):
    """SQLite in WAL mode: one writer connection, one reader connection per thread."""

    def __init__(self, path: Path, *, cache_mib: int = 256) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cache_kib = cache_mib * 1024
        self._writer = self._connect()
        self._writer.executescript(_SQLITE_SCHEMA)
        self._migrate()
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; an OS crash may lose the last
        # transactions (the senders' spools still hold them until acknowledged).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    def _migrate(self) -> None:
        """Bring a database created by an earlier version up to this schema (additive only:
        new columns stay NULL for old records, which the read-only triggers never see)."""
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(events)")}
        if "sender_identity" not in columns:
            try:
                self._writer.execute("ALTER TABLE events ADD COLUMN sender_identity TEXT")
            except sqlite3.OperationalError as exc:  # another process migrated it first
                if "duplicate column" not in str(exc):
                    raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("store closed")
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _next_ids(self, conn: Any, count: int) -> list[int]:
        # Inside BEGIN IMMEDIATE: no other writer (thread or process) can interleave.
        first = int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]) + 1
        return list(range(first, first + count))

    def checkpoint(self) -> None:
        with self._write_lock:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self._closed = True
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()


# --------------------------------------------------------------------------- PostgreSQL

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id BIGINT PRIMARY KEY,
    event_time BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    event_code TEXT, event_system TEXT, event_display TEXT,
    action TEXT, outcome INTEGER,
    trans_code TEXT, trans_display TEXT, subtypes TEXT NOT NULL DEFAULT '',
    source_id TEXT, sender TEXT NOT NULL, transport TEXT NOT NULL, dialect TEXT NOT NULL,
    flags TEXT NOT NULL DEFAULT '', problem TEXT,
    requestor TEXT, requestor_address TEXT, peer TEXT, patient TEXT, community TEXT,
    entity_types TEXT NOT NULL DEFAULT '', altids TEXT NOT NULL DEFAULT '',
    raw_z BYTEA NOT NULL, raw_size INTEGER NOT NULL,
    sender_identity TEXT
);
-- Migration: repositories created before the authenticated sender was kept.
ALTER TABLE events ADD COLUMN IF NOT EXISTS sender_identity TEXT;
CREATE SEQUENCE IF NOT EXISTS events_id_seq;
CREATE INDEX IF NOT EXISTS events_time ON events (event_time);
CREATE INDEX IF NOT EXISTS events_trans_time ON events (trans_code, event_time);
CREATE INDEX IF NOT EXISTS events_outcome_time ON events (outcome, event_time);
CREATE INDEX IF NOT EXISTS events_code_time ON events (event_code, event_time);
CREATE TABLE IF NOT EXISTS tokens (
    kind SMALLINT NOT NULL, value TEXT COLLATE "C" NOT NULL, time BIGINT NOT NULL,
    event BIGINT NOT NULL,
    PRIMARY KEY (kind, value, time, event)
);
CREATE INDEX IF NOT EXISTS tokens_event ON tokens (event);
CREATE TABLE IF NOT EXISTS officers (
    username TEXT PRIMARY KEY, password_hash TEXT, certificate_fingerprint TEXT UNIQUE,
    display_name TEXT, created BIGINT NOT NULL
);
CREATE OR REPLACE FUNCTION arr_read_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'audit records are read-only'; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS events_read_only ON events;
CREATE TRIGGER events_read_only BEFORE UPDATE OR DELETE ON events
FOR EACH ROW EXECUTE FUNCTION arr_read_only();
DROP TRIGGER IF EXISTS tokens_read_only ON tokens;
CREATE TRIGGER tokens_read_only BEFORE UPDATE OR DELETE ON tokens
FOR EACH ROW EXECUTE FUNCTION arr_read_only();
"""


class PostgresAuditStore(SqlAuditStore):
    """PostgreSQL through psycopg 3: one writer connection, a small pool of readers."""

    placeholder = "%s"
    contains_sql = "strpos({col}, ?) > 0"
    join_forced = "JOIN"

    def __init__(self, dsn: str, *, readers: int = 4) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.dsn = dsn
        self._writer = psycopg.connect(dsn, autocommit=True)
        with self._writer.transaction():
            self._writer.execute("SELECT pg_advisory_xact_lock(4242)")
            self._writer.execute(_PG_SCHEMA)
        self._write_lock = threading.Lock()
        self._pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=1, max_size=readers, kwargs={"autocommit": True}, open=True
        )

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self._write_lock, self._writer.transaction():
            yield self._writer

    def _next_ids(self, conn: Any, count: int) -> list[int]:
        rows = conn.execute(
            "SELECT nextval('events_id_seq') FROM generate_series(1, %s)", (count,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def close(self) -> None:
        self._pool.close()
        self._writer.close()


def open_store(database: Path | None, postgresql: str | None = None) -> AuditStore:
    if postgresql:
        return PostgresAuditStore(postgresql)
    if database is None:
        raise ValueError("no database configured")
    return SqliteAuditStore(database)
