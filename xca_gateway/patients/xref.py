"""The cross-reference of patient identifiers: the same person's ids in several domains (SQLite)."""

from __future__ import annotations

import csv
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from xca_gateway.xds.patient_id import PatientId, PatientIdError, parse_patient_id

log = logging.getLogger(__name__)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS xref (
    person INTEGER NOT NULL,
    id TEXT NOT NULL,
    authority TEXT NOT NULL,
    PRIMARY KEY (authority, id)
);
CREATE INDEX IF NOT EXISTS xref_person ON xref (person, authority);
"""


class CrossReferenceTable:
    """Identifiers of the same person, grouped; thread-safe, for use off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def link(self, identifiers: Sequence[PatientId]) -> None:
        """Record that ``identifiers`` name one person (merging groups they already belong to)."""
        if not identifiers:
            return
        with self._lock, self._db:
            persons = {
                row[0]
                for pid in identifiers
                for row in self._db.execute(
                    "SELECT person FROM xref WHERE authority = ? AND id = ?",
                    (pid.assigning_authority, pid.id),
                )
            }
            if persons:
                person = min(persons)
                for other in persons - {person}:
                    self._db.execute("UPDATE xref SET person = ? WHERE person = ?", (person, other))
            else:
                row = self._db.execute("SELECT COALESCE(MAX(person), 0) + 1 FROM xref").fetchone()
                person = int(row[0])
            for pid in identifiers:
                self._db.execute(
                    "INSERT OR REPLACE INTO xref (person, id, authority) VALUES (?, ?, ?)",
                    (person, pid.id, pid.assigning_authority),
                )

    def lookup(self, patient: PatientId, authority: str) -> PatientId | None:
        with self._lock:
            row = self._db.execute(
                "SELECT b.id FROM xref a JOIN xref b ON a.person = b.person "
                "WHERE a.authority = ? AND a.id = ? AND b.authority = ?",
                (patient.assigning_authority, patient.id, authority),
            ).fetchone()
        return PatientId(row[0], authority) if row else None

    def identifiers(self, patient: PatientId) -> list[PatientId]:
        """Every identifier of ``patient``'s person, itself included; [] if unknown."""
        with self._lock:
            rows = self._db.execute(
                "SELECT b.id, b.authority FROM xref a JOIN xref b ON a.person = b.person "
                "WHERE a.authority = ? AND a.id = ? ORDER BY b.authority, b.id",
                (patient.assigning_authority, patient.id),
            ).fetchall()
        return [PatientId(row[0], row[1]) for row in rows]

    def knows_authority(self, authority: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM xref WHERE authority = ? LIMIT 1", (authority,)
            ).fetchone()
        return row is not None

    def conflict(self, known: PatientId, other: PatientId) -> tuple[PatientId, PatientId] | None:
        """Why ``known`` and ``other`` cannot be the same person, if the table says so.

        They cannot when either is already linked to a *different* id of the other's domain:
        linking them would merge two people of that domain. Returns that existing link.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT a.authority, a.id, b.authority, b.id FROM xref a "
                "JOIN xref b ON a.person = b.person "
                "WHERE ((a.authority = ? AND a.id = ?) OR (a.authority = ? AND a.id = ?)) "
                "AND b.authority IN (?, ?)",
                (
                    known.assigning_authority,
                    known.id,
                    other.assigning_authority,
                    other.id,
                    known.assigning_authority,
                    other.assigning_authority,
                ),
            ).fetchall()
        for a_authority, a_id, b_authority, b_id in rows:
            source = PatientId(a_id, a_authority)
            linked = PatientId(b_id, b_authority)
            partner = other if source == known else known
            if linked.assigning_authority == partner.assigning_authority and linked != partner:
                return source, linked
        return None

    def link_if_consistent(self, known: PatientId, other: PatientId) -> bool:
        """Link two ids unless :meth:`conflict` objects (for correlations learned from the
        network: a PIX / XCPD answer must not silently merge two people of one domain)."""
        found = self.conflict(known, other)
        if found is not None:
            log.warning(
                "not linking %s with %s: %s is already linked with %s", known, other, *found
            )
            return False
        self.link([known, other])
        return True

    def load_csv(self, path: Path) -> int:
        """Load a CSV file; returns the number of persons read. Bad lines raise, naming the line."""
        count = 0
        with path.open(newline="", encoding="utf-8") as fh:
            for number, row in enumerate(csv.reader(fh), start=1):
                cells = [c.strip() for c in row if c.strip()]
                if not cells or cells[0].startswith("#"):
                    continue
                try:
                    self.link([parse_patient_id(c) for c in cells])
                except PatientIdError as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from None
                count += 1
        return count
