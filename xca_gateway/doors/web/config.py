"""The ``[web]`` configuration table of the web door (browsers, IUA tokens), validated.

Pure: a dict from the TOML file in, a frozen :class:`WebConfig` or a :class:`ConfigError` out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from xca_gateway.doors.web.iua import ALLOWED_ALGORITHMS, DEFAULT_ALGORITHMS, TokenRules
from xca_gateway.schema import (
    Count,
    HttpsUrl,
    HttpUrl,
    NonEmpty,
    OneOf,
    PathText,
    Port,
    Range,
    Seconds,
    Section,
    Strings,
)

DEFAULT_PORT = 8445
_URL = re.compile(r"^https?://[^/\s?#]+(/\S*)?$")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class IuaConfig:
    """``[web.iua]``: the authorization server the operator trusts, and what a token needs."""

    issuer: str
    jwks_uri: str
    authorization_endpoint: str
    token_endpoint: str
    client_id: str
    audience: str
    scopes: tuple[str, ...] = ("dicomweb.read",)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: float = 30.0
    # CA bundle for the authorization server's HTTPS (default: the gateway's trust store).
    trust_store: Path | None = None
    # Scopes the login asks for (default: openid + the accepted scopes).
    request_scopes: tuple[str, ...] = ()

    @property
    def rules(self) -> TokenRules:
        return TokenRules(
            issuer=self.issuer,
            audience=self.audience,
            scopes=self.scopes,
            algorithms=self.algorithms,
            leeway_seconds=self.leeway_seconds,
        )


@dataclass(frozen=True)
class WebConfig:
    enabled: bool
    iua: IuaConfig
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # How browsers reach the door (redirect_uri, RetrieveURLs); default https://host:port.
    public_url: str | None = None
    # Longest a browser session lasts (it never outlives its token either).
    session_seconds: float = 8 * 3600.0
    # Most sessions (and pending logins) held at once; the oldest go first.
    max_sessions: int = 10_000


Algorithm = Annotated[str, OneOf(tuple(sorted(ALLOWED_ALGORITHMS)))]


class IuaSection(Section):
    """The authorization server whose tokens (IUA, RFC 9068 JWT access tokens) the web door
    accepts, and what a token needs."""

    issuer: NonEmpty = Field(
        description="The authorization server (its 'iss').",
        examples=["https://auth.north.example.org"],
    )
    jwks_uri: HttpUrl = Field(
        description="Its signing keys (JWKS).",
        examples=["https://auth.north.example.org/jwks"],
    )
    authorization_endpoint: HttpUrl = Field(
        description="Where browsers log in (code flow with PKCE).",
        examples=["https://auth.north.example.org/authorize"],
    )
    token_endpoint: HttpUrl = Field(
        description="Where the door redeems the code.",
        examples=["https://auth.north.example.org/token"],
    )
    client_id: NonEmpty = Field(
        description="This gateway's OAuth client id.", examples=["xca-gateway-north"]
    )
    audience: NonEmpty = Field(
        description="The 'aud' tokens for this gateway carry.",
        examples=["https://gw.north.example.org:8445"],
    )
    scopes: Annotated[list[NonEmpty], Field(min_length=1)] = Field(
        ["dicomweb.read"], description="Scopes a token must have."
    )
    algorithms: Annotated[list[Algorithm], Field(min_length=1)] = Field(
        list(DEFAULT_ALGORITHMS), description="Signature algorithms accepted (asymmetric only)."
    )
    leeway_seconds: Annotated[float, Range(0, 300)] = Field(
        30.0, description="Clock skew tolerated on exp / nbf / iat."
    )
    trust_store: PathText | None = Field(
        None,
        description="CAs of the authorization server's HTTPS (default: the [tls] trust store).",
        examples=["../certs/auth-ca.pem"],
    )
    request_scopes: Strings | None = Field(
        None,
        description="Scopes the login asks for (default: openid and the accepted scopes).",
        examples=[["openid", "dicomweb.read"]],
    )


class WebSection(Section):
    """The web door: browsers (the IID launch, the viewer, DICOMweb) authenticated with IUA
    tokens of the authorization server in [web.iua]; callers are people matched by token issuer
    in [[policy.callers]]."""

    enabled: bool = Field(True, description="Build the door (false: the section is ignored).")
    host: NonEmpty = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(DEFAULT_PORT, description="TCP port (0: any free port).")
    public_url: HttpsUrl | None = Field(
        None,
        description=(
            "How browsers reach the door (redirect_uri, RetrieveURLs; default https://host:port)."
        ),
        examples=["https://viewer.north.example.org"],
    )
    session_seconds: Seconds = Field(
        8 * 3600.0, description="Longest a browser session lasts (never longer than its token)."
    )
    max_sessions: Count = Field(
        10_000, description="Sessions (and pending logins) held at once; the oldest go first."
    )
    iua: IuaSection | None = Field(
        None, description="The authorization server (required when the door is enabled)."
    )


def _url(table: dict[str, Any], key: str, what: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not _URL.match(value):
        raise ConfigError(f"{what}.{key} must be an http(s) URL")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what} must be a non-empty list of strings")
    return tuple(value)


def parse_iua_config(table: dict[str, Any], base_dir: Path) -> IuaConfig:
    what = "web.iua"
    known = {
        "issuer",
        "jwks_uri",
        "authorization_endpoint",
        "token_endpoint",
        "client_id",
        "audience",
        "scopes",
        "algorithms",
        "leeway_seconds",
        "trust_store",
        "request_scopes",
    }
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[{what}]: unknown key(s) {', '.join(sorted(unknown))}")
    issuer = table.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise ConfigError(f"{what}.issuer must name the authorization server (its 'iss')")
    client_id = table.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise ConfigError(f"{what}.client_id must be this gateway's OAuth client id")
    audience = table.get("audience")
    if not isinstance(audience, str) or not audience:
        raise ConfigError(f"{what}.audience must be the 'aud' tokens for this gateway carry")
    algorithms = _strings(table.get("algorithms", list(DEFAULT_ALGORITHMS)), f"{what}.algorithms")
    refused = [a for a in algorithms if a not in ALLOWED_ALGORITHMS]
    if refused:
        raise ConfigError(
            f"{what}.algorithms: {', '.join(refused)} not accepted (asymmetric signatures only: "
            f"{', '.join(sorted(ALLOWED_ALGORITHMS))})"
        )
    leeway = table.get("leeway_seconds", 30.0)
    if isinstance(leeway, bool) or not isinstance(leeway, int | float) or not 0 <= leeway <= 300:
        raise ConfigError(f"{what}.leeway_seconds must be between 0 and 300")
    trust = table.get("trust_store")
    if trust is not None and not isinstance(trust, str):
        raise ConfigError(f"{what}.trust_store must be a path")
    scopes = _strings(table.get("scopes", ["dicomweb.read"]), f"{what}.scopes")
    return IuaConfig(
        issuer=issuer,
        jwks_uri=_url(table, "jwks_uri", what),
        authorization_endpoint=_url(table, "authorization_endpoint", what),
        token_endpoint=_url(table, "token_endpoint", what),
        client_id=client_id,
        audience=audience,
        scopes=scopes,
        algorithms=algorithms,
        leeway_seconds=float(leeway),
        trust_store=(base_dir / trust) if trust else None,
        request_scopes=(
            _strings(table["request_scopes"], f"{what}.request_scopes")
            if "request_scopes" in table
            else ("openid", *scopes)
        ),
    )


def parse_web_config(table: dict[str, Any], base_dir: Path) -> WebConfig | None:
    """Validate ``[web]``; None when it is disabled (the door is not built)."""
    known = {"enabled", "host", "port", "public_url", "session_seconds", "max_sessions", "iua"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[web]: unknown key(s) {', '.join(sorted(unknown))}")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("web.enabled must be true or false")
    if not enabled:
        return None
    host = table.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError("web.host must be a host name or address")
    port = table.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("web.port must be a TCP port number (0 = any free port)")
    public = table.get("public_url")
    if public is not None and (not isinstance(public, str) or not public.startswith("https://")):
        # Session cookies are __Host- cookies: Secure, so the browser must see https.
        raise ConfigError("web.public_url must be an https URL")
    seconds = table.get("session_seconds", 8 * 3600.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise ConfigError("web.session_seconds must be a positive number of seconds")
    max_sessions = table.get("max_sessions", 10_000)
    if not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1:
        raise ConfigError("web.max_sessions must be a positive integer")
    iua = table.get("iua")
    if not isinstance(iua, dict):
        raise ConfigError("[web.iua] is required: the authorization server whose tokens count")
    return WebConfig(
        enabled=True,
        iua=parse_iua_config(iua, base_dir),
        host=host,
        port=port,
        public_url=public.rstrip("/") if public else None,
        session_seconds=float(seconds),
        max_sessions=max_sessions,
    )
