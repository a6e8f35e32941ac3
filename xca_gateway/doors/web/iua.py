"""IHE IUA access tokens (RFC 9068 JWT profile) checked at the web door, sans-IO.

The door hands in the ``Authorization`` header (or a session's stored token) and the
authorization server's key set; out comes a :class:`VerifiedToken` or a :class:`TokenError`
with the RFC 6750 error code and a description. Signatures are PyJWT's; what is accepted is
decided here: the algorithm allow-list (asymmetric only, so a public key can never be used as an
HMAC secret), ``typ`` (RFC 9068 §4: ``at+jwt``), issuer, audience, time with a small leeway,
the claims RFC 9068 §2.2 requires, and one of the configured scopes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWKSetError,
)

# Asymmetric signatures only: "none" and HS* (a shared secret the resource server would have to
# hold, and the classic key-confusion attack) are never accepted, whatever the configuration.
ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384"})
DEFAULT_ALGORITHMS = ("RS256", "ES256")
# RFC 9068 §2.1 / §4: the media type of JWT access tokens ("at+jwt", also spelled in full).
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# RFC 9068 §2.2: claims every JWT access token has.
REQUIRED_CLAIMS = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
_MAX_TOKEN_LENGTH = 16 * 1024
_B64URL_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")

ErrorCode = Literal["invalid_request", "invalid_token", "insufficient_scope"]


class TokenError(Exception):
    """Why a request is not authenticated (RFC 6750 §3.1 error codes)."""

    def __init__(
        self,
        error: ErrorCode | None,
        description: str,
        *,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(description)
        # None: no credentials at all (RFC 6750 §3.1: then no error code in the challenge).
        self.error = error
        self.description = description
        # The token's claims when its signature verified (for the audit of a scope refusal).
        self.claims: Mapping[str, Any] = claims or {}

    @property
    def status(self) -> int:
        """RFC 6750 §3.1: 400 for a malformed request, 403 for a missing scope, else 401."""
        return {"invalid_request": 400, "insufficient_scope": 403}.get(self.error or "", 401)


@dataclass(frozen=True)
class TokenRules:
    """What the web door accepts (``[web.iua]``)."""

    issuer: str
    audience: str
    scopes: tuple[str, ...]
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: float = 30.0


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature, issuer, audience, time and scope were checked."""

    raw: str
    issuer: str
    subject: str
    name: str | None
    client_id: str
    scopes: tuple[str, ...]
    expires_at: datetime
    jwt_id: str

    def describe(self) -> str:
        return f"{self.name or ''}<{self.subject}@{self.issuer}>"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1); None when the
    header is absent. Another scheme, or a malformed value, is an ``invalid_request``."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise TokenError("invalid_request", "only the Bearer authorization scheme is accepted")
    token = token.strip()
    if not token or len(token) > _MAX_TOKEN_LENGTH or not _B64URL_JWT.match(token):
        raise TokenError("invalid_token", "the bearer token is not a JWT")
    return token


def token_key_id(token: str, rules: TokenRules) -> str | None:
    """The ``kid`` of a token's header (unverified: only to pick the key), after checking the
    header's ``alg`` and ``typ``, so that a refused algorithm never reaches key lookup."""
    try:
        header = jwt.get_unverified_header(token)
    except InvalidTokenError:
        raise TokenError("invalid_token", "the token header is not readable") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in rules.algorithms or alg not in ALLOWED_ALGORITHMS:
        raise TokenError("invalid_token", f"signature algorithm {str(alg)[:20]!r} is not accepted")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise TokenError("invalid_token", "not a JWT access token (typ must be at+jwt, RFC 9068)")
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None


def parse_key_set(data: Any) -> jwt.PyJWKSet:
    """The authorization server's JWKS document; keys PyJWT cannot use are skipped."""
    try:
        return jwt.PyJWKSet.from_dict(data)
    except (PyJWKSetError, PyJWKError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a usable JWK set: {exc}") from None


def find_key(keys: jwt.PyJWKSet, kid: str | None, alg: str | None = None) -> jwt.PyJWK | None:
    """The key named ``kid``; without a kid, the only signing key the set has."""
    candidates = [k for k in keys.keys if getattr(k, "public_key_use", None) in (None, "sig")]
    if kid is not None:
        candidates = [k for k in candidates if k.key_id == kid]
    elif len(candidates) != 1:
        return None
    return candidates[0] if candidates else None


def _scopes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def verify_token(token: str, key: jwt.PyJWK, rules: TokenRules) -> VerifiedToken:
    """Check everything; raise :class:`TokenError` naming the first thing that is wrong.

    Call :func:`token_key_id` first (it checks the header and picks the key)."""
    alg = str(jwt.get_unverified_header(token).get("alg"))
    if alg not in rules.algorithms or alg not in ALLOWED_ALGORITHMS:
        raise TokenError("invalid_token", f"signature algorithm {alg[:20]!r} is not accepted")
    # The key's algorithm (its "alg", else the one its type implies) must be the token's: an
    # RSA key never verifies an ES256 token, nor the reverse.
    if key.algorithm_name != alg:
        raise TokenError("invalid_token", "the token's algorithm does not match its key")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=rules.audience,
            issuer=rules.issuer,
            leeway=rules.leeway_seconds,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except ExpiredSignatureError:
        raise TokenError("invalid_token", "the token has expired") from None
    except ImmatureSignatureError:
        raise TokenError("invalid_token", "the token is not valid yet") from None
    except InvalidAudienceError:
        raise TokenError("invalid_token", "the token is for another audience") from None
    except InvalidIssuerError:
        raise TokenError("invalid_token", "the token is from another issuer") from None
    except InvalidSignatureError:
        raise TokenError("invalid_token", "the token's signature does not verify") from None
    except MissingRequiredClaimError as exc:
        raise TokenError("invalid_token", f"the token has no {exc.claim!r} claim") from None
    except InvalidTokenError as exc:
        raise TokenError("invalid_token", f"the token is not valid: {exc}"[:200]) from None
    subject, client_id, jti = claims["sub"], claims["client_id"], claims["jti"]
    if not all(isinstance(v, str) and v for v in (subject, client_id, jti)):
        raise TokenError("invalid_token", "sub, client_id and jti must be non-empty strings")
    granted = _scopes(claims.get("scope"))
    if not set(granted) & set(rules.scopes):
        raise TokenError(
            "insufficient_scope",
            f"the token grants none of the scopes {' '.join(rules.scopes)}",
            claims=claims,
        )
    name = claims.get("name") or claims.get("preferred_username")
    return VerifiedToken(
        raw=token,
        issuer=str(claims["iss"]),
        subject=subject,
        name=name if isinstance(name, str) and name else None,
        client_id=client_id,
        scopes=granted,
        expires_at=datetime.fromtimestamp(float(claims["exp"]), UTC),
        jwt_id=jti,
    )


def unverified_subject(token: str) -> tuple[str | None, str | None]:
    """``(iss, sub)`` as an unverified token *claims* them: only for the audit of a refusal,
    where they are labelled as claimed."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except InvalidTokenError:
        return None, None
    iss, sub = claims.get("iss"), claims.get("sub")
    return (
        iss[:200] if isinstance(iss, str) else None,
        sub[:200] if isinstance(sub, str) else None,
    )


def challenge(
    error: TokenError | None, *, realm: str = "xca-gateway", scopes: Sequence[str] = ()
) -> str:
    """The ``WWW-Authenticate`` value of a 401/403 (RFC 6750 §3)."""
    parts = [f'realm="{realm}"']
    if error is not None and error.error is not None:
        parts.append(f'error="{error.error}"')
        description = "".join(c for c in error.description if 32 <= ord(c) < 127 and c not in '"\\')
        parts.append(f'error_description="{description[:200]}"')
        if error.error == "insufficient_scope" and scopes:
            parts.append(f'scope="{" ".join(scopes)}"')
    return "Bearer " + ", ".join(parts)
