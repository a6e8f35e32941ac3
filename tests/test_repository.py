"""The embedded document repository (filesystem store) and the [repository] configuration."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xca_gateway.repository import (
    DocumentCorrupted,
    DocumentExists,
    DocumentRepository,
    RemoteRepositoryConfig,
    parse_repository_config,
)
from xca_gateway.settings import ConfigError
from xca_gateway.xds.metadata import LOINC, Code

REPO_ID = "1.3.6.1.4.1.21367.13.80.1"


@pytest.fixture
def repo(tmp_path: Path) -> DocumentRepository:
    return DocumentRepository(tmp_path / "repo", REPO_ID, chunk_size=1024)


def _data_files(repo: DocumentRepository) -> list[Path]:
    return sorted(repo.directory.glob("objects/*/*.data"))


def test_store_and_read_back(repo: DocumentRepository) -> None:
    content = os.urandom(10_000)
    stored = repo.store("1.2.3.4", content, mime_type="application/dicom")
    assert stored.size == len(content)
    assert stored.sha1 == hashlib.sha1(content).hexdigest()
    assert stored.mime_type == "application/dicom"
    again = repo.get("1.2.3.4")
    assert again == stored
    assert "1.2.3.4" in repo and "1.2.3.5" not in repo
    assert repo.read_bytes("1.2.3.4") == content
    assert repo.get("1.2.3.5") is None and repo.open("1.2.3.5") is None


def test_streams_in_and_out_in_chunks(repo: DocumentRepository) -> None:
    parts = [os.urandom(700) for _ in range(20)]

    def produce() -> Iterator[bytes]:
        yield from parts

    stored = repo.store("1.2.3.4", produce(), mime_type="application/octet-stream")
    assert stored.size == 14_000
    reader = repo.open("1.2.3.4")
    assert reader is not None
    chunks = list(reader.iter_chunks())
    # Reads never exceed the chunk size: a large document is never whole in memory.
    assert max(len(c) for c in chunks) == 1024
    assert len(chunks) == 14
    assert b"".join(chunks) == b"".join(parts)


def test_stores_from_a_file_object(repo: DocumentRepository, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(5000))
    with source.open("rb") as fh:
        stored = repo.store("1.2.3.4", fh, mime_type="application/dicom")
    assert stored.sha1 == hashlib.sha1(source.read_bytes()).hexdigest()


async def test_async_reads(repo: DocumentRepository) -> None:
    content = os.urandom(4000)
    repo.store("1.2.3.4", content, mime_type="application/dicom")
    reader = repo.open("1.2.3.4")
    assert reader is not None
    chunks = [c async for c in reader.aiter_chunks()]
    assert b"".join(chunks) == content and len(chunks) == 4


def test_existing_document_is_not_overwritten_unless_asked(repo: DocumentRepository) -> None:
    repo.store("1.2.3.4", b"first", mime_type="text/plain")
    with pytest.raises(DocumentExists):
        repo.store("1.2.3.4", b"second", mime_type="text/plain")
    assert repo.read_bytes("1.2.3.4") == b"first"
    assert not list(repo.directory.glob("tmp/*")), "a refused write leaves no temp file"

    old_reader = repo.open("1.2.3.4")
    assert old_reader is not None
    repo.store("1.2.3.4", b"second version", mime_type="text/plain", replace=True)
    assert repo.read_bytes("1.2.3.4") == b"second version"
    # The replaced data file is gone, yet a reader that had it open still reads it whole.
    assert len(_data_files(repo)) == 1
    assert b"".join(old_reader.iter_chunks()) == b"first"


def test_failed_write_leaves_nothing_behind(repo: DocumentRepository) -> None:
    def broken() -> Iterator[bytes]:
        yield b"x" * 3000
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        repo.store("1.2.3.4", broken(), mime_type="application/dicom")
    assert repo.get("1.2.3.4") is None
    assert not list(repo.directory.glob("tmp/*"))
    assert not _data_files(repo)


def test_corruption_is_detected_before_the_last_chunk(repo: DocumentRepository) -> None:
    content = os.urandom(3000)
    stored = repo.store("1.2.3.4", content, mime_type="application/dicom")
    damaged = bytearray(content)
    damaged[-1] ^= 0xFF
    stored.data_path.write_bytes(bytes(damaged))
    reader = repo.open("1.2.3.4")
    assert reader is not None
    received = bytearray()
    with pytest.raises(DocumentCorrupted, match="SHA-1"):
        for chunk in reader.iter_chunks():
            received += chunk
    assert len(received) < len(content)

    stored.data_path.write_bytes(content[:2500])
    reader = repo.open("1.2.3.4")
    assert reader is not None
    with pytest.raises(DocumentCorrupted, match="truncated"):
        b"".join(reader.iter_chunks())

    stored.data_path.write_bytes(content + b"extra")
    reader = repo.open("1.2.3.4")
    assert reader is not None
    with pytest.raises(DocumentCorrupted, match="larger"):
        b"".join(reader.iter_chunks())


def test_any_unique_id_maps_to_a_safe_file_name(repo: DocumentRepository) -> None:
    for uid in ("1.2.3^ext-1", "../../etc/passwd", "a/b\\c", "ÆØÅ"):
        repo.store(uid, uid.encode(), mime_type="text/plain")
        assert repo.read_bytes(uid) == uid.encode()
    assert {d.document_unique_id for d in repo} == {
        "1.2.3^ext-1",
        "../../etc/passwd",
        "a/b\\c",
        "ÆØÅ",
    }
    for path in repo.directory.rglob("*"):
        assert repo.directory in path.parents
    for bad in ("", "x" * 300, "1.2\n3"):
        with pytest.raises(ValueError):
            repo.store(bad, b"x", mime_type="text/plain")
        assert repo.get(bad) is None
    with pytest.raises(ValueError):
        repo.store("1.2", b"x", mime_type="text/plain\r\nX-Injected: 1")


def test_attributes_and_delete(repo: DocumentRepository) -> None:
    repo.store("1.2.3.4", b"abc", mime_type="text/plain", attributes={"registered": "false"})
    updated = repo.update_attributes("1.2.3.4", {"registered": "true", "study": "1.2"})
    assert updated.attributes == {"registered": "true", "study": "1.2"}
    assert repo.read_bytes("1.2.3.4") == b"abc"
    with pytest.raises(KeyError):
        repo.update_attributes("9.9", {"a": "b"})
    assert repo.delete("1.2.3.4") is True
    assert repo.delete("1.2.3.4") is False
    assert repo.get("1.2.3.4") is None and not _data_files(repo)


def test_concurrent_replacing_writers_leave_a_consistent_store(repo: DocumentRepository) -> None:
    versions = [bytes([i]) * (2000 + i) for i in range(8)]
    errors: list[BaseException] = []

    def write(content: bytes) -> None:
        try:
            repo.store("1.2.3.4", content, mime_type="text/plain", replace=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    final = repo.read_bytes("1.2.3.4")
    assert final in versions
    assert len(_data_files(repo)) == 1  # no orphaned versions


def test_a_second_instance_sees_what_the_first_stored(repo: DocumentRepository) -> None:
    repo.store("1.2.3.4", b"shared", mime_type="text/plain")
    other = DocumentRepository(repo.directory, REPO_ID)
    assert other.read_bytes("1.2.3.4") == b"shared"


# ----------------------------------------------------------------------------- configuration


def test_repository_config_defaults(tmp_path: Path) -> None:
    assert parse_repository_config({}, tmp_path, tmp_path / "data") is None
    assert parse_repository_config(None, tmp_path, tmp_path / "data") is None
    config = parse_repository_config({"repository_unique_id": REPO_ID}, tmp_path, tmp_path / "d")
    assert config is not None
    assert config.directory == tmp_path / "d" / "repository"
    assert config.remote == ()
    assert config.open().repository_unique_id == REPO_ID


def test_repository_config_full(tmp_path: Path) -> None:
    config = parse_repository_config(
        {
            "repository_unique_id": REPO_ID,
            "directory": "store",
            "remote": [
                {"repository_unique_id": "1.2.3.4", "url": "https://127.0.0.1:9/ig/iti43"},
            ],
            "manifest": {
                "type_code": {"code": "1234-5", "scheme": LOINC, "display_name": "Local type"},
                "language_code": "nb-NO",
                "timezone": "Europe/Oslo",
                "imaging_source_id": "1.2.3.99",
            },
        },
        tmp_path,
        tmp_path / "data",
    )
    assert config is not None
    assert config.directory == (tmp_path / "store").resolve()
    assert config.remote == (RemoteRepositoryConfig("1.2.3.4", "https://127.0.0.1:9/ig/iti43"),)
    assert config.manifest.type_code == Code("1234-5", LOINC, "Local type")
    assert config.manifest.language_code == "nb-NO"
    assert config.manifest.imaging_source_id == "1.2.3.99"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"directory": "x"}, "repository_unique_id"),
        ({"repository_unique_id": "not-an-oid"}, "not an OID"),
        ({"repository_unique_id": REPO_ID, "colour": "red"}, "unknown key"),
        (
            {
                "repository_unique_id": REPO_ID,
                "remote": [{"repository_unique_id": "1.2.3", "url": "http://x/ig/iti43"}],
            },
            "https",
        ),
        (
            {
                "repository_unique_id": REPO_ID,
                "remote": [{"repository_unique_id": REPO_ID, "url": "https://x/ig/iti43"}],
            },
            "duplicate",
        ),
        ({"repository_unique_id": REPO_ID, "remote": [{"url": "https://x"}]}, "required"),
        ({"repository_unique_id": REPO_ID, "manifest": {"type_code": "18748-4"}}, "type_code"),
        ({"repository_unique_id": REPO_ID, "manifest": {"timezone": "Mars/Olympus"}}, "zone"),
        ({"repository_unique_id": REPO_ID, "manifest": {"source_id": "abc"}}, "OID"),
    ],
)
def test_repository_config_errors(tmp_path: Path, table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_repository_config(table, tmp_path, tmp_path)


def test_abandoned_writes_are_removed_when_the_repository_opens(tmp_path: Path) -> None:
    # A writer killed mid-write leaves its patient's document in tmp/: a real process is
    # SIGKILLed while it holds an unfinished write, and the next open removes the leftover; a
    # live writer's file (locked) and a fresh one (its writer may not hold the lock yet) stay.
    directory = tmp_path / "repo"
    DocumentRepository(directory, REPO_ID)
    tmp = directory / "tmp"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from xca_gateway.repository import DocumentRepository\n"
        f"repo = DocumentRepository(Path({str(directory)!r}), {REPO_ID!r})\n"
        "def chunks():\n"
        "    yield b'PATIENT-DOCUMENT-MARKER' * 10000  # past the file's buffer\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "    yield b'never'\n"
        "repo.store('1.2.3.killed', chunks(), mime_type='text/plain')\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    (killed,) = tmp.glob("in-*.part")
    assert b"PATIENT-DOCUMENT-MARKER" in killed.read_bytes()

    live = tmp / "in-live.part"
    live.write_bytes(b"in progress")
    fresh = tmp / "in-fresh.part"
    fresh.write_bytes(b"just created")
    old = time.time() - 3600
    for path in (killed, live):
        os.utime(path, (old, old))
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        reopened = DocumentRepository(directory, REPO_ID)
    assert reopened.abandoned_writes_removed == 1
    assert not killed.exists()
    assert live.exists() and fresh.exists()
    assert "1.2.3.killed" not in reopened
