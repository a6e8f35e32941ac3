"""The CLI and the demo contract (docs/contract.md): endpoints.json, clean stop."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil
import pytest

from tests.test_initiating import find_documents
from tests.test_mtom_server import read_mtom
from tests.test_server import soap12
from xca_gateway.app.config import load_config
from xca_gateway.protocol.namespaces import QUERY, RIM, RS, SOAP12, XDSB, XDSI, Action
from xca_gateway.protocol.soap import element_content
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.operators import read_operator_token
from xca_gateway.tools.demo import DemoCommunity

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xca_gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_documents_every_command() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("serve", "certs", "demo"):
        assert command in top.stdout
    for args in (("serve", "--help"), ("certs", "init", "--help"), ("demo", "--help")):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "--" in result.stdout


def test_certs_init_command(tmp_path: Path) -> None:
    result = run_cli("certs", "init", "--dir", str(tmp_path), "--communities", "north,south")
    assert result.returncode == 0, result.stderr
    for name in (
        "ca.pem",
        "north.pem",
        "north.key",
        "south.pem",
        "client.pem",
        "expired-client.pem",
    ):
        assert (tmp_path / name).is_file()
    bad = run_cli("certs", "init", "--dir", str(tmp_path / "x"), "--communities", "Bad Name")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_serve_reports_configuration_errors_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[community]\nname = "x"\nhome_community_id = "not-an-oid"\n')
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "configuration error" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["north", "south", "east"])
def test_example_configurations_load(name: str) -> None:
    config = load_config(REPO / "conf" / f"{name}.toml")
    assert config.community.name == name
    assert len(config.peers) == 2
    assert config.tls.certificate == (REPO / "certs" / f"{name}.pem")


def test_reference_configuration_loads() -> None:
    config = load_config(REPO / "conf" / "gateway.toml")
    assert config.admin.host == "127.0.0.1"
    assert config.limits.max_request_bytes == 1024**3


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    workdir = tmp_path_factory.mktemp("demo")
    process = subprocess.Popen(
        [sys.executable, "-m", "xca_gateway", "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    endpoints = workdir / "endpoints.json"
    deadline = time.monotonic() + 60
    while not endpoints.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    if not endpoints.exists():
        process.kill()
        out = process.communicate(timeout=10)[0].decode(errors="replace")
        pytest.fail(f"demo did not write endpoints.json:\n{out}")
    yield process, workdir
    if process.poll() is None:
        process.kill()
        process.wait(10)


def _endpoints(workdir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workdir / "endpoints.json").read_text())
    return data


def test_endpoints_json_follows_the_contract(demo: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, workdir = demo
    data = _endpoints(workdir)
    for key in ("ca",):
        assert Path(data[key]).is_absolute() and Path(data[key]).is_file()
    for who in ("client", "untrusted_client", "expired_client"):
        for part in ("cert", "key"):
            assert Path(data[who][part]).is_absolute() and Path(data[who][part]).is_file()
    communities = data["communities"]
    assert [c["name"] for c in communities] == ["north", "south", "east"]
    keys_by_community = []
    for c in communities:
        assert c["homeCommunityId"].startswith("urn:oid:")
        authority = c["patientIdAssigningAuthority"]
        assert authority.replace(".", "").isdigit()
        assert set(c["endpoints"]) == {"iti38", "iti39", "rad75", "iti18", "iti43", "rad69"}
        for url in c["endpoints"].values():
            assert url.startswith("https://127.0.0.1:")
        assert c["admin"].startswith("http://127.0.0.1:")
        ids = set()
        for patient in c["samplePatients"]:
            pid = patient["id"]
            assert pid.endswith(f"^^^&{authority}&ISO")
            ids.add(pid)
        assert len(ids) == len(c["samplePatients"])
        keys_by_community.append({p["crossCommunityKey"]: p["id"] for p in c["samplePatients"]})
    # The same person appears in every community under a different local patient id.
    shared = set.intersection(*(set(k) for k in keys_by_community))
    assert shared
    for key in shared:
        assert len({k[key] for k in keys_by_community}) == len(communities)
    assert len({c["homeCommunityId"] for c in communities}) == len(communities)
    # Keys not built yet are absent, not null (docs/contract.md).
    assert "auditRepository" not in data or data["auditRepository"] is not None


def test_demo_endpoints_use_mutual_tls(demo: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, workdir = demo
    data = _endpoints(workdir)
    ca = Path(data["ca"])
    good = client_context(ca, Path(data["client"]["cert"]), Path(data["client"]["key"]))
    untrusted = client_context(
        ca, Path(data["untrusted_client"]["cert"]), Path(data["untrusted_client"]["key"])
    )
    body = b"<hello/>"
    headers = {"content-type": "application/soap+xml"}
    for community in data["communities"]:
        for url in community["endpoints"].values():
            with httpx.Client(verify=good, timeout=10) as client:
                # Not SOAP, so a VersionMismatch fault: the point is that we are answered. The
                # client is a local consumer: the responding side (/xca/*) refuses it at the door.
                expected = 403 if "/xca/" in url else 500
                assert client.post(url, content=body, headers=headers).status_code == expected
        with (
            httpx.Client(verify=untrusted, timeout=10) as client,
            pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        ):
            client.post(community["endpoints"]["iti38"], content=body, headers=headers)
        assert httpx.get(community["admin"] + "/healthz").status_code == 200


def test_demo_consumer_query_reaches_every_community(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """A consumer's ITI-18 at one community fans out to the others with their patient ids."""
    from lxml import etree

    _, workdir = demo
    data = _endpoints(workdir)
    ctx = client_context(
        Path(data["ca"]), Path(data["client"]["cert"]), Path(data["client"]["key"])
    )
    north = data["communities"][0]
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    with httpx.Client(verify=ctx, timeout=30) as client:
        response = client.post(
            north["endpoints"]["iti18"],
            content=soap12(Action.ITI18, find_documents(alice)),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200
    payload = etree.fromstring(response.content).find(
        f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse"
    )
    assert payload is not None
    answered = {o.get("home") for o in payload.iter(f"{{{RIM}}}ExtrinsicObject")} | {
        e.get("location") for e in payload.iter(f"{{{RS}}}RegistryError")
    }
    others = {c["homeCommunityId"] for c in data["communities"][1:]}
    assert others <= answered
    # alice has imaging manifests in every community: one merged view, each under its home.
    homes = {o.get("home") for o in payload.iter(f"{{{RIM}}}ExtrinsicObject")}
    assert homes == {c["homeCommunityId"] for c in data["communities"]}
    assert payload.get("status", "").endswith(":Success")
    unavailable = [
        e
        for e in payload.iter(f"{{{RS}}}RegistryError")
        if e.get("errorCode") == "XDSUnavailableCommunity"
    ]
    assert not unavailable


def test_demo_images_travel_across_communities(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """RAD-69 at north for a study held by south's imaging source: RAD-75 across, streamed."""
    import pydicom
    from lxml import etree

    _, workdir = demo
    data = _endpoints(workdir)
    north, south = data["communities"][0], data["communities"][1]
    studies = json.loads((workdir / "south" / "data" / "samples.json").read_text())["studies"]
    files = [Path(f) for f in studies[0]["files"]]
    source_id = DemoCommunity(1, "south").imaging_source_id
    series: dict[str, list[str]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series.setdefault(ds.SeriesInstanceUID, []).append(ds.SOPInstanceUID)
    body = "".join(
        f'<xdsi:SeriesRequest seriesInstanceUID="{uid}">'
        + "".join(
            f"<xdsi:DocumentRequest><xdsb:HomeCommunityId>{south['homeCommunityId']}"
            f"</xdsb:HomeCommunityId><xdsb:RepositoryUniqueId>{source_id}</xdsb:RepositoryUniqueId>"
            f"<xdsb:DocumentUniqueId>{sop}</xdsb:DocumentUniqueId></xdsi:DocumentRequest>"
            for sop in sops
        )
        + "</xdsi:SeriesRequest>"
        for uid, sops in series.items()
    )
    request = (
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI}" xmlns:xdsb="{XDSB}">'
        f'<xdsi:StudyRequest studyInstanceUID="{studies[0]["studyInstanceUid"]}">{body}'
        "</xdsi:StudyRequest><xdsi:TransferSyntaxUIDList>"
        "<xdsi:TransferSyntaxUID>1.2.840.10008.1.2.1</xdsi:TransferSyntaxUID>"
        "</xdsi:TransferSyntaxUIDList></xdsi:RetrieveImagingDocumentSetRequest>"
    )
    ctx = client_context(
        Path(data["ca"]), Path(data["client"]["cert"]), Path(data["client"]["key"])
    )
    with httpx.Client(verify=ctx, timeout=60) as client:
        response = client.post(
            north["endpoints"]["rad69"],
            content=soap12(Action.RAD69, request),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200, response.text[:300]
    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    with read_mtom(response) as message:
        root = etree.fromstring(message.root)
        status = root.find(f".//{{{RS}}}RegistryResponse")
        assert status is not None and status.get("status", "").endswith("Success")
        received = 0
        for doc in root.iter(f"{{{XDSB}}}DocumentResponse"):
            uid = doc.findtext(f"{{{XDSB}}}DocumentUniqueId") or ""
            assert doc.findtext(f"{{{XDSB}}}HomeCommunityId") == south["homeCommunityId"]
            content = element_content(doc.find(f"{{{XDSB}}}Document"), message.attachments)  # type: ignore[arg-type]
            data_bytes = content if isinstance(content, bytes) else content.read_all()
            assert data_bytes == expected[uid].read_bytes()  # byte-identical to the source
            received += 1
    assert received == len(files)


def test_demo_retrieve_study_fetches_a_patients_images_from_every_community(
    demo: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    """The consumer flow: ITI-18 → ITI-43 (KOS) → RAD-69, across communities, to disk."""
    _, workdir = demo
    data = _endpoints(workdir)
    north = data["communities"][0]
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    out = tmp_path / "out"
    result = run_cli(
        "retrieve-study",
        "--endpoints",
        str(workdir / "endpoints.json"),
        "--community",
        "north",
        "--patient",
        alice,
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    # Every source file of alice's studies, in every community, arrived byte-identical.
    expected: dict[str, bytes] = {}
    for community in data["communities"]:
        studies = json.loads((workdir / community["name"] / "data" / "samples.json").read_text())
        mine = next(
            p["id"] for p in community["samplePatients"] if p["crossCommunityKey"] == "alice"
        )
        for study in studies["studies"]:
            if mine.startswith(study["patientId"] + "^"):
                for f in study["files"]:
                    expected[Path(f).stem] = Path(f).read_bytes()
    received = {f.stem: f.read_bytes() for f in out.rglob("*.dcm")}
    assert expected and received == expected
    assert not list(out.rglob(".*.part"))


def test_demo_dicom_front_door_finds_studies_in_every_community(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """A PACS workstation's C-FIND at north lists alice's studies from all communities."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    _, workdir = demo
    data = _endpoints(workdir)
    north = data["communities"][0]
    assert set(north["dicom"]) >= {"aeTitle", "host", "port", "tls", "callingAeTitle"}
    assert north["dicom"]["tls"] is True
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    expected = 0
    for community in data["communities"]:
        mine = next(
            p["id"] for p in community["samplePatients"] if p["crossCommunityKey"] == "alice"
        )
        studies = json.loads((workdir / community["name"] / "data" / "samples.json").read_text())
        expected += sum(mine.startswith(s["patientId"] + "^") for s in studies["studies"])
    # DICOM TLS as north's local consumer, with the calling AE title north ties to it.
    consumer = north["identities"]["localConsumer"]
    tls = client_context(Path(data["ca"]), Path(consumer["cert"]), Path(consumer["key"]))
    ae = AE(ae_title=north["dicom"]["callingAeTitle"])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(
        north["dicom"]["host"],
        north["dicom"]["port"],
        ae_title=north["dicom"]["aeTitle"],
        tls_args=(tls, north["dicom"]["host"]),
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = alice.split("^")[0]
    query.IssuerOfPatientID = north["patientIdAssigningAuthority"]
    query.StudyInstanceUID = ""
    try:
        matches = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status is not None and status.Status in (0xFF00, 0xFF01)
        ]
    finally:
        assoc.release()
    assert len({m.StudyInstanceUID for m in matches}) == expected


def test_demo_dicomweb_front_door_answers_dicomweb_client(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """endpoints.json's "dicomweb" root (contract.md) serves QIDO-RS and WADO-RS to a real
    DICOMweb client: alice's studies from every community, and one instance retrieved."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    _, workdir = demo
    data = _endpoints(workdir)
    north = data["communities"][0]
    assert north["dicomweb"].startswith("https://127.0.0.1:")
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    session = requests.Session()
    session.trust_env = False  # no CA bundle from the environment: the demo CA only
    session.verify = data["ca"]
    session.cert = (data["client"]["cert"], data["client"]["key"])
    client = DICOMwebClient(url=north["dicomweb"], session=session)
    studies = client.search_for_studies(search_filters={"PatientID": alice.split("^")[0]})
    expected = 0
    for community in data["communities"]:
        mine = next(
            p["id"] for p in community["samplePatients"] if p["crossCommunityKey"] == "alice"
        )
        listed = json.loads((workdir / community["name"] / "data" / "samples.json").read_text())
        expected += sum(mine.startswith(s["patientId"] + "^") for s in listed["studies"])
    uids = {s["0020000D"]["Value"][0] for s in studies}
    assert len(uids) == expected > 1
    study = sorted(uids)[0]
    instances = client.search_for_instances(study_instance_uid=study)
    assert instances
    first = instances[0]
    series = first["0020000E"]["Value"][0]
    sop = first["00080018"]["Value"][0]
    ds = client.retrieve_instance(study, series, sop)
    assert ds.SOPInstanceUID == sop


def test_demo_consent_admin_api_takes_the_operator_token(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """endpoints.json names each community's consent API, its operator and token file; the
    token opens it, nothing else does."""
    import urllib.parse

    _, workdir = demo
    for community in _endpoints(workdir)["communities"]:
        admin = community["consentAdmin"]
        operator, token = read_operator_token(Path(admin["tokenFile"]), admin["operator"])
        patient = urllib.parse.quote(community["samplePatients"][0]["id"], safe="")
        url = f"{admin['url']}/patients/{patient}"
        assert httpx.get(url, timeout=10).status_code == 401
        answer = httpx.get(url, headers={"authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert operator == "demo-operator"


def _read_until(process: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """What the demo printed, up to ``marker`` (bounded wait, non-blocking reads)."""
    import select

    assert process.stdout is not None
    fd = process.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_demo_banner_says_where_to_look_and_what_to_try(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, workdir = demo
    text = _read_until(process, b"Ctrl-C stops", 30).decode(errors="replace")
    data = _endpoints(workdir)
    assert "communities ready" in text, text
    for community in data["communities"]:
        assert f"{community['admin']}/" in text
    arr = data["auditRepository"]
    assert f"{arr['ui']}/login" in text
    assert arr["officer"]["username"] in text and arr["officer"]["password"] in text
    for clinician in data["clinicians"]:
        assert clinician["username"] in text and clinician["password"] in text
    assert data["communities"][0]["viewer"]["launch"] + "?requestType=PATIENT" in text
    [command] = [line.strip() for line in text.splitlines() if "xca-gateway query" in line]
    assert command.startswith("xca-gateway query --endpoints ")
    # The first command to try works as printed.
    result = run_cli(*command.split()[1:])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status Success" in result.stdout


def test_second_demo_on_a_workdir_in_use_is_refused(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, workdir = demo
    result = run_cli("demo", "--workdir", str(workdir), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"xca-gateway demo: {workdir.resolve()} is in use by another demo (pid {process.pid}); "
        "stop it, or give another --workdir"
    )
    # The first demo is untouched: still running, its endpoints.json still there.
    assert process.poll() is None
    assert (workdir / "endpoints.json").is_file()


def test_demo_web_door_signs_in_a_demo_clinician_and_serves_data(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """contract.md "Viewer": each community's web door and launch URL, the demo authorization
    server and its clinicians; a clinician signs in with code + PKCE (httpx, as a browser
    would) and reads the federation through the web door with the session."""
    _, workdir = demo
    data = _endpoints(workdir)
    server = data["authorizationServer"]
    assert set(server) >= {"issuer", "authorizationEndpoint", "tokenEndpoint", "jwksUri"}
    names = [c["name"] for c in data["communities"]]
    assert sorted(c["community"] for c in data["clinicians"]) == sorted(names)
    for c in data["communities"]:
        assert c["webUrl"].startswith("https://127.0.0.1:")
        assert c["launchUrl"].startswith(c["webUrl"] + "/iid?") and "{patientID}" in c["launchUrl"]
        assert c["viewer"]["launch"] == c["webUrl"] + "/iid"
    north = data["communities"][0]
    clinician = next(c for c in data["clinicians"] if c["community"] == north["name"])
    patient = north["samplePatients"][0]["id"].split("^")[0]
    with _browser(data) as browser:
        assert browser.get(f"{north['webUrl']}/dicomweb/studies").status_code == 401
        _sign_in(browser, data, north, clinician)
        answer = browser.get(f"{north['webUrl']}/dicomweb/studies", params={"PatientID": patient})
        assert answer.status_code == 200, answer.text
        assert answer.json()


def _browser(data: dict[str, Any]) -> httpx.Client:
    context = ssl.create_default_context(cafile=data["ca"])
    return httpx.Client(verify=context, timeout=60, trust_env=False)


def _sign_in(
    browser: httpx.Client,
    data: dict[str, Any],
    community: dict[str, Any],
    clinician: dict[str, str],
) -> None:
    """The code + PKCE login at the community's web door, as a browser does it."""
    server = data["authorizationServer"]
    start = browser.get(f"{community['webUrl']}/login", params={"next": "/"})
    assert start.status_code == 303
    authorize = start.headers["location"]
    assert authorize.startswith(server["authorizationEndpoint"])
    page = browser.get(authorize)
    hidden = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.text))
    hidden = {k: v.replace("&amp;", "&") for k, v in hidden.items()}
    login = browser.post(
        server["authorizationEndpoint"],
        data={**hidden, "username": clinician["username"], "password": clinician["password"]},
    )
    assert login.status_code == 303
    callback = login.headers["location"]
    assert parse_qs(urlsplit(callback).query)["code"]
    signed_in = browser.get(callback)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"


def _audit_events(data: dict[str, Any], **params: str) -> list[dict[str, Any]]:
    """ITI-81 at the demo's repository, as its audit consumer."""
    arr = data["auditRepository"]
    pair = arr["auditConsumer"]
    context = client_context(Path(data["ca"]), Path(pair["cert"]), Path(pair["key"]))
    with httpx.Client(verify=context, timeout=60, trust_env=False) as client:
        answer = client.get(
            arr["fhir"] + "/AuditEvent",
            params={"date": "ge2000-01-01", **params, "_count": "100"},
        )
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", [])]


def _settled(fetch: Callable[[], list[dict[str, Any]]], at_least: int = 1) -> list[dict[str, Any]]:
    """What ``fetch`` finds once it found ``at_least`` and then nothing more for a moment (the
    gateways' audit spools deliver within a second; a duplicate would arrive as soon)."""
    found: list[dict[str, Any]] = []
    for _ in range(300):
        found = fetch()
        if len(found) >= at_least:
            break
        time.sleep(0.1)
    time.sleep(2)
    return fetch()


def test_the_officers_report_names_the_clinician_who_launched_and_viewed(
    demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """Issue 23: north's clinician opens the IID launch for alice and views a study south holds.
    The launch and the view are audited once each (110103, the clinician and the patient); the
    peer's records name the clinician as north's do; and the officer's patient access report
    lists "Dr North Clinician viewed alice's study in south" (CSV, as the page shows it)."""
    _, workdir = demo
    data = _endpoints(workdir)
    north, south = data["communities"][0], data["communities"][1]
    clinician = next(c for c in data["clinicians"] if c["community"] == north["name"])
    issuer = data["authorizationServer"]["issuer"]
    person = f"{clinician['name']}<{clinician['username']}@{issuer}>"
    alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
    with _browser(data) as browser:
        _sign_in(browser, data, north, clinician)
        launch = browser.get(
            north["viewer"]["launch"], params={"requestType": "PATIENT", "patientID": alice}
        )
        assert launch.status_code == 200, launch.text
        rows = re.findall(
            r'<tr data-study="([^"]+)">\s*<td class="community">([^<]*)</td>', launch.text
        )
        study = next(uid for uid, where in rows if where == south["name"])
        for _ in range(2):  # the viewer fetches a study piece by piece: one view
            shown = browser.get(f"{north['webUrl']}/dicomweb/studies/{study}/metadata")
            assert shown.status_code == 200, shown.text
    user_key = f"{clinician['username']}@{issuer}"
    launches = _settled(
        lambda: _audit_events(data, agent=user_key, subtype="RAD-106", source="north-gateway")
    )
    views = _settled(
        lambda: [
            e
            for e in _audit_events(data, agent=user_key, type="110103", entity=study)
            if not e.get("subtype")
        ]
    )
    assert len(launches) == 1 and len(views) == 1, (launches, views)
    for event in (*launches, *views):
        names = {a.get("name") for a in event["agent"] if a["requestor"]}
        assert person in names, names
        # The patient (role 1): north's id at the launch, the manifest's (south's) at the view.
        patients = [
            e["what"]["identifier"]["value"]
            for e in event["entity"]
            if e.get("role", {}).get("code") == "1"
        ]
        assert patients and patients[0].startswith("C0"), event["entity"]
    # South served north's RAD-75 for the view: its record names the same person.
    at_south = _settled(lambda: _audit_events(data, agent=user_key, source="south-gateway"))
    assert at_south
    for event in at_south:
        assert person in {a.get("name") for a in event["agent"]}, event["agent"]
    # The officer's report (the repository's UI, signed in as the demo officer).
    arr = data["auditRepository"]
    with _browser(data) as officer:
        page = officer.get(arr["ui"] + "/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        signed_in = officer.post(
            arr["ui"] + "/login",
            data={
                "csrf": token.group(1),
                "username": arr["officer"]["username"],
                "password": arr["officer"]["password"],
            },
        )
        assert signed_in.status_code == 303, signed_in.text
        report = officer.get(arr["ui"] + "/report.csv", params={"patient": alice})
        assert report.status_code == 200, report.text
    rows_csv = list(csv.DictReader(io.StringIO(report.text)))
    viewed = [r for r in rows_csv if r["access"] == "view"]
    assert len(viewed) == 1, rows_csv
    assert viewed[0]["user"] == person
    assert viewed[0]["community"] == south["name"]
    assert viewed[0]["what"] == f"viewed study {study}"
    assert viewed[0]["user_address"] == "127.0.0.1"
    launched = [r for r in rows_csv if r["access"] == "launch"]
    assert len(launched) == 1 and launched[0]["user"] == person


def test_demo_stops_cleanly_on_sigterm(demo: tuple[subprocess.Popen[bytes], Path]) -> None:
    process, workdir = demo
    parent = psutil.Process(process.pid)
    # One gateway per community, the audit record repository (with its workers) and the
    # authorization server.
    assert len(parent.children()) == 3 + 1 + 1
    children = parent.children(recursive=True)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"stray processes: {alive}"
    assert not (workdir / "endpoints.json").exists()


def test_killed_demo_leaves_no_stray_gateways(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xca_gateway",
            "demo",
            "--workdir",
            str(tmp_path),
            "--communities",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "endpoints.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        parent = psutil.Process(process.pid)
        # two gateways, the audit repository and the authorization server
        assert len(parent.children()) == 2 + 1 + 1
        children = parent.children(recursive=True)
        process.kill()  # SIGKILL: no chance to clean up, the kernel must take the children down
        process.wait(10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        if process.poll() is None:
            process.kill()


def test_demo_with_replicas_runs_each_community_behind_haproxy(tmp_path: Path) -> None:
    """``--replicas 2``: endpoints.json is unchanged for clients (the public URLs are the
    balancer's), each community lists its replicas' admin URLs, every replica is ready, a
    cross-community query through the balancers works, and SIGTERM stops every process
    (HAProxy and PostgreSQL included)."""
    from lxml import etree

    workdir = tmp_path / "demo"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "xca_gateway", "demo", "--workdir", str(workdir)),
            *("--communities", "2", "--replicas", "2"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        endpoints = workdir / "endpoints.json"
        deadline = time.monotonic() + 180
        while not endpoints.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        if not endpoints.exists():
            process.kill()
            out = process.communicate(timeout=10)[0].decode(errors="replace")
            pytest.fail(f"demo did not write endpoints.json:\n{out}")
        data = _endpoints(workdir)
        for community in data["communities"]:
            assert len(community["replicas"]) == 2
            assert community["admin"] == community["replicas"][0]
            for admin in community["replicas"]:
                assert httpx.get(admin + "/readyz", timeout=10).status_code == 200
        ctx = client_context(
            Path(data["ca"]), Path(data["client"]["cert"]), Path(data["client"]["key"])
        )
        north = data["communities"][0]
        alice = next(p["id"] for p in north["samplePatients"] if p["crossCommunityKey"] == "alice")
        homes: set[str | None] = set()
        for _ in range(2):  # round robin: each of north's replicas answers once
            with httpx.Client(verify=ctx, timeout=60) as client:
                response = client.post(
                    north["endpoints"]["iti18"],
                    content=soap12(Action.ITI18, find_documents(alice)),
                    headers={"content-type": "application/soap+xml"},
                )
            assert response.status_code == 200
            payload = etree.fromstring(response.content).find(
                f"{{{SOAP12}}}Body/{{{QUERY}}}AdhocQueryResponse"
            )
            assert payload is not None
            homes = {o.get("home") for o in payload.iter(f"{{{RIM}}}ExtrinsicObject")}
            assert homes == {c["homeCommunityId"] for c in data["communities"]}
        parent = psutil.Process(process.pid)
        children = parent.children(recursive=True)
        names = [p.name() for p in children]
        assert names.count("haproxy") >= 2 and "postgres" in names
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"stray processes: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
