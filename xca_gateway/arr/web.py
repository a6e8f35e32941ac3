"""The security officer's review UI: login, event search, event detail, patient access report,
security dashboard; CSV and PDF exports. Server-rendered HTML (Jinja2 templates in
``templates/``, autoescaping on) with inline SVG charts.

Security. Officers sign in with a password (scrypt-hashed, stdlib) or a client certificate
registered to their account. Sessions live in memory, behind a random token in a cookie that is
``Secure; HttpOnly; SameSite=Strict``; every state-changing form (login, logout) carries a CSRF
token. Pages are ``no-store`` and under a Content-Security-Policy without scripts or inline styles.
The UI only reads: the store has no update or delete path. Every sign-in (successful or not),
sign-out, search, view and export is itself audited (User Authentication 110114, Audit Log Used
110101) into the same repository.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import functools
import hashlib
import hmac
import re
import secrets
import threading
import time
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, select_autoescape

from xca_gateway.arr import render
from xca_gateway.arr.access import is_unauthenticated
from xca_gateway.arr.accesses import (
    DOCUMENT_RETRIEVE,
    IMPORT,
    LAUNCH,
    QUERY,
    STUDY_RETRIEVE,
    VIEW,
    Access,
    AccessRecord,
    group_accesses,
)
from xca_gateway.arr.parse import name_words, patient_key
from xca_gateway.arr.render import FAILURE, PALETTE, SUCCESS, Chart, Series
from xca_gateway.arr.store import AuditStore, EventFilter, EventRow, Officer
from xca_gateway.audit import messages as am
from xca_gateway.audit.alerts import AlertAggregator, is_security_alert
from xca_gateway.audit.syslog import format_message
from xca_gateway.protocol.http_server import Request, Response

SESSION_COOKIE = "arr_session"
LOGIN_COOKIE = "arr_login"
# The officer's time zone, kept by the browser across sessions.
TZ_COOKIE = "arr_tz"

# --------------------------------------------------------------------------- passwords

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), the stdlib's memory-hard KDF."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=128 * 1024 * 1024,
        dklen=32,
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str | None, password: str) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=128 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash to check against for unknown users, so that timing does not reveal who exists.
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_hex(8))
    return _DUMMY_HASH


# --------------------------------------------------------------------------- sessions


@dataclass
class Session:
    token: str
    username: str
    csrf: str
    address: str
    method: str  # "password" | "certificate"
    created: float
    last_seen: float
    # The officer's time zone (IANA name) for every time shown; exports add UTC.
    tz: str = "UTC"


class Sessions:
    def __init__(self, idle_seconds: float, max_seconds: float) -> None:
        self.idle = idle_seconds
        self.max = max_seconds
        self._sessions: dict[str, Session] = {}

    def create(self, username: str, address: str, method: str) -> Session:
        now = time.monotonic()
        self._expire(now)
        session = Session(
            secrets.token_urlsafe(32),
            username,
            secrets.token_urlsafe(24),
            address,
            method,
            now,
            now,
        )
        self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._sessions.get(token)
        now = time.monotonic()
        if session is None:
            return None
        if now - session.last_seen > self.idle or now - session.created > self.max:
            del self._sessions[token]
            return None
        session.last_seen = now
        return session

    def end(self, token: str) -> Session | None:
        return self._sessions.pop(token, None)

    def _expire(self, now: float) -> None:
        for token, s in list(self._sessions.items()):
            if now - s.last_seen > self.idle or now - s.created > self.max:
                del self._sessions[token]

    def __len__(self) -> int:
        return len(self._sessions)


class LoginThrottle:
    """At most ``limit`` failed sign-ins per user name and per address in ``window`` seconds."""

    def __init__(self, limit: int = 5, window: float = 900.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        stamps = [t for t in self._failures.get(key, []) if now - t < self.window]
        if stamps:
            self._failures[key] = stamps
        else:
            self._failures.pop(key, None)
        return stamps

    def blocked(self, username: str, address: str) -> bool:
        now = time.monotonic()
        return any(
            len(self._recent(k, now)) >= self.limit for k in (f"u:{username}", f"a:{address}")
        )

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        for key in (f"u:{username}", f"a:{address}"):
            self._failures.setdefault(key, []).append(now)
            if len(self._failures) > 100000:
                self._failures.clear()

    def succeeded(self, username: str) -> None:
        self._failures.pop(f"u:{username}", None)


# --------------------------------------------------------------------------- self audit


# Seconds within which repeated Security Alerts of one caller become one record and a count.
ALERT_WINDOW = 60.0


class SelfAudit:
    """The repository's own audit trail (officer sign-in, use of the audit log)."""

    def __init__(
        self,
        submit: Callable[[bytes], None],
        *,
        audit_source_id: str,
        enterprise_site_id: str | None,
        hostname: str,
        application_id: str,
    ) -> None:
        self.submit = submit
        self.ctx = am.AuditContext(
            am.AuditSource(
                audit_source_id, enterprise_site_id, (am.AuditSourceType.SECURITY_SERVER,)
            ),
            host=hostname,
        )
        self.application_id = application_id
        self.hostname = hostname
        # Repeated Security Alerts of one caller (refused handshakes, refused doors) within a
        # minute are one record and one more with the count (issue #16: a flood of refused
        # connections must not fill the repository with its own alerts).
        self.alerts = AlertAggregator(ALERT_WINDOW)
        self._alerts_lock = threading.Lock()

    def record(self, message: am.AuditMessage) -> None:
        """Store one of the repository's own audit messages (e.g. a refused caller)."""
        if not is_security_alert(message):
            self._send(message)
            return
        with self._alerts_lock:
            out = self.alerts.offer(message, time.monotonic())
        for item in out:
            self._send(item)

    def close_alert_windows(self, *, all_of_them: bool = False) -> None:
        """Store the repeat records of the bursts whose window has closed (``all_of_them``:
        of every burst, on stop)."""
        with self._alerts_lock:
            out = self.alerts.flush() if all_of_them else self.alerts.expire(time.monotonic())
        for item in out:
            self._send(item)

    def _send(self, message: am.AuditMessage) -> None:
        self.submit(
            format_message(
                message.to_xml(),
                outcome=message.outcome,
                timestamp=message.event.date_time,
                hostname=self.hostname,
                app_name="xca-gateway-arr",
                procid=self.ctx.process_id,
            )
        )

    def user_authentication(
        self,
        event: str,
        username: str,
        address: str,
        *,
        success: bool,
        method: str,
        reason: str | None = None,
    ) -> None:
        self._send(
            am.user_authentication(
                self.ctx,
                event="login" if event == "login" else "logout",
                user=am.HumanRequestor(username, f"{username} ({method})"),
                authenticator=self.ctx.local_node(self.application_id),
                user_node=am.Node(username, address),
                outcome=am.EventOutcome.SUCCESS if success else am.EventOutcome.MINOR_FAILURE,
                outcome_description=reason,
            )
        )

    def audit_log_used(
        self,
        username: str,
        address: str,
        what: str,
        query: str,
        *,
        user_name: str | None = None,
        outcome: am.EventOutcome = am.EventOutcome.SUCCESS,
    ) -> None:
        """Audit Log Used (DICOM A.5.3.2): who read which part of the audit log, from where."""
        message = am.AuditMessage(
            event=am.EventIdentification(
                event_id=am.EventId.AUDIT_LOG_USED,
                action="R",
                outcome=outcome,
                date_time=datetime.now(UTC),
            ),
            participants=(
                am.ActiveParticipant(
                    user_id=username,
                    user_is_requestor=True,
                    user_name=user_name,
                    network_access_point_id=address,
                ),
                am.ActiveParticipant(
                    user_id=self.application_id,
                    user_is_requestor=False,
                    alternative_user_id=self.ctx.process_id,
                    network_access_point_id=self.hostname,
                ),
            ),
            source=self.ctx.audit_source,
            objects=(
                am.ParticipantObject(
                    object_id=what,
                    id_type_code=am.ParticipantObjectIdType.URI,
                    type_code=am.ObjectType.SYSTEM_OBJECT,
                    type_code_role=am.ObjectRole.SECURITY_RESOURCE,
                    name="Security Audit Log",
                    query=query.encode("utf-8") if query else None,
                ),
            ),
        )
        self._send(message)


# --------------------------------------------------------------------------- patient xref


class PatientXref:
    """The same person's ids in several communities (the demo's ``xref.csv`` format: one
    person per line, comma-separated CX ids, ``#`` comments), to report across communities."""

    def __init__(self, groups: Sequence[Sequence[str]] = ()) -> None:
        self._by_key: dict[str, list[str]] = {}
        for group in groups:
            keys = [patient_key(g) for g in group if g.strip()]
            for key in keys:
                self._by_key[key] = keys

    @classmethod
    def load(cls, path: Path) -> PatientXref:
        groups = []
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                cells = [c.strip() for c in row if c.strip()]
                if cells and not cells[0].startswith("#"):
                    groups.append(cells)
        return cls(groups)

    def expand(self, key: str) -> list[str]:
        if key in self._by_key:
            return list(self._by_key[key])
        if key.endswith("|"):
            prefix = key
            found = [k for k in self._by_key if k.startswith(prefix)]
            if found:
                return list(dict.fromkeys(x for k in found for x in self._by_key[k]))
        return [key]


# --------------------------------------------------------------------------- UI settings


@dataclass(frozen=True)
class UiSettings:
    session_idle_seconds: float = 1800.0
    session_max_seconds: float = 8 * 3600.0
    page_size: int = 50
    report_days: int = 90
    max_export_rows: int = 100000
    # homeCommunityId -> display name
    community_names: dict[str, str] = field(default_factory=dict)
    login_attempts: int = 5
    login_window_seconds: float = 900.0
    # The officers' time zone until one picks another (IANA name); exports keep UTC.
    timezone: str = "UTC"
    # Records read to build a report's accesses (beyond, the report says it was cut).
    max_report_records: int = 20000


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:.5rem 1.2rem;display:flex;flex-wrap:wrap;
gap:.4rem 1.4rem;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
header .who{margin-left:auto;font-size:.9rem}
header form{display:inline}
header form.tz{font-size:.85rem}
header form.tz select{max-width:14rem}
header form.tz button{padding:.2rem .6rem}
main{padding:1rem 1.4rem;max-width:1880px;margin:0 auto}
h1{font-size:1.35rem;margin:.4rem 0 1rem}
h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
.table-wrap{max-width:100%;overflow-x:auto;background:#fff}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.84rem}
th,td{border:1px solid #d5d9e0;padding:.3rem .45rem;text-align:left;vertical-align:top}
th{background:#eef1f5}
td.time{white-space:nowrap}
td.wrap,td.who,td.community,td.what,td.source{overflow-wrap:anywhere;word-break:break-word}
td.who{max-width:22rem}
td.source{max-width:16rem}
tr.fail td{background:#fff1ec}
tr.flagged td{background:#fffbe6}
.note{color:#555;font-size:.78rem}
form.filters{display:flex;flex-wrap:wrap;gap:.6rem;align-items:flex-end;background:#fff;
padding:.7rem;border:1px solid #d5d9e0;margin-bottom:.8rem}
form.filters label{display:flex;flex-direction:column;font-size:.8rem;gap:.15rem}
input,select,button{font:inherit;padding:.25rem .4rem}
button{background:#1f3a5f;color:#fff;border:0;border-radius:3px;padding:.35rem .9rem;
cursor:pointer}
header button{background:#2d5385}
button.link{background:none;color:#fff;text-decoration:underline;padding:0}
.pager{margin:.6rem 0;display:flex;flex-wrap:wrap;gap:1rem;align-items:center}
.badge{display:inline-block;padding:0 .35rem;border-radius:3px;font-size:.78rem}
.ok{background:#d9f2e6;color:#0b5d3b}
.bad{background:#fde0d6;color:#8a2b06}
.warn{background:#fff3c4;color:#6b5200}
pre.raw{background:#fff;border:1px solid #d5d9e0;padding:.6rem;white-space:pre-wrap;
word-break:break-all;font-size:.78rem;max-height:30rem;overflow:auto}
.chart{background:#fff;border:1px solid #d5d9e0;max-width:100%;height:auto;display:block}
.cards{display:flex;gap:.8rem;flex-wrap:wrap;margin:.6rem 0}
.card{background:#fff;border:1px solid #d5d9e0;padding:.6rem .9rem;min-width:10rem;
flex:0 1 13rem}
.card b{display:block;font-size:1.4rem}
.person{background:#fff;border:1px solid #d5d9e0;padding:.5rem .9rem}
.login{max-width:24rem;margin:4rem auto;background:#fff;padding:1.4rem;border:1px solid #d5d9e0}
.login label{display:block;margin:.6rem 0}
.login input{width:100%}
.error{color:#8a2b06}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .9rem;background:#fff;
padding:.6rem;border:1px solid #d5d9e0}
dl.kv dt{font-weight:600}
dl.kv dd{margin:0;overflow-wrap:anywhere}
"""

_SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    ("strict-transport-security", "max-age=31536000"),
]

# A PDF is for reading: beyond this many rows the CSV export is the way.
_MAX_PDF_ROWS = 5000

OUTCOME_TEXT = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}
KNOWN_TRANSACTIONS = (
    "ITI-18",
    "ITI-38",
    "ITI-39",
    "ITI-43",
    "ITI-55",
    "ITI-42",
    "RAD-69",
    "RAD-75",
    "RAD-107",
    "RAD-129",
    "110126",
    "110120",
    "110121",
    "110122",
    "110123",
)


def _html(status: int, body: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(
        status,
        [("content-type", "text/html; charset=utf-8"), *_SECURITY_HEADERS, *headers],
        body.encode("utf-8"),
    )


def _redirect(location: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(303, [("location", location), *_SECURITY_HEADERS, *headers], b"")


def request_cookies(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers:
        if name == "cookie":
            for part in value.split(";"):
                key, _, val = part.strip().partition("=")
                if key:
                    out.setdefault(key, val)
    return out


def _cookie(name: str, value: str, max_age: int | None = None) -> tuple[str, str]:
    attrs = f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict"
    if max_age is not None:
        attrs += f"; Max-Age={max_age}"
    return ("set-cookie", attrs)


def _fmt_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@functools.cache
def time_zones() -> tuple[str, ...]:
    """The IANA zones an officer may pick, UTC first."""
    return ("UTC", *sorted(z for z in zoneinfo.available_timezones() if z != "UTC"))


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(value: datetime, tz: str) -> str:
    """``value`` in the officer's zone, with the zone's abbreviation."""
    local = value.astimezone(zone(tz))
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or tz)


def _parse_time(value: str | None, *, end: bool = False, tz: str = "UTC") -> datetime | None:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS]`` in the officer's zone (an explicit offset or
    ``Z`` wins); a bare date at ``end`` covers the day."""
    if not value:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = datetime.fromisoformat(text).replace(tzinfo=zone(tz))
            return day + timedelta(days=1, microseconds=-1) if end else day
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=zone(tz))


@dataclass(frozen=True)
class SearchForm:
    """The filter fields shared by the event search, the report and their exports."""

    since: str = ""
    until: str = ""
    patient: str = ""
    user: str = ""
    community: str = ""
    transaction: str = ""
    outcome: str = ""
    flagged: str = ""
    page: int = 1

    @classmethod
    def from_query(cls, query: str) -> SearchForm:
        q = {k: v[-1].strip()[:512] for k, v in parse_qs(query).items() if v}
        page = q.get("page", "1")
        return cls(
            since=q.get("from", ""),
            until=q.get("to", ""),
            patient=q.get("patient", ""),
            user=q.get("user", ""),
            community=q.get("community", ""),
            transaction=q.get("transaction", ""),
            outcome=q.get("outcome", ""),
            flagged=q.get("flagged", ""),
            page=max(1, int(page)) if page.isdigit() else 1,
        )

    def query(self, **changes: Any) -> str:
        form = replace(self, **changes)
        pairs = {
            "from": form.since,
            "to": form.until,
            "patient": form.patient,
            "user": form.user,
            "community": form.community,
            "transaction": form.transaction,
            "outcome": form.outcome,
            "flagged": form.flagged,
        }
        kept = {k: v for k, v in pairs.items() if v}
        if form.page > 1:
            kept["page"] = str(form.page)
        return urlencode(kept)


# --------------------------------------------------------------------------- the report


def looks_like_patient_id(text: str) -> bool:
    """An id (``C01-1001``, a CX, ``system|id``) rather than a name: no blank, a digit."""
    value = text.strip()
    return bool(value) and " " not in value and any(c.isdigit() for c in value)


def what_text(access: Access) -> str:
    """What an access touched, in words (the report's "What" column)."""

    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    if access.kind in (STUDY_RETRIEVE, IMPORT):
        if not access.studies:
            return "no instance delivered"
        studies = len(access.studies)
        return ", ".join(
            (
                f"{studies} {'study' if studies == 1 else 'studies'}",
                f"{len(access.series)} series",
                n(access.instances, "instance"),
            )
        )
    if access.kind == DOCUMENT_RETRIEVE:
        return n(len(access.documents), "document") if access.documents else "no document"
    if access.kind == QUERY:
        return "query"
    if access.kind == VIEW:
        # A person was shown these studies (the web door records one per study and session).
        if len(access.studies) == 1:
            return f"viewed study {next(iter(access.studies))}"
        return f"viewed {len(access.studies)} studies" if access.studies else "nothing shown"
    if access.kind == LAUNCH:
        # An EHR opened the image display in the patient's context (the studies it named).
        count = len(access.studies)
        if count:
            return f"launch naming {count} {'study' if count == 1 else 'studies'}"
        return "launch: the patient's studies listed"
    return access.kind


@dataclass
class PatientReport:
    """Everything the report page, its CSV and its PDF show (the same rows)."""

    since: datetime
    until: datetime
    # (CX id, name) of every id of the person found in the trail, the names it goes by.
    patients: list[tuple[str, str]]
    names: list[str]
    accesses: list[Access]
    truncated: bool = False

    @property
    def users(self) -> int:
        return len({a.user for a in self.accesses if a.user})

    @property
    def systems(self) -> int:
        return len({a.node for a in self.accesses if a.node})

    @property
    def communities(self) -> int:
        return len({c for a in self.accesses for c in a.communities})

    @property
    def failures(self) -> int:
        return sum(1 for a in self.accesses if a.outcome not in (None, 0))

    @property
    def unbound(self) -> int:
        return sum(1 for a in self.accesses if a.unbound)


_REPORT_CSV_HEADER = (
    "access_time_utc",
    "access_time_local",
    "time_zone",
    "access",
    "transaction",
    "user",
    "user_address",
    "community",
    "community_id",
    "studies",
    "series",
    "instances",
    "documents",
    "what",
    "outcome",
    "allowed",
    "outcome_description",
    "purpose_of_use",
    "patient",
    "patient_name",
    "audit_source",
    "sender",
    "audit_source_bound",
    "event_ids",
)


class ReviewUI:
    """The HTTPS application of the review UI (an ``App`` for :class:`HttpServer`)."""

    def __init__(
        self,
        store: AuditStore,
        settings: UiSettings,
        audit: SelfAudit,
        *,
        xref: PatientXref | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.audit = audit
        self.xref = xref or PatientXref()
        self.sessions = Sessions(settings.session_idle_seconds, settings.session_max_seconds)
        self.throttle = LoginThrottle(settings.login_attempts, settings.login_window_seconds)
        self.status = status or (lambda: {})
        self.env = Environment(
            loader=PackageLoader("xca_gateway.arr", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            utc=_fmt_time,
            utc_iso=lambda v: (
                v.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            ),
            local=local_time,
            community=self._community,
            community_names=lambda ids: [self._community_name(c) for c in ids],
            labels=lambda codes: ", ".join(c.label() for c in codes),
            unauthenticated=is_unauthenticated,
            what=what_text,
        )

    # ------------------------------------------------------------------ rendering

    def _render(
        self,
        template: str,
        session: Session | None,
        title: str,
        *,
        back: str = "/events",
        **context: Any,
    ) -> str:
        return self.env.get_template(template).render(
            session=session,
            title=title,
            back=back,
            zones=time_zones(),
            transactions=KNOWN_TRANSACTIONS,
            **context,
        )

    def _message(self, session: Session | None, status: int, title: str, text: str) -> Response:
        return _html(status, self._render("base.html", session, title, message=text))

    def chart_svg(self, chart: Chart) -> str:
        """A chart as the pages draw it (SVG, escaped by the template)."""
        template = self.env.from_string('{% import "macros.html" as m %}{{ m.chart(c) }}')
        return template.render(c=chart)

    # ------------------------------------------------------------------ dispatch

    async def __call__(self, request: Request) -> Response:
        path = request.path
        if path == "/static/app.css":
            return Response(
                200,
                [("content-type", "text/css; charset=utf-8"), ("cache-control", "max-age=3600")],
                _CSS.encode(),
            )
        if path == "/login":
            if request.method == "POST":
                return await self._login_post(request)
            return await self._login_get(request)
        session = self.sessions.get(request_cookies(request).get(SESSION_COOKIE))
        if session is None:
            if request.method == "GET" and path != "/logout":
                return _redirect("/login")
            return self._message(None, 403, "Forbidden", "Please sign in.")
        if path == "/logout" and request.method == "POST":
            return await self._logout(request, session)
        if path == "/settings/timezone" and request.method == "POST":
            return await self._set_timezone(request, session)
        if request.method != "GET":
            return self._message(session, 405, "Not allowed", "Read-only.")
        routes: dict[str, Callable[[Request, Session], Any]] = {
            "/": self._events,
            "/events": self._events,
            "/events.csv": self._events_csv,
            "/report": self._report,
            "/report.csv": self._report_csv,
            "/report.pdf": self._report_pdf,
            "/dashboard": self._dashboard,
        }
        handler = routes.get(path)
        if handler is not None:
            result: Response = await handler(request, session)
            return result
        if path.startswith("/events/"):
            rest = path[len("/events/") :]
            ident, _, tail = rest.partition("/")
            if ident.isdigit() and tail in ("", "raw"):
                return await self._event(request, session, int(ident), raw=tail == "raw")
        return self._message(session, 404, "Not found", "No such page.")

    # ------------------------------------------------------------------ login

    async def _login_get(self, request: Request, error: str | None = None) -> Response:
        cert = request.peer.certificate
        if cert is not None and error is None:
            officer = await asyncio.to_thread(
                self.store.officer_by_certificate, cert.fingerprint_sha256
            )
            if officer is not None:
                return self._start_session(request, officer.username, "certificate")
        # Keep the token of an earlier visit: a browser that fetched the page twice must not
        # end up with a cookie from one response and a form from the other.
        token = request_cookies(request).get(LOGIN_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{32}", token):
            token = secrets.token_urlsafe(24)
        body = self._render("login.html", None, "Sign in", error=error, token=token)
        return _html(401 if error else 200, body, [_cookie(LOGIN_COOKIE, token, 600)])

    async def _login_post(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except ValueError:
            return self._message(None, 400, "Bad request", "Bad form.")
        address = request.peer.address
        csrf_cookie = request_cookies(request).get(LOGIN_COOKIE, "")
        csrf = form.get("csrf", "")
        if not csrf_cookie or not hmac.compare_digest(csrf, csrf_cookie):
            return await self._login_get(request, "The sign-in form expired; please try again.")
        username = form.get("username", "")[:128]
        password = form.get("password", "")[:1024]
        if self.throttle.blocked(username, address):
            self.audit.user_authentication(
                "login",
                username or "(empty)",
                address,
                success=False,
                method="password",
                reason="too many failed sign-ins",
            )
            return await self._login_get(request, "Too many failed attempts; wait and retry.")
        officer = await asyncio.to_thread(self.store.officer, username) if username else None
        stored = officer.password_hash if officer is not None else None
        ok = await asyncio.to_thread(verify_password, stored or _dummy_hash(), password)
        if officer is None or stored is None or not ok:
            self.throttle.failed(username, address)
            self.audit.user_authentication(
                "login",
                username or "(empty)",
                address,
                success=False,
                method="password",
                reason="unknown user or wrong password",
            )
            return await self._login_get(request, "Unknown user name or wrong password.")
        self.throttle.succeeded(username)
        return self._start_session(request, officer.username, "password")

    def _start_session(self, request: Request, username: str, method: str) -> Response:
        session = self.sessions.create(username, request.peer.address, method)
        # The zone this browser picked before, else the repository's default.
        chosen = request_cookies(request).get(TZ_COOKIE, "")
        session.tz = chosen if chosen in time_zones() else self.settings.timezone
        self.audit.user_authentication(
            "login", username, request.peer.address, success=True, method=method
        )
        return _redirect(
            "/events", [_cookie(SESSION_COOKIE, session.token), _cookie(LOGIN_COOKIE, "", 0)]
        )

    async def _logout(self, request: Request, session: Session) -> Response:
        try:
            form = await _form(request)
        except ValueError:
            form = {}
        if not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            return self._message(session, 403, "Forbidden", "Bad CSRF token.")
        self.sessions.end(session.token)
        self.audit.user_authentication(
            "logout", session.username, request.peer.address, success=True, method=session.method
        )
        return _redirect("/login", [_cookie(SESSION_COOKIE, "", 0)])

    async def _set_timezone(self, request: Request, session: Session) -> Response:
        try:
            form = await _form(request)
        except ValueError:
            form = {}
        if not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            return self._message(session, 403, "Forbidden", "Bad CSRF token.")
        chosen = form.get("tz", "")
        if chosen not in time_zones():
            return self._message(session, 400, "Bad request", "Unknown time zone.")
        session.tz = chosen
        back = form.get("back", "/events")
        # Only a path of this site (never //host or a scheme).
        if not re.fullmatch(r"/(?!/)[^\s\\]*", back):
            back = "/events"
        return _redirect(back, [_cookie(TZ_COOKIE, chosen, 365 * 86400)])

    # ------------------------------------------------------------------ filters

    def _filter(self, form: SearchForm, tz: str, *, default_days: int | None = None) -> EventFilter:
        since = _parse_time(form.since, tz=tz)
        until = _parse_time(form.until, end=True, tz=tz)
        if since is None and default_days is not None:
            since = (until or datetime.now(UTC)) - timedelta(days=default_days)
        flt = EventFilter(since=since, until=until)
        if form.patient:
            keys: list[str] = []
            for part in form.patient.split(","):
                if part.strip():
                    keys.extend(self.xref.expand(patient_key(part)))
            flt = replace(flt, patients=(tuple(dict.fromkeys(keys)),))
        if form.user:
            # Exact participant match, or a prefix of the requesting user's name.
            if "*" in form.user:
                flt = replace(flt, user_prefix=form.user.rstrip("*"))
            else:
                flt = replace(flt, users=((form.user,),))
        if form.community:
            wanted = form.community
            for hcid, name in self.settings.community_names.items():
                if name.lower() == wanted.lower():
                    wanted = hcid
            if not wanted.startswith("urn:"):
                wanted = f"urn:oid:{wanted}"
            flt = replace(flt, communities=((wanted,),))
        if form.transaction:
            codes = tuple(t.strip() for t in form.transaction.split(",") if t.strip())
            flt = replace(flt, subtypes=(codes,))
        if form.outcome == "success":
            flt = replace(flt, outcomes=((0,),))
        elif form.outcome == "failure":
            flt = replace(flt, outcomes=((4, 8, 12),))
        elif form.outcome in ("4", "8", "12"):
            flt = replace(flt, outcomes=((int(form.outcome),),))
        if form.flagged == "yes":
            flt = replace(flt, flagged=True)
        elif form.flagged == "no":
            flt = replace(flt, flagged=False)
        return flt

    def _community_name(self, hcid: str | None) -> str:
        if not hcid:
            return ""
        return self.settings.community_names.get(hcid) or hcid

    def _community(self, hcid: str | None) -> str:
        if not hcid:
            return ""
        name = self.settings.community_names.get(hcid)
        return f"{name} ({hcid})" if name else hcid

    # ------------------------------------------------------------------ events

    async def _timeline(
        self, flt: EventFilter, title: str, chart_id: str
    ) -> tuple[Chart, list[Series], datetime, datetime, int]:
        until = flt.until or datetime.now(UTC)
        since = flt.since
        if since is None:
            first = await asyncio.to_thread(
                self.store.search, replace(flt, until=until), limit=1, newest_first=False
            )
            since = first[0].event_time if first else until - timedelta(days=1)
        bucket = render.pick_bucket(since, until)
        hist = await asyncio.to_thread(
            self.store.histogram, replace(flt, since=since, until=until), bucket, "outcome"
        )
        ok = [(b, n) for b, g, n in hist if g == "0"]
        bad = [(b, n) for b, g, n in hist if g not in ("0", None)]
        unknown = [(b, n) for b, g, n in hist if g is None]
        series = [Series("success", SUCCESS, ok), Series("failed / denied", FAILURE, bad)]
        if unknown:
            series.append(Series("unparsed", "#999999", unknown))
        chart = render.bar_chart(
            series, since=since, until=until, bucket=bucket, title=title, chart_id=chart_id
        )
        return chart, series, since, until, bucket

    async def _events(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        flt = self._filter(form, session.tz)
        size = self.settings.page_size
        offset = (form.page - 1) * size
        rows = await asyncio.to_thread(self.store.search, flt, limit=size + 1, offset=offset)
        total = await asyncio.to_thread(self.store.count, flt, 10000)
        has_more = len(rows) > size
        rows = rows[:size]
        # Without a start, chart the last 30 days only: a histogram over years of events
        # would scan them all, while the table needs just the newest page.
        chart_flt = flt
        if flt.since is None:
            chart_flt = replace(flt, since=(flt.until or datetime.now(UTC)) - timedelta(days=30))
        chart, *_ = await self._timeline(chart_flt, "Events over time", "timeline")
        pages = max(1, -(-total // size))
        self.audit.audit_log_used(
            session.username, request.peer.address, "/events", form.query(), user_name=None
        )
        body = self._render(
            "events.html",
            session,
            "Audit events",
            back=f"/events?{form.query()}",
            form=form,
            chart=chart,
            rows=rows,
            total_text=f"{total}" if total < 10000 else "10000+",
            page=form.page,
            pages=pages if total < 10000 else "...",
            has_more=has_more,
            prev_query=form.query(page=form.page - 1),
            next_query=form.query(page=form.page + 1),
            export_query=form.query(page=1),
        )
        return _html(200, body)

    async def _export_rows(self, flt: EventFilter, limit: int | None = None) -> list[EventRow]:
        cap = limit or self.settings.max_export_rows
        rows: list[EventRow] = []
        step = 5000
        while len(rows) < cap:
            chunk = await asyncio.to_thread(
                self.store.search, flt, limit=min(step, cap - len(rows) + 1), offset=len(rows)
            )
            rows.extend(chunk)
            if len(chunk) < step:
                break
        return rows[: cap + 1] if limit else rows[:cap]

    def _csv_rows(self, rows: Sequence[EventRow]) -> list[list[object]]:
        return [
            [
                r.id,
                r.event_time.isoformat(),
                r.event_code,
                r.event_display,
                r.transaction,
                r.action,
                r.outcome,
                "yes" if r.outcome == 0 else ("no" if r.outcome is not None else ""),
                r.requestor,
                r.requestor_address or r.peer,
                r.patient,
                r.community,
                self.settings.community_names.get(r.community or "", ""),
                r.source_id,
                f"{r.transport}:{r.sender}",
                ";".join(r.flags),
                r.sender_identity or "",
                "" if r.sender_identity is None else ("no" if r.source_unbound else "yes"),
            ]
            for r in rows
        ]

    _CSV_HEADER = (
        "event_id",
        "event_time_utc",
        "event_code",
        "event",
        "transaction",
        "action",
        "outcome",
        "allowed",
        "user",
        "user_address",
        "patient",
        "community_id",
        "community",
        "audit_source",
        "received_from",
        "flags",
        "sender",
        "audit_source_bound",
    )

    async def _events_csv(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        rows = await self._export_rows(self._filter(form, session.tz))
        self.audit.audit_log_used(
            session.username, request.peer.address, "/events.csv", form.query()
        )
        return _download(
            render.to_csv(self._CSV_HEADER, self._csv_rows(rows)),
            "text/csv; charset=utf-8",
            "audit-events.csv",
        )

    async def _event(
        self, request: Request, session: Session, ident: int, *, raw: bool
    ) -> Response:
        stored = await asyncio.to_thread(self.store.get, ident)
        if stored is None:
            return self._message(session, 404, "Not found", "No such event.")
        self.audit.audit_log_used(
            session.username, request.peer.address, f"/events/{ident}{'/raw' if raw else ''}", ""
        )
        if raw:
            return _download(stored.raw, "application/octet-stream", f"audit-event-{ident}.syslog")
        record = stored.record()
        row = stored.row
        summary = [
            (
                "Event time",
                f"{local_time(record.event_time, session.tz)} ({_fmt_time(record.event_time)} UTC)",
            ),
            (
                "Received",
                f"{local_time(record.received_at, session.tz)} from {row.transport}:{row.sender}",
            ),
            ("Sent by", _sender_text(row.sender_identity)),
            (
                "Audit source",
                f"{row.source_id or 'none'}: NOT bound to this sender"
                if row.source_unbound
                else (row.source_id or ""),
            ),
            ("Event", record.event_id.label() if record.event_id else "not understood"),
            ("Event types", ", ".join(c.label() for c in record.event_types)),
            ("Action", record.action or ""),
            (
                "Outcome",
                OUTCOME_TEXT.get(record.outcome or -1, "") if record.outcome is not None else "",
            ),
            ("Outcome description", record.outcome_description or ""),
            ("Purpose of use", ", ".join(c.label() for c in record.purposes_of_use)),
            ("Message format", record.dialect),
            ("Flags", ", ".join(record.flags)),
            ("Problem", record.problem or ""),
        ]
        if record.syslog is not None:
            s = record.syslog
            summary.append(
                (
                    "Syslog header",
                    f"PRI {s.priority} {s.timestamp or '-'} {s.hostname or '-'} "
                    f"{s.app_name or '-'} {s.procid or '-'} {s.msgid or '-'}",
                )
            )
        body = self._render(
            "event.html",
            session,
            f"Event {ident}",
            back=f"/events/{ident}",
            summary=summary,
            record=record,
            event_id=row.id,
            raw_size=len(stored.raw),
            raw_text=stored.raw.decode("utf-8", "replace"),
        )
        return _html(200, body)

    # ------------------------------------------------------------------ patient report

    def _person_of(self, key: str) -> str:
        """One value per person: the first of the ids the cross-reference table joins."""
        return min(self.xref.expand(key))

    async def _patient_keys(self, text: str) -> list[str]:
        """The patient keys of what the officer typed: ids (comma-separated, any of the
        person's), or a name, looked up in the patients' names the records carry; each
        widened to every id of the person (the cross-reference table)."""
        keys: list[str] = []
        if looks_like_patient_id(text):
            for part in text.split(","):
                if part.strip():
                    keys.extend(self.xref.expand(patient_key(part)))
            return list(dict.fromkeys(keys))
        words = name_words(text)
        if not words:
            return []
        flt = EventFilter(patient_names=tuple((w,) for w in words))
        rows = await asyncio.to_thread(self.store.search, flt, limit=500)
        stored = await asyncio.to_thread(self.store.get_many, [r.id for r in rows])
        for item in stored:
            record = item.record()
            for entity in record.entities:
                if (
                    entity.is_patient
                    and entity.object_id
                    and entity.name
                    and set(words) <= set(name_words(entity.name))
                ):
                    keys.extend(self.xref.expand(patient_key(entity.object_id)))
        return list(dict.fromkeys(keys))

    async def _report_data(self, form: SearchForm, tz: str) -> PatientReport:
        flt = self._filter(replace(form, patient=""), tz, default_days=self.settings.report_days)
        until = flt.until or datetime.now(UTC)
        since = flt.since or until - timedelta(days=self.settings.report_days)
        keys = await self._patient_keys(form.patient)
        if not keys:
            return PatientReport(since, until, [], [], [])
        # Without an explicit end, nothing is cut off (a sender's clock may run ahead).
        flt = replace(flt, since=since, patients=(tuple(keys),))
        cap = self.settings.max_report_records
        rows = await self._export_rows(flt, limit=cap)
        truncated = len(rows) > cap
        rows = rows[:cap]
        records: list[AccessRecord] = []
        for start in range(0, len(rows), 500):
            ids = [r.id for r in rows[start : start + 500]]
            for item in await asyncio.to_thread(self.store.get_many, ids):
                records.append(AccessRecord(item.row.id, item.record()))
        accesses = group_accesses(records, person_of=self._person_of)
        # The person(s) asked for, as the records name them (a bare id matches any authority).
        prefixes = tuple(k for k in keys if k.endswith("|"))
        persons = {self._person_of(k) for k in keys}
        for access_record in records:
            for pid in access_record.record.patient_ids:
                key = patient_key(pid)
                if key in keys or (prefixes and key.startswith(prefixes)):
                    persons.add(self._person_of(key))
        accesses = [a for a in accesses if a.persons & persons]
        # The person's ids as the records name them, with the names they give.
        seen: dict[str, str] = {}
        for access in accesses:
            for pid, name in access.patients.items():
                if self._person_of(patient_key(pid)) in persons:
                    seen[pid] = seen.get(pid) or name or ""
        names = list(dict.fromkeys(n for n in seen.values() if n))
        if flt.until is None and accesses:
            until = max(until, max(a.last for a in accesses))
        return PatientReport(
            since,
            until,
            sorted(seen.items()),
            names,
            accesses,
            truncated,
        )

    def _report_chart(
        self, report: PatientReport, chart_id: str
    ) -> tuple[Chart, list[Series], int]:
        bucket = render.pick_bucket(report.since, report.until)
        ok: dict[datetime, int] = {}
        bad: dict[datetime, int] = {}
        for access in report.accesses:
            slot = datetime.fromtimestamp(int(access.time.timestamp()) // bucket * bucket, UTC)
            target = ok if access.outcome == 0 else bad
            target[slot] = target.get(slot, 0) + 1
        series = [
            Series("allowed", SUCCESS, list(ok.items())),
            Series("failed / denied", FAILURE, list(bad.items())),
        ]
        chart = render.bar_chart(
            series,
            since=report.since,
            until=report.until,
            bucket=bucket,
            title="Accesses over time",
            chart_id=chart_id,
        )
        return chart, series, bucket

    async def _report(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        if not form.patient:
            body = self._render(
                "report.html",
                session,
                "Patient access report",
                back="/report",
                form=form,
                report=None,
                report_days=self.settings.report_days,
            )
            return _html(200, body)
        report = await self._report_data(form, session.tz)
        self.audit.audit_log_used(session.username, request.peer.address, "/report", form.query())
        chart, *_ = self._report_chart(report, "report-timeline")
        body = self._render(
            "report.html",
            session,
            "Patient access report",
            back=f"/report?{form.query(page=1)}",
            form=form,
            report=report,
            chart=chart,
            query=form.query(page=1),
            report_days=self.settings.report_days,
        )
        return _html(200, body)

    def _report_rows(self, report: PatientReport, tz: str) -> list[list[object]]:
        rows: list[list[object]] = []
        for a in report.accesses:
            outcome = a.outcome
            rows.append(
                [
                    a.time.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                    a.time.astimezone(zone(tz)).isoformat(timespec="seconds"),
                    tz,
                    a.kind,
                    a.label,
                    a.user,
                    a.node,
                    "; ".join(sorted(self._community_name(c) for c in a.communities)),
                    "; ".join(sorted(a.communities)),
                    len(a.studies),
                    len(a.series),
                    a.instances,
                    len(a.documents),
                    what_text(a),
                    outcome,
                    ""
                    if outcome is None
                    else ("yes" if outcome == 0 else ("partly" if outcome == 4 else "no")),
                    "; ".join(a.outcome_descriptions),
                    "; ".join(a.purposes),
                    "; ".join(a.patients),
                    "; ".join(n for n in a.patients.values() if n),
                    "; ".join(a.recorded_by),
                    "; ".join(a.sender_identities),
                    "no" if a.unbound else "yes",
                    " ".join(str(i) for i in [*a.record_ids, *a.leg_ids]),
                ]
            )
        return rows

    async def _report_csv(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        if not form.patient:
            return self._message(session, 400, "Bad request", "A patient is required.")
        report = await self._report_data(form, session.tz)
        self.audit.audit_log_used(
            session.username, request.peer.address, "/report.csv", form.query()
        )
        return _download(
            render.to_csv(_REPORT_CSV_HEADER, self._report_rows(report, session.tz)),
            "text/csv; charset=utf-8",
            "patient-access-report.csv",
        )

    async def _report_pdf(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        if not form.patient:
            return self._message(session, 400, "Bad request", "A patient is required.")
        report = await self._report_data(form, session.tz)
        _chart, series, bucket = self._report_chart(report, "pdf")
        self.audit.audit_log_used(
            session.username, request.peer.address, "/report.pdf", form.query()
        )
        tz = session.tz
        table = render.PdfTable(
            header=(
                "Time (UTC)",
                f"Local ({tz})"[:24],
                "Access",
                "Who",
                "From",
                "Community",
                "What",
                "Allowed",
                "Purpose",
                "Recorded by",
            ),
            widths=(27, 27, 32, 46, 20, 28, 42, 14, 17, 24),
            rows=[
                (
                    _fmt_time(a.time),
                    a.time.astimezone(zone(tz)).strftime("%Y-%m-%d %H:%M:%S"),
                    a.label,
                    a.user,
                    a.node,
                    ", ".join(sorted(self._community_name(c) for c in a.communities)),
                    what_text(a),
                    "yes" if a.outcome == 0 else ("partly" if a.outcome == 4 else "NO"),
                    ", ".join(a.purposes),
                    ("NOT BOUND: " if a.unbound else "") + ", ".join(a.recorded_by),
                )
                for a in report.accesses[:_MAX_PDF_ROWS]
            ],
        )
        more = len(report.accesses) - _MAX_PDF_ROWS
        ids = ", ".join(pid for pid, _ in report.patients)
        pdf = await asyncio.to_thread(
            render.report_pdf,
            title="Patient access report",
            subtitle_lines=[
                f"Patient: {' / '.join(report.names) or 'name not recorded'}; ids: {ids}",
                f"Period (UTC): {_fmt_time(report.since)} to {_fmt_time(report.until)}",
                f"{len(report.accesses)} accesses, {report.failures} failed or denied, "
                f"{report.unbound} from a sender not bound to its audit source; "
                f"{report.users} users, {report.communities} communities."
                + (
                    f" The table lists the newest {_MAX_PDF_ROWS}; the CSV has all."
                    if more > 0
                    else ""
                ),
            ],
            chart=series,
            since=report.since,
            until=report.until,
            bucket=bucket,
            table=table,
            footer=f"Generated {_fmt_time(datetime.now(UTC))} UTC by {session.username}",
        )
        return _download(pdf, "application/pdf", "patient-access-report.pdf")

    # ------------------------------------------------------------------ dashboard

    async def _dashboard(self, request: Request, session: Session) -> Response:
        q = parse_qs(request.query)
        days_text = q.get("days", ["7"])[-1]
        days = min(366, max(1, int(days_text))) if days_text.isdigit() else 7
        until = datetime.now(UTC)
        since = until - timedelta(days=days)
        bucket = render.pick_bucket(since, until, 84)
        window = EventFilter(since=since, until=until)
        run = asyncio.to_thread
        refused_flt = replace(window, event_codes=(("110113",),), subtypes=(("110126",),))
        refused = await run(self.store.histogram, refused_flt, bucket, None)
        refused_nodes = await run(self.store.top, refused_flt, "peer", 10)
        failed_flt = replace(window, outcomes=((4, 8, 12),))
        failed = await run(self.store.histogram, failed_flt, bucket, "transaction")
        failed_top = await run(self.store.top, failed_flt, "transaction", 10)
        peers = await run(self.store.top, window, "peer", 8)
        peer_names = [p for p, _ in peers if p]
        per_peer = await run(self.store.histogram, window, bucket, "peer")
        users = await self._unusual_users(until, days)
        self.audit.audit_log_used(
            session.username, request.peer.address, "/dashboard", f"days={days}"
        )
        refused_chart = render.bar_chart(
            [Series("refused node authentications", FAILURE, [(b, n) for b, _g, n in refused])],
            since=since,
            until=until,
            bucket=bucket,
            title="Refused TLS handshakes (Security Alert, Node Authentication)",
            chart_id="chart-refused",
        )
        failed_names = [t or "other" for t, _ in failed_top][:7]
        failed_series = [
            Series(
                name,
                PALETTE[i % len(PALETTE)],
                [(b, n) for b, g, n in failed if (g or "other") == name],
            )
            for i, name in enumerate(failed_names)
        ]
        failed_chart = render.bar_chart(
            failed_series,
            since=since,
            until=until,
            bucket=bucket,
            title="Failed or denied transactions",
            chart_id="chart-failed",
        )
        peer_series = [
            Series(name, PALETTE[i % len(PALETTE)], [(b, n) for b, g, n in per_peer if g == name])
            for i, name in enumerate(peer_names)
        ]
        peer_chart = render.line_chart(
            peer_series,
            since=since,
            until=until,
            bucket=bucket,
            title="Events per peer system",
            chart_id="chart-peers",
        )
        status = self.status()
        counters = status.get("counters", {})
        # The tiles say what the charts below them show (same window, same records); what
        # this repository counted itself since it started is labelled as such.
        cards = [
            ("events stored", status.get("total", ""), "c-total"),
            (
                f"refused TLS handshakes in {days} day(s) (charted)",
                sum(n for _b, _g, n in refused),
                "c-refused",
            ),
            (
                f"failed or denied transactions in {days} day(s) (charted)",
                sum(n for _b, _g, n in failed),
                "c-failed",
            ),
            (
                "refused messages at this repository since start (size, rate)",
                sum(v for k, v in counters.items() if k.startswith(("refused", "connections_ref"))),
                "c-refused-messages",
            ),
            ("flagged messages stored since start", counters.get("stored_flagged", 0), "c-flagged"),
            (
                "dropped since start (UDP queue full)",
                counters.get("dropped{queue_full}", 0),
                "c-dropped",
            ),
        ]
        body = self._render(
            "dashboard.html",
            session,
            "Security dashboard",
            back=f"/dashboard?days={days}",
            days=days,
            cards=cards,
            refused=refused_chart,
            refused_nodes=refused_nodes,
            failed=failed_chart,
            failed_top=failed_top,
            peers=peer_chart,
            users=users,
        )
        return _html(200, body)

    async def _unusual_users(
        self, until: datetime, days: int
    ) -> list[tuple[str, int, float, bool]]:
        day = until - timedelta(days=1)
        before_days = max(1, days - 1)
        recent = await asyncio.to_thread(
            self.store.top, EventFilter(since=day, until=until), "requestor", 50
        )
        earlier = dict(
            await asyncio.to_thread(
                self.store.top,
                EventFilter(since=day - timedelta(days=before_days), until=day),
                "requestor",
                1000,
            )
        )
        out = []
        for user, count in recent:
            if not user:
                continue
            avg = earlier.get(user, 0) / before_days
            unusual = count >= 20 and count > 3 * avg
            out.append((user, count, avg, unusual))
        out.sort(key=lambda item: (not item[3], -item[1]))
        return out[:25]


def _sender_text(sender_identity: str | None) -> str:
    if sender_identity is None:
        return "not recorded"
    if is_unauthenticated(sender_identity):
        return f"{sender_identity} (unauthenticated: a source address only)"
    if sender_identity == "local":
        return "this repository"
    return sender_identity


def _download(body: bytes, content_type: str, filename: str) -> Response:
    return Response(
        200,
        [
            ("content-type", content_type),
            ("content-disposition", f'attachment; filename="{filename}"'),
            *_SECURITY_HEADERS,
        ],
        body,
    )


async def _form(request: Request, limit: int = 16 * 1024) -> dict[str, str]:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise ValueError("not a form")
    body = await request.read(limit)
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def new_officer(
    username: str,
    password: str | None,
    certificate_fingerprint: str | None = None,
    display_name: str | None = None,
) -> Officer:
    if not username or len(username) > 128 or not username.isprintable():
        raise ValueError("the user name must be 1..128 printable characters")
    if password is not None and len(password) < 10:
        raise ValueError("the password must have at least 10 characters")
    return Officer(
        username=username,
        password_hash=hash_password(password) if password is not None else None,
        certificate_fingerprint=certificate_fingerprint.lower().replace(":", "")
        if certificate_fingerprint
        else None,
        display_name=display_name,
        created=datetime.now(UTC),
    )
