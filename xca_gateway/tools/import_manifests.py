"""``xca-gateway import``: register DICOM studies as XDS-I.b imaging manifests.

For every study found under the given files and directories: read the DICOM headers (never
the pixel data), build a KOS manifest (:func:`xca_gateway.xds.kos.build_kos`), store its Part-10
bytes in the local repository, and register its DocumentEntry (ITI-42 payload, built by
:mod:`xca_gateway.xds.metadata`) with the registry.

Re-import is idempotent: the manifest's SOP Instance UID is derived from the repository's
uniqueId and the Study Instance UID (a name-based UUID under ``2.25``), so a study seen
before is recognised and skipped. A manifest stored but never registered (an interrupted
run, a registry that was down) is registered on the next run. A study whose instances changed
since its manifest was registered is reported, not replaced (no RPLC support yet).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, get_args

import pydicom
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xca_gateway.app.config import load_config
from xca_gateway.patients.directory import PatientDirectory
from xca_gateway.progress import ProgressLine
from xca_gateway.registry import open_registry
from xca_gateway.repository import DocumentExists, DocumentRepository
from xca_gateway.settings import CommunityConfig, ConfigError
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError
from xca_gateway.xds.kos import KOS_SOP_CLASS_UID, build_kos, kos_from_bytes, kos_references
from xca_gateway.xds.kos import kos_to_bytes as _kos_to_bytes
from xca_gateway.xds.metadata import (
    ManifestDocument,
    ManifestMetadataError,
    ManifestOptions,
    build_submit_objects_request,
    imaging_study_from_datasets,
    xds_patient_ids,
)

__all__ = [
    "ImportReport",
    "RegistryOpener",
    "RegistrySubmitter",
    "StudyOutcome",
    "add_import_command",
    "collect_files",
    "import_studies",
    "manifest_uid",
]

DICOMDIR_SOP_CLASS_UID = "1.2.840.10008.1.3.10"
DUPLICATE_UNIQUE_ID = "XDSDuplicateUniqueIdInRegistry"
_READ_BATCH = 32
# Headers kept per instance: what the KOS and the XDS metadata are built from.
_HEADER_KEYWORDS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    "StudyDescription",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "ConceptNameCodeSequence",
]

# Attribute stored with the manifest in the repository: set once the registry accepted it.
REGISTERED = "registered"


class RegistrySubmitter(Protocol):
    """The document registry as the importer sees it (ITI-42 semantics, in-process)."""

    async def submit(self, request: etree._Element) -> list[RegistryError]: ...


RegistryOpener = Callable[[Path], AbstractAsyncContextManager[RegistrySubmitter]]

Status = Literal["registered", "already-registered", "changed", "failed"]


@dataclass(frozen=True)
class StudyOutcome:
    study_instance_uid: str
    status: Status
    instances: int
    document_unique_id: str | None = None
    patient_id: str | None = None
    message: str = ""


@dataclass
class ImportReport:
    studies: list[StudyOutcome] = field(default_factory=list)
    files_read: int = 0
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)

    def with_status(self, *statuses: Status) -> list[StudyOutcome]:
        return [s for s in self.studies if s.status in statuses]

    @property
    def failed(self) -> list[StudyOutcome]:
        return self.with_status("failed")

    def summary(self) -> str:
        counts = {s: len(self.with_status(s)) for s in get_args(Status)}
        return (
            f"{len(self.studies)} studies from {self.files_read} files: "
            f"{counts['registered']} registered, {counts['already-registered']} already "
            f"registered, {counts['changed']} changed since registration (not replaced), "
            f"{counts['failed']} failed; {len(self.ignored)} files ignored"
        )


def manifest_uid(study_instance_uid: str, repository_unique_id: str) -> str:
    """Deterministic KOS SOP Instance UID for a study in a repository (PS3.5 B.2, 2.25)."""
    name = f"xca-gateway:kos:{repository_unique_id}:{study_instance_uid}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _series_uid(kos_uid: str) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'xca-gateway:kos-series:{kos_uid}').int}"


# ------------------------------------------------------------------------------ reading


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly plus every file below named directories, in a stable order."""
    files: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    add(Path(root) / name)
        elif path.exists():
            add(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return files


def _is_manifest(ds: Dataset) -> bool:
    if str(ds.get("SOPClassUID", "")) != KOS_SOP_CLASS_UID:
        return False
    concept = ds.get("ConceptNameCodeSequence") or []
    return any(str(item.get("CodeValue", "")) == "113030" for item in concept)


def read_instance_header(path: Path) -> Dataset | str:
    """The header of one DICOM Part-10 file, or the reason it is ignored."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_KEYWORDS)
    except (InvalidDicomError, EOFError):
        return "not a DICOM Part-10 file"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable DICOM file ({exc})"
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if DICOMDIR_SOP_CLASS_UID in (media_class, str(ds.get("SOPClassUID", ""))):
        return "DICOMDIR"
    if _is_manifest(ds):
        return "an XDS-I manifest (KOS), not an image"
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "")).strip():
            return f"no {keyword}"
    # Detach from the file: a plain Dataset holding just the header keywords.
    header = Dataset()
    for element in ds:
        header.add(element)
    return header


def _read_batch(paths: Sequence[Path]) -> list[Dataset | str]:
    return [read_instance_header(p) for p in paths]


class _Progress:
    """The import's progress on ``stream`` (count, rate, time left), or nothing without one."""

    def __init__(self, label: str, total: int, stream: TextIO | None, unit: str) -> None:

        self._line = (
            ProgressLine(label, total, unit=unit, stream=stream) if stream is not None else None
        )

    def advance(self, n: int = 1) -> None:
        if self._line is not None:
            self._line.advance(n)

    def close(self) -> None:
        if self._line is not None:
            self._line.close()


# ------------------------------------------------------------------------------ importing


@dataclass(frozen=True)
class _Context:
    repository: DocumentRepository
    registry: RegistrySubmitter
    community: CommunityConfig
    options: ManifestOptions


def _describe(errors: Sequence[RegistryError]) -> str:
    return "; ".join(f"{e.error_code}: {e.code_context}" for e in errors)


async def _register(
    ctx: _Context, datasets: Sequence[Dataset], kos_bytes: bytes, kos_uid: str
) -> list[RegistryError]:
    study = imaging_study_from_datasets(datasets)
    document = ManifestDocument(
        unique_id=kos_uid,
        repository_unique_id=ctx.repository.repository_unique_id,
        size=len(kos_bytes),
        sha1=hashlib.sha1(kos_bytes, usedforsecurity=False).hexdigest(),
        creation_time=_kos_creation_time(kos_bytes),
    )
    submission = build_submit_objects_request(
        study,
        document,
        affinity_domain=ctx.community.patient_id_assigning_authority,
        options=ctx.options,
    )
    errors = await ctx.registry.submit(submission.request)
    return [e for e in errors if e.is_error]


def _kos_creation_time(kos_bytes: bytes) -> datetime:
    kos = kos_from_bytes(kos_bytes)
    try:
        return datetime.strptime(
            f"{kos.ContentDate}{kos.ContentTime}"[:14], "%Y%m%d%H%M%S"
        ).replace(tzinfo=UTC)
    except (AttributeError, ValueError):
        return datetime.now(UTC)


async def _import_study(ctx: _Context, study_uid: str, datasets: Sequence[Dataset]) -> StudyOutcome:
    repository = ctx.repository
    kos_uid = manifest_uid(study_uid, repository.repository_unique_id)
    try:
        study = imaging_study_from_datasets(datasets)
        patient_id, _ = xds_patient_ids(study, ctx.community.patient_id_assigning_authority)
    except ManifestMetadataError as exc:
        return StudyOutcome(study_uid, "failed", len(datasets), message=str(exc))

    def done(status: Status, message: str = "") -> StudyOutcome:
        return StudyOutcome(study_uid, status, len(datasets), kos_uid, patient_id, message)

    existing = await asyncio.to_thread(repository.get, kos_uid)
    if existing is not None:
        kos_bytes = await asyncio.to_thread(repository.read_bytes, kos_uid)
        if kos_bytes is None:  # removed meanwhile: treat as new
            existing = None
    if existing is not None and kos_bytes is not None:
        if existing.attributes.get(REGISTERED) == "true":
            stored = {r.sop_instance_uid for r in kos_references(kos_from_bytes(kos_bytes))}
            current = {str(ds.SOPInstanceUID) for ds in datasets}
            if stored == current:
                return done("already-registered")
            return done(
                "changed",
                f"{len(current - stored)} instances added and {len(stored - current)} "
                "removed since the manifest was registered; replacing it (RPLC) is not supported",
            )
        # Stored by an earlier run that did not get to register it: register those bytes.
        try:
            errors = await _register(ctx, datasets, kos_bytes, kos_uid)
        except Exception as exc:  # the registry is someone else's code: report, go on
            return done("failed", f"registry error: {exc!r}")
        if errors and not all(e.error_code == DUPLICATE_UNIQUE_ID for e in errors):
            return done("failed", _describe(errors))
        await asyncio.to_thread(repository.update_attributes, kos_uid, {REGISTERED: "true"})
        return done("registered")

    try:
        kos = build_kos(
            datasets,
            repository_unique_id=ctx.options.imaging_source_id or repository.repository_unique_id,
            retrieve_ae_title=ctx.options.retrieve_ae_title,
            retrieve_url=ctx.options.retrieve_url,
            institution_name=study.institution_name or None,
            sop_instance_uid=kos_uid,
        )
        kos.SeriesInstanceUID = _series_uid(kos_uid)
        kos_bytes = _kos_to_bytes(kos)
    except ValueError as exc:
        return done("failed", f"cannot build the manifest: {exc}")
    try:
        await asyncio.to_thread(
            repository.store,
            kos_uid,
            kos_bytes,
            mime_type=ebrim.KOS_MIME_TYPE,
            attributes={REGISTERED: "false", "studyInstanceUID": study_uid},
        )
    except DocumentExists:  # a concurrent import got there first
        return done("already-registered", "stored concurrently")
    try:
        errors = await _register(ctx, datasets, kos_bytes, kos_uid)
    except Exception as exc:
        errors = [RegistryError("XDSRegistryError", f"registry error: {exc!r}")]
    if errors:
        # Roll back so a later run starts clean (and the registry never points at nothing).
        await asyncio.to_thread(repository.delete, kos_uid)
        return done("failed", _describe(errors))
    await asyncio.to_thread(repository.update_attributes, kos_uid, {REGISTERED: "true"})
    return done("registered")


async def _read_headers(
    files: Sequence[Path], report: ImportReport, progress: _Progress
) -> AsyncIterator[Dataset]:
    for start in range(0, len(files), _READ_BATCH):
        batch = files[start : start + _READ_BATCH]
        # File reads happen in a worker thread so a running gateway's loop stays responsive.
        for path, result in zip(batch, await asyncio.to_thread(_read_batch, batch), strict=True):
            if isinstance(result, str):
                report.ignored.append((path, result))
            else:
                report.files_read += 1
                yield result
        progress.advance(len(batch))


async def import_studies(
    paths: Sequence[Path],
    *,
    repository: DocumentRepository,
    registry: RegistrySubmitter,
    community: CommunityConfig,
    progress: bool,
    options: ManifestOptions | None = None,
    progress_stream: TextIO | None = None,
    on_patient: Callable[[Dataset], None] | None = None,
) -> ImportReport:
    """Import every study under ``paths``; one study failing does not stop the others.

    ``on_patient`` sees the first instance's header of each study (e.g. to record the
    patient's demographics in the local patient directory that XCPD answers from).
    """
    report = ImportReport()
    stream = (progress_stream or sys.stderr) if progress else None
    files = await asyncio.to_thread(collect_files, paths)
    studies: dict[str, list[Dataset]] = {}
    reading = _Progress("reading DICOM headers", len(files), stream, "files")
    try:
        async for header in _read_headers(files, report, reading):
            studies.setdefault(str(header.StudyInstanceUID), []).append(header)
    finally:
        reading.close()
    ctx = _Context(repository, registry, community, options or ManifestOptions())
    registering = _Progress("registering studies", len(studies), stream, "studies")
    try:
        for study_uid, datasets in studies.items():
            outcome = await _import_study(ctx, study_uid, datasets)
            report.studies.append(outcome)
            if on_patient is not None and outcome.status != "failed":
                on_patient(datasets[0])
            registering.advance()
    finally:
        registering.close()
    return report


# ------------------------------------------------------------------------------------ CLI


@dataclass(frozen=True)
class ImportSettings:
    community: CommunityConfig
    repository: DocumentRepository
    options: ManifestOptions
    # The local patient directory (demographics, for XCPD), filled as studies are imported.
    patients_db: Path | None = None


def load_import_settings(config_path: Path) -> ImportSettings:
    """The parts of a gateway configuration file the importer needs."""

    config = load_config(config_path)
    if config.repository is None:
        raise ConfigError("[repository] with repository_unique_id is required to import studies")
    mapping = config.patient_mapping
    return ImportSettings(
        config.community,
        config.repository.open(),
        config.repository.manifest,
        mapping.directory or config.storage.data_dir / "patients.sqlite3",
    )


async def import_with_config(
    config_path: Path, paths: Sequence[Path], open_registry: RegistryOpener, *, progress: bool
) -> ImportReport:
    """Import ``paths`` into the repository, registry and patient directory a gateway
    configuration file names (the CLI, and the demo's seeding)."""

    settings = load_import_settings(config_path)
    patients = PatientDirectory(settings.patients_db) if settings.patients_db else None
    authority = settings.community.patient_id_assigning_authority

    def remember(ds: Dataset) -> None:
        if patients is not None:
            try:
                patients.register_from_dicom(ds, authority)
            except ValueError as exc:  # demographics are a help for XCPD, not a condition
                print(f"patient directory: {exc}", file=sys.stderr)

    try:
        async with open_registry(config_path) as registry:
            return await import_studies(
                list(paths),
                repository=settings.repository,
                registry=registry,
                community=settings.community,
                progress=progress,
                options=settings.options,
                on_patient=remember,
            )
    finally:
        if patients is not None:
            patients.close()


async def _run_import(args: argparse.Namespace, open_registry: RegistryOpener) -> int:
    show_progress = not args.no_progress and sys.stderr.isatty()
    report = await import_with_config(
        Path(args.config), [Path(p) for p in args.paths], open_registry, progress=show_progress
    )
    for outcome in report.studies:
        if outcome.status in ("failed", "changed"):
            print(
                f"{outcome.status}: study {outcome.study_instance_uid}: {outcome.message}",
                file=sys.stderr,
            )
    print(report.summary())
    return 1 if report.failed else 0


def cmd_import(args: argparse.Namespace, open_registry: RegistryOpener | None) -> int:
    if open_registry is None:
        print("xca-gateway: this build has no document registry to import into", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_import(args, open_registry))
    except ConfigError as exc:
        print(f"xca-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xca-gateway: {exc}", file=sys.stderr)
        return 1


def add_import_command(
    subparsers: Any, *, open_registry: RegistryOpener | None = None
) -> argparse.ArgumentParser:
    """Register ``xca-gateway import PATH... --config FILE [--no-progress]``.

    ``open_registry(config_path)`` returns an async context manager yielding the registry
    the manifests are registered with (anything with ``async submit(request)``).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import",
        help="register DICOM studies as XDS-I.b imaging manifests",
        description="Read DICOM files (and directories, recursively), build one KOS "
        "manifest per study, store it in this community's repository and register its "
        "DocumentEntry with the registry. Re-running is safe: studies already registered "
        "are skipped. Exit status 1 if any study failed.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or directories")
    parser.add_argument("--config", required=True, metavar="FILE", help="gateway TOML file")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.set_defaults(func=functools.partial(cmd_import, open_registry=open_registry))
    return parser


@contextlib.asynccontextmanager
async def registry_from_config(config_path: Path) -> AsyncIterator[Any]:
    """The registry a configuration file names (for `xca-gateway import`)."""

    registry = await open_registry(load_config(config_path).registry)
    try:
        yield registry
    finally:
        await registry.close()
