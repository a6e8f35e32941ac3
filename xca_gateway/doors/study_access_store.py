"""The front doors' study access shared by the replicas of a community (``[shared] database``).

A search through replica A grants its caller the studies it found; the caller's next request,
naming a study alone, may land on replica B, which must honour the same grant (and only for
that caller). The grants are the small :class:`~xca_gateway.doors.federation.StudyGrant`
records; the manifests stay a per-replica cache (B fetches again through the patient the grant
records).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from xca_gateway.doors.federation import StudyAccessUnavailable, StudyGrant
from xca_gateway.protocol.shared_db import SharedDatabase, SharedDatabaseError

log = logging.getLogger(__name__)

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS study_access ("
    " principal TEXT NOT NULL, study_instance_uid TEXT NOT NULL, patient_id TEXT NOT NULL,"
    " expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (principal, study_instance_uid))",
    "CREATE INDEX IF NOT EXISTS study_access_expiry ON study_access (expires_at)",
]
SWEEP_EVERY = 500


class PostgresStudyAccess:
    """:class:`~xca_gateway.doors.federation.StudyAccessStore` on the shared database.

    A database out of reach grants nothing and finds nothing: the caller names the patient
    again (served correctly), never a study it was not granted. The front doors use the async
    methods (the database's threads, its deadline); a lookup that cannot be answered there is
    :class:`StudyAccessUnavailable` (a 503), not "not granted" (a 404 would mislead)."""

    def __init__(self, database: SharedDatabase) -> None:
        self.database = database
        database.create_schema(SCHEMA)
        self._count = 0
        self._lock = threading.Lock()

    def grant(self, grants: Sequence[StudyGrant]) -> None:
        if not grants:
            return
        with self._lock:
            self._count += 1
            sweep = self._count % SWEEP_EVERY == 0
        try:
            with self.database.transaction() as cur:
                rows = [
                    (g.principal, g.study_instance_uid, g.patient_id, g.expires_at) for g in grants
                ]
                cur.executemany(
                    "INSERT INTO study_access VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (principal, study_instance_uid) DO UPDATE SET "
                    "patient_id = excluded.patient_id, expires_at = excluded.expires_at",
                    rows,
                )
                if sweep:
                    now = min(g.expires_at for g in grants)
                    cur.execute("DELETE FROM study_access WHERE expires_at <= %s - 86400", [now])
        except SharedDatabaseError as exc:
            log.warning("study access not recorded: %s", exc)

    async def grant_async(self, grants: Sequence[StudyGrant]) -> None:
        if not grants:
            return
        try:
            await self.database.run(self.grant, grants)
        except SharedDatabaseError as exc:  # no answer in time
            log.warning("study access not recorded: %s", exc)

    def granted(
        self, principal: str, study_instance_uids: Sequence[str], now: float
    ) -> list[StudyGrant]:
        try:
            return self._granted(principal, study_instance_uids, now)
        except SharedDatabaseError as exc:
            log.warning("study access not read: %s", exc)
            return []

    async def granted_async(
        self, principal: str, study_instance_uids: Sequence[str], now: float
    ) -> list[StudyGrant]:
        try:
            return await self.database.run(self._granted, principal, study_instance_uids, now)
        except SharedDatabaseError as exc:
            log.warning("study access not read: %s", exc)
            raise StudyAccessUnavailable(str(exc)) from None

    def _granted(
        self, principal: str, study_instance_uids: Sequence[str], now: float
    ) -> list[StudyGrant]:
        uids = list(dict.fromkeys(study_instance_uids))
        if not uids:
            return []
        with self.database.transaction() as cur:
            cur.execute(
                "SELECT study_instance_uid, patient_id, expires_at FROM study_access "
                "WHERE principal = %s AND study_instance_uid = ANY(%s) AND expires_at > %s",
                [principal, uids, now],
            )
            rows = {r[0]: StudyGrant(principal, r[0], r[1], float(r[2])) for r in cur}
        return [rows[u] for u in uids if u in rows]
