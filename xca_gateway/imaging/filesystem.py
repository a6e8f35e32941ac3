"""Filesystem Imaging Document Source: DICOM Part 10 files under a directory (embedded demo).

The demo writes ``<root>/<study uid>/<series uid>/<sop uid>.dcm``; that path is tried first,
so the common case needs no index. Files in any other layout are found through an index of
SOP Instance UID -> path built by reading headers (pixel data skipped), refreshed on a miss at
most every ``rescan_interval`` seconds so files added later are picked up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from xca_gateway.imaging.request import RetrieveImagingDocumentSetRequest, is_uid
from xca_gateway.imaging.sources import (
    DEFAULT_CHUNK,
    ImagingSource,
    InstanceStreamError,
    PlannedInstance,
    Retrieval,
    chunked,
    document_not_found,
    transfer_syntax_error,
)
from xca_gateway.imaging.transfer_syntax import TranscodeError, choose_target, transcode
from xca_gateway.xds.ebrs import RegistryError

log = logging.getLogger(__name__)

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int


def read_header(path: Path) -> StoredInstance | None:
    """The identifying attributes of a Part 10 file, or None if it is not one."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        size = path.stat().st_size
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        return None
    return StoredInstance(
        path=path,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        transfer_syntax_uid=syntax,
        size=size,
    )


class FilesystemSource(ImagingSource):
    kind = "filesystem"

    def __init__(
        self,
        repository_unique_id: str,
        root: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        rescan_interval: float = 10.0,
        max_transcode_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        super().__init__(repository_unique_id)
        self.root = root
        self.chunk_size = chunk_size
        self.rescan_interval = rescan_interval
        self.max_transcode_bytes = max_transcode_bytes
        self._index: dict[str, Path] = {}
        self._indexed_at = float("-inf")
        self._index_lock = asyncio.Lock()

    def describe(self) -> str:
        return f"filesystem imaging source {self.repository_unique_id} at {self.root}"

    # -- lookup ------------------------------------------------------------------------------

    def _scan(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        if not self.root.is_dir():
            return index
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                header = read_header(Path(dirpath) / name)
                if header is not None and header.sop_instance_uid:
                    index.setdefault(header.sop_instance_uid, header.path)
        return index

    async def _from_index(self, sop_instance_uid: str) -> Path | None:
        path = self._index.get(sop_instance_uid)
        if path is not None:
            return path
        async with self._index_lock:
            if time.monotonic() - self._indexed_at >= self.rescan_interval:
                self._index = await asyncio.to_thread(self._scan)
                self._indexed_at = time.monotonic()
                log.debug("%s: indexed %d instances", self.describe(), len(self._index))
        return self._index.get(sop_instance_uid)

    async def lookup(self, study: str, series: str, sop: str) -> StoredInstance | None:
        if not (is_uid(study) and is_uid(series) and is_uid(sop)):
            return None  # also keeps request values out of path names
        candidates = [self.root / study / series / f"{sop}.dcm"]
        header = await asyncio.to_thread(_first_header, candidates)
        if header is None or header.sop_instance_uid != sop:
            path = await self._from_index(sop)
            header = await asyncio.to_thread(read_header, path) if path is not None else None
        if header is None or header.sop_instance_uid != sop:
            return None
        return header

    # -- retrieve ----------------------------------------------------------------------------

    async def open(self, request: RetrieveImagingDocumentSetRequest) -> Retrieval:
        planned: list[PlannedInstance] = []
        errors: list[RegistryError] = []
        for doc in request.documents:
            stored = await self.lookup(
                doc.study_instance_uid, doc.series_instance_uid, doc.document_unique_id
            )
            if stored is None:
                errors.append(document_not_found(doc))
                continue
            if (stored.study_instance_uid, stored.series_instance_uid) != (
                doc.study_instance_uid,
                doc.series_instance_uid,
            ):
                # A SOP Instance UID only counts inside the study and series it was asked for.
                errors.append(document_not_found(doc, "it belongs to another study or series"))
                continue
            target = choose_target(stored.transfer_syntax_uid, request.transfer_syntax_uids)
            if target is None or (
                target != stored.transfer_syntax_uid and stored.size > self.max_transcode_bytes
            ):
                errors.append(transfer_syntax_error(doc, request.transfer_syntax_uids))
                continue
            planned.append(PlannedInstance(doc, target, handle=stored))
        return FilesystemRetrieval(planned, errors, self.chunk_size)


def _first_header(paths: list[Path]) -> StoredInstance | None:
    for path in paths:
        if path.is_file():
            header = read_header(path)
            if header is not None:
                return header
    return None


class FilesystemRetrieval(Retrieval):
    def __init__(
        self, planned: list[PlannedInstance], errors: list[RegistryError], chunk_size: int
    ) -> None:
        super().__init__(planned, errors)
        self.chunk_size = chunk_size

    async def stream(self, instance: PlannedInstance) -> AsyncIterator[bytes]:
        stored = instance.handle
        assert isinstance(stored, StoredInstance)
        target = instance.transfer_syntax_uid
        try:
            if target == stored.transfer_syntax_uid:
                # The open too, not only the reads: on a network file system (the shared
                # image directory of replicas) it is a round trip that may stall.
                fh = await asyncio.to_thread(stored.path.open, "rb")
                with fh:
                    while True:
                        chunk = await asyncio.to_thread(fh.read, self.chunk_size)
                        if not chunk:
                            return
                        yield chunk
            else:
                assert target is not None
                data = await asyncio.to_thread(stored.path.read_bytes)
                converted = await asyncio.to_thread(transcode, data, target)
                del data
                async for chunk in chunked(converted, self.chunk_size):
                    yield chunk
        except (OSError, TranscodeError) as exc:
            raise InstanceStreamError(
                f"instance {instance.document.document_unique_id}: {exc}"
            ) from exc
