"""Access policy decisions, hot reload, and the authorization gate over real mutual TLS."""

from __future__ import annotations

import copy
import os
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from lxml import etree

from tests.conftest import wait_for
from tests.test_enforcement import PATIENT, document_entry
from tests.test_server import ADHOC_QUERY, fault_of
from tests.test_xua import IDENTITY, ISSUER, TREATMENT
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit.messages import AuditContext, AuditSource
from xca_gateway.audit.validate import schema_errors
from xca_gateway.protocol.http_server import PeerCertificate, PeerInfo
from xca_gateway.protocol.namespaces import QUERY, RIM, RS, SOAP12, WSSE, Action, ResponseStatus
from xca_gateway.protocol.soap import build_envelope, serialize
from xca_gateway.protocol.soap_service import Operation, SoapRequest, SoapResponse
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.consent.enforcement import filter_query_objects
from xca_gateway.security.consent.service import ConsentConfig, ConsentService, ConsentStore
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.security.policy import (
    AuthorizationGate,
    PeerIdentity,
    PolicyError,
    PolicyStore,
    Refusal,
    current_authorization,
    load_policy_file,
    normalize_transaction,
    parse_access_policy,
    parse_policy_config,
    refusal_audit_message,
)
from xca_gateway.security.xua import (
    Ce,
    WsseFault,
    XuaAssertion,
    XuaOutbound,
    XuaOutboundConfig,
    issue_assertion,
    parse_xua_config,
    wsse_security_header,
)
from xca_gateway.xds.ebrs import LOCAL_POLICY_RESTRICTION_ERROR, adhoc_query_response

BETA = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
GAMMA = "urn:oid:1.3.6.1.4.1.21367.13.70.3"
BETA_PEER = PeerIdentity("CN=beta.xca-gateway.test", "ab" * 32, ("beta.xca-gateway.test",))
STRANGER = PeerIdentity("CN=stranger", "cd" * 32)


def assertion(**changes: object) -> XuaAssertion:
    now = datetime.now(UTC)
    base = XuaAssertion(
        id="_1",
        issuer=ISSUER,
        issue_instant=now,
        name_id="dr.smith",
        name_id_format=None,
        sp_provided_id=None,
        subject_confirmation_methods=(),
        audiences=(),
        not_before=now,
        not_on_or_after=now + timedelta(minutes=5),
        authn_instant=now,
        authn_context_class_ref="x",
        home_community_id=BETA,
        roles=(Ce("309343006", "2.16.840.1.113883.6.96"),),
        purposes_of_use=(TREATMENT,),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


POLICY = parse_access_policy(
    {
        "peers": [
            {
                "name": "beta",
                "home_community_id": BETA,
                "certificate_dns_names": ["beta.xca-gateway.test"],
                "transactions": ["ITI-38", "iti39"],
                "purposes_of_use": ["2.16.840.1.113883.3.18.7.1|TREATMENT", "EMERGENCY"],
                "roles": ["309343006"],
                "require_xua": True,
            },
            {"name": "gamma", "home_community_id": GAMMA},
        ]
    }
)


# --------------------------------------------------------------------------- decisions


def test_unknown_peers_are_denied_by_default() -> None:
    decision = POLICY.decide(STRANGER, "ITI-38", assertion())
    assert not decision.allowed and decision.error_code == LOCAL_POLICY_RESTRICTION_ERROR
    allow = replace(POLICY, default="allow")
    assert allow.decide(STRANGER, "ITI-38", None).allowed


def test_a_listed_peer_may_call_its_transactions_with_accepted_purpose_and_role() -> None:
    decision = POLICY.decide(BETA_PEER, "ITI-38", assertion())
    assert decision.allowed and decision.peer_name == "beta"
    assert decision.home_community_id == BETA
    assert not POLICY.decide(BETA_PEER, "RAD-75", assertion()).allowed


def test_purpose_of_use_and_role_are_checked() -> None:
    marketing = assertion(purposes_of_use=(Ce("MARKETING", "2.16.840.1.113883.3.18.7.1"),))
    assert "purpose" in POLICY.decide(BETA_PEER, "ITI-38", marketing).reason
    wrong_system = assertion(purposes_of_use=(Ce("TREATMENT", "9.9.9"),))
    assert not POLICY.decide(BETA_PEER, "ITI-38", wrong_system).allowed
    emergency = assertion(purposes_of_use=(Ce("EMERGENCY", "anything"),))
    assert POLICY.decide(BETA_PEER, "ITI-38", emergency).allowed
    clerk = assertion(roles=(Ce("clerk"),))
    assert "role" in POLICY.decide(BETA_PEER, "ITI-38", clerk).reason


def test_missing_assertion_where_required_is_a_security_fault() -> None:
    decision = POLICY.decide(BETA_PEER, "ITI-38", None)
    assert not decision.allowed and decision.fault_code == WsseFault.INVALID_SECURITY


def test_the_assertion_must_come_from_the_peers_community() -> None:
    decision = POLICY.decide(BETA_PEER, "ITI-38", assertion(home_community_id=GAMMA))
    assert not decision.allowed and "homeCommunityId" in decision.reason


def test_peers_are_recognised_by_certificate_not_by_claims() -> None:
    by_fingerprint = parse_access_policy(
        {"peers": [{"name": "x", "certificate_fingerprints": ["AB:" * 31 + "AB"]}]}
    )
    assert by_fingerprint.decide(BETA_PEER, "ITI-39", None).allowed
    by_subject = parse_access_policy(
        {"peers": [{"name": "x", "certificate_subjects": ["CN=beta.xca-gateway.test"]}]}
    )
    assert by_subject.decide(BETA_PEER, "ITI-39", None).allowed
    # homeCommunityId binds only through the certificate (SAN URI), never through the assertion.
    gamma_only = parse_access_policy({"peers": [{"name": "g", "home_community_id": GAMMA}]})
    claims_gamma = assertion(home_community_id=GAMMA)
    assert not gamma_only.decide(BETA_PEER, "ITI-38", claims_gamma).allowed
    gamma_cert = PeerIdentity("CN=g", "ef" * 32, san_uri=(GAMMA,))
    assert gamma_only.decide(gamma_cert, "ITI-38", None).allowed


def test_policy_parsing_refuses_mistakes(tmp_path: Path) -> None:
    assert normalize_transaction("rad75") == "RAD-75"
    for bad in (
        {"default": "maybe"},
        {"peers": [{"name": "x"}]},  # no way to recognise it
        {"peers": [{"name": "x", "home_community_id": BETA, "transactions": ["ITI-99"]}]},
        {"peers": [{"name": "x", "home_community_id": "1.2.3"}]},
        {"peers": [{"name": "x", "home_community_id": BETA, "colour": "blue"}]},
        {"surprise": True},
    ):
        with pytest.raises(PolicyError):
            parse_access_policy(bad)
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'[[policy.peers]]\nname = "b"\nhome_community_id = "{BETA}"\n')
    config = parse_policy_config({"file": "policy.toml"}, tmp_path)
    assert config.file == policy_file and config.policy.peers[0].name == "b"


# --------------------------------------------------------------------------- hot reload


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write_policy(path: Path, transactions: list[str], *, bump: int) -> None:
    quoted = ", ".join(f'"{t}"' for t in transactions)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        f'[[policy.peers]]\nname = "beta"\ncertificate_dns_names = ["beta.xca-gateway.test"]\n'
        f"transactions = [{quoted}]\n"
    )
    os.replace(tmp, path)  # how operators (and config management) replace files
    # A distinct mtime even on coarse-grained file systems.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def test_reload_happens_after_the_interval_and_a_bad_file_keeps_the_old_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.toml"
    _write_policy(path, ["ITI-38"], bump=0)
    clock = FakeClock()
    store = PolicyStore(load_policy_file(path), path, min_interval=1.0, clock=clock)
    assert store.decide(BETA_PEER, "ITI-38", None).allowed

    _write_policy(path, ["ITI-39"], bump=1)
    clock.now += 0.5  # not yet time to look
    assert store.decide(BETA_PEER, "ITI-38", None).allowed
    clock.now += 0.5
    assert not store.decide(BETA_PEER, "ITI-38", None).allowed
    assert store.decide(BETA_PEER, "ITI-39", None).allowed
    assert store.reloads == 1

    path.write_text("[[policy.peers]]\nname = \n")  # broken TOML
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    clock.now += 1
    with caplog.at_level("ERROR"):
        assert store.decide(BETA_PEER, "ITI-39", None).allowed
    assert store.failed_reloads == 1
    assert any("not reloaded" in r.getMessage() for r in caplog.records)

    path.unlink()  # a vanished file changes nothing either
    clock.now += 1
    assert store.decide(BETA_PEER, "ITI-39", None).allowed


def test_reload_under_concurrent_decisions(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    _write_policy(path, ["ITI-38"], bump=0)
    store = PolicyStore(load_policy_file(path), path, min_interval=0.0)
    errors: list[BaseException] = []
    seen: set[tuple[bool, bool]] = set()
    stop = threading.Event()

    def hammer() -> None:
        try:
            while not stop.is_set():
                policy = store.policy  # one snapshot: both answers from the same policy
                seen.add(
                    (
                        policy.decide(BETA_PEER, "ITI-38", None).allowed,
                        policy.decide(BETA_PEER, "ITI-39", None).allowed,
                    )
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 31):
            _write_policy(path, ["ITI-39"] if n % 2 else ["ITI-38"], bump=n)
        assert wait_for(lambda: store.reloads >= 1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    # Never a mixture of the two policies, never a torn state.
    assert seen <= {(True, False), (False, True)}
    _write_policy(path, ["ITI-39"], bump=100)
    assert wait_for(lambda: store.decide(BETA_PEER, "ITI-39", None).allowed)
    assert not store.decide(BETA_PEER, "ITI-38", None).allowed


# --------------------------------------------------------------------------- audit


def _peer_info(subject: str = "CN=beta.xca-gateway.test") -> PeerInfo:
    return PeerInfo("127.0.0.1", 5555, PeerCertificate(subject, "CN=ca", 1, "ab" * 32))


def test_refusals_are_audited_with_schema_valid_messages() -> None:
    ctx = AuditContext(AuditSource("alpha-gateway"))
    xua = Refusal(
        "xua",
        "ITI-38",
        _peer_info(),
        "assertion has expired",
        WsseFault.INVALID_SECURITY_TOKEN,
        assertion(),
    )
    message = refusal_audit_message(ctx, xua, local_user_id="https://alpha/xca/iti38")
    assert schema_errors(message) == []
    xml = message.to_xml().decode()
    assert "110114" in xml and f"&lt;dr.smith@{ISSUER}&gt;" in xml and "expired" in xml

    policy = Refusal(
        "policy",
        "RAD-75",
        _peer_info(),
        "RAD-75 is not permitted for this peer",
        LOCAL_POLICY_RESTRICTION_ERROR,
        assertion(),
        "/xca/rad75",
    )
    message = refusal_audit_message(ctx, policy, local_user_id="https://alpha/xca/rad75")
    assert schema_errors(message) == []
    xml = message.to_xml().decode()
    assert "110113" in xml and "110132" in xml and "RAD-75 is not permitted" in xml

    anonymous = Refusal(
        "xua", "ITI-38", _peer_info(), "assertion is not signed", WsseFault.FAILED_AUTHENTICATION
    )
    assert schema_errors(refusal_audit_message(ctx, anonymous, local_user_id="x")) == []


# --------------------------------------------------------------------------- end to end


def _fingerprint(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


class Harness:
    """alpha's ITI-38 endpoint behind the gate, with a registry stub and consent filtering."""

    def __init__(self, gateway: Gateway, pki: DevPki, tmp: Path) -> None:
        self.gateway = gateway
        self.pki = pki
        self.url = gateway.endpoint_urls()["iti38"]
        beta = pki.communities["beta"]
        self.beta_key = beta.key.read_bytes()
        self.beta_cert = beta.cert.read_bytes()
        self.policy_file = tmp / "policy.toml"
        self.write_policy(["ITI-38"], bump=0)
        (tmp / "idp.pem").write_bytes(self.beta_cert)
        xua = parse_xua_config(
            {"enabled": True, "trusted_issuers": [{"issuer": ISSUER, "certificates": "idp.pem"}]},
            tmp,
        )
        policy = parse_policy_config({"file": "policy.toml", "reload_interval": 0}, tmp)
        self.consent = ConsentService(ConsentStore(tmp / "consent.sqlite3"), ConsentConfig(True))
        self.consent.store.set(PATIENT, "opt-out", class_code="PSY")
        self.refusals: list[Refusal] = []
        self.seen_users: list[str] = []
        home = gateway.config.community.home_community_id
        self.gate = AuthorizationGate.from_config(
            xua,
            policy,
            home_community_id=home,
            default_audiences=[self.url],
            on_refusal=self.refusals.append,
        )
        assert isinstance(self.gate.policy, PolicyStore)
        self.store = self.gate.policy
        consent = self.consent
        seen = self.seen_users

        async def registry(request: SoapRequest) -> SoapResponse:
            auth = current_authorization()
            assert auth is not None and auth.assertion is not None
            seen.append(auth.assertion.user_name)
            requester = auth.decision.home_community_id or ""
            objects = [document_entry("18748-4"), document_entry("PSY")]
            result = filter_query_objects(
                objects,
                lambda p, d: consent.verdicts_for_documents(p, requester, d),
                home_community_id=home,
            )
            payload = adhoc_query_response(result.status, result.errors, result.kept)
            return SoapResponse(payload, Action.ITI38_RESPONSE)

        gateway.endpoints["iti38"].add(
            self.gate.protect(Operation(Action.ITI38, "ITI-38", registry))
        )

    def write_policy(self, transactions: list[str], *, bump: int) -> None:
        quoted = ", ".join(f'"{t}"' for t in transactions)
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(
            '[policy]\ndefault = "deny"\n\n[[policy.peers]]\nname = "beta"\n'
            f'home_community_id = "{BETA}"\n'
            f'certificate_fingerprints = ["{_fingerprint(self.beta_cert)}"]\n'
            f'transactions = [{quoted}]\npurposes_of_use = ["TREATMENT"]\nrequire_xua = true\n'
        )
        os.replace(tmp, self.policy_file)
        st = self.policy_file.stat()
        os.utime(self.policy_file, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))

    def client(self, who: str = "beta") -> httpx.Client:
        if who == "beta":
            pair = self.pki.communities["beta"]
            ctx = client_context(self.pki.ca, pair.cert, pair.key)
        else:
            ctx = client_context(self.pki.ca, self.pki.client.cert, self.pki.client.key)
        return httpx.Client(verify=ctx, timeout=10.0)

    def envelope(self, headers: list[etree._Element]) -> bytes:
        payload = etree.fromstring(ADHOC_QUERY.encode())
        return serialize(build_envelope(payload, action=Action.ITI38, extra_headers=headers))

    def signed(self, **kw: object) -> etree._Element:
        return issue_assertion(
            IDENTITY,
            issuer=ISSUER,
            audience=self.url,
            key_pem=self.beta_key,
            cert_pem=self.beta_cert,
            **kw,  # type: ignore[arg-type]
        )

    def post(self, client: httpx.Client, body: bytes) -> httpx.Response:
        return client.post(
            self.url, content=body, headers={"content-type": "application/soap+xml; charset=UTF-8"}
        )


def _registry_errors(response: httpx.Response) -> tuple[str, list[str]]:
    root = etree.fromstring(response.content)
    payload = root.find(f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse")
    assert payload is not None, response.text
    codes = [e.get("errorCode", "") for e in payload.iter(f"{{{RS}}}RegistryError")]
    return payload.get("status", ""), codes


def _local_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])


@pytest.fixture
def harness(
    gateway_factory: Callable[..., Gateway], pki: DevPki, tmp_path: Path
) -> Iterator[Harness]:
    h = Harness(gateway_factory("alpha"), pki, tmp_path)
    yield h
    h.consent.close()


def test_end_to_end_valid_assertion_passes_and_consent_filters(harness: Harness) -> None:
    with harness.client() as client:
        response = harness.post(client, harness.envelope([wsse_security_header(harness.signed())]))
    assert response.status_code == 200, response.text
    status, codes = _registry_errors(response)
    assert status == ResponseStatus.PARTIAL_SUCCESS
    assert codes == [LOCAL_POLICY_RESTRICTION_ERROR]
    root = etree.fromstring(response.content)
    assert len(root.findall(f".//{{{RIM}}}ExtrinsicObject")) == 1
    assert harness.seen_users == [f"<dr.smith@{ISSUER}>"]
    assert harness.refusals == []


def test_end_to_end_bad_assertions_get_ws_security_faults(harness: Harness) -> None:
    now = datetime.now(UTC)
    expired = harness.signed(now=now - timedelta(hours=1))
    tampered = harness.signed()
    name_id = tampered.find(".//{urn:oasis:names:tc:SAML:2.0:assertion}NameID")
    assert name_id is not None
    name_id.text = "eve"
    replayed = harness.signed()
    cases = [
        ([wsse_security_header(expired)], "InvalidSecurityToken"),
        ([wsse_security_header(tampered)], "FailedCheck"),
        ([], "InvalidSecurity"),  # policy requires XUA for beta
        ([wsse_security_header(copy.deepcopy(replayed))], None),
        ([wsse_security_header(replayed)], "FailedAuthentication"),
    ]
    with harness.client() as client:
        for headers, expected in cases:
            response = harness.post(client, harness.envelope(headers))
            if expected is None:
                assert response.status_code == 200
                continue
            assert response.status_code == 400, response.text
            code, subcodes, _ = fault_of(response)
            assert code.endswith("Sender")
            root = etree.fromstring(response.content)
            value = root.find(f".//{{{SOAP12}}}Subcode/{{{SOAP12}}}Value")
            assert value is not None and value.text is not None
            prefix, _, local = value.text.partition(":")
            assert (value.nsmap[prefix], local) == (WSSE, expected), subcodes
    assert [r.code for r in harness.refusals] == [
        WsseFault.INVALID_SECURITY_TOKEN,
        WsseFault.FAILED_CHECK,
        WsseFault.INVALID_SECURITY,
        WsseFault.FAILED_AUTHENTICATION,
    ]
    assert harness.refusals[0].assertion is not None  # the expired one still names its user


def test_end_to_end_unknown_peer_is_refused_by_policy(harness: Harness) -> None:
    with harness.client("consumer") as client:
        response = harness.post(client, harness.envelope([wsse_security_header(harness.signed())]))
    assert response.status_code == 200
    status, codes = _registry_errors(response)
    assert status == ResponseStatus.FAILURE and codes == [LOCAL_POLICY_RESTRICTION_ERROR]
    [refusal] = harness.refusals
    assert refusal.kind == "policy" and refusal.assertion is not None


def test_end_to_end_policy_reload_applies_to_the_next_request_on_the_same_connection(
    harness: Harness,
) -> None:
    with harness.client() as client:
        first = harness.post(client, harness.envelope([wsse_security_header(harness.signed())]))
        assert _registry_errors(first)[0] == ResponseStatus.PARTIAL_SUCCESS
        harness.write_policy(["ITI-39"], bump=1)
        second = harness.post(client, harness.envelope([wsse_security_header(harness.signed())]))
        assert _registry_errors(second) == (
            ResponseStatus.FAILURE,
            [LOCAL_POLICY_RESTRICTION_ERROR],
        )
        assert "ITI-38 is not permitted" in second.text
        # Same TCP connection: the reload dropped nothing.
        assert _local_port(first) == _local_port(second)
        harness.write_policy(["ITI-38", "ITI-39"], bump=2)
        third = harness.post(client, harness.envelope([wsse_security_header(harness.signed())]))
        assert _registry_errors(third)[0] == ResponseStatus.PARTIAL_SUCCESS
        assert _local_port(third) == _local_port(first)


def test_end_to_end_outbound_assertion_from_the_initiating_side(harness: Harness) -> None:
    # What the initiating gateway attaches (mode "issue"), accepted by the responding gateway.
    beta = harness.pki.communities["beta"]
    outbound = XuaOutbound.from_config(
        XuaOutboundConfig(mode="issue", issuer=ISSUER, identity=IDENTITY),
        tls_key=beta.key,
        tls_certificate=beta.cert,
        base_url="https://beta.example",
        home_community_id=BETA,
    )
    headers = outbound.security_headers(None, endpoint_url=harness.url)
    with harness.client() as client:
        response = harness.post(client, harness.envelope(headers))
    assert _registry_errors(response)[0] == ResponseStatus.PARTIAL_SUCCESS


def test_inline_policy_reloads_from_the_gateway_configuration_file(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.toml"
    peer = '[[policy.peers]]\nname = "beta"\ncertificate_dns_names = ["beta.xca-gateway.test"]\n'
    config_file.write_text(
        f'[community]\nname = "alpha"\n\n[policy]\nreload_interval = 0\n\n{peer}'
    )
    table = tomllib.loads(config_file.read_text())["policy"]
    store = PolicyStore.from_config(parse_policy_config(table, tmp_path), config_file)
    assert store.decide(BETA_PEER, "ITI-38", None).allowed
    # Removing the section leaves the default: deny.
    config_file.write_text('[community]\nname = "alpha"\n')
    st = config_file.stat()
    os.utime(config_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not store.decide(BETA_PEER, "ITI-38", None).allowed
    assert store.failed_reloads == 0
