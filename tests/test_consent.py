"""Patient consent: decision rules, the SQLite store, the CLI and the admin API."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from xca_gateway.consent import (
    ConsentAdminApp,
    ConsentConfig,
    ConsentError,
    ConsentRule,
    ConsentService,
    ConsentStore,
    DocumentCode,
    add_consent_command,
    evaluate,
    parse_consent_config,
)
from xca_gateway.server import HttpServer

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


@pytest.fixture
async def admin(store: ConsentStore) -> AsyncIterator[tuple[httpx.AsyncClient, ConsentService]]:
    service = ConsentService(store, ConsentConfig(enabled=True))
    server = HttpServer(ConsentAdminApp(service), ssl_context=None)
    await server.start("127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
        yield client, service
    await server.close()


def _patient_url(patient: str = PATIENT) -> str:
    return "/consent/patients/" + urllib.parse.quote(patient, safe="")


async def test_admin_api_manages_consent(admin: tuple[httpx.AsyncClient, ConsentService]) -> None:
    client, service = admin
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


async def test_admin_api_answers_bad_input_with_json_errors(
    admin: tuple[httpx.AsyncClient, ConsentService],
) -> None:
    client, _ = admin
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
