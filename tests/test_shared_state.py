"""State the replicas of one community share in PostgreSQL (issue 21): what one replica decides
is what every replica decides. Each "replica" here is its own SharedDatabase (its own pool) on
one private PostgreSQL server."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.postgres import PostgresServer
from tests.test_consent import _cli
from xca_gateway.app.config import parse_config
from xca_gateway.doors.federation import StudyGrant
from xca_gateway.doors.study_access_store import PostgresStudyAccess
from xca_gateway.protocol.shared_db import SharedDatabase, SharedDatabaseError
from xca_gateway.security.consent.postgres_store import PostgresConsentStore
from xca_gateway.security.consent.service import ConsentConfig, ConsentError, ConsentService
from xca_gateway.security.replay_store import PostgresReplayCache
from xca_gateway.settings import ConfigError

PATIENT = "P1^^^&1.2.3&ISO"
PEER = "urn:oid:1.2.3.4"


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def replicas(database_url: str) -> Iterator[tuple[SharedDatabase, SharedDatabase]]:
    a, b = SharedDatabase(database_url, max_size=2), SharedDatabase(database_url, max_size=2)
    yield a, b
    a.close()
    b.close()


def test_an_assertion_used_on_one_replica_is_refused_on_the_other(
    replicas: tuple[SharedDatabase, SharedDatabase],
) -> None:
    a, b = (PostgresReplayCache(db) for db in replicas)
    now = datetime.now(UTC)
    expires = now + timedelta(minutes=5)
    assert a.check_and_add("idp", "_a1", expires, now) is True
    assert b.check_and_add("idp", "_a1", expires, now) is False
    assert a.check_and_add("idp", "_a1", expires, now) is False
    # Another issuer's assertion of the same ID is another assertion.
    assert b.check_and_add("other-idp", "_a1", expires, now) is True
    # Once expired, the ID no longer counts (as in the in-memory cache).
    later = expires + timedelta(seconds=1)
    assert b.check_and_add("idp", "_a1", later + timedelta(minutes=5), later) is True
    assert len(a) == 2


def test_a_consent_change_through_one_replica_applies_on_the_other_at_once(
    replicas: tuple[SharedDatabase, SharedDatabase],
) -> None:
    store_a, store_b = (PostgresConsentStore(db) for db in replicas)
    config = ConsentConfig(enabled=True, default_mode="opt-out")
    on_a, on_b = ConsentService(store_a, config), ConsentService(store_b, config)
    documents = [("11488-4", "N")]
    assert on_b.decide_for_documents(PATIENT, PEER, documents) == [True]
    before, now = store_a.change(PATIENT, "opt-out", community=PEER, actor="clerk")
    assert before is None and now.mode == "opt-out"
    assert on_b.decide_for_documents(PATIENT, PEER, documents) == [False]
    before, now = store_b.change(PATIENT, "opt-in", community=PEER, note="asked again")
    assert before is not None and before.mode == "opt-out" and now.mode == "opt-in"
    assert on_a.decide_for_documents(PATIENT, PEER, documents) == [True]
    assert [r.mode for r in store_a.rules_for(PATIENT)] == ["opt-in"]
    assert len(store_a.list_rules()) == 1
    assert store_b.revoke(PATIENT, community=PEER, actor="clerk") == 1
    assert store_a.rules_for(PATIENT) == []
    history = store_a.history(PATIENT)
    assert [(h["action"], h["mode"], h["actor"]) for h in history] == [
        ("set", "opt-out", "clerk"),
        ("set", "opt-in", None),
        ("revoke", "opt-in", "clerk"),
    ]
    with pytest.raises(ConsentError):
        store_a.change(PATIENT, "maybe")
    assert store_a.rules_for("not a cx") == []


def test_a_study_granted_on_one_replica_is_granted_on_the_other_to_that_caller_only(
    replicas: tuple[SharedDatabase, SharedDatabase],
) -> None:
    a, b = (PostgresStudyAccess(db) for db in replicas)
    a.grant([StudyGrant("viewer", "1.2.3.1", PATIENT, 1000.0)])
    a.grant([StudyGrant("viewer", "1.2.3.2", PATIENT, 500.0)])
    assert b.granted("viewer", ["1.2.3.1", "1.2.3.9", "1.2.3.1"], 100.0) == [
        StudyGrant("viewer", "1.2.3.1", PATIENT, 1000.0)
    ]
    assert b.granted("someone-else", ["1.2.3.1"], 100.0) == []
    # Expired grants are not honoured; a renewal replaces the expiry.
    assert [g.study_instance_uid for g in b.granted("viewer", ["1.2.3.2"], 600.0)] == []
    b.grant([StudyGrant("viewer", "1.2.3.2", PATIENT, 2000.0)])
    assert [g.expires_at for g in a.granted("viewer", ["1.2.3.2"], 600.0)] == [2000.0]


def test_an_unreachable_shared_database_is_reported_not_ready(
    postgres_server: PostgresServer,
) -> None:
    name = postgres_server.create_database()
    db = SharedDatabase(postgres_server.url(name), max_size=1, connect_timeout=2)
    try:
        assert db.probe() is True and db.healthy
        access = PostgresStudyAccess(db)
        postgres_server.drop_database(name)  # every connection to it is terminated
        assert db.probe(timeout=2) is False
        assert db.healthy is False
        # A store that cannot reach its database grants nothing, and never crashes.
        assert access.granted("viewer", ["1.2.3.1"], 0.0) == []
        with pytest.raises(SharedDatabaseError), db.transaction() as cur:
            cur.execute("SELECT 1")
    finally:
        db.close()


def _config(extra: str) -> dict[str, object]:
    base = """
[community]
name = "A"
home_community_id = "urn:oid:1.2.3"
patient_id_assigning_authority = "1.2.3"
[tls]
certificate = "c.pem"
private_key = "k.pem"
trust_store = "t.pem"
"""
    return tomllib.loads(base + extra)


def test_the_shared_and_proxy_keys_are_checked(tmp_path: Path) -> None:
    config = parse_config(
        _config(
            '[shared]\ndatabase = "postgresql://u@127.0.0.1:5432/x"\n'
            '[server]\nproxy_protocol = true\nproxy_sources = ["127.0.0.1/32", "::1"]\n'
            "drain_timeout = 5.0\n"
        ),
        tmp_path,
    )
    assert config.shared.database == "postgresql://u@127.0.0.1:5432/x"
    assert config.server.proxy_sources == ("127.0.0.1/32", "::1")
    assert config.server.drain_timeout == 5.0
    assert parse_config(_config(""), tmp_path).shared.database is None
    for bad, message in (
        ('[shared]\ndatabase = "sqlite:///x"\n', "postgresql://"),
        ("[server]\nproxy_protocol = true\n", "needs proxy_sources"),
        ('[server]\nproxy_sources = ["balancer"]\n', "not an address"),
        ('[shared]\nurl = "postgresql://x"\n', "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(_config(bad), tmp_path)


def test_the_consent_cli_writes_the_shared_rules_when_the_gateway_has_replicas(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[consent]\nenabled = true\n\n[shared]\ndatabase = "{database_url}"\n')
    argv = ["consent", "set", "--config", str(config), "--patient", PATIENT, "--mode", "opt-out"]
    assert _cli(argv) == 0
    capsys.readouterr()
    # What every replica reads, not a local file beside the configuration.
    db = SharedDatabase(database_url, max_size=1)
    try:
        assert [r.mode for r in PostgresConsentStore(db).rules_for(PATIENT)] == ["opt-out"]
    finally:
        db.close()
    assert not (tmp_path / "data" / "consent.sqlite3").exists()
    # An unreachable shared database is one line on stderr, exit 2, no traceback.
    config.write_text(
        '[consent]\nenabled = true\n\n[shared]\ndatabase = "postgresql://u@127.0.0.1:1/x"\n'
    )
    assert _cli(argv) == 2
    assert "shared database unreachable" in capsys.readouterr().err
