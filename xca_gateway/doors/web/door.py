"""The web door: a browser listener where clinicians sign in (IHE IUA) and look at images (WIA).

:class:`WebDoor` serves, on its own port with the gateway's certificate and no client
certificate asked for:

* ``/login`` and ``/oauth/callback``: OAuth 2.0 authorization code with PKCE against the
  authorization server of ``[web.iua]``, ending in a server-side session (cookie
  ``__Host-xca_session``); ``/logout`` ends it;
* ``/dicomweb/...``: the DICOMweb front door's own request handling
  (:meth:`DicomWebFrontDoor.handle`) for a clinician with a bearer token or a session;
* pages others register (:meth:`add_page`: the IID launch, ...) and public prefixes
  (:meth:`add_public`: the viewer's static files).

Every request that reaches data goes through :meth:`DoorGuard.admit` for :data:`Door.WEB` with
the clinician's :class:`Identity`, so the clinician is the current caller: the initiating side's
XUA assertion and every audit record of the request name them. Token checks are the sans-IO
:mod:`xca_gateway.doors.web.iua`; the audit records :mod:`xca_gateway.doors.web.audit`.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode

import jwt

from xca_gateway.audit import messages as m
from xca_gateway.doors.dicomweb.config import DicomWebFrontConfig
from xca_gateway.doors.dicomweb.door import DicomWebFrontDoor
from xca_gateway.doors.dicomweb.negotiation import PREFIX, DicomWebError, parse_route
from xca_gateway.doors.federation import manifest_patient
from xca_gateway.doors.ports import DoorHost
from xca_gateway.doors.web.audit import record_authentication, record_study_viewed
from xca_gateway.doors.web.config import IuaConfig, WebConfig
from xca_gateway.doors.web.iua import (
    TokenError,
    VerifiedToken,
    bearer_token,
    challenge,
    find_key,
    parse_key_set,
    token_key_id,
    unverified_subject,
    verify_token,
)
from xca_gateway.doors.web.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionStore,
    clear_cookie,
    code_challenge,
    parse_cookies,
    safe_next,
    set_cookie,
)
from xca_gateway.protocol.http_server import (
    BodyTooLarge,
    ConnectionLimits,
    HttpServer,
    Request,
    Response,
    ServerTimeouts,
)
from xca_gateway.protocol.tls import HandshakeFailure, server_context
from xca_gateway.security.callers import Door, Identity, Principal

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

PageHandler = Callable[[Request, Principal], Awaitable[Response]]
PublicHandler = Callable[[Request], Awaitable[Response]]

_MAX_REQUEST_BODY = 64 * 1024
# A key set is refetched for an unknown kid at most this often (a flood of made-up kids must
# not become a flood of requests to the authorization server), and anyway after this age.
_JWKS_MIN_REFRESH = 30.0
_JWKS_MAX_AGE = 3600.0
_AUTH_SERVER_TIMEOUT = 10.0
# Studies a bearer-token caller (no session) was audited as viewing, remembered this long.
_VIEWED_SECONDS = 3600.0
_VIEWED_MAX = 100_000


class AuthorizationServerUnavailable(Exception):
    """The authorization server's keys or token endpoint could not be reached."""


def _client_context(config: IuaConfig, default_trust: Any) -> ssl.SSLContext:
    """HTTPS to the authorization server: its certificate must chain to the configured CA."""
    ctx = ssl.create_default_context(cafile=str(config.trust_store or default_trust))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class KeySource:
    """The authorization server's JWKS, cached; refetched on an unknown ``kid`` (key
    rotation) at most every ``_JWKS_MIN_REFRESH`` seconds, and after ``_JWKS_MAX_AGE``."""

    def __init__(
        self,
        jwks_uri: str,
        client: Callable[[], httpx.AsyncClient],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jwks_uri = jwks_uri
        self._client = client
        self.clock = clock
        self._keys: jwt.PyJWKSet | None = None
        self._fetched = -1e18
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def _fetch(self) -> None:
        # local: httpx (~6 MB of RSS) loads at the first call to the authorization server
        import httpx

        self.fetches += 1
        try:
            async with self._client() as client:
                response = await client.get(self.jwks_uri, headers={"accept": "application/json"})
            response.raise_for_status()
            self._keys = parse_key_set(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthorizationServerUnavailable(
                f"the authorization server's keys ({self.jwks_uri}) could not be read: {exc}"
            ) from None
        finally:
            self._fetched = self.clock()

    async def key(self, kid: str | None, alg: str | None = None) -> jwt.PyJWK | None:
        async with self._lock:
            age = self.clock() - self._fetched
            if self._keys is None or age > _JWKS_MAX_AGE:
                await self._fetch()
            assert self._keys is not None
            found = find_key(self._keys, kid, alg)
            if found is None and age > _JWKS_MIN_REFRESH:
                await self._fetch()
                found = find_key(self._keys, kid, alg)
            return found


def _longest(routes: list[tuple[str, Any]], path: str) -> Any:
    """The handler of the longest prefix that ``path`` is, or is below."""
    best: tuple[int, Any] | None = None
    for prefix, handler in routes:
        base = prefix.rstrip("/")
        if (path in (base, prefix) or path.startswith(base + "/")) and (
            best is None or len(base) > best[0]
        ):
            best = (len(base), handler)
    return best[1] if best is not None else None


def _html(
    status: int, title: str, text: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(text)}</p></body></html>"
    )
    return Response(
        status,
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            *(headers or []),
        ],
        body.encode("utf-8"),
    )


def _json(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps({"status": status, "message": message}).encode() + b"\n"
    return Response(
        status,
        [("content-type", "application/json"), ("cache-control", "no-store"), *(headers or [])],
        body,
    )


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(
        303, [("location", location), ("cache-control", "no-store"), *(headers or [])], b""
    )


def wants_html(request: Request) -> bool:
    """A browser navigating to a page (redirect it to sign in), not a script calling an API
    (answer 401 with a Bearer challenge)."""
    accept = request.header("accept") or ""
    return request.method in ("GET", "HEAD") and "text/html" in accept


class WebDoor:
    """The browser listener of ``gateway`` (``[web]``)."""

    def __init__(
        self,
        gateway: DoorHost,
        config: WebConfig,
        *,
        dicomweb: DicomWebFrontConfig | None = None,
        on_handshake_failure: Callable[[HandshakeFailure], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.config = config
        self.iua = config.iua
        self.rules = config.iua.rules
        self.sessions = SessionStore(
            session_seconds=config.session_seconds, max_entries=config.max_sessions
        )
        trust = gateway.config.tls.trust_store
        self._auth_context = _client_context(config.iua, trust)
        self.keys = KeySource(config.iua.jwks_uri, self._auth_client)
        # The DICOMweb door's handling, with this door's base URL in its answers and audit; it
        # never listens itself (the machine door, when [dicomweb] is configured, is another).
        self.dicomweb = DicomWebFrontDoor(
            gateway,
            replace(dicomweb or DicomWebFrontConfig(), tls=False, host="127.0.0.1"),
            base_url=lambda: self.base_url,
        )
        # Browsers have no certificate: none is asked for (a TLS client certificate would not
        # make a person anyway); the gateway's certificate and TLS floor serve the browser.
        context = server_context(gateway.config.tls)
        context.verify_mode = ssl.CERT_NONE
        self.server = HttpServer(
            self,
            ssl_context=context,
            on_handshake_failure=on_handshake_failure,
            timeouts=ServerTimeouts.for_gateway(gateway.config),
            limits=ConnectionLimits.for_gateway(gateway.config),
            on_refused=gateway.connection_refused,
            name="web",
            max_header_bytes=gateway.config.limits.max_header_bytes,
        )
        self._pages: list[tuple[str, PageHandler]] = []
        self._public: list[tuple[str, PublicHandler]] = []
        self._viewed: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._started = False
        # Refused tokens and logins (each audited once), for the operator page and tests.
        self.refused = 0

    # -- registration

    def add_page(self, path_prefix: str, handler: PageHandler) -> None:
        """Serve ``path_prefix`` (and below) with ``handler(request, clinician)`` for a signed-in
        clinician; others are sent to sign in (browser) or get 401 (API)."""
        self._check_prefix(path_prefix)
        self._pages.append((path_prefix, handler))

    def add_public(self, path_prefix: str, handler: PublicHandler) -> None:
        """Serve ``path_prefix`` (and below) to anyone: static assets that hold no data."""
        self._check_prefix(path_prefix)
        self._public.append((path_prefix, handler))

    @staticmethod
    def _check_prefix(prefix: str) -> None:
        reserved = ("/login", "/logout", "/oauth", PREFIX)
        if not prefix.startswith("/") or any(
            prefix.rstrip("/") == r or prefix.startswith(r + "/") for r in reserved
        ):
            raise ValueError(f"{prefix!r} is not a path prefix a page may take")

    # -- addresses

    @property
    def port(self) -> int:
        return self.server.port if self._started else self.config.port

    @property
    def base_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}"

    @property
    def redirect_uri(self) -> str:
        return self.base_url + "/oauth/callback"

    async def start(self, sock: socket.socket | None = None) -> None:
        await self.server.start(self.config.host, self.config.port, sock=sock)
        self._started = True
        log.info("web door on %s (IUA issuer %s)", self.base_url, self.iua.issuer)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.server.close()

    def _auth_client(self) -> httpx.AsyncClient:
        # local: httpx (~6 MB of RSS) loads at the first call to the authorization server
        import httpx

        return httpx.AsyncClient(verify=self._auth_context, timeout=_AUTH_SERVER_TIMEOUT)

    # -- HTTP

    async def __call__(self, request: Request) -> Response:
        try:
            try:
                await request.read(_MAX_REQUEST_BODY)  # no bodies here; lets keep-alive go on
            except BodyTooLarge:
                return _json(413, "request bodies are not accepted here")
            path = request.path
            if path == "/login":
                return self._login(request)
            if path == "/oauth/callback":
                return await self._callback(request)
            if path == "/logout":
                return self._logout(request)
            public = _longest(self._public, path)
            if public is not None:
                response: Response = await public(request)
                return response
            page: PageHandler | None = _longest(self._pages, path)
            data = path == PREFIX or path.startswith(PREFIX + "/")
            if page is None and not data and path != "/":
                return _json(404, f"nothing at {path[:200]}")
            admitted = await self._authenticate(request)
            if isinstance(admitted, Response):
                return admitted
            principal, session = admitted
            if data:
                return await self._dicomweb(request, principal, session)
            if page is not None:
                answer: Response = await page(request, principal)
                return answer
            return _html(
                200,
                "Signed in",
                f"Signed in as {principal.name} ({principal.user_id}) through "
                f"{principal.identity.token_issuer}.",
            )
        except AuthorizationServerUnavailable as exc:
            log.warning("%s", exc)
            return _json(503, "the authorization server cannot be reached; try again later")
        except Exception:
            log.exception("web door request %s failed", request.path[:200])
            return _json(500, "internal error")

    # -- authentication

    async def verify(self, raw: str) -> VerifiedToken:
        """A bearer token checked against the authorization server's keys and ``[web.iua]``."""
        kid = token_key_id(raw, self.rules)
        key = await self.keys.key(kid)
        if key is None:
            raise TokenError(
                "invalid_token", "the token is signed with a key the issuer does not publish"
            )
        return verify_token(raw, key, self.rules)

    def _identity(self, request: Request, token: VerifiedToken) -> Identity:
        return Identity(
            address=request.peer.address,
            token_issuer=token.issuer,
            token_subject=token.subject,
            person_name=token.name,
        )

    async def _authenticate(self, request: Request) -> tuple[Principal, Session | None] | Response:
        """The clinician of the request (bearer token first, else the session cookie), admitted
        at :data:`Door.WEB`; else the answer: a redirect to sign in, or 401/403 audited once."""
        raw: str | None = None
        session: Session | None = None
        try:
            raw = bearer_token(request.header("authorization"))
            if raw is not None:
                token = await self.verify(raw)
            else:
                session = self.sessions.get(parse_cookies(request.headers).get(SESSION_COOKIE))
                if session is None:
                    if wants_html(request) and not request.path.startswith(PREFIX):
                        return _redirect("/login?" + urlencode({"next": request.target}))
                    raise TokenError(None, "no access token (Authorization: Bearer) or session")
                token = session.token
        except TokenError as exc:
            return self._refuse(request, exc, raw)
        decision = self.gateway.guard.admit(
            self._identity(request, token),
            Door.WEB,
            resource=self.base_url + request.path[:200],
        )
        if not decision.allowed or decision.principal is None:
            # The guard audited it (Security Alert: a verified person whose issuer or roles
            # do not admit this door).
            return _json(403, "access denied: not a clinician of this community")
        return decision.principal, session

    def _refuse(self, request: Request, error: TokenError, raw: str | None) -> Response:
        """401 (403 for a missing scope) with an RFC 6750 challenge, audited once."""
        self.refused += 1
        claimed_iss, claimed_sub = unverified_subject(raw) if raw else (None, None)
        if error.claims:  # the signature verified: these are the token's, not a claim
            claimed_iss, claimed_sub = error.claims.get("iss"), error.claims.get("sub")
            user_id, user_name = str(claimed_sub), f"<{claimed_sub}@{claimed_iss}>"
        elif claimed_sub:
            user_id = f"{claimed_sub}{_claimed()}"
            user_name = f"<{claimed_sub}@{claimed_iss}>{_claimed()}"
        else:
            user_id, user_name = request.peer.address, None
        log.warning(
            "web door refused %s at %s: %s",
            user_id,
            request.path[:200],
            error.description,
        )
        record_authentication(
            self,
            request,
            user_id=user_id,
            user_name=user_name,
            outcome=m.EventOutcome.MINOR_FAILURE,
            description=f"{request.path[:200]}: {error.description}",
        )
        header = ("www-authenticate", challenge(error, scopes=self.rules.scopes))
        status = error.status
        return _json(status, error.description, [header])

    # -- login

    def _login(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _json(405, "GET /login?next=<path>", [("allow", "GET")])
        params = dict(parse_qsl(request.query, max_num_fields=20))
        login = self.sessions.begin_login(safe_next(params.get("next")))
        query = {
            "response_type": "code",
            "client_id": self.iua.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.iua.request_scopes),
            "state": login.state,
            "code_challenge": code_challenge(login.code_verifier),
            "code_challenge_method": "S256",
            # RFC 8707: the token is to be for this gateway (its "aud").
            "resource": self.iua.audience,
        }
        separator = "&" if "?" in self.iua.authorization_endpoint else "?"
        return _redirect(
            self.iua.authorization_endpoint + separator + urlencode(query),
            [("set-cookie", set_cookie(LOGIN_COOKIE, login.binding, max_age=600))],
        )

    async def _callback(self, request: Request) -> Response:
        params = dict(parse_qsl(request.query, max_num_fields=20))
        cookies = parse_cookies(request.headers)
        login = self.sessions.take_login(params.get("state", ""), cookies.get(LOGIN_COOKIE))
        clear_login = ("set-cookie", clear_cookie(LOGIN_COOKIE))
        if login is None:
            # The browser's own login cookie stays: a forged callback (another site's link)
            # must not break the sign-in this browser has under way.
            return self._login_failed(
                request,
                "this sign-in is unknown, was used already, has expired, or began in another "
                "browser; start again",
            )
        if "error" in params:
            return self._login_failed(
                request,
                f"the authorization server refused: {params['error'][:100]}",
                clear_login,
            )
        code = params.get("code")
        if not code:
            return self._login_failed(request, "no authorization code came back", clear_login)
        try:
            raw = await self._exchange(code, login.code_verifier)
            token = await self.verify(raw)
        except TokenError as exc:
            return self._login_failed(
                request, f"the access token was refused: {exc.description}", clear_login
            )
        decision = self.gateway.guard.admit(
            self._identity(request, token), Door.WEB, resource=self.base_url + request.path
        )
        if not decision.allowed or decision.principal is None:
            return _html(
                403, "Access denied", "You are not a clinician of this community.", [clear_login]
            )
        session = self.sessions.create(token)
        principal = decision.principal
        record_authentication(
            self,
            request,
            user_id=principal.user_id,
            user_name=principal.audit_user_name,
            outcome=m.EventOutcome.SUCCESS,
        )
        max_age = max(1, int(session.expires - self.sessions.clock()))
        return _redirect(
            login.next_path,
            [clear_login, ("set-cookie", set_cookie(SESSION_COOKIE, session.id, max_age=max_age))],
        )

    def _login_failed(self, request: Request, reason: str, *headers: tuple[str, str]) -> Response:
        self.refused += 1
        log.warning("web door sign-in refused from %s: %s", request.peer.address, reason)
        record_authentication(
            self,
            request,
            user_id=request.peer.address,
            user_name=None,
            outcome=m.EventOutcome.MINOR_FAILURE,
            description=f"sign-in refused: {reason}",
        )
        return _html(400, "Sign-in failed", reason, list(headers))

    async def _exchange(self, code: str, verifier: str) -> str:
        """The authorization code for an access token at the token endpoint (RFC 6749 §4.1.3
        with the PKCE verifier, RFC 7636 §4.5)."""
        # local: httpx (~6 MB of RSS) loads at the first call to the authorization server
        import httpx

        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "client_id": self.iua.client_id,
            "code_verifier": verifier,
            "resource": self.iua.audience,
        }
        try:
            async with self._auth_client() as client:
                response = await client.post(
                    self.iua.token_endpoint, data=form, headers={"accept": "application/json"}
                )
        except httpx.HTTPError as exc:
            raise AuthorizationServerUnavailable(f"token endpoint: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if response.status_code != 200 or not isinstance(answer, dict):
            error = answer.get("error", response.status_code) if isinstance(answer, dict) else ""
            raise TokenError("invalid_token", f"the token endpoint refused the code ({error})")
        token = answer.get("access_token")
        if not isinstance(token, str) or str(answer.get("token_type", "")).lower() != "bearer":
            raise TokenError("invalid_token", "the token endpoint gave no bearer access token")
        return token

    def _logout(self, request: Request) -> Response:
        if request.method != "POST":
            return _json(405, "POST /logout", [("allow", "POST")])
        session = self.sessions.end(parse_cookies(request.headers).get(SESSION_COOKIE))
        if session is not None:
            token = session.token
            record_authentication(
                self,
                request,
                event="logout",
                user_id=token.subject,
                user_name=token.describe(),
                outcome=m.EventOutcome.SUCCESS,
            )
        return _html(
            200,
            "Signed out",
            "You are signed out of the gateway.",
            [("set-cookie", clear_cookie(SESSION_COOKIE))],
        )

    # -- data

    async def _dicomweb(
        self, request: Request, principal: Principal, session: Session | None
    ) -> Response:
        response = await self.dicomweb.handle(request)
        try:
            route = parse_route(request.path)
        except DicomWebError:
            route = None
        if (
            route is None
            or route.study is None
            or route.kind == "search"
            or response.status not in (200, 206)
        ):
            return response
        study = route.study
        previous = response.on_complete

        def complete(ok: bool) -> None:
            if previous is not None:
                previous(ok)
            if ok:
                self._study_viewed(request, principal, session, study)

        response.on_complete = complete
        return response

    def _study_viewed(
        self, request: Request, principal: Principal, session: Session | None, study: str
    ) -> None:
        """One 110103 per clinician, study and session (a viewer fetches a study piece by
        piece; the officer wants "who viewed what", not every frame)."""
        if session is not None:
            if study in session.viewed:
                return
            session.viewed.add(study)
        else:
            key = (principal.key, study)
            now = time.monotonic()
            while self._viewed and next(iter(self._viewed.values())) <= now:
                self._viewed.popitem(last=False)
            if key in self._viewed:
                return
            self._viewed[key] = now + _VIEWED_SECONDS
            while len(self._viewed) > _VIEWED_MAX:
                self._viewed.popitem(last=False)
        studies = self.dicomweb.view.cached_manifests([study])
        patient = manifest_patient(studies[0].header) if studies else None
        record_study_viewed(
            self,
            request,
            principal,
            study_uid=study,
            patient=patient,
            community=studies[0].manifest.home_community_id if studies else None,
        )


def _claimed() -> str:
    return " (claimed, unverified)"


def login_url(base_url: str, next_path: str) -> str:
    """Where a page sends a browser to sign in and come back to ``next_path``."""
    return f"{base_url}/login?next={quote(safe_next(next_path), safe='/')}"
