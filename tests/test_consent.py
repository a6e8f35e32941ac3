"""Patient consent: decision rules, the SQLite store, the CLI and the admin API."""

from __future__ import annotations

import argparse
import json
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from xca_gateway.audit.messages import AuditContext, AuditSource
from xca_gateway.audit.validate import schema_errors
from xca_gateway.protocol.http_server import HttpServer
from xca_gateway.security.callers import AccessDecision, Identity, Principal, Role
from xca_gateway.security.consent.admin import (
    ConsentAdminApp,
    ConsentChange,
    add_consent_command,
    consent_change_audit,
)
from xca_gateway.security.consent.service import (
    ConsentConfig,
    ConsentError,
    ConsentRule,
    ConsentService,
    ConsentStore,
    DocumentCode,
    evaluate,
    parse_consent_config,
)
from xca_gateway.security.operators import (
    AdminAccessError,
    AdminGate,
    allowed_hosts,
    bearer_operator,
    load_operator_tokens,
    parse_operator_tokens,
    read_operator_token,
    write_operator_token_file,
)

PATIENT = "P1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
B = "urn:oid:1.3.6.1.4.1.21367.13.70.2"
C = "urn:oid:1.3.6.1.4.1.21367.13.70.3"


def rule(mode: str, community: str = "*", cls: str = "*", conf: str = "*") -> ConsentRule:
    return ConsentRule(PATIENT, mode, community, cls, conf)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decision


def test_no_rule_follows_the_community_default() -> None:
    assert evaluate([], default_mode="opt-out", community=B).allowed
    assert not evaluate([], default_mode="opt-in", community=B).allowed


def test_global_opt_out_with_a_community_exception() -> None:
    rules = [rule("opt-out"), rule("opt-in", community=B)]
    assert evaluate(rules, default_mode="opt-out", community=B).allowed
    verdict = evaluate(rules, default_mode="opt-out", community=C)
    assert not verdict.allowed and verdict.rule == rules[0]


def test_opt_in_default_with_consent_for_one_community() -> None:
    rules = [rule("opt-in", community=B)]
    assert evaluate(rules, default_mode="opt-in", community=B, class_code="X").allowed
    assert not evaluate(rules, default_mode="opt-in", community=C, class_code="X").allowed


def test_equally_specific_rules_resolve_to_opt_out() -> None:
    rules = [rule("opt-in", community=B), rule("opt-out", cls="PSY")]
    assert not evaluate(rules, default_mode="opt-in", community=B, class_code="PSY").allowed
    assert evaluate(rules, default_mode="opt-in", community=B, class_code="RAD").allowed


def test_codes_match_with_or_without_scheme() -> None:
    rules = [rule("opt-out", cls="2.16.840.1.113883.6.1|11488-4")]
    loinc = DocumentCode("11488-4", "2.16.840.1.113883.6.1")
    other_system = DocumentCode("11488-4", "1.2.3")
    assert not evaluate(rules, default_mode="opt-out", community=B, class_code=loinc).allowed
    assert evaluate(rules, default_mode="opt-out", community=B, class_code=other_system).allowed
    any_scheme = [rule("opt-out", cls="11488-4")]
    assert not evaluate(
        any_scheme, default_mode="opt-out", community=B, class_code=other_system
    ).allowed


def test_confidentiality_rule_matches_any_of_the_document_codes() -> None:
    rules = [rule("opt-out", conf="V")]
    assert not evaluate(
        rules, default_mode="opt-out", community=B, class_code="X", confidentiality_codes=["N", "V"]
    ).allowed
    assert evaluate(
        rules, default_mode="opt-out", community=B, class_code="X", confidentiality_codes=["N"]
    ).allowed


def test_class_specific_rules_do_not_decide_the_record_as_such() -> None:
    # A SubmissionSet (no class code) stays visible when only a class was opted out.
    rules = [rule("opt-out", cls="PSY")]
    assert evaluate(rules, default_mode="opt-out", community=B).allowed


# --------------------------------------------------------------------------- store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConsentStore]:
    s = ConsentStore(tmp_path / "consent.sqlite3")
    yield s
    s.close()


def test_store_set_replace_revoke_and_history(store: ConsentStore) -> None:
    first = store.set(f"'{PATIENT}'", "opt-out", note="form 1")  # quoted form is normalised
    assert first.patient_id == PATIENT and first.created_at and first.updated_at
    second = store.set(PATIENT, "opt-in", note="form 2")
    assert second.created_at == first.created_at and second.mode == "opt-in"
    store.set(PATIENT, "opt-out", community=B, class_code="PSY")
    assert len(store.rules_for(PATIENT)) == 2
    assert store.revoke(PATIENT, community=B) == 1
    assert [r.mode for r in store.rules_for(PATIENT)] == ["opt-in"]
    assert store.revoke(PATIENT) == 1
    assert store.rules_for(PATIENT) == []
    actions = [(e["action"], e["mode"]) for e in store.history(PATIENT)]
    assert actions == [
        ("set", "opt-out"),
        ("set", "opt-in"),
        ("set", "opt-out"),
        ("revoke", "opt-out"),
        ("revoke", "opt-in"),
    ]


def test_store_reports_the_rule_replaced_and_who_changed_it(store: ConsentStore) -> None:
    before, first = store.change(PATIENT, "opt-out", actor="alice")
    assert before is None and first.mode == "opt-out"
    before, second = store.change(PATIENT, "opt-in", actor="bob")
    assert before == first and second.mode == "opt-in"
    [gone] = store.revoke_rules(PATIENT, actor="carol")
    assert gone == second
    assert [(e["action"], e["mode"], e["actor"]) for e in store.history(PATIENT)] == [
        ("set", "opt-out", "alice"),
        ("set", "opt-in", "bob"),
        ("revoke", "opt-in", "carol"),
    ]


def test_a_store_from_before_actors_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE consent_event (seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, "
        "action TEXT NOT NULL, patient_id TEXT NOT NULL, community TEXT NOT NULL, "
        "class_code TEXT NOT NULL, confidentiality_code TEXT NOT NULL, mode TEXT, note TEXT);"
        f"INSERT INTO consent_event VALUES (1, 'then', 'set', '{PATIENT}', '*', '*', '*', "
        "'opt-out', NULL);"
    )
    db.commit()
    db.close()
    upgraded = ConsentStore(path)
    try:
        upgraded.set(PATIENT, "opt-in", actor="dave")
        assert [e["actor"] for e in upgraded.history(PATIENT)] == [None, "dave"]
    finally:
        upgraded.close()


def test_store_refuses_bad_input(store: ConsentStore) -> None:
    with pytest.raises(ConsentError):
        store.set("not a cx", "opt-out")
    with pytest.raises(ConsentError):
        store.set(PATIENT, "maybe")
    with pytest.raises(ConsentError):
        store.set(PATIENT, "opt-out", community="beta")
    with pytest.raises(ConsentError):
        store.set(PATIENT, "opt-out", class_code="1.2.3|")


def test_changes_are_seen_by_another_connection(store: ConsentStore, tmp_path: Path) -> None:
    # The CLI and the running gateway share the file.
    other = ConsentStore(tmp_path / "consent.sqlite3")
    try:
        store.set(PATIENT, "opt-out")
        assert [r.mode for r in other.rules_for(PATIENT)] == ["opt-out"]
    finally:
        other.close()


def test_service_uses_per_peer_default_modes(store: ConsentStore) -> None:
    service = ConsentService(store, ConsentConfig(True, None, "opt-out", {C: "opt-in"}))
    assert service.decide_for_documents(PATIENT, B, [("X", "N")]) == [True]
    assert service.decide_for_documents(PATIENT, C, [("X", "N")]) == [False]
    store.set(PATIENT, "opt-in", community=C)
    assert service.decide_for_documents(PATIENT, C, [("X", ["N"]), (None, None)]) == [True, True]
    assert service.decide_for_documents(None, B, [("X", "N")]) == [False]


def test_parse_consent_config(tmp_path: Path) -> None:
    config = parse_consent_config(
        {"enabled": True, "default_mode": "opt-in", "peer_modes": {B: "opt-out"}},
        tmp_path,
        tmp_path / "data",
    )
    assert config.database == tmp_path / "data" / "consent.sqlite3"
    assert config.mode_for(B) == "opt-out" and config.mode_for(C) == "opt-in"
    assert config.admin_token_file is None
    with_tokens = parse_consent_config({"admin_token_file": "ops/tokens"}, tmp_path, tmp_path)
    assert with_tokens.admin_token_file == tmp_path / "ops" / "tokens"
    with pytest.raises(ConsentError):
        parse_consent_config({"admin_token_file": 7}, tmp_path, tmp_path)
    with pytest.raises(ConsentError):
        parse_consent_config({"default_mode": "sometimes"}, tmp_path)
    with pytest.raises(ConsentError):
        parse_consent_config({"enabled": True}, tmp_path)  # nowhere to keep the store
    with pytest.raises(ConsentError):
        parse_consent_config({"peer_modes": {"beta": "opt-in"}}, tmp_path, tmp_path)


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xca-gateway")
    add_consent_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_cli_set_list_check_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[storage]\ndata_dir = "data"\n\n[consent]\nenabled = true\n')
    base = ["consent"]
    assert (
        _cli(
            [
                *base,
                "set",
                "--config",
                str(config),
                "--patient",
                PATIENT,
                "--mode",
                "opt-out",
                "--community",
                B,
                "--note",
                "consent form 42",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mode"] == "opt-out"
    assert (tmp_path / "data" / "consent.sqlite3").exists()
    assert _cli([*base, "list", "--config", str(config), "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["community"] == B and listed["note"] == "consent form 42"
    assert (
        _cli([*base, "check", "--config", str(config), "--patient", PATIENT, "--community", B]) == 1
    )
    assert json.loads(capsys.readouterr().out)["allowed"] is False
    assert (
        _cli([*base, "check", "--config", str(config), "--patient", PATIENT, "--community", C]) == 0
    )
    capsys.readouterr()
    assert _cli([*base, "revoke", "--config", str(config), "--patient", PATIENT]) == 0
    assert "1 rule(s) revoked" in capsys.readouterr().out
    assert (
        _cli([*base, "set", "--config", str(config), "--patient", "bogus", "--mode", "opt-in"]) == 2
    )
    assert "xca-gateway:" in capsys.readouterr().err


# --------------------------------------------------------------------------- admin API


@dataclass
class Admin:
    client: httpx.AsyncClient  # carries the operator's token
    service: ConsentService
    port: int
    token: str
    refusals: list[tuple[AccessDecision, str]] = field(default_factory=list)
    changes: list[ConsentChange] = field(default_factory=list)


@pytest.fixture
async def admin(store: ConsentStore, tmp_path: Path) -> AsyncIterator[Admin]:
    """The API on a real loopback socket, with one operator (``ops-anna``)."""
    token = write_operator_token_file(tmp_path / "operators", "ops-anna")
    service = ConsentService(store, ConsentConfig(enabled=True))
    refusals: list[tuple[AccessDecision, str]] = []
    changes: list[ConsentChange] = []
    port = 0
    gate = AdminGate(
        load_operator_tokens(tmp_path / "operators"),
        lambda: ("127.0.0.1", port),
        on_refusal=lambda decision, resource: refusals.append((decision, resource)),
    )
    server = HttpServer(
        ConsentAdminApp(
            service,
            gate,
            on_change=changes.append,
            base_url=lambda: f"http://127.0.0.1:{port}",
        ),
        ssl_context=None,
    )
    await server.start("127.0.0.1", 0)
    port = server.port
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ) as client:
        yield Admin(client, service, port, token, refusals, changes)
    await server.close()


def _patient_url(patient: str = PATIENT) -> str:
    return "/consent/patients/" + urllib.parse.quote(patient, safe="")


async def test_admin_api_manages_consent(admin: Admin) -> None:
    client, service = admin.client, admin.service
    r = await client.put(_patient_url(), json={"mode": "opt-out", "class_code": "PSY"})
    assert r.status_code == 200 and r.json()["rule"]["class_code"] == "PSY"
    assert service.decide_for_documents(PATIENT, B, [("PSY", None), ("RAD", None)]) == [False, True]

    r = await client.get(_patient_url())
    body = r.json()
    assert body["patient"] == PATIENT and len(body["rules"]) == 1 and len(body["history"]) == 1

    r = await client.get(
        "/consent/decision", params={"patient": PATIENT, "community": B, "class_code": "PSY"}
    )
    assert r.json()["allowed"] is False and "opt-out" in r.json()["reason"]

    r = await client.get("/consent/patients")
    assert [x["patient_id"] for x in r.json()["rules"]] == [PATIENT]

    r = await client.delete(_patient_url(), params={"class_code": "PSY"})
    assert r.json() == {"revoked": 1}
    assert service.decide_for_documents(PATIENT, B, [("PSY", None)]) == [True]


async def test_admin_api_answers_bad_input_with_json_errors(admin: Admin) -> None:
    client = admin.client
    cases = [
        await client.put(_patient_url(), content=b"{not json"),
        await client.put(_patient_url(), json={"mode": "perhaps"}),
        await client.put(_patient_url(), json={"mode": "opt-in", "extra": "x"}),
        await client.put(_patient_url("nobody"), json={"mode": "opt-in"}),
        await client.get("/consent/patients", params={"limit": "many"}),
        await client.get("/consent/decision", params={"patient": PATIENT}),
    ]
    for response in cases:
        assert response.status_code == 400, response.text
        assert "error" in response.json()
    assert (await client.get("/elsewhere")).status_code == 404
    assert (await client.post(_patient_url(), json={})).status_code == 405
    big = await client.put(_patient_url(), content=b"x" * (70 * 1024))
    assert big.status_code == 413


async def test_admin_api_reports_each_change_with_the_operator(admin: Admin) -> None:
    client = admin.client
    assert (await client.put(_patient_url(), json={"mode": "opt-out"})).status_code == 200
    assert (await client.put(_patient_url(), json={"mode": "opt-in"})).status_code == 200
    await client.put(_patient_url(), json={"mode": "opt-out", "community": B})
    assert (await client.delete(_patient_url())).json() == {"revoked": 2}
    assert (await client.delete(_patient_url())).json() == {"revoked": 0}  # no change
    summary = [
        (
            c.operator.name,
            c.action,
            c.before.mode if c.before else None,
            c.after.mode if c.after else None,
        )
        for c in admin.changes
    ]
    assert summary == [
        ("ops-anna", "C", None, "opt-out"),
        ("ops-anna", "U", "opt-out", "opt-in"),
        ("ops-anna", "C", None, "opt-out"),
        ("ops-anna", "D", "opt-in", None),
        ("ops-anna", "D", "opt-out", None),
    ]
    assert all(c.patient_id == PATIENT for c in admin.changes)
    assert all(
        c.resource == f"http://127.0.0.1:{admin.port}{_patient_url()}" for c in admin.changes
    )
    history = (await client.get(_patient_url())).json()["history"]
    assert {e["actor"] for e in history} == {"ops-anna"}
    assert admin.refusals == []


async def test_admin_api_refuses_without_a_valid_token_or_with_a_foreign_host(
    admin: Admin,
) -> None:
    base = f"http://127.0.0.1:{admin.port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as anonymous:
        no_token = await anonymous.put(_patient_url(), json={"mode": "opt-out"})
        wrong = await anonymous.get(
            "/consent/patients", headers={"authorization": "Bearer " + "x" * 43}
        )
        basic = await anonymous.get("/consent/patients", headers={"authorization": "Basic eDp4"})
        # DNS rebinding: a page at rebind.example (resolving to 127.0.0.1) reaches the port
        # with the operator's browser, which sends the page's name as Host. Even with a
        # token the request is refused.
        rebound = await anonymous.put(
            _patient_url(),
            json={"mode": "opt-in"},
            headers={
                "host": f"rebind.example:{admin.port}",
                "authorization": f"Bearer {admin.token}",
            },
        )
        other_port = await anonymous.get(
            "/consent/patients",
            headers={"host": "127.0.0.1:1", "authorization": f"Bearer {admin.token}"},
        )
    for response in (no_token, wrong, basic):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer ")
        assert "error" in response.json()
    for response in (rebound, other_port):
        assert response.status_code == 403 and "Host" in response.json()["error"]
    assert admin.service.store.rules_for(PATIENT) == []  # nothing changed
    assert admin.changes == []
    # Exactly one refusal reported per refused request, naming the address, for the admin door.
    assert len(admin.refusals) == 5
    reasons = [d.reason for d, _ in admin.refusals]
    assert reasons[0].startswith("no operator token")
    assert reasons[1] == reasons[2] == "no valid operator token"
    assert all("Host header" in r for r in reasons[3:])
    for decision, resource in admin.refusals:
        assert not decision.allowed and decision.door == "admin"
        assert decision.identity == Identity(address="127.0.0.1")
        assert resource.startswith(base + "/consent/")
    # Loopback names with this port are this listener.
    ok = await admin.client.get("/consent/patients", headers={"host": f"localhost:{admin.port}"})
    assert ok.status_code == 200


def test_operator_token_files(tmp_path: Path) -> None:
    path = tmp_path / "ops"
    token = write_operator_token_file(path, "ops-anna")
    assert len(token) >= 32 and (path.stat().st_mode & 0o777) == 0o600
    [entry] = load_operator_tokens(path)
    assert entry.name == "ops-anna" and token not in repr(entry)  # only the digest is kept
    assert read_operator_token(path) == ("ops-anna", token)
    path.chmod(0o644)
    with pytest.raises(AdminAccessError, match="readable by others"):
        load_operator_tokens(path)
    with pytest.raises(AdminAccessError):
        load_operator_tokens(tmp_path / "missing")
    for bad in ("anna", "anna short", "an na " + "x" * 40, "-anna " + "x" * 40):
        with pytest.raises(AdminAccessError):
            parse_operator_tokens(bad)
    with pytest.raises(AdminAccessError, match="twice"):
        parse_operator_tokens(f"anna {'x' * 40}\nanna {'y' * 40}\n")
    both = parse_operator_tokens(f"# ops\nanna {'x' * 40}\n\nbo {'y' * 40}\n")
    assert bearer_operator(f"Bearer {'y' * 40}", both) == "bo"
    assert bearer_operator(f"bearer {'x' * 40}", both) == "anna"
    assert bearer_operator(f"Bearer {'x' * 39}", both) is None
    assert bearer_operator(f"Token {'x' * 40}", both) is None
    assert bearer_operator(None, both) is None
    assert bearer_operator("Bearer ", both) is None


def test_allowed_hosts_are_this_listener_only() -> None:
    hosts = allowed_hosts("127.0.0.1", 9090)
    assert {"127.0.0.1:9090", "localhost:9090", "[::1]:9090"} <= hosts
    assert "127.0.0.1" not in hosts and "evil.example:9090" not in hosts
    assert "[::1]:9090" in allowed_hosts("::1", 9090)
    assert "localhost" in allowed_hosts("localhost", 80)


def test_consent_change_audit_is_a_patient_record_event() -> None:
    ctx = AuditContext(AuditSource("north-gateway"), host="north", process_id="42")
    operator = Principal("ops-anna", frozenset({Role.OPERATOR}), Identity(address="127.0.0.1"))
    old = ConsentRule(PATIENT, "opt-out", B)
    new = ConsentRule(PATIENT, "opt-in", B, note="form 7")
    url = "http://127.0.0.1:9090/consent/patients/x"
    when = datetime(2026, 1, 2, tzinfo=UTC)
    for before, after, action, cycle in (
        (None, new, "C", "1"),
        (old, new, "U", "3"),
        (old, None, "D", "14"),
    ):
        change = ConsentChange(operator, PATIENT, before, after, url)
        root = consent_change_audit(ctx, change, when=when).to_element()
        assert not schema_errors(root), schema_errors(root)
        event = root.find("EventIdentification")
        assert event is not None and event.get("EventActionCode") == action
        assert event.find("EventID").get("csd-code") == "110110"  # type: ignore[union-attr]
        requestor = next(
            p for p in root.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"
        )
        assert requestor.get("UserID") == "ops-anna"
        assert requestor.get("NetworkAccessPointID") == "127.0.0.1"
        [patient] = root.iter("ParticipantObjectIdentification")
        assert patient.get("ParticipantObjectID") == PATIENT
        assert patient.get("ParticipantObjectTypeCodeRole") == "1"
        assert patient.get("ParticipantObjectDataLifeCycle") == cycle
        import base64

        details = {
            d.get("type"): base64.b64decode(d.get("value") or "").decode()
            for d in patient.iter("ParticipantObjectDetail")
        }
        assert details["PreviousMode"] == (before.mode if before else "none")
        assert details["NewMode"] == (after.mode if after else "none")
        assert details["ConsentScope"] == f"community={B}; class_code=*; confidentiality_code=*"
