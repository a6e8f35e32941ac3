"""Patient consent to cross-community sharing: an embedded store, the decision, CLI and admin API.

A consent rule says, for one patient, whether documents may be shared (``opt-in``) or not
(``opt-out``) with one requesting community or all of them (``*``), optionally narrowed to a
document classCode and/or confidentialityCode. Where no rule applies, the community's default
mode decides: ``opt-out`` (ELGA: shared unless the patient objected) or ``opt-in`` (HK eHR:
nothing shared without the patient's consent).

Decision (pure, :func:`evaluate`): among the rules that apply, the most specific wins (the number
of fields that are not ``*``); between equally specific rules an opt-out wins. So "opt out of
everything, but share with community B" shares with B, while "share with B" and "never share
psychiatry" together keep psychiatry from B.

Codes in rules are ``code`` (any coding scheme) or ``scheme|code``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from pydantic import Field

from xca_gateway.schema import PathText, Section
from xca_gateway.xds.patient_id import PatientIdError, parse_patient_id

log = logging.getLogger(__name__)

T = TypeVar("T")
ConsentMode = Literal["opt-in", "opt-out"]
MODES: tuple[ConsentMode, ...] = ("opt-in", "opt-out")
ANY = "*"


class ConsentError(ValueError):
    pass


class ConsentStoreUnavailable(Exception):
    """The store could not be read or written (a shared database out of reach)."""


class DocumentCode(NamedTuple):
    code: str
    scheme: str | None = None


CodeLike = DocumentCode | str


def _as_code(value: CodeLike) -> DocumentCode:
    return value if isinstance(value, DocumentCode) else DocumentCode(value)


def code_matches(pattern: str, code: DocumentCode | None) -> bool:
    if pattern == ANY:
        return True
    if code is None:
        return False
    scheme, sep, value = pattern.rpartition("|")
    if not sep:
        return code.code == pattern
    return code.code == value and (not scheme or code.scheme == scheme)


def normalize_patient_id(value: str) -> str:
    """``ID^^^&OID&ISO`` in canonical form (quotes and extra components dropped)."""
    try:
        return str(parse_patient_id(value))
    except PatientIdError as exc:
        raise ConsentError(str(exc)) from None


def _check_community(value: str) -> str:
    value = value.strip()
    if value != ANY and not value.startswith("urn:oid:"):
        raise ConsentError(f"community must be '*' or urn:oid:<OID>, not {value!r}")
    return value


def _check_pattern(value: str, what: str) -> str:
    value = value.strip()
    if not value or value.endswith("|"):
        raise ConsentError(f"{what} must be '*', a code or scheme|code")
    return value


@dataclass(frozen=True)
class ConsentRule:
    patient_id: str
    mode: ConsentMode
    community: str = ANY
    class_code: str = ANY
    confidentiality_code: str = ANY
    created_at: str | None = None
    updated_at: str | None = None
    note: str | None = None

    @property
    def specificity(self) -> int:
        return sum(v != ANY for v in (self.community, self.class_code, self.confidentiality_code))

    def applies(
        self,
        community: str,
        class_code: DocumentCode | None,
        confidentiality_codes: Sequence[DocumentCode],
    ) -> bool:
        if self.community not in (ANY, community):
            return False
        if not code_matches(self.class_code, class_code):
            return False
        if self.confidentiality_code == ANY:
            return True
        return any(code_matches(self.confidentiality_code, c) for c in confidentiality_codes)

    def describe(self) -> str:
        scope = [f"community {self.community}" if self.community != ANY else "all communities"]
        if self.class_code != ANY:
            scope.append(f"classCode {self.class_code}")
        if self.confidentiality_code != ANY:
            scope.append(f"confidentialityCode {self.confidentiality_code}")
        return f"{self.mode} for {', '.join(scope)}" + (
            f" (since {self.updated_at})" if self.updated_at else ""
        )


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    rule: ConsentRule | None = None


def evaluate(
    rules: Iterable[ConsentRule],
    *,
    default_mode: ConsentMode,
    community: str,
    class_code: CodeLike | None = None,
    confidentiality_codes: Iterable[CodeLike] = (),
) -> Verdict:
    """Whether a document (or, with no codes, the patient's record as such) may be shared."""
    cls = _as_code(class_code) if class_code is not None else None
    confs = [_as_code(c) for c in confidentiality_codes]
    applicable = [r for r in rules if r.applies(community, cls, confs)]
    if not applicable:
        allowed = default_mode == "opt-out"
        return Verdict(
            allowed,
            f"no consent rule; community default is {default_mode}",
        )
    best = max(r.specificity for r in applicable)
    winners = [r for r in applicable if r.specificity == best]
    rule = next((r for r in winners if r.mode == "opt-out"), winners[0])
    return Verdict(rule.mode == "opt-in", f"patient consent: {rule.describe()}", rule)


# --------------------------------------------------------------------------- storage


_SCHEMA = """
CREATE TABLE IF NOT EXISTS consent_rule (
    patient_id TEXT NOT NULL,
    community TEXT NOT NULL,
    class_code TEXT NOT NULL,
    confidentiality_code TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('opt-in', 'opt-out')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT,
    PRIMARY KEY (patient_id, community, class_code, confidentiality_code)
);
CREATE TABLE IF NOT EXISTS consent_event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    community TEXT NOT NULL,
    class_code TEXT NOT NULL,
    confidentiality_code TEXT NOT NULL,
    mode TEXT,
    note TEXT,
    actor TEXT
);
"""


class ConsentRules(Protocol):
    """What the service, the CLI and the admin API ask of a consent store: the embedded
    SQLite one (:class:`ConsentStore`) or the database replicas share
    (:class:`xca_gateway.security.consent.postgres_store.PostgresConsentStore`). Both read
    through on every decision: a change made through one replica applies on all at once."""

    def close(self) -> None: ...

    async def offload(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, blocking on this store, run where it cannot hold the event loop
        (and, for a database, within its deadline: :class:`ConsentStoreUnavailable` else)."""
        ...

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
    ) -> ConsentRule: ...

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
    ) -> tuple[ConsentRule | None, ConsentRule]: ...

    def revoke(
        self,
        patient_id: str,
        *,
        community: str | None = None,
        class_code: str | None = None,
        confidentiality_code: str | None = None,
        actor: str | None = None,
    ) -> int: ...

    def revoke_rules(
        self,
        patient_id: str,
        *,
        community: str | None = None,
        class_code: str | None = None,
        confidentiality_code: str | None = None,
        actor: str | None = None,
    ) -> list[ConsentRule]: ...

    def rules_for(self, patient_id: str) -> list[ConsentRule]: ...

    def list_rules(self, limit: int = 1000, offset: int = 0) -> list[ConsentRule]: ...

    def history(self, patient_id: str) -> list[dict[str, Any]]: ...


def rule_key(
    patient_id: str, community: str, class_code: str, confidentiality_code: str
) -> tuple[str, str, str, str]:
    """The checked, canonical primary key of a rule (every store's)."""
    return (
        normalize_patient_id(patient_id),
        _check_community(community),
        _check_pattern(class_code, "class_code"),
        _check_pattern(confidentiality_code, "confidentiality_code"),
    )


def now_text() -> str:
    return _now()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConsentStore:
    """Consent rules in SQLite (WAL), shared safely by the gateway's threads and the CLI."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(consent_event)")}
            if "actor" not in columns:  # a store from before changes named who made them
                self._db.execute("ALTER TABLE consent_event ADD COLUMN actor TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def offload(self, call: Callable[..., T], *args: Any) -> T:
        # A local file: a worker thread is enough (SQLite's own busy timeout bounds it).
        return await asyncio.to_thread(call, *args)

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
        """Record (or replace) the rule for this patient and scope."""
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
        """Record (or replace) the rule; (the rule it replaced or None, the rule now), read and
        written in one transaction. ``actor`` (who made the change) goes into the history."""
        if mode not in MODES:
            raise ConsentError(f"mode must be opt-in or opt-out, not {mode!r}")
        key = (
            normalize_patient_id(patient_id),
            _check_community(community),
            _check_pattern(class_code, "class_code"),
            _check_pattern(confidentiality_code, "confidentiality_code"),
        )
        where = (
            "SELECT * FROM consent_rule WHERE patient_id = ? AND community = ? "
            "AND class_code = ? AND confidentiality_code = ?"
        )
        now = _now()
        with self._lock, self._db:
            before = self._db.execute(where, key).fetchone()
            self._db.execute(
                "INSERT INTO consent_rule VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (patient_id, community, class_code, confidentiality_code) "
                "DO UPDATE SET mode = excluded.mode, updated_at = excluded.updated_at, "
                "note = excluded.note",
                (*key, mode, now, now, note),
            )
            self._db.execute(
                "INSERT INTO consent_event (at, action, patient_id, community, class_code, "
                "confidentiality_code, mode, note, actor) VALUES (?, 'set', ?, ?, ?, ?, ?, ?, ?)",
                (now, *key, mode, note, actor),
            )
            row = self._db.execute(where, key).fetchone()
        return (_rule(before) if before is not None else None), _rule(row)

    def revoke(
        self,
        patient_id: str,
        *,
        community: str | None = None,
        class_code: str | None = None,
        confidentiality_code: str | None = None,
        actor: str | None = None,
    ) -> int:
        """Delete the patient's rules; scope fields given narrow what is deleted."""
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
        """Delete the patient's rules (scope fields given narrow what is deleted); the rules
        deleted, as they were."""
        clauses = ["patient_id = ?"]
        params: list[str] = [normalize_patient_id(patient_id)]
        for column, value in (
            ("community", community),
            ("class_code", class_code),
            ("confidentiality_code", confidentiality_code),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value.strip())
        where = " AND ".join(clauses)
        now = _now()
        with self._lock, self._db:
            rows = self._db.execute(f"SELECT * FROM consent_rule WHERE {where}", params).fetchall()
            self._db.execute(f"DELETE FROM consent_rule WHERE {where}", params)
            for row in rows:
                self._db.execute(
                    "INSERT INTO consent_event (at, action, patient_id, community, class_code, "
                    "confidentiality_code, mode, note, actor) "
                    "VALUES (?, 'revoke', ?, ?, ?, ?, ?, NULL, ?)",
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

    def rules_for(self, patient_id: str) -> list[ConsentRule]:
        try:
            key = normalize_patient_id(patient_id)
        except ConsentError:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM consent_rule WHERE patient_id = ? "
                "ORDER BY community, class_code, confidentiality_code",
                (key,),
            ).fetchall()
        return [_rule(r) for r in rows]

    def list_rules(self, limit: int = 1000, offset: int = 0) -> list[ConsentRule]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM consent_rule ORDER BY patient_id, community, class_code, "
                "confidentiality_code LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [_rule(r) for r in rows]

    def history(self, patient_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT at, action, community, class_code, confidentiality_code, mode, note, "
                "actor FROM consent_event WHERE patient_id = ? ORDER BY seq",
                (normalize_patient_id(patient_id),),
            ).fetchall()
        return [dict(r) for r in rows]


def _rule(row: sqlite3.Row) -> ConsentRule:
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


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ConsentConfig:
    """The ``[consent]`` section."""

    enabled: bool = False
    database: Path | None = None
    default_mode: ConsentMode = "opt-out"
    # Default mode per requesting community, overriding default_mode.
    peer_modes: Mapping[str, ConsentMode] = field(default_factory=dict)
    # Operators of the admin port's /consent API: ``name token`` per line, mode 0600
    # (:mod:`xca_gateway.app.admin`). Absent: the API refuses every request.
    admin_token_file: Path | None = None

    def mode_for(self, community: str) -> ConsentMode:
        return self.peer_modes.get(community, self.default_mode)


class ConsentSection(Section):
    """Patient consent: opt-in / opt-out per patient, per community, per class or
    confidentiality code, managed with `xca-gateway consent ...` and the admin port's /consent
    API."""

    enabled: bool = Field(False, description="Enforce consent on the responding side.")
    database: PathText | None = Field(
        None,
        description="SQLite file of the consents (default: <data_dir>/consent.sqlite3).",
        examples=["../data/north/consent.sqlite3"],
    )
    default_mode: ConsentMode = Field(
        "opt-out", description="What a patient without a consent record gets."
    )
    peer_modes: dict[str, ConsentMode] = Field(
        {},
        description="default_mode per requesting community (homeCommunityId = mode).",
        examples=[{"urn:oid:1.3.6.1.4.1.21367.13.70.2": "opt-in"}],
    )
    admin_token_file: PathText | None = Field(
        None,
        description=(
            "Operators of the /consent API: 'operator-name token' per line (tokens of 32+"
            " characters), mode 0600; each change is audited under the operator's name. Absent:"
            " the API refuses every request."
        ),
        examples=["/etc/xca-gateway/consent-operators"],
    )


def parse_consent_config(
    table: dict[str, Any], base_dir: Path, data_dir: Path | None = None
) -> ConsentConfig:
    """Parse ``[consent]``; the database defaults to ``<data_dir>/consent.sqlite3``."""
    unknown = set(table) - {"enabled", "database", "default_mode", "peer_modes", "admin_token_file"}
    if unknown:
        raise ConsentError(f"[consent] unknown key(s): {', '.join(sorted(unknown))}")
    database: Path | None = None
    if "database" in table:
        if not isinstance(table["database"], str):
            raise ConsentError("consent.database must be a path string")
        database = Path(table["database"]).expanduser()
        database = database if database.is_absolute() else (base_dir / database).resolve()
    elif data_dir is not None:
        database = data_dir / "consent.sqlite3"
    default_mode = table.get("default_mode", "opt-out")
    if default_mode not in MODES:
        raise ConsentError('consent.default_mode must be "opt-in" or "opt-out"')
    peer_modes = table.get("peer_modes", {})
    if not isinstance(peer_modes, dict):
        raise ConsentError("[consent.peer_modes] must be a table")
    for community, mode in peer_modes.items():
        _check_community(community)
        if mode not in MODES:
            raise ConsentError(f"consent.peer_modes.{community}: opt-in or opt-out")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConsentError("consent.enabled must be true or false")
    if enabled and database is None:
        raise ConsentError("consent.database is required (no data directory known)")
    token_file: Path | None = None
    if "admin_token_file" in table:
        if not isinstance(table["admin_token_file"], str) or not table["admin_token_file"]:
            raise ConsentError("consent.admin_token_file must be a path string")
        token_file = Path(table["admin_token_file"]).expanduser()
        token_file = token_file if token_file.is_absolute() else (base_dir / token_file).resolve()
    return ConsentConfig(enabled, database, default_mode, dict(peer_modes), token_file)


# --------------------------------------------------------------------------- service


DocumentClassification = tuple[CodeLike | None, CodeLike | Sequence[CodeLike] | None]


class ConsentService:
    """Store + configured default mode: what the responding handlers ask."""

    def __init__(self, store: ConsentRules, config: ConsentConfig) -> None:
        self.store: ConsentRules = store
        self.config = config

    @classmethod
    def open(cls, config: ConsentConfig) -> ConsentService:
        if config.database is None:
            raise ConsentError("consent.database is not set")
        return cls(ConsentStore(config.database), config)

    def close(self) -> None:
        self.store.close()

    def verdicts_for_documents(
        self,
        patient: str | None,
        requesting_community: str,
        documents: Sequence[DocumentClassification],
    ) -> list[Verdict]:
        """One verdict per (classCode, confidentialityCode(s)) of the patient's documents.

        A document whose patient is unknown or unparseable is withheld: consent cannot be
        established for it.
        """
        rules = self.store.rules_for(patient) if patient else []
        return self.verdicts_with(rules, patient, requesting_community, documents)

    async def rules_of(self, patients: Iterable[str | None]) -> dict[str, list[ConsentRule]] | None:
        """The rules of each of these patients, read off the event loop; None when the store
        cannot be read (unreachable, or no answer in time): consent is then unknown."""
        wanted = [p for p in dict.fromkeys(patients) if p]
        if not wanted:
            return {}

        def read() -> dict[str, list[ConsentRule]]:
            return {p: self.store.rules_for(p) for p in wanted}

        try:
            return await self.store.offload(read)
        except (ConsentStoreUnavailable, sqlite3.Error) as exc:
            log.warning("consent rules could not be read: %s", exc)
            return None

    def verdicts_with(
        self,
        rules: Sequence[ConsentRule] | None,
        patient: str | None,
        requesting_community: str,
        documents: Sequence[DocumentClassification],
    ) -> list[Verdict]:
        """:meth:`verdicts_for_documents` on rules already read (pure). ``rules`` None means
        consent is unknown (the store could not be read): every document is withheld, as for
        a document whose patient is unknown."""
        if not patient:
            return [Verdict(False, "document has no patient id")] * len(documents)
        if rules is None:
            reason = "consent could not be established (consent store unavailable)"
            return [Verdict(False, reason)] * len(documents)
        mode = self.config.mode_for(requesting_community)
        verdicts = []
        for class_code, confidentiality in documents:
            if confidentiality is None:
                confs: Sequence[CodeLike] = ()
            elif isinstance(confidentiality, str | DocumentCode):
                confs = (confidentiality,)
            else:
                confs = confidentiality
            verdicts.append(
                evaluate(
                    rules,
                    default_mode=mode,
                    community=requesting_community,
                    class_code=class_code,
                    confidentiality_codes=confs,
                )
            )
        return verdicts

    def decide_for_documents(
        self,
        patient: str | None,
        requesting_community: str,
        documents: Sequence[DocumentClassification],
    ) -> list[bool]:
        return [
            v.allowed for v in self.verdicts_for_documents(patient, requesting_community, documents)
        ]


# --------------------------------------------------------------------------- CLI


# --------------------------------------------------------------------------- admin API
