"""The DICOM front door: C-FIND / C-GET / C-MOVE against a real gateway with registered studies.

One community (registry, repository with KOS manifests, filesystem imaging source) is seeded as
the demo does it, then queried and retrieved over DIMSE with pynetdicom and with dcmtk's
findscu / getscu / movescu (storescp as the move destination). The gateway audits over syslog
UDP to a socket the test reads; each test that checks records calls with its own AE title.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.audit_inbox import AuditInbox
from tests.communities import ARC, seed_community
from tests.conftest import GatewayThread, policy_for_tests, policy_toml, wait_for
from tests.dcmtk import dcmtk, find_dcmtk
from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit import messages as m
from xca_gateway.audit.validate import schema_errors
from xca_gateway.doors.dimse import (
    ConfigError,
    DicomDestination,
    DicomFrontDoor,
    DicomFrontServices,
    QueryError,
    parse_dicom_front_config,
    parse_identifier,
    transfer_audits,
)
from xca_gateway.imaging.dicom_negotiation import (
    STORAGE_SYNTAXES,
    move_contexts,
    outgoing_syntax,
    request_syntaxes,
    requestor_order,
)
from xca_gateway.imaging.instance import decode_instance
from xca_gateway.imaging.request import DocumentRequest
from xca_gateway.imaging.transfer_syntax import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    JPEG_2000_LOSSLESS,
    RLE_LOSSLESS,
    split_meta,
    transcode,
)
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.callers import current_caller
from xca_gateway.security.dev_pki import CertPair, DevPki
from xca_gateway.tools.dicom_samples import (
    MODALITY_SOP_CLASSES,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SampleStudy,
    generate_community_samples,
    local_patient_id,
)

AUTHORITY = f"{ARC}.20.1000"  # alpha, the community whose front door is tested
FRONT_AE = "XCA-FRONT"
STORE_AE = "STORESCP"  # plain storescp on loopback
STORE_TLS_AE = "STORESCP-TLS"  # storescp with DICOM TLS
# Calling AE titles the tests use to tell their audit records apart (the test client's).
AUDIT_AE_TITLES = [
    "AUDIT-DCMTK",
    "AUDIT-MOVE",
    "AUDIT-MOVE-TLS",
    "AUDIT-NOWHERE",
    "AUDIT-FIND",
    "AUDIT-BADFIND",
    "AUDIT-GET",
    "AUDIT-GET-SOME",
    "AUDIT-GET-NONE",
    "AUDIT-CUT",
    "AUDIT-AFTER",
]
# Calling AE titles of a workstation on this host that speaks plain DIMSE (no certificate: the
# AE title is tied to the loopback address).
PLAIN_AE_TITLES = ["PLAINSCU", "GETSCU", "AUDIT-MOVE"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Front:
    port: int  # the gateway's [dicom] door: DICOM TLS (the default)
    plain_port: int  # a door of the same gateway with tls = false, on loopback
    studies: list[SampleStudy]  # alpha's own
    peer_studies: list[SampleStudy]  # beta's, reached through ITI-38 / ITI-39 / RAD-75
    store_dir: Path
    store_tls_dir: Path
    audit: AuditInbox  # alpha's audit record repository
    pki: DevPki
    gateway: Gateway

    def of(self, patient_id: str) -> list[SampleStudy]:
        return [s for s in self.studies if s.patient_id == patient_id]

    def alice_everywhere(self) -> set[str]:
        """Alice's Study Instance UIDs in alpha and beta (one person, two local ids)."""
        return {
            s.study_instance_uid
            for s in [*self.studies, *self.peer_studies]
            if s.patient_id in (local_patient_id(0, 0), local_patient_id(1, 0))
        }

    def client_tls(self, pair: CertPair | None = None) -> ssl.SSLContext:
        """The test client's DICOM TLS context (``pair``: another certificate)."""
        pair = pair or self.pki.client
        return client_context(self.pki.ca, pair.cert, pair.key)

    def dcmtk_tls(self) -> list[str]:
        """dcmtk's options for DICOM TLS as the test client."""
        pki = self.pki
        return ["+tls", str(pki.client.key), str(pki.client.cert), "-pw", "+cf", str(pki.ca)]


def front_policy() -> str:
    """The test policy, the test client also allowed the AE titles these tests call with, and
    a plain-DIMSE workstation on loopback."""
    policy = policy_for_tests()
    client = next(c for c in policy["callers"] if c["name"] == "test-client")
    client["ae_titles"] = [*client["ae_titles"], *AUDIT_AE_TITLES]
    policy["callers"].append(
        {
            "name": "loopback-workstation",
            "roles": ["local-consumer"],
            "addresses": ["127.0.0.1"],
            "ae_titles": PLAIN_AE_TITLES,
        }
    )
    return policy_toml(policy)


@pytest.fixture(scope="module")
def front(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("dicom-front")
    audit = AuditInbox()
    beta_config, beta_studies = seed_community(tmp, pki, "beta", 1)
    threads = [GatewayThread(load_config(beta_config))]
    storescps: list[subprocess.Popen[bytes]] = []
    plain: DicomFrontDoor | None = None
    try:
        beta = threads[0].__enter__()
        xref = tmp / "xref.csv"
        xref.write_text(
            f"{local_patient_id(0, 0)}^^^&{ARC}.20.1000&ISO,"
            f"{local_patient_id(1, 0)}^^^&{ARC}.20.2000&ISO\n"
        )
        store_dir, store_tls_dir = tmp / "store", tmp / "store-tls"
        store_dir.mkdir()
        store_tls_dir.mkdir()
        store_port, store_tls_port = free_port(), free_port()
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

[dicom]
ae_title = "{FRONT_AE}"
port = 0

# QIDO-RS on the same gateway: what C-FIND answers is compared with it.
[dicomweb]
host = "127.0.0.1"
port = 0

[[dicom.destinations]]
ae_title = "{STORE_AE}"
port = {store_port}
tls = false

[[dicom.destinations]]
ae_title = "{STORE_TLS_AE}"
port = {store_tls_port}

{audit.toml("alpha-dicom")}
{front_policy()}
"""
        alpha_config, studies = seed_community(tmp, pki, "alpha", 0, peer)
        threads.append(GatewayThread(load_config(alpha_config)))
        alpha = threads[1].__enter__()
        assert alpha.dicom_front is not None and alpha.dicom_front.config.tls
        # The same gateway's door in plain DIMSE, on loopback only.
        plain = DicomFrontDoor(
            DicomFrontServices.of(alpha),
            dataclasses.replace(alpha.dicom_front.config, tls=False),
        )
        asyncio.run_coroutine_threadsafe(plain.start(), threads[1].loop).result(15)
        storescp = find_dcmtk("storescp")
        if storescp is not None:
            storescps.append(
                subprocess.Popen(
                    [
                        *(storescp, "+B", "+xa", "-aet", STORE_AE),
                        *("-od", str(store_dir), str(store_port)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            # The move destination over DICOM TLS: beta's certificate (127.0.0.1 in its
            # SANs) as its own, alpha's verified against the CA.
            storescps.append(
                subprocess.Popen(
                    [
                        storescp,
                        *(
                            "+tls",
                            str(pki.communities["beta"].key),
                            str(pki.communities["beta"].cert),
                        ),
                        *("-pw", "+cf", str(pki.ca)),
                        *("+B", "+xa", "-aet", STORE_TLS_AE),
                        *("-od", str(store_tls_dir), str(store_tls_port)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield Front(
            alpha.dicom_front.port,
            plain.port,
            studies,
            beta_studies,
            store_dir,
            store_tls_dir,
            audit,
            pki,
            alpha,
        )
    finally:
        for process in storescps:
            process.terminate()
            process.wait(10)
        if plain is not None:
            asyncio.run_coroutine_threadsafe(plain.stop(), threads[-1].loop).result(15)
        for thread in reversed(threads):
            thread.__exit__(None, None, None)
        audit.close()


def associate(
    front: Front,
    *contexts: Any,
    roles: list[Any] | None = None,
    ae_title: str = "TESTSCU",
    plain: bool = False,
    tls: ssl.SSLContext | None = None,
    evt_handlers: list[Any] | None = None,
) -> Any:
    """An association with the DICOM TLS door as the test client (``plain``: with the plain
    door on loopback); asserts it was accepted."""
    assoc = request_association(
        front,
        *contexts,
        roles=roles,
        ae_title=ae_title,
        plain=plain,
        tls=tls,
        evt_handlers=evt_handlers,
    )
    assert assoc.is_established
    return assoc


def request_association(
    front: Front,
    *contexts: Any,
    roles: list[Any] | None = None,
    ae_title: str = "TESTSCU",
    plain: bool = False,
    tls: ssl.SSLContext | None = None,
    evt_handlers: list[Any] | None = None,
) -> Any:
    ae = AE(ae_title=ae_title)
    ae.connection_timeout = 30  # TCP connect and TLS handshake: a stuck door fails the test
    for context in contexts:
        if isinstance(context, tuple):  # (abstract syntax, [transfer syntaxes])
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    return ae.associate(
        "127.0.0.1",
        front.plain_port if plain else front.port,
        ae_title=FRONT_AE,
        ext_neg=roles or [],
        tls_args=None if plain else (tls or front.client_tls(), "127.0.0.1"),
        evt_handlers=evt_handlers or [],
    )


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(
    front: Front, ds: Dataset, model: Any, ae_title: str = "TESTSCU", *, plain: bool = False
) -> tuple[int, list[Dataset]]:
    assoc = associate(front, model, ae_title=ae_title, plain=plain)
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
    assert config.tls  # DICOM TLS unless asked otherwise
    assert config.destination("WS1") == DicomDestination("WS1", "10.0.0.5", 11112, tls=True)
    assert config.destination("WS2") is None
    # Plain DIMSE is allowed on loopback only, for the door and for a move destination.
    assert not parse_dicom_front_config({"host": "::1", "tls": False}).tls
    assert (
        not parse_dicom_front_config(
            {"destinations": [{"ae_title": "X", "host": "localhost", "port": 104, "tls": False}]}
        )
        .destinations[0]
        .tls
    )
    with pytest.raises(ConfigError, match=r"dicom\.tls = false .* not '0\.0\.0\.0'"):
        parse_dicom_front_config({"host": "0.0.0.0", "tls": False})
    with pytest.raises(ConfigError, match=r"dicom\.destinations\[0\]\.tls = false"):
        parse_dicom_front_config(
            {"destinations": [{"ae_title": "X", "host": "10.0.0.5", "port": 104, "tls": False}]}
        )
    for bad in (
        {"ae_title": "A" * 17},
        {"port": 70000},
        {"colour": "blue"},
        {"destinations": [{"ae_title": "X", "port": 0}]},
        {"destinations": [{"ae_title": "X", "port": 1}, {"ae_title": "X", "port": 2}]},
        {"tls": "yes"},
    ):
        with pytest.raises(ConfigError):
            parse_dicom_front_config(bad)


def test_transfer_syntax_choices() -> None:
    explicit, implicit, rle, j2k = (
        EXPLICIT_VR_LITTLE_ENDIAN,
        IMPLICIT_VR_LITTLE_ENDIAN,
        RLE_LOSSLESS,
        JPEG_2000_LOSSLESS,
    )
    ct, mr = MODALITY_SOP_CLASSES["CT"], MODALITY_SOP_CLASSES["MR"]
    # The acceptor takes the requestor's order, per SOP class, over its contexts.
    order = requestor_order(
        [(ct, [rle, explicit]), (ct, [implicit, explicit]), (mr, ["1.2.840.10008.1.2.2", j2k])],
        STORAGE_SYNTAXES,
    )
    assert order == {ct: [rle, explicit, implicit], mr: [j2k]}  # big endian is not passed on
    # The RAD-69 asks for what was accepted for the SOP classes retrieved (else native).
    accepted = {ct: [explicit, rle], mr: [implicit]}
    assert request_syntaxes(accepted, [ct]) == (explicit, rle)
    assert request_syntaxes(accepted, [ct, mr]) == (explicit, rle, implicit)
    assert request_syntaxes(accepted, ["1.2.3"]) == (explicit, implicit)
    # As stored when accepted; native to any accepted native; else a lossless conversion.
    assert outgoing_syntax(rle, [explicit, rle]) == rle
    assert outgoing_syntax(explicit, [implicit]) == explicit  # pynetdicom re-encodes
    assert outgoing_syntax(rle, [implicit, explicit]) == implicit  # in the receiver's order
    assert outgoing_syntax(explicit, [rle]) == rle
    assert outgoing_syntax(j2k, [explicit, implicit]) is None  # no JPEG 2000 decoder
    # A C-MOVE proposes native and compressed contexts per SOP class, at most 128.
    contexts = move_contexts([ct, mr, ct])
    assert [(c.abstract_syntax, c.transfer_syntax) for c in contexts[:2]] == [
        (ct, [explicit, implicit]),
        (mr, [explicit, implicit]),
    ]
    assert {(c.abstract_syntax, c.transfer_syntax[0]) for c in contexts} >= {(ct, rle), (mr, j2k)}
    assert len(move_contexts(f"1.2.3.{n}" for n in range(100))) <= 128


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
        identifier("STUDY", PatientID=alice, SeriesDescription="X*"),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0xA900  # not known to the federation: refused rather than ignored


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


def qido(front: Front, path: str, **params: str) -> list[dict[str, Any]]:
    """A QIDO-RS search on the same gateway's DICOMweb door, as the test client."""
    door = front.gateway.dicomweb_front
    assert door is not None
    with httpx.Client(verify=front.client_tls(), timeout=60) as client:
        response = client.get(
            f"{door.base_url}/dicomweb/{path}",
            params=params,
            headers={"accept": "application/dicom+json"},
        )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def multi(value: Any) -> list[str]:
    """A (possibly multi-valued) element value as a list of strings."""
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def json_values(match: dict[str, Any], keyword: str) -> list[Any]:
    element = match.get(f"{tag_for_keyword(keyword):08X}", {})
    return list(element.get("Value", []))


def test_c_find_answers_what_qido_rs_answers(front: Front) -> None:
    """ModalitiesInStudy, the study, series and instance counts, series Modality: the same
    federation view gives C-FIND the answers QIDO-RS gives, and both are the samples'."""
    alice = front.studies[0].patient_id
    everywhere = {
        s.study_instance_uid: s
        for s in [*front.studies, *front.peer_studies]
        if s.study_instance_uid in front.alice_everywhere()
    }
    status, studies = c_find(
        front,
        identifier(
            "STUDY",
            PatientID=alice,
            StudyInstanceUID="",
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
            SOPClassesInStudy="",
        ),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    by_uid = {str(m.StudyInstanceUID): m for m in studies}
    assert set(by_uid) == set(everywhere)
    answered = {
        json_values(m, "StudyInstanceUID")[0]: m for m in qido(front, "studies", PatientID=alice)
    }
    assert set(answered) == set(by_uid)
    for uid, match in by_uid.items():
        sample, other = everywhere[uid], answered[uid]
        assert multi(match.ModalitiesInStudy) == [sample.modality]
        assert multi(match.ModalitiesInStudy) == json_values(other, "ModalitiesInStudy")
        assert int(match.NumberOfStudyRelatedInstances) == len(sample.files)
        assert int(match.NumberOfStudyRelatedSeries) == len(sample.series_instance_uids)
        assert [int(match.NumberOfStudyRelatedInstances)] == json_values(
            other, "NumberOfStudyRelatedInstances"
        )
        assert [int(match.NumberOfStudyRelatedSeries)] == json_values(
            other, "NumberOfStudyRelatedSeries"
        )
        assert multi(match.SOPClassesInStudy) == [MODALITY_SOP_CLASSES[sample.modality]]
    # Series: the Modality and the instance count of each.
    sample = next(s for s in everywhere.values() if len(s.series_instance_uids) > 1)
    status, series = c_find(
        front,
        identifier(
            "SERIES",
            PatientID=alice,
            StudyInstanceUID=sample.study_instance_uid,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    answered_series = {
        json_values(m, "SeriesInstanceUID")[0]: m
        for m in qido(front, f"studies/{sample.study_instance_uid}/series", PatientID=alice)
    }
    per_series = {uid: 0 for uid in sample.series_instance_uids}
    for path in sample.files:
        per_series[str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)] += 1
    assert {str(m.SeriesInstanceUID) for m in series} == set(per_series) == set(answered_series)
    for match in series:
        other = answered_series[str(match.SeriesInstanceUID)]
        assert str(match.Modality) == sample.modality == json_values(other, "Modality")[0]
        assert int(match.NumberOfSeriesRelatedInstances) == per_series[str(match.SeriesInstanceUID)]
        assert json_values(other, "NumberOfSeriesRelatedInstances") == [
            int(match.NumberOfSeriesRelatedInstances)
        ]
    # Instances: their SOP class, and the study's attributes when asked for.
    status, images = c_find(
        front,
        identifier(
            "IMAGE",
            PatientID=alice,
            StudyInstanceUID=sample.study_instance_uid,
            SeriesInstanceUID=sample.series_instance_uids[0],
            SOPInstanceUID="",
            SOPClassUID="",
            ModalitiesInStudy="",
        ),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000 and len(images) == per_series[sample.series_instance_uids[0]]
    for match in images:
        assert str(match.SOPClassUID) == MODALITY_SOP_CLASSES[sample.modality]
        assert multi(match.ModalitiesInStudy) == [sample.modality]
    # Patient: the counts over every study of the patient in the federation.
    status, [patient] = c_find(
        front,
        identifier(
            "PATIENT",
            PatientID=alice,
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
        ),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    assert int(patient.NumberOfPatientRelatedStudies) == len(everywhere)
    assert int(patient.NumberOfPatientRelatedSeries) == sum(
        len(s.series_instance_uids) for s in everywhere.values()
    )
    assert int(patient.NumberOfPatientRelatedInstances) == sum(
        len(s.files) for s in everywhere.values()
    )


def test_c_find_matches_modalities(front: Front) -> None:
    """A workstation's priors by modality: ModalitiesInStudy at the study level (any of a
    list), Modality at the series level."""
    alice = front.studies[0].patient_id
    everywhere = [
        s
        for s in [*front.studies, *front.peer_studies]
        if s.study_instance_uid in front.alice_everywhere()
    ]
    modalities = sorted({s.modality for s in everywhere})
    assert len(modalities) > 1
    for wanted in (modalities[0], "\\".join(modalities[:2])):
        status, matches = c_find(
            front,
            identifier("STUDY", PatientID=alice, StudyInstanceUID="", ModalitiesInStudy=wanted),
            StudyRootQueryRetrieveInformationModelFind,
        )
        assert status == 0x0000
        assert {str(m.StudyInstanceUID) for m in matches} == {
            s.study_instance_uid for s in everywhere if s.modality in wanted.split("\\")
        }
    status, matches = c_find(
        front,
        identifier("SERIES", PatientID=alice, SeriesInstanceUID="", Modality=modalities[-1]),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    assert {str(m.SeriesInstanceUID) for m in matches} == {
        uid for s in everywhere if s.modality == modalities[-1] for uid in s.series_instance_uids
    }


def test_findscu(front: Front) -> None:
    findscu = dcmtk("findscu")
    alice = front.studies[0]
    result = subprocess.run(
        [
            findscu,
            *front.dcmtk_tls(),
            "-S",
            "-aet",
            "AUDIT-DCMTK",
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
    [record] = wait_for_records(front, "110112", "AUDIT-DCMTK")
    assert outcome(record) == "0"
    [query] = objects(record, "110181")
    assert query.get("ParticipantObjectID") == str(StudyRootQueryRetrieveInformationModelFind)


# ----------------------------------------------------------------------------- who may call


def security_alerts(front: Front, ae_title: str) -> list[Any]:
    """Security Alerts (110113) about a refused association from calling AE ``ae_title``."""
    found = []
    for record in front.audit.with_event("110113"):
        details = {
            d.get("type"): base64.b64decode(d.get("value") or "").decode()
            for d in record.iter("ParticipantObjectDetail")
        }
        if details.get("Calling AE Title") == ae_title:
            found.append(record)
    return found


def assert_audited_once(front: Front, ae_title: str) -> Any:
    """Exactly one Security Alert for ``ae_title``: a C-FIND audited after it has arrived, so a
    second alert would have arrived too (the trail sends in order)."""
    assert wait_for(lambda: security_alerts(front, ae_title), timeout=15), front.audit.events()
    before = len(
        [
            r
            for r in front.audit.with_event("110112")
            if any(p.get("UserID") == "AUDIT-AFTER" for p in r.iter("ActiveParticipant"))
        ]
    )
    c_find(
        front,
        identifier("STUDY", PatientID=front.studies[0].patient_id, StudyInstanceUID=""),
        StudyRootQueryRetrieveInformationModelFind,
        ae_title="AUDIT-AFTER",
    )
    wait_for_records(front, "110112", "AUDIT-AFTER", count=before + 1)
    [alert] = security_alerts(front, ae_title)
    assert not schema_errors(alert), schema_errors(alert)
    return alert


def rejected_as_unknown_calling_ae(assoc: Any) -> bool:
    """A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognized."""
    answer = assoc.acceptor.primitive
    return bool(
        assoc.is_rejected
        and (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
    )


def test_unknown_calling_ae_is_rejected_and_audited_once(front: Front) -> None:
    """A trusted certificate (the test client's) with an AE title the policy does not tie to
    it: no association, one Security Alert naming the verified certificate and the AE."""
    assoc = request_association(
        front, StudyRootQueryRetrieveInformationModelFind, ae_title="INTRUDER"
    )
    assert not assoc.is_established and rejected_as_unknown_calling_ae(assoc)
    alert = assert_audited_once(front, "INTRUDER")
    ident = alert.find("EventIdentification")
    assert ident.find("EventTypeCode").get("csd-code") == "110132"  # Use of Restricted Function
    requester = next(
        p for p in alert.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"
    )
    assert "consumer" in (requester.get("UserID") or "")  # the client certificate's subject
    assert requester.get("NetworkAccessPointID") == "127.0.0.1"
    assert "DIMSE" in (ident.findtext("EventOutcomeDescription") or "")


def test_calling_ae_bound_to_another_identity_is_rejected(front: Front) -> None:
    """AE titles are tied to a certificate or an address: the loopback workstation's AE title
    over TLS with the client's certificate, and the client's AE title in plain from loopback,
    are both refused."""
    over_tls = request_association(
        front, StudyRootQueryRetrieveInformationModelFind, ae_title="PLAINSCU"
    )
    assert not over_tls.is_established and rejected_as_unknown_calling_ae(over_tls)
    in_plain = request_association(
        front, StudyRootQueryRetrieveInformationModelFind, ae_title="TESTSCU", plain=True
    )
    assert not in_plain.is_established and rejected_as_unknown_calling_ae(in_plain)
    alert = assert_audited_once(front, "TESTSCU")
    # No certificate: the claimed AE title is marked as such, the address is what was verified.
    requester = next(
        p for p in alert.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"
    )
    assert requester.get("UserID") == "127.0.0.1"
    assert "unverified" in (requester.get("UserName") or "")


def test_untrusted_certificate_is_refused_at_the_handshake(front: Front) -> None:
    refused_before = len(front.gateway.handshake_failures)
    assoc = request_association(
        front,
        StudyRootQueryRetrieveInformationModelFind,
        tls=front.client_tls(front.pki.untrusted_client),
    )
    assert not assoc.is_established
    assert wait_for(lambda: len(front.gateway.handshake_failures) > refused_before, timeout=15)
    failure = front.gateway.handshake_failures[refused_before]
    assert "certificate verification failed" in failure.reason
    assert failure.certificate_subject is not None and "untrusted" in failure.certificate_subject
    # ... reported as a Security Alert (Node Authentication) like refused HTTPS handshakes.
    assert wait_for(
        lambda: any(
            t.get("csd-code") == "110126"
            for r in front.audit.with_event("110113")
            for t in r.iter("EventTypeCode")
        ),
        timeout=15,
    )


@pytest.mark.parametrize("who", ["no certificate", "TLS 1.1"])
def test_handshakes_below_the_floor_are_refused(front: Front, who: str) -> None:
    """Mutual TLS, TLS 1.2 floor, as on the HTTPS port: no client certificate, or TLS 1.1."""
    refused_before = len(front.gateway.handshake_failures)
    if who == "no certificate":
        ctx = client_context(front.pki.ca)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(front.pki.ca))
        ctx.load_cert_chain(str(front.pki.client.cert), str(front.pki.client.key))
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    assoc = request_association(front, StudyRootQueryRetrieveInformationModelFind, tls=ctx)
    assert not assoc.is_established
    assert wait_for(lambda: len(front.gateway.handshake_failures) > refused_before, timeout=15)
    reason = front.gateway.handshake_failures[refused_before].reason
    assert ("no certificate" if who == "no certificate" else "protocol version") in reason


def test_a_silent_connection_does_not_hold_up_other_associations(front: Front) -> None:
    """The TLS handshake runs in the connection's own thread: a client that connects and
    never speaks leaves the door answering everyone else."""
    with socket.create_connection(("127.0.0.1", front.port)):
        status, matches = c_find(
            front,
            identifier("STUDY", PatientID=front.studies[0].patient_id, StudyInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind,
        )
        assert status == 0x0000 and matches


def test_plain_dimse_is_refused_by_the_tls_door(front: Front) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", front.port, ae_title=FRONT_AE)
    assert not assoc.is_established


def test_plain_dimse_on_loopback_when_configured(front: Front) -> None:
    """tls = false on a loopback address: a workstation of this host, its AE title tied to
    the address, queries without a certificate."""
    alice = front.studies[0]
    status, matches = c_find(
        front,
        identifier("STUDY", PatientID=alice.patient_id, StudyInstanceUID=""),
        StudyRootQueryRetrieveInformationModelFind,
        ae_title="PLAINSCU",
        plain=True,
    )
    assert status == 0x0000
    assert {m.StudyInstanceUID for m in matches} == front.alice_everywhere()


def test_a_study_named_alone_is_served_only_to_the_caller_whose_search_found_it(
    front: Front,
) -> None:
    """The test client's C-FIND found carol's study; another workstation (the loopback one,
    which never searched for carol) naming it by UID alone gets nothing; naming the patient,
    it does."""
    study = next(s for s in front.studies if s.patient_id == local_patient_id(0, 2))
    status, _ = c_find(
        front,
        identifier("STUDY", PatientID=study.patient_id, StudyInstanceUID=""),
        StudyRootQueryRetrieveInformationModelFind,
    )
    assert status == 0x0000
    alone = identifier("SERIES", StudyInstanceUID=study.study_instance_uid, SeriesInstanceUID="")
    status, matches = c_find(
        front, alone, StudyRootQueryRetrieveInformationModelFind, ae_title="PLAINSCU", plain=True
    )
    assert status == 0xA900 and not matches
    status, matches = c_find(front, alone, StudyRootQueryRetrieveInformationModelFind)
    assert status == 0x0000 and len(matches) == len(study.series_instance_uids)
    named = identifier(
        "SERIES",
        PatientID=study.patient_id,
        StudyInstanceUID=study.study_instance_uid,
        SeriesInstanceUID="",
    )
    status, matches = c_find(
        front, named, StudyRootQueryRetrieveInformationModelFind, ae_title="PLAINSCU", plain=True
    )
    assert status == 0x0000 and len(matches) == len(study.series_instance_uids)


def test_the_association_caller_is_the_current_caller_downstream(front: Front) -> None:
    """While a C-FIND runs on the gateway's loop, the local caller the association was
    admitted as is the current caller (what the initiating side audits and asserts)."""

    door = front.gateway.dicom_front
    assert door is not None
    seen: list[str | None] = []
    original = door.view.find_manifests

    async def spy(patient_id: str) -> Any:
        caller = current_caller()
        seen.append(caller.name if caller is not None else None)
        return await original(patient_id)

    door.view.find_manifests = spy  # type: ignore[method-assign]
    try:
        status, _ = c_find(
            front,
            identifier("STUDY", PatientID=front.studies[0].patient_id, StudyInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind,
        )
    finally:
        del door.view.find_manifests
    assert status == 0x0000 and seen == ["test-client"]


# ----------------------------------------------------------------------------- C-GET / C-MOVE


def c_get(
    front: Front,
    ds: Dataset,
    *,
    ae_title: str = "TESTSCU",
    store_status: Callable[[Dataset], int] = lambda ds: 0x0000,
) -> tuple[list[tuple[Dataset, Dataset | None]], dict[str, Dataset]]:
    """A Study Root C-GET; (every C-GET response, the instances received by C-STORE).
    ``store_status`` answers each C-STORE (a failure status: the instance is not kept)."""
    received: dict[str, Dataset] = {}

    def on_store(event: Any) -> int:
        instance = event.dataset
        instance.file_meta = event.file_meta
        status = store_status(instance)
        if status == 0x0000:
            received[str(instance.SOPInstanceUID)] = instance
        return status

    contexts: list[Any] = [StudyRootQueryRetrieveInformationModelGet]
    roles: list[Any] = []
    for context in StoragePresentationContexts[:120]:
        contexts.append(str(context.abstract_syntax))
        roles.append(build_role(str(context.abstract_syntax), scp_role=True))
    assoc = associate(
        front,
        *contexts,
        roles=roles,
        ae_title=ae_title,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        results = list(assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return results, received


def test_c_get_with_pynetdicom_returns_identical_instances(front: Front) -> None:
    study = front.studies[0]
    results, received = c_get(
        front,
        identifier("STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid),
    )
    assert int(results[-1][0].Status) == 0x0000
    assert len(received) == len(study.files)
    for path in study.files:
        source = dcmread(path)
        got = received[str(source.SOPInstanceUID)]
        assert got.PixelData == source.PixelData


def test_getscu(front: Front, tmp_path: Path) -> None:
    getscu = dcmtk("getscu")
    # Alice's study in beta, asked for with her alpha id: ITI-18 → ITI-38, RAD-69 → RAD-75.
    study = next(s for s in front.peer_studies if s.patient_id == local_patient_id(1, 0))
    out = tmp_path / "get"
    out.mkdir()
    result = subprocess.run(
        [
            getscu,
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
            # dcmtk's getscu has no TLS: the plain door on loopback, as GETSCU from this host.
            str(front.plain_port),
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
    movescu = dcmtk("movescu")
    dcmtk("storescp")  # the move destination the front fixture started
    study = front.studies[1]
    result = subprocess.run(
        [
            movescu,
            "-S",
            "-aet",
            "AUDIT-MOVE",
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
            # dcmtk's movescu has no TLS: the plain door on loopback.
            str(front.plain_port),
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
    # Audited from us to the move destination, the requester named beside them.
    [record] = wait_for_records(front, "110104", "AUDIT-MOVE")
    assert outcome(record) == "0"
    assert participant(record, "110153").get("UserID") == FRONT_AE
    destination = participant(record, "110152")
    assert (destination.get("UserID"), destination.get("UserIsRequestor")) == (STORE_AE, "false")
    requester = participant(record, None)
    assert (requester.get("UserID"), requester.get("UserIsRequestor")) == ("AUDIT-MOVE", "true")
    assert instance_uids(record) == {uid_of(p) for p in study.files}


def test_c_move_over_dicom_tls_to_a_tls_destination(front: Front) -> None:
    """DICOM TLS at both ends: the workstation's C-MOVE reaches the door with its certificate,
    the door opens the association to the destination with the gateway's certificate."""
    dcmtk("storescp")  # the move destination the front fixture started
    study = front.studies[3]
    assoc = associate(front, StudyRootQueryRetrieveInformationModelMove, ae_title="AUDIT-MOVE-TLS")
    try:
        results = list(
            assoc.send_c_move(
                identifier(
                    "STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid
                ),
                STORE_TLS_AE,
                StudyRootQueryRetrieveInformationModelMove,
            )
        )
    finally:
        assoc.release()
    assert int(results[-1][0].Status) == 0x0000, results[-1]
    by_uid = {str(dcmread(f).SOPInstanceUID): f for f in front.store_tls_dir.iterdir()}
    assert set(by_uid) == {uid_of(p) for p in study.files}
    for path in study.files:
        assert pixel_identical(by_uid[uid_of(path)], path)
    [record] = wait_for_records(front, "110104", "AUDIT-MOVE-TLS")
    assert outcome(record) == "0"


# ----------------------------------------------------------------------------- byte for byte


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's dataset, as a C-STORE carries it (the file meta left out)."""
    return split_meta(path.read_bytes())[1]


def stored_syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def compressed_study(studies: list[SampleStudy]) -> SampleStudy:
    return next(s for s in studies if s.transfer_syntax_uid == RLE_LOSSLESS)


def c_get_raw(
    front: Front, study: SampleStudy, proposals: list[list[str]], *, ae_title: str = "TESTSCU"
) -> tuple[Dataset, dict[str, tuple[str, bytes]]]:
    """A Study Root C-GET of ``study`` proposing, for its SOP class, one presentation context
    per list of transfer syntaxes; the final status and, per instance received, the transfer
    syntax of its context and the dataset bytes as they came on the wire."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            event.request.DataSet.getvalue(),
        )
        return 0x0000

    sop_class = MODALITY_SOP_CLASSES[study.modality]
    assoc = associate(
        front,
        StudyRootQueryRetrieveInformationModelGet,
        *((sop_class, syntaxes) for syntaxes in proposals),
        roles=[build_role(sop_class, scp_role=True)],
        ae_title=ae_title,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        results = list(
            assoc.send_c_get(
                # A peer's study is asked for with the patient's id here (alice's).
                identifier(
                    "STUDY",
                    PatientID=study.patient_id
                    if study in front.studies
                    else local_patient_id(0, 0),
                    StudyInstanceUID=study.study_instance_uid,
                ),
                StudyRootQueryRetrieveInformationModelGet,
            )
        )
    finally:
        assoc.release()
    return results[-1][0], received


@pytest.mark.parametrize("where", ["local", "local-compressed", "peer-compressed"])
def test_c_get_sends_each_instance_as_stored_byte_for_byte(front: Front, where: str) -> None:
    """The SCU offers native (Explicit VR first) and RLE Lossless: every instance arrives in
    the syntax it is stored in, its dataset the source's to the byte (private attributes with
    their VRs), from this community's source and through RAD-75 from the peer's."""
    study = {
        "local": front.studies[0],
        "local-compressed": compressed_study(front.studies),
        "peer-compressed": compressed_study(front.peer_studies),
    }[where]
    final, received = c_get_raw(
        front, study, [[EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN], [RLE_LOSSLESS]]
    )
    assert final.Status == 0x0000
    assert set(received) == {uid_of(p) for p in study.files}
    for path in study.files:
        syntax, data = received[uid_of(path)]
        assert syntax == stored_syntax(path) == study.transfer_syntax_uid
        assert data == dataset_bytes(path)
    # Private attributes kept their VRs (an Implicit VR detour would have made them UN).
    sample = read_dataset(io.BytesIO(received[uid_of(study.files[0])][1]), False, True)
    block = sample.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert [block[o].VR for o in (0x10, 0x11, 0x12, 0x13, 0x14)] == ["LO", "DS", "US", "FD", "SQ"]


def test_c_get_takes_the_scus_first_proposal_and_converts_losslessly(front: Front) -> None:
    """One context [Implicit, Explicit]: the SCU's first choice is what the door accepts; an
    RLE instance it did not offer RLE for arrives decoded, the same pixels."""
    study = compressed_study(front.studies)
    final, received = c_get_raw(
        front, study, [[IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN]]
    )
    assert final.Status == 0x0000 and set(received) == {uid_of(p) for p in study.files}
    for path in study.files:
        syntax, data = received[uid_of(path)]
        assert syntax == IMPLICIT_VR_LITTLE_ENDIAN
        got = read_dataset(io.BytesIO(data), True, True)
        native = dcmread(io.BytesIO(transcode(path.read_bytes(), EXPLICIT_VR_LITTLE_ENDIAN)))
        assert got.PixelData == native.PixelData
    # Explicit VR first: Explicit VR.
    study = front.studies[0]
    final, received = c_get_raw(
        front, study, [[EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]]
    )
    assert final.Status == 0x0000
    assert {syntax for syntax, _ in received.values()} == {EXPLICIT_VR_LITTLE_ENDIAN}


def test_c_get_refuses_an_instance_the_scu_accepted_no_syntax_for(front: Front) -> None:
    """Only JPEG 2000 offered: the native instances cannot be encoded into it (the gateway
    has no such encoder): the federation says so, and the C-GET fails with that reason."""
    study = front.studies[0]
    final, received = c_get_raw(front, study, [[JPEG_2000_LOSSLESS]])
    assert final.Status == 0xA702 and not received  # Refused: unable to perform sub-operations
    assert "cannot encode" in final.ErrorComment


@pytest.mark.parametrize("compressed", [False, True])
def test_getscu_receives_the_source_bytes(front: Front, tmp_path: Path, compressed: bool) -> None:
    getscu = dcmtk("getscu")
    study = compressed_study(front.peer_studies) if compressed else front.peer_studies[0]
    out = tmp_path / "get"
    out.mkdir()
    result = subprocess.run(
        [
            *(getscu, "-S", "+B", *(["+xr"] if compressed else [])),
            *("-aec", FRONT_AE, "-od", str(out)),
            *(
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study.study_instance_uid}",
            ),
            *("-k", f"PatientID={local_patient_id(0, 0)}"),
            *("127.0.0.1", str(front.plain_port)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    by_uid = {uid_of(f): f for f in out.iterdir()}
    assert set(by_uid) == {uid_of(p) for p in study.files}
    for path in study.files:
        got = by_uid[uid_of(path)]
        assert stored_syntax(got) == stored_syntax(path)
        assert dataset_bytes(got) == dataset_bytes(path)


def test_c_move_sends_compressed_instances_as_stored(front: Front) -> None:
    """The C-MOVE proposes native and compressed contexts for the study's SOP class; the
    destination (storescp, every syntax, bit-preserving) accepted RLE: the instances arrive
    compressed, byte for byte, over DICOM TLS."""
    dcmtk("storescp")  # the move destination the front fixture started
    study = compressed_study(front.peer_studies)
    assoc = associate(front, StudyRootQueryRetrieveInformationModelMove, ae_title="AUDIT-MOVE-TLS")
    try:
        results = list(
            assoc.send_c_move(
                identifier(
                    "STUDY",
                    PatientID=local_patient_id(0, 0),
                    StudyInstanceUID=study.study_instance_uid,
                ),
                STORE_TLS_AE,
                StudyRootQueryRetrieveInformationModelMove,
            )
        )
    finally:
        assoc.release()
    assert int(results[-1][0].Status) == 0x0000, results[-1]
    by_uid = {uid_of(f): f for f in front.store_tls_dir.iterdir()}
    for path in study.files:
        got = by_uid[uid_of(path)]
        assert stored_syntax(got) == RLE_LOSSLESS
        assert dataset_bytes(got) == dataset_bytes(path)


def test_move_to_an_unknown_destination_is_refused(front: Front) -> None:
    study = front.studies[0]
    assoc = associate(front, PatientRootQueryRetrieveInformationModelMove, ae_title="AUDIT-NOWHERE")
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
    # Nothing was transferred, so no transfer is audited. A C-FIND from the same AE afterwards
    # is: had a record been written for the refused move, it would be in by then (the trail
    # sends in order).
    c_find(
        front,
        identifier("STUDY", PatientID=study.patient_id, StudyInstanceUID=""),
        PatientRootQueryRetrieveInformationModelFind,
        ae_title="AUDIT-NOWHERE",
    )
    wait_for_records(front, "110112", "AUDIT-NOWHERE")
    assert not [
        r
        for r in front.audit.with_event("110104")
        if any(p.get("UserID") == "AUDIT-NOWHERE" for p in r.iter("ActiveParticipant"))
    ]


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


# ----------------------------------------------------------------------------- audit


def wait_for_records(front: Front, event_id: str, ae_title: str, count: int = 1) -> list[Any]:
    """The ``event_id`` records naming ``ae_title`` as a participant, once ``count`` are in;
    each is checked against the DICOM audit schema."""

    def found() -> list[Any]:
        return [
            r
            for r in front.audit.with_event(event_id)
            if any(p.get("UserID") == ae_title for p in r.iter("ActiveParticipant"))
        ]

    assert wait_for(lambda: len(found()) >= count, timeout=15), front.audit.events()
    records = found()
    for record in records:
        assert not schema_errors(record), schema_errors(record)
    return records


def outcome(record: Any) -> str:
    return str(record.find("EventIdentification").get("EventOutcomeIndicator"))


def participant(record: Any, role: str | None) -> Any:
    """The ActiveParticipant with RoleIDCode ``role`` (None: the one without a role)."""
    for p in record.iter("ActiveParticipant"):
        roles = [c.get("csd-code") for c in p.iter("RoleIDCode")]
        if (role in roles) if role is not None else not roles:
            return p
    raise AssertionError(f"no participant with role {role}: {etree.tostring(record)[:500]!r}")


def objects(record: Any, id_type: str) -> list[Any]:
    return [
        o
        for o in record.iter("ParticipantObjectIdentification")
        if o.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type
    ]


def instance_uids(record: Any) -> set[str]:
    return {str(i.get("UID")) for i in record.iter("Instance")}


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_transfer_audits_give_each_study_its_outcome() -> None:
    ctx = m.AuditContext(m.AuditSource("alpha-dicom"), host="alpha")

    def doc(study: str, n: int) -> DocumentRequest:
        return DocumentRequest(study, f"{study}.1", "1.2.9", f"{study}.1.{n}", "urn:oid:1.2.8")

    whole, partial, none = (
        [doc("1.2.3.1", n) for n in (1, 2)],
        [doc("1.2.3.2", n) for n in (1, 2)],
        [doc("1.2.3.3", n) for n in (1, 2)],
    )
    messages = transfer_audits(
        ctx,
        documents=[*whole, *partial, *none],
        sop_classes={d.document_unique_id: "1.2.840.10008.5.1.4.1.1.2" for d in whole},
        delivered={d.document_unique_id for d in [*whole, partial[0]]},
        failures={partial[1].document_unique_id: "C-STORE status 0xA700"},
        source=m.Node(FRONT_AE, "alpha"),
        destination=m.Node(STORE_AE, "10.0.0.5"),
        requester=m.Node("WS1", "10.0.0.9"),
        patient_ids=["P1^^^&1.2.7&ISO"],
        unresolved={"1.2.3.4": "federation query failed", "1.2.3.1": "ignored: it has documents"},
    )
    got = {
        msg.objects[-1].object_id: (msg.outcome, msg.event.outcome_description) for msg in messages
    }
    assert got == {
        "1.2.3.4": (8, "no instance transferred: federation query failed"),
        "1.2.3.1": (0, None),
        "1.2.3.2": (4, "1 of 2 instance(s) not transferred: C-STORE status 0xA700"),
        "1.2.3.3": (8, "no instance transferred: not transferred"),
    }
    for message in messages:
        assert not schema_errors(message), schema_errors(message)
        assert message.event.event_id == m.EventId.DICOM_INSTANCES_TRANSFERRED


def test_c_find_is_audited_as_a_query(front: Front) -> None:
    alice = front.studies[0].patient_id
    status, _ = c_find(
        front,
        identifier("STUDY", PatientID=alice, IssuerOfPatientID=AUTHORITY, StudyInstanceUID=""),
        PatientRootQueryRetrieveInformationModelFind,
        ae_title="AUDIT-FIND",
    )
    assert status == 0x0000
    [record] = wait_for_records(front, "110112", "AUDIT-FIND")
    ident = record.find("EventIdentification")
    assert (ident.get("EventActionCode"), outcome(record)) == ("E", "0")
    assert ident.find("EventTypeCode") is None  # DICOM A.5.3.12 names none
    source = participant(record, "110153")
    assert (source.get("UserID"), source.get("UserIsRequestor")) == ("AUDIT-FIND", "true")
    assert (source.get("NetworkAccessPointID"), source.get("NetworkAccessPointTypeCode")) == (
        "127.0.0.1",
        "2",
    )
    destination = participant(record, "110152")
    assert (destination.get("UserID"), destination.get("UserIsRequestor")) == (FRONT_AE, "false")
    [patient] = objects(record, "2")
    assert patient.get("ParticipantObjectID") == f"{alice}^^^&{AUTHORITY}&ISO"
    # The SOP class queried, with the identifier as it came on the wire.
    [query] = objects(record, "110181")
    assert query.get("ParticipantObjectID") == str(PatientRootQueryRetrieveInformationModelFind)
    assert query.get("ParticipantObjectTypeCode") == "2"
    details = {
        d.get("type"): base64.b64decode(d.get("value")).decode()
        for d in query.iter("ParticipantObjectDetail")
    }
    syntax = UID(details["TransferSyntax"])
    sent = read_dataset(
        io.BytesIO(base64.b64decode(query.findtext("ParticipantObjectQuery") or "")),
        is_implicit_VR=syntax.is_implicit_VR,
        is_little_endian=syntax.is_little_endian,
    )
    assert (sent.QueryRetrieveLevel, sent.PatientID) == ("STUDY", alice)
    assert "StudyInstanceUID" in sent


def test_refused_c_find_is_audited_as_a_minor_failure(front: Front) -> None:
    status, _ = c_find(
        front,
        identifier("FRAME", PatientID=front.studies[0].patient_id),
        PatientRootQueryRetrieveInformationModelFind,
        ae_title="AUDIT-BADFIND",
    )
    assert status == 0xA900
    [record] = wait_for_records(front, "110112", "AUDIT-BADFIND")
    assert outcome(record) == "4"
    assert "QueryRetrieveLevel" in (
        record.findtext("EventIdentification/EventOutcomeDescription") or ""
    )


def test_c_get_is_audited_per_study_from_the_c_store_answers(front: Front) -> None:
    study = front.studies[3]
    first = uid_of(study.files[0])
    ask = identifier("STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid)
    # Everything stored: success.
    results, received = c_get(front, ask, ae_title="AUDIT-GET")
    assert int(results[-1][0].Status) == 0x0000 and len(received) == len(study.files)
    [record] = wait_for_records(front, "110104", "AUDIT-GET")
    assert record.find("EventIdentification").get("EventActionCode") == "R"
    assert outcome(record) == "0"
    source = participant(record, "110153")
    assert (source.get("UserID"), source.get("UserIsRequestor")) == (FRONT_AE, "false")
    destination = participant(record, "110152")
    assert (destination.get("UserID"), destination.get("UserIsRequestor")) == ("AUDIT-GET", "true")
    assert destination.get("NetworkAccessPointID") == "127.0.0.1"
    [patient] = objects(record, "2")
    assert patient.get("ParticipantObjectID") == f"{study.patient_id}^^^&{AUTHORITY}&ISO"
    [study_object] = objects(record, "110180")
    assert study_object.get("ParticipantObjectID") == study.study_instance_uid
    counts = {c.get("UID"): int(c.get("NumberOfInstances")) for c in study_object.iter("SOPClass")}
    assert counts == {str(dcmread(study.files[0]).SOPClassUID): len(study.files)}
    assert instance_uids(record) == {uid_of(p) for p in study.files}

    # The workstation refuses one C-STORE: minor failure, the stored ones listed.
    results, received = c_get(
        front,
        ask,
        ae_title="AUDIT-GET-SOME",
        store_status=lambda ds: 0xA700 if str(ds.SOPInstanceUID) == first else 0x0000,
    )
    assert int(results[-1][0].Status) == 0xB000
    [record] = wait_for_records(front, "110104", "AUDIT-GET-SOME")
    assert outcome(record) == "4"
    assert instance_uids(record) == {uid_of(p) for p in study.files} - {first}
    assert "0xA700" in (record.findtext("EventIdentification/EventOutcomeDescription") or "")

    # It refuses them all: serious failure.
    results, received = c_get(front, ask, ae_title="AUDIT-GET-NONE", store_status=lambda ds: 0xA700)
    assert int(results[-1][0].Status) == 0xA702 and not received
    [record] = wait_for_records(front, "110104", "AUDIT-GET-NONE")
    assert outcome(record) == "8"


def test_malformed_instance_from_the_source_is_not_stored(front: Front, tmp_path: Path) -> None:
    # Runs last in this module: it damages one source file.
    study = front.studies[2]
    victim = study.files[0]
    victim_uid = str(dcmread(victim, stop_before_pixels=True).SOPInstanceUID)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # cut inside the Pixel Data
    try:
        results, received = c_get(
            front,
            identifier(
                "STUDY", PatientID=study.patient_id, StudyInstanceUID=study.study_instance_uid
            ),
            ae_title="AUDIT-CUT",
        )
    finally:
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
    # The transfer is audited as partly failed, the refused instance named as not sent.
    [record] = wait_for_records(front, "110104", "AUDIT-CUT")
    assert outcome(record) == "4"
    assert "1 of" in (record.findtext("EventIdentification/EventOutcomeDescription") or "")
    assert instance_uids(record) == {uid_of(p) for p in study.files[1:]}


def test_connections_per_source_are_capped_before_the_handshake(front: Front) -> None:
    """Issue #16: connections are admitted at accept, before DICOM TLS, per source address;
    another source is served meanwhile."""
    door = front.gateway.dicom_front
    assert door is not None and door._server is not None
    server = door._server
    saved = server.max_connections_per_source
    server.max_connections_per_source = 2
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            held.append(
                socket.create_connection(
                    ("127.0.0.1", front.port), timeout=10, source_address=("127.0.0.2", 0)
                )
            )
        assert wait_for(lambda: sum(server._admitting.values()) == 2)
        third = socket.create_connection(
            ("127.0.0.1", front.port), timeout=10, source_address=("127.0.0.2", 0)
        )
        with third, contextlib.suppress(ConnectionError):
            assert third.recv(10) == b""  # closed at once, before any handshake
        status, _ = c_find(
            front,
            identifier("STUDY", PatientID=front.studies[0].patient_id, StudyInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind,
        )
        assert status == 0x0000
    finally:
        server.max_connections_per_source = saved
        for sock in held:
            sock.close()
