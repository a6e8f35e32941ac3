"""Acceptance (issue 18): the security officer sees every access to a patient's images.

On the demo, the consumer flow (``retrieve-study``: ITI-18 through north's initiating gateway,
then per study ITI-43 for its manifest and RAD-69 for its instances) runs for alice, who has
studies in all three communities. A real Chromium (Debian's, driven by Playwright) then signs in
to the repository's officers' listener, picks a time zone, and finds in alice's access report
one row per access: the query, each manifest retrieve, each study retrieve, each with the
community that held the data, the consumer's certificate as the user and the studies, series and
instances it received. The same rows come back when searching by her name and in the CSV.
Browsing causes no Security Alert at the repository. Screenshots at 1366 and 1920 px go to
``test-artifacts/`` and, with XCA_UPDATE_DOCS=1 (or when missing), to ``docs/``.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import os
import shutil
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.demo_process import running_demo
from xca_gateway.consumer.imaging import retrieve_study
from xca_gateway.protocol.tls import certificate_info, client_context

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
DOCS = REPO / "docs"
CHROMIUM = Path("/usr/bin/chromium")
ZONE = "Europe/Zurich"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_demo(tmp_path_factory.mktemp("officer-demo")) as data:
        yield data


def alice(data: dict[str, Any], community: int) -> str:
    patients = data["communities"][community]["samplePatients"]
    return str(next(p["id"] for p in patients if p["crossCommunityKey"] == "alice"))


def spki_pin(url: str) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the certificate served at ``url``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    host, port = url.removeprefix("https://").split(":")
    pem = ssl.get_server_certificate((host, int(port)))
    spki = (
        x509.load_pem_x509_certificate(pem.encode())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def repository_alerts(data: dict[str, Any]) -> int:
    """Security Alerts the repository itself recorded (ITI-81, as the audit consumer)."""
    arr = data["auditRepository"]
    pair = arr["auditConsumer"]
    ctx = client_context(Path(data["ca"]), Path(pair["cert"]), Path(pair["key"]))
    with httpx.Client(verify=ctx, timeout=60) as client:
        response = client.get(
            arr["fhir"] + "/AuditEvent",
            params={"date": "ge2020-01-01", "type": "110113", "source": "demo-arr"},
        )
    assert response.status_code == 200, response.text
    return int(response.json().get("total") or 0)


def expected_accesses(data: dict[str, Any], out: Path) -> tuple[list[tuple[Any, ...]], set[str]]:
    """The consumer flow for alice through north: (kind, community, what) of each access it
    makes, and the communities holding her studies."""
    names = {c["homeCommunityId"]: c["name"] for c in data["communities"]}
    reports = asyncio.run(
        retrieve_study(
            gateway=data["communities"][0]["endpoints"]["iti18"].removesuffix("/ig/iti18"),
            ca=Path(data["ca"]),
            cert=Path(data["client"]["cert"]),
            key=Path(data["client"]["key"]),
            patient_id=alice(data, 0),
            study_instance_uid=None,
            out_dir=out,
        )
    )
    communities = {names[r.manifest.home_community_id] for r in reports}
    rows: list[tuple[Any, ...]] = [("query", ", ".join(sorted(names.values())), "query")]
    for report in reports:
        assert report.written and not report.errors
        series = {
            str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
            for f in report.written
        }
        community = names[report.manifest.home_community_id]
        rows.append(("document retrieve", community, "1 document"))
        rows.append(
            (
                "study retrieve",
                community,
                f"1 study, {len(series)} series, {len(report.written)} "
                f"instance{'' if len(report.written) == 1 else 's'}",
            )
        )
    return rows, communities


def test_the_officer_finds_every_access_to_alices_images(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    arr = demo["auditRepository"]
    officer = arr["officer"]
    # What the demo hands the officer: the CA to trust and a PKCS#12 to import.
    assert Path(officer["ca"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    from cryptography.hazmat.primitives.serialization import pkcs12

    bundle = pkcs12.load_pkcs12(
        Path(officer["pkcs12"]).read_bytes(), officer["pkcs12Password"].encode()
    )
    assert bundle.key is not None and bundle.cert is not None
    assert "officer" in bundle.cert.certificate.subject.rfc4514_string()

    expected, communities = expected_accesses(demo, tmp_path / "retrieved")
    assert len(communities) == 3, "alice has studies in three communities"
    user = certificate_info(Path(demo["client"]["cert"]).read_bytes()).subject
    alerts_before = repository_alerts(demo)
    ARTIFACTS.mkdir(exist_ok=True)
    pin = spki_pin(arr["ui"])
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            accept_downloads=True,
            viewport={"width": 1366, "height": 900},
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                # The demo CA, as the officer would import it (the repository's key pinned).
                f"--ignore-certificate-errors-spki-list={pin}",
            ],
        )
        try:
            page = context.new_page()
            page.goto(arr["ui"] + "/login")
            page.fill("#username", officer["username"])
            page.fill("#password", officer["password"])
            page.click("#login")
            sync_api.expect(page.locator("#officer")).to_have_text(officer["username"])
            page.select_option("#tz", ZONE)
            page.click("#tz-set")
            sync_api.expect(page.locator("#tz")).to_have_value(ZONE)

            # The gateways' records arrive asynchronously: reload until every access is in.
            url = f"{arr['ui']}/report?patient={alice(demo, 0)}"
            rows = page.locator("#report tbody tr")
            deadline = time.monotonic() + 90
            while True:
                page.goto(url)
                if rows.count() >= len(expected) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            found = []
            for i in range(rows.count()):
                row = rows.nth(i)
                found.append(
                    (
                        row.get_attribute("data-kind"),
                        row.locator("td.community").inner_text().strip(),
                        row.locator("td.what").inner_text().strip(),
                    )
                )
                # Who: the consumer's verified certificate; allowed; the officer's zone,
                # UTC on hover.
                assert row.locator("td.who").inner_text().strip() == user
                assert row.locator("td.outcome").inner_text().strip().startswith("yes")
                stamp = row.locator("td.time time")
                assert stamp.inner_text().endswith(("CET", "CEST"))
                assert (stamp.get_attribute("title") or "").endswith(" UTC")
            # One row per access, each with its community and counts.
            assert Counter(found) == Counter(expected), found
            sync_api.expect(page.locator("#r-accesses")).to_have_text(str(len(expected)))
            sync_api.expect(page.locator("#r-communities")).to_have_text("3")
            sync_api.expect(page.locator("#r-name")).to_contain_text("Lindqvist^Alice")

            # The layout holds at both widths: nothing wider than the window.
            for width in (1366, 1920):
                page.set_viewport_size({"width": width, "height": 900})
                page.goto(url)
                overflow = page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                assert overflow <= 0, f"the report overflows at {width} px by {overflow} px"
                shot = ARTIFACTS / f"officer-report-{width}.png"
                page.screenshot(path=str(shot), full_page=True)
                target = DOCS / f"officer-report-{width}.png"
                if os.environ.get("XCA_UPDATE_DOCS") or not target.exists():
                    shutil.copyfile(shot, target)

            # The same person by name; the CSV carries the same rows, times in UTC.
            page.fill("#f-patient", "Lindqvist")
            page.click("#search")
            sync_api.expect(rows).to_have_count(len(expected))
            with page.expect_download() as download:
                page.click("#report-csv")
            path = download.value.path()
            assert path is not None
            table = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8-sig"))))
            assert Counter(
                (r["access"], r["community"].replace("; ", ", "), r["what"]) for r in table
            ) == Counter(expected)
            for r in table:
                assert r["access_time_utc"].endswith("Z") and r["time_zone"] == ZONE
                assert r["user"] == user and r["allowed"] == "yes"
                assert datetime.fromisoformat(r["access_time_utc"].replace("Z", "+00:00")) <= (
                    datetime.now(UTC)
                )
            with page.expect_download() as pdf:
                page.click("#report-pdf")
            pdf_path = pdf.value.path()
            assert pdf_path is not None and Path(pdf_path).read_bytes().startswith(b"%PDF-")
        finally:
            context.close()
    # Signing in, browsing and exporting caused no node-authentication alert at the repository.
    assert repository_alerts(demo) == alerts_before
    # The repository's metrics: records ingested and stored.
    metrics = httpx.get(arr["metrics"], timeout=30).text
    assert "xca_arr_store_records " in metrics and "xca_arr_refused_senders_total" in metrics
