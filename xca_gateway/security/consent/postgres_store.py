"""Consent rules in the database the replicas of a community share (``[shared] database``).

The same rules, history and decisions as the embedded SQLite store
(:class:`~xca_gateway.security.consent.service.ConsentStore`), read through on every request:
no cache, so a change made through one replica applies on every replica at the next request.
A change reads the rule it replaces and writes the new one in one transaction (row lock), so
two replicas changing the same rule at once both leave a true history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from xca_gateway.protocol.shared_db import SharedDatabase, SharedDatabaseError
from xca_gateway.security.consent.service import (
    ANY,
    MODES,
    ConsentError,
    ConsentRule,
    ConsentStoreUnavailable,
    normalize_patient_id,
    now_text,
    rule_key,
)

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS consent_rule ("
    " patient_id TEXT NOT NULL, community TEXT NOT NULL, class_code TEXT NOT NULL,"
    " confidentiality_code TEXT NOT NULL,"
    " mode TEXT NOT NULL CHECK (mode IN ('opt-in', 'opt-out')),"
    " created_at TEXT NOT NULL, updated_at TEXT NOT NULL, note TEXT,"
    " PRIMARY KEY (patient_id, community, class_code, confidentiality_code))",
    "CREATE TABLE IF NOT EXISTS consent_event ("
    " seq BIGSERIAL PRIMARY KEY, at TEXT NOT NULL, action TEXT NOT NULL,"
    " patient_id TEXT NOT NULL, community TEXT NOT NULL, class_code TEXT NOT NULL,"
    " confidentiality_code TEXT NOT NULL, mode TEXT, note TEXT, actor TEXT)",
    "CREATE INDEX IF NOT EXISTS consent_event_patient ON consent_event (patient_id, seq)",
]

T = TypeVar("T")

_WHERE_KEY = "patient_id = %s AND community = %s AND class_code = %s AND confidentiality_code = %s"


def _rule(row: dict[str, Any]) -> ConsentRule:
    return ConsentRule(
        patient_id=row["patient_id"],
        mode=row["mode"],
        community=row["community"],
        class_code=row["class_code"],
        confidentiality_code=row["confidentiality_code"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        note=row["note"],
    )


class PostgresConsentStore:
    """:class:`~xca_gateway.security.consent.service.ConsentRules` on the shared database."""

    def __init__(self, database: SharedDatabase, *, owns_database: bool = False) -> None:
        self.database = database
        # The CLI opens a database for this store alone; a gateway shares its own.
        self.owns_database = owns_database
        try:
            database.create_schema(SCHEMA)
        except SharedDatabaseError as exc:
            raise ConsentStoreUnavailable(str(exc)) from None

    def close(self) -> None:
        """Closes the database only if it is this store's own (else the gateway's)."""
        if self.owns_database:
            self.database.close()

    async def offload(self, call: Callable[..., T], *args: Any) -> T:
        # The shared database's own threads, within its deadline: a stalled database holds
        # the requests that need consent, and no other.
        try:
            return await self.database.run(call, *args)
        except SharedDatabaseError as exc:
            raise ConsentStoreUnavailable(str(exc)) from None

    def _run(self, statements: Any) -> Any:
        # local: psycopg loads only with a shared database (SharedDatabase opened it already)
        from psycopg.rows import dict_row

        try:
            with self.database.transaction() as cur:
                cur.row_factory = dict_row
                return statements(cur)
        except SharedDatabaseError as exc:
            raise ConsentStoreUnavailable(str(exc)) from None

    def set(
        self,
        patient_id: str,
        mode: str,
        *,
        community: str = ANY,
        class_code: str = ANY,
        confidentiality_code: str = ANY,
        note: str | None = None,
        actor: str | None = None,
    ) -> ConsentRule:
        return self.change(
            patient_id,
            mode,
            community=community,
            class_code=class_code,
            confidentiality_code=confidentiality_code,
            note=note,
            actor=actor,
        )[1]

    def change(
        self,
        patient_id: str,
        mode: str,
        *,
        community: str = ANY,
        class_code: str = ANY,
        confidentiality_code: str = ANY,
        note: str | None = None,
        actor: str | None = None,
    ) -> tuple[ConsentRule | None, ConsentRule]:
        if mode not in MODES:
            raise ConsentError(f"mode must be opt-in or opt-out, not {mode!r}")
        key = rule_key(patient_id, community, class_code, confidentiality_code)
        now = now_text()

        def statements(cur: Any) -> tuple[ConsentRule | None, ConsentRule]:
            cur.execute(f"SELECT * FROM consent_rule WHERE {_WHERE_KEY} FOR UPDATE", key)
            before = cur.fetchone()
            cur.execute(
                "INSERT INTO consent_rule VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (patient_id, community, class_code, confidentiality_code) "
                "DO UPDATE SET mode = excluded.mode, updated_at = excluded.updated_at, "
                "note = excluded.note RETURNING *",
                (*key, mode, now, now, note),
            )
            row = cur.fetchone()
            cur.execute(
                "INSERT INTO consent_event (at, action, patient_id, community, class_code, "
                "confidentiality_code, mode, note, actor) "
                "VALUES (%s, 'set', %s, %s, %s, %s, %s, %s, %s)",
                (now, *key, mode, note, actor),
            )
            return (_rule(before) if before is not None else None), _rule(row)

        result: tuple[ConsentRule | None, ConsentRule] = self._run(statements)
        return result

    def revoke(
        self,
        patient_id: str,
        *,
        community: str | None = None,
        class_code: str | None = None,
        confidentiality_code: str | None = None,
        actor: str | None = None,
    ) -> int:
        return len(
            self.revoke_rules(
                patient_id,
                community=community,
                class_code=class_code,
                confidentiality_code=confidentiality_code,
                actor=actor,
            )
        )

    def revoke_rules(
        self,
        patient_id: str,
        *,
        community: str | None = None,
        class_code: str | None = None,
        confidentiality_code: str | None = None,
        actor: str | None = None,
    ) -> list[ConsentRule]:
        clauses = ["patient_id = %s"]
        params: list[str] = [normalize_patient_id(patient_id)]
        for column, value in (
            ("community", community),
            ("class_code", class_code),
            ("confidentiality_code", confidentiality_code),
        ):
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value.strip())
        where = " AND ".join(clauses)
        now = now_text()

        def statements(cur: Any) -> list[ConsentRule]:
            cur.execute(f"DELETE FROM consent_rule WHERE {where} RETURNING *", params)
            rows = cur.fetchall()
            for row in rows:
                cur.execute(
                    "INSERT INTO consent_event (at, action, patient_id, community, class_code, "
                    "confidentiality_code, mode, note, actor) "
                    "VALUES (%s, 'revoke', %s, %s, %s, %s, %s, NULL, %s)",
                    (
                        now,
                        row["patient_id"],
                        row["community"],
                        row["class_code"],
                        row["confidentiality_code"],
                        row["mode"],
                        actor,
                    ),
                )
            return [_rule(r) for r in rows]

        result: list[ConsentRule] = self._run(statements)
        return result

    def rules_for(self, patient_id: str) -> list[ConsentRule]:
        try:
            key = normalize_patient_id(patient_id)
        except ConsentError:
            return []

        def statements(cur: Any) -> list[ConsentRule]:
            cur.execute(
                "SELECT * FROM consent_rule WHERE patient_id = %s "
                "ORDER BY community, class_code, confidentiality_code",
                (key,),
            )
            return [_rule(r) for r in cur.fetchall()]

        result: list[ConsentRule] = self._run(statements)
        return result

    def list_rules(self, limit: int = 1000, offset: int = 0) -> list[ConsentRule]:
        def statements(cur: Any) -> list[ConsentRule]:
            cur.execute(
                "SELECT * FROM consent_rule ORDER BY patient_id, community, class_code, "
                "confidentiality_code LIMIT %s OFFSET %s",
                (limit, offset),
            )
            return [_rule(r) for r in cur.fetchall()]

        result: list[ConsentRule] = self._run(statements)
        return result

    def history(self, patient_id: str) -> list[dict[str, Any]]:
        key = normalize_patient_id(patient_id)

        def statements(cur: Any) -> list[dict[str, Any]]:
            cur.execute(
                "SELECT at, action, community, class_code, confidentiality_code, mode, note, "
                "actor FROM consent_event WHERE patient_id = %s ORDER BY seq",
                (key,),
            )
            return [dict(r) for r in cur.fetchall()]

        result: list[dict[str, Any]] = self._run(statements)
        return result
