"""The registry store on PostgreSQL (psycopg 3), for several gateway replicas sharing one
registry.

Same schema and statements as the SQLite store. Concurrency between replicas: uniqueIds and
entryUUIDs are unique indexes (a lost race becomes XDSDuplicateUniqueIdInRegistry), and a
registration locks the existing objects it relates to (``SELECT ... FOR UPDATE``), so two
replicas cannot both replace the same DocumentEntry. Connections come from a psycopg_pool
pool used by the store's worker threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from xca_gateway.registry.sql import SCHEMA_VERSION, Dialect, SqlRegistryStore, schema

if TYPE_CHECKING:
    import psycopg

# Serializes schema creation when several replicas start at once (an arbitrary constant).
_SCHEMA_LOCK = 0x58434152


class PostgresDialect(Dialect):
    name = "postgresql"

    def sql(self, text: str) -> str:
        # Statements are written with '?' placeholders and contain no literal '?' or '%'.
        return text.replace("?", "%s")

    def in_list(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?)", [list(values)]

    def like(self, column: str, pattern: str) -> tuple[str, list[Any]]:
        # No escape character: the TF defines only the % and _ wildcards.
        return f"{column} LIKE ? ESCAPE ''", [pattern]

    def like_any(self, column: str, patterns: Sequence[str]) -> tuple[str, list[Any]]:
        if len(patterns) == 1:
            return self.like(column, patterns[0])
        # LIKE ANY takes no ESCAPE clause and escapes with a backslash: a backslash of the
        # pattern is doubled to stay a literal one, as with ESCAPE ''.
        return f"{column} LIKE ANY(?)", [[p.replace("\\", "\\\\") for p in patterns]]

    def pairs_in(
        self, first: str, second: str, pairs: Sequence[tuple[str, str]]
    ) -> tuple[str, list[Any]]:
        return (
            f"({first}, {second}) IN (SELECT * FROM unnest(?::text[], ?::text[]))",
            [[a for a, _ in pairs], [b for _, b in pairs]],
        )


class PostgresRegistryStore(SqlRegistryStore):
    dialect = PostgresDialect()

    def __init__(self, conninfo: str, *, workers: int = 4, connect_timeout: float = 30.0) -> None:
        # local: the PostgreSQL driver and its pool load only where a deployment keeps its
        # registry on PostgreSQL (the module itself is imported by every gateway)
        import psycopg.errors
        from psycopg_pool import ConnectionPool

        super().__init__(workers)
        self._unique_violation = psycopg.errors.UniqueViolation
        self._pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(1, workers),
            open=False,
            timeout=connect_timeout,
            kwargs={"autocommit": False},
            name="xca-gateway-registry",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
            with self._pool.connection() as connection, connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
                cur.execute("CREATE SEQUENCE IF NOT EXISTS registry_object_seq")
                for statement in schema("BYTEA", "BIGINT"):
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO registry_meta (key, value) VALUES ('schema', %s) "
                    "ON CONFLICT (key) DO NOTHING",
                    [SCHEMA_VERSION],
                )
        except BaseException:
            self._pool.close()
            self._executor.shutdown(wait=False)
            raise

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[psycopg.Cursor[Any]]:
        # The pool commits when the block ends normally and rolls back on an exception.
        with self._pool.connection() as connection, connection.cursor() as cur:
            yield cur

    def _lock_suffix(self) -> str:
        return " FOR UPDATE"

    def _allocate_seqs(self, cur: psycopg.Cursor[Any], count: int) -> list[int]:
        cur.execute("SELECT nextval('registry_object_seq') FROM generate_series(1, %s)", [count])
        return sorted(int(row[0]) for row in cur.fetchall())

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, self._unique_violation)

    def _close_connections(self) -> None:
        self._pool.close()
