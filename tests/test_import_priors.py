"""Import of priors into a real Orthanc, from a real two-community federation.

alpha is the local community (its initiating gateway is the one the import talks to, over
mutual TLS), beta the foreign one; both are seeded as the demo seeds them (sample studies,
KOS manifests registered, filesystem imaging source) and peered, with a cross-reference table
for the patients. Orthanc, on loopback, is the local PACS; what it stored is read back through
its REST API and compared with beta's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from lxml import etree
from pydicom.dataset import Dataset

from tests.audit_inbox import AuditInbox
from tests.communities import ARC, seed_community
from tests.conftest import GatewayThread, wait_for
from tests.dcmtk import dcmtk
from tests.test_imaging_support import OrthancProcess, free_port, orthanc
from xca_gateway.app.config import load_config
from xca_gateway.app.gateway import Gateway
from xca_gateway.doors.import_priors import (
    HttpsFederation,
    PacsStore,
    PriorSelection,
    import_priors,
)
from xca_gateway.imaging.transfer_syntax import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    RLE_LOSSLESS,
    transcode,
)
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki
from xca_gateway.tools.dicom_samples import SampleStudy, local_patient_id

ALPHA_HOME = f"urn:oid:{ARC}.70.1"
BETA_HOME = f"urn:oid:{ARC}.70.2"
ALPHA_OID = f"{ARC}.20.1000"
BETA_OID = f"{ARC}.20.2000"
ALICE, BOB, CAROL, DAVE = 0, 1, 2, 3


def cx(community: int, patient: int) -> str:
    oid = f"{ARC}.20.{1000 * (community + 1)}"
    return f"{local_patient_id(community, patient)}^^^&{oid}&ISO"


@dataclass
class Federation:
    alpha: Gateway
    alpha_loop: asyncio.AbstractEventLoop
    alpha_studies: list[SampleStudy]
    beta_studies: list[SampleStudy]
    orthanc: OrthancProcess
    endpoints: Path
    pki: DevPki
    truncated: Path  # the instance of beta that is cut short on disk

    def beta_of(self, patient: int) -> list[SampleStudy]:
        return [s for s in self.beta_studies if s.patient_id == local_patient_id(1, patient)]

    def alpha_of(self, patient: int) -> list[SampleStudy]:
        return [s for s in self.alpha_studies if s.patient_id == local_patient_id(0, patient)]


@contextlib.contextmanager
def federation(
    tmp: Path, pki: DevPki, alpha_extra: str = "", orthanc_process: OrthancProcess | None = None
) -> Iterator[Federation]:
    """beta (foreign) and alpha (local, peered with beta) running, Orthanc as alpha's PACS."""
    with contextlib.ExitStack() as stack:
        pacs = orthanc_process or stack.enter_context(orthanc(tmp / "orthanc"))
        beta_config, beta_studies = seed_community(tmp, pki, "beta", 1)
        # One of dave's instances at beta is cut short on disk after registration: the source
        # streams it as it is, a malformed instance.
        dave = next(s for s in beta_studies if s.patient_id == local_patient_id(1, DAVE))
        truncated = dave.files[1]
        truncated.write_bytes(truncated.read_bytes()[:-200])
        beta_thread = GatewayThread(load_config(beta_config))
        beta = beta_thread.__enter__()
        stack.callback(beta_thread.__exit__, None, None, None)
        xref = tmp / "xref.csv"
        xref.write_text(
            "".join(f"{cx(0, p)},{cx(1, p)}\n" for p in (ALICE, BOB, DAVE))  # carol: unmapped
        )
        peer = f"""
[patient_mapping]
xref_csv = "{xref}"

[[peers]]
name = "beta"
home_community_id = "{BETA_HOME}"
iti38 = "{beta.base_url}/xca/iti38"
iti39 = "{beta.base_url}/xca/iti39"
rad75 = "{beta.base_url}/xca/rad75"
patient_id_assigning_authority = "{BETA_OID}"
{alpha_extra.format(orthanc_port=pacs.dicom_port)}
"""
        alpha_config, alpha_studies = seed_community(tmp, pki, "alpha", 0, peer)
        alpha_thread = GatewayThread(load_config(alpha_config))
        alpha = alpha_thread.__enter__()
        stack.callback(alpha_thread.__exit__, None, None, None)
        endpoints = tmp / "endpoints.json"
        endpoints.write_text(
            json.dumps(
                {
                    "ca": str(pki.ca),
                    "client": pki.client.to_json(),
                    "communities": [
                        {
                            "name": name,
                            "homeCommunityId": home,
                            "patientIdAssigningAuthority": oid,
                            "endpoints": {
                                key: f"{gw.base_url}{path}"
                                for key, path in (
                                    ("iti38", "/xca/iti38"),
                                    ("iti39", "/xca/iti39"),
                                    ("rad75", "/xca/rad75"),
                                    ("iti18", "/ig/iti18"),
                                    ("iti43", "/ig/iti43"),
                                    ("rad69", "/ig/rad69"),
                                )
                            },
                        }
                        for name, home, oid, gw in (
                            ("alpha", ALPHA_HOME, ALPHA_OID, alpha),
                            ("beta", BETA_HOME, BETA_OID, beta),
                        )
                    ],
                }
            )
        )
        yield Federation(
            alpha,
            alpha_thread.loop,
            alpha_studies,
            beta_studies,
            pacs,
            endpoints,
            pki,
            truncated,
        )


@pytest.fixture(scope="module")
def fed(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with federation(tmp_path_factory.mktemp("import-priors"), pki) as f:
        yield f


# ----------------------------------------------------------------------------- Orthanc


def orthanc_url(o: OrthancProcess) -> str:
    return f"http://127.0.0.1:{o.http_port}"


def stored_instance(o: OrthancProcess, sop_instance_uid: str) -> bytes | None:
    """The Part 10 file Orthanc holds for the SOP Instance UID, None if it has none."""
    with httpx.Client(timeout=30) as client:
        found = client.post(f"{orthanc_url(o)}/tools/lookup", content=sop_instance_uid).json()
        ids = [item["ID"] for item in found if item["Type"] == "Instance"]
        if not ids:
            return None
        return client.get(f"{orthanc_url(o)}/instances/{ids[0]}/file").content


def stored_tags(o: OrthancProcess, sop_instance_uid: str) -> dict[str, Any]:
    with httpx.Client(timeout=30) as client:
        found = client.post(f"{orthanc_url(o)}/tools/lookup", content=sop_instance_uid).json()
        [instance] = [item["ID"] for item in found if item["Type"] == "Instance"]
        tags: dict[str, Any] = client.get(
            f"{orthanc_url(o)}/instances/{instance}/tags?simplify"
        ).json()
        return tags


def clear_orthanc(o: OrthancProcess) -> None:
    with httpx.Client(timeout=30) as client:
        for patient in client.get(f"{orthanc_url(o)}/patients").json():
            client.delete(f"{orthanc_url(o)}/patients/{patient}").raise_for_status()
        assert client.get(f"{orthanc_url(o)}/instances").json() == []


def sop_uid(path: Path) -> str:
    return path.stem


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xca_gateway", "import-priors", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def cli_args(fed: Federation, patient: str, *extra: str) -> list[str]:
    return [
        "--endpoints",
        str(fed.endpoints),
        "--community",
        "alpha",
        "--patient",
        patient,
        "--pacs",
        f"127.0.0.1:{fed.orthanc.dicom_port}",
        "--pacs-ae",
        fed.orthanc.ae_title,
        *extra,
    ]


# ----------------------------------------------------------------------------- tests


def test_cli_imports_foreign_priors_reconciled_and_audits(fed: Federation, tmp_path: Path) -> None:
    clear_orthanc(fed.orthanc)
    arr = AuditInbox()
    try:
        result = run_cli(
            *cli_args(fed, cx(0, ALICE)),
            "--audit",
            f"udp://127.0.0.1:{arr.port}",
            "--audit-spool",
            str(tmp_path / "spool"),
        )
    finally:
        arr.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    priors = fed.beta_of(ALICE)
    assert priors, "beta has studies of alice"
    for study in priors:
        assert study.study_instance_uid in result.stdout
        assert f"stored {len(study.files)}, failed 0" in result.stdout
        for path in study.files:
            data = stored_instance(fed.orthanc, sop_uid(path))
            assert data is not None, f"{path.name} not in Orthanc"
            ds = pydicom.dcmread(io.BytesIO(data))
            original = pydicom.dcmread(path)
            # The local patient, the prefixed accession number ...
            assert ds.PatientID == local_patient_id(0, ALICE)
            assert ds.IssuerOfPatientID == ALPHA_OID
            assert ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == ALPHA_OID
            assert ds.AccessionNumber == "BETA-" + original.AccessionNumber
            # ... the original identifiers preserved ...
            [other] = ds.OtherPatientIDsSequence
            assert (other.PatientID, other.IssuerOfPatientID) == (
                local_patient_id(1, ALICE),
                BETA_OID,
            )
            [change] = ds.OriginalAttributesSequence
            assert change.ReasonForTheAttributeModification == "COERCE"
            assert change.SourceOfPreviousValues == BETA_HOME
            previous = change.ModifiedAttributesSequence[0]
            assert previous.PatientID == local_patient_id(1, ALICE)
            assert previous.AccessionNumber == original.AccessionNumber
            # ... the same instance, pixel for pixel.
            for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                assert ds[keyword].value == original[keyword].value
            assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert ds.PixelData == original.PixelData
    # Orthanc files them under the local patient (its own index, through REST).
    tags = stored_tags(fed.orthanc, sop_uid(priors[0].files[0]))
    assert tags["PatientID"] == local_patient_id(0, ALICE)
    assert tags["AccessionNumber"].startswith("BETA-")
    # alpha's own studies of alice are local: not imported.
    local = fed.alpha_of(ALICE)
    assert local
    for study in local:
        assert stored_instance(fed.orthanc, sop_uid(study.files[0])) is None
    # One DICOM "Import" audit message per study, naming the local patient and the study.
    imports = arr.with_event("110107")
    assert len(imports) == len(priors), [etree.tostring(e)[:300] for e in arr.records]
    for event in imports:
        assert event.find("EventIdentification").get("EventActionCode") == "C"
        assert event.find("EventIdentification").get("EventOutcomeIndicator") == "0"
        objects = {
            o.get("ParticipantObjectID") for o in event.iter("ParticipantObjectIdentification")
        }
        assert cx(0, ALICE) in objects
        assert objects & {s.study_instance_uid for s in priors}
        roles = {
            (p.get("UserID"), p.find("RoleIDCode").get("csd-code"))
            for p in event.iter("ActiveParticipant")
        }
        assert (BETA_HOME, "110153") in roles


def test_malformed_instance_is_reported_and_never_stored(fed: Federation) -> None:
    clear_orthanc(fed.orthanc)
    result = run_cli(*cli_args(fed, cx(0, DAVE)), "--no-audit")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [study] = fed.beta_of(DAVE)
    assert f"stored {len(study.files) - 1}, failed 1" in result.stdout
    assert sop_uid(fed.truncated) in result.stderr
    assert stored_instance(fed.orthanc, sop_uid(fed.truncated)) is None
    for path in study.files:
        if path != fed.truncated:
            assert stored_instance(fed.orthanc, sop_uid(path)) is not None


def test_api_filters_by_study_and_community(fed: Federation) -> None:
    clear_orthanc(fed.orthanc)
    first, second = fed.beta_of(ALICE)[:2]

    async def run(selection: PriorSelection) -> Any:
        ctx = client_context(fed.pki.ca, fed.pki.client.cert, fed.pki.client.key)
        async with httpx.AsyncClient(verify=ctx, timeout=60) as client:
            return await import_priors(
                HttpsFederation(client, fed.alpha.base_url, progress=False),
                patient_id=cx(0, ALICE),
                selection=selection,
                store=PacsStore("127.0.0.1", fed.orthanc.dicom_port, fed.orthanc.ae_title),
                accession_prefixes={BETA_HOME: "B:"},
            )

    report = asyncio.run(
        run(PriorSelection(ALPHA_HOME, study_instance_uids=frozenset({second.study_instance_uid})))
    )
    assert [s.study_instance_uid for s in report.studies] == [second.study_instance_uid]
    assert report.ok and report.stored == len(second.files)
    assert report.local_studies_skipped == len(fed.alpha_of(ALICE))
    assert report.studies[0].accession_number == "B:" + second.accession_number
    assert stored_instance(fed.orthanc, sop_uid(first.files[0])) is None
    ds = pydicom.dcmread(io.BytesIO(stored_instance(fed.orthanc, sop_uid(second.files[0])) or b""))
    assert ds.AccessionNumber == "B:" + second.accession_number

    # From a community that has nothing: nothing to import, nothing stored.
    other = asyncio.run(
        run(PriorSelection(ALPHA_HOME, from_communities=frozenset({f"urn:oid:{ARC}.70.9"})))
    )
    assert other.nothing_to_import and other.ok

    # include_local would take alpha's own study too (reconciliation leaves it as it is).
    local = asyncio.run(
        run(
            PriorSelection(ALPHA_HOME, from_communities=frozenset({ALPHA_HOME}), include_local=True)
        )
    )
    assert {s.study_instance_uid for s in local.studies} == {
        s.study_instance_uid for s in fed.alpha_of(ALICE)
    }
    ds = pydicom.dcmread(
        io.BytesIO(stored_instance(fed.orthanc, sop_uid(fed.alpha_of(ALICE)[0].files[0])) or b"")
    )
    assert ds.PatientID == local_patient_id(0, ALICE)
    assert "OriginalAttributesSequence" not in ds


def test_compressed_prior_is_converted_for_a_pacs_that_refuses_it(
    fed: Federation, tmp_path: Path
) -> None:
    """dcmtk's storescp takes native syntaxes only: alice's RLE study at beta comes from the
    federation as stored, the PACS refuses it compressed, and it is stored native instead,
    the same pixels (RLE is lossless); Orthanc, which takes RLE, got it as stored (above)."""
    storescp = dcmtk("storescp")
    compressed = next(s for s in fed.beta_of(ALICE) if s.transfer_syntax_uid == RLE_LOSSLESS)
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    pacs = subprocess.Popen(
        [storescp, "-aet", "NATIVEPACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: _listening(port), timeout=15)

        async def run() -> Any:
            ctx = client_context(fed.pki.ca, fed.pki.client.cert, fed.pki.client.key)
            async with httpx.AsyncClient(verify=ctx, timeout=60) as client:
                return await import_priors(
                    HttpsFederation(client, fed.alpha.base_url, progress=False),
                    patient_id=cx(0, ALICE),
                    selection=PriorSelection(
                        ALPHA_HOME,
                        study_instance_uids=frozenset({compressed.study_instance_uid}),
                    ),
                    store=PacsStore("127.0.0.1", port, "NATIVEPACS"),
                )

        report = asyncio.run(run())
    finally:
        pacs.terminate()
        pacs.wait(10)
    assert report.ok and report.stored == len(compressed.files), report
    received = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in out.iterdir()}
    for path in compressed.files:
        got = pydicom.dcmread(received[sop_uid(path)])
        assert got.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        native = pydicom.dcmread(
            io.BytesIO(transcode(path.read_bytes(), EXPLICIT_VR_LITTLE_ENDIAN))
        )
        assert got.PixelData == native.PixelData


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_unknown_patient_has_nothing_to_import(fed: Federation) -> None:
    result = run_cli(*cli_args(fed, cx(0, CAROL)), "--no-audit")  # carol: no xref to beta
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no foreign prior study found" in result.stdout
    assert "stored 0 instance(s), failed 0" in result.stdout


def test_unreachable_pacs_fails_fast(fed: Federation) -> None:
    """A C-ECHO first: a dead PACS is said in one line before anything is fetched."""
    port = free_port()
    result = run_cli(
        *cli_args(fed, cx(0, BOB))[:-4],
        "--pacs",
        f"127.0.0.1:{port}",
        "--pacs-ae",
        "NOBODY",
        "--no-audit",
    )
    assert result.returncode == 1
    assert result.stdout == ""  # no study was fetched, none reported
    assert result.stderr.strip() == (
        f"xca-gateway: import-priors: the PACS NOBODY@127.0.0.1:{port}: connection refused "
        "(is it running?)"
    )


def test_pacs_that_is_up_is_echoed_first(fed: Federation) -> None:
    PacsStore("127.0.0.1", fed.orthanc.dicom_port, fed.orthanc.ae_title, timeout=10).echo()


def test_progress_on_a_terminal_shows_rate_and_time_left(fed: Federation) -> None:
    """On a terminal (a pty here) each study has a progress line: instances, rate, MB/s,
    time left; it is erased when the study's result line is printed."""
    import pty

    clear_orthanc(fed.orthanc)
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xca_gateway",
                "import-priors",
                *cli_args(fed, cx(0, ALICE)),
                "--no-audit",
            ],
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        )
        os.close(secondary)
        secondary = -1
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = process.communicate(timeout=180)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert process.returncode == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "instances" in text and "/s" in text and "MB/s" in text, text
    assert "beta …" in text  # the source community by name
    for study in fed.beta_of(ALICE):
        assert f"stored {len(study.files)}, failed 0" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patient", "not-a-cx"], "CX"),
        (["--pacs", "nohostport"], "HOST:PORT"),
        (["--accession-prefix", "noequals"], "HOMEID=PREFIX"),
        (["--community", "nowhere"], "no community"),
    ],
)
def test_bad_arguments_are_usage_errors(fed: Federation, args: list[str], message: str) -> None:
    base = cli_args(fed, cx(0, ALICE))
    for index in range(0, len(base), 2):
        if base[index] == args[0]:
            base[index + 1] = args[1]
            break
    else:
        base += args
    result = run_cli(*base)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_reimport_keeps_one_prefix(fed: Federation) -> None:
    """Importing the same prior again stores the same reconciled instance, not a re-prefixed one."""
    clear_orthanc(fed.orthanc)
    for _ in range(2):
        result = run_cli(*cli_args(fed, cx(0, BOB)), "--no-audit")
        assert result.returncode == 0, result.stdout + result.stderr
    [study] = fed.beta_of(BOB)
    ds: Dataset = pydicom.dcmread(
        io.BytesIO(stored_instance(fed.orthanc, sop_uid(study.files[0])) or b"")
    )
    assert ds.AccessionNumber == "BETA-" + study.accession_number
    assert len(ds.OriginalAttributesSequence) == 1
