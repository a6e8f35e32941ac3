"""The database the replicas of one community share (``[shared] database``), on PostgreSQL.

One small connection pool per gateway process, used by the shared stores (consent rules, XUA
replay cache, the front doors' study access). Async code never calls them on the event loop:
:meth:`SharedDatabase.run` hands the blocking call to this module's own bounded thread pool
and waits at most :attr:`SharedDatabase.deadline` for it, so a slow or unreachable database
costs its own callers that long and nobody else anything (not the default executor's threads
either, which file reads and the audit need). Each statement also carries a server-side
``statement_timeout``; a server that does not even answer that (stopped, partitioned) is what
the client-side deadline is for. Threads (pynetdicom's, the CLI) may use the synchronous
:meth:`SharedDatabase.transaction` directly.

:meth:`SharedDatabase.probe` is what ``/readyz`` reports: a replica that cannot reach the shared
database must leave the balancer's rotation rather than decide alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

# Seconds a statement waits for a pooled connection (or a new one) before it fails.
STATEMENT_CHECKOUT_TIMEOUT = 2.0
# Server-side limit of one statement (lock waits included), seconds.
DEFAULT_STATEMENT_TIMEOUT = 5.0
# What the client adds to checkout + statement time before it gives up on a call (round trips,
# the commit).
_DEADLINE_MARGIN = 1.0
# Serializes schema creation when several replicas start at once (an arbitrary constant).
_SCHEMA_LOCK = 0x58434153


T = TypeVar("T")


class SharedDatabaseError(Exception):
    """The shared database could not be reached, refused a statement or did not answer in time."""


class SharedDatabase:
    """A psycopg connection pool and the schema of each shared store."""

    def __init__(
        self,
        conninfo: str,
        *,
        max_size: int = 8,
        connect_timeout: float = 10.0,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        # local: the PostgreSQL driver and its pool (~8 MB of RSS) load only where a
        # deployment has a shared database
        import psycopg
        from psycopg_pool import ConnectionPool

        self.conninfo = conninfo
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        # How long an async caller waits for one call, queueing for a thread included.
        self.deadline = STATEMENT_CHECKOUT_TIMEOUT + statement_timeout + _DEADLINE_MARGIN
        self._healthy = True
        self._lock = threading.Lock()
        # As many threads as connections: a call never holds a thread waiting for a connection
        # another thread of ours has. A stalled database can hold them all, and then later
        # calls wait in this executor's queue until their deadline: bounded, and nobody else's.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, max_size), thread_name_prefix="shared-db"
        )
        self._probing: asyncio.Future[bool] | None = None
        self._pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(1, max_size),
            open=False,
            timeout=connect_timeout,
            kwargs={"autocommit": False, "connect_timeout": max(1, int(connect_timeout))},
            name="xca-gateway-shared",
            configure=self._configure,
            # A connection broken by a database restart is found and replaced before use.
            check=ConnectionPool.check_connection,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg.Error as exc:  # PoolTimeout included: nothing answered in time
            self._pool.close()
            self._executor.shutdown(wait=False)
            raise SharedDatabaseError(f"shared database unreachable: {exc}") from exc

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        """Every pooled connection: no statement (lock waits included) runs longer than the
        statement timeout, whatever the database's own default."""
        milliseconds = max(1, int(self.statement_timeout * 1000))
        connection.execute(f"SET statement_timeout = {milliseconds}")
        connection.commit()

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` (blocking, e.g. a store method using :meth:`transaction`) on this
        database's threads, for async code: the event loop never waits on the database.

        Raises :class:`SharedDatabaseError` if the call does not return within
        :attr:`deadline`; the database is then marked unhealthy (later calls fail at once until
        the probe finds it again), and the abandoned call, if it ever gets a thread, is dropped.
        The caller's context variables go with the call."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        future = loop.run_in_executor(self._executor, context.run, call, *args)
        try:
            async with asyncio.timeout(self.deadline):
                return await future
        except TimeoutError:
            self._set_healthy(False)
            raise SharedDatabaseError(
                f"shared database did not answer within {self.deadline:g} s"
            ) from None

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
        """``SELECT 1`` on a pooled connection within ``timeout``; updates :attr:`healthy`.
        Blocking: async code uses :meth:`probe_async`."""
        try:
            with self._pool.connection(timeout=timeout) as connection:
                connection.execute("SELECT 1")
        except Exception as exc:  # any failure means "not ready", never a crash of /readyz
            log.debug("shared database probe failed: %s", exc)
            self._set_healthy(False)
            return False
        self._set_healthy(True)
        return True

    async def probe_async(self, timeout: float = 2.0) -> bool:
        """:meth:`probe` on a thread of its own, waited for at most ``timeout`` (+ a margin).

        A probe stuck on a stopped server is not abandoned for a new one every time: while it
        is still pending the database is reported unhealthy, so the probe costs one thread at
        most."""
        if self._probing is None or self._probing.done():
            loop = asyncio.get_running_loop()
            # Not self._executor: a probe must not queue behind the calls that stalled.
            self._probing = loop.run_in_executor(None, self.probe, timeout)
        try:
            async with asyncio.timeout(timeout + _DEADLINE_MARGIN):
                return await asyncio.shield(self._probing)
        except TimeoutError:
            self._set_healthy(False)
            return False

    def close(self) -> None:
        # Threads stuck on a stalled server are not waited for (the pool's close ends their
        # connections).
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.close()
