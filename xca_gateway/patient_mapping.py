"""Patient-ID mapping for the initiating gateway: the consumer's local id → each peer's id.

Sources are tried per peer in the configured order. Implemented: ``xref``, an embedded
cross-reference table (SQLite) loadable from CSV. A peer without a configured assigning
authority is taken to share our patient identifier domain (an affinity-domain-wide MPI), and
receives the id unchanged.

CSV format: one person per line, every identifier of that person in CX form, comma separated;
lines starting with ``#`` are comments::

    C01-1001^^^&1.3.6.1.4.1.21367.13.20.1000&ISO,C02-2001^^^&1.3.6.1.4.1.21367.13.20.2000&ISO
"""

from __future__ import annotations

import asyncio
import csv
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from xca_gateway.patient_id import PatientId, PatientIdError, parse_patient_id

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


class PatientIdMapper:
    """Map a local patient id to the id a peer community knows the patient by."""

    def __init__(self, xref: CrossReferenceTable | None) -> None:
        self.xref = xref

    async def to_peer(
        self, patient: PatientId, peer_authority: str | None, sources: Iterable[str] = ("xref",)
    ) -> PatientId | None:
        if peer_authority is None or peer_authority == patient.assigning_authority:
            return patient
        for source in sources:
            if source == "xref" and self.xref is not None:
                found = await asyncio.to_thread(self.xref.lookup, patient, peer_authority)
                if found is not None:
                    return found
        return None
