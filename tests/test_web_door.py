"""The web door: clinicians with IUA bearer tokens (RFC 9068 JWTs) and browser sessions.

Pure checks of the token rules and the login state first; then two real communities (alpha with
the web door, beta its peer reached over ITI-38/39 and RAD-75 with XUA) and the demo
authorization server, all on loopback TLS sockets. Alpha and beta audit over syslog UDP to
sockets the tests read, so "audited once" is counted in the records that left the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from lxml import etree

from tests.audit_inbox import AuditInbox
from tests.communities import ARC, seed_community
from tests.conftest import GatewayThread, policy_for_tests, policy_toml, wait_for
from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit.validate import schema_errors
from xca_gateway.doors.web.config import ConfigError, parse_web_config
from xca_gateway.doors.web.iua import (
    TokenError,
    TokenRules,
    bearer_token,
    challenge,
    find_key,
    parse_key_set,
    token_key_id,
    verify_token,
)
from xca_gateway.doors.web.session import SessionStore, code_challenge, pkce_pair, safe_next
from xca_gateway.protocol.http_server import HttpServer
from xca_gateway.security.callers import (
    ACCESS,
    CallerDirectory,
    CallerRule,
    Door,
    Identity,
    Role,
    decide,
)
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.auth_server import (
    AuthServer,
    AuthServerState,
    Client,
    Clinician,
    server_context,
    signing_key,
    write_state,
)
from xca_gateway.tools.dicom_samples import SampleStudy, local_patient_id

AUDIENCE = "urn:xca-gateway:web:alpha"
SCOPE = "dicomweb.read"
XUA_ISSUER = "urn:xca-gateway:test:alpha-users"

# --------------------------------------------------------------------------- tokens (pure)

ES_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
RULES = TokenRules(issuer="https://as.test", audience=AUDIENCE, scopes=(SCOPE,))


def _jwks(key: ec.EllipticCurvePrivateKey, kid: str = "k1") -> Any:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
    return parse_key_set({"keys": [jwk]})


def mint(
    key: Any = ES_KEY,
    *,
    algorithm: str = "ES256",
    kid: str = "k1",
    typ: str = "at+jwt",
    **claims: Any,
) -> str:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": RULES.issuer,
        "sub": "dr-who",
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "client_id": "alpha-web",
        "scope": f"openid {SCOPE}",
        "name": "Dr Who",
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid, "typ": typ})


def check(token: str, keys: Any = None) -> Any:
    kid = token_key_id(token, RULES)
    key = find_key(keys or _jwks(ES_KEY), kid)
    assert key is not None
    return verify_token(token, key, RULES)


def _unsigned(**claims: Any) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'at+jwt', 'kid': 'k1'})}.{b64(claims)}."


def test_a_valid_token_names_the_person() -> None:
    token = check(mint())
    assert (token.issuer, token.subject, token.name) == (RULES.issuer, "dr-who", "Dr Who")
    assert SCOPE in token.scopes
    assert token.describe() == "Dr Who<dr-who@https://as.test>"


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        (lambda: mint(aud="urn:someone-else"), "another audience"),
        (lambda: mint(exp=int(time.time()) - 120), "expired"),
        (lambda: mint(OTHER_KEY), "signature"),
        (lambda: mint(iss="https://evil.test"), "another issuer"),
        (lambda: mint(nbf=int(time.time()) + 600), "not valid yet"),
        (lambda: mint(sub=None), "'sub'"),
        (lambda: mint(scope="openid"), "none of the scopes"),
        (lambda: mint(typ="JWT"), "at+jwt"),
        (lambda: _unsigned(iss=RULES.issuer, sub="x", aud=AUDIENCE), "'none' is not accepted"),
        (lambda: mint(b"a-shared-secret-of-enough-length!", algorithm="HS256"), "'HS256'"),
    ],
)
def test_bad_tokens_are_refused_with_the_reason(token: Any, fragment: str) -> None:
    with pytest.raises(TokenError) as caught:
        check(token())
    assert fragment in caught.value.description
    assert caught.value.error == ("insufficient_scope" if "scopes" in fragment else "invalid_token")


def test_an_rsa_key_never_verifies_an_es256_token_and_unknown_kids_find_no_key() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk.update({"kid": "k1", "use": "sig"})
    with pytest.raises(TokenError, match="does not match its key"):
        check(mint(), parse_key_set({"keys": [jwk]}))
    assert find_key(_jwks(ES_KEY), "k2") is None


def test_bearer_header_and_challenge() -> None:
    assert bearer_token(None) is None
    assert bearer_token("Bearer a.b.c") == "a.b.c"
    with pytest.raises(TokenError) as caught:
        bearer_token("Basic dXNlcjpwYXNz")
    assert caught.value.status == 400
    with pytest.raises(TokenError):
        bearer_token("Bearer not a jwt")
    assert challenge(None) == 'Bearer realm="xca-gateway"'
    refused = challenge(TokenError("invalid_token", 'the "token" has expired'))
    assert refused == (
        'Bearer realm="xca-gateway", error="invalid_token", '
        'error_description="the token has expired"'
    )


def test_login_state_is_one_use_bound_to_the_browser_and_expires() -> None:
    now = [1000.0]
    store = SessionStore(session_seconds=60, clock=lambda: now[0])
    login = store.begin_login("/iid?patientID=1")
    assert store.take_login("forged", login.binding) is None
    assert store.take_login(login.state, "another-browser") is None
    # ... and a failed attempt used it up: the real browser must start again.
    assert store.take_login(login.state, login.binding) is None
    login = store.begin_login("https://evil.test/")
    assert login.next_path == "/"
    assert store.take_login(login.state, login.binding) is login
    assert store.take_login(login.state, login.binding) is None  # replayed
    late = store.begin_login("/")
    now[0] += 601
    assert store.take_login(late.state, late.binding) is None
    verifier, challenge_value = pkce_pair()
    assert 43 <= len(verifier) <= 128 and code_challenge(verifier) == challenge_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/viewer/?study=1", "/viewer/?study=1"),
        ("//evil.test/x", "/"),
        ("/\\evil.test", "/"),
        ("https://evil.test/", "/"),
        ("javascript:alert(1)", "/"),
        (None, "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
    ],
)
def test_next_is_a_same_origin_path(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_web_config_refuses_weak_algorithms_and_needs_the_issuer() -> None:
    iua = {
        "issuer": "https://as.test",
        "jwks_uri": "https://as.test/jwks",
        "authorization_endpoint": "https://as.test/authorize",
        "token_endpoint": "https://as.test/token",
        "client_id": "c",
        "audience": AUDIENCE,
    }
    config = parse_web_config({"port": 0, "iua": iua}, Path("."))
    assert config is not None and config.iua.algorithms == ("RS256", "ES256")
    assert parse_web_config({"enabled": False}, Path(".")) is None
    for bad in (
        {"iua": {**iua, "algorithms": ["HS256"]}},
        {"iua": {**iua, "algorithms": ["none"]}},
    ):
        with pytest.raises(ConfigError, match="not accepted"):
            parse_web_config(bad, Path("."))
    with pytest.raises(ConfigError, match=r"\[web.iua\] is required"):
        parse_web_config({}, Path("."))
    with pytest.raises(ConfigError, match="https"):
        parse_web_config({"iua": iua, "public_url": "http://x.test"}, Path("."))


def test_a_person_is_a_clinician_only_through_a_policy_entry_for_their_issuer() -> None:
    assert ACCESS[Door.WEB] == frozenset({Role.CLINICIAN})
    person = Identity(
        address="127.0.0.1", token_issuer="https://as.test", token_subject="u1", person_name="U"
    )
    rule = CallerRule(
        "clinicians", frozenset({Role.CLINICIAN}), token_issuers=frozenset({"https://as.test"})
    )
    decision = decide(CallerDirectory((rule,)), person, Door.WEB)
    assert decision.allowed and decision.principal is not None
    principal = decision.principal
    assert (principal.name, principal.user_id, principal.key) == ("U", "u1", "u1@https://as.test")
    assert principal.audit_user_name == "U<u1@https://as.test>"
    # Another issuer's person, or a clinician at a machine door: refused.
    assert not decide(CallerDirectory((rule,)), replace(person, token_issuer="x"), Door.WEB).allowed
    assert not decide(CallerDirectory((rule,)), person, Door.DICOMWEB).allowed
    # A certificate rule never matches a person, whatever the address.
    machine = CallerRule("local", frozenset({Role.CLINICIAN}), addresses=frozenset({"127.0.0.1"}))
    assert not decide(CallerDirectory((machine,)), person, Door.WEB).allowed


# --------------------------------------------------------------------------- live fixture


class AuthServerThread:
    """The demo authorization server on its own loop, on a loopback TLS port."""

    def __init__(self, directory: Path, pki: DevPki, clinicians: list[Clinician]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.issuer = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.state = AuthServerState(issuer=self.issuer, clinicians=tuple(clinicians), clients=())
        write_state(directory, self.state)
        self.app = AuthServer(self.state, signing_key(directory))
        pair = pki.communities["gamma"]
        self.server = HttpServer(self.app, ssl_context=server_context(pair.cert, pair.key))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(sock=self.sock), self.loop).result(10)

    def register(self, client: Client) -> None:
        self.app.state = replace(self.app.state, clients=(*self.app.state.clients, client))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Live:
    pki: DevPki
    alpha: Gateway
    beta: Gateway
    auth: AuthServerThread
    web: str  # the web door's base URL
    audit: AuditInbox  # alpha's records
    beta_audit: AuditInbox
    studies: list[SampleStudy]
    peer_studies: list[SampleStudy]
    clinician: Clinician
    threads: list[GatewayThread] = field(default_factory=list)

    def client(self, **kwargs: Any) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        return httpx.Client(verify=context, timeout=30, trust_env=False, **kwargs)

    def token(self, **claims: Any) -> str:
        """A token from the authorization server's own key, as it would issue it."""
        app = self.auth.app
        now = int(time.time())
        body = {
            "iss": self.auth.issuer,
            "sub": self.clinician.subject,
            "aud": AUDIENCE,
            "exp": now + 300,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "client_id": "alpha-web",
            "scope": SCOPE,
            "name": self.clinician.name,
        }
        body.update(claims)
        return jwt.encode(
            body, app.key, algorithm="ES256", headers={"kid": app.kid, "typ": "at+jwt"}
        )

    def alice(self) -> str:
        return local_patient_id(0, 0)


def web_toml(issuer: str) -> str:
    policy = policy_for_tests()
    policy["callers"] = [
        *policy["callers"],
        {"name": "clinicians", "roles": ["clinician"], "token_issuers": [issuer]},
    ]
    return f"""
[web]
enabled = true
host = "127.0.0.1"
port = 0

[web.iua]
issuer = "{issuer}"
jwks_uri = "{issuer}/jwks"
authorization_endpoint = "{issuer}/authorize"
token_endpoint = "{issuer}/token"
client_id = "alpha-web"
audience = "{AUDIENCE}"
scopes = ["{SCOPE}"]

{policy_toml(policy)}
"""


@pytest.fixture(scope="module")
def live(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("web-door")
    audit, beta_audit = AuditInbox(), AuditInbox()
    clinician = Clinician("dr-alpha", "s3cret-pass", "Dr Alpha Clinician", "alpha")
    auth = AuthServerThread(tmp / "auth", pki, [clinician])
    alpha_pair = pki.communities["alpha"]
    beta_extra = f"""
{beta_audit.toml("beta-gateway")}

[xua]
enabled = true
audiences = ["urn:xca-gateway:test:beta"]

[[xua.trusted_issuers]]
issuer = "{XUA_ISSUER}"
certificates = ["{alpha_pair.cert}"]
"""
    beta_config, beta_studies = seed_community(tmp, pki, "beta", 1, beta_extra)
    threads = [GatewayThread(load_config(beta_config))]
    try:
        beta = threads[0].__enter__()
        xref = tmp / "xref.csv"
        xref.write_text(
            f"{local_patient_id(0, 0)}^^^&{ARC}.20.1000&ISO,"
            f"{local_patient_id(1, 0)}^^^&{ARC}.20.2000&ISO\n"
        )
        extra = f"""
[patient_mapping]
xref_csv = "{xref}"

[[peers]]
name = "beta"
home_community_id = "urn:oid:{ARC}.70.2"
iti38 = "{beta.base_url}/xca/iti38"
iti39 = "{beta.base_url}/xca/iti39"
rad75 = "{beta.base_url}/xca/rad75"
patient_id_assigning_authority = "{ARC}.20.2000"

[xua.outbound]
mode = "issue"
identity_source = "caller"
issuer = "{XUA_ISSUER}"
audience = "urn:xca-gateway:test:beta"

[xua.outbound.identity]
name_id = "alpha-gateway"
subject_id = "alpha gateway"
organization = "Community alpha"
organization_id = "urn:oid:{ARC}.70.1"
home_community_id = "urn:oid:{ARC}.70.1"
roles = [{{ code = "158965000", code_system = "2.16.840.1.113883.6.96" }}]
purposes_of_use = [{{ code = "TREATMENT", code_system = "2.16.840.1.113883.3.18.7.1" }}]

{audit.toml("alpha-gateway")}
{web_toml(auth.issuer)}
"""
        alpha_config, studies = seed_community(tmp, pki, "alpha", 0, extra)
        threads.append(GatewayThread(load_config(alpha_config)))
        alpha = threads[1].__enter__()
        assert alpha.web_door is not None
        auth.register(Client("alpha-web", (alpha.web_door.redirect_uri,), AUDIENCE))
        yield Live(
            pki,
            alpha,
            beta,
            auth,
            alpha.web_door.base_url,
            audit,
            beta_audit,
            studies,
            beta_studies,
            clinician,
            threads,
        )
    finally:
        for thread in reversed(threads):
            if thread.gateway is not None:
                thread.__exit__(None, None, None)
        auth.close()
        audit.close()
        beta_audit.close()


def auth_failures(live: Live, marker: str) -> list[etree._Element]:
    """User Authentication (110114) failures whose description mentions ``marker``."""
    return [
        r
        for r in live.audit.with_event("110114")
        if (e := r.find("EventIdentification")) is not None
        and e.get("EventOutcomeIndicator") != "0"
        and marker in etree.tostring(r).decode()
    ]


def sign_in(
    live: Live, client: httpx.Client, next_path: str, *, password: str | None = None
) -> httpx.Response:
    """The browser's way through the code + PKCE flow; returns the web door's last answer."""
    start = client.get(f"{live.web}/login", params={"next": next_path})
    assert start.status_code == 303
    authorize = start.headers["location"]
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["redirect_uri"] == [live.alpha.web_door.redirect_uri]  # type: ignore[union-attr]
    page = client.get(authorize)
    assert page.status_code == 200 and "<form" in page.text
    hidden = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.text))
    hidden = {k: v.replace("&amp;", "&") for k, v in hidden.items()}
    login = client.post(
        f"{live.auth.issuer}/authorize",
        data={
            **hidden,
            "username": live.clinician.username,
            "password": password or live.clinician.password,
        },
    )
    if login.status_code != 303:
        return login
    callback = login.headers["location"]
    assert callback.startswith(f"{live.web}/oauth/callback?")
    return client.get(callback)


def test_no_token_gets_401_with_a_bearer_challenge_and_one_audit_record(live: Live) -> None:
    marker = f"/dicomweb/studies?marker={uuid.uuid4().hex}"
    with live.client() as client:
        answer = client.get(f"{live.web}/dicomweb/studies", params={"PatientID": live.alice()})
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == 'Bearer realm="xca-gateway"'
        # A browser navigating to a page is sent to sign in instead (not a refusal).
        page = client.get(f"{live.web}/", headers={"accept": "text/html"})
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=%2F"
        client.get(f"{live.web}{marker}")
    assert wait_for(lambda: len(auth_failures(live, "no access token")) >= 2, timeout=15)
    assert len(auth_failures(live, "no access token")) == 2


@pytest.mark.parametrize(
    ("label", "claims", "error"),
    [
        ("audience", {"aud": "urn:xca-gateway:web:beta"}, "another audience"),
        ("expired", {"exp": 1_000_000_000, "iat": 999_999_000}, "expired"),
        ("signature", {"forge": True}, "signature does not verify"),
        ("alg-none", {"none": True}, "'none' is not accepted"),
        ("scope", {"scope": "openid"}, "none of the scopes"),
    ],
)
def test_bad_tokens_get_401_each_audited_once_as_a_failed_user_authentication(
    live: Live, label: str, claims: dict[str, Any], error: str
) -> None:
    subject = f"intruder-{label}-{uuid.uuid4().hex[:8]}"
    if claims.pop("forge", False):
        token = mint(OTHER_KEY, kid=live.auth.app.kid, iss=live.auth.issuer, sub=subject)
    elif claims.pop("none", False):
        token = _unsigned(iss=live.auth.issuer, sub=subject, aud=AUDIENCE)
    else:
        token = live.token(sub=subject, **claims)
    with live.client() as client:
        answer = client.get(
            f"{live.web}/dicomweb/studies",
            params={"PatientID": live.alice()},
            headers={"authorization": f"Bearer {token}"},
        )
    expected = 403 if label == "scope" else 401
    assert answer.status_code == expected, answer.text
    challenge_value = answer.headers["www-authenticate"]
    assert (
        "insufficient_scope" in challenge_value
        if label == "scope"
        else 'error="invalid_token"' in challenge_value
    )
    assert error in answer.json()["message"]
    assert wait_for(lambda: len(auth_failures(live, subject)) >= 1, timeout=15)
    time.sleep(0.3)  # a second record would have arrived by now (same UDP path)
    [record] = auth_failures(live, subject)
    assert not schema_errors(record), schema_errors(record)
    event_type = record.find("EventIdentification/EventTypeCode")
    assert event_type is not None and event_type.get("csd-code") == "110122"  # Login
    requestor = [p for p in record.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert requestor and subject in str(requestor[0].get("UserID"))
    # Refused before the transaction: no query record for this caller.
    assert not [r for r in live.audit.with_event("110112") if subject in etree.tostring(r).decode()]


def test_a_valid_token_gets_qido_answers_and_the_records_name_the_clinician(live: Live) -> None:
    with live.client() as client:
        answer = client.get(
            f"{live.web}/dicomweb/studies",
            params={"PatientID": live.alice()},
            headers={"authorization": f"Bearer {live.token()}", "accept": "application/dicom+json"},
        )
    assert answer.status_code == 200, answer.text
    studies = {item["0020000D"]["Value"][0] for item in answer.json()}
    expected = {
        s.study_instance_uid
        for s in [*live.studies, *live.peer_studies]
        if s.patient_id in (local_patient_id(0, 0), local_patient_id(1, 0))
    }
    assert studies == expected and len(studies) >= 2
    # RetrieveURLs point at the web door, where the clinician's token works.
    urls = [item["00081190"]["Value"][0] for item in answer.json() if "00081190" in item]
    assert urls and all(u.startswith(f"{live.web}/dicomweb/studies/") for u in urls)
    name = f"{live.clinician.name}<{live.clinician.subject}@{live.auth.issuer}>"

    def qido_naming() -> list[etree._Element]:
        return [
            r
            for r in live.audit.with_event("110112")
            if any(
                p.get("UserName") == name and p.get("UserIsRequestor") == "true"
                for p in r.iter("ActiveParticipant")
            )
        ]

    assert wait_for(lambda: bool(qido_naming()), timeout=15)
    record = qido_naming()[0]
    assert not schema_errors(record)
    machine = [p for p in record.iter("ActiveParticipant") if p.get("UserName") != name]
    assert all(p.get("UserIsRequestor") == "false" for p in machine)


def test_code_pkce_flow_gives_a_session_that_reads_data_and_logs_out(live: Live) -> None:
    with live.client() as client:
        answer = sign_in(live, client, "/dicomweb/studies?PatientID=" + live.alice())
        assert answer.status_code == 303
        assert answer.headers["location"] == "/dicomweb/studies?PatientID=" + live.alice()
        cookie = next(
            v for k, v in answer.headers.multi_items() if k == "set-cookie" and "xca_session" in v
        )
        assert cookie.startswith("__Host-xca_session=")
        for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
            assert attribute in cookie
        data = client.get(f"{live.web}{answer.headers['location']}")
        assert data.status_code == 200 and data.json()
        # The token stayed on the server: the browser holds only the session id.
        assert "eyJ" not in cookie
        assert client.post(f"{live.web}/logout").status_code == 200
        after = client.get(f"{live.web}/dicomweb/studies", params={"PatientID": live.alice()})
        assert after.status_code == 401

    def successes() -> list[etree._Element]:
        return [
            r
            for r in live.audit.with_event("110114")
            if (e := r.find("EventIdentification")) is not None
            and e.get("EventOutcomeIndicator") == "0"
            and live.clinician.subject in etree.tostring(r).decode()
        ]

    assert wait_for(lambda: len(successes()) >= 2, timeout=15)  # login and logout
    kinds = {t.get("csd-code") for r in successes() for t in r.iter("EventTypeCode")}
    assert kinds == {"110122", "110123"}


def test_replayed_and_forged_state_are_refused(live: Live) -> None:
    with live.client() as client:
        first = client.get(f"{live.web}/login", params={"next": "/"})
        authorize = first.headers["location"]
        page = client.get(authorize)
        hidden = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.text))
        login = client.post(
            f"{live.auth.issuer}/authorize",
            data={
                **hidden,
                "username": live.clinician.username,
                "password": live.clinician.password,
            },
        )
        callback = login.headers["location"]
        state = parse_qs(urlsplit(callback).query)["state"][0]
        forged = client.get(
            f"{live.web}/oauth/callback", params={"code": "x", "state": "forged-" + state[:10]}
        )
        assert forged.status_code == 400 and "start again" in forged.text
        assert client.get(callback).status_code == 303  # the real one, once
        replay = client.get(callback)
        assert replay.status_code == 400
        assert "__Host-xca_session" not in replay.headers.get("set-cookie", "")
    # A callback in another browser (no login cookie) is refused too.
    with live.client() as other:
        assert other.get(callback).status_code == 400
    # A wrong password never reaches the gateway.
    with live.client() as client:
        wrong = sign_in(live, client, "/", password="wrong")
        assert wrong.status_code == 401 and "Wrong user name" in wrong.text


def test_the_clinician_reaches_the_peers_audit_through_xua_and_views_are_audited(
    live: Live,
) -> None:
    """A WADO-RS retrieve of beta's study through the web door: alpha's RAD-75 call carries an
    XUA assertion naming the clinician (NameID sub, NameQualifier iss), beta's RAD-75 record
    names them as the human requestor, and alpha records one 110103 for the view."""
    study = next(s for s in live.peer_studies if s.patient_id == local_patient_id(1, 0))
    headers = {"authorization": f"Bearer {live.token()}"}
    with live.client() as client:
        found = client.get(
            f"{live.web}/dicomweb/studies", params={"PatientID": live.alice()}, headers=headers
        )
        assert found.status_code == 200
        for _ in range(2):  # viewed twice: one 110103
            answer = client.get(
                f"{live.web}/dicomweb/studies/{study.study_instance_uid}/metadata", headers=headers
            )
            assert answer.status_code == 200, answer.text
    subject = live.clinician.subject

    def beta_naming() -> list[etree._Element]:
        return [
            r
            for r in live.beta_audit.records
            if any(
                subject in str(p.get("UserName")) and p.get("UserIsRequestor") == "true"
                for p in r.iter("ActiveParticipant")
            )
        ]

    assert wait_for(lambda: bool(beta_naming()), timeout=15), "beta never named the clinician"
    types = {t.get("csd-code") for r in beta_naming() for t in r.iter("EventTypeCode")}
    assert types & {"ITI-38", "RAD-75", "ITI-39"}
    # The peer names the person as alpha does (name<sub@iss>: subject-id, NameID and its
    # NameQualifier); the assertion's own issuer stays in the UserID (ITI TF-2 3.40.4.2).
    person = f"{live.clinician.name}<{subject}@{live.auth.issuer}>"
    for record in beta_naming():
        [human] = [p for p in record.iter("ActiveParticipant") if subject in str(p.get("UserName"))]
        assert human.get("UserName") == person
        assert human.get("UserID") == f"<{subject}@{XUA_ISSUER}>"

    def views() -> list[etree._Element]:
        return [
            r
            for r in live.audit.with_event("110103")
            if study.study_instance_uid in etree.tostring(r).decode()
        ]

    assert wait_for(lambda: bool(views()), timeout=15)
    time.sleep(0.3)
    [view] = views()
    assert not schema_errors(view), schema_errors(view)
    text = etree.tostring(view).decode()
    assert (
        f"{live.clinician.name}&lt;{subject}@" in text
        or f"{live.clinician.name}<{subject}@" in text
    )
    patients = [
        o.get("ParticipantObjectID")
        for o in view.iter("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCodeRole") == "1"
    ]
    assert patients and patients[0]
    # The study's object names the community holding it (beta), for the officer's report.
    [viewed] = [
        o
        for o in view.iter("ParticipantObjectIdentification")
        if o.get("ParticipantObjectID") == study.study_instance_uid
    ]
    details = {
        d.get("type"): base64.b64decode(d.get("value", "")).decode()
        for d in viewed.iter("ParticipantObjectDetail")
    }
    assert details == {"urn:ihe:iti:xca:2010:homeCommunityId": f"urn:oid:{ARC}.70.2"}
