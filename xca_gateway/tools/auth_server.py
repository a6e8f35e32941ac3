"""A small OAuth 2.0 authorization server for loopback demos (IHE IUA Authorization Server).

Not for production: demo clinicians with passwords from the demo workdir, in memory codes.
What it does is what the web door needs of a real one (Keycloak, an EHR's IdP):

* ``GET /authorize`` (authorization code, RFC 6749 §4.1, with PKCE S256, RFC 7636, required)
  shows a login page; ``POST /authorize`` checks the password and redirects back with a
  one-use code bound to the client, redirect URI, PKCE challenge and audience (``resource``,
  RFC 8707);
* ``POST /token`` exchanges the code (and verifier) for an RFC 9068 JWT access token
  (``typ: at+jwt``; ``iss``, ``sub``, ``aud``, ``exp``, ``iat``, ``jti``, ``client_id``,
  ``scope``, ``name``) signed ES256 with a key it generates once in its directory;
* ``GET /jwks`` publishes the public key; ``GET /.well-known/oauth-authorization-server``
  the metadata (RFC 8414).

It serves HTTPS with a certificate of the development PKI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import html
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from xca_gateway.protocol.http_server import HttpServer, Request, Response

log = logging.getLogger(__name__)

KEY_FILE = "signing-key.pem"
STATE_FILE = "auth-server.json"
CODE_SECONDS = 60.0
TOKEN_SECONDS = 3600
_MAX_BODY = 16 * 1024


@dataclass(frozen=True)
class Clinician:
    username: str
    password: str
    name: str
    community: str

    @property
    def subject(self) -> str:
        # Stable and opaque enough for a demo: the login name (RFC 9068 "sub").
        return self.username

    def to_json(self) -> dict[str, str]:
        return {
            "username": self.username,
            "password": self.password,
            "name": self.name,
            "community": self.community,
        }


@dataclass(frozen=True)
class Client:
    """A registered OAuth client (a gateway's web door): where codes may go, which ``aud``."""

    client_id: str
    redirect_uris: tuple[str, ...]
    audience: str

    def to_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "redirect_uris": list(self.redirect_uris),
            "audience": self.audience,
        }


@dataclass(frozen=True)
class AuthServerState:
    """What the server knows (``DIR/auth-server.json``; the key in ``DIR/signing-key.pem``)."""

    issuer: str
    clinicians: tuple[Clinician, ...]
    clients: tuple[Client, ...]
    scopes: tuple[str, ...] = ("openid", "dicomweb.read", "user/*.read")

    def to_json(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "clinicians": [c.to_json() for c in self.clinicians],
            "clients": [c.to_json() for c in self.clients],
            "scopes": list(self.scopes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuthServerState:
        return cls(
            issuer=str(data["issuer"]),
            clinicians=tuple(Clinician(**c) for c in data["clinicians"]),
            clients=tuple(
                Client(c["client_id"], tuple(c["redirect_uris"]), c["audience"])
                for c in data["clients"]
            ),
            scopes=tuple(data.get("scopes", cls.scopes)),
        )


def demo_clinicians(communities: Sequence[str], directory: Path) -> list[Clinician]:
    """One demo clinician per community; passwords kept in the directory across restarts."""
    known: dict[str, Clinician] = {}
    path = directory / STATE_FILE
    if path.exists():
        try:
            for c in json.loads(path.read_text())["clinicians"]:
                known[c["username"]] = Clinician(**c)
        except (ValueError, KeyError, TypeError):
            known = {}
    result = []
    for community in communities:
        username = f"dr-{community}"
        result.append(
            known.get(username)
            or Clinician(
                username=username,
                password=secrets.token_urlsafe(12),
                name=f"Dr {community.capitalize()} Clinician",
                community=community,
            )
        )
    return result


def signing_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    """The server's ES256 key, generated once (mode 0600) and kept."""
    path = directory / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def key_id(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638-style thumbprint of the public key, as its ``kid``."""
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def write_state(directory: Path, state: AuthServerState) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


@dataclass
class _Code:
    clinician: Clinician
    client: Client
    redirect_uri: str
    challenge: str
    scope: str
    audience: str
    expires: float


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _json(status: int, data: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(
        status,
        [
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
            ("pragma", "no-cache"),
            *headers,
        ],
        (json.dumps(data) + "\n").encode(),
    )


def _oauth_error(status: int, error: str, description: str) -> Response:
    return _json(status, {"error": error, "error_description": description})


@dataclass
class AuthServer:
    """The HTTP application (sans sockets: :func:`serve` puts it on one)."""

    state: AuthServerState
    key: ec.EllipticCurvePrivateKey
    token_seconds: int = TOKEN_SECONDS
    codes: dict[str, _Code] = field(default_factory=dict)
    issued: int = 0

    @property
    def kid(self) -> str:
        return key_id(self.key)

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return {"keys": [jwk]}

    def metadata(self) -> dict[str, Any]:
        issuer = self.state.issuer
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": list(self.state.scopes),
        }

    def issue_token(self, clinician: Clinician, client: Client, audience: str, scope: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.state.issuer,
            "sub": clinician.subject,
            "aud": audience,
            "exp": now + self.token_seconds,
            "iat": now,
            "nbf": now,
            "jti": uuid.uuid4().hex,
            "client_id": client.client_id,
            "scope": scope,
            "name": clinician.name,
            "preferred_username": clinician.username,
        }
        self.issued += 1
        return jwt.encode(
            claims, self.key, algorithm="ES256", headers={"kid": self.kid, "typ": "at+jwt"}
        )

    # -- HTTP

    async def __call__(self, request: Request) -> Response:
        try:
            body = await request.read(_MAX_BODY)
        except Exception:
            return _oauth_error(413, "invalid_request", "request body too large")
        path = request.path
        if path == "/jwks" and request.method == "GET":
            return _json(200, self.jwks())
        if path == "/.well-known/oauth-authorization-server":
            return _json(200, self.metadata())
        if path == "/authorize" and request.method == "GET":
            return self._authorize_page(dict(parse_qsl(request.query, max_num_fields=30)))
        if path == "/authorize" and request.method == "POST":
            form = dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=30))
            return self._authorize_login(form)
        if path == "/token" and request.method == "POST":
            form = dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=30))
            return self._token(form)
        if path == "/":
            return _json(200, self.metadata())
        return _json(404, {"error": "not_found"})

    def _client(self, params: Mapping[str, str]) -> tuple[Client, str] | Response:
        """The client and redirect URI of an authorization request. Errors here are shown to
        the user, never redirected (RFC 6749 §4.1.2.1: an unverified redirect URI)."""
        client = next(
            (c for c in self.state.clients if c.client_id == params.get("client_id")), None
        )
        if client is None:
            return self._page(400, "Unknown client", "This application is not registered.")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            return self._page(400, "Bad redirect", "The redirect URI is not registered.")
        return client, redirect_uri

    def _check_request(self, params: Mapping[str, str], client: Client) -> str | None:
        if params.get("response_type") != "code":
            return "unsupported_response_type"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return "invalid_request"
        if params.get("resource", client.audience) != client.audience:
            return "invalid_target"
        return None

    def _authorize_page(self, params: Mapping[str, str], error: str | None = None) -> Response:
        found = self._client(params)
        if isinstance(found, Response):
            return found
        client, redirect_uri = found
        problem = self._check_request(params, client)
        if problem is not None:
            query = {"error": problem, "state": params.get("state", "")}
            return Response(303, [("location", f"{redirect_uri}?{urlencode(query)}")], b"")
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in params.items()
            if k
            in (
                "response_type",
                "client_id",
                "redirect_uri",
                "scope",
                "state",
                "code_challenge",
                "code_challenge_method",
                "resource",
            )
        )
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        body = (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<title>Sign in - demo authorization server</title></head><body>"
            "<h1>Sign in</h1><p>Demo authorization server (loopback only).</p>"
            f"{message}<form method='post' action='/authorize'>{hidden}"
            "<label>User name <input name='username' id='username' autocomplete='username'>"
            "</label><br><label>Password <input name='password' id='password' "
            "type='password' autocomplete='current-password'></label><br>"
            "<button type='submit' id='sign-in'>Sign in</button></form></body></html>"
        )
        return Response(
            401 if error else 200,
            [("content-type", "text/html; charset=utf-8"), ("cache-control", "no-store")],
            body.encode(),
        )

    def _page(self, status: int, title: str, text: str) -> Response:
        body = (
            f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(text)}</p></body></html>"
        )
        return Response(status, [("content-type", "text/html; charset=utf-8")], body.encode())

    def _authorize_login(self, form: Mapping[str, str]) -> Response:
        found = self._client(form)
        if isinstance(found, Response):
            return found
        client, redirect_uri = found
        if self._check_request(form, client) is not None:
            return self._authorize_page(form)
        clinician = next(
            (c for c in self.state.clinicians if c.username == form.get("username")), None
        )
        if clinician is None or not secrets.compare_digest(
            clinician.password.encode(), form.get("password", "").encode()
        ):
            return self._authorize_page(form, "Wrong user name or password.")
        now = time.monotonic()
        for stale in [k for k, c in self.codes.items() if c.expires <= now]:
            del self.codes[stale]
        code = secrets.token_urlsafe(32)
        requested = form.get("scope", "").split()
        granted = [s for s in requested if s in self.state.scopes] or ["dicomweb.read"]
        self.codes[code] = _Code(
            clinician=clinician,
            client=client,
            redirect_uri=redirect_uri,
            challenge=form["code_challenge"],
            scope=" ".join(granted),
            audience=form.get("resource", client.audience),
            expires=now + CODE_SECONDS,
        )
        query = {"code": code, "state": form.get("state", "")}
        return Response(
            303,
            [("location", f"{redirect_uri}?{urlencode(query)}"), ("cache-control", "no-store")],
            b"",
        )

    def _token(self, form: Mapping[str, str]) -> Response:
        if form.get("grant_type") != "authorization_code":
            return _oauth_error(400, "unsupported_grant_type", "authorization_code only")
        code = self.codes.pop(form.get("code", ""), None)  # one use, whatever happens next
        if code is None or code.expires <= time.monotonic():
            return _oauth_error(400, "invalid_grant", "unknown, used or expired code")
        if form.get("client_id") != code.client.client_id:
            return _oauth_error(400, "invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != code.redirect_uri:
            return _oauth_error(400, "invalid_grant", "redirect_uri differs from the request's")
        verifier = form.get("code_verifier", "")
        if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(
            _s256(verifier), code.challenge
        ):
            return _oauth_error(400, "invalid_grant", "PKCE verification failed")
        token = self.issue_token(code.clinician, code.client, code.audience, code.scope)
        return _json(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.token_seconds,
                "scope": code.scope,
            },
        )


def server_context(certificate: Path, private_key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate, private_key)
    return ctx


async def serve(
    directory: Path,
    *,
    certificate: Path,
    private_key: Path,
    sock: socket.socket | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> None:
    state = AuthServerState.from_json(json.loads((directory / STATE_FILE).read_text()))
    app = AuthServer(state, signing_key(directory))
    server = HttpServer(app, ssl_context=server_context(certificate, private_key), name="auth")
    await server.start(host, port, sock=sock)
    log.info("demo authorization server %s on port %d", state.issuer, server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xca_gateway.tools.auth_server",
        description="The demo's OAuth 2.0 authorization server (loopback demos only).",
    )
    parser.add_argument("--dir", type=Path, required=True, help="state directory")
    parser.add_argument("--certificate", type=Path, required=True)
    parser.add_argument("--private-key", type=Path, required=True)
    parser.add_argument("--fd", type=int, help="an inherited listening socket")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sock = socket.socket(fileno=args.fd) if args.fd is not None else None
    asyncio.run(
        serve(
            args.dir,
            certificate=args.certificate,
            private_key=args.private_key,
            sock=sock,
            port=args.port,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
