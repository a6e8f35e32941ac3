"""End to end on the demo: the gateways audit to the demo's repository, an Audit Consumer finds
their events with ITI-81, and an officer reviews them in Chromium.

Runs once ``xca-gateway demo`` starts the repository and writes ``auditRepository`` into
endpoints.json (contract.md); until then it is skipped with that reason.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import ssl
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from tests.demo_process import running_demo
from tests.test_initiating import find_documents
from tests.test_server import soap12
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import client_context

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = "urn:xca-gateway:arr:flags"
SENDER = "urn:xca-gateway:arr:authenticated-sender"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_demo(tmp_path_factory.mktemp("arr-demo")) as data:
        yield data


def consumer(data: dict[str, Any]) -> httpx.Client:
    ctx = client_context(
        Path(data["ca"]), Path(data["client"]["cert"]), Path(data["client"]["key"])
    )
    return httpx.Client(verify=ctx, timeout=60)


def audit_consumer(data: dict[str, Any]) -> httpx.Client:
    """The identity that may search ITI-81 (contract.md: auditRepository.auditConsumer)."""
    pair = data["auditRepository"]["auditConsumer"]
    ctx = client_context(Path(data["ca"]), Path(pair["cert"]), Path(pair["key"]))
    return httpx.Client(verify=ctx, timeout=60)


def alice(data: dict[str, Any], community: int) -> str:
    patients = data["communities"][community]["samplePatients"]
    return str(next(p["id"] for p in patients if p["crossCommunityKey"] == "alice"))


def run_consumer_query(data: dict[str, Any]) -> None:
    north = data["communities"][0]
    with consumer(data) as client:
        response = client.post(
            north["endpoints"]["iti18"],
            content=soap12(Action.ITI18, find_documents(alice(data, 0))),
            headers={"content-type": "application/soap+xml"},
        )
    assert response.status_code == 200


def search(data: dict[str, Any], **params: str) -> Bundle:
    arr = data["auditRepository"]
    with audit_consumer(data) as client:
        response = client.get(arr["fhir"] + "/AuditEvent", params=params)
    assert response.status_code == 200, response.text
    return Bundle.model_validate(response.json())


def test_iti81_returns_what_the_demo_gateways_audited(demo: dict[str, Any]) -> None:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    run_consumer_query(demo)
    starts = search(demo, date=f"ge{today}", type="110100")
    assert starts.total is not None and starts.total >= len(demo["communities"])
    # The ITI-18 at north fanned out as ITI-38 to the others, each auditing alice's id there.
    deadline = time.monotonic() + 30
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = set()
        for index, community in enumerate(demo["communities"]):
            oid = community["patientIdAssigningAuthority"]
            pid = alice(demo, index).split("^", 1)[0]
            bundle = search(
                demo, date=f"ge{today}", **{"patient.identifier": f"urn:oid:{oid}|{pid}"}
            )
            if bundle.entry:
                seen.add(community["name"])
        if len(seen) == len(demo["communities"]):
            break
        time.sleep(1)
    assert seen == {c["name"] for c in demo["communities"]}
    # Every gateway reports as <community>-gateway with its own certificate, which the
    # repository binds: nothing it sent is flagged, and each record names its sender.
    for community in demo["communities"]:
        bundle = search(demo, date=f"ge{today}", source=f"{community['name']}-gateway")
        assert bundle.entry, community["name"]
        for entry in bundle.entry:
            extensions = {x.url: x.valueString for x in entry.resource.extension or []}
            assert "audit-source-unbound" not in (extensions.get(FLAGS) or "")
            assert f"{community['name']}.xca-gateway.test" in extensions[SENDER]


def test_only_the_audit_consumer_searches_the_demo_trail(demo: dict[str, Any]) -> None:
    """ITI-81 answered any trusted certificate before; now the demo client (a local consumer
    every community lists) and a gateway certificate are refused, the auditConsumer is not."""
    arr = demo["auditRepository"]
    url = arr["fhir"] + "/AuditEvent"
    with consumer(demo) as client:
        refused = client.get(url, params={"date": "ge2020"})
    assert refused.status_code == 403
    assert refused.json()["resourceType"] == "OperationOutcome"
    with audit_consumer(demo) as client:
        assert client.get(url, params={"date": "ge2020"}).status_code == 200


def test_officer_reviews_the_demo_in_chromium(demo: dict[str, Any]) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    arr = demo["auditRepository"]
    host, port = arr["ui"].removeprefix("https://").split(":")
    pem = ssl.get_server_certificate((host, int(port)))
    spki = (
        x509.load_pem_x509_certificate(pem.encode())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    run_consumer_query(demo)
    ARTIFACTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            accept_downloads=True,
            viewport={"width": 1400, "height": 1000},
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--ignore-certificate-errors-spki-list={pin}",
            ],
        )
        try:
            page = context.new_page()
            page.goto(arr["ui"] + "/login")
            page.fill("#username", arr["officer"]["username"])
            page.fill("#password", arr["officer"]["password"])
            page.click("#login")
            sync_api.expect(page.locator("#officer")).to_be_visible()
            page.fill("#f-patient", alice(demo, 0))
            page.click("#search")
            sync_api.expect(page.locator("#events tbody tr").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "arr-demo-01-search.png"), full_page=True)
            page.locator("#events a.event-link").first.click()
            sync_api.expect(page.locator("#raw")).to_contain_text("AuditMessage")
            page.screenshot(path=str(ARTIFACTS / "arr-demo-02-event.png"), full_page=True)
            page.go_back()
            with page.expect_download() as info:
                page.click("#export-csv")
            target = ARTIFACTS / "arr-demo-export.csv"
            info.value.save_as(str(target))
            rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8-sig"))))
            assert rows and all(r["patient"] for r in rows)
        finally:
            context.close()
