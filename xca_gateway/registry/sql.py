"""The SQL registry store shared by SQLite and PostgreSQL.

Schema: one row per registry object in ``registry_object`` (kind, status, patient id, uniqueId,
times, association ends, and the canonical XML, zlib-compressed with the XDS
vocabulary as preset dictionary: packing.py), coded attributes as
``(attribute, code, scheme)`` rows in ``object_code``, authors and referenceIdList values in
``object_value``. FindDocuments for a patient is one index range on
``(patient_id, kind, status)`` with EXISTS probes on the code and value indexes.

All SQL is parameterized; the only text spliced into statements are column names taken from
enums. Database calls are synchronous DB-API code run in a pool of worker threads, so a query
never blocks the event loop and the store is not tied to one loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from lxml import etree

from xca_gateway.registry.model import (
    AssociationFilter,
    Kind,
    ObjectFilter,
    StoredObject,
    load_element,
    set_slot,
)
from xca_gateway.registry.packing import pack, unpack
from xca_gateway.registry.submit import (
    RegistrationPlan,
    RegistryContext,
    Submission,
    SubmissionRejected,
    plan_registration,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode
from xca_gateway.xds.ebrs import RegistryError

T = TypeVar("T")
Cursor = Any

SCHEMA_VERSION = "1"

_COLUMNS = (
    "o.seq, o.kind, o.uuid, o.object_type, o.status, o.patient_id, o.unique_id, "
    "o.source_uuid, o.target_uuid, o.hash"
)
_INSERT_OBJECT = (
    "INSERT INTO registry_object (seq, uuid, kind, object_type, status, patient_id, unique_id, "
    "lid, creation_time, service_start, service_stop, availability, submission_time, "
    "source_id, last_update, source_uuid, target_uuid, hash, xml) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_CODE = "INSERT INTO object_code (seq, attr, code, scheme) VALUES (?, ?, ?, ?)"
_INSERT_VALUE = "INSERT INTO object_value (seq, attr, value) VALUES (?, ?, ?)"


def schema(blob: str, seq: str) -> list[str]:
    """DDL in the common dialect; ``blob`` and ``seq`` are the binary and key column types."""
    return [
        f"""CREATE TABLE IF NOT EXISTS registry_object (
            seq {seq} PRIMARY KEY,
            uuid TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            object_type TEXT NOT NULL,
            status TEXT NOT NULL,
            patient_id TEXT,
            unique_id TEXT UNIQUE,
            lid TEXT,
            creation_time TEXT,
            service_start TEXT,
            service_stop TEXT,
            availability TEXT,
            submission_time TEXT,
            source_id TEXT,
            last_update TEXT,
            source_uuid TEXT,
            target_uuid TEXT,
            hash TEXT,
            xml {blob} NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS registry_object_patient "
        "ON registry_object (patient_id, kind, status)",
        "CREATE INDEX IF NOT EXISTS registry_object_source ON registry_object (source_uuid) "
        "WHERE source_uuid IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS registry_object_target ON registry_object (target_uuid) "
        "WHERE target_uuid IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS registry_object_lid ON registry_object (lid)",
        f"""CREATE TABLE IF NOT EXISTS object_code (
            seq {seq} NOT NULL,
            attr TEXT NOT NULL,
            code TEXT NOT NULL,
            scheme TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS object_code_lookup ON object_code (seq, attr, code, scheme)",
        f"""CREATE TABLE IF NOT EXISTS object_value (
            seq {seq} NOT NULL,
            attr TEXT NOT NULL,
            value TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS object_value_lookup ON object_value (seq, attr, value)",
        "CREATE TABLE IF NOT EXISTS registry_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ]


class Dialect:
    """Differences between the SQL engines, behind the common statement builders."""

    name = "generic"

    def sql(self, text: str) -> str:
        return text

    def in_list(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        raise NotImplementedError

    def like(self, column: str, pattern: str) -> tuple[str, list[Any]]:
        raise NotImplementedError

    def like_any(self, column: str, patterns: Sequence[str]) -> tuple[str, list[Any]]:
        """``column`` matches one of ``patterns``, as one expression whatever their number."""
        raise NotImplementedError

    def pairs_in(
        self, first: str, second: str, pairs: Sequence[tuple[str, str]]
    ) -> tuple[str, list[Any]]:
        """``(first, second)`` is one of ``pairs``, as one expression whatever their number."""
        raise NotImplementedError


def compress(xml: bytes) -> bytes:
    # zlib with the XDS vocabulary as preset dictionary: half the bytes of plain zlib.
    return pack(xml)


def decompress(blob: bytes | memoryview) -> bytes:
    return unpack(blob)


def _row(row: Sequence[Any], with_xml: bool) -> StoredObject:
    return StoredObject(
        seq=int(row[0]),
        kind=Kind(row[1]),
        uuid=row[2],
        object_type=row[3],
        status=row[4],
        patient_id=row[5],
        unique_id=row[6],
        source_uuid=row[7],
        target_uuid=row[8],
        hash=row[9],
        xml=decompress(row[10]) if with_xml else None,
    )


class _Where:
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def within(self, column: str, values: Sequence[str] | None) -> None:
        if values is None:
            return
        if not values:
            self.clauses.append("1 = 0")
            return
        clause, params = self.dialect.in_list(column, values)
        self.add(clause, *params)

    def text(self) -> str:
        return " AND ".join(self.clauses) if self.clauses else "1 = 1"


def object_query(
    dialect: Dialect, flt: ObjectFilter, limit: int | None, with_xml: bool
) -> tuple[str, list[Any]]:
    where = _Where(dialect)
    where.add("o.kind = ?", flt.kind.value)
    if flt.patient_id is not None:
        where.add("o.patient_id = ?", flt.patient_id)
    where.within("o.status", flt.statuses)
    where.within("o.object_type", flt.object_types)
    where.within("o.uuid", flt.uuids)
    where.within("o.unique_id", flt.unique_ids)
    where.within("o.lid", flt.lids)
    where.within("o.availability", flt.availability)
    where.within("o.source_id", flt.source_ids)
    for time_range in flt.times:
        column = f"o.{time_range.column.value}"
        if time_range.low is not None:
            where.add(f"{column} >= ?", time_range.low)
        if time_range.high is not None:
            where.add(f"{column} < ?", time_range.high)
    # Each condition is one EXISTS with one list expression however many values it has: a
    # chain of ORs grows the expression tree with the values (SQLite refuses one deeper than
    # 1,000, "Expression tree is too large").
    for condition in flt.codes:
        alternatives, params = [], []
        any_scheme = [code.code for code in condition.any_of if code.scheme is None]
        with_scheme = [(code.code, code.scheme) for code in condition.any_of if code.scheme]
        if any_scheme:
            clause, clause_params = dialect.in_list("c.code", any_scheme)
            alternatives.append(clause)
            params.extend(clause_params)
        if with_scheme:
            clause, clause_params = dialect.pairs_in("c.code", "c.scheme", with_scheme)
            alternatives.append(clause)
            params.extend(clause_params)
        where.add(
            "EXISTS (SELECT 1 FROM object_code c WHERE c.seq = o.seq AND c.attr = ? AND ("
            + " OR ".join(alternatives)
            + "))",
            condition.attribute.value,
            *params,
        )
    for value_condition in flt.values:
        if value_condition.like:
            clause, params = dialect.like_any("v.value", value_condition.any_of)
        else:
            clause, params = dialect.in_list("v.value", value_condition.any_of)
        where.add(
            "EXISTS (SELECT 1 FROM object_value v WHERE v.seq = o.seq AND v.attr = ? AND "
            f"{clause})",
            value_condition.attribute.value,
            *params,
        )
    return _finish(dialect, where, limit, with_xml)


def association_query(
    dialect: Dialect, flt: AssociationFilter, limit: int | None, with_xml: bool
) -> tuple[str, list[Any]]:
    where = _Where(dialect)
    where.add("o.kind = ?", Kind.ASSOCIATION.value)
    where.within("o.uuid", flt.uuids)
    where.within("o.source_uuid", flt.sources)
    where.within("o.target_uuid", flt.targets)
    where.within("o.object_type", flt.types)
    where.within("o.status", flt.statuses)
    if flt.either is not None:
        if not flt.either:
            where.add("1 = 0")
        else:
            source, source_params = dialect.in_list("o.source_uuid", flt.either)
            target, target_params = dialect.in_list("o.target_uuid", flt.either)
            where.add(f"({source} OR {target})", *source_params, *target_params)
    return _finish(dialect, where, limit, with_xml)


def _finish(
    dialect: Dialect, where: _Where, limit: int | None, with_xml: bool
) -> tuple[str, list[Any]]:
    columns = _COLUMNS + (", o.xml" if with_xml else "")
    text = f"SELECT {columns} FROM registry_object o WHERE {where.text()} ORDER BY o.seq"
    params = where.params
    if limit is not None:
        text += " LIMIT ?"
        params = [*params, limit]
    return dialect.sql(text), params


class SqlRegistryStore:
    """The store logic over a DB-API connection; engines subclass the plumbing."""

    dialect: Dialect

    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="registry-db"
        )
        self._closed = False

    # -- plumbing provided by the engine -----------------------------------------------------

    def _transaction(self, write: bool) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _allocate_seqs(self, cur: Cursor, count: int) -> list[int]:
        raise NotImplementedError

    def _is_unique_violation(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _lock_suffix(self) -> str:
        return ""

    def _close_connections(self) -> None:
        raise NotImplementedError

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the registry store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- reads -------------------------------------------------------------------------------

    def _fetch(
        self, cur: Cursor, text: str, params: list[Any], with_xml: bool
    ) -> list[StoredObject]:
        cur.execute(text, params)
        return [_row(row, with_xml) for row in cur.fetchall()]

    def _select_sync(
        self, flt: ObjectFilter, limit: int | None, with_xml: bool
    ) -> list[StoredObject]:
        text, params = object_query(self.dialect, flt, limit, with_xml)
        with self._transaction(write=False) as cur:
            return self._fetch(cur, text, params, with_xml)

    def _associations_sync(
        self, flt: AssociationFilter, limit: int | None, with_xml: bool
    ) -> list[StoredObject]:
        text, params = association_query(self.dialect, flt, limit, with_xml)
        with self._transaction(write=False) as cur:
            return self._fetch(cur, text, params, with_xml)

    async def select(
        self, flt: ObjectFilter, *, limit: int | None = None, with_xml: bool = True
    ) -> list[StoredObject]:
        return await self._run(self._select_sync, flt, limit, with_xml)

    async def associations(
        self, flt: AssociationFilter, *, limit: int | None = None, with_xml: bool = True
    ) -> list[StoredObject]:
        return await self._run(self._associations_sync, flt, limit, with_xml)

    def _knows_patient_sync(self, patient_id: str) -> bool:
        with self._transaction(write=False) as cur:
            cur.execute(
                self.dialect.sql("SELECT 1 FROM registry_object WHERE patient_id = ? LIMIT 1"),
                [patient_id],
            )
            return cur.fetchone() is not None

    async def knows_patient(self, patient_id: str) -> bool:
        return await self._run(self._knows_patient_sync, patient_id)

    def _counts_sync(self) -> dict[str, int]:
        with self._transaction(write=False) as cur:
            cur.execute("SELECT kind, COUNT(*) FROM registry_object GROUP BY kind")
            counts = {kind.value: 0 for kind in Kind}
            counts.update({row[0]: int(row[1]) for row in cur.fetchall()})
            return counts

    async def counts(self) -> dict[str, int]:
        return await self._run(self._counts_sync)

    # -- registration --------------------------------------------------------------------------

    def _by_column(
        self, cur: Cursor, column: str, values: Sequence[str], *, lock: bool = False
    ) -> list[StoredObject]:
        if not values:
            return []
        found: list[StoredObject] = []
        # Chunked so that neither engine meets a parameter limit.
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            clause, params = self.dialect.in_list(f"o.{column}", chunk)
            text = f"SELECT {_COLUMNS} FROM registry_object o WHERE {clause}"
            if lock:
                text += self._lock_suffix()
            found.extend(self._fetch(cur, self.dialect.sql(text), params, False))
        return found

    def _context(self, cur: Cursor, sub: Submission) -> RegistryContext:
        ctx = RegistryContext()
        referenced = sorted(sub.references | sub.replaced)
        ctx.objects = {o.uuid: o for o in self._by_column(cur, "uuid", referenced, lock=True)}
        ctx.unique_ids = {
            o.unique_id: o for o in self._by_column(cur, "unique_id", sub.unique_ids) if o.unique_id
        }
        ctx.taken_uuids = {o.uuid for o in self._by_column(cur, "uuid", sub.uuids)}
        if sub.replaced:
            incoming = [
                a
                for a in self._by_column(cur, "target_uuid", sorted(sub.replaced))
                if a.kind is Kind.ASSOCIATION
                and a.object_type in (ebrim.XFRM, ebrim.APND, ebrim.HAS_MEMBER)
            ]
            for assoc in incoming:
                ctx.incoming.setdefault(assoc.target_uuid or "", []).append(assoc)
            sources = sorted({a.source_uuid for a in incoming if a.source_uuid})
            ctx.sources = {o.uuid: o for o in self._by_column(cur, "uuid", sources, lock=True)}
        return ctx

    def _apply(self, cur: Cursor, plan: RegistrationPlan) -> None:
        seqs = self._allocate_seqs(cur, len(plan.inserts))
        objects: list[tuple[Any, ...]] = []
        codes: list[tuple[Any, ...]] = []
        values: list[tuple[Any, ...]] = []
        for seq, obj in zip(seqs, plan.inserts, strict=True):
            objects.append(
                (
                    seq,
                    obj.uuid,
                    obj.kind.value,
                    obj.object_type,
                    obj.status,
                    obj.patient_id,
                    obj.unique_id,
                    obj.lid,
                    obj.creation_time,
                    obj.service_start,
                    obj.service_stop,
                    obj.availability,
                    obj.submission_time,
                    obj.source_id,
                    obj.last_update,
                    obj.source_uuid,
                    obj.target_uuid,
                    obj.hash,
                    compress(obj.xml()),
                )
            )
            codes.extend(
                (seq, attribute.value, code.code, code.scheme or "")
                for attribute, code in obj.codes
            )
            values.extend((seq, attribute.value, value) for attribute, value in obj.values)
        sql = self.dialect.sql
        cur.executemany(sql(_INSERT_OBJECT), objects)
        if codes:
            cur.executemany(sql(_INSERT_CODE), codes)
        if values:
            cur.executemany(sql(_INSERT_VALUE), values)
        if plan.deprecate:
            clause, params = self.dialect.in_list("uuid", plan.deprecate)
            cur.execute(
                sql(f"UPDATE registry_object SET status = ? WHERE {clause}"),
                [ebrim.STATUS_DEPRECATED, *params],
            )
        for folder_uuid in plan.touch_folders:
            cur.execute(sql("SELECT xml FROM registry_object WHERE uuid = ?"), [folder_uuid])
            row = cur.fetchone()
            if row is None:  # pragma: no cover - checked by plan_registration
                continue
            element = load_element(decompress(row[0]))
            set_slot(element, ebrim.SLOT_LAST_UPDATE_TIME, [plan.now])
            cur.execute(
                sql("UPDATE registry_object SET last_update = ?, xml = ? WHERE uuid = ?"),
                [plan.now, compress(etree.tostring(element, encoding="utf-8")), folder_uuid],
            )

    def _register_in(self, cur: Cursor, sub: Submission) -> RegistrationPlan:
        plan = plan_registration(sub, self._context(cur, sub))
        self._apply(cur, plan)
        return plan

    def _register_sync(self, submissions: Sequence[Submission]) -> list[RegistrationPlan]:
        try:
            with self._transaction(write=True) as cur:
                return [self._register_in(cur, sub) for sub in submissions]
        except SubmissionRejected:
            raise
        except Exception as exc:
            if self._is_unique_violation(exc):
                # A concurrent registration (another replica) took a uniqueId or entryUUID
                # between our check and our insert.
                raise SubmissionRejected(
                    [
                        RegistryError(
                            ErrorCode.DUPLICATE_UNIQUE_ID_IN_REGISTRY,
                            "a uniqueId or entryUUID of the submission was registered concurrently",
                        )
                    ]
                ) from None
            raise

    async def register(self, submission: Submission) -> RegistrationPlan:
        plans = await self._run(self._register_sync, [submission])
        return plans[0]

    async def register_many(self, submissions: Sequence[Submission]) -> None:
        await self._run(self._register_sync, list(submissions))

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._shutdown)

    def close_sync(self) -> None:
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        self._close_connections()


def json_list(values: Sequence[str]) -> str:
    return json.dumps(list(values))
