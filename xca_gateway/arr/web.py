"""The security officer's review UI: login, event search, event detail, patient access report,
security dashboard; CSV and PDF exports. Server-rendered HTML with inline SVG charts.

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
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from xca_gateway.arr import render
from xca_gateway.arr.access import is_unauthenticated
from xca_gateway.arr.parse import patient_key
from xca_gateway.arr.render import FAILURE, PALETTE, SUCCESS, Series, esc
from xca_gateway.arr.store import AuditStore, EventFilter, EventRow, Officer, StoredEvent
from xca_gateway.audit import messages as am
from xca_gateway.audit.syslog import format_message
from xca_gateway.server import Request, Response

SESSION_COOKIE = "arr_session"
LOGIN_COOKIE = "arr_login"

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

    def record(self, message: am.AuditMessage) -> None:
        """Store one of the repository's own audit messages (e.g. a refused caller)."""
        self._send(message)

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


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.4rem;
align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
header .who{margin-left:auto;font-size:.9rem}
header form{display:inline}
main{padding:1rem 1.4rem;max-width:1400px}
h1{font-size:1.35rem;margin:.4rem 0 1rem}
h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.86rem}
th,td{border:1px solid #d5d9e0;padding:.3rem .45rem;text-align:left;vertical-align:top}
th{background:#eef1f5}
tr.fail td{background:#fff1ec}
tr.flagged td{background:#fffbe6}
form.filters{display:flex;flex-wrap:wrap;gap:.6rem;align-items:flex-end;background:#fff;
padding:.7rem;border:1px solid #d5d9e0;margin-bottom:.8rem}
form.filters label{display:flex;flex-direction:column;font-size:.8rem;gap:.15rem}
input,select,button{font:inherit;padding:.25rem .4rem}
button{background:#1f3a5f;color:#fff;border:0;border-radius:3px;padding:.35rem .9rem;
cursor:pointer}
button.link{background:none;color:#fff;text-decoration:underline;padding:0}
.pager{margin:.6rem 0;display:flex;gap:1rem;align-items:center}
.badge{display:inline-block;padding:0 .35rem;border-radius:3px;font-size:.78rem}
.ok{background:#d9f2e6;color:#0b5d3b}
.bad{background:#fde0d6;color:#8a2b06}
.warn{background:#fff3c4;color:#6b5200}
pre.raw{background:#fff;border:1px solid #d5d9e0;padding:.6rem;white-space:pre-wrap;
word-break:break-all;font-size:.78rem;max-height:30rem;overflow:auto}
.chart{background:#fff;border:1px solid #d5d9e0;max-width:100%;height:auto}
.cards{display:flex;gap:.8rem;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5d9e0;padding:.6rem .9rem;min-width:11rem}
.card b{display:block;font-size:1.4rem}
.login{max-width:24rem;margin:4rem auto;background:#fff;padding:1.4rem;border:1px solid #d5d9e0}
.login label{display:block;margin:.6rem 0}
.login input{width:100%;box-sizing:border-box}
.error{color:#8a2b06}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .9rem;background:#fff;
padding:.6rem;border:1px solid #d5d9e0}
dl.kv dt{font-weight:600}
dl.kv dd{margin:0}
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


def _parse_time(value: str | None, *, end: bool = False) -> datetime | None:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS]`` as UTC; a bare date at ``end`` covers the day."""
    if not value:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return day + timedelta(days=1, microseconds=-1) if end else day
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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
            return _html(403, self._page(None, "Forbidden", "<p>Please sign in.</p>"))
        if path == "/logout" and request.method == "POST":
            return await self._logout(request, session)
        if request.method != "GET":
            return _html(405, self._page(session, "Not allowed", "<p>Read-only.</p>"))
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
        return _html(404, self._page(session, "Not found", "<p>No such page.</p>"))

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
        message = f'<p class="error" id="login-error">{esc(error)}</p>' if error else ""
        body = f"""
<div class="login"><h1>Audit record repository</h1>
<p>Security officer sign-in</p>{message}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{token}">
<label>User name <input name="username" id="username" autocomplete="username" required></label>
<label>Password <input type="password" name="password" id="password"
 autocomplete="current-password" required></label>
<button type="submit" id="login">Sign in</button>
</form></div>"""
        return _html(
            401 if error else 200,
            self._page(None, "Sign in", body),
            [_cookie(LOGIN_COOKIE, token, 600)],
        )

    async def _login_post(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except ValueError:
            return _html(400, self._page(None, "Bad request", "<p>Bad form.</p>"))
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
            return _html(403, self._page(session, "Forbidden", "<p>Bad CSRF token.</p>"))
        self.sessions.end(session.token)
        self.audit.user_authentication(
            "logout", session.username, request.peer.address, success=True, method=session.method
        )
        return _redirect("/login", [_cookie(SESSION_COOKIE, "", 0)])

    # ------------------------------------------------------------------ filters

    def _filter(self, form: SearchForm, *, default_days: int | None = None) -> EventFilter:
        since = _parse_time(form.since)
        until = _parse_time(form.until, end=True)
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

    def _community(self, hcid: str | None) -> str:
        if not hcid:
            return ""
        name = self.settings.community_names.get(hcid)
        return f"{name} ({hcid})" if name else hcid

    # ------------------------------------------------------------------ pages

    def _page(self, session: Session | None, title: str, body: str) -> str:
        nav = ""
        if session is not None:
            nav = f"""<header><a href="/events" id="nav-events">Events</a>
<a href="/report" id="nav-report">Patient access report</a>
<a href="/dashboard" id="nav-dashboard">Security dashboard</a>
<span class="who">Signed in as <b id="officer">{esc(session.username)}</b>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{esc(session.csrf)}">
<button class="link" id="logout">Sign out</button></form></span></header>"""
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} - audit record repository</title>
<link rel="stylesheet" href="/static/app.css"></head>
<body>{nav}<main><h1>{esc(title)}</h1>{body}</main></body></html>"""

    def _filters_html(
        self, form: SearchForm, action: str, *, patient_required: bool = False
    ) -> str:
        def sel(name: str, value: str, options: Sequence[tuple[str, str]]) -> str:
            opts = "".join(
                f'<option value="{esc(v)}"{" selected" if v == value else ""}>{esc(t)}</option>'
                for v, t in options
            )
            return f'<select name="{name}" id="f-{name}">{opts}</select>'

        transactions = "".join(f'<option value="{t}">' for t in KNOWN_TRANSACTIONS)
        required = " required" if patient_required else ""
        return f"""<form class="filters" method="get" action="{action}">
<label>From (UTC) <input name="from" id="f-from" value="{esc(form.since)}"
 placeholder="YYYY-MM-DD[THH:MM]"></label>
<label>To (UTC) <input name="to" id="f-to" value="{esc(form.until)}"
 placeholder="YYYY-MM-DD[THH:MM]"></label>
<label>Patient <input name="patient" id="f-patient" value="{esc(form.patient)}"
 placeholder="ID or ID^^^&amp;OID&amp;ISO"{required}></label>
<label>User <input name="user" id="f-user" value="{
            esc(form.user)
        }" placeholder="id, or prefix*"></label>
<label>Community <input name="community" id="f-community" value="{esc(form.community)}"
 placeholder="name or homeCommunityId"></label>
<label>Transaction <input name="transaction" id="f-transaction" list="transactions"
 value="{esc(form.transaction)}" placeholder="ITI-38, RAD-75 ..."></label>
<datalist id="transactions">{transactions}</datalist>
<label>Outcome {
            sel(
                "outcome",
                form.outcome,
                [
                    ("", "any"),
                    ("success", "success"),
                    ("failure", "failed or denied"),
                    ("4", "minor failure"),
                    ("8", "serious failure"),
                    ("12", "major failure"),
                ],
            )
        }</label>
<label>Flagged {
            sel(
                "flagged",
                form.flagged,
                [("", "any"), ("yes", "flagged only"), ("no", "clean only")],
            )
        }</label>
<button type="submit" id="search">Search</button></form>"""

    def _rows_html(self, rows: Sequence[EventRow], *, table_id: str = "events") -> str:
        lines = [
            f'<table id="{table_id}"><thead><tr><th>Time (UTC)</th><th>Event</th>'
            "<th>Transaction</th><th>Outcome</th><th>User</th><th>From</th><th>Patient</th>"
            "<th>Community</th><th>Audit source</th><th>Sent by</th><th>Flags</th></tr></thead>"
            "<tbody>"
        ]
        for r in rows:
            css = "fail" if r.outcome not in (None, 0) else ("flagged" if r.flags else "")
            outcome = _outcome_badge(r.outcome)
            flags = f'<span class="badge warn">{esc(", ".join(r.flags))}</span>' if r.flags else ""
            lines.append(
                f'<tr class="{css}" data-id="{r.id}">'
                f'<td><a href="/events/{r.id}" class="event-link">'
                f"{_fmt_time(r.event_time)}</a></td>"
                f"<td>{esc(r.event_display or r.event_code or 'unparsed')}</td>"
                f"<td>{esc(r.transaction or '')}</td><td>{outcome}</td>"
                f"<td>{esc(r.requestor or '')}</td>"
                f"<td>{esc(r.requestor_address or r.peer or '')}</td>"
                f"<td>{esc(r.patient or '')}</td><td>{esc(self._community(r.community))}</td>"
                f'<td class="source">{_source_html(r)}</td>'
                f'<td class="sender">{_sender_html(r.sender_identity)}</td><td>{flags}</td></tr>'
            )
        lines.append("</tbody></table>")
        return "".join(lines)

    async def _timeline(
        self, flt: EventFilter, title: str, chart_id: str
    ) -> tuple[str, list[Series], datetime, datetime, int]:
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
        svg = render.bar_chart(
            series, since=since, until=until, bucket=bucket, title=title, chart_id=chart_id
        )
        return svg, series, since, until, bucket

    async def _events(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        flt = self._filter(form)
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
        total_text = f"{total}" if total < 10000 else "10000+"
        pager = [f'<div class="pager"><span id="count">{total_text} events</span>']
        if form.page > 1:
            pager.append(f'<a href="/events?{form.query(page=form.page - 1)}" id="prev">Newer</a>')
        pager.append(f"<span>page {form.page} of {pages if total < 10000 else '...'}</span>")
        if has_more:
            pager.append(f'<a href="/events?{form.query(page=form.page + 1)}" id="next">Older</a>')
        pager.append(
            f'<a href="/events.csv?{form.query(page=1)}" id="export-csv" download>Export CSV</a>'
        )
        pager.append("</div>")
        self.audit.audit_log_used(
            session.username, request.peer.address, "/events", form.query(), user_name=None
        )
        body = (
            self._filters_html(form, "/events")
            + chart
            + "".join(pager)
            + self._rows_html(rows)
            + "".join(pager).replace('id="', 'id="b-')
        )
        return _html(200, self._page(session, "Audit events", body))

    async def _export_rows(self, flt: EventFilter) -> list[EventRow]:
        rows: list[EventRow] = []
        step = 5000
        while len(rows) < self.settings.max_export_rows:
            chunk = await asyncio.to_thread(self.store.search, flt, limit=step, offset=len(rows))
            rows.extend(chunk)
            if len(chunk) < step:
                break
        return rows[: self.settings.max_export_rows]

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
        rows = await self._export_rows(self._filter(form))
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
            return _html(404, self._page(session, "Not found", "<p>No such event.</p>"))
        self.audit.audit_log_used(
            session.username, request.peer.address, f"/events/{ident}{'/raw' if raw else ''}", ""
        )
        if raw:
            return _download(stored.raw, "application/octet-stream", f"audit-event-{ident}.syslog")
        return _html(200, self._page(session, f"Event {ident}", self._event_html(stored)))

    def _event_html(self, stored: StoredEvent) -> str:
        record = stored.record()
        row = stored.row
        kv = [
            ("Event time (UTC)", _fmt_time(record.event_time)),
            (
                "Received (UTC)",
                f"{_fmt_time(record.received_at)} from {row.transport}:{row.sender}",
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
            kv.append(
                (
                    "Syslog header",
                    f"PRI {s.priority} {s.timestamp or '-'} {s.hostname or '-'} "
                    f"{s.app_name or '-'} {s.procid or '-'} {s.msgid or '-'}",
                )
            )
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in kv if v)
        parts = [f'<dl class="kv" id="summary">{dl}</dl>', "<h2>Participants</h2>"]
        parts.append(
            '<table id="participants"><thead><tr><th>UserID</th><th>Name</th><th>Alt. id</th>'
            "<th>Requestor</th><th>Network access point</th><th>Roles</th></tr></thead><tbody>"
        )
        for p in record.participants:
            parts.append(
                f"<tr><td>{esc(p.user_id)}</td><td>{esc(p.user_name)}</td>"
                f"<td>{esc(p.alternative_user_id)}</td>"
                f"<td>{'yes' if p.user_is_requestor else 'no'}</td>"
                f"<td>{esc(p.network_access_point_id)}</td>"
                f"<td>{esc(', '.join(r.label() for r in p.roles))}</td></tr>"
            )
        parts.append("</tbody></table><h2>Audit source</h2><ul>")
        for src in record.audit_sources:
            types = ", ".join(t.label() for t in src.types)
            parts.append(
                f"<li>{esc(src.source_id)} {esc(src.enterprise_site_id or '')} {esc(types)}</li>"
            )
        parts.append("</ul><h2>Participant objects</h2>")
        parts.append(
            '<table id="objects"><thead><tr><th>Id</th><th>Id type</th><th>Type / role</th>'
            "<th>Details</th></tr></thead><tbody>"
        )
        for e in record.entities:
            details = "<br>".join(f"{esc(d.type)} = {esc(d.text)}" for d in e.details)
            if e.study_uids:
                details += "<br>studies: " + esc(", ".join(e.study_uids))
            if e.query is not None:
                details += f"<br>query: {len(e.query)} bytes"
            parts.append(
                f"<tr><td>{esc(e.object_id)}</td>"
                f"<td>{esc(e.id_type.label() if e.id_type else '')}</td>"
                f"<td>{esc(e.type_code)} / {esc(e.role)}</td><td>{details}</td></tr>"
            )
        parts.append("</tbody></table>")
        text = stored.raw.decode("utf-8", "replace")
        parts.append(
            f"<h2>Raw message ({len(stored.raw)} bytes, verbatim)</h2>"
            f'<p><a href="/events/{row.id}/raw" id="raw-download" download>Download raw message</a>'
            f'</p><pre class="raw" id="raw">{esc(text)}</pre>'
        )
        return "".join(parts)

    # ------------------------------------------------------------------ patient report

    async def _report_data(self, form: SearchForm) -> tuple[EventFilter, list[EventRow]]:
        flt = self._filter(form, default_days=self.settings.report_days)
        rows = await self._export_rows(flt)
        return flt, rows

    async def _report(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        if not form.patient:
            body = self._filters_html(form, "/report", patient_required=True) + (
                "<p>Every access to one patient's records across communities: enter a patient "
                f"id. The default period is the last {self.settings.report_days} days.</p>"
            )
            return _html(200, self._page(session, "Patient access report", body))
        flt, rows = await self._report_data(form)
        self.audit.audit_log_used(session.username, request.peer.address, "/report", form.query())
        chart, *_ = await self._timeline(flt, "Accesses over time", "report-timeline")
        users = {r.requestor for r in rows if r.requestor}
        systems = {r.requestor_address or r.peer for r in rows if (r.requestor_address or r.peer)}
        communities = {r.community for r in rows if r.community}
        failures = sum(1 for r in rows if r.outcome not in (None, 0))
        unbound = sum(1 for r in rows if r.source_unbound)
        ids = ", ".join(k.replace("|", " @ ") for k in flt.patients[0]) if flt.patients else ""
        period = (
            f"{_fmt_time(flt.since) if flt.since else 'beginning'} to "
            f"{_fmt_time(flt.until) if flt.until else 'now'}"
        )
        cards = f"""<div class="cards">
<div class="card"><b id="r-accesses">{len(rows)}</b>accesses</div>
<div class="card"><b id="r-users">{len(users)}</b>users</div>
<div class="card"><b id="r-systems">{len(systems)}</b>systems</div>
<div class="card"><b id="r-communities">{len(communities)}</b>communities</div>
<div class="card"><b id="r-failures">{failures}</b>failed or denied</div>
<div class="card"><b id="r-unbound">{unbound}</b>recorded by a sender not bound to its
audit source</div></div>"""
        q = form.query(page=1)
        body = (
            self._filters_html(form, "/report", patient_required=True)
            + f"<p>Patient ids: <b id='r-ids'>{esc(ids)}</b>; period {esc(period)} (UTC).</p>"
            + cards
            + "<h2>Timeline</h2>"
            + chart
            + f'<p class="pager"><a href="/report.csv?{q}" id="report-csv" download>Export CSV</a>'
            f'<a href="/report.pdf?{q}" id="report-pdf" download>Export PDF</a></p>'
            + self._report_table(rows)
        )
        return _html(200, self._page(session, "Patient access report", body))

    def _report_table(self, rows: Sequence[EventRow]) -> str:
        lines = [
            '<table id="report"><thead><tr><th>Time (UTC)</th><th>Who</th><th>From</th>'
            "<th>Community</th><th>Transaction</th><th>Event</th><th>Allowed</th>"
            "<th>Recorded by</th><th>Sent by</th></tr></thead><tbody>"
        ]
        for r in rows:
            allowed = _allowed_badge(r.outcome)
            lines.append(
                f'<tr class="{"fail" if r.outcome not in (None, 0) else ""}">'
                f'<td><a href="/events/{r.id}">{_fmt_time(r.event_time)}</a></td>'
                f"<td>{esc(r.requestor)}</td><td>{esc(r.requestor_address or r.peer)}</td>"
                f"<td>{esc(self._community(r.community))}</td>"
                f"<td>{esc(r.transaction)} {esc(r.transaction_display or '')}</td>"
                f"<td>{esc(r.event_display or r.event_code)}</td><td>{allowed}</td>"
                f'<td class="source">{_source_html(r)}</td>'
                f'<td class="sender">{_sender_html(r.sender_identity)}</td></tr>'
            )
        lines.append("</tbody></table>")
        return "".join(lines)

    async def _report_csv(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        if not form.patient:
            return _html(400, self._page(session, "Bad request", "<p>A patient is required.</p>"))
        _flt, rows = await self._report_data(form)
        self.audit.audit_log_used(
            session.username, request.peer.address, "/report.csv", form.query()
        )
        return _download(
            render.to_csv(self._CSV_HEADER, self._csv_rows(rows)),
            "text/csv; charset=utf-8",
            "patient-access-report.csv",
        )

    async def _report_pdf(self, request: Request, session: Session) -> Response:
        form = SearchForm.from_query(request.query)
        if not form.patient:
            return _html(400, self._page(session, "Bad request", "<p>A patient is required.</p>"))
        flt, rows = await self._report_data(form)
        _svg, series, since, until, bucket = await self._timeline(flt, "Accesses", "pdf")
        self.audit.audit_log_used(
            session.username, request.peer.address, "/report.pdf", form.query()
        )
        ids = ", ".join(k.replace("|", " @ ") for k in flt.patients[0]) if flt.patients else ""
        failures = sum(1 for r in rows if r.outcome not in (None, 0))
        table = render.PdfTable(
            header=(
                "Time (UTC)",
                "Who",
                "From",
                "Community",
                "Transaction",
                "Event",
                "Allowed",
                "Recorded by",
            ),
            widths=(30, 52, 30, 38, 22, 40, 16, 49),
            rows=[
                (
                    _fmt_time(r.event_time),
                    r.requestor,
                    r.requestor_address or r.peer,
                    self.settings.community_names.get(r.community or "", r.community or ""),
                    r.transaction,
                    r.event_display or r.event_code,
                    "yes" if r.outcome == 0 else "NO",
                    _source_text(r),
                )
                for r in rows[:_MAX_PDF_ROWS]
            ],
        )
        more = len(rows) - _MAX_PDF_ROWS
        pdf = await asyncio.to_thread(
            render.report_pdf,
            title="Patient access report",
            subtitle_lines=[
                f"Patient: {ids}",
                f"Period (UTC): {_fmt_time(since)} to {_fmt_time(until)}",
                f"{len(rows)} accesses, {failures} failed or denied, "
                f"{sum(1 for r in rows if r.source_unbound)} from a sender not bound to its "
                "audit source; "
                f"{len({r.requestor for r in rows if r.requestor})} users."
                + (
                    f" The table lists the newest {_MAX_PDF_ROWS}; the CSV has all."
                    if more > 0
                    else ""
                ),
            ],
            chart=series,
            since=since,
            until=until,
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
        cards = "".join(
            f'<div class="card"><b>{esc(v)}</b>{esc(k)}</div>'
            for k, v in (
                ("events stored", status.get("total", "")),
                ("refused handshakes at this repository", counters.get("handshake_failures", 0)),
                (
                    "refused messages (size, rate)",
                    sum(
                        v
                        for k, v in counters.items()
                        if k.startswith(("refused", "connections_ref"))
                    ),
                ),
                ("flagged messages stored", counters.get("stored_flagged", 0)),
                ("dropped (UDP queue full)", counters.get("dropped{queue_full}", 0)),
            )
        )
        node_rows = "".join(
            f"<tr><td>{esc(node or 'unknown')}</td><td>{n}</td></tr>" for node, n in refused_nodes
        )
        failed_rows = "".join(
            f"<tr><td>{esc(t or 'other')}</td><td>{n}</td></tr>" for t, n in failed_top
        )
        user_rows = "".join(
            f'<tr class="{"fail" if unusual else ""}"><td>'
            f'<a href="/events?{urlencode({"user": u})}">{esc(u)}</a></td><td>{last}</td>'
            f"<td>{avg:.1f}</td><td>{'UNUSUAL' if unusual else ''}</td></tr>"
            for u, last, avg, unusual in users
        )
        days_links = " ".join(f'<a href="/dashboard?days={d}">{d} days</a>' for d in (1, 7, 30, 90))
        body = f"""<p>Last {days} day(s), UTC. {days_links}</p>
<div class="cards" id="counters">{cards}</div>
<h2>Refused TLS handshakes</h2>{refused_chart}
<table id="refused-nodes"><thead><tr><th>Node</th><th>Refusals</th></tr></thead>
<tbody>{node_rows}</tbody></table>
<h2>Failed or denied transactions</h2>{failed_chart}
<table id="failed"><thead><tr><th>Transaction</th><th>Failures</th></tr></thead>
<tbody>{failed_rows}</tbody></table>
<h2>Volume per peer</h2>{peer_chart}
<h2>Unusual volumes per user</h2>
<p>Events in the last 24 hours against the user's daily average over the period before;
unusual means more than three times the average and at least 20 events.</p>
<table id="users"><thead><tr><th>User</th><th>Last 24 h</th><th>Daily average before</th>
<th></th></tr></thead><tbody>{user_rows}</tbody></table>"""
        return _html(200, self._page(session, "Security dashboard", body))

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


def _sender_html(sender_identity: str | None) -> str:
    if sender_identity is None:
        return ""
    if is_unauthenticated(sender_identity):
        return f'{esc(sender_identity)} <span class="badge warn">unauthenticated</span>'
    return esc(_sender_text(sender_identity))


def _source_html(row: EventRow) -> str:
    source = esc(row.source_id or row.sender)
    if row.source_unbound:
        return f'{source} <span class="badge bad unbound">not bound to its sender</span>'
    return source


def _source_text(row: EventRow) -> str:
    source = row.source_id or row.sender
    # The warning first: the PDF cuts long cells at the column's end.
    return f"NOT BOUND TO SENDER: {source}" if row.source_unbound else source


def _outcome_badge(outcome: int | None) -> str:
    if outcome is None:
        return '<span class="badge warn">unknown</span>'
    css = "ok" if outcome == 0 else "bad"
    return f'<span class="badge {css}">{esc(OUTCOME_TEXT.get(outcome, outcome))}</span>'


def _allowed_badge(outcome: int | None) -> str:
    if outcome is None:
        return '<span class="badge warn">?</span>'
    if outcome == 0:
        return '<span class="badge ok">yes</span>'
    return f'<span class="badge bad">no ({esc(OUTCOME_TEXT.get(outcome, outcome))})</span>'


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
