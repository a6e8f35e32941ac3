"""The registry's stored XML: zlib with the XDS vocabulary as preset dictionary.

Every object of the corpus is stored with the dictionary and read back byte for byte; a
registry written before the dictionary (plain zlib) answers the same stored queries with the
same XML; the dictionary is frozen (an edit would make stored rows unreadable).
"""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

import pytest
from lxml import etree

from tests.test_registry_corpus import (
    APPROVED,
    DEPRECATED,
    PID_A,
    PID_B,
    adhoc,
    listed,
    load_corpus,
    quoted,
    run,
    sqlite_registry,
)
from xca_gateway.registry import LocalRegistry, packing
from xca_gateway.xds.ebrim import StoredQueryId

_QUERIES = [
    (StoredQueryId.FIND_DOCUMENTS, "$XDSDocumentEntryPatientId", "$XDSDocumentEntryStatus"),
    (StoredQueryId.FIND_SUBMISSION_SETS, "$XDSSubmissionSetPatientId", "$XDSSubmissionSetStatus"),
    (StoredQueryId.FIND_FOLDERS, "$XDSFolderPatientId", "$XDSFolderStatus"),
]


async def _answers(registry: LocalRegistry) -> list[list[bytes]]:
    answers = []
    for pid in (PID_A, PID_B):
        for query, patient, status in _QUERIES:
            result = await registry.stored_query(
                adhoc(query, [(patient, quoted(pid)), (status, listed(APPROVED, DEPRECATED))])
            )
            answers.append([etree.tostring(o, method="c14n") for o in result.objects])
    assert all(answers[:2]), answers
    return answers


def test_stored_rows_use_the_dictionary_and_rows_without_it_still_read(tmp_path: Path) -> None:
    database = tmp_path / "registry.sqlite3"
    url = f"sqlite:///{database}"

    async def load() -> list[list[bytes]]:
        registry = await sqlite_registry(tmp_path, url=url)
        try:
            await load_corpus(registry)
            return await _answers(registry)
        finally:
            await registry.close()

    with_dictionary = run(load())
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT seq, xml FROM registry_object").fetchall()
        assert len(rows) == 31
        plain = 0
        for seq, blob in rows:
            xml = packing.unpack(blob)
            assert packing.pack(xml) == blob  # written with the dictionary
            plain += len(zlib.compress(xml, 6))
            # As a registry written before the dictionary stored it.
            conn.execute(
                "UPDATE registry_object SET xml = ? WHERE seq = ?", [zlib.compress(xml, 6), seq]
            )
        # The vocabulary is most of a small object's XML: the dictionary saves a third at least.
        assert sum(len(blob) for _seq, blob in rows) < plain * 2 / 3

    async def reopen() -> list[list[bytes]]:
        registry = await sqlite_registry(tmp_path, url=url)
        try:
            return await _answers(registry)
        finally:
            await registry.close()

    assert run(reopen()) == with_dictionary


def test_the_dictionary_is_frozen_and_an_unknown_one_is_refused() -> None:
    # The stored rows name the dictionary by its Adler-32: editing it orphans them.
    assert zlib.adler32(packing.DICTIONARY) == 0xCD4F80F9
    other = zlib.compressobj(6, zdict=b"another dictionary")
    blob = other.compress(b"<rim:ExtrinsicObject/>") + other.flush()
    with pytest.raises(ValueError, match="unknown zlib dictionary"):
        packing.unpack(blob)
