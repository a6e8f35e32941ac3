"""A slow or stopped shared database (issue 16) holds the requests that need it, and no other.

The shared stores run off the event loop, each call within a deadline (statement_timeout on the
server, the same plus a margin on the client); what needs the database then gets its
standards-shaped refusal: consent unknown withholds (LocalPolicyRestrictionError), a replay
check that cannot be made refuses the assertion, a study grant that cannot be read is a 503.
The stalls are real, on the tests' own private PostgreSQL: a table lock held by another
connection (the server's statement_timeout ends the wait), and SIGSTOP of the server's processes
(only the client's deadline can end that one). Assertions are on ordering, not on durations.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from lxml import etree

from tests.audit_inbox import AuditInbox
from tests.conftest import wait_for
from tests.postgres import PostgresServer
from tests.test_gateway_consent import AUTHORITY, REPOSITORY, SOURCE, find_documents
from xca_gateway.app.gateway import Gateway
from xca_gateway.doors.federation import FederationError, FederationView, StudyGrant
from xca_gateway.doors.study_access_store import PostgresStudyAccess
from xca_gateway.protocol.namespaces import RIM, RS, Action
from xca_gateway.protocol.peer_client import PeerClient
from xca_gateway.protocol.shared_db import SharedDatabase
from xca_gateway.protocol.tls import client_context
from xca_gateway.registry import open_registry
from xca_gateway.repository import DocumentRepository
from xca_gateway.security.callers import Identity, Principal
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.security.replay_store import PostgresReplayCache
from xca_gateway.security.xua import ReplayCheckUnavailable
from xca_gateway.settings import OutboundConfig
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, generate_study
from xca_gateway.tools.import_manifests import import_studies

POLL = 0.05
POLLS = 1200  # bounds every wait below (about a minute)


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


def _waiting_on_lock(monitor: psycopg.Connection[Any], table: str) -> bool:
    """A statement of this database is waiting for the lock on ``table``."""
    row = monitor.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE NOT l.granted AND c.relname = %s",
        [table],
    ).fetchone()
    return bool(row and row[0])


async def test_a_locked_consent_table_holds_only_the_query_that_needs_consent(
    gateway_factory: Callable[..., Gateway],
    pki: DevPki,
    tmp_path: Path,
    database_url: str,
) -> None:
    """ITI-38 for a patient with documents needs consent: while the consent table is locked by
    another connection it waits; meanwhile a TLS handshake, an ITI-38 that needs no consent and
    /healthz are answered. After the statement timeout the waiting query is answered with
    LocalPolicyRestrictionError (consent unknown withholds), and both queries are audited."""
    data = tmp_path / "beta"
    study = generate_study(
        data / "images",
        patient=DEFAULT_PATIENTS[0],
        patient_id="C02-3001",
        issuer_oid=AUTHORITY,
        modality="CT",
        body_part="HEAD",
        study_date=date(2024, 1, 1),
        institution="South",
        accession_number="SOU-STALL",
        uid_root="1.2.826.0.1.3680043.10.543",
        series_count=1,
        instances_per_series=1,
        seed=7,
    )
    inbox = AuditInbox()
    beta = gateway_factory(
        "beta",
        storage={"data_dir": str(data)},
        repository={"repository_unique_id": REPOSITORY, "manifest": {"imaging_source_id": SOURCE}},
        imaging={"sources": [{"repository_unique_id": SOURCE, "kind": "filesystem"}]},
        consent={"enabled": True, "default_mode": "opt-out"},
        shared={"database": database_url, "statement_timeout": 5.0},
        audit={
            "audit_source_id": "beta-stall",
            "destinations": [
                {"name": "inbox", "transport": "udp", "host": "127.0.0.1", "port": inbox.port}
            ],
        },
    )
    registry = await open_registry(beta.config.registry)
    try:
        report = await import_studies(
            [data / "images"],
            repository=DocumentRepository(data / "repository", REPOSITORY),
            registry=registry,
            community=beta.config.community,
            progress=False,
            options=beta.config.repository.manifest,
        )
    finally:
        await registry.close()
    assert len(report.with_status("registered")) == 1
    patient = f"{study.patient_id}^^^&{AUTHORITY}&ISO"
    nobody = f"C02-3999^^^&{AUTHORITY}&ISO"  # no documents: no consent to read
    url = beta.endpoint_urls()["iti38"]
    alpha = pki.communities["alpha"]

    def client() -> PeerClient:
        # A request timeout far above the gateway's deadline: the gateway answers, not this.
        context = client_context(pki.ca, alpha.cert, alpha.key)
        return PeerClient(context, OutboundConfig(connect_timeout=30, request_timeout=120))

    waiting, other = client(), client()
    locker = psycopg.connect(database_url)
    monitor = psycopg.connect(database_url, autocommit=True)
    stalled: asyncio.Task[Any] | None = None
    try:
        locker.execute("LOCK TABLE consent_rule IN ACCESS EXCLUSIVE MODE")
        stalled = asyncio.create_task(waiting.call(url, find_documents(patient), Action.ITI38))
        for _ in range(POLLS):
            if _waiting_on_lock(monitor, "consent_rule") or stalled.done():
                break
            await asyncio.sleep(POLL)
        assert _waiting_on_lock(monitor, "consent_rule"), "the consent read never reached the lock"

        # Meanwhile: a new TLS connection and an ITI-38 needing no consent, and /healthz.
        reply = await other.call(url, find_documents(nobody), Action.ITI38)
        assert reply.payload.get("status", "").endswith(":Success")
        async with httpx.AsyncClient(base_url=beta.admin_url, timeout=30) as admin:
            assert (await admin.get("/healthz")).status_code == 200
        # ...all answered while the consent query is still waiting on the database.
        assert not stalled.done()
        assert _waiting_on_lock(monitor, "consent_rule")

        # The statement timeout ends the wait (the lock is still held): consent unknown, so
        # the patient's documents are withheld with the policy error, never a stack trace.
        reply = await asyncio.wait_for(stalled, POLL * POLLS)
        assert not list(reply.payload.iter(f"{{{RIM}}}ExtrinsicObject"))
        codes = [e.get("errorCode") for e in reply.payload.iter(f"{{{RS}}}RegistryError")]
        assert codes == ["LocalPolicyRestrictionError"]
    finally:
        if stalled is not None and not stalled.done():
            stalled.cancel()
        locker.rollback()
        locker.close()
        monitor.close()
        await waiting.aclose()
        await other.aclose()

    # Audit: both queries, the refused one saying why (the record is not lost).
    def served() -> list[etree._Element]:
        return [
            r
            for r in inbox.with_event("110112")
            if any(c.get("csd-code") == "ITI-38" for c in r.iter("EventTypeCode"))
        ]

    try:
        assert wait_for(lambda: len(served()) >= 2, timeout=30)
        descriptions = [
            r.findtext("EventIdentification/EventOutcomeDescription") or "" for r in served()
        ]
        assert any("consent could not be established" in d for d in descriptions), descriptions
    finally:
        inbox.close()


def _backend_pids(monitor: psycopg.Connection[Any], database: str) -> list[int]:
    rows = monitor.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        [database],
    ).fetchall()
    return [int(r[0]) for r in rows]


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, not ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@contextmanager
def _stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP these processes of the tests' own PostgreSQL; SIGCONT whatever happens."""
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


async def test_a_stopped_database_server_is_refused_after_the_deadline_and_not_ready(
    postgres_server: PostgresServer, database_url: str
) -> None:
    """A server that answers nothing (SIGSTOP: no statement_timeout can fire): the replay check
    and the study grants are refused after the client's deadline while the event loop serves
    others, the database is reported unhealthy (/readyz) until it answers again."""
    database = database_url.rsplit("/", 1)[1]
    db = SharedDatabase(database_url, max_size=2, connect_timeout=2, statement_timeout=0.5)
    monitor = psycopg.connect(postgres_server.url(), autocommit=True)
    try:
        replay, access = PostgresReplayCache(db), PostgresStudyAccess(db)
        view = FederationView(cast(Any, None), access=access, clock=lambda: 100.0)
        viewer = Principal("viewer", frozenset(), Identity(address="127.0.0.1"))
        await access.grant_async([StudyGrant("viewer", "1.2.3.1", "P^^^&1.2&ISO", 1000.0)])
        assert await db.probe_async() is True
        now = datetime.now(UTC)
        backends = _backend_pids(monitor, database)
        assert backends
        postmaster = _parent(backends[0])
        with _stopped([postmaster, *backends]):
            check = asyncio.create_task(
                replay.check_and_add_async("idp", "_stall", now + timedelta(minutes=5), now)
            )
            # The loop is free: other work runs to completion while the check waits.
            ticks = 0
            for _ in range(10):
                await asyncio.sleep(0)
                ticks += 1
            assert ticks == 10 and not check.done()
            with pytest.raises(ReplayCheckUnavailable):
                await asyncio.wait_for(check, POLL * POLLS)
            assert db.healthy is False
            # Known down: a grant lookup is refused at once, as a 503 for the front doors.
            with pytest.raises(FederationError) as refused:
                await view.studies_by_uid(["1.2.3.1"], viewer)
            assert refused.value.http_status == 503
            assert await db.probe_async(timeout=0.5) is False
        # Answering again: ready, and the same assertion is recorded now.
        for _ in range(POLLS):
            if await db.probe_async(timeout=2):
                break
            await asyncio.sleep(POLL)
        assert db.healthy is True
        assert [
            g.study_instance_uid for g in await access.granted_async("viewer", ["1.2.3.1"], 100.0)
        ] == ["1.2.3.1"]
        fresh = now + timedelta(seconds=1)
        assert (
            await replay.check_and_add_async("idp", "_stall2", fresh + timedelta(minutes=5), fresh)
            is True
        )
    finally:
        monitor.close()
        db.close()
