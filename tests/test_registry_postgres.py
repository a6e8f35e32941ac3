"""The registry on a real PostgreSQL server, and several replicas sharing it.

A private server is started for the session (initdb in a temp dir, loopback port, no fsync);
each test gets its own database. Skipped only when the PostgreSQL binaries are absent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer
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
from xca_gateway.protocol.namespaces import ResponseStatus
from xca_gateway.registry import LocalRegistry, open_registry, parse_registry_config
from xca_gateway.registry.builder import (
    AssociationSpec,
    DocumentEntrySpec,
    SubmissionSetSpec,
    build_submit_objects_request,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrim import ErrorCode, StoredQueryId


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
