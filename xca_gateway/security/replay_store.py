"""The XUA replay cache shared by the replicas of a community, in PostgreSQL.

An assertion ID used on any replica is refused on all: the first use is one
``INSERT ... ON CONFLICT DO NOTHING`` (the primary key decides between two replicas racing
with the same assertion), kept until the assertion expires. Expired rows are swept now and
then by whichever replica happens to insert; an expired row of the same ID is replaced.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from xca_gateway.protocol.shared_db import SharedDatabase, SharedDatabaseError
from xca_gateway.security.xua import ReplayCheckUnavailable

log = logging.getLogger(__name__)

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS xua_replay ("
    " issuer TEXT NOT NULL, assertion_id TEXT NOT NULL, expires_at TIMESTAMPTZ NOT NULL,"
    " PRIMARY KEY (issuer, assertion_id))",
    "CREATE INDEX IF NOT EXISTS xua_replay_expiry ON xua_replay (expires_at)",
]
# Sweep expired rows once per this many assertions recorded by this replica.
SWEEP_EVERY = 1000


class PostgresReplayCache:
    """:class:`~xca_gateway.security.xua.ReplayGuard` on the shared database."""

    def __init__(self, database: SharedDatabase) -> None:
        self.database = database
        database.create_schema(SCHEMA)
        self._count = 0
        self._lock = threading.Lock()

    def check_and_add(
        self, issuer: str, assertion_id: str, expires: datetime, now: datetime
    ) -> bool:
        with self._lock:
            self._count += 1
            sweep = self._count % SWEEP_EVERY == 0
        try:
            with self.database.transaction() as cur:
                # An expired use of the same ID no longer counts (as in the in-memory cache).
                cur.execute(
                    "DELETE FROM xua_replay WHERE issuer = %s AND assertion_id = %s "
                    "AND expires_at <= %s",
                    [issuer, assertion_id, now],
                )
                cur.execute(
                    "INSERT INTO xua_replay (issuer, assertion_id, expires_at) "
                    "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    [issuer, assertion_id, expires],
                )
                fresh = cur.rowcount == 1
                if sweep:
                    cur.execute("DELETE FROM xua_replay WHERE expires_at <= %s", [now])
        except SharedDatabaseError as exc:
            log.warning("XUA replay check failed: %s", exc)
            raise ReplayCheckUnavailable(str(exc)) from None
        return fresh

    async def check_and_add_async(
        self, issuer: str, assertion_id: str, expires: datetime, now: datetime
    ) -> bool:
        """:meth:`check_and_add` off the event loop, within the database's deadline."""
        try:
            return await self.database.run(self.check_and_add, issuer, assertion_id, expires, now)
        except SharedDatabaseError as exc:  # no answer in time (a refusal comes as the other)
            log.warning("XUA replay check failed: %s", exc)
            raise ReplayCheckUnavailable(str(exc)) from None

    def __len__(self) -> int:
        with self.database.transaction() as cur:
            cur.execute("SELECT count(*) FROM xua_replay")
            row = cur.fetchone()
        return int(row[0]) if row else 0
