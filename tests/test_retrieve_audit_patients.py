"""Every retrieve audit names the patient, on both sides and through every door.

Two communities seeded as the demo seeds them (alpha, beta; Alice has studies in both under
two local ids joined by alpha's cross-reference table) audit to a real rsyslog over mutual TLS.
Alice's images are then retrieved every way the product offers: a SOAP consumer (ITI-18, ITI-43,
RAD-69 through alpha's initiating gateway; ITI-39 and RAD-75 to beta), the repository's own
ITI-43, the DIMSE door (C-GET, C-MOVE), the DICOMweb door (WADO-RS) and the import of priors.
Each retrieve record that reaches the repository must validate against the DICOM audit schema
and name Alice as its patient (ParticipantObjectTypeCode 1, role 1, a CX id of hers).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from lxml import etree
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.communities import ARC, seed_community
from tests.conftest import GatewayThread
from tests.dcmtk import dcmtk
from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.audit import messages as m
from xca_gateway.audit.rsyslog import RsyslogRepository, gtls_available, rsyslogd_path
from xca_gateway.audit.syslog import parse_message
from xca_gateway.audit.validate import schema_errors
from xca_gateway.consumer.imaging import Consumer, retrieve_manifest_request, retrieve_study
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import SampleStudy, local_patient_id

FRONT_AE = "XCA-FRONT"
STORE_AE = "STORESCP"
ALPHA_OID = f"{ARC}.20.1000"
BETA_OID = f"{ARC}.20.2000"
ALICE_ALPHA = f"{local_patient_id(0, 0)}^^^&{ALPHA_OID}&ISO"
ALICE_BETA = f"{local_patient_id(1, 0)}^^^&{BETA_OID}&ISO"
ALICE = {ALICE_ALPHA, ALICE_BETA}
RETRIEVE_EVENTS = {"110103", "110104", "110106", "110107"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Federation:
    alpha: Gateway
    beta: Gateway
    alpha_studies: list[SampleStudy]
    beta_studies: list[SampleStudy]
    arr: RsyslogRepository
    pki: DevPki
    store_port: int
    tmp: Path

    def alice(self, studies: list[SampleStudy], community: int) -> list[SampleStudy]:
        return [s for s in studies if s.patient_id == local_patient_id(community, 0)]


def audit_toml(source_id: str, arr: RsyslogRepository) -> str:
    return f"""
[audit]
audit_source_id = "{source_id}"
[[audit.destinations]]
name = "arr"
transport = "tls"
host = "127.0.0.1"
port = {arr.tls_port}
"""


@pytest.fixture(scope="module")
def fed(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    if rsyslogd_path() is None or not gtls_available():
        pytest.skip("rsyslog with its TLS driver (rsyslog-gnutls) is not installed")
    storescp_binary = dcmtk("storescp")
    tmp = tmp_path_factory.mktemp("retrieve-audit")
    (tmp / "arr").mkdir()
    arr = RsyslogRepository(
        tmp / "arr", pki.ca, pki.communities["gamma"].cert, pki.communities["gamma"].key
    )
    arr.check_config()
    arr.start()
    threads: list[GatewayThread] = []
    store_dir = tmp / "store"
    store_dir.mkdir()
    store_port = free_port()
    storescp = subprocess.Popen(
        [storescp_binary, "-aet", STORE_AE, "-od", str(store_dir), str(store_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        beta_config, beta_studies = seed_community(tmp, pki, "beta", 1, audit_toml("gw-beta", arr))
        threads.append(GatewayThread(load_config(beta_config)))
        beta = threads[0].__enter__()
        xref = tmp / "xref.csv"
        xref.write_text(f"{ALICE_ALPHA},{ALICE_BETA}\n")
        extra = f"""
[patient_mapping]
xref_csv = "{xref}"

[[peers]]
name = "beta"
home_community_id = "urn:oid:{ARC}.70.2"
iti38 = "{beta.base_url}/xca/iti38"
iti39 = "{beta.base_url}/xca/iti39"
rad75 = "{beta.base_url}/xca/rad75"
patient_id_assigning_authority = "{BETA_OID}"

[dicom]
ae_title = "{FRONT_AE}"
port = 0

[[dicom.destinations]]
ae_title = "{STORE_AE}"
port = {store_port}
tls = false

[dicomweb]
host = "127.0.0.1"
port = 0
{audit_toml("gw-alpha", arr)}
"""
        alpha_config, alpha_studies = seed_community(tmp, pki, "alpha", 0, extra)
        threads.append(GatewayThread(load_config(alpha_config)))
        alpha = threads[1].__enter__()
        yield Federation(alpha, beta, alpha_studies, beta_studies, arr, pki, store_port, tmp)
    finally:
        for thread in reversed(threads):
            if thread.gateway is not None:
                thread.__exit__(None, None, None)
        storescp.terminate()
        storescp.wait(10)
        arr.stop()


# ----------------------------------------------------------------------------- the doors


def soap_consumer(fed: Federation) -> None:
    """The consumer flow (ITI-18, ITI-43 per manifest, RAD-69 per study), and alpha's own
    manifest once more straight from its repository's ITI-43 endpoint."""
    pki = fed.pki
    reports = asyncio.run(
        retrieve_study(
            gateway=fed.alpha.base_url,
            ca=pki.ca,
            cert=pki.client.cert,
            key=pki.client.key,
            patient_id=ALICE_ALPHA,
            study_instance_uid=None,
            out_dir=fed.tmp / "consumer",
        )
    )
    expected = len(fed.alice(fed.alpha_studies, 0)) + len(fed.alice(fed.beta_studies, 1))
    assert len(reports) == expected and all(r.written for r in reports)

    async def repository() -> None:
        ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
        async with httpx.AsyncClient(verify=ctx, timeout=60) as client:
            consumer = Consumer(client, fed.alpha.base_url, progress=False)
            manifests, _ = await consumer.find_manifests(ALICE_ALPHA)
            home = fed.alpha.config.community.home_community_id
            local = next(x for x in manifests if x.home_community_id == home)
            payload, message = await consumer._soap(
                "/repository/iti43", retrieve_manifest_request(local), Action.ITI43
            )
            if message is not None:
                message.close()
            assert payload.find(".//{*}DocumentResponse") is not None

    asyncio.run(repository())


def dimse(fed: Federation) -> None:
    """C-GET of Alice's study in beta, C-MOVE of her study in alpha, both asked with her
    alpha id over the DICOM TLS door."""
    pki = fed.pki
    port = fed.alpha.listening()["dicom"]
    tls = (client_context(pki.ca, pki.client.cert, pki.client.key), "127.0.0.1")
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    beta_study = fed.alice(fed.beta_studies, 1)[0]
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for context in StoragePresentationContexts[:120]:
        ae.add_requested_context(context.abstract_syntax)
        roles.append(build_role(context.abstract_syntax, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=FRONT_AE,
        ext_neg=roles,
        tls_args=tls,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = local_patient_id(0, 0)
        ds.StudyInstanceUID = beta_study.study_instance_uid
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet)
            if s
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000 and len(received) == len(beta_study.files)

    alpha_study = fed.alice(fed.alpha_studies, 0)[0]
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title=FRONT_AE, tls_args=tls)
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = local_patient_id(0, 0)
        ds.StudyInstanceUID = alpha_study.study_instance_uid
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_move(ds, STORE_AE, StudyRootQueryRetrieveInformationModelMove)
            if s
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000


def wado(fed: Federation) -> None:
    """QIDO-RS for Alice, then WADO-RS of her second study in beta by its UID alone."""
    pki = fed.pki
    base = f"https://127.0.0.1:{fed.alpha.listening()['dicomweb']}/dicomweb"
    session = requests.Session()
    session.trust_env = False
    session.cert = (str(pki.client.cert), str(pki.client.key))
    session.verify = str(pki.ca)
    found = session.get(
        f"{base}/studies",
        params={"PatientID": local_patient_id(0, 0)},
        headers={"accept": "application/dicom+json"},
        timeout=120,
    )
    assert found.status_code == 200
    study = fed.alice(fed.beta_studies, 1)[-1]
    response = session.get(
        f"{base}/studies/{study.study_instance_uid}",
        headers={"accept": 'multipart/related; type="application/dicom"'},
        timeout=120,
    )
    assert response.status_code == 200, response.text[:300]
    session.close()


def import_priors(fed: Federation) -> None:
    pki = fed.pki
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xca_gateway",
            "import-priors",
            "--gateway",
            fed.alpha.base_url,
            "--ca",
            str(pki.ca),
            "--cert",
            str(pki.client.cert),
            "--key",
            str(pki.client.key),
            "--home-community-id",
            fed.alpha.config.community.home_community_id,
            "--patient",
            ALICE_ALPHA,
            "--patient-name",
            "Lindqvist^Alice",
            "--pacs",
            f"127.0.0.1:{fed.store_port}",
            "--pacs-ae",
            STORE_AE,
            "--audit",
            f"tls://127.0.0.1:{fed.arr.tls_port}",
            "--audit-spool",
            str(fed.tmp / "import-spool"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- the records


def received(arr: RsyslogRepository) -> list[etree._Element]:
    roots = []
    for raw in arr.messages():
        msg = parse_message(raw).msg
        roots.append(etree.fromstring(msg[3:] if msg.startswith(b"\xef\xbb\xbf") else msg))
    return roots


def kind(root: etree._Element) -> tuple[str, str, str]:
    """(AuditSourceID, EventTypeCode or "", EventID) of a record."""
    ident = root.find("EventIdentification")
    assert ident is not None
    type_code = ident.find("EventTypeCode")
    source = root.find("AuditSourceIdentification")
    return (
        source.get("AuditSourceID", "") if source is not None else "",
        type_code.get("csd-code", "") if type_code is not None else "",
        ident.find("EventID").get("csd-code", ""),  # type: ignore[union-attr]
    )


def patients(root: etree._Element) -> list[etree._Element]:
    return [
        p
        for p in root.iter("ParticipantObjectIdentification")
        if p.get("ParticipantObjectTypeCode") == "1"
        and p.get("ParticipantObjectTypeCodeRole") == "1"
    ]


def test_every_retrieve_record_of_every_door_names_the_patient(fed: Federation) -> None:
    soap_consumer(fed)
    dimse(fed)
    wado(fed)
    import_priors(fed)
    beta_alice = len(fed.alice(fed.beta_studies, 1))
    # At least this many records of each kind (AuditSourceID, transaction, EventID).
    expected = Counter(
        {
            ("gw-alpha", "ITI-43", "110106"): 4,  # 3 manifests to the consumer, 1 repository
            ("gw-alpha", "ITI-39", "110107"): 1,
            ("gw-beta", "ITI-39", "110106"): 1,
            ("gw-alpha", "RAD-69", "110104"): 3,
            ("gw-alpha", "RAD-75", "110104"): 1,
            ("gw-beta", "RAD-75", "110104"): beta_alice,
            ("gw-alpha", "", "110104"): 2,  # C-GET, C-MOVE
            ("gw-alpha", "RAD-107", "110104"): 1,  # WADO-RS
            ("xca-gateway-import", "", "110107"): beta_alice,
        }
    )
    deadline = time.monotonic() + 60
    while True:
        roots = received(fed.arr)
        have = Counter(kind(r) for r in roots)
        missing = {k: n for k, n in expected.items() if have[k] < n}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, (missing, have)
    retrieves = [r for r in roots if kind(r)[2] in RETRIEVE_EVENTS]
    named = set()
    for root in retrieves:
        assert not schema_errors(root), schema_errors(root)
        found = patients(root)
        text = etree.tostring(root)[:600]
        assert len(found) == 1, text
        (patient,) = found
        # The patient, by a CX id of hers (the one its community knows her by) ...
        assert patient.get("ParticipantObjectID") in ALICE, text
        id_type = patient.find("ParticipantObjectIDTypeCode")
        assert id_type is not None and id_type.get("csd-code") == "2"
        assert not [
            d
            for d in patient.iter("ParticipantObjectDetail")
            if d.get("type") == m.DETAIL_PATIENT_NOT_KNOWN
        ]
        if patient.findtext("ParticipantObjectName"):
            named.add(kind(root))
    # ... and by her name wherever a DICOM header was at hand (instances, manifests).
    for imaging in (
        ("gw-alpha", "RAD-69", "110104"),
        ("gw-beta", "RAD-75", "110104"),
        ("gw-alpha", "", "110104"),
        ("gw-alpha", "RAD-107", "110104"),
        ("xca-gateway-import", "", "110107"),
    ):
        assert imaging in named, imaging
    # Studies as participant objects with their SOP classes and instance counts (A.5.3.4).
    for root in retrieves:
        if kind(root)[2] == "110104":
            studies = [
                p
                for p in root.iter("ParticipantObjectIdentification")
                if p.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
            ]
            assert studies
            for study in studies:
                classes = list(study.iter("SOPClass"))
                assert classes and all(int(c.get("NumberOfInstances", "0")) > 0 for c in classes)
