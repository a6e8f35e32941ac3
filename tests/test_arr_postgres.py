"""The audit record store on a real PostgreSQL server (psycopg 3), through the same interface
as SQLite: indexing and search, read-only records, and a repository whose parse workers write
through their own connections. A private server is started (initdb in a temp dir, loopback
port); skipped only when the PostgreSQL binaries are absent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import wait_for
from xca_gateway.arr.harness import RepositoryThread, dev_config
from xca_gateway.arr.parse import parse_record
from xca_gateway.arr.store import EventFilter, PostgresAuditStore
from xca_gateway.audit import messages as am
from xca_gateway.audit.syslog import format_message, frame
from xca_gateway.pki import init_dev_pki
from xca_gateway.tls import client_context

CTX = am.AuditContext(am.AuditSource("pg-gw"), host="pg")


def _bindir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    import psycopg

    base = Path(tempfile.mkdtemp(prefix="xca-arr-pg-"))
    data, sockets = base / "data", base / "sockets"
    data.mkdir()
    sockets.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root.
        import pwd

        account = pwd.getpwnam("postgres")
        os.chmod(base, 0o755)
        for path in (data, sockets):
            os.chown(path, account.pw_uid, account.pw_gid)
        run_as = [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            "--",
        ]
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "arr",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    port = _free_port()
    log_path = base / "postgres.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *run_as,
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
                "-k",
                str(sockets),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=40",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    dsn = f"postgresql://arr@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"postgres exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                with psycopg.connect(dsn, connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail("postgres did not accept connections within 60 s")
                time.sleep(0.2)
        yield dsn
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


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
    message = am.iti38_query(
        CTX,
        side="responding",
        requester=am.remote_node(f"10.2.0.{i % 3}"),
        responder=CTX.local_node("https://pg/xca/iti38"),
        query_id="q",
        query=b"<q/>",
        home_community_id="urn:oid:1.2.3.70.9",
        patient_ids=[f"PG{i % 4}^^^&1.2.3&ISO"],
        human_requestors=[am.xua_requestor(f"user{i % 2}", "idp")],
        outcome=am.EventOutcome.SUCCESS if i % 5 else am.EventOutcome.SERIOUS_FAILURE,
        when=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=i),
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
