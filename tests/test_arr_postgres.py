"""The audit record store on a real PostgreSQL server (psycopg 3), through the same interface
as SQLite: indexing and search, read-only records, and a repository whose parse workers write
through their own connections. A private server is started (initdb in a temp dir, loopback
port); skipped only when the PostgreSQL binaries are absent."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.postgres import PostgresServer
from tests.test_arr_parse import legacy_insert, legacy_schema
from xca_gateway.arr import store as st
from xca_gateway.arr.harness import RepositoryThread, dev_config
from xca_gateway.arr.parse import parse_record
from xca_gateway.arr.store import EventFilter, PostgresAuditStore
from xca_gateway.audit import messages as am
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.transactions import iti38

CTX = am.AuditContext(am.AuditSource("pg-gw"), host="pg")


@pytest.fixture(scope="module")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    return postgres_server.url()


@pytest.fixture
def database(postgres_dsn: str) -> Iterator[str]:
    import uuid

    import psycopg

    name = f"arr_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def syslog_message(i: int) -> bytes:
    message = iti38.query_audit(
        CTX,
        am.Parties(
            requester=am.remote_node(f"10.2.0.{i % 3}"),
            responder=CTX.local_node("https://pg/xca/iti38"),
            human_requestors=[am.xua_requestor(f"user{i % 2}", "idp")],
            when=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=i),
        ),
        side="responding",
        query_id="q",
        query=b"<q/>",
        home_community_id="urn:oid:1.2.3.70.9",
        patient_ids=[f"PG{i % 4}^^^&1.2.3&ISO"],
        outcome=am.EventOutcome.SUCCESS if i % 5 else am.EventOutcome.SERIOUS_FAILURE,
    )
    return format_message(
        message.to_xml(),
        outcome=message.outcome,
        timestamp=message.event.date_time,
        hostname="pg",
        app_name="gw",
        procid="1",
    )


def test_postgres_store_indexes_and_searches_like_sqlite(database: str) -> None:
    import psycopg

    store = PostgresAuditStore(database)
    try:
        raws = [syslog_message(i) for i in range(40)]
        ids = store.add([parse_record(r, sender="127.0.0.1", transport="tls") for r in raws])
        assert len(ids) == 40 and len(set(ids)) == 40
        assert len(store.search(EventFilter(patients=(("PG1|",),)), limit=100)) == 10
        since = datetime(2026, 1, 1, 10, tzinfo=UTC)
        window = store.search(
            EventFilter(since=since, until=since + timedelta(hours=9), patients=(("PG2|1.2.3",),))
        )
        assert {r.event_time.hour for r in window} == {10, 14, 18}
        assert store.count(EventFilter(outcomes=((8,),))) == 8
        assert store.count(EventFilter(users=(("user0@idp",),), patients=(("PG1|",),))) == 0
        assert store.count(EventFilter(communities=(("urn:oid:1.2.3.70.9",),))) == 40
        assert store.count(EventFilter(subtypes=(("ITI-38",),), addresses=(("10.2.0.1",),))) == 13
        hist = store.histogram(EventFilter(patients=(("PG0|",),)), 86400, "outcome")
        assert sum(n for _b, _g, n in hist) == 10
        assert store.top(EventFilter(), "requestor", 5)[0][1] == 20
        first = store.get(ids[0])
        assert first is not None and first.raw == raws[0]
        with (
            psycopg.connect(database, autocommit=True) as conn,
            pytest.raises(psycopg.errors.RaiseException, match="read-only"),
        ):
            conn.execute("DELETE FROM events")
        assert store.total() == 40
    finally:
        store.close()


def test_repository_on_postgres_with_parse_workers(database: str, tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "pki", ["alpha", "arr"])
    config = dev_config(pki, tmp_path, postgresql=database, syslog={"parse_workers": 2})
    assert config.database is None
    with (thread := RepositoryThread(config)) as repo:
        assert repo.syslog_tls is not None
        ctx = client_context(pki.ca, pki.communities["alpha"].cert, pki.communities["alpha"].key)
        with (
            socket.create_connection(("127.0.0.1", repo.syslog_tls.port)) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"".join(frame(syslog_message(i)) for i in range(300)))

        def count() -> int:
            thread.flush()
            return repo.store.count(EventFilter(sources=(("pg-gw",),)))

        assert wait_for(lambda: count() == 300, timeout=30)
        assert repo.store.count(EventFilter(patients=(("PG3|1.2.3",),))) == 75


def test_a_database_from_before_the_sender_column_is_migrated(database: str) -> None:
    import psycopg

    old, new = syslog_message(1), syslog_message(2)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(legacy_schema(st._PG_SCHEMA))  # type: ignore[arg-type]
        conn.execute("SELECT nextval('events_id_seq')")
        sql, values = legacy_insert(old, "%s")
        conn.execute(sql, values)  # type: ignore[arg-type]
    store = PostgresAuditStore(database)
    try:
        kept = store.get(1)
        assert kept is not None and kept.raw == old and kept.row.sender_identity is None
        store.add([parse_record(new, sender="10.0.0.2", transport="tls", sender_identity="CN=n")])
        (added,) = store.search(EventFilter(sender_identities=(("CN=n",),)))
        assert added.id == 2 and added.sender_identity == "CN=n"
    finally:
        store.close()
    PostgresAuditStore(database).close()  # again: nothing left to migrate
    with (
        psycopg.connect(database, autocommit=True) as conn,
        pytest.raises(psycopg.errors.RaiseException, match="read-only"),
    ):
        conn.execute("UPDATE events SET sender_identity = 'CN=forged'")
