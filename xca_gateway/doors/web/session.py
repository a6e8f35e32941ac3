"""Browser logins and sessions of the web door, sans-IO.

A login (OAuth 2.0 authorization code with PKCE, RFC 7636) starts with a random ``state`` kept
here with the PKCE verifier, the page to return to and a browser binding (a random value also
set as a short-lived ``__Host-`` cookie): the callback is accepted once, within minutes, from the
browser that started it. A session is a random id in an HttpOnly cookie; the access token stays
on the server. Both stores are bounded (the oldest go first) and expire on their own.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from xca_gateway.doors.web.iua import VerifiedToken

SESSION_COOKIE = "__Host-xca_session"
LOGIN_COOKIE = "__Host-xca_login"
LOGIN_SECONDS = 600.0


def pkce_pair() -> tuple[str, str]:
    """``(code_verifier, code_challenge)`` for the S256 method (RFC 7636 §4.1-4.2)."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def safe_next(value: str | None) -> str:
    """Where to go after login: a path of this origin only (no scheme, host, ``//`` or
    backslash tricks), else ``/``: an open redirect would hand the session to anyone's page."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if any(ord(c) < 32 or c == "\\" for c in value) or len(value) > 2000:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def parse_cookies(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Cookies of a request (RFC 6265 §5.4); the first of a repeated name counts."""
    cookies: dict[str, str] = {}
    for key, value in headers:
        if key != "cookie":
            continue
        for pair in value.split(";"):
            name, sep, content = pair.strip().partition("=")
            if sep and name and name not in cookies:
                cookies[name] = content.strip().strip('"')
    return cookies


def set_cookie(name: str, value: str, *, max_age: int, path: str = "/") -> str:
    """A ``Set-Cookie`` value for a ``__Host-`` cookie: Secure, Path=/, no Domain (RFC 6265bis
    §4.1.3.2), HttpOnly (scripts never see it), SameSite=Lax (sent on a top-level navigation
    from the EHR, not on cross-site subrequests)."""
    return f"{name}={value}; Path={path}; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"


def clear_cookie(name: str) -> str:
    return set_cookie(name, "", max_age=0)


@dataclass
class PendingLogin:
    state: str
    code_verifier: str
    next_path: str
    binding: str
    expires: float


@dataclass
class Session:
    id: str
    token: VerifiedToken
    expires: float
    # Studies this session viewed already (one "Instances Accessed" record each).
    viewed: set[str] = field(default_factory=set)


_T = TypeVar("_T", PendingLogin, Session)


class SessionStore:
    """Pending logins and sessions of one web door (in memory: a restart signs people out)."""

    def __init__(
        self,
        *,
        session_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.session_seconds = session_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._logins: OrderedDict[str, PendingLogin] = OrderedDict()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _bound(self, entries: OrderedDict[str, _T]) -> None:
        # Insertion order is expiry order (one lifetime per store), so the front expires first.
        now = self.clock()
        while entries and next(iter(entries.values())).expires <= now:
            entries.popitem(last=False)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def begin_login(self, next_path: str) -> PendingLogin:
        verifier, _ = pkce_pair()
        login = PendingLogin(
            state=secrets.token_urlsafe(32),
            code_verifier=verifier,
            next_path=safe_next(next_path),
            binding=secrets.token_urlsafe(32),
            expires=self.clock() + LOGIN_SECONDS,
        )
        self._logins[login.state] = login
        self._bound(self._logins)
        return login

    def take_login(self, state: str, binding: str | None) -> PendingLogin | None:
        """The login ``state`` names, once: None when unknown (forged), used already
        (replayed), expired, or coming back to another browser than the one that began it."""
        login = self._logins.pop(state, None)
        if login is None or login.expires <= self.clock():
            return None
        if binding is None or not secrets.compare_digest(login.binding, binding):
            return None
        return login

    def create(self, token: VerifiedToken) -> Session:
        expires = min(self.clock() + self.session_seconds, token.expires_at.timestamp())
        session = Session(id=secrets.token_urlsafe(32), token=token, expires=expires)
        self._sessions[session.id] = session
        self._bound(self._sessions)
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= self.clock():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str | None) -> Session | None:
        return self._sessions.pop(session_id, None) if session_id else None


def code_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
