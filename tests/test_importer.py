"""``xca-gateway import``: DICOM studies to stored KOS manifests and registry submissions.

The registry is an in-test recorder (anything with ``async submit``); what it receives is
checked against lcm.xsd, so this exercises the importer's real output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import shutil
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pydicom
import pytest
from lxml import etree
from pydicom.uid import generate_uid

from tests.test_metadata import NS, assert_valid, external_id, slot
from xca_gateway.repository import DocumentRepository
from xca_gateway.settings import CommunityConfig
from xca_gateway.tools.dicom_samples import DEFAULT_PATIENTS, SampleStudy, generate_study
from xca_gateway.tools.import_manifests import (
    ImportReport,
    add_import_command,
    collect_files,
    import_studies,
    manifest_uid,
)
from xca_gateway.xds import ebrim
from xca_gateway.xds.ebrs import RegistryError
from xca_gateway.xds.kos import kos_from_bytes, kos_references, kos_retrieve_locations

AFFINITY = "1.3.6.1.4.1.21367.13.20.1000"
REPO_ID = "1.3.6.1.4.1.21367.13.80.1"
COMMUNITY = CommunityConfig("alpha", "urn:oid:1.3.6.1.4.1.21367.13.70.1", AFFINITY)
UID_ROOT = "1.2.826.0.1.3680043.10.543"


class RecordingRegistry:
    """Accepts every submission (or answers with ``errors``) and keeps it."""

    def __init__(self, errors: list[RegistryError] | None = None) -> None:
        self.requests: list[etree._Element] = []
        self.errors = errors or []

    async def submit(self, request: etree._Element) -> list[RegistryError]:
        self.requests.append(request)
        return list(self.errors)

    def unique_ids(self) -> list[str]:
        out = []
        for request in self.requests:
            entry = request.find("rim:RegistryObjectList/rim:ExtrinsicObject", NS)
            assert entry is not None
            out.append(external_id(entry, ebrim.DE_UNIQUE_ID)[0])
        return out


def make_study(out: Path, index: int, **kw: object) -> SampleStudy:
    params: dict[str, object] = {
        "patient": DEFAULT_PATIENTS[index % len(DEFAULT_PATIENTS)],
        "patient_id": f"ALPHA-{index:04d}",
        "issuer_oid": AFFINITY,
        "modality": ("CT", "MR")[index % 2],
        "body_part": ("CHEST", "BRAIN")[index % 2],
        "study_date": date(2022, 1, 1 + index),
        "institution": "Alpha Hospital",
        "accession_number": f"ACC{index}",
        "uid_root": UID_ROOT,
        "series_count": 2,
        "instances_per_series": 2,
        "rows": 8,
        "columns": 8,
        "seed": index,
    }
    params.update(kw)
    return generate_study(out, **params)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path) -> DocumentRepository:
    return DocumentRepository(tmp_path / "repository", REPO_ID)


async def run(
    paths: list[Path], repo: DocumentRepository, registry: RecordingRegistry, **kw: object
) -> ImportReport:
    return await import_studies(
        paths,
        repository=repo,
        registry=registry,
        community=COMMUNITY,
        progress=False,
        **kw,  # type: ignore[arg-type]
    )


async def test_import_registers_one_manifest_per_study(
    tmp_path: Path, repo: DocumentRepository
) -> None:
    dicom = tmp_path / "dicom"
    studies = [make_study(dicom, 0), make_study(dicom, 1)]
    (dicom / "README.txt").write_text("not DICOM")
    registry = RecordingRegistry()
    progress = io.StringIO()
    report = await import_studies(
        [dicom],
        repository=repo,
        registry=registry,
        community=COMMUNITY,
        progress=True,
        progress_stream=progress,
    )
    assert [s.status for s in report.studies] == ["registered", "registered"]
    assert report.files_read == 8
    assert [(p.name, reason) for p, reason in report.ignored] == [
        ("README.txt", "not a DICOM Part-10 file")
    ]
    # Count, rate and time left (xca_gateway.progress), written once off a terminal.
    lines = progress.getvalue().splitlines()
    assert lines[0].startswith("reading DICOM headers ") and " 9/9 files " in lines[0]
    assert "/s " in lines[0]
    assert lines[1].startswith("registering studies ") and " 2/2 studies " in lines[1]
    assert "/s " in lines[1]

    for sample, outcome in zip(studies, report.studies, strict=True):
        assert outcome.study_instance_uid == sample.study_instance_uid
        uid = manifest_uid(sample.study_instance_uid, REPO_ID)
        assert outcome.document_unique_id == uid
        stored = repo.get(uid)
        assert stored is not None and stored.mime_type == "application/dicom"
        assert stored.attributes["registered"] == "true"
        data = repo.read_bytes(uid)
        assert data is not None
        kos = kos_from_bytes(data)
        assert kos.SOPInstanceUID == uid
        referenced = {r.sop_instance_uid for r in kos_references(kos)}
        instances = {
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sample.files
        }
        assert referenced == instances
        assert set(kos_retrieve_locations(kos).values()) == {REPO_ID}
        assert kos.InstitutionName == "Alpha Hospital"

        # The registered metadata describes exactly the stored bytes.
        request = registry.requests[studies.index(sample)]
        assert_valid(request)
        entry = request.find("rim:RegistryObjectList/rim:ExtrinsicObject", NS)
        assert entry is not None
        assert external_id(entry, ebrim.DE_UNIQUE_ID)[0] == uid
        assert slot(entry, "hash") == [hashlib.sha1(data).hexdigest()]
        assert slot(entry, "size") == [str(len(data))]
        assert slot(entry, "repositoryUniqueId") == [REPO_ID]
        assert (
            external_id(entry, ebrim.DE_PATIENT_ID)[0] == f"{sample.patient_id}^^^&{AFFINITY}&ISO"
        )
        reference_ids = slot(entry, ebrim.SLOT_REFERENCE_ID_LIST)
        assert (
            f"{sample.study_instance_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID" in reference_ids
        )
        assert f"{sample.accession_number}^^^&{AFFINITY}&ISO^urn:ihe:iti:xds:2013:accession" in (
            reference_ids
        )


async def test_reimport_is_detected_and_skipped(tmp_path: Path, repo: DocumentRepository) -> None:
    dicom = tmp_path / "dicom"
    make_study(dicom, 0)
    registry = RecordingRegistry()
    await run([dicom], repo, registry)
    before = {d.document_unique_id: d.sha1 for d in repo}
    report = await run([dicom], repo, registry)
    assert [s.status for s in report.studies] == ["already-registered"]
    assert len(registry.requests) == 1
    assert {d.document_unique_id: d.sha1 for d in repo} == before


async def test_a_changed_study_is_reported_not_replaced(
    tmp_path: Path, repo: DocumentRepository
) -> None:
    dicom = tmp_path / "dicom"
    sample = make_study(dicom, 0)
    registry = RecordingRegistry()
    await run([dicom], repo, registry)
    extra = pydicom.dcmread(sample.files[0])
    extra.SOPInstanceUID = generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.save_as(dicom / "late-arrival.dcm")
    report = await run([dicom], repo, registry)
    (outcome,) = report.studies
    assert outcome.status == "changed" and "1 instances added" in outcome.message
    assert len(registry.requests) == 1


async def test_rejected_registration_rolls_back_and_is_retried(
    tmp_path: Path, repo: DocumentRepository
) -> None:
    dicom = tmp_path / "dicom"
    sample = make_study(dicom, 0)
    refusing = RecordingRegistry([RegistryError("XDSUnknownPatientId", "who is this?")])
    report = await run([dicom], repo, refusing)
    (outcome,) = report.studies
    assert outcome.status == "failed" and "XDSUnknownPatientId" in outcome.message
    assert list(repo) == []  # nothing left that the registry does not know about

    accepting = RecordingRegistry()
    report = await run([dicom], repo, accepting)
    assert [s.status for s in report.studies] == ["registered"]
    assert accepting.unique_ids() == [manifest_uid(sample.study_instance_uid, REPO_ID)]


async def test_warnings_do_not_fail_a_registration(
    tmp_path: Path, repo: DocumentRepository
) -> None:
    dicom = tmp_path / "dicom"
    make_study(dicom, 0)
    warning = RegistryError(
        "XDSExtraMetadataNotSaved",
        "ignored a slot",
        severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning",
    )
    report = await run([dicom], repo, RecordingRegistry([warning]))
    assert [s.status for s in report.studies] == ["registered"]


async def test_interrupted_import_resumes_with_the_stored_manifest(
    tmp_path: Path, repo: DocumentRepository
) -> None:
    dicom = tmp_path / "dicom"
    sample = make_study(dicom, 0)

    class Crashing(RecordingRegistry):
        async def submit(self, request: etree._Element) -> list[RegistryError]:
            raise KeyboardInterrupt  # the operator pressed ^C mid-import

    with pytest.raises(KeyboardInterrupt):
        await run([dicom], repo, Crashing())
    uid = manifest_uid(sample.study_instance_uid, REPO_ID)
    stored = repo.get(uid)
    assert stored is not None and stored.attributes["registered"] == "false"

    registry = RecordingRegistry()
    report = await run([dicom], repo, registry)
    assert [s.status for s in report.studies] == ["registered"]
    entry = registry.requests[0].find("rim:RegistryObjectList/rim:ExtrinsicObject", NS)
    assert entry is not None
    assert slot(entry, "hash") == [stored.sha1]  # the bytes already in the repository
    after = repo.get(uid)
    assert after is not None and after.attributes["registered"] == "true"

    # Same situation, but the registry did get it before the crash: it says so, and that is
    # taken as registered.
    repo.update_attributes(uid, {"registered": "false"})
    duplicate = RecordingRegistry([RegistryError("XDSDuplicateUniqueIdInRegistry", uid)])
    report = await run([dicom], repo, duplicate)
    assert [s.status for s in report.studies] == ["registered"]


async def test_foreign_patients_and_bad_files_are_reported(
    tmp_path: Path, repo: DocumentRepository
) -> None:
    dicom = tmp_path / "dicom"
    make_study(dicom, 0)
    foreign = make_study(dicom, 1, issuer_oid="1.2.3.999")
    broken = dicom / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    registry = RecordingRegistry()
    report = await run([dicom], repo, registry)
    by_study = {s.study_instance_uid: s for s in report.studies}
    assert by_study[foreign.study_instance_uid].status == "failed"
    assert "1.2.3.999" in by_study[foreign.study_instance_uid].message
    assert repo.get(manifest_uid(foreign.study_instance_uid, REPO_ID)) is None
    assert len(registry.requests) == 1
    assert [p.name for p, _ in report.ignored] == ["broken.dcm"]


def test_collect_files_walks_directories_once(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "b" / "c.dcm").write_bytes(b"x")
    files = collect_files([tmp_path, tmp_path / "a.dcm"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.dcm", "b/c.dcm"]
    with pytest.raises(FileNotFoundError):
        collect_files([tmp_path / "missing"])


def test_manifest_uid_is_deterministic_and_valid() -> None:
    a = manifest_uid("1.2.3", REPO_ID)
    assert a == manifest_uid("1.2.3", REPO_ID)
    assert a != manifest_uid("1.2.4", REPO_ID) and a != manifest_uid("1.2.3", "1.2.9")
    assert a.startswith("2.25.") and len(a) <= 64


# ------------------------------------------------------------------------------------ CLI


def write_config(tmp_path: Path, repository: bool = True) -> Path:
    config = tmp_path / "gateway.toml"
    text = f"""
[community]
name = "alpha"
home_community_id = "{COMMUNITY.home_community_id}"
patient_id_assigning_authority = "{AFFINITY}"

[storage]
data_dir = "data"

# The importer reads the gateway's own configuration file; TLS is not used by it.
[tls]
certificate = "gateway.pem"
private_key = "gateway.key"
trust_store = "ca.pem"
"""
    if repository:
        text += f"""
[repository]
repository_unique_id = "{REPO_ID}"

[repository.manifest]
language_code = "nb-NO"
"""
    config.write_text(text)
    return config


def cli(opener: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xca-gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    add_import_command(sub, open_registry=opener)  # type: ignore[arg-type]
    return parser


def test_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dicom = tmp_path / "dicom"
    sample = make_study(dicom, 0)
    config = write_config(tmp_path)
    registry = RecordingRegistry()
    opened: list[Path] = []

    @contextlib.asynccontextmanager
    async def opener(path: Path) -> AsyncIterator[RecordingRegistry]:
        opened.append(path)
        yield registry

    args = cli(opener).parse_args(["import", str(dicom), "--config", str(config), "--no-progress"])
    assert args.func(args) == 0
    assert opened == [config]
    out = capsys.readouterr()
    assert "1 registered" in out.out and out.err == ""
    repo = DocumentRepository(tmp_path / "data" / "repository", REPO_ID)
    assert repo.get(manifest_uid(sample.study_instance_uid, REPO_ID)) is not None
    entry = registry.requests[0].find("rim:RegistryObjectList/rim:ExtrinsicObject", NS)
    assert entry is not None and slot(entry, "languageCode") == ["nb-NO"]

    # A failing study makes the exit status 1 and is named on stderr.
    shutil.rmtree(dicom)
    foreign = make_study(dicom, 1, issuer_oid="1.2.3.999")
    args = cli(opener).parse_args(["import", str(dicom), "--config", str(config)])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert f"failed: study {foreign.study_instance_uid}" in err


def test_cli_configuration_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    @contextlib.asynccontextmanager
    async def opener(path: Path) -> AsyncIterator[RecordingRegistry]:
        yield RecordingRegistry()

    no_repository = write_config(tmp_path, repository=False)
    args = cli(opener).parse_args(["import", str(tmp_path), "--config", str(no_repository)])
    assert args.func(args) == 2
    assert "[repository]" in capsys.readouterr().err

    config = write_config(tmp_path)
    args = cli(None).parse_args(["import", str(tmp_path), "--config", str(config)])
    assert args.func(args) == 2
    assert "no document registry" in capsys.readouterr().err

    args = cli(opener).parse_args(["import", str(tmp_path / "nope"), "--config", str(config)])
    assert args.func(args) == 1
    assert "nope" in capsys.readouterr().err
