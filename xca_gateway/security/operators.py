"""Who may use the admin port's APIs: operators by bearer token, and only through this listener.

APIs mounted on the admin port that read or change state (``/consent``) pass an
:class:`AdminGate` first: the ``Host`` header must name the admin listener (no DNS rebinding),
and ``Authorization: Bearer <token>`` must be one of the operators' tokens from a file (``name
token`` per line, owner-only), kept as SHA-256 digests and compared in constant time. The
operator's name is the principal every change is audited under. See
:mod:`xca_gateway.app.admin` for why tokens."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xca_gateway.protocol.http_server import Request, Response
from xca_gateway.security.callers import (
    AccessDecision,
    Door,
    Identity,
    Principal,
    Role,
    set_current_caller,
)

# A token shorter than this is refused: guessing must stay out of reach (32 characters of
# token_urlsafe carry 192 bits).
MIN_TOKEN_LENGTH = 32


_OPERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class AdminAccessError(ValueError):
    """An operator token file that cannot be used (missing, malformed, readable by others)."""


@dataclass(frozen=True)
class OperatorToken:
    """One operator: a name (audited) and the SHA-256 digest of their bearer token."""

    name: str
    digest: bytes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_operator_tokens(text: str, where: str = "token file") -> tuple[OperatorToken, ...]:
    """``name token`` per line; blank lines and ``#`` comments are skipped."""
    tokens: list[OperatorToken] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise AdminAccessError(f"{where}:{number}: expected 'operator-name token'")
        name, token = parts
        if not _OPERATOR_NAME.match(name):
            raise AdminAccessError(f"{where}:{number}: invalid operator name {name[:40]!r}")
        if len(token) < MIN_TOKEN_LENGTH:
            raise AdminAccessError(
                f"{where}:{number}: the token of {name} is shorter than {MIN_TOKEN_LENGTH} "
                "characters"
            )
        if name in names:
            raise AdminAccessError(f"{where}:{number}: operator {name} is listed twice")
        names.add(name)
        tokens.append(OperatorToken(name, _digest(token)))
    return tuple(tokens)


def load_operator_tokens(path: Path) -> tuple[OperatorToken, ...]:
    """Read an operator token file; it must be readable by its owner only (like an SSH key)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminAccessError(f"operator token file {path}: {exc.strerror or exc}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise AdminAccessError(
            f"operator token file {path} is readable by others (mode "
            f"{stat.S_IMODE(mode):o}): chmod 600 it"
        )
    return parse_operator_tokens(text, str(path))


def write_operator_token_file(path: Path, name: str, token: str | None = None) -> str:
    """Create (or replace) a token file for one operator, mode 0600; returns the token."""
    token = token or secrets.token_urlsafe(32)
    parse_operator_tokens(f"{name} {token}\n")  # the same rules as reading it
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write("# operator token for the admin API (Authorization: Bearer <token>)\n")
            fh.write(f"{name} {token}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return token


def read_operator_token(path: Path, name: str | None = None) -> tuple[str, str]:
    """(operator name, token) from a token file, for a client such as the consent CLI: the
    entry called ``name``, or the only one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminAccessError(f"operator token file {path}: {exc.strerror or exc}") from None
    parse_operator_tokens(text, str(path))  # validate
    entries = [
        tuple(line.split())
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]
    if name is not None:
        entries = [e for e in entries if e[0] == name]
    if len(entries) != 1:
        raise AdminAccessError(
            f"{path}: no operator {name}" if name else f"{path}: several operators, pick one"
        )
    operator, token = entries[0]
    return operator, token


def bearer_operator(authorization: str | None, tokens: Sequence[OperatorToken]) -> str | None:
    """The operator whose token the ``Authorization`` header carries, or None.

    Every configured digest is compared (no early exit) with :func:`hmac.compare_digest` on
    fixed-length digests: neither the answer's timing nor its length tells which bytes
    matched."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    presented = _digest(credentials.strip())
    found: str | None = None
    for entry in tokens:
        if hmac.compare_digest(presented, entry.digest) and found is None:
            found = entry.name
    return found


def allowed_hosts(listener_host: str, port: int) -> frozenset[str]:
    """The ``Host`` values that name this listener: its host and the loopback names, each with
    the port (and without it on port 80, as clients omit a default port)."""
    names = {listener_host.lower(), "localhost", "127.0.0.1", "[::1]"}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    hosts = {f"{n}:{port}" for n in names}
    if port == 80:
        hosts |= names
    return frozenset(hosts)


def host_allowed(host: str | None, listener_host: str, port: int) -> bool:
    return host is not None and host.strip().lower() in allowed_hosts(listener_host, port)


def _refusal(status: int, body: object, headers: Sequence[tuple[str, str]] = ()) -> Response:
    # Closed: a refused request's body is never read.
    return Response(
        status,
        [("content-type", "application/json"), *headers],
        json.dumps(body).encode() + b"\n",
        close=True,
    )


class AdminGate:
    """Host check, then bearer token; the admitted operator becomes the current caller.

    ``listener`` gives the admin listener's configured host and bound port (known only once
    it listens); ``on_refusal`` records the refusal (called once per refused request).
    """

    def __init__(
        self,
        tokens: Sequence[OperatorToken],
        listener: Callable[[], tuple[str, int]],
        *,
        on_refusal: Callable[[AccessDecision, str], None] | None = None,
        realm: str = "xca-gateway admin",
    ) -> None:
        self.tokens = tuple(tokens)
        self.listener = listener
        self.on_refusal = on_refusal
        self.realm = realm

    def admit(self, request: Request, resource: str) -> Principal | Response:
        """The operator (now the current caller), or the refusal to send."""
        identity = Identity(address=request.peer.address)
        host = next((v for k, v in request.headers if k == "host"), None)
        listener_host, port = self.listener()
        if not host_allowed(host, listener_host, port):
            shown = (host or "")[:100]
            self._refuse(
                identity,
                resource,
                f"Host header {shown!r} does not name this admin listener "
                "(a DNS-rebinding web page sends its own name)",
            )
            return _refusal(403, {"error": "the Host header does not name this admin listener"})
        authorization = next((v for k, v in request.headers if k == "authorization"), None)
        operator = bearer_operator(authorization, self.tokens)
        if operator is None:
            reason = (
                "no operator tokens are configured"
                if not self.tokens
                else "no valid operator token"
                if authorization
                else "no operator token (Authorization: Bearer)"
            )
            self._refuse(identity, resource, reason)
            return _refusal(
                401,
                {"error": f"authentication required: {reason}"},
                [("www-authenticate", f'Bearer realm="{self.realm}"')],
            )
        principal = Principal(operator, frozenset({Role.OPERATOR}), identity)
        set_current_caller(principal)
        return principal

    def _refuse(self, identity: Identity, resource: str, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(AccessDecision(False, Door.ADMIN, identity, None, reason), resource)
