"""The embedded registry store: one SQLite file, no server (stdlib ``sqlite3``).

WAL mode lets queries run while a registration commits; each worker thread has its own
connection, and writers take the database lock up front (``BEGIN IMMEDIATE``) so that the
registration rules see the state they write over. ``synchronous=FULL``: a registry is a system
of record, a committed registration survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xca_gateway.registry.sql import SCHEMA_VERSION, Dialect, SqlRegistryStore, json_list, schema

# Above this many values an IN list goes through json_each() as one parameter.
_INLINE_IN_LIMIT = 50
# Code-and-scheme pairs written out as ORs up to this many (the common case: a few codes).
_INLINE_PAIRS = 20


class SqliteDialect(Dialect):
    name = "sqlite"

    def in_list(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        if len(values) <= _INLINE_IN_LIMIT:
            return f"{column} IN ({', '.join('?' * len(values))})", list(values)
        return f"{column} IN (SELECT value FROM json_each(?))", [json_list(values)]

    def like(self, column: str, pattern: str) -> tuple[str, list[Any]]:
        # SQLite's LIKE ignores ASCII case; GLOB is case-sensitive like SQL LIKE elsewhere.
        return f"{column} GLOB ?", [like_to_glob(pattern)]

    def like_any(self, column: str, patterns: Sequence[str]) -> tuple[str, list[Any]]:
        if len(patterns) == 1:
            return self.like(column, patterns[0])
        globs = [like_to_glob(p) for p in patterns]
        return (
            f"EXISTS (SELECT 1 FROM json_each(?) p WHERE {column} GLOB p.value)",
            [json_list(globs)],
        )

    def pairs_in(
        self, first: str, second: str, pairs: Sequence[tuple[str, str]]
    ) -> tuple[str, list[Any]]:
        if len(pairs) <= _INLINE_PAIRS:
            clause = " OR ".join(f"({first} = ? AND {second} = ?)" for _ in pairs)
            return f"({clause})", [v for pair in pairs for v in pair]
        return (
            f"({first}, {second}) IN (SELECT json_extract(value, '$[0]'), "
            "json_extract(value, '$[1]') FROM json_each(?))",
            [json.dumps([list(pair) for pair in pairs])],
        )


def like_to_glob(pattern: str) -> str:
    """Translate an SQL LIKE pattern (``%``, ``_``; no escape) to an SQLite GLOB pattern."""
    out = []
    for ch in pattern:
        if ch == "%":
            out.append("*")
        elif ch == "_":
            out.append("?")
        elif ch in "*?[":
            out.append(f"[{ch}]")
        else:
            out.append(ch)
    return "".join(out)


class SqliteRegistryStore(SqlRegistryStore):
    dialect = SqliteDialect()

    def __init__(self, path: Path, *, workers: int = 4, busy_timeout: float = 30.0) -> None:
        super().__init__(workers)
        self.path = path
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connect()
        with self._lock:
            self._connections.append(connection)
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in schema("BLOB", "INTEGER"):
                connection.execute(statement)
            connection.execute(
                "INSERT OR IGNORE INTO registry_meta (key, value) VALUES ('schema', ?)",
                [SCHEMA_VERSION],
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=OFF")
        connection.execute("PRAGMA temp_store=MEMORY")
        connection.execute("PRAGMA cache_size=-65536")
        return connection

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Cursor]:
        connection = self._connection()
        cursor = connection.cursor()
        # A read is one statement and needs no explicit transaction; a write takes the lock
        # before reading the state the registration rules depend on.
        if write:
            cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
            if write:
                cursor.execute("COMMIT")
        except BaseException:
            if write:
                cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()

    def _allocate_seqs(self, cur: sqlite3.Cursor, count: int) -> list[int]:
        # Under BEGIN IMMEDIATE no other writer can take the same numbers.
        cur.execute("SELECT COALESCE(MAX(seq), 0) FROM registry_object")
        start = int(cur.fetchone()[0]) + 1
        return list(range(start, start + count))

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def _close_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(sqlite3.Error):
                connection.close()
