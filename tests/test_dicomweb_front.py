"""The DICOMweb front door: QIDO-RS / WADO-RS against real gateways with registered studies.

Two communities are seeded as the demo does it (alpha, whose door is tested, and beta, reached
through ITI-38 / ITI-39 / RAD-75, alice's ids mapped by a cross-reference table), then queried
and retrieved with the dicomweb-client package over mutual TLS, and with raw requests where
the bytes on the wire matter. Alpha audits over syslog UDP to a socket the test reads.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import ssl
import tempfile
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.audit_inbox import AuditInbox
from tests.communities import ARC, seed_community
from tests.conftest import GatewayThread, make_config, policy_for_tests, policy_toml, wait_for
from tests.test_dicom_front import AUTHORITY
from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit import messages as audit_messages
from xca_gateway.audit.validate import schema_errors
from xca_gateway.consumer.imaging import Manifest
from xca_gateway.doors.dicomweb import (
    ANY_TRANSFER_SYNTAX,
    ConfigError,
    DicomWebError,
    QidoQuery,
    Route,
    metadata_json,
    negotiate_json,
    negotiate_transfer_syntaxes,
    parse_dicomweb_front_config,
    parse_qido,
    parse_route,
    qido_audit,
    retrieve_failure,
    search,
    to_dicom_json,
    wado_audit,
)
from xca_gateway.doors.dicomweb import door as dicomweb_door
from xca_gateway.doors.federation import InMemoryStudyAccess, StudyGrant, StudyManifest
from xca_gateway.doors.viewer.pages import ViewerPages
from xca_gateway.imaging.rendering import RenderOptions, render_frame
from xca_gateway.imaging.transfer_syntax import TRANSFER_SYNTAX_ERROR
from xca_gateway.protocol.http_server import PeerInfo, Request
from xca_gateway.security.callers import (
    Identity,
    Principal,
    Role,
    current_caller,
    reset_current_caller,
    set_current_caller,
)
from xca_gateway.security.dev_pki import CertPair, DevPki, issue_client_certificate
from xca_gateway.settings import ConfigError as GatewayConfigError
from xca_gateway.tools.dicom_samples import (
    SamplePatient,
    SampleStudy,
    generate_study,
    local_patient_id,
)
from xca_gateway.xds.ebrs import RegistryError
from xca_gateway.xds.kos import build_kos, kos_references, kos_to_bytes

EXPLICIT = "1.2.840.10008.1.2.1"
BIG_PATIENT = "BIG-1"
MULTI_PATIENT = "MULTI-1"


def make_multiframe(path: Path, frames: int) -> None:
    """Rewrite a single-frame native instance as ``frames`` frames, frame k = (k+1) x pixels."""
    import numpy as np

    ds = dcmread(path)
    pixels = ds.pixel_array.astype(np.uint16)
    ds.NumberOfFrames = frames
    ds.PixelData = np.stack([pixels // (k + 1) for k in range(frames)]).tobytes()
    ds.save_as(path, enforce_file_format=True)


# Extra callers (client certificates from the dev PKI's CA): two more local consumers, an
# interface engine (a local system, but not a consumer) and a trusted certificate the access
# policy does not name.
OTHER_CONSUMER, THIRD_CONSUMER = "consumer-b", "consumer-c"
ENGINE, STRANGER = "engine", "stranger"


def door_policy() -> str:
    policy = policy_for_tests()
    policy["callers"] = [
        *policy["callers"],
        {
            "name": "second-consumer",
            "roles": ["local-consumer"],
            "certificate_uris": [f"urn:xca-gateway:client:{OTHER_CONSUMER}"],
        },
        {
            "name": "third-consumer",
            "roles": ["local-consumer"],
            "certificate_uris": [f"urn:xca-gateway:client:{THIRD_CONSUMER}"],
        },
        {
            "name": "order-feed",
            "roles": ["interface-engine"],
            "certificate_uris": [f"urn:xca-gateway:client:{ENGINE}"],
        },
    ]
    return policy_toml(policy)


# ----------------------------------------------------------------------------- fixture


@dataclass
class Web:
    url: str  # the service root, https://127.0.0.1:port/dicomweb
    pki: DevPki
    alpha: Gateway
    studies: list[SampleStudy]  # alpha's own
    peer_studies: list[SampleStudy]  # beta's
    big: SampleStudy  # a larger study of BIG_PATIENT at alpha
    multi: SampleStudy  # MULTI_PATIENT's one multi-frame instance at alpha
    audit: AuditInbox
    threads: list[GatewayThread] = field(default_factory=list)

    def session(self, identity: CertPair | None = None) -> requests.Session:
        """A client with the dev PKI's consumer certificate, or with ``identity``."""
        pair = identity or self.pki.client
        session = requests.Session()
        # Environment CA bundles (REQUESTS_CA_BUNDLE) would override the session's trust.
        session.trust_env = False
        session.cert = (str(pair.cert), str(pair.key))
        session.verify = str(self.pki.ca)
        return session

    def session_as(self, label: str) -> requests.Session:
        return self.session(issue_client_certificate(self.pki, label))

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.url, session=self.session())

    def alice_studies(self) -> set[str]:
        return {
            s.study_instance_uid
            for s in [*self.studies, *self.peer_studies]
            if s.patient_id in (local_patient_id(0, 0), local_patient_id(1, 0))
        }


@pytest.fixture(scope="module")
def web(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    tmp = tmp_path_factory.mktemp("dicomweb-front")
    audit = AuditInbox()
    beta_config, beta_studies = seed_community(tmp, pki, "beta", 1)
    threads = [GatewayThread(load_config(beta_config))]
    try:
        beta = threads[0].__enter__()
        xref = tmp / "xref.csv"
        xref.write_text(
            f"{local_patient_id(0, 0)}^^^&{ARC}.20.1000&ISO,"
            f"{local_patient_id(1, 0)}^^^&{ARC}.20.2000&ISO\n"
        )
        # A larger study (about 21 MB) for the memory test, imported with alpha's samples.
        big = generate_study(
            tmp / "alpha" / "images" / "big",
            patient=SamplePatient("eve", "Stor", "Eve", "19700101", "F"),
            patient_id=BIG_PATIENT,
            issuer_oid=AUTHORITY,
            modality="CT",
            body_part="CHEST",
            study_date=date(2024, 5, 6),
            institution="Alpha",
            accession_number="BIG0001",
            uid_root=f"{ARC}.90.77",
            series_count=1,
            instances_per_series=40,
            rows=512,
            columns=512,
            seed=7,
        )
        # One multi-frame instance (three different frames) of another patient, for renderings.
        multi = generate_study(
            tmp / "alpha" / "images" / "multi",
            patient=SamplePatient("max", "Ram", "Max", "19800101", "M"),
            patient_id=MULTI_PATIENT,
            issuer_oid=AUTHORITY,
            modality="CT",
            body_part="HEAD",
            study_date=date(2024, 6, 7),
            institution="Alpha",
            accession_number="MUL0001",
            uid_root=f"{ARC}.90.78",
            series_count=1,
            instances_per_series=1,
            seed=8,
        )
        make_multiframe(multi.files[0], frames=3)
        extra = f"""
[patient_mapping]
xref_csv = "{xref}"

[[peers]]
name = "beta"
home_community_id = "urn:oid:{ARC}.70.2"
iti38 = "{beta.base_url}/xca/iti38"
iti39 = "{beta.base_url}/xca/iti39"
rad75 = "{beta.base_url}/xca/rad75"
patient_id_assigning_authority = "{ARC}.20.2000"

[dicomweb]
host = "127.0.0.1"
port = 0

{audit.toml("alpha-dicomweb")}
{door_policy()}
"""
        alpha_config, studies = seed_community(tmp, pki, "alpha", 0, extra)
        threads.append(GatewayThread(load_config(alpha_config)))
        alpha = threads[1].__enter__()
        assert alpha.dicomweb_front is not None
        port = alpha.listening()["dicomweb"]
        yield Web(
            f"https://127.0.0.1:{port}/dicomweb",
            pki,
            alpha,
            studies,
            beta_studies,
            big,
            multi,
            audit,
            threads,
        )
    finally:
        for thread in reversed(threads):
            if thread.gateway is not None:
                thread.__exit__(None, None, None)
        audit.close()


def multipart_parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of a multipart/related response, parsed strictly."""
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"')
    boundary = content_type.rsplit("boundary=", 1)[1].strip('"').encode()
    data = response.content
    assert data.startswith(b"--" + boundary + b"\r\n"), data[:100]
    segments = (b"\r\n" + data).split(b"\r\n--" + boundary)
    assert segments[0] == b"" and segments[-1] == b"--\r\n"
    parts = []
    for segment in segments[1:-1]:
        assert segment.startswith(b"\r\n")
        head, _, body = segment[2:].partition(b"\r\n\r\n")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.decode().split("\r\n"))
        )
        parts.append((headers["content-type"], body))
    return parts


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


# ----------------------------------------------------------------------------- pure parts


def test_config_parses_and_rejects_bad_tables() -> None:
    config = parse_dicomweb_front_config({"port": 0})
    assert (config.host, config.port, config.tls) == ("127.0.0.1", 0, True)
    assert parse_dicomweb_front_config({"tls": False, "host": "localhost"}).tls is False
    assert config.study_access_seconds == 3600
    assert parse_dicomweb_front_config({"study_access_seconds": 60}).study_access_seconds == 60
    with pytest.raises(ConfigError, match="loopback"):
        parse_dicomweb_front_config({"tls": False, "host": "0.0.0.0"})
    for bad in (
        {"port": 70000},
        {"colour": "blue"},
        {"tls": "yes"},
        {"max_results": 0},
        {"public_base_url": "ftp://x"},
        {"study_access_seconds": 0},
        {"study_access_seconds": True},
    ):
        with pytest.raises(ConfigError):
            parse_dicomweb_front_config(bad)


def test_config_section_is_wired_into_the_gateway_configuration(
    pki: DevPki, tmp_path: Path
) -> None:
    config = make_config(pki, tmp_path, dicomweb={"port": 0})
    assert config.dicomweb is not None and config.dicomweb.tls
    with pytest.raises(GatewayConfigError, match="loopback"):
        make_config(pki, tmp_path, dicomweb={"host": "10.1.2.3", "tls": False})


def test_routes() -> None:
    assert parse_route("/dicomweb/studies") == Route("search", "STUDY")
    assert parse_route("/dicomweb/studies/1.2/series") == Route("search", "SERIES", "1.2")
    assert parse_route("/dicomweb/studies/1.2/instances") == Route("search", "IMAGE", "1.2")
    assert parse_route("/dicomweb/studies/1.2/series/3.4/instances") == Route(
        "search", "IMAGE", "1.2", "3.4"
    )
    assert parse_route("/dicomweb/studies/1.2") == Route("retrieve", "STUDY", "1.2")
    assert parse_route("/dicomweb/studies/1.2/series/3.4/instances/5.6/metadata") == Route(
        "metadata", "IMAGE", "1.2", "3.4", "5.6"
    )
    assert parse_route("/dicomweb/studies/1.2/rendered") == Route("rendered", "STUDY", "1.2")
    assert parse_route("/dicomweb/studies/1.2/series/3.4/thumbnail") == Route(
        "thumbnail", "SERIES", "1.2", "3.4"
    )
    assert parse_route("/dicomweb/studies/1.2/series/3.4/instances/5.6/frames/2,1/rendered") == (
        Route("rendered", "IMAGE", "1.2", "3.4", "5.6", frames=(2, 1))
    )
    assert parse_route("/dicomweb/studies/1.2/series/3.4/instances/5.6/frames/1") == Route(
        "unsupported", "IMAGE", "1.2", "3.4", "5.6", detail="frames"
    )
    assert parse_route("/dicomweb/studies/1.2/bulkdata") == Route(
        "unsupported", "STUDY", "1.2", detail="bulkdata"
    )
    for bad_frames in ("0", "x", "1,-2", "1,,2"):
        with pytest.raises(DicomWebError) as caught:
            parse_route(
                f"/dicomweb/studies/1.2/series/3.4/instances/5.6/frames/{bad_frames}/rendered"
            )
        assert caught.value.status == 400, bad_frames
    for unknown in ("/", "/dicomweb", "/dicomweb/patients", "/dicomweb/studies/1.2/x"):
        assert parse_route(unknown) is None
    with pytest.raises(DicomWebError) as caught:
        parse_route("/dicomweb/studies/1.2.abc")
    assert caught.value.status == 400


def test_accept_negotiation() -> None:
    assert negotiate_transfer_syntaxes([]) == (EXPLICIT,)
    assert negotiate_transfer_syntaxes(["*/*"]) == (EXPLICIT,)
    assert negotiate_transfer_syntaxes(['multipart/related; type="application/dicom"']) == (
        EXPLICIT,
    )
    assert (
        negotiate_transfer_syntaxes(
            ['multipart/related; type="application/dicom"; transfer-syntax=*']
        )
        == ANY_TRANSFER_SYNTAX
    )
    assert negotiate_transfer_syntaxes(
        [
            "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.5;q=0.5,"
            ' multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2',
            "image/jpeg",
        ]
    ) == ("1.2.840.10008.1.2", "1.2.840.10008.1.2.5")
    for unsupported in (
        ["image/jpeg"],
        ['multipart/related; type="application/octet-stream"'],
        ['multipart/related; type="application/dicom"; q=0'],
        ["application/dicom"],
    ):
        with pytest.raises(DicomWebError) as caught:
            negotiate_transfer_syntaxes(unsupported)
        assert caught.value.status == 406, unsupported
    for malformed in (
        ['multipart/related; type="application/dicom"; transfer-syntax=abc'],
        ["multipart/related; q=2"],
        ['multipart/related; type="application/dicom'],
        ["not a media type"],
    ):
        with pytest.raises(DicomWebError) as caught:
            negotiate_transfer_syntaxes(malformed)
        assert caught.value.status == 400, malformed
    assert negotiate_json([]) == negotiate_json(["application/json"]) == "application/dicom+json"
    with pytest.raises(DicomWebError) as caught:
        negotiate_json(['multipart/related; type="application/dicom+xml"'])
    assert caught.value.status == 406


def qido(query: str, route: Route | None = None) -> QidoQuery:
    from urllib.parse import parse_qsl

    return parse_qido(
        route or Route("search", "STUDY"),
        parse_qsl(query, keep_blank_values=True),
        local_authority=AUTHORITY,
        max_results=100,
    )


def test_qido_query_parsing() -> None:
    q = qido("PatientID=MRN1&StudyDate=20200101-20201231&00080050=ACC*&includefield=00081030")
    assert q.patient_id == f"MRN1^^^&{AUTHORITY}&ISO"
    assert (q.caller_patient_id, q.caller_issuer) == ("MRN1", AUTHORITY)
    assert q.filters == (("StudyDate", "20200101-20201231"), ("AccessionNumber", "ACC*"))
    assert "StudyDescription" in q.include and q.limit == 100 and q.offset == 0
    foreign = qido("PatientID=X9&IssuerOfPatientID=2.999.7&limit=5&offset=10")
    assert foreign.patient_id == "X9^^^&2.999.7&ISO"  # left to the patient-ID mapping
    assert (foreign.limit, foreign.offset) == (5, 10)
    assert qido("limit=5000").limit == 100  # capped by max_results
    assert qido("StudyInstanceUID=1.2.3,1.2.4").study_uids == ("1.2.3", "1.2.4")
    assert qido("StudyDate=-20200101&StudyTime=0800-1200").filters == (
        ("StudyDate", "-20200101"),
        ("StudyTime", "0800-1200"),
    )
    series = qido("Modality=CT", Route("search", "SERIES", "1.2.3"))
    assert series.study_uids == ("1.2.3",) and series.study_in_path
    assert qido("fuzzymatching=true&includefield=all").fuzzy
    for bad in (
        "StudyDate=2020-01-01",
        "StudyDate=20201301",
        "StudyDate=20201231-20200101",
        "StudyDate=-",
        "StudyDate=2020*",
        "StudyTime=2500",
        "NoSuchAttribute=1",
        "00091234=1",  # a private tag: no keyword
        "limit=-1",
        "limit=0",
        "offset=x",
        "PatientID=A*",
        "PatientID=A^B",
        "IssuerOfPatientID=2.999.7",
        "PatientID=A&IssuerOfPatientID=hospital",
        "StudyInstanceUID=1.2.*",
        "BodyPartExamined=CHEST",
        "SeriesInstanceUID=1.2.3",  # at the study level
        "fuzzymatching=maybe",
        "ReferencedStudySequence.StudyInstanceUID=1.2",
    ):
        with pytest.raises(DicomWebError) as caught:
            qido(bad)
        assert caught.value.status == 400, bad


def _study_manifest(tmp: Path, *, home: str, modalities: tuple[str, ...]) -> StudyManifest:
    """A real KOS of a generated study, as the federation view would hold it."""
    study = generate_study(
        tmp,
        patient=SamplePatient("zed", "Ödegård", "Zoë", "19800202", "F"),
        patient_id="Z1",
        issuer_oid="2.999.1",
        modality="MR",
        body_part="KNEE",
        study_date=date(2021, 3, 4),
        institution="Somewhere",
        accession_number="ACC42",
        uid_root="2.999.99",
        series_count=2,
        instances_per_series=2,
        seed=1,
    )
    kos = build_kos([dcmread(f) for f in study.files], repository_unique_id="2.999.81")
    manifest = Manifest(home, "2.999.80", "2.999.5.1", (study.study_instance_uid,), None)
    return StudyManifest(manifest, kos_to_bytes(kos), kos, tuple(kos_references(kos)), modalities)


def test_search_builds_the_dicom_json_model(tmp_path: Path) -> None:
    sm = _study_manifest(tmp_path, home="urn:oid:2.999.70.1", modalities=("MR",))
    study_uid = sm.study_instance_uids[0]
    found = search(qido("PatientID=LOCAL7&StudyDate=20210101-"), [sm], "https://gw:1")
    assert found.remaining == 0 and len(found.matches) == 1
    item = to_dicom_json(found.matches[0])
    assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Ödegård^Zoë"}]}
    # The caller's id and issuer, not the source community's.
    assert item["00100020"] == {"vr": "LO", "Value": ["LOCAL7"]}
    assert item["00100021"] == {"vr": "LO", "Value": [AUTHORITY]}
    assert item["0020000D"] == {"vr": "UI", "Value": [study_uid]}
    assert item["00080061"] == {"vr": "CS", "Value": ["MR"]}
    assert item["00201206"] == {"vr": "IS", "Value": [2]}
    assert item["00201208"] == {"vr": "IS", "Value": [4]}
    assert item["00081190"] == {
        "vr": "UR",
        "Value": [f"https://gw:1/dicomweb/studies/{study_uid}"],
    }
    assert list(item) == sorted(item)  # tags in ascending order
    assert search(qido("StudyDate=-20201231"), [sm], "https://gw:1").matches == []
    assert search(qido("ModalitiesInStudy=CT,MR"), [sm], "").matches
    assert not search(qido("ModalitiesInStudy=CT"), [sm], "").matches
    assert search(qido("PatientName=ödeg*"), [sm], "").matches  # case-insensitive
    assert search(qido("AccessionNumber=ACC4?"), [sm], "").matches
    # Asked-for attributes the manifests do not know come back empty.
    empty = to_dicom_json(search(qido("includefield=StudyDescription"), [sm], "").matches[0])
    assert empty["00081030"] == {"vr": "LO"}
    series_route = Route("search", "SERIES", study_uid)
    series = search(qido("", series_route), [sm], "https://gw:1").matches
    assert len(series) == 2 and {str(s.Modality) for s in series} == {"MR"}
    assert all("PatientName" not in s for s in series)  # study attributes stay at the study
    assert series[0].RetrieveURL.endswith(
        f"/studies/{study_uid}/series/{series[0].SeriesInstanceUID}"
    )
    instances = search(qido("limit=3&offset=1", Route("search", "IMAGE")), [sm], "").matches
    assert len(instances) == 3
    everything = search(qido("", Route("search", "IMAGE")), [sm], "")
    assert [i.SOPInstanceUID for i in everything.matches][1:4] == [
        i.SOPInstanceUID for i in instances
    ]
    paged = search(qido("limit=1", Route("search", "IMAGE")), [sm], "")
    assert paged.remaining == 3
    # The cached manifest is never changed by answering.
    assert str(sm.header.PatientID) == "Z1"


def test_metadata_leaves_out_bulk_data() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.PatientName = "Doe^Jane"
    ds.PixelData = b"\0" * 128
    ds.add_new(0x00291010, "OB", b"\1" * 200_000)  # a large private binary value
    ds.add_new(0x00291011, "OB", b"\2" * 16)
    meta = metadata_json(ds)
    assert "7FE00010" not in meta and "00291010" not in meta
    assert meta["00291011"] == {"vr": "OB", "InlineBinary": "AgICAgICAgICAgICAgICAg=="}
    assert meta["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]


def test_retrieve_failure_statuses() -> None:
    def status(*errors: RegistryError) -> int:
        return retrieve_failure(errors).status

    ts_error = RegistryError("XDSRepositoryError", f"{TRANSFER_SYNTAX_ERROR} (1.2.3) for X")
    assert status(ts_error) == 406
    assert status(RegistryError("XDSDocumentUniqueIdError", "not found")) == 404
    late = RegistryError(
        "XDSUnavailableCommunity", "community x did not answer: no answer within 5 s"
    )
    assert status(late) == 504
    assert status(RegistryError("XDSUnavailableCommunity", "connection refused")) == 502
    assert status() == 502


def test_study_access_is_per_principal_and_expires() -> None:
    store = InMemoryStudyAccess(max_grants=3)
    store.grant(
        [
            StudyGrant("a", "1.1", "P1^^^&1.2&ISO", 100.0),
            StudyGrant("a", "1.2", "P1^^^&1.2&ISO", 100.0),
        ]
    )
    assert [g.study_instance_uid for g in store.granted("a", ["1.2", "1.1", "1.2"], 50)] == [
        "1.2",
        "1.1",
    ]
    assert store.granted("b", ["1.1", "1.2"], 50) == []  # never across principals
    assert store.granted("a", ["1.1"], 100.0) == []  # expired (and dropped)
    assert len(store) == 1
    # A later grant renews; the bound drops the oldest.
    store.grant([StudyGrant("a", "1.2", "P1^^^&1.2&ISO", 200.0)])
    assert store.granted("a", ["1.2"], 150)[0].expires_at == 200.0
    store.grant([StudyGrant("b", f"2.{i}", "P2^^^&1.2&ISO", 300.0) for i in range(3)])
    assert len(store) == 3
    assert store.granted("a", ["1.2"], 150) == []
    assert len(store.granted("b", ["2.0", "2.1", "2.2"], 150)) == 3


def test_audit_messages_follow_the_imaging_pattern() -> None:
    ctx = audit_messages.AuditContext(audit_messages.AuditSource("gw"))
    client = audit_messages.remote_node("10.0.0.9", certificate_subject="CN=viewer")
    us = ctx.local_node("https://gw:8444/dicomweb/studies")
    query = qido_audit(
        ctx,
        requester=client,
        responder=us,
        target="/dicomweb/studies?PatientID=P1",
        patient_id="P1^^^&2.999&ISO",
        outcome=audit_messages.EventOutcome.SUCCESS,
    )
    assert not schema_errors(query)
    root = query.to_element()
    assert [e.get("csd-code") for e in root.iter("EventID", "EventTypeCode")] == [
        "110112",
        "RAD-129",
    ]
    refs = [
        audit_messages.ImagingInstanceReference(
            "1.2", "1.2.3", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2"
        )
        for i in range(3)
    ]
    delivered, failed = wado_audit(
        ctx,
        requester=client,
        responder=us,
        study_uid="1.2",
        delivered=refs[:2],
        failed=refs[2:],
        patient_ids=["P1^^^&2.999&ISO"],
    )
    for message, outcome in ((delivered, "0"), (failed, "8")):
        assert not schema_errors(message)
        ident = message.to_element().find("EventIdentification")
        assert ident is not None
        assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("R", outcome)
        assert [e.get("csd-code") for e in ident.iter("EventID", "EventTypeCode")] == [
            "110104",
            "RAD-107",
        ]
    # We hand the instances out (Source), the client receives them (Destination, requestor).
    roles = {
        p.user_id: (p.role_id_codes[0].code, p.user_is_requestor) for p in delivered.participants
    }
    assert roles == {us.user_id: ("110153", False), "CN=viewer": ("110152", True)}
    [nothing] = wado_audit(
        ctx,
        requester=client,
        responder=us,
        study_uid="1.2",
        delivered=[],
        failed=[],
        patient_ids=[],
    )
    assert not schema_errors(nothing)
    # No patient known: the record says so, then names the bare study.
    patient, study = nothing.objects
    assert (patient.object_id, patient.type_code_role) == (None, audit_messages.ObjectRole.PATIENT)
    assert study.object_id == "1.2"


# ----------------------------------------------------------------------------- QIDO-RS


def test_search_for_studies_lists_every_community(web: Web) -> None:
    alice = local_patient_id(0, 0)
    client = web.client()
    found = client.search_for_studies(search_filters={"PatientID": alice})
    uids = {value(s, "0020000D") for s in found}
    assert uids == web.alice_studies()
    beta_uids = {s.study_instance_uid for s in web.peer_studies}
    assert uids & beta_uids, "the peer community's studies are listed too"
    for study in found:
        assert value(study, "00100020") == alice
        assert value(study, "00100010")["Alphabetic"].startswith("Lindqvist")
        assert value(study, "00081190") == f"{web.url}/studies/{value(study, '0020000D')}"
        assert study["00080061"]["Value"]  # ModalitiesInStudy from the DocumentEntries
    by_uid = {s.study_instance_uid: s for s in [*web.studies, *web.peer_studies]}
    for study in found:
        sample = by_uid[value(study, "0020000D")]
        assert value(study, "00080050") == sample.accession_number
        assert value(study, "00080020") == sample.study_date
        assert study["00080061"]["Value"] == [sample.modality]
        assert value(study, "00201208") == len(sample.files)


def test_search_filters_by_date_modality_and_accession(web: Web) -> None:
    alice = local_patient_id(0, 0)
    everything = [*web.studies, *web.peer_studies]
    mine = [s for s in everything if s.study_instance_uid in web.alice_studies()]
    client = web.client()
    pivot = sorted(s.study_date for s in mine)[len(mine) // 2]
    found = client.search_for_studies(search_filters={"PatientID": alice, "StudyDate": f"{pivot}-"})
    assert {value(s, "0020000D") for s in found} == {
        s.study_instance_uid for s in mine if s.study_date >= pivot
    }
    modality = mine[0].modality
    found = client.search_for_studies(
        search_filters={"PatientID": alice, "ModalitiesInStudy": modality}
    )
    assert {value(s, "0020000D") for s in found} == {
        s.study_instance_uid for s in mine if s.modality == modality
    }
    found = client.search_for_studies(
        search_filters={"PatientID": alice, "AccessionNumber": mine[-1].accession_number}
    )
    assert [value(s, "0020000D") for s in found] == [mine[-1].study_instance_uid]
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_search_for_series_and_instances(web: Web) -> None:
    study = next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0))
    client = web.client()
    # Known from the earlier study search, or found now through the patient.
    series = client.search_for_series(
        study.study_instance_uid, search_filters={"PatientID": local_patient_id(0, 0)}
    )
    assert {value(s, "0020000E") for s in series} == set(study.series_instance_uids)
    assert {value(s, "00080060") for s in series} == {study.modality}
    series_uid = study.series_instance_uids[0]
    instances = client.search_for_instances(study.study_instance_uid, series_uid)
    expected = {uid_of(f) for f in study.files if str(dcmread(f).SeriesInstanceUID) == series_uid}
    assert {value(i, "00080018") for i in instances} == expected
    for instance in instances:
        assert value(instance, "00081190") == (
            f"{web.url}/studies/{study.study_instance_uid}/series/{series_uid}"
            f"/instances/{value(instance, '00080018')}"
        )
    all_instances = client.search_for_instances(study.study_instance_uid)
    assert {value(i, "00080018") for i in all_instances} == {uid_of(f) for f in study.files}
    assert all(value(i, "0020000E") in study.series_instance_uids for i in all_instances)


# ----------------------------------------------------------------------------- WADO-RS


def test_retrieve_study_is_byte_identical_to_the_source(web: Web) -> None:
    # Alice's study in beta: RAD-69 routed as RAD-75, streamed through both gateways.
    alice = local_patient_id(0, 0)
    for study in (
        next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0)),
        next(s for s in web.studies if s.patient_id == alice),
    ):
        client = web.client()
        client.search_for_studies(search_filters={"PatientID": alice})
        datasets = client.retrieve_study(study.study_instance_uid)
        assert {str(d.SOPInstanceUID) for d in datasets} == {uid_of(f) for f in study.files}
        response = web.session().get(f"{web.url}/studies/{study.study_instance_uid}")
        assert response.status_code == 200
        assert response.headers.get("transfer-encoding") == "chunked"  # streamed
        parts = multipart_parts(response)
        sources = {uid_of(f): f.read_bytes() for f in study.files}
        assert len(parts) == len(sources)
        for content_type, body in parts:
            assert content_type == f"application/dicom; transfer-syntax={EXPLICIT}"
            uid = str(dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
            assert body == sources[uid]


def test_retrieve_series_and_instance(web: Web) -> None:
    study = web.studies[1]
    client = web.client()
    client.search_for_studies(search_filters={"PatientID": study.patient_id})
    series_uid = study.series_instance_uids[0]
    in_series = [f for f in study.files if str(dcmread(f).SeriesInstanceUID) == series_uid]
    datasets = client.retrieve_series(study.study_instance_uid, series_uid)
    assert {str(d.SOPInstanceUID) for d in datasets} == {uid_of(f) for f in in_series}
    target = in_series[0]
    instance = client.retrieve_instance(study.study_instance_uid, series_uid, uid_of(target))
    assert instance.PixelData == dcmread(target).PixelData
    response = web.session().get(
        f"{web.url}/studies/{study.study_instance_uid}/series/{series_uid}/instances/{uid_of(target)}",
        headers={"accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    [(content_type, body)] = multipart_parts(response)
    assert content_type == f"application/dicom; transfer-syntax={EXPLICIT}"  # as stored
    assert body == target.read_bytes()


def test_retrieve_study_metadata(web: Web) -> None:
    study = web.studies[0]
    client = web.client()
    client.search_for_studies(search_filters={"PatientID": study.patient_id})
    metadata = client.retrieve_study_metadata(study.study_instance_uid)
    assert {value(m, "00080018") for m in metadata} == {uid_of(f) for f in study.files}
    for item in metadata:
        assert "7FE00010" not in item  # no bulk pixel data
        assert item["00100010"]["Value"][0]["Alphabetic"].startswith("Lindqvist")
        assert value(item, "00280010") == dcmread(study.files[0]).Rows
    series_uid = study.series_instance_uids[-1]
    one = client.retrieve_series_metadata(study.study_instance_uid, series_uid)
    assert {value(m, "0020000E") for m in one} == {series_uid}


def test_retrieve_streams_with_bounded_memory(web: Web) -> None:
    """A 21 MB study leaves the gateway without the study ever being in memory."""
    big = web.big
    session = web.session()
    found = session.get(f"{web.url}/studies", params={"PatientID": BIG_PATIENT})
    assert [value(s, "0020000D") for s in found.json()] == [big.study_instance_uid]
    study_bytes = sum(f.stat().st_size for f in big.files)
    assert study_bytes > 20_000_000
    tracemalloc.start()
    try:
        received = 0
        with session.get(f"{web.url}/studies/{big.study_instance_uid}", stream=True) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(64 * 1024):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received > study_bytes  # every instance, plus the part headers
    # Everything the test process allocated meanwhile (gateways included) stayed far below
    # the study: instances pass through in chunks.
    assert peak < study_bytes / 3, (peak, study_bytes)


def test_an_instance_header_spooled_to_disk_is_sealed(
    web: Web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No plaintext PHI on disk: the metadata of an instance larger than the header spool's
    memory is parsed from an encrypted, unnamed spool. Read through /proc while it is on
    disk: no marker; afterwards nothing is left in the spool directory."""
    door = web.alpha.dicomweb_front
    assert door is not None
    marker = f"PATIENT-SECRET-{uuid.uuid4()}"
    ds = dcmread(web.big.files[0])
    ds.PatientName = marker
    ds.PixelData = (marker.encode() * (len(ds.PixelData) // len(marker) + 1))[: len(ds.PixelData)]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    threshold = 64 * 1024
    monkeypatch.setattr(dicomweb_door, "_HEADER_SPOOL_MEMORY", threshold)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no spool_dir: TMPDIR
    seen_on_disk: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), 16 * 1024):
            if offset > 2 * threshold and not seen_on_disk:
                seen_on_disk.extend(_open_files_under(tmp_path))
            yield data[offset : offset + 16 * 1024]

    parsed = asyncio.run(door._read_header(chunks(), str(ds.SOPInstanceUID)))
    assert str(parsed.PatientName) == marker  # parsed from the spool
    assert seen_on_disk, "the instance was not spooled to disk"
    assert all(len(content) > threshold for content in seen_on_disk)
    assert all(marker.encode() not in content for content in seen_on_disk)
    assert not list(tmp_path.iterdir())  # the spool never had a name


def _open_files_under(directory: Path) -> list[bytes]:
    """The contents of this process's open files (named or not) in ``directory``."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(directory)):
                found.append(fd.read_bytes())
        except OSError:
            continue
    return found


# ----------------------------------------------------------------------------- bad input


# ----------------------------------------------------------------------------- rendered


def rendered_parts(response: requests.Response, media_type: str) -> list[bytes]:
    content_type = response.headers["content-type"]
    assert content_type.startswith(f'multipart/related; type="{media_type}"'), content_type
    boundary = content_type.rsplit("boundary=", 1)[1].strip('"').encode()
    segments = (b"\r\n" + response.content).split(b"\r\n--" + boundary)
    assert segments[0] == b"" and segments[-1] == b"--\r\n"
    bodies = []
    for segment in segments[1:-1]:
        head, _, body = segment[2:].partition(b"\r\n\r\n")
        assert head.decode().lower() == f"content-type: {media_type}"
        bodies.append(body)
    return bodies


def png_pixels(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_rendered_instance_from_another_community_is_the_source_image_losslessly(
    web: Web,
) -> None:
    alice = local_patient_id(0, 0)
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": alice}).raise_for_status()
    for study in (
        next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0)),
        # The RLE Lossless study: decoded at the gateway.
        next(s for s in web.studies if s.transfer_syntax_uid == "1.2.840.10008.1.2.5"),
    ):
        session.get(f"{web.url}/studies", params={"PatientID": study.patient_id}).raise_for_status()
        source = study.files[0]
        ds = dcmread(source)
        url = (
            f"{web.url}/studies/{study.study_instance_uid}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
        response = session.get(f"{url}/rendered")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        pixels = png_pixels(response.content)
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.min() != pixels.max()
        assert (pixels == png_pixels(render_frame(ds, 0, RenderOptions()))).all()
        windowed = session.get(f"{url}/rendered", params={"window": "0,4000,linear"})
        assert windowed.status_code == 200
        assert not (png_pixels(windowed.content) == pixels).all()
        jpeg = session.get(
            f"{url}/rendered", params={"quality": "50"}, headers={"accept": "image/jpeg"}
        )
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert jpeg.content.startswith(b"\xff\xd8")
        frame = session.get(f"{url}/frames/1/rendered", params={"viewport": "32,32"})
        assert png_pixels(frame.content).shape[0] == 32


def test_thumbnails_of_study_series_and_instance(web: Web) -> None:
    study = next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0))
    session = web.session()
    session.get(
        f"{web.url}/studies", params={"PatientID": local_patient_id(0, 0)}
    ).raise_for_status()
    series = study.series_instance_uids[0]
    for path in (
        f"/studies/{study.study_instance_uid}/thumbnail",
        f"/studies/{study.study_instance_uid}/series/{series}/thumbnail",
    ):
        response = session.get(f"{web.url}{path}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        pixels = png_pixels(response.content)
        assert max(pixels.shape) == 128 and pixels.min() != pixels.max()
    small = session.get(
        f"{web.url}/studies/{study.study_instance_uid}/thumbnail", params={"viewport": "40,40"}
    )
    assert max(png_pixels(small.content).shape) == 40


def test_rendered_series_and_study_are_multipart_one_image_per_frame(web: Web) -> None:
    study = web.studies[1]
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": study.patient_id}).raise_for_status()
    series = study.series_instance_uids[0]
    in_series = [f for f in study.files if str(dcmread(f).SeriesInstanceUID) == series]
    response = session.get(f"{web.url}/studies/{study.study_instance_uid}/series/{series}/rendered")
    assert response.status_code == 200
    parts = rendered_parts(response, "image/png")
    assert len(parts) == len(in_series)
    everything = session.get(
        f"{web.url}/studies/{study.study_instance_uid}/rendered",
        headers={"accept": "image/jpeg"},
    )
    assert len(rendered_parts(everything, "image/jpeg")) == len(study.files)


def test_a_multiframe_instance_renders_every_frame_or_the_frames_asked_for(web: Web) -> None:
    study = web.multi
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": MULTI_PATIENT}).raise_for_status()
    ds = dcmread(study.files[0], stop_before_pixels=True)
    url = (
        f"{web.url}/studies/{study.study_instance_uid}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    every = session.get(f"{url}/rendered")
    assert every.status_code == 200, every.text
    parts = rendered_parts(every, "image/png")
    assert len(parts) == 3
    frames = [png_pixels(p) for p in parts]
    assert not (frames[0] == frames[2]).all()
    second = session.get(f"{url}/frames/2/rendered")
    assert second.headers["content-type"] == "image/png"
    assert (png_pixels(second.content) == frames[1]).all()
    two = session.get(f"{url}/frames/3,1/rendered")
    assert [
        (png_pixels(p) == f).all()
        for p, f in zip(rendered_parts(two, "image/png"), (frames[2], frames[0]), strict=True)
    ] == [True, True]
    assert session.get(f"{url}/frames/4/rendered").status_code == 404


def test_rendered_requests_that_cannot_be_answered(web: Web) -> None:
    study = web.studies[0]
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": study.patient_id}).raise_for_status()
    ds = dcmread(study.files[0], stop_before_pixels=True)
    url = (
        f"{web.url}/studies/{study.study_instance_uid}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    gif = session.get(f"{url}/rendered", headers={"accept": "image/gif"})
    assert gif.status_code == 406 and "image/png" in gif.json()["message"]
    beyond = session.get(f"{url}/frames/2/rendered")
    assert beyond.status_code == 404 and "frame 2" in beyond.json()["message"]
    bad = session.get(f"{url}/rendered", params={"window": "40,nope"})
    assert bad.status_code == 400 and "window" in bad.json()["message"]
    unknown = session.get(
        f"{web.url}/studies/{study.study_instance_uid}/series/{ds.SeriesInstanceUID}"
        "/instances/2.999.1/rendered"
    )
    assert unknown.status_code == 404


# ----------------------------------------------------------------------------- IID launch


def launch_page(web: Web, query: str, recorded: list[dict[str, Any]]) -> Any:
    """The IID launch page (doors/viewer) over alpha's federation view, as a clinician, run on
    alpha's loop (the web door mounts it; here the machine door's view stands in)."""
    import asyncio
    from types import SimpleNamespace

    door = web.alpha.dicomweb_front
    assert door is not None
    clinician = Principal(
        "Dr Alpha", frozenset({Role.LOCAL_CONSUMER}), Identity(address="127.0.0.1")
    )

    def record(request: Any, who: Principal, **fields: Any) -> None:
        recorded.append({"clinician": who.name, **fields})

    async def body() -> Any:
        if False:  # pragma: no cover - an empty body
            yield b""

    async def run() -> Any:
        pages = ViewerPages(SimpleNamespace(gateway=web.alpha, dicomweb=door), record)
        request = Request("GET", f"/iid?{query}", [], PeerInfo("127.0.0.1", 1), body(), "https")
        token = set_current_caller(clinician)
        try:
            return await pages.launch(request, clinician)
        finally:
            reset_current_caller(token)

    loop = next(t.loop for t in web.threads if t.gateway is web.alpha)
    return asyncio.run_coroutine_threadsafe(run(), loop).result(60)


def test_iid_launch_lists_every_communitys_studies_and_opens_one(web: Web) -> None:
    from urllib.parse import urlencode

    alice = f"{local_patient_id(0, 0)}^^^&{AUTHORITY}&ISO"
    recorded: list[dict[str, Any]] = []
    page = launch_page(web, urlencode({"requestType": "PATIENT", "patientID": alice}), recorded)
    assert page.status == 200
    html = page.body.decode()
    assert html.count('<tr data-study="') == len(web.alice_studies())
    assert '<td class="community">alpha</td>' in html
    assert '<td class="community">beta</td>' in html
    assert recorded[-1]["outcome"] == audit_messages.EventOutcome.SUCCESS
    assert set(recorded[-1]["study_uids"]) == web.alice_studies()
    peer_study = next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0))
    opened = launch_page(
        web,
        urlencode(
            {
                "requestType": "STUDY",
                "patientID": alice,
                "studyUID": peer_study.study_instance_uid,
            }
        ),
        recorded,
    )
    assert opened.status == 303
    assert dict(opened.headers)["location"] == f"/viewer/?study={peer_study.study_instance_uid}"
    bad = launch_page(web, urlencode({"requestType": "SERIES", "patientID": alice}), recorded)
    assert bad.status == 400 and "requestType must be PATIENT or STUDY" in bad.body.decode()
    assert recorded[-1]["outcome"] == audit_messages.EventOutcome.MINOR_FAILURE
    assert all(r["clinician"] == "Dr Alpha" for r in recorded) and len(recorded) == 3


def test_bad_requests_get_clear_statuses(web: Web) -> None:
    session = web.session()
    alice = local_patient_id(0, 0)
    study = web.studies[0]
    session.get(f"{web.url}/studies", params={"PatientID": alice})

    def get(path: str, **kw: Any) -> requests.Response:
        return session.get(f"{web.url}{path}", **kw)

    bad_range = get("/studies", params={"PatientID": alice, "StudyDate": "20201231-20200101"})
    assert bad_range.status_code == 400
    assert "StudyDate" in bad_range.json()["message"]
    assert get("/studies", params={"PatientID": alice, "Colour": "blue"}).status_code == 400
    no_patient = get("/studies")
    assert no_patient.status_code == 400 and "PatientID" in no_patient.json()["message"]
    unknown = "2.999.123.456"
    not_cached = get(f"/studies/{unknown}")
    assert not_cached.status_code == 404 and "PatientID" in not_cached.json()["message"]
    not_cached_search = get(f"/studies/{unknown}/series")
    assert not_cached_search.status_code == 400
    assert "PatientID" in not_cached_search.json()["message"]
    assert get(f"/studies/{unknown}", params={"PatientID": alice}).status_code == 404
    assert get(f"/studies/{study.study_instance_uid}/series/{unknown}").status_code == 404
    assert (
        get(
            f"/studies/{study.study_instance_uid}/series/{study.series_instance_uids[0]}"
            f"/instances/{unknown}"
        ).status_code
        == 404
    )
    assert get(f"/studies/{study.study_instance_uid}/bulkdata").status_code == 406
    assert (
        get(f"/studies/{study.study_instance_uid}", headers={"accept": "image/jpeg"}).status_code
        == 406
    )
    dicom_xml = 'multipart/related; type="application/dicom+xml"'
    assert (
        get("/studies", params={"PatientID": alice}, headers={"accept": dicom_xml}).status_code
        == 406
    )
    assert get(f"/studies/{study.study_instance_uid}", params={"frame": "1"}).status_code == 400
    assert get("/studies/not-a-uid").status_code == 400
    assert get("/nowhere").status_code == 404
    assert session.post(f"{web.url}/studies", data=b"x").status_code == 405
    for response in (bad_range, no_patient, not_cached, not_cached_search):
        assert response.headers["content-type"] == "application/json"


def test_a_client_without_certificate_is_refused_at_the_handshake(web: Web) -> None:
    before = len(web.alpha.handshake_failures)
    session = requests.Session()
    session.trust_env = False
    session.verify = str(web.pki.ca)
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"{web.url}/studies", params={"PatientID": "X"}, timeout=10)
    assert wait_for(lambda: len(web.alpha.handshake_failures) > before)
    # And with raw TLS: no certificate, never an HTTP answer (TLS 1.3 reports the refusal at
    # the first read, as an alert or a closed connection).
    context = ssl.create_default_context(cafile=str(web.pki.ca))
    port = int(web.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = tls.recv(100)
        except (ssl.SSLError, ConnectionError):
            answer = b""
    assert answer == b""


def alerts_naming(web: Web, label: str) -> list[Any]:
    """Security Alerts (110113) whose requestor is the client certificate ``label``."""
    return [
        r
        for r in web.audit.with_event("110113")
        if any(
            f"CN={label}," in str(p.get("UserID")) and p.get("UserIsRequestor") == "true"
            for p in r.iter("ActiveParticipant")
        )
    ]


def test_only_local_consumers_pass_the_door_and_each_refusal_is_audited_once(web: Web) -> None:
    """A trusted certificate the policy does not name, and a local system that is not a
    consumer, get 403 before any work (no federation query, no QIDO/WADO audit); the guard
    records one Security Alert per refused request, naming the verified certificate."""
    alice = local_patient_id(0, 0)
    study = web.studies[0]
    guard = web.alpha.guard
    for label in (STRANGER, ENGINE):
        session = web.session_as(label)
        for path, params in (
            ("/studies", {"PatientID": alice}),
            (f"/studies/{study.study_instance_uid}", {"PatientID": alice}),
        ):
            refused_before = guard.refused
            response = session.get(f"{web.url}{path}", params=params)
            assert response.status_code == 403, (label, path)
            assert response.headers["content-type"] == "application/json"
            assert response.json()["message"].startswith("access denied")
            assert b"DICM" not in response.content
            assert guard.refused == refused_before + 1
    for label in (STRANGER, ENGINE):
        assert wait_for(lambda label=label: len(alerts_naming(web, label)) >= 2, timeout=15)
    # A marker request after the refusals: once its record is in, every earlier one is too.
    web.session().get(f"{web.url}/studies", params={"PatientID": "MARKER"}).raise_for_status()
    assert wait_for(
        lambda: any(b"MARKER" in etree_bytes(r) for r in web.audit.with_event("110112")),
        timeout=15,
    )
    for label in (STRANGER, ENGINE):
        alerts = alerts_naming(web, label)
        assert len(alerts) == 2, label  # one per refused request, never more
        for alert in alerts:
            assert not schema_errors(alert), schema_errors(alert)
            event_type = alert.find("EventIdentification/EventTypeCode")
            assert event_type is not None and event_type.get("csd-code") == "110132"
            resource = alert.find("ParticipantObjectIdentification")
            assert resource is not None
            assert str(resource.get("ParticipantObjectID")).startswith(f"{web.url}/studies")
        # Refused before the transaction: no query or transfer record names them.
        for event in ("110112", "110104"):
            assert not [
                r
                for r in web.audit.with_event(event)
                if any(f"CN={label}," in str(p.get("UserID")) for p in r.iter("ActiveParticipant"))
            ]


def test_the_admitted_consumer_is_the_current_caller_of_its_request(web: Web) -> None:
    """The initiating side runs with the door's principal as the current caller (so it can act
    for it and audit it), not with the gateway's own identity."""

    seen: list[str | None] = []
    initiating = web.alpha.initiating
    original = initiating.query

    async def spy(element: Any) -> Any:
        principal = current_caller()
        seen.append(principal.name if principal is not None else None)
        return await original(element)

    initiating.query = spy  # type: ignore[method-assign]
    try:
        for pair, expected in (
            (None, "test-client"),
            (issue_client_certificate(web.pki, THIRD_CONSUMER), "third-consumer"),
        ):
            seen.clear()
            web.session(pair).get(
                f"{web.url}/studies", params={"PatientID": local_patient_id(0, 0)}
            ).raise_for_status()
            assert seen == [expected]
    finally:
        initiating.query = original  # type: ignore[method-assign]


def test_a_study_found_by_one_caller_is_not_served_to_another_by_uid_alone(web: Web) -> None:
    """The issue's reproduction: caller A searches and retrieves; caller B, another local
    consumer, naming the same study UID alone gets 404 (400 for a search below the study) and
    no bytes, exactly as for a study that does not exist. B naming the patient is served once
    the federation confirms the patient owns the study."""
    alice = local_patient_id(0, 0)
    study = next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0))
    uid, series = study.study_instance_uid, study.series_instance_uids[0]
    sop = uid_of(next(f for f in study.files if str(dcmread(f).SeriesInstanceUID) == series))
    a, b = web.session(), web.session_as(OTHER_CONSUMER)

    a.get(f"{web.url}/studies", params={"PatientID": alice}).raise_for_status()
    found = a.get(f"{web.url}/studies/{uid}")
    assert found.status_code == 200
    assert len(multipart_parts(found)) == len(study.files)

    unknown = "2.999.4242"
    for path in (
        f"/studies/{uid}",
        f"/studies/{uid}/metadata",
        f"/studies/{uid}/series/{series}",
        f"/studies/{uid}/series/{series}/instances/{sop}",
    ):
        refused = b.get(f"{web.url}{path}")
        assert refused.status_code == 404, path
        assert refused.headers["content-type"] == "application/json"
        assert b"DICM" not in refused.content and sop not in refused.text
        assert "Lindqvist" not in refused.text
        # Indistinguishable from a study nobody found.
        nothing = b.get(f"{web.url}{path.replace(uid, unknown)}")
        assert nothing.status_code == 404
        assert nothing.json()["message"] == refused.json()["message"].replace(uid, unknown)
    for path in (f"/studies/{uid}/series", f"/studies/{uid}/series/{series}/instances"):
        refused = b.get(f"{web.url}{path}")
        assert refused.status_code == 400, path
        assert series not in refused.text.replace(path, "") and sop not in refused.text

    # Naming another patient does not help; naming the study's patient does.
    bob = local_patient_id(0, 1)
    assert b.get(f"{web.url}/studies/{uid}", params={"PatientID": bob}).status_code == 404
    named = b.get(f"{web.url}/studies/{uid}", params={"PatientID": alice})
    assert named.status_code == 200
    assert len(multipart_parts(named)) == len(study.files)
    # That request was B's own search for the patient: now B may name the study alone.
    assert b.get(f"{web.url}/studies/{uid}/metadata").status_code == 200


def test_a_callers_access_to_a_study_expires(web: Web) -> None:
    """After ``study_access_seconds`` the caller names the patient again (the door's clock is
    moved, not waited for)."""
    import time

    alice = local_patient_id(0, 0)
    study = next(s for s in web.studies if s.patient_id == alice)
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": alice}).raise_for_status()
    assert session.get(f"{web.url}/studies/{study.study_instance_uid}/metadata").status_code == 200
    door = web.alpha.dicomweb_front
    assert door is not None
    door.view.clock = lambda: time.time() + door.config.study_access_seconds + 1
    try:
        late = session.get(f"{web.url}/studies/{study.study_instance_uid}/metadata")
        assert late.status_code == 404
        again = session.get(
            f"{web.url}/studies/{study.study_instance_uid}/metadata", params={"PatientID": alice}
        )
        assert again.status_code == 200
    finally:
        door.view.clock = time.time


def test_a_grant_outlives_the_manifest_cache(web: Web) -> None:
    """A granted study whose manifest left this gateway's cache (evicted, or found through
    another replica) is looked up again through the patient the grant records."""
    alice = local_patient_id(0, 0)
    study = next(s for s in web.studies if s.patient_id == alice)
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": alice}).raise_for_status()
    door = web.alpha.dicomweb_front
    assert door is not None
    with door.view._lock:
        door.view._studies.clear()
    response = session.get(f"{web.url}/studies/{study.study_instance_uid}/metadata")
    assert response.status_code == 200
    assert {value(m, "00080018") for m in response.json()} == {uid_of(f) for f in study.files}


def etree_bytes(record: Any) -> bytes:
    from lxml import etree

    return bytes(etree.tostring(record))


def test_searches_and_retrieves_are_audited(web: Web) -> None:
    study = web.studies[0]
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": study.patient_id}).raise_for_status()
    session.get(f"{web.url}/studies/{study.study_instance_uid}").raise_for_status()
    session.get(f"{web.url}/studies", params={"StudyDate": "bad"})

    def seen() -> set[tuple[str, str, str]]:
        return set(web.audit.events())

    assert wait_for(
        lambda: (
            {
                ("110112", "RAD-129", "0"),
                ("110104", "RAD-107", "0"),
                ("110112", "RAD-129", "4"),
            }
            <= seen()
        ),
        timeout=15,
    ), seen()
    retrieve = next(
        r
        for r in web.audit.records
        if (ident := r.find("EventIdentification")) is not None
        and ident.get("EventActionCode") == "R"
        and any(
            o.get("ParticipantObjectID") == study.study_instance_uid
            for o in r.iter("ParticipantObjectIdentification")
        )
    )
    sources = [
        p.get("UserID")
        for p in retrieve.iter("ActiveParticipant")
        if any(c.get("csd-code") == "110153" for c in p.iter("RoleIDCode"))
    ]
    assert sources and str(sources[0]).endswith(f"/dicomweb/studies/{study.study_instance_uid}")
    instances = {i.get("UID") for i in retrieve.iter("Instance")}
    assert instances == {uid_of(f) for f in study.files}
    for record in list(web.audit.records):
        assert not schema_errors(record), schema_errors(record)


def test_federation_failure_gives_502_and_a_partial_search_a_warning(web: Web) -> None:
    # Runs last in this module: it stops beta.
    alice = local_patient_id(0, 0)
    beta_study = next(s for s in web.peer_studies if s.patient_id == local_patient_id(1, 0))
    session = web.session()
    session.get(f"{web.url}/studies", params={"PatientID": alice}).raise_for_status()
    web.threads[0].__exit__(None, None, None)
    web.threads[0].gateway = None
    response = session.get(f"{web.url}/studies/{beta_study.study_instance_uid}")
    assert response.status_code in (502, 504)
    assert response.headers["content-type"] == "application/json"
    assert "community" in response.json()["message"]
    partial = session.get(f"{web.url}/studies", params={"PatientID": alice})
    assert partial.status_code == 200
    assert "299" in partial.headers.get("warning", "")
    own = {s.study_instance_uid for s in web.studies if s.patient_id == alice}
    assert {value(s, "0020000D") for s in partial.json()} == own
