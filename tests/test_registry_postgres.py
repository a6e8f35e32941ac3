"""The registry on a real PostgreSQL server, and several replicas sharing it.

A private server is started for the session (initdb in a temp dir, loopback port, no fsync);
each test gets its own database. Skipped only when the PostgreSQL binaries are absent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_registry_corpus import (
    APPROVED,
    DEPRECATED,
    PID_A,
    REPOSITORY,
    U,
    adhoc,
    corpus_submissions,
    listed,
    names,
    quoted,
)
from xca_gateway import ebrim
from xca_gateway.ebrim import ErrorCode, StoredQueryId
from xca_gateway.namespaces import ResponseStatus
from xca_gateway.registry import LocalRegistry, open_registry, parse_registry_config
from xca_gateway.registry.builder import (
    AssociationSpec,
    DocumentEntrySpec,
    SubmissionSetSpec,
    build_submit_objects_request,
)


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


@dataclass
class PostgresServer:
    port: int
    user: str = "registry"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    import psycopg

    base = Path(tempfile.mkdtemp(prefix="xca-registry-pg-"))
    data, sockets = base / "data", base / "sockets"
    data.mkdir()
    sockets.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root: drop to the postgres account.
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs a 'postgres' account to start PostgreSQL")
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
            "registry",
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
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=60",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = PostgresServer(port)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"postgres exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                with psycopg.connect(server.url(), connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail("postgres did not accept connections within 60 s")
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


async def _open(url: str, tmp: Path, **config: object) -> LocalRegistry:
    registry = await open_registry(parse_registry_config({"url": url, **config}, tmp, tmp))
    assert isinstance(registry, LocalRegistry)
    return registry


# ----------------------------------------------------------------------------------- tests


async def test_corpus_on_postgres_answers_like_sqlite(postgres_url: str, tmp_path: Path) -> None:
    registry = await _open(postgres_url, tmp_path)
    try:
        for request in corpus_submissions():
            assert await registry.submit(request) == []
        counts = await registry.store.counts()
        assert counts == {"DocumentEntry": 8, "SubmissionSet": 5, "Folder": 1, "Association": 17}
        result = await registry.stored_query(
            adhoc(
                StoredQueryId.FIND_DOCUMENTS,
                [
                    ("$XDSDocumentEntryPatientId", quoted(PID_A)),
                    ("$XDSDocumentEntryStatus", listed(APPROVED, DEPRECATED)),
                    ("$XDSDocumentEntryAuthorPerson", listed("%Smith%")),
                ],
            )
        )
        assert result.status == ResponseStatus.SUCCESS
        assert names(result.objects) == ["kos_ct", "addendum"]
        # LIKE without an escape character: a backslash is an ordinary character.
        result = await registry.stored_query(
            adhoc(
                StoredQueryId.FIND_DOCUMENTS,
                [
                    ("$XDSDocumentEntryPatientId", quoted(PID_A)),
                    ("$XDSDocumentEntryStatus", listed(APPROVED)),
                    ("$XDSDocumentEntryAuthorPerson", listed("\\%")),
                ],
            )
        )
        assert result.objects == []
    finally:
        await registry.close()


async def test_replicas_share_one_registry(postgres_url: str, tmp_path: Path) -> None:
    first, second = await _open(postgres_url, tmp_path), await _open(postgres_url, tmp_path)
    try:
        assert await first.submit(corpus_submissions()[0]) == []
        result = await second.stored_query(
            adhoc(
                StoredQueryId.GET_DOCUMENTS, [("$XDSDocumentEntryEntryUUID", listed(U("kos_ct")))]
            )
        )
        assert names(result.objects) == ["kos_ct"]
    finally:
        await first.close()
        await second.close()


def _replacement(n: int) -> object:
    spec = DocumentEntrySpec(PID_A, f"1.2.826.0.1.3680043.10.9.{n}", entry_uuid=f"New{n}")
    return build_submit_objects_request(
        SubmissionSetSpec(PID_A, f"1.2.826.0.1.3680043.10.8.{n}"),
        [spec],
        associations=[AssociationSpec(f"New{n}", U("report2"), type=ebrim.RPLC)],
    )


async def test_two_replicas_cannot_both_replace_one_document(
    postgres_url: str, tmp_path: Path
) -> None:
    replicas = [await _open(postgres_url, tmp_path) for _ in range(2)]
    try:
        for request in corpus_submissions()[:2]:
            assert await replicas[0].submit(request) == []
        outcomes = await asyncio.gather(
            *(r.submit(_replacement(i)) for i, r in enumerate(replicas))  # type: ignore[arg-type]
        )
        accepted = [o for o in outcomes if o == []]
        refused = [o for o in outcomes if o != []]
        assert len(accepted) == 1 and len(refused) == 1
        assert refused[0][0].error_code == ErrorCode.REGISTRY_DEPRECATED_DOCUMENT_ERROR
        counts = await replicas[1].store.counts()
        assert counts["DocumentEntry"] == 5  # kos_ct, kos_mr, report, report2, one replacement
    finally:
        for r in replicas:
            await r.close()


async def test_concurrent_duplicate_unique_ids_register_once(
    postgres_url: str, tmp_path: Path
) -> None:
    replicas = [await _open(postgres_url, tmp_path) for _ in range(3)]
    try:

        def request(n: int) -> object:
            spec = DocumentEntrySpec(
                PID_A,
                "1.2.826.0.1.3680043.10.7.1",
                entry_uuid=f"Doc{n}",
                repository_unique_id=REPOSITORY,
            )
            return build_submit_objects_request(
                SubmissionSetSpec(PID_A, f"1.2.826.0.1.3680043.10.6.{n}"), [spec]
            )

        outcomes = await asyncio.gather(*(r.submit(request(i)) for i, r in enumerate(replicas)))  # type: ignore[arg-type]
        assert sum(1 for o in outcomes if o == []) == 1
        for errors in (o for o in outcomes if o):
            assert errors[0].error_code == ErrorCode.DUPLICATE_UNIQUE_ID_IN_REGISTRY
        assert (await replicas[0].store.counts())["DocumentEntry"] == 1
    finally:
        for r in replicas:
            await r.close()
