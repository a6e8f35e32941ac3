"""The local patient directory: this community's patients and their demographics (SQLite).

XCPD (ITI-55) needs demographics on both sides: the Initiating Gateway sends the demographics of
the local patient it wants to find elsewhere, the Responding Gateway matches incoming
demographics against its own patients. This directory is the embedded store for both; the
importer and the demo fill it from DICOM headers (:meth:`PatientDirectory.register_from_dicom`).

Matching is deliberately deterministic, no fuzzy scoring: patient identity errors are
dangerous, and a federation partner must be able to predict our answer.

* exact identifier: a supplied identifier equals a registered (authority, id) → score 100;
* family + given name + birth date + administrative gender all equal → score 100, where names
  compare case-, diacritics- and punctuation-insensitively (``Søren-Åke`` = ``soren ake``);
* the same but with the gender unknown on one side → score 60 (:data:`SCORE_WITHOUT_GENDER`),
  below :data:`MATCH_THRESHOLD`: not an answer, but a reason to ask for the gender (XCPD's
  "more attributes requested").
"""

from __future__ import annotations

import re
import sqlite3
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from xca_gateway.xds.patient_id import PatientId

SCORE_IDENTIFIER = 100
SCORE_DEMOGRAPHICS = 100
SCORE_WITHOUT_GENDER = 60
# Matches at or above this score are answers; below it they only hint at what is missing.
MATCH_THRESHOLD = 90

# HL7 v3 AdministrativeGender (2.16.840.1.113883.5.1): F, M, UN (undifferentiated).
GENDERS = frozenset({"F", "M", "UN"})

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DATE = re.compile(r"^[0-9]{8}$")

# Letters that Unicode does not decompose into base letter + combining mark.
_FOLD = str.maketrans(
    {
        "ø": "o",
        "æ": "ae",
        "œ": "oe",
        "ß": "ss",
        "ł": "l",
        "đ": "d",
        "ð": "d",
        "þ": "th",
        "ı": "i",
        "ħ": "h",
    }
)
_APOSTROPHES = str.maketrans("", "", "'’`´")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def name_key(text: str | None) -> str:
    """Comparison key of a name: case, diacritics, apostrophes and separators ignored."""
    if not text:
        return ""
    folded = text.casefold().translate(_FOLD).translate(_APOSTROPHES)
    decomposed = unicodedata.normalize("NFKD", folded)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NON_ALNUM.sub(" ", bare.translate(_FOLD)).strip()


def normalize_gender(value: str | None) -> str | None:
    """HL7 v3 gender code from HL7 v3 or DICOM (PatientSex M/F/O) values; None if unknown."""
    code = (value or "").strip().upper()
    if code in ("M", "F"):
        return code
    if code in ("UN", "O"):  # DICOM O(ther) has no closer HL7 v3 code than UN
        return "UN"
    return None


def normalize_birth_date(value: str | None) -> str | None:
    """YYYYMMDD from an HL7 TS or DICOM DA; None when the day is not known."""
    text = (value or "").strip().replace("-", "")
    return text[:8] if len(text) >= 8 and _DATE.match(text[:8]) else None


@dataclass(frozen=True)
class Address:
    street: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None

    def is_empty(self) -> bool:
        return not any((self.street, self.city, self.state, self.postal_code, self.country))


@dataclass(frozen=True)
class Demographics:
    """What is known of a person. For matching, ``identifiers`` are ids they are known by."""

    family: str | None = None
    given: str | None = None
    birth_date: str | None = None  # YYYYMMDD
    gender: str | None = None  # M, F, UN
    address: Address | None = None
    phone: str | None = None
    identifiers: tuple[PatientId, ...] = field(default=())

    def can_match(self) -> bool:
        """Enough for the demographic rule (gender may still be asked for)."""
        return bool(name_key(self.family) and name_key(self.given) and self.birth_date)


class Match(NamedTuple):
    patient_id: PatientId
    score: int


@dataclass(frozen=True)
class PatientRecord:
    patient_id: PatientId
    demographics: Demographics


_SCHEMA = """
CREATE TABLE IF NOT EXISTS patient (
    authority TEXT NOT NULL,
    id TEXT NOT NULL,
    family TEXT,
    given TEXT,
    birth_date TEXT,
    gender TEXT,
    street TEXT,
    city TEXT,
    state TEXT,
    postal_code TEXT,
    country TEXT,
    phone TEXT,
    family_key TEXT NOT NULL,
    given_key TEXT NOT NULL,
    PRIMARY KEY (authority, id)
);
CREATE INDEX IF NOT EXISTS patient_demographics ON patient (family_key, birth_date);
"""

_COLUMNS = (
    "authority, id, family, given, birth_date, gender, street, city, state, postal_code, "
    "country, phone"
)


def _record(row: Sequence[Any]) -> PatientRecord:
    address = Address(*row[6:11])
    return PatientRecord(
        PatientId(row[1], row[0]),
        Demographics(
            family=row[2],
            given=row[3],
            birth_date=row[4],
            gender=row[5],
            address=None if address.is_empty() else address,
            phone=row[11],
        ),
    )


class PatientDirectory:
    """This community's patients; thread-safe, for use off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM patient").fetchone()
        return int(row[0])

    def register(self, patient_id: PatientId, demographics: Demographics) -> None:
        """Add or update a patient (the latest demographics win)."""
        if not _OID.match(patient_id.assigning_authority):
            raise ValueError(f"assigning authority {patient_id.assigning_authority!r} is no OID")
        birth_date = normalize_birth_date(demographics.birth_date)
        if demographics.birth_date and birth_date is None:
            raise ValueError(f"birth date {demographics.birth_date!r} is not YYYYMMDD")
        address = demographics.address or Address()
        row = (
            patient_id.assigning_authority,
            patient_id.id,
            demographics.family or None,
            demographics.given or None,
            birth_date,
            normalize_gender(demographics.gender),
            address.street,
            address.city,
            address.state,
            address.postal_code,
            address.country,
            demographics.phone or None,
            name_key(demographics.family),
            name_key(demographics.given),
        )
        with self._lock, self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO patient ({_COLUMNS}, family_key, given_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def lookup(self, patient_id: PatientId) -> Demographics | None:
        record = self.record(patient_id)
        return record.demographics if record is not None else None

    def record(self, patient_id: PatientId) -> PatientRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM patient WHERE authority = ? AND id = ?",
                (patient_id.assigning_authority, patient_id.id),
            ).fetchone()
        return _record(row) if row else None

    def match(
        self, demographics: Demographics, *, minimum_score: int = MATCH_THRESHOLD
    ) -> list[Match]:
        """Patients matching ``demographics`` by the rules above, best first."""
        scores: dict[PatientId, int] = {}
        with self._lock:
            for pid in demographics.identifiers:
                row = self._db.execute(
                    "SELECT id FROM patient WHERE authority = ? AND id = ?",
                    (pid.assigning_authority, pid.id),
                ).fetchone()
                if row:
                    scores[pid] = SCORE_IDENTIFIER
            if demographics.can_match():
                rows = self._db.execute(
                    "SELECT authority, id, gender FROM patient "
                    "WHERE family_key = ? AND given_key = ? AND birth_date = ?",
                    (
                        name_key(demographics.family),
                        name_key(demographics.given),
                        normalize_birth_date(demographics.birth_date),
                    ),
                ).fetchall()
                wanted = normalize_gender(demographics.gender)
                for authority, pid_text, gender in rows:
                    if wanted is not None and gender is not None:
                        if wanted != gender:
                            continue
                        score = SCORE_DEMOGRAPHICS
                    else:
                        score = SCORE_WITHOUT_GENDER
                    pid = PatientId(pid_text, authority)
                    scores[pid] = max(score, scores.get(pid, 0))
        matches = [Match(pid, s) for pid, s in scores.items() if s >= minimum_score]
        matches.sort(key=lambda m: (-m.score, m.patient_id.assigning_authority, m.patient_id.id))
        return matches

    def register_from_dicom(self, ds: Any, default_authority: str) -> PatientId:
        """Register the patient of a DICOM dataset (headers only); returns their id."""
        patient_id, demographics = demographics_from_dicom(ds, default_authority)
        self.register(patient_id, demographics)
        return patient_id


def _dicom_text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip()


def _dicom_issuer(ds: Any) -> str | None:
    """The issuer OID: IssuerOfPatientIDQualifiersSequence (ISO) first, then IssuerOfPatientID."""
    for item in ds.get("IssuerOfPatientIDQualifiersSequence", None) or []:
        entity = str(item.get("UniversalEntityID", "") or "").strip()
        kind = str(item.get("UniversalEntityIDType", "ISO") or "ISO").strip()
        if entity and kind == "ISO" and _OID.match(entity):
            return entity
    issuer = _dicom_text(ds, "IssuerOfPatientID")
    return issuer if _OID.match(issuer) else None


def demographics_from_dicom(ds: Any, default_authority: str) -> tuple[PatientId, Demographics]:
    """PatientID/issuer and demographics from DICOM patient-module attributes (pydicom)."""
    pid = _dicom_text(ds, "PatientID")
    if not pid:
        raise ValueError("the DICOM dataset has no PatientID")
    if any(c in pid for c in "^&~\\"):
        raise ValueError(f"PatientID {pid!r} contains HL7 delimiter characters")
    authority = _dicom_issuer(ds) or default_authority
    family = given = None
    name = ds.get("PatientName", None)
    if name is not None and str(name):
        # pydicom PersonName: alphabetic group, components Family^Given^Middle^Prefix^Suffix.
        family = (getattr(name, "family_name", "") or "").strip() or None
        given = (getattr(name, "given_name", "") or "").strip() or None
    street = _dicom_text(ds, "PatientAddress") or None
    phone = _dicom_text(ds, "PatientTelephoneNumbers") or None
    return PatientId(pid, authority), Demographics(
        family=family,
        given=given,
        birth_date=normalize_birth_date(_dicom_text(ds, "PatientBirthDate")),
        gender=normalize_gender(_dicom_text(ds, "PatientSex")),
        address=Address(street=street) if street else None,
        phone=phone,
    )
