"""The embedded XDS Document Repository: a filesystem store keyed by documentUniqueId.

Layout under the repository directory::

    objects/<k[:2]>/<k>.json            commit record: uniqueId, mimeType, size, SHA-1, data file
    objects/<k[:2]>/<k>.<token>.data    the document bytes
    tmp/                                writes in progress (same filesystem, so rename is atomic),
                                        each locked (flock) by its writer while it lives

``k`` is the SHA-256 of the documentUniqueId, so any uniqueId (OIDs, ``oid^extension``) maps
to a safe file name. A write streams into ``tmp/`` while hashing, is fsynced, renamed to a
fresh ``.data`` file and only then committed by atomically replacing the ``.json`` record,
which names its data file. Readers go through the record, so they see the old document or
the new one, never a mix. XDS puts the SHA-1 of the document (hex) in the ``hash`` slot.

A write in progress holds its patient's document in ``tmp/``; a writer killed mid-write (or a
machine that lost power) leaves it behind. Opening the repository removes such leftovers: a
``tmp/`` file whose writer is gone (no lock on it) and that nobody wrote to for a minute. Other
processes sharing the directory (an import running beside the gateway) keep theirs: they hold
the lock.

Reads stream in chunks and re-check size and SHA-1 on the way: a damaged file fails the
stream before its last chunk is released, so a truncated answer cannot pass as complete.

Also here: the ``[repository]`` configuration section.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pydantic import Field

from xca_gateway.schema import HttpsUrl, Oid, PathText, Section
from xca_gateway.settings import ConfigError, validate_oid
from xca_gateway.xds.metadata import ManifestOptions, ManifestSection, parse_manifest_options

__all__ = [
    "CHUNK_SIZE",
    "DocumentCorrupted",
    "DocumentExists",
    "DocumentReader",
    "DocumentRepository",
    "RemoteRepositoryConfig",
    "RepositoryConfig",
    "StoredDocument",
    "parse_repository_config",
]

CHUNK_SIZE = 256 * 1024
_RECORD_VERSION = 1
# documentUniqueId is an OID (64) or, for some sources, oid^extension; be generous but bounded.
_MAX_UNIQUE_ID = 256
_MIME_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;[^\x00-\x1f\x7f]*)?$")

log = logging.getLogger(__name__)


class DocumentExists(FileExistsError):
    """A document with this uniqueId is already stored (and replace was not asked for)."""


class DocumentCorrupted(OSError):
    """The stored bytes no longer match the size or SHA-1 recorded when they were written."""


def valid_mime_type(value: str) -> bool:
    return len(value) <= 255 and _MIME_TYPE.match(value) is not None


@dataclass(frozen=True)
class StoredDocument:
    document_unique_id: str
    mime_type: str
    size: int
    sha1: str  # lower-case hex, as the XDS ``hash`` slot carries it
    created: str  # ISO 8601, UTC
    data_path: Path
    attributes: Mapping[str, str] = field(default_factory=dict)


class DocumentReader:
    """An open stored document; iterate its chunks once. Use as a context manager."""

    def __init__(self, document: StoredDocument, file: IO[bytes], chunk_size: int) -> None:
        self.document = document
        self._file = file
        self._chunk_size = chunk_size
        self._sha1 = hashlib.sha1(usedforsecurity=False)
        self._read = 0

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DocumentReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read_chunk(self) -> bytes:
        """The next chunk, or b"" at the end. Raises DocumentCorrupted before the last chunk
        is returned if the bytes do not match the record."""
        chunk = self._file.read(self._chunk_size)
        self._read += len(chunk)
        self._sha1.update(chunk)
        doc = self.document
        uid = doc.document_unique_id
        if self._read > doc.size:
            raise DocumentCorrupted(f"document {uid} is larger than recorded")
        if not chunk and self._read < doc.size:
            raise DocumentCorrupted(f"document {uid} is truncated")
        if chunk and self._read == doc.size:
            # The final chunk: verify before handing it out.
            if self._file.read(1):
                raise DocumentCorrupted(f"document {uid} is larger than recorded")
            if self._sha1.hexdigest() != doc.sha1:
                raise DocumentCorrupted(f"document {uid} fails its SHA-1 check")
        return chunk

    def iter_chunks(self) -> Iterator[bytes]:
        try:
            while chunk := self.read_chunk():
                yield chunk
        finally:
            self.close()

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        """Chunks read in a worker thread, so a slow disk does not stall the event loop."""
        try:
            while chunk := await asyncio.to_thread(self.read_chunk):
                yield chunk
        finally:
            self.close()


class DocumentRepository:
    """Documents of one XDS repository (``repository_unique_id``) under ``directory``."""

    def __init__(
        self, directory: Path, repository_unique_id: str, *, chunk_size: int = CHUNK_SIZE
    ) -> None:
        self.directory = Path(directory)
        self.repository_unique_id = repository_unique_id
        self.chunk_size = chunk_size
        self._objects = self.directory / "objects"
        self._tmp = self.directory / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.directory / ".lock"
        self.abandoned_writes_removed = _remove_abandoned_writes(self._tmp)
        if self.abandoned_writes_removed:
            log.warning(
                "repository %s: removed %d abandoned write(s) from %s",
                repository_unique_id,
                self.abandoned_writes_removed,
                self._tmp,
            )

    def __repr__(self) -> str:
        return f"DocumentRepository({str(self.directory)!r}, {self.repository_unique_id!r})"

    # -- naming ------------------------------------------------------------------------------

    @staticmethod
    def _check_uid(document_unique_id: str) -> None:
        if not document_unique_id or len(document_unique_id) > _MAX_UNIQUE_ID:
            raise ValueError("documentUniqueId must have 1 to 256 characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in document_unique_id):
            raise ValueError("documentUniqueId contains control characters")

    def _record_path(self, document_unique_id: str) -> Path:
        key = hashlib.sha256(document_unique_id.encode("utf-8")).hexdigest()
        return self._objects / key[:2] / f"{key}.json"

    @contextlib.contextmanager
    def _commit_lock(self) -> Iterator[None]:
        # Serialises commits (threads and processes alike: each open() is its own flock owner).
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------

    def _load(self, record_path: Path) -> StoredDocument | None:
        try:
            raw = json.loads(record_path.read_bytes())
        except FileNotFoundError:
            return None
        return StoredDocument(
            document_unique_id=raw["documentUniqueId"],
            mime_type=raw["mimeType"],
            size=int(raw["size"]),
            sha1=raw["sha1"],
            created=raw["created"],
            data_path=record_path.parent / raw["data"],
            attributes=dict(raw.get("attributes", {})),
        )

    def get(self, document_unique_id: str) -> StoredDocument | None:
        """Metadata of a stored document, or None."""
        try:
            self._check_uid(document_unique_id)
        except ValueError:
            return None
        doc = self._load(self._record_path(document_unique_id))
        if doc is not None and doc.document_unique_id != document_unique_id:
            return None  # a SHA-256 collision is not going to happen; stay correct anyway
        return doc

    def __contains__(self, document_unique_id: object) -> bool:
        return isinstance(document_unique_id, str) and self.get(document_unique_id) is not None

    def open(self, document_unique_id: str) -> DocumentReader | None:
        """Open a document for streaming, or None if it is not stored.

        The open file keeps its bytes readable even if the document is replaced meanwhile.
        """
        for _ in range(3):  # a concurrent replace may remove the data file we were pointed at
            doc = self.get(document_unique_id)
            if doc is None:
                return None
            try:
                file = open(doc.data_path, "rb")  # noqa: SIM115 - owned by the reader
            except FileNotFoundError:
                continue
            return DocumentReader(doc, file, self.chunk_size)
        return None

    def read_bytes(self, document_unique_id: str) -> bytes | None:
        """The whole document in memory: only for small documents (manifests, tests)."""
        reader = self.open(document_unique_id)
        if reader is None:
            return None
        return b"".join(reader.iter_chunks())

    def __iter__(self) -> Iterator[StoredDocument]:
        for record in sorted(self._objects.glob("*/*.json")):
            doc = self._load(record)
            if doc is not None:
                yield doc

    # -- writing -----------------------------------------------------------------------------

    def store(
        self,
        document_unique_id: str,
        content: bytes | Iterable[bytes] | IO[bytes],
        *,
        mime_type: str,
        attributes: Mapping[str, str] | None = None,
        replace: bool = False,
    ) -> StoredDocument:
        """Store a document, streaming ``content`` to disk; returns the committed record.

        Raises DocumentExists if the uniqueId is taken and ``replace`` is false.
        """
        self._check_uid(document_unique_id)
        if not valid_mime_type(mime_type):
            raise ValueError(f"invalid mimeType {mime_type!r}")
        record_path = self._record_path(document_unique_id)
        if not replace and record_path.exists():
            raise DocumentExists(f"document {document_unique_id} is already stored")
        token = secrets.token_hex(8)
        sha1 = hashlib.sha1(usedforsecurity=False)
        size = 0
        fd, tmp_name = _mkstemp(self._tmp)
        tmp_data = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in _chunks(content, self.chunk_size):
                    out.write(chunk)
                    sha1.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            data_name = f"{record_path.stem}.{token}.data"
            record: dict[str, Any] = {
                "version": _RECORD_VERSION,
                "documentUniqueId": document_unique_id,
                "mimeType": mime_type,
                "size": size,
                "sha1": sha1.hexdigest(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "data": data_name,
                "attributes": dict(attributes or {}),
            }
            record_path.parent.mkdir(exist_ok=True)
            with self._commit_lock():
                previous = self._load(record_path)
                if previous is not None and not replace:
                    raise DocumentExists(f"document {document_unique_id} is already stored")
                os.replace(tmp_data, record_path.parent / data_name)
                _write_atomically(record_path, json.dumps(record).encode(), self._tmp)
                _fsync_dir(record_path.parent)
                if previous is not None:
                    with contextlib.suppress(FileNotFoundError):
                        previous.data_path.unlink()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp_data.unlink()
            raise
        doc = self._load(record_path)
        assert doc is not None
        return doc

    def update_attributes(
        self, document_unique_id: str, attributes: Mapping[str, str]
    ) -> StoredDocument:
        """Merge ``attributes`` into a stored document's record (atomically)."""
        self._check_uid(document_unique_id)
        record_path = self._record_path(document_unique_id)
        with self._commit_lock():
            try:
                raw: dict[str, Any] = json.loads(record_path.read_bytes())
            except FileNotFoundError:
                raise KeyError(document_unique_id) from None
            raw["attributes"] = {**raw.get("attributes", {}), **attributes}
            _write_atomically(record_path, json.dumps(raw).encode(), self._tmp)
        doc = self._load(record_path)
        assert doc is not None
        return doc

    def delete(self, document_unique_id: str) -> bool:
        """Remove a document; True if it existed."""
        self._check_uid(document_unique_id)
        record_path = self._record_path(document_unique_id)
        with self._commit_lock():
            doc = self._load(record_path)
            if doc is None:
                return False
            record_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                doc.data_path.unlink()
        return True


# A tmp/ file younger than this is never removed: its writer may not hold its lock yet.
_ABANDONED_AFTER = 60.0


def _mkstemp(directory: Path) -> tuple[int, str]:
    fd, name = tempfile.mkstemp(dir=directory, prefix="in-", suffix=".part")
    # Held until the writer closes the file (or dies): tells _remove_abandoned_writes it lives.
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, name


def _remove_abandoned_writes(directory: Path, now: float | None = None) -> int:
    """Remove the ``tmp/`` files of writers that are gone; the number removed."""
    now = time.time() if now is None else now
    removed = 0
    for path in directory.glob("in-*.part"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < _ABANDONED_AFTER:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer (this process or another) holds it
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        finally:
            os.close(fd)
    return removed


def _chunks(content: bytes | Iterable[bytes] | IO[bytes], size: int) -> Iterator[bytes]:
    if isinstance(content, bytes | bytearray | memoryview):
        view = memoryview(content)
        for offset in range(0, len(view), size):
            yield bytes(view[offset : offset + size])
        return
    read = getattr(content, "read", None)
    if read is not None:
        while chunk := read(size):
            yield chunk
        return
    for chunk in content:
        if chunk:
            yield bytes(chunk)


def _write_atomically(path: Path, data: bytes, tmp_dir: Path) -> None:
    fd, tmp_name = _mkstemp(tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class RemoteRepositoryConfig:
    """An XDS Document Repository of our community reached with ITI-43 (mutual TLS)."""

    repository_unique_id: str
    url: str


@dataclass(frozen=True)
class RepositoryConfig:
    repository_unique_id: str
    directory: Path
    remote: tuple[RemoteRepositoryConfig, ...] = ()
    manifest: ManifestOptions = field(default_factory=ManifestOptions)

    def open(self) -> DocumentRepository:
        return DocumentRepository(self.directory, self.repository_unique_id)


class RemoteRepositorySection(Section):
    """Another XDS Document Repository of this community, reached with ITI-43."""

    repository_unique_id: Oid = Field(
        description="Its repositoryUniqueId.", examples=["1.3.6.1.4.1.21367.13.80.9"]
    )
    url: HttpsUrl = Field(
        description="Its ITI-43 endpoint (mutual TLS).",
        examples=["https://repo2.north.example.org/iti43"],
    )


class RepositorySection(Section):
    """The community's XDS Document Repository (embedded). Imaging manifests (KOS) of
    imported studies live here."""

    repository_unique_id: Oid = Field(
        description="Its repositoryUniqueId.", examples=["1.3.6.1.4.1.21367.13.80.1"]
    )
    directory: PathText | None = Field(
        None,
        description="Where documents are stored (default: <data_dir>/repository).",
        examples=["../data/north/repository"],
    )
    remote: list[RemoteRepositorySection] = Field(
        [], description="Other XDS repositories of this community, reached with ITI-43."
    )
    manifest: ManifestSection = Field(
        ManifestSection(), description="XDS metadata of imported studies' manifests."
    )


_REPOSITORY_KEYS = frozenset({"repository_unique_id", "directory", "remote", "manifest"})
_REMOTE_KEYS = frozenset({"repository_unique_id", "url"})


def parse_repository_config(
    table: Mapping[str, Any] | None, base_dir: Path, data_dir: Path
) -> RepositoryConfig | None:
    """Parse the ``[repository]`` TOML section; None when the section is absent or empty.

    ``directory`` defaults to ``<data_dir>/repository``; relative paths are resolved against
    ``base_dir`` (the configuration file's directory), like every path in the file.
    """
    if not table:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError("[repository] must be a table")
    unknown = set(table) - _REPOSITORY_KEYS
    if unknown:
        raise ConfigError(f"[repository] unknown key(s): {', '.join(sorted(unknown))}")
    repository_unique_id = table.get("repository_unique_id")
    if not isinstance(repository_unique_id, str):
        raise ConfigError("[repository] repository_unique_id (an OID) is required")
    validate_oid(repository_unique_id, "repository.repository_unique_id")
    directory_value = table.get("directory")
    if directory_value is None:
        directory = Path(data_dir) / "repository"
    elif isinstance(directory_value, str):
        directory = Path(directory_value).expanduser()
        if not directory.is_absolute():
            directory = (Path(base_dir) / directory).resolve()
    else:
        raise ConfigError("repository.directory must be a path string")

    remote_raw = table.get("remote", [])
    if not isinstance(remote_raw, list):
        raise ConfigError("[[repository.remote]] must be an array of tables")
    remotes: list[RemoteRepositoryConfig] = []
    seen = {repository_unique_id}
    for index, entry in enumerate(remote_raw):
        what = f"repository.remote[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{what} must be a table")
        unknown = set(entry) - _REMOTE_KEYS
        if unknown:
            raise ConfigError(f"[{what}] unknown key(s): {', '.join(sorted(unknown))}")
        rid, url = entry.get("repository_unique_id"), entry.get("url")
        if not isinstance(rid, str) or not isinstance(url, str):
            raise ConfigError(f"[{what}] repository_unique_id and url are required strings")
        validate_oid(rid, f"{what}.repository_unique_id")
        if not url.startswith("https://"):
            raise ConfigError(f"{what}.url must be an https:// URL (ITI-43 runs over mutual TLS)")
        if rid in seen:
            raise ConfigError(f"duplicate repositoryUniqueId {rid} in [repository]")
        seen.add(rid)
        remotes.append(RemoteRepositoryConfig(rid, url))

    manifest_raw = table.get("manifest", {})
    if not isinstance(manifest_raw, Mapping):
        raise ConfigError("[repository.manifest] must be a table")
    try:
        manifest = parse_manifest_options(manifest_raw)
    except ValueError as exc:
        raise ConfigError(f"[repository.manifest] {exc}") from None
    return RepositoryConfig(
        repository_unique_id=repository_unique_id,
        directory=directory,
        remote=tuple(remotes),
        manifest=manifest,
    )
