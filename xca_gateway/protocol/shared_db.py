"""The database the replicas of one community share (``[shared] database``), on PostgreSQL.

One small connection pool per gateway process, used by the shared stores (consent rules, XUA
replay cache, the front doors' study access). Their statements are short and run on loopback
or a LAN, so they are issued from the caller's thread; the pool bounds how many run at once.

:meth:`SharedDatabase.probe` is what ``/readyz`` reports: a replica that cannot reach the shared
database must leave the balancer's rotation rather than decide alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

# Seconds a statement waits for a pooled connection (or a new one) before it fails: short, as
# statements are issued from the event loop.
STATEMENT_CHECKOUT_TIMEOUT = 2.0
# Serializes schema creation when several replicas start at once (an arbitrary constant).
_SCHEMA_LOCK = 0x58434153


class SharedDatabaseError(Exception):
    """The shared database could not be reached or refused a statement."""


class SharedDatabase:
    """A psycopg connection pool and the schema of each shared store."""

    def __init__(self, conninfo: str, *, max_size: int = 8, connect_timeout: float = 10.0) -> None:
        # local: the PostgreSQL driver and its pool (~8 MB of RSS) load only where a
        # deployment has a shared database
        import psycopg
        from psycopg_pool import ConnectionPool

        self.conninfo = conninfo
        self.connect_timeout = connect_timeout
        self._pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(1, max_size),
            open=False,
            timeout=connect_timeout,
            kwargs={"autocommit": False, "connect_timeout": max(1, int(connect_timeout))},
            name="xca-gateway-shared",
            # A connection broken by a database restart is found and replaced before use.
            check=ConnectionPool.check_connection,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg.Error as exc:  # PoolTimeout included: nothing answered in time
            self._pool.close()
            raise SharedDatabaseError(f"shared database unreachable: {exc}") from exc
        self._healthy = True
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor in one transaction: committed when the block ends, rolled back on error.
        Database failures surface as :class:`SharedDatabaseError`."""
        if not self._healthy:
            # Known down (the last probe or statement failed): answer at once rather than
            # hold the caller, often the event loop, for a connection timeout per request.
            # The probe behind /readyz (every 2 s) marks it healthy again.
            raise SharedDatabaseError("shared database unreachable (last probe failed)")
        # local: loaded by __init__ already (a dictionary look-up), kept out of module level
        import psycopg

        try:
            with (
                self._pool.connection(timeout=STATEMENT_CHECKOUT_TIMEOUT) as connection,
                connection.cursor() as cur,
            ):
                yield cur
        except psycopg.Error as exc:  # PoolTimeout (no connection in time) is one too
            if isinstance(exc, psycopg.OperationalError):
                self._set_healthy(False)
            raise SharedDatabaseError(f"shared database: {exc}") from exc

    def create_schema(self, statements: list[str]) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements once across replicas starting at once."""
        with self.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
            for statement in statements:
                cur.execute(statement)

    def _set_healthy(self, value: bool) -> None:
        with self._lock:
            changed = self._healthy != value
            self._healthy = value
        if changed:
            (log.info if value else log.warning)(
                "shared database %s", "reachable again" if value else "unreachable"
            )

    @property
    def healthy(self) -> bool:
        """What the last probe or statement said."""
        return self._healthy

    def probe(self, timeout: float = 2.0) -> bool:
        """``SELECT 1`` on a pooled connection within ``timeout``; updates :attr:`healthy`."""
        try:
            with self._pool.connection(timeout=timeout) as connection:
                connection.execute("SELECT 1")
        except Exception as exc:  # any failure means "not ready", never a crash of /readyz
            log.debug("shared database probe failed: %s", exc)
            self._set_healthy(False)
            return False
        self._set_healthy(True)
        return True

    def close(self) -> None:
        self._pool.close()
