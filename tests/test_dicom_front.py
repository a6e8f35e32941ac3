"""The DICOM front door: C-FIND / C-GET / C-MOVE against a real gateway with registered studies.

One community (registry, repository with KOS manifests, filesystem imaging source) is seeded as
the demo does it, then queried and retrieved over DIMSE with pynetdicom and with dcmtk's
findscu / getscu / movescu (storescp as the move destination).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.conftest import GatewayThread
from xca_gateway.config import load_config
from xca_gateway.dicom_front import (
    ConfigError,
    DicomDestination,
    DicomFrontDoor,
    QueryError,
    decode_instance,
    parse_dicom_front_config,
    parse_identifier,
)
from xca_gateway.dicom_samples import SampleStudy, generate_community_samples, local_patient_id
from xca_gateway.pki import DevPki

ARC = "1.3.6.1.4.1.21367.13"
AUTHORITY = f"{ARC}.20.1000"  # alpha, the community whose front door is tested
FRONT_AE = "XCA-FRONT"
STORE_AE = "STORESCP"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Front:
    port: int
    studies: list[SampleStudy]  # alpha's own
    peer_studies: list[SampleStudy]  # beta's, reached through ITI-38 / ITI-39 / RAD-75
    store_dir: Path

    def of(self, patient_id: str) -> list[SampleStudy]:
        return [s for s in self.studies if s.patient_id == patient_id]

    def alice_everywhere(self) -> set[str]:
        """Alice's Study Instance UIDs in alpha and beta (one person, two local ids)."""
        return {
            s.study_instance_uid
            for s in [*self.studies, *self.peer_studies]
            if s.patient_id in (local_patient_id(0, 0), local_patient_id(1, 0))
        }


def seed_community(
    tmp: Path, pki: DevPki, name: str, index: int, extra: str = ""
) -> tuple[Path, list[SampleStudy]]:
    """A community as the demo builds it: sample studies imported into registry/repository."""
    from xca_gateway.cli import registry_from_config
    from xca_gateway.importer import import_with_config

    pair = pki.communities[name]
    data = tmp / name
    studies = generate_community_samples(
        data / "images",
        community_index=index,
        community_name=name,
        issuer_oid=f"{ARC}.20.{1000 * (index + 1)}",
        uid_root=f"{ARC}.90.{index + 1}",
    )
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[community]
name = "{name}"
home_community_id = "urn:oid:{ARC}.70.{index + 1}"
patient_id_assigning_authority = "{ARC}.20.{1000 * (index + 1)}"

[server]
host = "127.0.0.1"
port = 0

[admin]
host = "127.0.0.1"
port = 0

[tls]
certificate = "{pair.cert}"
private_key = "{pair.key}"
trust_store = "{pki.ca}"

[storage]
data_dir = "{data}"

[repository]
repository_unique_id = "{ARC}.80.{index + 1}"

[repository.manifest]
imaging_source_id = "{ARC}.81.{index + 1}"

[[imaging.sources]]
repository_unique_id = "{ARC}.81.{index + 1}"
kind = "filesystem"
{extra}
"""
    )
    report = asyncio.run(
        import_with_config(path, [data / "images"], registry_from_config, progress=False)
    )
    assert not report.failed, report.summary()
    return path, studies


@pytest.fixture(scope="module")
def front(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("dicom-front")
    beta_config, beta_studies = seed_community(tmp, pki, "beta", 1)
    threads = [GatewayThread(load_config(beta_config))]
    storescp: subprocess.Popen[bytes] | None = None
    door: DicomFrontDoor | None = None
    try:
        beta = threads[0].__enter__()
        xref = tmp / "xref.csv"
        xref.write_text(
            f"{local_patient_id(0, 0)}^^^&{ARC}.20.1000&ISO,"
            f"{local_patient_id(1, 0)}^^^&{ARC}.20.2000&ISO\n"
        )
        peer = f"""
[patient_mapping]
xref_csv = "{xref}"

[[peers]]
name = "beta"
home_community_id = "urn:oid:{ARC}.70.2"
iti38 = "{beta.base_url}/xca/iti38"
iti39 = "{beta.base_url}/xca/iti39"
rad75 = "{beta.base_url}/xca/rad75"
patient_id_assigning_authority = "{ARC}.20.2000"
"""
        alpha_config, studies = seed_community(tmp, pki, "alpha", 0, peer)
        threads.append(GatewayThread(load_config(alpha_config)))
        alpha = threads[1].__enter__()
        store_dir = tmp / "store"
        store_dir.mkdir()
        store_port = free_port()
        door = DicomFrontDoor(
            alpha,
            parse_dicom_front_config(
                {
                    "ae_title": FRONT_AE,
                    "port": 0,
                    "destinations": [
                        {"ae_title": STORE_AE, "host": "127.0.0.1", "port": store_port}
                    ],
                }
            ),
        )
        asyncio.run_coroutine_threadsafe(door.start(), threads[1].loop).result(15)
        if shutil.which("storescp"):
            storescp = subprocess.Popen(
                ["storescp", "-aet", STORE_AE, "-od", str(store_dir), "-uf", str(store_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        yield Front(door.port, studies, beta_studies, store_dir)
    finally:
        if storescp is not None:
            storescp.terminate()
            storescp.wait(10)
        if door is not None:
            asyncio.run_coroutine_threadsafe(door.stop(), threads[-1].loop).result(15)
        for thread in reversed(threads):
            thread.__exit__(None, None, None)


def associate(front: Front, *contexts: Any, roles: list[Any] | None = None) -> Any:
    ae = AE(ae_title="TESTSCU")
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", front.port, ae_title=FRONT_AE, ext_neg=roles or [])
    assert assoc.is_established
    return assoc


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(front: Front, ds: Dataset, model: Any) -> tuple[int, list[Dataset]]:
    assoc = associate(front, model)
    try:
        matches = []
        status = -1
        for result, match in assoc.send_c_find(ds, model):
            status = int(result.Status)
            if status in (0xFF00, 0xFF01):
                matches.append(match)
        return status, matches
    finally:
        assoc.release()


def pixel_identical(received: Path, source: Path) -> bool:
    a, b = dcmread(received), dcmread(source)
    return bool(a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData)


# ----------------------------------------------------------------------------- config


def test_config_parses_and_rejects_bad_tables() -> None:
    config = parse_dicom_front_config(
        {
            "ae_title": "GW",
            "port": 104,
            "destinations": [{"ae_title": "WS1", "host": "10.0.0.5", "port": 11112}],
        }
    )
    assert config.host == "127.0.0.1"
    assert config.destination("WS1") == DicomDestination("WS1", "10.0.0.5", 11112)
    assert config.destination("WS2") is None
    for bad in (
        {"ae_title": "A" * 17},
        {"port": 70000},
        {"colour": "blue"},
        {"destinations": [{"ae_title": "X", "port": 0}]},
        {"destinations": [{"ae_title": "X", "port": 1}, {"ae_title": "X", "port": 2}]},
    ):
        with pytest.raises(ConfigError):
            parse_dicom_front_config(bad)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_parse_identifier_maps_patient_ids() -> None:
    ds = identifier("STUDY", PatientID="MRN1", StudyInstanceUID="1.2.3")
    query = parse_identifier(ds, model="PATIENT", local_authority=AUTHORITY)
    assert query.patient_id == f"MRN1^^^&{AUTHORITY}&ISO"
    assert query.study_instance_uids == ("1.2.3",)
    qualified = Dataset()
    qualified.UniversalEntityID = "2.999.7"
    foreign = identifier("STUDY", PatientID="X9", IssuerOfPatientIDQualifiersSequence=[qualified])
    query = parse_identifier(foreign, model="STUDY", local_authority=AUTHORITY)
    assert query.patient_id == "X9^^^&2.999.7&ISO"  # left to the patient-ID mapping
    assert (
        parse_identifier(identifier("IMAGE"), model="STUDY", local_authority=AUTHORITY).patient_id
        is None
    )
    for bad, model in (
        (identifier("FRAME", PatientID="A"), "PATIENT"),
        (identifier("PATIENT", PatientID="A"), "STUDY"),
        (identifier("STUDY", PatientID="A*"), "PATIENT"),
        (identifier("SERIES", PatientID="A", StudyInstanceUID="1.2.*"), "PATIENT"),
    ):
        with pytest.raises(QueryError) as caught:
            parse_identifier(bad, model=model, local_authority=AUTHORITY)
        assert caught.value.status == 0xA900


def test_decode_instance_refuses_cut_or_foreign_instances(tmp_path: Path) -> None:
    study = generate_community_samples(
        tmp_path, community_index=0, community_name="a", issuer_oid=AUTHORITY, uid_root="2.999.9"
    )[0]
    data = study.files[0].read_bytes()
    uid = str(dcmread(study.files[0], stop_before_pixels=True).SOPInstanceUID)
    assert str(decode_instance(data, uid).SOPInstanceUID) == uid
    for cut in (100, 200, len(data) // 2, len(data) - 2):
        with pytest.raises(ValueError):
            decode_instance(data[:cut], uid)
    with pytest.raises(ValueError, match="sent"):
        decode_instance(data, "2.999.1")


# ----------------------------------------------------------------------------- C-FIND


def test_find_studies_of_a_patient(front: Front) -> None:
    alice = front.studies[0]
    expected = {s.study_instance_uid for s in front.of(alice.patient_id)}
    status, matches = c_find(
        front,
        identifier(
            "STUDY",
            PatientID=alice.patient_id,
            IssuerOfPatientID=AUTHORITY,
            StudyInstanceUID="",
            AccessionNumber="",
            PatientName="",
        ),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    # Alice's studies in both communities: the ITI-18 fans out to beta as ITI-38, her id
    # mapped through the cross-reference table.
    beta_alice = local_patient_id(1, 0)
    expected |= {s.study_instance_uid for s in front.peer_studies if s.patient_id == beta_alice}
    assert {str(m.StudyInstanceUID) for m in matches} == expected
    accessions = {s.accession_number for s in front.of(alice.patient_id)} | {
        s.accession_number for s in front.peer_studies if s.patient_id == beta_alice
    }
    assert {str(m.AccessionNumber) for m in matches} == accessions
    assert all(str(m.PatientID) == alice.patient_id for m in matches)


def test_find_series_and_images_study_root(front: Front) -> None:
    study = front.studies[0]
    status, series = c_find(
        front,
        identifier(
            "SERIES",
            PatientID=study.patient_id,
            StudyInstanceUID=study.study_instance_uid,
            SeriesInstanceUID="",
        ),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    assert {str(m.SeriesInstanceUID) for m in series} == set(study.series_instance_uids)
    status, images = c_find(
        front,
        identifier(
            "IMAGE",
            StudyInstanceUID=study.study_instance_uid,  # known from the earlier C-FIND
            SeriesInstanceUID=study.series_instance_uids[0],
            SOPInstanceUID="",
        ),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    expected = {
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for f in study.files
        if str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
        == study.series_instance_uids[0]
    }
    assert {str(m.SOPInstanceUID) for m in images} == expected


def test_find_patient_level_answers_with_the_callers_id(front: Front) -> None:
    alice = local_patient_id(0, 0)
    status, matches = c_find(
        front,
        identifier("PATIENT", PatientID=alice, IssuerOfPatientID=AUTHORITY, PatientName=""),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    # Studies in two communities under two local ids: still one patient, with the caller's id.
    assert [(str(m.PatientID), str(m.IssuerOfPatientID)) for m in matches] == [(alice, AUTHORITY)]
    assert str(matches[0].PatientName).startswith("Lindqvist")
    assert "StudyInstanceUID" not in matches[0]


def test_find_matches_attributes_the_manifest_knows(front: Front) -> None:
    alice = local_patient_id(0, 0)
    target = front.of(alice)[0]
    status, matches = c_find(
        front,
        identifier("STUDY", PatientID=alice, AccessionNumber=target.accession_number, StudyDate=""),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    assert [str(m.StudyInstanceUID) for m in matches] == [target.study_instance_uid]
    assert str(matches[0].StudyDate) == target.study_date
    status, matches = c_find(
        front,
        identifier("STUDY", PatientID=alice, StudyDate=f"{target.study_date}-"),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    everywhere = [*front.studies, *front.peer_studies]
    assert {str(m.StudyInstanceUID) for m in matches} == {
        s.study_instance_uid
        for s in everywhere
        if s.study_instance_uid in front.alice_everywhere() and s.study_date >= target.study_date
    }
    status, _ = c_find(
        front,
        identifier("STUDY", PatientID=alice, ModalitiesInStudy="CT"),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0xA900  # not in a manifest: refused rather than ignored


def test_other_patient_ids_sequence_selects_the_local_id(front: Front) -> None:
    alice = front.studies[0]
    other = Dataset()
    other.PatientID = alice.patient_id
    other.IssuerOfPatientID = AUTHORITY
    status, matches = c_find(
        front,
        identifier(
            "STUDY",
            PatientID="FOREIGN-1",
            IssuerOfPatientID="2.999.1",
            OtherPatientIDsSequence=[other],
            StudyInstanceUID="",
        ),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    assert {str(m.StudyInstanceUID) for m in matches} == front.alice_everywhere()


def test_find_rejects_unsupported_identifiers(front: Front) -> None:
    alice = front.studies[0]
    bad_level, _ = c_find(
        front,
        identifier("FRAME", PatientID=alice.patient_id),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert bad_level == 0xA900
    patient_in_study_root, _ = c_find(
        front,
        identifier("PATIENT", PatientID=alice.patient_id),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert patient_in_study_root == 0xA900
    no_patient, _ = c_find(
        front, identifier("STUDY", PatientName="X*"), StudyRootQueryRetrieveInformationModelFind
    )
    assert no_patient == 0xA900
    unknown, matches = c_find(
        front,
        identifier("STUDY", PatientID="NOBODY", StudyInstanceUID=""),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert unknown == 0x0000 and matches == []


def test_findscu(front: Front) -> None:
    if shutil.which("findscu") is None:
        pytest.skip("dcmtk findscu is not installed")
    alice = front.studies[0]
    result = subprocess.run(
        [
            "findscu",
            "-S",
            "-aec",
            FRONT_AE,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"PatientID={alice.patient_id}",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            str(front.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for study in front.of(alice.patient_id):
        assert study.study_instance_uid in result.stderr + result.stdout


# ----------------------------------------------------------------------------- C-GET / C-MOVE


def test_c_get_with_pynetdicom_returns_identical_instances(front: Front) -> None:
    study = front.studies[0]
    received: dict[str, Dataset] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for context in StoragePresentationContexts[:120]:
        ae.add_requested_context(str(context.abstract_syntax))
        roles.append(build_role(str(context.abstract_syntax), scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        front.port,
        ae_title=FRONT_AE,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(
                identifier(
                    "STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid
                ),
                StudyRootQueryRetrieveInformationModelGet,
            )
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    assert len(received) == len(study.files)
    for path in study.files:
        source = dcmread(path)
        got = received[str(source.SOPInstanceUID)]
        assert got.PixelData == source.PixelData


def test_getscu(front: Front, tmp_path: Path) -> None:
    if shutil.which("getscu") is None:
        pytest.skip("dcmtk getscu is not installed")
    # Alice's study in beta, asked for with her alpha id: ITI-18 → ITI-38, RAD-69 → RAD-75.
    study = next(s for s in front.peer_studies if s.patient_id == local_patient_id(1, 0))
    out = tmp_path / "get"
    out.mkdir()
    result = subprocess.run(
        [
            "getscu",
            "-P",
            "-aec",
            FRONT_AE,
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"PatientID={local_patient_id(0, 0)}",
            "-k",
            f"StudyInstanceUID={study.study_instance_uid}",
            "127.0.0.1",
            str(front.port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(out.iterdir())
    assert len(files) == len(study.files)
    by_uid = {str(dcmread(f).SOPInstanceUID): f for f in files}
    for path in study.files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert pixel_identical(by_uid[uid], path)


def test_movescu_to_storescp(front: Front) -> None:
    if shutil.which("movescu") is None or shutil.which("storescp") is None:
        pytest.skip("dcmtk movescu/storescp are not installed")
    study = front.studies[1]
    result = subprocess.run(
        [
            "movescu",
            "-S",
            "-aec",
            FRONT_AE,
            "-aem",
            STORE_AE,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"PatientID={study.patient_id}",
            "-k",
            f"StudyInstanceUID={study.study_instance_uid}",
            "127.0.0.1",
            str(front.port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    by_uid = {str(dcmread(f).SOPInstanceUID): f for f in front.store_dir.iterdir()}
    for path in study.files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert pixel_identical(by_uid[uid], path)


def test_move_to_an_unknown_destination_is_refused(front: Front) -> None:
    study = front.studies[0]
    assoc = associate(front, PatientRootQueryRetrieveInformationModelMove)
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_move(
                identifier(
                    "STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid
                ),
                "NOWHERE",
                PatientRootQueryRetrieveInformationModelMove,
            )
        ]
    finally:
        assoc.release()
    assert statuses == [0xA801]


def test_retrieve_without_study_uid_is_refused(front: Front) -> None:
    assoc = associate(front, PatientRootQueryRetrieveInformationModelMove)
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_move(
                identifier("SERIES", PatientID=front.studies[0].patient_id),
                STORE_AE,
                PatientRootQueryRetrieveInformationModelMove,
            )
        ]
    finally:
        assoc.release()
    assert statuses == [0xA900]


def test_malformed_instance_from_the_source_is_not_stored(front: Front, tmp_path: Path) -> None:
    # Runs last in this module: it damages one source file.
    study = front.studies[2]
    victim = study.files[0]
    victim_uid = str(dcmread(victim, stop_before_pixels=True).SOPInstanceUID)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # cut inside the Pixel Data
    received: dict[str, Dataset] = {}

    def on_store(event: Any) -> int:
        received[str(event.dataset.SOPInstanceUID)] = event.dataset
        return 0x0000

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for context in StoragePresentationContexts[:120]:
        ae.add_requested_context(str(context.abstract_syntax))
        roles.append(build_role(str(context.abstract_syntax), scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        front.port,
        ae_title=FRONT_AE,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        results = list(
            assoc.send_c_get(
                identifier(
                    "STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid
                ),
                StudyRootQueryRetrieveInformationModelGet,
            )
        )
    finally:
        assoc.release()
        victim.write_bytes(data)
    final, final_identifier = results[-1]
    assert int(final.Status) == 0xB000  # sub-operations complete, one or more failures
    assert victim_uid not in received
    # The well-formed instances of the study still arrive, byte for byte.
    assert len(study.files) > 1
    for path in study.files[1:]:
        source = dcmread(path)
        assert received[str(source.SOPInstanceUID)].PixelData == source.PixelData
    assert final_identifier is not None and victim_uid in final_identifier.FailedSOPInstanceUIDList
